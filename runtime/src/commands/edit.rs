//! `retouch edit`: edit a registered template inside a mask.

use std::path::PathBuf;

use clap::Args;
use retouch_models::pipeline::{
    DEFAULT_EDIT_STRENGTH, EditMode, EditRequest, Mask, Pipeline, Template,
};

use super::{model_dir, step_bar};

#[derive(Args)]
pub struct EditArgs {
    /// Pipeline folder the template was made with; defaults to the built-in models/tiny.
    #[arg(long)]
    model: Option<PathBuf>,
    /// A folder written by `retouch template`.
    #[arg(long)]
    template: PathBuf,
    /// PNG of the template's size; white marks the region to change.
    #[arg(long)]
    mask: PathBuf,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Defaults to the template's guidance.
    #[arg(long)]
    guidance: Option<f32>,
    /// `cached` runs the UNet on the active tokens only, with the template's cached
    /// activations; `dense` runs the whole UNet each step.
    #[arg(long, default_value = "cached")]
    mode: EditMode,
    /// Cached mode: latent positions around the mask recomputed as well.
    #[arg(long, default_value_t = 1)]
    halo: usize,
    /// The share of the template's schedule the edit runs, in (0, 1]: 1 starts from pure
    /// noise inside the mask, less keeps more of the template's layout there.
    #[arg(long, default_value_t = DEFAULT_EDIT_STRENGTH)]
    strength: f32,
    /// Keep the decoded pixels everywhere instead of pasting the template back outside the
    /// feathered mask.
    #[arg(long)]
    no_paste_back: bool,
    /// Print one JSON object (mask_ratio, steps, timings) on stdout.
    #[arg(long)]
    json: bool,
    #[arg(long, default_value = "out.png")]
    output: PathBuf,
}

pub fn run(args: EditArgs) -> Result<(), Box<dyn std::error::Error>> {
    let template = Template::load(&args.template)?;
    let mask_bytes =
        std::fs::read(&args.mask).map_err(|e| format!("{}: {e}", args.mask.display()))?;
    let mask = Mask::from_png(&mask_bytes).map_err(|e| format!("{}: {e}", args.mask.display()))?;
    if let Some(g) = args.guidance {
        super::check_steps_and_guidance(template.spec.steps, g)?;
    }
    let pipe = Pipeline::load(model_dir(args.model)?, None)?;
    let req = EditRequest {
        prompt: args.prompt,
        negative_prompt: args.negative_prompt,
        seed: args.seed,
        guidance: args.guidance,
        mode: args.mode,
        paste_back: !args.no_paste_back,
        halo: args.halo,
        strength: args.strength,
    };
    let bar = step_bar(req.steps_run(template.spec.steps)?);
    let edited = pipe.edit(&template, &mask, &req, &mut |done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    edited.image.save_png(&args.output)?;
    if args.json {
        let report = serde_json::json!({
            "mask_ratio": edited.mask_ratio,
            "steps": edited.steps,
            "timings": { "unet_ms": edited.unet_ms, "total_ms": edited.total_ms },
        });
        println!("{report}");
    } else {
        eprintln!(
            "wrote {} (mask {:.1}%, {:.0} ms)",
            args.output.display(),
            edited.mask_ratio * 100.0,
            edited.total_ms
        );
    }
    Ok(())
}
