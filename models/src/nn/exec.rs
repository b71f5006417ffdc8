//! How a UNet forward runs: dense, dense while recording the activations that cached-mode
//! edits reuse, or masked (active token rows only, the recorded activations for the rest).

use retouch_kernels::{DType, GroupStats, Tensor, TokenSet};

use crate::{Error, Result};

/// One recorded activation, per batch element (CFG branch). Entries are consumed in the
/// order the forward produced them.
#[derive(Clone, Debug)]
pub enum CacheEntry {
    /// The full input map of a 3x3 conv, `[h * w, c]` per batch element.
    ConvInput(Vec<Tensor>),
    /// A self-attention's keys and values, `[tokens, c]` each, per batch element.
    KeyValue(Vec<(Tensor, Tensor)>),
    /// A group norm's statistics, `batch * groups`.
    Stats(Vec<GroupStats>),
}

impl CacheEntry {
    pub fn size_in_bytes(&self) -> usize {
        match self {
            CacheEntry::ConvInput(maps) => maps.iter().map(Tensor::size_in_bytes).sum(),
            CacheEntry::KeyValue(kv) => kv
                .iter()
                .map(|(k, v)| k.size_in_bytes() + v.size_in_bytes())
                .sum(),
            CacheEntry::Stats(s) => s.len() * std::mem::size_of::<GroupStats>(),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            CacheEntry::ConvInput(_) => "conv input",
            CacheEntry::KeyValue(_) => "keys/values",
            CacheEntry::Stats(_) => "group-norm statistics",
        }
    }
}

/// The activations of one denoising step of a template.
#[derive(Clone, Debug, Default)]
pub struct StepCache {
    pub entries: Vec<CacheEntry>,
}

impl StepCache {
    pub fn size_in_bytes(&self) -> usize {
        self.entries.iter().map(CacheEntry::size_in_bytes).sum()
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

/// State of a masked forward: the cache being consumed and the token sets per resolution.
pub struct Masked<'a> {
    cache: &'a StepCache,
    cursor: usize,
    levels: &'a [TokenSet],
    level: usize,
}

impl<'a> Masked<'a> {
    pub fn new(cache: &'a StepCache, levels: &'a [TokenSet]) -> Masked<'a> {
        Masked {
            cache,
            cursor: 0,
            levels,
            level: 0,
        }
    }

    pub fn tokens(&self) -> &'a TokenSet {
        &self.levels[self.level]
    }

    pub fn level_tokens(&self, level: usize) -> Result<&'a TokenSet> {
        self.levels.get(level).ok_or_else(|| {
            Error::Invalid(format!("masked forward: no token set for level {level}"))
        })
    }

    pub fn level(&self) -> usize {
        self.level
    }

    pub fn set_level(&mut self, level: usize) {
        self.level = level;
    }

    /// The next cache entry, which must be of the kind the layer expects.
    pub fn next(&mut self, expected: &'static str) -> Result<&'a CacheEntry> {
        let entry = self.cache.entries.get(self.cursor).ok_or_else(|| {
            Error::Invalid(format!(
                "activation cache ended at entry {} (wanted {expected})",
                self.cursor
            ))
        })?;
        if entry.kind() != expected {
            return Err(Error::Invalid(format!(
                "activation cache entry {} is {}, the layer wants {expected}: cache and model differ",
                self.cursor,
                entry.kind()
            )));
        }
        self.cursor += 1;
        Ok(entry)
    }

    /// Whether every entry was used (a check that cache and model agree).
    pub fn finished(&self) -> bool {
        self.cursor == self.cache.entries.len()
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
