//! What the actors record: one helper per traced message or piece of work, so the actors
//! hold only call sites. Each helper returns at once when tracing is off.

use std::collections::HashMap;
use std::time::Instant;

use retouch_models::pipeline::{DenoiseJob, EditMode};

use super::{BatchEntry, Record, Tracer, kinds};
use crate::engine::cache::LoadEvent;
use crate::engine::request::{EngineError, JobSpec, Reply, Request, RequestId};

/// The trace name of worker `index`, shared by the worker and the scheduler routing to it.
pub fn worker_actor(index: usize) -> String {
    format!("worker-{index}")
}

/// The outcome label of an engine error, as records and metrics name it.
fn error_outcome(e: &EngineError) -> &'static str {
    match e {
        EngineError::Invalid(_) => "invalid",
        EngineError::NotFound(_) => "not_found",
        EngineError::Overloaded { .. } => "overloaded",
        EngineError::Failed(_) => "failed",
        EngineError::Unavailable(_) => "unavailable",
    }
}

fn outcome<T>(result: &Result<T, &EngineError>) -> (String, Option<String>) {
    match result {
        Ok(_) => ("ok".into(), None),
        Err(e) => (error_outcome(e).into(), Some(e.to_string())),
    }
}

impl Tracer {
    /// The scheduler handled a `Submit`; `result` is the worker it routed to.
    pub fn submit(
        &self,
        id: RequestId,
        kind: &str,
        submitted: Instant,
        start: Instant,
        result: &Result<usize, EngineError>,
    ) {
        if !self.enabled() {
            return;
        }
        let (outcome, error) = outcome(&result.as_ref().map(|&i| i));
        self.record(Record {
            kind: kinds::SUBMIT.into(),
            requests: vec![id],
            request_kind: Some(kind.into()),
            enqueued_us: Some(self.us(submitted)),
            start_us: self.us(start),
            end_us: self.us(Instant::now()),
            routed_to: result.as_ref().ok().map(|&i| worker_actor(i)),
            outcome: Some(outcome),
            error,
            ..Record::default()
        });
    }
}

/// A worker's tracer, plus what it remembers of each request in its batch between
/// admission and retirement (mode and mask ratio for step records, admission time for the
/// compute time).
#[derive(Default)]
pub struct WorkerTrace {
    tracer: Tracer,
    jobs: HashMap<RequestId, Job>,
}

struct Job {
    admitted: Instant,
    mode: Option<&'static str>,
    mask_ratio: Option<f64>,
}

impl WorkerTrace {
    pub fn new(tracer: &Tracer, index: usize) -> WorkerTrace {
        WorkerTrace {
            tracer: tracer.named(&worker_actor(index)),
            jobs: HashMap::new(),
        }
    }

    /// Handled an `Enqueue` sent at `sent`.
    pub fn enqueued(&self, id: RequestId, sent: Instant, start: Instant) {
        let t = &self.tracer;
        if !t.enabled() {
            return;
        }
        t.record(Record {
            kind: kinds::ENQUEUE.into(),
            requests: vec![id],
            enqueued_us: Some(t.us(sent)),
            start_us: t.us(start),
            end_us: t.us(Instant::now()),
            ..Record::default()
        });
    }

    /// Admission of `req` starts now (answered); call [`WorkerTrace::admitted`] after.
    pub fn admitting(&mut self, req: &Request) -> Instant {
        let now = Instant::now();
        if self.tracer.enabled() {
            let (mode, mask_ratio) = match &req.spec {
                JobSpec::Edit { mask, req, .. } => (
                    Some(match req.mode {
                        EditMode::Cached => "cached",
                        EditMode::Dense => "dense",
                    }),
                    Some(mask.ratio()),
                ),
                _ => (None, None),
            };
            let job = Job {
                admitted: now,
                mode,
                mask_ratio,
            };
            self.jobs.insert(req.id, job);
        }
        now
    }

    /// Admission (building the job, encoding the text) started at `start` and ended now.
    pub fn admitted(
        &mut self,
        id: RequestId,
        kind: &str,
        submitted: Instant,
        start: Instant,
        result: Result<(), &EngineError>,
    ) {
        let t = &self.tracer;
        if !t.enabled() {
            return;
        }
        let (outcome, error) = outcome(&result);
        if result.is_err() {
            self.jobs.remove(&id);
        }
        t.record(Record {
            kind: kinds::ADMIT.into(),
            requests: vec![id],
            request_kind: Some(kind.into()),
            enqueued_us: Some(t.us(submitted)),
            start_us: t.us(start),
            end_us: t.us(Instant::now()),
            queue_us: Some(start.saturating_duration_since(submitted).as_micros() as u64),
            outcome: Some(outcome),
            error,
            ..Record::default()
        });
    }

    /// The batch about to step: each request's id, kind and job. None when tracing is off
    /// or the batch is empty (no step record then).
    pub fn batch<'j>(
        &self,
        running: impl Iterator<Item = (RequestId, &'static str, &'j DenoiseJob<'static>)>,
    ) -> Option<Vec<BatchEntry>> {
        if !self.tracer.enabled() {
            return None;
        }
        let batch: Vec<BatchEntry> = running
            .map(|(id, kind, job)| {
                let known = self.jobs.get(&id);
                BatchEntry {
                    id,
                    kind: kind.into(),
                    step: job.steps_done(),
                    steps: job.total_steps(),
                    mode: known.and_then(|j| j.mode).map(Into::into),
                    mask_ratio: known.and_then(|j| j.mask_ratio),
                    tokens: Some(job.step_tokens()),
                }
            })
            .collect();
        (!batch.is_empty()).then_some(batch)
    }

    /// Request `id` got its activation cache for `step` from the cache tiers, asking at
    /// `start`: a hit takes microseconds, a miss the wait for the load (the request's
    /// cache-loading time).
    pub fn cache_fetched(&self, id: RequestId, step: usize, start: Instant) {
        let t = &self.tracer;
        if !t.enabled() {
            return;
        }
        t.record(Record {
            kind: kinds::CACHE_LOAD.into(),
            requests: vec![id],
            step: Some(step),
            start_us: t.us(start),
            end_us: t.us(Instant::now()),
            ..Record::default()
        });
    }

    /// Planned a step whose caches (of `requests`) were only on disk: `units` leading UNet
    /// units recomputed, `bytes` read, `skipped` bytes spared.
    pub fn recompute_planned(
        &self,
        requests: Vec<RequestId>,
        units: usize,
        bytes: u64,
        skipped: u64,
    ) {
        let t = &self.tracer;
        if !t.enabled() {
            return;
        }
        let now = t.us(Instant::now());
        t.record(Record {
            kind: kinds::RECOMPUTE_PLAN.into(),
            requests,
            start_us: now,
            end_us: now,
            bytes: Some(bytes),
            recompute_units: Some(units),
            skipped_bytes: Some(skipped),
            ..Record::default()
        });
    }

    /// Handled a `Step` sent at `sent`: `batch` (from [`WorkerTrace::batch`]) ran one step
    /// from `start` to now.
    pub fn stepped(&self, sent: Instant, start: Instant, batch: Option<Vec<BatchEntry>>) {
        let t = &self.tracer;
        let Some(batch) = batch else { return };
        t.record(Record {
            kind: kinds::STEP.into(),
            requests: batch.iter().map(|b| b.id).collect(),
            batch,
            enqueued_us: Some(t.us(sent)),
            start_us: t.us(start),
            end_us: t.us(Instant::now()),
            ..Record::default()
        });
    }

    /// A request left the batch: finishing it (decoding) started at `start`, `result` is
    /// its answer, about to be sent.
    pub fn retired(
        &mut self,
        id: RequestId,
        kind: &str,
        steps_done: usize,
        start: Instant,
        result: &Reply,
    ) {
        let (outcome, error) = outcome(&result.as_ref());
        self.retire(id, kind, Some(steps_done), start, outcome, error);
    }

    /// A request left (the queue or the batch) because its caller went away.
    pub fn cancelled(&mut self, id: RequestId, kind: &str) {
        self.retire(id, kind, None, Instant::now(), "cancelled".into(), None);
    }

    fn retire(
        &mut self,
        id: RequestId,
        kind: &str,
        step: Option<usize>,
        start: Instant,
        outcome: String,
        error: Option<String>,
    ) {
        let t = &self.tracer;
        if !t.enabled() {
            return;
        }
        let end = Instant::now();
        let admitted = self.jobs.remove(&id).map(|j| j.admitted);
        t.record(Record {
            kind: kinds::RETIRE.into(),
            requests: vec![id],
            request_kind: Some(kind.into()),
            step,
            start_us: t.us(start),
            end_us: t.us(end),
            compute_us: admitted.map(|a| end.saturating_duration_since(a).as_micros() as u64),
            outcome: Some(outcome),
            error,
            ..Record::default()
        });
    }
}

/// A disk load of one step's activation cache (the cache manager's loader threads): its
/// template and step, bytes, and whether a worker was waiting for it (a miss) or it was a
/// prefetch. Per-request waits are the workers' `cache_load` records.
pub fn cache_loaded(t: &Tracer, event: &LoadEvent) {
    t.record(Record {
        kind: kinds::CACHE_LOAD.into(),
        step: Some(event.step),
        start_us: t.us(event.started),
        end_us: t.us(event.ended),
        outcome: Some(match (&event.error, event.demand) {
            (Some(_), _) => "failed".into(),
            (None, true) => "demand".into(),
            (None, false) => "prefetch".into(),
        }),
        error: event
            .error
            .as_ref()
            .map(|e| format!("template {} step {}: {e}", event.template, event.step)),
        template: Some(event.template.to_string()),
        bytes: Some(event.bytes),
        ..Record::default()
    });
}
