//! Start-up timing of a worker: a throwaway template (its recorded steps warm the worker up),
//! then a dense edit and cached edits at a few mask ratios, every step timed; the fastest
//! step of each shape against its FLOPs gives the points of the least-squares line. Costs a few dozen UNet steps at the
//! model's native size (well under a second on the built-in model).

use std::path::Path;
use std::time::Instant;

use retouch_kernels::DType;
use retouch_models::pipeline::{
    DenoiseJob, EditMode, EditRequest, JobOutput, Pipeline, TemplateRef, TemplateSpec,
};
use retouch_models::{Error, Result};

use super::fit::CostModel;
use super::{ModelShape, Work};
use crate::masks::centred_box;

/// What start-up timing runs.
#[derive(Clone, Debug, PartialEq)]
pub struct CalibrationPlan {
    /// Steps of the throwaway template and of each timed edit.
    pub steps: usize,
    /// Mask ratios of the timed cached edits (a dense edit is always timed too).
    pub mask_ratios: Vec<f64>,
}

impl Default for CalibrationPlan {
    fn default() -> CalibrationPlan {
        CalibrationPlan {
            steps: 3,
            mask_ratios: vec![0.05, 0.15, 0.4],
        }
    }
}

/// One worker's timings.
#[derive(Clone, Debug, PartialEq)]
pub struct Timings {
    /// Per timed shape, in plan order: (FLOPs of a step, seconds of its fastest step).
    pub shapes: Vec<(f64, f64)>,
    /// Seconds of a request outside its steps (text encoding + VAE decoding).
    pub request_s: f64,
    /// Steps timed in all.
    pub steps: usize,
}

/// Times `plan`'s steps on `pipe` (call it on the worker's own thread pool), calling
/// `after_step` after each step of its dense and cached edits (where the worker reads the
/// step's per-unit times).
pub fn time_worker(
    pipe: &Pipeline,
    shape: &ModelShape,
    plan: &CalibrationPlan,
    after_step: &mut dyn FnMut(&Pipeline),
) -> Result<Timings> {
    let steps = plan.steps.max(2);
    let size = pipe.native_size();
    let spec = TemplateSpec {
        prompt: "calibration".into(),
        negative_prompt: String::new(),
        seed: 0,
        steps,
        guidance: 5.0,
        scheduler: "ddim".into(),
        width: size,
        height: size,
    };
    let started = Instant::now();
    let mut job = DenoiseJob::template(pipe, &spec, Some(DType::F16))?;
    let encode_s = started.elapsed().as_secs_f64();
    while !job.is_done() {
        job.step(pipe)?;
    }
    let started = Instant::now();
    let JobOutput::Template(template) = job.finish(pipe)? else {
        return Err(Error::Invalid("calibration: expected a template".into()));
    };
    let decode_s = started.elapsed().as_secs_f64();

    let mut timings = Timings {
        shapes: Vec::new(),
        request_s: encode_s + decode_s,
        steps: 0,
    };
    let cases = std::iter::once((EditMode::Dense, 1.0))
        .chain(plan.mask_ratios.iter().map(|&r| (EditMode::Cached, r)));
    for (mode, ratio) in cases {
        let mask = centred_box(size, size, ratio);
        let mut req = EditRequest::new("calibration edit");
        req.mode = mode;
        // Every step of the template, so each shape's fastest step is over all of them.
        req.strength = 1.0;
        let work = Work::of_edit(shape, &mask, &req, spec.guidance, size, size);
        let mut job = DenoiseJob::edit(pipe, TemplateRef::Borrowed(&template), &mask, &req)?;
        // The fastest of a shape's steps: other work on a shared machine only ever adds
        // time, so the minimum is the step's own cost.
        let mut fastest = f64::INFINITY;
        while !job.is_done() {
            let started = Instant::now();
            job.step(pipe)?;
            fastest = fastest.min(started.elapsed().as_secs_f64());
            after_step(pipe);
            timings.steps += 1;
        }
        timings.shapes.push((work.step_flops, fastest));
    }
    Ok(timings)
}

/// The cost model of workers of one kind from their timings: per shape the fastest of any
/// worker, the line through those, the fastest request overhead. `load_bytes_per_s` is
/// carried into the model as given.
pub fn fit_workers(
    timings: &[Timings],
    load_bytes_per_s: f64,
) -> std::result::Result<CostModel, String> {
    let shapes = timings.iter().map(|t| t.shapes.len()).min().unwrap_or(0);
    let points: Vec<(f64, f64)> = (0..shapes)
        .map(|i| {
            timings
                .iter()
                .map(|t| t.shapes[i])
                .fold(
                    (0.0, f64::INFINITY),
                    |best, p| if p.1 < best.1 { p } else { best },
                )
        })
        .collect();
    let line = CostModel::fit_steps(&points)
        .ok_or_else(|| format!("no line fits the step timings {points:?}"))?;
    Ok(CostModel {
        step_s: line.intercept,
        s_per_flop: line.slope,
        request_s: timings
            .iter()
            .map(|t| t.request_s)
            .fold(f64::INFINITY, f64::min),
        load_bytes_per_s,
        samples: timings.iter().map(|t| t.steps).sum(),
    })
}

/// Bytes per second of reading the model's largest UNet weight file (up to 256 MiB of it):
/// what bringing a file-backed cache into memory costs on this machine. The file was just
/// loaded, so this is the OS page cache's speed more than the disk's. None if unreadable.
pub fn read_bandwidth(model_dir: &Path) -> Option<f64> {
    use std::io::Read;
    let unet = model_dir.join("unet");
    let file = std::fs::read_dir(&unet)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .max_by_key(|e| e.metadata().map(|m| m.len()).unwrap_or(0))?;
    let mut reader = std::fs::File::open(file.path()).ok()?.take(256 << 20);
    let mut buf = vec![0u8; 1 << 20];
    let started = Instant::now();
    let mut total = 0usize;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(_) => return None,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    (total > 0 && secs > 0.0).then(|| total as f64 / secs)
}
