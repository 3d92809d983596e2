//! The client SDK against a real engine, locator and echo workers: resolve, call, streams,
//! errors, and a client that keeps working while apps and the locator restart.
//!
//! Tests wait on answers (with a timeout), never on sleeps.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use bytes::BytesMut;
use nodus_engine::client::{AppClient, AppClientConfig, AppClientError, Backoff};
use nodus_engine::profile::Profile;
use nodus_engine::protocol::{Decoder, Frame, Role, DEFAULT_MAX_MESSAGE_BYTES};
use nodus_engine::service::errors;
use nodus_engine::{category, Engine, Locator, LocatorConfig};
use rmpv::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(20);
mod common;

use common::{echo_spec as spec, engine_with_apps};

struct Node {
    engine: Engine,
    addr: SocketAddr,
    locator: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
    dir: tempfile::TempDir,
}

async fn node(apps: &[(&str, Profile)]) -> Node {
    let (engine, listener, addr, dir) = engine_with_apps("nc", apps).await;
    let mut node = Node { engine, addr, locator: None, dir };
    node.serve(listener);
    node
}

impl Node {
    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let locator = Locator::from_listener(self.engine.clone(), LocatorConfig::default(), listener).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(locator.run(async move {
            let _ = stopped.await;
        }));
        self.locator = Some((stop, server));
    }

    /// Stops the locator: its app listeners close and its connections are cut.
    async fn stop_locator(&mut self) {
        let (stop, server) = self.locator.take().unwrap();
        stop.send(()).unwrap();
        within("locator shutdown", server).await.unwrap();
    }

    /// Serves a new locator on the same address (every app gets a new listener).
    async fn start_locator(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    fn client(&self) -> AppClient {
        let options = AppClientConfig {
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(200),
            retry_budget: Duration::from_secs(15),
            call_timeout: WAIT,
            ..AppClientConfig::default()
        };
        AppClient::with_config(self.addr.to_string(), options)
    }

    async fn shutdown(mut self) {
        if self.locator.is_some() {
            self.stop_locator().await;
        }
        within("engine shutdown", self.engine.shutdown()).await;
    }
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f).await.unwrap_or_else(|_| panic!("timed out: {what}"))
}

fn profile() -> Profile {
    Profile { heartbeat_timeout: Duration::from_secs(5), ..Profile::default() }
}

fn texts(chunks: &[Bytes]) -> Vec<String> {
    chunks.iter().map(|c| String::from_utf8(c.to_vec()).unwrap()).collect()
}

#[test]
fn backoff_grows_with_jitter_within_bounds() {
    let (min, max) = (Duration::from_millis(10), Duration::from_millis(100));
    let mut a = Backoff::new(min, max, 7);
    let mut b = Backoff::new(min, max, 7);
    let delays: Vec<Duration> = (0..8).map(|_| a.next_delay()).collect();
    assert_eq!(delays, (0..8).map(|_| b.next_delay()).collect::<Vec<_>>(), "same seed, same delays");
    for (i, d) in delays.iter().enumerate() {
        let base = (min * 2u32.pow(i as u32)).min(max);
        assert!(*d >= base / 2 && *d <= base, "attempt {i}: {d:?} not in [{:?}, {base:?}]", base / 2);
    }
    assert!(delays[7] >= max / 2, "capped at max");
}

#[tokio::test(start_paused = true)]
async fn the_retry_budget_runs_on_the_runtimes_clock() {
    // The budget was once measured with the std clock while retries slept on tokio's: with
    // paused time the budget never ran out and the call ended in its timeout instead.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let options = AppClientConfig {
        retry_budget: Duration::from_secs(3),
        connect_timeout: Duration::from_millis(100),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        call_timeout: Duration::from_secs(600),
        ..AppClientConfig::default()
    };
    let client = AppClient::with_config(closed.to_string(), options);
    let started = tokio::time::Instant::now();
    let e = client.service("echo").call("echo", ["x"]).await.unwrap_err();
    let AppClientError::RetriesExhausted { attempts, elapsed, last } = &e else { panic!("{e}") };
    assert!(*elapsed <= Duration::from_secs(3) && started.elapsed() <= Duration::from_secs(3), "{e}");
    assert!(*attempts > 3, "{e}");
    assert!(matches!(**last, AppClientError::Unreachable { .. }), "{e}");
}

#[test]
fn service_errors_map_to_variants() {
    let e = AppClientError::from_service(errors::APP, errors::QUEUE_FULL, "full".into());
    assert_eq!(e, AppClientError::QueueFull { message: "full".into() });
    assert!(e.is_retryable());
    let stopped = AppClientError::from_service(errors::APP, errors::APP_STOPPED, "stopped".into());
    assert!(matches!(stopped, AppClientError::Unavailable { .. }) && stopped.is_retryable());
    let worker = AppClientError::from_service(errors::APP, errors::WORKER_FAILED, "crash".into());
    assert!(matches!(worker, AppClientError::Service { .. }) && !worker.is_retryable());
    assert!(!AppClientError::Disconnected { request_sent: true }.is_retryable());
    assert!(AppClientError::Disconnected { request_sent: false }.is_retryable());
    let exhausted =
        AppClientError::RetriesExhausted { attempts: 3, elapsed: Duration::ZERO, last: Box::new(e.clone()) };
    assert_eq!(exhausted.root(), &e);
    assert!(!exhausted.is_retryable());
}

#[tokio::test]
async fn resolves_apps_and_reports_unknown_services() {
    let node = node(&[("echo", profile())]).await;
    let client = node.client();
    let eps = within("resolve", client.resolve("echo")).await.unwrap();
    assert_eq!(eps.endpoints.len(), 1);
    assert_eq!(eps.endpoints[0].0, "127.0.0.1");
    assert_ne!(eps.endpoints[0].1, node.addr.port());
    assert_eq!(eps.version, 1);
    assert!(eps.graph.to_string().contains("enqueue"), "{}", eps.graph);

    let missing = within("resolve", client.resolve("nope")).await.unwrap_err();
    assert!(matches!(&missing, AppClientError::NotFound { name, .. } if name == "nope"), "{missing:?}");
    // A handle on an unknown service fails at once, without spending the retry budget.
    let err = within("call", client.service("nope").call("echo", ["x"])).await.unwrap_err();
    assert!(matches!(err, AppClientError::NotFound { .. }), "{err:?}");
    assert!(!err.is_retryable());

    // A locator that is not there is unreachable (and retryable).
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gone = AppClient::new(closed.local_addr().unwrap().to_string());
    drop(closed);
    let err = within("resolve", gone.resolve("echo")).await.unwrap_err();
    assert!(matches!(err, AppClientError::Unreachable { .. }) && err.is_retryable(), "{err:?}");
    node.shutdown().await;
}

#[tokio::test]
async fn call_echoes_and_surfaces_worker_errors() {
    let node = node(&[("echo", profile())]).await;
    let echo = node.client().service("echo");
    let reply = within("call", echo.call("echo", ["hello", "world"])).await.unwrap();
    assert_eq!(texts(&reply), ["hello", "world"]);
    let reply = within("call", echo.call("chunks", ["3"])).await.unwrap();
    assert_eq!(texts(&reply), ["0", "1", "2"]);
    let none: [&str; 0] = [];
    let err = within("call", echo.call("fail", none)).await.unwrap_err();
    assert!(
        matches!(err, AppClientError::Service { category: c, code: 1, .. } if c == category::APPLICATION),
        "{err:?}"
    );
    // A worker that crashes mid-request may have run it: the error is final, never retried.
    let err = within("call", echo.call("crash", ["x"])).await.unwrap_err();
    assert!(
        matches!(err, AppClientError::Service { category: errors::APP, code: errors::WORKER_FAILED, .. }),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    // Every call went over the one kept connection.
    assert_eq!(within("call", echo.call("echo", ["again"])).await.unwrap(), ["again"]);
    assert_eq!(echo.connections_opened(), 1);
    node.shutdown().await;
}

#[tokio::test]
async fn streams_many_chunks_both_ways() {
    let node = node(&[("echo", profile())]).await;
    let echo = node.client().service("echo");
    let stream = within("enqueue", echo.enqueue("echo")).await.unwrap();
    let (mut tx, mut rx) = stream.split();
    const N: usize = 5000;
    let sender = tokio::spawn(async move {
        for i in 0..N {
            tx.send(format!("chunk-{i}")).await.unwrap();
        }
        tx.close().await.unwrap();
    });
    let got = within("all chunks", async {
        let mut got = Vec::new();
        while let Some(chunk) = rx.recv().await.unwrap() {
            got.push(chunk);
        }
        got
    })
    .await;
    within("sender", sender).await.unwrap();
    assert_eq!(got.len(), N);
    for (i, chunk) in got.iter().enumerate() {
        assert_eq!(chunk, format!("chunk-{i}").as_bytes());
    }
    // After the close, recv keeps answering the end.
    assert_eq!(rx.recv().await, Ok(None));
    node.shutdown().await;
}

#[tokio::test]
async fn concurrent_streams_share_one_connection() {
    let node = node(&[("echo", profile())]).await;
    let echo = node.client().service("echo");
    let calls: Vec<_> = (0..32)
        .map(|i| {
            let echo = echo.clone();
            tokio::spawn(async move {
                let reply = echo.call("echo", [format!("{i}-a"), format!("{i}-b")]).await.unwrap();
                assert_eq!(texts(&reply), [format!("{i}-a"), format!("{i}-b")]);
            })
        })
        .collect();
    within("concurrent calls", async {
        for c in calls {
            c.await.unwrap();
        }
    })
    .await;
    // Interleaved streams opened by hand stay apart too.
    let mut a = echo.enqueue("echo").await.unwrap();
    let mut b = echo.enqueue("echo").await.unwrap();
    assert!(b.channel() > a.channel());
    b.send("bee").await.unwrap();
    a.send("ay").await.unwrap();
    b.close().await.unwrap();
    a.close().await.unwrap();
    assert_eq!(within("b", b.recv()).await.unwrap().unwrap(), "bee");
    assert_eq!(within("a", a.recv()).await.unwrap().unwrap(), "ay");
    assert_eq!(within("a end", a.recv()).await, Ok(None));
    assert_eq!(within("b end", b.recv()).await, Ok(None));
    assert_eq!(echo.connections_opened(), 1);
    node.shutdown().await;
}

#[tokio::test]
async fn a_full_queue_is_retryable_and_call_retries_it() {
    // One worker, one session at a time, one request may wait: a third concurrent one is refused.
    let tight = Profile { pool_limit: 1, concurrency: 1, queue_limit: 1, ..profile() };
    let node = node(&[("tight", tight)]).await;
    let svc = node.client().service("tight");
    let mut running = svc.enqueue("echo").await.unwrap();
    running.send("ping").await.unwrap();
    assert_eq!(within("first reply", running.recv()).await.unwrap().unwrap(), "ping");
    let mut queued = svc.enqueue("echo").await.unwrap();
    queued.send("queued").await.unwrap();
    let mut refused = svc.enqueue("echo").await.unwrap();
    let err = within("refusal", refused.recv()).await.unwrap_err();
    assert!(matches!(err, AppClientError::QueueFull { .. }), "{err:?}");
    assert!(err.is_retryable());

    // A call made while the queue is full is retried until the queue has room.
    let retried = tokio::spawn({
        let svc = svc.clone();
        async move { svc.call("echo", ["retry"]).await }
    });
    running.close().await.unwrap();
    assert_eq!(within("first end", running.recv()).await, Ok(None));
    queued.close().await.unwrap();
    assert_eq!(within("queued reply", queued.recv()).await.unwrap().unwrap(), "queued");
    assert_eq!(within("queued end", queued.recv()).await, Ok(None));
    assert_eq!(texts(&within("retried call", retried).await.unwrap().unwrap()), ["retry"]);
    node.shutdown().await;
}

#[tokio::test]
async fn client_keeps_working_across_app_and_locator_restarts() {
    let mut node = node(&[("echo", profile())]).await;
    let client = node.client();
    let echo = client.service("echo");
    assert_eq!(within("call", echo.call("echo", ["one"])).await.unwrap(), ["one"]);
    let first_port = client.resolve("echo").await.unwrap().endpoints[0].1;
    let first_pid = node.engine.info("echo").await.unwrap().workers[0].pid;

    // The app restarts: its workers go away and new ones come; the connection stays.
    within("stop", node.engine.stop("echo")).await.unwrap();
    within("start", node.engine.start(spec(node.dir.path(), "echo", profile()))).await.unwrap();
    assert_eq!(within("call after app restart", echo.call("echo", ["two"])).await.unwrap(), ["two"]);
    assert_ne!(node.engine.info("echo").await.unwrap().workers[0].pid, first_pid, "a new worker served it");
    assert_eq!(echo.connections_opened(), 1);

    // The node's locator restarts and the app restarts: the old connection is cut, the old
    // endpoint is gone, and the app is served on a new port. The same handle re-resolves.
    // (Not `remove` + `start`: the removed app's actor deletes the worker socket path when it
    // exits, which can race with the new app binding the same path.)
    node.stop_locator().await;
    within("stop", node.engine.stop("echo")).await.unwrap();
    within("start", node.engine.start(spec(node.dir.path(), "echo", profile()))).await.unwrap();
    node.start_locator().await;
    assert_eq!(within("call after node restart", echo.call("echo", ["three"])).await.unwrap(), ["three"]);
    assert_eq!(echo.connections_opened(), 2);
    let second_port = client.resolve("echo").await.unwrap().endpoints[0].1;
    assert_ne!(second_port, first_port, "the app moved to a new port");

    // A call made while the locator is down waits (within the retry budget) for it to return.
    node.stop_locator().await;
    let waiting = tokio::spawn({
        let echo = echo.clone();
        async move { echo.call("echo", ["four"]).await }
    });
    node.start_locator().await;
    assert_eq!(within("call across the outage", waiting).await.unwrap().unwrap(), ["four"]);
    assert_eq!(echo.connections_opened(), 3);
    node.shutdown().await;
}

/// How the scripted service treats one connection.
#[derive(Debug, Clone, Copy)]
enum Script {
    /// Answers one `enqueue` with the chunk `reply` and a close, then closes the connection.
    AnswerThenHangUp(&'static str),
    /// Reads the first message of one `enqueue`, then closes the connection unanswered.
    HangUpAfterRequest,
}

/// A scripted locator and service on raw sockets: the locator resolves every name to the
/// service, the service plays one script per accepted connection and reports when it is done.
struct Scripted {
    locator: SocketAddr,
    done: mpsc::Receiver<Script>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

async fn read_frame(stream: &mut TcpStream, buf: &mut BytesMut, decoder: &mut Decoder) -> Option<Frame> {
    loop {
        if let Some(f) = decoder.decode_frame(buf).unwrap() {
            return Some(f);
        }
        if stream.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

fn encode(v: Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &v).unwrap();
    out
}

fn msg(channel: u64, kind: u64, args: Vec<Value>) -> Vec<u8> {
    encode(Value::Array(vec![channel.into(), kind.into(), Value::Array(args)]))
}

async fn scripted(scripts: Vec<Script>) -> Scripted {
    let service = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = service.local_addr().unwrap().port();
    let locator = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = locator.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = locator.accept().await {
            tokio::spawn(async move {
                let (mut buf, mut dec) = (BytesMut::new(), Decoder::new(Role::Engine, DEFAULT_MAX_MESSAGE_BYTES));
                while let Some(f) = read_frame(&mut s, &mut buf, &mut dec).await {
                    let endpoint = Value::Array(vec![Value::from("127.0.0.1"), Value::from(port)]);
                    let answer = vec![Value::Array(vec![endpoint]), Value::from(1), Value::Map(vec![])];
                    s.write_all(&msg(f.channel, 0, answer)).await.unwrap();
                }
            });
        }
    });
    let (done_tx, done) = mpsc::channel(16);
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        for script in scripts {
            let Ok((mut s, _)) = service.accept().await else { return };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (mut buf, mut dec) = (BytesMut::new(), Decoder::new(Role::Engine, DEFAULT_MAX_MESSAGE_BYTES));
            let open = read_frame(&mut s, &mut buf, &mut dec).await.unwrap();
            if let Script::AnswerThenHangUp(reply) = script {
                // Wait for the client's close, then answer.
                while let Some(f) = read_frame(&mut s, &mut buf, &mut dec).await {
                    if f.channel == open.channel && f.kind == 2 {
                        break;
                    }
                }
                s.write_all(&msg(open.channel, 0, vec![Value::Binary(reply.as_bytes().to_vec())])).await.unwrap();
                s.write_all(&msg(open.channel, 2, vec![])).await.unwrap();
            }
            drop(s);
            done_tx.send(script).await.unwrap();
        }
        // Later connections are accepted and never answered.
        while let Ok((s, _)) = service.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::mem::forget(s);
        }
    });
    Scripted { locator: addr, done, accepted }
}

#[tokio::test]
async fn a_connection_closed_by_the_service_is_replaced_on_next_use() {
    let mut fake = scripted(vec![Script::AnswerThenHangUp("one"), Script::AnswerThenHangUp("two")]).await;
    let svc = AppClient::new(fake.locator.to_string()).service("app");
    assert_eq!(within("first call", svc.call("e", ["x"])).await.unwrap(), ["one"]);
    // The service has closed the kept connection before the next call: the call is not sent on
    // the dead connection but on a new one, after resolving again.
    within("service hung up", fake.done.recv()).await.unwrap();
    assert_eq!(within("second call", svc.call("e", ["y"])).await.unwrap(), ["two"]);
    assert_eq!(svc.connections_opened(), 2);
}

#[tokio::test]
async fn a_request_that_may_have_run_is_not_sent_again() {
    let fake = scripted(vec![Script::HangUpAfterRequest]).await;
    let svc = AppClient::new(fake.locator.to_string()).service("app");
    let err = within("call", svc.call("e", ["x"])).await.unwrap_err();
    assert_eq!(err, AppClientError::Disconnected { request_sent: true });
    assert!(!err.is_retryable());
    assert_eq!(fake.accepted.load(std::sync::atomic::Ordering::SeqCst), 1, "the request was sent once");
}
