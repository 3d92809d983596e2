//! The bridge that makes a deployed app a service: a message to service `NAME` becomes one call
//! of the app's event (the `event` parameter, or the command in lower case) with the payload as
//! its one chunk, and the reply carries the worker's chunks. A stopped app keeps its name and
//! answers that it is stopped.

use crate::router::ConnId;
use crate::server::{Outbound, Shared};
use bytes::Bytes;
use nodus_control::expiry::{self, Admit};
use nodus_engine::balance::Rejection;
use nodus_engine::{CallDone, Engine, SessionError};
use nodus_wire::Message;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Requests an app's bridge takes off its queue at a time.
const BRIDGE_BATCH: usize = 128;

/// One app's service on this node.
struct Bridge {
    conn: ConnId,
    /// Whether the app is started; a stopped app's requests are answered `code=stopped`.
    running: Arc<AtomicBool>,
}

/// The bridges of the node's apps, by name.
#[derive(Clone, Default)]
pub(crate) struct Bridges {
    map: Arc<Mutex<HashMap<String, Bridge>>>,
}

impl Bridges {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Bridge>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `name` has a bridge (started or stopped).
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    /// Names of the started apps.
    pub(crate) fn running(&self) -> Vec<String> {
        self.lock().iter().filter(|(_, b)| b.running.load(Ordering::Relaxed)).map(|(n, _)| n.clone()).collect()
    }

    /// Makes the app a service named `name` (once), started or stopped.
    pub(crate) fn attach(&self, shared: &Arc<Shared>, engine: &Engine, name: &str, running: bool) {
        let mut bridges = self.lock();
        if let Some(b) = bridges.get(name) {
            b.running.store(running, Ordering::Relaxed);
            return;
        }
        let (conn, mut rx) = shared.attach_app(name);
        let flag = Arc::new(AtomicBool::new(running));
        bridges.insert(name.to_string(), Bridge { conn, running: flag.clone() });
        let (shared, engine, app) = (shared.clone(), engine.clone(), name.to_string());
        tokio::spawn(async move {
            let mut caller = engine.caller(&app).ok();
            let mut batch = Vec::with_capacity(BRIDGE_BATCH);
            while rx.recv_many(&mut batch, BRIDGE_BATCH).await > 0 {
                for out in batch.drain(..) {
                    let Outbound::Msg(mut req, _) = out else { continue };
                    if !is_request(&req) {
                        continue;
                    }
                    let now = shared.now_ms();
                    let place = format!("the queue of app {app}");
                    if let Admit::Expired { reply } = expiry::admit(&req, now, &place) {
                        if let Some(r) = reply.filter(|_| req.envelope.id != 0) {
                            shared.inject(conn, *r);
                        }
                        continue;
                    }
                    if !flag.load(Ordering::Relaxed) {
                        if req.envelope.id != 0 {
                            shared.inject(conn, stopped_reply(&req, &app));
                        }
                        continue;
                    }
                    let event = event_of(&req);
                    if caller.is_none() {
                        caller = engine.caller(&app).ok();
                    }
                    let Some(c) = caller.as_ref() else {
                        if req.envelope.id != 0 {
                            let reply = call_reply(&req, &app, &event, Err(SessionError::EngineGone));
                            shared.inject(conn, reply);
                        }
                        continue;
                    };
                    let body = std::mem::take(&mut req.payload);
                    let expires_at = req.envelope.expires_at;
                    let (shared, app_name) = (shared.clone(), app.clone());
                    let reply_event = event.clone();
                    // Each request is its own session; the engine's queue-limit bounds how many
                    // wait, and the reply is routed from the app's task when the worker is done.
                    let started = tokio::time::Instant::now();
                    let done = CallDone::new(move |result| {
                        shared.metrics().invoked(&app_name, result.is_ok(), started.elapsed());
                        if req.envelope.id != 0 {
                            shared.inject(conn, call_reply(&req, &app_name, &reply_event, result));
                        }
                    });
                    let accepted = match expiry::remaining(expires_at, now) {
                        // It must not reach a worker after its _expires_at: the engine drops it
                        // from the app's queue then.
                        Some(left) => {
                            let deadline = tokio::time::Instant::now() + Duration::from_millis(left as u64);
                            c.call_before(event, body, deadline, done)
                        }
                        None => c.call(event, body, done),
                    };
                    if !accepted {
                        // The app was removed (and perhaps started again): look it up anew.
                        caller = None;
                    }
                }
            }
        });
    }

    /// Removes the app's service; `false` when it had none.
    pub(crate) fn detach(&self, shared: &Shared, name: &str) -> bool {
        let removed = self.lock().remove(name);
        match removed {
            Some(b) => {
                shared.detach(b.conn);
                true
            }
            None => false,
        }
    }

    /// Removes every app's service.
    pub(crate) fn detach_all(&self, shared: &Shared) {
        let all: Vec<ConnId> = self.lock().drain().map(|(_, b)| b.conn).collect();
        for conn in all {
            shared.detach(conn);
        }
    }
}

/// What an in-process service acts on: not replies (nor errors, which are replies too), and not
/// the node's own notices to a registered service (HELP, READY, STATUS, QUITTING).
pub(crate) fn is_request(m: &Message) -> bool {
    m.envelope.reply_to == 0 && !matches!(m.command.as_str(), "HELP" | "READY" | "STATUS" | "QUITTING")
}

/// The engine event a request calls: its `event` parameter, else its command in lower case.
fn event_of(req: &Message) -> String {
    req.get("event").map(String::from).unwrap_or_else(|| req.command.to_ascii_lowercase())
}

fn stopped_reply(req: &Message, app: &str) -> Message {
    req.reply("ERROR")
        .param("code", "stopped")
        .param("command", &req.command)
        .param("message", format!("app {app:?} is stopped on this node; start it with `nodus app start {app}`"))
}

/// The reply to a request that called `event`: RESULT with the worker's chunks joined, or
/// ERROR with a stable code (the caller may retry on `queue_full` and `worker_failed`).
fn call_reply(req: &Message, app: &str, event: &str, result: Result<Vec<Bytes>, SessionError>) -> Message {
    match result {
        Ok(chunks) => {
            let payload = match chunks.as_slice() {
                [one] => one.to_vec(),
                _ => chunks.concat(),
            };
            req.reply("RESULT").param("chunks", chunks.len()).param("event", event).with_payload(payload)
        }
        Err(SessionError::Rejected(Rejection::Stopped)) => stopped_reply(req, app),
        Err(e) => {
            let code = match &e {
                SessionError::Rejected(Rejection::QueueFull { .. } | Rejection::Busy { .. }) => "queue_full",
                SessionError::Rejected(Rejection::Expired) => expiry::EXPIRED_CODE,
                SessionError::Rejected(_) => "rejected",
                SessionError::Worker { .. } => "app_error",
                SessionError::WorkerFailed(_) => "worker_failed",
                SessionError::EngineGone => "unavailable",
                SessionError::Overflow(_) | SessionError::Closed => "session",
            };
            req.reply("ERROR").param("code", code).param("command", &req.command).param("message", e.to_string())
        }
    }
}
