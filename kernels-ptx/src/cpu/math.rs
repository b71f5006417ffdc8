//! Scalar math written so that loops calling it vectorise: no libm calls, no branches that
//! the compiler cannot turn into selects. Accuracy is a few ulp (exp) or ~1e-7 absolute (erf).

const LOG2_E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// 1.5 * 2^23: adding and subtracting it rounds an f32 to the nearest integer.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// e^x. Returns 0 below -87.3 (where f32 underflows) and saturates near the f32 maximum.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(-87.336_54, 88.376_26);
    // Adding the magic constant rounds to an integer k held in the low mantissa bits; reading
    // k back from the bits (not with `as i32`, whose saturation blocks vectorisation) keeps
    // the whole function in SIMD registers.
    let shifted = xc * LOG2_E + ROUND_MAGIC;
    let k = shifted - ROUND_MAGIC;
    let k_bits = shifted.to_bits().wrapping_sub(ROUND_MAGIC.to_bits());
    let r = (xc - k * LN2_HI) - k * LN2_LO;
    // Taylor polynomial of e^r on |r| <= ln2/2, Horner form.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r / 5040.0))))));
    let scale = f32::from_bits(k_bits.wrapping_add(127) << 23);
    if x < -87.336_54 { 0.0 } else { p * scale }
}

/// Independent accumulators in the lane reductions: lets the compiler vectorise a sum or max
/// without reassociating floating-point operations itself.
const LANES: usize = 8;

/// Sum of a slice, in `LANES` partial sums.
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Maximum of a slice (-inf when empty), in `LANES` partial maxima.
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    for c in chunks {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    acc.iter().fold(tail, |m, &v| if v > m { v } else { m })
}

/// `x = exp(x - shift)` in place; returns the sum of the results.
#[inline(always)]
pub fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32 {
    // Two plain passes: the loop vectoriser handles each; a fused lane-array loop defeats it.
    for v in x.iter_mut() {
        *v = exp(*v - shift);
    }
    sum(x)
}

#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// tanh through e^{2x}; accurate to ~1e-7 absolute.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let xc = x.clamp(-10.0, 10.0);
    let e = exp(2.0 * xc);
    (e - 1.0) / (e + 1.0)
}

/// erf(x): its Maclaurin series for |x| < 1 (where A&S 7.1.26's terms cancel), and
/// Abramowitz & Stegun 7.1.26 (absolute error 1.5e-7) beyond. Both branches are computed and
/// one selected, so loops over it vectorise.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    // 2/sqrt(pi) * sum (-1)^n x^(2n+1) / (n! (2n+1)), n <= 9 (truncation < 2e-8 at |x| = 1).
    let z = a * a;
    let series = a
        * (std::f32::consts::FRAC_2_SQRT_PI
            + z * (-0.376_126_4
                + z * (0.112_837_92
                    + z * (-0.026_866_17
                        + z * (0.005_223_977_6
                            + z * (-0.000_854_832_7
                                + z * (0.000_120_553_33
                                    + z * (-1.492_565e-5
                                        + z * (1.646_211_4e-6 + z * -1.636_584_5e-7)))))))));
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let tail = 1.0 - poly * exp(-z);
    let y = if a < 1.0 { series } else { tail };
    if x < 0.0 { -y } else { y }
}

/// GELU with the exact (erf) form, as `torch.nn.functional.gelu` by default.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// GELU with the tanh approximation (`approximate="tanh"`).
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)))
}

/// CLIP's quick GELU: x * sigmoid(1.702 x).
#[inline(always)]
pub fn quick_gelu(x: f32) -> f32 {
    x * sigmoid(1.702 * x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_over_range() {
        let mut x = -90.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            let tol = want * 3e-7 + 1e-37;
            assert!((got - want).abs() <= tol, "exp({x}) = {got}, want {want}");
            x += 0.0173;
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn erf_and_tanh_match_std() {
        let mut x = -6.0f32;
        while x < 6.0 {
            let t = (x as f64).tanh();
            assert!((tanh(x) as f64 - t).abs() < 5e-7, "tanh({x})");
            x += 0.0097;
        }
        // erf reference: std has none for f64 either, so compare against a high-order series.
        for &(x, want) in &[
            (0.1f32, 0.112_462_916_018_284_9f64),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (-1.7, -0.983_790_458_590_774_6),
            (3.0, 0.999_977_909_503_001_4),
        ] {
            assert!((erf(x) as f64 - want).abs() < 3e-7, "erf({x})");
        }
    }
}
