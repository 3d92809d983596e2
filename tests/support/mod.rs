//! Test support: start a real node on `127.0.0.1:0` and a temporary Unix socket, and talk to it
//! with raw text or binary connections. Every wait has a timeout; nothing sleeps to wait.
#![allow(missing_docs)]

use bytes::BytesMut;
use nodus_daemon::{Clock, Config, Counters, Daemon};
use nodus_wire::{binary, text, Decoded, Message};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long any single wait in a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// A node running in this process.
pub struct Node {
    pub tcp: SocketAddr,
    pub unix: PathBuf,
    pub server: String,
    /// The plain cluster listener, when the config enables it.
    pub cluster: Option<SocketAddr>,
    /// The TLS cluster listener, when the config enables it.
    pub tls: Option<SocketAddr>,
    /// The node's clock: tokio's clock, so a test under paused time moves it.
    pub clock: Clock,
    /// The driver's counters.
    pub counters: Arc<Counters>,
    pub dir: tempfile::TempDir,
    /// The UDP signal port, when the config enables it.
    pub udp: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), String>>>,
}

impl Node {
    /// Starts a bare node (no cluster listeners, no apps) with the default config plus `extra`
    /// top-level TOML or `[limits]`.
    pub async fn start(extra: &str) -> Node {
        Self::start_in(tempfile::tempdir().expect("temp dir"), extra).await
    }

    /// Starts a bare node in `dir` whose config `edit` changes first (any section).
    pub async fn start_with(dir: tempfile::TempDir, edit: impl FnOnce(&mut Config)) -> Node {
        let base = format!(
            "server_name = \"n1\"\ndata_dir = {:?}\ntcp_listen = \"127.0.0.1:0\"\n[cluster]\nlisten = \"\"\nudp_listen = \"\"\n[apps]\nenabled = false\n[http]\nlisten = \"\"\n",
            dir.path().join("data").display().to_string()
        );
        let mut config = Config::from_toml(&base).expect("test config");
        edit(&mut config);
        Self::start_config(dir, config).await
    }

    /// Starts a node whose data directory is `dir` (reused across restarts).
    pub async fn start_in(dir: tempfile::TempDir, extra: &str) -> Node {
        let base = format!(
            "server_name = \"n1\"\ndata_dir = {:?}\ntcp_listen = \"127.0.0.1:0\"\n{extra}\n[cluster]\nlisten = \"\"\nudp_listen = \"\"\n[apps]\nenabled = false\n[http]\nlisten = \"\"\n",
            dir.path().join("data").display().to_string()
        );
        Self::start_config(dir, Config::from_toml(&base).expect("test config")).await
    }

    /// Starts a node with a full config, on tokio's clock.
    pub async fn start_config(dir: tempfile::TempDir, config: Config) -> Node {
        let clock = Clock::tokio();
        let daemon = Daemon::bind_with_clock(config, clock.clone()).await.expect("bind node");
        let tcp = daemon.tcp_addr().expect("tcp listener");
        let unix = daemon.unix_path().expect("unix socket").to_path_buf();
        let server = daemon.server_name().to_string();
        let (cluster, tls, counters) = (daemon.cluster_addr(), daemon.tls_addr(), daemon.counters());
        let udp = daemon.udp_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            daemon
                .run(async {
                    let _ = rx.await;
                })
                .await
                .map_err(|e| e.to_string())
        });
        Node { tcp, unix, server, cluster, tls, udp, clock, counters, dir, stop: Some(tx), task: Some(task) }
    }

    /// Triggers a graceful shutdown without waiting for it.
    pub fn begin_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Stops the node gracefully and waits until it has stopped; returns its data directory.
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.begin_stop();
        self.wait_stopped().await;
        let dir = tempfile::tempdir().expect("temp dir");
        std::mem::replace(&mut self.dir, dir)
    }

    /// Waits until `run` has returned.
    pub async fn wait_stopped(&mut self) {
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task).await.expect("node stops in time").expect("node task").expect("node run");
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.begin_stop();
    }
}

/// A raw connection to a node: the stream, what has been read, and the form it speaks.
pub struct Conn<S> {
    stream: S,
    buf: BytesMut,
    codec: Codec,
}

enum Codec {
    Text(text::LineDecoder),
    Binary(binary::FrameDecoder),
}

/// Text form over the node's Unix socket.
pub type TextConn = Conn<UnixStream>;
/// Binary form over the node's TCP listener.
pub type BinConn = Conn<TcpStream>;

impl Conn<UnixStream> {
    pub async fn connect(node: &Node) -> TextConn {
        let stream = UnixStream::connect(&node.unix).await.expect("connect unix");
        Conn { stream, buf: BytesMut::new(), codec: Codec::Text(text::LineDecoder::new(1 << 20)) }
    }

    /// Sends one line (the newline is added).
    pub async fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\n").as_bytes()).await;
    }
}

impl Conn<TcpStream> {
    pub async fn connect(node: &Node) -> BinConn {
        Self::connect_addr(node.tcp).await
    }

    /// A binary connection to any listener of a node (the client or the cluster port).
    pub async fn connect_addr(addr: SocketAddr) -> BinConn {
        let mut stream = TcpStream::connect(addr).await.expect("connect tcp");
        stream.write_all(&binary::PREFACE).await.expect("preface");
        Conn { stream, buf: BytesMut::new(), codec: Codec::Binary(binary::FrameDecoder::new(1 << 24)) }
    }

    pub async fn send(&mut self, m: &Message) {
        self.send_message(m).await;
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// The underlying stream, for raw reads and writes.
    pub fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Sends raw bytes (one or more units, or garbage).
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Sends a message in the connection's form.
    pub async fn send_message(&mut self, m: &Message) {
        let mut out = BytesMut::new();
        match self.codec {
            Codec::Text(_) => text::encode(m, &mut out),
            Codec::Binary(_) => binary::encode(m, &mut out, 1 << 24).expect("encode"),
        }
        self.send_raw(&out).await;
    }

    /// Next message; panics after [`WAIT`] or on EOF.
    pub async fn recv(&mut self) -> Message {
        self.try_recv(WAIT).await.expect("a message before the timeout")
    }

    /// Next message within `timeout`, or `None` on timeout or EOF.
    pub async fn try_recv(&mut self, timeout: Duration) -> Option<Message> {
        tokio::time::timeout(timeout, async {
            loop {
                let decoded = match &mut self.codec {
                    Codec::Text(d) => d.decode(&mut self.buf),
                    Codec::Binary(d) => d.decode(&mut self.buf),
                };
                match decoded {
                    Ok(Some(Decoded::Message(m))) => return Some(m),
                    Ok(Some(Decoded::Invalid(e))) => panic!("node sent an invalid unit: {e}"),
                    Ok(None) => {}
                    Err(e) => panic!("node sent a bad unit: {e}"),
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .ok()
        .flatten()
    }

    /// Waits for a message with `command`, skipping others.
    pub async fn expect(&mut self, command: &str) -> Message {
        loop {
            let m = self.recv().await;
            if m.command == command {
                return m;
            }
        }
    }

    /// Waits until the node closes the connection.
    pub async fn expect_eof(&mut self) {
        let r = tokio::time::timeout(WAIT, async {
            let mut scratch = [0u8; 4096];
            loop {
                match self.stream.read(&mut scratch).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(r.is_ok(), "the node should close the connection");
    }

    /// Registers `service` and consumes HELP and READY.
    pub async fn register(&mut self, service: &str) {
        self.send_message(&Message::new("REGISTER").param("service", service).param("version", 1)).await;
        assert_eq!(self.recv().await.command, "HELP");
        assert_eq!(self.recv().await.command, "READY");
    }
}

/// Keeps offering `probe(n)` (n = 1, 2, ...) from `c` to a service that has stopped reading, one
/// every 100 ms, each followed by a `PING` (whose `PONG` comes after the offer's refusal, if any),
/// until an answer says the service is gone (`ERROR code=disconnected` or `SERVICE_UNAVAILABLE`):
/// what the kernel's socket buffer took is not the node's to judge, a queue that stops moving is.
/// Every answer but the `PONG`s goes to `seen`; returns how many probes were sent.
pub async fn probe_until_cut<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Conn<S>,
    mut probe: impl FnMut(u64) -> Message,
    mut seen: impl FnMut(Message),
) -> u64 {
    let deadline = tokio::time::Instant::now() + 3 * WAIT;
    let mut every = tokio::time::interval(Duration::from_millis(100));
    let mut n = 0;
    loop {
        assert!(tokio::time::Instant::now() < deadline, "the service that stopped reading was not cut");
        every.tick().await;
        n += 1;
        c.send_message(&probe(n)).await;
        let ping = 4_000_000_000 + n;
        c.send_message(&Message::new("PING").with_id(ping)).await;
        let mut gone = false;
        loop {
            let m = c.recv().await;
            if m.command == "PONG" && m.envelope.reply_to == ping {
                break;
            }
            gone |= m.get("code") == Some("disconnected") || m.command == "SERVICE_UNAVAILABLE";
            seen(m);
        }
        if gone {
            return n;
        }
    }
}
