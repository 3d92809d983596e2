//! The manager/worker messages of seed 002, typed, on [`nodus_wire::Message`].
//!
//! Every message is a request or an answer. A request carries its id in `_id`; its answer
//! carries the same id in `_reply_to` (the router restores the caller's id on the reply, so ids
//! survive every hop). The seed's names become commands in the house's upper-case form:
//!
//! | seed message | command | parameters | payload |
//! |---|---|---|---|
//! | `NodeTypeRequest { node_type }` | `NODE_TYPE_REQUEST` | `node_type` | |
//! | `> NodeTypeAnswer { node_type }` | `NODE_TYPE_ANSWER` | `node_type` | |
//! | `ManagerRequest { cores, memory, ... }` | `MANAGER_REQUEST` | `cores`, `memory`, `concurrency`, `queue`, `ip`, `mac` | JSON `{"apps": [...], "procedures": [...]}` |
//! | `> ManagerAnswer { accepted }` | `MANAGER_ANSWER` | `accepted` | |
//! | `ManagerBye` | `MANAGER_BYE` | | |
//! | `ManagerPing` / `> ManagerPong` | `MANAGER_PING` / `MANAGER_PONG` | | |
//! | `> NotMine` | `NOT_MINE` | | |
//! | `> Ack` | `ACK` | | |
//! | `TasksExecute { tasks }` | `TASKS_EXECUTE` | | JSON array of tasks |
//! | `> ` refusal (the seed's TODO) | `TASKS_REFUSED` | | JSON array of `{task_id, reason, message}` |
//! | `TasksPing { tasks }` | `TASKS_PING` | | JSON array of ids |
//! | `> TasksPong { tasks_status }` | `TASKS_PONG` | | JSON array of `{task_id, lease, status, ...}` |
//! | `TasksAbort { tasks }` (the seed's `TasksAbord`) | `TASKS_ABORT` | | JSON array of ids |
//! | `TaskStarted { task_id, datetime }` | `TASK_STARTED` | `task_id`, `lease`, `datetime` | |
//! | `TaskError { task_id, error }` | `TASK_ERROR` | `task_id`, `lease`, `error`, `message` | |
//! | `TaskCompleted { task_id, result }` | `TASK_COMPLETED` | `task_id`, `lease`, (`size`, `hash` when held) | the result's JSON text (inline) |
//! | (apps and large results) `Fetch` | `FETCH` | `blob`, `app`/`version`/`hash` or `task_id`/`lease`, `offset`, `max_len` | |
//! | `> FetchChunk` | `FETCH_CHUNK` | `total`, `offset` | the bytes |
//! | `> FetchMissing` | `FETCH_MISSING` | `reason` | |
//!
//! Task lists and statuses travel as JSON because task arguments and results are JSON text from
//! the client to the store and back: they are embedded as they are, never parsed and encoded
//! again. Every decoder is total (garbage gives a [`DecodeError`], never a panic) and bounded:
//! lists hold at most [`MAX_LIST`] entries, names [`MAX_NAME`] bytes, texts [`MAX_TEXT`] bytes,
//! chunks [`MAX_CHUNK`] bytes.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use nodus_wire::Message;
use serde::{Deserialize, Serialize};

use crate::task::{json, ErrorKind, Json, Lease, TaskId, UnixMs};

/// Most entries in any list of a message (tasks, statuses, refusals, apps, procedures).
pub const MAX_LIST: usize = 1024;
/// Longest name (app, version, procedure, ip, mac), in bytes.
pub const MAX_NAME: usize = 255;
/// Longest free text (error messages, reasons), in bytes; longer texts are cut on encoding.
pub const MAX_TEXT: usize = 4096;
/// Largest chunk of a fetched package or result, in bytes.
pub const MAX_CHUNK: usize = 1 << 20;

/// The role of a node (seed 002's `NodeType`, plus the default role of a node that takes part
/// in neither: it runs its tasks itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeType {
    /// Keeps the task store and the agent registry; dispatches tasks to its worker nodes.
    Manager,
    /// Runs the tasks its one manager sends.
    Worker,
    /// Runs its own tasks; answers `NotMine` to every manager/worker message.
    Standalone,
}

impl NodeType {
    /// The word used on the wire and in configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeType::Manager => "manager",
            NodeType::Worker => "worker",
            NodeType::Standalone => "standalone",
        }
    }
}

impl fmt::Display for NodeType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NodeType {
    type Err = String;

    fn from_str(s: &str) -> Result<NodeType, String> {
        match s {
            "manager" => Ok(NodeType::Manager),
            "worker" => Ok(NodeType::Worker),
            "standalone" => Ok(NodeType::Standalone),
            _ => Err(format!("unknown node type {:?}; use manager, worker or standalone", clip(s, 32))),
        }
    }
}

/// One version of an app's package, named by its content: what a task needs and what a worker
/// node has.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AppPackage {
    /// The app's name.
    pub app: String,
    /// Its version, as deployed.
    pub version: String,
    /// SHA-256 of the package's bytes, 64 lower-case hex digits.
    pub hash: String,
    /// The package's size in bytes.
    pub size: u64,
}

/// What a worker node declares about itself in `ManagerRequest` (seed 002 leaves all but
/// `cores` and `memory` to be decided).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Specs {
    /// Processor cores it has.
    pub cores: u32,
    /// Memory it has, in bytes.
    pub memory: u64,
    /// Tasks it runs at once.
    pub concurrency: u32,
    /// Tasks it accepts beyond those, waiting for a slot.
    pub queue: u32,
    /// Its address, as it knows it (for the agent registry).
    pub ip: String,
    /// The MAC address of the interface carrying that address (`00:00:00:00:00:00` on loopback).
    pub mac: String,
    /// The app packages it has.
    pub apps: Vec<AppPackage>,
    /// The procedures (`APP.EVENT`) its apps declare.
    pub procedures: Vec<String>,
}

/// One task handed to a worker node in `TasksExecute`.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    /// The task.
    pub id: TaskId,
    /// This attempt's lease: every report about it carries it back.
    pub lease: Lease,
    /// This attempt's number (1 for the first).
    pub attempt: u32,
    /// `APP.EVENT`.
    pub procedure: String,
    /// The app that runs it.
    pub app: String,
    /// Its positional arguments (a JSON array).
    pub args: Json,
    /// Longest the attempt may run, counted from when the worker node accepts it.
    pub timeout: Duration,
    /// The app package the task needs, when the manager knows it: a worker node that lacks it
    /// fetches it first.
    pub package: Option<AppPackage>,
    /// The latest time (the manager's clock) the attempt may start: a worker node still holding
    /// it then does not start it (`deadline_ms` on the wire; absent from older managers, and
    /// ignored by older workers, whose manager's claim is then the only check).
    pub deadline: Option<UnixMs>,
}

impl PartialEq for TaskSpec {
    fn eq(&self, o: &TaskSpec) -> bool {
        self.id == o.id
            && self.lease == o.lease
            && self.attempt == o.attempt
            && self.procedure == o.procedure
            && self.app == o.app
            && self.args.get() == o.args.get()
            && self.timeout == o.timeout
            && self.package == o.package
            && self.deadline == o.deadline
    }
}

/// Why a worker node refused a task of a `TasksExecute`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefuseReason {
    /// It already holds as many tasks as it declared (concurrency plus queue).
    Busy,
    /// It is shutting down.
    ShuttingDown,
    /// The task is out of its bounds (arguments too large, a timeout of zero).
    Invalid,
}

impl RefuseReason {
    /// The word on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            RefuseReason::Busy => "busy",
            RefuseReason::ShuttingDown => "shutting_down",
            RefuseReason::Invalid => "invalid",
        }
    }
}

impl FromStr for RefuseReason {
    type Err = String;

    fn from_str(s: &str) -> Result<RefuseReason, String> {
        [RefuseReason::Busy, RefuseReason::ShuttingDown, RefuseReason::Invalid]
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown refusal reason {:?}", clip(s, 32)))
    }
}

/// One refused task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The task.
    pub task_id: TaskId,
    /// Why.
    pub reason: RefuseReason,
    /// For people.
    pub message: String,
}

/// A task's status on a worker node (seed 002's `TaskStatus`).
#[derive(Debug, Clone)]
pub enum TaskStatus {
    /// Accepted, waiting to start (for a slot, or for its app's package).
    Pending,
    /// Started at this time (the worker node's clock, Unix milliseconds).
    Started(UnixMs),
    /// Ended with this error (its `TaskError` report is on its way).
    Error(ErrorKind),
    /// Completed. The result is here when it fits the answer; otherwise (`None`) it comes with
    /// the task's `TaskCompleted`.
    Completed(Option<Json>),
    /// The worker node does not know this task (or this attempt of it).
    Unknown,
}

impl PartialEq for TaskStatus {
    fn eq(&self, o: &TaskStatus) -> bool {
        match (self, o) {
            (TaskStatus::Pending, TaskStatus::Pending) | (TaskStatus::Unknown, TaskStatus::Unknown) => true,
            (TaskStatus::Started(a), TaskStatus::Started(b)) => a == b,
            (TaskStatus::Error(a), TaskStatus::Error(b)) => a == b,
            (TaskStatus::Completed(a), TaskStatus::Completed(b)) => {
                a.as_ref().map(|j| j.get()) == b.as_ref().map(|j| j.get())
            }
            _ => false,
        }
    }
}

/// One entry of a `TasksPong`.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskReport {
    /// The task.
    pub task_id: TaskId,
    /// The attempt the status is about (`Lease(0)` when unknown).
    pub lease: Lease,
    /// Its status.
    pub status: TaskStatus,
}

/// A completed task's result in `TaskCompleted`.
#[derive(Debug, Clone)]
pub enum ResultBody {
    /// The result itself.
    Inline(Json),
    /// Too large to travel inline: the worker node holds it, and the manager fetches it
    /// ([`Blob::Result`]) and checks it against `hash`.
    Held {
        /// Its size in bytes (of its JSON text).
        size: u64,
        /// SHA-256 of its JSON text, lower-case hex.
        hash: String,
    },
}

impl PartialEq for ResultBody {
    fn eq(&self, o: &ResultBody) -> bool {
        match (self, o) {
            (ResultBody::Inline(a), ResultBody::Inline(b)) => a.get() == b.get(),
            (ResultBody::Held { size: a, hash: h }, ResultBody::Held { size: b, hash: g }) => a == b && h == g,
            _ => false,
        }
    }
}

/// Something fetched in chunks over the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Blob {
    /// An app's package, from the manager.
    Package {
        /// The app.
        app: String,
        /// Its version.
        version: String,
        /// Its content hash.
        hash: String,
    },
    /// A large result a worker node holds.
    Result {
        /// The task.
        task_id: TaskId,
        /// The attempt that produced it.
        lease: Lease,
    },
}

/// The body of a manager/worker message.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// Asks the receiver's type and tells the sender's.
    NodeTypeRequest {
        /// The sender's type.
        node_type: NodeType,
    },
    /// Answer to `NodeTypeRequest`: the answerer's type.
    NodeTypeAnswer {
        /// The answerer's type.
        node_type: NodeType,
    },
    /// A worker node asks to be managed, declaring what it has.
    ManagerRequest(Specs),
    /// Answer to `ManagerRequest`.
    ManagerAnswer {
        /// Whether the manager takes the worker node.
        accepted: bool,
    },
    /// The sender stops acting as the receiver's manager or worker. Answered `Ack`.
    ManagerBye,
    /// Checks the relationship. Answered `ManagerPong` or `NotMine`.
    ManagerPing,
    /// Answer to `ManagerPing`: still in a relationship.
    ManagerPong,
    /// Answer to a relationship message from a node the answerer is not in a relationship with.
    NotMine,
    /// Answer when nothing more is to be said.
    Ack,
    /// A manager hands tasks to its worker node. Answered `Ack` (all taken), `TasksRefused`
    /// (those listed are refused, the others taken) or `NotMine`.
    TasksExecute {
        /// The tasks.
        tasks: Vec<TaskSpec>,
    },
    /// Answer to `TasksExecute` (the seed's TODO): these tasks are refused; the others are taken.
    TasksRefused {
        /// The refused tasks.
        tasks: Vec<Refusal>,
    },
    /// A manager asks its worker node about tasks. Answered `TasksPong` or `NotMine`.
    TasksPing {
        /// The tasks.
        tasks: Vec<TaskId>,
    },
    /// Answer to `TasksPing`: one entry per task asked, in any order.
    TasksPong {
        /// The statuses.
        tasks_status: Vec<TaskReport>,
    },
    /// A manager tells its worker node to stop working on tasks (running ones are killed,
    /// waiting ones dropped); neither side talks about them any more. Answered `Ack`/`NotMine`.
    TasksAbort {
        /// The tasks.
        tasks: Vec<TaskId>,
    },
    /// A worker node tells its manager a task started. Answered `Ack`/`NotMine`.
    TaskStarted {
        /// The task.
        task_id: TaskId,
        /// The attempt.
        lease: Lease,
        /// When it started (the worker node's clock, Unix milliseconds).
        datetime: UnixMs,
    },
    /// A worker node tells its manager a task failed. Answered `Ack`/`NotMine`.
    TaskError {
        /// The task.
        task_id: TaskId,
        /// The attempt.
        lease: Lease,
        /// What kind of failure.
        error: ErrorKind,
        /// What happened.
        message: String,
    },
    /// A worker node tells its manager a task completed. Answered `Ack` (once the result is
    /// recorded) or `NotMine`.
    TaskCompleted {
        /// The task.
        task_id: TaskId,
        /// The attempt.
        lease: Lease,
        /// The result, or where to get it.
        result: ResultBody,
    },
    /// Asks for a chunk of a package (to the manager) or of a held result (to the worker node).
    /// Answered `FetchChunk`, `FetchMissing` or `NotMine`.
    Fetch {
        /// What.
        blob: Blob,
        /// From this byte.
        offset: u64,
        /// At most this many bytes.
        max_len: u32,
    },
    /// Answer to `Fetch`: the bytes from `offset` (fewer than asked only at the end).
    FetchChunk {
        /// The blob's whole size.
        total: u64,
        /// Where these bytes start.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Answer to `Fetch`: there is no such blob.
    FetchMissing {
        /// Why.
        reason: String,
    },
}

impl Body {
    /// The command that carries it.
    pub fn command(&self) -> &'static str {
        match self {
            Body::NodeTypeRequest { .. } => "NODE_TYPE_REQUEST",
            Body::NodeTypeAnswer { .. } => "NODE_TYPE_ANSWER",
            Body::ManagerRequest(_) => "MANAGER_REQUEST",
            Body::ManagerAnswer { .. } => "MANAGER_ANSWER",
            Body::ManagerBye => "MANAGER_BYE",
            Body::ManagerPing => "MANAGER_PING",
            Body::ManagerPong => "MANAGER_PONG",
            Body::NotMine => "NOT_MINE",
            Body::Ack => "ACK",
            Body::TasksExecute { .. } => "TASKS_EXECUTE",
            Body::TasksRefused { .. } => "TASKS_REFUSED",
            Body::TasksPing { .. } => "TASKS_PING",
            Body::TasksPong { .. } => "TASKS_PONG",
            Body::TasksAbort { .. } => "TASKS_ABORT",
            Body::TaskStarted { .. } => "TASK_STARTED",
            Body::TaskError { .. } => "TASK_ERROR",
            Body::TaskCompleted { .. } => "TASK_COMPLETED",
            Body::Fetch { .. } => "FETCH",
            Body::FetchChunk { .. } => "FETCH_CHUNK",
            Body::FetchMissing { .. } => "FETCH_MISSING",
        }
    }

    /// Whether it answers a request (else it is a request, which is always answered).
    pub fn is_answer(&self) -> bool {
        matches!(
            self,
            Body::NodeTypeAnswer { .. }
                | Body::ManagerAnswer { .. }
                | Body::ManagerPong
                | Body::NotMine
                | Body::Ack
                | Body::TasksRefused { .. }
                | Body::TasksPong { .. }
                | Body::FetchChunk { .. }
                | Body::FetchMissing { .. }
        )
    }
}

/// Every command of this protocol.
pub const COMMANDS: [&str; 20] = [
    "NODE_TYPE_REQUEST",
    "NODE_TYPE_ANSWER",
    "MANAGER_REQUEST",
    "MANAGER_ANSWER",
    "MANAGER_BYE",
    "MANAGER_PING",
    "MANAGER_PONG",
    "NOT_MINE",
    "ACK",
    "TASKS_EXECUTE",
    "TASKS_REFUSED",
    "TASKS_PING",
    "TASKS_PONG",
    "TASKS_ABORT",
    "TASK_STARTED",
    "TASK_ERROR",
    "TASK_COMPLETED",
    "FETCH",
    "FETCH_CHUNK",
    "FETCH_MISSING",
];

/// A message of the protocol: a request with its id, or an answer with the id it answers.
#[derive(Debug, Clone, PartialEq)]
pub struct Packet {
    /// For a request its id (`_id`), for an answer the request's id (`_reply_to`). Never 0.
    pub id: u64,
    /// What it says.
    pub body: Body,
}

/// Why a message is not one of this protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The command is not one of this protocol's.
    #[error("{0:?} is not a manager/worker command")]
    Unknown(String),
    /// The command is, but the message is wrong: which part, and why.
    #[error("{command}: {reason}")]
    Malformed {
        /// The command.
        command: &'static str,
        /// What to fix.
        reason: String,
    },
}

fn clip(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// `s` cut to at most [`MAX_TEXT`] bytes (at a character boundary).
pub fn clip_text(s: &str) -> String {
    clip(s, MAX_TEXT)
}

/// Whether `s` is a SHA-256 in lower-case hex.
pub fn valid_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

// ---- JSON payload forms ----

#[derive(Serialize, Deserialize)]
struct SpecsExtra {
    #[serde(default)]
    apps: Vec<AppPackage>,
    #[serde(default)]
    procedures: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct WireTask {
    id: String,
    lease: u64,
    attempt: u32,
    procedure: String,
    app: String,
    args: Json,
    timeout_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    package: Option<AppPackage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    deadline_ms: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct WireRefusal {
    task_id: String,
    reason: String,
    #[serde(default)]
    message: String,
}

#[derive(Serialize, Deserialize)]
struct WireReport {
    task_id: String,
    lease: u64,
    status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    datetime: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// Present (even `null`): the result inline; absent: held.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "present")]
    result: Option<Json>,
}

/// A field that is there, whatever its value (`null` too): `Some`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Json>, D::Error> {
    Json::deserialize(d).map(Some)
}

impl Packet {
    /// A request or answer with `id`.
    pub fn new(id: u64, body: Body) -> Packet {
        Packet { id, body }
    }

    /// The message that carries it (no addresses: the sender sets `to`, the router `from`).
    pub fn to_message(&self) -> Message {
        let mut m = Message::new(self.body.command());
        if self.body.is_answer() {
            m.envelope.reply_to = self.id;
        } else {
            m.envelope.id = self.id;
        }
        match &self.body {
            Body::NodeTypeRequest { node_type } | Body::NodeTypeAnswer { node_type } => {
                m = m.param("node_type", node_type.as_str());
            }
            Body::ManagerRequest(s) => {
                m = m
                    .param("cores", s.cores)
                    .param("memory", s.memory)
                    .param("concurrency", s.concurrency)
                    .param("queue", s.queue)
                    .param("ip", &s.ip)
                    .param("mac", &s.mac);
                let extra = SpecsExtra { apps: s.apps.clone(), procedures: s.procedures.clone() };
                m = m.with_payload(to_json(&extra));
            }
            Body::ManagerAnswer { accepted } => m = m.param("accepted", accepted),
            Body::ManagerBye | Body::ManagerPing | Body::ManagerPong | Body::NotMine | Body::Ack => {}
            Body::TasksExecute { tasks } => {
                let wire: Vec<WireTask> = tasks
                    .iter()
                    .map(|t| WireTask {
                        id: t.id.to_string(),
                        lease: t.lease.0,
                        attempt: t.attempt,
                        procedure: t.procedure.clone(),
                        app: t.app.clone(),
                        args: t.args.clone(),
                        timeout_ms: u64::try_from(t.timeout.as_millis()).unwrap_or(u64::MAX),
                        package: t.package.clone(),
                        deadline_ms: t.deadline.map(|d| d.0),
                    })
                    .collect();
                m = m.with_payload(to_json(&wire));
            }
            Body::TasksRefused { tasks } => {
                let wire: Vec<WireRefusal> = tasks
                    .iter()
                    .map(|r| WireRefusal {
                        task_id: r.task_id.to_string(),
                        reason: r.reason.as_str().to_string(),
                        message: clip_text(&r.message),
                    })
                    .collect();
                m = m.with_payload(to_json(&wire));
            }
            Body::TasksPing { tasks } | Body::TasksAbort { tasks } => {
                let wire: Vec<&str> = tasks.iter().map(TaskId::as_str).collect();
                m = m.with_payload(to_json(&wire));
            }
            Body::TasksPong { tasks_status } => {
                let wire: Vec<WireReport> = tasks_status.iter().map(report_to_wire).collect();
                m = m.with_payload(to_json(&wire));
            }
            Body::TaskStarted { task_id, lease, datetime } => {
                m = m.param("task_id", task_id).param("lease", lease.0).param("datetime", datetime.0);
            }
            Body::TaskError { task_id, lease, error, message } => {
                m = m
                    .param("task_id", task_id)
                    .param("lease", lease.0)
                    .param("error", error.as_str())
                    .param("message", clip_text(message));
            }
            Body::TaskCompleted { task_id, lease, result } => {
                m = m.param("task_id", task_id).param("lease", lease.0);
                match result {
                    ResultBody::Inline(j) => m = m.with_payload(j.get().as_bytes().to_vec()),
                    ResultBody::Held { size, hash } => m = m.param("size", size).param("hash", hash),
                }
            }
            Body::Fetch { blob, offset, max_len } => {
                match blob {
                    Blob::Package { app, version, hash } => {
                        m = m.param("blob", "package").param("app", app).param("version", version).param("hash", hash)
                    }
                    Blob::Result { task_id, lease } => {
                        m = m.param("blob", "result").param("task_id", task_id).param("lease", lease.0)
                    }
                }
                m = m.param("offset", offset).param("max_len", max_len);
            }
            Body::FetchChunk { total, offset, data } => {
                m = m.param("total", total).param("offset", offset).with_payload(data.clone());
            }
            Body::FetchMissing { reason } => m = m.param("reason", clip_text(reason)),
        }
        m
    }

    /// Reads a message of this protocol.
    ///
    /// # Errors
    /// [`DecodeError::Unknown`] for another command; [`DecodeError::Malformed`] naming the part
    /// to fix for a missing or bad parameter, a bad payload, a list over [`MAX_LIST`], a name
    /// over [`MAX_NAME`], a chunk over [`MAX_CHUNK`], or a missing `_id`/`_reply_to`.
    pub fn from_message(m: &Message) -> Result<Packet, DecodeError> {
        let Some(&command) = COMMANDS.iter().find(|c| **c == m.command) else {
            return Err(DecodeError::Unknown(clip(&m.command, 64)));
        };
        let r = Reader { m, command };
        let body = r.body()?;
        let id = if body.is_answer() { m.envelope.reply_to } else { m.envelope.id };
        if id == 0 {
            let which = if body.is_answer() { "_reply_to" } else { "_id" };
            return Err(r.bad(format!("{which} is missing: every request has an id and every answer names it")));
        }
        Ok(Packet { id, body })
    }
}

fn report_to_wire(r: &TaskReport) -> WireReport {
    let mut w = WireReport {
        task_id: r.task_id.to_string(),
        lease: r.lease.0,
        status: String::new(),
        datetime: None,
        error: None,
        result: None,
    };
    w.status = match &r.status {
        TaskStatus::Pending => "pending",
        TaskStatus::Started(at) => {
            w.datetime = Some(at.0);
            "started"
        }
        TaskStatus::Error(kind) => {
            w.error = Some(kind.as_str().to_string());
            "error"
        }
        TaskStatus::Completed(result) => {
            w.result = result.clone();
            "completed"
        }
        TaskStatus::Unknown => "unknown",
    }
    .to_string();
    w
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain structures (strings, numbers, raw JSON that was valid when it was
    // made) cannot fail.
    serde_json::to_vec(v).unwrap_or_else(|_| b"null".to_vec())
}

struct Reader<'a> {
    m: &'a Message,
    command: &'static str,
}

impl Reader<'_> {
    fn bad(&self, reason: impl Into<String>) -> DecodeError {
        DecodeError::Malformed { command: self.command, reason: reason.into() }
    }

    fn text(&self, name: &str) -> Result<&str, DecodeError> {
        self.m.get(name).ok_or_else(|| self.bad(format!("parameter {name} is missing")))
    }

    fn name(&self, name: &str) -> Result<String, DecodeError> {
        let v = self.text(name)?;
        if v.len() > MAX_NAME {
            return Err(self.bad(format!("{name} is longer than {MAX_NAME} bytes")));
        }
        Ok(v.to_string())
    }

    fn num<T: FromStr>(&self, name: &str) -> Result<T, DecodeError> {
        let v = self.text(name)?;
        v.parse().map_err(|_| self.bad(format!("{name}={:?} is not a number in range", clip(v, 32))))
    }

    fn task_id(&self, v: &str) -> Result<TaskId, DecodeError> {
        v.parse().map_err(|e| self.bad(format!("task id {:?}: {e}", clip(v, 64))))
    }

    fn lease(&self) -> Result<Lease, DecodeError> {
        let l: u64 = self.num("lease")?;
        if l == 0 {
            return Err(self.bad("lease must be at least 1"));
        }
        Ok(Lease(l))
    }

    fn hash(&self, v: &str) -> Result<String, DecodeError> {
        if !valid_hash(v) {
            return Err(self.bad(format!("hash {:?} is not a SHA-256 in lower-case hex", clip(v, 80))));
        }
        Ok(v.to_string())
    }

    fn node_type(&self) -> Result<NodeType, DecodeError> {
        self.text("node_type")?.parse().map_err(|e: String| self.bad(e))
    }

    fn payload<T: serde::de::DeserializeOwned>(&self) -> Result<T, DecodeError> {
        serde_json::from_slice(&self.m.payload[..]).map_err(|e| self.bad(format!("payload: {e}")))
    }

    fn list<T: serde::de::DeserializeOwned>(&self) -> Result<Vec<T>, DecodeError> {
        let v: Vec<T> = self.payload()?;
        if v.len() > MAX_LIST {
            return Err(self.bad(format!("{} entries; at most {MAX_LIST}", v.len())));
        }
        Ok(v)
    }

    fn package(&self, p: AppPackage) -> Result<AppPackage, DecodeError> {
        if p.app.is_empty() || p.app.len() > MAX_NAME || p.version.len() > MAX_NAME {
            return Err(self.bad(format!("app package {:?}: bad app or version", clip(&p.app, 64))));
        }
        self.hash(&p.hash)?;
        Ok(p)
    }

    fn ids(&self) -> Result<Vec<TaskId>, DecodeError> {
        self.list::<String>()?.iter().map(|s| self.task_id(s)).collect()
    }

    fn body(&self) -> Result<Body, DecodeError> {
        Ok(match self.command {
            "NODE_TYPE_REQUEST" => Body::NodeTypeRequest { node_type: self.node_type()? },
            "NODE_TYPE_ANSWER" => Body::NodeTypeAnswer { node_type: self.node_type()? },
            "MANAGER_REQUEST" => {
                let extra: SpecsExtra = if self.m.payload.is_empty() {
                    SpecsExtra { apps: vec![], procedures: vec![] }
                } else {
                    self.payload()?
                };
                if extra.apps.len() > MAX_LIST || extra.procedures.len() > MAX_LIST {
                    return Err(self.bad(format!("at most {MAX_LIST} apps and {MAX_LIST} procedures")));
                }
                let apps = extra.apps.into_iter().map(|p| self.package(p)).collect::<Result<_, _>>()?;
                if let Some(p) = extra.procedures.iter().find(|p| p.is_empty() || p.len() > MAX_NAME) {
                    return Err(self.bad(format!("procedure {:?} is empty or too long", clip(p, 64))));
                }
                Body::ManagerRequest(Specs {
                    cores: self.num("cores")?,
                    memory: self.num("memory")?,
                    concurrency: self.num("concurrency")?,
                    queue: self.num("queue")?,
                    ip: self.name("ip")?,
                    mac: self.name("mac")?,
                    apps,
                    procedures: extra.procedures,
                })
            }
            "MANAGER_ANSWER" => Body::ManagerAnswer {
                accepted: match self.text("accepted")? {
                    "true" => true,
                    "false" => false,
                    v => return Err(self.bad(format!("accepted={:?}; use true or false", clip(v, 16)))),
                },
            },
            "MANAGER_BYE" => Body::ManagerBye,
            "MANAGER_PING" => Body::ManagerPing,
            "MANAGER_PONG" => Body::ManagerPong,
            "NOT_MINE" => Body::NotMine,
            "ACK" => Body::Ack,
            "TASKS_EXECUTE" => {
                let mut tasks = Vec::new();
                for w in self.list::<WireTask>()? {
                    if w.lease == 0 || w.attempt == 0 {
                        return Err(self.bad("a task's lease and attempt are at least 1"));
                    }
                    if w.procedure.is_empty()
                        || w.procedure.len() > MAX_NAME
                        || w.app.is_empty()
                        || w.app.len() > MAX_NAME
                    {
                        return Err(self.bad("a task's procedure and app are 1 to 255 bytes"));
                    }
                    if !w.args.get().starts_with('[') {
                        return Err(self.bad("a task's args are a JSON array"));
                    }
                    tasks.push(TaskSpec {
                        id: self.task_id(&w.id)?,
                        lease: Lease(w.lease),
                        attempt: w.attempt,
                        procedure: w.procedure,
                        app: w.app,
                        args: w.args,
                        timeout: Duration::from_millis(w.timeout_ms),
                        package: w.package.map(|p| self.package(p)).transpose()?,
                        deadline: w.deadline_ms.map(UnixMs),
                    });
                }
                Body::TasksExecute { tasks }
            }
            "TASKS_REFUSED" => {
                let mut tasks = Vec::new();
                for w in self.list::<WireRefusal>()? {
                    if w.message.len() > MAX_TEXT {
                        return Err(self.bad(format!("a refusal's message is longer than {MAX_TEXT} bytes")));
                    }
                    tasks.push(Refusal {
                        task_id: self.task_id(&w.task_id)?,
                        reason: w.reason.parse().map_err(|e: String| self.bad(e))?,
                        message: w.message,
                    });
                }
                Body::TasksRefused { tasks }
            }
            "TASKS_PING" => Body::TasksPing { tasks: self.ids()? },
            "TASKS_ABORT" => Body::TasksAbort { tasks: self.ids()? },
            "TASKS_PONG" => {
                let mut tasks_status = Vec::new();
                for w in self.list::<WireReport>()? {
                    let status = match (w.status.as_str(), w.datetime, &w.error) {
                        ("pending", ..) => TaskStatus::Pending,
                        ("started", Some(at), _) => TaskStatus::Started(UnixMs(at)),
                        ("error", _, Some(e)) => TaskStatus::Error(e.parse().map_err(|e: String| self.bad(e))?),
                        ("completed", ..) => TaskStatus::Completed(w.result),
                        ("unknown", ..) => TaskStatus::Unknown,
                        (s, ..) => {
                            return Err(self.bad(format!(
                                "status {:?}: use pending, started (with datetime), error (with error), completed or unknown",
                                clip(s, 32)
                            )))
                        }
                    };
                    tasks_status.push(TaskReport { task_id: self.task_id(&w.task_id)?, lease: Lease(w.lease), status });
                }
                Body::TasksPong { tasks_status }
            }
            "TASK_STARTED" => Body::TaskStarted {
                task_id: self.task_id(self.text("task_id")?)?,
                lease: self.lease()?,
                datetime: UnixMs(self.num("datetime")?),
            },
            "TASK_ERROR" => {
                let message = self.m.get("message").unwrap_or_default();
                if message.len() > MAX_TEXT {
                    return Err(self.bad(format!("message is longer than {MAX_TEXT} bytes")));
                }
                Body::TaskError {
                    task_id: self.task_id(self.text("task_id")?)?,
                    lease: self.lease()?,
                    error: self.text("error")?.parse().map_err(|e: String| self.bad(e))?,
                    message: message.to_string(),
                }
            }
            "TASK_COMPLETED" => {
                let result = match self.m.get("hash") {
                    Some(h) => {
                        if !self.m.payload.is_empty() {
                            return Err(self.bad("a held result has no payload"));
                        }
                        ResultBody::Held { size: self.num("size")?, hash: self.hash(h)? }
                    }
                    None => {
                        let text = std::str::from_utf8(&self.m.payload[..])
                            .map_err(|_| self.bad("the result is not UTF-8 JSON"))?;
                        ResultBody::Inline(json(text).map_err(|e| self.bad(format!("the result is not JSON: {e}")))?)
                    }
                };
                Body::TaskCompleted { task_id: self.task_id(self.text("task_id")?)?, lease: self.lease()?, result }
            }
            "FETCH" => {
                let blob = match self.text("blob")? {
                    "package" => Blob::Package {
                        app: self.name("app")?,
                        version: self.name("version")?,
                        hash: self.hash(self.text("hash")?)?,
                    },
                    "result" => Blob::Result { task_id: self.task_id(self.text("task_id")?)?, lease: self.lease()? },
                    b => return Err(self.bad(format!("blob={:?}; use package or result", clip(b, 16)))),
                };
                let max_len: u32 = self.num("max_len")?;
                if max_len == 0 || max_len as usize > MAX_CHUNK {
                    return Err(self.bad(format!("max_len is 1 to {MAX_CHUNK}")));
                }
                Body::Fetch { blob, offset: self.num("offset")?, max_len }
            }
            "FETCH_CHUNK" => {
                if self.m.payload.len() > MAX_CHUNK {
                    return Err(self.bad(format!("a chunk is at most {MAX_CHUNK} bytes")));
                }
                let (total, offset): (u64, u64) = (self.num("total")?, self.num("offset")?);
                if offset.checked_add(self.m.payload.len() as u64).is_none_or(|end| end > total) {
                    return Err(self.bad("the chunk ends past total"));
                }
                Body::FetchChunk { total, offset, data: self.m.payload.to_vec() }
            }
            "FETCH_MISSING" => {
                let reason = self.text("reason")?;
                if reason.len() > MAX_TEXT {
                    return Err(self.bad(format!("reason is longer than {MAX_TEXT} bytes")));
                }
                Body::FetchMissing { reason: reason.to_string() }
            }
            _ => return Err(DecodeError::Unknown(self.command.to_string())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> TaskId {
        s.parse().unwrap()
    }

    fn pkg() -> AppPackage {
        AppPackage { app: "procs".into(), version: "3".into(), hash: "ab".repeat(32), size: 1234 }
    }

    /// One of every body, with every variant of its parts.
    pub(crate) fn every_body() -> Vec<Body> {
        let spec = TaskSpec {
            id: id("t1"),
            lease: Lease(7),
            attempt: 2,
            procedure: "procs.add".into(),
            app: "procs".into(),
            args: json("[1, \"two\", {\"x\": null}]").unwrap(),
            timeout: Duration::from_millis(1500),
            package: Some(pkg()),
            deadline: Some(UnixMs(1_700_000_000_123)),
        };
        vec![
            Body::NodeTypeRequest { node_type: NodeType::Worker },
            Body::NodeTypeAnswer { node_type: NodeType::Manager },
            Body::NodeTypeAnswer { node_type: NodeType::Standalone },
            Body::ManagerRequest(Specs {
                cores: 8,
                memory: 16 << 30,
                concurrency: 32,
                queue: 64,
                ip: "10.0.0.2".into(),
                mac: "52:54:00:12:34:56".into(),
                apps: vec![pkg()],
                procedures: vec!["procs.add".into(), "procs.sleep".into()],
            }),
            Body::ManagerRequest(Specs::default()),
            Body::ManagerAnswer { accepted: true },
            Body::ManagerAnswer { accepted: false },
            Body::ManagerBye,
            Body::ManagerPing,
            Body::ManagerPong,
            Body::NotMine,
            Body::Ack,
            Body::TasksExecute {
                tasks: vec![spec.clone(), TaskSpec { package: None, id: id("t2"), deadline: None, ..spec }],
            },
            Body::TasksExecute { tasks: vec![] },
            Body::TasksRefused {
                tasks: vec![
                    Refusal { task_id: id("t1"), reason: RefuseReason::Busy, message: "64 tasks held".into() },
                    Refusal { task_id: id("t2"), reason: RefuseReason::ShuttingDown, message: String::new() },
                    Refusal { task_id: id("t3"), reason: RefuseReason::Invalid, message: "timeout 0".into() },
                ],
            },
            Body::TasksPing { tasks: vec![id("t1"), id("t2")] },
            Body::TasksPong {
                tasks_status: vec![
                    TaskReport { task_id: id("t1"), lease: Lease(1), status: TaskStatus::Pending },
                    TaskReport {
                        task_id: id("t2"),
                        lease: Lease(2),
                        status: TaskStatus::Started(UnixMs(1_700_000_000_123)),
                    },
                    TaskReport {
                        task_id: id("t3"),
                        lease: Lease(3),
                        status: TaskStatus::Error(ErrorKind::DownloadError),
                    },
                    TaskReport {
                        task_id: id("t4"),
                        lease: Lease(4),
                        status: TaskStatus::Completed(Some(json("{\"a\":1}").unwrap())),
                    },
                    TaskReport { task_id: id("t5"), lease: Lease(5), status: TaskStatus::Completed(None) },
                    TaskReport {
                        task_id: id("t7"),
                        lease: Lease(7),
                        status: TaskStatus::Completed(Some(json("null").unwrap())),
                    },
                    TaskReport { task_id: id("t6"), lease: Lease(0), status: TaskStatus::Unknown },
                ],
            },
            Body::TasksAbort { tasks: vec![id("t9")] },
            Body::TaskStarted { task_id: id("t1"), lease: Lease(7), datetime: UnixMs(1_700_000_000_000) },
            Body::TaskError {
                task_id: id("t1"),
                lease: Lease(7),
                error: ErrorKind::TimedOut,
                message: "ran for 1.5 s; x=1;y=\"2\"\nline".into(),
            },
            Body::TaskError {
                task_id: id("t1"),
                lease: Lease(7),
                error: ErrorKind::RunningError,
                message: String::new(),
            },
            Body::TaskCompleted {
                task_id: id("t1"),
                lease: Lease(7),
                result: ResultBody::Inline(json("[1,2]").unwrap()),
            },
            Body::TaskCompleted {
                task_id: id("t1"),
                lease: Lease(7),
                result: ResultBody::Held { size: 20 << 20, hash: "0f".repeat(32) },
            },
            Body::Fetch {
                blob: Blob::Package { app: "procs".into(), version: "3".into(), hash: "ab".repeat(32) },
                offset: 0,
                max_len: 65536,
            },
            Body::Fetch { blob: Blob::Result { task_id: id("t1"), lease: Lease(7) }, offset: 1 << 20, max_len: 1 },
            Body::FetchChunk { total: 10, offset: 4, data: vec![0, 1, 255] },
            Body::FetchChunk { total: 0, offset: 0, data: vec![] },
            Body::FetchMissing { reason: "no package procs v3".into() },
        ]
    }

    #[test]
    fn every_body_round_trips_through_both_wire_forms() {
        let bodies = every_body();
        let mut seen: std::collections::BTreeSet<&str> = Default::default();
        for (n, body) in bodies.into_iter().enumerate() {
            seen.insert(body.command());
            let p = Packet::new(n as u64 + 1, body);
            let m = p.to_message();
            m.validate().unwrap();
            assert_eq!(Packet::from_message(&m).as_ref(), Ok(&p), "{m:?}");
            let line = nodus_wire::text::to_line(&m);
            let back = nodus_wire::text::from_line(&line).unwrap();
            assert_eq!(Packet::from_message(&back).as_ref(), Ok(&p), "{line}");
            let mut buf = bytes::BytesMut::new();
            nodus_wire::binary::encode(&m, &mut buf, nodus_wire::DEFAULT_MAX_FRAME).unwrap();
            let back = nodus_wire::binary::decode_body(&bytes::Bytes::copy_from_slice(&buf[4..])).unwrap();
            assert_eq!(Packet::from_message(&back).as_ref(), Ok(&p));
        }
        assert_eq!(seen.len(), COMMANDS.len(), "every command is covered");
    }

    #[test]
    fn requests_carry_ids_and_answers_name_them() {
        let m = Packet::new(5, Body::ManagerPing).to_message();
        assert_eq!((m.envelope.id, m.envelope.reply_to), (5, 0));
        let m = Packet::new(5, Body::ManagerPong).to_message();
        assert_eq!((m.envelope.id, m.envelope.reply_to), (0, 5));
        let mut m = Packet::new(5, Body::Ack).to_message();
        m.envelope.reply_to = 0;
        assert!(
            matches!(Packet::from_message(&m), Err(DecodeError::Malformed { command: "ACK", reason }) if reason.contains("_reply_to"))
        );
        let mut m = Packet::new(5, Body::ManagerBye).to_message();
        m.envelope.id = 0;
        assert!(
            matches!(Packet::from_message(&m), Err(DecodeError::Malformed { reason, .. }) if reason.contains("_id"))
        );
    }

    #[test]
    fn errors_name_what_to_fix() {
        let m = Message::new("TASK_STARTED").param("task_id", "t").param("lease", "x").with_id(1);
        let e = Packet::from_message(&m).unwrap_err().to_string();
        assert!(e.contains("TASK_STARTED") && e.contains("lease"), "{e}");
        assert_eq!(Packet::from_message(&Message::new("PING")), Err(DecodeError::Unknown("PING".into())));
        let m = Message::new("TASKS_PING").with_payload(b"{}".to_vec()).with_id(1);
        assert!(Packet::from_message(&m).unwrap_err().to_string().contains("payload"));
        let many: Vec<String> = (0..=MAX_LIST).map(|n| format!("t{n}")).collect();
        let m = Message::new("TASKS_ABORT").with_payload(serde_json::to_vec(&many).unwrap()).with_id(1);
        assert!(Packet::from_message(&m).unwrap_err().to_string().contains("at most 1024"));
        let m = Message::new("NODE_TYPE_ANSWER").param("node_type", "boss").with_reply_to(1);
        assert!(Packet::from_message(&m).unwrap_err().to_string().contains("manager, worker or standalone"));
    }

    #[test]
    fn long_texts_are_cut_on_encoding() {
        let p = Packet::new(
            1,
            Body::TaskError {
                task_id: id("t"),
                lease: Lease(1),
                error: ErrorKind::RunningError,
                message: "é".repeat(MAX_TEXT),
            },
        );
        match Packet::from_message(&p.to_message()).unwrap().body {
            Body::TaskError { message, .. } => assert!(message.len() <= MAX_TEXT && message.len() >= MAX_TEXT - 1),
            b => panic!("{b:?}"),
        }
    }

    trait ReplyTo {
        fn with_reply_to(self, id: u64) -> Self;
    }

    impl ReplyTo for Message {
        fn with_reply_to(mut self, id: u64) -> Message {
            self.envelope.reply_to = id;
            self
        }
    }
}
