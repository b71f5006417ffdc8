//! The UNet on a CUDA device: uploading its weights, and the one walk every device forward
//! takes (dense, masked, or dense for a prefix of units and masked after it), over the same
//! unit boundaries as the host's walk ([`super::walk`]), with a GPU timing mark at each.

use std::sync::Mutex;
use std::sync::atomic::Ordering;

use retouch_kernels::Tensor;
use retouch_kernels::cuda::{CudaDevice, CudaTensor, TimingMark};

use super::{UNet, UnitTimes, masked};
use crate::nn::gpu::{GpuMasked, upload_f32};
use crate::nn::{Conv2d, ConvExtra, ResnetBlock, Transformer2D};
use crate::{Error, Result};

/// The mode of a device walk.
pub(super) enum GpuExec<'a> {
    Dense,
    Masked(GpuMasked<'a>),
}

/// What a device walk does at its unit boundaries: marks the GPU's time at each when timed
/// (for the units' costs) and, when asked, turns a dense walk masked at one of them.
pub(super) struct DeviceBoundaries<'a> {
    /// Boundaries passed so far.
    next: usize,
    /// Turn masked at this boundary, with this state (its cursor at the first entry read).
    switch: Option<(usize, GpuMasked<'a>)>,
    /// One mark per boundary passed; None when the walk is not timed.
    marks: Option<Vec<TimingMark>>,
}

impl<'a> DeviceBoundaries<'a> {
    /// A walk that stays in its mode, marking its boundaries if `timed`.
    pub(super) fn new(timed: bool) -> DeviceBoundaries<'a> {
        DeviceBoundaries {
            next: 0,
            switch: None,
            marks: timed.then(Vec::new),
        }
    }

    /// Runs the walk densely up to `boundary`, then masked with `masked` (untimed: the plan
    /// learns from whole walks).
    pub(super) fn switching(boundary: usize, masked: GpuMasked<'a>) -> DeviceBoundaries<'a> {
        DeviceBoundaries {
            switch: Some((boundary, masked)),
            ..DeviceBoundaries::new(false)
        }
    }

    /// Whether a switch is still to come (after the walk: a boundary past its end).
    pub(super) fn switch_pending(&self) -> bool {
        self.switch.is_some()
    }

    /// Passes a boundary. `current` is the walk's activation at `level` when it is not the
    /// top of `skips` (the down path's saved outputs, at `skip_levels`); before the first
    /// unit both are empty and the walk's input is `input`. A switch here turns every one
    /// of them from dense maps `[segments, h, w, c]` into the segments' active rows.
    #[allow(clippy::too_many_arguments)]
    fn pass(
        &mut self,
        dev: &CudaDevice,
        exec: &mut GpuExec<'a>,
        input: &CudaTensor,
        current: &mut Option<CudaTensor>,
        skips: &mut [CudaTensor],
        level: usize,
        skip_levels: &[usize],
    ) -> Result<()> {
        if let Some(marks) = &mut self.marks {
            marks.push(dev.mark()?);
        }
        if self.switch.as_ref().is_some_and(|(b, _)| *b == self.next) {
            let (_, mut m) = self.switch.take().expect("checked above");
            m.host_mut().set_level(level);
            let rows = |map: &CudaTensor, level: usize| -> Result<CudaTensor> {
                let index =
                    super::walk::active_row_index(map.shape(), &m.host().level_tokens(level)?)?;
                Ok(dev.gather_rows(map, &index)?)
            };
            for (skip, &l) in skips.iter_mut().zip(skip_levels) {
                *skip = rows(skip, l)?;
            }
            match current {
                Some(h) => *h = rows(h, level)?,
                None if skips.is_empty() => *current = Some(rows(input, level)?),
                None => {} // the top of the stack, switched above
            }
            *exec = GpuExec::Masked(m);
        }
        self.next += 1;
        Ok(())
    }
}

/// A whole device walk's boundary marks, read once its kernels have run.
pub(super) struct DeviceWalkTimes {
    masked: bool,
    size: usize,
    marks: Vec<TimingMark>,
}

impl UNet {
    /// Copies every weight to `dev`, for [`UNet::forward_gpu`].
    pub fn upload(&mut self, dev: &CudaDevice) -> Result<()> {
        self.time_linear_1.upload(dev)?;
        self.time_linear_2.upload(dev)?;
        self.conv_in.upload(dev)?;
        for block in &mut self.down {
            upload_block(
                dev,
                &mut block.resnets,
                &mut block.attentions,
                &mut block.downsample,
            )?;
        }
        self.mid.resnet_in.upload(dev)?;
        self.mid.attention.upload(dev)?;
        self.mid.resnet_out.upload(dev)?;
        for block in &mut self.up {
            upload_block(
                dev,
                &mut block.resnets,
                &mut block.attentions,
                &mut block.upsample,
            )?;
        }
        self.norm_out.upload(dev)?;
        self.conv_out.upload(dev)
    }

    /// [`UNet::forward`] on the device the weights were [`UNet::upload`]ed to, inputs and
    /// output in device memory: `sample = [batch, h, w, in_channels]`, `context = [batch,
    /// tokens, cross_dim]`. The same layers in the same order as the host's dense forward.
    pub fn forward_gpu(
        &self,
        dev: &CudaDevice,
        sample: &CudaTensor,
        timesteps: &[f32],
        context: &CudaTensor,
    ) -> Result<CudaTensor> {
        self.check_inputs(sample.shape(), timesteps, context.shape())?;
        let mut exec = GpuExec::Dense;
        let mut walk = DeviceBoundaries::new(self.times_device_units());
        let out = self.run_gpu(dev, sample, timesteps, context, &mut exec, &mut walk)?;
        self.keep_device_walk(false, sample.shape()[0], walk);
        Ok(out)
    }

    /// [`UNet::forward_gpu`] with host tensors in and out (uploads the inputs, downloads the
    /// prediction).
    pub fn forward_on(
        &self,
        dev: &CudaDevice,
        sample: &Tensor,
        timesteps: &[f32],
        context: &Tensor,
    ) -> Result<Tensor> {
        let sample = upload_f32(dev, sample)?;
        let context = upload_f32(dev, context)?;
        let out = self.forward_gpu(dev, &sample, timesteps, &context)?;
        Ok(out.download(dev)?)
    }

    /// The unit times of the last dense or masked device forward (not one that recomputed
    /// a dense prefix) while [`UNet::set_device_unit_timing`] was on, taken once its kernels
    /// have run (this waits for them).
    pub fn take_device_unit_times(&self) -> Result<Option<UnitTimes>> {
        let Some(walk) = lock(&self.last_device_walk).take() else {
            return Ok(None);
        };
        let seconds = walk
            .marks
            .windows(2)
            .map(|p| Ok(f64::from(p[1].ms_since(&p[0])?) / 1e3))
            .collect::<Result<_>>()?;
        Ok(Some(UnitTimes {
            masked: walk.masked,
            size: walk.size,
            seconds,
        }))
    }

    /// Whether whole device walks mark their unit boundaries
    /// ([`UNet::take_device_unit_times`]); off unless asked for, since nothing else reads
    /// the marks and each is a driver call on the step's path.
    pub fn set_device_unit_timing(&self, on: bool) {
        self.time_device_units.store(on, Ordering::Relaxed);
    }

    pub(super) fn times_device_units(&self) -> bool {
        self.time_device_units.load(Ordering::Relaxed)
    }

    /// Keeps a whole walk's marks, if it was timed, for [`UNet::take_device_unit_times`].
    pub(super) fn keep_device_walk(&self, masked: bool, size: usize, walk: DeviceBoundaries<'_>) {
        if let Some(marks) = walk.marks {
            *lock(&self.last_device_walk) = Some(DeviceWalkTimes {
                masked,
                size,
                marks,
            });
        }
    }

    /// The device walk: `input` is `[samples, h, w, in_channels]` when `exec` starts dense,
    /// the segments' active level-0 rows when masked; one timestep and one context per sample
    /// (segment). The same layers and unit boundaries as [`UNet::run`] on the host.
    pub(super) fn run_gpu<'a>(
        &self,
        dev: &CudaDevice,
        input: &CudaTensor,
        timesteps: &[f32],
        context: &CudaTensor,
        exec: &mut GpuExec<'a>,
        walk: &mut DeviceBoundaries<'a>,
    ) -> Result<CudaTensor> {
        let temb = self.time_embedding_gpu(dev, timesteps)?;
        // Each down-path output is pushed once and read from the stack (no copies):
        // `current` is None while the next layer's input is the stack's top (or, before
        // `conv_in`, the input).
        let mut skips: Vec<CudaTensor> = Vec::new();
        let mut skip_levels: Vec<usize> = Vec::new();
        let mut current: Option<CudaTensor> = None;
        let mut level = 0;
        macro_rules! pass {
            () => {
                walk.pass(
                    dev,
                    exec,
                    input,
                    &mut current,
                    &mut skips,
                    level,
                    &skip_levels,
                )?
            };
        }
        pass!();
        let x = current.as_ref().unwrap_or(input);
        let out = conv_on(dev, &self.conv_in, x, exec, None)?;
        current = None;
        skips.push(out);
        skip_levels.push(0);
        for block in &self.down {
            for (j, resnet) in block.resnets.iter().enumerate() {
                pass!();
                let x = input_of(&current, &skips)?;
                let mut out = resnet_on(dev, resnet, x, &temb, exec)?;
                if let Some(attn) = block.attentions.get(j) {
                    current = Some(out);
                    pass!();
                    out = attention_on(dev, attn, &take(&mut current)?, context, exec)?;
                }
                current = None;
                skips.push(out);
                skip_levels.push(level);
            }
            if let Some(conv) = &block.downsample {
                pass!();
                let x = input_of(&current, &skips)?;
                let out = conv_on(dev, conv, x, exec, Some(level + 1))?;
                level += 1;
                if let GpuExec::Masked(m) = exec {
                    m.host_mut().set_level(level);
                }
                current = None;
                skips.push(out);
                skip_levels.push(level);
            }
        }

        pass!();
        let x = input_of(&current, &skips)?;
        let mut h = resnet_on(dev, &self.mid.resnet_in, x, &temb, exec)?;
        current = Some(h);
        pass!();
        h = take(&mut current)?;
        h = attention_on(dev, &self.mid.attention, &h, context, exec)?;
        current = Some(h);
        pass!();
        h = take(&mut current)?;
        h = resnet_on(dev, &self.mid.resnet_out, &h, &temb, exec)?;
        current = Some(h);

        for block in &self.up {
            for (j, resnet) in block.resnets.iter().enumerate() {
                pass!();
                let skip = skips
                    .pop()
                    .ok_or_else(|| Error::Invalid("unet: skip stack underflow".into()))?;
                skip_levels.pop();
                let h = take(&mut current)?;
                let mut out = resnet_on(dev, resnet, &dev.concat_last(&[&h, &skip])?, &temb, exec)?;
                if let Some(attn) = block.attentions.get(j) {
                    current = Some(out);
                    pass!();
                    out = attention_on(dev, attn, &take(&mut current)?, context, exec)?;
                }
                current = Some(out);
            }
            if let Some(conv) = &block.upsample {
                pass!();
                level = level.checked_sub(1).ok_or_else(|| {
                    Error::Invalid("unet: more up-samplers than down-samplers".into())
                })?;
                let h = take(&mut current)?;
                let up = match exec {
                    GpuExec::Dense => dev.upsample_nearest2x(&h)?,
                    GpuExec::Masked(m) => {
                        let parents = masked::upsample_parents(m.host(), level)?;
                        m.host_mut().set_level(level);
                        dev.gather_rows(&h, &parents)?
                    }
                };
                current = Some(conv_on(dev, conv, &up, exec, None)?);
            }
        }
        pass!();
        let h = take(&mut current)?;
        let normed = match exec {
            GpuExec::Dense => self.norm_out.forward_gpu(dev, &h, true)?,
            GpuExec::Masked(m) => self.norm_out.forward_gpu_masked(dev, &h, true, m)?,
        };
        current = Some(conv_on(dev, &self.conv_out, &normed, exec, None)?);
        pass!();
        take(&mut current)
    }

    /// SiLU of the time embedding of each timestep, `[timesteps, temb]` on the device (the
    /// sinusoidal part is a few hundred values: computed here, then uploaded).
    fn time_embedding_gpu(&self, dev: &CudaDevice, timesteps: &[f32]) -> Result<CudaTensor> {
        let t = Tensor::from_vec(timesteps.to_vec(), &[timesteps.len()])?;
        let proj = CudaTensor::upload(dev, &self.time_proj.embed(&t)?)?;
        let emb = dev.silu(&self.time_linear_1.forward_gpu(dev, &proj)?)?;
        Ok(dev.silu(&self.time_linear_2.forward_gpu(dev, &emb)?)?)
    }
}

/// The next layer's input in the down path: the current activation, else the stack's top.
fn input_of<'t>(
    current: &'t Option<CudaTensor>,
    skips: &'t [CudaTensor],
) -> Result<&'t CudaTensor> {
    current
        .as_ref()
        .or(skips.last())
        .ok_or_else(|| Error::Invalid("unet: the device walk lost its activation".into()))
}

/// The current activation (mid and up paths, where it is never on the stack).
fn take(current: &mut Option<CudaTensor>) -> Result<CudaTensor> {
    current
        .take()
        .ok_or_else(|| Error::Invalid("unet: the device walk lost its activation".into()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Only timings behind it: a panic elsewhere leaves nothing inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A conv in the walk's mode (masked: outputs at `out_level`, the current level when None).
fn conv_on(
    dev: &CudaDevice,
    conv: &Conv2d,
    x: &CudaTensor,
    exec: &mut GpuExec<'_>,
    out_level: Option<usize>,
) -> Result<CudaTensor> {
    match exec {
        GpuExec::Dense => conv.forward_gpu(dev, x),
        GpuExec::Masked(m) => conv.forward_gpu_masked(dev, x, m, out_level, ConvExtra::Nothing),
    }
}

fn resnet_on(
    dev: &CudaDevice,
    resnet: &ResnetBlock,
    x: &CudaTensor,
    temb: &CudaTensor,
    exec: &mut GpuExec<'_>,
) -> Result<CudaTensor> {
    match exec {
        GpuExec::Dense => resnet.forward_gpu(dev, x, Some(temb)),
        GpuExec::Masked(m) => resnet.forward_gpu_masked(dev, x, Some(temb), m),
    }
}

fn attention_on(
    dev: &CudaDevice,
    attn: &Transformer2D,
    x: &CudaTensor,
    context: &CudaTensor,
    exec: &mut GpuExec<'_>,
) -> Result<CudaTensor> {
    match exec {
        GpuExec::Dense => attn.forward_gpu(dev, x, context),
        GpuExec::Masked(m) => attn.forward_gpu_masked(dev, x, context, m),
    }
}

/// Uploads one down or up block: its resnets, transformers and resampling conv.
fn upload_block(
    dev: &CudaDevice,
    resnets: &mut [ResnetBlock],
    attentions: &mut [Transformer2D],
    resample: &mut Option<Conv2d>,
) -> Result<()> {
    for r in resnets {
        r.upload(dev)?;
    }
    for a in attentions {
        a.upload(dev)?;
    }
    if let Some(c) = resample {
        c.upload(dev)?;
    }
    Ok(())
}
