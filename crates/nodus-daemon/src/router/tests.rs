//! Deterministic tests of the routing core: no sockets, a virtual clock.
use super::*;
use crate::auth::Creds;
use crate::config::Config;

/// A router's configuration: the defaults, anonymous principals with the default permissions.
pub(super) fn config(server: &str, expected: &[&str]) -> RouterConfig {
    let c = Config::default();
    RouterConfig {
        server: server.into(),
        expected: expected.iter().map(|s| s.to_string()).collect(),
        limits: RouterLimits::from_config(&c.limits),
        links: LinkPolicy::from_config(&c),
        access: AccessPolicy::open(c.access.anonymous_permissions()),
        cluster_addr: String::new(),
        durable_cache: false,
        seed: 1,
    }
}

fn router(expected: &[&str]) -> Router {
    Router::new(config("n1", expected), 1_000)
}

fn tcp() -> Origin {
    Origin::Tcp { peer: "127.0.0.1:5000".parse().unwrap() }
}

fn unix(uid: u32) -> Origin {
    Origin::Unix { creds: Some(Creds { uid, gid: uid, pid: None }) }
}

/// A built-in `apps` service declaring its commands like the daemon's.
fn builtin_apps(r: &mut Router, conn: ConnId) {
    register(r, conn, "apps");
    r.declare_commands(
        conn,
        &[("DEPLOY", Permission::Admin), ("STOP", Permission::Admin), ("LIST", Permission::Status)],
    );
}

fn delivered(out: &mut Vec<Action>) -> Vec<(ConnId, Message)> {
    out.drain(..)
        .filter_map(|a| match a {
            Action::Deliver(c, m) | Action::Offer { to: c, msg: m, .. } => Some((c, m)),
            _ => None,
        })
        .collect()
}

fn register(r: &mut Router, conn: ConnId, name: &str) {
    r.connect(conn, Origin::Internal);
    let mut out = Vec::new();
    r.handle(conn, Message::new("REGISTER").param("service", name).param("version", 1), 1_000, &mut out);
    let got: Vec<String> = delivered(&mut out).into_iter().map(|(_, m)| m.command).collect();
    assert_eq!(got[..2], ["HELP".to_string(), "READY".to_string()]);
}

#[test]
fn request_timeout_answers_the_caller_once() {
    let mut r = router(&[]);
    register(&mut r, 1, "svc");
    r.connect(2, Origin::Internal);
    let mut out = Vec::new();
    r.handle(2, Message::new("ASK").to("svc").with_id(9), 1_000, &mut out);
    let got = delivered(&mut out);
    assert_eq!(got[0].0, 1);
    let seen_id = got[0].1.envelope.id;
    r.tick(1_000 + 299_999, &mut out);
    assert!(out.is_empty(), "not yet timed out");
    r.tick(1_000 + 300_000, &mut out);
    let got = delivered(&mut out);
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0, got[0].1.command.as_str(), got[0].1.get("code")), (2, "ERROR", Some("timeout")));
    assert_eq!(got[0].1.envelope.reply_to, 9);
    // A late reply is dropped, not delivered as a second answer.
    r.handle(1, Message::new("ANSWER").with_id(1).tap_reply_to(seen_id), 400_000, &mut out);
    assert!(delivered(&mut out).is_empty());
    assert_eq!(r.pending_len(), 0);
}

#[test]
fn equal_ids_from_different_callers_do_not_collide() {
    let mut r = router(&[]);
    register(&mut r, 1, "svc");
    r.connect(2, Origin::Internal);
    r.connect(3, Origin::Internal);
    let mut out = Vec::new();
    r.handle(2, Message::new("ASK").to("svc").with_id(5), 1_000, &mut out);
    r.handle(3, Message::new("ASK").to("svc").with_id(5), 1_000, &mut out);
    let seen: Vec<u64> = delivered(&mut out).iter().map(|(_, m)| m.envelope.id).collect();
    assert_ne!(seen[0], seen[1]);
    r.handle(1, Message::new("TWO").tap_reply_to(seen[1]), 1_000, &mut out);
    r.handle(1, Message::new("ONE").tap_reply_to(seen[0]), 1_000, &mut out);
    let got: Vec<(ConnId, String, u64)> =
        delivered(&mut out).into_iter().map(|(c, m)| (c, m.command, m.envelope.reply_to)).collect();
    assert_eq!(got, [(3, "TWO".to_string(), 5), (2, "ONE".to_string(), 5)]);
}

#[test]
fn cached_message_expires_by_ttl_on_the_virtual_clock() {
    let mut r = router(&["later"]);
    r.connect(2, Origin::Internal);
    let mut out = Vec::new();
    r.handle(2, Message::new("A").to("later").param("cache", "ttl=10"), 1_000, &mut out);
    r.handle(2, Message::new("B").to("later").param("cache", "ttl=30"), 1_000, &mut out);
    assert!(out.is_empty());
    assert_eq!(r.cached_len(), 2);
    r.tick(1_000 + 10_000, &mut out);
    assert_eq!(r.cached_len(), 1);
    // Its sender is told, once: the message was dropped, never delivered.
    let told: Vec<(ConnId, String, Option<String>, Option<String>)> = delivered(&mut out)
        .into_iter()
        .map(|(c, m)| (c, m.command.clone(), m.get("code").map(String::from), m.get("command").map(String::from)))
        .collect();
    assert_eq!(told, [(2, "ERROR".to_string(), Some("expired".to_string()), Some("A".to_string()))]);
    r.tick(1_000 + 20_000, &mut out);
    assert!(out.is_empty());
    r.connect(1, Origin::Internal);
    r.handle(1, Message::new("REGISTER").param("service", "later").param("version", 1), 12_000, &mut out);
    let cmds: Vec<String> = delivered(&mut out).into_iter().map(|(_, m)| m.command).collect();
    assert_eq!(cmds, ["HELP", "READY", "B"]);
}

#[test]
fn ttl_is_clamped_to_the_configured_range() {
    let mut r = router(&["later"]);
    r.connect(2, Origin::Internal);
    let mut out = Vec::new();
    r.handle(2, Message::new("A").to("later").param("cache", "ttl=1"), 0, &mut out);
    r.tick(9_999, &mut out);
    assert_eq!(r.cached_len(), 1, "ttl=1 is raised to the 10 s minimum");
    r.tick(10_000, &mut out);
    assert_eq!(r.cached_len(), 0);
}

#[test]
fn least_loaded_instance_wins() {
    let mut r = router(&[]);
    register(&mut r, 1, "work");
    register(&mut r, 2, "work");
    r.connect(3, Origin::Internal);
    let mut out = Vec::new();
    let mut counts = HashMap::new();
    let mut at_one = Vec::new();
    for id in 1..=10 {
        r.handle(3, Message::new("JOB").to("work").with_id(id), 1_000, &mut out);
        for (c, m) in delivered(&mut out) {
            *counts.entry(c).or_insert(0) += 1;
            if c == 1 {
                at_one.push(m.envelope.id);
            }
        }
    }
    assert_eq!((counts[&1], counts[&2]), (5, 5), "unanswered requests spread evenly");
    // Instance 1 answers everything; new work goes to it while 2 is still busy.
    for id in at_one {
        r.handle(1, Message::new("DONE").tap_reply_to(id), 1_000, &mut out);
    }
    out.clear();
    r.handle(3, Message::new("JOB").to("work").with_id(11), 1_000, &mut out);
    assert_eq!(delivered(&mut out)[0].0, 1);
}

#[test]
fn sender_is_stamped_and_expired_messages_are_refused() {
    let mut r = router(&[]);
    register(&mut r, 1, "svc");
    register(&mut r, 2, "me");
    let mut out = Vec::new();
    let mut m = Message::new("HI").to("svc");
    m.from = nodus_wire::Address::new("evil", "spoof");
    r.handle(2, m, 1_000, &mut out);
    let got = delivered(&mut out);
    assert_eq!(got[0].1.from, nodus_wire::Address::new("n1", "me"));
    let mut m = Message::new("OLD").to("svc").with_id(4);
    m.envelope.expires_at = 1_000;
    r.handle(2, m, 1_000, &mut out);
    let got = delivered(&mut out);
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0, got[0].1.get("code")), (2, Some("expired")));
}

#[test]
fn shutdown_refuses_new_requests_but_routes_replies() {
    let mut r = router(&[]);
    register(&mut r, 1, "svc");
    r.connect(2, Origin::Internal);
    let mut out = Vec::new();
    r.handle(2, Message::new("ASK").to("svc").with_id(1), 1_000, &mut out);
    let seen_id = delivered(&mut out)[0].1.envelope.id;
    r.begin_shutdown();
    r.handle(2, Message::new("ASK").to("svc").with_id(2), 1_000, &mut out);
    assert_eq!(delivered(&mut out)[0].1.command, "QUITTING");
    r.handle(1, Message::new("ANSWER").tap_reply_to(seen_id), 1_000, &mut out);
    let got = delivered(&mut out);
    assert_eq!((got[0].0, got[0].1.command.as_str(), got[0].1.envelope.reply_to), (2, "ANSWER", 1));
    assert_eq!(r.pending_len(), 0);
}

trait TapReply {
    fn tap_reply_to(self, id: u64) -> Self;
}

impl TapReply for Message {
    fn tap_reply_to(mut self, id: u64) -> Self {
        self.envelope.reply_to = id;
        self
    }
}

fn commands(out: &mut Vec<Action>, conn: ConnId) -> Vec<Message> {
    delivered(out).into_iter().filter(|(c, _)| *c == conn).map(|(_, m)| m).collect()
}

#[test]
fn anonymous_clients_cannot_stop_sniff_or_run_privileged_builtin_commands() {
    let mut c = config("n1", &[]);
    c.access.own_uid = 1000;
    let mut r = Router::new(c, 0);
    builtin_apps(&mut r, 1);
    r.connect(2, tcp());
    let mut out = Vec::new();
    for (m, need) in [
        (Message::new("STOP").with_id(1), "admin"),
        (Message::new("SHUTDOWN"), "admin"),
        (Message::new("FORGET").param("server", "x"), "admin"),
        (Message::new("SNIFF"), "sniff"),
        (Message::new("DEPLOY").to("apps").param("name", "x").with_id(2), "admin"),
        (Message::new("STOP").to("apps").param("name", "x"), "admin"),
    ] {
        let cmd = m.command.clone();
        let id = m.envelope.id;
        r.handle(2, m, 1_000, &mut out);
        assert!(!out.contains(&Action::Shutdown), "{cmd} must not stop the node");
        let got = commands(&mut out, 2);
        assert_eq!(got.len(), 1, "{cmd}: one answer, nothing delivered elsewhere: {got:?}");
        assert_eq!(
            (got[0].command.as_str(), got[0].get("code"), got[0].get("permission")),
            ("ERROR", Some("forbidden"), Some(need))
        );
        assert_eq!(got[0].envelope.reply_to, id);
        assert!(got[0].get("message").unwrap().contains("authenticate with the token"));
    }
    assert!(out.is_empty());
    // A broadcast reaches only the services whose command the sender may run.
    r.handle(2, Message::new("DEPLOY").to("*").param("name", "x"), 1_000, &mut out);
    assert!(out.is_empty(), "{out:?}");
    // What anonymous may do still works: status, send, register, the read-only builtin commands.
    r.handle(2, Message::new("LIST").to("apps").with_id(3), 1_000, &mut out);
    assert_eq!(delivered(&mut out)[0].0, 1, "LIST reaches the apps service");
    r.handle(2, Message::new("INFO"), 1_000, &mut out);
    assert_eq!(commands(&mut out, 2)[0].command, "INFO");
    assert_eq!(r.stats().forbidden, 6);
    // The node's own user on the Unix socket is the owner.
    r.connect(3, unix(1000));
    r.connect(4, unix(0));
    for conn in [3, 4] {
        r.handle(conn, Message::new("SNIFF"), 1_000, &mut out);
        assert_eq!(commands(&mut out, conn)[0].command, "SNIFFING");
    }
    r.handle(3, Message::new("DEPLOY").to("apps").param("name", "x").with_id(5), 1_000, &mut out);
    assert_eq!(commands(&mut out, 1)[0].command, "DEPLOY");
    r.handle(3, Message::new("STOP"), 1_000, &mut out);
    assert!(out.contains(&Action::Shutdown));
}

#[test]
fn auth_with_the_token_makes_the_owner_and_three_failures_close() {
    let mut c = config("n1", &[]);
    let token = "ab".repeat(32);
    c.access.token = Some(token.clone());
    c.access.token_file = "/data/auth.token".into();
    let mut r = Router::new(c, 0);
    r.connect(1, tcp());
    let mut out = Vec::new();
    r.handle(1, Message::new("AUTH").param("token", "00").with_id(4), 0, &mut out);
    let got = commands(&mut out, 1);
    assert_eq!(
        (got[0].command.as_str(), got[0].get("code"), got[0].envelope.reply_to),
        ("ERROR", Some("unauthorized"), 4)
    );
    assert!(got[0].get("message").unwrap().contains("/data/auth.token"));
    r.handle(1, Message::new("STOP"), 0, &mut out);
    assert_eq!(commands(&mut out, 1)[0].get("code"), Some("forbidden"), "a wrong token changes nothing");
    r.handle(1, Message::new("AUTH").param("token", &token), 0, &mut out);
    let got = commands(&mut out, 1);
    assert_eq!(got[0].command, "AUTHENTICATED");
    assert_eq!(
        (got[0].get("principal"), got[0].get("permissions")),
        (Some("owner"), Some("admin,sniff,register,send,status"))
    );
    r.handle(1, Message::new("STOP"), 0, &mut out);
    assert!(out.contains(&Action::Shutdown));
    out.clear();
    r.connect(2, tcp());
    for _ in 0..3 {
        r.handle(2, Message::new("AUTH").param("token", "bad"), 0, &mut out);
    }
    assert_eq!(out.iter().filter(|a| **a == Action::Close(2)).count(), 1, "closed after the third failure");
}

#[test]
fn a_service_name_belongs_to_the_principal_that_registered_it_first() {
    let mut c = config("n1", &[]);
    c.access.own_uid = 1000;
    let mut r = Router::new(c, 0);
    let mut out = Vec::new();
    let reg = |name: &str| Message::new("REGISTER").param("service", name).param("version", 1);
    r.connect(1, unix(1000));
    r.handle(1, reg("billing"), 0, &mut out);
    assert_eq!(commands(&mut out, 1)[1].command, "READY");
    // Another principal cannot take it over, even once its instance has gone.
    r.disconnect(1, &mut out);
    r.connect(2, tcp());
    r.handle(2, reg("billing"), 0, &mut out);
    let got = commands(&mut out, 2);
    assert_eq!(got[0].command, "INVALID");
    assert_eq!(got[0].get("message"), Some("service billing belongs to another principal"));
    r.connect(3, unix(4242));
    r.handle(3, reg("billing"), 0, &mut out);
    assert_eq!(commands(&mut out, 3)[0].command, "INVALID");
    // The same principal registers more instances; built-in services may join any name.
    r.connect(4, unix(1000));
    r.handle(4, reg("billing"), 0, &mut out);
    assert_eq!(commands(&mut out, 4)[1].command, "READY");
    r.connect(5, Origin::Internal);
    r.handle(5, reg("billing"), 0, &mut out);
    assert_eq!(commands(&mut out, 5)[1].command, "READY");
    // Anonymous clients share one principal: a second one may add an instance of its own name.
    r.handle(2, reg("free"), 0, &mut out);
    r.connect(6, tcp());
    r.handle(6, reg("free"), 0, &mut out);
    assert_eq!(commands(&mut out, 6)[1].command, "READY");
}

#[test]
fn datagrams_deliver_signals_to_services_only() {
    let mut r = router(&[]);
    register(&mut r, 1, "svc");
    r.connect(0, Origin::Datagram);
    let mut out = Vec::new();
    for m in [
        Message::new("STOP"),
        Message::new("SHUTDOWN").to("node"),
        Message::new("REGISTER").param("service", "hole").param("version", 1),
        Message::new("SNIFF").to("communicatord"),
    ] {
        r.handle(0, m, 1_000, &mut out);
    }
    assert!(out.is_empty(), "no node command runs over UDP: {out:?}");
    assert_eq!(r.stats().refused, 4);
    // A request over UDP arrives as a signal: no id to answer, no reply to correlate.
    r.handle(0, Message::new("POKE").to("svc").with_id(7), 1_000, &mut out);
    let got = delivered(&mut out);
    assert_eq!((got[0].0, got[0].1.command.as_str(), got[0].1.envelope.id), (1, "POKE", 0));
    assert_eq!(r.pending_len(), 0);
    r.handle(0, Message::new("DEPLOY").to("apps"), 1_000, &mut out);
    let mut apps = router(&[]);
    builtin_apps(&mut apps, 1);
    apps.connect(0, Origin::Datagram);
    apps.handle(0, Message::new("DEPLOY").to("apps").param("name", "x"), 1_000, &mut out);
    assert!(delivered(&mut out).iter().all(|(c, _)| *c != 1), "no admin command reaches a builtin over UDP");
}

#[test]
fn errors_reports_and_replies_are_never_answered() {
    let mut r = router(&[]);
    builtin_apps(&mut r, 1);
    register(&mut r, 2, "svc");
    r.handle(2, Message::new("COMMANDS").param("list", "ONLY"), 1_000, &mut Vec::new());
    r.connect(3, tcp());
    let mut out = Vec::new();
    for command in nodus_wire::node::ANSWER_COMMANDS {
        for to in ["", "node", "apps", "svc", "nowhere", "*"] {
            for id in [0, 9] {
                let mut m = Message::new(command).to(to).with_id(id);
                if to.is_empty() {
                    m.to = Default::default();
                }
                r.handle(3, m, 1_000, &mut out);
            }
        }
        // A reply to nothing, and to the node.
        r.handle(1, Message::new("DONE").tap_reply_to(77), 1_000, &mut out);
        r.handle(1, Message::new(command).tap_reply_to(77), 1_000, &mut out);
    }
    let answers: Vec<_> = delivered(&mut out).into_iter().filter(|(c, _)| *c == 3 || *c == 1).collect();
    assert!(answers.is_empty(), "errors and replies drew answers: {answers:?}");
    // The apps-service loop: an error from a builtin to the node ends there.
    r.handle(1, Message::new("ERROR").param("code", "apps").param("command", "UNKNOWN"), 1_000, &mut out);
    assert!(out.is_empty());
}

#[test]
fn the_first_node_sets_hops_whatever_the_client_said() {
    let mut r = router(&[]);
    register(&mut r, 1, "svc");
    r.connect(2, tcp());
    let mut out = Vec::new();
    let mut m = Message::new("HI").to("svc");
    m.envelope.hops = 16;
    r.handle(2, m, 1_000, &mut out);
    assert_eq!(delivered(&mut out)[0].1.envelope.hops, 0);
}

#[test]
fn a_message_that_would_outgrow_the_frame_gets_an_error_not_a_silent_drop() {
    let mut c = config("n1", &[]);
    c.limits.max_frame = 1024;
    let mut r = Router::new(c, 0);
    register(&mut r, 1, "a-service-with-a-long-name");
    r.connect(2, tcp());
    let mut out = Vec::new();
    // Fits when sent; the node adds the sender's address and it no longer fits.
    let mut m = Message::new("BIG").to("a-service-with-a-long-name").with_id(3);
    let room = 1024 - nodus_wire::binary::encoded_len(&m);
    m.payload = vec![0u8; room - 3].into();
    assert!(nodus_wire::binary::encoded_len(&m) <= 1024);
    r.connect(3, unix(4242));
    r.handle(3, Message::new("REGISTER").param("service", "some-sender").param("version", 1), 0, &mut out);
    out.clear();
    r.handle(3, m, 0, &mut out);
    let got = delivered(&mut out);
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0, got[0].1.command.as_str(), got[0].1.get("code")), (3, "ERROR", Some("too_large")));
    assert_eq!(got[0].1.envelope.reply_to, 3);
    assert_eq!(r.pending_len(), 0);
}

#[test]
fn requests_past_the_per_client_bound_are_refused_never_delivered_untracked() {
    let mut c = config("n1", &[]);
    c.limits.max_pending_per_client = 2;
    c.limits.max_pending = 3;
    let mut r = Router::new(c, 0);
    register(&mut r, 1, "svc");
    r.connect(2, tcp());
    r.connect(3, tcp());
    let mut out = Vec::new();
    for id in 1..=3 {
        r.handle(2, Message::new("ASK").to("svc").with_id(id), 0, &mut out);
    }
    let got = delivered(&mut out);
    assert_eq!(got.iter().filter(|(c, _)| *c == 1).count(), 2, "two reach the service");
    let refused: Vec<_> = got.iter().filter(|(c, _)| *c == 2).collect();
    assert_eq!(refused.len(), 1);
    assert_eq!((refused[0].1.get("code"), refused[0].1.envelope.reply_to), (Some("too_many_requests"), 3));
    // Another client still has its share; then the node-wide bound stops it too.
    r.handle(3, Message::new("ASK").to("svc").with_id(1), 0, &mut out);
    r.handle(3, Message::new("ASK").to("svc").with_id(2), 0, &mut out);
    let got = delivered(&mut out);
    assert_eq!(got.iter().filter(|(c, _)| *c == 1).count(), 1);
    assert_eq!(got.iter().filter(|(c, m)| *c == 3 && m.get("code") == Some("too_many_requests")).count(), 1);
    assert_eq!(r.pending_len(), 3);
    // An answer frees a place for its caller.
    let first = Message::new("DONE").tap_reply_to(1);
    r.handle(1, first, 0, &mut out);
    r.handle(2, Message::new("ASK").to("svc").with_id(4), 0, &mut out);
    assert!(delivered(&mut out).iter().any(|(c, m)| *c == 1 && m.command == "ASK"));
}

#[test]
fn every_caller_of_a_responder_that_goes_gets_exactly_one_disconnected_error() {
    let mut r = router(&[]);
    register(&mut r, 1, "slow");
    let callers = [2, 3, 4];
    let mut out = Vec::new();
    for c in callers {
        r.connect(c, tcp());
        for id in 1..=5 {
            r.handle(c, Message::new("ASK").to("slow").with_id(id), 0, &mut out);
        }
    }
    out.clear();
    r.disconnect(1, &mut out);
    let got = delivered(&mut out);
    for c in callers {
        let mut ids: Vec<u64> = got.iter().filter(|(to, _)| *to == c).map(|(_, m)| m.envelope.reply_to).collect();
        ids.sort();
        assert_eq!(ids, [1, 2, 3, 4, 5], "caller {c}");
    }
    assert!(got.iter().all(|(_, m)| m.get("code") == Some("disconnected") && m.get("delivered") == Some("maybe")));
    assert_eq!(r.pending_len(), 0);
    r.tick(1_000_000, &mut out);
    assert!(out.is_empty(), "nothing more later");
}

#[test]
fn cached_is_reported_only_once_the_entry_is_durable() {
    let mut c = config("n1", &["later"]);
    c.durable_cache = true;
    let mut r = Router::new(c, 0);
    r.connect(2, tcp());
    let mut out = Vec::new();
    r.handle(2, Message::new("A").to("later").param("transmission_report", "failure"), 0, &mut out);
    assert_eq!(out, [Action::PersistCache], "no report yet: the entry is not on disk");
    out.clear();
    r.handle(2, Message::new("B").to("later"), 0, &mut out);
    assert!(out.is_empty(), "one signal while the journal waits");
    // A barrier sent after it is answered after the report, as without the wait.
    r.handle(2, Message::new("PING").with_id(9), 0, &mut out);
    assert!(out.is_empty());
    let ops = r.take_cache_journal();
    assert!(matches!(&ops[..], [CacheOp::Put(a), CacheOp::Put(b)] if a.seq == 1 && b.seq == 2 && a.msg.command == "A"));
    r.cache_durable(2, &mut out);
    let got = commands(&mut out, 2);
    assert_eq!((got[0].command.as_str(), got[0].get("status")), ("TRANSMISSION_REPORT", Some("cached")));
    assert_eq!(got[1].command, "PONG");
    // After a restart the entries come back and are delivered when the service registers.
    let snapshot = r.cache_snapshot();
    let mut c = config("n1", &["later"]);
    c.durable_cache = true;
    let mut r2 = Router::new(c, 0);
    r2.restore_cache(snapshot, 5, &mut out);
    assert!(out.is_empty());
    register(&mut r2, 1, "later-not");
    r2.connect(1, Origin::Internal);
    r2.handle(1, Message::new("REGISTER").param("service", "later").param("version", 1), 10, &mut out);
    let cmds: Vec<String> = commands(&mut out, 1).into_iter().map(|m| m.command).collect();
    assert_eq!(cmds, ["HELP", "READY", "A", "B"]);
    assert!(matches!(&r2.take_cache_journal()[..], [CacheOp::Remove(1), CacheOp::Remove(2)]));
}

#[test]
fn a_callers_share_of_pending_requests_fits_half_its_queue() {
    let c = Config::from_toml("[limits]\nmax_outbound_messages = 16").unwrap();
    assert_eq!(RouterLimits::from_config(&c.limits).max_pending_per_client, 8);
    let c = Config::default();
    assert_eq!(RouterLimits::from_config(&c.limits).max_pending_per_client, 32_768);
}

#[test]
fn registered_instances_are_components_and_can_be_addressed_one_by_one() {
    let mut r = router(&[]);
    register(&mut r, 1, "control");
    // Two instances of one service, the second started by component 77 of node b.
    let mut out = Vec::new();
    r.connect(2, tcp());
    r.handle(2, Message::new("REGISTER").param("service", "svc").param("version", 1).with_id(1), 1_000, &mut out);
    let ready = delivered(&mut out).into_iter().find(|(_, m)| m.command == "READY").unwrap().1;
    r.connect(3, tcp());
    let mut second = Message::new("REGISTER").param("service", "svc").param("version", 1).param("parent_node", "b");
    second.envelope.pid = 77;
    r.handle(3, second, 1_500, &mut out);
    out.clear();
    let regs = r.registered();
    let find = |conn: ConnId| regs.iter().find(|g| g.conn == conn).unwrap();
    assert_eq!(ready.get("component"), Some(find(2).component.to_string().as_str()), "READY announces the id");
    assert_ne!(find(2).component, find(3).component);
    assert!(find(1).internal && !find(2).internal);
    assert_eq!((find(3).pid, find(3).parent_node.as_deref(), find(3).since), (77, Some("b"), 1_500));
    // A targeted request reaches that instance (not the balancer's choice) and its reply comes back.
    for target in [3, 2, 3] {
        r.deliver_to(1, target, Message::new("MONITORING").param("sync_time", 1).with_id(50 + target), 2_000, &mut out)
            .unwrap();
        let (to, m) = delivered(&mut out).pop().unwrap();
        assert_eq!((to, m.from.to_string().as_str()), (target, "n1:control"));
        r.handle(target, Message::new("RESULT").tap_reply_to(m.envelope.id), 2_000, &mut out);
        let (back, reply) = delivered(&mut out).pop().unwrap();
        assert_eq!((back, reply.envelope.reply_to), (1, 50 + target));
    }
    // An instance that declared its commands without this one, or a connection that is not a
    // registered service, is refused without anything delivered.
    r.handle(2, Message::new("COMMANDS").param("list", "WORK"), 2_000, &mut out);
    assert_eq!(r.deliver_to(1, 2, Message::new("MONITORING"), 2_000, &mut out), Err(DeliverError::NotUnderstood));
    assert_eq!(r.deliver_to(1, 9, Message::new("MONITORING"), 2_000, &mut out), Err(DeliverError::Gone));
    assert!(out.is_empty());
}

#[test]
fn a_message_to_a_service_is_offered_and_an_overloaded_request_gets_one_error() {
    let mut r = router(&[]);
    register(&mut r, 1, "busy");
    r.connect(2, tcp());
    let mut out = Vec::new();
    r.handle(2, Message::new("ASK").to("busy").with_id(7), 1_000, &mut out);
    let Some(Action::Offer { to: 1, from: 2, msg }) = out.pop() else { panic!("an offer to the service: {out:?}") };
    assert_eq!(r.pending_len(), 1);
    // The driver refuses it: the caller gets one ERROR under its own id, the request is no
    // longer tracked and nothing comes later.
    r.overloaded(1, 2, &msg, true, &mut out);
    let got = delivered(&mut out);
    assert_eq!(got.len(), 1);
    let (to, e) = &got[0];
    assert_eq!((*to, e.command.as_str(), e.envelope.reply_to), (2, "ERROR", 7));
    assert_eq!((e.get("code"), e.get("delivered"), e.get("command")), (Some("overloaded"), Some("no"), Some("ASK")));
    assert!(e.get("message").unwrap().contains("share"), "{e:?}");
    assert_eq!((r.pending_len(), r.stats().overloaded), (0, 1));
    assert_eq!(r.registered()[0].in_flight, 0);
    r.tick(1_000 + 3_600_000, &mut out);
    assert!(delivered(&mut out).is_empty(), "no timeout later for a refused request");
    // The caller's share of pending requests came back.
    r.handle(2, Message::new("ASK").to("busy").with_id(8), 2_000, &mut out);
    assert!(matches!(&out[..], [Action::Offer { to: 1, from: 2, .. }]));
}

#[test]
fn an_overloaded_one_way_message_is_counted_and_reported_only_when_asked() {
    let mut r = router(&[]);
    register(&mut r, 1, "busy");
    r.connect(2, tcp());
    let mut out = Vec::new();
    r.handle(2, Message::new("NOTE").to("busy"), 1_000, &mut out);
    let Some(Action::Offer { msg, .. }) = out.pop() else { panic!("an offer") };
    r.overloaded(1, 2, &msg, false, &mut out);
    assert!(out.is_empty(), "a one-way message that asked nothing gets nothing back");
    r.handle(2, Message::new("NOTE").to("busy").param("transmission_report", "failure"), 1_000, &mut out);
    let Some(Action::Offer { msg, .. }) = out.pop() else { panic!("an offer") };
    r.overloaded(1, 2, &msg, false, &mut out);
    let got = delivered(&mut out);
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].0, got[0].1.command.as_str(), got[0].1.get("status")),
        (2, "TRANSMISSION_REPORT", Some("failed"))
    );
    assert_eq!(r.stats().overloaded, 2);
}

#[test]
fn replies_and_node_answers_are_delivered_not_offered() {
    let mut r = router(&[]);
    register(&mut r, 1, "svc");
    r.connect(2, tcp());
    let mut out = Vec::new();
    // The service's own request to another connection's service, and its reply back.
    register(&mut r, 3, "other");
    r.handle(1, Message::new("ASK").to("other").with_id(5), 1_000, &mut out);
    let Some(Action::Offer { msg, .. }) = out.pop() else { panic!("an offer") };
    r.handle(3, msg.reply("OK"), 1_000, &mut out);
    assert!(matches!(&out[..], [Action::Deliver(1, m)] if m.command == "OK"), "{out:?}");
    out.clear();
    r.handle(1, Message::new("PING").with_id(6), 1_000, &mut out);
    assert!(matches!(&out[..], [Action::Deliver(1, m)] if m.command == "PONG"), "{out:?}");
}
