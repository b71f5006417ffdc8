use multiversion::multiversion;
use rayon::prelude::*;

use super::math;

/// Softmax of one row in place; the max is subtracted first, so large inputs are safe.
#[multiversion(targets("x86_64+avx2+fma"))]
pub fn softmax_row(row: &mut [f32]) {
    let max = math::max(row);
    if max == f32::NEG_INFINITY {
        // Every entry masked: define the result as zeros rather than NaN.
        row.fill(0.0);
        return;
    }
    let inv = 1.0 / math::exp_shifted_sum(row, max);
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// Softmax over the last dimension of `data = [rows, len]`, in place.
pub fn softmax_last_dim(data: &mut [f32], len: usize) {
    if len == 0 {
        return;
    }
    data.par_chunks_mut(super::rows_per_task(len) * len)
        .for_each(|rows| rows.chunks_exact_mut(len).for_each(softmax_row));
}
