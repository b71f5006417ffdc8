//! The boundaries between the UNet's units, in the order a forward walks them: `conv_in`,
//! each resnet, each transformer, each down- or up-sampler (with its conv), the output norm
//! with `conv_out`, then the end. A recording walk notes how many cache entries it made
//! before each boundary; a walk that recomputes its first units runs them densely and turns
//! masked at a boundary, from the cache entry the recording had reached there.

use std::time::Instant;

use retouch_kernels::{Tensor, TokenSet};

use crate::nn::exec::{Exec, Masked, Segment};
use crate::{Error, Result};

/// What a walk does at its unit boundaries.
#[derive(Default)]
pub(super) struct Boundaries<'a> {
    /// Boundaries passed so far.
    next: usize,
    /// Entries recorded before each boundary passed (a recording walk fills it).
    pub(super) entry_starts: Option<Vec<usize>>,
    /// Turn a dense walk masked at this boundary.
    switch: Option<Switch<'a>>,
    /// When each boundary was passed.
    passed_at: Vec<Instant>,
}

struct Switch<'a> {
    boundary: usize,
    /// The cache entry the masked part starts reading at.
    cursor: usize,
    segments: Vec<Segment<'a>>,
}

impl<'a> Boundaries<'a> {
    /// Notes the entries recorded before each boundary.
    pub(super) fn counting() -> Boundaries<'a> {
        Boundaries {
            entry_starts: Some(Vec::new()),
            ..Boundaries::default()
        }
    }

    /// Runs the walk densely up to `boundary`, then masked over `segments` from entry
    /// `cursor` on.
    pub(super) fn switching(
        boundary: usize,
        cursor: usize,
        segments: Vec<Segment<'a>>,
    ) -> Boundaries<'a> {
        Boundaries {
            switch: Some(Switch {
                boundary,
                cursor,
                segments,
            }),
            ..Boundaries::default()
        }
    }

    /// Seconds between consecutive boundaries: each unit's time in this walk.
    pub(super) fn unit_seconds(&self) -> Vec<f64> {
        self.passed_at
            .windows(2)
            .map(|p| (p[1] - p[0]).as_secs_f64())
            .collect()
    }

    /// Whether a switch is still to come: before the walk, whether it switches at all; after
    /// it, whether it was given a boundary past its end.
    pub(super) fn switch_pending(&self) -> bool {
        self.switch.is_some()
    }

    /// Passes a boundary. `h` is the walk's current activation at resolution `level`, and
    /// `skips` the down path's saved outputs at `skip_levels`; a switch here turns each of
    /// them from dense maps `[segments, h, w, c]` into the segments' active rows.
    pub(super) fn pass(
        &mut self,
        exec: &mut Exec<'a>,
        h: &mut Tensor,
        skips: &mut [Tensor],
        level: usize,
        skip_levels: &[usize],
    ) -> Result<()> {
        self.passed_at.push(Instant::now());
        if let (Some(starts), Exec::Record { cache, .. }) = (&mut self.entry_starts, &*exec) {
            starts.push(cache.entries.len());
        }
        if self
            .switch
            .as_ref()
            .is_some_and(|s| s.boundary == self.next)
        {
            let s = self.switch.take().expect("checked above");
            let m = Masked::resume(s.segments, s.cursor, level);
            *h = active_rows(h, &m.level_tokens(level)?)?;
            for (skip, &l) in skips.iter_mut().zip(skip_levels) {
                *skip = active_rows(skip, &m.level_tokens(l)?)?;
            }
            *exec = Exec::Masked(m);
        }
        self.next += 1;
        Ok(())
    }
}

/// Each segment's active rows of a dense map `[segments, h, w, c]`, stacked.
fn active_rows(map: &Tensor, tokens: &[&TokenSet]) -> Result<Tensor> {
    let c = map.dim(-1)?;
    let samples = map.split_batch(&vec![1; map.dim(0)?])?;
    if samples.len() != tokens.len() {
        return Err(Error::Invalid(format!(
            "unet: {} dense samples for {} segments",
            samples.len(),
            tokens.len()
        )));
    }
    let rows = samples
        .into_iter()
        .zip(tokens)
        .map(|(sample, t)| {
            let positions = sample.elem_count() / c.max(1);
            if positions != t.height() * t.width() {
                return Err(Error::Invalid(format!(
                    "unet: a {positions}-position map for a {}x{} token grid",
                    t.height(),
                    t.width()
                )));
            }
            Ok(sample
                .reshape(&[positions, c])?
                .gather_rows(t.positions())?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::concat_batch(&rows.iter().collect::<Vec<_>>())?)
}
