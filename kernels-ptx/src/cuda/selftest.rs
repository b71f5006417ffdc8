//! Every CUDA kernel against its CPU implementation, on random inputs of awkward sizes
//! (rows 1, 7, 333; channels 3, 40, 77, 320, 1283): what `retouch selftest` runs.
//!
//! The error of an element is `|gpu - cpu| / max(1, |cpu|)`: absolute for values up to 1,
//! relative above, so one tolerance per op serves inputs of any scale.

use half::f16;

use super::{CudaDevice, CudaTensor};
use crate::{DType, Device, Result, Tensor};

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

            let w16 = w.to_dtype(DType::F16)?;
            let mut want = w16.clone();
            want.lora_patch(&up, &down, 0.75)?;
            let mut gw = CudaTensor::<f16>::upload(self.dev, &w16)?;
            self.dev.lora_patch(&mut gw, &gu, &gd, 0.75)?;
            let got = gw.download(self.dev)?;
            // One f16 rounding apart at most (the f32 sums differ in order).
            self.checks.push(Check {
                op: "lora_patch_f16",
                size,
                max_err: max_err(&got, &want),
                tolerance: 2e-3,
            });
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
        ];
        for (batch, lq, lk, c, heads, causal) in cases {
            let q = self.randn(&[batch, lq, c]);
            let k = self.randn(&[batch, lk, c]);
            let v = self.randn(&[batch, lk, c]);
            let (gq, gk, gv) = (self.up(&q)?, self.up(&k)?, self.up(&v)?);
            let got = self.dev.attention(&gq, &gk, &gv, heads, causal)?;
            let want = Tensor::attention(&q, &k, &v, heads, causal)?;
            let size = format!(
                "{batch}x{lq}x{lk}x{c} h{heads}{}",
                if causal { " causal" } else { "" }
            );
            self.record("attention", size, &got, &want, 1e-4)?;
        }
        Ok(())
    }
}

/// Runs every check on `dev`; a driver error stops the run (it is not a tolerance failure).
pub fn run(dev: &CudaDevice) -> Result<Vec<Check>> {
    let mut r = Runner {
        dev,
        checks: Vec::new(),
        seed: 0x5e1f,
    };
    r.elementwise()?;
    r.norms()?;
    r.rows()?;
    r.lora()?;
    r.attention()?;
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
