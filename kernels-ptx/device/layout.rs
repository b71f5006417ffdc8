//! Layout kernels of the UNet forward: concatenation along channels (the skip connections),
//! nearest-neighbour 2x upsampling, and a per-sample channel vector added to every position
//! (the ResNet blocks' time embedding). Channels-last maps, `[batch, ..., c]`.
//!
//! Launch: 1-D grid-stride over the outputs each kernel writes, any grid and block. The host
//! checks every element count below 2^31, so no index below wraps in u32.

use crate::elementwise::grid_stride;
use crate::gpu::{block, block_dim, grid_dim, thread};

/// `dst[r, col_offset + c] = src[r, c]` for a `[rows, src_cols]` source and a
/// `[rows, dst_cols]` destination (`col_offset + src_cols <= dst_cols`): one part of a
/// concatenation along the last dimension, launched once per part.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn copy_cols_f32(
    src: *const f32,
    dst: *mut f32,
    rows: u32,
    src_cols: u32,
    dst_cols: u32,
    col_offset: u32,
) {
    grid_stride!(rows * src_cols, |i| {
        let r = i / src_cols;
        let c = i - r * src_cols;
        unsafe {
            let to = r as usize * dst_cols as usize + col_offset as usize + c as usize;
            *dst.add(to) = *src.add(i as usize);
        }
    });
}

/// `dst[b, y, x, ch] = src[b, y / 2, x / 2, ch]` for `src = [batch, h, w, c]` and
/// `dst = [batch, 2h, 2w, c]`: grid-stride over the output.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn upsample_nearest2x_f32(
    src: *const f32,
    dst: *mut f32,
    batch: u32,
    h: u32,
    w: u32,
    c: u32,
) {
    let (oh, ow) = (2 * h, 2 * w);
    grid_stride!(batch * oh * ow * c, |i| {
        let p = i / c;
        let ch = i - p * c;
        let q = p / ow;
        let ox = p - q * ow;
        let b = q / oh;
        let oy = q - b * oh;
        let from = ((b * h + oy / 2) * w + ox / 2) * c + ch;
        unsafe { *dst.add(i as usize) = *src.add(from as usize) };
    });
}

/// `out[i] = x[i] + v[s, i % c]` with `s = i / per_sample`: `x = [samples, ..., c]` holding
/// `per_sample` values per sample (a multiple of `c`), `v = [samples, c]` broadcast over each
/// sample's positions. With `sample_of_row` not null, row `r` of `x = [rows, c]` takes
/// sample `sample_of_row[r]` (a ragged batch's rows, each with its segment's vector) and
/// `per_sample` is not read.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn add_per_sample_f32(
    x: *const f32,
    v: *const f32,
    out: *mut f32,
    n: u32,
    per_sample: u32,
    c: u32,
    sample_of_row: *const u32,
) {
    let by_row = sample_of_row as usize != 0;
    grid_stride!(n, |i| {
        let s = if by_row {
            unsafe { *sample_of_row.add((i / c) as usize) }
        } else {
            i / per_sample
        };
        let j = s * c + i % c;
        unsafe { *out.add(i as usize) = *x.add(i as usize) + *v.add(j as usize) };
    });
}

/// The geometry of a channels-last convolution's patch matrix: row
/// `r = (b * out_h + oy) * out_w + ox`, column `k = (ky * kw + kx) * cin + ci`.
struct Patches {
    h: u32,
    w: u32,
    cin: u32,
    kw: u32,
    stride: u32,
    pad: u32,
    out_h: u32,
    out_w: u32,
    k_len: u32,
}

impl Patches {
    /// Element `i` of the row-major patch matrix: `x[b, oy * stride - pad + ky,
    /// ox * stride - pad + kx, ci]` for `x = [batch, h, w, cin]`, 0 outside the map.
    #[inline(always)]
    unsafe fn value(&self, x: *const f32, i: u32) -> f32 {
        let r = i / self.k_len;
        let k = i - r * self.k_len;
        let ci = k % self.cin;
        let tap = k / self.cin;
        let (ky, kx) = (tap / self.kw, tap % self.kw);
        let b = r / (self.out_h * self.out_w);
        let p = r - b * self.out_h * self.out_w;
        let (oy, ox) = (p / self.out_w, p % self.out_w);
        // Unsigned, built without overflow checks (tools/ptx-build): a position left of or
        // above the map wraps past `h` / `w`.
        let y = oy * self.stride + ky - self.pad;
        let xx = ox * self.stride + kx - self.pad;
        if y < self.h && xx < self.w {
            let at = ((b as usize * self.h as usize + y as usize) * self.w as usize
                + xx as usize)
                * self.cin as usize
                + ci as usize;
            unsafe { *x.add(at) }
        } else {
            0.0
        }
    }
}

/// An im2col kernel writing [`Patches::value`] as `$t` (one signature for both types).
macro_rules! im2col_kernel {
    ($(#[$doc:meta])* $name:ident, $t:ty) => {
        $(#[$doc])*
        #[unsafe(no_mangle)]
        #[allow(clippy::too_many_arguments)]
        pub unsafe extern "ptx-kernel" fn $name(
            x: *const f32,
            cols: *mut $t,
            rows: u32,
            h: u32,
            w: u32,
            cin: u32,
            kh: u32,
            kw: u32,
            stride: u32,
            pad: u32,
            out_h: u32,
            out_w: u32,
        ) {
            let g = Patches { h, w, cin, kw, stride, pad, out_h, out_w, k_len: kh * kw * cin };
            grid_stride!(rows * g.k_len, |i| {
                unsafe { *cols.add(i as usize) = g.value(x, i) as $t };
            });
        }
    };
}

im2col_kernel!(
    /// The patches of a channels-last convolution as rows, for a GEMM against the packed
    /// weight `[kh * kw * cin, cout]`: `cols[r, k]` is [`Patches::value`]. Consecutive threads
    /// take consecutive channels: reads and writes coalesce.
    im2col_f32,
    f32
);
im2col_kernel!(
    /// [`im2col_f32`] writing the patches rounded to f16 (nearest even), for a GEMM on f16
    /// tensor cores: one pass instead of an f32 patch matrix and its conversion.
    im2col_f16,
    f16
);
