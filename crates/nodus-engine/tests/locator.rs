//! The locator and app services over real TCP, with the Rust example workers and a raw
//! MessagePack client speaking Cocaine's service protocol byte for byte.
//!
//! Tests wait on answers (with a timeout), never on sleeps.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use nodus_engine::profile::Profile;
use nodus_engine::protocol::{Decoder, Frame, Role, DEFAULT_MAX_MESSAGE_BYTES};
use nodus_engine::service::errors;
use nodus_engine::{Directory, Engine, EngineEvent, Locator, LocatorConfig, LocatorHandle};
use rmpv::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

mod common;

use common::engine_with_apps;

const WAIT: Duration = Duration::from_secs(15);

struct Node {
    engine: Engine,
    addr: SocketAddr,
    handle: LocatorHandle,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

async fn node(apps: &[(&str, Profile)], config: LocatorConfig) -> Node {
    let (engine, listener, addr, dir) = engine_with_apps("nl", apps).await;
    let locator = Locator::from_listener(engine.clone(), config, listener).unwrap();
    let handle = locator.handle();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(locator.run(async move {
        let _ = stopped.await;
    }));
    Node { engine, addr, handle, stop: Some(stop), server, _dir: dir }
}

impl Node {
    async fn shutdown(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        within("locator shutdown", &mut self.server).await.unwrap();
        within("engine shutdown", self.engine.shutdown()).await;
    }
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f).await.unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// A raw service client.
struct Client {
    stream: TcpStream,
    buf: BytesMut,
    decoder: Decoder,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let stream = within("connect", TcpStream::connect(addr)).await.unwrap();
        Client { stream, buf: BytesMut::new(), decoder: Decoder::new(Role::Engine, DEFAULT_MAX_MESSAGE_BYTES) }
    }

    async fn send(&mut self, channel: u64, kind: u64, args: Vec<Value>) {
        // With an empty header list, as the Python framework sends.
        let v = Value::Array(vec![channel.into(), kind.into(), Value::Array(args), Value::Array(vec![])]);
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &v).unwrap();
        self.stream.write_all(&out).await.unwrap();
    }

    async fn recv(&mut self) -> Frame {
        within("a frame from the service", async {
            loop {
                if let Some(f) = self.decoder.decode_frame(&mut self.buf).unwrap() {
                    return f;
                }
                let n = self.stream.read_buf(&mut self.buf).await.unwrap();
                assert!(n > 0, "service closed the connection");
            }
        })
        .await
    }

    /// Reads until the connection closes; true if it did.
    async fn closed(&mut self) -> bool {
        within("connection close", async {
            loop {
                if self.decoder.decode_frame(&mut self.buf).unwrap().is_some() {
                    continue;
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => {}
                }
            }
        })
        .await
    }

    /// Resolves `name` on channel `channel`: the endpoint, or the error's (category, code).
    async fn resolve(&mut self, channel: u64, name: &str) -> Result<(Value, Value), (i64, i64)> {
        self.send(channel, 0, vec![Value::from(name)]).await;
        let f = self.recv().await;
        assert_eq!(f.channel, channel);
        match f.kind {
            0 => {
                assert_eq!(f.args.len(), 3, "{:?}", f.args);
                assert_eq!(f.args[1].as_u64(), Some(1), "version");
                Ok((f.args[0].clone(), f.args[2].clone()))
            }
            1 => Err(error_of(&f)),
            k => panic!("unexpected answer type {k}"),
        }
    }
}

fn error_of(f: &Frame) -> (i64, i64) {
    assert_eq!(f.kind, 1, "not an error: {f:?}");
    let pair = f.args[0].as_array().unwrap();
    (pair[0].as_i64().unwrap(), pair[1].as_i64().unwrap())
}

fn endpoint(endpoints: &Value) -> SocketAddr {
    let e = &endpoints.as_array().unwrap()[0];
    let host = e[0].as_str().unwrap();
    let port = e[1].as_u64().unwrap();
    format!("{host}:{port}").parse().unwrap()
}

async fn app_client(node: &Node, app: &str) -> Client {
    let mut loc = Client::connect(node.addr).await;
    let (endpoints, graph) = loc.resolve(1, app).await.unwrap();
    assert_eq!(graph.to_string(), expected_app_graph());
    Client::connect(endpoint(&endpoints)).await
}

fn expected_app_graph() -> String {
    let stream = r#"{0: ["write", nil], 1: ["error", {}], 2: ["close", {}]}"#;
    let info = r#"["info", {}, {0: ["value", {}], 1: ["error", {}]}]"#;
    let control = r#"["control", {0: ["chunk", nil]}, {}]"#;
    format!(r#"{{0: ["enqueue", {stream}, {stream}], 1: {info}, 2: {control}}}"#)
}

fn profile() -> Profile {
    Profile { heartbeat_timeout: Duration::from_secs(5), ..Profile::default() }
}

/// Collects `write` chunks until `close` (Ok) or `error` (Err).
async fn collect(c: &mut Client, channel: u64) -> Result<Vec<String>, (i64, i64)> {
    let mut got = Vec::new();
    loop {
        let f = c.recv().await;
        assert_eq!(f.channel, channel);
        match f.kind {
            0 => got.push(String::from_utf8(f.args[0].as_slice().unwrap().to_vec()).unwrap()),
            1 => return Err(error_of(&f)),
            2 => return Ok(got),
            k => panic!("unexpected type {k}"),
        }
    }
}

#[tokio::test]
async fn locator_resolves_apps_itself_and_refuses_unknown_names() {
    let node = node(&[("echo", profile())], LocatorConfig::default()).await;
    let mut c = Client::connect(node.addr).await;
    let (endpoints, graph) = c.resolve(1, "locator").await.unwrap();
    assert_eq!(endpoint(&endpoints), node.addr);
    assert_eq!(graph.to_string(), r#"{0: ["resolve", {}, {0: ["value", {}], 1: ["error", {}]}]}"#);
    assert_eq!(c.resolve(2, "nope").await, Err((errors::LOCATOR, errors::SERVICE_NOT_AVAILABLE)));
    let (first, _) = c.resolve(3, "echo").await.unwrap();
    let (again, _) = c.resolve(4, "echo").await.unwrap();
    assert_eq!(first, again, "one listener per app");
    assert_ne!(endpoint(&first), node.addr);
    // An unknown method and a missing argument are answered with errors; the connection stays.
    c.send(5, 9, vec![]).await;
    assert_eq!(error_of(&c.recv().await), (errors::DISPATCH, errors::UNKNOWN_METHOD));
    c.send(6, 0, vec![]).await;
    assert_eq!(error_of(&c.recv().await), (errors::DISPATCH, errors::INVALID_ARGUMENT));
    assert!(c.resolve(7, "echo").await.is_ok());
    node.shutdown().await;
}

#[tokio::test]
async fn enqueue_streams_chunks_both_ways_and_reports_worker_errors() {
    let node = node(&[("echo", profile())], LocatorConfig::default()).await;
    let mut c = app_client(&node, "echo").await;

    c.send(1, 0, vec![Value::from("echo")]).await;
    c.send(1, 0, vec![Value::from("hello")]).await;
    c.send(1, 0, vec![Value::Binary(b"world".to_vec())]).await;
    c.send(1, 2, vec![]).await;
    assert_eq!(collect(&mut c, 1).await.unwrap(), ["hello", "world"]);

    c.send(2, 0, vec![Value::from("chunks")]).await;
    c.send(2, 0, vec![Value::from("3")]).await;
    c.send(2, 2, vec![]).await;
    assert_eq!(collect(&mut c, 2).await.unwrap(), ["0", "1", "2"]);

    // A handler error comes back with the worker's category and code.
    c.send(3, 0, vec![Value::from("fail")]).await;
    c.send(3, 2, vec![]).await;
    assert_eq!(collect(&mut c, 3).await, Err((nodus_engine::category::APPLICATION, 1)));

    // A worker crash mid-session is an engine error the client may retry on.
    c.send(4, 0, vec![Value::from("crash")]).await;
    c.send(4, 0, vec![Value::from("x")]).await;
    assert_eq!(collect(&mut c, 4).await, Err((errors::APP, errors::WORKER_FAILED)));

    // Two sessions interleaved on one connection stay apart.
    c.send(5, 0, vec![Value::from("echo")]).await;
    c.send(6, 0, vec![Value::from("echo")]).await;
    c.send(6, 0, vec![Value::from("six")]).await;
    c.send(5, 0, vec![Value::from("five")]).await;
    c.send(5, 2, vec![]).await;
    c.send(6, 2, vec![]).await;
    let mut five = Vec::new();
    let mut six = Vec::new();
    let mut closed = 0;
    while closed < 2 {
        let f = c.recv().await;
        match (f.channel, f.kind) {
            (5, 0) => five.push(f.args[0].clone()),
            (6, 0) => six.push(f.args[0].clone()),
            (5 | 6, 2) => closed += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(five, [Value::Binary(b"five".to_vec())]);
    assert_eq!(six, [Value::Binary(b"six".to_vec())]);

    // info answers a map describing the app.
    c.send(7, 1, vec![]).await;
    let f = c.recv().await;
    assert_eq!((f.channel, f.kind), (7, 0));
    let info = &f.args[0];
    let get = |k: &str| info.as_map().unwrap().iter().find(|(key, _)| key.as_str() == Some(k)).map(|(_, v)| v.clone());
    assert_eq!(get("app"), Some(Value::from("echo")));
    assert_eq!(get("state"), Some(Value::from("running")));
    node.shutdown().await;
}

#[tokio::test]
async fn a_full_queue_is_a_distinct_retryable_error() {
    // One worker, one session at a time, one request may wait: a third concurrent one is refused.
    let tight = Profile { pool_limit: 1, concurrency: 1, queue_limit: 1, ..profile() };
    let node = node(&[("tight", tight)], LocatorConfig::default()).await;
    let mut c = app_client(&node, "tight").await;
    c.send(1, 0, vec![Value::from("echo")]).await;
    c.send(1, 0, vec![Value::from("ping")]).await;
    let f = c.recv().await;
    assert_eq!((f.channel, f.kind), (1, 0), "the first session is running");
    c.send(2, 0, vec![Value::from("echo")]).await;
    c.send(2, 0, vec![Value::from("queued")]).await;
    c.send(3, 0, vec![Value::from("echo")]).await;
    assert_eq!(collect(&mut c, 3).await, Err((errors::APP, errors::QUEUE_FULL)));
    // Once the first session ends, the queued one runs, and a retry is taken.
    c.send(1, 2, vec![]).await;
    assert_eq!(collect(&mut c, 1).await.unwrap(), Vec::<String>::new());
    c.send(2, 2, vec![]).await;
    assert_eq!(collect(&mut c, 2).await.unwrap(), ["queued"]);
    c.send(4, 0, vec![Value::from("echo")]).await;
    c.send(4, 0, vec![Value::from("retry")]).await;
    c.send(4, 2, vec![]).await;
    assert_eq!(collect(&mut c, 4).await.unwrap(), ["retry"]);
    node.shutdown().await;
}

#[tokio::test]
async fn channels_per_connection_are_bounded() {
    let config = LocatorConfig { max_channels: 2, ..LocatorConfig::default() };
    let node = node(&[("echo", profile())], config).await;
    let mut c = app_client(&node, "echo").await;
    c.send(1, 0, vec![Value::from("echo")]).await;
    c.send(2, 0, vec![Value::from("echo")]).await;
    c.send(3, 0, vec![Value::from("echo")]).await;
    let f = c.recv().await;
    assert_eq!(f.channel, 3);
    assert_eq!(error_of(&f), (errors::DISPATCH, errors::TOO_MANY_CHANNELS));
    c.send(1, 2, vec![]).await;
    assert_eq!(collect(&mut c, 1).await.unwrap(), Vec::<String>::new());
    c.send(2, 2, vec![]).await;
    assert_eq!(collect(&mut c, 2).await.unwrap(), Vec::<String>::new());
    node.shutdown().await;
}

#[tokio::test]
async fn garbage_closes_only_that_connection() {
    let node = node(&[("echo", profile())], LocatorConfig::default()).await;
    let mut bad = Client::connect(node.addr).await;
    bad.stream.write_all(&[0xc1, 0xc1, 0xc1]).await.unwrap();
    assert!(bad.closed().await);
    let mut good = Client::connect(node.addr).await;
    assert!(good.resolve(1, "echo").await.is_ok());
    node.shutdown().await;
}

#[tokio::test]
async fn shutdown_lets_open_sessions_finish_and_refuses_new_ones() {
    let node = node(&[("echo", profile())], LocatorConfig::default()).await;
    let mut c = app_client(&node, "echo").await;
    let mut idle = Client::connect(node.addr).await;
    c.send(1, 0, vec![Value::from("echo")]).await;
    c.send(1, 0, vec![Value::from("a")]).await;
    assert_eq!(c.recv().await.kind, 0);

    let Node { engine, stop, server, _dir, .. } = node;
    stop.unwrap().send(()).unwrap();
    // The idle connection is closed at once; the open session goes on.
    assert!(idle.closed().await);
    c.send(2, 0, vec![Value::from("echo")]).await;
    assert_eq!(collect(&mut c, 2).await, Err((errors::DISPATCH, errors::SHUTTING_DOWN)));
    c.send(1, 0, vec![Value::from("b")]).await;
    c.send(1, 2, vec![]).await;
    assert_eq!(collect(&mut c, 1).await.unwrap(), ["b"]);
    // With its last channel done, the connection closes and the locator returns.
    assert!(c.closed().await);
    within("locator shutdown", server).await.unwrap();
    within("engine shutdown", engine.shutdown()).await;
}

#[tokio::test]
async fn shutdown_grace_bounds_a_session_that_never_ends() {
    let config = LocatorConfig { shutdown_grace: Duration::from_millis(200), ..LocatorConfig::default() };
    let node = node(&[("echo", profile())], config).await;
    let mut c = app_client(&node, "echo").await;
    c.send(1, 0, vec![Value::from("echo")]).await;
    c.send(1, 0, vec![Value::from("a")]).await;
    assert_eq!(c.recv().await.kind, 0);
    // The client never closes its side; the grace period ends the connection.
    let Node { engine, stop, server, _dir, .. } = node;
    stop.unwrap().send(()).unwrap();
    within("locator shutdown", server).await.unwrap();
    assert!(c.closed().await);
    within("engine shutdown", engine.shutdown()).await;
}

#[tokio::test]
async fn a_client_that_does_not_read_is_cut_off() {
    let config = LocatorConfig { outbound_messages: 4, ..LocatorConfig::default() };
    let node = node(&[("echo", profile())], config).await;
    let mut c = app_client(&node, "echo").await;
    c.send(1, 0, vec![Value::from("echo")]).await;
    // Echoed chunks pile up once the socket buffers are full, since this client never reads:
    // the connection is closed instead of buffering without bound.
    let chunk = Value::Binary(vec![b'x'; 16 * 1024]);
    let mut frame = Vec::new();
    rmpv::encode::write_value(&mut frame, &Value::Array(vec![1.into(), 0.into(), Value::Array(vec![chunk])])).unwrap();
    within("the slow client is cut off", async {
        for _ in 0..8192 {
            if c.stream.write_all(&frame).await.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(c.closed().await, "the connection stayed open");
    // The node still serves others.
    let mut other = Client::connect(node.addr).await;
    assert!(other.resolve(1, "echo").await.is_ok());
    node.shutdown().await;
}

#[tokio::test]
async fn control_keeps_the_asked_population_of_workers_running() {
    let node = node(&[("pop", Profile { pool_limit: 3, ..profile() })], LocatorConfig::default()).await;
    let mut events = node.engine.events();
    let mut c = app_client(&node, "pop").await;
    // control(), then chunk(2): two workers start with no request.
    c.send(1, 2, vec![]).await;
    c.send(1, 0, vec![Value::from(2)]).await;
    let mut ready = 0;
    within("two workers ready", async {
        while ready < 2 {
            if let Ok(EngineEvent::Ready { app, .. }) = events.recv().await {
                assert_eq!(app, "pop");
                ready += 1;
            }
        }
    })
    .await;
    let info = node.engine.info("pop").await.unwrap();
    assert_eq!((info.population, info.workers.len()), (2, 2));
    // `info` reports it.
    c.send(2, 1, vec![]).await;
    let f = c.recv().await;
    assert_eq!((f.channel, f.kind), (2, 0));
    let population = f.args[0].as_map().unwrap().iter().find(|(k, _)| k.as_str() == Some("population"));
    assert_eq!(population.map(|(_, v)| v.as_u64()), Some(Some(2)));
    // A negative count is refused on the channel, which stays usable.
    c.send(1, 0, vec![Value::from(-1)]).await;
    assert_eq!(error_of(&c.recv().await), (errors::DISPATCH, errors::INVALID_ARGUMENT));
    // The connection's requests reach the app in order: an info after chunk(0) sees it.
    c.send(1, 0, vec![Value::from(0)]).await;
    c.send(3, 1, vec![]).await;
    let f = c.recv().await;
    let population = f.args[0].as_map().unwrap().iter().find(|(k, _)| k.as_str() == Some("population"));
    assert_eq!(population.map(|(_, v)| v.as_u64()), Some(Some(0)));
    node.shutdown().await;
}

/// A directory that knows one app on another node.
struct Elsewhere;

impl Directory for Elsewhere {
    fn lookup(&self, app: &str) -> Vec<(String, u16)> {
        match app {
            "remote" => vec![("10.0.0.2".into(), 4100), ("10.0.0.3".into(), 4200)],
            _ => Vec::new(),
        }
    }
}

#[tokio::test]
async fn names_not_served_here_are_resolved_through_the_directory() {
    let node = node(&[("echo", profile())], LocatorConfig::default()).await;
    // The owner opens an app's endpoint before anyone resolves it (to publish it), and resolve
    // answers the same one.
    let (host, port) = node.handle.endpoint("echo").unwrap().unwrap();
    assert!(node.handle.endpoint("nope").is_none());
    let mut c = Client::connect(node.addr).await;
    let (endpoints, _) = c.resolve(1, "echo").await.unwrap();
    assert_eq!(endpoint(&endpoints), format!("{host}:{port}").parse().unwrap());
    // Without a directory, a name this node does not serve is unknown; with one, it is found.
    assert_eq!(c.resolve(2, "remote").await, Err((errors::LOCATOR, errors::SERVICE_NOT_AVAILABLE)));
    node.handle.set_directory(std::sync::Arc::new(Elsewhere));
    let (endpoints, graph) = c.resolve(3, "remote").await.unwrap();
    assert_eq!(endpoints.to_string(), r#"[["10.0.0.2", 4100], ["10.0.0.3", 4200]]"#);
    assert_eq!(graph.to_string(), expected_app_graph());
    assert_eq!(c.resolve(4, "nope").await, Err((errors::LOCATOR, errors::SERVICE_NOT_AVAILABLE)));
    // A local app wins over the directory.
    let (endpoints, _) = c.resolve(5, "echo").await.unwrap();
    assert_eq!(endpoint(&endpoints).port(), port);
    node.shutdown().await;
}

#[tokio::test]
async fn each_listener_has_its_own_connection_limit() {
    // One limit once covered the locator and every app: idle connections to one app's endpoint
    // locked every client out of the locator and of the other apps.
    let config = LocatorConfig { max_connections: 2, max_app_connections: 2, ..LocatorConfig::default() };
    let node = node(&[("echo", profile()), ("other", profile())], config).await;
    let mut loc = Client::connect(node.addr).await;
    let echo = endpoint(&loc.resolve(1, "echo").await.unwrap().0);
    let other = endpoint(&loc.resolve(2, "other").await.unwrap().0);
    let mut idle = Vec::new();
    for _ in 0..2 {
        let mut c = Client::connect(echo).await;
        // Admitted: it is answered.
        c.send(1, 1, vec![]).await;
        assert_eq!(c.recv().await.kind, 0);
        idle.push(c);
    }
    let mut third = Client::connect(echo).await;
    assert!(third.closed().await, "echo's listener holds at most 2 connections");
    assert!(loc.resolve(3, "echo").await.is_ok(), "the locator still answers");
    let mut c = Client::connect(other).await;
    c.send(1, 0, vec![Value::from("echo")]).await;
    c.send(1, 0, vec![Value::from("still served")]).await;
    c.send(1, 2, vec![]).await;
    assert_eq!(collect(&mut c, 1).await.unwrap(), ["still served"]);
    // The locator's own listener is bounded too.
    let mut second = Client::connect(node.addr).await;
    assert!(second.resolve(1, "other").await.is_ok());
    let mut over = Client::connect(node.addr).await;
    assert!(over.closed().await, "the locator's listener holds at most 2 connections");
    drop((idle, loc, c, second));
    node.shutdown().await;
}
