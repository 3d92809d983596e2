//! The embedded store: SQLite in WAL mode, `synchronous=FULL` by default, with **group commit**.
//!
//! One writer thread owns the writing connection. Callers queue operations on a bounded channel;
//! the writer takes everything queued (up to `max_batch`), applies each operation inside its own
//! savepoint of one transaction, commits once (one fsync for the whole batch), and only then
//! answers every caller. So an acknowledged submission is on disk, and the cost of the fsync is
//! shared by every submission, claim and completion that arrived while the previous one ran.
//! A reader thread with its own connection serves reads (WAL lets it read while the writer
//! writes; it sees every committed, hence acknowledged, change). A checkpointer thread copies
//! the WAL into the database every `checkpoint_interval` (a passive checkpoint, beside the
//! writer), so the writer's commits do not stall on checkpoints; the writer checkpoints only as a
//! safety net, when the WAL passes 10 000 pages.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Row};
use tokio::sync::{mpsc, oneshot};

use super::{
    Claim, Command, Commanded, Counts, Expired, Fenced, Finish, ListFilter, Outcome, Store, StoreError, EXPIRED_PREFIX,
    EXPIRED_SUFFIX,
};
use crate::cluster::registry::{Agent, AgentStore};
use crate::task::{json, Claimed, ErrorKind, Json, Lease, NewTask, Status, Submitted, Task, TaskError, TaskId, UnixMs};

/// SQLite's `synchronous` setting: how hard a commit waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// No fsync: a power loss may lose recent commits (a process crash does not).
    Off,
    /// fsync at checkpoints only: in WAL mode a power loss may lose the last commits, never
    /// corrupt the database.
    Normal,
    /// fsync the WAL on every commit: an acknowledged commit survives a power loss (default).
    #[default]
    Full,
    /// As `Full`, and also fsync the directory after creating the WAL.
    Extra,
}

impl Synchronous {
    fn pragma(self) -> &'static str {
        match self {
            Synchronous::Off => "OFF",
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
            Synchronous::Extra => "EXTRA",
        }
    }
}

impl std::str::FromStr for Synchronous {
    type Err = String;

    fn from_str(s: &str) -> Result<Synchronous, String> {
        match s.to_ascii_lowercase().as_str() {
            "off" => Ok(Synchronous::Off),
            "normal" => Ok(Synchronous::Normal),
            "full" => Ok(Synchronous::Full),
            "extra" => Ok(Synchronous::Extra),
            _ => Err(format!("synchronous is {s:?}; use off, normal, full or extra")),
        }
    }
}

/// Settings and bounds of the SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteConfig {
    /// The database file (created when missing, with its directory).
    pub path: PathBuf,
    /// Commit durability (default `FULL`).
    pub synchronous: Synchronous,
    /// How long a finished task and its result are kept (default one day).
    pub result_ttl: Duration,
    /// Largest database size; beyond it submissions fail with [`StoreError::Full`] (default 8 GiB).
    pub max_bytes: u64,
    /// Operations waiting for the writer; beyond it callers get [`StoreError::Overloaded`].
    pub queue: usize,
    /// Most operations in one transaction (one commit).
    pub max_batch: usize,
    /// How often the WAL is checkpointed beside the writer (default 200 ms).
    pub checkpoint_interval: Duration,
}

impl SqliteConfig {
    /// Defaults for a database at `path`.
    pub fn new(path: impl Into<PathBuf>) -> SqliteConfig {
        SqliteConfig {
            path: path.into(),
            synchronous: Synchronous::Full,
            result_ttl: Duration::from_secs(86_400),
            max_bytes: 8 << 30,
            queue: 65_536,
            max_batch: 4096,
            checkpoint_interval: Duration::from_millis(200),
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// Operations of the writer thread.
enum WriteOp {
    Submit(Vec<NewTask>, Reply<Vec<Submitted>>),
    Claim(Claim, Reply<Vec<Claimed>>),
    Finish(Vec<Finish>, Reply<Vec<Fenced>>),
    Command(TaskId, Command, UnixMs, Reply<Option<Commanded>>),
    Recover(String, UnixMs, Reply<u64>),
    Reap(UnixMs, Reply<u64>),
    Expire(UnixMs, usize, Reply<Vec<Expired>>),
    Purge(UnixMs, usize, Reply<u64>),
    SaveAgent(Agent, Reply<()>),
    RemoveAgent(String, Reply<bool>),
    Close(oneshot::Sender<()>),
}

/// Operations of the reader thread.
enum ReadOp {
    Get(TaskId, UnixMs, Reply<Option<Task>>),
    List(ListFilter, UnixMs, Reply<Vec<Task>>),
    PendingApps(Reply<Vec<String>>),
    Counts(UnixMs, Reply<Counts>),
    Agents(Reply<Vec<Agent>>),
    Close(oneshot::Sender<()>),
}

/// The SQLite task store. Cheap to clone; every clone uses the same threads.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: mpsc::Sender<WriteOp>,
    reader: mpsc::Sender<ReadOp>,
    queue: usize,
    counters: Arc<Counters>,
    /// Stops the checkpointer (it answers on the sender it is given); it also stops when every
    /// clone of the store is gone.
    checkpointer: Arc<std::sync::mpsc::Sender<oneshot::Sender<()>>>,
}

/// What the writer has done so far: how well group commit batches.
#[derive(Debug, Default)]
struct Counters {
    commits: AtomicU64,
    operations: AtomicU64,
}

/// A snapshot of the writer's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterStats {
    /// Transactions committed (each one fsync with `synchronous=FULL`).
    pub commits: u64,
    /// Operations (submissions, claims, completion batches, commands) in them.
    pub operations: u64,
}

impl std::fmt::Debug for WriteOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriteOp")
    }
}

impl std::fmt::Debug for ReadOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadOp")
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tasks (
    seq          INTEGER PRIMARY KEY,
    id           TEXT    NOT NULL UNIQUE,
    procedure    TEXT    NOT NULL,
    app          TEXT    NOT NULL,
    args         TEXT    NOT NULL,
    status       TEXT    NOT NULL,
    attempt      INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    timeout_ms   INTEGER NOT NULL,
    lease        INTEGER NOT NULL,
    owner        TEXT,
    lease_until  INTEGER,
    parent       TEXT,
    key          TEXT,
    created_at   INTEGER NOT NULL,
    run_after    INTEGER NOT NULL,
    started_at   INTEGER,
    finished_at  INTEGER,
    expires_at   INTEGER,
    result       TEXT,
    error_kind   TEXT,
    error        TEXT
);
CREATE INDEX IF NOT EXISTS tasks_pending ON tasks(app, seq) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS tasks_running ON tasks(lease_until) WHERE status = 'running';
CREATE INDEX IF NOT EXISTS tasks_expiry ON tasks(expires_at) WHERE expires_at IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS tasks_key ON tasks(key) WHERE key IS NOT NULL;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (name, value) VALUES ('next_lease', 1);
";

/// Version 2: the agent registry of a manager (seed 004).
const AGENTS: &str = "
CREATE TABLE IF NOT EXISTS agents (
    name        TEXT    PRIMARY KEY,
    id          TEXT    NOT NULL UNIQUE,
    ip          TEXT    NOT NULL,
    mac         TEXT    NOT NULL,
    cores       INTEGER NOT NULL,
    memory      INTEGER NOT NULL,
    concurrency INTEGER NOT NULL,
    queue       INTEGER NOT NULL,
    first_seen  INTEGER NOT NULL,
    last_seen   INTEGER NOT NULL,
    state       TEXT    NOT NULL,
    state_since INTEGER NOT NULL,
    banned      INTEGER NOT NULL
);
";

/// Version 3: a task's deadline (the `expires_at` of its submission: it never starts after it),
/// and subtasks found by their parent (a kill cascades to them).
const DEADLINES: &str = "
ALTER TABLE tasks ADD COLUMN deadline INTEGER;
CREATE INDEX IF NOT EXISTS tasks_deadline ON tasks(deadline) WHERE status = 'pending' AND deadline IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_parent ON tasks(parent) WHERE parent IS NOT NULL;
";

/// The schema's migrations, in order: applying migration `n` brings a database from
/// `user_version` `n` to `n + 1`, in one transaction. The first is idempotent (a version-1
/// database made before versions were counted has the tasks table already).
const MIGRATIONS: [&str; 3] = [SCHEMA, AGENTS, DEADLINES];

/// Brings the database to the latest schema, each migration in its own transaction.
fn migrate(conn: &Connection, path: &std::path::Path) -> Result<(), StoreError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sql_err)?;
    let version = usize::try_from(version).unwrap_or(0);
    if version > MIGRATIONS.len() {
        return Err(StoreError::Failed(format!(
            "{} has schema version {version}, newer than this nodus knows ({}); run a newer nodus",
            path.display(),
            MIGRATIONS.len()
        )));
    }
    for (n, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let batch = format!("BEGIN IMMEDIATE; {sql} PRAGMA user_version = {}; COMMIT;", n + 1);
        if let Err(e) = conn.execute_batch(&batch) {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(sql_err(e));
        }
    }
    Ok(())
}

const AGENT_COLUMNS: &str =
    "name, id, ip, mac, cores, memory, concurrency, queue, first_seen, last_seen, state, state_since, banned";

const TASK_COLUMNS: &str =
    "id, procedure, args, status, attempt, max_attempts, timeout_ms, lease, owner, parent, key, \
     created_at, started_at, finished_at, expires_at, result, error_kind, error, deadline";

fn sql_err(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull => {
            StoreError::Full(e.to_string())
        }
        _ => StoreError::Failed(e.to_string()),
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn open_connection(config: &SqliteConfig, writer: bool) -> Result<Connection, StoreError> {
    let conn = Connection::open(&config.path).map_err(sql_err)?;
    conn.busy_timeout(Duration::from_secs(10)).map_err(sql_err)?;
    conn.pragma_update(None, "journal_mode", "WAL").map_err(sql_err)?;
    conn.pragma_update(None, "synchronous", config.synchronous.pragma()).map_err(sql_err)?;
    conn.pragma_update(None, "temp_store", "MEMORY").map_err(sql_err)?;
    conn.pragma_update(None, "cache_size", -65_536).map_err(sql_err)?;
    if writer {
        migrate(&conn, &config.path)?;
        // The checkpointer thread does this work; the writer only as a safety net.
        conn.pragma_update(None, "wal_autocheckpoint", 10_000).map_err(sql_err)?;
        let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0)).map_err(sql_err)?;
        let pages = i64::try_from(config.max_bytes).unwrap_or(i64::MAX) / page.max(512);
        conn.pragma_update(None, "max_page_count", pages.max(16)).map_err(sql_err)?;
    } else {
        conn.pragma_update(None, "query_only", true).map_err(sql_err)?;
    }
    Ok(conn)
}

impl SqliteStore {
    /// Opens (or creates) the store and starts its writer and reader threads.
    ///
    /// # Errors
    /// The directory or database cannot be created or opened, or the database is not a nodus
    /// task store.
    pub fn open(config: SqliteConfig) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = config.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Failed(format!("cannot create {}: {e}", dir.display())))?;
        }
        let wconn = open_connection(&config, true)?;
        let rconn = open_connection(&config, false)?;
        let cconn = Connection::open(&config.path).map_err(sql_err)?;
        cconn.busy_timeout(Duration::from_secs(1)).map_err(sql_err)?;
        let next_lease: i64 =
            wconn.query_row("SELECT value FROM meta WHERE name = 'next_lease'", [], |r| r.get(0)).map_err(sql_err)?;
        let (wtx, wrx) = mpsc::channel(config.queue.max(1));
        let (rtx, rrx) = mpsc::channel(config.queue.max(1));
        let counters = Arc::new(Counters::default());
        let writer = Writer {
            counters: counters.clone(),
            conn: wconn,
            ttl: config.result_ttl,
            max_batch: config.max_batch.max(1),
            next_lease: u64::try_from(next_lease).unwrap_or(1).max(1),
            persisted_lease: u64::try_from(next_lease).unwrap_or(1).max(1),
            path: config.path.clone(),
        };
        std::thread::Builder::new()
            .name("nodus-tasks-writer".into())
            .spawn(move || writer.run(wrx))
            .map_err(|e| StoreError::Failed(format!("cannot start the store's writer thread: {e}")))?;
        std::thread::Builder::new()
            .name("nodus-tasks-reader".into())
            .spawn(move || read_loop(rconn, rrx))
            .map_err(|e| StoreError::Failed(format!("cannot start the store's reader thread: {e}")))?;
        let (ctx, crx) = std::sync::mpsc::channel();
        let interval = config.checkpoint_interval.max(Duration::from_millis(10));
        std::thread::Builder::new()
            .name("nodus-tasks-checkpoint".into())
            .spawn(move || checkpoint_loop(cconn, crx, interval))
            .map_err(|e| StoreError::Failed(format!("cannot start the store's checkpointer thread: {e}")))?;
        Ok(SqliteStore { writer: wtx, reader: rtx, queue: config.queue, counters, checkpointer: Arc::new(ctx) })
    }

    /// Finishes the operations already queued, then closes both connections (checkpointing the
    /// WAL). Operations after this fail with [`StoreError::Closed`].
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.checkpointer.send(tx).is_ok() {
            let _ = rx.await;
        }
        let (tx, rx) = oneshot::channel();
        if self.writer.send(WriteOp::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let (tx, rx) = oneshot::channel();
        if self.reader.send(ReadOp::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// How many transactions the writer committed, and how many operations they held.
    pub fn writer_stats(&self) -> WriterStats {
        WriterStats {
            commits: self.counters.commits.load(Ordering::Relaxed),
            operations: self.counters.operations.load(Ordering::Relaxed),
        }
    }

    async fn write<T>(&self, op: impl FnOnce(Reply<T>) -> WriteOp) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        match self.writer.try_send(op(tx)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => return Err(StoreError::Overloaded(self.queue)),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(StoreError::Closed),
        }
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    async fn read<T>(&self, op: impl FnOnce(Reply<T>) -> ReadOp) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        match self.reader.try_send(op(tx)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => return Err(StoreError::Overloaded(self.queue)),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(StoreError::Closed),
        }
        rx.await.unwrap_or(Err(StoreError::Closed))
    }
}

impl Store for SqliteStore {
    async fn submit(&self, tasks: Vec<NewTask>) -> Result<Vec<Submitted>, StoreError> {
        self.write(|r| WriteOp::Submit(tasks, r)).await
    }

    async fn claim(&self, claim: Claim) -> Result<Vec<Claimed>, StoreError> {
        self.write(|r| WriteOp::Claim(claim, r)).await
    }

    async fn finish(&self, batch: Vec<Finish>) -> Result<Vec<Fenced>, StoreError> {
        self.write(|r| WriteOp::Finish(batch, r)).await
    }

    async fn command(&self, id: TaskId, command: Command, now: UnixMs) -> Result<Option<Commanded>, StoreError> {
        self.write(|r| WriteOp::Command(id, command, now, r)).await
    }

    async fn recover(&self, owner: String, now: UnixMs) -> Result<u64, StoreError> {
        self.write(|r| WriteOp::Recover(owner, now, r)).await
    }

    async fn reap(&self, now: UnixMs) -> Result<u64, StoreError> {
        self.write(|r| WriteOp::Reap(now, r)).await
    }

    async fn expire(&self, now: UnixMs, max: usize) -> Result<Vec<Expired>, StoreError> {
        self.write(|r| WriteOp::Expire(now, max, r)).await
    }

    async fn purge(&self, now: UnixMs, max: usize) -> Result<u64, StoreError> {
        self.write(|r| WriteOp::Purge(now, max, r)).await
    }

    async fn get(&self, id: TaskId, now: UnixMs) -> Result<Option<Task>, StoreError> {
        self.read(|r| ReadOp::Get(id, now, r)).await
    }

    async fn list(&self, filter: ListFilter, now: UnixMs) -> Result<Vec<Task>, StoreError> {
        self.read(|r| ReadOp::List(filter, now, r)).await
    }

    async fn pending_apps(&self) -> Result<Vec<String>, StoreError> {
        self.read(ReadOp::PendingApps).await
    }

    async fn counts(&self, now: UnixMs) -> Result<Counts, StoreError> {
        self.read(|r| ReadOp::Counts(now, r)).await
    }
}

impl AgentStore for SqliteStore {
    async fn save_agent(&self, agent: Agent) -> Result<(), StoreError> {
        self.write(|r| WriteOp::SaveAgent(agent, r)).await
    }

    async fn remove_agent(&self, name: String) -> Result<bool, StoreError> {
        self.write(|r| WriteOp::RemoveAgent(name, r)).await
    }

    async fn agents(&self) -> Result<Vec<Agent>, StoreError> {
        self.read(ReadOp::Agents).await
    }
}

fn save_agent(conn: &Connection, a: &Agent) -> Result<(), StoreError> {
    conn.prepare_cached(&format!(
        "INSERT INTO agents ({AGENT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) \
         ON CONFLICT(name) DO UPDATE SET id = ?2, ip = ?3, mac = ?4, cores = ?5, memory = ?6, concurrency = ?7, \
         queue = ?8, first_seen = ?9, last_seen = ?10, state = ?11, state_since = ?12, banned = ?13"
    ))
    .and_then(|mut s| {
        s.execute(params![
            a.name,
            a.id,
            a.ip,
            a.mac,
            a.cores,
            i64::try_from(a.memory).unwrap_or(i64::MAX),
            a.concurrency,
            a.queue,
            a.first_seen.as_i64(),
            a.last_seen.as_i64(),
            a.state.as_str(),
            a.state_since.as_i64(),
            a.banned,
        ])
    })
    .map(|_| ())
    .map_err(sql_err)
}

fn read_agents(conn: &Connection) -> Result<Vec<Agent>, StoreError> {
    let mut s = conn.prepare_cached(&format!("SELECT {AGENT_COLUMNS} FROM agents ORDER BY name")).map_err(sql_err)?;
    let rows = s
        .query_map([], |r| {
            let state: String = r.get(10)?;
            Ok((
                Agent {
                    name: r.get(0)?,
                    id: r.get(1)?,
                    ip: r.get(2)?,
                    mac: r.get(3)?,
                    cores: r.get(4)?,
                    memory: u64::try_from(r.get::<_, i64>(5)?).unwrap_or(0),
                    concurrency: r.get(6)?,
                    queue: r.get(7)?,
                    first_seen: UnixMs::from_i64(r.get(8)?),
                    last_seen: UnixMs::from_i64(r.get(9)?),
                    state: crate::cluster::registry::AgentState::Gone,
                    state_since: UnixMs::from_i64(r.get(11)?),
                    banned: r.get(12)?,
                },
                state,
            ))
        })
        .map_err(sql_err)?;
    let mut out = Vec::new();
    for row in rows {
        let (mut agent, state) = row.map_err(sql_err)?;
        agent.state =
            state.parse().map_err(|e: String| StoreError::Failed(format!("stored agent state is corrupt: {e}")))?;
        out.push(agent);
    }
    Ok(out)
}

/// An answer computed inside the transaction, sent once the commit is known.
type Answer = Box<dyn FnOnce(Option<&StoreError>) + Send>;

fn answer<T: Send + 'static>(reply: Reply<T>, result: Result<T, StoreError>) -> Answer {
    Box::new(move |commit: Option<&StoreError>| {
        let _ = reply.send(match commit {
            None => result,
            Some(e) => Err(e.clone()),
        });
    })
}

struct Writer {
    counters: Arc<Counters>,
    conn: Connection,
    ttl: Duration,
    max_batch: usize,
    next_lease: u64,
    /// The `next_lease` value stored in the database.
    persisted_lease: u64,
    path: PathBuf,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<WriteOp>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        let mut closing = None;
        while closing.is_none() {
            let Some(first) = rx.blocking_recv() else { break };
            batch.push(first);
            while batch.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            closing = self.apply_batch(&mut batch);
        }
        rx.close();
        // Operations queued behind the close are refused.
        while let Ok(op) = rx.try_recv() {
            refuse(op);
        }
        if let Err(e) = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);") {
            tracing::warn!(error = %e, path = %self.path.display(), "task store checkpoint at close failed");
        }
        drop(self.conn);
        if let Some(done) = closing {
            let _ = done.send(());
        }
    }

    /// Applies a batch in one transaction and answers it. Returns the close request, if any
    /// (operations after it in the batch are refused).
    fn apply_batch(&mut self, batch: &mut Vec<WriteOp>) -> Option<oneshot::Sender<()>> {
        let mut answers: Vec<Answer> = Vec::with_capacity(batch.len());
        let mut closing = None;
        let mut in_tx = false;
        for op in batch.drain(..) {
            if closing.is_some() {
                refuse(op);
                continue;
            }
            if let WriteOp::Close(done) = op {
                closing = Some(done);
                continue;
            }
            if !in_tx {
                if let Err(e) = self.conn.execute_batch("BEGIN IMMEDIATE") {
                    let e = sql_err(e);
                    tracing::error!(error = %e, path = %self.path.display(), "task store transaction could not begin");
                    fail(op, e);
                    continue;
                }
                in_tx = true;
            }
            let (answer, error) = self.apply(op);
            answers.push(answer);
            if let Some(e) = error.filter(|_| self.conn.is_autocommit()) {
                // SQLite rolled the whole transaction back (disk full, I/O error): nothing of it
                // was written, so every operation of it fails.
                tracing::error!(error = %e, path = %self.path.display(), "task store transaction rolled back");
                for a in answers.drain(..) {
                    a(Some(&e));
                }
                in_tx = false;
            }
        }
        if !in_tx {
            return closing;
        }
        let mut commit = Ok(());
        if self.next_lease != self.persisted_lease {
            let next = i64::try_from(self.next_lease).unwrap_or(i64::MAX);
            commit = self
                .conn
                .execute("UPDATE meta SET value = ?1 WHERE name = 'next_lease'", [next])
                .map(|_| ())
                .map_err(sql_err);
        }
        if commit.is_ok() {
            commit = self.conn.execute_batch("COMMIT").map_err(sql_err);
        }
        if let Err(e) = &commit {
            tracing::error!(error = %e, path = %self.path.display(), "task store commit failed; the batch is refused");
            if !self.conn.is_autocommit() {
                let _ = self.conn.execute_batch("ROLLBACK");
            }
        } else {
            self.persisted_lease = self.next_lease;
        }
        let failed = commit.err();
        if failed.is_none() {
            self.counters.commits.fetch_add(1, Ordering::Relaxed);
            self.counters.operations.fetch_add(answers.len() as u64, Ordering::Relaxed);
        }
        for a in answers {
            a(failed.as_ref());
        }
        closing
    }

    /// Runs one operation inside its own savepoint: an operation that fails leaves nothing
    /// behind and does not fail the others of the batch.
    fn apply(&mut self, op: WriteOp) -> (Answer, Option<StoreError>) {
        if let Err(e) = self.conn.prepare_cached("SAVEPOINT op").and_then(|mut s| s.execute([])) {
            let e = sql_err(e);
            let a = match op {
                WriteOp::Submit(_, r) => answer(r, Err(e.clone())),
                WriteOp::Claim(_, r) => answer(r, Err(e.clone())),
                WriteOp::Finish(_, r) => answer(r, Err(e.clone())),
                WriteOp::Command(_, _, _, r) => answer(r, Err(e.clone())),
                WriteOp::Recover(_, _, r) | WriteOp::Reap(_, r) | WriteOp::Purge(_, _, r) => answer(r, Err(e.clone())),
                WriteOp::Expire(_, _, r) => answer(r, Err(e.clone())),
                WriteOp::SaveAgent(_, r) => answer(r, Err(e.clone())),
                WriteOp::RemoveAgent(_, r) => answer(r, Err(e.clone())),
                WriteOp::Close(_) => Box::new(|_: Option<&StoreError>| {}),
            };
            return (a, Some(e));
        }
        let (a, err) = match op {
            WriteOp::Submit(tasks, r) => {
                let res = self.submit(tasks);
                let err = res.as_ref().err().cloned();
                (answer(r, res), err)
            }
            WriteOp::Claim(c, r) => {
                let res = self.claim(&c);
                let err = res.as_ref().err().cloned();
                (answer(r, res), err)
            }
            WriteOp::Finish(b, r) => {
                let res = self.finish(&b);
                let err = res.as_ref().err().cloned();
                (answer(r, res), err)
            }
            WriteOp::Command(id, c, now, r) => {
                let res = self.command(&id, c, now);
                let err = res.as_ref().err().cloned();
                (answer(r, res), err)
            }
            WriteOp::Recover(owner, now, r) => {
                let res = self
                    .conn
                    .execute(
                        "UPDATE tasks SET status = 'pending', owner = NULL, lease_until = NULL, run_after = ?2 \
                         WHERE status = 'running' AND owner = ?1",
                        params![owner, now.as_i64()],
                    )
                    .map(|n| n as u64)
                    .map_err(sql_err);
                let err = res.as_ref().err().cloned();
                (answer(r, res), err)
            }
            WriteOp::Reap(now, r) => {
                let res = self
                    .conn
                    .execute(
                        "UPDATE tasks SET status = 'pending', owner = NULL, lease_until = NULL, run_after = ?1 \
                         WHERE status = 'running' AND lease_until <= ?1",
                        params![now.as_i64()],
                    )
                    .map(|n| n as u64)
                    .map_err(sql_err);
                let err = res.as_ref().err().cloned();
                (answer(r, res), err)
            }
            WriteOp::Expire(now, max, r) => {
                let res = self.expire(now, max);
                let err = res.as_ref().err().cloned();
                (answer(r, res), err)
            }
            WriteOp::SaveAgent(agent, r) => {
                let res = save_agent(&self.conn, &agent);
                let err = res.as_ref().err().cloned();
                (answer(r, res), err)
            }
            WriteOp::RemoveAgent(name, r) => {
                let res =
                    self.conn.execute("DELETE FROM agents WHERE name = ?1", [name]).map(|n| n > 0).map_err(sql_err);
                let err = res.as_ref().err().cloned();
                (answer(r, res), err)
            }
            WriteOp::Purge(now, max, r) => {
                let res = self
                    .conn
                    .execute(
                        "DELETE FROM tasks WHERE seq IN (SELECT seq FROM tasks \
                         WHERE expires_at IS NOT NULL AND expires_at <= ?1 ORDER BY expires_at LIMIT ?2)",
                        params![now.as_i64(), i64::try_from(max).unwrap_or(i64::MAX)],
                    )
                    .map(|n| n as u64)
                    .map_err(sql_err);
                let err = res.as_ref().err().cloned();
                (answer(r, res), err)
            }
            WriteOp::Close(_) => unreachable!("close is handled by the batch"),
        };
        if !self.conn.is_autocommit() {
            let end = match err {
                None => self.conn.prepare_cached("RELEASE op").and_then(|mut s| s.execute([])).map(|_| ()),
                Some(_) => self.conn.execute_batch("ROLLBACK TO op; RELEASE op"),
            };
            if let Err(e) = end {
                tracing::error!(error = %e, "task store savepoint failed");
            }
        }
        (a, err)
    }

    fn expires(&self, now: UnixMs) -> i64 {
        now.plus(self.ttl).as_i64()
    }

    fn submit(&mut self, tasks: Vec<NewTask>) -> Result<Vec<Submitted>, StoreError> {
        let mut out = Vec::with_capacity(tasks.len());
        let mut insert = self
            .conn
            .prepare_cached(
                "INSERT INTO tasks (id, procedure, app, args, status, attempt, max_attempts, timeout_ms, lease, \
                 parent, key, created_at, run_after, deadline) \
                 VALUES (?1, ?2, ?3, ?4, 'pending', 0, ?5, ?6, 0, ?7, ?8, ?9, ?9, ?10)",
            )
            .map_err(sql_err)?;
        let mut by_key =
            self.conn.prepare_cached("SELECT seq, id, expires_at FROM tasks WHERE key = ?1").map_err(sql_err)?;
        let mut delete = self.conn.prepare_cached("DELETE FROM tasks WHERE seq = ?1").map_err(sql_err)?;
        for t in tasks {
            if let Some(key) = &t.key {
                let found: Option<(i64, String, Option<i64>)> =
                    by_key.query_row([key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).optional().map_err(sql_err)?;
                if let Some((seq, id, expires)) = found {
                    if expires.is_some_and(|e| e <= t.created_at.as_i64()) {
                        // The task that had this key expired: the key is free again.
                        delete.execute([seq]).map_err(sql_err)?;
                    } else {
                        out.push(Submitted { id: TaskId(id.into()), existing: true });
                        continue;
                    }
                }
            }
            insert
                .execute(params![
                    t.id.as_str(),
                    t.procedure,
                    t.app,
                    t.args.get(),
                    t.max_attempts.max(1),
                    ms(t.timeout),
                    t.parent.as_ref().map(TaskId::as_str),
                    t.key,
                    t.created_at.as_i64(),
                    t.deadline.map(UnixMs::as_i64),
                ])
                .map_err(sql_err)?;
            out.push(Submitted { id: t.id, existing: false });
        }
        Ok(out)
    }

    fn claim(&mut self, c: &Claim) -> Result<Vec<Claimed>, StoreError> {
        let mut select = self
            .conn
            .prepare_cached(
                "SELECT seq, id, procedure, args, attempt, max_attempts, timeout_ms, created_at, parent, deadline \
                 FROM tasks \
                 WHERE status = 'pending' AND app = ?1 AND run_after <= ?2 AND (deadline IS NULL OR deadline > ?2) \
                 ORDER BY seq LIMIT ?3",
            )
            .map_err(sql_err)?;
        let rows: Vec<(i64, String, Claimed)> = select
            .query_map(params![c.app, c.now.as_i64(), i64::try_from(c.max).unwrap_or(i64::MAX)], |r| {
                let timeout_ms: i64 = r.get(6)?;
                let claimed = Claimed {
                    id: TaskId(r.get::<_, String>(1)?.into()),
                    procedure: r.get(2)?,
                    app: c.app.clone(),
                    // Parsed below, outside the row mapper (whose error type is SQLite's).
                    args: crate::task::json_null(),
                    attempt: r.get::<_, u32>(4)? + 1,
                    max_attempts: r.get(5)?,
                    timeout: Duration::from_millis(u64::try_from(timeout_ms).unwrap_or(0)),
                    lease: Lease(0),
                    created_at: UnixMs::from_i64(r.get(7)?),
                    parent: r.get::<_, Option<String>>(8)?.map(|p| TaskId(p.into())),
                    deadline: r.get::<_, Option<i64>>(9)?.map(UnixMs::from_i64),
                };
                Ok((r.get(0)?, r.get(3)?, claimed))
            })
            .map_err(sql_err)?
            .collect::<Result<_, _>>()
            .map_err(sql_err)?;
        let mut update = self
            .conn
            .prepare_cached(
                "UPDATE tasks SET status = 'running', attempt = attempt + 1, lease = ?2, owner = ?3, \
                 started_at = ?4, lease_until = ?5 WHERE seq = ?1",
            )
            .map_err(sql_err)?;
        let mut out = Vec::with_capacity(rows.len());
        for (seq, args, mut claimed) in rows {
            claimed.args = stored_json(args)?;
            claimed.lease = Lease(self.next_lease);
            self.next_lease += 1;
            let until = c.now.plus(claimed.timeout).plus(c.lease_grace);
            update
                .execute(params![seq, claimed.lease.0 as i64, c.owner, c.now.as_i64(), until.as_i64()])
                .map_err(sql_err)?;
            out.push(claimed);
        }
        Ok(out)
    }

    /// Finishes pending tasks whose deadline passed (see [`Store::expire`]).
    fn expire(&mut self, now: UnixMs, max: usize) -> Result<Vec<Expired>, StoreError> {
        let mut s = self
            .conn
            .prepare_cached(&format!(
                "UPDATE tasks SET status = 'error', error_kind = '{kind}', \
                 error = '{EXPIRED_PREFIX}' || deadline || '{EXPIRED_SUFFIX}', finished_at = ?1, expires_at = ?2, \
                 owner = NULL, lease_until = NULL \
                 WHERE seq IN (SELECT seq FROM tasks WHERE status = 'pending' AND deadline IS NOT NULL \
                               AND deadline <= ?1 ORDER BY deadline LIMIT ?3) \
                 RETURNING id, procedure, attempt, deadline",
                kind = ErrorKind::Expired.as_str()
            ))
            .map_err(sql_err)?;
        let rows = s
            .query_map(params![now.as_i64(), self.expires(now), i64::try_from(max).unwrap_or(i64::MAX)], |r| {
                Ok(Expired {
                    id: TaskId(r.get::<_, String>(0)?.into()),
                    procedure: r.get(1)?,
                    attempt: r.get(2)?,
                    deadline: UnixMs::from_i64(r.get(3)?),
                })
            })
            .map_err(sql_err)?;
        rows.collect::<Result<_, _>>().map_err(sql_err)
    }

    fn finish(&mut self, batch: &[Finish]) -> Result<Vec<Fenced>, StoreError> {
        let mut out = Vec::with_capacity(batch.len());
        for f in batch {
            let (id, lease, now) = (f.id.as_str(), f.lease.0 as i64, f.now.as_i64());
            const FENCE: &str = "WHERE id = ?1 AND lease = ?2 AND status = 'running'";
            let n = match &f.outcome {
                Outcome::Done(result) => self
                    .conn
                    .prepare_cached(&format!(
                        "UPDATE tasks SET status = 'done', result = ?4, error_kind = NULL, error = NULL, \
                         finished_at = ?3, expires_at = ?5, owner = NULL, lease_until = NULL {FENCE}"
                    ))
                    .and_then(|mut s| s.execute(params![id, lease, now, result.get(), self.expires(f.now)])),
                Outcome::Failed(e) => self
                    .conn
                    .prepare_cached(&format!(
                        "UPDATE tasks SET status = 'error', error_kind = ?4, error = ?5, finished_at = ?3, \
                         expires_at = ?6, owner = NULL, lease_until = NULL {FENCE}"
                    ))
                    .and_then(|mut s| {
                        s.execute(params![id, lease, now, e.kind.as_str(), e.message, self.expires(f.now)])
                    }),
                Outcome::Retry { run_after, error } => self
                    .conn
                    .prepare_cached(&format!(
                        "UPDATE tasks SET status = 'pending', error_kind = ?3, error = ?4, run_after = ?5, \
                         owner = NULL, lease_until = NULL {FENCE}"
                    ))
                    .and_then(|mut s| {
                        s.execute(params![id, lease, error.kind.as_str(), error.message, run_after.as_i64()])
                    }),
                Outcome::Release { run_after } => self
                    .conn
                    .prepare_cached(&format!(
                        "UPDATE tasks SET status = 'pending', attempt = max(attempt - 1, 0), run_after = ?3, \
                         owner = NULL, lease_until = NULL {FENCE}"
                    ))
                    .and_then(|mut s| s.execute(params![id, lease, run_after.as_i64()])),
            }
            .map_err(sql_err)?;
            out.push(if n == 1 { Fenced::Applied } else { Fenced::Stale });
        }
        Ok(out)
    }

    fn command(&mut self, id: &TaskId, command: Command, now: UnixMs) -> Result<Option<Commanded>, StoreError> {
        type Found = (i64, String, Option<i64>, String, u32);
        let found: Option<Found> = self
            .conn
            .prepare_cached("SELECT seq, status, expires_at, procedure, attempt FROM tasks WHERE id = ?1")
            .map_err(sql_err)?
            .query_row([id.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
            .optional()
            .map_err(sql_err)?;
        let Some((seq, status, expires, procedure, attempt)) = found else { return Ok(None) };
        if expires.is_some_and(|e| e <= now.as_i64()) {
            return Ok(None);
        }
        let status = parse_status(&status)?;
        let finish_as =
            |conn: &Connection, status: &str, result: Option<&str>, kind: Option<&str>, msg: Option<&str>| {
                conn.prepare_cached(
                    "UPDATE tasks SET status = ?2, result = ?3, error_kind = ?4, error = ?5, finished_at = ?6, \
                 expires_at = ?7, owner = NULL, lease_until = NULL WHERE seq = ?1",
                )
                .and_then(|mut s| s.execute(params![seq, status, result, kind, msg, now.as_i64(), self.expires(now)]))
                .map_err(sql_err)
            };
        match command {
            Command::Interrupt if !status.is_final() => {
                finish_as(&self.conn, "interrupted", None, Some(ErrorKind::Aborted.as_str()), Some("aborted"))?;
            }
            Command::MarkDone if !status.is_final() => {
                finish_as(&self.conn, "done", Some("null"), None, None)?;
            }
            Command::Delete => {
                self.conn
                    .prepare_cached("DELETE FROM tasks WHERE seq = ?1")
                    .and_then(|mut s| s.execute([seq]))
                    .map_err(sql_err)?;
            }
            Command::Interrupt | Command::MarkDone => {}
        }
        Ok(Some(Commanded { before: status, procedure, attempt }))
    }
}

fn fail(op: WriteOp, e: StoreError) {
    match op {
        WriteOp::Submit(_, r) => answer(r, Err(e))(None),
        WriteOp::Claim(_, r) => answer(r, Err(e))(None),
        WriteOp::Finish(_, r) => answer(r, Err(e))(None),
        WriteOp::Command(_, _, _, r) => answer(r, Err(e))(None),
        WriteOp::Recover(_, _, r) | WriteOp::Reap(_, r) | WriteOp::Purge(_, _, r) => answer(r, Err(e))(None),
        WriteOp::Expire(_, _, r) => answer(r, Err(e))(None),
        WriteOp::SaveAgent(_, r) => answer(r, Err(e))(None),
        WriteOp::RemoveAgent(_, r) => answer(r, Err(e))(None),
        WriteOp::Close(done) => {
            let _ = done.send(());
        }
    }
}

fn refuse(op: WriteOp) {
    fail(op, StoreError::Closed)
}

fn stored_json(text: String) -> Result<Json, StoreError> {
    json(&text).map_err(|e| StoreError::Failed(format!("stored JSON is corrupt: {e}")))
}

fn parse_status(s: &str) -> Result<Status, StoreError> {
    s.parse().map_err(|e| StoreError::Failed(format!("stored status is corrupt: {e}")))
}

fn task_from_row(r: &Row<'_>) -> rusqlite::Result<Result<Task, StoreError>> {
    let id: String = r.get(0)?;
    let procedure: String = r.get(1)?;
    let args: String = r.get(2)?;
    let status: String = r.get(3)?;
    let attempt: u32 = r.get(4)?;
    let max_attempts: u32 = r.get(5)?;
    let timeout_ms: i64 = r.get(6)?;
    let lease: i64 = r.get(7)?;
    let owner: Option<String> = r.get(8)?;
    let parent: Option<String> = r.get(9)?;
    let key: Option<String> = r.get(10)?;
    let created: i64 = r.get(11)?;
    let started: Option<i64> = r.get(12)?;
    let finished: Option<i64> = r.get(13)?;
    let expires: Option<i64> = r.get(14)?;
    let result: Option<String> = r.get(15)?;
    let error_kind: Option<String> = r.get(16)?;
    let error: Option<String> = r.get(17)?;
    let deadline: Option<i64> = r.get(18)?;
    Ok((|| {
        let error = match (error_kind, error) {
            (Some(k), msg) => Some(TaskError {
                kind: k
                    .parse()
                    .map_err(|e: String| StoreError::Failed(format!("stored error kind is corrupt: {e}")))?,
                message: msg.unwrap_or_default(),
            }),
            (None, _) => None,
        };
        Ok(Task {
            id: TaskId(id.into()),
            procedure,
            args: stored_json(args)?,
            status: parse_status(&status)?,
            attempt,
            max_attempts,
            timeout: Duration::from_millis(u64::try_from(timeout_ms).unwrap_or(0)),
            lease: Lease(u64::try_from(lease).unwrap_or(0)),
            owner,
            parent: parent.map(|p| TaskId(p.into())),
            key,
            created_at: UnixMs::from_i64(created),
            started_at: started.map(UnixMs::from_i64),
            finished_at: finished.map(UnixMs::from_i64),
            expires_at: expires.map(UnixMs::from_i64),
            result: result.map(stored_json).transpose()?,
            error,
            deadline: deadline.map(UnixMs::from_i64),
        })
    })())
}

/// Checkpoints the WAL passively (never blocking the writer) every `interval`, until told to
/// stop or the store is gone.
fn checkpoint_loop(conn: Connection, stop: std::sync::mpsc::Receiver<oneshot::Sender<()>>, interval: Duration) {
    loop {
        match stop.recv_timeout(interval) {
            Ok(done) => {
                drop(conn);
                let _ = done.send(());
                return;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::warn!(error = %e, "task store checkpoint failed; the writer checkpoints instead");
                }
            }
        }
    }
}

fn read_loop(conn: Connection, mut rx: mpsc::Receiver<ReadOp>) {
    while let Some(op) = rx.blocking_recv() {
        match op {
            ReadOp::Get(id, now, r) => {
                let _ = r.send(read_get(&conn, &id, now));
            }
            ReadOp::List(filter, now, r) => {
                let _ = r.send(read_list(&conn, &filter, now));
            }
            ReadOp::PendingApps(r) => {
                let _ = r.send(read_pending_apps(&conn));
            }
            ReadOp::Counts(now, r) => {
                let _ = r.send(read_counts(&conn, now));
            }
            ReadOp::Agents(r) => {
                let _ = r.send(read_agents(&conn));
            }
            ReadOp::Close(done) => {
                rx.close();
                while let Ok(op) = rx.try_recv() {
                    match op {
                        ReadOp::Get(_, _, r) => drop(r.send(Err(StoreError::Closed))),
                        ReadOp::List(_, _, r) => drop(r.send(Err(StoreError::Closed))),
                        ReadOp::PendingApps(r) => drop(r.send(Err(StoreError::Closed))),
                        ReadOp::Counts(_, r) => drop(r.send(Err(StoreError::Closed))),
                        ReadOp::Agents(r) => drop(r.send(Err(StoreError::Closed))),
                        ReadOp::Close(d) => drop(d.send(())),
                    }
                }
                drop(conn);
                let _ = done.send(());
                return;
            }
        }
    }
}

fn live(expires: Option<UnixMs>, now: UnixMs) -> bool {
    !matches!(expires, Some(e) if e <= now)
}

fn read_get(conn: &Connection, id: &TaskId, now: UnixMs) -> Result<Option<Task>, StoreError> {
    let mut s = conn.prepare_cached(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?1")).map_err(sql_err)?;
    let task = s.query_row([id.as_str()], task_from_row).optional().map_err(sql_err)?.transpose()?;
    Ok(task.filter(|t| live(t.expires_at, now)))
}

fn read_list(conn: &Connection, f: &ListFilter, now: UnixMs) -> Result<Vec<Task>, StoreError> {
    let mut sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE (expires_at IS NULL OR expires_at > ?1)");
    let mut args: Vec<rusqlite::types::Value> = vec![now.as_i64().into()];
    if let Some(s) = f.status {
        args.push(s.as_str().to_string().into());
        sql.push_str(&format!(" AND status = ?{}", args.len()));
    }
    if let Some(p) = &f.procedure {
        args.push(p.clone().into());
        sql.push_str(&format!(" AND procedure = ?{}", args.len()));
    }
    if let Some(parent) = &f.parent {
        args.push(parent.as_str().to_string().into());
        sql.push_str(&format!(" AND parent = ?{}", args.len()));
    }
    if let Some(after) = &f.after {
        args.push(after.as_str().to_string().into());
        sql.push_str(&format!(" AND seq > coalesce((SELECT seq FROM tasks WHERE id = ?{}), 0)", args.len()));
    }
    args.push(i64::try_from(f.limit).unwrap_or(i64::MAX).into());
    sql.push_str(&format!(" ORDER BY seq LIMIT ?{}", args.len()));
    let mut s = conn.prepare_cached(&sql).map_err(sql_err)?;
    let rows = s.query_map(rusqlite::params_from_iter(args), task_from_row).map_err(sql_err)?;
    let mut out = Vec::new();
    for row in rows {
        out.push(row.map_err(sql_err)??);
    }
    Ok(out)
}

fn read_pending_apps(conn: &Connection) -> Result<Vec<String>, StoreError> {
    // A skip scan over the pending index: one seek per app, not one row per task.
    let mut s = conn
        .prepare_cached(
            "WITH RECURSIVE a(app) AS (
                 SELECT min(app) FROM tasks WHERE status = 'pending'
                 UNION ALL
                 SELECT (SELECT min(app) FROM tasks WHERE status = 'pending' AND app > a.app) FROM a WHERE a.app IS NOT NULL
             ) SELECT app FROM a WHERE app IS NOT NULL",
        )
        .map_err(sql_err)?;
    let rows = s.query_map([], |r| r.get::<_, String>(0)).map_err(sql_err)?;
    rows.collect::<Result<_, _>>().map_err(sql_err)
}

fn read_counts(conn: &Connection, now: UnixMs) -> Result<Counts, StoreError> {
    let mut s = conn
        .prepare_cached(
            "SELECT status, count(*) FROM tasks WHERE expires_at IS NULL OR expires_at > ?1 GROUP BY status",
        )
        .map_err(sql_err)?;
    let mut counts = Counts::default();
    let rows = s.query_map([now.as_i64()], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))).map_err(sql_err)?;
    for row in rows {
        let (status, n) = row.map_err(sql_err)?;
        let n = u64::try_from(n).unwrap_or(0);
        match parse_status(&status)? {
            Status::Pending => counts.pending = n,
            Status::Running => counts.running = n,
            Status::Done => counts.done = n,
            Status::Error => counts.error = n,
            Status::Interrupted => counts.interrupted = n,
        }
    }
    Ok(counts)
}
