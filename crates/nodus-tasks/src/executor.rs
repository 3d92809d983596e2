//! The task service of one node: [`Tasks`], the handle every API uses (arpcp, the node's `tasks`
//! service, the CLI), and the executor loop that drives the [`Scheduler`] core: it claims tasks
//! from the [`Store`], runs each attempt as an app event on the engine (a worker session per
//! attempt, so a timeout or an abort cancels it), and records every end in the store.
//!
//! Invariants:
//! - A submission is answered only once the store acknowledged it (on disk for SQLite).
//! - Per app, at most `limit` tasks are claimed or running; the others wait in the store, so a
//!   full engine queue never drops a task.
//! - Every attempt's end is recorded with its lease; a store failure retries the record with
//!   backoff and never loses it while the node runs. A record the store calls stale changes
//!   nothing (exactly one recorded completion per task).
//! - Execution is at-least-once: an attempt that was running when the node died runs again
//!   after the restart ([`Store::recover`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use nodus_engine::balance::Rejection;
use nodus_engine::manifest::Param;
use nodus_engine::{Engine, EngineError, SessionError};
use nodus_wire::Backoff;
use serde_json::Value;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::arpcp::{Code, SignalStatus};
use crate::procedures::{Catalog, CatalogError, Procedure};
use crate::sched::{AttemptEnd, Attempted, Output, SchedConfig, Scheduler};
use crate::store::{Command, Counts, Fenced, Finish, ListFilter, Outcome, Store, StoreError, Wake};
use crate::task::{
    json, Claimed, ErrorKind, Json, Lease, NewTask, Status, Submitted, Task, TaskError, TaskId, UnixMs, MAX_KEY_LEN,
};

/// Settings and bounds of a node's task service.
#[derive(Debug, Clone)]
pub struct TasksConfig {
    /// This node's id: the lease owner, and the arpcp `id` answer.
    pub node: String,
    /// Timeout of a task that does not set one (default 300 s).
    pub default_timeout: Duration,
    /// Longest timeout a task may set (default one day).
    pub max_timeout: Duration,
    /// Attempts of a task whose worker keeps failing, unless it sets its own (default 3).
    pub max_attempts: u32,
    /// Largest arguments, as JSON text (default 1 MiB).
    pub max_args_bytes: usize,
    /// Largest result, as the worker's joined chunks (default 16 MiB); beyond it the task fails.
    pub max_result_bytes: usize,
    /// A sync call waits for its task's timeout plus this much before it answers that the task
    /// is still stored (default 30 s).
    pub sync_grace: Duration,
    /// Most tasks one app may have claimed or running at once, whatever its profile allows
    /// (default 4096).
    pub max_inflight_per_app: usize,
    /// Events queued for the executor loop.
    pub events: usize,
    /// Status changes buffered for each watcher; a slower watcher misses changes (and is told
    /// how many).
    pub watch_capacity: usize,
    /// Scheduling policy.
    pub sched: SchedConfig,
}

impl TasksConfig {
    /// Defaults for a node called `node`.
    pub fn new(node: impl Into<String>) -> TasksConfig {
        let node = node.into();
        TasksConfig {
            sched: SchedConfig::new(node.clone()),
            node,
            default_timeout: Duration::from_secs(300),
            max_timeout: Duration::from_secs(86_400),
            max_attempts: 3,
            max_args_bytes: 1 << 20,
            max_result_bytes: 16 << 20,
            sync_grace: Duration::from_secs(30),
            max_inflight_per_app: 4096,
            events: 65_536,
            watch_capacity: 65_536,
        }
    }
}

/// A task to submit.
#[derive(Debug, Clone, Default)]
pub struct Submission {
    /// `APP.EVENT`.
    pub procedure: String,
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Idempotency key: the same key again returns the existing task.
    pub key: Option<String>,
    /// The task that submits this one: it must exist and not be finished; killing it kills
    /// this one.
    pub parent: Option<TaskId>,
    /// The latest time an attempt may start (the `expires_at` of the submitting message):
    /// past it the task is finished as expired without running; already past on arrival, the
    /// submission is refused.
    pub deadline: Option<UnixMs>,
    /// Longest an attempt may run (default: the node's).
    pub timeout: Option<Duration>,
    /// Most attempts when its worker fails (default: the node's).
    pub max_attempts: Option<u32>,
}

impl Submission {
    /// A submission of `procedure` with `args` and the node's defaults.
    pub fn new(procedure: impl Into<String>, args: Vec<Value>) -> Submission {
        Submission { procedure: procedure.into(), args, ..Submission::default() }
    }
}

/// Why a submission was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// No such procedure (arpcp 203).
    #[error("unknown procedure {0:?}; the procedures method lists them")]
    UnknownProcedure(String),
    /// The arguments do not fit the declaration (arpcp 204).
    #[error("{0}")]
    BadArguments(String),
    /// Something else about the submission is out of bounds (arpcp 200).
    #[error("{0}")]
    Invalid(String),
    /// The submission's deadline had passed when it arrived (arpcp 200; `ERROR code=expired`).
    #[error("{0}")]
    Expired(String),
    /// The parent task named is unknown or already finished (arpcp 205).
    #[error("{0}")]
    Parent(String),
    /// The store failed (arpcp 300).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The node is shutting down (arpcp 300).
    #[error("the node is shutting down; submit again later")]
    ShuttingDown,
}

impl SubmitError {
    /// The arpcp code of this refusal.
    pub fn code(&self) -> Code {
        match self {
            SubmitError::UnknownProcedure(_) => Code::UnknownProcedure,
            SubmitError::BadArguments(_) => Code::BadArguments,
            SubmitError::Invalid(_) | SubmitError::Expired(_) => Code::Malformed,
            SubmitError::Parent(_) => Code::UnknownTask,
            SubmitError::Store(_) | SubmitError::ShuttingDown => Code::Internal,
        }
    }
}

/// A finished task's outcome.
#[derive(Debug, Clone)]
pub struct Finished {
    /// Done, error or interrupted.
    pub status: Status,
    /// The result of a done task.
    pub result: Option<Json>,
    /// The error of a failed or interrupted task.
    pub error: Option<TaskError>,
}

impl Finished {
    fn of(task: &Task) -> Finished {
        Finished { status: task.status, result: task.result.clone(), error: task.error.clone() }
    }
}

/// What waiting for a task found.
#[derive(Debug, Clone)]
pub enum Waited {
    /// It finished.
    Finished(Finished),
    /// It is still pending or running after the wait.
    NotYet(Status),
    /// No such task (unknown, expired or deleted).
    Unknown,
}

/// A task's status changed: what `TASK_STATUS` notifications and `nodus task watch` carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusChange {
    /// The task.
    pub id: TaskId,
    /// Its procedure.
    pub procedure: Arc<str>,
    /// Its new status, or `None` when it was deleted (SIGNAL terminate).
    pub status: Option<Status>,
    /// Its attempt number (0 before the first).
    pub attempt: u32,
    /// The task that submitted it, when the change knows (always for `pending` at submission
    /// and `running`).
    pub parent: Option<TaskId>,
}

impl StatusChange {
    /// The status as a word (`deleted` for a deleted task).
    pub fn status_name(&self) -> &'static str {
        self.status.map_or("deleted", Status::as_str)
    }
}

/// Upper bounds (ms) of the buckets of [`TaskLatency`]; one more bucket holds the rest.
pub const LATENCY_BUCKETS_MS: [u64; 16] =
    [1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 300_000];

/// How long tasks took from submission to their final record (done or failed), as a
/// histogram: `counts[i]` tasks took at most `LATENCY_BUCKETS_MS[i]` ms and more than the bound
/// before; the last count is of the slower ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TaskLatency {
    /// Tasks per bucket (not cumulative).
    pub counts: [u64; LATENCY_BUCKETS_MS.len() + 1],
    /// The sum of all latencies, ms.
    pub sum_ms: u64,
}

/// Counters since the service started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TaskStats {
    /// Tasks stored.
    pub submitted: u64,
    /// Attempts started.
    pub started: u64,
    /// Tasks recorded done.
    pub done: u64,
    /// Tasks recorded failed (procedure errors, timeouts, workers that kept failing).
    pub failed: u64,
    /// Attempts given up on a worker failure and retried.
    pub retried: u64,
    /// Attempts that never ran (full queue, stopped app) and went back to the store.
    pub released: u64,
    /// Completions the store refused as stale (a newer attempt, an abort, a recovery).
    pub stale: u64,
    /// Records that had to be written again after a store failure.
    pub record_retries: u64,
    /// Pending tasks finished as expired (their deadline passed before they could start).
    pub expired: u64,
    /// Submission to final record, of the tasks this node recorded done or failed.
    pub latency: TaskLatency,
}

#[derive(Default)]
struct Counters {
    expired: AtomicU64,
    submitted: AtomicU64,
    started: AtomicU64,
    done: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    released: AtomicU64,
    stale: AtomicU64,
    record_retries: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    latency_sum_ms: AtomicU64,
}

impl Counters {
    fn observe_latency(&self, ms: u64) {
        let bucket = LATENCY_BUCKETS_MS.iter().position(|b| ms <= *b).unwrap_or(LATENCY_BUCKETS_MS.len());
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_ms.fetch_add(ms, Ordering::Relaxed);
    }
}

enum Event {
    Submitted(Vec<String>),
    SetApp {
        app: String,
        limit: usize,
    },
    RemoveApp(String),
    Claimed {
        app: String,
        asked: usize,
        result: Result<Vec<Claimed>, StoreError>,
    },
    Ended {
        id: TaskId,
        lease: Lease,
        end: AttemptEnd,
    },
    Recorded {
        batch: Vec<Finish>,
        metas: Vec<Attempted>,
        result: Result<Vec<Fenced>, StoreError>,
    },
    Aborted(TaskId),
    /// Tasks with these deadlines were stored.
    Deadlines(Vec<UnixMs>),
    /// An expiry sweep finished as many tasks as it could: sweep again.
    ExpireFull,
    /// Another node's news may have been missed: every app looks for due tasks.
    WakeAll,
    Shutdown {
        grace: Duration,
        done: oneshot::Sender<()>,
    },
}

type Waiter = oneshot::Sender<Option<Finished>>;

struct Inner<S> {
    store: S,
    engine: Engine,
    config: TasksConfig,
    catalog: RwLock<Catalog>,
    events: mpsc::Sender<Event>,
    waiters: Mutex<HashMap<TaskId, Vec<Waiter>>>,
    changes: broadcast::Sender<StatusChange>,
    /// Submissions being stored while someone watches, whose `pending` change is not out yet.
    /// Bounded by the submissions in flight (the store's queue).
    announcing: Mutex<HashMap<TaskId, Arc<str>>>,
    closing: AtomicBool,
    counters: Counters,
    /// Bumped when a submission stored new tasks.
    submitted: watch::Sender<u64>,
}

/// A node's task service. Cheap to clone.
pub struct Tasks<S: Store> {
    inner: Arc<Inner<S>>,
}

impl<S: Store> Clone for Tasks<S> {
    fn clone(&self) -> Self {
        Tasks { inner: self.inner.clone() }
    }
}

impl<S: Store> std::fmt::Debug for Tasks<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tasks").field("node", &self.inner.config.node).finish()
    }
}

impl<S: Store> Tasks<S> {
    /// Starts the service: tasks this node was running when it last stopped become pending
    /// again (they run again: at-least-once), then the executor loop starts. Apps run tasks once
    /// [`Tasks::set_app`] makes them available.
    ///
    /// # Errors
    /// The store failed during recovery.
    pub async fn start(store: S, engine: Engine, config: TasksConfig) -> Result<Tasks<S>, StoreError> {
        let now = UnixMs::now();
        let recovered = store.recover(config.node.clone(), now).await?;
        if recovered > 0 {
            tracing::warn!(tasks = recovered, "tasks that were running when the node stopped will run again");
        }
        let (tx, rx) = mpsc::channel(config.events.max(16));
        let (changes, _) = broadcast::channel(config.watch_capacity.max(16));
        let sched = Scheduler::new(config.sched.clone(), rand::random(), now);
        let inner = Arc::new(Inner {
            store,
            engine,
            config,
            catalog: RwLock::new(Catalog::new()),
            events: tx,
            waiters: Mutex::new(HashMap::new()),
            changes,
            announcing: Mutex::new(HashMap::new()),
            closing: AtomicBool::new(false),
            counters: Counters::default(),
            submitted: watch::channel(0).0,
        });
        if let Some(news) = inner.store.wakeups() {
            tokio::spawn(follow_store(Arc::downgrade(&inner), news));
        }
        tokio::spawn(Executor::new(inner.clone(), sched).run(rx));
        Ok(Tasks { inner })
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.inner.config.node
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.inner.store
    }

    /// Makes `app`'s procedures available. With `limit`, the app also runs tasks, `limit` at a
    /// time (capped by `max_inflight_per_app`; for an engine app, its `pool-limit × concurrency
    /// + queue-limit`); without, tasks are accepted and wait in the store until it runs.
    ///
    /// # Errors
    /// A procedure name another app already has.
    pub async fn set_app(
        &self,
        app: &str,
        procedures: &BTreeMap<String, Vec<Param>>,
        limit: Option<usize>,
    ) -> Result<(), CatalogError> {
        self.inner.catalog.write().unwrap_or_else(|e| e.into_inner()).set_app(app, procedures)?;
        let event = match limit {
            Some(limit) => Event::SetApp {
                app: app.to_string(),
                limit: limit.clamp(1, self.inner.config.max_inflight_per_app.max(1)),
            },
            None => Event::RemoveApp(app.to_string()),
        };
        let _ = self.inner.events.send(event).await;
        Ok(())
    }

    /// Makes `app`'s procedures unavailable; its stored tasks wait until it is set again.
    pub async fn remove_app(&self, app: &str) {
        self.inner.catalog.write().unwrap_or_else(|e| e.into_inner()).remove_app(app);
        let _ = self.inner.events.send(Event::RemoveApp(app.to_string())).await;
    }

    /// Records attempts that ran elsewhere (a manager node's workers): in the store, fenced by
    /// their leases, then counted, told to the watchers and to whoever waits for the tasks, as
    /// the executor does for its own.
    ///
    /// # Errors
    /// The store failed: nothing was recorded.
    pub async fn record(&self, batch: Vec<(Finish, Attempted)>) -> Result<Vec<Fenced>, StoreError> {
        let (batch, metas): (Vec<Finish>, Vec<Attempted>) = batch.into_iter().unzip();
        let fenced = self.inner.store.finish(batch.clone()).await?;
        announce_records(&self.inner, batch, metas, fenced.clone());
        Ok(fenced)
    }

    /// Counts of submission batches that stored new tasks: changes whenever tasks were
    /// submitted (a manager node dispatches them to its workers).
    pub fn submitted(&self) -> watch::Receiver<u64> {
        self.inner.submitted.subscribe()
    }

    /// Every procedure, sorted by name.
    pub fn procedures(&self) -> Vec<Arc<Procedure>> {
        self.inner.catalog.read().unwrap_or_else(|e| e.into_inner()).procedures()
    }

    /// Checks a submission and makes its task.
    fn prepare(&self, s: Submission, now: UnixMs, rng: &mut impl rand::Rng) -> Result<NewTask, SubmitError> {
        let config = &self.inner.config;
        let proc = self
            .inner
            .catalog
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .resolve(&s.procedure)
            .ok_or_else(|| SubmitError::UnknownProcedure(s.procedure.clone()))?;
        proc.check(&s.args).map_err(SubmitError::BadArguments)?;
        let text = serde_json::to_string(&s.args).map_err(|e| SubmitError::BadArguments(e.to_string()))?;
        if text.len() > config.max_args_bytes {
            return Err(SubmitError::Invalid(format!(
                "the arguments are {} bytes; at most {} (tasks.max_args_bytes)",
                text.len(),
                config.max_args_bytes
            )));
        }
        if let Some(k) = &s.key {
            if k.is_empty() || k.len() > MAX_KEY_LEN {
                return Err(SubmitError::Invalid(format!("an idempotency key is 1 to {MAX_KEY_LEN} bytes")));
            }
        }
        if let Some(d) = s.deadline.filter(|d| *d <= now) {
            return Err(SubmitError::Expired(format!(
                "the task expired before it was stored (expires_at={} <= now={}); submit it again with a later _expires_at",
                d.0, now.0
            )));
        }
        let timeout = s.timeout.unwrap_or(config.default_timeout);
        if timeout.is_zero() || timeout > config.max_timeout {
            return Err(SubmitError::Invalid(format!(
                "a timeout is above 0 and at most {} s",
                config.max_timeout.as_secs()
            )));
        }
        Ok(NewTask {
            id: TaskId::generate(now, rng),
            procedure: proc.name.clone(),
            app: proc.app.clone(),
            args: json(&text).map_err(|e| SubmitError::BadArguments(e.to_string()))?,
            max_attempts: s.max_attempts.unwrap_or(config.max_attempts).clamp(1, 100),
            timeout,
            parent: s.parent,
            key: s.key,
            created_at: now,
            deadline: s.deadline,
        })
    }

    /// Stores one task; answers once it is durable.
    ///
    /// # Errors
    /// [`SubmitError`]: nothing was stored.
    pub async fn submit(&self, s: Submission) -> Result<Submitted, SubmitError> {
        let mut out = self.submit_many(vec![s]).await?;
        out.pop().expect("one result per submission")
    }

    /// Stores many tasks with one store operation; each entry is its submission's outcome.
    ///
    /// # Errors
    /// The node is shutting down or the store failed: nothing was stored.
    pub async fn submit_many(&self, subs: Vec<Submission>) -> Result<Vec<Result<Submitted, SubmitError>>, SubmitError> {
        if self.inner.closing.load(Ordering::Acquire) {
            return Err(SubmitError::ShuttingDown);
        }
        let now = UnixMs::now();
        let mut out: Vec<Result<Submitted, SubmitError>> = Vec::with_capacity(subs.len());
        let mut tasks = Vec::with_capacity(subs.len());
        let mut slots = Vec::with_capacity(subs.len());
        {
            let mut rng = rand::thread_rng();
            for s in subs {
                match self.prepare(s, now, &mut rng) {
                    Ok(t) => {
                        slots.push(out.len());
                        out.push(Err(SubmitError::ShuttingDown));
                        tasks.push(t);
                    }
                    Err(e) => out.push(Err(e)),
                }
            }
        }
        self.check_parents(&mut tasks, &mut slots, &mut out).await?;
        if tasks.is_empty() {
            return Ok(out);
        }
        let deadlines: Vec<UnixMs> = tasks.iter().filter_map(|t| t.deadline).collect();
        let parents: HashMap<TaskId, TaskId> =
            tasks.iter().filter_map(|t| t.parent.clone().map(|p| (t.id.clone(), p))).collect();
        let meta: Vec<(String, Arc<str>)> =
            tasks.iter().map(|t| (t.app.clone(), Arc::from(t.procedure.as_str()))).collect();
        let watching = self.inner.changes.receiver_count() > 0;
        if watching {
            // Whoever takes an id out of `announcing` first emits its `pending`: this task once
            // stored, or the executor if it starts the task before that (see `dispatch`).
            let mut a = self.inner.announcing.lock().unwrap_or_else(|e| e.into_inner());
            a.extend(tasks.iter().map(|t| (t.id.clone(), Arc::from(t.procedure.as_str()))));
        }
        let ids: Vec<TaskId> = if watching { tasks.iter().map(|t| t.id.clone()).collect() } else { Vec::new() };
        let stored = self.inner.store.submit(tasks).await;
        if watching {
            let mut a = self.inner.announcing.lock().unwrap_or_else(|e| e.into_inner());
            for (id, sub) in ids.iter().zip(stored.iter().flatten()) {
                if let Some(procedure) = a.remove(id) {
                    if !sub.existing {
                        let change = StatusChange {
                            id: id.clone(),
                            procedure,
                            status: Some(Status::Pending),
                            attempt: 0,
                            parent: parents.get(id).cloned(),
                        };
                        let _ = self.inner.changes.send(change);
                    }
                }
            }
            if stored.is_err() {
                for id in &ids {
                    a.remove(id);
                }
            }
        }
        let stored = stored?;
        let mut apps: Vec<String> = Vec::new();
        let mut orphans: Vec<(TaskId, TaskId)> = Vec::new();
        for ((slot, sub), (app, _)) in slots.into_iter().zip(stored).zip(meta) {
            if !sub.existing {
                self.inner.counters.submitted.fetch_add(1, Ordering::Relaxed);
                if !apps.contains(&app) {
                    apps.push(app);
                }
                if let Some(parent) = parents.get(&sub.id) {
                    orphans.push((sub.id.clone(), parent.clone()));
                }
            }
            out[slot] = Ok(sub);
        }
        self.kill_if_parent_killed(orphans).await;
        if !apps.is_empty() {
            self.inner.submitted.send_modify(|n| *n = n.wrapping_add(1));
            let _ = self.inner.events.send(Event::Submitted(apps)).await;
        }
        if !deadlines.is_empty() {
            let _ = self.inner.events.send(Event::Deadlines(deadlines)).await;
        }
        Ok(out)
    }

    /// Kills the subtasks just stored whose parent was killed after [`Self::check_parents`]
    /// let them through and before they were stored (the kill listed the parent's subtasks
    /// without them): a killed task's subtasks never outlive it.
    async fn kill_if_parent_killed(&self, children: Vec<(TaskId, TaskId)>) {
        let now = UnixMs::now();
        let mut killed: HashMap<TaskId, bool> = HashMap::new();
        for (child, parent) in children {
            let parent_killed = match killed.get(&parent) {
                Some(k) => *k,
                None => {
                    let k = matches!(self.inner.store.get(parent.clone(), now).await, Ok(Some(t)) if t.status == Status::Interrupted);
                    killed.insert(parent, k);
                    k
                }
            };
            if parent_killed {
                if let Err(e) = self.kill(&child).await {
                    tracing::warn!(task = %child, error = %e, "a subtask of a killed task could not be killed");
                }
            }
        }
    }

    /// Refuses the prepared tasks whose parent is unknown or finished (a killed task starts no
    /// subtasks): they leave `tasks` and their slot in `out` gets the refusal.
    async fn check_parents(
        &self,
        tasks: &mut Vec<NewTask>,
        slots: &mut Vec<usize>,
        out: &mut [Result<Submitted, SubmitError>],
    ) -> Result<(), SubmitError> {
        if tasks.iter().all(|t| t.parent.is_none()) {
            return Ok(());
        }
        let now = UnixMs::now();
        let mut verdicts: HashMap<TaskId, Option<String>> = HashMap::new();
        for p in tasks.iter().filter_map(|t| t.parent.clone()) {
            if verdicts.contains_key(&p) {
                continue;
            }
            let why = match self.inner.store.get(p.clone(), now).await? {
                None => Some(format!("no parent task {p} (unknown, deleted, or its result expired)")),
                Some(t) if t.status.is_final() => {
                    Some(format!("the parent task {p} is {}: a finished task starts no subtasks", t.status))
                }
                Some(_) => None,
            };
            verdicts.insert(p, why);
        }
        let mut kept = (Vec::with_capacity(tasks.len()), Vec::with_capacity(slots.len()));
        for (t, slot) in tasks.drain(..).zip(slots.drain(..)) {
            match t.parent.as_ref().and_then(|p| verdicts.get(p).cloned().flatten()) {
                Some(why) => out[slot] = Err(SubmitError::Parent(why)),
                None => {
                    kept.0.push(t);
                    kept.1.push(slot);
                }
            }
        }
        (*tasks, *slots) = kept;
        Ok(())
    }

    /// Submits a task and waits for it to finish (a sync task): up to its timeout plus
    /// `sync_grace`.
    ///
    /// # Errors
    /// The submission was refused.
    pub async fn run(&self, s: Submission) -> Result<(TaskId, Waited), SubmitError> {
        let wait = s.timeout.unwrap_or(self.inner.config.default_timeout) + self.inner.config.sync_grace;
        let sub = self.submit(s).await?;
        let waited = self.wait(&sub.id, wait).await?;
        Ok((sub.id, waited))
    }

    /// Waits up to `timeout` for a task to finish.
    ///
    /// # Errors
    /// The store failed.
    pub async fn wait(&self, id: &TaskId, timeout: Duration) -> Result<Waited, StoreError> {
        let (tx, rx) = oneshot::channel();
        // Registered before the store is read, so a completion between the two is not missed.
        self.inner.waiters.lock().unwrap_or_else(|e| e.into_inner()).entry(id.clone()).or_default().push(tx);
        let current = self.inner.store.get(id.clone(), UnixMs::now()).await;
        let status = match current {
            Ok(Some(t)) if t.status.is_final() => {
                self.forget_waiter(id);
                return Ok(Waited::Finished(Finished::of(&t)));
            }
            Ok(Some(t)) => t.status,
            Ok(None) => {
                self.forget_waiter(id);
                return Ok(Waited::Unknown);
            }
            Err(e) => {
                self.forget_waiter(id);
                return Err(e);
            }
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Some(f))) => Ok(Waited::Finished(f)),
            Ok(Ok(None)) => Ok(Waited::Unknown),
            Ok(Err(_)) => Err(StoreError::Closed),
            Err(_) => {
                self.forget_waiter(id);
                match self.inner.store.get(id.clone(), UnixMs::now()).await? {
                    Some(t) if t.status.is_final() => Ok(Waited::Finished(Finished::of(&t))),
                    Some(t) => Ok(Waited::NotYet(t.status)),
                    None => Ok(Waited::NotYet(status)),
                }
            }
        }
    }

    fn forget_waiter(&self, id: &TaskId) {
        let mut w = self.inner.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = w.get_mut(id) {
            list.retain(|s| !s.is_closed());
            if list.is_empty() {
                w.remove(id);
            }
        }
    }

    /// One task (`None`: unknown or expired).
    ///
    /// # Errors
    /// The store failed.
    pub async fn get(&self, id: &TaskId) -> Result<Option<Task>, StoreError> {
        self.inner.store.get(id.clone(), UnixMs::now()).await
    }

    /// Tasks matching `filter`.
    ///
    /// # Errors
    /// The store failed.
    pub async fn list(&self, filter: ListFilter) -> Result<Vec<Task>, StoreError> {
        self.inner.store.list(filter, UnixMs::now()).await
    }

    /// How many tasks there are by status.
    ///
    /// # Errors
    /// The store failed.
    pub async fn counts(&self) -> Result<Counts, StoreError> {
        self.inner.store.counts(UnixMs::now()).await
    }

    /// Aborts a task and its subtasks: pending or running, each becomes interrupted (a running
    /// attempt's worker session is cancelled). Returns its status before (`None`: unknown).
    ///
    /// # Errors
    /// The store failed.
    pub async fn abort(&self, id: &TaskId) -> Result<Option<Status>, StoreError> {
        Ok(self.kill(id).await?.map(|k| k.before))
    }

    /// Kills a task and, recursively, every subtask it started (the tasks naming it as their
    /// parent, theirs, and so on): each pending or running one becomes interrupted (pending ones
    /// never run, running attempts are cancelled), the task itself first, so a subtask it
    /// submits meanwhile is refused. Returns the task's status before and the subtasks
    /// interrupted (`None`: unknown task). At most [`MAX_KILLED_SUBTASKS`] subtasks are visited.
    ///
    /// # Errors
    /// The store failed (what was interrupted before stays interrupted).
    pub async fn kill(&self, id: &TaskId) -> Result<Option<Killed>, StoreError> {
        let Some(before) = self.signal_one(id, SignalStatus::Interrupted).await? else { return Ok(None) };
        let mut killed = Killed { before, subtasks: Vec::new() };
        let mut queue = std::collections::VecDeque::from([id.clone()]);
        let mut visited = 0usize;
        while let Some(parent) = queue.pop_front() {
            let mut after = None;
            loop {
                let filter = ListFilter {
                    parent: Some(parent.clone()),
                    after: after.clone(),
                    limit: KILL_PAGE,
                    ..ListFilter::default()
                };
                let page = self.inner.store.list(filter, UnixMs::now()).await?;
                for child in &page {
                    visited += 1;
                    if visited > MAX_KILLED_SUBTASKS {
                        tracing::warn!(task = %id, max = MAX_KILLED_SUBTASKS, "a kill reached too many subtasks; the rest keep running");
                        return Ok(Some(killed));
                    }
                    if !child.status.is_final()
                        && self.signal_one(&child.id, SignalStatus::Interrupted).await?.is_some()
                    {
                        killed.subtasks.push(child.id.clone());
                    }
                    // A finished subtask may have started subtasks that still run.
                    queue.push_back(child.id.clone());
                }
                if page.len() < KILL_PAGE {
                    break;
                }
                after = page.last().map(|t| t.id.clone());
            }
        }
        Ok(Some(killed))
    }

    /// Applies a SIGNAL status (seed 004) to a task. Returns its status before (`None`:
    /// unknown).
    ///
    /// - `accepted`: nothing changes (the task must exist).
    /// - `interrupted`: as [`Tasks::abort`].
    /// - `done`: an unfinished task becomes done with result `null`, its attempt cancelled.
    /// - `client_error`, `terminate`: everything stored about it is deleted, its attempt
    ///   cancelled.
    ///
    /// # Errors
    /// The store failed.
    pub async fn signal(&self, id: &TaskId, status: SignalStatus) -> Result<Option<Status>, StoreError> {
        match status {
            SignalStatus::Interrupted => self.abort(id).await,
            other => self.signal_one(id, other).await,
        }
    }

    /// [`Tasks::signal`] on this task alone.
    async fn signal_one(&self, id: &TaskId, status: SignalStatus) -> Result<Option<Status>, StoreError> {
        let now = UnixMs::now();
        let command = match status {
            SignalStatus::Accepted => return Ok(self.get(id).await?.map(|t| t.status)),
            SignalStatus::Interrupted => Command::Interrupt,
            SignalStatus::Done => Command::MarkDone,
            SignalStatus::ClientError | SignalStatus::Terminate => Command::Delete,
        };
        let found = self.inner.store.command(id.clone(), command, now).await?;
        let Some(found) = found else { return Ok(None) };
        let before = found.before;
        let changed = command == Command::Delete || !before.is_final();
        if changed {
            if before == Status::Running {
                let _ = self.inner.events.send(Event::Aborted(id.clone())).await;
            }
            let finished = match command {
                Command::Interrupt => Some(Finished {
                    status: Status::Interrupted,
                    result: None,
                    error: Some(TaskError::new(ErrorKind::Aborted, "aborted")),
                }),
                Command::MarkDone => {
                    Some(Finished { status: Status::Done, result: Some(crate::task::json_null()), error: None })
                }
                Command::Delete => None,
            };
            let new_status = finished.as_ref().map(|f| f.status);
            notify_waiters(&self.inner, id, finished);
            if self.inner.changes.receiver_count() > 0 {
                let procedure: Arc<str> = Arc::from(found.procedure.as_str());
                let change = StatusChange {
                    id: id.clone(),
                    procedure,
                    status: new_status,
                    attempt: found.attempt,
                    parent: None,
                };
                let _ = self.inner.changes.send(change);
            }
        }
        Ok(Some(before))
    }

    /// Status changes from now on (every submission, start, retry and end).
    pub fn watch(&self) -> broadcast::Receiver<StatusChange> {
        self.inner.changes.subscribe()
    }

    /// Counters since the service started.
    pub fn stats(&self) -> TaskStats {
        let c = &self.inner.counters;
        TaskStats {
            submitted: c.submitted.load(Ordering::Relaxed),
            started: c.started.load(Ordering::Relaxed),
            done: c.done.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            retried: c.retried.load(Ordering::Relaxed),
            released: c.released.load(Ordering::Relaxed),
            stale: c.stale.load(Ordering::Relaxed),
            record_retries: c.record_retries.load(Ordering::Relaxed),
            expired: c.expired.load(Ordering::Relaxed),
            latency: TaskLatency {
                counts: std::array::from_fn(|i| c.latency[i].load(Ordering::Relaxed)),
                sum_ms: c.latency_sum_ms.load(Ordering::Relaxed),
            },
        }
    }

    /// Stops: new submissions are refused, nothing more is claimed, running attempts get up to
    /// `grace` to finish and be recorded; the ones still running then are cancelled and run
    /// again after the next start. Returns when the executor has stopped (the store stays
    /// open: its owner closes it).
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.closing.store(true, Ordering::Release);
        let (tx, rx) = oneshot::channel();
        if self.inner.events.send(Event::Shutdown { grace, done: tx }).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Subtasks read per store operation when a kill looks for them.
const KILL_PAGE: usize = 1000;
/// Most subtasks one kill visits (finished ones included).
pub const MAX_KILLED_SUBTASKS: usize = 100_000;

/// What [`Tasks::kill`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Killed {
    /// The task's status before the kill.
    pub before: Status,
    /// The subtasks (at any depth) it interrupted.
    pub subtasks: Vec<TaskId>,
}

/// Tells watchers and waiters of the tasks the store finished as expired.
fn announce_expired<S>(inner: &Inner<S>, expired: Vec<crate::store::Expired>) {
    inner.counters.expired.fetch_add(expired.len() as u64, Ordering::Relaxed);
    let watching = inner.changes.receiver_count() > 0;
    for x in expired {
        tracing::debug!(task = %x.id, deadline = x.deadline.0, "task expired before it could start");
        let error = crate::store::Expired::error(x.deadline);
        if watching {
            let change = StatusChange {
                id: x.id.clone(),
                procedure: Arc::from(x.procedure.as_str()),
                status: Some(Status::Error),
                attempt: x.attempt,
                parent: None,
            };
            let _ = inner.changes.send(change);
        }
        notify_waiters(inner, &x.id, Some(Finished { status: Status::Error, result: None, error: Some(error) }));
    }
}

/// Carries other nodes' news about a shared store ([`Store::wakeups`]) into this node: apps with
/// new pending tasks claim at once, waiters of tasks that finished elsewhere are answered, and an
/// attempt of a task a client changed elsewhere is cancelled here.
async fn follow_store<S: Store>(inner: Weak<Inner<S>>, mut news: broadcast::Receiver<Wake>) {
    loop {
        let wake = match news.recv().await {
            Ok(w) => w,
            Err(broadcast::error::RecvError::Lagged(_)) => Wake::All,
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let Some(inner) = inner.upgrade() else { return };
        match wake {
            Wake::Pending(app) => {
                let _ = inner.events.send(Event::Submitted(vec![app])).await;
            }
            Wake::Finished(ids) => answer_waiters(&inner, ids).await,
            Wake::Commanded(id) => {
                let _ = inner.events.send(Event::Aborted(id.clone())).await;
                answer_waiters(&inner, vec![id]).await;
            }
            Wake::All => {
                let _ = inner.events.send(Event::WakeAll).await;
                let ids: Vec<TaskId> =
                    inner.waiters.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
                answer_waiters(&inner, ids).await;
            }
        }
    }
}

/// Answers the waiters of tasks that may have finished (or gone) elsewhere, from the store.
async fn answer_waiters<S: Store>(inner: &Inner<S>, ids: Vec<TaskId>) {
    for id in ids {
        if !inner.waiters.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&id) {
            continue;
        }
        match inner.store.get(id.clone(), UnixMs::now()).await {
            Ok(Some(t)) if t.status.is_final() => notify_waiters(inner, &id, Some(Finished::of(&t))),
            Ok(None) => notify_waiters(inner, &id, None),
            Ok(Some(_)) => {}
            Err(e) => tracing::warn!(task = %id, error = %e, "cannot read a task another node finished"),
        }
    }
}

/// Counts recorded outcomes, tells the watchers and wakes the waiters of the final ones.
fn announce_records<S>(inner: &Inner<S>, batch: Vec<Finish>, metas: Vec<Attempted>, fenced: Vec<Fenced>) {
    let c = &inner.counters;
    let watching = inner.changes.receiver_count() > 0;
    for ((f, meta), fence) in batch.into_iter().zip(metas).zip(fenced) {
        if fence == Fenced::Stale {
            c.stale.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(task = %f.id, lease = %f.lease, "stale completion discarded");
            continue;
        }
        if matches!(f.outcome, Outcome::Done(_) | Outcome::Failed(_)) && meta.created_at.0 > 0 {
            c.observe_latency(u64::try_from(f.now.since(meta.created_at).as_millis()).unwrap_or(u64::MAX));
        }
        let (status, finished) = match f.outcome {
            Outcome::Done(result) => {
                c.done.fetch_add(1, Ordering::Relaxed);
                (Status::Done, Some(Finished { status: Status::Done, result: Some(result), error: None }))
            }
            Outcome::Failed(error) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
                (Status::Error, Some(Finished { status: Status::Error, result: None, error: Some(error) }))
            }
            Outcome::Retry { .. } => {
                c.retried.fetch_add(1, Ordering::Relaxed);
                (Status::Pending, None)
            }
            Outcome::Release { .. } => {
                c.released.fetch_add(1, Ordering::Relaxed);
                (Status::Pending, None)
            }
        };
        if watching {
            let change = StatusChange {
                id: f.id.clone(),
                procedure: meta.procedure,
                status: Some(status),
                attempt: meta.attempt,
                parent: None,
            };
            let _ = inner.changes.send(change);
        }
        if let Some(done) = finished {
            notify_waiters(inner, &f.id, Some(done));
        }
    }
}

fn notify_waiters<S>(inner: &Inner<S>, id: &TaskId, finished: Option<Finished>) {
    let list = inner.waiters.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    for w in list.unwrap_or_default() {
        let _ = w.send(finished.clone());
    }
}

/// The executor loop's state: the scheduler core and what it started.
struct Executor<S: Store> {
    inner: Arc<Inner<S>>,
    sched: Scheduler,
    /// Running attempts' cancel switches (dropping one cancels too).
    cancels: HashMap<TaskId, (Lease, oneshot::Sender<()>)>,
    /// Records waiting to be written in one store operation.
    records: Vec<(Finish, Attempted)>,
    /// Store operations the loop is waiting for (claims and records).
    store_ops: usize,
    /// Backoff for records the store failed to write.
    record_backoff: Backoff,
    shutting: Option<(tokio::time::Instant, oneshot::Sender<()>)>,
}

/// Most events the loop takes before it writes records and plans.
const EVENT_BATCH: usize = 512;

impl<S: Store> Executor<S> {
    fn new(inner: Arc<Inner<S>>, sched: Scheduler) -> Executor<S> {
        let record_backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5), rand::random());
        Executor {
            inner,
            sched,
            cancels: HashMap::new(),
            records: Vec::new(),
            store_ops: 0,
            record_backoff,
            shutting: None,
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Event>) {
        let sleep = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(sleep);
        let mut armed: Option<UnixMs> = None;
        let mut batch = Vec::with_capacity(EVENT_BATCH);
        loop {
            let deadline = self.sched.next_deadline();
            if deadline != armed {
                if let Some(d) = deadline {
                    let wait = d.since(UnixMs::now());
                    sleep.as_mut().reset(tokio::time::Instant::now() + wait);
                }
                armed = deadline;
            }
            let shutdown_at = self.shutting.as_ref().map(|(at, _)| *at);
            tokio::select! {
                n = rx.recv_many(&mut batch, EVENT_BATCH) => {
                    if n == 0 {
                        break;
                    }
                    let now = UnixMs::now();
                    for ev in batch.drain(..) {
                        self.handle(ev, now);
                    }
                }
                _ = &mut sleep, if armed.is_some() => {
                    armed = None;
                    self.sched.tick(UnixMs::now());
                }
                _ = tokio::time::sleep_until(shutdown_at.unwrap_or_else(tokio::time::Instant::now)), if shutdown_at.is_some() => {
                    // Grace is over. What still runs is cancelled and what is not recorded yet
                    // stays running in the store: it all runs again after the next start.
                    let (attempts, records) = (self.cancels.len(), self.records.len() + self.store_ops);
                    if attempts > 0 || records > 0 {
                        tracing::warn!(attempts, store_operations = records, "shutdown grace over; unfinished tasks run again after the next start");
                    }
                    self.cancels.clear();
                    break;
                }
            }
            self.apply_outputs();
            if self.shutting.is_some() && self.cancels.is_empty() && self.store_ops == 0 && self.records.is_empty() {
                break;
            }
        }
        if let Some((_, done)) = self.shutting.take() {
            let _ = done.send(());
        }
        tracing::info!(node = %self.inner.config.node, "task executor stopped");
    }

    fn handle(&mut self, ev: Event, now: UnixMs) {
        match ev {
            Event::Submitted(apps) => {
                for app in apps {
                    self.sched.handle_submitted(&app, now);
                }
            }
            Event::SetApp { app, limit } => {
                if self.shutting.is_none() {
                    self.sched.set_app(&app, limit, now);
                }
            }
            Event::RemoveApp(app) => self.sched.remove_app(&app),
            Event::Claimed { app, asked, result } => {
                self.store_ops -= 1;
                let result = result.map_err(|e| {
                    tracing::error!(error = %e, %app, "claiming tasks failed; retrying after a pause");
                });
                self.sched.handle_claimed(&app, asked, result, now);
            }
            Event::Ended { id, lease, end } => {
                if self.cancels.get(&id).is_some_and(|(l, _)| *l == lease) {
                    self.cancels.remove(&id);
                }
                self.sched.handle_end(&id, lease, end, now);
            }
            Event::Recorded { batch, metas, result } => {
                self.store_ops -= 1;
                self.recorded(batch, metas, result);
            }
            Event::Aborted(id) => {
                self.sched.handle_abort(&id, now);
            }
            Event::Deadlines(deadlines) => self.sched.handle_deadlines(deadlines),
            Event::ExpireFull => self.sched.handle_expire_full(now),
            Event::WakeAll => {
                for app in self.apps_running() {
                    self.sched.handle_submitted(&app, now);
                }
            }
            Event::Shutdown { grace, done } => {
                let apps: Vec<String> = self.apps_running();
                for app in apps {
                    self.sched.remove_app(&app);
                }
                self.shutting = Some((tokio::time::Instant::now() + grace, done));
            }
        }
    }

    fn apps_running(&self) -> Vec<String> {
        self.inner
            .catalog
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .procedures()
            .iter()
            .map(|p| p.app.clone())
            .collect()
    }

    /// Carries out everything the scheduler asked for, then writes the records in one operation.
    fn apply_outputs(&mut self) {
        while let Some(out) = self.sched.poll_output() {
            match out {
                Output::Claim(claim) => {
                    self.store_ops += 1;
                    let inner = self.inner.clone();
                    tokio::spawn(async move {
                        let (app, asked) = (claim.app.clone(), claim.max);
                        let result = inner.store.claim(claim).await;
                        let _ = inner.events.send(Event::Claimed { app, asked, result }).await;
                    });
                }
                Output::Dispatch(c) => self.dispatch(c),
                Output::Cancel(id, lease) => {
                    if self.cancels.get(&id).is_some_and(|(l, _)| *l == lease) {
                        if let Some((_, cancel)) = self.cancels.remove(&id) {
                            let _ = cancel.send(());
                        }
                    }
                }
                Output::Record(f, meta) => self.records.push((f, meta)),
                Output::Reap(now) => {
                    let inner = self.inner.clone();
                    tokio::spawn(async move {
                        match inner.store.reap(now).await {
                            Ok(0) => {}
                            Ok(n) => tracing::warn!(tasks = n, "tasks whose lease ran out are pending again"),
                            Err(e) => tracing::error!(error = %e, "returning tasks with expired leases failed"),
                        }
                    });
                }
                Output::Expire(now, max) => {
                    let inner = self.inner.clone();
                    tokio::spawn(async move {
                        match inner.store.expire(now, max).await {
                            Ok(expired) => {
                                let full = expired.len() >= max;
                                announce_expired(&inner, expired);
                                if full {
                                    let _ = inner.events.send(Event::ExpireFull).await;
                                }
                            }
                            Err(e) => tracing::error!(error = %e, "finishing expired tasks failed"),
                        }
                    });
                }
                Output::Purge(now, max) => {
                    let inner = self.inner.clone();
                    tokio::spawn(async move {
                        match inner.store.purge(now, max).await {
                            Ok(0) => {}
                            Ok(n) => tracing::debug!(tasks = n, "expired tasks purged"),
                            Err(e) => tracing::error!(error = %e, "purging expired tasks failed"),
                        }
                    });
                }
            }
        }
        if !self.records.is_empty() {
            let (batch, metas) = std::mem::take(&mut self.records).into_iter().unzip();
            self.write_records(batch, metas, Duration::ZERO);
        }
    }

    fn write_records(&mut self, batch: Vec<Finish>, metas: Vec<Attempted>, delay: Duration) {
        self.store_ops += 1;
        let inner = self.inner.clone();
        tokio::spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let result = inner.store.finish(batch.clone()).await;
            let _ = inner.events.send(Event::Recorded { batch, metas, result }).await;
        });
    }

    fn recorded(&mut self, batch: Vec<Finish>, metas: Vec<Attempted>, result: Result<Vec<Fenced>, StoreError>) {
        let fenced = match result {
            Ok(f) => f,
            Err(e) => {
                let delay = self.record_backoff.next_delay();
                tracing::error!(error = %e, records = batch.len(), ?delay, "recording task outcomes failed; retrying");
                self.inner.counters.record_retries.fetch_add(batch.len() as u64, Ordering::Relaxed);
                self.write_records(batch, metas, delay);
                return;
            }
        };
        self.record_backoff.reset();
        announce_records(&self.inner, batch, metas, fenced);
    }

    fn dispatch(&mut self, c: Claimed) {
        self.inner.counters.started.fetch_add(1, Ordering::Relaxed);
        if self.inner.changes.receiver_count() > 0 {
            let procedure: Arc<str> = Arc::from(c.procedure.as_str());
            // The store may hand the task out before its submitter has heard that it is stored
            // (the claim commits first): then its `pending` goes out here, before `running`,
            // under the lock the submitter takes to send it (so only one of them does).
            let mut announcing = self.inner.announcing.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(procedure) = announcing.remove(&c.id) {
                let change = StatusChange {
                    id: c.id.clone(),
                    procedure,
                    status: Some(Status::Pending),
                    attempt: 0,
                    parent: c.parent.clone(),
                };
                let _ = self.inner.changes.send(change);
            }
            let change = StatusChange {
                id: c.id.clone(),
                procedure,
                status: Some(Status::Running),
                attempt: c.attempt,
                parent: c.parent.clone(),
            };
            let _ = self.inner.changes.send(change);
        }
        let (cancel_tx, cancel_rx) = oneshot::channel();
        self.cancels.insert(c.id.clone(), (c.lease, cancel_tx));
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let (id, lease) = (c.id.clone(), c.lease);
            let end = tokio::select! {
                end = attempt(&inner.engine, &c, inner.config.max_result_bytes) => end,
                // Cancelled (timeout, abort, shutdown): dropping the attempt drops its session,
                // which withdraws a queued call or sends the worker an error.
                _ = cancel_rx => return,
            };
            let _ = inner.events.send(Event::Ended { id, lease, end }).await;
        });
    }
}

/// Runs one attempt: the app event with the arguments as one chunk; the joined reply chunks
/// are the result (JSON when they parse, else a string).
async fn attempt(engine: &Engine, c: &Claimed, max_result: usize) -> AttemptEnd {
    run_attempt(engine, &c.app, &c.procedure, &c.args, max_result).await
}

/// Runs one attempt of `procedure` (`APP.EVENT`) of `app` on `engine`: the event with the
/// arguments as one chunk; the joined reply chunks are the result (JSON when they parse, else a
/// string). Dropping the future cancels the attempt (its session is withdrawn or the worker gets
/// an error). Used by the executor and by a worker node running its manager's tasks.
pub async fn run_attempt(engine: &Engine, app: &str, procedure: &str, args: &Json, max_result: usize) -> AttemptEnd {
    let event = procedure.strip_prefix(app).and_then(|r| r.strip_prefix('.')).unwrap_or(procedure);
    let mut session = match engine.invoke(app, event).await {
        Ok(s) => s,
        Err(EngineError::Rejected(r)) => return AttemptEnd::NotRun(r.to_string()),
        Err(e) => return AttemptEnd::NotRun(e.to_string()),
    };
    let args = Bytes::copy_from_slice(args.get().as_bytes());
    if let Err(e) = session.send(args).await {
        return session_end(e);
    }
    if let Err(e) = session.close().await {
        return session_end(e);
    }
    let mut body = Vec::new();
    loop {
        match session.recv().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > max_result {
                    return AttemptEnd::Failed(format!(
                        "the result is larger than {max_result} bytes (tasks.max_result_bytes)"
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => return session_end(e),
        }
    }
    AttemptEnd::Returned(result_json(&body))
}

fn session_end(e: SessionError) -> AttemptEnd {
    match e {
        SessionError::Worker { message, .. } => AttemptEnd::Failed(message),
        SessionError::WorkerFailed(m) => AttemptEnd::WorkerFailed(m),
        SessionError::Rejected(r @ (Rejection::QueueFull { .. } | Rejection::Busy { .. })) => {
            AttemptEnd::NotRun(r.to_string())
        }
        SessionError::Rejected(r) => AttemptEnd::NotRun(r.to_string()),
        SessionError::EngineGone => AttemptEnd::NotRun(e.to_string()),
        SessionError::Overflow(n) => {
            AttemptEnd::Failed(format!("the worker wrote more than {n} chunks; write the result in fewer chunks"))
        }
        SessionError::Closed => AttemptEnd::WorkerFailed(e.to_string()),
    }
}

/// The joined reply chunks as a result: compact JSON when they parse, else a JSON string.
pub fn result_json(body: &[u8]) -> Json {
    let value = match serde_json::from_slice::<Value>(body) {
        Ok(v) => v,
        Err(_) => Value::String(String::from_utf8_lossy(body).into_owned()),
    };
    serde_json::value::to_raw_value(&value).unwrap_or_else(|_| crate::task::json_null())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_are_json_when_they_parse_else_strings() {
        assert_eq!(result_json(b"{\"a\": [1, 2]}").get(), "{\"a\":[1,2]}");
        assert_eq!(result_json(b"3").get(), "3");
        assert_eq!(result_json(b"hello, world").get(), "\"hello, world\"");
        assert_eq!(result_json(b"").get(), "\"\"");
        assert_eq!(result_json(b"\xff\n").get(), "\"\u{fffd}\\n\"");
    }
}
