//! Moves between tiers: a worker fetching the step it is about to run, a loader moving a
//! step toward a worker ahead of need, and the disk reads both share.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use dashmap::mapref::entry::Entry;
use retouch_models::nn::exec::{StepCache, StreamingStep};
use retouch_models::pipeline::Template;

use super::loader::{self, Pending};
use super::shared::{Shared, TemplateCache};
use super::tier::Tier;
use crate::engine::telemetry;

impl Shared {
    /// A step's cache for a worker about to run it: a hit if its tier or the host tier has
    /// it (host hits move up to the worker's tier), else a miss that waits for the load from
    /// disk (another thread's, or its own).
    pub(super) fn fetch(
        &self,
        template: &TemplateCache,
        step: usize,
        worker: usize,
    ) -> Result<Arc<StepCache>, String> {
        if let Some(cache) = self.try_fetch(template, step, worker)? {
            return Ok(cache);
        }
        metrics::counter!(telemetry::CACHE_MISSES).increment(1);
        let waited = Instant::now();
        let loaded = self.load_host(template, step, true);
        metrics::histogram!(telemetry::CACHE_WAIT_SECONDS).record(waited.elapsed().as_secs_f64());
        let cache = loaded?;
        self.place(Tier::Device(worker), &template.key(step), &cache);
        Ok(cache)
    }

    /// A step's cache for a worker from memory: its tier, or the host tier (moving up to
    /// the worker's); None when only the disk has it. Never waits for a load.
    pub(super) fn try_fetch(
        &self,
        template: &TemplateCache,
        step: usize,
        worker: usize,
    ) -> Result<Option<Arc<StepCache>>, String> {
        let key = template.key(step);
        let (device, host) = match self.index.get(&key) {
            Some(e) => (e.get(Tier::Device(worker)).cloned(), e.host.clone()),
            None if template.purged.load(Ordering::SeqCst) => {
                return Err(format!("template {} was deleted", template.id));
            }
            None => {
                return Err(format!(
                    "template {} has no activation cache for step {step}",
                    template.id
                ));
            }
        };
        if let Some(cache) = device {
            self.touch(Tier::Device(worker), &key);
            metrics::counter!(telemetry::CACHE_HITS, "tier" => "device").increment(1);
            return Ok(Some(cache));
        }
        if let Some(cache) = host {
            self.touch(Tier::Host, &key);
            metrics::counter!(telemetry::CACHE_HITS, "tier" => "host").increment(1);
            self.place(Tier::Device(worker), &key, &cache);
            return Ok(Some(cache));
        }
        Ok(None)
    }

    /// The activation cache of `step` if a memory tier holds it (this worker's first), for a
    /// look ahead: no hit is counted and nothing moves between tiers.
    pub(super) fn peek(
        &self,
        template: &TemplateCache,
        step: usize,
        worker: usize,
    ) -> Option<Arc<StepCache>> {
        let entry = self.index.get(&template.key(step))?;
        entry
            .get(Tier::Device(worker))
            .cloned()
            .or_else(|| entry.host.clone())
    }

    /// A step's entries from `first` on, read from disk in order into `stream` for one
    /// forward that recomputes the units before them and reads the rest as they arrive (a
    /// miss). The partial step goes into no tier: other requests want whole steps. Every
    /// entry of `stream` is delivered or failed when this returns; Ok is the bytes read.
    pub(super) fn stream_entries(
        &self,
        template: &TemplateCache,
        step: usize,
        first: usize,
        stream: &StreamingStep,
    ) -> Result<u64, String> {
        metrics::counter!(telemetry::CACHE_MISSES).increment(1);
        let read = |dir: &Path| loader::stream_step(dir, step, first, stream);
        let result = self.timed_read(template, step, true, read, |&bytes| bytes);
        // Entries the file lacked (or a failed read left) would keep the forward waiting.
        match &result {
            Err(e) => stream.fail_rest(e),
            Ok(_) => stream.fail_rest(&format!(
                "template {}, step {step}: the step's file ended before entry {}",
                template.id,
                stream.end()
            )),
        }
        result
    }

    /// Bytes of each entry of the template's steps, from the first readable step file's
    /// header (read once; every step has the same layout).
    pub(super) fn entry_bytes(&self, template: &TemplateCache) -> Option<Vec<u64>> {
        if let Some(bytes) = template.entry_bytes.get() {
            return Some(bytes.clone());
        }
        let dir = template.dir.as_ref()?;
        let bytes = (0..template.steps)
            .find_map(|step| Template::step_cache_entry_bytes(dir, step).ok())?;
        Some(template.entry_bytes.get_or_init(|| bytes).clone())
    }

    /// Moves a step toward a worker ahead of need (a loader's job). Failures are left for
    /// the request that needs the step: its own fetch reports them.
    pub(super) fn prefetch(&self, template: &TemplateCache, step: usize, worker: usize) {
        let key = template.key(step);
        let (device, host) = match self.index.get(&key) {
            Some(e) => (e.get(Tier::Device(worker)).is_some(), e.host.clone()),
            None => return,
        };
        if device {
            self.touch(Tier::Device(worker), &key);
            return;
        }
        let cache = match host {
            Some(cache) => cache,
            None => match self.load_host(template, step, false) {
                Ok(cache) => cache,
                Err(_) => return,
            },
        };
        self.place(Tier::Device(worker), &key, &cache);
    }

    /// The step in host memory, read from disk unless it is there already; concurrent
    /// callers share one read.
    fn load_host(
        &self,
        template: &TemplateCache,
        step: usize,
        demand: bool,
    ) -> Result<Arc<StepCache>, String> {
        let key = template.key(step);
        if let Some(cache) = self.resident(Tier::Host, &key) {
            return Ok(cache);
        }
        let mine = Arc::new(Pending::default());
        let theirs = match self.inflight.entry(key.clone()) {
            Entry::Occupied(o) => Some(Arc::clone(o.get())),
            Entry::Vacant(v) => {
                v.insert(Arc::clone(&mine));
                None
            }
        };
        if let Some(pending) = theirs {
            return pending.wait();
        }
        // A load may have finished between the first look and the claim. Whatever happens,
        // the waiters get an answer: a panic here (an observer's, say) becomes an error.
        let load = || match self.resident(Tier::Host, &key) {
            Some(cache) => Ok(cache),
            None => self.read(template, step, demand).map(|cache| {
                let cache = Arc::new(cache);
                self.place(Tier::Host, &key, &cache);
                cache
            }),
        };
        let result = catch_unwind(AssertUnwindSafe(load)).unwrap_or_else(|_| {
            Err(format!(
                "template {}, step {step}: loading its activation cache panicked",
                template.id
            ))
        });
        self.inflight.remove(&key);
        mine.complete(result.clone());
        result
    }

    /// Reads a step file, recording the load's time and telling the observer.
    fn read(
        &self,
        template: &TemplateCache,
        step: usize,
        demand: bool,
    ) -> Result<StepCache, String> {
        let read = |dir: &Path| loader::read_step(dir, step);
        let result = self.timed_read(template, step, demand, read, |c: &StepCache| {
            c.size_in_bytes() as u64
        });
        if let Ok(cache) = &result
            && let Some(mut entry) = self.index.get_mut(&template.key(step))
        {
            entry.bytes = cache.size_in_bytes() as u64;
        }
        result
    }

    /// Runs `read` on the template's saved folder, recording the read's time, telling the
    /// observer (with `bytes` of what it read) and counting a failure, whose message names
    /// the template and step.
    fn timed_read<T>(
        &self,
        template: &TemplateCache,
        step: usize,
        demand: bool,
        read: impl FnOnce(&Path) -> Result<T, String>,
        bytes: impl Fn(&T) -> u64,
    ) -> Result<T, String> {
        let Some(dir) = &template.dir else {
            return Err(format!(
                "template {}: step {step}'s activation cache is neither in memory nor on disk",
                template.id
            ));
        };
        let started = Instant::now();
        let result = read(dir);
        let ended = Instant::now();
        metrics::histogram!(telemetry::CACHE_LOAD_SECONDS).record((ended - started).as_secs_f64());
        if let Some(observe) = self.observer.get() {
            observe(&loader::LoadEvent {
                template: Arc::clone(&template.id),
                step,
                bytes: result.as_ref().map_or(0, &bytes),
                demand,
                started,
                ended,
                error: result.as_ref().err().cloned(),
            });
        }
        result.map_err(|e| {
            metrics::counter!(telemetry::CACHE_LOAD_ERRORS).increment(1);
            format!(
                "template {}, step {step}: loading its activation cache: {e}",
                template.id
            )
        })
    }
}
