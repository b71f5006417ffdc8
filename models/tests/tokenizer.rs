//! The CLIP tokenizer against transformers' CLIPTokenizer (tools/fixtures/clip_tokenizer.py).

use std::fs;
use std::path::{Path, PathBuf};

use retouch_models::tokenizer::ClipTokenizer;
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Expected {
    sd1: Vec<Case>,
    sd2: Vec<Case>,
}

/// The SD 1.x tokenizer folder (with SD 2.x's config files in `sd2/`), shipped as an asset.
fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/clip-tokenizer")
}

/// transformers' encodings of the test strings.
fn expected() -> Expected {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/clip-tokenizer/expected.json");
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

/// A scratch folder, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("retouch-tok-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn copy(&self, from: &Path, name: &str) {
        fs::copy(from.join(name), self.0.join(name)).unwrap();
    }

    fn write(&self, name: &str, value: &Value) {
        fs::write(self.0.join(name), value.to_string()).unwrap();
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Every case, reporting all mismatches at once.
fn check(tokenizer: &ClipTokenizer, cases: &[Case]) {
    let mut failures = Vec::new();
    for case in cases {
        let got = tokenizer.encode(&case.text).unwrap();
        if got != case.ids {
            failures.push(format!(
                "{:?}\n  got      {got:?}\n  expected {:?}",
                case.text, case.ids
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The SD 2.x folder: the same vocabulary with SD 2.x's config files.
fn sd2_folder(name: &str) -> Scratch {
    let dir = Scratch::new(name);
    dir.copy(&fixture(), "vocab.json");
    dir.copy(&fixture(), "merges.txt");
    dir.copy(&fixture().join("sd2"), "tokenizer_config.json");
    dir.copy(&fixture().join("sd2"), "special_tokens_map.json");
    dir
}

#[test]
fn sd1_folder_matches_transformers() {
    let tokenizer = ClipTokenizer::from_dir(fixture()).unwrap();
    assert_eq!(tokenizer.max_len(), 77);
    assert_eq!(
        (tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id()),
        (49406, 49407, 49407)
    );
    assert_eq!(
        &tokenizer.encode("a photo of a cat").unwrap()[..8],
        [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    );
    check(&tokenizer, &expected().sd1);
}

#[test]
fn sd2_pads_with_exclamation_mark() {
    let dir = sd2_folder("sd2");
    let tokenizer = ClipTokenizer::from_dir(&dir.0).unwrap();
    assert_eq!(tokenizer.pad_id(), 0);
    check(&tokenizer, &expected().sd2);
}

#[test]
fn tokenizer_json_gives_the_same_ids() {
    let vocab: Value =
        serde_json::from_str(&fs::read_to_string(fixture().join("vocab.json")).unwrap()).unwrap();
    let merges_txt = fs::read_to_string(fixture().join("merges.txt")).unwrap();
    let merges: Vec<&str> = merges_txt.lines().skip(1).collect();
    // Older tokenizer.json files store merges as "a b", newer ones as ["a", "b"].
    let as_pairs: Vec<Vec<&str>> = merges.iter().map(|m| m.split(' ').collect()).collect();
    for (name, merges) in [("strings", json!(merges)), ("pairs", json!(as_pairs))] {
        let dir = Scratch::new(&format!("json-{name}"));
        dir.write(
            "tokenizer.json",
            &json!({"version": "1.0", "model": {"type": "BPE", "vocab": vocab, "merges": merges}}),
        );
        dir.copy(&fixture(), "tokenizer_config.json");
        dir.copy(&fixture(), "special_tokens_map.json");
        check(&ClipTokenizer::from_dir(&dir.0).unwrap(), &expected().sd1);
    }
}

#[test]
fn context_length_comes_from_the_config() {
    let dir = Scratch::new("short");
    dir.copy(&fixture(), "vocab.json");
    dir.copy(&fixture(), "merges.txt");
    dir.write("tokenizer_config.json", &json!({"model_max_length": 6}));
    let tokenizer = ClipTokenizer::from_dir(&dir.0).unwrap();
    assert_eq!(tokenizer.max_len(), 6);
    let long = tokenizer
        .encode("a photo of a cat sitting on a mat")
        .unwrap();
    assert_eq!(long, [49406, 320, 1125, 539, 320, 49407]);
    let short = tokenizer.encode("a cat").unwrap();
    assert_eq!(short, [49406, 320, 2368, 49407, 49407, 49407]);
}

#[test]
fn defaults_without_config_files() {
    let dir = Scratch::new("bare");
    dir.copy(&fixture(), "vocab.json");
    dir.copy(&fixture(), "merges.txt");
    let tokenizer = ClipTokenizer::from_dir(&dir.0).unwrap();
    assert_eq!((tokenizer.max_len(), tokenizer.pad_id()), (77, 49407));
    check(&tokenizer, &expected().sd1[..3]);
}

#[test]
fn huge_model_max_length_means_clip_context() {
    let dir = Scratch::new("sentinel");
    dir.copy(&fixture(), "vocab.json");
    dir.copy(&fixture(), "merges.txt");
    dir.write(
        "tokenizer_config.json",
        &json!({"model_max_length": 1000000000000000019884624838656.0}),
    );
    assert_eq!(ClipTokenizer::from_dir(&dir.0).unwrap().max_len(), 77);
}

#[test]
fn shared_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<ClipTokenizer>();
}

#[test]
fn batch_is_rows_of_single_encodings() {
    let tokenizer = ClipTokenizer::from_dir(fixture()).unwrap();
    let texts = ["a photo of a cat", "", "ÉCOLE ÜBER MAÑANA"];
    let batch = tokenizer.encode_batch(&texts).unwrap();
    assert_eq!(batch.len(), 3 * 77);
    for (row, text) in batch.chunks(77).zip(texts) {
        assert_eq!(row, tokenizer.encode(text).unwrap());
    }
}

#[test]
fn missing_or_broken_files_are_errors() {
    let dir = Scratch::new("missing");
    let err = ClipTokenizer::from_dir(&dir.0).err().unwrap().to_string();
    assert!(err.contains("vocab.json"), "{err}");

    dir.copy(&fixture(), "vocab.json");
    let err = ClipTokenizer::from_dir(&dir.0).err().unwrap().to_string();
    assert!(err.contains("merges.txt"), "{err}");

    dir.copy(&fixture(), "merges.txt");
    dir.write(
        "tokenizer_config.json",
        &json!({"pad_token": "<|nonexistent|>"}),
    );
    let err = ClipTokenizer::from_dir(&dir.0).err().unwrap().to_string();
    assert!(err.contains("<|nonexistent|>"), "{err}");

    let err = ClipTokenizer::from_dir(dir.0.join("nowhere"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("nowhere"), "{err}");
}
