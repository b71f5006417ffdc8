pub mod bench;
mod bench_unet;
pub mod demo;
pub mod edit;
pub mod forward;
pub mod generate;
pub mod quality;
pub mod random_model;
pub mod replay;
pub mod selftest;
mod selftest_unet;
pub mod serve;
pub mod template;
pub mod tokenize;

use std::path::PathBuf;

use retouch_kernels::cuda::{AttentionKernel, GemmBackend};

/// `--gemm`: the GEMMs of GPU workers' linear layers and convolutions (ignored on the CPU).
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum GemmArg {
    /// Retouch's own kernels on CUDA cores (f32).
    Kernels,
    /// Retouch's kernels with each split-K product in one launch (its last block per output
    /// tile sums the slices) instead of a product and a reduction. Not yet checked on a GPU.
    KernelsOneLaunch,
    /// Retouch's kernels on f16 tensor cores (`mma.sync`): activations rounded to f16 as
    /// the tiles read them, the weights' f16 copies, f32 accumulation and output, with the
    /// same fused bias, residual and split-K as `kernels`. Not yet checked on a GPU.
    KernelsF16,
    /// `kernels-f16` with each split-K product in one launch, as `kernels-one-launch`.
    KernelsF16OneLaunch,
    /// cuBLAS in f32 (convolutions as im2col + GEMM); needs libcublas on the library path.
    Cublas,
    /// cuBLAS on TF32 tensor cores (PyTorch's `allow_tf32`): 10-bit significands in the
    /// products, f32 accumulation.
    CublasTf32,
    /// cuBLAS GemmEx on f16 tensor cores: activations and weights rounded to f16 for the
    /// products (weights once, kept beside the f32 ones), f32 accumulation and output; every
    /// other op in f32. Not yet checked on a GPU by this project.
    CublasF16,
}

impl From<GemmArg> for GemmBackend {
    fn from(g: GemmArg) -> GemmBackend {
        match g {
            GemmArg::Kernels => GemmBackend::Kernels,
            GemmArg::KernelsOneLaunch => GemmBackend::KernelsOneLaunch,
            GemmArg::KernelsF16 => GemmBackend::KernelsF16,
            GemmArg::KernelsF16OneLaunch => GemmBackend::KernelsF16OneLaunch,
            GemmArg::Cublas => GemmBackend::Cublas,
            GemmArg::CublasTf32 => GemmBackend::CublasTf32,
            GemmArg::CublasF16 => GemmBackend::CublasF16,
        }
    }
}

/// `--attention`: the attention kernel of GPU workers (ignored on the CPU).
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum AttentionArg {
    /// f32 flash tiles (64 queries x 32 keys), checked on an H100.
    Flash,
    /// Flash tiles on tensor cores: f16 products, f32 accumulation and softmax, for head
    /// widths 40, 64, 80 and 160 (others run `flash`). Not yet checked on a GPU by this
    /// project: run `retouch selftest --device cuda:N` first.
    FlashMma,
    /// `flash-mma` with bf16 products: f32's range (for activations beyond f16's), 8-bit
    /// significands. Not yet checked on a GPU by this project either.
    FlashMmaBf16,
    /// Shared-memory key tiles, one warp per query row.
    Tiles,
    /// One warp per query row, keys read from global memory.
    Rows,
}

impl From<AttentionArg> for AttentionKernel {
    fn from(a: AttentionArg) -> AttentionKernel {
        match a {
            AttentionArg::Flash => AttentionKernel::Flash,
            AttentionArg::FlashMma => AttentionKernel::FlashMma,
            AttentionArg::FlashMmaBf16 => AttentionKernel::FlashMmaBf16,
            AttentionArg::Tiles => AttentionKernel::Tiles,
            AttentionArg::Rows => AttentionKernel::Rows,
        }
    }
}

/// The pipeline folder to use: the one given, else the built-in default `models/tiny`
/// (looked up in the working directory, then in the source tree the binary was built from).
pub fn model_dir(given: Option<PathBuf>) -> Result<PathBuf, String> {
    if let Some(dir) = given {
        return Ok(dir);
    }
    let candidates = [
        PathBuf::from("models/tiny"),
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/tiny")),
    ];
    candidates
        .into_iter()
        .find(|p| p.join("model_index.json").is_file())
        .ok_or_else(|| {
            "no --model given and the built-in default models/tiny is not there \
             (tools/train-tiny builds it)"
                .to_string()
        })
}

/// Rejects step counts and guidance scales no pipeline should run.
pub fn check_steps_and_guidance(steps: usize, guidance: f32) -> Result<(), String> {
    if !(1..=1000).contains(&steps) {
        return Err(format!("--steps must be between 1 and 1000, got {steps}"));
    }
    if !guidance.is_finite() || !(0.0..=100.0).contains(&guidance) {
        return Err(format!(
            "--guidance must be between 0 and 100, got {guidance}"
        ));
    }
    Ok(())
}

/// The workers' cost models on stderr, when they were measured.
pub fn print_cost_models(engine: &retouch_runtime::Engine) {
    for (i, m) in engine.cost_models().iter().enumerate() {
        if m.samples > 0 {
            eprintln!(
                "worker {i}: step = {:.2} ms + FLOPs / {:.1} GFLOP/s ({} timed steps), \
                 {:.1} ms per request outside steps, caches load at {:.2} GB/s",
                m.step_s * 1e3,
                m.gflops(),
                m.samples,
                m.request_s * 1e3,
                m.load_bytes_per_s / 1e9
            );
        }
    }
}

/// A progress bar over denoising steps, on stderr.
pub fn step_bar(steps: usize) -> indicatif::ProgressBar {
    indicatif::ProgressBar::new(steps as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:30} step {pos}/{len} {elapsed}")
            .expect("valid template"),
    )
}
