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
    let index = active_row_index(map.shape(), tokens)?;
    let c = map.dim(-1)?;
    let rows = map.elem_count() / c.max(1);
    Ok(map.clone().reshape(&[rows, c])?.gather_rows(&index)?)
}

/// For a dense map of shape `[segments, h, w, c]` (segment i's map in sample i), the rows
/// of its `[segments * h * w, c]` view that hold each segment's active positions, segment
/// by segment: what the walk keeps when it turns masked.
pub(super) fn active_row_index(shape: &[usize], tokens: &[&TokenSet]) -> Result<Vec<u32>> {
    let samples = shape.first().copied().unwrap_or(0);
    if shape.len() != 4 || samples != tokens.len() {
        return Err(Error::Invalid(format!(
            "unet: a {shape:?} map for {} segments (want [segments, h, w, c])",
            tokens.len()
        )));
    }
    let positions = shape[1] * shape[2];
    let mut index = Vec::with_capacity(tokens.iter().map(|t| t.len()).sum());
    for (i, t) in tokens.iter().enumerate() {
        if (shape[1], shape[2]) != (t.height(), t.width()) {
            return Err(Error::Invalid(format!(
                "unet: a {}x{} map for a {}x{} token grid",
                shape[1],
                shape[2],
                t.height(),
                t.width()
            )));
        }
        let offset = u32::try_from(i * positions)
            .map_err(|_| Error::Invalid("unet: map too large for u32 row indices".into()))?;
        index.extend(t.positions().iter().map(|&p| offset + p));
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_rows_index_each_segments_own_sample() {
        // Two segments on a 3x4 grid, 2 channels: segment 1's rows start 12 positions in.
        let tokens = [
            TokenSet::from_positions(3, 4, vec![0, 5, 11]).unwrap(),
            TokenSet::from_positions(3, 4, vec![2, 7]).unwrap(),
        ];
        let sets: Vec<&TokenSet> = tokens.iter().collect();
        let index = active_row_index(&[2, 3, 4, 2], &sets).unwrap();
        assert_eq!(index, vec![0, 5, 11, 14, 19]);
        let values: Vec<f32> = (0..2 * 12 * 2).map(|v| v as f32).collect();
        let map = Tensor::from_vec(values, &[2, 3, 4, 2]).unwrap();
        let rows = active_rows(&map, &sets).unwrap();
        assert_eq!(rows.shape(), &[5, 2]);
        assert_eq!(
            rows.to_vec_f32(),
            vec![0.0, 1.0, 10.0, 11.0, 22.0, 23.0, 28.0, 29.0, 38.0, 39.0]
        );
    }

    #[test]
    fn active_rows_refuse_a_map_of_another_grid_or_count() {
        let t = TokenSet::from_positions(3, 4, vec![1]).unwrap();
        let one = [&t];
        assert!(active_row_index(&[1, 4, 3, 2], &one).is_err());
        assert!(active_row_index(&[2, 3, 4, 2], &one).is_err());
        assert!(active_row_index(&[12, 2], &one).is_err());
    }
}
