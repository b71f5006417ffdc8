//! What travels from the HTTP layer to a worker and back: a request (its work, its reply
//! channel) and the engine's errors.

use std::sync::Arc;
use std::time::Instant;

use retouch_models::pipeline::{
    EditRequest, GenerateRequest, JobOutput, Mask, Pipeline, Template, TemplateSpec,
};
use tokio::sync::oneshot;

use super::balancer::Charge;
use super::cache::CacheLease;

pub type RequestId = u64;

/// The work a request asks for; a worker turns it into a `DenoiseJob` when it admits it
/// (text encoding runs there, on the worker's own models).
pub enum JobSpec {
    Generate(GenerateRequest),
    Template(TemplateSpec),
    Edit {
        /// The template's small parts; its activation cache is the cache manager's.
        template: Arc<Template>,
        /// Cached mode: the hold on the template's activation cache (None for dense edits).
        cache: Option<CacheLease>,
        /// The template's id in the store (cache residency is looked up by it).
        template_id: String,
        mask: Mask,
        req: EditRequest,
    },
}

impl JobSpec {
    /// The label metrics and progress use.
    pub fn kind(&self) -> &'static str {
        match self {
            JobSpec::Generate(_) => "generation",
            JobSpec::Template(_) => "template",
            JobSpec::Edit { .. } => "edit",
        }
    }

    /// Latent tokens one step of this request runs through the UNet (see
    /// `EngineConfig::max_batch_tokens`); fails where building its job would.
    pub fn step_tokens(&self, pipe: &Pipeline) -> retouch_models::Result<usize> {
        match self {
            JobSpec::Generate(r) => pipe.generate_step_tokens(r),
            JobSpec::Template(s) => pipe.template_step_tokens(s),
            JobSpec::Edit {
                template,
                mask,
                req,
                ..
            } => pipe.edit_step_tokens(template, mask, req),
        }
    }

    /// Denoising steps the request runs (an edit: its share of the template's).
    pub fn steps(&self) -> usize {
        match self {
            JobSpec::Generate(r) => r.steps,
            JobSpec::Template(s) => s.steps,
            JobSpec::Edit { template, .. } => template.spec.steps - self.first_step(),
        }
    }

    /// The schedule's first step the request runs: past 0 for an edit of strength below 1.
    /// An invalid strength counts as 0 here; building the job rejects it.
    pub fn first_step(&self) -> usize {
        match self {
            JobSpec::Edit { template, req, .. } => req.first_step(template.spec.steps).unwrap_or(0),
            _ => 0,
        }
    }
}

/// A finished request.
pub struct Completed {
    pub output: JobOutput,
    pub worker: usize,
    /// From submission to admission into a batch.
    pub queue_ms: f64,
    /// From admission to the reply (steps interleave with the rest of the batch).
    pub compute_ms: f64,
}

pub type Reply = Result<Completed, EngineError>;

pub struct Request {
    pub id: RequestId,
    pub spec: JobSpec,
    pub reply: oneshot::Sender<Reply>,
    pub submitted: Instant,
    /// The predicted work the scheduler charged to the worker it routed this to.
    pub charge: Charge,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EngineError {
    /// The request cannot run as given (the model layer rejected it).
    Invalid(String),
    NotFound(String),
    /// Every queue is at its bound; retry after the given seconds.
    Overloaded {
        retry_after_s: u64,
    },
    /// The worker failed while running this request.
    Failed(String),
    /// The engine is shutting down or a worker is gone.
    Unavailable(String),
}

impl std::fmt::Display for EngineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EngineError::Invalid(m) | EngineError::NotFound(m) => f.write_str(m),
            EngineError::Overloaded { retry_after_s } => {
                write!(f, "every worker queue is full; retry in {retry_after_s} s")
            }
            EngineError::Failed(m) => write!(f, "the worker failed: {m}"),
            EngineError::Unavailable(m) => write!(f, "unavailable: {m}"),
        }
    }
}

impl std::error::Error for EngineError {}

impl EngineError {
    /// Maps a model-layer error: `Invalid` is the caller's input, anything else a failure.
    pub fn from_model(e: retouch_models::Error) -> EngineError {
        match e {
            retouch_models::Error::Invalid(m) => EngineError::Invalid(m),
            other => EngineError::Failed(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bad input is the caller's (400); a step whose numbers went non-finite is the
    /// server's failure (500), with its reason.
    #[test]
    fn model_errors_map_to_the_callers_or_the_servers_fault() {
        let invalid = EngineError::from_model(retouch_models::Error::Invalid("bad mask".into()));
        assert!(matches!(invalid, EngineError::Invalid(_)));
        let nan = EngineError::from_model(retouch_models::Error::NonFinite {
            step: 3,
            value: f32::NAN,
        });
        match nan {
            EngineError::Failed(m) => assert!(m.contains("step 3") && m.contains("non-finite")),
            other => panic!("expected a failure, got {other:?}"),
        }
    }
}
