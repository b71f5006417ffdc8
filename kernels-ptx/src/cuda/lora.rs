//! LoRA on the device: merged into a weight in place, or unmerged over a ragged batch (each
//! segment's rows through its own adapter, the weight untouched).

use std::ops::Range;

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::ops::{grid_stride, len_u32};
use super::tables::TableSet;
use super::{CudaDevice, CudaTensor, GpuElement, device_addresses};
use crate::Result;
use crate::error::shape_err;
use crate::ops::lora::{LoraBatch, check_adapter, check_lora_segments};

/// One request of [`CudaDevice::lora_segments`], as [`crate::LoraSegment`] with the adapter
/// in device memory (f32).
pub struct CudaLoraSegment<'a> {
    pub rows: Range<usize>,
    /// `[rank, in]` (PEFT's lora_A).
    pub down: &'a CudaTensor,
    /// `[out, rank]` (PEFT's lora_B).
    pub up: &'a CudaTensor,
    pub scale: f32,
}

/// `seg_of_row` of a row no segment owns (the kernels' `NO_SEGMENT`).
const NO_SEGMENT: u32 = u32::MAX;

impl CudaDevice {
    /// Merges a LoRA into an `[out, in]` weight in place: `W += scale * up * down` with
    /// `up = [out, rank]`, `down = [rank, in]` (PEFT's lora_B, lora_A), accumulated in f32
    /// and rounded once for f16 weights. Keep a [`CudaTensor::try_clone`] to restore exactly.
    pub fn lora_patch<T: GpuElement>(
        &self,
        w: &mut CudaTensor<T>,
        up: &CudaTensor,
        down: &CudaTensor,
        scale: f32,
    ) -> Result<()> {
        let k = T::LORA_PATCH;
        let [out, inp] = *w.shape() else {
            return shape_err(k, format!("weight must be [out, in], got {:?}", w.shape()));
        };
        let rank = check_adapter(k, out, inp, up.shape(), down.shape())?;
        let n = len_u32(k, w.elem_count())?;
        len_u32(k, up.elem_count().max(down.elem_count()))?;
        if n > 0 && rank > 0 {
            let (inp_u, rank_u) = (inp as u32, rank as u32);
            let mut l = self.stream().launch_builder(self.function(k)?);
            l.arg(&mut w.data)
                .arg(&up.data)
                .arg(&down.data)
                .arg(&n)
                .arg(&inp_u)
                .arg(&rank_u)
                .arg(&scale);
            // SAFETY: matches `lora_patch_*(w, up, down, n, in, rank, scale)`; shapes checked.
            self.launched(k, unsafe { l.launch(grid_stride(n)) })?;
        }
        Ok(())
    }

    /// The unmerged LoRA path, as [`crate::Tensor::lora_segments`]:
    /// `y[rows_i] += scale_i * (x[rows_i] * down_i^T) * up_i^T` for each segment, with
    /// `x = [n, in]` and `y = [n, out]`; segments must not overlap. Two launches for the
    /// whole batch (`lora_shrink_segments_f32` into an `[n, max rank]` scratch, then
    /// `lora_expand_segments_f32`), f32 throughout.
    pub fn lora_segments(
        &self,
        x: &CudaTensor,
        y: &mut CudaTensor,
        segments: &[CudaLoraSegment<'_>],
    ) -> Result<()> {
        const OP: &str = "lora_segments";
        let LoraBatch { n, inp, out, ranks } = check_lora_segments(
            OP,
            x.shape(),
            y.shape(),
            segments
                .iter()
                .map(|s| (&s.rows, s.up.shape(), s.down.shape())),
        )?;
        let max_rank = ranks.iter().copied().max().unwrap_or(0);
        let mut seg_of_row = vec![NO_SEGMENT; n];
        for (i, s) in segments.iter().enumerate() {
            seg_of_row[s.rows.clone()].fill(i as u32);
        }
        len_u32(OP, (n * max_rank).max(x.elem_count()).max(y.elem_count()))?;
        if n == 0 || max_rank == 0 || out == 0 {
            return Ok(());
        }
        let stream = self.stream();
        let ranks_u: Vec<u32> = ranks.iter().map(|&r| r as u32).collect();
        let scales: Vec<f32> = segments.iter().map(|s| s.scale).collect();
        let (downs_at, down_guards) =
            device_addresses(stream, segments.iter().map(|s| &*s.down.data));
        let (ups_at, up_guards) = device_addresses(stream, segments.iter().map(|s| &*s.up.data));
        let mut set = TableSet::default();
        let slots = [
            set.push(&ranks_u),
            set.push(&seg_of_row),
            set.push(&scales),
            set.push(&downs_at),
            set.push(&ups_at),
        ];
        let tables = self.upload_tables(OP, &set)?;
        let [ranks_d, seg_of_row_d, scales_d, downs, ups] = slots.map(|slot| tables.address(slot));
        let mut tmp = CudaTensor::<f32>::zeros(self, &[n, max_rank])?;
        let (n_u, inp_u, out_u, max_rank_u) = (n as u32, inp as u32, out as u32, max_rank as u32);
        {
            const K: &str = "lora_shrink_segments_f32";
            let warps = n * max_rank;
            let cfg = LaunchConfig {
                grid_dim: (warps.div_ceil(8).min(1 << 16) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut l = stream.launch_builder(self.function(K)?);
            l.arg(&x.data)
                .arg(&downs)
                .arg(&ranks_d)
                .arg(&seg_of_row_d)
                .arg(&mut tmp.data)
                .arg(&n_u)
                .arg(&inp_u)
                .arg(&max_rank_u);
            // SAFETY: matches `lora_shrink_segments_f32(x, downs, ranks, seg_of_row, tmp, n,
            // in, max_rank)`; every segment's adapter checked against x's width, its rank at
            // most max_rank, its rows inside x; the address table borrows live buffers.
            self.launched(K, unsafe { l.launch(cfg) })?;
        }
        {
            const K: &str = "lora_expand_segments_f32";
            let mut l = stream.launch_builder(self.function(K)?);
            l.arg(&tmp.data)
                .arg(&ups)
                .arg(&ranks_d)
                .arg(&scales_d)
                .arg(&seg_of_row_d)
                .arg(&mut y.data)
                .arg(&n_u)
                .arg(&out_u)
                .arg(&max_rank_u);
            // SAFETY: matches `lora_expand_segments_f32(tmp, ups, ranks, scales, seg_of_row,
            // y, n, out, max_rank)`; shapes checked as above.
            self.launched(K, unsafe { l.launch(grid_stride(len_u32(K, n * out)?)) })?;
        }
        drop((tables, down_guards, up_guards));
        Ok(())
    }
}
