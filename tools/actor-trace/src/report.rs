//! The `summary` subcommand's text: the per-request table, per-actor utilisation and the
//! batch timelines.

use std::fmt::Write;

use crate::actors::utilisation;
use crate::batches::{auto_bucket_us, timelines};
use crate::read::Trace;
use crate::record::kinds;
use crate::requests::breakdown;

pub struct Options {
    /// Idle gaps shorter than this are not counted.
    pub min_gap_us: u64,
    /// Batch timeline bucket width; None cuts the trace into about 20 buckets.
    pub bucket_us: Option<u64>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            min_gap_us: 1_000,
            bucket_us: None,
        }
    }
}

pub fn summary(trace: &Trace, opts: &Options) -> String {
    let records = &trace.records;
    let mut out = String::new();
    let rows = breakdown(records);
    let _ = writeln!(out, "requests: {}", rows.len());
    let _ = writeln!(
        out,
        "{:>6}  {:<10}  {:<10}  {:>10}  {:>10}  {:>10}  {:>5}  {:>10}  outcome",
        "id", "kind", "worker", "queue ms", "compute ms", "cache ms", "steps", "total ms"
    );
    for r in &rows {
        let _ = writeln!(
            out,
            "{:>6}  {:<10}  {:<10}  {:>10}  {:>10}  {:>10}  {:>5}  {:>10}  {}",
            r.id,
            r.kind.as_deref().unwrap_or("-"),
            r.worker.as_deref().unwrap_or("-"),
            ms(r.queue_us),
            ms(r.compute_us),
            ms(Some(r.cache_load_us)),
            r.steps,
            ms(r.total_us),
            r.outcome.as_deref().unwrap_or("unfinished"),
        );
    }

    let _ = writeln!(
        out,
        "\nactors (idle gaps of at least {} ms):",
        ms(Some(opts.min_gap_us))
    );
    let _ = writeln!(
        out,
        "{:<12}  {:>7}  {:>10}  {:>10}  {:>6}  {:>5}  {:>10}  {:>10}",
        "actor", "records", "span ms", "busy ms", "busy %", "gaps", "idle ms", "max gap ms"
    );
    for a in utilisation(records, opts.min_gap_us) {
        let _ = writeln!(
            out,
            "{:<12}  {:>7}  {:>10}  {:>10}  {:>6.1}  {:>5}  {:>10}  {:>10}",
            a.actor,
            a.records,
            ms(Some(a.span_us)),
            ms(Some(a.busy_us)),
            a.utilisation() * 100.0,
            a.gaps,
            ms(Some(a.gap_total_us)),
            ms(Some(a.largest_gap_us)),
        );
    }

    let bucket = opts
        .bucket_us
        .unwrap_or_else(|| auto_bucket_us(records, 20));
    let _ = writeln!(out, "\nbatches ({} ms buckets):", ms(Some(bucket)));
    for line in timelines(records, bucket) {
        let _ = writeln!(out, "{}", line.actor);
        for b in &line.buckets {
            let ids: Vec<String> = b.requests.iter().map(u64::to_string).collect();
            let stepping = b.stepping_us as f64 / (b.end_us - b.start_us) as f64;
            let tokens = b
                .mean_tokens
                .map_or_else(|| "-".to_string(), |t| format!("{t:.0}"));
            let _ = writeln!(
                out,
                "  {:>10} ms  steps {:>3}  stepping {:>5.1}%  mean batch {:>4.1}  tokens {:>6}  \
                 requests [{}]",
                ms(Some(b.start_us)),
                b.steps,
                stepping * 100.0,
                b.mean_batch,
                tokens,
                ids.join(",")
            );
        }
    }

    let plans: Vec<_> = records
        .iter()
        .filter(|r| r.kind == kinds::RECOMPUTE_PLAN)
        .collect();
    if !plans.is_empty() {
        let mut by_units = std::collections::BTreeMap::<usize, usize>::new();
        for p in &plans {
            *by_units.entry(p.recompute_units.unwrap_or(0)).or_default() += 1;
        }
        let counts: Vec<String> = by_units.iter().map(|(u, n)| format!("{u}: {n}")).collect();
        let mb = |f: fn(&&crate::record::Record) -> Option<u64>| {
            plans.iter().filter_map(f).sum::<u64>() as f64 / 1e6
        };
        let _ = writeln!(
            out,
            "
recompute plans (steps whose caches were on disk): {}; units recomputed: \
             {}; read {:.3} MB, spared {:.3} MB",
            plans.len(),
            counts.join(", "),
            mb(|r| r.bytes),
            mb(|r| r.skipped_bytes),
        );
    }

    let end = records.iter().find(|r| r.kind == kinds::TRACE_END);
    match end {
        Some(end) => {
            let dropped = end.dropped.unwrap_or(0);
            if dropped > 0 {
                let _ = writeln!(
                    out,
                    "\nthe tracer dropped {dropped} records (its writer fell behind)"
                );
            }
        }
        None => {
            let _ = writeln!(out, "\nno trace_end record: the trace did not end cleanly");
        }
    }
    if trace.truncated {
        let _ = writeln!(
            out,
            "the last line was cut off (written mid-record) and skipped"
        );
    }
    out
}

/// Microseconds as milliseconds with three decimals; `-` when unknown.
fn ms(us: Option<u64>) -> String {
    match us {
        Some(us) => format!("{:.3}", us as f64 / 1e3),
        None => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture;

    fn fixture_trace() -> Trace {
        Trace {
            records: fixture::records(),
            truncated: false,
        }
    }

    #[test]
    fn the_summary_shows_each_section() {
        let text = summary(
            &fixture_trace(),
            &Options {
                min_gap_us: 50,
                bucket_us: Some(2_000),
            },
        );
        assert!(text.starts_with("requests: 3\n"), "{text}");
        let row = |id: &str| {
            text.lines()
                .find(|l| l.split_whitespace().next() == Some(id))
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            row("2"),
            [
                "2", "edit", "worker-0", "1.700", "2.800", "0.500", "2", "4.500", "ok"
            ]
        );
        assert_eq!(row("3")[1..4], ["generation", "-", "-"]);
        assert_eq!(*row("3").last().unwrap(), "overloaded");
        let worker = row("worker-0");
        assert_eq!(
            worker[1..8],
            ["10", "4.650", "4.420", "95.1", "2", "0.180", "0.100"]
        );
        let bucket =
            "1.400 ms  steps   3  stepping  90.0%  mean batch  1.2  tokens      -  requests [1,2]";
        assert!(text.contains(bucket), "{text}");
        assert!(text.contains("dropped 2 records"), "{text}");
        assert!(!text.contains("did not end cleanly"));
    }

    #[test]
    fn recompute_plans_are_counted_by_units() {
        let mut trace = fixture_trace();
        assert!(!summary(&trace, &Options::default()).contains("recompute plans"));
        for (units, bytes, skipped) in [(0, 2_000_000, 0), (2, 1_500_000, 500_000), (2, 0, 0)] {
            trace.records.push(crate::record::Record {
                actor: "worker-0".into(),
                kind: kinds::RECOMPUTE_PLAN.into(),
                requests: vec![2],
                start_us: 3000,
                end_us: 3000,
                bytes: Some(bytes),
                recompute_units: Some(units),
                skipped_bytes: Some(skipped),
                ..Default::default()
            });
        }
        let text = summary(&trace, &Options::default());
        let line = "recompute plans (steps whose caches were on disk): 3; units recomputed: \
                    0: 1, 2: 2; read 3.500 MB, spared 0.500 MB";
        assert!(text.contains(line), "{text}");
    }

    #[test]
    fn an_unfinished_trace_says_so() {
        let mut trace = fixture_trace();
        trace.records.retain(|r| r.kind != kinds::TRACE_END);
        trace.truncated = true;
        let text = summary(&trace, &Options::default());
        assert!(text.contains("did not end cleanly"), "{text}");
        assert!(text.contains("cut off"), "{text}");
    }
}
