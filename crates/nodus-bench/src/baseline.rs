//! The raw two-hop baseline: a `raw-forwarder` child that copies bytes between each client
//! connection and a connection it opens to a `raw-echo` child, which sends every length-prefixed
//! frame (4-byte big-endian length, then the body) back as it is. The load generator pipelines K
//! frames over one connection and matches responses to requests in FIFO order — the same shape as
//! the nodus client multiplexing K requests over its one connection.
//!
//! This is what two socket hops cost with no protocol work at all; nodus adds decoding, routing,
//! correlation and encoding on top of the same hops.

use crate::child::{self, Child};
use crate::latency::{Load, Recorder, Summary, System};
use crate::{report, Transport};
use anyhow::{anyhow, bail, Context};
use bytes::{Buf, BufMut, BytesMut};
use nodus_client::Endpoint;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Length of a frame header.
const HEADER_LEN: usize = 4;
/// Largest frame the echo server accepts (the same bound as a nodus frame).
const MAX_FRAME: usize = nodus_wire::DEFAULT_MAX_FRAME;
/// How long the load generator waits for any response before giving up.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Writes are flushed once this many bytes are buffered (as the nodus client does).
const WRITE_CHUNK: usize = 256 * 1024;

/// A byte stream of either transport.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Stream = Box<dyn Io>;

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    /// Binds `endpoint`; returns the listener and the endpoint it is reachable at (the actual
    /// port when TCP port 0 was asked for).
    async fn bind(endpoint: &str) -> anyhow::Result<(Listener, String)> {
        match parse(endpoint)? {
            Endpoint::Unix(path) => {
                let l = UnixListener::bind(&path).with_context(|| format!("cannot listen on {}", path.display()))?;
                Ok((Listener::Unix(l), format!("unix:{}", path.display())))
            }
            Endpoint::Tcp(addr) => {
                let l = TcpListener::bind(&addr).await.with_context(|| format!("cannot listen on TCP {addr}"))?;
                let local = l.local_addr().context("cannot read the bound TCP address")?;
                Ok((Listener::Tcp(l), local.to_string()))
            }
        }
    }

    async fn accept(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Listener::Unix(l) => Box::new(l.accept().await?.0),
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
        })
    }
}

fn parse(endpoint: &str) -> anyhow::Result<Endpoint> {
    endpoint.parse().with_context(|| format!("bad endpoint {endpoint:?}"))
}

async fn connect(endpoint: &Endpoint) -> std::io::Result<Stream> {
    Ok(match endpoint {
        Endpoint::Unix(p) => Box::new(UnixStream::connect(p).await?),
        Endpoint::Tcp(a) => {
            let s = TcpStream::connect(a).await?;
            s.set_nodelay(true)?;
            Box::new(s)
        }
    })
}

/// The running forwarder and echo server.
#[derive(Debug)]
pub struct Baseline {
    // Field order is drop order: the forwarder goes before the echo server.
    forwarder: Child,
    echo: Child,
    endpoint: Endpoint,
}

impl Baseline {
    /// Starts the raw echo server and the forwarder in front of it, each waited for.
    ///
    /// Fails when either cannot be started or is not ready within [`child::READY_TIMEOUT`].
    pub async fn start(transport: Transport, dir: &Path) -> anyhow::Result<Baseline> {
        let listen = |name: &str| match transport {
            Transport::Unix => format!("unix:{}", dir.join(format!("{name}.sock")).display()),
            Transport::Tcp => "127.0.0.1:0".to_string(),
        };
        let command = child::self_command(&["raw-echo", "--listen", &listen("raw-echo")])?;
        let mut echo = Child::spawn("the raw echo server", command, dir.join("raw-echo.log"), true)?;
        let upstream = echo.ready().await?;
        let command =
            child::self_command(&["raw-forwarder", "--listen", &listen("raw-forwarder"), "--upstream", &upstream])?;
        let mut forwarder = Child::spawn("the raw forwarder", command, dir.join("raw-forwarder.log"), true)?;
        let endpoint = parse(&forwarder.ready().await?)?;
        Ok(Baseline { forwarder, echo, endpoint })
    }

    /// Runs `load` through the forwarder and summarises it.
    ///
    /// Fails when the connection cannot be made or breaks, no response comes for
    /// [`STALL_TIMEOUT`], or a response is not the echo of a request.
    pub async fn measure(&mut self, load: &Load) -> anyhow::Result<Summary> {
        self.forwarder.check_running()?;
        self.echo.check_running()?;
        let stream = connect(&self.endpoint)
            .await
            .with_context(|| format!("the load client cannot connect to the forwarder at {}", self.endpoint))?;
        let (rd, wr) = tokio::io::split(stream);
        let window = load.window();
        // Unbounded in type only: each channel never holds more than `inflight` entries.
        let (credit_tx, credit_rx) = mpsc::unbounded_channel();
        let (sent_tx, sent_rx) = mpsc::unbounded_channel();
        let mut writer = tokio::spawn(write_requests(wr, *load, window.end, credit_rx, sent_tx));
        let reading = read_responses(rd, load.payload, Recorder::new(window), window.end, credit_tx, sent_rx);
        tokio::pin!(reading);
        let result = tokio::select! {
            r = &mut reading => r,
            w = &mut writer => match w.context("the request writer panicked") {
                Ok(Ok(())) => reading.await,
                Ok(Err(e)) | Err(e) => Err(e),
            },
        };
        // The writer may be blocked on a peer that stopped reading: never leave it behind.
        writer.abort();
        let summary = result?.summary(System::Baseline, load);
        if summary.requests == 0 {
            bail!("no request through the baseline was answered during the measured phase");
        }
        Ok(summary)
    }

    /// Stops the forwarder, then the echo server.
    pub async fn stop(self) {
        self.forwarder.stop().await;
        self.echo.stop().await;
    }
}

/// Keeps `load.inflight` frames outstanding until `end`: starts with that many credits, gets one
/// back per response, and writes every frame it has credit for in one write. Each frame's send
/// time goes to the reader, in order.
async fn write_requests(
    mut wr: tokio::io::WriteHalf<Stream>,
    load: Load,
    end: Instant,
    mut credits_back: mpsc::UnboundedReceiver<()>,
    sent: mpsc::UnboundedSender<Instant>,
) -> anyhow::Result<()> {
    let len = u32::try_from(load.payload).context("payload too large for a frame")?;
    let mut credits = load.inflight;
    let mut out = BytesMut::with_capacity(WRITE_CHUNK);
    loop {
        if credits == 0 {
            tokio::select! {
                c = credits_back.recv() => match c {
                    Some(()) => credits += 1,
                    None => return Ok(()),
                },
                _ = tokio::time::sleep_until(end) => return Ok(()),
            }
        }
        while credits_back.try_recv().is_ok() {
            credits += 1;
        }
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        while credits > 0 && out.len() < WRITE_CHUNK {
            credits -= 1;
            out.put_u32(len);
            out.put_bytes(0, load.payload);
            sent.send(now).map_err(|_| anyhow!("the response reader stopped"))?;
        }
        wr.write_all(&out).await.context("cannot write requests to the forwarder")?;
        out.clear();
    }
}

/// Reads echoed frames until the window ends, recording each against the oldest send time and
/// handing a credit back to the writer.
async fn read_responses(
    mut rd: tokio::io::ReadHalf<Stream>,
    payload: usize,
    mut recorder: Recorder,
    end: Instant,
    credits_back: mpsc::UnboundedSender<()>,
    mut sent: mpsc::UnboundedReceiver<Instant>,
) -> anyhow::Result<Recorder> {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut last_progress = Instant::now();
    loop {
        let now = Instant::now();
        while buf.len() >= HEADER_LEN {
            let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if len != payload {
                bail!("the baseline echoed a frame of {len} bytes, expected {payload}");
            }
            if buf.len() < HEADER_LEN + len {
                buf.reserve(HEADER_LEN + len - buf.len());
                break;
            }
            buf.advance(HEADER_LEN + len);
            let sent_at = sent.try_recv().map_err(|_| anyhow!("the baseline answered a request never sent"))?;
            recorder.record(sent_at, now);
            last_progress = now;
            // The writer may have stopped at the end of the window: nothing to hand back then.
            let _ = credits_back.send(());
        }
        if buf.capacity() - buf.len() < 8192 {
            buf.reserve(64 * 1024);
        }
        let deadline = (last_progress + STALL_TIMEOUT).min(end);
        match tokio::time::timeout_at(deadline, rd.read_buf(&mut buf)).await {
            Err(_) if Instant::now() >= end => return Ok(recorder),
            Err(_) => bail!("the baseline answered nothing for {STALL_TIMEOUT:?}"),
            Ok(Ok(0)) => bail!("the forwarder closed the connection"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e).context("cannot read responses from the forwarder"),
        }
    }
}

/// The `raw-echo` child role: listens on `listen`, prints `ready <endpoint>`, and sends every
/// length-prefixed frame back on the connection it came from.
///
/// Fails when it cannot listen or accepting fails.
pub async fn raw_echo(listen: &str) -> anyhow::Result<()> {
    let (listener, endpoint) = Listener::bind(listen).await?;
    report::ready(&endpoint);
    loop {
        let stream = listener.accept().await.context("accept failed")?;
        tokio::spawn(async move {
            if let Err(e) = echo_frames(stream).await {
                report::error(&format!("raw echo connection: {e:#}"));
            }
        });
    }
}

/// Echoes complete frames back, as many as each read delivered, in one write.
async fn echo_frames(mut stream: Stream) -> anyhow::Result<()> {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        let mut complete = 0;
        while buf.len() - complete >= HEADER_LEN {
            let h = &buf[complete..complete + HEADER_LEN];
            let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
            if len > MAX_FRAME {
                bail!("frame of {len} bytes exceeds the maximum of {MAX_FRAME}");
            }
            if buf.len() - complete < HEADER_LEN + len {
                buf.reserve(complete + HEADER_LEN + len - buf.len());
                break;
            }
            complete += HEADER_LEN + len;
        }
        if complete > 0 {
            let frames = buf.split_to(complete);
            stream.write_all(&frames).await.context("cannot write echoed frames")?;
        }
        if buf.capacity() - buf.len() < 8192 {
            buf.reserve(64 * 1024);
        }
        if stream.read_buf(&mut buf).await.context("cannot read frames")? == 0 {
            return Ok(());
        }
    }
}

/// The `raw-forwarder` child role: listens on `listen`, prints `ready <endpoint>`, and for each
/// connection opens one to `upstream` and copies bytes both ways until either side closes.
///
/// Fails when it cannot listen or accepting fails.
pub async fn raw_forwarder(listen: &str, upstream: &str) -> anyhow::Result<()> {
    let upstream = parse(upstream)?;
    let (listener, endpoint) = Listener::bind(listen).await?;
    report::ready(&endpoint);
    loop {
        let mut client = listener.accept().await.context("accept failed")?;
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let mut server = match connect(&upstream).await {
                Ok(s) => s,
                Err(e) => return report::error(&format!("cannot connect to the raw echo server at {upstream}: {e}")),
            };
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        });
    }
}
