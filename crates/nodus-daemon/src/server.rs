//! The node's I/O driver: listeners, one reader and one writer task per connection, neighbour
//! dialers, the periodic tick, persistence and graceful shutdown. All protocol decisions are made
//! by the [`Router`]; this module only moves bytes and applies [`Action`]s.
//!
//! - `accept`: one accept loop for every listener (client TCP, Unix socket, cluster, TLS
//!   cluster): the same error backoff, the same per-listener connection limit, one tracing span
//!   per connection.
//! - `conn`: a connection's reader (form detection, handshake deadline, batches of units under
//!   one lock) and writer (bounded queue, batched writes).
//! - `budget`: the node-wide memory budgets for buffered input and output.
//! - `persist`: the known-nodes file, written by its own task off the router lock.
//! - `dial` and `udp`: neighbour dialers and the UDP signal port.
//!
//! Bounds enforced here: `max_connections` per listener (more are closed at once),
//! `handshake_timeout_ms` (a connection that has not sent its first complete message by then is
//! closed), `max_frame_bytes` (a longer frame or line closes the connection after an `INVALID`),
//! the per-connection outbound queue (`max_outbound_messages`/`max_outbound_bytes`: a consumer
//! that falls behind is cut; a registered service's queue refuses offers past its soft mark or
//! the sender's share instead, [`Pressure`], and a service that stops writing with offers queued
//! is cut after `outbound_stall_secs`), and the node-wide `max_buffered_input_bytes` /
//! `max_buffered_output_bytes` (the connection holding the most is cut).
//!
//! A cut connection is disconnected from the router at once, under the same lock that found it
//! over its bound, so the router answers its callers without waiting for the connection's tasks
//! to notice; its buffers are released when its tasks end, which they do promptly even when the
//! peer never reads.

mod accept;
mod budget;
mod conn;
mod dial;
mod persist;
mod udp;

pub use budget::{Counters, ListenerKind, ListenerSnapshot, Snapshot, BUDGET_ALLOWANCE_BYTES};

use crate::auth::Origin;
use crate::clock::Clock;
use crate::config::Config;
use crate::router::{Action, ConnId, LinkPolicy, Pressure, Queue, Router, RouterConfig, RouterLimits, Verdict};
use accept::{TcpAccept, UnixAccept};
use anyhow::Context;
use budget::Meter;
use nodus_wire::node::Permission;
use nodus_wire::Message;
use persist::Persist;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, UdpSocket, UnixListener};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// The router connection id standing for the UDP signal port (one-way: nothing is sent back).
const UDP_CONN: ConnId = 0;
/// Bytes released by connections after which the tick returns free memory to the system.
const TRIM_AFTER: u64 = 16 * 1024 * 1024;
/// How long close waits for connections to finish writing before cutting them.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Bytes in flight each way on an in-process connection.
const IN_PROCESS_BUFFER: usize = 256 * 1024;

/// What the router sends a connection, through its bounded queue.
// Messages are the hot path: boxing them would cost an allocation per routed message.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Outbound {
    /// A message and the bytes it was counted as on its connection's queue.
    Msg(Message, usize),
    /// A message offered to a registered service, the bytes it was counted as, and its sender,
    /// whose share of the queue it holds until written (socket connections only).
    Offered(Message, usize, ConnId),
    /// Close once everything before this is written.
    Close,
}

/// Heartbeats (`LINK_PING`, `LINK_PONG`) waiting in a connection's own lane, written ahead of
/// everything else queued (a heartbeat never waits behind gossip); past this, they queue with
/// the rest.
pub(crate) const HEARTBEAT_LANE: usize = 16;

impl Handle {
    /// Queues `msg` for a built-in service, which reads its queue in-process: no backpressure;
    /// a full queue drops the message (warned about once).
    fn send_in_process(&mut self, conn: ConnId, msg: Message) {
        if self.tx.try_send(Outbound::Msg(msg, 0)).is_err() && !self.warned {
            warn!(conn, "in-process service queue full: dropping messages for it");
            self.warned = true;
        }
    }
}

/// The driver's side of one connection.
struct Handle {
    tx: mpsc::Sender<Outbound>,
    /// The heartbeat lane of a socket connection ([`HEARTBEAT_LANE`]).
    lane: Option<mpsc::Sender<Message>>,
    /// Closes the connection now, without writing what is queued.
    kill: CancellationToken,
    /// What a socket connection holds in memory; `None` for in-process services, whose queue is
    /// bounded by message count only (nothing counts their bytes down).
    meter: Option<Arc<Meter>>,
    /// An in-process service's full queue was already reported.
    warned: bool,
}

struct State {
    router: Router,
    handles: crate::router::IdMap<ConnId, Handle>,
    /// When the flusher was last told the router wants [`Router::flush`].
    flush_told: Option<i64>,
}

/// The known nodes, as the router hands them out to be persisted.
type KnownNodes = Vec<crate::topology::KnownNode>;

pub(crate) struct Shared {
    state: Mutex<State>,
    config: Config,
    clock: Clock,
    tls: Option<crate::tls::Tls>,
    /// Cancelled when the node starts shutting down: listeners stop accepting.
    stop: CancellationToken,
    idle: Notify,
    /// Wakes the flusher: the router wants [`Router::flush`] at another time.
    flush_wake: Notify,
    next_conn: AtomicU64,
    counters: Arc<Counters>,
    /// Backpressure marks of registered services' queues.
    pressure: Pressure,
    persist: Persist<KnownNodes>,
    engine: Option<nodus_engine::Engine>,
    locator: Option<nodus_engine::LocatorHandle>,
    /// Makes the router's cache journal durable (set once its thread runs).
    cache_writer: std::sync::OnceLock<crate::cache_store::CacheWriter>,
    /// The node's metrics registry (served at `/metrics`) and what the node records into it.
    metrics: crate::http::NodeMetrics,
    /// The node's flags (the `flags` service and the node's own watchers).
    flags: crate::flags::NodeFlags,
    /// Connections of apps' bridges.
    app_bridges: Mutex<std::collections::HashSet<ConnId>>,
    /// Parts of the node that run components of their own (the tasks mount).
    component_sources: Mutex<Vec<Arc<dyn crate::control::ComponentSource>>>,
}

/// The cluster's directory of app endpoints, for the node's locator.
struct ClusterDirectory(std::sync::Weak<Shared>);

impl nodus_engine::Directory for ClusterDirectory {
    fn lookup(&self, app: &str) -> Vec<(String, u16)> {
        self.0.upgrade().map(|shared| shared.lock().router.app_elsewhere(app)).unwrap_or_default()
    }
}

impl Shared {
    /// An in-process service: a connection with no socket, registered as `name`. What the router
    /// delivers to it arrives on the returned queue; its answers go in through [`Shared::inject`].
    pub(crate) fn attach(&self, name: &str) -> (ConnId, mpsc::Receiver<Outbound>) {
        self.attach_with(name, None)
    }

    /// An in-process service that declares its commands and the permission each needs (others
    /// are answered `UNKNOWN`); the router checks every message delivered to it against these.
    /// `None`: it takes any command, each needing `send` (an app's bridge).
    pub(crate) fn attach_with(
        &self,
        name: &str,
        commands: Option<&[(&str, Permission)]>,
    ) -> (ConnId, mpsc::Receiver<Outbound>) {
        let id = self.next_conn_id();
        let (tx, rx) = mpsc::channel(self.config.limits.max_outbound_messages);
        let handle = Handle { tx, lane: None, kill: CancellationToken::new(), meter: None, warned: false };
        let mut out = Vec::new();
        let mut st = self.lock();
        st.handles.insert(id, handle);
        st.router.connect(id, Origin::Internal);
        let register = Message::new("REGISTER").param("service", name).param("version", 1);
        st.router.handle(id, register, self.clock.now_ms(), &mut out);
        if let Some(commands) = commands {
            st.router.declare_commands(id, commands);
        }
        self.apply(&mut st, &mut out);
        (id, rx)
    }

    /// An app's bridge: an in-process service registered as the app's name, known to the
    /// control plane as the app rather than as a service.
    pub(crate) fn attach_app(&self, name: &str) -> (ConnId, mpsc::Receiver<Outbound>) {
        let (conn, rx) = self.attach(name);
        self.app_bridges.lock().unwrap_or_else(|e| e.into_inner()).insert(conn);
        (conn, rx)
    }

    /// Makes the components of `source` part of the node's component tree.
    pub(crate) fn add_component_source(&self, source: Arc<dyn crate::control::ComponentSource>) {
        self.component_sources.lock().unwrap_or_else(|e| e.into_inner()).push(source);
    }

    /// The parts of the node that run components of their own.
    pub(crate) fn component_sources(&self) -> Vec<Arc<dyn crate::control::ComponentSource>> {
        self.component_sources.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// True when `conn` is an app's bridge.
    pub(crate) fn is_app_bridge(&self, conn: ConnId) -> bool {
        self.app_bridges.lock().unwrap_or_else(|e| e.into_inner()).contains(&conn)
    }

    /// Every registered service instance (for the control plane's tree).
    pub(crate) fn registered(&self) -> Vec<crate::router::Registered> {
        self.lock().router.registered()
    }

    /// Other nodes known but unreachable now.
    pub(crate) fn unreachable_nodes(&self) -> Vec<String> {
        self.lock().router.unreachable_nodes()
    }

    /// Sends `msg` from in-process service `origin` to the service instance on `target` (see
    /// [`Router::deliver_to`]).
    ///
    /// Fails as [`Router::deliver_to`] does.
    pub(crate) fn deliver_to(
        &self,
        origin: ConnId,
        target: ConnId,
        msg: Message,
    ) -> Result<(), crate::router::DeliverError> {
        let mut out = Vec::new();
        let mut st = self.lock();
        let result = st.router.deliver_to(origin, target, msg, self.clock.now_ms(), &mut out);
        self.apply(&mut st, &mut out);
        result
    }

    /// Closes connection `conn` once what is queued for it is written (a killed service).
    pub(crate) fn close(&self, conn: ConnId) {
        let mut out = vec![Action::Close(conn)];
        let mut st = self.lock();
        self.apply(&mut st, &mut out);
    }

    /// Starts the node's graceful shutdown (a killed node).
    pub(crate) fn shutdown(&self) {
        self.stop.cancel();
    }

    /// A message from an in-process service.
    pub(crate) fn inject(&self, conn: ConnId, msg: Message) {
        let mut out = Vec::new();
        let mut st = self.lock();
        st.router.handle(conn, msg, self.clock.now_ms(), &mut out);
        self.apply(&mut st, &mut out);
    }

    /// Removes an in-process service; its queue closes.
    pub(crate) fn detach(&self, conn: ConnId) {
        self.app_bridges.lock().unwrap_or_else(|e| e.into_inner()).remove(&conn);
        let mut out = Vec::new();
        let mut st = self.lock();
        st.router.disconnect(conn, &mut out);
        self.apply(&mut st, &mut out);
        st.handles.remove(&conn);
    }

    /// Instances of service `name` registered on this node.
    pub(crate) fn instances(&self, name: &str) -> usize {
        self.lock().router.instances(name)
    }

    /// Publishes this node's app endpoints to the cluster.
    pub(crate) fn set_app_endpoints(&self, apps: std::collections::BTreeMap<String, (String, u16)>) {
        let mut out = Vec::new();
        let mut st = self.lock();
        st.router.set_app_endpoints(apps, &mut out);
        self.apply(&mut st, &mut out);
    }

    /// The node's locator, when apps are enabled.
    pub(crate) fn locator(&self) -> Option<&nodus_engine::LocatorHandle> {
        self.locator.as_ref()
    }

    /// The node configuration.
    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// The node's clock, now (Unix ms).
    pub(crate) fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Other nodes reachable now.
    pub(crate) fn live_nodes(&self) -> Vec<String> {
        self.lock().router.live_nodes()
    }

    /// The node's flags.
    pub(crate) fn flags(&self) -> &crate::flags::NodeFlags {
        &self.flags
    }

    /// The node's engine, when apps are enabled.
    pub(crate) fn engine(&self) -> Option<&nodus_engine::Engine> {
        self.engine.as_ref()
    }

    /// The driver's counters.
    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The node's metrics.
    pub(crate) fn metrics(&self) -> &crate::http::NodeMetrics {
        &self.metrics
    }

    /// The router as the dashboard and the metrics show it.
    pub(crate) fn router_view(&self) -> crate::router::RouterView {
        let now = self.clock.now_ms();
        self.lock().router.view(now)
    }

    /// A connection from inside the node that goes through the router like a client's, with
    /// `origin` deciding its principal (the HTTP API's connections): one end is served as a
    /// connection, the other is returned. Fails once the node is stopping.
    pub(crate) fn open_in_process(self: &Arc<Self>, origin: Origin) -> std::io::Result<tokio::io::DuplexStream> {
        if self.stop.is_cancelled() {
            return Err(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "the node is stopping"));
        }
        let (ours, theirs) = tokio::io::duplex(IN_PROCESS_BUFFER);
        let id = self.next_conn_id();
        let deadline = tokio::time::Instant::now() + self.config.handshake_timeout();
        self.counters.listener(ListenerKind::Http).accepted.fetch_add(1, Ordering::Relaxed);
        let (r, w) = tokio::io::split(ours);
        let span = tracing::debug_span!("conn", conn = id, peer = "in-process", listener = ListenerKind::Http.name());
        use tracing::Instrument;
        tokio::spawn(
            conn::connection(self.clone(), ListenerKind::Http, id, r, w, origin, deadline, None).instrument(span),
        );
        Ok(theirs)
    }

    /// Runs `f` on the router under the lock and applies the actions it pushed.
    pub(crate) fn with_router(&self, f: &mut dyn FnMut(&mut Router, &mut Vec<Action>)) {
        let mut out = Vec::new();
        let mut st = self.lock();
        f(&mut st.router, &mut out);
        self.apply(&mut st, &mut out);
    }

    fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock is a bug; keep serving with the state as it is.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies the router's actions. Runs under the router lock and never blocks: messages go
    /// into bounded queues with `try_send`, persistence is handed to its own task. A connection
    /// over its own outbound bound, or the biggest holder when the node's output budget is
    /// exceeded, is cut here, and the router learns of it at once (its callers get answered).
    fn apply(&self, state: &mut State, actions: &mut Vec<Action>) {
        let max_bytes = self.config.limits.max_outbound_bytes;
        let budget = &self.counters.output;
        // Bytes queued by this call, added to the node-wide count in one go.
        let mut added = 0usize;
        let mut base = budget.used();
        let mut cuts: Vec<ConnId> = Vec::new();
        // What refused offers produce (their senders' errors), applied in the next round.
        let mut later = Vec::new();
        loop {
            for action in actions.drain(..) {
                match action {
                    Action::Deliver(conn, msg) => {
                        let Some(h) = state.handles.get_mut(&conn) else { continue };
                        let Some(meter) = &h.meter else {
                            h.send_in_process(conn, msg);
                            continue;
                        };
                        if h.kill.is_cancelled() {
                            continue;
                        }
                        let msg = match &h.lane {
                            Some(lane) if matches!(msg.command.as_str(), "LINK_PING" | "LINK_PONG") => {
                                match lane.try_send(msg) {
                                    Ok(()) => continue,
                                    Err(e) => e.into_inner(),
                                }
                            }
                            _ => msg,
                        };
                        let size = msg.approx_size();
                        let queued = meter.queued();
                        if queued + size > max_bytes || h.tx.try_send(Outbound::Msg(msg, size)).is_err() {
                            self.cut_slow_consumer(h, conn, queued, &mut cuts);
                            continue;
                        }
                        added += meter.queue(size);
                        self.keep_output_budget(state, &mut base, &mut added, &mut cuts);
                    }
                    Action::Offer { to, from, msg } => {
                        let Some(h) = state.handles.get_mut(&to) else { continue };
                        let Some(meter) = &h.meter else {
                            h.send_in_process(to, msg);
                            continue;
                        };
                        if h.kill.is_cancelled() {
                            continue;
                        }
                        let size = msg.approx_size();
                        let queue = Queue {
                            bytes: meter.queued(),
                            messages: h.tx.max_capacity() - h.tx.capacity(),
                            from_sender: meter.share(from),
                            last_write: meter.progress(),
                        };
                        let now = self.clock.now_ms();
                        let verdict = self.pressure.offer(queue, size, now);
                        if verdict != Verdict::Accept {
                            if verdict == Verdict::Stalled {
                                warn!(conn = to, queued = queue.bytes, "service stopped reading: cutting it");
                                self.counters.slow_consumer_cuts.fetch_add(1, Ordering::Relaxed);
                                h.kill.cancel();
                                cuts.push(to);
                            }
                            state.router.overloaded(to, from, &msg, verdict == Verdict::Share, &mut later);
                            continue;
                        }
                        if h.tx.try_send(Outbound::Offered(msg, size, from)).is_err() {
                            self.cut_slow_consumer(h, to, queue.bytes, &mut cuts);
                            continue;
                        }
                        if queue.bytes == 0 {
                            meter.progressed(now);
                        }
                        meter.add_share(from, size);
                        added += meter.queue(size);
                        self.keep_output_budget(state, &mut base, &mut added, &mut cuts);
                    }
                    Action::Close(conn) => {
                        if let Some(h) = state.handles.get(&conn) {
                            if h.tx.try_send(Outbound::Close).is_err() {
                                h.kill.cancel();
                            }
                        }
                    }
                    Action::Shutdown => self.stop.cancel(),
                    Action::SaveNodes(nodes) => self.persist.save(nodes),
                    Action::PersistCache => {
                        if let Some(w) = self.cache_writer.get() {
                            w.signal();
                        }
                    }
                }
            }
            actions.append(&mut later);
            if cuts.is_empty() && actions.is_empty() {
                break;
            }
            // The router forgets cut connections now; what that produces is applied in turn.
            for conn in cuts.drain(..) {
                self.cut(state, conn);
                state.router.disconnect(conn, actions);
            }
        }
        let due = state.router.flush_at();
        if due.is_some() && due != state.flush_told {
            state.flush_told = due;
            self.flush_wake.notify_one();
        }
        budget.add(added);
        if state.router.is_quitting() && state.router.pending_len() == 0 {
            self.idle.notify_waiters();
        }
    }

    /// Marks a connection whose outbound queue is full (it reads too slowly) to be cut: its
    /// tasks stop now, the router learns of it once this round of actions is applied.
    fn cut_slow_consumer(&self, h: &Handle, conn: ConnId, queued: usize, cuts: &mut Vec<ConnId>) {
        warn!(conn, queued, "slow consumer: outbound queue full, cutting it");
        self.counters.slow_consumer_cuts.fetch_add(1, Ordering::Relaxed);
        h.kill.cancel();
        cuts.push(conn);
    }

    /// Keeps the node within its output budget after `added` more bytes were queued by this
    /// call (`base` is what the budget held before them): once they would take it past the
    /// limit, they are counted (so every queue's share is known) and the biggest queues are cut
    /// until it is within the limit again.
    fn keep_output_budget(&self, state: &mut State, base: &mut usize, added: &mut usize, cuts: &mut Vec<ConnId>) {
        let budget = &self.counters.output;
        if *base + *added <= budget.limit() {
            return;
        }
        budget.add(std::mem::take(added));
        *base = budget.used();
        while *base > budget.limit() {
            let Some(victim) = biggest(&state.handles, Meter::queued) else { break };
            warn!(conn = victim, used = *base, "output budget exceeded: cutting the biggest queue");
            budget.cuts.fetch_add(1, Ordering::Relaxed);
            self.cut(state, victim);
            cuts.push(victim);
            *base = budget.used();
        }
    }

    /// Cuts every service that has others' messages queued and has written nothing for the
    /// stall time: it stopped reading (the router learns of it now, its callers are answered).
    fn cut_stalled(&self, state: &mut State, now: i64, out: &mut Vec<Action>) {
        let stalled: Vec<ConnId> = state
            .handles
            .iter()
            .filter(|(_, h)| !h.kill.is_cancelled())
            .filter_map(|(id, h)| Some((*id, h.meter.as_ref()?)))
            .filter(|(_, m)| m.has_shares() && now.saturating_sub(m.progress()) >= self.pressure.stall_ms)
            .map(|(id, _)| id)
            .collect();
        for conn in stalled {
            warn!(conn, "service stopped reading: cutting it");
            self.counters.slow_consumer_cuts.fetch_add(1, Ordering::Relaxed);
            self.cut(state, conn);
            state.router.disconnect(conn, out);
        }
    }

    /// Closes a socket connection now: its tasks stop, what it holds leaves the node's budgets,
    /// and further messages for it are dropped. The caller tells the router.
    fn cut(&self, state: &mut State, conn: ConnId) {
        if let Some(h) = state.handles.remove(&conn) {
            h.kill.cancel();
            if let Some(m) = &h.meter {
                m.release_all(&self.counters);
            }
        }
    }

    /// Cuts the connections holding the most undecoded input until the node is within its input
    /// budget.
    fn trim_input(&self) {
        let budget = &self.counters.input;
        let mut out = Vec::new();
        let mut st = self.lock();
        while budget.used() > budget.limit() {
            let Some(victim) = biggest(&st.handles, Meter::input) else { break };
            warn!(conn = victim, used = budget.used(), "input budget exceeded: cutting the biggest partial input");
            budget.cuts.fetch_add(1, Ordering::Relaxed);
            self.cut(&mut st, victim);
            st.router.disconnect(victim, &mut out);
        }
        self.apply(&mut st, &mut out);
    }
}

/// The live socket connection holding the most by `measure`, if it holds anything.
fn biggest(handles: &crate::router::IdMap<ConnId, Handle>, measure: fn(&Meter) -> usize) -> Option<ConnId> {
    handles
        .iter()
        .filter(|(_, h)| !h.kill.is_cancelled())
        .filter_map(|(id, h)| Some((*id, measure(h.meter.as_ref()?))))
        .filter(|(_, held)| *held > 0)
        .max_by_key(|(_, held)| *held)
        .map(|(id, _)| id)
}

/// A bound but not yet running node.
pub struct Daemon {
    shared: Arc<Shared>,
    tcp: Option<TcpListener>,
    unix: Option<(UnixListener, PathBuf)>,
    cluster: Option<TcpListener>,
    udp: Option<UdpSocket>,
    tls_listener: Option<TcpListener>,
    locator: Option<nodus_engine::Locator>,
    neighbors: Vec<String>,
    http: Option<crate::http::Bound>,
    /// The arpcp listener of the task service, when tasks and it are on.
    arpcp: Option<TcpListener>,
}

impl Daemon {
    /// Creates the data directory and binds the configured listeners, on the system clock.
    ///
    /// Fails when a listener cannot be bound (address in use, permissions), another node already
    /// listens on the Unix socket, the TLS files are invalid, or the plain cluster listener would
    /// be reachable beyond loopback without a secret.
    pub async fn bind(config: Config) -> anyhow::Result<Daemon> {
        Daemon::bind_with_clock(config, Clock::system()).await
    }

    /// [`Daemon::bind`] with the node's clock given (tests run nodes on tokio's paused clock).
    ///
    /// Fails as [`Daemon::bind`] does.
    pub async fn bind_with_clock(config: Config, clock: Clock) -> anyhow::Result<Daemon> {
        raise_open_files_limit();
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
        // Bound before the node's own sockets: whoever sees the node's socket can reach arpcp.
        let arpcp = crate::tasks::bind_arpcp(&config).await?;
        let tcp = if config.tcp_listen.is_empty() {
            None
        } else {
            Some(
                TcpListener::bind(&config.tcp_listen)
                    .await
                    .with_context(|| format!("cannot listen on TCP {}", config.tcp_listen))?,
            )
        };
        let unix = if config.unix_socket.as_os_str().is_empty() {
            None
        } else {
            let path = config.unix_socket.clone();
            Some((bind_unix(&path).await?, path))
        };
        let tls = crate::tls::Tls::load(&config.cluster)?;
        let cluster = match config.cluster.listen.as_str() {
            "" => None,
            addr if tls.is_some() => {
                // With TLS every link is authenticated by certificate; a plain listener next to it
                // would let a peer without one in.
                info!(%addr, "TLS is configured: the plain cluster listener is off (links use tls_listen)");
                None
            }
            addr => {
                let l = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen for cluster links on {addr}"))?;
                let bound = l.local_addr()?;
                if !bound.ip().is_loopback() && config.cluster.secret.is_empty() {
                    anyhow::bail!(
                        "the cluster listener {bound} is reachable beyond loopback but no cluster secret is set: \
                         any host could join the cluster. Set [cluster] secret_file (or the NODUS_SECRET \
                         environment variable), or configure TLS (tls_cert, tls_key, tls_ca, tls_listen), or \
                         listen on 127.0.0.1"
                    );
                }
                Some(l)
            }
        };
        let udp = match config.cluster.udp_listen.as_str() {
            "" => None,
            addr => {
                Some(UdpSocket::bind(addr).await.with_context(|| format!("cannot bind the UDP signal port {addr}"))?)
            }
        };
        let mut advertised = config.cluster.advertised().to_string();
        if let (Some(l), true) = (&cluster, advertised.ends_with(":0")) {
            // Bound to an ephemeral port: advertise the port actually bound.
            advertised = l.local_addr()?.to_string();
        }
        let tls_listener = match config.cluster.tls_listen.as_str() {
            _ if tls.is_none() => None,
            "" => None,
            addr => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen for TLS cluster links on {addr}"))?,
            ),
        };
        if let (Some(l), true) = (&tls_listener, advertised.ends_with(":0")) {
            advertised = l.local_addr()?.to_string();
        }
        let remembered = persist::load_nodes(&config.data_dir);
        let mut neighbors = config.cluster.neighbors.clone();
        for n in remembered.iter().take(config.cluster.max_nodes) {
            if n.neighbor && !n.addr.is_empty() && !neighbors.contains(&n.addr) {
                neighbors.push(n.addr.clone());
            }
        }
        // Absolute, so that what `forbidden` answers name can be found from anywhere.
        let token_file = config.access.token_path(&config.data_dir);
        let token_file = std::path::absolute(&token_file).unwrap_or(token_file);
        let token = crate::auth::load_or_create_token(&token_file)?;
        let http = crate::http::bind(&config, &token).await?;
        let access = crate::auth::AccessPolicy::new(&config.access, Some(token), token_file, crate::auth::own_uid());
        let mut router = Router::new(
            RouterConfig {
                server: config.server_name.clone(),
                expected: config.expected_services.clone(),
                limits: RouterLimits::from_config(&config.limits),
                links: LinkPolicy::from_config(&config),
                access,
                cluster_addr: advertised,
                durable_cache: true,
                seed: rand::random(),
            },
            clock.now_ms(),
        );
        router.remember(remembered);
        let (cache_store, cached) = crate::cache_store::CacheStore::open(&config.data_dir)
            .with_context(|| format!("cannot open the cache journal in {}", config.data_dir.display()))?;
        router.restore_cache(cached, clock.now_ms(), &mut Vec::new());
        if udp.is_some() {
            router.connect(UDP_CONN, Origin::Datagram);
        }
        let locator_listener = match config.apps.locator_listen.as_str() {
            _ if !config.apps.enabled => None,
            "" => None,
            addr => Some(
                TcpListener::bind(addr).await.with_context(|| format!("cannot listen for the locator on {addr}"))?,
            ),
        };
        let engine = match config.apps.enabled {
            true => {
                let locator = locator_listener.as_ref().and_then(|l| l.local_addr().ok());
                Some(nodus_engine::Engine::new(crate::apps::engine_config(&config, locator)?))
            }
            false => None,
        };
        let locator = match (locator_listener, &engine) {
            (Some(l), Some(engine)) => {
                let lc = nodus_engine::LocatorConfig {
                    advertise_host: (!config.apps.locator_advertise.is_empty())
                        .then(|| config.apps.locator_advertise.clone()),
                    ..nodus_engine::LocatorConfig::default()
                };
                Some(nodus_engine::Locator::from_listener(engine.clone(), lc, l).context("cannot start the locator")?)
            }
            _ => None,
        };
        let nodes_dir = config.data_dir.clone();
        let flags_dir = config.control.flags_path(&config.data_dir);
        let flags = crate::flags::NodeFlags::open(
            flags_dir.clone(),
            &config.server_name,
            config.control.flags_limit,
            clock.clone(),
        )
        .with_context(|| format!("cannot open the flag directory {}", flags_dir.display()))?;
        let shared = Arc::new(Shared {
            flags,
            app_bridges: Mutex::default(),
            component_sources: Mutex::default(),
            engine,
            state: Mutex::new(State { router, handles: Default::default(), flush_told: None }),
            counters: Arc::new(Counters::new(&config.limits)),
            pressure: Pressure::new(
                config.limits.max_outbound_bytes,
                config.limits.max_outbound_messages,
                i64::try_from(config.limits.outbound_stall_secs.saturating_mul(1000)).unwrap_or(i64::MAX),
            ),
            config,
            clock,
            tls,
            stop: CancellationToken::new(),
            idle: Notify::new(),
            flush_wake: Notify::new(),
            next_conn: AtomicU64::new(1),
            persist: Persist::new(move |nodes: &KnownNodes| persist::save_nodes(&nodes_dir, nodes)),
            locator: locator.as_ref().map(|l| l.handle()),
            cache_writer: std::sync::OnceLock::new(),
            metrics: crate::http::NodeMetrics::new(),
        });
        shared.metrics.collect_from(Arc::downgrade(&shared));
        let weak = Arc::downgrade(&shared);
        let writer = crate::cache_store::CacheWriter::start(cache_store, move |f| {
            if let Some(shared) = weak.upgrade() {
                shared.with_router(f);
            }
        });
        writer.signal();
        let _ = shared.cache_writer.set(writer);
        if let Some(l) = &shared.locator {
            l.set_directory(Arc::new(ClusterDirectory(Arc::downgrade(&shared))));
        }
        Ok(Daemon { shared, tcp, unix, cluster, udp, tls_listener, locator, neighbors, http, arpcp })
    }

    /// Makes the components of `source` (tasks) part of the node's component tree: listed,
    /// monitored and killed like the others (see [`crate::control::ComponentSource`]).
    pub fn add_component_source(&self, source: Arc<dyn crate::control::ComponentSource>) {
        self.shared.component_sources.lock().unwrap_or_else(|e| e.into_inner()).push(source);
    }

    /// The bound cluster listener address, if enabled.
    pub fn cluster_addr(&self) -> Option<SocketAddr> {
        self.cluster.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The bound TLS cluster listener address, if enabled.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The bound locator address, if enabled.
    pub fn locator_addr(&self) -> Option<SocketAddr> {
        self.locator.as_ref().map(|l| l.local_addr())
    }

    /// The bound HTTP listener address, if enabled.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(crate::http::Bound::addr)
    }

    /// The bound UDP signal port, if enabled.
    pub fn udp_addr(&self) -> Option<SocketAddr> {
        self.udp.as_ref().and_then(|s| s.local_addr().ok())
    }

    /// The bound TCP address, if the TCP listener is enabled.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The Unix socket path, if enabled.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix.as_ref().map(|(_, p)| p.as_path())
    }

    /// This node's server name.
    pub fn server_name(&self) -> &str {
        &self.shared.config.server_name
    }

    /// The driver's live counters (connections accepted and refused per listener, timeouts,
    /// cuts, buffered bytes); they stay readable after the node stopped.
    pub fn counters(&self) -> Arc<Counters> {
        self.shared.counters.clone()
    }

    /// Serves until `shutdown` completes or a client sends `STOP`, then drains: new requests are
    /// answered `QUITTING`, requests in flight get `shutdown_grace_secs` to be answered, every
    /// client gets `QUITTING`, and connections close after their queues are written.
    ///
    /// Fails only when a listener's address cannot be read at start.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let running = self.start()?;
        tokio::select! {
            _ = shutdown => info!("shutdown requested"),
            _ = running.shared.stop.cancelled() => info!("STOP received"),
        }
        running.drain().await;
        running.close().await;
        Ok(())
    }

    /// Starts every listener, the dialers, the tick, the persistence task and the built-in
    /// services.
    fn start(self) -> anyhow::Result<Running> {
        let shared = self.shared;
        let tracker = TaskTracker::new();
        let persist = tokio::spawn(shared.persist.run());
        // Built-in services register before any listener accepts: a client connecting as soon as
        // the node is reachable finds them.
        let (tasks, follower) = match shared.engine.clone() {
            Some(engine) if shared.config.tasks.enabled => {
                let (tasks, follower) = crate::tasks::TaskService::start(shared.clone(), engine, self.arpcp);
                (Some(tasks), Some(follower))
            }
            _ => (None, None),
        };
        let apps = shared.engine.clone().map(|engine| crate::apps::Apps::start(shared.clone(), engine, follower));
        let mut listen = std::collections::BTreeMap::new();
        let addrs = [
            ("tcp", self.tcp.as_ref().and_then(|l| l.local_addr().ok())),
            ("cluster", self.cluster.as_ref().and_then(|l| l.local_addr().ok())),
            ("tls", self.tls_listener.as_ref().and_then(|l| l.local_addr().ok())),
            ("locator", self.locator.as_ref().map(|l| l.local_addr())),
            ("http", self.http.as_ref().map(crate::http::Bound::addr)),
        ];
        for (role, addr) in addrs {
            if let Some(a) = addr {
                listen.insert(role.to_string(), a.to_string());
            }
        }
        if let Some((_, p)) = &self.unix {
            listen.insert("unix".to_string(), p.display().to_string());
        }
        let http = self.http.map(|bound| crate::http::start(shared.clone(), bound, listen));
        let flags = crate::flags::start(shared.clone(), shared.flags.clone());
        let control = crate::control::start(shared.clone());
        if let Some(l) = self.tcp {
            info!(addr = %l.local_addr()?, "listening on TCP");
            tracker.spawn(accept::serve(TcpAccept::new(l, ListenerKind::Tcp), shared.clone(), tracker.clone()));
        }
        if let Some(l) = self.cluster {
            info!(addr = %l.local_addr()?, "listening for cluster links");
            tracker.spawn(accept::serve(TcpAccept::new(l, ListenerKind::Cluster), shared.clone(), tracker.clone()));
        }
        if let Some(l) = self.tls_listener {
            info!(addr = %l.local_addr()?, "listening for TLS cluster links");
            tracker.spawn(accept::serve(TcpAccept::new(l, ListenerKind::Tls), shared.clone(), tracker.clone()));
        }
        let unix_path = self.unix.as_ref().map(|(_, p)| p.clone());
        if let Some((l, path)) = self.unix {
            info!(path = %path.display(), "listening on Unix socket");
            tracker.spawn(accept::serve(UnixAccept(l), shared.clone(), tracker.clone()));
        }
        if let Some(udp) = self.udp {
            info!(addr = %udp.local_addr()?, "listening for UDP signals");
            tracker.spawn(udp::serve(shared.clone(), udp));
        }
        let locator_stop = CancellationToken::new();
        let locator = self.locator.map(|l| {
            let stop = locator_stop.clone();
            tokio::spawn(l.run(async move { stop.cancelled().await }))
        });
        for addr in self.neighbors {
            tracker.spawn(dial::dialer(shared.clone(), addr));
        }
        let ticker = tokio::spawn(tick(shared.clone()));
        let flusher = tokio::spawn(flusher(shared.clone()));
        Ok(Running {
            shared,
            tracker,
            ticker,
            flusher,
            apps,
            tasks,
            flags,
            control,
            http,
            locator,
            locator_stop,
            persist,
            unix_path,
        })
    }
}

/// A node that is serving: what [`Daemon::run`] drains and closes.
struct Running {
    shared: Arc<Shared>,
    /// Accept loops, connections, dialers and the UDP port.
    tracker: TaskTracker,
    ticker: tokio::task::JoinHandle<()>,
    /// Runs [`Router::flush`] when the router wants it.
    flusher: tokio::task::JoinHandle<()>,
    apps: Option<crate::apps::Apps>,
    /// The HTTP listener.
    http: Option<crate::http::Mount>,
    /// The `flags` service.
    flags: tokio::task::JoinHandle<()>,
    /// The `control` service.
    control: tokio::task::JoinHandle<()>,
    /// The task service.
    tasks: Option<crate::tasks::TaskService>,
    locator: Option<tokio::task::JoinHandle<()>>,
    locator_stop: CancellationToken,
    persist: tokio::task::JoinHandle<()>,
    unix_path: Option<PathBuf>,
}

impl Running {
    /// Stops accepting, answers new requests `QUITTING` and waits up to the grace period for the
    /// requests in flight. Connections that have not sent their first message yet close at once.
    async fn drain(&self) {
        let shared = &self.shared;
        shared.stop.cancel();
        shared.lock().router.begin_shutdown();
        if let Some(http) = &self.http {
            http.begin_shutdown();
        }
        let grace = Duration::from_secs(shared.config.limits.shutdown_grace_secs);
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let idle = shared.idle.notified();
            let pending = shared.lock().router.pending_len();
            if pending == 0 {
                break;
            }
            debug!(pending, "draining requests in flight");
            tokio::select! {
                _ = idle => {}
                _ = tokio::time::sleep_until(deadline) => {
                    warn!(pending, "grace period over with requests still in flight");
                    break;
                }
            }
        }
    }

    /// Says goodbye to everyone, closes every connection after its queue is written (cutting those
    /// that do not finish in time), stops the built-in services and flushes the known nodes.
    async fn close(self) {
        let shared = &self.shared;
        // HTTP requests in flight finish first (within the grace period): the gateway needs the
        // engine and the API the router.
        if let Some(http) = self.http {
            http.finish().await;
        }
        self.ticker.abort();
        self.flusher.abort();
        {
            let mut out = Vec::new();
            let mut st = shared.lock();
            st.router.farewell(&mut out);
            let ids: Vec<ConnId> = st.handles.keys().copied().collect();
            out.extend(ids.into_iter().map(Action::Close));
            shared.apply(&mut st, &mut out);
        }
        // Cached messages are on disk before the node goes.
        let s = shared.clone();
        let _ = tokio::task::spawn_blocking(move || s.cache_writer.get().map(|w| w.finish())).await;
        self.locator_stop.cancel();
        if let Some(l) = self.locator {
            let _ = l.await;
        }
        // Tasks first: running attempts may finish on the apps' workers and be recorded.
        if let Some(tasks) = self.tasks {
            tasks.shutdown().await;
        }
        if let Some(apps) = self.apps {
            apps.shutdown().await;
        }
        self.flags.abort();
        self.control.abort();
        self.tracker.close();
        if tokio::time::timeout(CLOSE_WAIT, self.tracker.wait()).await.is_err() {
            warn!(tasks = self.tracker.len(), "some connections did not finish writing in time: cutting them");
            for h in shared.lock().handles.values() {
                h.kill.cancel();
            }
            if tokio::time::timeout(CLOSE_WAIT, self.tracker.wait()).await.is_err() {
                warn!(tasks = self.tracker.len(), "some connections did not close in time");
            }
        }
        shared.persist.finish();
        if self.persist.await.is_err() {
            warn!("the known-nodes writer failed");
        }
        if let Some(p) = self.unix_path {
            let _ = std::fs::remove_file(p);
        }
        info!("node stopped");
    }
}

/// The periodic tick: heartbeats, failure detection, request timeouts, cache expiry; and, after
/// connections released [`TRIM_AFTER`] bytes or more, giving the freed memory back to the system
/// (twice: now, and once the cut connections' tasks have surely dropped their buffers).
async fn tick(shared: Arc<Shared>) {
    let period = Duration::from_millis(shared.config.cluster.heartbeat_ms.min(500));
    let mut every = tokio::time::interval(period);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = Vec::new();
    let mut n: u64 = 0;
    let (mut trimmed_at, mut retrim) = (0u64, false);
    loop {
        every.tick().await;
        let released = shared.counters.released.load(Ordering::Relaxed);
        if retrim || released - trimmed_at >= TRIM_AFTER {
            retrim = !retrim;
            trimmed_at = released;
            tokio::task::spawn_blocking(crate::alloc::trim);
        }
        // The kernel's NTP state changes rarely: read it every few seconds.
        let ntp = n.is_multiple_of(20).then(crate::ntp::synchronized);
        n += 1;
        let mut st = shared.lock();
        if let Some(ntp) = ntp {
            st.router.set_ntp(ntp, &mut out);
        }
        let now = shared.clock.now_ms();
        shared.cut_stalled(&mut st, now, &mut out);
        st.router.tick(now, &mut out);
        shared.apply(&mut st, &mut out);
    }
}

/// Runs [`Router::flush`] when the router asks for it ([`Router::flush_at`]): this node's
/// coalesced record and paced floods go out on time, not at the next tick.
async fn flusher(shared: Arc<Shared>) {
    let mut out = Vec::new();
    loop {
        let due = {
            let mut st = shared.lock();
            st.flush_told = st.router.flush_at();
            st.flush_told
        };
        let Some(at) = due else {
            shared.flush_wake.notified().await;
            continue;
        };
        let wait = Duration::from_millis(u64::try_from(at - shared.clock.now_ms()).unwrap_or(0));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shared.flush_wake.notified() => continue,
        }
        let now = shared.clock.now_ms();
        let mut st = shared.lock();
        st.router.flush(now, &mut out);
        shared.apply(&mut st, &mut out);
    }
}

/// Raises the soft limit on open files to the hard one (as Go's runtime does): every listener
/// admits `max_connections`, and the usual soft default (1024) would run out long before.
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    /// Linux's default ceiling (`fs.nr_open`); a larger hard limit is not worth asking for.
    const CEILING: u64 = 1 << 20;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    let want = hard.min(CEILING);
    if soft < want {
        match setrlimit(Resource::RLIMIT_NOFILE, want, hard) {
            Ok(()) => debug!(from = soft, to = want, "raised the open files limit"),
            Err(e) => debug!(error = %e, soft, "cannot raise the open files limit"),
        }
    }
}

async fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            anyhow::bail!(
                "another node is already listening on {}; stop it or choose another unix_socket",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let l = UnixListener::bind(path).with_context(|| format!("cannot listen on Unix socket {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict permissions of {}", path.display()))?;
    Ok(l)
}
