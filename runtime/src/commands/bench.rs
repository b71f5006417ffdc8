use std::rc::Rc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use retouch_kernels::Device;
use retouch_kernels::bench::{self, Measurement, Target};
use retouch_kernels::cuda::CudaDevice;
use retouch_models::random_pipeline::Preset;

use super::{AttentionArg, GemmArg, bench_unet};

use super::random_model::PresetArg;

#[derive(Args)]
pub struct BenchArgs {
    /// Device to run on: `cpu`, or `cuda:N` (the kernels through the GPU launchers, each case
    /// repeated back to back in one stream and synchronised every ~2 ms; with --unet the
    /// weights uploaded and the dense and cached steps run on the GPU, each synchronised).
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// On a GPU: the attention kernel.
    #[arg(long, value_enum, default_value = "flash")]
    attention: AttentionArg,
    /// On a GPU: the GEMMs of linear layers and convolutions.
    #[arg(long, value_enum, default_value = "kernels")]
    gemm: GemmArg,
    /// Skip the largest cases (the 4096^3 GEMM, the smaller conv shapes).
    #[arg(long)]
    quick: bool,
    /// Only cases whose name contains this text.
    #[arg(long)]
    filter: Option<String>,
    /// Instead of the kernels, time one dense UNet step of a preset (sd15, sd21, tiny) built in
    /// memory from random weights: batch 2 (classifier-free guidance) at the preset's latent
    /// size, timesteps 500, a random 77-token context.
    #[arg(long, value_enum, value_name = "PRESET", conflicts_with = "quick")]
    unet: Option<PresetArg>,
    /// With --unet: print the preset's unet/config.json (as `retouch random-model` writes it)
    /// and exit, so other frameworks can build the same network.
    #[arg(long, requires = "unet")]
    print_unet_config: bool,
    /// With --unet: also time a cached-mode step (active tokens only, the rest from a recorded
    /// f16 activation cache of the same step) at each of these mask ratios, in percent of the
    /// latent positions (a centred square), and compare it with the dense step.
    #[arg(long, requires = "unet", value_delimiter = ',', value_name = "PERCENT")]
    mask_ratios: Vec<f64>,
    /// With --mask-ratios: also time N cached-mode edits (the square moved to N places, each
    /// with its own context and timestep) stepped one by one, then as one fused ragged
    /// forward, and print fused / one-by-one.
    #[arg(long, requires = "mask_ratios", default_value_t = 1, value_name = "N")]
    batch: usize,
    /// With --mask-ratios: the halo (in latent positions) added around the mask.
    #[arg(long, requires = "mask_ratios", default_value_t = 1)]
    halo: usize,
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
    let gpu = match args.device {
        Device::Cpu => None,
        device => {
            let dev = CudaDevice::for_device(device)?;
            dev.set_attention_kernel(args.attention.into());
            dev.set_gemm_backend(args.gemm.into())?;
            Some(dev)
        }
    };
    let title = match &gpu {
        Some(dev) => format!(
            "{} ({}; --attention {} --gemm {})",
            args.device,
            dev.describe(),
            arg_name(&args.attention),
            arg_name(&args.gemm)
        ),
        None => format!(
            "cpu ({} threads)",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ),
    };
    let mut cases = match preset {
        Some(preset) => {
            if let Some(bad) = args
                .mask_ratios
                .iter()
                .find(|r| !(**r > 0.0 && **r <= 100.0))
            {
                return Err(format!("--mask-ratios must be in (0, 100], got {bad}").into());
            }
            if args.batch == 0 {
                return Err("--batch must be at least 1".into());
            }
            bench_unet::unet_cases(preset, &args.mask_ratios, args.halo, args.batch, gpu)
        }
        None => {
            let target = match gpu {
                Some(dev) => Target::Cuda(Rc::new(dev)),
                None => Target::Cpu,
            };
            bench::suite(&target, args.quick)
        }
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
        print_table(&results, what, &title);
    }
    Ok(())
}

fn print_table(results: &[Measurement], what: &str, title: &str) {
    println!("Retouch {what} on {title}");
    println!(
        "{:<30} {:<40} {:>10} {:>9} {:>8} {:>12}",
        "case", "shape", "median ms", "GFLOP/s", "GB/s", "vs baseline"
    );
    // Blank where a case has no FLOP or byte count (the UNet steps; FLOPs of data movement).
    let rate = |r: f64| {
        if r.is_finite() && r > 0.0 {
            format!("{r:.1}")
        } else {
            String::new()
        }
    };
    for m in results {
        let ratio = m.ratio.map_or(String::new(), |r| format!("{r:.3}x"));
        println!(
            "{:<30} {:<40} {:>10.3} {:>9} {:>8} {:>12}",
            m.name,
            m.shape,
            m.median_ms,
            rate(m.gflops),
            rate(m.gbps),
            ratio
        );
    }
}

/// A choice as it is written on the command line.
fn arg_name(value: &impl ValueEnum) -> String {
    value
        .to_possible_value()
        .map_or_else(String::new, |v| v.get_name().to_string())
}
