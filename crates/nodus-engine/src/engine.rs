//! The engine driver (tokio): one actor task per app owns the app's [`Balancer`], the
//! [`Worker`] state machine of each process and the open sessions; it consumes a closed
//! [`AppEvent`] enum from a bounded channel and applies the cores' outputs (spawn, send, signal).

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::balance::{Action, AppStatus, BalanceConfig, Balancer, Rejection, WorkerId};
use crate::identity::{Peer, RunAs};
use crate::manifest::Manifest;
use crate::process::{self, Launch, Running};
use crate::profile::Profile;
use crate::protocol::{Decoder, Message, Role, DEFAULT_MAX_MESSAGE_BYTES, FIRST_SESSION_CHANNEL};
use crate::session::{Down, Session, SessionError, Up};
use crate::worker::{ExitReport, FailReason, Output, Signal, State, Worker};

/// Error categories the engine itself uses in `[ch,1,[[category,code],message]]`.
pub mod category {
    /// Errors raised by the engine (session abandoned, worker failed).
    pub const ENGINE: i64 = 1;
    /// Errors raised by an app's handler (worker SDK).
    pub const APPLICATION: i64 = 2;
}

/// Engine settings and bounds.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Directory for the per-app worker sockets (`<dir>/<app>.sock`); keep the path short, a
    /// Unix socket path has at most 107 bytes.
    pub runtime_dir: PathBuf,
    /// `HOST:PORT` passed to workers as `--locator`.
    pub locator: String,
    /// Largest message from a worker.
    pub max_message_bytes: usize,
    /// Messages queued for one worker connection; a worker that falls further behind is failed.
    pub outbound_messages: usize,
    /// Messages buffered per session: replies not yet read by the caller, or chunks sent before
    /// a worker took the request. Past it the session fails with [`SessionError::Overflow`].
    pub session_messages: usize,
    /// Events queued for one app's actor (callers wait when it is full).
    pub app_events: usize,
    /// Last stderr lines kept per worker for the crashlog.
    pub crashlog_lines: usize,
    /// Worker exits kept per app for the crashlog.
    pub crashlog_entries: usize,
    /// Connections per app that have not handshaken yet.
    pub pending_connections: usize,
    /// From SIGTERM to SIGKILL (Cocaine: 5 s).
    pub kill_grace: Duration,
    /// Restart backoff and crash-loop window.
    pub balance: BalanceConfig,
    /// The user worker processes run as; `None`: the engine's own user. Only a root process can
    /// switch users (see [`RunAs::for_daemon`]).
    pub run_as: Option<RunAs>,
}

impl EngineConfig {
    /// Defaults with sockets in `runtime_dir`.
    pub fn new(runtime_dir: impl Into<PathBuf>) -> Self {
        EngineConfig {
            runtime_dir: runtime_dir.into(),
            locator: "127.0.0.1:10053".into(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            outbound_messages: 65_536,
            session_messages: 4096,
            app_events: 4096,
            crashlog_lines: 50,
            crashlog_entries: 32,
            pending_connections: 64,
            kill_grace: Duration::from_secs(5),
            balance: BalanceConfig::default(),
            run_as: None,
        }
    }
}

/// An app to run: name, directory (the workers' cwd), manifest and profile.
#[derive(Debug, Clone)]
pub struct AppSpec {
    /// App name: 1..=64 of `[A-Za-z0-9_.-]`.
    pub name: String,
    /// The app's directory; relative executables resolve against it and workers run in it.
    pub dir: PathBuf,
    /// What to run.
    pub manifest: Manifest,
    /// How to run it.
    pub profile: Profile,
}

/// Why an engine call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// No app of that name.
    #[error("no app named {0:?}; deploy it first")]
    UnknownApp(String),
    /// The name cannot be used.
    #[error("invalid app name {0:?}: use 1 to 64 characters from A-Z a-z 0-9 _ . -")]
    InvalidName(String),
    /// The request was refused by the app's balancer.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// The worker socket could not be created.
    #[error("cannot listen on {path}: {error}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        error: String,
    },
    /// The engine is shutting down.
    #[error("engine is shutting down")]
    Gone,
}

/// One worker's exit, kept for `nodus app crashlog`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashRecord {
    /// The worker's uuid.
    pub uuid: String,
    /// When it exited.
    pub at: SystemTime,
    /// Its exit status (`None` when it could not even be started).
    pub status: Option<ExitReport>,
    /// Why it counts as failed, if it does.
    pub failure: Option<String>,
    /// Its last stderr lines.
    pub stderr: Vec<String>,
}

/// A snapshot of one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    /// Id within the app.
    pub id: WorkerId,
    /// Uuid given on its command line.
    pub uuid: String,
    /// Process id.
    pub pid: u32,
    /// Lifecycle state.
    pub state: State,
    /// Open sessions.
    pub load: usize,
}

/// A snapshot of one app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppInfo {
    /// App name.
    pub name: String,
    /// Running, failed or stopped.
    pub status: AppStatus,
    /// Requests waiting for a worker.
    pub queued: usize,
    /// Workers kept running even when idle, as asked by [`Engine::set_population`] (0: none).
    pub population: usize,
    /// Open sessions (queued and running).
    pub sessions: usize,
    /// Worker processes.
    pub workers: Vec<WorkerInfo>,
}

/// Something that happened, for observers (CLI, metrics, tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineEvent {
    /// A worker process was started.
    Spawned {
        /// App name.
        app: String,
        /// Worker id.
        worker: WorkerId,
        /// Process id.
        pid: u32,
    },
    /// A worker heartbeated and takes requests.
    Ready {
        /// App name.
        app: String,
        /// Worker id.
        worker: WorkerId,
    },
    /// A worker failed.
    Failed {
        /// App name.
        app: String,
        /// Worker id.
        worker: WorkerId,
        /// Why.
        reason: FailReason,
    },
    /// A terminate was sent to a worker.
    Terminating {
        /// App name.
        app: String,
        /// Worker id.
        worker: WorkerId,
    },
    /// A signal was sent to a worker.
    Signalled {
        /// App name.
        app: String,
        /// Worker id.
        worker: WorkerId,
        /// Which.
        signal: Signal,
    },
    /// A worker process exited (or could not be started: `status` is `None`).
    Exited {
        /// App name.
        app: String,
        /// Worker id.
        worker: WorkerId,
        /// Exit status.
        status: Option<ExitReport>,
        /// Why it counts as failed, if it does.
        failure: Option<String>,
    },
    /// The app's status changed.
    Status {
        /// App name.
        app: String,
        /// New status.
        status: AppStatus,
    },
}

struct AppHandle {
    tx: mpsc::Sender<AppEvent>,
    crashlog: Arc<Mutex<VecDeque<CrashRecord>>>,
    /// Session ids chosen by callers ([`AppCaller::open`]); they start at [`CALLER_IDS`], far
    /// above the ids the app's task hands out itself.
    caller_ids: Arc<AtomicU64>,
}

/// The event the control plane invokes on a worker to monitor it (seed 000 `monitoring`): its one
/// chunk is the request's content as JSON (`{"id", "pid", "creator", "created_at", "expires_at",
/// "spec": "monitoring", "config": {"sync_time"}}`), and the worker answers one JSON chunk with
/// the same envelope and `"result": {"sync_time", "name", "host", "is_running", "message"}`. The
/// worker SDK answers it by default; a worker that does not know the event (a plain Cocaine
/// worker answers "no handler") is answered for by its node.
pub const MONITORING_EVENT: &str = "nodus:monitoring";

/// The first session id a caller chooses itself.
const CALLER_IDS: u64 = 1 << 63;

struct Inner {
    config: EngineConfig,
    apps: Mutex<HashMap<String, AppHandle>>,
    events: broadcast::Sender<EngineEvent>,
}

/// The app engine. Cheap to clone; every clone drives the same apps.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("runtime_dir", &self.inner.config.runtime_dir).finish()
    }
}

/// Completes one [`AppCaller::call`]: the worker's chunks once it closed its side, or why the
/// call failed. It runs exactly once, on the app's task, so it must not block; dropped unrun
/// (the app went away with the call queued) it runs with [`SessionError::EngineGone`].
pub struct CallDone(Option<Box<dyn FnOnce(CallResult) + Send>>);

/// What a call ends with: the reply chunks, or why there are none.
pub type CallResult = Result<Vec<Bytes>, SessionError>;

impl CallDone {
    /// Wraps the completion.
    pub fn new(f: impl FnOnce(CallResult) + Send + 'static) -> Self {
        CallDone(Some(Box::new(f)))
    }

    fn complete(mut self, result: CallResult) {
        if let Some(f) = self.0.take() {
            f(result)
        }
    }
}

impl Drop for CallDone {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f(Err(SessionError::EngineGone))
        }
    }
}

impl std::fmt::Debug for CallDone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallDone")
    }
}

/// Calls one app without a name lookup or a task per call: the request path of the node's app
/// services. Cheap to clone. Obtained from [`Engine::caller`].
#[derive(Debug, Clone)]
pub struct AppCaller {
    tx: mpsc::Sender<AppEvent>,
    limit: usize,
    ids: Arc<AtomicU64>,
    session_messages: usize,
}

impl AppCaller {
    /// Calls `event` with `body` as its one input chunk (no chunk when empty), closes the
    /// input, and hands the worker's reply chunks to `done` once the worker closed its side.
    ///
    /// Never waits: when the app's event queue is full, `done` runs at once with the retryable
    /// [`Rejection::Busy`]. Returns `false` when the app no longer exists (`done` got
    /// [`SessionError::EngineGone`]): drop this caller and ask the engine for a new one.
    pub fn call(&self, event: impl Into<String>, body: Bytes, done: CallDone) -> bool {
        let ev = AppEvent::Call { event: event.into(), body, done };
        match self.tx.try_send(ev) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(AppEvent::Call { done, .. })) => {
                done.complete(Err(SessionError::Rejected(Rejection::Busy { limit: self.limit })));
                true
            }
            Err(mpsc::error::TrySendError::Closed(AppEvent::Call { done, .. })) => {
                done.complete(Err(SessionError::EngineGone));
                false
            }
            Err(_) => unreachable!("try_send gives back the event it was given"),
        }
    }

    /// [`AppCaller::call`] for a request that must not run after `deadline` (its `_expires_at`
    /// on tokio's clock): if no worker took it by then, it is dropped from the queue and `done`
    /// gets [`Rejection::Expired`]; it never reaches a worker.
    pub fn call_before(&self, event: impl Into<String>, body: Bytes, deadline: Instant, done: CallDone) -> bool {
        let ev = AppEvent::CallBefore { event: event.into(), body, deadline, done };
        match self.tx.try_send(ev) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(AppEvent::CallBefore { done, .. })) => {
                done.complete(Err(SessionError::Rejected(Rejection::Busy { limit: self.limit })));
                true
            }
            Err(mpsc::error::TrySendError::Closed(AppEvent::CallBefore { done, .. })) => {
                done.complete(Err(SessionError::EngineGone));
                false
            }
            Err(_) => unreachable!("try_send gives back the event it was given"),
        }
    }

    /// Opens a streaming session in one event: `event` with `body` as its first input chunk
    /// (none when empty), the input closed when `close`. Unlike [`Engine::invoke`] it never
    /// waits for the app's task: a refusal (queue full, the app failed or stopped, its event
    /// queue full) arrives as the session's first error, [`SessionError::Rejected`].
    pub fn open(&self, event: impl Into<String>, body: Bytes, close: bool) -> Session {
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let (down_tx, down_rx) = mpsc::channel(self.session_messages.max(1));
        let mut pending = Vec::with_capacity(2);
        if !body.is_empty() {
            pending.push(Up::Chunk(body));
        }
        if close {
            pending.push(Up::Choke);
        }
        let session = Session { id, app: self.tx.clone(), down: down_rx, up_closed: close, done: false };
        let refused = match self.tx.try_send(AppEvent::Open { id, event: event.into(), pending, down: down_tx }) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(AppEvent::Open { down, .. })) => {
                Some((down, SessionError::Rejected(Rejection::Busy { limit: self.limit })))
            }
            Err(mpsc::error::TrySendError::Closed(AppEvent::Open { down, .. })) => {
                Some((down, SessionError::EngineGone))
            }
            Err(_) => unreachable!("try_send gives back the event it was given"),
        };
        if let Some((down, e)) = refused {
            let _ = down.try_send(Down::Error(e));
        }
        session
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

impl Engine {
    /// An engine with no apps. Must be called inside a tokio runtime when apps are started.
    ///
    /// A relative `runtime_dir` is made absolute here, against the current directory: workers
    /// run in their app's directory, so a relative `--endpoint` would name another place.
    pub fn new(mut config: EngineConfig) -> Engine {
        config.runtime_dir = absolute(&config.runtime_dir);
        let (events, _) = broadcast::channel(4096);
        Engine { inner: Arc::new(Inner { config, apps: Mutex::new(HashMap::new()), events }) }
    }

    /// The user workers run as, when it is not the engine's own.
    pub fn run_as(&self) -> Option<&RunAs> {
        self.inner.config.run_as.as_ref()
    }

    /// The worker socket of `app` (whether or not the app exists).
    pub fn socket_path(&self, app: &str) -> PathBuf {
        socket_path(&self.inner.config.runtime_dir, app)
    }

    /// Observes engine events from now on (a slow observer misses events, it never slows the
    /// engine).
    pub fn events(&self) -> broadcast::Receiver<EngineEvent> {
        self.inner.events.subscribe()
    }

    /// Names of the apps, sorted.
    pub fn apps(&self) -> Vec<String> {
        let mut names: Vec<String> = self.inner.apps.lock().expect("apps lock").keys().cloned().collect();
        names.sort();
        names
    }

    /// A caller for `app`: see [`AppCaller::call`].
    ///
    /// # Errors
    /// An unknown app.
    pub fn caller(&self, app: &str) -> Result<AppCaller, EngineError> {
        let apps = self.inner.apps.lock().expect("apps lock");
        let h = apps.get(app).ok_or_else(|| EngineError::UnknownApp(app.to_string()))?;
        Ok(AppCaller {
            tx: h.tx.clone(),
            limit: self.inner.config.app_events,
            ids: h.caller_ids.clone(),
            session_messages: self.inner.config.session_messages,
        })
    }

    fn handle(&self, app: &str) -> Result<mpsc::Sender<AppEvent>, EngineError> {
        let apps = self.inner.apps.lock().expect("apps lock");
        apps.get(app).map(|h| h.tx.clone()).ok_or_else(|| EngineError::UnknownApp(app.to_string()))
    }

    /// Starts an app, or deploys a new version of a running one: the new manifest and profile
    /// apply to new workers, the old workers are asked to terminate after their open sessions,
    /// and queued requests wait for the new workers. A failed or stopped app starts again.
    ///
    /// # Errors
    /// An invalid name, or a worker socket that cannot be created.
    pub async fn start(&self, mut spec: AppSpec) -> Result<(), EngineError> {
        if !valid_name(&spec.name) {
            return Err(EngineError::InvalidName(spec.name));
        }
        // Workers run in the app directory: a relative path would be resolved a second time
        // from there (the executable and the directory itself).
        spec.dir = absolute(&spec.dir);
        // Creating an app is synchronous, so the apps lock is held from the lookup to the insert
        // and two concurrent starts of one name cannot both create it.
        let existing = {
            let mut apps = self.inner.apps.lock().expect("apps lock");
            match apps.get(&spec.name) {
                Some(h) => Some(h.tx.clone()),
                None => {
                    let handle = self.create(spec.clone())?;
                    apps.insert(spec.name.clone(), handle);
                    None
                }
            }
        };
        if let Some(tx) = existing {
            tx.send(AppEvent::Deploy { spec: Box::new(spec) }).await.map_err(|_| EngineError::Gone)?;
        }
        Ok(())
    }

    fn create(&self, spec: AppSpec) -> Result<AppHandle, EngineError> {
        let config = &self.inner.config;
        let socket = socket_path(&config.runtime_dir, &spec.name);
        let sock_err = |e: std::io::Error| EngineError::Socket { path: socket.clone(), error: e.to_string() };
        let len = socket.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            let error = format!("the path is {len} bytes, a Unix socket path has at most {MAX_SOCKET_PATH}; use a shorter data directory or app name");
            return Err(EngineError::Socket { path: socket, error });
        }
        std::fs::create_dir_all(&config.runtime_dir).map_err(sock_err)?;
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).map_err(sock_err)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).map_err(sock_err)?;
            if let Some(user) = &config.run_as {
                // Workers connect as `user`: the socket is theirs, the directory only searchable.
                std::os::unix::fs::chown(&socket, Some(user.uid), Some(user.gid)).map_err(sock_err)?;
                std::fs::set_permissions(&config.runtime_dir, std::fs::Permissions::from_mode(0o711))
                    .map_err(sock_err)?;
                for path in [&socket, &spec.manifest.executable_path(&spec.dir)] {
                    if let Some((dir, mode)) = user.obstacle(path) {
                        tracing::warn!(
                            app = %spec.name, user = %user.name, dir = %dir.display(), mode = format_args!("{mode:04o}"),
                            "workers run as this user, who cannot enter this directory: workers will fail to start; \
                             make it searchable (chmod o+x) or move the data directory"
                        );
                    }
                }
            }
        }
        let socket_ino = socket_inode(&socket);
        let (tx, rx) = mpsc::channel(config.app_events);
        let crashlog = Arc::new(Mutex::new(VecDeque::new()));
        let accept =
            tokio::spawn(accept_loop(listener, tx.clone(), config.outbound_messages, config.max_message_bytes));
        let seed = rand::random::<u64>();
        let actor = App {
            name: spec.name.clone(),
            balancer: Balancer::new(&spec.profile, config.balance, seed),
            spec,
            socket,
            socket_ino,
            config: config.clone(),
            tx: tx.downgrade(),
            workers: HashMap::new(),
            uuids: HashMap::new(),
            conns: HashMap::new(),
            sessions: HashMap::new(),
            next_session: 1,
            crashlog: crashlog.clone(),
            events: self.inner.events.clone(),
            stop_waiters: Vec::new(),
            accept: accept.abort_handle(),
            dirty: Vec::new(),
            expiring: std::collections::BTreeSet::new(),
            probes: std::collections::HashSet::new(),
        };
        tokio::spawn(actor.run(rx));
        Ok(AppHandle { tx, crashlog, caller_ids: Arc::new(AtomicU64::new(CALLER_IDS)) })
    }

    /// Stops an app: queued requests are refused, workers are terminated (terminate, then
    /// SIGTERM, then SIGKILL); returns when every worker process has exited. The app stays
    /// known (status `Stopped`) and can be started again.
    ///
    /// # Errors
    /// An unknown app.
    pub async fn stop(&self, app: &str) -> Result<(), EngineError> {
        let tx = self.handle(app)?;
        let (reply, done) = oneshot::channel();
        tx.send(AppEvent::Stop { reply }).await.map_err(|_| EngineError::Gone)?;
        done.await.map_err(|_| EngineError::Gone)
    }

    /// Stops an app and forgets it.
    ///
    /// # Errors
    /// An unknown app.
    pub async fn remove(&self, app: &str) -> Result<(), EngineError> {
        self.stop(app).await?;
        let handle = self.inner.apps.lock().expect("apps lock").remove(app);
        if let Some(h) = handle {
            let _ = h.tx.send(AppEvent::Exit).await;
        }
        Ok(())
    }

    /// Stops every app and waits for all worker processes to exit.
    pub async fn shutdown(&self) {
        for app in self.apps() {
            let _ = self.remove(&app).await;
        }
    }

    /// Opens a session: the request is queued for the app's next free worker.
    ///
    /// # Errors
    /// An unknown app, or a refusal: queue full, app failed, app stopped.
    pub async fn invoke(&self, app: &str, event: &str) -> Result<Session, EngineError> {
        let tx = self.handle(app)?;
        let (reply, rx) = oneshot::channel();
        tx.send(AppEvent::Invoke { event: event.to_string(), reply }).await.map_err(|_| EngineError::Gone)?;
        rx.await.map_err(|_| EngineError::Gone)?
    }

    /// Keeps `n` of the app's workers running even with no requests (capped at its
    /// `pool-limit`; 0 returns to starting workers on demand only). Cocaine's `control`.
    ///
    /// # Errors
    /// An unknown app.
    pub async fn set_population(&self, app: &str, n: usize) -> Result<(), EngineError> {
        let tx = self.handle(app)?;
        tx.send(AppEvent::Population { n }).await.map_err(|_| EngineError::Gone)
    }

    /// Asks one worker something outside the app's queue and balancing: `event` (the control
    /// plane's [`MONITORING_EVENT`]) with `body` as its one chunk, on a channel of that worker
    /// only, even when it is busy; `done` gets its reply chunks. The worker must be active
    /// (handshaken and heartbeating), else `done` gets [`SessionError::WorkerFailed`] at once.
    ///
    /// # Errors
    /// An unknown app (`done` gets [`SessionError::EngineGone`]).
    pub fn probe(
        &self,
        app: &str,
        worker: WorkerId,
        event: &str,
        body: Bytes,
        done: CallDone,
    ) -> Result<(), EngineError> {
        let tx = self.handle(app)?;
        let ev = AppEvent::Probe { worker, event: event.to_string(), body, done };
        if let Err(e) = tx.try_send(ev) {
            let (mpsc::error::TrySendError::Full(ev) | mpsc::error::TrySendError::Closed(ev)) = e;
            if let AppEvent::Probe { done, .. } = ev {
                done.complete(Err(SessionError::Rejected(Rejection::Busy { limit: self.inner.config.app_events })));
            }
        }
        Ok(())
    }

    /// Asks one worker to terminate (terminate, then SIGTERM, then SIGKILL, as when the pool
    /// shrinks); its open sessions finish first. The app may start another in its place.
    ///
    /// # Errors
    /// An unknown app.
    pub async fn terminate(&self, app: &str, worker: WorkerId) -> Result<(), EngineError> {
        let tx = self.handle(app)?;
        tx.send(AppEvent::Terminate { worker }).await.map_err(|_| EngineError::Gone)
    }

    /// A snapshot of an app.
    ///
    /// # Errors
    /// An unknown app.
    pub async fn info(&self, app: &str) -> Result<AppInfo, EngineError> {
        let tx = self.handle(app)?;
        let (reply, rx) = oneshot::channel();
        tx.send(AppEvent::Info { reply }).await.map_err(|_| EngineError::Gone)?;
        rx.await.map_err(|_| EngineError::Gone)
    }

    /// The app's recent worker exits, oldest first.
    ///
    /// # Errors
    /// An unknown app.
    pub fn crashlog(&self, app: &str) -> Result<Vec<CrashRecord>, EngineError> {
        let apps = self.inner.apps.lock().expect("apps lock");
        let h = apps.get(app).ok_or_else(|| EngineError::UnknownApp(app.to_string()))?;
        let log = h.crashlog.lock().expect("crashlog lock");
        Ok(log.iter().cloned().collect())
    }
}

/// The closed set of inputs of an app's actor.
#[derive(Debug)]
pub(crate) enum AppEvent {
    /// A caller opens a session.
    Invoke { event: String, reply: oneshot::Sender<Result<Session, EngineError>> },
    /// A caller makes a one-chunk call and collects the reply.
    Call { event: String, body: Bytes, done: CallDone },
    /// [`AppEvent::Call`] that must not reach a worker after `deadline`.
    CallBefore { event: String, body: Bytes, deadline: Instant, done: CallDone },
    /// A caller opens a session whose id and first input it chose ([`AppCaller::open`]).
    Open { id: u64, event: String, pending: Vec<Up>, down: mpsc::Sender<Down> },
    /// A caller sends up a session.
    Up { session: u64, msg: Up },
    /// A caller dropped its session.
    Dropped { session: u64 },
    /// A worker connection was accepted, from `peer`.
    Accepted { conn: u64, writer: mpsc::Sender<Bytes>, reader: AbortHandle, peer: Peer },
    /// Messages from a worker connection (everything one read decoded).
    FromConn { conn: u64, msgs: Vec<Message> },
    /// A worker connection closed (`error` when it sent garbage or failed).
    ConnClosed { conn: u64, error: Option<String> },
    /// A worker process exited.
    Exited { worker: WorkerId, status: ExitReport, stderr: Vec<String> },
    /// A new version (or a restart).
    Deploy { spec: Box<AppSpec> },
    /// Snapshot request.
    Info { reply: oneshot::Sender<AppInfo> },
    /// How many workers to keep running when idle.
    Population { n: usize },
    /// A call on one worker's own channel, outside the queue ([`Engine::probe`]).
    Probe { worker: WorkerId, event: String, body: Bytes, done: CallDone },
    /// Terminate one worker.
    Terminate { worker: WorkerId },
    /// Stop request, answered when no worker is left.
    Stop { reply: oneshot::Sender<()> },
    /// The app is forgotten: end the actor.
    Exit,
}

struct WorkerEntry {
    uuid: String,
    machine: Worker,
    process: Running,
    conn: Option<u64>,
    next_channel: u64,
    channels: HashMap<u64, u64>,
}

struct ConnEntry {
    writer: mpsc::Sender<Bytes>,
    reader: AbortHandle,
    worker: Option<WorkerId>,
    /// Who connected: a handshake is accepted only from the worker's own process tree.
    peer: Peer,
    /// Encoded messages not yet handed to the writer: flushed once per batch of events.
    out: BytesMut,
}

enum Place {
    Queued { pending: Vec<Up> },
    Open { worker: WorkerId, channel: u64 },
}

/// Where a session's replies go.
enum Sink {
    /// A streaming [`Session`]'s channel.
    Stream(mpsc::Sender<Down>),
    /// An [`AppCaller::call`]: chunks are kept until the worker closes its side.
    Collect { chunks: Vec<Bytes>, done: Option<CallDone> },
}

struct SessionEntry {
    event: String,
    sink: Sink,
    place: Place,
    /// The caller is gone or too slow: replies are dropped.
    abandoned: bool,
    /// A call that must not reach a worker after this (see [`AppCaller::call_before`]).
    deadline: Option<Instant>,
}

impl SessionEntry {
    /// Hands a message from the worker to the caller; `false` when the caller cannot take it
    /// (a stream read too slowly, or a call collected more than `limit` chunks).
    fn deliver(&mut self, msg: Down, limit: usize) -> bool {
        match &mut self.sink {
            Sink::Stream(tx) => tx.try_send(msg).is_ok(),
            Sink::Collect { chunks, .. } => match msg {
                Down::Chunk(_) if chunks.len() >= limit => false,
                Down::Chunk(b) => {
                    chunks.push(b);
                    true
                }
                Down::Choke => {
                    let chunks = std::mem::take(chunks);
                    self.finish(Ok(chunks));
                    true
                }
                Down::Error(e) => {
                    self.fail(e);
                    true
                }
            },
        }
    }

    /// Ends the session for its caller with `e` (a stream that is full already misses it).
    fn fail(&mut self, e: SessionError) {
        match &mut self.sink {
            Sink::Stream(tx) => {
                let _ = tx.try_send(Down::Error(e));
            }
            Sink::Collect { .. } => self.finish(Err(e)),
        }
    }

    /// Completes a call (once; later outcomes are dropped).
    fn finish(&mut self, result: CallResult) {
        if let Sink::Collect { done, .. } = &mut self.sink {
            if let Some(d) = done.take() {
                d.complete(result);
            }
        }
    }
}

struct App {
    name: String,
    spec: AppSpec,
    socket: PathBuf,
    /// Inode of the socket this app bound: a new app of the same name may have replaced the file
    /// by the time this one exits, and that one must not be deleted.
    socket_ino: Option<u64>,
    config: EngineConfig,
    tx: mpsc::WeakSender<AppEvent>,
    balancer: Balancer,
    workers: HashMap<WorkerId, WorkerEntry>,
    uuids: HashMap<String, WorkerId>,
    conns: HashMap<u64, ConnEntry>,
    sessions: HashMap<u64, SessionEntry>,
    next_session: u64,
    crashlog: Arc<Mutex<VecDeque<CrashRecord>>>,
    events: broadcast::Sender<EngineEvent>,
    stop_waiters: Vec<oneshot::Sender<()>>,
    accept: AbortHandle,
    /// Connections with encoded messages in `out`.
    dirty: Vec<u64>,
    /// Queued calls with a deadline, soonest first: dropped with [`Rejection::Expired`] when it
    /// passes before a worker took them.
    expiring: std::collections::BTreeSet<(Instant, u64)>,
    /// Open sessions of [`Engine::probe`]: not counted by the balancer.
    probes: std::collections::HashSet<u64>,
}

/// Longest Unix socket path (`sun_path` holds 108 bytes with the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Most events an app's actor takes off its queue before it settles and writes to workers.
const EVENT_BATCH: usize = 128;

fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// When a crash happened, for people reading the crashlog: wall-clock time by nature.
#[allow(clippy::disallowed_methods)] // A crash record's timestamp is read by people, not by the cores.
fn wall_clock() -> SystemTime {
    SystemTime::now()
}

impl App {
    async fn run(mut self, mut rx: mpsc::Receiver<AppEvent>) {
        tracing::info!(app = %self.name, socket = %self.socket.display(), "app started");
        // One timer for the actor's whole life, moved only when the next deadline changes.
        let sleep = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(sleep);
        let mut armed: Option<std::time::Instant> = None;
        let mut batch = Vec::with_capacity(EVENT_BATCH);
        'run: loop {
            let deadline = self.next_deadline();
            if deadline != armed {
                if let Some(d) = deadline {
                    sleep.as_mut().reset(Instant::from_std(d));
                }
                armed = deadline;
            }
            tokio::select! {
                n = rx.recv_many(&mut batch, EVENT_BATCH) => {
                    if n == 0 {
                        break;
                    }
                }
                _ = &mut sleep, if armed.is_some() => {
                    armed = None;
                    self.tick();
                    continue;
                }
            }
            let now = now();
            for ev in batch.drain(..) {
                if matches!(ev, AppEvent::Exit) {
                    break 'run;
                }
                self.handle(ev, now);
            }
            self.settle();
        }
        self.accept.abort();
        if self.socket_ino.is_some() && socket_inode(&self.socket) == self.socket_ino {
            let _ = std::fs::remove_file(&self.socket);
        }
        for (_, mut s) in self.sessions.drain() {
            s.fail(SessionError::EngineGone);
        }
        tracing::info!(app = %self.name, "app removed");
        // Dropping the worker entries drops their process handles: kill_on_drop ends them.
    }

    /// After a batch of events: apply what the cores want until quiet, write to the workers,
    /// answer stop requests.
    fn settle(&mut self) {
        loop {
            self.pump();
            if !self.flush() {
                break;
            }
        }
        self.answer_stop_waiters();
    }

    fn next_deadline(&self) -> Option<std::time::Instant> {
        let workers = self.workers.values().filter_map(|w| w.machine.next_deadline()).min();
        let expiring = self.expiring.first().map(|(d, _)| d.into_std());
        [workers, self.balancer.next_deadline(), expiring].into_iter().flatten().min()
    }

    fn tick(&mut self) {
        let now = now();
        for w in self.workers.values_mut() {
            w.machine.tick(now);
        }
        self.balancer.tick(now);
        self.expire(now);
        self.settle();
    }

    /// Drops the queued calls whose deadline has come: they never reach a worker.
    fn expire(&mut self, now: std::time::Instant) {
        while let Some(&(deadline, id)) = self.expiring.first() {
            if deadline.into_std() > now {
                break;
            }
            self.expiring.pop_first();
            let queued = self.sessions.get(&id).is_some_and(|e| matches!(e.place, Place::Queued { .. }));
            if queued && self.balancer.cancel(id) {
                if let Some(mut entry) = self.sessions.remove(&id) {
                    tracing::debug!(app = %self.name, session = id, "request expired in the queue; not run");
                    entry.fail(SessionError::Rejected(Rejection::Expired));
                }
            }
        }
    }

    fn emit(&self, ev: EngineEvent) {
        let _ = self.events.send(ev);
    }

    fn handle(&mut self, ev: AppEvent, now: std::time::Instant) {
        match ev {
            AppEvent::Invoke { event, reply } => {
                let id = self.next_session;
                self.next_session += 1;
                match self.balancer.enqueue(id, now) {
                    Err(e) => {
                        let _ = reply.send(Err(EngineError::Rejected(e)));
                    }
                    Ok(()) => {
                        let (down_tx, down_rx) = mpsc::channel(self.config.session_messages);
                        let Some(app) = self.tx.upgrade() else { return };
                        let session = Session { id, app, down: down_rx, up_closed: false, done: false };
                        let entry = SessionEntry {
                            event,
                            sink: Sink::Stream(down_tx),
                            place: Place::Queued { pending: Vec::new() },
                            abandoned: false,
                            deadline: None,
                        };
                        self.sessions.insert(id, entry);
                        if reply.send(Ok(session)).is_err() {
                            // The caller gave up; its Session was dropped unsent.
                            self.abandon(id);
                        }
                    }
                }
            }
            AppEvent::Call { event, body, done } => {
                let id = self.next_session;
                self.next_session += 1;
                match self.balancer.enqueue(id, now) {
                    Err(e) => done.complete(Err(SessionError::Rejected(e))),
                    Ok(()) => {
                        let mut pending = Vec::with_capacity(2);
                        if !body.is_empty() {
                            pending.push(Up::Chunk(body));
                        }
                        pending.push(Up::Choke);
                        let entry = SessionEntry {
                            event,
                            sink: Sink::Collect { chunks: Vec::new(), done: Some(done) },
                            place: Place::Queued { pending },
                            abandoned: false,
                            deadline: None,
                        };
                        self.sessions.insert(id, entry);
                    }
                }
            }
            AppEvent::CallBefore { event, body, deadline, done } => {
                if deadline.into_std() <= now {
                    return done.complete(Err(SessionError::Rejected(Rejection::Expired)));
                }
                let id = self.next_session;
                self.handle(AppEvent::Call { event, body, done }, now);
                if let Some(entry) = self.sessions.get_mut(&id) {
                    entry.deadline = Some(deadline);
                    self.expiring.insert((deadline, id));
                }
            }
            AppEvent::Open { id, event, pending, down } => match self.balancer.enqueue(id, now) {
                Err(e) => {
                    let _ = down.try_send(Down::Error(SessionError::Rejected(e)));
                }
                Ok(()) => {
                    let entry = SessionEntry {
                        event,
                        sink: Sink::Stream(down),
                        place: Place::Queued { pending },
                        abandoned: false,
                        deadline: None,
                    };
                    self.sessions.insert(id, entry);
                }
            },
            AppEvent::Up { session, msg } => self.up(session, msg),
            AppEvent::Dropped { session } => self.abandon(session),
            AppEvent::Accepted { conn, writer, reader, peer } => {
                let pending = self.conns.values().filter(|c| c.worker.is_none()).count();
                if pending >= self.config.pending_connections {
                    tracing::warn!(app = %self.name, "too many connections without a handshake; closing one");
                    reader.abort();
                    return;
                }
                self.conns.insert(conn, ConnEntry { writer, reader, worker: None, peer, out: BytesMut::new() });
            }
            AppEvent::FromConn { conn, msgs } => {
                for msg in msgs {
                    self.worker_message(conn, msg, now);
                }
            }
            AppEvent::ConnClosed { conn, error } => {
                if let (Some(e), true) = (&error, self.conns.contains_key(&conn)) {
                    tracing::warn!(app = %self.name, error = %e, "worker connection closed");
                }
                self.close_conn(conn, now);
            }
            AppEvent::Exited { worker, status, stderr } => {
                let Some(w) = self.workers.get_mut(&worker) else { return };
                w.machine.handle_exit(status, now);
                // Recorded before the exit is announced, so an observer of the event finds it.
                let failure = w.machine.failure().map(|f| f.to_string());
                let uuid = w.uuid.clone();
                self.record(CrashRecord { uuid, at: wall_clock(), status: Some(status), failure, stderr });
                self.drain_worker(worker, now);
                self.remove_worker(worker, now);
            }
            AppEvent::Deploy { spec } => {
                tracing::info!(app = %self.name, "new version deployed; replacing workers");
                self.balancer.set_profile(&spec.profile, now);
                self.spec = *spec;
                self.balancer.start(now);
                self.balancer.retire_all(now);
            }
            AppEvent::Info { reply } => {
                let loads: HashMap<WorkerId, usize> =
                    self.balancer.loads().into_iter().map(|l| (l.id, l.load)).collect();
                let mut workers: Vec<WorkerInfo> = self
                    .workers
                    .iter()
                    .map(|(&id, w)| WorkerInfo {
                        id,
                        uuid: w.uuid.clone(),
                        pid: w.process.pid,
                        state: w.machine.state(),
                        load: loads.get(&id).copied().unwrap_or(0),
                    })
                    .collect();
                workers.sort_by_key(|w| w.id);
                let _ = reply.send(AppInfo {
                    name: self.name.clone(),
                    status: self.balancer.status().clone(),
                    queued: self.balancer.queue_len(),
                    population: self.balancer.population(),
                    sessions: self.sessions.len(),
                    workers,
                });
            }
            AppEvent::Probe { worker, event, body, done } => self.probe(worker, event, body, done),
            AppEvent::Terminate { worker } => {
                if let Some(w) = self.workers.get_mut(&worker) {
                    tracing::info!(app = %self.name, worker, "terminating the worker, as asked");
                    w.machine.terminate("the worker was killed", now);
                }
            }
            AppEvent::Population { n } => {
                tracing::info!(app = %self.name, population = n, "population set");
                self.balancer.set_population(n, now);
            }
            AppEvent::Stop { reply } => {
                self.balancer.stop();
                self.stop_waiters.push(reply);
            }
            AppEvent::Exit => {}
        }
    }

    fn answer_stop_waiters(&mut self) {
        if !self.stop_waiters.is_empty() && self.workers.is_empty() {
            for w in self.stop_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    fn record(&self, rec: CrashRecord) {
        if let Ok(mut log) = self.crashlog.lock() {
            if log.len() >= self.config.crashlog_entries {
                log.pop_front();
            }
            log.push_back(rec);
        }
    }

    /// Applies worker outputs and balancer actions until both are quiet.
    fn pump(&mut self) {
        let now = now();
        loop {
            let mut progressed = false;
            let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
            for id in ids {
                progressed |= self.drain_worker(id, now);
                let dead = self.workers.get(&id).is_some_and(|w| w.machine.state() == State::Dead);
                if dead {
                    self.remove_worker(id, now);
                }
            }
            while let Some(action) = self.balancer.poll_action() {
                progressed = true;
                self.apply(action);
            }
            if !progressed {
                break;
            }
        }
    }

    fn remove_worker(&mut self, id: WorkerId, now: std::time::Instant) {
        if let Some(w) = self.workers.remove(&id) {
            self.uuids.remove(&w.uuid);
            if let Some(conn) = w.conn {
                self.close_conn(conn, now);
            }
        }
    }

    /// Applies one worker's pending outputs. Returns whether there were any.
    fn drain_worker(&mut self, id: WorkerId, now: std::time::Instant) -> bool {
        let mut any = false;
        loop {
            let Some(w) = self.workers.get_mut(&id) else { return any };
            let Some(out) = w.machine.poll_output() else { return any };
            any = true;
            match out {
                Output::Send(msg) => {
                    if matches!(msg, Message::Terminate { .. }) {
                        self.emit(EngineEvent::Terminating { app: self.name.clone(), worker: id });
                    }
                    self.send_to_worker(id, &msg);
                }
                Output::Kill(signal) => {
                    tracing::info!(app = %self.name, worker = id, ?signal, "signalling worker");
                    let _ = w.process.signals.try_send(signal);
                    self.emit(EngineEvent::Signalled { app: self.name.clone(), worker: id, signal });
                }
                Output::Ready => {
                    self.emit(EngineEvent::Ready { app: self.name.clone(), worker: id });
                    self.balancer.worker_ready(id, now);
                }
                Output::Draining => self.balancer.worker_draining(id, now),
                Output::Failed(reason) => {
                    tracing::warn!(app = %self.name, worker = id, %reason, "worker failed");
                    self.emit(EngineEvent::Failed { app: self.name.clone(), worker: id, reason: reason.clone() });
                    self.fail_sessions_of(id, &reason.to_string(), now);
                }
                Output::Exited { failure, status } => {
                    tracing::info!(app = %self.name, worker = id, %status, failed = failure.is_some(), "worker exited");
                    self.fail_sessions_of(id, "worker exited", now);
                    let failure = failure.map(|f| f.to_string());
                    self.emit(EngineEvent::Exited {
                        app: self.name.clone(),
                        worker: id,
                        status: Some(status),
                        failure: failure.clone(),
                    });
                    self.balancer.worker_exited(id, failure.as_deref(), now);
                }
            }
        }
    }

    /// Queues `msg` for the worker's connection; [`App::flush`] writes it.
    fn send_to_worker(&mut self, id: WorkerId, msg: &Message) {
        let Some(conn) = self.workers.get(&id).and_then(|w| w.conn) else { return };
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if c.out.is_empty() {
            self.dirty.push(conn);
        }
        msg.encode(&mut c.out);
    }

    /// Hands each connection's queued messages to its writer as one buffer. A worker whose
    /// writer queue is full is not keeping up: its connection is closed. Returns whether that
    /// happened (the worker machines then have outputs to pump).
    fn flush(&mut self) -> bool {
        let mut closed = false;
        let mut dirty = std::mem::take(&mut self.dirty);
        for conn in dirty.drain(..) {
            let Some(c) = self.conns.get_mut(&conn) else { continue };
            if c.out.is_empty() {
                continue;
            }
            let bytes = c.out.split().freeze();
            if let Err(e) = c.writer.try_send(bytes) {
                let worker = c.worker;
                tracing::warn!(app = %self.name, ?worker, error = %e, "worker connection is not keeping up; closing it");
                self.close_conn(conn, now());
                closed = true;
            }
        }
        self.dirty = dirty;
        closed
    }

    /// Fails every session open on `worker` (its process failed or exited).
    fn fail_sessions_of(&mut self, worker: WorkerId, reason: &str, now: std::time::Instant) {
        let Some(w) = self.workers.get_mut(&worker) else { return };
        let sessions: Vec<u64> = w.channels.drain().map(|(_, s)| s).collect();
        for s in sessions {
            if let Some(mut entry) = self.sessions.remove(&s) {
                entry.fail(SessionError::WorkerFailed(reason.to_string()));
            }
            if !self.probes.remove(&s) {
                self.balancer.session_done(worker, false, now);
            }
        }
    }

    fn apply(&mut self, action: Action) {
        let now = now();
        match action {
            Action::Spawn(id) => self.spawn(id, now),
            Action::Assign { request, worker } => self.assign(request, worker, now),
            Action::Retire(id) => {
                if let Some(w) = self.workers.get_mut(&id) {
                    w.machine.terminate("engine asked the worker to stop", now);
                }
            }
            Action::Reject { request, error } => {
                if let Some(mut entry) = self.sessions.remove(&request) {
                    if let Some(d) = entry.deadline {
                        self.expiring.remove(&(d, request));
                    }
                    entry.fail(SessionError::Rejected(error));
                }
            }
            Action::Status(status) => {
                match &status {
                    AppStatus::Failed { reason } => tracing::error!(app = %self.name, %reason, "app failed"),
                    s => tracing::info!(app = %self.name, status = ?s, "app status"),
                }
                self.emit(EngineEvent::Status { app: self.name.clone(), status });
            }
        }
    }

    fn spawn(&mut self, id: WorkerId, now: std::time::Instant) {
        let uuid = new_uuid();
        let spec = &self.spec;
        let launch = Launch {
            app: self.name.clone(),
            executable: spec.manifest.executable_path(&spec.dir),
            args: spec.manifest.args.clone(),
            env: spec.manifest.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            cwd: spec.dir.clone(),
            locator: self.config.locator.clone(),
            endpoint: self.socket.clone(),
            uuid: uuid.clone(),
            stderr_lines: self.config.crashlog_lines,
            run_as: self.config.run_as.clone(),
        };
        let tx = self.tx.clone();
        let on_exit = move |exit: process::Exit| {
            if let Some(tx) = tx.upgrade() {
                tokio::spawn(async move {
                    let _ = tx.send(AppEvent::Exited { worker: id, status: exit.status, stderr: exit.stderr }).await;
                });
            }
        };
        match process::spawn(launch, on_exit) {
            Ok(process) => {
                tracing::info!(app = %self.name, worker = id, pid = process.pid, %uuid, "worker spawned");
                self.emit(EngineEvent::Spawned { app: self.name.clone(), worker: id, pid: process.pid });
                let mut timeouts = spec.profile.timeouts();
                timeouts.kill_grace = self.config.kill_grace;
                let machine = Worker::new(timeouts, now);
                self.uuids.insert(uuid.clone(), id);
                self.workers.insert(
                    id,
                    WorkerEntry {
                        uuid,
                        machine,
                        process,
                        conn: None,
                        next_channel: FIRST_SESSION_CHANNEL,
                        channels: HashMap::new(),
                    },
                );
            }
            Err(e) => {
                let path = spec.manifest.executable_path(&spec.dir);
                let mut failure = format!("cannot start {}: {e}", path.display());
                if let Some(user) = &self.config.run_as {
                    if let Some((dir, mode)) = user.obstacle(&path) {
                        failure.push_str(&format!(
                            " (workers run as user {}, who cannot enter {} (mode {mode:04o}): make it searchable or move the data directory)",
                            user.name,
                            dir.display()
                        ));
                    }
                }
                tracing::error!(app = %self.name, worker = id, error = %failure, "spawn failed");
                self.record(CrashRecord {
                    uuid,
                    at: wall_clock(),
                    status: None,
                    failure: Some(failure.clone()),
                    stderr: Vec::new(),
                });
                self.emit(EngineEvent::Exited {
                    app: self.name.clone(),
                    worker: id,
                    status: None,
                    failure: Some(failure.clone()),
                });
                self.balancer.worker_exited(id, Some(&failure), now);
            }
        }
    }

    fn assign(&mut self, request: u64, worker: WorkerId, now: std::time::Instant) {
        if let Some(deadline) = self.sessions.get(&request).and_then(|e| e.deadline) {
            self.expiring.remove(&(deadline, request));
            if deadline.into_std() <= now {
                // Its time ran out while it waited: it is not run.
                if let Some(mut entry) = self.sessions.remove(&request) {
                    entry.fail(SessionError::Rejected(Rejection::Expired));
                }
                self.balancer.session_done(worker, false, now);
                return;
            }
        }
        let Some(entry) = self.sessions.get_mut(&request) else {
            // Withdrawn meanwhile.
            self.balancer.session_done(worker, true, now);
            return;
        };
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        let channel = w.next_channel;
        w.next_channel += 1;
        w.channels.insert(channel, request);
        let pending = match std::mem::replace(&mut entry.place, Place::Open { worker, channel }) {
            Place::Queued { pending } => pending,
            Place::Open { .. } => Vec::new(),
        };
        let invoke = Message::Invoke { channel, event: entry.event.clone() };
        self.send_to_worker(worker, &invoke);
        for up in pending {
            self.send_to_worker(worker, &up_message(channel, up));
        }
    }

    /// Opens `event` on `worker`'s own channel, outside the balancer: the session is not
    /// counted in the worker's load and never queued.
    fn probe(&mut self, worker: WorkerId, event: String, body: Bytes, done: CallDone) {
        let active = self.workers.get(&worker).is_some_and(|w| w.machine.state() == State::Active && w.conn.is_some());
        if !active {
            let state = self.workers.get(&worker).map_or("gone".to_string(), |w| w.machine.state().name().to_string());
            return done.complete(Err(SessionError::WorkerFailed(format!("worker {worker} is not active ({state})"))));
        }
        let id = self.next_session;
        self.next_session += 1;
        let Some(w) = self.workers.get_mut(&worker) else { return };
        let channel = w.next_channel;
        w.next_channel += 1;
        w.channels.insert(channel, id);
        self.sessions.insert(
            id,
            SessionEntry {
                event: event.clone(),
                sink: Sink::Collect { chunks: Vec::new(), done: Some(done) },
                place: Place::Open { worker, channel },
                abandoned: false,
                deadline: None,
            },
        );
        self.probes.insert(id);
        self.send_to_worker(worker, &Message::Invoke { channel, event });
        if !body.is_empty() {
            self.send_to_worker(worker, &Message::Chunk { channel, data: body });
        }
        self.send_to_worker(worker, &Message::Choke { channel });
    }

    fn up(&mut self, session: u64, msg: Up) {
        let limit = self.config.session_messages;
        let Some(entry) = self.sessions.get_mut(&session) else { return };
        match &mut entry.place {
            Place::Queued { pending } => {
                if pending.len() >= limit {
                    entry.fail(SessionError::Overflow(limit));
                    self.sessions.remove(&session);
                    self.balancer.cancel(session);
                } else {
                    pending.push(msg);
                }
            }
            Place::Open { worker, channel } => {
                let (worker, channel) = (*worker, *channel);
                self.send_to_worker(worker, &up_message(channel, msg));
            }
        }
    }

    /// The caller went away: withdraw a queued request; tell the worker of an open one.
    fn abandon(&mut self, session: u64) {
        let Some(entry) = self.sessions.get_mut(&session) else { return };
        match entry.place {
            Place::Queued { .. } => {
                if let Some(d) = entry.deadline {
                    self.expiring.remove(&(d, session));
                }
                self.sessions.remove(&session);
                self.balancer.cancel(session);
            }
            Place::Open { worker, channel } => {
                if !entry.abandoned {
                    entry.abandoned = true;
                    let msg = Message::Error {
                        channel,
                        category: category::ENGINE,
                        code: 1,
                        message: "caller went away".into(),
                    };
                    self.send_to_worker(worker, &msg);
                }
            }
        }
    }

    fn worker_message(&mut self, conn: u64, msg: Message, now: std::time::Instant) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let worker = match (c.worker, &msg) {
            (Some(w), _) => w,
            (None, Message::Handshake { uuid }) => {
                let Some(&id) = self.uuids.get(uuid) else {
                    tracing::warn!(app = %self.name, %uuid, "handshake with an unknown uuid; closing");
                    self.close_conn(conn, now);
                    return;
                };
                let Some(w) = self.workers.get_mut(&id) else { return };
                if !c.peer.descends_from(w.process.pid) {
                    tracing::warn!(
                        app = %self.name, %uuid, worker_pid = w.process.pid, peer_pid = ?c.peer.pid(),
                        "handshake from a process that is not this worker nor one of its children; closing"
                    );
                    self.close_conn(conn, now);
                    return;
                }
                if w.conn.is_some() {
                    tracing::warn!(app = %self.name, %uuid, "second connection for a worker; closing it");
                    self.close_conn(conn, now);
                    return;
                }
                w.conn = Some(conn);
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.worker = Some(id);
                }
                id
            }
            (None, _) => {
                tracing::warn!(app = %self.name, "message before handshake; closing");
                self.close_conn(conn, now);
                return;
            }
        };
        match msg {
            Message::Handshake { .. } | Message::Heartbeat | Message::Terminate { .. } => {
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.machine.handle_message(&msg, now);
                }
            }
            Message::Invoke { .. } => {}
            Message::Chunk { channel, data } => self.down(worker, channel, Down::Chunk(data), now),
            Message::Choke { channel } => self.down(worker, channel, Down::Choke, now),
            Message::Error { channel, category, code, message } => {
                let e = SessionError::Worker { category, code, message };
                self.down(worker, channel, Down::Error(e), now)
            }
        }
    }

    /// Forgets a worker connection: its reader stops, and a handshaken worker learns that it
    /// is disconnected.
    fn close_conn(&mut self, conn: u64, now: std::time::Instant) {
        let Some(c) = self.conns.remove(&conn) else { return };
        c.reader.abort();
        if let Some(w) = c.worker.and_then(|id| self.workers.get_mut(&id)) {
            w.conn = None;
            w.machine.handle_disconnect(now);
        }
    }

    /// A message from a worker on a session channel.
    fn down(&mut self, worker: WorkerId, channel: u64, msg: Down, now: std::time::Instant) {
        let Some(w) = self.workers.get_mut(&worker) else { return };
        let Some(&session) = w.channels.get(&channel) else { return };
        let last = !matches!(msg, Down::Chunk(_));
        if last {
            w.channels.remove(&channel);
        }
        let limit = self.config.session_messages;
        if let Some(entry) = self.sessions.get_mut(&session) {
            if !entry.abandoned && !entry.deliver(msg, limit) {
                // The caller reads too slowly (or is gone): stop buffering for it.
                entry.abandoned = true;
                entry.fail(SessionError::Overflow(limit));
                let msg = Message::Error {
                    channel,
                    category: category::ENGINE,
                    code: 2,
                    message: "caller is not reading replies".into(),
                };
                self.send_to_worker(worker, &msg);
            }
        }
        if last {
            self.sessions.remove(&session);
            if !self.probes.remove(&session) {
                self.balancer.session_done(worker, true, now);
            }
        }
    }
}

fn up_message(channel: u64, up: Up) -> Message {
    match up {
        Up::Chunk(data) => Message::Chunk { channel, data },
        Up::Choke => Message::Choke { channel },
        Up::Error { category, code, message } => Message::Error { channel, category, code, message },
    }
}

/// A random (version 4) UUID.
pub(crate) fn new_uuid() -> String {
    let b: [u8; 16] = rand::random();
    let x =
        (u128::from_be_bytes(b) & !(0xf000u128 << 64) & !(0xc000u128 << 48)) | (0x4000u128 << 64) | (0x8000u128 << 48);
    let h = format!("{x:032x}");
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

async fn accept_loop(listener: UnixListener, tx: mpsc::Sender<AppEvent>, outbound: usize, max_message: usize) {
    let mut next = 1u64;
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a worker connection failed");
                // Back off a little on fd exhaustion instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let conn = next;
        next += 1;
        let peer = Peer::of(&stream);
        let (writer_tx, writer_rx) = mpsc::channel::<Bytes>(outbound);
        let (r, w) = stream.into_split();
        tokio::spawn(write_loop(w, writer_rx));
        let reader = tokio::spawn(read_loop(r, conn, tx.clone(), max_message));
        if tx.send(AppEvent::Accepted { conn, writer: writer_tx, reader: reader.abort_handle(), peer }).await.is_err() {
            return;
        }
    }
}

async fn read_loop(mut r: tokio::net::unix::OwnedReadHalf, conn: u64, tx: mpsc::Sender<AppEvent>, max: usize) {
    let mut decoder = Decoder::new(Role::Engine, max);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let error = loop {
        // Everything one read decoded travels as one event.
        let mut msgs = Vec::new();
        let failed = loop {
            match decoder.decode(&mut buf) {
                Ok(Some(msg)) => msgs.push(msg),
                Ok(None) => break None,
                Err(e) => break Some(e.to_string()),
            }
        };
        if !msgs.is_empty() && tx.send(AppEvent::FromConn { conn, msgs }).await.is_err() {
            return;
        }
        if let Some(e) = failed {
            let _ = tx.send(AppEvent::ConnClosed { conn, error: Some(e) }).await;
            return;
        }
        match r.read_buf(&mut buf).await {
            Ok(0) => break if buf.is_empty() { None } else { Some("connection closed mid-message".to_string()) },
            Ok(_) => {}
            Err(e) => break Some(e.to_string()),
        }
    };
    let _ = tx.send(AppEvent::ConnClosed { conn, error }).await;
}

/// Writes queued messages to a peer in batches until the queue closes or a write fails, then
/// shuts the write side down. Shared by worker connections and locator clients.
pub(crate) async fn write_loop<W: tokio::io::AsyncWrite + Unpin>(mut w: W, mut rx: mpsc::Receiver<Bytes>) {
    let mut batch = Vec::with_capacity(64);
    let mut out = Vec::with_capacity(64 * 1024);
    while rx.recv_many(&mut batch, 64).await > 0 {
        if batch.len() == 1 {
            let b = batch.pop().expect("one buffer");
            if w.write_all(&b).await.is_err() {
                return;
            }
            continue;
        }
        // One write for the whole batch: an invocation is three messages (invoke, chunk, close).
        out.clear();
        for b in batch.drain(..) {
            out.extend_from_slice(&b);
        }
        if w.write_all(&out).await.is_err() {
            return;
        }
    }
    let _ = w.shutdown().await;
}

fn socket_inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| m.ino())
}

/// `path` made absolute against the current directory (unchanged when it already is, or when
/// the current directory cannot be read).
pub(crate) fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The path of an app's worker socket under `runtime_dir`.
pub fn socket_path(runtime_dir: &Path, app: &str) -> PathBuf {
    runtime_dir.join(format!("{app}.sock"))
}
