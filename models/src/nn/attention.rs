use retouch_kernels::Tensor;

use super::{Linear, Scope};
use crate::Result;

/// diffusers' `Attention` as the transformer blocks use it: q/k/v projections (no bias), the
/// multi-head attention kernel, and the output projection (with bias).
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    /// `query_dim`: width of the input; `context_dim`: width of the keys' source (the text
    /// encoder's for cross-attention, `query_dim` for self-attention); `inner = heads * head_dim`.
    pub fn load(
        s: Scope<'_>,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        inner: usize,
        qkv_bias: bool,
    ) -> Result<Attention> {
        Ok(Attention {
            to_q: Linear::load(s.at("to_q").scope(), query_dim, inner, qkv_bias)?,
            to_k: Linear::load(s.at("to_k").scope(), context_dim, inner, qkv_bias)?,
            to_v: Linear::load(s.at("to_v").scope(), context_dim, inner, qkv_bias)?,
            to_out: Linear::load(s.at("to_out.0").scope(), inner, query_dim, true)?,
            heads,
        })
    }

    /// `x = [batch, tokens, query_dim]`; `context = [batch, ctx_tokens, context_dim]` for
    /// cross-attention, None for self-attention.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let source = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(source)?;
        let v = self.to_v.forward(source)?;
        let attended = Tensor::attention(&q, &k, &v, self.heads, false)?;
        self.to_out.forward(&attended)
    }
}
