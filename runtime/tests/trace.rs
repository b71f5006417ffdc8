//! Actor traces end to end: an engine started with `trace` writes a JSONL record of every
//! message, and `actor_trace` (the library behind `tools/actor-trace`) summarises it.

use std::path::PathBuf;
use std::sync::Arc;

use actor_trace::kinds;
use actor_trace::requests::breakdown;
use retouch_models::pipeline::{EditMode, EditRequest, JobOutput, Mask, TemplateSpec};
use retouch_models::random_pipeline::{Preset, RandomPipeline};
use retouch_runtime::engine::JobSpec;
use retouch_runtime::{Engine, EngineConfig};

const SIZE: usize = 64;
const STEPS: usize = 5;

fn scratch(tag: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("retouch-trace-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&path);
    let _ = std::fs::remove_file(&path);
    path
}

/// A mask over the top-left quarter of the image.
fn quarter_mask() -> Mask {
    let values = (0..SIZE * SIZE)
        .map(|i| f32::from(i / SIZE < SIZE / 2 && i % SIZE < SIZE / 2))
        .collect();
    Mask {
        width: SIZE,
        height: SIZE,
        values,
    }
}

#[actix_rt::test]
async fn a_traced_engine_writes_every_request_and_actor_trace_summarises_it() {
    let model = scratch("model");
    RandomPipeline::new(Preset::Tiny)
        .write(&model, true, None)
        .expect("tiny pipeline");
    let trace = scratch("file.jsonl");
    let mut config = EngineConfig::new(&model);
    config.trace = Some(trace.clone());
    let engine = Engine::start(config).expect("engine starts");

    let spec = TemplateSpec {
        prompt: "a red circle".into(),
        negative_prompt: String::new(),
        seed: 1,
        steps: STEPS,
        guidance: 4.0,
        scheduler: "ddim".into(),
        width: SIZE,
        height: SIZE,
    };
    let (template_id, done) = engine.run(JobSpec::Template(spec)).await;
    let Ok(JobOutput::Template(template)) = done.map(|d| d.output) else {
        panic!("the template did not come back");
    };
    let mut edit = EditRequest::new("a blue hat");
    edit.mode = EditMode::Cached;
    // The default strength runs the last steps of the template's; the trace counts them.
    let edit_steps = edit.steps_run(STEPS).unwrap();
    assert!(edit_steps > 1 && edit_steps < STEPS);
    let job = JobSpec::Edit {
        template: Arc::new(template),
        // The template carries its own activation cache (not in the engine's store).
        template_id: "unstored".into(),
        cache: None,
        mask: quarter_mask(),
        req: edit,
    };
    let (edit_id, done) = engine.run(job).await;
    assert!(done.is_ok(), "the edit failed");
    engine.shutdown();

    let read = actor_trace::read(&trace).expect("the trace reads");
    assert!(!read.truncated);
    let records = &read.records;
    let end = records.last().expect("records");
    assert_eq!(
        (end.kind.as_str(), end.dropped),
        (kinds::TRACE_END, Some(0))
    );
    for id in [template_id, edit_id] {
        for kind in [
            kinds::SUBMIT,
            kinds::ENQUEUE,
            kinds::ADMIT,
            kinds::STEP,
            kinds::RETIRE,
        ] {
            assert!(
                records.iter().any(|r| r.kind == kind && r.concerns(id)),
                "no {kind} record for request {id}"
            );
        }
    }
    for r in records {
        assert!(r.start_us <= r.end_us, "{r:?}");
        if let Some(sent) = r.enqueued_us {
            assert!(sent <= r.start_us, "handled before it was sent: {r:?}");
        }
    }
    // The edit's steps carry its mode and mask ratio, in step order.
    let edit_records: Vec<_> = records
        .iter()
        .filter(|r| r.kind == kinds::STEP)
        .filter_map(|r| r.batch.iter().find(|b| b.id == edit_id))
        .collect();
    let order: Vec<usize> = edit_records.iter().map(|b| b.step).collect();
    assert_eq!(order, (0..edit_steps).collect::<Vec<_>>());
    let first = edit_records[0];
    assert_eq!((first.kind.as_str(), first.steps), ("edit", edit_steps));
    assert_eq!(first.mode.as_deref(), Some("cached"));
    assert!((first.mask_ratio.unwrap() - 0.25).abs() < 1e-9);
    // Its tokens: the active positions of a quarter mask (plus the halo) of the 16x16
    // latent, times two guidance branches; fewer than the dense 2 x 256.
    let tokens = first.tokens.expect("step records carry tokens");
    assert!(tokens > 2 * 64 && tokens < 2 * 256, "{tokens}");
    assert!(edit_records.iter().all(|b| b.tokens == Some(tokens)));

    let rows = breakdown(records);
    assert_eq!(rows.len(), 2);
    for (row, kind, steps) in [
        (&rows[0], "template", STEPS),
        (&rows[1], "edit", edit_steps),
    ] {
        assert_eq!(row.kind.as_deref(), Some(kind));
        assert_eq!(row.worker.as_deref(), Some("worker-0"));
        assert_eq!(row.steps, steps);
        assert_eq!(row.outcome.as_deref(), Some("ok"));
        let (queue, compute, total) = (
            row.queue_us.unwrap(),
            row.compute_us.unwrap(),
            row.total_us.unwrap(),
        );
        assert!(compute > 0 && queue + compute <= total + 1, "{row:?}");
    }
    let text = actor_trace::report::summary(&read, &actor_trace::report::Options::default());
    assert!(text.starts_with("requests: 2\n"), "{text}");
    assert!(
        text.contains("worker-0") && text.contains("scheduler"),
        "{text}"
    );
    let _ = std::fs::remove_file(&trace);
    let _ = std::fs::remove_dir_all(&model);
}

#[actix_rt::test]
async fn an_unwritable_trace_path_is_a_start_error() {
    let mut config = EngineConfig::new(scratch("unused-model"));
    config.trace = Some(scratch("no-such-dir").join("trace.jsonl"));
    let err = Engine::start(config).err().expect("the engine refuses");
    assert!(
        err.contains("trace file") && err.contains("no-such-dir"),
        "{err}"
    );
}
