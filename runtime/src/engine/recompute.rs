//! The load-or-recompute plan of a cached step whose activations are not in memory yet.
//!
//! A masked forward reads each unit's cache entries (the template's conv inputs, keys and
//! values, norm statistics); a unit can instead be recomputed densely over the whole latent,
//! which needs no entries but costs the dense unit. Only a prefix can be recomputed (a dense
//! unit needs its whole input), so the plan is the number `k` of leading units to run
//! densely. Meanwhile the entries of units `k..` stream in, in order, and each masked unit
//! waits for its own: walking the units, masked unit `u` starts at `max(its entries loaded,
//! the unit before it done)`, so a plan's predicted time is
//!
//! `t = dense[0..k]; for u in k.. { t = max(t, load[k..=u]) + masked[u] }`
//!
//! (sums over units), and the plan is the `k` with the lowest `t`, ties to fewer units
//! recomputed. That holds where reads run beside compute (`Overlap::Parallel`); on a CPU
//! worker they take the cores the units need, so nothing is hidden and a unit is worth
//! recomputing only if its dense cost is below its load plus masked cost
//! (`Overlap::Shared`: `t = dense[..k] + (load + masked)[k..]`). With the entries resident (`load = 0`) that is `k = 0`, the plain cached step;
//! with a slow disk it recomputes as long as the stream would stall the masked units. This is
//! the design guide's bubble-free rule (use the cache for unit `i` only if waiting for its
//! load costs less than computing it in full), taken over the whole walk.

use std::collections::VecDeque;

use retouch_models::unet::UnitTimes;

use super::balancer::least_squares;

/// A plan and what it predicts.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Leading units run densely.
    pub recompute: usize,
    /// Predicted seconds of the step's forward under the plan.
    pub predicted_s: f64,
    /// Predicted seconds with nothing recomputed (waiting for the whole load first).
    pub cached_s: f64,
}

/// Whether loading runs beside compute or takes its turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overlap {
    /// Reads proceed while the units compute (a GPU worker: the copy engine and the host
    /// thread reading files are not the SMs).
    Parallel,
    /// Reads take the cores the units compute on (a CPU worker: its threads are all busy
    /// computing, so a read's time adds to the step's): the plan then trades each unit's
    /// load and masked cost against its dense cost, with nothing hidden.
    Shared,
}

/// The plan for per-unit dense and masked seconds and per-unit load seconds (each slice
/// one value per unit).
pub fn plan(dense: &[f64], masked: &[f64], load: &[f64], overlap: Overlap) -> Plan {
    let units = dense.len().min(masked.len()).min(load.len());
    let predicted = |k: usize| -> f64 {
        let mut t: f64 = dense[..k].iter().sum();
        let mut loaded = 0.0;
        for u in k..units {
            match overlap {
                Overlap::Parallel => {
                    loaded += load[u];
                    t = t.max(loaded) + masked[u];
                }
                Overlap::Shared => t += load[u] + masked[u],
            }
        }
        t
    };
    let cached_s = predicted(0);
    let (recompute, predicted_s) =
        (0..=units)
            .map(|k| (k, predicted(k)))
            .fold(
                (0, cached_s),
                |best, (k, t)| if t < best.1 { (k, t) } else { best },
            );
    Plan {
        recompute,
        predicted_s,
        cached_s,
    }
}

/// Each unit's cost as a worker measured it on its own forwards, dense (by samples) and
/// masked (by level-0 active rows): per unit, a line `seconds = fixed + slope * size`
/// through the most recent forwards of each mode, so a unit's launch and bookkeeping cost
/// (which dominates small maps) is not scaled with the rows. The window follows the
/// machine's load.
#[derive(Clone, Debug, Default)]
pub struct UnitCosts {
    dense: VecDeque<UnitTimes>,
    masked: VecDeque<UnitTimes>,
}

/// Forwards of each mode kept for the fits.
const WINDOW: usize = 32;

impl UnitCosts {
    /// Folds one forward's unit times in.
    pub fn observe(&mut self, times: &UnitTimes) {
        if times.size == 0 || times.seconds.is_empty() {
            return;
        }
        let window = if times.masked {
            &mut self.masked
        } else {
            &mut self.dense
        };
        // A model change (another unit count) starts the window afresh.
        if window
            .front()
            .is_some_and(|t| t.seconds.len() != times.seconds.len())
        {
            window.clear();
        }
        if window.len() == WINDOW {
            window.pop_front();
        }
        window.push_back(times.clone());
    }

    /// Per-unit seconds of a step over `samples` whole latents of `positions` level-0
    /// positions each, densely and masked on `rows` active rows in all. Before any masked
    /// forward was seen, a masked unit is priced as its dense cost per position (the FLOPs
    /// of every layer but self-attention scale with the rows). None before any dense
    /// forward was seen.
    pub fn predict(
        &self,
        samples: usize,
        rows: usize,
        positions: usize,
    ) -> Option<(Vec<f64>, Vec<f64>)> {
        let dense = fit_units(&self.dense, samples as f64)?;
        let masked = match fit_units(&self.masked, rows as f64) {
            Some(masked) if masked.len() == dense.len() => masked,
            _ => fit_units(&self.dense, rows as f64 / positions.max(1) as f64)?,
        };
        Some((dense, masked))
    }
}

/// Each unit's predicted seconds at `size`, from the least-squares line through the window's
/// (size, seconds) points ([`least_squares`]; a falling line is taken flat, at the mean);
/// through the origin where the sizes do not spread (one size seen); never below zero.
fn fit_units(window: &VecDeque<UnitTimes>, size: f64) -> Option<Vec<f64>> {
    let units = window.front()?.seconds.len();
    let n = window.len() as f64;
    let mean_x = window.iter().map(|t| t.size as f64).sum::<f64>() / n;
    Some(
        (0..units)
            .map(|u| {
                let points: Vec<(f64, f64)> = window
                    .iter()
                    .map(|t| (t.size as f64, t.seconds[u]))
                    .collect();
                let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
                let y = match least_squares(&points) {
                    Some(line) if line.slope >= 0.0 => line.intercept.max(0.0) + line.slope * size,
                    Some(_) => mean_y,
                    None => mean_y / mean_x.max(1e-12) * size,
                };
                y.max(0.0)
            })
            .collect(),
    )
}

/// Bytes of each unit's cache entries: `entry_bytes` per entry, `starts` the entries before
/// each unit boundary (`UNet::entry_starts`).
pub fn unit_bytes(entry_bytes: &[u64], starts: &[usize]) -> Vec<u64> {
    starts
        .windows(2)
        .map(|w| {
            let (a, b) = (w[0].min(entry_bytes.len()), w[1].min(entry_bytes.len()));
            entry_bytes[a..b.max(a)].iter().sum()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_entries_recompute_nothing() {
        let p = plan(
            &[4.0, 4.0, 4.0],
            &[1.0, 1.0, 1.0],
            &[0.0, 0.0, 0.0],
            Overlap::Parallel,
        );
        assert_eq!(p.recompute, 0);
        assert_eq!(p.predicted_s, 3.0);
        assert_eq!(p.cached_s, 3.0);
    }

    #[test]
    fn a_slow_load_is_hidden_behind_dense_units() {
        // Each unit's entries take 3 s, a masked unit 1 s: nothing recomputed, unit u waits
        // for 3 (u + 1) s of loading, so the walk ends at 9 + 1 = 10 s. One dense unit (4 s)
        // while units 1 and 2 stream: 4 + 1, then max(5, 6) + 1 = 7 s. Two: 8 + 1 = 9 s.
        let p = plan(
            &[4.0, 4.0, 4.0],
            &[1.0, 1.0, 1.0],
            &[3.0, 3.0, 3.0],
            Overlap::Parallel,
        );
        assert_eq!(p.cached_s, 10.0);
        assert_eq!((p.recompute, p.predicted_s), (1, 7.0));
        // A dense unit cheaper than its load: recompute everything.
        let p = plan(&[1.0, 1.0], &[0.5, 0.5], &[5.0, 5.0], Overlap::Parallel);
        assert_eq!((p.recompute, p.predicted_s), (2, 2.0));
        // Streaming hides a load behind the masked units before it: the first unit's
        // entries are free and the second's (1 s) arrive while the first runs (1 s).
        let p = plan(&[1.0, 1.0], &[1.0, 1.0], &[0.0, 1.0], Overlap::Parallel);
        assert_eq!((p.recompute, p.predicted_s), (0, 2.0));
        // Ties go to the plan that recomputes less: none (1 s of load, then 1 + 1) or one
        // unit (2 s dense, then 1).
        let p = plan(&[2.0, 2.0], &[1.0, 1.0], &[1.0, 0.0], Overlap::Parallel);
        assert_eq!((p.recompute, p.predicted_s, p.cached_s), (0, 3.0, 3.0));
    }

    #[test]
    fn on_shared_cores_a_load_hides_nothing() {
        // The slow load of the parallel example: each unit costs 3 + 1 cached, 4 dense.
        let p = plan(
            &[4.0, 4.0, 4.0],
            &[1.0, 1.0, 1.0],
            &[3.0, 3.0, 3.0],
            Overlap::Shared,
        );
        assert_eq!((p.recompute, p.predicted_s, p.cached_s), (0, 12.0, 12.0));
        // A unit cheaper dense than loaded and masked is recomputed; the rest are read.
        let p = plan(&[1.0, 9.0], &[1.0, 1.0], &[3.0, 3.0], Overlap::Shared);
        assert_eq!((p.recompute, p.predicted_s, p.cached_s), (1, 5.0, 8.0));
    }

    #[test]
    fn unit_costs_fit_a_fixed_cost_and_a_slope_per_unit() {
        let mut costs = UnitCosts::default();
        assert!(costs.predict(2, 10, 100).is_none());
        costs.observe(&UnitTimes {
            masked: false,
            size: 2,
            seconds: vec![2.0, 4.0],
        });
        // One dense size seen: proportional. Masked unseen: the dense cost per position.
        let (dense, masked) = costs.predict(4, 10, 100).unwrap();
        assert_eq!(dense, vec![4.0, 8.0]);
        assert_eq!(masked, vec![0.1, 0.2]);
        // Masked forwards of 20 and 60 rows: unit 0 costs 1 + 0.05 per row, unit 1 a flat 2.
        for (rows, s0) in [(20, 2.0), (60, 4.0)] {
            costs.observe(&UnitTimes {
                masked: true,
                size: rows,
                seconds: vec![s0, 2.0],
            });
        }
        let (_, masked) = costs.predict(4, 100, 100).unwrap();
        assert!(
            (masked[0] - 6.0).abs() < 1e-9 && (masked[1] - 2.0).abs() < 1e-9,
            "{masked:?}"
        );
        // The window keeps the newest forwards only.
        for _ in 0..WINDOW {
            costs.observe(&UnitTimes {
                masked: true,
                size: 10,
                seconds: vec![1.0, 1.0],
            });
        }
        let (_, masked) = costs.predict(4, 30, 100).unwrap();
        assert_eq!(masked, vec![3.0, 3.0]);
    }

    #[test]
    fn unit_bytes_sum_each_units_entries() {
        assert_eq!(
            unit_bytes(&[1, 2, 4, 8], &[0, 1, 1, 3, 4]),
            vec![1, 0, 6, 8]
        );
    }
}
