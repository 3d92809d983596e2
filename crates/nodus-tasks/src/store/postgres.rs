//! The shared store: PostgreSQL, for several manager nodes on one database.
//!
//! - **Schema.** nodus creates and migrates its own tables: migrations run in order inside one
//!   transaction under an advisory lock (two nodes starting at once: the second waits, then finds
//!   the schema current), and `nodus_schema_version` records each one. A database whose schema is
//!   newer than this binary knows is refused.
//! - **Group commit.** Submissions and completions are queued to a writer that takes everything
//!   queued (up to `max_batch` operations) and applies it as **one statement**: the new tasks
//!   inserted from arrays (`unnest`), the completions applied from arrays, the notifications sent,
//!   all in one round trip and one commit. Up to `writers` batches are in flight at once (one
//!   connection each), so the next batch fills while the previous one waits for its commit.
//! - **Claims** take due pending tasks oldest first under a lease: `FOR UPDATE SKIP LOCKED` by
//!   default, so managers claiming the same app at once never wait for each other and never take
//!   the same task; the locked rows are updated by `ctid`, and the `UPDATE` re-checks `status =
//!   'pending'` as well, so correctness never rests on the lock alone. [`ClaimMode::Guarded`] is
//!   one guarded `UPDATE ... WHERE id IN (candidates) AND status = 'pending' RETURNING`, with no
//!   row lock taken first and no `ctid`, for PostgreSQL-wire databases that lack either: a claim
//!   racing another one waits for it (or gets a serialization error and is retried), skips what
//!   the other took, and claims again for the rest. (Such databases also need `LISTEN`/`NOTIFY`
//!   and advisory locks for this store; it is tested on PostgreSQL only.)
//! - **Leases** are fencing tokens from one sequence (`nodus_task_leases`): they increase across
//!   the database, whichever node claims. A completion applies only with the task's current lease
//!   while it is running, exactly as in SQLite. A lease lasts the task's timeout plus the claim's
//!   grace; the owner ends every attempt by its timeout, so a lease still held past that belongs to
//!   a node that is gone, and any node's periodic reap makes the task pending again for the others
//!   to adopt. Nodes' clocks must agree within the grace (30 s by default).
//! - **LISTEN/NOTIFY.** Every change that makes tasks pending (submissions, retries, releases,
//!   reaps, recoveries) notifies the apps concerned, every finished task is announced, and so is
//!   every task a client's command changed; a dedicated connection listens and hands the
//!   news of *other* nodes to [`Store::wakeups`], so claimers wake at once instead of at their next
//!   poll (which stays, slower, as the safety net), waiters on one node learn of completions on
//!   another, and an abort on one node cancels the attempt on another. The listener reconnects
//!   with backoff and then wakes everything (notifications sent while it was away are lost).
//! - **Reconnection.** Connections come from a pool (`deadpool-postgres`); a connection that broke
//!   (the server restarted) is dropped and replaced on the next operation. An operation that fails
//!   answers [`StoreError::Failed`]; callers retry (the executor retries its records with backoff).

use std::collections::{HashMap, HashSet};
use std::error::Error as _;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime, TimeoutType};
use tokio::sync::{broadcast, mpsc, oneshot, Semaphore};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, NoTls, Row};

use super::{
    Claim, Command, Commanded, Counts, Expired, Fenced, Finish, ListFilter, Outcome, Store, StoreError, Wake,
    WriterStats, EXPIRED_PREFIX, EXPIRED_SUFFIX,
};
use crate::cluster::registry::{Agent, AgentStore};
use crate::task::{json, Claimed, ErrorKind, Json, Lease, NewTask, Status, Submitted, Task, TaskError, TaskId, UnixMs};

/// How claims keep two nodes from taking the same task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClaimMode {
    /// `SELECT ... FOR UPDATE SKIP LOCKED` picks the rows, the `UPDATE` takes them (and re-checks
    /// that they are pending). Concurrent claimers never wait for each other (default).
    #[default]
    SkipLocked,
    /// One guarded `UPDATE ... WHERE status = 'pending' ... RETURNING`, no row locks taken
    /// beforehand: for PostgreSQL-wire databases without `SKIP LOCKED`. Concurrent claimers of one
    /// app wait for each other (or retry on a serialization error).
    Guarded,
}

impl std::str::FromStr for ClaimMode {
    type Err = String;

    fn from_str(s: &str) -> Result<ClaimMode, String> {
        match s {
            "skip_locked" => Ok(ClaimMode::SkipLocked),
            "guarded" => Ok(ClaimMode::Guarded),
            _ => Err(format!("claim mode is {s:?}; use skip_locked or guarded")),
        }
    }
}

/// Settings and bounds of the PostgreSQL store.
#[derive(Clone)]
pub struct PgConfig {
    /// Where: a `postgres://user:password@host:port/database?options` URL (libpq's form).
    /// Two parameters are nodus's own and removed before connecting: `schema=NAME` (see
    /// [`PgConfig::schema`]) and `claim=skip_locked|guarded` (see [`PgConfig::claim`]).
    pub url: String,
    /// The schema holding the tables (created when missing), `[a-z0-9_]`, at most 48 bytes;
    /// `None`: the connection's default (`public`). Nodes that share tasks use the same one.
    pub schema: Option<String>,
    /// How claims are made safe between nodes.
    pub claim: ClaimMode,
    /// How long a finished task and its result are kept (default one day).
    pub result_ttl: Duration,
    /// Connections in the pool (default 8): writers, claims, commands and reads share them; the
    /// listener has its own.
    pub pool_size: usize,
    /// Batches being written at once, each on its own connection (default 2).
    pub writers: usize,
    /// Operations waiting for the writer; beyond it callers get [`StoreError::Overloaded`].
    pub queue: usize,
    /// Most operations in one batch (one statement, one commit).
    pub max_batch: usize,
    /// Longest wait to connect, and for a free connection (default 5 s).
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConfig")
            .field("url", &redact(&self.url))
            .field("schema", &self.schema)
            .field("claim", &self.claim)
            .field("pool_size", &self.pool_size)
            .finish_non_exhaustive()
    }
}

/// Longest schema name (the notification channel adds its prefix to it; identifiers have 63 bytes).
pub const MAX_SCHEMA_LEN: usize = 48;

impl PgConfig {
    /// Defaults for the database at `url`; `schema=` and `claim=` parameters in it are taken out
    /// and applied.
    ///
    /// # Errors
    /// A `schema` or `claim` parameter with a value nodus does not accept.
    pub fn new(url: &str) -> Result<PgConfig, StoreError> {
        let mut config = PgConfig {
            url: url.to_string(),
            schema: None,
            claim: ClaimMode::default(),
            result_ttl: Duration::from_secs(86_400),
            pool_size: 8,
            writers: 2,
            queue: 65_536,
            max_batch: 4096,
            connect_timeout: Duration::from_secs(5),
        };
        if let Some((base, query)) = url.split_once('?') {
            let mut kept = Vec::new();
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                match pair.split_once('=') {
                    Some(("schema", v)) => config.schema = Some(v.to_string()),
                    Some(("claim", v)) => config.claim = v.parse().map_err(StoreError::Failed)?,
                    _ => kept.push(pair),
                }
            }
            config.url = if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) };
        }
        if let Some(s) = &config.schema {
            check_schema(s)?;
        }
        Ok(config)
    }
}

fn check_schema(s: &str) -> Result<(), StoreError> {
    let ok = !s.is_empty()
        && s.len() <= MAX_SCHEMA_LEN
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(StoreError::Failed(format!(
            "schema {s:?} is not accepted: use 1 to {MAX_SCHEMA_LEN} of a-z, 0-9 and _, not starting with a digit"
        )))
    }
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let authority = rest.find(['/', '?']).map_or(rest, |end| &rest[..end]);
    let (auth, tail) = match authority.rfind('@') {
        Some(at) => rest.split_at(at),
        None => return url.to_string(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***{tail}"),
        None => url.to_string(),
    }
}

/// The schema's migrations, in order: `(version, SQL)`. Never edit one that shipped; add the
/// next.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "
CREATE TABLE nodus_tasks (
    id           text COLLATE \"C\" PRIMARY KEY,
    seq          bigint GENERATED ALWAYS AS IDENTITY,
    procedure    text COLLATE \"C\" NOT NULL,
    app          text COLLATE \"C\" NOT NULL,
    args         text    NOT NULL,
    status       text    NOT NULL CHECK (status IN ('pending', 'running', 'done', 'error', 'interrupted')),
    attempt      integer NOT NULL,
    max_attempts integer NOT NULL,
    timeout_ms   bigint  NOT NULL,
    lease        bigint  NOT NULL,
    owner        text,
    lease_until  bigint,
    parent       text,
    key          text COLLATE \"C\",
    created_at   bigint  NOT NULL,
    run_after    bigint  NOT NULL,
    started_at   bigint,
    finished_at  bigint,
    expires_at   bigint,
    result       text,
    error_kind   text,
    error        text
);
CREATE INDEX nodus_tasks_pending ON nodus_tasks (app, seq) WHERE status = 'pending';
CREATE INDEX nodus_tasks_running ON nodus_tasks (lease_until) WHERE status = 'running';
CREATE INDEX nodus_tasks_expiry ON nodus_tasks (expires_at) WHERE expires_at IS NOT NULL;
CREATE UNIQUE INDEX nodus_tasks_key ON nodus_tasks (key) WHERE key IS NOT NULL;
CREATE SEQUENCE nodus_task_leases AS bigint START 1;
",
    ),
    (
        2,
        "
CREATE TABLE nodus_agents (
    name        text COLLATE \"C\" PRIMARY KEY,
    id          text    NOT NULL UNIQUE,
    ip          text    NOT NULL,
    mac         text    NOT NULL,
    cores       bigint  NOT NULL,
    memory      bigint  NOT NULL,
    concurrency bigint  NOT NULL,
    queue       bigint  NOT NULL,
    first_seen  bigint  NOT NULL,
    last_seen   bigint  NOT NULL,
    state       text    NOT NULL CHECK (state IN ('active', 'silent', 'gone')),
    state_since bigint  NOT NULL,
    banned      boolean NOT NULL
);
",
    ),
    (
        3,
        "
ALTER TABLE nodus_tasks ADD COLUMN deadline bigint;
CREATE INDEX nodus_tasks_deadline ON nodus_tasks (deadline) WHERE status = 'pending' AND deadline IS NOT NULL;
CREATE INDEX nodus_tasks_parent ON nodus_tasks (parent) WHERE parent IS NOT NULL;
",
    ),
];

const AGENT_COLUMNS: &str =
    "name, id, ip, mac, cores, memory, concurrency, queue, first_seen, last_seen, state, state_since, banned";

/// The component name in `nodus_schema_version`.
const COMPONENT: &str = "tasks";

const TASK_COLUMNS: &str =
    "id, procedure, args, status, attempt, max_attempts, timeout_ms, lease, owner, parent, key, \
     created_at, started_at, finished_at, expires_at, result, error_kind, error, deadline";

/// One batch: new tasks and completions, with the notifications, in one statement.
/// `$1..$9` and `$23` the new tasks, `$10..$20` the completions, `$21` the channel, `$22` this
/// store.
/// Finished ids are announced 50 per notification (a payload has at most 8000 bytes, an id at
/// most 128).
const APPLY: &str = "
WITH new AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::int8[], $7::text[],
                         $8::text[], $9::int8[], $23::int8[]) WITH ORDINALITY
        AS n(id, procedure, app, args, max_attempts, timeout_ms, parent, key, created_at, deadline, ord)
), ins AS (
    INSERT INTO nodus_tasks (id, procedure, app, args, status, attempt, max_attempts, timeout_ms, lease, parent,
                             key, created_at, run_after, deadline)
    SELECT id, procedure, app, args, 'pending', 0, max_attempts, timeout_ms, 0, parent, key, created_at, created_at,
           deadline
    FROM new ORDER BY ord
    ON CONFLICT DO NOTHING
    RETURNING id, app
), fin AS (
    UPDATE nodus_tasks t SET
        status = f.status,
        attempt = t.attempt - f.uncount,
        result = f.result,
        error_kind = CASE WHEN f.keep_error THEN t.error_kind ELSE f.error_kind END,
        error = CASE WHEN f.keep_error THEN t.error ELSE f.error END,
        run_after = coalesce(f.run_after, t.run_after),
        finished_at = f.finished_at,
        expires_at = f.expires_at,
        owner = NULL,
        lease_until = NULL
    FROM unnest($10::text[], $11::int8[], $12::text[], $13::int4[], $14::text[], $15::bool[], $16::text[],
                $17::text[], $18::int8[], $19::int8[], $20::int8[])
        AS f(id, lease, status, uncount, result, keep_error, error_kind, error, run_after, finished_at, expires_at)
    WHERE t.id = f.id AND t.lease = f.lease AND t.status = 'running'
    RETURNING t.id, t.lease, t.app, t.status
), woken AS (
    SELECT pg_notify($21, $22 || ' a ' || app) FROM (SELECT app FROM ins UNION SELECT app FROM fin WHERE status = 'pending') w
), ended AS (
    SELECT pg_notify($21, $22 || ' f ' || string_agg(id, ' ')) FROM (
        SELECT id, (row_number() OVER ()) / 50 AS chunk FROM fin WHERE status <> 'pending'
    ) e GROUP BY chunk
)
SELECT 0::int4 AS kind, id, 0::int8 AS lease FROM ins
UNION ALL SELECT 1, id, lease FROM fin
UNION ALL SELECT 2, NULL, (SELECT count(*) FROM woken) + (SELECT count(*) FROM ended)
";

/// Claims with `FOR UPDATE SKIP LOCKED`. `$1` app, `$2` now, `$3` max, `$4` owner, `$5` grace.
/// A task whose deadline is at or before now is not a candidate (never claimed).
/// The locked rows are updated by their physical address (`ctid`: a locked row cannot move).
const CLAIM_SKIP_LOCKED: &str = "
WITH picked AS (
    SELECT ctid FROM nodus_tasks
    WHERE status = 'pending' AND app = $1 AND run_after <= $2 AND (deadline IS NULL OR deadline > $2)
    ORDER BY seq LIMIT $3
    FOR UPDATE SKIP LOCKED
)
UPDATE nodus_tasks t SET status = 'running', attempt = t.attempt + 1, lease = nextval('nodus_task_leases'),
    owner = $4, started_at = $2, lease_until = $2 + t.timeout_ms + $5
FROM picked WHERE t.ctid = picked.ctid AND t.status = 'pending'
RETURNING t.seq, t.id, t.procedure, t.args, t.attempt, t.max_attempts, t.timeout_ms, t.lease, t.created_at, t.parent,
    t.deadline
";

/// Claims with one guarded `UPDATE` (no locks beforehand, no `ctid`: neither exists in every
/// PostgreSQL-wire database). Same parameters. The last column counts the candidates the claim
/// saw: when concurrent claims took some of them first (the guard skipped them), it claims again.
const CLAIM_GUARDED: &str = "
WITH cand AS (
    SELECT id FROM nodus_tasks
    WHERE status = 'pending' AND app = $1 AND run_after <= $2 AND (deadline IS NULL OR deadline > $2)
    ORDER BY seq LIMIT $3
), taken AS (
    UPDATE nodus_tasks t SET status = 'running', attempt = t.attempt + 1, lease = nextval('nodus_task_leases'),
        owner = $4, started_at = $2, lease_until = $2 + t.timeout_ms + $5
    WHERE t.id IN (SELECT id FROM cand) AND t.status = 'pending'
    RETURNING t.seq, t.id, t.procedure, t.args, t.attempt, t.max_attempts, t.timeout_ms, t.lease, t.created_at, t.parent,
    t.deadline
)
SELECT taken.*, c.n FROM (SELECT count(*) AS n FROM cand) c LEFT JOIN taken ON true
";

/// Most times a guarded claim runs again after concurrent claims took its candidates.
const GUARDED_ROUNDS: usize = 8;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// Operations of the writer.
enum WriteOp {
    Submit(Vec<NewTask>, Reply<Vec<Submitted>>),
    Finish(Vec<Finish>, Reply<Vec<Fenced>>),
    Close(oneshot::Sender<()>),
}

/// The PostgreSQL task store. Cheap to clone; every clone shares the pool, the writer and the
/// listener.
#[derive(Clone)]
pub struct PgStore {
    shared: Arc<Shared>,
    writer: mpsc::Sender<WriteOp>,
    queue: usize,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("target", &self.shared.target).finish_non_exhaustive()
    }
}

struct Shared {
    pool: Pool,
    /// `host:port/database` for messages (never the password).
    target: String,
    /// The notification channel (one per schema).
    channel: String,
    /// This store's id in notifications, to skip its own.
    me: String,
    ttl: Duration,
    claim: ClaimMode,
    closed: AtomicBool,
    wake: broadcast::Sender<Wake>,
    listener: tokio::task::AbortHandle,
    commits: AtomicU64,
    operations: AtomicU64,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// Where the config points, for messages: `host:port/database as user`.
fn target_of(c: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = c
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let port = c.get_ports().get(i).or(c.get_ports().first()).copied().unwrap_or(5432);
            match h {
                tokio_postgres::config::Host::Tcp(name) => format!("{name}:{port}"),
                tokio_postgres::config::Host::Unix(dir) => format!("{}/.s.PGSQL.{port}", dir.display()),
            }
        })
        .collect();
    let hosts = if hosts.is_empty() { "localhost:5432".to_string() } else { hosts.join(",") };
    let user = c.get_user().unwrap_or("(the OS user)");
    format!("{hosts}/{} as {user}", c.get_dbname().unwrap_or(c.get_user().unwrap_or("postgres")))
}

/// An error with its causes, as one line.
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} {}", db.code().code(), db.message());
        if let Some(d) = db.detail() {
            s.push_str(&format!(" ({d})"));
        }
        if let Some(h) = db.hint() {
            s.push_str(&format!("; hint: {h}"));
        }
        return s;
    }
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

fn is_full(e: &tokio_postgres::Error) -> bool {
    // Class 53: insufficient resources (disk full, out of memory, too many connections).
    e.code().is_some_and(|c| *c == SqlState::DISK_FULL || *c == SqlState::PROGRAM_LIMIT_EXCEEDED)
}

/// Serialization failures and deadlocks: the operation is retried.
fn is_transient(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED)
}

/// Most attempts of an operation that hit a serialization failure or a deadlock.
const TRANSIENT_RETRIES: usize = 5;

impl Shared {
    fn err(&self, e: &tokio_postgres::Error) -> StoreError {
        if is_full(e) {
            return StoreError::Full(format!("PostgreSQL at {}: {}", self.target, describe(e)));
        }
        if e.is_closed() || e.as_db_error().is_none() {
            return StoreError::Failed(format!(
                "the connection to PostgreSQL at {} failed: {}; nodus reconnects at the next operation",
                self.target,
                describe(e)
            ));
        }
        StoreError::Failed(format!("PostgreSQL at {}: {}", self.target, describe(e)))
    }

    fn pool_err(&self, e: PoolError) -> StoreError {
        match e {
            PoolError::Closed => StoreError::Closed,
            PoolError::Backend(e) => StoreError::Failed(format!(
                "cannot connect to PostgreSQL at {}: {}; check that the server runs and accepts connections",
                self.target,
                describe(&e)
            )),
            PoolError::Timeout(TimeoutType::Wait) => StoreError::Failed(format!(
                "every connection to PostgreSQL at {} stayed busy past the timeout; the database is slower than the load",
                self.target
            )),
            PoolError::Timeout(_) => StoreError::Failed(format!(
                "connecting to PostgreSQL at {} timed out; check that the server runs and the network reaches it",
                self.target
            )),
            other => StoreError::Failed(format!("PostgreSQL at {}: {other}", self.target)),
        }
    }

    async fn conn(&self) -> Result<deadpool_postgres::Object, StoreError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        self.pool.get().await.map_err(|e| self.pool_err(e))
    }

    /// Runs `op` on a pooled connection, again after a serialization failure or a deadlock.
    async fn with_retry<T, F, Fut>(&self, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut(deadpool_postgres::Object) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let mut tries = 0;
        loop {
            let conn = self.conn().await?;
            match op(conn).await {
                Ok(v) => return Ok(v),
                Err(e) if is_transient(&e) && tries + 1 < TRANSIENT_RETRIES => {
                    tries += 1;
                    tracing::debug!(error = %describe(&e), tries, "task store operation retried");
                }
                Err(e) => return Err(self.err(&e)),
            }
        }
    }

    fn expires(&self, now: UnixMs) -> i64 {
        now.plus(self.ttl).as_i64()
    }
}

impl PgStore {
    /// Connects, creates or migrates the schema, and starts the writer and the listener.
    ///
    /// # Errors
    /// The server cannot be reached or refuses the login, the database does not exist, the user
    /// may not create the tables, or the schema is newer than this binary: a message says which
    /// host, what failed and what to check.
    pub async fn open(config: PgConfig) -> Result<PgStore, StoreError> {
        let mut pg: tokio_postgres::Config = config.url.parse().map_err(|e: tokio_postgres::Error| {
            StoreError::Failed(format!("the task store URL {} is not valid: {}", redact(&config.url), describe(&e)))
        })?;
        pg.connect_timeout(config.connect_timeout);
        pg.keepalives_idle(Duration::from_secs(15));
        if pg.get_application_name().is_none() {
            pg.application_name("nodus-tasks");
        }
        if let Some(schema) = &config.schema {
            check_schema(schema)?;
            let options = format!("{} -c search_path={schema}", pg.get_options().unwrap_or("")).trim().to_string();
            pg.options(options);
        }
        let target = target_of(&pg);
        let channel = format!("nodus_tasks_{}", config.schema.as_deref().unwrap_or("public"));

        // The first connection says clearly what is wrong, and migrates.
        let (client, conn) = pg.connect(NoTls).await.map_err(|e| open_error(&target, &e))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let migrated = migrate(&client, config.schema.as_deref()).await.map_err(|e| match e {
            Migrate::Pg(e) => open_error(&target, &e),
            Migrate::Newer(v) => StoreError::Failed(format!(
                "the task tables at {target} are at schema version {v}, newer than this nodus knows ({}); \
                 upgrade nodus on this node",
                MIGRATIONS.last().map_or(0, |m| m.0)
            )),
        });
        drop(client);
        let _ = driver.await;
        if let Some(applied) = migrated? {
            tracing::info!(%target, version = applied, "task store schema migrated");
        }

        let manager =
            Manager::from_config(pg.clone(), NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(config.pool_size.max(config.writers + 1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(config.connect_timeout * 2))
            .create_timeout(Some(config.connect_timeout))
            .recycle_timeout(Some(config.connect_timeout))
            .build()
            .map_err(|e| StoreError::Failed(format!("cannot set up the connection pool: {e}")))?;
        let me = format!("{:016x}", rand::random::<u64>());
        let (wake, _) = broadcast::channel(1024);
        let (ready, listening) = oneshot::channel();
        let listener = tokio::spawn(listen(pg, channel.clone(), me.clone(), wake.clone(), target.clone(), ready));
        // Open only once other nodes' news is heard: nothing sent after this is missed.
        match tokio::time::timeout(config.connect_timeout * 2, listening).await {
            Ok(Ok(())) => {}
            _ => {
                listener.abort();
                return Err(StoreError::Failed(format!(
                    "cannot LISTEN for task news on PostgreSQL at {target}; check the server's log"
                )));
            }
        }
        let listener = listener.abort_handle();
        let shared = Arc::new(Shared {
            pool,
            target,
            channel,
            me,
            ttl: config.result_ttl,
            claim: config.claim,
            closed: AtomicBool::new(false),
            wake,
            listener,
            commits: AtomicU64::new(0),
            operations: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        tokio::spawn(write_loop(shared.clone(), rx, config.writers.max(1), config.max_batch.max(1)));
        Ok(PgStore { shared, writer: tx, queue: config.queue })
    }

    /// Finishes the operations already queued, then closes every connection. Operations after
    /// this fail with [`StoreError::Closed`].
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.writer.send(WriteOp::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
        self.shared.closed.store(true, Ordering::Release);
        self.shared.listener.abort();
        self.shared.pool.close();
    }

    /// How many batches the writer committed, and how many operations they held.
    pub fn writer_stats(&self) -> WriterStats {
        WriterStats {
            commits: self.shared.commits.load(Ordering::Relaxed),
            operations: self.shared.operations.load(Ordering::Relaxed),
        }
    }

    /// Where the store is (`host:port/database as user`; never the password).
    pub fn target(&self) -> &str {
        &self.shared.target
    }

    async fn write<T>(&self, op: impl FnOnce(Reply<T>) -> WriteOp) -> Result<T, StoreError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        let (tx, rx) = oneshot::channel();
        match self.writer.try_send(op(tx)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => return Err(StoreError::Overloaded(self.queue)),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(StoreError::Closed),
        }
        rx.await.unwrap_or(Err(StoreError::Closed))
    }
}

/// Why opening failed, in the user's terms.
fn open_error(target: &str, e: &tokio_postgres::Error) -> StoreError {
    let what = describe(e);
    let advice = match e.code() {
        Some(c) if *c == SqlState::INVALID_PASSWORD || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION => {
            "PostgreSQL refused the login: check the user and password in [tasks] store, and pg_hba.conf on the server"
        }
        Some(c) if *c == SqlState::INVALID_CATALOG_NAME => {
            "create it (createdb NAME) or fix the database name in [tasks] store"
        }
        Some(c) if *c == SqlState::INSUFFICIENT_PRIVILEGE => {
            "the user may not create the task tables: grant it CREATE on the database and schema, or migrate as their owner"
        }
        Some(c) if *c == SqlState::TOO_MANY_CONNECTIONS => {
            "the server has no free connections: raise max_connections or lower tasks' pool size"
        }
        Some(_) => "check the server's log",
        None => {
            "check that PostgreSQL runs there and accepts TCP connections from this host (listen_addresses, \
             pg_hba.conf, firewalls), and the host and port in [tasks] store"
        }
    };
    StoreError::Failed(format!("cannot open the task store on PostgreSQL at {target}: {what}; {advice}"))
}

enum Migrate {
    Pg(tokio_postgres::Error),
    Newer(i32),
}

impl From<tokio_postgres::Error> for Migrate {
    fn from(e: tokio_postgres::Error) -> Migrate {
        Migrate::Pg(e)
    }
}

/// The advisory lock key of migrations in `schema`: one per schema, the same on every node.
fn migration_lock(schema: Option<&str>) -> i64 {
    let name = format!("nodus-tasks-migrate:{}", schema.unwrap_or(""));
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    i64::from_ne_bytes(h.to_ne_bytes())
}

/// Creates or migrates the schema under an advisory lock. Returns the version migrated to, if
/// anything was applied.
async fn migrate(client: &tokio_postgres::Client, schema: Option<&str>) -> Result<Option<i32>, Migrate> {
    client.batch_execute("BEGIN").await?;
    let result = async {
        client.execute("SELECT pg_advisory_xact_lock($1)", &[&migration_lock(schema)]).await?;
        if let Some(s) = schema {
            // Validated by check_schema: a plain identifier.
            client.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {s}")).await?;
        }
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS nodus_schema_version (
                     component  text NOT NULL,
                     version    integer NOT NULL,
                     applied_at timestamptz NOT NULL DEFAULT now(),
                     PRIMARY KEY (component, version)
                 )",
            )
            .await?;
        let row = client
            .query_one("SELECT coalesce(max(version), 0) FROM nodus_schema_version WHERE component = $1", &[&COMPONENT])
            .await?;
        let current: i32 = row.get(0);
        let latest = MIGRATIONS.last().map_or(0, |m| m.0);
        if current > latest {
            return Err(Migrate::Newer(current));
        }
        let mut applied = None;
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            client.batch_execute(sql).await?;
            client
                .execute(
                    "INSERT INTO nodus_schema_version (component, version) VALUES ($1, $2)",
                    &[&COMPONENT, version],
                )
                .await?;
            applied = Some(*version);
        }
        Ok(applied)
    }
    .await;
    match result {
        Ok(applied) => {
            client.batch_execute("COMMIT").await?;
            Ok(applied)
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

/// Listens for the other nodes' news and hands it to [`Store::wakeups`]; reconnects with backoff.
async fn listen(
    config: tokio_postgres::Config,
    channel: String,
    me: String,
    wake: broadcast::Sender<Wake>,
    target: String,
    ready: oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut backoff = nodus_wire::Backoff::new(Duration::from_millis(100), Duration::from_secs(5), rand::random());
    let mut connected_before = false;
    let mut failures = 0u32;
    loop {
        match config.connect(NoTls).await {
            Ok((client, mut conn)) => {
                let (tx, mut rx) = mpsc::channel::<String>(4096);
                let driver = tokio::spawn(async move {
                    while let Some(msg) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                        match msg {
                            Ok(AsyncMessage::Notification(n)) => {
                                if tx.send(n.payload().to_string()).await.is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %describe(&e), "the task store's listening connection failed");
                                return;
                            }
                        }
                    }
                });
                if let Err(e) = client.batch_execute(&format!("LISTEN {channel}")).await {
                    tracing::warn!(%target, error = %describe(&e), "cannot listen for task news; retrying");
                    driver.abort();
                } else {
                    if connected_before || failures > 0 {
                        tracing::info!(%target, "listening for task news again");
                        // News sent while nobody listened is lost: look at everything.
                        let _ = wake.send(Wake::All);
                    }
                    connected_before = true;
                    failures = 0;
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                    backoff.reset();
                    while let Some(payload) = rx.recv().await {
                        if let Some(w) = parse_news(&payload, &me) {
                            let _ = wake.send(w);
                        }
                    }
                    tracing::warn!(%target, "the task store's listening connection closed; reconnecting");
                    let _ = wake.send(Wake::All);
                }
                drop(client);
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(20) {
                    tracing::warn!(%target, error = %describe(&e), failures, "cannot connect to listen for task news; retrying");
                }
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// A notification's payload: `<store> a <app>`, `<store> f <id> <id>...`, `<store> x <id>`.
/// `None`: this store's own, or not one of ours.
fn parse_news(payload: &str, me: &str) -> Option<Wake> {
    let mut parts = payload.splitn(3, ' ');
    let (from, kind, rest) = (parts.next()?, parts.next()?, parts.next()?);
    if from == me {
        return None;
    }
    match kind {
        "a" => Some(Wake::Pending(rest.to_string())),
        "f" => Some(Wake::Finished(rest.split(' ').filter_map(|id| id.parse().ok()).collect())),
        "x" => rest.parse().ok().map(Wake::Commanded),
        _ => None,
    }
}

/// Takes queued operations in batches and applies each batch on its own connection, up to
/// `writers` at once. Stops at a close request once the batches before it are answered.
async fn write_loop(shared: Arc<Shared>, mut rx: mpsc::Receiver<WriteOp>, writers: usize, max_batch: usize) {
    let permits = Arc::new(Semaphore::new(writers));
    let mut received = Vec::with_capacity(max_batch);
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else { return };
        if rx.recv_many(&mut received, max_batch).await == 0 {
            return;
        }
        let mut ops = Vec::with_capacity(received.len());
        let mut closing = None;
        for op in received.drain(..) {
            match op {
                WriteOp::Close(done) if closing.is_none() => closing = Some(done),
                op if closing.is_some() => refuse(op),
                op => ops.push(op),
            }
        }
        if !ops.is_empty() {
            let shared = shared.clone();
            tokio::spawn(async move {
                apply_batch(&shared, ops).await;
                drop(permit);
            });
        } else {
            drop(permit);
        }
        if let Some(done) = closing {
            rx.close();
            while let Ok(op) = rx.try_recv() {
                refuse(op);
            }
            let _ = permits.acquire_many(u32::try_from(writers).unwrap_or(u32::MAX)).await;
            let _ = done.send(());
            return;
        }
    }
}

fn refuse(op: WriteOp) {
    match op {
        WriteOp::Submit(_, r) => drop(r.send(Err(StoreError::Closed))),
        WriteOp::Finish(_, r) => drop(r.send(Err(StoreError::Closed))),
        WriteOp::Close(done) => drop(done.send(())),
    }
}

/// A batch's arrays, in the order of `APPLY`'s parameters.
#[derive(Default)]
struct Arrays<'a> {
    id: Vec<&'a str>,
    procedure: Vec<&'a str>,
    app: Vec<&'a str>,
    args: Vec<&'a str>,
    max_attempts: Vec<i32>,
    timeout_ms: Vec<i64>,
    parent: Vec<Option<&'a str>>,
    key: Vec<Option<&'a str>>,
    created_at: Vec<i64>,
    deadline: Vec<Option<i64>>,
    f_id: Vec<&'a str>,
    f_lease: Vec<i64>,
    f_status: Vec<&'static str>,
    f_uncount: Vec<i32>,
    f_result: Vec<Option<&'a str>>,
    f_keep_error: Vec<bool>,
    f_error_kind: Vec<Option<&'static str>>,
    f_error: Vec<Option<&'a str>>,
    f_run_after: Vec<Option<i64>>,
    f_finished_at: Vec<Option<i64>>,
    f_expires_at: Vec<Option<i64>>,
    /// Keys of keyed tasks inserted (the first of each key), with their creation time.
    keys: Vec<&'a str>,
    key_created: Vec<i64>,
}

/// What one batch found: the ids inserted, the `(id, lease)` completions applied, and who holds
/// each key asked about.
struct Applied {
    inserted: HashSet<String>,
    finished: HashSet<(String, i64)>,
    holders: HashMap<String, String>,
}

fn lease_i64(l: Lease) -> i64 {
    i64::try_from(l.0).unwrap_or(i64::MAX)
}

/// Applies a batch: all of it in one statement when possible; when that fails on something one
/// operation did (a constraint, a value out of range), each operation again on its own, so one
/// bad operation does not fail the others.
async fn apply_batch(shared: &Shared, ops: Vec<WriteOp>) {
    let n = ops.len();
    if n > 1 {
        match run_ops(shared, &ops).await {
            Ok(applied) => {
                shared.commits.fetch_add(1, Ordering::Relaxed);
                shared.operations.fetch_add(n as u64, Ordering::Relaxed);
                answer(ops, &applied);
                return;
            }
            Err(OpError::Pg(e)) if e.as_db_error().is_some() => {
                tracing::warn!(error = %describe(&e), operations = n, "task store batch failed; applying its operations one by one");
            }
            Err(e) => {
                let e = e.into_store(shared);
                tracing::error!(error = %e, operations = n, "task store batch failed");
                for op in ops {
                    fail(op, e.clone());
                }
                return;
            }
        }
    }
    for op in ops {
        let one = [op];
        match run_ops(shared, &one).await {
            Ok(applied) => {
                shared.commits.fetch_add(1, Ordering::Relaxed);
                shared.operations.fetch_add(1, Ordering::Relaxed);
                answer(one, &applied);
            }
            Err(e) => {
                let e = e.into_store(shared);
                tracing::error!(error = %e, "task store operation failed");
                let [op] = one;
                fail(op, e);
            }
        }
    }
}

/// Why a batch failed: the database said no, or there was no connection to ask.
enum OpError {
    Pg(tokio_postgres::Error),
    Store(StoreError),
}

impl OpError {
    fn into_store(self, shared: &Shared) -> StoreError {
        match self {
            OpError::Pg(e) => shared.err(&e),
            OpError::Store(e) => e,
        }
    }
}

fn fail(op: WriteOp, e: StoreError) {
    match op {
        WriteOp::Submit(_, r) => drop(r.send(Err(e))),
        WriteOp::Finish(_, r) => drop(r.send(Err(e))),
        WriteOp::Close(done) => drop(done.send(())),
    }
}

/// Runs operations as one statement (plus, when idempotency keys are involved, the deletion of
/// expired key holders before and the lookup of existing holders after, in one transaction).
/// Retries serialization failures and deadlocks.
async fn run_ops(shared: &Shared, ops: &[WriteOp]) -> Result<Applied, OpError> {
    let mut a = Arrays::default();
    let mut seen_keys = HashSet::new();
    let mut seen_finishes = HashSet::new();
    let mut asked_keys: Vec<&str> = Vec::new();
    for op in ops {
        match op {
            WriteOp::Submit(tasks, _) => {
                for t in tasks {
                    if let Some(k) = &t.key {
                        asked_keys.push(k);
                        if !seen_keys.insert(k.as_str()) {
                            continue; // The first of a key wins; this one gets its holder.
                        }
                        a.keys.push(k);
                        a.key_created.push(t.created_at.as_i64());
                    }
                    a.id.push(t.id.as_str());
                    a.procedure.push(&t.procedure);
                    a.app.push(&t.app);
                    a.args.push(t.args.get());
                    a.max_attempts.push(i32::try_from(t.max_attempts.max(1)).unwrap_or(i32::MAX));
                    a.timeout_ms.push(i64::try_from(t.timeout.as_millis()).unwrap_or(i64::MAX));
                    a.parent.push(t.parent.as_ref().map(TaskId::as_str));
                    a.key.push(t.key.as_deref());
                    a.created_at.push(t.created_at.as_i64());
                    a.deadline.push(t.deadline.map(UnixMs::as_i64));
                }
            }
            WriteOp::Finish(batch, _) => {
                for f in batch {
                    // A second completion with the same lease is stale whatever the first did.
                    if !seen_finishes.insert((f.id.as_str(), f.lease)) {
                        continue;
                    }
                    a.f_id.push(f.id.as_str());
                    a.f_lease.push(lease_i64(f.lease));
                    let expires = Some(shared.expires(f.now));
                    let now = Some(f.now.as_i64());
                    let (status, uncount, result, keep, kind, error, run_after, finished, exp) = match &f.outcome {
                        Outcome::Done(r) => ("done", 0, Some(r.get()), false, None, None, None, now, expires),
                        Outcome::Failed(e) => (
                            "error",
                            0,
                            None,
                            false,
                            Some(e.kind.as_str()),
                            Some(e.message.as_str()),
                            None,
                            now,
                            expires,
                        ),
                        Outcome::Retry { run_after, error } => (
                            "pending",
                            0,
                            None,
                            false,
                            Some(error.kind.as_str()),
                            Some(error.message.as_str()),
                            Some(run_after.as_i64()),
                            None,
                            None,
                        ),
                        Outcome::Release { run_after } => {
                            ("pending", 1, None, true, None, None, Some(run_after.as_i64()), None, None)
                        }
                    };
                    a.f_status.push(status);
                    a.f_uncount.push(uncount);
                    a.f_result.push(result);
                    a.f_keep_error.push(keep);
                    a.f_error_kind.push(kind);
                    a.f_error.push(error);
                    a.f_run_after.push(run_after);
                    a.f_finished_at.push(finished);
                    a.f_expires_at.push(exp);
                }
            }
            WriteOp::Close(_) => {}
        }
    }
    let mut tries = 0;
    loop {
        let mut conn = match shared.pool.get().await {
            Ok(c) => c,
            Err(e) => return Err(OpError::Store(shared.pool_err(e))),
        };
        let result = if asked_keys.is_empty() {
            apply_one(&conn, &a, shared).await.map(|(inserted, finished)| Applied {
                inserted,
                finished,
                holders: HashMap::new(),
            })
        } else {
            apply_keyed(&mut conn, &a, &asked_keys, shared).await
        };
        match result {
            Err(e) if is_transient(&e) && tries + 1 < TRANSIENT_RETRIES => {
                tries += 1;
                tracing::debug!(error = %describe(&e), tries, "task store batch retried");
            }
            other => return other.map_err(OpError::Pg),
        }
    }
}

/// `APPLY`'s parameters.
fn apply_params<'a>(a: &'a Arrays<'_>, shared: &'a Shared) -> [&'a (dyn ToSql + Sync); 23] {
    [
        &a.id,
        &a.procedure,
        &a.app,
        &a.args,
        &a.max_attempts,
        &a.timeout_ms,
        &a.parent,
        &a.key,
        &a.created_at,
        &a.f_id,
        &a.f_lease,
        &a.f_status,
        &a.f_uncount,
        &a.f_result,
        &a.f_keep_error,
        &a.f_error_kind,
        &a.f_error,
        &a.f_run_after,
        &a.f_finished_at,
        &a.f_expires_at,
        &shared.channel,
        &shared.me,
        &a.deadline,
    ]
}

type AppliedRows = (HashSet<String>, HashSet<(String, i64)>);

fn applied_rows(rows: Vec<Row>) -> Result<AppliedRows, tokio_postgres::Error> {
    let (mut inserted, mut finished) = (HashSet::new(), HashSet::new());
    for row in rows {
        let kind: i32 = row.try_get(0)?;
        let id: Option<String> = row.try_get(1)?;
        match (kind, id) {
            (0, Some(id)) => {
                inserted.insert(id);
            }
            (1, Some(id)) => {
                finished.insert((id, row.try_get(2)?));
            }
            _ => {}
        }
    }
    Ok((inserted, finished))
}

/// The batch as one statement, committed on its own.
async fn apply_one(
    conn: &deadpool_postgres::Object,
    a: &Arrays<'_>,
    shared: &Shared,
) -> Result<AppliedRows, tokio_postgres::Error> {
    let s = conn.prepare_cached(APPLY).await?;
    applied_rows(conn.query(&s, &apply_params(a, shared)).await?)
}

/// The batch with idempotency keys: expired holders of the keys go first, then the statement,
/// then the holders of every key asked about are read; one transaction.
async fn apply_keyed(
    conn: &mut deadpool_postgres::Object,
    a: &Arrays<'_>,
    asked: &[&str],
    shared: &Shared,
) -> Result<Applied, tokio_postgres::Error> {
    let tx = conn.transaction().await?;
    let delete = tx
        .prepare_cached(
            "DELETE FROM nodus_tasks t USING unnest($1::text[], $2::int8[]) AS k(key, created_at) \
             WHERE t.key = k.key AND t.expires_at IS NOT NULL AND t.expires_at <= k.created_at",
        )
        .await?;
    tx.execute(&delete, &[&a.keys, &a.key_created]).await?;
    let s = tx.prepare_cached(APPLY).await?;
    let (inserted, finished) = applied_rows(tx.query(&s, &apply_params(a, shared)).await?)?;
    let holders_of = tx.prepare_cached("SELECT key, id FROM nodus_tasks WHERE key = ANY($1)").await?;
    let mut holders = HashMap::new();
    for row in tx.query(&holders_of, &[&asked]).await? {
        holders.insert(row.try_get(0)?, row.try_get(1)?);
    }
    tx.commit().await?;
    Ok(Applied { inserted, finished, holders })
}

/// Answers every operation of an applied batch, walking it in the order `run_ops` did.
fn answer(ops: impl IntoIterator<Item = WriteOp>, a: &Applied) {
    let mut seen_keys: HashSet<String> = HashSet::new();
    let mut seen_finishes: HashSet<(TaskId, Lease)> = HashSet::new();
    for op in ops {
        match op {
            WriteOp::Submit(tasks, reply) => {
                let mut out = Vec::with_capacity(tasks.len());
                let mut missing = None;
                for t in tasks {
                    let Some(key) = t.key else {
                        // Inserted, or already stored under its id (a batch written again).
                        out.push(Submitted { id: t.id, existing: false });
                        continue;
                    };
                    let first = seen_keys.insert(key.clone());
                    if first && a.inserted.contains(t.id.as_str()) {
                        out.push(Submitted { id: t.id, existing: false });
                        continue;
                    }
                    match a.holders.get(&key) {
                        Some(holder) => out.push(Submitted { id: TaskId(holder.as_str().into()), existing: true }),
                        None => missing = Some(key),
                    }
                }
                let result = match missing {
                    None => Ok(out),
                    Some(key) => Err(StoreError::Failed(format!(
                        "the task holding idempotency key {key:?} was deleted while this submission was stored; submit again"
                    ))),
                };
                let _ = reply.send(result);
            }
            WriteOp::Finish(batch, reply) => {
                let out = batch
                    .into_iter()
                    .map(|f| {
                        let applied = seen_finishes.insert((f.id.clone(), f.lease))
                            && a.finished.contains(&(f.id.to_string(), lease_i64(f.lease)));
                        if applied {
                            Fenced::Applied
                        } else {
                            Fenced::Stale
                        }
                    })
                    .collect();
                let _ = reply.send(Ok(out));
            }
            WriteOp::Close(done) => drop(done.send(())),
        }
    }
}

fn stored_json(text: String) -> Result<Json, StoreError> {
    json(&text).map_err(|e| StoreError::Failed(format!("stored JSON is corrupt: {e}")))
}

fn parse_status(s: &str) -> Result<Status, StoreError> {
    s.parse().map_err(|e| StoreError::Failed(format!("stored status is corrupt: {e}")))
}

fn u32_of(v: i32) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

fn duration_ms(v: i64) -> Duration {
    Duration::from_millis(u64::try_from(v).unwrap_or(0))
}

fn corrupt(e: tokio_postgres::Error) -> StoreError {
    StoreError::Failed(format!("a stored task could not be read: {}", describe(&e)))
}

fn task_from_row(r: &Row) -> Result<Task, StoreError> {
    let id: String = r.try_get(0).map_err(corrupt)?;
    let error_kind: Option<String> = r.try_get(16).map_err(corrupt)?;
    let error: Option<String> = r.try_get(17).map_err(corrupt)?;
    let error = match error_kind {
        Some(k) => Some(TaskError {
            kind: k.parse().map_err(|e: String| StoreError::Failed(format!("stored error kind is corrupt: {e}")))?,
            message: error.unwrap_or_default(),
        }),
        None => None,
    };
    let status: String = r.try_get(3).map_err(corrupt)?;
    let lease: i64 = r.try_get(7).map_err(corrupt)?;
    Ok(Task {
        id: TaskId(id.into()),
        procedure: r.try_get(1).map_err(corrupt)?,
        args: stored_json(r.try_get(2).map_err(corrupt)?)?,
        status: parse_status(&status)?,
        attempt: u32_of(r.try_get(4).map_err(corrupt)?),
        max_attempts: u32_of(r.try_get(5).map_err(corrupt)?),
        timeout: duration_ms(r.try_get(6).map_err(corrupt)?),
        lease: Lease(u64::try_from(lease).unwrap_or(0)),
        owner: r.try_get(8).map_err(corrupt)?,
        parent: r.try_get::<_, Option<String>>(9).map_err(corrupt)?.map(|p| TaskId(p.into())),
        key: r.try_get(10).map_err(corrupt)?,
        created_at: UnixMs::from_i64(r.try_get(11).map_err(corrupt)?),
        started_at: r.try_get::<_, Option<i64>>(12).map_err(corrupt)?.map(UnixMs::from_i64),
        finished_at: r.try_get::<_, Option<i64>>(13).map_err(corrupt)?.map(UnixMs::from_i64),
        expires_at: r.try_get::<_, Option<i64>>(14).map_err(corrupt)?.map(UnixMs::from_i64),
        result: r.try_get::<_, Option<String>>(15).map_err(corrupt)?.map(stored_json).transpose()?,
        error,
        deadline: r.try_get::<_, Option<i64>>(18).map_err(corrupt)?.map(UnixMs::from_i64),
    })
}

/// Makes running tasks pending again (a recovery, a reap) and wakes the apps concerned. `$1` the
/// condition's parameter, `$2` now, `$3` channel, `$4` this store.
fn requeue_sql(condition: &str) -> String {
    format!(
        "WITH r AS (
             UPDATE nodus_tasks SET status = 'pending', owner = NULL, lease_until = NULL, run_after = $2
             WHERE status = 'running' AND {condition} RETURNING app
         ), n AS (
             SELECT pg_notify($3, $4 || ' a ' || app) FROM (SELECT DISTINCT app FROM r) d
         )
         SELECT (SELECT count(*) FROM r), (SELECT count(*) FROM n)"
    )
}

impl Store for PgStore {
    async fn submit(&self, tasks: Vec<NewTask>) -> Result<Vec<Submitted>, StoreError> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        self.write(|r| WriteOp::Submit(tasks, r)).await
    }

    async fn claim(&self, c: Claim) -> Result<Vec<Claimed>, StoreError> {
        let guarded = self.shared.claim == ClaimMode::Guarded;
        let sql = if guarded { CLAIM_GUARDED } else { CLAIM_SKIP_LOCKED };
        let now = c.now.as_i64();
        let grace = i64::try_from(c.lease_grace.as_millis()).unwrap_or(i64::MAX);
        let c = &c;
        let mut out = Vec::new();
        for _ in 0..GUARDED_ROUNDS {
            if out.len() >= c.max {
                break;
            }
            let max = i64::try_from(c.max - out.len()).unwrap_or(i64::MAX);
            let rows = self
                .shared
                .with_retry(|conn| async move {
                    let s = conn.prepare_cached(sql).await?;
                    conn.query(&s, &[&c.app, &now, &max, &c.owner, &grace]).await
                })
                .await?;
            let (mut candidates, mut taken) = (0, 0);
            for r in rows {
                if guarded {
                    candidates = r.try_get::<_, i64>(11).map_err(corrupt)?;
                }
                let Some(seq) = r.try_get::<_, Option<i64>>(0).map_err(corrupt)? else { continue };
                let id: String = r.try_get(1).map_err(corrupt)?;
                let lease: i64 = r.try_get(7).map_err(corrupt)?;
                let claimed = Claimed {
                    id: TaskId(id.into()),
                    procedure: r.try_get(2).map_err(corrupt)?,
                    app: c.app.clone(),
                    args: stored_json(r.try_get(3).map_err(corrupt)?)?,
                    attempt: u32_of(r.try_get(4).map_err(corrupt)?),
                    max_attempts: u32_of(r.try_get(5).map_err(corrupt)?),
                    timeout: duration_ms(r.try_get(6).map_err(corrupt)?),
                    lease: Lease(u64::try_from(lease).unwrap_or(0)),
                    created_at: UnixMs::from_i64(r.try_get(8).map_err(corrupt)?),
                    parent: r.try_get::<_, Option<String>>(9).map_err(corrupt)?.map(|p| TaskId(p.into())),
                    deadline: r.try_get::<_, Option<i64>>(10).map_err(corrupt)?.map(UnixMs::from_i64),
                };
                out.push((seq, claimed));
                taken += 1;
            }
            // Skip-locked claims never lose a race (locked rows are someone else's); a guarded
            // claim that lost some goes again for what is left.
            if !guarded || taken >= candidates {
                break;
            }
        }
        out.sort_unstable_by_key(|(seq, _)| *seq);
        Ok(out.into_iter().map(|(_, c)| c).collect())
    }

    async fn finish(&self, batch: Vec<Finish>) -> Result<Vec<Fenced>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.write(|r| WriteOp::Finish(batch, r)).await
    }

    async fn command(&self, id: TaskId, command: Command, now: UnixMs) -> Result<Option<Commanded>, StoreError> {
        let shared = &self.shared;
        let (expires, id) = (shared.expires(now), &id);
        let found = shared
            .with_retry(|mut conn| async move {
                let tx = conn.transaction().await?;
                let select = tx
                    .prepare_cached(
                        "SELECT status, expires_at, procedure, attempt FROM nodus_tasks WHERE id = $1 FOR UPDATE",
                    )
                    .await?;
                let Some(row) = tx.query_opt(&select, &[&id.as_str()]).await? else { return Ok(None) };
                let status: String = row.try_get(0)?;
                let expired: Option<i64> = row.try_get(1)?;
                if expired.is_some_and(|e| e <= now.as_i64()) {
                    return Ok(None);
                }
                let (procedure, attempt): (String, i32) = (row.try_get(2)?, row.try_get(3)?);
                let key = id.as_str();
                let open = !matches!(status.as_str(), "done" | "error" | "interrupted");
                let finish = "UPDATE nodus_tasks SET status = $2, result = $3, error_kind = $4, error = $5, \
                              finished_at = $6, expires_at = $7, owner = NULL, lease_until = NULL WHERE id = $1";
                let changed = match command {
                    Command::Interrupt if open => {
                        let s = tx.prepare_cached(finish).await?;
                        let kind = ErrorKind::Aborted.as_str();
                        let row: [&(dyn ToSql + Sync); 7] =
                            [&key, &"interrupted", &None::<&str>, &kind, &"aborted", &now.as_i64(), &expires];
                        tx.execute(&s, &row).await?;
                        true
                    }
                    Command::MarkDone if open => {
                        let s = tx.prepare_cached(finish).await?;
                        let row: [&(dyn ToSql + Sync); 7] =
                            [&key, &"done", &"null", &None::<&str>, &None::<&str>, &now.as_i64(), &expires];
                        tx.execute(&s, &row).await?;
                        true
                    }
                    Command::Delete => {
                        let s = tx.prepare_cached("DELETE FROM nodus_tasks WHERE id = $1").await?;
                        tx.execute(&s, &[&key]).await?;
                        true
                    }
                    Command::Interrupt | Command::MarkDone => false,
                };
                if changed {
                    // Another node running it cancels its attempt; waiters elsewhere look again.
                    let s = tx.prepare_cached("SELECT pg_notify($1, $2)").await?;
                    tx.execute(&s, &[&shared.channel, &format!("{} x {}", shared.me, id)]).await?;
                }
                tx.commit().await?;
                Ok(Some((status, procedure, attempt)))
            })
            .await?;
        let Some((status, procedure, attempt)) = found else { return Ok(None) };
        Ok(Some(Commanded { before: parse_status(&status)?, procedure, attempt: u32_of(attempt) }))
    }

    async fn recover(&self, owner: String, now: UnixMs) -> Result<u64, StoreError> {
        let sql = requeue_sql("owner = $1");
        let (shared, owner, sql) = (&self.shared, &owner, &sql);
        let row = shared
            .with_retry(|conn| async move {
                let s = conn.prepare_cached(sql).await?;
                conn.query_one(&s, &[owner, &now.as_i64(), &shared.channel, &shared.me]).await
            })
            .await?;
        Ok(u64::try_from(row.try_get::<_, i64>(0).map_err(corrupt)?).unwrap_or(0))
    }

    async fn reap(&self, now: UnixMs) -> Result<u64, StoreError> {
        let sql = requeue_sql("lease_until <= $1");
        let (shared, sql) = (&self.shared, &sql);
        let row = shared
            .with_retry(|conn| async move {
                let s = conn.prepare_cached(sql).await?;
                conn.query_one(&s, &[&now.as_i64(), &now.as_i64(), &shared.channel, &shared.me]).await
            })
            .await?;
        Ok(u64::try_from(row.try_get::<_, i64>(0).map_err(corrupt)?).unwrap_or(0))
    }

    async fn expire(&self, now: UnixMs, max: usize) -> Result<Vec<Expired>, StoreError> {
        // Candidates are locked (skip-locked mode) or re-checked (guarded mode): a task a claim
        // takes at the same time is either claimed or expired, never both. Waiters on other
        // nodes hear of the expired tasks as finished (50 ids per notification, as `APPLY`).
        let lock = match self.shared.claim {
            ClaimMode::SkipLocked => "FOR UPDATE SKIP LOCKED",
            ClaimMode::Guarded => "",
        };
        let sql = format!(
            "WITH cand AS (
                 SELECT id FROM nodus_tasks WHERE status = 'pending' AND deadline IS NOT NULL AND deadline <= $1
                 ORDER BY deadline LIMIT $3 {lock}
             ), x AS (
                 UPDATE nodus_tasks t SET status = 'error', error_kind = '{kind}',
                     error = '{EXPIRED_PREFIX}' || t.deadline || '{EXPIRED_SUFFIX}', finished_at = $1, expires_at = $2,
                     owner = NULL, lease_until = NULL
                 WHERE t.id IN (SELECT id FROM cand) AND t.status = 'pending'
                 RETURNING t.id, t.procedure, t.attempt, t.deadline
             ), ended AS (
                 SELECT pg_notify($4, $5 || ' f ' || string_agg(id, ' ')) FROM (
                     SELECT id, (row_number() OVER ()) / 50 AS chunk FROM x
                 ) e GROUP BY chunk
             )
             SELECT x.*, (SELECT count(*) FROM ended) FROM x",
            kind = ErrorKind::Expired.as_str()
        );
        let (shared, sql) = (&self.shared, &sql);
        let (expires, max) = (shared.expires(now), i64::try_from(max).unwrap_or(i64::MAX));
        let rows = shared
            .with_retry(|conn| async move {
                let s = conn.prepare_cached(sql).await?;
                conn.query(&s, &[&now.as_i64(), &expires, &max, &shared.channel, &shared.me]).await
            })
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Expired {
                    id: TaskId(r.try_get::<_, String>(0).map_err(corrupt)?.into()),
                    procedure: r.try_get(1).map_err(corrupt)?,
                    attempt: u32_of(r.try_get(2).map_err(corrupt)?),
                    deadline: UnixMs::from_i64(r.try_get(3).map_err(corrupt)?),
                })
            })
            .collect()
    }

    async fn purge(&self, now: UnixMs, max: usize) -> Result<u64, StoreError> {
        let sql = match self.shared.claim {
            ClaimMode::SkipLocked => {
                "DELETE FROM nodus_tasks WHERE id IN (SELECT id FROM nodus_tasks \
                 WHERE expires_at IS NOT NULL AND expires_at <= $1 ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
            }
            ClaimMode::Guarded => {
                "DELETE FROM nodus_tasks WHERE id IN (SELECT id FROM nodus_tasks \
                 WHERE expires_at IS NOT NULL AND expires_at <= $1 ORDER BY expires_at LIMIT $2) \
                 AND expires_at <= $1"
            }
        };
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        self.shared
            .with_retry(|conn| async move {
                let s = conn.prepare_cached(sql).await?;
                conn.execute(&s, &[&now.as_i64(), &max]).await
            })
            .await
    }

    async fn get(&self, id: TaskId, now: UnixMs) -> Result<Option<Task>, StoreError> {
        let conn = self.shared.conn().await?;
        let sql =
            format!("SELECT {TASK_COLUMNS} FROM nodus_tasks WHERE id = $1 AND (expires_at IS NULL OR expires_at > $2)");
        let s = conn.prepare_cached(&sql).await.map_err(|e| self.shared.err(&e))?;
        let row = conn.query_opt(&s, &[&id.as_str(), &now.as_i64()]).await.map_err(|e| self.shared.err(&e))?;
        row.as_ref().map(task_from_row).transpose()
    }

    async fn list(&self, f: ListFilter, now: UnixMs) -> Result<Vec<Task>, StoreError> {
        let status = f.status.map(Status::as_str);
        let after = f.after.as_ref().map(TaskId::as_str);
        let limit = i64::try_from(f.limit).unwrap_or(i64::MAX);
        let mut sql = format!("SELECT {TASK_COLUMNS} FROM nodus_tasks WHERE (expires_at IS NULL OR expires_at > $1)");
        let now_i64 = now.as_i64();
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&now_i64];
        if let Some(s) = &status {
            params.push(s);
            sql.push_str(&format!(" AND status = ${}", params.len()));
        }
        if let Some(p) = &f.procedure {
            params.push(p);
            sql.push_str(&format!(" AND procedure = ${}", params.len()));
        }
        let parent = f.parent.as_ref().map(TaskId::as_str);
        if let Some(p) = &parent {
            params.push(p);
            sql.push_str(&format!(" AND parent = ${}", params.len()));
        }
        // Ids are time-ordered (UUIDv7) and the primary key: pages follow its index.
        if let Some(a) = &after {
            params.push(a);
            sql.push_str(&format!(" AND id > ${}", params.len()));
        }
        params.push(&limit);
        sql.push_str(&format!(" ORDER BY id LIMIT ${}", params.len()));
        let conn = self.shared.conn().await?;
        let s = conn.prepare_cached(&sql).await.map_err(|e| self.shared.err(&e))?;
        let rows = conn.query(&s, &params).await.map_err(|e| self.shared.err(&e))?;
        rows.iter().map(task_from_row).collect()
    }

    async fn pending_apps(&self) -> Result<Vec<String>, StoreError> {
        // A skip scan over the pending index: one probe per app, not one row per task.
        let conn = self.shared.conn().await?;
        let s = conn
            .prepare_cached(
                "WITH RECURSIVE a(app) AS (
                     (SELECT app FROM nodus_tasks WHERE status = 'pending' ORDER BY app LIMIT 1)
                     UNION ALL
                     SELECT (SELECT t.app FROM nodus_tasks t WHERE t.status = 'pending' AND t.app > a.app
                             ORDER BY t.app LIMIT 1)
                     FROM a WHERE a.app IS NOT NULL
                 ) SELECT app FROM a WHERE app IS NOT NULL",
            )
            .await
            .map_err(|e| self.shared.err(&e))?;
        let rows = conn.query(&s, &[]).await.map_err(|e| self.shared.err(&e))?;
        rows.iter().map(|r| r.try_get(0).map_err(corrupt)).collect()
    }

    async fn counts(&self, now: UnixMs) -> Result<Counts, StoreError> {
        let conn = self.shared.conn().await?;
        let s = conn
            .prepare_cached(
                "SELECT status, count(*) FROM nodus_tasks WHERE expires_at IS NULL OR expires_at > $1 GROUP BY status",
            )
            .await
            .map_err(|e| self.shared.err(&e))?;
        let rows = conn.query(&s, &[&now.as_i64()]).await.map_err(|e| self.shared.err(&e))?;
        let mut counts = Counts::default();
        for r in rows {
            let status: String = r.try_get(0).map_err(corrupt)?;
            let n = u64::try_from(r.try_get::<_, i64>(1).map_err(corrupt)?).unwrap_or(0);
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

    fn wakeups(&self) -> Option<broadcast::Receiver<Wake>> {
        Some(self.shared.wake.subscribe())
    }
}

/// The agent registry (`cluster::registry`) in table `nodus_agents`. With several managers on one
/// database the registry is shared: an agent's row is the view of the manager that saved it last.
impl AgentStore for PgStore {
    async fn save_agent(&self, a: Agent) -> Result<(), StoreError> {
        let a = &a;
        self.shared
            .with_retry(|conn| async move {
                let s = conn
                    .prepare_cached(&format!(
                        "INSERT INTO nodus_agents ({AGENT_COLUMNS}) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
                         ON CONFLICT (name) DO UPDATE SET id = $2, ip = $3, mac = $4, cores = $5, memory = $6, \
                         concurrency = $7, queue = $8, first_seen = $9, last_seen = $10, state = $11, \
                         state_since = $12, banned = $13"
                    ))
                    .await?;
                let row: [&(dyn ToSql + Sync); 13] = [
                    &a.name,
                    &a.id,
                    &a.ip,
                    &a.mac,
                    &i64::from(a.cores),
                    &i64::try_from(a.memory).unwrap_or(i64::MAX),
                    &i64::from(a.concurrency),
                    &i64::from(a.queue),
                    &a.first_seen.as_i64(),
                    &a.last_seen.as_i64(),
                    &a.state.as_str(),
                    &a.state_since.as_i64(),
                    &a.banned,
                ];
                conn.execute(&s, &row).await
            })
            .await
            .map(|_| ())
    }

    async fn remove_agent(&self, name: String) -> Result<bool, StoreError> {
        let name = &name;
        let n = self
            .shared
            .with_retry(|conn| async move {
                let s = conn.prepare_cached("DELETE FROM nodus_agents WHERE name = $1").await?;
                conn.execute(&s, &[name]).await
            })
            .await?;
        Ok(n > 0)
    }

    async fn agents(&self) -> Result<Vec<Agent>, StoreError> {
        let conn = self.shared.conn().await?;
        let s = conn
            .prepare_cached(&format!("SELECT {AGENT_COLUMNS} FROM nodus_agents ORDER BY name"))
            .await
            .map_err(|e| self.shared.err(&e))?;
        let rows = conn.query(&s, &[]).await.map_err(|e| self.shared.err(&e))?;
        rows.iter().map(agent_from_row).collect()
    }
}

fn agent_from_row(r: &Row) -> Result<Agent, StoreError> {
    let int = |i: usize| -> Result<i64, StoreError> { r.try_get::<_, i64>(i).map_err(corrupt) };
    let u32_at = |i: usize| -> Result<u32, StoreError> { Ok(u32::try_from(int(i)?).unwrap_or(0)) };
    let state: String = r.try_get(10).map_err(corrupt)?;
    Ok(Agent {
        name: r.try_get(0).map_err(corrupt)?,
        id: r.try_get(1).map_err(corrupt)?,
        ip: r.try_get(2).map_err(corrupt)?,
        mac: r.try_get(3).map_err(corrupt)?,
        cores: u32_at(4)?,
        memory: u64::try_from(int(5)?).unwrap_or(0),
        concurrency: u32_at(6)?,
        queue: u32_at(7)?,
        first_seen: UnixMs::from_i64(int(8)?),
        last_seen: UnixMs::from_i64(int(9)?),
        state: state.parse().map_err(|e: String| StoreError::Failed(format!("stored agent state is corrupt: {e}")))?,
        state_since: UnixMs::from_i64(int(11)?),
        banned: r.try_get(12).map_err(corrupt)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodus_parameters_are_taken_out_of_the_url() {
        let c = PgConfig::new("postgres://u:secret@db:5433/tasks?schema=jobs&sslmode=disable&claim=guarded").unwrap();
        assert_eq!(c.url, "postgres://u:secret@db:5433/tasks?sslmode=disable");
        assert_eq!(c.schema.as_deref(), Some("jobs"));
        assert_eq!(c.claim, ClaimMode::Guarded);
        let c = PgConfig::new("postgresql://db/tasks?schema=a_1").unwrap();
        assert_eq!(c.url, "postgresql://db/tasks");
        assert!(PgConfig::new("postgres://db/t?schema=Robert%27;DROP").is_err());
        assert!(PgConfig::new("postgres://db/t?schema=1abc").is_err());
        assert!(PgConfig::new("postgres://db/t?claim=sometimes").is_err());
        assert!(!format!("{c:?}").contains("secret"));
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("postgres://u:secret@db:5433/tasks"), "postgres://u:***@db:5433/tasks");
        assert_eq!(redact("postgres://u@db/tasks"), "postgres://u@db/tasks");
        assert_eq!(redact("postgres://db/tasks"), "postgres://db/tasks");
        assert_eq!(redact("postgres://u:p@ss@db/t?x=a@b"), "postgres://u:***@db/t?x=a@b");
    }

    #[test]
    fn news_from_other_stores_is_parsed_and_our_own_skipped() {
        assert_eq!(parse_news("b1 a procs", "a1"), Some(Wake::Pending("procs".into())));
        assert_eq!(parse_news("a1 a procs", "a1"), None);
        let ids = vec![TaskId("t-1".into()), TaskId("t-2".into())];
        assert_eq!(parse_news("b1 f t-1 t-2", "a1"), Some(Wake::Finished(ids)));
        assert_eq!(parse_news("b1 x t-3", "a1"), Some(Wake::Commanded(TaskId("t-3".into()))));
        assert_eq!(parse_news("b1 q what", "a1"), None);
        assert_eq!(parse_news("garbage", "a1"), None);
    }

    #[test]
    fn migration_locks_differ_by_schema_and_never_change() {
        assert_ne!(migration_lock(None), migration_lock(Some("jobs")));
        assert_eq!(migration_lock(Some("jobs")), migration_lock(Some("jobs")));
    }
}
