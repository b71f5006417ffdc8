//! `retouch serve`: the HTTP API over an engine of CPU workers. Ctrl-C stops accepting,
//! lets in-flight responses finish (actix-web's graceful shutdown), then stops the workers.

use std::path::PathBuf;

use actix_web::{App, HttpServer, web};
use clap::Args;
use retouch_kernels::Device;
use retouch_runtime::http::not_found;
use retouch_runtime::{BatchPolicy, Engine, EngineConfig, Routing};

use super::{AttentionArg, GemmArg, model_dir};

#[derive(Args)]
pub struct ServeArgs {
    /// Pipeline folder; defaults to the built-in models/tiny.
    #[arg(long)]
    model: Option<PathBuf>,
    /// A device to run a worker on (repeatable): `cpu`, or `cuda:N` (the worker's UNet steps
    /// run on that GPU; templates are recorded, and text and images encoded, on the host).
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
    /// Activation-cache budget in host memory, in bytes (suffixes K, M, G, T: powers of
    /// 1024). Enforced with --cache-dir; without one the host holds the only copy, so the
    /// budget is only counted.
    #[arg(long, value_parser = parse_bytes, default_value = "8G")]
    cache_host_bytes: u64,
    /// Activation-cache budget of each worker's own tier (a GPU worker's device memory), in
    /// bytes (suffixes as above).
    #[arg(long, value_parser = parse_bytes, default_value = "4G")]
    cache_device_bytes: u64,
    /// GPU workers' attention kernel.
    #[arg(long, value_enum, default_value = "flash")]
    attention: AttentionArg,
    /// GPU workers' GEMMs (linear layers, convolutions).
    #[arg(long, value_enum, default_value = "kernels")]
    gemm: GemmArg,
    /// Steps of a cached edit's template cache loaded ahead of the step it is at.
    #[arg(long, default_value_t = 4)]
    prefetch_steps: usize,
    /// A cached step whose activations are only on disk follows the load-or-recompute plan
    /// (recomputes a dense prefix of UNet units while the rest streams in) instead of
    /// waiting for the load. Off by default: on CPU workers it measured slower than waiting
    /// (docs/replay.md).
    #[arg(long)]
    recompute_plan: bool,
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
    /// How requests are spread over workers: `cost` (lowest predicted completion, from a
    /// cost model timed at start-up), `requests`, `tokens` or `round-robin`.
    #[arg(long, default_value = "cost")]
    routing: Routing,
    /// Skip the start-up timing of workers; cost routing then assumes a FLOPs-only model.
    #[arg(long)]
    no_calibration: bool,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 16 << 20)]
    max_body: usize,
    /// Write a JSONL trace of every actor message to FILE (read it with `actor-trace`).
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
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
    config.cache_host_bytes = args.cache_host_bytes;
    config.cache_device_bytes = args.cache_device_bytes;
    config.attention = args.attention.into();
    config.gemm = args.gemm.into();
    config.prefetch_steps = args.prefetch_steps;
    config.recompute_plan = args.recompute_plan;
    config.max_batch_requests = args.max_batch;
    config.max_batch_tokens = args.max_batch_tokens;
    config.max_queue = args.max_queue;
    config.policy = args.policy;
    config.routing = args.routing;
    if args.no_calibration {
        config.calibration = None;
    }
    config.max_body_bytes = args.max_body;
    config.trace = args.trace;
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
        "retouch serving on http://{host}:{port} ({} worker(s), {} routing)",
        engine.loads().len(),
        engine.config().routing
    );
    super::print_cost_models(&engine);
    let result = server.run().await;
    engine.shutdown();
    Ok(result?)
}

/// Bytes with an optional binary suffix: `1048576`, `512M`, `8G`.
fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("`{s}`: unknown suffix `{c}` (K, M, G or T)")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a byte count (e.g. 1048576, 512M, 8G)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn byte_counts_take_binary_suffixes() {
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert_eq!(parse_bytes("512M"), Ok(512 << 20));
        assert_eq!(parse_bytes("8g"), Ok(8 << 30));
        assert_eq!(parse_bytes("0"), Ok(0));
        assert!(parse_bytes("8X").unwrap_err().contains("suffix"));
        assert!(parse_bytes("G").is_err());
        assert!(parse_bytes("-1").is_err());
        assert!(
            parse_bytes("99999999999T")
                .unwrap_err()
                .contains("too large")
        );
    }
}
