//! A request's hold on a template's activation cache: a [`CacheLease`] from the moment the
//! request is accepted, a [`StepWindow`] once it runs on a worker. The window pins the
//! request's current and next steps (so eviction never drops them from its worker's tier)
//! and keeps prefetch loads queued for the `prefetch_steps` steps ahead of it.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use retouch_models::nn::exec::{StepCache, StreamingStep};

use super::shared::TemplateCache;
use super::{CacheManager, Tier};
use crate::engine::request::EngineError;

/// While any lease on a template is open, deleting the template only hides it: its cache
/// and folder go when the last lease ends, so accepted requests finish.
pub struct CacheLease {
    manager: CacheManager,
    template: Arc<TemplateCache>,
    /// Prefetch loads already queued: toward this worker, for steps below this.
    queued: Option<(usize, usize)>,
}

impl CacheLease {
    pub(super) fn new(manager: CacheManager, template: Arc<TemplateCache>) -> CacheLease {
        CacheLease {
            manager,
            template,
            queued: None,
        }
    }

    pub(super) fn is_deleted(&self) -> bool {
        self.template.deleted.load(Ordering::SeqCst)
    }

    pub fn template_id(&self) -> &str {
        &self.template.id
    }

    /// Starts moving the request's first steps, from `first_step` on, toward the worker it
    /// was routed to.
    pub fn prefetch(&mut self, worker: usize, first_step: usize) {
        let until = self.window_end(first_step);
        self.manager
            .queue(&self.template, first_step..until, worker);
        self.queued = Some((worker, until));
    }

    fn window_end(&self, at: usize) -> usize {
        (at + self.manager.shared.prefetch_steps).min(self.template.steps)
    }

    /// The request starts running on `worker` at step `first_step` of the template's.
    pub fn start(self, worker: usize, first_step: usize) -> StepWindow {
        let queued_until = match self.queued {
            Some((w, until)) if w == worker => until,
            _ => first_step,
        };
        let mut window = StepWindow {
            lease: self,
            worker,
            at: first_step,
            queued_until,
        };
        window.pin(window.pinned(), 1);
        window.queue_ahead();
        window
    }
}

impl Drop for CacheLease {
    fn drop(&mut self) {
        let t = &self.template;
        if t.leases.fetch_sub(1, Ordering::SeqCst) == 1
            && t.deleted.load(Ordering::SeqCst)
            && let Err(e) = self.manager.shared.purge(t, true)
        {
            eprintln!("warning: deleting template {}: {e}", t.id);
        }
    }
}

/// A running request's view of its template's cache on its worker.
pub struct StepWindow {
    lease: CacheLease,
    worker: usize,
    /// The next step to run.
    at: usize,
    queued_until: usize,
}

impl StepWindow {
    /// The activation cache of `step` (normally the current one), in this worker's tier.
    /// A step not resident is a miss: this waits for its load, and a failed load fails the
    /// request that needed it with the reason.
    pub fn fetch(&self, step: usize) -> Result<Arc<StepCache>, EngineError> {
        let shared = &self.lease.manager.shared;
        shared
            .fetch(&self.lease.template, step, self.worker)
            .map_err(EngineError::Failed)
    }

    /// The activation cache of `step` if a memory tier holds it for this worker; None when
    /// only the disk has it (a miss the caller may plan around). Never waits.
    pub fn try_fetch(&self, step: usize) -> Result<Option<Arc<StepCache>>, EngineError> {
        let shared = &self.lease.manager.shared;
        shared
            .try_fetch(&self.lease.template, step, self.worker)
            .map_err(EngineError::Failed)
    }

    /// The activation cache of `step` if a memory tier holds it, without counting a hit or
    /// moving it (a GPU worker uploading its next step ahead).
    pub fn peek(&self, step: usize) -> Option<Arc<StepCache>> {
        self.lease
            .manager
            .shared
            .peek(&self.lease.template, step, self.worker)
    }

    /// Entries `first..` of `step` read from disk in order into `stream`, for one forward
    /// that recomputes the units before them and reads the rest as they arrive; the partial
    /// step enters no tier. Ok is the bytes read; on an error every entry not read is failed.
    pub fn stream_from(
        &self,
        step: usize,
        first: usize,
        stream: &StreamingStep,
    ) -> Result<u64, String> {
        let shared = &self.lease.manager.shared;
        shared.stream_entries(&self.lease.template, step, first, stream)
    }

    /// Bytes of each cache entry of the template's steps (None without a saved cache).
    pub fn entry_bytes(&self) -> Option<Vec<u64>> {
        self.lease.manager.shared.entry_bytes(&self.lease.template)
    }

    /// The request moved on to step `next`: the pins and the prefetch window follow.
    pub fn advance(&mut self, next: usize) {
        if next == self.at {
            return;
        }
        let old = self.pinned();
        self.at = next;
        // New pins first, so a step pinned before and after is never unpinned between.
        self.pin(self.pinned(), 1);
        self.unpin(old);
        self.queue_ahead();
    }

    /// The current and next steps.
    fn pinned(&self) -> std::ops::Range<usize> {
        self.at..(self.at + 2).min(self.lease.template.steps)
    }

    /// Releases pins; the tiers they held over budget shrink back.
    fn unpin(&self, steps: std::ops::Range<usize>) {
        self.pin(steps, -1);
        let shared = &self.lease.manager.shared;
        shared.trim(Tier::Device(self.worker));
        shared.trim(Tier::Host);
    }

    fn pin(&self, steps: std::ops::Range<usize>, delta: i32) {
        let t = &self.lease.template;
        for step in steps {
            self.lease
                .manager
                .shared
                .pin(&t.key(step), self.worker, delta);
        }
    }

    fn queue_ahead(&mut self) {
        let end = self.lease.window_end(self.at);
        let start = self.queued_until.max(self.at);
        if start < end {
            self.lease
                .manager
                .queue(&self.lease.template, start..end, self.worker);
            self.queued_until = end;
        }
    }
}

impl Drop for StepWindow {
    fn drop(&mut self) {
        self.unpin(self.pinned());
    }
}
