//! Networks over the kernel layer: UNet2DCondition, AutoencoderKL, the CLIP text encoder and
//! tokenizer, ControlNet and LoRA, schedulers, diffusers-format loading and masked execution.
//!
//! The networks land with the models issue; the crate exists now so that the workspace has
//! its final shape and the dependency direction (runtime -> models -> kernels) is fixed.

pub use retouch_kernels as kernels;
