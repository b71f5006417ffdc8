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
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use actix::{Actor, ActorContext, AsyncContext, Context, Handler, Message};
use retouch_kernels::DType;
use retouch_models::nn::exec::{StepCache, StreamingStep};
use retouch_models::pipeline::{DenoiseJob, Pipeline, StepCacheSource, TemplateRef};
use retouch_models::unet::UnitTimes;
use tokio::sync::oneshot;

use super::balancer::{CalibrationPlan, Charge, ModelShape, Timings, time_worker};
use super::cache::StepWindow;
use super::progress::{ProgressBook, State};
use super::recompute::{self, UnitCosts};
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
    /// Bytes per second of reading a template's cache from disk, for the load-or-recompute
    /// plan (the cost model's).
    pub load_bytes_per_s: f64,
    /// Follow the load-or-recompute plan on misses (else wait for the load).
    pub recompute_plan: bool,
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
    /// Per-unit UNet costs measured on this worker's forwards (the plan's compute side).
    unit_costs: UnitCosts,
    /// Bytes per second of this worker's partial reads of step files (the plan's load side):
    /// the cost model's figure, then an average over the reads made.
    load_bytes_per_s: f64,
}

/// Where a running request's activations for this step come from.
enum Source {
    /// From a memory tier.
    Ready(Arc<StepCache>),
    /// Only on disk: a miss.
    Disk(usize),
    /// Not a cached edit (or the template's own cache).
    Own,
}

/// The unit times of the pipeline's last whole forward, taken: on a GPU worker those the
/// device measured (its template recordings run on the host, and their times are not its
/// dense costs), else the host's.
fn take_unit_times(pipe: &Pipeline) -> Option<UnitTimes> {
    match pipe.gpu() {
        Some(_) => {
            let _ = pipe.unet.take_unit_times();
            pipe.unet.take_device_unit_times().ok().flatten()
        }
        None => pipe.unet.take_unit_times(),
    }
}

/// A miss plan as the worker follows it.
struct MissPlan {
    /// Leading UNet units run densely.
    recompute: usize,
    /// The first cache entry read, and the end of a step's entries.
    first: usize,
    end: usize,
    /// Bytes read, and bytes the recomputed units spared.
    bytes: u64,
    skipped: u64,
    /// The requests whose steps were on disk.
    requests: Vec<RequestId>,
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
        // Only the plan reads a GPU walk's per-unit times: without it, no timing events.
        pipe.unet
            .set_device_unit_timing(settings.recompute_plan && pipe.gpu().is_some());
        Ok(Worker {
            load_bytes_per_s: settings.load_bytes_per_s,
            settings,
            pipe,
            pool,
            waiting: VecDeque::new(),
            running: Vec::new(),
            load,
            progress,
            step_pending: false,
            trace: WorkerTrace::default(),
            unit_costs: UnitCosts::default(),
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

    /// Times this worker for the cost model (on its own pool, as requests will run). With
    /// the load-or-recompute plan on, the timed steps' unit times also seed the plan's unit
    /// costs, so a worker has dense costs before its first miss (a GPU worker may never run
    /// a dense forward on the device otherwise: its template recordings run on the host).
    pub fn calibrate(
        &mut self,
        shape: &ModelShape,
        plan: &CalibrationPlan,
    ) -> Result<Timings, EngineError> {
        let mut observed = Vec::new();
        let learn = self.settings.recompute_plan;
        let timings = self.compute(|pipe| {
            time_worker(pipe, shape, plan, &mut |pipe| {
                if learn {
                    observed.extend(take_unit_times(pipe));
                }
            })
        })?;
        for times in &observed {
            self.unit_costs.observe(times);
        }
        Ok(timings)
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
        // Each cached edit's activations for this step from memory; a step only on disk is
        // a miss, which the load-or-recompute plan hides behind a dense prefix of units or
        // (without a plan) waits for. A failed load fails only its request.
        let mut live: Vec<&mut Running> = Vec::new();
        let mut sources: Vec<Source> = Vec::new();
        for r in running.iter_mut().filter(|r| r.failure.is_none()) {
            let source = match (&r.cache, r.job.cache_step()) {
                (Some(window), Some(step)) => {
                    let looked = Instant::now();
                    match window.try_fetch(step) {
                        Ok(Some(cache)) => {
                            self.trace.cache_fetched(r.id, step, looked);
                            Source::Ready(cache)
                        }
                        Ok(None) => Source::Disk(step),
                        Err(e) => {
                            r.failure = Some(e);
                            continue;
                        }
                    }
                }
                _ => Source::Own,
            };
            sources.push(source);
            live.push(r);
        }
        let mut plan = self.plan_misses(&live, &sources);
        if let Some(p) = plan.as_ref().filter(|p| p.recompute == 0) {
            // Nothing to recompute: the steps load whole, into the tiers, as plain misses.
            self.record_plan(p);
            plan = None;
        }
        if plan.is_none() {
            // No plan, or one that waits: each missing step loads whole, as a plain miss.
            for (r, source) in live.iter_mut().zip(sources.iter_mut()) {
                let (Source::Disk(step), Some(window)) = (&*source, &r.cache) else {
                    continue;
                };
                let waited = Instant::now();
                let fetched = window.fetch(*step);
                self.trace.cache_fetched(r.id, *step, waited);
                *source = match fetched {
                    Ok(cache) => {
                        let bytes = cache.size_in_bytes() as u64;
                        self.observe_reads(&[(bytes, waited.elapsed().as_secs_f64())]);
                        Source::Ready(cache)
                    }
                    Err(e) => {
                        r.failure = Some(e);
                        Source::Own
                    }
                };
            }
        }
        // A request whose load failed does not step (its failure is its answer).
        let (mut live, sources): (Vec<&mut Running>, Vec<Source>) = live
            .into_iter()
            .zip(sources)
            .filter(|(r, _)| r.failure.is_none())
            .unzip();
        let before: Vec<usize> = live.iter().map(|r| r.job.steps_done()).collect();
        let recompute = plan.as_ref().map_or(0, |p| p.recompute);
        let (first, end) = plan.as_ref().map_or((0, 0), |p| (p.first, p.end));
        // Per request: the entries streaming in, and how its read ended.
        let streams: Vec<StreamingStep> = live
            .iter()
            .map(|_| StreamingStep::new(first, end))
            .collect();
        let read_ends: Vec<OnceLock<Result<u64, String>>> =
            live.iter().map(|_| OnceLock::new()).collect();
        let dtype = self.settings.cache_dtype;
        let reads: Mutex<Vec<(u64, f64)>> = Mutex::new(Vec::new());
        let fused = std::thread::scope(|scope| {
            // Each request's job (stepped) apart from its window and id (read by loaders).
            let mut parts: Vec<(&mut DenoiseJob<'static>, Option<&StepWindow>, RequestId)> = live
                .iter_mut()
                .map(|r| (&mut r.job, r.cache.as_ref(), r.id))
                .collect();
            let mut given: Vec<Option<StepCacheSource<'_>>> = Vec::with_capacity(parts.len());
            for (((part, source), stream), read_end) in
                parts.iter().zip(&sources).zip(&streams).zip(&read_ends)
            {
                let &(_, window, id) = part;
                given.push(match source {
                    Source::Ready(cache) => Some(StepCacheSource::Shared(cache)),
                    // A plan that recomputes every unit reads nothing.
                    Source::Disk(_) if first == end => Some(StepCacheSource::Streaming {
                        step: stream,
                        dtype,
                    }),
                    Source::Disk(step) => {
                        let step = *step;
                        let (trace, reads) = (&self.trace, &reads);
                        scope.spawn(move || {
                            let started = Instant::now();
                            let read = catch_unwind(AssertUnwindSafe(|| match window {
                                Some(w) => w.stream_from(step, first, stream),
                                None => Err("no cache window".to_string()),
                            }))
                            .unwrap_or_else(|p| Err(panic_message(&p)));
                            // The forward waits on the stream: no entry may stay pending.
                            if let Err(e) = &read {
                                stream.fail_rest(e);
                            }
                            trace.cache_fetched(id, step, started);
                            if let Ok(bytes) = &read {
                                let secs = started.elapsed().as_secs_f64();
                                reads
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .push((*bytes, secs));
                            }
                            let _ = read_end.set(read);
                        });
                        Some(StepCacheSource::Streaming {
                            step: stream,
                            dtype,
                        })
                    }
                    _ => None,
                });
            }
            // A GPU worker uploads its edits' next steps while this one computes.
            if self.pipe.gpu().is_some() {
                let ahead = parts
                    .iter()
                    .filter_map(|(job, window, _)| window.as_ref()?.peek(job.next_cache_step()?))
                    .collect();
                self.pipe.prefetch_device_steps(ahead);
            }
            let mut jobs: Vec<&mut DenoiseJob<'static>> =
                parts.iter_mut().map(|p| &mut *p.0).collect();
            self.compute(|pipe| {
                Ok(DenoiseJob::step_many_with_sources(
                    pipe, &mut jobs, &given, recompute,
                ))
            })
        });
        let reads = reads.into_inner().unwrap_or_else(|p| p.into_inner());
        self.learn_costs(&reads, plan.as_ref());
        let results: Vec<Result<(), EngineError>> = match fused {
            Ok(results) => results
                .into_iter()
                .map(|r| r.map_err(EngineError::from_model))
                .collect(),
            // The fused call panicked: step alone each request it had not stepped yet (a
            // job changes only when its step completes), so only the culprit fails. A step
            // read in part for the plan is fetched whole for this.
            Err(_) => live
                .iter_mut()
                .zip(&before)
                .zip(&sources)
                .map(|((r, &before), source)| {
                    if r.job.steps_done() > before {
                        return Ok(());
                    }
                    let cache = match (source, &r.cache) {
                        (Source::Ready(cache), _) => Some(Arc::clone(cache)),
                        (Source::Disk(step), Some(window)) => Some(window.fetch(*step)?),
                        _ => None,
                    };
                    self.compute(|pipe| r.job.step_with_cache(pipe, cache.as_deref()))
                })
                .collect(),
        };
        // A step that failed after its planned read failed fails as a load failure (as a
        // plain miss would), whatever error the forward that waited for it reported.
        let results = results
            .into_iter()
            .zip(&read_ends)
            .map(|(result, read_end)| match (result, read_end.get()) {
                (Err(_), Some(Err(e))) => Err(EngineError::Failed(e.clone())),
                (result, _) => result,
            });
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
        if let Some(dev) = self.pipe.gpu() {
            // Memory the device holds idle between steps: bounded by the pools' budgets.
            for (pool, bytes) in [
                ("tensors", dev.pooled_free_bytes()),
                ("staging", dev.staging_free_bytes()),
            ] {
                metrics::gauge!(telemetry::DEVICE_IDLE_BYTES, "worker" => worker.clone(), "pool" => pool)
                    .set(bytes as f64);
            }
        }
        metrics::histogram!(telemetry::STEP_SECONDS, "worker" => worker)
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!(telemetry::STEP_BATCH).record(stepped as f64);
    }

    /// The load-or-recompute plan for this step's misses (steps only on disk), from the
    /// unit costs this worker measured and the bytes still to read; None when nothing is
    /// missing, or before the worker has timed a dense and a masked forward.
    fn plan_misses(&self, live: &[&mut Running], sources: &[Source]) -> Option<MissPlan> {
        if !self.settings.recompute_plan || !sources.iter().any(|s| matches!(s, Source::Disk(_))) {
            return None;
        }
        let starts = self.pipe.unet.entry_starts().ok()?;
        let units = starts.len().checked_sub(1)?;
        let (mut samples, mut rows, mut positions) = (0, 0, 0);
        let mut bytes = vec![0u64; units];
        let mut requests = Vec::new();
        for (r, source) in live.iter().zip(sources) {
            if matches!(source, Source::Own) {
                continue;
            }
            samples += r.job.branches();
            rows += r.job.step_tokens();
            positions = r.job.latent_positions();
            if let (Source::Disk(_), Some(window)) = (source, &r.cache) {
                requests.push(r.id);
                let unit = recompute::unit_bytes(&window.entry_bytes()?, starts);
                bytes.iter_mut().zip(unit).for_each(|(b, u)| *b += u);
            }
        }
        let (dense, masked) = self.unit_costs.predict(samples, rows, positions)?;
        let load: Vec<f64> = bytes
            .iter()
            .map(|&b| b as f64 / self.load_bytes_per_s.max(1.0))
            .collect();
        // A CPU worker's threads compute on the host's cores, which its reads share; a GPU
        // worker's kernels run while its host threads read and upload.
        let overlap = match self.pipe.gpu() {
            Some(_) => recompute::Overlap::Parallel,
            None => recompute::Overlap::Shared,
        };
        let plan = recompute::plan(&dense, &masked, &load, overlap);
        let skipped = bytes[..plan.recompute].iter().sum();
        Some(MissPlan {
            first: starts[plan.recompute],
            end: starts[units],
            recompute: plan.recompute,
            bytes: bytes.iter().sum::<u64>() - skipped,
            skipped,
            requests,
        })
    }

    /// Folds this step's measurements in: the UNet's unit times, and the bandwidth of the
    /// partial reads (`(bytes, seconds)` each) a plan made.
    fn learn_costs(&mut self, reads: &[(u64, f64)], plan: Option<&MissPlan>) {
        if !self.settings.recompute_plan {
            return;
        }
        if let Some(times) = take_unit_times(&self.pipe) {
            self.unit_costs.observe(&times);
        }
        self.observe_reads(reads);
        if let Some(plan) = plan {
            self.record_plan(plan);
        }
    }

    /// Folds reads that ran together (`(bytes, seconds)` each: their bytes moved in the
    /// longest one's time) into the load bandwidth.
    fn observe_reads(&mut self, reads: &[(u64, f64)]) {
        // Without the plan nothing reads the costs: keep them off the step's path.
        if !self.settings.recompute_plan {
            return;
        }
        let bytes: u64 = reads.iter().map(|r| r.0).sum();
        let secs = reads.iter().map(|r| r.1).fold(0.0, f64::max);
        if bytes > 0 && secs > 0.0 {
            let measured = bytes as f64 / secs;
            self.load_bytes_per_s += 0.3 * (measured - self.load_bytes_per_s);
        }
    }

    /// Counts and traces a plan the worker followed.
    fn record_plan(&self, plan: &MissPlan) {
        let worker = self.settings.index.to_string();
        metrics::counter!(telemetry::RECOMPUTED_UNITS, "worker" => worker.clone())
            .increment(plan.recompute as u64);
        metrics::counter!(telemetry::CACHE_BYTES_SKIPPED, "worker" => worker)
            .increment(plan.skipped);
        self.trace.recompute_planned(
            plan.requests.clone(),
            plan.recompute,
            plan.bytes,
            plan.skipped,
        );
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
            let first_step = req.spec.first_step();
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
                    window = cache.map(|lease| lease.start(self.settings.index, first_step));
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
