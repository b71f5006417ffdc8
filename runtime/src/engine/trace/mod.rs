//! Message traces. With `EngineConfig::trace`, the actors record every message they handle
//! (and each admission, step and retirement) as one JSON object per line, in the format of
//! `actor_trace::Record`, which `tools/actor-trace` reads. The record type lives in that
//! crate so writer and reader share one definition while the tool builds without the
//! runtime's model stack.
//!
//! Records go through a bounded flume channel to a writer thread of their own, so an actor never
//! waits on file I/O: when the channel is full a record is dropped and counted, and the
//! count goes in the final `trace_end` record. A disabled [`Tracer`] is a `None`: each call
//! returns at once, before any record is built.

mod events;

use flume::{Receiver, Sender};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

pub use actor_trace::{BatchEntry, Record, kinds};
pub use events::{WorkerTrace, cache_loaded, worker_actor};

/// Records the writer may fall behind by before new ones are dropped.
const CHANNEL_RECORDS: usize = 16 * 1024;

/// A cheap, cloneable handle to the trace sink, named for the actor that records with it.
#[derive(Clone, Default)]
pub struct Tracer {
    sink: Option<Arc<Sink>>,
    actor: Arc<str>,
}

struct Sink {
    /// Times in records are microseconds since this instant (the engine's start).
    epoch: Instant,
    tx: Sender<Line>,
    dropped: AtomicU64,
    closed: AtomicBool,
    writer: Mutex<Option<JoinHandle<()>>>,
}

enum Line {
    Record(Record),
    /// Written, flushed, and the writer stops.
    Last(Record),
}

impl Tracer {
    /// Records nothing.
    pub fn disabled() -> Tracer {
        Tracer::default()
    }

    /// Creates (or truncates) `path` and starts its writer thread.
    pub fn to_file(path: &Path) -> Result<Tracer, String> {
        Tracer::with_capacity(path, CHANNEL_RECORDS)
    }

    fn with_capacity(path: &Path, capacity: usize) -> Result<Tracer, String> {
        let shown = path.display().to_string();
        let file = File::create(path).map_err(|e| format!("trace file {shown}: {e}"))?;
        let (tx, rx) = flume::bounded(capacity);
        let writer = std::thread::Builder::new()
            .name("retouch-trace".into())
            .spawn(move || write_lines(rx, file, &shown))
            .map_err(|e| format!("starting the trace writer: {e}"))?;
        Ok(Tracer {
            sink: Some(Arc::new(Sink {
                epoch: Instant::now(),
                tx,
                dropped: AtomicU64::new(0),
                closed: AtomicBool::new(false),
                writer: Mutex::new(Some(writer)),
            })),
            actor: "engine".into(),
        })
    }

    /// The same sink, recording as `actor`.
    pub fn named(&self, actor: &str) -> Tracer {
        Tracer {
            sink: self.sink.clone(),
            actor: actor.into(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.sink.is_some()
    }

    /// Microseconds from the engine's start to `t` (0 for earlier instants).
    pub fn us(&self, t: Instant) -> u64 {
        self.sink.as_ref().map_or(0, |s| {
            t.saturating_duration_since(s.epoch).as_micros() as u64
        })
    }

    /// Queues a record (its `actor` filled in with this tracer's name when empty); never
    /// blocks. After [`Tracer::finish`] records are ignored.
    pub fn record(&self, mut record: Record) {
        let Some(sink) = &self.sink else { return };
        if sink.closed.load(Ordering::Acquire) {
            return;
        }
        if record.actor.is_empty() {
            record.actor = self.actor.to_string();
        }
        // Full: the writer fell behind. Disconnected: it stopped on an I/O error.
        if sink.tx.try_send(Line::Record(record)).is_err() {
            sink.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records dropped so far.
    pub fn dropped(&self) -> u64 {
        self.sink
            .as_ref()
            .map_or(0, |s| s.dropped.load(Ordering::Relaxed))
    }

    /// Writes the `trace_end` record (with the dropped count) and waits for the writer to
    /// flush and stop. Idempotent; the last handle dropped does it too.
    pub fn finish(&self) {
        if let Some(sink) = &self.sink {
            sink.finish();
        }
    }
}

impl Sink {
    fn finish(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let now = Instant::now()
            .saturating_duration_since(self.epoch)
            .as_micros() as u64;
        let end = Record {
            actor: "tracer".into(),
            kind: kinds::TRACE_END.into(),
            start_us: now,
            end_us: now,
            dropped: Some(self.dropped.load(Ordering::Relaxed)),
            ..Record::default()
        };
        // Blocking is fine here (shutdown, not an actor's step): the writer is draining.
        // If it already stopped on an error the send fails and there is nothing to wait for.
        let _ = self.tx.send(Line::Last(end));
        let handle = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The writer thread's body; an I/O error stops it (later records count as dropped).
fn write_lines(rx: Receiver<Line>, file: File, path: &str) {
    if let Err(e) = drain(&rx, &mut BufWriter::new(file)) {
        eprintln!("retouch: trace file {path}: {e}; tracing stopped");
    }
}

/// One line per record, flushed whenever the channel runs dry so the file holds every
/// record sent so far (for a reader while serving, or after the server is killed).
fn drain(rx: &Receiver<Line>, out: &mut impl Write) -> std::io::Result<()> {
    while let Ok(line) = rx.recv() {
        let mut next = Some(line);
        while let Some(line) = next.take() {
            let (record, last) = match line {
                Line::Record(r) => (r, false),
                Line::Last(r) => (r, true),
            };
            serde_json::to_writer(&mut *out, &record)?;
            out.write_all(b"\n")?;
            if last {
                return out.flush();
            }
            next = rx.try_recv().ok();
        }
        out.flush()?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("retouch-tracer-{tag}-{}", std::process::id()))
    }

    fn lines(path: &Path) -> Vec<Record> {
        let text = std::fs::read_to_string(path).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn step(at: u64) -> Record {
        Record {
            kind: kinds::STEP.into(),
            start_us: at,
            end_us: at + 1,
            ..Record::default()
        }
    }

    #[test]
    fn records_are_written_under_the_actor_name_then_the_end_record() {
        let path = temp("written");
        let tracer = Tracer::to_file(&path).unwrap();
        let worker = tracer.named("worker-3");
        worker.record(step(1));
        worker.record(step(2));
        tracer.finish();
        worker.record(step(3));
        let got = lines(&path);
        assert_eq!(got.len(), 3, "the record after finish is ignored");
        assert_eq!(got[0].actor, "worker-3");
        assert_eq!(got[1].start_us, 2);
        assert_eq!(got[2].kind, kinds::TRACE_END);
        assert_eq!(got[2].dropped, Some(0));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_full_channel_drops_and_counts_instead_of_blocking() {
        // A sink whose writer starts only after the records are sent: two fit, three drop.
        let path = temp("dropped");
        let (tx, rx) = flume::bounded(2);
        let tracer = Tracer {
            sink: Some(Arc::new(Sink {
                epoch: Instant::now(),
                tx,
                dropped: AtomicU64::new(0),
                closed: AtomicBool::new(false),
                writer: Mutex::new(None),
            })),
            actor: "worker-0".into(),
        };
        for at in 0..5 {
            tracer.record(step(at));
        }
        assert_eq!(tracer.dropped(), 3);
        let file = File::create(&path).unwrap();
        let shown = path.display().to_string();
        let writer = std::thread::spawn(move || write_lines(rx, file, &shown));
        *tracer.sink.as_ref().unwrap().writer.lock().unwrap() = Some(writer);
        drop(tracer);
        let got = lines(&path);
        let starts: Vec<u64> = got.iter().map(|r| r.start_us).collect();
        assert_eq!(starts[..2], [0, 1]);
        assert_eq!(
            got[2].dropped,
            Some(3),
            "the last handle's drop ends the trace"
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_disabled_tracer_records_nothing() {
        let tracer = Tracer::disabled();
        tracer.record(step(1));
        tracer.finish();
        assert!(!tracer.enabled());
        assert_eq!((tracer.dropped(), tracer.us(Instant::now())), (0, 0));
    }

    #[test]
    fn an_unwritable_path_is_an_error_naming_it() {
        let err = Tracer::to_file(Path::new("/no/such/dir/trace.jsonl"))
            .err()
            .unwrap();
        assert!(err.contains("/no/such/dir/trace.jsonl"), "{err}");
    }
}
