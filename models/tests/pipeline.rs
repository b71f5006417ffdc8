//! Whole text-to-image pipelines against diffusers' StableDiffusionPipeline, with each
//! scheduler, on the tiny random pipeline of `tools/fixtures/pipeline.py`.

use std::path::{Path, PathBuf};

use retouch_kernels::{SafeTensorsFile, Tensor};
use retouch_models::pipeline::{GenerateRequest, Pipeline};
use retouch_models::schedulers::SchedulerKind;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The fixture pipeline with the CLIP tokenizer files put back, in a fresh temp folder.
fn pipeline_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("retouch-pipeline-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(&repo().join("tests/fixtures/pipeline-tiny"), &dir);
    let tokenizer = [
        "models/assets/clip-tokenizer",
        "tests/fixtures/clip-tokenizer",
    ]
    .iter()
    .map(|p| repo().join(p))
    .find(|p| p.is_dir())
    .expect("CLIP tokenizer files");
    for f in [
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::create_dir_all(dir.join("tokenizer")).unwrap();
        std::fs::copy(tokenizer.join(f), dir.join("tokenizer").join(f)).unwrap();
    }
    dir
}

fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().map(|v| v.abs()).sum::<f32>() / want.len() as f32;
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= rel * (b.abs() + scale),
            "{what}: element {i} is {a}, diffusers gives {b}"
        );
    }
}

#[test]
fn text_to_image_matches_diffusers_with_each_scheduler() {
    let dir = pipeline_dir("t2i");
    let pipe = Pipeline::load(&dir, None).unwrap();
    let io = SafeTensorsFile::open(dir.join("io.safetensors")).unwrap();
    let noise = io.get("latents").unwrap().nchw_to_nhwc().unwrap();
    for kind in SchedulerKind::ALL {
        let mut req = GenerateRequest::new("a red circle on a blue background");
        req.negative_prompt = "blurry".into();
        req.steps = 6;
        req.scheduler = kind;
        req.width = 32;
        req.height = 32;
        req.latents = Some(noise.clone());
        let mut steps_seen = 0;
        let out = pipe
            .generate(&req, &mut |done, total| {
                assert_eq!(total, 6);
                steps_seen = done;
            })
            .unwrap();
        assert_eq!(steps_seen, 6, "{kind}: progress reported every step");
        let want = io.get(&format!("{kind}.latents")).unwrap();
        let got = out.latents.nhwc_to_nchw().unwrap();
        assert_close(
            &format!("{kind} latents"),
            &got.to_vec_f32(),
            &want.to_vec_f32(),
            1e-4,
        );
        let want_image = io.get(&format!("{kind}.image")).unwrap().to_vec_f32();
        let got_image: Vec<f32> = out.image.pixels.iter().map(|&p| p as f32 / 255.0).collect();
        for (i, (a, b)) in got_image.iter().zip(&want_image).enumerate() {
            assert!(
                (a - b).abs() <= 1.0 / 255.0 + 1e-4,
                "{kind} image: value {i} is {a}, diffusers gives {b}"
            );
        }
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn wrong_sizes_and_latents_are_errors() {
    let dir = pipeline_dir("errors");
    let pipe = Pipeline::load(&dir, None).unwrap();
    let mut req = GenerateRequest::new("x");
    req.steps = 1;
    req.width = 30;
    req.height = 32;
    let err = pipe
        .generate(&req, &mut |_, _| {})
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("multiple of"), "{err}");
    req.width = 32;
    req.latents = Some(Tensor::randn(&[1, 8, 8, 4], 0, Default::default()));
    let err = pipe
        .generate(&req, &mut |_, _| {})
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("initial latents"), "{err}");
    let err = Pipeline::load(dir.join("unet"), None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model_index.json"), "{err}");
    std::fs::remove_dir_all(dir).ok();
}

fn spec() -> retouch_models::pipeline::TemplateSpec {
    retouch_models::pipeline::TemplateSpec {
        prompt: "a red circle on a blue background".into(),
        negative_prompt: String::new(),
        seed: 5,
        steps: 4,
        guidance: 7.5,
        scheduler: "dpmpp-2m".into(),
        width: 32,
        height: 32,
    }
}

/// A mask PNG of the given size, white inside the rectangle.
fn mask_png(w: usize, h: usize, rect: (usize, usize, usize, usize)) -> Vec<u8> {
    let (x0, y0, x1, y1) = rect;
    let pixels: Vec<u8> = (0..h)
        .flat_map(|y| {
            (0..w).map(move |x| {
                if x >= x0 && x < x1 && y >= y0 && y < y1 {
                    255u8
                } else {
                    0
                }
            })
        })
        .flat_map(|v| [v, v, v])
        .collect();
    retouch_models::pipeline::RgbImage {
        width: w,
        height: h,
        pixels,
    }
    .encode_png()
    .unwrap()
}

#[test]
fn templates_record_the_generation_and_round_trip() {
    use retouch_models::pipeline::Template;
    let dir = pipeline_dir("template");
    let pipe = Pipeline::load(&dir, None).unwrap();
    let spec = spec();
    let template = pipe.register_template(&spec, None, &mut |_, _| {}).unwrap();
    assert_eq!(template.trajectory.len(), spec.steps + 1);
    // The template is the generation with the same settings.
    let mut req = GenerateRequest::new(spec.prompt.clone());
    req.seed = spec.seed;
    req.steps = spec.steps;
    req.scheduler = SchedulerKind::DpmPp2m;
    req.width = 32;
    req.height = 32;
    let generated = pipe.generate(&req, &mut |_, _| {}).unwrap();
    assert_eq!(
        template.trajectory[spec.steps].to_vec_f32(),
        generated.latents.to_vec_f32()
    );
    assert_eq!(template.image, generated.image);
    let saved = dir.join("template-out");
    template.save(&saved).unwrap();
    let loaded = Template::load(&saved).unwrap();
    assert_eq!(loaded.spec, spec);
    assert_eq!(loaded.image, template.image);
    for (a, b) in loaded.trajectory.iter().zip(&template.trajectory) {
        assert_eq!(a.to_vec_f32(), b.to_vec_f32());
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn dense_edits_change_only_the_masked_region() {
    use retouch_models::pipeline::{EditMode, EditRequest, Mask};
    let dir = pipeline_dir("edit");
    let pipe = Pipeline::load(&dir, None).unwrap();
    let template = pipe
        .register_template(&spec(), None, &mut |_, _| {})
        .unwrap();
    let mask = Mask::from_png(&mask_png(32, 32, (8, 8, 20, 24))).unwrap();
    assert!((mask.ratio() - (12.0 * 16.0) / 1024.0).abs() < 1e-9);
    let mut req = EditRequest::new("a green square on a blue background");
    req.seed = 9;
    req.strength = 1.0;
    let mut seen = 0;
    let edited = pipe
        .edit(&template, &mask, &req, &mut |d, _| seen = d)
        .unwrap();
    assert_eq!(seen, 4);
    // Latents outside the (latent) mask are the template's exactly; inside they changed.
    let latent_mask = mask.to_latent(2);
    let (got, want) = (
        edited.latents.to_vec_f32(),
        template.trajectory[4].to_vec_f32(),
    );
    let mut changed = 0;
    for (p, &m) in latent_mask.iter().enumerate() {
        for c in 0..4 {
            let i = p * 4 + c;
            if m == 0.0 {
                assert_eq!(got[i], want[i], "latent {p} outside the mask changed");
            } else if got[i] != want[i] {
                changed += 1;
            }
        }
    }
    assert!(changed > 0, "the masked region did not change");
    // Pixels the feathered mask does not reach are the template's.
    let soft = mask.feathered(1);
    for (i, &m) in soft.iter().enumerate() {
        if m == 0.0 {
            assert_eq!(
                edited.image.pixels[i * 3..i * 3 + 3],
                template.image.pixels[i * 3..i * 3 + 3]
            );
        }
    }
    // Bad masks and unavailable modes are errors, not panics.
    let small = Mask::from_png(&mask_png(16, 16, (0, 0, 4, 4))).unwrap();
    assert!(
        pipe.edit(&template, &small, &req, &mut |_, _| {})
            .err()
            .unwrap()
            .to_string()
            .contains("16x16")
    );
    let empty = Mask::from_png(&mask_png(32, 32, (0, 0, 0, 0))).unwrap();
    assert!(
        pipe.edit(&template, &empty, &req, &mut |_, _| {})
            .err()
            .unwrap()
            .to_string()
            .contains("empty")
    );
    req.mode = EditMode::Cached;
    assert!(
        pipe.edit(&template, &mask, &req, &mut |_, _| {})
            .err()
            .unwrap()
            .to_string()
            .contains("cache")
    );
    assert!(Mask::from_png(b"not a png").is_err());
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn cached_edits_reproduce_the_template_when_nothing_changes() {
    use retouch_kernels::DType;
    use retouch_models::pipeline::{EditMode, EditRequest, Mask, Template};
    let dir = pipeline_dir("cached");
    let pipe = Pipeline::load(&dir, None).unwrap();
    let spec = spec();
    let template = pipe
        .register_template(&spec, Some(DType::F32), &mut |_, _| {})
        .unwrap();
    assert_eq!(template.cache.len(), spec.steps);
    assert!(template.cache_bytes() > 0);
    // Saved one file per step and loaded back unchanged.
    let saved = dir.join("cached-template");
    template.save(&saved).unwrap();
    assert!(saved.join("cache/step_0003.safetensors").is_file());
    let loaded = Template::load(&saved).unwrap();
    assert_eq!(loaded.cache_bytes(), template.cache_bytes());
    // Same prompt and seed as the template: the edit's trajectory is the template's, so the
    // masked forward (fresh rows = the template's rows) must give back the template's latents.
    let mask = Mask::from_png(&mask_png(32, 32, (6, 10, 22, 20))).unwrap();
    let mut req = EditRequest::new(spec.prompt.clone());
    req.seed = spec.seed;
    req.mode = EditMode::Cached;
    req.strength = 1.0;
    let edited = pipe.edit(&loaded, &mask, &req, &mut |_, _| {}).unwrap();
    let (got, want) = (
        edited.latents.to_vec_f32(),
        template.trajectory[spec.steps].to_vec_f32(),
    );
    let scale = want.iter().map(|v| v.abs()).sum::<f32>() / want.len() as f32;
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * (b.abs() + scale),
            "latent {i}: {a} vs {b}"
        );
    }
    // A real edit in cached mode changes the masked region only, like dense mode.
    req.prompt = "a green square".into();
    req.seed = 99;
    let cached = pipe.edit(&loaded, &mask, &req, &mut |_, _| {}).unwrap();
    req.mode = EditMode::Dense;
    let dense = pipe.edit(&loaded, &mask, &req, &mut |_, _| {}).unwrap();
    let latent_mask = mask.to_latent(2);
    let (c, d, t) = (
        cached.latents.to_vec_f32(),
        dense.latents.to_vec_f32(),
        want,
    );
    for (p, &m) in latent_mask.iter().enumerate() {
        for ch in 0..4 {
            let i = p * 4 + ch;
            if m == 0.0 {
                assert_eq!(c[i], t[i]);
                assert_eq!(d[i], t[i]);
            }
        }
    }
    assert_ne!(c, t, "the cached edit changed nothing");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn edit_strength_runs_the_last_steps_of_the_templates_schedule() {
    use retouch_kernels::DType;
    use retouch_models::pipeline::{EditMode, EditRequest, Mask, edit_first_step};
    assert_eq!(edit_first_step(20, 0.6).unwrap(), 8);
    assert_eq!(edit_first_step(20, 0.7).unwrap(), 6);
    assert_eq!(edit_first_step(20, 1.0).unwrap(), 0);
    assert_eq!(edit_first_step(20, 0.05).unwrap(), 19);
    assert_eq!(edit_first_step(4, 0.5).unwrap(), 2);
    // At least one step, where diffusers would run none.
    assert_eq!(edit_first_step(20, 0.01).unwrap(), 19);
    assert_eq!(edit_first_step(1, 0.6).unwrap(), 0);
    for bad in [0.0, -0.5, 1.5, f32::NAN] {
        let e = edit_first_step(20, bad).unwrap_err().to_string();
        assert!(e.contains("strength"), "{bad}: {e}");
    }

    let dir = pipeline_dir("strength");
    let pipe = Pipeline::load(&dir, None).unwrap();
    let template = pipe
        .register_template(&spec(), Some(DType::F32), &mut |_, _| {})
        .unwrap();
    let mask = Mask::from_png(&mask_png(32, 32, (8, 8, 20, 24))).unwrap();
    let latent_mask = mask.to_latent(2);
    let final_latents = template.trajectory[4].to_vec_f32();
    let run = |strength: f32, seed: u64, mode: EditMode| {
        let mut req = EditRequest::new("a green square on a blue background");
        (req.seed, req.strength, req.mode) = (seed, strength, mode);
        let mut calls = Vec::new();
        let edited = pipe
            .edit(&template, &mask, &req, &mut |d, t| calls.push((d, t)))
            .unwrap();
        (edited, calls)
    };
    // Strength 0.5 of 4 steps runs the last 2, in both modes.
    for mode in [EditMode::Dense, EditMode::Cached] {
        let (edited, calls) = run(0.5, 9, mode);
        assert_eq!(calls, vec![(1, 2), (2, 2)], "{mode:?}");
        assert_eq!(edited.steps, 2);
        let got = edited.latents.to_vec_f32();
        for (p, &m) in latent_mask.iter().enumerate() {
            if m == 0.0 {
                assert_eq!(got[p * 4..p * 4 + 4], final_latents[p * 4..p * 4 + 4]);
            }
        }
        assert_ne!(
            got, final_latents,
            "{mode:?}: the masked region did not change"
        );
    }
    // The seed noises the template inside the mask, so it still matters; so does strength.
    let inside = |l: &[f32]| -> Vec<f32> {
        (latent_mask.iter().enumerate())
            .filter(|(_, m)| **m > 0.0)
            .flat_map(|(p, _)| l[p * 4..p * 4 + 4].to_vec())
            .collect()
    };
    let a = run(0.5, 9, EditMode::Dense).0.latents.to_vec_f32();
    let b = run(0.5, 10, EditMode::Dense).0.latents.to_vec_f32();
    let c = run(1.0, 9, EditMode::Dense).0.latents.to_vec_f32();
    assert_ne!(inside(&a), inside(&b));
    assert_ne!(inside(&a), inside(&c));
    // A strength out of range is refused before any work.
    let mut req = EditRequest::new("x");
    req.strength = 1.5;
    let e = pipe
        .edit(&template, &mask, &req, &mut |_, _| {})
        .err()
        .unwrap();
    assert!(e.to_string().contains("strength"), "{e}");
    std::fs::remove_dir_all(dir).ok();
}
