//! Templates: a generation recorded so that edits can reuse it. Registering one keeps its
//! latent trajectory (the scaled initial noise and the latents after every step), its image,
//! and per step the UNet activations cached-mode edits read (f16 by default).

use std::path::Path;

use retouch_kernels::{DType, SafeTensorsFile, Tensor, save_safetensors};
use serde::{Deserialize, Serialize};

use super::{DenoiseJob, JobOutput, Pipeline, RgbImage, cache_io};
use crate::nn::exec::StepCache;
use crate::schedulers::SchedulerKind;
use crate::weights::read_json;
use crate::{Error, Result};

/// How a template is generated.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TemplateSpec {
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: String,
    pub seed: u64,
    pub steps: usize,
    pub guidance: f32,
    /// `ddim`, `euler` or `dpmpp-2m`.
    pub scheduler: String,
    pub width: usize,
    pub height: usize,
}

impl TemplateSpec {
    pub fn scheduler_kind(&self) -> Result<SchedulerKind> {
        self.scheduler
            .parse()
            .map_err(|e| Error::Invalid(format!("template scheduler: {e}")))
    }
}

pub struct Template {
    pub spec: TemplateSpec,
    /// `steps + 1` latents `[1, h, w, c]`: the scaled initial noise, then each step's result.
    pub trajectory: Vec<Tensor>,
    pub image: RgbImage,
    /// One activation cache per step (empty when the template was registered without one).
    pub cache: Vec<StepCache>,
}

const SPEC_FILE: &str = "template.json";
const TRAJECTORY_FILE: &str = "trajectory.safetensors";
const IMAGE_FILE: &str = "image.png";
/// One safetensors file per step: `cache/step_0000.safetensors`, ...
const CACHE_DIR: &str = "cache";

impl Template {
    /// Bytes held by the trajectory.
    pub fn trajectory_bytes(&self) -> usize {
        self.trajectory.iter().map(Tensor::size_in_bytes).sum()
    }

    /// Bytes held by the activation cache.
    pub fn cache_bytes(&self) -> usize {
        self.cache.iter().map(StepCache::size_in_bytes).sum()
    }

    /// Writes `template.json`, `trajectory.safetensors` and `image.png` into `dir`.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let spec =
            serde_json::to_string_pretty(&self.spec).map_err(|e| Error::Invalid(e.to_string()))?;
        std::fs::write(dir.join(SPEC_FILE), spec).map_err(|source| Error::Io {
            path: dir.join(SPEC_FILE),
            source,
        })?;
        let parts: Vec<&Tensor> = self.trajectory.iter().collect();
        let stacked = Tensor::concat_batch(&parts)?;
        save_safetensors(dir.join(TRAJECTORY_FILE), [("trajectory", &stacked)])?;
        for (step, cache) in self.cache.iter().enumerate() {
            cache_io::save_step(&dir.join(CACHE_DIR), step, cache)?;
        }
        self.image.save_png(dir.join(IMAGE_FILE))
    }

    pub fn load(dir: impl AsRef<Path>) -> Result<Template> {
        let dir = dir.as_ref();
        let spec: TemplateSpec = read_json(&dir.join(SPEC_FILE))?;
        let stacked = SafeTensorsFile::open(dir.join(TRAJECTORY_FILE))?.get("trajectory")?;
        let n = stacked.dim(0)?;
        if n != spec.steps + 1 {
            return Err(Error::config(
                dir.join(TRAJECTORY_FILE),
                format!("{n} latents for a {}-step template", spec.steps),
            ));
        }
        let trajectory = stacked.split_batch(&vec![1; n])?;
        let image = RgbImage::load_png(dir.join(IMAGE_FILE))?;
        let cache_dir = dir.join(CACHE_DIR);
        let cache = if cache_dir.is_dir() {
            (0..spec.steps)
                .map(|step| cache_io::load_step(&cache_dir, step))
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        Ok(Template {
            spec,
            trajectory,
            image,
            cache,
        })
    }
}

impl Pipeline {
    /// Generates a template and records what edits of it need; `cache_dtype` None skips the
    /// activation cache (dense-mode edits only).
    pub fn register_template(
        &self,
        spec: &TemplateSpec,
        cache_dtype: Option<DType>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Template> {
        match self.run_job(DenoiseJob::template(self, spec, cache_dtype)?, progress)? {
            JobOutput::Template(template) => Ok(template),
            _ => Err(Error::Invalid(
                "a template job produced another output".into(),
            )),
        }
    }
}
