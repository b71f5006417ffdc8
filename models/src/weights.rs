//! Weights of one diffusers component folder (`unet/`, `vae/`, `text_encoder/`, ...).
//!
//! Finds the safetensors file(s) as diffusers and transformers save them (single file, sharded
//! with an index, with or without the `.fp16` variant), and hands out tensors by name as f32,
//! checking shapes, so a missing or mis-shaped weight is an error naming file and tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use retouch_kernels::{DType, SafeTensorsFile, Tensor};
use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// File stems diffusers (`diffusion_pytorch_model`) and transformers (`model`) use.
const STEMS: [&str; 2] = ["diffusion_pytorch_model", "model"];

pub struct Weights {
    dir: PathBuf,
    files: Vec<SafeTensorsFile>,
    /// Tensor name -> index into `files`.
    index: HashMap<String, usize>,
}

/// Reads and parses a component's `config.json` (or another JSON file).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::config(path, e.to_string()))
}

impl Weights {
    /// Opens the weights of a component folder. With `variant = Some("fp16")` the
    /// `*.fp16.safetensors` files are preferred; without, the plain ones, falling back to the
    /// other kind when only it exists.
    pub fn open(dir: impl AsRef<Path>, variant: Option<&str>) -> Result<Weights> {
        let dir = dir.as_ref().to_path_buf();
        let paths = find_files(&dir, variant)?;
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for path in paths {
            let file = SafeTensorsFile::open(&path)?;
            for name in file.names() {
                index.insert(name, files.len());
            }
            files.push(file);
        }
        Ok(Weights { dir, files, index })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn file_of(&self, name: &str) -> Result<&SafeTensorsFile> {
        let i = self.index.get(name).ok_or_else(|| Error::MissingWeight {
            path: self.dir.clone(),
            name: name.to_string(),
        })?;
        Ok(&self.files[*i])
    }

    /// The tensor `name` as f32, which must have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let file = self.file_of(name)?;
        let got = file.shape(name)?;
        if got != shape {
            return Err(Error::WeightShape {
                path: file.path().to_path_buf(),
                name: name.to_string(),
                expected: shape.to_vec(),
                got,
            });
        }
        Ok(file.get(name)?.to_dtype(DType::F32)?)
    }

    /// The tensor `name` as f32, whatever its shape.
    pub fn get_any(&self, name: &str) -> Result<Tensor> {
        Ok(self.file_of(name)?.get(name)?.to_dtype(DType::F32)?)
    }

    /// The shape of `name` without reading it.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.file_of(name)?.shape(name)?)
    }
}

fn find_files(dir: &Path, variant: Option<&str>) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(Error::config(dir, "not a directory"));
    }
    let mut suffixes = vec![String::from(".safetensors")];
    if let Some(v) = variant {
        suffixes.insert(0, format!(".{v}.safetensors"));
    } else {
        suffixes.push(String::from(".fp16.safetensors"));
    }
    for suffix in &suffixes {
        for stem in STEMS {
            let single = dir.join(format!("{stem}{suffix}"));
            if single.is_file() {
                return Ok(vec![single]);
            }
            let index = dir.join(format!("{stem}{suffix}.index.json"));
            if index.is_file() {
                return sharded(&index, dir);
            }
        }
    }
    Err(Error::config(
        dir,
        "no safetensors weights (expected diffusion_pytorch_model.safetensors, \
         model.safetensors, a .fp16 variant, or a sharded index)",
    ))
}

fn sharded(index: &Path, dir: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let parsed: Index = read_json(index)?;
    let mut shards: Vec<String> = parsed.weight_map.into_values().collect();
    shards.sort();
    shards.dedup();
    Ok(shards.into_iter().map(|s| dir.join(s)).collect())
}
