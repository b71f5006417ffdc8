//! Row gather and scatter: packing the active tokens of a map, and writing them back.

use rayon::prelude::*;

/// `out[i] = src[index[i]]` for rows of `cols` values.
pub fn gather_rows(src: &[f32], cols: usize, index: &[u32], out: &mut [f32]) {
    out.par_chunks_mut(cols)
        .zip(index.par_iter())
        .for_each(|(o, &i)| o.copy_from_slice(&src[i as usize * cols..][..cols]));
}

/// `dst[index[i]] = rows[i]`; indices must be unique (checked by the caller).
pub fn scatter_rows(dst: &mut [f32], cols: usize, index: &[u32], rows: &[f32]) {
    for (row, &i) in rows.chunks_exact(cols).zip(index) {
        dst[i as usize * cols..][..cols].copy_from_slice(row);
    }
}
