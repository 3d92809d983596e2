//! The lifecycle of one worker process as a state machine: no I/O, no clock (`now` is an argument).
//!
//! ```text
//! Spawning ──handshake──► Handshaken ──heartbeat──► Active
//!    │                        │                       │
//!    └─ startup-timeout ──────┴── heartbeat-timeout ──┴── terminate (either side) ──► Terminating
//! Terminating(Requested)  [engine sent terminate] ─┐
//! Terminating(Leaving)    [worker sent terminate] ─┴ terminate-timeout ─► Terminating(Signalled)
//!                         (SIGTERM) ─ kill-grace ─► Terminating(Killed) (SIGKILL)
//! any state ──process exit──► Dead
//! ```
//!
//! The terminating step lives inside the state ([`State::Terminating`] holds its [`Phase`]), so
//! no phase exists outside termination.
//!
//! The driver feeds events in (`handle_message`, `handle_disconnect`, `handle_exit`, `terminate`,
//! `tick`), applies what [`Worker::poll_output`] returns, and calls `tick` at
//! [`Worker::next_deadline`].

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use crate::protocol::{terminate_code, Message};

/// How long a worker may take at each step. Cocaine's defaults: handshake 5 s, heartbeat 30 s,
/// terminate 10 s, then SIGTERM, then SIGKILL after 5 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From spawn to handshake.
    pub startup: Duration,
    /// From handshake to the first heartbeat, and between heartbeats.
    pub heartbeat: Duration,
    /// From a terminate (sent or received) to the process's exit, before SIGTERM.
    pub terminate: Duration,
    /// From SIGTERM to SIGKILL.
    pub kill_grace: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            startup: Duration::from_secs(5),
            heartbeat: Duration::from_secs(30),
            terminate: Duration::from_secs(10),
            kill_grace: Duration::from_secs(5),
        }
    }
}

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Spawned, no handshake yet.
    Spawning,
    /// Handshake received, waiting for the first heartbeat.
    Handshaken,
    /// Heartbeating: may take requests.
    Active,
    /// On its way out, at this step.
    Terminating(Phase),
    /// The process has exited.
    Dead,
}

impl State {
    /// The state's name without its phase: `Spawning`, `Handshaken`, `Active`, `Terminating`,
    /// `Dead` (as `nodus app info` shows it).
    pub fn name(self) -> &'static str {
        match self {
            State::Spawning => "Spawning",
            State::Handshaken => "Handshaken",
            State::Active => "Active",
            State::Terminating(_) => "Terminating",
            State::Dead => "Dead",
        }
    }
}

/// The steps of [`State::Terminating`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The engine sent terminate and waits for the worker's answer and exit.
    Requested,
    /// The worker said terminate (or answered one, or hung up) and should exit by itself.
    Leaving,
    /// SIGTERM was sent.
    Signalled,
    /// SIGKILL was sent.
    Killed,
}

/// A signal the driver must send to the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM.
    Term,
    /// SIGKILL.
    Kill,
}

/// How a process ended, as the driver saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitReport {
    /// Exit code, when it exited by itself.
    pub code: Option<i32>,
    /// Signal number, when a signal ended it.
    pub signal: Option<i32>,
}

impl fmt::Display for ExitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit code {c}"),
            (None, Some(s)) => write!(f, "killed by signal {s}"),
            (None, None) => f.write_str("unknown exit status"),
        }
    }
}

/// Why a worker is counted as failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailReason {
    /// No handshake within startup-timeout.
    StartupTimeout,
    /// No heartbeat within heartbeat-timeout.
    HeartbeatTimeout,
    /// The connection closed while the worker was serving.
    Disconnected,
    /// The process exited without a terminate.
    Crashed(ExitReport),
    /// The worker sent terminate with an abnormal code.
    Aborted(String),
    /// The worker broke the protocol.
    Protocol(String),
}

impl fmt::Display for FailReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailReason::StartupTimeout => f.write_str("no handshake within startup-timeout"),
            FailReason::HeartbeatTimeout => f.write_str("no heartbeat within heartbeat-timeout"),
            FailReason::Disconnected => f.write_str("worker closed its connection"),
            FailReason::Crashed(e) => write!(f, "worker exited unexpectedly ({e})"),
            FailReason::Aborted(r) => write!(f, "worker terminated abnormally: {r}"),
            FailReason::Protocol(r) => write!(f, "worker broke the protocol: {r}"),
        }
    }
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Write this message to the worker's connection.
    Send(Message),
    /// Send this signal to the process.
    Kill(Signal),
    /// The worker heartbeats: it may take requests from now on.
    Ready,
    /// The worker, which was [`Output::Ready`], takes no new requests from now on.
    Draining,
    /// The worker failed; its open sessions must fail now. Emitted at most once.
    Failed(FailReason),
    /// The process exited; `failure` is why it counts as failed, if it does.
    Exited {
        /// The failure recorded for this worker, if any.
        failure: Option<FailReason>,
        /// The process's exit status.
        status: ExitReport,
    },
}

/// One worker process's lifecycle.
#[derive(Debug)]
pub struct Worker {
    timeouts: Timeouts,
    state: State,
    deadline: Option<Instant>,
    failure: Option<FailReason>,
    outputs: VecDeque<Output>,
}

impl Worker {
    /// A worker whose process was spawned at `now`.
    pub fn new(timeouts: Timeouts, now: Instant) -> Self {
        Worker {
            timeouts,
            state: State::Spawning,
            deadline: Some(now + timeouts.startup),
            failure: None,
            outputs: VecDeque::new(),
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The step within [`State::Terminating`], if terminating.
    pub fn phase(&self) -> Option<Phase> {
        match self.state {
            State::Terminating(phase) => Some(phase),
            _ => None,
        }
    }

    /// The failure recorded for this worker, if any.
    pub fn failure(&self) -> Option<&FailReason> {
        self.failure.as_ref()
    }

    /// When [`Worker::tick`] must next be called.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The next thing for the driver to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// A control message from the worker. Session messages are not this machine's business and
    /// are ignored.
    pub fn handle_message(&mut self, msg: &Message, now: Instant) {
        match (self.state, msg) {
            (State::Spawning, Message::Handshake { .. }) => {
                self.state = State::Handshaken;
                self.deadline = Some(now + self.timeouts.heartbeat);
            }
            (State::Handshaken | State::Active | State::Terminating(_), Message::Handshake { .. }) => {
                self.fail(FailReason::Protocol("second handshake".into()), now);
            }
            (State::Spawning, Message::Heartbeat | Message::Terminate { .. }) => {
                self.fail(FailReason::Protocol("message before handshake".into()), now);
            }
            (State::Handshaken, Message::Heartbeat) => {
                self.state = State::Active;
                self.outputs.push_back(Output::Ready);
                self.outputs.push_back(Output::Send(Message::Heartbeat));
                self.deadline = Some(now + self.timeouts.heartbeat);
            }
            (State::Active, Message::Heartbeat) => {
                self.outputs.push_back(Output::Send(Message::Heartbeat));
                self.deadline = Some(now + self.timeouts.heartbeat);
            }
            (State::Terminating(Phase::Requested), Message::Heartbeat) => {
                self.outputs.push_back(Output::Send(Message::Heartbeat));
            }
            (State::Handshaken | State::Active, Message::Terminate { code, reason }) => {
                if *code != terminate_code::NORMAL {
                    self.fail_soft(FailReason::Aborted(reason.clone()));
                }
                self.begin_leaving(Phase::Leaving, now + self.timeouts.terminate);
            }
            // The answer to our terminate: keep the deadline we set when we asked.
            (State::Terminating(Phase::Requested), Message::Terminate { .. }) => {
                self.state = State::Terminating(Phase::Leaving);
            }
            _ => {}
        }
    }

    /// The worker's connection closed.
    pub fn handle_disconnect(&mut self, now: Instant) {
        match self.state {
            State::Handshaken | State::Active => {
                self.fail_soft(FailReason::Disconnected);
                self.begin_leaving(Phase::Leaving, now + self.timeouts.kill_grace);
            }
            State::Terminating(Phase::Requested) => {
                self.state = State::Terminating(Phase::Leaving);
                let grace = now + self.timeouts.kill_grace;
                self.deadline = Some(self.deadline.map_or(grace, |d| d.min(grace)));
            }
            _ => {}
        }
    }

    /// The process exited.
    pub fn handle_exit(&mut self, status: ExitReport, _now: Instant) {
        if self.state == State::Dead {
            return;
        }
        if !matches!(self.state, State::Terminating(_)) {
            self.fail_soft(FailReason::Crashed(status));
            if self.state == State::Active {
                self.outputs.push_back(Output::Draining);
            }
        }
        self.state = State::Dead;
        self.deadline = None;
        self.outputs.push_back(Output::Exited { failure: self.failure.clone(), status });
    }

    /// The engine wants this worker gone: terminate, wait terminate-timeout, SIGTERM, SIGKILL.
    pub fn terminate(&mut self, reason: &str, now: Instant) {
        match self.state {
            State::Spawning => self.signal(Signal::Term, now),
            State::Handshaken | State::Active => {
                let code = terminate_code::NORMAL;
                self.outputs.push_back(Output::Send(Message::Terminate { code, reason: reason.to_string() }));
                self.begin_leaving(Phase::Requested, now + self.timeouts.terminate);
            }
            State::Terminating(_) | State::Dead => {}
        }
    }

    /// Time passed: act on an expired deadline.
    pub fn tick(&mut self, now: Instant) {
        let Some(deadline) = self.deadline else { return };
        if now < deadline {
            return;
        }
        match self.state {
            State::Spawning => self.fail(FailReason::StartupTimeout, now),
            State::Handshaken | State::Active => self.fail(FailReason::HeartbeatTimeout, now),
            State::Terminating(Phase::Requested | Phase::Leaving) => self.signal(Signal::Term, now),
            State::Terminating(Phase::Signalled) => {
                self.state = State::Terminating(Phase::Killed);
                self.deadline = None;
                self.outputs.push_back(Output::Kill(Signal::Kill));
            }
            State::Terminating(Phase::Killed) => self.deadline = None,
            State::Dead => self.deadline = None,
        }
    }

    fn begin_leaving(&mut self, phase: Phase, deadline: Instant) {
        if self.state == State::Active {
            self.outputs.push_back(Output::Draining);
        }
        self.state = State::Terminating(phase);
        self.deadline = Some(deadline);
    }

    fn signal(&mut self, sig: Signal, now: Instant) {
        self.state = State::Terminating(Phase::Signalled);
        self.deadline = Some(now + self.timeouts.kill_grace);
        self.outputs.push_back(Output::Kill(sig));
    }

    /// Records a failure (first one wins) without changing state.
    fn fail_soft(&mut self, reason: FailReason) {
        if self.failure.is_none() {
            self.failure = Some(reason.clone());
            self.outputs.push_back(Output::Failed(reason));
        }
    }

    /// Records a failure and stops the process: SIGTERM now, SIGKILL after kill-grace. A failed
    /// worker is not trusted to answer a terminate.
    fn fail(&mut self, reason: FailReason, now: Instant) {
        if matches!(self.state, State::Terminating(_) | State::Dead) {
            return;
        }
        self.fail_soft(reason);
        if self.state == State::Active {
            self.outputs.push_back(Output::Draining);
        }
        self.signal(Signal::Term, now);
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // The virtual clock of these tests starts at an arbitrary std instant.
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    struct Clock(Instant);
    impl Clock {
        fn advance(&mut self, d: Duration) -> Instant {
            self.0 += d;
            self.0
        }
    }

    fn drain(w: &mut Worker) -> Vec<Output> {
        std::iter::from_fn(|| w.poll_output()).collect()
    }

    fn hs() -> Message {
        Message::Handshake { uuid: "u".into() }
    }

    /// Runs `tick` at every deadline up to `until`, collecting outputs.
    fn run_until(w: &mut Worker, clock: &mut Clock, until: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        while let Some(d) = w.next_deadline() {
            if d > until {
                break;
            }
            clock.0 = d;
            w.tick(d);
            out.extend(drain(w));
        }
        clock.0 = until;
        out
    }

    fn active(clock: &mut Clock) -> Worker {
        let mut w = Worker::new(Timeouts::default(), clock.0);
        w.handle_message(&hs(), clock.advance(S / 10));
        w.handle_message(&Message::Heartbeat, clock.advance(S / 10));
        assert_eq!(drain(&mut w), vec![Output::Ready, Output::Send(Message::Heartbeat)]);
        assert_eq!(w.state(), State::Active);
        w
    }

    #[test]
    fn happy_path_echoes_heartbeats_and_stays_active() {
        let mut clock = Clock(Instant::now());
        let mut w = active(&mut clock);
        for _ in 0..10 {
            w.handle_message(&Message::Heartbeat, clock.advance(20 * S));
            w.tick(clock.0);
            assert_eq!(drain(&mut w), vec![Output::Send(Message::Heartbeat)]);
        }
        assert_eq!(w.state(), State::Active);
    }

    #[test]
    fn slow_handshake_is_killed_at_startup_timeout() {
        let mut clock = Clock(Instant::now());
        let t0 = clock.0;
        let mut w = Worker::new(Timeouts::default(), t0);
        w.tick(clock.advance(4 * S));
        assert!(drain(&mut w).is_empty());
        let out = run_until(&mut w, &mut clock, t0 + 20 * S);
        assert_eq!(
            out,
            vec![Output::Failed(FailReason::StartupTimeout), Output::Kill(Signal::Term), Output::Kill(Signal::Kill)]
        );
        assert_eq!(w.phase(), Some(Phase::Killed));
        assert_eq!(w.state(), State::Terminating(Phase::Killed));
        assert_eq!(w.state().name(), "Terminating");
        w.handle_exit(ExitReport { code: None, signal: Some(9) }, clock.0);
        assert_eq!(
            drain(&mut w),
            vec![Output::Exited {
                failure: Some(FailReason::StartupTimeout),
                status: ExitReport { code: None, signal: Some(9) }
            }]
        );
        assert_eq!(w.state(), State::Dead);
        assert_eq!(w.next_deadline(), None);
    }

    #[test]
    fn sigkill_follows_sigterm_after_kill_grace_exactly() {
        let clock = Clock(Instant::now());
        let t0 = clock.0;
        let mut w = Worker::new(Timeouts::default(), t0);
        w.tick(t0 + 5 * S);
        assert_eq!(drain(&mut w), vec![Output::Failed(FailReason::StartupTimeout), Output::Kill(Signal::Term)]);
        w.tick(t0 + 10 * S - Duration::from_millis(1));
        assert!(drain(&mut w).is_empty());
        w.tick(t0 + 10 * S);
        assert_eq!(drain(&mut w), vec![Output::Kill(Signal::Kill)]);
    }

    #[test]
    fn handshake_without_heartbeat_times_out() {
        let mut clock = Clock(Instant::now());
        let mut w = Worker::new(Timeouts::default(), clock.0);
        w.handle_message(&hs(), clock.advance(S));
        let t = clock.0;
        w.tick(t + 29 * S);
        assert!(drain(&mut w).is_empty());
        w.tick(t + 30 * S);
        assert_eq!(drain(&mut w), vec![Output::Failed(FailReason::HeartbeatTimeout), Output::Kill(Signal::Term)]);
    }

    #[test]
    fn heartbeats_that_stop_time_out() {
        let mut clock = Clock(Instant::now());
        let mut w = active(&mut clock);
        let last = clock.0;
        let out = run_until(&mut w, &mut clock, last + 60 * S);
        assert_eq!(
            out,
            vec![
                Output::Failed(FailReason::HeartbeatTimeout),
                Output::Draining,
                Output::Kill(Signal::Term),
                Output::Kill(Signal::Kill)
            ]
        );
        assert_eq!(clock.0, last + 60 * S);
    }

    #[test]
    fn worker_terminate_then_exit_is_clean() {
        let mut clock = Clock(Instant::now());
        let mut w = active(&mut clock);
        w.handle_message(&Message::Terminate { code: terminate_code::NORMAL, reason: "bye".into() }, clock.0);
        assert_eq!(drain(&mut w), vec![Output::Draining]);
        assert_eq!(w.phase(), Some(Phase::Leaving));
        let status = ExitReport { code: Some(0), signal: None };
        w.handle_exit(status, clock.advance(S));
        assert_eq!(drain(&mut w), vec![Output::Exited { failure: None, status }]);
    }

    #[test]
    fn worker_terminate_then_lingering_gets_sigterm_then_sigkill() {
        let mut clock = Clock(Instant::now());
        let mut w = active(&mut clock);
        let t = clock.0;
        w.handle_message(&Message::Terminate { code: terminate_code::NORMAL, reason: "bye".into() }, t);
        drain(&mut w);
        w.handle_disconnect(clock.advance(S));
        assert!(drain(&mut w).is_empty());
        assert_eq!(w.next_deadline(), Some(t + 10 * S));
        let out = run_until(&mut w, &mut clock, t + 10 * S);
        assert_eq!(out, vec![Output::Kill(Signal::Term)]);
        let out = run_until(&mut w, &mut clock, t + 15 * S);
        assert_eq!(out, vec![Output::Kill(Signal::Kill)]);
        let status = ExitReport { code: None, signal: Some(9) };
        w.handle_exit(status, clock.0);
        // Leaving on its own counts as clean, even if it had to be helped out.
        assert_eq!(drain(&mut w), vec![Output::Exited { failure: None, status }]);
    }

    #[test]
    fn engine_terminate_answered_and_exited() {
        let mut clock = Clock(Instant::now());
        let mut w = active(&mut clock);
        w.terminate("idle", clock.0);
        assert_eq!(
            drain(&mut w),
            vec![
                Output::Send(Message::Terminate { code: terminate_code::NORMAL, reason: "idle".into() }),
                Output::Draining
            ]
        );
        assert_eq!(w.state(), State::Terminating(Phase::Requested));
        // Heartbeats are still echoed while the worker finishes its work.
        w.handle_message(&Message::Heartbeat, clock.advance(S));
        assert_eq!(drain(&mut w), vec![Output::Send(Message::Heartbeat)]);
        w.handle_message(&Message::Terminate { code: terminate_code::NORMAL, reason: String::new() }, clock.0);
        assert_eq!(w.phase(), Some(Phase::Leaving));
        let status = ExitReport { code: Some(0), signal: None };
        w.handle_exit(status, clock.advance(S));
        assert_eq!(drain(&mut w), vec![Output::Exited { failure: None, status }]);
    }

    #[test]
    fn engine_terminate_ignored_gets_sigterm_then_sigkill() {
        let mut clock = Clock(Instant::now());
        let mut w = active(&mut clock);
        let t = clock.0;
        w.terminate("stop", t);
        drain(&mut w);
        w.tick(t + 9 * S);
        assert!(drain(&mut w).is_empty());
        w.tick(t + 10 * S);
        assert_eq!(drain(&mut w), vec![Output::Kill(Signal::Term)]);
        w.tick(t + 14 * S);
        assert!(drain(&mut w).is_empty());
        w.tick(t + 15 * S);
        assert_eq!(drain(&mut w), vec![Output::Kill(Signal::Kill)]);
        assert_eq!(w.next_deadline(), None);
        let status = ExitReport { code: None, signal: Some(9) };
        w.handle_exit(status, clock.0);
        assert_eq!(drain(&mut w), vec![Output::Exited { failure: None, status }]);
    }

    #[test]
    fn crash_while_active_is_a_failure() {
        let mut clock = Clock(Instant::now());
        let mut w = active(&mut clock);
        w.handle_disconnect(clock.0);
        let status = ExitReport { code: Some(101), signal: None };
        w.handle_exit(status, clock.0);
        assert_eq!(
            drain(&mut w),
            vec![
                Output::Failed(FailReason::Disconnected),
                Output::Draining,
                Output::Exited { failure: Some(FailReason::Disconnected), status }
            ]
        );
        // Exit seen before the disconnect.
        let mut w = active(&mut clock);
        w.handle_exit(status, clock.0);
        w.handle_disconnect(clock.0);
        assert_eq!(
            drain(&mut w),
            vec![
                Output::Failed(FailReason::Crashed(status)),
                Output::Draining,
                Output::Exited { failure: Some(FailReason::Crashed(status)), status }
            ]
        );
    }

    #[test]
    fn protocol_violations_fail_the_worker() {
        let mut clock = Clock(Instant::now());
        let mut w = Worker::new(Timeouts::default(), clock.0);
        w.handle_message(&Message::Heartbeat, clock.advance(S));
        let out = drain(&mut w);
        assert!(matches!(out[0], Output::Failed(FailReason::Protocol(_))), "{out:?}");
        assert_eq!(out[1], Output::Kill(Signal::Term));
        let mut w = active(&mut clock);
        w.handle_message(&hs(), clock.0);
        assert!(matches!(drain(&mut w)[0], Output::Failed(FailReason::Protocol(_))));
    }

    #[test]
    fn abnormal_terminate_is_recorded() {
        let mut clock = Clock(Instant::now());
        let mut w = active(&mut clock);
        w.handle_message(&Message::Terminate { code: terminate_code::ABNORMAL, reason: "oom".into() }, clock.0);
        assert_eq!(drain(&mut w), vec![Output::Failed(FailReason::Aborted("oom".into())), Output::Draining]);
    }

    #[test]
    fn terminate_before_handshake_signals_at_once() {
        let mut clock = Clock(Instant::now());
        let mut w = Worker::new(Timeouts::default(), clock.0);
        w.terminate("stop", clock.advance(S));
        assert_eq!(drain(&mut w), vec![Output::Kill(Signal::Term)]);
        w.handle_exit(ExitReport { code: None, signal: Some(15) }, clock.0);
        assert!(matches!(drain(&mut w)[..], [Output::Exited { failure: None, .. }]));
    }
}
