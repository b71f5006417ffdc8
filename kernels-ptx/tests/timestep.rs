//! `TimestepEmbedding::embed` against diffusers' `get_timestep_embedding`, in f64.

mod common;

use common::*;
use retouch_kernels::{Tensor, TimestepEmbedding};

/// Compares with the f64 formula. diffusers evaluates the sinusoid argument `t * freq` in f32,
/// so the argument itself carries a relative error of a few f32 ulps (growing with the
/// frequency exponent, which is rounded before `exp`); sin/cos pass that on as an absolute
/// error of `|arg| * rel`. The allowance below is exactly that bound on top of 1e-5.
fn check(emb: TimestepEmbedding, timesteps: &[f32]) {
    let t = Tensor::from_vec(timesteps.to_vec(), &[timesteps.len()]).unwrap();
    let got = emb.embed(&t).unwrap();
    let tv: Vec<f64> = timesteps.iter().map(|&x| x as f64).collect();
    let want = timestep_ref(
        &tv,
        emb.dim,
        emb.flip_sin_to_cos,
        emb.downscale_freq_shift as f64,
        emb.scale as f64,
        emb.max_period as f64,
    );
    let dim = emb.dim;
    let half = dim / 2;
    let shift = emb.downscale_freq_shift as f64;
    let allowed = |flat: usize, _want: f64| {
        let (row, col) = (flat / dim, flat % dim);
        if col >= 2 * half {
            return 0.0; // the zero padding of an odd dim is exact
        }
        let i = col % half;
        let exponent = (emb.max_period as f64).ln() * i as f64 / (half as f64 - shift);
        let freq = (-exponent).exp();
        let arg = (emb.scale as f64 * tv[row] * freq).abs();
        let rel = (3.0 * exponent + 4.0) * f32::EPSILON as f64 / 2.0;
        ATOL + arg * rel
    };
    let what = format!("{emb:?} at {timesteps:?}");
    assert_eq!(got.shape(), [timesteps.len(), dim], "{what}: shape");
    assert_close_by(
        &what,
        &got.to_vec_f32(),
        &want,
        &[timesteps.len(), dim],
        allowed,
    );
}

fn embedding(dim: usize, flip: bool, shift: f32) -> TimestepEmbedding {
    TimestepEmbedding {
        dim,
        flip_sin_to_cos: flip,
        downscale_freq_shift: shift,
        scale: 1.0,
        max_period: 10000.0,
    }
}

#[test]
fn small_timesteps_tight() {
    // |t| <= 2: the argument error is below 1e-6, so the plain tolerance applies.
    for flip in [false, true] {
        for shift in [0.0, 1.0] {
            for dim in [320, 7, 9, 2 * 37] {
                check(embedding(dim, flip, shift), &[0.5, 1.25, 2.0, 0.013]);
            }
        }
    }
}

#[test]
fn sampler_timesteps() {
    for flip in [false, true] {
        for shift in [0.0, 1.0] {
            for dim in [320, 256, 7, 13] {
                check(embedding(dim, flip, shift), &[999.0, 500.5, 1.0, 0.0, 37.0]);
            }
        }
    }
}

#[test]
fn unet_settings_and_scale() {
    let unet = TimestepEmbedding::unet(320);
    assert_eq!(unet, embedding(320, true, 0.0));
    check(unet, &[981.0, 1.0]);
    let scaled = TimestepEmbedding {
        scale: 0.25,
        max_period: 500.0,
        ..embedding(13, false, 1.0)
    };
    check(scaled, &[999.0, 3.5]);
}

#[test]
fn flip_swaps_halves() {
    // Beyond matching the reference: flipped = [cos, sin] = unflipped halves swapped.
    let t = Tensor::from_vec(vec![7.0f32, 123.0], &[2]).unwrap();
    let a = embedding(9, false, 1.0).embed(&t).unwrap().to_vec_f32();
    let b = embedding(9, true, 1.0).embed(&t).unwrap().to_vec_f32();
    for r in 0..2 {
        let (ra, rb) = (&a[r * 9..(r + 1) * 9], &b[r * 9..(r + 1) * 9]);
        assert_bits_eq("sin half", &ra[..4], &rb[4..8]);
        assert_bits_eq("cos half", &ra[4..8], &rb[..4]);
        assert_eq!((ra[8], rb[8]), (0.0, 0.0), "odd dim pads a zero at the end");
    }
}

#[test]
fn rejects_non_vector_timesteps() {
    let t = randn(&[2, 1], 1);
    assert!(TimestepEmbedding::unet(8).embed(&t).is_err());
}
