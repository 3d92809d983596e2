//! The PostgreSQL store against a real server: the store contract (both claim modes), what only
//! a shared database shows (concurrent claimers on separate connections never take a task twice,
//! several nodes migrating at once, news between nodes over LISTEN/NOTIFY), group commit, and
//! the errors a node gets at start when the database is not there.

mod pgtest;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use nodus_tasks::cluster::registry::{Agent, AgentState, AgentStore};
use nodus_tasks::store::{
    contract, AnyStore, Claim, ClaimMode, Command, Fenced, Finish, Outcome, PgConfig, PgStore, Store, StoreSpec, Wake,
};
use nodus_tasks::task::{json, NewTask, Status, TaskId, UnixMs};

const WAIT: Duration = Duration::from_secs(30);

fn new_task(n: u64, app: &str) -> NewTask {
    let mut rng = rand::thread_rng();
    NewTask {
        id: TaskId::generate(UnixMs(1_000 + n), &mut rng),
        procedure: format!("{app}.work"),
        app: app.into(),
        args: json(&format!("[{n}]")).unwrap(),
        max_attempts: 3,
        timeout: Duration::from_secs(5),
        parent: None,
        key: None,
        created_at: UnixMs(1_000 + n),
        deadline: None,
    }
}

async fn next(news: &mut tokio::sync::broadcast::Receiver<Wake>) -> Wake {
    tokio::time::timeout(WAIT, news.recv()).await.expect("news in time").expect("news")
}

fn claim(owner: &str, max: usize, now: u64) -> Claim {
    Claim { app: "a".into(), owner: owner.into(), max, now: UnixMs(now), lease_grace: Duration::from_secs(1) }
}

async fn contract_with(claim: ClaimMode) {
    let Some(url) = pgtest::server() else { return };
    // Each check gets a store in a fresh schema; dropping it closes its connections.
    contract::run(|| {
        let mut c = pgtest::config(&url, &pgtest::fresh_schema(), claim);
        c.result_ttl = contract::RESULT_TTL;
        async move { PgStore::open(c).await.expect("open store") }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_meets_the_store_contract() {
    contract_with(ClaimMode::SkipLocked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_with_guarded_claims_meets_the_contract_too() {
    contract_with(ClaimMode::Guarded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_store_chosen_at_run_time_meets_the_contract_on_both_backends() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    contract::run(|| {
        n += 1;
        let data = dir.path().join(format!("node-{n}"));
        async move { AnyStore::open(&StoreSpec::Sqlite, &data, contract::RESULT_TTL).await.expect("sqlite") }
    })
    .await;
    let Some(url) = pgtest::server() else { return };
    contract::run(|| {
        let spec: StoreSpec = format!("{url}?schema={}", pgtest::fresh_schema()).parse().expect("spec");
        let dir = dir.path().to_path_buf();
        async move {
            let s = AnyStore::open(&spec, &dir, contract::RESULT_TTL).await.expect("postgres");
            assert_eq!(s.backend(), "postgres");
            s
        }
    })
    .await;
}

/// Several nodes (a store each, so separate connections) claim the same app at once: every task
/// is claimed exactly once, in both claim modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_claiming_at_once_never_take_a_task_twice() {
    let Some(url) = pgtest::server() else { return };
    for mode in [ClaimMode::SkipLocked, ClaimMode::Guarded] {
        let schema = pgtest::fresh_schema();
        let stores: Vec<PgStore> = {
            let mut v = Vec::new();
            for _ in 0..3 {
                v.push(PgStore::open(pgtest::config(&url, &schema, mode)).await.unwrap());
            }
            v
        };
        let total = 3000u64;
        for chunk in (0..total).collect::<Vec<_>>().chunks(500) {
            stores[0].submit(chunk.iter().map(|&n| new_task(n, "a")).collect()).await.unwrap();
        }
        let mut joins = Vec::new();
        for (i, s) in stores.iter().enumerate() {
            for j in 0..3 {
                let s = s.clone();
                let owner = format!("node-{i}-{j}");
                joins.push(tokio::spawn(async move {
                    let mut mine = Vec::new();
                    loop {
                        let c = s.claim(claim(&owner, 37, 100_000)).await.expect("claim");
                        if c.is_empty() {
                            return mine;
                        }
                        mine.extend(c.into_iter().map(|c| (c.id, c.lease)));
                    }
                }));
            }
        }
        let (mut ids, mut leases) = (HashSet::new(), HashSet::new());
        let mut claimers_with_work = 0;
        for j in joins {
            let mine = j.await.unwrap();
            claimers_with_work += usize::from(!mine.is_empty());
            for (id, lease) in mine {
                assert!(ids.insert(id.clone()), "{mode:?}: task {id} claimed twice");
                assert!(leases.insert(lease), "{mode:?}: lease {lease} handed out twice");
            }
        }
        assert_eq!(ids.len() as u64, total, "{mode:?}: every task claimed");
        assert!(claimers_with_work > 1, "{mode:?}: the claimers shared the work");
        let counts = stores[1].counts(UnixMs(100_000)).await.unwrap();
        assert_eq!((counts.pending, counts.running), (0, total));
        for s in stores {
            s.close().await;
        }
    }
}

/// A late completion from an attempt another node took over is fenced off: node B reaps node
/// A's expired lease and claims the task again; A's answer is stale, B's applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_task_fences_off_its_first_owner() {
    let Some(url) = pgtest::server() else { return };
    let schema = pgtest::fresh_schema();
    let a = PgStore::open(pgtest::config(&url, &schema, ClaimMode::SkipLocked)).await.unwrap();
    let b = PgStore::open(pgtest::config(&url, &schema, ClaimMode::SkipLocked)).await.unwrap();
    a.submit(vec![new_task(1, "a")]).await.unwrap();
    let first = a.claim(claim("node-a", 1, 10_000)).await.unwrap().remove(0);
    // Timeout 5 s + grace 1 s from t=10 s: the lease runs out at 16 s.
    assert_eq!(b.reap(UnixMs(15_999)).await.unwrap(), 0);
    assert_eq!(b.reap(UnixMs(16_000)).await.unwrap(), 1);
    let second = b.claim(claim("node-b", 1, 16_001)).await.unwrap().remove(0);
    assert_eq!((second.id.clone(), second.attempt), (first.id.clone(), 2));
    assert!(second.lease > first.lease);
    let done = |c: &nodus_tasks::task::Claimed, r: &str| Finish {
        id: c.id.clone(),
        lease: c.lease,
        outcome: Outcome::Done(json(r).unwrap()),
        now: UnixMs(17_000),
    };
    assert_eq!(a.finish(vec![done(&first, "\"a\"")]).await.unwrap(), vec![Fenced::Stale]);
    assert_eq!(b.finish(vec![done(&second, "\"b\"")]).await.unwrap(), vec![Fenced::Applied]);
    let t = a.get(first.id, UnixMs(17_000)).await.unwrap().unwrap();
    assert_eq!((t.status, t.result.unwrap().get()), (Status::Done, "\"b\""));
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submissions_and_completions_share_statements() {
    let Some(url) = pgtest::server() else { return };
    let store =
        Arc::new(PgStore::open(pgtest::config(&url, &pgtest::fresh_schema(), ClaimMode::SkipLocked)).await.unwrap());
    let before = store.writer_stats();
    let mut joins = Vec::new();
    for n in 0..2000 {
        let s = store.clone();
        joins.push(tokio::spawn(async move { s.submit(vec![new_task(n, "a")]).await }));
    }
    for j in joins {
        assert!(!j.await.unwrap().unwrap()[0].existing);
    }
    let after = store.writer_stats();
    let (commits, ops) = (after.commits - before.commits, after.operations - before.operations);
    assert_eq!(ops, 2000);
    assert!(commits < ops / 4, "2000 concurrent submissions took {commits} statements: no grouping");
    let claimed = store.claim(claim("n", 2000, 100_000)).await.unwrap();
    assert_eq!(claimed.len(), 2000);
    let mut joins = Vec::new();
    for c in claimed {
        let s = store.clone();
        let f = Finish { id: c.id, lease: c.lease, outcome: Outcome::Done(json("1").unwrap()), now: UnixMs(100_001) };
        joins.push(tokio::spawn(async move { s.finish(vec![f]).await }));
    }
    for j in joins {
        assert_eq!(j.await.unwrap().unwrap(), vec![Fenced::Applied]);
    }
    let last = store.writer_stats();
    assert!(last.commits - after.commits < 500, "completions were not grouped: {last:?} after {after:?}");
    assert_eq!(store.counts(UnixMs(100_002)).await.unwrap().done, 2000);
    store.close().await;
}

/// Four nodes starting at once on an empty schema: the advisory lock lets one migrate; every
/// node opens, and each migration is recorded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_at_once_migrate_once() {
    let Some(url) = pgtest::server() else { return };
    let schema = pgtest::fresh_schema();
    let mut joins = Vec::new();
    for _ in 0..4 {
        let c = pgtest::config(&url, &schema, ClaimMode::SkipLocked);
        joins.push(tokio::spawn(PgStore::open(c)));
    }
    let mut stores = Vec::new();
    for j in joins {
        stores.push(j.await.unwrap().expect("every node opens"));
    }
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let rows = client
        .query(&format!("SELECT component, version FROM {schema}.nodus_schema_version ORDER BY version"), &[])
        .await
        .unwrap();
    let versions: Vec<(String, i32)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(versions, vec![("tasks".to_string(), 1), ("tasks".to_string(), 2), ("tasks".to_string(), 3)]);

    // A schema newer than this binary is refused with a clear message.
    client
        .execute(&format!("INSERT INTO {schema}.nodus_schema_version (component, version) VALUES ('tasks', 99)"), &[])
        .await
        .unwrap();
    let err = PgStore::open(pgtest::config(&url, &schema, ClaimMode::SkipLocked)).await.unwrap_err().to_string();
    assert!(err.contains("version 99") && err.contains("upgrade nodus"), "{err}");
    for s in stores {
        s.close().await;
    }
}

/// What a node gets at start when the database is not there: which server, what failed, what
/// to check. Needs no server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_gives_a_clear_error_at_start() {
    // A port nothing listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let spec: StoreSpec = format!("postgres://nodus:secret@127.0.0.1:{port}/tasks").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let started = tokio::time::Instant::now();
    let err = AnyStore::open(&spec, dir.path(), Duration::from_secs(60)).await.unwrap_err().to_string();
    eprintln!("unreachable at start: {err}");
    assert!(started.elapsed() < Duration::from_secs(10), "gave up in time");
    assert!(err.contains(&format!("127.0.0.1:{port}")), "says which server: {err}");
    assert!(err.to_lowercase().contains("refused"), "says what failed: {err}");
    assert!(err.contains("check that PostgreSQL runs"), "says what to check: {err}");
    assert!(!err.contains("secret"), "never shows the password: {err}");

    // A server that runs, but without that database.
    let Some(url) = pgtest::server() else { return };
    let base = url.rsplit_once('/').unwrap().0;
    let err = PgStore::open(PgConfig::new(&format!("{base}/no_such_db")).unwrap()).await.unwrap_err().to_string();
    eprintln!("no such database: {err}");
    assert!(err.contains("no_such_db") && err.contains("does not exist") && err.contains("createdb"), "{err}");
}

/// News between nodes: B's submissions, completions and commands reach A's listener; A's own
/// do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_nodes_news_arrives_over_listen_notify() {
    let Some(url) = pgtest::server() else { return };
    let schema = pgtest::fresh_schema();
    let a = PgStore::open(pgtest::config(&url, &schema, ClaimMode::SkipLocked)).await.unwrap();
    let b = PgStore::open(pgtest::config(&url, &schema, ClaimMode::SkipLocked)).await.unwrap();
    let mut news = a.wakeups().expect("postgres has news");
    // A store opens once it listens: B's first submission is already news to A.
    b.submit(vec![new_task(0, "first")]).await.unwrap();
    assert_eq!(next(&mut news).await, Wake::Pending("first".into()));
    a.submit(vec![new_task(1, "mine")]).await.unwrap();
    b.submit(vec![new_task(2, "a"), new_task(3, "a")]).await.unwrap();
    assert_eq!(next(&mut news).await, Wake::Pending("a".into()), "A's own submission is not news to A");
    let c = b.claim(claim("node-b", 2, 100_000)).await.unwrap();
    let ids: Vec<TaskId> = c.iter().map(|c| c.id.clone()).collect();
    let done = c.iter().map(|c| Finish {
        id: c.id.clone(),
        lease: c.lease,
        outcome: Outcome::Done(json("1").unwrap()),
        now: UnixMs(100_001),
    });
    b.finish(done.collect()).await.unwrap();
    assert_eq!(next(&mut news).await, Wake::Finished(ids));
    let t = new_task(4, "a");
    b.submit(vec![t.clone()]).await.unwrap();
    assert_eq!(next(&mut news).await, Wake::Pending("a".into()));
    b.command(t.id.clone(), Command::Interrupt, UnixMs(100_002)).await.unwrap();
    assert_eq!(next(&mut news).await, Wake::Commanded(t.id));
    // B reaps what an owner left behind: the app is woken.
    b.submit(vec![new_task(5, "a")]).await.unwrap();
    assert_eq!(next(&mut news).await, Wake::Pending("a".into()));
    b.claim(claim("gone", 1, 100_000)).await.unwrap();
    assert_eq!(b.reap(UnixMs(200_000)).await.unwrap(), 1);
    assert_eq!(next(&mut news).await, Wake::Pending("a".into()));
    a.close().await;
    b.close().await;
}

fn agent(name: &str, state: AgentState) -> Agent {
    Agent {
        id: format!("id-{name}"),
        name: name.into(),
        ip: "10.1.2.3".into(),
        mac: "52:54:00:12:34:56".into(),
        cores: 8,
        memory: 32 << 30,
        concurrency: 16,
        queue: 64,
        first_seen: UnixMs(1_000),
        last_seen: UnixMs(2_000),
        state,
        state_since: UnixMs(1_500),
        banned: false,
    }
}

/// The agent registry on PostgreSQL: saved, replaced by name, removed, listed by name, seen by
/// every manager on the database, and added by migration 2 to a database left at version 1;
/// migration 3 then adds task deadlines and parents' index, and tasks stored before keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_are_kept_in_postgres_and_shared_by_its_managers() {
    let Some(url) = pgtest::server() else { return };
    let schema = pgtest::fresh_schema();
    let a = PgStore::open(pgtest::config(&url, &schema, ClaimMode::SkipLocked)).await.unwrap();
    let b = PgStore::open(pgtest::config(&url, &schema, ClaimMode::SkipLocked)).await.unwrap();
    assert!(a.agents().await.unwrap().is_empty());
    a.save_agent(agent("w2", AgentState::Active)).await.unwrap();
    a.save_agent(agent("w1", AgentState::Silent)).await.unwrap();
    let mut banned = agent("w1", AgentState::Gone);
    banned.banned = true;
    banned.last_seen = UnixMs(9_000);
    b.save_agent(banned.clone()).await.unwrap();
    assert_eq!(a.agents().await.unwrap(), vec![banned.clone(), agent("w2", AgentState::Active)], "by name, replaced");
    assert!(b.remove_agent("w2".into()).await.unwrap());
    assert!(!a.remove_agent("w2".into()).await.unwrap());
    a.close().await;
    b.close().await;

    // A database migrated by a nodus that had no registry nor deadlines (version 1), holding a
    // task: the next one adds both.
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!(
            "DROP TABLE {schema}.nodus_agents; DROP INDEX {schema}.nodus_tasks_deadline, {schema}.nodus_tasks_parent; \
             ALTER TABLE {schema}.nodus_tasks DROP COLUMN deadline; \
             DELETE FROM {schema}.nodus_schema_version WHERE version >= 2; \
             INSERT INTO {schema}.nodus_tasks (id, procedure, app, args, status, attempt, max_attempts, timeout_ms, \
                 lease, parent, created_at, run_after) \
             VALUES ('old-1', 'p.work', 'p', '[]', 'pending', 0, 1, 1000, 0, 'old-0', 5, 5)"
        ))
        .await
        .unwrap();
    let spec: StoreSpec = format!("{url}?schema={schema}").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let any = AnyStore::open(&spec, dir.path(), Duration::from_secs(60)).await.unwrap();
    let old = any.get("old-1".parse().unwrap(), UnixMs(10)).await.unwrap().expect("the old task is kept");
    assert_eq!((old.deadline, old.parent.as_ref().map(|p| p.as_str())), (None, Some("old-0")));
    let claim = nodus_tasks::store::Claim {
        app: "p".into(),
        owner: "n".into(),
        max: 5,
        now: UnixMs(10),
        lease_grace: Duration::from_secs(1),
    };
    assert_eq!(any.claim(claim).await.unwrap().len(), 1, "a task without a deadline is claimed");
    assert!(any.agents().await.unwrap().is_empty());
    any.save_agent(banned.clone()).await.unwrap();
    assert_eq!(any.agents().await.unwrap(), vec![banned]);
    any.close().await;
    assert_eq!(any.agents().await, Err(nodus_tasks::store::StoreError::Closed));
}
