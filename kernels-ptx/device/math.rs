//! Activation math, the same formulas as the CPU's `cpu/math.rs` so both agree to ~1e-6.

use crate::gpu::exp;

#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let e = exp(2.0 * x.max(-10.0).min(10.0));
    (e - 1.0) / (e + 1.0)
}

/// erf: Maclaurin series below 1 (where A&S 7.1.26 cancels), A&S 7.1.26 above.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let z = a * a;
    let y = if a < 1.0 {
        a * (1.128_379_2
            + z * (-0.376_126_4
                + z * (0.112_837_92
                    + z * (-0.026_866_17
                        + z * (0.005_223_977_6
                            + z * (-0.000_854_832_7
                                + z * (0.000_120_553_33
                                    + z * (-1.492_565e-5
                                        + z * (1.646_211_4e-6 + z * -1.636_584_5e-7)))))))))
    } else {
        let t = 1.0 / (1.0 + 0.327_591_1 * a);
        let poly = t
            * (0.254_829_6
                + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
        1.0 - poly * exp(-z)
    };
    if x < 0.0 { -y } else { y }
}

#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * 0.707_106_77))
}

#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + tanh(0.797_884_6 * (x + 0.044_715 * x * x * x)))
}

#[inline(always)]
pub fn quick_gelu(x: f32) -> f32 {
    x * sigmoid(1.702 * x)
}
