//! Random weights: tensors generated on request, for benchmark and test models.
//!
//! A loader asks for each tensor by name and shape exactly as it would read a checkpoint, so
//! the recorded tensors carry the names and shapes the loaders (and diffusers) expect.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use retouch_kernels::Tensor;

/// Called with each generated tensor's name and element count.
pub type OnGenerate = Arc<dyn Fn(&str, usize) + Send + Sync>;

/// Elements per independently seeded chunk: large tensors are generated in parallel, and the
/// values do not depend on the thread count.
const CHUNK: usize = 1 << 20;

pub(super) struct RandomWeights {
    seed: u64,
    made: Mutex<Made>,
    on_generate: Option<OnGenerate>,
}

#[derive(Default)]
pub(super) struct Made {
    pub tensors: Vec<(String, Tensor)>,
    pub index: HashMap<String, usize>,
}

impl RandomWeights {
    pub fn new(seed: u64) -> RandomWeights {
        RandomWeights {
            seed,
            made: Mutex::new(Made::default()),
            on_generate: None,
        }
    }

    pub fn set_on_generate(&mut self, f: OnGenerate) {
        self.on_generate = Some(f);
    }

    pub fn made(&self) -> MutexGuard<'_, Made> {
        // A panic elsewhere cannot leave `Made` half-updated (one push and one insert).
        self.made.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn into_made(self) -> Made {
        self.made.into_inner().unwrap_or_else(|e| e.into_inner())
    }

    /// The tensor `name` of `shape`: generated on first request (and recorded), the recorded
    /// one afterwards. A second request with another shape returns the recorded shape as `Err`.
    pub fn get(&self, name: &str, shape: &[usize]) -> std::result::Result<Tensor, Vec<usize>> {
        let mut made = self.made();
        if let Some(&i) = made.index.get(name) {
            let t = &made.tensors[i].1;
            return if t.shape() == shape {
                Ok(t.clone())
            } else {
                Err(t.shape().to_vec())
            };
        }
        // Seeded by name, so a tensor's values do not depend on what was asked before it.
        let t = generate(name, shape, mix(self.seed, fnv1a(name)));
        let next = made.tensors.len();
        made.index.insert(name.to_string(), next);
        made.tensors.push((name.to_string(), t.clone()));
        drop(made);
        if let Some(f) = &self.on_generate {
            f(name, t.elem_count());
        }
        Ok(t)
    }
}

/// Norm scales are 1 and biases 0, as a freshly initialised network has them; every other
/// weight is N(0, 1) / sqrt(fan_in), so activations keep about unit scale through deep stacks
/// (fan_in: all dimensions but the first, i.e. `in * kh * kw` for a conv).
fn generate(name: &str, shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    if shape.len() <= 1 {
        // The only 1-D weights in these networks are norm scales.
        let value = if name.ends_with(".weight") { 1.0 } else { 0.0 };
        return Tensor::from_vec(vec![value; n], shape).expect("length matches the shape");
    }
    let fan_in: usize = shape[1..].iter().product();
    let scale = 1.0 / (fan_in.max(1) as f32).sqrt();
    let mut data = vec![0f32; n];
    data.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(chunk, values)| {
            let mut rng = StdRng::seed_from_u64(mix(seed, chunk as u64));
            for v in values {
                let x: f32 = StandardNormal.sample(&mut rng);
                *v = x * scale;
            }
        });
    Tensor::from_vec(data, shape).expect("length matches the shape")
}

/// Derives an independent seed from a seed and an index (splitmix64's finaliser), so tensors
/// and chunks get unrelated streams.
pub(crate) fn mix(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::super::Weights;

    fn std_dev(values: &[f32]) -> f64 {
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
        (values
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt()
    }

    #[test]
    fn norms_are_one_biases_zero_weights_scaled_by_fan_in() {
        let w = Weights::random(7);
        let norm = w.get("norm.weight", &[8]).unwrap().to_vec_f32();
        assert!(norm.iter().all(|&v| v == 1.0));
        let bias = w.get("conv.bias", &[8]).unwrap().to_vec_f32();
        assert!(bias.iter().all(|&v| v == 0.0));
        // fan_in = 16 * 3 * 3 = 144: std 1/12.
        let conv = w.get("conv.weight", &[64, 16, 3, 3]).unwrap().to_vec_f32();
        let s = std_dev(&conv);
        assert!((s - 1.0 / 12.0).abs() < 0.005, "std {s}");
    }

    #[test]
    fn values_depend_on_seed_and_name_only() {
        let a = Weights::random(1);
        a.get("x.weight", &[4, 4]).unwrap();
        let y_after_x = a.get("y.weight", &[4, 4]).unwrap().to_vec_f32();
        let b = Weights::random(1);
        assert_eq!(b.get("y.weight", &[4, 4]).unwrap().to_vec_f32(), y_after_x);
        let c = Weights::random(2);
        assert_ne!(c.get("y.weight", &[4, 4]).unwrap().to_vec_f32(), y_after_x);
    }

    #[test]
    fn large_tensors_span_several_chunks_with_distinct_values() {
        let w = Weights::random(3);
        let t = w
            .get("big.weight", &[3, super::CHUNK])
            .unwrap()
            .to_vec_f32();
        let chunk = super::CHUNK;
        assert_ne!(t[..16], t[chunk..chunk + 16]);
        assert!((std_dev(&t) - 1.0 / (chunk as f64).sqrt()).abs() < 1e-5);
    }

    #[test]
    fn records_requests_in_order_and_checks_repeats() {
        let w = Weights::random(0);
        assert!(!w.contains("a.weight"));
        w.get("b.weight", &[2, 3]).unwrap();
        w.get("a.bias", &[2]).unwrap();
        // The same request again returns the recorded tensor; another shape is an error.
        w.get("b.weight", &[2, 3]).unwrap();
        let err = w.get("b.weight", &[3, 2]).unwrap_err().to_string();
        assert!(err.contains("b.weight") && err.contains("[2, 3]"), "{err}");
        assert_eq!(w.shape("a.bias").unwrap(), vec![2]);
        assert!(w.shape("never.asked").is_err());
        let names: Vec<String> = w
            .into_tensors()
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["b.weight", "a.bias"]);
    }

    #[test]
    fn saves_a_checkpoint_that_opens_as_weights() {
        let dir = std::env::temp_dir().join(format!("retouch-random-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let w = Weights::random(5);
        let expected = w.get("layer.weight", &[3, 5]).unwrap().to_vec_f32();
        w.get("layer.bias", &[3]).unwrap();
        w.save(
            dir.join("model.fp16.safetensors"),
            retouch_kernels::DType::F16,
        )
        .unwrap();
        let read = Weights::open(&dir, Some("fp16")).unwrap();
        let got = read.get("layer.weight", &[3, 5]).unwrap().to_vec_f32();
        for (g, e) in got.iter().zip(&expected) {
            assert!((g - e).abs() <= e.abs() * 1e-3, "{g} vs {e}");
        }
        assert!(read.contains("layer.bias"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
