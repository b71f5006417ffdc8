//! Flash attention on tensor cores: f16 (or bf16) `mma.sync.m16n8k16` products, f32
//! accumulation and softmax. The tensors stay f32 (as the rest of the device UNet); queries, keys, values and
//! probabilities are rounded to f16 as they enter the tensor cores, as FlashAttention does
//! with f16 models: about 3 decimal digits per product.
//!
//! A block of 4 warps takes 64 query rows of one sequence and head; warp `w` owns rows
//! `16 w ..16 w + 16` and keeps them in registers as A fragments for the whole launch. Each
//! round stages 64 keys (row-major, f16) and their values (transposed, f16) in shared
//! memory; a warp computes its 16 x 64 scores as 8 fragments, applies the online softmax
//! in registers, and multiplies the probabilities (the score fragments re-packed as A
//! fragments: no shuffles, no shared round trip) by the values into a 16 x d accumulator.
//!
//! Head widths are compile-time (`ND = d / 8` output fragments, `KD = ceil(d / 16)` k-steps,
//! the query and key tiles zero-padded to `16 KD` columns), one entry per width SD uses:
//! 40, 64, 80 and 160.
//!
//! Fragment layouts (PTX ISA, `mma.m16n8k16`, f16 A/B, f32 C): `g = lane / 4`,
//! `q = lane % 4`; each A register packs two consecutive columns: `a0 = (g, 2q..)`,
//! `a1 = (g + 8, 2q..)`, `a2 = (g, 2q + 8..)`, `a3 = (g + 8, 2q + 8..)`; B registers pack two
//! consecutive k: `b0 = (k 2q.., n g)`, `b1 = (k 2q + 8.., n g)`; C: `c0, c1 = (g, 2q..)`,
//! `c2, c3 = (g + 8, 2q..)`. The lower half of a register is the lower index.
//!
//! Launch: block 128, dynamic shared memory `2 * (64 * (16 KD + 8) + 8 ND * 72)` bytes (the
//! query/key tile and the transposed value tile, f16); grids as
//! [`crate::attention::attention_flash_f32`] and [`crate::attention::attention_masked_flash_f32`].

use crate::attention::{DenseHead, FlashSource, flash_entries, keys_seen, unroll};
use crate::bf16::Bf16;
use crate::gemm::F4;
use crate::gpu::{LOG2E, NEG_INF, block_dim, exp2_fast, shfl_xor, sync_threads, thread};
use crate::intrinsics::{mma_m16n8k16_bf16, mma_m16n8k16_f16, pack_bf16x2, pack_f16x2};
use crate::prelude::*;

/// Query rows per block (16 per warp).
const ROWS: u32 = 64;
/// Keys per shared tile.
const KEYS: u32 = 64;
/// Row stride (halves) of the transposed value tile: 36 words, so the 8 rows a B fragment
/// load touches start 4 banks apart.
const VT_LD: u32 = KEYS + 8;

/// Row stride (halves) of the query and key tiles: the padded width plus 8, which puts the
/// 8 rows of a fragment load on distinct banks for every `KD`.
const fn tile_ld(kd: usize) -> u32 {
    16 * kd as u32 + 8
}

/// The 16-bit type the tensor cores read (f16, or bf16 for activations beyond f16's range):
/// how one value is stored in the shared tiles, how two are packed into an A register, and
/// the `mma.sync.m16n8k16` (f32 accumulation, the whole warp) that reads them.
trait Half16 {
    fn store(x: f32) -> u16;
    /// `lo` and `hi` rounded and packed, `lo` in the lower half.
    fn pack(lo: f32, hi: f32) -> u32;
    /// `d += a * b` for one 16 x 8 x 16 fragment.
    fn mma(d: &mut [f32; 4], a: [u32; 4], b: [u32; 2]);
}

macro_rules! half16 {
    ($name:ident, |$x:ident| $store:expr, $pack:ident, $mma:ident) => {
        struct $name;
        impl Half16 for $name {
            #[inline(always)]
            fn store($x: f32) -> u16 {
                $store
            }
            #[inline(always)]
            fn pack(lo: f32, hi: f32) -> u32 {
                $pack(lo, hi)
            }
            #[inline(always)]
            fn mma(d: &mut [f32; 4], a: [u32; 4], b: [u32; 2]) {
                $mma(d, a, b)
            }
        }
    };
}

#[allow(unnecessary_transmutes)] // `f16::to_bits` is `core`'s, absent here.
fn f16_bits(x: f32) -> u16 {
    unsafe { transmute::<f16, u16>(x as f16) }
}
half16!(F16, |x| f16_bits(x), pack_f16x2, mma_m16n8k16_f16);
half16!(BF16, |x| Bf16::from_f32(x).0, pack_bf16x2, mma_m16n8k16_bf16);

/// The two halves at `tile[at], tile[at + 1]` as one register (`at` even).
#[inline(always)]
unsafe fn pair(tile: *const u16, at: u32) -> u32 {
    unsafe { *(tile.add(at as usize) as *const u32) }
}

/// Query rows `q0..q0 + 64` of one sequence and head against all its keys (or, when
/// `causal`, those up to each row), for head width `d = 8 ND`, `KD = ceil(d / 16)`.
#[inline(always)]
unsafe fn flash_mma_block<S: FlashSource, H: Half16, const ND: usize, const KD: usize>(
    src: &S,
    q0: u32,
    scale: f32,
    causal: u32,
) {
    let d = 8 * ND as u32;
    let width = 16 * KD as u32;
    let ld = tile_ld(KD);
    let tid = thread();
    let warp = tid >> 5;
    let (g, q) = ((tid & 31) >> 2, tid & 3);
    let rows: &DenseHead = src.head();
    let (lq, lk) = (rows.lq, rows.lk);
    let tile = crate::prelude::gpu_launch_sized_workgroup_mem::<F4>() as *mut u16;
    let vt = unsafe { tile.add((KEYS * ld) as usize) };

    // The query tile (scaled into base 2, where the scores are kept; padded with zeros) goes through the key tile's
    // space once, into each warp's A fragments.
    let qscale = scale * LOG2E;
    let mut e = tid;
    while e < ROWS * width {
        let (r, t) = (e / width, e % width);
        let row = q0 + r;
        let x = if row < lq && t < d {
            unsafe { rows.query(row, t) * qscale }
        } else {
            0.0
        };
        unsafe { *tile.add((r * ld + t) as usize) = H::store(x) };
        e += block_dim();
    }
    sync_threads();
    let r0 = 16 * warp + g;
    let mut qf = [[0u32; 4]; KD];
    unroll!(kk in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] {
        if kk < KD {
            let c = 16 * kk as u32 + 2 * q;
            unsafe {
                qf[kk] = [
                    pair(tile, r0 * ld + c),
                    pair(tile, (r0 + 8) * ld + c),
                    pair(tile, r0 * ld + c + 8),
                    pair(tile, (r0 + 8) * ld + c + 8),
                ];
            }
        }
    });

    let rows_end = if q0 + ROWS < lq { q0 + ROWS } else { lq };
    let k_end = keys_seen(rows_end - 1, lk, causal);
    // This thread's two rows: `g` (C elements 0, 1) and `g + 8` (elements 2, 3).
    let row_of = [q0 + r0, q0 + r0 + 8];
    let mut m = [NEG_INF; 2];
    // Partial sums over this thread's columns; the 4 lanes of a row add theirs at the end.
    let mut l = [0.0f32; 2];
    let mut o = [[0.0f32; 4]; ND];
    let mut kb = 0u32;
    while kb < k_end {
        // Every warp is done with the previous tiles (or the query tile).
        sync_threads();
        let mut e = tid;
        while e < KEYS * width {
            let (r, t) = (e / width, e % width);
            let key = kb + r;
            let (kv, vv) = if key < lk && t < d {
                unsafe { src.key_value(key, t) }
            } else {
                (0.0, 0.0)
            };
            unsafe {
                *tile.add((r * ld + t) as usize) = H::store(kv);
                if t < d {
                    *vt.add((t * VT_LD + r) as usize) = H::store(vv);
                }
            }
            e += block_dim();
        }
        sync_threads();

        // Scores: fragment `j` holds keys `kb + 8 j ..`.
        let mut s = [[0.0f32; 4]; 8];
        unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7] {
            let at = (8 * j as u32 + g) * ld + 2 * q;
            unroll!(kk in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] {
                if kk < KD {
                    let k0 = at + 16 * kk as u32;
                    let b = unsafe { [pair(tile, k0), pair(tile, k0 + 8)] };
                    H::mma(&mut s[j], qf[kk], b);
                }
            });
        });

        // Mask, then the online softmax of rows `g` and `g + 8`.
        let mut mx = [NEG_INF; 2];
        unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7] {
            unroll!(x in [0, 1, 2, 3] {
                let key = kb + 8 * j as u32 + 2 * q + (x as u32 & 1);
                if key >= lk || (causal != 0 && key > row_of[x / 2]) {
                    s[j][x] = NEG_INF;
                }
                mx[x / 2] = mx[x / 2].max(s[j][x]);
            });
        });
        let mut corr = [0.0f32; 2];
        unroll!(h in [0, 1] {
            mx[h] = mx[h].max(shfl_xor(mx[h], 1));
            mx[h] = mx[h].max(shfl_xor(mx[h], 2));
            // Every row sees key 0 in the first tile, so the max is finite from then on.
            let m_new = m[h].max(mx[h]);
            corr[h] = exp2_fast(m[h] - m_new);
            m[h] = m_new;
            l[h] *= corr[h];
        });
        unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7] {
            unroll!(x in [0, 1, 2, 3] {
                s[j][x] = exp2_fast(s[j][x] - m[x / 2]);
                l[x / 2] += s[j][x];
            });
        });
        unroll!(n in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19] {
            if n < ND {
                o[n][0] *= corr[0];
                o[n][1] *= corr[0];
                o[n][2] *= corr[1];
                o[n][3] *= corr[1];
            }
        });

        // O += P V over the tile's 4 k-steps of 16 keys.
        unroll!(kk in [0, 1, 2, 3] {
            let (lo, hi) = (s[2 * kk], s[2 * kk + 1]);
            let a = [
                H::pack(lo[0], lo[1]),
                H::pack(lo[2], lo[3]),
                H::pack(hi[0], hi[1]),
                H::pack(hi[2], hi[3]),
            ];
            let at = g * VT_LD + 16 * kk as u32 + 2 * q;
            unroll!(n in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19] {
                if n < ND {
                    let v0 = at + 8 * n as u32 * VT_LD;
                    let b = unsafe { [pair(vt, v0), pair(vt, v0 + 8)] };
                    H::mma(&mut o[n], a, b);
                }
            });
        });
        kb += KEYS;
    }

    unroll!(h in [0, 1] {
        l[h] += shfl_xor(l[h], 1);
        l[h] += shfl_xor(l[h], 2);
        let row = row_of[h];
        if row < lq {
            let inv = 1.0 / l[h];
            let out = unsafe { rows.out_row(row).add(2 * q as usize) };
            unroll!(n in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19] {
                if n < ND {
                    unsafe {
                        *out.add(8 * n) = o[n][2 * h] * inv;
                        *out.add(8 * n + 1) = o[n][2 * h + 1] * inv;
                    }
                }
            });
        }
    });
}

/// One dense and one masked entry per head width and 16-bit type:
/// `attention_flash_mma_{f16,bf16}_d{W}` takes [`crate::attention::attention_flash_f32`]'s
/// arguments (`d` must be `W`), `attention_masked_flash_mma_{f16,bf16}_d{W}` those of
/// [`crate::attention::attention_masked_flash_f32`].
macro_rules! flash_mma_entries {
    ($($dense:ident, $masked:ident, $half:ty, $nd:literal, $kd:literal;)*) => {$(
        flash_entries! {
            $dense,
            $masked,
            |source, q0, d, scale, causal| {
                flash_mma_block::<_, $half, $nd, $kd>(&source, q0, scale, causal)
            }
        }
    )*};
}

flash_mma_entries! {
    attention_flash_mma_f16_d40, attention_masked_flash_mma_f16_d40, F16, 5, 3;
    attention_flash_mma_f16_d64, attention_masked_flash_mma_f16_d64, F16, 8, 4;
    attention_flash_mma_f16_d80, attention_masked_flash_mma_f16_d80, F16, 10, 5;
    attention_flash_mma_f16_d160, attention_masked_flash_mma_f16_d160, F16, 20, 10;
    attention_flash_mma_bf16_d40, attention_masked_flash_mma_bf16_d40, BF16, 5, 3;
    attention_flash_mma_bf16_d64, attention_masked_flash_mma_bf16_d64, BF16, 8, 4;
    attention_flash_mma_bf16_d80, attention_masked_flash_mma_bf16_d80, BF16, 10, 5;
    attention_flash_mma_bf16_d160, attention_masked_flash_mma_bf16_d160, BF16, 20, 10;
}
