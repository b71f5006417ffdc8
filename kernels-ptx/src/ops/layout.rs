use crate::cpu::layout;
use crate::error::shape_err;
use crate::{Result, Tensor};

impl Tensor {
    /// Nearest-neighbour 2x up-sampling of `[batch, h, w, c]`.
    pub fn upsample_nearest2x(&self) -> Result<Tensor> {
        const OP: &str = "upsample_nearest2x";
        self.check_rank(OP, 4)?;
        let &[b, h, w, c] = self.shape() else {
            unreachable!()
        };
        let mut out = vec![0.0f32; b * 4 * h * w * c];
        layout::upsample_nearest2x(self.f32s(OP)?, &mut out, b, h, w, c);
        Ok(Tensor::from_f32_unchecked(out, &[b, 2 * h, 2 * w, c]))
    }

    /// Zero padding of a channels-last `[batch, h, w, c]` map by (top, bottom, left, right).
    pub fn pad2d(&self, top: usize, bottom: usize, left: usize, right: usize) -> Result<Tensor> {
        const OP: &str = "pad2d";
        self.check_rank(OP, 4)?;
        let &[b, h, w, c] = self.shape() else {
            unreachable!()
        };
        let (oh, ow) = (h + top + bottom, w + left + right);
        let mut out = vec![0.0f32; b * oh * ow * c];
        layout::pad2d(
            self.f32s(OP)?,
            &mut out,
            b,
            h,
            w,
            c,
            (top, bottom, left, right),
        );
        Ok(Tensor::from_f32_unchecked(out, &[b, oh, ow, c]))
    }

    /// Concatenates tensors along the last dimension; all other dimensions must agree.
    pub fn concat_last(parts: &[&Tensor]) -> Result<Tensor> {
        const OP: &str = "concat";
        let Some(first) = parts.first() else {
            return shape_err(OP, "nothing to concatenate");
        };
        let lead = &first.shape()[..first.rank().saturating_sub(1)];
        let mut views = Vec::with_capacity(parts.len());
        for p in parts {
            if p.rank() != first.rank() || &p.shape()[..p.rank() - 1] != lead {
                return shape_err(
                    OP,
                    format!("{:?} does not match {:?}", p.shape(), first.shape()),
                );
            }
            views.push((p.f32s(OP)?, p.dim(-1)?));
        }
        let rows: usize = lead.iter().product();
        let total: usize = views.iter().map(|v| v.1).sum();
        let mut out = vec![0.0f32; rows * total];
        layout::concat_columns(&views, &mut out, rows);
        let mut shape = lead.to_vec();
        shape.push(total);
        Ok(Tensor::from_f32_unchecked(out, &shape))
    }

    /// Stacks tensors along the first (batch) dimension; the other dimensions must agree.
    pub fn concat_batch(parts: &[&Tensor]) -> Result<Tensor> {
        const OP: &str = "concat_batch";
        let Some(first) = parts.first() else {
            return shape_err(OP, "nothing to concatenate");
        };
        if first.rank() == 0 {
            return shape_err(OP, "scalars have no batch dimension");
        }
        let inner = &first.shape()[1..];
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.elem_count()).sum());
        let mut batch = 0;
        for p in parts {
            if p.rank() != first.rank() || &p.shape()[1..] != inner {
                return shape_err(
                    OP,
                    format!("{:?} does not match {:?}", p.shape(), first.shape()),
                );
            }
            data.extend_from_slice(p.f32s(OP)?);
            batch += p.shape()[0];
        }
        let mut shape = vec![batch];
        shape.extend_from_slice(inner);
        Ok(Tensor::from_f32_unchecked(data, &shape))
    }

    /// Splits the first (batch) dimension into parts of the given sizes.
    pub fn split_batch(&self, sizes: &[usize]) -> Result<Vec<Tensor>> {
        const OP: &str = "split_batch";
        let batch = self.dim(0)?;
        if sizes.iter().sum::<usize>() != batch {
            return shape_err(OP, format!("sizes {sizes:?} do not add up to {batch}"));
        }
        let per = self.elem_count() / batch.max(1);
        let data = self.f32s(OP)?;
        let mut start = 0;
        let mut parts = Vec::with_capacity(sizes.len());
        for &n in sizes {
            let mut shape = self.shape().to_vec();
            shape[0] = n;
            parts.push(Tensor::from_f32_unchecked(
                data[start * per..(start + n) * per].to_vec(),
                &shape,
            ));
            start += n;
        }
        Ok(parts)
    }

    /// Splits the last dimension into parts of the given sizes.
    pub fn split_last(&self, sizes: &[usize]) -> Result<Vec<Tensor>> {
        const OP: &str = "split";
        let cols = self.dim(-1)?;
        if sizes.iter().sum::<usize>() != cols {
            return shape_err(OP, format!("sizes {sizes:?} do not add up to {cols}"));
        }
        let x = self.f32s(OP)?;
        let rows = self.elem_count() / cols.max(1);
        let mut start = 0;
        let mut parts = Vec::with_capacity(sizes.len());
        for &width in sizes {
            let mut out = vec![0.0f32; rows * width];
            layout::column_range(x, cols, start, width, &mut out);
            let mut shape = self.shape().to_vec();
            *shape.last_mut().unwrap() = width;
            parts.push(Tensor::from_f32_unchecked(out, &shape));
            start += width;
        }
        Ok(parts)
    }

    /// `[batch, c, h, w]` (PyTorch's layout) to channels-last `[batch, h, w, c]`.
    pub fn nchw_to_nhwc(&self) -> Result<Tensor> {
        const OP: &str = "nchw_to_nhwc";
        self.check_rank(OP, 4)?;
        let &[b, c, h, w] = self.shape() else {
            unreachable!()
        };
        let mut out = vec![0.0f32; self.elem_count()];
        layout::transpose_inner(self.f32s(OP)?, &mut out, b, c, h * w);
        Ok(Tensor::from_f32_unchecked(out, &[b, h, w, c]))
    }

    /// Channels-last `[batch, h, w, c]` to `[batch, c, h, w]`.
    pub fn nhwc_to_nchw(&self) -> Result<Tensor> {
        const OP: &str = "nhwc_to_nchw";
        self.check_rank(OP, 4)?;
        let &[b, h, w, c] = self.shape() else {
            unreachable!()
        };
        let mut out = vec![0.0f32; self.elem_count()];
        layout::transpose_inner(self.f32s(OP)?, &mut out, b, h * w, c);
        Ok(Tensor::from_f32_unchecked(out, &[b, c, h, w]))
    }
}
