//! Shared by the emulator's tests: seeded random inputs, element-by-element comparison, and
//! the launch shapes the host launchers use.
#![allow(dead_code)]

pub use retouch_kernels_emu::buffer::DeviceBuffer;
pub use retouch_kernels_emu::simt::{Launch, launch};

/// SplitMix64: reproducible inputs without a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * unit
    }

    pub fn values(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }

    /// An index in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Fails unless every `got[i]` is within `atol + rtol * |want[i]|` of `want[i]`; names the
/// worst element. Also fails on a reference that is all zeros (a check that cannot fail).
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    assert!(
        want.iter().any(|&w| w != 0.0),
        "{what}: the reference is all zeros"
    );
    let mut worst: Option<(usize, f32)> = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        let excess = err - (atol + rtol * w.abs());
        // A NaN (from the kernel or an unwritten element) is the worst excess of all.
        let excess = if excess.is_nan() {
            f32::INFINITY
        } else {
            excess
        };
        if excess > 0.0 && worst.is_none_or(|(_, e)| excess > e) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        panic!(
            "{what}: element {i} is {} where the reference has {} (tolerance {atol} + {rtol} x |ref|)",
            got[i], want[i]
        );
    }
}

/// A 1-D grid-stride launch as the host's (256 threads), with at most `max_blocks` blocks so
/// the stride loop is exercised too.
pub fn grid_stride(n: usize, max_blocks: u32) -> Launch {
    let blocks = n.div_ceil(256).clamp(1, max_blocks as usize) as u32;
    Launch::new([blocks, 1, 1], 256, 0)
}

/// `f32 -> f16 -> f32`, nearest even (what the kernels' f16 stores keep).
pub fn round_f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

pub fn round_bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

pub fn to_f16(values: &[f32]) -> Vec<half::f16> {
    values.iter().map(|&v| half::f16::from_f32(v)).collect()
}

pub fn to_bf16(values: &[f32]) -> Vec<u16> {
    values
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_bits())
        .collect()
}

/// The selftest's comparison (`max_err` in `cuda/selftest.rs`): every element within
/// `tol * max(1, |ref|)` of the reference, absolute up to 1 and relative above. Fails on NaN
/// and on an all-zero reference (a check that cannot fail).
pub fn assert_within(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    assert!(
        want.iter().any(|&w| w != 0.0),
        "{what}: the reference is all zeros"
    );
    let mut worst: Option<(usize, f64)> = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs() / w.abs().max(1.0);
        if (err.is_nan() || err > tol) && worst.is_none_or(|(_, e)| err > e || err.is_nan()) {
            worst = Some((i, err));
        }
    }
    if let Some((i, err)) = worst {
        panic!(
            "{what}: element {i} is {} where the reference has {} (error {err:e}, tolerance \
             {tol:e} x max(1, |ref|))",
            got[i], want[i]
        );
    }
}
