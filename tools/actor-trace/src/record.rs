//! The trace record: one JSON object per line, written by the runtime's tracer and read
//! here. Times are microseconds since the engine started.

use serde::{Deserialize, Serialize};

/// The `kind` values the runtime writes.
pub mod kinds {
    /// The scheduler handled a `Submit` (admission and routing).
    pub const SUBMIT: &str = "submit";
    /// A worker handled an `Enqueue` (a routed request joined its queue).
    pub const ENQUEUE: &str = "enqueue";
    /// A worker ran one step of every request in its batch.
    pub const STEP: &str = "step";
    /// A worker admitted a request into its batch (building the job, text encoding).
    pub const ADMIT: &str = "admit";
    /// A worker took a request out of its batch (decoding, answering, or cancelling it).
    pub const RETIRE: &str = "retire";
    /// Loading a template's cache for requests (the cache manager's work).
    pub const CACHE_LOAD: &str = "cache_load";
    /// A worker planned a step whose caches were only on disk: how many leading UNet units
    /// it recomputes densely while the rest of the entries load.
    pub const RECOMPUTE_PLAN: &str = "recompute_plan";
    /// The tracer's last record, with the count of records it dropped.
    pub const TRACE_END: &str = "trace_end";
}

/// One traced message or piece of an actor's work.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Who handled it: `scheduler`, `worker-0`, ...
    pub actor: String,
    /// What it was; see [`kinds`].
    pub kind: String,
    /// The requests it concerns (a step: every request in the batch).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requests: Vec<u64>,
    /// For single-request records: generation, template or edit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_kind: Option<String>,
    /// For single-request records: the request's steps done by then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<usize>,
    /// For steps: each request in the batch and the step it ran.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub batch: Vec<BatchEntry>,
    /// When the message was sent (for admissions: when the request was submitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enqueued_us: Option<u64>,
    pub start_us: u64,
    pub end_us: u64,
    /// Admissions: from submission to the start of admission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_us: Option<u64>,
    /// Retirements: from the start of admission to the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_us: Option<u64>,
    /// Submissions: the actor the request was routed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routed_to: Option<String>,
    /// ok, failed, invalid, cancelled, overloaded, unavailable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The end record: records the tracer could not queue (its writer fell behind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<u64>,
    /// Cache loads: the template whose step was loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Cache loads: bytes in memory once loaded; recompute plans: bytes the plan reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// Recompute plans: leading UNet units run densely.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recompute_units: Option<usize>,
    /// Recompute plans: cache bytes the recomputed units spared reading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped_bytes: Option<u64>,
}

/// One request's part in a step.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BatchEntry {
    pub id: u64,
    /// generation, template or edit.
    pub kind: String,
    /// The step this request ran (0-based).
    pub step: usize,
    /// The request's total steps.
    pub steps: usize,
    /// Edits: cached or dense.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Edits: the fraction of the image inside the mask.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_ratio: Option<f64>,
    /// Latent tokens this request put through the UNet in this step (active positions, or
    /// all when dense, times guidance branches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<usize>,
}

impl Record {
    pub fn duration_us(&self) -> u64 {
        self.end_us.saturating_sub(self.start_us)
    }

    /// Whether the record concerns `id` (in `requests` or in the batch).
    pub fn concerns(&self, id: u64) -> bool {
        self.requests.contains(&id) || self.batch.iter().any(|b| b.id == id)
    }
}
