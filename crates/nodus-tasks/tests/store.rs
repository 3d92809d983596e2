//! The SQLite store: the store contract, plus what only a real file can show (durability across
//! a reopen, the size bound, group commit under concurrent load, closing).

use std::sync::Arc;
use std::time::Duration;

use nodus_tasks::store::{contract, Claim, SqliteConfig, SqliteStore, Store, StoreError, Synchronous};
use nodus_tasks::task::{json, NewTask, Status, TaskId, UnixMs};

fn config(dir: &std::path::Path, name: &str) -> SqliteConfig {
    let mut c = SqliteConfig::new(dir.join(name));
    c.result_ttl = contract::RESULT_TTL;
    c
}

fn new_task(n: u64, args: &str) -> NewTask {
    let mut rng = rand::thread_rng();
    NewTask {
        id: TaskId::generate(UnixMs(1_000 + n), &mut rng),
        procedure: "procs.add".into(),
        app: "procs".into(),
        args: json(args).unwrap(),
        max_attempts: 3,
        timeout: Duration::from_secs(5),
        parent: None,
        key: None,
        created_at: UnixMs(1_000 + n),
        deadline: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_meets_the_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    contract::run(|| {
        n += 1;
        let c = config(dir.path(), &format!("contract-{n}.db"));
        async move { SqliteStore::open(c).expect("open store") }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_with_synchronous_normal_meets_the_contract_too() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    contract::run(|| {
        n += 1;
        let mut c = config(dir.path(), &format!("normal-{n}.db"));
        c.synchronous = Synchronous::Normal;
        async move { SqliteStore::open(c).expect("open store") }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_tasks_survive_a_reopen_and_leases_keep_increasing() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), "nested/dir/tasks.db");
    let store = SqliteStore::open(c.clone()).unwrap();
    let tasks: Vec<NewTask> = (0..50).map(|n| new_task(n, "[1, 2]")).collect();
    let ids: Vec<TaskId> = tasks.iter().map(|t| t.id.clone()).collect();
    store.submit(tasks).await.unwrap();
    let claim = |now| Claim {
        app: "procs".into(),
        owner: "n1".into(),
        max: 10,
        now: UnixMs(now),
        lease_grace: Duration::from_secs(1),
    };
    let first = store.claim(claim(2_000)).await.unwrap();
    let top = first.iter().map(|c| c.lease).max().unwrap();
    store.close().await;
    assert!(matches!(store.get(ids[0].clone(), UnixMs(2_000)).await, Err(StoreError::Closed)));
    assert!(matches!(store.submit(vec![new_task(99, "[]")]).await, Err(StoreError::Closed)));

    let store = SqliteStore::open(c).unwrap();
    for id in &ids {
        assert!(store.get(id.clone(), UnixMs(2_000)).await.unwrap().is_some(), "{id} lost");
    }
    let counts = store.counts(UnixMs(2_000)).await.unwrap();
    assert_eq!((counts.pending, counts.running), (40, 10));
    assert_eq!(store.recover("n1".into(), UnixMs(3_000)).await.unwrap(), 10);
    let again = store.claim(claim(3_000)).await.unwrap();
    assert!(again.iter().all(|c| c.lease > top), "tokens never repeat across a reopen");
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_refuses_submissions_and_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), "small.db");
    c.max_bytes = 256 * 1024;
    let store = SqliteStore::open(c).unwrap();
    let big = format!("[\"{}\"]", "x".repeat(8 * 1024));
    let mut stored = Vec::new();
    let err = loop {
        let t = new_task(stored.len() as u64, &big);
        let id = t.id.clone();
        match store.submit(vec![t]).await {
            Ok(_) => stored.push(id),
            Err(e) => break e,
        }
        assert!(stored.len() < 1000, "the size bound never hit");
    };
    assert!(matches!(err, StoreError::Full(_)), "{err:?}");
    assert!(err.to_string().contains("max_store_bytes"), "{err}");
    // What was stored is still there, and the store still answers.
    assert!(!stored.is_empty());
    for id in &stored {
        assert_eq!(store.get(id.clone(), UnixMs(5_000)).await.unwrap().unwrap().status, Status::Pending);
    }
    let small = store.submit(vec![new_task(7, "[]")]).await;
    assert!(small.is_ok() || matches!(small, Err(StoreError::Full(_))), "{small:?}");
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submissions_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(config(dir.path(), "group.db")).unwrap());
    let before = store.writer_stats();
    let mut joins = Vec::new();
    for n in 0..2000 {
        let s = store.clone();
        joins.push(tokio::spawn(async move { s.submit(vec![new_task(n, "[]")]).await }));
    }
    for j in joins {
        j.await.unwrap().unwrap();
    }
    let after = store.writer_stats();
    let (commits, ops) = (after.commits - before.commits, after.operations - before.operations);
    assert_eq!(ops, 2000);
    assert!(commits < ops, "2000 concurrent submissions took {commits} commits: no grouping");
    assert_eq!(store.counts(UnixMs(10_000)).await.unwrap().pending, 2000);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_is_not_a_task_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.db");
    std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
    let err = SqliteStore::open(SqliteConfig::new(&path)).unwrap_err();
    assert!(matches!(err, StoreError::Failed(_)), "{err:?}");
}

/// A database made by a nodus of schema version 2 (no deadlines): opening it migrates it to
/// version 3, its tasks are kept and run, and new ones take deadlines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_2_database_is_migrated_and_keeps_its_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v2.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        // The version-2 schema as it shipped (tasks, meta, agents).
        conn.execute_batch(
            "CREATE TABLE tasks (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, procedure TEXT NOT NULL,
                 app TEXT NOT NULL, args TEXT NOT NULL, status TEXT NOT NULL, attempt INTEGER NOT NULL,
                 max_attempts INTEGER NOT NULL, timeout_ms INTEGER NOT NULL, lease INTEGER NOT NULL, owner TEXT,
                 lease_until INTEGER, parent TEXT, key TEXT, created_at INTEGER NOT NULL, run_after INTEGER NOT NULL,
                 started_at INTEGER, finished_at INTEGER, expires_at INTEGER, result TEXT, error_kind TEXT,
                 error TEXT);
             CREATE INDEX tasks_pending ON tasks(app, seq) WHERE status = 'pending';
             CREATE INDEX tasks_running ON tasks(lease_until) WHERE status = 'running';
             CREATE INDEX tasks_expiry ON tasks(expires_at) WHERE expires_at IS NOT NULL;
             CREATE UNIQUE INDEX tasks_key ON tasks(key) WHERE key IS NOT NULL;
             CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
             INSERT INTO meta (name, value) VALUES ('next_lease', 7);
             CREATE TABLE agents (name TEXT PRIMARY KEY, id TEXT NOT NULL UNIQUE, ip TEXT NOT NULL, mac TEXT NOT NULL,
                 cores INTEGER NOT NULL, memory INTEGER NOT NULL, concurrency INTEGER NOT NULL, queue INTEGER NOT NULL,
                 first_seen INTEGER NOT NULL, last_seen INTEGER NOT NULL, state TEXT NOT NULL,
                 state_since INTEGER NOT NULL, banned INTEGER NOT NULL);
             INSERT INTO tasks (id, procedure, app, args, status, attempt, max_attempts, timeout_ms, lease, parent,
                 created_at, run_after) VALUES ('old-1', 'procs.add', 'procs', '[1]', 'pending', 0, 1, 1000, 0,
                 'old-0', 5, 5);
             PRAGMA user_version = 2;",
        )
        .unwrap();
    }
    let s = SqliteStore::open(config(dir.path(), "v2.db")).unwrap();
    let old = s.get("old-1".parse().unwrap(), UnixMs(10)).await.unwrap().expect("the old task is kept");
    assert_eq!((old.deadline, old.parent.as_ref().map(TaskId::as_str)), (None, Some("old-0")));
    let mut t = new_task(1, "[2]");
    t.deadline = Some(UnixMs(2_000));
    s.submit(vec![t.clone()]).await.unwrap();
    assert_eq!(s.get(t.id.clone(), UnixMs(1_500)).await.unwrap().unwrap().deadline, Some(UnixMs(2_000)));
    let claim = |now| Claim { app: "procs".into(), owner: "n".into(), max: 5, now, lease_grace: Duration::ZERO };
    let got = s.claim(claim(UnixMs(2_000))).await.unwrap();
    assert_eq!(got.len(), 1, "the old task is claimed, the new one's deadline has passed");
    assert_eq!((got[0].id.as_str(), got[0].lease.0), ("old-1", 7), "leases go on from the stored counter");
    assert_eq!(s.expire(UnixMs(2_000), 10).await.unwrap().len(), 1);
    s.close().await;
    let conn = rusqlite::Connection::open(&path).unwrap();
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, 3);
}
