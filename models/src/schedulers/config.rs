//! diffusers' `scheduler/scheduler_config.json`, parsed as written and resolved per scheduler.
//!
//! Every field is optional because diffusers fills a missing field with the default of the
//! scheduler class being built, not of the class that saved the file: SD 1.5 ships a
//! `PNDMScheduler` config without `timestep_spacing`, which DDIM reads as "leading" and
//! Euler and DPM-Solver as "linspace". Unknown fields are ignored.

use std::path::Path;

use serde::{Deserialize, Deserializer};

use super::SchedulerKind;
use super::numerics::{cumprod_f32, torch_linspace_f32};
use crate::{Error, Result};

/// A parsed `scheduler_config.json`. Build a per-request scheduler with
/// [`SchedulerConfig::build`](crate::schedulers::SchedulerConfig::build).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    #[serde(deserialize_with = "float")]
    pub beta_start: Option<f64>,
    #[serde(deserialize_with = "float")]
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<String>,
    pub timestep_spacing: Option<String>,
    pub steps_offset: Option<i64>,
    pub rescale_betas_zero_snr: Option<bool>,
    // DDIM
    pub set_alpha_to_one: Option<bool>,
    pub clip_sample: Option<bool>,
    #[serde(deserialize_with = "float")]
    pub clip_sample_range: Option<f64>,
    pub thresholding: Option<bool>,
    // Euler and DPM-Solver
    pub final_sigmas_type: Option<String>,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    #[serde(deserialize_with = "float")]
    pub sigma_min: Option<f64>,
    #[serde(deserialize_with = "float")]
    pub sigma_max: Option<f64>,
    // Euler
    pub interpolation_type: Option<String>,
    pub timestep_type: Option<String>,
    // DPM-Solver
    pub algorithm_type: Option<String>,
    pub solver_order: Option<usize>,
    pub solver_type: Option<String>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    #[serde(deserialize_with = "float")]
    pub lambda_min_clipped: Option<f64>,
    pub variance_type: Option<String>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    pub use_dynamic_shifting: Option<bool>,
}

/// A float field that may be written as Python's `json` writes non-finite values
/// (`-Infinity`, turned into a string by [`quote_non_finite`]).
fn float<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<f64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Value {
        Number(f64),
        Text(String),
    }
    match Option::<Value>::deserialize(d)? {
        None => Ok(None),
        Some(Value::Number(x)) => Ok(Some(x)),
        Some(Value::Text(s)) => match s.as_str() {
            "Infinity" => Ok(Some(f64::INFINITY)),
            "-Infinity" => Ok(Some(f64::NEG_INFINITY)),
            "NaN" => Ok(Some(f64::NAN)),
            _ => Err(serde::de::Error::custom(format!(
                "expected a number, got {s:?}"
            ))),
        },
    }
}

/// Quotes the bare `Infinity`, `-Infinity` and `NaN` tokens Python's `json` module writes
/// (diffusers saves `lambda_min_clipped: -Infinity`), which strict JSON parsers reject.
fn quote_non_finite(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        if let Some(token) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t))
        {
            out.push('"');
            out.push_str(token);
            out.push('"');
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

impl SchedulerConfig {
    /// Parses a `scheduler_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<SchedulerConfig> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|e| Error::config(path, e))
    }

    /// Parses the JSON text of a scheduler config.
    pub fn from_json(text: &str) -> Result<SchedulerConfig> {
        Self::parse(text).map_err(|e| Error::Invalid(format!("scheduler config: {e}")))
    }

    fn parse(text: &str) -> std::result::Result<SchedulerConfig, String> {
        serde_json::from_str(&quote_non_finite(text)).map_err(|e| e.to_string())
    }
}

/// What the model predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionType {
    /// The added noise.
    Epsilon,
    /// The velocity `alpha * noise - sigma * x0` (SD 2.x 768).
    VPrediction,
    /// The clean sample itself.
    Sample,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

/// The settings every scheduler shares, resolved with the target class's defaults, and the
/// training noise schedule they define.
#[derive(Clone, Debug)]
pub(crate) struct Common {
    pub num_train_timesteps: usize,
    pub prediction: PredictionType,
    pub spacing: Spacing,
    pub steps_offset: i64,
    pub rescale_zero_snr: bool,
    /// Cumulative products of `1 - beta`, f32 as diffusers keeps them, by training timestep.
    pub alphas_cumprod: Vec<f32>,
}

pub(crate) fn invalid(kind: SchedulerKind, message: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("scheduler config ({kind}): {message}"))
}

/// Rejects a feature flag this crate does not implement, naming it.
pub(crate) fn reject_flag(
    kind: SchedulerKind,
    value: Option<bool>,
    field: &str,
    why: &str,
) -> Result<()> {
    if value == Some(true) {
        return Err(invalid(
            kind,
            format!("`{field}: true` is not supported: {why}"),
        ));
    }
    Ok(())
}

impl SchedulerConfig {
    /// The shared settings for `kind`; `default_spacing` is the class default.
    pub(crate) fn common(&self, kind: SchedulerKind, default_spacing: Spacing) -> Result<Common> {
        let num_train_timesteps = self.num_train_timesteps.unwrap_or(1000);
        if num_train_timesteps < 2 {
            return Err(invalid(kind, "num_train_timesteps must be at least 2"));
        }
        let prediction = match self.prediction_type.as_deref() {
            None | Some("epsilon") => PredictionType::Epsilon,
            Some("v_prediction") => PredictionType::VPrediction,
            // Euler also accepts the older name.
            Some("sample") => PredictionType::Sample,
            Some("original_sample") if kind == SchedulerKind::Euler => PredictionType::Sample,
            Some(other) => {
                return Err(invalid(
                    kind,
                    format!(
                        "prediction_type {other:?} is not supported \
                         (expected \"epsilon\", \"v_prediction\" or \"sample\")"
                    ),
                ));
            }
        };
        let spacing = match self.timestep_spacing.as_deref() {
            None => default_spacing,
            Some("linspace") => Spacing::Linspace,
            Some("leading") => Spacing::Leading,
            Some("trailing") => Spacing::Trailing,
            Some(other) => {
                return Err(invalid(
                    kind,
                    format!(
                        "timestep_spacing {other:?} is not supported \
                         (expected \"linspace\", \"leading\" or \"trailing\")"
                    ),
                ));
            }
        };
        reject_flag(
            kind,
            self.thresholding,
            "thresholding",
            "dynamic thresholding is meant for pixel-space models, not latent diffusion",
        )?;
        let rescale_zero_snr = self.rescale_betas_zero_snr.unwrap_or(false);
        let betas = self.betas(kind, num_train_timesteps)?;
        let betas = if rescale_zero_snr {
            rescale_zero_terminal_snr(&betas)
        } else {
            betas
        };
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        Ok(Common {
            num_train_timesteps,
            prediction,
            spacing,
            steps_offset: self.steps_offset.unwrap_or(0),
            rescale_zero_snr,
            alphas_cumprod: cumprod_f32(&alphas),
        })
    }

    fn betas(&self, kind: SchedulerKind, n: usize) -> Result<Vec<f32>> {
        if let Some(betas) = &self.trained_betas {
            if betas.len() != n {
                return Err(invalid(
                    kind,
                    format!(
                        "trained_betas has {} values, num_train_timesteps is {n}",
                        betas.len()
                    ),
                ));
            }
            return Ok(betas.iter().map(|&b| b as f32).collect());
        }
        let start = self.beta_start.unwrap_or(0.0001);
        let end = self.beta_end.unwrap_or(0.02);
        match self.beta_schedule.as_deref().unwrap_or("linear") {
            "linear" => Ok(torch_linspace_f32(start as f32, end as f32, n)),
            "scaled_linear" => {
                let roots = torch_linspace_f32(start.sqrt() as f32, end.sqrt() as f32, n);
                Ok(roots.iter().map(|r| r * r).collect())
            }
            "squaredcos_cap_v2" => Ok(cosine_betas(n)),
            other => Err(invalid(
                kind,
                format!(
                    "beta_schedule {other:?} is not supported \
                     (expected \"linear\", \"scaled_linear\" or \"squaredcos_cap_v2\")"
                ),
            )),
        }
    }
}

/// The "squaredcos_cap_v2" schedule (Nichol & Dhariwal 2021), computed in f64 as diffusers
/// does in Python, stored as f32.
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// Lin et al. (2023), "Common Diffusion Noise Schedules and Sample Steps are Flawed": shifts
/// and scales `sqrt(alphas_cumprod)` so the last timestep has zero signal. f32 throughout,
/// as diffusers computes it.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut root: Vec<f32> = cumprod_f32(&alphas).iter().map(|a| a.sqrt()).collect();
    let first = root[0];
    let last = root[root.len() - 1];
    let scale = first / (first - last);
    root.iter_mut().for_each(|r| *r = (*r - last) * scale);
    let bar: Vec<f32> = root.iter().map(|r| r * r).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    out.extend(bar.windows(2).map(|w| 1.0 - w[1] / w[0]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_tokens_are_quoted_outside_strings() {
        let text = r#"{"a": -Infinity, "b": "NaN Infinity", "c": [NaN, Infinity]}"#;
        assert_eq!(
            quote_non_finite(text),
            r#"{"a": "-Infinity", "b": "NaN Infinity", "c": ["NaN", "Infinity"]}"#
        );
    }

    #[test]
    fn lambda_min_clipped_parses_as_minus_infinity() {
        let c = SchedulerConfig::from_json(r#"{"lambda_min_clipped": -Infinity}"#).unwrap();
        assert_eq!(c.lambda_min_clipped, Some(f64::NEG_INFINITY));
    }
}
