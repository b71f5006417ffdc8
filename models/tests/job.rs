//! Step-wise jobs: interleaving the steps of several requests (as a serving worker does)
//! gives exactly what running each alone gives.

use std::path::PathBuf;
use std::sync::OnceLock;

use retouch_kernels::DType;
use retouch_kernels::Tensor;
use retouch_models::nn::exec::{CacheEntry, StepCache};
use retouch_models::pipeline::{
    DenoiseJob, EditMode, EditRequest, GenerateRequest, JobOutput, Mask, Pipeline, Template,
    TemplateRef, TemplateSpec,
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

/// A guided template of the tiny pipeline with an f16 activation cache.
fn template(
    pipe: &Pipeline,
    prompt: &str,
    seed: u64,
    size: (usize, usize),
    sched: &str,
) -> Template {
    let spec = TemplateSpec {
        prompt: prompt.into(),
        negative_prompt: String::new(),
        seed,
        steps: 4,
        guidance: 5.0,
        scheduler: sched.into(),
        width: size.0,
        height: size.1,
    };
    pipe.register_template(&spec, Some(DType::F16), &mut |_, _| {})
        .unwrap()
}

/// A box mask `[x0, x1) x [y0, y1)` in pixels.
fn box_mask(size: (usize, usize), x: (usize, usize), y: (usize, usize)) -> Mask {
    let (w, h) = size;
    let values = (0..w * h)
        .map(|p| {
            let (px, py) = (p % w, p / w);
            f32::from(u8::from(
                (x.0..x.1).contains(&px) && (y.0..y.1).contains(&py),
            ))
        })
        .collect();
    Mask {
        width: w,
        height: h,
        values,
    }
}

fn cached_edit(prompt: &str, seed: u64, halo: usize) -> EditRequest {
    let mut req = EditRequest::new(prompt);
    req.mode = EditMode::Cached;
    req.seed = seed;
    req.halo = halo;
    // Every step of the template: these tests step jobs side by side.
    req.strength = 1.0;
    req
}

/// The final latents of a job's output (a template's last trajectory entry).
fn final_latents(out: JobOutput) -> Tensor {
    match out {
        JobOutput::Generated(g) => g.latents,
        JobOutput::Edited(e) => e.latents,
        JobOutput::Template(mut t) => t.trajectory.pop().unwrap(),
    }
}

/// Largest difference between two latents, relative to the larger magnitude in `want`.
fn relative_error(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.shape(), want.shape());
    let (g, w) = (
        got.as_slice::<f32>().unwrap(),
        want.as_slice::<f32>().unwrap(),
    );
    assert!(w.iter().any(|&v| v != 0.0), "latents are all zeros");
    let scale = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    g.iter()
        .zip(w)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max)
        / scale
}

/// Builds a job (run once alone, once in fused steps).
type Build<'t> = Box<dyn Fn(&Pipeline) -> DenoiseJob<'t> + 't>;

fn edit<'t>(tpl: &'t Template, mask: Mask, req: EditRequest) -> Build<'t> {
    Box::new(move |pipe| {
        let job = DenoiseJob::edit(pipe, TemplateRef::Borrowed(tpl), &mask, &req).unwrap();
        // What the runtime admits by is what the job costs.
        assert_eq!(
            job.step_tokens(),
            pipe.edit_step_tokens(tpl, &mask, &req).unwrap()
        );
        job
    })
}

#[test]
fn fused_steps_match_jobs_stepped_alone() {
    let pipe = tiny();
    let square = (64, 64);
    let wide = (64, 48);
    let house = template(&pipe, "a house", 2, square, "euler");
    let boat = template(&pipe, "a boat", 3, wide, "ddim");
    let mut gen_req = GenerateRequest::new("a tree");
    (gen_req.steps, gen_req.width, gen_req.height) = (5, 64, 64);
    let mut dense = EditRequest::new("a red door");
    dense.seed = 9;
    let spec = TemplateSpec {
        prompt: "a lake".into(),
        negative_prompt: "fog".into(),
        seed: 11,
        steps: 3,
        guidance: 3.0,
        scheduler: "dpmpp-2m".into(),
        width: 64,
        height: 64,
    };
    // (the round a job joins the batch, how to build it): three cached edits of one
    // template with different masks, halos, prompts and start steps, one of another template
    // on another grid, a generation, a dense edit and a template registration.
    let plan: Vec<(usize, Build<'_>)> = vec![
        (
            0,
            edit(
                &house,
                box_mask(square, (0, 64), (0, 20)),
                cached_edit("a door", 4, 1),
            ),
        ),
        (
            1,
            edit(
                &house,
                box_mask(square, (40, 52), (36, 60)),
                cached_edit("a window", 5, 1),
            ),
        ),
        (
            0,
            edit(
                &house,
                box_mask(square, (8, 24), (24, 40)),
                cached_edit("a cat", 6, 0),
            ),
        ),
        (
            2,
            edit(
                &boat,
                box_mask(wide, (16, 48), (8, 40)),
                cached_edit("a sail", 7, 2),
            ),
        ),
        (
            0,
            Box::new(|pipe: &Pipeline| {
                let job = DenoiseJob::generate(pipe, &gen_req).unwrap();
                assert_eq!(
                    job.step_tokens(),
                    pipe.generate_step_tokens(&gen_req).unwrap()
                );
                job
            }),
        ),
        (
            1,
            edit(&house, box_mask(square, (20, 44), (20, 44)), dense.clone()),
        ),
        (
            1,
            Box::new(|pipe: &Pipeline| {
                let job = DenoiseJob::template(pipe, &spec, Some(DType::F16)).unwrap();
                assert_eq!(job.step_tokens(), pipe.template_step_tokens(&spec).unwrap());
                job
            }),
        ),
    ];

    let alone: Vec<Tensor> = plan
        .iter()
        .map(|(_, build)| final_latents(pipe.run_job(build(&pipe), &mut |_, _| {}).unwrap()))
        .collect();

    let mut jobs: Vec<Option<DenoiseJob<'_>>> = plan.iter().map(|_| None).collect();
    let mut round = 0;
    while round < 3 || jobs.iter().flatten().any(|j| !j.is_done()) {
        for (i, (start, build)) in plan.iter().enumerate() {
            if *start == round {
                jobs[i] = Some(build(&pipe));
            }
        }
        let mut batch: Vec<&mut DenoiseJob<'_>> =
            jobs.iter_mut().flatten().filter(|j| !j.is_done()).collect();
        let stepped = batch.len();
        let results = DenoiseJob::step_many(&pipe, &mut batch);
        assert_eq!(results.len(), stepped);
        for r in results {
            r.unwrap();
        }
        round += 1;
    }
    for (i, (job, want)) in jobs.into_iter().zip(&alone).enumerate() {
        let got = final_latents(job.unwrap().finish(&pipe).unwrap());
        // Fusing changes only the row count of each product (GEMM blocking, so the order
        // of f32 sums): about 1e-7 relative per layer, a few steps of a small UNet. A real
        // mix-up (another job's rows, timestep, text or cache) moves latents by O(1).
        let err = relative_error(&got, want);
        assert!(
            err <= 2e-5,
            "job {i}: fused stepping differs by {err} (relative)"
        );
    }
}

/// `t` with its activation cache replaced by `cache`.
fn with_cache(t: &Template, cache: Vec<StepCache>) -> Template {
    Template {
        spec: t.spec.clone(),
        trajectory: t.trajectory.clone(),
        image: t.image.clone(),
        cache,
    }
}

#[test]
fn a_job_that_fails_in_a_fused_step_fails_alone() {
    let pipe = tiny();
    let size = (64, 64);
    let house = template(&pipe, "a house", 2, size, "euler");
    // The same template with step 1's cache cut short: the ragged forward reading it fails.
    let mut cache = house.cache.clone();
    cache[1].entries.pop();
    let broken = with_cache(&house, cache);
    let mask = box_mask(size, (0, 32), (0, 32));
    let good_req = cached_edit("a door", 4, 1);
    let want = pipe.edit(&house, &mask, &good_req, &mut |_, _| {}).unwrap();

    let mut good =
        DenoiseJob::edit(&pipe, TemplateRef::Borrowed(&house), &mask, &good_req).unwrap();
    let other = box_mask(size, (16, 48), (32, 64));
    let mut bad = DenoiseJob::edit(
        &pipe,
        TemplateRef::Borrowed(&broken),
        &other,
        &cached_edit("x", 1, 1),
    )
    .unwrap();
    let mut gen_req = GenerateRequest::new("x");
    (gen_req.steps, gen_req.width, gen_req.height) = (1, 64, 64);
    let mut finished = DenoiseJob::generate(&pipe, &gen_req).unwrap();
    finished.step(&pipe).unwrap();

    // Step 0: the finished job fails alone, the other two step.
    let r = DenoiseJob::step_many(&pipe, &mut [&mut good, &mut bad, &mut finished]);
    assert!(r[0].is_ok() && r[1].is_ok() && r[2].is_err(), "{r:?}");
    // Step 1: the broken cache fails the fused call; retried alone, only its job fails,
    // and keeps its state from before the step.
    let r = DenoiseJob::step_many(&pipe, &mut [&mut bad, &mut good]);
    assert!(r[0].is_err() && r[1].is_ok(), "{r:?}");
    assert_eq!((bad.steps_done(), good.steps_done()), (1, 2));
    while !good.is_done() {
        good.step(&pipe).unwrap();
    }
    match good.finish(&pipe).unwrap() {
        JobOutput::Edited(e) => {
            let err = relative_error(&e.latents, &want.latents);
            assert!(err <= 2e-5, "the good edit differs by {err}");
        }
        _ => panic!("expected an edit"),
    }
}

/// A step whose prediction holds a NaN (here from a template cache whose conv inputs are
/// NaN, as a corrupt cache or an f16 overflow would give) fails its job with the reason and
/// leaves it as it was, and the edit fused with it in the same step steps on.
#[test]
fn a_non_finite_prediction_fails_its_job_alone() {
    let pipe = tiny();
    let size = (64, 64);
    let house = template(&pipe, "a house", 2, size, "euler");
    let mut cache = house.cache.clone();
    let poisoned = cache[0]
        .entries
        .iter_mut()
        .find_map(|e| match e {
            CacheEntry::ConvInput(maps) => Some(maps),
            _ => None,
        })
        .expect("the recording holds a conv input");
    for map in poisoned.iter_mut() {
        let nan = Tensor::from_vec(vec![f32::NAN; map.elem_count()], map.shape()).unwrap();
        *map = nan.to_dtype(map.dtype()).unwrap();
    }
    let broken = with_cache(&house, cache);
    let mask = box_mask(size, (0, 32), (0, 32));
    let req = cached_edit("a door", 4, 1);
    let job = |t| DenoiseJob::edit(&pipe, TemplateRef::Borrowed(t), &mask, &req).unwrap();
    let (mut good, mut bad) = (job(&house), job(&broken));
    let r = DenoiseJob::step_many(&pipe, &mut [&mut good, &mut bad]);
    let err = r[1]
        .as_ref()
        .expect_err("the NaN prediction must fail its job");
    assert!(
        matches!(err, retouch_models::Error::NonFinite { step: 0, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("non-finite"), "{err}");
    assert!(r[0].is_ok(), "{r:?}");
    assert_eq!((good.steps_done(), bad.steps_done()), (1, 0));
}

/// A cached edit stepped with a loading cache and a dense prefix: recomputing no unit is the
/// plain cached edit, recomputing every unit is the dense-mode edit (both forwards then see
/// the same latents), and any prefix in between needs only the entries after it.
#[test]
fn cached_edits_that_recompute_a_dense_prefix_bracket_the_modes() {
    use retouch_models::pipeline::StepCacheSource;
    let pipe = tiny();
    let size = (64, 64);
    let tpl = template(&pipe, "a house", 2, size, "euler");
    let mask = box_mask(size, (16, 40), (8, 32));
    let req = cached_edit("a red door", 7, 1);
    let units = pipe.unet.units().unwrap();
    let starts = pipe.unet.entry_starts().unwrap().to_vec();
    let run = |recompute: usize| -> Tensor {
        let mut job = DenoiseJob::edit(&pipe, TemplateRef::Borrowed(&tpl), &mask, &req).unwrap();
        while let Some(step) = job.cache_step() {
            let whole = &tpl.cache[step];
            let first = starts[recompute];
            let stream = retouch_models::nn::exec::StreamingStep::new(first, whole.end());
            let source = StepCacheSource::Streaming {
                step: &stream,
                dtype: DType::F16,
            };
            let results = std::thread::scope(|scope| {
                scope.spawn(|| {
                    for index in first..whole.end() {
                        stream.deliver(index, Ok(whole.entry(index).unwrap().clone()));
                    }
                });
                DenoiseJob::step_many_with_sources(
                    &pipe,
                    &mut [&mut job],
                    &[Some(source)],
                    recompute,
                )
            });
            results.into_iter().for_each(|r| r.unwrap());
        }
        final_latents(job.finish(&pipe).unwrap())
    };
    let plain = final_latents(
        pipe.edit(&tpl, &mask, &req, &mut |_, _| {})
            .map(JobOutput::Edited)
            .unwrap(),
    );
    assert_eq!(
        run(0).to_vec_f32(),
        plain.to_vec_f32(),
        "nothing recomputed"
    );
    let mut dense_req = req.clone();
    dense_req.mode = EditMode::Dense;
    let dense = final_latents(
        pipe.edit(&tpl, &mask, &dense_req, &mut |_, _| {})
            .map(JobOutput::Edited)
            .unwrap(),
    );
    let all = run(units);
    assert!(
        relative_error(&all, &dense) < 1e-5,
        "{}",
        relative_error(&all, &dense)
    );
    assert!(
        relative_error(&plain, &dense) > 1e-3,
        "the modes differ on this edit"
    );
    let half = run(units / 2);
    assert!(half.to_vec_f32().iter().all(|v| v.is_finite()));
}

#[test]
fn a_late_starting_cached_edit_reads_the_cache_of_its_own_steps() {
    let pipe = tiny();
    let house = template(&pipe, "a house", 2, (64, 64), "ddim");
    let mask = box_mask((64, 64), (8, 40), (16, 48));
    let mut req = cached_edit("a door", 4, 1);
    req.strength = 0.5;
    let steps = house.spec.steps;
    let first = steps - steps / 2;
    let mut job = DenoiseJob::edit(&pipe, TemplateRef::Borrowed(&house), &mask, &req).unwrap();
    assert_eq!((job.steps_done(), job.total_steps()), (0, steps / 2));
    let mut read = Vec::new();
    while !job.is_done() {
        assert_eq!(job.schedule_step(), first + job.steps_done());
        read.push((job.cache_step().unwrap(), job.next_cache_step()));
        job.step(&pipe).unwrap();
    }
    let want: Vec<_> = (first..steps)
        .map(|s| (s, (s + 1 < steps).then_some(s + 1)))
        .collect();
    assert_eq!(read, want);
    assert_eq!(job.cache_step(), None);
}
