//! cuBLAS for the dense layers: linear layers as one `sgemm`, convolutions as an im2col
//! (`im2col_f32`; a 1x1 convolution needs none) and one `sgemm` against the packed weight,
//! the bias added by a broadcast kernel. Tensors stay row-major f32; cuBLAS sees the
//! transposed problem (its matrices are column-major): `C^T = op(B)^T A^T`. With f16
//! products (`GemmBackend::CublasF16`) the GEMM is a `cublasGemmEx` on f16 operands (the
//! activation or patches rounded by `convert_f32_to_f16`, the weight's f16 copy) with f32
//! accumulation and an f32 result, so every other op stays in f32.
//!
//! cuBLAS is loaded at run time like the driver; [`CudaDevice::set_gemm_backend`] fails
//! with a clear error where the library is missing, and the device keeps its own kernels
//! ([`GemmBackend::Kernels`], the default).

use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, sys};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};
use half::f16;

use super::ops::{grid_stride, len_u32};
use super::{CudaConv2dWeight, CudaDevice, CudaTensor, GpuElement, PooledSlice};
use crate::error::Error;
use crate::{Conv2dParams, Result};

/// Which GEMMs [`CudaDevice::linear`] and [`CudaDevice::conv2d`] run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum GemmBackend {
    /// Retouch's kernels on CUDA cores (`sgemm_f32`, `conv2d_f32`, split-K).
    Kernels,
    /// [`GemmBackend::Kernels`] with each split-K product in one launch: the last block of
    /// an output tile to finish sums the tile's slices (found through a per-tile counter),
    /// where `Kernels` launches `splitk_reduce_f32` after the product. Same results, bit for
    /// bit; not the default until a GPU run checks its fences.
    KernelsOneLaunch,
    /// Retouch's kernels on f16 tensor cores (`gemm_mma_f16`, `conv2d_mma_f16`, the masked
    /// `masked_conv2d_mma_f16_cache_*`): activations rounded to f16 as they are read, the
    /// weights' f16 copies, f32 accumulation and output, and every fusion of
    /// [`GemmBackend::Kernels`] (bias, bias per sample, residual, split-K). Against
    /// [`GemmBackend::CublasF16`]: no conversion pass, im2col buffer or separate bias and
    /// residual launches, but hand-written tiles against cuBLAS's.
    KernelsF16,
    /// [`GemmBackend::KernelsF16`] with each split-K product in one launch, as
    /// [`GemmBackend::KernelsOneLaunch`].
    KernelsF16OneLaunch,
    /// cuBLAS `sgemm` in f32 (`CUBLAS_DEFAULT_MATH`: no tensor cores).
    Cublas,
    /// cuBLAS `sgemm` with TF32 tensor cores (`CUBLAS_TF32_TENSOR_OP_MATH`: inputs rounded to
    /// a 10-bit significand, f32 accumulation), as PyTorch's `allow_tf32`.
    CublasTf32,
    /// cuBLAS `GemmEx` on f16 tensor cores: activations and weights rounded to f16 (10-bit
    /// significand, f16's range) for the products, f32 accumulation and output. Weights keep
    /// an f16 copy beside the f32 one (a conv's in its [`CudaConv2dWeight`]; a linear layer's
    /// with its caller, [`CudaDevice::linear_f16_weight`], else rounded per call).
    CublasF16,
}

impl GemmBackend {
    /// Whether the products round their operands to f16 (a linear layer keeps an f16 copy
    /// of its weight for them).
    pub fn f16_products(self) -> bool {
        matches!(
            self,
            GemmBackend::CublasF16 | GemmBackend::KernelsF16 | GemmBackend::KernelsF16OneLaunch
        )
    }

    /// Whether the device's split-K products sum their slices in the same launch.
    pub(crate) fn one_launch(self) -> bool {
        matches!(
            self,
            GemmBackend::KernelsOneLaunch | GemmBackend::KernelsF16OneLaunch
        )
    }

    /// Whether the device's own GEMM kernels run on f16 tensor cores.
    pub(crate) fn f16_kernels(self) -> bool {
        matches!(
            self,
            GemmBackend::KernelsF16 | GemmBackend::KernelsF16OneLaunch
        )
    }
}

/// The arithmetic of a cuBLAS GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BlasMath {
    F32,
    Tf32,
    F16,
}

/// A row-major `C [m, n] = A [m, k] op(B)` as the column-major GEMM cuBLAS runs:
/// `C^T [n, m] = op(B)^T [n, k] A^T [k, m]`, its first operand B's buffer, its second A's.
/// A row-major `[m, k]` is `A^T` column-major with ld `k`; B row-major `[n, k]` (a linear
/// weight) is `B^T` column-major, transposed back; B row-major `[k, n]` is `op(B)^T` as it is,
/// ld `n`. C row-major `[m, n]` is `C^T` column-major with ld `n`.
#[derive(Debug, PartialEq, Eq)]
struct ColumnMajor {
    transpose_first: bool,
    m: usize,
    n: usize,
    k: usize,
    ld_first: usize,
    ld_second: usize,
    ld_out: usize,
}

impl ColumnMajor {
    fn of(b_transposed: bool, (m, n, k): (usize, usize, usize)) -> ColumnMajor {
        ColumnMajor {
            transpose_first: b_transposed,
            m: n,
            n: m,
            k,
            ld_first: if b_transposed { k } else { n },
            ld_second: k,
            ld_out: n,
        }
    }

    /// cuBLAS's operation on its first operand (B's buffer).
    fn first_op(&self) -> sys::cublasOperation_t {
        if self.transpose_first {
            sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            sys::cublasOperation_t::CUBLAS_OP_N
        }
    }
}

/// The cuBLAS handle on the device's stream, or why there is none.
pub(crate) type BlasSlot = std::sync::OnceLock<std::result::Result<CudaBlas, String>>;

fn cublas_err(op: &'static str) -> impl Fn(cudarc::cublas::result::CublasError) -> Error {
    move |e| Error::Cuda {
        op,
        message: format!("{e:?}"),
    }
}

/// A GEMM dimension as cuBLAS's `int`, or the error that says it does not fit.
fn blas_int(op: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Cuda {
        op,
        message: format!("dimension {v} beyond cuBLAS's int"),
    })
}

impl CudaDevice {
    /// Chooses the GEMMs of linear layers and convolutions. The cuBLAS backends load cuBLAS
    /// now (an error, with the device unchanged, where it is missing).
    pub fn set_gemm_backend(&self, backend: GemmBackend) -> Result<()> {
        if self.cublas_math_of(backend).is_some() {
            self.cublas()?;
        }
        self.gemm_backend
            .store(backend as u8, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    pub fn gemm_backend(&self) -> GemmBackend {
        match self.gemm_backend.load(std::sync::atomic::Ordering::Relaxed) {
            b if b == GemmBackend::Cublas as u8 => GemmBackend::Cublas,
            b if b == GemmBackend::CublasTf32 as u8 => GemmBackend::CublasTf32,
            b if b == GemmBackend::CublasF16 as u8 => GemmBackend::CublasF16,
            b if b == GemmBackend::KernelsOneLaunch as u8 => GemmBackend::KernelsOneLaunch,
            b if b == GemmBackend::KernelsF16 as u8 => GemmBackend::KernelsF16,
            b if b == GemmBackend::KernelsF16OneLaunch as u8 => GemmBackend::KernelsF16OneLaunch,
            _ => GemmBackend::Kernels,
        }
    }

    /// With a cuBLAS backend chosen, its arithmetic; None for the device's kernels.
    pub(crate) fn cublas_math(&self) -> Option<BlasMath> {
        self.cublas_math_of(self.gemm_backend())
    }

    fn cublas_math_of(&self, backend: GemmBackend) -> Option<BlasMath> {
        match backend {
            GemmBackend::Kernels
            | GemmBackend::KernelsOneLaunch
            | GemmBackend::KernelsF16
            | GemmBackend::KernelsF16OneLaunch => None,
            GemmBackend::Cublas => Some(BlasMath::F32),
            GemmBackend::CublasTf32 => Some(BlasMath::Tf32),
            GemmBackend::CublasF16 => Some(BlasMath::F16),
        }
    }

    fn cublas(&self) -> Result<&CudaBlas> {
        let slot = self.blas.get_or_init(|| {
            // cudarc panics on a missing library: look first.
            if !unsafe { sys::is_culib_present() } {
                return Err("cuBLAS (libcublas.so) not found on the library path".into());
            }
            CudaBlas::new(self.stream().clone()).map_err(|e| format!("cuBLAS: {e:?}"))
        });
        slot.as_ref()
            .map_err(|why| Error::DeviceUnavailable(self.describe(), why.clone()))
    }

    /// `c = alpha * a * op(b) + beta * c (+ bias on every row)` through cuBLAS, row-major:
    /// `a = [m, k]`, `b = [n, k]` when `b_transposed` else `[k, n]`, `c = [m, n]`, `bias =
    /// [n]`. Sizes were checked by the caller.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn cublas_gemm(
        &self,
        tf32: bool,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        b_transposed: bool,
        bias: Option<&CudaTensor>,
        (m, n, k): (usize, usize, usize),
        (alpha, beta): (f32, f32),
        c: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "cublas_sgemm";
        if m == 0 || n == 0 {
            return Ok(());
        }
        let int = |v: usize| blas_int(OP, v);
        let blas = self.cublas()?;
        let mode = if tf32 {
            sys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
        } else {
            sys::cublasMath_t::CUBLAS_DEFAULT_MATH
        };
        // SAFETY: the handle is live; the mode is a flag read by later calls on it.
        let status = unsafe { sys::cublasSetMathMode(*blas.handle(), mode) };
        if status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(Error::Cuda {
                op: OP,
                message: format!("cublasSetMathMode: {status:?}"),
            });
        }
        let p = ColumnMajor::of(b_transposed, (m, n, k));
        let cfg = GemmConfig {
            transa: p.first_op(),
            transb: sys::cublasOperation_t::CUBLAS_OP_N,
            m: int(p.m)?,
            n: int(p.n)?,
            k: int(p.k)?,
            alpha,
            lda: int(p.ld_first)?,
            ldb: int(p.ld_second)?,
            beta,
            ldc: int(p.ld_out)?,
        };
        // SAFETY: `a` holds m * k, `b` n * k and `c` m * n values (checked by the caller),
        // which the leading dimensions above describe.
        let r = unsafe { blas.gemm(cfg, b, a, c) };
        r.map_err(cublas_err(OP))?;
        self.launched(OP, Ok::<(), cudarc::driver::DriverError>(()))?;
        if let Some(bias) = bias {
            self.add_rows_in_place(c, bias, m * n)?;
        }
        Ok(())
    }

    /// [`CudaDevice::cublas_gemm`] on f16 operands (`cublasGemmEx`, f32 accumulation and
    /// output, tensor cores): `c = a * op(b) (+ bias on every row)`, row-major as there.
    pub(crate) fn cublas_gemm_f16(
        &self,
        a: &CudaSlice<f16>,
        b: &CudaSlice<f16>,
        b_transposed: bool,
        bias: Option<&CudaTensor>,
        (m, n, k): (usize, usize, usize),
        c: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "cublas_gemm_ex_f16";
        if m == 0 || n == 0 {
            return Ok(());
        }
        let int = |v: usize| blas_int(OP, v);
        let blas = self.cublas()?;
        let p = ColumnMajor::of(b_transposed, (m, n, k));
        let (alpha, beta) = (1.0f32, 0.0f32);
        let stream = self.stream();
        // The pointers' guards end with this block, before the bias add borrows `c` again.
        let r = {
            let (first, _first_sync) = b.device_ptr(stream);
            let (second, _second_sync) = a.device_ptr(stream);
            let (out, _out_sync) = c.device_ptr_mut(stream);
            // SAFETY: the handle is live and bound to the compute stream; `b` holds n * k, `a`
            // m * k halves and `c` m * n floats (checked by the caller), which the leading
            // dimensions describe; alpha and beta are f32, as CUBLAS_COMPUTE_32F reads them.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    *blas.handle(),
                    p.first_op(),
                    sys::cublasOperation_t::CUBLAS_OP_N,
                    int(p.m)?,
                    int(p.n)?,
                    int(p.k)?,
                    (&alpha as *const f32).cast(),
                    first as *const std::ffi::c_void,
                    sys::cudaDataType::CUDA_R_16F,
                    int(p.ld_first)?,
                    second as *const std::ffi::c_void,
                    sys::cudaDataType::CUDA_R_16F,
                    int(p.ld_second)?,
                    (&beta as *const f32).cast(),
                    out as *mut std::ffi::c_void,
                    sys::cudaDataType::CUDA_R_32F,
                    int(p.ld_out)?,
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
        };
        r.map_err(cublas_err(OP))?;
        self.launched(OP, Ok::<(), cudarc::driver::DriverError>(()))?;
        if let Some(bias) = bias {
            self.add_rows_in_place(c, bias, m * n)?;
        }
        Ok(())
    }

    /// `c[i] += bias[i % bias.len()]` over the first `len` values of `c`, in place (a
    /// residual of `len` values adds element by element).
    pub(crate) fn add_rows_in_place(
        &self,
        c: &mut CudaSlice<f32>,
        bias: &CudaTensor,
        len: usize,
    ) -> Result<()> {
        const K: &str = "binary_add_f32";
        let n = len_u32(K, len)?;
        let b_len = len_u32(K, bias.elem_count())?;
        let (ptr, _sync) = c.device_ptr(self.stream());
        let mut l = self.stream().launch_builder(self.function(K)?);
        l.arg(&ptr).arg(&bias.data).arg(&ptr).arg(&n).arg(&b_len);
        // SAFETY: `binary_add_f32(a, b, out, n, b_len)` reads `a[i]` before writing `out[i]`
        // in the same thread, so `a == out` is an in-place add; `c` holds at least `n` values.
        self.launched(K, unsafe { l.launch(grid_stride(n)) })
    }

    /// [`CudaDevice::conv2d`] through cuBLAS: the patches gathered by `im2col_f32` (a 1x1
    /// convolution with stride 1 and no padding reads `x` as it is), one GEMM against the
    /// packed `[kh * kw * cin, cout]` weight, the bias added per row. With f16 products the
    /// patches come rounded from `im2col_f16` and the weight is its kept f16 copy.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn conv2d_cublas(
        &self,
        math: BlasMath,
        x: &CudaTensor,
        (weight, bias): (&CudaConv2dWeight, Option<&CudaTensor>),
        params: Conv2dParams,
        (batch, h, w, cin): (usize, usize, usize, usize),
        (oh, ow): (usize, usize),
        out: &mut CudaTensor,
    ) -> Result<()> {
        let m = batch * oh * ow;
        let k = weight.kh * weight.kw * cin;
        let direct = weight.kh == 1 && weight.kw == 1 && params.stride == 1 && params.padding == 0;
        let geometry = [
            m,
            h,
            w,
            cin,
            weight.kh,
            weight.kw,
            params.stride,
            params.padding,
            oh,
            ow,
        ];
        if math == BlasMath::F16 {
            let a = if direct {
                self.slice_to_f16(&x.data, m * k)?
            } else {
                self.im2col::<f16>("im2col_f16", x, geometry, m * k)?
            };
            let packed = weight.packed_f16(self)?;
            let dims = (m, weight.cout, k);
            return self.cublas_gemm_f16(&a, &packed.data, false, bias, dims, &mut out.data);
        }
        let cols = if direct {
            None
        } else {
            Some(self.im2col::<f32>("im2col_f32", x, geometry, m * k)?)
        };
        let a = cols.as_ref().unwrap_or(&x.data);
        self.cublas_gemm(
            math == BlasMath::Tf32,
            a,
            &weight.packed.data,
            false,
            bias,
            (m, weight.cout, k),
            (1.0, 0.0),
            &mut out.data,
        )
    }

    /// The patch matrix (`len` values) of `x` for the convolution `geometry` describes
    /// (`[rows, h, w, cin, kh, kw, stride, pad, out_h, out_w]`), by `kernel` (`im2col_f32`, or
    /// `im2col_f16` rounding as it writes).
    fn im2col<T: GpuElement>(
        &self,
        kernel: &'static str,
        x: &CudaTensor,
        geometry: [usize; 10],
        len: usize,
    ) -> Result<PooledSlice<T>> {
        let n = len_u32(kernel, len)?;
        // SAFETY: every element is written by the launch below.
        let mut cols = unsafe { self.alloc_pooled::<T>(kernel, len) }?;
        let geom = geometry.map(|v| v as u32);
        // The geometry as scalar arguments: no upload per convolution.
        let mut l = self.stream().launch_builder(self.function(kernel)?);
        l.arg(&x.data).arg(&mut cols);
        for v in &geom {
            l.arg(v);
        }
        // SAFETY: `im2col_*(x, cols, rows, h, w, cin, kh, kw, stride, pad, out_h, out_w)`: `x`
        // holds the map the geometry describes, `cols` `rows * kh * kw * cin` values of `T`,
        // every index below 2^32.
        self.launched(kernel, unsafe { l.launch(grid_stride(n)) })?;
        Ok(cols)
    }

    /// The first `len` values of `x` rounded to f16 (`convert_f32_to_f16`).
    pub(crate) fn slice_to_f16(&self, x: &CudaSlice<f32>, len: usize) -> Result<PooledSlice<f16>> {
        const K: &str = "convert_f32_to_f16";
        let n = len_u32(K, len)?;
        // SAFETY: every element is written by the launch below.
        let mut out = unsafe { self.alloc_pooled::<f16>(K, len) }?;
        if n > 0 {
            let mut l = self.stream().launch_builder(self.function(K)?);
            l.arg(x).arg(&mut out).arg(&n);
            // SAFETY: `convert_f32_to_f16(x, out, n)`: `x` holds at least `len` values (the
            // caller's), `out` `len`.
            self.launched(K, unsafe { l.launch(grid_stride(n)) })?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// cuBLAS's `C = op(A) B` in column-major storage, as its documentation defines it
    /// (`transb` N, alpha 1, beta 0).
    fn column_major_gemm(p: &ColumnMajor, first: &[f32], second: &[f32]) -> Vec<f32> {
        let mut c = vec![0.0; p.ld_out * p.n];
        for j in 0..p.n {
            for i in 0..p.m {
                let mut acc = 0.0;
                for l in 0..p.k {
                    let a = if p.transpose_first {
                        first[l + i * p.ld_first]
                    } else {
                        first[i + l * p.ld_first]
                    };
                    acc += a * second[l + j * p.ld_second];
                }
                c[i + j * p.ld_out] = acc;
            }
        }
        c
    }

    #[test]
    fn row_major_gemms_map_onto_column_major_cublas() {
        let (m, n, k) = (5, 3, 4);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        for b_transposed in [true, false] {
            let b: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.61).cos()).collect();
            // Row-major reference: b is [n, k] when transposed, else [k, n].
            let at_b = |l: usize, j: usize| {
                if b_transposed {
                    b[j * k + l]
                } else {
                    b[l * n + j]
                }
            };
            let want: Vec<f32> = (0..m * n)
                .map(|x| (0..k).map(|l| a[(x / n) * k + l] * at_b(l, x % n)).sum())
                .collect();
            let p = ColumnMajor::of(b_transposed, (m, n, k));
            let got = column_major_gemm(&p, &b, &a);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "{b_transposed}: {got:?} vs {want:?}");
            }
        }
    }
}
