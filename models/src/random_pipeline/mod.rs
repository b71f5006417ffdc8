//! Writes a diffusers-format Stable Diffusion folder with random weights, for benchmarks and
//! tests.
//!
//! Each network is built through its normal loader from [`Weights::random`], which generates
//! every tensor the loader asks for; the recorded tensors are then saved. The loaders mirror
//! diffusers' and transformers' module trees, so the files carry their names and shapes, and
//! the folder loads wherever a published checkpoint of the same architecture does.

mod presets;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use retouch_kernels::DType;
use serde_json::Value;

use crate::clip::{ClipTextConfig, ClipTextEncoder};
use crate::unet::{UNet, UNetConfig};
use crate::vae::{Vae, VaeConfig};
use crate::weights::{Weights, mix_seed, read_json};
use crate::{Error, Result};

/// The architectures `RandomPipeline` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// Stable Diffusion 1.5: 860M-parameter UNet, CLIP ViT-L/14 text encoder.
    Sd15,
    /// Stable Diffusion 2.1 (768, v-prediction): OpenCLIP ViT-H text encoder.
    Sd21,
    /// A small SD 1.x-shaped pipeline (64 x 64 images) that loads and runs in milliseconds.
    Tiny,
}

impl Preset {
    pub const ALL: [Preset; 3] = [Preset::Sd15, Preset::Sd21, Preset::Tiny];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Sd15 => "sd15",
            Preset::Sd21 => "sd21",
            Preset::Tiny => "tiny",
        }
    }

    /// The `unet/config.json` the preset's pipeline folder carries (as diffusers reads it).
    pub fn unet_config(self) -> Value {
        presets::configs(self).unet
    }

    /// The image size the preset is made for: the UNet's `sample_size` times the VAE's
    /// downsampling factor (512 for SD 1.5, 768 for SD 2.1, 64 for `tiny`).
    pub fn image_size(self) -> usize {
        let c = presets::configs(self);
        let latent = c.unet["sample_size"]
            .as_u64()
            .expect("presets set sample_size");
        let vae_blocks = c.vae["block_out_channels"]
            .as_array()
            .expect("presets set block_out_channels")
            .len();
        (latent as usize) << (vae_blocks - 1)
    }
}

impl FromStr for Preset {
    type Err = Error;

    fn from_str(s: &str) -> Result<Preset> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown preset {s:?} (expected sd15, sd21 or tiny)"
                ))
            })
    }
}

/// What the writer is doing, for progress reporting.
#[derive(Clone, Copy, Debug)]
pub enum Event<'a> {
    /// Starting a network (`"text_encoder"`, `"unet"`, `"vae"`).
    Component(&'a str),
    /// `elements` more parameters generated.
    Generated { elements: usize },
    /// Writing a weights file of `bytes`.
    Writing { path: &'a Path, bytes: u64 },
}

/// Receives [`Event`]s; shared with the weight generator, hence `Arc` and `Sync`.
pub type Progress = Arc<dyn Fn(Event<'_>) + Send + Sync>;

/// One pipeline to write.
#[derive(Clone, Copy, Debug)]
pub struct RandomPipeline {
    pub preset: Preset,
    /// `F32` writes the plain weight files, `F16` diffusers' `fp16` variant files.
    pub dtype: DType,
    pub seed: u64,
}

/// What was written.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// (component, parameters, weights file).
    pub components: Vec<(String, u64, PathBuf)>,
    /// Bytes of all files written.
    pub bytes: u64,
}

/// Each network's weights are seeded with `mix_seed(seed, index)`, index by component.
const SEED_TEXT_ENCODER: u64 = 1;
const SEED_UNET: u64 = 2;
const SEED_VAE: u64 = 3;

/// The entries of a pipeline folder this writer creates (and, asked to overwrite, replaces).
const ENTRIES: [&str; 6] = [
    "model_index.json",
    "scheduler",
    "tokenizer",
    "text_encoder",
    "unet",
    "vae",
];

impl RandomPipeline {
    pub fn new(preset: Preset) -> RandomPipeline {
        RandomPipeline {
            preset,
            dtype: DType::F32,
            seed: 0,
        }
    }

    /// The UNet [`write`](Self::write) saves, built in memory instead (nothing is written):
    /// the same configuration and weights, kept in f32 whatever `dtype` (written f16 weights
    /// are these rounded). For benchmarks; the peak memory is about twice the UNet's.
    pub fn unet(&self) -> Result<UNet> {
        let config_path =
            PathBuf::from(format!("<{} preset>/unet/config.json", self.preset.name()));
        let config: UNetConfig = serde_json::from_value(self.preset.unet_config())
            .map_err(|e| Error::config(&config_path, e.to_string()))?;
        let weights = Weights::random(mix_seed(self.seed, SEED_UNET));
        // The recorded copies of the weights are freed when `weights` is dropped.
        UNet::from_weights(config, &config_path, &weights)
    }

    /// Writes the pipeline folder `dir`. It must be absent or empty unless `overwrite`, which
    /// replaces the pipeline's entries in it (leaving other files). Each network is generated,
    /// saved and freed before the next, so the peak memory is about twice the largest one.
    pub fn write(
        &self,
        dir: &Path,
        overwrite: bool,
        progress: Option<Progress>,
    ) -> Result<Summary> {
        let variant = match self.dtype {
            DType::F32 => "",
            DType::F16 => ".fp16",
            other => {
                return Err(Error::Invalid(format!(
                    "random pipelines are written as f32 or f16, not {other:?}"
                )));
            }
        };
        prepare_dir(dir, overwrite)?;
        let configs = presets::configs(self.preset);
        write_json(&dir.join("model_index.json"), &configs.model_index)?;
        let scheduler = dir.join("scheduler");
        create_dir(&scheduler)?;
        write_json(&scheduler.join("scheduler_config.json"), &configs.scheduler)?;
        configs.tokenizer.write(&dir.join("tokenizer"))?;

        let mut text_config = configs.text_encoder;
        let torch_dtype = if self.dtype == DType::F16 {
            "float16"
        } else {
            "float32"
        };
        text_config["torch_dtype"] = Value::from(torch_dtype);
        let mut writer = Writer {
            dir,
            pipeline: self,
            progress: progress.unwrap_or_else(|| Arc::new(|_| {})),
            summary: Summary::default(),
        };
        let stem = format!("model{variant}.safetensors");
        writer.component(
            "text_encoder",
            &text_config,
            &stem,
            SEED_TEXT_ENCODER,
            |path, w| ClipTextEncoder::from_weights(ClipTextConfig::read(path)?, w).map(drop),
        )?;
        let stem = format!("diffusion_pytorch_model{variant}.safetensors");
        writer.component("unet", &configs.unet, &stem, SEED_UNET, |path, w| {
            let config: UNetConfig = read_json(path)?;
            UNet::from_weights(config, path, w).map(drop)
        })?;
        writer.component("vae", &configs.vae, &stem, SEED_VAE, |path, w| {
            let config: VaeConfig = read_json(path)?;
            Vae::from_weights(config, path, w).map(drop)
        })?;

        let mut summary = writer.summary;
        summary.bytes = folder_size(dir)?;
        Ok(summary)
    }
}

/// The networks' part of one `write`.
struct Writer<'a> {
    dir: &'a Path,
    pipeline: &'a RandomPipeline,
    progress: Progress,
    summary: Summary,
}

impl Writer<'_> {
    /// Writes `dir/name/config.json`, builds the network from it (read back through the
    /// loader's own config reader) on random weights seeded by `seed_index`, and saves the
    /// weights as `file`.
    fn component(
        &mut self,
        name: &str,
        config: &Value,
        file: &str,
        seed_index: u64,
        build: impl FnOnce(&Path, &Weights) -> Result<()>,
    ) -> Result<()> {
        let progress = &self.progress;
        progress(Event::Component(name));
        let folder = self.dir.join(name);
        create_dir(&folder)?;
        let config_path = folder.join("config.json");
        write_json(&config_path, config)?;

        let elements = Arc::new(AtomicU64::new(0));
        let seed = mix_seed(self.pipeline.seed, seed_index);
        let weights = Weights::random(seed).on_generate({
            let (elements, progress) = (elements.clone(), progress.clone());
            move |_, n| {
                elements.fetch_add(n as u64, Ordering::Relaxed);
                progress(Event::Generated { elements: n });
            }
        });
        // The network itself is dropped here; only the recorded tensors are kept.
        build(&config_path, &weights)?;

        let path = folder.join(file);
        let params = elements.load(Ordering::Relaxed);
        let dtype = self.pipeline.dtype;
        progress(Event::Writing {
            path: &path,
            bytes: params * dtype.size_in_bytes() as u64,
        });
        weights.save(&path, dtype)?;
        // safetensors writes through a private temporary file (mode 0600); give the weights
        // the permissions the umask gave config.json, as for every other file of the folder.
        let permissions = std::fs::metadata(&config_path)
            .map_err(io_error(&config_path))?
            .permissions();
        std::fs::set_permissions(&path, permissions).map_err(io_error(&path))?;
        self.summary
            .components
            .push((name.to_string(), params, path));
        Ok(())
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn create_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(io_error(path))
}

/// Checks (and with `overwrite`, clears) the output folder before anything is generated, so
/// a bad path fails at once.
fn prepare_dir(dir: &Path, overwrite: bool) -> Result<()> {
    if dir.exists() {
        if !dir.is_dir() {
            return Err(Error::config(dir, "exists and is not a directory"));
        }
        let mut entries = std::fs::read_dir(dir).map_err(io_error(dir))?;
        if entries.next().is_some() {
            if !overwrite {
                return Err(Error::config(dir, "exists and is not empty"));
            }
            for entry in ENTRIES {
                let path = dir.join(entry);
                if path.is_dir() {
                    std::fs::remove_dir_all(&path).map_err(io_error(&path))?;
                } else if path.exists() {
                    std::fs::remove_file(&path).map_err(io_error(&path))?;
                }
            }
        }
    }
    create_dir(dir)?;
    // Fails here rather than after minutes of generation when the folder is read-only.
    let probe = dir.join(".retouch-write-test");
    std::fs::write(&probe, b"").map_err(io_error(dir))?;
    std::fs::remove_file(&probe).map_err(io_error(&probe))
}

/// Writes JSON as diffusers does: two-space indent, sorted keys, trailing newline.
fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = match value {
        Value::Object(map) => serde_json::to_string_pretty(&map.iter().collect::<BTreeMap<_, _>>()),
        other => serde_json::to_string_pretty(other),
    }
    .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    std::fs::write(path, text + "\n").map_err(io_error(path))
}

fn folder_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let path = entry.map_err(io_error(dir))?.path();
        total += if path.is_dir() {
            folder_size(&path)?
        } else {
            std::fs::metadata(&path).map_err(io_error(&path))?.len()
        };
    }
    Ok(total)
}
