//! The manager's side of seed 002, pure: accepts its configured worker nodes, dispatches tasks
//! from the store to them in batches by declared capacity and current load, records what they
//! report, keeps the agent registry, and answers every request.
//!
//! Inputs: [`Manager::handle_packet`], `handle_undeliverable`, `handle_claimed` (the store
//! answered a claim), `handle_recorded` (a record is durable), `restore` (after the manager's
//! own restart), `set_app`/`handle_submitted`/`abort`/`ban` (from the node and its operator),
//! [`Manager::tick`]. Outputs: [`ManagerAction`]s from [`Manager::poll_action`]. No I/O, no clock.
//!
//! Rules it keeps (the seed's table, seen from the manager):
//! - `ManagerRequest` is accepted only from a configured, unbanned node known as a worker (by
//!   its `NodeTypeRequest`); anything else is answered `accepted: false`. A manager never asks
//!   to be managed, so `ManagerAnswer { accepted: true }` it receives is answered `ManagerBye`.
//! - Relationship messages from a node that is not its worker are answered `NotMine`; so are
//!   `TasksExecute`/`TasksPing`/`TasksAbort` (a manager is nobody's worker). A `NotMine` answer
//!   from a worker (to a message of the current relationship) ends the relationship.
//! - Tasks are claimed from the store with the worker's name as the lease owner, so after a
//!   restart the store says which worker had which task. Claims go to workers with room: at most
//!   `window` tasks per worker, the window starting at its declared concurrency plus queue
//!   (capped by `max_per_worker`), shrinking when it refuses (`Busy`) or cannot start a task
//!   (`NotRun`), growing back by one per task that ran.
//! - A report is recorded in the store fenced by its lease, and acknowledged only once the
//!   record is durable: a worker forgets a result only when the manager cannot lose it. A late
//!   report from an abandoned attempt is fenced off by the store (exactly one recorded
//!   completion), and still acknowledged.
//! - A task with no report `worker_grace` past its timeout is recorded `TimedOut` and aborted on
//!   its worker (`TasksAbort`), whether or not the worker answered its `TasksExecute` (an
//!   unanswered one may be held by a frozen worker; only a refusal, `NotMine` or an
//!   undeliverable one gives its tasks back uncounted). A worker silent for `silent_after` is marked silent; for
//!   `gone_after`, gone: the relationship ends and its tasks run again (new attempt, new lease).
//! - After a restart, the tasks the store shows running on workers are asked about with
//!   `TasksPing`: completed ones are recorded, unknown ones run again, the others are watched.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use nodus_wire::Backoff;

use super::calls::{Calls, Expired};
use super::fetch::{Download, FetchError, Progress};
use super::msg::{
    AppPackage, Blob, Body, NodeType, Packet, RefuseReason, ResultBody, Specs, TaskReport, TaskSpec, TaskStatus,
    MAX_LIST,
};
use super::registry::{Agent, AgentState, Registry, RegistryChange, RegistryConfig};
use crate::store::{Claim, Finish, Outcome};
use crate::task::{json, Claimed, ErrorKind, Lease, TaskError, TaskId, UnixMs};

/// Most attempts remembered as durably recorded (so duplicate reports need no write).
pub const MAX_RECENT: usize = 65_536;

/// A manager's settings and bounds.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// This node's server name.
    pub name: String,
    /// The worker nodes it accepts (server names).
    pub workers: BTreeSet<String>,
    /// How often each worker is pinged (echolocation).
    pub ping_interval: Duration,
    /// A worker not heard from for this long is marked silent.
    pub silent_after: Duration,
    /// A worker not heard from for this long is gone: the relationship ends and its tasks run
    /// again elsewhere.
    pub gone_after: Duration,
    /// A request unanswered for this long is sent again, `retries` times.
    pub request_timeout: Duration,
    /// See `request_timeout`.
    pub retries: u32,
    /// How long past a task's timeout the manager waits for its worker's report before it
    /// records `TimedOut` itself. Shorter than `lease_grace`, so the manager acts before the
    /// store reaps the lease.
    pub worker_grace: Duration,
    /// Lease grace of claims (see [`Claim::lease_grace`]).
    pub lease_grace: Duration,
    /// Most tasks one worker holds, whatever it declares.
    pub max_per_worker: usize,
    /// Most tasks claimed at once (also the most in one `TasksExecute`, at most [`MAX_LIST`]).
    pub claim_batch: usize,
    /// A `TasksExecute` stops growing at this many bytes of arguments.
    pub batch_bytes: usize,
    /// Retry delay after a worker process failure: from `retry_min`, doubling, to `retry_max`.
    pub retry_min: Duration,
    /// See `retry_min`.
    pub retry_max: Duration,
    /// How often every app is checked for due tasks even without news.
    pub poll_interval: Duration,
    /// How often expired leases are returned to pending (a safety net behind `worker_grace`).
    pub reap_interval: Duration,
    /// How often expired results are purged, and how many at most each time.
    pub purge_interval: Duration,
    /// See `purge_interval`.
    pub purge_batch: usize,
    /// Largest result fetched from a worker; a larger one fails its task.
    pub max_result_bytes: u64,
    /// Most results fetched at once (the others wait their turn).
    pub max_fetches: usize,
    /// Chunk size of fetches.
    pub fetch_chunk: u32,
    /// The agent registry's timing and bound.
    pub registry: RegistryConfig,
}

impl ManagerConfig {
    /// Defaults for a manager called `name` accepting `workers`.
    pub fn new(name: impl Into<String>, workers: impl IntoIterator<Item = String>) -> ManagerConfig {
        ManagerConfig {
            name: name.into(),
            workers: workers.into_iter().collect(),
            ping_interval: Duration::from_secs(2),
            silent_after: Duration::from_secs(6),
            gone_after: Duration::from_secs(20),
            request_timeout: Duration::from_secs(2),
            retries: 3,
            worker_grace: Duration::from_secs(10),
            lease_grace: Duration::from_secs(30),
            max_per_worker: 4096,
            claim_batch: 256,
            batch_bytes: 1 << 20,
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            reap_interval: Duration::from_secs(5),
            purge_interval: Duration::from_secs(10),
            purge_batch: 10_000,
            max_result_bytes: 16 << 20,
            max_fetches: 8,
            fetch_chunk: 1 << 20,
            registry: RegistryConfig::default(),
        }
    }
}

/// A task the store shows running on a worker when the manager starts (it was dispatched
/// before the manager's restart).
#[derive(Debug, Clone)]
pub struct InDoubt {
    /// The task.
    pub id: TaskId,
    /// Its current lease.
    pub lease: Lease,
    /// The worker it was sent to (the lease owner).
    pub worker: String,
    /// Its app.
    pub app: String,
    /// Its attempt number.
    pub attempt: u32,
    /// Most attempts.
    pub max_attempts: u32,
    /// Its timeout.
    pub timeout: Duration,
    /// When the attempt was claimed.
    pub started_at: UnixMs,
}

/// What the driver of a manager must do.
#[derive(Debug, Clone)]
pub enum ManagerAction {
    /// Send a request or an answer to a worker node.
    Send {
        /// The peer.
        to: String,
        /// What.
        packet: Packet,
    },
    /// Claim tasks from the store (owner: the worker); answer with [`Manager::handle_claimed`].
    Claim(Claim),
    /// Record an attempt's end in the store; once durable (applied or stale), call
    /// [`Manager::handle_recorded`].
    Record(Finish),
    /// Store a registry change.
    Agent(RegistryChange),
    /// Answer a worker's `Fetch` of a package with `FetchChunk` or `FetchMissing` (as packet
    /// `id` to `to`).
    ServePackage {
        /// The worker.
        to: String,
        /// The request's id.
        id: u64,
        /// The package's app.
        app: String,
        /// Its version.
        version: String,
        /// Its content hash.
        hash: String,
        /// From this byte.
        offset: u64,
        /// At most this many bytes.
        max_len: u32,
    },
    /// Return tasks whose lease ran out to pending.
    Reap(UnixMs),
    /// Purge up to this many results expired at this time.
    Purge(UnixMs, usize),
}

#[derive(Debug, Clone)]
enum CallKind {
    Execute { epoch: u64, tasks: Vec<(TaskId, Lease)> },
    Ping { epoch: u64 },
    TasksPing { epoch: u64 },
    Abort,
    Bye,
    Fetch { task: TaskId, lease: Lease },
}

#[derive(Debug)]
struct Worker {
    epoch: u64,
    /// It answered in this relationship (false after a restore until it does).
    confirmed: bool,
    capacity: usize,
    window: usize,
    /// Tasks assigned plus tasks being claimed for it.
    inflight: usize,
    claiming: bool,
    last_heard: UnixMs,
    next_ping: UnixMs,
    pinging: bool,
    /// Marked silent in the registry.
    silent: bool,
    app_cursor: usize,
    /// No claims for it until then (it refused tasks, or could not start one).
    paused_until: Option<UnixMs>,
    pause: Backoff,
}

impl Worker {
    fn new(epoch: u64, confirmed: bool, capacity: usize, now: UnixMs, ping_interval: Duration, seed: u64) -> Worker {
        Worker {
            epoch,
            confirmed,
            capacity,
            window: capacity,
            inflight: 0,
            claiming: false,
            last_heard: now,
            next_ping: now.plus(ping_interval),
            pinging: false,
            silent: false,
            app_cursor: 0,
            paused_until: None,
            pause: Backoff::new(Duration::from_millis(5), Duration::from_secs(2), seed),
        }
    }

    /// It took less than it was given: the window shrinks to what it holds, and it is left
    /// alone for a while (longer while refusals go on), so a busy worker is not asked in a loop.
    fn shrink(&mut self, now: UnixMs) {
        self.window = self.inflight.clamp(1, self.capacity.max(1));
        if self.paused_until.is_none() {
            self.paused_until = Some(now.plus(self.pause.next_delay()));
        }
    }
}

#[derive(Debug)]
struct Assigned {
    worker: String,
    lease: Lease,
    attempt: u32,
    max_attempts: u32,
    app: String,
    deadline: UnixMs,
}

#[derive(Debug, Default)]
struct App {
    package: Option<AppPackage>,
    has_work: bool,
    wake_at: Option<UnixMs>,
    paused_until: Option<UnixMs>,
}

#[derive(Debug)]
struct Pending {
    /// Reports to acknowledge once the record is durable.
    acks: Vec<(String, u64)>,
    /// The manager gave the attempt up.
    abandoned: bool,
}

#[derive(Debug)]
struct ResultFetch {
    worker: String,
    download: Download,
    acks: Vec<u64>,
}

/// Counters of what a manager did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ManagerStats {
    /// Tasks sent to workers.
    pub dispatched: u64,
    /// Completions recorded (some may be stale in the store).
    pub completed: u64,
    /// Errors reported by workers.
    pub errors: u64,
    /// Tasks that ran again because their worker was lost or no longer knew them.
    pub lost: u64,
    /// Tasks the manager timed out itself.
    pub timed_out: u64,
    /// Tasks refused by workers or not started by them (they ran again, not counted).
    pub released: u64,
    /// Reports of attempts the manager had given up (late completions), discarded.
    pub late_discarded: u64,
    /// Reports received again after their record (resent or duplicated), answered at once.
    pub repeats: u64,
}

/// The manager's protocol state.
#[derive(Debug)]
pub struct Manager {
    config: ManagerConfig,
    seed: u64,
    calls: Calls<CallKind>,
    epoch: u64,
    types: BTreeMap<String, NodeType>,
    workers: BTreeMap<String, Worker>,
    registry: Registry,
    apps: BTreeMap<String, App>,
    app_pause: Backoff,
    assigned: BTreeMap<TaskId, Assigned>,
    deadlines: BTreeSet<(UnixMs, TaskId, Lease)>,
    /// Reports waiting for their record to be durable: the ids of the messages to acknowledge.
    pending_acks: BTreeMap<(TaskId, Lease), Pending>,
    fetches: BTreeMap<(TaskId, Lease), ResultFetch>,
    fetch_queue: VecDeque<(String, TaskId, Lease, u64, String, u64)>,
    /// Attempts whose record is durable (bounded by [`MAX_RECENT`], oldest forgotten first):
    /// reports about them are answered without writing again.
    recent: BTreeMap<(TaskId, Lease), bool>,
    recent_order: VecDeque<(TaskId, Lease)>,
    /// Tasks to ask about once the current answer is sent.
    after_answer: Vec<(String, Vec<TaskId>)>,
    next_poll: UnixMs,
    next_reap: UnixMs,
    next_purge: UnixMs,
    stats: ManagerStats,
    actions: VecDeque<ManagerAction>,
    /// When agents of the previous life that did not come back are marked gone.
    sweep: Option<UnixMs>,
}

fn mix(seed: u64, s: &str) -> u64 {
    s.bytes().fold(seed ^ 0x9e37_79b9_7f4a_7c15, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

impl Manager {
    /// A manager with the registry as stored (`agents`); `seed` makes ids and backoff jitter
    /// reproducible.
    ///
    /// Agents the registry holds as active or silent were paired with the manager's previous
    /// life: they are silent now (nothing heard since the start), active again when they pair
    /// again (or answer the `TasksPing` of [`Manager::restore`]), gone after `gone_after`.
    pub fn new(config: ManagerConfig, agents: Vec<Agent>, seed: u64, now: UnixMs) -> Manager {
        let mut registry = Registry::new(config.registry.clone(), agents, seed);
        let first_id = seed.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 16;
        let before: Vec<String> =
            registry.agents().filter(|a| a.state != AgentState::Gone).map(|a| a.name.clone()).collect();
        let actions = before
            .iter()
            .filter_map(|name| registry.set_state(name, AgentState::Silent, now))
            .map(ManagerAction::Agent)
            .collect();
        let sweep = (!before.is_empty()).then(|| now.plus(config.gone_after));
        Manager {
            sweep,
            app_pause: Backoff::new(Duration::from_millis(5), Duration::from_secs(2), seed),
            next_poll: now.plus(config.poll_interval),
            next_reap: now.plus(config.reap_interval),
            next_purge: now.plus(config.purge_interval),
            config,
            seed,
            calls: Calls::new(first_id),
            epoch: 0,
            types: BTreeMap::new(),
            workers: BTreeMap::new(),
            registry,
            apps: BTreeMap::new(),
            assigned: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            pending_acks: BTreeMap::new(),
            fetches: BTreeMap::new(),
            fetch_queue: VecDeque::new(),
            after_answer: Vec::new(),
            recent: BTreeMap::new(),
            recent_order: VecDeque::new(),
            stats: ManagerStats::default(),
            actions,
        }
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<ManagerAction> {
        self.actions.pop_front()
    }

    /// What it did so far.
    pub fn stats(&self) -> ManagerStats {
        self.stats
    }

    /// Its paired workers' names.
    pub fn workers(&self) -> impl Iterator<Item = &str> {
        self.workers.keys().map(String::as_str)
    }

    /// The agent registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The worker task `id` is assigned to.
    pub fn assigned_to(&self, id: &TaskId) -> Option<&str> {
        self.assigned.get(id).map(|a| a.worker.as_str())
    }

    /// Tasks assigned to workers.
    pub fn assigned(&self) -> usize {
        self.assigned.len()
    }

    fn send(&mut self, to: &str, packet: Packet) {
        self.actions.push_back(ManagerAction::Send { to: to.to_string(), packet });
    }

    fn request(&mut self, to: &str, body: Body, kind: CallKind, now: UnixMs) -> u64 {
        let p = self.calls.start(to, body, kind, now, self.config.request_timeout, self.config.retries);
        let id = p.id;
        self.send(to, p);
        id
    }

    fn registry_change(&mut self, change: Option<RegistryChange>) {
        if let Some(c) = change {
            self.actions.push_back(ManagerAction::Agent(c));
        }
    }

    // ---- apps ----

    /// `app` has procedures that can run as tasks; `package` is what a worker needs to run them
    /// (it fetches it when it lacks it). Its pending tasks are looked for at once.
    pub fn set_app(&mut self, app: &str, package: Option<AppPackage>, now: UnixMs) {
        let a = self.apps.entry(app.to_string()).or_default();
        a.package = package;
        a.has_work = true;
        a.paused_until = None;
        self.plan(now);
    }

    /// `app` can no longer run tasks: nothing more is claimed for it.
    pub fn remove_app(&mut self, app: &str) {
        self.apps.remove(app);
    }

    /// New tasks of `app` were stored.
    pub fn handle_submitted(&mut self, app: &str, now: UnixMs) {
        if let Some(a) = self.apps.get_mut(app) {
            a.has_work = true;
        }
        self.plan(now);
    }

    // ---- restore ----

    /// After the manager's restart: the tasks the store shows running on workers. Their
    /// workers are asked about them (`TasksPing`); until they answer, nothing more is sent to
    /// them. Tasks of workers no longer configured (or banned) run again at once.
    pub fn restore(&mut self, in_doubt: Vec<InDoubt>, now: UnixMs) {
        let mut by_worker: BTreeMap<String, Vec<TaskId>> = BTreeMap::new();
        for t in in_doubt {
            if !self.config.workers.contains(&t.worker) || self.registry.is_banned(&t.worker) {
                let a = Assigned {
                    worker: t.worker,
                    lease: t.lease,
                    attempt: t.attempt,
                    max_attempts: t.max_attempts,
                    app: t.app,
                    deadline: now,
                };
                self.lose_assigned(t.id, a, "its worker is no longer configured", now);
                continue;
            }
            if !self.workers.contains_key(&t.worker) {
                let capacity = self
                    .registry
                    .get(&t.worker)
                    .map_or(1, |a| (a.concurrency as usize + a.queue as usize).clamp(1, self.config.max_per_worker));
                self.epoch += 1;
                self.workers.insert(
                    t.worker.clone(),
                    Worker::new(self.epoch, false, capacity, now, self.config.ping_interval, mix(self.seed, &t.worker)),
                );
            }
            // The worker gets time to answer before the manager's own timeout acts, even when
            // the task's deadline passed while the manager was down.
            let deadline =
                t.started_at.plus(t.timeout).plus(self.config.worker_grace).max(now.plus(self.config.gone_after));
            self.deadlines.insert((deadline, t.id.clone(), t.lease));
            if let Some(w) = self.workers.get_mut(&t.worker) {
                w.inflight += 1;
            }
            by_worker.entry(t.worker.clone()).or_default().push(t.id.clone());
            self.apps.entry(t.app.clone()).or_default();
            self.assigned.insert(
                t.id,
                Assigned {
                    worker: t.worker,
                    lease: t.lease,
                    attempt: t.attempt,
                    max_attempts: t.max_attempts,
                    app: t.app,
                    deadline,
                },
            );
        }
        for (worker, ids) in by_worker {
            tracing::info!(manager = %self.config.name, %worker, tasks = ids.len(), "asking a worker about its tasks after a restart");
            self.ping_tasks(&worker, ids, now);
        }
    }

    fn ping_tasks(&mut self, worker: &str, ids: Vec<TaskId>, now: UnixMs) {
        let Some(epoch) = self.workers.get(worker).map(|w| w.epoch) else { return };
        for chunk in ids.chunks(MAX_LIST) {
            self.request(worker, Body::TasksPing { tasks: chunk.to_vec() }, CallKind::TasksPing { epoch }, now);
        }
    }

    // ---- operator ----

    /// An operator bans (or lets back) a worker node. A banned worker that is paired is told
    /// `ManagerBye` and its tasks run again elsewhere.
    pub fn ban(&mut self, name: &str, banned: bool, now: UnixMs) {
        let change = self.registry.ban(name, banned, now);
        self.registry_change(change);
        if banned && self.workers.contains_key(name) {
            self.end_relationship(name, "banned by an operator", now);
            self.request(name, Body::ManagerBye, CallKind::Bye, now);
        }
        self.plan(now);
    }

    /// Task `id` was aborted (its store record already finished): its worker is told to stop
    /// it (`TasksAbort`). Returns whether it was assigned.
    pub fn abort(&mut self, id: &TaskId, now: UnixMs) -> bool {
        let Some(a) = self.unassign(id) else { return false };
        self.request(&a.worker, Body::TasksAbort { tasks: vec![id.clone()] }, CallKind::Abort, now);
        self.plan(now);
        true
    }

    // ---- relationship ----

    fn is_worker(&self, peer: &str) -> bool {
        self.workers.contains_key(peer)
    }

    fn end_relationship(&mut self, worker: &str, why: &str, now: UnixMs) {
        let Some(_) = self.workers.remove(worker) else { return };
        tracing::info!(manager = %self.config.name, %worker, why, "relationship with the worker ended");
        for (_, kind) in self.calls.drop_peer(worker) {
            match kind {
                CallKind::Execute { tasks, .. } => {
                    // Never accepted: they run again, and the attempt does not count.
                    for (id, lease) in tasks {
                        if self.assigned.get(&id).is_some_and(|a| a.lease == lease) {
                            let a = self.unassign(&id).expect("checked");
                            self.release(id, a.lease, now);
                        }
                    }
                }
                CallKind::Fetch { task, lease } => {
                    if let Some(f) = self.fetches.remove(&(task.clone(), lease)) {
                        self.fetch_failed(task, lease, f, FetchError::Failed(why.to_string()), now);
                    }
                }
                _ => {}
            }
        }
        self.fetch_queue.retain(|(w, ..)| w != worker);
        let ids: Vec<TaskId> =
            self.assigned.iter().filter(|(_, a)| a.worker == worker).map(|(id, _)| id.clone()).collect();
        for id in ids {
            let a = self.unassign(&id).expect("listed");
            self.lose_assigned(id, a, why, now);
        }
        let change = self.registry.set_state(worker, AgentState::Gone, now);
        self.registry_change(change);
        self.start_fetches(now);
    }

    fn learn_type(&mut self, peer: &str, node_type: NodeType, now: UnixMs) {
        if !self.config.workers.contains(peer) {
            return;
        }
        self.types.insert(peer.to_string(), node_type);
        if node_type != NodeType::Worker && self.is_worker(peer) {
            self.end_relationship(peer, "its node type changed", now);
            self.request(peer, Body::ManagerBye, CallKind::Bye, now);
        }
    }

    fn accept(&mut self, peer: &str, specs: Specs, now: UnixMs) -> bool {
        let refusal = if !self.config.workers.contains(peer) {
            Some("not a configured worker")
        } else if self.registry.is_banned(peer) {
            Some("banned")
        } else if self.types.get(peer) != Some(&NodeType::Worker) {
            Some("not known as a worker")
        } else if !self.registry.has_room_for(peer) {
            Some("the agent registry is full")
        } else {
            None
        };
        if let Some(why) = refusal {
            tracing::info!(manager = %self.config.name, worker = %peer, why, "refusing a ManagerRequest");
            return false;
        }
        let capacity = (specs.concurrency as usize + specs.queue as usize).min(self.config.max_per_worker);
        let change = self.registry.register(peer, &specs, now);
        self.registry_change(change);
        self.epoch += 1;
        let epoch = self.epoch;
        match self.workers.get_mut(peer) {
            Some(w) => {
                // It asked again while this manager held it: it lost the relationship (a
                // restart, or it judged this manager gone). Its tasks here are in doubt.
                w.epoch = epoch;
                w.confirmed = true;
                w.capacity = capacity;
                w.window = w.window.clamp(1, capacity.max(1));
                w.last_heard = now;
                let ids: Vec<TaskId> =
                    self.assigned.iter().filter(|(_, a)| a.worker == peer).map(|(id, _)| id.clone()).collect();
                if !ids.is_empty() {
                    // Asked after the acceptance is sent: a worker not yet paired would answer
                    // NotMine.
                    self.after_answer.push((peer.to_string(), ids));
                }
            }
            None => {
                self.workers.insert(
                    peer.to_string(),
                    Worker::new(epoch, true, capacity, now, self.config.ping_interval, mix(self.seed, peer)),
                );
            }
        }
        tracing::info!(manager = %self.config.name, worker = %peer, capacity, "accepted a worker");
        true
    }

    fn confirm(&mut self, worker: &str) {
        if let Some(w) = self.workers.get_mut(worker) {
            w.confirmed = true;
        }
    }

    // ---- inputs ----

    /// A message from `from` (already decoded).
    pub fn handle_packet(&mut self, from: &str, packet: Packet, now: UnixMs) {
        if let Some(w) = self.workers.get_mut(from) {
            w.last_heard = now;
            w.silent = false;
            let change = self.registry.heard(from, now);
            self.registry_change(change);
        }
        if packet.body.is_answer() {
            let kind = self.calls.answered(from, packet.id);
            self.handle_answer(from, kind, packet.body, now);
        } else if let Some(answer) = self.handle_request(from, packet.id, packet.body, now) {
            self.send(from, Packet::new(packet.id, answer));
        }
        for (worker, ids) in std::mem::take(&mut self.after_answer) {
            self.ping_tasks(&worker, ids, now);
        }
        self.plan(now);
    }

    /// The transport could not deliver request `id` to `to`.
    pub fn handle_undeliverable(&mut self, to: &str, id: u64, now: UnixMs) {
        match self.calls.kind(to, id) {
            Some(CallKind::Ping { .. }) => {
                self.calls.answered(to, id);
                if let Some(w) = self.workers.get_mut(to) {
                    w.pinging = false;
                }
            }
            Some(CallKind::Execute { .. }) => {
                let kind = self.calls.answered(to, id).expect("present");
                self.call_failed(to, kind, now);
            }
            // Others are sent again at their deadline; silence is judged by `gone_after`.
            _ => {}
        }
        self.plan(now);
    }

    /// `None`: the answer comes later (once a record is durable, or from the driver).
    fn handle_request(&mut self, from: &str, id: u64, body: Body, now: UnixMs) -> Option<Body> {
        let mine = self.is_worker(from);
        Some(match body {
            Body::NodeTypeRequest { node_type } => {
                self.learn_type(from, node_type, now);
                Body::NodeTypeAnswer { node_type: NodeType::Manager }
            }
            Body::ManagerRequest(specs) => Body::ManagerAnswer { accepted: self.accept(from, specs, now) },
            Body::ManagerBye => {
                if mine {
                    self.end_relationship(from, "it said bye", now);
                }
                Body::Ack
            }
            Body::ManagerPing if mine => {
                self.confirm(from);
                Body::ManagerPong
            }
            Body::TaskStarted { task_id, lease, .. } if mine => {
                self.confirm(from);
                let ours = self.assigned.get(&task_id).is_some_and(|a| a.worker == from);
                let key = (task_id.clone(), lease);
                if !ours && !self.pending_acks.contains_key(&key) && !self.recent.contains_key(&key) {
                    // An attempt this manager no longer expects there (it timed out, ran
                    // elsewhere, or finished): stop it.
                    self.request(from, Body::TasksAbort { tasks: vec![task_id] }, CallKind::Abort, now);
                }
                Body::Ack
            }
            Body::TaskError { task_id, lease, .. } if mine && self.recent.contains_key(&(task_id.clone(), lease)) => {
                self.count_repeat(&(task_id, lease));
                Body::Ack
            }
            Body::TaskError { task_id, lease, error, message } if mine => {
                self.confirm(from);
                self.stats.errors += 1;
                let outcome = self.error_outcome(from, &task_id, lease, error, message, now);
                self.record(task_id, lease, outcome, vec![(from.to_string(), id)], false, now);
                return None;
            }
            Body::TaskCompleted { task_id, lease, result } if mine => {
                self.confirm(from);
                return self.completed(from, id, task_id, lease, result, now);
            }
            Body::Fetch { blob: Blob::Package { app, version, hash }, offset, max_len } if mine => {
                self.actions.push_back(ManagerAction::ServePackage {
                    to: from.to_string(),
                    id,
                    app,
                    version,
                    hash,
                    offset,
                    max_len,
                });
                return None;
            }
            Body::Fetch { .. } if mine => Body::FetchMissing { reason: "a manager holds no results".into() },
            _ => Body::NotMine,
        })
    }

    fn handle_answer(&mut self, from: &str, kind: Option<CallKind>, body: Body, now: UnixMs) {
        match (kind, body) {
            (_, Body::ManagerAnswer { accepted: true }) => {
                // Whoever accepted: a manager cannot be anyone's worker.
                tracing::info!(manager = %self.config.name, peer = %from, "a manager was accepted as a worker; saying bye");
                self.request(from, Body::ManagerBye, CallKind::Bye, now);
            }
            (Some(CallKind::Ping { epoch }), Body::ManagerPong) => {
                if let Some(w) = self.workers.get_mut(from).filter(|w| w.epoch == epoch) {
                    w.pinging = false;
                    w.confirmed = true;
                }
            }
            // Taken: the tasks are watched by their deadlines and the worker's reports.
            (Some(CallKind::Execute { .. }), Body::Ack) => {}
            (Some(CallKind::Execute { tasks, .. }), Body::TasksRefused { tasks: refused }) => {
                let busy = refused.iter().any(|r| r.reason == RefuseReason::Busy);
                for r in refused {
                    let Some((_, lease)) = tasks.iter().find(|(id, _)| *id == r.task_id) else { continue };
                    if self.assigned.get(&r.task_id).is_some_and(|a| a.worker == from && a.lease == *lease) {
                        tracing::debug!(task = %r.task_id, worker = %from, reason = r.reason.as_str(), message = %r.message, "task refused");
                        let a = self.unassign(&r.task_id).expect("checked");
                        self.release(r.task_id, a.lease, now);
                    }
                }
                if busy {
                    if let Some(w) = self.workers.get_mut(from) {
                        w.shrink(now);
                    }
                }
            }
            (Some(CallKind::TasksPing { epoch }), Body::TasksPong { tasks_status }) => {
                if self.workers.get(from).is_some_and(|w| w.epoch == epoch) {
                    self.confirm(from);
                }
                for report in tasks_status {
                    self.task_report(from, report, now);
                }
            }
            (Some(CallKind::Fetch { task, lease }), Body::FetchChunk { total, offset, data }) => {
                self.fetched(from, task, lease, total, offset, &data, now)
            }
            (Some(CallKind::Fetch { task, lease }), Body::FetchMissing { reason }) => {
                if let Some(f) = self.fetches.remove(&(task.clone(), lease)) {
                    self.fetch_failed(task, lease, f, FetchError::Missing(reason), now);
                }
            }
            (Some(kind), Body::NotMine) => {
                let epoch = match &kind {
                    CallKind::Execute { epoch, .. } | CallKind::Ping { epoch } | CallKind::TasksPing { epoch } => {
                        Some(*epoch)
                    }
                    _ => None,
                };
                // Only an answer about the current relationship ends it.
                let current = self.workers.get(from).is_some_and(|w| epoch.is_none_or(|e| e == w.epoch));
                self.call_failed(from, kind, now);
                if current {
                    self.end_relationship(from, "it answered NotMine", now);
                }
            }
            (Some(CallKind::Abort | CallKind::Bye), _) => {}
            (Some(kind), body) => {
                tracing::debug!(manager = %self.config.name, peer = %from, answer = body.command(), "unexpected answer");
                self.call_failed(from, kind, now);
            }
            (None, _) => {} // late or stray answers
        }
    }

    fn call_failed(&mut self, peer: &str, kind: CallKind, now: UnixMs) {
        match kind {
            CallKind::Execute { tasks, .. } => {
                // Perhaps never delivered: they run again (a late completion of these attempts
                // is fenced off by their leases).
                for (id, lease) in tasks {
                    if self.assigned.get(&id).is_some_and(|a| a.worker == peer && a.lease == lease) {
                        let a = self.unassign(&id).expect("checked");
                        self.release(id, a.lease, now);
                    }
                }
            }
            CallKind::Ping { .. } => {
                if let Some(w) = self.workers.get_mut(peer) {
                    w.pinging = false;
                }
            }
            CallKind::TasksPing { .. } => {
                if self.workers.get(peer).is_some_and(|w| !w.confirmed) {
                    self.end_relationship(peer, "it did not answer after the manager's restart", now);
                }
            }
            CallKind::Fetch { task, lease } => {
                if let Some(f) = self.fetches.remove(&(task.clone(), lease)) {
                    self.fetch_failed(task, lease, f, FetchError::Failed(format!("{peer} did not answer")), now);
                }
            }
            CallKind::Abort | CallKind::Bye => {}
        }
    }

    // ---- tasks ----

    fn unassign(&mut self, id: &TaskId) -> Option<Assigned> {
        let a = self.assigned.remove(id)?;
        self.deadlines.remove(&(a.deadline, id.clone(), a.lease));
        if let Some(w) = self.workers.get_mut(&a.worker) {
            w.inflight = w.inflight.saturating_sub(1);
        }
        Some(a)
    }

    fn release(&mut self, id: TaskId, lease: Lease, now: UnixMs) {
        self.stats.released += 1;
        self.record(id, lease, Outcome::Release { run_after: now }, vec![], true, now);
    }

    fn wake(&mut self, app: &str, at: UnixMs) {
        if let Some(a) = self.apps.get_mut(app) {
            a.wake_at = Some(a.wake_at.map_or(at, |w| w.min(at)));
        }
    }

    /// The task ran again because its worker was lost: a new attempt while attempts remain.
    fn lose_assigned(&mut self, id: TaskId, a: Assigned, why: &str, now: UnixMs) {
        self.stats.lost += 1;
        let error = TaskError::new(ErrorKind::WorkerLost, format!("worker node {} was lost: {why}", a.worker));
        let outcome = if a.attempt < a.max_attempts {
            Outcome::Retry { run_after: now, error }
        } else {
            Outcome::Failed(TaskError::new(
                ErrorKind::WorkerLost,
                format!("lost with its worker node in all {} attempts; last: {}", a.max_attempts, error.message),
            ))
        };
        self.apps.entry(a.app.clone()).or_default().has_work = true;
        self.record(id, a.lease, outcome, vec![], true, now);
    }

    fn retry_delay(&self, id: &TaskId, attempt: u32) -> Duration {
        let mut b = Backoff::new(self.config.retry_min, self.config.retry_max, mix(self.seed, id.as_str()));
        let mut delay = b.next_delay();
        for _ in 1..attempt {
            delay = b.next_delay();
        }
        delay
    }

    fn error_outcome(
        &mut self,
        worker: &str,
        id: &TaskId,
        lease: Lease,
        kind: ErrorKind,
        message: String,
        now: UnixMs,
    ) -> Outcome {
        let tracked = self.assigned.get(id).is_some_and(|a| a.worker == worker && a.lease == lease);
        let a = if tracked { self.unassign(id) } else { None };
        let error = TaskError::new(kind, message);
        match kind {
            ErrorKind::NotRun => {
                self.stats.released += 1;
                if let Some(w) = self.workers.get_mut(worker) {
                    w.shrink(now);
                }
                if let Some(a) = &a {
                    let pause = self.app_pause.next_delay();
                    if let Some(app) = self.apps.get_mut(&a.app) {
                        app.has_work = true;
                        app.paused_until.get_or_insert(now.plus(pause));
                    }
                }
                Outcome::Release { run_after: now }
            }
            ErrorKind::WorkerFailed | ErrorKind::DownloadError | ErrorKind::WorkerLost => match a {
                Some(a) if a.attempt < a.max_attempts => {
                    let run_after = now.plus(self.retry_delay(id, a.attempt));
                    self.wake(&a.app, run_after);
                    Outcome::Retry { run_after, error }
                }
                Some(a) => Outcome::Failed(TaskError::new(
                    kind,
                    format!("failed in all {} attempts; last: {}", a.max_attempts, error.message),
                )),
                None => Outcome::Failed(error),
            },
            ErrorKind::TimedOut | ErrorKind::RunningError | ErrorKind::Aborted | ErrorKind::Expired => {
                if let Some(a) = &a {
                    self.grow(&a.worker);
                }
                Outcome::Failed(error)
            }
        }
    }

    fn grow(&mut self, worker: &str) {
        if let Some(w) = self.workers.get_mut(worker) {
            w.window = (w.window + 1).min(w.capacity);
            w.pause.reset();
        }
    }

    fn completed(
        &mut self,
        from: &str,
        id: u64,
        task: TaskId,
        lease: Lease,
        result: ResultBody,
        now: UnixMs,
    ) -> Option<Body> {
        let key = (task.clone(), lease);
        if self.recent.contains_key(&key) {
            self.count_repeat(&key);
            return Some(Body::Ack);
        }
        if let Some(p) = self.pending_acks.get_mut(&key) {
            p.acks.push((from.to_string(), id));
            return None;
        }
        if let Some(f) = self.fetches.get_mut(&key) {
            f.acks.push(id);
            return None;
        }
        match result {
            ResultBody::Inline(result) => {
                self.stats.completed += 1;
                if self.assigned.get(&task).is_some_and(|a| a.worker == from && a.lease == lease) {
                    self.unassign(&task);
                    self.grow(from);
                }
                self.record(task, lease, Outcome::Done(result), vec![(from.to_string(), id)], false, now);
            }
            ResultBody::Held { size, .. } if size > self.config.max_result_bytes => {
                let message = format!("the result has {size} bytes; at most {} are kept", self.config.max_result_bytes);
                if self.assigned.get(&task).is_some_and(|a| a.worker == from && a.lease == lease) {
                    self.unassign(&task);
                }
                let outcome = Outcome::Failed(TaskError::new(ErrorKind::RunningError, message));
                self.record(task, lease, outcome, vec![(from.to_string(), id)], false, now);
            }
            ResultBody::Held { size, hash } => {
                if !self.fetch_queue.iter().any(|(w, t, l, ..)| w == from && *t == task && *l == lease) {
                    self.fetch_queue.push_back((from.to_string(), task, lease, size, hash, id));
                }
                self.start_fetches(now);
            }
        }
        None
    }

    fn start_fetches(&mut self, now: UnixMs) {
        while self.fetches.len() < self.config.max_fetches.max(1) {
            let Some((worker, task, lease, _size, hash, ack)) = self.fetch_queue.pop_front() else { break };
            if !self.is_worker(&worker) {
                continue;
            }
            let blob = Blob::Result { task_id: task.clone(), lease };
            let download = Download::new(blob, &hash, self.config.max_result_bytes, self.config.fetch_chunk, true);
            let body = download.request();
            self.fetches
                .insert((task.clone(), lease), ResultFetch { worker: worker.clone(), download, acks: vec![ack] });
            self.request(&worker, body, CallKind::Fetch { task, lease }, now);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn fetched(&mut self, from: &str, task: TaskId, lease: Lease, total: u64, offset: u64, data: &[u8], now: UnixMs) {
        let key = (task.clone(), lease);
        let Some(f) = self.fetches.get_mut(&key) else { return };
        match f.download.feed(total, offset, data) {
            Ok(Progress::More) => {
                let body = f.download.request();
                self.request(from, body, CallKind::Fetch { task, lease }, now);
            }
            Ok(Progress::Complete) => {
                let mut f = self.fetches.remove(&key).expect("present");
                let bytes = f.download.take_bytes();
                match std::str::from_utf8(&bytes).ok().and_then(|t| json(t).ok()) {
                    Some(result) => {
                        self.stats.completed += 1;
                        if self.assigned.get(&task).is_some_and(|a| a.worker == from && a.lease == lease) {
                            self.unassign(&task);
                            self.grow(from);
                        }
                        self.record_fetched(task, lease, Outcome::Done(result), f, now);
                    }
                    None => {
                        let e = FetchError::Failed("the held result is not JSON".into());
                        self.fetch_failed(task, lease, f, e, now);
                    }
                }
                self.start_fetches(now);
            }
            Err(e) => {
                let f = self.fetches.remove(&key).expect("present");
                self.fetch_failed(task, lease, f, e, now);
                self.start_fetches(now);
            }
        }
    }

    /// A held result could not be fetched: the task runs again (if its worker still has the
    /// attempt, its result is fenced off), and the report is acknowledged.
    fn fetch_failed(&mut self, task: TaskId, lease: Lease, f: ResultFetch, e: FetchError, now: UnixMs) {
        tracing::warn!(task = %task, worker = %f.worker, error = %e, "fetching a held result failed; the task runs again");
        let outcome = match self.assigned.get(&task).filter(|a| a.lease == lease) {
            Some(_) => {
                let a = self.unassign(&task).expect("checked");
                self.stats.lost += 1;
                let error = TaskError::new(ErrorKind::WorkerLost, format!("its result could not be fetched: {e}"));
                if a.attempt < a.max_attempts {
                    self.apps.entry(a.app.clone()).or_default().has_work = true;
                    Outcome::Retry { run_after: now, error }
                } else {
                    Outcome::Failed(error)
                }
            }
            None => Outcome::Release { run_after: now },
        };
        self.record_fetched(task, lease, outcome, f, now);
    }

    fn record_fetched(&mut self, task: TaskId, lease: Lease, outcome: Outcome, f: ResultFetch, now: UnixMs) {
        let abandoned = !matches!(outcome, Outcome::Done(_));
        let acks = f.acks.into_iter().map(|id| (f.worker.clone(), id)).collect();
        self.record(task, lease, outcome, acks, abandoned, now);
    }

    /// Records `outcome` for (task, lease) unless a record of it is already on its way; `acks`
    /// are answered `Ack` once the record is durable.
    ///
    /// `abandoned`: the manager gave the attempt up (lost with its worker, refused, timed out
    /// here); a report from it that comes later is a late completion, discarded.
    fn record(
        &mut self,
        task: TaskId,
        lease: Lease,
        outcome: Outcome,
        acks: Vec<(String, u64)>,
        abandoned: bool,
        now: UnixMs,
    ) {
        let key = (task.clone(), lease);
        if self.recent.contains_key(&key) {
            // A record of this attempt is durable already: the lease can no longer be running,
            // so this one would be stale. Answer at once instead of writing.
            if !acks.is_empty() {
                self.count_repeat(&key);
            }
            for (peer, id) in acks {
                self.send(&peer, Packet::new(id, Body::Ack));
            }
            return;
        }
        if let Some(p) = self.pending_acks.get_mut(&key) {
            if !acks.is_empty() && p.abandoned {
                self.stats.late_discarded += 1;
            }
            p.acks.extend(acks);
            return;
        }
        self.pending_acks.insert(key, Pending { acks, abandoned });
        self.actions.push_back(ManagerAction::Record(Finish { id: task, lease, outcome, now }));
    }

    /// A report about an attempt already recorded: a repeat of the report, or (when the
    /// manager gave the attempt up) a late completion.
    fn count_repeat(&mut self, key: &(TaskId, Lease)) {
        match self.recent.get(key) {
            Some(true) => self.stats.late_discarded += 1,
            Some(false) => self.stats.repeats += 1,
            None => {}
        }
    }

    /// The record of (task, lease) is durable (applied, or stale and ignored): its reports are
    /// acknowledged.
    pub fn handle_recorded(&mut self, task: &TaskId, lease: Lease, now: UnixMs) {
        let key = (task.clone(), lease);
        let Some(p) = self.pending_acks.remove(&key) else { return self.plan(now) };
        for (peer, id) in p.acks {
            self.send(&peer, Packet::new(id, Body::Ack));
        }
        if self.recent.insert(key.clone(), p.abandoned).is_none() {
            self.recent_order.push_back(key);
            while self.recent_order.len() > MAX_RECENT {
                if let Some(old) = self.recent_order.pop_front() {
                    self.recent.remove(&old);
                }
            }
        }
        self.plan(now);
    }

    fn task_report(&mut self, worker: &str, report: TaskReport, now: UnixMs) {
        let TaskReport { task_id, lease, status } = report;
        let Some(a) = self.assigned.get(&task_id).filter(|a| a.worker == worker) else { return };
        let ours = a.lease == lease;
        match status {
            TaskStatus::Pending | TaskStatus::Started(_) if ours => {}
            TaskStatus::Completed(Some(result)) if ours => {
                self.stats.completed += 1;
                self.unassign(&task_id);
                self.grow(worker);
                self.record(task_id, lease, Outcome::Done(result), vec![], false, now);
            }
            // Its report is on its way (the worker keeps it until acknowledged).
            TaskStatus::Completed(None) if ours => {}
            TaskStatus::Error(kind) if ours => {
                let message = format!("reported by worker node {worker}");
                let outcome = self.error_outcome(worker, &task_id, lease, kind, message, now);
                self.record(task_id, lease, outcome, vec![], false, now);
            }
            // Unknown, or the worker has another attempt than this one: this one is lost.
            _ => {
                let a = self.unassign(&task_id).expect("checked");
                self.lose_assigned(task_id, a, "it does not know this attempt", now);
            }
        }
    }

    // ---- claims and dispatch ----

    /// The store answered a claim for `worker` of `asked` tasks of `app` (`Err`: it failed).
    pub fn handle_claimed(
        &mut self,
        worker: &str,
        app: &str,
        asked: usize,
        claimed: Result<Vec<Claimed>, ()>,
        now: UnixMs,
    ) {
        if let Some(w) = self.workers.get_mut(worker) {
            w.claiming = false;
            w.inflight = w.inflight.saturating_sub(asked);
        }
        let tasks = match claimed {
            Err(()) => {
                let pause = self.app_pause.next_delay();
                if let Some(a) = self.apps.get_mut(app) {
                    a.paused_until = Some(now.plus(pause));
                }
                self.plan(now);
                return;
            }
            Ok(tasks) => tasks,
        };
        if tasks.len() < asked {
            if let Some(a) = self.apps.get_mut(app) {
                a.has_work = false;
            }
        }
        let Some(epoch) = self.workers.get(worker).map(|w| w.epoch) else {
            // The worker went away meanwhile: give the tasks back.
            for c in tasks {
                self.release(c.id, c.lease, now);
            }
            self.plan(now);
            return;
        };
        let package = self.apps.get(app).and_then(|a| a.package.clone());
        let mut batch: Vec<TaskSpec> = Vec::new();
        let mut bytes = 0;
        for c in tasks {
            let deadline = now.plus(c.timeout).plus(self.config.worker_grace);
            self.deadlines.insert((deadline, c.id.clone(), c.lease));
            self.assigned.insert(
                c.id.clone(),
                Assigned {
                    worker: worker.to_string(),
                    lease: c.lease,
                    attempt: c.attempt,
                    max_attempts: c.max_attempts,
                    app: c.app.clone(),
                    deadline,
                },
            );
            if let Some(w) = self.workers.get_mut(worker) {
                w.inflight += 1;
            }
            self.stats.dispatched += 1;
            let size = c.args.get().len() + c.procedure.len() + 128;
            if !batch.is_empty()
                && (batch.len() >= MAX_LIST.min(self.config.claim_batch.max(1))
                    || bytes + size > self.config.batch_bytes)
            {
                self.execute(worker, epoch, std::mem::take(&mut batch), now);
                bytes = 0;
            }
            bytes += size;
            batch.push(TaskSpec {
                id: c.id,
                lease: c.lease,
                attempt: c.attempt,
                procedure: c.procedure,
                app: c.app,
                args: c.args,
                timeout: c.timeout,
                package: package.clone(),
                deadline: c.deadline,
            });
        }
        if !batch.is_empty() {
            self.execute(worker, epoch, batch, now);
        }
        self.plan(now);
    }

    fn execute(&mut self, worker: &str, epoch: u64, batch: Vec<TaskSpec>, now: UnixMs) {
        let tasks = batch.iter().map(|t| (t.id.clone(), t.lease)).collect();
        self.request(worker, Body::TasksExecute { tasks: batch }, CallKind::Execute { epoch, tasks }, now);
    }

    /// Claims for every worker with room, least loaded first, from apps with work in turn.
    fn plan(&mut self, now: UnixMs) {
        let apps: Vec<String> = self
            .apps
            .iter()
            .filter(|(_, a)| a.has_work && a.paused_until.is_none_or(|p| p <= now))
            .map(|(n, _)| n.clone())
            .collect();
        if apps.is_empty() {
            return;
        }
        let mut order: Vec<(usize, String)> = self
            .workers
            .iter()
            .filter(|(_, w)| w.confirmed && !w.claiming && w.window > 0 && w.paused_until.is_none())
            .map(|(n, w)| (w.window.saturating_sub(w.inflight), n.clone()))
            .collect();
        order.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        for (free, name) in order {
            let w = self.workers.get_mut(&name).expect("listed");
            let low_water = (w.window / 4).clamp(1, self.config.claim_batch.max(1));
            if free == 0 || (w.inflight > 0 && free < low_water) {
                continue;
            }
            let app = apps[w.app_cursor % apps.len()].clone();
            w.app_cursor = w.app_cursor.wrapping_add(1);
            let max = free.min(self.config.claim_batch.max(1)).min(MAX_LIST);
            w.claiming = true;
            w.inflight += max;
            self.actions.push_back(ManagerAction::Claim(Claim {
                app,
                owner: name,
                max,
                now,
                lease_grace: self.config.lease_grace,
            }));
        }
    }

    // ---- time ----

    /// Time passed: resends, pings, silent and gone workers, timeouts, polls, chores.
    pub fn tick(&mut self, now: UnixMs) {
        for e in self.calls.tick(now) {
            match e {
                Expired::Resend(to, p) => self.send(&to, p),
                // Unanswered (not refused, not undeliverable): the worker may hold the batch
                // (frozen or slow, the request in its socket). The tasks stay assigned: their
                // deadlines time them out and abort them there, or the worker's loss runs them
                // again. Released instead, they would go to the same silent worker again and
                // again, the attempt neither counted nor ever timed out.
                Expired::Failed(peer, _, CallKind::Execute { .. }) => {
                    tracing::debug!(manager = %self.config.name, worker = %peer, "a TasksExecute went unanswered; its tasks are watched by their deadlines");
                }
                Expired::Failed(peer, _, kind) => self.call_failed(&peer, kind, now),
            }
        }
        while let Some((deadline, id, lease)) = self.deadlines.first().cloned() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            if self.assigned.get(&id).is_none_or(|a| a.lease != lease) {
                continue;
            }
            let a = self.unassign(&id).expect("checked");
            self.stats.timed_out += 1;
            let message = format!(
                "no report from worker node {} within the task's timeout and {} ms of grace; aborted there",
                a.worker,
                self.config.worker_grace.as_millis()
            );
            tracing::warn!(task = %id, worker = %a.worker, "task overdue; timing it out and aborting it on its worker");
            if self.is_worker(&a.worker) {
                self.request(&a.worker, Body::TasksAbort { tasks: vec![id.clone()] }, CallKind::Abort, now);
            }
            self.record(id, lease, Outcome::Failed(TaskError::new(ErrorKind::TimedOut, message)), vec![], true, now);
        }
        let names: Vec<String> = self.workers.keys().cloned().collect();
        for name in names {
            let w = &self.workers[&name];
            let quiet = now.since(w.last_heard);
            if quiet >= self.config.gone_after {
                self.end_relationship(&name, "silent for too long", now);
                continue;
            }
            if quiet >= self.config.silent_after && !w.silent {
                if let Some(w) = self.workers.get_mut(&name) {
                    w.silent = true;
                }
                let change = self.registry.set_state(&name, AgentState::Silent, now);
                self.registry_change(change);
            }
            let w = self.workers.get_mut(&name).expect("present");
            if w.paused_until.is_some_and(|p| p <= now) {
                w.paused_until = None;
            }
            if w.next_ping <= now && !w.pinging {
                w.next_ping = now.plus(self.config.ping_interval);
                w.pinging = true;
                let epoch = w.epoch;
                let p = self.calls.start(
                    &name,
                    Body::ManagerPing,
                    CallKind::Ping { epoch },
                    now,
                    self.config.ping_interval,
                    0,
                );
                self.send(&name, p);
            }
        }
        if self.sweep.is_some_and(|t| t <= now) {
            self.sweep = None;
            let lost: Vec<String> = self
                .registry
                .agents()
                .filter(|a| a.state == AgentState::Silent && !self.workers.contains_key(&a.name))
                .map(|a| a.name.clone())
                .collect();
            for name in lost {
                let change = self.registry.set_state(&name, AgentState::Gone, now);
                self.registry_change(change);
            }
        }
        for c in self.registry.purge(now) {
            self.actions.push_back(ManagerAction::Agent(c));
        }
        let poll = now >= self.next_poll;
        if poll {
            self.next_poll = now.plus(self.config.poll_interval);
        }
        for a in self.apps.values_mut() {
            if poll || a.wake_at.is_some_and(|w| w <= now) {
                a.has_work = true;
                a.wake_at = a.wake_at.filter(|w| *w > now);
            }
            if a.paused_until.is_some_and(|p| p <= now) {
                a.paused_until = None;
            }
        }
        if now >= self.next_reap {
            self.next_reap = now.plus(self.config.reap_interval);
            self.actions.push_back(ManagerAction::Reap(now));
        }
        if now >= self.next_purge {
            self.next_purge = now.plus(self.config.purge_interval);
            self.actions.push_back(ManagerAction::Purge(now, self.config.purge_batch));
        }
        self.plan(now);
    }

    /// When [`Manager::tick`] must be called next.
    pub fn next_deadline(&self) -> Option<UnixMs> {
        let mut next = [self.next_poll, self.next_reap, self.next_purge].into_iter().min();
        let mut at = |t: Option<UnixMs>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        at(self.calls.next_deadline());
        at(self.deadlines.first().map(|(d, _, _)| *d));
        at(self.registry.next_purge());
        at(self.sweep);
        for w in self.workers.values() {
            if !w.silent {
                at(Some(w.last_heard.plus(self.config.silent_after)));
            }
            at(Some(w.last_heard.plus(self.config.gone_after)));
            if !w.pinging {
                at(Some(w.next_ping));
            }
            at(w.paused_until);
        }
        for a in self.apps.values() {
            at(a.wake_at);
            at(a.paused_until);
        }
        next
    }
}
