use crate::cpu::elementwise::{self, BinaryOp};
use crate::error::shape_err;
use crate::{Result, Tensor};

/// NumPy broadcasting of two shapes, or `None` if they are incompatible.
fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let dim = |s: &[usize], i: usize| {
        if i < rank - s.len() {
            1
        } else {
            s[i - (rank - s.len())]
        }
    };
    (0..rank)
        .map(|i| match (dim(a, i), dim(b, i)) {
            (x, y) if x == y => Some(x),
            (1, y) => Some(y),
            (x, 1) => Some(x),
            _ => None,
        })
        .collect()
}

impl Tensor {
    fn binary(&self, rhs: &Tensor, op: BinaryOp, name: &'static str) -> Result<Tensor> {
        let Some(shape) = broadcast_shape(self.shape(), rhs.shape()) else {
            return shape_err(
                name,
                format!(
                    "shapes {:?} and {:?} do not broadcast",
                    self.shape(),
                    rhs.shape()
                ),
            );
        };
        let mut out = vec![0.0f32; shape.iter().product()];
        elementwise::binary(
            self.f32s(name)?,
            self.shape(),
            rhs.f32s(name)?,
            rhs.shape(),
            &mut out,
            &shape,
            op,
        );
        Ok(Tensor::from_f32_unchecked(out, &shape))
    }

    /// Elementwise sum with broadcasting.
    pub fn add(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Add, "add")
    }

    pub fn sub(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Sub, "sub")
    }

    pub fn mul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Mul, "mul")
    }

    pub fn div(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Div, "div")
    }

    /// `self * scale + shift`, elementwise.
    pub fn affine(&self, scale: f32, shift: f32) -> Result<Tensor> {
        let mut data = self.f32s("affine")?.to_vec();
        elementwise::affine_in_place(&mut data, scale, shift);
        Ok(Tensor::from_f32_unchecked(data, self.shape()))
    }
}

#[cfg(test)]
mod tests {
    use super::broadcast_shape;

    #[test]
    fn broadcasting_rules() {
        assert_eq!(broadcast_shape(&[2, 3], &[3]), Some(vec![2, 3]));
        assert_eq!(broadcast_shape(&[2, 1, 4], &[3, 1]), Some(vec![2, 3, 4]));
        assert_eq!(broadcast_shape(&[2, 3], &[4]), None);
    }
}
