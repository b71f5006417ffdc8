//! Tensor-core GEMM: TF32 `mma.sync.m16n8k8` with f32 accumulation, via inline PTX.
//!
//! Same block tile (128 x 64), k-step (16), loaders (`ALoad`) and double-buffered shared
//! tiles as `gemm.rs`; values are rounded to TF32 (`cvt.rna`, 10-bit mantissa) as they are
//! stored to shared memory, so each product carries a relative error up to ~2^-11 per
//! operand: results differ from the f32 kernels by about `1e-3 * sqrt(k)` for unit inputs.
//! The 8 warps split the tile 4 (rows) x 2 (columns): each warp owns 32 x 32, as 2 x 4
//! fragments of 16 x 8, so 32 accumulators per thread.
//!
//! Fragment layouts (PTX ISA, `mma.m16n8k8` with `.tf32`): `g = lane / 4`, `q = lane % 4`;
//! A (16 x 8, row-major): `a0 = (g, q)`, `a1 = (g + 8, q)`, `a2 = (g, q + 4)`,
//! `a3 = (g + 8, q + 4)`; B (8 x 8): `b0 = (q, g)`, `b1 = (q + 4, g)`; C (16 x 8):
//! `c0 = (g, 2q)`, `c1 = (g, 2q + 1)`, `c2 = (g + 8, 2q)`, `c3 = (g + 8, 2q + 1)`.
//! The shared strides (136 and 72 floats, both 8 mod 32 banks) make every fragment load
//! conflict-free: lane `(g, q)` reads bank `8q + g`.
//!
//! Launch: grid `(ceil(n / 64), ceil(m / 128))`, block 256, dynamic shared memory 26624
//! bytes (two 16 x 136 A and two 16 x 72 B tiles).

use crate::gemm::{
    ALoad, BK, BM, BMatrix, BN, BiasRows, ConvA, ConvOut, DenseA, Epilogue, F4, Smem,
    SplitSums, conv_kernel, conv_operands, load_tile, rows_of, store_one, store_tile,
};
use crate::gpu::{block, block_y, sync_threads, thread};
use crate::intrinsics::mma_m16n8k8_tf32 as mma;

const TC: Smem = Smem {
    as_ld: BM + 8,
    bs_ld: BN + 8,
    tf32: true,
};

#[inline(always)]
pub unsafe fn gemm_block_tf32<A: ALoad>(a: &A, b: BMatrix, e: Epilogue) {
    let t = thread();
    let (lane, warp) = (t & 31, t >> 5);
    let (g, q) = (lane >> 2, lane & 3);
    // Warp tile origin inside the block tile.
    let (wm, wn) = ((warp & 3) * 32, (warp >> 2) * 32);
    let m0 = block_y() * BM;
    let n0 = block() * BN;
    let smem = crate::prelude::gpu_launch_sized_workgroup_mem::<F4>() as *mut f32;

    let rows = rows_of(a, m0 + t / 16);
    let mut ar = [0.0f32; 8];
    let mut br = [0.0f32; 4];
    // acc[mf * 4 + nf]: fragment (rows wm + 16 mf, columns wn + 8 nf).
    let mut acc = [[0.0f32; 4]; 8];

    let ktiles = (b.k + BK - 1) / BK;
    unsafe {
        load_tile(a, &rows, b, 0, t, n0, &mut ar, &mut br);
        store_tile(smem, 0, t, &ar, &br, b.kn, TC);
    }
    sync_threads();
    let mut kt = 0u32;
    while kt < ktiles {
        let cur = kt & 1;
        let more = kt + 1 < ktiles;
        if more {
            unsafe { load_tile(a, &rows, b, (kt + 1) * BK, t, n0, &mut ar, &mut br) };
        }
        let as_ = TC.a(smem, cur);
        let bs = TC.b(smem, cur);
        unsafe {
            mma_step(&mut acc, as_, bs, 0, wm, wn, g, q);
            mma_step(&mut acc, as_, bs, 8, wm, wn, g, q);
        }
        if more {
            unsafe { store_tile(smem, 1 - cur, t, &ar, &br, b.kn, TC) };
        }
        sync_threads();
        kt += 1;
    }

    // Written out (constant fragment indices keep `acc` in registers).
    let (row, col) = (m0 + wm + g, n0 + wn + 2 * q);
    unsafe {
        store_fragment(&e, row, col, acc[0]);
        store_fragment(&e, row, col + 8, acc[1]);
        store_fragment(&e, row, col + 16, acc[2]);
        store_fragment(&e, row, col + 24, acc[3]);
        store_fragment(&e, row + 16, col, acc[4]);
        store_fragment(&e, row + 16, col + 8, acc[5]);
        store_fragment(&e, row + 16, col + 16, acc[6]);
        store_fragment(&e, row + 16, col + 24, acc[7]);
    }
}

/// This thread's four values of a C fragment whose (g, 2q) element is `(row, col)`.
#[inline(always)]
pub unsafe fn store_fragment(e: &Epilogue, row: u32, col: u32, v: [f32; 4]) {
    unsafe {
        if row < e.m {
            store_one(e, row, col, v[0]);
            store_one(e, row, col + 1, v[1]);
        }
        if row + 8 < e.m {
            store_one(e, row + 8, col, v[2]);
            store_one(e, row + 8, col + 1, v[3]);
        }
    }
}

/// Eight k of the warp tile (k `ks..ks + 8` of the shared tiles): 2 x 4 fragments.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn mma_step(
    acc: &mut [[f32; 4]; 8],
    as_: *const f32,
    bs: *const f32,
    ks: u32,
    wm: u32,
    wn: u32,
    g: u32,
    q: u32,
) {
    // (No closures in this crate: no `Fn` lang items.)
    macro_rules! at {
        ($k:expr, $r:expr) => {
            unsafe { *as_.add(($k * TC.as_ld + $r) as usize) }
        };
    }
    macro_rules! bt {
        ($k:expr, $c:expr) => {
            unsafe { *bs.add(($k * TC.bs_ld + $c) as usize) }
        };
    }
    let (k0, k1) = (ks + q, ks + q + 4);
    let r0 = wm + g;
    let r1 = wm + 16 + g;
    let a0 = [at!(k0, r0), at!(k0, r0 + 8), at!(k1, r0), at!(k1, r0 + 8)];
    let a1 = [at!(k0, r1), at!(k0, r1 + 8), at!(k1, r1), at!(k1, r1 + 8)];
    let c = wn + g;
    let b0 = [bt!(k0, c), bt!(k1, c)];
    let b1 = [bt!(k0, c + 8), bt!(k1, c + 8)];
    let b2 = [bt!(k0, c + 16), bt!(k1, c + 16)];
    let b3 = [bt!(k0, c + 24), bt!(k1, c + 24)];
    mma(&mut acc[0], a0, b0);
    mma(&mut acc[1], a0, b1);
    mma(&mut acc[2], a0, b2);
    mma(&mut acc[3], a0, b3);
    mma(&mut acc[4], a1, b0);
    mma(&mut acc[5], a1, b1);
    mma(&mut acc[6], a1, b2);
    mma(&mut acc[7], a1, b3);
}

/// `sgemm_f32` on tensor cores (TF32 inputs, f32 accumulation): same arguments and
/// semantics, about 3 decimal digits per product.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "ptx-kernel" fn sgemm_tf32(
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    c_in: *const f32,
    bias: *const f32,
    m: u32,
    n: u32,
    k: u32,
    b_kn: u32,
    has_bias: u32,
    alpha: f32,
    beta: f32,
    ws: *mut f32,
    counters: *mut u32,
) {
    let a = DenseA { a, m, k };
    let b = BMatrix {
        b,
        n,
        k,
        kn: b_kn != 0,
    };
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
    unsafe { gemm_block_tf32(&a, b, e) };
}

conv_kernel!(
    conv2d_tf32,
    f32,
    conv_on_tf32_cores,
    "`conv2d_f32` on tensor cores (TF32 inputs, f32 accumulation): same arguments and layout; never split."
);

/// A conv's tile loop on TF32 tensor cores (as `gemm::conv_on_cuda_cores`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn conv_on_tf32_cores<A: ALoad>(
    a: &A,
    k: u32,
    weight: *const f32,
    bias: *const f32,
    out: ConvOut,
    m: u32,
    cout: u32,
    has_bias: u32,
) {
    let (b, e) = conv_operands(weight, bias, out, m, cout, k, has_bias);
    unsafe { gemm_block_tf32(a, b, e) };
}
