//! `retouch`: Retouch's command-line entry point.

mod commands;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "retouch",
    version,
    about = "Retouch: a serving runtime for diffusion models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Time the kernels on a device: dense ops at SD1.5 shapes, and the masked ops against
    /// their dense versions at mask ratios 5-100%.
    Bench(commands::bench::BenchArgs),
    /// Run one model component (unet, vae-decode, vae-encode, text-encoder) on tensors from a
    /// safetensors file and write its output, for parity checks against diffusers.
    Forward(commands::forward::ForwardArgs),
    /// Print the padded CLIP token ids of a text as a JSON list.
    Tokenize(commands::tokenize::TokenizeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => commands::bench::run(args),
        Command::Forward(args) => commands::forward::run(args),
        Command::Tokenize(args) => commands::tokenize::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
