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

use retouch_models::unet::UnitTimes;

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

/// Each unit's cost as a worker measured it on its own forwards: seconds per sample run
/// densely, and per level-0 active row run masked, each an exponential average over the
/// forwards seen (so the costs follow the machine's load).
#[derive(Clone, Debug, Default)]
pub struct UnitCosts {
    dense_per_sample: Option<Vec<f64>>,
    masked_per_row: Option<Vec<f64>>,
}

/// Weight of the newest forward in the averages.
const NEWEST: f64 = 0.3;

impl UnitCosts {
    /// Folds one forward's unit times in.
    pub fn observe(&mut self, times: &UnitTimes) {
        if times.size == 0 || times.seconds.is_empty() {
            return;
        }
        let per: Vec<f64> = times
            .seconds
            .iter()
            .map(|s| s / times.size as f64)
            .collect();
        let slot = if times.masked {
            &mut self.masked_per_row
        } else {
            &mut self.dense_per_sample
        };
        match slot {
            Some(avg) if avg.len() == per.len() => {
                for (a, p) in avg.iter_mut().zip(&per) {
                    *a += NEWEST * (p - *a);
                }
            }
            _ => *slot = Some(per),
        }
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
        let dense_per_sample = self.dense_per_sample.as_ref()?;
        let dense = dense_per_sample
            .iter()
            .map(|s| s * samples as f64)
            .collect();
        let masked = match &self.masked_per_row {
            Some(per_row) if per_row.len() == dense_per_sample.len() => {
                per_row.iter().map(|s| s * rows as f64).collect()
            }
            _ => dense_per_sample
                .iter()
                .map(|s| s * rows as f64 / positions.max(1) as f64)
                .collect(),
        };
        Some((dense, masked))
    }
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
    fn unit_costs_follow_the_forwards_they_see() {
        let mut costs = UnitCosts::default();
        assert!(costs.predict(2, 10, 100).is_none());
        costs.observe(&UnitTimes {
            masked: false,
            size: 2,
            seconds: vec![2.0, 4.0],
        });
        // Masked units unseen yet: the dense cost per position, times the rows.
        let (dense, masked) = costs.predict(4, 10, 100).unwrap();
        assert_eq!(dense, vec![4.0, 8.0]);
        assert_eq!(masked, vec![0.1, 0.2]);
        costs.observe(&UnitTimes {
            masked: true,
            size: 20,
            seconds: vec![1.0, 1.0],
        });
        let (_, masked) = costs.predict(4, 10, 100).unwrap();
        assert_eq!(masked, vec![0.5, 0.5]);
        // A newer dense forward moves the average part of the way.
        costs.observe(&UnitTimes {
            masked: false,
            size: 1,
            seconds: vec![2.0, 2.0],
        });
        let (dense, _) = costs.predict(1, 10, 100).unwrap();
        assert!((dense[0] - 1.3).abs() < 1e-12 && (dense[1] - 2.0).abs() < 1e-12);
    }

    #[test]
    fn unit_bytes_sum_each_units_entries() {
        assert_eq!(
            unit_bytes(&[1, 2, 4, 8], &[0, 1, 1, 3, 4]),
            vec![1, 0, 6, 8]
        );
    }
}
