//! Multi-head attention, flash-style: queries in blocks, keys and values streamed in blocks
//! with an online softmax, so no score matrix larger than one block pair ever exists.
//!
//! Channels-last layout: `q`, `k`, `v` and the output are `[rows, heads * head_dim]` with the
//! heads interleaved as the projections produce them. A task is (sequence, head, run of query
//! rows): it packs that head's keys (transposed) and values into f32 panels once, then runs
//! register-blocked micro-kernels ([`super::tiles`]) over query and key blocks.

use std::ops::Range;

use multiversion::multiversion;
use rayon::prelude::*;

use super::{math, tiles};
use crate::FloatElement;
use crate::tokens::NOT_ACTIVE;

const BLOCK_Q: usize = 64;
const BLOCK_K: usize = 256;
/// Query rows per task: enough to amortise packing the head's keys.
const TASK_Q: usize = 1024;

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
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

/// One head's keys and values, widened to f32 and padded for the micro-kernels: keys
/// transposed in panels of 16 (`tiles::panel_index`), values row-major (`capacity x dp`).
struct PackedKeys {
    d: usize,
    dp: usize,
    len: usize,
    capacity: usize,
    kt: Vec<f32>,
    v: Vec<f32>,
    row: Vec<f32>,
}

impl PackedKeys {
    fn new() -> Self {
        PackedKeys {
            d: 0,
            dp: 0,
            len: 0,
            capacity: 0,
            kt: Vec::new(),
            v: Vec::new(),
            row: Vec::new(),
        }
    }

    fn reset(&mut self, capacity: usize, d: usize) {
        self.d = d;
        self.dp = round_up(d, 8);
        self.len = 0;
        self.capacity = round_up(capacity.max(1), tiles::LANES);
        self.kt.clear();
        self.kt.resize(self.dp * self.capacity, 0.0);
        self.v.clear();
        self.v.resize(self.capacity * self.dp, 0.0);
        self.row.resize(d, 0.0);
    }

    /// Appends source rows `rows` (columns `col..col + d` of `[_, ld]` keys and values).
    fn push<C: FloatElement>(
        &mut self,
        keys: &[C],
        values: &[C],
        ld: usize,
        col: usize,
        rows: impl Iterator<Item = usize>,
    ) {
        let (d, dp) = (self.d, self.dp);
        for r in rows {
            let j = self.len;
            let src = r * ld + col;
            C::load_row(&values[src..src + d], &mut self.v[j * dp..j * dp + d]);
            C::load_row(&keys[src..src + d], &mut self.row);
            let panel = &mut self.kt[tiles::panel_index(0, j, dp)..];
            for (dd, &k) in self.row.iter().enumerate() {
                panel[dd * tiles::LANES] = k;
            }
            self.len += 1;
        }
    }
}

/// Running state of one query block: the scaled query tile, scores, output accumulators,
/// and the online-softmax row maxima and sums.
struct QueryBlock {
    rows: usize,
    rows_pad: usize,
    q: Vec<f32>,
    scores: Vec<f32>,
    acc: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
}

#[multiversion(targets("x86_64+avx2+fma"))]
fn exp_row_update(scores: &mut [f32], max: &mut f32, sum: &mut f32) -> f32 {
    let new_max = math::max(scores).max(*max);
    if new_max == f32::NEG_INFINITY {
        scores.fill(0.0);
        return 1.0;
    }
    let block_sum = math::exp_shifted_sum(scores, new_max);
    let correction = math::exp(*max - new_max);
    *sum = *sum * correction + block_sum;
    *max = new_max;
    correction
}

impl QueryBlock {
    fn new() -> Self {
        QueryBlock {
            rows: 0,
            rows_pad: 0,
            q: Vec::new(),
            scores: Vec::new(),
            acc: Vec::new(),
            max: Vec::new(),
            sum: Vec::new(),
        }
    }

    /// Loads query rows `first..first + rows` (columns `col..col + d` of `[_, ld]`), scaled.
    #[allow(clippy::too_many_arguments)]
    fn start(
        &mut self,
        q: &[f32],
        ld: usize,
        first: usize,
        rows: usize,
        col: usize,
        keys: &PackedKeys,
        scale: f32,
    ) {
        let (d, dp) = (keys.d, keys.dp);
        self.rows = rows;
        self.rows_pad = round_up(rows, tiles::ROWS);
        self.q.clear();
        self.q.resize(self.rows_pad * dp, 0.0);
        for i in 0..rows {
            let src = &q[(first + i) * ld + col..][..d];
            for (dst, &x) in self.q[i * dp..][..d].iter_mut().zip(src) {
                *dst = x * scale;
            }
        }
        self.acc.clear();
        self.acc.resize(self.rows_pad * dp, 0.0);
        self.max.clear();
        self.max.resize(rows, f32::NEG_INFINITY);
        self.sum.clear();
        self.sum.resize(rows, 0.0);
    }

    /// Attends to every packed key. With `causal_first_query`, query i (global index
    /// `first + i`) sees only keys `0..=first + i`.
    fn run(&mut self, keys: &PackedKeys, causal_first_query: Option<usize>) {
        let dp = keys.dp;
        let key_end = match causal_first_query {
            Some(first) => keys.len.min(first + self.rows),
            None => keys.len,
        };
        for k0 in (0..key_end).step_by(BLOCK_K) {
            let n = BLOCK_K.min(key_end - k0);
            let cols = round_up(n, tiles::LANES);
            self.scores.resize(self.rows_pad * cols, 0.0);
            // k0 is a multiple of BLOCK_K, so the block starts at a panel boundary.
            let panels = &keys.kt[k0 * dp..];
            tiles::scores(&self.q, panels, &mut self.scores, self.rows_pad, dp, cols);
            for (i, row) in self
                .scores
                .chunks_exact_mut(cols)
                .enumerate()
                .take(self.rows_pad)
            {
                if i >= self.rows {
                    row.fill(0.0);
                    continue;
                }
                let visible = match causal_first_query {
                    Some(first) => (first + i + 1).saturating_sub(k0).min(n),
                    None => n,
                };
                row[visible..].fill(f32::NEG_INFINITY);
                let correction = exp_row_update(row, &mut self.max[i], &mut self.sum[i]);
                if correction != 1.0 {
                    self.acc[i * dp..(i + 1) * dp]
                        .iter_mut()
                        .for_each(|a| *a *= correction);
                }
            }
            tiles::weighted_sum(
                &self.scores,
                &keys.v[k0 * dp..],
                &mut self.acc,
                self.rows_pad,
                dp,
                cols,
            );
        }
    }

    /// Writes `acc / sum` for each row into `out = [rows, d]` from row `at`.
    fn finish(&self, out: &mut [f32], at: usize, d: usize, dp: usize) {
        for i in 0..self.rows {
            let inv = if self.sum[i] > 0.0 {
                1.0 / self.sum[i]
            } else {
                0.0
            };
            let acc = &self.acc[i * dp..][..d];
            for (o, &a) in out[(at + i) * d..][..d].iter_mut().zip(acc) {
                *o = a * inv;
            }
        }
    }
}

/// Per-thread scratch of a task.
struct Scratch {
    keys: PackedKeys,
    block: QueryBlock,
}

impl Scratch {
    fn new() -> Self {
        Scratch {
            keys: PackedKeys::new(),
            block: QueryBlock::new(),
        }
    }

    /// Runs all query blocks of `rows` (global rows of `q`) against the packed keys and
    /// returns the head's output rows, `[rows.len(), d]`.
    fn attend(
        &mut self,
        q: &[f32],
        ld: usize,
        rows: Range<usize>,
        col: usize,
        scale: f32,
        causal_offset: Option<usize>,
    ) -> Vec<f32> {
        let d = self.keys.d;
        let mut out = vec![0.0f32; rows.len() * d];
        for b0 in (rows.start..rows.end).step_by(BLOCK_Q) {
            let n = BLOCK_Q.min(rows.end - b0);
            self.block.start(q, ld, b0, n, col, &self.keys, scale);
            self.block
                .run(&self.keys, causal_offset.map(|first| b0 - first));
            self.block
                .finish(&mut out, b0 - rows.start, d, self.keys.dp);
        }
        out
    }
}

/// A unit of parallel work: one head of a run of query rows.
struct Task {
    sequence: usize,
    head: usize,
    rows: Range<usize>,
}

fn tasks_for(sequence: usize, heads: usize, rows: Range<usize>, tasks: &mut Vec<Task>) {
    for start in (rows.start..rows.end).step_by(TASK_Q) {
        for head in 0..heads {
            tasks.push(Task {
                sequence,
                head,
                rows: start..rows.end.min(start + TASK_Q),
            });
        }
    }
}

/// Writes each task's `[rows, d]` result into the head's columns of `out = [_, ld]`.
fn scatter_results(out: &mut [f32], ld: usize, d: usize, tasks: &[Task], results: Vec<Vec<f32>>) {
    for (task, result) in tasks.iter().zip(results) {
        let col = task.head * d;
        for (i, r) in task.rows.clone().enumerate() {
            out[r * ld + col..][..d].copy_from_slice(&result[i * d..][..d]);
        }
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
    let sequences: Vec<Sequence> = (0..batch)
        .map(|b| Sequence {
            queries: b * lq..(b + 1) * lq,
            keys: b * lk..(b + 1) * lk,
        })
        .collect();
    sequences_attention(q, k, v, out, &sequences, h, causal);
}

/// One sequence of a ragged attention batch: its query rows and its key/value rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sequence {
    pub queries: Range<usize>,
    pub keys: Range<usize>,
}

/// Attention over sequences of any lengths: each sequence's query rows attend to its own
/// key/value rows (`q`, `k`, `v`, `out` are `[_, ld]`; query rows of different sequences
/// must not overlap, key rows may). A ragged batch's cross-attention runs in one parallel
/// pass this way, each request against its own text context.
pub fn sequences_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    sequences: &[Sequence],
    h: Heads,
    causal: bool,
) {
    let (ld, d) = (h.ld(), h.head_dim);
    let mut tasks = Vec::new();
    for (s, seq) in sequences.iter().enumerate() {
        tasks_for(s, h.heads, seq.queries.clone(), &mut tasks);
    }
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map_init(Scratch::new, |s, t| {
            let seq = &sequences[t.sequence];
            let key_end = if causal {
                seq.keys.len().min(t.rows.end - seq.queries.start)
            } else {
                seq.keys.len()
            };
            s.keys.reset(key_end, d);
            let keys = seq.keys.start..seq.keys.start + key_end;
            s.keys.push(k, v, ld, t.head * d, keys);
            let causal_offset = causal.then_some(seq.queries.start);
            s.attend(q, ld, t.rows.clone(), t.head * d, h.scale, causal_offset)
        })
        .collect();
    scatter_results(out, ld, d, &tasks, results);
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
/// its keys at every position: the cached K/V where the position is inactive and the fresh
/// K/V where it is active, each read from its own source (the cached copies of active
/// positions are skipped, never overwritten).
pub fn masked_attention<C: FloatElement>(
    q: &[f32],
    k_fresh: &[f32],
    v_fresh: &[f32],
    segments: &[MaskedSegment<'_, C>],
    out: &mut [f32],
    h: Heads,
) {
    let (ld, d) = (h.ld(), h.head_dim);
    let mut tasks = Vec::new();
    for (s, seg) in segments.iter().enumerate() {
        tasks_for(s, h.heads, seg.rows.clone(), &mut tasks);
    }
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map_init(Scratch::new, |s, t| {
            let seg = &segments[t.sequence];
            let col = t.head * d;
            s.keys.reset(seg.row_of.len(), d);
            let inactive = (0..seg.row_of.len()).filter(|&p| seg.row_of[p] == NOT_ACTIVE);
            s.keys.push(seg.cached_k, seg.cached_v, ld, col, inactive);
            s.keys.push(k_fresh, v_fresh, ld, col, seg.rows.clone());
            s.attend(q, ld, t.rows.clone(), col, h.scale, None)
        })
        .collect();
    scatter_results(out, ld, d, &tasks, results);
}
