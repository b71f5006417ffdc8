//! The SIMT emulator: a launch runs its blocks one after another, each block's threads as OS
//! threads. Barriers are rendezvous that count threads that have returned as arrived (as
//! the hardware does for exited warps); a warp collective (shuffle, `mma.sync`, `bar.warp`)
//! is a rendezvous of the warp's lanes that also checks every live lane reached the same
//! kind of collective and that no lane reads an exited one. A deadlock (a barrier some
//! thread never reaches) fails the launch after [`DEADLOCK`] instead of hanging, and a
//! panicking thread (a bounds check, a trap) fails it with that thread's message.

use std::any::Any;
use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::{Condvar, Mutex, Once};
use std::time::Duration;

/// How long a barrier waits before the launch is declared deadlocked.
pub const DEADLOCK: Duration = Duration::from_secs(60);

/// Grid (x, y, z blocks), threads per block (1-D, as every Retouch kernel), and the dynamic
/// shared memory in bytes.
#[derive(Clone, Copy, Debug)]
pub struct Launch {
    pub grid: [u32; 3],
    pub block: u32,
    pub shared_bytes: usize,
}

impl Launch {
    pub fn new(grid: [u32; 3], block: u32, shared_bytes: usize) -> Launch {
        Launch {
            grid,
            block,
            shared_bytes,
        }
    }
}

/// The special registers of the calling emulated thread.
#[derive(Clone, Copy)]
pub struct Context {
    pub thread: u32,
    pub block_dim: u32,
    pub block: [u32; 3],
    pub grid: [u32; 3],
    state: *const BlockState,
}

thread_local! {
    static CONTEXT: Cell<Option<Context>> = const { Cell::new(None) };
}

pub fn context() -> Context {
    CONTEXT
        .get()
        .expect("a kernel intrinsic called outside an emulated launch")
}

fn block_state() -> &'static BlockState {
    // Valid for the whole kernel call: the block's state outlives its threads.
    unsafe { &*context().state }
}

pub fn shared_memory() -> *mut u8 {
    block_state().shared as *mut u8
}

/// Which warp-wide operation a lane reached; lanes meeting at different ones have diverged.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u32)]
pub enum Collective {
    SyncWarp = 1,
    Shuffle = 2,
    Mma = 3,
}

/// Words each lane contributes to a collective (an `mma` operand set is 6).
const WORDS: usize = 8;

/// The words every lane of the warp contributed to the current collective.
pub struct Lanes<'a>(&'a Warp);

impl Lanes<'_> {
    pub fn word(&self, lane: u32, index: usize) -> u32 {
        let warp = self.0;
        assert!(
            (lane as usize) < warp.lanes && !warp.exited[lane as usize].load(Relaxed),
            "a warp collective reads lane {lane}, which has exited or does not exist"
        );
        warp.words[lane as usize * WORDS + index].load(Relaxed)
    }
}

/// One collective: each lane posts `words`, all live lanes meet, each computes its result
/// from every lane's words, and all meet again before the words may be overwritten.
pub fn warp_collective<T>(
    kind: Collective,
    words: &[u32],
    result: impl FnOnce(&Lanes, u32) -> T,
) -> T {
    let c = context();
    let warp = &block_state().warps[(c.thread / 32) as usize];
    let lane = c.thread % 32;
    warp.kinds[lane as usize].store(kind as u32, Relaxed);
    for (i, w) in words.iter().enumerate() {
        warp.words[lane as usize * WORDS + i].store(*w, Relaxed);
    }
    warp.barrier.wait("warp collective");
    for other in 0..warp.lanes {
        if !warp.exited[other].load(Relaxed) {
            let theirs = warp.kinds[other].load(Relaxed);
            assert!(
                theirs == kind as u32,
                "warp divergence: lane {lane} is at {kind:?} while lane {other} is at collective {theirs}"
            );
        }
    }
    let r = result(&Lanes(warp), lane);
    warp.barrier.wait("warp collective");
    r
}

pub fn sync_block() {
    block_state().barrier.wait("__syncthreads");
}

/// Panic payload of threads stopped because another thread of the block failed.
struct Stopped;

struct Warp {
    lanes: usize,
    barrier: Barrier,
    exited: Vec<AtomicBool>,
    kinds: Vec<AtomicU32>,
    words: Vec<AtomicU32>,
}

struct BlockState {
    barrier: Barrier,
    warps: Vec<Warp>,
    /// 16-byte units, so 16-byte vector loads of shared memory are aligned.
    shared: *mut u128,
    shared_units: usize,
    failure: Mutex<Option<String>>,
}

impl BlockState {
    fn new(threads: usize, shared_bytes: usize) -> BlockState {
        let shared_units = shared_bytes.div_ceil(16).max(1);
        let shared = Box::into_raw(vec![0u128; shared_units].into_boxed_slice()) as *mut u128;
        let state = BlockState {
            barrier: Barrier::new(threads),
            warps: (0..threads.div_ceil(32))
                .map(|w| {
                    let lanes = (threads - 32 * w).min(32);
                    Warp {
                        lanes,
                        barrier: Barrier::new(lanes),
                        exited: (0..32).map(|_| AtomicBool::new(false)).collect(),
                        kinds: (0..32).map(|_| AtomicU32::new(0)).collect(),
                        words: (0..32 * WORDS).map(|_| AtomicU32::new(0)).collect(),
                    }
                })
                .collect(),
            shared,
            shared_units,
            failure: Mutex::new(None),
        };
        state.reset();
        state
    }

    /// Ready for the next block: every thread present again, shared memory NaN bytes (a
    /// kernel reading what it never wrote shows up). Called while no thread runs the kernel.
    fn reset(&self) {
        self.barrier.reset(self.warps.iter().map(|w| w.lanes).sum());
        for w in &self.warps {
            w.barrier.reset(w.lanes);
            for e in &w.exited {
                e.store(false, Relaxed);
            }
        }
        unsafe { std::ptr::write_bytes(self.shared, 0xff, self.shared_units) };
    }

    fn stop_all(&self) {
        self.barrier.poison();
        for w in &self.warps {
            w.barrier.poison();
        }
    }

    fn thread_done(&self, thread: u32) {
        let warp = &self.warps[(thread / 32) as usize];
        warp.exited[(thread % 32) as usize].store(true, Relaxed);
        warp.barrier.leave();
        self.barrier.leave();
    }

    fn fail(&self, thread: u32, block: [u32; 3], payload: &(dyn Any + Send)) {
        if !payload.is::<Stopped>() {
            let mut failure = self.failure.lock().unwrap();
            failure.get_or_insert_with(|| {
                format!("thread {thread} of block {block:?}: {}", message(payload))
            });
        }
        self.stop_all();
    }
}

impl Drop for BlockState {
    fn drop(&mut self) {
        let slice = std::ptr::slice_from_raw_parts_mut(self.shared, self.shared_units);
        drop(unsafe { Box::from_raw(slice) });
    }
}

/// Runs `kernel` as the launch `l`: every thread of every block calls it once. The block's
/// threads are spawned once per launch and run the blocks in order, meeting after each.
///
/// # Safety
/// `kernel` is a device kernel call: the pointers it captures must be valid for everything
/// the kernel reads and writes under this launch, as on a GPU.
pub unsafe fn launch<F: Fn()>(l: Launch, kernel: F) {
    struct Shared<'a, F>(F, &'a BlockState, &'a Barrier);
    unsafe impl<F> Sync for Shared<'_, F> {}
    quiet_stopped_threads();
    assert!(
        l.block > 0 && l.block <= 1024,
        "block of {} threads",
        l.block
    );
    assert!(l.grid.iter().all(|&g| g > 0), "empty grid {:?}", l.grid);
    let threads = l.block as usize;
    let state = BlockState::new(threads, l.shared_bytes);
    let block_end = Barrier::new(threads);
    let shared = Shared(kernel, &state, &block_end);
    let blocks: Vec<[u32; 3]> = (0..l.grid[2])
        .flat_map(|z| (0..l.grid[1]).flat_map(move |y| (0..l.grid[0]).map(move |x| [x, y, z])))
        .collect();
    let blocks = &blocks;
    std::thread::scope(|s| {
        for t in 0..l.block {
            let shared = &shared;
            std::thread::Builder::new()
                .stack_size(1 << 20)
                .spawn_scoped(s, move || {
                    let (kernel, state, block_end) = (&shared.0, shared.1, shared.2);
                    for &block in blocks {
                        CONTEXT.set(Some(Context {
                            thread: t,
                            block_dim: l.block,
                            block,
                            grid: l.grid,
                            state,
                        }));
                        match panic::catch_unwind(AssertUnwindSafe(kernel)) {
                            Ok(()) => state.thread_done(t),
                            Err(payload) => state.fail(t, block, &*payload),
                        }
                        CONTEXT.set(None);
                        block_end.wait_then("the end of a block", || state.reset());
                        if state.failure.lock().unwrap().is_some() {
                            break;
                        }
                    }
                })
                .expect("spawning an emulated thread");
        }
    });
    if let Some(failure) = state.failure.lock().unwrap().take() {
        panic!("kernel failed in {failure}");
    }
}

fn message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-text panic)".into()
    }
}

/// Threads stopped after another failed unwind with `Stopped`; their panics are not news.
fn quiet_stopped_threads() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !info.payload().is::<Stopped>() {
                default(info);
            }
        }));
    });
}

/// A reusable barrier whose party count drops as threads exit.
struct Barrier {
    state: Mutex<BarrierState>,
    released: Condvar,
}

struct BarrierState {
    parties: usize,
    arrived: usize,
    generation: u64,
    poisoned: bool,
}

impl Barrier {
    fn new(parties: usize) -> Barrier {
        Barrier {
            state: Mutex::new(BarrierState {
                parties,
                arrived: 0,
                generation: 0,
                poisoned: false,
            }),
            released: Condvar::new(),
        }
    }

    fn wait(&self, what: &str) {
        self.wait_then(what, || {});
    }

    /// `wait`, with `last` run by the last thread to arrive before any is released.
    fn wait_then(&self, what: &str, last: impl FnOnce()) {
        let mut s = self.state.lock().unwrap();
        if s.poisoned {
            drop(s);
            panic::panic_any(Stopped);
        }
        s.arrived += 1;
        if s.arrived == s.parties {
            last();
            s.arrived = 0;
            s.generation += 1;
            self.released.notify_all();
            return;
        }
        let generation = s.generation;
        while s.generation == generation && !s.poisoned {
            let (next, timeout) = self.released.wait_timeout(s, DEADLOCK).unwrap();
            s = next;
            if timeout.timed_out() && s.generation == generation {
                let (arrived, parties) = (s.arrived, s.parties);
                drop(s);
                panic!("deadlock at {what}: {arrived} of {parties} threads arrived");
            }
        }
        if s.generation == generation {
            drop(s);
            panic::panic_any(Stopped);
        }
    }

    /// A thread returned: it no longer holds up the others.
    fn leave(&self) {
        let mut s = self.state.lock().unwrap();
        s.parties -= 1;
        if s.arrived > 0 && s.arrived == s.parties {
            s.arrived = 0;
            s.generation += 1;
            self.released.notify_all();
        }
    }

    /// Every party present again and nobody waiting (between blocks).
    fn reset(&self, parties: usize) {
        let mut s = self.state.lock().unwrap();
        s.parties = parties;
        s.arrived = 0;
        s.poisoned = false;
    }

    fn poison(&self) {
        self.state.lock().unwrap().poisoned = true;
        self.released.notify_all();
    }
}
