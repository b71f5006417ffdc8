//! Loader threads: a small pool fed by a flume channel of prefetch jobs (a template step to
//! move toward a worker), plus what loads share: the disk read and the in-flight record
//! that lets concurrent wants of one step wait for a single read.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use retouch_models::nn::exec::{StepCache, StreamingStep};
use retouch_models::pipeline::Template;

use super::shared::{Shared, TemplateCache, lock};

/// One load from disk, for a tracer: the hook set with `CacheManager::on_load` gets one per
/// step file read.
#[derive(Clone, Debug)]
pub struct LoadEvent {
    pub template: Arc<str>,
    pub step: usize,
    /// Bytes in memory once loaded (0 when the load failed).
    pub bytes: u64,
    /// A worker was waiting for it (a miss); false for a prefetch.
    pub demand: bool,
    pub started: Instant,
    pub ended: Instant,
    pub error: Option<String>,
}

pub(super) type Observer = Box<dyn Fn(&LoadEvent) + Send + Sync>;

/// Move a template step toward a worker.
pub(super) struct LoadJob {
    pub(super) template: Arc<TemplateCache>,
    pub(super) step: usize,
    pub(super) worker: usize,
}

/// Starts `n` loader threads; each ends when every sender of the channel is gone.
pub(super) fn spawn(
    shared: &Arc<Shared>,
    jobs: &flume::Receiver<LoadJob>,
    n: usize,
) -> std::io::Result<()> {
    for i in 0..n {
        let (shared, jobs) = (Arc::clone(shared), jobs.clone());
        std::thread::Builder::new()
            .name(format!("retouch-cache-loader-{i}"))
            .spawn(move || {
                for job in jobs.iter() {
                    // A panic must not take the thread (and the pool's capacity) with it.
                    let _ = catch_unwind(AssertUnwindSafe(|| {
                        shared.prefetch(&job.template, job.step, job.worker)
                    }));
                    shared.queued.fetch_sub(1, Ordering::SeqCst);
                }
            })?;
    }
    Ok(())
}

/// Reads one step file; a panic in the reader becomes an error.
pub(super) fn read_step(dir: &Path, step: usize) -> Result<StepCache, String> {
    unwound(dir, step, || Template::load_step_cache(dir, step))
}

/// Reads one step file's entries from `first` on into `stream` as each is read; the bytes
/// read, or the reason it stopped (a panic included).
pub(super) fn stream_step(
    dir: &Path,
    step: usize,
    first: usize,
    stream: &StreamingStep,
) -> Result<u64, String> {
    let mut bytes = 0u64;
    unwound(dir, step, || {
        Template::stream_step_cache(dir, step, first, &mut |index, entry| {
            bytes += entry.size_in_bytes() as u64;
            stream.deliver(index, Ok(entry));
        })
    })?;
    Ok(bytes)
}

/// A reader of step file `step`, its error or panic as a message.
fn unwound<T>(
    dir: &Path,
    step: usize,
    read: impl FnOnce() -> retouch_models::Result<T>,
) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(read)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "{}: the reader panicked",
            Template::step_cache_path(dir, step).display()
        )),
    }
}

type LoadResult = Result<Arc<StepCache>, String>;

/// A load under way; others wanting the same step wait for its result.
#[derive(Default)]
pub(super) struct Pending {
    result: Mutex<Option<LoadResult>>,
    ready: Condvar,
}

impl Pending {
    pub(super) fn complete(&self, result: LoadResult) {
        *lock(&self.result) = Some(result);
        self.ready.notify_all();
    }

    pub(super) fn wait(&self) -> LoadResult {
        let mut guard = lock(&self.result);
        loop {
            if let Some(result) = guard.as_ref() {
                return result.clone();
            }
            guard = self.ready.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
    }
}
