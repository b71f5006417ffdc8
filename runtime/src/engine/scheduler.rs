//! The Scheduler admits requests and routes each to a worker's queue (the [`Balancer`]
//! picks the worker and prices the request). Queues are bounded: past the bound a request is
//! refused with an overload error instead of growing memory. As one actor it serialises
//! admission, so the check against the bound and the count that follows cannot race.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use actix::{Actor, Addr, Context, Handler, Message};

use super::balancer::{Balancer, Work};
use super::progress::{ProgressBook, RequestProgress, State};
use super::request::{EngineError, JobSpec, Request};
use super::trace::Tracer;
use super::worker::{Enqueue, Worker, WorkerLoad};

pub struct WorkerSlot {
    pub addr: Addr<Worker>,
    pub load: Arc<WorkerLoad>,
}

pub struct Scheduler {
    workers: Vec<WorkerSlot>,
    max_queue: usize,
    balancer: Balancer,
    next: usize,
    progress: Arc<ProgressBook>,
    /// Seconds a refused caller is told to wait.
    retry_after_s: u64,
    tracer: Tracer,
}

impl Scheduler {
    pub fn new(
        workers: Vec<WorkerSlot>,
        max_queue: usize,
        balancer: Balancer,
        progress: Arc<ProgressBook>,
    ) -> Scheduler {
        Scheduler {
            workers,
            max_queue,
            balancer,
            next: 0,
            progress,
            retry_after_s: 1,
            tracer: Tracer::disabled(),
        }
    }

    /// Records this scheduler's messages with `tracer`.
    pub fn traced(mut self, tracer: &Tracer) -> Scheduler {
        self.tracer = tracer.named("scheduler");
        self
    }

    /// The worker to route to, or None when every queue is full.
    fn pick(&mut self, work: &Work) -> Option<usize> {
        let loads: Vec<_> = self.workers.iter().map(|w| &*w.load).collect();
        let chosen = self
            .balancer
            .route(work, &loads, self.max_queue, self.next)?;
        self.next = (chosen + 1) % self.workers.len();
        Some(chosen)
    }
}

impl Actor for Scheduler {
    type Context = Context<Self>;
}

/// Admits a request; answers the worker it was routed to.
pub struct Submit(pub Request);

impl Message for Submit {
    type Result = Result<usize, EngineError>;
}

impl Handler<Submit> for Scheduler {
    type Result = Result<usize, EngineError>;
    fn handle(&mut self, msg: Submit, _: &mut Context<Self>) -> Self::Result {
        let start = Instant::now();
        let (id, kind, submitted) = (msg.0.id, msg.0.spec.kind(), msg.0.submitted);
        let result = self.route(msg.0);
        self.tracer.submit(id, kind, submitted, start, &result);
        result
    }
}

impl Scheduler {
    /// Picks a worker for `req` and queues it there.
    fn route(&mut self, mut req: Request) -> Result<usize, EngineError> {
        let work = self.balancer.work(&req.spec);
        let Some(index) = self.pick(&work) else {
            return Err(EngineError::Overloaded {
                retry_after_s: self.retry_after_s,
            });
        };
        let slot = &self.workers[index];
        if !slot.addr.connected() {
            return Err(EngineError::Unavailable(format!(
                "worker {index} has stopped"
            )));
        }
        self.progress.insert(RequestProgress {
            id: req.id,
            kind: req.spec.kind(),
            state: State::Queued,
            steps_done: 0,
            steps_total: req.spec.steps(),
            worker: Some(index),
            error: None,
        });
        // A cached edit's first steps start moving toward that worker while it queues.
        let first_step = req.spec.first_step();
        if let JobSpec::Edit {
            cache: Some(lease), ..
        } = &mut req.spec
        {
            lease.prefetch(index, first_step);
        }
        req.charge = self.balancer.charge(index, &work);
        slot.load.add(&req.charge);
        slot.load.queued.fetch_add(1, Ordering::Relaxed);
        slot.addr.do_send(Enqueue(req, Instant::now()));
        Ok(index)
    }
}
