//! The built-in model (models/tiny) against diffusers: text-to-image for fixed initial latents
//! (fixture: tools/fixtures/tiny_model.py).

use std::path::PathBuf;

use retouch_kernels::SafeTensorsFile;
use retouch_models::pipeline::{GenerateRequest, Pipeline};
use retouch_models::schedulers::SchedulerKind;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn tiny_model_generation_matches_diffusers() {
    let pipe = Pipeline::load(repo().join("models/tiny"), None).unwrap();
    let io =
        SafeTensorsFile::open(repo().join("tests/fixtures/tiny-model/io.safetensors")).unwrap();
    let noise = io.get("latents").unwrap().nchw_to_nhwc().unwrap();
    let size = pipe.native_size();
    let mut req = GenerateRequest::new("a large green star at the top left on a purple background");
    req.negative_prompt = "a small circle".into();
    req.steps = 20;
    req.guidance = 5.0;
    req.scheduler = SchedulerKind::Ddim;
    req.width = size;
    req.height = size;
    req.latents = Some(noise);
    let out = pipe.generate(&req, &mut |_, _| {}).unwrap();

    let want = io.get("out.latents").unwrap().to_vec_f32();
    let got = out.latents.nhwc_to_nchw().unwrap().to_vec_f32();
    assert_eq!(got.len(), want.len());
    let scale = want.iter().map(|v| v.abs()).sum::<f32>() / want.len() as f32;
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * (b.abs() + scale),
            "latent {i} is {a}, diffusers gives {b}"
        );
    }
    let want_image = io.get("out.image").unwrap().to_vec_f32();
    for (i, (&p, b)) in out.image.pixels.iter().zip(&want_image).enumerate() {
        let a = f32::from(p) / 255.0;
        assert!(
            (a - b).abs() <= 1.0 / 255.0 + 1e-4,
            "image value {i} is {a}, diffusers gives {b}"
        );
    }
}
