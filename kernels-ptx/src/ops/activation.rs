use crate::cpu::activation::{self, Activation};
use crate::cpu::softmax;
use crate::error::shape_err;
use crate::{Result, Tensor};

impl Tensor {
    fn activated(&self, op: &'static str, act: Activation) -> Result<Tensor> {
        let mut data = self.f32s(op)?.to_vec();
        activation::activate_in_place(&mut data, act);
        Ok(Tensor::from_f32_unchecked(data, self.shape()))
    }

    pub fn relu(&self) -> Result<Tensor> {
        self.activated("relu", Activation::Relu)
    }

    pub fn silu(&self) -> Result<Tensor> {
        self.activated("silu", Activation::Silu)
    }

    /// Exact (erf) GELU.
    pub fn gelu(&self) -> Result<Tensor> {
        self.activated("gelu", Activation::Gelu)
    }

    /// tanh-approximated GELU.
    pub fn gelu_tanh(&self) -> Result<Tensor> {
        self.activated("gelu_tanh", Activation::GeluTanh)
    }

    /// CLIP's `x * sigmoid(1.702 x)`.
    pub fn quick_gelu(&self) -> Result<Tensor> {
        self.activated("quick_gelu", Activation::QuickGelu)
    }

    /// GEGLU: the last dimension splits into (hidden, gate); returns `hidden * gelu(gate)`.
    pub fn geglu(&self) -> Result<Tensor> {
        const OP: &str = "geglu";
        let last = self.dim(-1)?;
        if last % 2 != 0 {
            return shape_err(OP, format!("last dimension {last} is odd"));
        }
        let half = last / 2;
        let mut out = vec![0.0f32; self.elem_count() / 2];
        activation::geglu(self.f32s(OP)?, &mut out, half);
        let mut shape = self.shape().to_vec();
        *shape.last_mut().unwrap() = half;
        Ok(Tensor::from_f32_unchecked(out, &shape))
    }

    /// Softmax over the last dimension.
    pub fn softmax_last_dim(&self) -> Result<Tensor> {
        let len = self.dim(-1)?;
        let mut data = self.f32s("softmax")?.to_vec();
        softmax::softmax_last_dim(&mut data, len);
        Ok(Tensor::from_f32_unchecked(data, self.shape()))
    }
}
