//! Euler's method on the probability-flow ODE in sigma (Karras et al. 2022, algorithm 2
//! without churn): one model evaluation per step, inputs scaled to unit variance.

use retouch_kernels::Tensor;

use super::config::{PredictionType, SchedulerConfig, Spacing, invalid, reject_flag};
use super::numerics::{
    karras_sigmas, np_interp_index, sigma_to_t, sigmas_from_alphas, spaced_timesteps,
    torch_linspace_f32,
};
use super::{SchedulerKind, StepState, map1, map2};
use crate::Result;

const KIND: SchedulerKind = SchedulerKind::Euler;

/// diffusers' `EulerDiscreteScheduler` for one request (`s_churn = 0`, so deterministic).
#[derive(Clone, Debug)]
pub struct EulerDiscrete {
    timesteps: Vec<f32>,
    /// Noise level per step, then the final one (0 or the smallest training sigma).
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction: PredictionType,
    state: StepState,
}

impl EulerDiscrete {
    pub(crate) fn new(config: &SchedulerConfig, n: usize) -> Result<EulerDiscrete> {
        let common = config.common(KIND, Spacing::Linspace)?;
        let why = "only the default and Karras sigma schedules are implemented";
        reject_flag(
            KIND,
            config.use_exponential_sigmas,
            "use_exponential_sigmas",
            why,
        )?;
        reject_flag(KIND, config.use_beta_sigmas, "use_beta_sigmas", why)?;
        match config.timestep_type.as_deref() {
            None | Some("discrete") => {}
            // Continuous timesteps change behaviour only for v-prediction (EDM-style models).
            Some("continuous") if common.prediction != PredictionType::VPrediction => {}
            Some(other) => {
                return Err(invalid(
                    KIND,
                    format!("timestep_type {other:?} is not supported with this prediction type"),
                ));
            }
        }

        let mut alphas_cumprod = common.alphas_cumprod;
        if common.rescale_zero_snr {
            // Zero terminal SNR means an infinite sigma; diffusers caps it this way.
            *alphas_cumprod.last_mut().unwrap() = 2f32.powi(-24);
        }
        let train_sigmas = sigmas_from_alphas(&alphas_cumprod);
        let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();

        // diffusers makes these float32 before interpolating.
        let mut timesteps: Vec<f32> = spaced_timesteps(
            common.spacing,
            common.num_train_timesteps,
            n,
            common.steps_offset,
            false,
        )
        .into_iter()
        .map(|t| t as f32)
        .collect();
        let mut sigmas: Vec<f64> = match config.interpolation_type.as_deref() {
            None | Some("linear") => timesteps
                .iter()
                .map(|&t| np_interp_index(f64::from(t), &train_sigmas))
                .collect(),
            // Evenly spaced in log sigma over the whole training range; n + 1 values, as
            // diffusers does it (the last step then ends at the smallest training sigma).
            Some("log_linear") => {
                let (largest, smallest) = (train_sigmas[train_sigmas.len() - 1], train_sigmas[0]);
                torch_linspace_f32(largest.ln(), smallest.ln(), n + 1)
                    .into_iter()
                    .map(|l| f64::from(l.exp()))
                    .collect()
            }
            Some(other) => {
                return Err(invalid(
                    KIND,
                    format!(
                        "interpolation_type {other:?} is not supported \
                         (expected \"linear\" or \"log_linear\")"
                    ),
                ));
            }
        };
        if config.use_karras_sigmas == Some(true) {
            let sigma_min = config.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let sigma_max = config.sigma_max.unwrap_or(sigmas[0]);
            sigmas = karras_sigmas(sigma_min, sigma_max, n);
            timesteps = sigmas
                .iter()
                .map(|&s| sigma_to_t(s, &log_sigmas) as f32)
                .collect();
        }
        let last = final_sigma(config, &alphas_cumprod, KIND)?;
        let sigmas: Vec<f32> = sigmas
            .into_iter()
            .map(|s| s as f32)
            .chain(std::iter::once(last))
            .collect();

        let max_sigma = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = match common.spacing {
            Spacing::Linspace | Spacing::Trailing => max_sigma,
            Spacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        };
        Ok(EulerDiscrete {
            timesteps,
            sigmas,
            init_noise_sigma,
            prediction: common.prediction,
            state: StepState::default(),
        })
    }

    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    pub fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }

    pub(crate) fn state(&self) -> &StepState {
        &self.state
    }

    pub(crate) fn state_mut(&mut self) -> &mut StepState {
        &mut self.state
    }

    /// `sample / sqrt(sigma^2 + 1)`: the UNet was trained on unit-variance inputs.
    pub(crate) fn scale_model_input(&self, sample: &Tensor) -> Result<Tensor> {
        let sigma = self.sigmas[self.state.index];
        let scale = (sigma * sigma + 1.0).sqrt();
        map1(sample, move |x| x / scale)
    }

    pub(crate) fn step(&self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let i = self.state.index;
        let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
        let v_scale = -sigma / (sigma * sigma + 1.0).sqrt();
        let s_scale = sigma * sigma + 1.0;
        let dt = next - sigma;
        let prediction = self.prediction;
        map2(model_output, sample, move |m, s| {
            let x0 = match prediction {
                PredictionType::Epsilon => s - sigma * m,
                PredictionType::Sample => m,
                PredictionType::VPrediction => m * v_scale + s / s_scale,
            };
            // The ODE's derivative dx/dsigma, kept in diffusers' form (not simplified to m)
            // so rounding matches.
            let derivative = (s - x0) / sigma;
            s + derivative * dt
        })
    }

    pub(crate) fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step: usize,
    ) -> Result<Tensor> {
        let sigma = self.sigmas[step];
        map2(original, noise, move |x, n| x + n * sigma)
    }
}

/// The noise level after the last step: 0, or the smallest training sigma.
pub(crate) fn final_sigma(
    config: &SchedulerConfig,
    alphas_cumprod: &[f32],
    kind: SchedulerKind,
) -> Result<f32> {
    match config.final_sigmas_type.as_deref() {
        None | Some("zero") => Ok(0.0),
        Some("sigma_min") => Ok(((1.0 - alphas_cumprod[0]) / alphas_cumprod[0]).sqrt()),
        Some(other) => Err(invalid(
            kind,
            format!(
                "final_sigmas_type {other:?} is not supported (expected \"zero\" or \"sigma_min\")"
            ),
        )),
    }
}
