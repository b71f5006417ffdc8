//! One pre-LN encoder layer: causal self-attention and an MLP, each around a residual.

use retouch_kernels::Tensor;

use super::Prefixed;
use super::config::Activation;
use crate::Result;

/// `x * W^T + b` with PyTorch's `[out, in]` weight.
struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    fn load(w: &Prefixed<'_>, name: &str, inp: usize, out: usize) -> Result<Linear> {
        Ok(Linear {
            weight: w.get(&format!("{name}.weight"), &[out, inp])?,
            bias: w.get(&format!("{name}.bias"), &[out])?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.linear(&self.weight, Some(&self.bias))?)
    }
}

pub struct LayerNorm {
    gamma: Tensor,
    beta: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn load(w: &Prefixed<'_>, name: &str, channels: usize, eps: f32) -> Result<LayerNorm> {
        Ok(LayerNorm {
            gamma: w.get(&format!("{name}.weight"), &[channels])?,
            beta: w.get(&format!("{name}.bias"), &[channels])?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.layer_norm(&self.gamma, &self.beta, self.eps)?)
    }
}

pub struct EncoderLayer {
    norm1: LayerNorm,
    /// q, k and v projections stacked into one `[3 * hidden, hidden]` weight: one GEMM reads
    /// the normalised rows once instead of three times.
    qkv: Linear,
    out: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
    heads: usize,
    hidden: usize,
}

/// Shapes and options shared by every layer.
pub struct LayerShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub eps: f32,
    pub activation: Activation,
}

impl EncoderLayer {
    /// Loads `encoder.layers.{index}.*`.
    pub fn load(w: &Prefixed<'_>, index: usize, s: &LayerShape) -> Result<EncoderLayer> {
        let at = |name: &str| format!("encoder.layers.{index}.{name}");
        let h = s.hidden;
        let q = Linear::load(w, &at("self_attn.q_proj"), h, h)?;
        let k = Linear::load(w, &at("self_attn.k_proj"), h, h)?;
        let v = Linear::load(w, &at("self_attn.v_proj"), h, h)?;
        Ok(EncoderLayer {
            norm1: LayerNorm::load(w, &at("layer_norm1"), h, s.eps)?,
            qkv: stack(&[q, k, v])?,
            out: Linear::load(w, &at("self_attn.out_proj"), h, h)?,
            norm2: LayerNorm::load(w, &at("layer_norm2"), h, s.eps)?,
            fc1: Linear::load(w, &at("mlp.fc1"), h, s.intermediate)?,
            fc2: Linear::load(w, &at("mlp.fc2"), s.intermediate, h)?,
            activation: s.activation,
            heads: s.heads,
            hidden: h,
        })
    }

    /// `x = [batch, tokens, hidden]`, all sequences in one kernel call per step.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.hidden;
        let qkv = self.qkv.forward(&self.norm1.forward(x)?)?;
        let [q, k, v]: [Tensor; 3] = qkv
            .split_last(&[h, h, h])?
            .try_into()
            .expect("split_last returns one tensor per size");
        // The kernel scales by 1/sqrt(head_dim), as CLIPAttention does; causal as in CLIP.
        let attended = Tensor::attention(&q, &k, &v, self.heads, true)?;
        let x = x.add(&self.out.forward(&attended)?)?;

        let hidden = self.fc1.forward(&self.norm2.forward(&x)?)?;
        let hidden = match self.activation {
            Activation::QuickGelu => hidden.quick_gelu()?,
            Activation::Gelu => hidden.gelu()?,
            Activation::GeluTanh => hidden.gelu_tanh()?,
        };
        Ok(x.add(&self.fc2.forward(&hidden)?)?)
    }
}

/// Stacks linear layers of one input width along their outputs.
fn stack(parts: &[Linear]) -> Result<Linear> {
    let inp = parts[0].weight.shape()[1];
    let mut weight = Vec::new();
    let mut bias = Vec::new();
    for p in parts {
        weight.extend(p.weight.to_vec_f32());
        bias.extend(p.bias.to_vec_f32());
    }
    let out = bias.len();
    Ok(Linear {
        weight: Tensor::from_vec(weight, &[out, inp])?,
        bias: Tensor::from_vec(bias, &[out])?,
    })
}
