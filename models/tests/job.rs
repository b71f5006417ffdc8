//! Step-wise jobs: interleaving the steps of several requests (as a serving worker does)
//! gives exactly what running each alone gives.

use std::path::PathBuf;
use std::sync::OnceLock;

use retouch_kernels::DType;
use retouch_models::pipeline::{
    DenoiseJob, EditMode, EditRequest, GenerateRequest, JobOutput, Mask, Pipeline, TemplateRef,
    TemplateSpec,
};
use retouch_models::random_pipeline::{Preset, RandomPipeline};

/// The tiny random pipeline, written once per test process.
fn tiny() -> Pipeline {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("retouch-job-{}", std::process::id()));
        RandomPipeline::new(Preset::Tiny)
            .write(&dir, true, None)
            .unwrap();
        dir
    });
    Pipeline::load(dir, None).unwrap()
}

#[test]
fn interleaved_jobs_match_jobs_run_alone() {
    let pipe = tiny();
    let spec = TemplateSpec {
        prompt: "a house".into(),
        negative_prompt: String::new(),
        seed: 2,
        steps: 3,
        guidance: 5.0,
        scheduler: "euler".into(),
        width: 64,
        height: 64,
    };
    let template = pipe
        .register_template(&spec, Some(DType::F16), &mut |_, _| {})
        .unwrap();
    let mut values = vec![0.0; 64 * 64];
    values[..64 * 20].fill(1.0);
    let mask = Mask {
        width: 64,
        height: 64,
        values,
    };
    let mut gen_req = GenerateRequest::new("a tree");
    gen_req.steps = 5;
    gen_req.width = 64;
    gen_req.height = 64;
    let mut edits = Vec::new();
    for mode in [EditMode::Cached, EditMode::Dense] {
        let mut req = EditRequest::new("a door");
        req.mode = mode;
        req.seed = 4;
        edits.push(req);
    }

    let alone_gen = pipe.generate(&gen_req, &mut |_, _| {}).unwrap();
    let alone_edits: Vec<_> = edits
        .iter()
        .map(|r| pipe.edit(&template, &mask, r, &mut |_, _| {}).unwrap())
        .collect();

    let mut jobs = vec![DenoiseJob::generate(&pipe, &gen_req).unwrap()];
    for r in &edits {
        jobs.push(DenoiseJob::edit(&pipe, TemplateRef::Borrowed(&template), &mask, r).unwrap());
    }
    // Round-robin one step at a time until every job is done.
    while jobs.iter().any(|j| !j.is_done()) {
        for job in jobs.iter_mut().filter(|j| !j.is_done()) {
            job.step(&pipe).unwrap();
        }
    }
    let mut outputs = jobs.into_iter().map(|j| j.finish(&pipe).unwrap());
    match outputs.next() {
        Some(JobOutput::Generated(g)) => {
            assert_eq!(g.image, alone_gen.image);
            assert_eq!(
                g.latents.as_slice::<f32>().unwrap(),
                alone_gen.latents.as_slice::<f32>().unwrap()
            );
        }
        _ => panic!("expected a generation"),
    }
    for alone in &alone_edits {
        match outputs.next() {
            Some(JobOutput::Edited(e)) => {
                assert_eq!(e.image, alone.image);
                assert_eq!(e.mask_ratio, alone.mask_ratio);
            }
            _ => panic!("expected an edit"),
        }
    }
}

#[test]
fn a_finished_job_refuses_more_steps_and_an_unfinished_one_refuses_to_finish() {
    let pipe = tiny();
    let mut req = GenerateRequest::new("x");
    req.steps = 1;
    req.width = 64;
    req.height = 64;
    let job = DenoiseJob::generate(&pipe, &req).unwrap();
    assert_eq!((job.steps_done(), job.total_steps()), (0, 1));
    assert!(job.finish(&pipe).is_err());
    let mut job = DenoiseJob::generate(&pipe, &req).unwrap();
    job.step(&pipe).unwrap();
    assert!(job.is_done());
    assert!(job.step(&pipe).is_err());
    assert!(job.finish(&pipe).is_ok());
}
