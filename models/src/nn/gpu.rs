//! Shared pieces of the layers' device side: uploading weights and finding them again.
//!
//! Each layer keeps its host weights and, once `upload`ed, a device copy; its `forward_gpu`
//! is the dense forward over [`CudaTensor`]s on that device. The masked and recording
//! modes run on the host only (see `docs/ARCHITECTURE.md`).

use retouch_kernels::cuda::{CudaDevice, CudaTensor};
use retouch_kernels::{DType, Tensor};

use crate::{Error, Result};

/// A host tensor on `dev` as f32 (weights stored in half precision are widened first).
pub(crate) fn upload_f32(dev: &CudaDevice, t: &Tensor) -> Result<CudaTensor> {
    if t.dtype() == DType::F32 {
        Ok(CudaTensor::upload(dev, t)?)
    } else {
        Ok(CudaTensor::upload(dev, &t.to_dtype(DType::F32)?)?)
    }
}

/// A layer's device weights, or the error that says they were never uploaded.
pub(crate) fn on_device<'a, T>(gpu: Option<&'a T>, layer: &str) -> Result<&'a T> {
    gpu.ok_or_else(|| {
        Error::Invalid(format!(
            "{layer}: weights are not on a CUDA device (upload the model first)"
        ))
    })
}
