//! Per-actor utilisation: how much of its span an actor was busy, and its idle gaps.

use std::collections::BTreeMap;

use crate::record::{Record, kinds};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ActorUsage {
    pub actor: String,
    pub records: usize,
    /// From its first record's start to its last record's end.
    pub span_us: u64,
    /// Time covered by its records (overlaps counted once).
    pub busy_us: u64,
    /// Idle gaps between records at least the minimum long.
    pub gaps: usize,
    pub gap_total_us: u64,
    pub largest_gap_us: u64,
}

impl ActorUsage {
    /// Busy time over span, 0..=1 (1 for an actor whose records have no length).
    pub fn utilisation(&self) -> f64 {
        if self.span_us == 0 {
            1.0
        } else {
            self.busy_us as f64 / self.span_us as f64
        }
    }
}

/// One row per actor, by name. Gaps shorter than `min_gap_us` are busy time's noise (the
/// moments between two records of one message) and are not counted as gaps.
pub fn utilisation(records: &[Record], min_gap_us: u64) -> Vec<ActorUsage> {
    let mut by_actor: BTreeMap<&str, Vec<(u64, u64)>> = BTreeMap::new();
    for r in records.iter().filter(|r| r.kind != kinds::TRACE_END) {
        by_actor
            .entry(&r.actor)
            .or_default()
            .push((r.start_us, r.end_us));
    }
    by_actor
        .into_iter()
        .map(|(actor, mut spans)| {
            spans.sort_unstable();
            let mut usage = ActorUsage {
                actor: actor.to_string(),
                records: spans.len(),
                ..ActorUsage::default()
            };
            let first = spans[0].0;
            let (mut cur_start, mut cur_end) = spans[0];
            let mut last_end = cur_end;
            for &(start, end) in &spans[1..] {
                if start > cur_end {
                    usage.busy_us += cur_end - cur_start;
                    let gap = start - cur_end;
                    if gap >= min_gap_us.max(1) {
                        usage.gaps += 1;
                        usage.gap_total_us += gap;
                        usage.largest_gap_us = usage.largest_gap_us.max(gap);
                    }
                    (cur_start, cur_end) = (start, end);
                } else {
                    cur_end = cur_end.max(end);
                }
                last_end = last_end.max(end);
            }
            usage.busy_us += cur_end - cur_start;
            usage.span_us = last_end - first;
            usage
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture;

    fn find<'a>(rows: &'a [ActorUsage], actor: &str) -> &'a ActorUsage {
        rows.iter().find(|r| r.actor == actor).unwrap()
    }

    #[test]
    fn busy_time_span_and_gaps_per_actor() {
        let rows = utilisation(&fixture::records(), 0);
        let names: Vec<&str> = rows.iter().map(|r| r.actor.as_str()).collect();
        assert_eq!(names, ["cache", "scheduler", "worker-0"], "no tracer row");

        let w = find(&rows, "worker-0");
        assert_eq!(w.records, 10);
        assert_eq!((w.span_us, w.busy_us), (4_650, 4_420));
        assert_eq!((w.gaps, w.gap_total_us, w.largest_gap_us), (4, 230, 100));
        assert!((w.utilisation() - 4_420.0 / 4_650.0).abs() < 1e-12);

        let s = find(&rows, "scheduler");
        assert_eq!((s.span_us, s.busy_us), (495, 25));
        assert_eq!((s.gaps, s.gap_total_us, s.largest_gap_us), (2, 470, 280));

        let c = find(&rows, "cache");
        assert_eq!((c.span_us, c.busy_us, c.gaps), (550, 500, 1));
    }

    #[test]
    fn short_gaps_are_not_counted_but_stay_idle() {
        let rows = utilisation(&fixture::records(), 50);
        let w = find(&rows, "worker-0");
        assert_eq!((w.gaps, w.gap_total_us, w.largest_gap_us), (2, 180, 100));
        assert_eq!(w.busy_us, 4_420);
    }

    #[test]
    fn overlapping_records_count_once() {
        let mut records = fixture::records();
        records.push(Record {
            actor: "cache".into(),
            kind: "cache_load".into(),
            start_us: 3000,
            end_us: 3400,
            ..Record::default()
        });
        let c = find(&utilisation(&records, 0), "cache").clone();
        // [2950, 3500] is now one busy stretch.
        assert_eq!((c.span_us, c.busy_us, c.gaps), (550, 550, 0));
    }
}
