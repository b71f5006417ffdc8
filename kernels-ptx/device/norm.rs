//! Layer norm over rows, and group norm (optionally + SiLU) over channels-last maps.

use crate::elementwise::grid_stride;
use crate::gpu::{block, block_dim, block_sum, block_y, grid_dim, shared_f32, thread};
use crate::gemm::Widen;
use crate::math::silu;

/// Layer norm of one row per block, two-pass (mean, then centred variance) like the CPU.
///
/// Launch: grid `rows`, block a multiple of 32 up to 1024, 128 bytes of dynamic shared memory.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn layer_norm_rows_f32(
    x: *const f32,
    gamma: *const f32,
    beta: *const f32,
    out: *mut f32,
    cols: u32,
    eps: f32,
) {
    let scratch = shared_f32();
    let base = block() as usize * cols as usize;
    let (x, out) = unsafe { (x.add(base), out.add(base)) };
    let mut s = 0.0f32;
    let mut c = thread();
    while c < cols {
        s += unsafe { *x.add(c as usize) };
        c += block_dim();
    }
    let mean = block_sum(s, scratch) / cols as f32;
    let mut v = 0.0f32;
    c = thread();
    while c < cols {
        let d = unsafe { *x.add(c as usize) } - mean;
        v += d * d;
        c += block_dim();
    }
    let rstd = 1.0 / (block_sum(v, scratch) / cols as f32 + eps).sqrt();
    c = thread();
    while c < cols {
        let i = c as usize;
        unsafe { *out.add(i) = (*x.add(i) - mean) * rstd * *gamma.add(i) + *beta.add(i) };
        c += block_dim();
    }
}

/// Sum over the elements of group `g` of one sample `[hw, c]` this thread owns, of
/// `f(x)`. Element `k` of the group is row `k / cpg`, channel `g * cpg + k % cpg`.
#[inline(always)]
fn group_sum(x: *const f32, hw: u32, c: u32, g: u32, cpg: u32, center: f32, square: bool) -> f32 {
    let total = hw * cpg;
    let mut acc = 0.0f32;
    let mut k = thread();
    while k < total {
        let row = k / cpg;
        let ch = g * cpg + (k - row * cpg);
        let d = unsafe { *x.add(row as usize * c as usize + ch as usize) } - center;
        acc += if square { d * d } else { d };
        k += block_dim();
    }
    acc
}

/// Group-norm statistics of `x = [batch, hw, c]`: `stats[2 * (b * groups + g)]` is the mean,
/// `+ 1` the reciprocal standard deviation (two-pass, like the CPU).
///
/// Launch: grid `(groups, batch)`, block a multiple of 32 up to 1024, 128 bytes of dynamic
/// shared memory.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn group_norm_stats_f32(
    x: *const f32,
    stats: *mut f32,
    hw: u32,
    c: u32,
    groups: u32,
    eps: f32,
) {
    let scratch = shared_f32();
    let (g, b) = (block(), block_y());
    let cpg = c / groups;
    let x = unsafe { x.add(b as usize * hw as usize * c as usize) };
    let count = (hw * cpg) as f32;
    let mean = block_sum(group_sum(x, hw, c, g, cpg, 0.0, false), scratch) / count;
    let var = block_sum(group_sum(x, hw, c, g, cpg, mean, true), scratch) / count;
    if thread() == 0 {
        let at = 2 * (b * groups + g) as usize;
        unsafe {
            *stats.add(at) = mean;
            *stats.add(at + 1) = 1.0 / (var + eps).sqrt();
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn group_norm_apply(
    x: *const f32,
    stats: *const f32,
    gamma: *const f32,
    beta: *const f32,
    out: *mut f32,
    n: u32,
    hw: u32,
    c: u32,
    groups: u32,
    sample_of_row: *const u32,
    with_silu: bool,
) {
    let cpg = c / groups;
    let per_sample = hw * c;
    let by_row = sample_of_row as usize != 0;
    grid_stride!(n, |i| {
        let b = if by_row {
            unsafe { *sample_of_row.add((i / c) as usize) }
        } else {
            i / per_sample
        };
        let ch = i % c;
        let at = 2 * (b * groups + ch / cpg) as usize;
        unsafe {
            let (mean, rstd) = (*stats.add(at), *stats.add(at + 1));
            let scale = rstd * *gamma.add(ch as usize);
            let shift = *beta.add(ch as usize) - mean * scale;
            let y = *x.add(i as usize) * scale + shift;
            *out.add(i as usize) = if with_silu { silu(y) } else { y };
        }
    });
}

/// `out = (x - mean) * rstd * gamma + beta` with statistics from `group_norm_stats_f32` (or
/// the template's, in masked execution), over `n = batch * hw * c` elements: sample `b`'s
/// statistics are `stats[b]`, `[groups, 2]`. With `sample_of_row` not null, row `r` of
/// `x = [rows, c]` takes sample `sample_of_row[r]`'s (a ragged batch's rows, each with its
/// segment's statistics) and `hw` is not read.
///
/// Launch: 1-D grid-stride, any grid and block, no shared memory.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "ptx-kernel" fn group_norm_apply_f32(
    x: *const f32,
    stats: *const f32,
    gamma: *const f32,
    beta: *const f32,
    out: *mut f32,
    n: u32,
    hw: u32,
    c: u32,
    groups: u32,
    sample_of_row: *const u32,
) {
    group_norm_apply(x, stats, gamma, beta, out, n, hw, c, groups, sample_of_row, false);
}

/// `group_norm_apply_f32` followed by SiLU, fused (the resnet blocks' GN + SiLU).
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "ptx-kernel" fn group_norm_silu_apply_f32(
    x: *const f32,
    stats: *const f32,
    gamma: *const f32,
    beta: *const f32,
    out: *mut f32,
    n: u32,
    hw: u32,
    c: u32,
    groups: u32,
    sample_of_row: *const u32,
) {
    group_norm_apply(x, stats, gamma, beta, out, n, hw, c, groups, sample_of_row, true);
}

/// Group-norm statistics of the maps a ragged masked batch computes on (the CPU's
/// `blended_group_stats`, one segment per block row): segment `s` owns rows `offsets[s]..
/// offsets[s + 1]` of `x = [rows, c]`, row `r` holds position `positions[r]` of its map of
/// `hw` positions, `template[2 (s groups + g)]` is (mean, rstd) of its template's map and
/// `moments[s]` the device address of that map's per-position moments `[hw, groups, 2]` (f16,
/// in units of those statistics). The map is the fresh rows at their positions and the
/// template elsewhere; the template's moments over the whole map follow from its statistics,
/// so only the active rows are read. Writes (mean, rstd) to `stats[2 (s groups + g)]`.
///
/// Launch: grid `(groups, segments)`, block a multiple of 32 up to 1024, 128 bytes of dynamic
/// shared memory.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "ptx-kernel" fn group_norm_blended_stats_f16(
    x: *const f32,
    offsets: *const u32,
    positions: *const u32,
    template: *const f32,
    moments: *const u64,
    stats: *mut f32,
    c: u32,
    groups: u32,
    hw: u32,
    eps: f32,
) {
    let scratch = shared_f32();
    let (g, s) = (block(), block_y());
    let cpg = c / groups;
    let at = 2 * (s * groups + g) as usize;
    let (mean_t, rstd_t) = unsafe { (*template.add(at), *template.add(at + 1)) };
    let (first, end) = unsafe { (*offsets.add(s as usize), *offsets.add(s as usize + 1)) };
    let moments = unsafe { *moments.add(s as usize) } as *const f16;
    // Fresh rows' z and z^2, minus the template's at the same positions.
    let (mut sum, mut squares) = (0.0f32, 0.0f32);
    let total = (end - first) * cpg;
    let mut k = thread();
    while k < total {
        let row = first + k / cpg;
        let ch = g * cpg + k % cpg;
        let z = (unsafe { *x.add(row as usize * c as usize + ch as usize) } - mean_t) * rstd_t;
        sum += z;
        squares += z * z;
        k += block_dim();
    }
    let mut row = first + thread();
    while row < end {
        let p = unsafe { *positions.add(row as usize) } as usize;
        let m = unsafe { moments.add((p * groups as usize + g as usize) * 2) };
        unsafe {
            sum -= (*m).widen();
            squares -= (*m.add(1)).widen();
        }
        row += block_dim();
    }
    let sum = block_sum(sum, scratch);
    let squares = block_sum(squares, scratch);
    if thread() == 0 {
        let count = (hw * cpg) as f32;
        let rstd2 = rstd_t * rstd_t;
        // The template's own sum of z^2 over its map: var * rstd^2 per value.
        let mut template_squares = count * (1.0 - eps * rstd2);
        if template_squares < 0.0 {
            template_squares = 0.0;
        }
        let mean_z = sum / count;
        let mut var_z = (template_squares + squares) / count - mean_z * mean_z;
        if var_z < 0.0 {
            var_z = 0.0;
        }
        unsafe {
            *stats.add(at) = mean_t + mean_z / rstd_t;
            *stats.add(at + 1) = 1.0 / (var_z / rstd2 + eps).sqrt();
        }
    }
}
