//! `actor_trace`: Retouch's actor message traces. [`record`] is the JSONL format the
//! runtime writes (one [`Record`] per line); the rest reads a trace and aggregates it: the
//! per-request breakdown, per-actor utilisation and idle gaps, batch composition over time,
//! and a Chrome/Perfetto export. The `actor-trace` binary prints them.

pub mod actors;
pub mod batches;
pub mod chrome;
#[cfg(test)]
mod fixture;
pub mod read;
pub mod record;
pub mod report;
pub mod requests;

pub use read::{Trace, read};
pub use record::{BatchEntry, Record, kinds};
