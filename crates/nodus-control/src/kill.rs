//! The kill cascade of seed 000, as a state machine over the [`Tree`].
//!
//! A component told to die:
//! 1. sends kill to every component it started, newest first (an Erlang/OTP supervisor stops its
//!    children in reverse start order): children on this node start their own cascade here at
//!    once, children on other nodes get [`KillAction::SendKill`];
//! 2. waits for them to finish, at most until its children deadline (half the time left before
//!    the kill's `expires_at`, and at most [`KillLimits::child_wait_ms`]);
//! 3. stops ([`KillAction::Stop`]; the driver knows how for each kind and answers with
//!    [`Tree::finished`]), waiting at most [`KillLimits::stop_grace_ms`];
//! 4. reports an error (`message_type = error`, `code = killed`) to its parent by `pid`
//!    ([`KillAction::ReportToParent`]), answers whoever asked ([`KillAction::Done`]) and leaves
//!    the tree.
//!
//! A child's report is what its parent waits for, on this node (internally) or from another node
//! (the driver feeds the arriving error to [`Tree::finished`]). Components above the killed one
//! are never touched: they only receive the report.
//!
//! ```text
//!  kill(c) ──► Children{pending} ──all finished──► Stopping ──finished(c)──► gone (report, done)
//!                  │ deadline                          │ stop grace
//!                  └──► Stopping (forced: unanswered)  └──► gone (stopped = false)
//! ```
//!
//! Driving it: call [`Tree::kill`] for a request, [`Tree::finished`] whenever a component stops
//! (after a `Stop`, on its own, or when its report arrives from another node), and [`Tree::tick`]
//! at [`Tree::next_deadline`]; apply the actions in order.

use crate::control::{Body, ControlMessage, Header, Spec};
use crate::expiry;
use crate::id::ComponentId;
use crate::tree::{ComponentKind, Tree};

/// Default longest wait for the components a killed component started.
pub const DEFAULT_CHILD_WAIT_MS: i64 = 10_000;
/// Default longest wait for a component to confirm it stopped.
pub const DEFAULT_STOP_GRACE_MS: i64 = 10_000;

/// The bounds of a cascade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KillLimits {
    /// Longest wait for children before stopping anyway (also bounded by the kill's expiry).
    pub child_wait_ms: i64,
    /// Longest wait for a stop to be confirmed before reporting anyway.
    pub stop_grace_ms: i64,
}

impl Default for KillLimits {
    fn default() -> Self {
        KillLimits { child_wait_ms: DEFAULT_CHILD_WAIT_MS, stop_grace_ms: DEFAULT_STOP_GRACE_MS }
    }
}

/// The kill order a cascade carries to every component it reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KillOrder {
    /// Conversation id of the original kill (seed 000 `id`).
    pub id: u64,
    /// Who asked for the kill.
    pub creator: String,
    /// When the asker stops waiting (Unix ms, 0 = never).
    pub expires_at: i64,
}

/// One request to kill, with the driver's handle for answering it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KillRequest {
    /// The order.
    pub order: KillOrder,
    /// Opaque to the tree: given back in [`KillAction::Done`] so the driver knows whom to answer.
    pub token: u64,
}

/// The error report a killed component sends its parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KillReport {
    /// The component killed.
    pub component: ComponentId,
    /// What it was.
    pub kind: ComponentKind,
    /// Its name.
    pub name: String,
    /// Its parent (`None`: it had none, nobody to tell).
    pub parent: Option<ComponentId>,
    /// The node the parent runs on.
    pub parent_node: Option<String>,
    /// The kill it obeyed.
    pub order: KillOrder,
    /// True when its stop was confirmed.
    pub stopped: bool,
    /// Components it started that did not report back in time.
    pub unanswered: Vec<ComponentId>,
}

impl KillReport {
    /// The seed's error message for the parent (`ERROR code=killed`, `message_type=error`,
    /// `spec=kill`), created now on behalf of the killed component (its `pid`) by `creator`. It
    /// never expires: a report sent after a timeout must still arrive.
    pub fn to_control(&self, creator: &str, now: i64) -> ControlMessage {
        let mut message = format!(
            "{} {} ({}) was killed by {}",
            self.kind,
            self.name,
            self.component,
            if self.order.creator.is_empty() { "an unnamed sender" } else { &self.order.creator }
        );
        if !self.stopped {
            message.push_str("; it did not confirm its stop in time");
        }
        if !self.unanswered.is_empty() {
            message.push_str(&format!("; {} component(s) it started did not report back", self.unanswered.len()));
        }
        ControlMessage {
            header: Header {
                id: self.order.id,
                pid: Some(self.component),
                creator: creator.to_string(),
                created_at: now,
                expires_at: 0,
            },
            body: Body::Error { spec: Spec::Kill, component: Some(self.component), code: "killed".into(), message },
        }
    }
}

/// A finished kill, to answer its requester with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KillDone {
    /// The request being answered.
    pub request: KillRequest,
    /// The component killed.
    pub component: ComponentId,
    /// True when its stop was confirmed.
    pub stopped: bool,
    /// Components it started that did not report back in time.
    pub unanswered: Vec<ComponentId>,
}

impl KillDone {
    /// The `RESULT spec=kill` answer, created now by `pid`/`creator` (the node answering for the
    /// component it killed), with the order's conversation id and expiry.
    pub fn to_control(&self, pid: Option<ComponentId>, creator: &str, now: i64) -> ControlMessage {
        let order = &self.request.order;
        ControlMessage {
            header: Header {
                id: order.id,
                pid,
                creator: creator.into(),
                created_at: now,
                expires_at: order.expires_at,
            },
            body: Body::KillResult {
                component: Some(self.component),
                stopped: self.stopped,
                unanswered: self.unanswered.clone(),
            },
        }
    }
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KillAction {
    /// Send `KILL component=<target>` to `node` (a child there), created by `parent`.
    SendKill {
        /// The child to kill.
        target: ComponentId,
        /// Where it runs.
        node: String,
        /// The local component that started it (the `pid` of the kill message).
        parent: ComponentId,
        /// The order to pass on.
        order: KillOrder,
    },
    /// Stop this node's component `id` (terminate a worker, disconnect a service after it handled
    /// kill, stop an app, abort a task, shut the node down), then call [`Tree::finished`].
    Stop {
        /// The component.
        id: ComponentId,
        /// What it is (how to stop it).
        kind: ComponentKind,
        /// True when some of its children did not report back: stop it without waiting on them.
        forced: bool,
    },
    /// Send this error report to the parent.
    ReportToParent(KillReport),
    /// Answer the requester of a kill.
    Done(KillDone),
}

/// Why a kill was not started here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KillError {
    /// No such component on this node.
    #[error("no component {0} on this node: list them with nodus tree")]
    Unknown(ComponentId),
    /// The component runs on another node: send the kill there.
    #[error("component {id} runs on node {node}: send the kill there")]
    Remote {
        /// The component.
        id: ComponentId,
        /// Its node.
        node: String,
    },
    /// The kill expired before it could run.
    #[error("the kill expired at {expires_at} (now {now}) and was not executed")]
    Expired {
        /// Its expiry.
        expires_at: i64,
        /// The time it was seen.
        now: i64,
    },
}

impl KillError {
    /// The `code` of the `ERROR` answering a refused kill.
    pub fn code(&self) -> &'static str {
        match self {
            KillError::Unknown(_) => "unknown_component",
            KillError::Remote { .. } => "remote_component",
            KillError::Expired { .. } => expiry::EXPIRED_CODE,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Children,
    Stopping,
}

/// The kill in progress of one component (kept in its tree entry).
#[derive(Debug)]
pub(crate) struct KillState {
    order: KillOrder,
    requests: Vec<KillRequest>,
    phase: Phase,
    pending: Vec<ComponentId>,
    unanswered: Vec<ComponentId>,
    deadline: i64,
    /// It ended on its own while waiting for its children: no `Stop` needed.
    gone: bool,
}

impl Tree {
    /// Starts killing `target` for `request`, or joins a kill already under way.
    ///
    /// Fails when the order has expired, the component is unknown, or it runs on another node.
    pub fn kill(
        &mut self,
        target: ComponentId,
        request: KillRequest,
        limits: KillLimits,
        now: i64,
        out: &mut Vec<KillAction>,
    ) -> Result<(), KillError> {
        let expires_at = request.order.expires_at;
        if expiry::is_expired(expires_at, now) {
            return Err(KillError::Expired { expires_at, now });
        }
        let c = self.get(target).ok_or(KillError::Unknown(target))?;
        if !self.is_local(c) {
            return Err(KillError::Remote { id: target, node: c.node.clone() });
        }
        if !self.is_killing(target) {
            self.start(target, &request.order, limits, now, out);
        }
        if let Some(state) = self.entries.get_mut(&target).and_then(|e| e.kill.as_mut()) {
            state.requests.push(request);
        }
        Ok(())
    }

    /// The component `id` no longer runs: it confirmed a `Stop`, its report arrived from another
    /// node, or it exited or disconnected on its own. Returns false when `id` is unknown (for
    /// example a duplicate report).
    pub fn finished(&mut self, id: ComponentId, now: i64, limits: KillLimits, out: &mut Vec<KillAction>) -> bool {
        let Some(entry) = self.entries.get_mut(&id) else { return false };
        entry.component.is_running = false;
        let parent = entry.component.pid;
        match entry.kill.as_mut() {
            Some(state) if state.phase == Phase::Children => state.gone = true,
            Some(_) => self.finish(id, true, now, limits, out),
            None => {
                self.detach(id);
                self.child_done(parent, id, now, limits, out);
            }
        }
        true
    }

    /// Time passes: kills whose deadline is due stop waiting (deepest first, so children stop
    /// before their parents).
    pub fn tick(&mut self, now: i64, limits: KillLimits, out: &mut Vec<KillAction>) {
        let mut due: Vec<(usize, ComponentId)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.kill.as_ref().is_some_and(|k| k.deadline <= now))
            .map(|(id, _)| (self.depth(*id), *id))
            .collect();
        due.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for (_, id) in due {
            let Some(state) = self.entries.get_mut(&id).and_then(|e| e.kill.as_mut()) else { continue };
            if state.deadline > now {
                continue;
            }
            match state.phase {
                Phase::Children => {
                    let pending = std::mem::take(&mut state.pending);
                    state.unanswered.extend(pending);
                    self.enter_stopping(id, now, limits, out);
                }
                Phase::Stopping => self.finish(id, false, now, limits, out),
            }
        }
    }

    /// When [`Tree::tick`] must next be called, if a kill is in progress.
    pub fn next_deadline(&self) -> Option<i64> {
        self.entries.values().filter_map(|e| e.kill.as_ref().map(|k| k.deadline)).min()
    }

    /// Number of components being killed.
    pub fn killing(&self) -> usize {
        self.entries.values().filter(|e| e.kill.is_some()).count()
    }

    /// Starts the cascade at `root`: every local component below it enters the children phase
    /// (pre-order, newest child first), remote children get `SendKill`, and those with nothing to
    /// wait for are stopped (deepest first).
    fn start(&mut self, root: ComponentId, order: &KillOrder, limits: KillLimits, now: i64, out: &mut Vec<KillAction>) {
        let mut deadline = expiry::deadline(order.expires_at, now, limits.child_wait_ms);
        if order.expires_at != 0 {
            // Keep half of the time left for stopping and answering before the asker gives up.
            deadline = deadline.min(now.saturating_add(order.expires_at.saturating_sub(now) / 2));
        }
        let mut stack = vec![root];
        let mut started = Vec::new();
        while let Some(x) = stack.pop() {
            let mut pending = Vec::new();
            let mut local = Vec::new();
            for &child in self.children(x).iter().rev() {
                let Some(e) = self.entries.get(&child) else { continue };
                pending.push(child);
                if e.kill.is_some() {
                    continue; // already dying: it will report to x
                }
                if self.is_local(&e.component) {
                    local.push(child);
                } else {
                    out.push(KillAction::SendKill {
                        target: child,
                        node: e.component.node.clone(),
                        parent: x,
                        order: order.clone(),
                    });
                }
            }
            // Pushed newest first, so the oldest is popped first: the reverse of this pre-order is
            // then a post-order that visits the newest child's subtree first.
            stack.extend(local);
            if let Some(e) = self.entries.get_mut(&x) {
                e.kill = Some(KillState {
                    order: order.clone(),
                    requests: Vec::new(),
                    phase: Phase::Children,
                    pending,
                    unanswered: Vec::new(),
                    deadline,
                    gone: false,
                });
                started.push(x);
            }
        }
        for x in started.into_iter().rev() {
            let idle = self.entries.get(&x).and_then(|e| e.kill.as_ref()).is_some_and(|k| k.pending.is_empty());
            if idle {
                self.enter_stopping(x, now, limits, out);
            }
        }
    }

    /// Children are done (or given up on): stop the component, or finish at once if it is
    /// already gone.
    fn enter_stopping(&mut self, id: ComponentId, now: i64, limits: KillLimits, out: &mut Vec<KillAction>) {
        let Some(e) = self.entries.get_mut(&id) else { return };
        let Some(state) = e.kill.as_mut() else { return };
        if state.gone {
            self.finish(id, true, now, limits, out);
            return;
        }
        state.phase = Phase::Stopping;
        state.deadline = now.saturating_add(limits.stop_grace_ms.max(0));
        out.push(KillAction::Stop { id, kind: e.component.kind, forced: !state.unanswered.is_empty() });
    }

    /// The component is stopped (or given up on): report to the parent, answer the requesters,
    /// leave the tree, and let the parent move on.
    fn finish(&mut self, id: ComponentId, stopped: bool, now: i64, limits: KillLimits, out: &mut Vec<KillAction>) {
        let parent_node = self.parent_node(id);
        let Some(e) = self.entries.get_mut(&id) else { return };
        let Some(state) = e.kill.take() else { return };
        let component = e.component.clone();
        // Children on other nodes that never answered are forgotten with their parent; local
        // children still stopping stay until they finish.
        let remote: Vec<ComponentId> =
            self.children(id).iter().copied().filter(|c| self.get(*c).is_some_and(|c| !self.is_local(c))).collect();
        for r in remote {
            self.detach(r);
        }
        self.detach(id);
        let mut unanswered = state.unanswered;
        unanswered.sort();
        out.push(KillAction::ReportToParent(KillReport {
            component: id,
            kind: component.kind,
            name: component.name.clone(),
            parent: component.pid,
            parent_node,
            order: state.order,
            stopped,
            unanswered: unanswered.clone(),
        }));
        for request in state.requests {
            out.push(KillAction::Done(KillDone { request, component: id, stopped, unanswered: unanswered.clone() }));
        }
        self.child_done(component.pid, id, now, limits, out);
    }

    /// `child` of `parent` is gone: if the parent was waiting for it and it was the last, the
    /// parent moves on to stopping.
    fn child_done(
        &mut self,
        parent: Option<ComponentId>,
        child: ComponentId,
        now: i64,
        limits: KillLimits,
        out: &mut Vec<KillAction>,
    ) {
        let Some(pid) = parent else { return };
        let Some(state) = self.entries.get_mut(&pid).and_then(|e| e.kill.as_mut()) else { return };
        let before = state.pending.len();
        state.pending.retain(|c| *c != child);
        if state.phase == Phase::Children && before > 0 && state.pending.is_empty() {
            self.enter_stopping(pid, now, limits, out);
        }
    }

    fn depth(&self, id: ComponentId) -> usize {
        let mut depth = 0;
        let mut at = self.get(id).and_then(|c| c.pid);
        while let Some(p) = at {
            depth += 1;
            at = self.get(p).and_then(|c| c.pid);
        }
        depth
    }
}
