//! The cache manager: templates' activation caches (one `StepCache` per denoising step) in
//! three tiers, each step placed on its own:
//!
//! - **device**: resident for one worker, with a byte budget per worker. A CPU worker's
//!   device tier shares the host copy's memory (an `Arc`, no copy). A GPU worker's pipeline
//!   keeps the device copies itself (`retouch_models::pipeline::device_steps`, the same
//!   budget): each step this manager hands the worker as an `Arc` is uploaded once and
//!   reused across calls while that `Arc` lives in a tier here.
//! - **host**: shared host memory, with one byte budget.
//! - **disk**: the template's saved folder, one safetensors file per step.
//!
//! Each memory tier evicts least recently used steps by bytes when it goes over budget,
//! except steps pinned by a running request (its current and next steps) and, in the host
//! tier, steps with no disk copy: without a cache directory the host tier is the only copy,
//! so its budget is then counted and reported but not enforced. A running step holds its
//! cache as an `Arc`, so eviction never frees memory under it. Memory in use is bounded by
//! the host budget plus the device budgets (a device entry may outlive its host copy), plus
//! pinned steps.
//!
//! Loads go disk -> host -> worker. When a cached-mode edit is routed, a loader thread
//! starts moving the first `prefetch_steps` steps toward its worker; as the request steps,
//! the window moves on. A step still missing when the worker needs it is a miss: the
//! worker waits for the load under way, or reads the file itself.

mod lease;
mod loader;
mod moves;
mod shared;
#[cfg(test)]
mod tests;
mod tier;

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use retouch_models::nn::exec::StepCache;
use retouch_models::pipeline::Template;

pub use lease::{CacheLease, StepWindow};
pub use loader::LoadEvent;
pub use tier::Tier;

use super::request::EngineError;
use loader::LoadJob;
use shared::{Shared, StepEntry, TemplateCache};

/// Budgets and threads of the cache manager.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// Host-memory budget, shared by all workers.
    pub host_bytes: u64,
    /// Device-tier budget of each worker.
    pub device_bytes: u64,
    /// Steps loaded ahead of a running request.
    pub prefetch_steps: usize,
    /// Loader threads.
    pub loaders: usize,
}

impl Default for CacheConfig {
    fn default() -> CacheConfig {
        CacheConfig {
            host_bytes: 8 << 30,
            device_bytes: 4 << 30,
            prefetch_steps: 4,
            loaders: 2,
        }
    }
}

/// Prefetch jobs waiting at most; past it, prefetches are skipped (steps then load on
/// demand), so a burst of requests cannot grow the queue without bound.
const MAX_QUEUED_LOADS: usize = 4096;

/// A cheap, cloneable handle: the scheduler, the workers, the template store and each
/// request's lease share one manager.
#[derive(Clone)]
pub struct CacheManager {
    shared: Arc<Shared>,
    jobs: flume::Sender<LoadJob>,
}

impl CacheManager {
    /// A manager for `workers` workers, its loader threads started.
    pub fn new(config: &CacheConfig, workers: usize) -> std::io::Result<CacheManager> {
        let shared = Arc::new(Shared::new(
            workers,
            config.host_bytes,
            config.device_bytes,
            config.prefetch_steps,
        ));
        let (jobs, receiver) = flume::bounded(MAX_QUEUED_LOADS);
        loader::spawn(&shared, &receiver, config.loaders.max(1))?;
        for tier in [Tier::Host, Tier::Disk]
            .into_iter()
            .chain((0..workers).map(Tier::Device))
        {
            shared::gauge(tier, 0);
        }
        Ok(CacheManager { shared, jobs })
    }

    /// Registers a template's cache just recorded in memory; `dir` is its saved folder when
    /// it was also written to disk (then the host tier may evict its steps). Its first steps
    /// are placed last, so under a tight budget they are the ones that stay.
    pub fn add_in_memory(&self, id: &str, cache: Vec<StepCache>, dir: Option<PathBuf>) {
        let template = self.register(id, cache.len(), dir.clone());
        let mut disk = 0;
        let caches: Vec<_> = cache
            .into_iter()
            .enumerate()
            .map(|(step, c)| {
                // A step whose file is missing keeps its host copy: it is the only one.
                let file = dir.as_deref().and_then(|d| file_len(d, step));
                disk += file.unwrap_or(0);
                let entry = StepEntry::new(self.shared.workers, c.size_in_bytes() as u64, file);
                self.shared.index.insert(template.key(step), entry);
                Arc::new(c)
            })
            .collect();
        self.shared.change_disk_bytes(disk, 0);
        for (step, cache) in caches.iter().enumerate().rev() {
            self.shared.place(Tier::Host, &template.key(step), cache);
        }
    }

    /// Registers a template of `steps` steps saved in `dir` (`Template::save`'s layout)
    /// with nothing in memory: its steps load when wanted. A missing or corrupt step file
    /// fails only the requests that need that step.
    pub fn add_saved(&self, id: &str, steps: usize, dir: PathBuf) {
        let steps = if Template::has_saved_cache(&dir) {
            steps
        } else {
            0
        };
        let mut disk = 0;
        let template = self.register(id, steps, Some(dir.clone()));
        for step in 0..steps {
            // A missing file is found out by the request that needs the step.
            let file = file_len(&dir, step).unwrap_or(0);
            disk += file;
            let entry = StepEntry::new(self.shared.workers, file, Some(file));
            self.shared.index.insert(template.key(step), entry);
        }
        self.shared.change_disk_bytes(disk, 0);
    }

    fn register(&self, id: &str, steps: usize, dir: Option<PathBuf>) -> Arc<TemplateCache> {
        // Ids are not reused; if one were, the old registration's memory goes first (not
        // the folder: the new one was just saved there).
        if let Some((_, old)) = self.shared.templates.remove(id) {
            let _ = self.shared.purge(&old, false);
        }
        let template = Arc::new(TemplateCache {
            id: Arc::from(id),
            steps,
            dir,
            leases: AtomicUsize::new(0),
            deleted: AtomicBool::new(false),
            purged: AtomicBool::new(false),
            entry_bytes: std::sync::OnceLock::new(),
        });
        self.shared
            .templates
            .insert(Arc::clone(&template.id), Arc::clone(&template));
        template
    }

    /// Forgets a template: its cache and saved folder go now, or when the last request
    /// holding a lease on it ends. False if unknown.
    pub fn remove(&self, id: &str) -> std::io::Result<bool> {
        let Some((_, template)) = self.shared.templates.remove(id) else {
            return Ok(false);
        };
        template.deleted.store(true, Ordering::SeqCst);
        if template.leases.load(Ordering::SeqCst) == 0 {
            self.shared.purge(&template, true)?;
        }
        Ok(true)
    }

    /// A lease on a template's cache for a cached-mode edit; fails if the template is
    /// unknown or has no activation cache.
    pub fn lease(&self, id: &str) -> Result<CacheLease, EngineError> {
        let unknown = || EngineError::NotFound(format!("unknown template `{id}`"));
        let template = self
            .shared
            .templates
            .get(id)
            .map(|t| Arc::clone(&t))
            .ok_or_else(unknown)?;
        if template.steps == 0 {
            return Err(EngineError::Invalid(format!(
                "cached-mode edits need the template's activation cache; template {id} has \
                 none (use dense mode, or register it again)"
            )));
        }
        template.leases.fetch_add(1, Ordering::SeqCst);
        let lease = CacheLease::new(self.clone(), template);
        // Deleted meanwhile: dropping the lease finishes the deletion.
        if lease.is_deleted() {
            return Err(unknown());
        }
        Ok(lease)
    }

    /// Queues prefetch jobs; skipped when the queue is full.
    fn queue(&self, template: &Arc<TemplateCache>, steps: std::ops::Range<usize>, worker: usize) {
        for step in steps {
            self.shared.queued.fetch_add(1, Ordering::SeqCst);
            let job = LoadJob {
                template: Arc::clone(template),
                step,
                worker,
            };
            if self.jobs.try_send(job).is_err() {
                self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// Bytes of a template's activation cache a cached-mode edit of `steps` routed to
    /// `worker` would read from disk (in neither its tier nor host memory, which a CPU
    /// worker reads in place): what the balancer charges for loading. 0 for an unknown
    /// template.
    pub fn bytes_missing(&self, id: &str, steps: Range<usize>, worker: usize) -> u64 {
        self.step_sum(id, steps, |e| {
            if e.get(Tier::Device(worker)).is_none() && e.get(Tier::Host).is_none() {
                e.bytes
            } else {
                0
            }
        })
    }

    /// Bytes of a template's activation cache in memory (estimated from its files for steps
    /// not loaded yet).
    pub fn template_bytes(&self, id: &str) -> u64 {
        self.step_sum(id, 0..usize::MAX, |e| e.bytes)
    }

    /// `f` summed over the template's steps in `steps`.
    fn step_sum(&self, id: &str, steps: Range<usize>, f: impl Fn(&StepEntry) -> u64) -> u64 {
        let Some(template) = self.shared.templates.get(id).map(|t| Arc::clone(&t)) else {
            return 0;
        };
        (steps.start..steps.end.min(template.steps))
            .filter_map(|step| self.shared.index.get(&template.key(step)).map(|e| f(&e)))
            .sum()
    }

    /// Steps of a template with an activation cache (0: unknown, or none).
    pub fn cached_steps(&self, id: &str) -> usize {
        self.shared.templates.get(id).map_or(0, |t| t.steps)
    }

    /// Whether a template's step is in a tier.
    pub fn is_in(&self, id: &str, step: usize, tier: Tier) -> bool {
        let key = (Arc::from(id), step);
        match tier {
            Tier::Disk => self.shared.index.get(&key).is_some_and(|e| e.on_disk),
            _ => self.shared.resident(tier, &key).is_some(),
        }
    }

    /// Bytes in a tier (for disk, the step files).
    pub fn tier_bytes(&self, tier: Tier) -> u64 {
        self.shared.tier_bytes(tier)
    }

    /// Prefetch jobs queued or running.
    pub fn pending_loads(&self) -> usize {
        self.shared.queued.load(Ordering::SeqCst)
    }

    /// Sets the hook told of every load from disk (start and end times, for a tracer);
    /// false if one was set already.
    pub fn on_load(&self, hook: impl Fn(&LoadEvent) + Send + Sync + 'static) -> bool {
        self.shared.observer.set(Box::new(hook)).is_ok()
    }
}

fn file_len(dir: &std::path::Path, step: usize) -> Option<u64> {
    std::fs::metadata(Template::step_cache_path(dir, step))
        .ok()
        .map(|m| m.len())
}
