//! `text_encoder/config.json` as transformers writes it for `CLIPTextModel`.

use std::path::Path;

use serde::Deserialize;

use crate::weights::read_json;
use crate::{Error, Result};

/// The fields the forward pass needs; other fields (token ids, projection size, dtype, ...)
/// are ignored.
#[derive(Clone, Debug, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_max_positions() -> usize {
    77
}

fn default_act() -> String {
    "quick_gelu".into()
}

fn default_eps() -> f64 {
    1e-5
}

/// The MLP's activation: CLIP's `quick_gelu` (SD 1.x) or exact `gelu` (SD 2.x's OpenCLIP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    QuickGelu,
    Gelu,
    /// transformers' `gelu_new` / `gelu_pytorch_tanh`.
    GeluTanh,
}

impl ClipTextConfig {
    /// Reads and checks `config.json`.
    pub fn read(path: &Path) -> Result<ClipTextConfig> {
        let config: ClipTextConfig = read_json(path)?;
        config.validate().map_err(|m| Error::config(path, m))?;
        Ok(config)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let dims = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((name, _)) = dims.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} does not split into {} heads",
                self.hidden_size, self.num_attention_heads
            ));
        }
        // Ids reach the kernels as u32 row indices.
        if u32::try_from(self.vocab_size).is_err() {
            return Err(format!("vocab_size {} is too large", self.vocab_size));
        }
        self.activation().map(|_| ())
    }

    pub fn activation(&self) -> std::result::Result<Activation, String> {
        match self.hidden_act.as_str() {
            "quick_gelu" => Ok(Activation::QuickGelu),
            "gelu" => Ok(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
            other => Err(format!("unsupported hidden_act `{other}`")),
        }
    }
}
