//! `retouch serve`: the HTTP API over an engine of CPU workers. Ctrl-C stops accepting,
//! lets in-flight responses finish (actix-web's graceful shutdown), then stops the workers.

use std::path::PathBuf;

use actix_web::{App, HttpServer, web};
use clap::Args;
use retouch_kernels::Device;
use retouch_runtime::http::not_found;
use retouch_runtime::{BatchPolicy, Engine, EngineConfig};

use super::model_dir;

#[derive(Args)]
pub struct ServeArgs {
    /// Pipeline folder; defaults to the built-in models/tiny.
    #[arg(long)]
    model: Option<PathBuf>,
    /// A device to run a worker on (repeatable); only `cpu` exists so far.
    #[arg(long = "device", default_value = "cpu")]
    devices: Vec<Device>,
    /// CPU workers, splitting the cores between them (overrides the `cpu` count of --device).
    #[arg(long)]
    workers: Option<usize>,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Keep templates on disk here (reloaded at start); in memory only when absent.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Requests per running batch.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Latent tokens per running batch step (a request counts its active latent positions,
    /// all of them when dense, times its guidance branches); no limit when absent. A request
    /// larger than the limit still runs, alone.
    #[arg(long)]
    max_batch_tokens: Option<usize>,
    /// Requests waiting per worker before new ones get 503.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// `continuous` (join after any step) or `static` (a batch runs to completion).
    #[arg(long, default_value = "continuous")]
    policy: BatchPolicy,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 16 << 20)]
    max_body: usize,
}

pub fn run(args: ServeArgs) -> Result<(), Box<dyn std::error::Error>> {
    let mut config = EngineConfig::new(model_dir(args.model)?);
    config.devices = args.devices;
    if let Some(n) = args.workers {
        if n == 0 {
            return Err("--workers must be at least 1".into());
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        config.devices = vec![Device::Cpu; n];
        config.threads_per_worker = (n > 1).then(|| (cores / n).max(1));
    }
    config.cache_dir = args.cache_dir;
    config.max_batch_requests = args.max_batch;
    config.max_batch_tokens = args.max_batch_tokens;
    config.max_queue = args.max_queue;
    config.policy = args.policy;
    config.max_body_bytes = args.max_body;
    let (host, port) = (args.host, args.port);
    actix_web::rt::System::new().block_on(serve(config, host, port))
}

async fn serve(
    config: EngineConfig,
    host: String,
    port: u16,
) -> Result<(), Box<dyn std::error::Error>> {
    let engine = Engine::start(config)?;
    let app_engine = engine.clone();
    let server = HttpServer::new(move || {
        App::new()
            .configure(|cfg| app_engine.configure(cfg))
            .default_service(web::to(not_found))
    })
    .bind((host.as_str(), port))
    .map_err(|e| format!("binding {host}:{port}: {e}"))?;
    eprintln!(
        "retouch serving on http://{host}:{port} ({} worker(s))",
        engine.loads().len()
    );
    let result = server.run().await;
    engine.shutdown();
    Ok(result?)
}
