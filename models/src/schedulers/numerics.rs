//! The noise schedule and the NumPy/PyTorch array helpers diffusers builds it with.
//!
//! diffusers mixes float32 tensors (betas, cumulative alphas, sigmas) with float64 NumPy arrays
//! (timestep spacing, interpolation). Each helper reproduces the precision and formula of the
//! call it stands for, so timesteps come out identical and sigmas to the last bit or two:
//! a one-ulp difference in `alphas_cumprod[0]` is a 1e-4 difference in the smallest sigma.

use super::config::Spacing;

/// `torch.linspace(start, end, n, dtype=float32)` on the CPU: an f32 step, the first half
/// counted up from `start` and the second half down from `end`, each a fused multiply-add
/// (PyTorch's compiled kernel contracts `start + step * i`).
pub(crate) fn torch_linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - i - 1) as f32, end)
            }
        })
        .collect()
}

/// `torch.cumprod` of f32 values on the CPU, which accumulates in f64 and rounds each output.
pub(crate) fn cumprod_f32(values: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .iter()
        .map(|&v| {
            acc *= f64::from(v);
            acc as f32
        })
        .collect()
}

/// `np.linspace(start, stop, num)` in f64: `i * step + start`, the last value set to `stop`.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    let div = num - 1;
    let delta = stop - start;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64).collect();
    if div > 0 {
        let step = delta / div as f64;
        if step == 0.0 {
            y.iter_mut().for_each(|v| *v = *v / div as f64 * delta);
        } else {
            y.iter_mut().for_each(|v| *v *= step);
        }
    } else {
        y.iter_mut().for_each(|v| *v *= delta);
    }
    y.iter_mut().for_each(|v| *v += start);
    if num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// `np.arange(start, stop, step)` in f64. NumPy stores `start` and `start + step`, then fills
/// `start + i * delta` with `delta` recomputed from those two, and its length is
/// `ceil((stop - start) / step)`; both details show in the rounded timesteps.
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let mut out = Vec::with_capacity(len);
    out.push(start);
    if len > 1 {
        out.push(start + step);
        let delta = out[1] - start;
        out.extend((2..len).map(|i| start + i as f64 * delta));
    }
    out
}

/// `np.interp(x, arange(len(fp)), fp)`: linear interpolation in f64 over integer abscissae,
/// clamped to the end values.
pub(crate) fn np_interp_index(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return x;
    }
    if x <= 0.0 {
        return f64::from(fp[0]);
    }
    if x >= last as f64 {
        return f64::from(fp[last]);
    }
    let j = x.floor() as usize;
    let (lo, hi) = (f64::from(fp[j]), f64::from(fp[j + 1]));
    if x == j as f64 {
        return lo;
    }
    (hi - lo) * (x - j as f64) + lo
}

/// Noise levels `sqrt((1 - alphas_cumprod) / alphas_cumprod)` in f32, indexed by training
/// timestep (ascending).
pub(crate) fn sigmas_from_alphas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose log-sigma brackets
/// `sigma`, from the f32 `log_sigmas` table (mixed f32/f64 arithmetic as NumPy promotes it).
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // argmax of the cumulative count of `log_sigma >= log_sigmas[j]`: the last such j, or 0.
    let low_idx = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - f64::from(l) >= 0.0)
        .unwrap_or(0)
        .min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx], log_sigmas[high_idx]);
    let w = ((f64::from(low) - log_sigma) / f64::from(low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// Karras et al. (2022) noise levels: `n` points evenly spaced in `sigma^(1/7)` from
/// `sigma_max` down to `sigma_min`.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    const RHO: f64 = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / RHO);
    let max_inv_rho = sigma_max.powf(1.0 / RHO);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(RHO))
        .collect()
}

/// DDIM's and Euler's timesteps, descending, before their integer or f32 cast (exact
/// whole numbers except Euler's "linspace", which diffusers leaves fractional).
///
/// "trailing" can yield one value too many: `np.arange(1000, 0, -1000 / n)` has `n + 1`
/// elements for 62 values of `n` (61, 103, ...), the extra one rounding to timestep -1, which
/// diffusers then runs as a spurious last step. That element is dropped here.
pub(crate) fn spaced_timesteps(
    spacing: Spacing,
    train: usize,
    n: usize,
    steps_offset: i64,
    round_linspace: bool,
) -> Vec<f64> {
    let mut t: Vec<f64> = match spacing {
        Spacing::Linspace => np_linspace(0.0, (train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|t| {
                if round_linspace {
                    t.round_ties_even()
                } else {
                    t
                }
            })
            .collect(),
        Spacing::Leading => {
            let ratio = train / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio) as f64 + steps_offset as f64)
                .collect()
        }
        Spacing::Trailing => np_arange(train as f64, 0.0, -(train as f64 / n as f64))
            .into_iter()
            .map(|t| t.round_ties_even() - 1.0)
            .collect(),
    };
    if spacing == Spacing::Trailing {
        t.retain(|&t| t >= 0.0);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arange_matches_numpy_lengths() {
        // np.arange(1000, 0, -1000 / 61) has 62 elements (the last ~0), a NumPy rounding quirk.
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 61.0).len(), 62);
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 7.0).len(), 7);
        assert_eq!(np_arange(1000.0, 0.0, -1.0).len(), 1000);
        assert!(np_arange(0.0, 10.0, -1.0).is_empty());
    }

    #[test]
    fn linspace_endpoints() {
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
        assert_eq!(np_linspace(0.0, 999.0, 3), vec![0.0, 499.5, 999.0]);
        let t = torch_linspace_f32(0.1, 0.2, 5);
        assert_eq!((t[0], t[4]), (0.1, 0.2));
    }

    #[test]
    fn interp_clamps_and_hits_nodes() {
        let fp = [1.0f32, 2.0, 4.0];
        assert_eq!(np_interp_index(-1.0, &fp), 1.0);
        assert_eq!(np_interp_index(1.0, &fp), 2.0);
        assert_eq!(np_interp_index(1.5, &fp), 3.0);
        assert_eq!(np_interp_index(7.0, &fp), 4.0);
    }
}
