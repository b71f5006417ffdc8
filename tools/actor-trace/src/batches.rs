//! Batch composition over time: per worker, time buckets with the steps that ran in them,
//! the requests in those steps and the mean batch size while stepping. A step counts in
//! every bucket it overlaps, weighted by the overlap, so a long step shows in each bucket
//! it spans rather than only where it started.

use std::collections::{BTreeMap, BTreeSet};

use crate::record::{Record, kinds};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Bucket {
    pub start_us: u64,
    pub end_us: u64,
    /// Steps overlapping the bucket.
    pub steps: usize,
    /// Time within the bucket spent in steps.
    pub stepping_us: u64,
    /// Requests per step, weighted by each step's time in the bucket (0 without steps).
    pub mean_batch: f64,
    /// Latent tokens per step through the UNet, weighted likewise; None when no step in the
    /// bucket recorded its tokens (traces written before they were recorded).
    pub mean_tokens: Option<f64>,
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

/// The bucket width that cuts the span of the trace's steps into about `count` buckets.
pub fn auto_bucket_us(records: &[Record], count: u64) -> u64 {
    let steps = records.iter().filter(|r| r.kind == kinds::STEP);
    let (first, last) = steps.fold((u64::MAX, 0), |(a, b), r| {
        (a.min(r.start_us), b.max(r.end_us))
    });
    if first > last {
        return 1;
    }
    ((last - first) / count.max(1)).max(1) + 1
}

#[derive(Clone, Default)]
struct Slot {
    steps: usize,
    sizes: usize,
    stepping_us: u64,
    weighted: u64,
    /// Steps that recorded tokens: their time in the bucket and tokens x time.
    token_us: u64,
    token_weighted: f64,
    ids: BTreeSet<u64>,
}

/// Buckets of `bucket_us` counted from the trace's first step, so every worker's rows line
/// up in time.
pub fn timelines(records: &[Record], bucket_us: u64) -> Vec<Timeline> {
    let width = bucket_us.max(1);
    let steps: Vec<&Record> = records.iter().filter(|r| r.kind == kinds::STEP).collect();
    let Some(t0) = steps.iter().map(|r| r.start_us).min() else {
        return Vec::new();
    };
    let mut by_actor: BTreeMap<&str, BTreeMap<u64, Slot>> = BTreeMap::new();
    for r in steps {
        let ids: BTreeSet<u64> = r
            .batch
            .iter()
            .map(|b| b.id)
            .chain(r.requests.iter().copied())
            .collect();
        let tokens: Option<usize> = r
            .batch
            .iter()
            .map(|b| b.tokens)
            .sum::<Option<usize>>()
            .filter(|_| !r.batch.is_empty());
        let first = (r.start_us - t0) / width;
        let last = (r.end_us.max(r.start_us + 1) - 1 - t0) / width;
        let slots = by_actor.entry(&r.actor).or_default();
        for i in first..=last {
            let (from, to) = (t0 + i * width, t0 + (i + 1) * width);
            let overlap = r.end_us.min(to).saturating_sub(r.start_us.max(from));
            let slot = slots.entry(i).or_default();
            slot.steps += 1;
            slot.sizes += ids.len();
            slot.stepping_us += overlap;
            slot.weighted += ids.len() as u64 * overlap;
            if let Some(tokens) = tokens {
                // At least 1 us, so a zero-length step still counts.
                slot.token_us += overlap.max(1);
                slot.token_weighted += tokens as f64 * overlap.max(1) as f64;
            }
            slot.ids.extend(&ids);
        }
    }
    by_actor
        .into_iter()
        .map(|(actor, slots)| {
            let first = *slots.keys().next().unwrap_or(&0);
            let last = *slots.keys().next_back().unwrap_or(&0);
            let buckets = (first..=last)
                .map(|i| {
                    let slot = slots.get(&i).cloned().unwrap_or_default();
                    Bucket {
                        start_us: t0 + i * width,
                        end_us: t0 + (i + 1) * width,
                        steps: slot.steps,
                        stepping_us: slot.stepping_us,
                        mean_batch: mean_batch(&slot),
                        mean_tokens: (slot.token_us > 0)
                            .then(|| slot.token_weighted / slot.token_us as f64),
                        requests: slot.ids.into_iter().collect(),
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

fn mean_batch(slot: &Slot) -> f64 {
    if slot.stepping_us > 0 {
        slot.weighted as f64 / slot.stepping_us as f64
    } else if slot.steps > 0 {
        // Only zero-length steps: their plain mean.
        slot.sizes as f64 / slot.steps as f64
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture;

    // The fixture's steps on worker-0: [1400, 2000] and [2000, 2800] with request 1,
    // [3000, 4000] with 1 and 2, [5000, 5600] with 2.

    #[test]
    fn steps_count_in_every_bucket_they_overlap() {
        let lines = timelines(&fixture::records(), 2_000);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].actor, "worker-0");
        let b = &lines[0].buckets;
        assert_eq!(b.len(), 3);
        assert_eq!((b[0].start_us, b[0].end_us, b[0].steps), (1_400, 3_400, 3));
        assert_eq!(b[0].stepping_us, 600 + 800 + 400);
        assert!((b[0].mean_batch - 2_200.0 / 1_800.0).abs() < 1e-12);
        assert_eq!(b[0].requests, [1, 2]);
        assert_eq!((b[1].steps, b[1].stepping_us), (2, 1_000));
        assert!((b[1].mean_batch - 1.6).abs() < 1e-12);
        assert_eq!(b[1].requests, [1, 2]);
        assert_eq!(
            (b[2].steps, b[2].stepping_us, b[2].mean_batch),
            (1, 200, 1.0)
        );
        assert_eq!(b[2].requests, [2]);
    }

    #[test]
    fn tokens_average_over_the_steps_that_recorded_them() {
        let mut records = fixture::records();
        assert!(
            timelines(&records, 2_000)[0].buckets[0]
                .mean_tokens
                .is_none()
        );
        // Every request puts 100 tokens through each step: a step of requests 1 and 2
        // carries 200.
        for r in records.iter_mut().filter(|r| r.kind == kinds::STEP) {
            for b in &mut r.batch {
                b.tokens = Some(100);
            }
        }
        let b = &timelines(&records, 2_000)[0].buckets;
        // Bucket 0: 600 us at 100, 800 us at 100, 400 us at 200.
        let want = (600.0 * 100.0 + 800.0 * 100.0 + 400.0 * 200.0) / 1_800.0;
        assert!(
            (b[0].mean_tokens.unwrap() - want).abs() < 1e-9,
            "{:?}",
            b[0]
        );
        assert!(b[1].mean_tokens.is_some());
    }

    #[test]
    fn idle_buckets_between_steps_are_kept_empty() {
        let b = &timelines(&fixture::records(), 500)[0].buckets;
        let steps: Vec<usize> = b.iter().map(|b| b.steps).collect();
        assert_eq!(steps, [1, 2, 1, 1, 1, 1, 0, 1, 1]);
        assert!(b[6].requests.is_empty());
        assert_eq!((b[6].stepping_us, b[6].mean_batch), (0, 0.0));
    }

    #[test]
    fn the_auto_width_covers_the_steps_in_about_that_many_buckets() {
        let records = fixture::records();
        let width = auto_bucket_us(&records, 4);
        assert_eq!(width, 1_051);
        assert_eq!(timelines(&records, width)[0].buckets.len(), 4);
        assert_eq!(auto_bucket_us(&[], 4), 1);
    }

    #[test]
    fn a_zero_length_step_counts_in_its_bucket() {
        let mut records = fixture::records();
        records.retain(|r| r.kind != kinds::STEP || r.start_us == 1_400);
        records.iter_mut().for_each(|r| {
            if r.kind == kinds::STEP {
                r.end_us = r.start_us;
            }
        });
        let b = &timelines(&records, 100)[0].buckets;
        assert_eq!(b.len(), 1);
        assert_eq!((b[0].steps, b[0].stepping_us, b[0].mean_batch), (1, 0, 1.0));
    }
}
