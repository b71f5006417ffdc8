//! `retouch replay`: drives an engine in this process (or a running server, `--url`) with a
//! Poisson trace of edits of reused templates and reports mean, P50 and P95 latency and
//! throughput per arrival rate. `--matrix` compares (a) static batching + dense edits,
//! (b) continuous batching + dense edits and (c) continuous batching + cached edits + cost
//! routing, each on a fresh engine at each rate.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use retouch_kernels::Device;
use retouch_models::pipeline::EditMode;
use retouch_runtime::replay::{self, ReplayConfig, Report, Target, TraceConfig};
use retouch_runtime::{BatchPolicy, Engine, EngineConfig, Routing};
use serde::Serialize;

use super::{check_steps_and_guidance, model_dir};

#[derive(Args)]
pub struct ReplayArgs {
    /// Drive a running `retouch serve` at this base URL instead of an engine in this process.
    #[arg(long, conflicts_with_all = ["matrix", "model", "workers", "policy", "routing"])]
    url: Option<String>,
    /// Pipeline folder of the in-process engine (default: the built-in models/tiny).
    #[arg(long)]
    model: Option<PathBuf>,
    /// CPU workers of the in-process engine, splitting the cores between them.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// `continuous` or `static` batching (in-process).
    #[arg(long, default_value = "continuous")]
    policy: BatchPolicy,
    /// `cost`, `requests`, `tokens` or `round-robin` (in-process).
    #[arg(long, default_value = "cost")]
    routing: Routing,
    /// Edit mode: `cached` or `dense`.
    #[arg(long, default_value = "cached")]
    mode: EditMode,
    /// Requests per running batch (in-process).
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Waiting requests per worker before edits are refused (in-process).
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Skip the start-up timing of workers (cost routing then assumes a FLOPs-only model).
    #[arg(long)]
    no_calibration: bool,
    /// Offered arrival rates in requests per second, one replay each (e.g. `0.5,1`). Without
    /// it, in-process runs first measure the dense capacity (a burst that fills every worker's
    /// batch, `--max-batch` dense edits each) and replay at 0.5x and 1.2x of it.
    #[arg(long, alias = "rate", value_delimiter = ',')]
    rates: Vec<f64>,
    /// Edits per replay.
    #[arg(long, default_value_t = 40)]
    requests: usize,
    /// Templates registered before each replay and reused by its edits.
    #[arg(long, default_value_t = 4)]
    templates: usize,
    /// Zipf exponent of template popularity (0: uniform).
    #[arg(long, default_value_t = 0.0)]
    zipf: f64,
    /// Mean mask ratio (Beta-distributed, clamped to 0.02..0.6; published traces: 0.11-0.19).
    #[arg(long, default_value_t = 0.15)]
    mask_mean: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Denoising steps of the templates (edits take their template's).
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 5.0)]
    guidance: f32,
    /// Template side in pixels (default: the model's native size).
    #[arg(long)]
    size: Option<usize>,
    /// Run the three configurations (a), (b), (c) at each rate, each on a fresh engine.
    #[arg(long)]
    matrix: bool,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write the results as Markdown (a table and how it was made) to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

/// One engine configuration to replay against.
#[derive(Clone, Copy)]
struct Scenario {
    policy: BatchPolicy,
    mode: EditMode,
    routing: Routing,
}

impl Scenario {
    fn label(&self) -> String {
        let policy = match self.policy {
            BatchPolicy::Static => "static",
            BatchPolicy::Continuous => "continuous",
        };
        let mode = match self.mode {
            EditMode::Dense => "dense",
            EditMode::Cached => "cached",
        };
        format!("{policy} + {mode} + {}", self.routing)
    }
}

/// (a), (b), (c) of the comparison.
const MATRIX: [Scenario; 3] = [
    Scenario {
        policy: BatchPolicy::Static,
        mode: EditMode::Dense,
        routing: Routing::Requests,
    },
    Scenario {
        policy: BatchPolicy::Continuous,
        mode: EditMode::Dense,
        routing: Routing::Requests,
    },
    Scenario {
        policy: BatchPolicy::Continuous,
        mode: EditMode::Cached,
        routing: Routing::Cost,
    },
];

#[derive(Serialize)]
struct Probe {
    /// One dense edit's latency on an idle engine, ms.
    service_ms: f64,
    /// Dense edits per second with every worker's batch full (a burst's throughput).
    capacity: f64,
    /// Edits in that burst.
    burst: usize,
}

#[derive(Serialize)]
struct Output {
    target: String,
    workers: Option<usize>,
    threads_per_worker: Option<usize>,
    steps: usize,
    requests: usize,
    templates: usize,
    mask_mean: f64,
    seed: u64,
    load_average_before: Option<String>,
    load_average_after: Option<String>,
    probe: Option<Probe>,
    runs: Vec<Report>,
}

pub fn run(args: ReplayArgs) -> Result<(), Box<dyn std::error::Error>> {
    check_steps_and_guidance(args.steps, args.guidance)?;
    if args.workers == 0 {
        return Err("--workers must be at least 1".into());
    }
    if let Some(bad) = args.rates.iter().find(|r| !(r.is_finite() && **r > 0.0)) {
        return Err(format!("--rates must be positive, got {bad}").into());
    }
    if args.url.is_some() && args.rates.is_empty() {
        return Err("with --url, give the arrival rates (--rates)".into());
    }
    let trace = TraceConfig {
        templates: args.templates,
        zipf: args.zipf,
        mask_mean: args.mask_mean,
        seed: args.seed,
        ..TraceConfig::new(1.0, args.requests)
    };
    trace.check()?;
    let model = match &args.url {
        Some(_) => None,
        None => Some(model_dir(args.model.clone())?),
    };
    actix_web::rt::System::new().block_on(replay_all(args, trace, model))
}

async fn replay_all(
    args: ReplayArgs,
    trace: TraceConfig,
    model: Option<PathBuf>,
) -> Result<(), Box<dyn std::error::Error>> {
    let load_before = load_average();
    let scenarios = if args.matrix {
        MATRIX.to_vec()
    } else {
        vec![Scenario {
            policy: args.policy,
            mode: args.mode,
            routing: args.routing,
        }]
    };
    let base = ReplayConfig {
        trace,
        steps: args.steps,
        guidance: args.guidance,
        mode: args.mode,
        size: args.size,
    };
    let threads = threads_per_worker(args.workers);
    let mut probe = None;
    let rates = match (&model, args.rates.is_empty()) {
        (Some(dir), true) => {
            let p = probe_capacity(dir, &args, &base).await?;
            eprintln!(
                "probe: a dense edit takes {:.0} ms on an idle engine; {} busy worker(s) serve \
                 {:.2} dense edits/s",
                p.service_ms, args.workers, p.capacity
            );
            let rates = vec![0.5 * p.capacity, 1.2 * p.capacity];
            probe = Some(p);
            rates
        }
        _ => args.rates.clone(),
    };

    let mut runs = Vec::new();
    for scenario in &scenarios {
        for &rate in &rates {
            let mut config = base.clone();
            config.trace.rate = rate;
            config.mode = scenario.mode;
            let label = match &args.url {
                Some(_) => format!("{} edits over HTTP", mode_name(scenario.mode)),
                None => scenario.label(),
            };
            let bar = indicatif::ProgressBar::new(config.trace.requests as u64).with_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} {bar:30} {pos}/{len} edits {elapsed}",
                )
                .expect("valid template"),
            );
            bar.set_prefix(format!("{label} @ {rate:.2}/s"));
            let on_done = {
                let bar = bar.clone();
                move || bar.inc(1)
            };
            let report = match (&args.url, &model) {
                (Some(url), _) => {
                    let target = Target::http(url, Duration::from_secs(3600));
                    replay::run(&target, &config, &label, on_done).await?
                }
                (None, Some(dir)) => {
                    let engine = start_engine(dir, &args, *scenario)?;
                    super::print_cost_models(&engine);
                    let result =
                        replay::run(&Target::Engine(engine.clone()), &config, &label, on_done)
                            .await;
                    engine.shutdown();
                    result?
                }
                (None, None) => unreachable!("no --url means a model folder"),
            };
            bar.finish_and_clear();
            for e in &report.errors {
                eprintln!("{label} @ {rate:.2}/s: an edit failed: {e}");
            }
            runs.push(report);
        }
    }

    let output = Output {
        target: match (&args.url, &model) {
            (Some(url), _) => url.clone(),
            (None, dir) => format!("in-process engine on {}", display(dir.as_deref())),
        },
        workers: model.as_ref().map(|_| args.workers),
        threads_per_worker: model.as_ref().and(threads),
        steps: args.steps,
        requests: args.requests,
        templates: args.templates,
        mask_mean: args.mask_mean,
        seed: args.seed,
        load_average_before: load_before,
        load_average_after: load_average(),
        probe,
        runs,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&output)?);
    } else {
        print!("{}", replay::text_table(&output.runs));
    }
    if let Some(path) = &args.markdown {
        std::fs::write(path, markdown(&output)).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

fn mode_name(mode: EditMode) -> &'static str {
    match mode {
        EditMode::Dense => "dense",
        EditMode::Cached => "cached",
    }
}

fn display(dir: Option<&Path>) -> String {
    dir.map_or_else(String::new, |d| d.display().to_string())
}

/// Each worker's share of the cores when there are several (as `retouch serve` splits them).
fn threads_per_worker(workers: usize) -> Option<usize> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (workers > 1).then(|| (cores / workers).max(1))
}

fn start_engine(dir: &Path, args: &ReplayArgs, scenario: Scenario) -> Result<Engine, String> {
    let mut config = EngineConfig::new(dir);
    config.devices = vec![Device::Cpu; args.workers];
    config.threads_per_worker = threads_per_worker(args.workers);
    config.policy = scenario.policy;
    config.routing = scenario.routing;
    config.max_batch_requests = args.max_batch;
    config.max_queue = args.max_queue;
    if args.no_calibration {
        config.calibration = None;
    }
    Engine::start(config)
}

/// The dense configurations' capacity: one dense edit on an idle engine (after a warm-up
/// edit), then a burst of a full batch per worker sent at once, whose throughput is the
/// capacity. A full batch because that is how (a) runs once it falls behind: a smaller burst
/// misses what batching saves per edit and puts the higher rate below (a)'s real capacity.
/// It counts whatever the workers lose to running side by side on shared cores.
async fn probe_capacity(
    dir: &Path,
    args: &ReplayArgs,
    base: &ReplayConfig,
) -> Result<Probe, Box<dyn std::error::Error>> {
    let engine = start_engine(dir, args, MATRIX[0])?;
    let result = probe_on(&engine, args.workers * args.max_batch, base).await;
    engine.shutdown();
    result
}

async fn probe_on(
    engine: &Engine,
    burst: usize,
    base: &ReplayConfig,
) -> Result<Probe, Box<dyn std::error::Error>> {
    let target = Target::Engine(engine.clone());
    let mut config = base.clone();
    config.mode = EditMode::Dense;
    config.trace.templates = 1;
    config.trace.requests = 1;
    let mut service_ms = f64::NAN;
    for _ in 0..2 {
        let report = replay::run(&target, &config, "probe", || {}).await?;
        service_ms = report.latency_ms.map_or(f64::NAN, |l| l.mean);
    }
    config.trace.requests = burst;
    config.trace.rate = 1e6;
    let report = replay::run(&target, &config, "probe burst", || {}).await?;
    if !(service_ms.is_finite() && report.completed == burst) {
        return Err(format!("the probe edits did not complete: {:?}", report.errors).into());
    }
    Ok(Probe {
        service_ms,
        capacity: report.throughput,
        burst,
    })
}

/// The 1-, 5- and 15-minute load averages (Linux), as a noise marker for the numbers.
fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(
        text.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

fn markdown(o: &Output) -> String {
    let mut s = format!(
        "Target: {}; {} worker(s) x {} thread(s); {} edits per run over {} template(s) of {} \
         steps; mask ratios Beta-distributed with mean {} (clamped to 0.02..0.6); seed {}.\n",
        o.target,
        o.workers.map_or("-".into(), |w| w.to_string()),
        o.threads_per_worker.map_or("all".into(), |t| t.to_string()),
        o.requests,
        o.templates,
        o.steps,
        o.mask_mean,
        o.seed
    );
    if let Some(p) = &o.probe {
        s += &format!(
            "Probe: one dense edit on an idle engine took {:.0} ms; a burst of {} dense edits \
             (a full batch per worker) ran at {:.2} edits/s (the dense capacity); the rates are \
             0.5x and 1.2x that.\n",
            p.service_ms, p.burst, p.capacity
        );
    }
    s += &format!(
        "Load average before / after: {} / {}.\n\n",
        o.load_average_before.as_deref().unwrap_or("n/a"),
        o.load_average_after.as_deref().unwrap_or("n/a")
    );
    s + &replay::markdown_table(&o.runs)
}
