//! Client code on state changes (seed 004's "call client code"): a configured target receives a
//! `TASK_STATUS` notification for every status change of every task (id, procedure, status,
//! attempt).
//!
//! Targets: an app event (`app:APP.EVENT`: the event gets one chunk, the JSON object
//! `{"command": "TASK_STATUS", "id", "procedure", "status", "attempt"}`), forwarded here; or a
//! node service (`service:NAME`: the message `TASK_STATUS id=;procedure=;status=;attempt=`),
//! forwarded by the node, which owns the router. Notifications are best effort and bounded:
//! a target slower than the changes misses some, and the number missed is logged.

use bytes::Bytes;
use nodus_engine::{CallDone, Engine};
use tokio::sync::broadcast;

use crate::executor::{StatusChange, Tasks};
use crate::store::Store;

/// Where `TASK_STATUS` notifications go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A node service, by name.
    Service(String),
    /// An app event.
    AppEvent {
        /// The app.
        app: String,
        /// Its event.
        event: String,
    },
}

impl std::str::FromStr for Target {
    type Err = String;

    /// `service:NAME` or `app:APP.EVENT` (the event is what follows the last dot).
    fn from_str(s: &str) -> Result<Target, String> {
        let bad = || format!("{s:?} is not a notification target; write service:NAME or app:APP.EVENT");
        match s.split_once(':') {
            Some(("service", name)) if !name.is_empty() => Ok(Target::Service(name.to_string())),
            Some(("app", full)) => match full.rsplit_once('.') {
                Some((app, event)) if !app.is_empty() && !event.is_empty() => {
                    Ok(Target::AppEvent { app: app.to_string(), event: event.to_string() })
                }
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

/// The notification body for app events: one JSON object.
pub fn status_json(c: &StatusChange) -> Bytes {
    let v = serde_json::json!({
        "command": "TASK_STATUS",
        "id": c.id.as_str(),
        "procedure": &*c.procedure,
        "status": c.status_name(),
        "attempt": c.attempt,
    });
    Bytes::from(serde_json::to_vec(&v).expect("a JSON value serializes"))
}

/// Forwards every status change of `tasks` to `event` of `app` until the service stops. A call
/// the app cannot take (queue full, app not running) is dropped and counted in the log.
///
/// It watches from the moment it is called, not from when the returned future first runs, so
/// a change made right after `tokio::spawn(forward_to_app(..))` is not missed.
pub fn forward_to_app<S: Store>(
    tasks: Tasks<S>,
    engine: Engine,
    app: String,
    event: String,
) -> impl std::future::Future<Output = ()> + Send {
    let changes = tasks.watch();
    drop(tasks);
    forward(changes, engine, app, event)
}

async fn forward(mut changes: broadcast::Receiver<StatusChange>, engine: Engine, app: String, event: String) {
    let mut caller = None;
    let mut dropped: u64 = 0;
    loop {
        let change = match changes.recv().await {
            Ok(c) => c,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, %app, %event, "TASK_STATUS notifications missed: the target is slower than the changes");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => break,
        };
        if caller.is_none() {
            caller = engine.caller(&app).ok();
        }
        let Some(c) = &caller else {
            dropped += 1;
            if dropped.is_power_of_two() {
                tracing::warn!(dropped, %app, "TASK_STATUS notifications dropped: the app is not running");
            }
            continue;
        };
        let done = CallDone::new(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "a TASK_STATUS notification failed");
            }
        });
        if !c.call(event.clone(), status_json(&change), done) {
            caller = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!("service:audit".parse::<Target>().unwrap(), Target::Service("audit".into()));
        assert_eq!(
            "app:procs.v2.on_status".parse::<Target>().unwrap(),
            Target::AppEvent { app: "procs.v2".into(), event: "on_status".into() }
        );
        for bad in ["audit", "service:", "app:procs", "app:.x", "queue:x"] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_body_is_one_json_object() {
        let c = StatusChange {
            id: "t-1".parse().unwrap(),
            procedure: "procs.add".into(),
            status: Some(crate::task::Status::Running),
            attempt: 2,
            parent: None,
        };
        let v: serde_json::Value = serde_json::from_slice(&status_json(&c)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"command": "TASK_STATUS", "id": "t-1", "procedure": "procs.add", "status": "running", "attempt": 2})
        );
    }
}
