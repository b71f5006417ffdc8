use crate::cpu::conv::{ConvGeometry, DenseInput, OutRow, conv_rows};
use crate::cpu::gemm::{MatRef, Threads, sgemm};
use crate::error::{invalid, shape_err};
use crate::{Result, Tensor};

/// Stride and zero padding of a 2-D convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dParams {
    pub stride: usize,
    pub padding: usize,
}

impl Conv2dParams {
    pub const SAME_3X3: Conv2dParams = Conv2dParams {
        stride: 1,
        padding: 1,
    };
    pub const DOWN_3X3: Conv2dParams = Conv2dParams {
        stride: 2,
        padding: 1,
    };
    pub const POINTWISE: Conv2dParams = Conv2dParams {
        stride: 1,
        padding: 0,
    };
}

/// A conv layer's weight packed for channels-last im2col: `[kh * kw * cin, cout]` (rows
/// ordered by (ky, kx, ci)), plus the optional bias. Packed once at load time.
#[derive(Clone, Debug)]
pub struct Conv2dWeight {
    packed: Tensor,
    bias: Option<Tensor>,
    kh: usize,
    kw: usize,
    cin: usize,
    cout: usize,
}

impl Conv2dWeight {
    /// From PyTorch's `[cout, cin, kh, kw]` weight and `[cout]` bias (any float dtype).
    pub fn from_oihw(weight: &Tensor, bias: Option<&Tensor>) -> Result<Conv2dWeight> {
        const OP: &str = "conv2d_weight";
        weight.check_rank(OP, 4)?;
        let &[cout, cin, kh, kw] = weight.shape() else {
            unreachable!()
        };
        if cout == 0 || cin == 0 || kh == 0 || kw == 0 {
            return invalid(OP, format!("empty weight {:?}", weight.shape()));
        }
        let w = weight.to_vec_f32();
        let mut packed = vec![0.0f32; w.len()];
        for co in 0..cout {
            for ci in 0..cin {
                for ky in 0..kh {
                    for kx in 0..kw {
                        let src = ((co * cin + ci) * kh + ky) * kw + kx;
                        let dst = ((ky * kw + kx) * cin + ci) * cout + co;
                        packed[dst] = w[src];
                    }
                }
            }
        }
        let bias = match bias {
            Some(b) if b.shape() != [cout] => {
                return shape_err(
                    OP,
                    format!("bias {:?} does not match {cout} outputs", b.shape()),
                );
            }
            Some(b) => Some(b.to_dtype(crate::DType::F32)?),
            None => None,
        };
        Ok(Conv2dWeight {
            packed: Tensor::from_f32_unchecked(packed, &[kh * kw * cin, cout]),
            bias,
            kh,
            kw,
            cin,
            cout,
        })
    }

    pub fn in_channels(&self) -> usize {
        self.cin
    }

    pub fn out_channels(&self) -> usize {
        self.cout
    }

    pub fn kernel_size(&self) -> (usize, usize) {
        (self.kh, self.kw)
    }

    pub(crate) fn packed(&self) -> &[f32] {
        self.packed
            .f32s("conv2d")
            .expect("packed conv weight is f32")
    }

    pub(crate) fn bias(&self) -> Option<&[f32]> {
        self.bias
            .as_ref()
            .map(|b| b.f32s("conv2d").expect("conv bias is f32"))
    }

    pub(crate) fn geometry(
        &self,
        op: &'static str,
        in_h: usize,
        in_w: usize,
        p: Conv2dParams,
    ) -> Result<ConvGeometry> {
        conv_geometry(op, self.kh, self.kw, self.cin, self.cout, in_h, in_w, p)
    }
}

/// The geometry of a `kh x kw`, `cin -> cout` conv over an `in_h x in_w` input, after the
/// checks every conv (CPU or device) makes: stride at least 1, input no smaller than the
/// padded kernel.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_geometry(
    op: &'static str,
    kh: usize,
    kw: usize,
    cin: usize,
    cout: usize,
    in_h: usize,
    in_w: usize,
    p: Conv2dParams,
) -> Result<ConvGeometry> {
    if p.stride == 0 {
        return invalid(op, "stride must be at least 1");
    }
    if in_h + 2 * p.padding < kh || in_w + 2 * p.padding < kw {
        return shape_err(
            op,
            format!("{in_h}x{in_w} input is smaller than the {kh}x{kw} kernel"),
        );
    }
    Ok(ConvGeometry {
        in_h,
        in_w,
        cin,
        cout,
        kh,
        kw,
        stride: p.stride,
        pad: p.padding,
    })
}

impl Tensor {
    /// 2-D convolution of a channels-last `[batch, h, w, cin]` map: `[batch, oh, ow, cout]`.
    pub fn conv2d(&self, weight: &Conv2dWeight, params: Conv2dParams) -> Result<Tensor> {
        const OP: &str = "conv2d";
        self.check_rank(OP, 4)?;
        let &[batch, h, w, cin] = self.shape() else {
            unreachable!()
        };
        if cin != weight.cin {
            return shape_err(
                OP,
                format!("input has {cin} channels, weight expects {}", weight.cin),
            );
        }
        let g = weight.geometry(OP, h, w, params)?;
        let x = self.f32s(OP)?;
        let (oh, ow) = (g.out_h(), g.out_w());
        let mut out = vec![0.0f32; batch * oh * ow * g.cout];
        if g.kh == 1 && g.kw == 1 && g.stride == 1 && g.pad == 0 {
            // Pointwise: the map already is the im2col matrix.
            if let Some(b) = weight.bias() {
                out.chunks_exact_mut(g.cout)
                    .for_each(|r| r.copy_from_slice(b));
            }
            sgemm(
                batch * h * w,
                g.cout,
                cin,
                &mut out,
                g.cout,
                MatRef::rows(x, cin),
                MatRef::rows(weight.packed(), g.cout),
                weight.bias.is_some(),
                1.0,
                Threads::Pool,
            );
        } else {
            let per_image = h * w * cin;
            let inputs: Vec<DenseInput<'_>> = (0..batch)
                .map(|b| DenseInput {
                    data: &x[b * per_image..(b + 1) * per_image],
                    cin,
                })
                .collect();
            let rows: Vec<OutRow> = (0..batch as u32)
                .flat_map(|b| {
                    (0..(oh * ow) as u32).map(move |position| OutRow { input: b, position })
                })
                .collect();
            conv_rows(&g, &inputs, &rows, weight.packed(), weight.bias(), &mut out);
        }
        Ok(Tensor::from_f32_unchecked(out, &[batch, oh, ow, g.cout]))
    }
}
