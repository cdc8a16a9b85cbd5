//! The event log every reply is made of.
//!
//! A job appends events as it runs (queued, started, each step, partial previews, and one
//! terminal event). The plain endpoint waits for the terminal event; the streaming endpoint and
//! `GET /v1/jobs/{id}/events` replay the log from any position and follow it live, so a client
//! that reconnects with `Last-Event-ID` misses nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;

use super::{JobError, JobOutput};

/// One thing that happened to a job.
#[derive(Debug, Clone)]
pub enum JobEvent {
    /// Accepted; waiting for admission.
    Queued,
    /// Admitted: its rows now join the engine's batches.
    Started,
    /// A denoising step (or ReNO iteration) finished.
    Step {
        step: usize,
        total: usize,
    },
    /// A decoded preview of x̂0 in the job's output format, `index` counting from 0.
    Partial {
        index: usize,
        image: Arc<Vec<u8>>,
    },
    Completed(Arc<JobOutput>),
    Failed(JobError),
    Cancelled,
}

impl JobEvent {
    pub fn is_terminal(&self) -> bool {
        matches!(self, JobEvent::Completed(_) | JobEvent::Failed(_) | JobEvent::Cancelled)
    }
}

/// Where a job stands (what `GET /v1/jobs/{id}` reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled)
    }
}

/// A submitted job: its id, its cancel flag and its event log. Shared by the engine (which
/// appends) and any number of readers.
pub struct JobHandle {
    /// Unguessable id (`job_` + 32 hex digits of OS randomness).
    pub id: String,
    /// Admission order (smaller = older).
    pub seq: u64,
    /// Unix seconds at submission.
    pub created: u64,
    pub(crate) submitted: Instant,
    cancel: AtomicBool,
    log: Mutex<Vec<JobEvent>>,
    /// The log's length, for readers waiting on new events.
    len: watch::Sender<usize>,
    finished: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for JobHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobHandle").field("id", &self.id).field("status", &self.status()).finish()
    }
}

impl JobHandle {
    pub(crate) fn new(seq: u64) -> Arc<Self> {
        let (len, _) = watch::channel(0);
        Arc::new(Self {
            id: new_job_id(),
            seq,
            created: crate::util::unix_now(),
            submitted: Instant::now(),
            cancel: AtomicBool::new(false),
            log: Mutex::new(Vec::new()),
            len,
            finished: Mutex::new(None),
        })
    }

    /// Append an event; events after the terminal one are dropped.
    pub(crate) fn push(&self, ev: JobEvent) {
        let mut log = self.log.lock().unwrap();
        if log.last().is_some_and(JobEvent::is_terminal) {
            return;
        }
        let terminal = ev.is_terminal();
        log.push(ev);
        let n = log.len();
        drop(log);
        if terminal {
            *self.finished.lock().unwrap() = Some(Instant::now());
        }
        self.len.send_replace(n);
    }

    /// Ask the engine to stop this job: a queued job never starts, a running one stops before
    /// its next denoiser call.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    pub fn status(&self) -> JobStatus {
        // Every event sets the status on its own, so the last one decides.
        match self.log.lock().unwrap().last() {
            None | Some(JobEvent::Queued) => JobStatus::Queued,
            Some(JobEvent::Started | JobEvent::Step { .. } | JobEvent::Partial { .. }) => JobStatus::Running,
            Some(JobEvent::Completed(_)) => JobStatus::Succeeded,
            Some(JobEvent::Failed(_)) => JobStatus::Failed,
            Some(JobEvent::Cancelled) => JobStatus::Cancelled,
        }
    }

    /// The last step event, as (step, total).
    pub fn progress(&self) -> Option<(usize, usize)> {
        self.log.lock().unwrap().iter().rev().find_map(|e| match e {
            JobEvent::Step { step, total } => Some((*step, *total)),
            _ => None,
        })
    }

    /// The terminal event, once there is one.
    pub fn outcome(&self) -> Option<JobEvent> {
        self.log.lock().unwrap().last().filter(|e| e.is_terminal()).cloned()
    }

    /// When the job reached its terminal event.
    pub fn finished_at(&self) -> Option<Instant> {
        *self.finished.lock().unwrap()
    }

    /// Events from position `from` on (a snapshot).
    pub fn events_from(&self, from: usize) -> Vec<JobEvent> {
        let log = self.log.lock().unwrap();
        log.get(from.min(log.len())..).map(<[JobEvent]>::to_vec).unwrap_or_default()
    }

    /// Wait until the log holds more than `seen` events (returns at once if it already does).
    pub async fn wait_beyond(&self, seen: usize) {
        let mut rx = self.len.subscribe();
        let _ = rx.wait_for(|&n| n > seen).await;
    }

    /// Wait for the terminal event.
    pub async fn wait(&self) -> JobEvent {
        loop {
            let n = self.log.lock().unwrap().len();
            if let Some(ev) = self.outcome() {
                return ev;
            }
            self.wait_beyond(n).await;
        }
    }
}

/// Cancels the job when dropped before it ended: the synchronous endpoints hold one, so a client
/// that hangs up (or a request that times out) stops the work it asked for.
pub struct CancelOnDrop(pub Arc<JobHandle>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.0.status().is_terminal() {
            self.0.cancel();
        }
    }
}

fn new_job_id() -> String {
    // rand's thread RNG is a CSPRNG seeded from the OS: ids cannot be guessed from other ids.
    let bytes: [u8; 16] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("job_{hex}")
}
