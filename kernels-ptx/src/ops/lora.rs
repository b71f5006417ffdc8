use std::ops::Range;

use half::{bf16, f16};

use crate::cpu::lora;
use crate::error::{invalid, shape_err};
use crate::tensor::CpuStorage;
use crate::{DType, Result, Tensor};

/// The weight as it was before a LoRA patch, for an exact restore.
///
/// Rounding makes `(W + d) - d != W` in floating point, so an exact restore needs the
/// original values; this holds them (the same bytes as the patched weight).
#[derive(Debug)]
pub struct LoraBackup {
    original: Tensor,
}

impl LoraBackup {
    pub fn size_in_bytes(&self) -> usize {
        self.original.size_in_bytes()
    }
}

/// One row segment of an unmerged LoRA batch: rows `rows` use adapter (down, up) at `scale`.
pub struct LoraSegment<'a> {
    pub rows: Range<usize>,
    /// `[rank, in]` (PEFT's lora_A).
    pub down: &'a Tensor,
    /// `[out, rank]` (PEFT's lora_B).
    pub up: &'a Tensor,
    pub scale: f32,
}

/// Checks an adapter for an `[out, inp]` weight (`down = [rank, inp]`, `up = [out, rank]`,
/// given as shapes) and returns its rank.
pub(crate) fn check_adapter(
    op: &'static str,
    out: usize,
    inp: usize,
    up: &[usize],
    down: &[usize],
) -> Result<usize> {
    if down.len() != 2 || up.len() != 2 {
        return shape_err(op, "up and down must be matrices");
    }
    let rank = down[0];
    if down != [rank, inp] || up != [out, rank] {
        return shape_err(
            op,
            format!(
                "for a [{out}, {inp}] weight, down must be [rank, {inp}] and up [{out}, rank]; \
                 got down {down:?}, up {up:?}"
            ),
        );
    }
    Ok(rank)
}

/// The shapes of an unmerged batch, checked: `x = [n, inp]`, `y = [n, out]`.
pub(crate) struct LoraBatch {
    pub n: usize,
    pub inp: usize,
    pub out: usize,
    /// Each segment's adapter rank.
    pub ranks: Vec<usize>,
}

/// Checks an unmerged batch (`x`, `y` and each segment's `(rows, up shape, down shape)` as
/// shapes): `x = [n, inp]` and `y = [n, out]`, segments' rows ascending, disjoint and
/// inside, each adapter fitting.
pub(crate) fn check_lora_segments<'a>(
    op: &'static str,
    x: &[usize],
    y: &[usize],
    segments: impl IntoIterator<Item = (&'a Range<usize>, &'a [usize], &'a [usize])>,
) -> Result<LoraBatch> {
    let (&[n, inp], &[y_rows, out]) = (x, y) else {
        return shape_err(op, format!("x and y must be matrices, got {x:?} and {y:?}"));
    };
    if y_rows != n {
        return shape_err(op, format!("x {x:?} and y {y:?} differ in rows"));
    }
    let mut previous_end = 0;
    let mut ranks = Vec::new();
    for (i, (rows, up, down)) in segments.into_iter().enumerate() {
        if rows.start < previous_end || rows.end > n || rows.start > rows.end {
            return invalid(
                op,
                format!("segment {i}: rows {rows:?} overlap or exceed {n}"),
            );
        }
        previous_end = rows.end;
        ranks.push(check_adapter(op, out, inp, up, down)?);
    }
    Ok(LoraBatch { n, inp, out, ranks })
}

impl Tensor {
    /// Merges a LoRA into this `[out, in]` weight in place: `W += scale * up * down`,
    /// accumulated in f32 and rounded once for f16/bf16 weights. Returns what
    /// [`Tensor::lora_restore`] needs to put the weight back bit for bit.
    pub fn lora_patch(&mut self, up: &Tensor, down: &Tensor, scale: f32) -> Result<LoraBackup> {
        const OP: &str = "lora_patch";
        self.check_rank(OP, 2)?;
        let (out, inp) = (self.shape()[0], self.shape()[1]);
        let rank = check_adapter(OP, out, inp, up.shape(), down.shape())?;
        let up = up.to_dtype(DType::F32)?;
        let down = down.to_dtype(DType::F32)?;
        let (up, down) = (up.f32s(OP)?, down.f32s(OP)?);
        let backup = LoraBackup {
            original: self.clone(),
        };
        match self.cpu_storage_mut() {
            CpuStorage::F32(w) => lora::patch_f32(w, out, inp, up, down, rank, scale),
            CpuStorage::F16(w) => lora::patch_half::<f16>(w, inp, up, down, rank, scale),
            CpuStorage::BF16(w) => lora::patch_half::<bf16>(w, inp, up, down, rank, scale),
            CpuStorage::I64(_) => return invalid(OP, "cannot patch an integer tensor"),
        }
        Ok(backup)
    }

    /// Puts back the weight a [`Tensor::lora_patch`] changed, exactly.
    pub fn lora_restore(&mut self, backup: LoraBackup) -> Result<()> {
        if backup.original.shape() != self.shape() || backup.original.dtype() != self.dtype() {
            return invalid(
                "lora_restore",
                format!(
                    "backup {:?} {:?} does not belong to this {:?} {:?} weight",
                    backup.original.shape(),
                    backup.original.dtype(),
                    self.shape(),
                    self.dtype()
                ),
            );
        }
        *self = backup.original;
        Ok(())
    }

    /// The unmerged LoRA path: `y[rows_i] += scale_i * (x[rows_i] * down_i^T) * up_i^T` for
    /// each segment, with `x = [n, in]` (self) and `y = [n, out]`. Segments must not overlap.
    pub fn lora_segments(&self, y: &mut Tensor, segments: &[LoraSegment<'_>]) -> Result<()> {
        const OP: &str = "lora_segments";
        let LoraBatch {
            inp, out, ranks, ..
        } = check_lora_segments(
            OP,
            self.shape(),
            y.shape(),
            segments
                .iter()
                .map(|s| (&s.rows, s.up.shape(), s.down.shape())),
        )?;
        let mut owned = Vec::with_capacity(segments.len());
        for (s, rank) in segments.iter().zip(ranks) {
            owned.push((
                s.down.to_dtype(DType::F32)?,
                s.up.to_dtype(DType::F32)?,
                rank,
            ));
        }
        let mut cpu_segments = Vec::with_capacity(segments.len());
        for (s, (down, up, rank)) in segments.iter().zip(&owned) {
            cpu_segments.push(lora::Segment {
                rows: s.rows.clone(),
                down: down.f32s(OP)?,
                up: up.f32s(OP)?,
                rank: *rank,
                scale: s.scale,
            });
        }
        let x = self.f32s(OP)?;
        lora::apply_segments(x, inp, y.f32s_mut(OP)?, out, &cpu_segments);
        Ok(())
    }
}
