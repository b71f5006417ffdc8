//! Register-blocked micro-kernels for attention's small products (head dims of 40 to 160
//! are too thin for a general GEMM's packing to pay off).
//!
//! Tiles are contiguous and zero-padded by the caller: rows to a multiple of [`ROWS`],
//! score columns to a multiple of [`LANES`], head dims to a multiple of 8. The public entry
//! points check every size once; the inner loops then use unchecked pointer reads so that
//! nothing but loads, broadcasts and FMAs runs there. Each kernel has an AVX2+FMA build picked
//! at run time; the portable build computes the same sums unfused.

/// Query rows are padded to a multiple of this.
pub const ROWS: usize = 8;
/// Score columns (keys) per register block; score tiles are padded to a multiple of this.
pub const LANES: usize = 16;

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// `s[rows x cols] = q[rows x dp] * K^T[dp x cols]` in blocks of 4 rows x 16 columns, the
/// transposed keys in panels of 16 columns (see [`panel_index`]).
///
/// # Safety
/// `q` holds `rows * dp`, `panels` holds `cols * dp`, `s` holds `rows * cols` values;
/// `rows % 4 == 0`, `cols % 16 == 0`.
#[inline(always)]
unsafe fn scores_impl<const FMA: bool>(
    q: *const f32,
    panels: *const f32,
    s: *mut f32,
    rows: usize,
    dp: usize,
    cols: usize,
) {
    const R: usize = 4;
    for i0 in (0..rows).step_by(R) {
        let q_rows: [*const f32; R] = std::array::from_fn(|r| unsafe { q.add((i0 + r) * dp) });
        for j0 in (0..cols).step_by(LANES) {
            let mut acc = [[0.0f32; LANES]; R];
            let mut k_ptr = unsafe { panels.add(j0 * dp) };
            for d in 0..dp {
                let k: [f32; LANES] = unsafe { std::ptr::read_unaligned(k_ptr.cast()) };
                for r in 0..R {
                    let qv = unsafe { *q_rows[r].add(d) };
                    for l in 0..LANES {
                        acc[r][l] = madd::<FMA>(qv, k[l], acc[r][l]);
                    }
                }
                k_ptr = unsafe { k_ptr.add(LANES) };
            }
            for (r, acc_r) in acc.iter().enumerate() {
                unsafe { std::ptr::write_unaligned(s.add((i0 + r) * cols + j0).cast(), *acc_r) };
            }
        }
    }
}

/// `acc[i0..i0 + R, d0..d0 + W] += p[i0..i0 + R, ..cols] * v[..cols, d0..d0 + W]`.
///
/// # Safety
/// As [`weighted_sum`] checks: the tiles hold the rows and columns addressed.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn accumulate_block<const FMA: bool, const R: usize, const W: usize>(
    p: *const f32,
    v: *const f32,
    acc: *mut f32,
    i0: usize,
    d0: usize,
    dp: usize,
    cols: usize,
) {
    let mut a: [[f32; W]; R] = std::array::from_fn(|r| unsafe {
        std::ptr::read_unaligned(acc.add((i0 + r) * dp + d0).cast())
    });
    let p_rows: [*const f32; R] = std::array::from_fn(|r| unsafe { p.add((i0 + r) * cols) });
    let mut v_ptr = unsafe { v.add(d0) };
    for j in 0..cols {
        let vv: [f32; W] = unsafe { std::ptr::read_unaligned(v_ptr.cast()) };
        for r in 0..R {
            let pv = unsafe { *p_rows[r].add(j) };
            for l in 0..W {
                a[r][l] = madd::<FMA>(pv, vv[l], a[r][l]);
            }
        }
        v_ptr = unsafe { v_ptr.add(dp) };
    }
    for (r, a_r) in a.iter().enumerate() {
        unsafe { std::ptr::write_unaligned(acc.add((i0 + r) * dp + d0).cast(), *a_r) };
    }
}

/// `acc[rows x dp] += p[rows x cols] * v[cols x dp]`: 4 rows x 16 dims per block, and an
/// 8 rows x 8 dims block for a head dim that is an odd multiple of 8 (40, 72, ...).
///
/// # Safety
/// `p` holds `rows * cols`, `v` holds `cols * dp`, `acc` holds `rows * dp` values;
/// `rows % 8 == 0`, `dp % 8 == 0`.
#[inline(always)]
unsafe fn weighted_sum_impl<const FMA: bool>(
    p: *const f32,
    v: *const f32,
    acc: *mut f32,
    rows: usize,
    dp: usize,
    cols: usize,
) {
    let wide = dp / 16 * 16;
    for i0 in (0..rows).step_by(4) {
        for d0 in (0..wide).step_by(16) {
            unsafe { accumulate_block::<FMA, 4, 16>(p, v, acc, i0, d0, dp, cols) };
        }
    }
    if wide < dp {
        for i0 in (0..rows).step_by(8) {
            unsafe { accumulate_block::<FMA, 8, 8>(p, v, acc, i0, wide, dp, cols) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_fma(
    q: *const f32,
    panels: *const f32,
    s: *mut f32,
    rows: usize,
    dp: usize,
    cols: usize,
) {
    unsafe { scores_impl::<true>(q, panels, s, rows, dp, cols) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_sum_fma(
    p: *const f32,
    v: *const f32,
    acc: *mut f32,
    rows: usize,
    dp: usize,
    cols: usize,
) {
    unsafe { weighted_sum_impl::<true>(p, v, acc, rows, dp, cols) }
}

fn has_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn check_padding(rows: usize, dp: usize, cols: usize) {
    assert!(
        rows.is_multiple_of(ROWS) && cols.is_multiple_of(LANES) && dp.is_multiple_of(8),
        "attention tiles must be padded: rows {rows}, cols {cols}, dims {dp}"
    );
}

/// Where element (d, j) of the transposed keys lives in the panel layout: keys in groups of
/// [`LANES`], each group a contiguous `dp x LANES` panel, so the scores kernel streams
/// contiguous memory instead of rows a whole sequence apart.
#[inline(always)]
pub fn panel_index(d: usize, j: usize, dp: usize) -> usize {
    (j / LANES) * dp * LANES + d * LANES + j % LANES
}

/// `s[rows x cols] = q[rows x dp] * K^T[dp x cols]` on padded tiles, with the transposed keys
/// of these `cols` columns in panel layout starting at `panels[0]`.
pub fn scores(q: &[f32], panels: &[f32], s: &mut [f32], rows: usize, dp: usize, cols: usize) {
    check_padding(rows, dp, cols);
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(
        q.len() >= rows * dp && panels.len() >= cols * dp && s.len() >= rows * cols,
        "attention scores: tile sizes"
    );
    let (q, panels, s) = (q.as_ptr(), panels.as_ptr(), s.as_mut_ptr());
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: sizes checked above; the CPU has the features the function was built for.
        return unsafe { scores_fma(q, panels, s, rows, dp, cols) };
    }
    // SAFETY: sizes checked above.
    unsafe { scores_impl::<false>(q, panels, s, rows, dp, cols) }
}

/// `acc[rows x dp] += p[rows x cols] * v[cols x dp]` on padded tiles.
pub fn weighted_sum(p: &[f32], v: &[f32], acc: &mut [f32], rows: usize, dp: usize, cols: usize) {
    check_padding(rows, dp, cols);
    if rows == 0 || dp == 0 {
        return;
    }
    assert!(
        p.len() >= rows * cols && v.len() >= cols * dp && acc.len() >= rows * dp,
        "attention weighted sum: tile sizes"
    );
    let (p, v, acc) = (p.as_ptr(), v.as_ptr(), acc.as_mut_ptr());
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: sizes checked above; the CPU has the features the function was built for.
        return unsafe { weighted_sum_fma(p, v, acc, rows, dp, cols) };
    }
    // SAFETY: sizes checked above.
    unsafe { weighted_sum_impl::<false>(p, v, acc, rows, dp, cols) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn kernels_match_plain_loops_on_padded_tiles() {
        for (rows, dp, cols) in [(8, 40, 32), (16, 64, 16), (8, 8, 48), (24, 72, 32)] {
            let q = values(rows * dp, 1);
            let panels = values(dp * cols, 2);
            let mut s = vec![0.0; rows * cols];
            scores(&q, &panels, &mut s, rows, dp, cols);
            for i in 0..rows {
                for j in 0..cols {
                    let want: f64 = (0..dp)
                        .map(|d| q[i * dp + d] as f64 * panels[panel_index(d, j, dp)] as f64)
                        .sum();
                    assert!(
                        (s[i * cols + j] as f64 - want).abs() < 1e-4,
                        "scores ({i},{j})"
                    );
                }
            }
            let v = values(cols * dp, 3);
            let mut acc = values(rows * dp, 4);
            let before = acc.clone();
            weighted_sum(&s, &v, &mut acc, rows, dp, cols);
            for i in 0..rows {
                for d in 0..dp {
                    let want: f64 = before[i * dp + d] as f64
                        + (0..cols)
                            .map(|j| s[i * cols + j] as f64 * v[j * dp + d] as f64)
                            .sum::<f64>();
                    assert!(
                        (acc[i * dp + d] as f64 - want).abs() < 1e-3 * want.abs().max(1.0),
                        "acc ({i},{d})"
                    );
                }
            }
        }
    }
}
