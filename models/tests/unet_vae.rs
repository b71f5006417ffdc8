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
