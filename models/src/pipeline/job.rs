//! Step-wise denoising: a [`DenoiseJob`] holds one request's whole state between steps
//! (scheduler, latents, step index, text conditioning, and what its kind needs), so a caller
//! can advance any request by exactly one denoising step at a time. `Pipeline::generate`,
//! `register_template` and `edit` are loops over a job; a serving runtime interleaves the
//! steps of many jobs instead (continuous batching), and [`DenoiseJob::step_many`] runs one
//! step of several jobs with fused UNet calls ([`batch`]). This is the only denoising loop.

mod batch;

pub use batch::StepCacheSource;

use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, Instant};

use retouch_kernels::{DType, Device, Tensor, TokenSet};

use super::cost::{check_edit, edit_levels};
use super::edit::keep_outside;
use super::{
    EditMode, EditRequest, Edited, GenerateRequest, Generated, Guidance, Mask, Pipeline, Template,
    TemplateSpec,
};
use crate::nn::exec::StepCache;
use crate::schedulers::Scheduler;
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

impl EditState<'_> {
    /// The template's latents after `step` steps.
    fn template_latents(&self, step: usize) -> Result<&Tensor> {
        self.template.latents_at(step)
    }

    /// The template's activations of `step` (cached mode).
    fn step_cache(&self, step: usize) -> Result<&StepCache> {
        self.template.cache.get(step).ok_or_else(|| {
            Error::Invalid(format!(
                "cached-mode edit: no activation cache for step {step} (the template holds \
                     none for it and none was given)"
            ))
        })
    }
}

/// One request's denoising state; see the module docs.
pub struct DenoiseJob<'a> {
    scheduler: Scheduler,
    guidance: Guidance,
    latents: Tensor,
    /// The next step of the schedule (edits of strength below 1 start past 0).
    step: usize,
    /// The first step this job runs.
    first_step: usize,
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
    /// An edit of `template` inside `mask`; checks the mask against the template.
    pub fn edit(
        pipe: &Pipeline,
        template: TemplateRef<'a>,
        mask: &Mask,
        req: &EditRequest,
    ) -> Result<DenoiseJob<'a>> {
        DenoiseJob::edit_checked(pipe, template, mask, req, false)
    }

    /// An edit whose caller keeps the template's activation cache elsewhere (a runtime's
    /// cache tiers) and hands each step's cache to [`DenoiseJob::step_with_cache`] or
    /// [`DenoiseJob::step_many_with_caches`]; the template need not hold it.
    pub fn edit_with_external_cache(
        pipe: &Pipeline,
        template: TemplateRef<'a>,
        mask: &Mask,
        req: &EditRequest,
    ) -> Result<DenoiseJob<'a>> {
        DenoiseJob::edit_checked(pipe, template, mask, req, true)
    }

    fn edit_checked(
        pipe: &Pipeline,
        template: TemplateRef<'a>,
        mask: &Mask,
        req: &EditRequest,
        external_cache: bool,
    ) -> Result<DenoiseJob<'a>> {
        let created = Instant::now();
        let spec = &template.spec;
        check_edit(pipe, &template, mask, req, !external_cache)?;
        let shape = pipe.latent_shape(spec.width, spec.height)?;
        let latent_mask = mask.to_latent(pipe.vae.factor());
        let mut scheduler = pipe
            .scheduler_config
            .build(spec.scheduler_kind()?, spec.steps)?;
        let first_step = req.first_step(spec.steps)?;
        let noise = Tensor::randn(&shape, req.seed, Device::Cpu);
        let mut start = if first_step == 0 {
            noise.affine(scheduler.init_noise_sigma(), 0.0)?
        } else {
            scheduler.set_begin_index(first_step)?;
            scheduler.add_noise_at(template.latents_at(spec.steps)?, &noise, first_step)?
        };
        keep_outside(&mut start, template.latents_at(first_step)?, &latent_mask)?;
        let guidance = Guidance::new(
            pipe,
            &req.prompt,
            &req.negative_prompt,
            req.guidance.unwrap_or(spec.guidance),
        )?;
        let cached = match req.mode {
            EditMode::Dense => None,
            EditMode::Cached => {
                // An external cache is checked when its steps arrive (`batch::run_cached`).
                let recorded = template.cache.first().and_then(StepCache::branches);
                if !external_cache && recorded != Some(guidance.branches()) {
                    return Err(Error::Invalid(format!(
                        "this cached-mode edit runs {} guidance branch(es), the template's \
                         activation cache holds {}: use the template's guidance (or dense mode)",
                        guidance.branches(),
                        recorded.unwrap_or(0)
                    )));
                }
                let levels = edit_levels(pipe, &latent_mask, shape, req.halo)?;
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
        let mut job = DenoiseJob::new(
            scheduler,
            guidance,
            start,
            Kind::Edit(Box::new(state)),
            created,
        );
        job.step = first_step;
        job.first_step = first_step;
        Ok(job)
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
            first_step: 0,
            kind,
            created,
            stepping: Duration::ZERO,
        }
    }

    /// Steps run so far.
    pub fn steps_done(&self) -> usize {
        self.step - self.first_step
    }

    /// Steps this job runs in all (an edit of strength below 1 runs the last of its
    /// template's).
    pub fn total_steps(&self) -> usize {
        self.steps - self.first_step
    }

    /// The schedule's step this job runs next (its template's step, for an edit): its
    /// first step plus [`DenoiseJob::steps_done`].
    pub fn schedule_step(&self) -> usize {
        self.step
    }

    pub fn is_done(&self) -> bool {
        self.step >= self.steps
    }

    /// Runs one denoising step: [`DenoiseJob::step_many`] with this job alone. A failed
    /// step changes nothing (the job keeps its state before the step).
    pub fn step(&mut self, pipe: &Pipeline) -> Result<()> {
        self.step_with_cache(pipe, None)
    }

    /// [`DenoiseJob::step`], a cached-mode edit reading `cache` (the activations of step
    /// [`DenoiseJob::cache_step`]) instead of its template's own; other jobs ignore it.
    pub fn step_with_cache(&mut self, pipe: &Pipeline, cache: Option<&StepCache>) -> Result<()> {
        DenoiseJob::step_many_with_caches(pipe, &mut [self], &[cache])
            .pop()
            .unwrap_or_else(|| Err(Error::Invalid("no step result".into())))
    }

    /// The step whose activation cache the next step reads: Some for a cached-mode edit
    /// with steps left.
    pub fn cache_step(&self) -> Option<usize> {
        match &self.kind {
            Kind::Edit(edit) if edit.cached.is_some() && !self.is_done() => Some(self.step),
            _ => None,
        }
    }

    /// The step whose activation cache the step after next reads, if the job runs it (a
    /// worker uploads it while the next one computes).
    pub fn next_cache_step(&self) -> Option<usize> {
        let next = self.cache_step()? + 1;
        (next < self.steps).then_some(next)
    }

    /// Guidance branches each step runs (the samples of its UNet batch).
    pub fn branches(&self) -> usize {
        self.guidance.branches()
    }

    /// Positions of the job's latent grid.
    pub fn latent_positions(&self) -> usize {
        self.latents.elem_count() / self.latents.dim(-1).unwrap_or(1).max(1)
    }

    /// Latent tokens one step of this job runs through the UNet: its active positions (all
    /// positions when dense) times its guidance branches. A serving batch's size in tokens.
    pub fn step_tokens(&self) -> usize {
        let positions = match self.cached() {
            Some((_, positions)) => positions.len(),
            None => self.latents.elem_count() / self.latents.dim(-1).unwrap_or(1).max(1),
        };
        positions * self.guidance.branches()
    }

    /// Everything a step does before the UNet: the timestep and the model input for one
    /// branch (the scaled latents, or their active rows in cached mode). Changes nothing.
    fn prepare(&self) -> Result<StepInput> {
        if self.is_done() {
            return Err(Error::Invalid("the job has run all its steps".into()));
        }
        let t = self
            .scheduler
            .current_timestep()
            .ok_or_else(|| Error::Invalid("scheduler ended early".into()))?;
        let scaled = self.scheduler.scale_model_input(&self.latents)?;
        let (input, full) = match self.cached() {
            Some((_, positions)) => {
                let c = scaled.dim(-1)?;
                let rows = scaled.elem_count() / c.max(1);
                let input = scaled.clone().reshape(&[rows, c])?.gather_rows(positions)?;
                (input, Some(scaled))
            }
            None => (scaled, None),
        };
        Ok(StepInput { t, input, full })
    }

    /// Everything a step does after the UNet, given its output for this job's branches
    /// (`[branches, h, w, c]` dense, `[branches * active, c]` cached) and, when recording,
    /// this step's activations: guidance, the scheduler step, the blend. The job's state
    /// changes only once all of it has succeeded, so a failed step leaves it as it was.
    fn commit(&mut self, out: UnetOutput, elapsed: Duration) -> Result<()> {
        let mut scheduler = self.scheduler.clone();
        let step = self.step;
        // An overflow (f16 products past 65504, a corrupt cache or weight) would otherwise
        // run on to a garbage image: fail the request with the reason instead.
        if let Some(value) = first_non_finite(&out.prediction) {
            return Err(Error::NonFinite { step, value });
        }
        let next = match &self.kind {
            Kind::Edit(edit) if edit.cached.is_some() => {
                let positions = self.cached().map_or(&[][..], |(_, p)| p);
                let shape = self.latents.shape().to_vec();
                let c = shape[shape.len() - 1];
                let (n, branches) = (positions.len(), self.guidance.branches());
                let predicted = self
                    .guidance
                    .combine(out.prediction.reshape(&[branches, n, c])?)?;
                // Inactive positions get no prediction: the blend below replaces them anyway.
                let mut full =
                    Tensor::zeros(&[self.latents.elem_count() / c, c], DType::F32, Device::Cpu);
                full.scatter_rows(positions, &predicted.reshape(&[n, c])?)?;
                let mut next = scheduler.step(&full.reshape(&shape)?, &self.latents)?;
                keep_outside(
                    &mut next,
                    edit.template_latents(step + 1)?,
                    &edit.latent_mask,
                )?;
                next
            }
            kind => {
                let prediction = self.guidance.combine(out.prediction)?;
                let mut next = scheduler.step(&prediction, &self.latents)?;
                if let Kind::Edit(edit) = kind {
                    keep_outside(
                        &mut next,
                        edit.template_latents(step + 1)?,
                        &edit.latent_mask,
                    )?;
                }
                next
            }
        };
        // Commit: nothing below can fail.
        if let Kind::Template {
            trajectory, cache, ..
        } = &mut self.kind
        {
            trajectory.push(next.clone());
            cache.extend(out.recorded);
        }
        self.scheduler = scheduler;
        self.latents = next;
        self.step += 1;
        self.stepping += elapsed;
        Ok(())
    }

    /// Cached mode: the token sets per resolution and the level-0 active positions.
    fn cached(&self) -> Option<&(Vec<TokenSet>, Vec<u32>)> {
        match &self.kind {
            Kind::Edit(edit) => edit.cached.as_ref(),
            _ => None,
        }
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
                    steps: self.steps - self.first_step,
                    unet_ms: self.stepping.as_secs_f64() * 1e3,
                    total_ms: self.created.elapsed().as_secs_f64() * 1e3,
                })
            }
        })
    }
}

/// One job's UNet input for a step: its timestep and the input of one branch.
struct StepInput {
    t: f32,
    input: Tensor,
    /// A cached edit's whole latents `[1, h, w, c]` (scaled like `input`), for a forward that
    /// recomputes its first units densely.
    full: Option<Tensor>,
}

/// The UNet's output for one job's branches, and the activations it recorded (templates).
struct UnetOutput {
    prediction: Tensor,
    recorded: Option<StepCache>,
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

/// The first NaN or infinity of a prediction, if any.
fn first_non_finite(prediction: &Tensor) -> Option<f32> {
    match prediction.as_slice::<f32>() {
        Ok(values) => values.iter().copied().find(|v| !v.is_finite()),
        Err(_) => prediction.to_vec_f32().into_iter().find(|v| !v.is_finite()),
    }
}
