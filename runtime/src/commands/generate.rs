//! `retouch generate`: text-to-image with classifier-free guidance.

use std::path::PathBuf;

use clap::Args;
use retouch_kernels::{SafeTensorsFile, save_safetensors};
use retouch_models::pipeline::{GenerateRequest, Pipeline};
use retouch_models::schedulers::SchedulerKind;

use super::model_dir;

#[derive(Args)]
pub struct GenerateArgs {
    /// Pipeline folder (diffusers format); defaults to the built-in models/tiny.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    #[arg(long, default_value_t = 30)]
    steps: usize,
    #[arg(long, default_value_t = 7.5)]
    guidance: f32,
    /// ddim, euler or dpmpp-2m.
    #[arg(long, default_value = "ddim")]
    scheduler: SchedulerKind,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Image width in pixels (default: the model's native size).
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// Initial noise: a safetensors file with tensor `latents`, NCHW, exactly as diffusers'
    /// `latents=` argument takes it.
    #[arg(long)]
    latents_in: Option<PathBuf>,
    /// Writes the final latents (tensor `latents`, NCHW) before VAE decoding.
    #[arg(long)]
    latents_out: Option<PathBuf>,
    #[arg(long, default_value = "out.png")]
    output: PathBuf,
}

pub fn run(args: GenerateArgs) -> Result<(), Box<dyn std::error::Error>> {
    if !(1..=1000).contains(&args.steps) {
        return Err(format!("--steps must be between 1 and 1000, got {}", args.steps).into());
    }
    if !args.guidance.is_finite() || args.guidance < 0.0 {
        return Err(format!(
            "--guidance must be a finite non-negative number, got {}",
            args.guidance
        )
        .into());
    }
    let dir = model_dir(args.model)?;
    let pipe = Pipeline::load(&dir, None)?;
    let native = pipe.native_size();
    let mut req = GenerateRequest::new(args.prompt);
    req.negative_prompt = args.negative_prompt;
    req.steps = args.steps;
    req.guidance = args.guidance;
    req.scheduler = args.scheduler;
    req.seed = args.seed;
    req.width = args.width.unwrap_or(native);
    req.height = args.height.unwrap_or(native);
    if let Some(path) = &args.latents_in {
        let latents = SafeTensorsFile::open(path)?
            .get("latents")
            .map_err(|e| format!("--latents-in: {e}"))?
            .to_dtype(retouch_kernels::DType::F32)?;
        req.latents = Some(latents.nchw_to_nhwc()?);
    }
    let bar = super::step_bar(req.steps);
    let out = pipe.generate(&req, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    if let Some(path) = &args.latents_out {
        save_safetensors(path, [("latents", &out.latents.nhwc_to_nchw()?)])?;
    }
    out.image.save_png(&args.output)?;
    eprintln!("wrote {}", args.output.display());
    Ok(())
}
