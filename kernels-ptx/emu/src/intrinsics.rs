//! The device module `intrinsics` for the host: special registers from the emulated
//! thread's context, collectives through `simt`'s rendezvous, and the PTX conversions and
//! tensor-core products as the PTX ISA defines them.

use crate::simt::{self, Collective};
use half::{bf16, f16};

pub fn thread() -> u32 {
    simt::context().thread
}
pub fn block_dim() -> u32 {
    simt::context().block_dim
}
pub fn block() -> u32 {
    simt::context().block[0]
}
pub fn block_y() -> u32 {
    simt::context().block[1]
}
pub fn block_z() -> u32 {
    simt::context().block[2]
}
pub fn grid_dim() -> u32 {
    simt::context().grid[0]
}
pub fn grid_dim_z() -> u32 {
    simt::context().grid[2]
}
pub fn sync_threads() {
    simt::sync_block();
}

pub fn trap() {
    let c = simt::context();
    panic!(
        "kernel trapped (thread {} of block {:?})",
        c.thread, c.block
    );
}

pub fn sync_warp() {
    simt::warp_collective(Collective::SyncWarp, &[], |_, _| 0.0);
}

pub fn shfl_idx(v: f32, src: u32) -> f32 {
    simt::warp_collective(Collective::Shuffle, &[v.to_bits()], |lanes, _| {
        f32::from_bits(lanes.word(src % 32, 0))
    })
}

pub fn shfl_xor(v: f32, mask: u32) -> f32 {
    simt::warp_collective(Collective::Shuffle, &[v.to_bits()], |lanes, lane| {
        f32::from_bits(lanes.word((lane ^ mask) % 32, 0))
    })
}

/// `ex2.approx` is within 2 ulp of `2^x`; the host's exact value is inside that.
pub fn exp2_fast(x: f32) -> f32 {
    x.exp2()
}

/// `fence.acq_rel.gpu`. The emulator runs one block at a time, so every store is seen by
/// every later load; the fence orders the host's accesses as the hardware's would.
pub fn fence_gpu() {
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

/// `atom.acq_rel.gpu.global.add.u32`.
///
/// # Safety
/// `p` must point to a live, aligned u32.
pub unsafe fn atomic_add_gpu(p: *mut u32, v: u32) -> u32 {
    // SAFETY: the caller's pointer; nothing accesses it non-atomically meanwhile.
    unsafe { std::sync::atomic::AtomicU32::from_ptr(p) }
        .fetch_add(v, std::sync::atomic::Ordering::AcqRel)
}

/// `ld.relaxed.gpu.global.f32`.
///
/// # Safety
/// `p` must point to a live f32.
pub unsafe fn load_gpu(p: *const f32) -> f32 {
    unsafe { p.read_volatile() }
}

/// `cvt.rna.tf32.f32`: nearest, ties away from zero, to 10 significand bits.
pub fn tf32(x: f32) -> f32 {
    if !x.is_finite() {
        return x;
    }
    f32::from_bits((x.to_bits() + 0x1000) & !0x1fff)
}

/// `cvt.rn.bf16.f32`.
pub fn bf16_bits(x: f32) -> u16 {
    bf16::from_f32(x).to_bits()
}

/// `cvt.rn.f16x2.f32 d, hi, lo`: `lo` in the lower half.
pub fn pack_f16x2(lo: f32, hi: f32) -> u32 {
    f16::from_f32(lo).to_bits() as u32 | (f16::from_f32(hi).to_bits() as u32) << 16
}

pub fn pack_bf16x2(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) as u32 | (bf16_bits(hi) as u32) << 16
}

/// The tensor cores read TF32 operands as the upper 19 bits of each register.
fn tf32_operand(bits: u32) -> f64 {
    f32::from_bits(bits & !0x1fff) as f64
}

/// `mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32`. Lane `(g, t) = (lane / 4, lane % 4)`
/// holds A (16 x 8) elements `(g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4)`, B (8 x 8)
/// elements `(t, g), (t + 4, g)`, and C/D (16 x 8) `(g, 2t), (g, 2t + 1), (g + 8, 2t),
/// (g + 8, 2t + 1)` (PTX ISA, "Matrix Fragments for mma.m16n8k8", `.tf32`).
pub fn mma_m16n8k8_tf32(d: &mut [f32; 4], a: [f32; 4], b: [f32; 2]) {
    let words = [
        a[0].to_bits(),
        a[1].to_bits(),
        a[2].to_bits(),
        a[3].to_bits(),
        b[0].to_bits(),
        b[1].to_bits(),
    ];
    let acc = *d;
    *d = simt::warp_collective(Collective::Mma, &words, |lanes, lane| {
        let a_at = |row: u32, k: u32| {
            let (src, reg) = ((row % 8) * 4 + k % 4, (row / 8) + 2 * (k / 4));
            tf32_operand(lanes.word(src, reg as usize))
        };
        let b_at =
            |k: u32, col: u32| tf32_operand(lanes.word(col * 4 + k % 4, 4 + (k / 4) as usize));
        mma_outputs(lane, acc, 8, a_at, b_at)
    });
}

/// This lane's four D elements, `acc + A B` over `k` with operands as `a_at(row, k)`,
/// `b_at(k, col)`: products and sums exact in f64, rounded once to f32.
fn mma_outputs(
    lane: u32,
    acc: [f32; 4],
    k: u32,
    a_at: impl Fn(u32, u32) -> f64,
    b_at: impl Fn(u32, u32) -> f64,
) -> [f32; 4] {
    let (g, t) = (lane / 4, lane % 4);
    let mut out = [0.0f32; 4];
    for (i, o) in out.iter_mut().enumerate() {
        let row = g + 8 * (i as u32 / 2);
        let col = 2 * t + (i as u32 & 1);
        let mut sum = acc[i] as f64;
        for kk in 0..k {
            sum += a_at(row, kk) * b_at(kk, col);
        }
        *o = sum as f32;
    }
    out
}

/// `mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}`. Each register packs two elements, the
/// lower index in the lower half. Lane `(g, t)` holds A (16 x 16) rows `g, g + 8, g, g + 8`
/// at columns `2t, 2t, 2t + 8, 2t + 8` (+0 and +1 in each register), B (16 x 8) at k
/// `2t, 2t + 8` (+0, +1) and column `g`; C/D as for m16n8k8 (PTX ISA, "Matrix Fragments for
/// mma.m16n8k16 with floating point type").
fn mma_m16n8k16(d: &mut [f32; 4], a: [u32; 4], b: [u32; 2], widen: fn(u16) -> f64) {
    let words = [a[0], a[1], a[2], a[3], b[0], b[1]];
    let acc = *d;
    let half = |word: u32, k: u32| widen((word >> (16 * (k % 2))) as u16);
    *d = simt::warp_collective(Collective::Mma, &words, |lanes, lane| {
        let a_at = |row: u32, k: u32| {
            let src = (row % 8) * 4 + (k % 8) / 2;
            let reg = row / 8 + 2 * (k / 8);
            half(lanes.word(src, reg as usize), k)
        };
        let b_at = |k: u32, col: u32| {
            let src = col * 4 + (k % 8) / 2;
            half(lanes.word(src, 4 + (k / 8) as usize), k)
        };
        mma_outputs(lane, acc, 16, a_at, b_at)
    });
}

pub fn mma_m16n8k16_f16(d: &mut [f32; 4], a: [u32; 4], b: [u32; 2]) {
    mma_m16n8k16(d, a, b, |h| f16::from_bits(h).to_f64());
}

pub fn mma_m16n8k16_bf16(d: &mut [f32; 4], a: [u32; 4], b: [u32; 2]) {
    mma_m16n8k16(d, a, b, |h| bf16::from_bits(h).to_f64());
}
