//! A small hand-written trace the unit tests check computed numbers against.
//!
//! worker-0 runs request 1 (a 3-step template) and request 2 (a 2-step cached edit whose
//! cache loads twice); request 3 is refused by the scheduler.

use crate::read::parse;
use crate::record::Record;

pub const JSONL: &str = r#"{"actor":"scheduler","kind":"submit","requests":[1],"request_kind":"template","enqueued_us":1000,"start_us":1010,"end_us":1020,"routed_to":"worker-0","outcome":"ok"}
{"actor":"worker-0","kind":"enqueue","requests":[1],"enqueued_us":1020,"start_us":1050,"end_us":1060}
{"actor":"worker-0","kind":"admit","requests":[1],"request_kind":"template","enqueued_us":1000,"start_us":1100,"end_us":1300,"queue_us":100,"outcome":"ok"}
{"actor":"scheduler","kind":"submit","requests":[2],"request_kind":"edit","enqueued_us":1200,"start_us":1210,"end_us":1220,"routed_to":"worker-0","outcome":"ok"}
{"actor":"worker-0","kind":"enqueue","requests":[2],"enqueued_us":1220,"start_us":1310,"end_us":1320}
{"actor":"worker-0","kind":"step","requests":[1],"batch":[{"id":1,"kind":"template","step":0,"steps":3}],"enqueued_us":1300,"start_us":1400,"end_us":2000}
{"actor":"scheduler","kind":"submit","requests":[3],"request_kind":"generation","enqueued_us":1500,"start_us":1500,"end_us":1505,"outcome":"overloaded"}
{"actor":"worker-0","kind":"step","requests":[1],"batch":[{"id":1,"kind":"template","step":1,"steps":3}],"enqueued_us":2000,"start_us":2000,"end_us":2800}
{"actor":"worker-0","kind":"admit","requests":[2],"request_kind":"edit","enqueued_us":1200,"start_us":2900,"end_us":3000,"outcome":"ok"}
{"actor":"cache","kind":"cache_load","requests":[2],"start_us":2950,"end_us":3250}
{"actor":"cache","kind":"cache_load","requests":[2],"start_us":3300,"end_us":3500}
{"actor":"worker-0","kind":"step","requests":[1,2],"batch":[{"id":1,"kind":"template","step":2,"steps":3},{"id":2,"kind":"edit","step":0,"steps":2,"mode":"cached","mask_ratio":0.25}],"enqueued_us":3000,"start_us":3000,"end_us":4000}
{"actor":"worker-0","kind":"retire","requests":[1],"request_kind":"template","step":3,"start_us":4000,"end_us":5000,"compute_us":3900,"outcome":"ok"}
{"actor":"worker-0","kind":"step","requests":[2],"batch":[{"id":2,"kind":"edit","step":1,"steps":2,"mode":"cached","mask_ratio":0.25}],"enqueued_us":5000,"start_us":5000,"end_us":5600}
{"actor":"worker-0","kind":"retire","requests":[2],"request_kind":"edit","step":2,"start_us":5600,"end_us":5700,"outcome":"ok"}
{"actor":"tracer","kind":"trace_end","start_us":6000,"end_us":6000,"dropped":2}
"#;

pub fn records() -> Vec<Record> {
    parse(JSONL).expect("the fixture parses").records
}
