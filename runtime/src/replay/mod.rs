//! Replaying an edit trace against an engine (in this process) or a server (over HTTP):
//! register a few templates, then send edits open-loop at their Poisson arrival times
//! (each at its time, whatever is still running, so queueing shows), and report latency
//! percentiles and throughput. `retouch replay` is the command around it.

mod stats;
mod target;
mod trace;

use actix_rt::time::{Instant, sleep_until};
use retouch_models::pipeline::{EditMode, EditRequest, TemplateSpec};
use serde::Serialize;

pub use stats::{Spread, percentile};
pub use target::{Outcome, Target};
pub use trace::{Arrival, TraceConfig, trace};

use crate::masks::ellipse_mask;

/// Template captions in the built-in model's training vocabulary (any model takes them).
const TEMPLATE_PROMPTS: [&str; 6] = [
    "a large red circle in the center on a blue background",
    "a small yellow star at the top left on a black background",
    "a large green square at the bottom right on a white background",
    "a small blue triangle in the center on a yellow background",
    "a large white cross at the top right on a red background",
    "a large purple circle at the bottom left on a green background",
];
const EDIT_PROMPTS: [&str; 4] = [
    "a large blue star in the center on a red background",
    "a small green circle in the center on a white background",
    "a large yellow cross in the center on a black background",
    "a large orange triangle in the center on a purple background",
];

/// Failure messages a report keeps (the first distinct ones).
const KEEP_ERRORS: usize = 5;

#[derive(Clone, Debug)]
pub struct ReplayConfig {
    pub trace: TraceConfig,
    /// Denoising steps of the templates (edits take their template's).
    pub steps: usize,
    pub guidance: f32,
    pub mode: EditMode,
    /// Template (and mask) side in pixels; None: the model's native size.
    pub size: Option<usize>,
}

/// One replay's results.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub label: String,
    /// Offered arrivals per second.
    pub rate: f64,
    pub requests: usize,
    pub completed: usize,
    pub rejected: usize,
    pub failed: usize,
    /// From sending an edit to its answer, completed edits only.
    pub latency_ms: Option<Spread>,
    pub queue_ms: Option<Spread>,
    /// Completed edits per second, from the first arrival to the last answer.
    pub throughput: f64,
    pub makespan_s: f64,
    /// Mean ratio of the masks actually sent.
    pub mean_mask_ratio: f64,
    /// Completed edits per worker (in-process runs only).
    pub per_worker: Vec<usize>,
    pub errors: Vec<String>,
}

/// Registers the templates, replays the trace against `target` and reports; `on_done` is
/// called as each edit finishes (a progress bar).
pub async fn run(
    target: &Target,
    config: &ReplayConfig,
    label: &str,
    on_done: impl Fn() + Clone + 'static,
) -> Result<Report, String> {
    let arrivals = trace(&config.trace)?;
    let mut templates = Vec::with_capacity(config.trace.templates);
    let side = config.size.unwrap_or(0);
    for k in 0..config.trace.templates {
        let spec = TemplateSpec {
            prompt: TEMPLATE_PROMPTS[k % TEMPLATE_PROMPTS.len()].into(),
            negative_prompt: String::new(),
            seed: config.trace.seed.wrapping_add(k as u64),
            steps: config.steps,
            guidance: config.guidance,
            scheduler: "ddim".into(),
            width: side,
            height: side,
        };
        templates.push(target.register(&spec).await?);
    }

    let start = Instant::now();
    let mut tasks = Vec::with_capacity(arrivals.len());
    for a in &arrivals {
        sleep_until(start + std::time::Duration::from_secs_f64(a.at_s)).await;
        let (id, width, height) = templates[a.template].clone();
        let mask = ellipse_mask(width, height, a.mask_ratio, a.mask_seed);
        let ratio = mask.ratio();
        let mut req = EditRequest::new(EDIT_PROMPTS[a.prompt % EDIT_PROMPTS.len()]);
        req.seed = a.edit_seed;
        req.mode = config.mode;
        let (target, on_done) = (target.clone(), on_done.clone());
        tasks.push(actix_rt::spawn(async move {
            let sent = Instant::now();
            let outcome = target.edit(&id, mask, req).await;
            let latency_ms = sent.elapsed().as_secs_f64() * 1e3;
            on_done();
            (outcome, latency_ms, start.elapsed().as_secs_f64(), ratio)
        }));
    }
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(match task.await {
            Ok(r) => r,
            Err(e) => (
                Outcome::Failed(format!("the edit task failed: {e}")),
                0.0,
                0.0,
                0.0,
            ),
        });
    }
    Ok(summarise(label, config.trace.rate, &results))
}

/// The report of `(outcome, latency ms, finished at s, mask ratio)` per edit.
fn summarise(label: &str, rate: f64, results: &[(Outcome, f64, f64, f64)]) -> Report {
    let mut report = Report {
        label: label.to_string(),
        rate,
        requests: results.len(),
        completed: 0,
        rejected: 0,
        failed: 0,
        latency_ms: None,
        queue_ms: None,
        throughput: 0.0,
        makespan_s: 0.0,
        mean_mask_ratio: 0.0,
        per_worker: Vec::new(),
        errors: Vec::new(),
    };
    let (mut latencies, mut queues) = (Vec::new(), Vec::new());
    for (outcome, latency_ms, finished_s, _) in results {
        match outcome {
            Outcome::Done { queue_ms, worker } => {
                report.completed += 1;
                latencies.push(*latency_ms);
                queues.push(*queue_ms);
                report.makespan_s = report.makespan_s.max(*finished_s);
                if let Some(w) = *worker {
                    if report.per_worker.len() <= w {
                        report.per_worker.resize(w + 1, 0);
                    }
                    report.per_worker[w] += 1;
                }
            }
            Outcome::Rejected => report.rejected += 1,
            Outcome::Failed(e) => {
                report.failed += 1;
                if report.errors.len() < KEEP_ERRORS && !report.errors.contains(e) {
                    report.errors.push(e.clone());
                }
            }
        }
    }
    report.latency_ms = Spread::of(&latencies);
    report.queue_ms = Spread::of(&queues);
    if report.makespan_s > 0.0 {
        report.throughput = report.completed as f64 / report.makespan_s;
    }
    if !results.is_empty() {
        report.mean_mask_ratio = results.iter().map(|r| r.3).sum::<f64>() / results.len() as f64;
    }
    report
}

/// The reports as one Markdown table.
pub fn markdown_table(reports: &[Report]) -> String {
    let mut s = String::from(
        "| config | rate req/s | completed | rejected | failed | mean ms | P50 ms | P95 ms | \
         throughput req/s | mean queue ms | mean mask |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in reports {
        let l = r.latency_ms.unwrap_or_default();
        let q = r.queue_ms.map_or(f64::NAN, |q| q.mean);
        s += &format!(
            "| {} | {:.2} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.0} | {:.3} |\n",
            r.label,
            r.rate,
            r.completed,
            r.rejected,
            r.failed,
            l.mean,
            l.p50,
            l.p95,
            r.throughput,
            q,
            r.mean_mask_ratio
        );
    }
    s
}

/// The reports as an aligned plain-text table.
pub fn text_table(reports: &[Report]) -> String {
    let mut s = format!(
        "{:<28} {:>6} {:>5} {:>5} {:>5} {:>8} {:>8} {:>8} {:>7} {:>8} {:>6}\n",
        "config",
        "rate",
        "done",
        "rej",
        "fail",
        "mean ms",
        "P50 ms",
        "P95 ms",
        "req/s",
        "queue ms",
        "mask"
    );
    for r in reports {
        let l = r.latency_ms.unwrap_or_default();
        let q = r.queue_ms.map_or(f64::NAN, |q| q.mean);
        s += &format!(
            "{:<28} {:>6.2} {:>5} {:>5} {:>5} {:>8.0} {:>8.0} {:>8.0} {:>7.2} {:>8.0} {:>6.3}\n",
            r.label,
            r.rate,
            r.completed,
            r.rejected,
            r.failed,
            l.mean,
            l.p50,
            l.p95,
            r.throughput,
            q,
            r.mean_mask_ratio
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(worker: usize) -> Outcome {
        Outcome::Done {
            queue_ms: 5.0,
            worker: Some(worker),
        }
    }

    #[test]
    fn summaries_count_outcomes_and_time_the_completed() {
        let results = [
            (done(1), 100.0, 1.0, 0.1),
            (done(0), 300.0, 2.0, 0.2),
            (Outcome::Rejected, 1.0, 0.5, 0.1),
            (Outcome::Failed("boom".into()), 2.0, 0.6, 0.2),
            (Outcome::Failed("boom".into()), 2.0, 0.7, 0.2),
            (done(1), 200.0, 4.0, 0.2),
        ];
        let r = summarise("x", 2.0, &results);
        assert_eq!(
            (r.requests, r.completed, r.rejected, r.failed),
            (6, 3, 1, 2)
        );
        let l = r.latency_ms.unwrap();
        assert_eq!((l.mean, l.p50, l.max), (200.0, 200.0, 300.0));
        assert_eq!(r.makespan_s, 4.0);
        assert_eq!(r.throughput, 0.75);
        assert_eq!(r.per_worker, vec![1, 2]);
        assert_eq!(r.errors, vec!["boom".to_string()]);
        assert!((r.mean_mask_ratio - 1.0 / 6.0).abs() < 1e-12);
        let table = markdown_table(std::slice::from_ref(&r));
        assert!(
            table.contains("| x | 2.00 | 3 | 1 | 2 | 200 | 200 |"),
            "{table}"
        );
        assert_eq!(text_table(&[r]).lines().count(), 2);
    }

    #[test]
    fn a_run_with_nothing_completed_reports_no_latency() {
        let r = summarise("x", 1.0, &[(Outcome::Rejected, 1.0, 0.1, 0.1)]);
        assert_eq!((r.completed, r.throughput), (0, 0.0));
        assert!(r.latency_ms.is_none());
    }
}
