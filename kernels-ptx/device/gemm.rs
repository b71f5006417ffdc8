//! GEMM on CUDA cores, and the convolutions as implicit GEMMs over the same tile loop.
//!
//! `C[m, n] = alpha * A[m, k] * B + beta * C + bias[n]`, f32 in and out, f32 accumulation.
//! A block computes a 128 x 64 tile of C with 256 threads, each an 8 x 4 micro-tile in
//! registers (rows `ty*4..ty*4+4` and `64+ty*4..64+ty*4+4`, columns `tx*4..tx*4+4`, with
//! `tx = thread % 16`, `ty = thread / 16`). K advances 16 at a time through two shared-memory
//! buffers: while the block multiplies one, each thread holds its share of the next tile
//! (8 A values, 4 B values) in registers and stores it after, so there is one barrier per
//! k-step. A is stored transposed (`As[k][row]`, rows padded to 132) so a thread reads its 8
//! rows as two 16-byte loads; B as `Bs[k][col]` (padded to 68), one 16-byte load. Every
//! element outside `m x k` or `k x n` is loaded as zero, so any size works; only the stores
//! are masked.
//!
//! Where A comes from is the `ALoad` trait: a row-major matrix (`sgemm_f32`), the patches of
//! a channels-last map gathered on the fly (`conv2d_f32`: implicit GEMM, no im2col buffer in
//! global memory), or a masked conv's patches, each neighbour read from the fresh rows when
//! its position is active and from the template's cached map otherwise
//! (`masked_conv2d_cache_f32` / `_f16` / `_bf16`, the CPU's `MaskedInput`). Each thread loads the same
//! 8 rows of A on every k-step, so the per-row work (output position -> input coordinates,
//! the divisions) happens once per kernel, in `ALoad::row`.
//!
//! Launch (all four): grid `(ceil(n / 64), ceil(m / 128))`, block 256, dynamic shared memory
//! `SHARED_BYTES` = 25600 bytes.

use crate::elementwise::grid_stride;
use crate::gpu::{block, block_dim, block_y, block_z, grid_dim, grid_dim_z, sync_threads, thread};
use crate::intrinsics::{atomic_add_gpu, fence_gpu, load_gpu};
use crate::prelude::*;

pub const BM: u32 = 128;
pub const BN: u32 = 64;
pub const BK: u32 = 16;
/// Row strides of the shared tiles, padded (and kept multiples of 4 floats for 16-byte loads).
const AS_LD: u32 = BM + 4;
const BS_LD: u32 = BN + 4;
const AS_LEN: u32 = BK * AS_LD;
const BS_LEN: u32 = BK * BS_LD;
/// Two A buffers, then two B buffers: 6400 floats (host: `SHARED_BYTES` in `src/cuda/ops.rs`).
#[allow(dead_code)]
pub const SHARED_FLOATS: u32 = 2 * (AS_LEN + BS_LEN);

/// 16 bytes, loaded and stored as one vector access.
#[repr(simd)]
pub struct F4([f32; 4]);
impl Copy for F4 {}

#[inline(always)]
pub(crate) unsafe fn load4(p: *const f32) -> [f32; 4] {
    unsafe { transmute(*(p as *const F4)) }
}

/// A source of A's elements. `row` and `col` precompute what a row or a k-column needs;
/// `load` must return 0 outside the matrix (a row `>= m` or a column `>= k`).
pub trait ALoad {
    type Row: Copy;
    type Col: Copy;
    fn row(&self, r: u32) -> Self::Row;
    fn col(&self, k: u32) -> Self::Col;
    fn load(&self, row: Self::Row, col: Self::Col) -> f32;
    /// Columns `k..k + 4` of a row (`k` a multiple of 4, `col = self.col(k)`), zeros outside
    /// the matrix: one vector load where the source allows it (the f16 tensor-core kernels).
    #[inline(always)]
    fn load4(&self, row: Self::Row, k: u32, col: Self::Col) -> [f32; 4] {
        load4_each(self, row, k, col)
    }
}

/// [`ALoad::load4`] element by element.
#[inline(always)]
pub fn load4_each<A: ALoad + ?Sized>(a: &A, row: A::Row, k: u32, col: A::Col) -> [f32; 4] {
    [
        a.load(row, col),
        a.load(row, a.col(k + 1)),
        a.load(row, a.col(k + 2)),
        a.load(row, a.col(k + 3)),
    ]
}

/// B is `[k, n]` (`kn`, a conv's packed weight) or `[n, k]` (a PyTorch linear weight).
pub struct BMatrix {
    pub b: *const f32,
    pub n: u32,
    pub k: u32,
    pub kn: bool,
}
impl Copy for BMatrix {}

/// Where C goes and what the epilogue adds: `c = alpha * acc + beta * c_in + bias`, `c_in`
/// read only when `beta != 0` (C itself for an in-place product, or a residual to add).
pub struct Epilogue {
    pub c: *mut f32,
    pub c_in: *const f32,
    pub bias: *const f32,
    pub has_bias: bool,
    pub alpha: f32,
    pub beta: f32,
    pub m: u32,
    pub n: u32,
    pub split: SplitSums,
    pub bias_rows: BiasRows,
}

/// Which row of the bias `[samples, n]` each output row adds: row `sample_of_row[r]` when
/// that table is given (a ragged batch's rows, each with its segment's), else row
/// `r / rows_per_sample` when that is not 0 (a batch of maps, each with its own), else row 0
/// (one bias for every row, `[n]`). A per-sample bias carries a resnet's time embedding
/// into its first conv.
pub struct BiasRows {
    pub rows_per_sample: u32,
    pub sample_of_row: *const u32,
}
impl Copy for BiasRows {}

impl BiasRows {
    /// One bias for every row.
    pub const SHARED: BiasRows = BiasRows {
        rows_per_sample: 0,
        sample_of_row: 0usize as *const u32,
    };

    /// The offset of output row `row`'s bias row, for `n` columns.
    #[inline(always)]
    pub unsafe fn offset(&self, row: u32, n: u32) -> usize {
        let sample = if self.sample_of_row as usize != 0 {
            unsafe { *self.sample_of_row.add(row as usize) }
        } else if self.rows_per_sample != 0 {
            row / self.rows_per_sample
        } else {
            0
        };
        sample as usize * n as usize
    }
}

/// How a split-K launch (`gridDim.z = splits > 1`) sums its slices. With `counters` null,
/// the host passed the `[splits, m, n]` workspace as C (alpha 1, beta 0, no bias) and sums
/// it with `splitk_reduce_f32` afterwards. Otherwise the launch does it alone: each block
/// writes its slice to `ws`, and the last of an output tile's blocks to arrive (counted in
/// `counters[tile]`, zero before the launch and reset by that block) sums the tile's slices
/// through the epilogue into C.
pub struct SplitSums {
    pub ws: *mut f32,
    pub counters: *mut u32,
}
impl Copy for SplitSums {}

/// The whole tile loop of one block. With `gridDim.z = splits > 1` (split-K, for products
/// with too few output tiles to fill the GPU), block `z` sums only its share of the k tiles
/// and writes them to slice `z` of a `[splits, m, n]` workspace, summed as `e.split` says.
#[inline(always)]
pub unsafe fn gemm_block<A: ALoad>(a: &A, b: BMatrix, e: Epilogue) {
    let t = thread();
    let (tx, ty) = (t % 16, t / 16);
    let m0 = block_y() * BM;
    let n0 = block() * BN;
    let smem = crate::prelude::gpu_launch_sized_workgroup_mem::<F4>() as *mut f32;

    // This thread's share of A: rows m0 + ty + 16 i (i < 8), column k0 + tx.
    let r0 = m0 + ty;
    let rows = rows_of(a, r0);
    let mut ar = [0.0f32; 8];
    let mut br = [0.0f32; 4];
    let mut acc = [[0.0f32; 4]; 8];

    let KShare {
        begin: kt_begin,
        end: kt_end,
        one_launch,
        target,
    } = k_share(&e, (b.k + BK - 1) / BK);
    // An empty share (possible for the last split) still writes its zeros.
    if kt_begin < kt_end {
        unsafe {
            load_tile(a, &rows, b, kt_begin * BK, t, n0, &mut ar, &mut br);
            store_tile(smem, 0, t, &ar, &br, b.kn, SIMT);
        }
    }
    sync_threads();
    let mut kt = kt_begin;
    while kt < kt_end {
        let cur = (kt - kt_begin) & 1;
        let more = kt + 1 < kt_end;
        if more {
            unsafe { load_tile(a, &rows, b, (kt + 1) * BK, t, n0, &mut ar, &mut br) };
        }
        let as_ = unsafe { smem.add((cur * AS_LEN) as usize) };
        let bs = unsafe { smem.add((2 * AS_LEN + cur * BS_LEN) as usize) };
        // Four k per iteration, written out: LLVM does not unroll the whole k-step itself,
        // and the accumulators must stay in registers (constant indices only).
        let mut kk = 0u32;
        while kk < BK {
            unsafe {
                fma_step(&mut acc, as_, bs, kk, tx, ty);
                fma_step(&mut acc, as_, bs, kk + 1, tx, ty);
                fma_step(&mut acc, as_, bs, kk + 2, tx, ty);
                fma_step(&mut acc, as_, bs, kk + 3, tx, ty);
            }
            kk += 4;
        }
        if more {
            unsafe { store_tile(smem, 1 - cur, t, &ar, &br, b.kn, SIMT) };
        }
        sync_threads();
        kt += 1;
    }

    let row = m0 + ty * 4;
    let col = n0 + tx * 4;
    unsafe {
        store_row(&target, row, col, acc[0]);
        store_row(&target, row + 1, col, acc[1]);
        store_row(&target, row + 2, col, acc[2]);
        store_row(&target, row + 3, col, acc[3]);
        store_row(&target, row + 64, col, acc[4]);
        store_row(&target, row + 65, col, acc[5]);
        store_row(&target, row + 66, col, acc[6]);
        store_row(&target, row + 67, col, acc[7]);
    }
    if one_launch {
        // The tile loop's last barrier is behind every read of the shared tiles.
        unsafe { sum_slices_if_last(&e, m0, n0, smem as *mut u32) };
    }
}

/// A block's share of its product's k tiles, `begin..end` (all of them unless the launch
/// splits k: `gridDim.z > 1`), and where its sums go: C; or, split, its workspace slice as
/// raw sums (in one launch, `one_launch`, summed by [`sum_slices_if_last`] after).
pub struct KShare {
    pub begin: u32,
    pub end: u32,
    pub one_launch: bool,
    pub target: Epilogue,
}

#[inline(always)]
pub fn k_share(e: &Epilogue, ktiles: u32) -> KShare {
    let splits = grid_dim_z();
    let per_split = (ktiles + splits - 1) / splits;
    let begin = block_z() * per_split;
    let end = if begin + per_split < ktiles {
        begin + per_split
    } else {
        ktiles
    };
    let one_launch = splits > 1 && e.split.counters as usize != 0;
    let slice = block_z() as usize * e.m as usize * e.n as usize;
    let target = if one_launch {
        Epilogue {
            c: unsafe { e.split.ws.add(slice) },
            has_bias: false,
            alpha: 1.0,
            beta: 0.0,
            ..*e
        }
    } else {
        Epilogue {
            c: unsafe { e.c.add(slice) },
            ..*e
        }
    };
    KShare {
        begin,
        end,
        one_launch,
        target,
    }
}

/// A one-launch split-K block's arrival (see [`SplitSums`]): the last of its tile's blocks
/// sums the tile's slices in slice order (as `splitk_reduce_f32`, so both ways give the same
/// bits), writes C through the epilogue and resets the tile's counter for the next launch.
/// `flag` is a shared word for the block's verdict.
#[inline(always)]
pub unsafe fn sum_slices_if_last(e: &Epilogue, m0: u32, n0: u32, flag: *mut u32) {
    let t = thread();
    let splits = grid_dim_z();
    let tile = (block_y() * grid_dim() + block()) as usize;
    // Release: each thread's slice stores are ordered before the barrier, which orders them
    // before thread 0's arrival.
    fence_gpu();
    sync_threads();
    if t == 0 {
        let arrived = unsafe { atomic_add_gpu(e.split.counters.add(tile), 1) };
        unsafe { *flag = if arrived + 1 == splits { 1 } else { 0 } };
    }
    sync_threads();
    if unsafe { *flag } == 0 {
        return;
    }
    // Acquire: the other blocks' slices, stored before their arrivals.
    fence_gpu();
    let mn = e.m as usize * e.n as usize;
    let mut i = t;
    while i < BM * BN {
        let (row, col) = (m0 + i / BN, n0 + i % BN);
        if row < e.m && col < e.n {
            let at = row as usize * e.n as usize + col as usize;
            let mut sum = 0.0f32;
            let mut z = 0u32;
            while z < splits {
                sum += unsafe { load_gpu(e.split.ws.add(z as usize * mn + at)) };
                z += 1;
            }
            unsafe { store_one(e, row, col, sum) };
        }
        i += block_dim();
    }
    if t == 0 {
        // The next launch to use this counter is queued after this one ends.
        unsafe { *e.split.counters.add(tile) = 0 };
    }
}

/// This thread's rows of A: `r0 + 16 i`, `i < 8` (see `load_tile`).
#[inline(always)]
pub fn rows_of<A: ALoad>(a: &A, r0: u32) -> [A::Row; 8] {
    [
        a.row(r0),
        a.row(r0 + 16),
        a.row(r0 + 32),
        a.row(r0 + 48),
        a.row(r0 + 64),
        a.row(r0 + 80),
        a.row(r0 + 96),
        a.row(r0 + 112),
    ]
}

/// One k of the micro-tile: `acc[i][j] += A[row i][k] * B[k][col j]`.
#[inline(always)]
unsafe fn fma_step(
    acc: &mut [[f32; 4]; 8],
    as_: *const f32,
    bs: *const f32,
    kk: u32,
    tx: u32,
    ty: u32,
) {
    let (a0, a1, bv) = unsafe {
        (
            load4(as_.add((kk * AS_LD + ty * 4) as usize)),
            load4(as_.add((kk * AS_LD + 64 + ty * 4) as usize)),
            load4(bs.add((kk * BS_LD + tx * 4) as usize)),
        )
    };
    let mut i = 0usize;
    while i < 4 {
        let mut j = 0usize;
        while j < 4 {
            acc[i][j] = a0[i].mul_add(bv[j], acc[i][j]);
            acc[i + 4][j] = a1[i].mul_add(bv[j], acc[i + 4][j]);
            j += 1;
        }
        i += 1;
    }
}

/// Writes columns `col..col + 4` of one row of the micro-tile (those inside C).
#[inline(always)]
unsafe fn store_row(e: &Epilogue, row: u32, col: u32, v: [f32; 4]) {
    if row >= e.m {
        return;
    }
    unsafe {
        store_one(e, row, col, v[0]);
        store_one(e, row, col + 1, v[1]);
        store_one(e, row, col + 2, v[2]);
        store_one(e, row, col + 3, v[3]);
    }
}

#[inline(always)]
pub unsafe fn store_one(e: &Epilogue, row: u32, col: u32, acc: f32) {
    if col >= e.n {
        return;
    }
    let at = row as usize * e.n as usize + col as usize;
    let mut v = e.alpha * acc;
    unsafe {
        if e.beta != 0.0 {
            v = e.beta.mul_add(*e.c_in.add(at), v);
        }
        if e.has_bias {
            v += *e.bias.add(e.bias_rows.offset(row, e.n) + col as usize);
        }
        *e.c.add(at) = v;
    }
}

/// Loads this thread's share of the k-step starting at `k0` into registers.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub unsafe fn load_tile<A: ALoad>(
    a: &A,
    rows: &[A::Row; 8],
    b: BMatrix,
    k0: u32,
    t: u32,
    n0: u32,
    ar: &mut [f32; 8],
    br: &mut [f32; 4],
) {
    let col = a.col(k0 + t % 16);
    let mut i = 0usize;
    while i < 8 {
        ar[i] = a.load(rows[i], col);
        i += 1;
    }
    let mut i = 0usize;
    while i < 4 {
        // kn: 4 k-rows of 64 consecutive columns per pass; nk: 16 consecutive k per column.
        let (kk, nn) = if b.kn {
            (t / BN + 4 * i as u32, t % BN)
        } else {
            (t % BK, t / BK + 16 * i as u32)
        };
        let (k, n) = (k0 + kk, n0 + nn);
        br[i] = if k < b.k && n < b.n {
            let at = if b.kn {
                k as usize * b.n as usize + n as usize
            } else {
                n as usize * b.k as usize + k as usize
            };
            unsafe { *b.b.add(at) }
        } else {
            0.0
        };
        i += 1;
    }
}

/// Shared-tile layout: row strides of the A and B tiles, and whether values are rounded to
/// TF32 as they are stored (for the tensor-core kernels).
pub struct Smem {
    pub as_ld: u32,
    pub bs_ld: u32,
    pub tf32: bool,
}
impl Copy for Smem {}

/// The CUDA-core kernels' layout.
pub const SIMT: Smem = Smem {
    as_ld: AS_LD,
    bs_ld: BS_LD,
    tf32: false,
};

impl Smem {
    #[inline(always)]
    pub fn a(&self, smem: *mut f32, buf: u32) -> *mut f32 {
        unsafe { smem.add((buf * BK * self.as_ld) as usize) }
    }
    #[inline(always)]
    pub fn b(&self, smem: *mut f32, buf: u32) -> *mut f32 {
        unsafe { smem.add((2 * BK * self.as_ld + buf * BK * self.bs_ld) as usize) }
    }
}

/// Stores the registers of `load_tile` into shared buffer `buf` (0 or 1).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub unsafe fn store_tile(
    smem: *mut f32,
    buf: u32,
    t: u32,
    ar: &[f32; 8],
    br: &[f32; 4],
    kn: bool,
    l: Smem,
) {
    let as_ = l.a(smem, buf);
    let bs = l.b(smem, buf);
    let mut i = 0usize;
    while i < 8 {
        let v = if l.tf32 {
            crate::intrinsics::tf32(ar[i])
        } else {
            ar[i]
        };
        unsafe { *as_.add(((t % 16) * l.as_ld + t / 16 + 16 * i as u32) as usize) = v };
        i += 1;
    }
    let mut i = 0usize;
    while i < 4 {
        let (kk, nn) = if kn {
            (t / BN + 4 * i as u32, t % BN)
        } else {
            (t % BK, t / BK + 16 * i as u32)
        };
        let v = if l.tf32 {
            crate::intrinsics::tf32(br[i])
        } else {
            br[i]
        };
        unsafe { *bs.add((kk * l.bs_ld + nn) as usize) = v };
        i += 1;
    }
}

/// A row-major `[m, k]` matrix.
pub struct DenseA {
    pub a: *const f32,
    pub m: u32,
    pub k: u32,
}

impl ALoad for DenseA {
    /// The row's offset, `OUTSIDE_ROW` past `m` (the host keeps `m * k < 2^31`).
    type Row = u32;
    type Col = u32;
    #[inline(always)]
    fn row(&self, r: u32) -> u32 {
        if r < self.m { r * self.k } else { OUTSIDE_ROW }
    }
    #[inline(always)]
    fn col(&self, k: u32) -> u32 {
        k
    }
    #[inline(always)]
    fn load(&self, row: u32, col: u32) -> f32 {
        if (row != OUTSIDE_ROW) & (col < self.k) {
            unsafe { *self.a.add(row as usize + col as usize) }
        } else {
            0.0
        }
    }
    #[inline(always)]
    fn load4(&self, row: u32, k: u32, col: u32) -> [f32; 4] {
        // Rows of 4n floats from a 16-byte aligned start: every 4-aligned k is one load.
        if (self.k % 4 == 0) & (self.a as usize % 16 == 0) {
            if (row != OUTSIDE_ROW) & (col < self.k) {
                unsafe { load4(self.a.add(row as usize + col as usize)) }
            } else {
                [0.0; 4]
            }
        } else {
            load4_each(self, row, k, col)
        }
    }
}

const OUTSIDE_ROW: u32 = 0xffff_ffff;

/// `C = alpha * A * op(B) + beta * C_in (+ bias)`: A `[m, k]`, B `[k, n]` when `b_kn != 0`
/// else `[n, k]` (x * W^T), C and C_in `[m, n]`, bias `[n]` read when `has_bias != 0`. C_in
/// is read only when `beta != 0`; it may be C itself (each element is read before it is
/// written, by the same thread). Split launches: see [`SplitSums`] (`ws`, `counters`).
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "ptx-kernel" fn sgemm_f32(
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
    unsafe { gemm_block(&a, b, e) };
}

/// The second half of a split-K product: `c = alpha * sum_z ws[z] + beta * c_in + bias`
/// over the `[splits, m, n]` workspace the split blocks wrote (`mn = m * n`). C_in is read
/// only when `beta != 0`, and may be C itself; the bias row of each output row as
/// [`BiasRows`] (`rows_per_sample`, `sample_of_row`) says. Launch: 1-D grid-stride over `mn`.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "ptx-kernel" fn splitk_reduce_f32(
    ws: *const f32,
    c: *mut f32,
    c_in: *const f32,
    bias: *const f32,
    mn: u32,
    n: u32,
    splits: u32,
    has_bias: u32,
    alpha: f32,
    beta: f32,
    rows_per_sample: u32,
    sample_of_row: *const u32,
) {
    let bias_rows = BiasRows {
        rows_per_sample,
        sample_of_row,
    };
    grid_stride!(mn, |i| {
        let mut sum = 0.0f32;
        let mut z = 0u32;
        while z < splits {
            sum += unsafe { *ws.add(z as usize * mn as usize + i as usize) };
            z += 1;
        }
        let mut v = alpha * sum;
        unsafe {
            if beta != 0.0 {
                v = beta.mul_add(*c_in.add(i as usize), v);
            }
            if has_bias != 0 {
                v += *bias.add(bias_rows.offset(i / n, n) + (i % n) as usize);
            }
            *c.add(i as usize) = v;
        }
    });
}

/// Geometry of a conv as the kernels take it; `ky - pad` and `kx - pad` wrap around in u32,
/// so `oy * stride + ky - pad` is out of range (`>= h`) exactly when it is negative or past
/// the map.
pub struct ConvGeom {
    pub h: u32,
    pub w: u32,
    pub cin: u32,
    pub kw: u32,
    pub stride: u32,
    pub pad: u32,
    pub out_w: u32,
    /// Patch length `kh * kw * cin`.
    pub k: u32,
}
impl Copy for ConvGeom {}

/// A k-column of the patch matrix: tap offsets (minus the padding, wrapped) and channel.
pub struct ConvCol {
    dy: u32,
    dx: u32,
    ci: u32,
}
impl Copy for ConvCol {}

/// An output row's top-left input coordinates (`oy * stride`, `ox * stride`) and its map;
/// a row past `m` gets coordinates no tap reaches, so it loads zeros.
pub struct ConvRow {
    y: u32,
    x: u32,
    map: u32,
}
impl Copy for ConvRow {}

const OUTSIDE: u32 = 0x4000_0000;
/// `row_of` of an inactive position (the CPU's `tokens::NOT_ACTIVE`).
const NOT_ACTIVE: u32 = 0xffff_ffff;

impl ConvGeom {
    #[inline(always)]
    fn col(&self, k: u32) -> ConvCol {
        if k >= self.k {
            return ConvCol {
                dy: OUTSIDE,
                dx: OUTSIDE,
                ci: 0,
            };
        }
        let tap = k / self.cin;
        let ci = k - tap * self.cin;
        let ky = tap / self.kw;
        let kx = tap - ky * self.kw;
        ConvCol {
            dy: ky - self.pad,
            dx: kx - self.pad,
            ci,
        }
    }

    #[inline(always)]
    fn row(&self, position: u32, map: u32) -> ConvRow {
        let oy = position / self.out_w;
        let ox = position - oy * self.out_w;
        ConvRow {
            y: oy * self.stride,
            x: ox * self.stride,
            map,
        }
    }

    /// The input position `(iy, ix)` a row and column read, or `None` (padding, or outside
    /// the matrix).
    #[inline(always)]
    fn position(&self, row: ConvRow, col: ConvCol) -> (u32, bool) {
        let iy = row.y + col.dy;
        let ix = row.x + col.dx;
        (iy * self.w + ix, (iy < self.h) & (ix < self.w))
    }
}

/// Dense channels-last maps `[batch, h, w, cin]`: row `r` is image `r / out_hw`, output
/// position `r % out_hw`.
pub struct ConvA {
    pub x: *const f32,
    pub g: ConvGeom,
    pub out_hw: u32,
    pub m: u32,
}

impl ConvA {
    /// The dense conv's A operand from the kernel arguments
    /// `[h, w, cin, kh, kw, stride, pad, out_h, out_w]` (shared by the CUDA-core and TF32
    /// kernels).
    #[inline(always)]
    pub fn new(
        x: *const f32,
        m: u32,
        [h, w, cin, kh, kw, stride, pad, out_h, out_w]: [u32; 9],
    ) -> ConvA {
        let g = ConvGeom {
            h,
            w,
            cin,
            kw,
            stride,
            pad,
            out_w,
            k: kh * kw * cin,
        };
        ConvA {
            x,
            g,
            out_hw: out_h * out_w,
            m,
        }
    }
}

impl ALoad for ConvA {
    type Row = ConvRow;
    type Col = ConvCol;
    #[inline(always)]
    fn row(&self, r: u32) -> ConvRow {
        if r >= self.m {
            return ConvRow {
                y: OUTSIDE,
                x: OUTSIDE,
                map: 0,
            };
        }
        let b = r / self.out_hw;
        self.g.row(r - b * self.out_hw, b)
    }
    #[inline(always)]
    fn col(&self, k: u32) -> ConvCol {
        self.g.col(k)
    }
    #[inline(always)]
    fn load(&self, row: ConvRow, col: ConvCol) -> f32 {
        let (pos, inside) = self.g.position(row, col);
        if inside {
            unsafe { *self.x.add(self.at(row, pos, col)) }
        } else {
            0.0
        }
    }
    #[inline(always)]
    fn load4(&self, row: ConvRow, k: u32, col: ConvCol) -> [f32; 4] {
        // With 4n channels, 4 aligned k are 4 channels of one tap: one aligned load.
        if (self.g.cin % 4 == 0) & (self.x as usize % 16 == 0) {
            let (pos, inside) = self.g.position(row, col);
            if inside {
                unsafe { load4(self.x.add(self.at(row, pos, col))) }
            } else {
                [0.0; 4]
            }
        } else {
            load4_each(self, row, k, col)
        }
    }
}

impl ConvA {
    /// The offset in `x` of channel `col.ci` at input position `pos` of `row`'s map.
    #[inline(always)]
    fn at(&self, row: ConvRow, pos: u32, col: ConvCol) -> usize {
        let hw = self.g.h as usize * self.g.w as usize;
        (row.map as usize * hw + pos as usize) * self.g.cin as usize + col.ci as usize
    }
}

/// A dense conv kernel of channels-last maps `x = [batch, h, w, cin]`: `out = [batch *
/// out_h * out_w, cout]`, `m` its rows. `$w` is the weight's element type and `$conv` the
/// tile loop it runs on the patches ([`conv_on_cuda_cores`], `mma::conv_on_tf32_cores`,
/// `gemm_f16::conv_on_f16_cores`).
macro_rules! conv_kernel {
    ($name:ident, $w:ty, $conv:path, $doc:literal) => {
        #[doc = $doc]
        #[unsafe(no_mangle)]
        #[allow(clippy::too_many_arguments)]
        pub unsafe extern "ptx-kernel" fn $name(
            x: *const f32,
            weight: *const $w,
            bias: *const f32,
            out: *mut f32,
            residual: *const f32,
            m: u32,
            cout: u32,
            h: u32,
            w: u32,
            cin: u32,
            kh: u32,
            kw: u32,
            stride: u32,
            pad: u32,
            out_h: u32,
            out_w: u32,
            has_bias: u32,
            has_residual: u32,
            ws: *mut f32,
            counters: *mut u32,
            rows_per_sample: u32,
            sample_of_row: *const u32,
        ) {
            let a = ConvA::new(x, m, [h, w, cin, kh, kw, stride, pad, out_h, out_w]);
            let out = ConvOut::new(
                out,
                residual,
                has_residual,
                (ws, counters),
                (rows_per_sample, sample_of_row),
            );
            unsafe { $conv(&a, a.g.k, weight, bias, out, m, cout, has_bias) };
        }
    };
}
pub(crate) use conv_kernel;

conv_kernel!(
    conv2d_f32,
    f32,
    conv_on_cuda_cores,
    "2-D convolution with the packed weight `[kh * kw * cin, cout]` (rows by (ky, kx, ci), as `Conv2dWeight`), plus `bias[cout]` when `has_bias != 0` and plus `residual` (laid out as `out`) when `has_residual != 0`. Split launches: see [`SplitSums`]; a bias per sample (`[batch, cout]`): see [`BiasRows`]."
);

/// A conv's tile loop on CUDA cores: patches of length `k` from `a`, the packed f32 weight
/// `[k, cout]`, the epilogue of [`conv_operands`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub unsafe fn conv_on_cuda_cores<A: ALoad>(
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
    unsafe { gemm_block(a, b, e) };
}

/// A cached map's element type, widened to f32 where it is read.
pub trait Widen: Copy {
    fn widen(self) -> f32;
    /// Four consecutive values from `p` (aligned to four of them), widened.
    unsafe fn load4(p: *const Self) -> [f32; 4];
    /// The bytes of four values: `load4`'s alignment.
    const VECTOR_ALIGN: usize;
}
impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[inline(always)]
    unsafe fn load4(p: *const f32) -> [f32; 4] {
        unsafe { load4(p) }
    }
    const VECTOR_ALIGN: usize = 16;
}
impl Widen for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self as f32
    }
    const VECTOR_ALIGN: usize = 8;
    #[inline(always)]
    unsafe fn load4(p: *const f16) -> [f32; 4] {
        let [lo, hi] = unsafe { load_u2(p as *const u32) };
        [f16_of(lo), f16_of(lo >> 16), f16_of(hi), f16_of(hi >> 16)]
    }
}
impl Widen for crate::bf16::Bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    const VECTOR_ALIGN: usize = 8;
    #[inline(always)]
    unsafe fn load4(p: *const crate::bf16::Bf16) -> [f32; 4] {
        let [lo, hi] = unsafe { load_u2(p as *const u32) };
        use crate::bf16::Bf16;
        [
            Bf16(lo as u16).to_f32(),
            Bf16((lo >> 16) as u16).to_f32(),
            Bf16(hi as u16).to_f32(),
            Bf16((hi >> 16) as u16).to_f32(),
        ]
    }
}

/// The f16 in the low half of `w`, widened (exact).
#[inline(always)]
#[allow(unnecessary_transmutes)] // `f16::from_bits` is `core`'s, absent here
fn f16_of(w: u32) -> f32 {
    unsafe { transmute::<u16, f16>(w as u16) as f32 }
}

/// 8 bytes, loaded and stored as one vector access.
#[repr(simd)]
pub struct U2(pub [u32; 2]);
impl Copy for U2 {}

#[inline(always)]
pub(crate) unsafe fn load_u2(p: *const u32) -> [u32; 2] {
    unsafe { transmute(*(p as *const U2)) }
}

/// The CPU's `MaskedInput` per map (segment): `fresh[map]` are its fresh rows `[active, cin]`,
/// `cached[map]` its template's map `[h * w, cin]` (device addresses, one per map), and
/// `row_of[map * h * w + position]` the fresh row of an active position, `NOT_ACTIVE` for an
/// inactive one. Output row `r` is `(rows[2 r], rows[2 r + 1])` = (map, output position).
pub struct MaskedA<C: Widen> {
    fresh: *const u64,
    cached: *const u64,
    row_of: *const u32,
    rows: *const u32,
    pub g: ConvGeom,
    m: u32,
    _c: *const C,
}

impl<C: Widen> MaskedA<C> {
    #[inline(always)]
    pub fn new(
        fresh: *const u64,
        cached: *const u64,
        row_of: *const u32,
        rows: *const u32,
        g: ConvGeom,
        m: u32,
    ) -> MaskedA<C> {
        MaskedA {
            fresh,
            cached,
            row_of,
            rows,
            g,
            m,
            _c: 0usize as *const C,
        }
    }
}

impl<C: Widen> ALoad for MaskedA<C> {
    type Row = ConvRow;
    type Col = ConvCol;
    #[inline(always)]
    fn row(&self, r: u32) -> ConvRow {
        if r >= self.m {
            return ConvRow {
                y: OUTSIDE,
                x: OUTSIDE,
                map: 0,
            };
        }
        let (map, position) = unsafe {
            (
                *self.rows.add(2 * r as usize),
                *self.rows.add(2 * r as usize + 1),
            )
        };
        self.g.row(position, map)
    }
    #[inline(always)]
    fn col(&self, k: u32) -> ConvCol {
        self.g.col(k)
    }
    #[inline(always)]
    fn load(&self, row: ConvRow, col: ConvCol) -> f32 {
        let (pos, inside) = self.g.position(row, col);
        if !inside {
            return 0.0;
        }
        match unsafe { self.source(row, pos, col) } {
            Source::Fresh(p) => unsafe { *p },
            Source::Cached(p) => unsafe { (*p).widen() },
        }
    }
    #[inline(always)]
    fn load4(&self, row: ConvRow, k: u32, col: ConvCol) -> [f32; 4] {
        // With 4n channels, 4 aligned k are 4 channels of one tap, fresh or cached alike:
        // one vector load where the address is aligned (every map the host makes starts
        // aligned; a misaligned vector load would fault, so it is checked).
        if self.g.cin % 4 != 0 {
            return load4_each(self, row, k, col);
        }
        let (pos, inside) = self.g.position(row, col);
        if !inside {
            return [0.0; 4];
        }
        match unsafe { self.source(row, pos, col) } {
            Source::Fresh(p) if p as usize % 16 == 0 => unsafe { load4(p) },
            Source::Cached(p) if p as usize % C::VECTOR_ALIGN == 0 => unsafe { C::load4(p) },
            _ => load4_each(self, row, k, col),
        }
    }
}

/// Where a masked conv reads an element: a fresh row, or the segment's cached map.
enum Source<C> {
    Fresh(*const f32),
    Cached(*const C),
}

impl<C: Widen> MaskedA<C> {
    /// The address of channel `col.ci` at input position `pos` of `row`'s segment.
    #[inline(always)]
    unsafe fn source(&self, row: ConvRow, pos: u32, col: ConvCol) -> Source<C> {
        let hw = self.g.h as usize * self.g.w as usize;
        let cin = self.g.cin as usize;
        unsafe {
            let fresh_row = *self.row_of.add(row.map as usize * hw + pos as usize);
            if fresh_row != NOT_ACTIVE {
                let fresh = *self.fresh.add(row.map as usize) as *const f32;
                Source::Fresh(fresh.add(fresh_row as usize * cin + col.ci as usize))
            } else {
                let cached = *self.cached.add(row.map as usize) as *const C;
                Source::Cached(cached.add(pos as usize * cin + col.ci as usize))
            }
        }
    }
}


/// A conv's output rows `[m, cout]`, the residual added to them (same layout) when
/// `has_residual != 0`, and how a split launch sums its slices.
pub struct ConvOut {
    pub out: *mut f32,
    pub residual: *const f32,
    pub has_residual: u32,
    pub split: SplitSums,
    pub bias_rows: BiasRows,
}
impl Copy for ConvOut {}

impl ConvOut {
    /// From a conv kernel's arguments: `(ws, counters)` and `(rows_per_sample,
    /// sample_of_row)` as [`SplitSums`] and [`BiasRows`] take them.
    #[inline(always)]
    pub fn new(
        out: *mut f32,
        residual: *const f32,
        has_residual: u32,
        (ws, counters): (*mut f32, *mut u32),
        (rows_per_sample, sample_of_row): (u32, *const u32),
    ) -> ConvOut {
        ConvOut {
            out,
            residual,
            has_residual,
            split: SplitSums { ws, counters },
            bias_rows: BiasRows {
                rows_per_sample,
                sample_of_row,
            },
        }
    }
}

/// A conv's B operand and epilogue, shared by every conv kernel: the packed weight
/// `[k, cout]` and the output rows, bias fused when `has_bias != 0`, the residual when
/// `out.has_residual != 0`.
#[inline(always)]
pub fn conv_operands(
    weight: *const f32,
    bias: *const f32,
    out: ConvOut,
    m: u32,
    cout: u32,
    k: u32,
    has_bias: u32,
) -> (BMatrix, Epilogue) {
    let b = BMatrix {
        b: weight,
        n: cout,
        k,
        kn: true,
    };
    (b, conv_epilogue(bias, out, m, cout, has_bias))
}

/// A conv's epilogue: the output rows, the bias when `has_bias != 0`, the residual when
/// `out.has_residual != 0`.
#[inline(always)]
pub fn conv_epilogue(bias: *const f32, out: ConvOut, m: u32, cout: u32, has_bias: u32) -> Epilogue {
    Epilogue {
        c: out.out,
        c_in: out.residual,
        bias,
        has_bias: has_bias != 0,
        alpha: 1.0,
        beta: if out.has_residual != 0 { 1.0 } else { 0.0 },
        m,
        n: cout,
        split: out.split,
        bias_rows: out.bias_rows,
    }
}

/// A masked conv kernel over a ragged batch (see `MaskedA`), `out = [m, cout]`: `$c` is
/// the cached maps' element type, `$w` the weight's, and `$conv` the tile loop it runs
/// (as [`conv_kernel`]'s).
macro_rules! masked_conv_kernel {
    ($name:ident, $c:ty, $w:ty, $conv:path, $doc:literal) => {
        #[doc = $doc]
        #[unsafe(no_mangle)]
        #[allow(clippy::too_many_arguments)]
        pub unsafe extern "ptx-kernel" fn $name(
            fresh: *const u64,
            cached: *const u64,
            row_of: *const u32,
            rows: *const u32,
            weight: *const $w,
            bias: *const f32,
            out: *mut f32,
            residual: *const f32,
            m: u32,
            cout: u32,
            h: u32,
            w: u32,
            cin: u32,
            kh: u32,
            kw: u32,
            stride: u32,
            pad: u32,
            out_w: u32,
            has_bias: u32,
            has_residual: u32,
            ws: *mut f32,
            counters: *mut u32,
            rows_per_sample: u32,
            sample_of_row: *const u32,
        ) {
            let out = ConvOut::new(
                out,
                residual,
                has_residual,
                (ws, counters),
                (rows_per_sample, sample_of_row),
            );
            let g = ConvGeom {
                h,
                w,
                cin,
                kw,
                stride,
                pad,
                out_w,
                k: kh * kw * cin,
            };
            let a = MaskedA::<$c>::new(fresh, cached, row_of, rows, g, m);
            unsafe { $conv(&a, g.k, weight, bias, out, m, cout, has_bias) };
        }
    };
}
pub(crate) use masked_conv_kernel;

/// The packed weight, bias and residual as `conv2d_f32`.
macro_rules! masked_conv_f32_kernel {
    ($name:ident, $c:ty) => {
        masked_conv_kernel!(
            $name,
            $c,
            f32,
            conv_on_cuda_cores,
            "Masked 2-D convolution over a ragged batch on CUDA cores: the packed weight, bias and residual as `conv2d_f32`."
        );
    };
}
masked_conv_f32_kernel!(masked_conv2d_cache_f32, f32);
masked_conv_f32_kernel!(masked_conv2d_cache_f16, f16);
masked_conv_f32_kernel!(masked_conv2d_cache_bf16, crate::bf16::Bf16);
