//! CLIP's text encoder: transformers' `CLIPTextModel`, returning `last_hidden_state`.
//!
//! Token + position embeddings, pre-LN layers of causal self-attention and an MLP, a final
//! layer norm. Configured from `text_encoder/config.json`; weights fp32 or fp16, named as
//! transformers saves them, with the `text_model.` prefix (published checkpoints, transformers
//! 4) or without it (transformers 5). Every batch goes through each kernel in one call.

mod config;
mod embeddings;
mod layer;

use std::path::Path;

use retouch_kernels::{DType, Tensor};

pub use config::{Activation, ClipTextConfig};
use embeddings::Embeddings;
use layer::{EncoderLayer, LayerNorm, LayerShape};

use crate::weights::Weights;
use crate::{Error, Result};

/// Prefix of the weight names in published checkpoints.
const PREFIX: &str = "text_model.";

pub struct ClipTextEncoder {
    config: ClipTextConfig,
    embeddings: Embeddings,
    layers: Vec<EncoderLayer>,
    final_norm: LayerNorm,
}

/// A component's weights read under the name prefix its checkpoint uses.
pub(crate) struct Prefixed<'a> {
    weights: &'a Weights,
    prefix: &'static str,
}

impl Prefixed<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.weights.get(&format!("{}{name}", self.prefix), shape)
    }
}

impl ClipTextEncoder {
    /// Loads a `text_encoder/` folder: `config.json` and `model.safetensors` (or the fp16
    /// variant when only it exists).
    pub fn load(dir: impl AsRef<Path>) -> Result<ClipTextEncoder> {
        Self::load_variant(dir, None)
    }

    /// As `load`, preferring the `model.{variant}.safetensors` weights (e.g. `"fp16"`).
    pub fn load_variant(dir: impl AsRef<Path>, variant: Option<&str>) -> Result<ClipTextEncoder> {
        let dir = dir.as_ref();
        let config = ClipTextConfig::read(&dir.join("config.json"))?;
        let weights = Weights::open(dir, variant)?;
        Self::from_weights(config, &weights)
    }

    /// Builds the encoder from an already parsed config and opened weights; computes in f32
    /// whatever the stored dtype.
    pub fn from_weights(config: ClipTextConfig, weights: &Weights) -> Result<ClipTextEncoder> {
        let unprefixed = "embeddings.token_embedding.weight";
        // Without either name, keep the published prefix so errors name the usual tensor.
        let prefix = if !weights.contains(&format!("{PREFIX}{unprefixed}"))
            && weights.contains(unprefixed)
        {
            ""
        } else {
            PREFIX
        };
        let w = Prefixed { weights, prefix };
        let c = &config;
        let shape = LayerShape {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            eps: c.layer_norm_eps as f32,
            activation: c.activation().map_err(Error::Invalid)?,
        };
        let embeddings =
            Embeddings::load(&w, c.vocab_size, c.max_position_embeddings, c.hidden_size)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::load(&w, i, &shape))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = LayerNorm::load(&w, "final_layer_norm", c.hidden_size, shape.eps)?;
        Ok(ClipTextEncoder {
            config,
            embeddings,
            layers,
            final_norm,
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// `last_hidden_state` for int64 ids `[batch, tokens]` (or `[tokens]`, one sequence):
    /// `[batch, tokens, hidden]`. Ids outside the vocabulary are an error.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        if input_ids.dtype() != DType::I64 || !(1..=2).contains(&input_ids.rank()) {
            return Err(Error::Invalid(format!(
                "input ids must be an int64 [batch, tokens] tensor, got {:?} {:?}",
                input_ids.dtype(),
                input_ids.shape()
            )));
        }
        let batch = if input_ids.rank() == 2 {
            input_ids.shape()[0]
        } else {
            1
        };
        let ids = input_ids
            .as_slice::<i64>()?
            .iter()
            .map(|&id| {
                u32::try_from(id).map_err(|_| {
                    Error::Invalid(format!(
                        "token id {id} is outside the vocabulary of {}",
                        self.config.vocab_size
                    ))
                })
            })
            .collect::<Result<Vec<u32>>>()?;
        self.forward_ids(&ids, batch)
    }

    /// `last_hidden_state` for `batch` sequences of equal length laid end to end in `ids`
    /// (as `ClipTokenizer::encode_batch` returns them): `[batch, tokens, hidden]`.
    pub fn forward_ids(&self, ids: &[u32], batch: usize) -> Result<Tensor> {
        let mut x = self.embeddings.forward(ids, batch)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        self.final_norm.forward(&x)
    }
}
