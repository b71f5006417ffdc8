//! `Tensor::masked_attention` against dense f64 attention of each request's active queries
//! over its composite K/V (fresh rows at active positions, cached rows elsewhere).

mod common;

use std::ops::Range;

use common::*;
use retouch_kernels::{AttentionSegment, DType, Error, Tensor, TokenSet};

/// One request's token set and its cached K/V (stored in some dtype, and as f64).
struct Request {
    tokens: TokenSet,
    cached_k: Tensor,
    cached_v: Tensor,
    k_values: Vec<f64>,
    v_values: Vec<f64>,
}

impl Request {
    fn new(tokens: TokenSet, c: usize, dtype: DType, seed: u64) -> Request {
        let n = tokens.grid_len();
        let (cached_k, k_values) = stored_as(&randn(&[n, c], seed), dtype);
        let (cached_v, v_values) = stored_as(&randn_affine(&[n, c], seed + 1, 1.0, 0.25), dtype);
        Request {
            tokens,
            cached_k,
            cached_v,
            k_values,
            v_values,
        }
    }
}

/// The packed fresh inputs of a batch.
struct Batch {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ranges: Vec<Range<usize>>,
}

impl Batch {
    fn new(requests: &[Request], c: usize, seed: u64) -> Batch {
        let mut ranges = Vec::new();
        let mut start = 0;
        for r in requests {
            ranges.push(start..start + r.tokens.len());
            start += r.tokens.len();
        }
        Batch {
            q: randn(&[start, c], seed),
            k: randn(&[start, c], seed + 1),
            v: randn(&[start, c], seed + 2),
            ranges,
        }
    }

    fn segments<'a>(&self, requests: &'a [Request]) -> Vec<AttentionSegment<'a>> {
        requests
            .iter()
            .zip(&self.ranges)
            .map(|(r, rows)| AttentionSegment {
                rows: rows.clone(),
                tokens: &r.tokens,
                cached_k: &r.cached_k,
                cached_v: &r.cached_v,
            })
            .collect()
    }

    fn reference(&self, requests: &[Request], c: usize, heads: usize) -> Vec<f64> {
        let (q, k, v) = (f64s(&self.q), f64s(&self.k), f64s(&self.v));
        let mut out = Vec::new();
        for (r, rows) in requests.iter().zip(&self.ranges) {
            let fresh = |x: &[f64]| x[rows.start * c..rows.end * c].to_vec();
            let keys = composite(&r.tokens, &fresh(&k), &r.k_values, c);
            let values = composite(&r.tokens, &fresh(&v), &r.v_values, c);
            let dims = AttnDims {
                batch: 1,
                lq: rows.len(),
                lk: r.tokens.grid_len(),
                channels: c,
                heads,
            };
            out.extend(attention_ref(&fresh(&q), &keys, &values, dims, false));
        }
        out
    }
}

fn check(what: &str, requests: &[Request], c: usize, heads: usize, seed: u64) {
    let batch = Batch::new(requests, c, seed);
    let segments = batch.segments(requests);
    let got = Tensor::masked_attention(&batch.q, &batch.k, &batch.v, &segments, heads).unwrap();
    let want = batch.reference(requests, c, heads);
    assert_tensor_close(what, &got, &want, batch.q.shape());
}

#[test]
fn single_segment_mask_ratios() {
    let c = 12;
    let mut seed = 10;
    for dtype in FLOAT_DTYPES {
        for heads in [1, 3, 4] {
            for (name, tokens) in [
                ("1 token", TokenSet::from_positions(9, 6, vec![17]).unwrap()),
                ("~30%", random_tokens(9, 6, 0.3, seed)),
                ("100%", TokenSet::full(9, 6)),
            ] {
                seed += 10;
                let req = [Request::new(tokens, c, dtype, seed)];
                check(
                    &format!("{name}, {heads} heads, {dtype:?}"),
                    &req,
                    c,
                    heads,
                    seed + 5,
                );
            }
        }
    }
}

#[test]
fn ragged_batch_of_segments() {
    let c = 12;
    let mut seed = 1000;
    for dtype in FLOAT_DTYPES {
        for heads in [1, 2, 3] {
            seed += 20;
            let requests = [
                Request::new(random_tokens(9, 6, 0.3, seed), c, dtype, seed + 1),
                Request::new(
                    TokenSet::from_positions(5, 7, vec![34]).unwrap(),
                    c,
                    dtype,
                    seed + 3,
                ),
                // Empty active set: contributes no rows and must not disturb its neighbours.
                Request::new(
                    TokenSet::from_positions(4, 4, vec![]).unwrap(),
                    c,
                    dtype,
                    seed + 5,
                ),
                Request::new(TokenSet::full(4, 5), c, dtype, seed + 7),
                Request::new(random_tokens(6, 6, 0.6, seed + 9), c, dtype, seed + 10),
            ];
            check(
                &format!("ragged x5, {heads} heads, {dtype:?}"),
                &requests,
                c,
                heads,
                seed + 12,
            );
        }
    }
}

#[test]
fn long_segments_cross_blocks() {
    // A 20x17 grid (340 keys: two key blocks of 256) with ~30% active (over 64 queries: two
    // query blocks), next to a 1-token request, for each cache dtype.
    let c = 16;
    for (i, dtype) in FLOAT_DTYPES.into_iter().enumerate() {
        let seed = 5000 + 100 * i as u64;
        let requests = [
            Request::new(
                TokenSet::from_positions(3, 3, vec![4]).unwrap(),
                c,
                dtype,
                seed,
            ),
            Request::new(random_tokens(20, 17, 0.3, seed + 1), c, dtype, seed + 2),
            Request::new(random_tokens(20, 17, 0.9, seed + 3), c, dtype, seed + 4),
            // Over 512 active queries: several parallel tasks for one request.
            Request::new(random_tokens(30, 26, 0.8, seed + 6), c, dtype, seed + 7),
        ];
        assert!(requests[3].tokens.len() > 512);
        assert!(requests[1].tokens.len() > 64);
        check(
            &format!("long segments, {dtype:?}"),
            &requests,
            c,
            4,
            seed + 5,
        );
    }
}

#[test]
fn stale_cache_rows_of_active_tokens_are_ignored() {
    // The cache's copy of an active token must be masked out: poison it with huge keys.
    let c = 8;
    let tokens = random_tokens(9, 6, 0.4, 1);
    let req = Request::new(tokens.clone(), c, DType::F32, 2);
    let batch = Batch::new(std::slice::from_ref(&req), c, 3);
    let mut k = req.cached_k.to_vec_f32();
    let mut v = req.cached_v.to_vec_f32();
    for &p in tokens.positions() {
        let row = p as usize * c..(p as usize + 1) * c;
        k[row.clone()].iter_mut().for_each(|x| *x = 50.0);
        v[row].iter_mut().for_each(|x| *x = -1e3);
    }
    let poisoned = Request {
        cached_k: Tensor::from_vec(k, &[54, c]).unwrap(),
        cached_v: Tensor::from_vec(v, &[54, c]).unwrap(),
        ..req
    };
    let reqs = [poisoned];
    let got =
        Tensor::masked_attention(&batch.q, &batch.k, &batch.v, &batch.segments(&reqs), 2).unwrap();
    // The reference replaces those rows with the fresh ones, so the poison never enters it.
    let want = batch.reference(&reqs, c, 2);
    assert_tensor_close("poisoned stale rows", &got, &want, batch.q.shape());
}

#[test]
fn rejects_bad_segments() {
    let c = 12;
    let tokens = random_tokens(9, 6, 0.3, 40);
    let n = tokens.len();
    let req = Request::new(tokens.clone(), c, DType::F32, 41);
    let q = randn(&[n, c], 42);
    let seg = |rows: Range<usize>,
               k: &'_ Tensor,
               v: &'_ Tensor|
     -> Vec<(Range<usize>, Tensor, Tensor)> { vec![(rows, k.clone(), v.clone())] };
    let run = |segs: Vec<(Range<usize>, Tensor, Tensor)>, heads: usize| {
        let segments: Vec<AttentionSegment<'_>> = segs
            .iter()
            .map(|(rows, k, v)| AttentionSegment {
                rows: rows.clone(),
                tokens: &tokens,
                cached_k: k,
                cached_v: v,
            })
            .collect();
        Tensor::masked_attention(&q, &q, &q, &segments, heads)
    };
    assert!(run(seg(0..n, &req.cached_k, &req.cached_v), 3).is_ok());
    assert!(matches!(
        run(seg(0..n, &req.cached_k, &req.cached_v), 5),
        Err(Error::Invalid { .. })
    ));
    assert!(
        run(seg(0..n - 1, &req.cached_k, &req.cached_v), 3).is_err(),
        "row count"
    );
    assert!(
        run(seg(1..n + 1, &req.cached_k, &req.cached_v), 3).is_err(),
        "past the end"
    );
    let short = randn(&[53, c], 43);
    assert!(
        run(seg(0..n, &short, &req.cached_v), 3).is_err(),
        "cache size"
    );
    let half = req.cached_v.to_dtype(DType::F16).unwrap();
    assert!(
        run(seg(0..n, &req.cached_k, &half), 3).is_err(),
        "mixed dtypes"
    );
    // Overlapping segments.
    let mut two = seg(0..n, &req.cached_k, &req.cached_v);
    two.extend(seg(0..n, &req.cached_k, &req.cached_v));
    assert!(run(two, 3).is_err(), "overlap");
    // Fresh K of another shape.
    let segments = [AttentionSegment {
        rows: 0..n,
        tokens: &tokens,
        cached_k: &req.cached_k,
        cached_v: &req.cached_v,
    }];
    let k_bad = randn(&[n, c + 1], 44);
    assert!(Tensor::masked_attention(&q, &k_bad, &q, &segments, 3).is_err());
}
