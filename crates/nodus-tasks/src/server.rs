//! The arpcp TCP listener (default `127.0.0.1:7018`): one request per connection, as the
//! reference does it. The client connects, writes one JSON line (`\r\n`, a bare `\n`, or end of
//! stream ends it), reads one answer line; the server then closes. Bytes after the first line
//! are ignored.
//!
//! Bounds (the reference has none): the request line's length (`max_line_bytes`, beyond it 200),
//! the time to send it (`read_timeout`, beyond it 200), connections at once
//! (`max_connections`, beyond it 300 at once), the time to take the answer (`write_timeout`).
//! The protocol has no authentication, so a listener beyond loopback needs an allow-list of
//! client networks; other clients get 300 and are closed.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::api;
use crate::arpcp::{decode_request, Answer, Code};
use crate::executor::Tasks;
use crate::store::Store;

/// A network of allowed clients: an address and a prefix length (`10.0.0.0/8`, `::1/128`; a
/// bare address is one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    /// Whether `ip` is in this network (IPv4 clients seen as IPv4-mapped IPv6 addresses
    /// count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(s: &str) -> Result<Network, String> {
        let bad = || format!("{s:?} is not a network; write ADDRESS/PREFIX (10.0.0.0/8) or one ADDRESS");
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().map_err(|_| bad())?, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s.trim().parse::<IpAddr>().map_err(|_| bad())?, None),
        };
        let addr = canonical(addr);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        Ok(Network { addr, prefix })
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Settings and bounds of the arpcp listener.
#[derive(Debug, Clone)]
pub struct ArpcpConfig {
    /// Client networks allowed besides loopback; required when listening beyond loopback.
    pub allow: Vec<Network>,
    /// Longest request line (default 1 MiB plus room for the other fields).
    pub max_line_bytes: usize,
    /// Longest wait for the request line (default 10 s).
    pub read_timeout: Duration,
    /// Longest wait for the client to take the answer (default 10 s).
    pub write_timeout: Duration,
    /// Connections served at once (default 1024).
    pub max_connections: usize,
}

impl Default for ArpcpConfig {
    fn default() -> Self {
        ArpcpConfig {
            allow: Vec::new(),
            max_line_bytes: (1 << 20) + 4096,
            read_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_connections: 1024,
        }
    }
}

/// Why the listener cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Listening beyond loopback with no allow-list.
    #[error(
        "arpcp has no authentication: listening on {0} needs tasks.arpcp_allow, the client networks allowed (e.g. [\"10.0.0.0/8\"])"
    )]
    NeedsAllowList(SocketAddr),
    /// The socket failed.
    #[error("arpcp listener: {0}")]
    Io(#[from] std::io::Error),
}

/// The arpcp listener of a node.
pub struct ArpcpServer<S: Store> {
    listener: TcpListener,
    tasks: Tasks<S>,
    config: Arc<ArpcpConfig>,
}

impl<S: Store> std::fmt::Debug for ArpcpServer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArpcpServer").field("listener", &self.listener).finish()
    }
}

impl<S: Store> ArpcpServer<S> {
    /// A server on a bound listener.
    ///
    /// # Errors
    /// [`ServerError::NeedsAllowList`] when the listener is not on loopback and `config.allow`
    /// is empty.
    pub fn new(listener: TcpListener, tasks: Tasks<S>, config: ArpcpConfig) -> Result<ArpcpServer<S>, ServerError> {
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() && config.allow.is_empty() {
            return Err(ServerError::NeedsAllowList(addr));
        }
        Ok(ArpcpServer { listener, tasks, config: Arc::new(config) })
    }

    /// The address it listens on.
    ///
    /// # Errors
    /// The socket failed.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then stops accepting and waits for the connections
    /// being served (each bounded by its timeouts).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let limit = self.config.max_connections.max(1);
        let slots = Arc::new(Semaphore::new(limit));
        // Refusals are answered too, at most `limit` at once; beyond that they are just closed.
        let refusals = Arc::new(Semaphore::new(limit));
        tokio::pin!(shutdown);
        let mut failures = nodus_wire::Backoff::new(Duration::from_millis(5), Duration::from_secs(1), rand::random());
        loop {
            let (stream, peer) = tokio::select! {
                _ = &mut shutdown => break,
                r = self.listener.accept() => match r {
                    Ok(c) => {
                        failures.reset();
                        c
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        let delay = failures.next_delay();
                        tracing::warn!(error = %e, ?delay, "arpcp accept failed");
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                },
            };
            let config = self.config.clone();
            let refusal = if !allowed(&config, peer.ip()) {
                tracing::warn!(%peer, "arpcp client outside tasks.arpcp_allow refused");
                Some(format!("connections from {} are not allowed (tasks.arpcp_allow)", peer.ip()))
            } else {
                None
            };
            let permit = match refusal {
                Some(_) => None,
                None => slots.clone().try_acquire_owned().ok(),
            };
            let Some(permit) = permit else {
                let msg = refusal.unwrap_or_else(|| {
                    tracing::warn!(%peer, limit, "arpcp connection limit reached; refusing");
                    format!("too many connections ({limit}, tasks.arpcp_max_connections); retry shortly")
                });
                if let Ok(permit) = refusals.clone().try_acquire_owned() {
                    tokio::spawn(async move {
                        refuse(stream, Answer::error(Code::Internal, msg), config.write_timeout).await;
                        drop(permit);
                    });
                }
                continue;
            };
            let tasks = self.tasks.clone();
            tokio::spawn(async move {
                serve(stream, &tasks, &config).await;
                drop(permit);
            });
        }
        drop(self.listener);
        // Wait for the connections being served: each ends within its own timeouts.
        let _ = slots.acquire_many(u32::try_from(limit).unwrap_or(u32::MAX)).await;
    }
}

fn allowed(config: &ArpcpConfig, ip: IpAddr) -> bool {
    canonical(ip).is_loopback() || config.allow.iter().any(|n| n.contains(ip))
}

/// Answers and closes a connection that will not be served.
async fn refuse(mut stream: TcpStream, answer: Answer, write_timeout: Duration) {
    let mut out = Vec::with_capacity(128);
    answer.encode(&mut out);
    let written = tokio::time::timeout(write_timeout, async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    })
    .await;
    if matches!(written, Ok(Ok(()))) {
        linger(&mut stream).await;
    }
}

/// Lingering close: reads what the client still sends until it closes (at most 1 s), so that
/// closing with unread bytes does not reset the connection before the client read the answer.
async fn linger(stream: &mut TcpStream) {
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// What reading the request line found.
enum Line {
    /// A line (without its ending).
    Request(Vec<u8>),
    /// The client closed without sending anything.
    Nothing,
    /// Longer than the bound.
    TooLong,
}

async fn read_line(stream: &mut TcpStream, max: usize) -> std::io::Result<Line> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 8192];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(if buf.is_empty() { Line::Nothing } else { Line::Request(buf) });
        }
        let searched = buf.len();
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf[searched..].iter().position(|&b| b == b'\n') {
            let mut end = searched + pos;
            if end > 0 && buf[end - 1] == b'\r' {
                end -= 1;
            }
            if end > max {
                return Ok(Line::TooLong);
            }
            buf.truncate(end);
            return Ok(Line::Request(buf));
        }
        if buf.len() > max {
            return Ok(Line::TooLong);
        }
    }
}

async fn serve<S: Store>(mut stream: TcpStream, tasks: &Tasks<S>, config: &ArpcpConfig) {
    let _ = stream.set_nodelay(true);
    let read = tokio::time::timeout(config.read_timeout, read_line(&mut stream, config.max_line_bytes)).await;
    let answer = match read {
        Err(_) => Answer::error(
            Code::Malformed,
            format!("no complete request line within {} s", config.read_timeout.as_secs_f32()),
        ),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "arpcp connection failed while reading");
            return;
        }
        Ok(Ok(Line::Nothing)) => return,
        Ok(Ok(Line::TooLong)) => Answer::error(
            Code::Malformed,
            format!("the request line is longer than {} bytes (tasks.arpcp_max_line_bytes)", config.max_line_bytes),
        ),
        Ok(Ok(Line::Request(line))) => match decode_request(&line) {
            Ok(req) => api::answer(tasks, req).await,
            Err(refusal) => refusal,
        },
    };
    let mut out = Vec::with_capacity(256);
    answer.encode(&mut out);
    let written = tokio::time::timeout(config.write_timeout, async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    })
    .await;
    if matches!(written, Ok(Ok(()))) {
        linger(&mut stream).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_parse_and_contain() {
        let n: Network = "10.1.0.0/16".parse().unwrap();
        assert!(n.contains("10.1.200.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.0.9".parse().unwrap()), "IPv4-mapped clients are IPv4");
        assert!(!n.contains("fd00::1".parse().unwrap()));
        let host: Network = "192.168.1.5".parse().unwrap();
        assert_eq!(host.to_string(), "192.168.1.5/32");
        assert!(host.contains("192.168.1.5".parse().unwrap()) && !host.contains("192.168.1.6".parse().unwrap()));
        let v6: Network = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::7".parse().unwrap()) && !v6.contains("fe80::1".parse().unwrap()));
        let all: Network = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        for bad in ["10.0.0.0/33", "nope", "10.0.0/8", "::/129", ""] {
            assert!(bad.parse::<Network>().is_err(), "{bad}");
        }
        let config = ArpcpConfig { allow: vec![n], ..ArpcpConfig::default() };
        assert!(allowed(&config, "127.0.0.1".parse().unwrap()) && allowed(&config, "::1".parse().unwrap()));
        assert!(allowed(&config, "10.1.2.3".parse().unwrap()) && !allowed(&config, "10.9.2.3".parse().unwrap()));
    }
}
