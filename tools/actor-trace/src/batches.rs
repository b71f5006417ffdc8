//! Batch composition over time: per worker, its steps grouped into time buckets (by the
//! step's start), with the requests that were in them and the mean batch size.

use std::collections::{BTreeMap, BTreeSet};

use crate::record::{Record, kinds};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Bucket {
    pub start_us: u64,
    pub end_us: u64,
    pub steps: usize,
    /// Mean requests per step (0 for a bucket without steps).
    pub mean_batch: f64,
    /// Every request in one of its steps, by id.
    pub requests: Vec<u64>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Timeline {
    pub actor: String,
    /// Consecutive buckets from the actor's first step to its last, empty ones included
    /// (they are its idle stretches).
    pub buckets: Vec<Bucket>,
}

/// The bucket width that cuts the trace's steps into about `count` buckets.
pub fn auto_bucket_us(records: &[Record], count: u64) -> u64 {
    let steps = records.iter().filter(|r| r.kind == kinds::STEP);
    let (first, last) = steps.fold((u64::MAX, 0), |(a, b), r| {
        (a.min(r.start_us), b.max(r.start_us))
    });
    if first > last {
        return 1;
    }
    ((last - first) / count.max(1)).max(1) + 1
}

/// Buckets of `bucket_us` counted from the trace's first step, so every worker's rows line
/// up in time.
pub fn timelines(records: &[Record], bucket_us: u64) -> Vec<Timeline> {
    let bucket_us = bucket_us.max(1);
    let steps: Vec<&Record> = records.iter().filter(|r| r.kind == kinds::STEP).collect();
    let Some(t0) = steps.iter().map(|r| r.start_us).min() else {
        return Vec::new();
    };
    let mut by_actor: BTreeMap<&str, BTreeMap<u64, (usize, usize, BTreeSet<u64>)>> =
        BTreeMap::new();
    for r in steps {
        let index = (r.start_us - t0) / bucket_us;
        let slot = by_actor
            .entry(&r.actor)
            .or_default()
            .entry(index)
            .or_default();
        let ids: BTreeSet<u64> = r
            .batch
            .iter()
            .map(|b| b.id)
            .chain(r.requests.iter().copied())
            .collect();
        slot.0 += 1;
        slot.1 += ids.len();
        slot.2.extend(ids);
    }
    by_actor
        .into_iter()
        .map(|(actor, slots)| {
            let first = *slots.keys().next().unwrap_or(&0);
            let last = *slots.keys().next_back().unwrap_or(&0);
            let buckets = (first..=last)
                .map(|i| {
                    let (steps, sizes, ids) = slots.get(&i).cloned().unwrap_or_default();
                    Bucket {
                        start_us: t0 + i * bucket_us,
                        end_us: t0 + (i + 1) * bucket_us,
                        steps,
                        mean_batch: if steps == 0 {
                            0.0
                        } else {
                            sizes as f64 / steps as f64
                        },
                        requests: ids.into_iter().collect(),
                    }
                })
                .collect();
            Timeline {
                actor: actor.to_string(),
                buckets,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture;

    #[test]
    fn steps_group_into_buckets_with_their_requests() {
        let lines = timelines(&fixture::records(), 2_000);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].actor, "worker-0");
        let b = &lines[0].buckets;
        assert_eq!(b.len(), 2);
        assert_eq!((b[0].start_us, b[0].end_us, b[0].steps), (1_400, 3_400, 3));
        assert!((b[0].mean_batch - 4.0 / 3.0).abs() < 1e-12);
        assert_eq!(b[0].requests, [1, 2]);
        assert_eq!((b[1].steps, b[1].mean_batch), (1, 1.0));
        assert_eq!(b[1].requests, [2]);
    }

    #[test]
    fn idle_buckets_between_steps_are_kept_empty() {
        let b = &timelines(&fixture::records(), 1_000)[0].buckets;
        // Steps start at 1400, 2000, 3000, 5000: buckets 0, 0, 1, 3.
        let steps: Vec<usize> = b.iter().map(|b| b.steps).collect();
        assert_eq!(steps, [2, 1, 0, 1]);
        assert!(b[2].requests.is_empty());
    }

    #[test]
    fn the_auto_width_covers_the_steps_in_about_that_many_buckets() {
        let records = fixture::records();
        let width = auto_bucket_us(&records, 4);
        assert_eq!(width, 901);
        assert_eq!(timelines(&records, width)[0].buckets.len(), 4);
        assert_eq!(auto_bucket_us(&[], 4), 1);
    }
}
