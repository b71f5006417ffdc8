//! The CUDA driver API over the emulator: the functions of `libcuda` that cudarc calls for
//! Retouch's device, exported unmangled, so the whole GPU path (cudarc, the host launchers,
//! the device UNet walk, the selftest) runs on the CPU when this library is loaded as
//! `libcuda.so` (`tools/emu-run`).
//!
//! Device memory is host memory (a device pointer is the host address), filled with 0xff
//! bytes when allocated, so a kernel or copy reading memory nothing wrote sees NaN. Stream
//! operations run late, when the host makes them run (`crate::streams`), so work that skips
//! a needed wait or synchronisation reads memory not yet written; memory freed is filled
//! with 0xff bytes (on a stream: when the free runs) and given back to the host only once
//! every stream is idle. An event's time is when its record ran. `cuLaunchKernel` runs the
//! kernel the module's PTX names through [`crate::simt::launch`] when its stream gets there,
//! its blocks in an order shuffled per launch (a GPU promises none); a kernel that fails (a
//! bounds check, a deadlock) reports on stderr then, and the synchronisations after it fail
//! with `CUDA_ERROR_LAUNCH_FAILED`. A launch the hardware would refuse (more than 1024
//! threads, an empty or oversized grid, more dynamic shared memory than the function allows:
//! 48 KiB unless raised with `cuFuncSetAttribute`) returns `CUDA_ERROR_INVALID_VALUE` at
//! once, with the reason on stderr. One device, reporting compute capability 9.0 with an
//! H100's 132 multiprocessors and 227 KiB of shared memory per block.
//!
//! With `RETOUCH_EMU_SKIP_KERNELS=1` launches are checked (a known function, 1-D blocks) but
//! not run, device memory is addresses only and copies to or from it are skipped: results are
//! garbage, and what a step costs is the host's own work (Retouch's launchers, cudarc, the
//! driver calls), which is what bounds a step made of many small launches. Nothing is queued
//! then: there is nothing to run.

#![allow(non_snake_case, clippy::missing_safety_doc)]

use std::alloc::{Layout, alloc, dealloc};
use std::collections::BTreeMap;
use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};

use crate::entries::{Entry, entry};
use crate::simt::{BlockOrder, Launch, launch, message};
use crate::streams::{self, Event, StreamId};

type CUresult = c_int;
type CUdevice = c_int;
type CUdeviceptr = u64;
type Handle = *mut c_void;

const SUCCESS: CUresult = 0;
const INVALID_VALUE: CUresult = 1;
const OUT_OF_MEMORY: CUresult = 2;
const INVALID_DEVICE: CUresult = 101;
const NOT_FOUND: CUresult = 500;
const NOT_READY: CUresult = 600;
const LAUNCH_FAILED: CUresult = 719;

/// What stands behind an allocation's address.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Memory {
    Device,
    /// Device memory with kernels skipped: an address only (nothing reads or writes it).
    Unbacked,
    PinnedHost,
}

/// Allocations by address (ordered, so an address inside one finds it).
fn allocations() -> &'static Mutex<BTreeMap<u64, (Layout, Memory)>> {
    static MAP: OnceLock<Mutex<BTreeMap<u64, (Layout, Memory)>>> = OnceLock::new();
    MAP.get_or_init(Default::default)
}

/// Whether `address` lies inside a page-locked host allocation.
fn is_pinned(address: u64) -> bool {
    let map = allocations().lock().unwrap();
    map.range(..=address)
        .next_back()
        .is_some_and(|(&base, (layout, kind))| {
            *kind == Memory::PinnedHost && address < base + layout.size() as u64
        })
}

/// `bytes` of host memory (filled with 0xff), or with kernels skipped and `kind` device
/// memory, an address only.
fn allocate(bytes: usize, kind: Memory) -> Option<u64> {
    let layout = Layout::from_size_align(bytes.max(1), 256).ok()?;
    let (ptr, kind) = if kind == Memory::Device && skip_kernels() {
        static NEXT: AtomicU64 = AtomicU64::new(1 << 44);
        let size = layout.size().next_multiple_of(256) as u64;
        (NEXT.fetch_add(size, Relaxed), Memory::Unbacked)
    } else {
        let ptr = unsafe { alloc(layout) };
        if ptr.is_null() {
            return None;
        }
        unsafe { std::ptr::write_bytes(ptr, 0xff, layout.size()) };
        (ptr as u64, kind)
    };
    allocations().lock().unwrap().insert(ptr, (layout, kind));
    Some(ptr)
}

/// Frees an allocation: filled with 0xff bytes and kept until every stream is idle (work
/// queued on another stream may still name it; reading it then reads NaN, not freed memory).
fn free(ptr: u64) -> CUresult {
    match allocations().lock().unwrap().remove(&ptr) {
        Some((_, Memory::Unbacked)) => SUCCESS,
        Some((layout, _)) => {
            unsafe { std::ptr::write_bytes(ptr as *mut u8, 0xff, layout.size()) };
            quarantine().push((ptr, layout));
            release_if_idle();
            SUCCESS
        }
        None => INVALID_VALUE,
    }
}

fn quarantine() -> std::sync::MutexGuard<'static, Vec<(u64, Layout)>> {
    static FREED: Mutex<Vec<(u64, Layout)>> = Mutex::new(Vec::new());
    FREED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Gives freed allocations back to the host once no stream has work left (queued or
/// running).
fn release_if_idle() {
    streams::when_idle(|| {
        for (ptr, layout) in quarantine().drain(..) {
            unsafe { dealloc(ptr as *mut u8, layout) };
        }
    });
}

/// A synchronisation's result: the first failure of queued work, if any.
fn synced(result: Result<(), String>) -> CUresult {
    release_if_idle();
    if result.is_ok() {
        SUCCESS
    } else {
        LAUNCH_FAILED
    }
}

fn stream_id(stream: Handle) -> StreamId {
    stream as StreamId
}

/// Opaque handles (context, stream, memory pool) that carry nothing.
fn token() -> Handle {
    Box::into_raw(Box::new(0u8)) as Handle
}

unsafe fn put<T>(out: *mut T, value: T) -> CUresult {
    if out.is_null() {
        return INVALID_VALUE;
    }
    unsafe { out.write(value) };
    SUCCESS
}

fn context() -> Handle {
    static CONTEXT: OnceLock<usize> = OnceLock::new();
    *CONTEXT.get_or_init(|| token() as usize) as Handle
}

#[unsafe(no_mangle)]
pub extern "C" fn cuInit(_flags: c_uint) -> CUresult {
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDriverGetVersion(version: *mut c_int) -> CUresult {
    unsafe { put(version, 12090) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    unsafe { put(count, 1) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGet(device: *mut CUdevice, ordinal: c_int) -> CUresult {
    if ordinal != 0 {
        return INVALID_DEVICE;
    }
    unsafe { put(device, 0) }
}

/// The attributes Retouch and cudarc read, with an H100's values; 0 for the rest.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetAttribute(
    value: *mut c_int,
    attribute: c_int,
    _device: CUdevice,
) -> CUresult {
    let v = match attribute {
        1 => 1024,       // max threads per block
        2 | 3 => 65_535, // max block dims x, y (z 64)
        4 => 64,
        5 => i32::MAX, // max grid x
        6 | 7 => 65_535,
        8 => 48 * 1024,   // shared memory per block
        10 => 32,         // warp size
        12 => 65_536,     // registers per block
        16 => 132,        // multiprocessors
        75 => 9,          // compute capability major
        76 => 0,          // minor
        81 => 228 * 1024, // shared memory per multiprocessor
        97 => 227 * 1024, // shared memory per block, opt-in
        115 => 1,         // memory pools supported
        _ => 0,
    };
    unsafe { put(value, v) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetName(
    name: *mut c_char,
    len: c_int,
    _device: CUdevice,
) -> CUresult {
    const NAME: &[u8] = b"Retouch SIMT emulator (CPU)\0";
    if name.is_null() || (len as usize) < NAME.len() {
        return INVALID_VALUE;
    }
    unsafe { std::ptr::copy_nonoverlapping(NAME.as_ptr() as *const c_char, name, NAME.len()) };
    SUCCESS
}

const TOTAL_MEMORY: usize = 16 << 30;

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, _device: CUdevice) -> CUresult {
    unsafe { put(bytes, TOTAL_MEMORY) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    let used: usize = allocations()
        .lock()
        .unwrap()
        .values()
        .filter(|(_, kind)| *kind != Memory::PinnedHost)
        .map(|(layout, _)| layout.size())
        .sum();
    unsafe {
        put(free, TOTAL_MEMORY.saturating_sub(used));
        put(total, TOTAL_MEMORY)
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(ctx: *mut Handle, _device: CUdevice) -> CUresult {
    unsafe { put(ctx, context()) }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuDevicePrimaryCtxRelease_v2(_device: CUdevice) -> CUresult {
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuCtxSetCurrent(_ctx: Handle) -> CUresult {
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetCurrent(ctx: *mut Handle) -> CUresult {
    unsafe { put(ctx, context()) }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuCtxSynchronize() -> CUresult {
    synced(streams::finish_all())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetDefaultMemPool(
    pool: *mut Handle,
    _device: CUdevice,
) -> CUresult {
    unsafe { put(pool, context()) }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemPoolSetAttribute(
    _pool: Handle,
    _attribute: c_int,
    _value: *mut c_void,
) -> CUresult {
    SUCCESS
}

// Streams (`crate::streams`): work runs when the host makes it.

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamCreate(stream: *mut Handle, _flags: c_uint) -> CUresult {
    unsafe { put(stream, token()) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamCreateWithPriority(
    stream: *mut Handle,
    _flags: c_uint,
    _priority: c_int,
) -> CUresult {
    unsafe { put(stream, token()) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamDestroy_v2(stream: Handle) -> CUresult {
    let result = synced(streams::destroy(stream_id(stream)));
    if !stream.is_null() {
        drop(unsafe { Box::from_raw(stream as *mut u8) });
    }
    result
}

#[unsafe(no_mangle)]
pub extern "C" fn cuStreamSynchronize(stream: Handle) -> CUresult {
    synced(streams::finish(stream_id(stream)))
}

#[unsafe(no_mangle)]
pub extern "C" fn cuStreamWaitEvent(stream: Handle, event: Handle, _flags: c_uint) -> CUresult {
    if event.is_null() {
        return INVALID_VALUE;
    }
    streams::wait(stream_id(stream), unsafe { &*(event as *const Event) });
    SUCCESS
}

/// Done, or not ready (see `streams::stream_done`).
#[unsafe(no_mangle)]
pub extern "C" fn cuStreamQuery(stream: Handle) -> CUresult {
    if !streams::stream_done(stream_id(stream)) {
        NOT_READY
    } else {
        synced(streams::status())
    }
}

// Events: where they were recorded, and when that record ran.

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventCreate(event: *mut Handle, _flags: c_uint) -> CUresult {
    unsafe { put(event, std::sync::Arc::into_raw(Event::new()) as Handle) }
}

/// The event behind a handle (a clone of the reference `cuEventCreate` handed out).
unsafe fn event_of(event: Handle) -> std::sync::Arc<Event> {
    let event = event as *const Event;
    unsafe {
        std::sync::Arc::increment_strong_count(event);
        std::sync::Arc::from_raw(event)
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventRecord(event: Handle, stream: Handle) -> CUresult {
    if event.is_null() {
        return INVALID_VALUE;
    }
    streams::record(&unsafe { event_of(event) }, stream_id(stream));
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuEventSynchronize(event: Handle) -> CUresult {
    if event.is_null() {
        return INVALID_VALUE;
    }
    synced(streams::finish_event(unsafe { &*(event as *const Event) }))
}

/// Complete, or not ready (see `streams::event_done`).
#[unsafe(no_mangle)]
pub extern "C" fn cuEventQuery(event: Handle) -> CUresult {
    if event.is_null() {
        return INVALID_VALUE;
    }
    if !streams::event_done(unsafe { &*(event as *const Event) }) {
        NOT_READY
    } else {
        synced(streams::status())
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventElapsedTime(ms: *mut f32, start: Handle, end: Handle) -> CUresult {
    if start.is_null() || end.is_null() {
        return INVALID_VALUE;
    }
    let (start, end) = unsafe { (&*(start as *const Event), &*(end as *const Event)) };
    let elapsed = end
        .time()
        .saturating_duration_since(start.time())
        .as_secs_f32()
        * 1e3;
    unsafe { put(ms, elapsed) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventElapsedTime_v2(
    ms: *mut f32,
    start: Handle,
    end: Handle,
) -> CUresult {
    unsafe { cuEventElapsedTime(ms, start, end) }
}

/// The event lives on while a queued record holds it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventDestroy_v2(event: Handle) -> CUresult {
    if !event.is_null() {
        drop(unsafe { std::sync::Arc::from_raw(event as *const Event) });
    }
    SUCCESS
}

// Memory.

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAlloc_v2(ptr: *mut CUdeviceptr, bytes: usize) -> CUresult {
    ALLOCATIONS.fetch_add(1, Relaxed);
    match allocate(bytes, Memory::Device) {
        Some(p) => unsafe { put(ptr, p) },
        None => OUT_OF_MEMORY,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocAsync(
    ptr: *mut CUdeviceptr,
    bytes: usize,
    _stream: Handle,
) -> CUresult {
    unsafe { cuMemAlloc_v2(ptr, bytes) }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemFree_v2(ptr: CUdeviceptr) -> CUresult {
    FREES.fetch_add(1, Relaxed);
    free(ptr)
}

/// Frees when the stream reaches the free (a free the host asked for twice fails the stream
/// then).
#[unsafe(no_mangle)]
pub extern "C" fn cuMemFreeAsync(ptr: CUdeviceptr, stream: Handle) -> CUresult {
    if skip_kernels() {
        return cuMemFree_v2(ptr);
    }
    FREES.fetch_add(1, Relaxed);
    streams::enqueue(
        stream_id(stream),
        Box::new(move || match free(ptr) {
            SUCCESS => Ok(()),
            _ => Err(format!("cuMemFreeAsync of {ptr:#x}: not an allocation")),
        }),
    );
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemHostAlloc(
    ptr: *mut *mut c_void,
    bytes: usize,
    _flags: c_uint,
) -> CUresult {
    match allocate(bytes, Memory::PinnedHost) {
        Some(p) => unsafe { put(ptr, p as *mut c_void) },
        None => OUT_OF_MEMORY,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocHost_v2(ptr: *mut *mut c_void, bytes: usize) -> CUresult {
    unsafe { cuMemHostAlloc(ptr, bytes, 0) }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemFreeHost(ptr: *mut c_void) -> CUresult {
    free(ptr as u64)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemHostRegister_v2(
    _ptr: *mut c_void,
    _bytes: usize,
    _flags: c_uint,
) -> CUresult {
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemHostUnregister(_ptr: *mut c_void) -> CUresult {
    SUCCESS
}

/// Which way a copy goes, for the counts.
#[derive(Clone, Copy)]
enum Direction {
    HostToDevice,
    DeviceToHost,
    DeviceToDevice,
}

/// Counts a copy with device memory at one end or both.
fn count_copy(src: u64, direction: Direction) {
    let counter = match direction {
        // From pageable memory the real driver stages the bytes itself, and may wait for
        // the stream to do so: the copies a step should not make.
        Direction::HostToDevice if is_pinned(src) => &COPIES_FROM_PINNED,
        Direction::HostToDevice => &COPIES_FROM_PAGEABLE,
        Direction::DeviceToHost => &COPIES_TO_HOST,
        Direction::DeviceToDevice => &COPIES_ON_DEVICE,
    };
    counter.fetch_add(1, Relaxed);
}

/// A synchronous copy, which the driver queues on the legacy default stream: that stream's
/// work first (not the other streams': Retouch's are non-blocking), then the bytes (none
/// with kernels skipped).
unsafe fn copy_now(dst: u64, src: u64, bytes: usize, direction: Direction) -> CUresult {
    count_copy(src, direction);
    if skip_kernels() {
        return SUCCESS;
    }
    let result = synced(streams::finish(LEGACY_STREAM));
    if bytes > 0 {
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
    }
    result
}

/// The legacy default stream (the null handle): cudarc's default stream, Retouch's compute
/// stream. Its work is as asynchronous as any stream's.
const LEGACY_STREAM: StreamId = 0;

/// A copy queued on `stream`. Pageable host memory is read when the copy is enqueued and
/// written before the call returns (the driver's rules); page-locked memory and device
/// memory when the copy runs.
unsafe fn copy_on(
    dst: u64,
    src: u64,
    bytes: usize,
    direction: Direction,
    stream: Handle,
) -> CUresult {
    count_copy(src, direction);
    if skip_kernels() || bytes == 0 {
        return SUCCESS;
    }
    let stream = stream_id(stream);
    let staged = (matches!(direction, Direction::HostToDevice) && !is_pinned(src))
        .then(|| unsafe { std::slice::from_raw_parts(src as *const u8, bytes) }.to_vec());
    let to_pageable = matches!(direction, Direction::DeviceToHost) && !is_pinned(dst);
    streams::enqueue(
        stream,
        Box::new(move || {
            let from = staged.as_ref().map_or(src as *const u8, |s| s.as_ptr());
            unsafe { std::ptr::copy(from, dst as *mut u8, bytes) };
            Ok(())
        }),
    );
    if to_pageable {
        synced(streams::finish(stream))
    } else {
        SUCCESS
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    bytes: usize,
) -> CUresult {
    unsafe { copy_now(dst, src as u64, bytes, Direction::HostToDevice) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    bytes: usize,
    stream: Handle,
) -> CUresult {
    unsafe { copy_on(dst, src as u64, bytes, Direction::HostToDevice, stream) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(
    dst: *mut c_void,
    src: CUdeviceptr,
    bytes: usize,
) -> CUresult {
    unsafe { copy_now(dst as u64, src, bytes, Direction::DeviceToHost) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: CUdeviceptr,
    bytes: usize,
    stream: Handle,
) -> CUresult {
    unsafe { copy_on(dst as u64, src, bytes, Direction::DeviceToHost, stream) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyDtoD_v2(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    bytes: usize,
) -> CUresult {
    unsafe { copy_now(dst, src, bytes, Direction::DeviceToDevice) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyDtoDAsync_v2(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    bytes: usize,
    stream: Handle,
) -> CUresult {
    unsafe { copy_on(dst, src, bytes, Direction::DeviceToDevice, stream) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemsetD8_v2(dst: CUdeviceptr, value: u8, count: usize) -> CUresult {
    MEMSETS.fetch_add(1, Relaxed);
    if skip_kernels() {
        return SUCCESS;
    }
    let result = synced(streams::finish(LEGACY_STREAM));
    unsafe { std::ptr::write_bytes(dst as *mut u8, value, count) };
    result
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemsetD8Async(
    dst: CUdeviceptr,
    value: u8,
    count: usize,
    stream: Handle,
) -> CUresult {
    MEMSETS.fetch_add(1, Relaxed);
    if skip_kernels() {
        return SUCCESS;
    }
    streams::enqueue(
        stream_id(stream),
        Box::new(move || {
            unsafe { std::ptr::write_bytes(dst as *mut u8, value, count) };
            Ok(())
        }),
    );
    SUCCESS
}

// Modules and launches.

/// A loaded module: the kernel names its PTX declares.
struct Module {
    kernels: Vec<String>,
}

/// A function handle: the kernel's name, its host entry, and the dynamic shared memory a
/// launch may ask for (48 KiB unless raised with `cuFuncSetAttribute`, as on the hardware).
struct Function {
    name: String,
    entry: Entry,
    max_dynamic_shared: AtomicU64,
}

/// Dynamic shared memory per block without opting in, and the most an H100 allows with it.
const DEFAULT_DYNAMIC_SHARED: u64 = 48 * 1024;
const OPT_IN_DYNAMIC_SHARED: u64 = 227 * 1024;

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleLoadData(module: *mut Handle, image: *const c_void) -> CUresult {
    if image.is_null() {
        return INVALID_VALUE;
    }
    let ptx = unsafe { CStr::from_ptr(image as *const c_char) }.to_string_lossy();
    let kernels = ptx
        .match_indices(".entry ")
        .map(|(at, _)| {
            let rest = &ptx[at + ".entry ".len()..];
            rest[..rest.find('(').unwrap_or(rest.len())]
                .trim()
                .to_string()
        })
        .collect();
    unsafe {
        put(
            module,
            Box::into_raw(Box::new(Module { kernels })) as Handle,
        )
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleUnload(module: Handle) -> CUresult {
    if !module.is_null() {
        drop(unsafe { Box::from_raw(module as *mut Module) });
    }
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleGetFunction(
    function_out: *mut Handle,
    module: Handle,
    name: *const c_char,
) -> CUresult {
    if module.is_null() || name.is_null() {
        return INVALID_VALUE;
    }
    let module = unsafe { &*(module as *const Module) };
    let name = unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned();
    if !module.kernels.contains(&name) {
        return NOT_FOUND;
    }
    let Some(entry) = entry(&name) else {
        eprintln!("emulated driver: the PTX declares `{name}`, which the host build lacks");
        return NOT_FOUND;
    };
    let function = Function {
        name,
        entry,
        max_dynamic_shared: AtomicU64::new(DEFAULT_DYNAMIC_SHARED),
    };
    unsafe { put(function_out, Box::into_raw(Box::new(function)) as Handle) }
}

/// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`.
const MAX_DYNAMIC_SHARED_SIZE_BYTES: c_int = 8;

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuFuncSetAttribute(
    function: Handle,
    attribute: c_int,
    value: c_int,
) -> CUresult {
    if function.is_null() {
        return INVALID_VALUE;
    }
    if attribute == MAX_DYNAMIC_SHARED_SIZE_BYTES {
        if value < 0 || value as u64 > OPT_IN_DYNAMIC_SHARED {
            return INVALID_VALUE;
        }
        let function = unsafe { &*(function as *const Function) };
        function.max_dynamic_shared.store(value as u64, Relaxed);
    }
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuFuncGetAttribute(
    value: *mut c_int,
    attribute: c_int,
    _function: Handle,
) -> CUresult {
    // Max threads per block (0) 1024; sizes and register counts (the rest) reported as 0.
    unsafe { put(value, if attribute == 0 { 1024 } else { 0 }) }
}

#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cuLaunchKernel(
    function: Handle,
    grid_x: c_uint,
    grid_y: c_uint,
    grid_z: c_uint,
    block_x: c_uint,
    block_y: c_uint,
    block_z: c_uint,
    shared_bytes: c_uint,
    stream: Handle,
    params: *mut *mut c_void,
    _extra: *mut *mut c_void,
) -> CUresult {
    if function.is_null() {
        return INVALID_VALUE;
    }
    let function = unsafe { &*(function as *const Function) };
    if function.entry.params > 0 && params.is_null() {
        return INVALID_VALUE;
    }
    // The hardware's limits; Retouch's kernels are all 1-D blocks.
    let refusal = if block_y != 1 || block_z != 1 {
        Some(format!(
            "a {block_x} x {block_y} x {block_z} block (only 1-D blocks are emulated)"
        ))
    } else if block_x == 0 || block_x > 1024 {
        Some(format!("{block_x} threads per block (1 to 1024)"))
    } else if grid_x == 0 || grid_y == 0 || grid_z == 0 || grid_y > 65_535 || grid_z > 65_535 {
        Some(format!("a {grid_x} x {grid_y} x {grid_z} grid"))
    } else if u64::from(shared_bytes) > function.max_dynamic_shared.load(Relaxed) {
        Some(format!(
            "{shared_bytes} bytes of dynamic shared memory (the function allows {})",
            function.max_dynamic_shared.load(Relaxed)
        ))
    } else {
        None
    };
    if let Some(refusal) = refusal {
        eprintln!("emulated driver: {} refused: {refusal}", function.name);
        return INVALID_VALUE;
    }
    LAUNCHES.fetch_add(1, Relaxed);
    if skip_kernels() {
        let mut by_kernel = LAUNCHES_BY_KERNEL.lock().unwrap_or_else(|e| e.into_inner());
        *by_kernel.entry(function.name.clone()).or_default() += 1;
        return SUCCESS;
    }
    // The parameters' values, copied now: the caller's pointers are valid only during the
    // call, and the kernel runs when the stream reaches it.
    let args = unsafe { std::slice::from_raw_parts(params, function.entry.params) };
    let mut values = vec![0u64; args.len()];
    for ((value, &arg), &size) in values.iter_mut().zip(args).zip(function.entry.sizes) {
        unsafe {
            std::ptr::copy_nonoverlapping(arg as *const u8, value as *mut u64 as *mut u8, size)
        };
    }
    // Blocks in a different order each launch: a kernel that relies on grid order fails.
    let order = BlockOrder::Shuffled(LAUNCHES.load(Relaxed));
    let l = Launch::new([grid_x, grid_y, grid_z], block_x, shared_bytes as usize).in_order(order);
    let (call, name) = (function.entry.call, function.name.clone());
    streams::enqueue(
        stream_id(stream),
        Box::new(move || {
            let args: Vec<*mut c_void> = values
                .iter_mut()
                .map(|v| v as *mut u64 as *mut c_void)
                .collect();
            panic::catch_unwind(AssertUnwindSafe(|| unsafe { launch(l, || call(&args)) }))
                .map_err(|payload| format!("{name} {l:?} failed: {}", message(&*payload)))
        }),
    );
    SUCCESS
}

/// Driver calls so far, by kind (printed at exit with kernels skipped).
static LAUNCHES: AtomicU64 = AtomicU64::new(0);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static FREES: AtomicU64 = AtomicU64::new(0);
static MEMSETS: AtomicU64 = AtomicU64::new(0);
static COPIES_FROM_PAGEABLE: AtomicU64 = AtomicU64::new(0);
static COPIES_FROM_PINNED: AtomicU64 = AtomicU64::new(0);
static COPIES_TO_HOST: AtomicU64 = AtomicU64::new(0);
static COPIES_ON_DEVICE: AtomicU64 = AtomicU64::new(0);
/// Launches by kernel name, with kernels skipped: which kernels a step is made of.
static LAUNCHES_BY_KERNEL: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

/// `RETOUCH_EMU_SKIP_KERNELS=1`: launches return at once (see the module's comment).
fn skip_kernels() -> bool {
    static SKIP: OnceLock<bool> = OnceLock::new();
    *SKIP.get_or_init(|| {
        let skip = std::env::var("RETOUCH_EMU_SKIP_KERNELS").is_ok_and(|v| v == "1");
        if skip {
            unsafe extern "C" {
                fn atexit(f: extern "C" fn()) -> c_int;
            }
            extern "C" fn report() {
                let n = |c: &AtomicU64| c.load(Relaxed);
                eprintln!(
                    "emulated driver: {} launches (not run), {} device allocations, {} device frees, \
                     {} memsets, copies: {} host to device from pageable memory, {} from \
                     pinned memory, {} device to host, {} device to device",
                    n(&LAUNCHES),
                    n(&ALLOCATIONS),
                    n(&FREES),
                    n(&MEMSETS),
                    n(&COPIES_FROM_PAGEABLE),
                    n(&COPIES_FROM_PINNED),
                    n(&COPIES_TO_HOST),
                    n(&COPIES_ON_DEVICE),
                );
                let by_kernel = LAUNCHES_BY_KERNEL.lock().unwrap_or_else(|e| e.into_inner());
                let mut counts: Vec<_> = by_kernel.iter().collect();
                counts.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
                for (name, count) in counts {
                    eprintln!("emulated driver: {count:>8} launches of {name}");
                }
            }
            unsafe { atexit(report) };
        }
        skip
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetErrorName(error: CUresult, name: *mut *const c_char) -> CUresult {
    let text: &'static CStr = match error {
        SUCCESS => c"CUDA_SUCCESS",
        INVALID_VALUE => c"CUDA_ERROR_INVALID_VALUE",
        OUT_OF_MEMORY => c"CUDA_ERROR_OUT_OF_MEMORY",
        INVALID_DEVICE => c"CUDA_ERROR_INVALID_DEVICE",
        NOT_FOUND => c"CUDA_ERROR_NOT_FOUND",
        NOT_READY => c"CUDA_ERROR_NOT_READY",
        LAUNCH_FAILED => c"CUDA_ERROR_LAUNCH_FAILED",
        _ => c"CUDA_ERROR_UNKNOWN",
    };
    unsafe { put(name, text.as_ptr()) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetErrorString(error: CUresult, text: *mut *const c_char) -> CUresult {
    unsafe { cuGetErrorName(error, text) }
}
