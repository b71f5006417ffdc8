//! Attention on the device: dense (three kernels, chosen per head width) and ragged or masked
//! over a batch of token segments (the flash tiles, one launch for every segment).

use std::ops::Range;

use cudarc::driver::{LaunchConfig, PushKernelArg};
use half::f16;

use super::ops::len_u32;
use super::tables::TableSet;
use super::{CudaDevice, CudaTensor, device_addresses};
use crate::error::{invalid, shape_err};
use crate::ops::attention::{
    check_masked_inputs, check_masked_segments, check_ragged_inputs, check_ragged_segments,
    heads_of,
};
use crate::{RaggedSegment, Result, TokenSet};

/// One request of [`CudaDevice::masked_attention`], as [`crate::AttentionSegment`] with the
/// template's keys and values in device memory, f16 as the device cache holds them.
pub struct CudaAttentionSegment<'a> {
    /// The request's rows in the packed queries and fresh keys/values (its active tokens).
    pub rows: Range<usize>,
    /// The request's active tokens; `rows.len()` must equal `tokens.len()`.
    pub tokens: &'a TokenSet,
    /// The template's keys and values at all `tokens.grid_len()` positions, `[grid_len, c]`.
    pub cached_k: &'a CudaTensor<f16>,
    pub cached_v: &'a CudaTensor<f16>,
}

impl CudaDevice {
    /// Scaled dot-product attention, as [`crate::Tensor::attention`]: `q = [batch, lq, c]`,
    /// `k = v = [batch, lk, c]`, `heads` heads of `c / heads` channels, scale
    /// `1/sqrt(c / heads)`; with `causal`, query `i` attends to keys `0..=i`. Runs the
    /// device's chosen [`AttentionKernel`] (tiles unless set otherwise).
    pub fn attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        heads: usize,
        causal: bool,
    ) -> Result<CudaTensor> {
        self.attention_with(self.attention_kernel(), q, k, v, heads, causal)
    }

    /// [`CudaDevice::attention`] with a given kernel. `Flash` falls back to `Tiles` for
    /// heads it does not take (width not a multiple of 4, or over 160), and `Tiles` to `Rows`
    /// for heads too wide for its shared-memory tiles.
    pub fn attention_with(
        &self,
        kernel: AttentionKernel,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        heads: usize,
        causal: bool,
    ) -> Result<CudaTensor> {
        const K: &str = "attention";
        let &[batch, lq, c] = q.shape() else {
            return shape_err(K, format!("q must be [batch, lq, c], got {:?}", q.shape()));
        };
        if k.shape().len() != 3
            || k.shape()[0] != batch
            || k.shape()[2] != c
            || k.shape() != v.shape()
        {
            return shape_err(
                K,
                format!(
                    "q {:?}, k {:?}, v {:?} do not agree",
                    q.shape(),
                    k.shape(),
                    v.shape()
                ),
            );
        }
        if heads == 0 || c % heads != 0 {
            return invalid(K, format!("{c} channels do not split into {heads} heads"));
        }
        let (lk, d) = (k.shape()[1], c / heads);
        if d > 1024 || batch * heads > 65_535 {
            return invalid(
                K,
                format!("head size {d} or {batch}x{heads} heads beyond the launch limits"),
            );
        }
        len_u32(K, q.elem_count().max(k.elem_count()))?;
        // No keys: zeros, as on the CPU.
        if q.elem_count() == 0 || lk == 0 {
            return CudaTensor::zeros(self, q.shape());
        }
        // SAFETY: the launch below covers every query row of every sample and head, and
        // each kernel writes all `d` outputs of its rows.
        let mut out = unsafe { CudaTensor::uninit(self, q.shape()) }?;
        // A flash kernel that does not take `d` falls back to the tiles, then to the rows.
        let flash = FlashKernel::choose(kernel, d);
        let (name, rows_per_block, threads, shared_bytes) = match (flash, kernel, tile_warps(d)) {
            (Some(flash), _, _) => (flash.dense, FLASH_Q, FLASH_THREADS, flash.shared_bytes),
            (None, kernel, Some(warps)) if kernel != AttentionKernel::Rows => (
                "attention_tiles_f32",
                warps,
                32 * warps,
                tiles_shared_floats(warps, d) * 4,
            ),
            // Each warp's scaled query and accumulator.
            _ => (
                "attention_rows_f32",
                ROW_WARPS,
                32 * ROW_WARPS,
                ROW_WARPS * 2 * d as u32 * 4,
            ),
        };
        let (lq_u, lk_u, heads_u, d_u) = (lq as u32, lk as u32, heads as u32, d as u32);
        let scale = 1.0 / (d as f32).sqrt();
        let causal_u = u32::from(causal);
        let mut l = self.stream().launch_builder(self.function(name)?);
        l.arg(&q.data)
            .arg(&k.data)
            .arg(&v.data)
            .arg(&mut out.data)
            .arg(&lq_u)
            .arg(&lk_u)
            .arg(&heads_u)
            .arg(&d_u)
            .arg(&scale)
            .arg(&causal_u);
        let cfg = LaunchConfig {
            grid_dim: (lq_u.div_ceil(rows_per_block), (batch * heads) as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: shared_bytes,
        };
        // SAFETY: the kernels take `(q, k, v, out, lq, lk, heads, d, scale, causal)`; shapes
        // checked above, the shared memory sized by the kernel's own rule.
        self.launched(name, unsafe { l.launch(cfg) })?;
        Ok(out)
    }
}

impl CudaDevice {
    /// Masked self-attention over a ragged batch, as [`crate::Tensor::masked_attention`]:
    /// `q`, `k_fresh`, `v_fresh = [rows, c]` are the segments' active rows stacked; each
    /// segment's queries attend to its template's cached keys and values with its active
    /// positions' rows replaced by the fresh ones. One launch of the device's flash kernel
    /// (`FlashKernel::choose`: the f32 tiles, or the tensor-core entries) reads the f16
    /// cache in place; heads no flash kernel takes run per segment on a widened copy instead.
    pub fn masked_attention(
        &self,
        q: &CudaTensor,
        k_fresh: &CudaTensor,
        v_fresh: &CudaTensor,
        segments: &[CudaAttentionSegment<'_>],
        heads: usize,
    ) -> Result<CudaTensor> {
        const OP: &str = "masked_attention";
        let (rows, c) = check_masked_inputs(OP, q.shape(), k_fresh.shape(), v_fresh.shape())?;
        let d = heads_of(OP, c, heads)?.head_dim;
        check_masked_segments(
            OP,
            (rows, c),
            segments.iter().map(|s| {
                let cached = (s.cached_k.shape(), s.cached_v.shape());
                (&s.rows, s.tokens, cached)
            }),
        )?;
        let Some(flash) = FlashKernel::choose(self.attention_kernel(), d) else {
            return self.masked_attention_per_segment(q, k_fresh, v_fresh, segments, heads);
        };
        let plan = FlashPlan::new(segments.iter().map(|s| FlashSegment {
            queries: s.rows.clone(),
            key_start: s.rows.start,
            key_len: s.tokens.grid_len(),
            row_of: Some(s.tokens.row_of()),
        }));
        let stream = self.stream();
        let (keys, key_guards) =
            device_addresses(stream, segments.iter().map(|s| &*s.cached_k.data));
        let (values, value_guards) =
            device_addresses(stream, segments.iter().map(|s| &*s.cached_v.data));
        let cached = Some((&keys[..], &values[..]));
        let out = self.masked_flash(flash, q, k_fresh, v_fresh, cached, &plan, heads)?;
        drop((key_guards, value_guards));
        Ok(out)
    }

    /// Attention over a ragged batch, as [`crate::Tensor::ragged_attention`]: `q = [rows, c]`,
    /// `k = v = [key_rows, c]`, each segment's queries against its own key rows (each
    /// request's cross-attention to its own text). One launch of the device's flash kernel;
    /// heads no flash kernel takes run per segment.
    pub fn ragged_attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        segments: &[RaggedSegment],
        heads: usize,
    ) -> Result<CudaTensor> {
        const OP: &str = "ragged_attention";
        let (rows, c, key_rows) = check_ragged_inputs(OP, q.shape(), k.shape(), v.shape())?;
        let d = heads_of(OP, c, heads)?.head_dim;
        check_ragged_segments(OP, rows, key_rows, segments)?;
        let Some(flash) = FlashKernel::choose(self.attention_kernel(), d) else {
            return self.ragged_attention_per_segment(q, k, v, segments, heads);
        };
        let plan = FlashPlan::new(segments.iter().map(|s| FlashSegment {
            queries: s.queries.clone(),
            key_start: s.keys.start,
            key_len: s.keys.len(),
            row_of: None,
        }));
        self.masked_flash(flash, q, k, v, None, &plan, heads)
    }

    /// Launches `flash`'s masked kernel over `plan`'s tiles; `cached` holds the addresses of
    /// the segments' f16 keys and values when the plan maps grid positions. The plan's
    /// tables and the address tables go up in one copy.
    #[allow(clippy::too_many_arguments)]
    fn masked_flash(
        &self,
        flash: FlashKernel,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        cached: Option<(&[u64], &[u64])>,
        plan: &FlashPlan,
        heads: usize,
    ) -> Result<CudaTensor> {
        let name = flash.masked;
        let c = q.shape()[1];
        let d = c / heads;
        len_u32(
            name,
            q.elem_count().max(k.elem_count()).max(plan.row_of.len()),
        )?;
        if heads > 65_535 {
            return invalid(name, format!("{heads} heads beyond the launch limits"));
        }
        let mut out = if plan.gapless_rows == q.shape()[0] {
            // SAFETY: the tiles cover every query row, and each launch block writes its
            // rows' outputs for its head (all heads are launched).
            unsafe { CudaTensor::uninit(self, q.shape()) }?
        } else {
            // Rows outside every segment are zeros, as on the CPU.
            CudaTensor::zeros(self, q.shape())?
        };
        let tiles = len_u32(name, plan.tiles.len() / 2)?;
        if tiles == 0 {
            return Ok(out);
        }
        let stream = self.stream();
        let mut set = TableSet::default();
        let plan_slots = [
            set.push(&plan.segs),
            set.push(&plan.tiles),
            // Without maps, `row_of` is empty: never read.
            set.push(&plan.row_of),
        ];
        // Null address tables where no cache is read.
        let cached_slots = cached.map(|(keys, values)| [set.push(keys), set.push(values)]);
        let tables = self.upload_tables(name, &set)?;
        let [segs_d, tiles_d, row_of_d] = plan_slots.map(|slot| tables.address(slot));
        let [keys_d, values_d] =
            cached_slots.map_or([0, 0], |s| s.map(|slot| tables.address(slot)));
        let (heads_u, d_u) = (heads as u32, d as u32);
        let scale = 1.0 / (d as f32).sqrt();
        let has_cache = u32::from(cached.is_some());
        let mut l = stream.launch_builder(self.function(name)?);
        l.arg(&q.data)
            .arg(&k.data)
            .arg(&v.data)
            .arg(&keys_d)
            .arg(&values_d)
            .arg(&row_of_d)
            .arg(&tiles_d)
            .arg(&segs_d)
            .arg(&mut out.data)
            .arg(&heads_u)
            .arg(&d_u)
            .arg(&scale)
            .arg(&has_cache);
        let cfg = LaunchConfig {
            grid_dim: (tiles, heads_u, 1),
            block_dim: (FLASH_THREADS, 1, 1),
            shared_mem_bytes: flash.shared_bytes,
        };
        // SAFETY: matches `attention_masked_flash_f32(q, k, v, cached_k, cached_v, row_of,
        // tiles, segs, out, heads, d, scale, has_cache)`, which the tensor-core entries share
        // (chosen for this `d`, with their own shared size). The segments were checked: query
        // rows inside `q` and `out`, fresh key rows inside `k`/`v` (`row_of` holds indices
        // below each segment's active count, or u32::MAX), cached maps of `key_len * c` values
        // at live addresses borrowed for this call (null tables only with `has_cache == 0`,
        // when the kernel reads none); the tiles name only those segments.
        self.launched(name, unsafe { l.launch(cfg) })?;
        Ok(out)
    }

    /// [`CudaDevice::masked_attention`] one segment at a time, for heads the flash tiles do
    /// not take: the template's keys widened to f32, the fresh rows scattered in, dense
    /// attention.
    pub(crate) fn masked_attention_per_segment(
        &self,
        q: &CudaTensor,
        k_fresh: &CudaTensor,
        v_fresh: &CudaTensor,
        segments: &[CudaAttentionSegment<'_>],
        heads: usize,
    ) -> Result<CudaTensor> {
        let c = q.shape()[1];
        let mut out = CudaTensor::zeros(self, q.shape())?;
        for s in segments.iter().filter(|s| !s.rows.is_empty()) {
            let rows = row_indices(&s.rows);
            let grid = s.tokens.grid_len();
            let full = |cached: &CudaTensor<f16>, fresh: &CudaTensor| -> Result<CudaTensor> {
                let mut map = self.f16_to_f32(cached)?.reshape(&[grid, c])?;
                self.scatter_rows(
                    &mut map,
                    s.tokens.positions(),
                    &self.gather_rows(fresh, &rows)?,
                )?;
                map.reshape(&[1, grid, c])
            };
            let (k, v) = (full(s.cached_k, k_fresh)?, full(s.cached_v, v_fresh)?);
            let qs = self.gather_rows(q, &rows)?.reshape(&[1, rows.len(), c])?;
            let attended = self.attention(&qs, &k, &v, heads, false)?;
            self.scatter_rows(&mut out, &rows, &attended.reshape(&[rows.len(), c])?)?;
        }
        Ok(out)
    }

    /// [`CudaDevice::ragged_attention`] one segment at a time, for heads the flash tiles do
    /// not take.
    fn ragged_attention_per_segment(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        segments: &[RaggedSegment],
        heads: usize,
    ) -> Result<CudaTensor> {
        let c = q.shape()[1];
        let mut out = CudaTensor::zeros(self, q.shape())?;
        for s in segments.iter().filter(|s| !s.queries.is_empty()) {
            let (rows, keys) = (row_indices(&s.queries), row_indices(&s.keys));
            let take = |t: &CudaTensor, index: &[u32]| -> Result<CudaTensor> {
                self.gather_rows(t, index)?.reshape(&[1, index.len(), c])
            };
            let attended = self.attention(
                &take(q, &rows)?,
                &take(k, &keys)?,
                &take(v, &keys)?,
                heads,
                false,
            )?;
            self.scatter_rows(&mut out, &rows, &attended.reshape(&[rows.len(), c])?)?;
        }
        Ok(out)
    }
}

fn row_indices(rows: &Range<usize>) -> Vec<u32> {
    rows.clone().map(|r| r as u32).collect()
}

/// One segment of a flash plan: its query rows, its first fresh key row and key count, and
/// for masked self-attention the map from grid positions to fresh rows (`u32::MAX` where the
/// template's cached key stands).
struct FlashSegment<'a> {
    queries: Range<usize>,
    key_start: usize,
    key_len: usize,
    row_of: Option<&'a [u32]>,
}

/// The tables `attention_masked_flash_f32` reads: per segment `(q_start, q_len, key_start,
/// key_len, map_start)`, the concatenated position maps, and one `(segment, first query)`
/// pair per block of `FLASH_Q` query rows.
#[derive(Debug, PartialEq, Eq)]
struct FlashPlan {
    segs: Vec<u32>,
    row_of: Vec<u32>,
    tiles: Vec<u32>,
    /// Query rows `0..n` the segments cover without a gap (0 when the first starts later):
    /// the rows the launch writes, every other row keeps its zero.
    gapless_rows: usize,
}

impl FlashPlan {
    /// The plan of checked segments (every count below 2^32).
    fn new<'a>(segments: impl IntoIterator<Item = FlashSegment<'a>>) -> FlashPlan {
        let mut plan = FlashPlan {
            segs: Vec::new(),
            row_of: Vec::new(),
            tiles: Vec::new(),
            gapless_rows: 0,
        };
        let mut gapless = true;
        for (i, s) in segments.into_iter().enumerate() {
            gapless &= s.queries.start == plan.gapless_rows;
            if gapless {
                plan.gapless_rows = s.queries.end;
            }
            let map_start = plan.row_of.len() as u32;
            if let Some(map) = s.row_of {
                plan.row_of.extend_from_slice(map);
            }
            let u = |v: usize| v as u32;
            plan.segs.extend_from_slice(&[
                u(s.queries.start),
                u(s.queries.len()),
                u(s.key_start),
                u(s.key_len),
                map_start,
            ]);
            for q0 in (0..s.queries.len()).step_by(FLASH_Q as usize) {
                plan.tiles.extend_from_slice(&[i as u32, q0 as u32]);
            }
        }
        plan
    }
}

/// Which attention kernel [`CudaDevice::attention`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernel {
    /// `attention_rows_f32`: one warp per query row, keys and values read from global memory.
    Rows,
    /// `attention_tiles_f32`: the block's warps share 32-key tiles staged in shared memory.
    Tiles,
    /// `attention_flash_f32`: 64 queries x 32 keys per step, register-tiled 4 x 4 per thread.
    Flash,
    /// `attention_flash_mma_f16_d{40,64,80,160}`: 64 queries x 64 keys per step on tensor
    /// cores (f16 products, f32 accumulation and softmax); other widths run `Flash`.
    FlashMma,
    /// `FlashMma` with bf16 products (`attention_flash_mma_bf16_d*`): f32's range, for
    /// activations beyond f16's (diffusers' `upcast_attention`), with 8-bit significands.
    FlashMmaBf16,
}

/// A flash kernel pair for one head width: the dense entry, the masked/ragged entry (same
/// tiling, arguments of `attention_masked_flash_f32`) and the launch's shared bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FlashKernel {
    dense: &'static str,
    masked: &'static str,
    shared_bytes: u32,
}

impl FlashKernel {
    /// The flash kernels `kernel` runs for width `d`: the tensor-core pair where it has an
    /// entry for `d`, else the f32 pair where its tiles take `d`; None for `Rows`, `Tiles`
    /// and widths neither takes.
    fn choose(kernel: AttentionKernel, d: usize) -> Option<FlashKernel> {
        // Entry names: [f16 dense, f16 masked, bf16 dense, bf16 masked] per width.
        let half = match kernel {
            AttentionKernel::FlashMma => Some(0),
            AttentionKernel::FlashMmaBf16 => Some(2),
            _ => None,
        };
        let mma = half.and_then(|h| {
            MMA_ENTRIES
                .iter()
                .find(|(width, _)| *width == d)
                .map(|(_, names)| (names[h], names[h + 1]))
        });
        if let Some((dense, masked)) = mma {
            return Some(FlashKernel {
                dense,
                masked,
                shared_bytes: mma_shared_bytes(d),
            });
        }
        let flash = matches!(
            kernel,
            AttentionKernel::Flash | AttentionKernel::FlashMma | AttentionKernel::FlashMmaBf16
        );
        let [dense, masked] = if !flash {
            return None;
        } else if flash_fits(d) {
            ["attention_flash_f32", "attention_masked_flash_f32"]
        } else if wide_flash_fits(d) {
            WIDE_FLASH_KERNELS
        } else {
            return None;
        };
        Some(FlashKernel {
            dense,
            masked,
            shared_bytes: flash_shared_floats(d) * 4,
        })
    }
}

/// The tensor-core flash entries per head width: f16 dense and masked, bf16 dense and masked.
const MMA_ENTRIES: [(usize, [&str; 4]); 4] = [
    (
        40,
        [
            "attention_flash_mma_f16_d40",
            "attention_masked_flash_mma_f16_d40",
            "attention_flash_mma_bf16_d40",
            "attention_masked_flash_mma_bf16_d40",
        ],
    ),
    (
        64,
        [
            "attention_flash_mma_f16_d64",
            "attention_masked_flash_mma_f16_d64",
            "attention_flash_mma_bf16_d64",
            "attention_masked_flash_mma_bf16_d64",
        ],
    ),
    (
        80,
        [
            "attention_flash_mma_f16_d80",
            "attention_masked_flash_mma_f16_d80",
            "attention_flash_mma_bf16_d80",
            "attention_masked_flash_mma_bf16_d80",
        ],
    ),
    (
        160,
        [
            "attention_flash_mma_f16_d160",
            "attention_masked_flash_mma_f16_d160",
            "attention_flash_mma_bf16_d160",
            "attention_masked_flash_mma_bf16_d160",
        ],
    ),
];

/// Shared bytes of the tensor-core flash kernels (their module's rule): the query/key tile
/// `[64][16 ceil(d / 16) + 8]` and the transposed value tile `[d][72]`, f16.
fn mma_shared_bytes(d: usize) -> u32 {
    let width = 16 * d.div_ceil(16) as u32;
    2 * (64 * (width + 8) + d as u32 * 72)
}

/// Query rows per block and threads of `attention_flash_f32` (`FLASH_Q` in the kernel).
const FLASH_Q: u32 = 64;
const FLASH_THREADS: u32 = 128;

/// Shared floats of `attention_flash_f32` (and its wide twin): the query tile `[d][64]`,
/// the key tile `[d][36]`, the value tile `[32][d]`.
const fn flash_shared_floats(d: usize) -> u32 {
    d as u32 * (64 + 36 + 32)
}

/// Head widths the flash kernel takes: 16-byte rows, three 32-column chunks, its tiles within
/// the default shared memory.
fn flash_fits(d: usize) -> bool {
    d > 0 && d.is_multiple_of(4) && d <= 80 && flash_shared_floats(d) * 4 <= SHARED_LIMIT_BYTES
}

/// The widest head of the wide flash kernels (five 32-column chunks): SD1.5's 160.
const WIDE_FLASH_D: usize = 160;

/// The f32 flash entries (dense, masked) for heads wider than `attention_flash_f32` takes.
pub(crate) const WIDE_FLASH_KERNELS: [&str; 2] = [
    "attention_flash_wide_f32",
    "attention_masked_flash_wide_f32",
];

/// The dynamic shared memory [`WIDE_FLASH_KERNELS`] need at their widest head, beyond the
/// default 48 KiB: [`super::CudaDevice::open`] raises their limit to it (every GPU the PTX
/// runs on, compute capability 8.0 or later, allows at least 99 KiB).
pub(crate) const WIDE_FLASH_SHARED_BYTES: u32 = flash_shared_floats(WIDE_FLASH_D) * 4;
// Past the default limit (hence the opt-in), within what every sm_80+ GPU allows.
const _: () =
    assert!(WIDE_FLASH_SHARED_BYTES > SHARED_LIMIT_BYTES && WIDE_FLASH_SHARED_BYTES <= 99 * 1024);

/// Head widths the wide flash kernels take: 16-byte rows, up to 160.
fn wide_flash_fits(d: usize) -> bool {
    d > 0 && d.is_multiple_of(4) && d <= WIDE_FLASH_D
}

/// Warps (query rows) per block of the rows kernel.
const ROW_WARPS: u32 = 4;

/// Default dynamic shared memory a launch may use without opting in.
const SHARED_LIMIT_BYTES: u32 = 48 * 1024;

/// Shared floats of `attention_tiles_f32`: per warp a query and an accumulator, then a
/// 32-key tile with rows padded to `d + 1` and a 32-value tile.
fn tiles_shared_floats(warps: u32, d: usize) -> u32 {
    let d = d as u32;
    warps * 2 * d + 32 * (d + 1) + 32 * d
}

/// The most warps (8, 4, 2 or 1) whose tiles fit the default shared memory, or None.
fn tile_warps(d: usize) -> Option<u32> {
    [8, 4, 2, 1]
        .into_iter()
        .find(|&w| tiles_shared_floats(w, d) * 4 <= SHARED_LIMIT_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flash_plan_tiles_each_segment_and_concatenates_its_maps() {
        let (a, b) = ([0, u32::MAX, 1], [u32::MAX, 0]);
        let plan = FlashPlan::new([
            FlashSegment {
                queries: 0..130,
                key_start: 0,
                key_len: 3,
                row_of: Some(&a),
            },
            // No queries: no tile, but its map keeps its place.
            FlashSegment {
                queries: 130..130,
                key_start: 130,
                key_len: 2,
                row_of: Some(&b),
            },
            FlashSegment {
                queries: 130..131,
                key_start: 130,
                key_len: 2,
                row_of: Some(&b),
            },
        ]);
        assert_eq!(
            plan.segs,
            [0, 130, 0, 3, 0, 130, 0, 130, 2, 3, 130, 1, 130, 2, 5]
        );
        assert_eq!(plan.row_of, [0, u32::MAX, 1, u32::MAX, 0, u32::MAX, 0]);
        assert_eq!(plan.tiles, [0, 0, 0, 64, 0, 128, 2, 0]);
        assert_eq!(plan.gapless_rows, 131);
        // Per-segment keys (cross-attention): no maps.
        let plan = FlashPlan::new([FlashSegment {
            queries: 5..70,
            key_start: 77,
            key_len: 77,
            row_of: None,
        }]);
        assert_eq!(plan.segs, [5, 65, 77, 77, 0]);
        assert!(plan.row_of.is_empty());
        assert_eq!(plan.tiles, [0, 0, 0, 64]);
        // Rows 0..5 belong to no segment: the output is zero-filled, not left unwritten.
        assert_eq!(plan.gapless_rows, 0);
    }

    #[test]
    fn a_gap_between_segments_ends_the_rows_written_without_a_gap() {
        let segment = |queries| FlashSegment {
            queries,
            key_start: 0,
            key_len: 1,
            row_of: None,
        };
        let plan = FlashPlan::new([segment(0..10), segment(10..20), segment(25..30)]);
        assert_eq!(plan.gapless_rows, 20);
        assert_eq!(FlashPlan::new([]).gapless_rows, 0);
    }

    #[test]
    fn flash_attention_takes_sd_heads() {
        for d in [4, 40, 64, 80] {
            assert!(flash_fits(d), "{d}");
        }
        for d in [0, 2, 77, 84, 160] {
            assert!(!flash_fits(d), "{d}");
        }
    }

    #[test]
    fn attention_tiles_fit_shared_memory() {
        // SD heads (40, 64, 80, 160) fit; 8 warps for the narrow ones.
        assert_eq!(tile_warps(40), Some(8));
        assert_eq!(tile_warps(64), Some(8));
        assert_eq!(tile_warps(160), Some(4));
        for d in [1, 40, 77, 160, 170] {
            let w = tile_warps(d).unwrap();
            assert!(tiles_shared_floats(w, d) * 4 <= SHARED_LIMIT_BYTES, "{d}");
        }
        assert_eq!(tile_warps(1024), None);
    }

    #[test]
    fn flash_kernels_are_chosen_per_head_width() {
        use AttentionKernel::*;
        // Tensor cores for SD's widths, within the default shared memory.
        for d in [40, 64, 80, 160] {
            let k = FlashKernel::choose(FlashMma, d).unwrap();
            assert_eq!(k.dense, format!("attention_flash_mma_f16_d{d}"));
            assert_eq!(k.masked, format!("attention_masked_flash_mma_f16_d{d}"));
            assert!(k.shared_bytes <= SHARED_LIMIT_BYTES, "{d}");
            assert!(super::super::ptx::KERNELS.contains(&k.dense));
            assert!(super::super::ptx::KERNELS.contains(&k.masked));
        }
        // d = 160: the [64][168] query/key tile and the [160][72] value tile, f16.
        assert_eq!(mma_shared_bytes(160), 2 * (64 * 168 + 160 * 72));
        // d = 40 pads the query/key tile to 48 columns.
        assert_eq!(mma_shared_bytes(40), 2 * (64 * 56 + 40 * 72));
        // Other widths: the f32 flash tiles where they fit, else none (tiles or rows).
        let f32_flash = FlashKernel::choose(Flash, 32).unwrap();
        assert_eq!(FlashKernel::choose(FlashMma, 32), Some(f32_flash));
        assert_eq!(f32_flash.dense, "attention_flash_f32");
        assert_eq!(FlashKernel::choose(FlashMma, 77), None);
        // Wider f32 heads (SD1.5's 160): the wide flash kernels, beyond the default shared
        // memory (the device raises their limit when it opens).
        for d in [84, 96, 160] {
            let wide = FlashKernel::choose(Flash, d).unwrap();
            assert_eq!([wide.dense, wide.masked], WIDE_FLASH_KERNELS);
            assert_eq!(wide.shared_bytes, flash_shared_floats(d) * 4);
            assert!(wide.shared_bytes <= WIDE_FLASH_SHARED_BYTES, "{d}");
        }
        for name in WIDE_FLASH_KERNELS {
            assert!(super::super::ptx::KERNELS.contains(&name));
        }
        assert_eq!(FlashKernel::choose(Flash, 164), None);
        assert_eq!(FlashKernel::choose(Flash, 162), None);
        assert_eq!(FlashKernel::choose(Tiles, 40), None);
        assert_eq!(FlashKernel::choose(Rows, 64), None);
        let bf16 = FlashKernel::choose(FlashMmaBf16, 160).unwrap();
        assert_eq!(bf16.dense, "attention_flash_mma_bf16_d160");
        assert_eq!(bf16.shared_bytes, mma_shared_bytes(160));
        assert!(super::super::ptx::KERNELS.contains(&bf16.masked));
        assert_eq!(FlashKernel::choose(FlashMmaBf16, 32), Some(f32_flash));
    }
}
