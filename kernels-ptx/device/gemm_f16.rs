//! GEMM and the convolutions on f16 tensor cores: `mma.sync.m16n8k16` with f16 operands and
//! f32 accumulation, the same A sources (`ALoad`), epilogue, split-K and output tile
//! (128 x 64, 256 threads) as the CUDA-core kernels of `gemm.rs`, so every fusion they have
//! (bias, bias per sample, residual, split-K in one launch) holds here too. Activations stay
//! f32 in memory and are rounded to f16 as they enter shared memory, as cuBLAS's f16 GEMM
//! after a conversion pass would see them, without that pass or an im2col buffer. The weight
//! is f16 `[n, k]` (a linear weight as PyTorch keeps it, a conv's packed weight transposed),
//! made once per layer by the host.
//!
//! K advances 32 at a time. Each thread loads 4 rows x 4 consecutive k of A (one 16-byte
//! load each where the source allows: `ALoad::load4`) and 8 consecutive k of one B row (one
//! 16-byte load), keeps them in registers while the block multiplies the current tiles, then
//! rounds and stores them: one barrier per 32 k. Both shared tiles are k-contiguous rows of
//! 40 halves (20 words), so the 8 rows a fragment load touches start on banks
//! `20 g mod 32 = 0, 20, 8, 28, 16, 4, 24, 12`: with `q` added, all 32 distinct.
//!
//! The 8 warps split the tile 4 (rows) x 2 (columns), 32 x 32 each: 2 x 4 fragments of
//! 16 x 8, 32 accumulators per thread. Fragment layouts: see `attention_mma.rs`.
//!
//! Launch: grid `(ceil(n / 64), ceil(m / 128), splits)`, block 256, dynamic shared memory
//! `2 * (128 + 64) * 40 * 2` = 30720 bytes.

use crate::gemm::{
    ALoad, BM, BN, BiasRows, ConvA, ConvGeom, ConvOut, DenseA, Epilogue, F4, KShare, MaskedA,
    SplitSums, U2, conv_epilogue, conv_kernel, k_share, masked_conv_kernel,
    sum_slices_if_last,
};
use crate::gpu::{block, block_y, sync_threads, thread};
use crate::intrinsics::{mma_m16n8k16_f16 as mma, pack_f16x2};
use crate::mma::store_fragment;
use crate::prelude::*;

/// k per shared tile.
const BK: u32 = 32;
/// Row stride of both shared tiles, in halves.
const LD: u32 = BK + 8;
const A_HALVES: u32 = BM * LD;
const B_HALVES: u32 = BN * LD;

/// The weight: f16 bits `[n, k]`, row-major.
pub struct HalfB {
    pub b: *const u16,
    pub n: u32,
    pub k: u32,
}
impl Copy for HalfB {}

/// 16 bytes of f16 bits, loaded and stored as one vector access.
#[repr(simd)]
pub struct U4([u32; 4]);
impl Copy for U4 {}

#[inline(always)]
pub unsafe fn gemm_block_f16<A: ALoad>(a: &A, b: HalfB, e: Epilogue) {
    let t = thread();
    let (lane, warp) = (t & 31, t >> 5);
    let (g, q) = (lane >> 2, lane & 3);
    let (wm, wn) = ((warp & 3) * 32, (warp >> 2) * 32);
    let m0 = block_y() * BM;
    let n0 = block() * BN;
    let smem = crate::prelude::gpu_launch_sized_workgroup_mem::<F4>() as *mut u16;

    // This thread's share of A: rows m0 + t / 8 + 32 i (i < 4), k 4 (t % 8) .. + 4.
    let r0 = m0 + t / 8;
    let rows = [a.row(r0), a.row(r0 + 32), a.row(r0 + 64), a.row(r0 + 96)];
    let mut ar = [[0.0f32; 4]; 4];
    let mut br = [0u32; 4];
    // acc[mf * 4 + nf]: fragment (rows wm + 16 mf, columns wn + 8 nf).
    let mut acc = [[0.0f32; 4]; 8];

    let KShare {
        begin,
        end,
        one_launch,
        target,
    } = k_share(&e, (b.k + BK - 1) / BK);
    // An empty share (possible for the last split) still writes its zeros.
    if begin < end {
        unsafe {
            load_tile(a, &rows, b, begin * BK, t, n0, &mut ar, &mut br);
            store_tile(smem, 0, t, &ar, &br);
        }
    }
    sync_threads();
    let mut kt = begin;
    while kt < end {
        let cur = (kt - begin) & 1;
        let more = kt + 1 < end;
        if more {
            unsafe { load_tile(a, &rows, b, (kt + 1) * BK, t, n0, &mut ar, &mut br) };
        }
        let as_ = unsafe { smem.add((cur * A_HALVES) as usize) } as *const u32;
        let bs = unsafe { smem.add((2 * A_HALVES + cur * B_HALVES) as usize) } as *const u32;
        unsafe {
            mma_step(&mut acc, as_, bs, 0, wm, wn, g, q);
            mma_step(&mut acc, as_, bs, 16, wm, wn, g, q);
        }
        if more {
            unsafe { store_tile(smem, 1 - cur, t, &ar, &br) };
        }
        sync_threads();
        kt += 1;
    }

    // Written out (constant fragment indices keep `acc` in registers).
    let (row, col) = (m0 + wm + g, n0 + wn + 2 * q);
    unsafe {
        store_fragment(&target, row, col, acc[0]);
        store_fragment(&target, row, col + 8, acc[1]);
        store_fragment(&target, row, col + 16, acc[2]);
        store_fragment(&target, row, col + 24, acc[3]);
        store_fragment(&target, row + 16, col, acc[4]);
        store_fragment(&target, row + 16, col + 8, acc[5]);
        store_fragment(&target, row + 16, col + 16, acc[6]);
        store_fragment(&target, row + 16, col + 24, acc[7]);
    }
    if one_launch {
        // The tile loop's last barrier is behind every read of the shared tiles.
        unsafe { sum_slices_if_last(&e, m0, n0, smem as *mut u32) };
    }
}

/// Loads this thread's share of the k-tile starting at `k0` into registers: A as f32 (it is
/// rounded when stored, after the tile in flight is multiplied), B as f16 bits.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn load_tile<A: ALoad>(
    a: &A,
    rows: &[A::Row; 4],
    b: HalfB,
    k0: u32,
    t: u32,
    n0: u32,
    ar: &mut [[f32; 4]; 4],
    br: &mut [u32; 4],
) {
    let k = k0 + 4 * (t % 8);
    let col = a.col(k);
    ar[0] = a.load4(rows[0], k, col);
    ar[1] = a.load4(rows[1], k, col);
    ar[2] = a.load4(rows[2], k, col);
    ar[3] = a.load4(rows[3], k, col);
    // B: row n0 + t / 4, k 8 (t % 4) .. + 8.
    let (n, k) = (n0 + t / 4, k0 + 8 * (t % 4));
    *br = if n >= b.n || k >= b.k {
        [0; 4]
    } else {
        let row = unsafe { b.b.add(n as usize * b.k as usize) };
        if (b.k % 8 == 0) & (b.b as usize % 16 == 0) {
            unsafe { transmute(*(row.add(k as usize) as *const U4)) }
        } else {
            // Past k (a partial tile, or k not a multiple of 8), zeros.
            macro_rules! half {
                ($j:expr) => {
                    if k + $j < b.k {
                        unsafe { *row.add((k + $j) as usize) as u32 }
                    } else {
                        0
                    }
                };
            }
            [
                half!(0) | (half!(1) << 16),
                half!(2) | (half!(3) << 16),
                half!(4) | (half!(5) << 16),
                half!(6) | (half!(7) << 16),
            ]
        }
    };
}

/// Stores the registers of `load_tile` into shared buffer `buf` (0 or 1), A rounded to f16.
#[inline(always)]
unsafe fn store_tile(smem: *mut u16, buf: u32, t: u32, ar: &[[f32; 4]; 4], br: &[u32; 4]) {
    let as_ = unsafe { smem.add((buf * A_HALVES) as usize) };
    let bs = unsafe { smem.add((2 * A_HALVES + buf * B_HALVES) as usize) };
    let mut i = 0usize;
    while i < 4 {
        let v = ar[i];
        let at = (t / 8 + 32 * i as u32) * LD + 4 * (t % 8);
        let packed = U2([pack_f16x2(v[0], v[1]), pack_f16x2(v[2], v[3])]);
        unsafe { *(as_.add(at as usize) as *mut U2) = packed };
        i += 1;
    }
    let at = (t / 4) * LD + 8 * (t % 4);
    unsafe { *(bs.add(at as usize) as *mut U4) = U4(*br) };
}

/// Sixteen k of the warp tile (k `ks..ks + 16` of the shared tiles, as words: `as_` and
/// `bs` address pairs of halves): 2 x 4 fragments.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn mma_step(
    acc: &mut [[f32; 4]; 8],
    as_: *const u32,
    bs: *const u32,
    ks: u32,
    wm: u32,
    wn: u32,
    g: u32,
    q: u32,
) {
    // The word holding halves (row, k) and (row, k + 1) of a tile, k even.
    macro_rules! word {
        ($tile:expr, $row:expr, $k:expr) => {
            unsafe { *$tile.add((($row * LD + $k) / 2) as usize) }
        };
    }
    let (k0, k1) = (ks + 2 * q, ks + 2 * q + 8);
    let (r0, r1) = (wm + g, wm + 16 + g);
    let a0 = [
        word!(as_, r0, k0),
        word!(as_, r0 + 8, k0),
        word!(as_, r0, k1),
        word!(as_, r0 + 8, k1),
    ];
    let a1 = [
        word!(as_, r1, k0),
        word!(as_, r1 + 8, k0),
        word!(as_, r1, k1),
        word!(as_, r1 + 8, k1),
    ];
    let c = wn + g;
    let b0 = [word!(bs, c, k0), word!(bs, c, k1)];
    let b1 = [word!(bs, c + 8, k0), word!(bs, c + 8, k1)];
    let b2 = [word!(bs, c + 16, k0), word!(bs, c + 16, k1)];
    let b3 = [word!(bs, c + 24, k0), word!(bs, c + 24, k1)];
    mma(&mut acc[0], a0, b0);
    mma(&mut acc[1], a0, b1);
    mma(&mut acc[2], a0, b2);
    mma(&mut acc[3], a0, b3);
    mma(&mut acc[4], a1, b0);
    mma(&mut acc[5], a1, b1);
    mma(&mut acc[6], a1, b2);
    mma(&mut acc[7], a1, b3);
}

/// `C = alpha * A * B^T + beta * C_in (+ bias)` on f16 tensor cores: A `[m, k]` f32, B the
/// f16 weight `[n, k]`, C and C_in `[m, n]` f32, bias `[n]` read when `has_bias != 0`. A is
/// rounded to f16 (nearest even) as it is read; sums in f32. C_in and split launches as
/// `sgemm_f32`.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "ptx-kernel" fn gemm_mma_f16(
    a: *const f32,
    b: *const u16,
    c: *mut f32,
    c_in: *const f32,
    bias: *const f32,
    m: u32,
    n: u32,
    k: u32,
    has_bias: u32,
    alpha: f32,
    beta: f32,
    ws: *mut f32,
    counters: *mut u32,
) {
    let a = DenseA { a, m, k };
    let b = HalfB { b, n, k };
    let e = Epilogue {
        c,
        c_in,
        bias,
        has_bias: has_bias != 0,
        alpha,
        beta,
        m,
        n,
        split: SplitSums { ws, counters },
        bias_rows: BiasRows::SHARED,
    };
    unsafe { gemm_block_f16(&a, b, e) };
}

conv_kernel!(
    conv2d_mma_f16,
    u16,
    conv_on_f16_cores,
    "`conv2d_f32` on f16 tensor cores: the same arguments and layout, except the weight: f16 `[cout, kh * kw * cin]`, the packed weight transposed."
);

/// A conv's tile loop on f16 tensor cores: patches of length `k` from `a`, the weight f16
/// `[cout, k]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn conv_on_f16_cores<A: ALoad>(
    a: &A,
    k: u32,
    weight: *const u16,
    bias: *const f32,
    out: ConvOut,
    m: u32,
    cout: u32,
    has_bias: u32,
) {
    let b = HalfB { b: weight, n: cout, k };
    let e = conv_epilogue(bias, out, m, cout, has_bias);
    unsafe { gemm_block_f16(a, b, e) };
}

macro_rules! masked_conv_mma_kernel {
    ($name:ident, $c:ty) => {
        masked_conv_kernel!(
            $name,
            $c,
            u16,
            conv_on_f16_cores,
            "The masked conv of `gemm.rs` (`masked_conv2d_cache_*`: the same arguments) on f16 tensor cores, with the weight f16 `[cout, kh * kw * cin]` as `conv2d_mma_f16`."
        );
    };
}
masked_conv_mma_kernel!(masked_conv2d_mma_f16_cache_f32, f32);
masked_conv_mma_kernel!(masked_conv2d_mma_f16_cache_f16, f16);
masked_conv_mma_kernel!(masked_conv2d_mma_f16_cache_bf16, crate::bf16::Bf16);
