//! The node's HTTP listener: the `nodus-http` crate mounted in the daemon (`[http]`).
//!
//! - [`bind`] binds the listener in `Daemon::bind` (a taken port fails the start), reads the
//!   bearer token (`[http] token_file`, else the node's own token) and sets up TLS.
//! - [`start`] serves it, started with the built-in services. The gateway invokes this node's
//!   apps on its engine and reaches the others through its locator. The REST API talks to the
//!   node through two in-process connections served like any client's
//!   ([`Shared::open_in_process`]): one anonymous (a TCP client without the token: `[access]
//!   anonymous`), one that authenticated with the node's token (the owner). The front maps a
//!   request with the HTTP token to the second, any other to the first, so the router's
//!   permission check applies to every API call as it does to any client.
//! - [`DaemonView`] is the `NodeView` of the dashboard and the metrics: the router's view taken
//!   under its lock, the apps through the `apps` service, the raised flags through the `flags`
//!   service, the tasks by status and the task service's counters through the `tasks` service
//!   (`COUNTS`, `STATS`). Its change notices come from the router (an in-process service `http`
//!   that declares the cluster and service notifications the router sends), from the `tasks`
//!   service (the `http` service keeps a `WATCH` on it: every `TASK_STATUS`, which also keeps the
//!   latest [`RECENT_TASKS`] changed tasks for the page) and from the engine's events.
//! - [`NodeMetrics`]: the node's Prometheus registry. At each scrape a collector reads the
//!   router's counters and the driver's (messages by outcome, bytes by listener, connections,
//!   queue depths, requests awaiting replies, cache, link round trips); the app bridges record
//!   every invocation's latency.
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `nodus_messages_total` | counter | `outcome` (`received`, `delivered`, `cached`, `invalid`, `expired`, `undeliverable`, `forbidden`, `overloaded`, `refused`) | messages the router handled |
//! | `nodus_received_bytes_total`, `nodus_sent_bytes_total` | counter | `listener` | bytes read / written |
//! | `nodus_connections_accepted_total`, `nodus_connections_refused_total`, `nodus_handshake_timeouts_total` | counter | `listener` | connections |
//! | `nodus_slow_consumer_cuts_total`, `nodus_budget_cuts_total` | counter | | connections cut |
//! | `nodus_buffered_input_bytes`, `nodus_buffered_output_bytes` | gauge | | held beyond each connection's allowance |
//! | `nodus_pending_requests`, `nodus_cached_messages`, `nodus_clients` | gauge | | queue depths |
//! | `nodus_link_rtt_ms`, `nodus_link_clock_offset_ms` | gauge | `peer` | this node's links |
//! | `nodus_app_invoke_latency_seconds` | histogram | `app` | message to an app's service → worker's last chunk |
//! | `nodus_app_invokes_total` | counter | `app`, `outcome` (`ok`, `error`) | invocations through the node |
//!
//! The HTTP side's own metrics and the gauges of the snapshot (nodes, links, quorum, clock,
//! workers by state, tasks by status, flags) are listed in `nodus_http::metrics`.

use crate::auth::Origin;
use crate::config::Config;
use crate::server::{ListenerKind, Outbound, Shared};
use anyhow::Context;
use nodus_client::admin::{Admin, TaskChange};
use nodus_client::{Client, ClientConfig, Connector, Transport};
use nodus_http::view::{
    AppRow, BoxFuture, ClockStatus, ClusterView, FlagRow, LinkRow, NodeRow, NodeStatus, Quorum, ServiceRow, TaskCounts,
    TaskRow, WorkerRow,
};
use nodus_http::{Http, HttpConfig, NodeView, Notice, NoticeKind, Snapshot};
use nodus_wire::node::Permission;
use nodus_wire::Message;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Unit;
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The in-process service that hears the router's notifications for the dashboard.
pub const HTTP_SERVICE: &str = "http";
/// Notices kept for dashboards that fall behind (they then take a fresh snapshot).
const NOTICES: usize = 256;
/// Notifications the `http` service declares (the router sends them to services that do).
const NOTIFICATIONS: [&str; 12] = [
    "CLUSTER_UP",
    "CLUSTER_DOWN",
    "CLUSTER_COMPLETE",
    "CLUSTER_INCOMPLETE",
    "UNREACHABLE",
    "NEW_REMOTE_CONNECTION",
    "HANGUP",
    "DISCONNECTED",
    "STATUS",
    "CLOCK_STABLE",
    "CLOCK_UNSTABLE",
    "TASK_STATUS",
];
/// Tasks the dashboard lists (the latest changed, heard since the listener started).
pub const RECENT_TASKS: usize = 20;
/// How long the `http` service's `WATCH` on the `tasks` service lasts.
const TASK_WATCH_TTL: Duration = Duration::from_secs(60);
/// How often it is renewed (also what a `WATCH` refused at the node's start waits).
const TASK_WATCH_RENEW: Duration = Duration::from_secs(10);
/// Services every node runs itself (another node's are shown as built-in by name).
const BUILTIN_SERVICES: [&str; 6] = ["apps", "tasks", "flags", "control", HTTP_SERVICE, "locator"];
/// Longest wait for one of the node's answers while taking a snapshot.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(5);
/// Apps whose details a snapshot asks for (the rest are listed without workers).
const SNAPSHOT_APPS: usize = 64;

/// The bound listener, before the node starts.
pub(crate) struct Bound {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    /// The bearer token asked of peers beyond loopback.
    token: String,
    /// The node's own token, which the API's owner connection authenticates with.
    node_token: String,
}

impl Bound {
    /// The address bound.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }
}

/// Binds `[http] listen` (`None` when empty), with its token and TLS.
///
/// Fails when the address cannot be bound, the token file cannot be read or is empty, or the
/// TLS files are invalid.
pub(crate) async fn bind(config: &Config, node_token: &str) -> anyhow::Result<Option<Bound>> {
    let h = &config.http;
    if h.listen.is_empty() {
        return Ok(None);
    }
    let token = if h.token_file.as_os_str().is_empty() {
        node_token.to_string()
    } else {
        let text = std::fs::read_to_string(&h.token_file)
            .with_context(|| format!("cannot read the HTTP token file {}", h.token_file.display()))?;
        let line = text.lines().next().unwrap_or("").trim().to_string();
        anyhow::ensure!(!line.is_empty(), "the HTTP token file {} is empty", h.token_file.display());
        line
    };
    let tls = match h.tls_files(&config.cluster) {
        Some((cert, key)) => Some(nodus_http::tls_acceptor(cert, key).context("cannot set up HTTPS ([http] tls)")?),
        None => None,
    };
    let listener =
        TcpListener::bind(&h.listen).await.with_context(|| format!("cannot listen for HTTP on {}", h.listen))?;
    Ok(Some(Bound { listener, tls, token, node_token: node_token.to_string() }))
}

/// The running listener: what the daemon's shutdown stops.
pub(crate) struct Mount {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Mount {
    /// Stops accepting and ends the live feeds; requests in flight go on.
    pub(crate) fn begin_shutdown(&self) {
        self.stop.cancel();
    }

    /// Waits for the requests in flight (at most the node's shutdown grace).
    pub(crate) async fn finish(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Serves `bound`: see the module documentation. `listen` names the node's listeners by role
/// for the dashboard.
pub(crate) fn start(shared: Arc<Shared>, bound: Bound, listen: BTreeMap<String, String>) -> Mount {
    let stop = CancellationToken::new();
    let (notices, _) = broadcast::channel(NOTICES);
    let commands: Vec<(&str, Permission)> = NOTIFICATIONS.iter().map(|c| (*c, Permission::Admin)).collect();
    let (conn, rx) = shared.attach_with(HTTP_SERVICE, Some(&commands));
    let recent = Arc::new(Mutex::new(VecDeque::with_capacity(RECENT_TASKS)));
    tokio::spawn(hear(rx, notices.clone(), recent.clone()));
    tokio::spawn(watch_tasks(Arc::downgrade(&shared), conn, stop.clone()));
    if let Some(engine) = shared.engine() {
        tokio::spawn(engine_notices(engine.events(), notices.clone(), stop.clone()));
    }
    let task = tokio::spawn(serve(shared, bound, listen, notices, recent, stop.clone()));
    Mount { stop, task }
}

/// A client of this node over an in-process connection acting as a TCP peer at `peer`.
fn in_process(shared: &Arc<Shared>, peer: SocketAddr, name: &str) -> ClientConfig {
    let weak = Arc::downgrade(shared);
    let connector: Connector = Arc::new(move || {
        let weak = weak.clone();
        Box::pin(async move {
            let shared = weak
                .upgrade()
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "the node stopped"))?;
            let stream = shared.open_in_process(Origin::Tcp { peer })?;
            Ok(Box::new(stream) as Box<dyn Transport>)
        })
    });
    ClientConfig::with_connector(name, connector)
        .backoff(Duration::from_millis(50), Duration::from_secs(2))
        .max_frame(shared.config().limits.max_frame_bytes)
}

async fn serve(
    shared: Arc<Shared>,
    bound: Bound,
    listen: BTreeMap<String, String>,
    notices: broadcast::Sender<Notice>,
    recent: Arc<Mutex<VecDeque<TaskRow>>>,
    stop: CancellationToken,
) {
    let addr = bound.addr();
    let anonymous = Client::connect(in_process(&shared, addr, "http-api-anonymous")).await;
    let owner = Client::connect(in_process(&shared, addr, "http-api-owner").token(&bound.node_token)).await;
    let (anonymous, owner) = match (anonymous, owner) {
        (Ok((a, _)), Ok((o, _))) => (Admin::new(a), Admin::new(o)),
        (Err(e), _) | (_, Err(e)) => {
            warn!(error = %e, "the HTTP API cannot connect to its node; HTTP is off");
            return;
        }
    };
    let c = shared.config();
    let config = HttpConfig {
        token: Some(bound.token.clone()),
        public: c.http.public.iter().filter_map(|r| r.parse().ok()).collect(),
        token_on_loopback: c.http.token_on_loopback,
        gateway: nodus_http::GatewayConfig {
            head_timeout: Duration::from_secs(c.http.head_timeout_secs),
            idle_timeout: Duration::from_secs(c.http.idle_timeout_secs),
            max_body_bytes: c.http.max_body_bytes,
            max_in_flight: c.http.max_in_flight,
            ..Default::default()
        },
        serve: nodus_http::ServeOptions {
            max_connections: c.http.max_connections,
            header_read_timeout: Duration::from_secs(c.http.header_timeout_secs),
            shutdown_grace: Duration::from_secs(c.limits.shutdown_grace_secs),
            ..Default::default()
        },
        feed: Default::default(),
    };
    let api = nodus_http::Api::new(
        anonymous,
        owner.clone(),
        // The apps service takes absolute paths only.
        std::path::absolute(c.data_dir.join("uploads")).unwrap_or_else(|_| c.data_dir.join("uploads")),
        c.apps.max_deploy_bytes,
    );
    let locator = listen.get("locator").cloned();
    let view = Arc::new(DaemonView { shared: Arc::downgrade(&shared), owner, notices, listen, recent });
    let mut http = Http::new(config, shared.metrics().registry().clone()).with_view(view).with_api(api);
    if let (Some(engine), Some(locator)) = (shared.engine(), locator) {
        http = http.with_gateway(locator, Some(engine.clone()));
    }
    let scheme = if bound.tls.is_some() { "https" } else { "http" };
    info!(%addr, %scheme, "serving HTTP: gateway, API, dashboard and metrics");
    drop(shared);
    http.serve(bound.listener, bound.tls, async move { stop.cancelled().await }).await;
    debug!("HTTP listener stopped");
}

/// The router's notifications and the `tasks` service's `TASK_STATUS` to the `http` service,
/// as notices; changed tasks also go to `recent`.
async fn hear(
    mut rx: mpsc::Receiver<Outbound>,
    notices: broadcast::Sender<Notice>,
    recent: Arc<Mutex<VecDeque<TaskRow>>>,
) {
    while let Some(out) = rx.recv().await {
        let Outbound::Msg(m, _) = out else { continue };
        if let Some(change) = TaskChange::from_message(&m) {
            let mut r = recent.lock().unwrap_or_else(|e| e.into_inner());
            remember(&mut r, change);
        }
        if let Some(n) = notice_of(&m) {
            let _ = notices.send(n);
        }
    }
}

/// Puts `change` first in `recent` (at most [`RECENT_TASKS`]); a deleted task leaves it.
fn remember(recent: &mut VecDeque<TaskRow>, change: TaskChange) {
    recent.retain(|t| t.id != change.id);
    if change.status != "deleted" {
        recent.push_front(TaskRow {
            id: change.id,
            procedure: change.procedure,
            status: change.status,
            attempt: change.attempt,
        });
        recent.truncate(RECENT_TASKS);
    }
}

/// Keeps the `http` service's `WATCH` on this node's `tasks` service (when it runs) until the
/// listener stops; the answers come back to [`hear`], which ignores them.
async fn watch_tasks(shared: Weak<Shared>, conn: crate::router::ConnId, stop: CancellationToken) {
    loop {
        {
            let Some(shared) = shared.upgrade() else { return };
            if shared.instances("tasks") > 0 {
                let watch = Message::new("WATCH").to("tasks").param("ttl_ms", TASK_WATCH_TTL.as_millis());
                shared.inject(conn, watch);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(TASK_WATCH_RENEW) => {}
        }
    }
}

/// What a notification from the router (or the `tasks` service) says, for people.
fn notice_of(m: &Message) -> Option<Notice> {
    let server = m.get("server").unwrap_or("?");
    let counts = || format!("{} of {} nodes live", m.get("live").unwrap_or("?"), m.get("known").unwrap_or("?"));
    let (kind, text) = match m.command.as_str() {
        "CLUSTER_UP" => (NoticeKind::Node, format!("cluster up: {}", counts())),
        "CLUSTER_DOWN" => (NoticeKind::Node, format!("cluster down (no quorum): {}", counts())),
        "CLUSTER_COMPLETE" => (NoticeKind::Node, format!("cluster complete: {}", counts())),
        "CLUSTER_INCOMPLETE" => (NoticeKind::Node, format!("cluster incomplete: {}", counts())),
        "UNREACHABLE" => (NoticeKind::Node, format!("node {server} unreachable")),
        "NEW_REMOTE_CONNECTION" => (NoticeKind::Link, format!("link to {server} up")),
        "HANGUP" => (NoticeKind::Link, format!("link to {server} closed by {server}")),
        "DISCONNECTED" => (NoticeKind::Link, format!("link to {server} lost")),
        "STATUS" => {
            let service = m.get("service").unwrap_or("?");
            (NoticeKind::Service, format!("service {service} {}", m.get("status").unwrap_or("changed")))
        }
        "CLOCK_STABLE" => (NoticeKind::Node, "clock stable".to_string()),
        "TASK_STATUS" => {
            let (id, procedure) = (m.get("id").unwrap_or("?"), m.get("procedure").unwrap_or("?"));
            (NoticeKind::Task, format!("task {id} ({procedure}) {}", m.get("status").unwrap_or("changed")))
        }
        "CLOCK_UNSTABLE" => {
            (NoticeKind::Node, format!("clock unstable (offset {} ms)", m.get("max_offset_ms").unwrap_or("?")))
        }
        _ => return None,
    };
    Some(Notice { kind, text })
}

/// The engine's events that change what the dashboard shows, as notices.
async fn engine_notices(
    mut events: broadcast::Receiver<nodus_engine::EngineEvent>,
    notices: broadcast::Sender<Notice>,
    stop: CancellationToken,
) {
    use nodus_engine::EngineEvent as E;
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            e = events.recv() => e,
        };
        let text = match event {
            Ok(E::Spawned { app, worker, pid }) => format!("app {app}: worker {worker} started (pid {pid})"),
            Ok(E::Ready { app, worker }) => format!("app {app}: worker {worker} ready"),
            Ok(E::Exited { app, worker, failure, .. }) => match failure {
                Some(f) => format!("app {app}: worker {worker} failed: {f}"),
                None => format!("app {app}: worker {worker} exited"),
            },
            Ok(E::Status { app, status }) => format!("app {app}: {status:?}").to_lowercase(),
            Ok(_) => continue,
            Err(broadcast::error::RecvError::Lagged(_)) => "apps changed".to_string(),
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let _ = notices.send(Notice { kind: NoticeKind::App, text });
    }
}

/// The dashboard's and the metrics' view of this node; see the module documentation.
struct DaemonView {
    shared: Weak<Shared>,
    owner: Admin,
    notices: broadcast::Sender<Notice>,
    listen: BTreeMap<String, String>,
    /// The latest changed tasks, latest first.
    recent: Arc<Mutex<VecDeque<TaskRow>>>,
}

impl NodeView for DaemonView {
    fn snapshot(&self) -> BoxFuture<'_, Snapshot> {
        Box::pin(self.take())
    }

    fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }
}

impl DaemonView {
    async fn take(&self) -> Snapshot {
        let Some(shared) = self.shared.upgrade() else { return Snapshot::default() };
        let v = shared.router_view();
        let now = shared.now_ms();
        let has_flags = shared.instances("flags") > 0;
        let has_tasks = shared.instances("tasks") > 0;
        drop(shared);
        let apps = self.apps().await;
        let flags = if has_flags { Some(self.flags().await) } else { None };
        let tasks = if has_tasks { Some(self.tasks().await) } else { None };
        let own_rtt: BTreeMap<&str, &crate::router::OwnLink> =
            v.own_links.iter().map(|l| (l.peer.as_str(), l)).collect();
        let links = v
            .links
            .iter()
            .map(|l| {
                let peer = if l.a == v.server {
                    l.b.as_str()
                } else if l.b == v.server {
                    l.a.as_str()
                } else {
                    ""
                };
                let rtt_ms = own_rtt.get(peer).and_then(|o| o.rtt_ms).map(|r| r as f64);
                LinkRow { from: l.a.clone(), to: l.b.clone(), up: l.up, rtt_ms }
            })
            .collect();
        let app_names: std::collections::BTreeSet<&str> = apps.iter().map(|a| a.name.as_str()).collect();
        let services = v
            .services
            .iter()
            .map(|s| {
                let kind = if s.node == v.server && app_names.contains(s.name.as_str()) {
                    "app"
                } else if s.internal || (s.node != v.server && BUILTIN_SERVICES.contains(&s.name.as_str())) {
                    "builtin"
                } else {
                    "external"
                };
                ServiceRow {
                    name: s.name.clone(),
                    node: s.node.clone(),
                    kind: kind.into(),
                    instances: s.instances as u32,
                }
            })
            .collect();
        let measured = v.own_links.iter().any(|l| l.offset_ms.is_some());
        Snapshot {
            taken_at_ms: now,
            node: NodeStatus {
                name: v.server.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                state: if v.quitting { "draining" } else { "running" }.into(),
                uptime_secs: u64::try_from(v.uptime_ms / 1000).unwrap_or(0),
                listen: self.listen.clone(),
            },
            cluster: ClusterView {
                nodes: v
                    .nodes
                    .iter()
                    .map(|n| NodeRow {
                        name: n.name.clone(),
                        address: n.addr.clone(),
                        live: n.live,
                        is_self: n.is_self,
                    })
                    .collect(),
                links,
                quorum: Quorum {
                    known: v.known as u32,
                    live: v.live as u32,
                    needed: (v.known / 2 + 1) as u32,
                    up: v.live > v.known / 2,
                    complete: v.live >= v.known,
                },
                clock: ClockStatus {
                    stable: v.clock_stable,
                    max_offset_ms: measured.then_some(v.max_offset_ms as f64),
                },
            },
            services,
            apps,
            tasks,
            flags,
        }
    }

    /// This node's apps with their workers, through the `apps` service.
    async fn apps(&self) -> Vec<AppRow> {
        let Ok(Ok(list)) = tokio::time::timeout(SNAPSHOT_TIMEOUT, self.owner.apps_list()).await else {
            return Vec::new();
        };
        let node = self.owner.client().server();
        let mut rows = Vec::with_capacity(list.len());
        for (n, a) in list.into_iter().enumerate() {
            let mut row = AppRow {
                name: a.name.clone(),
                node: node.clone(),
                version: a.version.trim_start_matches('v').parse().unwrap_or(0),
                status: a.status.as_str().to_string(),
                ..Default::default()
            };
            if n < SNAPSHOT_APPS {
                if let Ok(Ok(i)) = tokio::time::timeout(SNAPSHOT_TIMEOUT, self.owner.app_info(&a.name)).await {
                    row.population = i.population as u32;
                    row.queued = i.queued as u32;
                    row.sessions = i.sessions as u32;
                    row.workers = i
                        .workers
                        .iter()
                        .map(|w| WorkerRow {
                            uuid: w.uuid.clone(),
                            pid: w.pid,
                            state: w.state.to_ascii_lowercase(),
                            load: w.load as u32,
                        })
                        .collect();
                }
            }
            rows.push(row);
        }
        rows
    }

    /// Tasks by status and the task service's counters, from the `tasks` service's `COUNTS` and
    /// `STATS` (what answered), with the latest changed tasks.
    async fn tasks(&self) -> TaskCounts {
        let mut t = TaskCounts::default();
        if let Ok(Ok(c)) = tokio::time::timeout(SNAPSHOT_TIMEOUT, self.owner.task_counts()).await {
            for (status, n) in [
                ("pending", c.pending),
                ("running", c.running),
                ("done", c.done),
                ("error", c.error),
                ("interrupted", c.interrupted),
            ] {
                t.by_status.insert(status.to_string(), n);
            }
        }
        if let Ok(Ok(s)) = tokio::time::timeout(SNAPSHOT_TIMEOUT, self.owner.task_stats()).await {
            t.submitted_total = s.submitted;
            t.done_total = s.done;
            t.failed_total = s.failed;
            t.completed_total = s.done + s.failed;
            t.latency = s.latency;
        }
        t.recent = self.recent.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect();
        t
    }

    /// Raised flags, from the `flags` service's `FLAG_LIST` (empty when it does not answer).
    async fn flags(&self) -> Vec<FlagRow> {
        let asked = tokio::time::timeout(SNAPSHOT_TIMEOUT, self.owner.client().flags_list(false)).await;
        let Ok(Ok(list)) = asked else { return Vec::new() };
        list.into_iter()
            .map(|f| FlagRow {
                name: f.name.clone(),
                source: format!("{}/{}", f.unit, f.section),
                priority: f.priority,
                message: f.message.clone(),
                tags: f.tags.iter().cloned().collect(),
                manual_down: f.manual_down,
                modified_ms: f.modified,
            })
            .collect()
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppLabel {
    app: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppOutcome {
    app: String,
    outcome: &'static str,
}

/// The node's metrics: the registry `/metrics` serves and what the node records into it.
pub struct NodeMetrics {
    registry: Arc<nodus_http::Metrics>,
    invoke_latency: Family<AppLabel, Histogram, fn() -> Histogram>,
    invokes: Family<AppOutcome, Counter>,
}

impl std::fmt::Debug for NodeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeMetrics").finish_non_exhaustive()
    }
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~105 s, doubling (as the gateway's).
    Histogram::new(exponential_buckets(0.000_05, 2.0, 22))
}

impl NodeMetrics {
    /// A registry with the node's own metrics registered.
    pub(crate) fn new() -> NodeMetrics {
        let m = NodeMetrics {
            registry: Arc::new(nodus_http::Metrics::new()),
            invoke_latency: Family::new_with_constructor(latency_histogram),
            invokes: Family::default(),
        };
        m.registry.register(|r| {
            r.register_with_unit(
                "nodus_app_invoke_latency",
                "Time from a message to an app's service to the worker's last chunk",
                Unit::Seconds,
                m.invoke_latency.clone(),
            );
            r.register(
                "nodus_app_invokes",
                "Invocations of apps through their services, by outcome",
                m.invokes.clone(),
            );
        });
        m
    }

    /// Adds the collector that reads the router and the driver at each scrape.
    pub(crate) fn collect_from(&self, shared: Weak<Shared>) {
        self.registry.register(|r| r.register_collector(Box::new(NodeCollector { shared })));
    }

    /// The registry.
    pub(crate) fn registry(&self) -> &Arc<nodus_http::Metrics> {
        &self.registry
    }

    /// One invocation of `app` through its service finished.
    pub(crate) fn invoked(&self, app: &str, ok: bool, took: Duration) {
        self.invoke_latency.get_or_create(&AppLabel { app: app.to_string() }).observe(took.as_secs_f64());
        let outcome = if ok { "ok" } else { "error" };
        self.invokes.get_or_create(&AppOutcome { app: app.to_string(), outcome }).inc();
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Listener {
    listener: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Peer {
    peer: String,
}

/// Reads the router's and the driver's counters at scrape time.
struct NodeCollector {
    shared: Weak<Shared>,
}

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCollector").finish_non_exhaustive()
    }
}

/// Encodes one metric (a family or a single value) under `name`.
fn emit(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    metric: &impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    let e = encoder.encode_descriptor(name, help, unit, metric.metric_type())?;
    metric.encode(e)
}

fn counter(v: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(v);
    c
}

fn gauge(v: i64) -> Gauge {
    let g = Gauge::default();
    g.set(v);
    g
}

impl prometheus_client::collector::Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(shared) = self.shared.upgrade() else { return Ok(()) };
        let v = shared.router_view();
        let s = &v.stats;
        let messages: Family<Outcome, Counter> = Family::default();
        for (outcome, n) in [
            ("received", s.received),
            ("delivered", s.delivered),
            ("cached", s.cached),
            ("invalid", s.invalid),
            ("expired", s.expired),
            ("undeliverable", s.undeliverable),
            ("forbidden", s.forbidden),
            ("overloaded", s.overloaded),
            ("refused", s.refused),
        ] {
            messages.get_or_create(&Outcome { outcome }).inc_by(n);
        }
        emit(&mut encoder, "nodus_messages", "Messages routed by this node, by outcome", None, &messages)?;
        let counters = shared.counters();
        let family = Family::<Listener, Counter>::default;
        let (bytes_in, bytes_out, accepted, refused, timeouts) = (family(), family(), family(), family(), family());
        for kind in ListenerKind::ALL {
            let l = counters.listener(kind);
            let label = Listener { listener: kind.name() };
            let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
            bytes_in.get_or_create(&label).inc_by(get(&l.bytes_in));
            bytes_out.get_or_create(&label).inc_by(get(&l.bytes_out));
            accepted.get_or_create(&label).inc_by(get(&l.accepted));
            refused.get_or_create(&label).inc_by(get(&l.refused));
            timeouts.get_or_create(&label).inc_by(get(&l.handshake_timeouts));
        }
        emit(
            &mut encoder,
            "nodus_received",
            "Bytes read from connections, by listener",
            Some(&Unit::Bytes),
            &bytes_in,
        )?;
        emit(&mut encoder, "nodus_sent", "Bytes written to connections, by listener", Some(&Unit::Bytes), &bytes_out)?;
        emit(&mut encoder, "nodus_connections_accepted", "Connections admitted, by listener", None, &accepted)?;
        emit(&mut encoder, "nodus_connections_refused", "Connections closed at once: listener full", None, &refused)?;
        emit(&mut encoder, "nodus_handshake_timeouts", "Connections closed without a first message", None, &timeouts)?;
        let snap = counters.snapshot();
        emit(
            &mut encoder,
            "nodus_slow_consumer_cuts",
            "Connections cut for a full outbound queue",
            None,
            &counter(snap.slow_consumer_cuts),
        )?;
        emit(
            &mut encoder,
            "nodus_budget_cuts",
            "Connections cut to keep within the node's input and output budgets",
            None,
            &counter(snap.input_cuts + snap.output_cuts),
        )?;
        emit(
            &mut encoder,
            "nodus_buffered_input",
            "Undecoded input held, beyond each connection's allowance",
            Some(&Unit::Bytes),
            &gauge(snap.input_bytes as i64),
        )?;
        emit(
            &mut encoder,
            "nodus_buffered_output",
            "Queued output not yet written, beyond each connection's allowance",
            Some(&Unit::Bytes),
            &gauge(snap.output_bytes as i64),
        )?;
        emit(&mut encoder, "nodus_pending_requests", "Requests awaiting a reply", None, &gauge(v.pending as i64))?;
        emit(
            &mut encoder,
            "nodus_cached_messages",
            "Messages cached for expected services",
            None,
            &gauge(v.cached as i64),
        )?;
        emit(
            &mut encoder,
            "nodus_clients",
            "Client connections (built-in services included)",
            None,
            &gauge(v.clients as i64),
        )?;
        let rtt: Family<Peer, Gauge> = Family::default();
        let offset: Family<Peer, Gauge> = Family::default();
        for l in &v.own_links {
            if let Some(r) = l.rtt_ms {
                rtt.get_or_create(&Peer { peer: l.peer.clone() }).set(r);
            }
            if let Some(o) = l.offset_ms {
                offset.get_or_create(&Peer { peer: l.peer.clone() }).set(o);
            }
        }
        emit(&mut encoder, "nodus_link_rtt_ms", "Latest round trip on each link, ms", None, &rtt)?;
        emit(&mut encoder, "nodus_link_clock_offset_ms", "Clock offset to each linked node, ms", None, &offset)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_read_as_notices() {
        let m = Message::new("UNREACHABLE").param("server", "b");
        assert_eq!(notice_of(&m), Some(Notice { kind: NoticeKind::Node, text: "node b unreachable".into() }));
        let m = Message::new("CLUSTER_DOWN").param("live", 1).param("known", 3);
        assert_eq!(notice_of(&m).unwrap().text, "cluster down (no quorum): 1 of 3 nodes live");
        let m = Message::new("TASK_STATUS").param("id", "t1").param("procedure", "procs.add").param("status", "done");
        assert_eq!(notice_of(&m), Some(Notice { kind: NoticeKind::Task, text: "task t1 (procs.add) done".into() }));
        assert_eq!(notice_of(&Message::new("WATCHING")), None);
    }

    #[test]
    fn recent_tasks_keep_the_latest_change_first_and_are_bounded() {
        let change = |id: &str, status: &str| TaskChange {
            id: id.into(),
            procedure: "procs.add".into(),
            status: status.into(),
            attempt: 1,
        };
        let mut r = VecDeque::new();
        remember(&mut r, change("a", "running"));
        remember(&mut r, change("b", "running"));
        remember(&mut r, change("a", "done"));
        let ids: Vec<(&str, &str)> = r.iter().map(|t| (t.id.as_str(), t.status.as_str())).collect();
        assert_eq!(ids, vec![("a", "done"), ("b", "running")]);
        remember(&mut r, change("b", "deleted"));
        assert_eq!(r.len(), 1);
        for i in 0..2 * RECENT_TASKS {
            remember(&mut r, change(&format!("t{i}"), "pending"));
        }
        assert_eq!(r.len(), RECENT_TASKS);
        assert_eq!(r[0].id, format!("t{}", 2 * RECENT_TASKS - 1));
    }
}
