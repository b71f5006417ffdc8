//! `retouch quality`: how close cached-mode edits come to dense-mode edits, and how well both
//! keep the template outside the mask (PSNR and SSIM, per mask ratio, over several
//! template/mask pairs); with the tiny model's classifier and edit cases, how often edits
//! produce what the prompt asks for inside the mask.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use retouch_kernels::DType;
use retouch_models::classifier::{Prediction, ShapeClassifier, View};
use retouch_models::pipeline::image_metrics::{psnr, ssim};
use retouch_models::pipeline::{
    DEFAULT_EDIT_STRENGTH, EditMode, EditRequest, Edited, Mask, Pipeline, RgbImage, Template,
    TemplateSpec,
};
use retouch_models::shape_box::{ShapeBoxRule, shape_box};
use retouch_runtime::masks::{box_mask, ellipse_mask};
use serde::{Deserialize, Serialize};

use super::{check_steps_and_guidance, model_dir};

#[derive(Args)]
pub struct QualityArgs {
    /// Pipeline folder (default: the built-in models/tiny).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Template/mask pairs per mask ratio.
    #[arg(long, default_value_t = 8)]
    pairs: usize,
    /// Mask ratios in percent of the image (random ellipses of that area).
    #[arg(long, value_delimiter = ',', default_value = "5,10,20,50")]
    mask_ratios: Vec<f64>,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Guidance scale of templates and edits (5: the tiny model's evaluation setting).
    #[arg(long, default_value_t = 5.0)]
    guidance: f32,
    /// Guidance scale of the edits (default: the templates', `--guidance`).
    #[arg(long)]
    edit_guidance: Option<f32>,
    /// Cached mode: latent positions recomputed around the mask.
    #[arg(long, default_value_t = 1)]
    halo: usize,
    /// Share of the template's steps each edit runs (see `retouch edit --strength`).
    #[arg(long, default_value_t = DEFAULT_EDIT_STRENGTH)]
    strength: f32,
    /// Seed of the first template (pair i uses seed + i).
    #[arg(long, default_value_t = 1000)]
    seed: u64,
    /// Edit cases scored by the classifier (JSON, as `tools/train-tiny/eval_tiny.py
    /// --export-cases` writes it); default `MODEL/eval/edit_cases.json` when it exists.
    #[arg(long)]
    cases: Option<PathBuf>,
    /// At most this many edit cases.
    #[arg(long, default_value_t = 60)]
    max_cases: usize,
    /// Added to every case's template and edit seed: the same prompts on other templates,
    /// a validation set for choosing settings without the scored cases (docs/quality.md).
    #[arg(long, default_value_t = 0)]
    case_seed_offset: u64,
    /// Classifier folder; default `MODEL/classifier`.
    #[arg(long)]
    classifier: Option<PathBuf>,
    /// Also write the report as Markdown.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Print the report as JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Write each classifier case's template, dense and cached edits (PNG) and what the
    /// classifier read (`cases.jsonl`) into this folder, to look at the failures.
    #[arg(long)]
    dump: Option<PathBuf>,
}

/// Template prompts of the mask-ratio study, worded as the tiny model's training captions
/// ("on a orange" included); any model takes them.
const TEMPLATE_PROMPTS: [&str; 8] = [
    "a large red circle in the center on a blue background",
    "a small yellow star at the top left on a black background",
    "a large green square at the bottom right on a white background",
    "a small blue triangle in the center on a yellow background",
    "a large white cross at the top right on a red background",
    "a large purple circle at the bottom left on a green background",
    "a small orange square at the top on a blue background",
    "a large black star in the center on a orange background",
];
const EDIT_PROMPTS: [&str; 5] = [
    "a large blue star in the center on a red background",
    "a small green circle in the center on a white background",
    "a large yellow cross in the center on a black background",
    "a large orange triangle in the center on a purple background",
    "a small white square in the center on a green background",
];

#[derive(Serialize)]
struct RatioRow {
    mask_percent: f64,
    measured_mask_percent: f64,
    pairs: usize,
    cached_vs_dense_psnr: f64,
    cached_vs_dense_ssim: f64,
    min_cached_vs_dense_psnr: f64,
    unmasked_psnr_cached: f64,
    unmasked_ssim_cached: f64,
    unmasked_psnr_dense: f64,
    unmasked_ssim_dense: f64,
    unet_ms_cached: f64,
    unet_ms_dense: f64,
}

/// One classifier-scored edit case.
#[derive(Deserialize)]
struct EditCase {
    template_prompt: String,
    template_seed: u64,
    edit_prompt: String,
    edit_seed: u64,
    /// Pixels `[x0, y0, x1, y1]`, end exclusive: the caption's nominal box, the mask and the
    /// classifier's crop when no shape is found in the template (`shape_box`).
    bbox: [usize; 4],
    want_shape: String,
    want_colour: String,
}

#[derive(Serialize, Default)]
struct CaseScores {
    cases: usize,
    success_dense: f64,
    success_cached: f64,
    shape_dense: f64,
    shape_cached: f64,
    colour_dense: f64,
    colour_cached: f64,
    unmasked_psnr_dense: f64,
    unmasked_psnr_cached: f64,
    /// Cases whose mask leaves pixels outside (the PSNR means are over these).
    psnr_cases: usize,
    mean_mask_percent: f64,
}

#[derive(Serialize)]
struct Report {
    model: String,
    steps: usize,
    guidance: f32,
    /// The edits' guidance, where it differs from the templates'.
    #[serde(skip_serializing_if = "Option::is_none")]
    edit_guidance: Option<f32>,
    halo: usize,
    strength: f32,
    ratios: Vec<RatioRow>,
    classifier: Option<CaseScores>,
    seconds: f64,
}

pub fn run(args: QualityArgs) -> Result<(), Box<dyn std::error::Error>> {
    check_steps_and_guidance(args.steps, args.guidance)?;
    if let Some(g) = args.edit_guidance {
        check_steps_and_guidance(args.steps, g)?;
    }
    if args.pairs == 0 {
        return Err("--pairs must be at least 1".into());
    }
    if let Some(bad) = args
        .mask_ratios
        .iter()
        .find(|r| !(**r > 0.0 && **r < 100.0))
    {
        return Err(format!("--mask-ratios must be in (0, 100), got {bad}").into());
    }
    let started = Instant::now();
    let dir = model_dir(args.model.clone())?;
    let pipe = Pipeline::load(&dir, None)?;
    let size = pipe.native_size();
    let spec = |prompt: &str, seed: u64| TemplateSpec {
        prompt: prompt.to_string(),
        negative_prompt: String::new(),
        seed,
        steps: args.steps,
        guidance: args.guidance,
        scheduler: "ddim".into(),
        width: size,
        height: size,
    };
    let edit_pair = |template: &Template, mask: &Mask, prompt: &str, seed: u64| {
        let run = |mode| {
            let mut req = EditRequest::new(prompt);
            req.seed = seed;
            req.mode = mode;
            req.halo = args.halo;
            req.strength = args.strength;
            req.guidance = args.edit_guidance;
            pipe.edit(template, mask, &req, &mut |_, _| {})
        };
        Ok::<_, retouch_models::Error>((run(EditMode::Dense)?, run(EditMode::Cached)?))
    };

    let bar = indicatif::ProgressBar::new((args.pairs * args.mask_ratios.len()) as u64);
    let mut per_ratio: Vec<Vec<PairScores>> = vec![Vec::new(); args.mask_ratios.len()];
    for p in 0..args.pairs {
        let prompt = TEMPLATE_PROMPTS[p % TEMPLATE_PROMPTS.len()];
        let template = pipe.register_template(
            &spec(prompt, args.seed + p as u64),
            Some(DType::F16),
            &mut |_, _| {},
        )?;
        for (ri, &percent) in args.mask_ratios.iter().enumerate() {
            let mask = ellipse_mask(size, size, percent / 100.0, (p * 131 + ri) as u64);
            let edit_prompt = EDIT_PROMPTS[(p + ri) % EDIT_PROMPTS.len()];
            let (dense, cached) = edit_pair(&template, &mask, edit_prompt, 7 + p as u64)?;
            per_ratio[ri].push(score_pair(&pipe, &template, &mask, &dense, &cached)?);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let ratios = args
        .mask_ratios
        .iter()
        .zip(&per_ratio)
        .map(|(&percent, scores)| summarise(percent, scores))
        .collect();

    let cases_path = args
        .cases
        .clone()
        .or_else(|| Some(dir.join("eval/edit_cases.json")).filter(|p| p.is_file()));
    let classifier = match cases_path {
        Some(path) => {
            let net =
                ShapeClassifier::load(args.classifier.clone().unwrap_or(dir.join("classifier")))?;
            let cases: Vec<EditCase> = serde_json::from_str(
                &std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?,
            )
            .map_err(|e| format!("{}: {e}", path.display()))?;
            let cases = &cases[..cases.len().min(args.max_cases)];
            let mut dump = args.dump.as_deref().map(CaseDump::create).transpose()?;
            let bar = indicatif::ProgressBar::new(cases.len() as u64);
            let mut scores = CaseScores {
                cases: cases.len(),
                ..CaseScores::default()
            };
            for case in cases {
                let template = pipe.register_template(
                    &spec(
                        &case.template_prompt,
                        case.template_seed + args.case_seed_offset,
                    ),
                    Some(DType::F16),
                    &mut |_, _| {},
                )?;
                // Over the shape this template shows (Retouch's noise differs from PyTorch's,
                // so its templates are not the script's).
                let bbox = shape_box(&template.image, ShapeBoxRule::default()).unwrap_or(case.bbox);
                let mask = box_mask(size, size, bbox);
                let (dense, cached) = edit_pair(
                    &template,
                    &mask,
                    &case.edit_prompt,
                    case.edit_seed + args.case_seed_offset,
                )?;
                let views = [
                    (&dense.image, View::Region(bbox)),
                    (&cached.image, View::Region(bbox)),
                ];
                let got = net.classify(&views)?;
                let shape_ok: Vec<bool> = got
                    .iter()
                    .map(|g| g.get("shape") == Some(case.want_shape.as_str()))
                    .collect();
                let colour_ok: Vec<bool> = got
                    .iter()
                    .map(|g| g.get("colour") == Some(case.want_colour.as_str()))
                    .collect();
                if let Some(dump) = dump.as_mut() {
                    dump.write(case, bbox, &template, [&dense, &cached], &got)?;
                }
                let share = 1.0 / cases.len() as f64;
                let hit = |b: bool| if b { share } else { 0.0 };
                scores.shape_dense += hit(shape_ok[0]);
                scores.shape_cached += hit(shape_ok[1]);
                scores.colour_dense += hit(colour_ok[0]);
                scores.colour_cached += hit(colour_ok[1]);
                scores.success_dense += hit(shape_ok[0] && colour_ok[0]);
                scores.success_cached += hit(shape_ok[1] && colour_ok[1]);
                // A box over the whole image leaves nothing to compare.
                if mask.ratio() < 1.0 {
                    let outside = outside_region(&mask);
                    scores.psnr_cases += 1;
                    scores.unmasked_psnr_dense += raw_psnr(&pipe, &dense, &template, &outside)?;
                    scores.unmasked_psnr_cached += raw_psnr(&pipe, &cached, &template, &outside)?;
                }
                scores.mean_mask_percent += share * mask.ratio() * 100.0;
                bar.inc(1);
            }
            bar.finish_and_clear();
            let n = scores.psnr_cases.max(1) as f64;
            scores.unmasked_psnr_dense /= n;
            scores.unmasked_psnr_cached /= n;
            Some(scores)
        }
        None => None,
    };

    let report = Report {
        model: dir.display().to_string(),
        steps: args.steps,
        guidance: args.guidance,
        edit_guidance: args.edit_guidance,
        halo: args.halo,
        strength: args.strength,
        ratios,
        classifier,
        seconds: started.elapsed().as_secs_f64(),
    };
    let markdown = to_markdown(&report, args.pairs);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{markdown}");
    }
    if let Some(path) = &args.markdown {
        std::fs::write(path, &markdown).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

#[derive(Clone)]
struct PairScores {
    mask_ratio: f64,
    psnr: f64,
    ssim: f64,
    unmasked: [(f64, f64); 2],
    unet_ms: [f64; 2],
}

/// Cached against dense (the final, pasted images), and each mode's raw decode (no paste-back,
/// which would make the outside exact by construction) against the template outside the mask.
fn score_pair(
    pipe: &Pipeline,
    template: &Template,
    mask: &Mask,
    dense: &Edited,
    cached: &Edited,
) -> Result<PairScores, Box<dyn std::error::Error>> {
    let outside = outside_region(mask);
    let unmasked = |e: &Edited| -> Result<(f64, f64), Box<dyn std::error::Error>> {
        let raw = pipe.decode(&e.latents)?;
        Ok((
            psnr(&raw, &template.image, Some(&outside))?.unwrap_or(f64::NAN),
            ssim(&raw, &template.image, Some(&outside))?.unwrap_or(f64::NAN),
        ))
    };
    Ok(PairScores {
        mask_ratio: mask.ratio(),
        psnr: psnr(&cached.image, &dense.image, None)?.unwrap_or(f64::NAN),
        ssim: ssim(&cached.image, &dense.image, None)?.unwrap_or(f64::NAN),
        unmasked: [unmasked(dense)?, unmasked(cached)?],
        unet_ms: [dense.unet_ms, cached.unet_ms],
    })
}

fn raw_psnr(
    pipe: &Pipeline,
    edited: &Edited,
    template: &Template,
    outside: &[f32],
) -> Result<f64, Box<dyn std::error::Error>> {
    let raw: RgbImage = pipe.decode(&edited.latents)?;
    Ok(psnr(&raw, &template.image, Some(outside))?.unwrap_or(f64::NAN))
}

fn outside_region(mask: &Mask) -> Vec<f32> {
    mask.values.iter().map(|&v| 1.0 - v).collect()
}

fn summarise(percent: f64, scores: &[PairScores]) -> RatioRow {
    let mean =
        |f: &dyn Fn(&PairScores) -> f64| scores.iter().map(f).sum::<f64>() / scores.len() as f64;
    RatioRow {
        mask_percent: percent,
        measured_mask_percent: mean(&|s| s.mask_ratio * 100.0),
        pairs: scores.len(),
        cached_vs_dense_psnr: mean(&|s| s.psnr),
        cached_vs_dense_ssim: mean(&|s| s.ssim),
        min_cached_vs_dense_psnr: scores.iter().map(|s| s.psnr).fold(f64::INFINITY, f64::min),
        unmasked_psnr_dense: mean(&|s| s.unmasked[0].0),
        unmasked_ssim_dense: mean(&|s| s.unmasked[0].1),
        unmasked_psnr_cached: mean(&|s| s.unmasked[1].0),
        unmasked_ssim_cached: mean(&|s| s.unmasked[1].1),
        unet_ms_dense: mean(&|s| s.unet_ms[0]),
        unet_ms_cached: mean(&|s| s.unet_ms[1]),
    }
}

fn to_markdown(r: &Report, pairs: usize) -> String {
    let edits = r
        .edit_guidance
        .map_or(String::new(), |g| format!(" (edits {g})"));
    let mut s = format!(
        "Model `{}`, {} DDIM steps, guidance {}{edits}, halo {}, edit strength {}, {pairs} \
         template/mask pairs per ratio ({:.0} s in all).\n\n",
        r.model, r.steps, r.guidance, r.halo, r.strength, r.seconds
    );
    s += "| mask % (measured) | cached vs dense PSNR dB (min) | cached vs dense SSIM | \
          unmasked vs template PSNR dB, dense / cached | unmasked SSIM, dense / cached | \
          UNet ms, dense / cached |\n|---|---|---|---|---|---|\n";
    for row in &r.ratios {
        s += &format!(
            "| {} ({:.1}) | {:.2} ({:.2}) | {:.4} | {:.2} / {:.2} | {:.4} / {:.4} | {:.0} / {:.0} |\n",
            row.mask_percent,
            row.measured_mask_percent,
            row.cached_vs_dense_psnr,
            row.min_cached_vs_dense_psnr,
            row.cached_vs_dense_ssim,
            row.unmasked_psnr_dense,
            row.unmasked_psnr_cached,
            row.unmasked_ssim_dense,
            row.unmasked_ssim_cached,
            row.unet_ms_dense,
            row.unet_ms_cached,
        );
    }
    if let Some(c) = &r.classifier {
        s += &format!(
            "\nClassifier-scored edits ({} cases, mean mask {:.1}%; a box over the shape the \
             template shows): the masked region's shape and colour must both be the ones the \
             edit prompt names. Unmasked PSNR over the {} cases whose box leaves pixels out.\n\n\
             | mode | success | shape | colour | unmasked PSNR dB (no paste-back) |\n|---|---|---|---|---|\n\
             | dense | {:.1}% | {:.1}% | {:.1}% | {:.2} |\n| cached | {:.1}% | {:.1}% | {:.1}% | {:.2} |\n",
            c.cases,
            c.mean_mask_percent,
            c.psnr_cases,
            c.success_dense * 100.0,
            c.shape_dense * 100.0,
            c.colour_dense * 100.0,
            c.unmasked_psnr_dense,
            c.success_cached * 100.0,
            c.shape_cached * 100.0,
            c.colour_cached * 100.0,
            c.unmasked_psnr_cached,
        );
    }
    s
}

/// `--dump`: per classifier case, its template and edits as numbered PNGs in one folder,
/// and a line of `cases.jsonl` with what the classifier read.
struct CaseDump {
    dir: PathBuf,
    lines: std::fs::File,
    next: usize,
}

impl CaseDump {
    fn create(dir: &std::path::Path) -> Result<CaseDump, Box<dyn std::error::Error>> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join("cases.jsonl");
        let lines = std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(CaseDump {
            dir: dir.to_path_buf(),
            lines,
            next: 0,
        })
    }

    fn write(
        &mut self,
        case: &EditCase,
        bbox: [usize; 4],
        template: &Template,
        edits: [&Edited; 2],
        read: &[Prediction],
    ) -> Result<(), Box<dyn std::error::Error>> {
        use std::io::Write;
        let n = self.next;
        self.next += 1;
        template
            .image
            .save_png(self.dir.join(format!("{n:03}-template.png")))?;
        for (edit, mode) in edits.iter().zip(["dense", "cached"]) {
            edit.image
                .save_png(self.dir.join(format!("{n:03}-{mode}.png")))?;
        }
        let reading = |p: &Prediction| serde_json::json!({"shape": p.get("shape"), "colour": p.get("colour")});
        let line = serde_json::json!({
            "case": n,
            "template_prompt": case.template_prompt,
            "edit_prompt": case.edit_prompt,
            "want": {"shape": case.want_shape, "colour": case.want_colour},
            "bbox": bbox,
            "dense": reading(&read[0]),
            "cached": reading(&read[1]),
        });
        writeln!(self.lines, "{line}")?;
        Ok(())
    }
}
