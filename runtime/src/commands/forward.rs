//! `retouch forward`: one model component on tensors from a safetensors file, for parity
//! checks against diffusers. Tensors use diffusers' names and layouts (NCHW images).

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use retouch_kernels::{SafeTensorsFile, Tensor, save_safetensors};
use retouch_models::clip::ClipTextEncoder;
use retouch_models::unet::UNet;
use retouch_models::vae::Vae;

#[derive(Clone, Copy, ValueEnum)]
enum Component {
    Unet,
    VaeDecode,
    VaeEncode,
    TextEncoder,
}

#[derive(Args)]
pub struct ForwardArgs {
    /// One component folder (config.json + weights) as diffusers saves it.
    #[arg(long)]
    model: PathBuf,
    #[arg(long, value_enum)]
    component: Component,
    /// Input tensors under diffusers' argument names.
    #[arg(long)]
    inputs: PathBuf,
    #[arg(long)]
    output: PathBuf,
}

fn input(file: &SafeTensorsFile, name: &str) -> Result<Tensor, Box<dyn std::error::Error>> {
    file.get(name)
        .map_err(|e| format!("input `{name}`: {e}").into())
}

pub fn run(args: ForwardArgs) -> Result<(), Box<dyn std::error::Error>> {
    let inputs = SafeTensorsFile::open(&args.inputs)?;
    let f32 = retouch_kernels::DType::F32;
    let (name, out) = match args.component {
        Component::Unet => {
            let unet = UNet::load(&args.model, None)?;
            let sample = input(&inputs, "sample")?.to_dtype(f32)?.nchw_to_nhwc()?;
            let timesteps = input(&inputs, "timestep")?.to_vec_f32();
            let context = input(&inputs, "encoder_hidden_states")?.to_dtype(f32)?;
            let batch = sample.shape()[0];
            // diffusers broadcasts a single timestep to the whole batch.
            let timesteps = match timesteps.len() {
                1 => vec![timesteps[0]; batch],
                _ => timesteps,
            };
            let out = unet.forward(&sample, &timesteps, &context)?;
            ("sample", out.nhwc_to_nchw()?)
        }
        Component::VaeDecode => {
            let vae = Vae::load(&args.model, None)?;
            let latents = input(&inputs, "latent_sample")?
                .to_dtype(f32)?
                .nchw_to_nhwc()?;
            ("sample", vae.decode(&latents)?.nhwc_to_nchw()?)
        }
        Component::VaeEncode => {
            let vae = Vae::load(&args.model, None)?;
            let image = input(&inputs, "sample")?.to_dtype(f32)?.nchw_to_nhwc()?;
            ("latent_mean", vae.encode_mean(&image)?.nhwc_to_nchw()?)
        }
        Component::TextEncoder => {
            let encoder = ClipTextEncoder::load(&args.model)?;
            let ids = input(&inputs, "input_ids")?;
            ("last_hidden_state", encoder.forward(&ids)?)
        }
    };
    save_safetensors(&args.output, [(name, &out)])?;
    Ok(())
}
