//! The engine with real worker processes: every lifecycle path, balancing, streaming.
//!
//! Tests wait on engine events (with a timeout), never on sleeps.

use std::time::Duration;

use nodus_engine::balance::{AppStatus, BalanceConfig, Rejection};
use nodus_engine::manifest::Manifest;
use nodus_engine::profile::Profile;
use nodus_engine::worker::{FailReason, Signal, State};
use nodus_engine::{AppSpec, Engine, EngineConfig, EngineError, EngineEvent, Session, SessionError};
use tokio::sync::broadcast;

const WAIT: Duration = Duration::from_secs(15);
const ECHO: &str = env!("CARGO_BIN_EXE_nodus-echo-worker");
const ROGUE: &str = env!("CARGO_BIN_EXE_nodus-rogue-worker");

struct Harness {
    engine: Engine,
    events: broadcast::Receiver<EngineEvent>,
    dir: tempfile::TempDir,
}

fn harness() -> Harness {
    let dir = tempfile::Builder::new().prefix("ne").tempdir().unwrap();
    let mut config = EngineConfig::new(dir.path().join("run"));
    config.kill_grace = Duration::from_millis(300);
    config.balance = BalanceConfig {
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        crash_window: Duration::from_secs(60),
    };
    let engine = Engine::new(config);
    let events = engine.events();
    Harness { engine, events, dir }
}

fn profile() -> Profile {
    Profile { heartbeat_timeout: Duration::from_secs(5), ..Profile::default() }
}

impl Harness {
    fn spec(&self, name: &str, exe: &str, env: &[(&str, &str)], profile: Profile) -> AppSpec {
        let mut manifest = Manifest::new(exe);
        manifest.env.insert("NODUS_HEARTBEAT_MS".into(), "100".into());
        for (k, v) in env {
            manifest.env.insert(k.to_string(), v.to_string());
        }
        AppSpec { name: name.into(), dir: self.dir.path().to_path_buf(), manifest, profile }
    }

    async fn start(&self, name: &str, exe: &str, env: &[(&str, &str)], profile: Profile) {
        self.engine.start(self.spec(name, exe, env, profile)).await.unwrap();
    }

    /// Waits for the first event matching `pred`, skipping others.
    async fn wait_for(&mut self, what: &str, pred: impl Fn(&EngineEvent) -> bool) -> EngineEvent {
        let fut = async {
            loop {
                match self.events.recv().await {
                    Ok(ev) if pred(&ev) => return ev,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => panic!("engine gone while waiting for {what}"),
                }
            }
        };
        tokio::time::timeout(WAIT, fut).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    }
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f).await.unwrap_or_else(|_| panic!("timed out: {what}"))
}

async fn echo_once(s: &mut Session, data: &str) {
    s.send(data.to_string()).await.unwrap();
    let got = within("echo reply", s.recv()).await.unwrap().unwrap();
    assert_eq!(got, data.as_bytes());
}

#[tokio::test]
async fn echo_streams_both_ways() {
    let h = harness();
    h.start("echo", ECHO, &[], profile()).await;
    let mut s = h.engine.invoke("echo", "echo").await.unwrap();
    echo_once(&mut s, "hello").await;
    echo_once(&mut s, "world").await;
    s.send("last").await.unwrap();
    s.close().await.unwrap();
    assert_eq!(within("last", s.recv()).await.unwrap().unwrap(), "last");
    assert_eq!(within("choke", s.recv()).await.unwrap(), None);
    let chunks = within("collect", h.engine.invoke("echo", "echo").await.unwrap().collect()).await.unwrap();
    assert!(chunks.is_empty());
    h.engine.shutdown().await;
}

#[tokio::test]
async fn multi_chunk_replies_arrive_in_order() {
    let h = harness();
    h.start("chunks", ECHO, &[], profile()).await;
    let mut s = h.engine.invoke("chunks", "chunks").await.unwrap();
    s.send("500").await.unwrap();
    let chunks = within("500 chunks", s.collect()).await.unwrap();
    assert_eq!(chunks.len(), 500);
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c, i.to_string().as_bytes());
    }
    h.engine.shutdown().await;
}

#[tokio::test]
async fn application_errors_and_unknown_events_reach_the_caller() {
    let h = harness();
    h.start("errs", ECHO, &[], profile()).await;
    let mut s = h.engine.invoke("errs", "fail").await.unwrap();
    let e = within("error", s.recv()).await.unwrap_err();
    assert_eq!(e, SessionError::Worker { category: 2, code: 1, message: "requested failure".into() });
    let mut s = h.engine.invoke("errs", "nope").await.unwrap();
    let e = within("error", s.recv()).await.unwrap_err();
    assert!(matches!(e, SessionError::Worker { code: 404, .. }), "{e:?}");
    assert!(matches!(h.engine.invoke("other", "x").await, Err(EngineError::UnknownApp(_))));
    h.engine.shutdown().await;
}

#[tokio::test]
async fn crash_mid_request_fails_the_session_and_is_logged() {
    let mut h = harness();
    h.start("crashy", ECHO, &[], profile()).await;
    let mut s = h.engine.invoke("crashy", "crash").await.unwrap();
    s.send("boom").await.unwrap();
    let e = within("crash error", s.recv()).await.unwrap_err();
    assert!(matches!(e, SessionError::WorkerFailed(_)), "{e:?}");
    h.wait_for("exit", |e| matches!(e, EngineEvent::Exited { failure: Some(_), .. })).await;
    let log = h.engine.crashlog("crashy").unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].status.unwrap().code, Some(3));
    assert!(log[0].stderr.iter().any(|l| l.contains("crashing on purpose")), "{:?}", log[0].stderr);
    // The app recovers with a new worker.
    let mut s = h.engine.invoke("crashy", "echo").await.unwrap();
    echo_once(&mut s, "again").await;
    // A dropped session is abandoned: the worker is told and the shutdown need not wait for it.
    drop(s);
    within("shutdown", h.engine.shutdown()).await;
}

#[tokio::test]
async fn slow_handshake_is_killed_and_a_crash_loop_fails_the_app() {
    let mut h = harness();
    let p = Profile { startup_timeout: Duration::from_millis(300), crash_limit: 2, ..profile() };
    h.start("slow", ROGUE, &[("ROGUE_MODE", "slow-handshake")], p).await;
    let mut s = h.engine.invoke("slow", "echo").await.unwrap();
    h.wait_for("startup failure", |e| matches!(e, EngineEvent::Failed { reason: FailReason::StartupTimeout, .. }))
        .await;
    h.wait_for("SIGTERM", |e| matches!(e, EngineEvent::Signalled { signal: Signal::Term, .. })).await;
    let ev = h.wait_for("exit", |e| matches!(e, EngineEvent::Exited { .. })).await;
    let EngineEvent::Exited { status, .. } = ev else { unreachable!() };
    assert_eq!(status.unwrap().signal, Some(15));
    h.wait_for("failed app", |e| matches!(e, EngineEvent::Status { status: AppStatus::Failed { .. }, .. })).await;
    let e = within("rejection", s.recv()).await.unwrap_err();
    assert!(matches!(e, SessionError::Rejected(Rejection::Failed { .. })), "{e:?}");
    assert!(matches!(h.engine.invoke("slow", "echo").await, Err(EngineError::Rejected(Rejection::Failed { .. }))));
    let info = h.engine.info("slow").await.unwrap();
    assert!(matches!(info.status, AppStatus::Failed { .. }));
    h.engine.shutdown().await;
}

#[tokio::test]
async fn a_worker_that_stops_heartbeating_is_killed_and_its_session_fails() {
    let mut h = harness();
    let p = Profile { heartbeat_timeout: Duration::from_millis(500), ..profile() };
    h.start("silent", ROGUE, &[("ROGUE_MODE", "no-heartbeat")], p).await;
    let mut s = h.engine.invoke("silent", "echo").await.unwrap();
    h.wait_for("ready", |e| matches!(e, EngineEvent::Ready { .. })).await;
    h.wait_for("heartbeat failure", |e| matches!(e, EngineEvent::Failed { reason: FailReason::HeartbeatTimeout, .. }))
        .await;
    let e = within("session failure", s.recv()).await.unwrap_err();
    assert!(matches!(e, SessionError::WorkerFailed(_)), "{e:?}");
    h.wait_for("SIGTERM", |e| matches!(e, EngineEvent::Signalled { signal: Signal::Term, .. })).await;
    h.wait_for("exit", |e| matches!(e, EngineEvent::Exited { failure: Some(_), .. })).await;
    h.engine.shutdown().await;
}

#[tokio::test]
async fn a_worker_ignoring_terminate_gets_sigterm_then_sigkill() {
    let mut h = harness();
    let p = Profile { terminate_timeout: Duration::from_millis(300), ..profile() };
    h.start("stubborn", ROGUE, &[("ROGUE_MODE", "ignore-terminate")], p).await;
    let _s = h.engine.invoke("stubborn", "echo").await.unwrap();
    h.wait_for("ready", |e| matches!(e, EngineEvent::Ready { .. })).await;
    let engine = h.engine.clone();
    let stop = tokio::spawn(async move { engine.stop("stubborn").await });
    h.wait_for("terminate", |e| matches!(e, EngineEvent::Terminating { .. })).await;
    h.wait_for("SIGTERM", |e| matches!(e, EngineEvent::Signalled { signal: Signal::Term, .. })).await;
    h.wait_for("SIGKILL", |e| matches!(e, EngineEvent::Signalled { signal: Signal::Kill, .. })).await;
    let ev = h.wait_for("exit", |e| matches!(e, EngineEvent::Exited { .. })).await;
    let EngineEvent::Exited { status, .. } = ev else { unreachable!() };
    assert_eq!(status.unwrap().signal, Some(9));
    within("stop", stop).await.unwrap().unwrap();
    assert_eq!(h.engine.info("stubborn").await.unwrap().status, AppStatus::Stopped);
    h.engine.shutdown().await;
}

#[tokio::test]
async fn a_worker_that_says_terminate_and_lingers_gets_sigterm() {
    let mut h = harness();
    let p = Profile { terminate_timeout: Duration::from_millis(300), ..profile() };
    h.start("linger", ROGUE, &[("ROGUE_MODE", "linger")], p).await;
    let _s = h.engine.invoke("linger", "echo").await.unwrap();
    h.wait_for("SIGTERM", |e| matches!(e, EngineEvent::Signalled { signal: Signal::Term, .. })).await;
    let ev = h.wait_for("exit", |e| matches!(e, EngineEvent::Exited { .. })).await;
    let EngineEvent::Exited { status, failure, .. } = ev else { unreachable!() };
    assert_eq!(status.unwrap().code, Some(143), "the rogue exits 143 on SIGTERM");
    assert_eq!(failure, None, "a worker that said terminate left normally");
    h.engine.shutdown().await;
}

#[tokio::test]
async fn crash_loop_puts_the_app_in_failed_state_until_restarted() {
    let mut h = harness();
    let p = Profile { crash_limit: 3, ..profile() };
    h.start("loop", ECHO, &[("ECHO_CRASH_ON_START", "1")], p.clone()).await;
    let mut s = h.engine.invoke("loop", "echo").await.unwrap();
    let ev = h.wait_for("failed app", |e| matches!(e, EngineEvent::Status { .. })).await;
    let EngineEvent::Status { status: AppStatus::Failed { reason }, .. } = ev else { panic!("{ev:?}") };
    assert!(reason.contains("3 worker failures"), "{reason}");
    let e = within("rejection", s.recv()).await.unwrap_err();
    assert!(matches!(e, SessionError::Rejected(Rejection::Failed { .. })), "{e:?}");
    let log = h.engine.crashlog("loop").unwrap();
    assert_eq!(log.len(), 3);
    for r in &log {
        assert_eq!(r.status.unwrap().code, Some(3));
        assert_eq!(r.stderr, vec!["crashing on start, as asked".to_string()]);
    }
    // A fixed version starts the app again.
    h.start("loop", ECHO, &[], p).await;
    let mut s = h.engine.invoke("loop", "echo").await.unwrap();
    echo_once(&mut s, "fixed").await;
    within("close", s.collect()).await.unwrap();
    h.engine.shutdown().await;
}

#[tokio::test]
async fn pool_grows_with_load_and_shrinks_when_idle() {
    let mut h = harness();
    let p = Profile { pool_limit: 3, concurrency: 1, idle_timeout: Some(Duration::from_millis(500)), ..profile() };
    h.start("pool", ECHO, &[], p).await;
    let mut open = Vec::new();
    for i in 0..3 {
        let mut s = h.engine.invoke("pool", "echo").await.unwrap();
        echo_once(&mut s, &format!("s{i}")).await;
        open.push(s);
    }
    let info = h.engine.info("pool").await.unwrap();
    assert_eq!(info.workers.len(), 3, "{info:?}");
    assert!(info.workers.iter().all(|w| w.load == 1 && w.state == State::Active), "{info:?}");
    // At the pool limit a fourth request waits for a free worker.
    let mut fourth = h.engine.invoke("pool", "echo").await.unwrap();
    fourth.send("s3").await.unwrap();
    assert_eq!(h.engine.info("pool").await.unwrap().queued, 1);
    let first = open.remove(0);
    within("first", first.collect()).await.unwrap();
    assert_eq!(within("fourth", fourth.recv()).await.unwrap().unwrap(), "s3");
    open.push(fourth);
    for s in open {
        within("close", s.collect()).await.unwrap();
    }
    for _ in 0..3 {
        h.wait_for("idle exit", |e| matches!(e, EngineEvent::Exited { failure: None, .. })).await;
    }
    let info = h.engine.info("pool").await.unwrap();
    assert!(info.workers.is_empty(), "{info:?}");
    // Load brings a worker back.
    let mut s = h.engine.invoke("pool", "echo").await.unwrap();
    echo_once(&mut s, "back").await;
    within("close", s.collect()).await.unwrap();
    h.engine.shutdown().await;
}

#[tokio::test]
async fn a_full_queue_refuses_requests_with_queue_full() {
    let h = harness();
    let p = Profile { pool_limit: 1, concurrency: 1, queue_limit: 1, ..profile() };
    h.start("busy", ECHO, &[], p).await;
    let mut a = h.engine.invoke("busy", "echo").await.unwrap();
    echo_once(&mut a, "a").await;
    let mut b = h.engine.invoke("busy", "echo").await.unwrap();
    b.send("b").await.unwrap();
    let c = h.engine.invoke("busy", "echo").await.unwrap_err();
    assert_eq!(c, EngineError::Rejected(Rejection::QueueFull { limit: 1 }));
    assert!(c.to_string().contains("queue full"), "{c}");
    within("a done", a.collect()).await.unwrap();
    assert_eq!(within("b served", b.recv()).await.unwrap().unwrap(), "b");
    within("b done", b.collect()).await.unwrap();
    h.engine.shutdown().await;
}

#[tokio::test]
async fn a_new_version_replaces_workers_without_dropping_open_sessions() {
    let mut h = harness();
    h.start("ver", ECHO, &[("VERSION", "1")], profile()).await;
    let mut old = h.engine.invoke("ver", "echo").await.unwrap();
    echo_once(&mut old, "v1").await;
    h.start("ver", ECHO, &[("VERSION", "2")], profile()).await;
    h.wait_for("terminate", |e| matches!(e, EngineEvent::Terminating { .. })).await;
    // The old worker finishes the open session before it leaves.
    let mut new = h.engine.invoke("ver", "echo").await.unwrap();
    echo_once(&mut new, "v2").await;
    echo_once(&mut old, "still here").await;
    within("old done", old.collect()).await.unwrap();
    h.wait_for("old worker exit", |e| matches!(e, EngineEvent::Exited { worker: 1, failure: None, .. })).await;
    within("new done", new.collect()).await.unwrap();
    h.engine.shutdown().await;
}

#[tokio::test]
async fn garbage_from_a_worker_closes_only_its_connection() {
    let mut h = harness();
    h.start("good", ECHO, &[], profile()).await;
    let mut good = h.engine.invoke("good", "echo").await.unwrap();
    echo_once(&mut good, "before").await;
    h.start("bad", ROGUE, &[("ROGUE_MODE", "garbage")], profile()).await;
    let bad = h.engine.invoke("bad", "echo").await.unwrap();
    h.wait_for("disconnect", |e| matches!(e, EngineEvent::Failed { reason: FailReason::Disconnected, .. })).await;
    h.wait_for("SIGTERM", |e| matches!(e, EngineEvent::Signalled { signal: Signal::Term, .. })).await;
    echo_once(&mut good, "after").await;
    within("close", good.collect()).await.unwrap();
    drop(bad);
    h.engine.shutdown().await;
}

#[test]
fn the_example_app_files_are_valid() {
    use nodus_engine::manifest::Format;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/echo-app");
    let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    let m = Manifest::parse(&text, Format::Json).unwrap();
    assert_eq!(m.executable, "nodus-echo-worker");
    let text = std::fs::read_to_string(dir.join("profile.toml")).unwrap();
    let p = Profile::parse(&text, Format::Toml).unwrap();
    assert_eq!(p.pool_limit, 4);
    assert_eq!(p.timeouts(), nodus_engine::worker::Timeouts::default());
}

#[tokio::test]
async fn an_app_removed_and_started_again_at_once_keeps_its_new_socket() {
    let h = harness();
    for round in 0..5 {
        h.start("again", ECHO, &[], profile()).await;
        let mut s = h.engine.invoke("again", "echo").await.unwrap();
        echo_once(&mut s, &format!("round {round}")).await;
        drop(s);
        // The old app's teardown must not delete the socket the next start creates.
        h.engine.remove("again").await.unwrap();
    }
    h.start("again", ECHO, &[], profile()).await;
    let mut s = h.engine.invoke("again", "echo").await.unwrap();
    echo_once(&mut s, "still here").await;
    s.close().await.unwrap();
    assert_eq!(within("choke", s.recv()).await.unwrap(), None);
    h.engine.shutdown().await;
}

/// One [`nodus_engine::AppCaller::call`], awaited.
async fn call(caller: &nodus_engine::AppCaller, event: &str, body: &str) -> Result<Vec<bytes::Bytes>, SessionError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let done = nodus_engine::CallDone::new(move |r| {
        let _ = tx.send(r);
    });
    assert!(caller.call(event, bytes::Bytes::from(body.to_string()), done), "the app is gone");
    within(event, rx).await.expect("every call is completed")
}

#[tokio::test]
async fn calls_collect_replies_and_every_failure_completes_them() {
    let h = harness();
    h.start("calls", ECHO, &[], profile()).await;
    let caller = h.engine.caller("calls").unwrap();
    assert_eq!(call(&caller, "echo", "hi").await.unwrap(), vec!["hi"]);
    let chunks = call(&caller, "chunks", "300").await.unwrap();
    assert_eq!(chunks.len(), 300);
    assert_eq!(chunks[299], "299");
    let e = call(&caller, "fail", "").await.unwrap_err();
    assert_eq!(e, SessionError::Worker { category: 2, code: 1, message: "requested failure".into() });
    let e = call(&caller, "crash", "boom").await.unwrap_err();
    assert!(matches!(e, SessionError::WorkerFailed(_)), "{e:?}");
    // A new worker takes the next call.
    assert_eq!(call(&caller, "echo", "again").await.unwrap(), vec!["again"]);
    assert!(matches!(h.engine.caller("other"), Err(EngineError::UnknownApp(_))));
    // Once the app is removed, a call completes with EngineGone (even one queued behind the
    // removal), and then tells the caller to re-resolve.
    h.engine.remove("calls").await.unwrap();
    let gone = |alive: &mut Vec<bool>| {
        let (tx, rx) = tokio::sync::oneshot::channel();
        alive.push(caller.call("echo", bytes::Bytes::new(), nodus_engine::CallDone::new(move |r| drop(tx.send(r)))));
        rx
    };
    let mut alive = Vec::new();
    assert_eq!(within("gone", gone(&mut alive)).await.unwrap(), Err(SessionError::EngineGone));
    assert_eq!(within("gone again", gone(&mut alive)).await.unwrap(), Err(SessionError::EngineGone));
    assert!(!alive[1], "a caller of a removed app must say so");
    h.engine.shutdown().await;
}

#[tokio::test]
async fn a_call_refused_by_a_full_queue_or_collecting_too_much_fails_cleanly() {
    let dir = tempfile::Builder::new().prefix("ne").tempdir().unwrap();
    let mut config = EngineConfig::new(dir.path().join("run"));
    config.session_messages = 10;
    config.app_events = 2;
    let engine = Engine::new(config);
    let mut manifest = Manifest::new(ECHO);
    manifest.env.insert("NODUS_HEARTBEAT_MS".into(), "100".into());
    let p = Profile { pool_limit: 1, concurrency: 1, queue_limit: 1, ..profile() };
    engine.start(AppSpec { name: "small".into(), dir: dir.path().to_path_buf(), manifest, profile: p }).await.unwrap();
    let caller = engine.caller("small").unwrap();
    // More reply chunks than a session may hold: the call fails, the worker is told, and the
    // app serves the next call.
    assert_eq!(call(&caller, "chunks", "50").await.unwrap_err(), SessionError::Overflow(10));
    assert_eq!(call(&caller, "echo", "ok").await.unwrap(), vec!["ok"]);
    // One session on the worker, one queued: the call is refused at once with queue full.
    let mut a = engine.invoke("small", "echo").await.unwrap();
    echo_once(&mut a, "a").await;
    let b = engine.invoke("small", "echo").await.unwrap();
    let e = call(&caller, "echo", "c").await.unwrap_err();
    assert_eq!(e, SessionError::Rejected(Rejection::QueueFull { limit: 1 }));
    drop((a, b));
    // A burst faster than the app's task takes events (this test's runtime has one thread, so
    // it cannot run between these calls): beyond its 2-event queue, calls are refused at once.
    let results = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    for _ in 0..6 {
        let results = results.clone();
        caller.call(
            "echo",
            bytes::Bytes::from_static(b"x"),
            nodus_engine::CallDone::new(move |r| results.lock().unwrap().push(r)),
        );
    }
    let busy = results
        .lock()
        .unwrap()
        .iter()
        .filter(|r| matches!(r, Err(SessionError::Rejected(Rejection::Busy { limit: 2 }))))
        .count();
    assert!(busy >= 4, "{:?}", results.lock().unwrap());
    assert!(SessionError::Rejected(Rejection::Busy { limit: 2 }).to_string().contains("retry"));
    engine.shutdown().await;
}

#[tokio::test]
async fn a_caller_opens_a_streaming_session_in_one_event() {
    let h = harness();
    let p = Profile { pool_limit: 1, concurrency: 1, queue_limit: 1, ..profile() };
    h.start("open", ECHO, &[], p).await;
    let caller = h.engine.caller("open").unwrap();
    // Input given and closed at once: the reply streams back.
    let s = caller.open("chunks", "3".into(), true);
    let chunks = within("3 chunks", s.collect()).await.unwrap();
    assert_eq!(chunks, ["0", "1", "2"]);
    // Input left open: more chunks follow on the session.
    let mut a = caller.open("echo", "a".into(), false);
    assert_eq!(within("a", a.recv()).await.unwrap().unwrap(), "a");
    echo_once(&mut a, "again").await;
    // The worker is busy with a: b waits in the queue, c is refused through its session.
    let b = caller.open("echo", "b".into(), true);
    let mut c = caller.open("echo", "c".into(), true);
    let e = within("c refused", c.recv()).await.unwrap_err();
    assert_eq!(e, SessionError::Rejected(Rejection::QueueFull { limit: 1 }));
    a.close().await.unwrap();
    within("a done", a.collect()).await.unwrap();
    assert_eq!(within("b served", b.collect()).await.unwrap(), ["b"]);
    // A session dropped while queued is withdrawn; the app keeps serving.
    drop(caller.open("echo", "gone".into(), false));
    assert_eq!(within("after a drop", caller.open("echo", "d".into(), true).collect()).await.unwrap(), ["d"]);
    h.engine.shutdown().await;
}

#[tokio::test]
async fn a_call_whose_deadline_passes_in_the_queue_never_reaches_a_worker() {
    let h = harness();
    let p = Profile { pool_limit: 1, concurrency: 1, queue_limit: 4, ..profile() };
    h.start("expiring", ECHO, &[], p).await;
    let caller = h.engine.caller("expiring").unwrap();
    // The only worker is busy with an open session: calls wait in the queue.
    let mut busy = h.engine.invoke("expiring", "echo").await.unwrap();
    echo_once(&mut busy, "busy").await;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let done = nodus_engine::CallDone::new(move |r| {
        let _ = tx.send(r);
    });
    let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
    assert!(caller.call_before("echo", bytes::Bytes::from_static(b"late"), deadline, done));
    let e = within("the queued call expires", rx).await.unwrap().unwrap_err();
    assert_eq!(e, SessionError::Rejected(Rejection::Expired));
    assert!(tokio::time::Instant::now() >= deadline, "not before its deadline");
    // It left the queue: nothing waits, and freeing the worker runs nothing more.
    let info = h.engine.info("expiring").await.unwrap();
    assert_eq!((info.queued, info.sessions), (0, 1), "only the busy session remains");
    busy.close().await.unwrap();
    within("busy done", busy.collect()).await.unwrap();
    // A call already past its deadline is refused at once; a live one runs.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let done = nodus_engine::CallDone::new(move |r| {
        let _ = tx.send(r);
    });
    caller.call_before("echo", bytes::Bytes::from_static(b"x"), tokio::time::Instant::now(), done);
    assert_eq!(within("refused", rx).await.unwrap().unwrap_err(), SessionError::Rejected(Rejection::Expired));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let done = nodus_engine::CallDone::new(move |r| {
        let _ = tx.send(r);
    });
    let later = tokio::time::Instant::now() + WAIT;
    caller.call_before("echo", bytes::Bytes::from_static(b"in time"), later, done);
    assert_eq!(within("served", rx).await.unwrap().unwrap(), vec!["in time"]);
    let info = h.engine.info("expiring").await.unwrap();
    assert_eq!((info.queued, info.sessions), (0, 0));
    h.engine.shutdown().await;
}

/// Probes `worker` of `app` with a monitoring request; returns the worker's answer as JSON.
async fn probe_monitoring(h: &Harness, app: &str, worker: nodus_engine::balance::WorkerId) -> serde_json::Value {
    let request = serde_json::json!({
        "id": 7, "pid": 11, "creator": "test", "created_at": 1000, "expires_at": 0,
        "spec": "monitoring", "config": {"sync_time": 123_456},
    });
    let (tx, rx) = tokio::sync::oneshot::channel();
    let done = nodus_engine::CallDone::new(move |r| {
        let _ = tx.send(r);
    });
    h.engine.probe(app, worker, nodus_engine::MONITORING_EVENT, request.to_string().into(), done).unwrap();
    let chunks = within("the probe's answer", rx).await.unwrap().unwrap();
    serde_json::from_slice(&chunks.concat()).unwrap()
}

#[tokio::test]
async fn a_busy_worker_is_probed_outside_the_queue_and_answers_by_default_or_as_its_program_says() {
    let h = harness();
    let p = Profile { pool_limit: 1, concurrency: 1, queue_limit: 4, ..profile() };
    h.start("plain", ECHO, &[], p.clone()).await;
    h.start("own", ECHO, &[("ECHO_MONITORING", "counting sheep")], p).await;
    for app in ["plain", "own"] {
        // The only worker is busy, so a call would wait in the queue; the probe does not.
        let mut busy = h.engine.invoke(app, "echo").await.unwrap();
        echo_once(&mut busy, "busy").await;
        let info = h.engine.info(app).await.unwrap();
        let worker = info.workers.iter().find(|w| w.state == State::Active).expect("active worker").id;
        let v = probe_monitoring(&h, app, worker).await;
        assert_eq!((&v["id"], &v["pid"], &v["spec"]), (&7.into(), &11.into(), &"monitoring".into()), "{v}");
        assert_eq!(v["result"]["sync_time"], 123_456, "echoed: {v}");
        assert_eq!(v["result"]["is_running"], true, "an invocation is open: {v}");
        if app == "plain" {
            // The SDK's default answer: the app's name and this host.
            assert_eq!(v["result"]["name"], "plain", "{v}");
            assert_eq!(v["result"]["message"], "", "{v}");
        } else {
            assert_eq!(
                (&v["result"]["name"], &v["result"]["message"]),
                (&"echo".into(), &"counting sheep".into()),
                "{v}"
            );
        }
        busy.close().await.unwrap();
        within("busy done", busy.collect()).await.unwrap();
    }
    h.engine.shutdown().await;
}
