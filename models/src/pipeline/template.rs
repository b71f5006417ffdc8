//! Templates: a generation recorded so that edits can reuse it. Registering one keeps its
//! latent trajectory (the scaled initial noise and the latents after every step), its image,
//! and per step the UNet activations cached-mode edits read (f16 by default).

use std::path::{Path, PathBuf};

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
    /// The latents after `step` of its steps (0: the initial noise).
    pub fn latents_at(&self, step: usize) -> Result<&Tensor> {
        self.trajectory
            .get(step)
            .ok_or_else(|| Error::Invalid(format!("the template's trajectory has no step {step}")))
    }

    /// Bytes held by the trajectory.
    pub fn trajectory_bytes(&self) -> usize {
        self.trajectory.iter().map(Tensor::size_in_bytes).sum()
    }

    /// Bytes held by the activation cache.
    pub fn cache_bytes(&self) -> usize {
        self.cache.iter().map(StepCache::size_in_bytes).sum()
    }

    /// Writes `template.json`, `trajectory.safetensors`, `image.png` and, with an activation
    /// cache, one file per step under `cache/` into `dir`.
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

    /// Loads a template saved by [`Template::save`], activation cache included.
    pub fn load(dir: impl AsRef<Path>) -> Result<Template> {
        let dir = dir.as_ref();
        let mut template = Template::load_without_cache(dir)?;
        if Template::has_saved_cache(dir) {
            template.cache = (0..template.spec.steps)
                .map(|step| Template::load_step_cache(dir, step))
                .collect::<Result<Vec<_>>>()?;
        }
        Ok(template)
    }

    /// The template's small parts (spec, trajectory, image) with an empty cache, for a
    /// caller that loads the activation cache one step at a time
    /// ([`Template::load_step_cache`]).
    pub fn load_without_cache(dir: impl AsRef<Path>) -> Result<Template> {
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
        Ok(Template {
            spec,
            trajectory,
            image,
            cache: Vec::new(),
        })
    }

    /// Whether the template saved in `dir` has an activation cache (its `cache/` folder).
    pub fn has_saved_cache(dir: impl AsRef<Path>) -> bool {
        dir.as_ref().join(CACHE_DIR).is_dir()
    }

    /// The file holding one step's activation cache of the template saved in `dir`.
    pub fn step_cache_path(dir: impl AsRef<Path>, step: usize) -> PathBuf {
        cache_io::step_file(&dir.as_ref().join(CACHE_DIR), step)
    }

    /// One step's activation cache of the template saved in `dir`, alone.
    pub fn load_step_cache(dir: impl AsRef<Path>, step: usize) -> Result<StepCache> {
        cache_io::load_step(&dir.as_ref().join(CACHE_DIR), step)
    }

    /// Reads one step's cache entries from `first` on in order, handing each to `deliver`
    /// as soon as it is read (to a [`crate::nn::exec::StreamingStep`] a forward reads from).
    pub fn stream_step_cache(
        dir: impl AsRef<Path>,
        step: usize,
        first: usize,
        deliver: &mut dyn FnMut(usize, crate::nn::exec::CacheEntry),
    ) -> Result<()> {
        cache_io::read_entries(&dir.as_ref().join(CACHE_DIR), step, first, deliver)
    }

    /// Bytes of each entry of one step's saved cache, from its file's header (every step of
    /// a template has the same layout).
    pub fn step_cache_entry_bytes(dir: impl AsRef<Path>, step: usize) -> Result<Vec<u64>> {
        cache_io::entry_bytes(&dir.as_ref().join(CACHE_DIR), step)
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

#[cfg(test)]
mod tests {
    use retouch_kernels::DType;

    use super::*;
    use crate::pipeline::{EditMode, EditRequest, Mask, TemplateRef};
    use crate::random_pipeline::{Preset, RandomPipeline};

    /// A runtime keeps a template's small parts and hands each step's cache in as it loads
    /// it: the edit must be the one-shot edit, bit for bit.
    #[test]
    fn an_edit_fed_one_step_cache_at_a_time_matches_the_one_shot_edit() {
        let dir = std::env::temp_dir().join(format!("retouch-stepwise-{}", std::process::id()));
        RandomPipeline::new(Preset::Tiny)
            .write(&dir.join("model"), true, None)
            .unwrap();
        let pipe = Pipeline::load(dir.join("model"), None).unwrap();
        let spec = TemplateSpec {
            prompt: "a hill".into(),
            negative_prompt: String::new(),
            seed: 3,
            steps: 3,
            guidance: 4.0,
            scheduler: "ddim".into(),
            width: 64,
            height: 64,
        };
        let template = pipe
            .register_template(&spec, Some(DType::F16), &mut |_, _| {})
            .unwrap();
        let saved = dir.join("template");
        template.save(&saved).unwrap();
        let small = Template::load_without_cache(&saved).unwrap();
        assert!(small.cache.is_empty() && Template::has_saved_cache(&saved));
        assert!(Template::step_cache_path(&saved, 2).is_file());

        let mut values = vec![0.0; 64 * 64];
        values[64 * 16..64 * 40].fill(1.0);
        let mask = Mask {
            width: 64,
            height: 64,
            values,
        };
        let mut req = EditRequest::new("a lake");
        req.mode = EditMode::Cached;
        let want = pipe.edit(&template, &mask, &req, &mut |_, _| {}).unwrap();

        // Without its cache, the template is refused by the checked constructor...
        assert!(DenoiseJob::edit(&pipe, TemplateRef::Borrowed(&small), &mask, &req).is_err());
        let mut job =
            DenoiseJob::edit_with_external_cache(&pipe, TemplateRef::Borrowed(&small), &mask, &req)
                .unwrap();
        // ... and a step with no cache given fails rather than reading nothing.
        let mut starved =
            DenoiseJob::edit_with_external_cache(&pipe, TemplateRef::Borrowed(&small), &mask, &req)
                .unwrap();
        let first = starved.cache_step().unwrap();
        assert_eq!(first, req.first_step(spec.steps).unwrap());
        let err = starved.step(&pipe).unwrap_err().to_string();
        assert!(
            err.contains(&format!("no activation cache for step {first}")),
            "{err}"
        );

        while let Some(step) = job.cache_step() {
            let cache = Template::load_step_cache(&saved, step).unwrap();
            job.step_with_cache(&pipe, Some(&cache)).unwrap();
        }
        assert_eq!(job.cache_step(), None);
        let JobOutput::Edited(got) = job.finish(&pipe).unwrap() else {
            panic!("an edit job gives an edit");
        };
        assert_eq!(got.image, want.image);
        assert_eq!(
            got.latents.as_slice::<f32>().unwrap(),
            want.latents.as_slice::<f32>().unwrap()
        );
        // Dense edits read no cache.
        req.mode = EditMode::Dense;
        let dense = DenoiseJob::edit(&pipe, TemplateRef::Borrowed(&small), &mask, &req).unwrap();
        assert_eq!(dense.cache_step(), None);
        std::fs::remove_dir_all(dir).ok();
    }
}
