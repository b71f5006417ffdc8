//! DDIM (Song et al. 2020) with eta = 0: deterministic, one model evaluation per step.

use retouch_kernels::Tensor;

use super::config::{PredictionType, SchedulerConfig, Spacing, invalid};
use super::numerics::spaced_timesteps;
use super::{SchedulerKind, StepState, map1, map2};
use crate::Result;

const KIND: SchedulerKind = SchedulerKind::Ddim;

/// diffusers' `DDIMScheduler` for one request.
#[derive(Clone, Debug)]
pub struct Ddim {
    timesteps: Vec<f32>,
    /// The same timesteps as indices into `alphas_cumprod`.
    train_steps: Vec<usize>,
    alphas_cumprod: Vec<f32>,
    /// `alphas_cumprod` "before" timestep 0: 1, or `alphas_cumprod[0]` (`set_alpha_to_one`).
    final_alpha_cumprod: f32,
    /// diffusers steps to `t - num_train_timesteps / num_inference_steps` whatever the
    /// spacing, so with "trailing" the target is not always the next timestep.
    step_ratio: i64,
    prediction: PredictionType,
    /// Clamp range for the predicted clean sample (`clip_sample`).
    clip: Option<f32>,
    state: StepState,
}

impl Ddim {
    pub(crate) fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Ddim> {
        let common = config.common(KIND, Spacing::Leading)?;
        let train = common.num_train_timesteps;
        let values = spaced_timesteps(
            common.spacing,
            train,
            num_inference_steps,
            common.steps_offset,
            true,
        );
        let train_steps = values
            .iter()
            .map(|&t| {
                if t < 0.0 || t >= train as f64 {
                    Err(invalid(
                        KIND,
                        format!(
                            "timestep {t} (steps_offset {}) is outside 0..{train}",
                            common.steps_offset
                        ),
                    ))
                } else {
                    Ok(t as usize)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            common.alphas_cumprod[0]
        };
        let clip = config
            .clip_sample
            .unwrap_or(true)
            .then(|| config.clip_sample_range.unwrap_or(1.0) as f32);
        if clip.is_some_and(|r| r.is_nan() || r < 0.0) {
            return Err(invalid(
                KIND,
                "clip_sample_range must be a non-negative number",
            ));
        }
        Ok(Ddim {
            timesteps: train_steps.iter().map(|&t| t as f32).collect(),
            train_steps,
            alphas_cumprod: common.alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: (train / num_inference_steps) as i64,
            prediction: common.prediction,
            clip,
            state: StepState::default(),
        })
    }

    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    pub fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    pub(crate) fn state(&self) -> &StepState {
        &self.state
    }

    pub(crate) fn state_mut(&mut self) -> &mut StepState {
        &mut self.state
    }

    pub(crate) fn scale_model_input(&self, sample: &Tensor) -> Result<Tensor> {
        map1(sample, |x| x)
    }

    pub(crate) fn step(&self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let t = self.train_steps[self.state.index];
        let prev = t as i64 - self.step_ratio;
        let alpha_t = self.alphas_cumprod[t];
        let alpha_prev = if prev >= 0 {
            self.alphas_cumprod[prev as usize]
        } else {
            self.final_alpha_cumprod
        };
        let beta_t = 1.0 - alpha_t;
        let (sqrt_alpha, sqrt_beta) = (alpha_t.sqrt(), beta_t.sqrt());
        // eta = 0: no variance term, so the direction to x_t is sqrt(1 - alpha_prev) * eps.
        let (sqrt_alpha_prev, dir_scale) = (alpha_prev.sqrt(), (1.0 - alpha_prev).sqrt());
        let clip = self.clip;
        let prediction = self.prediction;
        map2(model_output, sample, move |m, s| {
            let (x0, eps) = match prediction {
                PredictionType::Epsilon => ((s - sqrt_beta * m) / sqrt_alpha, m),
                PredictionType::Sample => (m, (s - sqrt_alpha * m) / sqrt_beta),
                PredictionType::VPrediction => (
                    sqrt_alpha * s - sqrt_beta * m,
                    sqrt_alpha * m + sqrt_beta * s,
                ),
            };
            let x0 = match clip {
                Some(r) => x0.clamp(-r, r),
                None => x0,
            };
            sqrt_alpha_prev * x0 + dir_scale * eps
        })
    }

    pub(crate) fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step: usize,
    ) -> Result<Tensor> {
        let alpha = self.alphas_cumprod[self.train_steps[step]];
        let (a, b) = (alpha.sqrt(), (1.0 - alpha).sqrt());
        map2(original, noise, move |x, n| a * x + b * n)
    }
}
