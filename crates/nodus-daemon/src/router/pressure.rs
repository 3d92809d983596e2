//! Backpressure on registered services: whether a message offered to a service's outbound queue
//! is queued, refused (`ERROR code=overloaded` to its sender), or whether the service has stopped
//! reading and is cut. Pure: the driver measures the queue and the time and asks [`Pressure::offer`].
//!
//! The rule, in the spirit of NATS and Erlang mailboxes with flow control:
//! - a message to an empty queue is always taken (when it fits `max_outbound_bytes`);
//! - past the soft mark (three quarters of `max_outbound_bytes`, or of `max_outbound_messages`),
//!   new messages from clients are refused at once, never queued nor dropped in silence;
//! - one sender may hold at most a share (a quarter of `max_outbound_bytes`) of the queue, so one
//!   sender's burst leaves room for everyone else's messages;
//! - a queue that refuses an offer and has not been written to for `stall`
//!   (`[limits] outbound_stall_secs`) belongs to a consumer that stopped reading: it is cut (the
//!   driver also cuts, on its tick, a service with others' messages queued that has not written
//!   for that long), as are connections that exceed `max_outbound_bytes` with replies and
//!   broadcasts.

/// The marks of one node, derived from its `[limits]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pressure {
    /// Queue bytes past which offers are refused.
    pub soft_bytes: usize,
    /// Queued messages past which offers are refused.
    pub soft_messages: usize,
    /// Most bytes one sender may have queued on one service.
    pub share_bytes: usize,
    /// The hard bound, bytes (`max_outbound_bytes`).
    pub max_bytes: usize,
    /// How long a queue past its soft mark may go without a write before it is cut, ms.
    pub stall_ms: i64,
}

/// What the driver knows about a service's queue when a message is offered to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queue {
    /// Bytes queued and not written yet.
    pub bytes: usize,
    /// Messages queued and not taken by the writer yet.
    pub messages: usize,
    /// Of `bytes`, those the offering sender queued.
    pub from_sender: usize,
    /// When the connection last wrote (or was created), Unix ms.
    pub last_write: i64,
}

/// The decision on one offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Queue it.
    Accept,
    /// Refuse it: the service's queue is past its soft mark.
    Full,
    /// Refuse it: this sender already holds its share of the queue.
    Share,
    /// The service stopped reading: cut it (and refuse the message).
    Stalled,
}

/// Three quarters of `n`, at least 1.
fn three_quarters(n: usize) -> usize {
    (n / 4 * 3).max(1)
}

impl Pressure {
    /// The marks for these limits (`stall_ms`: `[limits] outbound_stall_secs`).
    pub fn new(max_bytes: usize, max_messages: usize, stall_ms: i64) -> Self {
        Pressure {
            soft_bytes: three_quarters(max_bytes),
            soft_messages: three_quarters(max_messages),
            share_bytes: (max_bytes / 4).max(1),
            max_bytes,
            stall_ms,
        }
    }

    /// Decides on a message of `size` bytes offered to a queue in state `q` at `now`.
    pub fn offer(&self, q: Queue, size: usize, now: i64) -> Verdict {
        if q.bytes == 0 && q.messages == 0 {
            return if size <= self.max_bytes { Verdict::Accept } else { Verdict::Full };
        }
        let verdict = if q.from_sender > 0 && q.from_sender + size > self.share_bytes {
            Verdict::Share
        } else if q.bytes + size > self.soft_bytes || q.messages >= self.soft_messages {
            Verdict::Full
        } else {
            return Verdict::Accept;
        };
        // Refused by a queue that has not moved for the stall time: nobody is reading it.
        if now.saturating_sub(q.last_write) >= self.stall_ms {
            Verdict::Stalled
        } else {
            verdict
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: usize = 1024;

    fn marks() -> Pressure {
        // The adversarial test's node: 256 KiB per queue, a 30 s stall time.
        Pressure::new(256 * KIB, 1024, 30_000)
    }

    fn queue(bytes: usize, from_sender: usize, last_write: i64) -> Queue {
        Queue { bytes, messages: bytes.div_ceil(128 * KIB).max(usize::from(bytes > 0)), from_sender, last_write }
    }

    #[test]
    fn an_empty_queue_takes_any_message_that_fits() {
        let p = marks();
        assert_eq!(p.offer(queue(0, 0, 0), 200 * KIB, 0), Verdict::Accept);
        assert_eq!(p.offer(queue(0, 0, 0), 300 * KIB, 0), Verdict::Full);
    }

    #[test]
    fn one_burster_gets_its_share_and_others_still_get_through() {
        let p = marks();
        // The burster's first 128 KiB request is queued; its second is over its share.
        assert_eq!(p.offer(queue(0, 0, 0), 128 * KIB, 0), Verdict::Accept);
        assert_eq!(p.offer(queue(128 * KIB, 128 * KIB, 0), 128 * KIB, 1), Verdict::Share);
        // Another client's small request finds room below the soft mark.
        assert_eq!(p.offer(queue(128 * KIB, 0, 0), 200, 1), Verdict::Accept);
        // Small messages of the burster fit its share until it is used up.
        assert_eq!(p.offer(queue(10 * KIB, 10 * KIB, 0), 10 * KIB, 1), Verdict::Accept);
        assert_eq!(p.offer(queue(60 * KIB, 60 * KIB, 0), 10 * KIB, 1), Verdict::Share);
    }

    #[test]
    fn past_the_soft_mark_everyone_is_refused_until_the_service_reads() {
        let p = marks();
        assert_eq!(p.soft_bytes, 192 * KIB);
        assert_eq!(p.offer(queue(190 * KIB, 0, 0), 4 * KIB, 10), Verdict::Full);
        assert_eq!(p.offer(queue(100 * KIB, 0, 0), 4 * KIB, 10), Verdict::Accept);
        // Too many small messages count as well.
        let many = Queue { bytes: 100, messages: 768, from_sender: 0, last_write: 0 };
        assert_eq!(p.offer(many, 10, 10), Verdict::Full);
    }

    #[test]
    fn a_service_that_stops_reading_is_cut_after_the_stall_time() {
        let p = marks();
        let stuck = queue(200 * KIB, 0, 1_000);
        // Virtual time: refused while the writer may still catch up, cut once it has written
        // nothing for the whole stall time.
        assert_eq!(p.offer(stuck, 100, 1_000 + 29_999), Verdict::Full);
        assert_eq!(p.offer(stuck, 100, 1_000 + 30_000), Verdict::Stalled);
        // A queue that still takes the message is not judged, however old its last write.
        assert_eq!(p.offer(queue(100 * KIB, 0, 0), 4 * KIB, 1_000_000), Verdict::Accept);
        // A sender past its share of a stuck queue finds it stalled too.
        assert_eq!(p.offer(queue(64 * KIB, 64 * KIB, 1_000), 100, 1_000 + 30_000), Verdict::Stalled);
    }
}
