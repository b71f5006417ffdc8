//! `Conv2dWeight::masked_conv2d` against a dense f64 convolution of the composite map (fresh
//! rows at active positions, cached rows elsewhere), read at the requested output positions.

mod common;

use common::*;
use retouch_kernels::{Conv2dParams, DType, Error, MaskedConvSegment, Tensor, TokenSet};

const IN: (usize, usize) = (9, 6);
const CIN: usize = 5;
const COUT: usize = 7;

/// One request: its fresh rows, active set, cache (stored in some dtype) and outputs.
struct Request {
    fresh: Tensor,
    active: TokenSet,
    cached: Tensor,
    cached_values: Vec<f64>,
    outputs: TokenSet,
}

impl Request {
    fn new(active: TokenSet, outputs: TokenSet, cache_dtype: DType, seed: u64) -> Request {
        let (h, w) = (active.height(), active.width());
        let fresh = randn(&[active.len(), CIN], seed);
        let cached32 = randn_affine(&[h * w, CIN], seed + 1, 1.0, 0.5);
        let (cached, cached_values) = stored_as(&cached32, cache_dtype);
        Request {
            fresh,
            active,
            cached,
            cached_values,
            outputs,
        }
    }

    fn segment(&self) -> MaskedConvSegment<'_> {
        MaskedConvSegment {
            fresh: &self.fresh,
            active: &self.active,
            cached: &self.cached,
            outputs: &self.outputs,
        }
    }
}

fn output_grid(reference: &ConvRef, p: Conv2dParams) -> (usize, usize) {
    reference.out_size(IN.0, IN.1, p.stride, p.padding)
}

/// Runs the batch and checks every segment's output rows against the f64 reference.
fn check(what: &str, k: usize, p: Conv2dParams, requests: &[Request], seed: u64) {
    let (weight, reference) = random_conv(COUT, CIN, k, seed.is_multiple_of(2), seed);
    let segments: Vec<MaskedConvSegment<'_>> = requests.iter().map(Request::segment).collect();
    let got = weight.masked_conv2d(&segments, p).unwrap();
    let (oh, ow) = output_grid(&reference, p);
    let mut want = Vec::new();
    for r in requests {
        assert_eq!((r.outputs.height(), r.outputs.width()), (oh, ow));
        let map = composite(&r.active, &f64s(&r.fresh), &r.cached_values, CIN);
        let dense = reference.apply(&map, 1, IN, p.stride, p.padding);
        want.extend(rows_ref(&dense, COUT, r.outputs.positions()));
    }
    let rows = requests.iter().map(|r| r.outputs.len()).sum::<usize>();
    assert_tensor_close(what, &got, &want, &[rows, COUT]);
}

/// Kernel size and params of the convolutions the UNet uses.
fn convs() -> [(usize, Conv2dParams); 3] {
    [
        (3, Conv2dParams::SAME_3X3),
        (3, Conv2dParams::DOWN_3X3),
        (1, Conv2dParams::POINTWISE),
    ]
}

fn out_tokens(k: usize, p: Conv2dParams, ratio: f64, seed: u64) -> TokenSet {
    let (oh, ow) = (
        (IN.0 + 2 * p.padding - k) / p.stride + 1,
        (IN.1 + 2 * p.padding - k) / p.stride + 1,
    );
    if ratio >= 1.0 {
        TokenSet::full(oh, ow)
    } else {
        random_tokens(oh, ow, ratio, seed)
    }
}

#[test]
fn mask_ratios_single_segment() {
    let (h, w) = IN;
    let mut seed = 100;
    for dtype in FLOAT_DTYPES {
        for (k, p) in convs() {
            let actives = [
                ("0%", TokenSet::from_positions(h, w, vec![]).unwrap()),
                ("1 token", TokenSet::from_positions(h, w, vec![31]).unwrap()),
                ("~30%", random_tokens(h, w, 0.3, seed)),
                ("100%", TokenSet::full(h, w)),
            ];
            for (name, active) in actives {
                seed += 10;
                let ratio = if name == "100%" { 1.0 } else { 0.5 };
                let outputs = out_tokens(k, p, ratio, seed + 3);
                assert!(!outputs.is_empty());
                let req = Request::new(active, outputs, dtype, seed);
                let what = format!("{name} active, {k}x{k} s{} cache {dtype:?}", p.stride);
                check(&what, k, p, &[req], seed);
            }
        }
    }
}

#[test]
fn ragged_batch_of_segments() {
    let (h, w) = IN;
    let mut seed = 1000;
    for dtype in FLOAT_DTYPES {
        for (k, p) in convs() {
            seed += 10;
            let requests = [
                Request::new(
                    random_tokens(h, w, 0.3, seed),
                    out_tokens(k, p, 0.6, seed + 1),
                    dtype,
                    seed + 2,
                ),
                Request::new(
                    TokenSet::from_positions(h, w, vec![0]).unwrap(),
                    out_tokens(k, p, 0.4, seed + 3),
                    dtype,
                    seed + 4,
                ),
                Request::new(
                    TokenSet::full(h, w),
                    out_tokens(k, p, 1.0, seed + 5),
                    dtype,
                    seed + 6,
                ),
            ];
            let what = format!("ragged x3, {k}x{k} s{} cache {dtype:?}", p.stride);
            check(&what, k, p, &requests, seed);
            // Two segments, one of them with an empty active set.
            let requests = [
                Request::new(
                    TokenSet::from_positions(h, w, vec![]).unwrap(),
                    out_tokens(k, p, 0.5, seed + 7),
                    dtype,
                    seed + 8,
                ),
                Request::new(
                    random_tokens(h, w, 0.7, seed + 9),
                    out_tokens(k, p, 0.5, seed + 11),
                    dtype,
                    seed + 12,
                ),
            ];
            check(
                &format!("ragged x2, {k}x{k} s{} cache {dtype:?}", p.stride),
                k,
                p,
                &requests,
                seed + 1,
            );
        }
    }
}

#[test]
fn larger_map_many_output_rows() {
    // 23 x 17 map, 37 -> 13 channels: several row chunks, fresh rows from every region.
    let (h, w, cin, cout) = (23, 17, 37, 13);
    let (weight, reference) = random_conv(cout, cin, 3, true, 7);
    let active = random_tokens(h, w, 0.35, 8);
    let fresh = randn(&[active.len(), cin], 9);
    let (cached, cv) = stored_as(&randn(&[h * w, cin], 10), DType::BF16);
    let outputs = random_tokens(h, w, 0.8, 11);
    let seg = MaskedConvSegment {
        fresh: &fresh,
        active: &active,
        cached: &cached,
        outputs: &outputs,
    };
    let got = weight
        .masked_conv2d(&[seg], Conv2dParams::SAME_3X3)
        .unwrap();
    let dense = reference.apply(
        &composite(&active, &f64s(&fresh), &cv, cin),
        1,
        (h, w),
        1,
        1,
    );
    let want = rows_ref(&dense, cout, outputs.positions());
    assert_tensor_close("23x17 masked conv", &got, &want, &[outputs.len(), cout]);
}

#[test]
fn cache_is_read_only_at_inactive_positions() {
    // Perturbing the cache at active positions must not change anything: those rows come
    // from the fresh input.
    let (h, w) = IN;
    let active = random_tokens(h, w, 0.4, 20);
    let outputs = TokenSet::full(h, w);
    let fresh = randn(&[active.len(), CIN], 21);
    let cached = randn(&[h * w, CIN], 22);
    let mut poisoned = cached.to_vec_f32();
    for &p in active.positions() {
        for v in &mut poisoned[p as usize * CIN..(p as usize + 1) * CIN] {
            *v = 1e6;
        }
    }
    let poisoned = Tensor::from_vec(poisoned, &[h * w, CIN]).unwrap();
    let (weight, _) = random_conv(COUT, CIN, 3, true, 23);
    let run = |cached: &Tensor| {
        let seg = MaskedConvSegment {
            fresh: &fresh,
            active: &active,
            cached,
            outputs: &outputs,
        };
        weight
            .masked_conv2d(&[seg], Conv2dParams::SAME_3X3)
            .unwrap()
            .to_vec_f32()
    };
    assert_bits_eq(
        "poisoned cache at active positions",
        &run(&poisoned),
        &run(&cached),
    );
}

#[test]
fn empty_batch_and_bad_segments() {
    let (h, w) = IN;
    let (weight, _) = random_conv(COUT, CIN, 3, false, 30);
    let empty = weight.masked_conv2d(&[], Conv2dParams::SAME_3X3).unwrap();
    assert_eq!(empty.shape(), [0, COUT]);

    let active = random_tokens(h, w, 0.3, 31);
    let outputs = TokenSet::full(h, w);
    let fresh = randn(&[active.len(), CIN], 32);
    let cached = randn(&[h * w, CIN], 33);
    let seg = |fresh, cached, outputs| MaskedConvSegment {
        fresh,
        active: &active,
        cached,
        outputs,
    };
    // Fresh rows of the wrong count.
    let short = randn(&[active.len() + 1, CIN], 34);
    assert!(matches!(
        weight.masked_conv2d(&[seg(&short, &cached, &outputs)], Conv2dParams::SAME_3X3),
        Err(Error::Shape { .. })
    ));
    // Cache of the wrong size.
    let small = randn(&[h * w - 1, CIN], 35);
    assert!(
        weight
            .masked_conv2d(&[seg(&fresh, &small, &outputs)], Conv2dParams::SAME_3X3)
            .is_err()
    );
    // Output grid that does not match the stride.
    assert!(
        weight
            .masked_conv2d(&[seg(&fresh, &cached, &outputs)], Conv2dParams::DOWN_3X3)
            .is_err()
    );
    // Caches of different dtypes in one batch.
    let half = cached.to_dtype(DType::F16).unwrap();
    assert!(
        weight
            .masked_conv2d(
                &[seg(&fresh, &cached, &outputs), seg(&fresh, &half, &outputs)],
                Conv2dParams::SAME_3X3
            )
            .is_err()
    );
    // An integer cache.
    let ints = Tensor::from_vec(vec![1i64; h * w * CIN], &[h * w, CIN]).unwrap();
    assert!(
        weight
            .masked_conv2d(&[seg(&fresh, &ints, &outputs)], Conv2dParams::SAME_3X3)
            .is_err()
    );
}
