//! Random pipelines: the networks the presets build have the published parameter counts.
//! Slow (about 2.4B parameters generated): `cargo test --release -- --ignored`.

use retouch_kernels::DType;
use retouch_models::random_pipeline::{Preset, RandomPipeline};

/// Parameters of the published checkpoints, as diffusers and transformers count them.
const SD15: [(&str, u64); 3] = [
    ("text_encoder", 123_060_480),
    ("unet", 859_520_964),
    ("vae", 83_653_863),
];
const SD21: [(&str, u64); 3] = [
    ("text_encoder", 340_387_840),
    ("unet", 865_910_724),
    ("vae", 83_653_863),
];

#[test]
#[ignore = "generates and writes 2.4B parameters"]
fn presets_have_the_published_parameter_counts() {
    for (preset, expected) in [(Preset::Sd15, SD15), (Preset::Sd21, SD21)] {
        let dir = std::env::temp_dir().join(format!(
            "retouch-params-{}-{}",
            preset.name(),
            std::process::id()
        ));
        let pipeline = RandomPipeline {
            dtype: DType::F16,
            ..RandomPipeline::new(preset)
        };
        let summary = pipeline.write(&dir, false, None);
        let _ = std::fs::remove_dir_all(&dir);
        let counts: Vec<(String, u64)> = summary
            .unwrap()
            .components
            .into_iter()
            .map(|(name, params, _)| (name, params))
            .collect();
        let expected: Vec<(String, u64)> =
            expected.iter().map(|(n, p)| (n.to_string(), *p)).collect();
        assert_eq!(counts, expected, "{preset:?}");
    }
}
