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
    /// Retouch's main job on the built-in model: register a template, edit it inside a mask
    /// in cached and in dense mode, write the PNGs and a summary.
    Demo(commands::demo::DemoArgs),
    /// Time the kernels on a device: dense ops at SD1.5 shapes, and the masked ops against
    /// their dense versions at mask ratios 5-100%; or (--unet) a whole UNet step, dense and
    /// cached.
    Bench(commands::bench::BenchArgs),
    /// Run one model component (unet, vae-decode, vae-encode, text-encoder) on tensors from a
    /// safetensors file and write its output, for parity checks against diffusers.
    Forward(commands::forward::ForwardArgs),
    /// Text-to-image with classifier-free guidance; writes a PNG.
    Generate(commands::generate::GenerateArgs),
    /// Generate a template and register it on disk (latent trajectory and image) for edits.
    Template(commands::template::TemplateArgs),
    /// Edit a registered template inside a mask.
    Edit(commands::edit::EditArgs),
    /// Edit quality: cached-mode against dense-mode edits and the unmasked region against the
    /// template (PSNR, SSIM) per mask ratio; classifier-scored edits with the tiny model.
    Quality(commands::quality::QualityArgs),
    /// Print the padded CLIP token ids of a text as a JSON list.
    Tokenize(commands::tokenize::TokenizeArgs),
    /// Write a diffusers-format pipeline folder (sd15, sd21 or tiny) with random weights, for
    /// benchmarks and tests.
    RandomModel(commands::random_model::RandomModelArgs),
    /// Serve the HTTP API (templates, edits, generations, progress, health, metrics).
    Serve(commands::serve::ServeArgs),
    /// Drive an engine (or a server, --url) with a Poisson trace of edits of reused
    /// templates; report mean, P50 and P95 latency and throughput per arrival rate.
    Replay(commands::replay::ReplayArgs),
    /// Check every GPU kernel against the CPU on random inputs; non-zero exit on failure.
    Selftest(commands::selftest::SelftestArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => commands::demo::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::Forward(args) => commands::forward::run(args),
        Command::Tokenize(args) => commands::tokenize::run(args),
        Command::Generate(args) => commands::generate::run(args),
        Command::Template(args) => commands::template::run(args),
        Command::Edit(args) => commands::edit::run(args),
        Command::Quality(args) => commands::quality::run(args),
        Command::RandomModel(args) => commands::random_model::run(args),
        Command::Serve(args) => commands::serve::run(args),
        Command::Replay(args) => commands::replay::run(args),
        Command::Selftest(args) => commands::selftest::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
