//! The cache manager on small fake templates: step caches of group-norm statistics (8 bytes
//! each), saved in `Template::save`'s layout.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use retouch_kernels::{DType, Device, GroupStats, Tensor};
use retouch_models::nn::exec::{CacheEntry, StepCache};
use retouch_models::pipeline::{RgbImage, Template, TemplateSpec};

use super::{CacheConfig, CacheManager, Tier};
use crate::engine::request::EngineError;

/// Statistics per fake step: 8 bytes each, so a step holds 800 bytes.
const STATS: usize = 100;
const STEP_BYTES: u64 = (STATS * 8) as u64;

fn step_cache(step: usize) -> StepCache {
    let stats = (0..STATS)
        .map(|i| GroupStats {
            mean: step as f32 * 1000.0 + i as f32,
            rstd: 1.0,
        })
        .collect();
    StepCache {
        first: 0,
        entries: vec![CacheEntry::Stats {
            stats,
            moments: Vec::new(),
        }],
    }
}

/// Which step a cache was made for (its first mean).
fn step_of(cache: &StepCache) -> usize {
    match &cache.entries[0] {
        CacheEntry::Stats { stats, .. } => (stats[0].mean / 1000.0) as usize,
        other => panic!("unexpected entry {other:?}"),
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("retouch-cache-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A template of `steps` fake steps, saved under `dir`; answers its caches.
fn saved_template(dir: &std::path::Path, steps: usize) -> Vec<StepCache> {
    let template = Template {
        spec: TemplateSpec {
            prompt: "fake".into(),
            negative_prompt: String::new(),
            seed: 0,
            steps,
            guidance: 1.0,
            scheduler: "ddim".into(),
            width: 8,
            height: 8,
        },
        trajectory: (0..=steps)
            .map(|_| Tensor::zeros(&[1, 1, 1, 4], DType::F32, Device::Cpu))
            .collect(),
        image: RgbImage {
            width: 1,
            height: 1,
            pixels: vec![0; 3],
        },
        cache: (0..steps).map(step_cache).collect(),
    };
    template.save(dir).unwrap();
    template.cache
}

fn manager(host_steps: u64, device_steps: u64, prefetch: usize, workers: usize) -> CacheManager {
    let config = CacheConfig {
        host_bytes: host_steps * STEP_BYTES,
        device_bytes: device_steps * STEP_BYTES,
        prefetch_steps: prefetch,
        loaders: 2,
    };
    CacheManager::new(&config, workers).unwrap()
}

fn wait_for_loads(cache: &CacheManager) {
    let start = Instant::now();
    while cache.pending_loads() > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "loads never ended"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn in_tier(cache: &CacheManager, id: &str, tier: Tier, steps: usize) -> Vec<usize> {
    (0..steps).filter(|&s| cache.is_in(id, s, tier)).collect()
}

#[test]
fn the_host_budget_evicts_least_recently_used_steps_and_keeps_their_disk_copies() {
    let dir = temp_dir("host-budget");
    let caches = saved_template(&dir.join("t1"), 4);
    let cache = manager(2, 100, 0, 1);
    cache.add_in_memory("t1", caches, Some(dir.join("t1")));
    // The first steps are placed last, so they are the ones kept.
    assert_eq!(in_tier(&cache, "t1", Tier::Host, 4), vec![0, 1]);
    assert_eq!(in_tier(&cache, "t1", Tier::Disk, 4), vec![0, 1, 2, 3]);
    assert_eq!(cache.tier_bytes(Tier::Host), 2 * STEP_BYTES);
    assert!(
        cache.tier_bytes(Tier::Disk) > 4 * STEP_BYTES,
        "files hold a header too"
    );

    // An evicted step loads back from disk, the same as it was.
    let window = cache.lease("t1").unwrap().start(0, 0);
    let step3 = window.fetch(3).unwrap();
    assert_eq!(step_of(&step3), 3);
    assert!(cache.is_in("t1", 3, Tier::Device(0)));
    // The window pins steps 0 and 1, so the host tier, over budget, lets the new step pass
    // through to the worker's tier rather than drop them.
    assert_eq!(in_tier(&cache, "t1", Tier::Host, 4), vec![0, 1]);
    drop(window);
    // Unpinned, the least recently used goes first.
    let key = (Arc::from("t1"), 2);
    cache
        .shared
        .place(Tier::Host, &key, &Arc::new(step_cache(2)));
    assert_eq!(in_tier(&cache, "t1", Tier::Host, 4), vec![0, 2]);
    assert_eq!(cache.tier_bytes(Tier::Host), 2 * STEP_BYTES);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn without_a_disk_copy_the_host_tier_counts_its_budget_but_never_evicts() {
    let cache = manager(1, 100, 0, 1);
    cache.add_in_memory("t1", (0..3).map(step_cache).collect(), None);
    assert_eq!(in_tier(&cache, "t1", Tier::Host, 3), vec![0, 1, 2]);
    assert_eq!(cache.tier_bytes(Tier::Host), 3 * STEP_BYTES);
    assert_eq!(cache.tier_bytes(Tier::Disk), 0);
    // Edits still read every step, from the host tier.
    let window = cache.lease("t1").unwrap().start(0, 0);
    assert_eq!(step_of(&window.fetch(2).unwrap()), 2);
    assert!(cache.remove("t1").unwrap());
    assert!(
        cache.is_in("t1", 0, Tier::Host),
        "a running edit keeps the cache"
    );
    drop(window);
    assert!(!cache.is_in("t1", 0, Tier::Host));
    assert_eq!(cache.tier_bytes(Tier::Host), 0);
}

#[test]
fn steps_move_from_disk_to_host_to_each_worker() {
    let dir = temp_dir("tiers");
    saved_template(&dir.join("t1"), 3);
    let cache = manager(100, 100, 0, 2);
    cache.add_saved("t1", 3, dir.join("t1"));
    assert!(in_tier(&cache, "t1", Tier::Host, 3).is_empty());
    let on_disk = cache.bytes_missing("t1", 0..usize::MAX, 0);
    assert!(
        on_disk >= 3 * STEP_BYTES,
        "estimated from the files: {on_disk}"
    );
    assert_eq!(cache.template_bytes("t1"), on_disk);

    let w0 = cache.lease("t1").unwrap().start(0, 0);
    assert_eq!(step_of(&w0.fetch(1).unwrap()), 1);
    assert!(cache.is_in("t1", 1, Tier::Host));
    assert!(cache.is_in("t1", 1, Tier::Device(0)));
    assert!(!cache.is_in("t1", 1, Tier::Device(1)));
    // Loaded, the step's size is exact.
    let missing = cache.bytes_missing("t1", 0..usize::MAX, 0);
    assert!(missing < on_disk && missing >= 2 * STEP_BYTES);
    // Worker 1 reads the host copy in place: nothing more to load from disk for it.
    assert_eq!(cache.bytes_missing("t1", 0..usize::MAX, 1), missing);

    // Another worker finds it in the host tier and takes it up to its own.
    let w1 = cache.lease("t1").unwrap().start(1, 0);
    assert_eq!(step_of(&w1.fetch(1).unwrap()), 1);
    assert!(cache.is_in("t1", 1, Tier::Device(1)));
    assert_eq!(cache.tier_bytes(Tier::Device(1)), STEP_BYTES);
    assert_eq!(cache.bytes_missing("unknown", 0..usize::MAX, 0), 0);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_device_budget_evicts_only_steps_no_running_request_pins() {
    let dir = temp_dir("device-budget");
    saved_template(&dir.join("t1"), 4);
    let cache = manager(100, 1, 0, 1);
    cache.add_saved("t1", 4, dir.join("t1"));
    let mut window = cache.lease("t1").unwrap().start(0, 0);
    window.fetch(0).unwrap();
    window.fetch(1).unwrap();
    // Both pinned (current and next step): over budget rather than evicted.
    assert_eq!(in_tier(&cache, "t1", Tier::Device(0), 4), vec![0, 1]);
    window.advance(1);
    window.fetch(2).unwrap();
    assert_eq!(in_tier(&cache, "t1", Tier::Device(0), 4), vec![1, 2]);
    window.advance(3);
    window.fetch(3).unwrap();
    assert_eq!(in_tier(&cache, "t1", Tier::Device(0), 4), vec![3]);
    assert_eq!(cache.tier_bytes(Tier::Device(0)), STEP_BYTES);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_missing_or_corrupt_step_file_fails_only_the_step_that_needs_it() {
    let dir = temp_dir("corrupt");
    saved_template(&dir.join("t1"), 3);
    let corrupt = Template::step_cache_path(dir.join("t1"), 1);
    std::fs::write(&corrupt, b"not a safetensors file").unwrap();
    let missing = Template::step_cache_path(dir.join("t1"), 2);
    std::fs::remove_file(&missing).unwrap();
    let cache = manager(100, 100, 0, 1);
    cache.add_saved("t1", 3, dir.join("t1"));
    let window = cache.lease("t1").unwrap().start(0, 0);
    assert_eq!(step_of(&window.fetch(0).unwrap()), 0);
    for (step, path) in [(1, &corrupt), (2, &missing)] {
        let Err(EngineError::Failed(message)) = window.fetch(step) else {
            panic!("step {step} should fail");
        };
        assert!(
            message.contains(&format!("template t1, step {step}")),
            "{message}"
        );
        assert!(message.contains(&path.display().to_string()), "{message}");
    }
    // The failures are not remembered: a repaired file loads.
    std::fs::copy(Template::step_cache_path(dir.join("t1"), 0), &missing).unwrap();
    assert_eq!(step_of(&window.fetch(2).unwrap()), 0, "a copy of step 0");
    assert_eq!(step_of(&window.fetch(0).unwrap()), 0);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_prefetch_window_moves_steps_toward_the_worker_ahead_of_need() {
    let dir = temp_dir("prefetch");
    saved_template(&dir.join("t1"), 6);
    let cache = manager(100, 100, 2, 2);
    cache.add_saved("t1", 6, dir.join("t1"));
    let loads = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&loads);
    assert!(cache.on_load(move |e| {
        assert!(e.ended >= e.started && e.error.is_none());
        counted.fetch_add(1, Ordering::SeqCst);
    }));

    // Routed to worker 1: its first two steps move there while the request queues.
    let mut lease = cache.lease("t1").unwrap();
    lease.prefetch(1, 0);
    wait_for_loads(&cache);
    assert_eq!(in_tier(&cache, "t1", Tier::Device(1), 6), vec![0, 1]);
    assert_eq!(loads.load(Ordering::SeqCst), 2);
    let mut window = lease.start(1, 0);
    wait_for_loads(&cache);
    assert_eq!(
        loads.load(Ordering::SeqCst),
        2,
        "already queued: no new loads"
    );
    for step in 0..6 {
        window.advance(step);
        wait_for_loads(&cache);
        let want: Vec<usize> = (0..(step + 2).min(6)).collect();
        assert_eq!(in_tier(&cache, "t1", Tier::Device(1), 6), want);
        assert_eq!(step_of(&window.fetch(step).unwrap()), step);
    }
    assert_eq!(loads.load(Ordering::SeqCst), 6, "each step read once");
    assert!(in_tier(&cache, "t1", Tier::Device(0), 6).is_empty());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_edit_that_starts_late_prefetches_and_pins_only_its_own_steps() {
    let dir = temp_dir("prefetch-late");
    saved_template(&dir.join("t1"), 6);
    let cache = manager(100, 100, 2, 2);
    cache.add_saved("t1", 6, dir.join("t1"));
    // An edit of strength 0.5 runs steps 3-5: nothing before step 3 moves.
    let mut lease = cache.lease("t1").unwrap();
    lease.prefetch(0, 3);
    wait_for_loads(&cache);
    assert_eq!(in_tier(&cache, "t1", Tier::Device(0), 6), vec![3, 4]);
    let mut window = lease.start(0, 3);
    for step in 3..6 {
        window.advance(step);
        wait_for_loads(&cache);
        assert_eq!(step_of(&window.fetch(step).unwrap()), step);
    }
    assert_eq!(in_tier(&cache, "t1", Tier::Device(0), 6), vec![3, 4, 5]);
    // Started on another worker than the prefetch's, the window queues from its own start.
    let window = cache.lease("t1").unwrap().start(1, 4);
    wait_for_loads(&cache);
    assert_eq!(in_tier(&cache, "t1", Tier::Device(1), 6), vec![4, 5]);
    drop(window);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn concurrent_wants_of_one_step_share_one_read() {
    let dir = temp_dir("shared-read");
    saved_template(&dir.join("t1"), 1);
    let cache = manager(100, 100, 0, 4);
    cache.add_saved("t1", 1, dir.join("t1"));
    let loads = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&loads);
    cache.on_load(move |_| {
        counted.fetch_add(1, Ordering::SeqCst);
    });
    std::thread::scope(|s| {
        for worker in 0..4 {
            let cache = cache.clone();
            s.spawn(move || {
                let window = cache.lease("t1").unwrap().start(worker, 0);
                assert_eq!(step_of(&window.fetch(0).unwrap()), 0);
            });
        }
    });
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn deleting_a_template_waits_for_the_requests_holding_it() {
    let dir = temp_dir("delete");
    saved_template(&dir.join("t1"), 2);
    let cache = manager(100, 100, 0, 1);
    cache.add_saved("t1", 2, dir.join("t1"));
    let window = cache.lease("t1").unwrap().start(0, 0);
    assert!(cache.remove("t1").unwrap());
    assert!(matches!(cache.lease("t1"), Err(EngineError::NotFound(_))));
    assert!(dir.join("t1").is_dir(), "a running edit still reads it");
    assert_eq!(step_of(&window.fetch(1).unwrap()), 1);
    drop(window);
    assert!(!dir.join("t1").exists());
    assert!(!cache.is_in("t1", 1, Tier::Host));
    assert_eq!(cache.tier_bytes(Tier::Disk), 0);
    assert!(!cache.remove("t1").unwrap());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn leases_need_a_known_template_with_a_cache() {
    let dir = temp_dir("no-cache");
    saved_template(&dir.join("t1"), 2);
    std::fs::remove_dir_all(dir.join("t1").join("cache")).unwrap();
    let cache = manager(100, 100, 0, 1);
    cache.add_saved("t1", 2, dir.join("t1"));
    assert_eq!(cache.cached_steps("t1"), 0);
    match cache.lease("t1") {
        Err(EngineError::Invalid(m)) => assert!(m.contains("activation cache"), "{m}"),
        _ => panic!("a template without a cache gives no lease"),
    }
    assert!(matches!(cache.lease("t9"), Err(EngineError::NotFound(_))));
    let _ = std::fs::remove_dir_all(dir);
}
