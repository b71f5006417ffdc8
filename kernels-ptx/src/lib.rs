//! Retouch's kernel layer: [`Tensor`], [`Device`] and every op the diffusion networks need.
//!
//! Layout conventions (see `docs/ARCHITECTURE.md`):
//! - images are channels-last, `[batch, height, width, channels]`, so a spatial map is also a
//!   matrix of token rows `[positions, channels]`; the sparse ops work on such rows;
//! - linear weights are PyTorch's `[out, in]`; conv weights are packed once into
//!   [`Conv2dWeight`] (`[kh * kw * cin, cout]`).
//!
//! Every op validates shapes and dtypes and returns [`Error`] instead of panicking.

pub mod bench;
pub mod cpu;
pub mod cuda;
mod device;
mod dtype;
mod error;
mod ops;
mod safetensors_io;
mod tensor;
mod tokens;

pub use cpu::norm::GroupStats;
pub use device::Device;
pub use dtype::{DType, FloatElement};
pub use error::{Error, Result};
pub use ops::attention::{AttentionSegment, RaggedSegment};
pub use ops::conv::{Conv2dParams, Conv2dWeight};
pub use ops::lora::{LoraBackup, LoraSegment};
pub use ops::masked_conv::MaskedConvSegment;
pub use ops::norm::BlendedSegment;
pub use ops::timestep::TimestepEmbedding;
pub use safetensors_io::{SafeTensorsFile, save_safetensors, save_safetensors_with_metadata};
pub use tensor::{Tensor, TensorElement};
pub use tokens::TokenSet;
