//! Diffusion schedulers, matching diffusers' `DDIMScheduler` (eta = 0),
//! `EulerDiscreteScheduler` and `DPMSolverMultistepScheduler` (DPM-Solver++ 2M).
//!
//! A [`Scheduler`] belongs to one request: it holds that request's timesteps, its step index
//! and (DPM-Solver++) the previous model output, so requests at different steps can share a
//! UNet batch. Per denoising step the runtime feeds the UNet
//! `scale_model_input(latents)` at `current_timestep()`, then calls `step`:
//!
//! ```no_run
//! # use retouch_models::schedulers::{SchedulerConfig, SchedulerKind};
//! # use retouch_models::kernels::{Device, Tensor};
//! # fn unet(x: &Tensor, t: f32) -> Tensor { x.clone() }
//! # fn main() -> retouch_models::Result<()> {
//! let config = SchedulerConfig::from_file("model/scheduler/scheduler_config.json")?;
//! let mut scheduler = config.build("dpmpp-2m".parse()?, 25)?;
//! let mut latents = Tensor::randn(&[1, 64, 64, 4], 0, Device::Cpu)
//!     .affine(scheduler.init_noise_sigma(), 0.0)?;
//! while let Some(t) = scheduler.current_timestep() {
//!     let noise_pred = unet(&scheduler.scale_model_input(&latents)?, t);
//!     latents = scheduler.step(&noise_pred, &latents)?;
//! }
//! # Ok(()) }
//! ```
//!
//! All arithmetic is elementwise in f32 in the order diffusers writes it (the per-step
//! scalars too), so results agree with diffusers to a few ulps and layout does not matter:
//! Retouch's channels-last latents step exactly like diffusers' NCHW ones.

mod config;
mod ddim;
mod dpm_solver;
mod euler;
mod numerics;

use std::fmt;
use std::str::FromStr;

use retouch_kernels::Tensor;

pub use config::{PredictionType, SchedulerConfig};
pub use ddim::Ddim;
pub use dpm_solver::DpmSolverMultistep;
pub use euler::EulerDiscrete;

use crate::{Error, Result};

/// The schedulers Retouch implements, by their CLI names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// `"ddim"`: diffusers' `DDIMScheduler`, deterministic (eta = 0).
    Ddim,
    /// `"euler"`: diffusers' `EulerDiscreteScheduler` (no churn).
    Euler,
    /// `"dpmpp-2m"`: diffusers' `DPMSolverMultistepScheduler`, `dpmsolver++`, order 2.
    DpmPp2m,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 3] = [
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::DpmPp2m,
    ];

    /// The CLI name (`"ddim"`, `"euler"`, `"dpmpp-2m"`).
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Euler => "euler",
            SchedulerKind::DpmPp2m => "dpmpp-2m",
        }
    }

    /// The diffusers class this kind reproduces.
    pub fn diffusers_class(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::DpmPp2m => "DPMSolverMultistepScheduler",
        }
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<SchedulerKind> {
        SchedulerKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown scheduler {s:?} (expected \"ddim\", \"euler\" or \"dpmpp-2m\")"
                ))
            })
    }
}

impl SchedulerConfig {
    /// A fresh scheduler of `kind` for one request of `num_inference_steps` steps, with this
    /// config's values and the diffusers class defaults for the fields it lacks.
    pub fn build(&self, kind: SchedulerKind, num_inference_steps: usize) -> Result<Scheduler> {
        if num_inference_steps == 0 {
            return Err(Error::Invalid(
                "num_inference_steps must be at least 1".into(),
            ));
        }
        let train = self.num_train_timesteps.unwrap_or(1000);
        if num_inference_steps > train {
            return Err(Error::Invalid(format!(
                "num_inference_steps {num_inference_steps} exceeds num_train_timesteps {train}"
            )));
        }
        Ok(match kind {
            SchedulerKind::Ddim => Scheduler::Ddim(Ddim::new(self, num_inference_steps)?),
            SchedulerKind::Euler => {
                Scheduler::Euler(EulerDiscrete::new(self, num_inference_steps)?)
            }
            SchedulerKind::DpmPp2m => {
                Scheduler::DpmPp2m(DpmSolverMultistep::new(self, num_inference_steps)?)
            }
        })
    }
}

/// One request's scheduler. Methods dispatch to the scheduler of each kind.
#[derive(Clone, Debug)]
pub enum Scheduler {
    Ddim(Ddim),
    Euler(EulerDiscrete),
    DpmPp2m(DpmSolverMultistep),
}

macro_rules! dispatch {
    ($self:expr, $s:ident => $body:expr) => {
        match $self {
            Scheduler::Ddim($s) => $body,
            Scheduler::Euler($s) => $body,
            Scheduler::DpmPp2m($s) => $body,
        }
    };
}

impl Scheduler {
    pub fn kind(&self) -> SchedulerKind {
        match self {
            Scheduler::Ddim(_) => SchedulerKind::Ddim,
            Scheduler::Euler(_) => SchedulerKind::Euler,
            Scheduler::DpmPp2m(_) => SchedulerKind::DpmPp2m,
        }
    }

    /// The UNet timestep of every step, in order (diffusers' `scheduler.timesteps`). Euler's
    /// "linspace" timesteps are fractional; the others are whole numbers.
    pub fn timesteps(&self) -> &[f32] {
        dispatch!(self, s => s.timesteps())
    }

    /// The noise level of every step plus the final one (diffusers' `scheduler.sigmas`);
    /// `None` for DDIM, which works with `alphas_cumprod` instead.
    pub fn sigmas(&self) -> Option<&[f32]> {
        match self {
            Scheduler::Ddim(_) => None,
            Scheduler::Euler(s) => Some(s.sigmas()),
            Scheduler::DpmPp2m(s) => Some(s.sigmas()),
        }
    }

    /// Number of steps in the schedule (`timesteps().len()`).
    pub fn num_steps(&self) -> usize {
        self.timesteps().len()
    }

    /// Index of the next step (steps taken so far, plus any skipped by
    /// [`set_begin_index`](Self::set_begin_index)).
    pub fn steps_done(&self) -> usize {
        dispatch!(self, s => s.state().index)
    }

    pub fn is_finished(&self) -> bool {
        self.steps_done() >= self.num_steps()
    }

    /// The timestep to feed the UNet for the next step; `None` once finished.
    pub fn current_timestep(&self) -> Option<f32> {
        self.timesteps().get(self.steps_done()).copied()
    }

    /// The standard deviation of the initial noise: scale `randn` latents by it.
    pub fn init_noise_sigma(&self) -> f32 {
        dispatch!(self, s => s.init_noise_sigma())
    }

    /// Starts the schedule at step `index` instead of 0 (image-to-image with strength < 1:
    /// diffusers' `set_begin_index`, or DDIM's sliced timesteps). Only before the first step.
    pub fn set_begin_index(&mut self, index: usize) -> Result<()> {
        let steps = self.num_steps();
        dispatch!(self, s => s.state_mut().begin_at(index, steps))
    }

    /// The UNet input for the current step: `sample / sqrt(sigma^2 + 1)` for Euler, the
    /// sample unchanged (a copy) for DDIM and DPM-Solver++.
    pub fn scale_model_input(&self, sample: &Tensor) -> Result<Tensor> {
        if self.is_finished() {
            return Err(Error::Invalid(format!(
                "{} scheduler: scale_model_input after the last step",
                self.kind()
            )));
        }
        dispatch!(self, s => s.scale_model_input(sample))
    }

    /// Advances one step: from the model output at `current_timestep()` and the current
    /// sample, the sample at the next noise level. Errors once finished.
    pub fn step(&mut self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let kind = self.kind();
        let (steps, done) = (self.num_steps(), self.steps_done());
        if done >= steps {
            return Err(Error::Invalid(format!(
                "{kind} scheduler: step called after all {steps} steps were done"
            )));
        }
        check_same_shape(kind, model_output, sample)?;
        let out = dispatch!(self, s => s.step(model_output, sample))?;
        dispatch!(self, s => s.state_mut().advance());
        Ok(out)
    }

    /// Noises a clean sample to the noise level of the current step (diffusers' `add_noise`
    /// at `timesteps[steps_done()]`): start image-to-image after `set_begin_index`, or
    /// re-noise known regions after a step when inpainting.
    pub fn add_noise(&self, original: &Tensor, noise: &Tensor) -> Result<Tensor> {
        self.add_noise_at(original, noise, self.steps_done())
    }

    /// Noises a clean sample to the noise level of step `step` of this schedule.
    pub fn add_noise_at(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor> {
        let kind = self.kind();
        if step >= self.num_steps() {
            return Err(Error::Invalid(format!(
                "{kind} scheduler: add_noise at step {step} of a {}-step schedule",
                self.num_steps()
            )));
        }
        check_same_shape(kind, original, noise)?;
        dispatch!(self, s => s.add_noise(original, noise, step))
    }
}

/// The step counter every scheduler keeps.
#[derive(Clone, Debug, Default)]
pub(crate) struct StepState {
    /// The next step to run.
    pub index: usize,
    /// Whether `step` has run; the begin index is fixed from then on.
    pub started: bool,
}

impl StepState {
    fn begin_at(&mut self, index: usize, steps: usize) -> Result<()> {
        if self.started {
            return Err(Error::Invalid(
                "set_begin_index after the first step".into(),
            ));
        }
        if index > steps {
            return Err(Error::Invalid(format!(
                "begin index {index} is past the end of a {steps}-step schedule"
            )));
        }
        self.index = index;
        Ok(())
    }

    fn advance(&mut self) {
        self.index += 1;
        self.started = true;
    }
}

fn check_same_shape(kind: SchedulerKind, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(Error::Invalid(format!(
            "{kind} scheduler: tensors of shapes {:?} and {:?} must have the same shape",
            a.shape(),
            b.shape()
        )));
    }
    Ok(())
}

/// The f32 data of a scheduler input.
fn data(t: &Tensor) -> Result<&[f32]> {
    Ok(t.as_slice::<f32>()?)
}

/// `f(a[i])` elementwise.
pub(crate) fn map1(a: &Tensor, f: impl Fn(f32) -> f32) -> Result<Tensor> {
    let out = data(a)?.iter().map(|&x| f(x)).collect();
    Ok(Tensor::from_vec::<f32>(out, a.shape())?)
}

/// `f(a[i], b[i])` elementwise over two tensors of one shape.
pub(crate) fn map2(a: &Tensor, b: &Tensor, f: impl Fn(f32, f32) -> f32) -> Result<Tensor> {
    let out = data(a)?
        .iter()
        .zip(data(b)?)
        .map(|(&x, &y)| f(x, y))
        .collect();
    Ok(Tensor::from_vec::<f32>(out, a.shape())?)
}

/// `f(a[i], b[i], c[i])` elementwise over three tensors of one shape.
pub(crate) fn map3(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    f: impl Fn(f32, f32, f32) -> f32,
) -> Result<Tensor> {
    let out = data(a)?
        .iter()
        .zip(data(b)?)
        .zip(data(c)?)
        .map(|((&x, &y), &z)| f(x, y, z))
        .collect();
    Ok(Tensor::from_vec::<f32>(out, a.shape())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_round_trip() {
        for k in SchedulerKind::ALL {
            assert_eq!(k.name().parse::<SchedulerKind>().unwrap(), k);
        }
        assert!("pndm".parse::<SchedulerKind>().is_err());
    }
}
