//! Multi-head attention, flash-style: queries in blocks, keys and values streamed in blocks
//! with an online softmax, so no score matrix larger than one block pair ever exists.
//!
//! Channels-last layout: `q`, `k`, `v` and the output are `[rows, heads * head_dim]` with the
//! heads interleaved as the projections produce them; each task owns a block of query rows
//! (all heads), so tasks write disjoint output rows.

use std::ops::Range;

use multiversion::multiversion;
use rayon::prelude::*;

use super::gemm::{MatRef, Threads, sgemm};
use super::math;
use crate::tokens::NOT_ACTIVE;
use crate::{DType, FloatElement};

const BLOCK_Q: usize = 64;
const BLOCK_K: usize = 256;

/// Which scores of a block are excluded (set to -inf before the softmax).
#[derive(Clone, Copy)]
enum KeyMask<'a> {
    None,
    /// Key j is visible to query i only if `first_key + j <= first_query + i`.
    Causal { first_query: usize, first_key: usize },
    /// Key j is excluded when `row_of[j]` names a fresh row: the cache's stale copy of an
    /// active token, whose fresh K/V are attended separately.
    FreshInCache(&'a [u32]),
}

/// Running softmax state of one query block for one head.
struct OnlineSoftmax {
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
    scores: Vec<f32>,
    kv_tile: Vec<f32>,
}

#[multiversion(targets("x86_64+avx2+fma"))]
fn exp_row_update(scores: &mut [f32], max: &mut f32, sum: &mut f32) -> f32 {
    let block_max = scores.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let new_max = max.max(block_max);
    if new_max == f32::NEG_INFINITY {
        scores.fill(0.0);
        return 1.0;
    }
    let mut block_sum = 0.0f32;
    for s in scores.iter_mut() {
        *s = math::exp(*s - new_max);
        block_sum += *s;
    }
    let correction = math::exp(*max - new_max);
    *sum = *sum * correction + block_sum;
    *max = new_max;
    correction
}

impl OnlineSoftmax {
    fn new() -> Self {
        OnlineSoftmax {
            max: Vec::new(),
            sum: Vec::new(),
            acc: Vec::new(),
            scores: Vec::new(),
            kv_tile: Vec::new(),
        }
    }

    fn reset(&mut self, rows: usize, d: usize) {
        self.max.clear();
        self.max.resize(rows, f32::NEG_INFINITY);
        self.sum.clear();
        self.sum.resize(rows, 0.0);
        self.acc.clear();
        self.acc.resize(rows * d, 0.0);
    }

    /// Folds keys/values `k_t` (d x n, the transposed keys) and `v` (n x d) into the state.
    #[allow(clippy::too_many_arguments)]
    fn add_block(
        &mut self,
        q: MatRef<'_>,
        rows: usize,
        d: usize,
        k_t: MatRef<'_>,
        v: MatRef<'_>,
        n: usize,
        scale: f32,
        mask: KeyMask<'_>,
    ) {
        self.scores.resize(rows * n, 0.0);
        let scores = &mut self.scores[..rows * n];
        sgemm(rows, n, d, scores, n, q, k_t, false, scale, Threads::Single);
        for (i, row) in scores.chunks_exact_mut(n).enumerate() {
            match mask {
                KeyMask::None => {}
                KeyMask::Causal {
                    first_query,
                    first_key,
                } => {
                    let visible = (first_query + i + 1).saturating_sub(first_key).min(n);
                    row[visible..].fill(f32::NEG_INFINITY);
                }
                KeyMask::FreshInCache(row_of) => {
                    for (s, &r) in row.iter_mut().zip(row_of) {
                        if r != NOT_ACTIVE {
                            *s = f32::NEG_INFINITY;
                        }
                    }
                }
            }
            let correction = exp_row_update(row, &mut self.max[i], &mut self.sum[i]);
            if correction != 1.0 {
                self.acc[i * d..(i + 1) * d]
                    .iter_mut()
                    .for_each(|a| *a *= correction);
            }
        }
        let scores = MatRef::rows(&self.scores[..rows * n], n);
        sgemm(rows, d, n, &mut self.acc, d, scores, v, true, 1.0, Threads::Single);
    }

    /// Keys `[start, start + n)` of a `[len, ld]` source for the head at column `col`.
    #[allow(clippy::too_many_arguments)]
    fn add_rows<C: FloatElement>(
        &mut self,
        q: MatRef<'_>,
        rows: usize,
        d: usize,
        keys: &[C],
        values: &[C],
        ld: usize,
        col: usize,
        start: usize,
        n: usize,
        scale: f32,
        mask: KeyMask<'_>,
    ) {
        if C::DTYPE == DType::F32 {
            let k: &[f32] = bytemuck::cast_slice(keys);
            let v: &[f32] = bytemuck::cast_slice(values);
            let k_t = MatRef::transposed(&k[start * ld + col..], ld);
            let v = MatRef::rows(&v[start * ld + col..], ld);
            self.add_block(q, rows, d, k_t, v, n, scale, mask);
        } else {
            // Half-precision cache: widen this block of one head into a small f32 tile.
            let mut tile = std::mem::take(&mut self.kv_tile);
            tile.resize(2 * n * d, 0.0);
            let (kt, vt) = tile.split_at_mut(n * d);
            for j in 0..n {
                let src = (start + j) * ld + col;
                C::load_row(&keys[src..src + d], &mut kt[j * d..(j + 1) * d]);
                C::load_row(&values[src..src + d], &mut vt[j * d..(j + 1) * d]);
            }
            let k_t = MatRef::transposed(kt, d);
            let v = MatRef::rows(vt, d);
            self.add_block(q, rows, d, k_t, v, n, scale, mask);
            self.kv_tile = tile;
        }
    }

    /// Writes `acc / sum` into the head's columns of the output rows.
    fn finish(&self, out: &mut [f32], ld: usize, col: usize, d: usize) {
        for (i, acc) in self.acc.chunks_exact(d).enumerate() {
            let inv = if self.sum[i] > 0.0 {
                1.0 / self.sum[i]
            } else {
                0.0
            };
            for (o, &a) in out[i * ld + col..][..d].iter_mut().zip(acc) {
                *o = a * inv;
            }
        }
    }
}

/// Shape of a multi-head attention call.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

impl Heads {
    fn ld(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// Dense attention: `q = [batch, lq, ld]`, `k = v = [batch, lk, ld]`, `out = [batch, lq, ld]`.
/// With `causal`, query i sees keys 0..=i (the CLIP text encoder's mask).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    batch: usize,
    lq: usize,
    lk: usize,
    h: Heads,
    causal: bool,
) {
    let ld = h.ld();
    let d = h.head_dim;
    if batch == 0 || lq == 0 {
        return;
    }
    out.par_chunks_mut(lq * ld)
        .enumerate()
        .take(batch)
        .for_each(|(b, out_b)| {
            let q_b = &q[b * lq * ld..(b + 1) * lq * ld];
            let k_b = &k[b * lk * ld..(b + 1) * lk * ld];
            let v_b = &v[b * lk * ld..(b + 1) * lk * ld];
            out_b
                .par_chunks_mut(BLOCK_Q * ld)
                .enumerate()
                .for_each_init(OnlineSoftmax::new, |state, (qb, out_rows)| {
                    let q0 = qb * BLOCK_Q;
                    let rows = out_rows.len() / ld;
                    let key_end = if causal { lk.min(q0 + rows) } else { lk };
                    for head in 0..h.heads {
                        let col = head * d;
                        let q_view = MatRef::rows(&q_b[q0 * ld + col..], ld);
                        state.reset(rows, d);
                        for k0 in (0..key_end).step_by(BLOCK_K) {
                            let n = BLOCK_K.min(key_end - k0);
                            let mask = if causal {
                                KeyMask::Causal {
                                    first_query: q0,
                                    first_key: k0,
                                }
                            } else {
                                KeyMask::None
                            };
                            state.add_rows(
                                q_view, rows, d, k_b, v_b, ld, col, k0, n, h.scale, mask,
                            );
                        }
                        state.finish(out_rows, ld, col, d);
                    }
                });
        });
}

/// One request of a masked-attention batch.
pub struct MaskedSegment<'a, C: FloatElement> {
    /// Rows of the packed queries (and of the packed fresh keys/values): the request's
    /// active tokens, in the order of its token set.
    pub rows: Range<usize>,
    /// The template's cached keys and values for every token, `[len, ld]`.
    pub cached_k: &'a [C],
    pub cached_v: &'a [C],
    /// The token set's position -> fresh row map (`u32::MAX` for inactive positions).
    pub row_of: &'a [u32],
}

/// Masked self-attention over a ragged batch. The active queries of each request attend to
/// the union of (cached K/V of its inactive tokens) and (fresh K/V of its active tokens),
/// read from the two sources directly: the composite K/V is never built.
pub fn masked_attention<C: FloatElement>(
    q: &[f32],
    k_fresh: &[f32],
    v_fresh: &[f32],
    segments: &[MaskedSegment<'_, C>],
    out: &mut [f32],
    h: Heads,
) {
    let ld = h.ld();
    let d = h.head_dim;
    // Split the output into (segment, first row, block) tasks owning disjoint rows.
    let mut tasks = Vec::new();
    let mut rest: &mut [f32] = out;
    let mut consumed = 0;
    for (s, seg) in segments.iter().enumerate() {
        let skip = (seg.rows.start - consumed) * ld;
        let (_, tail) = rest.split_at_mut(skip);
        let (mine, tail) = tail.split_at_mut(seg.rows.len() * ld);
        rest = tail;
        consumed = seg.rows.end;
        for (i, block) in mine.chunks_mut(BLOCK_Q * ld).enumerate() {
            tasks.push((s, seg.rows.start + i * BLOCK_Q, block));
        }
    }
    tasks
        .into_par_iter()
        .for_each_init(OnlineSoftmax::new, |state, (s, q0, out_rows)| {
            let seg = &segments[s];
            let rows = out_rows.len() / ld;
            let cached_len = seg.row_of.len();
            let fresh_len = seg.rows.len();
            for head in 0..h.heads {
                let col = head * d;
                let q_view = MatRef::rows(&q[q0 * ld + col..], ld);
                state.reset(rows, d);
                for k0 in (0..cached_len).step_by(BLOCK_K) {
                    let n = BLOCK_K.min(cached_len - k0);
                    let mask = KeyMask::FreshInCache(&seg.row_of[k0..k0 + n]);
                    state.add_rows(
                        q_view,
                        rows,
                        d,
                        seg.cached_k,
                        seg.cached_v,
                        ld,
                        col,
                        k0,
                        n,
                        h.scale,
                        mask,
                    );
                }
                for k0 in (0..fresh_len).step_by(BLOCK_K) {
                    let n = BLOCK_K.min(fresh_len - k0);
                    let start = seg.rows.start + k0;
                    state.add_rows(
                        q_view,
                        rows,
                        d,
                        k_fresh,
                        v_fresh,
                        ld,
                        col,
                        start,
                        n,
                        h.scale,
                        KeyMask::None,
                    );
                }
                state.finish(out_rows, ld, col, d);
            }
        });
}
