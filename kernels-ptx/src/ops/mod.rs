//! The op API on [`crate::Tensor`]: shape and dtype checks, then dispatch on the device.

pub mod activation;
pub mod attention;
pub mod binary;
pub mod conv;
pub mod gather;
pub mod layout;
pub mod lora;
pub mod masked_conv;
pub mod matmul;
pub mod norm;
pub mod timestep;
