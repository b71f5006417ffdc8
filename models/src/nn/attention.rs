use retouch_kernels::{AttentionSegment, Tensor};

use super::exec::{CacheEntry, Exec, KEY_VALUE, per_batch_rows};
use super::{Linear, Scope};
use crate::{Error, Result};

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

    /// Self-attention in any mode. Masked: `x = [batch, active, dim]` rows; queries are the
    /// active rows, keys/values the template's cached ones at inactive positions and the
    /// fresh ones at active positions.
    pub fn forward_self_exec(&self, x: &Tensor, exec: &mut Exec<'_>) -> Result<Tensor> {
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(x)?;
        let v = self.to_v.forward(x)?;
        let attended = match exec {
            Exec::Dense => Tensor::attention(&q, &k, &v, self.heads, false)?,
            Exec::Record { cache, dtype } => {
                let kv = per_batch_rows(&k, *dtype)?
                    .into_iter()
                    .zip(per_batch_rows(&v, *dtype)?)
                    .collect();
                cache.entries.push(CacheEntry::KeyValue(kv));
                Tensor::attention(&q, &k, &v, self.heads, false)?
            }
            Exec::Masked(m) => {
                let CacheEntry::KeyValue(kv) = m.next(KEY_VALUE)? else {
                    unreachable!("kind checked by next()")
                };
                let shape = q.shape().to_vec();
                let (batch, n, c) = (shape[0], shape[1], shape[2]);
                if kv.len() != batch {
                    return Err(Error::Invalid(format!(
                        "cached keys have {} branches, the batch {batch}",
                        kv.len()
                    )));
                }
                let tokens = m.tokens();
                let segments: Vec<AttentionSegment<'_>> = kv
                    .iter()
                    .enumerate()
                    .map(|(b, (ck, cv))| AttentionSegment {
                        rows: b * n..(b + 1) * n,
                        tokens,
                        cached_k: ck,
                        cached_v: cv,
                    })
                    .collect();
                let flat = |t: Tensor| t.reshape(&[batch * n, c]);
                let out = Tensor::masked_attention(
                    &flat(q)?,
                    &flat(k)?,
                    &flat(v)?,
                    &segments,
                    self.heads,
                )?;
                out.reshape(&shape)?
            }
        };
        self.to_out.forward(&attended)
    }
}
