//! Shared helpers for the kernel integration tests: seeded random inputs, plain f64 reference
//! implementations written from the math definitions, and an element-by-element comparison
//! that reports the worst offender.
//!
//! Every integration test file compiles this module separately and uses only part of it.
#![allow(dead_code)]

use half::{bf16, f16};
use retouch_kernels::{DType, Device, Tensor, TokenSet};

/// Default tolerances for f32 kernels against an f64 reference.
pub const RTOL: f64 = 1e-5;
pub const ATOL: f64 = 1e-5;

// ---------------------------------------------------------------------------------------------
// Random inputs
// ---------------------------------------------------------------------------------------------

/// Standard-normal f32 tensor from a seed (never all zeros).
pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, seed, Device::Cpu)
}

/// Standard-normal values scaled by `scale` and shifted by `shift`.
pub fn randn_affine(shape: &[usize], seed: u64, scale: f32, shift: f32) -> Tensor {
    let data: Vec<f32> = randn(shape, seed)
        .to_vec_f32()
        .into_iter()
        .map(|v| v * scale + shift)
        .collect();
    Tensor::from_vec(data, shape).unwrap()
}

/// The values of a tensor, widened to f64 (exact for every float dtype).
pub fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_vec_f32().into_iter().map(f64::from).collect()
}

/// A tiny deterministic generator (SplitMix64) for masks and index lists.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A random mask with about `ratio` of the positions set.
pub fn random_mask(len: usize, ratio: f64, seed: u64) -> Vec<bool> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| rng.uniform() < ratio).collect()
}

/// A token set on an `h x w` grid with about `ratio` of the positions active.
pub fn random_tokens(h: usize, w: usize, ratio: f64, seed: u64) -> TokenSet {
    TokenSet::from_mask(h, w, &random_mask(h * w, ratio, seed)).unwrap()
}

/// The values a float dtype stores for `x` (round to nearest even), widened to f64.
pub fn round_to(dtype: DType, x: f64) -> f64 {
    match dtype {
        DType::F32 => x as f32 as f64,
        DType::F16 => f16::from_f64(x).to_f64(),
        DType::BF16 => bf16::from_f64(x).to_f64(),
        DType::I64 => panic!("round_to: not a float dtype"),
    }
}

/// An f32 tensor stored in `dtype` (rounded with the `half` crate's scalar conversion, not
/// with the library's own), and its stored values widened to f64.
pub fn stored_as(t: &Tensor, dtype: DType) -> (Tensor, Vec<f64>) {
    let v = t.to_vec_f32();
    let shape = t.shape();
    match dtype {
        DType::F32 => (t.clone(), f64s(t)),
        DType::F16 => {
            let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            let vals = h.iter().map(|x| x.to_f64()).collect();
            (Tensor::from_vec(h, shape).unwrap(), vals)
        }
        DType::BF16 => {
            let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
            let vals = h.iter().map(|x| x.to_f64()).collect();
            (Tensor::from_vec(h, shape).unwrap(), vals)
        }
        DType::I64 => panic!("stored_as: not a float dtype"),
    }
}

pub const FLOAT_DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

// ---------------------------------------------------------------------------------------------
// Comparison
// ---------------------------------------------------------------------------------------------

/// Row-major multi-index of a flat index.
pub fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        let n = shape[d].max(1);
        idx[d] = flat % n;
        flat /= n;
    }
    idx
}

/// Checks `|got[i] - want[i]| <= allowed(i, want[i])` everywhere; on failure reports the
/// worst element (largest error relative to what it is allowed), its multi-index in `shape`
/// and how many elements fail.
pub fn assert_close_by(
    what: &str,
    got: &[f32],
    want: &[f64],
    shape: &[usize],
    allowed: impl Fn(usize, f64) -> f64,
) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: got {} values, want {}",
        got.len(),
        want.len()
    );
    assert_eq!(
        shape.iter().product::<usize>(),
        want.len(),
        "{what}: shape {shape:?} does not hold {} values",
        want.len()
    );
    let mut worst: Option<(usize, f64)> = None;
    let mut failures = 0usize;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g = g as f64;
        let err = (g - w).abs();
        let tol = allowed(i, w);
        // NaN anywhere (or an error that compares as NaN) is a failure.
        let ratio = if err.is_nan() || (g.is_nan() != w.is_nan()) {
            f64::INFINITY
        } else if g == w {
            0.0
        } else {
            err / tol
        };
        if ratio > 1.0 {
            failures += 1;
        }
        if worst.is_none_or(|(_, r)| ratio > r) {
            worst = Some((i, ratio));
        }
    }
    if failures > 0 {
        let (i, ratio) = worst.unwrap();
        panic!(
            "{what}: {failures} of {} elements out of tolerance; worst at {:?} (flat {i}): \
             got {}, want {}, |diff| = {:e}, allowed {:e} (ratio {ratio:.3})",
            got.len(),
            unravel(i, shape),
            got[i],
            want[i],
            (got[i] as f64 - want[i]).abs(),
            allowed(i, want[i]),
        );
    }
}

/// `|got - want| <= atol + rtol * |want|` element by element.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], shape: &[usize], rtol: f64, atol: f64) {
    assert_close_by(what, got, want, shape, |_, w| atol + rtol * w.abs());
}

/// Checks the tensor's shape and dtype (f32), then its values with the default tolerances.
pub fn assert_tensor_close(what: &str, got: &Tensor, want: &[f64], shape: &[usize]) {
    assert_tensor_close_tol(what, got, want, shape, RTOL, ATOL);
}

pub fn assert_tensor_close_tol(
    what: &str,
    got: &Tensor,
    want: &[f64],
    shape: &[usize],
    rtol: f64,
    atol: f64,
) {
    assert_eq!(got.shape(), shape, "{what}: shape");
    assert_eq!(got.dtype(), DType::F32, "{what}: dtype");
    assert_close(
        what,
        got.as_slice::<f32>().unwrap(),
        want,
        shape,
        rtol,
        atol,
    );
}

/// Bitwise equality of two f32 slices (so that -0.0 vs 0.0 and NaN payloads count).
pub fn assert_bits_eq(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!(
            "{what}: first difference at {i}: got {}, want {}",
            got[i], want[i]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// f64 reference implementations
// ---------------------------------------------------------------------------------------------

/// `x [rows, in] * w[out, in]^T + b`.
pub fn linear_ref(x: &[f64], w: &[f64], bias: Option<&[f64]>, out: usize) -> Vec<f64> {
    let inp = w.len() / out;
    let rows = x.len() / inp;
    let mut y = vec![0.0; rows * out];
    for r in 0..rows {
        for o in 0..out {
            let mut acc = bias.map_or(0.0, |b| b[o]);
            for i in 0..inp {
                acc += x[r * inp + i] * w[o * inp + i];
            }
            y[r * out + o] = acc;
        }
    }
    y
}

/// `a [m, k] * b [k, n]`.
pub fn matmul_ref(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
        }
    }
    c
}

/// The transpose of a row-major `[rows, cols]` matrix.
pub fn transpose(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut t = vec![0.0; a.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = a[r * cols + c];
        }
    }
    t
}

/// A convolution as PyTorch defines it, with an OIHW weight, over channels-last maps.
pub struct ConvRef {
    pub weight: Vec<f64>,
    pub bias: Option<Vec<f64>>,
    pub cout: usize,
    pub cin: usize,
    pub kh: usize,
    pub kw: usize,
}

impl ConvRef {
    pub fn out_size(&self, h: usize, w: usize, stride: usize, pad: usize) -> (usize, usize) {
        (
            (h + 2 * pad - self.kh) / stride + 1,
            (w + 2 * pad - self.kw) / stride + 1,
        )
    }

    /// `x = [batch, h, w, cin]` -> `[batch, oh, ow, cout]`, zero padding.
    pub fn apply(
        &self,
        x: &[f64],
        batch: usize,
        (h, w): (usize, usize),
        stride: usize,
        pad: usize,
    ) -> Vec<f64> {
        let (oh, ow) = self.out_size(h, w, stride, pad);
        let (cin, cout, kh, kw) = (self.cin, self.cout, self.kh, self.kw);
        assert_eq!(x.len(), batch * h * w * cin, "conv reference: input size");
        let mut y = vec![0.0; batch * oh * ow * cout];
        for b in 0..batch {
            for oy in 0..oh {
                for ox in 0..ow {
                    for co in 0..cout {
                        let mut acc = self.bias.as_ref().map_or(0.0, |b| b[co]);
                        for ky in 0..kh {
                            let iy = (oy * stride + ky) as isize - pad as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            for kx in 0..kw {
                                let ix = (ox * stride + kx) as isize - pad as isize;
                                if ix < 0 || ix >= w as isize {
                                    continue;
                                }
                                let (iy, ix) = (iy as usize, ix as usize);
                                for ci in 0..cin {
                                    acc += x[((b * h + iy) * w + ix) * cin + ci]
                                        * self.weight[((co * cin + ci) * kh + ky) * kw + kx];
                                }
                            }
                        }
                        y[((b * oh + oy) * ow + ox) * cout + co] = acc;
                    }
                }
            }
        }
        y
    }
}

/// A random conv layer (weights scaled by 1/sqrt(fan_in) as in a real network): the packed
/// kernel weight and its f64 reference.
pub fn random_conv(
    cout: usize,
    cin: usize,
    k: usize,
    with_bias: bool,
    seed: u64,
) -> (retouch_kernels::Conv2dWeight, ConvRef) {
    let fan_in = (cin * k * k) as f32;
    let w = randn_affine(&[cout, cin, k, k], seed, 1.0 / fan_in.sqrt(), 0.0);
    let b = with_bias.then(|| randn(&[cout], seed + 1));
    let packed = retouch_kernels::Conv2dWeight::from_oihw(&w, b.as_ref()).unwrap();
    let reference = ConvRef {
        weight: f64s(&w),
        bias: b.as_ref().map(f64s),
        cout,
        cin,
        kh: k,
        kw: k,
    };
    (packed, reference)
}

/// Group norm of `x = [batch, positions, channels]`, population variance, then optional SiLU.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_ref(
    x: &[f64],
    batch: usize,
    channels: usize,
    groups: usize,
    gamma: &[f64],
    beta: &[f64],
    eps: f64,
    silu: bool,
) -> Vec<f64> {
    let stats = group_stats_ref(x, batch, channels, groups, eps);
    group_norm_apply_ref(x, batch, channels, groups, &stats, gamma, beta, silu)
}

/// (mean, rstd) per (sample, group), two-pass in f64.
pub fn group_stats_ref(
    x: &[f64],
    batch: usize,
    channels: usize,
    groups: usize,
    eps: f64,
) -> Vec<(f64, f64)> {
    let per_sample = x.len() / batch;
    let positions = per_sample / channels;
    let cpg = channels / groups;
    let mut stats = Vec::new();
    for b in 0..batch {
        for g in 0..groups {
            let vals: Vec<f64> = (0..positions)
                .flat_map(|p| {
                    (g * cpg..(g + 1) * cpg).map(move |c| x[b * per_sample + p * channels + c])
                })
                .collect();
            let n = vals.len() as f64;
            let mean = vals.iter().sum::<f64>() / n;
            let var = vals.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
            stats.push((mean, 1.0 / (var + eps).sqrt()));
        }
    }
    stats
}

#[allow(clippy::too_many_arguments)]
pub fn group_norm_apply_ref(
    x: &[f64],
    batch: usize,
    channels: usize,
    groups: usize,
    stats: &[(f64, f64)],
    gamma: &[f64],
    beta: &[f64],
    silu: bool,
) -> Vec<f64> {
    let per_sample = x.len() / batch;
    let cpg = channels / groups;
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let b = i / per_sample;
            let c = i % channels;
            let (mean, rstd) = stats[b * groups + c / cpg];
            let y = (v - mean) * rstd * gamma[c] + beta[c];
            if silu { silu_ref(y) } else { y }
        })
        .collect()
}

/// Layer norm over the last dimension.
pub fn layer_norm_ref(x: &[f64], gamma: &[f64], beta: &[f64], eps: f64) -> Vec<f64> {
    let c = gamma.len();
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks(c) {
        let mean = row.iter().sum::<f64>() / c as f64;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / c as f64;
        let rstd = 1.0 / (var + eps).sqrt();
        y.extend(
            row.iter()
                .enumerate()
                .map(|(i, &v)| (v - mean) * rstd * gamma[i] + beta[i]),
        );
    }
    y
}

/// Softmax of each row of `len` values (max subtracted; all -inf rows give zeros).
pub fn softmax_ref(x: &[f64], len: usize) -> Vec<f64> {
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks(len) {
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        if max == f64::NEG_INFINITY {
            y.extend(std::iter::repeat_n(0.0, len));
            continue;
        }
        let e: Vec<f64> = row.iter().map(|v| (v - max).exp()).collect();
        let s: f64 = e.iter().sum();
        y.extend(e.iter().map(|v| v / s));
    }
    y
}

pub fn sigmoid_ref(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

pub fn silu_ref(x: f64) -> f64 {
    x * sigmoid_ref(x)
}

/// erf(x) from the everywhere-convergent series
/// `erf(x) = 2/sqrt(pi) * exp(-x^2) * sum_n 2^n x^(2n+1) / (1*3*...*(2n+1))`,
/// whose terms are all of one sign (no cancellation): accurate to ~1e-15.
pub fn erf_ref(x: f64) -> f64 {
    let a = x.abs();
    if a > 6.0 {
        return x.signum();
    }
    let mut term = a;
    let mut sum = a;
    let mut n = 0.0;
    while term > sum * 1e-17 {
        n += 1.0;
        term *= 2.0 * a * a / (2.0 * n + 1.0);
        sum += term;
    }
    let y = 2.0 / std::f64::consts::PI.sqrt() * (-a * a).exp() * sum;
    y.min(1.0).copysign(x)
}

pub fn gelu_ref(x: f64) -> f64 {
    0.5 * x * (1.0 + erf_ref(x / std::f64::consts::SQRT_2))
}

pub fn gelu_tanh_ref(x: f64) -> f64 {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
}

pub fn quick_gelu_ref(x: f64) -> f64 {
    x * sigmoid_ref(1.702 * x)
}

/// Sizes of a multi-head attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    pub batch: usize,
    pub lq: usize,
    pub lk: usize,
    pub channels: usize,
    pub heads: usize,
}

/// `softmax(q k^T / sqrt(d)) v` per batch and head, heads interleaved along the channels
/// (head h owns channels `h*d .. (h+1)*d`). With `causal`, query i sees keys `0..=i`.
pub fn attention_ref(q: &[f64], k: &[f64], v: &[f64], dims: AttnDims, causal: bool) -> Vec<f64> {
    let AttnDims {
        batch,
        lq,
        lk,
        channels: c,
        heads,
    } = dims;
    let d = c / heads;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0.0; batch * lq * c];
    let mut scores = vec![0.0; lk];
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..lq {
                let qi = &q[(b * lq + i) * c + h * d..][..d];
                let visible = if causal { (i + 1).min(lk) } else { lk };
                for (j, s) in scores.iter_mut().enumerate().take(visible) {
                    let kj = &k[(b * lk + j) * c + h * d..][..d];
                    *s = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() * scale;
                }
                let max = scores[..visible]
                    .iter()
                    .cloned()
                    .fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores[..visible].iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                let o = &mut out[(b * lq + i) * c + h * d..][..d];
                for (j, wgt) in weights.iter().enumerate() {
                    let vj = &v[(b * lk + j) * c + h * d..][..d];
                    for (o, &vv) in o.iter_mut().zip(vj) {
                        *o += wgt / total * vv;
                    }
                }
            }
        }
    }
    out
}

/// The map a masked op sees: `fresh` rows (in token order) at the active positions, `cached`
/// rows elsewhere; `[grid_len, cols]`.
pub fn composite(tokens: &TokenSet, fresh: &[f64], cached: &[f64], cols: usize) -> Vec<f64> {
    assert_eq!(fresh.len(), tokens.len() * cols, "composite: fresh rows");
    assert_eq!(
        cached.len(),
        tokens.grid_len() * cols,
        "composite: cached rows"
    );
    let mut map = cached.to_vec();
    for (row, &p) in tokens.positions().iter().enumerate() {
        let p = p as usize;
        map[p * cols..(p + 1) * cols].copy_from_slice(&fresh[row * cols..(row + 1) * cols]);
    }
    map
}

/// Rows `index[i]` of a `[rows, cols]` matrix.
pub fn rows_ref(x: &[f64], cols: usize, index: &[u32]) -> Vec<f64> {
    index
        .iter()
        .flat_map(|&i| {
            x[i as usize * cols..(i as usize + 1) * cols]
                .iter()
                .cloned()
        })
        .collect()
}

/// diffusers' `get_timestep_embedding`, in f64.
pub fn timestep_ref(
    t: &[f64],
    dim: usize,
    flip_sin_to_cos: bool,
    shift: f64,
    scale: f64,
    max_period: f64,
) -> Vec<f64> {
    let half = dim / 2;
    let freqs: Vec<f64> = (0..half)
        .map(|i| (-(max_period.ln()) * i as f64 / (half as f64 - shift)).exp())
        .collect();
    let mut out = Vec::with_capacity(t.len() * dim);
    for &ts in t {
        let args: Vec<f64> = freqs.iter().map(|f| scale * ts * f).collect();
        let sin = args.iter().map(|a| a.sin());
        let cos = args.iter().map(|a| a.cos());
        if flip_sin_to_cos {
            out.extend(cos.chain(sin));
        } else {
            out.extend(sin.chain(cos));
        }
        if !dim.is_multiple_of(2) {
            out.push(0.0);
        }
    }
    out
}

/// `w + scale * up * down` with `w = [out, in]`, `up = [out, rank]`, `down = [rank, in]`.
pub fn lora_merged_ref(w: &[f64], up: &[f64], down: &[f64], rank: usize, scale: f64) -> Vec<f64> {
    let out = up.len() / rank;
    let inp = down.len() / rank;
    let delta = matmul_ref(up, down, out, rank, inp);
    w.iter().zip(&delta).map(|(w, d)| w + scale * d).collect()
}
