//! The Balancer picks the worker for each request. Its default policy, `Cost`, predicts each
//! worker's completion time for the request: the predicted work still outstanding there
//! (queued and running requests, charged when routed and discharged step by step as the
//! worker runs them), plus the request's own compute on that worker (its cost model: step
//! time linear in FLOPs, timed at start-up) and the time to load the bytes of its template's
//! cache not yet resident on the worker. Request-count, token-count and round-robin policies
//! stay for comparison.

mod calibrate;
mod fit;
mod flops;

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use retouch_models::pipeline::{EditMode, EditRequest, Mask, Pipeline};
use retouch_models::unet::token_levels;

pub use calibrate::{CalibrationPlan, Timings, fit_workers, read_bandwidth, time_worker};
pub use fit::{CostModel, Line, least_squares};
pub use flops::{StepFlops, level_sizes};

use super::cache::CacheManager;
use super::request::JobSpec;
use super::worker::WorkerLoad;

/// How a worker is picked among those with room in their queue. Ties go to the next worker
/// in round-robin order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routing {
    /// Lowest predicted completion time (the cost model).
    Cost,
    /// Fewest queued plus running requests.
    Requests,
    /// Fewest outstanding active tokens times steps.
    Tokens,
    RoundRobin,
}

impl std::str::FromStr for Routing {
    type Err = String;
    fn from_str(s: &str) -> Result<Routing, String> {
        match s {
            "cost" => Ok(Routing::Cost),
            "requests" => Ok(Routing::Requests),
            "tokens" => Ok(Routing::Tokens),
            "round-robin" => Ok(Routing::RoundRobin),
            other => Err(format!(
                "unknown routing `{other}` (expected cost, requests, tokens or round-robin)"
            )),
        }
    }
}

impl std::fmt::Display for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Routing::Cost => "cost",
            Routing::Requests => "requests",
            Routing::Tokens => "tokens",
            Routing::RoundRobin => "round-robin",
        })
    }
}

/// Where template caches live: the bytes of a template's steps a worker would still have to
/// load before running an edit of them. The cache manager's tiers plug in here.
pub trait CacheResidency: Send + Sync {
    fn bytes_missing(&self, template: &str, steps: Range<usize>, worker: usize) -> u64;
}

impl CacheResidency for CacheManager {
    fn bytes_missing(&self, template: &str, steps: Range<usize>, worker: usize) -> u64 {
        CacheManager::bytes_missing(self, template, steps, worker)
    }
}

/// What the balancer needs of the model: its UNet's FLOPs and the latent geometry.
#[derive(Clone, Debug)]
pub struct ModelShape {
    pub flops: StepFlops,
    pub vae_factor: usize,
    /// Resolution levels of the UNet (block count).
    pub levels: usize,
    pub native_size: usize,
}

impl ModelShape {
    pub fn of(pipe: &Pipeline) -> Result<ModelShape, String> {
        let config = pipe.unet.config();
        Ok(ModelShape {
            flops: StepFlops::new(config, pipe.tokenizer.max_len())?,
            vae_factor: pipe.vae.factor().max(1),
            levels: config.block_out_channels.len(),
            native_size: pipe.native_size(),
        })
    }
}

/// What one request asks of a worker.
#[derive(Clone, Debug, PartialEq)]
pub struct Work {
    pub steps: usize,
    /// FLOPs of one step, every CFG branch included.
    pub step_flops: f64,
    /// Level-0 tokens a step computes, every CFG branch included.
    pub step_tokens: u64,
    /// Image pixels (decoding scales with them).
    pub pixels: usize,
    /// The template an edit reads, and the steps of its cache it reads.
    pub template: Option<(String, Range<usize>)>,
}

fn branches(guidance: f32) -> usize {
    // The unconditional branch runs only with guidance above 1, as in the pipeline.
    if guidance > 1.0 { 2 } else { 1 }
}

impl Work {
    /// A request that runs the whole UNet every step.
    fn dense(shape: &ModelShape, steps: usize, guidance: f32, width: usize, height: usize) -> Work {
        let f = shape.vae_factor;
        let total = level_sizes(height / f, width / f, shape.levels);
        let b = branches(guidance);
        Work {
            steps,
            step_flops: b as f64 * shape.flops.dense(&total),
            step_tokens: (b * total.first().copied().unwrap_or(0)) as u64,
            pixels: width * height,
            template: None,
        }
    }

    /// An edit of a `width x height` template registered with `template_guidance`: cached
    /// mode computes the mask's token sets as the pipeline will.
    pub fn of_edit(
        shape: &ModelShape,
        mask: &Mask,
        req: &EditRequest,
        template_guidance: f32,
        width: usize,
        height: usize,
    ) -> Work {
        let guidance = req.guidance.unwrap_or(template_guidance);
        let mut work = Work::dense(shape, 0, guidance, width, height);
        if req.mode == EditMode::Cached {
            let f = shape.vae_factor;
            let (h, w) = (height / f, width / f);
            let active: Vec<bool> = mask.to_latent(f).iter().map(|&m| m > 0.0).collect();
            // A mask that does not fit is refused by the worker; price it as dense meanwhile.
            if let Ok(levels) = token_levels(&active, h, w, shape.levels, req.halo) {
                let counts: Vec<usize> = levels.iter().map(|l| l.len()).collect();
                let total = level_sizes(h, w, shape.levels);
                let b = branches(guidance);
                work.step_flops = b as f64 * shape.flops.step(&counts, &total);
                work.step_tokens = (b * counts[0]) as u64;
            }
        }
        work
    }

    pub fn of(shape: &ModelShape, spec: &JobSpec) -> Work {
        match spec {
            JobSpec::Generate(g) => Work::dense(shape, g.steps, g.guidance, g.width, g.height),
            JobSpec::Template(t) => Work::dense(shape, t.steps, t.guidance, t.width, t.height),
            JobSpec::Edit {
                template,
                template_id,
                mask,
                req,
                ..
            } => {
                let s = &template.spec;
                let mut work = Work::of_edit(shape, mask, req, s.guidance, s.width, s.height);
                work.steps = spec.steps();
                let first = spec.first_step();
                work.template = Some((template_id.clone(), first..s.steps));
                work
            }
        }
    }
}

/// The predicted work a routed request adds to its worker's load, discharged as it runs.
/// `step_us` is the request's own share of a step (its FLOPs); the step's fixed cost is paid
/// once per fused step whatever the batch holds, so the balancer prices it per worker
/// ([`WorkerLoad::steps_ahead_with`]), not per request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Charge {
    pub step_us: u64,
    pub step_tokens: u64,
    pub steps_left: u64,
    /// Work outside the steps (encoding, decoding, cache loading), discharged at the end.
    pub other_us: u64,
}

impl Charge {
    pub fn work_us(&self) -> u64 {
        self.step_us * self.steps_left + self.other_us
    }

    pub fn tokens(&self) -> u64 {
        self.step_tokens * self.steps_left
    }
}

/// A request's predicted cost on one worker.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prediction {
    /// The request's own share of a step (its FLOPs at the worker's rate).
    pub step_s: f64,
    /// A step's fixed cost, paid once per fused step however many requests it holds.
    pub fixed_step_s: f64,
    pub other_s: f64,
    pub load_s: f64,
    pub steps: usize,
}

impl Prediction {
    /// The request's time on an otherwise idle worker.
    pub fn total_s(&self) -> f64 {
        self.steps as f64 * (self.fixed_step_s + self.step_s) + self.other_s + self.load_s
    }
}

/// One worker as a routing decision sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    pub has_room: bool,
    pub requests: usize,
    pub tokens: u64,
    /// Predicted completion of this request there: outstanding work plus its own.
    pub completion_s: f64,
}

/// The worker `routing` picks, scanning from `start` in round-robin order (the first of
/// equals wins); None when no worker has room.
pub fn choose(routing: Routing, candidates: &[Candidate], start: usize) -> Option<usize> {
    let n = candidates.len();
    let mut order = (0..n)
        .map(|k| (start + k) % n)
        .filter(|&i| candidates[i].has_room);
    match routing {
        Routing::RoundRobin => order.next(),
        Routing::Requests => order.min_by_key(|&i| candidates[i].requests),
        Routing::Tokens => order.min_by_key(|&i| candidates[i].tokens),
        Routing::Cost => order.min_by(|&a, &b| {
            candidates[a]
                .completion_s
                .total_cmp(&candidates[b].completion_s)
        }),
    }
}

pub struct Balancer {
    routing: Routing,
    shape: ModelShape,
    models: Vec<CostModel>,
    residency: Arc<dyn CacheResidency>,
    /// Requests a worker fuses into one step (its batch limit).
    max_batch: usize,
}

impl Balancer {
    /// One cost model per worker, in worker order; `max_batch` is the workers' batch limit.
    pub fn new(
        routing: Routing,
        shape: ModelShape,
        models: Vec<CostModel>,
        residency: Arc<dyn CacheResidency>,
        max_batch: usize,
    ) -> Balancer {
        Balancer {
            routing,
            shape,
            models,
            residency,
            max_batch,
        }
    }

    pub fn routing(&self) -> Routing {
        self.routing
    }

    pub fn models(&self) -> &[CostModel] {
        &self.models
    }

    pub fn work(&self, spec: &JobSpec) -> Work {
        Work::of(&self.shape, spec)
    }

    fn model(&self, worker: usize) -> CostModel {
        self.models
            .get(worker)
            .copied()
            .unwrap_or_else(CostModel::assumed)
    }

    pub fn predict(&self, worker: usize, work: &Work) -> Prediction {
        let m = self.model(worker);
        let native = (self.shape.native_size * self.shape.native_size).max(1);
        let missing = work.template.as_ref().map_or(0, |(t, steps)| {
            self.residency.bytes_missing(t, steps.clone(), worker)
        });
        Prediction {
            step_s: m.step_seconds(work.step_flops) - m.step_s,
            fixed_step_s: m.step_s,
            other_s: m.request_s * work.pixels as f64 / native as f64,
            load_s: m.load_seconds(missing),
            steps: work.steps,
        }
    }

    pub fn charge(&self, worker: usize, work: &Work) -> Charge {
        let p = self.predict(worker, work);
        let us = |s: f64| (s.max(0.0) * 1e6).round() as u64;
        Charge {
            step_us: us(p.step_s),
            step_tokens: work.step_tokens,
            steps_left: work.steps as u64,
            other_us: us(p.other_s + p.load_s),
        }
    }

    /// Predicted completion of `work` on worker `i` given its load: the requests' own step
    /// shares and other work already charged, this request's, and the fixed step cost once
    /// per fused step still to run.
    pub fn completion_s(&self, i: usize, load: &WorkerLoad, work: &Work) -> f64 {
        let p = self.predict(i, work);
        let steps_ahead = load.steps_ahead_with(p.steps as u64, self.max_batch);
        load.work_s()
            + p.steps as f64 * p.step_s
            + steps_ahead as f64 * p.fixed_step_s
            + p.other_s
            + p.load_s
    }

    /// The worker for `work` given the workers' loads (a queue at `max_queue` is full),
    /// scanning from `start`.
    pub fn route(
        &self,
        work: &Work,
        loads: &[&WorkerLoad],
        max_queue: usize,
        start: usize,
    ) -> Option<usize> {
        let candidates: Vec<Candidate> = loads
            .iter()
            .enumerate()
            .map(|(i, load)| {
                let queued = load.queued.load(Ordering::Relaxed);
                Candidate {
                    has_room: queued < max_queue,
                    requests: queued + load.running.load(Ordering::Relaxed),
                    tokens: load.tokens(),
                    completion_s: self.completion_s(i, load, work),
                }
            })
            .collect();
        choose(self.routing, &candidates, start)
    }
}

#[cfg(test)]
mod tests;
