//! Tasks across nodes on a node: the built-in service `taskcluster` carries seed 002's
//! manager/worker messages ([`nodus_tasks::cluster`]) between nodes over the cluster links, and
//! drives this node's side of the protocol as `[tasks] role` says:
//!
//! - `standalone` (the default): runs its own tasks; answers every request of the protocol so
//!   that peers know where they stand (`NodeTypeAnswer { Standalone }`, `NotMine`, ...).
//! - `manager`: keeps the store; its apps' tasks are not run here but claimed for its workers
//!   (the `[tasks] workers` it accepts) and sent to them in batches by capacity and load; their
//!   reports are recorded in the store, fenced by each attempt's lease, and answered once
//!   durable. It keeps the agent registry (`AGENTS`, `BAN`, `UNBAN`; `nodus agents`).
//! - `worker`: pairs with the first of `[tasks] managers` that accepts it and runs the tasks it
//!   sends on this node's apps, reporting start and end.
//!
//! Apps follow their tasks ([`package`]). A manager packs the deployed version of every app
//! with procedures (a deterministic tar of `<data_dir>/apps/<name>/v<N>/`, at most `[tasks]
//! max_package_bytes`) into `<data_dir>/packages/`, announces it to its state machine (every
//! task it sends names the package: app, version, SHA-256, size) and serves it in chunks to
//! its paired workers; a redeploy is seen within a second and packed again (the previous
//! package is kept for fetches under way). A worker node declares the packages of its own
//! deployed apps (packed the same way, so the same files give the same hash); a task whose
//! package it lacks is fetched from its manager (only its paired manager: the state machine
//! fetches from the task's sender and takes chunks only from it) into
//! `<data_dir>/packages/incoming/<sha256>.tar`, checked again on disk, and deployed by a
//! `DEPLOY` to this node's `apps` service, the path `nodus app deploy` takes, so the app runs
//! as any other (as `[apps] run_as`). A fetch or deploy that fails ends the tasks that needed
//! it with `DownloadError` and the reason.
//!
//! The messages are node messages from this service to the peer's: the router delivers them
//! like any other, so they pass its permission model (each protocol command needs `send`; the
//! registry's `BAN`/`UNBAN` need `admin`, `AGENTS` needs `status`). Which peers pair is decided
//! by server name (`workers`, `managers`); the cluster link's secret or TLS is what makes a
//! server name trustworthy. A request that cannot be delivered (no route, link down) comes back
//! as the router's `ERROR` and is given to the state machine as undeliverable.
//!
//! The state machines are pure; this driver does the I/O: store operations and attempts run on
//! tasks of their own and come back as events, so the loop never waits on them.

mod package;

use crate::apps::{AppStore, APPS_SERVICE};
use crate::router::ConnId;
use crate::server::{Outbound, Shared};
use crate::tasks::TaskStore;
use nodus_engine::Engine;
use nodus_tasks::cluster::msg::{Body, COMMANDS as PROTOCOL, MAX_LIST};
use nodus_tasks::cluster::registry::RegistryConfig;
use nodus_tasks::cluster::resources;
use nodus_tasks::cluster::{
    Agent, AgentStore, AppPackage, InDoubt, Manager, ManagerAction, ManagerConfig, Packet, RegistryChange, Specs,
    Standalone, WorkerAction, WorkerConfig, WorkerNode,
};
use nodus_tasks::executor::run_attempt;
use nodus_tasks::sched::{AttemptEnd, Attempted};
use nodus_tasks::store::{Finish, ListFilter, Store};
use nodus_tasks::task::{Claimed, Lease};
use nodus_tasks::{Status, TaskId, Tasks, UnixMs};
use nodus_wire::node::Permission;
use nodus_wire::{Backoff, Message};
use package::{Deployed, Incoming, Packed, Scanned};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// The built-in service's name (the same on every node).
pub const CLUSTER_SERVICE: &str = "taskcluster";
/// Events from the driver's own tasks (store operations, attempts) waiting for its loop.
const EVENTS: usize = 8192;
/// Requests sent and not answered yet, remembered to tell which peer an undeliverable one was
/// for; beyond it the oldest are forgotten (their peer is then found by the state machine's
/// own timeouts).
const MAX_SENT: usize = 65_536;
/// How often a manager compares its apps with the task service's procedures, and a node looks
/// for deployed versions it has not packed yet.
const APPS_EVERY: Duration = Duration::from_secs(1);
/// Packages a manager keeps per app: the current one and the one before (fetches of it may be
/// under way).
const KEEP_PACKAGES: usize = 2;
/// Chunks of packages a manager reads from disk at once (each up to 1 MiB).
const MAX_CHUNK_READS: usize = 16;
/// The first id of the `DEPLOY` requests a worker node sends its `apps` service (far above
/// the state machines' request ids).
const DEPLOY_IDS: u64 = 1 << 62;
/// Longest sleep of the loop without a deadline.
const IDLE: Duration = Duration::from_secs(1);
/// Aborted tasks waiting for a manager's driver to stop them on their workers.
pub(crate) const ABORTS: usize = 1024;
/// Most tasks a manager asks about at its restart (the store's running tasks on workers).
const MAX_IN_DOUBT: usize = 1_000_000;

/// The commands of the service and the permission each needs.
pub fn commands() -> Vec<(&'static str, Permission)> {
    let mut c: Vec<(&'static str, Permission)> = PROTOCOL.iter().map(|c| (*c, Permission::Send)).collect();
    c.extend([("AGENTS", Permission::Status), ("BAN", Permission::Admin), ("UNBAN", Permission::Admin)]);
    c
}

/// This node's part.
enum Role {
    Standalone(Standalone),
    Manager(Box<Manager>),
    Worker(Box<WorkerNode>),
}

impl Role {
    fn name(&self) -> &'static str {
        match self {
            Role::Standalone(_) => "standalone",
            Role::Manager(_) => "manager",
            Role::Worker(_) => "worker",
        }
    }
}

/// What the driver's own tasks report.
pub(crate) enum Event {
    Claimed {
        owner: String,
        app: String,
        asked: usize,
        result: Result<Vec<Claimed>, ()>,
    },
    Recorded {
        id: TaskId,
        lease: Lease,
    },
    Ended {
        id: TaskId,
        lease: Lease,
        end: AttemptEnd,
    },
    /// A scan of the app store, begun at install generation `generation`.
    Scanned {
        generation: u64,
        results: Vec<(String, Scanned)>,
    },
    /// A fetched package's file was checked on disk.
    Verified {
        package: AppPackage,
        result: package::Verified,
    },
}

/// A package a worker node is fetching.
struct Fetch {
    incoming: Incoming,
    started: Instant,
}

/// The driver of this node's side of the protocol.
pub(crate) struct Driver {
    shared: Arc<Shared>,
    conn: ConnId,
    engine: Engine,
    tasks: Tasks<TaskStore>,
    role: Role,
    events: mpsc::Sender<Event>,
    /// Requests in flight: id → peer.
    sent: BTreeMap<u64, String>,
    /// A worker's running attempts.
    running: HashMap<(TaskId, Lease), CancellationToken>,
    /// A manager's tasks on workers: their procedure and attempt (for status changes).
    assigned: HashMap<TaskId, Attempted>,
    max_result: usize,
    /// This node's deployed apps: packages are made of them, fetched ones deployed into them.
    store: AppStore,
    /// `<data_dir>/packages`: a manager's packages; a worker's fetches go to `incoming/`.
    packages: PathBuf,
    /// `[tasks] max_package_bytes`.
    max_package: u64,
    /// The deployed version of each app as the last scan saw it.
    deployed: BTreeMap<String, Deployed>,
    /// A scan of the app store is under way.
    scanning: bool,
    /// A manager's packages by app, newest first (at most [`KEEP_PACKAGES`]).
    served: BTreeMap<String, Vec<Packed>>,
    /// A manager's apps announced to its state machine.
    announced: BTreeSet<String>,
    /// Chunk reads under way (bounded).
    reads: Arc<Semaphore>,
    /// Deploys a worker node finished (or saw fail): a scan begun before the last one is not
    /// applied.
    installs: u64,
    /// A worker node's fetches by content hash.
    fetches: HashMap<String, Fetch>,
    /// `DEPLOY` requests to the `apps` service: id → the package, its file and when its fetch
    /// began.
    deploys: HashMap<u64, (AppPackage, PathBuf, Instant)>,
    next_deploy: u64,
}

/// Registers the service now (before any listener accepts); its requests wait until
/// [`Driver::run`] takes them.
pub(crate) fn attach(shared: &Shared) -> (ConnId, mpsc::Receiver<Outbound>) {
    shared.attach_with(CLUSTER_SERVICE, Some(&commands()))
}

impl Driver {
    /// Starts this node's side once its task service is open.
    pub(crate) async fn start(
        shared: Arc<Shared>,
        conn: ConnId,
        engine: Engine,
        tasks: Tasks<TaskStore>,
    ) -> (Driver, mpsc::Receiver<Event>) {
        let config = shared.config().clone();
        let t = &config.tasks;
        let now = UnixMs::now();
        let name = config.server_name.clone();
        let store = AppStore::new(&config.data_dir, config.apps.max_deploy_bytes);
        let packages =
            std::path::absolute(config.data_dir.join("packages")).unwrap_or_else(|_| config.data_dir.join("packages"));
        let mut deployed = BTreeMap::new();
        let ping = Duration::from_millis(t.ping_interval_ms);
        let role = match t.role.as_str() {
            "manager" => {
                let mut mc = ManagerConfig::new(name.clone(), t.workers.iter().cloned());
                mc.ping_interval = ping;
                mc.silent_after = Duration::from_millis(t.silent_after_ms);
                mc.gone_after = Duration::from_millis(t.gone_after_ms);
                mc.request_timeout = ping;
                mc.retry_min = Duration::from_millis(t.retry_min_ms);
                mc.retry_max = Duration::from_millis(t.retry_max_ms);
                mc.max_result_bytes = t.max_result_bytes as u64;
                mc.worker_grace = Duration::from_millis(t.worker_grace_ms);
                // The store's lease outlasts the manager's grace, so the manager acts first.
                mc.lease_grace = mc.lease_grace.max(mc.worker_grace * 3);
                mc.registry = RegistryConfig {
                    remove_after: Duration::from_secs(t.agent_remove_after_secs),
                    ..RegistryConfig::default()
                };
                let agents = match tasks.store().agents().await {
                    Ok(a) => a,
                    Err(e) => {
                        error!(error = %e, "the agent registry cannot be read; starting with none");
                        Vec::new()
                    }
                };
                // Packages are made again from the app store (what is on disk may be stale).
                let dir = packages.clone();
                let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
                let mut m = Manager::new(mc, agents, rand::random(), now);
                let in_doubt = in_doubt(&tasks, &name).await;
                if !in_doubt.is_empty() {
                    info!(tasks = in_doubt.len(), "asking the workers about the tasks they had at the last stop");
                }
                m.restore(in_doubt, now);
                info!(workers = ?t.workers, "tasks: this node is a manager");
                Role::Manager(Box::new(m))
            }
            "worker" => {
                // The packages of the apps deployed here, declared when pairing; fetches left
                // half-done by the last run are deleted.
                let (st, dir, max) = (store.clone(), packages.join("incoming"), t.max_package_bytes);
                let scanned = tokio::task::spawn_blocking(move || {
                    let _ = std::fs::remove_dir_all(dir);
                    package::scan(&st, None, &BTreeMap::new(), None, max)
                })
                .await
                .unwrap_or_default();
                let mut have = Vec::new();
                for (app, s) in scanned {
                    if let Scanned::Changed { deployed: d, result } = s {
                        deployed.insert(app.clone(), d);
                        match result {
                            Ok(p) => have.push(p.package),
                            Err(e) => warn!(%app, error = %e, "a deployed app cannot be declared"),
                        }
                    }
                }
                let mut specs = specs(&config, &tasks);
                specs.apps = have.into_iter().take(MAX_LIST).collect();
                let wc = WorkerConfig {
                    ping_interval: ping,
                    manager_timeout: Duration::from_millis(t.gone_after_ms),
                    request_timeout: ping,
                    max_package_bytes: t.max_package_bytes,
                    ..WorkerConfig::new(name.clone(), t.managers.clone(), specs)
                };
                info!(managers = ?t.managers, apps = wc.specs.apps.len(), "tasks: this node is a worker");
                Role::Worker(Box::new(WorkerNode::new(wc, rand::random(), now)))
            }
            _ => Role::Standalone(Standalone::new(1)),
        };
        let (events, events_rx) = mpsc::channel(EVENTS);
        let driver = Driver {
            shared,
            conn,
            engine,
            tasks,
            role,
            events,
            sent: BTreeMap::new(),
            running: HashMap::new(),
            assigned: HashMap::new(),
            max_result: t.max_result_bytes,
            store,
            packages,
            max_package: t.max_package_bytes,
            deployed,
            scanning: false,
            served: BTreeMap::new(),
            announced: BTreeSet::new(),
            reads: Arc::new(Semaphore::new(MAX_CHUNK_READS)),
            installs: 0,
            fetches: HashMap::new(),
            deploys: HashMap::new(),
            next_deploy: DEPLOY_IDS,
        };
        (driver, events_rx)
    }

    /// Serves until `stop`: messages, events of its own tasks, deadlines.
    pub(crate) async fn run(
        mut self,
        mut rx: mpsc::Receiver<Outbound>,
        mut events: mpsc::Receiver<Event>,
        mut aborted: mpsc::Receiver<TaskId>,
        stop: CancellationToken,
    ) {
        let mut submitted = self.tasks.submitted();
        let mut apps_check = tokio::time::interval(APPS_EVERY);
        loop {
            self.drain();
            let wait =
                self.next_deadline().map_or(IDLE, |d| Duration::from_millis(d.0.saturating_sub(UnixMs::now().0)));
            tokio::select! {
                _ = stop.cancelled() => break,
                m = rx.recv() => match m {
                    Some(Outbound::Msg(m, _)) => self.on_message(m),
                    Some(_) => {}
                    None => break,
                },
                Some(ev) = events.recv() => self.on_event(ev),
                Some(id) = aborted.recv() => {
                    if let Role::Manager(m) = &mut self.role {
                        if m.abort(&id, UnixMs::now()) {
                            info!(task = %id, "aborted: telling its worker to stop it");
                        }
                    }
                }
                changed = submitted.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    if let Role::Manager(m) = &mut self.role {
                        let now = UnixMs::now();
                        for app in &self.announced {
                            m.handle_submitted(app, now);
                        }
                    }
                }
                _ = apps_check.tick() => self.sync_apps(),
                _ = tokio::time::sleep(wait.min(IDLE)) => {
                    let now = UnixMs::now();
                    match &mut self.role {
                        Role::Manager(m) => m.tick(now),
                        Role::Worker(w) => w.tick(now),
                        Role::Standalone(_) => {}
                    }
                }
            }
        }
        if let Role::Worker(w) = &mut self.role {
            w.leave(UnixMs::now());
            self.drain();
        }
        for (_, t) in self.running.drain() {
            t.cancel();
        }
        for (_, f) in self.fetches.drain() {
            f.incoming.drop_file();
        }
        self.shared.detach(self.conn);
    }

    fn next_deadline(&self) -> Option<UnixMs> {
        match &self.role {
            Role::Manager(m) => m.next_deadline(),
            Role::Worker(w) => w.next_deadline(),
            Role::Standalone(_) => None,
        }
    }

    /// A manager's apps are the task service's: every app with procedures runs on workers,
    /// once packed. A worker node declares the packages of every app deployed here. Both look
    /// at the app store on the blocking pool; what changed comes back as [`Event::Scanned`].
    fn sync_apps(&mut self) {
        let apps = match &mut self.role {
            Role::Manager(m) => {
                let now: BTreeSet<String> = self.tasks.procedures().iter().map(|p| p.app.clone()).collect();
                for app in self.announced.difference(&now) {
                    debug!(%app, "no procedures any more: no more tasks of this app go to workers");
                    m.remove_app(app);
                }
                self.announced.retain(|a| now.contains(a));
                Some(now.into_iter().collect::<Vec<_>>())
            }
            Role::Worker(_) => None,
            Role::Standalone(_) => return,
        };
        // A deploy under way would be seen half done (or before its rollback).
        if self.scanning || !self.deploys.is_empty() {
            return;
        }
        self.scanning = true;
        let manager = apps.is_some();
        let (store, known, max) = (self.store.clone(), self.deployed.clone(), self.max_package);
        let into = manager.then(|| self.packages.clone());
        let (events, generation) = (self.events.clone(), self.installs);
        tokio::spawn(async move {
            let results =
                tokio::task::spawn_blocking(move || package::scan(&store, apps, &known, into.as_deref(), max))
                    .await
                    .unwrap_or_default();
            let _ = events.send(Event::Scanned { generation, results }).await;
        });
    }

    /// What a scan of the app store found: a manager announces (or withdraws) its packages, a
    /// worker node declares what it has.
    fn on_scanned(&mut self, generation: u64, results: Vec<(String, Scanned)>) {
        self.scanning = false;
        if generation != self.installs {
            return; // a fetched package was deployed meanwhile: the next scan sees it
        }
        let now = UnixMs::now();
        for (app, scanned) in results {
            match (scanned, &mut self.role) {
                (Scanned::Unchanged, Role::Manager(m)) => {
                    // Its procedures went and came back meanwhile: announced again as it was.
                    if self.announced.insert(app.clone()) {
                        let package = self.served.get(&app).and_then(|kept| kept.first()).map(|p| p.package.clone());
                        m.set_app(&app, package, now);
                    }
                }
                (Scanned::Unchanged, _) | (_, Role::Standalone(_)) => {}
                (Scanned::Gone, Role::Manager(m)) => {
                    self.deployed.remove(&app);
                    m.remove_app(&app);
                    self.announced.remove(&app);
                    for p in self.served.remove(&app).unwrap_or_default() {
                        forget_package(p);
                    }
                }
                (Scanned::Gone, Role::Worker(w)) => {
                    self.deployed.remove(&app);
                    w.remove_app(&app);
                }
                (Scanned::Changed { deployed, result }, Role::Manager(m)) => {
                    self.deployed.insert(app.clone(), deployed);
                    let package = match result {
                        Ok(p) => {
                            let package = p.package.clone();
                            info!(%app, version = %package.version, size = package.size, hash = %package.hash, "app packed for worker nodes");
                            let kept = self.served.entry(app.clone()).or_default();
                            kept.insert(0, p);
                            for old in kept.drain(KEEP_PACKAGES.min(kept.len())..) {
                                forget_package(old);
                            }
                            Some(package)
                        }
                        Err(e) => {
                            warn!(%app, error = %e, "worker nodes that lack this app cannot fetch it");
                            for old in self.served.remove(&app).unwrap_or_default() {
                                forget_package(old);
                            }
                            None
                        }
                    };
                    m.set_app(&app, package, now);
                    self.announced.insert(app);
                }
                (Scanned::Changed { deployed, result }, Role::Worker(w)) => {
                    self.deployed.insert(app.clone(), deployed);
                    match result {
                        Ok(p) => {
                            info!(%app, version = %p.package.version, hash = %p.package.hash, "declaring a deployed app");
                            w.set_app(p.package);
                        }
                        Err(e) => {
                            warn!(%app, error = %e, "a deployed app cannot be declared; its tasks fetch it");
                            w.remove_app(&app);
                        }
                    }
                }
            }
        }
    }

    /// Carries out what the state machine asks until it asks nothing more.
    fn drain(&mut self) {
        loop {
            let action = match &mut self.role {
                Role::Manager(m) => m.poll_action().map(Either::Manager),
                Role::Worker(w) => w.poll_action().map(Either::Worker),
                Role::Standalone(_) => None,
            };
            match action {
                Some(Either::Manager(a)) => self.manager_action(a),
                Some(Either::Worker(a)) => self.worker_action(a),
                None => return,
            }
        }
    }

    fn send(&mut self, to: &str, p: &Packet) {
        let m = packet_message(to, p);
        if !p.body.is_answer() {
            self.sent.insert(p.id, to.to_string());
            while self.sent.len() > MAX_SENT {
                self.sent.pop_first();
            }
        }
        self.shared.inject(self.conn, m);
    }

    fn on_message(&mut self, m: Message) {
        let now = UnixMs::now();
        let from = m.from.server.clone();
        let reply_to = m.envelope.reply_to;
        if let Some((package, path, started)) = self.deploys.remove(&reply_to) {
            return self.on_deployed(&m, package, path, started);
        }
        if reply_to != 0 && matches!(m.command.as_str(), "ERROR" | "INVALID" | "QUITTING") {
            // The router (here or on the way) could not deliver one of our requests.
            if let Some(peer) = self.sent.remove(&reply_to) {
                debug!(%peer, id = reply_to, reason = m.get("message").unwrap_or(""), "a task-cluster request was not delivered");
                match &mut self.role {
                    Role::Manager(mg) => mg.handle_undeliverable(&peer, reply_to, now),
                    Role::Worker(w) => w.handle_undeliverable(&peer, reply_to, now),
                    Role::Standalone(_) => {}
                }
            }
            return;
        }
        match m.command.as_str() {
            "AGENTS" => return self.answer_agents(&m),
            "BAN" | "UNBAN" => return self.answer_ban(&m),
            // What the node tells every service it registers, and node notifications: not ours.
            "HELP" | "READY" | "STATUS" | "QUITTING" => return,
            _ => {}
        }
        let packet = match Packet::from_message(&m) {
            Ok(p) => p,
            Err(e) => {
                warn!(%from, command = %m.command, error = %e, "a malformed task-cluster message");
                if m.envelope.id != 0 && reply_to == 0 {
                    let r = m
                        .reply("ERROR")
                        .param("code", "invalid")
                        .param("command", &m.command)
                        .param("message", e.to_string());
                    self.shared.inject(self.conn, r);
                }
                return;
            }
        };
        if packet.body.is_answer() {
            self.sent.remove(&packet.id);
        }
        match &mut self.role {
            Role::Manager(mg) => mg.handle_packet(&from, packet, now),
            Role::Worker(w) => w.handle_packet(&from, packet, now),
            Role::Standalone(s) => {
                if let Some(p) = s.handle(&packet) {
                    self.send(&from, &p);
                }
            }
        }
    }

    fn on_event(&mut self, ev: Event) {
        let now = UnixMs::now();
        match (ev, &mut self.role) {
            (Event::Claimed { owner, app, asked, result }, Role::Manager(m)) => {
                if let Ok(claimed) = &result {
                    for c in claimed {
                        let meta = Attempted {
                            procedure: Arc::from(c.procedure.as_str()),
                            attempt: c.attempt,
                            created_at: c.created_at,
                        };
                        self.assigned.insert(c.id.clone(), meta);
                    }
                }
                m.handle_claimed(&owner, &app, asked, result, now);
            }
            (Event::Recorded { id, lease }, Role::Manager(m)) => m.handle_recorded(&id, lease, now),
            (Event::Scanned { generation, results }, _) => self.on_scanned(generation, results),
            (Event::Verified { package, result }, Role::Worker(w)) => {
                let started = self.fetches.remove(&package.hash).map_or_else(Instant::now, |f| f.started);
                match result {
                    Ok(path) => self.deploy(package, path, started),
                    Err(e) => w.handle_installed(&package, Err(e), now),
                }
            }
            // A killed attempt's end is not reported (the state machine already moved on).
            (Event::Ended { id, lease, end }, Role::Worker(w))
                if self.running.remove(&(id.clone(), lease)).is_some() =>
            {
                w.handle_end(&id, lease, end, now);
            }
            _ => {}
        }
    }

    fn manager_action(&mut self, a: ManagerAction) {
        let store = self.tasks.store().clone();
        let events = self.events.clone();
        match a {
            ManagerAction::Send { to, packet } => self.send(&to, &packet),
            ManagerAction::Claim(c) => {
                let (owner, app, asked) = (c.owner.clone(), c.app.clone(), c.max);
                tokio::spawn(async move {
                    let result =
                        store.claim(c).await.map_err(|e| error!(error = %e, "claiming tasks for a worker failed"));
                    let _ = events.send(Event::Claimed { owner, app, asked, result }).await;
                });
            }
            ManagerAction::Record(f) => {
                let meta = self.assigned.remove(&f.id).unwrap_or_else(|| Attempted {
                    procedure: Arc::from(""),
                    attempt: 0,
                    created_at: UnixMs(0),
                });
                let tasks = self.tasks.clone();
                tokio::spawn(record(tasks, f, meta, events));
            }
            ManagerAction::Agent(change) => {
                tokio::spawn(async move {
                    let r = match change {
                        RegistryChange::Save(a) => store.save_agent(a).await,
                        RegistryChange::Remove(n) => store.remove_agent(n).await.map(drop),
                    };
                    if let Err(e) = r {
                        error!(error = %e, "the agent registry cannot be written");
                    }
                });
            }
            ManagerAction::ServePackage { to, id, app, version, hash, offset, max_len } => {
                let found = self.served.get(&app).and_then(|kept| kept.iter().find(|p| p.package.hash == hash));
                let Some((package, file)) = found.and_then(|p| Some((p.package.clone(), p.file.clone()?.1))) else {
                    let reason = format!(
                        "this manager has no package of app {app} {version} with SHA-256 {hash}: it was redeployed or removed"
                    );
                    return self.send(&to, &Packet::new(id, Body::FetchMissing { reason }));
                };
                let (shared, conn, reads) = (self.shared.clone(), self.conn, self.reads.clone());
                tokio::spawn(async move {
                    let Ok(_permit) = reads.acquire_owned().await else { return };
                    let body = tokio::task::spawn_blocking(move || package::chunk(&file, &package, offset, max_len))
                        .await
                        .unwrap_or_else(|e| Body::FetchMissing { reason: format!("reading the package failed: {e}") });
                    shared.inject(conn, packet_message(&to, &Packet::new(id, body)));
                });
            }
            ManagerAction::Reap(t) => {
                tokio::spawn(async move {
                    if let Err(e) = store.reap(t).await {
                        error!(error = %e, "returning expired leases failed");
                    }
                });
            }
            ManagerAction::Purge(t, max) => {
                tokio::spawn(async move {
                    if let Err(e) = store.purge(t, max).await {
                        error!(error = %e, "purging expired tasks failed");
                    }
                });
            }
        }
    }

    fn worker_action(&mut self, a: WorkerAction) {
        match a {
            WorkerAction::Send { to, packet } => self.send(&to, &packet),
            WorkerAction::Run(spec) => {
                let stop = CancellationToken::new();
                self.running.insert((spec.id.clone(), spec.lease), stop.clone());
                let (engine, events, max) = (self.engine.clone(), self.events.clone(), self.max_result);
                tokio::spawn(async move {
                    let end = tokio::select! {
                        end = run_attempt(&engine, &spec.app, &spec.procedure, &spec.args, max) => end,
                        _ = stop.cancelled() => return,
                    };
                    let _ = events.send(Event::Ended { id: spec.id, lease: spec.lease, end }).await;
                });
            }
            WorkerAction::Kill { id, lease } => {
                if let Some(t) = self.running.remove(&(id, lease)) {
                    t.cancel();
                }
            }
            WorkerAction::PackageData { package, offset, data } => {
                let r = self.fetch(&package).and_then(|f| f.incoming.data(offset, data));
                if let Err(e) = r {
                    self.fetch_failed(&package, e);
                }
            }
            WorkerAction::Install(package) => {
                if let Err(e) = self.fetch(&package).and_then(|f| f.incoming.install()) {
                    self.fetch_failed(&package, e);
                }
            }
            WorkerAction::DropPackage(package) => {
                if let Some(f) = self.fetches.remove(&package.hash) {
                    f.incoming.drop_file();
                }
            }
        }
    }

    /// The fetch of `package` under way, started now if it is not.
    fn fetch(&mut self, package: &AppPackage) -> Result<&Fetch, String> {
        if !self.fetches.contains_key(&package.hash) {
            let path = package::incoming_path(&self.packages.join("incoming"), &package.hash)?;
            let (incoming, verified) = Incoming::start(package, path);
            let (events, p) = (self.events.clone(), package.clone());
            tokio::spawn(async move {
                let result = verified.await.unwrap_or_else(|_| Err("the package's writer stopped".into()));
                let _ = events.send(Event::Verified { package: p, result }).await;
            });
            self.fetches.insert(package.hash.clone(), Fetch { incoming, started: Instant::now() });
        }
        self.fetches.get(&package.hash).ok_or_else(|| "the fetch is gone".to_string())
    }

    /// Writing a fetched package failed: the tasks that need it fail with `DownloadError`.
    fn fetch_failed(&mut self, package: &AppPackage, reason: String) {
        if let Some(f) = self.fetches.remove(&package.hash) {
            f.incoming.drop_file();
        }
        if let Role::Worker(w) = &mut self.role {
            w.handle_installed(package, Err(reason), UnixMs::now());
        }
    }

    /// Deploys a fetched, verified package through this node's `apps` service (as `nodus app
    /// deploy` does); its answer comes to [`Driver::on_deployed`].
    fn deploy(&mut self, package: AppPackage, path: PathBuf, started: Instant) {
        let id = self.next_deploy;
        self.next_deploy += 1;
        let request = Message::new("DEPLOY")
            .to(APPS_SERVICE)
            .param("name", &package.app)
            .param("path", path.display())
            .with_id(id);
        debug!(app = %package.app, version = %package.version, "deploying a fetched package");
        self.deploys.insert(id, (package, path, started));
        self.shared.inject(self.conn, request);
    }

    /// The `apps` service answered a `DEPLOY` of a fetched package: its tasks run, or fail
    /// with `DownloadError` and the service's reason.
    fn on_deployed(&mut self, answer: &Message, package: AppPackage, path: PathBuf, started: Instant) {
        tokio::spawn(async move {
            let _ = tokio::fs::remove_file(path).await;
        });
        // The app store changed (or was rolled back): a scan begun before is not applied.
        self.installs += 1;
        let result = if answer.command == "DEPLOYED" {
            info!(
                app = %package.app,
                version = %package.version,
                deployed_as = answer.get("version").unwrap_or(""),
                bytes = package.size,
                ms = started.elapsed().as_millis() as u64,
                "app package fetched from the manager and deployed"
            );
            Ok(())
        } else {
            let reason = answer.get("message").unwrap_or(answer.command.as_str());
            warn!(app = %package.app, version = %package.version, %reason, "a fetched package cannot be deployed");
            Err(format!("deploying it failed: {reason}"))
        };
        if let Role::Worker(w) = &mut self.role {
            w.handle_installed(&package, result, UnixMs::now());
        }
    }

    fn answer_agents(&self, m: &Message) {
        if m.envelope.id == 0 {
            return;
        }
        let mut r = m.reply("AGENTS").param("role", self.role.name());
        let agents: Vec<serde_json::Value> = match &self.role {
            Role::Manager(mg) => mg.registry().agents().map(agent_json).collect(),
            Role::Worker(w) => {
                r = r.param("manager", w.manager().unwrap_or(""));
                Vec::new()
            }
            Role::Standalone(_) => Vec::new(),
        };
        r = r.param("count", agents.len()).with_payload(serde_json::to_vec(&agents).unwrap_or_default());
        self.shared.inject(self.conn, r);
    }

    fn answer_ban(&mut self, m: &Message) {
        let banned = m.command == "BAN";
        let reply = match (&mut self.role, m.get("name")) {
            (Role::Manager(mg), Some(name)) if !name.is_empty() => {
                mg.ban(name, banned, UnixMs::now());
                m.reply(&m.command).param("name", name).param("banned", banned)
            }
            (Role::Manager(_), _) => m
                .reply("ERROR")
                .param("code", "invalid")
                .param("command", &m.command)
                .param("message", "name= is missing: the agent's server name"),
            (role, _) => m.reply("ERROR").param("code", "invalid").param("command", &m.command).param(
                "message",
                format!("this node is {}, not a manager: it keeps no agent registry ([tasks] role)", role.name()),
            ),
        };
        if m.envelope.id != 0 {
            self.shared.inject(self.conn, reply);
        }
        self.drain();
    }
}

enum Either {
    Manager(ManagerAction),
    Worker(WorkerAction),
}

/// `p` as a node message to the `taskcluster` service of `to`.
fn packet_message(to: &str, p: &Packet) -> Message {
    let mut m = p.to_message().to(CLUSTER_SERVICE);
    m.to.server = to.to_string();
    m
}

/// Deletes a package a manager no longer serves (fetches reading it keep their open file).
fn forget_package(p: Packed) {
    if let Some((path, _)) = p.file {
        tokio::spawn(async move {
            let _ = tokio::fs::remove_file(path).await;
        });
    }
}

/// Records a worker's report until the store takes it (with backoff), then tells the loop.
async fn record(tasks: Tasks<TaskStore>, f: Finish, meta: Attempted, events: mpsc::Sender<Event>) {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5), rand::random());
    let (id, lease) = (f.id.clone(), f.lease);
    loop {
        match tasks.record(vec![(f.clone(), meta.clone())]).await {
            Ok(_) => break,
            Err(e) => {
                let delay = backoff.next_delay();
                error!(task = %id, error = %e, ?delay, "recording a worker's report failed; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
    let _ = events.send(Event::Recorded { id, lease }).await;
}

/// The tasks the store shows running on workers (a manager's restart asks them about these).
async fn in_doubt(tasks: &Tasks<TaskStore>, me: &str) -> Vec<InDoubt> {
    let filter = ListFilter { status: Some(Status::Running), limit: MAX_IN_DOUBT, ..ListFilter::default() };
    let running = match tasks.store().list(filter, UnixMs::now()).await {
        Ok(r) => r,
        Err(e) => {
            error!(error = %e, "the running tasks cannot be read; the store's lease reaper will return them");
            return Vec::new();
        }
    };
    running
        .into_iter()
        .filter_map(|t| {
            let worker = t.owner.clone().filter(|o| o != me)?;
            let app = t.procedure.split_once('.').map_or(t.procedure.as_str(), |(a, _)| a).to_string();
            Some(InDoubt {
                id: t.id,
                lease: t.lease,
                worker,
                app,
                attempt: t.attempt,
                max_attempts: t.max_attempts,
                timeout: t.timeout,
                started_at: t.started_at.unwrap_or_else(UnixMs::now),
            })
        })
        .collect()
}

/// What a worker node declares: the host's cores and memory, its cluster address and that
/// interface's MAC, the configured concurrency, and the procedures of its apps when it starts
/// (informational: the manager places tasks by capacity). The driver adds its packages.
fn specs(config: &crate::config::Config, tasks: &Tasks<TaskStore>) -> Specs {
    let t = &config.tasks;
    let ip: std::net::IpAddr = config
        .cluster
        .advertised()
        .parse::<std::net::SocketAddr>()
        .map(|a| a.ip())
        .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
    let (cores, memory, mac) = match resources::Resources::read(ip) {
        Ok(r) => (r.cores, r.memory, r.mac),
        Err(e) => {
            warn!(error = %e, "the host's resources cannot all be read; declaring what is known");
            (resources::cores(), resources::memory().unwrap_or(0), "00:00:00:00:00:00".to_string())
        }
    };
    let concurrency = if t.worker_concurrency == 0 { cores.max(1) } else { t.worker_concurrency };
    Specs {
        cores,
        memory,
        concurrency,
        queue: t.worker_queue,
        ip: ip.to_string(),
        mac,
        apps: Vec::new(),
        procedures: tasks.procedures().iter().map(|p| p.name.clone()).take(MAX_LIST).collect(),
    }
}

/// An agent as the `AGENTS` answer lists it.
fn agent_json(a: &Agent) -> serde_json::Value {
    json!({
        "id": a.id,
        "name": a.name,
        "ip": a.ip,
        "mac": a.mac,
        "cores": a.cores,
        "memory": a.memory,
        "concurrency": a.concurrency,
        "queue": a.queue,
        "first_seen": a.first_seen.0,
        "last_seen": a.last_seen.0,
        "state": a.state.as_str(),
        "state_since": a.state_since.0,
        "banned": a.banned,
    })
}
