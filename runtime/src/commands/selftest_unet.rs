//! `retouch selftest --group unet`: the dense UNet forward on the GPU against the host's, for
//! the tiny and SD1.5 presets built from random weights, then the GPU step's time.
//!
//! The kernels are checked one by one elsewhere; this checks that they compose into the same
//! network (layer order, skips, broadcasts) at real sizes.

use std::time::Instant;

use retouch_kernels::cuda::selftest::max_err;
use retouch_kernels::cuda::{AttentionKernel, CudaDevice, CudaTensor};
use retouch_kernels::{Device, Tensor};
use retouch_models::random_pipeline::{Preset, RandomPipeline};

/// Largest accepted `|gpu - cpu|_2 / |cpu|_2` of the prediction: both sides compute in f32,
/// so only summation order differs, through a few dozen layers.
const REL_L2_TOL: f32 = 1e-4;

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
    let diff: f64 = g.iter().zip(&c).map(|(a, b)| f64::from(a - b).powi(2)).sum();
    let norm: f64 = c.iter().map(|b| f64::from(*b).powi(2)).sum();
    (diff / norm.max(f64::MIN_POSITIVE)).sqrt() as f32
}

const PRESETS: [Preset; 2] = [Preset::Tiny, Preset::Sd15];
const KERNELS: [AttentionKernel; 3] = [
    AttentionKernel::Flash,
    AttentionKernel::Tiles,
    AttentionKernel::Rows,
];

/// Runs the checks and prints one row per preset and attention kernel; returns (checks,
/// failures).
pub fn run(dev: &CudaDevice) -> Result<(usize, usize), Box<dyn std::error::Error>> {
    println!(
        "{:<22} {:<16} {:>12} {:>12} {:>10}  result",
        "op", "size", "max err", "rel L2", "tolerance"
    );
    let chosen = dev.attention_kernel();
    let mut failed = 0;
    for preset in PRESETS {
        let mut unet = RandomPipeline::new(preset).unet()?;
        let (sample, timesteps, context) = inputs(preset);
        let cpu = unet.forward(&sample, &timesteps, &context)?;
        unet.upload(dev)?;
        let mut all_passed = true;
        for kernel in KERNELS {
            dev.set_attention_kernel(kernel);
            let gpu = unet.forward_on(dev, &sample, &timesteps, &context)?;
            let rel = rel_l2(&gpu, &cpu);
            let passed = rel <= REL_L2_TOL;
            all_passed &= passed;
            failed += usize::from(!passed);
            let s = sample.shape();
            println!(
                "{:<22} {:<16} {:>12.3e} {:>12.3e} {:>10.1e}  {}",
                format!("unet {} {kernel:?}", preset.name()),
                format!("{}x{}x{}x{}", s[0], s[1], s[2], s[3]),
                max_err(&gpu, &cpu),
                rel,
                REL_L2_TOL,
                if passed { "PASS" } else { "FAIL" }
            );
        }
        if all_passed && preset == Preset::Sd15 {
            print_step_time(dev, &unet, &sample, &timesteps, &context, preset)?;
            print_lora_patch_time(dev, &mut unet, LORA_RANK)?;
        }
    }
    dev.set_attention_kernel(chosen);
    Ok((PRESETS.len() * KERNELS.len(), failed))
}

/// The rank of the LoRA whose patch is timed (on every attention projection).
const LORA_RANK: usize = 64;

/// Times patching a rank-`rank` LoRA into every attention projection of the uploaded UNet,
/// in place on the device (`W += up * down`): the median of 5 rounds, each ended by a
/// synchronize. Random factors, uploaded before the clock starts. The patched weights stay
/// patched: this runs after the checks and the step timing.
fn print_lora_patch_time(
    dev: &CudaDevice,
    unet: &mut retouch_models::unet::UNet,
    rank: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut projections = unet.attention_projections_mut();
    let mut factors = Vec::with_capacity(projections.len());
    let mut elements = 0usize;
    for (i, p) in projections.iter_mut().enumerate() {
        let w = p
            .gpu_weight_mut()
            .ok_or("the UNet's attention projections are not on the device")?;
        let (out, inp) = (w.shape()[0], w.shape()[1]);
        elements += out * inp;
        let seed = 100 + 2 * i as u64;
        let up = Tensor::randn(&[out, rank], seed, Device::Cpu).affine(0.01, 0.0)?;
        let down = Tensor::randn(&[rank, inp], seed + 1, Device::Cpu);
        factors.push((CudaTensor::upload(dev, &up)?, CudaTensor::upload(dev, &down)?));
    }
    dev.synchronize()?;
    let mut times = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        for (p, (up, down)) in projections.iter_mut().zip(&factors) {
            let w = p.gpu_weight_mut().ok_or("projection left the device")?;
            dev.lora_patch(w, up, down, 1.0)?;
        }
        dev.synchronize()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "lora patch, rank {rank}, f32, every attention projection ({} weights, {:.1} M \
         values): median {:.2} ms, min {:.2} ms (5 rounds)",
        projections.len(),
        elements as f64 / 1e6,
        times[2],
        times[0]
    );
    Ok(())
}

/// Median wall time of the dense step with inputs already on the device (10 runs after 2
/// warm-ups, each ended by a synchronize).
fn print_step_time(
    dev: &CudaDevice,
    unet: &retouch_models::unet::UNet,
    sample: &Tensor,
    timesteps: &[f32],
    context: &Tensor,
    preset: Preset,
) -> Result<(), Box<dyn std::error::Error>> {
    let sample = CudaTensor::upload(dev, sample)?;
    let context = CudaTensor::upload(dev, context)?;
    let chosen = dev.attention_kernel();
    for kernel in KERNELS {
        dev.set_attention_kernel(kernel);
        let mut times = Vec::new();
        for run in 0..12 {
            let start = Instant::now();
            unet.forward_gpu(dev, &sample, timesteps, &context)?;
            dev.synchronize()?;
            if run >= 2 {
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        times.sort_by(f64::total_cmp);
        println!(
            "unet {} dense step on the GPU, f32, attention {kernel:?}, batch 2 at {}x{}: \
             median {:.2} ms, min {:.2} ms ({} runs)",
            preset.name(),
            sample.shape()[1],
            sample.shape()[2],
            times[times.len() / 2],
            times[0],
            times.len()
        );
    }
    dev.set_attention_kernel(chosen);
    Ok(())
}
