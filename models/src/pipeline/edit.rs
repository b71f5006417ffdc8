//! Masked edits of a template. Dense mode runs the whole UNet each step and keeps the
//! template outside the mask: after every step `x = M * x_new + (1 - M) * x_template_next`.
//! Cached mode does the same but computes only the active tokens, with the template's
//! cached activations for the rest.
//!
//! An edit of strength `s` runs the last `floor(s * steps)` steps of the template's schedule
//! (diffusers' inpainting `strength`), at least one. It starts at the first of them from the template's
//! latents of that step outside the mask and, inside it, from the template's final latents
//! noised to that step with the edit's seed. Strength 1 starts from pure noise inside the
//! mask; below 1 the template's layout (where its shape is, how large) carries into the
//! edit, which is what holds the new content inside the mask (see docs/quality.md).

use retouch_kernels::Tensor;

use super::{DenoiseJob, JobOutput, Pipeline, RgbImage, Template, TemplateRef};
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
    /// How much of the template's schedule the edit runs, in (0, 1]; see the module docs.
    pub strength: f32,
}

/// The edit strength requests get unless they name one: the best of 0.2-1.0 on validation
/// cases of the built-in model (docs/quality.md).
pub const DEFAULT_EDIT_STRENGTH: f32 = 0.6;

/// An edit strength must lie in (0, 1].
pub fn check_strength(strength: f32) -> Result<()> {
    if strength > 0.0 && strength <= 1.0 {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "strength must be in (0, 1], got {strength}"
        )))
    }
}

/// The first step of a `steps`-step schedule an edit of `strength` runs: diffusers'
/// `steps - floor(steps * strength)`, except that an edit always runs at least one step (a
/// short template keeps the default strength editable).
pub fn edit_first_step(steps: usize, strength: f32) -> Result<usize> {
    check_strength(strength)?;
    // The epsilon keeps f32 strengths such as 0.7 (0.69999999) at diffusers' step count.
    let run = ((steps as f64 * strength as f64) + 1e-6).floor() as usize;
    Ok(steps - run.clamp(1, steps.max(1)))
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
            strength: DEFAULT_EDIT_STRENGTH,
        }
    }

    /// The first step of the template's `steps`-step schedule this edit runs.
    pub fn first_step(&self, steps: usize) -> Result<usize> {
        edit_first_step(steps, self.strength)
    }

    /// How many steps this edit of a `steps`-step template runs.
    pub fn steps_run(&self, steps: usize) -> Result<usize> {
        Ok(steps - self.first_step(steps)?)
    }
}

pub struct Edited {
    pub image: RgbImage,
    pub latents: Tensor,
    /// Fraction of the image inside the mask.
    pub mask_ratio: f64,
    /// Denoising steps the edit ran (its template's, times the strength).
    pub steps: usize,
    pub unet_ms: f64,
    pub total_ms: f64,
}

/// `x = m * x + (1 - m) * reference`, per latent position over its channels.
pub(super) fn keep_outside(x: &mut Tensor, reference: &Tensor, mask: &[f32]) -> Result<()> {
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

impl Pipeline {
    /// Edits `template` inside `mask` following `req`. `progress(step, steps)` after each step.
    pub fn edit(
        &self,
        template: &Template,
        mask: &Mask,
        req: &EditRequest,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Edited> {
        let job = DenoiseJob::edit(self, TemplateRef::Borrowed(template), mask, req)?;
        match self.run_job(job, progress)? {
            JobOutput::Edited(out) => Ok(out),
            _ => Err(Error::Invalid("an edit job produced another output".into())),
        }
    }
}
