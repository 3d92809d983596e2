//! The task store chosen at run time: `[tasks] store = "sqlite"` (the default: a file in the
//! node's data directory) or `"postgres://user@host:port/database"` (a database that several
//! manager nodes share). [`Store`] is not object-safe (its methods return `impl Future`), so the
//! choice is an enum that forwards every call.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use tokio::sync::broadcast;

use super::{
    Claim, Command, Commanded, Counts, Expired, Fenced, Finish, ListFilter, PgConfig, PgStore, SqliteConfig,
    SqliteStore, Store, StoreError, Wake, WriterStats,
};
use crate::cluster::registry::{Agent, AgentStore};
use crate::task::{Claimed, NewTask, Submitted, Task, TaskId, UnixMs};

/// Which backend holds the tasks, as `[tasks] store` names it.
#[derive(Debug, Clone, Default)]
pub enum StoreSpec {
    /// SQLite, `tasks.db` in the data directory (the default).
    #[default]
    Sqlite,
    /// PostgreSQL at this URL.
    Postgres(PgConfig),
}

impl FromStr for StoreSpec {
    type Err = String;

    /// `sqlite` (or empty), or a `postgres://` / `postgresql://` URL.
    fn from_str(s: &str) -> Result<StoreSpec, String> {
        let s = s.trim();
        if s.is_empty() || s.eq_ignore_ascii_case("sqlite") {
            return Ok(StoreSpec::Sqlite);
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return PgConfig::new(s).map(StoreSpec::Postgres).map_err(|e| format!("tasks.store: {e}"));
        }
        Err(format!(
            "tasks.store is {:?}; use \"sqlite\" (a file in the data directory) or a \
             postgres://user:password@host:port/database URL",
            super::redact(s)
        ))
    }
}

impl std::fmt::Display for StoreSpec {
    /// The spec as configured, without any password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreSpec::Sqlite => f.write_str("sqlite"),
            StoreSpec::Postgres(c) => f.write_str(&super::redact(&c.url)),
        }
    }
}

/// A task store of either backend.
#[derive(Debug, Clone)]
pub enum AnyStore {
    /// The embedded SQLite store.
    Sqlite(SqliteStore),
    /// The shared PostgreSQL store.
    Postgres(PgStore),
}

impl AnyStore {
    /// Opens the store `spec` names: SQLite in `<data_dir>/tasks.db`, or PostgreSQL (connecting
    /// and migrating its schema). Finished tasks are kept `result_ttl`.
    ///
    /// # Errors
    /// The store cannot be opened; for PostgreSQL the message says which server, what failed
    /// and what to check.
    pub async fn open(spec: &StoreSpec, data_dir: &Path, result_ttl: Duration) -> Result<AnyStore, StoreError> {
        match spec {
            StoreSpec::Sqlite => {
                let mut c = SqliteConfig::new(data_dir.join("tasks.db"));
                c.result_ttl = result_ttl;
                SqliteStore::open(c).map(AnyStore::Sqlite)
            }
            StoreSpec::Postgres(c) => {
                let mut c = c.clone();
                c.result_ttl = result_ttl;
                PgStore::open(c).await.map(AnyStore::Postgres)
            }
        }
    }

    /// The backend's name: `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self {
            AnyStore::Sqlite(_) => "sqlite",
            AnyStore::Postgres(_) => "postgres",
        }
    }

    /// How many commits the store's writer made, and how many operations they held.
    pub fn writer_stats(&self) -> WriterStats {
        match self {
            AnyStore::Sqlite(s) => s.writer_stats(),
            AnyStore::Postgres(s) => s.writer_stats(),
        }
    }

    /// Finishes what is queued and closes the store.
    pub async fn close(&self) {
        match self {
            AnyStore::Sqlite(s) => s.close().await,
            AnyStore::Postgres(s) => s.close().await,
        }
    }
}

impl Store for AnyStore {
    async fn submit(&self, tasks: Vec<NewTask>) -> Result<Vec<Submitted>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.submit(tasks).await,
            AnyStore::Postgres(s) => s.submit(tasks).await,
        }
    }

    async fn claim(&self, claim: Claim) -> Result<Vec<Claimed>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.claim(claim).await,
            AnyStore::Postgres(s) => s.claim(claim).await,
        }
    }

    async fn finish(&self, batch: Vec<Finish>) -> Result<Vec<Fenced>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.finish(batch).await,
            AnyStore::Postgres(s) => s.finish(batch).await,
        }
    }

    async fn command(&self, id: TaskId, command: Command, now: UnixMs) -> Result<Option<Commanded>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.command(id, command, now).await,
            AnyStore::Postgres(s) => s.command(id, command, now).await,
        }
    }

    async fn recover(&self, owner: String, now: UnixMs) -> Result<u64, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.recover(owner, now).await,
            AnyStore::Postgres(s) => s.recover(owner, now).await,
        }
    }

    async fn reap(&self, now: UnixMs) -> Result<u64, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.reap(now).await,
            AnyStore::Postgres(s) => s.reap(now).await,
        }
    }

    async fn expire(&self, now: UnixMs, max: usize) -> Result<Vec<Expired>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.expire(now, max).await,
            AnyStore::Postgres(s) => s.expire(now, max).await,
        }
    }

    async fn purge(&self, now: UnixMs, max: usize) -> Result<u64, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.purge(now, max).await,
            AnyStore::Postgres(s) => s.purge(now, max).await,
        }
    }

    async fn get(&self, id: TaskId, now: UnixMs) -> Result<Option<Task>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.get(id, now).await,
            AnyStore::Postgres(s) => s.get(id, now).await,
        }
    }

    async fn list(&self, filter: ListFilter, now: UnixMs) -> Result<Vec<Task>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.list(filter, now).await,
            AnyStore::Postgres(s) => s.list(filter, now).await,
        }
    }

    async fn pending_apps(&self) -> Result<Vec<String>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.pending_apps().await,
            AnyStore::Postgres(s) => s.pending_apps().await,
        }
    }

    async fn counts(&self, now: UnixMs) -> Result<Counts, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.counts(now).await,
            AnyStore::Postgres(s) => s.counts(now).await,
        }
    }

    fn wakeups(&self) -> Option<broadcast::Receiver<Wake>> {
        match self {
            AnyStore::Sqlite(s) => s.wakeups(),
            AnyStore::Postgres(s) => s.wakeups(),
        }
    }
}

impl AgentStore for AnyStore {
    async fn save_agent(&self, agent: Agent) -> Result<(), StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.save_agent(agent).await,
            AnyStore::Postgres(s) => s.save_agent(agent).await,
        }
    }

    async fn remove_agent(&self, name: String) -> Result<bool, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.remove_agent(name).await,
            AnyStore::Postgres(s) => s.remove_agent(name).await,
        }
    }

    async fn agents(&self) -> Result<Vec<Agent>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.agents().await,
            AnyStore::Postgres(s) => s.agents().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_without_passwords() {
        assert!(matches!("sqlite".parse::<StoreSpec>(), Ok(StoreSpec::Sqlite)));
        assert!(matches!("".parse::<StoreSpec>(), Ok(StoreSpec::Sqlite)));
        let spec: StoreSpec = "postgres://nodus:hunter2@db.example:5432/tasks?schema=jobs".parse().unwrap();
        let StoreSpec::Postgres(c) = &spec else { panic!("{spec:?}") };
        assert_eq!(c.schema.as_deref(), Some("jobs"));
        assert_eq!(spec.to_string(), "postgres://nodus:***@db.example:5432/tasks");
        assert!("postgresql://db/tasks".parse::<StoreSpec>().is_ok());
        let err = "mysql://root:pw@db/tasks".parse::<StoreSpec>().unwrap_err();
        assert!(err.contains("sqlite") && err.contains("postgres://") && !err.contains("pw@"), "{err}");
    }
}
