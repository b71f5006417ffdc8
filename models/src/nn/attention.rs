use retouch_kernels::cuda::{CudaAttentionSegment, CudaDevice, CudaTensor};
use retouch_kernels::{AttentionSegment, RaggedSegment, Tensor};

use super::exec::{CacheEntry, Exec, per_batch_rows};
use super::gpu::GpuMasked;
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

    /// Cross-attention in any mode. Dense: `x = [batch, tokens, query_dim]` against
    /// `context = [batch, ctx_tokens, context_dim]`. Masked: `x = [rows, query_dim]` (the
    /// segments' active rows stacked), `context = [segments, ctx_tokens, context_dim]`: each
    /// segment's rows attend to its own text, all projections still one product each.
    /// The query, key, value and output projections (a LoRA's targets).
    pub fn projections_mut(&mut self) -> [&mut Linear; 4] {
        [
            &mut self.to_q,
            &mut self.to_k,
            &mut self.to_v,
            &mut self.to_out,
        ]
    }

    pub fn upload(&mut self, dev: &CudaDevice) -> Result<()> {
        for l in self.projections_mut() {
            l.upload(dev)?;
        }
        Ok(())
    }

    /// Dense attention on the device: self-attention without `context`, cross with it; the
    /// output projection adds `residual` (laid out as the output) as it writes.
    pub fn forward_gpu(
        &self,
        dev: &CudaDevice,
        x: &CudaTensor,
        context: Option<&CudaTensor>,
        residual: &CudaTensor,
    ) -> Result<CudaTensor> {
        let source = context.unwrap_or(x);
        let q = self.to_q.forward_gpu(dev, x)?;
        let k = self.to_k.forward_gpu(dev, source)?;
        let v = self.to_v.forward_gpu(dev, source)?;
        let attended = dev.attention(&q, &k, &v, self.heads, false)?;
        self.to_out.forward_gpu_add(dev, &attended, residual)
    }

    /// Masked self-attention on the device: `x = [rows, c]`, the segments' active rows.
    /// Each segment's queries attend to its template's cached keys and values (f16, read in
    /// place) with its active positions' rows replaced by the fresh ones. The output
    /// projection adds `residual` as it writes.
    pub fn forward_self_gpu_masked(
        &self,
        dev: &CudaDevice,
        x: &CudaTensor,
        m: &mut GpuMasked<'_>,
        residual: &CudaTensor,
    ) -> Result<CudaTensor> {
        let q = self.to_q.forward_gpu(dev, x)?;
        let k = self.to_k.forward_gpu(dev, x)?;
        let v = self.to_v.forward_gpu(dev, x)?;
        let kv = m.key_values()?;
        let tokens = m.host().tokens()?;
        let rows = stacked_rows(tokens.iter().map(|t| t.len()));
        let segments: Vec<CudaAttentionSegment<'_>> = kv
            .iter()
            .zip(tokens)
            .zip(rows)
            .map(
                |(((cached_k, cached_v), tokens), rows)| CudaAttentionSegment {
                    rows,
                    tokens,
                    cached_k,
                    cached_v,
                },
            )
            .collect();
        let attended = dev.masked_attention(&q, &k, &v, &segments, self.heads)?;
        self.to_out.forward_gpu_add(dev, &attended, residual)
    }

    /// Masked cross-attention on the device: each segment's rows of `x = [rows, c]` attend
    /// to its own text, `context = [segments, tokens, dim]`. The output projection adds
    /// `residual` as it writes.
    pub fn forward_cross_gpu_masked(
        &self,
        dev: &CudaDevice,
        x: &CudaTensor,
        context: &CudaTensor,
        m: &GpuMasked<'_>,
        residual: &CudaTensor,
    ) -> Result<CudaTensor> {
        let rows = m.host().rows()?;
        let (segments, tokens) = (context.shape()[0], context.shape()[1]);
        if rows.len() != segments {
            return Err(Error::Invalid(format!(
                "{segments} text contexts for {} segments",
                rows.len()
            )));
        }
        let q = self.to_q.forward_gpu(dev, x)?;
        let flat = |t: CudaTensor| {
            let c = t.shape()[t.shape().len() - 1];
            t.reshape(&[segments * tokens, c])
        };
        let k = flat(self.to_k.forward_gpu(dev, context)?)?;
        let v = flat(self.to_v.forward_gpu(dev, context)?)?;
        let spans = RaggedSegment::each_to_own_keys(&rows, tokens);
        let attended = dev.ragged_attention(&q, &k, &v, &spans, self.heads)?;
        self.to_out.forward_gpu_add(dev, &attended, residual)
    }

    pub fn forward_cross_exec(
        &self,
        x: &Tensor,
        context: &Tensor,
        exec: &Exec<'_>,
    ) -> Result<Tensor> {
        let Exec::Masked(m) = exec else {
            return self.forward(x, Some(context));
        };
        let (segments, tokens) = (context.dim(0)?, context.dim(1)?);
        let rows = m.rows()?;
        if rows.len() != segments {
            return Err(Error::Invalid(format!(
                "{segments} text contexts for {} segments",
                rows.len()
            )));
        }
        let q = self.to_q.forward(x)?;
        let flat = |t: Tensor| {
            let c = t.dim(-1)?;
            t.reshape(&[segments * tokens, c])
        };
        let k = flat(self.to_k.forward(context)?)?;
        let v = flat(self.to_v.forward(context)?)?;
        let spans = RaggedSegment::each_to_own_keys(&rows, tokens);
        let attended = Tensor::ragged_attention(&q, &k, &v, &spans, self.heads)?;
        self.to_out.forward(&attended)
    }

    /// Self-attention in any mode. Masked: `x = [rows, dim]`, the segments' active rows
    /// stacked; each segment's queries are its active rows, its keys/values its template's
    /// cached ones at inactive positions and the fresh ones at active positions.
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
                let kv = m.key_values()?;
                let tokens = m.tokens()?;
                let rows = stacked_rows(tokens.iter().map(|t| t.len()));
                let segments: Vec<AttentionSegment<'_>> = kv
                    .iter()
                    .zip(tokens)
                    .zip(rows)
                    .map(|(((ck, cv), tokens), rows)| AttentionSegment {
                        rows,
                        tokens,
                        cached_k: ck,
                        cached_v: cv,
                    })
                    .collect();
                Tensor::masked_attention(&q, &k, &v, &segments, self.heads)?
            }
        };
        self.to_out.forward(&attended)
    }
}

/// The row ranges of segments stacked in order, from their row counts (each segment's
/// active tokens, in the packed rows of a masked batch).
fn stacked_rows(counts: impl IntoIterator<Item = usize>) -> Vec<std::ops::Range<usize>> {
    let mut at = 0;
    counts
        .into_iter()
        .map(|n| {
            at += n;
            at - n..at
        })
        .collect()
}
