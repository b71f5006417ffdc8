//! LoRA merge in place: `W[out, in] += scale * up[out, rank] * down[rank, in]`.
//!
//! One thread per weight element; the rank is small (4-128), so each thread's dot product
//! is short, `down[r, i]` reads coalesce across a warp and `up[o, r]` is one broadcast
//! address per warp. Accumulation in f32; an f16 weight is widened, patched and rounded once.
//!
//! Launch: 1-D grid-stride over `out * in` elements, any grid and block.

use crate::elementwise::grid_stride;
use crate::gpu::{block, block_dim, grid_dim, thread};

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

#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn lora_patch_f32(
    w: *mut f32,
    up: *const f32,
    down: *const f32,
    n: u32,
    inp: u32,
    rank: u32,
    scale: f32,
) {
    grid_stride!(n, |i| {
        let d = delta(up, down, i, inp, rank);
        unsafe { *w.add(i as usize) += scale * d };
    });
}

#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn lora_patch_f16(
    w: *mut f16,
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
            *p = (*p as f32 + scale * d) as f16;
        }
    });
}
