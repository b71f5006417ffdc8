//! Shared pieces of the layers' device side: uploading weights and finding them again.
//!
//! Each layer keeps its host weights and, once `upload`ed, a device copy; its `forward_gpu`
//! is the dense forward over [`CudaTensor`]s on that device, and `forward_gpu_masked` the
//! cached-mode forward over a ragged batch of active rows ([`GpuMasked`]). Recording a
//! template's step runs on the host.

use std::sync::Mutex;

use half::f16;
use retouch_kernels::cuda::{CopyFence, CudaBlendedSegment, CudaDevice, CudaTensor, Staging};
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
    /// The host cache's first entry index.
    first: usize,
    entries: Vec<GpuEntry>,
    /// An upload still running on the copy stream ([`GpuStepCache::upload_ahead`]): what the
    /// compute stream must wait for before reading, and the staging buffers it reads from.
    pending: Mutex<Option<PendingUpload>>,
}

struct PendingUpload {
    fence: CopyFence,
    staging: Vec<Staging>,
}

enum GpuEntry {
    ConvInput(Vec<CudaTensor<f16>>),
    KeyValue(Vec<(CudaTensor<f16>, CudaTensor<f16>)>),
    /// The per-position moments per branch; the statistics themselves stay on the host (a
    /// few values per group), uploaded per layer.
    Stats(Vec<CudaTensor<f16>>),
}

impl GpuStepCache {
    /// Uploads every map and key/value tensor of `cache` as f16, on the compute stream.
    pub fn upload(dev: &CudaDevice, cache: &StepCache) -> Result<GpuStepCache> {
        let entries = upload_entries(cache, |t| Ok(CudaTensor::upload(dev, t)?))?;
        Ok(GpuStepCache {
            first: cache.first,
            entries,
            pending: Mutex::new(None),
        })
    }

    /// [`GpuStepCache::upload`] queued on the copy stream from page-locked buffers, so it
    /// runs beside the compute stream's work (a step loaded ahead of need); returns once the
    /// copies are queued. [`GpuStepCache::make_ready`] must run before a forward reads it.
    pub fn upload_ahead(dev: &CudaDevice, cache: &StepCache) -> Result<GpuStepCache> {
        let mut staging = Vec::new();
        let entries = upload_entries(cache, |t| {
            let (tensor, buffer) = CudaTensor::upload_staged(dev, t)?;
            staging.push(buffer);
            Ok(tensor)
        })?;
        let fence = dev.fence_copies()?;
        Ok(GpuStepCache {
            first: cache.first,
            entries,
            pending: Mutex::new(Some(PendingUpload { fence, staging })),
        })
    }

    /// Orders the compute stream's later work after this step's upload, if it was loaded
    /// ahead; gives its staging buffers back to the device's pool (which reuses each only
    /// after its copy).
    pub fn make_ready(&self, dev: &CudaDevice) -> Result<()> {
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(p) = pending {
            dev.wait_for(&p.fence)?;
            drop(p.staging);
        }
        Ok(())
    }

    /// Device bytes held.
    pub fn size_in_bytes(&self) -> usize {
        let bytes = |t: &CudaTensor<f16>| t.elem_count() * 2;
        self.entries
            .iter()
            .map(|e| match e {
                GpuEntry::ConvInput(maps) => maps.iter().map(bytes).sum(),
                GpuEntry::KeyValue(kv) => kv.iter().map(|(k, v)| bytes(k) + bytes(v)).sum(),
                GpuEntry::Stats(moments) => moments.iter().map(bytes).sum::<usize>(),
            })
            .sum()
    }
}

/// Every map and key/value tensor of `cache` as f16, each through `upload`.
fn upload_entries(
    cache: &StepCache,
    mut upload: impl FnMut(&Tensor) -> Result<CudaTensor<f16>>,
) -> Result<Vec<GpuEntry>> {
    let mut half = |t: &Tensor| upload(&t.to_dtype(DType::F16)?);
    cache
        .entries
        .iter()
        .map(|e| {
            Ok(match e {
                CacheEntry::ConvInput(maps) => {
                    GpuEntry::ConvInput(maps.iter().map(&mut half).collect::<Result<_>>()?)
                }
                CacheEntry::KeyValue(kv) => GpuEntry::KeyValue(
                    kv.iter()
                        .map(|(k, v)| Ok((half(k)?, half(v)?)))
                        .collect::<Result<_>>()?,
                ),
                CacheEntry::Stats { moments, .. } => {
                    GpuEntry::Stats(moments.iter().map(&mut half).collect::<Result<_>>()?)
                }
            })
        })
        .collect()
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
            let Some(cache) = s.cache.whole() else {
                return Err(Error::Invalid(format!(
                    "segment {i}: a GPU forward reads whole steps, not streaming ones"
                )));
            };
            if d.first != cache.first || d.entries.len() != cache.entries.len() {
                return Err(Error::Invalid(format!(
                    "segment {i}: the device cache holds entries {}.., {} of them, the host \
                     cache {}.., {}",
                    d.first,
                    d.entries.len(),
                    cache.first,
                    cache.entries.len()
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

    /// The next entry's group-norm statistics for the rows `x` as `[rows, groups, 2]` (mean,
    /// 1/std) on the device: each row gets the statistics of its segment's blended map
    /// (fresh rows in the active set, the template around), so one apply kernel serves the
    /// ragged rows.
    pub fn row_stats(
        &mut self,
        dev: &CudaDevice,
        x: &CudaTensor,
        groups: usize,
        eps: f32,
    ) -> Result<CudaTensor> {
        let at = self.host.cursor();
        let tokens = self.host.tokens()?;
        let records = self.host.norm_records(groups)?;
        let moments = self.device_entries(at, |e, branch| match e {
            GpuEntry::Stats(m) => m.get(branch),
            _ => None,
        })?;
        let segments: Vec<CudaBlendedSegment<'_>> = tokens
            .iter()
            .zip(&records)
            .zip(moments)
            .map(|((t, (stats, _)), moments)| CudaBlendedSegment {
                active: t.positions(),
                template: stats,
                moments,
            })
            .collect();
        let per_segment = dev.group_norm_blended_stats(x, &segments, groups, eps)?;
        let segments = segments.len();
        let per_segment = per_segment.reshape(&[segments, groups * 2])?;
        let gathered = dev.gather_rows(&per_segment, &self.host.row_segments()?)?;
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
                at.checked_sub(d.first)
                    .and_then(|i| d.entries.get(i))
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
