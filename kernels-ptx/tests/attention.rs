//! Dense multi-head `Tensor::attention` against an f64 softmax(q k^T / sqrt(d)) v.

mod common;

use common::*;
use retouch_kernels::{Error, Tensor};

fn check(dims: AttnDims, causal: bool, seed: u64) {
    let AttnDims {
        batch,
        lq,
        lk,
        channels,
        heads,
    } = dims;
    let q = randn(&[batch, lq, channels], seed);
    let k = randn(&[batch, lk, channels], seed + 1);
    let v = randn(&[batch, lk, channels], seed + 2);
    let got = Tensor::attention(&q, &k, &v, heads, causal).unwrap();
    let want = attention_ref(&f64s(&q), &f64s(&k), &f64s(&v), dims, causal);
    assert_tensor_close(
        &format!("attention {dims:?} causal={causal}"),
        &got,
        &want,
        &[batch, lq, channels],
    );
}

fn dims(batch: usize, lq: usize, lk: usize, channels: usize, heads: usize) -> AttnDims {
    AttnDims {
        batch,
        lq,
        lk,
        channels,
        heads,
    }
}

#[test]
fn short_self_attention_several_head_counts() {
    for heads in [1, 2, 5, 10] {
        check(dims(2, 7, 7, 40, heads), false, 1);
    }
    check(dims(1, 1, 1, 13, 1), false, 2);
    check(dims(3, 5, 5, 21, 7), false, 3);
    // Head dims that are not a multiple of 8 (13, 3).
    check(dims(2, 7, 9, 26, 2), false, 4);
    check(dims(1, 9, 7, 9, 3), false, 5);
}

#[test]
fn long_sequences_cross_key_blocks() {
    // lq = 300 spans several query blocks of 64, lk = 517 three key blocks of 256.
    check(dims(2, 300, 517, 24, 3), false, 10);
    check(dims(1, 300, 517, 40, 8), false, 11);
    // More than 512 queries per sequence: several parallel tasks per head.
    check(dims(2, 600, 300, 16, 2), false, 12);
}

#[test]
fn cross_attention() {
    // Text conditioning: few keys (77), more queries, and the reverse.
    check(dims(2, 54, 77, 40, 5), false, 20);
    check(dims(1, 130, 77, 16, 2), false, 21);
    check(dims(2, 9, 300, 12, 4), false, 22);
    check(dims(1, 13, 1, 6, 3), false, 23);
}

#[test]
fn causal_self_attention() {
    for heads in [1, 4, 12] {
        check(dims(2, 77, 77, 48, heads), true, 30 + heads as u64);
    }
    // Several query blocks and two key blocks, with a ragged last block.
    check(dims(1, 300, 300, 24, 3), true, 40);
    // Over 512 queries: later tasks must see every key up to their own rows.
    check(dims(2, 600, 600, 8, 2), true, 42);
    check(dims(2, 1, 1, 8, 2), true, 41);
}

#[test]
fn causal_masks_future_keys() {
    // Changing keys/values after position i must not change query i's output.
    let (lq, c) = (70, 8);
    let q = randn(&[1, lq, c], 50);
    let k = randn(&[1, lq, c], 51);
    let v = randn(&[1, lq, c], 52);
    let base = Tensor::attention(&q, &k, &v, 2, true).unwrap().to_vec_f32();
    let mut kv = k.to_vec_f32();
    let mut vv = v.to_vec_f32();
    for x in &mut kv[40 * c..] {
        *x += 10.0;
    }
    for x in &mut vv[40 * c..] {
        *x *= -3.0;
    }
    let k2 = Tensor::from_vec(kv, &[1, lq, c]).unwrap();
    let v2 = Tensor::from_vec(vv, &[1, lq, c]).unwrap();
    let changed = Tensor::attention(&q, &k2, &v2, 2, true)
        .unwrap()
        .to_vec_f32();
    assert_bits_eq(
        "rows before the change",
        &changed[..40 * c],
        &base[..40 * c],
    );
    assert!(
        changed[40 * c..]
            .iter()
            .zip(&base[40 * c..])
            .any(|(a, b)| (a - b).abs() > 1e-3),
        "later rows must see the changed keys"
    );
}

#[test]
fn large_scores_are_stable() {
    // Scores of several hundred: the online softmax must rescale without overflow.
    let dims = dims(1, 65, 300, 16, 2);
    let q = randn_affine(&[1, 65, 16], 60, 8.0, 0.0);
    let k = randn_affine(&[1, 300, 16], 61, 8.0, 0.0);
    let v = randn(&[1, 300, 16], 62);
    let got = Tensor::attention(&q, &k, &v, 2, false).unwrap();
    let want = attention_ref(&f64s(&q), &f64s(&k), &f64s(&v), dims, false);
    // Scores reach ~|q||k|/sqrt(8) ~ 500: their f32 rounding (~3e-5 absolute) moves the
    // softmax weights by that relative amount, hence the looser tolerance.
    assert_tensor_close_tol("large scores", &got, &want, &[1, 65, 16], 1e-4, 1e-4);
}

#[test]
fn rejects_bad_shapes() {
    let q = randn(&[2, 5, 12], 70);
    let k = randn(&[2, 7, 12], 71);
    assert!(matches!(
        Tensor::attention(&q, &k, &k, 5, false),
        Err(Error::Invalid { .. })
    ));
    assert!(Tensor::attention(&q, &k, &k, 0, false).is_err());
    assert!(Tensor::attention(&q, &k, &randn(&[2, 6, 12], 72), 2, false).is_err());
    assert!(
        Tensor::attention(
            &q,
            &randn(&[1, 7, 12], 73),
            &randn(&[1, 7, 12], 74),
            2,
            false
        )
        .is_err()
    );
    assert!(
        Tensor::attention(&q, &randn(&[2, 7, 8], 75), &randn(&[2, 7, 8], 76), 2, false).is_err()
    );
    assert!(Tensor::attention(&randn(&[5, 12], 77), &k, &k, 2, false).is_err());
}
