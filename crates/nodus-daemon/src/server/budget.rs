//! What the driver counts: connections per listener, timeouts and cuts, and the node-wide memory
//! budgets for buffered input (bytes received, not decoded yet) and output (bytes queued, not
//! written yet).
//!
//! Accounting rule: every connection has a [`Meter`]; the node-wide [`Budget`]s count what each
//! connection holds beyond its first [`BUDGET_ALLOWANCE_BYTES`] (that much per connection is
//! bounded by the listeners' `max_connections` already). Every change of a meter is one atomic
//! operation that tells the exact value before it, so the budget changes by exactly the change of
//! the meter's excess; whoever takes bytes out of a meter (the writer after a write, a cut, the
//! connection's end) releases exactly that from the budget, and concurrent takers never release
//! the same bytes twice. Ordinary traffic (queues and partial frames under the allowance) never
//! touches the node-wide counters at all.

use crate::config::Limits;
use crate::router::{ConnId, IdMap};
use std::sync::atomic::{AtomicI64, AtomicIsize, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Which listener a connection came from (or that this node dialed it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// The client TCP listener.
    Tcp,
    /// The local Unix socket.
    Unix,
    /// The plain cluster listener.
    Cluster,
    /// The TLS cluster listener.
    Tls,
    /// A link this node dialed to a neighbour.
    Dial,
    /// An in-process connection of the node's HTTP API (it acts for HTTP callers).
    Http,
}

impl ListenerKind {
    /// Every kind.
    pub const ALL: [ListenerKind; 6] = [
        ListenerKind::Tcp,
        ListenerKind::Unix,
        ListenerKind::Cluster,
        ListenerKind::Tls,
        ListenerKind::Dial,
        ListenerKind::Http,
    ];

    /// The name used in logs and metrics (`listener="tcp"`).
    pub fn name(self) -> &'static str {
        match self {
            ListenerKind::Tcp => "tcp",
            ListenerKind::Unix => "unix",
            ListenerKind::Cluster => "cluster",
            ListenerKind::Tls => "tls",
            ListenerKind::Dial => "dial",
            ListenerKind::Http => "http",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counters of one listener.
#[derive(Debug, Default)]
pub(crate) struct ListenerCounters {
    /// Connections admitted (`nodus_connections_accepted_total`).
    pub(crate) accepted: AtomicU64,
    /// Connections closed at once because the listener was at `max_connections`
    /// (`nodus_connections_refused_total`).
    pub(crate) refused: AtomicU64,
    /// Failed `accept` calls, each followed by a backoff (`nodus_accept_errors_total`).
    pub(crate) accept_errors: AtomicU64,
    /// Connections closed for not sending a complete first message within
    /// `handshake_timeout_ms` (`nodus_handshake_timeouts_total`).
    pub(crate) handshake_timeouts: AtomicU64,
    /// Bytes read from its connections (`nodus_received_bytes_total`).
    pub(crate) bytes_in: AtomicU64,
    /// Bytes written to its connections (`nodus_sent_bytes_total`).
    pub(crate) bytes_out: AtomicU64,
}

/// A node-wide bound on buffered bytes, and how much is buffered now.
///
/// The count is signed: a writer may release bytes a moment before the router's batch that queued
/// them adds them (the batch adds once, at its end), so it can dip below zero briefly; readers
/// see such a dip as zero.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: usize,
    used: AtomicIsize,
    peak: AtomicIsize,
    /// Connections cut to get back under the limit.
    pub(crate) cuts: AtomicU64,
}

impl Budget {
    fn new(limit: usize) -> Budget {
        Budget { limit, used: AtomicIsize::new(0), peak: AtomicIsize::new(0), cuts: AtomicU64::new(0) }
    }

    /// The bound, bytes.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes buffered now.
    pub(crate) fn used(&self) -> usize {
        usize::try_from(self.used.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// The most bytes ever buffered at once.
    pub(crate) fn peak(&self) -> usize {
        usize::try_from(self.peak.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// Counts `n` more bytes; returns the new total.
    pub(crate) fn add(&self, n: usize) -> usize {
        let n = isize::try_from(n).unwrap_or(isize::MAX);
        if n == 0 {
            return self.used();
        }
        let total = self.used.fetch_add(n, Ordering::Relaxed).wrapping_add(n);
        if total > self.peak.load(Ordering::Relaxed) {
            self.peak.fetch_max(total, Ordering::Relaxed);
        }
        usize::try_from(total).unwrap_or(0)
    }

    /// Counts `n` bytes fewer.
    pub(crate) fn sub(&self, n: usize) {
        if n != 0 {
            self.used.fetch_sub(isize::try_from(n).unwrap_or(isize::MAX), Ordering::Relaxed);
        }
    }
}

/// What one socket connection holds in memory.
#[derive(Debug, Default)]
pub(crate) struct Meter {
    /// Bytes of messages queued for the writer or encoded and not written yet.
    queued: AtomicUsize,
    /// Bytes received and not decoded yet (a partial frame or line); [`RELEASED`] once the
    /// connection's bytes left the budget for good.
    input: AtomicUsize,
    /// Of `queued`, the bytes each sender's offers hold (a registered service's queue; one entry
    /// per sender with something queued, so at most `max_outbound_messages` entries).
    shares: Mutex<IdMap<ConnId, usize>>,
    /// When the queue last made progress (a write, or a message queued on an empty queue), Unix ms.
    progress: AtomicI64,
}

/// A meter whose input was released: the reader of a cut connection counts nothing more.
const RELEASED: usize = usize::MAX;

/// What each connection may hold, in input and in output, without counting against the node-wide
/// budgets.
pub const BUDGET_ALLOWANCE_BYTES: usize = 64 * 1024;

/// The part of `n` that counts against a budget.
fn excess(n: usize) -> usize {
    n.saturating_sub(BUDGET_ALLOWANCE_BYTES)
}

impl Meter {
    /// Bytes queued and not written yet.
    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Bytes `sender` has queued here through offers.
    pub(crate) fn share(&self, sender: ConnId) -> usize {
        self.shares.lock().unwrap_or_else(|e| e.into_inner()).get(&sender).copied().unwrap_or(0)
    }

    /// An offer of `n` bytes from `sender` was queued.
    pub(crate) fn add_share(&self, sender: ConnId, n: usize) {
        *self.shares.lock().unwrap_or_else(|e| e.into_inner()).entry(sender).or_default() += n;
    }

    /// Offers taken off the queue: `(sender, bytes)` leave their senders' shares.
    pub(crate) fn drop_shares(&self, taken: &[(ConnId, usize)]) {
        if taken.is_empty() {
            return;
        }
        let mut shares = self.shares.lock().unwrap_or_else(|e| e.into_inner());
        for (sender, n) in taken {
            if let Some(held) = shares.get_mut(sender) {
                *held = held.saturating_sub(*n);
                if *held == 0 {
                    shares.remove(sender);
                }
            }
        }
    }

    /// Whether offers from other connections are queued here.
    pub(crate) fn has_shares(&self) -> bool {
        !self.shares.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    }

    /// When the queue last made progress, Unix ms.
    pub(crate) fn progress(&self) -> i64 {
        self.progress.load(Ordering::Relaxed)
    }

    /// The queue made progress at `now` (Unix ms).
    pub(crate) fn progressed(&self, now: i64) {
        self.progress.store(now, Ordering::Relaxed);
    }

    /// Bytes received and not decoded yet.
    pub(crate) fn input(&self) -> usize {
        match self.input.load(Ordering::Relaxed) {
            RELEASED => 0,
            n => n,
        }
    }

    /// A message of `n` bytes was queued; returns what the caller must add to the output budget.
    pub(crate) fn queue(&self, n: usize) -> usize {
        let before = self.queued.fetch_add(n, Ordering::Relaxed);
        excess(before + n) - excess(before)
    }

    /// `n` queued bytes were written: they leave the meter and the output budget, unless a cut
    /// already released them.
    pub(crate) fn written(&self, n: usize, counters: &Counters) {
        if n == 0 {
            return;
        }
        if let Ok(before) = self.queued.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| q.checked_sub(n)) {
            counters.output.sub(excess(before) - excess(before - n));
        }
    }

    /// The connection now holds `held` undecoded bytes; returns the node's input total when it
    /// grew. A released meter counts nothing (its connection is going away).
    pub(crate) fn hold_input(&self, held: usize, counters: &Counters) -> Option<usize> {
        let update = |before: usize| (before != RELEASED && before != held).then_some(held);
        let before = self.input.fetch_update(Ordering::Relaxed, Ordering::Relaxed, update).ok()?;
        let (before, now) = (excess(before), excess(held));
        if now > before {
            Some(counters.input.add(now - before))
        } else {
            counters.input.sub(before - now);
            None
        }
    }

    /// Releases everything this connection holds from the node's budgets (cut or closed).
    pub(crate) fn release_all(&self, counters: &Counters) {
        let queued = self.queued.swap(0, Ordering::Relaxed);
        counters.output.sub(excess(queued));
        drop(std::mem::take(&mut *self.shares.lock().unwrap_or_else(|e| e.into_inner())));
        let input = match self.input.swap(RELEASED, Ordering::Relaxed) {
            RELEASED => 0,
            n => n,
        };
        counters.input.sub(excess(input));
        counters.released.fetch_add((queued + input) as u64, Ordering::Relaxed);
    }
}

/// The driver's live counters; names in brackets are the metric names they will be exported as.
#[derive(Debug)]
pub struct Counters {
    listeners: [ListenerCounters; 6],
    /// Slow consumers cut for exceeding their own outbound bound (`nodus_slow_consumer_cuts_total`).
    pub(crate) slow_consumer_cuts: AtomicU64,
    /// Undecoded input over all connections (`nodus_buffered_input_bytes`).
    pub(crate) input: Budget,
    /// Queued output over all connections (`nodus_buffered_output_bytes`).
    pub(crate) output: Budget,
    /// Bytes released by cut and closed connections, ever (the tick gives memory back to the
    /// system after large releases).
    pub(crate) released: AtomicU64,
}

impl Counters {
    /// Zeroed counters with the budgets of `limits`.
    pub(crate) fn new(limits: &Limits) -> Counters {
        Counters {
            listeners: Default::default(),
            slow_consumer_cuts: AtomicU64::new(0),
            input: Budget::new(limits.max_buffered_input_bytes),
            output: Budget::new(limits.max_buffered_output_bytes),
            released: AtomicU64::new(0),
        }
    }

    /// The counters of one listener.
    pub(crate) fn listener(&self, kind: ListenerKind) -> &ListenerCounters {
        &self.listeners[kind.index()]
    }

    /// A consistent-enough copy of every counter, for tests and reports.
    pub fn snapshot(&self) -> Snapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let listener = |kind: ListenerKind| {
            let l = self.listener(kind);
            ListenerSnapshot {
                accepted: get(&l.accepted),
                refused: get(&l.refused),
                accept_errors: get(&l.accept_errors),
                handshake_timeouts: get(&l.handshake_timeouts),
            }
        };
        Snapshot {
            tcp: listener(ListenerKind::Tcp),
            unix: listener(ListenerKind::Unix),
            cluster: listener(ListenerKind::Cluster),
            tls: listener(ListenerKind::Tls),
            dial: listener(ListenerKind::Dial),
            slow_consumer_cuts: get(&self.slow_consumer_cuts),
            input_bytes: self.input.used(),
            input_peak_bytes: self.input.peak(),
            input_cuts: get(&self.input.cuts),
            output_bytes: self.output.used(),
            output_peak_bytes: self.output.peak(),
            output_cuts: get(&self.output.cuts),
        }
    }
}

/// One listener's counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListenerSnapshot {
    /// Connections admitted.
    pub accepted: u64,
    /// Connections closed at once because the listener was full.
    pub refused: u64,
    /// Failed `accept` calls.
    pub accept_errors: u64,
    /// Connections closed for a missing first message.
    pub handshake_timeouts: u64,
}

/// Every driver counter at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The client TCP listener.
    pub tcp: ListenerSnapshot,
    /// The Unix socket.
    pub unix: ListenerSnapshot,
    /// The plain cluster listener.
    pub cluster: ListenerSnapshot,
    /// The TLS cluster listener.
    pub tls: ListenerSnapshot,
    /// Links this node dialed.
    pub dial: ListenerSnapshot,
    /// Connections cut for exceeding their own outbound bound.
    pub slow_consumer_cuts: u64,
    /// Undecoded input bytes now, over all connections.
    pub input_bytes: usize,
    /// The most undecoded input bytes ever held at once.
    pub input_peak_bytes: usize,
    /// Connections cut to keep within `max_buffered_input_bytes`.
    pub input_cuts: u64,
    /// Queued output bytes now, over all connections.
    pub output_bytes: usize,
    /// The most queued output bytes ever held at once.
    pub output_peak_bytes: usize,
    /// Connections cut to keep within `max_buffered_output_bytes`.
    pub output_cuts: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters() -> Counters {
        Counters::new(&crate::Config::default().limits)
    }

    #[test]
    fn bytes_released_by_a_cut_are_not_released_again_by_the_writer() {
        const A: usize = BUDGET_ALLOWANCE_BYTES;
        let c = counters();
        let m = Meter::default();
        // Within the allowance nothing is counted node-wide.
        assert_eq!(m.queue(A), 0);
        c.output.add(m.queue(300));
        assert_eq!((m.queued(), c.output.used()), (A + 300, 300));
        m.written(100, &c);
        assert_eq!((m.queued(), c.output.used()), (A + 200, 200));
        m.release_all(&c);
        assert_eq!((m.queued(), c.output.used()), (0, 0));
        // The writer finishes a write it started before the cut: nothing is released twice.
        m.written(200, &c);
        assert_eq!((m.queued(), c.output.used()), (0, 0));
        assert_eq!(c.snapshot().output_peak_bytes, 300);
    }

    #[test]
    fn input_follows_what_a_connection_holds_beyond_the_allowance() {
        const A: usize = BUDGET_ALLOWANCE_BYTES;
        let c = counters();
        let m = Meter::default();
        assert_eq!(m.hold_input(A / 2, &c), None);
        assert_eq!(m.hold_input(A + 1000, &c), Some(1000));
        assert_eq!(m.hold_input(A + 400, &c), None);
        assert_eq!((m.input(), c.input.used()), (A + 400, 400));
        m.release_all(&c);
        // The reader of a cut connection may account once more before it notices: nothing counts.
        assert_eq!(m.hold_input(A + 50, &c), None);
        m.release_all(&c);
        assert_eq!((m.input(), c.input.used()), (0, 0));
        assert_eq!(c.snapshot().input_peak_bytes, 1000);
    }
}
