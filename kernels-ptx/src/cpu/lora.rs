//! LoRA: merging `W += s * up * down` into a weight in place, and the unmerged segmented form
//! `y += s_i * (x * down_i^T) * up_i^T` for batches whose requests use different adapters.
//!
//! Shapes follow PEFT: `W = [out, in]`, `down = [rank, in]` (lora_A), `up = [out, rank]`
//! (lora_B).

use rayon::prelude::*;

use super::gemm::{MatRef, Threads, sgemm};
use crate::FloatElement;

/// Rows of the weight patched per task: the f32 delta of that many rows is the only scratch.
const PATCH_ROWS: usize = 64;

/// `w += scale * up * down` for an f32 weight, as one accumulating GEMM.
pub fn patch_f32(
    w: &mut [f32],
    out: usize,
    inp: usize,
    up: &[f32],
    down: &[f32],
    rank: usize,
    scale: f32,
) {
    sgemm(
        out,
        inp,
        rank,
        w,
        inp,
        MatRef::rows(up, rank),
        MatRef::rows(down, inp),
        true,
        scale,
        Threads::Pool,
    );
}

/// `w += scale * up * down` for a half-precision weight: the delta of a block of rows is
/// computed in f32, added to the widened weight in f32, and rounded once.
pub fn patch_half<T: FloatElement>(
    w: &mut [T],
    inp: usize,
    up: &[f32],
    down: &[f32],
    rank: usize,
    scale: f32,
) {
    w.par_chunks_mut(PATCH_ROWS * inp)
        .enumerate()
        .for_each_init(Vec::new, |acc: &mut Vec<f32>, (block, w_rows)| {
            let rows = w_rows.len() / inp;
            acc.resize(rows * inp, 0.0);
            T::load_row(w_rows, acc);
            let up_rows = &up[block * PATCH_ROWS * rank..];
            sgemm(
                rows,
                inp,
                rank,
                acc,
                inp,
                MatRef::rows(up_rows, rank),
                MatRef::rows(down, inp),
                true,
                scale,
                Threads::Single,
            );
            T::store_row(acc, w_rows);
        });
}

/// One row segment of an unmerged LoRA batch.
pub struct Segment<'a> {
    pub rows: std::ops::Range<usize>,
    pub down: &'a [f32],
    pub up: &'a [f32],
    pub rank: usize,
    pub scale: f32,
}

/// `y[rows_i] += scale_i * (x[rows_i] * down_i^T) * up_i^T` for each segment, with
/// `x = [n, in]`, `y = [n, out]`.
pub fn apply_segments(x: &[f32], inp: usize, y: &mut [f32], out: usize, segments: &[Segment<'_>]) {
    let mut hidden = Vec::new();
    for seg in segments {
        let n = seg.rows.len();
        hidden.clear();
        hidden.resize(n * seg.rank, 0.0);
        sgemm(
            n,
            seg.rank,
            inp,
            &mut hidden,
            seg.rank,
            MatRef::rows(&x[seg.rows.start * inp..], inp),
            MatRef::transposed(seg.down, inp),
            false,
            1.0,
            Threads::Pool,
        );
        sgemm(
            n,
            out,
            seg.rank,
            &mut y[seg.rows.start * out..seg.rows.end * out],
            out,
            MatRef::rows(&hidden, seg.rank),
            MatRef::transposed(seg.up, seg.rank),
            true,
            seg.scale,
            Threads::Pool,
        );
    }
}
