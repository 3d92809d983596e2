//! The one expiry rule of nodus: a message (or a queued entry derived from one) whose
//! `expires_at` has passed is dropped, never executed, and its sender is told.
//!
//! Every place a message can wait (the router, the cache of an expected service, an app's queue,
//! the task store, the control plane) calls [`is_expired`] or [`admit`] with its own `now`, so
//! they all agree on the boundary: `expires_at == 0` never expires, and a message is expired from
//! the millisecond `expires_at` itself (`expires_at <= now`).

use nodus_wire::Message;

/// The `code` of the error a sender gets for an expired message.
pub const EXPIRED_CODE: &str = "expired";

/// True when something with this `expires_at` (Unix ms, 0 = never) must not run at `now`.
pub fn is_expired(expires_at: i64, now: i64) -> bool {
    expires_at != 0 && expires_at <= now
}

/// Milliseconds left before `expires_at` at `now`: `None` when it never expires, `Some(0)` once
/// expired.
pub fn remaining(expires_at: i64, now: i64) -> Option<i64> {
    (expires_at != 0).then(|| expires_at.saturating_sub(now).max(0))
}

/// The moment a wait for something with this `expires_at` must end when the waiter allows at
/// most `max_wait_ms`: the earlier of the two.
pub fn deadline(expires_at: i64, now: i64, max_wait_ms: i64) -> i64 {
    let bound = now.saturating_add(max_wait_ms.max(0));
    if expires_at == 0 {
        bound
    } else {
        expires_at.min(bound)
    }
}

/// What a queue does with a message at `now`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// Not expired: keep it, deliver it, run it.
    Live,
    /// Expired: drop it. `reply` is the error to send back to its sender, or `None` when the
    /// message is itself an error report (an error is never answered with an error).
    Expired {
        /// `ERROR code=expired` for the sender, correlated by `reply_to`; the caller stamps `from`.
        /// (Boxed: the common outcome, `Live`, stays one word.)
        reply: Option<Box<Message>>,
    },
}

/// Applies the expiry rule to `msg` at `now`; `place` names where it waited (for example
/// `"the router"`, `"the queue of app echo"`), so the sender learns where it ran out of time.
pub fn admit(msg: &Message, now: i64, place: &str) -> Admit {
    if !is_expired(msg.envelope.expires_at, now) {
        return Admit::Live;
    }
    Admit::Expired { reply: expired_reply(msg, now, place).map(Box::new) }
}

/// The error telling the sender of `msg` that it expired at `place`: `ERROR code=expired` with
/// the command, when it expired and a hint, correlated by `reply_to`. `None` when `msg` is itself
/// an error report.
pub fn expired_reply(msg: &Message, now: i64, place: &str) -> Option<Message> {
    if is_error_report(&msg.command) {
        return None;
    }
    let text = format!(
        "the message expired in {place} before it was executed (_expires_at={} <= now={now}); \
         send it again with a later _expires_at",
        msg.envelope.expires_at
    );
    Some(msg.reply("ERROR").param("code", EXPIRED_CODE).param("command", &msg.command).param("message", text))
}

/// True for the commands that report a failure and therefore must never be answered with one.
pub fn is_error_report(command: &str) -> bool {
    matches!(command, "ERROR" | "INVALID" | "UNKNOWN" | "SERVICE_UNAVAILABLE" | "QUITTING")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundary_is_inclusive_and_zero_never_expires() {
        assert!(!is_expired(0, i64::MAX));
        assert!(!is_expired(1_000, 999));
        assert!(is_expired(1_000, 1_000), "expired from the millisecond expires_at itself");
        assert!(is_expired(1_000, 1_001));
        // Negative timestamps are valid instants (before 1970), not "unset".
        assert!(is_expired(-5, 0));
    }

    #[test]
    fn remaining_and_deadline() {
        assert_eq!(remaining(0, 10), None);
        assert_eq!(remaining(100, 40), Some(60));
        assert_eq!(remaining(100, 400), Some(0));
        assert_eq!(deadline(0, 1_000, 500), 1_500);
        assert_eq!(deadline(1_200, 1_000, 500), 1_200);
        assert_eq!(deadline(9_000, 1_000, 500), 1_500);
        assert_eq!(deadline(0, i64::MAX - 1, 500), i64::MAX, "no overflow");
    }

    #[test]
    fn expired_message_is_dropped_and_its_sender_told() {
        let mut m = Message::new("WORK").with_id(7);
        m.from = nodus_wire::Address::new("a", "client");
        m.envelope.expires_at = 1_000;
        assert_eq!(admit(&m, 999, "the router"), Admit::Live);
        let Admit::Expired { reply: Some(r) } = admit(&m, 1_000, "the queue of app echo") else {
            panic!("an expired request must be answered");
        };
        assert_eq!(r.command, "ERROR");
        assert_eq!(r.get("code"), Some("expired"));
        assert_eq!(r.get("command"), Some("WORK"));
        assert_eq!(r.envelope.reply_to, 7);
        assert_eq!(r.to, m.from);
        assert!(r.get("message").unwrap().contains("the queue of app echo"));
    }

    #[test]
    fn an_expired_error_is_dropped_silently() {
        for cmd in ["ERROR", "INVALID", "UNKNOWN", "SERVICE_UNAVAILABLE", "QUITTING"] {
            let mut m = Message::new(cmd);
            m.envelope.expires_at = 1;
            assert_eq!(admit(&m, 2, "the router"), Admit::Expired { reply: None }, "{cmd}");
        }
    }
}
