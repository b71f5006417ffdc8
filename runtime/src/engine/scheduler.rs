//! The Scheduler admits requests and routes each to a worker's queue (the [`Balancer`]
//! picks the worker and prices the request). Queues are bounded: past the bound a request is
//! refused with an overload error instead of growing memory. As one actor it serialises
//! admission, so the check against the bound and the count that follows cannot race.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use actix::{Actor, Addr, Context, Handler, Message};

use super::balancer::{Balancer, Work};
use super::progress::{ProgressBook, RequestProgress, State};
use super::request::{EngineError, Request};
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
        }
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
        let mut req = msg.0;
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
        req.charge = self.balancer.charge(index, &work);
        slot.load.add(&req.charge);
        slot.load.queued.fetch_add(1, Ordering::Relaxed);
        slot.addr.do_send(Enqueue(req));
        Ok(index)
    }
}
