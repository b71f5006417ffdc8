//! `retouch template`: generate a template and register it on disk for edits.

use std::path::PathBuf;

use clap::Args;
use retouch_kernels::DType;
use retouch_models::pipeline::{Pipeline, TemplateSpec};
use retouch_models::schedulers::SchedulerKind;

use super::{model_dir, step_bar};

#[derive(Args)]
pub struct TemplateArgs {
    /// Pipeline folder (diffusers format); defaults to the built-in models/tiny.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 30)]
    steps: usize,
    #[arg(long, default_value_t = 7.5)]
    guidance: f32,
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    #[arg(long, default_value = "ddim")]
    scheduler: SchedulerKind,
    /// Dtype of the activation cache recorded for cached-mode edits (f16, bf16, f32), or
    /// `none` to record none (dense-mode edits only).
    #[arg(long, default_value = "f16")]
    cache_dtype: String,
    /// Folder to write the template into (template.json, trajectory, image.png, cache/).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: TemplateArgs) -> Result<(), Box<dyn std::error::Error>> {
    super::check_steps_and_guidance(args.steps, args.guidance)?;
    let cache_dtype = match args.cache_dtype.as_str() {
        "f16" => Some(DType::F16),
        "bf16" => Some(DType::BF16),
        "f32" => Some(DType::F32),
        "none" => None,
        other => {
            return Err(
                format!("--cache-dtype must be f16, bf16, f32 or none, got `{other}`").into(),
            );
        }
    };
    let pipe = Pipeline::load(model_dir(args.model)?, None)?;
    let native = pipe.native_size();
    let spec = TemplateSpec {
        prompt: args.prompt,
        negative_prompt: args.negative_prompt,
        seed: args.seed,
        steps: args.steps,
        guidance: args.guidance,
        scheduler: args.scheduler.to_string(),
        width: args.width.unwrap_or(native),
        height: args.height.unwrap_or(native),
    };
    let bar = step_bar(spec.steps);
    let template = pipe.register_template(&spec, cache_dtype, &mut |done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    template.save(&args.out)?;
    eprintln!(
        "registered template {} ({}x{}, {} steps, trajectory {} KiB, activation cache {} KiB)",
        args.out.display(),
        spec.width,
        spec.height,
        spec.steps,
        template.trajectory_bytes() / 1024,
        template.cache_bytes() / 1024
    );
    Ok(())
}
