//! Shared pieces of the layers' device side: uploading weights and finding them again.
//!
//! Each layer keeps its host weights and, once `upload`ed, a device copy; its `forward_gpu`
//! is the dense forward over [`CudaTensor`]s on that device, and `forward_gpu_masked` the
//! cached-mode forward over a ragged batch of active rows ([`GpuMasked`]). Recording a
//! template's step runs on the host.

use half::f16;
use retouch_kernels::cuda::{CudaDevice, CudaTensor};
use retouch_kernels::{DType, Tensor};

use super::exec::{CacheEntry, Masked, StepCache};

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

/// A template's recorded step in device memory, entry for entry beside its host
/// [`StepCache`] (which keeps the kinds, the statistics and the order: the masked GPU forward
/// walks the host cache and reads the maps and keys from here).
pub struct GpuStepCache {
    entries: Vec<GpuEntry>,
}

enum GpuEntry {
    ConvInput(Vec<CudaTensor<f16>>),
    KeyValue(Vec<(CudaTensor<f16>, CudaTensor<f16>)>),
    /// Statistics stay on the host (a few values per group), uploaded per layer.
    Stats,
}

impl GpuStepCache {
    /// Uploads every map and key/value tensor of `cache` as f16.
    pub fn upload(dev: &CudaDevice, cache: &StepCache) -> Result<GpuStepCache> {
        let half = |t: &Tensor| -> Result<CudaTensor<f16>> {
            Ok(CudaTensor::upload(dev, &t.to_dtype(DType::F16)?)?)
        };
        let entries = cache
            .entries
            .iter()
            .map(|e| {
                Ok(match e {
                    CacheEntry::ConvInput(maps) => {
                        GpuEntry::ConvInput(maps.iter().map(half).collect::<Result<_>>()?)
                    }
                    CacheEntry::KeyValue(kv) => GpuEntry::KeyValue(
                        kv.iter()
                            .map(|(k, v)| Ok((half(k)?, half(v)?)))
                            .collect::<Result<_>>()?,
                    ),
                    CacheEntry::Stats(_) => GpuEntry::Stats,
                })
            })
            .collect::<Result<_>>()?;
        Ok(GpuStepCache { entries })
    }

    /// Device bytes held.
    pub fn size_in_bytes(&self) -> usize {
        let bytes = |t: &CudaTensor<f16>| t.elem_count() * 2;
        self.entries
            .iter()
            .map(|e| match e {
                GpuEntry::ConvInput(maps) => maps.iter().map(bytes).sum(),
                GpuEntry::KeyValue(kv) => kv.iter().map(|(k, v)| bytes(k) + bytes(v)).sum(),
                GpuEntry::Stats => 0,
            })
            .sum()
    }
}

/// The state of a masked forward on the device: the host [`Masked`] (token sets, the cursor
/// over the recorded entries, the statistics) and each segment's device copy of its cache.
pub struct GpuMasked<'a> {
    host: Masked<'a>,
    device: Vec<&'a GpuStepCache>,
}

impl<'a> GpuMasked<'a> {
    /// `device[i]` is the upload of segment `i`'s host cache.
    pub fn new(host: Masked<'a>, device: Vec<&'a GpuStepCache>) -> Result<GpuMasked<'a>> {
        if device.len() != host.segments().len() {
            return Err(Error::Invalid(format!(
                "{} device caches for {} segments",
                device.len(),
                host.segments().len()
            )));
        }
        for (i, (d, s)) in device.iter().zip(host.segments()).enumerate() {
            if d.entries.len() != s.cache.entries.len() {
                return Err(Error::Invalid(format!(
                    "segment {i}: the device cache has {} entries, the host cache {}",
                    d.entries.len(),
                    s.cache.entries.len()
                )));
            }
        }
        Ok(GpuMasked { host, device })
    }

    pub fn host(&self) -> &Masked<'a> {
        &self.host
    }

    pub fn host_mut(&mut self) -> &mut Masked<'a> {
        &mut self.host
    }

    /// The next entry's cached conv input maps, one per segment (its branch).
    pub fn conv_inputs(&mut self) -> Result<Vec<&'a CudaTensor<f16>>> {
        let at = self.host.cursor();
        self.host.conv_inputs()?; // checks the kind and the branches, advances
        self.device_entries(at, |e, branch| match e {
            GpuEntry::ConvInput(maps) => maps.get(branch),
            _ => None,
        })
    }

    /// The next entry's cached self-attention keys and values, one pair per segment.
    pub fn key_values(&mut self) -> Result<Vec<&'a (CudaTensor<f16>, CudaTensor<f16>)>> {
        let at = self.host.cursor();
        self.host.key_values()?;
        self.device_entries(at, |e, branch| match e {
            GpuEntry::KeyValue(kv) => kv.get(branch),
            _ => None,
        })
    }

    /// The next entry's group-norm statistics as `[rows, groups, 2]` (mean, 1/std) on the
    /// device: each row gets its segment's, so one apply kernel serves the ragged rows.
    pub fn row_stats(&mut self, dev: &CudaDevice, groups: usize) -> Result<CudaTensor> {
        let stats = self.host.stats(groups)?;
        let flat: Vec<f32> = stats.iter().flat_map(|s| [s.mean, s.rstd]).collect();
        let segments = self.device.len();
        let per_segment = Tensor::from_vec(flat, &[segments, groups * 2])?;
        let gathered = dev.gather_rows(
            &CudaTensor::upload(dev, &per_segment)?,
            &self.host.row_segments()?,
        )?;
        let rows = gathered.shape()[0];
        Ok(gathered.reshape(&[rows, groups, 2])?)
    }

    fn device_entries<T>(
        &self,
        at: usize,
        pick: impl Fn(&'a GpuEntry, usize) -> Option<&'a T>,
    ) -> Result<Vec<&'a T>> {
        self.device
            .iter()
            .zip(self.host.segments())
            .map(|(d, s)| {
                d.entries
                    .get(at)
                    .and_then(|e| pick(e, s.branch))
                    .ok_or_else(|| {
                        Error::Invalid(format!(
                            "device cache entry {at} does not match the host cache"
                        ))
                    })
            })
            .collect()
    }
}
