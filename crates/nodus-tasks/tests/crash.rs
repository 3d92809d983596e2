//! Durability under kill -9: a child process owns the store (and the engine with real workers),
//! submits tasks and runs them; it is killed with SIGKILL mid-run, while submissions and
//! completions are in flight. A second child reopens the store and finishes. Every task whose
//! submission was acknowledged must be there and done (lost: 0), and no task may complete twice
//! (duplicates: 0); tasks that were running when the first child died run again
//! (at-least-once: re-executions are allowed and counted).
//!
//! The child is this test binary itself, running the ignored test `crash_child` with the
//! environment saying what to do.
// This test drives a child process on wall time.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use nodus_engine::profile::Profile;
use nodus_engine::{AppSpec, Engine, EngineConfig};
use nodus_tasks::store::{SqliteConfig, SqliteStore, Store};
use nodus_tasks::{Status, Submission, Tasks, TasksConfig, UnixMs};
use serde_json::json;

const TASKS: usize = 3000;
const DIR: &str = "NODUS_CRASH_DIR";
const MODE: &str = "NODUS_CRASH_MODE";

fn child(dir: &Path, mode: &str) -> (Child, BufReader<ChildStdout>) {
    let mut c = Command::new(std::env::current_exe().unwrap())
        .args(["crash_child", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(DIR, dir)
        .env(MODE, mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the child");
    let out = BufReader::new(c.stdout.take().unwrap());
    (c, out)
}

#[derive(Default)]
struct Seen {
    acked: HashSet<String>,
    done: HashMap<String, u32>,
}

impl Seen {
    fn line(&mut self, line: &str) -> bool {
        // The test harness prints `test crash_child ... ` without a newline before the child's
        // first line, whatever that line is.
        let line = line.strip_prefix("test crash_child ... ").unwrap_or(line);
        if let Some(id) = line.strip_prefix("acked ") {
            self.acked.insert(id.to_string());
        } else if let Some(id) = line.strip_prefix("done ") {
            *self.done.entry(id.to_string()).or_default() += 1;
        } else if line == "finished" {
            return true;
        }
        false
    }
}

#[test]
fn kill_9_mid_run_loses_nothing_and_completes_nothing_twice() {
    let dir = tempfile::Builder::new().prefix("ncr").tempdir().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Seen::default();

    // First run: killed once a quarter of the tasks are done, with submissions still going.
    let (mut c, mut out) = child(dir.path(), "submit");
    let mut line = String::new();
    loop {
        assert!(Instant::now() < deadline, "the first child made no progress");
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            panic!("the first child exited before it was killed: {:?}", c.wait());
        }
        assert!(!seen.line(line.trim_end()), "the first child finished before it was killed");
        // Kill with work in flight: acknowledged submissions not yet seen done.
        if seen.done.len() >= TASKS / 4 && seen.acked.len() >= seen.done.len() + 25 {
            break;
        }
    }
    c.kill().unwrap(); // SIGKILL
    c.wait().unwrap();
    // Lines the child wrote before it died are still in the pipe.
    line.clear();
    while out.read_line(&mut line).unwrap() > 0 {
        seen.line(line.trim_end());
        line.clear();
    }
    let acked_at_kill = seen.acked.len();
    let done_at_kill = seen.done.len();

    // Second run: recovers and finishes everything.
    let (mut c, mut out) = child(dir.path(), "resume");
    loop {
        assert!(Instant::now() < deadline, "the second child did not finish");
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            panic!("the second child exited early: {:?}", c.wait());
        }
        if seen.line(line.trim_end()) {
            break;
        }
    }
    assert!(c.wait().unwrap().success());

    // The store, read directly.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (lost, not_done) = rt.block_on(async {
        let store = SqliteStore::open(SqliteConfig::new(dir.path().join("tasks.db"))).unwrap();
        let (mut lost, mut not_done) = (0, 0);
        for id in &seen.acked {
            match store.get(id.parse().unwrap(), UnixMs::now()).await.unwrap() {
                None => lost += 1,
                Some(t) if t.status != Status::Done => not_done += 1,
                Some(_) => {}
            }
        }
        store.close().await;
        (lost, not_done)
    });
    let duplicates = seen.done.values().filter(|&&n| n > 1).count();
    let executions = std::fs::read_to_string(dir.path().join("runs.log")).unwrap_or_default().lines().count();
    eprintln!(
        "kill -9 mid-run: submitted (acknowledged) {}, acknowledged at the kill {acked_at_kill}, done at the kill {done_at_kill}, \
         completed {}, lost {lost}, not done {not_done}, duplicate completions {duplicates}, executions {executions} \
         (re-executed {})",
        seen.acked.len(),
        seen.done.len(),
        executions.saturating_sub(seen.done.len()),
    );
    assert!(acked_at_kill < TASKS, "the kill came while submissions were in flight");
    assert_eq!(seen.acked.len(), acked_at_kill, "only the first run submits");
    assert_eq!(lost, 0, "acknowledged tasks lost");
    assert_eq!(not_done, 0, "acknowledged tasks not done");
    assert_eq!(duplicates, 0, "tasks completed twice");
    assert!(executions >= seen.done.len(), "every completion is an execution");
}

/// The child: owns the store, the engine and the task service; prints `acked <id>` for every
/// acknowledged submission, `done <id>` for every recorded completion, `finished` at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of kill_9_mid_run_loses_nothing_and_completes_nothing_twice"]
async fn crash_child() {
    let (Some(dir), Some(mode)) = (std::env::var_os(DIR), std::env::var(MODE).ok()) else { return };
    let dir = Path::new(&dir);
    let engine = Engine::new(EngineConfig::new(dir.join("run")));
    let manifest = common::procs_manifest();
    let profile = Profile { pool_limit: 2, concurrency: 32, queue_limit: 64, ..Profile::default() };
    let spec = AppSpec { name: "procs".into(), dir: dir.to_path_buf(), manifest: manifest.clone(), profile };
    engine.start(spec).await.unwrap();
    let store = SqliteStore::open(SqliteConfig::new(dir.join("tasks.db"))).unwrap();
    let tasks = Tasks::start(store, engine.clone(), TasksConfig::new("crash-node")).await.unwrap();
    let mut changes = tasks.watch();
    let printed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = printed.clone();
    let printer = tokio::spawn(async move {
        use std::io::Write;
        while let Ok(c) = changes.recv().await {
            if c.status == Some(Status::Done) {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "done {}", c.id);
                let _ = out.flush();
                count.fetch_add(1, std::sync::atomic::Ordering::Release);
            }
        }
    });
    tasks.set_app("procs", &manifest.procedures, Some(128)).await.unwrap();
    let log = dir.join("runs.log");
    if mode == "submit" {
        let t = tasks.clone();
        tokio::spawn(async move {
            use std::io::Write;
            for batch in 0..TASKS / 50 {
                let subs: Vec<Submission> = (0..50)
                    .map(|i| {
                        let n = batch * 50 + i;
                        Submission::new("procs.record", vec![json!(log.to_str().unwrap()), json!(n)])
                    })
                    .collect();
                let ids: Vec<String> =
                    t.submit_many(subs).await.unwrap().into_iter().map(|r| r.unwrap().id.to_string()).collect();
                {
                    let mut out = std::io::stdout().lock();
                    for id in ids {
                        let _ = writeln!(out, "acked {id}");
                    }
                    let _ = out.flush();
                }
                // Spread the submissions over the run, so the kill finds some in flight.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let c = tasks.counts().await.unwrap();
        if mode == "resume" && c.pending + c.running == 0 {
            break;
        }
    }
    tasks.shutdown(Duration::from_secs(5)).await;
    // Every completion this run recorded is printed before `finished`.
    let done = tasks.stats().done;
    tokio::time::timeout(Duration::from_secs(30), async {
        while printed.load(std::sync::atomic::Ordering::Acquire) < done {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("every completion printed");
    printer.abort();
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "finished");
        let _ = out.flush();
    }
    engine.shutdown().await;
    tasks.store().close().await;
}
