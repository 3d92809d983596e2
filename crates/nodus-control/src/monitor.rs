//! Which monitored components answered, and which did not before the request's `expires_at`.
//!
//! The driver records every monitoring request it sends ([`MonitorTracker::expect`]), feeds every
//! answer ([`MonitorTracker::answer`]) and ticks at [`MonitorTracker::next_deadline`]; each
//! expected answer ends in exactly one [`Poll`]: `Answered` (with the echoed `sync_time` checked)
//! or `NotAnswering` once `expires_at` has passed. An answer arriving at or after `expires_at`
//! counts as none, by the same rule every queue applies ([`crate::expiry::is_expired`]).

use crate::control::{Body, ControlMessage, MonitoringResult};
use crate::expiry;
use crate::id::ComponentId;
use std::collections::HashMap;

/// Default bound on monitoring answers awaited at once.
pub const DEFAULT_MAX_POLLS: usize = 4096;

/// How one expected answer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Poll {
    /// The component answered in time.
    Answered {
        /// Conversation id of the request.
        request: u64,
        /// Who answered.
        component: ComponentId,
        /// Its answer.
        result: MonitoringResult,
        /// Milliseconds from sending to answer.
        latency_ms: i64,
    },
    /// The component did not answer before `expires_at`.
    NotAnswering {
        /// Conversation id of the request.
        request: u64,
        /// The silent component.
        component: ComponentId,
        /// The expiry it missed.
        expires_at: i64,
    },
}

impl Poll {
    /// The component this outcome is about.
    pub fn component(&self) -> ComponentId {
        match self {
            Poll::Answered { component, .. } | Poll::NotAnswering { component, .. } => *component,
        }
    }
}

/// Why the tracker refused a request or an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MonitorError {
    /// Too many answers are awaited already.
    #[error("{max} monitoring answers are already awaited: wait for them or raise the bound")]
    Full {
        /// The bound.
        max: usize,
    },
    /// This component is already asked under this request id.
    #[error("component {component} is already being asked under request {request}")]
    Duplicate {
        /// Conversation id.
        request: u64,
        /// Component.
        component: ComponentId,
    },
    /// A request without expiry could never report a silent component.
    #[error("a monitoring request needs _expires_at, or a silent component could never be reported")]
    NoExpiry,
    /// The request expired before it was sent.
    #[error("the monitoring request expired before it was sent")]
    Expired,
    /// The answer does not echo the request's `sync_time`.
    #[error("the answer of component {component} echoes sync_time={got}, not {expected}")]
    SyncMismatch {
        /// The answering component.
        component: ComponentId,
        /// The request's `sync_time`.
        expected: i64,
        /// The echoed one.
        got: i64,
    },
    /// Nobody awaits this answer (never asked, already answered, or already reported silent).
    #[error("no monitoring answer from component {component} is awaited under request {request}")]
    Unexpected {
        /// Conversation id.
        request: u64,
        /// Component.
        component: ComponentId,
    },
    /// The message is not a monitoring answer.
    #[error("not a monitoring answer (RESULT spec=monitoring with component=...)")]
    NotAnAnswer,
}

#[derive(Debug, Clone, Copy)]
struct Expect {
    sync_time: i64,
    sent_at: i64,
    expires_at: i64,
}

/// The monitoring answers awaited by one driver.
#[derive(Debug)]
pub struct MonitorTracker {
    pending: HashMap<(u64, ComponentId), Expect>,
    max: usize,
}

impl MonitorTracker {
    /// A tracker awaiting at most `max_polls` answers at once.
    pub fn new(max_polls: usize) -> Self {
        MonitorTracker { pending: HashMap::new(), max: max_polls }
    }

    /// Number of answers awaited.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// True when nothing is awaited.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Records that `component` was asked under `request` with `sync_time`, to answer before
    /// `expires_at`.
    ///
    /// Fails when the request has no expiry or has expired, the pair is already awaited, or the
    /// tracker is full.
    pub fn expect(
        &mut self,
        request: u64,
        component: ComponentId,
        sync_time: i64,
        expires_at: i64,
        now: i64,
    ) -> Result<(), MonitorError> {
        if expires_at == 0 {
            return Err(MonitorError::NoExpiry);
        }
        if expiry::is_expired(expires_at, now) {
            return Err(MonitorError::Expired);
        }
        if self.pending.contains_key(&(request, component)) {
            return Err(MonitorError::Duplicate { request, component });
        }
        if self.pending.len() >= self.max {
            return Err(MonitorError::Full { max: self.max });
        }
        self.pending.insert((request, component), Expect { sync_time, sent_at: now, expires_at });
        Ok(())
    }

    /// An answer from `component` to `request` arrived at `now`.
    ///
    /// Gives `NotAnswering` when it came too late; fails when nobody awaits it or its `sync_time`
    /// is not the request's (the answer is then still awaited).
    pub fn answer(
        &mut self,
        request: u64,
        component: ComponentId,
        result: MonitoringResult,
        now: i64,
    ) -> Result<Poll, MonitorError> {
        let key = (request, component);
        let Some(e) = self.pending.get(&key).copied() else {
            return Err(MonitorError::Unexpected { request, component });
        };
        if expiry::is_expired(e.expires_at, now) {
            self.pending.remove(&key);
            return Ok(Poll::NotAnswering { request, component, expires_at: e.expires_at });
        }
        if result.sync_time != e.sync_time {
            return Err(MonitorError::SyncMismatch { component, expected: e.sync_time, got: result.sync_time });
        }
        self.pending.remove(&key);
        Ok(Poll::Answered { request, component, result, latency_ms: now.saturating_sub(e.sent_at) })
    }

    /// [`MonitorTracker::answer`] for a decoded control message; `from` names the component when
    /// the answer does not (a program that does not know its component id).
    ///
    /// Fails as `answer` does, or with [`MonitorError::NotAnAnswer`] for any other message.
    pub fn answer_message(
        &mut self,
        msg: &ControlMessage,
        from: Option<ComponentId>,
        now: i64,
    ) -> Result<Poll, MonitorError> {
        let Body::MonitoringResult { component, result } = &msg.body else { return Err(MonitorError::NotAnAnswer) };
        let component = component.or(from).ok_or(MonitorError::NotAnAnswer)?;
        self.answer(msg.header.id, component, result.clone(), now)
    }

    /// Time passes: every awaited answer whose `expires_at` has come is reported as not
    /// answering, in (request, component) order.
    pub fn tick(&mut self, now: i64) -> Vec<Poll> {
        let mut due: Vec<(u64, ComponentId, i64)> = self
            .pending
            .iter()
            .filter(|(_, e)| expiry::is_expired(e.expires_at, now))
            .map(|((r, c), e)| (*r, *c, e.expires_at))
            .collect();
        due.sort();
        for (r, c, _) in &due {
            self.pending.remove(&(*r, *c));
        }
        due.into_iter()
            .map(|(request, component, expires_at)| Poll::NotAnswering { request, component, expires_at })
            .collect()
    }

    /// When [`MonitorTracker::tick`] must next be called, if anything is awaited.
    pub fn next_deadline(&self) -> Option<i64> {
        self.pending.values().map(|e| e.expires_at).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Header;

    fn id(n: u64) -> ComponentId {
        ComponentId::new(n).unwrap()
    }

    fn result(sync_time: i64) -> MonitoringResult {
        MonitoringResult { sync_time, name: "n".into(), host: "h".into(), is_running: true, message: String::new() }
    }

    #[test]
    fn answered_in_time_and_silent_ones_reported_at_expiry() {
        let mut t = MonitorTracker::new(10);
        for c in 1..=3 {
            t.expect(7, id(c), 1_000, 2_000, 1_000).unwrap();
        }
        assert_eq!(t.next_deadline(), Some(2_000));
        let p = t.answer(7, id(2), result(1_000), 1_040).unwrap();
        assert_eq!(p, Poll::Answered { request: 7, component: id(2), result: result(1_000), latency_ms: 40 });
        assert!(t.tick(1_999).is_empty(), "nothing is due before expires_at");
        let silent = t.tick(2_000);
        assert_eq!(
            silent,
            vec![
                Poll::NotAnswering { request: 7, component: id(1), expires_at: 2_000 },
                Poll::NotAnswering { request: 7, component: id(3), expires_at: 2_000 },
            ]
        );
        assert!(t.is_empty());
        assert_eq!(t.next_deadline(), None);
        // A late answer after the report finds nobody waiting.
        assert_eq!(
            t.answer(7, id(1), result(1_000), 2_001),
            Err(MonitorError::Unexpected { request: 7, component: id(1) })
        );
    }

    #[test]
    fn an_answer_at_expiry_counts_as_none() {
        let mut t = MonitorTracker::new(10);
        t.expect(1, id(1), 5, 100, 0).unwrap();
        assert_eq!(
            t.answer(1, id(1), result(5), 100),
            Ok(Poll::NotAnswering { request: 1, component: id(1), expires_at: 100 })
        );
        assert!(t.tick(1_000).is_empty(), "reported exactly once");
    }

    #[test]
    fn sync_time_must_be_echoed() {
        let mut t = MonitorTracker::new(10);
        t.expect(1, id(1), 5, 100, 0).unwrap();
        assert_eq!(
            t.answer(1, id(1), result(6), 10),
            Err(MonitorError::SyncMismatch { component: id(1), expected: 5, got: 6 })
        );
        assert!(
            matches!(t.answer(1, id(1), result(5), 11), Ok(Poll::Answered { .. })),
            "still awaited after a bad echo"
        );
    }

    #[test]
    fn requests_are_bounded_and_need_an_expiry() {
        let mut t = MonitorTracker::new(1);
        assert_eq!(t.expect(1, id(1), 0, 0, 0), Err(MonitorError::NoExpiry));
        assert_eq!(t.expect(1, id(1), 0, 10, 10), Err(MonitorError::Expired));
        t.expect(1, id(1), 0, 10, 0).unwrap();
        assert_eq!(t.expect(1, id(1), 0, 10, 0), Err(MonitorError::Duplicate { request: 1, component: id(1) }));
        assert_eq!(t.expect(2, id(1), 0, 10, 0), Err(MonitorError::Full { max: 1 }));
    }

    #[test]
    fn decoded_answers_are_matched_by_tag_id_and_component() {
        let mut t = MonitorTracker::new(4);
        t.expect(9, id(4), 77, 500, 0).unwrap();
        let header = Header { id: 9, pid: Some(id(4)), creator: "a:svc".into(), created_at: 1, expires_at: 500 };
        // A program that does not know its component id: the driver names it by connection.
        let msg = ControlMessage { header, body: Body::MonitoringResult { component: None, result: result(77) } };
        assert!(matches!(t.answer_message(&msg, Some(id(4)), 3), Ok(Poll::Answered { .. })));
        let kill = ControlMessage { header: Header::default(), body: Body::Kill { target: None } };
        assert_eq!(t.answer_message(&kill, None, 3), Err(MonitorError::NotAnAnswer));
    }
}
