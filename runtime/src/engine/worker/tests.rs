//! Admission under the per-batch token limit, on a worker over the tiny random pipeline
//! (no actor system: the tests call the step loop's parts directly).

use std::path::PathBuf;
use std::sync::OnceLock;

use retouch_models::pipeline::{EditMode, EditRequest, Mask, Template, TemplateSpec};
use retouch_models::random_pipeline::{Preset, RandomPipeline};

use super::*;
use crate::engine::cache::{CacheConfig, CacheManager};
use retouch_models::unet::UnitTimes;

fn tiny() -> Pipeline {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("retouch-worker-{}", std::process::id()));
        RandomPipeline::new(Preset::Tiny)
            .write(&dir, true, None)
            .unwrap();
        dir
    });
    Pipeline::load(dir, None).unwrap()
}

fn template(pipe: &Pipeline) -> Arc<Template> {
    let spec = TemplateSpec {
        prompt: "a house".into(),
        negative_prompt: String::new(),
        seed: 1,
        steps: 2,
        guidance: 4.0,
        scheduler: "ddim".into(),
        width: 64,
        height: 64,
    };
    Arc::new(
        pipe.register_template(&spec, Some(DType::F16), &mut |_, _| {})
            .unwrap(),
    )
}

fn worker(pipe: Pipeline, max_batch_tokens: Option<usize>) -> Worker {
    let settings = WorkerSettings {
        index: 0,
        policy: BatchPolicy::Continuous,
        max_batch_requests: 8,
        max_batch_tokens,
        cache_dtype: DType::F16,
        threads: None,
        load_bytes_per_s: 1e9,
        recompute_plan: true,
    };
    let load = Arc::new(WorkerLoad::default());
    Worker::new(settings, pipe, load, Arc::new(ProgressBook::new(16))).unwrap()
}

/// A cached edit inside the square `[0, side)^2` pixels; its reply receiver must stay alive
/// (a closed reply cancels the request).
fn edit(
    id: RequestId,
    template: &Arc<Template>,
    side: usize,
) -> (Request, oneshot::Receiver<Reply>) {
    let values = (0..64 * 64)
        .map(|p| f32::from(u8::from(p % 64 < side && p / 64 < side)))
        .collect();
    let mut req = EditRequest::new(format!("edit {id}"));
    req.mode = EditMode::Cached;
    // Every step of the template: these tests count steps and cache reads.
    req.strength = 1.0;
    let spec = JobSpec::Edit {
        template: Arc::clone(template),
        // The template holds its own activation cache.
        template_id: format!("t{id}"),
        cache: None,
        mask: Mask {
            width: 64,
            height: 64,
            values,
        },
        req,
    };
    let (reply, rx) = oneshot::channel();
    let request = Request {
        id,
        spec,
        reply,
        submitted: Instant::now(),
        charge: Default::default(),
    };
    (request, rx)
}

/// Queues the requests (as the scheduler would), returning their reply receivers.
fn enqueue(
    w: &mut Worker,
    requests: Vec<(Request, oneshot::Receiver<Reply>)>,
) -> Vec<oneshot::Receiver<Reply>> {
    requests
        .into_iter()
        .map(|(req, rx)| {
            w.load.queued.fetch_add(1, Ordering::Relaxed);
            w.waiting.push_back(req);
            rx
        })
        .collect()
}

fn ids(w: &Worker) -> (Vec<RequestId>, Vec<RequestId>) {
    (
        w.running.iter().map(|r| r.id).collect(),
        w.waiting.iter().map(|r| r.id).collect(),
    )
}

#[test]
fn the_token_limit_admits_first_come_first_served() {
    let pipe = tiny();
    let t = template(&pipe);
    let cost = |side| edit(0, &t, side).0.spec.step_tokens(&pipe).unwrap();
    let (small, big) = (cost(8), cost(40));
    assert!(small < big);

    // Room for two small edits: the big one at the head of the rest waits, and the small
    // one behind it does not overtake it.
    let mut w = worker(tiny(), Some(2 * small));
    let _rx = enqueue(
        &mut w,
        vec![edit(1, &t, 8), edit(2, &t, 40), edit(3, &t, 8)],
    );
    w.admit();
    assert_eq!(ids(&w), (vec![1], vec![2, 3]));
    assert_eq!(w.load.queued.load(Ordering::Relaxed), 2);
    // While the first one runs, nothing changes; once it has finished (and leaves with
    // this step), the big one is admitted into the then empty batch although it alone
    // exceeds the limit, so it cannot starve.
    w.step_batch();
    w.admit();
    assert_eq!(ids(&w), (vec![1], vec![2, 3]));
    w.step_batch();
    assert!(w.running[0].job.is_done());
    w.admit();
    assert_eq!(ids(&w), (vec![1, 2], vec![3]));
    w.retire();
    assert_eq!(ids(&w), (vec![2], vec![3]));

    // Without a limit, all three join at once.
    let mut w = worker(tiny(), None);
    let _rx = enqueue(
        &mut w,
        vec![edit(1, &t, 8), edit(2, &t, 40), edit(3, &t, 8)],
    );
    w.admit();
    assert_eq!(ids(&w), (vec![1, 2, 3], vec![]));
    // And a limit that fits everything admits everything.
    let mut w = worker(tiny(), Some(2 * small + big));
    let _rx = enqueue(
        &mut w,
        vec![edit(1, &t, 8), edit(2, &t, 40), edit(3, &t, 8)],
    );
    w.admit();
    assert_eq!(ids(&w), (vec![1, 2, 3], vec![]));
}

#[test]
fn a_fused_batch_step_advances_every_request_and_a_bad_one_fails_alone() {
    let pipe = tiny();
    let t = template(&pipe);
    let mut w = worker(tiny(), None);
    let _rx = enqueue(
        &mut w,
        vec![edit(1, &t, 8), edit(2, &t, 24), edit(3, &t, 40)],
    );
    w.admit();
    // A job that has run all its steps cannot step again: it fails, the others step.
    while !w.running[1].job.is_done() {
        w.running[1].job.step(&w.pipe).unwrap();
    }
    w.step_batch();
    let state: Vec<(usize, bool)> = w
        .running
        .iter()
        .map(|r| (r.job.steps_done(), r.failure.is_some()))
        .collect();
    assert_eq!(state, vec![(1, false), (2, true), (1, false)]);
}

/// The recomputed-units counter of worker 0 in the process's metrics.
fn recomputed_units() -> f64 {
    let text = crate::engine::telemetry::prometheus().render();
    text.lines()
        .filter(|l| l.starts_with(crate::engine::telemetry::RECOMPUTED_UNITS))
        .filter(|l| l.contains("worker=\"0\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A worker that has timed its dense units (by registering a template) and a cached edit of
/// that template whose steps are all on disk only (one byte of memory per tier, no
/// prefetch): every step is a miss. Returns the worker, the queued edit's reply and the
/// template's folder.
fn edit_on_disk(tag: &str) -> (Worker, oneshot::Receiver<Reply>, PathBuf, CacheManager) {
    crate::engine::telemetry::prometheus();
    let mut w = worker(tiny(), None);
    let t = template(&w.pipe);
    w.learn_costs(&[], None);
    let dir = std::env::temp_dir().join(format!("retouch-worker-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    t.save(&dir).unwrap();
    let config = CacheConfig {
        host_bytes: 1,
        device_bytes: 1,
        prefetch_steps: 0,
        loaders: 1,
    };
    let cache = CacheManager::new(&config, 1).unwrap();
    cache.add_saved("t", t.spec.steps, dir.clone());
    let (mut request, rx) = edit(1, &t, 24);
    let JobSpec::Edit {
        template, cache: c, ..
    } = &mut request.spec
    else {
        unreachable!()
    };
    *template = Arc::new(Template::load_without_cache(&dir).unwrap());
    *c = Some(cache.lease("t").unwrap());
    let mut rx = enqueue(&mut w, vec![(request, rx)]);
    (w, rx.remove(0), dir, cache)
}

fn run_to_end(w: &mut Worker) {
    w.admit();
    while w
        .running
        .iter()
        .any(|r| !r.job.is_done() && r.failure.is_none())
    {
        w.step_batch();
    }
}

/// Costs that make the plan recompute the first unit only and stream the rest: the first
/// unit is free, every other one costs far more densely than its read at 1 MB/s.
fn first_unit_free(w: &mut Worker) {
    let units = w.pipe.unet.units().unwrap();
    let mut dense = vec![10.0; units];
    dense[0] = 0.0;
    w.unit_costs = UnitCosts::default();
    w.unit_costs.observe(&UnitTimes {
        masked: false,
        size: 1,
        seconds: dense,
    });
    w.load_bytes_per_s = 1e6;
}

#[test]
fn a_step_only_on_disk_recomputes_a_dense_prefix_while_the_rest_loads() {
    // A disk a million times slower than the dense units: every unit is recomputed and
    // nothing read. Then a plan that recomputes the first unit and streams the rest.
    for (tag, partial) in [("slow-disk", false), ("stream", true)] {
        let (mut w, mut rx, dir, _cache) = edit_on_disk(tag);
        if partial {
            first_unit_free(&mut w);
        } else {
            w.load_bytes_per_s = 1e3;
        }
        let before = recomputed_units();
        run_to_end(&mut w);
        assert!(
            w.running[0].failure.is_none(),
            "{tag}: {:?}",
            w.running[0].failure
        );
        assert!(recomputed_units() > before, "{tag}: no unit was recomputed");
        w.retire();
        assert!(matches!(rx.try_recv(), Ok(Ok(_))), "{tag}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn a_failed_load_answers_with_its_reason_with_or_without_a_plan() {
    for plan in [false, true] {
        let (mut w, mut rx, dir, _cache) = edit_on_disk(&format!("corrupt-{plan}"));
        w.settings.recompute_plan = plan;
        if plan {
            first_unit_free(&mut w);
        }
        let corrupt = Template::step_cache_path(&dir, 0);
        std::fs::write(&corrupt, b"not safetensors").unwrap();
        let before = recomputed_units();
        run_to_end(&mut w);
        let failure = w.running[0].failure.as_ref().map(|e| e.to_string());
        let message = failure.unwrap_or_default();
        assert!(
            message.contains("step_0000.safetensors"),
            "plan {plan}: {message}"
        );
        assert_eq!(w.running[0].job.steps_done(), 0, "plan {plan}");
        if plan {
            assert!(
                recomputed_units() >= before + 1.0,
                "the plan recomputed a unit"
            );
        }
        w.retire();
        assert!(matches!(rx.try_recv(), Ok(Err(EngineError::Failed(_)))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn calibration_seeds_the_plans_unit_costs_only_with_the_plan_on() {
    let plan = CalibrationPlan {
        steps: 2,
        mask_ratios: vec![0.2],
    };
    for on in [true, false] {
        let pipe = tiny();
        let shape = ModelShape::of(&pipe).unwrap();
        let mut w = worker(pipe, None);
        w.settings.recompute_plan = on;
        w.calibrate(&shape, &plan).unwrap();
        let units = w.pipe.unet.units().unwrap();
        // Two CFG samples dense; 40 active rows of a 16x16 latent masked.
        match w.unit_costs.predict(2, 40, 256) {
            Some((dense, masked)) => {
                assert!(on, "costs were learned with the plan off");
                assert_eq!((dense.len(), masked.len()), (units, units));
                assert!(dense.iter().chain(&masked).all(|s| s.is_finite()));
                assert!(dense.iter().sum::<f64>() > 0.0);
            }
            None => assert!(!on, "calibration left the plan without costs"),
        }
    }
}
