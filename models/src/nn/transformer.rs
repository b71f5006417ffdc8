use retouch_kernels::Tensor;
use retouch_kernels::cuda::{CudaDevice, CudaTensor};

use super::exec::Exec;
use super::gpu::GpuMasked;
use super::{Attention, GroupNorm, LayerNorm, Linear, Scope};
use crate::Result;

/// diffusers' BasicTransformerBlock: self-attention, cross-attention and a GEGLU
/// feed-forward, each pre-normed with a layer norm and added to the residual stream.
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

impl TransformerBlock {
    fn load(s: Scope<'_>, dim: usize, heads: usize, context_dim: usize) -> Result<Self> {
        let inner_ff = 4 * dim;
        Ok(TransformerBlock {
            norm1: LayerNorm::load(s.at("norm1").scope(), dim, 1e-5)?,
            attn1: Attention::load(s.at("attn1").scope(), dim, dim, heads, dim, false)?,
            norm2: LayerNorm::load(s.at("norm2").scope(), dim, 1e-5)?,
            attn2: Attention::load(s.at("attn2").scope(), dim, context_dim, heads, dim, false)?,
            norm3: LayerNorm::load(s.at("norm3").scope(), dim, 1e-5)?,
            ff_in: Linear::load(s.at("ff.net.0.proj").scope(), dim, 2 * inner_ff, true)?,
            ff_out: Linear::load(s.at("ff.net.2").scope(), inner_ff, dim, true)?,
        })
    }

    fn forward(&self, x: Tensor, context: &Tensor, exec: &mut Exec<'_>) -> Result<Tensor> {
        let x = x.add(
            &self
                .attn1
                .forward_self_exec(&self.norm1.forward(&x)?, exec)?,
        )?;
        let x = x.add(&self.attn2.forward_cross_exec(
            &self.norm2.forward(&x)?,
            context,
            exec,
        )?)?;
        let ff = self
            .ff_out
            .forward(&self.ff_in.forward(&self.norm3.forward(&x)?)?.geglu()?)?;
        Ok(x.add(&ff)?)
    }
}

/// diffusers' Transformer2DModel (continuous input): group norm, projection in (a 1x1 conv in
/// SD 1.x, a linear layer in SD 2.x: the same product on channels-last rows), transformer
/// blocks over the `h * w` tokens, projection out, plus the input.
impl TransformerBlock {
    fn upload(&mut self, dev: &CudaDevice) -> Result<()> {
        for n in [&mut self.norm1, &mut self.norm2, &mut self.norm3] {
            n.upload(dev)?;
        }
        self.attn1.upload(dev)?;
        self.attn2.upload(dev)?;
        self.ff_in.upload(dev)?;
        self.ff_out.upload(dev)
    }

    /// [`TransformerBlock::forward`]'s dense path on the device.
    fn forward_gpu(
        &self,
        dev: &CudaDevice,
        x: CudaTensor,
        context: &CudaTensor,
    ) -> Result<CudaTensor> {
        // Each residual is added by the projection that ends its sub-block.
        let x = self
            .attn1
            .forward_gpu(dev, &self.norm1.forward_gpu(dev, &x)?, None, &x)?;
        let x =
            self.attn2
                .forward_gpu(dev, &self.norm2.forward_gpu(dev, &x)?, Some(context), &x)?;
        self.feed_forward_gpu(dev, &x)
    }

    /// `x` plus the feed-forward of its third norm, on the device (the blocks' common end).
    fn feed_forward_gpu(&self, dev: &CudaDevice, x: &CudaTensor) -> Result<CudaTensor> {
        let hidden = dev.geglu(
            &self
                .ff_in
                .forward_gpu(dev, &self.norm3.forward_gpu(dev, x)?)?,
        )?;
        self.ff_out.forward_gpu_add(dev, &hidden, x)
    }

    /// The masked block on the device: `x = [rows, dim]`.
    fn forward_gpu_masked(
        &self,
        dev: &CudaDevice,
        x: CudaTensor,
        context: &CudaTensor,
        m: &mut GpuMasked<'_>,
    ) -> Result<CudaTensor> {
        let x =
            self.attn1
                .forward_self_gpu_masked(dev, &self.norm1.forward_gpu(dev, &x)?, m, &x)?;
        let x = self.attn2.forward_cross_gpu_masked(
            dev,
            &self.norm2.forward_gpu(dev, &x)?,
            context,
            m,
            &x,
        )?;
        self.feed_forward_gpu(dev, &x)
    }
}

pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<TransformerBlock>,
    proj_out: Linear,
}

/// Settings of one Transformer2DModel.
#[derive(Clone, Copy, Debug)]
pub struct TransformerShape {
    pub channels: usize,
    pub heads: usize,
    pub depth: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub linear_projection: bool,
}

impl Transformer2D {
    pub fn load(s: Scope<'_>, t: TransformerShape) -> Result<Transformer2D> {
        let c = t.channels;
        let proj = |name: &str| {
            let scope = s.at(name);
            if t.linear_projection {
                Linear::load(scope.scope(), c, c, true)
            } else {
                Linear::load_pointwise_conv(scope.scope(), c, c)
            }
        };
        let blocks = (0..t.depth)
            .map(|i| {
                TransformerBlock::load(
                    s.at(format!("transformer_blocks.{i}")).scope(),
                    c,
                    t.heads,
                    t.context_dim,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Transformer2D {
            norm: GroupNorm::load(s.at("norm").scope(), c, t.groups, 1e-6)?,
            proj_in: proj("proj_in")?,
            blocks,
            proj_out: proj("proj_out")?,
        })
    }

    /// `x = [batch, h, w, c]`, `context = [batch, tokens, context_dim]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.forward_exec(x, context, &mut Exec::Dense)
    }

    /// The model in any mode (masked: `x = [rows, c]`, the segments' active rows stacked,
    /// and `context = [segments, tokens, context_dim]`).
    pub fn forward_exec(
        &self,
        x: &Tensor,
        context: &Tensor,
        exec: &mut Exec<'_>,
    ) -> Result<Tensor> {
        let shape = x.shape().to_vec();
        let normed = self.norm.forward_exec(x, false, exec)?;
        // Dense maps become token sequences; masked rows already are one row per token.
        let normed = match exec {
            Exec::Masked(_) => normed,
            _ => {
                let (b, c) = (shape[0], shape[shape.len() - 1]);
                let tokens = x.elem_count() / (b * c).max(1);
                normed.reshape(&[b, tokens, c])?
            }
        };
        let mut h = self.proj_in.forward(&normed)?;
        for block in &self.blocks {
            h = block.forward(h, context, exec)?;
        }
        let h = self.proj_out.forward(&h)?.reshape(&shape)?;
        Ok(h.add(x)?)
    }
}

impl Transformer2D {
    /// Every attention projection of every block (self- and cross-attention).
    pub fn attention_projections_mut(&mut self) -> Vec<&mut Linear> {
        self.blocks
            .iter_mut()
            .flat_map(|b| {
                let [q, k, v, o] = b.attn1.projections_mut();
                let [q2, k2, v2, o2] = b.attn2.projections_mut();
                [q, k, v, o, q2, k2, v2, o2]
            })
            .collect()
    }

    pub fn upload(&mut self, dev: &CudaDevice) -> Result<()> {
        self.norm.upload(dev)?;
        self.proj_in.upload(dev)?;
        for b in &mut self.blocks {
            b.upload(dev)?;
        }
        self.proj_out.upload(dev)
    }

    /// The dense forward on the device: `x = [batch, h, w, c]`, `context = [batch, tokens,
    /// context_dim]`.
    pub fn forward_gpu(
        &self,
        dev: &CudaDevice,
        x: &CudaTensor,
        context: &CudaTensor,
    ) -> Result<CudaTensor> {
        let shape = x.shape().to_vec();
        let (b, c) = (shape[0], shape[shape.len() - 1]);
        let tokens = x.elem_count() / (b * c).max(1);
        let normed = self
            .norm
            .forward_gpu(dev, x, false)?
            .reshape(&[b, tokens, c])?;
        let mut h = self.proj_in.forward_gpu(dev, &normed)?;
        for block in &self.blocks {
            h = block.forward_gpu(dev, h, context)?;
        }
        // The input added by the projection as it writes (`x` has the output's layout).
        Ok(self.proj_out.forward_gpu_add(dev, &h, x)?.reshape(&shape)?)
    }

    /// The masked forward on the device: `x = [rows, c]`, the segments' active rows;
    /// `context = [segments, tokens, context_dim]`.
    pub fn forward_gpu_masked(
        &self,
        dev: &CudaDevice,
        x: &CudaTensor,
        context: &CudaTensor,
        m: &mut GpuMasked<'_>,
    ) -> Result<CudaTensor> {
        let normed = self.norm.forward_gpu_masked(dev, x, false, m)?;
        let mut h = self.proj_in.forward_gpu(dev, &normed)?;
        for block in &self.blocks {
            h = block.forward_gpu_masked(dev, h, context, m)?;
        }
        self.proj_out.forward_gpu_add(dev, &h, x)
    }
}
