//! Elementwise kernels: binary ops with a broadcast trailing row, activations, affine.
//!
//! Launch: 1-D grid of any size, any block size; each thread walks a grid-stride loop over
//! the `n` outputs, so the host may cap the grid.

use crate::gpu::{block, block_dim, grid_dim, thread};
use crate::math;

/// `i = first, first + stride, ... < n` for this thread.
macro_rules! grid_stride {
    ($n:expr, |$i:ident| $body:block) => {{
        let stride = block_dim() * grid_dim();
        let mut $i = block() * block_dim() + thread();
        while $i < $n {
            $body
            $i += stride;
        }
    }};
}
pub(crate) use grid_stride;

/// `out[i] = a[i] op b[i % b_len]`: `b_len == n` for equal shapes, or the length of the
/// trailing row `b` repeats over (a bias added to every row).
macro_rules! binary_kernel {
    ($name:ident, $op:tt) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "ptx-kernel" fn $name(
            a: *const f32,
            b: *const f32,
            out: *mut f32,
            n: u32,
            b_len: u32,
        ) {
            grid_stride!(n, |i| {
                let j = if b_len == n { i } else { i % b_len };
                unsafe {
                    *out.add(i as usize) = *a.add(i as usize) $op *b.add(j as usize);
                }
            });
        }
    };
}
binary_kernel!(binary_add_f32, +);
binary_kernel!(binary_sub_f32, -);
binary_kernel!(binary_mul_f32, *);
binary_kernel!(binary_div_f32, /);

macro_rules! unary_kernel {
    ($name:ident, $f:path) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "ptx-kernel" fn $name(x: *const f32, out: *mut f32, n: u32) {
            grid_stride!(n, |i| {
                unsafe { *out.add(i as usize) = $f(*x.add(i as usize)) };
            });
        }
    };
}

#[inline(always)]
fn relu(x: f32) -> f32 {
    x.max(0.0)
}

unary_kernel!(relu_f32, relu);
unary_kernel!(silu_f32, math::silu);
unary_kernel!(gelu_erf_f32, math::gelu);
unary_kernel!(gelu_tanh_f32, math::gelu_tanh);
unary_kernel!(quick_gelu_f32, math::quick_gelu);

/// `out[i] = x[i] * scale + shift`.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn affine_f32(
    x: *const f32,
    out: *mut f32,
    n: u32,
    scale: f32,
    shift: f32,
) {
    grid_stride!(n, |i| {
        unsafe { *out.add(i as usize) = *x.add(i as usize) * scale + shift };
    });
}

/// GEGLU over rows of `2 * half`: `out[r, j] = x[r, j] * gelu(x[r, half + j])`.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn geglu_f32(x: *const f32, out: *mut f32, n: u32, half: u32) {
    grid_stride!(n, |i| {
        let r = i / half;
        let j = i - r * half;
        let base = (r * 2 * half + j) as usize;
        unsafe {
            *out.add(i as usize) = *x.add(base) * math::gelu(*x.add(base + half as usize));
        }
    });
}

/// f16 -> f32 (exact).
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn convert_f16_to_f32(x: *const f16, out: *mut f32, n: u32) {
    grid_stride!(n, |i| {
        unsafe { *out.add(i as usize) = *x.add(i as usize) as f32 };
    });
}

/// f32 -> f16, round to nearest even (as `half::f16::from_f32` on the CPU).
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn convert_f32_to_f16(x: *const f32, out: *mut f16, n: u32) {
    grid_stride!(n, |i| {
        unsafe { *out.add(i as usize) = *x.add(i as usize) as f16 };
    });
}

/// `out[c, r] = x[r, c]` rounded to f16 (nearest even), for `x = [rows, cols]`: a conv's
/// packed weight `[k, cout]` as the `[cout, k]` f16 operand of the tensor-core kernels.
/// Grid-stride over the output (its writes coalesced; a one-time pass per weight).
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn transpose_f32_to_f16(
    x: *const f32,
    out: *mut f16,
    rows: u32,
    cols: u32,
) {
    grid_stride!(rows * cols, |i| {
        let c = i / rows;
        let r = i - c * rows;
        unsafe { *out.add(i as usize) = *x.add(r as usize * cols as usize + c as usize) as f16 };
    });
}
