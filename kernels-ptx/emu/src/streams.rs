//! Streams that run their work late, as a GPU may.
//!
//! A stream's operations (launches, asynchronous copies and memsets, stream-ordered frees,
//! event records and waits) are queued when the host enqueues them and run, in order, only
//! when the host makes them: a synchronisation of that stream or of an event recorded on it,
//! a wait of another stream's work on such an event, or a queue past [`MAX_PENDING`]
//! operations (a GPU's launch queue is bounded too). A query of unfinished work answers
//! "not ready" without running it. Synchronous copies and memsets (the driver's, on the
//! legacy default stream) run that stream's work first. So work that reads what another stream writes without waiting for
//! it reads the 0xff bytes (NaN) fresh memory holds, and a host that refills a page-locked
//! buffer before the copy from it ran sends the new bytes: the ordering mistakes a GPU makes
//! visible only sometimes, made visible every time. Copies from pageable host memory take
//! their bytes when enqueued, and copies into it finish before the call returns, as the
//! driver documents.
//!
//! An operation that fails (a kernel's bounds check) reports on stderr when it runs; from
//! then on every synchronisation fails, as a faulted context does on a GPU.
//! `RETOUCH_EMU_IMMEDIATE=1` runs every operation when enqueued instead.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::{self, ThreadId};
use std::time::Instant;

/// Queued operations one stream may hold before the enqueuing call runs the oldest.
pub const MAX_PENDING: usize = 1024;

/// Queued work: `Err` carries the failure's message.
pub type Work = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// A stream, by its handle's address (0: the legacy default stream).
pub type StreamId = usize;

/// A point in a stream: done once the stream has run its operations before `ticket`.
#[derive(Clone, Copy, Debug)]
pub struct Point {
    stream: StreamId,
    ticket: u64,
}

/// An event: where it was last recorded, and when that record ran.
pub struct Event {
    recorded: Mutex<Option<Point>>,
    time: Mutex<Instant>,
}

impl Event {
    pub fn new() -> Arc<Event> {
        Arc::new(Event {
            recorded: Mutex::new(None),
            time: Mutex::new(Instant::now()),
        })
    }

    /// When the event's last record ran (its creation if none did).
    pub fn time(&self) -> Instant {
        *lock(&self.time)
    }

    fn recorded(&self) -> Option<Point> {
        *lock(&self.recorded)
    }
}

enum Op {
    Work(Work),
    Record(Arc<Event>),
    /// Runs another stream up to this point first.
    Wait(Point),
}

#[derive(Default)]
struct Queue {
    pending: VecDeque<Op>,
    /// The ticket the next enqueued operation gets.
    next: u64,
    /// Operations run so far: every ticket below this.
    done: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere leaves plain data behind: keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn queues() -> MutexGuard<'static, HashMap<StreamId, Queue>> {
    static QUEUES: OnceLock<Mutex<HashMap<StreamId, Queue>>> = OnceLock::new();
    lock(QUEUES.get_or_init(Default::default))
}

/// The first failure of a queued operation, reported by every later synchronisation.
fn failure() -> MutexGuard<'static, Option<String>> {
    static FAILURE: Mutex<Option<String>> = Mutex::new(None);
    lock(&FAILURE)
}

/// `Err` with the first failure's message once an operation has failed.
pub fn status() -> Result<(), String> {
    failure().clone().map_or(Ok(()), Err)
}

fn immediate() -> bool {
    static IMMEDIATE: OnceLock<bool> = OnceLock::new();
    *IMMEDIATE.get_or_init(|| std::env::var("RETOUCH_EMU_IMMEDIATE").is_ok_and(|v| v == "1"))
}

/// One thread at a time runs queued operations (re-entered by the thread that holds it, as
/// a wait runs another stream from inside a run), so a stream's operations never overlap.
struct Runner {
    owner: Mutex<(Option<ThreadId>, usize)>,
    free: Condvar,
}

static RUNNER: Runner = Runner {
    owner: Mutex::new((None, 0)),
    free: Condvar::new(),
};

struct Running;

impl Runner {
    fn enter(&self) -> Running {
        let me = thread::current().id();
        let mut owner = lock(&self.owner);
        while owner.0.is_some_and(|id| id != me) {
            owner = self.free.wait(owner).unwrap_or_else(|e| e.into_inner());
        }
        owner.0 = Some(me);
        owner.1 += 1;
        Running
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut owner = lock(&RUNNER.owner);
        owner.1 -= 1;
        if owner.1 == 0 {
            owner.0 = None;
            RUNNER.free.notify_all();
        }
    }
}

/// Queues `work` on `stream`.
pub fn enqueue(stream: StreamId, work: Work) {
    push(stream, Op::Work(work));
}

/// Records `event` at the current end of `stream`.
pub fn record(event: &Arc<Event>, stream: StreamId) {
    let ticket = push(stream, Op::Record(event.clone()));
    *lock(&event.recorded) = Some(Point {
        stream,
        ticket: ticket + 1,
    });
}

/// Makes `stream`'s later operations wait for `event`'s last record (none: nothing to wait
/// for).
pub fn wait(stream: StreamId, event: &Event) {
    if let Some(point) = event.recorded() {
        push(stream, Op::Wait(point));
    }
}

/// Whether `event`'s last record has run (see [`not_ready`]).
pub fn event_done(event: &Event) -> bool {
    let Some(point) = event.recorded() else {
        return true;
    };
    if reached(point) {
        return true;
    }
    not_ready(point.stream);
    false
}

/// Whether `stream` has no queued work (see [`not_ready`]).
pub fn stream_done(stream: StreamId) -> bool {
    let pending = queues().get(&stream).is_some_and(|q| !q.pending.is_empty());
    if pending {
        not_ready(stream);
    }
    !pending
}

/// A query answered "not ready". A query makes no progress, so a host that treats "not
/// ready" as "use something else" is tested; only every [`POLLS_PER_STEP`]th such answer
/// runs one of the stream's operations, so a host polling until done still gets there.
fn not_ready(stream: StreamId) {
    static ANSWERS: AtomicU64 = AtomicU64::new(0);
    if ANSWERS.fetch_add(1, Relaxed) % POLLS_PER_STEP == POLLS_PER_STEP - 1 {
        step(stream);
    }
}

/// "Not ready" answers per operation run (see [`not_ready`]).
const POLLS_PER_STEP: u64 = 1024;

fn reached(point: Point) -> bool {
    queues()
        .get(&point.stream)
        .is_none_or(|q| q.done >= point.ticket)
}

/// Runs `stream`'s oldest queued operation, if any.
fn step(stream: StreamId) {
    let done = queues().get(&stream).map_or(0, |q| q.done);
    run_until(Point {
        stream,
        ticket: done + 1,
    });
}

/// Runs `stream`'s queued operations.
pub fn finish(stream: StreamId) -> Result<(), String> {
    let end = queues().get(&stream).map_or(0, |q| q.next);
    run_until(Point {
        stream,
        ticket: end,
    });
    status()
}

/// Runs what `event`'s last record waits for.
pub fn finish_event(event: &Event) -> Result<(), String> {
    if let Some(point) = event.recorded() {
        run_until(point);
    }
    status()
}

/// Runs every stream's queued operations.
pub fn finish_all() -> Result<(), String> {
    let ends: Vec<Point> = queues()
        .iter()
        .map(|(&stream, q)| Point {
            stream,
            ticket: q.next,
        })
        .collect();
    for point in ends {
        run_until(point);
    }
    status()
}

/// Forgets a destroyed stream once its work has run.
pub fn destroy(stream: StreamId) -> Result<(), String> {
    let result = finish(stream);
    queues().remove(&stream);
    result
}

/// Queues `op` and returns its ticket, running what must run now: immediate mode's at once,
/// and a full queue's oldest. The legacy default stream (0) is a stream like the others:
/// Retouch's other streams are non-blocking, as cudarc makes them, so neither waits for the
/// other.
fn push(stream: StreamId, op: Op) -> u64 {
    let (ticket, pending) = {
        let mut queues = queues();
        let queue = queues.entry(stream).or_default();
        queue.pending.push_back(op);
        queue.next += 1;
        (queue.next - 1, queue.pending.len())
    };
    if immediate() {
        run_until(Point {
            stream,
            ticket: ticket + 1,
        });
    } else if pending > MAX_PENDING {
        run_until(Point {
            stream,
            ticket: ticket + 1 - MAX_PENDING as u64 / 2,
        });
    }
    ticket
}

/// Runs `point.stream`'s operations before `point.ticket` (and, for its waits, the other
/// streams' operations they wait for).
fn run_until(point: Point) {
    let _running = RUNNER.enter();
    loop {
        let op = {
            let mut queues = queues();
            let Some(queue) = queues.get_mut(&point.stream) else {
                return;
            };
            if queue.done >= point.ticket {
                return;
            }
            queue
                .pending
                .pop_front()
                .expect("a ticket below `next` is queued or done")
        };
        let result = match op {
            Op::Work(work) => work(),
            Op::Record(event) => {
                *lock(&event.time) = Instant::now();
                Ok(())
            }
            Op::Wait(other) => {
                run_until(other);
                Ok(())
            }
        };
        if let Err(message) = result {
            eprintln!("emulated driver: {message}");
            failure().get_or_insert(message);
        }
        if let Some(queue) = queues().get_mut(&point.stream) {
            queue.done += 1;
        }
    }
}

/// Runs `f` if no stream has work left: none queued, and none running on another thread
/// (an operation being run is off its queue already). From inside an operation (a queued
/// free), that operation is the one running.
pub fn when_idle(f: impl FnOnce()) {
    let _running = RUNNER.enter();
    if queues().values().all(|q| q.pending.is_empty()) {
        f();
    }
}
