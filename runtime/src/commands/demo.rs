//! `retouch demo`: Retouch's main job on the built-in model, end to end: register a template
//! (generation + activation cache), edit it inside a mask in cached and in dense mode, and
//! write the PNGs with a summary of timings and, where the model ships its classifier, what the
//! classifier reads in the edited region.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use retouch_kernels::DType;
use retouch_models::classifier::{ShapeClassifier, View};
use retouch_models::pipeline::image_metrics::psnr;
use retouch_models::pipeline::{EditMode, EditRequest, Mask, Pipeline, RgbImage, TemplateSpec};
use retouch_runtime::masks::box_mask;

use super::{model_dir, step_bar};

#[derive(Args)]
pub struct DemoArgs {
    /// Pipeline folder (diffusers format); defaults to the built-in models/tiny.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(
        long,
        default_value = "a large red circle in the center on a blue background"
    )]
    template_prompt: String,
    #[arg(
        long,
        default_value = "a large yellow star in the center on a blue background"
    )]
    edit_prompt: String,
    /// Template seed (the edit uses seed + 1).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Guidance scale (5 suits the tiny model).
    #[arg(long, default_value_t = 5.0)]
    guidance: f32,
    /// Folder for template/, template.png, mask.png, edit-cached.png, edit-dense.png.
    #[arg(long, default_value = "demo")]
    out: PathBuf,
}

pub fn run(args: DemoArgs) -> Result<(), Box<dyn std::error::Error>> {
    super::check_steps_and_guidance(args.steps, args.guidance)?;
    let started = Instant::now();
    let dir = model_dir(args.model)?;
    let pipe = Pipeline::load(&dir, None)?;
    let size = pipe.native_size();
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let spec = TemplateSpec {
        prompt: args.template_prompt.clone(),
        negative_prompt: String::new(),
        seed: args.seed,
        steps: args.steps,
        guidance: args.guidance,
        scheduler: "ddim".into(),
        width: size,
        height: size,
    };

    eprintln!("template: {}", spec.prompt);
    let bar = step_bar(spec.steps);
    let t = Instant::now();
    let template = pipe.register_template(&spec, Some(DType::F16), &mut |done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    let template_ms = t.elapsed().as_secs_f64() * 1e3;
    template.save(args.out.join("template"))?;
    template.image.save_png(args.out.join("template.png"))?;

    // The middle three quarters: where the tiny model's "in the center" shapes lie.
    let (lo, hi) = (size / 8, size - size / 8);
    let mask = box_mask(size, size, [lo, lo, hi, hi]);
    mask_image(&mask).save_png(args.out.join("mask.png"))?;

    eprintln!("edit: {}", args.edit_prompt);
    let mut edits = Vec::new();
    for (mode, name) in [(EditMode::Cached, "cached"), (EditMode::Dense, "dense")] {
        let mut req = EditRequest::new(args.edit_prompt.clone());
        req.seed = args.seed + 1;
        req.mode = mode;
        let bar = step_bar(spec.steps);
        let edited = pipe.edit(&template, &mask, &req, &mut |done, _| {
            bar.set_position(done as u64)
        })?;
        bar.finish_and_clear();
        edited
            .image
            .save_png(args.out.join(format!("edit-{name}.png")))?;
        edits.push((name, edited));
    }

    println!(
        "model {}: {size}x{size}, {} DDIM steps, guidance {}",
        dir.display(),
        spec.steps,
        spec.guidance
    );
    println!(
        "template        {:>8.0} ms  (cache {:.1} MiB)  {}",
        template_ms,
        template.cache_bytes() as f64 / (1 << 20) as f64,
        args.out.join("template.png").display()
    );
    for (name, e) in &edits {
        println!(
            "{:<14} {:>8.0} ms  (UNet {:.0} ms, mask {:.0}%)  {}",
            format!("edit, {name}"),
            e.total_ms,
            e.unet_ms,
            e.mask_ratio * 100.0,
            args.out.join(format!("edit-{name}.png")).display()
        );
    }
    if let Some(db) = psnr(&edits[0].1.image, &edits[1].1.image, None)? {
        println!("cached vs dense: PSNR {db:.1} dB");
    }
    let classifier_dir = dir.join("classifier");
    if classifier_dir.join("config.json").is_file() {
        let net = ShapeClassifier::load(&classifier_dir)?;
        let region = View::Region([lo, lo, hi, hi]);
        let mut views = vec![(&template.image, region)];
        views.extend(edits.iter().map(|(_, e)| (&e.image, region)));
        let read = net.classify(&views)?;
        for (what, p) in ["template", "edit, cached", "edit, dense"]
            .iter()
            .zip(&read)
        {
            println!(
                "classifier reads, {what:<13} {} {} on {}",
                p.get("colour").unwrap_or("?"),
                p.get("shape").unwrap_or("?"),
                p.get("background").unwrap_or("?")
            );
        }
    }
    println!("done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn mask_image(mask: &Mask) -> RgbImage {
    RgbImage {
        width: mask.width,
        height: mask.height,
        pixels: mask
            .values
            .iter()
            .flat_map(|&v| [if v > 0.0 { 255 } else { 0 }; 3])
            .collect(),
    }
}
