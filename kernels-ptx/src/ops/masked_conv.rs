use crate::cpu::conv::{MaskedInput, OutRow, conv_rows};
use crate::error::{invalid, shape_err};
use crate::tensor::CpuStorage;
use crate::{Conv2dParams, Conv2dWeight, FloatElement, Result, Tensor, TokenSet};

/// One request of a masked convolution.
pub struct MaskedConvSegment<'a> {
    /// Fresh input rows `[active.len(), cin]`, in the order of `active`'s positions.
    pub fresh: &'a Tensor,
    /// The active positions of the input grid.
    pub active: &'a TokenSet,
    /// The template's cached input map, `in_h * in_w` rows of `cin` (f32, f16 or bf16).
    pub cached: &'a Tensor,
    /// The output positions to compute, on the output grid.
    pub outputs: &'a TokenSet,
}

impl Conv2dWeight {
    /// Convolution at selected output positions only, over a ragged batch of requests. Each
    /// neighbour is read from the request's fresh rows if its position is active, else from
    /// the cached map. Returns the output rows of all segments stacked: `[sum outputs, cout]`.
    pub fn masked_conv2d(
        &self,
        segments: &[MaskedConvSegment<'_>],
        params: Conv2dParams,
    ) -> Result<Tensor> {
        const OP: &str = "masked_conv2d";
        let Some(first) = segments.first() else {
            return Ok(Tensor::from_f32_unchecked(
                Vec::new(),
                &[0, self.out_channels()],
            ));
        };
        let cin = self.in_channels();
        let (in_h, in_w) = (first.active.height(), first.active.width());
        let g = self.geometry(OP, in_h, in_w, params)?;
        let cache_dtype = first.cached.dtype();
        for (i, s) in segments.iter().enumerate() {
            let (fresh, cached) = (s.fresh.shape(), s.cached.shape());
            let grids = ((in_h, in_w), (g.out_h(), g.out_w()));
            check_segment(OP, i, s.active, s.outputs, fresh, cached, cin, grids)?;
            if s.cached.dtype() != cache_dtype {
                return invalid(OP, "all segments' caches must share one dtype");
            }
        }
        let rows: Vec<OutRow> = segments
            .iter()
            .enumerate()
            .flat_map(|(i, s)| {
                s.outputs.positions().iter().map(move |&position| OutRow {
                    input: i as u32,
                    position,
                })
            })
            .collect();
        let mut out = vec![0.0f32; rows.len() * g.cout];
        fn run<C: FloatElement + crate::TensorElement>(
            segments: &[MaskedConvSegment<'_>],
            w: &Conv2dWeight,
            g: &crate::cpu::conv::ConvGeometry,
            rows: &[OutRow],
            out: &mut [f32],
        ) -> Result<()> {
            let mut inputs = Vec::with_capacity(segments.len());
            for s in segments {
                inputs.push(MaskedInput {
                    fresh: s.fresh.f32s("masked_conv2d")?,
                    row_of: s.active.row_of(),
                    cached: slice::<C>(s.cached),
                    cin: g.cin,
                });
            }
            conv_rows(g, &inputs, rows, w.packed(), w.bias(), out);
            Ok(())
        }
        match first.cached.cpu_storage() {
            CpuStorage::F32(_) => run::<f32>(segments, self, &g, &rows, &mut out)?,
            CpuStorage::F16(_) => run::<half::f16>(segments, self, &g, &rows, &mut out)?,
            CpuStorage::BF16(_) => run::<half::bf16>(segments, self, &g, &rows, &mut out)?,
            CpuStorage::I64(_) => return invalid(OP, "the cached map must be a float tensor"),
        }
        Ok(Tensor::from_f32_unchecked(out, &[rows.len(), g.cout]))
    }
}

/// The data of a tensor whose dtype the caller has matched already.
pub(crate) fn slice<C: crate::tensor::TensorElement>(t: &Tensor) -> &[C] {
    t.as_slice::<C>().expect("dtype checked by the caller")
}

/// The checks each segment of a masked conv passes, on the CPU or a device: its input grid is
/// the batch's (`grids.0`), its fresh rows are `[active.len(), cin]`, its cached map holds the
/// whole grid, and its outputs lie on the conv's output grid (`grids.1`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_segment(
    op: &'static str,
    i: usize,
    active: &TokenSet,
    outputs: &TokenSet,
    fresh: &[usize],
    cached: &[usize],
    cin: usize,
    (in_hw, out_hw): ((usize, usize), (usize, usize)),
) -> Result<()> {
    let (in_h, in_w) = in_hw;
    if (active.height(), active.width()) != in_hw {
        return shape_err(op, format!("segment {i}: input grids differ"));
    }
    if fresh != [active.len(), cin] {
        return shape_err(
            op,
            format!(
                "segment {i}: fresh rows {fresh:?}, expected [{}, {cin}]",
                active.len()
            ),
        );
    }
    if cached.iter().product::<usize>() != in_h * in_w * cin {
        return shape_err(
            op,
            format!("segment {i}: cached map {cached:?} is not {in_h}x{in_w}x{cin}"),
        );
    }
    if (outputs.height(), outputs.width()) != out_hw {
        return shape_err(
            op,
            format!(
                "segment {i}: output grid {}x{}, expected {}x{}",
                outputs.height(),
                outputs.width(),
                out_hw.0,
                out_hw.1
            ),
        );
    }
    Ok(())
}
