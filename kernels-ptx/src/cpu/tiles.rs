//! Register-blocked micro-kernels for attention's small products (head dims of 40 to 160
//! are too thin for a general GEMM's packing to pay off).
//!
//! Tiles are contiguous and zero-padded by the caller: rows to a multiple of [`ROWS`],
//! score columns to a multiple of [`LANES`], head dims to a multiple of 8. Each kernel has
//! an FMA build picked at run time; the portable build computes the same sums unfused.

/// Query rows per register block.
pub const ROWS: usize = 4;
/// Score columns (keys) per register block.
pub const LANES: usize = 16;

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// `s[rows x cols] = q[rows x dp] * kt[dp x cols]`.
#[inline(always)]
fn scores_impl<const FMA: bool>(
    q: &[f32],
    kt: &[f32],
    kt_ld: usize,
    s: &mut [f32],
    rows: usize,
    dp: usize,
    cols: usize,
) {
    for i0 in (0..rows).step_by(ROWS) {
        for j0 in (0..cols).step_by(LANES) {
            let mut acc = [[0.0f32; LANES]; ROWS];
            for d in 0..dp {
                let k: &[f32; LANES] = kt[d * kt_ld + j0..][..LANES].try_into().unwrap();
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let qv = q[(i0 + r) * dp + d];
                    for l in 0..LANES {
                        acc_r[l] = madd::<FMA>(qv, k[l], acc_r[l]);
                    }
                }
            }
            for (r, acc_r) in acc.iter().enumerate() {
                s[(i0 + r) * cols + j0..][..LANES].copy_from_slice(acc_r);
            }
        }
    }
}

/// `acc[rows x dp] += p[rows x cols] * v[cols x dp]`, in column blocks of width `W`.
#[inline(always)]
fn accumulate_block<const FMA: bool, const W: usize>(
    p: &[f32],
    v: &[f32],
    acc: &mut [f32],
    i0: usize,
    d0: usize,
    dp: usize,
    cols: usize,
) {
    let mut a = [[0.0f32; W]; ROWS];
    for (r, a_r) in a.iter_mut().enumerate() {
        a_r.copy_from_slice(&acc[(i0 + r) * dp + d0..][..W]);
    }
    for j in 0..cols {
        let vv: &[f32; W] = v[j * dp + d0..][..W].try_into().unwrap();
        for (r, a_r) in a.iter_mut().enumerate() {
            let pv = p[(i0 + r) * cols + j];
            for l in 0..W {
                a_r[l] = madd::<FMA>(pv, vv[l], a_r[l]);
            }
        }
    }
    for (r, a_r) in a.iter().enumerate() {
        acc[(i0 + r) * dp + d0..][..W].copy_from_slice(a_r);
    }
}

#[inline(always)]
fn weighted_sum_impl<const FMA: bool>(
    p: &[f32],
    v: &[f32],
    acc: &mut [f32],
    rows: usize,
    dp: usize,
    cols: usize,
) {
    for i0 in (0..rows).step_by(ROWS) {
        let mut d0 = 0;
        while d0 + 16 <= dp {
            accumulate_block::<FMA, 16>(p, v, acc, i0, d0, dp, cols);
            d0 += 16;
        }
        if d0 < dp {
            accumulate_block::<FMA, 8>(p, v, acc, i0, d0, dp, cols);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn scores_fma(
    q: &[f32],
    kt: &[f32],
    kt_ld: usize,
    s: &mut [f32],
    rows: usize,
    dp: usize,
    cols: usize,
) {
    scores_impl::<true>(q, kt, kt_ld, s, rows, dp, cols)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn weighted_sum_fma(p: &[f32], v: &[f32], acc: &mut [f32], rows: usize, dp: usize, cols: usize) {
    weighted_sum_impl::<true>(p, v, acc, rows, dp, cols)
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

fn check(rows: usize, dp: usize, cols: usize) {
    assert!(
        rows.is_multiple_of(ROWS) && cols.is_multiple_of(LANES) && dp.is_multiple_of(8),
        "attention tiles must be padded: rows {rows}, cols {cols}, dims {dp}"
    );
}

/// `s[rows x cols] = q[rows x dp] * kt[dp x cols]` on padded tiles; rows of `kt` are
/// `kt_ld` apart (a column block of a wider packed matrix).
pub fn scores(
    q: &[f32],
    kt: &[f32],
    kt_ld: usize,
    s: &mut [f32],
    rows: usize,
    dp: usize,
    cols: usize,
) {
    check(rows, dp, cols);
    assert!(
        q.len() >= rows * dp
            && kt_ld >= cols
            && kt.len() >= (dp - 1) * kt_ld + cols
            && s.len() >= rows * cols
    );
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the CPU supports the features the function was compiled for.
        return unsafe { scores_fma(q, kt, kt_ld, s, rows, dp, cols) };
    }
    scores_impl::<false>(q, kt, kt_ld, s, rows, dp, cols)
}

/// `acc += p * v` on padded tiles.
pub fn weighted_sum(p: &[f32], v: &[f32], acc: &mut [f32], rows: usize, dp: usize, cols: usize) {
    check(rows, dp, cols);
    assert!(p.len() >= rows * cols && v.len() >= cols * dp && acc.len() >= rows * dp);
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the CPU supports the features the function was compiled for.
        return unsafe { weighted_sum_fma(p, v, acc, rows, dp, cols) };
    }
    weighted_sum_impl::<false>(p, v, acc, rows, dp, cols)
}
