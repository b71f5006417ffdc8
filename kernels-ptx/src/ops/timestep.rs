use crate::cpu::timestep;
use crate::error::shape_err;
use crate::{Result, Tensor};

/// diffusers' `Timesteps` module: sinusoidal embedding of one timestep per sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TimestepEmbedding {
    pub dim: usize,
    pub flip_sin_to_cos: bool,
    pub downscale_freq_shift: f32,
    pub scale: f32,
    pub max_period: f32,
}

impl TimestepEmbedding {
    /// The UNet's settings: `[cos, sin]` order, shift 0 (diffusers' SD configs).
    pub fn unet(dim: usize) -> Self {
        TimestepEmbedding {
            dim,
            flip_sin_to_cos: true,
            downscale_freq_shift: 0.0,
            scale: 1.0,
            max_period: 10000.0,
        }
    }

    /// `timesteps = [batch]` (f32) -> `[batch, dim]`.
    pub fn embed(&self, timesteps: &Tensor) -> Result<Tensor> {
        const OP: &str = "timestep_embedding";
        if timesteps.rank() != 1 {
            return shape_err(
                OP,
                format!(
                    "expected one timestep per sample, got {:?}",
                    timesteps.shape()
                ),
            );
        }
        let t = timesteps.f32s(OP)?;
        let mut out = vec![0.0f32; t.len() * self.dim];
        timestep::timestep_embedding(
            t,
            self.dim,
            self.flip_sin_to_cos,
            self.downscale_freq_shift,
            self.scale,
            self.max_period,
            &mut out,
        );
        Ok(Tensor::from_f32_unchecked(out, &[t.len(), self.dim]))
    }
}
