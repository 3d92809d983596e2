//! Shared set-up of the HTTP tests: an engine with a locator (workers get its address as
//! `--locator`), an HTTP listener whose gateway reaches apps through that locator, and a small
//! HTTP/1.1 client over a real socket.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::HeaderMap;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use nodus_engine::manifest::Manifest;
use nodus_engine::profile::Profile;
use nodus_engine::{AppSpec, Engine, EngineConfig, Locator, LocatorConfig};
use nodus_http::{Http, HttpConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Every wait in the tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(30);

pub const WORKER: &str = env!("CARGO_BIN_EXE_nodus-http-worker");

pub async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f).await.unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// An app running the Rust HTTP example worker, heartbeating every 100 ms.
pub fn rust_app(dir: &Path, name: &str, profile: Profile) -> AppSpec {
    let mut manifest = Manifest::new(WORKER);
    manifest.env.insert("NODUS_HEARTBEAT_MS".into(), "100".into());
    AppSpec { name: name.to_string(), dir: dir.to_path_buf(), manifest, profile }
}

/// How the gateway reaches the node's apps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The local engine directly (as the daemon mounts it).
    Engine,
    /// The locator's TCP service (as it reaches apps on other nodes).
    Locator,
}

/// An engine, its locator and an HTTP listener with the gateway, all on 127.0.0.1:0.
pub struct Node {
    pub engine: Engine,
    pub locator: SocketAddr,
    pub http: SocketAddr,
    pub metrics: std::sync::Arc<nodus_http::Metrics>,
    stops: Vec<oneshot::Sender<()>>,
    servers: Vec<JoinHandle<()>>,
    pub dir: tempfile::TempDir,
}

impl Node {
    /// Starts the node; `apps` gets the temporary directory and returns the apps to start.
    /// `path` says how the gateway reaches them.
    pub async fn start(config: HttpConfig, path: Via, apps: impl FnOnce(&Path) -> Vec<AppSpec>) -> Node {
        let dir = tempfile::Builder::new().prefix("nh").tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let locator = listener.local_addr().unwrap();
        let mut ec = EngineConfig::new(dir.path().join("run"));
        ec.locator = locator.to_string();
        ec.kill_grace = Duration::from_millis(500);
        let engine = Engine::new(ec);
        for spec in apps(dir.path()) {
            engine.start(spec).await.unwrap();
        }
        let loc = Locator::from_listener(engine.clone(), LocatorConfig::default(), listener).unwrap();
        let (stop_loc, stopped_loc) = oneshot::channel::<()>();
        let loc_server = tokio::spawn(loc.run(async move {
            let _ = stopped_loc.await;
        }));
        let http_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = http_listener.local_addr().unwrap();
        let local = (path == Via::Engine).then(|| engine.clone());
        let server = Http::new(config, Default::default()).with_gateway(locator.to_string(), local);
        let metrics = server.metrics().clone();
        let (stop_http, stopped_http) = oneshot::channel::<()>();
        let http_server = tokio::spawn(server.serve(http_listener, None, async move {
            let _ = stopped_http.await;
        }));
        Node {
            engine,
            locator,
            http,
            metrics,
            stops: vec![stop_http, stop_loc],
            servers: vec![http_server, loc_server],
            dir,
        }
    }

    /// The HTTP listener's stop signal and task, for tests that stop it alone.
    pub fn take_http_stop(&mut self) -> (oneshot::Sender<()>, JoinHandle<()>) {
        (self.stops.remove(0), self.servers.remove(0))
    }

    pub async fn shutdown(mut self) {
        for (stop, server) in self.stops.drain(..).zip(self.servers.drain(..)) {
            let _ = stop.send(());
            within("server shutdown", server).await.unwrap();
        }
        within("engine shutdown", self.engine.shutdown()).await;
    }
}

/// One HTTP/1.1 connection.
pub struct Conn {
    sender: hyper::client::conn::http1::SendRequest<BoxBody>,
}

pub type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

pub fn full(b: impl Into<Bytes>) -> BoxBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed_unsync()
}

/// A body sent in pieces as they come from `rx` (chunked transfer).
pub fn streamed(rx: tokio::sync::mpsc::Receiver<Bytes>) -> BoxBody {
    let s = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(Frame::data(b)), rx))
    });
    StreamBody::new(s).boxed_unsync()
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> Conn {
        let stream = within("connect", TcpStream::connect(addr)).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Conn { sender }
    }

    pub async fn send(&mut self, req: Request<BoxBody>) -> Response<Incoming> {
        within("ready", self.sender.ready()).await.unwrap();
        within("response head", self.sender.send_request(req)).await.unwrap()
    }
}

/// A whole response.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn collect(resp: Response<Incoming>) -> Reply {
    let (parts, body) = resp.into_parts();
    let body = within("response body", body.collect()).await.expect("whole body").to_bytes();
    Reply { status: parts.status, headers: parts.headers, body }
}

/// `method uri` with `headers` and `body` on a new connection to `addr`.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let mut conn = Conn::open(addr).await;
    let mut b = Request::builder().method(method).uri(uri).header("host", addr.to_string());
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    collect(conn.send(b.body(full(body)).unwrap()).await).await
}

pub async fn get(addr: SocketAddr, uri: &str) -> Reply {
    request(addr, "GET", uri, &[], Bytes::new()).await
}

/// FNV-1a 64, as the example worker hashes bodies.
pub fn fnv1a(bytes: &[u8]) -> String {
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3));
    format!("{h:016x}")
}
