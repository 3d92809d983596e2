//! The connection driver behind a [`crate::Client`]: connect, handshake (preface, `REGISTER`,
//! `COMMANDS`, wait for `READY`), pump messages both ways, and reconnect with jittered backoff.

use crate::{ClientConfig, ClientError, Endpoint, PendingMap, State};
use bytes::BytesMut;
use nodus_wire::{binary, Decoded, Message};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

/// How long the handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Writer flushes once this many bytes are encoded.
const WRITE_CHUNK: usize = 256 * 1024;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An open, handshaken connection.
pub(crate) struct Established {
    rd: ReadHalf<Box<dyn Io>>,
    wr: WriteHalf<Box<dyn Io>>,
    buf: BytesMut,
    decoder: binary::FrameDecoder,
    /// Messages that arrived during the handshake (cached messages follow `READY`).
    early: Vec<Message>,
    pub(crate) server: String,
}

async fn open(endpoint: &Endpoint) -> std::io::Result<Box<dyn Io>> {
    Ok(match endpoint {
        Endpoint::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await?),
        Endpoint::Tcp(a) => {
            let s = tokio::net::TcpStream::connect(a).await?;
            s.set_nodelay(true)?;
            Box::new(s)
        }
    })
}

/// Connects and performs the handshake.
pub(crate) async fn establish(endpoint: &Endpoint, config: &ClientConfig) -> Result<Established, ClientError> {
    let connect_err = |reason: String| ClientError::Connect { endpoint: endpoint.to_string(), reason };
    let io = open(endpoint).await.map_err(|e| connect_err(e.to_string()))?;
    let (rd, mut wr) = tokio::io::split(io);
    let mut out = BytesMut::from(&binary::PREFACE[..]);
    let hello_id = rand::random::<u64>() | 1;
    let hello = match &config.service {
        Some(name) => Message::new("REGISTER").param("service", name).param("version", 1).with_id(hello_id),
        None => Message::new("PING").with_id(hello_id),
    };
    binary::encode(&hello, &mut out, config.max_frame).map_err(|e| connect_err(e.to_string()))?;
    if config.service.is_some() && !config.commands.is_empty() {
        let commands = Message::new("COMMANDS").param("list", config.commands.join(","));
        binary::encode(&commands, &mut out, config.max_frame).map_err(|e| connect_err(e.to_string()))?;
    }
    wr.write_all(&out).await.map_err(|e| connect_err(e.to_string()))?;
    let mut conn = Established {
        rd,
        wr,
        buf: BytesMut::with_capacity(64 * 1024),
        decoder: binary::FrameDecoder::new(config.max_frame),
        early: Vec::new(),
        server: String::new(),
    };
    let handshake = async {
        loop {
            while let Some(d) = conn.decoder.decode(&mut conn.buf).map_err(|e| connect_err(e.to_string()))? {
                let Decoded::Message(m) = d else { continue };
                if m.envelope.reply_to != hello_id {
                    conn.early.push(m);
                    continue;
                }
                match m.command.as_str() {
                    "READY" | "PONG" => {
                        conn.server = m.get("server").unwrap_or(&m.from.server).to_string();
                        return Ok(());
                    }
                    "HELP" => {}
                    "QUITTING" => return Err(connect_err("the node is shutting down".into())),
                    _ => return Err(ClientError::Register(m.get("message").unwrap_or(&m.command).to_string())),
                }
            }
            match conn.rd.read_buf(&mut conn.buf).await {
                Ok(0) => return Err(connect_err("the node closed the connection during the handshake".into())),
                Ok(_) => {}
                Err(e) => return Err(connect_err(e.to_string())),
            }
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| connect_err("no answer to the handshake within 5 s".into()))??;
    Ok(conn)
}

/// Owns the connection for the life of the client.
pub(crate) struct Driver {
    pub(crate) endpoint: Endpoint,
    pub(crate) config: ClientConfig,
    pub(crate) out_rx: mpsc::Receiver<Message>,
    pub(crate) in_tx: mpsc::Sender<Message>,
    pub(crate) pending: PendingMap,
    pub(crate) connected: Arc<AtomicBool>,
    pub(crate) state: watch::Sender<State>,
    pub(crate) server: Arc<Mutex<String>>,
}

enum Exit {
    /// Every client handle is gone.
    Closed,
    /// The connection dropped.
    Dropped,
}

impl Driver {
    pub(crate) async fn run(mut self, first: Established) {
        let mut conn = first;
        loop {
            let exit = self.pump(conn).await;
            self.connected.store(false, Ordering::SeqCst);
            // Requests in flight on the old connection will never be answered.
            self.pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
            if matches!(exit, Exit::Closed) || !self.config.reconnect {
                break;
            }
            let _ = self.state.send(State::Reconnecting);
            match self.reconnect().await {
                Some(c) => {
                    *self.server.lock().unwrap_or_else(|e| e.into_inner()) = c.server.clone();
                    conn = c;
                    self.connected.store(true, Ordering::SeqCst);
                    let _ = self.state.send(State::Connected);
                }
                None => break,
            }
        }
        let _ = self.state.send(State::Closed);
    }

    async fn reconnect(&mut self) -> Option<Established> {
        let mut delay = self.config.backoff_min;
        loop {
            if self.in_tx.is_closed() && self.out_rx.is_closed() {
                return None;
            }
            let jittered = delay.mul_f64(0.5 + rand::random::<f64>());
            tokio::time::sleep(jittered).await;
            match establish(&self.endpoint, &self.config).await {
                Ok(c) => {
                    debug!(endpoint = %self.endpoint, "reconnected");
                    return Some(c);
                }
                Err(ClientError::Register(e)) => {
                    warn!(error = %e, "registration refused after reconnecting; giving up");
                    return None;
                }
                Err(e) => debug!(error = %e, ?delay, "reconnect failed"),
            }
            delay = (delay * 2).min(self.config.backoff_max);
        }
    }

    async fn pump(&mut self, mut conn: Established) -> Exit {
        for m in std::mem::take(&mut conn.early) {
            if !self.dispatch(m).await {
                return Exit::Closed;
            }
        }
        let mut out = BytesMut::with_capacity(64 * 1024);
        loop {
            // Anything already buffered (e.g. right after the handshake) first.
            loop {
                match conn.decoder.decode(&mut conn.buf) {
                    Ok(Some(Decoded::Message(m))) => {
                        if !self.dispatch(m).await {
                            return Exit::Closed;
                        }
                    }
                    Ok(Some(Decoded::Invalid(e))) => warn!(error = %e, "the node sent an invalid frame"),
                    Ok(None) => break,
                    Err(e) => {
                        warn!(error = %e, "framing error from the node; reconnecting");
                        return Exit::Dropped;
                    }
                }
            }
            tokio::select! {
                m = self.out_rx.recv() => {
                    let Some(m) = m else { return Exit::Closed };
                    self.encode(&m, &mut out);
                    // Let other tasks that are about to send run first, so their messages share
                    // this write: one syscall for many requests under load.
                    tokio::task::yield_now().await;
                    while out.len() < WRITE_CHUNK {
                        match self.out_rx.try_recv() {
                            Ok(m) => self.encode(&m, &mut out),
                            Err(_) => break,
                        }
                    }
                    let r = conn.wr.write_all(&out).await;
                    out.clear();
                    if r.is_err() {
                        return Exit::Dropped;
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
            }
        }
    }

    fn encode(&self, m: &Message, out: &mut BytesMut) {
        if let Err(e) = binary::encode(m, out, self.config.max_frame) {
            warn!(error = %e, command = %m.command, "message too large; not sent");
        }
    }

    /// Routes one incoming message; false once nobody listens any more.
    async fn dispatch(&mut self, m: Message) -> bool {
        if m.envelope.reply_to != 0 {
            let waiter = self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&m.envelope.reply_to);
            if let Some(w) = waiter {
                let _ = w.send(m);
                return true;
            }
        }
        if m.command == "QUITTING" {
            debug!("the node is shutting down");
        }
        if self.in_tx.send(m).await.is_err() {
            // Nobody reads incoming messages: keep serving requests as long as handles exist.
            return !self.out_rx.is_closed();
        }
        true
    }
}
