//! A worker's cost model: step time linear in the step's FLOPs (fitted by least squares on
//! steps timed at start-up), a per-request cost outside the steps (text encoding, VAE
//! decoding), and the bandwidth at which a template's cache reaches the worker.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct CostModel {
    /// Seconds of a step at zero FLOPs (scheduler update, blends, gathers).
    pub step_s: f64,
    /// Seconds per FLOP (the inverse of the throughput the worker reaches).
    pub s_per_flop: f64,
    /// Seconds per request outside its steps, at the model's native size.
    pub request_s: f64,
    /// Bytes per second of loading a template's cache onto the worker.
    pub load_bytes_per_s: f64,
    /// Timed steps the fit used; 0 when the model is assumed, not measured.
    pub samples: usize,
}

/// A straight line `y = intercept + slope * x`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Line {
    pub intercept: f64,
    pub slope: f64,
}

/// Ordinary least squares of `y` on `x`. None with fewer than two points, `x` without
/// spread, or non-finite input.
pub fn least_squares(points: &[(f64, f64)]) -> Option<Line> {
    if points.len() < 2 || points.iter().any(|(x, y)| !x.is_finite() || !y.is_finite()) {
        return None;
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx <= f64::EPSILON * mx.abs().max(1.0).powi(2) {
        return None;
    }
    let slope = sxy / sxx;
    Some(Line {
        intercept: my - slope * mx,
        slope,
    })
}

/// The line through the origin closest to the points (least squares on `y = slope * x`).
fn through_origin(points: &[(f64, f64)]) -> Option<Line> {
    let sxx: f64 = points.iter().map(|p| p.0 * p.0).sum();
    let sxy: f64 = points.iter().map(|p| p.0 * p.1).sum();
    let slope = sxy / sxx;
    (sxx > 0.0 && slope.is_finite() && slope > 0.0).then_some(Line {
        intercept: 0.0,
        slope,
    })
}

impl CostModel {
    /// The model used without measurements: 20 GFLOP/s (a few CPU cores), no fixed costs,
    /// caches loading at 2 GB/s. Only ratios between workers matter for routing when every
    /// worker uses it.
    pub fn assumed() -> CostModel {
        CostModel {
            step_s: 0.0,
            s_per_flop: 1.0 / 20e9,
            request_s: 0.0,
            load_bytes_per_s: 2e9,
            samples: 0,
        }
    }

    /// Fits step seconds against step FLOPs. Timing noise can tilt the line to a negative
    /// intercept (or slope) that would predict nonsense for small masks; the fit then falls
    /// back to a line through the origin. None when nothing sensible fits.
    pub fn fit_steps(points: &[(f64, f64)]) -> Option<Line> {
        match least_squares(points) {
            Some(line) if line.slope > 0.0 && line.intercept >= 0.0 => Some(line),
            _ => through_origin(points),
        }
    }

    /// Predicted seconds of one step of `flops`.
    pub fn step_seconds(&self, flops: f64) -> f64 {
        self.step_s + self.s_per_flop * flops
    }

    /// Predicted seconds to bring `bytes` of template cache onto the worker.
    pub fn load_seconds(&self, bytes: u64) -> f64 {
        if bytes == 0 || self.load_bytes_per_s <= 0.0 {
            0.0
        } else {
            bytes as f64 / self.load_bytes_per_s
        }
    }

    /// The model's effective throughput, for reports.
    pub fn gflops(&self) -> f64 {
        1e-9 / self.s_per_flop
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_squares_recovers_known_coefficients() {
        let points: Vec<(f64, f64)> = (0..6)
            .map(|i| {
                let x = 1e8 * (1.0 + i as f64);
                (x, 0.004 + 2.5e-11 * x)
            })
            .collect();
        let line = least_squares(&points).unwrap();
        assert!((line.intercept - 0.004).abs() < 1e-12, "{line:?}");
        assert!((line.slope - 2.5e-11).abs() < 1e-20, "{line:?}");
        assert_eq!(CostModel::fit_steps(&points), Some(line));
    }

    #[test]
    fn noisy_points_fit_close_and_symmetric_noise_cancels() {
        // +-1 ms alternating noise around 2 ms + 1 ns per unit.
        let points: Vec<(f64, f64)> = (0..20)
            .map(|i| {
                let x = 1e6 * (i / 2) as f64;
                let noise = if i % 2 == 0 { 1e-3 } else { -1e-3 };
                (x, 2e-3 + 1e-9 * x + noise)
            })
            .collect();
        let line = least_squares(&points).unwrap();
        assert!((line.intercept - 2e-3).abs() < 1e-9, "{line:?}");
        assert!((line.slope - 1e-9).abs() < 1e-15, "{line:?}");
    }

    #[test]
    fn degenerate_input_does_not_fit() {
        assert_eq!(least_squares(&[(1.0, 2.0)]), None);
        assert_eq!(least_squares(&[(1.0, 2.0), (1.0, 3.0)]), None);
        assert_eq!(least_squares(&[(1.0, f64::NAN), (2.0, 3.0)]), None);
        // Same x everywhere: no slope by least squares, but a line through the origin.
        let line = CostModel::fit_steps(&[(2.0, 4.0), (2.0, 4.0)]).unwrap();
        assert_eq!(line.slope, 2.0);
        assert_eq!(CostModel::fit_steps(&[(0.0, 1.0), (0.0, 2.0)]), None);
    }

    #[test]
    fn a_negative_intercept_falls_back_to_the_origin() {
        let points = [(1.0, 0.5), (2.0, 2.0), (3.0, 3.5)];
        assert!(least_squares(&points).unwrap().intercept < 0.0);
        let line = CostModel::fit_steps(&points).unwrap();
        assert_eq!(line.intercept, 0.0);
        assert!(line.slope > 0.0);
    }

    #[test]
    fn loading_time_follows_bandwidth() {
        let m = CostModel {
            load_bytes_per_s: 1e9,
            ..CostModel::assumed()
        };
        assert_eq!(m.load_seconds(0), 0.0);
        assert!((m.load_seconds(500_000_000) - 0.5).abs() < 1e-12);
    }
}
