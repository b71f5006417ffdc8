//! Every hardware primitive the kernels use: the special registers, barriers, warp shuffles,
//! and the PTX instructions LLVM has no intrinsic for (inline `asm!`). Nothing else in the
//! crate talks to the hardware, so the host emulator (`kernels-ptx/emu`) runs the same
//! kernel sources by supplying this module (and the prelude) with the same signatures.

use crate::prelude::*;

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
    fn trap_raw();
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

/// Stops the kernel with an error (the launch fails).
#[inline(always)]
pub fn trap() {
    unsafe { trap_raw() }
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

/// `fence.acq_rel.gpu`: this thread's memory accesses before it are ordered before those
/// after it, for every thread of the GPU. With the counter of [`atomic_add_gpu`] it makes a
/// hand-off between blocks: stores, fence, arrive; arrive, fence, loads.
#[inline(always)]
pub fn fence_gpu() {
    unsafe { asm!("fence.acq_rel.gpu;", options(nostack)) }
}

/// `atom.acq_rel.gpu.global.add.u32`: adds `v` to the global `*p` and returns the value it
/// had, as one step no other thread of the GPU can split.
#[inline(always)]
pub unsafe fn atomic_add_gpu(p: *mut u32, v: u32) -> u32 {
    let old: u32;
    unsafe {
        asm!(
            "atom.acq_rel.gpu.global.add.u32 {0}, [{1}], {2};",
            out(reg32) old,
            in(reg64) p,
            in(reg32) v,
            options(nostack)
        );
    }
    old
}

/// `ld.relaxed.gpu.global.f32`: a load of a value another block stored, read at the GPU's
/// level of coherence (never a stale copy this multiprocessor's L1 kept).
#[inline(always)]
pub unsafe fn load_gpu(p: *const f32) -> f32 {
    let v: f32;
    unsafe {
        asm!(
            "ld.relaxed.gpu.global.f32 {0}, [{1}];",
            out(reg32) v,
            in(reg64) p,
            options(nostack, readonly)
        );
    }
    v
}

/// `x` rounded to TF32 (nearest, ties away from zero), as f32 bits with the low 13 zero.
#[inline(always)]
pub fn tf32(x: f32) -> f32 {
    let r: f32;
    unsafe {
        asm!(
            "cvt.rna.tf32.f32 {0}, {1};",
            out(reg32) r,
            in(reg32) x,
            options(pure, nomem, nostack)
        );
    }
    r
}

/// `x` rounded to the nearest bf16 (ties to even), as its bits.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let r: u16;
    unsafe {
        asm!(
            "cvt.rn.bf16.f32 {0}, {1};",
            out(reg16) r,
            in(reg32) x,
            options(pure, nomem, nostack)
        );
    }
    r
}

/// `d += a * b` for one 16 x 8 x 8 TF32 fragment (the whole warp executes it together).
/// Fragment layouts: see `mma.rs`.
#[inline(always)]
pub fn mma_m16n8k8_tf32(d: &mut [f32; 4], a: [f32; 4], b: [f32; 2]) {
    unsafe {
        asm!(
            "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {{{0}, {1}, {2}, {3}}}, {{{4}, {5}, {6}, {7}}}, {{{8}, {9}}}, {{{0}, {1}, {2}, {3}}};",
            inout(reg32) d[0],
            inout(reg32) d[1],
            inout(reg32) d[2],
            inout(reg32) d[3],
            in(reg32) a[0],
            in(reg32) a[1],
            in(reg32) a[2],
            in(reg32) a[3],
            in(reg32) b[0],
            in(reg32) b[1],
            options(nostack)
        );
    }
}

/// The 16-bit tensor-core instructions, once per element type (`f16`, `bf16`): two values
/// rounded and packed into one register, and the `m16n8k16` product with f32 accumulation.
macro_rules! half_mma {
    ($pack:ident, $mma:ident, $ptx:literal) => {
        /// `lo` and `hi` rounded (nearest even) and packed, `lo` in the lower half.
        #[inline(always)]
        pub fn $pack(lo: f32, hi: f32) -> u32 {
            let r: u32;
            unsafe {
                asm!(
                    concat!("cvt.rn.", $ptx, "x2.f32 {0}, {1}, {2};"),
                    out(reg32) r,
                    in(reg32) hi,
                    in(reg32) lo,
                    options(pure, nomem, nostack)
                );
            }
            r
        }

        /// `d += a * b` for one 16 x 8 x 16 fragment (the whole warp executes it together).
        /// Fragment layouts: see `attention_mma.rs`.
        #[inline(always)]
        pub fn $mma(d: &mut [f32; 4], a: [u32; 4], b: [u32; 2]) {
            unsafe {
                asm!(
                    concat!(
                        "mma.sync.aligned.m16n8k16.row.col.f32.", $ptx, ".", $ptx,
                        ".f32 {{{0}, {1}, {2}, {3}}}, {{{4}, {5}, {6}, {7}}}, {{{8}, {9}}}, ",
                        "{{{0}, {1}, {2}, {3}}};"
                    ),
                    inout(reg32) d[0],
                    inout(reg32) d[1],
                    inout(reg32) d[2],
                    inout(reg32) d[3],
                    in(reg32) a[0],
                    in(reg32) a[1],
                    in(reg32) a[2],
                    in(reg32) a[3],
                    in(reg32) b[0],
                    in(reg32) b[1],
                    options(nostack)
                );
            }
        }
    };
}
half_mma!(pack_f16x2, mma_m16n8k16_f16, "f16");
half_mma!(pack_bf16x2, mma_m16n8k16_bf16, "bf16");
