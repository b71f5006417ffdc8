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
pub const CACHE_HITS: &str = "retouch_cache_hits_total";
pub const CACHE_MISSES: &str = "retouch_cache_misses_total";
pub const CACHE_BYTES: &str = "retouch_cache_bytes";
pub const CACHE_EVICTIONS: &str = "retouch_cache_evictions_total";
pub const CACHE_LOAD_SECONDS: &str = "retouch_cache_load_seconds";
pub const CACHE_WAIT_SECONDS: &str = "retouch_cache_wait_seconds";
pub const CACHE_LOAD_ERRORS: &str = "retouch_cache_load_errors_total";
pub const RECOMPUTED_UNITS: &str = "retouch_recomputed_units_total";
pub const CACHE_BYTES_SKIPPED: &str = "retouch_cache_bytes_skipped_total";
pub const DEVICE_IDLE_BYTES: &str = "retouch_device_idle_bytes";
/// Recorded by the models crate, where a GPU pipeline looks its template steps up.
pub const DEVICE_STEP_LOOKUPS: &str = retouch_models::pipeline::device_steps::DEVICE_STEP_LOOKUPS;
pub const DEVICE_STEP_PREFETCHES: &str =
    retouch_models::pipeline::device_steps::DEVICE_STEP_PREFETCHES;

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
    metrics::describe_counter!(
        CACHE_HITS,
        "Activation-cache steps found in memory when a worker needed them, by tier"
    );
    metrics::describe_counter!(
        RECOMPUTED_UNITS,
        "UNet units run densely instead of reading their cache entries (load-or-recompute \
         plans of steps whose caches were on disk), per worker"
    );
    metrics::describe_counter!(
        CACHE_BYTES_SKIPPED,
        "Activation-cache bytes not read because their units were recomputed, per worker"
    );
    metrics::describe_counter!(
        CACHE_MISSES,
        "Activation-cache steps a worker had to wait for (loaded from disk)"
    );
    metrics::describe_gauge!(
        CACHE_BYTES,
        "Activation-cache bytes per tier (device: per worker)"
    );
    metrics::describe_counter!(CACHE_EVICTIONS, "Activation-cache steps evicted, by tier");
    metrics::describe_histogram!(CACHE_LOAD_SECONDS, "Seconds per step file read from disk");
    metrics::describe_histogram!(CACHE_WAIT_SECONDS, "Seconds a worker waited on a miss");
    metrics::describe_counter!(CACHE_LOAD_ERRORS, "Step files that failed to load");
    metrics::describe_counter!(
        DEVICE_STEP_LOOKUPS,
        "GPU workers' lookups of template steps in device memory, by outcome (hit; uploaded \
         and kept; passing: uploaded for one call, larger than the device budget)"
    );
    metrics::describe_gauge!(
        DEVICE_IDLE_BYTES,
        "Memory a GPU worker's device keeps for reuse between steps, per worker and pool \
         (tensors: freed device blocks; staging: page-locked host buffers for uploads), each \
         bounded by its pool's budget"
    );
    metrics::describe_counter!(
        DEVICE_STEP_PREFETCHES,
        "GPU workers' uploads of their edits' next template steps on the copy stream while a \
         step computes, by outcome (hit: already resident; uploaded)"
    );
}

/// Counts one request outcome (`ok`, `invalid`, `not_found`, `overloaded`, `failed`,
/// `cancelled`, `unavailable`).
pub fn count(kind: &'static str, outcome: &'static str) {
    metrics::counter!(REQUESTS, "kind" => kind, "outcome" => outcome).increment(1);
}
