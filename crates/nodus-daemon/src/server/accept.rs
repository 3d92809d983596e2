//! One accept loop for every listener (client TCP, Unix socket, cluster, TLS cluster), in the
//! manner of linkerd2-proxy's `serve` and mini-redis's `Listener::accept`:
//! - a failed `accept` (EMFILE, ENFILE, ENOBUFS, ...) is counted, logged and followed by a
//!   jittered exponential backoff ([`ACCEPT_BACKOFF_MIN`]..[`ACCEPT_BACKOFF_MAX`]), so the loop
//!   never spins; the first success resets it;
//! - each listener admits at most `max_connections` at once; one more is counted, logged (once
//!   per burst) and closed at once with a FIN, never left hanging;
//! - each admitted connection gets an id and runs in its own tracked task under the span
//!   `conn{conn, peer, listener}` (debug level); on the TLS listener the handshake runs there too, within the
//!   connection's handshake deadline.

use super::budget::ListenerKind;
use super::{conn, Shared};
use crate::auth::{Creds, Origin};
use nodus_wire::Backoff;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;
use tracing::{debug, warn, Instrument};

/// First delay after a failed `accept`.
pub(crate) const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest delay between failed `accept`s.
pub(crate) const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A byte stream the driver can split into a reader and a writer.
pub(crate) trait Split: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// The reading half.
    type Read: AsyncRead + Send + Unpin + 'static;
    /// The writing half.
    type Write: AsyncWrite + Send + Unpin + 'static;
    /// Splits the stream.
    fn split(self) -> (Self::Read, Self::Write);
}

impl Split for TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn split(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl Split for UnixStream {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    fn split(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> Split for tokio_rustls::server::TlsStream<S> {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    fn split(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> Split for tokio_rustls::client::TlsStream<S> {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    fn split(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

/// A listener: yields connections with what is known of where they came from.
pub(crate) trait Accept: Send + 'static {
    /// The accepted stream.
    type Io: Split;
    /// Which listener this is.
    fn kind(&self) -> ListenerKind;
    /// The next connection. On the TLS listener the origin says `tls: true`, which holds only
    /// once the handshake succeeded; nothing reads it before.
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Io, Origin)>> + Send;
}

/// A TCP listener: client, cluster or TLS cluster.
pub(crate) struct TcpAccept {
    listener: TcpListener,
    kind: ListenerKind,
}

impl TcpAccept {
    pub(crate) fn new(listener: TcpListener, kind: ListenerKind) -> TcpAccept {
        TcpAccept { listener, kind }
    }
}

impl Accept for TcpAccept {
    type Io = TcpStream;

    fn kind(&self) -> ListenerKind {
        self.kind
    }

    async fn accept(&mut self) -> io::Result<(TcpStream, Origin)> {
        let (s, peer) = self.listener.accept().await?;
        let _ = s.set_nodelay(true);
        let origin = match self.kind {
            ListenerKind::Cluster => Origin::Cluster { peer, tls: false },
            ListenerKind::Tls => Origin::Cluster { peer, tls: true },
            _ => Origin::Tcp { peer },
        };
        Ok((s, origin))
    }
}

/// The local Unix socket: the peer's credentials come from the kernel (`SO_PEERCRED`).
pub(crate) struct UnixAccept(pub(crate) UnixListener);

impl Accept for UnixAccept {
    type Io = UnixStream;

    fn kind(&self) -> ListenerKind {
        ListenerKind::Unix
    }

    async fn accept(&mut self) -> io::Result<(UnixStream, Origin)> {
        let (s, _) = self.0.accept().await?;
        let creds = s.peer_cred().ok().map(|c| Creds { uid: c.uid(), gid: c.gid(), pid: c.pid() });
        Ok((s, Origin::Unix { creds }))
    }
}

/// Accepts connections until the node stops; see the module documentation.
pub(crate) async fn serve<L: Accept>(mut listener: L, shared: Arc<Shared>, tracker: TaskTracker) {
    let kind = listener.kind();
    let max = shared.config.limits.max_connections;
    let limit = Arc::new(Semaphore::new(max));
    let counters = shared.counters.clone();
    let stats = counters.listener(kind);
    let mut backoff = Backoff::new(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX, rand::random());
    let mut full = false;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shared.stop.cancelled() => return,
            r = listener.accept() => r,
        };
        let (io, origin) = match accepted {
            Ok(accepted) => {
                backoff.reset();
                accepted
            }
            Err(e) => {
                stats.accept_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let delay = backoff.next_delay();
                warn!(listener = kind.name(), error = %e, retry_in_ms = delay.as_millis() as u64, "accept failed");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shared.stop.cancelled() => return,
                }
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            stats.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if full {
                debug!(listener = kind.name(), peer = %peer_label(&origin), "connection refused: listener full");
            } else {
                warn!(
                    listener = kind.name(),
                    max_connections = max,
                    peer = %peer_label(&origin),
                    "listener full: closing new connections until one ends (limits.max_connections)"
                );
                full = true;
            }
            refuse(io).await;
            continue;
        };
        full = false;
        stats.accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = shared.next_conn_id();
        // A debug span, as linkerd's: entered on every poll, so free unless debugging; the few
        // warnings a connection can log carry its id themselves.
        let span = tracing::debug_span!("conn", conn = id, peer = %peer_label(&origin), listener = kind.name());
        tracker.spawn(open(shared.clone(), kind, id, io, origin, permit).instrument(span));
    }
}

/// Closes a connection the listener has no room for: FIN now (a raw socket's shutdown does not
/// wait), then the socket is dropped.
async fn refuse<I: Split>(mut io: I) {
    let _ = tokio::time::timeout(Duration::from_millis(100), io.shutdown()).await;
}

/// Runs one admitted connection: the TLS handshake on the TLS listener, then the connection.
async fn open<I: Split>(
    shared: Arc<Shared>,
    kind: ListenerKind,
    id: crate::router::ConnId,
    io: I,
    origin: Origin,
    permit: OwnedSemaphorePermit,
) {
    let deadline = tokio::time::Instant::now() + shared.config.handshake_timeout();
    if kind != ListenerKind::Tls {
        let (r, w) = io.split();
        return conn::connection(shared, kind, id, r, w, origin, deadline, Some(permit)).await;
    }
    let Some(acceptor) = shared.tls.as_ref().map(|t| t.acceptor.clone()) else { return };
    let peer = peer_label(&origin);
    // The handshake verifies the peer's certificate against the cluster CA. The socket lives in
    // `accept` until this function returns, so a timeout is counted before the peer sees EOF.
    let accept = tokio::time::timeout_at(deadline, acceptor.accept(io));
    tokio::pin!(accept);
    let handshake = tokio::select! {
        biased;
        _ = shared.stop.cancelled() => return,
        r = &mut accept => r,
    };
    match handshake {
        Ok(Ok(stream)) => {
            let (r, w) = stream.split();
            conn::connection(shared, kind, id, r, w, origin, deadline, Some(permit)).await;
        }
        Ok(Err(e)) => warn!(conn = id, %peer, error = %e, "TLS handshake refused"),
        Err(_) => {
            shared.counters.listener(kind).handshake_timeouts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            warn!(conn = id, %peer, "TLS handshake timed out");
        }
    }
}

/// The `peer` field of a connection's span.
pub(crate) fn peer_label(origin: &Origin) -> String {
    match origin {
        Origin::Tcp { peer } | Origin::Cluster { peer, .. } => peer.to_string(),
        Origin::Unix { creds: Some(c) } => match c.pid {
            Some(pid) => format!("uid={} pid={pid}", c.uid),
            None => format!("uid={}", c.uid),
        },
        Origin::Unix { creds: None } => "unix".into(),
        Origin::Dialed { addr, .. } => addr.clone(),
        Origin::Internal => "internal".into(),
        Origin::Datagram => "udp".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Clock, Config, Daemon};
    use std::sync::atomic::{AtomicUsize, Ordering};

    impl Split for tokio::io::DuplexStream {
        type Read = tokio::io::ReadHalf<Self>;
        type Write = tokio::io::WriteHalf<Self>;
        fn split(self) -> (Self::Read, Self::Write) {
            tokio::io::split(self)
        }
    }

    /// A listener whose every accept fails the way a process out of file descriptors does.
    struct OutOfFiles {
        kind: ListenerKind,
        calls: Arc<AtomicUsize>,
    }

    impl Accept for OutOfFiles {
        type Io = tokio::io::DuplexStream;

        fn kind(&self) -> ListenerKind {
            self.kind
        }

        async fn accept(&mut self) -> io::Result<(Self::Io, Origin)> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            Err(io::Error::from_raw_os_error(libc::EMFILE))
        }
    }

    async fn bare_daemon(dir: &tempfile::TempDir) -> Daemon {
        let config = format!(
            "server_name = \"n1\"\ndata_dir = {:?}\ntcp_listen = \"\"\n[cluster]\nlisten = \"\"\nudp_listen = \"\"\n[apps]\nenabled = false\n[http]\nlisten = \"\"\n",
            dir.path().display().to_string()
        );
        Daemon::bind_with_clock(Config::from_toml(&config).unwrap(), Clock::tokio()).await.unwrap()
    }

    /// Every listener kind, the TLS one included, backs off on accept errors instead of spinning.
    #[tokio::test(start_paused = true)]
    async fn accept_errors_back_off_on_every_listener_kind() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = bare_daemon(&dir).await;
        let shared = daemon.shared.clone();
        for kind in [ListenerKind::Tcp, ListenerKind::Unix, ListenerKind::Cluster, ListenerKind::Tls] {
            let calls = Arc::new(AtomicUsize::new(0));
            let listener = OutOfFiles { kind, calls: calls.clone() };
            let task = tokio::spawn(serve(listener, shared.clone(), TaskTracker::new()));
            tokio::time::sleep(Duration::from_secs(1)).await;
            let first_second = calls.load(Ordering::Relaxed);
            // Delays double from 10 ms (jittered into their upper half): at most 9 tries in 1 s.
            assert!((3..=10).contains(&first_second), "{kind:?}: {first_second} accepts in the first second");
            tokio::time::sleep(Duration::from_secs(10)).await;
            let later = calls.load(Ordering::Relaxed) - first_second;
            // Capped at 1 s (at least 0.5 s with jitter): at most 20 more in 10 s.
            assert!((5..=21).contains(&later), "{kind:?}: {later} accepts in the next ten seconds");
            let errors = shared.counters.listener(kind).accept_errors.load(Ordering::Relaxed);
            assert_eq!(errors as usize, calls.load(Ordering::Relaxed), "{kind:?}: every error is counted");
            task.abort();
        }
        // The loop ends when the node stops.
        let calls = Arc::new(AtomicUsize::new(0));
        let task =
            tokio::spawn(serve(OutOfFiles { kind: ListenerKind::Tls, calls }, shared.clone(), TaskTracker::new()));
        shared.stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task).await.expect("serve returns on stop").unwrap();
    }
}
