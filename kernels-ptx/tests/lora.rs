//! LoRA: `lora_patch` / `lora_restore` on f32, f16 and bf16 weights, and `lora_segments`.

mod common;

use common::*;
use retouch_kernels::{DType, Error, LoraSegment, Tensor};

/// A random `[out, in]` weight stored in `dtype`, and a rank-`rank` adapter (f32).
fn weight_and_adapter(
    out: usize,
    inp: usize,
    rank: usize,
    dtype: DType,
    seed: u64,
) -> (Tensor, Vec<f64>, Tensor, Tensor) {
    let (w, wv) = stored_as(&randn_affine(&[out, inp], seed, 0.1, 0.0), dtype);
    let up = randn_affine(&[out, rank], seed + 1, 0.1, 0.0);
    let down = randn_affine(&[rank, inp], seed + 2, 0.1, 0.0);
    (w, wv, up, down)
}

/// Checks a patched weight against `round_dtype(W + s * up * down)` computed in f64. The
/// kernel accumulates in f32 and rounds once; when the exact value lies within the f32
/// error of a rounding boundary it may round the other way, so the bound is half an ulp of
/// the dtype plus the f32 error, not bit equality.
fn check_patched(what: &str, patched: &Tensor, want: &[f64], dtype: DType) {
    let (half_ulp_rel, min_abs) = match dtype {
        DType::F32 => (RTOL, ATOL),
        DType::F16 => (2f64.powi(-11), 2f64.powi(-25)),
        DType::BF16 => (2f64.powi(-8), 2f64.powi(-134)),
        DType::I64 => unreachable!(),
    };
    assert_eq!(patched.dtype(), dtype, "{what}: dtype");
    let f32_err = 1e-6;
    assert_close_by(
        what,
        &patched.to_vec_f32(),
        want,
        patched.shape(),
        |_, w| min_abs + f32_err + half_ulp_rel * w.abs(),
    );
    if dtype != DType::F32 {
        // And the value must be representable, i.e. rounded once to the dtype, and almost
        // always equal to the correctly rounded reference.
        let got = patched.to_vec_f32();
        let off = got
            .iter()
            .zip(want)
            .filter(|&(&g, &w)| g as f64 != round_to(dtype, w))
            .count();
        assert!(
            off * 100 <= got.len(),
            "{what}: {off} of {} values differ from the correctly rounded result",
            got.len()
        );
    }
}

fn bits(t: &Tensor) -> Vec<u32> {
    match t.dtype() {
        DType::F32 => t
            .as_slice::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect(),
        DType::F16 => t
            .as_slice::<half::f16>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits() as u32)
            .collect(),
        DType::BF16 => t
            .as_slice::<half::bf16>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits() as u32)
            .collect(),
        DType::I64 => unreachable!(),
    }
}

#[test]
fn patch_and_restore_every_dtype() {
    // 131 output rows: more than two 64-row blocks of the half-precision patch.
    for (out, inp, rank) in [(37, 13, 4), (131, 29, 8), (5, 3, 1)] {
        for (i, dtype) in FLOAT_DTYPES.into_iter().enumerate() {
            let seed = 10 * (out + i) as u64;
            let (mut w, wv, up, down) = weight_and_adapter(out, inp, rank, dtype, seed);
            let original = bits(&w);
            let scale = 0.75;
            let want = lora_merged_ref(&wv, &f64s(&up), &f64s(&down), rank, scale);
            let backup = w.lora_patch(&up, &down, scale as f32).unwrap();
            assert_eq!(backup.size_in_bytes(), w.size_in_bytes());
            assert_eq!(w.shape(), [out, inp]);
            let what = format!("patch [{out}, {inp}] rank {rank} {dtype:?}");
            check_patched(&what, &w, &want, dtype);
            assert_ne!(bits(&w), original, "{what}: the patch changed nothing");
            w.lora_restore(backup).unwrap();
            assert_eq!(w.dtype(), dtype);
            assert_eq!(bits(&w), original, "{what}: restore is not bit-exact");
        }
    }
}

#[test]
fn patch_with_half_precision_adapter() {
    // The adapter's own values (as stored) enter the product.
    for dtype in [DType::F16, DType::BF16] {
        let (mut w, wv, up32, down32) = weight_and_adapter(37, 13, 3, DType::F32, 50);
        let (up, upv) = stored_as(&up32, dtype);
        let (down, downv) = stored_as(&down32, dtype);
        let want = lora_merged_ref(&wv, &upv, &downv, 3, -1.5);
        w.lora_patch(&up, &down, -1.5).unwrap();
        check_patched(&format!("{dtype:?} adapter"), &w, &want, DType::F32);
    }
}

#[test]
fn stacked_patches_restore_in_reverse() {
    let (mut w, wv, up, down) = weight_and_adapter(37, 13, 4, DType::BF16, 60);
    let (_, _, up2, down2) = weight_and_adapter(37, 13, 2, DType::F32, 61);
    let original = bits(&w);
    let first = w.lora_patch(&up, &down, 1.0).unwrap();
    let after_first = bits(&w);
    let second = w.lora_patch(&up2, &down2, 0.5).unwrap();
    let merged1 = lora_merged_ref(&wv, &f64s(&up), &f64s(&down), 4, 1.0);
    let merged1: Vec<f64> = merged1.iter().map(|&v| round_to(DType::BF16, v)).collect();
    let want = lora_merged_ref(&merged1, &f64s(&up2), &f64s(&down2), 2, 0.5);
    check_patched("two stacked patches", &w, &want, DType::BF16);
    w.lora_restore(second).unwrap();
    assert_eq!(bits(&w), after_first);
    w.lora_restore(first).unwrap();
    assert_eq!(bits(&w), original);
}

#[test]
fn patch_rejects_mismatched_shapes() {
    let (mut w, _, up, down) = weight_and_adapter(37, 13, 4, DType::F16, 70);
    let before = bits(&w);
    assert!(matches!(
        w.lora_patch(&up, &randn(&[5, 13], 71), 1.0),
        Err(Error::Shape { .. })
    ));
    assert!(w.lora_patch(&up, &randn(&[4, 12], 72), 1.0).is_err());
    assert!(w.lora_patch(&randn(&[36, 4], 73), &down, 1.0).is_err());
    assert!(w.lora_patch(&randn(&[37, 4, 1], 74), &down, 1.0).is_err());
    assert_eq!(
        bits(&w),
        before,
        "a rejected patch must leave the weight alone"
    );
    // A backup restores only the weight it came from.
    let backup = w.lora_patch(&up, &down, 1.0).unwrap();
    let mut other = randn(&[13, 37], 75);
    assert!(other.lora_restore(backup).is_err());
}

/// `y0 + sum over segments of s * x down^T up^T` on each segment's rows.
fn segments_ref(
    x: &[f64],
    y0: &[f64],
    (inp, out): (usize, usize),
    segs: &[(std::ops::Range<usize>, &Tensor, &Tensor, f32)],
) -> Vec<f64> {
    let mut y = y0.to_vec();
    for (rows, down, up, scale) in segs {
        let rank = down.shape()[0];
        let (d, u) = (f64s(down), f64s(up));
        for r in rows.clone() {
            let hidden: Vec<f64> = (0..rank)
                .map(|k| (0..inp).map(|i| x[r * inp + i] * d[k * inp + i]).sum())
                .collect();
            for o in 0..out {
                let delta: f64 = (0..rank).map(|k| hidden[k] * u[o * rank + k]).sum();
                y[r * out + o] += *scale as f64 * delta;
            }
        }
    }
    y
}

#[test]
fn segments_match_reference() {
    let (n, inp, out) = (20, 13, 37);
    let x = randn(&[n, inp], 80);
    let y0 = randn(&[n, out], 81);
    let (down_a, up_a) = (randn(&[4, inp], 82), randn(&[out, 4], 83));
    let (down_b, up_b) = (randn(&[1, inp], 84), randn(&[out, 1], 85));
    let (down_h, up_h) = (
        randn(&[3, inp], 86).to_dtype(DType::F16).unwrap(),
        randn(&[out, 3], 87).to_dtype(DType::BF16).unwrap(),
    );
    // Adapter A twice, a rank-1 adapter on one row, rows 8..10 untouched, a half adapter.
    let segs: Vec<(std::ops::Range<usize>, &Tensor, &Tensor, f32)> = vec![
        (0..7, &down_a, &up_a, 1.0),
        (7..8, &down_b, &up_b, -0.5),
        (10..14, &down_h, &up_h, 0.25),
        (14..20, &down_a, &up_a, 2.0),
    ];
    let segments: Vec<LoraSegment<'_>> = segs
        .iter()
        .map(|(rows, down, up, scale)| LoraSegment {
            rows: rows.clone(),
            down,
            up,
            scale: *scale,
        })
        .collect();
    let mut y = y0.clone();
    x.lora_segments(&mut y, &segments).unwrap();
    let want = segments_ref(&f64s(&x), &f64s(&y0), (inp, out), &segs);
    assert_tensor_close("lora_segments", &y, &want, &[n, out]);
    let (yv, y0v) = (y.to_vec_f32(), y0.to_vec_f32());
    assert_bits_eq(
        "untouched rows",
        &yv[8 * out..10 * out],
        &y0v[8 * out..10 * out],
    );
}

#[test]
fn segments_reject_bad_input() {
    let (n, inp, out) = (10, 13, 7);
    let x = randn(&[n, inp], 90);
    let mut y = randn(&[n, out], 91);
    let before = y.to_vec_f32();
    let (down, up) = (randn(&[2, inp], 92), randn(&[out, 2], 93));
    let seg = |rows: std::ops::Range<usize>, down, up| LoraSegment {
        rows,
        down,
        up,
        scale: 1.0,
    };
    let bad_up = randn(&[out, 3], 94);
    assert!(matches!(
        x.lora_segments(&mut y, &[seg(0..n, &down, &bad_up)]),
        Err(Error::Shape { .. })
    ));
    let bad_down = randn(&[2, inp + 1], 95);
    assert!(
        x.lora_segments(&mut y, &[seg(0..n, &bad_down, &up)])
            .is_err()
    );
    assert!(
        x.lora_segments(&mut y, &[seg(0..n + 1, &down, &up)])
            .is_err()
    );
    assert!(
        x.lora_segments(&mut y, &[seg(0..5, &down, &up), seg(4..8, &down, &up)])
            .is_err()
    );
    let mut y_short = randn(&[n - 1, out], 96);
    assert!(
        x.lora_segments(&mut y_short, &[seg(0..5, &down, &up)])
            .is_err()
    );
    assert_bits_eq("y after rejected calls", &y.to_vec_f32(), &before);
}
