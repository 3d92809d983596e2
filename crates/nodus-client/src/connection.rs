//! The connection driver behind a [`crate::Client`]: connect, handshake (preface, `AUTH` when a
//! token is set, `REGISTER` or `PING`, `COMMANDS`, wait for the answers), then one task owns the
//! socket and the table of requests in flight: it writes what the handles queue as [`Command`]s,
//! matches replies to requests, hands everything else to [`crate::Incoming`] without ever waiting
//! for its reader, and reconnects with [`nodus_wire::Backoff`].

use crate::{ClientConfig, ClientError, Command, Endpoint, SelfReport, State, Status};
use bytes::BytesMut;
use nodus_control::control::{Body, ControlMessage, MonitoringResult, Spec, KILL, MONITORING};
use nodus_wire::{binary, Backoff, Decoded, Message};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, warn};

/// How long the handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Writer flushes once this many bytes are queued.
const WRITE_CHUNK: usize = 256 * 1024;
/// How often the driver forgets requests whose callers gave up (dropped or timed out).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

type Io = dyn crate::Transport;

/// An open, handshaken connection.
pub(crate) struct Established {
    rd: ReadHalf<Box<Io>>,
    wr: WriteHalf<Box<Io>>,
    buf: BytesMut,
    decoder: binary::FrameDecoder,
    /// Messages that arrived during the handshake (cached messages follow `READY`).
    early: Vec<Message>,
    pub(crate) server: String,
    /// The service's component id (`READY component=`).
    pub(crate) component: u64,
}

async fn open(endpoint: &Endpoint, config: &ClientConfig) -> std::io::Result<Box<Io>> {
    if let Some(connector) = &config.connector {
        return connector().await;
    }
    Ok(match endpoint {
        Endpoint::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await?),
        Endpoint::Tcp(a) => {
            let s = tokio::net::TcpStream::connect(a).await?;
            s.set_nodelay(true)?;
            Box::new(s)
        }
    })
}

/// Where the handshake stands.
#[derive(Default)]
struct Handshake {
    /// `AUTH` answered (or not sent).
    authenticated: bool,
    /// `READY`/`PONG` received.
    ready: bool,
}

/// Connects and performs the handshake.
pub(crate) async fn establish(endpoint: &Endpoint, config: &ClientConfig) -> Result<Established, ClientError> {
    let io_err = |e: std::io::Error| ClientError::Connect { endpoint: endpoint.to_string(), source: Arc::new(e) };
    let failed = |reason: String| ClientError::Handshake { endpoint: endpoint.to_string(), reason };
    let io = open(endpoint, config).await.map_err(io_err)?;
    let (rd, mut wr) = tokio::io::split(io);
    let mut out = BytesMut::from(&binary::PREFACE[..]);
    let encode = |m: &Message, out: &mut BytesMut| binary::encode(m, out, config.max_frame);
    let auth_id = rand::random::<u64>() | 1;
    if let Some(token) = &config.token {
        let auth = Message::new("AUTH").param("token", token).with_id(auth_id);
        encode(&auth, &mut out).map_err(|e| failed(e.to_string()))?;
    }
    let hello_id = auth_id.wrapping_add(2);
    let hello = match &config.service {
        Some(name) => {
            let mut m = Message::new("REGISTER").param("service", name).param("version", 1).with_id(hello_id);
            if let Some((pid, node)) = &config.parent {
                m.envelope.pid = *pid;
                if let Some(node) = node {
                    m = m.param("parent_node", node);
                }
            }
            m
        }
        None => Message::new("PING").with_id(hello_id),
    };
    encode(&hello, &mut out).map_err(|e| failed(e.to_string()))?;
    if config.service.is_some() && !config.commands.is_empty() {
        let commands = Message::new("COMMANDS").param("list", config.commands.join(","));
        encode(&commands, &mut out).map_err(|e| failed(e.to_string()))?;
    }
    wr.write_all(&out).await.map_err(io_err)?;
    let mut conn = Established {
        rd,
        wr,
        buf: BytesMut::with_capacity(64 * 1024),
        decoder: binary::FrameDecoder::new(config.max_frame),
        early: Vec::new(),
        server: String::new(),
        component: 0,
    };
    let mut state = Handshake { authenticated: config.token.is_none(), ready: false };
    let handshake = async {
        loop {
            while let Some(d) = conn.decoder.decode(&mut conn.buf).map_err(|e| failed(e.to_string()))? {
                let Decoded::Message(m) = d else { continue };
                let reply_to = m.envelope.reply_to;
                if reply_to == auth_id && config.token.is_some() && !state.authenticated {
                    match m.command.as_str() {
                        "AUTHENTICATED" => state.authenticated = true,
                        // A node from before access control: there is nothing to authenticate to.
                        "UNKNOWN" => {
                            warn!(endpoint = %endpoint, "the node does not know AUTH; continuing without it");
                            state.authenticated = true;
                        }
                        _ => {
                            let why = m.get("message").unwrap_or(&m.command).to_string();
                            return Err(ClientError::Unauthorized(why));
                        }
                    }
                } else if reply_to == hello_id {
                    match m.command.as_str() {
                        "READY" | "PONG" => {
                            conn.server = m.get("server").unwrap_or(&m.from.server).to_string();
                            conn.component = m.get("component").and_then(|c| c.parse().ok()).unwrap_or(0);
                            state.ready = true;
                        }
                        "HELP" => {}
                        "QUITTING" => return Err(failed("the node is shutting down".into())),
                        _ => return Err(ClientError::Register(m.get("message").unwrap_or(&m.command).to_string())),
                    }
                } else {
                    conn.early.push(m);
                }
                if state.ready && state.authenticated {
                    return Ok(());
                }
            }
            match conn.rd.read_buf(&mut conn.buf).await {
                Ok(0) => return Err(failed("the node closed the connection during the handshake".into())),
                Ok(_) => {}
                Err(e) => return Err(io_err(e)),
            }
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| failed(format!("no answer to the handshake within {HANDSHAKE_TIMEOUT:?}")))??;
    Ok(conn)
}

type Waiter = oneshot::Sender<Result<Message, ClientError>>;

/// Owns the connection and the requests in flight for the life of the client.
pub(crate) struct Driver {
    endpoint: Endpoint,
    config: ClientConfig,
    commands: mpsc::Receiver<Command>,
    incoming: mpsc::Sender<Message>,
    status: watch::Sender<Status>,
    /// Requests in flight by id; only this task touches it.
    pending: HashMap<u64, Waiter>,
    /// Incoming messages dropped because [`crate::Incoming`] was full.
    dropped: Arc<AtomicU64>,
    /// In a run of drops (logged once per run).
    slow: bool,
    /// What the service says when monitored.
    report: Arc<std::sync::Mutex<SelfReport>>,
    /// Answers to the control plane, to write before anything else.
    answers: Vec<Message>,
    /// The node's control plane killed this service: answer, then close for good.
    killed: bool,
}

enum Exit {
    /// Every client handle is gone, or the service was killed.
    Closed,
    /// The connection dropped.
    Dropped,
}

impl Driver {
    pub(crate) fn new(
        endpoint: Endpoint,
        config: ClientConfig,
        commands: mpsc::Receiver<Command>,
        incoming: mpsc::Sender<Message>,
        status: watch::Sender<Status>,
        dropped: Arc<AtomicU64>,
        report: Arc<std::sync::Mutex<SelfReport>>,
    ) -> Driver {
        Driver {
            endpoint,
            config,
            commands,
            incoming,
            status,
            pending: HashMap::new(),
            dropped,
            slow: false,
            report,
            answers: Vec::new(),
            killed: false,
        }
    }

    pub(crate) async fn run(mut self, first: Established) {
        let mut conn = first;
        loop {
            let exit = self.pump(conn).await;
            // Requests in flight on the old connection will never be answered.
            for (_, waiter) in self.pending.drain() {
                let _ = waiter.send(Err(ClientError::Disconnected));
            }
            if matches!(exit, Exit::Closed) || !self.config.reconnect {
                break;
            }
            self.status.send_modify(|s| s.state = State::Reconnecting);
            match self.reconnect().await {
                Some(c) => {
                    let (server, component) = (c.server.clone(), c.component);
                    conn = c;
                    self.status.send_modify(|s| {
                        s.state = State::Connected;
                        s.server = server;
                        s.component = component;
                    });
                }
                None => break,
            }
        }
        self.status.send_modify(|s| s.state = State::Closed);
    }

    async fn reconnect(&mut self) -> Option<Established> {
        let mut backoff = Backoff::new(self.config.backoff_min, self.config.backoff_max, rand::random());
        loop {
            if self.incoming.is_closed() && self.commands.is_closed() {
                return None;
            }
            tokio::time::sleep(backoff.next_delay()).await;
            match establish(&self.endpoint, &self.config).await {
                Ok(c) => {
                    debug!(endpoint = %self.endpoint, "reconnected");
                    return Some(c);
                }
                Err(e @ (ClientError::Register(_) | ClientError::Unauthorized(_))) => {
                    warn!(error = %e, "refused after reconnecting; giving up");
                    return None;
                }
                Err(e) => debug!(error = %e, attempt = backoff.attempts(), "reconnect failed"),
            }
        }
    }

    async fn pump(&mut self, mut conn: Established) -> Exit {
        for m in std::mem::take(&mut conn.early) {
            self.dispatch(m);
        }
        let mut out = BytesMut::with_capacity(64 * 1024);
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Anything already buffered (e.g. right after the handshake) first.
            loop {
                match conn.decoder.decode(&mut conn.buf) {
                    Ok(Some(Decoded::Message(m))) => self.dispatch(m),
                    Ok(Some(Decoded::Invalid(e))) => warn!(error = %e, "the node sent an invalid frame"),
                    Ok(None) => break,
                    Err(e) => {
                        warn!(error = %e, "framing error from the node; reconnecting");
                        return Exit::Dropped;
                    }
                }
            }
            if !self.answers.is_empty() {
                for m in std::mem::take(&mut self.answers) {
                    if let Err(e) = binary::encode(&m, &mut out, self.config.max_frame) {
                        warn!(error = %e, "control answer too large; not sent");
                    }
                }
                let r = conn.wr.write_all(&out).await;
                out.clear();
                if r.is_err() {
                    return Exit::Dropped;
                }
            }
            if self.killed {
                // The node closes the connection once it has the answer; nothing more goes out.
                let _ = conn.wr.shutdown().await;
                return Exit::Closed;
            }
            tokio::select! {
                c = self.commands.recv() => {
                    let Some(c) = c else { return Exit::Closed };
                    self.take(c, &mut out);
                    // Let other tasks that are about to send run first, so their messages share
                    // this write: one syscall for many requests under load.
                    tokio::task::yield_now().await;
                    while out.len() < WRITE_CHUNK {
                        match self.commands.try_recv() {
                            Ok(c) => self.take(c, &mut out),
                            Err(_) => break,
                        }
                    }
                    if !out.is_empty() {
                        let r = conn.wr.write_all(&out).await;
                        out.clear();
                        if r.is_err() {
                            return Exit::Dropped;
                        }
                    }
                }
                r = conn.rd.read_buf(&mut conn.buf) => match r {
                    Ok(0) | Err(_) => return Exit::Dropped,
                    Ok(_) => {
                        if conn.buf.capacity() - conn.buf.len() < 8192 {
                            conn.buf.reserve(64 * 1024);
                        }
                    }
                },
                _ = sweep.tick(), if !self.pending.is_empty() => self.forget_abandoned(),
            }
        }
    }

    /// Encodes a command's message into `out` (or answers it at once).
    fn take(&mut self, c: Command, out: &mut BytesMut) {
        match c {
            Command::Send(msg) => {
                // The handle checked the size; a failure here would be a bug in that check.
                if let Err(e) = binary::encode(&msg, out, self.config.max_frame) {
                    warn!(error = %e, command = %msg.command, "message too large; not sent");
                }
            }
            Command::Request { msg, reply } => {
                let id = msg.envelope.id;
                if reply.is_closed() {
                    // The caller gave up before the request was written: do not send it at all.
                    return;
                }
                if self.pending.contains_key(&id) {
                    let _ = reply.send(Err(ClientError::DuplicateId(id)));
                    return;
                }
                if self.pending.len() >= self.config.max_pending {
                    self.forget_abandoned();
                    if self.pending.len() >= self.config.max_pending {
                        let _ = reply.send(Err(ClientError::QueueFull));
                        return;
                    }
                }
                if let Err(e) = binary::encode(&msg, out, self.config.max_frame) {
                    let _ = reply.send(Err(crate::too_large(e)));
                    return;
                }
                self.pending.insert(id, reply);
            }
            Command::Pending(answer) => {
                self.forget_abandoned();
                let _ = answer.send(self.pending.len());
            }
        }
    }

    /// Drops requests whose callers are gone (the future was dropped or timed out).
    fn forget_abandoned(&mut self) {
        self.pending.retain(|_, w| !w.is_closed());
    }

    /// Routes one incoming message: to the request it answers, else to [`crate::Incoming`]
    /// without waiting (a full stream drops the message; see the crate docs).
    fn dispatch(&mut self, m: Message) {
        if self.config.control && m.envelope.reply_to == 0 && matches!(m.command.as_str(), MONITORING | KILL) {
            if let Some(answer) = self.control(&m) {
                self.answers.push(answer);
                if !self.killed {
                    return;
                }
                // Killed: the program learns it from the KILL itself, then the stream ends.
            }
        }
        if m.envelope.reply_to != 0 && settles(&m) {
            if let Some(w) = self.pending.remove(&m.envelope.reply_to) {
                if let Err(Ok(m)) = w.send(Ok(m)) {
                    // The caller gave up just now: nobody wants this reply.
                    debug!(command = %m.command, "reply to an abandoned request dropped");
                }
                return;
            }
        }
        if m.command == "QUITTING" {
            debug!("the node is shutting down");
        }
        match self.incoming.try_send(m) {
            Ok(()) => self.slow = false,
            Err(mpsc::error::TrySendError::Full(m)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                if !self.slow {
                    self.slow = true;
                    warn!(
                        capacity = self.incoming.max_capacity(),
                        command = %m.command,
                        "slow consumer: the incoming stream is full, dropping messages until it is read"
                    );
                }
            }
            // Nobody reads incoming messages: requests are still served while handles exist.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

impl Driver {
    /// The SDK's answer to a control message (seed 000) for its service: `MONITORING` from
    /// anyone, `KILL` only from this node's `control` service (anything else would let any
    /// sender stop a service). `None`: not a control message this SDK answers.
    fn control(&mut self, m: &Message) -> Option<Message> {
        let request = match ControlMessage::from_message(m) {
            Ok(c) => c,
            Err(e) => {
                let bad = m.reply("INVALID").param("command", &m.command).param("message", e.to_string());
                return (m.envelope.id != 0).then_some(bad);
            }
        };
        let (component, server) = {
            let s = self.status.borrow();
            (nodus_control::ComponentId::new(s.component), s.server.clone())
        };
        let creator = format!("{server}:{}", self.config.service.as_deref().unwrap_or(""));
        let now = now_ms();
        let body = match request.body {
            Body::Monitoring { sync_time, .. } => {
                let report = self.report.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let mut message = report.message;
                truncate(&mut message, nodus_control::control::MAX_TEXT_BYTES);
                let name = self.config.service.clone().unwrap_or_else(|| "client".into());
                let result =
                    MonitoringResult { sync_time, name, host: server.clone(), is_running: report.is_running, message };
                Body::MonitoringResult { component, result }
            }
            Body::Kill { .. } if m.from.service == "control" && m.from.server == server => {
                debug!("killed by the node's control plane: answering, then closing for good");
                self.killed = true;
                Body::KillResult { component, stopped: true, unanswered: Vec::new() }
            }
            Body::Kill { .. } => Body::Error {
                spec: Spec::Kill,
                component,
                code: "refused".into(),
                message: format!("only node {server}'s control service kills this service: use `nodus kill ID`"),
            },
            _ => return None,
        };
        let answer = ControlMessage::answer(&request.header, component, &creator, now, body);
        (m.envelope.id != 0 || self.killed).then(|| answer.reply_to(m))
    }
}

/// The wall clock in Unix ms, for the envelope times of control messages.
#[allow(clippy::disallowed_methods)] // The SDK runs in other programs: it has no node clock.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// True when `m`, carrying a `reply_to`, answers the request: everything but a node's
/// `TRANSMISSION_REPORT status=cached` (a progress note; the answer comes when it is delivered).
fn settles(m: &Message) -> bool {
    !(m.command == "TRANSMISSION_REPORT" && m.from.service == "node" && m.get("status") != Some("failed"))
}
