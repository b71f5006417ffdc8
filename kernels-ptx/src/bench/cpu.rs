//! The benchmark cases' work on the CPU ops of [`Tensor`].

use super::{Prepared, Work, rect_token_set};
use crate::{
    AttentionSegment, Conv2dParams, Conv2dWeight, DType, Device, MaskedConvSegment, Result, Tensor,
};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, seed, Device::Cpu)
}

/// `work`'s inputs on the host and a runner doing it once per call.
pub fn prepare(work: Work) -> Result<Prepared> {
    let run: super::Runner = match work {
        Work::Linear { m, k, n } => {
            let (x, w) = (randn(&[m, k], 1), randn(&[n, k], 2));
            Box::new(move || x.linear(&w, None).map(drop))
        }
        Work::Conv3x3 {
            batch,
            side,
            cin,
            cout,
        } => {
            let x = randn(&[batch, side, side, cin], 3);
            let w =
                Conv2dWeight::from_oihw(&randn(&[cout, cin, 3, 3], 4), Some(&randn(&[cout], 5)))?;
            Box::new(move || x.conv2d(&w, Conv2dParams::SAME_3X3).map(drop))
        }
        Work::MaskedConv3x3 { side, c, ratio } => {
            let tokens = rect_token_set(side, side, ratio);
            let fresh = randn(&[tokens.len(), c], 6);
            let cached = randn(&[side * side, c], 7).to_dtype(DType::F16)?;
            let w = Conv2dWeight::from_oihw(&randn(&[c, c, 3, 3], 8), Some(&randn(&[c], 9)))?;
            Box::new(move || {
                let seg = MaskedConvSegment {
                    fresh: &fresh,
                    active: &tokens,
                    cached: &cached,
                    outputs: &tokens,
                };
                w.masked_conv2d(&[seg], Conv2dParams::SAME_3X3).map(drop)
            })
        }
        Work::Attention {
            batch,
            tokens,
            c,
            heads,
        } => {
            let [q, k, v] = [10, 11, 12].map(|seed| randn(&[batch, tokens, c], seed));
            Box::new(move || Tensor::attention(&q, &k, &v, heads, false).map(drop))
        }
        Work::MaskedAttention {
            side,
            c,
            heads,
            ratio,
        } => {
            let tokens = rect_token_set(side, side, ratio);
            let n = tokens.len();
            let [q, k, v] = [13, 14, 15].map(|seed| randn(&[n, c], seed));
            let cached_k = randn(&[side * side, c], 16).to_dtype(DType::F16)?;
            let cached_v = randn(&[side * side, c], 17).to_dtype(DType::F16)?;
            Box::new(move || {
                let seg = AttentionSegment {
                    rows: 0..n,
                    tokens: &tokens,
                    cached_k: &cached_k,
                    cached_v: &cached_v,
                };
                Tensor::masked_attention(&q, &k, &v, &[seg], heads).map(drop)
            })
        }
        Work::GroupNormSilu {
            batch,
            side,
            c,
            groups,
        } => {
            let x = randn(&[batch, side, side, c], 18);
            let (gamma, beta) = (randn(&[c], 19), randn(&[c], 20));
            Box::new(move || x.group_norm(groups, &gamma, &beta, 1e-5, true).map(drop))
        }
        Work::LayerNorm { rows, c } => {
            let x = randn(&[rows, c], 21);
            let (gamma, beta) = (randn(&[c], 22), randn(&[c], 23));
            Box::new(move || x.layer_norm(&gamma, &beta, 1e-5).map(drop))
        }
        Work::Geglu { rows, c } => {
            let x = randn(&[rows, 2 * c], 24);
            Box::new(move || x.geglu().map(drop))
        }
        Work::Add { len } => {
            let (a, b) = (randn(&[len], 25), randn(&[len], 26));
            Box::new(move || a.add(&b).map(drop))
        }
        Work::LoraPatch { out, inp, rank } => {
            let mut w = randn(&[out, inp], 27).to_dtype(DType::F16)?;
            let (up, down) = (randn(&[out, rank], 28), randn(&[rank, inp], 29));
            let mut scale = 1.0 / rank as f32;
            // The sign alternates so the weight stays near where it started.
            Box::new(move || {
                scale = -scale;
                w.lora_patch(&up, &down, scale).map(drop)
            })
        }
    };
    Ok(Prepared::single(run))
}
