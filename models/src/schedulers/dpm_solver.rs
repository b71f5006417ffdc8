//! DPM-Solver++ 2M (Lu et al. 2022): a multistep exponential integrator in
//! `lambda = log(alpha / sigma)` that reuses the previous step's clean-sample prediction, so
//! it is second order at one model evaluation per step.

use retouch_kernels::Tensor;

use super::config::{PredictionType, SchedulerConfig, Spacing, invalid, reject_flag};
use super::euler::final_sigma;
use super::numerics::{
    karras_sigmas, np_arange, np_interp_index, np_linspace, sigma_to_t, sigmas_from_alphas,
};
use super::{SchedulerKind, StepState, map2, map3};
use crate::Result;

const KIND: SchedulerKind = SchedulerKind::DpmPp2m;

/// diffusers' `DPMSolverMultistepScheduler` with `algorithm_type = "dpmsolver++"` and
/// `solver_order = 2`, for one request. These two are what the kind means, so they override
/// the config's `algorithm_type` and `solver_order`.
#[derive(Clone, Debug)]
pub struct DpmSolverMultistep {
    timesteps: Vec<f32>,
    /// Noise level per step, then the final one.
    sigmas: Vec<f32>,
    prediction: PredictionType,
    /// `solver_type = "heun"` instead of the default "midpoint" second-order correction.
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    /// Steps taken so far, capped at the order: a second-order step needs one earlier output.
    lower_order_nums: usize,
    /// The previous step's clean-sample prediction.
    previous: Option<Tensor>,
    state: StepState,
}

/// `(alpha_t, sigma_t)` of the variance-preserving process at noise level `sigma`.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `lambda = log(alpha_t) - log(sigma_t)`, the half log-SNR DPM-Solver steps in.
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

impl DpmSolverMultistep {
    pub(crate) fn new(config: &SchedulerConfig, n: usize) -> Result<DpmSolverMultistep> {
        let common = config.common(KIND, Spacing::Linspace)?;
        let why = "only the default and Karras sigma schedules are implemented";
        reject_flag(
            KIND,
            config.use_exponential_sigmas,
            "use_exponential_sigmas",
            why,
        )?;
        reject_flag(KIND, config.use_beta_sigmas, "use_beta_sigmas", why)?;
        reject_flag(KIND, config.use_lu_lambdas, "use_lu_lambdas", why)?;
        reject_flag(
            KIND,
            config.use_flow_sigmas,
            "use_flow_sigmas",
            "flow-matching models are not supported",
        )?;
        reject_flag(
            KIND,
            config.use_dynamic_shifting,
            "use_dynamic_shifting",
            "flow-matching models are not supported",
        )?;
        if let Some(v @ ("learned" | "learned_range")) = config.variance_type.as_deref() {
            return Err(invalid(
                KIND,
                format!(
                    "variance_type {v:?} (a model that also predicts variance) is not supported"
                ),
            ));
        }
        let heun = match config.solver_type.as_deref() {
            // diffusers maps the UniPC/DEIS solver names to midpoint.
            None | Some("midpoint" | "logrho" | "bh1" | "bh2") => false,
            Some("heun") => true,
            Some(other) => {
                return Err(invalid(
                    KIND,
                    format!(
                        "solver_type {other:?} is not supported (expected \"midpoint\" or \"heun\")"
                    ),
                ));
            }
        };

        let train = common.num_train_timesteps;
        let mut alphas_cumprod = common.alphas_cumprod;
        if common.rescale_zero_snr {
            *alphas_cumprod.last_mut().unwrap() = 2f32.powi(-24);
        }

        // Timesteps whose lambda is below `lambda_min_clipped` are cut from the top of the
        // range (a stability option for cosine schedules).
        let lambda_min = config.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY);
        let clipped = alphas_cumprod
            .iter()
            .rev()
            .take_while(|&&a| f64::from(lambda(a.sqrt(), (1.0 - a).sqrt())) < lambda_min)
            .count();
        let last_timestep = train - clipped;

        let mut timesteps: Vec<f64> = match common.spacing {
            Spacing::Linspace => {
                let mut t: Vec<f64> = np_linspace(0.0, last_timestep as f64 - 1.0, n + 1)
                    .into_iter()
                    .rev()
                    .map(f64::round_ties_even)
                    .collect();
                t.pop();
                t
            }
            Spacing::Leading => {
                let ratio = last_timestep / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio) as f64 + common.steps_offset as f64)
                    .collect()
            }
            // As for DDIM and Euler, NumPy's occasional extra element (timestep -1) is dropped.
            Spacing::Trailing => np_arange(last_timestep as f64, 0.0, -(train as f64 / n as f64))
                .into_iter()
                .map(|t| t.round_ties_even() - 1.0)
                .filter(|&t| t >= 0.0)
                .collect(),
        };
        if timesteps.is_empty() {
            return Err(invalid(KIND, "lambda_min_clipped leaves no timesteps"));
        }

        let train_sigmas = sigmas_from_alphas(&alphas_cumprod);
        let sigmas: Vec<f64> = if config.use_karras_sigmas == Some(true) {
            let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();
            let sigma_min = config.sigma_min.unwrap_or(f64::from(train_sigmas[0]));
            let sigma_max = config
                .sigma_max
                .unwrap_or(f64::from(train_sigmas[train_sigmas.len() - 1]));
            let sigmas = karras_sigmas(sigma_min, sigma_max, n);
            let cosine = config.beta_schedule.as_deref() == Some("squaredcos_cap_v2");
            timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &log_sigmas);
                    // Rounded except for cosine schedules, which diffusers then truncates.
                    if cosine {
                        t.trunc()
                    } else {
                        t.round_ties_even()
                    }
                })
                .collect();
            sigmas
        } else {
            timesteps
                .iter()
                .map(|&t| np_interp_index(t, &train_sigmas))
                .collect()
        };
        let last = final_sigma(config, &alphas_cumprod, KIND)?;
        let sigmas = sigmas
            .into_iter()
            .map(|s| s as f32)
            .chain(std::iter::once(last))
            .collect();

        Ok(DpmSolverMultistep {
            timesteps: timesteps.into_iter().map(|t| t as f32).collect(),
            sigmas,
            prediction: common.prediction,
            heun,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            euler_at_final: config.euler_at_final.unwrap_or(false),
            final_sigma_zero: last == 0.0,
            lower_order_nums: 0,
            previous: None,
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
        1.0
    }

    pub(crate) fn state(&self) -> &StepState {
        &self.state
    }

    pub(crate) fn state_mut(&mut self) -> &mut StepState {
        &mut self.state
    }

    pub(crate) fn scale_model_input(&self, sample: &Tensor) -> Result<Tensor> {
        super::map1(sample, |x| x)
    }

    /// The model output as a clean-sample prediction (DPM-Solver++ works in x0).
    fn predicted_x0(&self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let (alpha, sigma) = alpha_sigma(self.sigmas[self.state.index]);
        match self.prediction {
            PredictionType::Epsilon => map2(model_output, sample, |m, s| (s - sigma * m) / alpha),
            PredictionType::Sample => super::map1(model_output, |m| m),
            PredictionType::VPrediction => map2(model_output, sample, |m, s| alpha * s - sigma * m),
        }
    }

    pub(crate) fn step(&mut self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let i = self.state.index;
        let steps = self.timesteps.len();
        // Few-step schedules and a final sigma of zero end with a first-order step: the
        // second-order correction is unstable there.
        let final_first_order = i == steps - 1
            && (self.euler_at_final
                || (self.lower_order_final && steps < 15)
                || self.final_sigma_zero);
        let x0 = self.predicted_x0(model_output, sample)?;

        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s0, sigma_s0);
        let sample_scale = sigma_t / sigma_s0;
        let d0_scale = alpha_t * ((-h).exp() - 1.0);

        let out = match &self.previous {
            Some(previous) if self.lower_order_nums >= 1 && !final_first_order => {
                let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
                let h_0 = lambda(alpha_s0, sigma_s0) - lambda(alpha_s1, sigma_s1);
                let inv_r0 = 1.0 / (h_0 / h);
                // D1 = (m0 - m1) / r0 enters with -c (midpoint) or +c (heun); adding the
                // negated product rounds exactly as diffusers' subtraction does.
                let d1_coeff = if self.heun {
                    alpha_t * (((-h).exp() - 1.0) / h + 1.0)
                } else {
                    -(0.5 * d0_scale)
                };
                map3(sample, &x0, previous, move |s, m0, m1| {
                    let d1 = inv_r0 * (m0 - m1);
                    sample_scale * s - d0_scale * m0 + d1_coeff * d1
                })?
            }
            _ => map2(sample, &x0, move |s, m0| sample_scale * s - d0_scale * m0)?,
        };
        self.previous = Some(x0);
        self.lower_order_nums = (self.lower_order_nums + 1).min(2);
        Ok(out)
    }

    pub(crate) fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step: usize,
    ) -> Result<Tensor> {
        let (alpha, sigma) = alpha_sigma(self.sigmas[step]);
        map2(original, noise, move |x, n| alpha * x + sigma * n)
    }
}
