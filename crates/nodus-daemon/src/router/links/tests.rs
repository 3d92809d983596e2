//! The link protocol on a virtual clock, routers wired by hand: handshakes, who may speak for
//! whom, clock samples, cluster-wide commands, bounds.
use super::*;
use crate::router::tests::config;
use crate::router::RouterConfig;
use crate::topology::RecordKey;

fn dialed() -> Origin {
    Origin::Dialed { addr: "127.0.0.1:1".into(), tls: false }
}

fn inbound() -> Origin {
    Origin::Cluster { peer: "127.0.0.1:2".parse().unwrap(), tls: false }
}

fn setup(name: &str, secret: &str) -> RouterConfig {
    let mut c = config(name, &[]);
    c.links.secret = secret.into();
    c.links.heartbeat = std::time::Duration::from_millis(100);
    c
}

fn router(name: &str, secret: &str) -> Router {
    Router::new(setup(name, secret), 1)
}

fn sent(out: &mut Vec<Action>, conn: ConnId) -> Vec<Message> {
    let mut got = Vec::new();
    out.retain(|a| match a {
        Action::Deliver(c, m) | Action::Offer { to: c, msg: m, .. } if *c == conn => {
            got.push(m.clone());
            false
        }
        _ => true,
    });
    got
}

/// Links `a` (dialing on its conn 10) with `b` (accepting on its conn 20), passing messages both
/// ways until neither has more to say; returns everything that crossed.
fn link(a: &mut Router, b: &mut Router, now: i64) -> Vec<Message> {
    let (mut oa, mut ob) = (Vec::new(), Vec::new());
    let mut crossed = Vec::new();
    a.dial(10, dialed(), &mut oa);
    b.connect(20, inbound());
    for _ in 0..4 {
        for m in sent(&mut oa, 10) {
            crossed.push(m.clone());
            b.handle(20, m, now, &mut ob);
        }
        for m in sent(&mut ob, 20) {
            crossed.push(m.clone());
            a.handle(10, m, now, &mut oa);
        }
    }
    crossed
}

fn register(r: &mut Router, conn: ConnId, name: &str, commands: &str) {
    r.connect(conn, Origin::Internal);
    let mut out = Vec::new();
    r.handle(conn, Message::new("REGISTER").param("service", name).param("version", 1), 0, &mut out);
    r.handle(conn, Message::new("COMMANDS").param("list", commands), 0, &mut out);
}

#[test]
fn wrong_secret_is_refused_and_the_secret_never_crosses_the_wire() {
    let (mut a, mut b) = (router("a", "s1"), router("b", "s2"));
    let crossed = link(&mut a, &mut b, 0);
    assert!(a.links.is_empty() && b.links.is_empty());
    assert!(crossed.iter().any(|m| m.command == "DISCONNECT" && m.get("reason") == Some("secret")));
    let (mut a, mut b) = (router("a", "topsecret"), router("b", "topsecret"));
    let crossed = link(&mut a, &mut b, 0);
    assert_eq!((a.links.get("b"), b.links.get("a")), (Some(&10), Some(&20)));
    let commands: Vec<&str> = crossed.iter().take(3).map(|m| m.command.as_str()).collect();
    assert_eq!(commands, ["CONNECT", "ACCEPT", "CONFIRM"]);
    for m in &crossed {
        assert!(m.params.values().all(|v| !v.contains("topsecret")), "{m:?}");
    }
    // One end with a secret and one without never link.
    let (mut a, mut b) = (router("a", "s"), router("b", ""));
    let crossed = link(&mut a, &mut b, 0);
    assert!(a.links.is_empty(), "b has no secret and accepts anyone, a does not");
    assert!(crossed.iter().any(|m| m.command == "DISCONNECT" && m.get("reason") == Some("secret")));
    let (mut a, mut b) = (router("a", ""), router("b", "s"));
    link(&mut a, &mut b, 0);
    assert!(a.links.is_empty() && b.links.is_empty());
}

#[test]
fn a_forged_peer_without_the_secret_cannot_link_with_a_replayed_or_made_up_confirm() {
    let mut b = router("b", "s");
    let mut out = Vec::new();
    b.connect(20, inbound());
    b.handle(
        20,
        LinkMsg::Connect { server: "x".into(), version: 1, addr: String::new(), nonce: "n".into() }.to_message(),
        0,
        &mut out,
    );
    assert_eq!(sent(&mut out, 20)[0].command, "ACCEPT");
    assert!(b.links.is_empty(), "not before the dialer proves it holds the secret");
    b.handle(20, LinkMsg::Confirm { proof: "00".repeat(32) }.to_message(), 0, &mut out);
    assert_eq!(sent(&mut out, 20)[0].get("reason"), Some("secret"));
    assert!(out.contains(&Action::Close(20)) && b.links.is_empty());
    // Traffic instead of CONFIRM is refused the same way.
    b.connect(21, inbound());
    b.handle(
        21,
        LinkMsg::Connect { server: "x".into(), version: 1, addr: String::new(), nonce: "n".into() }.to_message(),
        0,
        &mut out,
    );
    b.handle(21, Message::new("SHUTDOWN"), 0, &mut out);
    assert!(!out.contains(&Action::Shutdown) && b.links.is_empty());
}

#[test]
fn one_link_per_pair_both_ends_keep_the_one_dialed_by_the_smaller_name() {
    let accept = |server: &str| {
        LinkMsg::Accept { server: server.into(), addr: String::new(), nonce: "n".into(), proof: None }.to_message()
    };
    let connect = |server: &str| {
        LinkMsg::Connect { server: server.into(), version: 1, addr: String::new(), nonce: "n".into() }.to_message()
    };
    let mut b = router("b", "");
    let mut out = Vec::new();
    // b already has a link from its own dial (conn 1); a's dial (conn 2) arrives: a < b wins.
    b.dial(1, dialed(), &mut out);
    b.handle(1, accept("a"), 0, &mut out);
    assert_eq!(b.links.get("a"), Some(&1));
    b.connect(2, inbound());
    b.handle(2, connect("a"), 0, &mut out);
    assert_eq!(b.links.get("a"), Some(&2));
    assert!(out.contains(&Action::Close(1)), "the losing link is closed");
    // Seen from a, the same pair: its own dial wins over b's.
    let mut a = router("a", "");
    a.connect(5, inbound());
    a.handle(5, connect("b"), 0, &mut out);
    a.dial(6, dialed(), &mut out);
    a.handle(6, accept("b"), 0, &mut out);
    assert_eq!(a.links.get("b"), Some(&6));
}

#[test]
fn a_cluster_connection_that_never_completes_its_handshake_is_closed() {
    let mut b = router("b", "s");
    let mut out = Vec::new();
    b.connect(20, inbound());
    b.connect(21, inbound());
    b.handle(
        21,
        LinkMsg::Connect { server: "x".into(), version: 1, addr: String::new(), nonce: "n".into() }.to_message(),
        0,
        &mut out,
    );
    out.clear();
    b.tick(1_000, &mut out);
    assert!(out.is_empty(), "not yet");
    b.tick(10_999, &mut out);
    assert!(out.is_empty());
    b.tick(11_000, &mut out);
    assert!(out.contains(&Action::Close(20)) && out.contains(&Action::Close(21)));
    assert!(b.conns.is_empty());
}

/// Sends `a` a ping tick at `t` and the peer's pong stamped `t1`, answered at `now` (with the
/// peer's own heartbeat, so the link stays alive).
fn pong(a: &mut Router, t: i64, t1: i64, now: i64, out: &mut Vec<Action>) {
    a.handle(10, LinkMsg::Ping { t: t1 }.to_message(), t, out);
    a.tick(t, out);
    a.handle(10, LinkMsg::Pong { t0: t, t1 }.to_message(), now, out);
}

#[test]
fn clock_offset_past_the_threshold_is_unstable_once_samples_agree_and_one_forged_pong_cannot_force_it() {
    let (mut a, mut b) = (router("a", ""), router("b", ""));
    link(&mut a, &mut b, 0);
    register(&mut a, 1, "w", "CLOCK_STABLE,CLOCK_UNSTABLE");
    let mut out = Vec::new();
    // Good samples: round trip 40 ms, the peer's clock 5 ms ahead.
    for t in [100, 200, 300] {
        pong(&mut a, t, t + 25, t + 40, &mut out);
    }
    // One forged pong claiming a clock 500 s ahead, answering a real ping.
    pong(&mut a, 400, 500_000, 440, &mut out);
    // Pongs that answer no ping at all, or impossible ones, are ignored.
    a.handle(10, LinkMsg::Pong { t0: 123, t1: 9_000_000 }.to_message(), 450, &mut out);
    pong(&mut a, 500, i64::MAX, 520, &mut out);
    a.handle(10, LinkMsg::Ping { t: 600 }.to_message(), 600, &mut out);
    a.tick(600, &mut out);
    a.handle(10, LinkMsg::Pong { t0: 600, t1: 0 }.to_message(), 600 + 20_000, &mut out);
    a.handle(10, LinkMsg::Ping { t: 700 }.to_message(), 650, &mut out);
    assert!(sent(&mut out, 1).is_empty(), "still stable");
    assert_eq!(a.max_offset_ms(), 5);
    // A peer whose clock really is off, sample after sample, makes the clock unstable.
    for t in [700, 800] {
        pong(&mut a, t, t + 520, t + 40, &mut out);
    }
    let got = sent(&mut out, 1);
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].command.as_str(), got[0].get("max_offset_ms")), ("CLOCK_UNSTABLE", Some("500")));
    for t in [900, 1000, 1100] {
        pong(&mut a, t, t + 30, t + 40, &mut out);
    }
    assert_eq!(sent(&mut out, 1)[0].command, "CLOCK_STABLE");
    // An unsynchronised system clock only counts when the configuration requires NTP.
    a.set_ntp(Some(false), &mut out);
    assert!(sent(&mut out, 1).is_empty());
    a.policy.clock_require_ntp = true;
    a.set_ntp(None, &mut out);
    a.set_ntp(Some(false), &mut out);
    let got = sent(&mut out, 1);
    assert_eq!((got[0].command.as_str(), got[0].get("ntp")), ("CLOCK_UNSTABLE", Some("unsynchronized")));
}

#[test]
fn silent_links_are_declared_dead_by_the_detector_and_their_requests_fail() {
    let (mut a, mut b) = (router("a", ""), router("b", ""));
    link(&mut a, &mut b, 0);
    let mut out = Vec::new();
    for t in (100..=1000).step_by(100) {
        a.handle(10, LinkMsg::Ping { t }.to_message(), t, &mut out);
        a.tick(t, &mut out);
    }
    assert!(a.links.contains_key("b"));
    // A request in flight over the link.
    a.connect(3, Origin::Internal);
    a.handle(3, Message::new("ASK").to("b:svc").with_id(8), 1000, &mut out);
    out.clear();
    let mut t = 1000;
    while a.links.contains_key("b") {
        t += 100;
        a.tick(t, &mut out);
        assert!(t < 3000, "detected within the 3 s budget");
    }
    assert!(out.contains(&Action::Close(10)));
    assert!(t - 1000 <= 1000, "silence detected after {} ms", t - 1000);
    let failed = sent(&mut out, 3);
    assert_eq!((failed[0].get("code"), failed[0].envelope.reply_to), (Some("disconnected"), 8));
}

#[test]
fn messages_past_the_hop_limit_are_answered_not_dropped_in_silence() {
    let (mut a, mut b) = (router("a", ""), router("b", ""));
    link(&mut a, &mut b, 0);
    register(&mut b, 3, "svc", "LOOPY");
    let mut out = Vec::new();
    let mut m = Message::new("LOOPY").to("b:svc").with_id(4);
    m.from = nodus_wire::Address::new("a", "x");
    m.envelope.hops = 17;
    b.handle(20, m.clone(), 0, &mut out);
    assert!(sent(&mut out, 3).is_empty());
    let back = sent(&mut out, 20);
    assert_eq!((back[0].command.as_str(), back[0].get("reason")), ("SERVICE_UNAVAILABLE", Some("hop_limit")));
    m.envelope.hops = 3;
    m.envelope.perms = Permissions::of(&[Permission::Send]);
    b.handle(20, m, 0, &mut out);
    assert_eq!(sent(&mut out, 3).len(), 1);
}

/// a - b - c in a line: b's view, with links to a (conn 20) and c (conn 30).
fn line() -> Router {
    let mut b = router("b", "s");
    for (name, conn) in [("a", 20), ("c", 30)] {
        let mut peer = router(name, "s");
        let mut out = Vec::new();
        peer.dial(1, dialed(), &mut out);
        b.connect(conn, inbound());
        for _ in 0..3 {
            for m in sent(&mut out, 1) {
                b.handle(conn, m, 0, &mut out);
            }
            for m in sent(&mut out, conn) {
                peer.handle(1, m, 0, &mut out);
            }
        }
        assert_eq!(b.links.get(name), Some(&conn));
    }
    b
}

#[test]
fn a_link_cannot_speak_for_this_node_nor_for_a_neighbour_it_does_not_route_for() {
    let mut b = line();
    register(&mut b, 3, "svc", "HI");
    let mut out = Vec::new();
    let from = |server: &str| {
        let mut m = Message::new("HI").to("b:svc");
        m.from = nodus_wire::Address::new(server, "x");
        m.envelope.perms = Permissions::of(&[Permission::Send]);
        m
    };
    for spoof in ["b", "c", "nobody"] {
        b.handle(20, from(spoof), 0, &mut out);
    }
    assert!(sent(&mut out, 3).is_empty(), "spoofed senders are dropped");
    assert_eq!(b.stats().refused, 3);
    b.handle(20, from("a"), 0, &mut out);
    assert_eq!(sent(&mut out, 3)[0].from, nodus_wire::Address::new("a", "x"));
}

#[test]
fn forwarded_requests_keep_what_their_origin_stamped_only_over_authenticated_links() {
    let stop_from = |node: &str, perms: Permissions| {
        let mut m = Message::new("STOP").to("b:").with_id(1);
        m.from = nodus_wire::Address::new(node, "");
        m.envelope.perms = perms;
        m
    };
    let mut out = Vec::new();
    // Authenticated (secret) link from an admin node: the owner's STOP runs.
    let mut b = line();
    b.handle(20, stop_from("a", Permissions::ALL), 0, &mut out);
    assert!(out.contains(&Action::Shutdown));
    // An anonymous client's request stays anonymous.
    let mut b = line();
    out.clear();
    b.handle(20, stop_from("a", Permissions::of(&[Permission::Send, Permission::Status])), 0, &mut out);
    assert_eq!(sent(&mut out, 20)[0].get("code"), Some("forbidden"));
    // Not in admin_nodes: admin is dropped.
    let mut c = setup("b", "s");
    c.links.admin_nodes = vec!["c".into()];
    let mut b = line_with(c);
    b.handle(20, stop_from("a", Permissions::ALL), 0, &mut out);
    assert!(!out.contains(&Action::Shutdown));
    assert_eq!(sent(&mut out, 20)[0].get("code"), Some("forbidden"));
    // No secret, no TLS: whatever was stamped, at most what anonymous clients get.
    let (mut a, mut b) = (router("a", ""), router("b", ""));
    link(&mut a, &mut b, 0);
    out.clear();
    b.handle(20, stop_from("a", Permissions::ALL), 0, &mut out);
    assert!(!out.contains(&Action::Shutdown));
    assert_eq!(sent(&mut out, 20)[0].get("code"), Some("forbidden"));
    b.handle(20, LinkMsg::Shutdown.to_message(), 0, &mut out);
    b.handle(20, LinkMsg::Forget { server: "b2".into() }.to_message(), 0, &mut out);
    assert!(!out.contains(&Action::Shutdown), "cluster-wide commands need an authenticated admin node");
}

fn line_with(c: RouterConfig) -> Router {
    let mut b = Router::new(c, 1);
    let mut peer = router("a", "s");
    let mut out = Vec::new();
    peer.dial(1, dialed(), &mut out);
    b.connect(20, inbound());
    for _ in 0..3 {
        for m in sent(&mut out, 1) {
            b.handle(20, m, 0, &mut out);
        }
        for m in sent(&mut out, 20) {
            peer.handle(1, m, 0, &mut out);
        }
    }
    assert!(b.links.contains_key("a"));
    b
}

#[test]
fn cluster_wide_commands_from_an_authenticated_node_not_in_admin_nodes_are_ignored() {
    let with_admins = |admins: &[&str]| {
        let mut c = setup("b", "s");
        c.links.admin_nodes = admins.iter().map(|n| n.to_string()).collect();
        line_with(c)
    };
    let mut out = Vec::new();
    // `a` proved the secret, but the config allows only `c`: its FORGET and SHUTDOWN change nothing.
    let mut b = with_admins(&["c"]);
    b.handle(20, LinkMsg::Forget { server: "a".into() }.to_message(), 0, &mut out);
    b.handle(20, LinkMsg::Shutdown.to_message(), 0, &mut out);
    assert!(b.topology.known().contains_key("a"), "FORGET from a node not in admin_nodes was obeyed");
    assert!(!out.contains(&Action::Shutdown), "SHUTDOWN from a node not in admin_nodes was obeyed");
    assert!(sent(&mut out, 20).iter().all(|m| m.command != "FORGET" && m.command != "SHUTDOWN"));
    // The same commands from the same link once the config names `a`: obeyed.
    let mut b = with_admins(&["a"]);
    out.clear();
    b.handle(20, LinkMsg::Forget { server: "a".into() }.to_message(), 0, &mut out);
    assert!(!b.topology.known().contains_key("a"));
    let mut b = with_admins(&["a"]);
    b.handle(20, LinkMsg::Shutdown.to_message(), 0, &mut out);
    assert!(out.contains(&Action::Shutdown));
}

#[test]
fn requests_forwarded_by_this_node_carry_the_senders_permissions() {
    let mut b = line();
    let mut out = Vec::new();
    b.connect(5, Origin::Tcp { peer: "127.0.0.1:9".parse().unwrap() });
    b.handle(5, Message::new("PING").to("a:").with_id(1), 0, &mut out);
    let fwd = sent(&mut out, 20);
    assert_eq!(fwd[0].envelope.perms, Permissions::of(&[Permission::Status, Permission::Send, Permission::Register]));
    assert_eq!(fwd[0].envelope.hops, 1);
    // A reply coming back loses the stamp before it reaches the client.
    let mut reply = Message::new("PONG").tap(fwd[0].envelope.id);
    reply.from = nodus_wire::Address::new("a", "node");
    reply.envelope.perms = Permissions::ALL;
    b.handle(20, reply, 0, &mut out);
    let got = sent(&mut out, 5);
    assert_eq!((got[0].command.as_str(), got[0].envelope.perms), ("PONG", Permissions::NONE));
}

trait Tap {
    fn tap(self, reply_to: u64) -> Self;
}

impl Tap for Message {
    fn tap(mut self, reply_to: u64) -> Self {
        self.envelope.reply_to = reply_to;
        self
    }
}

#[test]
fn gossip_without_the_right_mac_or_past_the_node_bound_changes_nothing_and_is_not_saved() {
    let mut c = setup("b", "s");
    c.links.max_nodes = 4;
    let mut b = line_with(c);
    let mut out = Vec::new();
    let record = |name: &str, key: Option<&RecordKey>| {
        let mut r = crate::topology::NodeRecord {
            addr: format!("{name}:1"),
            incarnation: 1,
            seq: 1,
            links: Default::default(),
            services: Default::default(),
            apps: Default::default(),
            mac: Vec::new(),
        };
        if let Some(k) = key {
            k.sign(name, &mut r);
        }
        r
    };
    let gossip = |records: BTreeMap<String, crate::topology::NodeRecord>| {
        LinkMsg::Gossip { records: rmp_serde::to_vec(&records).unwrap().into() }.to_message()
    };
    // The known nodes are saved at the next tick, once, whatever changed since the last.
    b.tick(0, &mut out);
    assert_eq!(out.iter().filter(|a| matches!(a, Action::SaveNodes(_))).count(), 1, "the links are saved");
    out.clear();
    // A huge incarnation for a real node, unsigned: refused.
    let mut takeover = record("a", None);
    takeover.incarnation = i64::MAX;
    b.handle(20, gossip(BTreeMap::from([("a".to_string(), takeover)])), 0, &mut out);
    b.tick(1, &mut out);
    assert!(!out.iter().any(|a| matches!(a, Action::SaveNodes(_))));
    // Many signed fake nodes: only up to the bound, and only those are saved.
    let key = RecordKey::from_secret("s");
    let fakes: BTreeMap<String, _> = (0..4).map(|i| (format!("f{i}"), record(&format!("f{i}"), Some(&key)))).collect();
    b.handle(20, gossip(fakes), 0, &mut out);
    assert!(!out.iter().any(|a| matches!(a, Action::SaveNodes(_))), "not on the path of the merge");
    b.tick(2, &mut out);
    let saved: Vec<_> =
        out.iter().filter_map(|a| if let Action::SaveNodes(n) = a { Some(n.len()) } else { None }).collect();
    assert_eq!(saved.last(), Some(&3), "b, a and two more make four: {saved:?}");
    assert_eq!(b.topology.known().len(), 4);
}

#[test]
fn cluster_wide_commands_from_an_authenticated_admin_node_are_obeyed_and_passed_on() {
    let mut b = line();
    let mut out = Vec::new();
    b.handle(20, LinkMsg::Forget { server: "c".into() }.to_message(), 0, &mut out);
    assert!(!b.topology.known().contains_key("c"));
    b.handle(20, LinkMsg::Shutdown.to_message(), 0, &mut out);
    assert!(out.contains(&Action::Shutdown));
}

#[test]
fn forget_from_a_client_is_refused_for_a_node_nobody_knows_and_passed_on_for_a_known_one() {
    let mut b = line();
    b.connect(5, Origin::Internal);
    let mut out = Vec::new();
    let forget = |key: &str, value: &str, id: u64| Message::new("FORGET").param(key, value).with_id(id);
    b.handle(5, forget("server", "nosuchnode", 1), 0, &mut out);
    let got = sent(&mut out, 5);
    assert_eq!((got[0].command.as_str(), got[0].get("code")), ("ERROR", Some("unknown_node")), "{got:?}");
    assert_eq!((got[0].get("server"), got[0].envelope.reply_to), (Some("nosuchnode"), 1));
    assert!(got[0].get("message").unwrap().contains("nosuchnode"), "{got:?}");
    b.handle(5, forget("ip", "10.255.0.1", 2), 0, &mut out);
    assert_eq!(sent(&mut out, 5)[0].get("code"), Some("unknown_node"));
    b.handle(5, forget("server", "b", 3), 0, &mut out);
    assert_eq!(sent(&mut out, 5)[0].command, "INVALID", "a node does not forget itself");
    assert!(sent(&mut out, 20).is_empty() && sent(&mut out, 30).is_empty(), "nothing passed on: {out:?}");
    assert_eq!(b.topology.known().len(), 3);
    // A known node is forgotten here and everywhere; a second FORGET finds it gone.
    b.handle(5, forget("server", "c", 4), 0, &mut out);
    let got = sent(&mut out, 5);
    assert_eq!((got[0].command.as_str(), got[0].get("server")), ("FORGOTTEN", Some("c")));
    assert!(sent(&mut out, 20).iter().any(|m| m.command == "FORGET" && m.get("server") == Some("c")));
    assert!(!b.topology.known().contains_key("c"));
    b.handle(5, forget("server", "c", 5), 0, &mut out);
    assert_eq!(sent(&mut out, 5)[0].get("code"), Some("unknown_node"));
    // Without `_id` the sender is told all the same (as a text-form script would be).
    b.handle(5, Message::new("FORGET").param("server", "nosuchnode"), 0, &mut out);
    assert_eq!(sent(&mut out, 5)[0].get("code"), Some("unknown_node"));
}

#[test]
fn a_message_that_expires_on_its_way_is_refused_at_the_hop_never_delivered_nor_passed_on() {
    let mut b = line();
    register(&mut b, 3, "svc", "HI");
    let from_a = |to: &str, expires_at: i64| {
        let mut m = Message::new("HI").to(to).with_id(7);
        m.from = nodus_wire::Address::new("a", "x");
        m.envelope.perms = Permissions::of(&[Permission::Send]);
        m.envelope.expires_at = expires_at;
        m
    };
    let mut out = Vec::new();
    // For a service here, and for node c through here: at its expiry, neither goes further and
    // the sender, on the link it came from, is told where it expired.
    for to in ["b:svc", "c:svc"] {
        b.handle(20, from_a(to, 1_000), 1_000, &mut out);
        assert!(sent(&mut out, 3).is_empty() && sent(&mut out, 30).is_empty(), "{to}: not delivered nor forwarded");
        let back = sent(&mut out, 20);
        assert_eq!(back.len(), 1, "{to}: {back:?}");
        assert_eq!((back[0].command.as_str(), back[0].get("code")), ("ERROR", Some("expired")), "{to}");
        assert_eq!(back[0].envelope.reply_to, 7);
        assert!(back[0].get("message").is_some_and(|t| t.contains("node b")), "{:?}", back[0]);
    }
    assert_eq!(b.stats().expired, 2);
    // A millisecond earlier both go on; 0 never expires.
    b.handle(20, from_a("b:svc", 1_000), 999, &mut out);
    b.handle(20, from_a("c:svc", 0), 5_000, &mut out);
    assert_eq!(sent(&mut out, 3).len(), 1);
    assert_eq!(sent(&mut out, 30).len(), 1);
    // An error that expired is dropped, not answered with another error.
    let mut e = from_a("b:svc", 1_000).tap(9);
    e.command = "ERROR".into();
    e.envelope.id = 0;
    b.handle(20, e, 2_000, &mut out);
    assert!(sent(&mut out, 20).is_empty() && sent(&mut out, 3).is_empty());
}

#[test]
fn a_burst_of_local_changes_is_one_version_at_the_end_of_the_interval_and_a_clock_going_back_holds_nothing() {
    let mut b = line();
    let seq = b.topology.local().seq;
    // b published when its first link came up at 0: changes until 100 (its second link, three
    // services) wait, and become one version. What it passes on of others' records is paced.
    let mut out = Vec::new();
    assert_eq!(b.flush_at(), Some(FLOOD_PACE_MS));
    b.flush(FLOOD_PACE_MS, &mut out);
    out.clear();
    for (conn, name) in [(3, "x"), (4, "y"), (5, "z")] {
        b.connect(conn, Origin::Internal);
        b.handle(conn, Message::new("REGISTER").param("service", name).param("version", 1), 20, &mut out);
    }
    assert!(sent(&mut out, 20).is_empty() && sent(&mut out, 30).is_empty(), "nothing before the interval");
    assert_eq!(b.flush_at(), Some(MIN_RECORD_INTERVAL_MS));
    b.flush(MIN_RECORD_INTERVAL_MS - 1, &mut out);
    assert!(sent(&mut out, 20).is_empty());
    b.flush(MIN_RECORD_INTERVAL_MS, &mut out);
    for link in [20, 30] {
        let gossip = sent(&mut out, link);
        assert_eq!(gossip.len(), 1, "one message per link");
        let LinkMsg::Gossip { records } = LinkMsg::try_from(&gossip[0]).unwrap() else { panic!("not gossip") };
        let records: BTreeMap<String, crate::topology::NodeRecord> = rmp_serde::from_slice(&records).unwrap();
        assert_eq!(records["b"].seq, seq + 1, "one version for four changes");
        assert_eq!((records["b"].services.len(), records["b"].links.len()), (3, 2));
    }
    assert_eq!(b.flush_at(), None);
    // A change right after, then the clock goes back an hour: it is published at once, not in
    // an hour.
    b.connect(6, Origin::Internal);
    b.handle(6, Message::new("REGISTER").param("service", "w").param("version", 1), 150, &mut out);
    assert!(b.flush_at().is_some());
    b.tick(150 - 3_600_000, &mut out);
    assert_eq!(sent(&mut out, 20).iter().filter(|m| m.command == "GOSSIP").count(), 1);
    assert_eq!(b.topology.local().seq, seq + 2);
    assert_eq!(b.flush_at(), None);
}
