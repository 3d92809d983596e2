//! Tasks on a node: the built-in service `tasks` (the arpcp operations as node commands, so any
//! client of any node reaches them: `nodus call tasks ATASK procedure=procs.add args=[1,2]`), the
//! arpcp TCP listener (`[tasks] arpcp_listen`), and the executor that runs tasks on this node's
//! apps. The work is done by the `nodus-tasks` crate ([`nodus_tasks::Tasks`] over a SQLite store in
//! the data directory); this module mounts it.
//!
//! Procedures follow the deployed apps: the `apps` service tells this module of every app that
//! runs, stops or goes ([`AppChange`]); a running app's declared procedures are tasks and run on
//! its workers, a stopped app's are still accepted and wait in the store, a removed app's are
//! unknown (203).
//!
//! Commands (each needs the permission the router checks; `send` submits, `status` reads, `admin`
//! changes a task): `TASK` and `ATASK` (`procedure=APP.EVENT`, arguments as a JSON array in
//! `args=` or the payload, optional `key=`, `timeout_ms=`, `max_attempts=`, `pid=` the parent
//! task; the message's `_expires_at` is the task's deadline), `SUBMIT_MANY` (JSON lines), `GET
//! id=`, `WAIT id= [timeout_ms=]`, `LIST [status=] [procedure=] [parent=] [after=] [limit=]`, `COUNTS` (tasks in the store by status), `STATS` (what the service did since the
//! node started, with the latency histogram as `latency_le_ms=` bounds, `latency_counts=` per
//! bucket and `latency_sum_ms=`), `PROCEDURES`, `ID`, `SIGNAL id= status=`, `ABORT id=`, `WATCH [ttl_ms=]`
//! and `UNWATCH`. Replies carry `arpcp=<code>` (100, or the seed's code of the refusal); a refusal
//! is `ERROR code=<word>;arpcp=<code>;message=...`.
//!
//! Deadlines: a submission whose `_expires_at` has passed is refused `ERROR code=expired`; a
//! stored task not started by it never runs and ends `error` with kind `Expired`, and a `TASK`
//! waiting for it is answered `ERROR code=expired`. Subtasks: a task submitted with `pid=` is a
//! subtask of that task, drawn under it in the component tree while both run; `ABORT`, SIGNAL
//! `interrupted` and a control-plane kill of a task interrupt its subtasks too, at any depth.
//!
//! The service starts before any listener accepts; it opens the store and recovers on a task of
//! its own, and requests wait for that. A store that cannot be opened makes every request an
//! error (arpcp 300) while the node keeps running, and opening is retried with backoff; a store
//! that fails later answers 300 for what it cannot do.

use crate::apps::{AppChange, Follower};
use crate::config::Config;
use crate::router::ConnId;
use crate::server::{Outbound, Shared};
use nodus_control::{Component, ComponentId, ComponentKind};
use nodus_engine::manifest::Param;
use nodus_engine::Engine;
use nodus_tasks::arpcp::{Answer, Code, SignalStatus};
use nodus_tasks::executor::{Finished, StatusChange};
use nodus_tasks::notify::Target;
use nodus_tasks::store::{AnyStore, ListFilter, PgStore, StoreSpec};
use nodus_tasks::task::{ErrorKind, MAX_KEY_LEN};
use nodus_tasks::{
    ArpcpConfig, ArpcpServer, SqliteConfig, SqliteStore, Status, Submission, SubmitError, Task, TaskId, Tasks, UnixMs,
    Waited,
};
use nodus_wire::node::Permission;
use nodus_wire::{Backoff, Message};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, oneshot, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// The store backend the node runs on.
/// The node's task store: SQLite in the data directory, or a shared PostgreSQL database
/// (`[tasks] store`).
pub(crate) type TaskStore = AnyStore;

/// The built-in service's name.
pub const TASKS_SERVICE: &str = "tasks";
/// App changes waiting for this module (the `apps` service waits when it is full).
const APP_CHANGES: usize = 256;
/// Requests taken off the service's queue at a time; the `ATASK`s among them are stored with one
/// store operation.
const BATCH: usize = 512;
/// Batches of submissions being stored at once; the service waits for one to finish beyond.
const MAX_SUBMIT_BATCHES: usize = 64;
/// Read-only requests answered at once; the service waits for one to finish beyond.
const MAX_QUERIES: usize = 256;
/// Most tasks in one `SUBMIT_MANY`.
pub const MAX_SUBMIT_MANY: usize = 10_000;
/// Default and largest `LIST` page.
const LIST_DEFAULT: usize = 100;
/// See [`LIST_DEFAULT`].
const LIST_MAX: usize = 1000;
/// Default and longest `WAIT`.
const WAIT_DEFAULT: Duration = Duration::from_secs(30);
/// See [`WAIT_DEFAULT`].
const WAIT_MAX: Duration = Duration::from_secs(120);
/// Default and longest life of a `WATCH` subscription (renew it before it ends).
const WATCH_TTL_DEFAULT: Duration = Duration::from_secs(60);
/// See [`WATCH_TTL_DEFAULT`].
const WATCH_TTL_MAX: Duration = Duration::from_secs(3600);
/// arpcp clients answered 300 at once while the store is not open.
const ARPCP_REFUSALS: usize = 64;

/// The commands of the `tasks` service and the permission each needs.
pub const COMMANDS: [(&str, Permission); 14] = [
    ("TASK", Permission::Send),
    ("ATASK", Permission::Send),
    ("SUBMIT_MANY", Permission::Send),
    ("GET", Permission::Status),
    ("WAIT", Permission::Status),
    ("LIST", Permission::Status),
    ("COUNTS", Permission::Status),
    ("STATS", Permission::Status),
    ("PROCEDURES", Permission::Status),
    ("ID", Permission::Status),
    ("WATCH", Permission::Status),
    ("UNWATCH", Permission::Status),
    ("SIGNAL", Permission::Admin),
    ("ABORT", Permission::Admin),
];

/// Where the task service stands.
#[derive(Clone)]
enum State {
    /// Opening the store and recovering.
    Starting,
    /// Serving.
    Ready(Tasks<TaskStore>),
    /// The store cannot be opened (why); opening is retried.
    Failed(String),
    /// Shut down.
    Stopped,
}

/// The mounted task service: what [`TaskService::shutdown`] stops.
pub(crate) struct TaskService {
    mount: Arc<Mount>,
    stop: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
}

/// The shared state of the service's tasks.
struct Mount {
    shared: Arc<Shared>,
    conn: ConnId,
    engine: Engine,
    config: Config,
    state: watch::Sender<State>,
    /// The service once its store is open and recovered; it serves once it also knows the apps.
    opened: watch::Sender<Option<Tasks<TaskStore>>>,
    /// `TASK` and `WAIT` requests waiting at once (`max_waiting`).
    waiting: Arc<Semaphore>,
    watchers: Mutex<Watchers>,
    /// `TASK_STATUS` messages a service target or a watcher could not take (logged at powers of
    /// two).
    undelivered: std::sync::atomic::AtomicU64,
    /// The `taskcluster` service, until its driver takes it once the store is open.
    cluster: Mutex<Option<(ConnId, mpsc::Receiver<Outbound>)>>,
    /// Stops the service's own tasks.
    stop: CancellationToken,
    /// Aborted tasks, for a manager to stop them on their workers (`TasksAbort`).
    aborted: mpsc::Sender<TaskId>,
    /// See `aborted`; taken by the cluster driver.
    aborted_rx: Mutex<Option<mpsc::Receiver<TaskId>>>,
}

/// A subscriber of `WATCH`: a service somewhere in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Watcher {
    server: String,
    service: String,
    until: tokio::time::Instant,
}

#[derive(Default)]
struct Watchers {
    list: Vec<Watcher>,
    /// The task forwarding changes to the watchers and the notify service, while there is one.
    forwarding: bool,
}

impl TaskService {
    /// Registers the `tasks` service (before any listener accepts), then opens the store, recovers
    /// and serves on tasks of its own, and serves arpcp on `arpcp` when given. Returns the queue
    /// on which the `apps` service tells it of app changes.
    pub(crate) fn start(shared: Arc<Shared>, engine: Engine, arpcp: Option<TcpListener>) -> (TaskService, Follower) {
        let config = shared.config().clone();
        let (conn, rx) = shared.attach_with(TASKS_SERVICE, Some(&COMMANDS));
        let cluster = crate::taskcluster::attach(&shared);
        let (aborted, aborted_rx) = mpsc::channel(crate::taskcluster::ABORTS);
        let (state, _) = watch::channel(State::Starting);
        let stop = CancellationToken::new();
        let mount = Arc::new(Mount {
            shared,
            conn,
            engine,
            waiting: Arc::new(Semaphore::new(config.tasks.max_waiting)),
            config,
            state,
            opened: watch::channel(None).0,
            watchers: Mutex::default(),
            undelivered: Default::default(),
            cluster: Mutex::new(Some(cluster)),
            stop: stop.clone(),
            aborted,
            aborted_rx: Mutex::new(Some(aborted_rx)),
        });
        let manager = mount.config.tasks.role == "manager";
        let running = Arc::new(RunningTasks::new(&mount.config.server_name, manager.then(|| mount.aborted.clone())));
        mount.shared.add_component_source(running.clone());
        let (changes_tx, changes_rx) = mpsc::channel(APP_CHANGES);
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(mount.clone().open(stop.clone()));
        tasks.spawn(running.follow(mount.opened.subscribe()));
        tasks.spawn(mount.clone().serve(rx));
        tasks.spawn(mount.clone().follow_apps(changes_rx));
        if let Some(listener) = arpcp {
            tasks.spawn(mount.clone().arpcp(listener, stop.clone()));
        }
        (TaskService { mount, stop, tasks }, changes_tx)
    }

    /// Stops the arpcp listener, lets running tasks finish for up to the node's shutdown grace
    /// (what still runs then runs again after the next start), closes the store and removes the
    /// service.
    pub(crate) async fn shutdown(mut self) {
        self.stop.cancel();
        self.mount.state.send_replace(State::Stopped);
        // The arpcp listener finishes the connections it serves, each within its timeouts.
        let grace = Duration::from_secs(self.mount.config.limits.shutdown_grace_secs);
        if let Some(tasks) = self.mount.opened.send_replace(None) {
            tasks.shutdown(grace).await;
            tasks.store().close().await;
        }
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        let cluster = self.mount.cluster.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((conn, _)) = cluster {
            self.mount.shared.detach(conn);
        }
        self.mount.shared.detach(self.mount.conn);
    }
}

impl Mount {
    /// The task service once the store is open: `Err` with why it cannot serve.
    async fn ready(&self) -> Result<Tasks<TaskStore>, String> {
        let mut rx = self.state.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                State::Ready(t) => return Ok(t.clone()),
                State::Failed(why) => return Err(why.clone()),
                State::Stopped => return Err("the node is shutting down; submit again later".into()),
                State::Starting => {}
            }
            if rx.changed().await.is_err() {
                return Err("the node is shutting down".into());
            }
        }
    }

    /// Opens the store and starts the executor; on failure says why (every request gets it) and
    /// tries again with backoff.
    async fn open(self: Arc<Self>, stop: CancellationToken) {
        let c = &self.config.tasks;
        let node = self.config.server_name.clone();
        let mut sqlite = SqliteConfig::new(crate::config::TasksConfig::sqlite_path(&self.config.data_dir));
        sqlite.synchronous = c.synchronous.parse().unwrap_or_default();
        sqlite.result_ttl = Duration::from_secs(c.result_ttl_secs);
        sqlite.max_bytes = c.max_store_bytes;
        let mut tc = nodus_tasks::TasksConfig::new(node);
        tc.default_timeout = Duration::from_secs(c.default_timeout_secs);
        tc.max_timeout = Duration::from_secs(c.max_timeout_secs);
        tc.max_attempts = c.max_attempts;
        tc.max_args_bytes = c.max_args_bytes;
        tc.max_result_bytes = c.max_result_bytes;
        tc.max_inflight_per_app = c.max_inflight_per_app;
        tc.sched.retry_min = Duration::from_millis(c.retry_min_ms);
        tc.sched.retry_max = Duration::from_millis(c.retry_max_ms);
        // Validated with the config: a bad spec never reaches here.
        let spec: StoreSpec = c.store.parse().unwrap_or_default();
        let path = match &spec {
            StoreSpec::Sqlite => sqlite.path.display().to_string(),
            pg => pg.to_string(),
        };
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60), rand::random());
        loop {
            let opened = match &spec {
                StoreSpec::Sqlite => {
                    let sqlite = sqlite.clone();
                    tokio::task::spawn_blocking(move || SqliteStore::open(sqlite).map(AnyStore::Sqlite)).await
                }
                StoreSpec::Postgres(pg) => {
                    let mut pg = pg.clone();
                    pg.result_ttl = Duration::from_secs(c.result_ttl_secs);
                    Ok(PgStore::open(pg).await.map(AnyStore::Postgres))
                }
            };
            let started = match opened {
                Ok(Ok(store)) => match Tasks::start(store.clone(), self.engine.clone(), tc.clone()).await {
                    Ok(t) => Ok(t),
                    Err(e) => {
                        store.close().await;
                        Err(e.to_string())
                    }
                },
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(format!("opening the store failed: {e}")),
            };
            match started {
                Ok(tasks) => {
                    if stop.is_cancelled() {
                        tasks.shutdown(Duration::ZERO).await;
                        tasks.store().close().await;
                        return;
                    }
                    info!(store = %path, "task store open");
                    self.shared.flags().lower_own("tasks", "store-failure").await;
                    self.opened.send_replace(Some(tasks));
                    return;
                }
                Err(why) => {
                    let delay = backoff.next_delay();
                    error!(store = %path, error = %why, ?delay, "the task store cannot be opened; tasks are unavailable, retrying");
                    let why = format!("the task store {path} cannot be opened: {why}");
                    self.shared.flags().raise_own("tasks", "store-failure", why.clone(), 80, &[]).await;
                    self.state.send_if_modified(|s| {
                        if matches!(s, State::Stopped) {
                            return false;
                        }
                        *s = State::Failed(why);
                        true
                    });
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// A task was aborted or signaled: a manager stops it on its worker. When the queue is full
    /// the worker finishes it, and its completion is discarded (the task is no longer running).
    fn tell_aborted(&self, id: &TaskId) {
        if self.config.tasks.role == "manager" && self.aborted.try_send(id.clone()).is_err() {
            warn!(task = %id, "too many aborts at once: the task's worker is not told, its late result will be discarded");
        }
    }

    /// Starts this node's side of tasks across nodes (the `taskcluster` service).
    fn start_cluster(self: &Arc<Self>, tasks: &Tasks<TaskStore>) {
        let Some((conn, rx)) = self.cluster.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
        let Some(aborted) = self.aborted_rx.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
        let (shared, engine, tasks, stop) =
            (self.shared.clone(), self.engine.clone(), tasks.clone(), self.stop.clone());
        tokio::spawn(async move {
            let (driver, events) = crate::taskcluster::Driver::start(shared, conn, engine, tasks).await;
            driver.run(rx, events, aborted, stop).await;
        });
    }

    /// Starts the configured `TASK_STATUS` notifications.
    fn start_notifications(self: &Arc<Self>, tasks: &Tasks<TaskStore>) {
        match self.config.tasks.notify.parse::<Target>() {
            Ok(Target::AppEvent { app, event }) => {
                info!(%app, %event, "TASK_STATUS notifications go to an app event");
                tokio::spawn(nodus_tasks::notify::forward_to_app(tasks.clone(), self.engine.clone(), app, event));
            }
            Ok(Target::Service(name)) => {
                info!(service = %name, "TASK_STATUS notifications go to a service");
                let mut w = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
                self.ensure_forwarding(&mut w, tasks);
            }
            Err(_) => {}
        }
    }

    /// Keeps the task service's procedures in step with the deployed apps, and makes it serve
    /// once its store is open and it knows every app stored on the node (so a task for a
    /// deployed app is never refused as unknown at the node's start). Each change is applied
    /// before the `apps` service hears it was.
    async fn follow_apps(self: Arc<Self>, mut changes: mpsc::Receiver<(AppChange, oneshot::Sender<()>)>) {
        let mut apps: BTreeMap<String, Option<AppProcedures>> = BTreeMap::new();
        let mut opened = self.opened.subscribe();
        let mut listed = false;
        let mut serving: Option<Tasks<TaskStore>> = None;
        loop {
            tokio::select! {
                told = changes.recv() => {
                    let Some((change, done)) = told else { return };
                    let update = match change {
                        AppChange::Running(spec) => {
                            let p = &spec.profile;
                            let limit = p.pool_limit.saturating_mul(p.concurrency).saturating_add(p.queue_limit);
                            // A manager's tasks run on its workers, not here.
                            let limit = (self.config.tasks.role != "manager").then_some(limit);
                            Some((spec.name.clone(), Some((spec.manifest.procedures.clone(), limit))))
                        }
                        AppChange::Stopped(spec) => Some((spec.name.clone(), Some((spec.manifest.procedures.clone(), None)))),
                        AppChange::Removed(name) => Some((name, None)),
                        AppChange::Listed => {
                            listed = true;
                            None
                        }
                    };
                    if let Some((name, now)) = update {
                        if let Some(t) = &serving {
                            apply(t, &name, &now).await;
                        }
                        apps.insert(name, now);
                    }
                    let _ = done.send(());
                }
                changed = opened.changed(), if serving.is_none() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
            if serving.is_some() || !listed {
                continue;
            }
            let Some(tasks) = opened.borrow_and_update().clone() else { continue };
            for (name, now) in &apps {
                apply(&tasks, name, now).await;
            }
            let published = self.state.send_if_modified(|s| {
                if matches!(s, State::Stopped) {
                    return false;
                }
                *s = State::Ready(tasks.clone());
                true
            });
            if !published {
                return;
            }
            info!("task service ready");
            self.start_notifications(&tasks);
            self.start_cluster(&tasks);
            serving = Some(tasks);
        }
    }

    /// Takes requests off the service's queue: `ATASK`s of one batch are stored with one store
    /// operation, the other requests are answered on tasks of their own (bounded).
    async fn serve(self: Arc<Self>, mut rx: mpsc::Receiver<Outbound>) {
        let submits = Arc::new(Semaphore::new(MAX_SUBMIT_BATCHES));
        let queries = Arc::new(Semaphore::new(MAX_QUERIES));
        let mut batch = Vec::with_capacity(BATCH);
        while rx.recv_many(&mut batch, BATCH).await > 0 {
            let tasks = self.ready().await;
            let mut atasks: Vec<(Message, Submission)> = Vec::new();
            for out in batch.drain(..) {
                let Outbound::Msg(req, _) = out else { continue };
                if !is_request(&req) {
                    self.undeliverable(&req);
                    continue;
                }
                let tasks = match &tasks {
                    Ok(t) => t.clone(),
                    Err(why) => {
                        self.answer(&req, Err(Refusal::new(Code::Internal, why.clone())));
                        continue;
                    }
                };
                let command = match Command::parse(&req) {
                    Ok(c) => c,
                    Err(e) => {
                        self.answer(&req, Err(e));
                        continue;
                    }
                };
                match command {
                    Command::Atask(s) => atasks.push((req, s)),
                    Command::Task(_) | Command::Wait { .. } => {
                        let Ok(permit) = self.waiting.clone().try_acquire_owned() else {
                            let text = format!(
                                "{} requests already wait for tasks to finish (tasks.max_waiting); submit with ATASK and GET it later",
                                self.config.tasks.max_waiting
                            );
                            self.answer(&req, Err(Refusal::new(Code::Internal, text)));
                            continue;
                        };
                        let mount = self.clone();
                        tokio::spawn(async move {
                            let answer = mount.execute(&tasks, &req, command).await;
                            mount.answer(&req, answer);
                            drop(permit);
                        });
                    }
                    command => {
                        let Ok(permit) = queries.clone().acquire_owned().await else { return };
                        let mount = self.clone();
                        tokio::spawn(async move {
                            let answer = mount.execute(&tasks, &req, command).await;
                            mount.answer(&req, answer);
                            drop(permit);
                        });
                    }
                }
            }
            if atasks.is_empty() {
                continue;
            }
            let Ok(tasks) = tasks else { continue };
            let Ok(permit) = submits.clone().acquire_owned().await else { return };
            let mount = self.clone();
            tokio::spawn(async move {
                let (reqs, subs): (Vec<Message>, Vec<Submission>) = atasks.into_iter().unzip();
                match tasks.submit_many(subs).await {
                    Ok(results) => {
                        for (req, r) in reqs.iter().zip(results) {
                            let answer = r.map_err(Refusal::from).map(|s| {
                                req.reply("SUBMITTED")
                                    .param("id", &s.id)
                                    .param("existing", s.existing)
                                    .param("arpcp", 100)
                            });
                            mount.answer(req, answer);
                        }
                    }
                    Err(e) => {
                        let refusal = Refusal::from(e);
                        for req in &reqs {
                            mount.answer(req, Err(refusal.clone()));
                        }
                    }
                }
                drop(permit);
            });
        }
    }

    /// Sends the answer to a request that has an id; a message without one is never answered.
    fn answer(&self, req: &Message, answer: Result<Message, Refusal>) {
        if req.envelope.id == 0 {
            if let Err(e) = answer {
                debug!(command = %req.command, error = %e.message, "tasks command without _id refused");
            }
            return;
        }
        let reply = answer.unwrap_or_else(|e| {
            let mut m = req
                .reply("ERROR")
                .param("code", e.word())
                .param("arpcp", e.code.as_u16())
                .param("command", &req.command)
                .param("message", &e.message);
            if let Some(id) = &e.id {
                m = m.param("id", id);
            }
            m
        });
        self.shared.inject(self.conn, reply);
    }

    /// An answer to something this service sent: a `TASK_STATUS` nobody took ends its watcher.
    fn undeliverable(&self, m: &Message) {
        if m.get("command") != Some("TASK_STATUS") {
            return;
        }
        if let Some(service) = m.get("destination_service") {
            let mut w = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
            let before = w.list.len();
            w.list.retain(|x| x.service != service);
            if w.list.len() < before {
                debug!(%service, "a task watcher is gone");
            }
        }
        let n = self.undelivered.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            warn!(
                undelivered = n,
                to = m.get("destination_service").unwrap_or(""),
                "TASK_STATUS notifications not delivered"
            );
        }
    }

    async fn execute(
        self: &Arc<Self>,
        tasks: &Tasks<TaskStore>,
        req: &Message,
        c: Command,
    ) -> Result<Message, Refusal> {
        Ok(match c {
            Command::Atask(s) => {
                let s = tasks.submit(s).await?;
                req.reply("SUBMITTED").param("id", &s.id).param("existing", s.existing).param("arpcp", 100)
            }
            Command::Task(s) => {
                let (id, waited) = tasks.run(s).await?;
                match waited {
                    Waited::Finished(Finished { error: Some(e), .. }) if e.kind == ErrorKind::Expired => {
                        // Never executed: the sender hears it as every expired message's sender does.
                        let mut r = Refusal::new(Code::ProcedureFailed, e.message).with_id(&id);
                        r.word = Some(nodus_control::expiry::EXPIRED_CODE);
                        return Err(r);
                    }
                    Waited::Finished(f) => {
                        let task = tasks.get(&id).await.ok().flatten();
                        task_reply(req, &id, task.as_ref(), Some(&f))
                    }
                    Waited::NotYet(s) => {
                        return Err(Refusal::new(
                            Code::Internal,
                            format!("task {id} is still {s} after its timeout; it stays stored: GET it later"),
                        )
                        .with_id(&id))
                    }
                    Waited::Unknown => {
                        return Err(
                            Refusal::new(Code::Internal, format!("task {id} was deleted while it ran")).with_id(&id)
                        )
                    }
                }
            }
            Command::SubmitMany(lines) => {
                let mut slots: Vec<Result<usize, Refusal>> = Vec::with_capacity(lines.len());
                let mut subs = Vec::new();
                for line in lines {
                    match line {
                        Ok(s) => {
                            slots.push(Ok(subs.len()));
                            subs.push(s);
                        }
                        Err(e) => slots.push(Err(e)),
                    }
                }
                let mut results: Vec<Option<Result<nodus_tasks::task::Submitted, SubmitError>>> =
                    tasks.submit_many(subs).await?.into_iter().map(Some).collect();
                let (mut accepted, mut existing, mut refused) = (0, 0, 0);
                let mut body = Vec::new();
                for slot in slots {
                    let line = match slot
                        .and_then(|i| results[i].take().expect("one result per submission").map_err(Refusal::from))
                    {
                        Ok(s) => {
                            if s.existing {
                                existing += 1;
                            } else {
                                accepted += 1;
                            }
                            json!({"id": s.id, "existing": s.existing})
                        }
                        Err(e) => {
                            refused += 1;
                            json!({"error": e.message, "code": e.word(), "arpcp": e.code.as_u16()})
                        }
                    };
                    serde_json::to_writer(&mut body, &line).expect("JSON to a Vec");
                    body.push(b'\n');
                }
                req.reply("SUBMITTED_MANY")
                    .param("count", accepted + existing + refused)
                    .param("accepted", accepted)
                    .param("existing", existing)
                    .param("refused", refused)
                    .param("arpcp", 100)
                    .with_payload(body)
            }
            Command::Get(id) => match tasks.get(&id).await.map_err(Refusal::store)? {
                Some(t) => task_reply(req, &id, Some(&t), None),
                None => return Err(Refusal::unknown(&id)),
            },
            Command::Wait { id, timeout } => match tasks.wait(&id, timeout).await.map_err(Refusal::store)? {
                Waited::Unknown => return Err(Refusal::unknown(&id)),
                Waited::Finished(f) => {
                    let task = tasks.get(&id).await.ok().flatten();
                    task_reply(req, &id, task.as_ref(), Some(&f))
                }
                Waited::NotYet(_) => match tasks.get(&id).await.map_err(Refusal::store)? {
                    Some(t) => task_reply(req, &id, Some(&t), None),
                    None => return Err(Refusal::unknown(&id)),
                },
            },
            Command::List(filter) => {
                let limit = filter.limit;
                let list = tasks.list(filter).await.map_err(Refusal::store)?;
                let mut body = Vec::new();
                for t in &list {
                    serde_json::to_writer(&mut body, &task_json(t, false)).expect("JSON to a Vec");
                    body.push(b'\n');
                }
                let mut reply = req.reply("TASKS").param("count", list.len()).param("arpcp", 100);
                if list.len() == limit {
                    if let Some(last) = list.last() {
                        reply = reply.param("next", &last.id);
                    }
                }
                reply.with_payload(body)
            }
            Command::Counts => {
                let c = tasks.counts().await.map_err(Refusal::store)?;
                req.reply("COUNTS")
                    .param("pending", c.pending)
                    .param("running", c.running)
                    .param("done", c.done)
                    .param("error", c.error)
                    .param("interrupted", c.interrupted)
                    .param("arpcp", 100)
            }
            Command::Stats => {
                let s = tasks.stats();
                req.reply("STATS")
                    .param("submitted", s.submitted)
                    .param("started", s.started)
                    .param("done", s.done)
                    .param("failed", s.failed)
                    .param("retried", s.retried)
                    .param("released", s.released)
                    .param("stale", s.stale)
                    .param("record_retries", s.record_retries)
                    .param("expired", s.expired)
                    .param("latency_le_ms", join(&nodus_tasks::executor::LATENCY_BUCKETS_MS))
                    .param("latency_counts", join(&s.latency.counts))
                    .param("latency_sum_ms", s.latency.sum_ms)
                    .param("arpcp", 100)
            }
            Command::Procedures => {
                let procs = tasks.procedures();
                let list: Vec<Value> = procs
                    .iter()
                    .map(|p| {
                        let params: Vec<String> = p
                            .params
                            .iter()
                            .map(|x| match x.ty {
                                Some(t) => format!("{}:{}", x.name, t.name()),
                                None => x.name.clone(),
                            })
                            .collect();
                        json!({"name": p.name, "app": p.app, "event": p.event, "params": params, "signature": p.signature()})
                    })
                    .collect();
                let names: Vec<&str> = procs.iter().map(|p| p.name.as_str()).collect();
                req.reply("PROCEDURES")
                    .param("count", procs.len())
                    .param("list", names.join(","))
                    .param("arpcp", 100)
                    .with_payload(serde_json::to_vec(&list).expect("JSON to a Vec"))
            }
            Command::Id => req.reply("ID").param("id", tasks.node()).param("arpcp", 100),
            Command::Signal { id, status: SignalStatus::Interrupted } => {
                match tasks.kill(&id).await.map_err(Refusal::store)? {
                    Some(killed) => {
                        self.tell_aborted(&id);
                        for sub in &killed.subtasks {
                            self.tell_aborted(sub);
                        }
                        req.reply("SIGNALED")
                            .param("id", &id)
                            .param("status", SignalStatus::Interrupted.name())
                            .param("before", killed.before)
                            .param("subtasks", killed.subtasks.len())
                            .param("arpcp", 100)
                    }
                    None => return Err(Refusal::unknown(&id)),
                }
            }
            Command::Signal { id, status } => match tasks.signal(&id, status).await.map_err(Refusal::store)? {
                Some(before) => {
                    self.tell_aborted(&id);
                    req.reply("SIGNALED")
                        .param("id", &id)
                        .param("status", status.name())
                        .param("before", before)
                        .param("arpcp", 100)
                }
                None => return Err(Refusal::unknown(&id)),
            },
            Command::Abort(id) => match tasks.kill(&id).await.map_err(Refusal::store)? {
                Some(killed) => {
                    self.tell_aborted(&id);
                    for sub in &killed.subtasks {
                        self.tell_aborted(sub);
                    }
                    req.reply("ABORTED")
                        .param("id", &id)
                        .param("before", killed.before)
                        .param("subtasks", killed.subtasks.len())
                        .param("arpcp", 100)
                }
                None => return Err(Refusal::unknown(&id)),
            },
            Command::Watch { ttl } => {
                if req.from.service.is_empty() {
                    return Err(Refusal::new(
                        Code::Malformed,
                        "WATCH sends TASK_STATUS messages to the watcher's service: register a service name first",
                    ));
                }
                let until = tokio::time::Instant::now() + ttl;
                let mut w = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
                let (server, service) = (req.from.server.clone(), req.from.service.clone());
                let now = tokio::time::Instant::now();
                w.list.retain(|x| x.until > now && !(x.server == server && x.service == service));
                if w.list.len() >= self.config.tasks.max_watchers {
                    return Err(Refusal::new(
                        Code::Internal,
                        format!("{} watchers already (tasks.max_watchers)", self.config.tasks.max_watchers),
                    ));
                }
                w.list.push(Watcher { server, service, until });
                let count = w.list.len();
                self.ensure_forwarding(&mut w, tasks);
                req.reply("WATCHING").param("ttl_ms", ttl.as_millis()).param("watchers", count).param("arpcp", 100)
            }
            Command::Unwatch => {
                let mut w = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
                w.list.retain(|x| !(x.server == req.from.server && x.service == req.from.service));
                req.reply("UNWATCHED").param("arpcp", 100)
            }
        })
    }

    /// Starts forwarding status changes unless it runs (call with the watchers locked).
    fn ensure_forwarding(self: &Arc<Self>, w: &mut Watchers, tasks: &Tasks<TaskStore>) {
        if w.forwarding {
            return;
        }
        w.forwarding = true;
        // Subscribed here, under the lock: no change after this WATCH is missed.
        let changes = tasks.watch();
        tokio::spawn(self.clone().forward(changes));
    }

    /// Sends every status change as `TASK_STATUS` to the notify service and the watchers; ends
    /// when neither is left (so that, with nobody watching, the executor does no work for it).
    async fn forward(self: Arc<Self>, mut changes: broadcast::Receiver<StatusChange>) {
        let service = match self.config.tasks.notify.parse::<Target>() {
            Ok(Target::Service(name)) => Some(name),
            _ => None,
        };
        loop {
            let change = match changes.recv().await {
                Ok(c) => c,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    warn!(missed = n, "TASK_STATUS notifications missed: the watchers are slower than the changes");
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => break,
            };
            let targets: Vec<(String, String)> = {
                let mut w = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
                let now = tokio::time::Instant::now();
                w.list.retain(|x| x.until > now);
                if w.list.is_empty() && service.is_none() {
                    w.forwarding = false;
                    return;
                }
                w.list.iter().map(|x| (x.server.clone(), x.service.clone())).collect()
            };
            let base = Message::new("TASK_STATUS")
                .param("id", &change.id)
                .param("procedure", &*change.procedure)
                .param("status", change.status_name())
                .param("attempt", change.attempt);
            if let Some(s) = &service {
                self.shared.inject(self.conn, base.clone().to(s));
            }
            for (server, svc) in targets {
                let mut m = base.clone().to(&svc);
                m.to.server = server;
                self.shared.inject(self.conn, m);
            }
        }
        self.watchers.lock().unwrap_or_else(|e| e.into_inner()).forwarding = false;
    }

    /// Serves arpcp on `listener`: while the store is not open every client gets 300, then the
    /// crate's server takes over until the node stops.
    async fn arpcp(self: Arc<Self>, listener: TcpListener, stop: CancellationToken) {
        let c = &self.config.tasks;
        let config = ArpcpConfig {
            allow: c.arpcp_allow.iter().filter_map(|n| n.parse().ok()).collect(),
            max_line_bytes: c.arpcp_max_line_bytes,
            read_timeout: Duration::from_millis(c.arpcp_read_timeout_ms),
            max_connections: c.arpcp_max_connections,
            ..ArpcpConfig::default()
        };
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "listening for arpcp");
        }
        let refusals = Arc::new(Semaphore::new(ARPCP_REFUSALS));
        let mut state = self.state.subscribe();
        let tasks = loop {
            let current = state.borrow_and_update().clone();
            match current {
                State::Ready(t) => break t,
                State::Stopped => return,
                State::Starting | State::Failed(_) => {}
            }
            let why = match &current {
                State::Failed(why) => why.clone(),
                _ => "the task service is starting; retry shortly".to_string(),
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = state.changed() => if changed.is_err() { return },
                accepted = listener.accept(), if matches!(current, State::Failed(_)) => {
                    let Ok((stream, peer)) = accepted else { continue };
                    if !allowed(&config, peer.ip()) {
                        continue;
                    }
                    let Ok(permit) = refusals.clone().try_acquire_owned() else { continue };
                    tokio::spawn(async move {
                        refuse(stream, Answer::error(Code::Internal, why)).await;
                        drop(permit);
                    });
                }
            }
        };
        let server = match ArpcpServer::new(listener, tasks, config) {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "the arpcp listener cannot serve");
                return;
            }
        };
        server.run(stop.cancelled_owned()).await;
    }
}

/// A deployed app's procedures, and how many of its tasks may run at once while it runs
/// (`None`: it does not run).
type AppProcedures = (BTreeMap<String, Vec<Param>>, Option<usize>);

/// Applies an app's state to the task service (`None`: the app is gone).
async fn apply(tasks: &Tasks<TaskStore>, app: &str, now: &Option<AppProcedures>) {
    match now {
        Some((procedures, limit)) => {
            if let Err(e) = tasks.set_app(app, procedures, *limit).await {
                warn!(%app, error = %e, "the app's procedures are not tasks");
            }
        }
        None => tasks.remove_app(app).await,
    }
}

fn allowed(config: &ArpcpConfig, ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    ip.is_loopback() || config.allow.iter().any(|n| n.contains(ip))
}

/// Answers an arpcp client at once and closes, reading what it still sends for up to a second
/// so that closing does not reset the connection before it read the answer.
async fn refuse(mut stream: tokio::net::TcpStream, answer: Answer) {
    let mut out = Vec::with_capacity(160);
    answer.encode(&mut out);
    let written = tokio::time::timeout(Duration::from_secs(5), async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    })
    .await;
    if matches!(written, Ok(Ok(()))) {
        let mut sink = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Ok(n) = stream.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }
}

/// What the service acts on: requests, not replies, errors or the node's notices.
fn is_request(m: &Message) -> bool {
    nodus_wire::node::answerable(m) && !matches!(m.command.as_str(), "HELP" | "READY" | "STATUS")
}

/// A request refused: the arpcp code and what was wrong.
#[derive(Debug, Clone)]
struct Refusal {
    code: Code,
    message: String,
    id: Option<TaskId>,
    /// The `code=` word when it is not the arpcp code's (`expired`).
    word: Option<&'static str>,
}

impl Refusal {
    fn new(code: Code, message: impl Into<String>) -> Refusal {
        Refusal { code, message: message.into(), id: None, word: None }
    }

    fn with_id(mut self, id: &TaskId) -> Refusal {
        self.id = Some(id.clone());
        self
    }

    fn unknown(id: &TaskId) -> Refusal {
        Refusal::new(Code::UnknownTask, format!("no task {id} (unknown, deleted, or its result expired)"))
    }

    fn store(e: nodus_tasks::StoreError) -> Refusal {
        Refusal::new(Code::Internal, e.to_string())
    }

    /// The stable `code=` word of the `ERROR` reply.
    fn word(&self) -> &'static str {
        if let Some(w) = self.word {
            return w;
        }
        match self.code {
            Code::Malformed | Code::MissingField | Code::UnknownMethod | Code::Version => "invalid",
            Code::UnknownProcedure => "unknown_procedure",
            Code::BadArguments => "bad_arguments",
            Code::UnknownTask => "unknown_task",
            Code::Internal => "unavailable",
            Code::ProcedureFailed => "failed",
            Code::Ok => "ok",
        }
    }
}

impl From<SubmitError> for Refusal {
    fn from(e: SubmitError) -> Refusal {
        let mut r = Refusal::new(e.code(), e.to_string());
        if matches!(e, SubmitError::Expired(_)) {
            r.word = Some(nodus_control::expiry::EXPIRED_CODE);
        }
        r
    }
}

/// A request to the `tasks` service, parsed once.
#[derive(Debug)]
enum Command {
    Task(Submission),
    Atask(Submission),
    SubmitMany(Vec<Result<Submission, Refusal>>),
    Get(TaskId),
    Wait { id: TaskId, timeout: Duration },
    List(ListFilter),
    Counts,
    Stats,
    Procedures,
    Id,
    Signal { id: TaskId, status: SignalStatus },
    Abort(TaskId),
    Watch { ttl: Duration },
    Unwatch,
}

impl Command {
    fn parse(req: &Message) -> Result<Command, Refusal> {
        let id = || -> Result<TaskId, Refusal> {
            let v = req
                .get("id")
                .ok_or_else(|| Refusal::new(Code::MissingField, format!("{} needs id=TASK_ID", req.command)))?;
            v.parse().map_err(|_| Refusal::new(Code::UnknownTask, format!("{v:?} is not a task id")))
        };
        let millis = |key: &str| -> Result<Option<Duration>, Refusal> {
            req.get(key)
                .map(|v| {
                    v.parse::<u64>().map(Duration::from_millis).map_err(|_| {
                        Refusal::new(Code::Malformed, format!("{key}={v:?} is not a number of milliseconds"))
                    })
                })
                .transpose()
        };
        Ok(match req.command.as_str() {
            "TASK" => Command::Task(submission_of(req)?),
            "ATASK" => Command::Atask(submission_of(req)?),
            "SUBMIT_MANY" => {
                let text = std::str::from_utf8(&req.payload).map_err(|_| {
                    Refusal::new(Code::Malformed, "SUBMIT_MANY takes JSON lines (UTF-8) as its payload")
                })?;
                let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
                if lines.len() > MAX_SUBMIT_MANY {
                    return Err(Refusal::new(
                        Code::Malformed,
                        format!("SUBMIT_MANY takes at most {MAX_SUBMIT_MANY} tasks, got {}", lines.len()),
                    ));
                }
                let deadline = deadline_of(req);
                Command::SubmitMany(
                    lines
                        .into_iter()
                        .map(|l| {
                            submission_line(l).map(|mut s| {
                                s.deadline = s.deadline.or(deadline);
                                s
                            })
                        })
                        .collect(),
                )
            }
            "GET" => Command::Get(id()?),
            "WAIT" => Command::Wait { id: id()?, timeout: millis("timeout_ms")?.unwrap_or(WAIT_DEFAULT).min(WAIT_MAX) },
            "LIST" => {
                let status = match req.get("status") {
                    Some(s) => Some(s.parse::<Status>().map_err(|e| Refusal::new(Code::Malformed, e.to_string()))?),
                    None => None,
                };
                let after = match req.get("after") {
                    Some(a) => Some(
                        a.parse()
                            .map_err(|_| Refusal::new(Code::Malformed, format!("after={a:?} is not a task id")))?,
                    ),
                    None => None,
                };
                let limit = match req.get("limit") {
                    Some(l) => l
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=LIST_MAX).contains(n))
                        .ok_or_else(|| Refusal::new(Code::Malformed, format!("limit is 1 to {LIST_MAX}")))?,
                    None => LIST_DEFAULT,
                };
                let parent = match req.get("parent") {
                    Some(p) => Some(
                        p.parse()
                            .map_err(|_| Refusal::new(Code::Malformed, format!("parent={p:?} is not a task id")))?,
                    ),
                    None => None,
                };
                Command::List(ListFilter {
                    status,
                    procedure: req.get("procedure").map(String::from),
                    parent,
                    after,
                    limit,
                })
            }
            "COUNTS" => Command::Counts,
            "STATS" => Command::Stats,
            "PROCEDURES" => Command::Procedures,
            "ID" => Command::Id,
            "SIGNAL" => {
                let id = id()?;
                let s = req.get("status").ok_or_else(|| {
                    Refusal::new(
                        Code::MissingField,
                        "SIGNAL needs status= (accepted, interrupted, done, client_error or terminate)",
                    )
                })?;
                let status = SignalStatus::parse(s).ok_or_else(|| {
                    Refusal::new(
                        Code::Malformed,
                        format!("status {s:?} is not one of accepted, interrupted, done, client_error, terminate"),
                    )
                })?;
                Command::Signal { id, status }
            }
            "ABORT" => Command::Abort(id()?),
            "WATCH" => Command::Watch {
                ttl: millis("ttl_ms")?.unwrap_or(WATCH_TTL_DEFAULT).clamp(Duration::from_secs(1), WATCH_TTL_MAX),
            },
            "UNWATCH" => Command::Unwatch,
            other => {
                return Err(Refusal::new(
                    Code::UnknownMethod,
                    format!("unknown tasks command {other}: use {}", COMMANDS.map(|(c, _)| c).join(", ")),
                ))
            }
        })
    }
}

/// The submission of `TASK`/`ATASK`: `procedure=`, the arguments in `args=` or the payload (a
/// JSON array; none: no arguments), `key=`, `timeout_ms=`, `max_attempts=`, `pid=` (the parent
/// task); the message's `_expires_at` is the task's deadline.
fn submission_of(req: &Message) -> Result<Submission, Refusal> {
    let procedure = req
        .get("procedure")
        .ok_or_else(|| Refusal::new(Code::MissingField, format!("{} needs procedure=APP.EVENT", req.command)))?;
    let args_text = match req.get("args") {
        Some(a) => a.as_bytes(),
        None if req.payload.is_empty() => b"[]".as_slice(),
        None => &req.payload[..],
    };
    let args = match serde_json::from_slice::<Value>(args_text) {
        Ok(Value::Array(a)) => a,
        Ok(other) => {
            return Err(Refusal::new(
                Code::BadArguments,
                format!("the arguments must be a JSON array of positional arguments, not {other}"),
            ))
        }
        Err(e) => return Err(Refusal::new(Code::Malformed, format!("the arguments are not JSON: {e}"))),
    };
    let mut s = Submission::new(procedure, args);
    s.key = req.get("key").map(String::from);
    if let Some(ms) = req.get("timeout_ms") {
        let ms: u64 =
            ms.parse().map_err(|_| Refusal::new(Code::Malformed, format!("timeout_ms={ms:?} is not a number")))?;
        s.timeout = Some(Duration::from_millis(ms));
    }
    if let Some(n) = req.get("max_attempts") {
        s.max_attempts =
            Some(n.parse().map_err(|_| Refusal::new(Code::Malformed, format!("max_attempts={n:?} is not a number")))?);
    }
    if let Some(p) = req.get("pid") {
        s.parent = Some(p.parse().map_err(|_| Refusal::new(Code::UnknownTask, format!("pid={p:?} is not a task id")))?);
    }
    s.deadline = deadline_of(req);
    Ok(s)
}

/// The deadline a message gives the tasks it submits: its `_expires_at` (0: none).
fn deadline_of(req: &Message) -> Option<UnixMs> {
    (req.envelope.expires_at != 0).then(|| UnixMs::from_i64(req.envelope.expires_at))
}

/// One line of `SUBMIT_MANY`: `{"procedure", "args", "key", "timeout_ms", "max_attempts", "pid",
/// "expires_at"}` (the arpcp names `remote_procedure` and `remote_procedure_args` are accepted
/// too; `parent` for `pid`). A line without `expires_at` takes the message's `_expires_at`.
fn submission_line(line: &str) -> Result<Submission, Refusal> {
    let v: Value = serde_json::from_str(line).map_err(|e| Refusal::new(Code::Malformed, format!("not JSON: {e}")))?;
    let Value::Object(o) = v else {
        return Err(Refusal::new(Code::Malformed, "each line is a JSON object"));
    };
    let field = |a: &str, b: &str| o.get(a).or_else(|| o.get(b)).filter(|v| !v.is_null());
    let procedure = field("procedure", "remote_procedure")
        .ok_or_else(|| Refusal::new(Code::MissingField, "the field \"procedure\" is missing"))?
        .as_str()
        .ok_or_else(|| Refusal::new(Code::Malformed, "\"procedure\" must be a string"))?;
    let args = match field("args", "remote_procedure_args") {
        None => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(other) => {
            return Err(Refusal::new(Code::BadArguments, format!("\"args\" must be a JSON array, not {other}")))
        }
    };
    let mut s = Submission::new(procedure, args);
    if let Some(k) = field("key", "key") {
        let k = k.as_str().ok_or_else(|| Refusal::new(Code::Malformed, "\"key\" must be a string"))?;
        if k.is_empty() || k.len() > MAX_KEY_LEN {
            return Err(Refusal::new(Code::Malformed, format!("a key is 1 to {MAX_KEY_LEN} bytes")));
        }
        s.key = Some(k.to_string());
    }
    if let Some(t) = field("timeout_ms", "timeout_ms") {
        s.timeout = Some(Duration::from_millis(
            t.as_u64().ok_or_else(|| Refusal::new(Code::Malformed, "\"timeout_ms\" must be a number"))?,
        ));
    }
    if let Some(n) = field("max_attempts", "max_attempts") {
        let n = n.as_u64().and_then(|n| u32::try_from(n).ok());
        s.max_attempts = Some(n.ok_or_else(|| Refusal::new(Code::Malformed, "\"max_attempts\" must be a number"))?);
    }
    if let Some(p) = field("pid", "parent") {
        let p = p.as_str().and_then(|p| p.parse().ok());
        s.parent = Some(p.ok_or_else(|| Refusal::new(Code::UnknownTask, "\"pid\" must be a task id"))?);
    }
    if let Some(e) = field("expires_at", "expires_at") {
        let e = e.as_i64().ok_or_else(|| Refusal::new(Code::Malformed, "\"expires_at\" must be Unix milliseconds"))?;
        s.deadline = Some(UnixMs::from_i64(e));
    }
    Ok(s)
}

/// A task as JSON: what `GET`, `WAIT` and `TASK` send (with its arguments and result) and each
/// line of `LIST` (without). Times are Unix milliseconds.
pub fn task_json(t: &Task, full: bool) -> Value {
    let ms = |t: Option<UnixMs>| t.map(|t| t.0);
    let raw = |j: &nodus_tasks::task::Json| serde_json::from_str::<Value>(j.get()).unwrap_or(Value::Null);
    let mut v = json!({
        "id": t.id,
        "procedure": t.procedure,
        "status": t.status.as_str(),
        "attempt": t.attempt,
        "max_attempts": t.max_attempts,
        "timeout_ms": u64::try_from(t.timeout.as_millis()).unwrap_or(u64::MAX),
        "owner": t.owner,
        "parent": t.parent,
        "key": t.key,
        "created_at": t.created_at.0,
        "started_at": ms(t.started_at),
        "finished_at": ms(t.finished_at),
        "expires_at": ms(t.expires_at),
        "deadline": ms(t.deadline),
        "error": t.error.as_ref().map(|e| json!({"kind": e.kind.as_str(), "message": e.message})),
    });
    if full {
        v["args"] = raw(&t.args);
        v["result"] = t.result.as_ref().map(raw).unwrap_or(Value::Null);
    }
    v
}

/// The reply carrying a task: `TASK id=;status=;attempt=;arpcp=;description=` and the task as
/// JSON. A finished task whose record is gone (expired, deleted) is described from its outcome.
fn task_reply(req: &Message, id: &TaskId, task: Option<&Task>, finished: Option<&Finished>) -> Message {
    let (status, attempt, body) = match (task, finished) {
        (Some(t), _) => (t.status, t.attempt, task_json(t, true)),
        (None, Some(f)) => {
            let raw = |j: &nodus_tasks::task::Json| serde_json::from_str::<Value>(j.get()).unwrap_or(Value::Null);
            let body = json!({
                "id": id,
                "status": f.status.as_str(),
                "result": f.result.as_ref().map(raw),
                "error": f.error.as_ref().map(|e| json!({"kind": e.kind.as_str(), "message": e.message})),
            });
            (f.status, 0, body)
        }
        (None, None) => (Status::Pending, 0, json!({"id": id})),
    };
    let (code, description) = match status {
        Status::Done => (Code::Ok, "done".to_string()),
        Status::Pending | Status::Running => (Code::Ok, status.to_string()),
        Status::Error | Status::Interrupted => {
            let error = task.and_then(|t| t.error.clone()).or_else(|| finished.and_then(|f| f.error.clone()));
            let why = match error {
                Some(e) if e.kind == nodus_tasks::task::ErrorKind::RunningError => e.message,
                Some(e) => e.to_string(),
                None => status.to_string(),
            };
            (Code::ProcedureFailed, if status == Status::Interrupted { format!("interrupted: {why}") } else { why })
        }
    };
    req.reply("TASK")
        .param("id", id)
        .param("status", status)
        .param("attempt", attempt)
        .param("arpcp", code.as_u16())
        .param("description", description)
        .with_payload(serde_json::to_vec(&body).expect("JSON to a Vec"))
}

/// Binds the arpcp listener the configuration asks for: `None` when tasks or the listener are
/// off.
///
/// Fails when the address cannot be bound, or is beyond loopback without an allow-list.
pub(crate) async fn bind_arpcp(config: &Config) -> anyhow::Result<Option<TcpListener>> {
    use anyhow::Context;
    let t = &config.tasks;
    if !config.apps.enabled || !t.enabled || t.arpcp_listen.is_empty() {
        return Ok(None);
    }
    let l = listen_arpcp(&t.arpcp_listen).await.with_context(|| {
        format!("cannot listen for arpcp on {} (set [tasks] arpcp_listen, or '' to turn it off)", t.arpcp_listen)
    })?;
    let addr = l.local_addr()?;
    if !addr.ip().is_loopback() && t.arpcp_allow.is_empty() {
        anyhow::bail!(
            "arpcp has no authentication: listening on {addr} needs tasks.arpcp_allow, the client networks served (e.g. [\"10.0.0.0/8\"])"
        );
    }
    Ok(Some(l))
}

/// Connections the kernel queues for the arpcp listener before it accepts them. arpcp opens one
/// connection per request, so bursts are the normal load: a short queue makes clients wait a
/// second for the SYN to be sent again.
const ARPCP_BACKLOG: u32 = 4096;

/// Binds `addr` (host:port) with [`ARPCP_BACKLOG`].
async fn listen_arpcp(addr: &str) -> std::io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        match socket.bind(a).and_then(|()| socket.listen(ARPCP_BACKLOG)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "the address resolves to nothing")))
}

/// The node's running tasks as components of its tree (the control plane's
/// [`ComponentSource`](crate::control::ComponentSource)): each one started by its parent task
/// when that one runs here too (a subtask), else by the node; listed while it runs, answered for
/// when monitored, and killed (`interrupted`, with its subtasks at any depth: running ones are
/// children in the tree and the cascade stops them first, pending ones are interrupted in the
/// store so they never start). Kept from the executor's status changes, so listing never waits
/// for the store.
struct RunningTasks {
    node: String,
    node_id: ComponentId,
    running: Mutex<BTreeMap<ComponentId, (TaskId, Component)>>,
    /// The service once its store is open (to abort with).
    tasks: Mutex<Option<Tasks<TaskStore>>>,
    /// On a manager, the tasks killed, for their worker nodes to stop them.
    aborted: Option<mpsc::Sender<TaskId>>,
}

impl RunningTasks {
    fn new(node: &str, aborted: Option<mpsc::Sender<TaskId>>) -> Self {
        RunningTasks {
            node: node.to_string(),
            node_id: crate::control::sources::node_id(node),
            running: Mutex::default(),
            tasks: Mutex::default(),
            aborted,
        }
    }

    fn id_of(&self, task: &TaskId) -> ComponentId {
        ComponentId::derive(&[&self.node, "task", task.as_str()])
    }

    /// Task `task` as a component; `started` is when its attempt started. A subtask is started
    /// by its parent's component (the listing hangs it on the node while the parent does not run
    /// here).
    fn component(&self, task: &TaskId, procedure: &str, started: UnixMs, parent: Option<&TaskId>) -> Component {
        let pid = parent.map_or(self.node_id, |p| self.id_of(p));
        let mut c = Component::new(self.id_of(task), ComponentKind::Task, format!("{procedure} {task}"), &self.node)
            .started_by(pid);
        c.creator = TASKS_SERVICE.to_string();
        c.created_at = i64::try_from(started.0).unwrap_or(i64::MAX);
        c
    }

    /// Follows the service: once the store is open, every status change; after a lag, the
    /// running tasks read again from the store.
    async fn follow(self: Arc<Self>, mut opened: watch::Receiver<Option<Tasks<TaskStore>>>) {
        let tasks = loop {
            if let Some(t) = opened.borrow_and_update().clone() {
                break t;
            }
            if opened.changed().await.is_err() {
                return;
            }
        };
        *self.tasks.lock().unwrap_or_else(|e| e.into_inner()) = Some(tasks.clone());
        let mut changes = tasks.watch();
        self.resync(&tasks).await;
        loop {
            match changes.recv().await {
                Ok(change) => {
                    let id = self.id_of(&change.id);
                    let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
                    if change.status == Some(Status::Running) {
                        let c = self.component(&change.id, &change.procedure, UnixMs::now(), change.parent.as_ref());
                        running.insert(id, (change.id, c));
                    } else {
                        running.remove(&id);
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => self.resync(&tasks).await,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    async fn resync(&self, tasks: &Tasks<TaskStore>) {
        let filter = ListFilter { status: Some(Status::Running), limit: 10_000, ..ListFilter::default() };
        match tasks.list(filter).await {
            Ok(list) => {
                let now: BTreeMap<_, _> = list
                    .iter()
                    .map(|t| {
                        (
                            self.id_of(&t.id),
                            (
                                t.id.clone(),
                                self.component(
                                    &t.id,
                                    &t.procedure,
                                    t.started_at.unwrap_or_else(UnixMs::now),
                                    t.parent.as_ref(),
                                ),
                            ),
                        )
                    })
                    .collect();
                *self.running.lock().unwrap_or_else(|e| e.into_inner()) = now;
            }
            Err(e) => warn!(error = %e, "cannot list the running tasks for the component tree"),
        }
    }
}

impl crate::control::ComponentSource for RunningTasks {
    fn components(&self) -> Vec<Component> {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running
            .values()
            .map(|(_, c)| {
                let mut c = c.clone();
                if c.pid.is_some_and(|p| p != self.node_id && !running.contains_key(&p)) {
                    // Its parent task runs elsewhere or has finished: the node holds it.
                    c.pid = Some(self.node_id);
                }
                c
            })
            .collect()
    }

    fn stop(&self, id: ComponentId) {
        let Some((task, _)) = self.running.lock().unwrap_or_else(|e| e.into_inner()).remove(&id) else { return };
        let Some(tasks) = self.tasks.lock().unwrap_or_else(|e| e.into_inner()).clone() else { return };
        let aborted = self.aborted.clone();
        tokio::spawn(async move {
            match tasks.kill(&task).await {
                Ok(Some(killed)) => {
                    if !killed.subtasks.is_empty() {
                        info!(task = %task, subtasks = killed.subtasks.len(), "killed with its subtasks");
                    }
                    if let Some(tx) = aborted {
                        for id in std::iter::once(task).chain(killed.subtasks) {
                            if tx.try_send(id.clone()).is_err() {
                                warn!(task = %id, "too many aborts at once: the task's worker is not told, its late result will be discarded");
                            }
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => warn!(task = %task, error = %e, "a kill could not abort the task"),
            }
        });
    }
}

/// Numbers as a comma-separated list (the histogram of `STATS`).
fn join(ns: &[u64]) -> String {
    ns.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_once_with_the_arpcp_code_of_what_is_wrong() {
        let parse = |m: Message| Command::parse(&m);
        let t = parse(Message::new("ATASK").param("procedure", "procs.add").param("args", "[1, 2]")).unwrap();
        assert!(matches!(&t, Command::Atask(s) if s.procedure == "procs.add" && s.args.len() == 2), "{t:?}");
        let t = parse(Message::new("TASK").param("procedure", "p.x").with_payload(&b"[\"a\"]"[..])).unwrap();
        assert!(matches!(&t, Command::Task(s) if s.args == vec![json!("a")]), "{t:?}");
        let t = parse(Message::new("ATASK").param("procedure", "p.x").param("key", "k").param("timeout_ms", "500"));
        assert!(matches!(&t, Ok(Command::Atask(s)) if s.args.is_empty() && s.key.as_deref() == Some("k")), "{t:?}");
        let code = |m: Message| parse(m).unwrap_err().code;
        assert_eq!(code(Message::new("ATASK")), Code::MissingField);
        assert_eq!(code(Message::new("ATASK").param("procedure", "p.x").param("args", "{}")), Code::BadArguments);
        assert_eq!(code(Message::new("ATASK").param("procedure", "p.x").param("args", "[1,")), Code::Malformed);
        assert_eq!(code(Message::new("GET")), Code::MissingField);
        assert_eq!(code(Message::new("GET").param("id", "a b")), Code::UnknownTask);
        assert_eq!(code(Message::new("SIGNAL").param("id", "x").param("status", "boom")), Code::Malformed);
        assert_eq!(code(Message::new("LIST").param("status", "sleepy")), Code::Malformed);
        assert_eq!(code(Message::new("LIST").param("limit", "0")), Code::Malformed);
        assert_eq!(code(Message::new("FLY")), Code::UnknownMethod);
        let w = parse(Message::new("WAIT").param("id", "x").param("timeout_ms", "999999999")).unwrap();
        assert!(matches!(w, Command::Wait { timeout, .. } if timeout == WAIT_MAX));
        // The parent and the deadline (the message's _expires_at).
        let mut m = Message::new("ATASK").param("procedure", "p.x").param("pid", "t-1");
        m.envelope.expires_at = 1_700_000_000_000;
        let t = parse(m).unwrap();
        assert!(
            matches!(&t, Command::Atask(s) if s.parent.as_ref().map(TaskId::as_str) == Some("t-1")
                && s.deadline == Some(UnixMs(1_700_000_000_000))),
            "{t:?}"
        );
        let t = parse(Message::new("TASK").param("procedure", "p.x")).unwrap();
        assert!(matches!(&t, Command::Task(s) if s.deadline.is_none() && s.parent.is_none()), "{t:?}");
        assert_eq!(code(Message::new("ATASK").param("procedure", "p.x").param("pid", "a b")), Code::UnknownTask);
        let l = parse(Message::new("LIST").param("parent", "t-1")).unwrap();
        assert!(matches!(&l, Command::List(f) if f.parent.as_ref().map(TaskId::as_str) == Some("t-1")), "{l:?}");
        let mut many = Message::new("SUBMIT_MANY").with_payload(
            &b"{\"procedure\": \"p.x\", \"pid\": \"t-2\"}\n{\"procedure\": \"p.y\", \"expires_at\": 5}\n"[..],
        );
        many.envelope.expires_at = 9;
        let Ok(Command::SubmitMany(lines)) = parse(many) else { panic!("SUBMIT_MANY") };
        let lines: Vec<Submission> = lines.into_iter().map(Result::unwrap).collect();
        assert_eq!(lines[0].parent.as_ref().map(TaskId::as_str), Some("t-2"));
        assert_eq!((lines[0].deadline, lines[1].deadline), (Some(UnixMs(9)), Some(UnixMs(5))), "a line's own wins");
    }

    #[test]
    fn submit_many_lines_are_checked_one_by_one() {
        let s =
            submission_line(r#"{"procedure": "procs.add", "args": [1, 2], "key": "k1", "max_attempts": 2}"#).unwrap();
        assert_eq!(
            (s.procedure.as_str(), s.args.len(), s.key.as_deref(), s.max_attempts),
            ("procs.add", 2, Some("k1"), Some(2))
        );
        let s = submission_line(r#"{"remote_procedure": "p.x", "remote_procedure_args": ["a"]}"#).unwrap();
        assert_eq!((s.procedure.as_str(), s.args.clone()), ("p.x", vec![json!("a")]));
        assert_eq!(submission_line("[1]").unwrap_err().code, Code::Malformed);
        assert_eq!(submission_line("{}").unwrap_err().code, Code::MissingField);
        assert_eq!(submission_line(r#"{"procedure": "p.x", "args": 3}"#).unwrap_err().code, Code::BadArguments);
        assert_eq!(submission_line(r#"{"procedure": "p.x", "key": ""}"#).unwrap_err().code, Code::Malformed);
    }

    #[test]
    fn every_command_needs_a_permission_and_only_reads_need_status() {
        for (c, p) in COMMANDS {
            let read = ["GET", "WAIT", "LIST", "COUNTS", "STATS", "PROCEDURES", "ID", "WATCH", "UNWATCH"].contains(&c);
            let admin = ["SIGNAL", "ABORT"].contains(&c);
            let want = if read {
                Permission::Status
            } else if admin {
                Permission::Admin
            } else {
                Permission::Send
            };
            assert_eq!(p, want, "{c}");
        }
    }
}
