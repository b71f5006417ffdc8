//! Dense scaled dot-product attention, f32, one warp per (query row, head), online softmax.
//!
//! `q = [batch, lq, c]`, `k = v = [batch, lk, c]`, head `h` the channels `h*d..(h+1)*d`.
//! A warp takes 32 keys at a time: lane `j` computes the score of key `kb + j` (the whole
//! dot product, the query read from shared memory), so the softmax's max and sum cost one
//! warp reduction per 32 keys; then each lane adds `p_j * v_j` into the output dimensions
//! it owns (`lane, lane + 32, ...`), reading each value row coalesced. No tensor cores yet:
//! the mma.sync version replaces this one.
//!
//! Launch: grid `(ceil(lq / warps), batch * heads)`, block `32 * warps`, dynamic shared
//! memory `warps * 2 * d * 4` bytes (each warp's scaled query and accumulator).

use crate::gemm::{F4, load4};
use crate::gpu::{
    NEG_INF, block, block_dim, block_y, exp, shared_f32, shfl_idx, shfl_xor, sync_threads,
    thread, warp_max, warp_sum,
};

#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "ptx-kernel" fn attention_rows_f32(
    q: *const f32,
    k: *const f32,
    v: *const f32,
    out: *mut f32,
    lq: u32,
    lk: u32,
    heads: u32,
    d: u32,
    scale: f32,
    causal: u32,
) {
    let warp = thread() >> 5;
    let lane = thread() & 31;
    let i = block() * (block_dim() >> 5) + warp;
    if i >= lq {
        return;
    }
    let (b, h) = (block_y() / heads, block_y() % heads);
    let c = (heads * d) as usize;
    let q_row = unsafe { q.add((b as usize * lq as usize + i as usize) * c + (h * d) as usize) };
    let out_row =
        unsafe { out.add((b as usize * lq as usize + i as usize) * c + (h * d) as usize) };
    let k_base = unsafe { k.add(b as usize * lk as usize * c + (h * d) as usize) };
    let v_base = unsafe { v.add(b as usize * lk as usize * c + (h * d) as usize) };
    let q_sh = unsafe { shared_f32().add((warp * 2 * d) as usize) };
    let acc = unsafe { q_sh.add(d as usize) };

    let mut t = lane;
    while t < d {
        unsafe {
            *q_sh.add(t as usize) = *q_row.add(t as usize) * scale;
            *acc.add(t as usize) = 0.0;
        }
        t += 32;
    }
    crate::gpu::sync_warp();

    let end = if causal != 0 && i + 1 < lk { i + 1 } else { lk };
    let mut m = NEG_INF;
    let mut l = 0.0f32;
    let mut kb = 0u32;
    while kb < end {
        let j = kb + lane;
        let valid = j < end;
        let mut s = NEG_INF;
        if valid {
            let k_row = unsafe { k_base.add(j as usize * c) };
            let mut dot = 0.0f32;
            let mut t = 0u32;
            while t < d {
                dot = unsafe { (*q_sh.add(t as usize)).mul_add(*k_row.add(t as usize), dot) };
                t += 1;
            }
            s = dot;
        }
        let m_new = m.max(warp_max(s));
        let p = if valid { exp(s - m_new) } else { 0.0 };
        let corr = exp(m - m_new);
        l = l * corr + warp_sum(p);
        let n = if end - kb < 32 { end - kb } else { 32 };
        let mut t = lane;
        while t < d {
            unsafe { *acc.add(t as usize) *= corr };
            t += 32;
        }
        // Every lane runs the shuffles (full-mask `shfl.sync`); then adds to its own dims.
        let mut jj = 0u32;
        while jj < n {
            let pj = shfl_idx(p, jj);
            let v_row = unsafe { v_base.add((kb + jj) as usize * c) };
            let mut t = lane;
            while t < d {
                unsafe {
                    *acc.add(t as usize) = pj.mul_add(*v_row.add(t as usize), *acc.add(t as usize))
                };
                t += 32;
            }
            jj += 1;
        }
        m = m_new;
        kb += 32;
    }
    let inv = 1.0 / l;
    let mut t = lane;
    while t < d {
        unsafe { *out_row.add(t as usize) = *acc.add(t as usize) * inv };
        t += 32;
    }
}

/// [`attention_rows_f32`] with the keys and values shared by the block: each round the block
/// stages 32 keys and their values of its (batch, head) in shared memory (coalesced loads),
/// and every warp, one query row each, reads them from there. The rows kernel streams each key
/// row once per query; this one once per `warps` queries, and without strided global loads.
///
/// Launch: grid `(ceil(lq / warps), batch * heads)`, block `32 * warps`, dynamic shared
/// memory `(warps * 2 * d + 32 * (d + 1) + 32 * d) * 4` bytes: each warp's scaled query and
/// accumulator, then the key tile (rows padded to `d + 1` floats so the lanes' dot products,
/// one key row each, hit distinct banks) and the value tile.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "ptx-kernel" fn attention_tiles_f32(
    q: *const f32,
    k: *const f32,
    v: *const f32,
    out: *mut f32,
    lq: u32,
    lk: u32,
    heads: u32,
    d: u32,
    scale: f32,
    causal: u32,
) {
    let warps = block_dim() >> 5;
    let warp = thread() >> 5;
    let lane = thread() & 31;
    let first = block() * warps;
    let i = first + warp;
    // Rows past `lq` still load tiles and meet every barrier; they only skip the math.
    let active = i < lq;
    let (b, h) = (block_y() / heads, block_y() % heads);
    let c = (heads * d) as usize;
    let row = if active { i } else { 0 };
    let q_row = unsafe { q.add((b as usize * lq as usize + row as usize) * c + (h * d) as usize) };
    let out_row =
        unsafe { out.add((b as usize * lq as usize + row as usize) * c + (h * d) as usize) };
    let k_base = unsafe { k.add(b as usize * lk as usize * c + (h * d) as usize) };
    let v_base = unsafe { v.add(b as usize * lk as usize * c + (h * d) as usize) };
    let q_sh = unsafe { shared_f32().add((warp * 2 * d) as usize) };
    let acc = unsafe { q_sh.add(d as usize) };
    let kd = d + 1;
    let k_tile = unsafe { shared_f32().add((warps * 2 * d) as usize) };
    let v_tile = unsafe { k_tile.add((32 * kd) as usize) };

    let mut t = lane;
    while t < d {
        unsafe {
            *q_sh.add(t as usize) = if active {
                *q_row.add(t as usize) * scale
            } else {
                0.0
            };
            *acc.add(t as usize) = 0.0;
        }
        t += 32;
    }

    // This warp's keys end at `end`; the block loads up to its last row's end.
    let end = keys_seen(row, lk, causal);
    let last_row = if first + warps <= lq { first + warps - 1 } else { lq - 1 };
    let block_end = keys_seen(last_row, lk, causal);
    let mut m = NEG_INF;
    let mut l = 0.0f32;
    let mut kb = 0u32;
    while kb < block_end {
        let n_tile = if block_end - kb < 32 { block_end - kb } else { 32 };
        sync_threads();
        let mut e = thread();
        while e < n_tile * d {
            let (r, col) = (e / d, e % d);
            unsafe {
                let src = (kb + r) as usize * c + col as usize;
                *k_tile.add((r * kd + col) as usize) = *k_base.add(src);
                *v_tile.add((r * d + col) as usize) = *v_base.add(src);
            }
            e += block_dim();
        }
        sync_threads();
        if active && kb < end {
            let j = kb + lane;
            let valid = j < end;
            let mut s = NEG_INF;
            if valid {
                let k_row = unsafe { k_tile.add((lane * kd) as usize) };
                let mut dot = 0.0f32;
                let mut t = 0u32;
                while t < d {
                    dot = unsafe { (*q_sh.add(t as usize)).mul_add(*k_row.add(t as usize), dot) };
                    t += 1;
                }
                s = dot;
            }
            let m_new = m.max(warp_max(s));
            let p = if valid { exp(s - m_new) } else { 0.0 };
            let corr = exp(m - m_new);
            l = l * corr + warp_sum(p);
            let n = if end - kb < 32 { end - kb } else { 32 };
            // Every lane makes the same passes (the shuffles are full-mask `shfl.sync`);
            // lanes past `d` in the last pass only shuffle.
            let mut t0 = 0u32;
            while t0 < d {
                let t = t0 + lane;
                let live = t < d;
                let mut a = if live {
                    unsafe { *acc.add(t as usize) * corr }
                } else {
                    0.0
                };
                let mut jj = 0u32;
                while jj < n {
                    let pj = shfl_idx(p, jj);
                    if live {
                        a = pj.mul_add(unsafe { *v_tile.add((jj * d + t) as usize) }, a);
                    }
                    jj += 1;
                }
                if live {
                    unsafe { *acc.add(t as usize) = a };
                }
                t0 += 32;
            }
            m = m_new;
        }
        kb += 32;
    }
    if active {
        let inv = 1.0 / l;
        let mut t = lane;
        while t < d {
            unsafe { *out_row.add(t as usize) = *acc.add(t as usize) * inv };
            t += 32;
        }
    }
}

/// How many keys query row `r` attends to: all `lk`, or `0..=r` when causal.
pub(crate) fn keys_seen(r: u32, lk: u32, causal: u32) -> u32 {
    if causal != 0 && r + 1 < lk { r + 1 } else { lk }
}

/// Repeats `body` with `$i` bound to each listed constant: a loop whose index selects
/// registers (an array indexed at run time lands in local memory).
macro_rules! unroll {
    ($i:ident in [$($n:literal),*] $body:block) => {
        $({
            #[allow(unused_variables)]
            let $i: usize = $n;
            $body
        })*
    };
}
pub(crate) use unroll;

/// Queries per block of [`attention_flash_f32`].
pub const FLASH_Q: u32 = 64;
/// Keys per tile.
pub const FLASH_K: u32 = 32;
/// Row stride of the transposed key tile: a multiple of 4 floats (16-byte loads) that spreads
/// the transposing stores over more banks than `FLASH_K` would.
const KT_LD: u32 = FLASH_K + 4;
/// Output column chunks of 32 per lane group: [`attention_flash_f32`] takes heads up to 96
/// wide (the host gives it up to 80, its tiles within the default 48 KiB of shared memory),
/// [`attention_flash_wide_f32`] up to 160 (SD1.5's deepest heads; its tiles need the
/// shared memory a launch opts into).
const CHUNKS: usize = 3;
const WIDE_CHUNKS: usize = 5;

/// The sequence and head of this block of a dense flash launch (block `y` is
/// `batch * heads + head`).
#[inline(always)]
pub(crate) unsafe fn dense_source(
    [q, k, v]: [*const f32; 3],
    out: *mut f32,
    lq: u32,
    lk: u32,
    heads: u32,
    d: u32,
) -> DenseHead {
    let (b, h) = (block_y() / heads, block_y() % heads);
    let c = (heads * d) as usize;
    let head = (h * d) as usize;
    DenseHead {
        q: unsafe { q.add(b as usize * lq as usize * c + head) },
        k: unsafe { k.add(b as usize * lk as usize * c + head) },
        v: unsafe { v.add(b as usize * lk as usize * c + head) },
        out: unsafe { out.add(b as usize * lq as usize * c + head) },
        lq,
        lk,
        c,
    }
}

/// A dense and a masked flash entry around one block body, `|source, q0, d, scale, causal|
/// body`: the dense entry takes `(q, k, v, out, lq, lk, heads, d, scale, causal)` (block `x`
/// the 64 query rows from `64 x`, block `y` the sequence and head), the masked one
/// `(q, k, v, cached_k, cached_v, row_of, tiles, segs, out, heads, d, scale, has_cache)` (see
/// [`attention_masked_flash_f32`]; never causal).
macro_rules! flash_entries {
    (
        $(#[$dense_doc:meta])* $dense:ident,
        $(#[$masked_doc:meta])* $masked:ident,
        |$source:ident, $q0:ident, $d:ident, $scale:ident, $causal:ident| $body:expr
    ) => {
        $(#[$dense_doc])*
        #[unsafe(no_mangle)]
        #[allow(clippy::too_many_arguments)]
        pub unsafe extern "ptx-kernel" fn $dense(
            q: *const f32,
            k: *const f32,
            v: *const f32,
            out: *mut f32,
            lq: u32,
            lk: u32,
            heads: u32,
            $d: u32,
            $scale: f32,
            $causal: u32,
        ) {
            let $source = unsafe {
                $crate::attention::dense_source([q, k, v], out, lq, lk, heads, $d)
            };
            let $q0 = $crate::gpu::block() * $crate::attention::FLASH_Q;
            unsafe { $body };
        }

        $(#[$masked_doc])*
        #[unsafe(no_mangle)]
        #[allow(clippy::too_many_arguments)]
        pub unsafe extern "ptx-kernel" fn $masked(
            q: *const f32,
            k: *const f32,
            v: *const f32,
            cached_k: *const u64,
            cached_v: *const u64,
            row_of: *const u32,
            tiles: *const u32,
            segs: *const u32,
            out: *mut f32,
            heads: u32,
            $d: u32,
            $scale: f32,
            has_cache: u32,
        ) {
            let ($source, $q0) = unsafe {
                $crate::attention::masked_source(
                    [q, k, v],
                    [cached_k, cached_v],
                    row_of,
                    tiles,
                    segs,
                    out,
                    heads,
                    $d,
                    has_cache,
                )
            };
            let $causal = 0u32;
            unsafe { $body };
        }
    };
}
pub(crate) use flash_entries;

flash_entries! {
    /// Dense attention tiled like a GEMM, for heads whose width `d` is a multiple of 4 and at
    /// most 80 (SD's 40, 64 and 80). A block of 128 threads takes 64 query rows of one
    /// (batch, head); each round it stages 32 keys (transposed) and their values in shared memory.
    /// Thread `(tq, tk) = (tid / 8, tid % 8)` computes the 4 x 4 scores of query rows `4 tq..`
    /// and keys `4 tk..` with two 16-byte shared loads per 16 FMAs, keeps the online-softmax
    /// state of its 4 rows (the 8 lanes of a row group reduce by butterfly shuffles), and
    /// accumulates its 4 rows x columns `4 tk + 32 u ..` of the output, the probabilities of the
    /// other keys coming from their owners by shuffles.
    ///
    /// Launch: grid `(ceil(lq / 64), batch * heads)`, block 128, dynamic shared memory
    /// `d * (64 + 36 + 32) * 4` bytes: the scaled query tile transposed `[d][64]`, the key tile
    /// transposed `[d][36]`, the value tile `[32][d]`.
    attention_flash_f32,
    /// Attention over a ragged batch, tiled as [`attention_flash_f32`]. The rows of
    /// `q = [rows, c]` are the segments' queries stacked; segment `s` is described by
    /// `segs[5 s..5 s + 5] = (q_start, q_len, key_start, key_len, map_start)` and owns query rows
    /// `q_start .. q_start + q_len` (also its output rows).
    ///
    /// - Without a cache (`has_cache == 0`), key `j` of segment `s` is row `key_start + j` of `k`
    ///   and `v` (cross-attention, each segment to its own text).
    /// - With one, key `j` is grid position `j` of the segment's template: the fresh row
    ///   `key_start + row_of[map_start + j]` of `k`, `v` when that position is active, else row
    ///   `j` of the f16 maps at `cached_k[s]`, `cached_v[s]` (device addresses), widened as read.
    ///   Masked self-attention thus reads the template's keys in place: no widened copy, no
    ///   scatter, one launch for every segment.
    ///
    /// Block `x` takes the 64 query rows from `tiles[2 x + 1]` of segment `tiles[2 x]`, block
    /// `y` is the head. Launch: grid `(tiles, heads)`, block 128, shared memory as
    /// [`attention_flash_f32`].
    attention_masked_flash_f32,
    |source, q0, d, scale, causal| flash_block::<_, CHUNKS>(&source, q0, d, scale, causal)
}

flash_entries! {
    /// [`attention_flash_f32`] for heads up to 160 wide (a multiple of 4): five 32-column
    /// output chunks per lane group. The same launch; its `d * 132 * 4` bytes of shared
    /// memory (84480 at 160) need the function's dynamic shared limit raised.
    attention_flash_wide_f32,
    /// [`attention_masked_flash_f32`] for heads up to 160 wide, as
    /// [`attention_flash_wide_f32`].
    attention_masked_flash_wide_f32,
    |source, q0, d, scale, causal| flash_block::<_, WIDE_CHUNKS>(&source, q0, d, scale, causal)
}

/// The segment, head and first query row of this block of a masked flash launch (see
/// [`attention_masked_flash_f32`] for the tables).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn masked_source(
    [q, k, v]: [*const f32; 3],
    [cached_k, cached_v]: [*const u64; 2],
    row_of: *const u32,
    tiles: *const u32,
    segs: *const u32,
    out: *mut f32,
    heads: u32,
    d: u32,
    has_cache: u32,
) -> (MaskedHead, u32) {
    let tile = block() as usize;
    let (s, q0) = unsafe { (*tiles.add(2 * tile), *tiles.add(2 * tile + 1)) };
    let seg = unsafe { segs.add(5 * s as usize) };
    let (q_start, lq, key_start, key_len, map_start) =
        unsafe { (*seg, *seg.add(1), *seg.add(2), *seg.add(3), *seg.add(4)) };
    let c = (heads * d) as usize;
    let head = (block_y() * d) as usize;
    let source = MaskedHead {
        rows: DenseHead {
            q: unsafe { q.add(q_start as usize * c + head) },
            k: unsafe { k.add(key_start as usize * c + head) },
            v: unsafe { v.add(key_start as usize * c + head) },
            out: unsafe { out.add(q_start as usize * c + head) },
            lq,
            lk: key_len,
            c,
        },
        cached_k: unsafe { segment_map(cached_k, has_cache, s, head) },
        cached_v: unsafe { segment_map(cached_v, has_cache, s, head) },
        row_of: unsafe { row_of.add(map_start as usize) },
        has_cache: has_cache != 0,
    };
    (source, q0)
}

/// Segment `s`'s f16 map from an address table, at column `head`; null without a cache.
#[inline(always)]
unsafe fn segment_map(table: *const u64, has_cache: u32, s: u32, head: usize) -> *const f16 {
    if has_cache != 0 {
        unsafe { (*table.add(s as usize) as *const f16).add(head) }
    } else {
        0usize as *const f16
    }
}

/// Where one block of [`flash_block`] reads its queries, keys and values and writes its
/// outputs: the rows of one sequence and head ([`DenseHead`]), keys read from its rows unless
/// the source says otherwise.
pub(crate) trait FlashSource {
    fn head(&self) -> &DenseHead;
    /// Element `t` of key `key` and of its value; `key < lk`.
    #[inline(always)]
    unsafe fn key_value(&self, key: u32, t: u32) -> (f32, f32) {
        let h = self.head();
        let at = key as usize * h.c + t as usize;
        unsafe { (*h.k.add(at), *h.v.add(at)) }
    }
}

/// One sequence and head of row-major `[len, c]` queries, keys, values and outputs, pointers
/// at the sequence's first row and the head's first column.
pub(crate) struct DenseHead {
    pub q: *const f32,
    pub k: *const f32,
    pub v: *const f32,
    pub out: *mut f32,
    pub lq: u32,
    pub lk: u32,
    pub c: usize,
}

impl DenseHead {
    /// Element `t` of query row `row`; `row < lq`.
    #[inline(always)]
    pub unsafe fn query(&self, row: u32, t: u32) -> f32 {
        unsafe { *self.q.add(row as usize * self.c + t as usize) }
    }
    /// The head's first output element of row `row`.
    #[inline(always)]
    pub unsafe fn out_row(&self, row: u32) -> *mut f32 {
        unsafe { self.out.add(row as usize * self.c) }
    }
}

impl FlashSource for DenseHead {
    #[inline(always)]
    fn head(&self) -> &DenseHead {
        self
    }
}

/// One segment and head of [`attention_masked_flash_f32`]: `rows` at the segment's first
/// query row (`q`, `out`) and first fresh key row (`k`, `v`); with `has_cache`, `row_of` at
/// its grid's map and the f16 maps at the head's first column.
pub(crate) struct MaskedHead {
    rows: DenseHead,
    cached_k: *const f16,
    cached_v: *const f16,
    row_of: *const u32,
    has_cache: bool,
}

/// `row_of` of an inactive position (the CPU's `tokens::NOT_ACTIVE`).
const NOT_ACTIVE: u32 = 0xffff_ffff;

impl FlashSource for MaskedHead {
    #[inline(always)]
    fn head(&self) -> &DenseHead {
        &self.rows
    }
    #[inline(always)]
    unsafe fn key_value(&self, key: u32, t: u32) -> (f32, f32) {
        let fresh_row = if self.has_cache {
            unsafe { *self.row_of.add(key as usize) }
        } else {
            key
        };
        let c = self.rows.c;
        if fresh_row != NOT_ACTIVE {
            let at = fresh_row as usize * c + t as usize;
            unsafe { (*self.rows.k.add(at), *self.rows.v.add(at)) }
        } else {
            let at = key as usize * c + t as usize;
            unsafe { ((*self.cached_k.add(at)) as f32, (*self.cached_v.add(at)) as f32) }
        }
    }
}

/// The body of the flash kernels: query rows `q0..q0 + 64` of one sequence and head, against
/// all its keys (or, when `causal`, those up to each row), for heads up to `32 * N` wide.
#[inline(always)]
unsafe fn flash_block<S: FlashSource, const N: usize>(
    src: &S,
    q0: u32,
    d: u32,
    scale: f32,
    causal: u32,
) {
    let tid = thread();
    let lane = tid & 31;
    let (tq, tk) = (tid >> 3, tid & 7);
    let group = lane - tk;
    let rows = src.head();
    let (lq, lk) = (rows.lq, rows.lk);
    let qs = crate::prelude::gpu_launch_sized_workgroup_mem::<F4>() as *mut f32;
    let ks = unsafe { qs.add((d * FLASH_Q) as usize) };
    let vs = unsafe { ks.add((d * KT_LD) as usize) };

    // The scaled query tile, transposed; rows past `lq` are zeros (computed, never stored).
    let mut e = tid;
    while e < FLASH_Q * d {
        let (r, t) = (e / d, e % d);
        let row = q0 + r;
        unsafe {
            *qs.add((t * FLASH_Q + r) as usize) = if row < lq {
                rows.query(row, t) * scale
            } else {
                0.0
            };
        }
        e += block_dim();
    }

    let rows_end = if q0 + FLASH_Q < lq { q0 + FLASH_Q } else { lq };
    let last = rows_end - 1;
    let k_end = keys_seen(last, lk, causal);
    let mut m = [NEG_INF; 4];
    let mut l = [0.0f32; 4];
    let mut acc = [[[0.0f32; 4]; N]; 4];
    let mut kb = 0u32;
    while kb < k_end {
        sync_threads();
        let mut e = tid;
        while e < FLASH_K * d {
            let (r, t) = (e / d, e % d);
            let key = kb + r;
            let (kv, vv) = if key < lk {
                unsafe { src.key_value(key, t) }
            } else {
                (0.0, 0.0)
            };
            unsafe {
                *ks.add((t * KT_LD + r) as usize) = kv;
                *vs.add((r * d + t) as usize) = vv;
            }
            e += block_dim();
        }
        sync_threads();

        let mut s = [[0.0f32; 4]; 4];
        let mut t = 0u32;
        while t < d {
            let qv = unsafe { load4(qs.add((t * FLASH_Q + 4 * tq) as usize)) };
            let kv = unsafe { load4(ks.add((t * KT_LD + 4 * tk) as usize)) };
            unroll!(i in [0, 1, 2, 3] {
                unroll!(j in [0, 1, 2, 3] {
                    s[i][j] = qv[i].mul_add(kv[j], s[i][j]);
                });
            });
            t += 1;
        }

        // Mask, then the online softmax of each of this thread's 4 rows.
        let mut p = [[0.0f32; 4]; 4];
        unroll!(i in [0, 1, 2, 3] {
            let row = q0 + 4 * tq + i as u32;
            let mut mx = NEG_INF;
            unroll!(j in [0, 1, 2, 3] {
                let key = kb + 4 * tk + j as u32;
                if key >= lk || (causal != 0 && key > row) {
                    s[i][j] = NEG_INF;
                }
                mx = mx.max(s[i][j]);
            });
            mx = mx.max(shfl_xor(mx, 1));
            mx = mx.max(shfl_xor(mx, 2));
            mx = mx.max(shfl_xor(mx, 4));
            // Every row sees key 0 in the first tile, so `m_new` is finite from then on.
            let m_new = m[i].max(mx);
            let corr = exp(m[i] - m_new);
            let mut sum = 0.0f32;
            unroll!(j in [0, 1, 2, 3] {
                p[i][j] = exp(s[i][j] - m_new);
                sum += p[i][j];
            });
            sum += shfl_xor(sum, 1);
            sum += shfl_xor(sum, 2);
            sum += shfl_xor(sum, 4);
            l[i] = l[i] * corr + sum;
            m[i] = m_new;
            // `u < N` is known when compiled: the chunks past N are not emitted.
            unroll!(u in [0, 1, 2, 3, 4] {
                if u < N {
                    unroll!(x in [0, 1, 2, 3] {
                        acc[i][u][x] *= corr;
                    });
                }
            });
        });

        // acc += P V: key `4 owner + e`'s probabilities come from lane `group + owner`.
        let mut owner = 0u32;
        while owner < 8 {
            unroll!(e in [0, 1, 2, 3] {
                let key = 4 * owner + e as u32;
                let mut pk = [0.0f32; 4];
                unroll!(i in [0, 1, 2, 3] {
                    pk[i] = shfl_idx(p[i][e], group + owner);
                });
                unroll!(u in [0, 1, 2, 3, 4] {
                    let col = 32 * u as u32 + 4 * tk;
                    if u < N && col < d {
                        let vv = unsafe { load4(vs.add((key * d + col) as usize)) };
                        unroll!(i in [0, 1, 2, 3] {
                            unroll!(x in [0, 1, 2, 3] {
                                acc[i][u][x] = pk[i].mul_add(vv[x], acc[i][u][x]);
                            });
                        });
                    }
                });
            });
            owner += 1;
        }
        kb += FLASH_K;
    }

    unroll!(i in [0, 1, 2, 3] {
        let row = q0 + 4 * tq + i as u32;
        if row < lq {
            let inv = 1.0 / l[i];
            let out_row = unsafe { rows.out_row(row) };
            unroll!(u in [0, 1, 2, 3, 4] {
                let col = 32 * u as u32 + 4 * tk;
                if u < N && col < d {
                    unroll!(x in [0, 1, 2, 3] {
                        unsafe { *out_row.add(col as usize + x) = acc[i][u][x] * inv };
                    });
                }
            });
        }
    });
}
