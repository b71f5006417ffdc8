//! The SIMT emulator. A launch runs its blocks one after another on the calling OS thread
//! (in grid order, or shuffled: [`BlockOrder`]); each GPU thread of a block is a coroutine
//! (its own stack, switched in user space), and a small scheduler resumes them in thread
//! order until each reaches a barrier, a warp collective or the end of the kernel:
//!
//! - `__syncthreads` releases once every thread of the block that has not returned is
//!   waiting there (threads that returned count as arrived, as the hardware treats exited
//!   warps);
//! - a warp collective (shuffle, `mma.sync`, `bar.warp.sync`) releases once every live lane
//!   of the warp has posted its words there; it checks that they all reached the same kind
//!   of collective (no divergence) and that no lane reads one that has returned;
//! - when no thread can move (some wait at a barrier others never reach), the launch fails
//!   as deadlocked instead of hanging, and a panicking thread (a bounds check, a trap) fails
//!   it with that thread's message.
//!
//! Shared memory starts as NaN bytes for every block, so a kernel reading what it never
//! wrote shows up. The interleaving is deterministic (thread order between suspensions).

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

use corosensei::stack::DefaultStack;
use corosensei::{Coroutine, CoroutineResult, Yielder};

/// Grid (x, y, z blocks), threads per block (1-D, as every Retouch kernel), the dynamic
/// shared memory in bytes, and the order the blocks run in.
#[derive(Clone, Copy, Debug)]
pub struct Launch {
    pub grid: [u32; 3],
    pub block: u32,
    pub shared_bytes: usize,
    pub order: BlockOrder,
}

/// The order a launch's blocks run in. A GPU promises none, so a kernel must give the same
/// result in any: `Shuffled` checks that (and reaches the cases where some other block
/// than the last in grid order finishes last).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockOrder {
    /// x fastest, then y, then z.
    Grid,
    /// A permutation drawn from the seed.
    Shuffled(u64),
}

impl Launch {
    pub fn new(grid: [u32; 3], block: u32, shared_bytes: usize) -> Launch {
        Launch {
            grid,
            block,
            shared_bytes,
            order: BlockOrder::Grid,
        }
    }

    /// The same launch with its blocks run in `order`.
    pub fn in_order(self, order: BlockOrder) -> Launch {
        Launch { order, ..self }
    }

    /// The block indices in the order they run.
    fn blocks(&self) -> Vec<[u32; 3]> {
        let [gx, gy, gz] = self.grid;
        let mut blocks: Vec<[u32; 3]> = (0..gz)
            .flat_map(|z| (0..gy).flat_map(move |y| (0..gx).map(move |x| [x, y, z])))
            .collect();
        if let BlockOrder::Shuffled(seed) = self.order {
            // Fisher-Yates with xorshift64* (the seed's low bit set: never the zero state).
            let mut state = seed | 1;
            for i in (1..blocks.len()).rev() {
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                let r = state.wrapping_mul(0x2545_f491_4f6c_dd1d);
                blocks.swap(i, (r % (i as u64 + 1)) as usize);
            }
        }
        blocks
    }
}

/// The special registers of the running emulated thread.
#[derive(Clone, Copy)]
pub struct Context {
    pub thread: u32,
    pub block_dim: u32,
    pub block: [u32; 3],
    pub grid: [u32; 3],
    block_state: *const BlockState,
    yielder: *const Yielder<(), Wait>,
}

thread_local! {
    static CONTEXT: Cell<Option<Context>> = const { Cell::new(None) };
    /// Coroutine stacks kept between launches (creating one maps memory).
    static STACKS: RefCell<Vec<DefaultStack>> = const { RefCell::new(Vec::new()) };
}

/// Stack of each emulated thread.
const STACK_BYTES: usize = 512 * 1024;

pub fn context() -> Context {
    CONTEXT
        .get()
        .expect("a kernel intrinsic called outside an emulated launch")
}

fn block_state() -> &'static BlockState {
    // Valid for the whole kernel call: the block's state outlives its threads.
    unsafe { &*context().block_state }
}

pub fn shared_memory() -> *mut u8 {
    block_state().shared.as_ptr() as *mut u8
}

/// Where a thread stands with the scheduler: released to run, or where it stopped when it
/// handed control back.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Wait {
    /// Released: runs at the scheduler's next pass.
    Ready,
    Block,
    Warp,
    /// Returned from the kernel for this block (or failed).
    Done,
}

/// Hands control to the scheduler until released, keeping this thread's context.
fn suspend(wait: Wait) {
    let c = context();
    unsafe { &*c.yielder }.suspend(wait);
    CONTEXT.set(Some(c));
    if block_state().stopping.get() {
        panic::panic_any(Stopped);
    }
}

/// Which warp-wide operation a lane reached; lanes meeting at different ones have diverged.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Collective {
    SyncWarp,
    Shuffle,
    Mma,
}

/// Words each lane contributes to a collective (an `mma` operand set is 6).
const WORDS: usize = 8;

/// The words every lane of the warp contributed to the current collective.
pub struct Lanes<'a> {
    state: &'a BlockState,
    warp: usize,
}

impl Lanes<'_> {
    pub fn word(&self, lane: u32, index: usize) -> u32 {
        let thread = self.warp * 32 + lane as usize;
        assert!(
            thread < self.state.waits.len() && self.state.waits[thread].get() != Wait::Done,
            "a warp collective reads lane {lane}, which has returned or does not exist"
        );
        self.state.words[thread * WORDS + index].get()
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
    let state = block_state();
    let t = c.thread as usize;
    state.kinds[t].set(Some(kind));
    for (i, w) in words.iter().enumerate() {
        state.words[t * WORDS + i].set(*w);
    }
    suspend(Wait::Warp);
    let warp = t / 32;
    for other in warp * 32..(warp * 32 + 32).min(state.waits.len()) {
        if state.waits[other].get() != Wait::Done {
            let theirs = state.kinds[other].get();
            assert!(
                theirs == Some(kind),
                "warp divergence: thread {t} is at {kind:?} while thread {other} is at {theirs:?}"
            );
        }
    }
    let r = result(&Lanes { state, warp }, (t % 32) as u32);
    suspend(Wait::Warp);
    r
}

pub fn sync_block() {
    suspend(Wait::Block);
}

/// Panic payload of threads stopped because another thread of the block failed.
struct Stopped;

/// One block's shared state. Only the launching OS thread touches it (the coroutines run on
/// it one at a time), hence `Cell`s.
struct BlockState {
    waits: Vec<Cell<Wait>>,
    /// The collective each thread last reached.
    kinds: Vec<Cell<Option<Collective>>>,
    words: Vec<Cell<u32>>,
    /// 16-byte units, so 16-byte vector loads of shared memory are aligned.
    shared: Box<[Cell<u128>]>,
    stopping: Cell<bool>,
    failure: RefCell<Option<String>>,
}

impl BlockState {
    fn new(threads: usize, shared_bytes: usize) -> BlockState {
        BlockState {
            waits: (0..threads).map(|_| Cell::new(Wait::Done)).collect(),
            kinds: (0..threads).map(|_| Cell::new(None)).collect(),
            words: (0..threads * WORDS).map(|_| Cell::new(0)).collect(),
            shared: (0..shared_bytes.div_ceil(16).max(1))
                .map(|_| Cell::new(0))
                .collect(),
            stopping: Cell::new(false),
            failure: RefCell::new(None),
        }
    }

    /// Ready for the next block: shared memory NaN bytes, every thread runnable.
    fn reset(&self) {
        for unit in self.shared.iter() {
            unit.set(u128::MAX);
        }
        for w in &self.waits {
            w.set(Wait::Ready);
        }
    }

    fn fail(&self, what: String) {
        self.failure.borrow_mut().get_or_insert(what);
        self.stopping.set(true);
    }

    /// Releases the waits that are complete; false when none is and no thread can move.
    fn release(&self) -> bool {
        let live = |t: usize| self.waits[t].get() != Wait::Done;
        let mut any = false;
        // The block barrier: every live thread there.
        let live_threads: Vec<usize> = (0..self.waits.len()).filter(|&t| live(t)).collect();
        if !live_threads.is_empty()
            && live_threads
                .iter()
                .all(|&t| self.waits[t].get() == Wait::Block)
        {
            for &t in &live_threads {
                self.waits[t].set(Wait::Ready);
            }
            any = true;
        }
        // Each warp's collective: every live lane there.
        for warp in live_threads.chunk_by(|a, b| a / 32 == b / 32) {
            if warp.iter().all(|&t| self.waits[t].get() == Wait::Warp) {
                for &t in warp {
                    self.waits[t].set(Wait::Ready);
                }
                any = true;
            }
        }
        any
    }

    fn describe_waits(&self) -> String {
        let count = |w: Wait| self.waits.iter().filter(|x| x.get() == w).count();
        format!(
            "{} threads at __syncthreads, {} at a warp collective, {} returned",
            count(Wait::Block),
            count(Wait::Warp),
            count(Wait::Done)
        )
    }
}

/// Runs `kernel` as the launch `l`: every thread of every block calls it once.
///
/// # Safety
/// `kernel` is a device kernel call: the pointers it captures must be valid for everything
/// the kernel reads and writes under this launch, as on a GPU.
pub unsafe fn launch<F: Fn()>(l: Launch, kernel: F) {
    quiet_stopped_threads();
    assert!(
        l.block > 0 && l.block <= 1024,
        "block of {} threads",
        l.block
    );
    assert!(l.grid.iter().all(|&g| g > 0), "empty grid {:?}", l.grid);
    let threads = l.block as usize;
    let state = BlockState::new(threads, l.shared_bytes);
    let block = Cell::new([0u32; 3]);
    let finished = Cell::new(false);
    let (state_ref, kernel_ref, block_ref, finished_ref) = (&state, &kernel, &block, &finished);

    let mut coroutines: Vec<_> = (0..l.block)
        .map(|t| {
            let stack = STACKS
                .with_borrow_mut(|s| s.pop())
                .unwrap_or_else(|| DefaultStack::new(STACK_BYTES).expect("a coroutine stack"));
            let body = move |yielder: &Yielder<(), Wait>, ()| loop {
                let b = block_ref.get();
                CONTEXT.set(Some(Context {
                    thread: t,
                    block_dim: l.block,
                    block: b,
                    grid: l.grid,
                    block_state: state_ref,
                    yielder,
                }));
                if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(kernel_ref))
                    && !payload.is::<Stopped>()
                {
                    state_ref.fail(format!("thread {t} of block {b:?}: {}", message(&*payload)));
                }
                CONTEXT.set(None);
                yielder.suspend(Wait::Done);
                if finished_ref.get() {
                    return;
                }
            };
            // SAFETY: everything `body` borrows lives until the coroutines are dropped below.
            unsafe { Coroutine::with_stack_unchecked(stack, body) }
        })
        .collect();

    for b in l.blocks() {
        block.set(b);
        state.reset();
        run_block(&state, &mut coroutines);
        if state.failure.borrow().is_some() {
            break;
        }
    }
    // Every coroutine waits after its last block: let each return, and keep its stack.
    finished.set(true);
    for mut c in coroutines {
        let returned = matches!(c.resume(()), CoroutineResult::Return(()));
        debug_assert!(returned, "a thread body ran past its last block");
        STACKS.with_borrow_mut(|s| s.push(c.into_stack()));
    }
    if let Some(failure) = state.failure.take() {
        panic!("kernel failed in {failure}");
    }
}

/// Resumes the block's threads until every one has returned from the kernel.
fn run_block(state: &BlockState, coroutines: &mut [Coroutine<(), Wait, (), DefaultStack>]) {
    loop {
        for (t, c) in coroutines.iter_mut().enumerate() {
            if state.waits[t].get() == Wait::Ready {
                match c.resume(()) {
                    CoroutineResult::Yield(wait) => state.waits[t].set(wait),
                    CoroutineResult::Return(()) => unreachable!("the thread body loops"),
                }
            }
        }
        if state.waits.iter().all(|w| w.get() == Wait::Done) {
            return;
        }
        if !state.release() {
            // Nobody can move: stop everyone (each unwinds with `Stopped` when resumed).
            state.fail(format!("deadlock: {}", state.describe_waits()));
            for w in &state.waits {
                if w.get() != Wait::Done {
                    w.set(Wait::Ready);
                }
            }
        }
    }
}

/// A panic's message, for a failure report.
pub fn message(payload: &(dyn Any + Send)) -> String {
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
