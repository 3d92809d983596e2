//! The message cache: messages for expected services that have not registered yet, each with a
//! time to live, bounded in count and bytes. Expired entries are never handed out.

use crate::router::ConnId;
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
    expires_at: i64,
    size: usize,
    origin: ConnId,
    msg: Message,
}

/// Per-service FIFO queues of cached messages.
#[derive(Debug)]
pub struct Cache {
    limits: CacheLimits,
    queues: HashMap<String, VecDeque<Entry>>,
    count: usize,
    bytes: usize,
}

impl Cache {
    /// An empty cache with the given bounds.
    pub fn new(limits: CacheLimits) -> Self {
        Cache { limits, queues: HashMap::new(), count: 0, bytes: 0 }
    }

    /// Stores `msg` (sent by connection `origin`) for `service` until `expires_at` (Unix ms).
    /// Expired entries are dropped first to make room. Returns false, storing nothing, when the
    /// cache is full.
    pub fn push(&mut self, service: &str, origin: ConnId, msg: Message, expires_at: i64, now: i64) -> bool {
        let size = msg.approx_size();
        if self.count + 1 > self.limits.max_messages || self.bytes + size > self.limits.max_bytes {
            self.sweep(now);
            if self.count + 1 > self.limits.max_messages || self.bytes + size > self.limits.max_bytes {
                return false;
            }
        }
        self.count += 1;
        self.bytes += size;
        self.queues.entry(service.to_string()).or_default().push_back(Entry { expires_at, size, origin, msg });
        true
    }

    /// Removes and returns every unexpired message for `service` with its sender, oldest first.
    pub fn take(&mut self, service: &str, now: i64) -> Vec<(ConnId, Message)> {
        let Some(queue) = self.queues.remove(service) else { return Vec::new() };
        let mut out = Vec::with_capacity(queue.len());
        for e in queue {
            self.count -= 1;
            self.bytes -= e.size;
            if e.expires_at > now {
                out.push((e.origin, e.msg));
            }
        }
        out
    }

    /// Drops expired entries; returns how many.
    pub fn sweep(&mut self, now: i64) -> usize {
        let mut dropped = 0;
        self.queues.retain(|_, q| {
            q.retain(|e| {
                let keep = e.expires_at > now;
                if !keep {
                    dropped += 1;
                    self.count -= 1;
                    self.bytes -= e.size;
                }
                keep
            });
            !q.is_empty()
        });
        dropped
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

    #[test]
    fn expired_entries_are_never_returned() {
        let mut c = Cache::new(limits(10));
        assert!(c.push("a", 7, Message::new("ONE"), 100, 0));
        assert!(c.push("a", 7, Message::new("TWO"), 300, 0));
        let got = c.take("a", 200);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0, got[0].1.command.as_str()), (7, "TWO"));
        assert!(c.is_empty());
    }

    #[test]
    fn bounded_and_sweeps_to_make_room() {
        let mut c = Cache::new(limits(2));
        assert!(c.push("a", 1, Message::new("A"), 100, 0));
        assert!(c.push("b", 1, Message::new("B"), 1000, 0));
        assert!(!c.push("b", 1, Message::new("C"), 1000, 50));
        assert!(c.push("b", 1, Message::new("C"), 1000, 150), "the expired entry makes room");
        assert_eq!(c.len(), 2);
    }
}
