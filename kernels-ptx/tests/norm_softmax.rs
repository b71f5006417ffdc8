//! Group norm (plain, fused SiLU, split statistics), layer norm and softmax against f64.

mod common;

use common::*;
use retouch_kernels::{Error, GroupStats, Tensor};

#[test]
fn group_norm_several_group_counts() {
    // Offset inputs so that a one-pass variance would lose precision.
    let x = randn_affine(&[2, 5, 7, 12], 1, 1.5, 3.0);
    let gamma = randn(&[12], 2);
    let beta = randn(&[12], 3);
    let xv = f64s(&x);
    for groups in [1, 2, 3, 4, 6, 12] {
        for silu in [false, true] {
            for eps in [1e-5f32, 1e-6] {
                let y = x.group_norm(groups, &gamma, &beta, eps, silu).unwrap();
                let want = group_norm_ref(
                    &xv,
                    2,
                    12,
                    groups,
                    &f64s(&gamma),
                    &f64s(&beta),
                    eps as f64,
                    silu,
                );
                let what = format!("group_norm groups={groups} silu={silu} eps={eps}");
                assert_tensor_close(&what, &y, &want, &[2, 5, 7, 12]);
            }
        }
    }
}

#[test]
fn group_norm_odd_channels_and_shapes() {
    // 37 channels in 1 or 37 groups; a rank-3 [batch, tokens, channels] input; a rank-2 one
    // (one position per sample).
    let x = randn(&[3, 9, 6, 37], 4);
    let gamma = randn(&[37], 5);
    let beta = randn(&[37], 6);
    let (gv, bv) = (f64s(&gamma), f64s(&beta));
    for groups in [1, 37] {
        let y = x.group_norm(groups, &gamma, &beta, 1e-5, true).unwrap();
        let want = group_norm_ref(&f64s(&x), 3, 37, groups, &gv, &bv, 1e-5, true);
        assert_tensor_close(
            &format!("37 ch, {groups} groups"),
            &y,
            &want,
            &[3, 9, 6, 37],
        );
    }
    let x3 = randn(&[2, 13, 15], 7);
    let (g15, b15) = (randn(&[15], 8), randn(&[15], 9));
    let y = x3.group_norm(5, &g15, &b15, 1e-5, false).unwrap();
    let want = group_norm_ref(&f64s(&x3), 2, 15, 5, &f64s(&g15), &f64s(&b15), 1e-5, false);
    assert_tensor_close("rank-3 group_norm", &y, &want, &[2, 13, 15]);

    let x2 = randn(&[3, 15], 10);
    let y = x2.group_norm(3, &g15, &b15, 1e-5, false).unwrap();
    let want = group_norm_ref(&f64s(&x2), 3, 15, 3, &f64s(&g15), &f64s(&b15), 1e-5, false);
    assert_tensor_close("rank-2 group_norm", &y, &want, &[3, 15]);
}

#[test]
fn group_norm_large_map() {
    // More positions than one accumulation block (64 rows) and one parallel block.
    let x = randn_affine(&[2, 64, 48, 32], 11, 2.0, -1.0);
    let gamma = randn(&[32], 12);
    let beta = randn(&[32], 13);
    let y = x.group_norm(8, &gamma, &beta, 1e-6, true).unwrap();
    let want = group_norm_ref(&f64s(&x), 2, 32, 8, &f64s(&gamma), &f64s(&beta), 1e-6, true);
    assert_tensor_close("group_norm 64x48x32", &y, &want, &[2, 64, 48, 32]);
}

#[test]
fn eps_matters_for_low_variance_inputs() {
    // Variance ~1e-5, comparable to eps: an eps added in the wrong place (or forgotten)
    // changes the output by tens of percent.
    let x = randn_affine(&[2, 5, 7, 12], 70, 3e-3, 0.1);
    let (gamma, beta) = (randn(&[12], 71), randn(&[12], 72));
    for eps in [1e-5f32, 1e-6] {
        let y = x.group_norm(3, &gamma, &beta, eps, false).unwrap();
        let want = group_norm_ref(
            &f64s(&x),
            2,
            12,
            3,
            &f64s(&gamma),
            &f64s(&beta),
            eps as f64,
            false,
        );
        assert_tensor_close(
            &format!("low-variance group_norm eps={eps}"),
            &y,
            &want,
            &[2, 5, 7, 12],
        );
        let y = x.layer_norm(&gamma, &beta, eps).unwrap();
        let want = layer_norm_ref(&f64s(&x), &f64s(&gamma), &f64s(&beta), eps as f64);
        // A per-row f32 variance of values ~3e-3 around 0.1 carries ~1e-5 relative error
        // into rstd when var ~ eps (the mean is only known to f32 precision, ~1e-8 absolute,
        // against deviations of ~3e-3), hence 1e-4 relative here.
        assert_tensor_close_tol(
            &format!("low-variance layer_norm eps={eps}"),
            &y,
            &want,
            &[2, 5, 7, 12],
            1e-4,
            1e-5,
        );
    }
}

#[test]
fn group_norm_stats_then_apply_to_another_map() {
    let template = randn_affine(&[2, 9, 6, 12], 14, 0.7, 0.5);
    let edited = randn_affine(&[2, 9, 6, 12], 15, 1.3, -0.2);
    let gamma = randn(&[12], 16);
    let beta = randn(&[12], 17);
    let groups = 4;
    let stats = template.group_norm_stats(groups, 1e-5).unwrap();
    let want_stats = group_stats_ref(&f64s(&template), 2, 12, groups, 1e-5);
    assert_eq!(stats.len(), 2 * groups);
    for (i, (s, &(mean, rstd))) in stats.iter().zip(&want_stats).enumerate() {
        assert!(
            (s.mean as f64 - mean).abs() <= ATOL + RTOL * mean.abs(),
            "stats {i}: mean {} vs {mean}",
            s.mean
        );
        assert!(
            (s.rstd as f64 - rstd).abs() <= RTOL * rstd,
            "stats {i}: rstd {} vs {rstd}",
            s.rstd
        );
    }
    for silu in [false, true] {
        let y = edited
            .group_norm_with_stats(&stats, groups, &gamma, &beta, silu)
            .unwrap();
        let want = group_norm_apply_ref(
            &f64s(&edited),
            2,
            12,
            groups,
            &want_stats,
            &f64s(&gamma),
            &f64s(&beta),
            silu,
        );
        assert_tensor_close(
            &format!("with template stats, silu={silu}"),
            &y,
            &want,
            &[2, 9, 6, 12],
        );
    }
    // Statistics of the map itself reproduce plain group norm exactly.
    let own = edited.group_norm_stats(groups, 1e-5).unwrap();
    let a = edited
        .group_norm_with_stats(&own, groups, &gamma, &beta, true)
        .unwrap();
    let b = edited
        .group_norm(groups, &gamma, &beta, 1e-5, true)
        .unwrap();
    assert_bits_eq(
        "stats + apply == group_norm",
        &a.to_vec_f32(),
        &b.to_vec_f32(),
    );
}

#[test]
fn group_norm_rejects_bad_arguments() {
    let x = randn(&[2, 5, 7, 12], 18);
    let (g, b) = (randn(&[12], 19), randn(&[12], 20));
    assert!(matches!(
        x.group_norm(5, &g, &b, 1e-5, false),
        Err(Error::Invalid { .. })
    ));
    assert!(x.group_norm(0, &g, &b, 1e-5, false).is_err());
    assert!(x.group_norm(4, &randn(&[11], 21), &b, 1e-5, false).is_err());
    let stats = x.group_norm_stats(4, 1e-5).unwrap();
    assert!(
        x.group_norm_with_stats(&stats[..7], 4, &g, &b, false)
            .is_err()
    );
    assert!(randn(&[12], 22).group_norm(4, &g, &b, 1e-5, false).is_err());
}

#[test]
fn layer_norm_matches_reference() {
    for (shape, seed) in [(vec![3, 5, 37], 30u64), (vec![13], 31), (vec![300, 7], 32)] {
        let c = *shape.last().unwrap();
        let x = randn_affine(&shape, seed, 2.0, 0.75);
        let gamma = randn(&[c], seed + 1);
        let beta = randn(&[c], seed + 2);
        let y = x.layer_norm(&gamma, &beta, 1e-5).unwrap();
        let want = layer_norm_ref(&f64s(&x), &f64s(&gamma), &f64s(&beta), 1e-5);
        assert_tensor_close(&format!("layer_norm {shape:?}"), &y, &want, &shape);
    }
    let x = randn(&[4, 6], 33);
    assert!(
        x.layer_norm(&randn(&[5], 34), &randn(&[6], 35), 1e-5)
            .is_err()
    );
}

#[test]
fn softmax_matches_reference() {
    for (shape, scale, seed) in [
        (vec![5, 37], 1.0f32, 40u64),
        (vec![2, 3, 13], 4.0, 41),
        (vec![7], 1.0, 42),
        (vec![3, 1], 1.0, 43),
        (vec![4, 517], 3.0, 44),
    ] {
        let x = randn_affine(&shape, seed, scale, 0.0);
        let len = *shape.last().unwrap();
        let y = x.softmax_last_dim().unwrap();
        assert_tensor_close(
            &format!("softmax {shape:?}"),
            &y,
            &softmax_ref(&f64s(&x), len),
            &shape,
        );
    }
}

#[test]
fn softmax_large_magnitudes() {
    // Rows around +1e4 and -1e4, a row with spread of 1e3 (most entries underflow), and huge
    // values: subtracting the max keeps them finite.
    let mut data = Vec::new();
    data.extend(randn_affine(&[13], 50, 30.0, 1e4).to_vec_f32());
    data.extend(randn_affine(&[13], 51, 30.0, -1e4).to_vec_f32());
    data.extend(randn_affine(&[13], 52, 1e3, 0.0).to_vec_f32());
    let mut huge = randn_affine(&[13], 53, 1e36, 0.0).to_vec_f32();
    huge[5] = 3e38;
    huge[6] = -3e38;
    data.extend(huge);
    let x = Tensor::from_vec(data, &[4, 13]).unwrap();
    let y = x.softmax_last_dim().unwrap();
    let got = y.to_vec_f32();
    assert!(
        got.iter().all(|v| v.is_finite()),
        "non-finite softmax output"
    );
    assert_tensor_close("softmax large", &y, &softmax_ref(&f64s(&x), 13), &[4, 13]);
}

#[test]
fn softmax_masked_entries() {
    // -inf entries get probability 0; a fully masked row is defined as zeros.
    let mut v = randn(&[3, 7], 60).to_vec_f32();
    v[1] = f32::NEG_INFINITY;
    v[4] = f32::NEG_INFINITY;
    for x in &mut v[14..21] {
        *x = f32::NEG_INFINITY;
    }
    let x = Tensor::from_vec(v, &[3, 7]).unwrap();
    let y = x.softmax_last_dim().unwrap();
    assert_tensor_close("softmax masked", &y, &softmax_ref(&f64s(&x), 7), &[3, 7]);
}

#[test]
fn ragged_group_norm_uses_each_samples_statistics() {
    // Three samples of 5, 0 and 17 rows stacked, each with its own statistics.
    let (c, groups) = (12, 4);
    let sample_rows = [5usize, 0, 17];
    let x = randn_affine(&[22, c], 40, 1.5, 0.5);
    let (gamma, beta) = (randn(&[c], 41), randn(&[c], 42));
    let stats: Vec<GroupStats> = (0..3 * groups)
        .map(|i| GroupStats {
            mean: 0.1 * i as f32 - 0.4,
            rstd: 0.5 + 0.05 * i as f32,
        })
        .collect();
    for silu in [false, true] {
        let got = x
            .group_norm_with_stats_ragged(&sample_rows, &stats, groups, &gamma, &beta, silu)
            .unwrap();
        let xf = f64s(&x);
        let mut at = 0;
        for (i, &n) in sample_rows.iter().enumerate() {
            let s: Vec<(f64, f64)> = stats[i * groups..(i + 1) * groups]
                .iter()
                .map(|s| (s.mean as f64, s.rstd as f64))
                .collect();
            let want = group_norm_apply_ref(
                &xf[at * c..(at + n) * c],
                1,
                c,
                groups,
                &s,
                &f64s(&gamma),
                &f64s(&beta),
                silu,
            );
            assert_close(
                &format!("sample {i}, silu={silu}"),
                &got.to_vec_f32()[at * c..(at + n) * c],
                &want,
                &[n, c],
                1e-5,
                1e-5,
            );
            at += n;
        }
    }
    // Equal lengths give exactly the batched op.
    let batched = randn(&[2, 9, c], 43);
    let stats2 = batched.group_norm_stats(groups, 1e-5).unwrap();
    let a = batched
        .group_norm_with_stats(&stats2, groups, &gamma, &beta, true)
        .unwrap();
    let b = batched
        .group_norm_with_stats_ragged(&[9, 9], &stats2, groups, &gamma, &beta, true)
        .unwrap();
    assert_bits_eq("ragged == batched", &a.to_vec_f32(), &b.to_vec_f32());
    // Rows that do not add up, or statistics of the wrong count, are refused.
    assert!(
        x.group_norm_with_stats_ragged(&[5, 16], &stats[..8], groups, &gamma, &beta, false)
            .is_err()
    );
    assert!(
        x.group_norm_with_stats_ragged(&[5, 17], &stats, groups, &gamma, &beta, false)
            .is_err()
    );
    assert!(
        x.group_norm_with_stats_ragged(&[22], &stats, 5, &gamma, &beta, false)
            .is_err()
    );
}

/// A template map with its active positions replaced by fresh rows: the blended statistics
/// (from the template's statistics, its per-position moments at the active positions and
/// the fresh rows) must be the plain statistics of that map, whatever the mask covers.
#[test]
fn blended_group_stats_are_the_stats_of_the_blended_map() {
    use retouch_kernels::DType;
    let (h, w, channels, groups) = (7, 9, 20, 5);
    let eps = 1e-5;
    let template = randn_affine(&[1, h * w, channels], 31, 0.8, 1.7);
    let stats = template.group_norm_stats(groups, eps).unwrap();
    let moments = template.group_position_moments(groups, &stats).unwrap();
    assert_eq!(moments.shape(), [1, h * w, groups * 2]);
    let moments = moments.reshape(&[h * w, groups * 2]).unwrap();
    for (ratio, seed) in [(0.05, 1), (0.3, 2), (0.7, 3), (1.0, 4)] {
        let tokens = random_tokens(h, w, ratio, seed);
        let active = tokens.len();
        if active == 0 {
            continue;
        }
        // Fresh rows from another distribution, so the blend moves the statistics.
        let fresh = randn_affine(&[active, channels], 40 + seed, 1.9, -0.6);
        let mut blended = f64s(&template);
        let fresh64 = f64s(&fresh);
        for (row, &p) in tokens.positions().iter().enumerate() {
            let p = p as usize;
            blended[p * channels..(p + 1) * channels]
                .copy_from_slice(&fresh64[row * channels..(row + 1) * channels]);
        }
        let want = group_stats_ref(&blended, 1, channels, groups, eps as f64);
        for dtype in [DType::F32, DType::F16] {
            let stored = moments.to_dtype(dtype).unwrap();
            let got = fresh
                .blended_group_stats(&stats, &stored, tokens.positions(), eps)
                .unwrap();
            // f16 moments carry ~1e-3 relative error per position, a fraction of the
            // statistics' scale once summed over the positions.
            let tol = if dtype == DType::F16 { 2e-3 } else { 1e-5 };
            for (g, (s, &(mean, rstd))) in got.iter().zip(&want).enumerate() {
                assert!(
                    (s.mean as f64 - mean).abs() <= tol * (1.0 + mean.abs()),
                    "ratio {ratio} {dtype:?} group {g}: mean {} vs {mean}",
                    s.mean
                );
                assert!(
                    (s.rstd as f64 - rstd).abs() <= tol * rstd,
                    "ratio {ratio} {dtype:?} group {g}: rstd {} vs {rstd}",
                    s.rstd
                );
            }
        }
    }
    // Fresh rows equal to the template's give back the template's statistics.
    let tokens = random_tokens(h, w, 0.4, 9);
    let same = template
        .reshape(&[h * w, channels])
        .unwrap()
        .gather_rows(tokens.positions())
        .unwrap();
    let got = same
        .blended_group_stats(&stats, &moments, tokens.positions(), eps)
        .unwrap();
    for (s, t) in got.iter().zip(&stats) {
        assert!((s.mean - t.mean).abs() <= 1e-5 * (1.0 + t.mean.abs()));
        assert!((s.rstd - t.rstd).abs() <= 1e-5 * t.rstd);
    }
}

#[test]
fn blended_group_stats_reject_mismatched_moments() {
    let fresh = randn(&[4, 8], 1);
    let template = randn(&[1, 10, 8], 2);
    let stats = template.group_norm_stats(2, 1e-5).unwrap();
    let moments = randn(&[10, 4], 3);
    let wrong = randn(&[10, 3], 4);
    assert!(
        fresh
            .blended_group_stats(&stats, &wrong, &[0, 1, 2, 3], 1e-5)
            .is_err()
    );
    // Four rows need four positions, each inside the map.
    assert!(
        fresh
            .blended_group_stats(&stats, &moments, &[0, 1, 2], 1e-5)
            .is_err()
    );
    assert!(
        fresh
            .blended_group_stats(&stats, &moments, &[0, 1, 2, 10], 1e-5)
            .is_err()
    );
    assert!(
        fresh
            .blended_group_stats(&stats, &moments, &[0, 1, 2, 9], 1e-5)
            .is_ok()
    );
    assert!(template.group_position_moments(3, &stats).is_err());
}
