//! `actor-trace`: reads a trace written by `retouch serve --trace FILE`.

use std::path::PathBuf;
use std::process::ExitCode;

use actor_trace::report::{Options, summary};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "actor-trace",
    version,
    about = "Reads Retouch's actor message traces (JSONL)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Per-request breakdown (queue, compute, cache loading, steps), per-actor utilisation
    /// and idle gaps, and batch composition over time.
    Summary {
        file: PathBuf,
        /// Idle gaps shorter than this are not counted.
        #[arg(long, default_value_t = 1.0)]
        min_gap_ms: f64,
        /// Width of the batch timeline's buckets; by default about 20 buckets.
        #[arg(long)]
        bucket_ms: Option<f64>,
    },
    /// Export Chrome trace event JSON (load it in Perfetto or chrome://tracing).
    Chrome {
        file: PathBuf,
        #[arg(short, long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("actor-trace: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Summary {
            file,
            min_gap_ms,
            bucket_ms,
        } => {
            let trace = actor_trace::read(&file)?;
            let opts = Options {
                min_gap_us: us("--min-gap-ms", min_gap_ms)?,
                bucket_us: bucket_ms.map(|b| us("--bucket-ms", b)).transpose()?,
            };
            print!("{}", summary(&trace, &opts));
            Ok(())
        }
        Command::Chrome { file, out } => {
            let trace = actor_trace::read(&file)?;
            let json = actor_trace::chrome::export(&trace.records);
            let text = serde_json::to_string(&json).map_err(|e| e.to_string())?;
            std::fs::write(&out, text).map_err(|e| format!("{}: {e}", out.display()))?;
            eprintln!(
                "wrote {} ({} records); open it in https://ui.perfetto.dev or chrome://tracing",
                out.display(),
                trace.records.len()
            );
            Ok(())
        }
    }
}

fn us(flag: &str, ms: f64) -> Result<u64, String> {
    if !(ms.is_finite() && ms >= 0.0) {
        return Err(format!(
            "{flag} must be a non-negative number of milliseconds"
        ));
    }
    Ok((ms * 1e3).round() as u64)
}
