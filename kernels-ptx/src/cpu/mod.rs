//! CPU implementations of every op, on slices. Dense GEMM goes through the `gemm` crate;
//! everything else is written here with vectorisable inner loops (compiled for AVX2+FMA as
//! well as the baseline and picked at run time by `multiversion`) and parallelised with rayon.
//!
//! These functions trust their callers (the `Tensor` ops) to have checked shapes; they assert
//! what would otherwise be memory-unsafe.

pub mod activation;
pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod gather;
pub mod gemm;
pub mod layout;
pub mod lora;
pub mod math;
pub mod norm;
pub mod softmax;
pub mod tiles;
pub mod timestep;

/// Rows per rayon task for row-wise ops: large enough to amortise scheduling.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (16384 / row_len.max(1)).max(1)
}
