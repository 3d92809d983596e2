//! Client SDK for apps served over Cocaine's service protocol: resolve, connect, invoke, stream.
//!
//! An [`AppClient`] knows one locator (`host:port`). [`AppClient::resolve`] asks it where a
//! service lives; [`AppClient::service`] gives a [`ServiceHandle`] that resolves and connects
//! lazily, keeps one connection per handle (every stream of the handle is multiplexed on it,
//! on client-chosen increasing channels) and, when that connection is lost or cannot be made,
//! resolves again (a restarted node or app may serve on a new port) and reconnects with jittered
//! exponential backoff within a retry budget.
//!
//! [`ServiceHandle::enqueue`] opens a streaming session ([`Stream`]: `send`, `close`, `recv`);
//! [`ServiceHandle::call`] is the request/reply convenience. `call` retries only failures that
//! prove the request did not run: the connection could not be made, the connection was lost
//! before the request was written, or the service refused it without taking it (queue full,
//! app stopped, node draining). A request that may have run is never sent again.
//!
//! ```no_run
//! # async fn demo() -> Result<(), nodus_engine::client::AppClientError> {
//! use nodus_engine::client::AppClient;
//! let client = AppClient::new("127.0.0.1:10053");
//! let echo = client.service("echo");
//! let reply = echo.call("echo", ["hello"]).await?;
//! assert_eq!(reply, ["hello"]);
//! # Ok(()) }
//! ```
//!
//! Bounds: replies buffered per stream ([`AppClientConfig::stream_buffer`], past it the stream
//! fails with [`AppClientError::Overflow`]), messages queued per connection
//! ([`AppClientConfig::outbound_messages`], senders wait), message size
//! ([`AppClientConfig::max_message_bytes`]), and a timeout on every network wait.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use rmpv::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::protocol::{Decoder, Frame, Role, DEFAULT_MAX_MESSAGE_BYTES};
use crate::service::{self, app_method, errors, locator_method, stream};

/// The error category the client uses when it abandons a stream (sent to the service as
/// `[[CANCEL_CATEGORY, CANCEL_CODE], text]` when a [`StreamSender`] is dropped before `close`).
pub const CANCEL_CATEGORY: i64 = 13;
/// The error code the client uses when it abandons a stream.
pub const CANCEL_CODE: i64 = 1;

/// Settings and bounds of an [`AppClient`] (named like the node client's
/// `nodus_client::ClientConfig`: `...Config` for settings, `...Error` for failures).
#[derive(Debug, Clone)]
pub struct AppClientConfig {
    /// Longest wait for a TCP connection (locator or service).
    pub connect_timeout: Duration,
    /// Longest wait for the locator's answer to `resolve`.
    pub resolve_timeout: Duration,
    /// Longest a [`ServiceHandle::call`] may take, retries included.
    pub call_timeout: Duration,
    /// How long a handle keeps retrying a connection or a refused request before it gives up
    /// with [`AppClientError::RetriesExhausted`].
    pub retry_budget: Duration,
    /// First retry delay; doubles per attempt up to `backoff_max`, each delay jittered to
    /// between half and all of it.
    pub backoff_min: Duration,
    /// Largest retry delay.
    pub backoff_max: Duration,
    /// Replies buffered per stream before it fails with [`AppClientError::Overflow`].
    pub stream_buffer: usize,
    /// Messages queued per connection for the writer; senders wait when it is full.
    pub outbound_messages: usize,
    /// Largest message sent or accepted.
    pub max_message_bytes: usize,
}

impl Default for AppClientConfig {
    fn default() -> Self {
        AppClientConfig {
            connect_timeout: Duration::from_secs(5),
            resolve_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(60),
            retry_budget: Duration::from_secs(10),
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_secs(1),
            stream_buffer: 1024,
            outbound_messages: 1024,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// The settings' former name.
#[deprecated(note = "renamed AppClientConfig, after nodus_client::ClientConfig")]
pub type ClientOptions = AppClientConfig;

/// The error's former name.
#[deprecated(note = "renamed AppClientError, so that it is not confused with nodus_client::ClientError")]
pub type ClientError = AppClientError;

/// What went wrong, in terms a caller can act on. [`AppClientError::is_retryable`] says whether the
/// request certainly did not run, so that sending it again is safe.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppClientError {
    /// No connection to the locator or the service, or the locator did not answer.
    #[error("cannot reach {addr}: {reason}; check that the node is running and the address is right")]
    Unreachable {
        /// `host:port` tried.
        addr: String,
        /// What happened.
        reason: String,
    },
    /// The locator does not know the service (`[10, 1]`).
    #[error("the locator does not know service {name:?}: {message}")]
    NotFound {
        /// The name asked for.
        name: String,
        /// The locator's text.
        message: String,
    },
    /// The app's queue is full (`[12, 1]`); the request was not taken and may be sent again.
    #[error("the app's queue is full, the request was not taken: {message}; retry later")]
    QueueFull {
        /// The service's text.
        message: String,
    },
    /// The service refused the request without running it: app stopped or removed, node
    /// shutting down, too many channels on the connection. It may be sent again.
    #[error("the service refused the request without running it ([{category}, {code}] {message}); retry later")]
    Unavailable {
        /// Error category.
        category: i64,
        /// Error code.
        code: i64,
        /// The service's text.
        message: String,
    },
    /// The service or the worker answered with an error (for a worker's own error, its
    /// category and code; `[12, 5]` when the worker crashed mid-request).
    #[error("the service answered error [{category}, {code}]: {message}")]
    Service {
        /// Error category.
        category: i64,
        /// Error code.
        code: i64,
        /// The service's text.
        message: String,
    },
    /// The connection was lost before the stream ended.
    #[error("connection to the service lost {}", if *request_sent {
        "after the request was sent; it may have run, so it is not sent again"
    } else {
        "before the request was sent; it may be sent again"
    })]
    Disconnected {
        /// Whether the request's first message may have reached the service.
        request_sent: bool,
    },
    /// More replies waited unread than [`AppClientConfig::stream_buffer`] allows.
    #[error("more than {limit} replies waited unread on this stream; read faster or raise stream_buffer")]
    Overflow {
        /// The bound in force.
        limit: usize,
    },
    /// A chunk larger than [`AppClientConfig::max_message_bytes`].
    #[error("chunk of {size} bytes exceeds the {limit}-byte message limit; send smaller chunks")]
    TooLarge {
        /// The chunk's size.
        size: usize,
        /// The bound in force.
        limit: usize,
    },
    /// The peer does not speak Cocaine's service protocol.
    #[error("protocol error from the service: {0}; check that the endpoint is a nodus or Cocaine service")]
    Protocol(String),
    /// This side of the stream is already closed.
    #[error("the stream is already closed for sending; open a new one")]
    Closed,
    /// An operation did not finish in time.
    #[error("timed out after {after:?} {what}; the service may be overloaded, retry later or raise the timeout")]
    Timeout {
        /// What was being waited for.
        what: &'static str,
        /// The timeout in force.
        after: Duration,
    },
    /// Retryable failures went on for longer than the retry budget.
    #[error("gave up after {attempts} attempts in {elapsed:?}; last error: {last}")]
    RetriesExhausted {
        /// Attempts made.
        attempts: u32,
        /// Time spent.
        elapsed: Duration,
        /// The last failure.
        last: Box<AppClientError>,
    },
}

impl AppClientError {
    /// Maps a service's `[category, code]` error to a variant: `[12, 1]` is
    /// [`AppClientError::QueueFull`]; refusals that leave the request unrun are
    /// [`AppClientError::Unavailable`]; anything else is [`AppClientError::Service`].
    pub fn from_service(category: i64, code: i64, message: String) -> AppClientError {
        match (category, code) {
            (errors::APP, errors::QUEUE_FULL) => AppClientError::QueueFull { message },
            (errors::APP, errors::APP_STOPPED | errors::UNKNOWN_APP)
            | (errors::DISPATCH, errors::TOO_MANY_CHANNELS | errors::SHUTTING_DOWN) => {
                AppClientError::Unavailable { category, code, message }
            }
            _ => AppClientError::Service { category, code, message },
        }
    }

    /// True when the request certainly did not run, so sending it again is safe.
    pub fn is_retryable(&self) -> bool {
        match self {
            AppClientError::Unreachable { .. }
            | AppClientError::QueueFull { .. }
            | AppClientError::Unavailable { .. } => true,
            AppClientError::Disconnected { request_sent } => !request_sent,
            _ => false,
        }
    }

    /// The underlying failure: the last error of [`AppClientError::RetriesExhausted`], else `self`.
    pub fn root(&self) -> &AppClientError {
        match self {
            AppClientError::RetriesExhausted { last, .. } => last.root(),
            other => other,
        }
    }
}

/// The locator's answer to `resolve`.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoints {
    /// Where the service listens, in the locator's order of preference.
    pub endpoints: Vec<(String, u16)>,
    /// The service's protocol version.
    pub version: u64,
    /// The service's dispatch graph (see [`crate::service`]).
    pub graph: Value,
}

pub use nodus_wire::Backoff;

/// One operation's retries: a budget of time and a backoff. Time is tokio's, the clock its
/// retries sleep on (so a runtime with paused time runs the whole budget at once).
struct Retry {
    started: tokio::time::Instant,
    budget: Duration,
    backoff: Backoff,
    attempts: u32,
}

impl Retry {
    fn new(options: &AppClientConfig) -> Retry {
        Retry {
            started: tokio::time::Instant::now(),
            budget: options.retry_budget,
            backoff: Backoff::new(options.backoff_min, options.backoff_max, rand::random()),
            attempts: 1,
        }
    }

    /// Waits before the next attempt after `error`, or gives up when the budget would be spent.
    async fn wait(&mut self, error: AppClientError) -> Result<(), AppClientError> {
        let delay = self.backoff.next_delay();
        let elapsed = self.started.elapsed();
        if elapsed + delay > self.budget {
            if self.attempts == 1 {
                return Err(error);
            }
            return Err(AppClientError::RetriesExhausted { attempts: self.attempts, elapsed, last: Box::new(error) });
        }
        tracing::debug!(error = %error, attempt = self.attempts, ?delay, "retrying");
        tokio::time::sleep(delay).await;
        self.attempts += 1;
        Ok(())
    }
}

struct ClientInner {
    locator: String,
    config: AppClientConfig,
}

/// A client of the services behind one locator. Cheap to clone.
#[derive(Clone)]
pub struct AppClient {
    inner: Arc<ClientInner>,
}

impl std::fmt::Debug for AppClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppClient").field("locator", &self.inner.locator).finish()
    }
}

impl AppClient {
    /// A client of the locator at `locator` (`host:port`), with the default settings.
    pub fn new(locator: impl Into<String>) -> AppClient {
        AppClient::with_config(locator, AppClientConfig::default())
    }

    /// A client of the locator at `locator` (`host:port`).
    pub fn with_config(locator: impl Into<String>, config: AppClientConfig) -> AppClient {
        AppClient { inner: Arc::new(ClientInner { locator: locator.into(), config }) }
    }

    /// The settings in force.
    pub fn config(&self) -> &AppClientConfig {
        &self.inner.config
    }

    /// Asks the locator where `name` is served (one attempt, no retries).
    ///
    /// # Errors
    /// [`AppClientError::Unreachable`] when the locator cannot be reached or does not answer in
    /// time, [`AppClientError::NotFound`] for an unknown name, [`AppClientError::Protocol`] for an
    /// answer that is not a `resolve` answer.
    pub async fn resolve(&self, name: &str) -> Result<Endpoints, AppClientError> {
        let options = &self.inner.config;
        let addr = self.inner.locator.as_str();
        let unreachable = |reason: String| AppClientError::Unreachable { addr: addr.to_string(), reason };
        let mut stream = connect(addr, options.connect_timeout).await?;
        stream
            .write_all(&open_frame(1, locator_method::RESOLVE, name))
            .await
            .map_err(|e| unreachable(format!("cannot send resolve: {e}")))?;
        let mut decoder = Decoder::new(Role::Engine, options.max_message_bytes);
        let mut buf = BytesMut::with_capacity(1024);
        let read = async {
            loop {
                match decoder.decode_frame(&mut buf) {
                    Ok(Some(f)) if f.channel == 1 => return Ok(f),
                    Ok(Some(_)) => continue,
                    Ok(None) => {}
                    Err(e) => return Err(AppClientError::Protocol(e.to_string())),
                }
                match stream.read_buf(&mut buf).await {
                    Ok(0) => return Err(unreachable("the locator closed the connection before answering".into())),
                    Ok(_) => {}
                    Err(e) => return Err(unreachable(format!("reading the answer failed: {e}"))),
                }
            }
        };
        let frame = tokio::time::timeout(options.resolve_timeout, read)
            .await
            .map_err(|_| unreachable(format!("no answer to resolve within {:?}", options.resolve_timeout)))??;
        resolve_answer(name, frame)
    }

    /// A handle on the service `name`. Nothing happens on the network until it is used.
    pub fn service(&self, name: impl Into<String>) -> ServiceHandle {
        ServiceHandle {
            inner: Arc::new(HandleInner {
                client: self.clone(),
                name: name.into(),
                conn: tokio::sync::Mutex::new(None),
                opened: AtomicU64::new(0),
            }),
        }
    }
}

fn resolve_answer(name: &str, frame: Frame) -> Result<Endpoints, AppClientError> {
    let bad = |what: &str| AppClientError::Protocol(format!("bad resolve answer: {what}"));
    match frame.kind {
        service::primitive::VALUE => {
            let mut args = frame.args.into_iter();
            let Some(Value::Array(list)) = args.next() else { return Err(bad("endpoints are not a list")) };
            let mut endpoints = Vec::with_capacity(list.len());
            for e in list {
                let host = e[0].as_str().map(str::to_string).ok_or_else(|| bad("an endpoint host is not a string"))?;
                let port = e[1].as_u64().and_then(|p| u16::try_from(p).ok()).ok_or_else(|| bad("bad endpoint port"))?;
                endpoints.push((host, port));
            }
            let version = args.next().and_then(|v| v.as_u64()).unwrap_or(0);
            let graph = args.next().unwrap_or(Value::Nil);
            Ok(Endpoints { endpoints, version, graph })
        }
        service::primitive::ERROR => match service_error(frame.args) {
            (errors::LOCATOR, errors::SERVICE_NOT_AVAILABLE, message) => {
                Err(AppClientError::NotFound { name: name.to_string(), message })
            }
            (category, code, message) => Err(AppClientError::from_service(category, code, message)),
        },
        k => Err(bad(&format!("message type {k}"))),
    }
}

fn service_error(args: Vec<Value>) -> (i64, i64, String) {
    let mut it = args.into_iter();
    let (category, code) = match it.next() {
        Some(Value::Array(pair)) => {
            (pair.first().and_then(Value::as_i64).unwrap_or(0), pair.get(1).and_then(Value::as_i64).unwrap_or(0))
        }
        Some(v) => (0, v.as_i64().unwrap_or(0)),
        None => (0, 0),
    };
    let message = match it.next() {
        Some(Value::String(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(Value::Binary(b)) => String::from_utf8_lossy(&b).into_owned(),
        Some(other) => other.to_string(),
        None => String::new(),
    };
    (category, code, message)
}

fn payload(v: Option<Value>) -> Bytes {
    match v {
        None => Bytes::new(),
        Some(Value::Binary(b)) => Bytes::from(b),
        Some(Value::String(s)) => Bytes::from(s.into_bytes()),
        Some(other) => {
            let mut out = Vec::new();
            // Writing into a Vec cannot fail.
            let _ = rmpv::encode::write_value(&mut out, &other);
            Bytes::from(out)
        }
    }
}

/// `[channel, method, [arg]]`: the first message of a new channel.
fn open_frame(channel: u64, method: u64, arg: &str) -> Bytes {
    let mut w = BytesMut::new().writer();
    // Writing into a BytesMut cannot fail; the results are io::Result only by signature.
    let _ = rmp::encode::write_array_len(&mut w, 3);
    let _ = rmp::encode::write_uint(&mut w, channel);
    let _ = rmp::encode::write_uint(&mut w, method);
    let _ = rmp::encode::write_array_len(&mut w, 1);
    let _ = rmp::encode::write_str(&mut w, arg);
    w.into_inner().freeze()
}

async fn connect(addr: &str, timeout: Duration) -> Result<TcpStream, AppClientError> {
    let unreachable = |reason: String| AppClientError::Unreachable { addr: addr.to_string(), reason };
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| unreachable(format!("no connection within {timeout:?}")))?
        .map_err(|e| unreachable(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

struct HandleInner {
    client: AppClient,
    name: String,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    opened: AtomicU64,
}

/// A service by name: resolves and connects on first use, keeps the connection, and
/// re-resolves and reconnects after it is lost. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct ServiceHandle {
    inner: Arc<HandleInner>,
}

impl std::fmt::Debug for ServiceHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceHandle").field("name", &self.inner.name).finish()
    }
}

impl ServiceHandle {
    /// The service's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// How many connections this handle has opened so far (1 while the first one lasts).
    pub fn connections_opened(&self) -> u64 {
        self.inner.opened.load(Ordering::Relaxed)
    }

    /// Opens a streaming session with `event` (the app's handler name). Resolving and
    /// connecting are retried within the retry budget; the stream's own errors arrive on
    /// [`Stream::recv`].
    ///
    /// # Errors
    /// [`AppClientError::NotFound`] for an unknown service; [`AppClientError::RetriesExhausted`] (or
    /// the single error, when the budget allows no retry) when no connection could be made.
    pub async fn enqueue(&self, event: &str) -> Result<Stream, AppClientError> {
        let mut retry = Retry::new(self.config());
        self.open(event, &mut retry).await
    }

    /// Sends `chunks` to `event`, closes, and collects every reply chunk until the service
    /// closes. Retried (with backoff, within the retry budget) only when no reply arrived and
    /// the failure proves the request did not run ([`AppClientError::is_retryable`]).
    ///
    /// # Errors
    /// The stream's error ([`AppClientError::Service`] for a worker's error), a non-retryable
    /// failure, [`AppClientError::RetriesExhausted`], or [`AppClientError::Timeout`] after
    /// [`AppClientConfig::call_timeout`].
    pub async fn call<I>(&self, event: &str, chunks: I) -> Result<Vec<Bytes>, AppClientError>
    where
        I: IntoIterator,
        I::Item: Into<Bytes>,
    {
        let chunks: Vec<Bytes> = chunks.into_iter().map(Into::into).collect();
        let after = self.config().call_timeout;
        tokio::time::timeout(after, self.call_with_retries(event, &chunks))
            .await
            .map_err(|_| AppClientError::Timeout { what: "waiting for the call to finish", after })?
    }

    async fn call_with_retries(&self, event: &str, chunks: &[Bytes]) -> Result<Vec<Bytes>, AppClientError> {
        let mut retry = Retry::new(self.config());
        loop {
            let stream = self.open(event, &mut retry).await?;
            let conn = stream.tx.conn.clone();
            let (mut tx, mut rx) = stream.split();
            let send = async {
                for c in chunks {
                    tx.send(c.clone()).await?;
                }
                tx.close().await
            };
            let receive = async {
                let mut replies = Vec::new();
                while let Some(chunk) = rx.recv().await? {
                    replies.push(chunk);
                }
                Ok::<_, AppClientError>(replies)
            };
            let (sent, received) = tokio::join!(send, receive);
            let error = match (sent, received) {
                (_, Ok(replies)) => return Ok(replies),
                (_, Err(e)) => e,
            };
            if rx.replied() || !error.is_retryable() {
                return Err(error);
            }
            if !matches!(error, AppClientError::QueueFull { .. }) {
                // The app may have moved: resolve again before the next attempt.
                self.forget(&conn).await;
            }
            retry.wait(error).await?;
        }
    }

    fn config(&self) -> &AppClientConfig {
        &self.inner.client.inner.config
    }

    async fn open(&self, event: &str, retry: &mut Retry) -> Result<Stream, AppClientError> {
        loop {
            let conn = self.connection(retry).await?;
            match conn.open(event).await {
                Ok(stream) => return Ok(stream),
                Err(e) if e.is_retryable() => {
                    self.forget(&conn).await;
                    retry.wait(e).await?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The live connection, made (resolving first) when there is none.
    async fn connection(&self, retry: &mut Retry) -> Result<Arc<Conn>, AppClientError> {
        let mut cached = self.inner.conn.lock().await;
        loop {
            if let Some(c) = cached.as_ref() {
                if !c.shared.dead.is_cancelled() {
                    return Ok(c.clone());
                }
                tracing::info!(service = %self.inner.name, peer = %c.peer, "service connection lost; resolving again");
                *cached = None;
            }
            match self.connect_once().await {
                Ok(c) => {
                    self.inner.opened.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(service = %self.inner.name, peer = %c.peer, "connected to service");
                    *cached = Some(c.clone());
                    return Ok(c);
                }
                Err(e) if e.is_retryable() => retry.wait(e).await?,
                Err(e) => return Err(e),
            }
        }
    }

    async fn connect_once(&self) -> Result<Arc<Conn>, AppClientError> {
        let endpoints = self.inner.client.resolve(&self.inner.name).await?;
        let mut last = AppClientError::Protocol(format!("the locator gave no endpoint for {:?}", self.inner.name));
        for (host, port) in endpoints.endpoints {
            let addr = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
            match Conn::connect(addr, self.config()).await {
                Ok(c) => return Ok(c),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Drops the cached connection if it is still `conn`, so the next use resolves again.
    async fn forget(&self, conn: &Arc<Conn>) {
        let mut cached = self.inner.conn.lock().await;
        if cached.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            *cached = None;
        }
    }
}

/// Whether a stream's first message reached the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    /// Queued for the writer.
    Pending,
    /// Handed to the socket (it may have reached the service).
    Written,
    /// The connection died first; it will never be written.
    Abandoned,
}

struct StreamState {
    sent: Mutex<Sent>,
    end: OnceLock<AppClientError>,
}

impl StreamState {
    /// Marks the open frame written unless the connection abandoned it; false means skip it.
    fn mark_written(&self) -> bool {
        let mut s = self.sent.lock().expect("sent lock");
        if *s == Sent::Abandoned {
            return false;
        }
        *s = Sent::Written;
        true
    }

    /// After the connection died: whether the request may have reached the service.
    fn abandon(&self) -> bool {
        let mut s = self.sent.lock().expect("sent lock");
        if *s == Sent::Pending {
            *s = Sent::Abandoned;
        }
        *s == Sent::Written
    }
}

/// What the reader delivers to a stream.
enum Down {
    Chunk(Bytes),
    Close,
    Error(AppClientError),
}

struct Slot {
    tx: mpsc::Sender<Down>,
    state: Arc<StreamState>,
}

struct ConnShared {
    /// Open streams by channel; `None` once the connection is dead.
    slots: Mutex<Option<HashMap<u64, Slot>>>,
    /// Cancelled when the connection is dead (read or write failed, peer closed, or no one
    /// uses it any more).
    dead: CancellationToken,
    stream_buffer: usize,
}

/// An item for the writer; `opens` is set on a channel's first message.
struct Out {
    bytes: Bytes,
    opens: Option<Arc<StreamState>>,
}

/// One TCP connection to a service, multiplexing streams on increasing channels.
struct Conn {
    peer: String,
    out: mpsc::Sender<Out>,
    /// The next channel; locked from choosing a channel to queueing its first message, so
    /// channels reach the wire in increasing order.
    next: tokio::sync::Mutex<u64>,
    shared: Arc<ConnShared>,
    max_message_bytes: usize,
}

impl Conn {
    async fn connect(peer: String, options: &AppClientConfig) -> Result<Arc<Conn>, AppClientError> {
        let stream = connect(&peer, options.connect_timeout).await?;
        let unreachable = |e: std::io::Error| AppClientError::Unreachable { addr: peer.clone(), reason: e.to_string() };
        // A duplicate of the socket lets the writer check, without reading, whether the peer has
        // already closed before it writes a new request (so that request is known unsent).
        let std = stream.into_std().map_err(unreachable)?;
        let probe = std.try_clone().map_err(unreachable)?;
        let stream = TcpStream::from_std(std).map_err(unreachable)?;
        let (read, write) = stream.into_split();
        let shared = Arc::new(ConnShared {
            slots: Mutex::new(Some(HashMap::new())),
            dead: CancellationToken::new(),
            stream_buffer: options.stream_buffer.max(1),
        });
        let (out, out_rx) = mpsc::channel(options.outbound_messages.max(1));
        let decoder = Decoder::new(Role::Engine, options.max_message_bytes);
        tokio::spawn(read_loop(read, shared.clone(), decoder, peer.clone()));
        tokio::spawn(write_loop(write, probe, out_rx, shared.clone()));
        Ok(Arc::new(Conn {
            peer,
            out,
            next: tokio::sync::Mutex::new(1),
            shared,
            max_message_bytes: options.max_message_bytes,
        }))
    }

    async fn open(self: &Arc<Self>, event: &str) -> Result<Stream, AppClientError> {
        let lost = AppClientError::Disconnected { request_sent: false };
        let mut next = self.next.lock().await;
        let channel = *next;
        let state = Arc::new(StreamState { sent: Mutex::new(Sent::Pending), end: OnceLock::new() });
        let (tx, rx) = mpsc::channel(self.shared.stream_buffer);
        {
            let mut slots = self.shared.slots.lock().expect("slots lock");
            let Some(map) = slots.as_mut() else { return Err(lost) };
            map.insert(channel, Slot { tx, state: state.clone() });
        }
        let frame = open_frame(channel, app_method::ENQUEUE, event);
        if self.out.send(Out { bytes: frame, opens: Some(state.clone()) }).await.is_err() {
            if let Some(map) = self.shared.slots.lock().expect("slots lock").as_mut() {
                map.remove(&channel);
            }
            return Err(lost);
        }
        *next += 1;
        drop(next);
        let sender = StreamSender { conn: self.clone(), channel, state: state.clone(), closed: false };
        let receiver = StreamReceiver { conn: self.clone(), channel, state, rx, end: None, replied: false };
        Ok(Stream { tx: sender, rx: receiver })
    }
}

async fn read_loop(mut rd: OwnedReadHalf, shared: Arc<ConnShared>, mut decoder: Decoder, peer: String) {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let failure = 'conn: loop {
        loop {
            match decoder.decode_frame(&mut buf) {
                Ok(Some(frame)) => deliver(&shared, frame),
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "bad message from the service; closing the connection");
                    break 'conn Some(AppClientError::Protocol(e.to_string()));
                }
            }
        }
        tokio::select! {
            read = rd.read_buf(&mut buf) => match read {
                Ok(0) => break None,
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "service connection failed");
                    break None;
                }
            },
            _ = shared.dead.cancelled() => break None,
        }
    };
    shared.dead.cancel();
    let slots = shared.slots.lock().expect("slots lock").take().unwrap_or_default();
    for (_, slot) in slots {
        let request_sent = slot.state.abandon();
        let _ = slot.state.end.set(failure.clone().unwrap_or(AppClientError::Disconnected { request_sent }));
    }
}

/// Hands one frame to its stream. A stream whose buffer is full fails with an overflow.
fn deliver(shared: &ConnShared, frame: Frame) {
    let mut slots = shared.slots.lock().expect("slots lock");
    let Some(map) = slots.as_mut() else { return };
    let Frame { channel, kind, args, .. } = frame;
    let Some(slot) = map.get(&channel) else { return };
    let (down, last) = match kind {
        stream::WRITE => (Down::Chunk(payload(args.into_iter().next())), false),
        stream::ERROR => {
            let (category, code, message) = service_error(args);
            (Down::Error(AppClientError::from_service(category, code, message)), true)
        }
        stream::CLOSE => (Down::Close, true),
        other => (Down::Error(AppClientError::Protocol(format!("message type {other} in a stream"))), true),
    };
    match slot.tx.try_send(down) {
        Ok(()) if !last => {}
        Ok(()) => {
            map.remove(&channel);
        }
        Err(mpsc::error::TrySendError::Full(_)) => {
            let _ = slot.state.end.set(AppClientError::Overflow { limit: shared.stream_buffer });
            map.remove(&channel);
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            map.remove(&channel);
        }
    }
}

/// True when the peer has closed or reset the connection (checked without consuming data).
fn peer_closed(probe: &std::net::TcpStream) -> bool {
    match probe.peek(&mut [0u8; 1]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

async fn write_loop(
    mut w: OwnedWriteHalf,
    probe: std::net::TcpStream,
    mut rx: mpsc::Receiver<Out>,
    shared: Arc<ConnShared>,
) {
    let mut batch = Vec::with_capacity(64);
    'conn: loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, 64) => n,
            _ = shared.dead.cancelled() => break,
        };
        if n == 0 {
            // Nobody uses the connection any more.
            let _ = w.shutdown().await;
            break;
        }
        for out in batch.drain(..) {
            if let Some(state) = &out.opens {
                if peer_closed(&probe) {
                    tracing::debug!("service closed the connection; the queued request was not sent");
                    break 'conn;
                }
                if !state.mark_written() {
                    continue;
                }
            }
            let written = tokio::select! {
                r = w.write_all(&out.bytes) => r.is_ok(),
                _ = shared.dead.cancelled() => false,
            };
            if !written {
                break 'conn;
            }
        }
    }
    shared.dead.cancel();
}

/// A streaming session on one channel: send chunks, close, receive chunks until the service
/// closes. [`Stream::split`] gives the two halves to use from separate tasks.
#[derive(Debug)]
pub struct Stream {
    tx: StreamSender,
    rx: StreamReceiver,
}

impl Stream {
    /// The channel of this session on its connection.
    pub fn channel(&self) -> u64 {
        self.tx.channel
    }

    /// Sends one chunk.
    ///
    /// # Errors
    /// See [`StreamSender::send`].
    pub async fn send(&mut self, chunk: impl Into<Bytes>) -> Result<(), AppClientError> {
        self.tx.send(chunk).await
    }

    /// Closes the sending side.
    ///
    /// # Errors
    /// See [`StreamSender::close`].
    pub async fn close(&mut self) -> Result<(), AppClientError> {
        self.tx.close().await
    }

    /// The next reply chunk, or `None` once the service closed the stream.
    ///
    /// # Errors
    /// See [`StreamReceiver::recv`].
    pub async fn recv(&mut self) -> Result<Option<Bytes>, AppClientError> {
        self.rx.recv().await
    }

    /// The sending and the receiving halves.
    pub fn split(self) -> (StreamSender, StreamReceiver) {
        (self.tx, self.rx)
    }
}

/// The sending half of a [`Stream`]. Dropping it before [`StreamSender::close`] cancels the
/// request: the service gets an error `[CANCEL_CATEGORY, CANCEL_CODE]`.
pub struct StreamSender {
    conn: Arc<Conn>,
    channel: u64,
    state: Arc<StreamState>,
    closed: bool,
}

impl std::fmt::Debug for StreamSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSender").field("channel", &self.channel).field("closed", &self.closed).finish()
    }
}

impl StreamSender {
    /// Sends one chunk; waits while the connection's outbound queue is full.
    ///
    /// # Errors
    /// [`AppClientError::Closed`] after `close`, [`AppClientError::TooLarge`] for a chunk over the
    /// message limit, [`AppClientError::Disconnected`] when the connection is gone.
    pub async fn send(&mut self, chunk: impl Into<Bytes>) -> Result<(), AppClientError> {
        let chunk = chunk.into();
        if self.closed {
            return Err(AppClientError::Closed);
        }
        // The frame adds at most 15 bytes of header to the chunk.
        if chunk.len() + 16 > self.conn.max_message_bytes {
            return Err(AppClientError::TooLarge { size: chunk.len(), limit: self.conn.max_message_bytes });
        }
        self.push(service::encode_write(self.channel, &chunk)).await
    }

    /// Closes the sending side: the service sees the end of the request's input.
    ///
    /// # Errors
    /// [`AppClientError::Closed`] when already closed, [`AppClientError::Disconnected`] when the
    /// connection is gone.
    pub async fn close(&mut self) -> Result<(), AppClientError> {
        if self.closed {
            return Err(AppClientError::Closed);
        }
        self.closed = true;
        self.push(service::encode_close(self.channel)).await
    }

    async fn push(&self, bytes: Bytes) -> Result<(), AppClientError> {
        let lost = || AppClientError::Disconnected {
            request_sent: *self.state.sent.lock().expect("sent lock") != Sent::Abandoned,
        };
        if self.conn.shared.dead.is_cancelled() {
            return Err(lost());
        }
        self.conn.out.send(Out { bytes, opens: None }).await.map_err(|_| lost())
    }
}

impl Drop for StreamSender {
    fn drop(&mut self) {
        if !self.closed && !self.conn.shared.dead.is_cancelled() {
            let text = "the client abandoned the request";
            let bytes = service::encode_error(self.channel, CANCEL_CATEGORY, CANCEL_CODE, text);
            let _ = self.conn.out.try_send(Out { bytes, opens: None });
        }
    }
}

/// The receiving half of a [`Stream`].
pub struct StreamReceiver {
    conn: Arc<Conn>,
    channel: u64,
    state: Arc<StreamState>,
    rx: mpsc::Receiver<Down>,
    end: Option<Result<(), AppClientError>>,
    replied: bool,
}

impl std::fmt::Debug for StreamReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReceiver").field("channel", &self.channel).field("end", &self.end).finish()
    }
}

impl StreamReceiver {
    /// The next reply chunk, or `None` once the service closed the stream (and every call
    /// after that).
    ///
    /// # Errors
    /// The stream's end when it is not a close: the service's error (see
    /// [`AppClientError::from_service`]), [`AppClientError::Disconnected`],
    /// [`AppClientError::Overflow`], [`AppClientError::Protocol`]. Later calls return it again.
    pub async fn recv(&mut self) -> Result<Option<Bytes>, AppClientError> {
        if let Some(end) = &self.end {
            return end.clone().map(|()| None);
        }
        let end = match self.rx.recv().await {
            Some(Down::Chunk(b)) => {
                self.replied = true;
                return Ok(Some(b));
            }
            Some(Down::Close) => Ok(()),
            Some(Down::Error(e)) => Err(e),
            None => Err(self.state.end.get().cloned().unwrap_or(AppClientError::Disconnected { request_sent: true })),
        };
        self.end = Some(end.clone());
        end.map(|()| None)
    }

    /// Whether any reply chunk has arrived.
    pub fn replied(&self) -> bool {
        self.replied
    }
}

impl Drop for StreamReceiver {
    fn drop(&mut self) {
        if self.end.is_none() {
            if let Some(map) = self.conn.shared.slots.lock().expect("slots lock").as_mut() {
                map.remove(&self.channel);
            }
        }
    }
}
