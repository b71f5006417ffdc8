//! UNet2DConditionModel (SD 1.x and 2.x configurations) over channels-last tensors.

mod config;
mod device;
mod masked;
mod walk;

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, OnceLock};

use retouch_kernels::{Conv2dParams, DType, Tensor, TimestepEmbedding};

pub use config::{PerBlock, UNetConfig, UNetPlan};
pub use masked::{
    CachedSegment, GpuCachedSegment, GpuRecomputeSegment, RecomputeSegment, token_levels,
};

use crate::nn::exec::{Exec, StepCache};
use crate::nn::{
    Conv2d, GroupNorm, Linear, ResnetBlock, ResnetShape, Scope, Transformer2D, TransformerShape,
};
use crate::weights::{Weights, read_json};
use crate::{Error, Result};
use walk::Boundaries;

/// One down block: resnets (each followed by a transformer in cross-attention blocks), then
/// an optional stride-2 conv.
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    downsample: Option<Conv2d>,
}

/// One up block: resnets over (hidden, skip) concatenations, optional transformers, then an
/// optional nearest-2x + conv.
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    upsample: Option<Conv2d>,
}

struct MidBlock {
    resnet_in: ResnetBlock,
    attention: Transformer2D,
    resnet_out: ResnetBlock,
}

pub struct UNet {
    config: UNetConfig,
    time_proj: TimestepEmbedding,
    time_linear_1: Linear,
    time_linear_2: Linear,
    conv_in: Conv2d,
    down: Vec<DownBlock>,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    /// [`UNet::entry_starts`], found once.
    entry_starts: OnceLock<Vec<usize>>,
    /// The unit times of the last whole dense or masked forward on the host.
    last_walk: Mutex<Option<UnitTimes>>,
    /// The GPU timing marks of the last whole dense or masked forward on a device.
    last_device_walk: Mutex<Option<device::DeviceWalkTimes>>,
    /// Whether device walks mark their unit boundaries ([`UNet::set_device_unit_timing`]).
    time_device_units: AtomicBool,
}

/// Each unit's seconds in one host forward of the UNet (units as [`UNet::entry_starts`]
/// counts them), with what it ran on: a serving worker learns its per-unit costs from these.
#[derive(Clone, Debug, PartialEq)]
pub struct UnitTimes {
    /// Masked (active rows only) or dense (whole maps; a recording counts as dense).
    pub masked: bool,
    /// Dense: the samples of the batch; masked: the level-0 active rows of all segments.
    pub size: usize,
    pub seconds: Vec<f64>,
}

impl UNet {
    /// Loads a `unet/` folder (config.json + weights; `variant` as in [`Weights::open`]).
    pub fn load(dir: impl AsRef<Path>, variant: Option<&str>) -> Result<UNet> {
        let dir = dir.as_ref();
        let config_path = dir.join("config.json");
        let config: UNetConfig = read_json(&config_path)?;
        let weights = Weights::open(dir, variant)?;
        UNet::from_weights(config, &config_path, &weights)
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Builds the UNet from a parsed config and opened (or random) weights; `config_path`
    /// names the config in errors.
    pub fn from_weights(config: UNetConfig, config_path: &Path, weights: &Weights) -> Result<UNet> {
        let plan = config.plan(config_path)?;
        let s = Scope::root(weights);
        let ch = &config.block_out_channels;
        let n = ch.len();
        let temb = ch[0] * 4;
        let groups = config.norm_num_groups;
        let resnet = |inp, out, scale| ResnetShape {
            inp,
            out,
            temb: Some(temb),
            groups,
            eps: config.norm_eps,
            output_scale: scale,
        };
        let transformer = |channels, heads, depth| TransformerShape {
            channels,
            heads,
            depth,
            context_dim: config.cross_attention_dim,
            groups,
            linear_projection: config.use_linear_projection,
        };
        let same = |k: usize| Conv2dParams {
            stride: 1,
            padding: k / 2,
        };

        let mut down = Vec::with_capacity(n);
        let mut out_ch = ch[0];
        for (i, &block_ch) in ch.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = block_ch;
            let b = s.at(format!("down_blocks.{i}"));
            let b = b.scope();
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..plan.layers[i] {
                let inp = if j == 0 { in_ch } else { out_ch };
                resnets.push(ResnetBlock::load(
                    b.at(format!("resnets.{j}")).scope(),
                    resnet(inp, out_ch, 1.0),
                )?);
                if plan.cross_attention[i] {
                    let t = transformer(out_ch, plan.heads[i], plan.depth[i]);
                    attentions.push(Transformer2D::load(
                        b.at(format!("attentions.{j}")).scope(),
                        t,
                    )?);
                }
            }
            let downsample = if i + 1 < n {
                let params = Conv2dParams {
                    stride: 2,
                    padding: config.downsample_padding.unwrap_or(1),
                };
                Some(Conv2d::load(
                    b.at("downsamplers.0.conv").scope(),
                    out_ch,
                    out_ch,
                    3,
                    params,
                )?)
            } else {
                None
            };
            down.push(DownBlock {
                resnets,
                attentions,
                downsample,
            });
        }

        let last = ch[n - 1];
        let m = s.at("mid_block");
        let m = m.scope();
        let mid_shape = resnet(last, last, config.mid_block_scale_factor);
        let mid = MidBlock {
            resnet_in: ResnetBlock::load(m.at("resnets.0").scope(), mid_shape)?,
            attention: Transformer2D::load(
                m.at("attentions.0").scope(),
                transformer(last, plan.heads[n - 1], plan.depth[n - 1]),
            )?,
            resnet_out: ResnetBlock::load(m.at("resnets.1").scope(), mid_shape)?,
        };

        let mut up = Vec::with_capacity(n);
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut out_ch = rev[0];
        for i in 0..n {
            let prev_out = out_ch;
            out_ch = rev[i];
            let in_ch = rev[(i + 1).min(n - 1)];
            let down_index = n - 1 - i;
            let layers = plan.layers[down_index] + 1;
            let b = s.at(format!("up_blocks.{i}"));
            let b = b.scope();
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers {
                let skip = if j == layers - 1 { in_ch } else { out_ch };
                let inp = if j == 0 { prev_out } else { out_ch };
                resnets.push(ResnetBlock::load(
                    b.at(format!("resnets.{j}")).scope(),
                    resnet(inp + skip, out_ch, 1.0),
                )?);
                if plan.up_cross_attention[i] {
                    let t = transformer(out_ch, plan.heads[down_index], plan.depth[down_index]);
                    attentions.push(Transformer2D::load(
                        b.at(format!("attentions.{j}")).scope(),
                        t,
                    )?);
                }
            }
            let upsample = if i + 1 < n {
                Some(Conv2d::load(
                    b.at("upsamplers.0.conv").scope(),
                    out_ch,
                    out_ch,
                    3,
                    Conv2dParams::SAME_3X3,
                )?)
            } else {
                None
            };
            up.push(UpBlock {
                resnets,
                attentions,
                upsample,
            });
        }

        Ok(UNet {
            entry_starts: OnceLock::new(),
            last_walk: Mutex::new(None),
            last_device_walk: Mutex::new(None),
            time_device_units: AtomicBool::new(false),
            time_proj: TimestepEmbedding {
                dim: ch[0],
                flip_sin_to_cos: config.flip_sin_to_cos,
                downscale_freq_shift: config.freq_shift,
                scale: 1.0,
                max_period: 10000.0,
            },
            time_linear_1: Linear::load(
                s.at("time_embedding.linear_1").scope(),
                ch[0],
                temb,
                true,
            )?,
            time_linear_2: Linear::load(s.at("time_embedding.linear_2").scope(), temb, temb, true)?,
            conv_in: Conv2d::load(
                s.at("conv_in").scope(),
                config.in_channels,
                ch[0],
                config.conv_in_kernel,
                same(config.conv_in_kernel),
            )?,
            down,
            mid,
            up,
            norm_out: GroupNorm::load(
                s.at("conv_norm_out").scope(),
                ch[0],
                groups,
                config.norm_eps,
            )?,
            conv_out: Conv2d::load(
                s.at("conv_out").scope(),
                ch[0],
                config.out_channels,
                config.conv_out_kernel,
                same(config.conv_out_kernel),
            )?,
            config,
        })
    }

    /// The UNet's noise (or v) prediction. `sample = [batch, h, w, in_channels]`
    /// (channels-last), one timestep per sample, `context = [batch, tokens, cross_dim]`.
    /// `h` and `w` must be divisible by 2^(blocks - 1).
    pub fn forward(&self, sample: &Tensor, timesteps: &[f32], context: &Tensor) -> Result<Tensor> {
        self.check_inputs(sample.shape(), timesteps, context.shape())?;
        self.run(
            sample,
            timesteps,
            context,
            &mut Exec::Dense,
            &mut Boundaries::default(),
        )
    }

    /// The dense forward, also recording the activations a cached-mode edit of this step
    /// needs (stored as `dtype`).
    pub fn forward_recording(
        &self,
        sample: &Tensor,
        timesteps: &[f32],
        context: &Tensor,
        dtype: DType,
    ) -> Result<(Tensor, StepCache)> {
        self.check_inputs(sample.shape(), timesteps, context.shape())?;
        let mut cache = StepCache::default();
        let out = self.run(
            sample,
            timesteps,
            context,
            &mut Exec::Record {
                cache: &mut cache,
                dtype,
            },
            &mut Boundaries::default(),
        )?;
        Ok((out, cache))
    }

    fn run<'a>(
        &self,
        sample: &Tensor,
        timesteps: &[f32],
        context: &Tensor,
        exec: &mut Exec<'a>,
        walk: &mut Boundaries<'a>,
    ) -> Result<Tensor> {
        // One timestep per sample (per segment when masked).
        let t = Tensor::from_vec(timesteps.to_vec(), &[timesteps.len()])?;
        let emb = self
            .time_linear_1
            .forward(&self.time_proj.embed(&t)?)?
            .silu()?;
        let temb = self.time_linear_2.forward(&emb)?.silu()?;

        // What this walk runs on (samples, or active rows), for its unit times; a walk that
        // switches mode, or counts entries, keeps none.
        let size = sample.dim(0)?;
        let masked = matches!(exec, Exec::Masked(_));
        let timed = !walk.switch_pending() && walk.entry_starts.is_none();
        let mut h = sample.clone();
        let mut skips: Vec<Tensor> = Vec::new();
        let mut skip_levels: Vec<usize> = Vec::new();
        walk.pass(exec, &mut h, &mut skips, 0, &skip_levels)?;
        h = self.conv_in.forward_exec(&h, exec, None)?;
        skips.push(h.clone());
        skip_levels.push(0);
        let mut level = 0;
        for block in &self.down {
            for (j, resnet) in block.resnets.iter().enumerate() {
                walk.pass(exec, &mut h, &mut skips, level, &skip_levels)?;
                h = resnet.forward_exec(&h, Some(&temb), exec)?;
                if let Some(attn) = block.attentions.get(j) {
                    walk.pass(exec, &mut h, &mut skips, level, &skip_levels)?;
                    h = attn.forward_exec(&h, context, exec)?;
                }
                skips.push(h.clone());
                skip_levels.push(level);
            }
            if let Some(conv) = &block.downsample {
                walk.pass(exec, &mut h, &mut skips, level, &skip_levels)?;
                h = conv.forward_exec(&h, exec, Some(level + 1))?;
                level += 1;
                set_level(exec, level);
                skips.push(h.clone());
                skip_levels.push(level);
            }
        }

        walk.pass(exec, &mut h, &mut skips, level, &skip_levels)?;
        h = self.mid.resnet_in.forward_exec(&h, Some(&temb), exec)?;
        walk.pass(exec, &mut h, &mut skips, level, &skip_levels)?;
        h = self.mid.attention.forward_exec(&h, context, exec)?;
        walk.pass(exec, &mut h, &mut skips, level, &skip_levels)?;
        h = self.mid.resnet_out.forward_exec(&h, Some(&temb), exec)?;

        for block in &self.up {
            for (j, resnet) in block.resnets.iter().enumerate() {
                walk.pass(exec, &mut h, &mut skips, level, &skip_levels)?;
                let skip = skips
                    .pop()
                    .ok_or_else(|| Error::Invalid("unet: skip stack underflow".into()))?;
                skip_levels.pop();
                h = resnet.forward_exec(&Tensor::concat_last(&[&h, &skip])?, Some(&temb), exec)?;
                if let Some(attn) = block.attentions.get(j) {
                    walk.pass(exec, &mut h, &mut skips, level, &skip_levels)?;
                    h = attn.forward_exec(&h, context, exec)?;
                }
            }
            if let Some(conv) = &block.upsample {
                walk.pass(exec, &mut h, &mut skips, level, &skip_levels)?;
                level = level.checked_sub(1).ok_or_else(|| {
                    Error::Invalid("unet: more up-samplers than down-samplers".into())
                })?;
                h = upsample(&h, exec, level)?;
                h = conv.forward_exec(&h, exec, None)?;
            }
        }
        walk.pass(exec, &mut h, &mut skips, level, &skip_levels)?;
        let normed = self.norm_out.forward_exec(&h, true, exec)?;
        h = self.conv_out.forward_exec(&normed, exec, None)?;
        walk.pass(exec, &mut h, &mut skips, level, &skip_levels)?;
        if timed {
            let times = UnitTimes {
                masked,
                size,
                seconds: walk.unit_seconds(),
            };
            *self
                .last_walk
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(times);
        }
        Ok(h)
    }

    /// The cache entries a recording has made before each unit boundary of a forward (before
    /// `conv_in`, each resnet, each transformer, each down- or up-sampler and the output norm,
    /// then at the end: the last value is the length of a step's recording). A forward that
    /// recomputes its first `k` units densely reads its cache from entry `entry_starts[k]`.
    /// Found once, by recording a forward on the smallest latent the network takes.
    pub fn entry_starts(&self) -> Result<&[usize]> {
        if let Some(starts) = self.entry_starts.get() {
            return Ok(starts);
        }
        let side = 1usize << (self.down.len() - 1);
        let sample = Tensor::zeros(
            &[1, side, side, self.config.in_channels],
            DType::F32,
            Default::default(),
        );
        let context = Tensor::zeros(
            &[1, 1, self.config.cross_attention_dim],
            DType::F32,
            Default::default(),
        );
        let mut cache = StepCache::default();
        let mut walk = Boundaries::counting();
        let mut exec = Exec::Record {
            cache: &mut cache,
            dtype: DType::F32,
        };
        self.run(&sample, &[0.0], &context, &mut exec, &mut walk)?;
        let starts = walk.entry_starts.take().unwrap_or_default();
        Ok(self.entry_starts.get_or_init(|| starts))
    }

    /// The unit times of the last dense, recording or masked forward on the host (not one
    /// that recomputed a dense prefix), taken: each forward's times are read once.
    pub fn take_unit_times(&self) -> Option<UnitTimes> {
        self.last_walk
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }

    /// Unit boundaries of a forward: a recomputing forward switches at one of
    /// `0..=units()` (0: the whole forward masked; `units()`: the whole forward dense).
    pub fn units(&self) -> Result<usize> {
        Ok(self.entry_starts()?.len().saturating_sub(1))
    }

    /// Every attention projection of the network (q, k, v, out of each self- and
    /// cross-attention), in down, mid, up order: what an attention LoRA patches.
    pub fn attention_projections_mut(&mut self) -> Vec<&mut Linear> {
        let down = self.down.iter_mut().flat_map(|b| b.attentions.iter_mut());
        let up = self.up.iter_mut().flat_map(|b| b.attentions.iter_mut());
        down.chain(std::iter::once(&mut self.mid.attention))
            .chain(up)
            .flat_map(Transformer2D::attention_projections_mut)
            .collect()
    }

    fn check_inputs(&self, shape: &[usize], timesteps: &[f32], cs: &[usize]) -> Result<()> {
        let factor = 1usize << (self.down.len() - 1);
        if shape.len() != 4 || shape[3] != self.config.in_channels {
            return Err(Error::Invalid(format!(
                "unet: sample must be [batch, h, w, {}], got {shape:?}",
                self.config.in_channels
            )));
        }
        let batch = shape[0];
        if !shape[1].is_multiple_of(factor) || !shape[2].is_multiple_of(factor) {
            return Err(Error::Invalid(format!(
                "unet: latent size {}x{} is not divisible by {factor}",
                shape[1], shape[2]
            )));
        }
        if timesteps.len() != batch {
            return Err(Error::Invalid(format!(
                "unet: {} timesteps for {batch} samples",
                timesteps.len()
            )));
        }
        if cs.len() != 3 || cs[0] != batch || cs[2] != self.config.cross_attention_dim {
            return Err(Error::Invalid(format!(
                "unet: encoder_hidden_states must be [{batch}, tokens, {}], got {cs:?}",
                self.config.cross_attention_dim
            )));
        }
        Ok(())
    }
}

fn set_level(exec: &mut Exec<'_>, level: usize) {
    if let Exec::Masked(m) = exec {
        m.set_level(level);
    }
}

/// Nearest 2x up-sampling to `level`: of the map when dense, of the rows when masked.
fn upsample(h: &Tensor, exec: &mut Exec<'_>, level: usize) -> Result<Tensor> {
    match exec {
        Exec::Masked(m) => masked::upsample_rows(h, m, level),
        _ => Ok(h.upsample_nearest2x()?),
    }
}
