//! `retouch bench --unet PRESET`: one UNet step of a preset built from random weights, dense
//! and (with `--mask-ratios`) in cached mode at several mask ratios, compared with the dense step;
//! with `--batch N`, also N cached edits stepped one by one against one fused ragged step.

use std::cell::OnceCell;
use std::rc::Rc;

use retouch_kernels::bench::{BenchCase, Prepared};
use retouch_kernels::cuda::{CudaDevice, CudaTensor};
use retouch_kernels::{DType, Device, Tensor, TokenSet};
use retouch_models::nn::exec::StepCache;
use retouch_models::nn::gpu::GpuStepCache;
use retouch_models::random_pipeline::{Preset, RandomPipeline};
use retouch_models::unet::{CachedSegment, GpuCachedSegment, UNet, token_levels};

/// A classifier-free-guidance batch: the conditional and unconditional branch.
const BATCH: usize = 2;
const TOKENS: usize = 77;
const TIMESTEP: f32 = 500.0;

/// What every case of one preset shares, built on first use (the SD1.5 UNet takes a while to
/// build, and its recorded step is large).
struct Shared {
    preset: Preset,
    latent: usize,
    channels: usize,
    context_dim: usize,
    unet: OnceCell<Rc<UNet>>,
    inputs: OnceCell<Rc<(Tensor, Tensor)>>,
    cache: OnceCell<Rc<StepCache>>,
    /// With `--device cuda:N`: the device, the UNet's weights are uploaded to it, and the
    /// steps run there (the recorded step too is uploaded, as f16).
    gpu: Option<Rc<CudaDevice>>,
    gpu_cache: OnceCell<Rc<GpuStepCache>>,
}

impl Shared {
    fn unet(&self) -> retouch_kernels::Result<Rc<UNet>> {
        if let Some(unet) = self.unet.get() {
            return Ok(unet.clone());
        }
        let mut unet = RandomPipeline::new(self.preset)
            .unet()
            .map_err(kernel_error)?;
        if let Some(dev) = &self.gpu {
            unet.upload(dev).map_err(kernel_error)?;
        }
        let unet = Rc::new(unet);
        Ok(self.unet.get_or_init(|| unet).clone())
    }

    /// The recorded step in device memory (with `--device cuda:N`).
    fn gpu_cache(&self, dev: &CudaDevice) -> retouch_kernels::Result<Rc<GpuStepCache>> {
        if let Some(cache) = self.gpu_cache.get() {
            return Ok(cache.clone());
        }
        let host = self.cache()?;
        let cache = Rc::new(GpuStepCache::upload(dev, &host).map_err(kernel_error)?);
        Ok(self.gpu_cache.get_or_init(|| cache).clone())
    }

    /// `(sample, context)`: random latents `[2, s, s, c]` and a random 77-token context.
    fn inputs(&self) -> Rc<(Tensor, Tensor)> {
        self.inputs
            .get_or_init(|| {
                let (s, c) = (self.latent, self.channels);
                Rc::new((
                    Tensor::randn(&[BATCH, s, s, c], 1, Device::Cpu),
                    Tensor::randn(&[BATCH, TOKENS, self.context_dim], 2, Device::Cpu),
                ))
            })
            .clone()
    }

    /// The step's activations recorded as a template registration stores them (f16).
    fn cache(&self) -> retouch_kernels::Result<Rc<StepCache>> {
        if let Some(cache) = self.cache.get() {
            return Ok(cache.clone());
        }
        let unet = self.unet()?;
        let inputs = self.inputs();
        let (_, cache) = unet
            .forward_recording(&inputs.0, &[TIMESTEP; BATCH], &inputs.1, DType::F16)
            .map_err(kernel_error)?;
        Ok(self.cache.get_or_init(|| Rc::new(cache)).clone())
    }
}

/// The dense step (the baseline), then one cached-mode step per mask ratio (in percent);
/// with `batch > 1`, per ratio also `batch` cached edits one by one and fused.
pub fn unet_cases(
    preset: Preset,
    mask_percents: &[f64],
    halo: usize,
    batch: usize,
    gpu: Option<CudaDevice>,
) -> Vec<BenchCase> {
    let config = preset.unet_config();
    let dim = |key: &str| {
        config[key]
            .as_u64()
            .unwrap_or_else(|| panic!("preset configs set {key}")) as usize
    };
    let blocks = config["block_out_channels"]
        .as_array()
        .map_or(1, |a| a.len());
    let shared = Rc::new(Shared {
        preset,
        latent: dim("sample_size"),
        channels: dim("in_channels"),
        context_dim: dim("cross_attention_dim"),
        unet: OnceCell::new(),
        inputs: OnceCell::new(),
        cache: OnceCell::new(),
        gpu: gpu.map(Rc::new),
        gpu_cache: OnceCell::new(),
    });
    let image = preset.image_size();
    let dense_name = format!("unet step {} {image}x{image} cfg{BATCH}", preset.name());
    let (s, c) = (shared.latent, shared.channels);
    let mut cases = vec![dense_case(&shared, dense_name.clone())];
    for &percent in mask_percents {
        let mask = centred_mask(s, s, percent / 100.0);
        let levels = match token_levels(&mask, s, s, blocks, halo) {
            Ok(levels) => levels,
            Err(e) => panic!("a square mask on the latent grid is valid: {e}"),
        };
        let active = levels[0].len() as f64 / (s * s) as f64 * 100.0;
        let case_shared = shared.clone();
        cases.push(BenchCase {
            name: format!("  cached, mask {percent}%"),
            shape: format!(
                "[{BATCH},{},{c}] active {active:.1}% halo {halo}",
                levels[0].len()
            ),
            flops: f64::NAN,
            bytes: f64::NAN,
            baseline: Some(dense_name.clone()),
            setup: Box::new(move || masked_runner(&case_shared, &levels).map(Prepared::single)),
        });
        if batch > 1 {
            cases.extend(batch_cases(&shared, percent, halo, batch, blocks));
        }
    }
    cases
}

fn dense_case(shared: &Rc<Shared>, name: String) -> BenchCase {
    let (s, c, d) = (shared.latent, shared.channels, shared.context_dim);
    let shared = shared.clone();
    BenchCase {
        name,
        shape: format!("[{BATCH},{s},{s},{c}] ctx [{BATCH},{TOKENS},{d}]"),
        flops: f64::NAN,
        bytes: f64::NAN,
        baseline: None,
        setup: Box::new(move || {
            let unet = shared.unet()?;
            let inputs = shared.inputs();
            if let Some(dev) = shared.gpu.clone() {
                // Inputs uploaded once; each run ends with a synchronize.
                let sample = CudaTensor::upload(&dev, &inputs.0)?;
                let context = CudaTensor::upload(&dev, &inputs.1)?;
                return Ok(Prepared::single(Box::new(move || {
                    unet.forward_gpu(&dev, &sample, &[TIMESTEP; BATCH], &context)
                        .map_err(kernel_error)?;
                    dev.synchronize()
                })));
            }
            Ok(Prepared::single(Box::new(move || {
                unet.forward(&inputs.0, &[TIMESTEP; BATCH], &inputs.1)
                    .map(drop)
                    .map_err(kernel_error)
            })))
        }),
    }
}

/// A cached-mode step: the active rows of the same latents, the rest from the recorded step.
fn masked_runner(
    shared: &Shared,
    levels: &[TokenSet],
) -> retouch_kernels::Result<retouch_kernels::bench::Runner> {
    let unet = shared.unet()?;
    let cache = shared.cache()?;
    let inputs = shared.inputs();
    let c = shared.channels;
    let positions = levels[0].positions();
    let rows = active_rows(&inputs.0, positions)?.reshape(&[BATCH, positions.len(), c])?;
    let levels = levels.to_vec();
    if let Some(dev) = shared.gpu.clone() {
        let device_cache = shared.gpu_cache(&dev)?;
        let rows = CudaTensor::upload(&dev, &rows.reshape(&[BATCH * positions.len(), c])?)?;
        let contexts = inputs.1.split_batch(&[1; BATCH])?;
        return Ok(Box::new(move || {
            let segments: Vec<GpuCachedSegment<'_>> = (0..BATCH)
                .map(|branch| GpuCachedSegment {
                    host: CachedSegment {
                        levels: &levels,
                        cache: &cache,
                        branch,
                        timestep: TIMESTEP,
                        context: &contexts[branch],
                    },
                    device: &device_cache,
                })
                .collect();
            unet.forward_gpu_ragged(&dev, &rows, &segments)
                .map_err(kernel_error)?;
            dev.synchronize()
        }));
    }
    Ok(Box::new(move || {
        unet.forward_masked(&rows, &[TIMESTEP; BATCH], &inputs.1, &cache, &levels)
            .map(drop)
            .map_err(kernel_error)
    }))
}

/// `batch` cached edits of one ratio, with masks at different places, their own text and
/// timesteps, all reading the one recorded step: stepped one by one (the baseline), then as
/// one ragged forward (every edit's two CFG branches a segment).
fn batch_cases(
    shared: &Rc<Shared>,
    percent: f64,
    halo: usize,
    batch: usize,
    blocks: usize,
) -> Vec<BenchCase> {
    let s = shared.latent;
    let centred = centred_mask(s, s, percent / 100.0);
    let edits: Rc<Vec<Vec<TokenSet>>> = Rc::new(
        (0..batch)
            .map(|i| {
                // The square moved diagonally (wrapping), a different place per edit.
                let shift = i * s / batch;
                let mask: Vec<bool> = (0..s * s)
                    .map(|p| {
                        let (y, x) = ((p / s + s - shift) % s, (p % s + s - shift) % s);
                        centred[y * s + x]
                    })
                    .collect();
                token_levels(&mask, s, s, blocks, halo)
                    .unwrap_or_else(|e| panic!("a shifted square mask is valid: {e}"))
            })
            .collect(),
    );
    let rows: usize = edits.iter().map(|l| l[0].len()).sum();
    let alone = format!("  {batch} cached one by one, {percent}%");
    let shape = format!("{batch} x [{BATCH},~{},{}]", rows / batch, shared.channels);
    let (one_by_one, fused) = (shared.clone(), shared.clone());
    let (edits_a, edits_f) = (edits.clone(), edits);
    vec![
        BenchCase {
            name: alone.clone(),
            shape: shape.clone(),
            flops: f64::NAN,
            bytes: f64::NAN,
            baseline: None,
            setup: Box::new(move || {
                batch_runner(&one_by_one, &edits_a, false).map(Prepared::single)
            }),
        },
        BenchCase {
            name: format!("  {batch} cached fused, {percent}%"),
            shape: format!(
                "[{},{}] in {} segments",
                BATCH * rows,
                shared.channels,
                BATCH * batch
            ),
            flops: f64::NAN,
            bytes: f64::NAN,
            baseline: Some(alone),
            setup: Box::new(move || batch_runner(&fused, &edits_f, true).map(Prepared::single)),
        },
    ]
}

/// Steps the edits (`levels` each) one by one or fused. Each edit has its own random
/// two-branch context and timestep; the rows are the shared latents at its positions.
fn batch_runner(
    shared: &Shared,
    edits: &[Vec<TokenSet>],
    fused: bool,
) -> retouch_kernels::Result<retouch_kernels::bench::Runner> {
    let unet = shared.unet()?;
    let cache = shared.cache()?;
    let inputs = shared.inputs();
    let c = shared.channels;
    let mut rows = Vec::with_capacity(edits.len());
    let mut contexts = Vec::with_capacity(edits.len());
    for (i, levels) in edits.iter().enumerate() {
        rows.push(active_rows(&inputs.0, levels[0].positions())?);
        let context = Tensor::randn(
            &[BATCH, TOKENS, shared.context_dim],
            10 + i as u64,
            Device::Cpu,
        );
        contexts.push(context.split_batch(&[1; BATCH])?);
    }
    let timestep = |i: usize| TIMESTEP - 10.0 * i as f32;
    let edits = edits.to_vec();
    if let Some(dev) = shared.gpu.clone() {
        let device_cache = shared.gpu_cache(&dev)?;
        let rows = rows
            .iter()
            .map(|r| CudaTensor::upload(&dev, r))
            .collect::<retouch_kernels::Result<Vec<_>>>()?;
        let packed = CudaTensor::concat_rows(&dev, &rows.iter().collect::<Vec<_>>())?;
        return Ok(Box::new(move || {
            // Each edit's two CFG branches are two segments.
            let device_cache = &*device_cache;
            let segments_of = |i: usize| {
                let (levels, cache, contexts) = (&edits[i], &*cache, &contexts[i]);
                (0..BATCH).map(move |branch| GpuCachedSegment {
                    host: CachedSegment {
                        levels,
                        cache,
                        branch,
                        timestep: timestep(i),
                        context: &contexts[branch],
                    },
                    device: device_cache,
                })
            };
            if fused {
                let segments: Vec<_> = (0..edits.len()).flat_map(segments_of).collect();
                unet.forward_gpu_ragged(&dev, &packed, &segments)
                    .map_err(kernel_error)?;
            } else {
                for (i, rows) in rows.iter().enumerate() {
                    let segments: Vec<_> = segments_of(i).collect();
                    unet.forward_gpu_ragged(&dev, rows, &segments)
                        .map_err(kernel_error)?;
                }
            }
            dev.synchronize()
        }));
    }
    if !fused {
        return Ok(Box::new(move || {
            for (i, (levels, rows)) in edits.iter().zip(&rows).enumerate() {
                let n = levels[0].len();
                let rows = rows.clone().reshape(&[BATCH, n, c])?;
                let refs: Vec<&Tensor> = contexts[i].iter().collect();
                let context = Tensor::concat_batch(&refs)?;
                unet.forward_masked(&rows, &[timestep(i); BATCH], &context, &cache, levels)
                    .map_err(kernel_error)?;
            }
            Ok(())
        }));
    }
    let packed = Tensor::concat_batch(&rows.iter().collect::<Vec<_>>())?;
    Ok(Box::new(move || {
        let segments: Vec<CachedSegment<'_>> = edits
            .iter()
            .enumerate()
            .flat_map(|(i, levels)| {
                let (cache, contexts) = (&*cache, &contexts[i]);
                (0..BATCH).map(move |branch| CachedSegment {
                    levels,
                    cache,
                    branch,
                    timestep: timestep(i),
                    context: &contexts[branch],
                })
            })
            .collect();
        unet.forward_ragged(&packed, &segments)
            .map(drop)
            .map_err(kernel_error)
    }))
}

/// Every sample's rows at `positions` of channels-last latents `[batch, h, w, c]`, gathered
/// in one pass: `[batch * positions.len(), c]`, sample by sample.
pub(super) fn active_rows(latents: &Tensor, positions: &[u32]) -> retouch_kernels::Result<Tensor> {
    let shape = latents.shape();
    let (batch, grid, c) = (shape[0], shape[1] * shape[2], shape[3]);
    let index: Vec<u32> = (0..batch)
        .flat_map(|b| positions.iter().map(move |&p| p + (b * grid) as u32))
        .collect();
    latents
        .clone()
        .reshape(&[batch * grid, c])?
        .gather_rows(&index)
}

/// A centred, nearly square mask covering `round(ratio * h * w)` positions.
pub(super) fn centred_mask(height: usize, width: usize, ratio: f64) -> Vec<bool> {
    let count = ((ratio * (height * width) as f64).round() as usize).clamp(1, height * width);
    let side = (count as f64).sqrt().ceil() as usize;
    let (box_w, box_h) = (side.min(width), count.div_ceil(side.min(width)));
    let (top, left) = ((height - box_h.min(height)) / 2, (width - box_w) / 2);
    let mut mask = vec![false; height * width];
    for i in 0..count {
        let (y, x) = (top + i / box_w, left + i % box_w);
        mask[y * width + x] = true;
    }
    mask
}

/// The benchmark runner speaks the kernel layer's error type.
fn kernel_error(e: retouch_models::Error) -> retouch_kernels::Error {
    match e {
        retouch_models::Error::Kernel(e) => e,
        other => retouch_kernels::Error::Invalid {
            op: "unet",
            message: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centred_mask_covers_the_requested_share() {
        for (h, w, ratio) in [(64, 64, 0.05), (64, 64, 0.5), (16, 16, 0.2), (7, 5, 0.9)] {
            let mask = centred_mask(h, w, ratio);
            let on = mask.iter().filter(|&&m| m).count();
            assert_eq!(
                on,
                (ratio * (h * w) as f64).round() as usize,
                "{h}x{w} {ratio}"
            );
        }
    }
}
