//! Dense multi-head `Tensor::attention` against an f64 softmax(q k^T / sqrt(d)) v.

mod common;

use common::*;
use retouch_kernels::{Error, RaggedSegment, Tensor};

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

#[test]
fn ragged_attention_matches_each_sequence_alone() {
    // Three sequences of different query and key lengths (one longer than a task of 1024
    // queries, one with keys shared with another), packed into one call.
    let (c, heads) = (24, 3);
    let spans = [(5usize, 0usize, 7usize), (1100, 7, 77), (40, 0, 7)];
    let rows: usize = spans.iter().map(|s| s.0).sum();
    let q = randn(&[rows, c], 80);
    let k = randn(&[77, c], 81);
    let v = randn(&[77, c], 82);
    let mut segments = Vec::new();
    let mut at = 0;
    for &(n, k0, k1) in &spans {
        segments.push(RaggedSegment {
            queries: at..at + n,
            keys: k0..k1,
        });
        at += n;
    }
    let got = Tensor::ragged_attention(&q, &k, &v, &segments, heads)
        .unwrap()
        .to_vec_f32();
    let (qf, kf, vf) = (f64s(&q), f64s(&k), f64s(&v));
    for s in &segments {
        let lk = s.keys.len();
        let want = attention_ref(
            &qf[s.queries.start * c..s.queries.end * c],
            &kf[s.keys.start * c..s.keys.end * c],
            &vf[s.keys.start * c..s.keys.end * c],
            dims(1, s.queries.len(), lk, c, heads),
            false,
        );
        assert_close(
            &format!("ragged segment {s:?}"),
            &got[s.queries.start * c..s.queries.end * c],
            &want,
            &[s.queries.len(), c],
            1e-5,
            1e-5,
        );
    }
    // Packing changes nothing: each sequence alone through the dense op gives the same bits.
    for s in &segments {
        let alone = |t: &Tensor, r: &std::ops::Range<usize>| {
            Tensor::from_vec(
                t.to_vec_f32()[r.start * c..r.end * c].to_vec(),
                &[1, r.len(), c],
            )
            .unwrap()
        };
        let dense = Tensor::attention(
            &alone(&q, &s.queries),
            &alone(&k, &s.keys),
            &alone(&v, &s.keys),
            heads,
            false,
        )
        .unwrap();
        assert_bits_eq(
            "ragged == dense per sequence",
            &got[s.queries.start * c..s.queries.end * c],
            &dense.to_vec_f32(),
        );
    }
}

#[test]
fn ragged_attention_rejects_bad_segments() {
    let q = randn(&[10, 12], 90);
    let k = randn(&[6, 12], 91);
    let seg = |queries: std::ops::Range<usize>, keys: std::ops::Range<usize>| RaggedSegment {
        queries,
        keys,
    };
    let ok = Tensor::ragged_attention(&q, &k, &k, &[seg(0..4, 0..6), seg(4..10, 2..3)], 2);
    assert!(ok.is_ok());
    for bad in [
        vec![seg(0..11, 0..6)],
        vec![seg(0..4, 0..7)],
        vec![seg(0..4, 0..6), seg(3..5, 0..6)],
        vec![seg(0..4, 3..3)],
    ] {
        assert!(
            Tensor::ragged_attention(&q, &k, &k, &bad, 2).is_err(),
            "{bad:?}"
        );
    }
    assert!(Tensor::ragged_attention(&q, &k, &k, &[seg(0..4, 0..6)], 5).is_err());
    let k8 = randn(&[6, 8], 92);
    assert!(Tensor::ragged_attention(&q, &k8, &k8, &[seg(0..4, 0..6)], 2).is_err());
    assert!(Tensor::ragged_attention(&q, &k, &randn(&[5, 12], 93), &[], 2).is_err());
}
