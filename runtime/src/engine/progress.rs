//! Progress of each request (state, steps done of total), read by `GET /v1/requests/{id}`.
//! Finished entries are kept for the most recent `keep` requests, so memory stays bounded.

use std::collections::VecDeque;
use std::sync::Mutex;

use dashmap::DashMap;
use serde::Serialize;

use super::request::RequestId;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl State {
    fn finished(self) -> bool {
        matches!(self, State::Done | State::Failed | State::Cancelled)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct RequestProgress {
    pub id: RequestId,
    pub kind: &'static str,
    pub state: State,
    pub steps_done: usize,
    pub steps_total: usize,
    pub worker: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub struct ProgressBook {
    entries: DashMap<RequestId, RequestProgress>,
    finished: Mutex<VecDeque<RequestId>>,
    keep: usize,
}

impl ProgressBook {
    pub fn new(keep: usize) -> ProgressBook {
        ProgressBook {
            entries: DashMap::new(),
            finished: Mutex::new(VecDeque::new()),
            keep,
        }
    }

    pub fn get(&self, id: RequestId) -> Option<RequestProgress> {
        self.entries.get(&id).map(|e| e.clone())
    }

    pub fn insert(&self, progress: RequestProgress) {
        self.entries.insert(progress.id, progress);
    }

    pub fn update(&self, id: RequestId, f: impl FnOnce(&mut RequestProgress)) {
        let finished = match self.entries.get_mut(&id) {
            Some(mut entry) => {
                let was = entry.state.finished();
                f(&mut entry);
                !was && entry.state.finished()
            }
            None => false,
        };
        if finished {
            self.retire(id);
        }
    }

    /// Remembers a finished request, forgetting the oldest past `keep`.
    fn retire(&self, id: RequestId) {
        let mut finished = self.finished.lock().unwrap_or_else(|e| e.into_inner());
        finished.push_back(id);
        while finished.len() > self.keep {
            if let Some(old) = finished.pop_front() {
                self.entries.remove(&old);
            }
        }
    }
}
