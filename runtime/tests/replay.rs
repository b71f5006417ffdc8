//! Replays against an in-process engine over a random tiny pipeline: every edit accounted
//! for, latencies ordered, the balancer's outstanding work back to zero afterwards.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::OnceLock;

use retouch_kernels::Device;
use retouch_models::pipeline::EditMode;
use retouch_models::random_pipeline::{Preset, RandomPipeline};
use retouch_runtime::replay::{self, ReplayConfig, Target, TraceConfig};
use retouch_runtime::{BatchPolicy, Engine, EngineConfig, Routing};

fn model_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("retouch-replay-model-{}", std::process::id()));
        RandomPipeline::new(Preset::Tiny)
            .write(&dir, true, None)
            .expect("tiny pipeline");
        dir
    })
}

fn replay_config(rate: f64, requests: usize, mode: EditMode) -> ReplayConfig {
    let mut trace = TraceConfig::new(rate, requests);
    trace.templates = 2;
    trace.seed = 3;
    ReplayConfig {
        trace,
        steps: 2,
        guidance: 4.0,
        mode,
        size: None,
    }
}

#[actix_rt::test]
async fn cost_routed_cached_edits_all_complete_over_two_workers() {
    let mut config = EngineConfig::new(model_dir());
    config.devices = vec![Device::Cpu; 2];
    config.threads_per_worker = Some(1);
    config.routing = Routing::Cost;
    let engine = Engine::start(config).expect("engine starts");
    // Two workers with cost routing: both were timed at start-up.
    for m in engine.cost_models() {
        assert!(m.samples >= 8, "{m:?}");
        assert!(
            m.s_per_flop > 0.0 && m.step_s >= 0.0 && m.request_s > 0.0,
            "{m:?}"
        );
        assert!(m.load_bytes_per_s > 0.0, "{m:?}");
    }

    let finished = Rc::new(Cell::new(0));
    let counter = Rc::clone(&finished);
    let report = replay::run(
        &Target::Engine(engine.clone()),
        &replay_config(50.0, 10, EditMode::Cached),
        "cost",
        move || counter.set(counter.get() + 1),
    )
    .await
    .unwrap();
    assert_eq!(
        (
            report.requests,
            report.completed,
            report.rejected,
            report.failed
        ),
        (10, 10, 0, 0),
        "{:?}",
        report.errors
    );
    assert_eq!(finished.get(), 10);
    let latency = report.latency_ms.unwrap();
    assert!(latency.mean > 0.0 && latency.p50 > 0.0, "{latency:?}");
    assert!(latency.p50 <= latency.p95 && latency.p95 <= latency.max);
    assert!(report.queue_ms.unwrap().mean >= 0.0);
    assert!(report.throughput > 0.0 && report.makespan_s > 0.0);
    assert!((0.02..=0.6).contains(&report.mean_mask_ratio));
    assert_eq!(report.per_worker.iter().sum::<usize>(), 10);
    // Every routed request's predicted work was taken off its worker again.
    assert_eq!(engine.outstanding(), vec![(0.0, 0); 2]);
    assert_eq!(engine.loads(), vec![(0, 0); 2]);
    engine.shutdown();
}

#[actix_rt::test]
async fn a_full_engine_rejects_and_the_report_counts_it() {
    let mut config = EngineConfig::new(model_dir());
    config.policy = BatchPolicy::Static;
    config.routing = Routing::Requests;
    config.max_batch_requests = 1;
    config.max_queue = 1;
    let engine = Engine::start(config).expect("engine starts");
    // Ten arrivals within about a millisecond: one runs, one waits, the rest are refused.
    let report = replay::run(
        &Target::Engine(engine.clone()),
        &replay_config(10_000.0, 10, EditMode::Dense),
        "full",
        || {},
    )
    .await
    .unwrap();
    assert_eq!(report.completed + report.rejected + report.failed, 10);
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    assert!(report.rejected >= 1, "{report:?}");
    assert!(report.completed >= 1, "{report:?}");
    assert_eq!(engine.outstanding(), vec![(0.0, 0)]);
    engine.shutdown();
}
