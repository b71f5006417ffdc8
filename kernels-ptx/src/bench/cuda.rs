//! The benchmark cases' work on a CUDA device, through the same launchers the UNet uses (the
//! device's attention kernel and GEMM backend as chosen; a linear layer passes its kept f16
//! weight when the backend multiplies in f16, as the models' `Linear` does).
//!
//! A launch of a small kernel takes microseconds, as does a synchronisation, so a run repeats
//! the work enough times to take about [`RUN_TIME`] and synchronises once: the time per
//! repetition is then that of back-to-back launches in one stream, as in a UNet step.

use std::rc::Rc;
use std::time::{Duration, Instant};

use half::f16;

use super::{Prepared, Work, rect_token_set};
use crate::cuda::{
    CudaAttentionSegment, CudaConv2dWeight, CudaDevice, CudaMaskedConvSegment, CudaTensor,
};
use crate::{Conv2dParams, Conv2dWeight, DType, Device, Result, Tensor};

/// About how long one timed run takes.
const RUN_TIME: Duration = Duration::from_millis(2);
/// The most repetitions in one run.
const MAX_REPS: u32 = 200;

/// `work`'s inputs uploaded to `dev` and a runner doing it repeatedly, then synchronising.
pub fn prepare(dev: &Rc<CudaDevice>, work: Work) -> Result<Prepared> {
    let op = operation(dev, work)?;
    repeated(dev.clone(), op)
}

type Op = Box<dyn FnMut() -> Result<()>>;

fn upload(dev: &CudaDevice, shape: &[usize], seed: u64) -> Result<CudaTensor> {
    CudaTensor::upload(dev, &Tensor::randn(shape, seed, Device::Cpu))
}

fn upload_f16(dev: &CudaDevice, shape: &[usize], seed: u64) -> Result<CudaTensor<f16>> {
    CudaTensor::upload(
        dev,
        &Tensor::randn(shape, seed, Device::Cpu).to_dtype(DType::F16)?,
    )
}

fn conv_weight(dev: &CudaDevice, cin: usize, cout: usize, seed: u64) -> Result<CudaConv2dWeight> {
    let w = Conv2dWeight::from_oihw(
        &Tensor::randn(&[cout, cin, 3, 3], seed, Device::Cpu),
        Some(&Tensor::randn(&[cout], seed + 1, Device::Cpu)),
    )?;
    CudaConv2dWeight::upload(dev, &w)
}

/// One repetition of `work` on `dev` (launched, not waited for).
fn operation(dev: &Rc<CudaDevice>, work: Work) -> Result<Op> {
    let d = dev.clone();
    Ok(match work {
        Work::Linear { m, k, n } => {
            let (x, w) = (upload(dev, &[m, k], 1)?, upload(dev, &[n, k], 2)?);
            if dev.gemm_backend().f16_products() {
                let half = dev.f32_to_f16(&w)?;
                Box::new(move || d.linear_f16_weight(&x, &half, None).map(drop))
            } else {
                Box::new(move || d.linear(&x, &w, None).map(drop))
            }
        }
        Work::Conv3x3 {
            batch,
            side,
            cin,
            cout,
        } => {
            let x = upload(dev, &[batch, side, side, cin], 3)?;
            let w = conv_weight(dev, cin, cout, 4)?;
            Box::new(move || d.conv2d(&x, &w, Conv2dParams::SAME_3X3).map(drop))
        }
        Work::MaskedConv3x3 { side, c, ratio } => {
            let tokens = rect_token_set(side, side, ratio);
            let fresh = upload(dev, &[tokens.len(), c], 6)?;
            let cached = upload_f16(dev, &[side * side, c], 7)?;
            let w = conv_weight(dev, c, c, 8)?;
            Box::new(move || {
                let seg = CudaMaskedConvSegment {
                    active: &tokens,
                    cached: &cached,
                    outputs: &tokens,
                };
                d.masked_conv2d(&w, &fresh, &[seg], Conv2dParams::SAME_3X3)
                    .map(drop)
            })
        }
        Work::Attention {
            batch,
            tokens,
            c,
            heads,
        } => {
            let q = upload(dev, &[batch, tokens, c], 10)?;
            let k = upload(dev, &[batch, tokens, c], 11)?;
            let v = upload(dev, &[batch, tokens, c], 12)?;
            Box::new(move || d.attention(&q, &k, &v, heads, false).map(drop))
        }
        Work::MaskedAttention {
            side,
            c,
            heads,
            ratio,
        } => {
            let tokens = rect_token_set(side, side, ratio);
            let n = tokens.len();
            let q = upload(dev, &[n, c], 13)?;
            let k = upload(dev, &[n, c], 14)?;
            let v = upload(dev, &[n, c], 15)?;
            let cached_k = upload_f16(dev, &[side * side, c], 16)?;
            let cached_v = upload_f16(dev, &[side * side, c], 17)?;
            Box::new(move || {
                let seg = CudaAttentionSegment {
                    rows: 0..n,
                    tokens: &tokens,
                    cached_k: &cached_k,
                    cached_v: &cached_v,
                };
                d.masked_attention(&q, &k, &v, &[seg], heads).map(drop)
            })
        }
        Work::GroupNormSilu {
            batch,
            side,
            c,
            groups,
        } => {
            let x = upload(dev, &[batch, side, side, c], 18)?;
            let (gamma, beta) = (upload(dev, &[c], 19)?, upload(dev, &[c], 20)?);
            Box::new(move || {
                d.group_norm(&x, groups, &gamma, &beta, 1e-5, true)
                    .map(drop)
            })
        }
        Work::LayerNorm { rows, c } => {
            let x = upload(dev, &[rows, c], 21)?;
            let (gamma, beta) = (upload(dev, &[c], 22)?, upload(dev, &[c], 23)?);
            Box::new(move || d.layer_norm(&x, &gamma, &beta, 1e-5).map(drop))
        }
        Work::Geglu { rows, c } => {
            let x = upload(dev, &[rows, 2 * c], 24)?;
            Box::new(move || d.geglu(&x).map(drop))
        }
        Work::Add { len } => {
            let (a, b) = (upload(dev, &[len], 25)?, upload(dev, &[len], 26)?);
            Box::new(move || d.add(&a, &b).map(drop))
        }
        Work::LoraPatch { out, inp, rank } => {
            let mut w = upload_f16(dev, &[out, inp], 27)?;
            let (up, down) = (
                upload(dev, &[out, rank], 28)?,
                upload(dev, &[rank, inp], 29)?,
            );
            let mut scale = 1.0 / rank as f32;
            // The sign alternates so the weight stays near where it started.
            Box::new(move || {
                scale = -scale;
                d.lora_patch(&mut w, &up, &down, scale)
            })
        }
    })
}

/// A runner doing `op` enough times per run to take about [`RUN_TIME`] (measured once,
/// after a warm-up that also makes any per-layer copies, such as a conv's f16 weight),
/// then synchronising.
fn repeated(dev: Rc<CudaDevice>, mut op: Op) -> Result<Prepared> {
    op()?;
    dev.synchronize()?;
    let start = Instant::now();
    op()?;
    dev.synchronize()?;
    let one = start.elapsed().max(Duration::from_micros(1));
    let reps = (RUN_TIME.as_secs_f64() / one.as_secs_f64()).ceil() as u32;
    let reps = reps.clamp(1, MAX_REPS);
    Ok(Prepared {
        run: Box::new(move || {
            for _ in 0..reps {
                op()?;
            }
            dev.synchronize()
        }),
        ops_per_run: reps as usize,
    })
}
