//! The agent registry in the SQLite store: agents saved, read back, replaced and removed, kept
//! across a reopen, and the schema migrated from a database made before the registry existed.

use std::time::Duration;

use nodus_tasks::cluster::registry::{Agent, AgentState, AgentStore, Registry, RegistryChange, RegistryConfig};
use nodus_tasks::cluster::Specs;
use nodus_tasks::store::{SqliteConfig, SqliteStore, Store, StoreError};
use nodus_tasks::task::{json, NewTask, TaskId, UnixMs};

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

/// Applies a registry's changes to the store, as a manager's driver does.
async fn apply(store: &SqliteStore, change: Option<RegistryChange>) {
    match change {
        Some(RegistryChange::Save(a)) => store.save_agent(a).await.unwrap(),
        Some(RegistryChange::Remove(n)) => assert!(store.remove_agent(n).await.unwrap()),
        None => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_are_saved_replaced_removed_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let c = SqliteConfig::new(dir.path().join("tasks.db"));
    let store = SqliteStore::open(c.clone()).unwrap();
    assert!(store.agents().await.unwrap().is_empty());
    store.save_agent(agent("w2", AgentState::Active)).await.unwrap();
    store.save_agent(agent("w1", AgentState::Silent)).await.unwrap();
    let mut banned = agent("w1", AgentState::Gone);
    banned.banned = true;
    banned.last_seen = UnixMs(9_000);
    store.save_agent(banned.clone()).await.unwrap();
    let all = store.agents().await.unwrap();
    assert_eq!(all, vec![banned.clone(), agent("w2", AgentState::Active)], "by name, replaced by name");
    assert!(store.remove_agent("w2".into()).await.unwrap());
    assert!(!store.remove_agent("w2".into()).await.unwrap());
    store.close().await;
    let store = SqliteStore::open(c).unwrap();
    assert_eq!(store.agents().await.unwrap(), vec![banned]);
    store.close().await;
    assert_eq!(store.agents().await, Err(StoreError::Closed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_reloaded_from_the_store_keeps_ids_and_bans() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(SqliteConfig::new(dir.path().join("tasks.db"))).unwrap();
    let specs = Specs {
        cores: 4,
        memory: 1 << 30,
        concurrency: 2,
        queue: 2,
        ip: "10.0.0.9".into(),
        mac: "aa:bb:cc:dd:ee:01".into(),
        ..Specs::default()
    };
    let mut r = Registry::new(RegistryConfig::default(), store.agents().await.unwrap(), 7);
    apply(&store, r.register("w1", &specs, UnixMs(100))).await;
    apply(&store, r.ban("w9", true, UnixMs(200))).await;
    apply(&store, r.set_state("w1", AgentState::Silent, UnixMs(300))).await;
    let id = r.get("w1").unwrap().id.clone();
    let reloaded = Registry::new(RegistryConfig::default(), store.agents().await.unwrap(), 8);
    let w1 = reloaded.get("w1").unwrap();
    assert_eq!(
        (w1.id.as_str(), w1.state, w1.cores, w1.mac.as_str()),
        (id.as_str(), AgentState::Silent, 4, "aa:bb:cc:dd:ee:01")
    );
    assert!(reloaded.is_banned("w9") && !reloaded.is_banned("w1"));
    let cfg = RegistryConfig { remove_after: Duration::from_secs(1), ..RegistryConfig::default() };
    let mut r = Registry::new(cfg, store.agents().await.unwrap(), 9);
    apply(&store, r.set_state("w1", AgentState::Gone, UnixMs(1_000))).await;
    for c in r.purge(UnixMs(2_000)) {
        apply(&store, Some(c)).await;
    }
    let names: Vec<String> = store.agents().await.unwrap().into_iter().map(|a| a.name).collect();
    assert_eq!(names, vec!["w9".to_string()], "the gone agent is removed; the banned one stays");
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_from_before_the_registry_is_migrated_and_a_newer_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tasks.db");
    let store = SqliteStore::open(SqliteConfig::new(&path)).unwrap();
    let id = TaskId::generate(UnixMs(1), &mut rand::thread_rng());
    let task = NewTask {
        id: id.clone(),
        procedure: "procs.add".into(),
        app: "procs".into(),
        args: json("[1, 2]").unwrap(),
        max_attempts: 3,
        timeout: Duration::from_secs(5),
        parent: None,
        key: None,
        created_at: UnixMs(1),
        deadline: None,
    };
    store.submit(vec![task]).await.unwrap();
    store.close().await;
    // What the first release of the store left: its tables at user_version 1, no agents.
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "DROP TABLE agents; DROP INDEX tasks_deadline; DROP INDEX tasks_parent; \
             ALTER TABLE tasks DROP COLUMN deadline; PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let store = SqliteStore::open(SqliteConfig::new(&path)).unwrap();
    assert!(store.get(id.clone(), UnixMs(2)).await.unwrap().is_some(), "tasks are kept");
    store.save_agent(agent("w1", AgentState::Active)).await.unwrap();
    assert_eq!(store.agents().await.unwrap().len(), 1);
    store.close().await;
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        let v: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(v, 3, "every later migration ran too");
        conn.execute_batch("PRAGMA user_version = 4;").unwrap();
    }
    let e = SqliteStore::open(SqliteConfig::new(&path)).unwrap_err().to_string();
    assert!(e.contains("schema version 4") && e.contains("newer nodus"), "{e}");
}
