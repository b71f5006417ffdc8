//! Safe wrapper over the `gemm` crate's f32 kernel with strided operands.

use rayon::prelude::*;

/// A read-only strided matrix view: element (i, j) is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major matrix whose rows are `ld` elements apart.
    pub fn rows(data: &'a [f32], ld: usize) -> Self {
        MatRef {
            data,
            row_stride: ld,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major matrix whose rows are `ld` elements apart.
    pub fn transposed(data: &'a [f32], ld: usize) -> Self {
        MatRef {
            data,
            row_stride: 1,
            col_stride: ld,
        }
    }

    fn assert_fits(&self, rows: usize, cols: usize, what: &str) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.row_stride + (cols - 1) * self.col_stride;
            assert!(
                last < self.data.len(),
                "gemm: {what} view {rows}x{cols} overruns its {} elements",
                self.data.len()
            );
        }
    }
}

/// Rows per task below which splitting a GEMM across threads stops paying.
const MIN_SPLIT_ROWS: usize = 128;
/// Largest right-hand side (elements) each row block re-packs; past it the crate threads.
const SPLIT_MAX_RHS: usize = 1 << 22;

/// Whether a GEMM may use the rayon pool or must stay on the calling thread (when the caller
/// already parallelises over independent GEMMs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    Single,
    Pool,
}

/// `dst[m x n] = (accumulate ? dst : 0) + alpha * lhs[m x k] * rhs[k x n]`, `dst` row-major
/// with rows `dst_ld` apart.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_ld: usize,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    accumulate: bool,
    alpha: f32,
    threads: Threads,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * dst_ld + n <= dst.len() && n <= dst_ld,
        "gemm: destination {m}x{n} (ld {dst_ld}) overruns its {} elements",
        dst.len()
    );
    if k == 0 {
        if !accumulate {
            for row in dst.chunks_mut(dst_ld).take(m) {
                row[..n].fill(0.0);
            }
        }
        return;
    }
    lhs.assert_fits(m, k, "lhs");
    rhs.assert_fits(k, n, "rhs");
    let pool = rayon::current_num_threads();
    if threads == Threads::Pool && pool > 1 && m >= 2 * MIN_SPLIT_ROWS && k * n <= SPLIT_MAX_RHS {
        // Row blocks on separate threads, each a single-threaded GEMM: measured faster than
        // the crate's own threading on the tall, thin products of a UNet (8192 x 320 x 320),
        // where every thread re-packing the small right-hand side costs little.
        let tasks = (pool * 4).min(m / MIN_SPLIT_ROWS);
        let rows = m.div_ceil(tasks);
        dst[..(m - 1) * dst_ld + n]
            .par_chunks_mut(rows * dst_ld)
            .enumerate()
            .for_each(|(i, block)| {
                let first = i * rows;
                let lhs_block = MatRef {
                    data: &lhs.data[first * lhs.row_stride..],
                    ..lhs
                };
                let block_rows = rows.min(m - first);
                sgemm(
                    block_rows,
                    n,
                    k,
                    block,
                    dst_ld,
                    lhs_block,
                    rhs,
                    accumulate,
                    alpha,
                    Threads::Single,
                );
            });
        return;
    }
    let parallelism = match threads {
        Threads::Pool if pool > 1 => gemm::Parallelism::Rayon(0),
        _ => gemm::Parallelism::None,
    };
    // SAFETY: every index the kernel touches was bounds-checked above; `dst` is exclusively
    // borrowed and cannot alias the shared `lhs`/`rhs` borrows.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_ld as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
}
