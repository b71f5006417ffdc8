use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use retouch_models::pipeline::{EditMode, EditRequest};
use retouch_models::unet::UNetConfig;

use super::*;
use crate::masks::centred_box;

fn shape() -> ModelShape {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/tiny/unet/config.json"
    );
    let config: UNetConfig = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    ModelShape {
        flops: StepFlops::new(&config, 77).unwrap(),
        vae_factor: 4,
        levels: 3,
        native_size: 64,
    }
}

/// Bytes missing per (template, worker); everything else resident.
struct Residency(HashMap<(&'static str, usize), u64>);

impl CacheResidency for Residency {
    fn bytes_missing(&self, template: &str, _steps: std::ops::Range<usize>, worker: usize) -> u64 {
        self.0
            .iter()
            .find(|((t, w), _)| *t == template && *w == worker)
            .map_or(0, |(_, b)| *b)
    }
}

fn model() -> CostModel {
    CostModel {
        step_s: 0.001,
        s_per_flop: 1e-10,
        request_s: 0.01,
        load_bytes_per_s: 1e9,
        samples: 10,
    }
}

fn edit_work(shape: &ModelShape, ratio: f64, mode: EditMode) -> Work {
    let mut req = EditRequest::new("x");
    req.mode = mode;
    let mut work = Work::of_edit(shape, &centred_box(64, 64, ratio), &req, 5.0, 64, 64);
    work.steps = 10;
    work.template = Some(("t1".into(), 0..10));
    work
}

fn candidate(requests: usize, tokens: u64, completion_s: f64) -> Candidate {
    Candidate {
        has_room: true,
        requests,
        tokens,
        completion_s,
    }
}

#[test]
fn each_policy_picks_its_least_loaded_worker() {
    let c = [
        candidate(1, 500, 3.0),
        candidate(2, 100, 2.0),
        candidate(3, 300, 1.0),
    ];
    assert_eq!(choose(Routing::Requests, &c, 0), Some(0));
    assert_eq!(choose(Routing::Tokens, &c, 0), Some(1));
    assert_eq!(choose(Routing::Cost, &c, 0), Some(2));
    assert_eq!(choose(Routing::RoundRobin, &c, 1), Some(1));
}

#[test]
fn ties_go_round_robin_and_full_queues_are_skipped() {
    let mut c = [candidate(1, 0, 1.0); 3];
    assert_eq!(choose(Routing::Requests, &c, 2), Some(2));
    assert_eq!(choose(Routing::Cost, &c, 1), Some(1));
    c[1].has_room = false;
    assert_eq!(choose(Routing::Cost, &c, 1), Some(2));
    assert_eq!(choose(Routing::RoundRobin, &c, 1), Some(2));
    for cand in &mut c {
        cand.has_room = false;
    }
    assert_eq!(choose(Routing::Cost, &c, 0), None);
    assert_eq!(choose(Routing::RoundRobin, &[], 0), None);
}

#[test]
fn cost_routing_weighs_outstanding_work_against_cache_loading() {
    let shape = shape();
    // Worker 0 would load 2 GB (2 s) of t1's cache; worker 1 holds it.
    let residency = Residency(HashMap::from([(("t1", 0), 2_000_000_000)]));
    let balancer = Balancer::new(
        Routing::Cost,
        shape.clone(),
        vec![model(), model()],
        Arc::new(residency),
        8,
    );
    let work = edit_work(&shape, 0.15, EditMode::Cached);
    let p0 = balancer.predict(0, &work);
    let p1 = balancer.predict(1, &work);
    assert!((p0.load_s - 2.0).abs() < 1e-9 && p1.load_s == 0.0);
    assert!((p0.total_s() - p1.total_s() - 2.0).abs() < 1e-9);

    let loads = [WorkerLoad::default(), WorkerLoad::default()];
    let view = || [&loads[0], &loads[1]];
    assert_eq!(balancer.route(&work, &view(), 8, 0), Some(1));

    // 3 s of work outstanding on worker 1 outweighs the 2 s load on worker 0.
    let busy = Charge {
        step_us: 300_000,
        steps_left: 10,
        ..Charge::default()
    };
    loads[1].add(&busy);
    assert_eq!(balancer.route(&work, &view(), 8, 0), Some(0));
    // 1 s does not.
    let mut lighter = busy;
    loads[1].release(&mut lighter);
    loads[1].add(&Charge {
        step_us: 100_000,
        steps_left: 10,
        ..Charge::default()
    });
    assert_eq!(balancer.route(&work, &view(), 8, 0), Some(1));
    // A full queue is never picked.
    loads[1].queued.store(8, Ordering::Relaxed);
    assert_eq!(balancer.route(&work, &view(), 8, 1), Some(0));

    // Request counting ignores both work and residency.
    let by_count = Balancer::new(
        Routing::Requests,
        shape,
        vec![model(), model()],
        Arc::new(Residency(HashMap::new())),
        8,
    );
    loads[1].queued.store(0, Ordering::Relaxed);
    assert_eq!(by_count.route(&work, &view(), 8, 0), Some(0));
}

#[test]
fn a_faster_worker_gets_the_request_when_loads_are_equal() {
    let shape = shape();
    let slow = CostModel {
        s_per_flop: 4e-10,
        ..model()
    };
    let balancer = Balancer::new(
        Routing::Cost,
        shape.clone(),
        vec![slow, model()],
        Arc::new(Residency(HashMap::new())),
        8,
    );
    let loads = [WorkerLoad::default(), WorkerLoad::default()];
    let work = edit_work(&shape, 1.0, EditMode::Dense);
    assert_eq!(
        balancer.route(&work, &[&loads[0], &loads[1]], 8, 0),
        Some(1)
    );
}

#[test]
fn a_steps_fixed_cost_is_paid_once_per_fused_step() {
    let shape = shape();
    // A step's fixed cost dominates: 50 ms, against next to nothing per FLOP.
    let fixed = CostModel {
        step_s: 0.05,
        s_per_flop: 1e-15,
        request_s: 0.0,
        ..model()
    };
    let balancer = Balancer::new(
        Routing::Cost,
        shape.clone(),
        vec![fixed, fixed],
        Arc::new(Residency(HashMap::new())),
        8,
    );
    let work = edit_work(&shape, 0.15, EditMode::Cached);
    let p = balancer.predict(0, &work);
    assert!(
        (p.fixed_step_s - 0.05).abs() < 1e-12 && p.step_s < 1e-3,
        "{p:?}"
    );
    // The same 40 request-steps: four running requests of 10 steps on worker 0 (fused:
    // 10 steps to run), one request of 40 steps on worker 1 (40 steps, whatever joins).
    let loads = [WorkerLoad::default(), WorkerLoad::default()];
    let share = |steps| Charge {
        step_us: 1_000,
        steps_left: steps,
        ..Charge::default()
    };
    for _ in 0..4 {
        loads[0].add(&share(10));
    }
    loads[0].running.store(4, Ordering::Relaxed);
    loads[1].add(&share(40));
    loads[1].running.store(1, Ordering::Relaxed);
    assert_eq!(loads[0].work_s(), loads[1].work_s());
    assert_eq!(loads[0].steps_ahead_with(10, 8), 10);
    assert_eq!(loads[1].steps_ahead_with(10, 8), 40);
    assert!(
        balancer.completion_s(0, &loads[0], &work) + 0.7
            < balancer.completion_s(1, &loads[1], &work)
    );
    assert_eq!(
        balancer.route(&work, &[&loads[0], &loads[1]], 8, 1),
        Some(0)
    );
    // Past the batch limit the steps queue up: 20 requests of 10 steps on a batch of 8.
    let crowded = WorkerLoad::default();
    for _ in 0..20 {
        crowded.add(&share(10));
    }
    crowded.running.store(8, Ordering::Relaxed);
    crowded.queued.store(12, Ordering::Relaxed);
    assert_eq!(crowded.steps_ahead_with(10, 8), 27);
    // Discharging takes the request-steps off again.
    let mut c = share(3);
    let idle = WorkerLoad::default();
    idle.add(&c);
    idle.step_done(&mut c);
    assert_eq!(idle.steps_ahead_with(0, 8), 2);
    idle.release(&mut c);
    assert_eq!(idle.steps_ahead_with(0, 8), 0);
    // The longest request sets the bound, and it moves as requests step and leave.
    let mixed = WorkerLoad::default();
    let mut long = share(30);
    let mut short = share(5);
    mixed.add(&long);
    mixed.add(&short);
    assert_eq!(mixed.steps_ahead_with(1, 8), 30);
    mixed.step_done(&mut long);
    mixed.step_done(&mut short);
    assert_eq!(mixed.steps_ahead_with(1, 8), 29);
    mixed.release(&mut long);
    assert_eq!(mixed.steps_ahead_with(1, 8), 4);
    mixed.release(&mut short);
    assert_eq!(mixed.steps_ahead_with(1, 8), 1);
}

#[test]
fn cached_edits_cost_less_than_dense_ones_and_guidance_doubles_the_batch() {
    let shape = shape();
    let dense = edit_work(&shape, 0.15, EditMode::Dense);
    let cached = edit_work(&shape, 0.15, EditMode::Cached);
    let full_cached = edit_work(&shape, 1.0, EditMode::Cached);
    assert!(
        cached.step_flops < 0.6 * dense.step_flops,
        "{cached:?} {dense:?}"
    );
    assert!(cached.step_tokens < dense.step_tokens);
    assert_eq!(dense.step_tokens, 2 * 256);
    assert_eq!(full_cached.step_flops, dense.step_flops);

    let mut req = EditRequest::new("x");
    req.guidance = Some(1.0);
    let unguided = Work::of_edit(&shape, &centred_box(64, 64, 0.15), &req, 5.0, 64, 64);
    assert_eq!(unguided.step_tokens, 256);
    assert!((2.0 * unguided.step_flops - dense.step_flops).abs() < 1e-6 * dense.step_flops);

    // A mask of the wrong size is priced as dense rather than failing here.
    req.mode = EditMode::Cached;
    req.guidance = None;
    let odd = Work::of_edit(&shape, &centred_box(32, 32, 0.1), &req, 5.0, 64, 64);
    assert_eq!(odd.step_flops, dense.step_flops);
}

#[test]
fn charges_discharge_to_zero() {
    let load = WorkerLoad::default();
    let mut a = Charge {
        step_us: 1000,
        step_tokens: 50,
        steps_left: 3,
        other_us: 500,
    };
    let mut b = Charge {
        step_us: 10,
        step_tokens: 5,
        steps_left: 2,
        other_us: 0,
    };
    load.add(&a);
    load.add(&b);
    assert_eq!(load.tokens(), 160);
    assert!((load.work_s() - 0.00352).abs() < 1e-12);
    load.step_done(&mut a);
    assert_eq!((a.steps_left, load.tokens()), (2, 110));
    load.release(&mut a);
    load.step_done(&mut b);
    load.step_done(&mut b);
    // More steps than charged (a request the model under-counted) stays at zero.
    load.step_done(&mut b);
    load.release(&mut b);
    assert_eq!((load.tokens(), load.work_s()), (0, 0.0));
    assert_eq!(a, Charge::default());
}

#[test]
fn routing_names_round_trip() {
    for r in [
        Routing::Cost,
        Routing::Requests,
        Routing::Tokens,
        Routing::RoundRobin,
    ] {
        assert_eq!(r.to_string().parse::<Routing>(), Ok(r));
    }
    assert!(
        "fastest"
            .parse::<Routing>()
            .unwrap_err()
            .contains("fastest")
    );
}

#[test]
fn pooled_timings_fit_the_fastest_of_each_shape() {
    // Step seconds = 2 ms + 1 ns per FLOP; worker 1 was timed during a burst of other work.
    let line = |f: f64| 0.002 + 1e-9 * f;
    let flops = [4e8, 1e8, 2e8, 3e8];
    let quiet = Timings {
        shapes: flops.iter().map(|&f| (f, line(f))).collect(),
        request_s: 0.03,
        steps: 12,
    };
    let noisy = Timings {
        shapes: flops.iter().map(|&f| (f, 3.0 * line(f))).collect(),
        request_s: 0.09,
        steps: 12,
    };
    for pool in [vec![quiet.clone(), noisy.clone()], vec![noisy, quiet]] {
        let m = fit_workers(&pool, 1e9).unwrap();
        assert!((m.step_s - 0.002).abs() < 1e-9, "{m:?}");
        assert!((m.s_per_flop - 1e-9).abs() < 1e-15, "{m:?}");
        assert_eq!(
            (m.request_s, m.samples, m.load_bytes_per_s),
            (0.03, 24, 1e9)
        );
    }
    assert!(fit_workers(&[], 1e9).is_err());
}
