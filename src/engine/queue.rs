//! Admission: which submitted jobs may run now.
//!
//! A job is admitted when its estimated peak memory fits beside the jobs already running, under
//! `limits.memory_budget_mib`, and fewer than `limits.max_running_jobs` run. The queue is strict
//! FIFO: a job that does not fit yet blocks the ones behind it, so a large job is never starved
//! by a stream of small ones. A job that could never fit, even alone, is refused at submission.
//! Once admitted, jobs share the denoiser step by step (see `scheduler`), so a short job
//! admitted behind a long one does not wait for it to finish.

use std::collections::VecDeque;

/// Why a job was not queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Its estimate exceeds the whole budget.
    TooLarge { bytes: u64, budget: u64 },
    /// `limits.queue_depth` jobs are already waiting.
    QueueFull { queued: usize },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Waiting {
    seq: u64,
    bytes: u64,
    cost: u64,
}

/// The admission state machine. It only does bookkeeping; the engine owns the jobs.
#[derive(Debug)]
pub struct Admission {
    budget: u64,
    max_running: usize,
    max_queued: usize,
    queue: VecDeque<Waiting>,
    running_bytes: u64,
    running: usize,
}

impl Admission {
    pub fn new(budget_bytes: u64, max_running: usize, max_queued: usize) -> Self {
        Self {
            budget: budget_bytes,
            max_running: max_running.max(1),
            max_queued,
            queue: VecDeque::new(),
            running_bytes: 0,
            running: 0,
        }
    }

    /// Queue job `seq` with its memory estimate and work cost, or refuse it.
    pub fn offer(&mut self, seq: u64, bytes: u64, cost: u64) -> Result<(), Refusal> {
        if bytes > self.budget {
            return Err(Refusal::TooLarge { bytes, budget: self.budget });
        }
        if self.queue.len() >= self.max_queued {
            return Err(Refusal::QueueFull { queued: self.queue.len() });
        }
        self.queue.push_back(Waiting { seq, bytes, cost });
        Ok(())
    }

    /// Admit the head of the queue if it fits now; returns its seq and memory estimate.
    pub fn admit_next(&mut self) -> Option<(u64, u64)> {
        let head = self.queue.front()?;
        if self.running >= self.max_running || self.running_bytes.saturating_add(head.bytes) > self.budget {
            return None;
        }
        let w = self.queue.pop_front().expect("non-empty");
        self.running += 1;
        self.running_bytes = self.running_bytes.saturating_add(w.bytes);
        Some((w.seq, w.bytes))
    }

    /// A running job ended; its memory is free again.
    pub fn finish(&mut self, bytes: u64) {
        self.running = self.running.saturating_sub(1);
        self.running_bytes = self.running_bytes.saturating_sub(bytes);
    }

    /// Drop a queued job (cancelled before it started); false when it is not queued.
    pub fn remove(&mut self, seq: u64) -> bool {
        match self.queue.iter().position(|w| w.seq == seq) {
            Some(i) => {
                self.queue.remove(i);
                true
            }
            None => false,
        }
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn running(&self) -> usize {
        self.running
    }

    pub fn running_bytes(&self) -> u64 {
        self.running_bytes
    }

    /// Work waiting in the queue (denoiser rows × latent elements × steps, summed).
    pub fn queued_cost(&self) -> u64 {
        self.queue.iter().fold(0u64, |a, w| a.saturating_add(w.cost))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_in_order_while_memory_lasts() {
        let mut a = Admission::new(100, 8, 8);
        a.offer(1, 40, 1).unwrap();
        a.offer(2, 40, 1).unwrap();
        a.offer(3, 40, 1).unwrap();
        assert_eq!(a.admit_next(), Some((1, 40)));
        assert_eq!(a.admit_next(), Some((2, 40)));
        assert_eq!(a.admit_next(), None, "80 + 40 > 100");
        a.finish(40);
        assert_eq!(a.admit_next(), Some((3, 40)));
        assert_eq!((a.running(), a.running_bytes(), a.queued()), (2, 80, 0));
    }

    #[test]
    fn a_large_head_is_not_overtaken() {
        // FIFO: the small job behind a large one waits, so the large one cannot starve.
        let mut a = Admission::new(100, 8, 8);
        a.offer(1, 60, 1).unwrap();
        a.offer(2, 90, 1).unwrap();
        a.offer(3, 10, 1).unwrap();
        assert_eq!(a.admit_next(), Some((1, 60)));
        assert_eq!(a.admit_next(), None, "job 2 does not fit, and job 3 must not pass it");
        a.finish(60);
        assert_eq!(a.admit_next(), Some((2, 90)));
        assert_eq!(a.admit_next(), Some((3, 10)));
    }

    #[test]
    fn refuses_what_can_never_fit_and_a_full_queue() {
        let mut a = Admission::new(100, 8, 2);
        assert_eq!(a.offer(1, 101, 1), Err(Refusal::TooLarge { bytes: 101, budget: 100 }));
        a.offer(2, 1, 5).unwrap();
        a.offer(3, 1, 7).unwrap();
        assert_eq!(a.offer(4, 1, 1), Err(Refusal::QueueFull { queued: 2 }));
        assert_eq!(a.queued_cost(), 12);
    }

    #[test]
    fn caps_running_jobs_and_removes_cancelled_ones() {
        let mut a = Admission::new(1000, 1, 8);
        a.offer(1, 1, 1).unwrap();
        a.offer(2, 1, 1).unwrap();
        a.offer(3, 1, 1).unwrap();
        assert_eq!(a.admit_next(), Some((1, 1)));
        assert_eq!(a.admit_next(), None, "max_running = 1");
        assert!(a.remove(2));
        assert!(!a.remove(2));
        a.finish(1);
        assert_eq!(a.admit_next(), Some((3, 1)));
    }
}
