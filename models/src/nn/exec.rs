//! How a UNet forward runs: dense, dense while recording the activations that cached-mode
//! edits reuse, or masked (active token rows only, the recorded activations for the rest).

use std::sync::OnceLock;

use retouch_kernels::{BlendedSegment, DType, GroupStats, Tensor, TokenSet};

use crate::{Error, Result};

/// One recorded activation, per batch element (CFG branch). Entries are consumed in the
/// order the forward produced them.
#[derive(Clone, Debug)]
pub enum CacheEntry {
    /// The full input map of a 3x3 conv, `[h * w, c]` per batch element.
    ConvInput(Vec<Tensor>),
    /// A self-attention's keys and values, `[tokens, c]` each, per batch element.
    KeyValue(Vec<(Tensor, Tensor)>),
    /// A group norm's statistics (`batch * groups`) and, per batch element, its input's
    /// per-position moments `[positions, groups * 2]` in units of those statistics
    /// ([`Tensor::group_position_moments`]): a masked norm blends them with its fresh rows.
    Stats {
        stats: Vec<GroupStats>,
        moments: Vec<Tensor>,
    },
}

impl CacheEntry {
    pub fn size_in_bytes(&self) -> usize {
        match self {
            CacheEntry::ConvInput(maps) => maps.iter().map(Tensor::size_in_bytes).sum(),
            CacheEntry::KeyValue(kv) => kv
                .iter()
                .map(|(k, v)| k.size_in_bytes() + v.size_in_bytes())
                .sum(),
            CacheEntry::Stats { stats, moments } => {
                stats.len() * std::mem::size_of::<GroupStats>()
                    + moments.iter().map(Tensor::size_in_bytes).sum::<usize>()
            }
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            CacheEntry::ConvInput(_) => "conv input",
            CacheEntry::KeyValue(_) => "keys/values",
            CacheEntry::Stats { .. } => "group-norm statistics",
        }
    }
}

/// The activations of one denoising step of a template: entries `first..` of the recording
/// (a step loaded for a forward that recomputes its first units holds only the entries from
/// the first one it reads; a whole recording starts at 0).
#[derive(Clone, Debug, Default)]
pub struct StepCache {
    pub first: usize,
    pub entries: Vec<CacheEntry>,
}

impl StepCache {
    /// The index after its last entry (the recording's length for a whole one).
    pub fn end(&self) -> usize {
        self.first + self.entries.len()
    }

    /// Entry `index` of the recording, if held.
    pub fn entry(&self, index: usize) -> Option<&CacheEntry> {
        index
            .checked_sub(self.first)
            .and_then(|i| self.entries.get(i))
    }

    pub fn size_in_bytes(&self) -> usize {
        self.entries.iter().map(CacheEntry::size_in_bytes).sum()
    }

    /// The batch (CFG branches) it was recorded with, from its first map or keys.
    pub fn branches(&self) -> Option<usize> {
        self.entries.iter().find_map(|e| match e {
            CacheEntry::ConvInput(maps) => Some(maps.len()),
            CacheEntry::KeyValue(kv) => Some(kv.len()),
            CacheEntry::Stats { moments, .. } => (!moments.is_empty()).then_some(moments.len()),
        })
    }

    /// The dtype its maps and keys are stored in.
    pub fn dtype(&self) -> Option<DType> {
        self.entries.iter().find_map(|e| match e {
            CacheEntry::ConvInput(maps) => maps.first().map(Tensor::dtype),
            CacheEntry::KeyValue(kv) => kv.first().map(|(k, _)| k.dtype()),
            CacheEntry::Stats { moments, .. } => moments.first().map(Tensor::dtype),
        })
    }
}

/// A step's cache entries `first..end` arriving one by one, in order, from a loader thread:
/// a masked forward reading from it waits for each entry only when its layer needs it, so
/// the load overlaps the layers before (the bubble-free rule's per-layer wait).
pub struct StreamingStep {
    first: usize,
    entries: Vec<OnceLock<std::result::Result<CacheEntry, String>>>,
}

impl StreamingStep {
    pub fn new(first: usize, end: usize) -> StreamingStep {
        StreamingStep {
            first,
            entries: (first..end.max(first)).map(|_| OnceLock::new()).collect(),
        }
    }

    pub fn first(&self) -> usize {
        self.first
    }

    pub fn end(&self) -> usize {
        self.first + self.entries.len()
    }

    /// Delivers entry `index`, or the reason it could not be read; false if it is outside
    /// the step or was delivered already.
    pub fn deliver(&self, index: usize, entry: std::result::Result<CacheEntry, String>) -> bool {
        index
            .checked_sub(self.first)
            .and_then(|i| self.entries.get(i))
            .is_some_and(|slot| slot.set(entry).is_ok())
    }

    /// Fails every entry not delivered yet (a loader that stopped early), so no reader
    /// waits forever.
    pub fn fail_rest(&self, reason: &str) {
        for slot in &self.entries {
            let _ = slot.set(Err(reason.to_string()));
        }
    }

    /// Entry `index`, once delivered; None outside the step.
    pub fn wait(&self, index: usize) -> Option<Result<&CacheEntry>> {
        let slot = self.entries.get(index.checked_sub(self.first)?)?;
        Some(
            slot.wait()
                .as_ref()
                .map_err(|e| Error::Invalid(format!("loading the step's cache: {e}"))),
        )
    }
}

/// Where a masked forward reads a segment's cache entries: a whole (or partial) step in
/// memory, or one still streaming in.
#[derive(Clone, Copy)]
pub enum StepSource<'a> {
    Whole(&'a StepCache),
    Streaming(&'a StreamingStep),
}

impl<'a> StepSource<'a> {
    pub fn first(self) -> usize {
        match self {
            StepSource::Whole(c) => c.first,
            StepSource::Streaming(s) => s.first(),
        }
    }

    pub fn end(self) -> usize {
        match self {
            StepSource::Whole(c) => c.end(),
            StepSource::Streaming(s) => s.end(),
        }
    }

    /// Entry `index` (waiting for a streaming one); None outside the held entries.
    fn entry(self, index: usize) -> Result<Option<&'a CacheEntry>> {
        match self {
            StepSource::Whole(c) => Ok(c.entry(index)),
            StepSource::Streaming(s) => s.wait(index).transpose(),
        }
    }

    /// The step when it is whole in memory.
    pub fn whole(self) -> Option<&'a StepCache> {
        match self {
            StepSource::Whole(c) => Some(c),
            StepSource::Streaming(_) => None,
        }
    }
}

/// The mode of a forward pass.
pub enum Exec<'a> {
    Dense,
    /// Dense, appending every cache entry (stored as `dtype`).
    Record {
        cache: &'a mut StepCache,
        dtype: DType,
    },
    Masked(Masked<'a>),
}

/// One segment of a ragged masked forward: one CFG branch of one cached-mode request, with
/// its token sets per resolution and its template's recording of this step.
#[derive(Clone, Copy)]
pub struct Segment<'a> {
    pub cache: StepSource<'a>,
    /// The branch of `cache` (its per-batch entries) this segment reads.
    pub branch: usize,
    pub levels: &'a [TokenSet],
}

/// State of a masked forward over a ragged batch: every segment's cache is consumed in
/// lockstep (one model, so one entry order), and the rows of a layer are the segments'
/// active rows at the current resolution, stacked in segment order.
pub struct Masked<'a> {
    segments: Vec<Segment<'a>>,
    cursor: usize,
    level: usize,
}

impl<'a> Masked<'a> {
    pub fn new(segments: Vec<Segment<'a>>) -> Masked<'a> {
        Masked::resume(segments, 0, 0)
    }

    /// A masked forward taking over from a dense one at cache entry `cursor` and resolution
    /// `level` (the dense part's layers need no cache entries).
    pub fn resume(segments: Vec<Segment<'a>>, cursor: usize, level: usize) -> Masked<'a> {
        Masked {
            segments,
            cursor,
            level,
        }
    }

    pub fn segments(&self) -> &[Segment<'a>] {
        &self.segments
    }

    /// Each segment's token set at the current level.
    pub fn tokens(&self) -> Result<Vec<&'a TokenSet>> {
        self.level_tokens(self.level)
    }

    /// Each segment's token set at `level`.
    pub fn level_tokens(&self, level: usize) -> Result<Vec<&'a TokenSet>> {
        self.segments
            .iter()
            .map(|s| {
                s.levels.get(level).ok_or_else(|| {
                    Error::Invalid(format!("masked forward: no token set for level {level}"))
                })
            })
            .collect()
    }

    /// Each segment's row count at the current level.
    pub fn rows(&self) -> Result<Vec<usize>> {
        Ok(self.tokens()?.iter().map(|t| t.len()).collect())
    }

    pub fn level(&self) -> usize {
        self.level
    }

    pub fn set_level(&mut self, level: usize) {
        self.level = level;
    }

    /// The next cache entry of every segment (each of the kind the layer expects).
    fn next(&mut self, expected: &'static str) -> Result<Vec<(&'a CacheEntry, usize)>> {
        let cursor = self.cursor;
        let entries = self
            .segments
            .iter()
            .map(|s| {
                let entry = s.cache.entry(cursor)?.ok_or_else(|| {
                    Error::Invalid(if cursor < s.cache.first() {
                        format!(
                            "activation cache entry {cursor} was not loaded (the step holds \
                             entries {} to {})",
                            s.cache.first(),
                            s.cache.end()
                        )
                    } else {
                        format!("activation cache ended at entry {cursor} (wanted {expected})")
                    })
                })?;
                if entry.kind() != expected {
                    return Err(Error::Invalid(format!(
                        "activation cache entry {cursor} is {}, the layer wants {expected}: \
                         cache and model differ",
                        entry.kind()
                    )));
                }
                Ok((entry, s.branch))
            })
            .collect::<Result<Vec<_>>>()?;
        self.cursor += 1;
        Ok(entries)
    }

    /// The next entry's cached conv input map of every segment.
    pub fn conv_inputs(&mut self) -> Result<Vec<&'a Tensor>> {
        self.next(CONV_INPUT)?
            .into_iter()
            .map(|(entry, branch)| match entry {
                CacheEntry::ConvInput(maps) => branch_of(maps, branch, CONV_INPUT),
                _ => unreachable!("kind checked by next()"),
            })
            .collect()
    }

    /// The next entry's cached self-attention keys and values of every segment.
    pub fn key_values(&mut self) -> Result<Vec<&'a (Tensor, Tensor)>> {
        self.next(KEY_VALUE)?
            .into_iter()
            .map(|(entry, branch)| match entry {
                CacheEntry::KeyValue(kv) => branch_of(kv, branch, KEY_VALUE),
                _ => unreachable!("kind checked by next()"),
            })
            .collect()
    }

    /// The next entry's group-norm statistics of every segment (`groups` each) with the
    /// moments of its template's branch, `[positions, groups * 2]`.
    pub fn norm_records(&mut self, groups: usize) -> Result<Vec<(&'a [GroupStats], &'a Tensor)>> {
        self.next(STATS)?
            .into_iter()
            .map(|(entry, branch)| {
                let CacheEntry::Stats { stats, moments } = entry else {
                    unreachable!("kind checked by next()")
                };
                let part = stats
                    .get(branch * groups..(branch + 1) * groups)
                    .ok_or_else(|| {
                        Error::Invalid(format!(
                            "cached {STATS} have {} values, branch {branch} of {groups} groups \
                             is not among them",
                            stats.len()
                        ))
                    })?;
                Ok((part, branch_of(moments, branch, STATS)?))
            })
            .collect()
    }

    /// The next entry's statistics for the stacked rows `x = [rows, c]`, `groups` per
    /// segment: those of the map the segment computes on, its fresh rows at the active
    /// positions and its template's values elsewhere ([`Tensor::blended_group_stats`]).
    pub fn blended_stats(
        &mut self,
        x: &Tensor,
        groups: usize,
        eps: f32,
    ) -> Result<Vec<GroupStats>> {
        let tokens = self.tokens()?;
        let records = self.norm_records(groups)?;
        let segments: Vec<BlendedSegment<'_>> = tokens
            .iter()
            .zip(records)
            .map(|(t, (template, moments))| BlendedSegment {
                template,
                moments,
                active: t.positions(),
            })
            .collect();
        Ok(x.blended_group_stats_ragged(&segments, eps)?)
    }

    /// The index of the cache entry the next layer reads.
    pub fn cursor(&self) -> usize {
        self.cursor
    }

    /// The segment of every stacked row at the current level (which template's statistics,
    /// time embedding and keys a row uses).
    pub fn row_segments(&self) -> Result<Vec<u32>> {
        Ok(self
            .rows()?
            .iter()
            .enumerate()
            .flat_map(|(s, &n)| std::iter::repeat_n(s as u32, n))
            .collect())
    }

    /// Whether every segment's cache was used up (a check that caches and model agree).
    pub fn finished(&self) -> bool {
        self.segments.iter().all(|s| s.cache.end() == self.cursor)
    }
}

fn branch_of<'a, T>(per_branch: &'a [T], branch: usize, kind: &str) -> Result<&'a T> {
    per_branch.get(branch).ok_or_else(|| {
        Error::Invalid(format!(
            "cached {kind} has {} branches, a segment reads branch {branch}",
            per_branch.len()
        ))
    })
}

/// Adds one vector per sample (`v = [samples, c]`) to `x`: broadcast over each sample's map
/// when dense (`x = [samples, ..., c]`), over each segment's rows when masked (`x = [rows, c]`).
pub(crate) fn add_per_sample(x: &Tensor, v: &Tensor, exec: &Exec<'_>) -> Result<Tensor> {
    let (samples, c) = (v.dim(0)?, v.dim(-1)?);
    match exec {
        Exec::Masked(m) => {
            // One row of `v` per row of `x`, then one elementwise add.
            let index = m.row_segments()?;
            if samples != m.segments().len() {
                return Err(Error::Invalid(format!(
                    "{samples} vectors for {} segments",
                    m.segments().len()
                )));
            }
            Ok(x.add(&v.gather_rows(&index)?)?)
        }
        _ => {
            let mut shape = vec![1; x.rank()];
            shape[0] = samples;
            shape[x.rank() - 1] = c;
            Ok(x.add(&v.clone().reshape(&shape)?)?)
        }
    }
}

/// `[batch, ...rest]` f32 into per-batch `[rest.product / c, c]` tensors of `dtype`.
pub(crate) fn per_batch_rows(x: &Tensor, dtype: DType) -> Result<Vec<Tensor>> {
    let batch = x.dim(0)?;
    let c = x.dim(-1)?;
    x.split_batch(&vec![1; batch])?
        .into_iter()
        .map(|t| {
            let rows = t.elem_count() / c.max(1);
            Ok(t.reshape(&[rows, c])?.to_dtype(dtype)?)
        })
        .collect()
}

pub(crate) const CONV_INPUT: &str = "conv input";
pub(crate) const KEY_VALUE: &str = "keys/values";
pub(crate) const STATS: &str = "group-norm statistics";
