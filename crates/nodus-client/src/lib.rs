//! Async Rust client for a nodus node.
//!
//! [`Client::connect`] opens a connection (Unix socket or TCP) speaking the binary form,
//! authenticates when a token is configured, optionally registers a service, and keeps the
//! connection alive: when the node restarts, the client reconnects with jittered exponential
//! backoff and registers again. Messages that are not replies to [`Client::request`] arrive on the
//! [`Incoming`] stream.
//!
//! The client tells the truth about what happened to a message:
//! - the node's refusals (`SERVICE_UNAVAILABLE`, `UNKNOWN`, `QUITTING`, `INVALID`,
//!   `ERROR code=...` such as `timeout`, `expired`, `disconnected`, `forbidden`, `unauthorized`)
//!   answer a request with [`ClientError::Refused`], not `Ok`; replies from services are `Ok`;
//! - a message over the frame bound fails in [`Client::send`] with [`ClientError::TooLarge`];
//! - a slow reader of [`Incoming`] never stalls replies or writes: when its buffer
//!   ([`ClientConfig::incoming_capacity`]) is full, further incoming messages are dropped, counted
//!   ([`Incoming::dropped`]) and logged once per run of drops (replies to `request` never are);
//! - [`Client::request`] is cancel-safe: the driver task owns the table of requests in flight, so a
//!   request future dropped at any point leaves nothing behind, and a request given up on before
//!   it was written is not sent at all;
//! - every request has a timeout ([`ClientConfig::request_timeout`], 10 s by default).
//!
//! ```no_run
//! # async fn demo() -> Result<(), nodus_client::ClientError> {
//! use nodus_client::{Client, ClientConfig};
//! use nodus_wire::Message;
//! let (client, mut incoming) = Client::connect(ClientConfig::new("127.0.0.1:4040").service("echo")).await?;
//! while let Some(msg) = incoming.recv().await {
//!     client.send(msg.reply("ECHOED").with_payload(msg.payload.clone())).await?;
//! }
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod admin;
mod connection;
pub mod control;
pub mod flags;

use nodus_wire::Message;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

pub use admin::{Admin, AdminError};

/// Default of [`ClientConfig::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`ClientConfig::queue`]: commands (sends and requests) waiting for the driver.
pub const DEFAULT_QUEUE: usize = 4096;
/// Default of [`ClientConfig::incoming_capacity`]: messages waiting to be read from [`Incoming`].
pub const DEFAULT_INCOMING: usize = 4096;
/// Default of [`ClientConfig::max_pending`]: requests in flight at once.
pub const DEFAULT_MAX_PENDING: usize = 65536;

/// Where the node listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP `host:port`.
    Tcp(String),
}

impl std::str::FromStr for Endpoint {
    type Err = ClientError;

    /// `unix:PATH`, a path (anything with a `/`, or ending in `.sock`, such as the
    /// `nodus-data/nodus.sock` the daemon logs) is a Unix socket; `tcp:HOST:PORT` or `HOST:PORT` is
    /// TCP.
    fn from_str(s: &str) -> Result<Self, ClientError> {
        if let Some(p) = s.strip_prefix("unix:") {
            Ok(Endpoint::Unix(p.into()))
        } else if let Some(a) = s.strip_prefix("tcp:") {
            Ok(Endpoint::Tcp(a.to_string()))
        } else if s.contains('/') || s.ends_with(".sock") {
            Ok(Endpoint::Unix(s.into()))
        } else if s.contains(':') {
            Ok(Endpoint::Tcp(s.to_string()))
        } else {
            Err(ClientError::BadEndpoint(s.to_string()))
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => f.write_str(a),
        }
    }
}

/// Client settings: build with [`ClientConfig::new`] and the builder methods.
#[derive(Clone)]
pub struct ClientConfig {
    endpoint: String,
    service: Option<String>,
    commands: Vec<String>,
    reconnect: bool,
    backoff_min: Duration,
    backoff_max: Duration,
    hold: usize,
    queue: usize,
    incoming: usize,
    max_pending: usize,
    max_frame: usize,
    request_timeout: Duration,
    token: Option<String>,
    connector: Option<Connector>,
    control: bool,
    parent: Option<(u64, Option<String>)>,
}

/// A byte stream to a node: what a [`Connector`] opens.
pub trait Transport: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Transport for T {}

/// Opens a connection to a node some other way than a socket address (the daemon's own
/// in-process connections); called for the first connection and every reconnection.
pub type Connector = Arc<
    dyn Fn() -> Pin<Box<dyn std::future::Future<Output = std::io::Result<Box<dyn Transport>>> + Send>> + Send + Sync,
>;

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("endpoint", &self.endpoint)
            .field("service", &self.service)
            .field("commands", &self.commands)
            .field("reconnect", &self.reconnect)
            .field("backoff", &(self.backoff_min..self.backoff_max))
            .field("hold", &self.hold)
            .field("queue", &self.queue)
            .field("incoming", &self.incoming)
            .field("max_pending", &self.max_pending)
            .field("max_frame", &self.max_frame)
            .field("request_timeout", &self.request_timeout)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("connector", &self.connector.as_ref().map(|_| "<set>"))
            .field("control", &self.control)
            .field("parent", &self.parent)
            .finish()
    }
}

impl ClientConfig {
    /// Defaults for `endpoint`: anonymous, no token, reconnecting with 50 ms..5 s backoff, nothing
    /// held while disconnected, [`DEFAULT_REQUEST_TIMEOUT`], [`DEFAULT_QUEUE`],
    /// [`DEFAULT_INCOMING`], [`DEFAULT_MAX_PENDING`] and the wire's default frame bound.
    pub fn new(endpoint: impl Into<String>) -> Self {
        ClientConfig {
            endpoint: endpoint.into(),
            service: None,
            commands: Vec::new(),
            reconnect: true,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            hold: 0,
            queue: DEFAULT_QUEUE,
            incoming: DEFAULT_INCOMING,
            max_pending: DEFAULT_MAX_PENDING,
            max_frame: nodus_wire::DEFAULT_MAX_FRAME,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            token: None,
            connector: None,
            control: true,
            parent: None,
        }
    }

    /// A client whose connections `connector` opens (an in-process node, a test harness):
    /// `name` stands for the node in messages and errors. Everything else is as for a socket.
    pub fn with_connector(name: impl Into<String>, connector: Connector) -> Self {
        let mut config = ClientConfig::new(format!("tcp:{}", name.into()));
        config.connector = Some(connector);
        config
    }

    /// The node to talk to, as given.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Register as `name` once connected (and again after every reconnect).
    pub fn service(mut self, name: impl Into<String>) -> Self {
        self.service = Some(name.into());
        self
    }

    /// Declare the commands this service understands (`COMMANDS`; none declared: accept all).
    pub fn commands<I: IntoIterator<Item = S>, S: Into<String>>(mut self, commands: I) -> Self {
        self.commands = commands.into_iter().map(Into::into).collect();
        self
    }

    /// Hold up to `n` messages sent while disconnected and send them after reconnecting (0, the
    /// default: sending while disconnected fails with [`ClientError::NotConnected`]).
    pub fn hold(mut self, n: usize) -> Self {
        self.hold = n;
        self
    }

    /// Do not reconnect: the client closes once the connection drops.
    pub fn no_reconnect(mut self) -> Self {
        self.reconnect = false;
        self
    }

    /// Reconnect delays: from `min` doubling up to `max`, jittered ([`nodus_wire::Backoff`]).
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff_min = min;
        self.backoff_max = max;
        self
    }

    /// Bound of the queue of sends and requests waiting for the connection, in messages.
    pub fn queue(mut self, n: usize) -> Self {
        self.queue = n.max(1);
        self
    }

    /// Bound of the [`Incoming`] buffer, in messages; when full, further messages are dropped and
    /// counted ([`Incoming::dropped`]).
    pub fn incoming_capacity(mut self, n: usize) -> Self {
        self.incoming = n.max(1);
        self
    }

    /// Most requests in flight at once; more fail with [`ClientError::QueueFull`].
    pub fn max_pending(mut self, n: usize) -> Self {
        self.max_pending = n.max(1);
        self
    }

    /// Largest frame sent or accepted, in bytes (the node's `limits.max_frame_bytes`).
    pub fn max_frame(mut self, bytes: usize) -> Self {
        self.max_frame = bytes;
        self
    }

    /// Timeout of [`Client::request`].
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Whether the SDK answers the control plane for this service (the default): `MONITORING`
    /// is answered with the service name, the node, and what [`Client::set_status`] last said;
    /// `KILL` from the node's `control` service is answered, handed to [`Incoming`] (so the
    /// program learns it), and the client closes for good (no reconnect). With `false` both arrive
    /// on [`Incoming`] like any message, for the program to answer itself.
    pub fn handle_control(mut self, handle: bool) -> Self {
        self.control = handle;
        self
    }

    /// The component that started this service (seed 000 `pid`), for the node's component tree:
    /// `pid` as announced to it in `READY component=` (see [`Client::component`]), and the node it
    /// runs on when that is another node. A kill of the parent then kills this service first.
    pub fn parent(mut self, pid: u64, node: Option<String>) -> Self {
        self.parent = Some((pid, node));
        self
    }

    /// The node's token (64 hex characters, from `<data_dir>/auth.token`): sent as `AUTH` right
    /// after the preface, before `REGISTER`, on every (re)connection.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }
}

/// What the node answered instead of delivering or answering a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// `SERVICE_UNAVAILABLE`: nobody serves the destination (not registered, not cached,
    /// unreachable node, unknown server, cache full).
    ServiceUnavailable,
    /// `UNKNOWN`: the destination does not accept this command.
    Unknown,
    /// `QUITTING`: the node is shutting down and takes no new requests.
    Quitting,
    /// `INVALID`: the message or the node command is malformed.
    Invalid,
    /// `ERROR code=...`: `timeout`, `expired`, `disconnected`, `forbidden`, `unauthorized`, ...
    Error,
    /// `TRANSMISSION_REPORT status=failed`: the message was dropped (`cache=no`).
    Dropped,
}

/// A refusal by a node (a message from a node's own `node` service, not from a service), with the
/// node's message.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    kind: RefusalKind,
    reply: Box<Message>,
}

impl Refusal {
    /// The refusal `reply` stands for, when it is one: `from` a node's `node` service, and one of
    /// the commands of [`RefusalKind`].
    pub fn from_reply(reply: &Message) -> Option<Refusal> {
        if reply.from.service != "node" {
            return None;
        }
        let kind = match reply.command.as_str() {
            "SERVICE_UNAVAILABLE" => RefusalKind::ServiceUnavailable,
            "UNKNOWN" => RefusalKind::Unknown,
            "QUITTING" => RefusalKind::Quitting,
            "INVALID" => RefusalKind::Invalid,
            "ERROR" => RefusalKind::Error,
            "TRANSMISSION_REPORT" if reply.get("status") == Some("failed") => RefusalKind::Dropped,
            _ => return None,
        };
        Some(Refusal { kind, reply: Box::new(reply.clone()) })
    }

    /// What kind of refusal.
    pub fn kind(&self) -> RefusalKind {
        self.kind
    }

    /// The node's message, as received.
    pub fn reply(&self) -> &Message {
        &self.reply
    }

    /// The node that refused.
    pub fn server(&self) -> &str {
        &self.reply.from.server
    }

    /// The machine-readable reason: `code` of an `ERROR` (`forbidden`, `timeout`, ...), `reason`
    /// of a `SERVICE_UNAVAILABLE` (`unavailable`, `unreachable`, `unknown_server`, `cache_full`).
    pub fn code(&self) -> Option<&str> {
        self.reply.get("code").or(self.reply.get("reason"))
    }

    /// The command the refusal is about, when the node said.
    pub fn command(&self) -> Option<&str> {
        self.reply.get("command")
    }

    /// True for `ERROR code=forbidden`: the connection's principal lacks a permission.
    pub fn is_forbidden(&self) -> bool {
        self.kind == RefusalKind::Error && self.code() == Some("forbidden")
    }

    /// True for `ERROR code=unauthorized`: a token was refused.
    pub fn is_unauthorized(&self) -> bool {
        self.kind == RefusalKind::Error && self.code() == Some("unauthorized")
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = &self.reply;
        let text = r.get("message");
        match self.kind {
            RefusalKind::Unknown => {
                let command = r.get("command").unwrap_or("?");
                write!(f, "UNKNOWN command={command}: the destination does not accept command {command}")
            }
            RefusalKind::Quitting => write!(f, "QUITTING: node {} is shutting down", r.from.server),
            RefusalKind::Dropped => {
                let service = r.get("destination_service").unwrap_or("?");
                write!(
                    f,
                    "not delivered: service {service:?} is not registered on {} and the message was not cached \
                     (TRANSMISSION_REPORT status=failed)",
                    r.from.server
                )
            }
            RefusalKind::ServiceUnavailable => {
                write!(f, "SERVICE_UNAVAILABLE")?;
                if let Some(reason) = r.get("reason") {
                    write!(f, " reason={reason}")?;
                }
                match text {
                    Some(t) => write!(f, ": {t}"),
                    None => Ok(()),
                }
            }
            RefusalKind::Invalid | RefusalKind::Error => {
                write!(f, "{}", r.command)?;
                if let Some(code) = r.get("code") {
                    write!(f, " code={code}")?;
                }
                match text {
                    Some(t) => write!(f, ": {t}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// Client failure.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The endpoint string is not `unix:PATH`, a path, or `host:port`.
    #[error("bad node address {0:?}: use host:port, unix:/path or a socket path")]
    BadEndpoint(String),
    /// The connection could not be opened (or broke during the handshake).
    #[error("cannot connect to the node at {endpoint} (is `nodus daemon` running?)")]
    Connect {
        /// Where.
        endpoint: String,
        /// The operating system's error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The connection opened but the handshake did not complete.
    #[error("handshake with the node at {endpoint} failed: {reason}")]
    Handshake {
        /// Where.
        endpoint: String,
        /// What went wrong.
        reason: String,
    },
    /// The node refused the token (`ERROR code=unauthorized`).
    #[error("the node refused the token: {0}")]
    Unauthorized(String),
    /// The node refused the registration.
    #[error("the node refused to register the service: {0}")]
    Register(String),
    /// Not connected and not holding messages.
    #[error("not connected to the node")]
    NotConnected,
    /// The hold, the send queue or the table of requests in flight is full.
    #[error("the outgoing queue is full")]
    QueueFull,
    /// The message does not fit in one frame.
    #[error("message of {len} bytes exceeds the maximum frame of {max} bytes")]
    TooLarge {
        /// Encoded size.
        len: usize,
        /// The bound ([`ClientConfig::max_frame`]).
        max: usize,
    },
    /// Another request in flight uses this id.
    #[error("a request with id {0} is already in flight")]
    DuplicateId(u64),
    /// The node refused the request.
    #[error("{0}")]
    Refused(Refusal),
    /// The connection dropped before the reply arrived.
    #[error("the connection to the node dropped before the reply arrived")]
    Disconnected,
    /// No reply within the timeout.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The client was closed.
    #[error("the client is closed")]
    Closed,
}

impl ClientError {
    /// The node's refusal, when that is what this error is.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            ClientError::Refused(r) => Some(r),
            _ => None,
        }
    }
}

/// The encoding error as the client reports it.
pub(crate) fn too_large(e: nodus_wire::binary::EncodeError) -> ClientError {
    match e {
        nodus_wire::binary::EncodeError::TooLarge { len, max } => ClientError::TooLarge { len, max },
    }
}

/// An upper bound of `msg`'s encoded frame body: every string, the payload and the parameter map
/// with their longest MessagePack headers (5 bytes), every integer at 9 bytes.
fn frame_bound(msg: &Message) -> usize {
    const HEADER: usize = 5;
    const INT: usize = 9;
    let strings = [&msg.command, &msg.from.server, &msg.from.service, &msg.to.server, &msg.to.service]
        .iter()
        .map(|s| s.len() + HEADER)
        .sum::<usize>();
    let params = HEADER + msg.params.iter().map(|(k, v)| k.len() + v.len() + 2 * HEADER).sum::<usize>();
    1 + strings + params + msg.payload.len() + HEADER + msg.envelope.creator.len() + HEADER + 6 * INT
}

/// Connection state, observable with [`Client::state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Connected (and registered, when a service name is set).
    Connected,
    /// Trying to reconnect.
    Reconnecting,
    /// Closed for good.
    Closed,
}

/// The driver's view of the connection, published to every handle.
#[derive(Debug, Clone)]
pub(crate) struct Status {
    pub(crate) state: State,
    pub(crate) server: String,
    /// The service's component id, from `READY component=` (0 before, or without a service).
    pub(crate) component: u64,
}

/// What this service says about itself when monitored (see [`Client::set_status`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct SelfReport {
    pub(crate) is_running: bool,
    pub(crate) message: String,
}

/// What a handle asks of the driver task, in order. Messages in it are known to fit in a frame.
// Messages are the hot path: boxing them would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Command {
    /// Write this message.
    Send(Message),
    /// Write this request (its id set) and hand its answer to `reply`.
    Request { msg: Message, reply: oneshot::Sender<Result<Message, ClientError>> },
    /// How many requests are in flight (after forgetting abandoned ones).
    Pending(oneshot::Sender<usize>),
}

/// A handle to the node; cheap to clone.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<Status>,
    next_id: Arc<AtomicU64>,
    hold: usize,
    max_frame: usize,
    request_timeout: Duration,
    report: Arc<std::sync::Mutex<SelfReport>>,
}

/// Messages for this client that are not replies to its requests; a [`futures_core::Stream`].
///
/// Bounded by [`ClientConfig::incoming_capacity`]: when the reader falls that far behind, further
/// messages are dropped (counted by [`Incoming::dropped`], logged once per run of drops) so that
/// replies and writes never wait for it.
pub struct Incoming {
    rx: mpsc::Receiver<Message>,
    dropped: Arc<AtomicU64>,
}

impl Incoming {
    /// The next message; `None` once the client is closed for good.
    pub async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }

    /// The next message if one is already waiting.
    pub fn try_recv(&mut self) -> Option<Message> {
        self.rx.try_recv().ok()
    }

    /// Messages dropped so far because this stream was full (a slow consumer).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl futures_core::Stream for Incoming {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.rx.poll_recv(cx)
    }
}

impl Client {
    /// Connects (authenticates, and registers when a service is configured).
    ///
    /// Fails when the endpoint is malformed, the first connection cannot be made, the node
    /// refuses the token or the registration; later drops are handled by reconnecting.
    pub async fn connect(config: ClientConfig) -> Result<(Client, Incoming), ClientError> {
        let endpoint: Endpoint = config.endpoint.parse()?;
        let (cmd_tx, cmd_rx) = mpsc::channel(config.queue.max(config.hold).max(1));
        let (in_tx, in_rx) = mpsc::channel(config.incoming.max(1));
        let first = connection::establish(&endpoint, &config).await?;
        let (status_tx, status_rx) = watch::channel(Status {
            state: State::Connected,
            server: first.server.clone(),
            component: first.component,
        });
        let dropped = Arc::new(AtomicU64::new(0));
        let report = Arc::new(std::sync::Mutex::new(SelfReport::default()));
        let driver = connection::Driver::new(
            endpoint,
            config.clone(),
            cmd_rx,
            in_tx,
            status_tx,
            dropped.clone(),
            report.clone(),
        );
        tokio::spawn(driver.run(first));
        let seed = rand::random::<u64>() >> 16;
        Ok((
            Client {
                commands: cmd_tx,
                status: status_rx,
                next_id: Arc::new(AtomicU64::new(seed.max(1))),
                hold: config.hold,
                max_frame: config.max_frame,
                request_timeout: config.request_timeout,
                report,
            },
            Incoming { rx: in_rx, dropped },
        ))
    }

    /// A fresh message id, unique for this client.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The server name of the node, as it said in `READY` (or `PONG`).
    pub fn server(&self) -> String {
        self.status.borrow().server.clone()
    }

    /// This service's component id in its node's tree (from `READY component=`; it changes when
    /// the client registers again after a reconnect), or 0 without a service.
    pub fn component(&self) -> u64 {
        self.status.borrow().component
    }

    /// What this service answers when monitored (see [`ClientConfig::handle_control`]): whether
    /// it is doing work, and a short message (at most 1 KiB is sent).
    pub fn set_status(&self, is_running: bool, message: impl Into<String>) {
        let mut r = self.report.lock().unwrap_or_else(|e| e.into_inner());
        r.is_running = is_running;
        r.message = message.into();
    }

    /// Current connection state.
    pub fn state(&self) -> State {
        self.status.borrow().state
    }

    /// Waits until the state is `want` or `timeout` passes; returns whether it was reached.
    pub async fn wait_state(&self, want: State, timeout: Duration) -> bool {
        let mut rx = self.status.clone();
        tokio::time::timeout(timeout, rx.wait_for(|s| s.state == want)).await.is_ok_and(|r| r.is_ok())
    }

    /// Typed node and app administration over this connection.
    pub fn admin(&self) -> Admin {
        Admin::new(self.clone())
    }

    /// Sends a message.
    ///
    /// Fails with [`ClientError::TooLarge`] when it does not fit in a frame (nothing is sent),
    /// [`ClientError::NotConnected`] while disconnected (unless holding is enabled, then
    /// [`ClientError::QueueFull`] once the hold is full) and [`ClientError::Closed`] after close.
    pub async fn send(&self, msg: Message) -> Result<(), ClientError> {
        self.check_size(&msg)?;
        self.submit(Command::Send(msg)).await
    }

    /// Sends `msg` as a request and waits, at most [`ClientConfig::request_timeout`], for the
    /// message that answers it (`reply_to` = its id; an id is assigned when it has none).
    ///
    /// Fails with [`ClientError::Refused`] when the node refuses it (see [`Refusal`]),
    /// [`ClientError::Timeout`], [`ClientError::Disconnected`] if the connection drops first, or
    /// any [`Client::send`] error. Cancel-safe: dropping the future forgets the request.
    pub async fn request(&self, msg: Message) -> Result<Message, ClientError> {
        self.request_with_timeout(msg, self.request_timeout).await
    }

    /// [`Client::request`] with its own timeout.
    ///
    /// Fails like [`Client::request`].
    pub async fn request_with_timeout(&self, mut msg: Message, timeout: Duration) -> Result<Message, ClientError> {
        if msg.envelope.id == 0 {
            msg.envelope.id = self.next_id();
        }
        self.check_size(&msg)?;
        let (tx, rx) = oneshot::channel();
        let answer = async {
            self.submit(Command::Request { msg, reply: tx }).await?;
            rx.await.map_err(|_| ClientError::Closed)?
        };
        let reply = tokio::time::timeout(timeout, answer).await.map_err(|_| ClientError::Timeout(timeout))??;
        match Refusal::from_reply(&reply) {
            Some(r) => Err(ClientError::Refused(r)),
            None => Ok(reply),
        }
    }

    /// Requests in flight on this client, after forgetting the ones whose callers gave up.
    ///
    /// Fails with [`ClientError::Closed`] once the client is closed.
    pub async fn pending_requests(&self) -> Result<usize, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Pending(tx)).await.map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)
    }

    /// Fails with [`ClientError::TooLarge`] when `msg` does not fit in a frame. Cheap for the
    /// usual message: only one whose upper bound reaches the limit is encoded to measure it.
    fn check_size(&self, msg: &Message) -> Result<(), ClientError> {
        if frame_bound(msg) <= self.max_frame {
            return Ok(());
        }
        let mut scratch = bytes::BytesMut::with_capacity(msg.approx_size());
        nodus_wire::binary::encode(msg, &mut scratch, self.max_frame).map_err(too_large)
    }

    /// Hands a command to the driver: waits for room while connected; while disconnected, queues
    /// it only within the hold.
    async fn submit(&self, cmd: Command) -> Result<(), ClientError> {
        match self.state() {
            State::Connected => self.commands.send(cmd).await.map_err(|_| ClientError::Closed),
            State::Closed => Err(ClientError::Closed),
            State::Reconnecting if self.hold == 0 => Err(ClientError::NotConnected),
            State::Reconnecting => {
                let queued = self.commands.max_capacity() - self.commands.capacity();
                if queued >= self.hold {
                    return Err(ClientError::QueueFull);
                }
                self.commands.try_send(cmd).map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => ClientError::QueueFull,
                    mpsc::error::TrySendError::Closed(_) => ClientError::Closed,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nodes_answers_are_refusals_and_a_services_are_not() {
        let node = |command: &str, params: &[(&str, &str)]| {
            let mut m = Message::new(command);
            m.from = nodus_wire::Address::new("n1", "node");
            for (k, v) in params {
                m.params.insert(k.to_string(), v.to_string());
            }
            m
        };
        let forbidden = node("ERROR", &[("code", "forbidden"), ("message", "needs admin")]);
        let r = Refusal::from_reply(&forbidden).unwrap();
        assert!(r.is_forbidden() && !r.is_unauthorized());
        assert_eq!((r.kind(), r.code(), r.server()), (RefusalKind::Error, Some("forbidden"), "n1"));
        assert_eq!(r.to_string(), "ERROR code=forbidden: needs admin");
        let r = Refusal::from_reply(&node("ERROR", &[("code", "unauthorized")])).unwrap();
        assert!(r.is_unauthorized());
        let r = Refusal::from_reply(&node("SERVICE_UNAVAILABLE", &[("reason", "unreachable")])).unwrap();
        assert_eq!((r.kind(), r.code()), (RefusalKind::ServiceUnavailable, Some("unreachable")));
        assert_eq!(Refusal::from_reply(&node("QUITTING", &[])).unwrap().kind(), RefusalKind::Quitting);
        assert_eq!(Refusal::from_reply(&node("INVALID", &[])).unwrap().kind(), RefusalKind::Invalid);
        let r = Refusal::from_reply(&node("UNKNOWN", &[("command", "FROB")])).unwrap();
        assert_eq!((r.kind(), r.command()), (RefusalKind::Unknown, Some("FROB")));
        let failed = node("TRANSMISSION_REPORT", &[("status", "failed")]);
        assert_eq!(Refusal::from_reply(&failed).unwrap().kind(), RefusalKind::Dropped);
        // A node's other answers, and anything from a service, are replies.
        assert!(Refusal::from_reply(&node("PONG", &[])).is_none());
        assert!(Refusal::from_reply(&node("TRANSMISSION_REPORT", &[("status", "cached")])).is_none());
        let mut from_service = forbidden.clone();
        from_service.from.service = "billing".into();
        assert!(Refusal::from_reply(&from_service).is_none());
    }

    #[test]
    fn the_frame_bound_is_never_below_the_encoded_size() {
        let mut big = Message::new("C".repeat(300)).to(&format!("{}:{}", "s".repeat(70000), "v".repeat(40)));
        big = big.with_payload(vec![7; 70000]);
        let e = &mut big.envelope;
        (e.id, e.pid, e.reply_to, e.hops) = (u64::MAX, 1 << 40, 3, u32::MAX);
        (e.creator, e.created_at, e.expires_at) = ("c".repeat(256), i64::MIN, i64::MAX);
        for i in 0..40 {
            big.params.insert(format!("p{i}"), "x".repeat(i * 997));
        }
        for m in [Message::new("PING"), Message::new("ECHO").to("a:b").with_payload(vec![1; 31]), big] {
            let mut out = bytes::BytesMut::new();
            nodus_wire::binary::encode(&m, &mut out, usize::MAX).unwrap();
            let body = out.len() - nodus_wire::binary::HEADER_LEN;
            assert!(body <= frame_bound(&m), "{body} > {}", frame_bound(&m));
            assert!(frame_bound(&m) - body <= 200 + 10 * m.params.len(), "a tight bound");
        }
    }
}
