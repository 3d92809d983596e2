//! The Cocaine locator and the apps as Cocaine services, over TCP (tokio driver around
//! [`crate::service`]).
//!
//! A [`Locator`] listens (Cocaine's default port is 10053) and answers `resolve(name)`: for an
//! app of the [`Engine`] it returns the app's own endpoint, for `locator` its own, and for
//! anything else the error `[[10, 1], text]`. Cocaine clients connect to the resolved endpoint and
//! speak the app's API there without naming the app, so every app gets its own TCP listener,
//! bound on the locator's address with an ephemeral port when the app is first resolved (and
//! dropped at a later resolve once the app is gone).
//!
//! A name that is not an app of this engine is looked up in the [`Directory`] the owner set (a
//! node sets its cluster's: apps on other nodes, nearest first), so one locator resolves apps
//! anywhere in the cluster.
//!
//! On an app connection, `enqueue(event)` opens [`Engine::invoke`]: the client's chunks go to the
//! worker, the worker's chunks, error or close come back; `info()` answers a map of the app's
//! state. Connections are bounded in number (per listener: the locator and each app have their
//! own bound), in open channels, in message size and in queued
//! outbound messages (a client that does not read is cut off).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rmpv::Value;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::task::TaskTracker;

use crate::balance::{AppStatus, Rejection};
use crate::engine::{AppInfo, Engine, EngineError};
use crate::protocol::{Decoder, Role, DEFAULT_MAX_MESSAGE_BYTES};
use crate::service::{self, errors, Api, Dispatch, Input, Request};
use crate::session::{Session, SessionError};

/// The name under which the locator resolves itself.
pub const LOCATOR_NAME: &str = "locator";

/// Locator settings and bounds.
#[derive(Debug, Clone)]
pub struct LocatorConfig {
    /// Host given to clients in `resolve` answers; `None` means the IP the locator is bound to
    /// (`127.0.0.1` when it is bound to an unspecified address: set this for remote clients).
    pub advertise_host: Option<String>,
    /// Open client connections on the locator's own listener; more are closed at once.
    pub max_connections: usize,
    /// Open client connections on each app's listener; more are closed at once. Each listener
    /// has its own bound, so a flood on one app's endpoint never locks clients out of the
    /// locator or of another app.
    pub max_app_connections: usize,
    /// Open channels per connection; more are refused with an error.
    pub max_channels: usize,
    /// Largest message from a client.
    pub max_message_bytes: usize,
    /// Messages queued for one connection; a client that falls further behind is disconnected.
    pub outbound_messages: usize,
    /// Client messages queued for one channel before the connection stops reading.
    pub channel_messages: usize,
    /// On shutdown, how long open channels may take to finish before connections are cut.
    pub shutdown_grace: Duration,
}

impl Default for LocatorConfig {
    fn default() -> Self {
        LocatorConfig {
            advertise_host: None,
            max_connections: 1024,
            max_app_connections: 1024,
            max_channels: 1024,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            outbound_messages: 4096,
            channel_messages: 64,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Why the locator could not start.
#[derive(Debug, thiserror::Error)]
pub enum LocatorError {
    /// The listening socket could not be opened.
    #[error("cannot listen on {addr}: {error}; pick another address or stop what uses it")]
    Bind {
        /// The address asked for.
        addr: String,
        /// The OS error.
        error: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Draining,
    Stopped,
}

struct AppListener {
    port: u16,
    accept: AbortHandle,
}

/// One listener's bound on open connections.
#[derive(Clone)]
struct Limit {
    permits: Arc<Semaphore>,
    max: usize,
}

impl Limit {
    fn new(max: usize) -> Limit {
        Limit { permits: Arc::new(Semaphore::new(max)), max }
    }
}

/// Where apps that are not on this node are found: the cluster's directory of app endpoints.
pub trait Directory: Send + Sync + 'static {
    /// Endpoints `(host, port)` of `app` elsewhere, nearest first; empty when there is none.
    fn lookup(&self, app: &str) -> Vec<(String, u16)>;
}

struct Shared {
    engine: Engine,
    directory: std::sync::OnceLock<Arc<dyn Directory>>,
    config: LocatorConfig,
    bind_ip: IpAddr,
    advertise: String,
    port: u16,
    apps: Mutex<HashMap<String, AppListener>>,
    /// The locator listener's connection bound (each app listener has its own).
    connections: Limit,
    /// Every connection task, of every listener: shutdown waits for them.
    tasks: TaskTracker,
    phase: watch::Sender<Phase>,
}

/// The locator service and the app services it hands out.
pub struct Locator {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Locator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Locator").field("port", &self.shared.port).field("advertise", &self.shared.advertise).finish()
    }
}

impl Locator {
    /// Binds the locator's listener on `addr` (for example `0.0.0.0:10053`, or `127.0.0.1:0` in
    /// tests).
    ///
    /// # Errors
    /// The address cannot be resolved or bound.
    pub async fn bind(engine: Engine, config: LocatorConfig, addr: &str) -> Result<Locator, LocatorError> {
        let listener =
            TcpListener::bind(addr).await.map_err(|error| LocatorError::Bind { addr: addr.to_string(), error })?;
        Locator::from_listener(engine, config, listener)
    }

    /// Serves on a listener bound by the caller (useful when the engine's `--locator` argument
    /// must name the port before the engine exists).
    ///
    /// # Errors
    /// The listener has no local address.
    pub fn from_listener(
        engine: Engine,
        config: LocatorConfig,
        listener: TcpListener,
    ) -> Result<Locator, LocatorError> {
        let local = listener.local_addr().map_err(|error| LocatorError::Bind { addr: "listener".into(), error })?;
        let advertise = match &config.advertise_host {
            Some(h) => h.clone(),
            None if local.ip().is_unspecified() => Ipv4Addr::LOCALHOST.to_string(),
            None => local.ip().to_string(),
        };
        let (phase, _) = watch::channel(Phase::Running);
        let shared = Arc::new(Shared {
            engine,
            directory: std::sync::OnceLock::new(),
            bind_ip: local.ip(),
            advertise,
            port: local.port(),
            apps: Mutex::new(HashMap::new()),
            connections: Limit::new(config.max_connections),
            tasks: TaskTracker::new(),
            config,
            phase,
        });
        Ok(Locator { listener, shared })
    }

    /// The locator's address.
    pub fn local_addr(&self) -> SocketAddr {
        SocketAddr::new(self.shared.bind_ip, self.shared.port)
    }

    /// A handle for the locator's owner, usable while it runs.
    pub fn handle(&self) -> LocatorHandle {
        LocatorHandle { shared: self.shared.clone() }
    }
}

/// What the owner of a [`Locator`] may do while it runs. Cheap to clone.
#[derive(Clone)]
pub struct LocatorHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LocatorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocatorHandle").field("port", &self.shared.port).finish()
    }
}

impl LocatorHandle {
    /// The endpoint clients get for `app` here, its listener opened now if it is not yet:
    /// `None` when the engine has no such app, an error when no listener can be opened.
    pub fn endpoint(&self, app: &str) -> Option<Result<(String, u16), std::io::Error>> {
        if app == LOCATOR_NAME {
            return None;
        }
        self.shared.resolve(app).map(|r| r.map(|port| (self.shared.advertise.clone(), port)))
    }

    /// Sets where names this node does not serve are looked up (once; later calls are ignored).
    pub fn set_directory(&self, directory: Arc<dyn Directory>) {
        let _ = self.shared.directory.set(directory);
    }
}

impl Locator {
    /// Serves until `shutdown` completes, then drains: stops accepting, refuses new channels,
    /// lets open channels finish for up to `shutdown_grace`, and closes every connection.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Locator { listener, shared } = self;
        tracing::info!(port = shared.port, advertise = %shared.advertise, "locator listening");
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => admit(&shared, stream, peer, Target::Locator, &shared.connections),
                    Err(e) => {
                        tracing::warn!(error = %e, "locator accept failed");
                        // Back off a little on fd exhaustion instead of spinning.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(listener);
        for (_, app) in shared.apps.lock().expect("apps lock").drain() {
            app.accept.abort();
        }
        shared.tasks.close();
        shared.phase.send_replace(Phase::Draining);
        let drained = tokio::time::timeout(shared.config.shutdown_grace, shared.tasks.wait()).await;
        if drained.is_err() {
            tracing::warn!("locator: channels still open after the shutdown grace period; closing their connections");
            shared.phase.send_replace(Phase::Stopped);
            let _ = tokio::time::timeout(Duration::from_secs(1), shared.tasks.wait()).await;
        }
        tracing::info!("locator stopped");
    }
}

#[derive(Debug, Clone)]
enum Target {
    Locator,
    App(String),
}

fn admit(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr, target: Target, limit: &Limit) {
    let Ok(permit) = limit.permits.clone().try_acquire_owned() else {
        tracing::warn!(%peer, ?target, limit = limit.max, "connection limit of this listener reached; closing");
        return;
    };
    let _ = stream.set_nodelay(true);
    shared.tasks.spawn(serve(shared.clone(), stream, target, permit));
}

impl Shared {
    /// The endpoints of `name`, creating the app's listener on first use; `None` for an unknown
    /// name.
    fn resolve(self: &Arc<Self>, name: &str) -> Option<Result<u16, std::io::Error>> {
        if name == LOCATOR_NAME {
            return Some(Ok(self.port));
        }
        let known = self.engine.apps();
        let mut apps = self.apps.lock().expect("apps lock");
        apps.retain(|app, l| {
            let keep = known.binary_search(app).is_ok();
            if !keep {
                l.accept.abort();
            }
            keep
        });
        if known.binary_search_by(|a| a.as_str().cmp(name)).is_err() {
            return None;
        }
        if let Some(l) = apps.get(name) {
            return Some(Ok(l.port));
        }
        if *self.phase.borrow() != Phase::Running {
            return Some(Err(std::io::Error::other("shutting down")));
        }
        // A synchronous bind, so the lock is never held across an await and two resolves of one
        // app cannot both create a listener.
        let bound = std::net::TcpListener::bind(SocketAddr::new(self.bind_ip, 0)).and_then(|l| {
            l.set_nonblocking(true)?;
            let port = l.local_addr()?.port();
            Ok((TcpListener::from_std(l)?, port))
        });
        let (listener, port) = match bound {
            Ok(b) => b,
            Err(e) => return Some(Err(e)),
        };
        let limit = Limit::new(self.config.max_app_connections);
        let accept = tokio::spawn(accept_app(self.clone(), listener, name.to_string(), limit)).abort_handle();
        apps.insert(name.to_string(), AppListener { port, accept });
        tracing::info!(app = %name, port, "app service listening");
        Some(Ok(port))
    }
}

async fn accept_app(shared: Arc<Shared>, listener: TcpListener, app: String, limit: Limit) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => admit(&shared, stream, peer, Target::App(app.clone()), &limit),
            Err(e) => {
                tracing::warn!(app = %app, error = %e, "app service accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The queue of encoded messages to one connection's writer; a full queue cuts the connection.
#[derive(Clone)]
struct Outbox {
    tx: mpsc::Sender<Bytes>,
    cut: Arc<Cut>,
}

/// Set once when the connection must be closed for falling behind.
#[derive(Default)]
struct Cut {
    done: AtomicBool,
    notify: Notify,
}

impl Outbox {
    fn send(&self, b: Bytes) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(b) {
            if !self.cut.done.swap(true, Ordering::Relaxed) {
                tracing::warn!("service client is not reading its answers; closing its connection");
                self.cut.notify.notify_one();
            }
        }
    }
}

/// What a client sends up an open `enqueue` channel.
#[derive(Debug)]
enum Up {
    Write(Bytes),
    Close,
    Error { category: i64, code: i64, message: String },
}

async fn serve(shared: Arc<Shared>, stream: TcpStream, target: Target, _permit: OwnedSemaphorePermit) {
    let config = &shared.config;
    let (mut reader, writer) = stream.into_split();
    let (out_tx, out_rx) = mpsc::channel(config.outbound_messages);
    let writer = tokio::spawn(crate::engine::write_loop(writer, out_rx));
    let out = Outbox { tx: out_tx, cut: Arc::new(Cut::default()) };
    let api = match target {
        Target::Locator => Api::Locator,
        Target::App(_) => Api::App,
    };
    let mut dispatch = Dispatch::new(api, config.max_channels);
    let mut decoder = Decoder::new(Role::Engine, config.max_message_bytes);
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut ups: HashMap<u64, mpsc::Sender<Up>> = HashMap::new();
    let mut tasks: JoinSet<u64> = JoinSet::new();
    let mut phase = shared.phase.subscribe();
    if *phase.borrow_and_update() != Phase::Running {
        dispatch.drain();
    }
    'conn: loop {
        loop {
            let frame = match decoder.decode_frame(&mut buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "bad message from a service client; closing");
                    break 'conn;
                }
            };
            match dispatch.handle(frame) {
                Input::Ignored => {}
                Input::Reply(b) => out.send(b),
                Input::Request(r) => {
                    request(&shared, &target, r, &out, &mut dispatch, &mut ups, &mut tasks).await;
                }
            }
        }
        if *phase.borrow() != Phase::Running && dispatch.open_channels() == 0 {
            break;
        }
        tokio::select! {
            read = reader.read_buf(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            },
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => match joined {
                Ok(channel) => {
                    dispatch.finished(channel);
                    ups.remove(&channel);
                }
                Err(e) => {
                    tracing::error!(error = %e, "service channel task failed; closing the connection");
                    break;
                }
            },
            _ = out.cut.notify.notified() => break,
            changed = phase.changed() => match changed.map(|_| *phase.borrow_and_update()) {
                Ok(Phase::Running) => {}
                Ok(Phase::Draining) => dispatch.drain(),
                Ok(Phase::Stopped) | Err(_) => break,
            },
        }
    }
    // Open channels end here: their sessions are dropped, which abandons them in the engine.
    tasks.shutdown().await;
    drop(out);
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
}

async fn request(
    shared: &Arc<Shared>,
    target: &Target,
    r: Request,
    out: &Outbox,
    dispatch: &mut Dispatch,
    ups: &mut HashMap<u64, mpsc::Sender<Up>>,
    tasks: &mut JoinSet<u64>,
) {
    let app = match target {
        Target::App(a) => a.as_str(),
        Target::Locator => "",
    };
    match r {
        Request::Resolve { channel, name } => {
            let answer = match shared.resolve(&name) {
                Some(Ok(port)) => {
                    let api = if name == LOCATOR_NAME { Api::Locator } else { Api::App };
                    let answer = service::resolve_answer(&[(shared.advertise.clone(), port)], api.graph());
                    service::encode_value(channel, &answer)
                }
                Some(Err(e)) => {
                    tracing::warn!(app = %name, error = %e, "cannot open the app's service listener");
                    let text = format!("service {name:?} cannot be served: {e}");
                    service::encode_error(channel, errors::LOCATOR, errors::SERVICE_NOT_AVAILABLE, &text)
                }
                None => {
                    let elsewhere = shared.directory.get().map(|d| d.lookup(&name)).unwrap_or_default();
                    if elsewhere.is_empty() {
                        let text = format!("service {name:?} is not available; deploy an app of that name first");
                        service::encode_error(channel, errors::LOCATOR, errors::SERVICE_NOT_AVAILABLE, &text)
                    } else {
                        service::encode_value(channel, &service::resolve_answer(&elsewhere, Api::App.graph()))
                    }
                }
            };
            out.send(answer);
            dispatch.finished(channel);
        }
        Request::Info { channel } => {
            let engine = shared.engine.clone();
            let (app, out) = (app.to_string(), out.clone());
            tasks.spawn(async move {
                match engine.info(&app).await {
                    Ok(info) => out.send(service::encode_value(channel, &[info_value(&info)])),
                    Err(e) => {
                        let (category, code, text) = engine_error(&e);
                        out.send(service::encode_error(channel, category, code, &text));
                    }
                }
                channel
            });
        }
        Request::Enqueue { channel, event } => {
            // Invoked here, in the connection's order, so requests reach the app's queue in the
            // order the client sent them (the call returns once the request is queued).
            match shared.engine.invoke(app, &event).await {
                Ok(session) => {
                    let (tx, rx) = mpsc::channel(shared.config.channel_messages);
                    ups.insert(channel, tx);
                    tasks.spawn(run_channel(session, channel, rx, out.clone()));
                }
                Err(e) => {
                    let (category, code, text) = engine_error(&e);
                    out.send(service::encode_error(channel, category, code, &text));
                    dispatch.finished(channel);
                }
            }
        }
        Request::Control { .. } => {}
        Request::Population { channel, workers } => {
            if let Err(e) = shared.engine.set_population(app, workers).await {
                let (category, code, text) = engine_error(&e);
                out.send(service::encode_error(channel, category, code, &text));
                dispatch.finished(channel);
            }
        }
        Request::Write { channel, data } => {
            if let Some(tx) = ups.get(&channel) {
                let _ = tx.send(Up::Write(data)).await;
            }
        }
        Request::Close { channel } => {
            if let Some(tx) = ups.remove(&channel) {
                let _ = tx.send(Up::Close).await;
            }
        }
        Request::Error { channel, category, code, message } => {
            if let Some(tx) = ups.remove(&channel) {
                let _ = tx.send(Up::Error { category, code, message }).await;
            }
        }
    }
}

/// One `enqueue` channel: relays both ways until the worker's side ends.
async fn run_channel(mut session: Session, channel: u64, mut up: mpsc::Receiver<Up>, out: Outbox) -> u64 {
    let mut up_open = true;
    loop {
        tokio::select! {
            msg = up.recv(), if up_open => {
                let sent = match msg {
                    Some(Up::Write(data)) => session.send(data).await,
                    Some(Up::Close) => {
                        up_open = false;
                        session.close().await
                    }
                    Some(Up::Error { category, code, message }) => {
                        up_open = false;
                        session.fail(category, code, message).await
                    }
                    None => {
                        up_open = false;
                        Ok(())
                    }
                };
                // A failed send means the app is gone; the receiving side reports it.
                if sent.is_err() {
                    up_open = false;
                }
            }
            down = session.recv() => match down {
                Ok(Some(chunk)) => out.send(service::encode_write(channel, &chunk)),
                Ok(None) => {
                    out.send(service::encode_close(channel));
                    break;
                }
                Err(e) => {
                    let (category, code, text) = session_error(&e);
                    out.send(service::encode_error(channel, category, code, &text));
                    break;
                }
            },
        }
    }
    channel
}

fn rejection(r: &Rejection) -> i64 {
    match r {
        Rejection::QueueFull { .. } | Rejection::Busy { .. } => errors::QUEUE_FULL,
        Rejection::Failed { .. } => errors::APP_FAILED,
        Rejection::Stopped => errors::APP_STOPPED,
        Rejection::Expired => errors::EXPIRED,
    }
}

/// The `[category, code]` and text a client gets for an engine refusal.
fn engine_error(e: &EngineError) -> (i64, i64, String) {
    let code = match e {
        EngineError::Rejected(r) => rejection(r),
        EngineError::UnknownApp(_) | EngineError::InvalidName(_) => errors::UNKNOWN_APP,
        EngineError::Socket { .. } | EngineError::Gone => errors::ENGINE_GONE,
    };
    (errors::APP, code, e.to_string())
}

/// The `[category, code]` and text a client gets when a session ends in an error.
fn session_error(e: &SessionError) -> (i64, i64, String) {
    let code = match e {
        SessionError::Worker { category, code, message } => return (*category, *code, message.clone()),
        SessionError::WorkerFailed(_) => errors::WORKER_FAILED,
        SessionError::Rejected(r) => rejection(r),
        SessionError::Overflow(_) => errors::OVERFLOW,
        SessionError::EngineGone | SessionError::Closed => errors::ENGINE_GONE,
    };
    (errors::APP, code, e.to_string())
}

/// The `info()` answer: `{state, [reason], queue: {depth}, sessions: {pending}, pool: {active,
/// workers: {uuid: {pid, state, load}}}}`.
fn info_value(info: &AppInfo) -> Value {
    let kv = |k: &str, v: Value| (Value::from(k), v);
    let (state, reason) = match &info.status {
        AppStatus::Running => ("running", None),
        AppStatus::Failed { reason } => ("failed", Some(reason.clone())),
        AppStatus::Stopped => ("stopped", None),
    };
    let workers = info
        .workers
        .iter()
        .map(|w| {
            let v = Value::Map(vec![
                kv("pid", Value::from(w.pid)),
                kv("state", Value::from(w.state.name().to_lowercase())),
                kv("load", Value::from(w.load as u64)),
            ]);
            (Value::from(w.uuid.as_str()), v)
        })
        .collect();
    let mut map = vec![kv("app", Value::from(info.name.as_str())), kv("state", Value::from(state))];
    if let Some(r) = reason {
        map.push(kv("reason", Value::from(r)));
    }
    map.push(kv("queue", Value::Map(vec![kv("depth", Value::from(info.queued as u64))])));
    map.push(kv("population", Value::from(info.population as u64)));
    map.push(kv("sessions", Value::Map(vec![kv("pending", Value::from(info.sessions as u64))])));
    map.push(kv(
        "pool",
        Value::Map(vec![kv("active", Value::from(info.workers.len() as u64)), kv("workers", Value::Map(workers))]),
    ));
    Value::Map(map)
}
