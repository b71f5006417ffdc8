//! The kernel benchmark suite: one list of cases (shapes from SD1.5) shared by
//! `retouch bench` (on the CPU or a CUDA device) and the criterion benchmarks, so all measure
//! the same thing.
//!
//! A case is a [`Work`] (its shapes, FLOPs and the bytes its operands move) done on a
//! [`Target`]; both devices run the same cases under the same names. Masked cases name a
//! dense baseline; reports show their time as a ratio of it.

mod cpu;
mod cuda;
mod work;

use std::rc::Rc;
use std::time::{Duration, Instant};

pub use work::{Work, halo_len};

use crate::cuda::CudaDevice;
use crate::{Result, TokenSet};

/// Runs a prepared benchmark once.
pub type Runner = Box<dyn FnMut() -> Result<()>>;

/// A case with its inputs ready: each call of `run` does the work `ops_per_run` times.
pub struct Prepared {
    pub run: Runner,
    pub ops_per_run: usize,
}

impl Prepared {
    /// A runner doing the work once per call.
    pub fn single(run: Runner) -> Prepared {
        Prepared {
            run,
            ops_per_run: 1,
        }
    }
}

/// One benchmark: a name, the work it does, and how to prepare its inputs (done only when
/// the case is measured, so a filtered run prepares nothing else).
pub struct BenchCase {
    pub name: String,
    pub shape: String,
    /// Floating-point operations of one repetition (multiply-add = 2); NaN where not counted.
    pub flops: f64,
    /// Bytes one repetition's operands move at the least (each read or written once); NaN
    /// where not counted.
    pub bytes: f64,
    /// Name of the case this one is compared with, if any.
    pub baseline: Option<String>,
    pub setup: Box<dyn Fn() -> Result<Prepared>>,
}

/// Timing of one case, per repetition of its work.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Measurement {
    pub name: String,
    pub shape: String,
    /// Timed runs (each of `ops_per_run` repetitions).
    pub runs: usize,
    pub ops_per_run: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub gflops: f64,
    /// Achieved bandwidth over the case's least traffic ([`Work::bytes`]), GB/s.
    pub gbps: f64,
    pub baseline: Option<String>,
    /// `median / baseline median`, when the case has a baseline.
    pub ratio: Option<f64>,
}

/// Where the kernel cases run.
pub enum Target {
    Cpu,
    /// The device's attention kernel and GEMM backend as set on it.
    Cuda(Rc<CudaDevice>),
}

impl Target {
    /// Bytes per value of a layer's GEMM weight: f16 where the device multiplies in f16
    /// (it keeps an f16 copy of each weight), f32 otherwise.
    fn gemm_weight_bytes(&self) -> f64 {
        match self {
            Target::Cuda(dev) if dev.gemm_backend().f16_products() => 2.0,
            _ => 4.0,
        }
    }
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

/// The case list: names, work and baselines, the same on every target.
pub fn cases(quick: bool) -> Vec<(String, Work, Option<String>)> {
    let mut cases = Vec::new();
    let mut push = |name: &str, work, baseline: Option<&str>| {
        cases.push((name.to_string(), work, baseline.map(str::to_string)));
    };
    let conv = |batch, side, c| Work::Conv3x3 {
        batch,
        side,
        cin: c,
        cout: c,
    };
    if !quick {
        push(
            "linear 4096^3",
            Work::Linear {
                m: 4096,
                k: 4096,
                n: 4096,
            },
            None,
        );
    }
    push(
        "linear SD1.5 attn proj",
        Work::Linear {
            m: 8192,
            k: 320,
            n: 320,
        },
        None,
    );
    push(
        "linear SD1.5 GEGLU proj",
        Work::Linear {
            m: 8192,
            k: 320,
            n: 2560,
        },
        None,
    );
    push("conv3x3 64x64x320", conv(1, 64, 320), None);
    if !quick {
        push("conv3x3 32x32x640", conv(1, 32, 640), None);
        push("conv3x3 16x16x1280", conv(1, 16, 1280), None);
    }
    push(
        "attention 4096 tokens b2",
        Work::Attention {
            batch: 2,
            tokens: 4096,
            c: 320,
            heads: 8,
        },
        None,
    );
    // SD1.5's memory-bound ops at a 64x64 latent, CFG batch 2.
    push(
        "group norm + SiLU",
        Work::GroupNormSilu {
            batch: 2,
            side: 64,
            c: 320,
            groups: 32,
        },
        None,
    );
    push("layer norm", Work::LayerNorm { rows: 8192, c: 320 }, None);
    push(
        "GEGLU",
        Work::Geglu {
            rows: 8192,
            c: 1280,
        },
        None,
    );
    push(
        "add",
        Work::Add {
            len: 2 * 64 * 64 * 320,
        },
        None,
    );
    // The largest attention projection's LoRA (SD1.5's 1280-wide blocks), rank 64.
    push(
        "LoRA patch 1280x1280 r64",
        Work::LoraPatch {
            out: 1280,
            inp: 1280,
            rank: 64,
        },
        None,
    );
    // Masked cases against their dense counterparts at batch 1. The SD1.5 64x64x320 cases
    // keep their short names (tools and notes refer to them).
    for ratio in MASK_RATIOS {
        let name = format!("masked conv3x3 {:.0}%", ratio * 100.0);
        let work = Work::MaskedConv3x3 {
            side: 64,
            c: 320,
            ratio,
        };
        push(&name, work, Some("conv3x3 64x64x320"));
    }
    if !quick {
        // The low-resolution convs, where few active rows meet the largest weights.
        for side in [16, 8] {
            let dense = format!("conv3x3 {side}x{side}x1280 b1");
            push(&dense, conv(1, side, 1280), None);
            for ratio in [0.25, 1.0] {
                let name = format!("masked conv3x3 {side}x{side}x1280 {:.0}%", ratio * 100.0);
                let work = Work::MaskedConv3x3 {
                    side,
                    c: 1280,
                    ratio,
                };
                push(&name, work, Some(&dense));
            }
        }
    }
    let dense_attention = "attention 4096 tokens b1";
    push(
        dense_attention,
        Work::Attention {
            batch: 1,
            tokens: 4096,
            c: 320,
            heads: 8,
        },
        None,
    );
    for ratio in MASK_RATIOS {
        let name = format!("masked attention {:.0}%", ratio * 100.0);
        let work = Work::MaskedAttention {
            side: 64,
            c: 320,
            heads: 8,
            ratio,
        };
        push(&name, work, Some(dense_attention));
    }
    cases
}

/// The cases on `target`, inputs prepared when measured. `quick` drops the largest GEMM and
/// the smaller conv shapes.
pub fn suite(target: &Target, quick: bool) -> Vec<BenchCase> {
    cases(quick)
        .into_iter()
        .map(|(name, work, baseline)| {
            let weight_bytes = if work.has_gemm_weight() {
                target.gemm_weight_bytes()
            } else {
                4.0
            };
            let setup: Box<dyn Fn() -> Result<Prepared>> = match target {
                Target::Cpu => Box::new(move || cpu::prepare(work)),
                Target::Cuda(dev) => {
                    let dev = dev.clone();
                    Box::new(move || cuda::prepare(&dev, work))
                }
            };
            BenchCase {
                name,
                shape: work.shape(),
                flops: work.flops(),
                bytes: work.bytes(weight_bytes),
                baseline,
                setup,
            }
        })
        .collect()
}

/// Runs a case until `min_time` has passed and at least `min_runs` runs are done (after
/// one warm-up run) and reports the median time of one repetition.
pub fn measure(case: &BenchCase, min_time: Duration, min_runs: usize) -> Result<Measurement> {
    let Prepared {
        mut run,
        ops_per_run,
    } = (case.setup)()?;
    let per_op = ops_per_run.max(1) as f64;
    run()?;
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < min_runs.max(1) || start.elapsed() < min_time {
        let t = Instant::now();
        run()?;
        times.push(t.elapsed().as_secs_f64() * 1e3 / per_op);
    }
    times.sort_by(f64::total_cmp);
    let median_ms = times[times.len() / 2];
    Ok(Measurement {
        name: case.name.clone(),
        shape: case.shape.clone(),
        runs: times.len(),
        ops_per_run,
        median_ms,
        min_ms: times[0],
        gflops: case.flops / (median_ms * 1e6),
        gbps: case.bytes / (median_ms * 1e6),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_names_are_unique_and_baselines_exist() {
        for quick in [false, true] {
            let cases = cases(quick);
            let names: Vec<&str> = cases.iter().map(|(n, ..)| n.as_str()).collect();
            for (i, (name, _, baseline)) in cases.iter().enumerate() {
                assert!(!names[..i].contains(&name.as_str()), "{name} twice");
                if let Some(base) = baseline {
                    assert!(names.contains(&base.as_str()), "{name}: no case {base}");
                }
            }
        }
        assert!(cases(true).len() < cases(false).len());
    }

    #[test]
    fn every_kind_of_work_runs_on_the_cpu() {
        // Small shapes of each kind, so the runners' shapes and dtypes are checked quickly.
        let works = [
            Work::Linear { m: 5, k: 7, n: 3 },
            Work::Conv3x3 {
                batch: 2,
                side: 5,
                cin: 3,
                cout: 4,
            },
            Work::MaskedConv3x3 {
                side: 6,
                c: 4,
                ratio: 0.2,
            },
            Work::Attention {
                batch: 2,
                tokens: 9,
                c: 8,
                heads: 2,
            },
            Work::MaskedAttention {
                side: 6,
                c: 8,
                heads: 2,
                ratio: 0.3,
            },
            Work::GroupNormSilu {
                batch: 2,
                side: 3,
                c: 8,
                groups: 4,
            },
            Work::LayerNorm { rows: 5, c: 6 },
            Work::Geglu { rows: 5, c: 6 },
            Work::Add { len: 11 },
            Work::LoraPatch {
                out: 6,
                inp: 5,
                rank: 2,
            },
        ];
        for work in works {
            let mut prepared = cpu::prepare(work).unwrap();
            assert_eq!(prepared.ops_per_run, 1);
            for _ in 0..2 {
                (prepared.run)().unwrap_or_else(|e| panic!("{work:?}: {e}"));
            }
        }
    }

    #[test]
    fn measurement_reports_rates_per_repetition() {
        let case = BenchCase {
            name: "x".into(),
            shape: String::new(),
            flops: 2e6,
            bytes: 4e6,
            baseline: None,
            setup: Box::new(|| {
                Ok(Prepared {
                    run: Box::new(|| {
                        std::thread::sleep(Duration::from_millis(4));
                        Ok(())
                    }),
                    ops_per_run: 1000,
                })
            }),
        };
        let m = measure(&case, Duration::ZERO, 3).unwrap();
        assert_eq!((m.runs, m.ops_per_run), (3, 1000));
        // A run's time is split over its 1000 repetitions: at least 4 us each (a sleep never
        // ends early), and below the 4 ms of one undivided run unless a run took 4 s.
        assert!((0.004..4.0).contains(&m.median_ms), "{}", m.median_ms);
        assert!((m.gflops * m.median_ms - 2.0).abs() < 1e-9);
        assert!((m.gbps * m.median_ms - 4.0).abs() < 1e-9);
    }
}
