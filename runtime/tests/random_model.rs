//! `retouch random-model`: the folders it writes load with Retouch's loaders and run.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use retouch_kernels::{Device, SafeTensorsFile, Tensor};
use retouch_models::clip::ClipTextEncoder;
use retouch_models::schedulers::{SchedulerConfig, SchedulerKind};
use retouch_models::tokenizer::ClipTokenizer;
use retouch_models::unet::UNet;
use retouch_models::vae::Vae;

/// A scratch folder, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("retouch-rm-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Runs `retouch random-model` from a folder outside the repository, so the tokenizer files
/// must come from the binary.
fn random_model(out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_retouch"))
        .current_dir(std::env::temp_dir())
        .args(["random-model", "--preset", "tiny", "--out"])
        .arg(out)
        .args(extra)
        .output()
        .expect("retouch runs")
}

fn check_ok(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_finite(what: &str, t: &Tensor) {
    let values = t.to_vec_f32();
    assert!(values.iter().all(|v| v.is_finite()), "{what}: non-finite");
    assert!(values.iter().any(|&v| v != 0.0), "{what}: all zero");
}

/// Loads every component of a tiny folder and runs it once.
fn run_pipeline(dir: &Path, variant: Option<&str>) {
    let tokenizer = ClipTokenizer::from_dir(dir.join("tokenizer")).unwrap();
    let ids = tokenizer.encode("a photo of a cat").unwrap();
    assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);

    let text = ClipTextEncoder::load_variant(dir.join("text_encoder"), variant).unwrap();
    let context = text.forward_ids(&ids, 1).unwrap();
    assert_eq!(context.shape(), &[1, 77, 64]);
    assert_finite("text encoder", &context);

    let unet = UNet::load(dir.join("unet"), variant).unwrap();
    let latents = Tensor::randn(&[1, 16, 16, 4], 0, Device::Cpu);
    let noise = unet.forward(&latents, &[999.0], &context).unwrap();
    assert_eq!(noise.shape(), &[1, 16, 16, 4]);
    assert_finite("unet", &noise);

    let vae = Vae::load(dir.join("vae"), variant).unwrap();
    assert_eq!(vae.factor(), 4);
    let image = vae.decode(&latents).unwrap();
    assert_eq!(image.shape(), &[1, 64, 64, 3]);
    assert_finite("vae decode", &image);
    assert_finite("vae encode", &vae.encode_mean(&image).unwrap());

    let scheduler = SchedulerConfig::from_file(dir.join("scheduler/scheduler_config.json"))
        .unwrap()
        .build(SchedulerKind::Ddim, 10)
        .unwrap();
    assert_eq!(scheduler.timesteps()[0], 901.0);
}

#[test]
fn tiny_pipeline_loads_and_runs() {
    let dir = Scratch::new("tiny");
    let out = random_model(&dir.0, &[]);
    check_ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("wrote"));

    let index: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.0.join("model_index.json")).unwrap()).unwrap();
    assert_eq!(index["_class_name"], "StableDiffusionPipeline");
    let class = |name: &str| index[name].clone();
    assert_eq!(
        class("unet"),
        serde_json::json!(["diffusers", "UNet2DConditionModel"])
    );
    assert_eq!(
        class("vae"),
        serde_json::json!(["diffusers", "AutoencoderKL"])
    );
    assert_eq!(
        class("text_encoder"),
        serde_json::json!(["transformers", "CLIPTextModel"])
    );
    assert_eq!(
        class("tokenizer"),
        serde_json::json!(["transformers", "CLIPTokenizer"])
    );
    assert_eq!(
        class("scheduler"),
        serde_json::json!(["diffusers", "PNDMScheduler"])
    );
    assert_eq!(class("safety_checker"), serde_json::json!([null, null]));
    assert_eq!(class("feature_extractor"), serde_json::json!([null, null]));
    assert_eq!(index["requires_safety_checker"], false);

    for file in [
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
        "tokenizer/special_tokens_map.json",
        "scheduler/scheduler_config.json",
    ] {
        assert!(dir.0.join(file).is_file(), "{file} missing");
    }
    // transformers' published naming, and the metadata it requires.
    let text = SafeTensorsFile::open(dir.0.join("text_encoder/model.safetensors")).unwrap();
    assert!(text.contains("text_model.embeddings.token_embedding.weight"));
    assert_eq!(
        text.shape("text_model.embeddings.token_embedding.weight")
            .unwrap(),
        vec![49408, 64]
    );
    let header = fs::read(dir.0.join("text_encoder/model.safetensors")).unwrap();
    assert!(
        String::from_utf8_lossy(&header[..4096.min(header.len())]).contains(r#""format":"pt""#)
    );
    let vae = SafeTensorsFile::open(dir.0.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    assert!(vae.contains("decoder.mid_block.attentions.0.to_q.weight"));

    run_pipeline(&dir.0, None);
}

#[test]
fn f16_writes_the_fp16_variant() {
    let dir = Scratch::new("f16");
    check_ok(&random_model(&dir.0, &["--dtype", "f16"]));
    for (folder, stem) in [
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ] {
        let fp16 = dir.0.join(folder).join(format!("{stem}.fp16.safetensors"));
        assert!(fp16.is_file(), "{} missing", fp16.display());
        assert!(
            !dir.0
                .join(folder)
                .join(format!("{stem}.safetensors"))
                .exists()
        );
        let file = SafeTensorsFile::open(&fp16).unwrap();
        let name = &file.names()[0];
        assert_eq!(file.get(name).unwrap().dtype(), retouch_kernels::DType::F16);
    }
    let config = fs::read_to_string(dir.0.join("text_encoder/config.json")).unwrap();
    assert!(config.contains(r#""torch_dtype": "float16""#), "{config}");
    run_pipeline(&dir.0, Some("fp16"));
    // Without a variant the loaders fall back to the only weights there are.
    UNet::load(dir.0.join("unet"), None).unwrap();
}

#[test]
fn the_seed_decides_the_weights() {
    let unet =
        |dir: &Scratch| fs::read(dir.0.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let (a, b, c) = (
        Scratch::new("seed-a"),
        Scratch::new("seed-b"),
        Scratch::new("seed-c"),
    );
    check_ok(&random_model(&a.0, &["--seed", "3"]));
    check_ok(&random_model(&b.0, &["--seed", "3"]));
    check_ok(&random_model(&c.0, &["--seed", "4"]));
    assert!(unet(&a) == unet(&b));
    assert!(unet(&a) != unet(&c));
}

#[test]
fn a_non_empty_folder_needs_force() {
    let dir = Scratch::new("force");
    fs::create_dir_all(dir.0.join("unet")).unwrap();
    // A stale fp32 file that --force must not leave beside the new fp16 weights.
    fs::write(
        dir.0.join("unet/diffusion_pytorch_model.safetensors"),
        b"stale",
    )
    .unwrap();
    fs::write(dir.0.join("notes.txt"), b"keep me").unwrap();
    let out = random_model(&dir.0, &["--dtype", "f16"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not empty") && err.contains("--force"),
        "{err}"
    );

    check_ok(&random_model(&dir.0, &["--dtype", "f16", "--force"]));
    assert!(
        !dir.0
            .join("unet/diffusion_pytorch_model.safetensors")
            .exists()
    );
    assert_eq!(fs::read(dir.0.join("notes.txt")).unwrap(), b"keep me");
    UNet::load(dir.0.join("unet"), None).unwrap();
}

#[test]
fn an_unwritable_destination_is_a_clear_error() {
    let dir = Scratch::new("file");
    fs::create_dir_all(&dir.0).unwrap();
    let file = dir.0.join("a-file");
    fs::write(&file, b"").unwrap();
    for out in [file.clone(), file.join("below")] {
        let run = random_model(&out, &[]);
        assert_eq!(
            run.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(
            err.starts_with("error: ") && err.contains("a-file"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}
