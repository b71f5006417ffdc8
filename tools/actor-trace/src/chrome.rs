//! Export to the Chrome trace event format (JSON), which Perfetto and chrome://tracing
//! load: one process per actor with a complete ("X") event per record, a batch-size
//! counter per worker, and a "requests" process with each request's queue and compute
//! spans on a thread of its own.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::record::{Record, kinds};
use crate::requests::breakdown;

pub fn export(records: &[Record]) -> Value {
    let mut events = Vec::new();
    let mut actors: Vec<&str> = records
        .iter()
        .filter(|r| r.kind != kinds::TRACE_END)
        .map(|r| r.actor.as_str())
        .collect();
    actors.sort_unstable();
    actors.dedup();
    let pid_of: BTreeMap<&str, usize> = actors
        .iter()
        .enumerate()
        .map(|(i, a)| (*a, i + 1))
        .collect();
    for (actor, pid) in &pid_of {
        events.push(meta("process_name", *pid, 0, actor));
    }
    for (actor, pid) in &pid_of {
        let mine: Vec<&Record> = records.iter().filter(|r| r.actor == *actor).collect();
        for (r, lane) in mine.iter().zip(lanes(&mine)) {
            events.push(json!({
                "name": r.kind, "cat": r.kind, "ph": "X",
                "ts": r.start_us, "dur": r.duration_us(),
                "pid": pid, "tid": lane, "args": args(r),
            }));
            if r.kind == kinds::STEP {
                events.push(counter(
                    *pid,
                    r.start_us,
                    r.batch.len().max(r.requests.len()),
                ));
                events.push(counter(*pid, r.end_us, 0));
            }
        }
    }
    let requests_pid = pid_of.len() + 1;
    events.push(meta("process_name", requests_pid, 0, "requests"));
    for row in breakdown(records) {
        let tid = row.id;
        let kind = row.kind.as_deref().unwrap_or("request");
        events.push(meta(
            "thread_name",
            requests_pid,
            tid,
            &format!("{kind} {tid}"),
        ));
        let Some(total) = row.total_us else { continue };
        let Some(start) = submitted(records, row.id) else {
            continue;
        };
        let queue = row.queue_us.unwrap_or(total).min(total);
        let args = json!({ "worker": row.worker, "steps": row.steps, "outcome": row.outcome });
        events.push(span("queue", requests_pid, tid, start, queue, &args));
        events.push(span(
            "compute",
            requests_pid,
            tid,
            start + queue,
            total - queue,
            &args,
        ));
    }
    for r in records.iter().filter(|r| r.kind == kinds::TRACE_END) {
        events.push(json!({
            "name": "trace end", "ph": "i", "s": "g", "ts": r.start_us,
            "pid": 0, "tid": 0, "args": { "dropped": r.dropped },
        }));
    }
    json!({ "traceEvents": events, "displayTimeUnit": "ms" })
}

/// When a request entered the engine: its earliest message's send time.
fn submitted(records: &[Record], id: u64) -> Option<u64> {
    records
        .iter()
        .filter(|r| r.requests.contains(&id))
        .filter_map(|r| {
            r.enqueued_us
                .filter(|_| r.kind == kinds::SUBMIT || r.kind == kinds::ADMIT)
        })
        .min()
}

/// A thread per stack of records that do not overlap, so an actor with overlapping work
/// (loader threads) shows as several rows instead of wrongly nested slices.
fn lanes(records: &[&Record]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..records.len()).collect();
    order.sort_by_key(|&i| (records[i].start_us, records[i].end_us));
    let mut lane_end: Vec<u64> = Vec::new();
    let mut lane = vec![0; records.len()];
    for i in order {
        let r = records[i];
        let free = lane_end.iter().position(|&end| end <= r.start_us);
        let l = free.unwrap_or_else(|| {
            lane_end.push(0);
            lane_end.len() - 1
        });
        lane_end[l] = r.end_us;
        lane[i] = l;
    }
    lane
}

/// The record less what the event already says (actor, kind, times).
fn args(r: &Record) -> Value {
    let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut v {
        for key in ["actor", "kind", "start_us", "end_us"] {
            map.remove(key);
        }
        if let Some(sent) = r.enqueued_us {
            map.insert("wait_us".into(), json!(r.start_us.saturating_sub(sent)));
        }
    }
    v
}

fn meta(what: &str, pid: usize, tid: u64, name: &str) -> Value {
    json!({ "name": what, "ph": "M", "pid": pid, "tid": tid, "args": { "name": name } })
}

fn counter(pid: usize, ts: u64, requests: usize) -> Value {
    json!({ "name": "batch requests", "ph": "C", "pid": pid, "ts": ts, "args": { "requests": requests } })
}

fn span(name: &str, pid: usize, tid: u64, ts: u64, dur: u64, args: &Value) -> Value {
    json!({ "name": name, "ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "args": args })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture;

    fn events(v: &Value) -> &Vec<Value> {
        v["traceEvents"].as_array().unwrap()
    }

    #[test]
    fn every_record_becomes_a_complete_event_on_its_actor() {
        let records = fixture::records();
        let out = export(&records);
        let evs = events(&out);
        let complete: Vec<&Value> = evs
            .iter()
            .filter(|e| e["ph"] == "X" && e["name"] != "queue" && e["name"] != "compute")
            .collect();
        assert_eq!(complete.len(), records.len() - 1, "all but trace_end");
        let names: BTreeMap<u64, &str> = evs
            .iter()
            .filter(|e| e["name"] == "process_name")
            .map(|e| {
                (
                    e["pid"].as_u64().unwrap(),
                    e["args"]["name"].as_str().unwrap(),
                )
            })
            .collect();
        let step = complete
            .iter()
            .find(|e| e["name"] == "step" && e["ts"] == 3000)
            .unwrap();
        assert_eq!(names[&step["pid"].as_u64().unwrap()], "worker-0");
        assert_eq!(step["dur"], 1000);
        assert_eq!(step["args"]["requests"], json!([1, 2]));
        assert_eq!(step["args"]["batch"][1]["mask_ratio"], 0.25);
        let enqueue = complete.iter().find(|e| e["name"] == "enqueue").unwrap();
        assert_eq!(enqueue["args"]["wait_us"], 30);
    }

    #[test]
    fn overlapping_records_of_one_actor_go_to_separate_threads() {
        let mut records = fixture::records();
        records.push(Record {
            actor: "cache".into(),
            kind: "cache_load".into(),
            requests: vec![2],
            start_us: 3000,
            end_us: 3400,
            ..Record::default()
        });
        let out = export(&records);
        let tids: Vec<u64> = events(&out)
            .iter()
            .filter(|e| e["name"] == "cache_load")
            .map(|e| e["tid"].as_u64().unwrap())
            .collect();
        assert_eq!(tids, [0, 0, 1]);
    }

    #[test]
    fn requests_get_queue_and_compute_spans_and_workers_a_batch_counter() {
        let out = export(&fixture::records());
        let evs = events(&out);
        let of = |name: &str, tid: u64| {
            evs.iter()
                .find(|e| e["name"] == name && e["tid"] == tid && e["ph"] == "X")
                .cloned()
                .unwrap()
        };
        let (queue, compute) = (of("queue", 2), of("compute", 2));
        assert_eq!((&queue["ts"], &queue["dur"]), (&json!(1200), &json!(1700)));
        assert_eq!(
            (&compute["ts"], &compute["dur"]),
            (&json!(2900), &json!(2800))
        );
        let sizes: Vec<u64> = evs
            .iter()
            .filter(|e| e["ph"] == "C")
            .map(|e| e["args"]["requests"].as_u64().unwrap())
            .collect();
        assert_eq!(sizes, [1, 0, 1, 0, 2, 0, 1, 0]);
        let end = evs.iter().find(|e| e["ph"] == "i").unwrap();
        assert_eq!(end["args"]["dropped"], 2);
    }
}
