//! Group norm (channels-last, optional fused SiLU) and layer norm.
//!
//! Group-norm statistics are a separate step so that masked execution can normalise the
//! active rows of an edited map with statistics taken from the template.

use multiversion::multiversion;
use rayon::prelude::*;

use super::math;

/// Mean and reciprocal standard deviation of one (sample, group).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupStats {
    pub mean: f32,
    pub rstd: f32,
}

/// Rows folded into f32 channel sums before they are flushed to f64: keeps precision
/// without giving up vectorised accumulation.
const FLUSH_ROWS: usize = 64;

#[multiversion(targets("x86_64+avx2+fma"))]
fn channel_sums(rows: &[f32], channels: usize, center: Option<&[f32]>, acc: &mut [f64]) {
    let mut partial = vec![0.0f32; channels];
    for block in rows.chunks(FLUSH_ROWS * channels) {
        partial.fill(0.0);
        for row in block.chunks_exact(channels) {
            match center {
                None => {
                    for (p, &x) in partial.iter_mut().zip(row) {
                        *p += x;
                    }
                }
                Some(mean) => {
                    for ((p, &x), &m) in partial.iter_mut().zip(row).zip(mean) {
                        let d = x - m;
                        *p += d * d;
                    }
                }
            }
        }
        for (a, &p) in acc.iter_mut().zip(&partial) {
            *a += p as f64;
        }
    }
}

/// Per-channel sums over all rows of one sample, in parallel over row blocks.
fn sample_channel_sums(x: &[f32], channels: usize, center: Option<&[f32]>) -> Vec<f64> {
    let block = (1 << 16) / channels.max(1) * channels.max(1);
    x.par_chunks(block.max(channels))
        .map(|rows| {
            let mut acc = vec![0.0f64; channels];
            channel_sums(rows, channels, center, &mut acc);
            acc
        })
        .reduce(
            || vec![0.0f64; channels],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        )
}

fn per_group(sums: &[f64], groups: usize) -> Vec<f64> {
    let cpg = sums.len() / groups;
    sums.chunks(cpg).map(|g| g.iter().sum()).collect()
}

/// Statistics of `x = [batch, positions, channels]` per (sample, group), two-pass for accuracy.
pub fn group_norm_stats(
    x: &[f32],
    batch: usize,
    channels: usize,
    groups: usize,
    eps: f32,
) -> Vec<GroupStats> {
    assert!(
        groups > 0 && channels.is_multiple_of(groups),
        "group_norm: groups"
    );
    let per_sample = x.len() / batch.max(1);
    let cpg = channels / groups;
    let mut stats = Vec::with_capacity(batch * groups);
    for sample in x.chunks(per_sample.max(1)).take(batch) {
        let count = (sample.len() / channels * cpg) as f64;
        let means: Vec<f64> = per_group(&sample_channel_sums(sample, channels, None), groups)
            .into_iter()
            .map(|s| s / count)
            .collect();
        let center: Vec<f32> = (0..channels).map(|c| means[c / cpg] as f32).collect();
        let vars = per_group(
            &sample_channel_sums(sample, channels, Some(&center)),
            groups,
        );
        stats.extend(means.iter().zip(vars).map(|(&mean, v)| GroupStats {
            mean: mean as f32,
            rstd: (1.0 / (v / count + eps as f64).sqrt()) as f32,
        }));
    }
    stats
}

#[multiversion(targets("x86_64+avx2+fma"))]
fn scale_shift_rows(rows: &mut [f32], scale: &[f32], shift: &[f32], silu: bool) {
    let channels = scale.len();
    for row in rows.chunks_exact_mut(channels) {
        for ((x, &a), &b) in row.iter_mut().zip(scale).zip(shift) {
            *x = *x * a + b;
        }
        if silu {
            for x in row.iter_mut() {
                *x = math::silu(*x);
            }
        }
    }
}

/// `out = (x - mean) * rstd * gamma + beta` (then SiLU if asked) with the given statistics,
/// for `x = [batch, rows, channels]`. `x` and `out` may be the same buffer's copy.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_apply(
    x: &[f32],
    out: &mut [f32],
    batch: usize,
    channels: usize,
    groups: usize,
    stats: &[GroupStats],
    gamma: &[f32],
    beta: &[f32],
    silu: bool,
) {
    let rows = x.len() / (batch * channels).max(1);
    group_norm_apply_ragged(
        x,
        out,
        &vec![rows; batch],
        channels,
        groups,
        stats,
        gamma,
        beta,
        silu,
    );
}

/// [`group_norm_apply`] over samples of different lengths: `x` is the samples' rows stacked,
/// `sample_rows[i]` rows of `channels` for sample i, normalised with `stats[i * groups..]`.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_apply_ragged(
    x: &[f32],
    out: &mut [f32],
    sample_rows: &[usize],
    channels: usize,
    groups: usize,
    stats: &[GroupStats],
    gamma: &[f32],
    beta: &[f32],
    silu: bool,
) {
    assert_eq!(stats.len(), sample_rows.len() * groups, "group_norm: stats");
    assert_eq!(x.len(), out.len(), "group_norm: output");
    assert_eq!(
        sample_rows.iter().sum::<usize>() * channels,
        x.len(),
        "group_norm: rows"
    );
    let cpg = channels / groups;
    out.copy_from_slice(x);
    let mut rest = out;
    for (b, &rows) in sample_rows.iter().enumerate() {
        let (sample, tail) = std::mem::take(&mut rest).split_at_mut(rows * channels);
        rest = tail;
        let s = &stats[b * groups..(b + 1) * groups];
        let scale: Vec<f32> = (0..channels).map(|c| s[c / cpg].rstd * gamma[c]).collect();
        let shift: Vec<f32> = (0..channels)
            .map(|c| beta[c] - s[c / cpg].mean * scale[c])
            .collect();
        sample
            .par_chunks_mut((super::rows_per_task(channels) * channels).max(1))
            .for_each(|rows| scale_shift_rows(rows, &scale, &shift, silu));
    }
}

#[multiversion(targets("x86_64+avx2+fma"))]
fn layer_norm_rows(x: &[f32], out: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let c = gamma.len();
    for (row, o) in x.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
        let mean = math::sum(row) / c as f32;
        let mut var_lanes = [0.0f32; 8];
        let chunks = row.chunks_exact(8);
        let tail: f32 = chunks
            .remainder()
            .iter()
            .map(|&v| (v - mean) * (v - mean))
            .sum();
        for ch in chunks {
            for l in 0..8 {
                var_lanes[l] += (ch[l] - mean) * (ch[l] - mean);
            }
        }
        let var = (var_lanes.iter().sum::<f32>() + tail) / c as f32;
        let rstd = 1.0 / (var + eps).sqrt();
        for (((o, &v), &g), &b) in o.iter_mut().zip(row).zip(gamma).zip(beta) {
            *o = (v - mean) * rstd * g + b;
        }
    }
}

/// Layer norm over the last dimension of `x = [rows, channels]`.
pub fn layer_norm(x: &[f32], out: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let c = gamma.len();
    let per_task = super::rows_per_task(c) * c;
    x.par_chunks(per_task)
        .zip(out.par_chunks_mut(per_task))
        .for_each(|(x, o)| layer_norm_rows(x, o, gamma, beta, eps));
}

/// Per-position group moments of one sample `x = [positions, channels]`, in units of that
/// sample's group statistics: for each position and group, `sum z` and `sum z^2` over the
/// group's channels with `z = (x - mean) * rstd`. Kept with a template's statistics so that
/// a masked edit can take the template's share of the moments over any set of positions.
/// Returns `[positions, groups, 2]`.
pub fn group_position_moments(
    x: &[f32],
    channels: usize,
    groups: usize,
    stats: &[GroupStats],
) -> Vec<f32> {
    assert_eq!(stats.len(), groups, "group_position_moments: stats");
    let cpg = channels / groups;
    let mut out = Vec::with_capacity(x.len() / cpg.max(1) * 2);
    for row in x.chunks_exact(channels) {
        for (group, s) in row.chunks_exact(cpg).zip(stats) {
            let (mut sum, mut squares) = (0.0f32, 0.0f32);
            for &v in group {
                let z = (v - s.mean) * s.rstd;
                sum += z;
                squares += z * z;
            }
            out.extend([sum, squares]);
        }
    }
    out
}

/// The group statistics of a map whose positions `active` hold the rows `fresh = [active,
/// channels]` and whose other positions hold the template's values. `template` are the
/// template map's statistics and `moments = [positions, groups, 2]` its
/// [`group_position_moments`]: the template's moments over the whole map are known from
/// its statistics (`sum z = 0`, `sum z^2 = n var / (var + eps)`), so the active positions'
/// share is swapped for the fresh rows' without visiting the rest.
pub fn blended_group_stats<M: Copy + Into<f32>>(
    fresh: &[f32],
    channels: usize,
    template: &[GroupStats],
    moments: &[M],
    active: &[u32],
    eps: f32,
) -> Vec<GroupStats> {
    let groups = template.len();
    let cpg = channels / groups;
    let positions = moments.len() / (groups * 2).max(1);
    assert_eq!(
        fresh.len(),
        active.len() * channels,
        "blended_group_stats: rows"
    );
    let mut sums = vec![0.0f64; groups];
    let mut squares = vec![0.0f64; groups];
    for (row, &p) in fresh.chunks_exact(channels).zip(active) {
        let at = &moments[p as usize * groups * 2..(p as usize + 1) * groups * 2];
        for (g, (group, s)) in row.chunks_exact(cpg).zip(template).enumerate() {
            let (mut sum, mut sq) = (0.0f32, 0.0f32);
            for &v in group {
                let z = (v - s.mean) * s.rstd;
                sum += z;
                sq += z * z;
            }
            sums[g] += (sum - at[2 * g].into()) as f64;
            squares[g] += (sq - at[2 * g + 1].into()) as f64;
        }
    }
    let count = (positions * cpg) as f64;
    template
        .iter()
        .zip(sums.iter().zip(&squares))
        .map(|(s, (&sum, &sq))| {
            let rstd2 = s.rstd as f64 * s.rstd as f64;
            // The template's own sum of z^2 over the whole map: var * rstd^2 per value.
            let template_squares = count * (1.0 - eps as f64 * rstd2).max(0.0);
            let mean_z = sum / count;
            let var_z = ((template_squares + sq) / count - mean_z * mean_z).max(0.0);
            let mean = s.mean as f64 + mean_z / s.rstd as f64;
            let var = var_z / rstd2;
            GroupStats {
                mean: mean as f32,
                rstd: (1.0 / (var + eps as f64).sqrt()) as f32,
            }
        })
        .collect()
}
