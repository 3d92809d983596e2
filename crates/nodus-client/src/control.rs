//! The control plane from Rust (seed 000): list the components of the cluster, monitor one, kill
//! one. Requests go to a node's built-in `control` service (`TREE`, `MONITORING`, `KILL`).
//!
//! ```no_run
//! # async fn demo(client: nodus_client::Client) -> Result<(), nodus_client::control::ControlError> {
//! use std::time::Duration;
//! let tree = client.tree(true).await?;
//! for row in &tree.rows {
//!     let answer = client.monitor(&row.node, row.id.parse().unwrap(), Duration::from_secs(2)).await?;
//!     println!("{} {}: {:?}", row.kind, row.name, answer);
//! }
//! # Ok(()) }
//! ```

use crate::connection::now_ms;
use crate::{Client, ClientError};
use nodus_control::control::{Body, ControlMessage, Header, MonitoringResult, Spec};
use nodus_control::listing::{self, ComponentRow};
use nodus_control::ComponentId;
use nodus_wire::Message;
use std::time::Duration;
use tokio::time::Instant;

/// The node's control service.
pub const SERVICE: &str = "control";

/// Why a control call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ControlError {
    /// The request failed, or the node refused it.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The control service answered something this SDK cannot read.
    #[error("malformed answer from the control service: {0}")]
    Malformed(String),
}

/// The components of a node, or of every live node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// Every component listed.
    pub rows: Vec<ComponentRow>,
    /// Nodes that did not answer in time (cluster listings).
    pub missing: Vec<String>,
}

/// How a monitoring request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Monitored {
    /// The component (or its node, for it) answered.
    Answered {
        /// The seed's `result` (`sync_time` echoed).
        result: MonitoringResult,
        /// Who wrote the answer (`node:service`, `node:app/uuid`, ...).
        creator: String,
        /// The answer's tag in the text form (`result:monitoring:<id>:<pid>:<creator>`).
        tag: String,
        /// From sending to the answer.
        latency: Duration,
    },
    /// The component did not answer, or could not be asked: the node's `code` (`not_answering`,
    /// `unknown_component`, ...) and message.
    Failed {
        /// Machine-readable reason.
        code: String,
        /// What happened.
        message: String,
    },
}

/// How a kill ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Killed {
    /// The component was killed (after what it started).
    Done {
        /// True when its stop was confirmed (false: given up on after its grace).
        stopped: bool,
        /// Components it started that did not report back in time.
        unanswered: Vec<ComponentId>,
    },
    /// The node refused: `unknown_component`, `not_killable`, `expired`, `forbidden`, ...
    Refused {
        /// Machine-readable reason.
        code: String,
        /// What happened.
        message: String,
    },
}

/// A control request from this client: a conversation id, the client as creator, expiring after
/// `wait`.
fn request(body: Body, id: u64, wait: Duration) -> Message {
    let now = now_ms();
    let header = Header {
        id,
        pid: None,
        creator: "nodus-client".into(),
        created_at: now,
        expires_at: now.saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX)),
    };
    ControlMessage { header, body }.to_message()
}

impl Client {
    /// The components of this node, or with `cluster` of every live node (rows join into one
    /// forest by `pid`: see [`nodus_control::listing::forest`]).
    ///
    /// Fails when the request fails or the answer cannot be read.
    pub async fn tree(&self, cluster: bool) -> Result<Listing, ControlError> {
        let mut m = Message::new("TREE").to(SERVICE);
        if cluster {
            m = m.param("scope", "cluster");
        }
        let reply = self.request(m).await?;
        if reply.command != "TREE" {
            return Err(ControlError::Malformed(format!("{} instead of TREE", reply.command)));
        }
        let rows = listing::decode(&reply.payload).map_err(ControlError::Malformed)?;
        let missing =
            reply.get("missing").unwrap_or("").split(',').filter(|s| !s.is_empty()).map(String::from).collect();
        Ok(Listing { rows, missing })
    }

    /// Monitors `component` on `node` (seed 000 `monitoring`): the request expires after `wait`,
    /// and the component must answer before that.
    ///
    /// Fails when the request itself fails (node unreachable, refused) or the answer cannot be
    /// read; a component that does not answer is [`Monitored::Failed`].
    pub async fn monitor(&self, node: &str, component: ComponentId, wait: Duration) -> Result<Monitored, ControlError> {
        let id = self.next_id();
        let sync_time = now_ms();
        let m =
            request(Body::Monitoring { target: Some(component), sync_time }, id, wait).to(&format!("{node}:{SERVICE}"));
        let start = Instant::now();
        // A little longer than the request lives: the node answers `not_answering` at its expiry.
        let reply = match self.request_with_timeout(m, wait + Duration::from_secs(2)).await {
            Ok(r) => r,
            Err(ClientError::Refused(r)) => {
                return Ok(Monitored::Failed {
                    code: r.code().unwrap_or(&r.reply().command).to_string(),
                    message: r.to_string(),
                })
            }
            Err(e) => return Err(e.into()),
        };
        let latency = start.elapsed();
        let c = ControlMessage::from_message(&reply).map_err(|e| ControlError::Malformed(e.to_string()))?;
        let tag = c.tag().to_string();
        match c.body {
            Body::MonitoringResult { result, .. } => {
                if result.sync_time != sync_time {
                    return Err(ControlError::Malformed(format!(
                        "sync_time {} echoed for {sync_time}",
                        result.sync_time
                    )));
                }
                Ok(Monitored::Answered { result, creator: c.header.creator, tag, latency })
            }
            Body::Error { code, message, .. } => Ok(Monitored::Failed { code, message }),
            other => Err(ControlError::Malformed(format!("{other:?} answering MONITORING"))),
        }
    }

    /// Kills `component` on `node` (seed 000 `kill`, needs `admin`): what it started first, then
    /// it; waits at most `wait`.
    ///
    /// Fails when the request itself fails or the answer cannot be read; the node's refusals are
    /// [`Killed::Refused`].
    pub async fn kill(&self, node: &str, component: ComponentId, wait: Duration) -> Result<Killed, ControlError> {
        let id = self.next_id();
        let m = request(Body::Kill { target: Some(component) }, id, wait).to(&format!("{node}:{SERVICE}"));
        let reply = match self.request_with_timeout(m, wait + Duration::from_secs(2)).await {
            Ok(r) => r,
            Err(ClientError::Refused(r)) => {
                return Ok(Killed::Refused {
                    code: r.code().unwrap_or(&r.reply().command).to_string(),
                    message: r.to_string(),
                })
            }
            Err(e) => return Err(e.into()),
        };
        let c = ControlMessage::from_message(&reply).map_err(|e| ControlError::Malformed(e.to_string()))?;
        match c.body {
            Body::KillResult { stopped, unanswered, .. } => Ok(Killed::Done { stopped, unanswered }),
            Body::Error { code, message, spec: Spec::Kill, .. } => Ok(Killed::Refused { code, message }),
            other => Err(ControlError::Malformed(format!("{other:?} answering KILL"))),
        }
    }
}
