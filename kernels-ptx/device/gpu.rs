//! GPU built-ins: the hardware primitives (re-exported from `intrinsics`), fast math and
//! block and warp reductions.

use crate::prelude::*;

pub const NEG_INF: f32 = -1.0 / 0.0;

pub use crate::intrinsics::{
    block, block_dim, block_y, block_z, exp2_fast, grid_dim, grid_dim_z, shfl_idx, shfl_xor,
    sync_threads, sync_warp, thread,
};

/// `log2(e)`.
pub const LOG2E: f32 = 1.442_695_f32;

/// `exp(x)` as `2^(x log2 e)` (plain `expf` does not select on nvptx); the accurate exp2
/// keeps the kernels within ~1e-6 relative of the CPU.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    exp2f32(x * LOG2E)
}

/// Sum over the 32 lanes of a warp; every lane gets the total.
#[inline(always)]
pub fn warp_sum(mut v: f32) -> f32 {
    let mut m = 16u32;
    while m > 0 {
        v += shfl_xor(v, m);
        m = m >> 1;
    }
    v
}

#[inline(always)]
pub fn warp_max(mut v: f32) -> f32 {
    let mut m = 16u32;
    while m > 0 {
        v = v.max(shfl_xor(v, m));
        m = m >> 1;
    }
    v
}

/// Block-wide sum for a block of a whole number of warps (at most 32); every thread gets
/// the total. Uses the first 32 floats of dynamic shared memory as scratch, and a barrier
/// before returning so the scratch can be reused at once.
#[inline(always)]
pub fn block_sum(v: f32, scratch: *mut f32) -> f32 {
    block_reduce(warp_sum(v), scratch, 0.0, false)
}

#[inline(always)]
pub fn block_max(v: f32, scratch: *mut f32) -> f32 {
    block_reduce(warp_max(v), scratch, NEG_INF, true)
}

#[inline(always)]
fn block_reduce(warp_total: f32, scratch: *mut f32, identity: f32, max: bool) -> f32 {
    let warps = block_dim() >> 5;
    let lane = thread() & 31;
    let warp = thread() >> 5;
    unsafe {
        if lane == 0 {
            *scratch.add(warp as usize) = warp_total;
        }
        sync_threads();
        let mut v = if lane < warps {
            *scratch.add(lane as usize)
        } else {
            identity
        };
        v = if max { warp_max(v) } else { warp_sum(v) };
        sync_threads();
        v
    }
}

/// The kernel's dynamic shared memory (sized by the launch's `shared_mem_bytes`) as f32s.
#[inline(always)]
pub fn shared_f32() -> *mut f32 {
    crate::prelude::gpu_launch_sized_workgroup_mem::<f32>()
}
