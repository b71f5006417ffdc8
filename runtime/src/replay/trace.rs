//! The synthetic edit trace: Poisson arrivals (exponential gaps at the offered rate), each
//! edit of one of a few reused templates (uniform or Zipf popularity), with a mask ratio
//! drawn from a Beta distribution of the given mean. Published traces put the mean mask
//! ratio at 0.11 (production) to 0.19 (public); most masks are small, a few large, which a
//! Beta with a low concentration reproduces.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Beta, Distribution, Exp, Zipf};

/// Beta concentration (alpha + beta): low, so the ratios skew towards small masks.
const CONCENTRATION: f64 = 6.0;

#[derive(Clone, Debug, PartialEq)]
pub struct TraceConfig {
    /// Offered arrivals per second.
    pub rate: f64,
    pub requests: usize,
    pub templates: usize,
    /// Zipf exponent of template popularity; 0 picks templates uniformly.
    pub zipf: f64,
    /// Mean of the mask ratio's Beta distribution (before clamping).
    pub mask_mean: f64,
    /// Ratios are clamped to this range: a mask needs some area, and past about half the
    /// image an edit is a new image.
    pub mask_range: (f64, f64),
    pub seed: u64,
}

impl TraceConfig {
    pub fn new(rate: f64, requests: usize) -> TraceConfig {
        TraceConfig {
            rate,
            requests,
            templates: 4,
            zipf: 0.0,
            mask_mean: 0.15,
            mask_range: (0.02, 0.6),
            seed: 0,
        }
    }

    pub fn check(&self) -> Result<(), String> {
        if !(self.rate.is_finite() && self.rate > 0.0) {
            return Err(format!("the rate must be positive, got {}", self.rate));
        }
        if self.requests == 0 || self.templates == 0 {
            return Err("a trace needs at least one request and one template".into());
        }
        if !(self.zipf.is_finite() && self.zipf >= 0.0) {
            return Err(format!("the Zipf exponent must be >= 0, got {}", self.zipf));
        }
        if !(self.mask_mean > 0.0 && self.mask_mean < 1.0) {
            return Err(format!(
                "the mean mask ratio must be in (0, 1), got {}",
                self.mask_mean
            ));
        }
        let (lo, hi) = self.mask_range;
        if !(0.0 < lo && lo <= hi && hi <= 1.0) {
            return Err(format!(
                "mask ratio range ({lo}, {hi}) must be inside (0, 1]"
            ));
        }
        Ok(())
    }
}

/// One edit of the trace.
#[derive(Clone, Debug, PartialEq)]
pub struct Arrival {
    /// Seconds after the trace starts.
    pub at_s: f64,
    pub template: usize,
    pub mask_ratio: f64,
    pub mask_seed: u64,
    pub edit_seed: u64,
    /// Index into the edit prompts.
    pub prompt: usize,
}

/// The trace `config` describes; the same seed gives the same trace.
pub fn trace(config: &TraceConfig) -> Result<Vec<Arrival>, String> {
    config.check()?;
    let mut rng = StdRng::seed_from_u64(config.seed);
    let gaps = Exp::new(config.rate).map_err(|e| format!("arrival rate: {e}"))?;
    let m = config.mask_mean;
    let ratios = Beta::new(m * CONCENTRATION, (1.0 - m) * CONCENTRATION)
        .map_err(|e| format!("mask ratios: {e}"))?;
    let zipf = (config.zipf > 0.0)
        .then(|| Zipf::new(config.templates as f64, config.zipf))
        .transpose()
        .map_err(|e| format!("template popularity: {e}"))?;
    let (lo, hi) = config.mask_range;
    let mut at_s = 0.0;
    let mut out = Vec::with_capacity(config.requests);
    for i in 0..config.requests {
        // The first request arrives at once: the run's clock starts with it.
        if i > 0 {
            at_s += gaps.sample(&mut rng);
        }
        let template = match &zipf {
            // Zipf ranks run from 1 to n.
            Some(z) => (z.sample(&mut rng) as usize).clamp(1, config.templates) - 1,
            None => rng.random_range(0..config.templates),
        };
        out.push(Arrival {
            at_s,
            template,
            mask_ratio: ratios.sample(&mut rng).clamp(lo, hi),
            mask_seed: rng.random(),
            edit_seed: rng.random(),
            prompt: rng.random_range(0..usize::MAX),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_follow_the_rate_and_masks_the_mean() {
        let mut c = TraceConfig::new(4.0, 4000);
        c.seed = 7;
        let t = trace(&c).unwrap();
        assert_eq!(t.len(), 4000);
        assert_eq!(t[0].at_s, 0.0);
        assert!(t.windows(2).all(|w| w[0].at_s <= w[1].at_s));
        let rate = (t.len() - 1) as f64 / t.last().unwrap().at_s;
        assert!((rate - 4.0).abs() < 0.3, "{rate}");
        let mean = t.iter().map(|a| a.mask_ratio).sum::<f64>() / t.len() as f64;
        // Clamping lifts the smallest ratios a little.
        assert!((mean - 0.15).abs() < 0.02, "{mean}");
        assert!(t.iter().all(|a| (0.02..=0.6).contains(&a.mask_ratio)));
        let median = {
            let mut r: Vec<f64> = t.iter().map(|a| a.mask_ratio).collect();
            r.sort_by(f64::total_cmp);
            r[r.len() / 2]
        };
        assert!(median < mean, "skewed to small masks: {median} vs {mean}");
        assert!(t.iter().all(|a| a.template < 4));
        assert_eq!(trace(&c).unwrap(), t, "seeded");
    }

    #[test]
    fn zipf_favours_the_first_templates() {
        let mut c = TraceConfig::new(1.0, 3000);
        c.templates = 8;
        c.zipf = 1.2;
        let t = trace(&c).unwrap();
        let mut counts = [0usize; 8];
        for a in &t {
            counts[a.template] += 1;
        }
        assert!(counts[0] > counts[1] && counts[1] > counts[7], "{counts:?}");
        assert!(counts.iter().all(|&n| n > 0), "{counts:?}");
    }

    #[test]
    fn bad_configs_are_refused() {
        assert!(trace(&TraceConfig::new(0.0, 5)).is_err());
        assert!(trace(&TraceConfig::new(1.0, 0)).is_err());
        let mut c = TraceConfig::new(1.0, 5);
        c.mask_mean = 1.5;
        assert!(trace(&c).unwrap_err().contains("mean mask"));
        c.mask_mean = 0.1;
        c.mask_range = (0.5, 0.2);
        assert!(trace(&c).is_err());
        c.mask_range = (0.02, 0.6);
        c.zipf = -1.0;
        assert!(trace(&c).is_err());
    }
}
