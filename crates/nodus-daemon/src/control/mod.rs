//! The built-in `control` service: the control plane of seed 000 mounted on the node, over the
//! pure cores of [`nodus_control`].
//!
//! **The tree.** The node keeps the tree of its own components ([`nodus_control::Tree`]),
//! reconciled every [`TICK`] (and before a request that names an unknown component) with what
//! the node reads fresh from its parts ([`sources`]): the node itself (root), every registered
//! service (built-in ones, and programs with the `_pid`/`parent_node` they registered with), each
//! deployed app and each of its worker processes. A component whose parent runs on another node
//! is announced there (`ADOPT`, and `RELEASE` when it ends), so that node keeps a stub of it and
//! a kill of the parent reaches it. `TREE` lists the components (`scope=cluster`: of every live
//! node).
//!
//! **Monitoring** (`MONITORING component=ID;sync_time=T`, seed 000): the node answers for itself,
//! its built-in services and its apps; a program's service gets the request on its own
//! connection and answers it (the client SDK does by default); a worker gets it as the
//! [`nodus_engine::MONITORING_EVENT`] invocation (the worker SDK answers it by default; for a
//! worker that has no handler, a plain Cocaine worker for instance, the node answers from what
//! the engine knows and says so in `message`). A service that declared its commands without
//! `MONITORING` is answered for the same way. A component that does not answer before the
//! request's `_expires_at` (or `[control] monitoring_timeout_ms`) is reported
//! `ERROR code=not_answering` ([`nodus_control::MonitorTracker`]). A component of another node
//! is asked there.
//!
//! **Kill** (`KILL component=ID`, `admin`): the cascade of [`nodus_control::kill`]: what the
//! component started is killed first (children on other nodes through their node's `control`),
//! then it stops: a service gets `KILL` on its connection (its SDK answers, then the node closes
//! the connection; after `stop_grace_ms` it is closed anyway), an app is stopped through the
//! `apps` service, a worker is terminated, the node shuts down; built-in services stop with the
//! node. Then its parent gets `ERROR code=killed` (`message_type=error`): a service on its
//! connection, a component of another node through that node's `control`. The requester gets
//! `RESULT spec=kill` when it is done.
//!
//! Requests and the permission each needs: `MONITORING` and `TREE` (`status`), `KILL` (`admin`);
//! between nodes `ADOPT`, `RELEASE` and kill reports (`ERROR`) need `admin`, which only the node's
//! own principal and authenticated peers in `admin_nodes` have.
//!
//! Bounds: the tree (`[control] max_components`), awaited monitoring answers
//! ([`nodus_control::monitor::DEFAULT_MAX_POLLS`]), kills awaiting an answer ([`MAX_KILLS`]),
//! requests this service awaits ([`crate::inproc::MAX_OUTSTANDING`]).

pub mod health;
pub(crate) mod sources;

pub use sources::ComponentSource;

use crate::inproc::InProc;
use crate::router::DeliverError;
use crate::server::{Outbound, Shared};
use nodus_control::control::{self as ctl, Body, ControlMessage, Header, MonitoringResult, Spec};
use nodus_control::kill::{KillAction, KillLimits, KillOrder, KillRequest};
use nodus_control::listing::{self, ComponentRow};
use nodus_control::monitor::{MonitorTracker, Poll, DEFAULT_MAX_POLLS};
use nodus_control::{expiry, Component, ComponentId, ComponentKind, Tree};
use nodus_wire::node::Permission;
use nodus_wire::Message;
use sources::Handle;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// The built-in service's name.
pub const CONTROL_SERVICE: &str = "control";
/// How often the tree is reconciled and deadlines checked.
pub const TICK: Duration = Duration::from_millis(250);
/// How often the node's own flags are checked.
const HEALTH_EVERY: Duration = Duration::from_secs(1);
/// How long `TREE scope=cluster` waits for each node.
pub const GATHER_TIMEOUT: Duration = Duration::from_secs(3);
/// Most kills awaiting their answer at once.
pub const MAX_KILLS: usize = 4096;
/// How long stopping an app may take (its workers get their terminate timeout).
const APP_STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Inter-node: a component here was started by one on the node the message goes to.
pub const ADOPT: &str = "ADOPT";
/// Inter-node: that component ended.
pub const RELEASE: &str = "RELEASE";
/// List the node's components.
pub const TREE: &str = "TREE";

/// Commands of the service and the permission each needs: the crate's requests
/// ([`ctl::COMMANDS`]: `MONITORING` status, `KILL` admin), the listing, and what nodes tell each
/// other.
fn commands() -> Vec<(&'static str, Permission)> {
    let mut all: Vec<(&str, Permission)> =
        ctl::COMMANDS.iter().map(|(c, a)| (*c, crate::flags::permission(*a))).collect();
    all.extend([
        (TREE, Permission::Status),
        (ctl::ERROR, Permission::Admin),
        (ADOPT, Permission::Admin),
        (RELEASE, Permission::Admin),
    ]);
    all
}

/// Completions of work the service started on other tasks.
enum Event {
    /// A worker answered its monitoring invocation (or failed to).
    Probed { ask: u64, result: Result<Vec<bytes::Bytes>, nodus_engine::SessionError> },
    /// An app stopped for a kill.
    AppStopped { component: ComponentId },
    /// A killed service's grace is over: close its connection whatever it did.
    ForceClose { conn: crate::router::ConnId },
}

/// One monitoring request awaiting a component's answer.
struct Asked {
    request: Message,
    header: Header,
    component: ComponentId,
    sync_time: i64,
    /// What the node says if the component cannot answer itself (a worker with no handler).
    fallback: Option<MonitoringResult>,
}

/// Registers the `control` service and runs it until the node stops.
pub(crate) fn start(shared: Arc<Shared>) -> tokio::task::JoinHandle<()> {
    let (conn, rx) = shared.attach_with(CONTROL_SERVICE, Some(&commands()));
    let inproc = InProc::new(shared.clone(), conn);
    let (events_tx, events) = mpsc::channel(1024);
    let c = &shared.config().control;
    let server = shared.config().server_name.clone();
    let control = Control {
        node: sources::node_id(&server),
        tree: Tree::new(&server, c.max_components),
        limits: KillLimits { child_wait_ms: c.child_wait_ms, stop_grace_ms: c.stop_grace_ms },
        monitoring_timeout_ms: c.monitoring_timeout_ms,
        started_at: shared.now_ms(),
        health: health::Health::new(&shared),
        server,
        shared,
        inproc,
        tracker: MonitorTracker::new(DEFAULT_MAX_POLLS),
        handles: HashMap::new(),
        kills: HashMap::new(),
        next_token: 1,
        asked: HashMap::new(),
        stopping: HashMap::new(),
        remote_kills: HashMap::new(),
        adopted: HashMap::new(),
        events: events_tx,
        shutdown: false,
        failed_apps: Vec::new(),
    };
    tokio::spawn(control.run(rx, events))
}

struct Control {
    shared: Arc<Shared>,
    inproc: Arc<InProc>,
    server: String,
    node: ComponentId,
    started_at: i64,
    tree: Tree,
    limits: KillLimits,
    monitoring_timeout_ms: i64,
    tracker: MonitorTracker,
    /// How to reach each local component (from the last reconcile).
    handles: HashMap<ComponentId, Handle>,
    /// Kill requests to answer, by token.
    kills: HashMap<u64, Message>,
    next_token: u64,
    /// Monitoring requests awaiting a component, by the id of what this service asked it.
    asked: HashMap<u64, Asked>,
    /// `KILL`s sent to services, by id: the component and its connection.
    stopping: HashMap<u64, (ComponentId, crate::router::ConnId)>,
    /// `KILL`s sent to other nodes, by id: the child killed there.
    remote_kills: HashMap<u64, ComponentId>,
    /// Local components announced to their parent's node: that node.
    adopted: HashMap<ComponentId, String>,
    events: mpsc::Sender<Event>,
    /// The node itself was killed: shut down once the answers are out.
    shutdown: bool,
    health: health::Health,
    failed_apps: Vec<(String, String)>,
}

impl Control {
    async fn run(mut self, mut rx: mpsc::Receiver<Outbound>, mut events: mpsc::Receiver<Event>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut health = tokio::time::interval(HEALTH_EVERY);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Monitoring answers and kills due before the next tick are acted on at their time.
            let due = [self.tracker.next_deadline(), self.tree.next_deadline()].into_iter().flatten().min();
            let wait = due.map_or(TICK, |d| Duration::from_millis(u64::try_from(d - self.now()).unwrap_or(0)));
            tokio::select! {
                _ = tokio::time::sleep(wait), if due.is_some() && wait < TICK => self.deadlines(),
                m = rx.recv() => match m {
                    Some(Outbound::Msg(m, _) | Outbound::Offered(m, _, _)) => self.message(m).await,
                    Some(Outbound::Close) => {}
                    None => break,
                },
                Some(ev) = events.recv() => self.event(ev),
                _ = tick.tick() => self.tick().await,
                _ = health.tick() => {
                    let now = self.shared.now_ms();
                    let failed = std::mem::take(&mut self.failed_apps);
                    self.health.check(&self.shared, &failed, now).await;
                    self.failed_apps = failed;
                }
            }
        }
    }

    fn now(&self) -> i64 {
        self.shared.now_ms()
    }

    fn creator(&self) -> String {
        format!("{}:{CONTROL_SERVICE}", self.server)
    }

    /// Reads the components fresh and brings the tree in line: new ones in, gone ones finished
    /// (which moves kills along), `is_running` updated; children of other nodes' components are
    /// announced there.
    async fn refresh(&mut self) {
        let snap = sources::snapshot(&self.shared, self.started_at).await;
        self.failed_apps = snap.failed_apps;
        let now = self.now();
        let mut handles = HashMap::with_capacity(snap.components.len());
        let mut wanted: Vec<Component> = Vec::with_capacity(snap.components.len());
        for (c, h) in snap.components {
            handles.insert(c.id, h);
            wanted.push(c);
        }
        // Gone: local components no longer read (stubs of other nodes' children stay).
        let gone: Vec<ComponentId> =
            self.tree.iter().filter(|c| self.tree.is_local(c) && !handles.contains_key(&c.id)).map(|c| c.id).collect();
        let mut actions = Vec::new();
        for id in gone {
            self.tree.finished(id, now, self.limits, &mut actions);
        }
        for c in wanted {
            match self.tree.get(c.id) {
                Some(_) => {
                    self.tree.set_running(c.id, c.is_running);
                }
                None => {
                    let (id, parent) = (c.id, c.parent_node.clone().zip(c.pid));
                    match self.tree.insert(c) {
                        Ok(()) => {
                            if let Some((node, pid)) = parent {
                                self.adopt(id, pid, &node);
                            }
                        }
                        Err(e) => debug!(component = %id, error = %e, "component not tracked"),
                    }
                }
            }
        }
        // Announced children that ended: their parent's node forgets them.
        let ended: Vec<(ComponentId, String)> =
            self.adopted.iter().filter(|(id, _)| !handles.contains_key(id)).map(|(i, n)| (*i, n.clone())).collect();
        for (id, node) in ended {
            self.adopted.remove(&id);
            let m = Message::new(RELEASE).param("component", id).to(&format!("{node}:{CONTROL_SERVICE}"));
            self.inproc.send(m);
        }
        self.handles = handles;
        self.apply(actions);
    }

    /// Tells `node` that component `id` here was started by its component `pid`.
    fn adopt(&mut self, id: ComponentId, pid: ComponentId, node: &str) {
        let Some(c) = self.tree.get(id) else { return };
        let m = Message::new(ADOPT)
            .param("component", id)
            .param("pid", pid)
            .param("kind", c.kind)
            .param("name", &c.name)
            .param("node", &self.server)
            .to(&format!("{node}:{CONTROL_SERVICE}"));
        self.inproc.send(m);
        self.adopted.insert(id, node.to_string());
    }

    async fn tick(&mut self) {
        self.refresh().await;
        self.deadlines();
    }

    /// Kills and monitoring answers whose time has come.
    fn deadlines(&mut self) {
        let now = self.now();
        let mut actions = Vec::new();
        self.tree.tick(now, self.limits, &mut actions);
        self.apply(actions);
        for poll in self.tracker.tick(now) {
            self.polled(poll);
        }
    }

    fn event(&mut self, ev: Event) {
        match ev {
            Event::Probed { ask, result } => self.probed(ask, result),
            Event::AppStopped { component } => {
                let mut actions = Vec::new();
                self.tree.finished(component, self.now(), self.limits, &mut actions);
                self.apply(actions);
            }
            Event::ForceClose { conn } => self.shared.close(conn),
        }
    }

    async fn message(&mut self, msg: Message) {
        let Some(msg) = self.inproc.settle(msg) else { return };
        if msg.envelope.reply_to != 0 {
            return self.reply(msg);
        }
        if !crate::apps::is_request(&msg) {
            return;
        }
        let now = self.now();
        if let expiry::Admit::Expired { reply } = expiry::admit(&msg, now, "the queue of the control service") {
            if let Some(r) = reply.filter(|_| msg.envelope.id != 0) {
                self.inproc.send(*r);
            }
            return;
        }
        match msg.command.as_str() {
            TREE => self.list(msg).await,
            ADOPT => self.adopted_here(&msg),
            RELEASE => {
                if let Some(id) = msg.get("component").and_then(|c| c.parse::<ComponentId>().ok()) {
                    let remote = self.tree.get(id).is_some_and(|c| !self.tree.is_local(c));
                    if remote {
                        let mut actions = Vec::new();
                        self.tree.finished(id, now, self.limits, &mut actions);
                        self.apply(actions);
                    }
                }
            }
            _ => match ControlMessage::from_message(&msg) {
                Ok(c) => self.control(msg, c).await,
                Err(e) => {
                    if nodus_wire::node::answerable(&msg) {
                        let m = msg.reply("INVALID").param("command", &msg.command).param("message", e.to_string());
                        self.inproc.send(m);
                    }
                }
            },
        }
    }

    async fn control(&mut self, msg: Message, c: ControlMessage) {
        match c.body.clone() {
            Body::Monitoring { target, sync_time } => {
                self.monitoring(msg, c.header, target.unwrap_or(self.node), sync_time).await
            }
            Body::Kill { target: Some(target) } => self.kill(msg, c.header, target).await,
            Body::Kill { target: None } => {
                let e = ControlMessage::answer(
                    &c.header,
                    Some(self.node),
                    &self.creator(),
                    self.now(),
                    error_body(
                        Spec::Kill,
                        None,
                        "invalid",
                        "name the component to kill: KILL component=ID (nodus tree lists them)",
                    ),
                );
                self.answer(&msg, e);
            }
            Body::Error { spec: Spec::Kill, component: Some(child), .. } => self.report_arrived(msg, child),
            Body::Error { .. } | Body::MonitoringResult { .. } | Body::KillResult { .. } => {}
        }
    }

    /// Sends `answer` to the requester of `request` (when it asked with an id).
    fn answer(&self, request: &Message, answer: ControlMessage) {
        if request.envelope.id != 0 {
            self.inproc.send(answer.reply_to(request));
        }
    }

    // ---------------------------------------------------------------- TREE

    async fn list(&mut self, msg: Message) {
        self.refresh().await;
        let mut rows: Vec<ComponentRow> =
            self.tree.iter().filter(|c| self.tree.is_local(c)).map(ComponentRow::from).collect();
        rows.sort_by(|a, b| (a.id.len(), &a.id).cmp(&(b.id.len(), &b.id)));
        if msg.get("scope") != Some("cluster") {
            if msg.envelope.id != 0 {
                let reply = msg.reply(TREE).param("count", rows.len()).with_payload(listing::encode(&rows));
                self.inproc.send(reply);
            }
            return;
        }
        let (inproc, nodes) = (self.inproc.clone(), self.shared.live_nodes());
        tokio::spawn(async move {
            let mut asks = tokio::task::JoinSet::new();
            for node in nodes {
                let inproc = inproc.clone();
                let ask = Message::new(TREE).to(&format!("{node}:{CONTROL_SERVICE}"));
                asks.spawn(async move { (node, inproc.ask(ask, GATHER_TIMEOUT).await) });
            }
            let mut missing = Vec::new();
            while let Some(Ok((node, answer))) = asks.join_next().await {
                match answer.ok().filter(|m| m.command == TREE).map(|m| listing::decode(&m.payload)) {
                    Some(Ok(theirs)) => rows.extend(theirs),
                    _ => missing.push(node),
                }
            }
            missing.sort();
            if msg.envelope.id != 0 {
                let mut reply = msg.reply(TREE).param("count", rows.len()).param("scope", "cluster");
                if !missing.is_empty() {
                    reply = reply.param("missing", missing.join(","));
                }
                inproc.send(reply.with_payload(listing::encode(&rows)));
            }
        });
    }

    /// Another node says one of its components was started by one of ours.
    fn adopted_here(&mut self, msg: &Message) {
        let parse = |k: &str| msg.get(k).and_then(|v| v.parse::<ComponentId>().ok());
        let (Some(id), Some(pid), Some(node)) = (parse("component"), parse("pid"), msg.get("node")) else {
            return debug!(line = %nodus_wire::text::to_line(msg), "ADOPT without component, pid and node");
        };
        if node == self.server || self.tree.get(id).is_some() {
            return;
        }
        let kind = msg.get("kind").and_then(|k| k.parse().ok()).unwrap_or(ComponentKind::Other);
        let c = Component::new(id, kind, msg.get("name").unwrap_or(""), node).started_by(pid);
        if let Err(e) = self.tree.insert(c) {
            debug!(component = %id, %node, error = %e, "child of another node not tracked");
        }
    }

    // ---------------------------------------------------------------- MONITORING

    async fn monitoring(&mut self, msg: Message, header: Header, target: ComponentId, sync_time: i64) {
        if self.tree.get(target).is_none() {
            self.refresh().await;
        }
        let now = self.now();
        let expires_at = match header.expires_at {
            0 => now.saturating_add(self.monitoring_timeout_ms),
            e => e,
        };
        // The component must answer a little before the requester gives up (a quarter of the
        // time left, at most one second), so that "not answering" reaches the requester in time.
        let margin = (expires_at.saturating_sub(now) / 4).min(1000);
        let due = expires_at.saturating_sub(margin);
        let Some(c) = self.tree.get(target).cloned() else {
            let text =
                format!("no component {target} on node {}: `nodus tree` lists the cluster's components", self.server);
            let e = ControlMessage::answer(
                &header,
                None,
                &self.creator(),
                now,
                error_body(Spec::Monitoring, Some(target), "unknown_component", &text),
            );
            return self.answer(&msg, e);
        };
        if !self.tree.is_local(&c) {
            return self.relay(msg, &c.node, expires_at);
        }
        let handle = self.handles.get(&target).cloned();
        match handle {
            Some(Handle::Service { conn, in_flight }) => {
                let ask = self.inproc.next_id();
                let mut forward = ControlMessage {
                    header: Header { expires_at: due, ..header.clone() },
                    body: Body::Monitoring { target: Some(target), sync_time },
                }
                .to_message();
                forward.envelope.id = ask;
                if let Err(e) = self.tracker.expect(ask, target, sync_time, due, now) {
                    let e = ControlMessage::answer(
                        &header,
                        Some(target),
                        &self.creator(),
                        now,
                        error_body(Spec::Monitoring, Some(target), "busy", &e.to_string()),
                    );
                    return self.answer(&msg, e);
                }
                let mut asked = Asked { request: msg, header, component: target, sync_time, fallback: None };
                match self.shared.deliver_to(self.inproc.conn(), conn, forward) {
                    Ok(()) => {
                        self.asked.insert(ask, asked);
                    }
                    Err(DeliverError::NotUnderstood) => {
                        // It declared its commands without MONITORING: the node answers for it.
                        asked.fallback = Some(MonitoringResult {
                            sync_time,
                            name: c.name.clone(),
                            host: self.server.clone(),
                            is_running: in_flight > 0,
                            message: format!(
                                "answered by node {} for the service, which does not take MONITORING (its COMMANDS): \
                                 connected, {in_flight} request(s) in hand",
                                self.server
                            ),
                        });
                        self.asked.insert(ask, asked);
                        self.fall_back(ask);
                    }
                    Err(_) => {
                        // Gone or refused: the tracker reports it silent at its expiry.
                        self.asked.insert(ask, asked);
                    }
                }
            }
            Some(Handle::Worker { app, worker, pid, state, load }) => {
                let ask = self.inproc.next_id();
                if let Err(e) = self.tracker.expect(ask, target, sync_time, due, now) {
                    let e = ControlMessage::answer(
                        &header,
                        Some(target),
                        &self.creator(),
                        now,
                        error_body(Spec::Monitoring, Some(target), "busy", &e.to_string()),
                    );
                    return self.answer(&msg, e);
                }
                let fallback = MonitoringResult {
                    sync_time,
                    name: c.name.clone(),
                    host: self.server.clone(),
                    is_running: load > 0,
                    message: format!(
                        "answered by node {} for the worker (pid {pid}, {state}, {load} request(s) open), which has no \
                         handler for {}",
                        self.server,
                        nodus_engine::MONITORING_EVENT
                    ),
                };
                let content = serde_json::json!({
                    "id": header.id.to_string(),
                    "pid": header.pid.map(|p| p.to_string()),
                    "creator": header.creator,
                    "created_at": header.created_at,
                    "expires_at": due,
                    "spec": "monitoring",
                    "config": {"sync_time": sync_time},
                });
                self.asked.insert(
                    ask,
                    Asked { request: msg, header, component: target, sync_time, fallback: Some(fallback) },
                );
                let events = self.events.clone();
                let done = nodus_engine::CallDone::new(move |result| {
                    let _ = events.try_send(Event::Probed { ask, result });
                });
                let body = bytes::Bytes::from(content.to_string());
                if let Some(engine) = self.shared.engine() {
                    let _ = engine.probe(&app, worker, nodus_engine::MONITORING_EVENT, body, done);
                }
            }
            other => {
                // The node answers for itself, its built-in services and its apps.
                let message = match &other {
                    Some(Handle::Node) => format!(
                        "node {}: {} component(s), {} other node(s) reachable",
                        self.server,
                        self.tree.len(),
                        self.shared.live_nodes().len()
                    ),
                    Some(Handle::App { status, .. }) => format!("app {}: {status}", c.name),
                    Some(Handle::BuiltIn) => format!("built-in service of node {}", self.server),
                    Some(Handle::External(_)) => format!("{} {} on node {}", c.kind, c.name, self.server),
                    _ => String::new(),
                };
                let result = c.monitoring_result(sync_time, message);
                let creator = format!("{}:{}", self.server, c.name);
                let a = ControlMessage::answer(
                    &header,
                    Some(target),
                    &creator,
                    now,
                    Body::MonitoringResult { component: Some(target), result },
                );
                self.answer(&msg, a);
            }
        }
    }

    /// Asks the component's own node, and hands its answer back (or says it did not answer).
    fn relay(&self, msg: Message, node: &str, expires_at: i64) {
        let inproc = self.inproc.clone();
        // Answer a little before the requester gives up, as for a local component.
        let left = expiry::remaining(expires_at, self.now()).unwrap_or(0);
        let wait = Duration::from_millis(u64::try_from(left - (left / 4).min(1000)).unwrap_or(0));
        let mut ask = msg.clone();
        ask.to = nodus_wire::Address::new(node, CONTROL_SERVICE);
        ask.from = Default::default();
        let node = node.to_string();
        tokio::spawn(async move {
            let answer = inproc.ask(ask, wait).await;
            if msg.envelope.id == 0 {
                return;
            }
            let reply = match answer {
                Ok(mut a) => {
                    let base = msg.reply(&a.command);
                    a.to = base.to;
                    a.envelope.reply_to = base.envelope.reply_to;
                    a
                }
                Err(e) => msg
                    .reply("ERROR")
                    .param("code", "not_answering")
                    .param("command", &msg.command)
                    .param("message", format!("node {node} did not answer for the component: {e}")),
            };
            inproc.send(reply);
        });
    }

    /// The answer of a service to this service's request (`MONITORING` or `KILL`), or the node's
    /// error about it, or another node's answer to a kill.
    fn reply(&mut self, msg: Message) {
        let id = msg.envelope.reply_to;
        if let Some((component, conn)) = self.stopping.remove(&id) {
            debug!(%component, answer = %msg.command, "killed service answered; closing its connection");
            self.shared.close(conn);
            return;
        }
        if let Some(child) = self.remote_kills.remove(&id) {
            // Unknown there: it ended already; its report will not come.
            if msg.command == ctl::ERROR && msg.get("code") == Some("unknown_component") {
                let mut actions = Vec::new();
                self.tree.finished(child, self.now(), self.limits, &mut actions);
                self.apply(actions);
            }
            return;
        }
        if !self.asked.contains_key(&id) {
            return;
        }
        let now = self.now();
        match ControlMessage::from_message(&msg) {
            Ok(ControlMessage { body: Body::MonitoringResult { result, .. }, header }) => {
                let component = self.asked[&id].component;
                match self.tracker.answer(id, component, result, now) {
                    Ok(poll) => {
                        let creator = Some(header.creator).filter(|c| !c.is_empty());
                        self.polled_as(poll, creator);
                    }
                    Err(e) => debug!(%component, error = %e, "monitoring answer not taken"),
                }
            }
            // A service that does not know MONITORING answered UNKNOWN: the node answers for it.
            _ if msg.command == "UNKNOWN" => {
                if let Some(a) = self.asked.get_mut(&id) {
                    let c = self.tree.get(a.component);
                    a.fallback = Some(MonitoringResult {
                        sync_time: 0,
                        name: c.map_or(String::new(), |c| c.name.clone()),
                        host: self.server.clone(),
                        is_running: c.is_some_and(|c| c.is_running),
                        message: format!(
                            "answered by node {} for the service, which does not take MONITORING",
                            self.server
                        ),
                    });
                }
                self.fall_back(id);
            }
            // The node's timeout, expiry or disconnection: the tracker reports it at the expiry.
            _ => debug!(command = %msg.command, "no monitoring answer"),
        }
    }

    /// A worker's answer to its monitoring invocation.
    fn probed(&mut self, ask: u64, result: Result<Vec<bytes::Bytes>, nodus_engine::SessionError>) {
        let Some(component) = self.asked.get(&ask).map(|a| a.component) else { return };
        let now = self.now();
        match result {
            Ok(chunks) => match parse_worker_answer(&chunks.concat()) {
                Ok((mut result, creator)) => {
                    let name = self.tree.get(component).map(|c| c.name.clone()).unwrap_or_default();
                    if result.name.is_empty() {
                        result.name = name;
                    }
                    if result.host.is_empty() {
                        result.host.clone_from(&self.server);
                    }
                    match self.tracker.answer(ask, component, result, now) {
                        Ok(poll) => self.polled_as(poll, creator),
                        Err(e) => debug!(%component, error = %e, "worker's monitoring answer not taken"),
                    }
                }
                Err(e) => debug!(%component, error = %e, "worker's monitoring answer unreadable"),
            },
            // The worker answered with an error (no handler for the event): the node answers.
            Err(nodus_engine::SessionError::Worker { message, .. }) => {
                if let Some(f) = self.asked.get_mut(&ask).and_then(|a| a.fallback.as_mut()) {
                    f.message.push_str(&format!(" (it said: {message})"));
                    if f.message.len() > ctl::MAX_TEXT_BYTES {
                        f.message.truncate(floor_char_boundary(&f.message, ctl::MAX_TEXT_BYTES));
                    }
                }
                self.fall_back(ask);
            }
            // Not active, failed, gone: silent; the tracker reports it at the expiry.
            Err(e) => debug!(%component, error = %e, "worker cannot be asked"),
        }
    }

    /// Answers for a component that cannot answer itself.
    fn fall_back(&mut self, ask: u64) {
        let Some(a) = self.asked.get(&ask) else { return };
        let Some(mut result) = a.fallback.clone() else { return };
        let component = a.component;
        result.sync_time = a.sync_time;
        let now = self.now();
        if let Ok(poll) = self.tracker.answer(ask, component, result, now) {
            self.polled_as(poll, None);
        }
    }

    fn polled(&mut self, poll: Poll) {
        self.polled_as(poll, None);
    }

    /// One awaited answer ended: the requester gets it, or hears the component did not answer.
    fn polled_as(&mut self, poll: Poll, creator: Option<String>) {
        let (ask, component) = match &poll {
            Poll::Answered { request, component, .. } | Poll::NotAnswering { request, component, .. } => {
                (*request, *component)
            }
        };
        let Some(a) = self.asked.remove(&ask) else { return };
        let now = self.now();
        let name = self.tree.get(component).map_or(String::new(), |c| c.name.clone());
        let answer = match poll {
            Poll::Answered { result, .. } => {
                let creator = creator.unwrap_or_else(|| format!("{}:{name}", self.server));
                ControlMessage::answer(
                    &a.header,
                    Some(component),
                    &creator,
                    now,
                    Body::MonitoringResult { component: Some(component), result },
                )
            }
            Poll::NotAnswering { expires_at, .. } => {
                let text = format!("component {component} ({name}) did not answer before _expires_at={expires_at}");
                ControlMessage::answer(
                    &a.header,
                    Some(component),
                    &self.creator(),
                    now,
                    error_body(Spec::Monitoring, Some(component), "not_answering", &text),
                )
            }
        };
        self.answer(&a.request, answer);
    }

    // ---------------------------------------------------------------- KILL

    async fn kill(&mut self, msg: Message, header: Header, target: ComponentId) {
        if self.tree.get(target).is_none() {
            self.refresh().await;
        }
        let now = self.now();
        let refuse = |this: &Self, code: &str, text: String| {
            let e = ControlMessage::answer(
                &header,
                Some(this.node),
                &this.creator(),
                now,
                error_body(Spec::Kill, Some(target), code, &text),
            );
            this.answer(&msg, e);
        };
        let Some(c) = self.tree.get(target).cloned() else {
            return refuse(
                self,
                "unknown_component",
                format!("no component {target} on node {}: `nodus tree` lists the cluster's components", self.server),
            );
        };
        if !self.tree.is_local(&c) {
            let expires_at = match header.expires_at {
                0 => now.saturating_add(self.limits.child_wait_ms + self.limits.stop_grace_ms),
                e => e,
            };
            return self.relay(msg, &c.node, expires_at);
        }
        if self.handles.get(&target) == Some(&Handle::BuiltIn) {
            return refuse(
                self,
                "not_killable",
                format!(
                    "{} is a built-in service of node {}: it stops with its node (kill the node, {})",
                    c.name, self.server, self.node
                ),
            );
        }
        if self.kills.len() >= MAX_KILLS {
            return refuse(self, "busy", format!("{MAX_KILLS} kills are in progress on node {}", self.server));
        }
        let token = self.next_token;
        self.next_token += 1;
        let creator = if header.creator.is_empty() { msg.from.to_string() } else { header.creator.clone() };
        let order = KillOrder { id: header.id, creator, expires_at: header.expires_at };
        let mut actions = Vec::new();
        match self.tree.kill(target, KillRequest { order, token }, self.limits, now, &mut actions) {
            Ok(()) => {
                info!(component = %target, kind = %c.kind, name = %c.name, by = %msg.from, "kill");
                self.kills.insert(token, msg);
                self.apply(actions);
            }
            Err(e) => refuse(self, e.code(), e.to_string()),
        }
    }

    /// A kill report from another node: its component (a child of one of ours) is gone.
    fn report_arrived(&mut self, msg: Message, child: ComponentId) {
        let parent = self.tree.get(child).and_then(|c| c.pid);
        let survivor = parent.filter(|p| !self.tree.is_killing(*p));
        let mut actions = Vec::new();
        if !self.tree.finished(child, self.now(), self.limits, &mut actions) {
            return;
        }
        self.apply(actions);
        if let Some(parent) = survivor {
            self.deliver_report(parent, msg);
        }
    }

    /// Hands a kill report to a parent that is not itself being killed: a service gets it on its
    /// connection; the node, apps and built-in services only log it.
    fn deliver_report(&self, parent: ComponentId, mut report: Message) {
        match self.handles.get(&parent) {
            Some(Handle::Service { conn, .. }) => {
                report.envelope.id = 0;
                report.envelope.reply_to = 0;
                if let Err(e) = self.shared.deliver_to(self.inproc.conn(), *conn, report) {
                    debug!(%parent, ?e, "kill report not delivered to the parent service");
                }
            }
            _ => {
                info!(%parent, report = %nodus_wire::text::to_line(&report), "a component this one started was killed")
            }
        }
    }

    /// Applies the cascade's actions in order (a stop that completes at once adds more).
    fn apply(&mut self, actions: Vec<KillAction>) {
        let mut queue: VecDeque<KillAction> = actions.into();
        let now = self.now();
        while let Some(action) = queue.pop_front() {
            let mut more = Vec::new();
            match action {
                KillAction::SendKill { target, node, parent, order } => {
                    let mut m = ControlMessage {
                        header: Header {
                            id: order.id,
                            pid: Some(parent),
                            creator: order.creator,
                            created_at: now,
                            expires_at: order.expires_at,
                        },
                        body: Body::Kill { target: Some(target) },
                    }
                    .to_message()
                    .to(&format!("{node}:{CONTROL_SERVICE}"));
                    let ask = self.inproc.next_id();
                    m.envelope.id = ask;
                    self.remote_kills.insert(ask, target);
                    self.inproc.send(m);
                }
                KillAction::Stop { id, kind, forced } => {
                    debug!(component = %id, %kind, forced, "stopping");
                    self.stop(id, now, &mut more);
                }
                KillAction::ReportToParent(report) => {
                    let Some(parent) = report.parent else { continue };
                    let message = report.to_control(&self.creator(), now).to_message();
                    match report.parent_node.as_deref() {
                        Some(node) if node != self.server => {
                            self.inproc.send(message.to(&format!("{node}:{CONTROL_SERVICE}")));
                        }
                        _ if self.tree.is_killing(parent) => {}
                        _ => self.deliver_report(parent, message),
                    }
                }
                KillAction::Done(done) => {
                    if let Some(request) = self.kills.remove(&done.request.token) {
                        let answer = done.to_control(Some(self.node), &self.creator(), now);
                        self.answer(&request, answer);
                    }
                }
            }
            queue.extend(more);
        }
        if self.shutdown {
            info!("the node was killed: shutting down");
            self.shared.shutdown();
        }
    }

    /// Stops one local component; stops that complete at once push what follows to `more`.
    fn stop(&mut self, id: ComponentId, now: i64, more: &mut Vec<KillAction>) {
        match self.handles.get(&id).cloned() {
            Some(Handle::Node) => {
                self.shutdown = true;
                self.tree.finished(id, now, self.limits, more);
            }
            Some(Handle::Service { conn, .. }) => {
                let ask = self.inproc.next_id();
                let mut kill = ControlMessage {
                    header: Header {
                        id: ask,
                        pid: Some(self.node),
                        creator: self.creator(),
                        created_at: now,
                        expires_at: now.saturating_add(self.limits.stop_grace_ms),
                    },
                    body: Body::Kill { target: Some(id) },
                }
                .to_message();
                kill.envelope.id = ask;
                match self.shared.deliver_to(self.inproc.conn(), conn, kill) {
                    Ok(()) => {
                        self.stopping.insert(ask, (id, conn));
                        let (events, grace) = (self.events.clone(), self.limits.stop_grace_ms);
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(u64::try_from(grace).unwrap_or(0))).await;
                            let _ = events.send(Event::ForceClose { conn }).await;
                        });
                    }
                    // It takes no KILL (its COMMANDS), or cannot be told: disconnect it now.
                    Err(_) => self.shared.close(conn),
                }
            }
            Some(Handle::App { name, .. }) => {
                let (inproc, events) = (self.inproc.clone(), self.events.clone());
                tokio::spawn(async move {
                    let stop = Message::new("STOP").param("name", &name).to(crate::apps::APPS_SERVICE);
                    if let Err(e) = inproc.ask(stop, APP_STOP_TIMEOUT).await {
                        warn!(app = %name, error = %e, "stopping the killed app took too long");
                    }
                    let _ = events.send(Event::AppStopped { component: id }).await;
                });
            }
            Some(Handle::Worker { app, worker, .. }) => {
                if let Some(engine) = self.shared.engine().cloned() {
                    tokio::spawn(async move {
                        if let Err(e) = engine.terminate(&app, worker).await {
                            debug!(%app, worker, error = %e, "worker already gone");
                        }
                    });
                }
            }
            Some(Handle::External(source)) => source.0.stop(id),
            // Built-in services stop with the node; anything else is gone already.
            Some(Handle::BuiltIn) | None => {
                self.tree.finished(id, now, self.limits, more);
            }
        }
    }
}

/// An error body of a control answer.
fn error_body(spec: Spec, component: Option<ComponentId>, code: &str, message: &str) -> Body {
    let mut message = message.to_string();
    message.truncate(floor_char_boundary(&message, ctl::MAX_TEXT_BYTES));
    Body::Error { spec, component, code: code.into(), message }
}

fn floor_char_boundary(s: &str, max: usize) -> usize {
    if s.len() <= max {
        return s.len();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    end
}

/// A worker's answer to [`nodus_engine::MONITORING_EVENT`]: the seed's content as JSON; its
/// `result` and `creator`.
fn parse_worker_answer(bytes: &[u8]) -> Result<(MonitoringResult, Option<String>), String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let r = &v["result"];
    let text = |k: &str, max: usize| -> Result<String, String> {
        let s = r[k].as_str().unwrap_or("").to_string();
        if s.len() > max {
            return Err(format!("result.{k} is longer than {max} bytes"));
        }
        Ok(s)
    };
    let result = MonitoringResult {
        sync_time: r["sync_time"].as_i64().ok_or("no result.sync_time")?,
        name: text("name", ctl::MAX_NAME_BYTES)?,
        host: text("host", ctl::MAX_NAME_BYTES)?,
        is_running: r["is_running"].as_bool().ok_or("no result.is_running")?,
        message: text("message", ctl::MAX_TEXT_BYTES)?,
    };
    let creator = v["creator"].as_str().filter(|c| !c.is_empty() && c.len() <= ctl::MAX_NAME_BYTES).map(String::from);
    Ok((result, creator))
}
