//! Fuzzes gossip records: the payload of a `GOSSIP` message on a cluster link, decoded the way
//! the router decodes it (`rmp_serde` into `name → NodeRecord`) and then handed to a real
//! `Router` (node `a`, linked to `b` over a handshake with the cluster secret) through its
//! public API, as `b` would send it.
//!
//! Input: the payload. It is sent twice as it is (records without a MAC, or with the MAC the
//! input wrote, which only the seeds' real gossip gets right), then twice with every record that
//! has no MAC signed with the cluster's `RecordKey`, so fuzzed records get past the MAC check
//! into the merge.
//! Asserts: no panic (overflows included); decoding allocates within `allocation_bound` of the
//! payload's size; decoded records re-encode to the same records; records none of which carries
//! a valid MAC change nothing (no flood, nothing saved); the router only delivers valid
//! messages, each fitting one frame, to connections that exist; the same gossip twice changes
//! nothing the second time (records never go back in time, nothing is re-flooded or re-saved);
//! this node's own record, as it gossips it, never goes back in `(incarnation, seq)`, keeps its
//! incarnation unless a validly signed newer claim to be this node came in (and then moves past
//! that claim), stays one its peers accept, and a local change still moves it forward (once the
//! router is flushed at the time it asks for: versions are rate-limited, floods paced).
#![no_main]

use std::collections::BTreeMap;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nodus_daemon::auth::Origin;
use nodus_daemon::router::{Action, ConnId, Router, FLOOD_PACE_MS, MIN_RECORD_INTERVAL_MS};
use nodus_daemon::topology::{NodeRecord, Topology};
use nodus_fuzz::cluster::{self, INCARNATION, LINK, ME, PEER};
use nodus_fuzz::{alloc::peak_during, allocation_bound};
use nodus_wire::node::{LinkMsg, NODE_SERVICE};
use nodus_wire::{binary, Address, Message, DEFAULT_MAX_FRAME};

/// A built-in service on `a`, used to make a local change.
const CLIENT: ConnId = 1;
/// The time of every input.
const NOW: i64 = INCARNATION + 1_000;

type Records = BTreeMap<String, NodeRecord>;

/// What one message to `a` made it do.
struct Effect {
    /// `a`'s own records in the gossip it sent.
    own: Vec<NodeRecord>,
    /// It flooded gossip or saved its known nodes.
    changed: bool,
}

/// Checks the router's output.
fn check_actions(out: &[Action]) -> Effect {
    let mut effect = Effect { own: Vec::new(), changed: false };
    for action in out {
        let m = match action {
            Action::Deliver(conn, m) => {
                assert!(*conn == LINK || *conn == CLIENT, "delivered to connection {conn}, which does not exist");
                m
            }
            Action::SaveNodes(_) => {
                effect.changed = true;
                continue;
            }
            _ => continue,
        };
        if let Err(e) = m.validate() {
            panic!("the router sent an invalid message ({e}): {m:?}");
        }
        if let Err(e) = binary::encode(m, &mut BytesMut::new(), DEFAULT_MAX_FRAME) {
            panic!("the router sent a message no frame can carry: {e}");
        }
        if m.command == "GOSSIP" {
            effect.changed = true;
            let records: Records = rmp_serde::from_slice(&m.payload).expect("the router's own gossip decodes");
            effect.own.push(records.get(ME).cloned().expect("a node's gossip carries its own record"));
        }
    }
    effect
}

/// `a`'s own record as it gossips it: never back in time, its incarnation unchanged unless a
/// valid claim moved it, and acceptable to a peer. Returns the newest.
fn check_own(own: &[NodeRecord], mut last: (i64, u64), claimed: bool) -> (i64, u64) {
    for r in own {
        let stamp = (r.incarnation, r.seq);
        assert!(
            claimed || r.incarnation == INCARNATION,
            "a peer changed this node's incarnation without a valid claim"
        );
        assert!(stamp >= last, "this node's record went back from {last:?} to {stamp:?}");
        assert!(accepted(ME, r), "a peer refuses this node's own record {r:?}");
        last = stamp;
    }
    last
}

fn gossip(payload: Vec<u8>) -> Message {
    let mut m = LinkMsg::Gossip { records: payload.into() }.to_message();
    m.from = Address::new(PEER, NODE_SERVICE);
    m
}

/// Sends `payload` to `a` twice; the second time must change nothing.
fn send_twice(router: &mut Router, payload: &[u8], mut last: (i64, u64), claimed: bool) -> (Effect, (i64, u64)) {
    let mut out = Vec::new();
    router.handle(LINK, gossip(payload.to_vec()), NOW, &mut out);
    let first = check_actions(&out);
    last = check_own(&first.own, last, claimed);
    out.clear();
    router.handle(LINK, gossip(payload.to_vec()), NOW, &mut out);
    let again = check_actions(&out);
    assert!(!again.changed, "the same gossip changed something twice: {out:?}");
    (first, check_own(&again.own, last, claimed))
}

/// Whether a peer holding the secret takes `record` as `name`'s: its MAC is right and it is
/// plausible (the topology's own judgement, asked of a fresh one).
fn accepted(name: &str, record: &NodeRecord) -> bool {
    let mut peer = Topology::new(PEER, "", cluster::PEER_INCARNATION, cluster::record_key(), 16);
    peer.merge(BTreeMap::from([(name.to_string(), record.clone())]), NOW).rejected == 0
}

/// The stamp of a record claiming to be `a` that `a` takes as genuine, if the gossip has one
/// (gossip about more nodes than `max_nodes` is ignored whole).
fn valid_claim(records: &Records) -> Option<(i64, u64)> {
    let r = records.get(ME)?;
    (records.len() <= cluster::config(ME).links.max_nodes && accepted(ME, r)).then_some((r.incarnation, r.seq))
}

fuzz_target!(|data: &[u8]| {
    let (records, peak) = peak_during(|| rmp_serde::from_slice::<Records>(data));
    assert!(peak <= allocation_bound(data.len()), "decoding {} bytes of gossip held {peak} bytes", data.len());
    let records = records.ok();
    if let Some(records) = &records {
        let again = rmp_serde::to_vec(records).expect("records encode");
        assert_eq!(rmp_serde::from_slice::<Records>(&again).as_ref().ok(), Some(records), "record round trip");
    }

    let (mut router, _, _) = cluster::linked(NOW);
    router.connect(CLIENT, Origin::Internal);
    let mut out = Vec::new();
    let mut last = (INCARNATION, 0);

    // As written: a record without a valid MAC never changes anything.
    let key = cluster::record_key();
    let raw_claim = records.as_ref().and_then(valid_claim);
    let (effect, stamp) = send_twice(&mut router, data, last, raw_claim.is_some());
    let any_valid = records.as_ref().is_some_and(|rs| rs.iter().any(|(name, r)| key.verify(name, r)));
    assert!(any_valid || !effect.changed, "gossip with no valid MAC changed the topology");
    last = stamp;

    // Signed: every record without a MAC gets the cluster's.
    let mut claimed = raw_claim;
    if let Some(mut records) = records {
        if records.values().any(|r| r.mac.is_empty()) {
            for (name, r) in records.iter_mut().filter(|(_, r)| r.mac.is_empty()) {
                key.sign(name, r);
            }
            claimed = claimed.max(valid_claim(&records));
            let signed = rmp_serde::to_vec(&records).expect("records encode");
            last = send_twice(&mut router, &signed, last, claimed.is_some()).1;
        }
    }
    // The last step: a local change. It shows this node's record moved past any genuine claim
    // to be it (a refutation is not sent back on the link the claim came from, the only one).
    out.clear();
    router.handle(CLIENT, Message::new("REGISTER").param("service", "fuzz").param("version", 1), NOW, &mut out);
    // Versions of a node's record are at least `MIN_RECORD_INTERVAL_MS` apart and floods are
    // paced: what is due goes out when the router is flushed after that.
    for _ in 0..4 {
        let Some(due) = router.flush_at() else { break };
        let latest = NOW + MIN_RECORD_INTERVAL_MS + FLOOD_PACE_MS;
        assert!(due <= latest, "something is due at {due}, past the interval and the pace");
        router.flush(due, &mut out);
    }
    assert_eq!(router.flush_at(), None, "flushing at the times asked for leaves nothing due");
    let own = check_actions(&out).own;
    let Some(newest) = own.last() else { panic!("a local change was not gossiped") };
    let stamp = (newest.incarnation, newest.seq);
    assert!(stamp > last, "a local change did not move this node's record forward ({stamp:?} after {last:?})");
    if let Some(claim) = claimed {
        assert!(stamp > claim, "this node's record {stamp:?} did not move past a claim to be it {claim:?}");
    }
    check_own(&own, last, claimed.is_some());
});
