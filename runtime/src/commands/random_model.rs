//! `retouch random-model`: a diffusers-format pipeline folder with random weights, for
//! benchmarks (real SD 1.5 / 2.1 architectures) and tests (`tiny`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use retouch_kernels::DType;
use retouch_models::random_pipeline::{Event, Preset, Progress, RandomPipeline};

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum PresetArg {
    /// Stable Diffusion 1.5 (~1.07B parameters).
    Sd15,
    /// Stable Diffusion 2.1, 768 px v-prediction (~1.29B parameters).
    Sd21,
    /// A small SD 1.x-shaped pipeline for tests (64x64 images).
    Tiny,
}

#[derive(Clone, Copy, ValueEnum)]
enum DTypeArg {
    F32,
    /// Written as diffusers' `fp16` variant (`*.fp16.safetensors`).
    F16,
}

#[derive(Args)]
pub struct RandomModelArgs {
    #[arg(long, value_enum)]
    preset: PresetArg,
    /// The pipeline folder to write (created if missing).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DTypeArg,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write into a non-empty folder, replacing the pipeline's files there.
    #[arg(long)]
    force: bool,
}

impl From<PresetArg> for Preset {
    fn from(p: PresetArg) -> Preset {
        match p {
            PresetArg::Sd15 => Preset::Sd15,
            PresetArg::Sd21 => Preset::Sd21,
            PresetArg::Tiny => Preset::Tiny,
        }
    }
}

pub fn run(args: RandomModelArgs) -> Result<(), Box<dyn std::error::Error>> {
    let pipeline = RandomPipeline {
        preset: args.preset.into(),
        dtype: match args.dtype {
            DTypeArg::F32 => DType::F32,
            DTypeArg::F16 => DType::F16,
        },
        seed: args.seed,
    };
    if !args.force && is_non_empty_dir(&args.out) {
        return Err(format!(
            "{}: exists and is not empty (pass --force to replace the pipeline files in it)",
            args.out.display()
        )
        .into());
    }
    let bar = ProgressBar::new_spinner().with_style(
        ProgressStyle::with_template("{spinner} [{elapsed}] {msg}").expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    let result = pipeline.write(&args.out, args.force, Some(reporter(bar.clone())));
    bar.finish_and_clear();
    let summary = result?;
    for (name, params, path) in &summary.components {
        println!(
            "{name:<13} {:>8.1}M parameters  {}",
            *params as f64 / 1e6,
            path.display()
        );
    }
    println!(
        "wrote {} ({}, {}, seed {}): {}",
        args.out.display(),
        pipeline.preset.name(),
        args.dtype
            .to_possible_value()
            .expect("not skipped")
            .get_name(),
        pipeline.seed,
        human_bytes(summary.bytes)
    );
    Ok(())
}

fn is_non_empty_dir(path: &Path) -> bool {
    std::fs::read_dir(path).is_ok_and(|mut entries| entries.next().is_some())
}

/// Turns the writer's events into spinner messages (per component: parameters generated,
/// then the file being written).
fn reporter(bar: ProgressBar) -> Progress {
    let state = std::sync::Mutex::new((String::new(), 0u64));
    Arc::new(move |event| {
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            Event::Component(name) => *state = (name.to_string(), 0),
            Event::Generated { elements } => {
                state.1 += elements as u64;
                bar.set_message(format!(
                    "{}: {:.1}M parameters generated",
                    state.0,
                    state.1 as f64 / 1e6
                ));
            }
            Event::Writing { path, bytes } => bar.set_message(format!(
                "{}: writing {} ({})",
                state.0,
                path.display(),
                human_bytes(bytes)
            )),
        }
    })
}

fn human_bytes(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b => format!("{:.1} KiB", b as f64 / 1024.0),
    }
}
