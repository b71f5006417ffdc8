//! Shared pieces of the layers' device side: uploading weights and finding them again.
//!
//! Each layer keeps its host weights and, once `upload`ed, a device copy; its `forward_gpu`
//! is the dense forward over [`CudaTensor`]s on that device, and `forward_gpu_masked` the
//! cached-mode forward over a ragged batch of active rows ([`GpuMasked`]). Recording a
//! template's step runs on the host.

use std::sync::{Mutex, OnceLock};

use half::f16;
use retouch_kernels::cuda::{CopyFence, CudaBlendedSegment, CudaDevice, CudaTensor, Staging};
use retouch_kernels::{DType, Tensor};

use super::exec::{CacheEntry, Masked, StepCache, StepSource, StreamingStep};

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
    cache
        .entries
        .iter()
        .map(|e| upload_entry(e, &mut upload))
        .collect()
}

/// One entry's maps and key/value tensors as f16, each through `upload`.
fn upload_entry(
    entry: &CacheEntry,
    mut upload: impl FnMut(&Tensor) -> Result<CudaTensor<f16>>,
) -> Result<GpuEntry> {
    let mut half = |t: &Tensor| upload(&t.to_dtype(DType::F16)?);
    Ok(match entry {
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
}

/// A step's cache entries streaming in from a loader thread ([`StreamingStep`]), taken to
/// the device one by one: the first time the forward asks for an entry, the host waits for
/// its read, queues its upload on the copy stream and makes the compute stream wait for
/// that. The host never waits for the GPU, so the kernels queued before (a dense prefix,
/// earlier masked layers) run while later entries are still being read.
pub struct GpuStreamingStep<'a> {
    host: &'a StreamingStep,
    entries: Vec<OnceLock<GpuEntry>>,
    /// The pinned buffers of the queued uploads, kept until the step is dropped (the pool
    /// reuses each only after its copy has run).
    staging: Mutex<Vec<Staging>>,
}

impl<'a> GpuStreamingStep<'a> {
    pub fn new(host: &'a StreamingStep) -> GpuStreamingStep<'a> {
        GpuStreamingStep {
            host,
            entries: (host.first()..host.end())
                .map(|_| OnceLock::new())
                .collect(),
            staging: Mutex::new(Vec::new()),
        }
    }

    /// Entry `index` on the device, uploaded when first asked for; None outside the step.
    fn entry(&self, dev: &CudaDevice, index: usize) -> Result<Option<&GpuEntry>> {
        let Some(slot) = index
            .checked_sub(self.host.first())
            .and_then(|i| self.entries.get(i))
        else {
            return Ok(None);
        };
        if let Some(entry) = slot.get() {
            return Ok(Some(entry));
        }
        let Some(host) = self.host.wait(index) else {
            return Ok(None);
        };
        let mut staging = Vec::new();
        let entry = upload_entry(host?, |t| {
            let (tensor, buffer) = CudaTensor::upload_staged(dev, t)?;
            staging.push(buffer);
            Ok(tensor)
        })?;
        dev.wait_for(&dev.fence_copies()?)?;
        self.staging
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(staging);
        // One forward walks the entries in order on one thread: the slot is still empty.
        Ok(Some(slot.get_or_init(|| entry)))
    }
}

/// Where a segment's cache entries come from on the device.
#[derive(Clone, Copy)]
pub enum GpuStepSource<'a> {
    /// Uploaded already (whole, or from its first entry on).
    Whole(&'a GpuStepCache),
    /// Uploaded entry by entry as they arrive.
    Streaming(&'a GpuStreamingStep<'a>),
}

impl GpuStepSource<'_> {
    fn first(self) -> usize {
        match self {
            GpuStepSource::Whole(c) => c.first,
            GpuStepSource::Streaming(s) => s.host.first(),
        }
    }

    fn end(self) -> usize {
        match self {
            GpuStepSource::Whole(c) => c.first + c.entries.len(),
            GpuStepSource::Streaming(s) => s.host.end(),
        }
    }
}

/// The state of a masked forward on the device: the host [`Masked`] (token sets, the cursor
/// over the recorded entries, the statistics) and where each segment's entries are on the
/// device.
pub struct GpuMasked<'a> {
    dev: &'a CudaDevice,
    host: Masked<'a>,
    device: Vec<GpuStepSource<'a>>,
}

impl<'a> GpuMasked<'a> {
    /// `device[i]` holds segment `i`'s host cache on `dev`: its upload when the host cache
    /// is whole, its stream when that streams in.
    pub fn new(
        dev: &'a CudaDevice,
        host: Masked<'a>,
        device: Vec<GpuStepSource<'a>>,
    ) -> Result<GpuMasked<'a>> {
        if device.len() != host.segments().len() {
            return Err(Error::Invalid(format!(
                "{} device caches for {} segments",
                device.len(),
                host.segments().len()
            )));
        }
        for (i, (d, s)) in device.iter().zip(host.segments()).enumerate() {
            let kinds_match = matches!(
                (d, s.cache),
                (GpuStepSource::Whole(_), StepSource::Whole(_))
                    | (GpuStepSource::Streaming(_), StepSource::Streaming(_))
            );
            if !kinds_match || d.first() != s.cache.first() || d.end() != s.cache.end() {
                return Err(Error::Invalid(format!(
                    "segment {i}: the device cache holds entries {}..{}, the host cache {}..{} \
                     (or one streams and the other does not)",
                    d.first(),
                    d.end(),
                    s.cache.first(),
                    s.cache.end()
                )));
            }
        }
        Ok(GpuMasked { dev, host, device })
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

    /// The next entry's group-norm statistics for the rows `x`: each segment's, `[segments,
    /// groups, 2]` (mean, 1/std) on the device, of its blended map (fresh rows in the active
    /// set, the template around), with each row's segment, so that one apply kernel serves
    /// the ragged rows.
    pub fn segment_stats(
        &mut self,
        dev: &CudaDevice,
        x: &CudaTensor,
        groups: usize,
        eps: f32,
    ) -> Result<(CudaTensor, Vec<u32>)> {
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
        Ok((per_segment, self.host.row_segments()?))
    }

    fn device_entries<T>(
        &self,
        at: usize,
        pick: impl Fn(&'a GpuEntry, usize) -> Option<&'a T>,
    ) -> Result<Vec<&'a T>> {
        self.device
            .iter()
            .zip(self.host.segments())
            .map(|(&d, s)| {
                let entry = match d {
                    GpuStepSource::Whole(c) => {
                        at.checked_sub(c.first).and_then(|i| c.entries.get(i))
                    }
                    GpuStepSource::Streaming(stream) => stream.entry(self.dev, at)?,
                };
                entry.and_then(|e| pick(e, s.branch)).ok_or_else(|| {
                    Error::Invalid(format!(
                        "device cache entry {at} does not match the host cache"
                    ))
                })
            })
            .collect()
    }
}
