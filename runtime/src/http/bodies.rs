//! Request bodies and their validation. Each check's message names the field and the range,
//! so a 400 says what to fix.

use retouch_models::pipeline::{
    EditMode, EditRequest, GenerateRequest, Mask, Template, TemplateSpec, check_strength,
};
use retouch_models::schedulers::SchedulerKind;
use serde::Deserialize;

use super::error::ApiError;

pub const MAX_STEPS: usize = 1000;
pub const MAX_SIDE: usize = 1024;
pub const MAX_GUIDANCE: f32 = 100.0;

/// `POST /v1/templates` and `POST /v1/images/generations`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationBody {
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: String,
    #[serde(default)]
    pub seed: u64,
    pub steps: Option<usize>,
    pub guidance: Option<f32>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub scheduler: Option<String>,
}

/// `POST /v1/edits`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditBody {
    pub template_id: String,
    /// Base64 PNG (a `data:image/png;base64,` prefix is accepted).
    pub mask: String,
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: String,
    #[serde(default)]
    pub seed: u64,
    pub guidance: Option<f32>,
    pub mode: Option<String>,
    /// Share of the template's steps the edit runs, in (0, 1].
    pub strength: Option<f32>,
}

pub fn check_steps(steps: usize) -> Result<usize, ApiError> {
    if (1..=MAX_STEPS).contains(&steps) {
        Ok(steps)
    } else {
        Err(ApiError::invalid(format!(
            "steps must be between 1 and {MAX_STEPS}, got {steps}"
        )))
    }
}

pub fn check_guidance(guidance: f32) -> Result<f32, ApiError> {
    if guidance.is_finite() && (0.0..=MAX_GUIDANCE).contains(&guidance) {
        Ok(guidance)
    } else {
        Err(ApiError::invalid(format!(
            "guidance must be between 0 and {MAX_GUIDANCE}, got {guidance}"
        )))
    }
}

pub fn check_side(name: &str, side: usize) -> Result<usize, ApiError> {
    if side > 0 && side <= MAX_SIDE && side.is_multiple_of(8) {
        Ok(side)
    } else {
        Err(ApiError::invalid(format!(
            "{name} must be a positive multiple of 8 up to {MAX_SIDE}, got {side}"
        )))
    }
}

impl GenerationBody {
    /// The validated generation; missing sizes default to the model's native size.
    pub fn to_request(&self, native_size: usize) -> Result<GenerateRequest, ApiError> {
        let scheduler: SchedulerKind = match &self.scheduler {
            Some(s) => s
                .parse()
                .map_err(|e| ApiError::invalid(format!("scheduler: {e}")))?,
            None => SchedulerKind::Ddim,
        };
        let mut req = GenerateRequest::new(self.prompt.clone());
        req.negative_prompt = self.negative_prompt.clone();
        req.seed = self.seed;
        req.steps = check_steps(self.steps.unwrap_or(req.steps))?;
        req.guidance = check_guidance(self.guidance.unwrap_or(req.guidance))?;
        req.width = check_side("width", self.width.unwrap_or(native_size))?;
        req.height = check_side("height", self.height.unwrap_or(native_size))?;
        req.scheduler = scheduler;
        Ok(req)
    }

    pub fn to_template_spec(&self, native_size: usize) -> Result<TemplateSpec, ApiError> {
        let req = self.to_request(native_size)?;
        Ok(TemplateSpec {
            prompt: req.prompt,
            negative_prompt: req.negative_prompt,
            seed: req.seed,
            steps: req.steps,
            guidance: req.guidance,
            scheduler: req.scheduler.name().to_string(),
            width: req.width,
            height: req.height,
        })
    }
}

impl EditBody {
    pub fn to_request(&self) -> Result<EditRequest, ApiError> {
        let mode = match &self.mode {
            Some(m) => m
                .parse::<EditMode>()
                .map_err(|e| ApiError::invalid(format!("mode: {e}")))?,
            None => EditMode::Cached,
        };
        let mut req = EditRequest::new(self.prompt.clone());
        req.negative_prompt = self.negative_prompt.clone();
        req.seed = self.seed;
        req.guidance = self.guidance.map(check_guidance).transpose()?;
        req.mode = mode;
        if let Some(strength) = self.strength {
            check_strength(strength).map_err(|e| ApiError::invalid(e.to_string()))?;
            req.strength = strength;
        }
        Ok(req)
    }

    /// Decodes the mask and checks it against the template: a PNG of the same size with
    /// something to edit.
    pub fn mask_for(&self, template: &Template) -> Result<Mask, ApiError> {
        use base64::Engine as _;
        let text = self.mask.trim();
        let text = text.strip_prefix("data:image/png;base64,").unwrap_or(text);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| ApiError::invalid(format!("mask is not valid base64: {e}")))?;
        let mask = Mask::from_png(&bytes)
            .map_err(|e| ApiError::invalid(format!("mask is not a readable PNG: {e}")))?;
        let spec = &template.spec;
        if (mask.width, mask.height) != (spec.width, spec.height) {
            return Err(ApiError::invalid(format!(
                "mask is {}x{}, the template is {}x{}",
                mask.width, mask.height, spec.width, spec.height
            )));
        }
        if mask.values.iter().all(|&v| v == 0.0) {
            return Err(ApiError::invalid(
                "the mask is empty (no white pixels): nothing to edit",
            ));
        }
        Ok(mask)
    }
}
