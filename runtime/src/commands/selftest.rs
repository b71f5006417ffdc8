//! `retouch selftest --device cuda:N`: every GPU kernel against its CPU implementation, then
//! (when all pass) the GEMM-shaped kernels' timings in GFLOP/s.

use clap::Args;
use retouch_kernels::Device;
use retouch_kernels::cuda::{CudaDevice, selftest};

#[derive(Args)]
pub struct SelftestArgs {
    /// The CUDA device to check against the CPU (`cuda:N`).
    #[arg(long, default_value = "cuda:0")]
    device: Device,
}

pub fn run(args: SelftestArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.device == Device::Cpu {
        return Err("selftest compares a CUDA device with the CPU: give --device cuda:N".into());
    }
    let dev = CudaDevice::for_device(args.device)?;
    println!("device: {}", dev.describe());
    let checks = selftest::run(&dev)?;
    println!(
        "{:<16} {:<22} {:>12} {:>10}  result",
        "op", "size", "max err", "tolerance"
    );
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
    let failed = checks.iter().filter(|c| !c.passed()).count();
    println!("{} checks, {failed} failed", checks.len());
    if failed == 0 {
        // Timings only of kernels that passed (a wrong kernel's speed means nothing).
        println!();
        println!("{:<16} {:<34} {:>10} {:>10}", "op", "size", "ms", "GFLOP/s");
        for t in selftest::timings(&dev)? {
            println!(
                "{:<16} {:<34} {:>10.3} {:>10.0}",
                t.op, t.size, t.ms, t.gflops
            );
        }
    }
    if failed > 0 {
        return Err(format!("{failed} of {} GPU kernel checks failed", checks.len()).into());
    }
    Ok(())
}
