//! What the dashboard, the API and the metrics read from the node: the [`NodeView`] trait the
//! daemon implements, and the plain data it answers ([`Snapshot`] and its parts).
//!
//! The HTTP crate never reaches into the daemon: it asks a `NodeView` for a snapshot and
//! subscribes to its [`Notice`]s (something changed) to push live updates. Every type here is
//! serialised as JSON exactly as the dashboard and the API show it.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// A boxed future, so [`NodeView`] can be used as a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The node's state as the HTTP side sees it. The daemon implements it over its router,
/// topology, engine, task store and flags.
pub trait NodeView: Send + Sync + 'static {
    /// The whole state, taken now. Implementations keep it cheap (it is called once per
    /// dashboard update and per metrics scrape) and never fail: a part that cannot be read is
    /// left empty.
    fn snapshot(&self) -> BoxFuture<'_, Snapshot>;

    /// Notices of changes (a node went down, a task completed, an app was deployed, ...), so the
    /// dashboard updates without polling. Receivers that fall behind skip notices (and the
    /// dashboard takes a fresh snapshot).
    fn subscribe(&self) -> broadcast::Receiver<Notice>;
}

/// Everything the dashboard shows, at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// When it was taken, Unix milliseconds.
    pub taken_at_ms: i64,
    /// This node.
    pub node: NodeStatus,
    /// The cluster as this node sees it.
    pub cluster: ClusterView,
    /// Registered services, this node's and (when known) other nodes'.
    pub services: Vec<ServiceRow>,
    /// Deployed apps with their worker pools.
    pub apps: Vec<AppRow>,
    /// Tasks by status; `None` on a node that does not run tasks (the daemon does not read its tasks service for
    /// the dashboard yet).
    pub tasks: Option<TaskCounts>,
    /// Raised flags; `None` when the node does not run the flags service.
    pub flags: Option<Vec<FlagRow>>,
}

/// This node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node's server name.
    pub name: String,
    /// The nodus version.
    pub version: String,
    /// `running` or `draining`.
    pub state: String,
    /// Seconds since the node started.
    pub uptime_secs: u64,
    /// Addresses the node listens on, by role (`unix`, `tcp`, `cluster`, `http`, `locator`).
    pub listen: BTreeMap<String, String>,
}

/// The cluster map.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    /// Every known node, this one included.
    pub nodes: Vec<NodeRow>,
    /// Links between nodes, as reported by their endpoints.
    pub links: Vec<LinkRow>,
    /// The quorum.
    pub quorum: Quorum,
    /// The cluster clock.
    pub clock: ClockStatus,
}

/// One node of the cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeRow {
    /// Server name.
    pub name: String,
    /// Cluster address (`host:port`), when known.
    pub address: String,
    /// Reachable over links both ends report.
    pub live: bool,
    /// This is the node answering.
    pub is_self: bool,
}

/// One link between two nodes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkRow {
    /// One end.
    pub from: String,
    /// The other end.
    pub to: String,
    /// Up (both ends report it).
    pub up: bool,
    /// Round-trip time in milliseconds, when measured.
    pub rtt_ms: Option<f64>,
}

/// The cluster's quorum: ⌊n/2⌋+1 of the known nodes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Quorum {
    /// Known nodes.
    pub known: u32,
    /// Live nodes.
    pub live: u32,
    /// Live nodes needed for quorum.
    pub needed: u32,
    /// `CLUSTER_UP` (quorum reached).
    pub up: bool,
    /// `CLUSTER_COMPLETE` (every known node live).
    pub complete: bool,
}

/// The cluster clock as seen from this node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClockStatus {
    /// `CLOCK_STABLE`.
    pub stable: bool,
    /// Largest offset to a peer, milliseconds, when measured.
    pub max_offset_ms: Option<f64>,
}

/// One registered service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceRow {
    /// Service name.
    pub name: String,
    /// The node it is registered with.
    pub node: String,
    /// `builtin`, `external` or `app`.
    pub kind: String,
    /// Registered instances.
    pub instances: u32,
}

/// One deployed app.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AppRow {
    /// App name.
    pub name: String,
    /// The node running it.
    pub node: String,
    /// Deployed version number.
    pub version: u64,
    /// `running`, `stopped` or `failed`.
    pub status: String,
    /// Workers kept running when idle (`nodus app scale`).
    pub population: u32,
    /// Requests waiting for a worker.
    pub queued: u32,
    /// Open sessions.
    pub sessions: u32,
    /// Worker processes.
    pub workers: Vec<WorkerRow>,
}

/// One worker process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerRow {
    /// The worker's uuid.
    pub uuid: String,
    /// Its process id.
    pub pid: u32,
    /// `spawning`, `handshaken`, `active`, `terminating`.
    pub state: String,
    /// Open sessions on it.
    pub load: u32,
}

/// Tasks by status, the task service's counters and the latest changes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskCounts {
    /// Count per status in the node's store (`pending`, `running`, `done`, `error`,
    /// `interrupted`).
    pub by_status: BTreeMap<String, u64>,
    /// Tasks finished (done or failed) since the node started (the dashboard charts its rate).
    pub completed_total: u64,
    /// Tasks submitted since the node started.
    #[serde(default)]
    pub submitted_total: u64,
    /// Tasks done since the node started.
    #[serde(default)]
    pub done_total: u64,
    /// Tasks failed since the node started.
    #[serde(default)]
    pub failed_total: u64,
    /// Submission to final record of the tasks done or failed since the node started.
    #[serde(default)]
    pub latency: TaskLatency,
    /// The tasks that changed last, latest first (bounded by the daemon).
    #[serde(default)]
    pub recent: Vec<TaskRow>,
}

/// A histogram of task latencies, as the task service's `STATS` gives it.
pub use nodus_client::admin::TaskLatency;

/// One task as the dashboard lists it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskRow {
    /// Its id.
    pub id: String,
    /// `APP.EVENT`.
    pub procedure: String,
    /// `pending`, `running`, `done`, `error`, `interrupted`.
    pub status: String,
    /// Attempts started.
    pub attempt: u32,
}

/// One flag.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FlagRow {
    /// Flag name.
    pub name: String,
    /// The unit and section that raised it.
    pub source: String,
    /// Priority 0-100.
    pub priority: u8,
    /// Why it is raised.
    pub message: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Only an operator may lower it.
    pub manual_down: bool,
    /// When it was last raised, Unix milliseconds.
    pub modified_ms: i64,
}

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// The part that changed.
    pub kind: NoticeKind,
    /// A sentence for people (`node b down`, `task 42 done`).
    pub text: String,
}

/// The part of the state a [`Notice`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoticeKind {
    /// A node joined, left, went up or down.
    Node,
    /// A link went up or down.
    Link,
    /// A service registered or went away.
    Service,
    /// An app was deployed, started, stopped, scaled, or a worker changed state.
    App,
    /// A task changed status.
    Task,
    /// A flag was raised or lowered.
    Flag,
}
