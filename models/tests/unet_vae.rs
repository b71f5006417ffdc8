//! UNet2DConditionModel against diffusers, on the fixtures of `tools/fixtures/unet_vae.py`.

use std::path::PathBuf;

use retouch_kernels::{SafeTensorsFile, Tensor};
use retouch_models::unet::UNet;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// |got - want| <= 1e-4 * (|want| + mean |want|): relative error at most 1e-4, measured
/// against the output's scale where individual values pass near zero.
fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let (g, w) = (got.to_vec_f32(), want.to_vec_f32());
    let scale = w.iter().map(|v| v.abs()).sum::<f32>() / w.len() as f32;
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * (b.abs() + scale),
            "{what}: element {i} is {a}, diffusers gives {b}"
        );
    }
}

fn check_unet(name: &str) {
    let dir = fixture(name);
    let unet = UNet::load(&dir, None).unwrap();
    let io = SafeTensorsFile::open(dir.join("io.safetensors")).unwrap();
    let sample = io.get("sample").unwrap().nchw_to_nhwc().unwrap();
    let timesteps = io.get("timestep").unwrap().to_vec_f32();
    let context = io.get("encoder_hidden_states").unwrap();
    let out = unet.forward(&sample, &timesteps, &context).unwrap();
    let want = io.get("out.sample").unwrap();
    assert_close(name, &out.nhwc_to_nchw().unwrap(), &want);
}

#[test]
fn sd1_like_unet_matches_diffusers() {
    check_unet("unet-sd1");
}

#[test]
fn sd2_like_unet_matches_diffusers() {
    check_unet("unet-sd2");
}

#[test]
fn bad_inputs_are_errors() {
    let unet = UNet::load(fixture("unet-sd1"), None).unwrap();
    let context = Tensor::zeros(&[1, 7, 16], retouch_kernels::DType::F32, Default::default());
    let odd = Tensor::zeros(
        &[1, 6, 6, 4],
        retouch_kernels::DType::F32,
        Default::default(),
    );
    let err = unet
        .forward(&odd, &[1.0], &context)
        .unwrap_err()
        .to_string();
    assert!(err.contains("divisible"), "{err}");
    let ok = Tensor::zeros(
        &[1, 8, 8, 4],
        retouch_kernels::DType::F32,
        Default::default(),
    );
    let err = unet
        .forward(&ok, &[1.0, 2.0], &context)
        .unwrap_err()
        .to_string();
    assert!(err.contains("timesteps"), "{err}");
}

#[test]
fn vae_matches_diffusers() {
    use retouch_models::vae::Vae;
    let dir = fixture("vae");
    let vae = Vae::load(&dir, None).unwrap();
    let io = SafeTensorsFile::open(dir.join("io.safetensors")).unwrap();
    let image = io.get("sample").unwrap().nchw_to_nhwc().unwrap();
    let mean = vae.encode_mean(&image).unwrap().nhwc_to_nchw().unwrap();
    assert_close("vae encode", &mean, &io.get("out.latent_mean").unwrap());
    let latents = io.get("latent_sample").unwrap().nchw_to_nhwc().unwrap();
    let decoded = vae.decode(&latents).unwrap().nhwc_to_nchw().unwrap();
    assert_close("vae decode", &decoded, &io.get("out.sample").unwrap());
}

/// The masked tests' inputs: the fixture's sample (channels-last), timesteps and context.
fn masked_inputs(dir: &std::path::Path) -> (Tensor, Vec<f32>, Tensor) {
    let io = SafeTensorsFile::open(dir.join("io.safetensors")).unwrap();
    (
        io.get("sample").unwrap().nchw_to_nhwc().unwrap(),
        io.get("timestep").unwrap().to_vec_f32(),
        io.get("encoder_hidden_states").unwrap(),
    )
}

mod masked {
    use super::*;
    use retouch_kernels::DType;
    use retouch_models::unet::token_levels;

    /// Rows of a `[batch, h, w, c]` map at the given positions: `[batch, n, c]`.
    fn rows_at(map: &Tensor, positions: &[u32]) -> Tensor {
        let s = map.shape().to_vec();
        let (b, c) = (s[0], s[3]);
        let parts: Vec<Tensor> = map
            .split_batch(&vec![1; b])
            .unwrap()
            .into_iter()
            .map(|t| {
                t.reshape(&[s[1] * s[2], c])
                    .unwrap()
                    .gather_rows(positions)
                    .unwrap()
            })
            .collect();
        let refs: Vec<&Tensor> = parts.iter().collect();
        Tensor::concat_batch(&refs)
            .unwrap()
            .reshape(&[b, positions.len(), c])
            .unwrap()
    }

    fn check(name: &str, mask: impl Fn(usize, usize) -> bool, dtype: DType, rel: f32) {
        let dir = fixture(name);
        let unet = UNet::load(&dir, None).unwrap();
        let (sample, t, ctx) = masked_inputs(&dir);
        let (h, w) = (sample.shape()[1], sample.shape()[2]);
        let dense = unet.forward(&sample, &t, &ctx).unwrap();
        let (recorded, cache) = unet.forward_recording(&sample, &t, &ctx, dtype).unwrap();
        assert_eq!(
            recorded.to_vec_f32(),
            dense.to_vec_f32(),
            "recording changes nothing"
        );
        let bits: Vec<bool> = (0..h * w).map(|p| mask(p / w, p % w)).collect();
        let levels = token_levels(&bits, h, w, 3, 1).unwrap();
        let rows = rows_at(&sample, levels[0].positions());
        let masked = unet
            .forward_masked(&rows, &t, &ctx, &cache, &levels)
            .unwrap();
        let want = rows_at(&dense, levels[0].positions());
        // Fed the template's own latents, the active rows equal the dense forward's rows.
        let (g, d) = (masked.to_vec_f32(), want.to_vec_f32());
        let scale = d.iter().map(|v| v.abs()).sum::<f32>() / d.len() as f32;
        for (i, (a, b)) in g.iter().zip(&d).enumerate() {
            assert!(
                (a - b).abs() <= rel * (b.abs() + scale),
                "{name}: row value {i} is {a}, dense gives {b}"
            );
        }
    }

    #[test]
    fn every_token_active_equals_dense() {
        check("unet-sd1", |_, _| true, DType::F32, 1e-4);
        check("unet-sd2", |_, _| true, DType::F32, 1e-4);
    }

    #[test]
    fn partial_masks_reproduce_the_dense_rows_from_the_cache() {
        check(
            "unet-sd1",
            |y, x| (3..9).contains(&y) && (2..6).contains(&x),
            DType::F32,
            1e-4,
        );
        check("unet-sd2", |y, x| y == 5 && x == 7, DType::F32, 1e-4);
        // The default f16 cache: the same up to half-precision rounding of the activations.
        check(
            "unet-sd1",
            |y, x| (3..9).contains(&y) && (2..6).contains(&x),
            DType::F16,
            2e-2,
        );
    }

    #[test]
    fn token_levels_nest() {
        let mask: Vec<bool> = (0..64).map(|p| p == 27).collect();
        let levels = token_levels(&mask, 8, 8, 3, 1).unwrap();
        assert_eq!(levels[0].len(), 9);
        assert_eq!((levels[1].height(), levels[1].width()), (4, 4));
        for (l, set) in levels.iter().enumerate().skip(1) {
            let below = &levels[l - 1];
            for &p in below.positions() {
                let (y, x) = (p as usize / below.width(), p as usize % below.width());
                assert!(set.is_active((y / 2) * set.width() + x / 2));
            }
        }
    }
}

mod ragged {
    use retouch_kernels::{DType, Tensor, TokenSet};
    use retouch_models::nn::exec::StepCache;
    use retouch_models::unet::{CachedSegment, UNet, token_levels};

    use super::fixture;

    /// Rows of a `[batch, h, w, c]` map at `positions`, branches stacked: `[batch * n, c]`.
    fn rows_at(map: &Tensor, positions: &[u32]) -> Tensor {
        let s = map.shape().to_vec();
        let plane = s[1] * s[2];
        let flat = map.clone().reshape(&[s[0] * plane, s[3]]).unwrap();
        let index: Vec<u32> = (0..s[0])
            .flat_map(|b| positions.iter().map(move |&p| p + (b * plane) as u32))
            .collect();
        flat.gather_rows(&index).unwrap()
    }

    /// Whether latent position (y, x) is in a request's mask.
    type Mask = fn(usize, usize) -> bool;

    struct Request {
        cache: StepCache,
        levels: Vec<TokenSet>,
        rows: Tensor,
        timesteps: Vec<f32>,
        context: Tensor,
    }

    /// Three requests on two templates (different masks, halos, timesteps and texts) in one
    /// ragged forward give each request's rows as its own masked forward does.
    fn check(name: &str) {
        let dir = fixture(name);
        let unet = UNet::load(&dir, None).unwrap();
        let (sample, t, ctx) = super::masked_inputs(&dir);
        let (batch, h, w) = (sample.shape()[0], sample.shape()[1], sample.shape()[2]);
        let other = sample.affine(0.7, 0.3).unwrap();
        let mut requests = Vec::new();
        let plans: [(&Tensor, Mask, usize, f32, f32); 3] = [
            (
                &sample,
                |y, x| (2..6).contains(&y) && (1..5).contains(&x),
                1,
                1.0,
                1.0,
            ),
            (&other, |y, x| y == 5 && x == 6, 1, 0.5, -0.8),
            (&sample, |y, x| y >= 6 && x < 3, 0, 0.25, 1.3),
        ];
        for (template, mask, halo, t_scale, ctx_scale) in plans {
            let timesteps: Vec<f32> = t.iter().map(|v| v * t_scale + 1.0).collect();
            let context = ctx.affine(ctx_scale, 0.05).unwrap();
            let (_, cache) = unet
                .forward_recording(template, &timesteps, &context, DType::F16)
                .unwrap();
            let bits: Vec<bool> = (0..h * w).map(|p| mask(p / w, p % w)).collect();
            let levels = token_levels(&bits, h, w, 3, halo).unwrap();
            // The edit's latents: not the template's.
            let edited = template.affine(1.0, 0.4).unwrap();
            let rows = rows_at(&edited, levels[0].positions());
            requests.push(Request {
                cache,
                levels,
                rows,
                timesteps,
                context,
            });
        }
        let contexts: Vec<Vec<Tensor>> = requests
            .iter()
            .map(|r| r.context.split_batch(&vec![1; batch]).unwrap())
            .collect();
        let mut segments = Vec::new();
        for (r, ctx) in requests.iter().zip(&contexts) {
            for (branch, context) in ctx.iter().enumerate() {
                segments.push(CachedSegment {
                    levels: &r.levels,
                    cache: &r.cache,
                    branch,
                    timestep: r.timesteps[branch],
                    context,
                });
            }
        }
        let packed =
            Tensor::concat_batch(&requests.iter().map(|r| &r.rows).collect::<Vec<_>>()).unwrap();
        let ragged = unet
            .forward_ragged(&packed, &segments)
            .unwrap()
            .to_vec_f32();
        let mut at = 0;
        for (i, r) in requests.iter().enumerate() {
            let n = r.levels[0].len();
            let c = r.rows.dim(-1).unwrap();
            let rows = r.rows.clone().reshape(&[batch, n, c]).unwrap();
            let alone = unet
                .forward_masked(&rows, &r.timesteps, &r.context, &r.cache, &r.levels)
                .unwrap()
                .to_vec_f32();
            let got = &ragged[at..at + alone.len()];
            at += alone.len();
            // Same math; only the GEMMs' blocking (so the order of f32 sums) may differ
            // with the total row count.
            let scale = alone.iter().map(|v| v.abs()).sum::<f32>() / alone.len() as f32;
            for (j, (a, b)) in got.iter().zip(&alone).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * (b.abs() + scale),
                    "{name}: request {i} value {j} is {a} in the batch, {b} alone"
                );
            }
        }
        assert_eq!(at, ragged.len());
        // The one-request path is the ragged one with one segment per branch: bit for bit.
        let r = &requests[1];
        let solo: Vec<CachedSegment<'_>> = segments[2..4].to_vec();
        let ragged_one = unet.forward_ragged(&r.rows, &solo).unwrap();
        let n = r.levels[0].len();
        let c = r.rows.dim(-1).unwrap();
        let masked = unet
            .forward_masked(
                &r.rows.clone().reshape(&[batch, n, c]).unwrap(),
                &r.timesteps,
                &r.context,
                &r.cache,
                &r.levels,
            )
            .unwrap();
        assert_eq!(ragged_one.to_vec_f32(), masked.to_vec_f32());
    }

    #[test]
    fn a_ragged_batch_equals_each_request_alone() {
        check("unet-sd1");
        check("unet-sd2");
    }

    #[test]
    fn bad_segments_are_errors() {
        let dir = fixture("unet-sd1");
        let unet = UNet::load(&dir, None).unwrap();
        let (sample, t, ctx) = super::masked_inputs(&dir);
        let (h, w) = (sample.shape()[1], sample.shape()[2]);
        let (_, cache) = unet
            .forward_recording(&sample, &t, &ctx, DType::F32)
            .unwrap();
        let bits: Vec<bool> = (0..h * w).map(|p| p == 9).collect();
        let levels = token_levels(&bits, h, w, 3, 1).unwrap();
        let rows = rows_at(&sample, levels[0].positions());
        let n = levels[0].len();
        let contexts = ctx.split_batch(&[1, 1]).unwrap();
        // A segment reading `count` of the token sets.
        let segment = |branch: usize, count: usize| CachedSegment {
            levels: &levels[..count],
            cache: &cache,
            branch,
            timestep: t[0],
            context: &contexts[0],
        };
        // No segments; too few rows; a branch the cache does not hold; too few token sets; a
        // context of another width.
        assert!(unet.forward_ragged(&rows, &[]).is_err());
        let one = rows.split_batch(&[n, n]).unwrap().swap_remove(0);
        assert!(
            unet.forward_ragged(&one, &[segment(0, 3), segment(1, 3)])
                .is_err()
        );
        assert!(
            unet.forward_ragged(&rows, &[segment(0, 3), segment(2, 3)])
                .is_err()
        );
        assert!(
            unet.forward_ragged(&rows, &[segment(0, 2), segment(1, 2)])
                .is_err()
        );
        let wide = Tensor::zeros(&[7, 99], DType::F32, Default::default());
        let mut bad = segment(1, 3);
        bad.context = &wide;
        assert!(unet.forward_ragged(&rows, &[segment(0, 3), bad]).is_err());
        assert!(
            unet.forward_ragged(&rows, &[segment(0, 3), segment(1, 3)])
                .is_ok()
        );
    }
}

/// The cached-mode forward that recomputes its first units densely (the load-or-recompute
/// plan's "recompute" side) on the fixtures' template: any switch point gives the dense
/// forward's rows, and needs only the cache entries from the switch on.
mod recomputing {
    use retouch_kernels::{DType, Tensor};
    use retouch_models::nn::exec::StepCache;
    use retouch_models::unet::{CachedSegment, RecomputeSegment, UNet, token_levels};

    use super::{fixture, masked_inputs};

    fn recomputing<'a>(segments: &[CachedSegment<'a>]) -> Vec<RecomputeSegment<'a>> {
        segments.iter().map(|&s| s.into()).collect()
    }

    /// Each sample's rows of a `[batch, h, w, c]` map at `positions`, stacked: `[batch * n, c]`.
    fn stacked_rows(map: &Tensor, positions: &[u32]) -> Tensor {
        let s = map.shape().to_vec();
        let parts: Vec<Tensor> = map
            .split_batch(&vec![1; s[0]])
            .unwrap()
            .into_iter()
            .map(|t| {
                t.reshape(&[s[1] * s[2], s[3]])
                    .unwrap()
                    .gather_rows(positions)
                    .unwrap()
            })
            .collect();
        Tensor::concat_batch(&parts.iter().collect::<Vec<_>>()).unwrap()
    }

    fn assert_rows_close(what: &str, got: &Tensor, want: &Tensor, rel: f32) {
        let (g, d) = (got.to_vec_f32(), want.to_vec_f32());
        assert_eq!(g.len(), d.len(), "{what}: row count");
        let scale = d.iter().map(|v| v.abs()).sum::<f32>() / d.len() as f32;
        for (i, (a, b)) in g.iter().zip(&d).enumerate() {
            assert!(
                (a - b).abs() <= rel * (b.abs() + scale),
                "{what}: value {i} is {a}, dense gives {b}"
            );
        }
    }

    #[test]
    fn every_switch_point_reproduces_the_dense_rows() {
        let dir = fixture("unet-sd1");
        let unet = UNet::load(&dir, None).unwrap();
        let (sample, t, ctx) = masked_inputs(&dir);
        let s = sample.shape().to_vec();
        let (batch, h, w) = (s[0], s[1], s[2]);
        let (dense, cache) = unet
            .forward_recording(&sample, &t, &ctx, DType::F32)
            .unwrap();
        let bits: Vec<bool> = (0..h * w)
            .map(|p| (3..9).contains(&(p / w)) && (2..6).contains(&(p % w)))
            .collect();
        let levels = token_levels(&bits, h, w, 3, 1).unwrap();
        let contexts = ctx.split_batch(&vec![1; batch]).unwrap();
        let segments: Vec<CachedSegment<'_>> = (0..batch)
            .map(|i| CachedSegment {
                levels: &levels,
                cache: &cache,
                branch: i,
                timestep: t[i],
                context: &contexts[i],
            })
            .collect();
        let positions = levels[0].positions();
        let masked = unet
            .forward_ragged(&stacked_rows(&sample, positions), &segments)
            .unwrap();
        let want = stacked_rows(&dense, positions);

        let starts = unet.entry_starts().unwrap().to_vec();
        let units = unet.units().unwrap();
        assert_eq!(starts.len(), units + 1);
        assert_eq!(starts[0], 0);
        assert_eq!(starts[units], cache.entries.len());
        assert!(starts.windows(2).all(|p| p[0] <= p[1]), "{starts:?}");
        for k in 0..=units {
            let got = unet
                .forward_ragged_recomputing(&sample, &recomputing(&segments), k)
                .unwrap();
            if k == 0 {
                assert_eq!(got.to_vec_f32(), masked.to_vec_f32(), "nothing recomputed");
            }
            let rel = if k == units { 1e-6 } else { 1e-4 };
            assert_rows_close(&format!("switch at unit {k}"), &got, &want, rel);
            // A step holding only the entries from the switch on serves the same forward.
            let partial = StepCache {
                first: starts[k],
                entries: cache.entries[starts[k]..].to_vec(),
            };
            let partial_segments: Vec<CachedSegment<'_>> = segments
                .iter()
                .map(|s| CachedSegment {
                    cache: &partial,
                    ..*s
                })
                .collect();
            let again = unet
                .forward_ragged_recomputing(&sample, &recomputing(&partial_segments), k)
                .unwrap();
            assert_eq!(again.to_vec_f32(), got.to_vec_f32(), "partial cache at {k}");
            // Switching earlier than the loaded entries reach is an error that says so.
            if k > 0 && starts[k] > starts[k - 1] {
                let err = unet
                    .forward_ragged_recomputing(&sample, &recomputing(&partial_segments), k - 1)
                    .unwrap_err()
                    .to_string();
                assert!(err.contains("not loaded"), "{err}");
            }
        }
        let err = unet
            .forward_ragged_recomputing(&sample, &recomputing(&segments), units + 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("units to recompute"), "{err}");
    }
}

/// A recomputing forward runs its dense units while the step's entries stream in from
/// another thread, each masked layer waiting only for its own entries; a failed read fails
/// the forward with the reason.
mod recomputing_while_streaming {
    use retouch_kernels::DType;
    use retouch_models::nn::exec::{StepSource, StreamingStep};
    use retouch_models::unet::{RecomputeSegment, UNet, token_levels};

    use super::{fixture, masked_inputs};

    #[test]
    fn each_masked_layer_waits_for_its_own_entries() {
        let dir = fixture("unet-sd1");
        let unet = UNet::load(&dir, None).unwrap();
        let (sample, t, ctx) = masked_inputs(&dir);
        let s = sample.shape().to_vec();
        let (batch, h, w) = (s[0], s[1], s[2]);
        let (_, cache) = unet
            .forward_recording(&sample, &t, &ctx, DType::F32)
            .unwrap();
        let bits: Vec<bool> = (0..h * w).map(|p| p % 5 == 0).collect();
        let levels = token_levels(&bits, h, w, 3, 1).unwrap();
        let contexts = ctx.split_batch(&vec![1; batch]).unwrap();
        let k = unet.units().unwrap() / 2;
        let first = unet.entry_starts().unwrap()[k];
        let ready: Vec<RecomputeSegment<'_>> = (0..batch)
            .map(|i| RecomputeSegment {
                levels: &levels,
                cache: StepSource::Whole(&cache),
                branch: i,
                timestep: t[i],
                context: &contexts[i],
            })
            .collect();
        let want = unet.forward_ragged_recomputing(&sample, &ready, k).unwrap();

        let stream = StreamingStep::new(first, cache.end());
        let streaming: Vec<RecomputeSegment<'_>> = ready
            .iter()
            .map(|s| RecomputeSegment {
                cache: StepSource::Streaming(&stream),
                ..*s
            })
            .collect();
        let got = std::thread::scope(|scope| {
            scope.spawn(|| {
                for index in first..cache.end() {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    assert!(stream.deliver(index, Ok(cache.entry(index).unwrap().clone())));
                }
            });
            unet.forward_ragged_recomputing(&sample, &streaming, k)
        })
        .unwrap();
        assert_eq!(got.to_vec_f32(), want.to_vec_f32());

        // A reader that stops half-way: the layers past it fail with its reason.
        let broken = StreamingStep::new(first, cache.end());
        for index in first..(first + cache.end()) / 2 {
            broken.deliver(index, Ok(cache.entry(index).unwrap().clone()));
        }
        broken.fail_rest("disk on fire");
        let segments: Vec<RecomputeSegment<'_>> = ready
            .iter()
            .map(|s| RecomputeSegment {
                cache: StepSource::Streaming(&broken),
                ..*s
            })
            .collect();
        let err = unet
            .forward_ragged_recomputing(&sample, &segments, k)
            .unwrap_err()
            .to_string();
        assert!(err.contains("disk on fire"), "{err}");
    }
}
