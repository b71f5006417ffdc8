//! Step-wise denoising: a [`DenoiseJob`] holds one request's whole state between steps
//! (scheduler, latents, step index, text conditioning, and what its kind needs), so a caller
//! can advance any request by exactly one denoising step at a time. `Pipeline::generate`,
//! `register_template` and `edit` are loops over a job; a serving runtime interleaves the
//! steps of many jobs instead (continuous batching). This is the only denoising loop.

use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, Instant};

use retouch_kernels::{DType, Device, Tensor, TokenSet};

use super::edit::keep_outside;
use super::{
    EditMode, EditRequest, Edited, GenerateRequest, Generated, Guidance, Mask, Pipeline, Template,
    TemplateSpec, UnetRun,
};
use crate::nn::exec::StepCache;
use crate::schedulers::Scheduler;
use crate::unet::token_levels;
use crate::{Error, Result};

/// A template an edit job reads: borrowed by one-shot calls, shared by a runtime whose
/// jobs outlive any one borrow.
pub enum TemplateRef<'a> {
    Borrowed(&'a Template),
    Shared(Arc<Template>),
}

impl Deref for TemplateRef<'_> {
    type Target = Template;
    fn deref(&self) -> &Template {
        match self {
            TemplateRef::Borrowed(t) => t,
            TemplateRef::Shared(t) => t,
        }
    }
}

/// What a finished job produced.
pub enum JobOutput {
    Generated(Generated),
    Template(Template),
    Edited(Edited),
}

/// Per-kind state of a job.
enum Kind<'a> {
    Generate,
    Template {
        spec: TemplateSpec,
        trajectory: Vec<Tensor>,
        cache: Vec<StepCache>,
        /// Record the activation cache in this dtype; None records none.
        cache_dtype: Option<DType>,
    },
    Edit(Box<EditState<'a>>),
}

struct EditState<'a> {
    template: TemplateRef<'a>,
    mask: Mask,
    latent_mask: Vec<f32>,
    paste_back: bool,
    /// Cached mode: token sets per resolution and the level-0 active positions.
    cached: Option<(Vec<TokenSet>, Vec<u32>)>,
}

/// One request's denoising state; see the module docs.
pub struct DenoiseJob<'a> {
    scheduler: Scheduler,
    guidance: Guidance,
    latents: Tensor,
    step: usize,
    steps: usize,
    kind: Kind<'a>,
    created: Instant,
    /// Time spent in [`DenoiseJob::step`] (the UNet and scheduler), for edit timings.
    stepping: Duration,
}

impl DenoiseJob<'static> {
    /// Text-to-image; validates the size and initial latents and encodes the prompts.
    pub fn generate(pipe: &Pipeline, req: &GenerateRequest) -> Result<DenoiseJob<'static>> {
        let created = Instant::now();
        let shape = pipe.latent_shape(req.width, req.height)?;
        let scheduler = pipe.scheduler_config.build(req.scheduler, req.steps)?;
        let noise = match &req.latents {
            Some(l) if l.shape() != shape => {
                return Err(Error::Invalid(format!(
                    "initial latents have shape {:?}, the request needs {shape:?}",
                    l.shape()
                )));
            }
            Some(l) => l.clone(),
            None => Tensor::randn(&shape, req.seed, Device::Cpu),
        };
        let latents = noise.affine(scheduler.init_noise_sigma(), 0.0)?;
        let guidance = Guidance::new(pipe, &req.prompt, &req.negative_prompt, req.guidance)?;
        Ok(DenoiseJob::new(
            scheduler,
            guidance,
            latents,
            Kind::Generate,
            created,
        ))
    }

    /// Template registration: a generation that records its latent trajectory and, with a
    /// `cache_dtype`, the activation cache cached-mode edits read.
    pub fn template(
        pipe: &Pipeline,
        spec: &TemplateSpec,
        cache_dtype: Option<DType>,
    ) -> Result<DenoiseJob<'static>> {
        let created = Instant::now();
        let shape = pipe.latent_shape(spec.width, spec.height)?;
        let scheduler = pipe
            .scheduler_config
            .build(spec.scheduler_kind()?, spec.steps)?;
        let noise = Tensor::randn(&shape, spec.seed, Device::Cpu);
        let start = noise.affine(scheduler.init_noise_sigma(), 0.0)?;
        let guidance = Guidance::new(pipe, &spec.prompt, &spec.negative_prompt, spec.guidance)?;
        let kind = Kind::Template {
            spec: spec.clone(),
            trajectory: vec![start.clone()],
            cache: Vec::new(),
            cache_dtype,
        };
        Ok(DenoiseJob::new(scheduler, guidance, start, kind, created))
    }
}

impl<'a> DenoiseJob<'a> {
    /// An edit of `template` inside `mask`; checks the mask against the template, and in
    /// cached mode that the template holds its activation cache.
    pub fn edit(
        pipe: &Pipeline,
        template: TemplateRef<'a>,
        mask: &Mask,
        req: &EditRequest,
    ) -> Result<DenoiseJob<'a>> {
        if req.mode == EditMode::Cached && template.cache.len() != template.spec.steps {
            return Err(Error::Invalid(
                "cached-mode edits need the template's activation cache; this template was \
                 registered without one (use dense mode, or register it again with a cache)"
                    .into(),
            ));
        }
        DenoiseJob::edit_with_external_cache(pipe, template, mask, req)
    }

    /// An edit whose caller keeps the template's activation cache elsewhere (a runtime's
    /// cache tiers) and hands each step's cache to [`DenoiseJob::step_with_cache`]; the
    /// template need not hold it.
    pub fn edit_with_external_cache(
        pipe: &Pipeline,
        template: TemplateRef<'a>,
        mask: &Mask,
        req: &EditRequest,
    ) -> Result<DenoiseJob<'a>> {
        let created = Instant::now();
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
        let shape = pipe.latent_shape(spec.width, spec.height)?;
        let latent_mask = mask.to_latent(pipe.vae.factor());
        let scheduler = pipe
            .scheduler_config
            .build(spec.scheduler_kind()?, spec.steps)?;
        let mut start = Tensor::randn(&shape, req.seed, Device::Cpu)
            .affine(scheduler.init_noise_sigma(), 0.0)?;
        keep_outside(&mut start, &template.trajectory[0], &latent_mask)?;
        let guidance = Guidance::new(
            pipe,
            &req.prompt,
            &req.negative_prompt,
            req.guidance.unwrap_or(spec.guidance),
        )?;
        let cached = match req.mode {
            EditMode::Dense => None,
            EditMode::Cached => {
                let (h, w) = (shape[1], shape[2]);
                let active: Vec<bool> = latent_mask.iter().map(|&m| m > 0.0).collect();
                let blocks = pipe.unet.config().block_out_channels.len();
                let levels = token_levels(&active, h, w, blocks, req.halo)?;
                let positions = levels[0].positions().to_vec();
                Some((levels, positions))
            }
        };
        let state = EditState {
            template,
            mask: mask.clone(),
            latent_mask,
            paste_back: req.paste_back,
            cached,
        };
        Ok(DenoiseJob::new(
            scheduler,
            guidance,
            start,
            Kind::Edit(Box::new(state)),
            created,
        ))
    }

    fn new(
        scheduler: Scheduler,
        guidance: Guidance,
        latents: Tensor,
        kind: Kind<'a>,
        created: Instant,
    ) -> DenoiseJob<'a> {
        DenoiseJob {
            steps: scheduler.num_steps(),
            scheduler,
            guidance,
            latents,
            step: 0,
            kind,
            created,
            stepping: Duration::ZERO,
        }
    }

    /// Steps run so far.
    pub fn steps_done(&self) -> usize {
        self.step
    }

    pub fn total_steps(&self) -> usize {
        self.steps
    }

    pub fn is_done(&self) -> bool {
        self.step >= self.steps
    }

    /// The step whose activation cache the next [`DenoiseJob::step`] reads: Some for a
    /// cached-mode edit with steps left.
    pub fn cache_step(&self) -> Option<usize> {
        match &self.kind {
            Kind::Edit(edit) if edit.cached.is_some() && !self.is_done() => Some(self.step),
            _ => None,
        }
    }

    /// Runs one denoising step. An error leaves the job unusable; drop it.
    pub fn step(&mut self, pipe: &Pipeline) -> Result<()> {
        self.step_with_cache(pipe, None)
    }

    /// [`DenoiseJob::step`], a cached-mode edit reading `cache` (the activations of step
    /// [`DenoiseJob::cache_step`]) instead of its template's own; other jobs ignore it.
    pub fn step_with_cache(&mut self, pipe: &Pipeline, cache: Option<&StepCache>) -> Result<()> {
        if self.is_done() {
            return Err(Error::Invalid("the job has run all its steps".into()));
        }
        let started = Instant::now();
        let t = self
            .scheduler
            .current_timestep()
            .ok_or_else(|| Error::Invalid("scheduler ended early".into()))?;
        let step = self.step;
        match &mut self.kind {
            Kind::Edit(edit) if edit.cached.is_some() => {
                let cache = match cache {
                    Some(c) => c,
                    None => edit.template.cache.get(step).ok_or_else(|| {
                        Error::Invalid(format!(
                            "cached-mode edit: no activation cache for step {step}"
                        ))
                    })?,
                };
                self.latents = cached_step(
                    pipe,
                    &self.guidance,
                    &mut self.scheduler,
                    edit,
                    cache,
                    &self.latents,
                    step,
                    t,
                )?;
            }
            kind => {
                let run = match kind {
                    Kind::Template {
                        cache,
                        cache_dtype: Some(dtype),
                        ..
                    } => UnetRun::Record(cache, *dtype),
                    _ => UnetRun::Dense,
                };
                let scaled = self.scheduler.scale_model_input(&self.latents)?;
                let prediction = self.guidance.predict(&pipe.unet, &scaled, t, run)?;
                self.latents = self.scheduler.step(&prediction, &self.latents)?;
                match kind {
                    Kind::Template { trajectory, .. } => trajectory.push(self.latents.clone()),
                    Kind::Edit(edit) => keep_outside(
                        &mut self.latents,
                        &edit.template.trajectory[step + 1],
                        &edit.latent_mask,
                    )?,
                    Kind::Generate => {}
                }
            }
        }
        self.step += 1;
        self.stepping += started.elapsed();
        Ok(())
    }

    /// Decodes the final latents (and for edits pastes the template back outside the
    /// feathered mask). Fails if steps remain.
    pub fn finish(self, pipe: &Pipeline) -> Result<JobOutput> {
        if !self.is_done() {
            return Err(Error::Invalid(format!(
                "the job has run {} of its {} steps",
                self.step, self.steps
            )));
        }
        let image = pipe.decode(&self.latents)?;
        Ok(match self.kind {
            Kind::Generate => JobOutput::Generated(Generated {
                latents: self.latents,
                image,
            }),
            Kind::Template {
                spec,
                trajectory,
                cache,
                ..
            } => JobOutput::Template(Template {
                spec,
                trajectory,
                image,
                cache,
            }),
            Kind::Edit(edit) => {
                let mut image = image;
                if edit.paste_back {
                    paste_back(&mut image.pixels, &edit, pipe.vae.factor());
                }
                JobOutput::Edited(Edited {
                    image,
                    latents: self.latents,
                    mask_ratio: edit.mask.ratio(),
                    steps: self.steps,
                    unet_ms: self.stepping.as_secs_f64() * 1e3,
                    total_ms: self.created.elapsed().as_secs_f64() * 1e3,
                })
            }
        })
    }
}

/// Cached mode: runs the UNet on the active tokens only (the mask dilated by the halo,
/// pooled per resolution), reading the template's activations of this step for everything
/// else; the full latents are kept for the scheduler and the blend.
#[allow(clippy::too_many_arguments)]
fn cached_step(
    pipe: &Pipeline,
    guidance: &Guidance,
    scheduler: &mut Scheduler,
    edit: &EditState<'_>,
    cache: &StepCache,
    x: &Tensor,
    step: usize,
    t: f32,
) -> Result<Tensor> {
    let Some((levels, positions)) = &edit.cached else {
        return Err(Error::Invalid("not a cached-mode edit".into()));
    };
    let shape = x.shape().to_vec();
    let (h, w, c) = (shape[1], shape[2], shape[3]);
    let n = positions.len();
    let scaled = scheduler.scale_model_input(x)?.reshape(&[h * w, c])?;
    let rows = scaled.gather_rows(positions)?.reshape(&[1, n, c])?;
    let run = UnetRun::Masked { cache, levels };
    let predicted = guidance.predict(&pipe.unet, &rows, t, run)?;
    // Inactive positions get no prediction: the blend below replaces them anyway.
    let mut full = Tensor::zeros(&[h * w, c], DType::F32, Device::Cpu);
    full.scatter_rows(positions, &predicted.reshape(&[n, c])?)?;
    let mut next = scheduler.step(&full.reshape(&shape)?, x)?;
    keep_outside(
        &mut next,
        &edit.template.trajectory[step + 1],
        &edit.latent_mask,
    )?;
    Ok(next)
}

/// The template's pixels outside the feathered mask (box blur of half the VAE factor).
fn paste_back(pixels: &mut [u8], edit: &EditState<'_>, vae_factor: usize) {
    let soft = edit.mask.feathered(vae_factor / 2);
    for ((p, t), &m) in pixels
        .chunks_mut(3)
        .zip(edit.template.image.pixels.chunks(3))
        .zip(&soft)
    {
        for (c, &tc) in p.iter_mut().zip(t) {
            *c = (m * *c as f32 + (1.0 - m) * tc as f32).round() as u8;
        }
    }
}
