//! Stable Diffusion pipelines over a diffusers-format folder: text-to-image with
//! classifier-free guidance (this module); template registration and edits build on it.

mod cache_io;
mod cost;
pub mod device_steps;
mod edit;
mod image;
pub mod image_metrics;
mod job;
mod template;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use retouch_kernels::cuda::{AttentionKernel, CudaDevice, GemmBackend};
use retouch_kernels::{Device, Tensor};

pub use edit::{
    DEFAULT_EDIT_STRENGTH, EditMode, EditRequest, Edited, Mask, check_strength, edit_first_step,
};
pub use image::{RgbImage, latents_to_image};
pub use job::{DenoiseJob, JobOutput, StepCacheSource, TemplateRef};
pub use template::{Template, TemplateSpec};

use crate::clip::ClipTextEncoder;
use crate::nn::exec::StepCache;
use crate::nn::gpu::GpuStepCache;
use crate::schedulers::{SchedulerConfig, SchedulerKind};
use crate::tokenizer::ClipTokenizer;
use crate::unet::UNet;
use crate::vae::Vae;
use crate::weights::read_json;
use crate::{Error, Result};
use device_steps::DeviceSteps;

/// A loaded pipeline folder: tokenizer, text encoder, UNet, VAE and scheduler config.
pub struct Pipeline {
    dir: PathBuf,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextEncoder,
    pub unet: UNet,
    pub vae: Vae,
    pub scheduler_config: SchedulerConfig,
    /// The CUDA device the UNet's steps run on ([`Pipeline::use_device`]); None: the host.
    gpu: Option<Arc<CudaDevice>>,
    /// Template steps kept in the device's memory across calls (with `gpu`).
    device_steps: Option<DeviceSteps<StepCache, GpuStepCache>>,
    /// Steps to upload ahead of need during the next cached-mode call on the device
    /// ([`Pipeline::prefetch_device_steps`]).
    device_prefetch: Mutex<Vec<Arc<StepCache>>>,
}

/// A text-to-image request, with diffusers' defaults in [`GenerateRequest::new`].
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance: f32,
    pub scheduler: SchedulerKind,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    /// Initial noise, channels-last `[1, h/f, w/f, c]`, as diffusers' `latents=` takes it
    /// (before the scheduler's `init_noise_sigma` scaling). Drawn from `seed` when absent.
    pub latents: Option<Tensor>,
}

impl GenerateRequest {
    pub fn new(prompt: impl Into<String>) -> GenerateRequest {
        GenerateRequest {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            steps: 30,
            guidance: 7.5,
            scheduler: SchedulerKind::Ddim,
            seed: 0,
            width: 512,
            height: 512,
            latents: None,
        }
    }
}

/// Text conditioning and classifier-free guidance for one request.
pub(crate) struct Guidance {
    /// `[2, tokens, dim]` (negative first) when guided, else `[1, tokens, dim]`.
    context: Tensor,
    /// The same, one `[1, tokens, dim]` tensor per branch (a ragged batch's segments).
    branch_contexts: Vec<Tensor>,
    scale: f32,
}

/// The UNet branches of a guidance scale: diffusers skips the unconditional branch when the
/// scale is at most 1.
pub(crate) fn cfg_branches(scale: f32) -> usize {
    if scale > 1.0 { 2 } else { 1 }
}

impl Guidance {
    pub(crate) fn new(
        pipe: &Pipeline,
        prompt: &str,
        negative: &str,
        scale: f32,
    ) -> Result<Guidance> {
        let both = pipe.encode_prompts(prompt, negative)?;
        let context = if cfg_branches(scale) == 2 {
            both
        } else {
            both.split_batch(&[1, 1])?.swap_remove(1)
        };
        let branch_contexts = context.split_batch(&vec![1; context.dim(0)?])?;
        Ok(Guidance {
            context,
            branch_contexts,
            scale,
        })
    }

    /// UNet samples per step: 2 when guided (negative first), else 1.
    pub(crate) fn branches(&self) -> usize {
        self.branch_contexts.len()
    }

    pub(crate) fn context(&self) -> &Tensor {
        &self.context
    }

    pub(crate) fn branch_contexts(&self) -> &[Tensor] {
        &self.branch_contexts
    }

    /// The guided prediction from the UNet's `[branches, ...]` output (a map, or rows in
    /// masked runs): `uncond + g * (text - uncond)`.
    pub(crate) fn combine(&self, prediction: Tensor) -> Result<Tensor> {
        if self.branches() == 1 {
            return Ok(prediction);
        }
        let mut halves = prediction.split_batch(&[1, 1])?;
        let (text, uncond) = (halves.swap_remove(1), halves.swap_remove(0));
        Ok(uncond.add(&text.sub(&uncond)?.affine(self.scale, 0.0)?)?)
    }
}

/// What a generation produced.
pub struct Generated {
    /// Final latents, channels-last, before VAE scaling is undone.
    pub latents: Tensor,
    pub image: RgbImage,
}

impl Pipeline {
    /// Loads a pipeline folder as diffusers saves it (`model_index.json` and the component
    /// folders), fp32 weights or the `variant` (e.g. `fp16`).
    pub fn load(dir: impl AsRef<Path>, variant: Option<&str>) -> Result<Pipeline> {
        let dir = dir.as_ref().to_path_buf();
        let index = dir.join("model_index.json");
        if !index.is_file() {
            return Err(Error::config(
                &dir,
                "not a pipeline folder: model_index.json is missing",
            ));
        }
        let _: serde_json::Value = read_json(&index)?;
        Ok(Pipeline {
            tokenizer: ClipTokenizer::from_dir(dir.join("tokenizer"))?,
            text_encoder: ClipTextEncoder::load_variant(dir.join("text_encoder"), variant)?,
            unet: UNet::load(dir.join("unet"), variant)?,
            vae: Vae::load(dir.join("vae"), variant)?,
            scheduler_config: SchedulerConfig::from_file(
                dir.join("scheduler/scheduler_config.json"),
            )?,
            dir,
            gpu: None,
            device_steps: None,
            device_prefetch: Mutex::new(Vec::new()),
        })
    }

    /// Runs the UNet's steps on `device` from now on: opens it (a clear error without a
    /// driver) and uploads the UNet's weights. Dense steps and cached-mode steps run there;
    /// template registrations (which record activations), the text encoder and the VAE stay
    /// on the host. `Device::Cpu` keeps everything on the host.
    /// With a GPU, template steps handed to cached edits as shared host copies
    /// ([`StepCacheSource::Shared`]) stay in its memory across calls, up to
    /// `device_step_bytes` ([`device_steps::DeviceSteps`]).
    pub fn use_device(&mut self, device: Device, device_step_bytes: u64) -> Result<()> {
        if device == Device::Cpu {
            self.gpu = None;
            self.device_steps = None;
            return Ok(());
        }
        let dev = CudaDevice::for_device(device)?;
        self.unet.upload(&dev)?;
        self.gpu = Some(Arc::new(dev));
        self.device_steps = Some(DeviceSteps::new(device_step_bytes));
        Ok(())
    }

    /// The attention kernel the UNet's device steps run (no effect on the host).
    pub fn set_attention_kernel(&self, kernel: AttentionKernel) {
        if let Some(dev) = &self.gpu {
            dev.set_attention_kernel(kernel);
        }
    }

    /// The GEMMs of the UNet's device steps (no effect on the host); a cuBLAS backend fails
    /// here where the library is missing.
    pub fn set_gemm_backend(&self, backend: GemmBackend) -> Result<()> {
        if let Some(dev) = &self.gpu {
            dev.set_gemm_backend(backend)?;
        }
        Ok(())
    }

    /// Asks for `steps` (the next steps of the running edits) to be uploaded to the device
    /// during the next cached-mode call, beside its compute: the copies are queued once its
    /// kernels are, and found resident by the call after. Without a GPU, nothing happens.
    pub fn prefetch_device_steps(&self, steps: Vec<Arc<StepCache>>) {
        if self.device_steps.is_some() {
            *self
                .device_prefetch
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = steps;
        }
    }

    /// The steps [`Pipeline::prefetch_device_steps`] asked for, once.
    pub(crate) fn take_device_prefetch(&self) -> Vec<Arc<StepCache>> {
        std::mem::take(
            &mut *self
                .device_prefetch
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }

    /// The device tier's resident template steps (with a GPU).
    pub fn device_steps(&self) -> Option<&DeviceSteps<StepCache, GpuStepCache>> {
        self.device_steps.as_ref()
    }

    /// The device the UNet's steps run on, when not the host.
    pub fn gpu(&self) -> Option<&CudaDevice> {
        self.gpu.as_deref()
    }

    /// The image size the UNet was trained at (`sample_size` x VAE factor), else 512.
    pub fn native_size(&self) -> usize {
        self.unet
            .config()
            .sample_size
            .map_or(512, |s| s * self.vae.factor())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Text embeddings for classifier-free guidance: `[2, tokens, dim]`, the negative (or
    /// empty) prompt first, as diffusers orders them.
    pub fn encode_prompts(&self, prompt: &str, negative: &str) -> Result<Tensor> {
        let ids = self.tokenizer.encode_batch(&[negative, prompt])?;
        self.text_encoder.forward_ids(&ids, 2)
    }

    /// The latent shape of an image size; sizes must be multiples of the UNet's total
    /// down-sampling (VAE factor times 2^(blocks - 1)).
    pub fn latent_shape(&self, width: usize, height: usize) -> Result<[usize; 4]> {
        let vae = self.vae.factor();
        let unet = 1 << (self.unet.config().block_out_channels.len() - 1);
        let step = vae * unet;
        if width == 0 || height == 0 || !width.is_multiple_of(step) || !height.is_multiple_of(step)
        {
            return Err(Error::Invalid(format!(
                "image size {width}x{height} must be a positive multiple of {step}"
            )));
        }
        Ok([1, height / vae, width / vae, self.unet.config().in_channels])
    }

    /// Text-to-image. `progress(step, steps)` is called after each denoising step.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Generated> {
        match self.run_job(DenoiseJob::generate(self, req)?, progress)? {
            JobOutput::Generated(out) => Ok(out),
            _ => Err(Error::Invalid(
                "a generation job produced another output".into(),
            )),
        }
    }

    /// Runs a job to the end, calling `progress(done, total)` after each step.
    pub fn run_job(
        &self,
        mut job: DenoiseJob<'_>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<JobOutput> {
        while !job.is_done() {
            job.step(self)?;
            progress(job.steps_done(), job.total_steps());
        }
        job.finish(self)
    }

    /// Decodes scaled latents (as the UNet sees them) to an RGB image.
    pub fn decode(&self, latents: &Tensor) -> Result<RgbImage> {
        let config = self.vae.config();
        let mut unscaled = latents.affine(1.0 / config.scaling_factor, 0.0)?;
        if let Some(shift) = config.shift_factor {
            unscaled = unscaled.affine(1.0, shift)?;
        }
        latents_to_image(&self.vae.decode(&unscaled)?)
    }
}
