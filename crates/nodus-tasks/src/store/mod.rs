//! The durable task store: a trait every backend implements (SQLite embedded, PostgreSQL shared by
//! several nodes), one contract test suite ([`contract`]) that every backend must pass, and
//! [`AnyStore`], the backend chosen at run time (`[tasks] store`).
//!
//! Invariants every backend keeps:
//! - A submission acknowledged `Ok` is durable (on disk, or in the database's committed state).
//! - A claim moves a pending task to running, increments its attempt and hands out a new lease
//!   whose token is larger than any token the store handed out before (a fencing token).
//! - A [`Finish`] applies only when it carries the task's current lease and the task is still
//!   running; otherwise it is [`Fenced::Stale`] and changes nothing. So a late answer from an
//!   abandoned attempt never overwrites a newer one: **exactly one recorded completion per task**.
//! - A task whose deadline (the `expires_at` of its submission) has passed is never claimed: the
//!   claim checks it in the statement that claims. [`Store::expire`] finishes such pending tasks
//!   as errors of kind [`ErrorKind::Expired`](crate::task::ErrorKind::Expired) (the same boundary
//!   as everywhere in nodus: expired from the millisecond `deadline <= now`).
//! - A finished task expires `result_ttl` after it finished: reads no longer see it, and a purge
//!   deletes it (its idempotency key can then be used again).
//! - Nothing reads a clock: `now` is always an argument, so expiry and leases are testable.

mod any;
pub mod contract;
mod postgres;
mod sqlite;

use std::future::Future;
use std::time::Duration;

pub use any::{AnyStore, StoreSpec};
pub use postgres::{redact, ClaimMode, PgConfig, PgStore};
pub use sqlite::{SqliteConfig, SqliteStore, Synchronous, WriterStats};

use crate::task::{Claimed, ErrorKind, Json, Lease, NewTask, Status, Submitted, Task, TaskError, TaskId, UnixMs};

/// Why the store could not do something. Every variant is an internal error for clients (arpcp
/// 300): the store is never silently bypassed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store reached its size bound.
    #[error("the task store is full ({0}); raise tasks.max_store_bytes, or wait for finished tasks to expire")]
    Full(String),
    /// The database could not be read or written (I/O error, corruption, permissions).
    #[error("the task store failed: {0}")]
    Failed(String),
    /// The store is closed (the node is shutting down).
    #[error("the task store is closed")]
    Closed,
    /// The store's queue of pending operations is full (the database is slower than the load).
    #[error("the task store is overloaded ({0} operations waiting); retry shortly")]
    Overloaded(usize),
}

/// Take up to `max` pending tasks of one app, for one owner.
#[derive(Debug, Clone)]
pub struct Claim {
    /// Only tasks of this app.
    pub app: String,
    /// Who runs them (a node name): recorded with the lease.
    pub owner: String,
    /// Most tasks to take.
    pub max: usize,
    /// Only tasks due at or before this time; also the attempts' start time.
    pub now: UnixMs,
    /// How long past its timeout a lease lasts before another owner may take the task.
    pub lease_grace: Duration,
}

/// How an attempt ended, as recorded.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The procedure returned this result: the task is done.
    Done(Json),
    /// The task failed for good: status error.
    Failed(TaskError),
    /// The attempt failed but may be retried: the task is pending again from `run_after`
    /// (the attempt counts).
    Retry {
        /// When it may run again.
        run_after: UnixMs,
        /// What went wrong, kept on the task.
        error: TaskError,
    },
    /// The attempt never ran (the app's queue was full, the app stopped): the task is pending
    /// again from `run_after`, and the attempt does not count.
    Release {
        /// When it may run again.
        run_after: UnixMs,
    },
}

/// The end of one attempt, fenced by its lease.
#[derive(Debug, Clone)]
pub struct Finish {
    /// The task.
    pub id: TaskId,
    /// The attempt's lease.
    pub lease: Lease,
    /// What happened.
    pub outcome: Outcome,
    /// When.
    pub now: UnixMs,
}

/// Whether a [`Finish`] was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fenced {
    /// Recorded.
    Applied,
    /// Not recorded: the lease is no longer the task's (a newer attempt holds it, the task was
    /// aborted or deleted, or it already finished).
    Stale,
}

/// What a client asks of a task by id (the arpcp SIGNAL statuses, and abort).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Stop it: a pending or running task becomes interrupted (a running attempt's lease is
    /// revoked). A finished task does not change.
    Interrupt,
    /// Declare it done: an unfinished task becomes done with a `null` result (a running
    /// attempt's lease is revoked). A finished task does not change.
    MarkDone,
    /// Delete everything stored about it.
    Delete,
}

/// What a [`Command`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commanded {
    /// The task's status before the command.
    pub before: Status,
    /// Its procedure.
    pub procedure: String,
    /// Its attempts so far.
    pub attempt: u32,
}

/// Which tasks a listing returns.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only this status.
    pub status: Option<Status>,
    /// Only this procedure.
    pub procedure: Option<String>,
    /// Only the subtasks of this task (the tasks that name it as their parent).
    pub parent: Option<TaskId>,
    /// Only tasks whose id is after this one (paging: pass the last id of the previous page).
    pub after: Option<TaskId>,
    /// Most tasks returned.
    pub limit: usize,
}

/// A pending task [`Store::expire`] finished because its deadline passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    /// The task.
    pub id: TaskId,
    /// Its procedure.
    pub procedure: String,
    /// Attempts it had started (0 unless an earlier attempt was retried).
    pub attempt: u32,
    /// Its deadline.
    pub deadline: UnixMs,
}

impl Expired {
    /// The error such a task is finished with (the message says when its deadline was).
    pub fn error(deadline: UnixMs) -> TaskError {
        TaskError::new(ErrorKind::Expired, expired_message(deadline.as_i64()))
    }
}

/// The message of an expired task's error (the SQL of the stores builds the same text).
pub fn expired_message(deadline: i64) -> String {
    format!("{EXPIRED_PREFIX}{deadline}{EXPIRED_SUFFIX}")
}

/// The start of [`expired_message`], up to the deadline.
/// (No quote characters: the stores put it in SQL literals.)
pub(crate) const EXPIRED_PREFIX: &str = "the task was not started before its deadline (expires_at=";
/// The end of [`expired_message`], after the deadline.
pub(crate) const EXPIRED_SUFFIX: &str = "); it never ran and never will";

/// How many tasks the store holds, by status (expired ones excluded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Pending.
    pub pending: u64,
    /// Running.
    pub running: u64,
    /// Done.
    pub done: u64,
    /// Error.
    pub error: u64,
    /// Interrupted.
    pub interrupted: u64,
}

impl Counts {
    /// The count for one status.
    pub fn of(&self, s: Status) -> u64 {
        match s {
            Status::Pending => self.pending,
            Status::Running => self.running,
            Status::Done => self.done,
            Status::Error => self.error,
            Status::Interrupted => self.interrupted,
        }
    }

    /// Every task.
    pub fn total(&self) -> u64 {
        self.pending + self.running + self.done + self.error + self.interrupted
    }
}

/// News from other nodes sharing a store ([`Store::wakeups`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    /// Tasks of this app became pending (submitted, retried, released, reaped elsewhere).
    Pending(String),
    /// These tasks finished elsewhere.
    Finished(Vec<TaskId>),
    /// A client's command changed this task elsewhere (interrupted, marked done, deleted): an
    /// attempt running here is cancelled.
    Commanded(TaskId),
    /// Some news may have been missed (the listener reconnected, or fell behind): look at
    /// everything.
    All,
}

/// A durable task store. Every method may be called from many tasks at once; a backend batches
/// concurrent calls (group commit) as it sees fit. Every method takes `now` where time matters
/// and reads no clock.
pub trait Store: Send + Sync + 'static {
    /// Stores new tasks as pending, durably, in order. A task whose idempotency key is already
    /// stored (and not expired) is not stored again: its entry is the existing task's id with
    /// `existing: true` (within one batch, the first of a key wins).
    ///
    /// # Errors
    /// [`StoreError`]: nothing of the batch was stored.
    fn submit(&self, tasks: Vec<NewTask>) -> impl Future<Output = Result<Vec<Submitted>, StoreError>> + Send;

    /// Claims up to `claim.max` pending tasks of `claim.app` that are due, oldest first: each
    /// becomes running with `attempt + 1`, a new lease and `started_at = now`. A task whose
    /// deadline is at or before `claim.now` is never claimed (checked by the claiming statement
    /// itself); [`Store::expire`] finishes it.
    ///
    /// # Errors
    /// [`StoreError`]: nothing was claimed.
    fn claim(&self, claim: Claim) -> impl Future<Output = Result<Vec<Claimed>, StoreError>> + Send;

    /// Records the ends of attempts, each fenced by its lease: one [`Fenced`] per entry, in order.
    ///
    /// # Errors
    /// [`StoreError`]: nothing was recorded.
    fn finish(&self, batch: Vec<Finish>) -> impl Future<Output = Result<Vec<Fenced>, StoreError>> + Send;

    /// Applies a client's command to a task. Returns what the task was before (`None`: unknown
    /// or expired id).
    ///
    /// # Errors
    /// [`StoreError`].
    fn command(
        &self,
        id: TaskId,
        command: Command,
        now: UnixMs,
    ) -> impl Future<Output = Result<Option<Commanded>, StoreError>> + Send;

    /// Makes every task `owner` was running pending again (after a restart of that owner: its
    /// attempts died with it). Returns how many.
    ///
    /// # Errors
    /// [`StoreError`].
    fn recover(&self, owner: String, now: UnixMs) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Makes every running task whose lease ran out pending again (its owner is presumed dead).
    /// Returns how many.
    ///
    /// # Errors
    /// [`StoreError`].
    fn reap(&self, now: UnixMs) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Finishes up to `max` pending tasks whose deadline is at or before `now` as errors of kind
    /// [`ErrorKind::Expired`] (they never run), and returns them, so their waiters can be told.
    /// Other nodes sharing the store hear of them as finished.
    ///
    /// # Errors
    /// [`StoreError`]: nothing was finished.
    fn expire(&self, now: UnixMs, max: usize) -> impl Future<Output = Result<Vec<Expired>, StoreError>> + Send;

    /// Deletes up to `max` finished tasks that expired at or before `now`. Returns how many.
    ///
    /// # Errors
    /// [`StoreError`].
    fn purge(&self, now: UnixMs, max: usize) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// One task (`None`: unknown, or finished and expired).
    ///
    /// # Errors
    /// [`StoreError`].
    fn get(&self, id: TaskId, now: UnixMs) -> impl Future<Output = Result<Option<Task>, StoreError>> + Send;

    /// Tasks matching `filter`, by id (oldest first).
    ///
    /// # Errors
    /// [`StoreError`].
    fn list(&self, filter: ListFilter, now: UnixMs) -> impl Future<Output = Result<Vec<Task>, StoreError>> + Send;

    /// The apps that have pending tasks (due now or later), sorted.
    ///
    /// # Errors
    /// [`StoreError`].
    fn pending_apps(&self) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// How many tasks there are by status.
    ///
    /// # Errors
    /// [`StoreError`].
    fn counts(&self, now: UnixMs) -> impl Future<Output = Result<Counts, StoreError>> + Send;

    /// News from other nodes writing to this store, so a node claims at once what another one
    /// submitted rather than at its next poll. `None` (the default): nobody else writes to it.
    fn wakeups(&self) -> Option<tokio::sync::broadcast::Receiver<Wake>> {
        None
    }
}
