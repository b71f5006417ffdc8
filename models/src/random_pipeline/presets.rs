//! The configurations of each preset, as the published checkpoints' config files have them
//! (keys in the sorted order diffusers and transformers write).

use serde_json::{Value, json};

use super::Preset;
use crate::assets::ClipTokenizerFlavor;

/// Every config file of one pipeline folder.
pub(super) struct Configs {
    pub model_index: Value,
    pub unet: Value,
    pub vae: Value,
    /// Without `torch_dtype`, which depends on the dtype written.
    pub text_encoder: Value,
    pub scheduler: Value,
    pub tokenizer: ClipTokenizerFlavor,
}

const CROSS_DOWN: &str = "CrossAttnDownBlock2D";

pub(super) fn configs(preset: Preset) -> Configs {
    match preset {
        Preset::Sd15 => sd15(),
        Preset::Sd21 => sd21(),
        Preset::Tiny => tiny(),
    }
}

fn model_index(version: &str, scheduler: &str) -> Value {
    json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": version,
        "feature_extractor": [null, null],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", scheduler],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
}

/// SD 1.x's UNet; SD 2.x adds a few keys to it.
fn unet_sd1(version: &str, channels: &[usize], down: &[&str], cross_dim: usize) -> Value {
    let up: Vec<String> = down.iter().rev().map(|t| t.replace("Down", "Up")).collect();
    json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": version,
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": channels,
        "center_input_sample": false,
        "cross_attention_dim": cross_dim,
        "down_block_types": down,
        "downsample_padding": 1,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": up,
    })
}

fn vae(version: &str, channels: &[usize], sample_size: usize) -> Value {
    let n = channels.len();
    json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": version,
        "act_fn": "silu",
        "block_out_channels": channels,
        "down_block_types": vec!["DownEncoderBlock2D"; n],
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": sample_size,
        // Older published configs leave this to the default; diffusers writes it since 0.14.
        "scaling_factor": 0.18215,
        "up_block_types": vec!["UpDecoderBlock2D"; n],
    })
}

/// transformers' `CLIPTextConfig` as SD checkpoints ship it. The token ids (0, 2, 1) are
/// the config class defaults the checkpoints were saved with, not the tokenizer's.
fn text_encoder(
    version: &str,
    hidden: usize,
    layers: usize,
    heads: usize,
    intermediate: usize,
    act: &str,
    projection: usize,
) -> Value {
    json!({
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": act,
        "hidden_size": hidden,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "pad_token_id": 1,
        "projection_dim": projection,
        "transformers_version": version,
        "vocab_size": 49408,
    })
}

/// The `PNDMScheduler` config SD 1.x ships.
fn pndm(version: &str) -> Value {
    json!({
        "_class_name": "PNDMScheduler",
        "_diffusers_version": version,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "trained_betas": null,
    })
}

/// runwayml/stable-diffusion-v1-5.
fn sd15() -> Configs {
    let v = "0.6.0";
    let channels = [320, 640, 1280, 1280];
    let down = [CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, "DownBlock2D"];
    Configs {
        model_index: model_index(v, "PNDMScheduler"),
        unet: unet_sd1(v, &channels, &down, 768),
        vae: vae(v, &[128, 256, 512, 512], 512),
        text_encoder: text_encoder("4.22.0.dev0", 768, 12, 12, 3072, "quick_gelu", 768),
        scheduler: pndm(v),
        tokenizer: ClipTokenizerFlavor::Sd1,
    }
}

/// stabilityai/stable-diffusion-2-1 (768 px, v-prediction, OpenCLIP ViT-H text encoder
/// without its last layer).
fn sd21() -> Configs {
    let v = "0.10.0.dev0";
    let channels = [320, 640, 1280, 1280];
    let down = [CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, "DownBlock2D"];
    let mut unet = unet_sd1(v, &channels, &down, 1024);
    let extra = json!({
        "attention_head_dim": [5, 10, 20, 20],
        "dual_cross_attention": false,
        "num_class_embeds": null,
        "only_cross_attention": false,
        "sample_size": 96,
        "upcast_attention": true,
        "use_linear_projection": true,
    });
    merge(&mut unet, extra);
    Configs {
        model_index: model_index(v, "DDIMScheduler"),
        unet,
        vae: vae("0.8.0", &[128, 256, 512, 512], 768),
        text_encoder: text_encoder("4.25.0.dev0", 1024, 23, 16, 4096, "gelu", 512),
        scheduler: json!({
            "_class_name": "DDIMScheduler",
            "_diffusers_version": "0.8.0",
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "clip_sample": false,
            "num_train_timesteps": 1000,
            "prediction_type": "v_prediction",
            "set_alpha_to_one": false,
            "skip_prk_steps": true,
            "steps_offset": 1,
            // DDIM's default, written out so every reader agrees.
            "timestep_spacing": "leading",
            "trained_betas": null,
        }),
        tokenizer: ClipTokenizerFlavor::Sd2,
    }
}

/// A small SD 1.x-shaped pipeline for tests: 64 x 64 images, 16 x 16 latents (a VAE of
/// three blocks downsamples by 4), the full CLIP vocabulary.
fn tiny() -> Configs {
    // Not a published checkpoint: stamped with the diffusers version it was checked against.
    // (Below 0.9, diffusers would also reset a UNet sample_size under 64 to 64.)
    let v = "0.42.1";
    let channels = [32, 64, 64];
    let down = [CROSS_DOWN, CROSS_DOWN, "DownBlock2D"];
    let mut unet = unet_sd1(v, &channels, &down, 64);
    merge(
        &mut unet,
        json!({"attention_head_dim": 2, "layers_per_block": 1, "sample_size": 16}),
    );
    let mut vae = vae(v, &channels, 64);
    merge(&mut vae, json!({"layers_per_block": 1}));
    Configs {
        model_index: model_index(v, "PNDMScheduler"),
        unet,
        vae,
        text_encoder: text_encoder("4.22.0.dev0", 64, 2, 2, 256, "quick_gelu", 64),
        scheduler: pndm(v),
        tokenizer: ClipTokenizerFlavor::Sd1,
    }
}

/// Sets each key of `extra` in `base` (both JSON objects).
fn merge(base: &mut Value, extra: Value) {
    if let (Value::Object(base), Value::Object(extra)) = (base, extra) {
        base.extend(extra);
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::clip::ClipTextConfig;
    use crate::schedulers::{SchedulerConfig, SchedulerKind};
    use crate::unet::UNetConfig;
    use crate::vae::VaeConfig;

    fn parse<T: serde::de::DeserializeOwned>(v: &Value) -> T {
        serde_json::from_value(v.clone()).unwrap()
    }

    #[test]
    fn every_preset_parses_with_the_loaders_config_types() {
        for preset in Preset::ALL {
            let c = configs(preset);
            let unet: UNetConfig = parse(&c.unet);
            let plan = unet.plan(Path::new("unet")).unwrap();
            let text: ClipTextConfig = parse(&c.text_encoder);
            assert_eq!(unet.cross_attention_dim, text.hidden_size, "{preset:?}");
            assert_eq!(text.vocab_size, 49408);
            assert_eq!(plan.cross_attention.len(), unet.block_out_channels.len());
            let vae: VaeConfig = parse(&c.vae);
            assert_eq!(vae.latent_channels, unet.in_channels);
            let scheduler = SchedulerConfig::from_json(&c.scheduler.to_string()).unwrap();
            scheduler.build(SchedulerKind::Ddim, 20).unwrap();
            assert_eq!(c.model_index["scheduler"][1], c.scheduler["_class_name"]);
        }
    }

    #[test]
    fn sd21_is_the_v_prediction_openclip_model() {
        let c = configs(Preset::Sd21);
        let unet: UNetConfig = parse(&c.unet);
        assert!(unet.use_linear_projection && unet.upcast_attention);
        assert_eq!(unet.plan(Path::new("unet")).unwrap().heads, [5, 10, 20, 20]);
        let text: ClipTextConfig = parse(&c.text_encoder);
        assert_eq!(
            (
                text.hidden_size,
                text.num_hidden_layers,
                text.num_attention_heads
            ),
            (1024, 23, 16)
        );
        assert_eq!(text.hidden_act, "gelu");
        let scheduler = SchedulerConfig::from_json(&c.scheduler.to_string()).unwrap();
        assert_eq!(
            scheduler
                .build(SchedulerKind::Ddim, 10)
                .unwrap()
                .timesteps()[0],
            901.0
        );
        assert_eq!(scheduler.prediction_type.as_deref(), Some("v_prediction"));
        assert_eq!(c.tokenizer, ClipTokenizerFlavor::Sd2);
    }
}
