//! LoRA merge in place: `W[out, in] += scale * up[out, rank] * down[rank, in]`.
//!
//! One thread per weight element; the rank is small (4-128), so each thread's dot product
//! is short, `down[r, i]` reads coalesce across a warp and `up[o, r]` is one broadcast
//! address per warp. Accumulation in f32; an f16 or bf16 weight is widened, patched and
//! rounded once.
//!
//! Launch: 1-D grid-stride over `out * in` elements, any grid and block.
//!
//! The unmerged path (`lora_shrink_segments_f32`, `lora_expand_segments_f32`) applies each
//! segment's own adapter to its rows without touching the weight.

use crate::bf16::Bf16;
use crate::elementwise::grid_stride;
use crate::gemm::Widen;
use crate::gpu::{block, block_dim, grid_dim, thread, warp_sum};

#[inline(always)]
fn delta(up: *const f32, down: *const f32, i: u32, inp: u32, rank: u32) -> f32 {
    let o = i / inp;
    let col = i - o * inp;
    let mut acc = 0.0f32;
    let mut r = 0u32;
    while r < rank {
        unsafe {
            acc = (*up.add((o * rank + r) as usize))
                .mul_add(*down.add((r * inp + col) as usize), acc);
        }
        r += 1;
    }
    acc
}

/// A weight's storage type: widened to f32 where read (`Widen`), rounded once where written.
trait Narrow: Widen {
    fn narrow(v: f32) -> Self;
}
impl Narrow for f32 {
    #[inline(always)]
    fn narrow(v: f32) -> f32 {
        v
    }
}
impl Narrow for f16 {
    #[inline(always)]
    fn narrow(v: f32) -> f16 {
        v as f16
    }
}
impl Narrow for Bf16 {
    #[inline(always)]
    fn narrow(v: f32) -> Bf16 {
        Bf16::from_f32(v)
    }
}

/// `lora_patch_{f32,f16,bf16}(w, up, down, n, in, rank, scale)`: `w[i] += scale * delta(i)`
/// over the `n = out * in` weights.
macro_rules! lora_patch_kernel {
    ($name:ident, $t:ty) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "ptx-kernel" fn $name(
            w: *mut $t,
            up: *const f32,
            down: *const f32,
            n: u32,
            inp: u32,
            rank: u32,
            scale: f32,
        ) {
            grid_stride!(n, |i| {
                let d = delta(up, down, i, inp, rank);
                unsafe {
                    let p = w.add(i as usize);
                    *p = <$t>::narrow((*p).widen() + scale * d);
                }
            });
        }
    };
}
lora_patch_kernel!(lora_patch_f32, f32);
lora_patch_kernel!(lora_patch_f16, f16);
lora_patch_kernel!(lora_patch_bf16, Bf16);

/// `seg_of_row` of a row no segment owns.
const NO_SEGMENT: u32 = 0xffff_ffff;

/// The unmerged LoRA path over a ragged batch, first half: for each row `i` of `x = [n, in]`
/// owned by segment `s = seg_of_row[i]`, `tmp[i, r] = x[i] . down_s[r]` for `r < ranks[s]`,
/// with `down_s = [ranks[s], in]` at device address `downs[s]`; `tmp = [n, max_rank]`.
/// One warp per (row, r): the lanes stride over `in` (both reads coalesce), then a warp sum.
///
/// Launch: 1-D grid, blocks of whole warps, any count (the warps stride over the work).
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "ptx-kernel" fn lora_shrink_segments_f32(
    x: *const f32,
    downs: *const u64,
    ranks: *const u32,
    seg_of_row: *const u32,
    tmp: *mut f32,
    n: u32,
    inp: u32,
    max_rank: u32,
) {
    let lane = thread() & 31;
    let warps = grid_dim() * block_dim() / 32;
    let mut w = (block() * block_dim() + thread()) / 32;
    while w < n * max_rank {
        let (i, r) = (w / max_rank, w % max_rank);
        // Uniform across the warp: every lane has the same `w`.
        let s = unsafe { *seg_of_row.add(i as usize) };
        if s != NO_SEGMENT && r < unsafe { *ranks.add(s as usize) } {
            let down = unsafe { (*downs.add(s as usize) as *const f32).add((r * inp) as usize) };
            let row = unsafe { x.add((i * inp) as usize) };
            let mut acc = 0.0f32;
            let mut c = lane;
            while c < inp {
                acc = unsafe { (*row.add(c as usize)).mul_add(*down.add(c as usize), acc) };
                c += 32;
            }
            acc = warp_sum(acc);
            if lane == 0 {
                unsafe { *tmp.add((i * max_rank + r) as usize) = acc };
            }
        }
        w += warps;
    }
}

/// The second half: `y[i, o] += scales[s] * tmp[i, ..ranks[s]] . up_s[o]` for each row `i`
/// owned by segment `s`, with `up_s = [out, ranks[s]]` at `ups[s]`; rows no segment owns
/// keep their value. One thread per element of `y = [n, out]`.
///
/// Launch: 1-D grid-stride over `n * out` elements, any grid and block.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "ptx-kernel" fn lora_expand_segments_f32(
    tmp: *const f32,
    ups: *const u64,
    ranks: *const u32,
    scales: *const f32,
    seg_of_row: *const u32,
    y: *mut f32,
    n: u32,
    out: u32,
    max_rank: u32,
) {
    grid_stride!(n * out, |e| {
        let (i, o) = (e / out, e % out);
        let s = unsafe { *seg_of_row.add(i as usize) };
        if s != NO_SEGMENT {
            let rank = unsafe { *ranks.add(s as usize) };
            let up = unsafe { (*ups.add(s as usize) as *const f32).add((o * rank) as usize) };
            let row = unsafe { tmp.add((i * max_rank) as usize) };
            let mut acc = 0.0f32;
            let mut r = 0u32;
            while r < rank {
                acc = unsafe { (*row.add(r as usize)).mul_add(*up.add(r as usize), acc) };
                r += 1;
            }
            unsafe { *y.add(e as usize) += *scales.add(s as usize) * acc };
        }
    });
}
