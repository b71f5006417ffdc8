//! The per-request breakdown: where each request's time went.

use std::collections::BTreeMap;

use crate::record::{Record, kinds};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct RequestRow {
    pub id: u64,
    /// generation, template or edit.
    pub kind: Option<String>,
    /// The actor that ran it.
    pub worker: Option<String>,
    /// From submission to the start of admission.
    pub queue_us: Option<u64>,
    /// From the start of admission to the answer.
    pub compute_us: Option<u64>,
    /// Cache loading done for it (zero when the trace has none).
    pub cache_load_us: u64,
    /// Steps it ran.
    pub steps: usize,
    /// From submission to its last record.
    pub total_us: Option<u64>,
    /// How it ended; None while it had not (the trace stopped first).
    pub outcome: Option<String>,
}

/// One row per request id seen in the trace, by id.
pub fn breakdown(records: &[Record]) -> Vec<RequestRow> {
    let mut rows: BTreeMap<u64, Acc> = BTreeMap::new();
    for r in records {
        let ids = r
            .requests
            .iter()
            .copied()
            .chain(r.batch.iter().map(|b| b.id));
        let mut seen = Vec::new();
        for id in ids {
            // A record naming a request twice (requests and batch) counts once.
            if !seen.contains(&id) {
                seen.push(id);
                rows.entry(id).or_default().add(id, r);
            }
        }
    }
    rows.into_iter().map(|(id, acc)| acc.row(id)).collect()
}

#[derive(Default)]
struct Acc {
    kind: Option<String>,
    worker: Option<String>,
    submitted: Option<u64>,
    admit_start: Option<u64>,
    queue_us: Option<u64>,
    compute_us: Option<u64>,
    retire_end: Option<u64>,
    cache_load_us: u64,
    steps: usize,
    last_end: u64,
    outcome: Option<String>,
}

impl Acc {
    fn add(&mut self, id: u64, r: &Record) {
        self.last_end = self.last_end.max(r.end_us);
        if self.kind.is_none() {
            self.kind = r.request_kind.clone().or_else(|| {
                let entry = r.batch.iter().find(|b| b.id == id);
                entry.map(|b| b.kind.clone())
            });
        }
        match r.kind.as_str() {
            kinds::SUBMIT => {
                self.submitted = min_some(self.submitted, r.enqueued_us.or(Some(r.start_us)));
                if let Some(o) = r.outcome.as_deref().filter(|&o| o != "ok") {
                    self.outcome = Some(o.to_string());
                }
            }
            kinds::ADMIT => {
                self.worker = Some(r.actor.clone());
                self.admit_start = Some(r.start_us);
                self.submitted = min_some(self.submitted, r.enqueued_us);
                self.queue_us = r.queue_us.or(self.queue_us);
                if let Some(o) = r.outcome.as_deref().filter(|&o| o != "ok") {
                    self.outcome = Some(o.to_string());
                    self.retire_end = Some(r.end_us);
                }
            }
            kinds::STEP => {
                self.worker.get_or_insert_with(|| r.actor.clone());
                self.steps += 1;
            }
            kinds::RETIRE => {
                self.worker.get_or_insert_with(|| r.actor.clone());
                self.retire_end = Some(r.end_us);
                self.compute_us = r.compute_us.or(self.compute_us);
                self.outcome = Some(r.outcome.clone().unwrap_or_else(|| "ok".into()));
            }
            kinds::CACHE_LOAD => self.cache_load_us += r.duration_us(),
            _ => {}
        }
    }

    fn row(self, id: u64) -> RequestRow {
        let since = |from: Option<u64>, to: Option<u64>| Some(to?.saturating_sub(from?));
        RequestRow {
            id,
            kind: self.kind,
            worker: self.worker,
            queue_us: self.queue_us.or(since(self.submitted, self.admit_start)),
            compute_us: self.compute_us.or(since(self.admit_start, self.retire_end)),
            cache_load_us: self.cache_load_us,
            steps: self.steps,
            total_us: since(self.submitted, Some(self.last_end)),
            outcome: self.outcome,
        }
    }
}

fn min_some(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture;

    #[test]
    fn rows_follow_each_request_through_the_actors() {
        let rows = breakdown(&fixture::records());
        assert_eq!(rows.len(), 3);
        let one = &rows[0];
        assert_eq!(one.id, 1);
        assert_eq!(one.kind.as_deref(), Some("template"));
        assert_eq!(one.worker.as_deref(), Some("worker-0"));
        assert_eq!(one.queue_us, Some(100));
        assert_eq!(one.compute_us, Some(3_900));
        assert_eq!(one.cache_load_us, 0);
        assert_eq!(one.steps, 3);
        assert_eq!(one.total_us, Some(4_000));
        assert_eq!(one.outcome.as_deref(), Some("ok"));

        // The edit: no queue_us/compute_us fields, so both come from the times.
        let two = &rows[1];
        assert_eq!(two.kind.as_deref(), Some("edit"));
        assert_eq!(two.queue_us, Some(1_700));
        assert_eq!(two.compute_us, Some(2_800));
        assert_eq!(two.cache_load_us, 300 + 200);
        assert_eq!(two.steps, 2);
        assert_eq!(two.total_us, Some(4_500));

        // Refused at the scheduler: never ran.
        let three = &rows[2];
        assert_eq!(three.outcome.as_deref(), Some("overloaded"));
        assert_eq!((three.steps, three.worker.as_deref()), (0, None));
        assert_eq!(three.compute_us, None);
    }

    #[test]
    fn a_request_the_trace_stopped_on_has_no_outcome() {
        let records: Vec<Record> = fixture::records()
            .into_iter()
            .filter(|r| r.kind != kinds::RETIRE)
            .collect();
        let one = &breakdown(&records)[0];
        assert_eq!(one.outcome, None);
        assert_eq!(one.compute_us, None);
        assert_eq!(one.steps, 3);
    }
}
