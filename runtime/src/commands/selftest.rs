//! `retouch selftest --device cuda:N`: every GPU kernel against its CPU implementation, then
//! (when all pass) the GEMM-shaped kernels' timings in GFLOP/s.
//!
//! `--group NAME` runs some check groups only and `--timings` only the timings, so a script can
//! run each in its own process: a kernel that faults poisons its CUDA context, and would
//! otherwise hide every later result.

use clap::Args;
use retouch_kernels::Device;
use retouch_kernels::cuda::{CudaDevice, selftest};

use super::random_model::PresetArg;
use super::selftest_unet;
use retouch_models::random_pipeline::Preset;

/// The whole dense UNet on the GPU against the host (after the kernel groups).
const UNET_GROUP: &str = "unet";

#[derive(Args)]
pub struct SelftestArgs {
    /// The CUDA device to check against the CPU (`cuda:N`).
    #[arg(long, default_value = "cuda:0")]
    device: Device,
    /// Run only these check groups (repeatable): elementwise, norms, rows, layout, lora,
    /// attention, gemm, conv, masked_conv, unet (the dense UNet of the tiny and sd15 presets
    /// on the GPU against the host, and the sd15 step's time). Without it every group runs,
    /// then the timings if all pass.
    #[arg(long = "group", value_name = "NAME")]
    groups: Vec<String>,
    /// The presets the unet group checks (repeatable) [default: tiny, sd15]. Tiny alone
    /// checks every device path in seconds; sd15 adds the timings the targets are set in.
    #[arg(long = "unet-preset", value_enum, value_name = "PRESET")]
    unet_presets: Vec<PresetArg>,
    /// Skip the checks and only time the GEMM-shaped kernels.
    #[arg(long, conflicts_with = "groups")]
    timings: bool,
}

pub fn run(args: SelftestArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.device == Device::Cpu {
        return Err("selftest compares a CUDA device with the CPU: give --device cuda:N".into());
    }
    for g in &args.groups {
        if !selftest::GROUPS.contains(&g.as_str()) && g != UNET_GROUP {
            return Err(format!(
                "unknown selftest group {g:?}; groups: {}, {UNET_GROUP}",
                selftest::GROUPS.join(", ")
            )
            .into());
        }
    }
    let dev = CudaDevice::for_device(args.device)?;
    println!("device: {}", dev.describe());
    if args.timings {
        print_timings(&dev)?;
        return Ok(());
    }
    let groups: Vec<&str> = if args.groups.is_empty() {
        selftest::GROUPS
            .iter()
            .copied()
            .chain([UNET_GROUP])
            .collect()
    } else {
        args.groups.iter().map(String::as_str).collect()
    };
    println!(
        "{:<16} {:<22} {:>12} {:>10}  result",
        "op", "size", "max err", "tolerance"
    );
    let mut total = 0;
    let mut failed = 0;
    for group in groups {
        if group == UNET_GROUP {
            let presets: Vec<Preset> = if args.unet_presets.is_empty() {
                selftest_unet::PRESETS.to_vec()
            } else {
                args.unet_presets.iter().map(|&p| p.into()).collect()
            };
            let (checks, failures) = selftest_unet::run(&dev, &presets)?;
            total += checks;
            failed += failures;
            continue;
        }
        // One group at a time, printed as it finishes, so a later fault keeps earlier lines.
        let checks = selftest::run_groups(&dev, &[group])
            .map_err(|e| format!("selftest group {group}: {e}"))?;
        for c in &checks {
            println!(
                "{:<16} {:<22} {:>12.3e} {:>10.1e}  {}",
                c.op,
                c.size,
                c.max_err,
                c.tolerance,
                if c.passed() { "PASS" } else { "FAIL" }
            );
        }
        total += checks.len();
        failed += checks.iter().filter(|c| !c.passed()).count();
    }
    println!("{total} checks, {failed} failed");
    if failed > 0 {
        return Err(format!("{failed} of {total} GPU kernel checks failed").into());
    }
    if args.groups.is_empty() {
        // Timings only when every kernel passed (a wrong kernel's speed means nothing).
        println!();
        print_timings(&dev)?;
    }
    Ok(())
}

fn print_timings(dev: &CudaDevice) -> Result<(), Box<dyn std::error::Error>> {
    println!("{:<16} {:<34} {:>10} {:>10}", "op", "size", "ms", "GFLOP/s");
    for t in selftest::timings(dev)? {
        println!(
            "{:<16} {:<34} {:>10.3} {:>10.0}",
            t.op, t.size, t.ms, t.gflops
        );
    }
    Ok(())
}
