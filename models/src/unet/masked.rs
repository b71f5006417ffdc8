//! The UNet on active tokens only (cached mode), over a ragged batch: several requests'
//! CFG branches, each a segment with its own rows, token sets, template cache, timestep and
//! text. The single-request forward is the case of one segment per branch.

use retouch_kernels::cuda::{CudaDevice, CudaTensor};
use retouch_kernels::{Tensor, TokenSet};

use super::UNet;
use super::device::{DeviceBoundaries, GpuExec};
use super::walk::Boundaries;
use crate::nn::exec::{Exec, Masked, Segment, StepCache, StepSource};
use crate::nn::gpu::{GpuMasked, GpuStepCache, GpuStepSource, upload_f32};
use crate::{Error, Result};

/// One segment of a ragged masked forward: one CFG branch of one cached-mode request.
#[derive(Clone, Copy)]
pub struct CachedSegment<'a> {
    /// Token sets per resolution ([`token_levels`]); the segment owns `levels[0].len()`
    /// consecutive input rows.
    pub levels: &'a [TokenSet],
    /// The template's recording of this step.
    pub cache: &'a StepCache,
    /// Which of the cache's CFG branches this segment is.
    pub branch: usize,
    pub timestep: f32,
    /// The segment's text context, `[tokens, cross_dim]` or `[1, tokens, cross_dim]`.
    pub context: &'a Tensor,
}

impl UNet {
    /// The forward on active tokens only, for one request. `rows = [batch,
    /// levels[0].len(), in_channels]` are the latents at the level-0 active positions;
    /// `levels` are the token sets per resolution ([`token_levels`]); `cache` is the
    /// template's recording of this step (same batch). Returns the output rows
    /// `[batch, levels[0].len(), out_channels]`.
    pub fn forward_masked(
        &self,
        rows: &Tensor,
        timesteps: &[f32],
        context: &Tensor,
        cache: &StepCache,
        levels: &[TokenSet],
    ) -> Result<Tensor> {
        let s = rows.shape().to_vec();
        let n = levels.first().map_or(0, TokenSet::len);
        if s.len() != 3 || s[1] != n || s[2] != self.config.in_channels {
            return Err(Error::Invalid(format!(
                "unet: masked rows must be [batch, {n}, {}], got {s:?}",
                self.config.in_channels
            )));
        }
        if timesteps.len() != s[0] || context.rank() != 3 || context.dim(0)? != s[0] {
            return Err(Error::Invalid(
                "unet: timesteps and context must match the batch".into(),
            ));
        }
        let contexts = context.split_batch(&vec![1; s[0]])?;
        let segments: Vec<CachedSegment<'_>> = contexts
            .iter()
            .zip(timesteps)
            .enumerate()
            .map(|(branch, (context, &timestep))| CachedSegment {
                levels,
                cache,
                branch,
                timestep,
                context,
            })
            .collect();
        let flat = rows.clone().reshape(&[s[0] * n, s[2]])?;
        let out = self.forward_ragged(&flat, &segments)?;
        let c = out.dim(-1)?;
        Ok(out.reshape(&[s[0], n, c])?)
    }

    /// The masked forward over a ragged batch: `rows = [sum of levels[0].len(), in_channels]`,
    /// each segment's active rows in segment order. Per-row layers (projections,
    /// feed-forwards, norms, the time-embedding add) run once over all rows; convs and
    /// self-attention take the segment list; each segment's rows cross-attend to its own
    /// text. Segments must share the latent grid and the cache dtype (the masked kernels
    /// read every segment's cache as one type). Returns `[rows, out_channels]`.
    pub fn forward_ragged(&self, rows: &Tensor, segments: &[CachedSegment<'_>]) -> Result<Tensor> {
        let (context, timesteps, exec_segments) = self.ragged_inputs(rows.shape(), segments)?;
        let mut exec = Exec::Masked(Masked::new(exec_segments));
        let out = self.run(
            rows,
            &timesteps,
            &context,
            &mut exec,
            &mut Boundaries::default(),
        )?;
        if let Exec::Masked(m) = &exec
            && !m.finished()
        {
            return Err(Error::Invalid(
                "activation cache has entries the model did not use".into(),
            ));
        }
        Ok(out)
    }

    /// [`UNet::forward_ragged`] that recomputes its first `recompute` units (of
    /// [`UNet::units`]) instead of reading their cache entries: they run densely over the
    /// whole latents `[segments, h, w, in_channels]` (segment i's map in sample i), then the
    /// walk turns masked on each segment's active rows and reads the caches from entry
    /// `entry_starts()[recompute]` on, so a step's cache needs only those entries loaded
    /// ([`crate::pipeline::Template::stream_step_cache`]), and a step still streaming in
    /// is waited for entry by entry, each when its layer needs it ([`StepSource::Streaming`]).
    /// What a cache too slow to load trades for compute: the dense units' outputs at inactive
    /// positions are recomputed under the edit's prompt rather than read from the template. `recompute = 0` is
    /// [`UNet::forward_ragged`] on the latents' active rows, `units()` the dense forward
    /// read at them. Returns `[rows, out_channels]`.
    pub fn forward_ragged_recomputing(
        &self,
        latents: &Tensor,
        segments: &[RecomputeSegment<'_>],
        recompute: usize,
    ) -> Result<Tensor> {
        let (context, timesteps, cursor) =
            self.recompute_inputs(latents.shape(), segments, recompute)?;
        let mut exec = Exec::Dense;
        let exec_segments = segments.iter().map(RecomputeSegment::exec).collect();
        let mut walk = Boundaries::switching(recompute, cursor, exec_segments);
        let out = self.run(latents, &timesteps, &context, &mut exec, &mut walk)?;
        match &exec {
            Exec::Masked(m) if !walk.switch_pending() && m.finished() => Ok(out),
            Exec::Masked(_) => Err(Error::Invalid(
                "activation cache has entries the model did not use".into(),
            )),
            _ => Err(Error::Invalid(
                "unet: the forward never reached its switch to masked rows".into(),
            )),
        }
    }

    /// [`UNet::forward_ragged_recomputing`] on the device the weights were uploaded to:
    /// `latents = [segments, h, w, in_channels]` in device memory, each segment's cache
    /// entries on the device (uploaded, or uploaded as they stream in: the dense units run
    /// meanwhile). Returns `[rows, out_channels]` in device memory.
    pub fn forward_gpu_ragged_recomputing(
        &self,
        dev: &CudaDevice,
        latents: &CudaTensor,
        segments: &[GpuRecomputeSegment<'_>],
        recompute: usize,
    ) -> Result<CudaTensor> {
        let host: Vec<RecomputeSegment<'_>> = segments.iter().map(|s| s.host).collect();
        let (context, timesteps, cursor) =
            self.recompute_inputs(latents.shape(), &host, recompute)?;
        let context = upload_f32(dev, &context)?;
        let exec_segments = host.iter().map(RecomputeSegment::exec).collect();
        let device = segments.iter().map(|s| s.device).collect();
        let m = GpuMasked::new(dev, Masked::resume(exec_segments, cursor, 0), device)?;
        let mut exec = GpuExec::Dense;
        let mut walk = DeviceBoundaries::switching(recompute, m);
        let out = self.run_gpu(dev, latents, &timesteps, &context, &mut exec, &mut walk)?;
        match &exec {
            GpuExec::Masked(m) if !walk.switch_pending() && m.host().finished() => Ok(out),
            GpuExec::Masked(_) => Err(Error::Invalid(
                "activation cache has entries the model did not use".into(),
            )),
            GpuExec::Dense => Err(Error::Invalid(
                "unet: the forward never reached its switch to masked rows".into(),
            )),
        }
    }

    /// Checks a recomputing forward's latents (`[segments, h, w, in_channels]`, the
    /// segments' grid) and segments; returns the stacked contexts, the timesteps and the
    /// cache entry the masked part starts reading at.
    fn recompute_inputs(
        &self,
        latents: &[usize],
        segments: &[RecomputeSegment<'_>],
        recompute: usize,
    ) -> Result<(Tensor, Vec<f32>, usize)> {
        let starts = self.entry_starts()?;
        let Some(&cursor) = starts.get(recompute) else {
            return Err(Error::Invalid(format!(
                "unet: {recompute} units to recompute, the network has {}",
                starts.len().saturating_sub(1)
            )));
        };
        let total: usize = segments.iter().map(|s| s.levels[0].len()).sum();
        let (context, timesteps) =
            self.segment_inputs(&[total, self.config.in_channels], segments)?;
        let grid = segments[0].levels[0].height();
        let grid = (grid, segments[0].levels[0].width());
        if latents.len() != 4
            || latents[0] != segments.len()
            || (latents[1], latents[2]) != grid
            || latents[3] != self.config.in_channels
        {
            return Err(Error::Invalid(format!(
                "unet: recomputing needs the latents as [{}, {}, {}, {}] (the segments' grid), \
                 got {latents:?}",
                segments.len(),
                grid.0,
                grid.1,
                self.config.in_channels
            )));
        }
        self.check_inputs(latents, &timesteps, context.shape())?;
        Ok((context, timesteps, cursor))
    }

    /// [`UNet::forward_ragged`] on the device the weights were uploaded to: `rows = [sum
    /// of levels[0].len(), in_channels]` in device memory, each segment's template cache
    /// uploaded beside its host copy. Returns `[rows, out_channels]` in device memory.
    pub fn forward_gpu_ragged(
        &self,
        dev: &CudaDevice,
        rows: &CudaTensor,
        segments: &[GpuCachedSegment<'_>],
    ) -> Result<CudaTensor> {
        let host: Vec<CachedSegment<'_>> = segments.iter().map(|s| s.host).collect();
        let (context, timesteps, exec_segments) = self.ragged_inputs(rows.shape(), &host)?;
        let context = upload_f32(dev, &context)?;
        let device = segments
            .iter()
            .map(|s| GpuStepSource::Whole(s.device))
            .collect();
        let m = GpuMasked::new(dev, Masked::new(exec_segments), device)?;
        let mut exec = GpuExec::Masked(m);
        let mut walk = DeviceBoundaries::new(self.times_device_units());
        let out = self.run_gpu(dev, rows, &timesteps, &context, &mut exec, &mut walk)?;
        let GpuExec::Masked(m) = &exec else {
            unreachable!("a masked walk stays masked")
        };
        if !m.host().finished() {
            return Err(Error::Invalid(
                "activation cache has entries the model did not use".into(),
            ));
        }
        self.keep_device_walk(true, rows.shape()[0], walk);
        Ok(out)
    }

    /// Checks a ragged batch (rows of shape `rows_shape`) and gathers what its forward
    /// takes: the stacked text contexts `[segments, tokens, dim]`, the timesteps, and the
    /// segments as the masked executor reads them.
    fn ragged_inputs<'a>(
        &self,
        rows_shape: &[usize],
        segments: &[CachedSegment<'a>],
    ) -> Result<(Tensor, Vec<f32>, Vec<Segment<'a>>)> {
        let segments: Vec<RecomputeSegment<'a>> = segments.iter().map(|&s| s.into()).collect();
        let (context, timesteps) = self.segment_inputs(rows_shape, &segments)?;
        let exec_segments = segments.iter().map(RecomputeSegment::exec).collect();
        Ok((context, timesteps, exec_segments))
    }

    /// Checks the segments of a ragged batch (rows of shape `rows_shape`) and stacks their
    /// text contexts `[segments, tokens, dim]` and timesteps.
    fn segment_inputs(
        &self,
        rows_shape: &[usize],
        segments: &[RecomputeSegment<'_>],
    ) -> Result<(Tensor, Vec<f32>)> {
        let Some(first) = segments.first() else {
            return Err(Error::Invalid(
                "unet: a ragged forward needs a segment".into(),
            ));
        };
        let levels = self.down.len();
        if let Some(i) = segments.iter().position(|s| s.levels.len() != levels) {
            return Err(Error::Invalid(format!(
                "unet: segment {i} has {} token sets for {levels} resolutions",
                segments[i].levels.len()
            )));
        }
        let total: usize = segments.iter().map(|s| s.levels[0].len()).sum();
        if rows_shape != [total, self.config.in_channels] {
            return Err(Error::Invalid(format!(
                "unet: masked rows must be [{total}, {}], got {rows_shape:?}",
                self.config.in_channels
            )));
        }
        let tokens = context_tokens(first.context, self.config.cross_attention_dim)?;
        let mut contexts = Vec::with_capacity(segments.len());
        for (i, s) in segments.iter().enumerate() {
            if context_tokens(s.context, self.config.cross_attention_dim)? != tokens {
                return Err(Error::Invalid(format!(
                    "unet: segment {i}'s text context has another length than segment 0's"
                )));
            }
            let dim = self.config.cross_attention_dim;
            contexts.push(s.context.clone().reshape(&[1, tokens, dim])?);
        }
        let context = Tensor::concat_batch(&contexts.iter().collect::<Vec<_>>())?;
        let timesteps: Vec<f32> = segments.iter().map(|s| s.timestep).collect();
        Ok((context, timesteps))
    }
}

/// One segment of a recomputing masked forward ([`UNet::forward_ragged_recomputing`]): a
/// [`CachedSegment`] whose cache may still be streaming in.
#[derive(Clone, Copy)]
pub struct RecomputeSegment<'a> {
    pub levels: &'a [TokenSet],
    pub cache: StepSource<'a>,
    pub branch: usize,
    pub timestep: f32,
    pub context: &'a Tensor,
}

impl<'a> RecomputeSegment<'a> {
    /// The segment as the masked executor reads it.
    fn exec(&self) -> Segment<'a> {
        Segment {
            cache: self.cache,
            branch: self.branch,
            levels: self.levels,
        }
    }
}

impl<'a> From<CachedSegment<'a>> for RecomputeSegment<'a> {
    fn from(s: CachedSegment<'a>) -> RecomputeSegment<'a> {
        RecomputeSegment {
            levels: s.levels,
            cache: StepSource::Whole(s.cache),
            branch: s.branch,
            timestep: s.timestep,
            context: s.context,
        }
    }
}

/// One segment of a masked forward on the device: the host segment and the device copy of
/// its template's cache.
#[derive(Clone, Copy)]
pub struct GpuCachedSegment<'a> {
    pub host: CachedSegment<'a>,
    pub device: &'a GpuStepCache,
}

/// One segment of a recomputing forward on the device
/// ([`UNet::forward_gpu_ragged_recomputing`]): the host segment and where its cache entries
/// are on the device (a whole upload for a whole host step, a stream for a streaming one).
#[derive(Clone, Copy)]
pub struct GpuRecomputeSegment<'a> {
    pub host: RecomputeSegment<'a>,
    pub device: GpuStepSource<'a>,
}

/// The token count of a context `[tokens, dim]` or `[1, tokens, dim]`.
fn context_tokens(context: &Tensor, dim: usize) -> Result<usize> {
    match context.shape() {
        &[tokens, d] | &[1, tokens, d] if d == dim => Ok(tokens),
        other => Err(Error::Invalid(format!(
            "unet: a segment's text context must be [tokens, {dim}], got {other:?}"
        ))),
    }
}

/// Nearest 2x up-sampling of masked rows to `level`: each segment's active position there
/// takes its parent's row one level down (one gather over the stacked rows).
pub(super) fn upsample_rows(h: &Tensor, m: &mut Masked<'_>, level: usize) -> Result<Tensor> {
    let parents = upsample_parents(m, level)?;
    m.set_level(level);
    Ok(h.gather_rows(&parents)?)
}

/// For each active position at `level` (segment by segment), the stacked row of its parent
/// at the current level.
pub(super) fn upsample_parents(m: &Masked<'_>, level: usize) -> Result<Vec<u32>> {
    let lows = m.tokens()?;
    let highs = m.level_tokens(level)?;
    let mut parents = Vec::with_capacity(highs.iter().map(|t| t.len()).sum());
    let mut offset = 0u32;
    for (low, high) in lows.iter().zip(&highs) {
        for &p in high.positions() {
            let (y, x) = (p as usize / high.width(), p as usize % high.width());
            let row = low
                .row_of()
                .get((y / 2) * low.width() + x / 2)
                .copied()
                .unwrap_or(u32::MAX);
            if row == u32::MAX {
                return Err(Error::Invalid(format!(
                    "token sets: position {p} at level {level} has no active parent"
                )));
            }
            parents.push(offset + row);
        }
        offset += low.len() as u32;
    }
    Ok(parents)
}

/// The active token sets of a latent mask at each of `levels` resolutions: level 0 is the
/// mask dilated by `halo` positions (Chebyshev distance), each next level the previous one
/// max-pooled 2x2, so every active position has an active parent one level down.
pub fn token_levels(
    mask: &[bool],
    height: usize,
    width: usize,
    levels: usize,
    halo: usize,
) -> Result<Vec<TokenSet>> {
    if mask.len() != height * width {
        return Err(Error::Invalid(format!(
            "mask has {} entries for a {height}x{width} latent",
            mask.len()
        )));
    }
    let mut current = vec![false; mask.len()];
    for y in 0..height {
        for x in 0..width {
            if mask[y * width + x] {
                for yy in y.saturating_sub(halo)..(y + halo + 1).min(height) {
                    for xx in x.saturating_sub(halo)..(x + halo + 1).min(width) {
                        current[yy * width + xx] = true;
                    }
                }
            }
        }
    }
    let (mut h, mut w) = (height, width);
    let mut sets = Vec::with_capacity(levels);
    for level in 0..levels {
        if level > 0 {
            let (nh, nw) = (h.div_ceil(2), w.div_ceil(2));
            let mut pooled = vec![false; nh * nw];
            for y in 0..h {
                for x in 0..w {
                    if current[y * w + x] {
                        pooled[(y / 2) * nw + x / 2] = true;
                    }
                }
            }
            (current, h, w) = (pooled, nh, nw);
        }
        sets.push(TokenSet::from_mask(h, w, &current)?);
    }
    Ok(sets)
}
