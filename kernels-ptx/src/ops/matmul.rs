use crate::cpu::gemm::{MatRef, Threads, sgemm};
use crate::error::shape_err;
use crate::{Result, Tensor};

impl Tensor {
    /// `x * weight^T + bias` over the last dimension: `x = [..., in]`, `weight = [out, in]`
    /// (PyTorch's layout), `bias = [out]`; returns `[..., out]`.
    pub fn linear(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        const OP: &str = "linear";
        weight.check_rank(OP, 2)?;
        let (out_f, in_f) = (weight.shape()[0], weight.shape()[1]);
        if self.rank() == 0 || self.dim(-1)? != in_f {
            return shape_err(
                OP,
                format!("input {:?} does not end in {in_f} features", self.shape()),
            );
        }
        let x = self.f32s(OP)?;
        let w = weight.f32s(OP)?;
        let rows = self.elem_count() / in_f.max(1);
        let mut out = vec![0.0f32; rows * out_f];
        if let Some(bias) = bias {
            if bias.shape() != [out_f] {
                return shape_err(
                    OP,
                    format!("bias {:?} does not match {out_f} outputs", bias.shape()),
                );
            }
            let b = bias.f32s(OP)?;
            out.chunks_exact_mut(out_f.max(1))
                .for_each(|row| row.copy_from_slice(b));
        }
        sgemm(
            rows,
            out_f,
            in_f,
            &mut out,
            out_f,
            MatRef::rows(x, in_f),
            MatRef::transposed(w, in_f),
            bias.is_some(),
            1.0,
            Threads::Pool,
        );
        let mut shape = self.shape().to_vec();
        *shape.last_mut().unwrap() = out_f;
        Ok(Tensor::from_f32_unchecked(out, &shape))
    }

    /// Matrix product `[m, k] x [k, n]`, or batched `[b, m, k] x [b, k, n]`.
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.batched_matmul(rhs, false)
    }

    /// `[b, m, k] x [b, n, k]^T` (or unbatched): the product with the right side transposed.
    pub fn matmul_t(&self, rhs: &Tensor) -> Result<Tensor> {
        self.batched_matmul(rhs, true)
    }

    fn batched_matmul(&self, rhs: &Tensor, rhs_transposed: bool) -> Result<Tensor> {
        const OP: &str = "matmul";
        let (a, b) = (self.shape(), rhs.shape());
        let ok_rank = (a.len() == 2 && b.len() == 2) || (a.len() == 3 && b.len() == 3);
        if !ok_rank || (a.len() == 3 && a[0] != b[0]) {
            return shape_err(OP, format!("cannot multiply {a:?} by {b:?}"));
        }
        let batch = if a.len() == 3 { a[0] } else { 1 };
        let (m, k) = (a[a.len() - 2], a[a.len() - 1]);
        let (k2, n) = if rhs_transposed {
            (b[b.len() - 1], b[b.len() - 2])
        } else {
            (b[b.len() - 2], b[b.len() - 1])
        };
        if k != k2 {
            return shape_err(OP, format!("inner dimensions differ: {a:?} x {b:?}"));
        }
        let (x, y) = (self.f32s(OP)?, rhs.f32s(OP)?);
        let mut out = vec![0.0f32; batch * m * n];
        for i in 0..batch {
            let y_i = &y[i * k * n..(i + 1) * k * n];
            let rhs_view = if rhs_transposed {
                MatRef::transposed(y_i, k)
            } else {
                MatRef::rows(y_i, n)
            };
            sgemm(
                m,
                n,
                k,
                &mut out[i * m * n..(i + 1) * m * n],
                n,
                MatRef::rows(&x[i * m * k..(i + 1) * m * k], k),
                rhs_view,
                false,
                1.0,
                Threads::Pool,
            );
        }
        let shape = if a.len() == 3 {
            vec![batch, m, n]
        } else {
            vec![m, n]
        };
        Ok(Tensor::from_f32_unchecked(out, &shape))
    }
}
