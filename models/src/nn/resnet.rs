use retouch_kernels::cuda::{CudaDevice, CudaTensor};
use retouch_kernels::{Conv2dParams, Tensor};

use super::exec::{Exec, add_per_sample};
use super::gpu::GpuMasked;
use super::{Conv2d, ConvExtra, GroupNorm, Linear, Scope};
use crate::Result;

/// diffusers' ResnetBlock2D ("default" time-embedding mode): GN-SiLU-conv, plus the projected
/// time embedding per sample, GN-SiLU-conv, plus the (1x1-projected) input.
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Linear>,
    output_scale: f32,
    /// On the device: the time-embedding projection's bias plus `conv1`'s, so that `conv1`
    /// adds the projected embedding as its bias per sample (set by `upload`).
    temb_conv_bias: Option<CudaTensor>,
}

/// Channel counts and norm settings of a resnet block.
#[derive(Clone, Copy, Debug)]
pub struct ResnetShape {
    pub inp: usize,
    pub out: usize,
    /// Width of the time embedding, or None (the VAE's resnets have none).
    pub temb: Option<usize>,
    pub groups: usize,
    pub eps: f32,
    pub output_scale: f32,
}

impl ResnetBlock {
    pub fn load(s: Scope<'_>, shape: ResnetShape) -> Result<ResnetBlock> {
        let ResnetShape {
            inp,
            out,
            temb,
            groups,
            eps,
            output_scale,
        } = shape;
        let same = Conv2dParams::SAME_3X3;
        Ok(ResnetBlock {
            norm1: GroupNorm::load(s.at("norm1").scope(), inp, groups, eps)?,
            conv1: Conv2d::load(s.at("conv1").scope(), inp, out, 3, same)?,
            time_emb_proj: match temb {
                Some(t) => Some(Linear::load(s.at("time_emb_proj").scope(), t, out, true)?),
                None => None,
            },
            norm2: GroupNorm::load(s.at("norm2").scope(), out, groups, eps)?,
            conv2: Conv2d::load(s.at("conv2").scope(), out, out, 3, same)?,
            shortcut: if inp != out {
                Some(Linear::load_pointwise_conv(
                    s.at("conv_shortcut").scope(),
                    inp,
                    out,
                )?)
            } else {
                None
            },
            output_scale,
            temb_conv_bias: None,
        })
    }

    /// `x = [batch, h, w, in]`; `temb_act` is the SiLU of the time embedding `[batch, temb]`.
    pub fn forward(&self, x: &Tensor, temb_act: Option<&Tensor>) -> Result<Tensor> {
        self.forward_exec(x, temb_act, &mut Exec::Dense)
    }

    /// The block in any mode (masked: `x = [rows, in]`, the segments' active rows stacked).
    pub fn forward_exec(
        &self,
        x: &Tensor,
        temb_act: Option<&Tensor>,
        exec: &mut Exec<'_>,
    ) -> Result<Tensor> {
        let mut h =
            self.conv1
                .forward_exec(&self.norm1.forward_exec(x, true, exec)?, exec, None)?;
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb_act) {
            // One vector per sample (per segment when masked), over its map (or rows).
            h = add_per_sample(&h, &proj.forward(t)?, exec)?;
        }
        let h = self
            .conv2
            .forward_exec(&self.norm2.forward_exec(&h, true, exec)?, exec, None)?;
        let residual = match &self.shortcut {
            Some(proj) => proj.forward(x)?,
            None => x.clone(),
        };
        let sum = residual.add(&h)?;
        if self.output_scale == 1.0 {
            Ok(sum)
        } else {
            Ok(sum.affine(1.0 / self.output_scale, 0.0)?)
        }
    }
}

impl ResnetBlock {
    pub fn upload(&mut self, dev: &CudaDevice) -> Result<()> {
        self.norm1.upload(dev)?;
        self.conv1.upload(dev)?;
        self.temb_conv_bias = None;
        if let Some(p) = &mut self.time_emb_proj {
            p.upload(dev)?;
            let out = p.weight().shape()[0];
            let folded = match (p.gpu_bias(), self.conv1.gpu_bias()) {
                (Some(a), Some(b)) => dev.add(a, b)?,
                (Some(a), None) | (None, Some(a)) => a.try_clone(dev)?,
                (None, None) => CudaTensor::zeros(dev, &[out])?,
            };
            self.temb_conv_bias = Some(folded);
        }
        self.norm2.upload(dev)?;
        self.conv2.upload(dev)?;
        if let Some(p) = &mut self.shortcut {
            p.upload(dev)?;
        }
        Ok(())
    }

    /// [`ResnetBlock::forward`] on the device: `x = [batch, h, w, in]`.
    pub fn forward_gpu(
        &self,
        dev: &CudaDevice,
        x: &CudaTensor,
        temb_act: Option<&CudaTensor>,
    ) -> Result<CudaTensor> {
        let normed = self.norm1.forward_gpu(dev, x, true)?;
        let h = match self.temb_bias_gpu(dev, temb_act)? {
            Some(bias) => self.conv1.forward_gpu_sample_bias(dev, &normed, &bias)?,
            None => self.conv1.forward_gpu(dev, &normed)?,
        };
        let normed = self.norm2.forward_gpu(dev, &h, true)?;
        self.end_gpu(dev, x, |residual| match residual {
            Some(r) => self.conv2.forward_gpu_add(dev, &normed, r),
            None => self.conv2.forward_gpu(dev, &normed),
        })
    }

    /// `conv1`'s bias per sample (or segment) on the device: the projected time embedding
    /// plus both biases, `[samples, out]`; None without a time embedding.
    fn temb_bias_gpu(
        &self,
        dev: &CudaDevice,
        temb_act: Option<&CudaTensor>,
    ) -> Result<Option<CudaTensor>> {
        match (&self.time_emb_proj, temb_act, &self.temb_conv_bias) {
            (Some(proj), Some(t), Some(folded)) => Ok(Some(proj.forward_gpu_bias(dev, t, folded)?)),
            _ => Ok(None),
        }
    }

    /// The block's end on the device: `conv2` (run by `conv2`, given the residual to add as
    /// it writes, or None) plus the (projected) input, scaled. With the usual scale of 1 the
    /// residual is added by the conv itself, saving an add's launch and pass over memory.
    fn end_gpu(
        &self,
        dev: &CudaDevice,
        x: &CudaTensor,
        conv2: impl FnOnce(Option<&CudaTensor>) -> Result<CudaTensor>,
    ) -> Result<CudaTensor> {
        let projected = match &self.shortcut {
            Some(proj) => Some(proj.forward_gpu(dev, x)?),
            None => None,
        };
        let residual = projected.as_ref().unwrap_or(x);
        if self.output_scale == 1.0 {
            return conv2(Some(residual));
        }
        let sum = dev.add(residual, &conv2(None)?)?;
        Ok(dev.affine(&sum, 1.0 / self.output_scale, 0.0)?)
    }

    /// The masked block on the device: `x = [rows, in]`, the segments' active rows;
    /// `temb_act = [segments, temb]`.
    pub fn forward_gpu_masked(
        &self,
        dev: &CudaDevice,
        x: &CudaTensor,
        temb_act: Option<&CudaTensor>,
        m: &mut GpuMasked<'_>,
    ) -> Result<CudaTensor> {
        let normed = self.norm1.forward_gpu_masked(dev, x, true, m)?;
        // Each segment's rows add its projected time embedding, as conv1's bias.
        let bias = self.temb_bias_gpu(dev, temb_act)?;
        let extra = bias
            .as_ref()
            .map_or(ConvExtra::Nothing, ConvExtra::SampleBias);
        let h = self
            .conv1
            .forward_gpu_masked(dev, &normed, m, None, extra)?;
        let normed = self.norm2.forward_gpu_masked(dev, &h, true, m)?;
        self.end_gpu(dev, x, |residual| {
            let extra = residual.map_or(ConvExtra::Nothing, ConvExtra::Residual);
            self.conv2.forward_gpu_masked(dev, &normed, m, None, extra)
        })
    }
}
