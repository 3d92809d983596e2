//! The real Cocaine Python framework (PyPI `cocaine==0.12.14.5`) against nodus: its `Worker` runs
//! as an engine app and its `Service`/`Locator` clients call that app through the [`Locator`].
//!
//! Needs the virtualenv made by `tests/cocaine-compat/setup.sh` (at `$NODUS_PYENV`, default
//! `~/.cache/nodus-cocaine-venv`); without it the test prints why it is skipped and passes,
//! except under `CI=true`, where a missing virtualenv fails the test (a skip is invisible in
//! `cargo test` output, and CI must prove compatibility). It never installs anything itself.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nodus_engine::manifest::Manifest;
use nodus_engine::profile::Profile;
use nodus_engine::{AppSpec, Engine, EngineConfig, EngineEvent, Locator, LocatorConfig};

const APP: &str = "pyapp";
/// One worker, one session at a time, one waiting request: for the queue-full error.
const TIGHT: &str = "pytight";

fn venv_python() -> Option<PathBuf> {
    let venv = match std::env::var_os("NODUS_PYENV") {
        Some(v) => PathBuf::from(v),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/nodus-cocaine-venv"),
    };
    let python = venv.join("bin/python");
    python.exists().then_some(python)
}

/// Whether this runs in CI (`CI=true`, as most CI systems set it).
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

fn compat_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/cocaine-compat")
}

/// Tracks which workers have started and which have handshaken.
fn note(workers: &mut HashMap<(String, u64), bool>, ev: EngineEvent) {
    match ev {
        EngineEvent::Spawned { app, worker, .. } => {
            workers.entry((app, worker)).or_insert(false);
        }
        EngineEvent::Ready { app, worker } => {
            workers.insert((app, worker), true);
        }
        ev @ EngineEvent::Exited { .. } => panic!("a Python worker exited while serving: {ev:?}"),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cocaine_python_worker_and_client() {
    let Some(python) = venv_python() else {
        assert!(
            !in_ci(),
            "CI=true and the Cocaine virtualenv is missing: run tests/cocaine-compat/setup.sh before the tests"
        );
        eprintln!("SKIPPED cocaine compat: run tests/cocaine-compat/setup.sh");
        return;
    };
    let scripts = compat_dir().canonicalize().expect("tests/cocaine-compat exists");
    let dir = tempfile::Builder::new().prefix("ncc").tempdir().unwrap();

    // The port is known before the engine exists, so workers get the real --locator.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = EngineConfig::new(dir.path().join("run"));
    config.locator = addr.to_string();
    config.kill_grace = Duration::from_secs(2);
    let engine = Engine::new(config);
    let mut events = engine.events();

    let mut manifest = Manifest::new(python.to_string_lossy());
    manifest.args.push(scripts.join("worker_app.py").to_string_lossy().into_owned());
    manifest.env.insert("PYTHONDONTWRITEBYTECODE".into(), "1".into());
    // Set NODUS_COCAINE_WORKER_LOG=/some/file to get the framework's debug log of the workers.
    if let Ok(log) = std::env::var("NODUS_COCAINE_WORKER_LOG") {
        manifest.env.insert("NODUS_COCAINE_WORKER_LOG".into(), log);
    }
    let roomy = Profile { pool_limit: 2, terminate_timeout: Duration::from_secs(5), ..Profile::default() };
    let tight = Profile { pool_limit: 1, concurrency: 1, queue_limit: 1, ..roomy.clone() };
    for (name, profile) in [(APP, roomy), (TIGHT, tight)] {
        let spec = AppSpec { name: name.into(), dir: dir.path().to_path_buf(), manifest: manifest.clone(), profile };
        engine.start(spec).await.unwrap();
    }

    let locator = Locator::from_listener(engine.clone(), LocatorConfig::default(), listener).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(locator.run(async move {
        let _ = stopped.await;
    }));

    let run = tokio::process::Command::new(&python)
        .arg(scripts.join("client.py"))
        .args(["--locator", &addr.to_string(), "--app", APP, "--tight-app", TIGHT])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir(dir.path())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("client.py finished within 180 s")
        .expect("client.py started");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let crashlog = [engine.crashlog(APP).unwrap_or_default(), engine.crashlog(TIGHT).unwrap_or_default()];
    assert!(
        out.status.success() && stdout.contains("PASS:"),
        "client.py failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- crashlog\n{crashlog:#?}",
        out.status
    );
    eprintln!("{stdout}");

    // Every worker the client's load started has handshaken (none is still starting up) ...
    let mut workers: HashMap<(String, u64), bool> = HashMap::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            // Everything already announced first, so a worker spawned late is not missed.
            while let Ok(ev) = events.try_recv() {
                note(&mut workers, ev);
            }
            if !workers.is_empty() && workers.values().all(|ready| *ready) {
                return;
            }
            note(&mut workers, events.recv().await.expect("engine events"));
        }
    })
    .await
    .expect("every Python worker handshook");
    // ... so each answers the engine's terminate and exits on its own: no signal is needed.
    tokio::time::timeout(Duration::from_secs(30), engine.shutdown()).await.expect("engine stopped in time");
    let mut exited = 0;
    while let Ok(ev) = events.try_recv() {
        match ev {
            EngineEvent::Exited { failure: None, .. } => exited += 1,
            ev @ (EngineEvent::Signalled { .. } | EngineEvent::Exited { .. } | EngineEvent::Failed { .. }) => {
                panic!(
                    "a Python worker did not stop cleanly: {ev:?}\n{:#?}",
                    [engine.crashlog(APP), engine.crashlog(TIGHT)]
                )
            }
            _ => {}
        }
    }
    assert_eq!(exited, workers.len(), "every worker exited: {workers:?}");
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(15), server).await.expect("locator stopped in time").unwrap();
}
