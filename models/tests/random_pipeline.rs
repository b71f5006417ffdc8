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

/// `RandomPipeline::unet` (the benchmark's in-memory UNet) is the UNet `write` saves: same
/// config, same weights, so the same output bit for bit.
#[test]
fn in_memory_unet_is_the_written_one() {
    use retouch_kernels::{Device, Tensor};
    use retouch_models::unet::UNet;

    let dir = std::env::temp_dir().join(format!("retouch-unet-mem-{}", std::process::id()));
    let pipeline = RandomPipeline {
        seed: 3,
        ..RandomPipeline::new(Preset::Tiny)
    };
    let written = pipeline
        .write(&dir, false, None)
        .map(|_| UNet::load(dir.join("unet"), None));
    let _ = std::fs::remove_dir_all(&dir);
    let loaded = written.unwrap().unwrap();
    let in_memory = pipeline.unet().unwrap();

    let config = Preset::Tiny.unet_config();
    let size = config["sample_size"].as_u64().unwrap() as usize;
    assert_eq!(Preset::Tiny.image_size(), 4 * size);
    assert_eq!(Preset::Sd15.image_size(), 512);
    assert_eq!(Preset::Sd21.image_size(), 768);
    let ctx = in_memory.config().cross_attention_dim;
    let sample = Tensor::randn(&[2, size, size, 4], 1, Device::Cpu);
    let context = Tensor::randn(&[2, 77, ctx], 2, Device::Cpu);
    let a = in_memory
        .forward(&sample, &[500.0, 20.0], &context)
        .unwrap();
    let b = loaded.forward(&sample, &[500.0, 20.0], &context).unwrap();
    assert_eq!(a.to_vec_f32(), b.to_vec_f32());
}
