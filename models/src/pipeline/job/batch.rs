//! One denoising step of several jobs with fused UNet calls. Jobs are grouped by what can
//! share a call: cached-mode edits on one latent grid and cache dtype run as one ragged
//! masked forward (each CFG branch a segment); dense jobs (generations, dense edits) of one
//! latent shape run as one batched dense forward (one timestep and context per sample).
//! Template registrations run alone: recording stores every sample's activations, so a
//! fused call would record (and convert to the cache dtype) the other jobs' too, or need a
//! per-sample switch in every layer; they are rare next to edits.

use std::sync::Arc;
use std::time::Instant;

use retouch_kernels::cuda::CudaDevice;
use retouch_kernels::{DType, Tensor};

use super::{DenoiseJob, Kind, StepInput, UnetOutput};
use crate::nn::exec::{StepCache, StepSource, StreamingStep};
use crate::nn::gpu::{GpuStepCache, GpuStepSource, GpuStreamingStep, upload_f32};
use crate::pipeline::Pipeline;
use crate::pipeline::device_steps::{DEVICE_STEP_LOOKUPS, DEVICE_STEP_PREFETCHES};
use crate::unet::{CachedSegment, GpuCachedSegment, GpuRecomputeSegment, RecomputeSegment};
use crate::{Error, Result};

/// Which jobs may share one UNet call.
#[derive(PartialEq)]
enum FuseKey {
    /// Cached edits: one latent grid, one cache dtype (the masked kernels read every
    /// segment's cache as one type).
    Cached {
        grid: (usize, usize),
        dtype: DType,
    },
    Dense {
        shape: Vec<usize>,
    },
    /// A template registration (recording), by job index.
    Alone(usize),
}

impl DenoiseJob<'_> {
    /// Runs one denoising step of every job, fusing their UNet calls where they can share
    /// one (see the module docs). Returns one result per job, in order: a job that cannot
    /// step fails alone, and if a fused call fails its jobs are retried one by one so only
    /// the culprit fails. A failed job keeps its state from before the step. The results
    /// equal stepping each job alone up to the summation order of products over more rows
    /// (the GEMMs' blocking may differ with the row count), about 1e-6 relative per layer.
    pub fn step_many(pipe: &Pipeline, jobs: &mut [&mut DenoiseJob<'_>]) -> Vec<Result<()>> {
        DenoiseJob::step_many_with_caches(pipe, jobs, &[])
    }

    /// [`DenoiseJob::step_many`] with each cached-mode edit's activations for this step
    /// given by the caller (`caches[i]` for `jobs[i]`, from a runtime's cache tiers); a job
    /// without one (None, or past the slice's end) reads its template's own.
    pub fn step_many_with_caches(
        pipe: &Pipeline,
        jobs: &mut [&mut DenoiseJob<'_>],
        caches: &[Option<&StepCache>],
    ) -> Vec<Result<()>> {
        let sources: Vec<Option<StepCacheSource<'_>>> = caches
            .iter()
            .map(|c| c.map(StepCacheSource::Ready))
            .collect();
        DenoiseJob::step_many_with_sources(pipe, jobs, &sources, 0)
    }

    /// [`DenoiseJob::step_many_with_caches`] where a cached edit's activations may still be
    /// streaming in ([`StepCacheSource::Streaming`]) and the cached-mode call recomputes its
    /// first `recompute` UNet units densely ([`crate::unet::UNet::forward_ragged_recomputing`]):
    /// those units run while the entries after them arrive, and each masked layer waits only
    /// for its own entries. Streaming steps need the host forward (a GPU pipeline's has no
    /// dense prefix and reads whole steps).
    pub fn step_many_with_sources(
        pipe: &Pipeline,
        jobs: &mut [&mut DenoiseJob<'_>],
        caches: &[Option<StepCacheSource<'_>>],
        recompute: usize,
    ) -> Vec<Result<()>> {
        let started = Instant::now();
        let caches: Vec<Option<StepCacheSource<'_>>> = (0..jobs.len())
            .map(|i| caches.get(i).copied().flatten())
            .collect();
        let mut inputs = Vec::with_capacity(jobs.len());
        let mut results: Vec<Result<()>> = Vec::with_capacity(jobs.len());
        for job in jobs.iter() {
            match job.prepare() {
                Ok(input) => {
                    inputs.push(Some(input));
                    results.push(Ok(()));
                }
                Err(e) => {
                    inputs.push(None);
                    results.push(Err(e));
                }
            }
        }
        let mut outputs: Vec<Option<Result<UnetOutput>>> = jobs.iter().map(|_| None).collect();
        for group in groups(jobs, &inputs, &caches) {
            match run_group(pipe, jobs, &inputs, &caches, &group, recompute) {
                Ok(outs) => {
                    for (&i, out) in group.iter().zip(outs) {
                        outputs[i] = Some(Ok(out));
                    }
                }
                Err(e) if group.len() == 1 => outputs[group[0]] = Some(Err(e)),
                // Which job broke the fused call is unknown: run each alone.
                Err(_) => {
                    for &i in &group {
                        let alone = run_group(pipe, jobs, &inputs, &caches, &[i], recompute);
                        outputs[i] = Some(alone.and_then(|mut o| {
                            o.pop()
                                .ok_or_else(|| Error::Invalid("no UNet output".into()))
                        }));
                    }
                }
            }
        }
        // Every job waited for the whole fused step.
        let elapsed = started.elapsed();
        for ((job, out), result) in jobs.iter_mut().zip(outputs).zip(&mut results) {
            if let Some(out) = out {
                *result = out.and_then(|out| job.commit(out, elapsed));
            }
        }
        results
    }

    fn fuse_key(
        &self,
        index: usize,
        input: &StepInput,
        cache: Option<StepCacheSource<'_>>,
    ) -> FuseKey {
        let dtype = match cache {
            Some(StepCacheSource::Ready(c)) => Some(c.dtype()),
            Some(StepCacheSource::Shared(c)) => Some(c.dtype()),
            Some(StepCacheSource::Streaming { dtype, .. }) => Some(Some(dtype)),
            None => None,
        };
        match &self.kind {
            Kind::Template {
                cache_dtype: Some(_),
                ..
            } => FuseKey::Alone(index),
            Kind::Edit(edit) => match (
                &edit.cached,
                dtype.or_else(|| edit.template.cache.first().map(StepCache::dtype)),
            ) {
                (Some((levels, _)), Some(dtype)) => FuseKey::Cached {
                    grid: (levels[0].height(), levels[0].width()),
                    dtype: dtype.unwrap_or(DType::F32),
                },
                (Some(_), None) => FuseKey::Alone(index),
                (None, _) => FuseKey::Dense {
                    shape: input.input.shape().to_vec(),
                },
            },
            _ => FuseKey::Dense {
                shape: input.input.shape().to_vec(),
            },
        }
    }
}

/// The prepared jobs' indices grouped by [`FuseKey`], groups in order of their first job.
fn groups(
    jobs: &[&mut DenoiseJob<'_>],
    inputs: &[Option<StepInput>],
    caches: &[Option<StepCacheSource<'_>>],
) -> Vec<Vec<usize>> {
    let mut keys: Vec<FuseKey> = Vec::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, (job, input)) in jobs.iter().zip(inputs).enumerate() {
        let Some(input) = input else { continue };
        let key = job.fuse_key(i, input, caches[i]);
        match keys.iter().position(|k| *k == key) {
            Some(g) => groups[g].push(i),
            None => {
                keys.push(key);
                groups.push(vec![i]);
            }
        }
    }
    groups
}

/// One UNet call for the jobs `group` (all of one [`FuseKey`]); their outputs in order.
fn run_group(
    pipe: &Pipeline,
    jobs: &[&mut DenoiseJob<'_>],
    inputs: &[Option<StepInput>],
    caches: &[Option<StepCacheSource<'_>>],
    group: &[usize],
    recompute: usize,
) -> Result<Vec<UnetOutput>> {
    let members: Vec<(&DenoiseJob<'_>, &StepInput)> = group
        .iter()
        .map(|&i| {
            let input = inputs[i]
                .as_ref()
                .ok_or_else(|| Error::Invalid("job was not prepared".into()))?;
            Ok((&*jobs[i], input))
        })
        .collect::<Result<_>>()?;
    match members.first() {
        None => Ok(Vec::new()),
        Some((job, _)) if job.cached().is_some() => {
            let caches: Vec<Option<StepCacheSource<'_>>> =
                group.iter().map(|&i| caches[i]).collect();
            run_cached(pipe, &members, &caches, recompute)
        }
        Some((job, input))
            if matches!(
                job.kind,
                Kind::Template {
                    cache_dtype: Some(_),
                    ..
                }
            ) =>
        {
            run_recording(pipe, job, input)
        }
        Some(_) => run_dense(pipe, &members),
    }
}

/// Where a cached edit's activations for a step come from.
#[derive(Clone, Copy)]
pub enum StepCacheSource<'a> {
    /// Held already.
    Ready(&'a StepCache),
    /// Held already, as a shared copy (a runtime's memory tier): a GPU pipeline keeps its
    /// device copy across calls while this one lives.
    Shared(&'a Arc<StepCache>),
    /// Streaming in from another thread, as `dtype` (the cache dtype decides which edits
    /// share a call before the entries arrive).
    Streaming {
        step: &'a StreamingStep,
        dtype: DType,
    },
}

/// Cached edits: one ragged masked forward, each job's branches as segments (recomputing
/// the first `recompute` units densely, or waiting for a loading cache, when asked).
fn run_cached(
    pipe: &Pipeline,
    members: &[(&DenoiseJob<'_>, &StepInput)],
    caches: &[Option<StepCacheSource<'_>>],
    recompute: usize,
) -> Result<Vec<UnetOutput>> {
    let streaming = caches
        .iter()
        .any(|c| matches!(c, Some(StepCacheSource::Streaming { .. })));
    let dense_prefix = recompute > 0 || streaming;
    let mut segments = Vec::new();
    let mut rows = Vec::new();
    let mut latents = Vec::new();
    let mut sizes = Vec::with_capacity(members.len());
    // Per segment, the shared host copy its step came as (a GPU pipeline keeps its upload).
    let mut shared = Vec::new();
    for ((job, input), given) in members.iter().zip(caches) {
        let (Kind::Edit(edit), Some((levels, _))) = (&job.kind, job.cached()) else {
            return Err(Error::Invalid("not a cached-mode edit".into()));
        };
        let cache = match given {
            Some(StepCacheSource::Ready(cache)) => StepSource::Whole(cache),
            Some(StepCacheSource::Shared(cache)) => StepSource::Whole(cache),
            Some(StepCacheSource::Streaming { step, .. }) => StepSource::Streaming(step),
            None => StepSource::Whole(edit.step_cache(job.step)?),
        };
        if let StepSource::Whole(cache) = cache
            && cache.branches() != Some(job.guidance.branches())
        {
            return Err(Error::Invalid(format!(
                "this cached-mode edit runs {} guidance branch(es), the template's activation \
                 cache holds {}: use the template's guidance (or dense mode)",
                job.guidance.branches(),
                cache.branches().unwrap_or(0)
            )));
        }
        let full = input
            .full
            .as_ref()
            .ok_or_else(|| Error::Invalid("a cached edit's input lacks its latents".into()))?;
        for (branch, context) in job.guidance.branch_contexts().iter().enumerate() {
            segments.push(RecomputeSegment {
                levels,
                cache,
                branch,
                timestep: input.t,
                context,
            });
            rows.push(&input.input);
            latents.push(full);
            shared.push(match given {
                Some(StepCacheSource::Shared(cache)) => Some(*cache),
                _ => None,
            });
        }
        sizes.push(input.input.dim(0)? * job.guidance.branches());
    }
    let out = if dense_prefix {
        let latents = Tensor::concat_batch(&latents)?;
        match pipe.gpu() {
            Some(dev) => {
                forward_recomputing_on(pipe, dev, &latents, &segments, &shared, recompute)?
            }
            None => pipe
                .unet
                .forward_ragged_recomputing(&latents, &segments, recompute)?,
        }
    } else {
        let ready: Vec<CachedSegment<'_>> = segments
            .iter()
            .map(|s| {
                Ok(CachedSegment {
                    levels: s.levels,
                    cache: s.cache.whole().ok_or_else(|| {
                        Error::Invalid("a streaming step cache needs a dense prefix".into())
                    })?,
                    branch: s.branch,
                    timestep: s.timestep,
                    context: s.context,
                })
            })
            .collect::<Result<_>>()?;
        let rows = Tensor::concat_batch(&rows)?;
        match pipe.gpu() {
            Some(dev) => forward_ragged_on(pipe, dev, &rows, &ready, &shared)?,
            None => pipe.unet.forward_ragged(&rows, &ready)?,
        }
    };
    Ok(out
        .split_batch(&sizes)?
        .into_iter()
        .map(|prediction| UnetOutput {
            prediction,
            recorded: None,
        })
        .collect())
}

/// The ragged cached-mode forward on the pipeline's device: each distinct template step
/// from the device tier when it came as a shared copy (`shared[i]` for segment `i`), else
/// uploaded (as f16) for this call; the rows up, the kernels queued, then the steps asked
/// for ahead uploaded on the copy stream while they run, and the prediction back.
fn forward_ragged_on(
    pipe: &Pipeline,
    dev: &CudaDevice,
    rows: &Tensor,
    segments: &[CachedSegment<'_>],
    shared: &[Option<&Arc<StepCache>>],
) -> Result<Tensor> {
    let hosts: Vec<&StepCache> = segments.iter().map(|s| s.cache).collect();
    let (copies, slots) = device_copies(pipe, dev, &hosts, shared)?;
    let device_segments: Vec<GpuCachedSegment<'_>> = segments
        .iter()
        .zip(&slots)
        .map(|(s, &slot)| GpuCachedSegment {
            host: *s,
            device: &copies[slot],
        })
        .collect();
    let rows = upload_f32(dev, rows)?;
    let out = pipe.unet.forward_gpu_ragged(dev, &rows, &device_segments)?;
    prefetch_ahead(pipe, dev);
    Ok(out.download(dev)?)
}

/// [`forward_ragged_on`] for a forward that recomputes its first `recompute` units densely
/// over `latents` (segment i's map in sample i): whole steps as there, steps streaming in
/// from disk uploaded entry by entry as their reads deliver them, while the dense units run.
fn forward_recomputing_on(
    pipe: &Pipeline,
    dev: &CudaDevice,
    latents: &Tensor,
    segments: &[RecomputeSegment<'_>],
    shared: &[Option<&Arc<StepCache>>],
    recompute: usize,
) -> Result<Tensor> {
    // Per segment, where its entries come from: its whole step among `wholes`, or its
    // stream among `streams` (one device stream per host stream: one edit's segments share
    // theirs).
    enum Slot {
        Whole(usize),
        Streaming(usize),
    }
    let (mut wholes, mut whole_shared) = (Vec::new(), Vec::new());
    let mut streams: Vec<(*const StreamingStep, GpuStreamingStep<'_>)> = Vec::new();
    let mut slots = Vec::with_capacity(segments.len());
    for (s, &shared) in segments.iter().zip(shared) {
        slots.push(match s.cache {
            StepSource::Whole(cache) => {
                wholes.push(cache);
                whole_shared.push(shared);
                Slot::Whole(wholes.len() - 1)
            }
            StepSource::Streaming(step) => {
                let key: *const StreamingStep = step;
                match streams.iter().position(|(k, _)| *k == key) {
                    Some(at) => Slot::Streaming(at),
                    None => {
                        streams.push((key, GpuStreamingStep::new(step)));
                        Slot::Streaming(streams.len() - 1)
                    }
                }
            }
        });
    }
    let (copies, copy_slots) = device_copies(pipe, dev, &wholes, &whole_shared)?;
    let device_segments: Vec<GpuRecomputeSegment<'_>> = segments
        .iter()
        .zip(&slots)
        .map(|(s, slot)| GpuRecomputeSegment {
            host: *s,
            device: match *slot {
                Slot::Whole(i) => GpuStepSource::Whole(&copies[copy_slots[i]]),
                Slot::Streaming(i) => GpuStepSource::Streaming(&streams[i].1),
            },
        })
        .collect();
    let latents = upload_f32(dev, latents)?;
    let out = pipe
        .unet
        .forward_gpu_ragged_recomputing(dev, &latents, &device_segments, recompute);
    let out = match out {
        Ok(out) => out,
        Err(e) => {
            // A read that failed part-way ends the walk with kernels still queued on the
            // entries uploaded so far, which `streams` frees on the copy stream as it drops:
            // let the kernels finish first.
            let _ = dev.synchronize();
            return Err(e);
        }
    };
    prefetch_ahead(pipe, dev);
    Ok(out.download(dev)?)
}

/// The device copies of `hosts` (one per distinct step) and each one's slot among them:
/// from the device tier when the step came as a shared copy (`shared[i]`), else uploaded
/// for this call. Every copy is ready for the compute stream to read.
fn device_copies(
    pipe: &Pipeline,
    dev: &CudaDevice,
    hosts: &[&StepCache],
    shared: &[Option<&Arc<StepCache>>],
) -> Result<(Vec<Arc<GpuStepCache>>, Vec<usize>)> {
    let mut keys: Vec<*const StepCache> = Vec::new();
    let mut copies: Vec<Arc<GpuStepCache>> = Vec::new();
    let mut slots = Vec::with_capacity(hosts.len());
    for (i, &host) in hosts.iter().enumerate() {
        let key: *const StepCache = host;
        let slot = match keys.iter().position(|k| *k == key) {
            Some(slot) => slot,
            None => {
                let upload = |host: &StepCache| GpuStepCache::upload(dev, host);
                let copy = match (shared.get(i).copied().flatten(), pipe.device_steps()) {
                    (Some(host), Some(tier)) => {
                        let (copy, lookup) = tier.get_or_upload(host, upload)?;
                        metrics::counter!(DEVICE_STEP_LOOKUPS, "outcome" => lookup.name())
                            .increment(1);
                        copy
                    }
                    _ => Arc::new(upload(host)?),
                };
                copy.make_ready(dev)?;
                keys.push(key);
                copies.push(copy);
                copies.len() - 1
            }
        };
        slots.push(slot);
    }
    Ok((copies, slots))
}

/// With the step's kernels queued: uploads the steps the worker asked for ahead on the copy
/// stream, beside them. A failed upload only leaves its step to be uploaded when needed.
fn prefetch_ahead(pipe: &Pipeline, dev: &CudaDevice) {
    if let Some(tier) = pipe.device_steps() {
        for host in pipe.take_device_prefetch() {
            let bound = host.size_in_bytes() as u64;
            let upload = |h: &StepCache| GpuStepCache::upload_ahead(dev, h);
            if let Ok(Some(lookup)) = tier.prefetch(&host, bound, upload) {
                metrics::counter!(DEVICE_STEP_PREFETCHES, "outcome" => lookup.name()).increment(1);
            }
        }
    }
}

/// Dense jobs of one latent shape: one batched forward, each branch a sample with its own
/// timestep and context.
fn run_dense(
    pipe: &Pipeline,
    members: &[(&DenoiseJob<'_>, &StepInput)],
) -> Result<Vec<UnetOutput>> {
    let mut samples = Vec::new();
    let mut timesteps = Vec::new();
    let mut contexts = Vec::new();
    let mut sizes = Vec::with_capacity(members.len());
    for (job, input) in members {
        let branches = job.guidance.branches();
        samples.extend(std::iter::repeat_n(&input.input, branches));
        timesteps.extend(std::iter::repeat_n(input.t, branches));
        contexts.push(job.guidance.context());
        sizes.push(branches);
    }
    let (sample, context) = (
        Tensor::concat_batch(&samples)?,
        Tensor::concat_batch(&contexts)?,
    );
    let out = match pipe.gpu() {
        Some(dev) => pipe.unet.forward_on(dev, &sample, &timesteps, &context)?,
        None => pipe.unet.forward(&sample, &timesteps, &context)?,
    };
    Ok(out
        .split_batch(&sizes)?
        .into_iter()
        .map(|prediction| UnetOutput {
            prediction,
            recorded: None,
        })
        .collect())
}

/// A template registration: the dense forward of its own branches, recording.
fn run_recording(
    pipe: &Pipeline,
    job: &DenoiseJob<'_>,
    input: &StepInput,
) -> Result<Vec<UnetOutput>> {
    let Kind::Template {
        cache_dtype: Some(dtype),
        ..
    } = &job.kind
    else {
        return Err(Error::Invalid("not a recording template job".into()));
    };
    let branches = job.guidance.branches();
    let sample = Tensor::concat_batch(&vec![&input.input; branches])?;
    let (prediction, recorded) = pipe.unet.forward_recording(
        &sample,
        &vec![input.t; branches],
        job.guidance.context(),
        *dtype,
    )?;
    Ok(vec![UnetOutput {
        prediction,
        recorded: Some(recorded),
    }])
}
