//! The CLIP text encoder against transformers' CLIPTextModel (tools/fixtures/clip_text.py).

use std::fs;
use std::path::{Path, PathBuf};

use retouch_models::Error;
use retouch_models::clip::ClipTextEncoder;
use retouch_models::kernels::{DType, SafeTensorsFile, Tensor, save_safetensors};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

struct Reference {
    ids: Tensor,
    exact: Tensor,
    fp16: Tensor,
}

fn reference(name: &str) -> Reference {
    let file = SafeTensorsFile::open(fixture(name).join("reference.safetensors")).unwrap();
    Reference {
        ids: file.get("input_ids").unwrap(),
        exact: file.get("last_hidden_state").unwrap(),
        fp16: file.get("last_hidden_state_fp16").unwrap(),
    }
}

/// Element by element: `|got - want| <= tol * max(|want|, 1)` (the outputs are layer-normed,
/// of order one, so this is a relative error that does not blow up near zero).
fn assert_close(got: &Tensor, want: &Tensor, tol: f32, what: &str) {
    assert_eq!(got.shape(), want.shape(), "{what}: shapes");
    let (got, want) = (got.to_vec_f32(), want.to_vec_f32());
    let mut worst = (0.0f32, 0);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let err = (g - w).abs() / w.abs().max(1.0);
        assert!(err.is_finite(), "{what}: element {i} is {g}, expected {w}");
        if err > worst.0 {
            worst = (err, i);
        }
    }
    let i = worst.1;
    assert!(
        worst.0 <= tol,
        "{what}: element {i} is {}, expected {} (error {:e} > {tol:e})",
        got[i],
        want[i],
        worst.0
    );
}

/// A scratch folder, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("retouch-clip-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Copies a fixture's config and rewrites its weights: renamed, converted, some left out.
fn rewrite_weights(
    name: &str,
    scratch: &Scratch,
    file_name: &str,
    rename: impl Fn(&str) -> Option<String>,
    dtype: DType,
) {
    fs::copy(
        fixture(name).join("config.json"),
        scratch.0.join("config.json"),
    )
    .unwrap();
    let file = SafeTensorsFile::open(fixture(name).join("model.safetensors")).unwrap();
    let tensors: Vec<(String, Tensor)> = file
        .names()
        .into_iter()
        .filter_map(|n| {
            let t = file.get(&n).unwrap().to_dtype(dtype).unwrap();
            rename(&n).map(|new| (new, t))
        })
        .collect();
    save_safetensors(
        scratch.0.join(file_name),
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
    )
    .unwrap();
}

fn matches_transformers(name: &str) {
    let encoder = ClipTextEncoder::load(fixture(name)).unwrap();
    let r = reference(name);
    let out = encoder.forward(&r.ids).unwrap();
    assert_close(&out, &r.exact, 1e-4, name);
}

#[test]
fn sd1_like_quick_gelu_matches_transformers() {
    matches_transformers("clip-text-sd1");
}

#[test]
fn sd2_like_gelu_matches_transformers() {
    let encoder = ClipTextEncoder::load(fixture("clip-text-sd2")).unwrap();
    assert_eq!(encoder.config().layer_norm_eps, 1e-6);
    matches_transformers("clip-text-sd2");
}

#[test]
fn u32_ids_and_shorter_sequences() {
    let name = "clip-text-sd1";
    let encoder = ClipTextEncoder::load(fixture(name)).unwrap();
    let r = reference(name);
    let ids: Vec<u32> = r
        .ids
        .as_slice::<i64>()
        .unwrap()
        .iter()
        .map(|&i| i as u32)
        .collect();
    let out = encoder.forward_ids(&ids, 2).unwrap();
    assert_close(&out, &r.exact, 1e-4, "u32 ids");

    // Attention is causal, so the first tokens' states do not depend on later tokens.
    let hidden = encoder.config().hidden_size;
    let short = encoder.forward_ids(&ids[77..77 + 10], 1).unwrap();
    let want = &r.exact.to_vec_f32()[77 * hidden..(77 + 10) * hidden];
    assert_close(
        &short,
        &Tensor::from_vec(want.to_vec(), &[1, 10, hidden]).unwrap(),
        1e-4,
        "first 10 tokens",
    );
}

#[test]
fn fp16_weights_with_published_names_load() {
    for name in ["clip-text-sd1", "clip-text-sd2"] {
        let scratch = Scratch::new(&format!("fp16-{name}"));
        // As published checkpoints ship them: `text_model.` names, model.fp16.safetensors.
        let published = |n: &str| Some(format!("text_model.{n}"));
        rewrite_weights(
            name,
            &scratch,
            "model.fp16.safetensors",
            published,
            DType::F16,
        );
        let encoder = ClipTextEncoder::load_variant(&scratch.0, Some("fp16")).unwrap();
        let r = reference(name);
        let out = encoder.forward(&r.ids).unwrap();
        // Against the same network with fp16-rounded weights run in float64: f32 accuracy.
        assert_close(&out, &r.fp16, 1e-4, &format!("{name} fp16"));
        // Against the fp32 weights: what fp16 rounding costs (about 6e-3 here).
        assert_close(&out, &r.exact, 2e-2, &format!("{name} fp16 vs fp32"));

        // Without a variant, the fp16 file is used when it is the only one.
        assert!(ClipTextEncoder::load(&scratch.0).is_ok());
    }
}

#[test]
fn missing_weight_names_folder_and_tensor() {
    let scratch = Scratch::new("missing");
    let gone = "encoder.layers.1.mlp.fc1.weight";
    let keep = |n: &str| (n != gone).then(|| n.to_string());
    rewrite_weights(
        "clip-text-sd1",
        &scratch,
        "model.safetensors",
        keep,
        DType::F32,
    );
    let err = ClipTextEncoder::load(&scratch.0).err().unwrap();
    assert!(matches!(err, Error::MissingWeight { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(gone), "{message}");
    assert!(
        message.contains(&scratch.0.display().to_string()),
        "{message}"
    );
}

#[test]
fn shared_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<ClipTextEncoder>();
}

#[test]
fn bad_inputs_are_errors() {
    let encoder = ClipTextEncoder::load(fixture("clip-text-sd1")).unwrap();
    let vocab = encoder.config().vocab_size as u32;

    let err = encoder.forward_ids(&[1, 2, vocab], 1).err().unwrap();
    assert!(err.to_string().contains(&vocab.to_string()), "{err}");
    let negative = Tensor::from_vec(vec![1i64, -3], &[1, 2]).unwrap();
    assert!(encoder.forward(&negative).is_err());
    let floats = Tensor::from_vec(vec![1.0f32, 2.0], &[1, 2]).unwrap();
    assert!(encoder.forward(&floats).is_err());
    assert!(
        encoder.forward_ids(&[1; 78], 1).is_err(),
        "78 > 77 positions"
    );
    assert!(encoder.forward_ids(&[1, 2, 3], 2).is_err(), "ragged batch");
    assert!(encoder.forward_ids(&[], 1).is_err());
    assert!(encoder.forward_ids(&[1], 0).is_err());
}

#[test]
fn bad_config_is_an_error_naming_the_file() {
    let scratch = Scratch::new("config");
    let config = fs::read_to_string(fixture("clip-text-sd1").join("config.json")).unwrap();
    fs::write(
        scratch.0.join("config.json"),
        config.replace("quick_gelu", "swish"),
    )
    .unwrap();
    fs::copy(
        fixture("clip-text-sd1").join("model.safetensors"),
        scratch.0.join("model.safetensors"),
    )
    .unwrap();
    let err = ClipTextEncoder::load(&scratch.0).err().unwrap().to_string();
    assert!(
        err.contains("config.json") && err.contains("swish"),
        "{err}"
    );
}
