//! Data movement: nearest up-sampling, concatenation and splitting along channels, and the
//! NCHW <-> NHWC transposes used at the model boundaries.

use rayon::prelude::*;

/// Nearest-neighbour 2x up-sampling of `x = [batch, h, w, c]` into `[batch, 2h, 2w, c]`.
pub fn upsample_nearest2x(x: &[f32], out: &mut [f32], batch: usize, h: usize, w: usize, c: usize) {
    let out_row = 2 * w * c;
    out.par_chunks_mut(out_row)
        .enumerate()
        .take(batch * 2 * h)
        .for_each(|(r, o)| {
            let (b, oy) = (r / (2 * h), r % (2 * h));
            let src = &x[(b * h + oy / 2) * w * c..][..w * c];
            for (ox, px) in o.chunks_exact_mut(c).enumerate() {
                px.copy_from_slice(&src[(ox / 2) * c..][..c]);
            }
        });
}

/// Concatenates `[rows, c_i]` matrices along columns into `[rows, sum c_i]`.
pub fn concat_columns(parts: &[(&[f32], usize)], out: &mut [f32], rows: usize) {
    let total: usize = parts.iter().map(|p| p.1).sum();
    out.par_chunks_mut(total)
        .enumerate()
        .take(rows)
        .for_each(|(r, o)| {
            let mut at = 0;
            for &(data, c) in parts {
                o[at..at + c].copy_from_slice(&data[r * c..][..c]);
                at += c;
            }
        });
}

/// Copies columns `[start, start + width)` of `x = [rows, cols]` into `out = [rows, width]`.
pub fn column_range(x: &[f32], cols: usize, start: usize, width: usize, out: &mut [f32]) {
    out.par_chunks_mut(width.max(1))
        .zip(x.par_chunks(cols.max(1)))
        .for_each(|(o, row)| o.copy_from_slice(&row[start..start + width]));
}

/// Swaps the two inner dimensions: `[batch, a, b] -> [batch, b, a]`.
pub fn transpose_inner(x: &[f32], out: &mut [f32], batch: usize, a: usize, b: usize) {
    const TILE: usize = 32;
    out.par_chunks_mut(a * b)
        .zip(x.par_chunks(a * b))
        .take(batch)
        .for_each(|(o, x)| {
            for i0 in (0..a).step_by(TILE) {
                for j0 in (0..b).step_by(TILE) {
                    for i in i0..(i0 + TILE).min(a) {
                        for j in j0..(j0 + TILE).min(b) {
                            o[j * a + i] = x[i * b + j];
                        }
                    }
                }
            }
        });
}

/// Zero padding of `x = [batch, h, w, c]` by (top, bottom, left, right) positions.
#[allow(clippy::too_many_arguments)]
pub fn pad2d(
    x: &[f32],
    out: &mut [f32],
    batch: usize,
    h: usize,
    w: usize,
    c: usize,
    (top, bottom, left, right): (usize, usize, usize, usize),
) {
    let (oh, ow) = (h + top + bottom, w + left + right);
    out.par_chunks_mut(ow * c)
        .enumerate()
        .take(batch * oh)
        .for_each(|(r, row)| {
            let (b, y) = (r / oh, r % oh);
            row.fill(0.0);
            if y >= top && y < top + h {
                let src = &x[(b * h + y - top) * w * c..][..w * c];
                row[left * c..(left + w) * c].copy_from_slice(src);
            }
        });
}
