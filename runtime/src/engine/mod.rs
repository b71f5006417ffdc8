//! The serving engine: workers (one per device, each owning its models), a scheduler that
//! admits and routes requests, a template store, the cache manager that moves templates'
//! activation caches between tiers, and per-request progress. [`Engine`] is the handle the
//! HTTP layer (or an embedding app) holds.

pub mod balancer;
pub mod cache;
pub mod progress;
pub mod recompute;
pub mod request;
pub mod scheduler;
pub mod telemetry;
pub mod templates;
pub mod trace;
pub mod worker;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use actix::{Actor, Addr, Arbiter};
use metrics_exporter_prometheus::PrometheusHandle;
use retouch_kernels::cuda::{AttentionKernel, GemmBackend};
use retouch_kernels::{DType, Device};
use retouch_models::pipeline::Pipeline;
use tokio::sync::oneshot;

pub use balancer::{Balancer, CacheResidency, CalibrationPlan, CostModel, Routing};
pub use cache::{CacheConfig, CacheLease, CacheManager, LoadEvent, StepWindow, Tier};
pub use progress::{ProgressBook, RequestProgress, State};
pub use request::{Completed, EngineError, JobSpec, Request, RequestId};
pub use scheduler::{Scheduler, Submit, WorkerSlot};
pub use templates::TemplateStore;
pub use trace::Tracer;
pub use worker::{BatchPolicy, Worker, WorkerLoad, WorkerSettings};

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub model_dir: PathBuf,
    /// Weight variant (e.g. `fp16`), as `Pipeline::load` takes it.
    pub variant: Option<String>,
    /// One worker per entry; only `Device::Cpu` exists so far.
    pub devices: Vec<Device>,
    /// Threads per worker's own pool; None shares the global pool.
    pub threads_per_worker: Option<usize>,
    pub policy: BatchPolicy,
    pub routing: Routing,
    /// Start-up timing of each worker for the cost model (only with `Routing::Cost` and
    /// several workers, where it decides something); None assumes a FLOPs-only model.
    pub calibration: Option<CalibrationPlan>,
    /// Bytes per second at which a template's cache loads onto a worker; None measures it
    /// at start-up (when calibrating) by reading the UNet's weights.
    pub load_bandwidth: Option<f64>,
    pub max_batch_requests: usize,
    /// Latent tokens per step a batch may hold (each request's active latent positions,
    /// all of them when dense, times its guidance branches); None: no limit.
    pub max_batch_tokens: Option<usize>,
    /// Requests waiting per worker before new ones are refused.
    pub max_queue: usize,
    /// Where templates are kept on disk; None keeps them in memory only (then the host
    /// budget is counted but not enforced: the host tier holds the only copy).
    pub cache_dir: Option<PathBuf>,
    pub cache_dtype: DType,
    /// Activation-cache budget in host memory, shared by the workers.
    pub cache_host_bytes: u64,
    /// Activation-cache budget of each worker's device tier.
    pub cache_device_bytes: u64,
    /// The attention kernel of GPU workers.
    pub attention: AttentionKernel,
    /// The GEMMs of GPU workers' linear layers and convolutions.
    pub gemm: GemmBackend,
    /// Steps of a cached edit's template loaded ahead of the step it is at.
    pub prefetch_steps: usize,
    /// Threads loading step caches from disk.
    pub cache_loaders: usize,
    /// A cached step whose activations are only on disk follows the load-or-recompute plan
    /// (a dense prefix of UNet units while the rest streams in); off (the default): it waits
    /// for the load. Off by default because on CPU workers it measured slower than waiting
    /// (docs/replay.md, "Misses").
    pub recompute_plan: bool,
    /// Largest JSON body the HTTP routes accept.
    pub max_body_bytes: usize,
    /// Finished requests whose progress stays readable.
    pub keep_progress: usize,
    /// Write a JSONL trace of every actor message here (`tools/actor-trace` reads it).
    pub trace: Option<PathBuf>,
}

impl EngineConfig {
    pub fn new(model_dir: impl Into<PathBuf>) -> EngineConfig {
        EngineConfig {
            model_dir: model_dir.into(),
            variant: None,
            devices: vec![Device::Cpu],
            threads_per_worker: None,
            policy: BatchPolicy::Continuous,
            routing: Routing::Cost,
            calibration: Some(CalibrationPlan::default()),
            load_bandwidth: None,
            max_batch_requests: 8,
            max_batch_tokens: None,
            max_queue: 64,
            cache_dir: None,
            cache_dtype: DType::F16,
            cache_host_bytes: CacheConfig::default().host_bytes,
            cache_device_bytes: CacheConfig::default().device_bytes,
            attention: AttentionKernel::Flash,
            gemm: GemmBackend::Kernels,
            prefetch_steps: CacheConfig::default().prefetch_steps,
            cache_loaders: CacheConfig::default().loaders,
            recompute_plan: false,
            max_body_bytes: 16 << 20,
            keep_progress: 4096,
            trace: None,
        }
    }
}

/// What the engine learned from its model at start-up, for defaults and validation.
#[derive(Clone, Copy, Debug)]
pub struct ModelInfo {
    /// The image size the model was trained at.
    pub native_size: usize,
}

/// One cost model per worker: workers of one device kind (they share the thread count) get
/// the fit of their pooled timings; without timings, the assumed model.
fn pooled_cost_models(
    devices: &[Device],
    timings: &[(Device, balancer::Timings)],
    bandwidth: f64,
) -> Result<Vec<CostModel>, String> {
    devices
        .iter()
        .map(|device| {
            let kind: Vec<_> = timings
                .iter()
                .filter(|(d, _)| d == device)
                .map(|(_, t)| t.clone())
                .collect();
            if kind.is_empty() {
                return Ok(CostModel {
                    load_bytes_per_s: bandwidth,
                    ..CostModel::assumed()
                });
            }
            balancer::fit_workers(&kind, bandwidth)
                .map_err(|e| format!("fitting the cost model of {device:?} workers: {e}"))
        })
        .collect()
}

/// A cheap, cloneable handle to a running engine.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    config: EngineConfig,
    model: ModelInfo,
    scheduler: Addr<Scheduler>,
    loads: Vec<Arc<WorkerLoad>>,
    workers: Vec<Addr<Worker>>,
    cost_models: Vec<CostModel>,
    templates: Arc<TemplateStore>,
    cache: CacheManager,
    progress: Arc<ProgressBook>,
    next_id: AtomicU64,
    metrics: PrometheusHandle,
    arbiters: Mutex<Vec<Arbiter>>,
    tracer: Tracer,
}

impl Engine {
    /// Loads the model once per worker and starts the actors, each worker in an arbiter
    /// thread of its own. Call it inside a running actix system (`#[actix_web::main]`,
    /// `actix_rt::System`).
    pub fn start(config: EngineConfig) -> Result<Engine, String> {
        if config.devices.is_empty() {
            return Err("the engine needs at least one device".into());
        }
        if config.max_batch_requests == 0 || config.max_queue == 0 {
            return Err("max batch requests and max queue must be at least 1".into());
        }
        if config.max_batch_tokens == Some(0) {
            return Err("max batch tokens must be at least 1".into());
        }
        let metrics = telemetry::prometheus();
        let tracer = match &config.trace {
            Some(path) => Tracer::to_file(path)?,
            None => Tracer::disabled(),
        };
        let cache_config = CacheConfig {
            host_bytes: config.cache_host_bytes,
            device_bytes: config.cache_device_bytes,
            prefetch_steps: config.prefetch_steps,
            loaders: config.cache_loaders,
        };
        let cache = CacheManager::new(&cache_config, config.devices.len())
            .map_err(|e| format!("starting the cache loaders: {e}"))?;
        if tracer.enabled() {
            let loads = tracer.named("cache-loader");
            cache.on_load(move |event| trace::cache_loaded(&loads, event));
        }
        let templates = TemplateStore::open(config.cache_dir.as_deref(), cache.clone())
            .map(Arc::new)
            .map_err(|e| {
                format!(
                    "template cache {}: {e}",
                    config
                        .cache_dir
                        .as_deref()
                        .unwrap_or(std::path::Path::new(""))
                        .display()
                )
            })?;
        let progress = Arc::new(ProgressBook::new(config.keep_progress));
        let mut arbiters = Vec::new();
        let mut slots = Vec::new();
        let mut model = None;
        let mut shape = None;
        let mut timings = Vec::new();
        let calibrate = match &config.calibration {
            Some(plan) if config.routing == Routing::Cost && config.devices.len() > 1 => Some(plan),
            _ => None,
        };
        let bandwidth = config
            .load_bandwidth
            .or_else(|| calibrate.and_then(|_| balancer::read_bandwidth(&config.model_dir)))
            .unwrap_or(CostModel::assumed().load_bytes_per_s);
        for (index, device) in config.devices.iter().enumerate() {
            let mut pipe = Pipeline::load(&config.model_dir, config.variant.as_deref())
                .map_err(|e| format!("loading the model: {e}"))?;
            // A CUDA worker runs its UNet steps on the device (a missing driver or device
            // fails here, before any request is taken), keeping template steps resident
            // there within the device tier's budget.
            pipe.use_device(*device, config.cache_device_bytes)
                .map_err(|e| format!("worker {index} on {device}: {e}"))?;
            pipe.set_attention_kernel(config.attention);
            pipe.set_gemm_backend(config.gemm)
                .map_err(|e| format!("worker {index} on {device}: {e}"))?;
            model.get_or_insert(ModelInfo {
                native_size: pipe.native_size(),
            });
            if shape.is_none() {
                shape = Some(balancer::ModelShape::of(&pipe)?);
            }
            let settings = WorkerSettings {
                index,
                policy: config.policy,
                max_batch_requests: config.max_batch_requests,
                max_batch_tokens: config.max_batch_tokens,
                cache_dtype: config.cache_dtype,
                threads: config.threads_per_worker,
                load_bytes_per_s: bandwidth,
                recompute_plan: config.recompute_plan,
            };
            let load = Arc::new(WorkerLoad::default());
            let mut worker = Worker::new(settings, pipe, Arc::clone(&load), Arc::clone(&progress))?
                .traced(&tracer);
            if let (Some(plan), Some(shape)) = (calibrate, &shape) {
                let t = worker
                    .calibrate(shape, plan)
                    .map_err(|e| format!("timing worker {index}: {e}"))?;
                timings.push((*device, t));
            }
            let arbiter = Arbiter::new();
            let addr = Worker::start_in_arbiter(&arbiter.handle(), move |_| worker);
            arbiters.push(arbiter);
            slots.push(WorkerSlot { addr, load });
        }
        let cost_models = pooled_cost_models(&config.devices, &timings, bandwidth)?;
        let loads = slots.iter().map(|s| Arc::clone(&s.load)).collect();
        let workers = slots.iter().map(|s| s.addr.clone()).collect();
        let balancer = Balancer::new(
            config.routing,
            shape.ok_or("no worker started")?,
            cost_models.clone(),
            Arc::new(cache.clone()) as Arc<dyn CacheResidency>,
            config.max_batch_requests,
        );
        let scheduler = Scheduler::new(slots, config.max_queue, balancer, Arc::clone(&progress))
            .traced(&tracer);
        let arbiter = Arbiter::new();
        let scheduler = Scheduler::start_in_arbiter(&arbiter.handle(), move |_| scheduler);
        arbiters.push(arbiter);
        Ok(Engine {
            inner: Arc::new(Inner {
                model: model.ok_or("no worker started")?,
                config,
                scheduler,
                loads,
                workers,
                cost_models,
                templates,
                cache,
                progress,
                next_id: AtomicU64::new(1),
                metrics,
                arbiters: Mutex::new(arbiters),
                tracer,
            }),
        })
    }

    /// Submits work and waits for its result; answers the request id with it.
    pub async fn run(&self, spec: JobSpec) -> (RequestId, Result<Completed, EngineError>) {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let kind = spec.kind();
        let (tx, rx) = oneshot::channel();
        let req = Request {
            id,
            spec,
            reply: tx,
            submitted: Instant::now(),
            charge: Default::default(),
        };
        let admitted = match self.inner.scheduler.send(Submit(req)).await {
            Ok(r) => r,
            Err(e) => Err(EngineError::Unavailable(format!("scheduler: {e}"))),
        };
        if let Err(e) = admitted {
            let outcome = match e {
                EngineError::Overloaded { .. } => "overloaded",
                _ => "unavailable",
            };
            telemetry::count(kind, outcome);
            return (id, Err(e));
        }
        match rx.await {
            Ok(reply) => (id, reply),
            Err(_) => (
                id,
                Err(EngineError::Unavailable("the worker stopped".into())),
            ),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    pub fn model(&self) -> ModelInfo {
        self.inner.model
    }

    pub fn templates(&self) -> &TemplateStore {
        &self.inner.templates
    }

    /// The activation-cache manager (for a balancer: `bytes_missing`).
    pub fn cache(&self) -> &CacheManager {
        &self.inner.cache
    }

    pub fn progress(&self, id: RequestId) -> Option<RequestProgress> {
        self.inner.progress.get(id)
    }

    /// Per worker: (queued, running).
    pub fn loads(&self) -> Vec<(usize, usize)> {
        self.inner
            .loads
            .iter()
            .map(|l| {
                (
                    l.queued.load(Ordering::Relaxed),
                    l.running.load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// Each worker's cost model (measured at start-up, or the assumed one).
    pub fn cost_models(&self) -> &[CostModel] {
        &self.inner.cost_models
    }

    /// Per worker: predicted seconds and active tokens x steps of the work still queued or
    /// running there (both zero once everything routed has left).
    pub fn outstanding(&self) -> Vec<(f64, u64)> {
        self.inner
            .loads
            .iter()
            .map(|l| (l.work_s(), l.tokens()))
            .collect()
    }

    /// Prometheus text of every metric recorded in this process.
    pub fn render_metrics(&self) -> String {
        self.inner.metrics.run_upkeep();
        self.inner.metrics.render()
    }

    /// Stops the workers and the scheduler; waiting callers get an "unavailable" error.
    /// A step in progress finishes first. The trace, if any, ends here: its last record is
    /// written and flushed (records of a step still finishing are not).
    pub fn shutdown(&self) {
        for worker in &self.inner.workers {
            worker.do_send(worker::Stop);
        }
        let mut arbiters = self
            .inner
            .arbiters
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for arbiter in arbiters.drain(..) {
            arbiter.stop();
        }
        self.inner.tracer.finish();
    }
}
