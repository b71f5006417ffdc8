//! Networks over the kernel layer: UNet2DCondition, AutoencoderKL, the CLIP text encoder and
//! tokenizer, schedulers, diffusers-format loading and (to come) masked execution.
//!
//! Every network computes in f32 on channels-last tensors (see the kernel layer); weights are
//! read from diffusers-format folders as published, fp32 or fp16.

pub mod assets;
pub mod classifier;
pub mod clip;
mod error;
pub mod nn;
pub mod pipeline;
pub mod random_pipeline;
pub mod schedulers;
pub mod shape_box;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

pub use error::{Error, Result};
pub use retouch_kernels as kernels;
