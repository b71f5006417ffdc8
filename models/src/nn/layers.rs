use std::sync::OnceLock;

use half::f16;
#[cfg(doc)]
use retouch_kernels::cuda::GemmBackend;
use retouch_kernels::cuda::{CudaConv2dWeight, CudaDevice, CudaMaskedConvSegment, CudaTensor};
use retouch_kernels::{Conv2dParams, Conv2dWeight, MaskedConvSegment, Tensor};

use super::Scope;
use super::exec::{CacheEntry, Exec, per_batch_rows};
use super::gpu::{GpuMasked, on_device, upload_f32};
use crate::Result;

/// `x * W^T + b` over the last dimension.
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    /// The weight and bias in device memory, once uploaded.
    gpu: Option<(CudaTensor, Option<CudaTensor>)>,
    /// The device weight rounded to f16, made on the first forward with f16 products
    /// ([`GemmBackend::f16_products`]) and dropped whenever the device weight may change.
    gpu_f16: OnceLock<CudaTensor<f16>>,
}

impl Linear {
    pub fn load(s: Scope<'_>, inp: usize, out: usize, bias: bool) -> Result<Linear> {
        Ok(Linear {
            weight: s.get("weight", &[out, inp])?,
            bias: if bias {
                Some(s.get("bias", &[out])?)
            } else {
                None
            },
            gpu: None,
            gpu_f16: OnceLock::new(),
        })
    }

    /// A 1x1 convolution's weight `[out, in, 1, 1]` used as a linear layer on token rows.
    pub fn load_pointwise_conv(s: Scope<'_>, inp: usize, out: usize) -> Result<Linear> {
        Ok(Linear {
            weight: s.get("weight", &[out, inp, 1, 1])?.reshape(&[out, inp])?,
            bias: Some(s.get("bias", &[out])?),
            gpu: None,
            gpu_f16: OnceLock::new(),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.linear(&self.weight, self.bias.as_ref())?)
    }

    /// Copies the weights to `dev` (again after a LoRA patch of the host weights).
    pub fn upload(&mut self, dev: &CudaDevice) -> Result<()> {
        let bias = self.bias.as_ref().map(|b| upload_f32(dev, b)).transpose()?;
        self.gpu = Some((upload_f32(dev, &self.weight)?, bias));
        self.gpu_f16.take();
        Ok(())
    }

    /// The dense forward on the device the weights were uploaded to (with f16 GEMMs, on the
    /// weight's f16 copy, rounded once).
    pub fn forward_gpu(&self, dev: &CudaDevice, x: &CudaTensor) -> Result<CudaTensor> {
        self.forward_gpu_with(dev, x, None, None)
    }

    /// [`Linear::forward_gpu`] with `bias` in place of the layer's own.
    pub fn forward_gpu_bias(
        &self,
        dev: &CudaDevice,
        x: &CudaTensor,
        bias: &CudaTensor,
    ) -> Result<CudaTensor> {
        self.forward_gpu_with(dev, x, Some(bias), None)
    }

    /// The layer's bias in device memory, once uploaded (if it has one).
    pub fn gpu_bias(&self) -> Option<&CudaTensor> {
        self.gpu.as_ref().and_then(|(_, b)| b.as_ref())
    }

    /// [`Linear::forward_gpu`] plus `residual` (laid out as the output), added as the
    /// product is written: a residual connection without a launch of its own.
    pub fn forward_gpu_add(
        &self,
        dev: &CudaDevice,
        x: &CudaTensor,
        residual: &CudaTensor,
    ) -> Result<CudaTensor> {
        self.forward_gpu_with(dev, x, None, Some(residual))
    }

    /// The device forward with the layer's bias, or `bias` in its place, plus `residual`.
    fn forward_gpu_with(
        &self,
        dev: &CudaDevice,
        x: &CudaTensor,
        bias: Option<&CudaTensor>,
        residual: Option<&CudaTensor>,
    ) -> Result<CudaTensor> {
        let (w, own) = on_device(self.gpu.as_ref(), "linear")?;
        let b = bias.or(own.as_ref());
        if dev.gemm_backend().f16_products() {
            let half = match self.gpu_f16.get() {
                Some(half) => half,
                None => {
                    let half = dev.f32_to_f16(w)?;
                    self.gpu_f16.get_or_init(|| half)
                }
            };
            return Ok(match residual {
                Some(r) => dev.linear_f16_weight_add(x, half, b, r)?,
                None => dev.linear_f16_weight(x, half, b)?,
            });
        }
        Ok(match residual {
            Some(r) => dev.linear_add(x, w, b, r)?,
            None => dev.linear(x, w, b)?,
        })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn weight_mut(&mut self) -> &mut Tensor {
        &mut self.weight
    }

    /// The device copy of the weight, once uploaded (what a device-side LoRA patch changes);
    /// its f16 copy is dropped, to be rounded again from the changed weight.
    pub fn gpu_weight_mut(&mut self) -> Option<&mut CudaTensor> {
        self.gpu_f16.take();
        self.gpu.as_mut().map(|(w, _)| w)
    }
}

/// What a device conv adds besides its product and the weight's bias.
#[derive(Clone, Copy)]
pub enum ConvExtra<'a> {
    Nothing,
    /// A residual laid out as the output.
    Residual(&'a CudaTensor),
    /// A bias per sample (or segment) `[samples, out]` in place of the weight's.
    SampleBias(&'a CudaTensor),
}

/// A 2-D convolution on channels-last maps.
pub struct Conv2d {
    weight: Conv2dWeight,
    params: Conv2dParams,
    gpu: Option<CudaConv2dWeight>,
}

impl Conv2d {
    pub fn load(
        s: Scope<'_>,
        inp: usize,
        out: usize,
        kernel: usize,
        params: Conv2dParams,
    ) -> Result<Conv2d> {
        let w = s.get("weight", &[out, inp, kernel, kernel])?;
        let b = s.get("bias", &[out])?;
        Ok(Conv2d {
            weight: Conv2dWeight::from_oihw(&w, Some(&b))?,
            params,
            gpu: None,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.conv2d(&self.weight, self.params)?)
    }

    pub fn upload(&mut self, dev: &CudaDevice) -> Result<()> {
        self.gpu = Some(CudaConv2dWeight::upload(dev, &self.weight)?);
        Ok(())
    }

    /// The dense conv of a channels-last map on the device.
    pub fn forward_gpu(&self, dev: &CudaDevice, x: &CudaTensor) -> Result<CudaTensor> {
        let w = on_device(self.gpu.as_ref(), "conv2d")?;
        Ok(dev.conv2d(x, w, self.params)?)
    }

    /// [`Conv2d::forward_gpu`] plus `residual` (shaped as the output), added as the output
    /// is written.
    pub fn forward_gpu_add(
        &self,
        dev: &CudaDevice,
        x: &CudaTensor,
        residual: &CudaTensor,
    ) -> Result<CudaTensor> {
        let w = on_device(self.gpu.as_ref(), "conv2d")?;
        Ok(dev.conv2d_add(x, w, self.params, residual)?)
    }

    /// [`Conv2d::forward_gpu`] with a bias per sample `[batch, out]` in place of the conv's
    /// own (which the caller folds in).
    pub fn forward_gpu_sample_bias(
        &self,
        dev: &CudaDevice,
        x: &CudaTensor,
        bias: &CudaTensor,
    ) -> Result<CudaTensor> {
        let w = on_device(self.gpu.as_ref(), "conv2d")?;
        Ok(dev.conv2d_sample_bias(x, w, self.params, bias)?)
    }

    /// The conv's bias in device memory, once uploaded (if it has one).
    pub fn gpu_bias(&self) -> Option<&CudaTensor> {
        self.gpu.as_ref().and_then(CudaConv2dWeight::bias)
    }

    /// [`Conv2d::forward_exec`]'s masked case on the device: `x = [rows, cin]`, the
    /// segments' active rows stacked; outputs at `out_level`'s positions (the current
    /// level when None), stacked the same way, with what `extra` adds: the output rows'
    /// residual (stacked the same way), or a bias per segment `[segments, out]` in place of
    /// the conv's own.
    pub fn forward_gpu_masked(
        &self,
        dev: &CudaDevice,
        x: &CudaTensor,
        m: &mut GpuMasked<'_>,
        out_level: Option<usize>,
        extra: ConvExtra<'_>,
    ) -> Result<CudaTensor> {
        let w = on_device(self.gpu.as_ref(), "conv2d")?;
        let maps = m.conv_inputs()?;
        let host = m.host();
        let active = host.tokens()?;
        let outputs = host.level_tokens(out_level.unwrap_or(host.level()))?;
        let segments: Vec<CudaMaskedConvSegment<'_, _>> = maps
            .into_iter()
            .zip(active.into_iter().zip(outputs))
            .map(|(cached, (active, outputs))| CudaMaskedConvSegment {
                active,
                cached,
                outputs,
            })
            .collect();
        Ok(match extra {
            ConvExtra::Nothing => dev.masked_conv2d(w, x, &segments, self.params)?,
            ConvExtra::Residual(r) => dev.masked_conv2d_add(w, x, &segments, self.params, r)?,
            ConvExtra::SampleBias(b) => {
                dev.masked_conv2d_sample_bias(w, x, &segments, self.params, b)?
            }
        })
    }

    pub fn weight(&self) -> &Conv2dWeight {
        &self.weight
    }

    /// The conv in any mode. Masked: `x = [rows, cin]`, every segment's active rows at the
    /// current level stacked; outputs are computed at `out_level`'s positions (the current
    /// level when None), stacked the same way.
    pub fn forward_exec(
        &self,
        x: &Tensor,
        exec: &mut Exec<'_>,
        out_level: Option<usize>,
    ) -> Result<Tensor> {
        match exec {
            Exec::Dense => self.forward(x),
            Exec::Record { cache, dtype } => {
                cache
                    .entries
                    .push(CacheEntry::ConvInput(per_batch_rows(x, *dtype)?));
                self.forward(x)
            }
            Exec::Masked(m) => {
                let maps = m.conv_inputs()?;
                let active = m.tokens()?;
                let outputs = m.level_tokens(out_level.unwrap_or(m.level()))?;
                let fresh = x.split_batch(&m.rows()?)?;
                let segments: Vec<MaskedConvSegment<'_>> = fresh
                    .iter()
                    .zip(maps)
                    .zip(active.into_iter().zip(outputs))
                    .map(|((fresh, cached), (active, outputs))| MaskedConvSegment {
                        fresh,
                        active,
                        cached,
                        outputs,
                    })
                    .collect();
                Ok(self.weight.masked_conv2d(&segments, self.params)?)
            }
        }
    }

    pub fn params(&self) -> Conv2dParams {
        self.params
    }
}

/// Group norm over a channels-last tensor, optionally fused with SiLU.
pub struct GroupNorm {
    gamma: Tensor,
    beta: Tensor,
    groups: usize,
    eps: f32,
    gpu: Option<(CudaTensor, CudaTensor)>,
}

impl GroupNorm {
    pub fn load(s: Scope<'_>, channels: usize, groups: usize, eps: f32) -> Result<GroupNorm> {
        Ok(GroupNorm {
            gamma: s.get("weight", &[channels])?,
            beta: s.get("bias", &[channels])?,
            groups,
            eps,
            gpu: None,
        })
    }

    pub fn forward(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        Ok(x.group_norm(self.groups, &self.gamma, &self.beta, self.eps, silu)?)
    }

    pub fn upload(&mut self, dev: &CudaDevice) -> Result<()> {
        self.gpu = Some((upload_f32(dev, &self.gamma)?, upload_f32(dev, &self.beta)?));
        Ok(())
    }

    pub fn forward_gpu(&self, dev: &CudaDevice, x: &CudaTensor, silu: bool) -> Result<CudaTensor> {
        let (gamma, beta) = on_device(self.gpu.as_ref(), "group norm")?;
        Ok(dev.group_norm(x, self.groups, gamma, beta, self.eps, silu)?)
    }

    /// The masked norm on the device: every row of `x = [rows, c]` normalised with its
    /// segment's template statistics (each row is its own "sample" of one position).
    pub fn forward_gpu_masked(
        &self,
        dev: &CudaDevice,
        x: &CudaTensor,
        silu: bool,
        m: &mut GpuMasked<'_>,
    ) -> Result<CudaTensor> {
        let (gamma, beta) = on_device(self.gpu.as_ref(), "group norm")?;
        let (stats, segment_of_row) = m.segment_stats(dev, x, self.groups, self.eps)?;
        Ok(dev.group_norm_rows_with_stats(
            x,
            &stats,
            &segment_of_row,
            self.groups,
            gamma,
            beta,
            silu,
        )?)
    }

    /// The norm in any mode. Masked runs normalise each segment's rows with the statistics
    /// of the map it computes on: fresh rows in the active set, the template's values around.
    pub fn forward_exec(&self, x: &Tensor, silu: bool, exec: &mut Exec<'_>) -> Result<Tensor> {
        match exec {
            Exec::Dense => self.forward(x, silu),
            Exec::Record { cache, dtype } => {
                let stats = x.group_norm_stats(self.groups, self.eps)?;
                let y = x.group_norm_with_stats(&stats, self.groups, &self.gamma, &self.beta, silu);
                let moments = x.group_position_moments(self.groups, &stats)?;
                let moments = per_batch_rows(&moments, *dtype)?;
                cache.entries.push(CacheEntry::Stats { stats, moments });
                Ok(y?)
            }
            // Each segment's rows with the statistics of its blended map.
            Exec::Masked(m) => Ok(x.group_norm_with_stats_ragged(
                &m.rows()?,
                &m.blended_stats(x, self.groups, self.eps)?,
                self.groups,
                &self.gamma,
                &self.beta,
                silu,
            )?),
        }
    }
}

/// Layer norm over the last dimension.
pub struct LayerNorm {
    gamma: Tensor,
    beta: Tensor,
    eps: f32,
    gpu: Option<(CudaTensor, CudaTensor)>,
}

impl LayerNorm {
    pub fn load(s: Scope<'_>, channels: usize, eps: f32) -> Result<LayerNorm> {
        Ok(LayerNorm {
            gamma: s.get("weight", &[channels])?,
            beta: s.get("bias", &[channels])?,
            eps,
            gpu: None,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.layer_norm(&self.gamma, &self.beta, self.eps)?)
    }

    pub fn upload(&mut self, dev: &CudaDevice) -> Result<()> {
        self.gpu = Some((upload_f32(dev, &self.gamma)?, upload_f32(dev, &self.beta)?));
        Ok(())
    }

    pub fn forward_gpu(&self, dev: &CudaDevice, x: &CudaTensor) -> Result<CudaTensor> {
        let (gamma, beta) = on_device(self.gpu.as_ref(), "layer norm")?;
        Ok(dev.layer_norm(x, gamma, beta, self.eps)?)
    }
}

#[cfg(test)]
mod tests {
    use retouch_kernels::{DType, Device, Tensor, TokenSet};

    use super::GroupNorm;
    use crate::nn::Scope;
    use crate::nn::exec::{Exec, Masked, Segment, StepCache, StepSource};
    use crate::weights::Weights;

    /// A masked norm's rows are the dense norm of the blended map (the template with the
    /// fresh rows written in) at the active positions.
    #[test]
    fn masked_group_norm_normalises_with_the_blended_maps_statistics() {
        let weights = Weights::random(7);
        let norm = GroupNorm::load(Scope::root(&weights).at("norm").scope(), 12, 4, 1e-5).unwrap();
        let (h, w, c) = (5, 6, 12);
        let template = Tensor::randn(&[2, h, w, c], 1, Device::Cpu)
            .affine(0.8, 0.3)
            .unwrap();
        let mut cache = StepCache::default();
        let mut record = Exec::Record {
            cache: &mut cache,
            dtype: DType::F32,
        };
        norm.forward_exec(&template, true, &mut record).unwrap();
        let positions = vec![1, 7, 8, 20, 29];
        let levels = [TokenSet::from_positions(h, w, positions.clone()).unwrap()];
        let fresh = Tensor::randn(&[positions.len(), c], 2, Device::Cpu)
            .affine(2.0, -1.0)
            .unwrap();
        let segment = Segment {
            cache: StepSource::Whole(&cache),
            branch: 1,
            levels: &levels,
        };
        let mut masked = Exec::Masked(Masked::new(vec![segment]));
        let got = norm.forward_exec(&fresh, true, &mut masked).unwrap();

        let mut blended = template.split_batch(&[1, 1]).unwrap()[1]
            .clone()
            .reshape(&[h * w, c])
            .unwrap();
        blended.scatter_rows(&positions, &fresh).unwrap();
        let dense = norm
            .forward(&blended.reshape(&[1, h * w, c]).unwrap(), true)
            .unwrap();
        let want = dense
            .reshape(&[h * w, c])
            .unwrap()
            .gather_rows(&positions)
            .unwrap();
        for (i, (g, w)) in got.to_vec_f32().iter().zip(want.to_vec_f32()).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "element {i}: {g} vs {w}"
            );
        }
    }
}
