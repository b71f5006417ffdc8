//! The emulated driver's own behaviour, through its C entry points as cudarc calls them:
//! a launch by name runs the kernel on device memory, launches the hardware refuses
//! (oversized blocks, dynamic shared memory past the function's limit) are refused, and
//! stream work runs late: only when the host synchronises, waits or copies synchronously,
//! so a missing wait between streams reads unwritten (NaN) memory. (Device memory is host
//! memory here, so the tests look at it directly, without a copy that would run the streams.)
#![cfg(kernel_emu)]

use retouch_kernels_emu::driver::*;
use std::ffi::c_void;
use std::ptr::null_mut;
use std::sync::{Mutex, MutexGuard};

const SUCCESS: i32 = 0;
const INVALID_VALUE: i32 = 1;
const NOT_FOUND: i32 = 500;

/// The driver's streams are global and a synchronous call runs every stream: the tests take
/// turns, so none runs another's queued work early.
fn serial() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

/// The entries of a module whose PTX declares `relu_f32` (the parser reads `.entry` names).
const PTX: &[u8] = b".version 7.8\n.target sm_90\n.visible .entry relu_f32(\n.param .u64 x,\n.param .u64 out,\n.param .u32 n\n)\n{\nret;\n}\n\0";

struct Relu {
    function: *mut c_void,
    x: u64,
    out: u64,
    n: u32,
}

impl Relu {
    fn new(values: &[f32]) -> Relu {
        unsafe {
            let mut module = null_mut();
            assert_eq!(
                cuModuleLoadData(&mut module, PTX.as_ptr() as *const c_void),
                SUCCESS
            );
            let mut missing = null_mut();
            assert_eq!(
                cuModuleGetFunction(&mut missing, module, c"silu_f32".as_ptr()),
                NOT_FOUND
            );
            let mut function = null_mut();
            assert_eq!(
                cuModuleGetFunction(&mut function, module, c"relu_f32".as_ptr()),
                SUCCESS
            );
            let bytes = std::mem::size_of_val(values);
            let (mut x, mut out) = (0u64, 0u64);
            assert_eq!(cuMemAlloc_v2(&mut x, bytes), SUCCESS);
            assert_eq!(cuMemAlloc_v2(&mut out, bytes), SUCCESS);
            assert_eq!(
                cuMemcpyHtoD_v2(x, values.as_ptr() as *const c_void, bytes),
                SUCCESS
            );
            Relu {
                function,
                x,
                out,
                n: values.len() as u32,
            }
        }
    }

    fn launch(&self, grid: u32, block: u32, shared: u32) -> i32 {
        self.launch_on(grid, block, shared, null_mut())
    }

    fn launch_on(&self, grid: u32, block: u32, shared: u32, stream: *mut c_void) -> i32 {
        let mut args = [
            &self.x as *const u64 as *mut c_void,
            &self.out as *const u64 as *mut c_void,
            &self.n as *const u32 as *mut c_void,
        ];
        unsafe {
            cuLaunchKernel(
                self.function,
                grid,
                1,
                1,
                block,
                1,
                1,
                shared,
                stream,
                args.as_mut_ptr(),
                null_mut(),
            )
        }
    }

    fn output(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.n as usize];
        let bytes = std::mem::size_of_val(out.as_slice());
        assert_eq!(
            unsafe { cuMemcpyDtoH_v2(out.as_mut_ptr() as *mut c_void, self.out, bytes) },
            SUCCESS
        );
        out
    }
}

#[test]
fn a_launch_by_name_runs_the_kernel_on_device_memory() {
    let _turn = serial();
    let values: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.5) * 0.25).collect();
    let relu = Relu::new(&values);
    // Fresh device memory reads as NaN until written.
    assert!(relu.output().iter().all(|v| v.is_nan()));
    assert_eq!(relu.launch(2, 128, 0), SUCCESS);
    let want: Vec<f32> = values.iter().map(|v| v.max(0.0)).collect();
    assert_eq!(relu.output(), want);
}

#[test]
fn launches_the_hardware_refuses_are_refused() {
    let _turn = serial();
    let relu = Relu::new(&[1.0, -2.0, 3.0]);
    assert_eq!(relu.launch(1, 2048, 0), INVALID_VALUE);
    assert_eq!(relu.launch(0, 32, 0), INVALID_VALUE);
    // Past the default 48 KiB of dynamic shared memory, until the function opts in.
    assert_eq!(relu.launch(1, 32, 64 * 1024), INVALID_VALUE);
    const MAX_DYNAMIC_SHARED_SIZE_BYTES: i32 = 8;
    unsafe {
        assert_eq!(
            cuFuncSetAttribute(relu.function, MAX_DYNAMIC_SHARED_SIZE_BYTES, 300 * 1024),
            INVALID_VALUE
        );
        assert_eq!(
            cuFuncSetAttribute(relu.function, MAX_DYNAMIC_SHARED_SIZE_BYTES, 64 * 1024),
            SUCCESS
        );
    }
    assert_eq!(relu.launch(1, 32, 64 * 1024), SUCCESS);
    assert_eq!(relu.output(), [1.0, 0.0, 3.0]);
}

fn stream() -> *mut c_void {
    let mut stream = null_mut();
    assert_eq!(unsafe { cuStreamCreate(&mut stream, 0) }, SUCCESS);
    stream
}

fn event() -> *mut c_void {
    let mut event = null_mut();
    assert_eq!(unsafe { cuEventCreate(&mut event, 0) }, SUCCESS);
    event
}

fn device(bytes: usize) -> u64 {
    let mut ptr = 0u64;
    assert_eq!(unsafe { cuMemAlloc_v2(&mut ptr, bytes) }, SUCCESS);
    ptr
}

/// Page-locked host memory holding `values`.
fn pinned(values: &[f32]) -> *mut f32 {
    let mut ptr = null_mut();
    let bytes = std::mem::size_of_val(values);
    assert_eq!(unsafe { cuMemHostAlloc(&mut ptr, bytes, 0) }, SUCCESS);
    let ptr = ptr as *mut f32;
    unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), ptr, values.len()) };
    ptr
}

/// `n` floats of device (here: host) memory, read without running any stream.
fn peek(ptr: u64, n: usize) -> Vec<f32> {
    unsafe { std::slice::from_raw_parts(ptr as *const f32, n) }.to_vec()
}

#[test]
fn a_launch_runs_when_its_stream_is_synchronised() {
    let _turn = serial();
    let values = [-1.0f32, 2.5, -3.0, 4.0];
    let relu = Relu::new(&values);
    let compute = stream();
    let (start, end) = (event(), event());
    unsafe {
        assert_eq!(cuEventRecord(start, compute), SUCCESS);
        assert_eq!(relu.launch_on(1, 32, 0, compute), SUCCESS);
        assert_eq!(cuEventRecord(end, compute), SUCCESS);
    }
    assert!(peek(relu.out, 4).iter().all(|v| v.is_nan()), "ran early");
    assert_eq!(cuEventSynchronize(end), SUCCESS);
    assert_eq!(peek(relu.out, 4), [0.0, 2.5, 0.0, 4.0]);
    let mut ms = -1.0f32;
    assert_eq!(unsafe { cuEventElapsedTime(&mut ms, start, end) }, SUCCESS);
    assert!(ms >= 0.0);
}

#[test]
fn work_on_one_stream_sees_another_streams_copy_only_after_waiting_for_it() {
    let _turn = serial();
    let values = [1.5f32, -2.0, 3.25, 4.0];
    let bytes = std::mem::size_of_val(&values);
    let (copies, compute) = (stream(), stream());
    let host = pinned(&values);
    for wait in [false, true] {
        let (uploaded, read) = (device(bytes), device(bytes));
        unsafe {
            cuMemcpyHtoDAsync_v2(uploaded, host as *const c_void, bytes, copies);
            if wait {
                let fence = event();
                assert_eq!(cuEventRecord(fence, copies), SUCCESS);
                assert_eq!(cuStreamWaitEvent(compute, fence, 0), SUCCESS);
            }
            cuMemcpyDtoDAsync_v2(read, uploaded, bytes, compute);
            assert_eq!(cuStreamSynchronize(compute), SUCCESS);
            assert_eq!(cuStreamSynchronize(copies), SUCCESS);
        }
        if wait {
            assert_eq!(peek(read, 4), values);
        } else {
            assert!(
                peek(read, 4).iter().all(|v| v.is_nan()),
                "no wait, yet written"
            );
        }
    }
}

#[test]
fn host_bytes_are_read_when_the_driver_says() {
    let _turn = serial();
    let copies = stream();
    let (from_pinned, from_pageable) = (device(8), device(8));
    // A page-locked source is read when the copy runs: the refill goes.
    let host = pinned(&[1.0, 2.0]);
    unsafe {
        cuMemcpyHtoDAsync_v2(from_pinned, host as *const c_void, 8, copies);
        *host = 9.0;
    }
    // A pageable one is read by the call itself: the refill does not go.
    #[allow(clippy::useless_vec)] // a heap buffer, as a host tensor's bytes are
    let mut pageable = vec![1.0f32, 2.0];
    unsafe {
        cuMemcpyHtoDAsync_v2(from_pageable, pageable.as_ptr() as *const c_void, 8, copies);
    }
    pageable[0] = 9.0;
    assert_eq!(pageable[0], 9.0);
    assert_eq!(cuStreamSynchronize(copies), SUCCESS);
    assert_eq!(peek(from_pinned, 2), [9.0, 2.0]);
    assert_eq!(peek(from_pageable, 2), [1.0, 2.0]);
    // A copy into pageable memory is done when the call returns.
    let mut back = [0.0f32; 2];
    unsafe {
        cuMemcpyDtoHAsync_v2(back.as_mut_ptr() as *mut c_void, from_pinned, 8, copies);
    }
    assert_eq!(back, [9.0, 2.0]);
}

#[test]
fn memory_freed_on_one_stream_reads_as_nan_on_another_that_did_not_wait() {
    let _turn = serial();
    let values = [5.0f32, 6.0];
    let (frees, compute) = (stream(), stream());
    let (source, read) = (device(8), device(8));
    unsafe {
        assert_eq!(
            cuMemcpyHtoD_v2(source, values.as_ptr() as *const c_void, 8),
            SUCCESS
        );
        cuMemcpyDtoDAsync_v2(read, source, 8, compute);
        assert_eq!(cuMemFreeAsync(source, frees), SUCCESS);
        // The free runs first; the read, queued before it but on a stream nobody waited
        // for, runs after and finds the freed bytes (kept, filled with 0xff).
        assert_eq!(cuStreamSynchronize(frees), SUCCESS);
        assert_eq!(cuStreamSynchronize(compute), SUCCESS);
    }
    assert!(peek(read, 2).iter().all(|v| v.is_nan()));
}
