//! Property tests: the sparse and unmerged paths agree with their dense counterparts.

mod common;

use common::*;
use proptest::prelude::*;
use retouch_kernels::{
    AttentionSegment, Conv2dParams, DType, LoraSegment, MaskedConvSegment, Tensor, TokenSet,
};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 24,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Compares two f32 results (both from the library) with the default tolerances.
fn close(what: &str, got: &Tensor, want: &Tensor) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.shape(), want.shape(), "{}: shape", what);
    let worst = got
        .to_vec_f32()
        .iter()
        .zip(want.to_vec_f32())
        .map(|(&g, w)| {
            (
                (g as f64 - w as f64).abs() / (ATOL + RTOL * (w as f64).abs()),
                g,
                w,
            )
        })
        .fold((0.0f64, 0.0f32, 0.0f32), |a, b| {
            if b.0 > a.0 || b.0.is_nan() { b } else { a }
        });
    prop_assert!(
        worst.0 <= 1.0,
        "{}: got {} want {} (error ratio {})",
        what,
        worst.1,
        worst.2,
        worst.0
    );
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    /// With every input position active and every output requested, the masked convolution
    /// is the dense convolution, whatever the cache holds.
    #[test]
    fn masked_conv_all_active_is_dense(
        h in 1usize..9,
        w in 1usize..9,
        cin in 1usize..8,
        cout in 1usize..8,
        kind in 0usize..4,
        cache_dtype in 0usize..3,
        seed in 0u64..1_000_000,
    ) {
        let (k, params) = [
            (3, Conv2dParams::SAME_3X3),
            (3, Conv2dParams::DOWN_3X3),
            (1, Conv2dParams::POINTWISE),
            (1, Conv2dParams { stride: 2, padding: 0 }),
        ][kind];
        let (weight, _) = random_conv(cout, cin, k, seed.is_multiple_of(2), seed);
        let x = randn(&[1, h, w, cin], seed + 1);
        let dense = x.conv2d(&weight, params).unwrap();
        let (oh, ow) = (dense.shape()[1], dense.shape()[2]);
        let cached = randn(&[h * w, cin], seed + 2)
            .to_dtype(FLOAT_DTYPES[cache_dtype])
            .unwrap();
        let active = TokenSet::full(h, w);
        let outputs = TokenSet::full(oh, ow);
        let fresh = x.clone().reshape(&[h * w, cin]).unwrap();
        let seg = MaskedConvSegment { fresh: &fresh, active: &active, cached: &cached, outputs: &outputs };
        let masked = weight.masked_conv2d(&[seg], params).unwrap();
        close("masked conv, all active", &masked, &dense.reshape(&[oh * ow, cout]).unwrap())?;
    }

    /// With every token active, masked attention is dense self-attention over the fresh
    /// rows: the stale cache is entirely masked out.
    #[test]
    fn masked_attention_all_active_is_dense(
        h in 1usize..8,
        w in 1usize..8,
        heads in 1usize..4,
        head_dim in 1usize..6,
        segments in 1usize..4,
        cache_dtype in 0usize..3,
        seed in 0u64..1_000_000,
    ) {
        let c = heads * head_dim;
        let n = h * w;
        let rows = segments * n;
        let q = randn(&[rows, c], seed);
        let k = randn(&[rows, c], seed + 1);
        let v = randn(&[rows, c], seed + 2);
        let tokens = TokenSet::full(h, w);
        let caches: Vec<(Tensor, Tensor)> = (0..segments as u64)
            .map(|s| {
                let dt = FLOAT_DTYPES[cache_dtype];
                (
                    randn(&[n, c], seed + 10 + 2 * s).to_dtype(dt).unwrap(),
                    randn(&[n, c], seed + 11 + 2 * s).to_dtype(dt).unwrap(),
                )
            })
            .collect();
        let segs: Vec<AttentionSegment<'_>> = caches
            .iter()
            .enumerate()
            .map(|(s, (ck, cv))| AttentionSegment {
                rows: s * n..(s + 1) * n,
                tokens: &tokens,
                cached_k: ck,
                cached_v: cv,
            })
            .collect();
        let masked = Tensor::masked_attention(&q, &k, &v, &segs, heads).unwrap();
        let as_batch = |t: &Tensor| t.clone().reshape(&[segments, n, c]).unwrap();
        let dense = Tensor::attention(&as_batch(&q), &as_batch(&k), &as_batch(&v), heads, false)
            .unwrap()
            .reshape(&[rows, c])
            .unwrap();
        close("masked attention, all active", &masked, &dense)?;
    }

    /// Gathering the active rows and scattering them into another map restores exactly those
    /// rows and leaves every other row of the target alone.
    #[test]
    fn scatter_after_gather_restores_active_rows(
        rows in 1usize..80,
        cols in 1usize..20,
        ratio in 0.0f64..1.0,
        seed in 0u64..1_000_000,
    ) {
        let source = randn(&[rows, cols], seed);
        let index: Vec<u32> = random_mask(rows, ratio, seed + 1)
            .iter()
            .enumerate()
            .filter(|&(_, &m)| m)
            .map(|(i, _)| i as u32)
            .collect();
        let packed = source.gather_rows(&index).unwrap();
        let mut target = randn(&[rows, cols], seed + 2);
        let before = target.to_vec_f32();
        target.scatter_rows(&index, &packed).unwrap();
        let (src, got) = (source.to_vec_f32(), target.to_vec_f32());
        for r in 0..rows {
            let want = if index.contains(&(r as u32)) { &src } else { &before };
            for c in 0..cols {
                prop_assert_eq!(got[r * cols + c].to_bits(), want[r * cols + c].to_bits(), "row {} col {}", r, c);
            }
        }
    }

    /// The merged path (patch the weight, run linear, restore) and the unmerged path (linear
    /// with the base weight, then lora_segments) agree, per segment with its own adapter.
    #[test]
    fn merged_and_unmerged_lora_agree(
        out in 1usize..24,
        inp in 1usize..24,
        rank_a in 1usize..6,
        rank_b in 1usize..6,
        split in 0usize..10,
        n in 1usize..10,
        scale_a in -2.0f32..2.0,
        scale_b in -2.0f32..2.0,
        seed in 0u64..1_000_000,
    ) {
        let split = split.min(n);
        let x = randn(&[n, inp], seed);
        let mut w = randn_affine(&[out, inp], seed + 1, 0.3, 0.0);
        let bias = randn(&[out], seed + 2);
        let (down_a, up_a) = (randn_affine(&[rank_a, inp], seed + 3, 0.3, 0.0), randn_affine(&[out, rank_a], seed + 4, 0.3, 0.0));
        let (down_b, up_b) = (randn_affine(&[rank_b, inp], seed + 5, 0.3, 0.0), randn_affine(&[out, rank_b], seed + 6, 0.3, 0.0));

        // Unmerged: one batch, two segments.
        let mut unmerged = x.linear(&w, Some(&bias)).unwrap();
        let segs = [
            LoraSegment { rows: 0..split, down: &down_a, up: &up_a, scale: scale_a },
            LoraSegment { rows: split..n, down: &down_b, up: &up_b, scale: scale_b },
        ];
        x.lora_segments(&mut unmerged, &segs).unwrap();

        // Merged: each segment's rows through its own patched weight.
        let original: Vec<u32> = w.to_vec_f32().iter().map(|v| v.to_bits()).collect();
        let mut merged = Vec::new();
        for (rows, down, up, scale) in [(0..split, &down_a, &up_a, scale_a), (split..n, &down_b, &up_b, scale_b)] {
            if rows.is_empty() {
                continue;
            }
            let index: Vec<u32> = rows.map(|r| r as u32).collect();
            let xs = x.gather_rows(&index).unwrap();
            let backup = w.lora_patch(up, down, scale).unwrap();
            merged.extend(xs.linear(&w, Some(&bias)).unwrap().to_vec_f32());
            w.lora_restore(backup).unwrap();
            let restored: Vec<u32> = w.to_vec_f32().iter().map(|v| v.to_bits()).collect();
            prop_assert_eq!(&restored, &original, "restore is not bit-exact");
        }
        let merged = Tensor::from_vec(merged, &[n, out]).unwrap();
        close("merged vs unmerged LoRA", &merged, &unmerged)?;
    }
}

#[test]
fn half_weight_merge_matches_unmerged_within_storage_rounding() {
    // A bf16 weight patched in place versus the unmerged path on the same bf16 base (both
    // widened to f32 for the linear): they differ by at most the bf16 rounding of the
    // merged weight, i.e. half a bf16 ulp per weight.
    let (n, inp, out, rank) = (9, 13, 37, 4);
    let x = randn(&[n, inp], 1);
    let w_bf16 = randn_affine(&[out, inp], 2, 0.3, 0.0)
        .to_dtype(DType::BF16)
        .unwrap();
    let (down, up) = (
        randn_affine(&[rank, inp], 3, 0.3, 0.0),
        randn_affine(&[out, rank], 4, 0.3, 0.0),
    );
    let mut patched = w_bf16.clone();
    patched.lora_patch(&up, &down, 0.5).unwrap();
    let merged = x
        .linear(&patched.to_dtype(DType::F32).unwrap(), None)
        .unwrap();
    let mut unmerged = x
        .linear(&w_bf16.to_dtype(DType::F32).unwrap(), None)
        .unwrap();
    x.lora_segments(
        &mut unmerged,
        &[LoraSegment {
            rows: 0..n,
            down: &down,
            up: &up,
            scale: 0.5,
        }],
    )
    .unwrap();
    // Bound: sum_i |x_i| * half-ulp(w'_i) <= 2^-8 * sum_i |x_i| |w'_i| (+ f32 noise).
    let (xv, wv) = (x.to_vec_f32(), patched.to_vec_f32());
    let bound: Vec<f64> = (0..n)
        .flat_map(|r| {
            let (xv, wv) = (&xv, &wv);
            (0..out).map(move |o| {
                (0..inp)
                    .map(|i| (xv[r * inp + i] as f64 * wv[o * inp + i] as f64).abs())
                    .sum::<f64>()
                    * 2f64.powi(-8)
                    * 1.01
            })
        })
        .collect();
    let want = f64s(&unmerged);
    assert_close_by(
        "bf16 merged vs unmerged",
        &merged.to_vec_f32(),
        &want,
        &[n, out],
        |i, _| bound[i] + 1e-5,
    );
}
