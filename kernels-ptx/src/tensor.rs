use half::{bf16, f16};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::{invalid, shape_err};
use crate::{DType, Device, Error, FloatElement, Result};

/// Contiguous data on the CPU, one variant per dtype.
#[derive(Clone, Debug)]
#[doc(hidden)]
pub enum CpuStorage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    I64(Vec<i64>),
}

/// Storage over the backends; each op dispatches on it (one arm per device).
#[derive(Clone, Debug)]
pub(crate) enum Storage {
    Cpu(CpuStorage),
}

/// A dense, contiguous, row-major n-dimensional array on a [`Device`].
///
/// Tensors are owned values: `clone` copies the data. Ops take `&Tensor` and return new
/// tensors; the few in-place ops (LoRA patching, row scatter) take `&mut Tensor`.
#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

/// A dtype a tensor can be built from directly.
pub trait TensorElement: Copy + 'static {
    #[doc(hidden)]
    fn into_storage(data: Vec<Self>) -> CpuStorage;
    #[doc(hidden)]
    fn slice(storage: &CpuStorage) -> Option<&[Self]>;
    #[doc(hidden)]
    fn slice_mut(storage: &mut CpuStorage) -> Option<&mut [Self]>;
}

macro_rules! tensor_element {
    ($t:ty, $variant:ident) => {
        impl TensorElement for $t {
            fn into_storage(data: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(data)
            }
            fn slice(storage: &CpuStorage) -> Option<&[Self]> {
                match storage {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn slice_mut(storage: &mut CpuStorage) -> Option<&mut [Self]> {
                match storage {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}
tensor_element!(f32, F32);
tensor_element!(f16, F16);
tensor_element!(bf16, BF16);
tensor_element!(i64, I64);

impl CpuStorage {
    pub(crate) fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::I64(_) => DType::I64,
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::F16(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
            CpuStorage::I64(v) => v.len(),
        }
    }

    fn zeros(dtype: DType, len: usize) -> Self {
        match dtype {
            DType::F32 => CpuStorage::F32(vec![0.0; len]),
            DType::F16 => CpuStorage::F16(vec![f16::ZERO; len]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::ZERO; len]),
            DType::I64 => CpuStorage::I64(vec![0; len]),
        }
    }

    fn to_f32_vec(&self) -> Vec<f32> {
        fn convert<T: FloatElement>(src: &[T]) -> Vec<f32> {
            let mut out = vec![0.0; src.len()];
            T::load_row(src, &mut out);
            out
        }
        match self {
            CpuStorage::F32(v) => v.clone(),
            CpuStorage::F16(v) => convert(v),
            CpuStorage::BF16(v) => convert(v),
            CpuStorage::I64(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    fn from_f32(src: &[f32], dtype: DType) -> Self {
        fn convert<T: FloatElement>(src: &[f32]) -> Vec<T> {
            let mut out = vec![T::from_f32(0.0); src.len()];
            T::store_row(src, &mut out);
            out
        }
        match dtype {
            DType::F32 => CpuStorage::F32(src.to_vec()),
            DType::F16 => CpuStorage::F16(convert(src)),
            DType::BF16 => CpuStorage::BF16(convert(src)),
            DType::I64 => CpuStorage::I64(src.iter().map(|&x| x as i64).collect()),
        }
    }
}

pub(crate) fn elem_count(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    /// Builds a CPU tensor from data; `data.len()` must equal the product of `shape`.
    pub fn from_vec<T: TensorElement>(data: Vec<T>, shape: &[usize]) -> Result<Tensor> {
        if data.len() != elem_count(shape) {
            return shape_err(
                "from_vec",
                format!("{} elements cannot have shape {shape:?}", data.len()),
            );
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cpu(T::into_storage(data)),
        })
    }

    pub(crate) fn from_cpu(storage: CpuStorage, shape: &[usize]) -> Result<Tensor> {
        if storage.len() != elem_count(shape) {
            return shape_err(
                "tensor",
                format!("{} elements cannot have shape {shape:?}", storage.len()),
            );
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cpu(storage),
        })
    }

    /// f32 data of a shape already checked by the caller (ops producing their output).
    pub(crate) fn from_f32_unchecked(data: Vec<f32>, shape: &[usize]) -> Tensor {
        debug_assert_eq!(data.len(), elem_count(shape));
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cpu(CpuStorage::F32(data)),
        }
    }

    /// Zeros in host memory. A `Tensor` always lives on the CPU (device memory is
    /// [`crate::cuda::CudaTensor`]), so for `Device::Cuda` this is still a CPU tensor, as its
    /// [`Tensor::device`] says; `device` is kept for the callers written against it.
    pub fn zeros(shape: &[usize], dtype: DType, device: Device) -> Tensor {
        let _ = device;
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cpu(CpuStorage::zeros(dtype, elem_count(shape))),
        }
    }

    /// Standard-normal f32 values from a seeded generator (reproducible across runs), in
    /// host memory whatever `device` says (see [`Tensor::zeros`]).
    pub fn randn(shape: &[usize], seed: u64, device: Device) -> Tensor {
        let _ = device;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let data: Vec<f32> = (0..elem_count(shape))
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        Tensor::from_f32_unchecked(data, shape)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Size of dimension `d`; negative `d` counts from the end (-1 is the last).
    pub fn dim(&self, d: isize) -> Result<usize> {
        let rank = self.rank() as isize;
        let idx = if d < 0 { rank + d } else { d };
        if idx < 0 || idx >= rank {
            return shape_err(
                "dim",
                format!("dimension {d} out of range for shape {:?}", self.shape),
            );
        }
        Ok(self.shape[idx as usize])
    }

    pub fn elem_count(&self) -> usize {
        elem_count(&self.shape)
    }

    pub fn dtype(&self) -> DType {
        match &self.storage {
            Storage::Cpu(s) => s.dtype(),
        }
    }

    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Cpu(_) => Device::Cpu,
        }
    }

    pub fn size_in_bytes(&self) -> usize {
        self.elem_count() * self.dtype().size_in_bytes()
    }

    /// Same data, new shape with the same number of elements.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Tensor> {
        if elem_count(shape) != self.elem_count() {
            return shape_err(
                "reshape",
                format!("cannot reshape {:?} to {shape:?}", self.shape),
            );
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// The tensor as a slice of `T`; errors unless the dtype is `T` and the data is on the CPU.
    pub fn as_slice<T: TensorElement>(&self) -> Result<&[T]> {
        let dtype = self.dtype();
        match &self.storage {
            Storage::Cpu(s) => T::slice(s).ok_or_else(|| wrong_element::<T>("as_slice", dtype)),
        }
    }

    pub fn as_mut_slice<T: TensorElement>(&mut self) -> Result<&mut [T]> {
        let dtype = self.dtype();
        match &mut self.storage {
            Storage::Cpu(s) => {
                T::slice_mut(s).ok_or_else(|| wrong_element::<T>("as_mut_slice", dtype))
            }
        }
    }

    pub(crate) fn cpu_storage(&self) -> &CpuStorage {
        match &self.storage {
            Storage::Cpu(s) => s,
        }
    }

    pub(crate) fn cpu_storage_mut(&mut self) -> &mut CpuStorage {
        match &mut self.storage {
            Storage::Cpu(s) => s,
        }
    }

    /// The f32 data, for ops that compute in f32.
    pub(crate) fn f32s(&self, op: &'static str) -> Result<&[f32]> {
        match self.cpu_storage() {
            CpuStorage::F32(v) => Ok(v),
            other => Err(Error::DType {
                op,
                expected: DType::F32,
                got: other.dtype(),
            }),
        }
    }

    pub(crate) fn f32s_mut(&mut self, op: &'static str) -> Result<&mut [f32]> {
        match self.cpu_storage_mut() {
            CpuStorage::F32(v) => Ok(v),
            other => Err(Error::DType {
                op,
                expected: DType::F32,
                got: other.dtype(),
            }),
        }
    }

    /// All values converted to f32 (a copy).
    pub fn to_vec_f32(&self) -> Vec<f32> {
        self.cpu_storage().to_f32_vec()
    }

    /// Converts to another dtype (round to nearest even for the half types).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        let storage = match self.cpu_storage() {
            CpuStorage::I64(_) if dtype.is_float() => {
                return invalid("to_dtype", "integer tensors convert only to i64");
            }
            CpuStorage::F32(v) => CpuStorage::from_f32(v, dtype),
            other => CpuStorage::from_f32(&other.to_f32_vec(), dtype),
        };
        Tensor::from_cpu(storage, &self.shape)
    }

    /// The same tensor on another device. Only the CPU holds a `Tensor`: moving one to a
    /// CUDA device is [`crate::cuda::CudaTensor::upload`], so `Cuda` is an error here.
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        match device {
            Device::Cpu => Ok(self.clone()),
            Device::Cuda(_) => Err(Error::DeviceUnavailable(
                device.to_string(),
                "a `Tensor` lives in host memory; use `cuda::CudaTensor::upload`".into(),
            )),
        }
    }

    pub(crate) fn check_rank(&self, op: &'static str, rank: usize) -> Result<()> {
        if self.rank() != rank {
            return shape_err(
                op,
                format!("expected a rank-{rank} tensor, got shape {:?}", self.shape),
            );
        }
        Ok(())
    }
}

fn wrong_element<T: 'static>(op: &'static str, got: DType) -> Error {
    Error::Invalid {
        op,
        message: format!("tensor holds {got:?}, not {}", std::any::type_name::<T>()),
    }
}
