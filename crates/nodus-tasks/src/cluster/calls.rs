//! Requests a node has sent and not yet seen answered: their ids, what each was for, and when
//! to send one again or give it up. Pure: `now` is an argument.
//!
//! Every request of the protocol is answered, so a request with no answer was lost (or its
//! answer was): it is sent again, with the same id, after `timeout`, up to its retry budget,
//! then reported failed. Receivers handle every request idempotently, so a request that
//! arrives twice does no harm, and an answer that arrives after its request was given up is
//! recognised as late (its id is no longer here).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::msg::{Body, Packet};
use crate::task::UnixMs;

struct Call<K> {
    kind: K,
    body: Body,
    deadline: UnixMs,
    timeout: Duration,
    retries_left: u32,
}

/// What became of an unanswered request at its deadline.
#[derive(Debug)]
pub enum Expired<K> {
    /// Send it again (same id).
    Resend(String, Packet),
    /// Its retries are spent: it failed.
    Failed(String, u64, K),
}

/// The requests in flight of one node.
pub struct Calls<K> {
    next_id: u64,
    calls: BTreeMap<(String, u64), Call<K>>,
    deadlines: BTreeSet<(UnixMs, String, u64)>,
}

impl<K> std::fmt::Debug for Calls<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Calls").field("in_flight", &self.calls.len()).finish()
    }
}

impl<K> Calls<K> {
    /// No calls; ids start after `first_id` (pick it at random per start, so a restarted node
    /// does not mistake a late answer to its previous life's request for an answer to its own).
    pub fn new(first_id: u64) -> Calls<K> {
        Calls { next_id: first_id.max(1), calls: BTreeMap::new(), deadlines: BTreeSet::new() }
    }

    /// Starts a request to `peer`: returns the packet to send. It is sent again every
    /// `timeout` while unanswered, `retries` times, then fails.
    pub fn start(&mut self, peer: &str, body: Body, kind: K, now: UnixMs, timeout: Duration, retries: u32) -> Packet {
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let id = self.next_id;
        let deadline = now.plus(timeout);
        self.deadlines.insert((deadline, peer.to_string(), id));
        let packet = Packet::new(id, body.clone());
        self.calls.insert((peer.to_string(), id), Call { kind, body, deadline, timeout, retries_left: retries });
        packet
    }

    /// The answer to `id` from `peer` arrived: the call ends. `None`: not a call in flight
    /// (a late or a stray answer).
    pub fn answered(&mut self, peer: &str, id: u64) -> Option<K> {
        let key = (peer.to_string(), id);
        let call = self.calls.remove(&key)?;
        self.deadlines.remove(&(call.deadline, key.0, key.1));
        Some(call.kind)
    }

    /// The call's kind, if it is in flight.
    pub fn kind(&self, peer: &str, id: u64) -> Option<&K> {
        self.calls.get(&(peer.to_string(), id)).map(|c| &c.kind)
    }

    /// Ends every call to `peer` (the relationship with it ended): their kinds.
    pub fn drop_peer(&mut self, peer: &str) -> Vec<(u64, K)> {
        let ids: Vec<u64> =
            self.calls.range((peer.to_string(), 0)..=(peer.to_string(), u64::MAX)).map(|((_, id), _)| *id).collect();
        ids.into_iter().filter_map(|id| self.answered(peer, id).map(|k| (id, k))).collect()
    }

    /// Ends the calls for which `pred` holds: their peers, ids and kinds.
    pub fn drop_where(&mut self, mut pred: impl FnMut(&str, &K) -> bool) -> Vec<(String, u64, K)> {
        let keys: Vec<(String, u64)> =
            self.calls.iter().filter(|((p, _), c)| pred(p, &c.kind)).map(|(k, _)| k.clone()).collect();
        keys.into_iter().filter_map(|(p, id)| self.answered(&p, id).map(|k| (p, id, k))).collect()
    }

    /// Calls to `peer` in flight.
    pub fn count(&self, peer: &str) -> usize {
        self.calls.range((peer.to_string(), 0)..=(peer.to_string(), u64::MAX)).count()
    }

    /// Every call in flight.
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    /// Whether no call is in flight.
    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// Calls whose deadline passed: resends and failures, in deadline order.
    pub fn tick(&mut self, now: UnixMs) -> Vec<Expired<K>> {
        let mut out = Vec::new();
        while let Some((deadline, peer, id)) = self.deadlines.first().cloned() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            let key = (peer, id);
            let Some(call) = self.calls.get_mut(&key) else { continue };
            if call.retries_left == 0 {
                let call = self.calls.remove(&key).expect("present");
                out.push(Expired::Failed(key.0, id, call.kind));
                continue;
            }
            call.retries_left -= 1;
            call.deadline = now.plus(call.timeout);
            self.deadlines.insert((call.deadline, key.0.clone(), id));
            out.push(Expired::Resend(key.0, Packet::new(id, call.body.clone())));
        }
        out
    }

    /// The earliest deadline.
    pub fn next_deadline(&self) -> Option<UnixMs> {
        self.deadlines.first().map(|(d, _, _)| *d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unanswered_calls_are_resent_then_fail() {
        let mut c: Calls<&str> = Calls::new(100);
        let p = c.start("w1", Body::ManagerPing, "ping", UnixMs(0), Duration::from_millis(10), 2);
        assert_eq!(p.id, 101);
        assert_eq!(c.next_deadline(), Some(UnixMs(10)));
        assert!(c.tick(UnixMs(9)).is_empty());
        assert!(matches!(&c.tick(UnixMs(10))[..], [Expired::Resend(w, p)] if w == "w1" && p.id == 101));
        assert!(matches!(&c.tick(UnixMs(20))[..], [Expired::Resend(..)]));
        assert!(matches!(&c.tick(UnixMs(30))[..], [Expired::Failed(w, 101, "ping")] if w == "w1"));
        assert!(c.is_empty() && c.next_deadline().is_none());
    }

    #[test]
    fn answers_end_calls_and_late_ones_are_recognised() {
        let mut c: Calls<u8> = Calls::new(0);
        let a = c.start("w1", Body::ManagerPing, 1, UnixMs(0), Duration::from_millis(10), 0);
        let b = c.start("w2", Body::ManagerPing, 2, UnixMs(0), Duration::from_millis(10), 0);
        assert_eq!(c.answered("w2", a.id), None, "the id belongs to another peer's call");
        assert_eq!(c.answered("w1", a.id), Some(1));
        assert_eq!(c.answered("w1", a.id), None, "late");
        assert_eq!(c.count("w2"), 1);
        assert_eq!(c.drop_peer("w2"), vec![(b.id, 2)]);
        assert!(c.tick(UnixMs(100)).is_empty());
    }
}
