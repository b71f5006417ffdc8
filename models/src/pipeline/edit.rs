//! Masked edits of a template. Dense mode runs the whole UNet each step and keeps the
//! template outside the mask: the edit starts from fresh noise inside the mask and the
//! template's initial latents outside, and after every step
//! `x = M * x_new + (1 - M) * x_template_next`. Cached mode does the same but computes only
//! the active tokens, with the template's cached activations for the rest.

use std::time::Instant;

use retouch_kernels::{DType, Device, Tensor};

use super::{Guidance, Pipeline, RgbImage, Template, UnetRun};
use crate::schedulers::Scheduler;
use crate::unet::token_levels;
use crate::{Error, Result};

/// An edit mask at image resolution: 1 where the image may change.
#[derive(Clone, Debug, PartialEq)]
pub struct Mask {
    pub width: usize,
    pub height: usize,
    pub values: Vec<f32>,
}

impl Mask {
    /// From a PNG where white (luma above half) marks the region to edit.
    pub fn from_png(bytes: &[u8]) -> Result<Mask> {
        let img = RgbImage::decode_png(bytes)?;
        let values = img
            .pixels
            .chunks_exact(3)
            .map(|p| {
                let luma = 0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32;
                if luma > 127.5 { 1.0 } else { 0.0 }
            })
            .collect();
        Ok(Mask {
            width: img.width,
            height: img.height,
            values,
        })
    }

    /// Fraction of the image inside the mask.
    pub fn ratio(&self) -> f64 {
        self.values.iter().map(|&v| v as f64).sum::<f64>() / self.values.len().max(1) as f64
    }

    /// The latent-resolution mask: a latent is edited if any pixel it covers is.
    pub fn to_latent(&self, factor: usize) -> Vec<f32> {
        let (lh, lw) = (self.height / factor, self.width / factor);
        let mut out = vec![0.0f32; lh * lw];
        for y in 0..self.height {
            for x in 0..self.width {
                if self.values[y * self.width + x] > 0.0 {
                    out[(y / factor) * lw + x / factor] = 1.0;
                }
            }
        }
        out
    }

    /// A soft copy (box blur of the given radius, twice), for pasting edits back smoothly.
    pub fn feathered(&self, radius: usize) -> Vec<f32> {
        let mut v = self.values.clone();
        for _ in 0..2 {
            v = box_blur(&v, self.width, self.height, radius, true);
            v = box_blur(&v, self.width, self.height, radius, false);
        }
        v
    }
}

fn box_blur(v: &[f32], w: usize, h: usize, r: usize, horizontal: bool) -> Vec<f32> {
    let mut out = vec![0.0f32; v.len()];
    for y in 0..h {
        for x in 0..w {
            let (mut sum, mut n) = (0.0f32, 0.0f32);
            let (c, len) = if horizontal { (x, w) } else { (y, h) };
            for k in c.saturating_sub(r)..(c + r + 1).min(len) {
                sum += if horizontal {
                    v[y * w + k]
                } else {
                    v[k * w + x]
                };
                n += 1.0;
            }
            out[y * w + x] = sum / n;
        }
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EditMode {
    Dense,
    Cached,
}

impl std::str::FromStr for EditMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "dense" => Ok(EditMode::Dense),
            "cached" => Ok(EditMode::Cached),
            other => Err(format!(
                "unknown edit mode `{other}` (expected cached or dense)"
            )),
        }
    }
}

#[derive(Clone, Debug)]
pub struct EditRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    /// Defaults to the template's guidance.
    pub guidance: Option<f32>,
    pub mode: EditMode,
    /// Paste the template's pixels back outside the feathered mask.
    pub paste_back: bool,
    /// Cached mode: latent positions around the mask that are recomputed too.
    pub halo: usize,
}

impl EditRequest {
    pub fn new(prompt: impl Into<String>) -> EditRequest {
        EditRequest {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            seed: 0,
            guidance: None,
            mode: EditMode::Dense,
            paste_back: true,
            halo: 1,
        }
    }
}

pub struct Edited {
    pub image: RgbImage,
    pub latents: Tensor,
    /// Fraction of the image inside the mask.
    pub mask_ratio: f64,
    pub steps: usize,
    pub unet_ms: f64,
    pub total_ms: f64,
}

/// `x = m * x + (1 - m) * reference`, per latent position over its channels.
fn keep_outside(x: &mut Tensor, reference: &Tensor, mask: &[f32]) -> Result<()> {
    let channels = x.dim(-1)?;
    let reference = reference.as_slice::<f32>()?;
    let data = x.as_mut_slice::<f32>()?;
    for ((px, pr), &m) in data
        .chunks_mut(channels)
        .zip(reference.chunks(channels))
        .zip(mask)
    {
        for (a, &b) in px.iter_mut().zip(pr) {
            *a = m * *a + (1.0 - m) * b;
        }
    }
    Ok(())
}

/// What a cached-mode denoising loop reads.
struct CachedEdit<'a> {
    template: &'a Template,
    guidance: &'a Guidance,
    latent_mask: &'a [f32],
    halo: usize,
}

impl Pipeline {
    /// Cached mode: each step runs the UNet on the active tokens only (the mask dilated by
    /// the halo, pooled per resolution), reading the template's activations of that step for
    /// everything else; the full latents are kept for the scheduler and the blend.
    fn denoise_cached(
        &self,
        edit: &CachedEdit<'_>,
        scheduler: &mut Scheduler,
        mut x: Tensor,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let shape = x.shape().to_vec();
        let (h, w, c) = (shape[1], shape[2], shape[3]);
        let active: Vec<bool> = edit.latent_mask.iter().map(|&m| m > 0.0).collect();
        let blocks = self.unet.config().block_out_channels.len();
        let levels = token_levels(&active, h, w, blocks, edit.halo)?;
        let positions = levels[0].positions().to_vec();
        let n = positions.len();
        let steps = scheduler.num_steps();
        for step in 0..steps {
            let t = scheduler
                .current_timestep()
                .ok_or_else(|| Error::Invalid("scheduler ended early".into()))?;
            let scaled = scheduler.scale_model_input(&x)?.reshape(&[h * w, c])?;
            let rows = scaled.gather_rows(&positions)?.reshape(&[1, n, c])?;
            let run = UnetRun::Masked {
                cache: &edit.template.cache[step],
                levels: &levels,
            };
            let predicted = edit.guidance.predict(&self.unet, &rows, t, run)?;
            // Inactive positions get no prediction: the blend below replaces them anyway.
            let mut full = Tensor::zeros(&[h * w, c], DType::F32, Device::Cpu);
            full.scatter_rows(&positions, &predicted.reshape(&[n, c])?)?;
            x = scheduler.step(&full.reshape(&shape)?, &x)?;
            keep_outside(
                &mut x,
                &edit.template.trajectory[step + 1],
                edit.latent_mask,
            )?;
            progress(step + 1, steps);
        }
        Ok(x)
    }

    /// Edits `template` inside `mask` following `req`. `progress(step, steps)` after each step.
    pub fn edit(
        &self,
        template: &Template,
        mask: &Mask,
        req: &EditRequest,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Edited> {
        let started = Instant::now();
        let spec = &template.spec;
        if (mask.width, mask.height) != (spec.width, spec.height) {
            return Err(Error::Invalid(format!(
                "mask is {}x{}, the template is {}x{}",
                mask.width, mask.height, spec.width, spec.height
            )));
        }
        if mask.values.iter().all(|&v| v == 0.0) {
            return Err(Error::Invalid("the mask is empty: nothing to edit".into()));
        }
        if req.mode == EditMode::Cached && template.cache.len() != spec.steps {
            return Err(Error::Invalid(
                "cached-mode edits need the template's activation cache; this template was \
                 registered without one (use dense mode, or register it again with a cache)"
                    .into(),
            ));
        }
        let shape = self.latent_shape(spec.width, spec.height)?;
        let latent_mask = mask.to_latent(self.vae.factor());
        let mut scheduler = self
            .scheduler_config
            .build(spec.scheduler_kind()?, spec.steps)?;
        let noise = Tensor::randn(&shape, req.seed, Device::Cpu)
            .affine(scheduler.init_noise_sigma(), 0.0)?;
        let mut start = noise;
        keep_outside(&mut start, &template.trajectory[0], &latent_mask)?;
        let guidance = Guidance::new(
            self,
            &req.prompt,
            &req.negative_prompt,
            req.guidance.unwrap_or(spec.guidance),
        )?;
        let unet_started = Instant::now();
        let latents = match req.mode {
            EditMode::Dense => {
                self.denoise(&guidance, &mut scheduler, start, None, &mut |step, x| {
                    keep_outside(x, &template.trajectory[step + 1], &latent_mask)?;
                    progress(step + 1, spec.steps);
                    Ok(())
                })?
            }
            EditMode::Cached => {
                let cached = CachedEdit {
                    template,
                    guidance: &guidance,
                    latent_mask: &latent_mask,
                    halo: req.halo,
                };
                self.denoise_cached(&cached, &mut scheduler, start, progress)?
            }
        };
        let unet_ms = unet_started.elapsed().as_secs_f64() * 1e3;
        let mut image = self.decode(&latents)?;
        if req.paste_back {
            let soft = mask.feathered(self.vae.factor() / 2);
            for ((p, t), &m) in image
                .pixels
                .chunks_mut(3)
                .zip(template.image.pixels.chunks(3))
                .zip(&soft)
            {
                for (c, &tc) in p.iter_mut().zip(t) {
                    *c = (m * *c as f32 + (1.0 - m) * tc as f32).round() as u8;
                }
            }
        }
        Ok(Edited {
            image,
            latents,
            mask_ratio: mask.ratio(),
            steps: spec.steps,
            unet_ms,
            total_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }
}
