//! The task model shared by the store, the scheduler, the executor and the APIs: ids, times,
//! statuses, errors and the task record itself. No I/O, no clock.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde_json::value::RawValue;

/// A point in time as Unix milliseconds: what the store persists and what the cores take as `now`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnixMs(pub u64);

impl UnixMs {
    /// The wall clock now. Only drivers call this; cores and stores take `now` as an argument.
    // The crate's one wall-clock read: task times are persisted and shared across nodes.
    #[allow(clippy::disallowed_methods)]
    pub fn now() -> UnixMs {
        let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        UnixMs(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// This time plus `d` (saturating).
    pub fn plus(self, d: Duration) -> UnixMs {
        UnixMs(self.0.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
    }

    /// How long after `earlier` this is (zero when it is not later).
    pub fn since(self, earlier: UnixMs) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }

    /// The value as SQL wants it (SQLite and PostgreSQL integers are signed).
    pub fn as_i64(self) -> i64 {
        i64::try_from(self.0).unwrap_or(i64::MAX)
    }

    /// From a stored signed integer (negative values, which nodus never writes, become 0).
    pub fn from_i64(v: i64) -> UnixMs {
        UnixMs(u64::try_from(v).unwrap_or(0))
    }
}

/// Longest task id accepted from a client (ids nodus makes are 36 characters).
pub const MAX_ID_LEN: usize = 128;
/// Longest idempotency key.
pub const MAX_KEY_LEN: usize = 256;

/// A task's id: a UUID (version 7: time-ordered, 74 random bits), written in its canonical form.
/// Random enough that ids cannot be guessed, ordered enough that the store's index appends.
/// Cheap to clone (a shared string): the executor keeps it in several tables per attempt.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskId(pub(crate) std::sync::Arc<str>);

impl serde::Serialize for TaskId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TaskId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<TaskId, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl TaskId {
    /// A new id for a task created at `now`.
    pub fn generate(now: UnixMs, rng: &mut impl rand::Rng) -> TaskId {
        let rand: u128 = rng.gen();
        let ms = u128::from(now.0 & 0xffff_ffff_ffff);
        // 48 bits of time, version 7, 12 random bits, variant 0b10, 62 random bits.
        let x = (ms << 80) | (0x7u128 << 76) | (rand & (0xfffu128 << 64)) | (0b10u128 << 62) | (rand & ((1 << 62) - 1));
        let h = format!("{x:032x}");
        TaskId(format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32]).into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a string is not a task id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a task id is 1 to {MAX_ID_LEN} printable ASCII characters")]
pub struct BadId;

impl FromStr for TaskId {
    type Err = BadId;

    /// Any printable ASCII string of bounded length: ids are looked up, never interpreted, so an
    /// id this node never made is simply unknown.
    fn from_str(s: &str) -> Result<TaskId, BadId> {
        if s.is_empty() || s.len() > MAX_ID_LEN || !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(BadId);
        }
        Ok(TaskId(s.into()))
    }
}

/// Where a task is in its life.
///
/// ```text
///  submit ─► pending ──claim──► running ──► done | error
///               ▲                  │
///               └── retry/release ─┘      abort: pending|running ─► interrupted
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Stored, waiting to run.
    Pending,
    /// An attempt holds the task's lease.
    Running,
    /// Finished with a result.
    Done,
    /// Finished with an error (the procedure failed, timed out, or its workers kept failing).
    Error,
    /// Stopped before finishing (aborted).
    Interrupted,
}

impl Status {
    /// Every status, in life order.
    pub const ALL: [Status; 5] = [Status::Pending, Status::Running, Status::Done, Status::Error, Status::Interrupted];

    /// The name used in the store, on the wire and in the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Running => "running",
            Status::Done => "done",
            Status::Error => "error",
            Status::Interrupted => "interrupted",
        }
    }

    /// Whether nothing will change this task any more (only its expiry or deletion).
    pub fn is_final(self) -> bool {
        matches!(self, Status::Done | Status::Error | Status::Interrupted)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a string is not a status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown status {0:?}; use pending, running, done, error or interrupted")]
pub struct BadStatus(pub String);

impl FromStr for Status {
    type Err = BadStatus;

    fn from_str(s: &str) -> Result<Status, BadStatus> {
        Status::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| BadStatus(s.to_string()))
    }
}

/// What kind of failure ended a task in [`Status::Error`] (seed 002's `ErrorKind`), or why an
/// attempt was given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The attempt ran longer than the task's timeout; its worker session was cancelled.
    TimedOut,
    /// The procedure ran and failed (arpcp 400): the worker's error message.
    RunningError,
    /// The worker process crashed, hung or disconnected in every attempt allowed.
    WorkerFailed,
    /// The task was aborted (a SIGNAL `interrupted`, `nodus task abort`).
    Aborted,
    /// A worker node could not fetch the app (or the version) the task needs from its manager
    /// (seed 002), or the package it got did not match its content hash.
    DownloadError,
    /// The worker node running the attempt was lost (dead, cut off, or it no longer knew the
    /// task): the task runs again elsewhere while attempts remain.
    WorkerLost,
    /// A worker node could not start the attempt (its engine's queue was full, the app was
    /// stopped): it runs again elsewhere and the attempt does not count. Never stored.
    NotRun,
    /// The task's deadline (the `expires_at` of its submission) passed before an attempt could
    /// start: it never ran, and never will. Only the store writes it (a claim never hands out an
    /// expired task); worker nodes never report it.
    Expired,
}

impl ErrorKind {
    /// Every kind.
    pub const ALL: [ErrorKind; 8] = [
        ErrorKind::TimedOut,
        ErrorKind::RunningError,
        ErrorKind::WorkerFailed,
        ErrorKind::Aborted,
        ErrorKind::DownloadError,
        ErrorKind::WorkerLost,
        ErrorKind::NotRun,
        ErrorKind::Expired,
    ];

    /// The name used in the store and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::TimedOut => "TimedOut",
            ErrorKind::RunningError => "RunningError",
            ErrorKind::WorkerFailed => "WorkerFailed",
            ErrorKind::Aborted => "Aborted",
            ErrorKind::DownloadError => "DownloadError",
            ErrorKind::WorkerLost => "WorkerLost",
            ErrorKind::NotRun => "NotRun",
            ErrorKind::Expired => "Expired",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ErrorKind {
    type Err = String;

    fn from_str(s: &str) -> Result<ErrorKind, String> {
        ErrorKind::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| format!("unknown error kind {s:?}"))
    }
}

/// A failure: its kind and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// What happened (for [`ErrorKind::RunningError`], the worker's own message).
    pub message: String,
}

impl TaskError {
    /// An error of `kind` saying `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> TaskError {
        TaskError { kind, message: message.into() }
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

/// A JSON value kept as its text: arguments and results travel from the client to the store to
/// the worker and back without being parsed again.
pub type Json = Box<RawValue>;

/// Parses JSON text into a [`Json`].
///
/// # Errors
/// When `text` is not one JSON value.
pub fn json(text: &str) -> Result<Json, serde_json::Error> {
    RawValue::from_string(text.to_string())
}

/// `null` as a [`Json`].
pub fn json_null() -> Json {
    RawValue::from_string("null".to_string()).expect("null is JSON")
}

/// A task to store: everything the submitter decides.
#[derive(Debug, Clone)]
pub struct NewTask {
    /// Its id (made by the submitter: [`TaskId::generate`]).
    pub id: TaskId,
    /// The procedure's full name, `APP.EVENT`.
    pub procedure: String,
    /// The app that runs it (claims are per app).
    pub app: String,
    /// Its positional arguments: a JSON array.
    pub args: Json,
    /// Most attempts when its worker process fails (at least 1).
    pub max_attempts: u32,
    /// Longest an attempt may run.
    pub timeout: Duration,
    /// The task that submitted this one, if any (its subtasks are killed with it).
    pub parent: Option<TaskId>,
    /// Client idempotency key: submitting the same key again returns the existing task.
    pub key: Option<String>,
    /// When it was submitted.
    pub created_at: UnixMs,
    /// The latest time an attempt may start (the submission's `expires_at`); past it the task
    /// is finished as [`ErrorKind::Expired`] without running. `None`: no deadline.
    pub deadline: Option<UnixMs>,
}

/// What a submission became.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    /// The task's id: the new task's, or the existing task's for a repeated idempotency key.
    pub id: TaskId,
    /// Whether the key matched an existing task (nothing new was stored).
    pub existing: bool,
}

/// A lease: the right of one attempt to record the task's completion. Tokens increase across
/// the whole store, so a newer attempt always holds a larger token than any older one (a
/// fencing token).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lease(pub u64);

impl fmt::Display for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A task handed to an attempt by a claim.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// Its id.
    pub id: TaskId,
    /// `APP.EVENT`.
    pub procedure: String,
    /// Its app.
    pub app: String,
    /// Its arguments (a JSON array).
    pub args: Json,
    /// This attempt's number (1 for the first).
    pub attempt: u32,
    /// Most attempts for worker failures.
    pub max_attempts: u32,
    /// Longest the attempt may run.
    pub timeout: Duration,
    /// This attempt's lease: its completion carries it.
    pub lease: Lease,
    /// When the task was submitted.
    pub created_at: UnixMs,
    /// The task that submitted this one, if any.
    pub parent: Option<TaskId>,
    /// The latest time the attempt may start (a worker node holding it in its queue past it
    /// does not start it).
    pub deadline: Option<UnixMs>,
}

/// A stored task, as reads return it.
#[derive(Debug, Clone)]
pub struct Task {
    /// Its id.
    pub id: TaskId,
    /// `APP.EVENT`.
    pub procedure: String,
    /// Its arguments (a JSON array).
    pub args: Json,
    /// Where it is.
    pub status: Status,
    /// Attempts started so far.
    pub attempt: u32,
    /// Most attempts for worker failures.
    pub max_attempts: u32,
    /// Longest an attempt may run.
    pub timeout: Duration,
    /// The latest attempt's lease (0: never claimed).
    pub lease: Lease,
    /// Who holds the lease while it runs (a node name).
    pub owner: Option<String>,
    /// The task that submitted this one.
    pub parent: Option<TaskId>,
    /// Its idempotency key.
    pub key: Option<String>,
    /// Submitted at.
    pub created_at: UnixMs,
    /// The latest attempt started at.
    pub started_at: Option<UnixMs>,
    /// Finished at (final statuses only).
    pub finished_at: Option<UnixMs>,
    /// When the finished task and its result are forgotten.
    pub expires_at: Option<UnixMs>,
    /// The result of a done task.
    pub result: Option<Json>,
    /// The error of a failed or interrupted task, or the last attempt's error of a task waiting
    /// to be retried.
    pub error: Option<TaskError>,
    /// The latest time an attempt may start (see [`NewTask::deadline`]).
    pub deadline: Option<UnixMs>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn ids_are_uuid_v7_time_ordered_and_parse_back() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let a = TaskId::generate(UnixMs(1_700_000_000_000), &mut rng);
        let b = TaskId::generate(UnixMs(1_700_000_000_001), &mut rng);
        assert_eq!(a.as_str().len(), 36);
        assert_eq!(&a.as_str()[14..15], "7", "{a}");
        assert!(matches!(&a.as_str()[19..20], "8" | "9" | "a" | "b"), "{a}");
        assert!(a < b);
        assert_eq!(a.as_str().parse::<TaskId>().unwrap(), a);
        assert!("".parse::<TaskId>().is_err());
        assert!("a b".parse::<TaskId>().is_err());
        assert!("x".repeat(MAX_ID_LEN + 1).parse::<TaskId>().is_err());
    }

    #[test]
    fn statuses_and_kinds_round_trip() {
        for s in Status::ALL {
            assert_eq!(s.as_str().parse::<Status>().unwrap(), s);
        }
        assert!("finished".parse::<Status>().is_err());
        assert!(Status::Done.is_final() && !Status::Running.is_final());
        for k in ErrorKind::ALL {
            assert_eq!(k.as_str().parse::<ErrorKind>().unwrap(), k);
        }
    }

    #[test]
    fn time_arithmetic_saturates() {
        assert_eq!(UnixMs(5).plus(Duration::from_millis(7)), UnixMs(12));
        assert_eq!(UnixMs(u64::MAX).plus(Duration::from_secs(1)), UnixMs(u64::MAX));
        assert_eq!(UnixMs(3).since(UnixMs(10)), Duration::ZERO);
        assert_eq!(UnixMs::from_i64(-4), UnixMs(0));
    }
}
