//! The dashboard and its live feed: static files embedded in the binary (plain HTML, CSS and
//! JavaScript, no build step), `/api/snapshot` (the [`Snapshot`] as JSON) and `/api/events`
//! (server-sent events: a `snapshot` at once, then a fresh one after every change the
//! [`NodeView`] notices, at most every `min_interval`, and at least every `refresh`).

use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::view::{NodeView, Notice, Snapshot};

/// The page.
pub const INDEX_HTML: &str = include_str!("../ui/index.html");
/// Its script.
pub const APP_JS: &str = include_str!("../ui/app.js");
/// Its style sheet.
pub const STYLE_CSS: &str = include_str!("../ui/style.css");

/// How the live feed paces itself.
#[derive(Debug, Clone, Copy)]
pub struct Feed {
    /// Longest time between two snapshots, changes or not (load, clock and uptime move).
    pub refresh: Duration,
    /// Shortest time between two snapshots: a burst of notices becomes one update.
    pub min_interval: Duration,
}

impl Default for Feed {
    fn default() -> Self {
        Feed { refresh: Duration::from_secs(2), min_interval: Duration::from_millis(200) }
    }
}

/// One embedded file with its content type.
pub fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = body.into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// `{"error": code, "message": text}` with `status`.
pub fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({ "error": code, "message": message });
    (status, axum::Json(body)).into_response()
}

fn snapshot_event(s: &Snapshot) -> Event {
    Event::default().event("snapshot").data(serde_json::to_string(s).unwrap_or_default())
}

fn notice_event(n: &Notice) -> Event {
    Event::default().event("notice").data(serde_json::to_string(n).unwrap_or_default())
}

/// The server-sent event stream of one dashboard. It ends when `stop` is cancelled (the
/// listener is shutting down).
pub fn events(
    view: Arc<dyn NodeView>,
    feed: Feed,
    stop: CancellationToken,
) -> Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>> {
    struct State {
        view: Arc<dyn NodeView>,
        notices: broadcast::Receiver<Notice>,
        feed: Feed,
        stop: CancellationToken,
        queue: std::collections::VecDeque<Event>,
        last: Option<tokio::time::Instant>,
    }
    let notices = view.subscribe();
    let state = State { view, notices, feed, stop, queue: Default::default(), last: None };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(e) = s.queue.pop_front() {
                return Some((Ok(e), s));
            }
            let now = tokio::time::Instant::now();
            if let Some(last) = s.last {
                // Wait for a notice (or the refresh), then keep to the minimum interval.
                let changed = tokio::select! {
                    _ = s.stop.cancelled() => return None,
                    n = s.notices.recv() => match n {
                        Ok(n) => Some(n),
                        Err(broadcast::error::RecvError::Lagged(_)) => None,
                        Err(broadcast::error::RecvError::Closed) => {
                            tokio::select! {
                                _ = s.stop.cancelled() => return None,
                                _ = tokio::time::sleep_until(last + s.feed.refresh) => None,
                            }
                        }
                    },
                    _ = tokio::time::sleep_until(last + s.feed.refresh) => None,
                };
                if let Some(n) = changed {
                    s.queue.push_back(notice_event(&n));
                }
                let earliest = last + s.feed.min_interval;
                if earliest > tokio::time::Instant::now() {
                    tokio::select! {
                        _ = s.stop.cancelled() => return None,
                        _ = tokio::time::sleep_until(earliest) => {}
                    }
                }
                // Notices that arrived meanwhile are covered by the snapshot below.
                while let Ok(n) = s.notices.try_recv() {
                    s.queue.push_back(notice_event(&n));
                }
            }
            let snapshot = tokio::select! {
                _ = s.stop.cancelled() => return None,
                snap = s.view.snapshot() => snap,
            };
            s.last = Some(now.max(tokio::time::Instant::now()));
            s.queue.push_back(snapshot_event(&snapshot));
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
