//! The scheduler core: which tasks to take from the store, when, and what becomes of each
//! attempt. Pure: inputs are `handle_*` calls and [`Scheduler::tick`] with `now`; outputs are
//! polled ([`Scheduler::poll_output`]); [`Scheduler::next_deadline`] says when to tick. The
//! driver ([`crate::executor`]) does the store calls and runs attempts on the engine.
//!
//! Driving contract: after any input, drain `poll_output` and carry every [`Output`] out; answer
//! each [`Output::Claim`] with exactly one [`Scheduler::handle_claimed`], and each
//! [`Output::Dispatch`] with one [`Scheduler::handle_end`] (unless it was cancelled first); call
//! `tick` at `next_deadline`.
//!
//! Invariants:
//! - Per app, claims reserved plus attempts running never exceed the app's limit, so the
//!   engine's queue is never asked to hold more than it may; the rest waits in the store.
//!   When the engine still refuses a call (its queue is full: other callers use the app too),
//!   the app's window shrinks to what the engine accepted and grows back by one per attempt
//!   that ran (additive increase, multiplicative decrease).
//! - Every attempt ends in exactly one [`Output::Record`]: its result, its error, a retry, a
//!   release (it never ran), or a timeout. An abort ends it with no record (the store command
//!   already finished the task).
//! - An attempt that outlives its task's timeout is cancelled and recorded `TimedOut`; a late
//!   answer from it is ignored here and fenced off by its lease in the store.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use nodus_wire::Backoff;

use crate::store::{Claim, Finish, Outcome};
use crate::task::{Claimed, ErrorKind, Json, Lease, TaskError, TaskId, UnixMs};

/// Scheduling policy and intervals.
#[derive(Debug, Clone)]
pub struct SchedConfig {
    /// This node's name: the owner recorded with every lease.
    pub owner: String,
    /// How long past its timeout a lease lasts (then another owner may take the task).
    pub lease_grace: Duration,
    /// Most tasks taken from the store in one claim.
    pub claim_batch: usize,
    /// Retry delay after a worker failure: from `retry_min`, doubling, up to `retry_max`.
    pub retry_min: Duration,
    /// See `retry_min`.
    pub retry_max: Duration,
    /// An app that could not take a task (queue full, stopped, failed) is left alone for a
    /// delay from `pause_min`, doubling, up to `pause_max`.
    pub pause_min: Duration,
    /// See `pause_min`.
    pub pause_max: Duration,
    /// How often every app is checked for due tasks even without news (tasks submitted
    /// elsewhere, retries due, tasks waiting from before a restart).
    pub poll_interval: Duration,
    /// How often expired leases are returned to pending.
    pub reap_interval: Duration,
    /// How often expired results are purged, and how many at most each time.
    pub purge_interval: Duration,
    /// See `purge_interval`.
    pub purge_batch: usize,
    /// How often pending tasks whose deadline passed are looked for even when this node knows
    /// of none (tasks submitted elsewhere, or before a restart). Deadlines of the tasks
    /// submitted here are kept (up to [`MAX_KNOWN_DEADLINES`]) and met to the millisecond.
    pub expire_interval: Duration,
    /// Most tasks finished as expired by one store operation.
    pub expire_batch: usize,
}

/// Most deadlines of submitted tasks the scheduler keeps to expire them on time; beyond, the
/// periodic sweep (`expire_interval`) finds them.
pub const MAX_KNOWN_DEADLINES: usize = 65_536;

impl SchedConfig {
    /// Defaults for a node named `owner`.
    pub fn new(owner: impl Into<String>) -> SchedConfig {
        SchedConfig {
            owner: owner.into(),
            lease_grace: Duration::from_secs(30),
            claim_batch: 1024,
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(30),
            pause_min: Duration::from_millis(5),
            pause_max: Duration::from_secs(2),
            poll_interval: Duration::from_secs(1),
            reap_interval: Duration::from_secs(5),
            purge_interval: Duration::from_secs(10),
            purge_batch: 10_000,
            expire_interval: Duration::from_secs(1),
            expire_batch: 10_000,
        }
    }
}

/// How an attempt on the engine ended, as the driver saw it.
#[derive(Debug, Clone)]
pub enum AttemptEnd {
    /// The procedure returned this result.
    Returned(Json),
    /// The procedure ran and failed with this message (arpcp 400; not retried).
    Failed(String),
    /// The worker process failed (crash, hang, disconnect): retried while attempts remain.
    WorkerFailed(String),
    /// The attempt never ran: the app's queue was full, the app is stopped, failed or gone.
    NotRun(String),
}

/// Which attempt a record ends (for status changes: the store's answer does not say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempted {
    /// The task's procedure.
    pub procedure: Arc<str>,
    /// The attempt's number.
    pub attempt: u32,
    /// When its task was submitted (`UnixMs(0)` when not known): the task's latency is from
    /// here to its record.
    pub created_at: UnixMs,
}

/// What the driver must do.
#[derive(Debug, Clone)]
pub enum Output {
    /// Claim tasks from the store; answer with [`Scheduler::handle_claimed`].
    Claim(Claim),
    /// Run an attempt on the engine; answer with [`Scheduler::handle_end`].
    Dispatch(Claimed),
    /// Cancel a running attempt's worker session (its task timed out or was aborted).
    Cancel(TaskId, Lease),
    /// Record an attempt's end in the store.
    Record(Finish, Attempted),
    /// Return tasks whose lease ran out to pending ([`crate::store::Store::reap`]).
    Reap(UnixMs),
    /// Purge up to this many results expired at this time.
    Purge(UnixMs, usize),
    /// Finish up to this many pending tasks whose deadline is at or before this time
    /// ([`crate::store::Store::expire`]); when the store finished that many, answer with
    /// [`Scheduler::handle_expire_full`].
    Expire(UnixMs, usize),
}

struct AppState {
    /// Most claims reserved plus attempts running.
    limit: usize,
    /// What the engine is taking now: `limit`, less after refusals (never above `limit`).
    window: usize,
    /// Claims reserved plus attempts running.
    inflight: usize,
    /// A claim is outstanding.
    claiming: bool,
    /// The store may hold due tasks for this app.
    has_work: bool,
    /// Earliest time a delayed task (a retry) becomes due.
    wake_at: Option<UnixMs>,
    /// Left alone until then.
    paused_until: Option<UnixMs>,
    pause: Backoff,
}

struct Attempt {
    app: String,
    procedure: Arc<str>,
    lease: Lease,
    deadline: UnixMs,
    attempt: u32,
    max_attempts: u32,
    created_at: UnixMs,
}

/// The scheduler of one node's executor.
pub struct Scheduler {
    config: SchedConfig,
    seed: u64,
    apps: HashMap<String, AppState>,
    running: HashMap<TaskId, Attempt>,
    deadlines: BTreeSet<(UnixMs, Lease, TaskId)>,
    outputs: VecDeque<Output>,
    next_poll: UnixMs,
    next_reap: UnixMs,
    next_purge: UnixMs,
    next_expire: UnixMs,
    /// Deadlines of pending tasks this node submitted, earliest first (bounded).
    known_deadlines: BinaryHeap<Reverse<UnixMs>>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").field("apps", &self.apps.len()).field("running", &self.running.len()).finish()
    }
}

fn mix(seed: u64, s: &str) -> u64 {
    s.bytes().fold(seed ^ 0x9e37_79b9_7f4a_7c15, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

impl Scheduler {
    /// A scheduler with no apps; `seed` makes backoff jitter reproducible.
    pub fn new(config: SchedConfig, seed: u64, now: UnixMs) -> Scheduler {
        Scheduler {
            next_poll: now.plus(config.poll_interval),
            next_reap: now.plus(config.reap_interval),
            next_purge: now.plus(config.purge_interval),
            next_expire: now.plus(config.expire_interval),
            known_deadlines: BinaryHeap::new(),
            config,
            seed,
            apps: HashMap::new(),
            running: HashMap::new(),
            deadlines: BTreeSet::new(),
            outputs: VecDeque::new(),
        }
    }

    /// An app can run tasks now, with at most `limit` of them claimed or running at once. Its
    /// pending tasks are looked for at once.
    pub fn set_app(&mut self, app: &str, limit: usize, now: UnixMs) {
        let seed = mix(self.seed, app);
        let (min, max) = (self.config.pause_min, self.config.pause_max);
        let state = self.apps.entry(app.to_string()).or_insert_with(|| AppState {
            limit,
            window: limit,
            inflight: 0,
            claiming: false,
            has_work: true,
            wake_at: None,
            paused_until: None,
            pause: Backoff::new(min, max, seed),
        });
        state.limit = limit.max(1);
        state.window = state.limit;
        state.has_work = true;
        state.paused_until = None;
        self.plan(now);
    }

    /// An app can no longer run tasks (stopped or removed): nothing more is claimed for it.
    /// Its running attempts end as the engine reports them.
    pub fn remove_app(&mut self, app: &str) {
        if let Some(state) = self.apps.get(app) {
            if state.inflight == 0 && !state.claiming {
                self.apps.remove(app);
            } else if let Some(s) = self.apps.get_mut(app) {
                s.limit = 0;
            }
        }
    }

    /// New tasks of `app` were stored.
    pub fn handle_submitted(&mut self, app: &str, now: UnixMs) {
        if let Some(s) = self.apps.get_mut(app) {
            s.has_work = true;
        }
        self.plan(now);
    }

    /// The store answered a claim of `asked` tasks for `app` (`Err`: the store failed).
    pub fn handle_claimed(&mut self, app: &str, asked: usize, claimed: Result<Vec<Claimed>, ()>, now: UnixMs) {
        let Some(state) = self.apps.get_mut(app) else {
            // Forgotten meanwhile: give the tasks back.
            for c in claimed.unwrap_or_default() {
                self.outputs.push_back(release(&c, now));
            }
            return;
        };
        state.claiming = false;
        match claimed {
            Err(()) => {
                state.inflight = state.inflight.saturating_sub(asked);
                let delay = state.pause.next_delay();
                state.paused_until = Some(now.plus(delay));
            }
            Ok(tasks) => {
                state.inflight = state.inflight.saturating_sub(asked - tasks.len().min(asked));
                if tasks.len() < asked {
                    state.has_work = false;
                }
                let open = state.limit > 0;
                for c in tasks {
                    if !open {
                        state.inflight = state.inflight.saturating_sub(1);
                        self.outputs.push_back(release(&c, now));
                        continue;
                    }
                    let deadline = now.plus(c.timeout);
                    self.deadlines.insert((deadline, c.lease, c.id.clone()));
                    self.running.insert(
                        c.id.clone(),
                        Attempt {
                            app: app.to_string(),
                            procedure: Arc::from(c.procedure.as_str()),
                            lease: c.lease,
                            deadline,
                            attempt: c.attempt,
                            max_attempts: c.max_attempts,
                            created_at: c.created_at,
                        },
                    );
                    self.outputs.push_back(Output::Dispatch(c));
                }
            }
        }
        self.gc_app(app);
        self.plan(now);
    }

    /// An attempt ended on the engine. Ignored when the attempt is no longer running here
    /// (timed out or aborted first).
    pub fn handle_end(&mut self, id: &TaskId, lease: Lease, end: AttemptEnd, now: UnixMs) {
        if !matches!(self.running.get(id), Some(a) if a.lease == lease) {
            return;
        }
        let a = self.take(id).expect("checked above");
        let outcome = match end {
            AttemptEnd::Returned(result) => Outcome::Done(result),
            AttemptEnd::Failed(message) => Outcome::Failed(TaskError::new(ErrorKind::RunningError, message)),
            AttemptEnd::WorkerFailed(message) if a.attempt < a.max_attempts => {
                let mut b = Backoff::new(self.config.retry_min, self.config.retry_max, mix(self.seed, id.as_str()));
                let mut delay = b.next_delay();
                for _ in 1..a.attempt {
                    delay = b.next_delay();
                }
                let run_after = now.plus(delay);
                if let Some(s) = self.apps.get_mut(&a.app) {
                    s.wake_at = Some(s.wake_at.map_or(run_after, |w| w.min(run_after)));
                }
                Outcome::Retry { run_after, error: TaskError::new(ErrorKind::WorkerFailed, message) }
            }
            AttemptEnd::WorkerFailed(message) => Outcome::Failed(TaskError::new(
                ErrorKind::WorkerFailed,
                format!("the worker failed in all {} attempts; last: {message}", a.max_attempts),
            )),
            AttemptEnd::NotRun(reason) => {
                if let Some(s) = self.apps.get_mut(&a.app) {
                    // The engine holds what is still in flight: that is the window for now.
                    s.window = s.inflight.clamp(1, s.limit.max(1));
                    s.has_work = true;
                    // One pause per wave of refusals, longer only if refusals go on after it.
                    if s.paused_until.is_none() {
                        s.paused_until = Some(now.plus(s.pause.next_delay()));
                    }
                }
                tracing::debug!(task = %id, app = %a.app, %reason, "attempt did not run; the task waits in the store");
                Outcome::Release { run_after: now }
            }
        };
        if !matches!(outcome, Outcome::Release { .. }) {
            if let Some(s) = self.apps.get_mut(&a.app) {
                s.pause.reset();
                s.window = (s.window + 1).min(s.limit);
            }
        }
        let meta = Attempted { procedure: a.procedure.clone(), attempt: a.attempt, created_at: a.created_at };
        self.outputs.push_back(Output::Record(Finish { id: id.clone(), lease, outcome, now }, meta));
        self.gc_app(&a.app);
        self.plan(now);
    }

    /// A task was aborted (its store record already finished): a running attempt here is
    /// cancelled. Returns whether one was.
    pub fn handle_abort(&mut self, id: &TaskId, now: UnixMs) -> bool {
        let Some(a) = self.take(id) else { return false };
        self.outputs.push_back(Output::Cancel(id.clone(), a.lease));
        self.gc_app(&a.app);
        self.plan(now);
        true
    }

    /// Tasks with these deadlines were submitted: at each deadline the store is asked to finish
    /// the expired ones ([`Output::Expire`]), so their waiters hear at once. Beyond
    /// [`MAX_KNOWN_DEADLINES`] the periodic sweep finds them.
    pub fn handle_deadlines(&mut self, deadlines: impl IntoIterator<Item = UnixMs>) {
        for d in deadlines {
            if self.known_deadlines.len() >= MAX_KNOWN_DEADLINES {
                break;
            }
            self.known_deadlines.push(Reverse(d));
        }
    }

    /// The store finished as many expired tasks as it was asked to: there may be more, so the
    /// next tick asks again.
    pub fn handle_expire_full(&mut self, now: UnixMs) {
        self.next_expire = now;
    }

    /// Time passed: timeouts, retries coming due, paused apps, periodic polls and chores.
    pub fn tick(&mut self, now: UnixMs) {
        while let Some((deadline, lease, id)) = self.deadlines.first().cloned() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            let Some(a) = self.running.get(&id).filter(|a| a.lease == lease) else { continue };
            let app = a.app.clone();
            let meta = Attempted { procedure: a.procedure.clone(), attempt: a.attempt, created_at: a.created_at };
            self.take(&id);
            let error = TaskError::new(
                ErrorKind::TimedOut,
                "the task ran longer than its timeout; its worker session was cancelled",
            );
            self.outputs.push_back(Output::Cancel(id.clone(), lease));
            self.outputs.push_back(Output::Record(Finish { id, lease, outcome: Outcome::Failed(error), now }, meta));
            self.gc_app(&app);
        }
        let poll = now >= self.next_poll;
        if poll {
            self.next_poll = now.plus(self.config.poll_interval);
        }
        for s in self.apps.values_mut() {
            if poll || s.wake_at.is_some_and(|w| w <= now) {
                s.has_work = true;
                s.wake_at = s.wake_at.filter(|w| *w > now);
            }
            if s.paused_until.is_some_and(|p| p <= now) {
                s.paused_until = None;
            }
        }
        if now >= self.next_reap {
            self.next_reap = now.plus(self.config.reap_interval);
            self.outputs.push_back(Output::Reap(now));
        }
        if now >= self.next_purge {
            self.next_purge = now.plus(self.config.purge_interval);
            self.outputs.push_back(Output::Purge(now, self.config.purge_batch));
        }
        let mut due = false;
        while self.known_deadlines.peek().is_some_and(|Reverse(d)| *d <= now) {
            self.known_deadlines.pop();
            due = true;
        }
        if due || now >= self.next_expire {
            self.next_expire = now.plus(self.config.expire_interval);
            self.outputs.push_back(Output::Expire(now, self.config.expire_batch));
        }
        self.plan(now);
    }

    /// The next thing to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When [`Scheduler::tick`] must be called next.
    pub fn next_deadline(&self) -> Option<UnixMs> {
        let mut next = [self.next_poll, self.next_reap, self.next_purge, self.next_expire].into_iter().min();
        if let Some(Reverse(d)) = self.known_deadlines.peek() {
            next = next.map(|n| n.min(*d));
        }
        if let Some((d, _, _)) = self.deadlines.first() {
            next = next.map(|n| n.min(*d));
        }
        for s in self.apps.values() {
            for t in [s.wake_at, s.paused_until].into_iter().flatten() {
                next = next.map(|n| n.min(t));
            }
        }
        next
    }

    /// Attempts running on this node.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Claims reserved plus attempts running for `app`.
    pub fn inflight(&self, app: &str) -> usize {
        self.apps.get(app).map_or(0, |s| s.inflight)
    }

    /// Whether `id` has an attempt running here, and its lease.
    pub fn lease_of(&self, id: &TaskId) -> Option<Lease> {
        self.running.get(id).map(|a| a.lease)
    }

    fn take(&mut self, id: &TaskId) -> Option<Attempt> {
        let a = self.running.remove(id)?;
        self.deadlines.remove(&(a.deadline, a.lease, id.clone()));
        if let Some(s) = self.apps.get_mut(&a.app) {
            s.inflight = s.inflight.saturating_sub(1);
        }
        Some(a)
    }

    /// Forgets a removed app once nothing of it is in flight.
    fn gc_app(&mut self, app: &str) {
        if self.apps.get(app).is_some_and(|s| s.limit == 0 && s.inflight == 0 && !s.claiming) {
            self.apps.remove(app);
        }
    }

    /// Claims for every app that has work and room.
    fn plan(&mut self, now: UnixMs) {
        let mut names: Vec<&String> = self.apps.keys().collect();
        names.sort();
        let mut claims = Vec::new();
        for name in names {
            let s = &self.apps[name];
            if !s.has_work || s.claiming || s.limit == 0 || s.paused_until.is_some() {
                continue;
            }
            let free = s.window.min(s.limit).saturating_sub(s.inflight);
            // Busy apps claim in batches rather than one task per completion.
            let low_water = (s.window / 4).clamp(1, self.config.claim_batch);
            if free == 0 || (s.inflight > 0 && free < low_water) {
                continue;
            }
            claims.push((name.clone(), free.min(self.config.claim_batch)));
        }
        for (app, max) in claims {
            let s = self.apps.get_mut(&app).expect("listed above");
            s.claiming = true;
            s.inflight += max;
            self.outputs.push_back(Output::Claim(Claim {
                app,
                owner: self.config.owner.clone(),
                max,
                now,
                lease_grace: self.config.lease_grace,
            }));
        }
    }
}

fn release(c: &Claimed, now: UnixMs) -> Output {
    let meta = Attempted { procedure: Arc::from(c.procedure.as_str()), attempt: c.attempt, created_at: c.created_at };
    Output::Record(Finish { id: c.id.clone(), lease: c.lease, outcome: Outcome::Release { run_after: now }, now }, meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::json;

    const T0: UnixMs = UnixMs(1_000_000);

    fn at(ms: u64) -> UnixMs {
        UnixMs(T0.0 + ms)
    }

    fn config() -> SchedConfig {
        SchedConfig { claim_batch: 8, ..SchedConfig::new("n1") }
    }

    fn claimed(n: u64, app: &str, attempt: u32, timeout_ms: u64) -> Claimed {
        Claimed {
            id: TaskId(format!("t{n}").into()),
            procedure: format!("{app}.work"),
            app: app.into(),
            args: json("[]").unwrap(),
            attempt,
            max_attempts: 3,
            timeout: Duration::from_millis(timeout_ms),
            lease: Lease(n * 10 + u64::from(attempt)),
            created_at: T0,
            parent: None,
            deadline: None,
        }
    }

    fn drain(s: &mut Scheduler) -> Vec<Output> {
        std::iter::from_fn(|| s.poll_output()).collect()
    }

    fn claims(out: &[Output]) -> Vec<(String, usize)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Claim(c) => Some((c.app.clone(), c.max)),
                _ => None,
            })
            .collect()
    }

    fn records(out: &[Output]) -> Vec<(String, Outcome)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Record(f, _) => Some((f.id.to_string(), f.outcome.clone())),
                _ => None,
            })
            .collect()
    }

    fn expiries(out: &[Output]) -> Vec<UnixMs> {
        out.iter()
            .filter_map(|o| match o {
                Output::Expire(now, _) => Some(*now),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn known_deadlines_are_met_to_the_millisecond_and_the_sweep_runs_anyway() {
        let mut c = config();
        c.expire_interval = Duration::from_millis(1_000);
        let mut s = Scheduler::new(c, 7, T0);
        s.handle_deadlines([at(300), at(120), at(120)]);
        assert_eq!(s.next_deadline(), Some(at(120)), "the earliest deadline wakes the driver");
        s.tick(at(119));
        assert!(expiries(&drain(&mut s)).is_empty());
        s.tick(at(120));
        assert_eq!(expiries(&drain(&mut s)), vec![at(120)], "one sweep for every deadline due");
        assert_eq!(s.next_deadline(), Some(at(300)));
        s.tick(at(300));
        assert_eq!(expiries(&drain(&mut s)), vec![at(300)]);
        // No known deadline left: the periodic sweep (tasks submitted elsewhere) still runs.
        assert_eq!(s.next_deadline(), Some(at(1_000)));
        s.tick(at(999));
        assert!(expiries(&drain(&mut s)).is_empty());
        s.tick(at(1_300));
        assert_eq!(expiries(&drain(&mut s)), vec![at(1_300)]);
        // A sweep that hit its batch bound asks again at the next tick.
        s.handle_expire_full(at(1_301));
        assert_eq!(s.next_deadline(), Some(at(1_301)));
        s.tick(at(1_301));
        assert_eq!(expiries(&drain(&mut s)), vec![at(1_301)]);
        // The kept deadlines are bounded.
        s.handle_deadlines((0..MAX_KNOWN_DEADLINES as u64 + 10).map(|n| at(5_000 + n)));
        assert_eq!(s.known_deadlines.len(), MAX_KNOWN_DEADLINES);
    }

    /// A scheduler with app `a` (limit 4) whose first claim is answered with tasks `ids`.
    fn started(ids: &[u64], timeout_ms: u64) -> Scheduler {
        let mut s = Scheduler::new(config(), 7, T0);
        s.set_app("a", 4, T0);
        let out = drain(&mut s);
        assert_eq!(claims(&out), vec![("a".to_string(), 4)]);
        let tasks = ids.iter().map(|&n| claimed(n, "a", 1, timeout_ms)).collect();
        s.handle_claimed("a", 4, Ok(tasks), T0);
        s
    }

    #[test]
    fn claims_stay_within_the_limit_and_wait_for_news() {
        let mut s = started(&[1, 2, 3, 4], 10_000);
        let out = drain(&mut s);
        assert_eq!(out.iter().filter(|o| matches!(o, Output::Dispatch(_))).count(), 4);
        assert!(claims(&out).is_empty(), "full: nothing more is claimed");
        assert_eq!(s.inflight("a"), 4);
        s.handle_end(&TaskId("t1".into()), Lease(11), AttemptEnd::Returned(json("3").unwrap()), at(5));
        let out = drain(&mut s);
        assert!(matches!(&records(&out)[..], [(id, Outcome::Done(r))] if id == "t1" && r.get() == "3"));
        assert_eq!(claims(&out), vec![("a".to_string(), 1)], "a freed slot is refilled");
        s.handle_claimed("a", 1, Ok(vec![]), at(5));
        assert_eq!(s.inflight("a"), 3);
        assert!(claims(&drain(&mut s)).is_empty(), "the store had nothing: wait for news");
        s.handle_submitted("a", at(6));
        assert_eq!(claims(&drain(&mut s)), vec![("a".to_string(), 1)]);
    }

    #[test]
    fn busy_apps_claim_in_batches() {
        let mut s = Scheduler::new(config(), 7, T0);
        s.set_app("b", 40, T0);
        let mut next = 1;
        // Claims of 8 (the batch) until all 40 slots are taken.
        for _ in 0..5 {
            assert_eq!(claims(&drain(&mut s)), vec![("b".to_string(), 8)]);
            let tasks: Vec<Claimed> = (next..next + 8).map(|n| claimed(n, "b", 1, 10_000)).collect();
            next += 8;
            s.handle_claimed("b", 8, Ok(tasks), T0);
        }
        assert!(claims(&drain(&mut s)).is_empty(), "full");
        assert_eq!(s.inflight("b"), 40);
        // One completion at a time does not cost one claim each: the low-water mark is 8.
        for n in 1..=7 {
            let lease = Lease(n * 10 + 1);
            s.handle_end(&TaskId(format!("t{n}").into()), lease, AttemptEnd::Returned(json("1").unwrap()), at(1));
            assert!(claims(&drain(&mut s)).is_empty(), "{n} free");
        }
        s.handle_end(&TaskId("t8".into()), Lease(81), AttemptEnd::Returned(json("1").unwrap()), at(1));
        assert_eq!(claims(&drain(&mut s)), vec![("b".to_string(), 8)], "8 free: one batch");
    }

    #[test]
    fn timeouts_cancel_and_record_and_late_answers_are_ignored() {
        let mut s = started(&[1], 500);
        let _ = drain(&mut s);
        assert_eq!(s.next_deadline(), Some(at(500)));
        s.tick(at(499));
        assert!(records(&drain(&mut s)).is_empty());
        s.tick(at(500));
        let out = drain(&mut s);
        assert!(out.iter().any(|o| matches!(o, Output::Cancel(id, Lease(11)) if id.as_str() == "t1")));
        assert!(matches!(&records(&out)[..], [(_, Outcome::Failed(e))] if e.kind == ErrorKind::TimedOut));
        assert_eq!(s.running(), 0);
        s.handle_end(&TaskId("t1".into()), Lease(11), AttemptEnd::Returned(json("1").unwrap()), at(600));
        assert!(records(&drain(&mut s)).is_empty(), "a late answer records nothing");
    }

    #[test]
    fn worker_failures_retry_with_backoff_until_attempts_run_out() {
        let mut s = started(&[1], 10_000);
        let _ = drain(&mut s);
        s.handle_end(&TaskId("t1".into()), Lease(11), AttemptEnd::WorkerFailed("exit 3".into()), at(10));
        let out = drain(&mut s);
        let run_after = match &records(&out)[..] {
            [(_, Outcome::Retry { run_after, error })] if error.kind == ErrorKind::WorkerFailed => *run_after,
            other => panic!("{other:?}"),
        };
        let delay = run_after.since(at(10));
        assert!(delay >= Duration::from_millis(50) && delay <= Duration::from_millis(100), "{delay:?}");
        assert!(claims(&out).is_empty(), "the store had no more tasks of the app");
        // The app is woken when the retry is due, even with nothing else new.
        assert!(s.next_deadline().unwrap() <= run_after);
        s.tick(run_after);
        assert_eq!(claims(&drain(&mut s)), vec![("a".to_string(), 4)]);
        s.handle_claimed("a", 4, Ok(vec![claimed(1, "a", 2, 10_000)]), run_after);
        let _ = drain(&mut s);
        s.handle_end(&TaskId("t1".into()), Lease(12), AttemptEnd::WorkerFailed("exit 3".into()), run_after);
        let out = drain(&mut s);
        let due = match &records(&out)[..] {
            [(_, Outcome::Retry { run_after: r, .. })] => *r,
            other => panic!("{other:?}"),
        };
        let second = due.since(run_after);
        assert!(second >= Duration::from_millis(100) && second <= Duration::from_millis(200), "{second:?}");
        s.tick(due);
        assert_eq!(claims(&drain(&mut s)), vec![("a".to_string(), 4)]);
        s.handle_claimed("a", 4, Ok(vec![claimed(1, "a", 3, 10_000)]), at(5_000));
        let _ = drain(&mut s);
        s.handle_end(&TaskId("t1".into()), Lease(13), AttemptEnd::WorkerFailed("exit 3".into()), at(5_001));
        let out = drain(&mut s);
        match &records(&out)[..] {
            [(_, Outcome::Failed(e))] => {
                assert_eq!(e.kind, ErrorKind::WorkerFailed);
                assert!(e.message.contains("all 3 attempts") && e.message.contains("exit 3"), "{}", e.message);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn procedure_errors_are_final() {
        let mut s = started(&[1], 10_000);
        let _ = drain(&mut s);
        s.handle_end(&TaskId("t1".into()), Lease(11), AttemptEnd::Failed("division by zero".into()), at(1));
        let out = drain(&mut s);
        assert!(
            matches!(&records(&out)[..], [(_, Outcome::Failed(e))] if e.kind == ErrorKind::RunningError && e.message == "division by zero")
        );
    }

    #[test]
    fn a_full_queue_releases_the_task_and_pauses_the_app() {
        let mut s = started(&[1, 2], 10_000);
        let _ = drain(&mut s);
        s.handle_end(&TaskId("t1".into()), Lease(11), AttemptEnd::NotRun("queue full".into()), at(1));
        let out = drain(&mut s);
        assert!(matches!(&records(&out)[..], [(_, Outcome::Release { run_after })] if *run_after == at(1)));
        assert!(claims(&out).is_empty(), "paused");
        let until = s.next_deadline().unwrap();
        assert!(until > at(1) && until <= at(1).plus(Duration::from_millis(5)), "{until:?}");
        s.tick(until);
        assert!(claims(&drain(&mut s)).is_empty(), "the window is what the engine held (1), and 1 is running");
        s.handle_end(&TaskId("t2".into()), Lease(21), AttemptEnd::Returned(json("1").unwrap()), until);
        assert_eq!(claims(&drain(&mut s)), vec![("a".to_string(), 2)], "the window grows by one per attempt that ran");
    }

    #[test]
    fn aborts_cancel_without_a_record() {
        let mut s = started(&[1], 10_000);
        let _ = drain(&mut s);
        assert!(s.handle_abort(&TaskId("t1".into()), at(1)));
        let out = drain(&mut s);
        assert!(out.iter().any(|o| matches!(o, Output::Cancel(id, _) if id.as_str() == "t1")));
        assert!(records(&out).is_empty());
        assert!(!s.handle_abort(&TaskId("t1".into()), at(2)), "not running any more");
        s.handle_end(&TaskId("t1".into()), Lease(11), AttemptEnd::Returned(json("1").unwrap()), at(3));
        assert!(records(&drain(&mut s)).is_empty());
    }

    #[test]
    fn store_failures_pause_claims() {
        let mut s = Scheduler::new(config(), 7, T0);
        s.set_app("a", 4, T0);
        let _ = drain(&mut s);
        s.handle_claimed("a", 4, Err(()), T0);
        assert!(claims(&drain(&mut s)).is_empty());
        assert_eq!(s.inflight("a"), 0);
        let d = s.next_deadline().unwrap();
        s.tick(d);
        assert_eq!(claims(&drain(&mut s)), vec![("a".to_string(), 4)]);
    }

    #[test]
    fn removed_apps_claim_nothing_and_give_tasks_back() {
        let mut s = Scheduler::new(config(), 7, T0);
        s.set_app("a", 4, T0);
        let _ = drain(&mut s);
        s.remove_app("a");
        s.handle_claimed("a", 4, Ok(vec![claimed(1, "a", 1, 1000)]), T0);
        let out = drain(&mut s);
        assert!(matches!(&records(&out)[..], [(_, Outcome::Release { .. })]));
        assert!(claims(&out).is_empty());
        s.handle_submitted("a", at(1));
        s.tick(at(5_000));
        assert!(claims(&drain(&mut s)).is_empty());
        assert_eq!(s.inflight("a"), 0);
    }

    #[test]
    fn polls_reaps_and_purges_come_due() {
        let mut s = Scheduler::new(config(), 7, T0);
        s.set_app("a", 4, T0);
        let _ = drain(&mut s);
        s.handle_claimed("a", 4, Ok(vec![]), T0);
        let _ = drain(&mut s);
        assert_eq!(s.next_deadline(), Some(at(1_000)));
        s.tick(at(999));
        assert!(drain(&mut s).is_empty());
        s.tick(at(1_000));
        assert_eq!(claims(&drain(&mut s)), vec![("a".to_string(), 4)], "the periodic poll");
        s.handle_claimed("a", 4, Ok(vec![]), at(1_000));
        s.tick(at(5_000));
        let out = drain(&mut s);
        assert!(out.iter().any(|o| matches!(o, Output::Reap(t) if *t == at(5_000))));
        assert!(!out.iter().any(|o| matches!(o, Output::Purge(..))));
        s.tick(at(10_000));
        let out = drain(&mut s);
        assert!(out.iter().any(|o| matches!(o, Output::Purge(t, 10_000) if *t == at(10_000))));
    }
}
