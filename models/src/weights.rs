//! Weights of one diffusers component folder (`unet/`, `vae/`, `text_encoder/`, ...).
//!
//! Finds the safetensors file(s) as diffusers and transformers save them (single file, sharded
//! with an index, with or without the `.fp16` variant), and hands out tensors by name as f32,
//! checking shapes, so a missing or mis-shaped weight is an error naming file and tensor.
//!
//! [`Weights::random`] instead generates each tensor a loader asks for and records it, so
//! building a network through its normal loader yields a checkpoint with exactly the names
//! and shapes that loader (and diffusers) reads; [`Weights::save`] writes it.

mod random;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use retouch_kernels::{DType, SafeTensorsFile, Tensor, save_safetensors_with_metadata};
use serde::de::DeserializeOwned;

use crate::{Error, Result};
use random::RandomWeights;
pub(crate) use random::mix as mix_seed;

/// File stems diffusers (`diffusion_pytorch_model`) and transformers (`model`) use.
const STEMS: [&str; 2] = ["diffusion_pytorch_model", "model"];

pub struct Weights {
    /// The component folder; for random weights, a label used in error messages.
    dir: PathBuf,
    source: Source,
}

enum Source {
    Files {
        files: Vec<SafeTensorsFile>,
        /// Tensor name -> index into `files`.
        index: HashMap<String, usize>,
    },
    Random(RandomWeights),
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
        Ok(Weights {
            dir,
            source: Source::Files { files, index },
        })
    }

    /// Weights that generate each tensor on its first `get` (f32; norm scales 1, biases 0,
    /// other weights N(0, 1) / sqrt(fan_in)) and record it. Values depend only on `seed` and
    /// the tensor's name.
    pub fn random(seed: u64) -> Weights {
        Weights {
            dir: PathBuf::from(format!("<random weights, seed {seed}>")),
            source: Source::Random(RandomWeights::new(seed)),
        }
    }

    /// Random weights only: calls `f(name, elements)` after generating each tensor (progress
    /// reporting). Does nothing for weights read from files.
    pub fn on_generate(mut self, f: impl Fn(&str, usize) + Send + Sync + 'static) -> Weights {
        if let Source::Random(r) = &mut self.source {
            r.set_on_generate(Arc::new(f));
        }
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the checkpoint holds `name`. Random weights answer `false` for every name, so
    /// the loaders' probes for alternative namings (legacy VAE attention, unprefixed CLIP)
    /// fail and they request the standard names diffusers and transformers write.
    pub fn contains(&self, name: &str) -> bool {
        match &self.source {
            Source::Files { index, .. } => index.contains_key(name),
            Source::Random(_) => false,
        }
    }

    fn file_of(&self, name: &str) -> Result<&SafeTensorsFile> {
        let missing = || Error::MissingWeight {
            path: self.dir.clone(),
            name: name.to_string(),
        };
        match &self.source {
            Source::Files { files, index } => Ok(&files[*index.get(name).ok_or_else(missing)?]),
            Source::Random(_) => Err(missing()),
        }
    }

    /// A tensor random weights have already generated.
    fn made(&self, name: &str) -> Option<Tensor> {
        match &self.source {
            Source::Random(r) => {
                let made = r.made();
                made.index.get(name).map(|&i| made.tensors[i].1.clone())
            }
            Source::Files { .. } => None,
        }
    }

    /// The tensor `name` as f32, which must have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if let Source::Random(r) = &self.source {
            return r.get(name, shape).map_err(|got| Error::WeightShape {
                path: self.dir.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                got,
            });
        }
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

    /// The tensor `name` as f32, whatever its shape. Random weights can only return tensors
    /// already generated (nothing says what shape a new one should have).
    pub fn get_any(&self, name: &str) -> Result<Tensor> {
        if let Some(t) = self.made(name) {
            return Ok(t);
        }
        Ok(self.file_of(name)?.get(name)?.to_dtype(DType::F32)?)
    }

    /// The shape of `name` without reading it (random weights: of a generated tensor).
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        if let Some(t) = self.made(name) {
            return Ok(t.shape().to_vec());
        }
        Ok(self.file_of(name)?.shape(name)?)
    }

    /// Random weights: every tensor generated so far, in the order it was requested.
    pub fn into_tensors(self) -> Result<Vec<(String, Tensor)>> {
        match self.source {
            Source::Random(r) => Ok(r.into_made().tensors),
            Source::Files { .. } => Err(Error::Invalid(format!(
                "{}: weights read from files have no generated tensors to hand out",
                self.dir.display()
            ))),
        }
    }

    /// Random weights: writes every tensor generated so far to one safetensors file, as
    /// `dtype` (f32, f16 or bf16), with the `{"format": "pt"}` metadata transformers checks.
    pub fn save(self, path: impl AsRef<Path>, dtype: DType) -> Result<()> {
        if !dtype.is_float() {
            return Err(Error::Invalid(format!(
                "weights are saved as a float dtype, not {dtype:?}"
            )));
        }
        // Converted one at a time, so each f32 original is freed as its copy is made.
        let tensors = self
            .into_tensors()?
            .into_iter()
            .map(|(name, t)| Ok((name, t.to_dtype(dtype)?)))
            .collect::<Result<Vec<_>>>()?;
        save_safetensors_with_metadata(
            path,
            tensors.iter().map(|(name, t)| (name.as_str(), t)),
            &[("format", "pt")],
        )?;
        Ok(())
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
