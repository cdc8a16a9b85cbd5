//! Job events as Server-Sent Events.
//!
//! The OpenAI-compatible stream (`stream: true` on `POST /v1/images/generations`) sends
//! `event:` + `data:` pairs only, never `id:` or `retry:`: the official Python client turns an
//! event id followed by a keep-alive comment into an empty event and fails to parse it. Its
//! events are `image_generation.partial_image` (x̂0 previews), one `image_generation.completed`
//! per image, optional `tiller.progress`, and `error` (`{"type": "error", "error": {...}}`, which
//! the client raises as an `APIError`) when the job fails after the stream started.
//!
//! The job stream (`GET /v1/jobs/{id}/events`) numbers its events with `id:` so a client can
//! resume with `Last-Event-ID`, and names them `tiller.*`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use futures_util::stream::{self, Stream};
use serde_json::json;

use super::error::ApiError;
use super::handlers::{job_error, metadata, submit_error, Prepared};
use super::types::{CompletedImageEvent, ImageUsage, InputTokensDetails, PartialImageEvent};
use super::AppState;
use crate::engine::{CancelOnDrop, JobEvent, JobHandle};
use crate::util::unix_now;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn error_event(e: &ApiError) -> Event {
    let body = e.body();
    let data = json!({"type": "error", "error": body.error});
    Event::default().event("error").data(data.to_string())
}

fn json_event(name: &str, value: &impl serde::Serialize) -> Event {
    Event::default().event(name).data(serde_json::to_string(value).unwrap_or_else(|_| "{}".into()))
}

/// The OpenAI events one job event becomes (none for bookkeeping events; `tiller.progress` for
/// steps when `progress`).
pub(crate) fn openai_events(
    p: &Prepared,
    ev: &JobEvent,
    t0: Instant,
    size: &str,
    tokens: u64,
    progress: bool,
    image_ids: Option<&[String]>,
) -> Vec<Event> {
    match ev {
        JobEvent::Partial { index, image, .. } => vec![json_event(
            &format!("{}.partial_image", p.event_prefix),
            &PartialImageEvent {
                kind: format!("{}.partial_image", p.event_prefix),
                b64_json: b64(image),
                partial_image_index: *index,
                created_at: unix_now(),
                size: size.to_string(),
                quality: "auto".into(),
                background: "opaque".into(),
                output_format: p.job.encoding.format.name().into(),
            },
        )],
        JobEvent::Step { step, total } if progress => {
            vec![json_event("tiller.progress", &json!({"type": "tiller.progress", "step": step, "total": total}))]
        }
        JobEvent::Completed(out) => {
            let total_ms = t0.elapsed().as_secs_f64() * 1e3;
            let mut events = Vec::with_capacity(out.images.len());
            for (i, img) in out.images.iter().enumerate() {
                match metadata(p, out, img, total_ms) {
                    Ok(mut tiller) => events.push(json_event(
                        &format!("{}.completed", p.event_prefix),
                        &CompletedImageEvent {
                            kind: format!("{}.completed", p.event_prefix),
                            b64_json: b64(&img.encoded),
                            created_at: unix_now(),
                            size: size.to_string(),
                            quality: "auto".into(),
                            background: "opaque".into(),
                            output_format: p.job.encoding.format.name().into(),
                            usage: ImageUsage {
                                input_tokens: tokens,
                                input_tokens_details: InputTokensDetails { image_tokens: 0, text_tokens: tokens },
                                output_tokens: 0,
                                total_tokens: tokens,
                            },
                            tiller: {
                                tiller.image_id = image_ids.and_then(|ids| ids.get(i).cloned());
                                tiller
                            },
                        },
                    )),
                    Err(e) => events.push(error_event(&e)),
                }
            }
            events
        }
        JobEvent::Failed(e) => vec![error_event(&job_error(e.clone()))],
        JobEvent::Cancelled => vec![error_event(&job_error(crate::engine::JobError::Cancelled))],
        _ => Vec::new(),
    }
}

struct Follow<F> {
    handle: Arc<JobHandle>,
    seen: usize,
    queued: std::collections::VecDeque<Event>,
    done: bool,
    deadline: tokio::time::Instant,
    timeout_error: ApiError,
    render: F,
    /// SSE events of the first position to drop (a resumed stream that had seen some of them).
    skip: usize,
    /// Cancels the job when the stream is dropped (the client disconnected), if set.
    _guard: Option<CancelOnDrop>,
}

/// Follow a job's log from position `from` (dropping the first `skip` SSE events rendered for
/// that position), turning each event into SSE events with `render` (given the event's
/// position); ends after the terminal event. Past `timeout` the job is cancelled and an error
/// event sent.
pub(crate) fn follow<F>(
    handle: Arc<JobHandle>,
    from: usize,
    skip: usize,
    timeout: Duration,
    guard: Option<CancelOnDrop>,
    timeout_error: ApiError,
    render: F,
) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnMut(usize, &JobEvent) -> Vec<Event> + Send + 'static,
{
    let state = Follow {
        handle,
        seen: from,
        queued: Default::default(),
        done: false,
        deadline: tokio::time::Instant::now() + timeout,
        timeout_error,
        render,
        skip,
        _guard: guard,
    };
    stream::unfold(state, |mut st| async move {
        loop {
            if let Some(ev) = st.queued.pop_front() {
                return Some((Ok(ev), st));
            }
            if st.done {
                return None;
            }
            let events = st.handle.events_from(st.seen);
            if events.is_empty() {
                if tokio::time::timeout_at(st.deadline, st.handle.wait_beyond(st.seen)).await.is_err() {
                    st.handle.cancel();
                    let e = error_event(&st.timeout_error);
                    st.queued.push_back(e);
                    st.done = true;
                }
                continue;
            }
            for ev in events {
                let rendered = (st.render)(st.seen, &ev);
                let skip = std::mem::take(&mut st.skip);
                st.queued.extend(rendered.into_iter().skip(skip));
                st.seen += 1;
                if ev.is_terminal() {
                    st.done = true;
                }
            }
        }
    })
}

/// `stream: true` on `POST /v1/images/generations` and `/v1/images/edits`.
pub(crate) async fn images_stream(state: AppState, p: Prepared, t0: Instant) -> Response {
    let handle = match state.engine.submit(p.job.clone()) {
        Ok(h) => h,
        Err(e) => return submit_error(e, &state.engine).into_response(),
    };
    let size = format!("{}x{}", p.job.params.width.unwrap_or(0), p.job.params.height.unwrap_or(0));
    let tokens = p.job.params.prompt.split_whitespace().count() as u64;
    let timeout = Duration::from_secs(state.limits.request_timeout_secs);
    let guard = CancelOnDrop(handle.clone());
    let p = Arc::new(p);
    let progress = p.stream_progress;
    let events = follow(handle, 0, 0, timeout, Some(guard), super::handlers::timeout_error(&state), move |_, ev| {
        // An experiment's images are recorded (committed) before their completed events go out,
        // so what a client received is in the results.
        let ids = match (ev, &p.experiment) {
            (JobEvent::Completed(out), Some(joined)) => {
                let total_ms = t0.elapsed().as_secs_f64() * 1e3;
                let recorded = tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current()
                        .block_on(super::experiments::record_images(&state, joined, &p, out, total_ms))
                });
                match recorded {
                    Ok(ids) => Some(ids),
                    Err(e) => return vec![error_event(&e)],
                }
            }
            _ => None,
        };
        openai_events(&p, ev, t0, &size, tokens, progress, ids.as_deref())
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}
