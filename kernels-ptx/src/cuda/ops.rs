//! Launchers: shape checks on the host (no kernel trusts a size it was not checked for),
//! then one launch on the device's stream. Launch shapes follow each kernel's doc comment
//! in `kernels-ptx/device/`.

use cudarc::driver::{LaunchConfig, PushKernelArg};
use half::f16;

use super::tables::{TableSet, Tables};
use super::{CudaDevice, CudaTensor, GpuElement, device_addresses};
use crate::Result;
use crate::error::{invalid, shape_err};

/// One segment of [`CudaDevice::group_norm_blended_stats`]: the active positions of its fresh
/// rows, its template's statistics (`groups`) and its template's per-position moments
/// `[positions, groups * 2]` (f16, as a template's recording is kept on the device).
pub struct CudaBlendedSegment<'a> {
    pub active: &'a [u32],
    pub template: &'a [crate::GroupStats],
    pub moments: &'a CudaTensor<f16>,
}

/// Threads per block for the grid-stride kernels and the largest row-kernel block.
const BLOCK: u32 = 256;
/// Grid cap for grid-stride kernels: enough blocks to fill any current GPU.
const MAX_GRID: usize = 1 << 16;
/// Dynamic shared memory of the block-reduction kernels: one f32 per warp, 32 warps.
const REDUCE_SHARED: u32 = 32 * 4;

/// A size as the kernels' u32, with headroom so a grid-stride index never wraps.
pub(super) fn len_u32(op: &'static str, n: usize) -> Result<u32> {
    if n > i32::MAX as usize {
        return invalid(op, format!("{n} elements exceed the kernels' 2^31 limit"));
    }
    Ok(n as u32)
}

pub(super) fn grid_stride(n: u32) -> LaunchConfig {
    let blocks = (n as usize).div_ceil(BLOCK as usize).clamp(1, MAX_GRID);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per row (or per `(group, sample)`): whole warps, no more than the row needs.
fn per_row(grid: (u32, u32), cols: usize) -> LaunchConfig {
    let threads = cols.div_ceil(32).clamp(1, (BLOCK / 32) as usize) as u32 * 32;
    LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: REDUCE_SHARED,
    }
}

/// `(rows, cols)` of a tensor seen as rows over its last dimension.
fn rows_cols(op: &'static str, shape: &[usize]) -> Result<(usize, usize)> {
    match shape.last() {
        Some(&c) => Ok((shape.iter().product::<usize>() / c.max(1), c)),
        None => shape_err(op, "expected at least one dimension"),
    }
}

fn check_vector(op: &'static str, name: &str, t: &CudaTensor, len: usize) -> Result<()> {
    if t.shape() != [len] {
        return shape_err(op, format!("{name} must be [{len}], got {:?}", t.shape()));
    }
    Ok(())
}

impl CudaDevice {
    fn binary(&self, kernel: &'static str, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        // Written: equal shapes, and `b` one trailing row repeated over `a` (a bias).
        let row = a.shape().last().copied().unwrap_or(1);
        let trailing_row = b.shape().last() == Some(&row)
            && b.shape().len() <= a.shape().len()
            && b.elem_count() == row;
        if a.shape() != b.shape() && !trailing_row {
            return shape_err(
                kernel,
                format!(
                    "CUDA broadcasting is written for equal shapes and a trailing row only; \
                     got {:?} and {:?}",
                    a.shape(),
                    b.shape()
                ),
            );
        }
        let n = len_u32(kernel, a.elem_count())?;
        let b_len = len_u32(kernel, b.elem_count())?;
        // SAFETY: the launch below writes every element (none when it is empty).
        let mut out = unsafe { CudaTensor::uninit(self, a.shape()) }?;
        if n > 0 {
            let f = self.function(kernel)?;
            let mut l = self.stream().launch_builder(f);
            l.arg(&a.data)
                .arg(&b.data)
                .arg(&mut out.data)
                .arg(&n)
                .arg(&b_len);
            // SAFETY: argument types and sizes match the kernel's signature, checked above.
            self.launched(kernel, unsafe { l.launch(grid_stride(n)) })?;
        }
        Ok(out)
    }

    /// `a + b`: equal shapes, or `b` a trailing row broadcast over `a`'s rows.
    pub fn add(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        self.binary("binary_add_f32", a, b)
    }

    pub fn sub(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        self.binary("binary_sub_f32", a, b)
    }

    pub fn mul(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        self.binary("binary_mul_f32", a, b)
    }

    pub fn div(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        self.binary("binary_div_f32", a, b)
    }

    fn unary(&self, kernel: &'static str, x: &CudaTensor) -> Result<CudaTensor> {
        let n = len_u32(kernel, x.elem_count())?;
        // SAFETY: the launch below writes every element (none when it is empty).
        let mut out = unsafe { CudaTensor::uninit(self, x.shape()) }?;
        if n > 0 {
            let f = self.function(kernel)?;
            let mut l = self.stream().launch_builder(f);
            l.arg(&x.data).arg(&mut out.data).arg(&n);
            // SAFETY: (x, out, n) as the kernel takes them; both buffers hold n values.
            self.launched(kernel, unsafe { l.launch(grid_stride(n)) })?;
        }
        Ok(out)
    }

    pub fn relu(&self, x: &CudaTensor) -> Result<CudaTensor> {
        self.unary("relu_f32", x)
    }

    pub fn silu(&self, x: &CudaTensor) -> Result<CudaTensor> {
        self.unary("silu_f32", x)
    }

    /// Exact (erf) GELU.
    pub fn gelu(&self, x: &CudaTensor) -> Result<CudaTensor> {
        self.unary("gelu_erf_f32", x)
    }

    pub fn gelu_tanh(&self, x: &CudaTensor) -> Result<CudaTensor> {
        self.unary("gelu_tanh_f32", x)
    }

    pub fn quick_gelu(&self, x: &CudaTensor) -> Result<CudaTensor> {
        self.unary("quick_gelu_f32", x)
    }

    /// `x * scale + shift`.
    pub fn affine(&self, x: &CudaTensor, scale: f32, shift: f32) -> Result<CudaTensor> {
        const K: &str = "affine_f32";
        let n = len_u32(K, x.elem_count())?;
        // SAFETY: the launch below writes every element (none when it is empty).
        let mut out = unsafe { CudaTensor::uninit(self, x.shape()) }?;
        if n > 0 {
            let mut l = self.stream().launch_builder(self.function(K)?);
            l.arg(&x.data)
                .arg(&mut out.data)
                .arg(&n)
                .arg(&scale)
                .arg(&shift);
            // SAFETY: matches `affine_f32(x, out, n, scale, shift)`.
            self.launched(K, unsafe { l.launch(grid_stride(n)) })?;
        }
        Ok(out)
    }

    fn convert<A: GpuElement, B: GpuElement>(
        &self,
        kernel: &'static str,
        x: &CudaTensor<A>,
    ) -> Result<CudaTensor<B>> {
        let n = len_u32(kernel, x.elem_count())?;
        // SAFETY: the launch below writes every element (none when it is empty).
        let mut out = unsafe { CudaTensor::<B>::uninit(self, x.shape()) }?;
        if n > 0 {
            let mut l = self.stream().launch_builder(self.function(kernel)?);
            l.arg(&x.data).arg(&mut out.data).arg(&n);
            // SAFETY: matches `convert_*(x, out, n)` with the element types of A and B.
            self.launched(kernel, unsafe { l.launch(grid_stride(n)) })?;
        }
        Ok(out)
    }

    /// Widens f16 data (weights, an activation cache) to f32.
    pub fn f16_to_f32(&self, x: &CudaTensor<f16>) -> Result<CudaTensor> {
        self.convert("convert_f16_to_f32", x)
    }

    /// Rounds f32 data to f16 (nearest even), e.g. to record an activation cache.
    pub fn f32_to_f16(&self, x: &CudaTensor) -> Result<CudaTensor<f16>> {
        self.convert("convert_f32_to_f16", x)
    }

    /// A matrix `[rows, cols]` transposed to `[cols, rows]` and rounded to f16 (nearest
    /// even): a conv's packed weight as the f16 tensor-core kernels read it.
    pub fn transpose_to_f16(&self, x: &CudaTensor) -> Result<CudaTensor<f16>> {
        const K: &str = "transpose_f32_to_f16";
        let &[rows, cols] = x.shape() else {
            return shape_err(K, format!("expected [rows, cols], got {:?}", x.shape()));
        };
        let n = len_u32(K, x.elem_count())?;
        // SAFETY: the launch below writes every element (none when it is empty).
        let mut out = unsafe { CudaTensor::<f16>::uninit(self, &[cols, rows]) }?;
        if n > 0 {
            let (rows_u, cols_u) = (rows as u32, cols as u32);
            let mut l = self.stream().launch_builder(self.function(K)?);
            l.arg(&x.data).arg(&mut out.data).arg(&rows_u).arg(&cols_u);
            // SAFETY: matches `transpose_f32_to_f16(x, out, rows, cols)`; both hold
            // `rows * cols < 2^31` values.
            self.launched(K, unsafe { l.launch(grid_stride(n)) })?;
        }
        Ok(out)
    }

    /// GEGLU: the last dimension splits into (hidden, gate); `hidden * gelu(gate)`.
    pub fn geglu(&self, x: &CudaTensor) -> Result<CudaTensor> {
        const K: &str = "geglu_f32";
        let (_, last) = rows_cols(K, x.shape())?;
        if last % 2 != 0 {
            return shape_err(K, format!("last dimension {last} is odd"));
        }
        let mut shape = x.shape().to_vec();
        *shape.last_mut().unwrap_or(&mut 0) = last / 2;
        // SAFETY: the launch below writes every element (none when it is empty).
        let mut out = unsafe { CudaTensor::uninit(self, &shape) }?;
        // The kernel indexes x (2n values) in u32 too.
        len_u32(K, x.elem_count())?;
        let n = len_u32(K, out.elem_count())?;
        let half = len_u32(K, last / 2)?;
        if n > 0 {
            let mut l = self.stream().launch_builder(self.function(K)?);
            l.arg(&x.data).arg(&mut out.data).arg(&n).arg(&half);
            // SAFETY: matches `geglu_f32(x, out, n, half)`; x holds 2n values.
            self.launched(K, unsafe { l.launch(grid_stride(n)) })?;
        }
        Ok(out)
    }

    /// Softmax over the last dimension.
    pub fn softmax_last_dim(&self, x: &CudaTensor) -> Result<CudaTensor> {
        const K: &str = "softmax_rows_f32";
        let (rows, cols) = rows_cols(K, x.shape())?;
        len_u32(K, x.elem_count())?;
        // SAFETY: the launch below writes every element (none when it is empty).
        let mut out = unsafe { CudaTensor::uninit(self, x.shape()) }?;
        if rows > 0 && cols > 0 {
            let cols_u = cols as u32;
            let mut l = self.stream().launch_builder(self.function(K)?);
            l.arg(&x.data).arg(&mut out.data).arg(&cols_u);
            // SAFETY: matches `softmax_rows_f32(x, out, cols)`, one block per row.
            self.launched(K, unsafe { l.launch(per_row((rows as u32, 1), cols)) })?;
        }
        Ok(out)
    }

    /// Layer norm over the last dimension.
    pub fn layer_norm(
        &self,
        x: &CudaTensor,
        gamma: &CudaTensor,
        beta: &CudaTensor,
        eps: f32,
    ) -> Result<CudaTensor> {
        const K: &str = "layer_norm_rows_f32";
        let (rows, cols) = rows_cols(K, x.shape())?;
        check_vector(K, "weight", gamma, cols)?;
        check_vector(K, "bias", beta, cols)?;
        len_u32(K, x.elem_count())?;
        // SAFETY: the launch below writes every element (none when it is empty).
        let mut out = unsafe { CudaTensor::uninit(self, x.shape()) }?;
        if rows > 0 && cols > 0 {
            let cols_u = cols as u32;
            let mut l = self.stream().launch_builder(self.function(K)?);
            l.arg(&x.data)
                .arg(&gamma.data)
                .arg(&beta.data)
                .arg(&mut out.data)
                .arg(&cols_u)
                .arg(&eps);
            // SAFETY: matches `layer_norm_rows_f32(x, gamma, beta, out, cols, eps)`.
            self.launched(K, unsafe { l.launch(per_row((rows as u32, 1), cols)) })?;
        }
        Ok(out)
    }

    /// `(batch, positions, channels)` of a channels-last `[batch, ..., channels]` tensor.
    fn group_dims(
        op: &'static str,
        x: &CudaTensor,
        groups: usize,
    ) -> Result<(usize, usize, usize)> {
        if x.shape().len() < 2 {
            return shape_err(
                op,
                format!("expected [batch, ..., channels], got {:?}", x.shape()),
            );
        }
        let (batch, c) = (x.shape()[0], x.shape()[x.shape().len() - 1]);
        if groups == 0 || c % groups != 0 {
            return invalid(
                op,
                format!("{c} channels do not split into {groups} groups"),
            );
        }
        if batch > 65_535 || groups > i32::MAX as usize {
            return invalid(op, format!("batch {batch} exceeds the launch grid"));
        }
        len_u32(op, x.elem_count())?;
        let hw = x.elem_count() / (batch * c).max(1);
        Ok((batch, hw, c))
    }

    /// Group-norm statistics of a channels-last `[batch, ..., channels]` tensor:
    /// `[batch, groups, 2]` holding (mean, 1 / std) per sample and group.
    pub fn group_norm_stats(&self, x: &CudaTensor, groups: usize, eps: f32) -> Result<CudaTensor> {
        const K: &str = "group_norm_stats_f32";
        let (batch, hw, c) = Self::group_dims(K, x, groups)?;
        if batch == 0 || hw == 0 || c == 0 {
            return CudaTensor::zeros(self, &[batch, groups, 2]);
        }
        // SAFETY: the launch below has a block per (group, sample), which writes its pair.
        let mut stats = unsafe { CudaTensor::uninit(self, &[batch, groups, 2]) }?;
        let (hw_u, c_u, g_u) = (hw as u32, c as u32, groups as u32);
        let mut l = self.stream().launch_builder(self.function(K)?);
        l.arg(&x.data)
            .arg(&mut stats.data)
            .arg(&hw_u)
            .arg(&c_u)
            .arg(&g_u)
            .arg(&eps);
        let cfg = per_row((g_u, batch as u32), hw * (c / groups));
        // SAFETY: matches `group_norm_stats_f32(x, stats, hw, c, groups, eps)`.
        self.launched(K, unsafe { l.launch(cfg) })?;
        Ok(stats)
    }

    /// Group norm with given statistics (from [`CudaDevice::group_norm_stats`], or a
    /// template's), optionally fused with SiLU.
    pub fn group_norm_with_stats(
        &self,
        x: &CudaTensor,
        stats: &CudaTensor,
        groups: usize,
        gamma: &CudaTensor,
        beta: &CudaTensor,
        silu: bool,
    ) -> Result<CudaTensor> {
        let k = group_apply_kernel(silu);
        let (batch, hw, c) = Self::group_dims(k, x, groups)?;
        self.group_apply(k, x, stats, (batch, hw, c, groups), (gamma, beta), None)
    }

    /// [`CudaDevice::group_norm_with_stats`] over the rows of a ragged batch: row `r` of
    /// `x = [rows, c]` normalised with the statistics of sample `sample_of_row[r]` (its
    /// segment's, `stats = [samples, groups, 2]`), optionally fused with SiLU. One launch
    /// where gathering the statistics per row first would take two.
    #[allow(clippy::too_many_arguments)]
    pub fn group_norm_rows_with_stats(
        &self,
        x: &CudaTensor,
        stats: &CudaTensor,
        sample_of_row: &[u32],
        groups: usize,
        gamma: &CudaTensor,
        beta: &CudaTensor,
        silu: bool,
    ) -> Result<CudaTensor> {
        let k = group_apply_kernel(silu);
        let &[rows, c] = x.shape() else {
            return shape_err(k, format!("expected [rows, channels], got {:?}", x.shape()));
        };
        if groups == 0 || c % groups != 0 {
            return invalid(k, format!("{c} channels do not split into {groups} groups"));
        }
        len_u32(k, x.elem_count())?;
        let samples = stats.shape().first().copied().unwrap_or(0);
        check_samples_of_rows(k, sample_of_row, rows, samples)?;
        let (_table, rows_at) = self.upload_index(k, sample_of_row)?;
        self.group_apply(
            k,
            x,
            stats,
            (samples, 1, c, groups),
            (gamma, beta),
            Some(rows_at),
        )
    }

    /// The launch of `k` (a group norm apply kernel) on checked dimensions `(samples, hw, c,
    /// groups)`: per sample of `hw` positions, or (`sample_of_row` the device address of a
    /// row-to-sample table) per row.
    fn group_apply(
        &self,
        k: &'static str,
        x: &CudaTensor,
        stats: &CudaTensor,
        (samples, hw, c, groups): (usize, usize, usize, usize),
        (gamma, beta): (&CudaTensor, &CudaTensor),
        sample_of_row: Option<u64>,
    ) -> Result<CudaTensor> {
        if stats.shape() != [samples, groups, 2] {
            return shape_err(
                k,
                format!(
                    "statistics must be [{samples}, {groups}, 2], got {:?}",
                    stats.shape()
                ),
            );
        }
        check_vector(k, "weight", gamma, c)?;
        check_vector(k, "bias", beta, c)?;
        // SAFETY: the launch below writes every element (none when it is empty).
        let mut out = unsafe { CudaTensor::uninit(self, x.shape()) }?;
        let n = x.elem_count() as u32;
        if n > 0 {
            let (hw_u, c_u, g_u) = (hw as u32, c as u32, groups as u32);
            let rows_at = sample_of_row.unwrap_or(0);
            let mut l = self.stream().launch_builder(self.function(k)?);
            l.arg(&x.data)
                .arg(&stats.data)
                .arg(&gamma.data)
                .arg(&beta.data)
                .arg(&mut out.data)
                .arg(&n)
                .arg(&hw_u)
                .arg(&c_u)
                .arg(&g_u)
                .arg(&rows_at);
            // SAFETY: matches `group_norm_apply_f32(x, stats, gamma, beta, out, n, hw, c, groups,
            // sample_of_row)`; a row table (when not null) holds one sample below `samples`
            // per row of `x` (checked by the caller).
            self.launched(k, unsafe { l.launch(grid_stride(n)) })?;
        }
        Ok(out)
    }

    /// The group statistics of each segment's blended map, as [`Tensor::blended_group_stats`]
    /// per segment: `x = [rows, c]` stacks the segments' fresh rows, segment `i` owning
    /// `segments[i].active.len()` of them, in that order. Returns `[segments, groups, 2]`
    /// (mean, 1 / std).
    ///
    /// [`Tensor::blended_group_stats`]: crate::Tensor::blended_group_stats
    pub fn group_norm_blended_stats(
        &self,
        x: &CudaTensor,
        segments: &[CudaBlendedSegment<'_>],
        groups: usize,
        eps: f32,
    ) -> Result<CudaTensor> {
        const K: &str = "group_norm_blended_stats_f16";
        let (rows, c) = rows_cols(K, x.shape())?;
        if groups == 0 || !c.is_multiple_of(groups) {
            return invalid(K, format!("{c} channels do not split into {groups} groups"));
        }
        let hw = segments.first().map_or(0, |s| s.moments.shape()[0]);
        let mut offsets = Vec::with_capacity(segments.len() + 1);
        let mut positions = Vec::with_capacity(rows);
        let mut template = Vec::with_capacity(segments.len() * groups * 2);
        offsets.push(0u32);
        for (i, s) in segments.iter().enumerate() {
            if s.moments.shape() != [hw, groups * 2] {
                return shape_err(
                    K,
                    format!(
                        "segment {i}: moments {:?}, expected [{hw}, {}]",
                        s.moments.shape(),
                        groups * 2
                    ),
                );
            }
            if s.template.len() != groups {
                return invalid(
                    K,
                    format!(
                        "segment {i}: {} statistics for {groups} groups",
                        s.template.len()
                    ),
                );
            }
            if let Some(&p) = s.active.iter().find(|&&p| p as usize >= hw) {
                return invalid(
                    K,
                    format!("segment {i}: position {p} outside {hw} positions"),
                );
            }
            positions.extend_from_slice(s.active);
            offsets.push(positions.len() as u32);
            template.extend(s.template.iter().flat_map(|t| [t.mean, t.rstd]));
        }
        if positions.len() != rows {
            return shape_err(
                K,
                format!("{rows} rows for {} active positions", positions.len()),
            );
        }
        len_u32(K, x.elem_count().max(hw * groups * 2))?;
        if segments.is_empty() {
            return CudaTensor::zeros(self, &[0, groups, 2]);
        }
        // SAFETY: the launch below has a block per (group, segment), which writes its pair.
        let mut stats = unsafe { CudaTensor::uninit(self, &[segments.len(), groups, 2]) }?;
        let stream = self.stream();
        let (moments_at, guards) =
            device_addresses(stream, segments.iter().map(|s| &*s.moments.data));
        let mut set = TableSet::default();
        let slots = [
            set.push(&offsets),
            set.push(&positions),
            set.push(&template),
            set.push(&moments_at),
        ];
        let tables = self.upload_tables(K, &set)?;
        let [offsets_d, positions_d, template_d, moments_d] =
            slots.map(|slot| tables.address(slot));
        let (c_u, g_u, hw_u) = (c as u32, groups as u32, hw as u32);
        {
            let mut l = stream.launch_builder(self.function(K)?);
            l.arg(&x.data)
                .arg(&offsets_d)
                .arg(&positions_d)
                .arg(&template_d)
                .arg(&moments_d)
                .arg(&mut stats.data)
                .arg(&c_u)
                .arg(&g_u)
                .arg(&hw_u)
                .arg(&eps);
            let widest = segments.iter().map(|s| s.active.len()).max().unwrap_or(0);
            let cfg = per_row((g_u, segments.len() as u32), widest * (c / groups));
            // SAFETY: matches `group_norm_blended_stats_f16(x, offsets, positions, template,
            // moments, stats, c, groups, hw, eps)`: the offsets partition x's checked rows,
            // every position is below hw, and each address points at a live `[hw, groups,
            // 2]` f16 buffer borrowed for this call.
            self.launched(K, unsafe { l.launch(cfg) })?;
        }
        drop((tables, guards));
        Ok(stats)
    }

    /// Group norm of a channels-last tensor (statistics per sample and group over every
    /// position), optionally followed by SiLU in the same pass.
    pub fn group_norm(
        &self,
        x: &CudaTensor,
        groups: usize,
        gamma: &CudaTensor,
        beta: &CudaTensor,
        eps: f32,
        silu: bool,
    ) -> Result<CudaTensor> {
        let stats = self.group_norm_stats(x, groups, eps)?;
        self.group_norm_with_stats(x, &stats, groups, gamma, beta, silu)
    }

    /// `index` in device memory: its address, and the handle to keep until the launch
    /// reading it is queued.
    fn upload_index(&self, op: &'static str, index: &[u32]) -> Result<(Tables<'_>, u64)> {
        let mut set = TableSet::default();
        let slot = set.push(index);
        let tables = self.upload_tables(op, &set)?;
        let address = tables.address(slot);
        Ok((tables, address))
    }

    /// Rows `index[i]` of a tensor read as `[rows, cols]` (its last dimension the columns,
    /// the others the rows: a `[samples, h, w, c]` map's positions), in order:
    /// `[index.len(), cols]`.
    pub fn gather_rows(&self, src: &CudaTensor, index: &[u32]) -> Result<CudaTensor> {
        const K: &str = "gather_rows_f32";
        let (cols, rows) = match src.shape().split_last() {
            Some((&cols, lead)) if !lead.is_empty() => (cols, lead.iter().product::<usize>()),
            _ => {
                return shape_err(
                    K,
                    format!("expected [..., rows, cols], got {:?}", src.shape()),
                );
            }
        };
        if let Some(&bad) = index.iter().find(|&&i| i as usize >= rows) {
            return invalid(K, format!("row {bad} out of range for {rows} rows"));
        }
        // SAFETY: the launch below writes every element (none when it is empty).
        let mut out = unsafe { CudaTensor::uninit(self, &[index.len(), cols]) }?;
        let count = len_u32(K, index.len())?;
        let n = len_u32(K, out.elem_count())?;
        if n > 0 {
            let (_index_table, idx) = self.upload_index(K, index)?;
            let cols_u = cols as u32;
            let mut l = self.stream().launch_builder(self.function(K)?);
            l.arg(&src.data)
                .arg(&idx)
                .arg(&mut out.data)
                .arg(&count)
                .arg(&cols_u);
            // SAFETY: matches `gather_rows_f32(src, index, out, count, cols)`; indices checked.
            self.launched(K, unsafe { l.launch(grid_stride(n)) })?;
        }
        Ok(out)
    }

    /// Writes `rows[i]` to row `index[i]` of `dst`, in place. Indices must be in range and
    /// unique (checked here: two writers of one row would race).
    pub fn scatter_rows(
        &self,
        dst: &mut CudaTensor,
        index: &[u32],
        rows: &CudaTensor,
    ) -> Result<()> {
        const K: &str = "scatter_rows_f32";
        let [n_rows, cols] = *dst.shape() else {
            return shape_err(K, format!("expected [rows, cols], got {:?}", dst.shape()));
        };
        if rows.shape() != [index.len(), cols] {
            return shape_err(
                K,
                format!(
                    "{} indices need rows [{}, {cols}], got {:?}",
                    index.len(),
                    index.len(),
                    rows.shape()
                ),
            );
        }
        let mut seen = vec![false; n_rows];
        for &i in index {
            match seen.get_mut(i as usize) {
                None => return invalid(K, format!("row {i} out of range for {n_rows} rows")),
                Some(s) if *s => return invalid(K, format!("row {i} written twice")),
                Some(s) => *s = true,
            }
        }
        let count = len_u32(K, index.len())?;
        let n = len_u32(K, rows.elem_count())?;
        len_u32(K, dst.elem_count())?;
        if n > 0 {
            let (_index_table, idx) = self.upload_index(K, index)?;
            let cols_u = cols as u32;
            let mut l = self.stream().launch_builder(self.function(K)?);
            l.arg(&mut dst.data)
                .arg(&idx)
                .arg(&rows.data)
                .arg(&count)
                .arg(&cols_u);
            // SAFETY: matches `scatter_rows_f32(dst, index, rows, count, cols)`; indices
            // checked in range and unique.
            self.launched(K, unsafe { l.launch(grid_stride(n)) })?;
        }
        Ok(())
    }

    /// Concatenation along the last dimension, as [`crate::Tensor::concat_last`]: every part
    /// has the same leading dimensions; the output's last dimension is the sum of theirs.
    /// One `copy_cols_f32` launch per (non-empty) part.
    pub fn concat_last(&self, parts: &[&CudaTensor]) -> Result<CudaTensor> {
        const K: &str = "copy_cols_f32";
        let Some(first) = parts.first() else {
            return shape_err(K, "nothing to concatenate");
        };
        let Some((_, lead)) = first.shape().split_last() else {
            return shape_err(K, "expected at least one dimension");
        };
        for p in parts {
            if p.shape().split_last().map(|(_, l)| l) != Some(lead) {
                return shape_err(
                    K,
                    format!("{:?} does not match {:?}", p.shape(), first.shape()),
                );
            }
            len_u32(K, p.elem_count())?;
        }
        let rows: usize = lead.iter().product();
        let total: usize = parts.iter().map(|p| p.shape()[p.shape().len() - 1]).sum();
        let mut shape = lead.to_vec();
        shape.push(total);
        len_u32(K, rows.saturating_mul(total))?;
        let (rows_u, dst_cols) = (len_u32(K, rows)?, len_u32(K, total)?);
        // SAFETY: the launches below, one per part with its columns side by side, write
        // every element (none when it is empty).
        let mut out = unsafe { CudaTensor::uninit(self, &shape) }?;
        let mut offset = 0u32;
        for p in parts {
            let src_cols = p.shape()[p.shape().len() - 1] as u32;
            if rows_u > 0 && src_cols > 0 {
                let mut l = self.stream().launch_builder(self.function(K)?);
                l.arg(&p.data)
                    .arg(&mut out.data)
                    .arg(&rows_u)
                    .arg(&src_cols)
                    .arg(&dst_cols)
                    .arg(&offset);
                // SAFETY: matches `copy_cols_f32(src, dst, rows, src_cols, dst_cols,
                // col_offset)`; src holds rows * src_cols values, dst rows * dst_cols, and
                // offset + src_cols <= dst_cols.
                self.launched(K, unsafe { l.launch(grid_stride(rows_u * src_cols)) })?;
            }
            offset += src_cols;
        }
        Ok(out)
    }

    /// Nearest-neighbour 2x upsampling of a channels-last `[batch, h, w, c]` map to
    /// `[batch, 2h, 2w, c]`, as [`crate::Tensor::upsample_nearest2x`].
    pub fn upsample_nearest2x(&self, x: &CudaTensor) -> Result<CudaTensor> {
        const K: &str = "upsample_nearest2x_f32";
        let &[batch, h, w, c] = x.shape() else {
            return shape_err(K, format!("expected [batch, h, w, c], got {:?}", x.shape()));
        };
        let shape = [batch, 2 * h, 2 * w, c];
        // Four outputs per input; the kernel indexes both in u32.
        let n = len_u32(K, x.elem_count().saturating_mul(4))?;
        // SAFETY: the launch below writes every element (none when it is empty).
        let mut out = unsafe { CudaTensor::uninit(self, &shape) }?;
        if n > 0 {
            let (b_u, h_u, w_u, c_u) = (batch as u32, h as u32, w as u32, c as u32);
            let mut l = self.stream().launch_builder(self.function(K)?);
            l.arg(&x.data)
                .arg(&mut out.data)
                .arg(&b_u)
                .arg(&h_u)
                .arg(&w_u)
                .arg(&c_u);
            // SAFETY: matches `upsample_nearest2x_f32(src, dst, batch, h, w, c)`; out holds
            // the n = 4 * batch * h * w * c < 2^31 outputs, x a quarter of them.
            self.launched(K, unsafe { l.launch(grid_stride(n)) })?;
        }
        Ok(out)
    }

    /// `x + v` with `x = [samples, ..., c]` and `v = [samples, c]` broadcast over each
    /// sample's positions (a ResNet block's time embedding added to its feature map).
    pub fn add_per_sample(&self, x: &CudaTensor, v: &CudaTensor) -> Result<CudaTensor> {
        let (samples, c) = match (x.shape(), v.shape()) {
            (&[s, .., c], &[vs, vc]) if s == vs && c == vc => (s, c),
            _ => {
                return shape_err(
                    ADD_PER_SAMPLE,
                    format!(
                        "expected x [samples, ..., c] and v [samples, c], got {:?} and {:?}",
                        x.shape(),
                        v.shape()
                    ),
                );
            }
        };
        let n = len_u32(ADD_PER_SAMPLE, x.elem_count())?;
        let per_sample = n.checked_div(samples as u32).unwrap_or(0);
        self.add_per_sample_launch(x, v, per_sample, c, None)
    }

    /// `x = [rows, c]` plus `v = [samples, c]`, row `r` getting `v[sample_of_row[r]]` (a
    /// ragged batch's rows, each with its segment's vector): one launch where gathering `v`
    /// per row first would take two.
    pub fn add_per_row_sample(
        &self,
        x: &CudaTensor,
        v: &CudaTensor,
        sample_of_row: &[u32],
    ) -> Result<CudaTensor> {
        const K: &str = ADD_PER_SAMPLE;
        let (rows, samples, c) = match (x.shape(), v.shape()) {
            (&[rows, c], &[samples, vc]) if c == vc => (rows, samples, c),
            _ => {
                return shape_err(
                    K,
                    format!(
                        "expected x [rows, c] and v [samples, c], got {:?} and {:?}",
                        x.shape(),
                        v.shape()
                    ),
                );
            }
        };
        check_samples_of_rows(K, sample_of_row, rows, samples)?;
        let (_table, rows_at) = self.upload_index(K, sample_of_row)?;
        self.add_per_sample_launch(x, v, 0, c, Some(rows_at))
    }

    /// The launch of `add_per_sample_f32`: per sample of `per_sample` values, or (with the
    /// device address of a row-to-sample table) per row.
    fn add_per_sample_launch(
        &self,
        x: &CudaTensor,
        v: &CudaTensor,
        per_sample: u32,
        c: usize,
        sample_of_row: Option<u64>,
    ) -> Result<CudaTensor> {
        const K: &str = ADD_PER_SAMPLE;
        let n = len_u32(K, x.elem_count())?;
        len_u32(K, v.elem_count())?;
        // SAFETY: the launch below writes every element (none when it is empty).
        let mut out = unsafe { CudaTensor::uninit(self, x.shape()) }?;
        if n > 0 {
            let c_u = c as u32;
            let rows_at = sample_of_row.unwrap_or(0);
            let mut l = self.stream().launch_builder(self.function(K)?);
            l.arg(&x.data)
                .arg(&v.data)
                .arg(&mut out.data)
                .arg(&n)
                .arg(&per_sample)
                .arg(&c_u)
                .arg(&rows_at);
            // SAFETY: matches `add_per_sample_f32(x, v, out, n, per_sample, c,
            // sample_of_row)`; without a row table per_sample is a multiple of c and v holds
            // samples * c values; a row table holds a sample below v's count per row of x
            // (checked by the callers).
            self.launched(K, unsafe { l.launch(grid_stride(n)) })?;
        }
        Ok(out)
    }
}

const ADD_PER_SAMPLE: &str = "add_per_sample_f32";

/// The group norm apply kernel, with SiLU fused or not.
fn group_apply_kernel(silu: bool) -> &'static str {
    if silu {
        "group_norm_silu_apply_f32"
    } else {
        "group_norm_apply_f32"
    }
}

/// A row-to-sample table must name a sample for each of `rows` rows, each below `samples`.
fn check_samples_of_rows(
    op: &'static str,
    sample_of_row: &[u32],
    rows: usize,
    samples: usize,
) -> Result<()> {
    if sample_of_row.len() != rows {
        return invalid(
            op,
            format!("{} row samples for {rows} rows", sample_of_row.len()),
        );
    }
    match sample_of_row.iter().find(|&&s| s as usize >= samples) {
        Some(bad) => invalid(
            op,
            format!("sample {bad} out of range for {samples} samples"),
        ),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_shapes_follow_the_kernels_conventions() {
        // Row kernels: whole warps, 32..=256 threads, the reduction scratch.
        for (cols, threads) in [(1, 32), (33, 64), (77, 96), (320, 256), (100_000, 256)] {
            let cfg = per_row((5, 2), cols);
            assert_eq!(cfg.block_dim, (threads, 1, 1), "{cols}");
            assert_eq!((cfg.grid_dim, cfg.shared_mem_bytes), ((5, 2, 1), 128));
        }
        // Grid-stride kernels: at least one block, capped grid.
        assert_eq!(grid_stride(1).grid_dim.0, 1);
        assert_eq!(grid_stride(257).grid_dim.0, 2);
        assert_eq!(grid_stride(i32::MAX as u32).grid_dim.0, MAX_GRID as u32);
        assert!(len_u32("x", i32::MAX as usize).is_ok());
        assert!(len_u32("x", i32::MAX as usize + 1).is_err());
    }
}
