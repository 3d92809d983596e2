//! The worker side of the protocol: write a nodus (or Cocaine) worker in Rust in ten lines.
//!
//! ```no_run
//! use nodus_engine::worker_sdk::{Request, Response, Worker, HandlerResult};
//!
//! async fn echo(mut req: Request, mut resp: Response) -> HandlerResult {
//!     while let Some(chunk) = req.recv().await? {
//!         resp.write(chunk).await?;
//!     }
//!     Ok(()) // returning closes the reply (choke); an `Err` sends an error instead
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     Worker::from_env()?.on("echo", echo).run().await?;
//!     Ok(())
//! }
//! ```
//!
//! The worker connects to `--endpoint`, sends the handshake with `--uuid`, heartbeats every
//! [`Worker::heartbeat_interval`], runs one task per invocation, and on the engine's terminate
//! lets open invocations finish, answers terminate and returns from [`Worker::run`].
//!
//! Control plane: the node monitors a worker by invoking [`MONITORING_EVENT`]; the SDK answers
//! it by default (name = the app, host = the machine, `is_running` = an invocation is open,
//! `message` = what [`Worker::status`] last set). A handler registered for that event with
//! [`Worker::on`] replaces the default. The node kills a worker with the protocol's terminate,
//! which the SDK obeys as above.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::engine::{category, MONITORING_EVENT};
use crate::protocol::{terminate_code, Decoder, Message, Role, DEFAULT_MAX_MESSAGE_BYTES};

/// What a handler returns; an error is sent to the caller as `[[2, 1], text]`.
pub type HandlerResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

type Handler = Arc<dyn Fn(Request, Response) -> Pin<Box<dyn Future<Output = HandlerResult> + Send>> + Send + Sync>;

/// Messages buffered per invocation in each direction.
const SESSION_BUFFER: usize = 1024;

/// Why the worker could not run, or a reply could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    /// A required command-line argument is missing.
    #[error("missing --{0}; a worker is started by the nodus engine with --app, --locator, --endpoint and --uuid")]
    MissingArg(&'static str),
    /// The engine's socket could not be reached or failed.
    #[error("engine connection: {0}")]
    Io(#[from] std::io::Error),
    /// The engine sent bytes that are not the protocol.
    #[error("engine sent a bad message: {0}")]
    Protocol(#[from] crate::protocol::ProtocolError),
    /// The engine closed the connection without a terminate.
    #[error("engine closed the connection")]
    EngineClosed,
    /// The reply was already closed.
    #[error("reply already closed")]
    Closed,
}

/// The caller ended its side of an invocation with an error, or the engine went away.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The caller (or the engine on its behalf) sent an error.
    #[error("caller error [{category}, {code}]: {message}")]
    Caller {
        /// Error category.
        category: i64,
        /// Error code.
        code: i64,
        /// Text.
        message: String,
    },
    /// The engine connection is gone.
    #[error("engine connection closed")]
    Disconnected,
}

/// The engine's command line for a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerArgs {
    /// `--app`.
    pub app: String,
    /// `--locator HOST:PORT`.
    pub locator: String,
    /// `--endpoint`: the engine's Unix socket.
    pub endpoint: PathBuf,
    /// `--uuid`.
    pub uuid: String,
    /// `--protocol` (1 when absent).
    pub protocol: u32,
}

impl WorkerArgs {
    /// Parses `--name value` and `--name=value` pairs; other arguments (the manifest's own) are
    /// ignored.
    ///
    /// # Errors
    /// A missing `--endpoint` or `--uuid`.
    pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<WorkerArgs, SdkError> {
        let mut map: HashMap<String, String> = HashMap::new();
        let mut it = args.into_iter().peekable();
        while let Some(a) = it.next() {
            let Some(name) = a.strip_prefix("--") else { continue };
            if let Some((k, v)) = name.split_once('=') {
                map.insert(k.to_string(), v.to_string());
            } else if let Some(v) = it.next_if(|v| !v.starts_with("--")) {
                map.insert(name.to_string(), v);
            }
        }
        Ok(WorkerArgs {
            app: map.remove("app").unwrap_or_default(),
            locator: map.remove("locator").unwrap_or_default(),
            endpoint: map.remove("endpoint").map(PathBuf::from).ok_or(SdkError::MissingArg("endpoint"))?,
            uuid: map.remove("uuid").ok_or(SdkError::MissingArg("uuid"))?,
            protocol: map.remove("protocol").and_then(|p| p.parse().ok()).unwrap_or(1),
        })
    }

    /// The locator addresses: `--locator` may be a comma-separated list (Cocaine passes one
    /// entry per locator endpoint); empty entries are skipped.
    pub fn locators(&self) -> Vec<&str> {
        self.locator.split(',').map(str::trim).filter(|l| !l.is_empty()).collect()
    }

    /// Parses this process's arguments.
    ///
    /// # Errors
    /// As [`WorkerArgs::parse`].
    pub fn from_env() -> Result<WorkerArgs, SdkError> {
        WorkerArgs::parse(std::env::args().skip(1))
    }
}

enum Incoming {
    Chunk(Bytes),
    Error(RequestError),
}

/// The caller's side of one invocation, as the handler reads it.
pub struct Request {
    event: String,
    rx: mpsc::Receiver<Incoming>,
    done: bool,
}

impl Request {
    /// The event name this invocation was sent to.
    pub fn event(&self) -> &str {
        &self.event
    }

    /// The next chunk from the caller; `Ok(None)` once the caller closed its side.
    ///
    /// # Errors
    /// The caller's error, or the engine connection closing.
    pub async fn recv(&mut self) -> Result<Option<Bytes>, RequestError> {
        if self.done {
            return Ok(None);
        }
        match self.rx.recv().await {
            Some(Incoming::Chunk(b)) => Ok(Some(b)),
            Some(Incoming::Error(e)) => {
                self.done = true;
                Err(e)
            }
            None => {
                self.done = true;
                Ok(None)
            }
        }
    }
}

/// The reply side of one invocation.
pub struct Response {
    channel: u64,
    out: mpsc::Sender<Message>,
    closed: Arc<AtomicBool>,
}

impl Response {
    /// Sends one chunk.
    ///
    /// # Errors
    /// [`SdkError::Closed`] after close or error; [`SdkError::EngineClosed`] when the engine is
    /// gone.
    pub async fn write(&mut self, data: impl Into<Bytes>) -> Result<(), SdkError> {
        self.send(Message::Chunk { channel: self.channel, data: data.into() }).await
    }

    /// Closes the reply (choke). Returning from the handler does the same.
    ///
    /// # Errors
    /// As [`Response::write`].
    pub async fn close(self) -> Result<(), SdkError> {
        self.send(Message::Choke { channel: self.channel }).await?;
        self.closed.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Ends the reply with an application error `[[2, code], message]`.
    ///
    /// # Errors
    /// As [`Response::write`].
    pub async fn error(self, code: i64, message: impl Into<String>) -> Result<(), SdkError> {
        let msg =
            Message::Error { channel: self.channel, category: category::APPLICATION, code, message: message.into() };
        self.send(msg).await?;
        self.closed.store(true, Ordering::Relaxed);
        Ok(())
    }

    async fn send(&self, msg: Message) -> Result<(), SdkError> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(SdkError::Closed);
        }
        self.out.send(msg).await.map_err(|_| SdkError::EngineClosed)
    }
}

/// A worker: handlers by event name, run against the engine given on the command line.
pub struct Worker {
    args: WorkerArgs,
    handlers: HashMap<String, Handler>,
    heartbeat: Duration,
    status: Arc<std::sync::Mutex<String>>,
}

/// Sets the `message` a worker's default monitoring answer carries; cheap to clone.
#[derive(Clone, Default)]
pub struct StatusMessage(Arc<std::sync::Mutex<String>>);

impl StatusMessage {
    /// Replaces the message (keep it short: at most 1 KiB is sent).
    pub fn set(&self, message: impl Into<String>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = message.into();
    }
}

/// The default answer to [`MONITORING_EVENT`]: the request's envelope echoed with the seed's
/// `result` object.
fn monitoring_answer(request: &[u8], app: &str, is_running: bool, message: &str) -> Result<Bytes, String> {
    let req: serde_json::Value =
        serde_json::from_slice(request).map_err(|e| format!("the monitoring request is not JSON: {e}"))?;
    let sync_time = req["config"]["sync_time"].as_i64().ok_or("the monitoring request has no config.sync_time")?;
    let mut message = message.to_string();
    if message.len() > 1024 {
        let mut end = 1024;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    let answer = serde_json::json!({
        "id": req["id"],
        "pid": req["pid"],
        "creator": app,
        "created_at": req["created_at"],
        "expires_at": req["expires_at"],
        "spec": "monitoring",
        "result": {
            "sync_time": sync_time,
            "name": app,
            "host": host_name(),
            "is_running": is_running,
            "message": message,
        }
    });
    Ok(Bytes::from(answer.to_string()))
}

/// This machine's host name (empty when it cannot be read).
fn host_name() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default()
}

impl Worker {
    /// A worker for these arguments, with no handlers.
    pub fn new(args: WorkerArgs) -> Worker {
        Worker { args, handlers: HashMap::new(), heartbeat: Duration::from_secs(5), status: Arc::default() }
    }

    /// A worker for this process's command line.
    ///
    /// # Errors
    /// As [`WorkerArgs::parse`].
    pub fn from_env() -> Result<Worker, SdkError> {
        Ok(Worker::new(WorkerArgs::from_env()?))
    }

    /// The command line the worker was started with.
    pub fn args(&self) -> &WorkerArgs {
        &self.args
    }

    /// How often to heartbeat (default 5 s; keep it well under the app's heartbeat-timeout).
    pub fn heartbeat_interval(mut self, every: Duration) -> Worker {
        self.heartbeat = every;
        self
    }

    /// A handle that sets the `message` of the worker's default monitoring answer.
    pub fn status(&self) -> StatusMessage {
        StatusMessage(self.status.clone())
    }

    /// Handles `event` with `f`. Returning `Ok` closes the reply (if the handler did not),
    /// returning `Err` sends it as an error.
    pub fn on<F, Fut>(mut self, event: &str, f: F) -> Worker
    where
        F: Fn(Request, Response) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        self.handlers.insert(event.to_string(), Arc::new(move |req, resp| Box::pin(f(req, resp))));
        self
    }

    /// Connects, handshakes and serves until the engine asks the worker to terminate (then
    /// open invocations finish, terminate is answered and `Ok` is returned).
    ///
    /// # Errors
    /// The engine socket cannot be reached, the engine sends garbage or closes the connection.
    pub async fn run(self) -> Result<(), SdkError> {
        let stream = UnixStream::connect(&self.args.endpoint).await?;
        let (mut r, w) = stream.into_split();
        let (out, out_rx) = mpsc::channel::<Message>(SESSION_BUFFER);
        let writer = tokio::spawn(write_loop(w, out_rx));
        out.send(Message::Handshake { uuid: self.args.uuid.clone() }).await.map_err(|_| SdkError::EngineClosed)?;
        out.send(Message::Heartbeat).await.map_err(|_| SdkError::EngineClosed)?;
        let beat = {
            let out = out.clone();
            let every = self.heartbeat;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                loop {
                    tick.tick().await;
                    if out.send(Message::Heartbeat).await.is_err() {
                        return;
                    }
                }
            })
        };
        let mut decoder = Decoder::new(Role::Worker, DEFAULT_MAX_MESSAGE_BYTES);
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let mut sessions: HashMap<u64, mpsc::Sender<Incoming>> = HashMap::new();
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut terminating = false;
        let result = 'serve: loop {
            while let Some(msg) = match decoder.decode(&mut buf) {
                Ok(m) => m,
                Err(e) => break 'serve Err(SdkError::from(e)),
            } {
                match msg {
                    Message::Invoke { channel, event }
                        if event == MONITORING_EVENT && !self.handlers.contains_key(&event) =>
                    {
                        // The default answer: the invocations open besides this one say whether it works.
                        let (tx, rx) = mpsc::channel(SESSION_BUFFER);
                        sessions.insert(channel, tx);
                        let (app, status, busy) = (self.args.app.clone(), self.status.clone(), !tasks.is_empty());
                        let handler: Handler = Arc::new(move |mut req: Request, mut resp: Response| {
                            let (app, status) = (app.clone(), status.clone());
                            Box::pin(async move {
                                let body = req.recv().await?.unwrap_or_default();
                                let message = status.lock().unwrap_or_else(|e| e.into_inner()).clone();
                                resp.write(monitoring_answer(&body, &app, busy, &message)?).await?;
                                Ok(())
                            })
                        });
                        tasks.spawn(run_handler(handler, Request { event, rx, done: false }, channel, out.clone()));
                    }
                    Message::Invoke { channel, event } => {
                        let handler = if terminating { None } else { self.handlers.get(&event).cloned() };
                        let Some(handler) = handler else {
                            let message = if terminating {
                                "worker is terminating".to_string()
                            } else {
                                format!("unknown event {event:?}")
                            };
                            let m = Message::Error { channel, category: category::APPLICATION, code: 404, message };
                            let _ = out.send(m).await;
                            continue;
                        };
                        let (tx, rx) = mpsc::channel(SESSION_BUFFER);
                        sessions.insert(channel, tx);
                        tasks.spawn(run_handler(handler, Request { event, rx, done: false }, channel, out.clone()));
                    }
                    Message::Chunk { channel, data } => {
                        if let Some(tx) = sessions.get(&channel) {
                            if tx.send(Incoming::Chunk(data)).await.is_err() {
                                sessions.remove(&channel);
                            }
                        }
                    }
                    Message::Choke { channel } => {
                        sessions.remove(&channel);
                    }
                    Message::Error { channel, category, code, message } => {
                        if let Some(tx) = sessions.remove(&channel) {
                            let _ = tx.send(Incoming::Error(RequestError::Caller { category, code, message })).await;
                        }
                    }
                    // Open invocations finish first; then terminate is answered.
                    Message::Terminate { .. } => terminating = true,
                    Message::Heartbeat | Message::Handshake { .. } => {}
                }
            }
            while tasks.try_join_next().is_some() {}
            if terminating && tasks.is_empty() {
                break Ok(());
            }
            tokio::select! {
                read = r.read_buf(&mut buf) => match read {
                    Ok(0) => break Err(SdkError::EngineClosed),
                    Ok(_) => {}
                    Err(e) => break Err(SdkError::Io(e)),
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        };
        drop(sessions);
        if result.is_ok() {
            let bye = Message::Terminate { code: terminate_code::NORMAL, reason: "terminated on request".into() };
            let _ = out.send(bye).await;
        }
        beat.abort();
        drop(out);
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        let _ = writer.await;
        result
    }
}

async fn run_handler(handler: Handler, req: Request, channel: u64, out: mpsc::Sender<Message>) {
    let closed = Arc::new(AtomicBool::new(false));
    let resp = Response { channel, out: out.clone(), closed: closed.clone() };
    // A task of its own, so a panicking handler becomes an error reply instead of a dead worker.
    let result = tokio::spawn(handler(req, resp)).await;
    if closed.load(Ordering::Relaxed) {
        return;
    }
    let end = match result {
        Ok(Ok(())) => Message::Choke { channel },
        Ok(Err(e)) => Message::Error { channel, category: category::APPLICATION, code: 1, message: e.to_string() },
        Err(_) => {
            let message = "handler panicked".to_string();
            Message::Error { channel, category: category::APPLICATION, code: 2, message }
        }
    };
    let _ = out.send(end).await;
}

async fn write_loop(mut w: tokio::net::unix::OwnedWriteHalf, mut rx: mpsc::Receiver<Message>) {
    let mut batch = Vec::with_capacity(64);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    while rx.recv_many(&mut batch, 64).await > 0 {
        for m in batch.drain(..) {
            m.encode(&mut buf);
        }
        if w.write_all(&buf).await.is_err() {
            return;
        }
        buf.clear();
    }
    let _ = w.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_the_engine_command_line() {
        let a = WorkerArgs::parse(args(&[
            "-v",
            "--app",
            "echo",
            "--locator",
            "127.0.0.1:10053",
            "--endpoint",
            "/run/echo.sock",
            "--uuid=abc",
            "--protocol",
            "1",
        ]))
        .unwrap();
        assert_eq!(a.app, "echo");
        assert_eq!(a.endpoint, PathBuf::from("/run/echo.sock"));
        assert_eq!(a.uuid, "abc");
        assert_eq!(a.protocol, 1);
        assert_eq!(a.locators(), ["127.0.0.1:10053"]);
        let many = WorkerArgs::parse(args(&["--locator", "10.0.0.1:10053, [::1]:10053,", "--endpoint=/x", "--uuid=u"]));
        assert_eq!(many.unwrap().locators(), ["10.0.0.1:10053", "[::1]:10053"]);
        let e = WorkerArgs::parse(args(&["--endpoint", "/x"])).unwrap_err();
        assert!(e.to_string().contains("--uuid"), "{e}");
    }
}
