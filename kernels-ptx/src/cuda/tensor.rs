//! A minimal device tensor: a contiguous device buffer and a shape.

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};

use super::pool::PooledSlice;
use super::staging::Staging;
use super::{CudaDevice, driver_err};
use crate::error::{invalid, shape_err};
use crate::{Result, Tensor, TensorElement};

/// Element types a [`CudaTensor`] holds: f32 (activations), f16 and bf16 (weights, caches).
pub trait GpuElement:
    TensorElement + DeviceRepr + ValidAsZeroBits + Default + bytemuck::Pod
{
    /// The LoRA patch kernel for weights of this type.
    #[doc(hidden)]
    const LORA_PATCH: &'static str;
    /// The masked conv kernel reading a cached map of this type.
    #[doc(hidden)]
    const MASKED_CONV: &'static str;
    /// The same on f16 tensor cores.
    #[doc(hidden)]
    const MASKED_CONV_MMA: &'static str;
}
impl GpuElement for f32 {
    const LORA_PATCH: &'static str = "lora_patch_f32";
    const MASKED_CONV: &'static str = "masked_conv2d_cache_f32";
    const MASKED_CONV_MMA: &'static str = "masked_conv2d_mma_f16_cache_f32";
}
impl GpuElement for f16 {
    const LORA_PATCH: &'static str = "lora_patch_f16";
    const MASKED_CONV: &'static str = "masked_conv2d_cache_f16";
    const MASKED_CONV_MMA: &'static str = "masked_conv2d_mma_f16_cache_f16";
}
impl GpuElement for bf16 {
    const LORA_PATCH: &'static str = "lora_patch_bf16";
    const MASKED_CONV: &'static str = "masked_conv2d_cache_bf16";
    const MASKED_CONV_MMA: &'static str = "masked_conv2d_mma_f16_cache_bf16";
}

/// Dense, row-major data in device memory. Ops on it are the launchers in [`CudaDevice`];
/// nothing is copied back until [`CudaTensor::download`].
#[derive(Debug)]
pub struct CudaTensor<T: GpuElement = f32> {
    pub(crate) data: PooledSlice<T>,
    shape: Vec<usize>,
}

impl<T: GpuElement> CudaTensor<T> {
    /// Copies a CPU tensor of element type `T` to the device.
    pub fn upload(dev: &CudaDevice, t: &Tensor) -> Result<Self> {
        let src = t.as_slice::<T>()?;
        if src.is_empty() {
            return Self::zeros(dev, t.shape());
        }
        let data = dev.stream().clone_htod(src).map_err(driver_err("upload"))?;
        Ok(CudaTensor {
            data: data.into(),
            shape: t.shape().to_vec(),
        })
    }

    /// Queues an upload of `t` on the device's copy stream, through a page-locked buffer from
    /// the device's pool, so it runs beside the compute stream's work. Until the compute
    /// stream has waited for a fence recorded after it ([`CudaDevice::fence_copies`],
    /// [`CudaDevice::wait_for`]), no kernel may read the tensor. Dropping the returned
    /// [`Staging`] gives the buffer back to the pool, which rewrites or frees it only after
    /// the copy.
    pub fn upload_staged(dev: &CudaDevice, t: &Tensor) -> Result<(Self, Staging)> {
        let src = t.as_slice::<T>()?;
        if src.is_empty() {
            return Ok((Self::zeros(dev, t.shape())?, Staging::none()));
        }
        let err = driver_err("upload_staged");
        let copy = dev.copy_stream();
        let bytes: &[u8] = bytemuck::cast_slice(src);
        let pool = dev.staging_pool();
        let mut buffer = pool.take(copy.context(), bytes.len())?;
        let staged = buffer.bytes_mut(bytes.len())?;
        staged.copy_from_slice(bytes);
        // Pinned allocations are page-aligned, so the bytes are a valid `[T]`.
        let staged: &[T] = match bytemuck::try_cast_slice(staged) {
            Ok(staged) => staged,
            Err(e) => return invalid("upload_staged", format!("staging buffer: {e}")),
        };
        // SAFETY: every element is written by the copy queued next, on the same stream.
        let mut data = unsafe { copy.alloc::<T>(src.len()) }.map_err(&err)?;
        // From pinned memory the copy is asynchronous; the buffer stays untouched until the
        // event recorded next has completed (`PinnedBuffer`).
        copy.memcpy_htod(staged, &mut data).map_err(&err)?;
        buffer.copied(copy.record_event(None).map_err(&err)?);
        Ok((
            CudaTensor {
                // Not from the pool: written on the copy stream.
                data: data.into(),
                shape: t.shape().to_vec(),
            },
            Staging::pooled(buffer, pool.clone()),
        ))
    }

    /// A device-side copy (a LoRA backup, or an input an in-place op must not change).
    pub fn try_clone(&self, dev: &CudaDevice) -> Result<Self> {
        let data = dev
            .stream()
            .clone_dtod(&*self.data)
            .map_err(driver_err("copy"))?;
        Ok(CudaTensor {
            data: data.into(),
            shape: self.shape.clone(),
        })
    }

    /// A device tensor whose contents are whatever the allocation held: the output of a
    /// launch that writes every element, which then needs no zero fill (one driver call and
    /// one memset fewer per op). An empty one holds one element, as [`CudaTensor::zeros`].
    ///
    /// # Safety
    /// Nothing may read the tensor before a launch queued after this call has written every
    /// element (the values before are arbitrary bits, NaNs included).
    pub(crate) unsafe fn uninit(dev: &CudaDevice, shape: &[usize]) -> Result<Self> {
        let n = shape.iter().product::<usize>();
        // SAFETY: the caller writes every element before any read.
        let data = unsafe { dev.alloc_pooled::<T>("alloc", n) }?;
        Ok(CudaTensor {
            data,
            shape: shape.to_vec(),
        })
    }

    /// Zero-filled device tensor (an empty one holds one element: drivers refuse empty
    /// allocations).
    pub fn zeros(dev: &CudaDevice, shape: &[usize]) -> Result<Self> {
        let n = shape.iter().product::<usize>();
        // SAFETY: zero-filled below, before anything else is queued.
        let mut data = unsafe { dev.alloc_pooled::<T>("alloc", n) }?;
        dev.stream()
            .memset_zeros(&mut *data)
            .map_err(driver_err("alloc"))?;
        Ok(CudaTensor {
            data,
            shape: shape.to_vec(),
        })
    }

    /// Copies the data back into a CPU tensor (waits for the launches writing it).
    pub fn download(&self, dev: &CudaDevice) -> Result<Tensor> {
        let mut v = dev
            .stream()
            .clone_dtoh(&*self.data)
            .map_err(driver_err("download"))?;
        v.truncate(self.elem_count());
        Tensor::from_vec(v, &self.shape)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Consecutive blocks of `counts[i]` rows (dimension 0) as separate tensors (device
    /// copies): the segments of a ragged batch.
    pub fn split_rows(&self, dev: &CudaDevice, counts: &[usize]) -> Result<Vec<Self>> {
        let rows = self.shape.first().copied().unwrap_or(0);
        if counts.iter().sum::<usize>() != rows {
            return shape_err(
                "split_rows",
                format!("row counts {counts:?} do not add up to {:?}", self.shape),
            );
        }
        let per_row = self.elem_count() / rows.max(1);
        let mut at = 0;
        counts
            .iter()
            .map(|&n| {
                let mut shape = self.shape.clone();
                shape[0] = n;
                // SAFETY: the copy below writes every element (there are none without it).
                let mut part = unsafe { Self::uninit(dev, &shape) }?;
                if n > 0 && per_row > 0 {
                    let src = self.data.slice(at * per_row..(at + n) * per_row);
                    let mut dst = part.data.slice_mut(0..n * per_row);
                    dev.stream()
                        .memcpy_dtod(&src, &mut dst)
                        .map_err(driver_err("split_rows"))?;
                }
                at += n;
                Ok(part)
            })
            .collect()
    }

    /// The parts' rows stacked along dimension 0 (same trailing shape).
    pub fn concat_rows(dev: &CudaDevice, parts: &[&Self]) -> Result<Self> {
        let Some(first) = parts.first() else {
            return shape_err("concat_rows", "nothing to concatenate");
        };
        let tail = first.shape.get(1..).unwrap_or(&[]).to_vec();
        if let Some(bad) = parts
            .iter()
            .find(|p| p.shape.is_empty() || p.shape[1..] != tail[..])
        {
            return shape_err(
                "concat_rows",
                format!(
                    "parts {:?} and {:?} differ past dimension 0",
                    first.shape, bad.shape
                ),
            );
        }
        let rows: usize = parts.iter().map(|p| p.shape[0]).sum();
        let mut shape = vec![rows];
        shape.extend_from_slice(&tail);
        // SAFETY: the parts' copies below write every element.
        let mut out = unsafe { Self::uninit(dev, &shape) }?;
        let mut at = 0;
        for p in parts {
            let n = p.elem_count();
            if n > 0 {
                let src = p.data.slice(0..n);
                let mut dst = out.data.slice_mut(at..at + n);
                dev.stream()
                    .memcpy_dtod(&src, &mut dst)
                    .map_err(driver_err("concat_rows"))?;
            }
            at += n;
        }
        Ok(out)
    }

    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// Same data, new shape with the same number of elements.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        if shape.iter().product::<usize>() != self.elem_count() {
            return shape_err(
                "reshape",
                format!("cannot reshape {:?} to {shape:?}", self.shape),
            );
        }
        self.shape = shape.to_vec();
        Ok(self)
    }
}
