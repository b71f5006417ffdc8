//! A Worker owns one device's models and runs the batch there, in its own arbiter thread
//! (compute blocks that thread, so nothing else shares it). Its step loop is a message to
//! itself: each `Step` runs one denoising step of every request in the batch, then admits
//! waiting requests, then retires finished ones and answers their callers. New requests so
//! join after at most one step, and finished ones leave right after their last.
//!
//! Within one `Step` the batch's UNet calls are fused (`DenoiseJob::step_many`): cached-mode
//! edits run as one ragged masked forward over every request's active tokens, dense requests
//! of one latent shape as one batched forward. Admission is first come, first served, up to
//! `max_batch_requests` and `max_batch_tokens`.

use std::collections::{BTreeMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use actix::{Actor, ActorContext, AsyncContext, Context, Handler, Message};
use retouch_kernels::DType;
use retouch_models::nn::exec::StepCache;
use retouch_models::pipeline::{DenoiseJob, Pipeline, TemplateRef};
use tokio::sync::oneshot;

use super::balancer::{CalibrationPlan, Charge, ModelShape, Timings, time_worker};
use super::cache::StepWindow;
use super::progress::{ProgressBook, State};
use super::request::{Completed, EngineError, JobSpec, Reply, Request, RequestId};
use super::telemetry;
use super::trace::{Tracer, WorkerTrace};

/// When waiting requests may join the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchPolicy {
    /// Join after any step, up to the batch limit.
    Continuous,
    /// A batch runs to completion before the next one forms (for comparison).
    Static,
}

impl std::str::FromStr for BatchPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<BatchPolicy, String> {
        match s {
            "continuous" => Ok(BatchPolicy::Continuous),
            "static" => Ok(BatchPolicy::Static),
            other => Err(format!(
                "unknown batch policy `{other}` (expected continuous or static)"
            )),
        }
    }
}

/// A worker's load, shared with the scheduler (which admits and routes on it).
#[derive(Default, Debug)]
pub struct WorkerLoad {
    pub queued: AtomicUsize,
    pub running: AtomicUsize,
    /// Predicted microseconds of work left in queued and running requests: each request's
    /// [`Charge`], added when routed and taken off as it runs, so it never goes negative.
    work_us: AtomicU64,
    /// Active tokens times steps left, likewise.
    tokens: AtomicU64,
    /// Steps left summed over the charged requests (what fused steps must still cover).
    request_steps: AtomicU64,
    /// How many charged requests have each count of steps left: the longest one bounds the
    /// fused steps still to run from below.
    steps_left: Mutex<BTreeMap<u64, usize>>,
}

impl WorkerLoad {
    pub fn add(&self, charge: &Charge) {
        self.work_us.fetch_add(charge.work_us(), Ordering::Relaxed);
        self.tokens.fetch_add(charge.tokens(), Ordering::Relaxed);
        self.request_steps
            .fetch_add(charge.steps_left, Ordering::Relaxed);
        self.count_steps_left(charge.steps_left, None);
    }

    /// Moves one request in the steps-left histogram from `from` (None: a new request) to
    /// `to` (0: it no longer counts).
    fn count_steps_left(&self, to: u64, from: Option<u64>) {
        let mut counts = self
            .steps_left
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(from) = from
            && let Some(n) = counts.get_mut(&from)
        {
            *n -= 1;
            if *n == 0 {
                counts.remove(&from);
            }
        }
        if to > 0 {
            *counts.entry(to).or_default() += 1;
        }
    }

    /// The most steps any charged request has left.
    fn longest_steps_left(&self) -> u64 {
        let counts = self
            .steps_left
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        counts.keys().next_back().copied().unwrap_or(0)
    }

    /// One step of the charged request ran.
    pub fn step_done(&self, charge: &mut Charge) {
        if charge.steps_left > 0 {
            charge.steps_left -= 1;
            self.work_us.fetch_sub(charge.step_us, Ordering::Relaxed);
            self.tokens.fetch_sub(charge.step_tokens, Ordering::Relaxed);
            self.request_steps.fetch_sub(1, Ordering::Relaxed);
            self.count_steps_left(charge.steps_left, Some(charge.steps_left + 1));
        }
    }

    /// The charged request left the worker: whatever it had left comes off.
    pub fn release(&self, charge: &mut Charge) {
        self.work_us.fetch_sub(charge.work_us(), Ordering::Relaxed);
        self.tokens.fetch_sub(charge.tokens(), Ordering::Relaxed);
        self.request_steps
            .fetch_sub(charge.steps_left, Ordering::Relaxed);
        self.count_steps_left(0, Some(charge.steps_left));
        *charge = Charge::default();
    }

    /// Fused steps the worker still has to run if a request of `steps` steps joined: at
    /// least the new request's own, at least the longest charged request's, and at least
    /// the request-steps spread over full batches of `max_batch`.
    pub fn steps_ahead_with(&self, steps: u64, max_batch: usize) -> u64 {
        let total = self.request_steps.load(Ordering::Relaxed) + steps;
        steps
            .max(self.longest_steps_left())
            .max(total.div_ceil(max_batch.max(1) as u64))
    }

    /// Predicted seconds of work left.
    pub fn work_s(&self) -> f64 {
        self.work_us.load(Ordering::Relaxed) as f64 * 1e-6
    }

    pub fn tokens(&self) -> u64 {
        self.tokens.load(Ordering::Relaxed)
    }
}

pub struct WorkerSettings {
    pub index: usize,
    pub policy: BatchPolicy,
    pub max_batch_requests: usize,
    /// Latent tokens per step the batch may hold (`JobSpec::step_tokens`); None: no limit.
    pub max_batch_tokens: Option<usize>,
    /// The dtype templates record their activation cache in.
    pub cache_dtype: DType,
    /// A thread pool of its own, so several CPU workers split the cores; None uses the
    /// global pool.
    pub threads: Option<usize>,
}

pub struct Worker {
    settings: WorkerSettings,
    pipe: Pipeline,
    pool: Option<rayon::ThreadPool>,
    waiting: VecDeque<Request>,
    running: Vec<Running>,
    load: Arc<WorkerLoad>,
    progress: Arc<ProgressBook>,
    /// A `Step` message is pending.
    step_pending: bool,
    trace: WorkerTrace,
}

struct Running {
    id: RequestId,
    kind: &'static str,
    reply: oneshot::Sender<Reply>,
    job: DenoiseJob<'static>,
    /// A cached-mode edit's view of its template's activation cache.
    cache: Option<StepWindow>,
    submitted: Instant,
    admitted: Instant,
    failure: Option<EngineError>,
    charge: Charge,
}

impl Worker {
    pub fn new(
        settings: WorkerSettings,
        pipe: Pipeline,
        load: Arc<WorkerLoad>,
        progress: Arc<ProgressBook>,
    ) -> Result<Worker, String> {
        let pool = match settings.threads {
            Some(n) => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n.max(1))
                    .thread_name(move |i| format!("retouch-worker-{i}"))
                    .build()
                    .map_err(|e| format!("worker thread pool: {e}"))?,
            ),
            None => None,
        };
        Ok(Worker {
            settings,
            pipe,
            pool,
            waiting: VecDeque::new(),
            running: Vec::new(),
            load,
            progress,
            step_pending: false,
            trace: WorkerTrace::default(),
        })
    }

    /// Records this worker's messages and work with `tracer`.
    pub fn traced(mut self, tracer: &Tracer) -> Worker {
        self.trace = WorkerTrace::new(tracer, self.settings.index);
        self
    }

    fn kick(&mut self, ctx: &mut Context<Self>) {
        if !self.step_pending {
            self.step_pending = true;
            ctx.notify(Step(Instant::now()));
        }
    }

    /// Runs compute on the worker's pool; a panic fails only the work that raised it.
    fn compute<T>(
        &self,
        f: impl FnOnce(&Pipeline) -> retouch_models::Result<T> + Send,
    ) -> Result<T, EngineError>
    where
        T: Send,
    {
        let pipe = &self.pipe;
        let run = move || catch_unwind(AssertUnwindSafe(|| f(pipe)));
        let result = match &self.pool {
            Some(pool) => pool.install(run),
            None => run(),
        };
        match result {
            Ok(r) => r.map_err(EngineError::from_model),
            Err(panic) => Err(EngineError::Failed(panic_message(&panic))),
        }
    }

    /// Times this worker for the cost model (on its own pool, as requests will run).
    pub fn calibrate(
        &self,
        shape: &ModelShape,
        plan: &CalibrationPlan,
    ) -> Result<Timings, EngineError> {
        self.compute(|pipe| time_worker(pipe, shape, plan))
    }

    fn gauges(&self) {
        let worker = self.settings.index.to_string();
        metrics::gauge!(telemetry::QUEUE_DEPTH, "worker" => worker.clone())
            .set(self.waiting.len() as f64);
        metrics::gauge!(telemetry::BATCH_REQUESTS, "worker" => worker)
            .set(self.running.len() as f64);
    }

    /// One step of every request in the batch, their UNet calls fused.
    fn step_batch(&mut self) {
        if self.running.is_empty() {
            return;
        }
        let started = Instant::now();
        let mut running = std::mem::take(&mut self.running);
        // Each cached edit's activations for this step, from the cache tiers (a miss waits
        // for its load); a failed load fails only its request.
        let mut live: Vec<&mut Running> = Vec::new();
        let mut caches: Vec<Option<Arc<StepCache>>> = Vec::new();
        for r in running.iter_mut().filter(|r| r.failure.is_none()) {
            let cache = match (&r.cache, r.job.cache_step()) {
                (Some(window), Some(step)) => {
                    let waited = Instant::now();
                    let fetched = window.fetch(step);
                    self.trace.cache_fetched(r.id, step, waited);
                    match fetched {
                        Ok(cache) => Some(cache),
                        Err(e) => {
                            r.failure = Some(e);
                            continue;
                        }
                    }
                }
                _ => None,
            };
            caches.push(cache);
            live.push(r);
        }
        let caches: Vec<Option<&StepCache>> = caches.iter().map(|c| c.as_deref()).collect();
        let before: Vec<usize> = live.iter().map(|r| r.job.steps_done()).collect();
        let fused = {
            let mut jobs: Vec<&mut DenoiseJob<'static>> =
                live.iter_mut().map(|r| &mut r.job).collect();
            self.compute(|pipe| Ok(DenoiseJob::step_many_with_caches(pipe, &mut jobs, &caches)))
        };
        let results: Vec<Result<(), EngineError>> = match fused {
            Ok(results) => results
                .into_iter()
                .map(|r| r.map_err(EngineError::from_model))
                .collect(),
            // The fused call panicked: step alone each request it had not stepped yet (a
            // job changes only when its step completes), so only the culprit fails.
            Err(_) => live
                .iter_mut()
                .zip(&before)
                .zip(&caches)
                .map(|((r, &before), &cache)| {
                    if r.job.steps_done() > before {
                        Ok(())
                    } else {
                        self.compute(|pipe| r.job.step_with_cache(pipe, cache))
                    }
                })
                .collect(),
        };
        for (r, result) in live.into_iter().zip(results) {
            match result {
                Ok(()) => {
                    self.load.step_done(&mut r.charge);
                    let done = r.job.steps_done();
                    if let Some(window) = &mut r.cache {
                        window.advance(done);
                    }
                    self.progress.update(r.id, |p| p.steps_done = done);
                }
                Err(e) => r.failure = Some(e),
            }
        }
        let stepped = running.len();
        self.running = running;
        let worker = self.settings.index.to_string();
        metrics::histogram!(telemetry::STEP_SECONDS, "worker" => worker)
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!(telemetry::STEP_BATCH).record(stepped as f64);
    }

    /// Whether `req` may join a batch already holding `staying` requests of `tokens` tokens
    /// per step. Past the token limit the head of the queue waits and nothing overtakes it
    /// (first come, first served); into an empty batch it is admitted whatever its size, so
    /// nothing starves.
    fn fits(&self, req: &Request, tokens: usize, staying: usize) -> bool {
        let Some(limit) = self.settings.max_batch_tokens else {
            return true;
        };
        // A request whose cost cannot be computed fails when its job is built.
        let cost = req.spec.step_tokens(&self.pipe).unwrap_or(0);
        staying == 0 || tokens.saturating_add(cost) <= limit
    }

    fn admit(&mut self) {
        let room = match self.settings.policy {
            BatchPolicy::Continuous => self.settings.max_batch_requests,
            BatchPolicy::Static if self.running.is_empty() => self.settings.max_batch_requests,
            BatchPolicy::Static => 0,
        };
        // The requests that step next and their tokens (those retiring after this step
        // do not count).
        let staying =
            |r: &&Running| r.failure.is_none() && !r.job.is_done() && !r.reply.is_closed();
        let mut staying_count = self.running.iter().filter(staying).count();
        let mut tokens: usize = self
            .running
            .iter()
            .filter(staying)
            .map(|r| r.job.step_tokens())
            .sum();
        while self.running.len() < room {
            let Some(mut req) = self.waiting.pop_front() else {
                break;
            };
            let kind = req.spec.kind();
            if req.reply.is_closed() {
                self.load.queued.fetch_sub(1, Ordering::Relaxed);
                self.load.release(&mut req.charge);
                self.cancelled(req.id, kind);
                continue;
            }
            if !self.fits(&req, tokens, staying_count) {
                self.waiting.push_front(req);
                break;
            }
            self.load.queued.fetch_sub(1, Ordering::Relaxed);
            let cache_dtype = self.settings.cache_dtype;
            let start = self.trace.admitting(&req);
            let mut window = None;
            let job = match req.spec {
                JobSpec::Generate(g) => self.compute(|pipe| DenoiseJob::generate(pipe, &g)),
                JobSpec::Template(spec) => {
                    self.compute(|pipe| DenoiseJob::template(pipe, &spec, Some(cache_dtype)))
                }
                JobSpec::Edit {
                    template,
                    cache,
                    mask,
                    req: edit,
                    ..
                } => {
                    let external = cache.is_some();
                    window = cache.map(|lease| lease.start(self.settings.index));
                    self.compute(|pipe| {
                        let template = TemplateRef::Shared(template);
                        if external {
                            DenoiseJob::edit_with_external_cache(pipe, template, &mask, &edit)
                        } else {
                            DenoiseJob::edit(pipe, template, &mask, &edit)
                        }
                    })
                }
            };
            let admitted = job.as_ref().map(|_| ());
            self.trace
                .admitted(req.id, kind, req.submitted, start, admitted);
            match job {
                Ok(job) => {
                    let (index, total) = (self.settings.index, job.total_steps());
                    self.progress.update(req.id, |p| {
                        p.state = State::Running;
                        p.worker = Some(index);
                        p.steps_total = total;
                    });
                    self.load.running.fetch_add(1, Ordering::Relaxed);
                    tokens = tokens.saturating_add(job.step_tokens());
                    staying_count += 1;
                    self.running.push(Running {
                        id: req.id,
                        kind,
                        reply: req.reply,
                        job,
                        cache: window,
                        submitted: req.submitted,
                        admitted: Instant::now(),
                        failure: None,
                        charge: req.charge,
                    });
                }
                Err(e) => {
                    self.load.release(&mut req.charge);
                    self.answer(req.id, kind, req.submitted, req.reply, Err(e));
                }
            }
        }
    }

    /// Answers finished, failed and abandoned requests and drops them from the batch.
    fn retire(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            let r = &self.running[i];
            let leave = r.failure.is_some() || r.job.is_done() || r.reply.is_closed();
            if !leave {
                i += 1;
                continue;
            }
            let mut r = self.running.swap_remove(i);
            // Its pins go before the reply does, so a caller sees the tiers settled.
            r.cache = None;
            self.load.running.fetch_sub(1, Ordering::Relaxed);
            self.load.release(&mut r.charge);
            if r.reply.is_closed() {
                self.cancelled(r.id, r.kind);
                continue;
            }
            let (start, steps) = (Instant::now(), r.job.steps_done());
            let reply = match r.failure {
                Some(e) => Err(e),
                None => {
                    let job = r.job;
                    self.compute(move |pipe| job.finish(pipe))
                        .map(|output| Completed {
                            output,
                            worker: self.settings.index,
                            queue_ms: ms(r.admitted - r.submitted),
                            compute_ms: ms(r.admitted.elapsed()),
                        })
                }
            };
            self.trace.retired(r.id, r.kind, steps, start, &reply);
            self.answer(r.id, r.kind, r.submitted, r.reply, reply);
        }
    }

    fn answer(
        &self,
        id: RequestId,
        kind: &'static str,
        submitted: Instant,
        reply: oneshot::Sender<Reply>,
        result: Reply,
    ) {
        let (state, outcome, error) = match &result {
            Ok(_) => (State::Done, "ok", None),
            Err(e @ EngineError::Invalid(_)) => (State::Failed, "invalid", Some(e.to_string())),
            Err(e) => (State::Failed, "failed", Some(e.to_string())),
        };
        self.progress.update(id, |p| {
            p.state = state;
            p.error = error;
        });
        telemetry::count(kind, outcome);
        metrics::histogram!(telemetry::REQUEST_SECONDS, "kind" => kind)
            .record(submitted.elapsed().as_secs_f64());
        // The caller may have gone meanwhile; nothing to do then.
        let _ = reply.send(result);
    }

    fn cancelled(&mut self, id: RequestId, kind: &'static str) {
        self.trace.cancelled(id, kind);
        self.progress.update(id, |p| p.state = State::Cancelled);
        telemetry::count(kind, "cancelled");
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("panicked: {what}")
}

impl Actor for Worker {
    type Context = Context<Self>;
}

/// A request routed to this worker by the scheduler (already counted in `load.queued`),
/// and when it was sent.
pub struct Enqueue(pub Request, pub Instant);

impl Message for Enqueue {
    type Result = ();
}

impl Handler<Enqueue> for Worker {
    type Result = ();
    fn handle(&mut self, msg: Enqueue, ctx: &mut Context<Self>) {
        let (start, id) = (Instant::now(), msg.0.id);
        self.waiting.push_back(msg.0);
        self.gauges();
        self.kick(ctx);
        self.trace.enqueued(id, msg.1, start);
    }
}

/// The step loop's message to itself, and when it was sent.
struct Step(Instant);

impl Message for Step {
    type Result = ();
}

impl Handler<Step> for Worker {
    type Result = ();
    fn handle(&mut self, step: Step, ctx: &mut Context<Self>) {
        self.step_pending = false;
        let running = self.running.iter().filter(|r| r.failure.is_none());
        let batch = self.trace.batch(running.map(|r| (r.id, r.kind, &r.job)));
        let start = Instant::now();
        self.step_batch();
        self.trace.stepped(step.0, start, batch);
        self.admit();
        self.retire();
        self.gauges();
        if !self.running.is_empty() || !self.waiting.is_empty() {
            self.kick(ctx);
        }
    }
}

/// Stops the worker after the current step. Its step loop keeps the actor busy, so this
/// message (handled between steps) is how an engine stops it rather than the arbiter alone.
pub struct Stop;

impl Message for Stop {
    type Result = ();
}

impl Handler<Stop> for Worker {
    type Result = ();
    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

/// Answers requests still waiting or running when the worker stops.
impl Drop for Worker {
    fn drop(&mut self) {
        let stopped = || Err(EngineError::Unavailable("the worker stopped".into()));
        for mut req in self.waiting.drain(..) {
            self.load.release(&mut req.charge);
            let _ = req.reply.send(stopped());
        }
        for mut r in self.running.drain(..) {
            self.load.release(&mut r.charge);
            let _ = r.reply.send(stopped());
        }
    }
}

#[cfg(test)]
mod tests;
