//! Launchers of the GEMM-shaped kernels (`kernels-ptx/device/gemm.rs`, `mma.rs`,
//! `gemm_f16.rs`): sgemm, conv2d as an implicit GEMM, the masked conv over a ragged batch,
//! the TF32 tensor-core sgemm and conv2d, and all three on f16 tensor cores.
//!
//! All share one launch shape: a 128 x 64 output tile per block of 256 threads, with
//! `SHARED_BYTES` of dynamic shared memory (`SHARED_BYTES_TF32`, `SHARED_BYTES_F16` for the
//! tensor-core ones).

use std::sync::OnceLock;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use half::f16;

use super::blas::BlasMath;
#[cfg(doc)]
use super::blas::GemmBackend;
use super::ops::{grid_stride, len_u32};
use super::tables::TableSet;
use super::{CudaDevice, CudaTensor, GpuElement, PooledSlice, device_addresses, element_addresses};
use crate::error::{invalid, shape_err};
use crate::{Conv2dParams, Conv2dWeight, Result, TokenSet};

/// Output rows and columns of one block's tile.
const TILE_M: usize = 128;
const TILE_N: usize = 64;
/// The CUDA-core kernels' double-buffered shared tiles: 2 x (16 x 132 + 16 x 68) floats.
const SHARED_BYTES: u32 = 2 * (16 * 132 + 16 * 68) * 4;
/// The TF32 kernel's: 2 x (16 x 136 + 16 x 72) floats (strides chosen for its fragments).
const SHARED_BYTES_TF32: u32 = 2 * (16 * 136 + 16 * 72) * 4;
/// The f16 kernels': 2 x (128 + 64) rows of 40 halves (32 k, padded).
const SHARED_BYTES_F16: u32 = 2 * (128 + 64) * 40 * 2;

/// Which GEMM kernel: f32 on CUDA cores, TF32 or f16 on tensor cores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cores {
    Cuda,
    TensorTf32,
    TensorF16,
}

impl Cores {
    fn shared_bytes(self) -> u32 {
        match self {
            Cores::Cuda => SHARED_BYTES,
            Cores::TensorTf32 => SHARED_BYTES_TF32,
            Cores::TensorF16 => SHARED_BYTES_F16,
        }
    }

    /// Whether its kernels take a `gridDim.z` split of k (the TF32 ones do not).
    fn splits_k(self) -> bool {
        self != Cores::TensorTf32
    }
}

/// A GEMM's B operand: f32 `[n, k]` (`transposed`: a linear weight) or `[k, n]`, for the
/// f32 and TF32 kernels; or f16 `[n, k]` for the f16 tensor-core kernel.
#[derive(Clone, Copy)]
enum BOperand<'a> {
    F32 {
        data: &'a CudaSlice<f32>,
        transposed: bool,
    },
    F16(&'a CudaSlice<f16>),
}

/// The launch of an `m x n` output.
fn tiles(op: &'static str, m: usize, n: usize) -> Result<LaunchConfig> {
    let (gx, gy) = (n.div_ceil(TILE_N), m.div_ceil(TILE_M));
    if gy > 65_535 || gx > 65_535 {
        return invalid(
            op,
            format!("{m} x {n} output exceeds the launch grid (65535 tiles of 128 x 64)"),
        );
    }
    Ok(LaunchConfig {
        grid_dim: (gx as u32, gy as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: SHARED_BYTES,
    })
}

/// Split-K limits: each split covers at least this many 16-wide k tiles (its loads must
/// outweigh its extra output write), and at most this many splits.
const MIN_TILES_PER_SPLIT: usize = 8;
const MAX_SPLITS: usize = 16;

/// How many k-splits an output of `blocks` tiles with inner size `k` gets on a device of
/// `sms` multiprocessors: 1 when the tiles alone give every multiprocessor a block, else
/// enough splits for about two blocks each, as long as each keeps `MIN_TILES_PER_SPLIT`
/// tiles. (A split costs a workspace write and a reduction, so it must buy idle SMs.)
fn k_splits(blocks: usize, k: usize, sms: usize) -> usize {
    if blocks >= sms {
        return 1;
    }
    let target = 2 * sms;
    let by_k = k.div_ceil(16) / MIN_TILES_PER_SPLIT;
    target
        .div_ceil(blocks.max(1))
        .min(by_k)
        .clamp(1, MAX_SPLITS)
}

/// What a GEMM or conv adds to `alpha * product + bias` as it writes C: nothing, `beta`
/// times C's own values (an in-place product), or a residual laid out as C (a residual
/// connection, saving the separate add's launch and its pass over memory).
#[derive(Clone, Copy)]
enum Addend<'a> {
    Nothing,
    OwnValues(f32),
    Residual(&'a CudaSlice<f32>),
}

impl Addend<'_> {
    /// The kernels' `(c_in, beta)` for an output at device address `c`: `c_in` is read only
    /// when `beta != 0`. Every launch here runs on the compute stream (the device turns off
    /// cudarc's per-buffer events), so the addresses need no guard beyond the borrow.
    fn kernel_args(self, stream: &CudaStream, c: u64) -> (u64, f32) {
        match self {
            Addend::Nothing | Addend::OwnValues(0.0) => (0, 0.0),
            Addend::OwnValues(beta) => (c, beta),
            Addend::Residual(r) => (r.device_ptr(stream).0, 1.0),
        }
    }
}

/// Which bias row each output row adds (the kernels' `rows_per_sample`, `sample_of_row`):
/// row 0 of a `[n]` bias for all, `row / rows_per_sample` of a `[batch, n]` one, or a
/// ragged batch's table of each row's sample (a device address).
#[derive(Clone, Copy, Default)]
struct BiasRows {
    rows_per_sample: u32,
    sample_of_row: u64,
}

/// What a GEMM or conv launch of the device's kernels writes: C itself; or (split-K) a
/// `[splits, m, n]` workspace, summed into C afterwards by `splitk_reduce_f32`, or by the
/// launch's own last block per output tile (`one_launch`, [`GemmBackend::KernelsOneLaunch`] and
/// [`GemmBackend::KernelsF16OneLaunch`]).
struct SplitK {
    splits: usize,
    workspace: Option<PooledSlice<f32>>,
    one_launch: bool,
}

impl SplitK {
    /// No split: the launch writes C (and applies alpha, the addend and the bias itself).
    const NONE: SplitK = SplitK {
        splits: 1,
        workspace: None,
        one_launch: false,
    };

    /// Whether `splitk_reduce_f32` must follow the launch: the launch writes raw sums (no
    /// alpha, addend or bias) into the workspace it is given as C.
    fn needs_reduction(&self) -> bool {
        self.workspace.is_some() && !self.one_launch
    }

    /// The launch's C: the workspace when a reduction follows, else `c`.
    fn target<'a>(&'a mut self, c: &'a mut CudaSlice<f32>) -> &'a mut CudaSlice<f32> {
        match self.workspace.as_mut() {
            Some(ws) if !self.one_launch => ws,
            _ => c,
        }
    }

    /// A conv launch's `(residual, beta)` for `addend`: none when a reduction follows (it
    /// adds the addend), else the addend's.
    fn addend_args(&self, addend: Addend<'_>, stream: &CudaStream) -> (u64, f32) {
        if self.needs_reduction() {
            (0, 0.0)
        } else {
            addend.kernel_args(stream, 0)
        }
    }

    /// The kernels' `(ws, counters)` device addresses: null unless the launch sums its own
    /// slices.
    fn sums_args(&self, dev: &CudaDevice) -> (u64, u64) {
        match &self.workspace {
            Some(ws) if self.one_launch => {
                let stream = dev.stream();
                (
                    ws.device_ptr(stream).0,
                    dev.split_counters.device_ptr(stream).0,
                )
            }
            _ => (0, 0),
        }
    }
}

impl CudaDevice {
    /// The cores the device's own GEMM kernels run on under the chosen backend.
    fn kernel_cores(&self) -> Cores {
        if self.gemm_backend().f16_kernels() {
            Cores::TensorF16
        } else {
            Cores::Cuda
        }
    }

    /// The device address of a conv weight as the kernels on `cores` read it: the packed
    /// f32 `[k, cout]`, or for f16 tensor cores its transposed f16 copy (made on first use).
    fn weight_operand(&self, weight: &CudaConv2dWeight, cores: Cores) -> Result<u64> {
        let stream = self.stream();
        Ok(match cores {
            Cores::TensorF16 => weight.transposed_f16(self)?.data.device_ptr(stream).0,
            _ => weight.packed.data.device_ptr(stream).0,
        })
    }

    /// The split of an `m x n x k` product launched as `cfg` (its grid's z set here).
    fn plan_split(
        &self,
        op: &'static str,
        cfg: &mut LaunchConfig,
        (m, n, k): (usize, usize, usize),
    ) -> Result<SplitK> {
        let blocks = (cfg.grid_dim.0 * cfg.grid_dim.1) as usize;
        let splits = k_splits(blocks, k, self.sm_count() as usize);
        if splits == 1 {
            return Ok(SplitK::NONE);
        }
        len_u32(op, splits * m * n)?;
        cfg.grid_dim.2 = splits as u32;
        // SAFETY: every split writes its whole `[m, n]` slice, an empty share of k included
        // (`gemm_block`), and the reduction reads only the slices.
        let workspace = unsafe { self.alloc_pooled::<f32>(op, splits * m * n) }?;
        // A split product has fewer tiles than SMs, one counter each.
        let one_launch = self.gemm_backend().one_launch() && blocks <= self.split_counters.len();
        Ok(SplitK {
            splits,
            workspace: Some(workspace),
            one_launch,
        })
    }

    /// After a split launch, `c = alpha * sum of the slices + addend + bias` (each row's
    /// bias row as `bias_rows` says); nothing when the launch wrote C itself.
    #[allow(clippy::too_many_arguments)]
    fn finish_split(
        &self,
        split: &SplitK,
        c: &mut CudaSlice<f32>,
        bias: Option<(&CudaSlice<f32>, BiasRows)>,
        (m, n): (usize, usize),
        alpha: f32,
        addend: Addend<'_>,
    ) -> Result<()> {
        match &split.workspace {
            Some(ws) if split.needs_reduction() => {
                self.splitk_reduce(ws, split.splits, c, bias, (m, n), alpha, addend)
            }
            _ => Ok(()),
        }
    }

    /// `c = alpha * sum of the workspace slices + addend + bias`.
    #[allow(clippy::too_many_arguments)]
    fn splitk_reduce(
        &self,
        workspace: &CudaSlice<f32>,
        splits: usize,
        c: &mut CudaSlice<f32>,
        bias: Option<(&CudaSlice<f32>, BiasRows)>,
        (m, n): (usize, usize),
        alpha: f32,
        addend: Addend<'_>,
    ) -> Result<()> {
        const K: &str = "splitk_reduce_f32";
        let mn = len_u32(K, m * n)?;
        let (n_u, splits_u) = (n as u32, splits as u32);
        let has_bias = u32::from(bias.is_some());
        let rows = bias.map(|(_, rows)| rows).unwrap_or_default();
        let stream = self.stream();
        let (c_in, beta) = addend.kernel_args(stream, c.device_ptr(stream).0);
        let mut l = stream.launch_builder(self.function(K)?);
        l.arg(workspace)
            .arg(c)
            .arg(&c_in)
            .arg(bias.map_or(workspace, |(b, _)| b))
            .arg(&mn)
            .arg(&n_u)
            .arg(&splits_u)
            .arg(&has_bias)
            .arg(&alpha)
            .arg(&beta)
            .arg(&rows.rows_per_sample)
            .arg(&rows.sample_of_row);
        // SAFETY: matches `splitk_reduce_f32(ws, c, c_in, bias, mn, n, splits, has_bias,
        // alpha, beta, rows_per_sample, sample_of_row)`; the workspace holds `splits * mn`
        // values, c and c_in (read when beta is not 0) `mn`, bias (if read) a row of `n` for
        // every sample `rows` names (checked by the callers).
        self.launched(K, unsafe { l.launch(grid_stride(mn)) })
    }
}

/// What a conv adds besides its product: a residual laid out as the output, and a bias per
/// sample in place of the weight's.
#[derive(Clone, Copy, Default)]
struct ConvExtras<'a> {
    residual: Option<&'a CudaTensor>,
    sample_bias: Option<&'a CudaTensor>,
}

/// A bias per sample must be `[samples, cout]`.
fn check_sample_bias(
    op: &'static str,
    bias: Option<&CudaTensor>,
    samples: usize,
    cout: usize,
) -> Result<()> {
    match bias {
        Some(b) if b.shape() != [samples, cout] => shape_err(
            op,
            format!(
                "bias per sample {:?}, expected [{samples}, {cout}]",
                b.shape()
            ),
        ),
        _ => Ok(()),
    }
}

/// A residual must be laid out as the output it is added to: as many values, the same
/// last dimension (`[batch, h, w, c]` adds to `[batch, h * w, c]`).
fn check_residual(op: &'static str, residual: Option<&CudaTensor>, out: &[usize]) -> Result<()> {
    match residual {
        Some(r)
            if r.elem_count() != out.iter().product::<usize>()
                || r.shape().last() != out.last() =>
        {
            shape_err(
                op,
                format!("residual {:?} does not match the output {out:?}", r.shape()),
            )
        }
        _ => Ok(()),
    }
}

fn kernel_name(cores: Cores) -> &'static str {
    match cores {
        Cores::Cuda => "sgemm_f32",
        Cores::TensorTf32 => "sgemm_tf32",
        Cores::TensorF16 => "gemm_mma_f16",
    }
}

/// A conv layer's weight on the device: the packed `[kh * kw * cin, cout]` matrix of
/// [`Conv2dWeight`] (rows by (ky, kx, ci)) and its optional bias.
#[derive(Debug)]
pub struct CudaConv2dWeight {
    pub(crate) packed: CudaTensor,
    /// `packed` rounded to f16, made on the first f16 GEMM ([`GemmBackend::CublasF16`]);
    /// nothing changes `packed` after the upload, so it never goes stale.
    packed_f16: OnceLock<CudaTensor<f16>>,
    /// `packed` transposed to `[cout, k]` and rounded to f16, made on the first product on
    /// f16 tensor cores ([`GemmBackend::KernelsF16`]); never stale, as `packed_f16`.
    transposed_f16: OnceLock<CudaTensor<f16>>,
    pub(crate) bias: Option<CudaTensor>,
    pub(crate) kh: usize,
    pub(crate) kw: usize,
    pub(crate) cin: usize,
    pub(crate) cout: usize,
}

impl CudaConv2dWeight {
    pub fn upload(dev: &CudaDevice, w: &Conv2dWeight) -> Result<CudaConv2dWeight> {
        let (kh, kw) = w.kernel_size();
        let (cin, cout) = (w.in_channels(), w.out_channels());
        let packed = crate::Tensor::from_vec(w.packed().to_vec(), &[kh * kw * cin, cout])?;
        let bias = match w.bias() {
            Some(b) => Some(CudaTensor::upload(
                dev,
                &crate::Tensor::from_vec(b.to_vec(), &[cout])?,
            )?),
            None => None,
        };
        Ok(CudaConv2dWeight {
            packed: CudaTensor::upload(dev, &packed)?,
            packed_f16: OnceLock::new(),
            transposed_f16: OnceLock::new(),
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

    /// The packed weight as f16, rounded on first use.
    pub(crate) fn packed_f16(&self, dev: &CudaDevice) -> Result<&CudaTensor<f16>> {
        if let Some(half) = self.packed_f16.get() {
            return Ok(half);
        }
        let half = dev.f32_to_f16(&self.packed)?;
        Ok(self.packed_f16.get_or_init(|| half))
    }

    /// The packed weight transposed to `[cout, k]` as f16, made on first use.
    pub(crate) fn transposed_f16(&self, dev: &CudaDevice) -> Result<&CudaTensor<f16>> {
        if let Some(half) = self.transposed_f16.get() {
            return Ok(half);
        }
        let half = dev.transpose_to_f16(&self.packed)?;
        Ok(self.transposed_f16.get_or_init(|| half))
    }

    /// The bias `[cout]` in device memory, if the conv has one.
    pub fn bias(&self) -> Option<&CudaTensor> {
        self.bias.as_ref()
    }

    pub fn out_channels(&self) -> usize {
        self.cout
    }

    /// `(out_h, out_w)` for an `in_h x in_w` input, with the CPU's checks.
    fn out_size(
        &self,
        op: &'static str,
        in_h: usize,
        in_w: usize,
        p: Conv2dParams,
    ) -> Result<(usize, usize)> {
        let (kh, kw, cin, cout) = (self.kh, self.kw, self.cin, self.cout);
        let g = crate::ops::conv::conv_geometry(op, kh, kw, cin, cout, in_h, in_w, p)?;
        Ok((g.out_h(), g.out_w()))
    }
}

/// One request of a masked convolution on the device, as [`crate::MaskedConvSegment`]
/// without its fresh rows (the call takes every segment's, stacked): the active positions,
/// the template's cached input map (`in_h * in_w * cin` values, f32 or f16), and the output
/// positions.
pub struct CudaMaskedConvSegment<'a, C: GpuElement> {
    pub active: &'a TokenSet,
    pub cached: &'a CudaTensor<C>,
    pub outputs: &'a TokenSet,
}

impl CudaDevice {
    /// `c = alpha * a * op(b) + beta * c + bias`, in place: `a = [m, k]`; `b = [n, k]` when
    /// `b_transposed` (PyTorch's linear weight: `a * b^T`) else `[k, n]`; `c = [m, n]`
    /// (read only when `beta != 0`); `bias = [n]`. f32 accumulation on CUDA cores.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        a: &CudaTensor,
        b: &CudaTensor,
        b_transposed: bool,
        bias: Option<&CudaTensor>,
        alpha: f32,
        beta: f32,
        c: &mut CudaTensor,
    ) -> Result<()> {
        self.gemm_on(Cores::Cuda, a, b, b_transposed, bias, alpha, beta, c)
    }

    /// [`CudaDevice::gemm`] on tensor cores: the inputs rounded to TF32 (10-bit mantissa),
    /// products accumulated in f32 (`mma.sync.m16n8k8`). Expect errors of about
    /// `1e-3 * sqrt(k)` times the inputs' scale; compute capability 8.0 or later (the
    /// only PTX this crate ships).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_tf32(
        &self,
        a: &CudaTensor,
        b: &CudaTensor,
        b_transposed: bool,
        bias: Option<&CudaTensor>,
        alpha: f32,
        beta: f32,
        c: &mut CudaTensor,
    ) -> Result<()> {
        self.gemm_on(Cores::TensorTf32, a, b, b_transposed, bias, alpha, beta, c)
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm_on(
        &self,
        cores: Cores,
        a: &CudaTensor,
        b: &CudaTensor,
        b_transposed: bool,
        bias: Option<&CudaTensor>,
        alpha: f32,
        beta: f32,
        c: &mut CudaTensor,
    ) -> Result<()> {
        let op = kernel_name(cores);
        let (&[m, k], &[b0, b1], &[cm, cn]) = (a.shape(), b.shape(), c.shape()) else {
            return shape_err(
                op,
                format!(
                    "expected 2-D a, b, c; got {:?}, {:?}, {:?}",
                    a.shape(),
                    b.shape(),
                    c.shape()
                ),
            );
        };
        let (kb, n) = if b_transposed { (b1, b0) } else { (b0, b1) };
        if kb != k || (cm, cn) != (m, n) {
            return shape_err(
                op,
                format!(
                    "a {:?} times b {:?}{} does not give c {:?}",
                    a.shape(),
                    b.shape(),
                    if b_transposed { "^T" } else { "" },
                    c.shape()
                ),
            );
        }
        if let Some(bias) = bias
            && bias.shape() != [n]
        {
            return shape_err(op, format!("bias must be [{n}], got {:?}", bias.shape()));
        }
        len_u32(op, a.elem_count().max(b.elem_count()).max(c.elem_count()))?;
        let b = BOperand::F32 {
            data: &b.data,
            transposed: b_transposed,
        };
        let addend = (alpha, Addend::OwnValues(beta));
        self.sgemm_raw(cores, a, b, bias, (m, n, k), addend, &mut c.data)
    }

    /// The launch of `sgemm_f32` / `sgemm_tf32` / `gemm_mma_f16` on checked sizes (`a`, `b`
    /// hold `m * k`, `k * n` values; an f16 B goes with `Cores::TensorF16` and no other).
    #[allow(clippy::too_many_arguments)]
    fn sgemm_raw(
        &self,
        cores: Cores,
        a: &CudaTensor,
        b: BOperand<'_>,
        bias: Option<&CudaTensor>,
        (m, n, k): (usize, usize, usize),
        (alpha, addend): (f32, Addend<'_>),
        c: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let k_name = kernel_name(cores);
        debug_assert_eq!(matches!(b, BOperand::F16(_)), cores == Cores::TensorF16);
        if m == 0 || n == 0 {
            return Ok(());
        }
        let mut cfg = tiles(k_name, m, n)?;
        cfg.shared_mem_bytes = cores.shared_bytes();
        let mut split = if cores.splits_k() {
            self.plan_split(k_name, &mut cfg, (m, n, k))?
        } else {
            SplitK::NONE
        };
        let (m_u, n_u, k_u) = (m as u32, n as u32, k as u32);
        let stream = self.stream();
        // A split writes raw partial sums; the reduction applies alpha, the addend and the
        // bias.
        let (has_bias, k_alpha, (c_in, k_beta)) = if split.needs_reduction() {
            (0, 1.0f32, (0, 0.0f32))
        } else {
            let c_at = c.device_ptr(stream).0;
            (
                u32::from(bias.is_some()),
                alpha,
                addend.kernel_args(stream, c_at),
            )
        };
        // Without a bias the kernel never reads the pointer; any valid buffer will do.
        let bias_data = bias.map_or(&*a.data, |t| &*t.data);
        let (ws_at, counters_at) = split.sums_args(self);
        // The f16 kernel's B is always `[n, k]`: it takes no `b_kn`.
        let (b_at, b_kn) = match b {
            BOperand::F32 { data, transposed } => {
                (data.device_ptr(stream).0, Some(u32::from(!transposed)))
            }
            BOperand::F16(data) => (data.device_ptr(stream).0, None),
        };
        {
            let mut l = stream.launch_builder(self.function(k_name)?);
            l.arg(&a.data)
                .arg(&b_at)
                .arg(split.target(c))
                .arg(&c_in)
                .arg(bias_data)
                .arg(&m_u)
                .arg(&n_u)
                .arg(&k_u);
            if let Some(b_kn) = &b_kn {
                l.arg(b_kn);
            }
            l.arg(&has_bias)
                .arg(&k_alpha)
                .arg(&k_beta)
                .arg(&ws_at)
                .arg(&counters_at);
            // SAFETY: matches `sgemm_f32` / `sgemm_tf32(a, b, c, c_in, bias, m, n, k, b_kn,
            // has_bias, alpha, beta, ws, counters)`, or `gemm_mma_f16` (the same without
            // b_kn, B f16 `[n, k]`); sizes checked by the callers (c_in, read
            // when beta is not 0, holds `m * n` values), every index below 2^31; a split
            // launch's C is its `[splits, m, n]` workspace, or in one launch `ws` is, with a
            // zeroed counter per output tile (fewer tiles than counters: `plan_split`).
            self.launched(k_name, unsafe { l.launch(cfg) })?;
        }
        let bias = bias.map(|t| (&*t.data, BiasRows::default()));
        self.finish_split(&split, c, bias, (m, n), alpha, addend)
    }

    /// `x * weight^T + bias` over the last dimension, as [`crate::Tensor::linear`]:
    /// `x = [..., in]`, `weight = [out, in]`, `bias = [out]`.
    pub fn linear(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        bias: Option<&CudaTensor>,
    ) -> Result<CudaTensor> {
        self.linear_with("linear", x, weight, bias, None)
    }

    /// [`CudaDevice::linear`] plus `residual` (laid out as the output: as many values, the
    /// same last dimension), added as the product is written: a residual connection without
    /// its own launch.
    pub fn linear_add(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        bias: Option<&CudaTensor>,
        residual: &CudaTensor,
    ) -> Result<CudaTensor> {
        self.linear_with("linear_add", x, weight, bias, Some(residual))
    }

    fn linear_with(
        &self,
        op: &'static str,
        x: &CudaTensor,
        weight: &CudaTensor,
        bias: Option<&CudaTensor>,
        residual: Option<&CudaTensor>,
    ) -> Result<CudaTensor> {
        let math = self.cublas_math();
        if self.gemm_backend().f16_products() {
            // No kept f16 weight here: rounded per call.
            return self.linear_f16(op, x, &self.f32_to_f16(weight)?, bias, residual);
        }
        let (mut out, dims) = self.linear_output(op, x, weight.shape(), bias, residual)?;
        match math {
            Some(math) => {
                let tf32 = math == BlasMath::Tf32;
                let (a, b) = (&x.data, &weight.data);
                self.cublas_gemm(tf32, a, b, true, bias, dims, (1.0, 0.0), &mut out.data)?;
                if let Some(r) = residual {
                    self.add_rows_in_place(&mut out.data, r, r.elem_count())?;
                }
            }
            None => {
                let b = BOperand::F32 {
                    data: &weight.data,
                    transposed: true,
                };
                let addend = residual.map_or(Addend::Nothing, |r| Addend::Residual(&r.data));
                self.sgemm_raw(Cores::Cuda, x, b, bias, dims, (1.0, addend), &mut out.data)?
            }
        }
        Ok(out)
    }

    /// [`CudaDevice::linear`] on f16 tensor cores with the weight `[out, in]` already in f16
    /// (a layer's kept copy): the device's `gemm_mma_f16` under
    /// [`GemmBackend::KernelsF16`] (and its one-launch variant), which rounds `x` as it reads
    /// it; else cuBLAS, whatever the backend, after rounding `x` in a pass of its own (needs
    /// cuBLAS: [`CudaDevice::set_gemm_backend`] reports whether it loads).
    pub fn linear_f16_weight(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor<f16>,
        bias: Option<&CudaTensor>,
    ) -> Result<CudaTensor> {
        self.linear_f16("linear_f16_weight", x, weight, bias, None)
    }

    /// [`CudaDevice::linear_f16_weight`] plus `residual` (laid out as the output).
    pub fn linear_f16_weight_add(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor<f16>,
        bias: Option<&CudaTensor>,
        residual: &CudaTensor,
    ) -> Result<CudaTensor> {
        self.linear_f16("linear_f16_weight_add", x, weight, bias, Some(residual))
    }

    /// The f16 cuBLAS linear layer behind the entries, its errors named `op`.
    fn linear_f16(
        &self,
        op: &'static str,
        x: &CudaTensor,
        weight: &CudaTensor<f16>,
        bias: Option<&CudaTensor>,
        residual: Option<&CudaTensor>,
    ) -> Result<CudaTensor> {
        let (mut out, dims) = self.linear_output(op, x, weight.shape(), bias, residual)?;
        if self.gemm_backend().f16_kernels() {
            let b = BOperand::F16(&weight.data);
            let addend = residual.map_or(Addend::Nothing, |r| Addend::Residual(&r.data));
            let c = &mut out.data;
            self.sgemm_raw(Cores::TensorF16, x, b, bias, dims, (1.0, addend), c)?;
            return Ok(out);
        }
        let x = self.slice_to_f16(&x.data, x.elem_count())?;
        self.cublas_gemm_f16(&x, &weight.data, true, bias, dims, &mut out.data)?;
        if let Some(r) = residual {
            self.add_rows_in_place(&mut out.data, r, r.elem_count())?;
        }
        Ok(out)
    }

    /// A linear layer's checks (`weight_shape = [out, in]`, `x = [..., in]`, `bias = [out]`,
    /// `residual` laid out as the output) and its output `[..., out]`, unfilled for the GEMM to
    /// write (C itself is never read), with the GEMM's `(rows, out, in)`.
    fn linear_output(
        &self,
        op: &'static str,
        x: &CudaTensor,
        weight_shape: &[usize],
        bias: Option<&CudaTensor>,
        residual: Option<&CudaTensor>,
    ) -> Result<(CudaTensor, (usize, usize, usize))> {
        let &[out_f, in_f] = weight_shape else {
            return shape_err(
                op,
                format!("weight must be [out, in], got {weight_shape:?}"),
            );
        };
        if x.shape().last() != Some(&in_f) {
            return shape_err(
                op,
                format!("input {:?} does not end in {in_f} features", x.shape()),
            );
        }
        if let Some(bias) = bias
            && bias.shape() != [out_f]
        {
            return shape_err(
                op,
                format!("bias {:?} does not match {out_f} outputs", bias.shape()),
            );
        }
        let rows = x.elem_count() / in_f.max(1);
        let mut shape = x.shape().to_vec();
        *shape.last_mut().expect("checked non-empty") = out_f;
        check_residual(op, residual, &shape)?;
        len_u32(op, x.elem_count().max(out_f * in_f).max(rows * out_f))?;
        // SAFETY: the caller's GEMM (C itself is never read) writes every element.
        let out = unsafe { CudaTensor::uninit(self, &shape) }?;
        Ok((out, (rows, out_f, in_f)))
    }

    /// `a * b` for `a = [m, k]`, `b = [k, n]`.
    pub fn matmul(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        let (m, n) = match (a.shape(), b.shape()) {
            (&[m, _], &[_, n]) => (m, n),
            _ => {
                return shape_err(
                    "matmul",
                    format!(
                        "expected [m, k] x [k, n], got {:?} x {:?}",
                        a.shape(),
                        b.shape()
                    ),
                );
            }
        };
        // SAFETY: the GEMM below (beta 0: C is never read) writes every element.
        let mut out = unsafe { CudaTensor::uninit(self, &[m, n]) }?;
        self.gemm(a, b, false, None, 1.0, 0.0, &mut out)?;
        Ok(out)
    }

    /// 2-D convolution of a channels-last map `[batch, h, w, cin]`, as
    /// [`crate::Tensor::conv2d`]: `[batch, out_h, out_w, cout]`, bias fused. An implicit
    /// GEMM: the patches are gathered into shared memory tile by tile, never into a
    /// global im2col buffer.
    pub fn conv2d(
        &self,
        x: &CudaTensor,
        weight: &CudaConv2dWeight,
        params: Conv2dParams,
    ) -> Result<CudaTensor> {
        self.conv2d_on(None, x, weight, params, ConvExtras::default())
    }

    /// [`CudaDevice::conv2d`] plus `residual` (laid out as the output), added as the output
    /// is written: a residual connection without its own launch.
    pub fn conv2d_add(
        &self,
        x: &CudaTensor,
        weight: &CudaConv2dWeight,
        params: Conv2dParams,
        residual: &CudaTensor,
    ) -> Result<CudaTensor> {
        let extras = ConvExtras {
            residual: Some(residual),
            ..ConvExtras::default()
        };
        self.conv2d_on(None, x, weight, params, extras)
    }

    /// [`CudaDevice::conv2d`] with a bias per sample, `bias = [batch, cout]`, in place of the
    /// weight's own (which the caller folds in): a resnet's time embedding added by its
    /// first conv as the output is written, without a launch of its own.
    pub fn conv2d_sample_bias(
        &self,
        x: &CudaTensor,
        weight: &CudaConv2dWeight,
        params: Conv2dParams,
        bias: &CudaTensor,
    ) -> Result<CudaTensor> {
        let extras = ConvExtras {
            sample_bias: Some(bias),
            ..ConvExtras::default()
        };
        self.conv2d_on(None, x, weight, params, extras)
    }

    /// [`CudaDevice::conv2d`] on tensor cores: input and weight rounded to TF32, f32
    /// accumulation (errors of about `1e-3 * sqrt(kh * kw * cin)` for unit-scale inputs).
    pub fn conv2d_tf32(
        &self,
        x: &CudaTensor,
        weight: &CudaConv2dWeight,
        params: Conv2dParams,
    ) -> Result<CudaTensor> {
        self.conv2d_on(
            Some(Cores::TensorTf32),
            x,
            weight,
            params,
            ConvExtras::default(),
        )
    }

    /// The conv on `cores`, or (None) as the backend says: cuBLAS, or the device's kernels
    /// on the cores it names.
    fn conv2d_on(
        &self,
        cores: Option<Cores>,
        x: &CudaTensor,
        weight: &CudaConv2dWeight,
        params: Conv2dParams,
        ConvExtras {
            residual,
            sample_bias,
        }: ConvExtras<'_>,
    ) -> Result<CudaTensor> {
        let cublas = match cores {
            None => self.cublas_math(),
            Some(_) => None,
        };
        let cores = cores.unwrap_or_else(|| self.kernel_cores());
        let k_name = match cores {
            Cores::Cuda => "conv2d_f32",
            Cores::TensorTf32 => "conv2d_tf32",
            Cores::TensorF16 => "conv2d_mma_f16",
        };
        let &[batch, h, w, cin] = x.shape() else {
            return shape_err(
                k_name,
                format!("expected [batch, h, w, cin], got {:?}", x.shape()),
            );
        };
        if cin != weight.cin {
            return shape_err(
                k_name,
                format!("input has {cin} channels, weight expects {}", weight.cin),
            );
        }
        let (oh, ow) = weight.out_size(k_name, h, w, params)?;
        let m = batch * oh * ow;
        check_residual(k_name, residual, &[batch, oh, ow, weight.cout])?;
        check_sample_bias(k_name, sample_bias, batch, weight.cout)?;
        // SAFETY: the conv below (C itself is never read) writes every element, or none when
        // m is 0.
        let mut out = unsafe { CudaTensor::uninit(self, &[batch, oh, ow, weight.cout]) }?;
        len_u32(
            k_name,
            x.elem_count()
                .max(out.elem_count())
                .max(weight.packed.elem_count()),
        )?;
        if m == 0 {
            return Ok(out);
        }
        if let Some(math) = cublas {
            let dims = (batch, h, w, cin);
            let bias = if sample_bias.is_some() {
                None
            } else {
                weight.bias.as_ref()
            };
            self.conv2d_cublas(math, x, (weight, bias), params, dims, (oh, ow), &mut out)?;
            if let Some(r) = residual {
                self.add_rows_in_place(&mut out.data, r, r.elem_count())?;
            }
            if let Some(b) = sample_bias {
                out = self.add_per_sample(&out, b)?;
            }
            return Ok(out);
        }
        let mut cfg = tiles(k_name, m, weight.cout)?;
        cfg.shared_mem_bytes = cores.shared_bytes();
        let mut split = if cores.splits_k() {
            let k = weight.kh * weight.kw * cin;
            self.plan_split(k_name, &mut cfg, (m, weight.cout, k))?
        } else {
            SplitK::NONE
        };
        let weight_at = self.weight_operand(weight, cores)?;
        let u = |v: usize| v as u32;
        let stream = self.stream();
        let addend = residual.map_or(Addend::Nothing, |r| Addend::Residual(&r.data));
        // The bias: the weight's, or one row per sample of `oh * ow` output rows.
        let (bias, rows) = match sample_bias {
            Some(b) => (
                Some(b),
                BiasRows {
                    rows_per_sample: u(oh * ow),
                    sample_of_row: 0,
                },
            ),
            None => (weight.bias.as_ref(), BiasRows::default()),
        };
        // A split writes raw partial sums; the reduction adds the bias and the residual.
        let has_bias = bias.is_some() && !split.needs_reduction();
        let (residual_at, beta) = split.addend_args(addend, stream);
        let (ws_at, counters_at) = split.sums_args(self);
        let args = [
            u(m),
            u(weight.cout),
            u(h),
            u(w),
            u(cin),
            u(weight.kh),
            u(weight.kw),
            u(params.stride),
            u(params.padding),
            u(oh),
            u(ow),
            u32::from(has_bias),
            u32::from(beta != 0.0),
        ];
        let bias_data = bias.map_or(&*weight.packed.data, |b| &*b.data);
        {
            let mut l = stream.launch_builder(self.function(k_name)?);
            l.arg(&x.data)
                .arg(&weight_at)
                .arg(bias_data)
                .arg(split.target(&mut out.data))
                .arg(&residual_at);
            for a in &args {
                l.arg(a);
            }
            l.arg(&ws_at)
                .arg(&counters_at)
                .arg(&rows.rows_per_sample)
                .arg(&rows.sample_of_row);
            // SAFETY: matches `conv2d_f32` / `conv2d_tf32` / `conv2d_mma_f16(x, weight, bias,
            // out, residual, m, cout, h, w, cin, kh, kw, stride, pad, out_h, out_w, has_bias,
            // has_residual, ws, counters, rows_per_sample, sample_of_row)`, the weight as
            // `weight_operand` gives it for those cores; shapes checked (the residual, read
            // when has_residual is 1, as the output; a sample bias `[batch, cout]` for rows of
            // `oh * ow`), every index below 2^31; a split launch's output is its `[splits, m,
            // cout]` workspace, or in one launch `ws` is (see `sgemm_raw`).
            self.launched(k_name, unsafe { l.launch(cfg) })?;
        }
        let bias = bias.map(|b| (&*b.data, rows));
        self.finish_split(&split, &mut out.data, bias, (m, weight.cout), 1.0, addend)?;
        Ok(out)
    }

    /// Convolution at selected output positions over a ragged batch, as
    /// [`Conv2dWeight::masked_conv2d`]: each neighbour comes from the segment's fresh rows
    /// when its position is active, else from its cached map (f32 or f16, widened where
    /// read). `fresh = [sum active, cin]` holds every segment's fresh rows, stacked in
    /// segment order (read in place). Returns the output rows of all segments stacked,
    /// `[sum outputs, cout]`.
    pub fn masked_conv2d<C: GpuElement>(
        &self,
        weight: &CudaConv2dWeight,
        fresh: &CudaTensor,
        segments: &[CudaMaskedConvSegment<'_, C>],
        params: Conv2dParams,
    ) -> Result<CudaTensor> {
        self.masked_conv2d_with(weight, fresh, segments, params, ConvExtras::default())
    }

    /// [`CudaDevice::masked_conv2d`] plus `residual = [sum outputs, cout]` (the output rows'
    /// residual, stacked the same way), added as the output is written.
    pub fn masked_conv2d_add<C: GpuElement>(
        &self,
        weight: &CudaConv2dWeight,
        fresh: &CudaTensor,
        segments: &[CudaMaskedConvSegment<'_, C>],
        params: Conv2dParams,
        residual: &CudaTensor,
    ) -> Result<CudaTensor> {
        let extras = ConvExtras {
            residual: Some(residual),
            ..ConvExtras::default()
        };
        self.masked_conv2d_with(weight, fresh, segments, params, extras)
    }

    /// [`CudaDevice::masked_conv2d`] with a bias per segment, `bias = [segments, cout]`, in
    /// place of the weight's own (which the caller folds in): each segment's output rows add
    /// its row (a resnet's time embedding, per request of a ragged batch).
    pub fn masked_conv2d_sample_bias<C: GpuElement>(
        &self,
        weight: &CudaConv2dWeight,
        fresh: &CudaTensor,
        segments: &[CudaMaskedConvSegment<'_, C>],
        params: Conv2dParams,
        bias: &CudaTensor,
    ) -> Result<CudaTensor> {
        let extras = ConvExtras {
            sample_bias: Some(bias),
            ..ConvExtras::default()
        };
        self.masked_conv2d_with(weight, fresh, segments, params, extras)
    }

    fn masked_conv2d_with<C: GpuElement>(
        &self,
        weight: &CudaConv2dWeight,
        fresh: &CudaTensor,
        segments: &[CudaMaskedConvSegment<'_, C>],
        params: Conv2dParams,
        ConvExtras {
            residual,
            sample_bias,
        }: ConvExtras<'_>,
    ) -> Result<CudaTensor> {
        let cores = self.kernel_cores();
        let op = match cores {
            Cores::TensorF16 => C::MASKED_CONV_MMA,
            _ => C::MASKED_CONV,
        };
        let Some(first) = segments.first() else {
            return CudaTensor::zeros(self, &[0, weight.cout]);
        };
        let cin = weight.cin;
        let (in_h, in_w) = (first.active.height(), first.active.width());
        let (oh, ow) = weight.out_size(op, in_h, in_w, params)?;
        let fresh_rows: usize = segments.iter().map(|s| s.active.len()).sum();
        if fresh.shape() != [fresh_rows, cin] {
            return shape_err(
                op,
                format!(
                    "fresh rows {:?}, expected [{fresh_rows}, {cin}] (every segment's, stacked)",
                    fresh.shape()
                ),
            );
        }
        for (i, s) in segments.iter().enumerate() {
            let grids = ((in_h, in_w), (oh, ow));
            let rows = [s.active.len(), cin];
            crate::ops::masked_conv::check_segment(
                op,
                i,
                s.active,
                s.outputs,
                &rows,
                s.cached.shape(),
                cin,
                grids,
            )?;
        }
        let hw = in_h * in_w;
        let m: usize = segments.iter().map(|s| s.outputs.len()).sum();
        check_residual(op, residual, &[m, weight.cout])?;
        check_sample_bias(op, sample_bias, segments.len(), weight.cout)?;
        // SAFETY: the conv below (C itself is never read) writes every output row.
        let mut out = unsafe { CudaTensor::uninit(self, &[m, weight.cout]) }?;
        len_u32(
            op,
            (segments.len() * hw)
                .max(hw * cin)
                .max(2 * m)
                .max(out.elem_count())
                .max(weight.packed.elem_count()),
        )?;
        if m == 0 {
            return Ok(out);
        }
        let mut cfg = tiles(op, m, weight.cout)?;
        cfg.shared_mem_bytes = cores.shared_bytes();
        let k = weight.kh * weight.kw * cin;
        let mut split = self.plan_split(op, &mut cfg, (m, weight.cout, k))?;
        let weight_at = self.weight_operand(weight, cores)?;
        let mut rows = Vec::with_capacity(2 * m);
        let mut row_of = Vec::with_capacity(segments.len() * hw);
        // Each output row's segment, for a bias per segment (empty without one).
        let mut segment_of_row = Vec::new();
        for (i, s) in segments.iter().enumerate() {
            for &p in s.outputs.positions() {
                rows.extend_from_slice(&[i as u32, p]);
            }
            if sample_bias.is_some() {
                segment_of_row.extend(std::iter::repeat_n(i as u32, s.outputs.len()));
            }
            // `TokenSet`'s inverse map uses u32::MAX for inactive positions, as the kernel.
            row_of.extend_from_slice(s.active.row_of());
        }
        let stream = self.stream();
        let mut at = 0;
        let starts = segments.iter().map(|s| {
            at += s.active.len() * cin;
            at - s.active.len() * cin
        });
        let (fresh_at, fresh_guard) = element_addresses(stream, &fresh.data, starts);
        let (cached_at, cached_guards) =
            device_addresses(stream, segments.iter().map(|s| &*s.cached.data));
        let mut set = TableSet::default();
        let slots = [
            set.push(&fresh_at),
            set.push(&cached_at),
            set.push(&row_of),
            set.push(&rows),
            set.push(&segment_of_row),
        ];
        let tables = self.upload_tables(op, &set)?;
        let [fresh_d, cached_d, row_of_d, rows_d, segment_of_row_d] =
            slots.map(|slot| tables.address(slot));
        // The bias: the weight's, or each output row's segment's.
        let (bias, bias_rows) = match sample_bias {
            Some(b) => (
                Some(b),
                BiasRows {
                    rows_per_sample: 0,
                    sample_of_row: segment_of_row_d,
                },
            ),
            None => (weight.bias.as_ref(), BiasRows::default()),
        };
        let u = |v: usize| v as u32;
        let addend = residual.map_or(Addend::Nothing, |r| Addend::Residual(&r.data));
        // A split writes raw partial sums; the reduction adds the bias and the residual.
        let (residual_at, beta) = split.addend_args(addend, stream);
        let (ws_at, counters_at) = split.sums_args(self);
        let args = [
            u(m),
            u(weight.cout),
            u(in_h),
            u(in_w),
            u(cin),
            u(weight.kh),
            u(weight.kw),
            u(params.stride),
            u(params.padding),
            u(ow),
            u32::from(bias.is_some() && !split.needs_reduction()),
            u32::from(beta != 0.0),
        ];
        let bias_data = bias.map_or(&*weight.packed.data, |b| &*b.data);
        {
            let mut l = stream.launch_builder(self.function(op)?);
            l.arg(&fresh_d)
                .arg(&cached_d)
                .arg(&row_of_d)
                .arg(&rows_d)
                .arg(&weight_at)
                .arg(bias_data)
                .arg(split.target(&mut out.data))
                .arg(&residual_at);
            for a in &args {
                l.arg(a);
            }
            l.arg(&ws_at)
                .arg(&counters_at)
                .arg(&bias_rows.rows_per_sample)
                .arg(&bias_rows.sample_of_row);
            // SAFETY: matches `masked_conv2d_cache_*` / `masked_conv2d_mma_f16_cache_*(fresh,
            // cached, row_of, rows, weight (as `weight_operand` gives it),
            // bias, out, residual, m, cout, h, w, cin, kh, kw, stride, pad, out_w, has_bias,
            // has_residual, ws, counters, rows_per_sample, sample_of_row)`; the residual (read
            // when has_residual is 1) is `[m, cout]`; a bias per segment `[segments, cout]`
            // with `m` segment indices in its table; `ws`/`counters` as in `sgemm_raw`. The
            // address tables point at live buffers of the checked sizes (borrowed for this
            // call); `row_of` holds fresh-row indices below each segment's `active.len()`
            // (TokenSet's invariant) or u32::MAX; `rows` holds segment indices and positions
            // on the output grid. A split launch's output is its `[splits, m, cout]`
            // workspace.
            self.launched(op, unsafe { l.launch(cfg) })?;
        }
        let bias = bias.map(|b| (&*b.data, bias_rows));
        self.finish_split(&split, &mut out.data, bias, (m, weight.cout), 1.0, addend)?;
        drop((tables, fresh_guard, cached_guards));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k_splits_fill_the_device_without_starving_splits() {
        // H100: 132 SMs. Enough tiles already: no split.
        assert_eq!(k_splits(264, 11520, 132), 1);
        assert_eq!(k_splits(1000, 320, 132), 1);
        // SD1.5's 4096x320x320 linear (160 tiles) fills the device already.
        assert_eq!(k_splits(160, 320, 132), 1);
        // SD1.5's 8x8 conv (m 128, n 1280: 20 tiles, k 11520): 14 splits of ~52 k-tiles.
        assert_eq!(k_splits(20, 11520, 132), 14);
        // Short k: splits of at least 8 tiles (k 320 = 20 tiles: 2 splits), or none.
        assert_eq!(k_splits(4, 320, 132), 2);
        assert_eq!(k_splits(4, 64, 132), 1);
        // Capped.
        assert_eq!(k_splits(1, 1 << 20, 132), MAX_SPLITS);
    }
}
