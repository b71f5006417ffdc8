//! GPU built-ins: thread indices, barriers, warp shuffles, fast math and reductions.

use crate::prelude::*;

pub const NEG_INF: f32 = -1.0 / 0.0;

#[allow(improper_ctypes)]
unsafe extern "C" {
    #[link_name = "llvm.nvvm.read.ptx.sreg.tid.x"]
    fn tid_x() -> u32;
    #[link_name = "llvm.nvvm.read.ptx.sreg.ntid.x"]
    fn ntid_x() -> u32;
    #[link_name = "llvm.nvvm.read.ptx.sreg.ctaid.x"]
    fn ctaid_x() -> u32;
    #[link_name = "llvm.nvvm.read.ptx.sreg.ctaid.y"]
    fn ctaid_y() -> u32;
    #[link_name = "llvm.nvvm.read.ptx.sreg.nctaid.x"]
    fn nctaid_x() -> u32;
    #[link_name = "llvm.nvvm.read.ptx.sreg.ctaid.z"]
    fn ctaid_z() -> u32;
    #[link_name = "llvm.nvvm.read.ptx.sreg.nctaid.z"]
    fn nctaid_z() -> u32;
    #[link_name = "llvm.nvvm.barrier0"]
    fn barrier0();
    #[link_name = "llvm.nvvm.shfl.sync.bfly.f32"]
    fn shfl_bfly_f32(mask: u32, v: f32, lane_mask: u32, clamp: u32) -> f32;
    #[link_name = "llvm.nvvm.shfl.sync.idx.f32"]
    fn shfl_idx_f32(mask: u32, v: f32, lane: u32, clamp: u32) -> f32;
    #[link_name = "llvm.nvvm.bar.warp.sync"]
    fn bar_warp_sync(mask: u32);
    #[link_name = "llvm.trap"]
    pub fn trap_raw();
}

#[inline(always)]
pub fn thread() -> u32 {
    unsafe { tid_x() }
}
#[inline(always)]
pub fn block_dim() -> u32 {
    unsafe { ntid_x() }
}
#[inline(always)]
pub fn block() -> u32 {
    unsafe { ctaid_x() }
}
#[inline(always)]
pub fn block_y() -> u32 {
    unsafe { ctaid_y() }
}
#[inline(always)]
pub fn grid_dim() -> u32 {
    unsafe { nctaid_x() }
}
#[inline(always)]
pub fn block_z() -> u32 {
    unsafe { ctaid_z() }
}
#[inline(always)]
pub fn grid_dim_z() -> u32 {
    unsafe { nctaid_z() }
}
#[inline(always)]
pub fn sync_threads() {
    unsafe { barrier0() }
}

/// `log2(e)`.
pub const LOG2E: f32 = 1.442_695_f32;

/// `exp(x)` as `2^(x log2 e)` (plain `expf` does not select on nvptx); the accurate exp2
/// keeps the kernels within ~1e-6 relative of the CPU.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    exp2f32(x * LOG2E)
}

/// `2^x`, approximate (2 ulp, `ex2.approx.ftz`; `2^-inf = 0`): for kernels whose inputs are
/// rounded coarser than that anyway (the f16/bf16 tensor-core attention).
#[inline(always)]
pub fn exp2_fast(x: f32) -> f32 {
    let r: f32;
    unsafe {
        asm!(
            "ex2.approx.ftz.f32 {0}, {1};",
            out(reg32) r,
            in(reg32) x,
            options(pure, nomem, nostack)
        );
    }
    r
}

/// Orders this warp's shared-memory writes before its later reads.
#[inline(always)]
pub fn sync_warp() {
    unsafe { bar_warp_sync(0xffff_ffff) }
}

/// Lane `src`'s `v`, to every lane of the warp (all 32 lanes must call it).
#[inline(always)]
pub fn shfl_idx(v: f32, src: u32) -> f32 {
    unsafe { shfl_idx_f32(0xffff_ffff, v, src, 31) }
}

/// `v` of lane `self ^ mask` (a butterfly step; all 32 lanes must call it).
#[inline(always)]
pub fn shfl_xor(v: f32, mask: u32) -> f32 {
    unsafe { shfl_bfly_f32(0xffff_ffff, v, mask, 31) }
}

/// Sum over the 32 lanes of a warp; every lane gets the total.
#[inline(always)]
pub fn warp_sum(mut v: f32) -> f32 {
    let mut m = 16u32;
    while m > 0 {
        v += unsafe { shfl_bfly_f32(0xffff_ffff, v, m, 31) };
        m = m >> 1;
    }
    v
}

#[inline(always)]
pub fn warp_max(mut v: f32) -> f32 {
    let mut m = 16u32;
    while m > 0 {
        v = v.max(unsafe { shfl_bfly_f32(0xffff_ffff, v, m, 31) });
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
