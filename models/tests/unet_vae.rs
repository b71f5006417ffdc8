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

mod masked {
    use super::*;
    use retouch_kernels::DType;
    use retouch_models::unet::token_levels;

    fn inputs(dir: &std::path::Path) -> (Tensor, Vec<f32>, Tensor) {
        let io = SafeTensorsFile::open(dir.join("io.safetensors")).unwrap();
        (
            io.get("sample").unwrap().nchw_to_nhwc().unwrap(),
            io.get("timestep").unwrap().to_vec_f32(),
            io.get("encoder_hidden_states").unwrap(),
        )
    }

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
        let (sample, t, ctx) = inputs(&dir);
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
