use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

/// A value diffusers accepts either once for all blocks or per block.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    fn expand(&self, blocks: usize, what: &str, path: &Path) -> Result<Vec<usize>> {
        match self {
            PerBlock::One(v) => Ok(vec![*v; blocks]),
            PerBlock::Each(v) if v.len() == blocks => Ok(v.clone()),
            PerBlock::Each(v) => Err(Error::config(
                path,
                format!("{what} has {} entries for {blocks} blocks", v.len()),
            )),
        }
    }
}

fn default_groups() -> usize {
    32
}
fn default_eps() -> f32 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_one() -> f32 {
    1.0
}
fn default_per_block_one() -> PerBlock {
    PerBlock::One(1)
}
fn default_layers() -> PerBlock {
    PerBlock::One(2)
}
fn default_kernel() -> usize {
    3
}

/// `unet/config.json` as diffusers writes it (fields Retouch reads; others are checked for
/// values it does not support).
#[derive(Clone, Debug, Deserialize)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub mid_block_type: Option<String>,
    #[serde(default = "default_layers")]
    pub layers_per_block: PerBlock,
    pub cross_attention_dim: usize,
    #[serde(default)]
    pub attention_head_dim: Option<PerBlock>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default = "default_per_block_one")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_eps")]
    pub norm_eps: f32,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f32,
    #[serde(default = "default_one")]
    pub mid_block_scale_factor: f32,
    #[serde(default)]
    pub downsample_padding: Option<usize>,
    #[serde(default = "default_kernel")]
    pub conv_in_kernel: usize,
    #[serde(default = "default_kernel")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub sample_size: Option<usize>,
    // Options Retouch rejects when set, so a config it cannot run fails at load time.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub resnet_time_scale_shift: Option<String>,
    #[serde(default)]
    pub only_cross_attention: Option<serde_json::Value>,
    #[serde(default)]
    pub dual_cross_attention: Option<bool>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_type: Option<String>,
    #[serde(default)]
    pub act_fn: Option<String>,
}

/// The per-block settings a config implies, with diffusers' conventions applied.
#[derive(Clone, Debug)]
pub struct UNetPlan {
    pub layers: Vec<usize>,
    /// Attention heads per down block (up blocks use them reversed, the mid block the last).
    pub heads: Vec<usize>,
    pub depth: Vec<usize>,
    pub cross_attention: Vec<bool>,
    pub up_cross_attention: Vec<bool>,
}

impl UNetConfig {
    /// Checks that Retouch implements this configuration and derives the per-block plan.
    pub fn plan(&self, path: &Path) -> Result<UNetPlan> {
        let unsupported = |what: String| {
            Err(Error::config(
                path,
                format!("unsupported UNet config: {what}"),
            ))
        };
        let blocks = self.block_out_channels.len();
        if blocks == 0
            || self.down_block_types.len() != blocks
            || self.up_block_types.len() != blocks
        {
            return Err(Error::config(
                path,
                "block_out_channels, down_block_types and up_block_types must have the same non-zero length",
            ));
        }
        if let Some(t) = &self.addition_embed_type {
            return unsupported(format!(
                "addition_embed_type {t:?} (SDXL-style added conditioning)"
            ));
        }
        if let Some(t) = &self.class_embed_type {
            return unsupported(format!("class_embed_type {t:?}"));
        }
        if self.time_cond_proj_dim.is_some() || self.encoder_hid_dim.is_some() {
            return unsupported("time_cond_proj_dim / encoder_hid_dim".into());
        }
        if self
            .resnet_time_scale_shift
            .as_deref()
            .is_some_and(|s| s != "default")
        {
            return unsupported("resnet_time_scale_shift other than \"default\"".into());
        }
        if self
            .only_cross_attention
            .as_ref()
            .is_some_and(|v| v != &serde_json::Value::Bool(false))
        {
            return unsupported("only_cross_attention".into());
        }
        if self.dual_cross_attention == Some(true) {
            return unsupported("dual_cross_attention".into());
        }
        if self
            .time_embedding_type
            .as_deref()
            .is_some_and(|t| t != "positional")
        {
            return unsupported("time_embedding_type other than \"positional\"".into());
        }
        if self.act_fn.as_deref().is_some_and(|a| a != "silu") {
            return unsupported("act_fn other than \"silu\"".into());
        }
        if self
            .mid_block_type
            .as_deref()
            .is_some_and(|m| m != "UNetMidBlock2DCrossAttn")
        {
            return unsupported(format!("mid_block_type {:?}", self.mid_block_type));
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            return unsupported("even conv_in/conv_out kernels".into());
        }
        let cross = |types: &[String], kind: &str| -> Result<Vec<bool>> {
            types
                .iter()
                .map(|t| match t.as_str() {
                    x if x == format!("CrossAttn{kind}Block2D") => Ok(true),
                    x if x == format!("{kind}Block2D") => Ok(false),
                    other => Err(Error::config(
                        path,
                        format!("unsupported block type {other:?}"),
                    )),
                })
                .collect()
        };
        // diffusers reads `attention_head_dim` as the head count when `num_attention_heads`
        // is absent (a naming accident kept for SD 1.x/2.x configs).
        let heads = self
            .num_attention_heads
            .as_ref()
            .or(self.attention_head_dim.as_ref())
            .ok_or_else(|| {
                Error::config(
                    path,
                    "neither num_attention_heads nor attention_head_dim is set",
                )
            })?
            .expand(blocks, "attention heads", path)?;
        let plan = UNetPlan {
            layers: self
                .layers_per_block
                .expand(blocks, "layers_per_block", path)?,
            heads,
            depth: self.transformer_layers_per_block.expand(
                blocks,
                "transformer_layers_per_block",
                path,
            )?,
            cross_attention: cross(&self.down_block_types, "Down")?,
            up_cross_attention: cross(&self.up_block_types, "Up")?,
        };
        for (i, (&c, &h)) in self.block_out_channels.iter().zip(&plan.heads).enumerate() {
            if h == 0 || !c.is_multiple_of(h) || !c.is_multiple_of(self.norm_num_groups) {
                return Err(Error::config(
                    path,
                    format!(
                        "block {i}: {c} channels do not split into {h} heads and {} groups",
                        self.norm_num_groups
                    ),
                ));
            }
        }
        Ok(plan)
    }
}
