//! AutoencoderKL: encode images to the latent posterior mean, decode latents to images.
//! Channels-last throughout: images `[batch, h, w, 3]` in [-1, 1], latents `[batch, h/f, w/f, c]`.

use std::path::Path;

use retouch_kernels::{Conv2dParams, Tensor};
use serde::Deserialize;

use crate::nn::{Conv2d, GroupNorm, Linear, ResnetBlock, ResnetShape, Scope};
use crate::weights::{Weights, read_json};
use crate::{Error, Result};

/// The VAE's resnets and attention use this epsilon in diffusers.
const EPS: f32 = 1e-6;

fn default_layers() -> usize {
    1
}
fn default_groups() -> usize {
    32
}
fn default_scaling() -> f32 {
    0.18215
}
fn default_true() -> bool {
    true
}

/// `vae/config.json` as diffusers writes it.
#[derive(Clone, Debug, Deserialize)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "default_layers")]
    pub layers_per_block: usize,
    pub latent_channels: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    /// Latents are multiplied by this before the UNet sees them (and divided after).
    #[serde(default = "default_scaling")]
    pub scaling_factor: f32,
    #[serde(default)]
    pub shift_factor: Option<f32>,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default)]
    pub act_fn: Option<String>,
}

impl VaeConfig {
    /// Rejects configurations Retouch does not implement, before any weight is read.
    fn check(&self, path: &Path) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::config(
                path,
                "block_out_channels and the block type lists must have the same non-zero length",
            ));
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            return Err(Error::config(
                path,
                format!("unsupported down block type {t:?}"),
            ));
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            return Err(Error::config(
                path,
                format!("unsupported up block type {t:?}"),
            ));
        }
        if self.act_fn.as_deref().is_some_and(|a| a != "silu") {
            return Err(Error::config(
                path,
                "act_fn other than \"silu\" is unsupported",
            ));
        }
        let groups = self.norm_num_groups;
        if let Some(c) = self.block_out_channels.iter().find(|&&c| c % groups != 0) {
            return Err(Error::config(
                path,
                format!("{c} channels do not split into {groups} groups"),
            ));
        }
        Ok(())
    }
}

/// The mid block's single-head spatial self-attention, with a residual connection.
struct MidAttention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl MidAttention {
    fn load(s: Scope<'_>, c: usize, groups: usize) -> Result<MidAttention> {
        // Checkpoints from before diffusers 0.14 name the projections query/key/value/proj_attn.
        let legacy = !s.contains("to_q.weight") && s.contains("query.weight");
        let names = if legacy {
            ["query", "key", "value", "proj_attn"]
        } else {
            ["to_q", "to_k", "to_v", "to_out.0"]
        };
        let linear = |n: &str| Linear::load(s.at(n).scope(), c, c, true);
        Ok(MidAttention {
            norm: GroupNorm::load(s.at("group_norm").scope(), c, groups, EPS)?,
            q: linear(names[0])?,
            k: linear(names[1])?,
            v: linear(names[2])?,
            out: linear(names[3])?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let shape = x.shape().to_vec();
        let tokens =
            self.norm
                .forward(x, false)?
                .reshape(&[shape[0], shape[1] * shape[2], shape[3]])?;
        let attended = Tensor::attention(
            &self.q.forward(&tokens)?,
            &self.k.forward(&tokens)?,
            &self.v.forward(&tokens)?,
            1,
            false,
        )?;
        Ok(self.out.forward(&attended)?.reshape(&shape)?.add(x)?)
    }
}

struct MidBlock {
    resnet_in: ResnetBlock,
    attention: Option<MidAttention>,
    resnet_out: ResnetBlock,
}

impl MidBlock {
    fn load(s: Scope<'_>, c: usize, groups: usize, attention: bool) -> Result<MidBlock> {
        let shape = resnet_shape(c, c, groups);
        Ok(MidBlock {
            resnet_in: ResnetBlock::load(s.at("resnets.0").scope(), shape)?,
            attention: if attention {
                Some(MidAttention::load(s.at("attentions.0").scope(), c, groups)?)
            } else {
                None
            },
            resnet_out: ResnetBlock::load(s.at("resnets.1").scope(), shape)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnet_in.forward(x, None)?;
        if let Some(attn) = &self.attention {
            h = attn.forward(&h)?;
        }
        self.resnet_out.forward(&h, None)
    }
}

fn resnet_shape(inp: usize, out: usize, groups: usize) -> ResnetShape {
    ResnetShape {
        inp,
        out,
        temb: None,
        groups,
        eps: EPS,
        output_scale: 1.0,
    }
}

/// A stage of the encoder or decoder: resnets, then an optional resampling conv.
struct Stage {
    resnets: Vec<ResnetBlock>,
    resample: Option<Conv2d>,
}

pub struct Vae {
    config: VaeConfig,
    enc_conv_in: Conv2d,
    enc_stages: Vec<Stage>,
    enc_mid: MidBlock,
    enc_norm_out: GroupNorm,
    enc_conv_out: Conv2d,
    quant_conv: Option<Linear>,
    post_quant_conv: Option<Linear>,
    dec_conv_in: Conv2d,
    dec_mid: MidBlock,
    dec_stages: Vec<Stage>,
    dec_norm_out: GroupNorm,
    dec_conv_out: Conv2d,
}

impl Vae {
    /// Loads a `vae/` folder (config.json + weights).
    pub fn load(dir: impl AsRef<Path>, variant: Option<&str>) -> Result<Vae> {
        let dir = dir.as_ref();
        let path = dir.join("config.json");
        let config: VaeConfig = read_json(&path)?;
        // Before opening the weights, so an unsupported config is the error reported.
        config.check(&path)?;
        let weights = Weights::open(dir, variant)?;
        Vae::from_weights(config, &path, &weights)
    }

    /// Builds the VAE from a parsed config and opened (or random) weights; `config_path`
    /// names the config in errors.
    pub fn from_weights(config: VaeConfig, config_path: &Path, weights: &Weights) -> Result<Vae> {
        config.check(config_path)?;
        let n = config.block_out_channels.len();
        let groups = config.norm_num_groups;
        let s = Scope::root(weights);
        let ch = config.block_out_channels.clone();
        let lat = config.latent_channels;
        let same = Conv2dParams::SAME_3X3;

        let e = s.at("encoder");
        let e = e.scope();
        let mut enc_stages = Vec::with_capacity(n);
        let mut out_ch = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = c;
            let b = e.at(format!("down_blocks.{i}"));
            let b = b.scope();
            let resnets = (0..config.layers_per_block)
                .map(|j| {
                    let inp = if j == 0 { in_ch } else { out_ch };
                    ResnetBlock::load(
                        b.at(format!("resnets.{j}")).scope(),
                        resnet_shape(inp, out_ch, groups),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            // diffusers pads right and bottom by one, then convolves with stride 2, no padding.
            let down = Conv2dParams {
                stride: 2,
                padding: 0,
            };
            let resample = if i + 1 < n {
                Some(Conv2d::load(
                    b.at("downsamplers.0.conv").scope(),
                    out_ch,
                    out_ch,
                    3,
                    down,
                )?)
            } else {
                None
            };
            enc_stages.push(Stage { resnets, resample });
        }
        let last = ch[n - 1];

        let d = s.at("decoder");
        let d = d.scope();
        let mut dec_stages = Vec::with_capacity(n);
        let mut out_ch = last;
        for i in 0..n {
            let prev = out_ch;
            out_ch = ch[n - 1 - i];
            let b = d.at(format!("up_blocks.{i}"));
            let b = b.scope();
            let resnets = (0..config.layers_per_block + 1)
                .map(|j| {
                    let inp = if j == 0 { prev } else { out_ch };
                    ResnetBlock::load(
                        b.at(format!("resnets.{j}")).scope(),
                        resnet_shape(inp, out_ch, groups),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let resample = if i + 1 < n {
                Some(Conv2d::load(
                    b.at("upsamplers.0.conv").scope(),
                    out_ch,
                    out_ch,
                    3,
                    same,
                )?)
            } else {
                None
            };
            dec_stages.push(Stage { resnets, resample });
        }

        Ok(Vae {
            enc_conv_in: Conv2d::load(e.at("conv_in").scope(), config.in_channels, ch[0], 3, same)?,
            enc_stages,
            enc_mid: MidBlock::load(
                e.at("mid_block").scope(),
                last,
                groups,
                config.mid_block_add_attention,
            )?,
            enc_norm_out: GroupNorm::load(e.at("conv_norm_out").scope(), last, groups, EPS)?,
            enc_conv_out: Conv2d::load(e.at("conv_out").scope(), last, 2 * lat, 3, same)?,
            quant_conv: if config.use_quant_conv {
                Some(Linear::load_pointwise_conv(
                    s.at("quant_conv").scope(),
                    2 * lat,
                    2 * lat,
                )?)
            } else {
                None
            },
            post_quant_conv: if config.use_post_quant_conv {
                Some(Linear::load_pointwise_conv(
                    s.at("post_quant_conv").scope(),
                    lat,
                    lat,
                )?)
            } else {
                None
            },
            dec_conv_in: Conv2d::load(d.at("conv_in").scope(), lat, last, 3, same)?,
            dec_mid: MidBlock::load(
                d.at("mid_block").scope(),
                last,
                groups,
                config.mid_block_add_attention,
            )?,
            dec_stages,
            dec_norm_out: GroupNorm::load(d.at("conv_norm_out").scope(), ch[0], groups, EPS)?,
            dec_conv_out: Conv2d::load(
                d.at("conv_out").scope(),
                ch[0],
                config.out_channels,
                3,
                same,
            )?,
            config,
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Spatial down-sampling factor between images and latents.
    pub fn factor(&self) -> usize {
        1 << (self.config.block_out_channels.len() - 1)
    }

    /// The posterior mean of `image = [batch, h, w, in_channels]` (values in [-1, 1]), unscaled.
    pub fn encode_mean(&self, image: &Tensor) -> Result<Tensor> {
        let s = image.shape();
        if s.len() != 4 || s[3] != self.config.in_channels {
            return Err(Error::Invalid(format!(
                "vae encode: image must be [batch, h, w, {}], got {s:?}",
                self.config.in_channels
            )));
        }
        let mut h = self.enc_conv_in.forward(image)?;
        for stage in &self.enc_stages {
            for r in &stage.resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(conv) = &stage.resample {
                h = conv.forward(&h.pad2d(0, 1, 0, 1)?)?;
            }
        }
        h = self.enc_mid.forward(&h)?;
        let mut moments = self
            .enc_conv_out
            .forward(&self.enc_norm_out.forward(&h, true)?)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        let lat = self.config.latent_channels;
        Ok(moments.split_last(&[lat, lat])?.swap_remove(0))
    }

    /// Decodes unscaled latents `[batch, h, w, latent_channels]` to images in about [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let s = latents.shape();
        if s.len() != 4 || s[3] != self.config.latent_channels {
            return Err(Error::Invalid(format!(
                "vae decode: latents must be [batch, h, w, {}], got {s:?}",
                self.config.latent_channels
            )));
        }
        let mut h = match &self.post_quant_conv {
            Some(p) => p.forward(latents)?,
            None => latents.clone(),
        };
        h = self.dec_mid.forward(&self.dec_conv_in.forward(&h)?)?;
        for stage in &self.dec_stages {
            for r in &stage.resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(conv) = &stage.resample {
                h = conv.forward(&h.upsample_nearest2x()?)?;
            }
        }
        self.dec_conv_out
            .forward(&self.dec_norm_out.forward(&h, true)?)
    }
}
