//! The serving engine: workers (one per device, each owning its models), a scheduler that
//! admits and routes requests, a template store and per-request progress. [`Engine`] is
//! the handle the HTTP layer (or an embedding app) holds.

pub mod progress;
pub mod request;
pub mod scheduler;
pub mod telemetry;
pub mod templates;
pub mod worker;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use actix::{Actor, Addr, Arbiter};
use metrics_exporter_prometheus::PrometheusHandle;
use retouch_kernels::{DType, Device};
use retouch_models::pipeline::Pipeline;
use tokio::sync::oneshot;

pub use progress::{ProgressBook, RequestProgress, State};
pub use request::{Completed, EngineError, JobSpec, Request, RequestId};
pub use scheduler::{Routing, Scheduler, Submit, WorkerSlot};
pub use templates::TemplateStore;
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
    pub max_batch_requests: usize,
    /// Latent tokens per step a batch may hold (each request's active latent positions,
    /// all of them when dense, times its guidance branches); None: no limit.
    pub max_batch_tokens: Option<usize>,
    /// Requests waiting per worker before new ones are refused.
    pub max_queue: usize,
    /// Where templates are kept on disk; None keeps them in memory only.
    pub cache_dir: Option<PathBuf>,
    pub cache_dtype: DType,
    /// Largest JSON body the HTTP routes accept.
    pub max_body_bytes: usize,
    /// Finished requests whose progress stays readable.
    pub keep_progress: usize,
}

impl EngineConfig {
    pub fn new(model_dir: impl Into<PathBuf>) -> EngineConfig {
        EngineConfig {
            model_dir: model_dir.into(),
            variant: None,
            devices: vec![Device::Cpu],
            threads_per_worker: None,
            policy: BatchPolicy::Continuous,
            routing: Routing::LeastLoaded,
            max_batch_requests: 8,
            max_batch_tokens: None,
            max_queue: 64,
            cache_dir: None,
            cache_dtype: DType::F16,
            max_body_bytes: 16 << 20,
            keep_progress: 4096,
        }
    }
}

/// What the engine learned from its model at start-up, for defaults and validation.
#[derive(Clone, Copy, Debug)]
pub struct ModelInfo {
    /// The image size the model was trained at.
    pub native_size: usize,
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
    templates: TemplateStore,
    progress: Arc<ProgressBook>,
    next_id: AtomicU64,
    metrics: PrometheusHandle,
    arbiters: Mutex<Vec<Arbiter>>,
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
        let templates = TemplateStore::open(config.cache_dir.as_deref()).map_err(|e| {
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
        for (index, device) in config.devices.iter().enumerate() {
            if *device != Device::Cpu {
                return Err(format!("device {device:?} is not supported yet"));
            }
            let pipe = Pipeline::load(&config.model_dir, config.variant.as_deref())
                .map_err(|e| format!("loading the model: {e}"))?;
            model.get_or_insert(ModelInfo {
                native_size: pipe.native_size(),
            });
            let settings = WorkerSettings {
                index,
                policy: config.policy,
                max_batch_requests: config.max_batch_requests,
                max_batch_tokens: config.max_batch_tokens,
                cache_dtype: config.cache_dtype,
                threads: config.threads_per_worker,
            };
            let load = Arc::new(WorkerLoad::default());
            let worker = Worker::new(settings, pipe, Arc::clone(&load), Arc::clone(&progress))?;
            let arbiter = Arbiter::new();
            let addr = Worker::start_in_arbiter(&arbiter.handle(), move |_| worker);
            arbiters.push(arbiter);
            slots.push(WorkerSlot { addr, load });
        }
        let loads = slots.iter().map(|s| Arc::clone(&s.load)).collect();
        let workers = slots.iter().map(|s| s.addr.clone()).collect();
        let scheduler = Scheduler::new(
            slots,
            config.max_queue,
            config.routing,
            Arc::clone(&progress),
        );
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
                templates,
                progress,
                next_id: AtomicU64::new(1),
                metrics,
                arbiters: Mutex::new(arbiters),
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

    /// Prometheus text of every metric recorded in this process.
    pub fn render_metrics(&self) -> String {
        self.inner.metrics.run_upkeep();
        self.inner.metrics.render()
    }

    /// Stops the workers and the scheduler; waiting callers get an "unavailable" error.
    /// A step in progress finishes first.
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
    }
}
