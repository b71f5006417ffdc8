//! Layers shared by the networks (diffusers' building blocks), over channels-last tensors.

mod attention;
pub mod exec;
pub mod gpu;
mod layers;
mod resnet;
mod scope;
mod transformer;

pub use attention::Attention;
pub use layers::{Conv2d, ConvExtra, GroupNorm, LayerNorm, Linear};
pub use resnet::{ResnetBlock, ResnetShape};
pub use scope::{Scope, ScopeBuf};
pub use transformer::{Transformer2D, TransformerShape};
