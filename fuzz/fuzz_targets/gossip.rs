//! Fuzzes gossip records: the payload of a `GOSSIP` message on a cluster link, decoded the way
//! the router decodes it (`rmp_serde` into `name → NodeRecord`) and then handed to a real
//! `Router` (node `a`, linked to `b`) through its public API, as a peer would send it.
//!
//! Input: the payload.
//! Asserts: no panic (overflows included); decoding allocates within `allocation_bound` of the
//! payload's size; decoded records re-encode to the same records; the router only delivers
//! valid messages, each fitting one frame, to connections that exist; the same gossip twice
//! changes nothing the second time (records never go back in time, nothing is re-flooded or
//! re-saved); this node's own record, as it gossips it, keeps its incarnation and never goes
//! back in sequence, and a local change still moves it forward.
#![no_main]

use std::collections::BTreeMap;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nodus_daemon::auth::Origin;
use nodus_daemon::router::{Action, ConnId, Router, RouterLimits};
use nodus_daemon::topology::NodeRecord;
use nodus_daemon::Config;
use nodus_fuzz::seeds::cluster::{INCARNATION, ME, PEER};
use nodus_fuzz::{alloc::peak_during, allocation_bound};
use nodus_wire::{binary, Address, Message, DEFAULT_MAX_FRAME};

/// The link to the neighbour (dialed by `a`).
const LINK: ConnId = 10;
/// A built-in service on `a`, used to make a local change.
const CLIENT: ConnId = 1;
/// The time of every input.
const NOW: i64 = INCARNATION + 1_000;

type Records = BTreeMap<String, NodeRecord>;

/// Checks the router's output; returns `a`'s own records in the gossip it sent.
fn check_actions(out: &[Action]) -> Vec<NodeRecord> {
    let mut own = Vec::new();
    for action in out {
        let Action::Deliver(conn, m) = action else { continue };
        assert!(*conn == LINK || *conn == CLIENT, "delivered to connection {conn}, which does not exist");
        if let Err(e) = m.validate() {
            panic!("the router sent an invalid message ({e}): {m:?}");
        }
        if let Err(e) = binary::encode(m, &mut BytesMut::new(), DEFAULT_MAX_FRAME) {
            panic!("the router sent a message no frame can carry: {e}");
        }
        if m.command == "GOSSIP" {
            let records: Records = rmp_serde::from_slice(&m.payload).expect("the router's own gossip decodes");
            own.push(records.get(ME).cloned().expect("a node's gossip carries its own record"));
        }
    }
    own
}

/// `a`'s own record never goes back and keeps its incarnation; returns the highest sequence.
fn check_own(own: &[NodeRecord], mut seq: u64) -> u64 {
    for r in own {
        assert_eq!(r.incarnation, INCARNATION, "a peer changed this node's incarnation");
        assert!(r.seq >= seq, "this node's record went back from seq {seq} to {}", r.seq);
        seq = r.seq;
    }
    seq
}

fn gossip(payload: &[u8]) -> Message {
    let mut m = Message::new("GOSSIP").with_payload(payload.to_vec());
    m.from = Address::new(PEER, "node");
    m
}

fuzz_target!(|data: &[u8]| {
    let (records, peak) = peak_during(|| rmp_serde::from_slice::<Records>(data));
    assert!(peak <= allocation_bound(data.len()), "decoding {} bytes of gossip held {peak} bytes", data.len());
    if let Ok(records) = &records {
        let again = rmp_serde::to_vec(records).expect("records encode");
        assert_eq!(rmp_serde::from_slice::<Records>(&again).as_ref().ok(), Some(records), "record round trip");
    }

    let config = Config::default();
    let limits = RouterLimits::from_config(&config.limits);
    let mut router = Router::new(ME, &[], limits, config.cluster.clone(), "127.0.0.1:1".into(), INCARNATION);
    let mut out = Vec::new();
    router.dial(LINK, Origin::Dialed { addr: "127.0.0.1:2".into(), tls: false }, &mut out);
    router.handle(LINK, Message::new("ACCEPT").param("server", PEER).param("addr", "127.0.0.1:2"), NOW, &mut out);
    router.connect(CLIENT, Origin::Internal);
    let seq = check_own(&check_actions(&out), 0);

    out.clear();
    router.handle(LINK, gossip(data), NOW, &mut out);
    let seq = check_own(&check_actions(&out), seq);

    out.clear();
    router.handle(LINK, gossip(data), NOW, &mut out);
    let seq = check_own(&check_actions(&out), seq);
    for action in &out {
        match action {
            Action::Deliver(LINK, m) if m.command == "GOSSIP" => panic!("the same gossip was flooded twice"),
            Action::SaveNodes(_) => panic!("the same gossip changed the known nodes twice"),
            _ => {}
        }
    }

    out.clear();
    router.handle(CLIENT, Message::new("REGISTER").param("service", "fuzz").param("version", 1), NOW, &mut out);
    let own = check_actions(&out);
    let Some(last) = own.last() else { panic!("a local change was not gossiped") };
    assert!(last.seq > seq, "a local change did not move this node's record forward (seq {} after {seq})", last.seq);
    check_own(&own, seq);
});
