use std::ops::Range;

use half::{bf16, f16};

use super::masked_conv::slice;
use crate::cpu::attention::{self, Heads, MaskedSegment, Sequence};
use crate::error::{invalid, shape_err};
use crate::tensor::CpuStorage;
use crate::{FloatElement, Result, Tensor, TokenSet};

pub(crate) fn heads_of(op: &'static str, channels: usize, heads: usize) -> Result<Heads> {
    if heads == 0 || !channels.is_multiple_of(heads) {
        return invalid(
            op,
            format!("{channels} channels do not split into {heads} heads"),
        );
    }
    let head_dim = channels / heads;
    Ok(Heads {
        heads,
        head_dim,
        scale: 1.0 / (head_dim as f32).sqrt(),
    })
}

/// Checks a ragged batch's packed inputs: `q = [rows, c]`, `k = v = [key_rows, c]`. Returns
/// `(rows, c, key_rows)`.
pub(crate) fn check_ragged_inputs(
    op: &'static str,
    q: &[usize],
    k: &[usize],
    v: &[usize],
) -> Result<(usize, usize, usize)> {
    let (&[rows, c], &[key_rows, kc]) = (q, k) else {
        return shape_err(
            op,
            format!("q and k must be [rows, c], got {q:?} and {k:?}"),
        );
    };
    if kc != c || k != v {
        return shape_err(op, format!("q {q:?}, k {k:?}, v {v:?} do not agree"));
    }
    Ok((rows, c, key_rows))
}

/// Checks a ragged batch's segments over `rows` query rows and `key_rows` key rows: query
/// ranges ascending and disjoint, key ranges inside, none empty where it has queries.
pub(crate) fn check_ragged_segments(
    op: &'static str,
    rows: usize,
    key_rows: usize,
    segments: &[RaggedSegment],
) -> Result<()> {
    let mut previous_end = 0;
    for (i, s) in segments.iter().enumerate() {
        let (qs, ks) = (&s.queries, &s.keys);
        if qs.start < previous_end || qs.start > qs.end || qs.end > rows {
            return invalid(
                op,
                format!("segment {i}: query rows {qs:?} overlap or exceed {rows}"),
            );
        }
        previous_end = qs.end;
        if ks.start > ks.end || ks.end > key_rows || (ks.is_empty() && !qs.is_empty()) {
            return invalid(
                op,
                format!("segment {i}: key rows {ks:?} are empty or exceed {key_rows}"),
            );
        }
    }
    Ok(())
}

/// Checks a masked-attention batch's packed inputs: `q = [rows, c]`, fresh keys and values
/// the same shape. Returns `(rows, c)`.
pub(crate) fn check_masked_inputs(
    op: &'static str,
    q: &[usize],
    k_fresh: &[usize],
    v_fresh: &[usize],
) -> Result<(usize, usize)> {
    let &[rows, c] = q else {
        return shape_err(op, format!("q must be [rows, c], got {q:?}"));
    };
    if k_fresh != q || v_fresh != q {
        return shape_err(
            op,
            format!("q {q:?}, fresh k {k_fresh:?}, fresh v {v_fresh:?} must match"),
        );
    }
    Ok((rows, c))
}

/// Checks a masked-attention batch's segments (rows, active tokens, shapes of the cached
/// keys and values) over `rows` packed query rows of `c` channels: rows ascending, disjoint
/// and inside, one per active token, cached maps of `[grid_len, c]` values.
pub(crate) fn check_masked_segments<'a>(
    op: &'static str,
    (rows, c): (usize, usize),
    segments: impl IntoIterator<Item = (&'a Range<usize>, &'a TokenSet, (&'a [usize], &'a [usize]))>,
) -> Result<()> {
    let mut previous_end = 0;
    for (i, (seg_rows, tokens, cached)) in segments.into_iter().enumerate() {
        if seg_rows.start < previous_end || seg_rows.end > rows || seg_rows.start > seg_rows.end {
            return invalid(
                op,
                format!("segment {i}: rows {seg_rows:?} overlap or exceed {rows}"),
            );
        }
        previous_end = seg_rows.end;
        if seg_rows.len() != tokens.len() {
            return invalid(
                op,
                format!(
                    "segment {i}: {} rows for {} active tokens",
                    seg_rows.len(),
                    tokens.len()
                ),
            );
        }
        let want = [tokens.grid_len(), c];
        let count = |shape: &[usize]| shape.iter().product::<usize>();
        if count(cached.0) != want[0] * c || count(cached.1) != want[0] * c {
            return shape_err(
                op,
                format!(
                    "segment {i}: cached k {:?} / v {:?}, expected {want:?}",
                    cached.0, cached.1
                ),
            );
        }
    }
    Ok(())
}

/// One request of a masked-attention batch.
pub struct AttentionSegment<'a> {
    /// The request's rows in the packed queries and fresh keys/values (its active tokens).
    pub rows: Range<usize>,
    /// The request's active tokens; `rows.len()` must equal `tokens.len()`.
    pub tokens: &'a TokenSet,
    /// The template's cached keys and values for all `tokens.grid_len()` tokens,
    /// `[grid_len, channels]`, f32, f16 or bf16.
    pub cached_k: &'a Tensor,
    pub cached_v: &'a Tensor,
}

/// One request of a ragged attention batch: which rows of the packed queries are its own,
/// and which rows of the packed keys/values they attend to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaggedSegment {
    pub queries: Range<usize>,
    pub keys: Range<usize>,
}

impl RaggedSegment {
    /// Segments of `rows[s]` stacked query rows each, segment `s` against key rows
    /// `s * keys..(s + 1) * keys` (a ragged batch's cross-attention, each request to its own
    /// text).
    pub fn each_to_own_keys(rows: &[usize], keys: usize) -> Vec<RaggedSegment> {
        let mut at = 0;
        rows.iter()
            .enumerate()
            .map(|(s, &n)| {
                at += n;
                RaggedSegment {
                    queries: at - n..at,
                    keys: s * keys..(s + 1) * keys,
                }
            })
            .collect()
    }
}

impl Tensor {
    /// Scaled dot-product attention with `heads` heads: `q = [batch, lq, c]`,
    /// `k = v = [batch, lk, c]`, scale `1/sqrt(c / heads)`. With `causal`, query i attends to
    /// keys 0..=i. Memory stays O(block) however long the sequences are.
    pub fn attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        causal: bool,
    ) -> Result<Tensor> {
        const OP: &str = "attention";
        q.check_rank(OP, 3)?;
        let &[batch, lq, c] = q.shape() else {
            unreachable!()
        };
        if k.rank() != 3 || k.shape()[0] != batch || k.shape()[2] != c || k.shape() != v.shape() {
            return shape_err(
                OP,
                format!(
                    "q {:?}, k {:?}, v {:?} do not agree",
                    q.shape(),
                    k.shape(),
                    v.shape()
                ),
            );
        }
        let lk = k.shape()[1];
        let h = heads_of(OP, c, heads)?;
        let mut out = vec![0.0f32; q.elem_count()];
        attention::attention(
            q.f32s(OP)?,
            k.f32s(OP)?,
            v.f32s(OP)?,
            &mut out,
            batch,
            lq,
            lk,
            h,
            causal,
        );
        Ok(Tensor::from_f32_unchecked(out, q.shape()))
    }

    /// Attention over a ragged batch: `q = [rows, c]`, `k = v = [key_rows, c]`; each
    /// segment's queries attend to its own keys (non-causal, scale `1/sqrt(c / heads)`).
    /// Query ranges must be ascending and disjoint; key ranges may overlap. Rows of `q` that
    /// no segment names come back as zeros.
    pub fn ragged_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        segments: &[RaggedSegment],
        heads: usize,
    ) -> Result<Tensor> {
        const OP: &str = "ragged_attention";
        let (rows, c, key_rows) = check_ragged_inputs(OP, q.shape(), k.shape(), v.shape())?;
        let h = heads_of(OP, c, heads)?;
        check_ragged_segments(OP, rows, key_rows, segments)?;
        let sequences: Vec<Sequence> = segments
            .iter()
            .map(|s| Sequence {
                queries: s.queries.clone(),
                keys: s.keys.clone(),
            })
            .collect();
        let mut out = vec![0.0f32; q.elem_count()];
        attention::sequences_attention(
            q.f32s(OP)?,
            k.f32s(OP)?,
            v.f32s(OP)?,
            &mut out,
            &sequences,
            h,
            false,
        );
        Ok(Tensor::from_f32_unchecked(out, q.shape()))
    }

    /// Masked self-attention over a ragged batch. `q`, `k_fresh`, `v_fresh` are the packed
    /// active rows of all requests, `[rows, c]`. Each request's queries attend to its fresh
    /// keys/values and to its cached keys/values at inactive positions, read in place.
    pub fn masked_attention(
        q: &Tensor,
        k_fresh: &Tensor,
        v_fresh: &Tensor,
        segments: &[AttentionSegment<'_>],
        heads: usize,
    ) -> Result<Tensor> {
        const OP: &str = "masked_attention";
        let (rows, c) = check_masked_inputs(OP, q.shape(), k_fresh.shape(), v_fresh.shape())?;
        let h = heads_of(OP, c, heads)?;
        check_masked_segments(
            OP,
            (rows, c),
            segments.iter().map(|s| {
                let cached = (s.cached_k.shape(), s.cached_v.shape());
                (&s.rows, s.tokens, cached)
            }),
        )?;
        let dtype = segments.first().map(|s| s.cached_k.dtype());
        if segments
            .iter()
            .any(|s| Some(s.cached_k.dtype()) != dtype || Some(s.cached_v.dtype()) != dtype)
        {
            return invalid(OP, "all cached keys and values must share one dtype");
        }
        let (q_data, k_data, v_data) = (q.f32s(OP)?, k_fresh.f32s(OP)?, v_fresh.f32s(OP)?);
        let mut out = vec![0.0f32; q.elem_count()];
        fn run<C: FloatElement + crate::TensorElement>(
            segments: &[AttentionSegment<'_>],
            q: &[f32],
            k: &[f32],
            v: &[f32],
            out: &mut [f32],
            h: Heads,
        ) {
            let segs: Vec<MaskedSegment<'_, C>> = segments
                .iter()
                .map(|s| MaskedSegment {
                    rows: s.rows.clone(),
                    cached_k: slice::<C>(s.cached_k),
                    cached_v: slice::<C>(s.cached_v),
                    row_of: s.tokens.row_of(),
                })
                .collect();
            attention::masked_attention(q, k, v, &segs, out, h);
        }
        match segments.first().map(|s| s.cached_k.cpu_storage()) {
            None => {}
            Some(CpuStorage::F32(_)) => run::<f32>(segments, q_data, k_data, v_data, &mut out, h),
            Some(CpuStorage::F16(_)) => run::<f16>(segments, q_data, k_data, v_data, &mut out, h),
            Some(CpuStorage::BF16(_)) => run::<bf16>(segments, q_data, k_data, v_data, &mut out, h),
            Some(CpuStorage::I64(_)) => return invalid(OP, "cached keys must be float tensors"),
        }
        Ok(Tensor::from_f32_unchecked(out, q.shape()))
    }
}
