//! `retouch selftest --group unet`: the UNet on the GPU against the host, for the tiny and
//! SD1.5 presets built from random weights: the dense forward with each attention kernel
//! (and with cuBLAS's GEMMs where the machine has cuBLAS), and the cached-mode forward at a
//! 20% mask, and the load-or-recompute forward (a dense prefix of units, then masked, with
//! the cache whole or streaming in); then, for SD1.5, the dense and cached steps' times and a
//! rank-64 LoRA patch of every attention projection.
//!
//! The kernels are checked one by one elsewhere; this checks that they compose into the same
//! network (layer order, skips, broadcasts) at real sizes.

use std::time::Instant;

use retouch_kernels::cuda::selftest::max_err;
use retouch_kernels::cuda::{AttentionKernel, CudaDevice, CudaTensor, GemmBackend, GpuElement};
use retouch_kernels::{DType, Device, Tensor, TokenSet};
use retouch_models::nn::exec::{StepCache, StepSource, StreamingStep};
use retouch_models::nn::gpu::{GpuStepCache, GpuStepSource, GpuStreamingStep};
use retouch_models::random_pipeline::{Preset, RandomPipeline};
use retouch_models::unet::{
    CachedSegment, GpuCachedSegment, GpuRecomputeSegment, RecomputeSegment, UNet, token_levels,
};

use super::bench_unet::{active_rows, centred_mask};

/// A way to run the UNet on the device: the GEMMs of its linear layers and convolutions,
/// and its attention kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Setup {
    gemm: GemmBackend,
    attention: AttentionKernel,
}

impl Setup {
    fn apply(self, dev: &CudaDevice) -> Result<(), Box<dyn std::error::Error>> {
        dev.set_gemm_backend(self.gemm)?;
        dev.set_attention_kernel(self.attention);
        Ok(())
    }

    /// Largest accepted `|gpu - cpu|_2 / |cpu|_2` of the prediction: in f32 only summation
    /// order differs, through a few dozen layers; where products round to f16 (the
    /// tensor-core attention, f16 GEMMs) or TF32 (cuBLAS's tensor cores), 11-bit
    /// significands, 1e-2; bf16 attention (8-bit significands), 5e-2.
    fn tol(self) -> f32 {
        if self.attention == AttentionKernel::FlashMmaBf16 {
            5e-2
        } else if self.attention == AttentionKernel::FlashMma
            || self.gemm.f16_products()
            || self.gemm == GemmBackend::CublasTf32
        {
            1e-2
        } else {
            1e-4
        }
    }

    fn label(self) -> String {
        match self.gemm {
            GemmBackend::Kernels => format!("{:?}", self.attention),
            gemm => format!("{:?} {gemm:?}", self.attention),
        }
    }
}

/// The dense forward's setups: every attention kernel with Retouch's GEMMs, the flash
/// kernels with split-K products in one launch and with the f16 tensor-core GEMMs (both
/// ways of summing split-K), then the flash kernels with each cuBLAS backend the machine
/// can load.
fn dense_setups(dev: &CudaDevice) -> Vec<Setup> {
    let mut setups: Vec<Setup> = KERNELS
        .iter()
        .map(|&attention| Setup {
            gemm: GemmBackend::Kernels,
            attention,
        })
        .collect();
    for gemm in [
        GemmBackend::KernelsOneLaunch,
        GemmBackend::KernelsF16,
        GemmBackend::KernelsF16OneLaunch,
    ] {
        for attention in [AttentionKernel::Flash, AttentionKernel::FlashMma] {
            setups.push(Setup { gemm, attention });
        }
    }
    for gemm in [
        GemmBackend::Cublas,
        GemmBackend::CublasTf32,
        GemmBackend::CublasF16,
    ] {
        match dev.set_gemm_backend(gemm) {
            Ok(()) => {
                for attention in [AttentionKernel::Flash, AttentionKernel::FlashMma] {
                    setups.push(Setup { gemm, attention });
                }
            }
            Err(e) => println!("(no {gemm:?} setups: {e})"),
        }
    }
    let _ = dev.set_gemm_backend(GemmBackend::Kernels);
    setups
}

/// The cached step's setups: the device's default, split-K products in one launch, the
/// tensor-core attention (alone and with those), and that with the f16 tensor-core GEMMs
/// (both ways of summing split-K) or cuBLAS's TF32 or f16 GEMMs where the machine has
/// cuBLAS.
fn cached_setups(default: Setup, dense: &[Setup]) -> Vec<Setup> {
    let mut setups = vec![default];
    for s in [
        Setup {
            gemm: GemmBackend::KernelsOneLaunch,
            attention: AttentionKernel::Flash,
        },
        Setup {
            gemm: GemmBackend::Kernels,
            attention: AttentionKernel::FlashMma,
        },
        Setup {
            gemm: GemmBackend::KernelsOneLaunch,
            attention: AttentionKernel::FlashMma,
        },
        Setup {
            gemm: GemmBackend::KernelsF16,
            attention: AttentionKernel::FlashMma,
        },
        Setup {
            gemm: GemmBackend::KernelsF16OneLaunch,
            attention: AttentionKernel::FlashMma,
        },
        Setup {
            gemm: GemmBackend::CublasTf32,
            attention: AttentionKernel::FlashMma,
        },
        Setup {
            gemm: GemmBackend::CublasF16,
            attention: AttentionKernel::FlashMma,
        },
    ] {
        if dense.contains(&s) && !setups.contains(&s) {
            setups.push(s);
        }
    }
    setups
}

/// A CFG batch of 2 at the preset's latent size, 77 context tokens, timesteps 500 and 999.
fn inputs(preset: Preset) -> (Tensor, Vec<f32>, Tensor) {
    let config = preset.unet_config();
    let dim = |key: &str| config[key].as_u64().unwrap_or(0) as usize;
    let (s, c, ctx) = (
        dim("sample_size"),
        dim("in_channels"),
        dim("cross_attention_dim"),
    );
    (
        Tensor::randn(&[2, s, s, c], 11, Device::Cpu),
        vec![500.0, 999.0],
        Tensor::randn(&[2, 77, ctx], 12, Device::Cpu),
    )
}

fn rel_l2(gpu: &Tensor, cpu: &Tensor) -> f32 {
    let (g, c) = (gpu.to_vec_f32(), cpu.to_vec_f32());
    if g.len() != c.len() {
        return f32::INFINITY;
    }
    let diff: f64 = g
        .iter()
        .zip(&c)
        .map(|(a, b)| f64::from(a - b).powi(2))
        .sum();
    let norm: f64 = c.iter().map(|b| f64::from(*b).powi(2)).sum();
    (diff / norm.max(f64::MIN_POSITIVE)).sqrt() as f32
}

/// The presets checked unless the command names others.
pub const PRESETS: [Preset; 2] = [Preset::Tiny, Preset::Sd15];
const KERNELS: [AttentionKernel; 5] = [
    AttentionKernel::Flash,
    AttentionKernel::FlashMma,
    AttentionKernel::FlashMmaBf16,
    AttentionKernel::Tiles,
    AttentionKernel::Rows,
];

/// Runs the checks and prints one row per preset and setup; returns (checks, failures).
pub fn run(
    dev: &CudaDevice,
    presets: &[Preset],
) -> Result<(usize, usize), Box<dyn std::error::Error>> {
    println!(
        "{:<22} {:<16} {:>12} {:>12} {:>10}  result",
        "op", "size", "max err", "rel L2", "tolerance"
    );
    let default = Setup {
        gemm: dev.gemm_backend(),
        attention: dev.attention_kernel(),
    };
    let dense = dense_setups(dev);
    let cached = cached_setups(default, &dense);
    let mut failed = 0;
    let mut recompute_checks = 0;
    for &preset in presets {
        let mut unet = RandomPipeline::new(preset).unet()?;
        let (sample, timesteps, context) = inputs(preset);
        let cpu = unet.forward(&sample, &timesteps, &context)?;
        unet.upload(dev)?;
        let mut passed_setups = Vec::new();
        for &setup in &dense {
            setup.apply(dev)?;
            let gpu = unet.forward_on(dev, &sample, &timesteps, &context)?;
            let rel = rel_l2(&gpu, &cpu);
            let passed = rel <= setup.tol();
            if passed {
                passed_setups.push(setup);
            }
            failed += usize::from(!passed);
            let s = sample.shape();
            println!(
                "{:<22} {:<16} {:>12.3e} {:>12.3e} {:>10.1e}  {}",
                format!("unet {} {}", preset.name(), setup.label()),
                format!("{}x{}x{}x{}", s[0], s[1], s[2], s[3]),
                max_err(&gpu, &cpu),
                rel,
                setup.tol(),
                if passed { "PASS" } else { "FAIL" }
            );
        }
        let dense_ms = if preset == Preset::Sd15 {
            let inputs = (&sample, timesteps.as_slice(), &context);
            print_step_time(dev, &unet, inputs, preset, &passed_setups)?
        } else {
            Vec::new()
        };
        // The host's recording and masked forward once, then each setup on the device.
        let inputs = (&sample, timesteps.as_slice(), &context);
        let case = MaskCase::record(&unet, inputs)?;
        failed += check_cached_steps(dev, &unet, inputs, &case, preset, &cached, &dense_ms)?;
        default.apply(dev)?;
        let (checks, failures) =
            check_recomputing_steps(dev, &unet, inputs, &case, preset, default)?;
        recompute_checks += checks;
        failed += failures;
        if !dense_ms.is_empty() {
            print_lora_patch_time(dev, &mut unet, LORA_RANK)?;
        }
    }
    default.apply(dev)?;
    Ok((
        presets.len() * (dense.len() + cached.len()) + recompute_checks,
        failed,
    ))
}

/// The rank of the LoRA whose patch is timed (on every attention projection).
const LORA_RANK: usize = 64;

/// Times patching a rank-`rank` LoRA into every attention projection of the uploaded UNet,
/// in place on the device (`W += up * down`): the median of 5 rounds, each ended by a
/// synchronize. Random factors, uploaded before the clock starts. The f32 weights are the
/// UNet's own (they stay patched: this runs after the checks and the step timing); the f16
/// and bf16 rows patch copies of them in those types, as a half-precision model holds them.
fn print_lora_patch_time(
    dev: &CudaDevice,
    unet: &mut UNet,
    rank: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut projections = unet.attention_projections_mut();
    let mut factors = Vec::with_capacity(projections.len());
    let mut weights = Vec::with_capacity(projections.len());
    for (i, p) in projections.iter_mut().enumerate() {
        let w = p
            .gpu_weight_mut()
            .ok_or("the UNet's attention projections are not on the device")?;
        let (out, inp) = (w.shape()[0], w.shape()[1]);
        let seed = 100 + 2 * i as u64;
        let up = Tensor::randn(&[out, rank], seed, Device::Cpu).affine(0.01, 0.0)?;
        let down = Tensor::randn(&[rank, inp], seed + 1, Device::Cpu);
        factors.push((
            CudaTensor::upload(dev, &up)?,
            CudaTensor::upload(dev, &down)?,
        ));
        weights.push(w);
    }
    let elements: usize = weights.iter().map(|w| w.elem_count()).sum();
    let row = |dtype: &str, (median, min): (f64, f64)| {
        println!(
            "lora patch, rank {rank}, {dtype}, every attention projection ({} weights, {:.1} M \
             values): median {median:.2} ms, min {min:.2} ms (5 rounds)",
            factors.len(),
            elements as f64 / 1e6,
        );
    };
    let half = |dtype: DType| -> Result<Vec<Tensor>, Box<dyn std::error::Error>> {
        Ok(weights
            .iter()
            .map(|w| w.download(dev)?.to_dtype(dtype))
            .collect::<Result<_, _>>()?)
    };
    let (f16s, bf16s) = (half(DType::F16)?, half(DType::BF16)?);
    row("f32", time_patches(dev, &mut weights, &factors)?);
    let mut f16s = upload_all::<half::f16>(dev, &f16s)?;
    row(
        "f16",
        time_patches(dev, &mut f16s.iter_mut().collect::<Vec<_>>(), &factors)?,
    );
    drop(f16s);
    let mut bf16s = upload_all::<half::bf16>(dev, &bf16s)?;
    row(
        "bf16",
        time_patches(dev, &mut bf16s.iter_mut().collect::<Vec<_>>(), &factors)?,
    );
    Ok(())
}

fn upload_all<T: GpuElement>(
    dev: &CudaDevice,
    tensors: &[Tensor],
) -> Result<Vec<CudaTensor<T>>, Box<dyn std::error::Error>> {
    Ok(tensors
        .iter()
        .map(|t| CudaTensor::<T>::upload(dev, t))
        .collect::<Result<_, _>>()?)
}

/// The median and minimum ms of 5 rounds of patching `factors[i]` into `weights[i]`.
fn time_patches<T: GpuElement>(
    dev: &CudaDevice,
    weights: &mut [&mut CudaTensor<T>],
    factors: &[(CudaTensor, CudaTensor)],
) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    dev.synchronize()?;
    let mut times = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        for (w, (up, down)) in weights.iter_mut().zip(factors) {
            dev.lora_patch(w, up, down, 1.0)?;
        }
        dev.synchronize()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok((times[2], times[0]))
}

/// Wall times in ms of `step` (10 runs after 2 warm-ups, each ended by a synchronize):
/// the median and minimum, and the median time until `step` returned, before the
/// synchronize (the host's share: launching, uploads; equal to the total when the GPU waits
/// on the host).
struct StepTime {
    median: f64,
    min: f64,
    enqueue: f64,
}

fn time_step(
    dev: &CudaDevice,
    mut step: impl FnMut() -> Result<(), Box<dyn std::error::Error>>,
) -> Result<StepTime, Box<dyn std::error::Error>> {
    let mut times = Vec::new();
    let mut enqueue = Vec::new();
    for run in 0..12 {
        let start = Instant::now();
        step()?;
        let queued = start.elapsed();
        dev.synchronize()?;
        if run >= 2 {
            times.push(start.elapsed().as_secs_f64() * 1e3);
            enqueue.push(queued.as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    enqueue.sort_by(f64::total_cmp);
    Ok(StepTime {
        median: times[times.len() / 2],
        min: times[0],
        enqueue: enqueue[enqueue.len() / 2],
    })
}

/// One profiled run of `step` ([`CudaDevice::start_profile`]): every launch waited for, its
/// wall time charged to its kernel; prints the kernels by total, the largest `top` of them.
fn print_profile(
    dev: &CudaDevice,
    label: &str,
    top: usize,
    step: impl FnOnce() -> Result<(), Box<dyn std::error::Error>>,
) -> Result<(), Box<dyn std::error::Error>> {
    dev.start_profile()?;
    let start = Instant::now();
    let outcome = step();
    let wall = start.elapsed().as_secs_f64() * 1e3;
    let kernels = dev.take_profile();
    outcome?;
    let launches: u64 = kernels.iter().map(|k| k.launches).sum();
    println!(
        "profile of one {label} (each launch waited for): {wall:.1} ms, {launches} launches; \
         per kernel: launches, ms (host preparation plus the kernel)"
    );
    for k in kernels.iter().take(top) {
        println!("    {:<28} {:>6} {:>9.2}", k.kernel, k.launches, k.ms);
    }
    Ok(())
}

/// Times the dense step with each setup that passed its check (inputs uploaded first), and
/// profiles it with the first (the device's default kernels) and the fastest; returns each
/// setup's median.
fn print_step_time(
    dev: &CudaDevice,
    unet: &UNet,
    (sample, timesteps, context): (&Tensor, &[f32], &Tensor),
    preset: Preset,
    setups: &[Setup],
) -> Result<Vec<(Setup, f64)>, Box<dyn std::error::Error>> {
    let sample = CudaTensor::upload(dev, sample)?;
    let context = CudaTensor::upload(dev, context)?;
    let mut medians = Vec::new();
    for &setup in setups {
        setup.apply(dev)?;
        let t = time_step(dev, || {
            unet.forward_gpu(dev, &sample, timesteps, &context)?;
            Ok(())
        })?;
        medians.push((setup, t.median));
        println!(
            "unet {} dense step on the GPU, f32 tensors, attention {:?}, GEMMs {:?}, batch 2 \
             at {}x{}: median {:.2} ms, min {:.2} ms, host enqueue {:.2} ms (10 runs)",
            preset.name(),
            setup.attention,
            setup.gemm,
            sample.shape()[1],
            sample.shape()[2],
            t.median,
            t.min,
            t.enqueue,
        );
    }
    // The default kernels' profile, and the fastest setup's: where its time goes is what
    // the next change to the dense step should aim at.
    let fastest = medians
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|&(s, _)| s);
    let mut profiled = setups.first().copied().into_iter().collect::<Vec<_>>();
    if let Some(fastest) = fastest
        && !profiled.contains(&fastest)
    {
        profiled.push(fastest);
    }
    for setup in profiled {
        setup.apply(dev)?;
        let label = format!("{} dense step, {}", preset.name(), setup.label());
        print_profile(dev, &label, 12, || {
            unet.forward_gpu(dev, &sample, timesteps, &context)?;
            Ok(())
        })?;
    }
    Ok(medians)
}

/// The latent mask of the cached-step check: a centred square over this share of the grid.
const MASK_RATIO: f64 = 0.2;

/// What the cached-mode checks share: the step recorded as a template (f16 cache) and the
/// token sets of the centred 20% mask (halo 1).
struct MaskCase {
    cache: StepCache,
    levels: Vec<TokenSet>,
}

impl MaskCase {
    fn record(
        unet: &UNet,
        (sample, timesteps, context): (&Tensor, &[f32], &Tensor),
    ) -> Result<MaskCase, Box<dyn std::error::Error>> {
        let side = sample.shape()[1];
        let (_, cache) = unet.forward_recording(sample, timesteps, context, DType::F16)?;
        let blocks = unet.config().block_out_channels.len();
        // The whole square nearest to the ratio (29x29 of 64x64), as in the runs docs/gpu.md
        // records: centred_mask covers exactly the positions asked for.
        let square = (MASK_RATIO * (side * side) as f64)
            .sqrt()
            .round()
            .clamp(1.0, side as f64);
        let mask = centred_mask(side, side, square * square / (side * side) as f64);
        let levels = token_levels(&mask, side, side, blocks, 1)?;
        Ok(MaskCase { cache, levels })
    }
}

/// Cached mode on the GPU against the host: on `case` (the step recorded as a template, a
/// centred 20% mask), a masked step of both CFG branches on each side, the device's with
/// each setup. Prints a check row per setup, and where `dense_ms` has the
/// setup's dense step, the cached step's time against it. Returns the failures.
fn check_cached_steps(
    dev: &CudaDevice,
    unet: &UNet,
    (sample, timesteps, context): (&Tensor, &[f32], &Tensor),
    MaskCase { cache, levels }: &MaskCase,
    preset: Preset,
    setups: &[Setup],
    dense_ms: &[(Setup, f64)],
) -> Result<usize, Box<dyn std::error::Error>> {
    let s = sample.shape().to_vec();
    let (batch, side, channels) = (s[0], s[1], s[3]);
    let positions = levels[0].positions();
    let n = positions.len();
    let rows = active_rows(sample, positions)?;
    let cpu = unet.forward_masked(
        &rows.clone().reshape(&[batch, n, channels])?,
        timesteps,
        context,
        cache,
        levels,
    )?;
    let device_cache = GpuStepCache::upload(dev, cache)?;
    let contexts = context.split_batch(&vec![1; batch])?;
    let segments: Vec<GpuCachedSegment<'_>> = (0..batch)
        .map(|branch| GpuCachedSegment {
            host: CachedSegment {
                levels,
                cache,
                branch,
                timestep: timesteps[branch],
                context: &contexts[branch],
            },
            device: &device_cache,
        })
        .collect();
    let gpu_rows = CudaTensor::upload(dev, &rows)?;
    let mut failed = 0;
    for &setup in setups {
        setup.apply(dev)?;
        let dense_ms = dense_ms
            .iter()
            .find(|(s, _)| *s == setup)
            .map(|(_, ms)| *ms);
        let gpu = unet
            .forward_gpu_ragged(dev, &gpu_rows, &segments)?
            .download(dev)?;
        let cpu = cpu.clone().reshape(&[batch * n, gpu.shape()[1]])?;
        let rel = rel_l2(&gpu, &cpu);
        let tol = setup.tol();
        let passed = rel <= tol;
        println!(
            "{:<22} {:<16} {:>12.3e} {:>12.3e} {:>10.1e}  {}",
            format!("unet {} cached {}", preset.name(), setup.label()),
            format!("{}% {batch}x{n}", MASK_RATIO * 100.0),
            max_err(&gpu, &cpu),
            rel,
            tol,
            if passed { "PASS" } else { "FAIL" }
        );
        if let (true, Some(dense_ms)) = (passed, dense_ms) {
            let t = time_step(dev, || {
                unet.forward_gpu_ragged(dev, &gpu_rows, &segments)?;
                Ok(())
            })?;
            println!(
                "unet {} cached step on the GPU, f32 (f16 cache, {:.0} MB on the device), \
                 {}, mask {}% ({n} of {} positions active with the halo), \
                 batch 2: median {:.2} ms, min {:.2} ms, host enqueue {:.2} ms (10 runs); {:.3}x \
                 the dense step with the same setup",
                preset.name(),
                device_cache.size_in_bytes() as f64 / 1e6,
                setup.label(),
                MASK_RATIO * 100.0,
                side * side,
                t.median,
                t.min,
                t.enqueue,
                t.median / dense_ms
            );
            print_profile(dev, &format!("{} cached step", preset.name()), 12, || {
                unet.forward_gpu_ragged(dev, &gpu_rows, &segments)?;
                Ok(())
            })?;
            // Four such edits fused into one ragged step (8 segments), as the worker batches
            // them: the cost per edit against one edit alone.
            const FUSED: usize = 4;
            let fused_segments: Vec<GpuCachedSegment<'_>> = segments
                .iter()
                .copied()
                .cycle()
                .take(FUSED * batch)
                .collect();
            let fused_rows = CudaTensor::upload(dev, &Tensor::concat_batch(&[&rows; FUSED])?)?;
            let fused = time_step(dev, || {
                unet.forward_gpu_ragged(dev, &fused_rows, &fused_segments)?;
                Ok(())
            })?;
            println!(
                "unet {} {FUSED} cached edits fused into one step: median {:.2} ms, host enqueue \
                 {:.2} ms; {:.2} ms per edit, {:.3}x one edit alone",
                preset.name(),
                fused.median,
                fused.enqueue,
                fused.median / FUSED as f64,
                fused.median / FUSED as f64 / t.median
            );
        }
        failed += usize::from(!passed);
    }
    Ok(failed)
}

/// The load-or-recompute forward on the GPU (with `setup`, the device's default) against the
/// host's: both CFG branches at the
/// 20% mask, the first `k` units recomputed densely for `k` = 0, half the units and all of
/// them, with the step's cache uploaded whole; then half the units with the cache streaming
/// in from another thread (entry by entry, 0.2 ms apart, as a disk read delivers them), the
/// device uploading each entry when its layer asks. For SD1.5, the times of the streamed
/// forward and of the masked forward reading a resident cache. Returns (checks, failures).
fn check_recomputing_steps(
    dev: &CudaDevice,
    unet: &UNet,
    (sample, timesteps, context): (&Tensor, &[f32], &Tensor),
    MaskCase { cache, levels }: &MaskCase,
    preset: Preset,
    setup: Setup,
) -> Result<(usize, usize), Box<dyn std::error::Error>> {
    let batch = sample.shape()[0];
    let contexts = context.split_batch(&vec![1; batch])?;
    let units = unet.units()?;
    let device_cache = GpuStepCache::upload(dev, cache)?;
    let latents = CudaTensor::upload(dev, sample)?;
    let host_segments = branches(levels, StepSource::Whole(cache), timesteps, &contexts);
    let whole: Vec<GpuRecomputeSegment<'_>> = host_segments
        .iter()
        .map(|&host| GpuRecomputeSegment {
            host,
            device: GpuStepSource::Whole(&device_cache),
        })
        .collect();
    let mut failed = 0;
    let mut row = |label: String, gpu: &Tensor, cpu: &Tensor| {
        let rel = rel_l2(gpu, cpu);
        let passed = rel <= setup.tol();
        failed += usize::from(!passed);
        println!(
            "{:<22} {:<16} {:>12.3e} {:>12.3e} {:>10.1e}  {}",
            label,
            format!("{}% {batch}x{}", MASK_RATIO * 100.0, levels[0].len()),
            max_err(gpu, cpu),
            rel,
            setup.tol(),
            if passed { "PASS" } else { "FAIL" }
        );
    };
    let half = units / 2;
    let mut at_half = None;
    for k in [0, half, units] {
        let cpu = unet.forward_ragged_recomputing(sample, &host_segments, k)?;
        let gpu = unet
            .forward_gpu_ragged_recomputing(dev, &latents, &whole, k)?
            .download(dev)?;
        row(
            format!("unet {} recompute {k}/{units}", preset.name()),
            &gpu,
            &cpu,
        );
        if k == half {
            at_half = Some(cpu);
        }
    }
    let cpu = at_half.ok_or("no host forward at half the units")?;
    let first = unet.entry_starts()?[half];
    let streamed = |dev: &CudaDevice| -> Result<Tensor, Box<dyn std::error::Error>> {
        let stream = StreamingStep::new(first, cache.end());
        let gpu_stream = GpuStreamingStep::new(&stream);
        let host_segments = branches(levels, StepSource::Streaming(&stream), timesteps, &contexts);
        let device: Vec<GpuRecomputeSegment<'_>> = host_segments
            .iter()
            .map(|&host| GpuRecomputeSegment {
                host,
                device: GpuStepSource::Streaming(&gpu_stream),
            })
            .collect();
        std::thread::scope(|scope| {
            scope.spawn(|| deliver_slowly(&stream, cache));
            let out = unet.forward_gpu_ragged_recomputing(dev, &latents, &device, half)?;
            Ok(out.download(dev)?)
        })
    };
    row(
        format!("unet {} streamed {half}/{units}", preset.name()),
        &streamed(dev)?,
        &cpu,
    );
    if preset == Preset::Sd15 {
        let t = time_step(dev, || {
            streamed(dev)?;
            Ok(())
        })?;
        let rows = CudaTensor::upload(
            dev,
            &super::bench_unet::active_rows(sample, levels[0].positions())?,
        )?;
        let cached: Vec<GpuCachedSegment<'_>> = host_segments
            .iter()
            .map(|s| GpuCachedSegment {
                host: CachedSegment {
                    levels: s.levels,
                    cache,
                    branch: s.branch,
                    timestep: s.timestep,
                    context: s.context,
                },
                device: &device_cache,
            })
            .collect();
        let resident = time_step(dev, || {
            unet.forward_gpu_ragged(dev, &rows, &cached)?;
            Ok(())
        })?;
        println!(
            "unet {} cached step, {half} of {units} units recomputed while the rest of the cache \
             streams in ({} entries, one per {STREAM_GAP_US} us): median {:.2} ms; with the \
             cache resident on the device: median {:.2} ms",
            preset.name(),
            cache.end() - first,
            t.median,
            resident.median
        );
    }
    Ok((4, failed))
}

/// One segment per CFG branch (`contexts[i]`, `timesteps[i]`), each reading `cache`.
fn branches<'a>(
    levels: &'a [TokenSet],
    cache: StepSource<'a>,
    timesteps: &[f32],
    contexts: &'a [Tensor],
) -> Vec<RecomputeSegment<'a>> {
    contexts
        .iter()
        .zip(timesteps)
        .enumerate()
        .map(|(branch, (context, &timestep))| RecomputeSegment {
            levels,
            cache,
            branch,
            timestep,
            context,
        })
        .collect()
}

/// Microseconds between entries in the streamed check.
const STREAM_GAP_US: u64 = 200;

/// Delivers `cache`'s entries from `stream.first()` on, one every [`STREAM_GAP_US`].
fn deliver_slowly(stream: &StreamingStep, cache: &StepCache) {
    for index in stream.first()..stream.end() {
        std::thread::sleep(std::time::Duration::from_micros(STREAM_GAP_US));
        let entry = cache
            .entry(index)
            .cloned()
            .ok_or_else(|| format!("entry {index} is not in the recording"));
        stream.deliver(index, entry);
    }
}
