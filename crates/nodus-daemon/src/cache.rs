//! The message cache: messages for expected services that have not registered yet, each with a
//! time to live, bounded in count and bytes. Expired entries are never handed out: they are given
//! back as expired (by [`nodus_control::expiry::is_expired`], the one rule), so the router can tell
//! their senders. Every entry has
//! a sequence number, so a journal of puts and removals (see `cache_store`) can make the cache
//! survive restarts.

use crate::router::ConnId;
use nodus_control::expiry::is_expired;
use nodus_wire::node::Permissions;
use nodus_wire::Message;
use std::collections::{HashMap, VecDeque};

/// Cache bounds.
#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    /// Most messages held, all services together.
    pub max_messages: usize,
    /// Most bytes held (approximate message sizes), all services together.
    pub max_bytes: usize,
}

#[derive(Debug)]
struct Entry {
    seq: u64,
    expires_at: i64,
    size: usize,
    origin: ConnId,
    perms: Permissions,
    msg: Message,
}

/// A cached message handed out to its service.
#[derive(Debug)]
pub struct Taken {
    /// The entry's sequence number.
    pub seq: u64,
    /// The connection that sent it (it may be gone).
    pub origin: ConnId,
    /// What the sender was allowed when it sent it.
    pub perms: Permissions,
    /// The message.
    pub msg: Message,
}

/// A cached message as kept on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// The entry's sequence number.
    pub seq: u64,
    /// The service it waits for.
    pub service: String,
    /// When it expires, Unix ms.
    pub expires_at: i64,
    /// What the sender was allowed.
    pub perms: Permissions,
    /// The message.
    pub msg: Message,
}

/// Per-service FIFO queues of cached messages.
#[derive(Debug)]
pub struct Cache {
    limits: CacheLimits,
    queues: HashMap<String, VecDeque<Entry>>,
    count: usize,
    bytes: usize,
    next_seq: u64,
}

impl Cache {
    /// An empty cache with the given bounds.
    pub fn new(limits: CacheLimits) -> Self {
        Cache { limits, queues: HashMap::new(), count: 0, bytes: 0, next_seq: 1 }
    }

    /// Stores `msg` (sent by connection `origin` with `perms`) for `service` until `expires_at`
    /// (Unix ms). Expired entries are dropped first to make room (they are added to `dropped`).
    /// Returns the entry's sequence number, or `None`, storing nothing, when the cache
    /// is full.
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        service: &str,
        origin: ConnId,
        perms: Permissions,
        msg: Message,
        expires_at: i64,
        now: i64,
        dropped: &mut Vec<Taken>,
    ) -> Option<u64> {
        let size = msg.approx_size();
        if !self.fits(size) {
            dropped.extend(self.sweep(now));
            if !self.fits(size) {
                return None;
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.insert(service, Entry { seq, expires_at, size, origin, perms, msg });
        Some(seq)
    }

    fn fits(&self, size: usize) -> bool {
        self.count < self.limits.max_messages && self.bytes + size <= self.limits.max_bytes
    }

    fn insert(&mut self, service: &str, e: Entry) {
        self.count += 1;
        self.bytes += e.size;
        self.queues.entry(service.to_string()).or_default().push_back(e);
    }

    /// Puts back entries kept on disk by an earlier run (their sender is gone: `origin`).
    /// Expired entries and entries past the bounds are skipped; returns the numbers of those.
    pub fn restore(&mut self, entries: Vec<Stored>, origin: ConnId, now: i64) -> Vec<u64> {
        let mut skipped = Vec::new();
        for s in entries {
            self.next_seq = self.next_seq.max(s.seq + 1);
            let size = s.msg.approx_size();
            if is_expired(s.expires_at, now) || !self.fits(size) {
                skipped.push(s.seq);
                continue;
            }
            let e = Entry { seq: s.seq, expires_at: s.expires_at, size, origin, perms: s.perms, msg: s.msg };
            self.insert(&s.service, e);
        }
        skipped
    }

    /// Removes and returns every message for `service`, oldest first: unexpired ones first, the
    /// expired ones (dropped, never to be delivered) in the second list.
    pub fn take(&mut self, service: &str, now: i64) -> (Vec<Taken>, Vec<Taken>) {
        let Some(queue) = self.queues.remove(service) else { return (Vec::new(), Vec::new()) };
        let mut out = Vec::with_capacity(queue.len());
        let mut expired = Vec::new();
        for e in queue {
            self.count -= 1;
            self.bytes -= e.size;
            let taken = Taken { seq: e.seq, origin: e.origin, perms: e.perms, msg: e.msg };
            if is_expired(e.expires_at, now) {
                expired.push(taken);
            } else {
                out.push(taken);
            }
        }
        (out, expired)
    }

    /// Drops expired entries; returns them.
    pub fn sweep(&mut self, now: i64) -> Vec<Taken> {
        let mut dropped = Vec::new();
        for q in self.queues.values_mut() {
            if !q.iter().any(|e| is_expired(e.expires_at, now)) {
                continue;
            }
            for e in std::mem::take(q) {
                if is_expired(e.expires_at, now) {
                    self.count -= 1;
                    self.bytes -= e.size;
                    dropped.push(Taken { seq: e.seq, origin: e.origin, perms: e.perms, msg: e.msg });
                } else {
                    q.push_back(e);
                }
            }
        }
        self.queues.retain(|_, q| !q.is_empty());
        dropped
    }

    /// Every entry as it should be on disk (for compaction).
    pub fn snapshot(&self) -> Vec<Stored> {
        let mut all: Vec<Stored> = self
            .queues
            .iter()
            .flat_map(|(service, q)| {
                q.iter().map(|e| Stored {
                    seq: e.seq,
                    service: service.clone(),
                    expires_at: e.expires_at,
                    perms: e.perms,
                    msg: e.msg.clone(),
                })
            })
            .collect();
        all.sort_by_key(|s| s.seq);
        all
    }

    /// Number of messages held.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(n: usize) -> CacheLimits {
        CacheLimits { max_messages: n, max_bytes: 1 << 20 }
    }

    fn push(c: &mut Cache, service: &str, cmd: &str, expires_at: i64, now: i64) -> Option<u64> {
        c.push(service, 7, Permissions::NONE, Message::new(cmd), expires_at, now, &mut Vec::new())
    }

    #[test]
    fn expired_entries_are_never_returned() {
        let mut c = Cache::new(limits(10));
        assert_eq!(push(&mut c, "a", "ONE", 100, 0), Some(1));
        assert_eq!(push(&mut c, "a", "TWO", 300, 0), Some(2));
        let (got, expired) = c.take("a", 200);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].origin, got[0].msg.command.as_str(), got[0].seq), (7, "TWO", 2));
        assert_eq!(
            expired.iter().map(|t| (t.seq, t.origin, t.msg.command.as_str())).collect::<Vec<_>>(),
            [(1, 7, "ONE")]
        );
        assert!(c.is_empty());
    }

    #[test]
    fn bounded_and_sweeps_to_make_room() {
        let mut c = Cache::new(limits(2));
        assert!(push(&mut c, "a", "A", 100, 0).is_some());
        assert!(push(&mut c, "b", "B", 1000, 0).is_some());
        assert!(push(&mut c, "b", "C", 1000, 50).is_none());
        let mut dropped = Vec::new();
        let seq = c.push("b", 1, Permissions::NONE, Message::new("C"), 1000, 150, &mut dropped);
        assert!(seq.is_some(), "the expired entry makes room");
        assert_eq!(dropped.iter().map(|t| t.seq).collect::<Vec<_>>(), [1]);
        assert_eq!(c.len(), 2);
        assert!(c.sweep(999).is_empty());
        let swept = c.sweep(1000);
        assert_eq!(swept.iter().map(|t| t.msg.command.as_str()).collect::<Vec<_>>(), ["B", "C"], "oldest first");
        assert!(c.is_empty());
    }

    #[test]
    fn a_snapshot_restores_into_an_equal_cache() {
        let mut c = Cache::new(limits(10));
        push(&mut c, "a", "ONE", 100, 0);
        push(&mut c, "b", "TWO", 300, 0);
        push(&mut c, "a", "THREE", 300, 0);
        let snap = c.snapshot();
        assert_eq!(snap.iter().map(|s| s.seq).collect::<Vec<_>>(), [1, 2, 3]);
        let mut d = Cache::new(limits(10));
        assert_eq!(d.restore(snap, 0, 150), [1], "expired on the way");
        assert_eq!(d.len(), 2);
        assert_eq!(push(&mut d, "a", "FOUR", 300, 150), Some(4), "numbers continue after the restored ones");
        let (got, _) = d.take("a", 150);
        assert_eq!(got.iter().map(|t| t.msg.command.as_str()).collect::<Vec<_>>(), ["THREE", "FOUR"]);
    }
}
