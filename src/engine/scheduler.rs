//! Step-level batching: every running job's denoiser calls meet here.
//!
//! Each running job drives its strategy (plain sampling, FK, SVDD, best-of-N) on its own
//! thread, against a [`JobModel`] whose `predict` hands the rows to the scheduler thread and
//! waits: the strategy's loop is the job's resumable state, parked between steps. Each **tick**
//! the scheduler gathers the pending calls that can share one forward (same model variant,
//! latent shape, dtype and conditioning layout), stacks their rows up to
//! `limits.max_batch_rows` — per-row timesteps let rows of different steps and requests share
//! it — runs one forward, and hands each call its rows back. Jobs join at the next tick and
//! leave when they finish.
//!
//! Which calls share a tick ([`plan_tick`]): all compatible pending calls, each with the same
//! share of rows (the smallest call's size), so every running job advances at the same row rate
//! and a short request that arrives while a long steered job runs is not charged for the long
//! job's rows; groups of incompatible calls take turns. A call larger than its share or the
//! row cap is split over several forwards.
//!
//! Batch invariance: a row's output must not depend on the other rows of its forward. The
//! CPU kernels compute each row (each sample of a convolution, each token's matmul row, each
//! head's attention) with the same reduction order whatever the batch, and
//! `tests/engine_batching.rs` checks that images are byte-identical alone and under load.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Result, Tensor};

use crate::models::{DiffusionModel, ModelInfo, PromptEmbedding};
use crate::util::metrics as m;

/// What a job thread asks of the scheduler: one guided denoiser call.
pub(crate) struct ForwardCall {
    pub job: u64,
    pub model: Arc<dyn DiffusionModel>,
    pub x: Tensor,
    pub timesteps: Tensor,
    pub context: PromptEmbedding,
    pub timestep_cond: Option<Tensor>,
    pub reply: SyncSender<Result<Tensor>>,
}

/// Scheduler settings.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerOptions {
    /// Most rows in one forward.
    pub max_batch_rows: usize,
    /// How long a tick waits for running jobs that are busy elsewhere (decoding, scoring) to
    /// send their next call, before it runs with what it has.
    pub gather_window: Duration,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        Self { max_batch_rows: 16, gather_window: Duration::from_millis(5) }
    }
}

/// What [`plan_tick`] sees of a pending call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingView {
    /// Arrival order.
    pub seq: u64,
    /// Calls with equal keys can share a forward.
    pub key: u64,
    pub rows_left: usize,
    /// Denoiser rows the call's job has had so far.
    pub attained: u64,
    /// Ticks this call has been passed over.
    pub waited: u32,
}

/// Choose the calls of one tick: (index into `pending`, rows to take from it).
///
/// The call passed over for the most ticks leads (ties: the job with the least service, then
/// the oldest call), so groups of incompatible calls take turns and nothing starves. Every
/// compatible call joins it with the same share of rows — the smallest pending call's size —
/// so jobs progress at equal row rates: on a CPU, where a forward costs about its row count,
/// a 2-row request sharing a tick with a 16-row FK call costs 4 rows a step instead of 18,
/// while equal requests batch completely. Larger calls are split over ticks; a tick never
/// exceeds `max_rows` (the jobs with the least service get in first).
pub fn plan_tick(pending: &[PendingView], max_rows: usize) -> Vec<(usize, usize)> {
    let max_rows = max_rows.max(1);
    let rank = |p: &PendingView| (std::cmp::Reverse(p.waited), p.attained, p.seq);
    let Some(head) = (0..pending.len()).min_by_key(|&i| rank(&pending[i])) else { return Vec::new() };
    let key = pending[head].key;
    let mut group: Vec<usize> = (0..pending.len()).filter(|&i| pending[i].key == key).collect();
    group.sort_by_key(|&i| (i != head, rank(&pending[i])));
    let share = group.iter().map(|&i| pending[i].rows_left).min().unwrap_or(1).max(1);
    let mut room = max_rows;
    let mut plan = Vec::with_capacity(group.len());
    for i in group {
        if room == 0 {
            break;
        }
        let take = pending[i].rows_left.min(share).min(room);
        plan.push((i, take));
        room -= take;
    }
    plan
}

struct Pending {
    call: ForwardCall,
    seq: u64,
    key: u64,
    done: usize,
    parts: Vec<Tensor>,
    waited: u32,
}

/// Counters shared between the scheduler and the job threads.
#[derive(Default)]
pub(crate) struct SchedulerGauges {
    /// Jobs whose threads are running (they will call again unless they are finishing).
    pub active_jobs: AtomicUsize,
    /// Forwards run, rows in them, and the most rows one of them held.
    pub ticks: AtomicU64,
    pub rows: AtomicU64,
    pub max_rows: AtomicUsize,
    /// Forwards that held rows of more than one job.
    pub shared_ticks: AtomicU64,
    /// Time inside the model's forward, and inside whole ticks (gathering, stacking, splitting
    /// and answering included), nanoseconds: their difference is the scheduler's overhead.
    pub forward_nanos: AtomicU64,
    pub tick_nanos: AtomicU64,
}

/// The compatibility key: calls share a forward only when the model variant and every
/// per-row shape other than the batch match.
fn compat_key(c: &ForwardCall) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (Arc::as_ptr(&c.model) as *const () as usize).hash(&mut h);
    c.x.dims()[1..].hash(&mut h);
    c.x.dtype().as_str().hash(&mut h);
    c.context.hidden_states.dims()[1..].hash(&mut h);
    c.context.pooled.as_ref().map(|p| p.dims()[1..].to_vec()).hash(&mut h);
    c.timestep_cond.as_ref().map(|t| t.dims()[1..].to_vec()).hash(&mut h);
    h.finish()
}

/// The scheduler thread's loop; returns when every sender is gone.
pub(crate) fn run(rx: Receiver<ForwardCall>, opts: SchedulerOptions, gauges: Arc<SchedulerGauges>) {
    let mut pending: Vec<Pending> = Vec::new();
    let mut attained: HashMap<u64, u64> = HashMap::new();
    let mut seq = 0u64;
    let mut push = |pending: &mut Vec<Pending>, call: ForwardCall| {
        seq += 1;
        let key = compat_key(&call);
        pending.push(Pending { call, seq, key, done: 0, parts: Vec::new(), waited: 0 });
    };
    loop {
        if pending.is_empty() {
            match rx.recv() {
                Ok(c) => push(&mut pending, c),
                Err(_) => return,
            }
        }
        // Gather: take what has arrived; wait (briefly) for running jobs that have not called yet.
        let deadline = Instant::now() + opts.gather_window;
        loop {
            while let Ok(c) = rx.try_recv() {
                push(&mut pending, c);
            }
            let rows: usize = pending.iter().map(|p| p.call.x.dims()[0] - p.done).sum();
            let everyone_waiting = pending.len() >= gauges.active_jobs.load(Ordering::SeqCst);
            if everyone_waiting || rows >= opts.max_batch_rows {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            match rx.recv_timeout(deadline - now) {
                Ok(c) => push(&mut pending, c),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        // Calls whose job was cancelled or whose caller is gone are answered by the job itself;
        // here they only need removing.
        let views: Vec<PendingView> = pending
            .iter()
            .map(|p| PendingView {
                seq: p.seq,
                key: p.key,
                rows_left: p.call.x.dims()[0] - p.done,
                attained: attained.get(&p.call.job).copied().unwrap_or(0),
                waited: p.waited,
            })
            .collect();
        let tick_start = Instant::now();
        let plan = plan_tick(&views, opts.max_batch_rows);
        let t0 = Instant::now();
        let result = forward(&pending, &plan);
        gauges.forward_nanos.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let rows: usize = plan.iter().map(|&(_, r)| r).sum();
        metrics::histogram!(m::TICK_ROWS).record(rows as f64);
        gauges.ticks.fetch_add(1, Ordering::Relaxed);
        gauges.rows.fetch_add(rows as u64, Ordering::Relaxed);
        gauges.max_rows.fetch_max(rows, Ordering::Relaxed);
        let jobs: std::collections::HashSet<u64> = plan.iter().map(|&(i, _)| pending[i].call.job).collect();
        if jobs.len() > 1 {
            gauges.shared_ticks.fetch_add(1, Ordering::Relaxed);
        }
        metrics::histogram!(m::TICK_SECONDS).record(t0.elapsed().as_secs_f64());
        for p in pending.iter_mut() {
            p.waited += 1;
        }
        match result {
            Ok(outs) => {
                for (&(i, r), out) in plan.iter().zip(outs) {
                    let p = &mut pending[i];
                    p.waited = 0;
                    p.done += r;
                    p.parts.push(out);
                    *attained.entry(p.call.job).or_default() += r as u64;
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for &(i, _) in &plan {
                    let p = &mut pending[i];
                    let _ = p.call.reply.send(Err(candle_core::Error::Msg(msg.clone())));
                    p.done = usize::MAX; // answered; removed below
                }
            }
        }
        // Answer the calls that are complete, keep the rest.
        let mut i = 0;
        while i < pending.len() {
            let p = &pending[i];
            if p.done == usize::MAX {
                pending.swap_remove(i);
                continue;
            }
            if p.done == p.call.x.dims()[0] {
                let p = pending.swap_remove(i);
                let out = if p.parts.len() == 1 {
                    Ok(p.parts.into_iter().next().expect("one part"))
                } else {
                    Tensor::cat(&p.parts, 0)
                };
                let _ = p.call.reply.send(out);
                continue;
            }
            i += 1;
        }
        // Service counts of jobs with nothing pending are kept while the job runs; jobs that
        // ended are forgotten when nothing of theirs is pending and they are not active.
        if attained.len() > 4 * gauges.active_jobs.load(Ordering::SeqCst).max(16) {
            let live: std::collections::HashSet<u64> = pending.iter().map(|p| p.call.job).collect();
            attained.retain(|j, _| live.contains(j));
        }
        // Keep arrival order stable for the next plan (swap_remove reorders).
        pending.sort_by_key(|p| p.seq);
        gauges.tick_nanos.fetch_add(tick_start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Run the planned rows as one forward; one output per planned call, in plan order.
fn forward(pending: &[Pending], plan: &[(usize, usize)]) -> Result<Vec<Tensor>> {
    let model = pending[plan[0].0].call.model.clone();
    let mut xs = Vec::with_capacity(plan.len());
    let mut ts = Vec::with_capacity(plan.len());
    let mut hs = Vec::with_capacity(plan.len());
    let mut pooled = Vec::new();
    let mut conds = Vec::new();
    for &(i, r) in plan {
        let p = &pending[i];
        let c = &p.call;
        xs.push(c.x.narrow(0, p.done, r)?);
        ts.push(c.timesteps.narrow(0, p.done, r)?);
        hs.push(c.context.hidden_states.narrow(0, p.done, r)?);
        if let Some(pl) = &c.context.pooled {
            pooled.push(pl.narrow(0, p.done, r)?);
        }
        if let Some(tc) = &c.timestep_cond {
            conds.push(tc.narrow(0, p.done, r)?);
        }
    }
    let cat = |v: &[Tensor]| if v.len() == 1 { Ok(v[0].clone()) } else { Tensor::cat(v, 0) };
    let x = cat(&xs)?;
    let t = cat(&ts)?;
    let context = PromptEmbedding {
        hidden_states: cat(&hs)?,
        pooled: if pooled.is_empty() { None } else { Some(cat(&pooled)?) },
        truncated: Vec::new(),
    };
    let tc = if conds.is_empty() { None } else { Some(cat(&conds)?) };
    let out = std::panic::catch_unwind(AssertUnwindSafe(|| model.predict(&x, &t, &context, tc.as_ref())))
        .unwrap_or_else(|p| Err(candle_core::Error::Msg(format!("the denoiser panicked: {}", panic_message(&p)))))?;
    let mut outs = Vec::with_capacity(plan.len());
    let mut at = 0;
    for &(_, r) in plan {
        outs.push(out.narrow(0, at, r)?);
        at += r;
    }
    Ok(outs)
}

pub(crate) fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// The message of the error a cancelled job's model calls return.
pub(crate) const CANCELLED: &str = "tiller: job cancelled";

/// How a job's denoiser calls run.
pub(crate) enum Route {
    /// Through the scheduler, batched with other jobs.
    Batched(SyncSender<ForwardCall>),
    /// On the job's own thread (ReNO, whose calls record a gradient graph of their own).
    Direct,
}

/// The model a running job sees: the loaded variant, with every denoiser call checked for
/// cancellation (so a job stops within one forward) and, when batched, sent to the scheduler.
/// Decoding runs on the job's thread in chunks of `decode_chunk` images, which bounds its memory.
pub(crate) struct JobModel {
    pub inner: Arc<dyn DiffusionModel>,
    pub route: Route,
    pub handle: Arc<super::events::JobHandle>,
    pub decode_chunk: usize,
}

impl JobModel {
    fn check_cancel(&self) -> Result<()> {
        if self.handle.is_cancelled() {
            candle_core::bail!("{CANCELLED}");
        }
        Ok(())
    }
}

impl DiffusionModel for JobModel {
    fn info(&self) -> &ModelInfo {
        self.inner.info()
    }

    fn device(&self) -> &Device {
        self.inner.device()
    }

    fn encode_prompts(&self, prompts: &[String]) -> Result<PromptEmbedding> {
        self.check_cancel()?;
        self.inner.encode_prompts(prompts)
    }

    fn guidance_embedding(&self, guidance_scale: f64, batch: usize) -> Result<Option<Tensor>> {
        self.inner.guidance_embedding(guidance_scale, batch)
    }

    fn predict(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        context: &PromptEmbedding,
        timestep_cond: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.check_cancel()?;
        match &self.route {
            Route::Direct => self.inner.predict(x, timesteps, context, timestep_cond),
            Route::Batched(tx) => {
                let (reply, rx) = std::sync::mpsc::sync_channel(1);
                let call = ForwardCall {
                    job: self.handle.seq,
                    model: self.inner.clone(),
                    x: x.clone(),
                    timesteps: timesteps.clone(),
                    context: context.clone(),
                    timestep_cond: timestep_cond.cloned(),
                    reply,
                };
                tx.send(call).map_err(|_| candle_core::Error::Msg("the engine scheduler stopped".into()))?;
                rx.recv().map_err(|_| candle_core::Error::Msg("the engine scheduler stopped".into()))?
            }
        }
    }

    fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.check_cancel()?;
        let n = latents.dim(0)?;
        let chunk = self.decode_chunk.max(1);
        if n <= chunk {
            return self.inner.decode(latents);
        }
        let mut parts = Vec::with_capacity(n.div_ceil(chunk));
        let mut at = 0;
        while at < n {
            self.check_cancel()?;
            let r = chunk.min(n - at);
            parts.push(self.inner.decode(&latents.narrow(0, at, r)?)?);
            at += r;
        }
        Tensor::cat(&parts, 0)
    }

    fn forward_bytes_per_row(&self, h: usize, w: usize) -> u64 {
        self.inner.forward_bytes_per_row(h, w)
    }

    fn decode_bytes_per_image(&self, h: usize, w: usize) -> u64 {
        self.inner.decode_bytes_per_image(h, w)
    }

    fn encode_image(&self, images: &Tensor) -> Result<Tensor> {
        self.check_cancel()?;
        self.inner.encode_image(images)
    }

    fn encode_posterior(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        self.check_cancel()?;
        self.inner.encode_posterior(images)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(seq: u64, key: u64, rows: usize, attained: u64, waited: u32) -> PendingView {
        PendingView { seq, key, rows_left: rows, attained, waited }
    }

    #[test]
    fn equal_requests_share_a_tick_whenever_they_arrived() {
        // Eight requests with CFG (2 rows each) at different points of their runs.
        let p: Vec<_> = (0..8).map(|i| view(i, 1, 2, 10 * i, 0)).collect();
        let plan = plan_tick(&p, 16);
        assert_eq!(plan.len(), 8);
        assert_eq!(plan.iter().map(|x| x.1).sum::<usize>(), 16);
    }

    #[test]
    fn a_short_request_and_a_long_job_progress_at_equal_row_rates() {
        // A long FK job (16 rows a call) and a new 2-row request: 2 rows each, not 18.
        let p = vec![view(1, 1, 16, 480, 0), view(2, 1, 2, 0, 0)];
        assert_eq!(plan_tick(&p, 16), vec![(1, 2), (0, 2)]);
        // Alone, the long job's call runs whole (up to the row cap).
        assert_eq!(plan_tick(&p[..1], 16), vec![(0, 16)]);
        assert_eq!(plan_tick(&[view(1, 1, 40, 0, 0)], 16), vec![(0, 16)]);
    }

    #[test]
    fn incompatible_groups_take_turns() {
        let p = vec![view(1, 1, 2, 0, 0), view(2, 2, 2, 0, 0)];
        assert_eq!(plan_tick(&p, 16), vec![(0, 2)], "the oldest call's group first");
        // The passed-over call has waited a tick: its group goes next.
        let p = vec![view(1, 1, 2, 2, 0), view(2, 2, 2, 0, 1)];
        assert_eq!(plan_tick(&p, 16), vec![(1, 2)]);
    }

    #[test]
    fn the_row_cap_admits_the_least_served_first() {
        let p: Vec<_> = (0..10).map(|i| view(i, 1, 2, 100 - i, 0)).collect();
        let plan = plan_tick(&p, 16);
        assert_eq!(plan.len(), 8);
        assert!(plan.iter().all(|&(i, r)| r == 2 && i >= 2), "{plan:?}");
        assert!(plan_tick(&[], 16).is_empty());
    }
}
