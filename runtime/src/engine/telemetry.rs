//! Metrics through the `metrics` crate, rendered as Prometheus text by
//! metrics-exporter-prometheus. The recorder is process-wide (worker threads record into
//! it), installed once; engines in the same process share it, so counters add up across
//! them. If the embedding app installed another global recorder first, metrics go there
//! and `/metrics` renders only what this recorder saw (nothing).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const REQUESTS: &str = "retouch_requests_total";
pub const QUEUE_DEPTH: &str = "retouch_queue_depth";
pub const BATCH_REQUESTS: &str = "retouch_batch_requests";
pub const STEP_SECONDS: &str = "retouch_step_seconds";
pub const STEP_BATCH: &str = "retouch_step_batch_requests";
pub const REQUEST_SECONDS: &str = "retouch_request_seconds";
pub const TEMPLATES: &str = "retouch_templates";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus handle, installing the recorder on first use.
pub fn prometheus() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Err means another recorder is already global: keep ours for rendering.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    metrics::describe_counter!(REQUESTS, "Requests by kind and outcome");
    metrics::describe_gauge!(QUEUE_DEPTH, "Requests waiting for a batch, per worker");
    metrics::describe_gauge!(BATCH_REQUESTS, "Requests in the running batch, per worker");
    metrics::describe_histogram!(STEP_SECONDS, "Seconds per batch step, per worker");
    metrics::describe_histogram!(STEP_BATCH, "Requests stepped per batch step");
    metrics::describe_histogram!(REQUEST_SECONDS, "Seconds from submission to reply");
    metrics::describe_gauge!(TEMPLATES, "Templates in the store");
}

/// Counts one request outcome (`ok`, `invalid`, `not_found`, `overloaded`, `failed`,
/// `cancelled`, `unavailable`).
pub fn count(kind: &'static str, outcome: &'static str) {
    metrics::counter!(REQUESTS, "kind" => kind, "outcome" => outcome).increment(1);
}
