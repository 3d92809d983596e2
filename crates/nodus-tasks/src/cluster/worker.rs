//! The worker node's side of seed 002, pure: pairs with one manager at a time from its
//! configured list, runs the tasks its manager sends through an executor interface, reports
//! each task's start and end, and answers every request.
//!
//! Inputs: [`WorkerNode::handle_packet`] (a message from a peer), `handle_undeliverable` (the
//! transport could not deliver one of its requests), `handle_end` (the executor finished an
//! attempt), `handle_installed` (the driver deployed a fetched package), [`WorkerNode::tick`].
//! Outputs: [`WorkerAction`]s from [`WorkerNode::poll_action`]. No I/O, no clock.
//!
//! Rules it keeps (the seed's table, seen from the worker node):
//! - Pairing: `NodeTypeRequest` to the next configured manager; if it answers `Manager`,
//!   `ManagerRequest` with the node's specs; `ManagerAnswer { accepted: true }` pairs. A refusal,
//!   a wrong type or silence moves on to the next manager; after a whole round, it waits (jittered
//!   backoff) and starts again. It never asks while paired.
//! - `ManagerAnswer { accepted: true }` from a manager it cannot pair with (it has another
//!   manager, the sender is not in its list, or is not known as a manager) is answered with
//!   `ManagerBye`; from its own manager it is ignored (and the relationship checked with a ping).
//! - Relationship messages (`ManagerPing`, `TasksExecute`, `TasksPing`, `TasksAbort`, `Fetch`)
//!   from anyone but its manager are answered `NotMine`; a worker node answers `ManagerRequest`
//!   with `accepted: false` and `TaskStarted`/`TaskError`/`TaskCompleted` with `NotMine`.
//! - Its manager is gone when nothing was heard from it for `manager_timeout` (it pings every
//!   `ping_interval`), or it answers `NotMine`: the node keeps its tasks running and keeps their
//!   reports, and pairs again (the same manager first after `NotMine`, the next one after
//!   silence). Reports go to the manager that sent the task, when paired with it again.
//! - `ManagerBye` from its manager ends the relationship and kills that manager's tasks.
//! - Every report (`TaskStarted`, `TaskError`, `TaskCompleted`) is sent again until answered; a
//!   task is forgotten only once its final report is acknowledged (the manager acknowledges
//!   after recording it). A task that outlives its timeout is killed and reported `TimedOut`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use nodus_wire::Backoff;

use super::calls::{Calls, Expired};
use super::fetch::{chunk_of, sha256_hex, Download, FetchError, Progress};
use super::msg::{
    AppPackage, Blob, Body, NodeType, Packet, Refusal, RefuseReason, ResultBody, Specs, TaskReport, TaskSpec,
    TaskStatus, MAX_LIST,
};
use crate::sched::AttemptEnd;
use crate::task::{ErrorKind, Json, Lease, TaskId, UnixMs};

/// A worker node's settings and bounds.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// This node's server name.
    pub name: String,
    /// The managers it may pair with, in order of preference.
    pub managers: Vec<String>,
    /// What it declares in `ManagerRequest` (its concurrency and queue also bound what it
    /// accepts; its apps are the packages it has).
    pub specs: Specs,
    /// How often it pings its manager.
    pub ping_interval: Duration,
    /// Its manager is gone when nothing was heard from it for this long.
    pub manager_timeout: Duration,
    /// A request unanswered for this long is sent again (reports, fetches) or given up
    /// (pairing steps: the next manager is tried).
    pub request_timeout: Duration,
    /// Resends of a fetch before the download fails.
    pub fetch_retries: u32,
    /// Wait between rounds of pairing attempts: from `pair_backoff_min`, doubling, up to
    /// `pair_backoff_max`.
    pub pair_backoff_min: Duration,
    /// See `pair_backoff_min`.
    pub pair_backoff_max: Duration,
    /// Most finished tasks kept for managers that are away; beyond it the oldest are dropped
    /// (their managers run them again).
    pub max_kept: usize,
    /// Most reports in flight to the manager at once.
    pub max_reports_in_flight: usize,
    /// Results up to this size (JSON text) travel inline; larger ones are held and fetched.
    pub inline_result_max: usize,
    /// Inline results in one `TasksPong` stop at this many bytes (the rest come with their
    /// `TaskCompleted`).
    pub pong_result_budget: usize,
    /// How long a finished attempt is remembered, so a late copy of its `TasksExecute` is not
    /// run again.
    pub tombstone_ttl: Duration,
    /// Most attempts remembered so.
    pub max_tombstones: usize,
    /// Largest package fetched.
    pub max_package_bytes: u64,
    /// Chunk size of fetches.
    pub fetch_chunk: u32,
}

impl WorkerConfig {
    /// Defaults for a worker node called `name` that may pair with `managers`.
    pub fn new(name: impl Into<String>, managers: Vec<String>, specs: Specs) -> WorkerConfig {
        WorkerConfig {
            name: name.into(),
            managers,
            specs,
            ping_interval: Duration::from_secs(2),
            manager_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(2),
            fetch_retries: 3,
            pair_backoff_min: Duration::from_millis(500),
            pair_backoff_max: Duration::from_secs(30),
            max_kept: 65_536,
            max_reports_in_flight: 256,
            inline_result_max: 1 << 20,
            pong_result_budget: 256 << 10,
            tombstone_ttl: Duration::from_secs(120),
            max_tombstones: 65_536,
            max_package_bytes: 512 << 20,
            fetch_chunk: 1 << 20,
        }
    }
}

/// What the driver of a worker node must do.
#[derive(Debug, Clone)]
pub enum WorkerAction {
    /// Send a request or an answer to a peer.
    Send {
        /// The peer's server name.
        to: String,
        /// What.
        packet: Packet,
    },
    /// Run an attempt on the executor; answer with [`WorkerNode::handle_end`] (unless killed).
    Run(TaskSpec),
    /// Kill a running attempt (aborted, timed out, superseded, or its manager said bye).
    Kill {
        /// The task.
        id: TaskId,
        /// The attempt.
        lease: Lease,
    },
    /// Bytes of a package being fetched, to append to its file.
    PackageData {
        /// The package.
        package: AppPackage,
        /// Where they go.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// A fetched package is complete and verified: deploy it, then answer with
    /// [`WorkerNode::handle_installed`].
    Install(AppPackage),
    /// A fetch failed: delete what was written of the package.
    DropPackage(AppPackage),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum CallKind {
    NodeType,
    Request,
    Ping { epoch: u64 },
    Report { task: TaskId, lease: Lease, last: bool },
    Fetch { hash: String },
    Bye,
}

#[derive(Debug)]
enum Pairing {
    Idle { next_try: UnixMs },
    Asking { manager: String, call: u64 },
    Paired { manager: String, epoch: u64, last_heard: UnixMs, next_ping: UnixMs, pinging: bool },
    Left,
}

#[derive(Debug, Clone)]
enum Outcome {
    Completed(ResultBody, Option<Arc<[u8]>>),
    Failed(ErrorKind, String),
}

#[derive(Debug, Clone)]
enum State {
    Queued,
    Fetching,
    Running { since: UnixMs },
    Finished(Outcome),
}

#[derive(Debug)]
struct Task {
    spec: TaskSpec,
    manager: String,
    deadline: UnixMs,
    state: State,
    /// Its `TaskStarted` is still to be acknowledged.
    started_unreported: bool,
    /// It is in its manager's outbox.
    queued_report: bool,
    /// A report about it is in flight (the call id).
    report_call: Option<u64>,
}

#[derive(Debug)]
struct Fetching {
    package: AppPackage,
    manager: String,
    download: Download,
    waiting: Vec<TaskId>,
    call: Option<u64>,
    installing: bool,
}

/// The worker node's protocol state.
#[derive(Debug)]
pub struct WorkerNode {
    config: WorkerConfig,
    calls: Calls<CallKind>,
    pairing: Pairing,
    epoch: u64,
    cursor: usize,
    failed_in_round: usize,
    backoff: Backoff,
    types: BTreeMap<String, NodeType>,
    tasks: BTreeMap<TaskId, Task>,
    deadlines: BTreeSet<(UnixMs, TaskId, Lease)>,
    ready: VecDeque<(TaskId, Lease)>,
    running: usize,
    outbox: BTreeMap<String, VecDeque<TaskId>>,
    reports_in_flight: usize,
    finished: VecDeque<(TaskId, Lease)>,
    finished_count: usize,
    tombstones: BTreeMap<TaskId, Lease>,
    tombstone_order: VecDeque<(UnixMs, TaskId, Lease)>,
    have: BTreeMap<String, AppPackage>,
    downloads: BTreeMap<String, Fetching>,
    shutting_down: bool,
    actions: VecDeque<WorkerAction>,
}

impl WorkerNode {
    /// A worker node that starts pairing at `now`; `seed` makes its backoff and its first
    /// request id reproducible.
    pub fn new(config: WorkerConfig, seed: u64, now: UnixMs) -> WorkerNode {
        let have = config.specs.apps.iter().map(|p| (p.app.clone(), p.clone())).collect();
        let backoff = Backoff::new(config.pair_backoff_min, config.pair_backoff_max, seed);
        let first_id = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 16;
        WorkerNode {
            config,
            calls: Calls::new(first_id),
            pairing: Pairing::Idle { next_try: now },
            epoch: 0,
            cursor: 0,
            failed_in_round: 0,
            backoff,
            types: BTreeMap::new(),
            tasks: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            ready: VecDeque::new(),
            running: 0,
            outbox: BTreeMap::new(),
            reports_in_flight: 0,
            finished: VecDeque::new(),
            finished_count: 0,
            tombstones: BTreeMap::new(),
            tombstone_order: VecDeque::new(),
            have,
            downloads: BTreeMap::new(),
            shutting_down: false,
            actions: VecDeque::new(),
        }
    }

    /// The manager it is paired with.
    pub fn manager(&self) -> Option<&str> {
        match &self.pairing {
            Pairing::Paired { manager, .. } => Some(manager),
            _ => None,
        }
    }

    /// Tasks it holds (waiting, running, or finished and not yet acknowledged).
    pub fn tasks(&self) -> usize {
        self.tasks.len()
    }

    /// Attempts running on the executor.
    pub fn running(&self) -> usize {
        self.running
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<WorkerAction> {
        self.actions.pop_front()
    }

    /// The app packages it has.
    pub fn apps(&self) -> impl Iterator<Item = &AppPackage> {
        self.have.values()
    }

    /// The node now has `package` (deployed by an operator): tasks needing it run without a
    /// fetch, and the next `ManagerRequest` declares it.
    pub fn set_app(&mut self, package: AppPackage) {
        self.have.insert(package.app.clone(), package);
    }

    /// The node no longer has `app` (an operator removed it): tasks needing it fetch its
    /// package again, and the next `ManagerRequest` does not declare it.
    pub fn remove_app(&mut self, app: &str) {
        self.have.remove(app);
    }

    /// Stops taking tasks (they are refused `ShuttingDown`); what it holds still runs and is
    /// reported.
    pub fn begin_shutdown(&mut self) {
        self.shutting_down = true;
    }

    /// Leaves its manager (`ManagerBye`) and stops pairing; its tasks are killed.
    pub fn leave(&mut self, now: UnixMs) {
        if let Pairing::Paired { manager, .. } = &self.pairing {
            let manager = manager.clone();
            self.end_relationship(&manager, true, now);
            self.request(&manager, Body::ManagerBye, CallKind::Bye, now, 1);
        }
        self.pairing = Pairing::Left;
    }

    fn send(&mut self, to: &str, packet: Packet) {
        self.actions.push_back(WorkerAction::Send { to: to.to_string(), packet });
    }

    fn request(&mut self, to: &str, body: Body, kind: CallKind, now: UnixMs, retries: u32) -> u64 {
        let p = self.calls.start(to, body, kind, now, self.config.request_timeout, retries);
        let id = p.id;
        self.send(to, p);
        id
    }

    fn is_manager(&self, peer: &str) -> bool {
        self.manager() == Some(peer)
    }

    // ---- pairing ----

    fn specs(&self) -> Specs {
        let mut s = self.config.specs.clone();
        s.apps = self.have.values().take(MAX_LIST).cloned().collect();
        s
    }

    fn try_next(&mut self, now: UnixMs) {
        if self.config.managers.is_empty() || self.shutting_down {
            self.pairing = Pairing::Idle { next_try: UnixMs(u64::MAX) };
            return;
        }
        let manager = self.config.managers[self.cursor % self.config.managers.len()].clone();
        self.cursor = (self.cursor + 1) % self.config.managers.len();
        let call =
            self.request(&manager, Body::NodeTypeRequest { node_type: NodeType::Worker }, CallKind::NodeType, now, 0);
        tracing::debug!(worker = %self.config.name, %manager, "asking a manager");
        self.pairing = Pairing::Asking { manager, call };
    }

    fn candidate_failed(&mut self, manager: &str, why: &str, now: UnixMs) {
        tracing::debug!(worker = %self.config.name, %manager, why, "manager candidate failed");
        self.failed_in_round += 1;
        if self.failed_in_round >= self.config.managers.len() {
            self.failed_in_round = 0;
            let delay = self.backoff.next_delay();
            self.pairing = Pairing::Idle { next_try: now.plus(delay) };
        } else {
            self.try_next(now);
        }
    }

    fn pair(&mut self, manager: &str, now: UnixMs) {
        if let Pairing::Asking { manager: m, call } = &self.pairing {
            let (m, call) = (m.clone(), *call);
            self.calls.answered(&m, call);
        }
        self.epoch += 1;
        self.failed_in_round = 0;
        self.backoff.reset();
        if let Some(i) = self.config.managers.iter().position(|m| m == manager) {
            self.cursor = (i + 1) % self.config.managers.len();
        }
        self.pairing = Pairing::Paired {
            manager: manager.to_string(),
            epoch: self.epoch,
            last_heard: now,
            next_ping: now.plus(self.config.ping_interval),
            pinging: false,
        };
        tracing::info!(worker = %self.config.name, %manager, "paired with a manager");
        self.flush_reports(now);
    }

    /// The relationship with `manager` ends. With `abort`, its tasks are killed and dropped
    /// (it said bye); else they keep running and their reports wait for it.
    fn end_relationship(&mut self, manager: &str, abort: bool, now: UnixMs) {
        if !self.is_manager(manager) {
            return;
        }
        tracing::info!(worker = %self.config.name, %manager, abort, "relationship with the manager ended");
        self.pairing = Pairing::Idle { next_try: now };
        for (_, kind) in self.calls.drop_peer(manager) {
            if let CallKind::Report { task, .. } = kind {
                self.reports_in_flight -= 1;
                if let Some(t) = self.tasks.get_mut(&task) {
                    t.report_call = None;
                }
                self.queue_report(&task);
            }
        }
        let failed: Vec<String> =
            self.downloads.iter().filter(|(_, d)| d.manager == manager).map(|(h, _)| h.clone()).collect();
        for hash in failed {
            self.download_failed(&hash, FetchError::Failed(format!("the relationship with {manager} ended")), now);
        }
        if abort {
            let ids: Vec<TaskId> =
                self.tasks.iter().filter(|(_, t)| t.manager == manager).map(|(id, _)| id.clone()).collect();
            for id in ids {
                self.drop_task(&id, now);
            }
            self.outbox.remove(manager);
        }
    }

    // ---- inputs ----

    /// A message from `from` (already decoded).
    pub fn handle_packet(&mut self, from: &str, packet: Packet, now: UnixMs) {
        if let Pairing::Paired { manager, last_heard, .. } = &mut self.pairing {
            if manager == from {
                *last_heard = now;
            }
        }
        if packet.body.is_answer() {
            let kind = self.calls.answered(from, packet.id);
            self.handle_answer(from, packet.id, kind, packet.body, now);
        } else {
            let answer = self.handle_request(from, packet.body, now);
            self.send(from, Packet::new(packet.id, answer));
        }
        self.start_ready(now);
        self.flush_reports(now);
    }

    /// The transport could not deliver request `id` to `to` (no route, link down).
    pub fn handle_undeliverable(&mut self, to: &str, id: u64, now: UnixMs) {
        match self.calls.kind(to, id) {
            Some(CallKind::NodeType | CallKind::Request) => {
                self.calls.answered(to, id);
                if matches!(&self.pairing, Pairing::Asking { call, .. } if *call == id) {
                    self.candidate_failed(to, "undeliverable", now);
                }
            }
            Some(CallKind::Ping { .. }) => {
                self.calls.answered(to, id);
                if let Pairing::Paired { pinging, .. } = &mut self.pairing {
                    *pinging = false;
                }
            }
            // Reports and fetches are sent again at their deadline; the manager's silence is
            // judged by `manager_timeout`.
            _ => {}
        }
    }

    fn handle_request(&mut self, from: &str, body: Body, now: UnixMs) -> Body {
        match body {
            Body::NodeTypeRequest { node_type } => {
                self.learn_type(from, node_type, now);
                Body::NodeTypeAnswer { node_type: NodeType::Worker }
            }
            Body::ManagerRequest(_) => Body::ManagerAnswer { accepted: false },
            Body::ManagerBye => {
                if self.is_manager(from) {
                    self.end_relationship(from, true, now);
                    if !matches!(self.pairing, Pairing::Left) {
                        self.pairing = Pairing::Idle { next_try: now };
                    }
                }
                Body::Ack
            }
            Body::ManagerPing if self.is_manager(from) => Body::ManagerPong,
            Body::TasksExecute { tasks } if self.is_manager(from) => self.execute(from, tasks, now),
            Body::TasksPing { tasks } if self.is_manager(from) => {
                Body::TasksPong { tasks_status: self.statuses(&tasks) }
            }
            Body::TasksAbort { tasks } if self.is_manager(from) => {
                for id in tasks {
                    if self.tasks.get(&id).is_some_and(|t| t.manager == from) {
                        self.drop_task(&id, now);
                    }
                }
                Body::Ack
            }
            Body::Fetch { blob: Blob::Result { task_id, lease }, offset, max_len } if self.is_manager(from) => {
                match self.tasks.get(&task_id).map(|t| (&t.state, t.spec.lease)) {
                    Some((State::Finished(Outcome::Completed(_, Some(bytes))), l)) if l == lease => {
                        chunk_of(bytes, offset, max_len)
                    }
                    _ => Body::FetchMissing { reason: format!("no held result for task {task_id} lease {lease}") },
                }
            }
            Body::Fetch { .. } if self.is_manager(from) => {
                Body::FetchMissing { reason: "a worker node serves no packages".into() }
            }
            // Relationship messages from a node that is not this node's manager, and the
            // worker-to-manager reports (this node manages nobody).
            _ => Body::NotMine,
        }
    }

    fn learn_type(&mut self, peer: &str, node_type: NodeType, now: UnixMs) {
        if !self.config.managers.iter().any(|m| m == peer) {
            return;
        }
        let before = self.types.insert(peer.to_string(), node_type);
        if self.is_manager(peer) && node_type != NodeType::Manager {
            // Its role changed under the relationship: it ends, and the manager (if it still
            // keeps state about this node) is told.
            tracing::warn!(worker = %self.config.name, manager = %peer, ?before, now = %node_type, "the manager's node type changed");
            self.end_relationship(peer, true, now);
            self.request(peer, Body::ManagerBye, CallKind::Bye, now, 1);
        }
    }

    fn handle_answer(&mut self, from: &str, call: u64, kind: Option<CallKind>, body: Body, now: UnixMs) {
        match (kind, body) {
            (Some(CallKind::NodeType), Body::NodeTypeAnswer { node_type }) => {
                self.learn_type(from, node_type, now);
                if !matches!(&self.pairing, Pairing::Asking { manager, .. } if manager == from) {
                    return;
                }
                if node_type == NodeType::Manager {
                    let call = self.request(from, Body::ManagerRequest(self.specs()), CallKind::Request, now, 0);
                    self.pairing = Pairing::Asking { manager: from.to_string(), call };
                } else {
                    self.candidate_failed(from, "not a manager", now);
                }
            }
            // A late answer still says what the peer is.
            (None, Body::NodeTypeAnswer { node_type }) => self.learn_type(from, node_type, now),
            (_, Body::ManagerAnswer { accepted: true }) => self.accepted(from, now),
            (Some(CallKind::Request), Body::ManagerAnswer { accepted: false }) => {
                if matches!(&self.pairing, Pairing::Asking { manager, .. } if manager == from) {
                    self.candidate_failed(from, "refused", now);
                }
            }
            (Some(CallKind::Ping { epoch }), Body::ManagerPong) => {
                if let Pairing::Paired { pinging, epoch: e, .. } = &mut self.pairing {
                    if *e == epoch {
                        *pinging = false;
                    }
                }
            }
            (Some(CallKind::Bye), _) => {}
            (Some(kind @ (CallKind::NodeType | CallKind::Request)), Body::NotMine) => self.call_failed(from, kind, now),
            (Some(kind), Body::NotMine) => {
                let current = match (&kind, &self.pairing) {
                    (CallKind::Ping { epoch }, Pairing::Paired { epoch: e, .. }) => epoch == e,
                    _ => true,
                };
                if let CallKind::Report { task, .. } = &kind {
                    self.reports_in_flight -= 1;
                    if let Some(t) = self.tasks.get_mut(task) {
                        t.report_call = None;
                    }
                    self.queue_report(&task.clone());
                }
                if let CallKind::Fetch { hash } = &kind {
                    self.download_failed(hash, FetchError::Failed(format!("{from} is not this node's manager")), now);
                }
                if current && self.is_manager(from) {
                    // It no longer knows this node (it restarted, or judged it gone): pair
                    // again, with it first, keeping the tasks and reports it will want.
                    self.end_relationship(from, false, now);
                    if let Some(i) = self.config.managers.iter().position(|m| m == from) {
                        self.cursor = i;
                    }
                }
            }
            (Some(CallKind::Report { task, lease, last }), Body::Ack) => {
                self.reports_in_flight -= 1;
                self.reported(&task, lease, last, call, now);
            }
            (Some(CallKind::Fetch { hash }), Body::FetchChunk { total, offset, data }) => {
                self.fetched(&hash, total, offset, data, now)
            }
            (Some(CallKind::Fetch { hash }), Body::FetchMissing { reason }) => {
                self.download_failed(&hash, FetchError::Missing(reason), now)
            }
            (Some(kind), body) => {
                // A report or fetch answered with something else is given up; a pairing step
                // answered wrongly fails the candidate.
                tracing::debug!(worker = %self.config.name, peer = %from, answer = body.command(), "unexpected answer");
                self.call_failed(from, kind, now);
            }
            (None, _) => {} // late or stray answers
        }
    }

    /// `ManagerAnswer { accepted: true }` from `from`, answering a request or late.
    fn accepted(&mut self, from: &str, now: UnixMs) {
        if self.is_manager(from) {
            // Already its worker: the answer is not considered, but the relationship is checked.
            if let Pairing::Paired { next_ping, .. } = &mut self.pairing {
                *next_ping = now;
            }
            return;
        }
        let reason = if self.manager().is_some() {
            Some("it already has another manager")
        } else if matches!(self.pairing, Pairing::Left) || self.shutting_down {
            Some("it is leaving")
        } else if !self.config.managers.iter().any(|m| m == from) {
            Some("it may not be managed by that node")
        } else if self.types.get(from) != Some(&NodeType::Manager) {
            Some("that node is not known as a manager")
        } else {
            None
        };
        match reason {
            Some(reason) => {
                tracing::info!(worker = %self.config.name, manager = %from, reason, "refusing an acceptance with ManagerBye");
                self.request(from, Body::ManagerBye, CallKind::Bye, now, 1);
            }
            None => self.pair(from, now),
        }
    }

    fn call_failed(&mut self, peer: &str, kind: CallKind, now: UnixMs) {
        match kind {
            CallKind::NodeType | CallKind::Request => {
                if matches!(&self.pairing, Pairing::Asking { manager, .. } if manager == peer) {
                    self.candidate_failed(peer, "no answer", now);
                }
            }
            CallKind::Ping { .. } => {
                if let Pairing::Paired { pinging, .. } = &mut self.pairing {
                    *pinging = false;
                }
            }
            CallKind::Report { task, .. } => {
                self.reports_in_flight -= 1;
                if let Some(t) = self.tasks.get_mut(&task) {
                    t.report_call = None;
                }
                self.queue_report(&task);
            }
            CallKind::Fetch { hash } => {
                self.download_failed(&hash, FetchError::Failed(format!("{peer} did not answer")), now)
            }
            CallKind::Bye => {}
        }
    }

    // ---- tasks ----

    fn execute(&mut self, manager: &str, specs: Vec<TaskSpec>, now: UnixMs) -> Body {
        let limit = (self.config.specs.concurrency + self.config.specs.queue) as usize;
        let mut refused = Vec::new();
        for spec in specs {
            if self.tombstones.get(&spec.id).is_some_and(|l| *l >= spec.lease) {
                continue; // a late copy of an attempt already finished here
            }
            if let Some(t) = self.tasks.get(&spec.id) {
                if t.spec.lease >= spec.lease {
                    continue; // this attempt (or a newer one) is already here
                }
                // A newer attempt of a task whose older attempt is still here replaces it.
                let id = spec.id.clone();
                self.drop_task(&id, now);
            }
            let live = self.tasks.len() - self.finished_count;
            let reason = if self.shutting_down {
                Some((RefuseReason::ShuttingDown, "the node is shutting down".to_string()))
            } else if live >= limit {
                Some((RefuseReason::Busy, format!("{live} tasks held; the node declared {limit}")))
            } else if spec.timeout.is_zero() {
                Some((RefuseReason::Invalid, "the timeout is zero".to_string()))
            } else {
                None
            };
            if let Some((reason, message)) = reason {
                refused.push(Refusal { task_id: spec.id, reason, message });
                continue;
            }
            self.accept(manager, spec, now);
        }
        if refused.is_empty() {
            Body::Ack
        } else {
            Body::TasksRefused { tasks: refused }
        }
    }

    fn accept(&mut self, manager: &str, spec: TaskSpec, now: UnixMs) {
        let deadline = now.plus(spec.timeout);
        let id = spec.id.clone();
        let lease = spec.lease;
        let needs = spec.package.clone().filter(|p| self.have.get(&p.app).is_none_or(|h| h.hash != p.hash));
        let state = if needs.is_some() { State::Fetching } else { State::Queued };
        self.deadlines.insert((deadline, id.clone(), lease));
        self.tasks.insert(
            id.clone(),
            Task {
                spec,
                manager: manager.to_string(),
                deadline,
                state,
                started_unreported: false,
                queued_report: false,
                report_call: None,
            },
        );
        match needs {
            None => self.ready.push_back((id, lease)),
            Some(package) => self.need_package(manager, package, id, now),
        }
    }

    fn start_ready(&mut self, now: UnixMs) {
        while self.running < self.config.specs.concurrency.max(1) as usize {
            let Some((id, lease)) = self.ready.pop_front() else { break };
            let Some(t) = self.tasks.get_mut(&id).filter(|t| t.spec.lease == lease && matches!(t.state, State::Queued))
            else {
                continue;
            };
            if let Some(d) = t.spec.deadline.filter(|d| *d <= now) {
                // Its deadline passed while it waited here: it never starts. Given back
                // uncounted, the manager's store never claims it again and finishes it expired.
                let why =
                    format!("the task's deadline ({}) passed while it waited on worker node {}", d.0, self.config.name);
                self.finish(&id, Outcome::Failed(ErrorKind::NotRun, why), now);
                continue;
            }
            t.state = State::Running { since: now };
            t.started_unreported = true;
            self.running += 1;
            self.actions.push_back(WorkerAction::Run(t.spec.clone()));
            self.queue_report(&id);
        }
    }

    /// The executor finished attempt `lease` of task `id`. Ignored when the attempt is no
    /// longer running here (killed first).
    pub fn handle_end(&mut self, id: &TaskId, lease: Lease, end: AttemptEnd, now: UnixMs) {
        let running =
            self.tasks.get(id).is_some_and(|t| t.spec.lease == lease && matches!(t.state, State::Running { .. }));
        if !running {
            return;
        }
        self.running -= 1;
        let outcome = match end {
            AttemptEnd::Returned(result) => self.completed(result),
            AttemptEnd::Failed(m) => Outcome::Failed(ErrorKind::RunningError, m),
            AttemptEnd::WorkerFailed(m) => Outcome::Failed(ErrorKind::WorkerFailed, m),
            AttemptEnd::NotRun(m) => Outcome::Failed(ErrorKind::NotRun, m),
        };
        self.finish(id, outcome, now);
        self.start_ready(now);
        self.flush_reports(now);
    }

    fn completed(&self, result: Json) -> Outcome {
        let text = result.get();
        if text.len() <= self.config.inline_result_max {
            return Outcome::Completed(ResultBody::Inline(result), None);
        }
        let bytes: Arc<[u8]> = Arc::from(text.as_bytes());
        Outcome::Completed(ResultBody::Held { size: bytes.len() as u64, hash: sha256_hex(&bytes) }, Some(bytes))
    }

    fn finish(&mut self, id: &TaskId, outcome: Outcome, now: UnixMs) {
        let Some(t) = self.tasks.get_mut(id) else { return };
        if matches!(t.state, State::Finished(_)) {
            return;
        }
        self.deadlines.remove(&(t.deadline, id.clone(), t.spec.lease));
        t.state = State::Finished(outcome);
        let (manager, lease) = (t.manager.clone(), t.spec.lease);
        // A TaskStarted still in flight is superseded by the final report.
        if let Some(call) = t.report_call.take() {
            if self.calls.answered(&manager, call).is_some() {
                self.reports_in_flight -= 1;
            }
        }
        self.finished.push_back((id.clone(), lease));
        self.finished_count += 1;
        self.queue_report(id);
        // Bounded: the oldest kept results of absent managers go first (they run again there).
        while self.finished_count > self.config.max_kept {
            let Some((old, l)) = self.finished.pop_front() else { break };
            if self.tasks.get(&old).is_some_and(|t| t.spec.lease == l && matches!(t.state, State::Finished(_))) {
                tracing::warn!(worker = %self.config.name, task = %old, "too many unreported results kept; dropping the oldest");
                self.drop_task(&old, now);
            }
        }
    }

    /// Forgets a task (aborted, replaced, acknowledged or dropped), killing its attempt if it
    /// runs, and remembers the attempt so a late copy is not run again.
    fn drop_task(&mut self, id: &TaskId, now: UnixMs) {
        let Some(t) = self.tasks.remove(id) else { return };
        self.deadlines.remove(&(t.deadline, id.clone(), t.spec.lease));
        match t.state {
            State::Running { .. } => {
                self.running -= 1;
                self.actions.push_back(WorkerAction::Kill { id: id.clone(), lease: t.spec.lease });
            }
            State::Finished(_) => self.finished_count -= 1,
            State::Queued | State::Fetching => {}
        }
        if let Some(call) = t.report_call {
            if self.calls.answered(&t.manager, call).is_some() {
                self.reports_in_flight -= 1;
            }
        }
        if t.queued_report {
            if let Some(q) = self.outbox.get_mut(&t.manager) {
                q.retain(|x| x != id);
            }
        }
        self.tombstone(id.clone(), t.spec.lease, now);
    }

    fn tombstone(&mut self, id: TaskId, lease: Lease, now: UnixMs) {
        self.tombstones.insert(id.clone(), lease);
        self.tombstone_order.push_back((now.plus(self.config.tombstone_ttl), id, lease));
        while self.tombstone_order.len() > self.config.max_tombstones {
            self.expire_tombstone();
        }
    }

    fn expire_tombstone(&mut self) {
        if let Some((_, id, lease)) = self.tombstone_order.pop_front() {
            if self.tombstones.get(&id) == Some(&lease) {
                self.tombstones.remove(&id);
            }
        }
    }

    fn statuses(&self, ids: &[TaskId]) -> Vec<TaskReport> {
        let mut budget = self.config.pong_result_budget;
        ids.iter()
            .map(|id| {
                let Some(t) = self.tasks.get(id) else {
                    return TaskReport { task_id: id.clone(), lease: Lease(0), status: TaskStatus::Unknown };
                };
                let status = match &t.state {
                    State::Queued | State::Fetching => TaskStatus::Pending,
                    State::Running { since } => TaskStatus::Started(*since),
                    State::Finished(Outcome::Failed(kind, _)) => TaskStatus::Error(*kind),
                    State::Finished(Outcome::Completed(ResultBody::Inline(r), _)) if r.get().len() <= budget => {
                        budget -= r.get().len();
                        TaskStatus::Completed(Some(r.clone()))
                    }
                    State::Finished(Outcome::Completed(..)) => TaskStatus::Completed(None),
                };
                TaskReport { task_id: id.clone(), lease: t.spec.lease, status }
            })
            .collect()
    }

    // ---- reports ----

    fn queue_report(&mut self, id: &TaskId) {
        let Some(t) = self.tasks.get_mut(id) else { return };
        if t.queued_report || t.report_call.is_some() {
            return;
        }
        t.queued_report = true;
        self.outbox.entry(t.manager.clone()).or_default().push_back(id.clone());
    }

    fn flush_reports(&mut self, now: UnixMs) {
        let Pairing::Paired { manager, .. } = &self.pairing else { return };
        let manager = manager.clone();
        while self.reports_in_flight < self.config.max_reports_in_flight {
            let Some(id) = self.outbox.get_mut(&manager).and_then(VecDeque::pop_front) else { break };
            let Some(t) = self.tasks.get_mut(&id) else { continue };
            t.queued_report = false;
            let (lease, last, body) = match &t.state {
                State::Finished(outcome) => {
                    let body = match outcome {
                        Outcome::Completed(result, _) => {
                            Body::TaskCompleted { task_id: id.clone(), lease: t.spec.lease, result: result.clone() }
                        }
                        Outcome::Failed(kind, message) => Body::TaskError {
                            task_id: id.clone(),
                            lease: t.spec.lease,
                            error: *kind,
                            message: message.clone(),
                        },
                    };
                    (t.spec.lease, true, body)
                }
                State::Running { since } if t.started_unreported => (
                    t.spec.lease,
                    false,
                    Body::TaskStarted { task_id: id.clone(), lease: t.spec.lease, datetime: *since },
                ),
                _ => continue,
            };
            let kind = CallKind::Report { task: id.clone(), lease, last };
            let call = self.request(&manager, body, kind, now, u32::MAX);
            self.reports_in_flight += 1;
            if let Some(t) = self.tasks.get_mut(&id) {
                t.report_call = Some(call);
            }
        }
        if self.outbox.get(&manager).is_some_and(VecDeque::is_empty) {
            self.outbox.remove(&manager);
        }
    }

    fn reported(&mut self, id: &TaskId, lease: Lease, last: bool, call: u64, now: UnixMs) {
        let Some(t) = self.tasks.get_mut(id).filter(|t| t.report_call == Some(call)) else { return };
        t.report_call = None;
        if t.spec.lease != lease {
            return;
        }
        if last {
            self.drop_task(id, now);
        } else {
            t.started_unreported = false;
            if matches!(t.state, State::Finished(_)) {
                self.queue_report(id);
            }
        }
    }

    // ---- packages ----

    fn need_package(&mut self, manager: &str, package: AppPackage, task: TaskId, now: UnixMs) {
        if let Some(d) = self.downloads.get_mut(&package.hash) {
            d.waiting.push(task);
            return;
        }
        if package.size > self.config.max_package_bytes {
            let e = FetchError::TooLarge { total: package.size, max: self.config.max_package_bytes };
            self.fail_task(
                &task,
                ErrorKind::DownloadError,
                format!("cannot fetch {} v{}: {e}", package.app, package.version),
                now,
            );
            return;
        }
        let blob =
            Blob::Package { app: package.app.clone(), version: package.version.clone(), hash: package.hash.clone() };
        let download =
            Download::new(blob, &package.hash, self.config.max_package_bytes, self.config.fetch_chunk, false);
        let body = download.request();
        let hash = package.hash.clone();
        tracing::info!(worker = %self.config.name, app = %package.app, version = %package.version, "fetching an app package from the manager");
        let call = self.request(manager, body, CallKind::Fetch { hash: hash.clone() }, now, self.config.fetch_retries);
        self.downloads.insert(
            hash,
            Fetching {
                package,
                manager: manager.to_string(),
                download,
                waiting: vec![task],
                call: Some(call),
                installing: false,
            },
        );
    }

    fn fetched(&mut self, hash: &str, total: u64, offset: u64, data: Vec<u8>, now: UnixMs) {
        let Some(d) = self.downloads.get_mut(hash) else { return };
        d.call = None;
        match d.download.feed(total, offset, &data) {
            Err(e) => self.download_failed(hash, e, now),
            Ok(progress) => {
                let package = d.package.clone();
                if !data.is_empty() {
                    self.actions.push_back(WorkerAction::PackageData { package: package.clone(), offset, data });
                }
                match progress {
                    Progress::More => {
                        let (manager, body) = (d.manager.clone(), d.download.request());
                        let kind = CallKind::Fetch { hash: hash.to_string() };
                        let call = self.request(&manager, body, kind, now, self.config.fetch_retries);
                        if let Some(d) = self.downloads.get_mut(hash) {
                            d.call = Some(call);
                        }
                    }
                    Progress::Complete => {
                        d.installing = true;
                        self.actions.push_back(WorkerAction::Install(package));
                    }
                }
            }
        }
    }

    fn download_failed(&mut self, hash: &str, e: FetchError, now: UnixMs) {
        let Some(d) = self.downloads.remove(hash) else { return };
        if let Some(call) = d.call {
            self.calls.answered(&d.manager, call);
        }
        tracing::warn!(worker = %self.config.name, app = %d.package.app, version = %d.package.version, error = %e, "fetching an app package failed");
        self.actions.push_back(WorkerAction::DropPackage(d.package.clone()));
        let message = format!("cannot fetch app {} version {}: {e}", d.package.app, d.package.version);
        for id in d.waiting {
            self.fail_task(&id, ErrorKind::DownloadError, message.clone(), now);
        }
    }

    fn fail_task(&mut self, id: &TaskId, kind: ErrorKind, message: String, now: UnixMs) {
        if self.tasks.get(id).is_some_and(|t| matches!(t.state, State::Queued | State::Fetching)) {
            self.finish(id, Outcome::Failed(kind, message), now);
        }
    }

    /// The driver deployed `package` (or could not: the tasks needing it fail with
    /// `DownloadError`).
    pub fn handle_installed(&mut self, package: &AppPackage, result: Result<(), String>, now: UnixMs) {
        let Some(d) = self.downloads.remove(&package.hash) else { return };
        match result {
            Ok(()) => {
                tracing::info!(worker = %self.config.name, app = %package.app, version = %package.version, "app package installed");
                self.have.insert(package.app.clone(), d.package.clone());
                for id in d.waiting {
                    if let Some(t) = self.tasks.get_mut(&id).filter(|t| matches!(t.state, State::Fetching)) {
                        t.state = State::Queued;
                        self.ready.push_back((id, t.spec.lease));
                    }
                }
            }
            Err(e) => {
                let message = format!("cannot install app {} version {}: {e}", package.app, package.version);
                for id in d.waiting {
                    self.fail_task(&id, ErrorKind::DownloadError, message.clone(), now);
                }
            }
        }
        self.start_ready(now);
        self.flush_reports(now);
    }

    // ---- time ----

    /// Time passed: pairing attempts, pings, the manager's silence, resends, task timeouts.
    pub fn tick(&mut self, now: UnixMs) {
        for e in self.calls.tick(now) {
            match e {
                Expired::Resend(to, p) => self.send(&to, p),
                Expired::Failed(peer, _, kind) => self.call_failed(&peer, kind, now),
            }
        }
        while let Some((deadline, id, lease)) = self.deadlines.first().cloned() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            let Some(t) = self.tasks.get(&id).filter(|t| t.spec.lease == lease) else { continue };
            let message = match t.state {
                State::Running { since } => {
                    self.running -= 1;
                    self.actions.push_back(WorkerAction::Kill { id: id.clone(), lease });
                    format!("ran for {} ms, longer than its timeout; killed", now.since(since).as_millis())
                }
                _ => "did not start within its timeout".to_string(),
            };
            self.finish(&id, Outcome::Failed(ErrorKind::TimedOut, message), now);
        }
        while self.tombstone_order.front().is_some_and(|(at, _, _)| *at <= now) {
            self.expire_tombstone();
        }
        match &mut self.pairing {
            Pairing::Idle { next_try } if *next_try <= now => self.try_next(now),
            Pairing::Paired { manager, last_heard, .. } if now.since(*last_heard) >= self.config.manager_timeout => {
                let manager = manager.clone();
                tracing::warn!(worker = %self.config.name, %manager, "the manager is silent; moving on");
                self.end_relationship(&manager, false, now);
            }
            Pairing::Paired { manager, epoch, next_ping, pinging, .. } if *next_ping <= now && !*pinging => {
                *next_ping = now.plus(self.config.ping_interval);
                *pinging = true;
                let (manager, epoch) = (manager.clone(), *epoch);
                let p = self.calls.start(
                    &manager,
                    Body::ManagerPing,
                    CallKind::Ping { epoch },
                    now,
                    self.config.ping_interval,
                    0,
                );
                self.send(&manager, p);
            }
            _ => {}
        }
        self.start_ready(now);
        self.flush_reports(now);
    }

    /// When [`WorkerNode::tick`] must be called next.
    pub fn next_deadline(&self) -> Option<UnixMs> {
        let pairing = match &self.pairing {
            Pairing::Idle { next_try } => Some(*next_try),
            Pairing::Paired { last_heard, next_ping, pinging, .. } => {
                let gone = last_heard.plus(self.config.manager_timeout);
                Some(if *pinging { gone } else { gone.min(*next_ping) })
            }
            Pairing::Asking { .. } | Pairing::Left => None,
        };
        [
            pairing,
            self.calls.next_deadline(),
            self.deadlines.first().map(|(d, _, _)| *d),
            self.tombstone_order.front().map(|(d, _, _)| *d),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}
