//! The kernel benchmark suite: one list of cases (shapes from SD1.5) shared by
//! `retouch bench` and the criterion benchmarks, so both measure the same thing.
//!
//! Masked cases name a dense baseline; reports show their time as a ratio of it.

use std::time::{Duration, Instant};

use crate::{
    AttentionSegment, Conv2dParams, Conv2dWeight, DType, Device, MaskedConvSegment, Result, Tensor,
    TokenSet,
};

/// Runs a prepared benchmark once.
pub type Runner = Box<dyn FnMut() -> Result<()>>;

/// One benchmark: a name, the work it does, and how to prepare its inputs (done only when
/// the case is measured, so a filtered run prepares nothing else).
pub struct BenchCase {
    pub name: String,
    pub shape: String,
    /// Floating-point operations of one run (multiply-add = 2).
    pub flops: f64,
    /// Name of the case this one is compared with, if any.
    pub baseline: Option<String>,
    pub setup: Box<dyn Fn() -> Result<Runner>>,
}

/// Timing of one case.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Measurement {
    pub name: String,
    pub shape: String,
    pub runs: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub gflops: f64,
    pub baseline: Option<String>,
    /// `median / baseline median`, when the case has a baseline.
    pub ratio: Option<f64>,
}

/// Mask ratios the masked cases are measured at.
pub const MASK_RATIOS: [f64; 5] = [0.05, 0.10, 0.20, 0.50, 1.00];

/// A centred rectangle covering about `ratio` of an `h x w` grid: edit masks are blobs.
pub fn rect_token_set(h: usize, w: usize, ratio: f64) -> TokenSet {
    let area = (ratio * (h * w) as f64).round().max(1.0);
    let rh = ((ratio.sqrt() * h as f64).round() as usize).clamp(1, h);
    let rw = ((area / rh as f64).round() as usize).clamp(1, w);
    let (y0, x0) = ((h - rh) / 2, (w - rw) / 2);
    let positions = (y0..y0 + rh)
        .flat_map(|y| (x0..x0 + rw).map(move |x| (y * w + x) as u32))
        .collect();
    TokenSet::from_positions(h, w, positions).expect("rectangle inside the grid")
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, seed, Device::Cpu)
}

fn gemm_case(m: usize, k: usize, n: usize, what: &str) -> BenchCase {
    BenchCase {
        name: format!("linear {what}"),
        shape: format!("[{m},{k}] x [{n},{k}]^T"),
        flops: 2.0 * (m * k * n) as f64,
        baseline: None,
        setup: Box::new(move || {
            let x = randn(&[m, k], 1);
            let w = randn(&[n, k], 2);
            Ok(Box::new(move || x.linear(&w, None).map(drop)))
        }),
    }
}

fn conv_case(b: usize, hw: usize, cin: usize, cout: usize) -> BenchCase {
    BenchCase {
        name: format!("conv3x3 {hw}x{hw}x{cin}"),
        shape: format!("[{b},{hw},{hw},{cin}] -> {cout}"),
        flops: 2.0 * (b * hw * hw * 9 * cin * cout) as f64,
        baseline: None,
        setup: Box::new(move || {
            let x = randn(&[b, hw, hw, cin], 3);
            let w =
                Conv2dWeight::from_oihw(&randn(&[cout, cin, 3, 3], 4), Some(&randn(&[cout], 5)))?;
            Ok(Box::new(move || {
                x.conv2d(&w, Conv2dParams::SAME_3X3).map(drop)
            }))
        }),
    }
}

fn masked_conv_case(hw: usize, c: usize, ratio: f64, baseline: &str) -> BenchCase {
    let active = rect_token_set(hw, hw, ratio).len();
    // The SD1.5 64x64x320 cases keep their short names (tools and notes refer to them).
    let name = if (hw, c) == (64, 320) {
        format!("masked conv3x3 {:.0}%", ratio * 100.0)
    } else {
        format!("masked conv3x3 {hw}x{hw}x{c} {:.0}%", ratio * 100.0)
    };
    BenchCase {
        name,
        shape: format!("{active} of {hw}x{hw}x{c}, f16 cache"),
        flops: 2.0 * (active * 9 * c * c) as f64,
        baseline: Some(baseline.to_string()),
        setup: Box::new(move || {
            let tokens = rect_token_set(hw, hw, ratio);
            let fresh = randn(&[tokens.len(), c], 6);
            let cached = randn(&[hw * hw, c], 7).to_dtype(DType::F16)?;
            let w = Conv2dWeight::from_oihw(&randn(&[c, c, 3, 3], 8), Some(&randn(&[c], 9)))?;
            Ok(Box::new(move || {
                let seg = MaskedConvSegment {
                    fresh: &fresh,
                    active: &tokens,
                    cached: &cached,
                    outputs: &tokens,
                };
                w.masked_conv2d(&[seg], Conv2dParams::SAME_3X3).map(drop)
            }))
        }),
    }
}

fn attention_case(b: usize, tokens: usize, c: usize, heads: usize) -> BenchCase {
    BenchCase {
        name: format!("attention {tokens} tokens b{b}"),
        shape: format!("[{b},{tokens},{c}] {heads} heads"),
        flops: 4.0 * (b * tokens * tokens * c) as f64,
        baseline: None,
        setup: Box::new(move || {
            let q = randn(&[b, tokens, c], 10);
            let k = randn(&[b, tokens, c], 11);
            let v = randn(&[b, tokens, c], 12);
            Ok(Box::new(move || {
                Tensor::attention(&q, &k, &v, heads, false).map(drop)
            }))
        }),
    }
}

fn masked_attention_case(
    hw: usize,
    c: usize,
    heads: usize,
    ratio: f64,
    baseline: &str,
) -> BenchCase {
    let n = rect_token_set(hw, hw, ratio).len();
    BenchCase {
        name: format!("masked attention {:.0}%", ratio * 100.0),
        shape: format!("{n} of {} tokens, f16 cache", hw * hw),
        // Each active query meets every token once: cached where inactive, fresh where active.
        flops: 4.0 * (n * hw * hw * c) as f64,
        baseline: Some(baseline.to_string()),
        setup: Box::new(move || {
            let tokens = rect_token_set(hw, hw, ratio);
            let q = randn(&[n, c], 13);
            let k = randn(&[n, c], 14);
            let v = randn(&[n, c], 15);
            let cached_k = randn(&[hw * hw, c], 16).to_dtype(DType::F16)?;
            let cached_v = randn(&[hw * hw, c], 17).to_dtype(DType::F16)?;
            Ok(Box::new(move || {
                let seg = AttentionSegment {
                    rows: 0..n,
                    tokens: &tokens,
                    cached_k: &cached_k,
                    cached_v: &cached_v,
                };
                Tensor::masked_attention(&q, &k, &v, &[seg], heads).map(drop)
            }))
        }),
    }
}

/// The cases, inputs prepared. `quick` drops the largest GEMM and the smaller conv shapes.
pub fn suite(device: Device, quick: bool) -> Vec<BenchCase> {
    // GPU cases are not written yet: a CUDA device has none (`retouch bench` says so).
    if device != Device::Cpu {
        return Vec::new();
    }
    let mut cases = Vec::new();
    if !quick {
        cases.push(gemm_case(4096, 4096, 4096, "4096^3"));
    }
    cases.push(gemm_case(8192, 320, 320, "SD1.5 attn proj"));
    cases.push(gemm_case(8192, 320, 2560, "SD1.5 GEGLU proj"));
    cases.push(conv_case(1, 64, 320, 320));
    if !quick {
        cases.push(conv_case(1, 32, 640, 640));
        cases.push(conv_case(1, 16, 1280, 1280));
    }
    cases.push(attention_case(2, 4096, 320, 8));
    // Masked cases against their dense counterparts at batch 1.
    let dense_conv = "conv3x3 64x64x320";
    for r in MASK_RATIOS {
        cases.push(masked_conv_case(64, 320, r, dense_conv));
    }
    if !quick {
        // The low-resolution convs, where few active rows meet the largest weights.
        for (hw, c) in [(16, 1280), (8, 1280)] {
            let dense = format!("conv3x3 {hw}x{hw}x{c} b1");
            let mut case = conv_case(1, hw, c, c);
            case.name = dense.clone();
            cases.push(case);
            for r in [0.25, 1.0] {
                cases.push(masked_conv_case(hw, c, r, &dense));
            }
        }
    }
    let dense_attn = "attention 4096 tokens b1";
    cases.push(attention_case(1, 4096, 320, 8));
    for r in MASK_RATIOS {
        cases.push(masked_attention_case(64, 320, 8, r, dense_attn));
    }
    cases
}

/// Runs a case until `min_time` has passed and at least `min_runs` runs are done (after
/// one warm-up run) and reports the median.
pub fn measure(case: &BenchCase, min_time: Duration, min_runs: usize) -> Result<Measurement> {
    let mut run = (case.setup)()?;
    run()?;
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < min_runs.max(1) || start.elapsed() < min_time {
        let t = Instant::now();
        run()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let median_ms = times[times.len() / 2];
    Ok(Measurement {
        name: case.name.clone(),
        shape: case.shape.clone(),
        runs: times.len(),
        median_ms,
        min_ms: times[0],
        gflops: case.flops / (median_ms * 1e6),
        baseline: case.baseline.clone(),
        ratio: None,
    })
}

/// Fills in each measurement's ratio to its baseline.
pub fn attach_ratios(results: &mut [Measurement]) {
    let medians: Vec<(String, f64)> = results
        .iter()
        .map(|m| (m.name.clone(), m.median_ms))
        .collect();
    for m in results.iter_mut() {
        if let Some(base) = &m.baseline {
            m.ratio = medians
                .iter()
                .find(|(n, _)| n == base)
                .map(|(_, t)| m.median_ms / t);
        }
    }
}
