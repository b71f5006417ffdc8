use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use retouch_kernels::bench::{self, BenchCase, Measurement};
use retouch_kernels::{Device, Tensor};
use retouch_models::random_pipeline::{Preset, RandomPipeline};

use super::random_model::PresetArg;

#[derive(Args)]
pub struct BenchArgs {
    /// Device to run on: `cpu` (or `cuda:N` once the GPU layer exists).
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Skip the largest cases (the 4096^3 GEMM, the smaller conv shapes).
    #[arg(long)]
    quick: bool,
    /// Only cases whose name contains this text.
    #[arg(long)]
    filter: Option<String>,
    /// Instead of the kernels, time one dense UNet step of a preset (sd15, sd21, tiny) built in
    /// memory from random weights: batch 2 (classifier-free guidance) at the preset's latent
    /// size, timesteps 500, a random 77-token context.
    #[arg(long, value_enum, value_name = "PRESET", conflicts_with_all = ["quick", "filter"])]
    unet: Option<PresetArg>,
    /// With --unet: print the preset's unet/config.json (as `retouch random-model` writes it)
    /// and exit, so other frameworks can build the same network.
    #[arg(long, requires = "unet")]
    print_unet_config: bool,
    /// Minimum measuring time per case, in milliseconds (after one warm-up run).
    #[arg(long, default_value_t = 1000)]
    min_time_ms: u64,
    /// Minimum number of timed runs per case.
    #[arg(long, default_value_t = 3)]
    min_runs: usize,
    /// Print one JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: BenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    let preset = args.unet.map(Preset::from);
    if let Some(preset) = preset
        && args.print_unet_config
    {
        println!("{}", serde_json::to_string_pretty(&preset.unet_config())?);
        return Ok(());
    }
    let mut cases = match preset {
        Some(preset) => vec![unet_case(preset)],
        None => bench::suite(args.device, args.quick),
    };
    if let Some(filter) = &args.filter {
        cases.retain(|c| c.name.contains(filter.as_str()));
        if cases.is_empty() {
            return Err(format!("no benchmark case matches `{filter}`").into());
        }
    }
    let progress = ProgressBar::new(cases.len() as u64).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").expect("valid template"),
    );
    let mut results = Vec::with_capacity(cases.len());
    for case in &cases {
        progress.set_message(case.name.clone());
        results.push(bench::measure(
            case,
            Duration::from_millis(args.min_time_ms),
            args.min_runs,
        )?);
        progress.inc(1);
    }
    progress.finish_and_clear();
    bench::attach_ratios(&mut results);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        let what = if preset.is_some() {
            "UNet step"
        } else {
            "kernels"
        };
        print_table(&results, what, args.device);
    }
    Ok(())
}

/// One dense UNet step as diffusers' pipelines run it: a CFG batch of 2 at the preset's
/// latent size, built from random weights (the values do not change the work). The build is
/// part of the case's setup, so it is not timed; the UNet's FLOPs are not counted (GFLOP/s is
/// left empty, `null` in JSON).
fn unet_case(preset: Preset) -> BenchCase {
    const BATCH: usize = 2;
    const TOKENS: usize = 77;
    let config = preset.unet_config();
    let dim = |key: &str| {
        config[key]
            .as_u64()
            .unwrap_or_else(|| panic!("preset configs set {key}")) as usize
    };
    let (latent, channels, context_dim) = (
        dim("sample_size"),
        dim("in_channels"),
        dim("cross_attention_dim"),
    );
    let image = preset.image_size();
    BenchCase {
        name: format!("unet step {} {image}x{image} cfg{BATCH}", preset.name()),
        shape: format!(
            "[{BATCH},{latent},{latent},{channels}] ctx [{BATCH},{TOKENS},{context_dim}]"
        ),
        flops: f64::NAN,
        baseline: None,
        setup: Box::new(move || {
            let unet = RandomPipeline::new(preset).unet().map_err(kernel_error)?;
            let sample = Tensor::randn(&[BATCH, latent, latent, channels], 1, Device::Cpu);
            let context = Tensor::randn(&[BATCH, TOKENS, context_dim], 2, Device::Cpu);
            let timesteps = [500.0; BATCH];
            Ok(Box::new(move || {
                unet.forward(&sample, &timesteps, &context)
                    .map(drop)
                    .map_err(kernel_error)
            }))
        }),
    }
}

/// The benchmark runner speaks the kernel layer's error type.
fn kernel_error(e: retouch_models::Error) -> retouch_kernels::Error {
    match e {
        retouch_models::Error::Kernel(e) => e,
        other => retouch_kernels::Error::Invalid {
            op: "unet",
            message: other.to_string(),
        },
    }
}

fn print_table(results: &[Measurement], what: &str, device: Device) {
    println!(
        "Retouch {what} on {device} ({} threads)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<28} {:<34} {:>10} {:>9} {:>16}",
        "case", "shape", "median ms", "GFLOP/s", "vs dense"
    );
    for m in results {
        let ratio = m.ratio.map_or(String::new(), |r| format!("{r:.3}x"));
        let gflops = if m.gflops.is_finite() {
            format!("{:.1}", m.gflops)
        } else {
            String::new()
        };
        println!(
            "{:<28} {:<34} {:>10.2} {:>9} {:>16}",
            m.name, m.shape, m.median_ms, gflops, ratio
        );
    }
}
