//! Async Rust client for a nodus node.
//!
//! [`Client::connect`] opens a connection (Unix socket or TCP) speaking the binary form, optionally
//! registers a service, and keeps the connection alive: when the node restarts, the client
//! reconnects with jittered exponential backoff and registers again. Messages that are not replies
//! to [`Client::request`] arrive on the [`Incoming`] stream.
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

mod connection;

use nodus_wire::Message;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

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

    /// `unix:PATH`, or a path starting with `/` or `.`, is a Unix socket; anything else is TCP.
    fn from_str(s: &str) -> Result<Self, ClientError> {
        if let Some(p) = s.strip_prefix("unix:") {
            Ok(Endpoint::Unix(p.into()))
        } else if s.starts_with('/') || s.starts_with('.') {
            Ok(Endpoint::Unix(s.into()))
        } else if s.contains(':') {
            Ok(Endpoint::Tcp(s.trim_start_matches("tcp:").to_string()))
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

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The node to talk to.
    pub endpoint: String,
    /// Service name to register (none: an anonymous client that only sends and requests).
    pub service: Option<String>,
    /// Commands this service understands, declared with `COMMANDS` (empty: accept all).
    pub commands: Vec<String>,
    /// Reconnect when the connection drops.
    pub reconnect: bool,
    /// First reconnect delay; doubles up to `backoff_max`, with jitter.
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Messages held while disconnected and sent after reconnecting (0: sending fails instead).
    pub hold: usize,
    /// Bound of the outgoing queue and of the incoming stream, in messages.
    pub queue: usize,
    /// Largest frame sent or accepted.
    pub max_frame: usize,
}

impl ClientConfig {
    /// Defaults for `endpoint`: anonymous, reconnecting, 50 ms..5 s backoff, nothing held.
    pub fn new(endpoint: impl Into<String>) -> Self {
        ClientConfig {
            endpoint: endpoint.into(),
            service: None,
            commands: Vec::new(),
            reconnect: true,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            hold: 0,
            queue: 4096,
            max_frame: nodus_wire::DEFAULT_MAX_FRAME,
        }
    }

    /// Register as `name` once connected (and again after every reconnect).
    pub fn service(mut self, name: impl Into<String>) -> Self {
        self.service = Some(name.into());
        self
    }

    /// Declare the commands this service understands.
    pub fn commands<I: IntoIterator<Item = S>, S: Into<String>>(mut self, commands: I) -> Self {
        self.commands = commands.into_iter().map(Into::into).collect();
        self
    }

    /// Hold up to `n` messages while disconnected.
    pub fn hold(mut self, n: usize) -> Self {
        self.hold = n;
        self
    }

    /// Do not reconnect: the client fails once the connection drops.
    pub fn no_reconnect(mut self) -> Self {
        self.reconnect = false;
        self
    }
}

/// Client failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The endpoint string is not `unix:PATH`, a path, or `host:port`.
    #[error("bad node address {0:?}: use host:port, unix:/path or /path")]
    BadEndpoint(String),
    /// Connecting failed.
    #[error("cannot connect to the node at {endpoint}: {reason} (is `nodus daemon` running?)")]
    Connect {
        /// Where.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The node refused the registration.
    #[error("the node refused to register the service: {0}")]
    Register(String),
    /// Not connected and not holding messages.
    #[error("not connected to the node")]
    NotConnected,
    /// The hold or send queue is full.
    #[error("the outgoing queue is full")]
    QueueFull,
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

type PendingMap = Arc<Mutex<HashMap<u64, oneshot::Sender<Message>>>>;

/// A handle to the node; cheap to clone.
#[derive(Clone)]
pub struct Client {
    out: mpsc::Sender<Message>,
    pending: PendingMap,
    next_id: Arc<AtomicU64>,
    connected: Arc<AtomicBool>,
    state: watch::Receiver<State>,
    hold: usize,
    server: Arc<Mutex<String>>,
}

/// Messages for this client that are not replies to its requests.
pub struct Incoming(mpsc::Receiver<Message>);

impl Incoming {
    /// The next message; `None` once the client is closed for good.
    pub async fn recv(&mut self) -> Option<Message> {
        self.0.recv().await
    }

    /// The next message if one is already waiting.
    pub fn try_recv(&mut self) -> Option<Message> {
        self.0.try_recv().ok()
    }
}

impl Client {
    /// Connects (and registers, when a service is configured).
    ///
    /// Fails when the first connection cannot be made or the node refuses the registration; later
    /// drops are handled by reconnecting.
    pub async fn connect(config: ClientConfig) -> Result<(Client, Incoming), ClientError> {
        let endpoint: Endpoint = config.endpoint.parse()?;
        let (out_tx, out_rx) = mpsc::channel(config.queue.max(config.hold).max(1));
        let (in_tx, in_rx) = mpsc::channel(config.queue.max(1));
        let (state_tx, state_rx) = watch::channel(State::Reconnecting);
        let pending: PendingMap = Arc::default();
        let connected = Arc::new(AtomicBool::new(false));
        let server = Arc::new(Mutex::new(String::new()));
        let first = connection::establish(&endpoint, &config).await?;
        *server.lock().unwrap_or_else(|e| e.into_inner()) = first.server.clone();
        connected.store(true, Ordering::SeqCst);
        let _ = state_tx.send(State::Connected);
        let driver = connection::Driver {
            endpoint,
            config: config.clone(),
            out_rx,
            in_tx,
            pending: pending.clone(),
            connected: connected.clone(),
            state: state_tx,
            server: server.clone(),
        };
        tokio::spawn(driver.run(first));
        let seed = rand::random::<u64>() >> 16;
        Ok((
            Client {
                out: out_tx,
                pending,
                next_id: Arc::new(AtomicU64::new(seed.max(1))),
                connected,
                state: state_rx,
                hold: config.hold,
                server,
            },
            Incoming(in_rx),
        ))
    }

    /// A fresh message id, unique for this client.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The server name of the node, as it said in `READY`.
    pub fn server(&self) -> String {
        self.server.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Current connection state.
    pub fn state(&self) -> State {
        *self.state.borrow()
    }

    /// Waits until the state is `want` or `timeout` passes; returns whether it was reached.
    pub async fn wait_state(&self, want: State, timeout: Duration) -> bool {
        let mut rx = self.state.clone();
        tokio::time::timeout(timeout, rx.wait_for(|s| *s == want)).await.is_ok_and(|r| r.is_ok())
    }

    /// Sends a message.
    ///
    /// Fails with [`ClientError::NotConnected`] while disconnected (unless holding is enabled,
    /// then [`ClientError::QueueFull`] once the hold is full) and [`ClientError::Closed`] after close.
    pub async fn send(&self, msg: Message) -> Result<(), ClientError> {
        if !self.connected.load(Ordering::Relaxed) {
            if self.hold == 0 {
                return Err(ClientError::NotConnected);
            }
            let queued = self.out.max_capacity() - self.out.capacity();
            if queued >= self.hold {
                return Err(ClientError::QueueFull);
            }
            return self.out.try_send(msg).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => ClientError::QueueFull,
                mpsc::error::TrySendError::Closed(_) => ClientError::Closed,
            });
        }
        self.out.send(msg).await.map_err(|_| ClientError::Closed)
    }

    /// Sends `msg` as a request and waits for the message that answers it (`reply_to` = its id).
    ///
    /// Fails with [`ClientError::Timeout`], [`ClientError::Disconnected`] if the connection drops
    /// first, or any [`Client::send`] error.
    pub async fn request(&self, mut msg: Message, timeout: Duration) -> Result<Message, ClientError> {
        if msg.envelope.id == 0 {
            msg.envelope.id = self.next_id();
        }
        let id = msg.envelope.id;
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(id, tx);
        let result = async {
            self.send(msg).await?;
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(reply)) => Ok(reply),
                Ok(Err(_)) => Err(ClientError::Disconnected),
                Err(_) => Err(ClientError::Timeout(timeout)),
            }
        }
        .await;
        if result.is_err() {
            self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        }
        result
    }
}
