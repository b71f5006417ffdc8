use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use retouch_kernels::Device;
use retouch_kernels::bench::{self, Measurement};

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
    let mut cases = bench::suite(args.device, args.quick);
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
        print_table(&results, args.device);
    }
    Ok(())
}

fn print_table(results: &[Measurement], device: Device) {
    println!(
        "Retouch kernels on {device} ({} threads)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<28} {:<34} {:>10} {:>9} {:>16}",
        "case", "shape", "median ms", "GFLOP/s", "vs dense"
    );
    for m in results {
        let ratio = m.ratio.map_or(String::new(), |r| format!("{r:.3}x"));
        println!(
            "{:<28} {:<34} {:>10.2} {:>9.1} {:>16}",
            m.name, m.shape, m.median_ms, m.gflops, ratio
        );
    }
}
