//! The task service end to end with real worker processes (the example procedures app), a real
//! engine and a real SQLite store: results, failures, timeouts, aborts, retries, expiry,
//! idempotency, a full engine queue, status changes.

mod common;

use std::time::Duration;

use common::{Node, Setup, WAIT};
use nodus_engine::profile::Profile;
use nodus_tasks::arpcp::SignalStatus;
use nodus_tasks::executor::{StatusChange, Waited};
use nodus_tasks::store::SqliteConfig;
use nodus_tasks::task::ErrorKind;
use nodus_tasks::{Status, Submission, SubmitError};
use serde_json::{json, Value};

fn sub(procedure: &str, args: Value) -> Submission {
    let Value::Array(args) = args else { panic!("args must be an array") };
    Submission::new(procedure, args)
}

async fn finished(node: &Node, s: Submission) -> nodus_tasks::executor::Finished {
    let (id, waited) = tokio::time::timeout(WAIT, node.tasks.run(s)).await.expect("in time").expect("submitted");
    match waited {
        Waited::Finished(f) => f,
        other => panic!("task {id} did not finish: {other:?}"),
    }
}

/// Waits for a status change matching `pred`.
async fn change(
    rx: &mut tokio::sync::broadcast::Receiver<StatusChange>,
    pred: impl Fn(&StatusChange) -> bool,
) -> StatusChange {
    tokio::time::timeout(WAIT, async {
        loop {
            let c = rx.recv().await.expect("changes");
            if pred(&c) {
                return c;
            }
        }
    })
    .await
    .expect("the change came in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_and_async_tasks_return_what_the_worker_wrote() {
    let node = Node::start(Setup::default()).await;
    let f = finished(&node, sub("procs.add", json!([40, 2]))).await;
    assert_eq!(f.status, Status::Done);
    assert_eq!(f.result.unwrap().get(), "42");
    let f = finished(&node, sub("procs.echo", json!([{"nested": [1, "two", null]}]))).await;
    assert_eq!(f.result.unwrap().get(), r#"{"nested":[1,"two",null]}"#);
    // A reply that is not JSON becomes a string.
    let f = finished(&node, sub("procs.greet", json!(["ada"]))).await;
    assert_eq!(f.result.unwrap().get(), r#""hello, ada""#);

    // Async: the id at once, the result from the store later.
    let s = node.tasks.submit(sub("procs.concat", json!(["ab", "cd"]))).await.unwrap();
    assert!(!s.existing);
    let waited = node.tasks.wait(&s.id, WAIT).await.unwrap();
    assert!(matches!(waited, Waited::Finished(ref f) if f.result.as_ref().unwrap().get() == r#""abcd""#), "{waited:?}");
    let t = node.tasks.get(&s.id).await.unwrap().unwrap();
    assert_eq!((t.status, t.attempt, t.procedure.as_str()), (Status::Done, 1, "procs.concat"));
    assert_eq!(t.args.get(), r#"["ab","cd"]"#);
    assert!(t.started_at.is_some() && t.finished_at.is_some() && t.expires_at.is_some());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_come_before_anything_runs() {
    let node = Node::start(Setup::default()).await;
    let e = node.tasks.submit(sub("procs.nope", json!([]))).await.unwrap_err();
    assert!(matches!(e, SubmitError::UnknownProcedure(_)), "{e}");
    let e = node.tasks.submit(sub("nope.add", json!([1, 2]))).await.unwrap_err();
    assert!(matches!(e, SubmitError::UnknownProcedure(_)), "{e}");
    let e = node.tasks.submit(sub("procs.add", json!([1]))).await.unwrap_err();
    assert!(matches!(&e, SubmitError::BadArguments(m) if m.contains("takes 2 arguments, got 1")), "{e}");
    let e = node.tasks.submit(sub("procs.add", json!([1, "2"]))).await.unwrap_err();
    assert!(matches!(&e, SubmitError::BadArguments(m) if m.contains("(b) must be number")), "{e}");
    let e =
        node.tasks.submit(Submission { key: Some(String::new()), ..sub("procs.noop", json!([])) }).await.unwrap_err();
    assert!(matches!(e, SubmitError::Invalid(_)), "{e}");
    assert_eq!(node.tasks.counts().await.unwrap().total(), 0, "nothing was stored");
    assert_eq!(node.tasks.stats().started, 0, "nothing ran");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_procedure_ends_in_error_with_its_message() {
    let node = Node::start(Setup::default()).await;
    let f = finished(&node, sub("procs.fail", json!(["division by zero"]))).await;
    assert_eq!(f.status, Status::Error);
    let e = f.error.unwrap();
    assert_eq!(e.kind, ErrorKind::RunningError);
    assert!(e.message.contains("division by zero"), "{}", e.message);
    assert_eq!(node.tasks.stats().retried, 0, "a procedure error is not retried");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_past_its_timeout_is_cancelled_and_timed_out() {
    let node = Node::start(Setup::default()).await;
    let started = tokio::time::Instant::now();
    let s = Submission { timeout: Some(Duration::from_millis(300)), ..sub("procs.sleep", json!([20_000])) };
    let f = finished(&node, s).await;
    assert_eq!(f.status, Status::Error);
    assert_eq!(f.error.unwrap().kind, ErrorKind::TimedOut);
    assert!(started.elapsed() < Duration::from_secs(10), "timed out at its timeout, not the sleep's end");
    // The app keeps serving.
    assert_eq!(finished(&node, sub("procs.add", json!([1, 1]))).await.result.unwrap().get(), "2");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborting_tasks_cancels_their_worker_sessions() {
    // One worker taking one call at a time: the first task runs, the second waits in the
    // engine's queue.
    let mut setup = Setup::default();
    setup.profile = Profile { pool_limit: 1, concurrency: 1, ..setup.profile };
    let node = Node::start(setup).await;
    let mut changes = node.tasks.watch();
    let running = node.tasks.submit(sub("procs.sleep", json!([1_500]))).await.unwrap();
    let c = change(&mut changes, |c| c.id == running.id && c.status == Some(Status::Running)).await;
    assert_eq!((c.attempt, &*c.procedure), (1, "procs.sleep"));
    let queued = node.tasks.submit(sub("procs.sleep", json!([60_000]))).await.unwrap();
    change(&mut changes, |c| c.id == queued.id && c.status == Some(Status::Running)).await;
    let waiter = {
        let tasks = node.tasks.clone();
        let id = running.id.clone();
        tokio::spawn(async move { tasks.wait(&id, WAIT).await })
    };

    // The queued call is withdrawn from the engine: it never runs.
    assert_eq!(node.tasks.abort(&queued.id).await.unwrap(), Some(Status::Running));
    tokio::time::timeout(WAIT, async {
        while node.engine.info("procs").await.unwrap().queued > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the queued call was withdrawn");

    // The running one is interrupted at once; its worker's late answer is dropped.
    assert_eq!(node.tasks.abort(&running.id).await.unwrap(), Some(Status::Running));
    let c = change(&mut changes, |c| c.id == running.id).await;
    assert_eq!(c.status, Some(Status::Interrupted));
    match waiter.await.unwrap().unwrap() {
        Waited::Finished(f) => assert_eq!((f.status, f.error.unwrap().kind), (Status::Interrupted, ErrorKind::Aborted)),
        other => panic!("{other:?}"),
    }
    // Once the worker is done with the abandoned call, nothing is left open, and the task is
    // still interrupted.
    tokio::time::timeout(WAIT, async {
        while node.engine.info("procs").await.unwrap().sessions > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the worker finished the abandoned call");
    for id in [&running.id, &queued.id] {
        assert_eq!(node.tasks.get(id).await.unwrap().unwrap().status, Status::Interrupted);
    }
    assert_eq!(node.tasks.stats().done, 0);
    // Aborting again changes nothing; an unknown id is None.
    assert_eq!(node.tasks.abort(&running.id).await.unwrap(), Some(Status::Interrupted));
    assert_eq!(node.tasks.abort(&"no-such-task".parse().unwrap()).await.unwrap(), None);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_task_is_retried_and_the_task_completes_once() {
    let node = Node::start(Setup::default()).await;
    let marker = node.path("crashed-once");
    let f = finished(&node, sub("procs.crash_once", json!([marker.to_str().unwrap()]))).await;
    assert_eq!(f.status, Status::Done, "{:?}", f.error);
    assert_eq!(f.result.unwrap().get(), r#""survived""#);
    assert!(marker.exists(), "the first attempt did crash its worker");
    let stats = node.tasks.stats();
    assert_eq!((stats.retried, stats.done, stats.stale), (1, 1, 0));
    let t = node.tasks.list(nodus_tasks::store::ListFilter { limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(t.len(), 1);
    assert_eq!((t[0].status, t[0].attempt), (Status::Done, 2));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_run_out_for_a_worker_that_always_crashes() {
    let mut setup = Setup::default();
    setup.profile.crash_limit = 100;
    setup.tasks.sched.retry_min = Duration::from_millis(10);
    let node = Node::start(setup).await;
    let f = finished(&node, Submission { max_attempts: Some(3), ..sub("procs.crash", json!([])) }).await;
    assert_eq!(f.status, Status::Error);
    let e = f.error.unwrap();
    assert_eq!(e.kind, ErrorKind::WorkerFailed);
    assert!(e.message.contains("all 3 attempts"), "{}", e.message);
    assert_eq!(node.tasks.stats().retried, 2);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_expire_after_the_result_ttl() {
    let mut setup = Setup {
        store: Box::new(|dir| {
            let mut c = SqliteConfig::new(dir.join("tasks.db"));
            c.result_ttl = Duration::from_millis(300);
            c
        }),
        ..Setup::default()
    };
    setup.tasks.sched.purge_interval = Duration::from_millis(100);
    let node = Node::start(setup).await;
    let s = node.tasks.submit(sub("procs.add", json!([1, 2]))).await.unwrap();
    assert!(matches!(node.tasks.wait(&s.id, WAIT).await.unwrap(), Waited::Finished(_)));
    assert!(node.tasks.get(&s.id).await.unwrap().is_some());
    tokio::time::timeout(WAIT, async {
        while node.tasks.get(&s.id).await.unwrap().is_some() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the result expired");
    assert!(matches!(node.tasks.wait(&s.id, Duration::from_millis(10)).await.unwrap(), Waited::Unknown));
    // The purge deletes it from the file too.
    tokio::time::timeout(WAIT, async {
        loop {
            let conn = rusqlite_count(&node.path("tasks.db"));
            if conn == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("purged");
    node.stop().await;
}

/// Rows in the tasks table, read with a connection of its own.
fn rusqlite_count(path: &std::path::Path) -> i64 {
    let c = rusqlite::Connection::open(path).unwrap();
    c.query_row("SELECT count(*) FROM tasks", [], |r| r.get(0)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_returns_the_existing_task_and_runs_it_once() {
    let node = Node::start(Setup::default()).await;
    let log = node.path("runs.log");
    let keyed =
        || Submission { key: Some("order-42".into()), ..sub("procs.record", json!([log.to_str().unwrap(), "x"])) };
    let first = node.tasks.submit(keyed()).await.unwrap();
    let again = node.tasks.submit(keyed()).await.unwrap();
    assert!(!first.existing && again.existing);
    assert_eq!(first.id, again.id);
    assert!(matches!(node.tasks.wait(&first.id, WAIT).await.unwrap(), Waited::Finished(_)));
    let third = node.tasks.submit(keyed()).await.unwrap();
    assert_eq!((third.id, third.existing), (first.id.clone(), true), "finished tasks keep their key");
    assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 1, "ran once");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_engine_queue_never_drops_a_task() {
    // One worker running one call at a time and one call queued, while the executor is allowed
    // 50 in flight: the engine refuses most calls, and the tasks wait in the store.
    let mut setup = Setup::default();
    setup.profile = Profile { pool_limit: 1, concurrency: 1, queue_limit: 1, ..setup.profile };
    setup.limit = 50;
    let node = Node::start(setup).await;
    let subs: Vec<Submission> = (0..200).map(|i| sub("procs.add", json!([i, 1]))).collect();
    let ids: Vec<_> = node.tasks.submit_many(subs).await.unwrap().into_iter().map(|r| r.unwrap().id).collect();
    for (i, id) in ids.iter().enumerate() {
        match node.tasks.wait(id, WAIT).await.unwrap() {
            Waited::Finished(f) => assert_eq!(f.result.unwrap().get(), (i + 1).to_string()),
            other => panic!("{id}: {other:?}"),
        }
    }
    let stats = node.tasks.stats();
    assert_eq!(stats.done, 200);
    assert!(stats.released > 0, "the engine's queue was full at times: {stats:?}");
    assert_eq!(stats.retried, 0);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_mark_done_and_terminate() {
    let node = Node::start(Setup::default()).await;
    let mut changes = node.tasks.watch();
    let a = node.tasks.submit(sub("procs.sleep", json!([60_000]))).await.unwrap();
    change(&mut changes, |c| c.id == a.id && c.status == Some(Status::Running)).await;
    assert_eq!(node.tasks.signal(&a.id, SignalStatus::Accepted).await.unwrap(), Some(Status::Running));
    assert_eq!(node.tasks.signal(&a.id, SignalStatus::Done).await.unwrap(), Some(Status::Running));
    let t = node.tasks.get(&a.id).await.unwrap().unwrap();
    assert_eq!((t.status, t.result.unwrap().get()), (Status::Done, "null"));
    let b = node.tasks.submit(sub("procs.sleep", json!([60_000]))).await.unwrap();
    change(&mut changes, |c| c.id == b.id && c.status == Some(Status::Running)).await;
    assert_eq!(node.tasks.signal(&b.id, SignalStatus::Terminate).await.unwrap(), Some(Status::Running));
    let gone = change(&mut changes, |c| c.id == b.id && c.status.is_none()).await;
    assert_eq!(gone.status_name(), "deleted");
    assert!(node.tasks.get(&b.id).await.unwrap().is_none());
    assert_eq!(node.tasks.signal(&b.id, SignalStatus::ClientError).await.unwrap(), None);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_is_watched_in_order() {
    let node = Node::start(Setup::default()).await;
    let mut changes = node.tasks.watch();
    let s = node.tasks.submit(sub("procs.add", json!([2, 3]))).await.unwrap();
    let mut seen = Vec::new();
    while seen.last().map(|c: &StatusChange| c.status) != Some(Some(Status::Done)) {
        seen.push(change(&mut changes, |c| c.id == s.id).await);
    }
    let statuses: Vec<&str> = seen.iter().map(StatusChange::status_name).collect();
    assert_eq!(statuses, vec!["pending", "running", "done"]);
    assert!(seen.iter().all(|c| &*c.procedure == "procs.add"));
    assert_eq!(seen.iter().map(|c| c.attempt).collect::<Vec<_>>(), vec![0, 1, 1]);
    node.stop().await;
}

/// Starts the Rust procedures app (`manifest`, in `dir`) on `engine`.
async fn start_procs(
    engine: &nodus_engine::Engine,
    dir: &std::path::Path,
    manifest: &nodus_engine::manifest::Manifest,
    profile: nodus_engine::profile::Profile,
) {
    let spec =
        nodus_engine::AppSpec { name: "procs".into(), dir: dir.to_path_buf(), manifest: manifest.clone(), profile };
    engine.start(spec).await.unwrap();
}

/// A store that forces interleavings a loaded machine produces now and then. With `late_ack`,
/// submissions are answered only once a claim handed a task out: the executor starts a task
/// before its submitter hears that it is stored. With `interrupt_first` set, the next
/// submission first interrupts that task: a kill of a parent landing between the executor's
/// check of the parent and the insert of its subtask.
#[derive(Clone)]
struct LateAck {
    inner: nodus_tasks::SqliteStore,
    claimed: std::sync::Arc<tokio::sync::Notify>,
    late_ack: bool,
    interrupt_first: std::sync::Arc<std::sync::Mutex<Option<nodus_tasks::TaskId>>>,
}

impl LateAck {
    fn new(inner: nodus_tasks::SqliteStore, late_ack: bool) -> LateAck {
        LateAck { inner, claimed: Default::default(), late_ack, interrupt_first: Default::default() }
    }
}

impl nodus_tasks::Store for LateAck {
    async fn submit(
        &self,
        tasks: Vec<nodus_tasks::task::NewTask>,
    ) -> Result<Vec<nodus_tasks::task::Submitted>, nodus_tasks::StoreError> {
        let first = self.interrupt_first.lock().unwrap().take();
        if let Some(id) = first {
            let now = nodus_tasks::UnixMs::now();
            self.inner.command(id, nodus_tasks::store::Command::Interrupt, now).await?.expect("the task to interrupt");
        }
        let stored = self.inner.submit(tasks).await;
        if self.late_ack {
            tokio::time::timeout(WAIT, self.claimed.notified()).await.expect("a claim took the task");
        }
        stored
    }
    async fn claim(
        &self,
        claim: nodus_tasks::store::Claim,
    ) -> Result<Vec<nodus_tasks::task::Claimed>, nodus_tasks::StoreError> {
        let claimed = self.inner.claim(claim).await;
        if claimed.as_ref().is_ok_and(|c| !c.is_empty()) {
            self.claimed.notify_one();
        }
        claimed
    }
    async fn finish(
        &self,
        batch: Vec<nodus_tasks::store::Finish>,
    ) -> Result<Vec<nodus_tasks::store::Fenced>, nodus_tasks::StoreError> {
        self.inner.finish(batch).await
    }
    async fn command(
        &self,
        id: nodus_tasks::TaskId,
        command: nodus_tasks::store::Command,
        now: nodus_tasks::UnixMs,
    ) -> Result<Option<nodus_tasks::store::Commanded>, nodus_tasks::StoreError> {
        self.inner.command(id, command, now).await
    }
    async fn recover(&self, owner: String, now: nodus_tasks::UnixMs) -> Result<u64, nodus_tasks::StoreError> {
        self.inner.recover(owner, now).await
    }
    async fn reap(&self, now: nodus_tasks::UnixMs) -> Result<u64, nodus_tasks::StoreError> {
        self.inner.reap(now).await
    }
    async fn expire(
        &self,
        now: nodus_tasks::UnixMs,
        max: usize,
    ) -> Result<Vec<nodus_tasks::store::Expired>, nodus_tasks::StoreError> {
        self.inner.expire(now, max).await
    }
    async fn purge(&self, now: nodus_tasks::UnixMs, max: usize) -> Result<u64, nodus_tasks::StoreError> {
        self.inner.purge(now, max).await
    }
    async fn get(
        &self,
        id: nodus_tasks::TaskId,
        now: nodus_tasks::UnixMs,
    ) -> Result<Option<nodus_tasks::Task>, nodus_tasks::StoreError> {
        self.inner.get(id, now).await
    }
    async fn list(
        &self,
        filter: nodus_tasks::store::ListFilter,
        now: nodus_tasks::UnixMs,
    ) -> Result<Vec<nodus_tasks::Task>, nodus_tasks::StoreError> {
        self.inner.list(filter, now).await
    }
    async fn pending_apps(&self) -> Result<Vec<String>, nodus_tasks::StoreError> {
        self.inner.pending_apps().await
    }
    async fn counts(&self, now: nodus_tasks::UnixMs) -> Result<nodus_tasks::store::Counts, nodus_tasks::StoreError> {
        self.inner.counts(now).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_started_before_its_submitter_heard_it_is_stored_is_watched_pending_first() {
    let dir = tempfile::Builder::new().prefix("ntk").tempdir().unwrap();
    let engine = nodus_engine::Engine::new(nodus_engine::EngineConfig::new(dir.path().join("run")));
    let manifest = common::procs_manifest();
    let setup = Setup::default();
    start_procs(&engine, dir.path(), &manifest, setup.profile).await;
    let inner = nodus_tasks::SqliteStore::open(SqliteConfig::new(dir.path().join("tasks.db"))).unwrap();
    let store = LateAck::new(inner.clone(), true);
    // The executor polls every 200 ms: a poll claims the task while its submission waits.
    let tasks = nodus_tasks::Tasks::start(store, engine.clone(), setup.tasks).await.unwrap();
    tasks.set_app("procs", &manifest.procedures, Some(8)).await.unwrap();
    let mut changes = tasks.watch();
    let s = tokio::time::timeout(WAIT, tasks.submit(sub("procs.add", json!([2, 3])))).await.unwrap().unwrap();
    let mut seen = Vec::new();
    while seen.last().map(|c: &StatusChange| c.status) != Some(Some(Status::Done)) {
        seen.push(change(&mut changes, |c| c.id == s.id).await);
    }
    let statuses: Vec<&str> = seen.iter().map(StatusChange::status_name).collect();
    assert_eq!(statuses, vec!["pending", "running", "done"]);
    tasks.shutdown(Duration::from_secs(2)).await;
    engine.shutdown().await;
    inner.close().await;
}

/// A parent killed between the check of a subtask's parent and the subtask's insert (so the
/// kill's search for subtasks did not find it) does not leave the subtask running: the
/// submission looks at its parent again once stored and kills the subtask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subtask_stored_as_its_parent_is_killed_is_killed_too() {
    let dir = tempfile::Builder::new().prefix("ntk").tempdir().unwrap();
    let engine = nodus_engine::Engine::new(nodus_engine::EngineConfig::new(dir.path().join("run")));
    let manifest = common::procs_manifest();
    let setup = Setup::default();
    let inner = nodus_tasks::SqliteStore::open(SqliteConfig::new(dir.path().join("tasks.db"))).unwrap();
    let store = LateAck::new(inner.clone(), false);
    let tasks = nodus_tasks::Tasks::start(store.clone(), engine.clone(), setup.tasks).await.unwrap();
    // The app does not run yet: the parent waits in the store, unfinished.
    tasks.set_app("procs", &manifest.procedures, None).await.unwrap();
    let parent = tasks.submit(sub("procs.add", json!([1, 2]))).await.unwrap().id;
    *store.interrupt_first.lock().unwrap() = Some(parent.clone());
    let child = tasks.submit(Submission { parent: Some(parent.clone()), ..sub("procs.add", json!([3, 4])) });
    let child = child.await.expect("the parent was running when checked").id;
    assert_eq!(tasks.get(&parent).await.unwrap().unwrap().status, Status::Interrupted);
    assert_eq!(
        tasks.get(&child).await.unwrap().unwrap().status,
        Status::Interrupted,
        "the subtask outlived its parent"
    );
    // Run the app: the killed subtask never does.
    start_procs(&engine, dir.path(), &manifest, setup.profile).await;
    tasks.set_app("procs", &manifest.procedures, Some(8)).await.unwrap();
    let other = tasks.submit(sub("procs.add", json!([5, 6]))).await.unwrap().id;
    assert!(matches!(tasks.wait(&other, WAIT).await.unwrap(), Waited::Finished(_)));
    assert_eq!(tasks.get(&child).await.unwrap().unwrap().status, Status::Interrupted);
    tasks.shutdown(Duration::from_secs(2)).await;
    engine.shutdown().await;
    inner.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_status_notifications_reach_an_app_event() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("status.log");
    let mut manifest = common::procs_manifest();
    manifest.env.insert("PROCS_STATUS_LOG".into(), log.to_string_lossy().into_owned());
    let setup = Setup { app: Some(("procs".into(), dir.path().to_path_buf(), manifest)), ..Setup::default() };
    let node = Node::start(setup).await;
    let target: nodus_tasks::notify::Target = "app:procs.task_status".parse().unwrap();
    let nodus_tasks::notify::Target::AppEvent { app, event } = target else { unreachable!() };
    tokio::spawn(nodus_tasks::notify::forward_to_app(node.tasks.clone(), node.engine.clone(), app, event));
    let s = node.tasks.submit(sub("procs.add", json!([1, 2]))).await.unwrap();
    assert!(matches!(node.tasks.wait(&s.id, WAIT).await.unwrap(), Waited::Finished(_)));
    let mut seen: Vec<Value> = Vec::new();
    tokio::time::timeout(WAIT, async {
        while seen.len() < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            seen = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .filter(|v: &Value| v["id"] == s.id.as_str())
                .collect();
        }
    })
    .await
    .expect("three notifications");
    let mut statuses: Vec<&str> = seen.iter().map(|v| v["status"].as_str().unwrap()).collect();
    statuses.sort();
    assert_eq!(statuses, vec!["done", "pending", "running"]);
    assert!(seen.iter().all(|v| v["command"] == "TASK_STATUS" && v["procedure"] == "procs.add"));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_of_an_app_that_does_not_run_wait_in_the_store() {
    let node = Node::start(Setup::default()).await;
    let procedures = common::procs_manifest().procedures;
    node.tasks.set_app("procs", &procedures, None).await.unwrap();
    let s = node.tasks.submit(sub("procs.add", json!([5, 5]))).await.unwrap();
    // The executor polls every 200 ms in these tests: three polls, and still pending.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(node.tasks.get(&s.id).await.unwrap().unwrap().status, Status::Pending);
    assert_eq!(node.tasks.stats().started, 0);
    node.tasks.set_app("procs", &procedures, Some(8)).await.unwrap();
    match node.tasks.wait(&s.id, WAIT).await.unwrap() {
        Waited::Finished(f) => assert_eq!(f.result.unwrap().get(), "10"),
        other => panic!("{other:?}"),
    }
    node.stop().await;
}

/// Killing a task interrupts its subtasks at any depth, waiting ones included (they never run),
/// tells their waiters, leaves unrelated tasks alone, and refuses new subtasks of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_task_interrupts_its_subtasks_at_any_depth() {
    let node = Node::start(Setup::default()).await;
    let procedures = common::procs_manifest().procedures;
    // The app does not run: every task waits in the store.
    node.tasks.set_app("procs", &procedures, None).await.unwrap();
    let submit = |parent: Option<nodus_tasks::TaskId>| {
        let tasks = node.tasks.clone();
        async move { tasks.submit(Submission { parent, ..sub("procs.add", json!([1, 2])) }).await.unwrap().id }
    };
    let root = submit(None).await;
    let child = submit(Some(root.clone())).await;
    let grandchild = submit(Some(child.clone())).await;
    let other = submit(None).await;
    let waiter = {
        let tasks = node.tasks.clone();
        let id = grandchild.clone();
        tokio::spawn(async move { tasks.wait(&id, WAIT).await })
    };
    let killed = node.tasks.kill(&root).await.unwrap().expect("known");
    assert_eq!(killed.before, Status::Pending);
    assert_eq!(killed.subtasks, vec![child.clone(), grandchild.clone()], "breadth first");
    match waiter.await.unwrap().unwrap() {
        Waited::Finished(f) => assert_eq!(f.status, Status::Interrupted),
        other => panic!("the waiter was not told: {other:?}"),
    }
    // A killed task starts no subtasks; an unknown one neither.
    let e = node.tasks.submit(Submission { parent: Some(root.clone()), ..sub("procs.noop", json!([])) }).await;
    assert!(matches!(&e, Err(SubmitError::Parent(m)) if m.contains("interrupted")), "{e:?}");
    let e = node.tasks.submit(Submission { parent: Some("nope".parse().unwrap()), ..sub("procs.noop", json!([])) });
    assert!(matches!(e.await, Err(SubmitError::Parent(_))));
    // The app runs now: only the unrelated task does.
    node.tasks.set_app("procs", &procedures, Some(8)).await.unwrap();
    assert!(matches!(node.tasks.wait(&other, WAIT).await.unwrap(), Waited::Finished(f) if f.status == Status::Done));
    for id in [&root, &child, &grandchild] {
        let t = node.tasks.get(id).await.unwrap().unwrap();
        assert_eq!((t.status, t.attempt), (Status::Interrupted, 0), "{id} never ran");
    }
    assert_eq!(node.tasks.stats().started, 1);
    node.stop().await;
}

/// A task whose deadline passes while it waits in the store is finished as expired at its
/// deadline (its waiter told at once, not at a claim), never started, and counted; one already
/// expired is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_past_its_deadline_is_expired_in_the_store_and_never_started() {
    let node = Node::start(Setup::default()).await;
    let procedures = common::procs_manifest().procedures;
    node.tasks.set_app("procs", &procedures, None).await.unwrap();
    let now = nodus_tasks::UnixMs::now();
    let s = Submission { deadline: Some(now.plus(Duration::from_millis(300))), ..sub("procs.add", json!([1, 2])) };
    let (id, waited) = tokio::time::timeout(WAIT, node.tasks.run(s)).await.unwrap().unwrap();
    let Waited::Finished(f) = waited else { panic!("{waited:?}") };
    assert_eq!(f.status, Status::Error);
    assert_eq!(f.error.as_ref().unwrap().kind, ErrorKind::Expired);
    let t = node.tasks.get(&id).await.unwrap().unwrap();
    assert_eq!((t.status, t.attempt, t.deadline), (Status::Error, 0, Some(now.plus(Duration::from_millis(300)))));
    assert_eq!(node.tasks.stats().expired, 1);
    let e = node.tasks.submit(Submission { deadline: Some(now), ..sub("procs.add", json!([1, 2])) }).await;
    assert!(matches!(&e, Err(SubmitError::Expired(m)) if m.contains("expired")), "{e:?}");
    assert_eq!(e.unwrap_err().code(), nodus_tasks::arpcp::Code::Malformed);
    node.tasks.set_app("procs", &procedures, Some(8)).await.unwrap();
    assert_eq!(finished(&node, sub("procs.add", json!([2, 2]))).await.result.unwrap().get(), "4");
    assert_eq!(node.tasks.stats().started, 1, "the expired task never started");
    node.stop().await;
}
