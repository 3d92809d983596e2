//! The node's I/O driver: listeners (Unix socket and TCP), one reader and one writer task per
//! connection, the periodic tick, and graceful shutdown. All protocol decisions are made by the
//! [`Router`]; this module only moves bytes and applies [`Action`]s.
//!
//! Bounds enforced here: `max_connections` (more are refused), `max_frame_bytes` (a longer frame
//! or line closes the connection after an `INVALID`), and the per-connection outbound queue
//! (`max_outbound_messages`/`max_outbound_bytes`: a consumer that falls behind is disconnected).

use crate::auth::{Creds, Origin};
use crate::config::Config;
use crate::router::{Action, ConnId, LinkPolicy, Router, RouterConfig, RouterLimits};
use crate::topology::KnownNode;
use anyhow::Context;
use bytes::BytesMut;
use nodus_wire::node::Permission;
use nodus_wire::{binary, detect, text, Decoded, Form, FrameError, Message};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket, UnixListener};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Wall-clock time in Unix milliseconds (the only clock read in the daemon's routing path).
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Most decoded messages handled under one lock acquisition.
const BATCH: usize = 256;
/// Writer flushes once this many bytes are encoded.
const WRITE_CHUNK: usize = 256 * 1024;
/// Largest datagram accepted on the UDP signal port.
const MAX_DATAGRAM: usize = 1024;
/// The router connection id standing for the UDP signal port (one-way: nothing is sent back).
const UDP_CONN: ConnId = 0;
/// How long dialing a neighbour may take before it is retried.
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// File in the data directory that remembers the cluster's nodes.
const NODES_FILE: &str = "nodes";

// Messages are the hot path: boxing them would cost an allocation per routed message.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Outbound {
    /// A message and the bytes it was counted as on its connection's queue.
    Msg(Message, usize),
    Close,
}

struct Handle {
    tx: mpsc::Sender<Outbound>,
    queued_bytes: Arc<AtomicUsize>,
    kill: CancellationToken,
    /// Socket connections count queued bytes (their writer counts them down).
    count_bytes: bool,
}

struct State {
    router: Router,
    handles: crate::router::IdMap<ConnId, Handle>,
}

pub(crate) struct Shared {
    state: Mutex<State>,
    config: Config,
    tls: Option<crate::tls::Tls>,
    stop: CancellationToken,
    idle: Notify,
    next_conn: AtomicU64,
    engine: Option<nodus_engine::Engine>,
    locator: Option<nodus_engine::LocatorHandle>,
    /// Makes the router's cache journal durable (set once its thread runs).
    cache_writer: std::sync::OnceLock<crate::cache_store::CacheWriter>,
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
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.config.limits.max_outbound_messages);
        // In-process services take messages off their queue without a writer to count bytes down:
        // their queue is bounded by message count only.
        let handle = Handle {
            tx,
            queued_bytes: Arc::new(AtomicUsize::new(0)),
            kill: CancellationToken::new(),
            count_bytes: false,
        };
        let mut out = Vec::new();
        let mut st = self.lock();
        st.handles.insert(id, handle);
        st.router.connect(id, Origin::Internal);
        st.router.handle(id, Message::new("REGISTER").param("service", name).param("version", 1), now_ms(), &mut out);
        if let Some(commands) = commands {
            st.router.declare_commands(id, commands);
        }
        self.apply(&mut st, &mut out);
        (id, rx)
    }

    /// A message from an in-process service.
    pub(crate) fn inject(&self, conn: ConnId, msg: Message) {
        let mut out = Vec::new();
        let mut st = self.lock();
        st.router.handle(conn, msg, now_ms(), &mut out);
        self.apply(&mut st, &mut out);
    }

    /// Removes an in-process service; its queue closes.
    pub(crate) fn detach(&self, conn: ConnId) {
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

    /// Runs `f` on the router under the lock and applies the actions it pushed.
    pub(crate) fn with_router(&self, f: &mut dyn FnMut(&mut Router, &mut Vec<Action>)) {
        let mut out = Vec::new();
        let mut st = self.lock();
        f(&mut st.router, &mut out);
        self.apply(&mut st, &mut out);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock is a bug; keep serving with the state as it is.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn apply(&self, state: &mut State, actions: &mut Vec<Action>) {
        let max_bytes = self.config.limits.max_outbound_bytes;
        for action in actions.drain(..) {
            match action {
                Action::Deliver(conn, msg) => {
                    let Some(h) = state.handles.get(&conn) else { continue };
                    let size = if h.count_bytes { msg.approx_size() } else { 0 };
                    let queued = h.queued_bytes.load(Ordering::Relaxed);
                    if queued + size > max_bytes || h.tx.try_send(Outbound::Msg(msg, size)).is_err() {
                        if !h.kill.is_cancelled() {
                            warn!(conn, queued, "slow consumer: outbound queue full, disconnecting");
                            h.kill.cancel();
                        }
                    } else {
                        h.queued_bytes.fetch_add(size, Ordering::Relaxed);
                    }
                }
                Action::Close(conn) => {
                    if let Some(h) = state.handles.get(&conn) {
                        if h.tx.try_send(Outbound::Close).is_err() {
                            h.kill.cancel();
                        }
                    }
                }
                Action::Shutdown => self.stop.cancel(),
                Action::SaveNodes(nodes) => {
                    if let Err(e) = save_nodes(&self.config.data_dir, &nodes) {
                        warn!(error = %e, "cannot persist the cluster's nodes");
                    }
                }
                Action::PersistCache => {
                    if let Some(w) = self.cache_writer.get() {
                        w.signal();
                    }
                }
            }
        }
        if state.router.is_quitting() && state.router.pending_len() == 0 {
            self.idle.notify_waiters();
        }
    }
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
}

impl Daemon {
    /// Creates the data directory and binds the configured listeners.
    ///
    /// Fails when a listener cannot be bound (address in use, permissions) or another node already
    /// listens on the Unix socket.
    pub async fn bind(config: Config) -> anyhow::Result<Daemon> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
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
        let cluster = match config.cluster.listen.as_str() {
            "" => None,
            addr => Some(
                TcpListener::bind(addr).await.with_context(|| format!("cannot listen for cluster links on {addr}"))?,
            ),
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
        let tls = crate::tls::Tls::load(&config.cluster)?;
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
        let remembered = load_nodes(&config.data_dir);
        let mut neighbors = config.cluster.neighbors.clone();
        for n in remembered.iter().take(config.cluster.max_nodes) {
            if n.neighbor && !n.addr.is_empty() && !neighbors.contains(&n.addr) {
                neighbors.push(n.addr.clone());
            }
        }
        let token_file = config.access.token_path(&config.data_dir);
        let token = crate::auth::load_or_create_token(&token_file)?;
        let access = crate::auth::AccessPolicy::new(&config.access, Some(token), token_file, crate::auth::own_uid());
        let mut router = Router::new(
            RouterConfig {
                server: config.server_name.clone(),
                expected: config.expected_services.clone(),
                limits: RouterLimits::from_config(&config.limits),
                links: LinkPolicy::from_config(&config.cluster),
                access,
                cluster_addr: advertised,
                durable_cache: true,
                seed: rand::random(),
            },
            now_ms(),
        );
        router.remember(remembered);
        let (cache_store, cached) = crate::cache_store::CacheStore::open(&config.data_dir)
            .with_context(|| format!("cannot open the cache journal in {}", config.data_dir.display()))?;
        router.restore_cache(cached, now_ms(), &mut Vec::new());
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
        let shared = Arc::new(Shared {
            engine,
            state: Mutex::new(State { router, handles: Default::default() }),
            config,
            tls,
            stop: CancellationToken::new(),
            idle: Notify::new(),
            next_conn: AtomicU64::new(1),
            locator: locator.as_ref().map(|l| l.handle()),
            cache_writer: std::sync::OnceLock::new(),
        });
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
        Ok(Daemon { shared, tcp, unix, cluster, udp, tls_listener, locator, neighbors })
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

    /// Serves until `shutdown` completes or a client sends `STOP`, then drains: new requests are
    /// answered `QUITTING`, requests in flight get `shutdown_grace_secs` to be answered, every
    /// client gets `QUITTING`, and connections close after their queues are written.
    ///
    /// Fails only if an accept loop hits an unrecoverable error.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let shared = self.shared;
        let limit = Arc::new(Semaphore::new(shared.config.limits.max_connections));
        let conns_done = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let mut accepts = JoinSet::new();
        let (conn_tx, mut conn_rx) = mpsc::channel::<tokio::task::JoinHandle<()>>(64);
        for (listener, cluster) in [(self.tcp, false), (self.cluster, true)] {
            let Some(l) = listener else { continue };
            info!(addr = %l.local_addr()?, cluster, "listening on TCP");
            let (shared, limit, conn_tx) = (shared.clone(), limit.clone(), conn_tx.clone());
            accepts.spawn(async move {
                loop {
                    match l.accept().await {
                        Ok((s, peer)) => {
                            let _ = s.set_nodelay(true);
                            let Ok(permit) = limit.clone().try_acquire_owned() else {
                                warn!(%peer, "connection refused: max_connections reached");
                                continue;
                            };
                            let (r, w) = s.into_split();
                            let origin =
                                if cluster { Origin::Cluster { peer, tls: false } } else { Origin::Tcp { peer } };
                            let h = tokio::spawn(connection(shared.clone(), r, w, Some(permit), origin));
                            let _ = conn_tx.send(h).await;
                        }
                        Err(e) => {
                            warn!(error = %e, "TCP accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            });
        }
        if let (Some(l), Some(tls)) = (self.tls_listener, shared.tls.clone()) {
            info!(addr = %l.local_addr()?, "listening for TLS cluster links");
            let (shared, limit, conn_tx) = (shared.clone(), limit.clone(), conn_tx.clone());
            accepts.spawn(async move {
                loop {
                    let Ok((s, peer)) = l.accept().await else { continue };
                    let _ = s.set_nodelay(true);
                    let Ok(permit) = limit.clone().try_acquire_owned() else { continue };
                    let (shared, acceptor) = (shared.clone(), tls.acceptor.clone());
                    let h = tokio::spawn(async move {
                        // The handshake verifies the peer's certificate against the cluster CA.
                        let handshake = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(s)).await;
                        match handshake {
                            Ok(Ok(stream)) => {
                                let (r, w) = tokio::io::split(stream);
                                connection(shared, r, w, Some(permit), Origin::Cluster { peer, tls: true }).await;
                            }
                            Ok(Err(e)) => warn!(%peer, error = %e, "TLS handshake refused"),
                            Err(_) => warn!(%peer, "TLS handshake timed out"),
                        }
                    });
                    let _ = conn_tx.send(h).await;
                }
            });
        }
        if let Some(udp) = self.udp {
            info!(addr = %udp.local_addr()?, "listening for UDP signals");
            accepts.spawn(udp_loop(shared.clone(), udp));
        }
        let apps = shared.engine.clone().map(|engine| crate::apps::Apps::start(shared.clone(), engine));
        let locator_stop = CancellationToken::new();
        let locator = self.locator.map(|l| {
            let stop = locator_stop.clone();
            tokio::spawn(l.run(async move { stop.cancelled().await }))
        });
        let mut dialers = JoinSet::new();
        for addr in self.neighbors {
            dialers.spawn(dialer(shared.clone(), addr));
        }
        let unix_path = self.unix.as_ref().map(|(_, p)| p.clone());
        if let Some((l, path)) = self.unix {
            info!(path = %path.display(), "listening on Unix socket");
            let (shared, limit, conn_tx) = (shared.clone(), limit.clone(), conn_tx.clone());
            accepts.spawn(async move {
                loop {
                    match l.accept().await {
                        Ok((s, _)) => {
                            let Ok(permit) = limit.clone().try_acquire_owned() else {
                                warn!("connection refused: max_connections reached");
                                continue;
                            };
                            let creds = s.peer_cred().ok().map(|c| Creds { uid: c.uid(), gid: c.gid(), pid: c.pid() });
                            let (r, w) = s.into_split();
                            let origin = Origin::Unix { creds };
                            let h = tokio::spawn(connection(shared.clone(), r, w, Some(permit), origin));
                            let _ = conn_tx.send(h).await;
                        }
                        Err(e) => {
                            warn!(error = %e, "Unix accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            });
        }
        drop(conn_tx);
        // Collect connection handles so shutdown can wait for them.
        let collector = {
            let done = conns_done.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        h = conn_rx.recv() => match h {
                            Some(h) => { tasks.spawn(async move { let _ = h.await; }); }
                            None => break,
                        },
                        Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                        _ = done.cancelled() => break,
                    }
                }
                tasks
            })
        };
        let ticker = {
            let shared = shared.clone();
            tokio::spawn(async move {
                let period = Duration::from_millis(shared.config.cluster.heartbeat_ms.min(500));
                let mut every = tokio::time::interval(period);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut out = Vec::new();
                let mut n: u64 = 0;
                loop {
                    every.tick().await;
                    // The kernel's NTP state changes rarely: read it every few seconds.
                    let ntp = n.is_multiple_of(20).then(crate::ntp::synchronized);
                    n += 1;
                    let mut st = shared.lock();
                    if let Some(ntp) = ntp {
                        st.router.set_ntp(ntp, &mut out);
                    }
                    st.router.tick(now_ms(), &mut out);
                    shared.apply(&mut st, &mut out);
                }
            })
        };

        tokio::select! {
            _ = shutdown => info!("shutdown requested"),
            _ = shared.stop.cancelled() => info!("STOP received"),
        }
        // Stop accepting, then drain requests in flight under the grace period. Connections that
        // have not said which form they speak yet are closed at once.
        shared.stop.cancel();
        accepts.abort_all();
        shared.lock().router.begin_shutdown();
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
        ticker.abort();
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
        locator_stop.cancel();
        if let Some(l) = locator {
            let _ = l.await;
        }
        if let Some(apps) = apps {
            apps.shutdown().await;
        }
        conns_done.cancel();
        let dialers_done = async { while dialers.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(2), dialers_done).await.is_err() {
            dialers.abort_all();
        }
        let mut tasks = collector.await.unwrap_or_default();
        let all_closed = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(2), all_closed).await.is_err() {
            warn!("some connections did not close in time");
        }
        if let Some(p) = unix_path {
            let _ = std::fs::remove_file(p);
        }
        info!("node stopped");
        Ok(())
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

enum Decoder {
    Text(text::LineDecoder),
    Binary(binary::FrameDecoder),
}

impl Decoder {
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, FrameError> {
        match self {
            Decoder::Text(d) => d.decode(buf),
            Decoder::Binary(d) => d.decode(buf),
        }
    }
}

async fn connection<R, W>(
    shared: Arc<Shared>,
    mut rd: R,
    wr: W,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    origin: Origin,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let max_frame = shared.config.limits.max_frame_bytes;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    // The first bytes tell which form the peer speaks; links always speak binary.
    let form = loop {
        if matches!(origin, Origin::Dialed { .. }) {
            break Form::Binary;
        }
        if let Some(form) = detect(&buf) {
            break form;
        }
        tokio::select! {
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            _ = shared.stop.cancelled() => return,
        }
    };
    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel(shared.config.limits.max_outbound_messages);
    let queued_bytes = Arc::new(AtomicUsize::new(0));
    let kill = CancellationToken::new();
    {
        let mut st = shared.lock();
        if st.router.is_quitting() {
            return;
        }
        st.handles.insert(id, Handle { tx, queued_bytes: queued_bytes.clone(), kill: kill.clone(), count_bytes: true });
        if matches!(origin, Origin::Dialed { .. }) {
            let mut out = Vec::new();
            st.router.dial(id, origin, &mut out);
            shared.apply(&mut st, &mut out);
        } else {
            st.router.connect(id, origin);
        }
    }
    debug!(conn = id, ?form, "connection open");
    let writer = tokio::spawn(write_loop(wr, rx, form, max_frame, queued_bytes, kill.clone()));
    let mut decoder = match form {
        Form::Text => Decoder::Text(text::LineDecoder::new(max_frame)),
        Form::Binary => Decoder::Binary(binary::FrameDecoder::new(max_frame)),
    };
    let mut batch = Vec::with_capacity(BATCH);
    let mut out = Vec::new();
    'conn: loop {
        let mut fatal = None;
        let mut full = false;
        while batch.len() < BATCH {
            match decoder.decode(&mut buf) {
                Ok(Some(d)) => {
                    batch.push(d);
                    full = batch.len() == BATCH;
                }
                Ok(None) => break,
                Err(e) => {
                    fatal = Some(e);
                    break;
                }
            }
        }
        if !batch.is_empty() || fatal.is_some() {
            let now = now_ms();
            let mut st = shared.lock();
            for d in batch.drain(..) {
                match d {
                    Decoded::Message(m) => st.router.handle(id, m, now, &mut out),
                    Decoded::Invalid(e) => st.router.handle_invalid(id, &e, &mut out),
                }
            }
            if let Some(e) = &fatal {
                warn!(conn = id, error = %e, "closing connection");
                st.router.handle_invalid(id, &nodus_wire::MessageError::Malformed(e.to_string()), &mut out);
                out.push(Action::Close(id));
            }
            shared.apply(&mut st, &mut out);
        }
        if fatal.is_some() {
            break 'conn;
        }
        if full {
            // More complete units may already be buffered: handle them before reading again.
            continue;
        }
        if buf.capacity() - buf.len() < 8192 {
            buf.reserve(64 * 1024);
        }
        tokio::select! {
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) => break 'conn,
                Ok(_) => {}
                Err(e) => {
                    debug!(conn = id, error = %e, "read failed");
                    break 'conn;
                }
            },
            _ = kill.cancelled() => break 'conn,
        }
    }
    {
        let mut st = shared.lock();
        st.router.disconnect(id, &mut out);
        shared.apply(&mut st, &mut out);
        // Dropping the handle closes the queue: the writer drains it and stops.
        st.handles.remove(&id);
    }
    let _ = writer.await;
    debug!(conn = id, "connection closed");
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Outbound>,
    form: Form,
    max_frame: usize,
    queued_bytes: Arc<AtomicUsize>,
    kill: CancellationToken,
) {
    let mut out = BytesMut::with_capacity(64 * 1024);
    if form == Form::Binary {
        out.extend_from_slice(&binary::PREFACE);
    }
    let encode = |m: Message, size: usize, out: &mut BytesMut| {
        queued_bytes.fetch_sub(size, Ordering::Relaxed);
        match form {
            Form::Text => text::encode(&m, out),
            Form::Binary => {
                if let Err(e) = binary::encode(&m, out, max_frame) {
                    warn!(error = %e, command = %m.command, "dropping message too large to send");
                }
            }
        }
    };
    loop {
        let first = tokio::select! {
            m = rx.recv() => m,
            _ = kill.cancelled() => break,
        };
        let mut close = false;
        match first {
            None => close = true,
            Some(Outbound::Close) => close = true,
            Some(Outbound::Msg(m, size)) => encode(m, size, &mut out),
        }
        while !close && out.len() < WRITE_CHUNK {
            match rx.try_recv() {
                Ok(Outbound::Msg(m, size)) => encode(m, size, &mut out),
                Ok(Outbound::Close) => close = true,
                Err(_) => break,
            }
        }
        if !out.is_empty() {
            let written = tokio::select! {
                r = wr.write_all(&out) => r.is_ok(),
                _ = kill.cancelled() => false,
            };
            out.clear();
            if !written {
                break;
            }
        }
        if close {
            break;
        }
    }
    let _ = wr.shutdown().await;
    // Wake the reader in case the peer keeps the connection half open.
    kill.cancel();
}

/// Keeps a link to the neighbour at `addr`: dials while no link to it exists, with jittered
/// exponential backoff (100 ms .. 5 s), until the node stops.
async fn dialer(shared: Arc<Shared>, addr: String) {
    let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
    let mut delay = min;
    while !shared.stop.is_cancelled() {
        if !shared.lock().router.linked_to_addr(&addr) {
            let started = tokio::time::Instant::now();
            // Bounded: during a partition a SYN can go unanswered for minutes.
            let connect = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(&addr)).await;
            match connect.unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    match &shared.tls {
                        None => {
                            let (r, w) = s.into_split();
                            let origin = Origin::Dialed { addr: addr.clone(), tls: false };
                            connection(shared.clone(), r, w, None, origin).await;
                        }
                        Some(tls) => {
                            let tls_stream = match crate::tls::server_name(&addr) {
                                Ok(name) => tls.connector.connect(name, s).await.map_err(anyhow::Error::from),
                                Err(e) => Err(e),
                            };
                            match tls_stream {
                                Ok(stream) => {
                                    let (r, w) = tokio::io::split(stream);
                                    let origin = Origin::Dialed { addr: addr.clone(), tls: true };
                                    connection(shared.clone(), r, w, None, origin).await;
                                }
                                Err(e) => warn!(%addr, error = %e, "TLS handshake with neighbour failed"),
                            }
                        }
                    }
                    if started.elapsed() > max {
                        delay = min;
                    }
                }
                Err(e) => debug!(%addr, error = %e, "neighbour not reachable"),
            }
        }
        let jittered = delay.mul_f64(0.5 + rand::random::<f64>());
        tokio::select! {
            _ = tokio::time::sleep(jittered) => {}
            _ = shared.stop.cancelled() => break,
        }
        delay = (delay * 2).min(max);
    }
}

/// The UDP signal port: one text message per datagram, one way.
async fn udp_loop(shared: Arc<Shared>, socket: UdpSocket) {
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let secret = shared.config.cluster.udp_secret.clone();
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else { continue };
        if n > MAX_DATAGRAM {
            warn!(%peer, "dropping a datagram over 1024 bytes");
            continue;
        }
        let Ok(line) = std::str::from_utf8(&buf[..n]) else {
            warn!(%peer, "dropping a datagram that is not UTF-8");
            continue;
        };
        let mut msg = match text::from_line(line.trim_end_matches(['\n', '\r'])) {
            Ok(m) => m,
            Err(e) => {
                warn!(%peer, error = %e, "dropping an invalid datagram");
                continue;
            }
        };
        if !secret.is_empty() && msg.params.remove("secret_code").as_deref() != Some(secret.as_str()) {
            warn!(%peer, "dropping a datagram without the right secret_code");
            continue;
        }
        let mut out = Vec::new();
        let mut st = shared.lock();
        st.router.handle(UDP_CONN, msg, now_ms(), &mut out);
        shared.apply(&mut st, &mut out);
    }
}

/// Reads the remembered nodes: lines of `name address neighbor|known`.
fn load_nodes(dir: &Path) -> Vec<KnownNode> {
    let Ok(text) = std::fs::read_to_string(dir.join(NODES_FILE)) else { return Vec::new() };
    text.lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let (name, addr, kind) = (parts.next()?, parts.next().unwrap_or(""), parts.next().unwrap_or("known"));
            let addr = if addr == "-" { "" } else { addr };
            nodus_wire::valid_name(name).then(|| KnownNode {
                name: name.to_string(),
                addr: addr.to_string(),
                neighbor: kind == "neighbor",
            })
        })
        .collect()
}

fn save_nodes(dir: &Path, nodes: &[KnownNode]) -> std::io::Result<()> {
    let mut text = String::new();
    for n in nodes {
        let addr = if n.addr.is_empty() { "-" } else { n.addr.as_str() };
        text.push_str(&format!("{} {addr} {}\n", n.name, if n.neighbor { "neighbor" } else { "known" }));
    }
    let tmp = dir.join(format!("{NODES_FILE}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, dir.join(NODES_FILE))
}
