//! 2-D convolution over channels-last maps, dense and masked, as im2col + GEMM in row chunks.
//!
//! Both forms share one path: a list of output rows, each naming its input map and output
//! position. For each chunk of rows the patches (kh * kw * cin values) are gathered into a
//! small column buffer and multiplied by the packed weight `[kh * kw * cin, cout]`. A masked
//! convolution is the same with fewer rows and an input whose rows come from two sources.

use rayon::prelude::*;

use super::gemm::{MatRef, Threads, sgemm};
use crate::FloatElement;
use crate::tokens::NOT_ACTIVE;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub in_h: usize,
    pub in_w: usize,
    pub cin: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ConvGeometry {
    pub fn out_h(&self) -> usize {
        (self.in_h + 2 * self.pad).saturating_sub(self.kh) / self.stride + 1
    }

    pub fn out_w(&self) -> usize {
        (self.in_w + 2 * self.pad).saturating_sub(self.kw) / self.stride + 1
    }

    pub fn patch_len(&self) -> usize {
        self.kh * self.kw * self.cin
    }
}

/// A source of input rows (one per position of the input grid, `cin` values each).
pub trait ConvInput: Sync {
    fn copy_row(&self, position: usize, dst: &mut [f32]);
}

/// A whole map held densely, `[in_h * in_w, cin]`.
pub struct DenseInput<'a> {
    pub data: &'a [f32],
    pub cin: usize,
}

impl ConvInput for DenseInput<'_> {
    #[inline]
    fn copy_row(&self, position: usize, dst: &mut [f32]) {
        dst.copy_from_slice(&self.data[position * self.cin..][..self.cin]);
    }
}

/// Fresh rows for the active positions, the template's cached map for the rest. The
/// composite map is never built: each neighbour is read from whichever source holds it.
pub struct MaskedInput<'a, C: FloatElement> {
    pub fresh: &'a [f32],
    pub row_of: &'a [u32],
    pub cached: &'a [C],
    pub cin: usize,
}

impl<C: FloatElement> ConvInput for MaskedInput<'_, C> {
    #[inline]
    fn copy_row(&self, position: usize, dst: &mut [f32]) {
        let row = self.row_of[position];
        if row != NOT_ACTIVE {
            dst.copy_from_slice(&self.fresh[row as usize * self.cin..][..self.cin]);
        } else {
            C::load_row(&self.cached[position * self.cin..][..self.cin], dst);
        }
    }
}

/// One output row: which input map, and the position in the output grid.
#[derive(Clone, Copy, Debug)]
pub struct OutRow {
    pub input: u32,
    pub position: u32,
}

fn fill_patch<I: ConvInput>(g: &ConvGeometry, input: &I, out_position: usize, patch: &mut [f32]) {
    let out_w = g.out_w();
    let (oy, ox) = (out_position / out_w, out_position % out_w);
    for ky in 0..g.kh {
        let iy = (oy * g.stride + ky) as isize - g.pad as isize;
        for kx in 0..g.kw {
            let ix = (ox * g.stride + kx) as isize - g.pad as isize;
            let dst = &mut patch[(ky * g.kw + kx) * g.cin..][..g.cin];
            if iy < 0 || ix < 0 || iy >= g.in_h as isize || ix >= g.in_w as isize {
                dst.fill(0.0);
            } else {
                input.copy_row(iy as usize * g.in_w + ix as usize, dst);
            }
        }
    }
}

/// Rows per task: about 128 (the GEMM stays efficient, the column buffer stays in cache),
/// with the number of tasks a multiple of the thread count so no thread idles at the end.
fn chunk_rows(rows: usize) -> usize {
    const TARGET: usize = 128;
    let threads = rayon::current_num_threads().max(1);
    let tasks = rows.div_ceil(TARGET).div_ceil(threads) * threads;
    rows.div_ceil(tasks.max(1)).max(1)
}

/// Below this many output rows a conv runs as one GEMM (see `conv_rows`).
const SMALL_ROWS: usize = 512;

/// Computes `out[r] = bias + sum over the patch of rows[r]` for every requested output row.
/// `weight` is `[kh * kw * cin, cout]`; `out` is `[rows.len(), cout]`.
pub fn conv_rows<I: ConvInput>(
    g: &ConvGeometry,
    inputs: &[I],
    rows: &[OutRow],
    weight: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let k = g.patch_len();
    assert_eq!(weight.len(), k * g.cout, "conv: weight size");
    assert_eq!(out.len(), rows.len() * g.cout, "conv: output size");
    if rows.is_empty() {
        return;
    }
    if rows.len() < SMALL_ROWS {
        // Few rows (low resolutions, masked forwards): one GEMM over all of them with the
        // library's own threading, which packs the weight once; row chunks would each pack
        // the whole weight again, and that costs as much as the product at these sizes.
        let mut col = vec![0.0f32; rows.len() * k];
        col.par_chunks_mut(k)
            .zip(rows.par_iter())
            .for_each(|(patch, row)| {
                fill_patch(g, &inputs[row.input as usize], row.position as usize, patch)
            });
        patches_times_weight(g, &col, weight, bias, out, Threads::Pool);
        return;
    }
    let chunk = chunk_rows(rows.len());
    out.par_chunks_mut(chunk * g.cout)
        .zip(rows.par_chunks(chunk))
        .for_each_init(Vec::new, |col: &mut Vec<f32>, (out_chunk, row_chunk)| {
            col.resize(row_chunk.len() * k, 0.0);
            for (patch, row) in col.chunks_mut(k).zip(row_chunk) {
                fill_patch(g, &inputs[row.input as usize], row.position as usize, patch);
            }
            patches_times_weight(g, col, weight, bias, out_chunk, Threads::Single);
        });
}

/// `out = bias + col * weight` for the patches in `col` (`[rows, patch_len]`).
fn patches_times_weight(
    g: &ConvGeometry,
    col: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    threads: Threads,
) {
    let k = g.patch_len();
    if let Some(bias) = bias {
        for o in out.chunks_mut(g.cout) {
            o.copy_from_slice(bias);
        }
    }
    sgemm(
        col.len() / k,
        g.cout,
        k,
        out,
        g.cout,
        MatRef::rows(col, k),
        MatRef::rows(weight, g.cout),
        bias.is_some(),
        1.0,
        threads,
    );
}
