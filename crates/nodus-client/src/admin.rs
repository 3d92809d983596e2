//! Typed administration of a node: its own commands (`INFO`, `LIST_SERVICES`, `CLUSTER_INFO`,
//! `FORGET`, `STOP`, ...) and the built-in `apps` and `tasks` services, with replies decoded into typed values
//! ([`nodus_wire::rows`]) in one place instead of by every caller.
//!
//! Every call fails with [`AdminError::Client`] when the request itself fails (including the
//! node's refusals, [`ClientError::Refused`]), [`AdminError::Failed`] when a service answers
//! `ERROR`, and [`AdminError::Malformed`]/[`AdminError::Unexpected`] when the answer is not what
//! the node sends.

mod agents;
mod tasks;

pub use agents::{AgentInfo, Agents};
pub use tasks::{
    ProcedureInfo, TaskChange, TaskCounts, TaskFailure, TaskInfo, TaskLatency, TaskPage, TaskRefusal, TaskSpec,
    TaskStats, TaskStatus, TaskSubmitted, TASKS_TIMEOUT,
};

use crate::{Client, ClientError};
use nodus_wire::node::{ForgetTarget, NodeRequest};
use nodus_wire::rows::{self, AppRow, AppStatus, CrashRecord, LinkRow, NodeRow, RowError, ServiceAt, WorkerRow};
use nodus_wire::Message;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

/// How long an `apps` command may take (a deploy copies up to 512 MiB).
pub const APPS_TIMEOUT: Duration = Duration::from_secs(120);

/// An administrative call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AdminError {
    /// The request failed, or the node refused it.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A service answered `ERROR`.
    #[error("{message}")]
    Failed {
        /// The service that answered.
        service: String,
        /// Its error code.
        code: String,
        /// What it said.
        message: String,
    },
    /// The node does not know this node name (`FORGET` answered `ERROR code=unknown_node`).
    #[error("no node named {0:?} is known to this node; `nodus cluster status` lists the known nodes")]
    UnknownNode(String),
    /// The answer is not the one the command gets.
    #[error("unexpected answer {got} to {asked}")]
    Unexpected {
        /// The command sent.
        asked: String,
        /// The command received.
        got: String,
    },
    /// A value in the answer does not parse.
    #[error("malformed answer: {0}")]
    Malformed(String),
}

impl From<RowError> for AdminError {
    fn from(e: RowError) -> Self {
        AdminError::Malformed(e.to_string())
    }
}

/// A node's `INFO`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeInfo {
    /// Server name.
    pub server: String,
    /// nodus version of the node.
    pub version: String,
    /// Time since the node started.
    pub uptime: Duration,
    /// Client connections (not links, not the UDP port).
    pub connections: u64,
    /// Registered service names.
    pub services: u64,
    /// Registered service instances.
    pub instances: u64,
    /// Requests waiting for a reply.
    pub pending: u64,
    /// Messages in the cache.
    pub cached: u64,
    /// Messages received from clients.
    pub received: u64,
    /// Messages delivered.
    pub delivered: u64,
    /// Units refused as `INVALID`.
    pub invalid: u64,
    /// Messages dropped as expired.
    pub expired: u64,
    /// Messages that could not be delivered nor cached.
    pub undeliverable: u64,
    /// Shutting down.
    pub quitting: bool,
    /// Live cluster links.
    pub links: u64,
    /// Nodes known, this one included.
    pub known_nodes: u64,
    /// Nodes live, this one included.
    pub live_nodes: u64,
}

/// One service registered on the node (`SERVICE_STATUS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Service name.
    pub name: String,
    /// Registered instances (connections).
    pub instances: u64,
}

/// A node's view of the cluster (`CLUSTER_INFO`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterInfo {
    /// The node answering.
    pub server: String,
    /// Live nodes, this one included.
    pub live: u64,
    /// Known nodes, this one included.
    pub known: u64,
    /// Live nodes needed for `CLUSTER_UP`.
    pub quorum: u64,
    /// `CLUSTER_UP` (else `CLUSTER_DOWN`).
    pub up: bool,
    /// `CLUSTER_COMPLETE` (every known node live).
    pub complete: bool,
    /// `CLOCK_STABLE` (else `CLOCK_UNSTABLE`).
    pub clock_stable: bool,
    /// The kernel's NTP state: `synchronized`, `unsynchronized` or `unknown`.
    pub ntp: String,
    /// Every known node.
    pub nodes: Vec<NodeRow>,
    /// This node's direct links.
    pub links: Vec<LinkRow>,
}

/// The answer to `STOP`, with what the node still had to finish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stopping {
    /// The node stopping.
    pub server: String,
    /// Requests in flight when it was asked to stop; it waits for them up to its grace period.
    pub in_flight: u64,
}

/// An app deployed (`DEPLOYED`) or started (`STARTED`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployed {
    /// App name.
    pub name: String,
    /// The version now running, `v1`, `v2`, ...
    pub version: String,
    /// What the node warns about (`warning=`), such as a data directory the user workers run as
    /// cannot enter.
    pub warning: Option<String>,
}

impl Deployed {
    fn from_reply(m: &Message) -> Deployed {
        Deployed { name: text(m, "name"), version: text(m, "version"), warning: m.get("warning").map(String::from) }
    }
}

/// The population an app was scaled to (`SCALED`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scaled {
    /// App name.
    pub name: String,
    /// Workers kept running when idle, as set.
    pub workers: u64,
    /// What was asked, when the node set less (`requested=`).
    pub requested: Option<u64>,
    /// What capped it (`capped_by=pool-limit`), when something did.
    pub capped_by: Option<String>,
}

/// Where a deploy in progress stands (`DEPLOY_STATUS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployProgress {
    /// `preparing`, `copying`, `unpacking`, `starting`, or `idle` when no deploy of the app runs.
    pub stage: String,
    /// Bytes copied or read from the archive so far.
    pub done: u64,
    /// Bytes to copy or read (0 while unknown).
    pub total: u64,
}

/// One app in detail (`APP_INFO`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppInfo {
    /// App name.
    pub name: String,
    /// Deployed version.
    pub version: String,
    /// The manifest's executable.
    pub executable: String,
    /// The deployment's directory on the node.
    pub dir: String,
    /// Running, failed or stopped.
    pub status: AppStatus,
    /// Why it failed, when it did.
    pub reason: Option<String>,
    /// Requests waiting for a worker.
    pub queued: u64,
    /// Workers kept running when idle (`nodus app scale`).
    pub population: u64,
    /// Open sessions.
    pub sessions: u64,
    /// Worker processes.
    pub workers: Vec<WorkerRow>,
}

/// Typed administration over a [`Client`]; see the module docs.
#[derive(Clone)]
pub struct Admin {
    client: Client,
}

fn param<T: FromStr + Default>(m: &Message, key: &str) -> Result<T, AdminError> {
    match m.get(key) {
        None => Ok(T::default()),
        Some(v) => v.parse().map_err(|_| {
            AdminError::Malformed(format!("{} {key}={v:?} is not a {}", m.command, std::any::type_name::<T>()))
        }),
    }
}

fn text(m: &Message, key: &str) -> String {
    m.get(key).unwrap_or("").to_string()
}

impl Admin {
    /// Administration over `client`.
    pub fn new(client: Client) -> Admin {
        Admin { client }
    }

    /// The client underneath.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Sends `req` to the node and expects `want` back.
    async fn node(&self, req: NodeRequest, want: &[&str]) -> Result<Message, AdminError> {
        let req = req.to_message();
        let asked = req.command.clone();
        let reply = self.client.request(req).await?;
        expect(reply, &asked, want)
    }

    /// Sends `req` to the `apps` service and expects `want` back.
    async fn apps(&self, req: Message, want: &str) -> Result<Message, AdminError> {
        let asked = req.command.clone();
        let reply = self.client.request_with_timeout(req.to("apps"), APPS_TIMEOUT).await?;
        expect(reply, &asked, &[want])
    }

    /// The node's `INFO`.
    ///
    /// Fails as described in the module docs.
    pub async fn info(&self) -> Result<NodeInfo, AdminError> {
        let m = self.node(NodeRequest::Info, &["INFO"]).await?;
        Ok(NodeInfo {
            server: text(&m, "server"),
            version: text(&m, "version"),
            uptime: Duration::from_millis(param(&m, "uptime_ms")?),
            connections: param(&m, "connections")?,
            services: param(&m, "services")?,
            instances: param(&m, "instances")?,
            pending: param(&m, "pending")?,
            cached: param(&m, "cached")?,
            received: param(&m, "received")?,
            delivered: param(&m, "delivered")?,
            invalid: param(&m, "invalid")?,
            expired: param(&m, "expired")?,
            undeliverable: param(&m, "undeliverable")?,
            quitting: param(&m, "quitting")?,
            links: param(&m, "links")?,
            known_nodes: param(&m, "known_nodes")?,
            live_nodes: param(&m, "live_nodes")?,
        })
    }

    /// The services registered on this node with their instance counts, by name.
    ///
    /// Fails as described in the module docs.
    pub async fn services(&self) -> Result<Vec<ServiceInfo>, AdminError> {
        let m = self.node(NodeRequest::ListServices { cluster: false }, &["SERVICES"]).await?;
        let mut out = Vec::new();
        for name in m.get("list").unwrap_or("").split(',').filter(|s| !s.is_empty()) {
            let st = self.node(NodeRequest::ServiceStatus { service: name.to_string() }, &["STATUS"]).await?;
            out.push(ServiceInfo { name: name.to_string(), instances: param(&st, "instances")? });
        }
        Ok(out)
    }

    /// `server:service` for every service of every live node, sorted.
    ///
    /// Fails as described in the module docs.
    pub async fn cluster_services(&self) -> Result<Vec<ServiceAt>, AdminError> {
        let m = self.node(NodeRequest::ListServices { cluster: true }, &["SERVICES"]).await?;
        Ok(rows::parse_list(m.get("cluster").unwrap_or(""))?)
    }

    /// The node's view of the cluster.
    ///
    /// Fails as described in the module docs.
    pub async fn cluster_info(&self) -> Result<ClusterInfo, AdminError> {
        let m = self.node(NodeRequest::ClusterInfo, &["CLUSTER_INFO"]).await?;
        Ok(ClusterInfo {
            server: text(&m, "server"),
            live: param(&m, "live")?,
            known: param(&m, "known")?,
            quorum: param(&m, "quorum")?,
            up: param(&m, "up")?,
            complete: param(&m, "complete")?,
            clock_stable: param(&m, "clock_stable")?,
            ntp: m.get("ntp").unwrap_or("unknown").to_string(),
            nodes: rows::parse_list(m.get("nodes").unwrap_or(""))?,
            links: rows::parse_list(m.get("links").unwrap_or(""))?,
        })
    }

    /// Removes node `server` from the cluster's memory, everywhere; returns its name.
    ///
    /// Fails with [`AdminError::UnknownNode`] when this node does not know `server` (it answers
    /// `ERROR code=unknown_node`), and as described in the module docs.
    pub async fn forget(&self, server: &str) -> Result<String, AdminError> {
        let req = NodeRequest::Forget(ForgetTarget::Server(server.to_string()));
        match self.node(req, &["FORGOTTEN"]).await {
            Ok(m) => Ok(m.get("server").unwrap_or(server).to_string()),
            Err(AdminError::Client(ClientError::Refused(r))) if r.code() == Some("unknown_node") => {
                Err(AdminError::UnknownNode(server.to_string()))
            }
            Err(e) => Err(e),
        }
    }

    /// Stops every node of the cluster.
    ///
    /// Fails as described in the module docs.
    pub async fn shutdown_cluster(&self) -> Result<String, AdminError> {
        let m = self.node(NodeRequest::Shutdown, &["STOPPING"]).await?;
        Ok(m.from.server)
    }

    /// Asks the node to stop gracefully; says how many requests it still had in flight.
    ///
    /// Fails as described in the module docs.
    pub async fn stop(&self) -> Result<Stopping, AdminError> {
        let in_flight = self.info().await?.pending;
        let m = self.node(NodeRequest::Stop, &["STOPPING"]).await?;
        Ok(Stopping { server: m.from.server, in_flight })
    }

    /// Stores an app (an executable, a directory with a manifest, or a `.tar`/`.tar.gz`; the
    /// paths must be absolute, as the node resolves them) and starts it.
    ///
    /// Fails as described in the module docs.
    pub async fn deploy(&self, name: &str, path: &Path, profile: Option<&Path>) -> Result<Deployed, AdminError> {
        let mut req = Message::new("DEPLOY").param("name", name).param("path", path.display());
        if let Some(p) = profile {
            req = req.param("profile", p.display());
        }
        Ok(Deployed::from_reply(&self.apps(req, "DEPLOYED").await?))
    }

    /// Where a deploy of `name` that is running now stands; ask while [`Admin::deploy`] waits
    /// (over the same or another connection).
    ///
    /// Fails as described in the module docs; a node whose `apps` service does not know
    /// `DEPLOY_STATUS` answers [`AdminError::Failed`].
    pub async fn deploy_status(&self, name: &str) -> Result<DeployProgress, AdminError> {
        let m = self.apps(Message::new("DEPLOY_STATUS").param("name", name), "DEPLOY_STATUS").await?;
        Ok(DeployProgress {
            stage: m.get("stage").unwrap_or("idle").to_string(),
            done: param(&m, "done")?,
            total: param(&m, "total")?,
        })
    }

    /// Starts a stopped (or failed) app.
    ///
    /// Fails as described in the module docs.
    pub async fn start_app(&self, name: &str) -> Result<Deployed, AdminError> {
        Ok(Deployed::from_reply(&self.apps(Message::new("START").param("name", name), "STARTED").await?))
    }

    /// Stops and starts an app.
    ///
    /// Fails as described in the module docs.
    pub async fn restart_app(&self, name: &str) -> Result<Deployed, AdminError> {
        Ok(Deployed::from_reply(&self.apps(Message::new("RESTART").param("name", name), "STARTED").await?))
    }

    /// Stops an app's workers; it stays deployed.
    ///
    /// Fails as described in the module docs.
    pub async fn stop_app(&self, name: &str) -> Result<(), AdminError> {
        self.apps(Message::new("STOP").param("name", name), "STOPPED").await.map(drop)
    }

    /// Keeps `workers` of the app's workers running when idle; returns the population the node
    /// set (at most the app's `pool-limit`) and, when it set less, why.
    ///
    /// Fails as described in the module docs.
    pub async fn scale_app(&self, name: &str, workers: usize) -> Result<Scaled, AdminError> {
        let m = self.apps(Message::new("SCALE").param("name", name).param("workers", workers), "SCALED").await?;
        Ok(Scaled {
            name: m.get("name").unwrap_or(name).to_string(),
            workers: param(&m, "workers")?,
            requested: m.get("requested").map(|_| param(&m, "requested")).transpose()?,
            capped_by: m.get("capped_by").map(String::from),
        })
    }

    /// Stops an app and deletes it.
    ///
    /// Fails as described in the module docs.
    pub async fn remove_app(&self, name: &str) -> Result<(), AdminError> {
        self.apps(Message::new("REMOVE").param("name", name), "REMOVED").await.map(drop)
    }

    /// Every app deployed on the node.
    ///
    /// Fails as described in the module docs.
    pub async fn apps_list(&self) -> Result<Vec<AppRow>, AdminError> {
        let m = self.apps(Message::new("LIST"), "APPS").await?;
        Ok(rows::parse_list(m.get("list").unwrap_or(""))?)
    }

    /// One app in detail.
    ///
    /// Fails as described in the module docs.
    pub async fn app_info(&self, name: &str) -> Result<AppInfo, AdminError> {
        let m = self.apps(Message::new("INFO").param("name", name), "APP_INFO").await?;
        Ok(AppInfo {
            name: text(&m, "name"),
            version: text(&m, "version"),
            executable: text(&m, "executable"),
            dir: text(&m, "dir"),
            status: m.get("status").unwrap_or("stopped").into(),
            reason: m.get("reason").map(String::from),
            queued: param(&m, "queued")?,
            population: param(&m, "population")?,
            sessions: param(&m, "sessions")?,
            workers: rows::parse_list(m.get("workers").unwrap_or(""))?,
        })
    }

    /// The app's crashlog: each exited worker's status and last stderr lines, oldest first.
    ///
    /// Fails as described in the module docs.
    pub async fn crashlog(&self, name: &str) -> Result<Vec<CrashRecord>, AdminError> {
        let m = self.apps(Message::new("CRASHLOG").param("name", name), "CRASHLOG").await?;
        Ok(CrashRecord::parse_all(&String::from_utf8_lossy(&m.payload))?)
    }
}

/// `reply` when it is one of `want`; a service's `ERROR` as [`AdminError::Failed`].
fn expect(reply: Message, asked: &str, want: &[&str]) -> Result<Message, AdminError> {
    if want.contains(&reply.command.as_str()) {
        return Ok(reply);
    }
    if reply.command == "ERROR" {
        return Err(AdminError::Failed {
            service: reply.from.service.clone(),
            code: text(&reply, "code"),
            message: reply.get("message").unwrap_or("failed").to_string(),
        });
    }
    Err(AdminError::Unexpected { asked: asked.to_string(), got: reply.command })
}
