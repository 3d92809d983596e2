//! Trust and isolation, attacked from outside (issue 8): a real node in-process on `127.0.0.1:0`
//! with a temporary data directory, against an anonymous TCP client, a forged cluster peer
//! speaking raw `CONNECT`/`GOSSIP` frames, UDP datagrams, a request flood, a slow consumer with
//! callers, every command to every built-in service, and a crash with cached messages.

use nodus_daemon::topology::{NodeRecord, RecordKey};
use nodus_daemon::Config;
use nodus_tests::{BinConn, Node, TextConn, WAIT};
use nodus_wire::node::Permissions;
use nodus_wire::Message;
use std::collections::BTreeMap;
use std::time::Duration;

/// Waits for the answer to request `id`, skipping anything else.
async fn answer<S>(c: &mut nodus_tests::Conn<S>, id: u64) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let m = c.recv().await;
        if m.envelope.reply_to == id {
            return m;
        }
    }
}

async fn request(c: &mut BinConn, m: Message) -> Message {
    let id = m.envelope.id;
    assert_ne!(id, 0);
    c.send(&m).await;
    answer(c, id).await
}

async fn text_request(c: &mut TextConn, line: &str, id: u64) -> Message {
    c.send(line).await;
    answer(c, id).await
}

fn forbidden(m: &Message, need: &str) {
    assert_eq!(
        (m.command.as_str(), m.get("code"), m.get("permission")),
        ("ERROR", Some("forbidden"), Some(need)),
        "{m:?}"
    );
    assert!(m.get("message").unwrap_or("").contains("auth.token"), "says how to get it: {m:?}");
}

fn with_apps(c: &mut Config) {
    c.apps.enabled = true;
    c.apps.locator_listen = String::new();
    c.http.listen = String::new();
    c.tasks.arpcp_listen = String::new();
}

async fn info(owner: &mut TextConn, id: u64) -> Message {
    text_request(owner, &format!("INFO _id={id}"), id).await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_anonymous_tcp_client_cannot_stop_sniff_deploy_or_take_a_name() {
    let node = Node::start_with(tempfile::tempdir().unwrap(), with_apps).await;
    let mut owner = TextConn::connect(&node).await;
    owner.register("billing").await;
    let mut anon = BinConn::connect(&node).await;

    forbidden(&request(&mut anon, Message::new("STOP").with_id(1)).await, "admin");
    forbidden(&request(&mut anon, Message::new("SHUTDOWN").with_id(2)).await, "admin");
    forbidden(&request(&mut anon, Message::new("SNIFF").with_id(3)).await, "sniff");
    let deploy = Message::new("DEPLOY").to("apps").param("name", "evil").param("path", "/bin/sh").with_id(4);
    forbidden(&request(&mut anon, deploy).await, "admin");
    forbidden(&request(&mut anon, Message::new("REMOVE").to("apps").param("name", "x").with_id(5)).await, "admin");
    // What anonymous clients may do still works.
    assert_eq!(request(&mut anon, Message::new("LIST").to("apps").with_id(6)).await.command, "APPS");
    assert_eq!(request(&mut anon, Message::new("PING").with_id(7)).await.command, "PONG");
    // A name the owner registered stays the owner's.
    let steal =
        request(&mut anon, Message::new("REGISTER").param("service", "billing").param("version", 1).with_id(8)).await;
    assert_eq!(steal.command, "INVALID");
    assert_eq!(steal.get("message"), Some("service billing belongs to another principal"));
    // The node is still up, and the owner (the node's own user on the Unix socket) may sniff.
    assert_eq!(text_request(&mut owner, "SNIFF _id=9", 9).await.command, "SNIFFING");

    // The token: created at the first start, readable by the node's user only; AUTH with it makes
    // the connection the owner's.
    let path = node.dir.path().join("data").join("auth.token");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let token = std::fs::read_to_string(&path).unwrap().trim().to_string();
    assert_eq!(token.len(), 64);
    let wrong = request(&mut anon, Message::new("AUTH").param("token", "0".repeat(64)).with_id(10)).await;
    assert_eq!((wrong.command.as_str(), wrong.get("code")), ("ERROR", Some("unauthorized")));
    let ok = request(&mut anon, Message::new("AUTH").param("token", &token).with_id(11)).await;
    assert_eq!((ok.command.as_str(), ok.get("principal")), ("AUTHENTICATED", Some("owner")));
    assert_eq!(request(&mut anon, Message::new("SNIFF").with_id(12)).await.command, "SNIFFING");
    // Three wrong tokens and the node hangs up.
    let mut guesser = BinConn::connect(&node).await;
    for id in 1..=3 {
        guesser.send(&Message::new("AUTH").param("token", "f".repeat(64)).with_id(id)).await;
    }
    guesser.expect_eof().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn udp_datagrams_cannot_stop_the_node_or_register_a_service() {
    let node = Node::start_with(tempfile::tempdir().unwrap(), |c| c.cluster.udp_listen = "127.0.0.1:0".into()).await;
    let mut svc = TextConn::connect(&node).await;
    svc.register("svc").await;
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for line in ["STOP", "node/SHUTDOWN", "REGISTER service=hole;version=1", "SNIFF", "svc/POKE n=1"] {
        udp.send_to(line.as_bytes(), node.udp.unwrap()).await.unwrap();
    }
    // Datagrams are handled in order: once POKE arrives, the others were refused.
    let poke = svc.expect("POKE").await;
    assert_eq!(poke.get("n"), Some("1"));
    let list = text_request(&mut svc, "LIST_SERVICES _id=2", 2).await;
    assert_eq!(list.get("list"), Some("control,flags,svc"), "no black-hole service");
    let info = info(&mut svc, 3).await;
    assert_eq!(info.get("refused"), Some("4"));
    assert_eq!(info.get("quitting"), Some("false"));
}

fn record(name: &str, incarnation: i64, key: &RecordKey) -> NodeRecord {
    let mut r = NodeRecord {
        addr: format!("10.9.9.9:{}", 1000 + name.len()),
        incarnation,
        seq: 1,
        links: Default::default(),
        services: ["billing".to_string()].into(),
        apps: Default::default(),
        mac: Vec::new(),
    };
    key.sign(name, &mut r);
    r
}

fn gossip(records: BTreeMap<String, NodeRecord>) -> Message {
    Message::new("GOSSIP").with_payload(rmp_serde::to_vec(&records).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_peer_on_an_unauthenticated_link_cannot_stop_flood_or_unsettle_the_node() {
    let node = Node::start_with(tempfile::tempdir().unwrap(), |c| {
        c.cluster.listen = "127.0.0.1:0".into();
        c.cluster.max_nodes = 16;
        // The forged peer never answers heartbeats: keep the failure detector from cutting it
        // while the test is still talking, however slow the machine is.
        c.cluster.failure_phi = 1e9;
    })
    .await;
    let mut owner = TextConn::connect(&node).await;
    let mut evil = BinConn::connect_addr(node.cluster.unwrap()).await;
    evil.send(&Message::new("CONNECT").param("server", "evil").param("version", 1).param("nonce", "x")).await;
    assert_eq!(evil.expect("ACCEPT").await.get("server"), Some("n1"));

    // Cluster-wide commands from a node on a link without a secret or TLS are ignored.
    evil.send(&Message::new("SHUTDOWN")).await;
    evil.send(&Message::new("FORGET").param("server", "n1")).await;
    // Its clients' requests are anonymous here, whatever it stamps on them.
    let mut stop = Message::new("STOP").to("n1:").with_id(77);
    stop.from = nodus_wire::Address::new("evil", "");
    stop.envelope.perms = Permissions::ALL;
    evil.send(&stop).await;
    forbidden(&answer(&mut evil, 77).await, "admin");
    // It may not speak for the node itself.
    let mut spoof = Message::new("INFO").to("n1:").with_id(78);
    spoof.from = nodus_wire::Address::new("n1", "");
    evil.send(&spoof).await;
    // The empty secret is no secret: records it signs are accepted, but only up to max_nodes,
    // and a huge incarnation claiming this node is refuted, not adopted.
    let key = RecordKey::from_secret("");
    let now = nodus_daemon::now_ms();
    let mut fakes: BTreeMap<String, NodeRecord> =
        (0..2_000).map(|i| (format!("fake{i}"), record("x", now, &key))).collect();
    for (name, r) in fakes.iter_mut() {
        key.sign(name, r);
    }
    evil.send(&gossip(fakes)).await;
    let mut takeover = BTreeMap::new();
    takeover.insert("n1".to_string(), record("n1", i64::MAX / 2, &key));
    evil.send(&gossip(takeover)).await;
    // One forged pong answering no ping.
    evil.send(&Message::new("LINK_PONG").param("t0", now).param("t1", now + 3_600_000)).await;

    let info = info(&mut owner, 1).await;
    assert_eq!(info.get("quitting"), Some("false"), "SHUTDOWN was ignored");
    let known: usize = info.get("known_nodes").unwrap().parse().unwrap();
    assert!(known <= 16, "known nodes bounded: {known}");
    assert_eq!(info.get("refused"), Some("1"), "the spoofed sender was dropped");
    let clock = text_request(&mut owner, "CLOCK_STATUS _id=2", 2).await;
    assert_eq!(clock.command, "CLOCK_STABLE");
    // Nothing past the bound is remembered across a restart (the known nodes are saved at the
    // node's next tick, off the path of the gossip).
    let file = node.dir.path().join("data").join("nodes");
    let deadline = tokio::time::Instant::now() + WAIT;
    let nodes = loop {
        match std::fs::read_to_string(&file) {
            Ok(nodes) => break nodes,
            Err(_) => assert!(tokio::time::Instant::now() < deadline, "the known nodes were never saved"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(nodes.lines().count() <= 15, "{} nodes saved", nodes.lines().count());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_without_the_secret_never_links() {
    let node = Node::start_with(tempfile::tempdir().unwrap(), |c| {
        c.cluster.listen = "127.0.0.1:0".into();
        c.cluster.secret = "the-cluster-secret".into();
    })
    .await;
    let mut owner = TextConn::connect(&node).await;
    let mut evil = BinConn::connect_addr(node.cluster.unwrap()).await;
    evil.send(&Message::new("CONNECT").param("server", "evil").param("version", 1).param("nonce", "x")).await;
    let accept = evil.expect("ACCEPT").await;
    assert!(accept.get("proof").is_some() && accept.params.values().all(|v| !v.contains("the-cluster-secret")));
    // Anything but a valid CONFIRM ends the connection; SHUTDOWN before it does nothing.
    evil.send(&Message::new("SHUTDOWN")).await;
    let refuse = evil.expect("REFUSE").await;
    assert_eq!(refuse.get("reason"), Some("secret"));
    evil.expect_eof().await;
    let mut evil = BinConn::connect_addr(node.cluster.unwrap()).await;
    evil.send(&Message::new("CONNECT").param("server", "evil").param("version", 1).param("nonce", "y")).await;
    evil.expect("ACCEPT").await;
    evil.send(&Message::new("CONFIRM").param("proof", "ab".repeat(32))).await;
    assert_eq!(evil.expect("REFUSE").await.get("reason"), Some("secret"));
    evil.expect_eof().await;
    let info = info(&mut owner, 1).await;
    assert_eq!((info.get("links"), info.get("quitting")), (Some("0"), Some("false")));
}

#[tokio::test(flavor = "multi_thread")]
async fn one_client_cannot_fill_the_pending_table_and_others_keep_their_replies() {
    let node = Node::start_with(tempfile::tempdir().unwrap(), |c| c.limits.max_pending_per_client = 64).await;
    let mut sink = TextConn::connect(&node).await;
    sink.register("sink").await;
    let mut flood = BinConn::connect(&node).await;
    for id in 1..=100 {
        flood.send(&Message::new("JOB").to("sink").with_id(id)).await;
    }
    let mut refused = Vec::new();
    while refused.len() < 36 {
        let m = flood.recv().await;
        assert_eq!((m.command.as_str(), m.get("code")), ("ERROR", Some("too_many_requests")));
        refused.push(m.envelope.reply_to);
    }
    assert_eq!(refused, (65..=100).collect::<Vec<u64>>(), "every request over the share is answered");
    // Another caller still gets through, and its reply comes back.
    let mut other = BinConn::connect(&node).await;
    other.send(&Message::new("JOB").to("sink").param("who", "other").with_id(5)).await;
    let job = loop {
        let m = sink.expect("JOB").await;
        if m.get("who") == Some("other") {
            break m;
        }
    };
    sink.send(&format!("DONE _reply_to={}", job.envelope.id)).await;
    let done = answer(&mut other, 5).await;
    assert_eq!(done.command, "DONE");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_caller_of_a_cut_slow_consumer_gets_one_answer_per_request() {
    let node = Node::start_with(tempfile::tempdir().unwrap(), |c| {
        c.limits.max_outbound_bytes = 256 * 1024;
        c.limits.outbound_stall_secs = 1;
    })
    .await;
    // The slow consumer registers, then never reads again: what its queue cannot take is refused
    // at once (overloaded), and it is cut once it has written nothing for outbound_stall_secs.
    let mut slow = TextConn::connect(&node).await;
    slow.register("slow").await;
    const CALLERS: usize = 3;
    const EACH: u64 = 60;
    let mut callers = Vec::new();
    for _ in 0..CALLERS {
        callers.push(BinConn::connect(&node).await);
    }
    let work = |id: u64| Message::new("WORK").to("slow").with_id(id).with_payload(vec![7u8; 32 * 1024]);
    for c in callers.iter_mut() {
        for id in 1..=EACH {
            c.send(&work(id)).await;
        }
    }
    let (mut disconnected, mut overloaded) = (0, 0);
    let mut answered = vec![std::collections::BTreeSet::new(); CALLERS];
    let mut sent = [EACH; CALLERS];
    let mut count = |n: usize, m: &Message, answered: &mut std::collections::BTreeSet<u64>| {
        assert!(answered.insert(m.envelope.reply_to), "caller {n}: a second answer to {}", m.envelope.reply_to);
        match (m.command.as_str(), m.get("code")) {
            ("ERROR", Some("disconnected")) => {
                assert_eq!(m.get("delivered"), Some("maybe"), "{m:?}");
                disconnected += 1;
            }
            ("ERROR", Some("overloaded")) => {
                assert_eq!(m.get("delivered"), Some("no"), "{m:?}");
                overloaded += 1;
            }
            ("SERVICE_UNAVAILABLE", _) => {}
            _ => panic!("caller {n}: unexpected {m:?}"),
        }
    };
    let (first, _) = callers.split_at_mut(1);
    sent[0] +=
        nodus_tests::probe_until_cut(&mut first[0], |n| work(EACH + n), |m| count(0, &m, &mut answered[0])).await;
    for (n, c) in callers.iter_mut().enumerate() {
        while answered[n].len() < sent[n] as usize {
            let m = c.recv().await;
            count(n, &m, &mut answered[n]);
        }
        assert!(c.try_recv(Duration::from_millis(50)).await.is_none(), "caller {n}: exactly one answer each");
    }
    assert!(disconnected > 0, "the consumer was cut with requests in flight");
    assert!(overloaded > 0, "what its queue could not take was refused at once");
    drop(slow);
}

/// The burst of errors when a responder goes must fit the caller's own queue: a caller may have
/// at most `max_pending_per_client` (no more than half of `max_outbound_messages`) requests in
/// flight, and the rest are refused at once, so the caller is never cut for its errors.
#[tokio::test(flavor = "multi_thread")]
async fn a_caller_with_many_requests_to_a_responder_that_goes_gets_every_answer() {
    let node = Node::start_with(tempfile::tempdir().unwrap(), |c| {
        c.limits.max_outbound_messages = 512;
        c.limits.max_pending_per_client = 256;
    })
    .await;
    let mut slow = TextConn::connect(&node).await;
    slow.register("slow").await;
    let mut caller = BinConn::connect(&node).await;
    let work = |id| Message::new("WORK").to("slow").with_id(id).with_payload(vec![7u8; 1024]);
    for id in 1..=256 {
        caller.send(&work(id)).await;
    }
    // Past its share, each request is refused at once.
    for id in 257..=1000 {
        caller.send(&work(id)).await;
        let m = caller.recv().await;
        assert_eq!((m.get("code"), m.envelope.reply_to), (Some("too_many_requests"), id));
    }
    // The responder goes with 256 of them in flight: 256 errors, all delivered.
    drop(slow);
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 256 {
        let Some(m) = caller.try_recv(WAIT).await else { panic!("{} answers", seen.len()) };
        assert_eq!((m.get("code"), m.get("delivered")), (Some("disconnected"), Some("maybe")));
        assert!(seen.insert(m.envelope.reply_to), "a second answer to {}", m.envelope.reply_to);
    }
    assert_eq!(seen, (1..=256).collect());
}

/// Every node command and every `apps` command, an unknown one, and every error and report, with
/// and without `_id`, from an anonymous and an owner client, registered or not: the traffic ends.
#[tokio::test(flavor = "multi_thread")]
async fn every_command_to_every_builtin_service_ends_without_a_loop() {
    let node = Node::start_with(tempfile::tempdir().unwrap(), with_apps).await;
    let mut owner = TextConn::connect(&node).await;
    let mut anon = BinConn::connect(&node).await;
    let mut probe = TextConn::connect(&node).await;
    probe.register("probe").await;
    let node_commands = [
        "REGISTER",
        "UNREGISTER",
        "COMMANDS",
        "AUTH",
        "SERVICE_STATUS",
        "LIST_SERVICES",
        "INFO",
        "SNIFF",
        "PING",
        "CLUSTER_STATUS",
        "CLOCK_STATUS",
        "CLUSTER_INFO",
        "FORGET",
        "FOO",
        "HELP",
        "READY",
        "STATUS",
    ];
    let apps_commands = ["DEPLOY", "START", "STOP", "RESTART", "SCALE", "REMOVE", "LIST", "INFO", "CRASHLOG", "FOO"];
    let answers = nodus_wire::node::ANSWER_COMMANDS;
    let mut lines = Vec::new();
    let targets = [("", &node_commands[..]), ("apps", &apps_commands[..]), ("", &answers[..]), ("apps", &answers[..])];
    for (service, commands) in targets {
        for c in commands {
            for id in ["", " _id=4242", " _reply_to=99"] {
                let here = if service.is_empty() { String::new() } else { format!("{service}/") };
                lines.push(format!("{here}{c}{id}"));
                lines.push(format!("*:{service}/{c}{id}"));
            }
        }
    }
    for (n, line) in lines.iter().enumerate() {
        owner.send(line).await;
        probe.send(line).await;
        let mut m = nodus_wire::text::from_line(line).unwrap();
        if m.envelope.id != 0 {
            m.envelope.id = 10_000 + n as u64;
        }
        anon.send(&m).await;
    }
    // The anonymous client may not stop the node, but may try.
    for c in ["STOP", "SHUTDOWN", "apps/STOP name=x"] {
        let mut m = nodus_wire::text::from_line(c).unwrap();
        m.envelope.id = 1;
        anon.send(&m).await;
    }
    // Count what the node handles while nothing else is sent: it must settle. (The senders
    // asked to SNIFF: a fresh connection measures.) A window lasts at least 50 ms of round trips:
    // a loop between two components runs on the runtime's pace and shows in any such window.
    let mut meter = TextConn::connect(&node).await;
    let handled = |m: &Message| m.get("received").unwrap().parse::<u64>().unwrap();
    let mut quiet_windows = 0;
    let mut last = info(&mut meter, 1).await;
    let mut id = 100;
    for round in 2..100 {
        let started = tokio::time::Instant::now();
        let mut pings = 0;
        while started.elapsed() < Duration::from_millis(50) {
            id += 1;
            text_request(&mut meter, &format!("PING _id={id}"), id).await;
            pings += 1;
        }
        let now = info(&mut meter, round).await;
        let delta = handled(&now) - handled(&last);
        // The apps service answers what it was sent for a while; a loop never settles.
        quiet_windows = if delta == pings + 1 { quiet_windows + 1 } else { 0 };
        if quiet_windows == 3 {
            assert_eq!(now.get("quitting"), Some("false"));
            return;
        }
        last = now;
    }
    panic!("the traffic never settled");
}

#[tokio::test(flavor = "multi_thread")]
async fn cached_messages_are_on_disk_before_cached_is_reported_and_survive_a_crash_and_a_restart() {
    let expect = |c: &mut Config| c.expected_services = vec!["later".into()];
    // A node on its own runtime, so it can be crashed: every task dropped, nothing drained.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let mut node = rt.spawn(Node::start_with(tempfile::tempdir().unwrap(), expect)).await.unwrap();
    let mut client = TextConn::connect(&node).await;
    let report = text_request(&mut client, "later/JOB n=1;transmission_report=failure;_id=1", 1).await;
    assert_eq!((report.command.as_str(), report.get("status")), ("TRANSMISSION_REPORT", Some("cached")));
    let dir = std::mem::replace(&mut node.dir, tempfile::tempdir().unwrap());
    drop(client);
    tokio::task::spawn_blocking(move || rt.shutdown_timeout(Duration::from_secs(5))).await.unwrap();
    std::mem::forget(node);

    // Restarted on the same data directory: the message is there.
    let node = Node::start_with(dir, expect).await;
    let mut client = TextConn::connect(&node).await;
    let report = text_request(&mut client, "later/JOB n=2;transmission_report=failure;_id=2", 2).await;
    assert_eq!(report.get("status"), Some("cached"));
    // A graceful stop and a second restart keep both.
    drop(client);
    let dir = node.stop().await;
    let node = Node::start_with(dir, expect).await;
    let mut later = TextConn::connect(&node).await;
    later.register("later").await;
    let first = later.expect("JOB").await;
    let second = later.expect("JOB").await;
    assert_eq!((first.get("n"), second.get("n")), (Some("1"), Some("2")));
    for job in [first, second] {
        later.send(&format!("DONE _reply_to={}", job.envelope.id)).await;
    }
    // Delivered ones are gone for good.
    let dir = node.stop().await;
    let node = Node::start_with(dir, expect).await;
    let mut later = TextConn::connect(&node).await;
    later.register("later").await;
    assert!(later.try_recv(Duration::from_millis(200)).await.is_none());
}

/// Two nodes linked on loopback, `a` dialing `b`, with a client on each.
async fn pair(edit: impl Fn(&mut Config) + Copy) -> (Node, Node) {
    let b = Node::start_with(tempfile::tempdir().unwrap(), |c| {
        c.server_name = "b".into();
        c.cluster.listen = "127.0.0.1:0".into();
        c.cluster.heartbeat_ms = 100;
        edit(c);
    })
    .await;
    let b_addr = b.cluster.unwrap().to_string();
    let a = Node::start_with(tempfile::tempdir().unwrap(), |c| {
        c.server_name = "a".into();
        c.cluster.listen = "127.0.0.1:0".into();
        c.cluster.neighbors = vec![b_addr];
        c.cluster.heartbeat_ms = 100;
        edit(c);
    })
    .await;
    // Wait until a routes to b.
    let mut probe = TextConn::connect(&a).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut id = 1;
    loop {
        id += 1;
        if text_request(&mut probe, &format!("b:/PING _id={id}"), id).await.command == "PONG" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "a never reached b");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (a, b)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_set_hops_does_not_make_a_remote_request_vanish() {
    let (a, b) = pair(|_| {}).await;
    let mut svc = TextConn::connect(&b).await;
    svc.register("svc").await;
    let mut client = TextConn::connect(&a).await;
    client.send("b:svc/ASK _hops=16;_id=7").await;
    let ask = svc.expect("ASK").await;
    assert_eq!(ask.envelope.hops, 1, "counted from the first node");
    svc.send(&format!("ANSWER _reply_to={}", ask.envelope.id)).await;
    assert_eq!(answer(&mut client, 7).await.command, "ANSWER");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_that_outgrows_the_frame_when_forwarded_gets_an_error() {
    let (a, b) = pair(|c| c.limits.max_frame_bytes = 64 * 1024).await;
    let mut svc = TextConn::connect(&b).await;
    svc.register("svc").await;
    let mut client = BinConn::connect(&a).await;
    // Fits as sent; the node stamps its name and the sender's and it no longer fits.
    let mut m = Message::new("BIG").to("b:svc").with_id(9);
    let mut len = 64 * 1024;
    while {
        m.payload = vec![1u8; len].into();
        nodus_wire::binary::encoded_len(&m) > 64 * 1024
    } {
        len -= 1;
    }
    let e = request(&mut client, m).await;
    assert_eq!((e.command.as_str(), e.get("code")), ("ERROR", Some("too_large")), "{e:?}");
    // The service saw nothing; a message that fits goes through.
    let fits = Message::new("SMALL").to("b:svc").with_id(10);
    client.send(&fits).await;
    assert_eq!(svc.recv().await.command, "SMALL");
    drop(b);
}
