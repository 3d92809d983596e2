//! Workers are who the engine says they are: a handshake is accepted only from the process the
//! engine spawned for that uuid (or one of its children), and a root engine runs workers as the
//! configured unprivileged user.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use nodus_engine::manifest::Manifest;
use nodus_engine::profile::Profile;
use nodus_engine::{AppCaller, AppSpec, CallDone, Engine, EngineConfig, EngineEvent, RunAs, SessionError};
use tokio::sync::broadcast;

const WAIT: Duration = Duration::from_secs(15);
const ECHO: &str = env!("CARGO_BIN_EXE_nodus-echo-worker");
const ROGUE: &str = env!("CARGO_BIN_EXE_nodus-rogue-worker");

fn engine(dir: &Path, run_as: Option<RunAs>) -> Engine {
    let mut config = EngineConfig::new(dir.join("run"));
    config.kill_grace = Duration::from_millis(300);
    config.run_as = run_as;
    Engine::new(config)
}

fn spec(dir: &Path, name: &str, manifest: Manifest, profile: Profile) -> AppSpec {
    AppSpec { name: name.into(), dir: dir.to_path_buf(), manifest, profile }
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f).await.unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Starts one call; its result arrives on the returned receiver.
fn start_call(
    caller: &AppCaller,
    event: &str,
    body: &str,
) -> tokio::sync::oneshot::Receiver<Result<Vec<Bytes>, SessionError>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    assert!(caller.call(event, Bytes::from(body.to_string()), CallDone::new(move |r| drop(tx.send(r)))));
    rx
}

async fn spawned(events: &mut broadcast::Receiver<EngineEvent>) -> u32 {
    within("a worker spawned", async {
        loop {
            if let Ok(EngineEvent::Spawned { pid, .. }) = events.recv().await {
                return pid;
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_neighbour_with_a_workers_uuid_and_endpoint_cannot_serve_its_requests() {
    let dir = tempfile::Builder::new().prefix("ni").tempdir().unwrap();
    let engine = engine(dir.path(), None);
    let mut events = engine.events();
    // The victim's worker is slow to connect: its uuid stays unclaimed for a minute.
    let mut manifest = Manifest::new(ROGUE);
    manifest.env.insert("ROGUE_MODE".into(), "slow-handshake".into());
    let slow = Profile { startup_timeout: Duration::from_secs(60), ..Profile::default() };
    engine.start(spec(dir.path(), "victim", manifest, slow)).await.unwrap();
    let caller = engine.caller("victim").unwrap();
    let mut pending = start_call(&caller, "echo", "secret");
    let pid = spawned(&mut events).await;

    // Another process reads the worker's command line in /proc and connects as that worker.
    let out = within(
        "the impostor",
        tokio::process::Command::new(ROGUE)
            .env("ROGUE_MODE", "impersonate")
            .env("ROGUE_VICTIM_PID", pid.to_string())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(said.trim(), "REFUSED", "the impostor got in: {out:?}");
    // The request still waits for the real worker.
    assert!(pending.try_recv().is_err(), "the request was answered by someone");
    within("shutdown", engine.shutdown()).await;
    assert!(within("the call", pending).await.unwrap().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_forked_by_a_shell_script_may_handshake() {
    let dir = tempfile::Builder::new().prefix("ni").tempdir().unwrap();
    let engine = engine(dir.path(), None);
    let mut events = engine.events();
    // sh runs the real worker as its child (the `exit` after it keeps sh from exec'ing it).
    let mut manifest = Manifest::new("/bin/sh");
    manifest.args = vec!["-c".into(), "\"$0\" \"$@\"; exit $?".into(), ECHO.into()];
    manifest.env.insert("NODUS_HEARTBEAT_MS".into(), "100".into());
    engine.start(spec(dir.path(), "scripted", manifest, Profile::default())).await.unwrap();
    let caller = engine.caller("scripted").unwrap();
    let reply = start_call(&caller, "echo", "through sh");
    let pid = spawned(&mut events).await;
    assert_eq!(within("the call", reply).await.unwrap().unwrap(), vec!["through sh"]);
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim(), "sh", "the spawned process is the shell, the handshake came from its child");
    within("shutdown", engine.shutdown()).await;
}

/// `from` hard-linked (or copied) to `to`, so a user who cannot reach `from` can run `to`.
fn place_binary(from: &str, to: &Path) {
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).unwrap();
    }
}

fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_engine_runs_workers_as_the_configured_user() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED run_as: switching users needs root");
        return;
    }
    let Ok(nobody) = RunAs::lookup("nobody") else {
        eprintln!("SKIPPED run_as: this host has no user `nobody`");
        return;
    };
    assert_eq!(RunAs::for_daemon("").unwrap_err(), nodus_engine::RunAsError::Root, "root is never the default");
    assert_eq!(RunAs::for_daemon("root").unwrap(), None, "naming root allows it");
    assert_eq!(RunAs::for_daemon("nobody").unwrap().map(|u| u.uid), Some(nobody.uid));
    assert!(matches!(RunAs::for_daemon("no-such-user-here"), Err(nodus_engine::RunAsError::UnknownUser(_))));

    let dir = tempfile::Builder::new().prefix("ni").tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let worker: PathBuf = dir.path().join("echo-worker");
    place_binary(ECHO, &worker);
    let engine = engine(dir.path(), Some(nobody.clone()));
    let mut events = engine.events();
    let mut manifest = Manifest::new(worker.to_string_lossy());
    manifest.env.insert("NODUS_HEARTBEAT_MS".into(), "100".into());
    engine.start(spec(dir.path(), "confined", manifest, Profile::default())).await.unwrap();
    let caller = engine.caller("confined").unwrap();
    let reply = start_call(&caller, "echo", "as nobody");
    let pid = spawned(&mut events).await;
    assert_eq!(within("the call", reply).await.unwrap().unwrap(), vec!["as nobody"]);
    assert_eq!(uid_of(pid), nobody.uid);
    within("shutdown", engine.shutdown()).await;

    // A worker the user cannot reach fails with a crashlog entry that says why.
    let closed = tempfile::Builder::new().prefix("ni").tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(closed.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let engine = self::engine(closed.path(), Some(nobody));
    let mut events = engine.events();
    let hidden = closed.path().join("echo-worker");
    place_binary(ECHO, &hidden);
    engine
        .start(spec(closed.path(), "hidden", Manifest::new(hidden.to_string_lossy()), Profile::default()))
        .await
        .unwrap();
    let caller = engine.caller("hidden").unwrap();
    let _pending = start_call(&caller, "echo", "x");
    let failure = within("a failed start", async {
        loop {
            if let Ok(EngineEvent::Exited { status: None, failure: Some(f), .. }) = events.recv().await {
                return f;
            }
        }
    })
    .await;
    assert!(failure.contains("workers run as user nobody") && failure.contains("cannot enter"), "{failure}");
    assert_eq!(engine.crashlog("hidden").unwrap()[0].failure.as_deref(), Some(failure.as_str()));
    within("shutdown", engine.shutdown()).await;
}
