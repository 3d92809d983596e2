//! engine::balance — one app's request queue and worker pool, as a state machine with no I/O
//! and no clock (`now` is an argument).
//!
//! Requests wait in a FIFO queue of at most `queue-limit`; beyond it they are refused with
//! [`Rejection::QueueFull`] (a caller may retry). Each queued request goes to the least loaded
//! ready worker that has fewer than `concurrency` sessions (lowest id among equals). When the
//! queue holds more requests than the workers being started can take, the pool grows, up to
//! `pool-limit` processes. A worker with no session for `idle-timeout` is retired. A failed worker
//! is replaced after a jittered exponential backoff, one probe at a time; `crash-limit` failures in
//! a row (each within [`BalanceConfig::crash_window`] of the previous) put the app in
//! [`AppStatus::Failed`]: queued requests are refused and no worker is started again until
//! [`Balancer::start`].
//!
//! An operator (Cocaine's `control` method, `nodus app scale`) may ask for a population: that
//! many workers (at most `pool-limit`) are kept running even with no requests, and idle workers
//! are retired only down to it.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::profile::Profile;
use nodus_wire::Backoff;

/// Identifies a worker within its app (never reused).
pub type WorkerId = u64;
/// Identifies a request within its app (chosen by the driver).
pub type RequestId = u64;

/// Restart policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalanceConfig {
    /// Backoff after the first failure.
    pub backoff_min: Duration,
    /// Longest backoff.
    pub backoff_max: Duration,
    /// A failure more than this long after the previous one starts a new streak.
    pub crash_window: Duration,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig {
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            crash_window: Duration::from_secs(60),
        }
    }
}

/// The app as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppStatus {
    /// Taking requests.
    Running,
    /// Workers kept failing; requests are refused until the app is started again.
    Failed {
        /// The last failure.
        reason: String,
    },
    /// Stopped by the operator.
    Stopped,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The queue is full; retry later or raise `queue-limit`.
    #[error("queue full ({limit} requests waiting); retry later or raise the app's queue-limit")]
    QueueFull {
        /// The app's queue-limit.
        limit: usize,
    },
    /// The app is in the failed state.
    #[error("app failed: {reason}; see its crashlog, fix it and start it again")]
    Failed {
        /// The last worker failure.
        reason: String,
    },
    /// The app is stopped.
    #[error("app is stopped; start it first")]
    Stopped,
    /// The request's `_expires_at` passed before a worker took it: it was dropped, never run.
    #[error("the request expired in the app's queue before a worker took it; it was not run (send it again with a later _expires_at)")]
    Expired,
    /// The app's task has more events waiting than it may queue (a burst faster than the
    /// engine takes them); nothing was queued. Retry shortly.
    #[error("the app is busy ({limit} events waiting for the engine); retry shortly")]
    Busy {
        /// The engine's `app_events` bound.
        limit: usize,
    },
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a worker process with this id.
    Spawn(WorkerId),
    /// Open the request's session on this worker.
    Assign {
        /// The request.
        request: RequestId,
        /// The worker.
        worker: WorkerId,
    },
    /// Ask this worker to terminate (idle, stopped app, failed app).
    Retire(WorkerId),
    /// Refuse a queued request.
    Reject {
        /// The request.
        request: RequestId,
        /// Why.
        error: Rejection,
    },
    /// The app's status changed.
    Status(AppStatus),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Starting,
    Ready,
    Draining,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    state: SlotState,
    load: usize,
    idle_since: Instant,
}

/// A snapshot of one worker for `info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerLoad {
    /// The worker.
    pub id: WorkerId,
    /// Whether it takes requests.
    pub ready: bool,
    /// Open sessions.
    pub load: usize,
}

/// One app's queue and pool.
#[derive(Debug)]
pub struct Balancer {
    pool_limit: usize,
    queue_limit: usize,
    concurrency: usize,
    idle_timeout: Option<Duration>,
    crash_limit: u32,
    config: BalanceConfig,
    workers: BTreeMap<WorkerId, Slot>,
    queue: VecDeque<RequestId>,
    next_worker: WorkerId,
    status: AppStatus,
    streak: u32,
    last_failure: Option<Instant>,
    backoff_until: Option<Instant>,
    /// Restart delays: one step per failure of the streak, reset with it.
    backoff: Backoff,
    actions: VecDeque<Action>,
    population: usize,
}

impl Balancer {
    /// A running balancer with no workers. `seed` drives the backoff jitter.
    pub fn new(profile: &Profile, config: BalanceConfig, seed: u64) -> Self {
        Balancer {
            pool_limit: profile.pool_limit,
            queue_limit: profile.queue_limit,
            concurrency: profile.concurrency,
            idle_timeout: profile.idle_timeout,
            crash_limit: profile.crash_limit,
            config,
            workers: BTreeMap::new(),
            queue: VecDeque::new(),
            next_worker: 1,
            status: AppStatus::Running,
            streak: 0,
            last_failure: None,
            backoff_until: None,
            backoff: Backoff::new(config.backoff_min, config.backoff_max, seed),
            actions: VecDeque::new(),
            population: 0,
        }
    }

    /// Applies new limits (a redeploy); takes effect at the next decision.
    pub fn set_profile(&mut self, profile: &Profile, now: Instant) {
        self.pool_limit = profile.pool_limit;
        self.queue_limit = profile.queue_limit;
        self.concurrency = profile.concurrency;
        self.idle_timeout = profile.idle_timeout;
        self.crash_limit = profile.crash_limit;
        self.dispatch(now);
    }

    /// The app's status.
    pub fn status(&self) -> &AppStatus {
        &self.status
    }

    /// Requests waiting for a worker.
    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    /// Worker processes alive (starting, ready or draining).
    pub fn pool_size(&self) -> usize {
        self.workers.len()
    }

    /// Every worker and its load, by id.
    pub fn loads(&self) -> Vec<WorkerLoad> {
        self.workers
            .iter()
            .map(|(&id, s)| WorkerLoad { id, ready: s.state == SlotState::Ready, load: s.load })
            .collect()
    }

    /// Workers to keep running with no requests (0: none), as asked by [`Balancer::set_population`].
    pub fn population(&self) -> usize {
        self.population
    }

    /// Keeps `n` workers running (capped at `pool-limit`) even when idle: missing ones start
    /// now, and idle ones are retired only down to `n`.
    pub fn set_population(&mut self, n: usize, now: Instant) {
        self.population = n;
        self.dispatch(now);
    }

    /// Workers that take or will take requests (starting or ready).
    fn live(&self) -> usize {
        self.workers.values().filter(|s| s.state != SlotState::Draining).count()
    }

    /// Whether fewer workers run than the population asked for.
    fn below_population(&self) -> bool {
        self.population > 0 && self.live() < self.population.min(self.pool_limit)
    }

    /// The next thing for the driver to do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Balancer::tick`] must next be called.
    pub fn next_deadline(&self) -> Option<Instant> {
        // Idle workers are retired only above the population, so only then is their idle
        // deadline one (a deadline that retires nothing would fire again at once).
        let idle = self.idle_timeout.filter(|_| self.live() > self.population).and_then(|t| {
            self.workers.values().filter(|s| s.state == SlotState::Ready && s.load == 0).map(|s| s.idle_since + t).min()
        });
        let backoff = self.backoff_until.filter(|_| !self.queue.is_empty() || self.below_population());
        match (idle, backoff) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A new request. On success it is assigned now or later (an [`Action::Assign`]), or
    /// rejected later if the app fails or stops while it waits.
    ///
    /// # Errors
    /// Refused at once when the app is not running or the queue is full.
    pub fn enqueue(&mut self, request: RequestId, now: Instant) -> Result<(), Rejection> {
        match &self.status {
            AppStatus::Running => {}
            AppStatus::Failed { reason } => return Err(Rejection::Failed { reason: reason.clone() }),
            AppStatus::Stopped => return Err(Rejection::Stopped),
        }
        if self.queue.is_empty() {
            if let Some(worker) = self.pick() {
                self.assign(request, worker);
                return Ok(());
            }
        }
        if self.queue.len() >= self.queue_limit {
            return Err(Rejection::QueueFull { limit: self.queue_limit });
        }
        self.queue.push_back(request);
        self.dispatch(now);
        Ok(())
    }

    /// A queued request was withdrawn by its caller. Returns whether it was still queued.
    pub fn cancel(&mut self, request: RequestId) -> bool {
        let before = self.queue.len();
        self.queue.retain(|&r| r != request);
        self.queue.len() != before
    }

    /// A worker heartbeated: it takes requests.
    pub fn worker_ready(&mut self, worker: WorkerId, now: Instant) {
        if let Some(s) = self.workers.get_mut(&worker) {
            if s.state == SlotState::Starting {
                s.state = SlotState::Ready;
                s.idle_since = now;
            }
        }
        self.dispatch(now);
    }

    /// A worker takes no new requests (it is terminating or failed).
    pub fn worker_draining(&mut self, worker: WorkerId, now: Instant) {
        if let Some(s) = self.workers.get_mut(&worker) {
            s.state = SlotState::Draining;
        }
        self.dispatch(now);
    }

    /// A session on `worker` ended; `ok` says whether the worker answered it (choke or an error
    /// it sent) rather than failing under it. An answered session ends a failure streak.
    pub fn session_done(&mut self, worker: WorkerId, ok: bool, now: Instant) {
        if let Some(s) = self.workers.get_mut(&worker) {
            s.load = s.load.saturating_sub(1);
            if s.load == 0 {
                s.idle_since = now;
            }
        }
        if ok {
            self.end_streak();
            self.backoff_until = None;
        }
        self.dispatch(now);
    }

    /// A worker's process is gone. `failure` says why it counts as failed, if it does.
    pub fn worker_exited(&mut self, worker: WorkerId, failure: Option<&str>, now: Instant) {
        if self.workers.remove(&worker).is_none() {
            return;
        }
        match failure {
            None => {
                if self.streak > 0 && self.last_failure.is_some_and(|t| now >= t + self.config.crash_window) {
                    self.end_streak();
                }
            }
            Some(reason) => {
                if self.last_failure.is_some_and(|t| now >= t + self.config.crash_window) {
                    self.end_streak();
                }
                self.streak += 1;
                self.last_failure = Some(now);
                if self.streak >= self.crash_limit && self.status == AppStatus::Running {
                    let reason = format!("{} worker failures in a row, the last: {reason}", self.streak);
                    self.set_status(AppStatus::Failed { reason: reason.clone() });
                    self.shed(Rejection::Failed { reason });
                } else {
                    let delay = self.backoff.next_delay();
                    self.backoff_until = Some(now + delay);
                }
            }
        }
        self.dispatch(now);
    }

    /// Stop the app: refuse the queue, retire every worker, refuse new requests.
    pub fn stop(&mut self) {
        if self.status != AppStatus::Stopped {
            self.set_status(AppStatus::Stopped);
        }
        self.shed(Rejection::Stopped);
    }

    /// Start (or restart after a failure or stop): take requests again, forget the failure streak.
    pub fn start(&mut self, now: Instant) {
        self.end_streak();
        self.last_failure = None;
        self.backoff_until = None;
        if self.status != AppStatus::Running {
            self.set_status(AppStatus::Running);
        }
        self.dispatch(now);
    }

    /// Retire every worker now (a new version was deployed); requests keep flowing to the
    /// replacements, which start as the queue needs them.
    pub fn retire_all(&mut self, now: Instant) {
        for (&id, s) in self.workers.iter_mut() {
            if s.state != SlotState::Draining {
                s.state = SlotState::Draining;
                self.actions.push_back(Action::Retire(id));
            }
        }
        self.dispatch(now);
    }

    /// Time passed: retire idle workers, spawn after a backoff.
    pub fn tick(&mut self, now: Instant) {
        if let Some(idle) = self.idle_timeout {
            let mut live = self.live();
            for (&id, s) in self.workers.iter_mut() {
                if live > self.population && s.state == SlotState::Ready && s.load == 0 && now >= s.idle_since + idle {
                    s.state = SlotState::Draining;
                    self.actions.push_back(Action::Retire(id));
                    live -= 1;
                }
            }
        }
        self.dispatch(now);
    }

    fn set_status(&mut self, status: AppStatus) {
        self.status = status.clone();
        self.actions.push_back(Action::Status(status));
    }

    fn shed(&mut self, error: Rejection) {
        for request in self.queue.drain(..) {
            self.actions.push_back(Action::Reject { request, error: error.clone() });
        }
        for (&id, s) in self.workers.iter_mut() {
            if s.state != SlotState::Draining {
                s.state = SlotState::Draining;
                self.actions.push_back(Action::Retire(id));
            }
        }
    }

    fn pick(&self) -> Option<WorkerId> {
        self.workers
            .iter()
            .filter(|(_, s)| s.state == SlotState::Ready && s.load < self.concurrency)
            .min_by_key(|(&id, s)| (s.load, id))
            .map(|(&id, _)| id)
    }

    fn assign(&mut self, request: RequestId, worker: WorkerId) {
        if let Some(s) = self.workers.get_mut(&worker) {
            s.load += 1;
        }
        self.actions.push_back(Action::Assign { request, worker });
    }

    fn dispatch(&mut self, now: Instant) {
        while !self.queue.is_empty() {
            let Some(worker) = self.pick() else { break };
            let request = self.queue.pop_front().expect("queue is not empty");
            self.assign(request, worker);
        }
        if self.status != AppStatus::Running || (self.queue.is_empty() && !self.below_population()) {
            return;
        }
        if self.backoff_until.is_some_and(|t| now < t) {
            return;
        }
        let starting = self.workers.values().filter(|s| s.state == SlotState::Starting).count();
        // While failures are recent, start one probe at a time.
        if self.streak > 0 && starting > 0 {
            return;
        }
        let mut pending = starting * self.concurrency;
        while self.queue.len() > pending && self.workers.len() < self.pool_limit {
            self.spawn(now);
            pending += self.concurrency;
            if self.streak > 0 {
                return;
            }
        }
        while self.below_population() && self.workers.len() < self.pool_limit {
            self.spawn(now);
            if self.streak > 0 {
                return;
            }
        }
    }

    fn spawn(&mut self, now: Instant) {
        let id = self.next_worker;
        self.next_worker += 1;
        self.workers.insert(id, Slot { state: SlotState::Starting, load: 0, idle_since: now });
        self.actions.push_back(Action::Spawn(id));
    }

    /// Forgets the failure streak: the next failure waits the shortest delay again.
    fn end_streak(&mut self) {
        self.streak = 0;
        self.backoff.reset();
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // The virtual clock of these tests starts at an arbitrary std instant.
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn profile(pool: usize, queue: usize, conc: usize) -> Profile {
        Profile {
            pool_limit: pool,
            queue_limit: queue,
            concurrency: conc,
            idle_timeout: Some(Duration::from_secs(10)),
            crash_limit: 3,
            ..Profile::default()
        }
    }

    fn drain(b: &mut Balancer) -> Vec<Action> {
        std::iter::from_fn(|| b.poll_action()).collect()
    }

    fn assign(request: RequestId, worker: WorkerId) -> Action {
        Action::Assign { request, worker }
    }

    #[test]
    fn first_request_spawns_and_is_assigned_when_ready() {
        let t = Instant::now();
        let mut b = Balancer::new(&profile(4, 10, 2), BalanceConfig::default(), 1);
        b.enqueue(1, t).unwrap();
        assert_eq!(drain(&mut b), vec![Action::Spawn(1)]);
        b.enqueue(2, t).unwrap();
        assert!(drain(&mut b).is_empty(), "one starting worker covers two requests at concurrency 2");
        b.enqueue(3, t).unwrap();
        assert_eq!(drain(&mut b), vec![Action::Spawn(2)]);
        b.worker_ready(1, t);
        assert_eq!(drain(&mut b), vec![assign(1, 1), assign(2, 1)]);
        b.worker_ready(2, t);
        assert_eq!(drain(&mut b), vec![assign(3, 2)]);
        assert_eq!(b.queue_len(), 0);
    }

    #[test]
    fn least_loaded_worker_first_lowest_id_on_ties() {
        let t = Instant::now();
        let mut b = Balancer::new(&profile(2, 10, 4), BalanceConfig::default(), 1);
        for r in 1..=5 {
            b.enqueue(r, t).unwrap();
        }
        assert_eq!(drain(&mut b), vec![Action::Spawn(1), Action::Spawn(2)]);
        b.worker_ready(2, t);
        b.worker_ready(1, t);
        let got = drain(&mut b);
        assert_eq!(got, vec![assign(1, 2), assign(2, 2), assign(3, 2), assign(4, 2), assign(5, 1)]);
        b.enqueue(6, t).unwrap();
        b.enqueue(7, t).unwrap();
        assert_eq!(drain(&mut b), vec![assign(6, 1), assign(7, 1)]);
        b.session_done(2, true, t);
        b.session_done(2, true, t);
        b.enqueue(8, t).unwrap();
        assert_eq!(drain(&mut b), vec![assign(8, 2)]);
    }

    #[test]
    fn queue_limit_rejects_with_queue_full_and_pool_limit_caps_growth() {
        let t = Instant::now();
        let mut b = Balancer::new(&profile(2, 3, 1), BalanceConfig::default(), 1);
        for r in 1..=3 {
            b.enqueue(r, t).unwrap();
        }
        assert_eq!(drain(&mut b), vec![Action::Spawn(1), Action::Spawn(2)]);
        assert_eq!(b.enqueue(4, t), Err(Rejection::QueueFull { limit: 3 }));
        assert!(Rejection::QueueFull { limit: 3 }.to_string().contains("retry"));
        b.worker_ready(1, t);
        assert_eq!(drain(&mut b), vec![assign(1, 1)]);
        b.enqueue(4, t).unwrap();
        assert_eq!(b.pool_size(), 2);
        assert!(b.cancel(4));
        assert!(!b.cancel(4));
        assert_eq!(b.queue_len(), 2);
    }

    #[test]
    fn idle_workers_are_retired_after_idle_timeout() {
        let t = Instant::now();
        let mut b = Balancer::new(&profile(2, 10, 1), BalanceConfig::default(), 1);
        b.enqueue(1, t).unwrap();
        b.enqueue(2, t).unwrap();
        b.worker_ready(1, t);
        b.worker_ready(2, t);
        drain(&mut b);
        b.session_done(1, true, t + Duration::from_secs(1));
        b.session_done(2, true, t + Duration::from_secs(3));
        assert_eq!(b.next_deadline(), Some(t + Duration::from_secs(11)));
        b.tick(t + Duration::from_secs(11) - MS);
        assert!(drain(&mut b).is_empty());
        b.tick(t + Duration::from_secs(11));
        assert_eq!(drain(&mut b), vec![Action::Retire(1)]);
        assert_eq!(b.next_deadline(), Some(t + Duration::from_secs(13)));
        b.tick(t + Duration::from_secs(13));
        assert_eq!(drain(&mut b), vec![Action::Retire(2)]);
        b.worker_exited(1, None, t + Duration::from_secs(14));
        b.worker_exited(2, None, t + Duration::from_secs(14));
        assert_eq!(b.pool_size(), 0);
        assert_eq!(b.next_deadline(), None);
        // Demand brings the pool back.
        b.enqueue(3, t + Duration::from_secs(20)).unwrap();
        assert_eq!(drain(&mut b), vec![Action::Spawn(3)]);
    }

    #[test]
    fn a_population_starts_workers_without_requests_and_keeps_them_when_idle() {
        let t0 = Instant::now();
        let mut b = Balancer::new(&profile(3, 10, 1), BalanceConfig::default(), 1);
        b.set_population(2, t0);
        assert_eq!(drain(&mut b), vec![Action::Spawn(1), Action::Spawn(2)]);
        b.worker_ready(1, t0);
        b.worker_ready(2, t0);
        // Past the idle timeout nothing is retired and no deadline is pending for it.
        assert_eq!(b.next_deadline(), None);
        b.tick(t0 + Duration::from_secs(60));
        assert!(drain(&mut b).is_empty());
        // Capped at pool-limit.
        b.set_population(10, t0);
        assert_eq!(drain(&mut b), vec![Action::Spawn(3)]);
        b.worker_ready(3, t0);
        // Back down to 1: idle workers above it go once their idle timeout passes.
        b.set_population(1, t0);
        assert_eq!(b.next_deadline(), Some(t0 + Duration::from_secs(10)));
        b.tick(t0 + Duration::from_secs(10));
        assert_eq!(drain(&mut b), vec![Action::Retire(1), Action::Retire(2)]);
        b.worker_exited(1, None, t0);
        b.worker_exited(2, None, t0);
        assert_eq!(b.next_deadline(), None);
        // A worker lost below the population is replaced, after the backoff if it failed.
        b.worker_exited(3, Some("crash"), t0);
        assert!(drain(&mut b).is_empty());
        let at = b.next_deadline().expect("a backoff deadline");
        b.tick(at);
        assert_eq!(drain(&mut b), vec![Action::Spawn(4)]);
        // A stopped app keeps no population.
        b.stop();
        assert!(matches!(drain(&mut b).as_slice(), [Action::Status(AppStatus::Stopped), Action::Retire(4)]));
        b.worker_exited(4, None, t0);
        assert!(drain(&mut b).is_empty());
    }

    #[test]
    fn a_busy_worker_is_never_idle() {
        let t = Instant::now();
        let mut b = Balancer::new(&profile(1, 10, 1), BalanceConfig::default(), 1);
        b.enqueue(1, t).unwrap();
        b.worker_ready(1, t);
        drain(&mut b);
        b.tick(t + Duration::from_secs(100));
        assert!(drain(&mut b).is_empty());
    }

    #[test]
    fn failures_back_off_one_probe_at_a_time_then_fail_the_app() {
        let t = Instant::now();
        let config = BalanceConfig::default();
        let mut b = Balancer::new(&profile(4, 10, 1), config, 7);
        for r in 1..=3 {
            b.enqueue(r, t).unwrap();
        }
        assert_eq!(drain(&mut b), vec![Action::Spawn(1), Action::Spawn(2), Action::Spawn(3)]);
        b.worker_exited(1, Some("boom"), t);
        assert!(drain(&mut b).is_empty(), "no respawn during backoff");
        let until = b.next_deadline().unwrap();
        assert!(until >= t + 50 * MS && until <= t + 100 * MS, "{:?}", until - t);
        b.tick(until - MS);
        assert!(drain(&mut b).is_empty());
        // Other workers still starting: no probe is needed yet, they cover... no: 3 queued, 2
        // starting. One probe at a time while the streak lasts, and two are starting already.
        b.tick(until);
        assert!(drain(&mut b).is_empty());
        b.worker_exited(2, Some("boom"), until);
        let until2 = b.next_deadline().unwrap();
        assert!(until2 >= until + 100 * MS && until2 <= until + 200 * MS, "{:?}", until2 - until);
        b.tick(until2);
        assert!(drain(&mut b).is_empty(), "worker 3 is still starting");
        b.worker_exited(3, Some("boom"), until2);
        let got = drain(&mut b);
        let reason = "3 worker failures in a row, the last: boom".to_string();
        assert_eq!(
            got,
            vec![
                Action::Status(AppStatus::Failed { reason: reason.clone() }),
                Action::Reject { request: 1, error: Rejection::Failed { reason: reason.clone() } },
                Action::Reject { request: 2, error: Rejection::Failed { reason: reason.clone() } },
                Action::Reject { request: 3, error: Rejection::Failed { reason: reason.clone() } },
            ]
        );
        assert_eq!(b.enqueue(4, until2), Err(Rejection::Failed { reason }));
        b.start(until2);
        assert_eq!(drain(&mut b), vec![Action::Status(AppStatus::Running)]);
        b.enqueue(4, until2).unwrap();
        assert_eq!(drain(&mut b), vec![Action::Spawn(4)]);
    }

    #[test]
    fn probe_after_backoff_and_success_resets_the_streak() {
        let t = Instant::now();
        let mut b = Balancer::new(&profile(4, 10, 1), BalanceConfig::default(), 3);
        b.enqueue(1, t).unwrap();
        b.enqueue(2, t).unwrap();
        assert_eq!(drain(&mut b), vec![Action::Spawn(1), Action::Spawn(2)]);
        b.worker_exited(1, Some("x"), t);
        b.worker_exited(2, Some("x"), t);
        let until = b.next_deadline().unwrap();
        b.tick(until);
        assert_eq!(drain(&mut b), vec![Action::Spawn(3)], "one probe");
        b.worker_ready(3, until);
        assert_eq!(drain(&mut b), vec![assign(1, 3), Action::Spawn(4)], "the next probe");
        b.session_done(3, true, until);
        assert_eq!(drain(&mut b), vec![assign(2, 3)]);
        // Streak over: growth is no longer limited to one probe.
        for r in 3..=6 {
            b.enqueue(r, until).unwrap();
        }
        assert_eq!(drain(&mut b), vec![Action::Spawn(5), Action::Spawn(6)]);
        assert_eq!(b.pool_size(), 4);
    }

    #[test]
    fn failures_far_apart_do_not_fail_the_app() {
        let mut t = Instant::now();
        let mut b = Balancer::new(&profile(1, 10, 1), BalanceConfig::default(), 3);
        for i in 0..10u64 {
            b.enqueue(i, t).unwrap();
            let spawned = drain(&mut b);
            assert!(matches!(spawned[..], [Action::Spawn(_)]), "{spawned:?}");
            let Action::Spawn(w) = spawned[0] else { unreachable!() };
            b.worker_exited(w, Some("x"), t);
            b.cancel(i);
            t += Duration::from_secs(61);
        }
        assert_eq!(b.status(), &AppStatus::Running);
    }

    /// The restart delays of a worker failing `n` times in a row, each restart at its deadline.
    fn restart_delays(seed: u64, n: usize) -> Vec<Duration> {
        let mut t = Instant::now();
        let p = Profile { crash_limit: 1000, idle_timeout: None, ..profile(1, 10, 1) };
        let mut b = Balancer::new(&p, BalanceConfig::default(), seed);
        b.enqueue(1, t).unwrap();
        let mut delays = Vec::new();
        for _ in 0..n {
            let [Action::Spawn(w)] = drain(&mut b)[..] else { panic!("one spawn expected") };
            b.worker_exited(w, Some("x"), t);
            let at = b.next_deadline().expect("a restart is scheduled");
            delays.push(at - t);
            t = at;
            b.tick(t);
        }
        delays
    }

    #[test]
    fn backoff_grows_exponentially_with_jitter_and_is_capped() {
        let delays = restart_delays(42, 12);
        for (i, d) in delays.iter().enumerate() {
            let full = (Duration::from_millis(100) * (1 << i)).min(Duration::from_secs(10));
            assert!(*d >= full / 2 && *d <= full, "failure {} waited {d:?}", i + 1);
        }
        // The jitter comes from the seed: the same seed, the same delays (virtual time stays
        // deterministic); another seed, others.
        assert_eq!(restart_delays(42, 12), delays);
        assert_ne!(restart_delays(43, 12), delays);
    }

    #[test]
    fn stop_rejects_queue_retires_workers() {
        let t = Instant::now();
        let mut b = Balancer::new(&profile(2, 10, 1), BalanceConfig::default(), 1);
        b.enqueue(1, t).unwrap();
        b.enqueue(2, t).unwrap();
        b.enqueue(3, t).unwrap();
        b.worker_ready(1, t);
        drain(&mut b);
        b.stop();
        assert_eq!(
            drain(&mut b),
            vec![
                Action::Status(AppStatus::Stopped),
                Action::Reject { request: 2, error: Rejection::Stopped },
                Action::Reject { request: 3, error: Rejection::Stopped },
                Action::Retire(1),
                Action::Retire(2),
            ]
        );
        assert_eq!(b.enqueue(4, t), Err(Rejection::Stopped));
    }

    #[test]
    fn retire_all_replaces_workers_without_dropping_requests() {
        let t = Instant::now();
        let mut b = Balancer::new(&profile(2, 10, 1), BalanceConfig::default(), 1);
        b.enqueue(1, t).unwrap();
        b.worker_ready(1, t);
        drain(&mut b);
        b.retire_all(t);
        assert_eq!(drain(&mut b), vec![Action::Retire(1)]);
        b.enqueue(2, t).unwrap();
        assert_eq!(drain(&mut b), vec![Action::Spawn(2)]);
        b.worker_ready(2, t);
        assert_eq!(drain(&mut b), vec![assign(2, 2)]);
    }
}
