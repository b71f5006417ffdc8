//! Every CUDA kernel against its CPU implementation, on random inputs of awkward sizes
//! (rows 1, 7, 333; channels 3, 40, 77, 320, 1283; GEMMs m 1/7/333 x k 3/40/77/320 x n
//! 5/77/320; convs on 7x9 maps; concat, upsample and per-sample adds on 7x9 and 5x3 maps):
//! what `retouch selftest` runs. [`timings`] times the GEMM-shaped kernels at UNet sizes
//! (GFLOP/s).
//!
//! The error of an element is `|gpu - cpu| / max(1, |cpu|)`: absolute for values up to 1,
//! relative above, so one tolerance per op serves inputs of any scale.

use half::{bf16, f16};

use super::{
    AttentionKernel, CudaAttentionSegment, CudaBlendedSegment, CudaConv2dWeight, CudaDevice,
    CudaLoraSegment, CudaMaskedConvSegment, CudaTensor, GemmBackend, GpuElement,
    STAGING_BUDGET_BYTES, TABLE_RING_BYTES, tables::CHUNK_BYTES,
};
use crate::{
    AttentionSegment, Conv2dParams, Conv2dWeight, DType, Device, LoraSegment, MaskedConvSegment,
    RaggedSegment, Result, Tensor, TokenSet,
};

/// One op at one size.
#[derive(Clone, Debug)]
pub struct Check {
    pub op: &'static str,
    pub size: String,
    pub max_err: f32,
    pub tolerance: f32,
}

impl Check {
    /// NaN errors fail.
    pub fn passed(&self) -> bool {
        self.max_err <= self.tolerance
    }
}

/// Largest element error between two tensors (infinite if their shapes differ).
pub fn max_err(gpu: &Tensor, cpu: &Tensor) -> f32 {
    if gpu.shape() != cpu.shape() {
        return f32::INFINITY;
    }
    let (g, c) = (gpu.to_vec_f32(), cpu.to_vec_f32());
    g.iter().zip(&c).fold(0.0f32, |m, (&g, &c)| {
        let e = (g - c).abs() / c.abs().max(1.0);
        if e.is_nan() || m.is_nan() {
            f32::NAN
        } else {
            m.max(e)
        }
    })
}

/// `[2, 7, 9]` as `2x7x9` (with `sep` "x").
fn joined(dims: &[usize], sep: &str) -> String {
    dims.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(sep)
}

const ROWS: [usize; 3] = [1, 7, 333];
const COLS: [usize; 5] = [3, 40, 77, 320, 1283];

struct Runner<'a> {
    dev: &'a CudaDevice,
    checks: Vec<Check>,
    seed: u64,
}

impl Runner<'_> {
    fn randn(&mut self, shape: &[usize]) -> Tensor {
        self.seed += 1;
        Tensor::randn(shape, self.seed, Device::Cpu)
    }

    fn up(&self, t: &Tensor) -> Result<CudaTensor> {
        CudaTensor::upload(self.dev, t)
    }

    fn record(
        &mut self,
        op: &'static str,
        size: String,
        gpu: &CudaTensor,
        cpu: &Tensor,
        tol: f32,
    ) -> Result<()> {
        let gpu = gpu.download(self.dev)?;
        self.checks.push(Check {
            op,
            size,
            max_err: max_err(&gpu, cpu),
            tolerance: tol,
        });
        Ok(())
    }

    fn elementwise(&mut self) -> Result<()> {
        type Gpu = fn(&CudaDevice, &CudaTensor, &CudaTensor) -> Result<CudaTensor>;
        type Cpu = fn(&Tensor, &Tensor) -> Result<Tensor>;
        let binaries: [(&'static str, Gpu, Cpu); 4] = [
            ("add", CudaDevice::add, Tensor::add),
            ("sub", CudaDevice::sub, Tensor::sub),
            ("mul", CudaDevice::mul, Tensor::mul),
            ("div", CudaDevice::div, Tensor::div),
        ];
        type Un = fn(&CudaDevice, &CudaTensor) -> Result<CudaTensor>;
        type UnCpu = fn(&Tensor) -> Result<Tensor>;
        let unaries: [(&'static str, Un, UnCpu, f32); 6] = [
            ("relu", CudaDevice::relu, Tensor::relu, 0.0),
            ("silu", CudaDevice::silu, Tensor::silu, 1e-5),
            ("gelu", CudaDevice::gelu, Tensor::gelu, 1e-5),
            ("gelu_tanh", CudaDevice::gelu_tanh, Tensor::gelu_tanh, 1e-5),
            (
                "quick_gelu",
                CudaDevice::quick_gelu,
                Tensor::quick_gelu,
                1e-5,
            ),
            (
                "softmax",
                CudaDevice::softmax_last_dim,
                Tensor::softmax_last_dim,
                1e-5,
            ),
        ];
        for rows in ROWS {
            for cols in COLS {
                let size = format!("{rows}x{cols}");
                let a = self.randn(&[rows, cols]);
                // Divisors away from zero, so a quotient's rounding is not amplified.
                let b = self.randn(&[rows, cols]).affine(0.5, 0.0)?;
                let b = b.mul(&b)?.affine(1.0, 0.5)?;
                let bias = self.randn(&[cols]);
                let (ga, gb, gbias) = (self.up(&a)?, self.up(&b)?, self.up(&bias)?);
                for (op, gpu, cpu) in binaries {
                    let got = gpu(self.dev, &ga, &gb)?;
                    self.record(op, size.clone(), &got, &cpu(&a, &b)?, 1e-6)?;
                    let got = gpu(self.dev, &ga, &gbias)?;
                    self.record(op, format!("{size} + row"), &got, &cpu(&a, &bias)?, 1e-6)?;
                }
                for (op, gpu, cpu, tol) in unaries {
                    let x = a.affine(3.0, 0.0)?;
                    let got = gpu(self.dev, &self.up(&x)?)?;
                    self.record(op, size.clone(), &got, &cpu(&x)?, tol)?;
                }
                let got = self.dev.affine(&ga, 1.5, -0.25)?;
                self.record("affine", size.clone(), &got, &a.affine(1.5, -0.25)?, 1e-6)?;
                let got = self.dev.f32_to_f16(&ga)?.download(self.dev)?;
                self.checks.push(Check {
                    op: "f32_to_f16",
                    size: size.clone(),
                    max_err: max_err(&got, &a.to_dtype(DType::F16)?),
                    tolerance: 0.0,
                });
                let a16 = a.to_dtype(DType::F16)?;
                let got = self
                    .dev
                    .f16_to_f32(&CudaTensor::<f16>::upload(self.dev, &a16)?)?;
                let want = a16.to_dtype(DType::F32)?;
                self.record("f16_to_f32", size.clone(), &got, &want, 0.0)?;
                if cols % 2 == 0 {
                    let got = self.dev.geglu(&ga)?;
                    self.record("geglu", size.clone(), &got, &a.geglu()?, 1e-5)?;
                }
            }
        }
        // Softmax of a row with masked (-inf) entries, and of an all-masked row.
        let mut x = self.randn(&[2, 77]);
        let v = x.as_mut_slice::<f32>()?;
        v.iter_mut()
            .skip(5)
            .step_by(3)
            .for_each(|e| *e = f32::NEG_INFINITY);
        v[77..].fill(f32::NEG_INFINITY);
        let got = self.dev.softmax_last_dim(&self.up(&x)?)?;
        self.record(
            "softmax",
            "2x77 masked".into(),
            &got,
            &x.softmax_last_dim()?,
            1e-5,
        )
    }

    fn norms(&mut self) -> Result<()> {
        for rows in ROWS {
            for cols in COLS {
                let x = self.randn(&[rows, cols]).affine(2.0, 0.5)?;
                let (g, b) = (self.randn(&[cols]), self.randn(&[cols]));
                let got = self
                    .dev
                    .layer_norm(&self.up(&x)?, &self.up(&g)?, &self.up(&b)?, 1e-5)?;
                self.record(
                    "layer_norm",
                    format!("{rows}x{cols}"),
                    &got,
                    &x.layer_norm(&g, &b, 1e-5)?,
                    1e-4,
                )?;
            }
        }
        // (channels, groups): one group, odd group sizes, SD's 32 groups.
        for (batch, hw) in [(1, 1), (2, 7), (2, 333), (1, 4096)] {
            for (c, groups) in [(3, 1), (40, 8), (77, 7), (320, 32)] {
                let x = self.randn(&[batch, hw, c]).affine(2.0, 0.5)?;
                let (g, b) = (self.randn(&[c]), self.randn(&[c]));
                let (gx, gg, gb) = (self.up(&x)?, self.up(&g)?, self.up(&b)?);
                for silu in [false, true] {
                    let op = if silu {
                        "group_norm_silu"
                    } else {
                        "group_norm"
                    };
                    let got = self.dev.group_norm(&gx, groups, &gg, &gb, 1e-5, silu)?;
                    let want = x.group_norm(groups, &g, &b, 1e-5, silu)?;
                    self.record(op, format!("{batch}x{hw}x{c} g{groups}"), &got, &want, 1e-4)?;
                }
            }
        }
        self.group_norm_rows()?;
        self.blended_stats()
    }

    /// A ragged batch's rows, each normalised with its sample's statistics (the masked
    /// step's segments), one sample without rows, against the CPU's ragged apply.
    fn group_norm_rows(&mut self) -> Result<()> {
        for (sample_rows, c, groups) in [(&[5usize, 0, 33, 1][..], 77, 7), (&[130, 61], 320, 32)] {
            let rows: usize = sample_rows.iter().sum();
            let x = self.randn(&[rows, c]).affine(2.0, 0.5)?;
            let (g, b) = (self.randn(&[c]), self.randn(&[c]));
            let mut stats = Vec::new();
            for seg in 0..sample_rows.len() {
                let template = self.randn(&[1, 9, c]).affine(1.5, seg as f32)?;
                stats.extend(template.group_norm_stats(groups, 1e-5)?);
            }
            let flat = stats.iter().flat_map(|s| [s.mean, s.rstd]).collect();
            let gstats = self.up(&Tensor::from_vec(flat, &[sample_rows.len(), groups, 2])?)?;
            let sample_of_row: Vec<u32> = (0..sample_rows.len() as u32)
                .flat_map(|s| std::iter::repeat_n(s, sample_rows[s as usize]))
                .collect();
            let (gx, gg, gb) = (self.up(&x)?, self.up(&g)?, self.up(&b)?);
            for silu in [false, true] {
                let got = self.dev.group_norm_rows_with_stats(
                    &gx,
                    &gstats,
                    &sample_of_row,
                    groups,
                    &gg,
                    &gb,
                    silu,
                )?;
                let want =
                    x.group_norm_with_stats_ragged(sample_rows, &stats, groups, &g, &b, silu)?;
                let op = if silu {
                    "group_norm_silu rows"
                } else {
                    "group_norm rows"
                };
                let size = format!("{sample_rows:?}x{c} g{groups}");
                self.record(op, size, &got, &want, 1e-4)?;
            }
        }
        Ok(())
    }

    /// Blended group-norm statistics over three segments (each its own template, active set
    /// and fresh rows; 5%, 30% and every position), against the CPU per segment.
    fn blended_stats(&mut self) -> Result<()> {
        for (hw, c, groups) in [(63, 40, 8), (333, 77, 7), (4096, 320, 32)] {
            let mut fresh = Vec::new();
            let mut active = Vec::new();
            let mut stats = Vec::new();
            let mut moments = Vec::new();
            let mut want = Vec::new();
            for (seg, percent) in [5u64, 30, 100].into_iter().enumerate() {
                let template = self.randn(&[1, hw, c]).affine(1.5, 0.7 + seg as f32)?;
                let s = template.group_norm_stats(groups, 1e-5)?;
                let m = template
                    .group_position_moments(groups, &s)?
                    .reshape(&[hw, groups * 2])?
                    .to_dtype(DType::F16)?;
                let a = some_positions(hw, percent, seg as u64 + hw as u64);
                let f = self.randn(&[a.len(), c]).affine(2.0, -0.4)?;
                want.extend(
                    f.blended_group_stats(&s, &m, &a, 1e-5)?
                        .into_iter()
                        .flat_map(|g| [g.mean, g.rstd]),
                );
                fresh.push(f);
                active.push(a);
                stats.push(s);
                moments.push(CudaTensor::<f16>::upload(self.dev, &m)?);
            }
            let x = Tensor::concat_batch(&fresh.iter().collect::<Vec<_>>())?;
            let segments: Vec<CudaBlendedSegment<'_>> = (0..fresh.len())
                .map(|i| CudaBlendedSegment {
                    active: &active[i],
                    template: &stats[i],
                    moments: &moments[i],
                })
                .collect();
            let got = self
                .dev
                .group_norm_blended_stats(&self.up(&x)?, &segments, groups, 1e-5)?;
            let want = Tensor::from_vec(want, &[fresh.len(), groups, 2])?;
            let size = format!("3 seg {hw}x{c} g{groups}");
            self.record("group_norm_blended_stats", size, &got, &want, 1e-4)?;
        }
        Ok(())
    }

    fn rows(&mut self) -> Result<()> {
        for rows in ROWS {
            for cols in COLS {
                let src = self.randn(&[rows, cols]);
                // Every other row, backwards (a permutation for the scatter).
                let index: Vec<u32> = (0..rows as u32).rev().step_by(2).collect();
                let got = self.dev.gather_rows(&self.up(&src)?, &index)?;
                let size = format!("{rows}x{cols} n{}", index.len());
                self.record(
                    "gather_rows",
                    size.clone(),
                    &got,
                    &src.gather_rows(&index)?,
                    0.0,
                )?;
                let fresh = self.randn(&[index.len(), cols]);
                let mut want = src.clone();
                want.scatter_rows(&index, &fresh)?;
                let mut gdst = self.up(&src)?;
                self.dev
                    .scatter_rows(&mut gdst, &index, &self.up(&fresh)?)?;
                self.record("scatter_rows", size, &gdst, &want, 0.0)?;
            }
        }
        Ok(())
    }

    /// The UNet's layout ops: skip-connection concatenation (2 and 3 parts), nearest 2x
    /// upsampling, and the time embedding added per sample. Copies are exact.
    fn layout(&mut self) -> Result<()> {
        // Row blocks of a ragged batch: split (an empty block among them) and stacked again
        // in another order, against the CPU's `split_batch` / `concat_batch`.
        for (shape, counts) in [
            (vec![333, 77], vec![100, 0, 233]),
            (vec![7, 4, 40], vec![1, 6]),
        ] {
            let x = self.randn(&shape);
            let gx = self.up(&x)?;
            let parts = gx.split_rows(self.dev, &counts)?;
            let want = x.split_batch(&counts)?;
            for (i, (got, want)) in parts.iter().zip(&want).enumerate() {
                self.record("split_rows", format!("{shape:?} part {i}"), got, want, 0.0)?;
            }
            let reversed: Vec<&CudaTensor> = parts.iter().rev().collect();
            let got = CudaTensor::concat_rows(self.dev, &reversed)?;
            let want = Tensor::concat_batch(&want.iter().rev().collect::<Vec<_>>())?;
            self.record("concat_rows", format!("{shape:?}"), &got, &want, 0.0)?;
        }
        // A conv weight's operand for the f16 tensor-core kernels: transposed, rounded to f16.
        for (rows, cols) in [(77, 130), (2880, 320)] {
            let x = self.randn(&[rows, cols]);
            let v = x.to_vec_f32();
            let t = (0..rows * cols)
                .map(|i| f16::from_f32(v[(i % rows) * cols + i / rows]).to_f32())
                .collect();
            let want = Tensor::from_vec(t, &[cols, rows])?;
            let got = self
                .dev
                .f16_to_f32(&self.dev.transpose_to_f16(&self.up(&x)?)?)?;
            self.record(
                "transpose_to_f16",
                format!("{rows}x{cols}"),
                &got,
                &want,
                0.0,
            )?;
        }
        let leads: [&[usize]; 3] = [&[1, 7, 9], &[2, 5, 3], &[333]];
        let widths: [&[usize]; 4] = [&[3, 77], &[320, 40], &[77, 3, 320], &[40, 320, 3]];
        for lead in leads {
            for cols in widths {
                let parts = cols
                    .iter()
                    .map(|&c| {
                        let mut shape = lead.to_vec();
                        shape.push(c);
                        self.randn(&shape)
                    })
                    .collect::<Vec<_>>();
                let gparts = parts
                    .iter()
                    .map(|p| self.up(p))
                    .collect::<Result<Vec<_>>>()?;
                let got = self.dev.concat_last(&gparts.iter().collect::<Vec<_>>())?;
                let want = Tensor::concat_last(&parts.iter().collect::<Vec<_>>())?;
                let size = format!("{}x({})", joined(lead, "x"), joined(cols, "+"));
                self.record("concat_last", size, &got, &want, 0.0)?;
            }
        }
        for shape in [[2, 7, 9, 3], [1, 4, 4, 320], [2, 3, 5, 77], [1, 1, 1, 40]] {
            let x = self.randn(&shape);
            let got = self.dev.upsample_nearest2x(&self.up(&x)?)?;
            let size = joined(&shape, "x");
            self.record(
                "upsample_nearest2x",
                size,
                &got,
                &x.upsample_nearest2x()?,
                0.0,
            )?;
        }
        let shapes: [&[usize]; 5] = [
            &[2, 7, 9, 77],
            &[3, 33, 320],
            &[1, 4, 4, 40],
            &[2, 5, 3],
            &[7, 1283],
        ];
        for shape in shapes {
            let (samples, c) = (shape[0], shape[shape.len() - 1]);
            let x = self.randn(shape);
            let v = self.randn(&[samples, c]);
            let got = self.dev.add_per_sample(&self.up(&x)?, &self.up(&v)?)?;
            // [samples, 1, .., 1, c]: the CPU's add broadcasts it over the positions.
            let mut vshape = vec![1; shape.len()];
            vshape[0] = samples;
            vshape[shape.len() - 1] = c;
            let want = x.add(&v.clone().reshape(&vshape)?)?;
            let size = joined(shape, "x");
            self.record("add_per_sample", size, &got, &want, 1e-6)?;
        }
        // Per row of a ragged batch: each row its sample's vector, in any order.
        for (rows, samples, c) in [(37, 3, 77), (130, 2, 320)] {
            let x = self.randn(&[rows, c]);
            let v = self.randn(&[samples, c]);
            let sample_of_row: Vec<u32> = (0..rows).map(|r| ((r * 7) % samples) as u32).collect();
            let got = self
                .dev
                .add_per_row_sample(&self.up(&x)?, &self.up(&v)?, &sample_of_row)?;
            let want = x.add(&v.gather_rows(&sample_of_row)?)?;
            self.record(
                "add_per_row_sample",
                format!("{rows}x{c}"),
                &got,
                &want,
                1e-6,
            )?;
        }
        Ok(())
    }

    fn lora(&mut self) -> Result<()> {
        for (out, inp, rank) in [(1, 3, 1), (7, 40, 4), (333, 77, 16), (320, 320, 8)] {
            let w = self.randn(&[out, inp]);
            let up = self.randn(&[out, rank]);
            let down = self.randn(&[rank, inp]);
            let (gu, gd) = (self.up(&up)?, self.up(&down)?);
            let size = format!("{out}x{inp} r{rank}");

            let mut want = w.clone();
            want.lora_patch(&up, &down, 0.75)?;
            let mut gw = self.up(&w)?;
            self.dev.lora_patch(&mut gw, &gu, &gd, 0.75)?;
            self.record("lora_patch_f32", size.clone(), &gw, &want, 1e-5)?;

            // One rounding apart at most (the f32 sums differ in order): f16's 11-bit and
            // bf16's 8-bit significands.
            let factors = (&up, &down, &gu, &gd);
            self.lora_half::<f16>("lora_patch_f16", DType::F16, &w, factors, &size, 2e-3)?;
            self.lora_half::<bf16>("lora_patch_bf16", DType::BF16, &w, factors, &size, 1.6e-2)?;
        }
        self.lora_segments()
    }

    /// The unmerged path over a ragged batch: segments with their own adapters and ranks
    /// (1 to 64), rows no segment owns (kept as they were), a one-row segment.
    fn lora_segments(&mut self) -> Result<()> {
        // (in, out, [(rows, rank)]).
        let cases: [(usize, usize, &[RowsRank]); 3] = [
            (40, 77, &[(0..5, 4), (9..10, 1), (10..70, 16)]),
            (320, 320, &[(3..333, 64)]),
            (77, 3, &[(0..1, 2), (1..7, 3)]),
        ];
        for (inp, out, segs) in cases {
            let n = segs.iter().map(|(r, _)| r.end).max().unwrap_or(0) + 3;
            let x = self.randn(&[n, inp]);
            let y = self.randn(&[n, out]);
            let adapters: Vec<(Tensor, Tensor)> = segs
                .iter()
                .map(|(_, rank)| (self.randn(&[*rank, inp]), self.randn(&[out, *rank])))
                .collect();
            let scale = |i: usize| 0.5 + 0.25 * i as f32;
            let cpu: Vec<LoraSegment<'_>> = segs
                .iter()
                .zip(&adapters)
                .enumerate()
                .map(|(i, ((rows, _), (down, up)))| LoraSegment {
                    rows: rows.clone(),
                    down,
                    up,
                    scale: scale(i),
                })
                .collect();
            let mut want = y.clone();
            x.lora_segments(&mut want, &cpu)?;
            let gpu_adapters = adapters
                .iter()
                .map(|(d, u)| Ok((self.up(d)?, self.up(u)?)))
                .collect::<Result<Vec<_>>>()?;
            let gpu: Vec<CudaLoraSegment<'_>> = segs
                .iter()
                .zip(&gpu_adapters)
                .enumerate()
                .map(|(i, ((rows, _), (down, up)))| CudaLoraSegment {
                    rows: rows.clone(),
                    down,
                    up,
                    scale: scale(i),
                })
                .collect();
            let mut got = self.up(&y)?;
            self.dev.lora_segments(&self.up(&x)?, &mut got, &gpu)?;
            let size = format!("{} seg {n}x{inp}->{out}", segs.len());
            self.record("lora_segments", size, &got, &want, 1e-4)?;
        }
        Ok(())
    }
}

impl Runner<'_> {
    fn attention(&mut self) -> Result<()> {
        // (batch, lq, lk, channels, heads, causal): one query, odd lengths, cross-attention
        // to 77 tokens, CLIP's causal self-attention, head sizes 40, 64, 77 and 160.
        let cases = [
            (1, 1, 333, 160, 1, false),
            (1, 7, 77, 40, 1, false),
            (2, 333, 77, 320, 8, false),
            (1, 77, 77, 128, 2, true),
            (2, 65, 65, 154, 2, true),
            (1, 1024, 1024, 320, 8, false),
            (2, 333, 1000, 160, 2, false),
            (1, 130, 130, 160, 2, true),
            (1, 65, 33, 8, 2, true),
        ];
        for (batch, lq, lk, c, heads, causal) in cases {
            let q = self.randn(&[batch, lq, c]);
            let k = self.randn(&[batch, lk, c]);
            let v = self.randn(&[batch, lk, c]);
            let (gq, gk, gv) = (self.up(&q)?, self.up(&k)?, self.up(&v)?);
            let want = Tensor::attention(&q, &k, &v, heads, causal)?;
            let size = format!(
                "{batch}x{lq}x{lk}x{c} h{heads}{}",
                if causal { " causal" } else { "" }
            );
            for (op, kernel) in [
                ("attention", AttentionKernel::Rows),
                ("attention_tiles", AttentionKernel::Tiles),
                ("attention_flash", AttentionKernel::Flash),
                ("attention_flash_mma", AttentionKernel::FlashMma),
                ("attention_flash_mma_bf16", AttentionKernel::FlashMmaBf16),
            ] {
                let got = self
                    .dev
                    .attention_with(kernel, &gq, &gk, &gv, heads, causal)?;
                self.record(op, size.clone(), &got, &want, attention_tol(kernel))?;
            }
        }
        self.masked_attention()?;
        self.ragged_attention()
    }

    /// Masked self-attention over a ragged batch against the CPU's (which reads the same f16
    /// cache): segments with 1 to all of their positions active, SD's head widths 40 and 64,
    /// the tiny model's 32, 160 (the wide f32 flash kernel, past the default shared memory)
    /// and 77 (no flash kernel takes it: the per-segment path).
    fn masked_attention(&mut self) -> Result<()> {
        let cases: [(usize, usize, usize, usize, &[u64]); 6] = [
            (7, 9, 80, 2, &[30, 1, 100]),
            (64, 64, 320, 8, &[20, 3]),
            (16, 16, 128, 2, &[50]),
            (16, 16, 32, 1, &[11, 40]),
            (5, 13, 160, 1, &[30, 60]),
            (5, 13, 77, 1, &[30, 60]),
        ];
        for (h, w, c, heads, percents) in cases {
            let mut tokens = Vec::new();
            let mut cached = Vec::new();
            for (i, &percent) in percents.iter().enumerate() {
                let positions = some_positions(h * w, percent, 31 * i as u64 + c as u64);
                tokens.push(TokenSet::from_positions(h, w, positions)?);
                let k = self.randn(&[h * w, c]).to_dtype(DType::F16)?;
                let v = self.randn(&[h * w, c]).to_dtype(DType::F16)?;
                cached.push((k, v));
            }
            let rows: usize = tokens.iter().map(TokenSet::len).sum();
            let (q, k, v) = (
                self.randn(&[rows, c]),
                self.randn(&[rows, c]),
                self.randn(&[rows, c]),
            );
            let mut at = 0;
            let ranges: Vec<_> = tokens
                .iter()
                .map(|t| {
                    at += t.len();
                    at - t.len()..at
                })
                .collect();
            let cpu_segments: Vec<AttentionSegment<'_>> = (0..tokens.len())
                .map(|i| AttentionSegment {
                    rows: ranges[i].clone(),
                    tokens: &tokens[i],
                    cached_k: &cached[i].0,
                    cached_v: &cached[i].1,
                })
                .collect();
            let want = Tensor::masked_attention(&q, &k, &v, &cpu_segments, heads)?;
            let gpu_cached = cached
                .iter()
                .map(|(k, v)| {
                    Ok((
                        CudaTensor::<f16>::upload(self.dev, k)?,
                        CudaTensor::<f16>::upload(self.dev, v)?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            let gpu_segments: Vec<CudaAttentionSegment<'_>> = (0..tokens.len())
                .map(|i| CudaAttentionSegment {
                    rows: ranges[i].clone(),
                    tokens: &tokens[i],
                    cached_k: &gpu_cached[i].0,
                    cached_v: &gpu_cached[i].1,
                })
                .collect();
            let (gq, gk, gv) = (self.up(&q)?, self.up(&k)?, self.up(&v)?);
            let size = format!("{} seg {h}x{w}x{c} h{heads}, {rows} rows", percents.len());
            for (op, kernel) in [
                ("masked_attention", AttentionKernel::Flash),
                ("masked_attention_mma", AttentionKernel::FlashMma),
                ("masked_attention_mma_bf16", AttentionKernel::FlashMmaBf16),
            ] {
                let got = self.with_attention_kernel(kernel, |dev| {
                    dev.masked_attention(&gq, &gk, &gv, &gpu_segments, heads)
                })?;
                self.record(op, size.clone(), &got, &want, attention_tol(kernel))?;
            }
        }
        Ok(())
    }

    /// Ragged cross-attention (each segment's queries to its own keys) against the CPU's.
    fn ragged_attention(&mut self) -> Result<()> {
        // Heads of 40, 32, 160 (the wide flash kernel) and 77 (the per-segment path).
        let cases: [(usize, usize, usize, &[usize]); 4] = [
            (320, 8, 77, &[130, 1, 64]),
            (64, 2, 7, &[65]),
            (160, 1, 77, &[33, 5]),
            (77, 1, 9, &[20, 3]),
        ];
        for (c, heads, tokens, counts) in cases {
            let rows: usize = counts.iter().sum();
            let q = self.randn(&[rows, c]);
            let k = self.randn(&[counts.len() * tokens, c]);
            let v = self.randn(&[counts.len() * tokens, c]);
            let segments = RaggedSegment::each_to_own_keys(counts, tokens);
            let want = Tensor::ragged_attention(&q, &k, &v, &segments, heads)?;
            let (gq, gk, gv) = (self.up(&q)?, self.up(&k)?, self.up(&v)?);
            let size = format!("{} seg x{tokens} keys, {rows}x{c} h{heads}", counts.len());
            for (op, kernel) in [
                ("ragged_attention", AttentionKernel::Flash),
                ("ragged_attention_mma", AttentionKernel::FlashMma),
                ("ragged_attention_mma_bf16", AttentionKernel::FlashMmaBf16),
            ] {
                let got = self.with_attention_kernel(kernel, |dev| {
                    dev.ragged_attention(&gq, &gk, &gv, &segments, heads)
                })?;
                self.record(op, size.clone(), &got, &want, attention_tol(kernel))?;
            }
        }
        Ok(())
    }
}

impl Runner<'_> {
    /// Runs `f` with the device's attention kernel set to `kernel`, then restores it.
    fn with_attention_kernel<T>(
        &self,
        kernel: AttentionKernel,
        f: impl FnOnce(&CudaDevice) -> Result<T>,
    ) -> Result<T> {
        let chosen = self.dev.attention_kernel();
        self.dev.set_attention_kernel(kernel);
        let out = f(self.dev);
        self.dev.set_attention_kernel(chosen);
        out
    }

    /// `f` with split-K products in one launch ([`GemmBackend::KernelsOneLaunch`]), then
    /// the device's backend again.
    fn one_launch_split_k<T>(&self, f: impl FnOnce(&CudaDevice) -> Result<T>) -> Result<T> {
        self.with_gemm_backend(GemmBackend::KernelsOneLaunch, f)
    }

    /// `f` with the device's GEMMs on `backend`, then the device's backend again.
    fn with_gemm_backend<T>(
        &self,
        backend: GemmBackend,
        f: impl FnOnce(&CudaDevice) -> Result<T>,
    ) -> Result<T> {
        let dev = self.dev;
        keeping_backend(dev, || {
            dev.set_gemm_backend(backend)?;
            f(dev)
        })
    }
}

/// `f`, which may choose other GEMM backends, then the device's own backend again (also
/// when `f` fails).
fn keeping_backend<T>(dev: &CudaDevice, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let chosen = dev.gemm_backend();
    let out = f();
    dev.set_gemm_backend(chosen)?;
    out
}

/// Tolerance of an attention check: f32 kernels sum in another order than the CPU; the
/// tensor-core kernels round queries, keys, values and probabilities to f16 (11-bit
/// significands) on the way in, so outputs of unit-variance inputs move by up to ~3e-3, or to
/// bf16 (8-bit significands), eight times that.
fn attention_tol(kernel: AttentionKernel) -> f32 {
    match kernel {
        AttentionKernel::FlashMma => 1e-2,
        AttentionKernel::FlashMmaBf16 => 5e-2,
        _ => 1e-4,
    }
}

impl Runner<'_> {
    /// Uploads through the copy stream's pooled pinned buffers, three rounds so later ones
    /// reuse (and rewrite) the buffers of earlier ones: each tensor must arrive bit for bit
    /// once the compute stream waited for the fence, and the pool must keep within its budget.
    fn staged_uploads(&mut self) -> Result<()> {
        let lens = [1, 333, 77 * 320 + 5, (1 << 20) + 3];
        for round in 0..3 {
            self.staged_round::<f32>("upload_staged_f32", DType::F32, &lens, round)?;
            self.staged_round::<f16>("upload_staged_f16", DType::F16, &lens, round)?;
        }
        self.staged_reuse()?;
        self.table_ring_wrap()?;
        let kept = self.dev.staging_free_bytes();
        self.checks.push(Check {
            op: "staging_pool",
            size: format!("{:.1} MiB kept", kept as f64 / (1 << 20) as f64),
            max_err: if kept <= STAGING_BUDGET_BYTES {
                0.0
            } else {
                f32::INFINITY
            },
            tolerance: 0.0,
        });
        Ok(())
    }

    /// A staging buffer given back while its copy is still queued (as a prefetched step's
    /// buffers are once the compute stream waits for them, the host not waiting), then taken
    /// by the next upload of its size: that upload must wait for the copy out of the buffer
    /// before refilling it, or the first tensor gets the second's values. The size is larger
    /// than the rounds' above, so no idle buffer fits and the busy one is the pick.
    fn staged_reuse(&mut self) -> Result<()> {
        let n = 5 << 19;
        let (first, second) = (self.randn(&[n]), self.randn(&[n]));
        let (first_gpu, staging) = CudaTensor::<f32>::upload_staged(self.dev, &first)?;
        drop(staging);
        let (second_gpu, staging) = CudaTensor::<f32>::upload_staged(self.dev, &second)?;
        drop(staging);
        self.dev.wait_for(&self.dev.fence_copies()?)?;
        for (name, gpu, want) in [("first", first_gpu, first), ("second", second_gpu, second)] {
            self.checks.push(Check {
                op: "upload_staged_reuse",
                size: format!("{n} {name}"),
                max_err: max_err(&gpu.download(self.dev)?, &want),
                tolerance: 0.0,
            });
        }
        Ok(())
    }

    /// Launches whose tables go round the page-locked table ring before any synchronisation:
    /// each gather's index fills three quarters of a ring chunk, so the ring comes back to
    /// its first chunk while the copies out of it may still be queued. It must wait for them
    /// before rewriting the chunk, or the first gathers read the later indices.
    fn table_ring_wrap(&mut self) -> Result<()> {
        let rows = 4099;
        let src = self.randn(&[rows, 1]);
        let gpu_src = CudaTensor::<f32>::upload(self.dev, &src)?;
        let len = CHUNK_BYTES / 4 * 3 / 4;
        let launches = 2 * TABLE_RING_BYTES / CHUNK_BYTES;
        let gathered = (0..launches)
            .map(|i| {
                let index: Vec<u32> = (0..len)
                    .map(|j| ((j * 7919 + i * 104_729) % rows) as u32)
                    .collect();
                Ok((
                    self.dev.gather_rows(&gpu_src, &index)?,
                    src.gather_rows(&index)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut err = 0.0f32;
        for (gpu, want) in gathered {
            err = err.max(max_err(&gpu.download(self.dev)?, &want));
        }
        self.checks.push(Check {
            op: "table_ring_wrap",
            size: format!("{launches} gathers of {len} rows"),
            max_err: err,
            tolerance: 0.0,
        });
        Ok(())
    }

    /// A dropped intermediate's block goes back to the device's pool and serves the next
    /// tensor of its size, and `CudaTensor::zeros` on it (it held an op's output) is zeros.
    fn device_pool(&mut self) -> Result<()> {
        let n = 77 * 320 + 5;
        let x = CudaTensor::<f32>::upload(self.dev, &self.randn(&[n]))?;
        let out = self.dev.affine(&x, 2.0, 1.0)?;
        let free_before = self.dev.pooled_free_bytes();
        drop(out);
        let returned = self.dev.pooled_free_bytes() - free_before;
        let zeros = CudaTensor::<f32>::zeros(self.dev, &[n])?;
        let reused = returned >= n * 4 && self.dev.pooled_free_bytes() == free_before;
        let err = max_err(
            &zeros.download(self.dev)?,
            &Tensor::zeros(&[n], DType::F32, Device::Cpu),
        );
        self.checks.push(Check {
            op: "device_pool",
            size: format!("{returned} B block returned, reused"),
            max_err: if reused { err } else { f32::INFINITY },
            tolerance: 0.0,
        });
        Ok(())
    }

    fn staged_round<T: GpuElement>(
        &mut self,
        op: &'static str,
        dtype: DType,
        lens: &[usize],
        round: usize,
    ) -> Result<()> {
        let host = lens
            .iter()
            .map(|&n| self.randn(&[n]).to_dtype(dtype))
            .collect::<Result<Vec<_>>>()?;
        let uploads = host
            .iter()
            .map(|t| CudaTensor::<T>::upload_staged(self.dev, t))
            .collect::<Result<Vec<_>>>()?;
        let fence = self.dev.fence_copies()?;
        self.dev.wait_for(&fence)?;
        for (t, (gpu, staging)) in host.iter().zip(uploads) {
            // Downloads run on the compute stream, after the wait.
            let got = gpu.download(self.dev)?;
            drop(staging);
            self.checks.push(Check {
                op,
                size: format!("{} round {round}", t.elem_count()),
                max_err: max_err(&got, t),
                tolerance: 0.0,
            });
        }
        Ok(())
    }
}

impl Runner<'_> {
    /// Linear layers and convolutions through cuBLAS (f32, TF32, f16) against the CPU, where
    /// the machine has cuBLAS (skipped with a note where not: it is optional).
    fn cublas(&mut self) -> Result<()> {
        let dev = self.dev;
        keeping_backend(dev, || {
            if let Err(e) = dev.set_gemm_backend(GemmBackend::Cublas) {
                eprintln!("selftest: cuBLAS checks skipped: {e}");
                return Ok(());
            }
            self.cublas_checks()
        })
    }

    fn cublas_checks(&mut self) -> Result<()> {
        self.backend_checks(&[
            (
                GemmBackend::Cublas,
                [
                    "linear cublas",
                    "conv2d cublas",
                    "linear_add cublas",
                    "conv2d_add cublas",
                    "conv2d_sample_bias cublas",
                ],
            ),
            (
                GemmBackend::CublasTf32,
                [
                    "linear cublas_tf32",
                    "conv2d cublas_tf32",
                    "linear_add cublas_tf32",
                    "conv2d_add cublas_tf32",
                    "conv2d_sample_bias cublas_tf32",
                ],
            ),
            (
                GemmBackend::CublasF16,
                [
                    "linear cublas_f16",
                    "conv2d cublas_f16",
                    "linear_add cublas_f16",
                    "conv2d_add cublas_f16",
                    "conv2d_sample_bias cublas_f16",
                ],
            ),
        ])
    }

    /// Linear layers and convolutions on the device's f16 tensor-core kernels
    /// ([`GemmBackend::KernelsF16`], and with split-K in one launch) against the CPU: the
    /// shapes of the other backends' checks, and long products that split k. The device's
    /// backend is restored after.
    fn f16_kernels(&mut self) -> Result<()> {
        keeping_backend(self.dev, || self.f16_kernel_checks())
    }

    fn f16_kernel_checks(&mut self) -> Result<()> {
        self.backend_checks(&[
            (
                GemmBackend::KernelsF16,
                [
                    "linear kernels_f16",
                    "conv2d kernels_f16",
                    "linear_add kernels_f16",
                    "conv2d_add kernels_f16",
                    "conv2d_sample_bias kernels_f16",
                ],
            ),
            (
                GemmBackend::KernelsF16OneLaunch,
                [
                    "linear kernels_f16 one-launch",
                    "conv2d kernels_f16 one-launch",
                    "linear_add kernels_f16 one-launch",
                    "conv2d_add kernels_f16 one-launch",
                    "conv2d_sample_bias kernels_f16 one-launch",
                ],
            ),
        ])?;
        // Long k over few output tiles (split in 2 to 16 slices), and SD's deepest convs.
        for (backend, [linear_op, conv_op]) in [
            (
                GemmBackend::KernelsF16,
                [
                    "linear_add splitk kernels_f16",
                    "conv2d_sample_bias splitk kernels_f16",
                ],
            ),
            (
                GemmBackend::KernelsF16OneLaunch,
                [
                    "linear_add splitk kernels_f16 one-launch",
                    "conv2d_sample_bias splitk kernels_f16 one-launch",
                ],
            ),
        ] {
            self.dev.set_gemm_backend(backend)?;
            for (m, k, n) in [(7, 2880, 77), (130, 5120, 64), (1, 11520, 5)] {
                let a = self.randn(&[m, k]);
                let w = self.randn(&[n, k]);
                let bias = self.randn(&[n]);
                let residual = self.randn(&[m, n]);
                let (ga, gw, gbias) = (self.up(&a)?, self.up(&w)?, self.up(&bias)?);
                let got = self
                    .dev
                    .linear_add(&ga, &gw, Some(&gbias), &self.up(&residual)?)?;
                let want = a.linear(&w, Some(&bias))?.add(&residual)?;
                self.record(linear_op, format!("{m}x{k}x{n}"), &got, &want, tf32_tol(k))?;
            }
            for (cin, cout) in [(320, 77), (643, 130)] {
                let (wb, b) = self.conv_weight_and_bias(cout, cin, 3, 3, true)?;
                let x = self.randn(&[2, 8, 8, cin]);
                let (got, want) =
                    self.conv_sample_bias(&x, (&wb, &b), Conv2dParams::SAME_3X3, false)?;
                let size = format!("2x8x8x{cin}->{cout} 3x3/1 p1");
                self.record(conv_op, size, &got, &want, tf32_tol(9 * cin))?;
            }
        }
        Ok(())
    }

    /// The linear and conv checks under each backend, named as given: `linear`,
    /// `linear_add` and (f16 products) `linear_f16_weight[_add]` on every row count and
    /// three (k, n); `conv2d`, `conv2d_add` and `conv2d_sample_bias` on SD's conv shapes.
    /// Leaves the last backend chosen.
    fn backend_checks(&mut self, backends: &[(GemmBackend, [&'static str; 5])]) -> Result<()> {
        for &(
            backend,
            [
                linear_op,
                conv_op,
                linear_add_op,
                conv_add_op,
                sample_bias_op,
            ],
        ) in backends
        {
            self.dev.set_gemm_backend(backend)?;
            // f16 products round each input to a 10-bit significand as TF32 does (f16's
            // range is ample for these unit-scale inputs).
            let tol = |k: usize| {
                if backend == GemmBackend::Cublas {
                    GEMM_TOL
                } else {
                    tf32_tol(k)
                }
            };
            for m in ROWS {
                for (k, n, with_bias) in [(3, 5, true), (77, 320, false), (320, 77, true)] {
                    let a = self.randn(&[m, k]);
                    let w = self.randn(&[n, k]);
                    let bias = with_bias.then(|| self.randn(&[n]));
                    let gbias = bias.as_ref().map(|b| self.up(b)).transpose()?;
                    let got = self
                        .dev
                        .linear(&self.up(&a)?, &self.up(&w)?, gbias.as_ref())?;
                    let want = a.linear(&w, bias.as_ref())?;
                    self.record(linear_op, format!("{m}x{k}x{n}"), &got, &want, tol(k))?;
                    let residual = self.randn(&[m, n]);
                    let gresidual = self.up(&residual)?;
                    let want_add = want.add(&residual)?;
                    let got = self.dev.linear_add(
                        &self.up(&a)?,
                        &self.up(&w)?,
                        gbias.as_ref(),
                        &gresidual,
                    )?;
                    let size = format!("{m}x{k}x{n}");
                    self.record(linear_add_op, size, &got, &want_add, tol(k))?;
                    if backend.f16_products() {
                        // A layer's kept f16 weight (what the UNet's linear layers pass).
                        let half = self.dev.f32_to_f16(&self.up(&w)?)?;
                        let got =
                            self.dev
                                .linear_f16_weight(&self.up(&a)?, &half, gbias.as_ref())?;
                        let size = format!("{m}x{k}x{n} {linear_op}");
                        self.record("linear_f16_weight", size.clone(), &got, &want, tol(k))?;
                        let got = self.dev.linear_f16_weight_add(
                            &self.up(&a)?,
                            &half,
                            gbias.as_ref(),
                            &gresidual,
                        )?;
                        self.record("linear_f16_weight_add", size, &got, &want_add, tol(k))?;
                    }
                }
            }
            let kernels = [(3, 3, 1, 1), (3, 3, 2, 1), (1, 1, 1, 0), (2, 3, 2, 0)];
            for (cin, cout) in [(40, 77), (77, 40)] {
                for (kh, kw, stride, padding) in kernels {
                    let p = Conv2dParams { stride, padding };
                    let w = self.conv_weight(cout, cin, kh, kw, cin != 77)?;
                    let gw = CudaConv2dWeight::upload(self.dev, &w)?;
                    let x = self.randn(&[2, 7, 9, cin]);
                    let got = self.dev.conv2d(&self.up(&x)?, &gw, p)?;
                    let want = x.conv2d(&w, p)?;
                    let size = format!("2x7x9x{cin}->{cout} {kh}x{kw}/{stride} p{padding}");
                    self.record(conv_op, size.clone(), &got, &want, tol(kh * kw * cin))?;
                    let residual = self.randn(want.shape());
                    let got = self
                        .dev
                        .conv2d_add(&self.up(&x)?, &gw, p, &self.up(&residual)?)?;
                    let want = want.add(&residual)?;
                    self.record(conv_add_op, size.clone(), &got, &want, tol(kh * kw * cin))?;
                    if (kh, stride) == (3, 1) {
                        let (wb, b) = self.conv_weight_and_bias(cout, cin, kh, kw, true)?;
                        let (got, want) = self.conv_sample_bias(&x, (&wb, &b), p, false)?;
                        self.record(sample_bias_op, size, &got, &want, tol(kh * kw * cin))?;
                    }
                }
            }
        }
        Ok(())
    }
}

impl Runner<'_> {
    /// The LoRA patch of `w` stored as `T` (`dtype`) on the device against the CPU's.
    fn lora_half<T: GpuElement>(
        &mut self,
        op: &'static str,
        dtype: DType,
        w: &Tensor,
        (up, down, gu, gd): (&Tensor, &Tensor, &CudaTensor, &CudaTensor),
        size: &str,
        tolerance: f32,
    ) -> Result<()> {
        let w = w.to_dtype(dtype)?;
        let mut want = w.clone();
        want.lora_patch(up, down, 0.75)?;
        let mut gw = CudaTensor::<T>::upload(self.dev, &w)?;
        self.dev.lora_patch(&mut gw, gu, gd, 0.75)?;
        let got = gw.download(self.dev)?;
        self.checks.push(Check {
            op,
            size: size.to_string(),
            max_err: max_err(&got, &want),
            tolerance,
        });
        Ok(())
    }
}

/// What a masked conv check adds to the product: a residual, or a bias per segment in place
/// of the weight's.
#[derive(Clone, Copy)]
struct MaskedExtras<T> {
    residual: Option<T>,
    sample_bias: Option<T>,
}

impl<T> Default for MaskedExtras<T> {
    fn default() -> Self {
        MaskedExtras {
            residual: None,
            sample_bias: None,
        }
    }
}

impl MaskedExtras<CudaTensor> {
    fn borrow(&self) -> MaskedExtras<&CudaTensor> {
        MaskedExtras {
            residual: self.residual.as_ref(),
            sample_bias: self.sample_bias.as_ref(),
        }
    }
}

/// A masked conv check's weight, per-segment fresh rows, active sets, cached maps and
/// outputs, and the conv's parameters.
type MaskedConvArgs<'a> = (
    &'a CudaConv2dWeight,
    &'a [Tensor],
    &'a [TokenSet],
    &'a [Tensor],
    &'a [TokenSet],
    Conv2dParams,
);

/// A segment's rows and its adapter's rank.
type RowsRank = (std::ops::Range<usize>, usize);

/// Tolerance of the GEMM-shaped checks (k up to 11520 here): f32 sums in another order than
/// the CPU's (errors relative above 1, see `max_err`).
const GEMM_TOL: f32 = 2e-4;

/// Tolerance of the TF32 checks: each input rounded to 10 mantissa bits (relative error up
/// to 2^-11), so a sum of `k` unit-scale products is off by about `4e-4 * sqrt(k)` (one
/// standard deviation); the largest of ~10^5 elements stays under 10 of those.
fn tf32_tol(k: usize) -> f32 {
    (4e-3 * (k as f32).sqrt()).max(1e-2)
}

/// Deterministic pseudo-random subset of `0..len` with about `percent`% of the positions
/// (sorted, as `TokenSet` wants), never empty.
fn some_positions(len: usize, percent: u64, seed: u64) -> Vec<u32> {
    let mut v: Vec<u32> = (0..len as u64)
        .filter(|&p| {
            let h = (p + 1)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add(seed.wrapping_mul(0xbf58_476d_1ce4_e5b9));
            (h >> 33) % 100 < percent
        })
        .map(|p| p as u32)
        .collect();
    if v.is_empty() {
        v.push((seed as usize % len) as u32);
    }
    v
}

impl Runner<'_> {
    fn gemm(&mut self) -> Result<()> {
        // Long k over few output tiles: split-K launches (several k-slices, then the
        // reduction applying alpha, beta and the bias).
        for (m, k, n) in [
            (7, 2880, 77),
            (333, 1283, 320),
            (1, 11520, 5),
            (130, 5120, 64),
        ] {
            let a = self.randn(&[m, k]);
            let w = self.randn(&[n, k]);
            let bias = self.randn(&[n]);
            let (ga, gw, gbias) = (self.up(&a)?, self.up(&w)?, self.up(&bias)?);
            let got = self.dev.linear(&ga, &gw, Some(&gbias))?;
            let want = a.linear(&w, Some(&bias))?;
            self.record(
                "linear splitk",
                format!("{m}x{k}x{n}"),
                &got,
                &want,
                GEMM_TOL,
            )?;
            // A residual added by the reduction.
            let residual = self.randn(&[m, n]);
            let gresidual = self.up(&residual)?;
            let got = self.dev.linear_add(&ga, &gw, Some(&gbias), &gresidual)?;
            let want_add = want.add(&residual)?;
            let size = format!("{m}x{k}x{n}");
            self.record("linear_add splitk", size.clone(), &got, &want_add, GEMM_TOL)?;
            // The same products with the slices summed by their own last blocks.
            let (got, got_add) = self.one_launch_split_k(|dev| {
                Ok((
                    dev.linear(&ga, &gw, Some(&gbias))?,
                    dev.linear_add(&ga, &gw, Some(&gbias), &gresidual)?,
                ))
            })?;
            self.record(
                "linear splitk one-launch",
                size.clone(),
                &got,
                &want,
                GEMM_TOL,
            )?;
            let op = "linear_add splitk one-launch";
            self.record(op, size, &got_add, &want_add, GEMM_TOL)?;
            let b = self.randn(&[k, n]);
            let c0 = self.randn(&[m, n]);
            let mut gc = self.up(&c0)?;
            let gb = self.up(&b)?;
            self.dev
                .gemm(&ga, &gb, false, Some(&gbias), 0.5, -2.0, &mut gc)?;
            let want = a
                .matmul(&b)?
                .affine(0.5, 0.0)?
                .add(&c0.affine(-2.0, 0.0)?)?
                .add(&bias)?;
            self.record(
                "gemm_ab splitk",
                format!("{m}x{k}x{n}"),
                &gc,
                &want,
                GEMM_TOL,
            )?;
        }
        for m in ROWS {
            for k in [3, 40, 77, 320] {
                for n in [5, 77, 320] {
                    let a = self.randn(&[m, k]);
                    let w = self.randn(&[n, k]);
                    let bias = self.randn(&[n]);
                    let (ga, gw, gbias) = (self.up(&a)?, self.up(&w)?, self.up(&bias)?);
                    // x * W^T + bias, PyTorch's linear.
                    let got = self.dev.linear(&ga, &gw, Some(&gbias))?;
                    let want = a.linear(&w, Some(&bias))?;
                    self.record("linear", format!("{m}x{k}x{n}"), &got, &want, GEMM_TOL)?;
                    // A residual added by the epilogue (split-K where k is long enough).
                    let residual = self.randn(&[m, n]);
                    let got = self
                        .dev
                        .linear_add(&ga, &gw, Some(&gbias), &self.up(&residual)?)?;
                    let want_add = want.add(&residual)?;
                    self.record(
                        "linear_add",
                        format!("{m}x{k}x{n}"),
                        &got,
                        &want_add,
                        GEMM_TOL,
                    )?;
                    // [k, n] right side, alpha and beta: 0.5 * a * b - 2 c + bias.
                    let b = self.randn(&[k, n]);
                    let c0 = self.randn(&[m, n]);
                    let mut gc = self.up(&c0)?;
                    let gb = self.up(&b)?;
                    self.dev
                        .gemm(&ga, &gb, false, Some(&gbias), 0.5, -2.0, &mut gc)?;
                    let want = a
                        .matmul(&b)?
                        .affine(0.5, 0.0)?
                        .add(&c0.affine(-2.0, 0.0)?)?
                        .add(&bias)?;
                    self.record("gemm_kn_ab", format!("{m}x{k}x{n}"), &gc, &want, GEMM_TOL)?;
                    // The same on tensor cores (TF32 products, f32 sums).
                    let mut gc = self.up(&c0)?;
                    self.dev
                        .gemm_tf32(&ga, &gb, false, Some(&gbias), 0.5, -2.0, &mut gc)?;
                    self.record(
                        "gemm_tf32_kn",
                        format!("{m}x{k}x{n}"),
                        &gc,
                        &want,
                        tf32_tol(k),
                    )?;
                    let mut gc = CudaTensor::zeros(self.dev, &[m, n])?;
                    self.dev
                        .gemm_tf32(&ga, &gw, true, Some(&gbias), 1.0, 0.0, &mut gc)?;
                    let want_t = a.linear(&w, Some(&bias))?;
                    self.record(
                        "gemm_tf32_nk",
                        format!("{m}x{k}x{n}"),
                        &gc,
                        &want_t,
                        tf32_tol(k),
                    )?;
                    let got = self.dev.matmul(&ga, &gb)?;
                    self.record(
                        "matmul",
                        format!("{m}x{k}x{n}"),
                        &got,
                        &a.matmul(&b)?,
                        GEMM_TOL,
                    )?;
                }
            }
        }
        Ok(())
    }

    fn conv_weight(
        &mut self,
        cout: usize,
        cin: usize,
        kh: usize,
        kw: usize,
        bias: bool,
    ) -> Result<Conv2dWeight> {
        Ok(self.conv_weight_and_bias(cout, cin, kh, kw, bias)?.0)
    }

    /// A random conv weight, with the random bias `[cout]` it has when `bias` (else it has
    /// none, and the bias is only drawn).
    fn conv_weight_and_bias(
        &mut self,
        cout: usize,
        cin: usize,
        kh: usize,
        kw: usize,
        bias: bool,
    ) -> Result<(Conv2dWeight, Tensor)> {
        let w = self.randn(&[cout, cin, kh, kw]);
        let b = self.randn(&[cout]);
        Ok((Conv2dWeight::from_oihw(&w, bias.then_some(&b))?, b))
    }

    /// A conv with a bias per sample `[batch, cout]` in place of the weight's bias `b`
    /// (which the weight has), against the CPU's conv less `b` plus each sample's row; with
    /// `one_launch`, split-K products summed in their own launch.
    fn conv_sample_bias(
        &mut self,
        x: &Tensor,
        (w, b): (&Conv2dWeight, &Tensor),
        p: Conv2dParams,
        one_launch: bool,
    ) -> Result<(CudaTensor, Tensor)> {
        let (batch, cout) = (x.shape()[0], b.shape()[0]);
        let sample_bias = self.randn(&[batch, cout]);
        let gw = CudaConv2dWeight::upload(self.dev, w)?;
        let (gx, gbias) = (self.up(x)?, self.up(&sample_bias)?);
        let run = |dev: &CudaDevice| dev.conv2d_sample_bias(&gx, &gw, p, &gbias);
        let got = if one_launch {
            self.one_launch_split_k(run)?
        } else {
            run(self.dev)?
        };
        let want = x
            .conv2d(w, p)?
            .sub(b)?
            .add(&sample_bias.reshape(&[batch, 1, 1, cout])?)?;
        Ok((got, want))
    }

    fn conv(&mut self) -> Result<()> {
        // (kh, kw, stride, padding): SD's 3x3 same and downsampling convs, pointwise, and an
        // uneven 2x3 kernel without padding.
        let kernels = [(3, 3, 1, 1), (3, 3, 2, 1), (1, 1, 1, 0), (2, 3, 2, 0)];
        for (cin, cout) in [(3, 5), (40, 77), (77, 40)] {
            for (kh, kw, stride, padding) in kernels {
                let p = Conv2dParams { stride, padding };
                let bias = cin != 77;
                let w = self.conv_weight(cout, cin, kh, kw, bias)?;
                let gw = CudaConv2dWeight::upload(self.dev, &w)?;
                let x = self.randn(&[2, 7, 9, cin]);
                let got = self.dev.conv2d(&self.up(&x)?, &gw, p)?;
                let want = x.conv2d(&w, p)?;
                let size = format!("2x7x9x{cin}->{cout} {kh}x{kw}/{stride} p{padding}");
                self.record("conv2d", size.clone(), &got, &want, GEMM_TOL)?;
                let got = self.dev.conv2d_tf32(&self.up(&x)?, &gw, p)?;
                self.record(
                    "conv2d_tf32",
                    size.clone(),
                    &got,
                    &want,
                    tf32_tol(kh * kw * cin),
                )?;
                if (kh, stride) == (3, 1) {
                    let (wb, b) = self.conv_weight_and_bias(cout, cin, kh, kw, true)?;
                    let (got, want) = self.conv_sample_bias(&x, (&wb, &b), p, false)?;
                    self.record("conv2d_sample_bias", size.clone(), &got, &want, GEMM_TOL)?;
                }
                let residual = self.randn(want.shape());
                let got = self
                    .dev
                    .conv2d_add(&self.up(&x)?, &gw, p, &self.up(&residual)?)?;
                self.record("conv2d_add", size, &got, &want.add(&residual)?, GEMM_TOL)?;
            }
        }
        // SD's deepest 3x3 convs: an 8x8 map, wide channels, few output tiles: split-K.
        for (cin, cout, bias) in [(320, 77, true), (643, 130, false)] {
            let w = self.conv_weight(cout, cin, 3, 3, bias)?;
            let gw = CudaConv2dWeight::upload(self.dev, &w)?;
            let x = self.randn(&[2, 8, 8, cin]);
            let got = self
                .dev
                .conv2d(&self.up(&x)?, &gw, Conv2dParams::SAME_3X3)?;
            let want = x.conv2d(&w, Conv2dParams::SAME_3X3)?;
            let size = format!("2x8x8x{cin}->{cout} 3x3/1 p1");
            self.record("conv2d splitk", size.clone(), &got, &want, GEMM_TOL)?;
            // A residual added by the reduction.
            let residual = self.randn(want.shape());
            let got = self.dev.conv2d_add(
                &self.up(&x)?,
                &gw,
                Conv2dParams::SAME_3X3,
                &self.up(&residual)?,
            )?;
            let want = want.add(&residual)?;
            self.record("conv2d_add splitk", size.clone(), &got, &want, GEMM_TOL)?;
            let (gx, gresidual) = (self.up(&x)?, self.up(&residual)?);
            let got = self.one_launch_split_k(|dev| {
                dev.conv2d_add(&gx, &gw, Conv2dParams::SAME_3X3, &gresidual)
            })?;
            self.record(
                "conv2d_add splitk one-launch",
                size.clone(),
                &got,
                &want,
                GEMM_TOL,
            )?;
            // A bias per sample added by the reduction, then in one launch.
            let (wb, b) = self.conv_weight_and_bias(cout, cin, 3, 3, true)?;
            for (op, one_launch) in [
                ("conv2d_sample_bias splitk", false),
                ("conv2d_sample_bias splitk one-launch", true),
            ] {
                let (got, want) =
                    self.conv_sample_bias(&x, (&wb, &b), Conv2dParams::SAME_3X3, one_launch)?;
                self.record(op, size.clone(), &got, &want, GEMM_TOL)?;
            }
        }
        Ok(())
    }

    /// Two segments of a ragged batch, ~30% active input positions each, ~30% (or all) of
    /// the outputs, the cache as f32 and f16.
    fn masked_conv(&mut self) -> Result<()> {
        let (h, w) = (7, 9);
        for (cin, cout, stride, all_outputs) in [
            (40, 77, 1, false),
            (3, 5, 1, true),
            (40, 77, 2, false),
            (77, 40, 2, true),
        ] {
            let p = Conv2dParams { stride, padding: 1 };
            let own_bias = cin != 77;
            let (wt, b) = self.conv_weight_and_bias(cout, cin, 3, 3, own_bias)?;
            let gw = CudaConv2dWeight::upload(self.dev, &wt)?;
            let (oh, ow) = ((h + 2 - 3) / stride + 1, (w + 2 - 3) / stride + 1);
            let mut active = Vec::new();
            let mut outputs = Vec::new();
            let mut fresh = Vec::new();
            let mut cached = Vec::new();
            for seg in 0..2u64 {
                let a = TokenSet::from_positions(
                    h,
                    w,
                    some_positions(h * w, 30, seg + 7 * cin as u64),
                )?;
                let o = if all_outputs {
                    TokenSet::full(oh, ow)
                } else {
                    TokenSet::from_positions(oh, ow, some_positions(oh * ow, 30, seg + 100))?
                };
                fresh.push(self.randn(&[a.len(), cin]));
                cached.push(self.randn(&[h, w, cin]));
                active.push(a);
                outputs.push(o);
            }
            let size = format!(
                "2 seg 7x9x{cin}->{cout} /{stride} {} out",
                if all_outputs { "all" } else { "30%" }
            );
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let cached_t = cached
                    .iter()
                    .map(|c| c.to_dtype(dtype))
                    .collect::<Result<Vec<_>>>()?;
                let segs: Vec<MaskedConvSegment<'_>> = (0..2)
                    .map(|i| MaskedConvSegment {
                        fresh: &fresh[i],
                        active: &active[i],
                        cached: &cached_t[i],
                        outputs: &outputs[i],
                    })
                    .collect();
                let want = wt.masked_conv2d(&segs, p)?;
                let args = (&gw, &fresh[..], &active[..], &cached_t[..], &outputs[..], p);
                let none = MaskedExtras::default();
                let [op, op_f16] = match dtype {
                    DType::F32 => ["masked_conv_f32", "masked_conv_f32 kernels_f16"],
                    DType::F16 => ["masked_conv_f16", "masked_conv_f16 kernels_f16"],
                    _ => ["masked_conv_bf16", "masked_conv_bf16 kernels_f16"],
                };
                let got = self.masked_as(dtype, args, none)?;
                self.record(op, size.clone(), &got, &want, GEMM_TOL)?;
                // On f16 tensor cores: products of f16-rounded operands.
                let f16_tol = tf32_tol(9 * cin);
                let got = self.with_gemm_backend(GemmBackend::KernelsF16, |_| {
                    self.masked_as(dtype, args, none)
                })?;
                self.record(op_f16, size.clone(), &got, &want, f16_tol)?;
                if dtype == DType::F16 {
                    // The cached step's cases: a residual added as the rows are written (the
                    // resnets' second conv), and a bias per segment in place of the weight's
                    // (the first, with the time embedding), each also in one launch.
                    let residual = self.randn(want.shape());
                    let sample_bias = self.randn(&[2, cout]);
                    let segment_of_row: Vec<u32> = (0..2u32)
                        .flat_map(|i| std::iter::repeat_n(i, outputs[i as usize].len()))
                        .collect();
                    let without_own = if own_bias {
                        want.sub(&b)?
                    } else {
                        want.clone()
                    };
                    let with_residual = (
                        MaskedExtras {
                            residual: Some(self.up(&residual)?),
                            sample_bias: None,
                        },
                        want.add(&residual)?,
                        [
                            "masked_conv_f16_add",
                            "masked_conv_f16_add one-launch",
                            "masked_conv_f16_add kernels_f16",
                            "masked_conv_f16_add kernels_f16 one-launch",
                        ],
                    );
                    let with_sample_bias = (
                        MaskedExtras {
                            residual: None,
                            sample_bias: Some(self.up(&sample_bias)?),
                        },
                        without_own.add(&sample_bias.gather_rows(&segment_of_row)?)?,
                        [
                            "masked_conv_f16_sample_bias",
                            "masked_conv_f16_sample_bias one-launch",
                            "masked_conv_f16_sample_bias kernels_f16",
                            "masked_conv_f16_sample_bias kernels_f16 one-launch",
                        ],
                    );
                    for (extras, want, ops) in [with_residual, with_sample_bias] {
                        let backends = [
                            (GemmBackend::Kernels, GEMM_TOL),
                            (GemmBackend::KernelsOneLaunch, GEMM_TOL),
                            (GemmBackend::KernelsF16, f16_tol),
                            (GemmBackend::KernelsF16OneLaunch, f16_tol),
                        ];
                        for (op, (backend, tol)) in ops.into_iter().zip(backends) {
                            let got = self.with_gemm_backend(backend, |_| {
                                self.masked::<f16>(args, extras.borrow())
                            })?;
                            self.record(op, size.clone(), &got, &want, tol)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// [`Runner::masked`] with the cache as `dtype` says (f32, f16 or bf16).
    fn masked_as(
        &self,
        dtype: DType,
        args: MaskedConvArgs<'_>,
        extras: MaskedExtras<&CudaTensor>,
    ) -> Result<CudaTensor> {
        match dtype {
            DType::F32 => self.masked::<f32>(args, extras),
            DType::F16 => self.masked::<f16>(args, extras),
            _ => self.masked::<bf16>(args, extras),
        }
    }

    /// The masked conv on the device, its cached maps uploaded as `C`, plus a residual or
    /// with a bias per segment when given.
    fn masked<C: GpuElement>(
        &self,
        (w, fresh, active, cached, outputs, p): MaskedConvArgs<'_>,
        MaskedExtras {
            residual,
            sample_bias,
        }: MaskedExtras<&CudaTensor>,
    ) -> Result<CudaTensor> {
        let gcached = cached
            .iter()
            .map(|c| CudaTensor::<C>::upload(self.dev, c))
            .collect::<Result<Vec<_>>>()?;
        let stacked = Tensor::concat_batch(&fresh.iter().collect::<Vec<_>>())?;
        let segs: Vec<CudaMaskedConvSegment<'_, C>> = (0..fresh.len())
            .map(|i| CudaMaskedConvSegment {
                active: &active[i],
                cached: &gcached[i],
                outputs: &outputs[i],
            })
            .collect();
        let stacked = self.up(&stacked)?;
        match (residual, sample_bias) {
            (Some(r), _) => self.dev.masked_conv2d_add(w, &stacked, &segs, p, r),
            (None, Some(b)) => self.dev.masked_conv2d_sample_bias(w, &stacked, &segs, p, b),
            (None, None) => self.dev.masked_conv2d(w, &stacked, &segs, p),
        }
    }
}

/// One timed kernel: mean time per launch and its rate.
#[derive(Clone, Debug)]
pub struct Timing {
    pub op: &'static str,
    pub size: String,
    pub ms: f64,
    pub gflops: f64,
}

/// Mean milliseconds per call of `f` (after one warm-up call): at least 5 calls and 200 ms.
fn time_ms(dev: &CudaDevice, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    dev.synchronize()?;
    let start = std::time::Instant::now();
    let mut calls = 0u32;
    while calls < 5 || start.elapsed().as_millis() < 200 {
        f()?;
        calls += 1;
        if calls.is_multiple_of(5) {
            dev.synchronize()?;
        }
    }
    dev.synchronize()?;
    Ok(start.elapsed().as_secs_f64() * 1e3 / f64::from(calls))
}

/// Times the GEMM-shaped kernels at SD1.5 UNet sizes: the linear layers at 64x64 and 16x16
/// latents (4096 x 320 x 320, 1024 x 1280 x 1280), a 4096^3 GEMM, the 3x3 conv of a
/// 64x64x320 map, and the same conv masked at 20% (f16 cache).
pub fn timings(dev: &CudaDevice) -> Result<Vec<Timing>> {
    let mut out = Vec::new();
    let randn = |shape: &[usize], seed| {
        CudaTensor::<f32>::upload(dev, &Tensor::randn(shape, seed, Device::Cpu))
    };
    for (m, k, n) in [(4096, 320, 320), (1024, 1280, 1280), (4096, 4096, 4096)] {
        let (a, w, bias) = (randn(&[m, k], 1)?, randn(&[n, k], 2)?, randn(&[n], 3)?);
        let mut c = CudaTensor::zeros(dev, &[m, n])?;
        let ms = time_ms(dev, || {
            dev.gemm(&a, &w, true, Some(&bias), 1.0, 0.0, &mut c)
        })?;
        out.push(Timing {
            op: "linear",
            size: format!("{m}x{k}x{n}"),
            ms,
            gflops: 2.0 * (m * n * k) as f64 / ms / 1e6,
        });
        let ms = time_ms(dev, || {
            dev.gemm_tf32(&a, &w, true, Some(&bias), 1.0, 0.0, &mut c)
        })?;
        out.push(Timing {
            op: "linear_tf32",
            size: format!("{m}x{k}x{n}"),
            ms,
            gflops: 2.0 * (m * n * k) as f64 / ms / 1e6,
        });
    }
    // SD1.5's self-attention at a 64x64 latent (8 heads of 40) and the cross-attention to 77
    // tokens, with each attention kernel.
    for (lk, names) in [
        (
            4096,
            [
                "self-attn rows",
                "self-attn tiles",
                "self-attn flash",
                "self-attn flash mma",
                "self-attn flash mma bf16",
            ],
        ),
        (
            77,
            [
                "cross-attn rows",
                "cross-attn tiles",
                "cross-attn flash",
                "cross-attn flash mma",
                "cross-attn flash mma bf16",
            ],
        ),
    ] {
        let (batch, lq, c, heads) = (2, 4096, 320, 8);
        let (q, k, v) = (
            randn(&[batch, lq, c], 9)?,
            randn(&[batch, lk, c], 10)?,
            randn(&[batch, lk, c], 11)?,
        );
        let kernels = [
            AttentionKernel::Rows,
            AttentionKernel::Tiles,
            AttentionKernel::Flash,
            AttentionKernel::FlashMma,
            AttentionKernel::FlashMmaBf16,
        ];
        for (op, kernel) in names.into_iter().zip(kernels) {
            let ms = time_ms(dev, || {
                dev.attention_with(kernel, &q, &k, &v, heads, false)
                    .map(|_| ())
            })?;
            out.push(Timing {
                op,
                size: format!("{batch}x{lq}x{lk}x{c} h{heads}"),
                ms,
                gflops: 4.0 * (batch * lq * lk * c) as f64 / ms / 1e6,
            });
        }
    }
    let (h, w, c) = (64, 64, 320);
    let gw = sd_conv_weight(dev)?;
    let x = randn(&[1, h, w, c], 6)?;
    let ms = time_ms(dev, || {
        dev.conv2d(&x, &gw, Conv2dParams::SAME_3X3).map(|_| ())
    })?;
    let flops = 2.0 * (h * w * 9 * c * c) as f64;
    out.push(Timing {
        op: "conv2d",
        size: format!("1x{h}x{w}x{c}->{c} 3x3"),
        ms,
        gflops: flops / ms / 1e6,
    });
    let ms = time_ms(dev, || {
        dev.conv2d_tf32(&x, &gw, Conv2dParams::SAME_3X3).map(|_| ())
    })?;
    out.push(Timing {
        op: "conv2d_tf32",
        size: format!("1x{h}x{w}x{c}->{c} 3x3"),
        ms,
        gflops: flops / ms / 1e6,
    });
    out.extend(deep_conv_timings(dev, "conv2d")?);
    out.push(masked_conv_timing(dev, "masked_conv_f16", &gw)?);
    out.extend(masked_attention_timings(dev)?);
    out.extend(f16_kernel_timings(dev)?);
    out.extend(cublas_timings(dev)?);
    Ok(out)
}

/// SD1.5's deep 3x3 convs (1280 channels at 16x16 and 8x8, CFG batch 2) through
/// [`CudaDevice::conv2d`], as `op`: few output tiles, long k, so split-K.
fn deep_conv_timings(dev: &CudaDevice, op: &'static str) -> Result<Vec<Timing>> {
    let mut out = Vec::new();
    for side in [16, 8] {
        let c = 1280;
        let wt = Conv2dWeight::from_oihw(
            &Tensor::randn(&[c, c, 3, 3], 12, Device::Cpu),
            Some(&Tensor::randn(&[c], 13, Device::Cpu)),
        )?;
        let gw = CudaConv2dWeight::upload(dev, &wt)?;
        let x = CudaTensor::upload(dev, &Tensor::randn(&[2, side, side, c], 14, Device::Cpu))?;
        let ms = time_ms(dev, || {
            dev.conv2d(&x, &gw, Conv2dParams::SAME_3X3).map(|_| ())
        })?;
        out.push(Timing {
            op,
            size: format!("2x{side}x{side}x{c}->{c} 3x3"),
            ms,
            gflops: 2.0 * (2 * side * side * 9 * c * c) as f64 / ms / 1e6,
        });
    }
    Ok(out)
}

/// The 3x3 conv `gw` of a 64x64x320 map masked at 20% (f16 cache), as `op`.
fn masked_conv_timing(dev: &CudaDevice, op: &'static str, gw: &CudaConv2dWeight) -> Result<Timing> {
    let (h, w, c) = (64, 64, 320);
    let active = TokenSet::from_positions(h, w, some_positions(h * w, 20, 1))?;
    let outputs = TokenSet::from_positions(h, w, some_positions(h * w, 20, 2))?;
    let fresh = CudaTensor::upload(dev, &Tensor::randn(&[active.len(), c], 7, Device::Cpu))?;
    let cached = CudaTensor::<f16>::upload(
        dev,
        &Tensor::randn(&[h, w, c], 8, Device::Cpu).to_dtype(DType::F16)?,
    )?;
    let segs = [CudaMaskedConvSegment {
        active: &active,
        cached: &cached,
        outputs: &outputs,
    }];
    let ms = time_ms(dev, || {
        dev.masked_conv2d(gw, &fresh, &segs, Conv2dParams::SAME_3X3)
            .map(|_| ())
    })?;
    Ok(Timing {
        op,
        size: format!("1x{h}x{w}x{c}->{c} 3x3, {} rows", outputs.len()),
        ms,
        gflops: 2.0 * (outputs.len() * 9 * c * c) as f64 / ms / 1e6,
    })
}

/// The GEMM rows above on the f16 tensor-core kernels ([`GemmBackend::KernelsF16`]): the
/// linear shapes (with a layer's kept f16 weight), the 3x3 convs, and the masked conv.
fn f16_kernel_timings(dev: &CudaDevice) -> Result<Vec<Timing>> {
    keeping_backend(dev, || {
        let mut out = backend_timings(
            dev,
            GemmBackend::KernelsF16,
            ("linear kernels_f16", "conv2d kernels_f16"),
        )?;
        out.extend(deep_conv_timings(dev, "conv2d kernels_f16")?);
        out.push(masked_conv_timing(
            dev,
            "masked_conv_f16 kernels_f16",
            &sd_conv_weight(dev)?,
        )?);
        Ok(out)
    })
}

/// A 320 -> 320 3x3 conv with a bias: SD1.5's at a 64x64 latent.
fn sd_conv_weight(dev: &CudaDevice) -> Result<CudaConv2dWeight> {
    let c = 320;
    let conv = Conv2dWeight::from_oihw(
        &Tensor::randn(&[c, c, 3, 3], 4, Device::Cpu),
        Some(&Tensor::randn(&[c], 5, Device::Cpu)),
    )?;
    CudaConv2dWeight::upload(dev, &conv)
}

/// The linear and 3x3 conv shapes above through cuBLAS, f32, TF32 and f16, where the machine has
/// it (none where not).
fn cublas_timings(dev: &CudaDevice) -> Result<Vec<Timing>> {
    keeping_backend(dev, || {
        if let Err(e) = dev.set_gemm_backend(GemmBackend::Cublas) {
            eprintln!("selftest: cuBLAS timings skipped: {e}");
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for (backend, ops) in [
            (GemmBackend::Cublas, ("linear cublas", "conv2d cublas")),
            (
                GemmBackend::CublasTf32,
                ("linear cublas_tf32", "conv2d cublas_tf32"),
            ),
            (
                GemmBackend::CublasF16,
                ("linear cublas_f16", "conv2d cublas_f16"),
            ),
        ] {
            out.extend(backend_timings(dev, backend, ops)?);
        }
        Ok(out)
    })
}

/// The linear shapes and the 64x64x320 3x3 conv with the device's GEMMs on `backend` (left
/// chosen), named `(linear_op, conv_op)`. With f16 products a layer passes its kept f16
/// weight: that is timed, not the rounding of the weight per call.
fn backend_timings(
    dev: &CudaDevice,
    backend: GemmBackend,
    (linear_op, conv_op): (&'static str, &'static str),
) -> Result<Vec<Timing>> {
    dev.set_gemm_backend(backend)?;
    let mut out = Vec::new();
    let randn =
        |shape: &[usize], seed| CudaTensor::upload(dev, &Tensor::randn(shape, seed, Device::Cpu));
    let gw = sd_conv_weight(dev)?;
    let x = randn(&[1, 64, 64, 320], 6)?;
    for (m, k, n) in [(4096, 320, 320), (1024, 1280, 1280), (4096, 4096, 4096)] {
        let (a, w, bias) = (randn(&[m, k], 1)?, randn(&[n, k], 2)?, randn(&[n], 3)?);
        let half = dev.f32_to_f16(&w)?;
        let ms = if backend.f16_products() {
            time_ms(dev, || {
                dev.linear_f16_weight(&a, &half, Some(&bias)).map(|_| ())
            })?
        } else {
            time_ms(dev, || dev.linear(&a, &w, Some(&bias)).map(|_| ()))?
        };
        out.push(Timing {
            op: linear_op,
            size: format!("{m}x{k}x{n}"),
            ms,
            gflops: 2.0 * (m * n * k) as f64 / ms / 1e6,
        });
    }
    let ms = time_ms(dev, || {
        dev.conv2d(&x, &gw, Conv2dParams::SAME_3X3).map(|_| ())
    })?;
    out.push(Timing {
        op: conv_op,
        size: "1x64x64x320->320 3x3".into(),
        ms,
        gflops: 2.0 * 64.0 * 64.0 * 9.0 * 320.0 * 320.0 / ms / 1e6,
    });
    Ok(out)
}

/// SD1.5's masked self-attention at a 64x64 latent, 20% of the positions active, CFG's two
/// segments: the fused kernel against the per-segment path it replaced (widen the f16 cache,
/// scatter the fresh rows, dense flash attention, per segment).
fn masked_attention_timings(dev: &CudaDevice) -> Result<Vec<Timing>> {
    let (h, w, c, heads) = (64, 64, 320, 8);
    let tokens = TokenSet::from_positions(h, w, some_positions(h * w, 20, 3))?;
    let n = tokens.len();
    let randn =
        |shape: &[usize], seed| CudaTensor::upload(dev, &Tensor::randn(shape, seed, Device::Cpu));
    let half = |seed| {
        CudaTensor::<f16>::upload(
            dev,
            &Tensor::randn(&[h * w, c], seed, Device::Cpu).to_dtype(DType::F16)?,
        )
    };
    let (q, k, v) = (
        randn(&[2 * n, c], 15)?,
        randn(&[2 * n, c], 16)?,
        randn(&[2 * n, c], 17)?,
    );
    let cached = [(half(18)?, half(19)?), (half(20)?, half(21)?)];
    let segments: Vec<CudaAttentionSegment<'_>> = (0..2)
        .map(|i| CudaAttentionSegment {
            rows: i * n..(i + 1) * n,
            tokens: &tokens,
            cached_k: &cached[i].0,
            cached_v: &cached[i].1,
        })
        .collect();
    let size = format!("2 seg 64x64x320 h8, {n} rows each");
    let flops = 4.0 * (2 * n * h * w * c) as f64;
    let mut out = Vec::new();
    for (op, per_segment) in [
        ("masked self-attn fused", false),
        ("masked self-attn per segment", true),
    ] {
        let ms = time_ms(dev, || {
            let attended = if per_segment {
                dev.masked_attention_per_segment(&q, &k, &v, &segments, heads)
            } else {
                dev.masked_attention(&q, &k, &v, &segments, heads)
            };
            attended.map(|_| ())
        })?;
        out.push(Timing {
            op,
            size: size.clone(),
            ms,
            gflops: flops / ms / 1e6,
        });
    }
    Ok(out)
}

/// The check groups, in the order [`run`] runs them. `retouch selftest --group NAME` runs one,
/// so a kernel that faults (and poisons the CUDA context) hides only its own group's results
/// when each group runs in its own process, as `tools/gpu-check.sh` does.
pub const GROUPS: [&str; 9] = [
    "elementwise",
    "norms",
    "rows",
    "layout",
    "lora",
    "attention",
    "gemm",
    "conv",
    "masked_conv",
];

/// Runs every check on `dev`; a driver error stops the run (it is not a tolerance failure).
pub fn run(dev: &CudaDevice) -> Result<Vec<Check>> {
    run_groups(dev, &GROUPS)
}

/// Runs the named groups' checks (names from [`GROUPS`]; an unknown name is an error).
pub fn run_groups(dev: &CudaDevice, groups: &[&str]) -> Result<Vec<Check>> {
    let mut r = Runner {
        dev,
        checks: Vec::new(),
        seed: 0x5e1f,
    };
    for &group in groups {
        match group {
            "elementwise" => r.elementwise()?,
            "norms" => r.norms()?,
            "rows" => r.rows()?,
            "layout" => {
                r.layout()?;
                r.staged_uploads()?;
                r.device_pool()?
            }
            "lora" => r.lora()?,
            "attention" => r.attention()?,
            "gemm" => {
                r.gemm()?;
                r.f16_kernels()?;
                r.cublas()?
            }
            "conv" => r.conv()?,
            "masked_conv" => r.masked_conv()?,
            other => {
                return crate::error::invalid(
                    "selftest",
                    format!("unknown group {other:?}; groups: {}", GROUPS.join(", ")),
                );
            }
        }
    }
    dev.synchronize()?;
    Ok(r.checks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_err_is_relative_above_one_and_catches_nan() {
        let a = Tensor::from_vec(vec![1.0f32, 100.0], &[2]).unwrap();
        let b = Tensor::from_vec(vec![1.5f32, 101.0], &[2]).unwrap();
        assert_eq!(max_err(&b, &a), 0.5);
        let n = Tensor::from_vec(vec![f32::NAN, 100.0], &[2]).unwrap();
        let check = Check {
            op: "x",
            size: String::new(),
            max_err: max_err(&n, &a),
            tolerance: 1.0,
        };
        assert!(!check.passed());
        let c = Tensor::from_vec(vec![1.0f32], &[1]).unwrap();
        assert_eq!(max_err(&c, &a), f32::INFINITY);
    }
}
