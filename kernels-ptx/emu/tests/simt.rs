//! The emulator's own rules: barriers order shared memory, shuffles and exits behave as on
//! the hardware, and broken kernels (deadlock, divergence, reading a returned lane, a bounds
//! check) fail the launch with a message instead of hanging or passing.
#![cfg(kernel_emu)]

mod common;
use common::*;
use retouch_kernels_emu::intrinsics::{block, shfl_xor, sync_threads, sync_warp, thread};
use retouch_kernels_emu::prelude::gpu_launch_sized_workgroup_mem;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// The panic message of a launch expected to fail.
fn failure(l: Launch, kernel: impl Fn()) -> String {
    let payload = catch_unwind(AssertUnwindSafe(|| unsafe { launch(l, kernel) }))
        .expect_err("the launch should fail");
    payload
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn a_barrier_orders_shared_memory_across_warps() {
    let out = DeviceBuffer::<f32>::zeroed(3 * 96);
    let out_ptr = out.ptr_mut() as usize;
    unsafe {
        launch(Launch::new([3, 1, 1], 96, 96 * 4), || {
            let smem = gpu_launch_sized_workgroup_mem::<f32>();
            let t = thread() as usize;
            *smem.add(t) = (t + 1000 * block() as usize) as f32;
            sync_threads();
            // Each thread reads a value another warp wrote before the barrier.
            let v = *smem.add(95 - t);
            *(out_ptr as *mut f32).add(block() as usize * 96 + t) = v;
        })
    };
    let want: Vec<f32> = (0..3 * 96)
        .map(|i| ((95 - i % 96) + 1000 * (i / 96)) as f32)
        .collect();
    assert_close("barrier", &out.to_vec(), &want, 0.0, 0.0);
}

#[test]
fn shuffles_exchange_within_a_warp() {
    let out = DeviceBuffer::<f32>::zeroed(64);
    let out_ptr = out.ptr_mut() as usize;
    unsafe {
        launch(Launch::new([1, 1, 1], 64, 0), || {
            let t = thread();
            let v = shfl_xor(t as f32 + 1.0, 5);
            *(out_ptr as *mut f32).add(t as usize) = v;
        })
    };
    let want: Vec<f32> = (0..64u32).map(|t| (t ^ 5) as f32 + 1.0).collect();
    assert_close("shfl_xor", &out.to_vec(), &want, 0.0, 0.0);
}

#[test]
fn returned_threads_count_as_arrived_at_a_barrier() {
    let out = DeviceBuffer::<f32>::zeroed(128);
    let out_ptr = out.ptr_mut() as usize;
    unsafe {
        launch(Launch::new([1, 1, 1], 128, 0), || {
            if thread() >= 64 {
                return;
            }
            sync_threads();
            *(out_ptr as *mut f32).add(thread() as usize) = 1.0;
        })
    };
    let got = out.to_vec();
    assert!(got[..64].iter().all(|&v| v == 1.0) && got[64..].iter().all(|&v| v == 0.0));
}

#[test]
fn shared_memory_starts_as_nan_in_every_block() {
    let out = DeviceBuffer::<f32>::zeroed(2);
    let out_ptr = out.ptr_mut() as usize;
    unsafe {
        launch(Launch::new([2, 1, 1], 32, 64), || {
            let smem = gpu_launch_sized_workgroup_mem::<f32>();
            if thread() == 0 {
                *(out_ptr as *mut f32).add(block() as usize) = *smem.add(3);
                *smem.add(3) = 1.0;
            }
        })
    };
    assert!(out.to_vec().iter().all(|v| v.is_nan()));
}

#[test]
fn a_barrier_some_threads_never_reach_is_a_deadlock() {
    let message = failure(Launch::new([1, 1, 1], 64, 0), || {
        // Half of warp 1 waits at the warp's barrier, which the other half (waiting at the
        // block's) never reaches.
        if thread() < 48 {
            sync_threads();
        } else {
            sync_warp();
        }
    });
    assert!(message.contains("deadlock"), "{message}");
}

#[test]
fn lanes_at_different_collectives_are_divergence() {
    let message = failure(Launch::new([1, 1, 1], 32, 0), || {
        if thread().is_multiple_of(2) {
            shfl_xor(1.0, 1);
        } else {
            sync_warp();
        }
    });
    assert!(message.contains("divergence"), "{message}");
}

#[test]
fn a_shuffle_from_a_returned_lane_fails() {
    let message = failure(Launch::new([1, 1, 1], 32, 0), || {
        if thread() == 3 {
            return;
        }
        shfl_xor(1.0, 1);
    });
    assert!(message.contains("returned"), "{message}");
}

#[test]
fn a_panicking_thread_fails_the_launch_with_its_message() {
    let message = failure(Launch::new([2, 1, 1], 64, 0), || {
        let table = [1.0f32; 4];
        let i = thread() as usize / 8;
        // Threads 32.. of block 1 index past the end; the rest wait at the barrier.
        if block() == 1 && i >= 4 {
            std::hint::black_box(table[i]);
        }
        sync_threads();
    });
    assert!(
        message.contains("block [1, 0, 0]") && message.contains("index out of bounds"),
        "{message}"
    );
}
