//! Reading (memory-mapped) and writing safetensors files.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::{Dtype, Metadata, TensorInfo, View};

use crate::tensor::CpuStorage;
use crate::{DType, Error, Result, Tensor};

/// An open safetensors file. The file is memory-mapped and only the tensors asked for are
/// copied out, so opening a multi-gigabyte checkpoint to read one tensor is cheap.
pub struct SafeTensorsFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    data_start: usize,
    metadata: Metadata,
}

impl SafeTensorsFile {
    pub fn open(path: impl AsRef<Path>) -> Result<SafeTensorsFile> {
        let path = path.as_ref().to_path_buf();
        let io_err = |source| Error::Io {
            path: path.display().to_string(),
            source,
        };
        let file = File::open(&path).map_err(io_err)?;
        // SAFETY: the map is read-only; a file truncated underneath us is the one hazard
        // memory-mapped readers accept, as every safetensors loader does.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err)?;
        let (header_len, metadata) =
            safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| Error::SafeTensors {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        Ok(SafeTensorsFile {
            path,
            mmap,
            data_start: 8 + header_len,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.metadata.tensors().into_keys().collect();
        names.sort();
        names
    }

    pub fn contains(&self, name: &str) -> bool {
        self.metadata.info(name).is_some()
    }

    /// Shape and dtype of a tensor without reading it.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.info(name)?.shape.clone())
    }

    /// Bytes a tensor occupies in the file, without reading it.
    pub fn byte_len(&self, name: &str) -> Result<usize> {
        let (start, end) = self.info(name)?.data_offsets;
        Ok(end - start)
    }

    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.metadata
            .info(name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.display().to_string(),
                name: name.to_string(),
            })
    }

    /// Copies one tensor out of the map, in its stored dtype.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        let info = self.info(name)?;
        let (start, end) = info.data_offsets;
        let bytes = &self.mmap[self.data_start + start..self.data_start + end];
        let storage = match info.dtype {
            Dtype::F32 => CpuStorage::F32(cast_vec::<f32>(bytes)),
            Dtype::F16 => CpuStorage::F16(cast_vec::<f16>(bytes)),
            Dtype::BF16 => CpuStorage::BF16(cast_vec::<bf16>(bytes)),
            Dtype::I64 => CpuStorage::I64(cast_vec::<i64>(bytes)),
            other => {
                return Err(Error::SafeTensors {
                    path: self.path.display().to_string(),
                    message: format!("tensor `{name}` has unsupported dtype {other:?}"),
                });
            }
        };
        Tensor::from_cpu(storage, &info.shape).map_err(|e| Error::SafeTensors {
            path: self.path.display().to_string(),
            message: format!("tensor `{name}`: {e}"),
        })
    }

    /// Every tensor in the file.
    pub fn load_all(&self) -> Result<HashMap<String, Tensor>> {
        self.names()
            .into_iter()
            .map(|name| self.get(&name).map(|t| (name, t)))
            .collect()
    }
}

/// Copies little-endian bytes into an aligned vector (safetensors data need not be aligned).
fn cast_vec<T: bytemuck::Pod>(bytes: &[u8]) -> Vec<T> {
    let mut out = vec![T::zeroed(); bytes.len() / std::mem::size_of::<T>()];
    bytemuck::cast_slice_mut::<T, u8>(&mut out).copy_from_slice(bytes);
    out
}

struct TensorView<'a>(&'a Tensor);

impl View for TensorView<'_> {
    fn dtype(&self) -> Dtype {
        match self.0.dtype() {
            DType::F32 => Dtype::F32,
            DType::F16 => Dtype::F16,
            DType::BF16 => Dtype::BF16,
            DType::I64 => Dtype::I64,
        }
    }

    fn shape(&self) -> &[usize] {
        self.0.shape()
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(match self.0.cpu_storage() {
            CpuStorage::F32(v) => bytemuck::cast_slice(v),
            CpuStorage::F16(v) => bytemuck::cast_slice(v),
            CpuStorage::BF16(v) => bytemuck::cast_slice(v),
            CpuStorage::I64(v) => bytemuck::cast_slice(v),
        })
    }

    fn data_len(&self) -> usize {
        self.0.size_in_bytes()
    }
}

/// Writes named tensors to a safetensors file.
pub fn save_safetensors<'a>(
    path: impl AsRef<Path>,
    tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
) -> Result<()> {
    save_safetensors_with_metadata(path, tensors, &[])
}

/// Writes named tensors with header metadata (transformers refuses checkpoints without
/// `{"format": "pt"}`); no metadata writes none.
pub fn save_safetensors_with_metadata<'a>(
    path: impl AsRef<Path>,
    tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
    metadata: &[(&str, &str)],
) -> Result<()> {
    let path = path.as_ref();
    let views = tensors
        .into_iter()
        .map(|(name, t)| (name.to_string(), TensorView(t)));
    let metadata = (!metadata.is_empty()).then(|| {
        metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    });
    safetensors::serialize_to_file(views, metadata, path).map_err(|e| Error::SafeTensors {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}
