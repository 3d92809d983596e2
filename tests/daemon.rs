//! Black-box tests of the daemon over real sockets.
//!
//! Every test starts its own node in-process (TCP on `127.0.0.1:0`, a temporary Unix socket) and
//! speaks real bytes to it: text lines over the Unix socket ([`TextConn`]) or binary frames over
//! TCP ([`BinConn`]). Nothing sleeps to wait for an event: every wait is on the event itself with a
//! timeout, and "nothing arrives" is asserted with a short `try_recv`. Ordering between
//! connections is established with a PING/PONG round trip ([`sync`]): the node handles one
//! connection's messages in order, so a PONG proves everything sent before it was handled.

use bytes::BytesMut;
use nodus_daemon::now_ms;
use nodus_tests::{BinConn, Node, TextConn, WAIT};
use nodus_wire::{binary, Address, Message};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

/// How long "nothing arrives" is observed.
const QUIET: Duration = Duration::from_millis(200);

/// Round trip through the node on `c`; the PONG must be the next message `c` receives.
async fn sync(c: &mut TextConn) {
    c.send("PING _id=424242").await;
    let m = c.recv().await;
    assert_eq!((m.command.as_str(), m.envelope.reply_to), ("PONG", 424242), "expected only the PONG, got {m:?}");
}

/// Asserts that nothing arrives on `c` for [`QUIET`].
async fn quiet(c: &mut TextConn, who: &str) {
    if let Some(m) = c.try_recv(QUIET).await {
        panic!("{who} should receive nothing, got {m:?}");
    }
}

/// The next message on either connection, with the index (0 or 1) of the one it came on.
async fn recv_either(a: &mut TextConn, b: &mut TextConn) -> (usize, Message) {
    tokio::select! {
        m = a.recv() => (0, m),
        m = b.recv() => (1, m),
    }
}

/// A connection registered as `service`.
async fn service(node: &Node, service: &str) -> TextConn {
    let mut c = TextConn::connect(node).await;
    c.register(service).await;
    c
}

/// A registered service that declared the commands in `list` (comma separated).
async fn service_with_commands(node: &Node, name: &str, list: &str) -> TextConn {
    let mut c = service(node, name).await;
    c.send(&format!("COMMANDS list={list}")).await;
    sync(&mut c).await;
    c
}

/// Waits (bounded) until the node answers new requests with `QUITTING`, probing with `INFO`.
async fn wait_until_quitting(c: &mut TextConn) {
    let probe = async {
        loop {
            c.send("INFO").await;
            let m = c.recv().await;
            match m.command.as_str() {
                "QUITTING" => return,
                "INFO" => {}
                other => panic!("unexpected {other} while waiting for the shutdown to begin"),
            }
        }
    };
    tokio::time::timeout(WAIT, probe).await.expect("the node begins its shutdown in time");
}

/// Connects a raw Unix stream, sends `PING` and tells whether the node answered (served) or
/// closed the connection (refused).
async fn served(node: &Node) -> bool {
    let mut s = UnixStream::connect(&node.unix).await.expect("connect unix");
    let _ = s.write_all(b"PING\n").await;
    let mut got = Vec::new();
    let answered = async {
        let mut chunk = [0u8; 512];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => {
                    got.extend_from_slice(&chunk[..n]);
                    if got.contains(&b'\n') {
                        return true;
                    }
                }
            }
        }
    };
    tokio::time::timeout(WAIT, answered).await.expect("the node answers or closes in time")
}

/// Reads `s` until EOF (or a reset); returns what was read. Fails the test after [`WAIT`].
async fn read_to_eof<S: AsyncReadExt + Unpin>(s: &mut S) -> Vec<u8> {
    let mut all = Vec::new();
    let r = tokio::time::timeout(WAIT, async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => all.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(r.is_ok(), "the node should close the connection");
    all
}

/// Deterministic junk bytes (xorshift), so a failing input can be reproduced.
fn junk(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Registration
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn register_is_answered_help_then_ready_with_the_server_name() {
    let node = Node::start("").await;
    let mut c = TextConn::connect(&node).await;
    c.send("REGISTER service=svc;version=1;_id=3").await;
    let help = c.recv().await;
    assert_eq!(help.command, "HELP");
    assert_eq!(help.from, Address::new("n1", "node"));
    assert_eq!(help.envelope.reply_to, 3);
    let ready = c.recv().await;
    assert_eq!(ready.command, "READY");
    assert_eq!(ready.get("server"), Some("n1"));
    assert_eq!(ready.envelope.reply_to, 3);
    sync(&mut c).await;

    let mut other = TextConn::connect(&node).await;
    other.send("LIST_SERVICES").await;
    assert_eq!(other.expect("SERVICES").await.get("list"), Some("control,flags,svc"), "with the built-in services");
}

#[tokio::test]
async fn register_twice_on_one_connection_is_invalid() {
    let node = Node::start("").await;
    let mut c = service(&node, "first").await;
    c.send("REGISTER service=second;version=1").await;
    let m = c.recv().await;
    assert_eq!(m.command, "INVALID");
    assert_eq!(m.get("command"), Some("REGISTER"));
    assert!(m.get("message").unwrap_or("").contains("already registered"), "{m:?}");
    c.send("LIST_SERVICES").await;
    assert_eq!(c.recv().await.get("list"), Some("control,first,flags"), "the first registration stands, alone");
}

#[tokio::test]
async fn register_without_version_or_with_a_reserved_or_bad_name_is_invalid() {
    let node = Node::start("").await;
    let mut c = TextConn::connect(&node).await;
    for line in [
        "REGISTER service=x",
        "REGISTER service=x;version=2",
        "REGISTER version=1",
        "REGISTER service=;version=1",
        "REGISTER service=node;version=1",
        "REGISTER service=communicatord;version=1",
        "REGISTER service=*;version=1",
        "REGISTER service=.;version=1",
        "REGISTER service=a?b;version=1",
        "REGISTER service=a*;version=1",
    ] {
        c.send(line).await;
        let m = c.recv().await;
        assert_eq!((m.command.as_str(), m.get("command")), ("INVALID", Some("REGISTER")), "{line}: {m:?}");
        assert!(!m.get("message").unwrap_or("").is_empty(), "{line}: INVALID says why");
    }
    c.send("LIST_SERVICES").await;
    assert_eq!(c.recv().await.get("list"), Some("control,flags"), "nothing was registered but the built-ins");
    // The connection is still usable and can register properly.
    c.register("fine").await;
}

#[tokio::test]
async fn unregister_removes_the_service_and_list_services_is_sorted() {
    let node = Node::start("").await;
    let _zeta = service(&node, "zeta").await;
    let _alpha = service(&node, "alpha").await;
    let mut mid = service(&node, "mid").await;
    let mut c = TextConn::connect(&node).await;
    c.send("LIST_SERVICES _id=4").await;
    let m = c.recv().await;
    assert_eq!(
        (m.command.as_str(), m.get("list"), m.envelope.reply_to),
        ("SERVICES", Some("alpha,control,flags,mid,zeta"), 4)
    );

    mid.send("UNREGISTER").await;
    sync(&mut mid).await; // UNREGISTER has no reply of its own.
    c.send("LIST_SERVICES").await;
    assert_eq!(c.recv().await.get("list"), Some("alpha,control,flags,zeta"));
    c.send("mid/HELLO").await;
    let m = c.recv().await;
    assert_eq!((m.command.as_str(), m.get("destination_service")), ("SERVICE_UNAVAILABLE", Some("mid")));
    quiet(&mut mid, "an unregistered connection").await;

    mid.send("UNREGISTER").await;
    let m = mid.recv().await;
    assert_eq!((m.command.as_str(), m.get("command")), ("INVALID", Some("UNREGISTER")));
    // After UNREGISTER the connection may register again, under another name.
    mid.register("beta").await;
    c.send("LIST_SERVICES").await;
    assert_eq!(c.recv().await.get("list"), Some("alpha,beta,control,flags,zeta"));
}

// ---------------------------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn undeclared_command_is_answered_unknown_and_not_delivered() {
    let node = Node::start("").await;
    let mut svc = service_with_commands(&node, "svc", "HELLO,STATUS").await;
    let mut c = TextConn::connect(&node).await;

    c.send("svc/GOODBYE _id=3").await;
    let m = c.recv().await;
    assert_eq!((m.command.as_str(), m.get("command"), m.envelope.reply_to), ("UNKNOWN", Some("GOODBYE"), 3));
    assert_eq!(m.from, Address::new("n1", "node"));
    quiet(&mut svc, "the service").await;

    c.send("svc/HELLO a=1").await;
    let m = svc.recv().await;
    assert_eq!((m.command.as_str(), m.get("a")), ("HELLO", Some("1")));
    quiet(&mut c, "the sender of a declared command").await;
}

#[tokio::test]
async fn sender_address_is_stamped_by_the_node() {
    let node = Node::start("").await;
    let mut svc = service(&node, "svc").await;

    let mut me = service(&node, "me").await;
    me.send("<evil:spoof svc/HI").await;
    let m = svc.recv().await;
    assert_eq!((m.command.as_str(), &m.from), ("HI", &Address::new("n1", "me")));

    let mut anon = TextConn::connect(&node).await;
    anon.send("<evil:spoof n1:svc/HI").await;
    let m = svc.recv().await;
    assert_eq!(m.from, Address::new("n1", ""), "an unregistered sender has an empty service");

    let mut bin = BinConn::connect(&node).await;
    let mut spoofed = Message::new("HI").to("svc");
    spoofed.from = Address::new("evil", "spoof");
    bin.send(&spoofed).await;
    assert_eq!(svc.recv().await.from, Address::new("n1", ""));
    bin.register("bin").await;
    bin.send(&spoofed).await;
    assert_eq!(svc.recv().await.from, Address::new("n1", "bin"));
}

#[tokio::test]
async fn reply_reaches_the_requesting_connection_by_id() {
    let node = Node::start("").await;
    let mut svc = service(&node, "svc").await;
    let mut c = TextConn::connect(&node).await;

    c.send("svc/ASK q=1;_id=5").await;
    let ask = svc.recv().await;
    assert_eq!((ask.command.as_str(), &ask.from), ("ASK", &Address::new("n1", "")));
    assert_ne!(ask.envelope.id, 0, "the service sees the request's id");
    // A reply with no destination at all: correlation alone routes it.
    svc.send(&format!("REPLY answer=42;_reply_to={}", ask.envelope.id)).await;
    let r = c.recv().await;
    assert_eq!((r.command.as_str(), r.get("answer"), r.envelope.reply_to), ("REPLY", Some("42"), 5));
    assert_eq!(r.from, Address::new("n1", "svc"));

    // A reply addressed to the requester's node address.
    c.send("svc/ASK q=2;_id=6").await;
    let ask = svc.recv().await;
    svc.send(&format!("n1:/REPLY answer=43;_reply_to={}", ask.envelope.id)).await;
    let r = c.recv().await;
    assert_eq!((r.get("answer"), r.envelope.reply_to), (Some("43"), 6));
    quiet(&mut svc, "the service").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replies_addressed_to_a_service_reach_the_exact_requesting_instance() {
    let node = Node::start("").await;
    let mut svc = service(&node, "svc").await;
    // Two instances of `asker`, both using the same request id.
    let mut a1 = service(&node, "asker").await;
    let mut a2 = service(&node, "asker").await;
    a1.send("svc/ASK who=a1;_id=5").await;
    let first = svc.recv().await;
    a2.send("svc/ASK who=a2;_id=5").await;
    let second = svc.recv().await;
    assert_eq!((first.get("who"), second.get("who")), (Some("a1"), Some("a2")));
    assert_ne!(first.envelope.id, second.envelope.id, "equal caller ids do not collide at the service");
    assert_eq!(first.from, Address::new("n1", "asker"));
    // Replies addressed to the service name `asker`, in reverse order.
    for ask in [&second, &first] {
        let who = ask.get("who").unwrap();
        svc.send(&format!("n1:asker/REPLY echo={who};_reply_to={}", ask.envelope.id)).await;
    }
    let r2 = a2.recv().await;
    let r1 = a1.recv().await;
    assert_eq!((r1.get("echo"), r1.envelope.reply_to), (Some("a1"), 5));
    assert_eq!((r2.get("echo"), r2.envelope.reply_to), (Some("a2"), 5));
    quiet(&mut a1, "instance a1").await;
    quiet(&mut a2, "instance a2").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replies_from_two_service_instances_reach_the_right_requesters() {
    let node = Node::start("").await;
    let mut s1 = service(&node, "svc").await;
    let mut s2 = service(&node, "svc").await;
    let mut a = TextConn::connect(&node).await;
    let mut b = TextConn::connect(&node).await;
    a.send("svc/ASK who=a;_id=1").await;
    b.send("svc/ASK who=b;_id=1").await;
    let (i, m1) = recv_either(&mut s1, &mut s2).await;
    let (j, m2) = recv_either(&mut s1, &mut s2).await;
    assert_ne!(i, j, "two unanswered requests go to two different instances");
    // Each instance answers on its own connection, the later request first.
    for (k, m) in [(j, &m2), (i, &m1)] {
        let who = m.get("who").unwrap();
        let line = format!("REPLY echo={who};_reply_to={}", m.envelope.id);
        if k == 0 {
            s1.send(&line).await
        } else {
            s2.send(&line).await
        }
    }
    let ra = a.recv().await;
    let rb = b.recv().await;
    assert_eq!((ra.get("echo"), ra.envelope.reply_to), (Some("a"), 1));
    assert_eq!((rb.get("echo"), rb.envelope.reply_to), (Some("b"), 1));
    quiet(&mut a, "requester a").await;
    quiet(&mut b, "requester b").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unanswered_requests_are_spread_over_the_instances() {
    let node = Node::start("").await;
    let mut w1 = service(&node, "work").await;
    let mut w2 = service(&node, "work").await;
    let mut c = TextConn::connect(&node).await;
    let burst: String = (1..=20).map(|id| format!("work/JOB n={id};_id={id}\n")).collect();
    c.send_raw(burst.as_bytes()).await;
    let mut counts = [0usize; 2];
    let mut seen = Vec::new();
    for _ in 0..20 {
        let (i, m) = recv_either(&mut w1, &mut w2).await;
        assert_eq!(m.command, "JOB");
        counts[i] += 1;
        seen.push(m.get("n").unwrap().parse::<u32>().unwrap());
    }
    seen.sort_unstable();
    assert_eq!(seen, (1..=20).collect::<Vec<_>>(), "each request delivered exactly once");
    assert!(counts[0] >= 5 && counts[1] >= 5, "roughly even spread, got {counts:?}");
    quiet(&mut w1, "instance 1").await;
    quiet(&mut w2, "instance 2").await;
}

/// Sends requests one at a time until instance `a` holds `held` unanswered ones; `b` keeps what
/// it gets unanswered until then, and finally answers them all (the requester gets the replies).
/// Returns the ids `a` holds, as `a` saw them. Instance 0 of `recv_either` is `a`.
async fn load_instance_a(c: &mut TextConn, a: &mut TextConn, b: &mut TextConn, held: usize) -> Vec<u64> {
    let (mut at_a, mut at_b) = (Vec::new(), Vec::new());
    let mut id = 100;
    while at_a.len() < held {
        assert!(id < 140, "instance a never got {held} requests");
        id += 1;
        c.send(&format!("work/JOB _id={id}")).await;
        match recv_either(a, b).await {
            (0, m) => at_a.push(m.envelope.id),
            (_, m) => at_b.push(m.envelope.id),
        }
    }
    for local in &at_b {
        b.send(&format!("DONE _reply_to={local}")).await;
    }
    for _ in &at_b {
        assert_eq!(c.recv().await.command, "DONE");
    }
    at_a
}

#[tokio::test(flavor = "multi_thread")]
async fn least_loaded_instance_gets_new_requests() {
    let node = Node::start("").await;
    let mut a = service(&node, "work").await;
    let mut b = service(&node, "work").await;
    let mut c = TextConn::connect(&node).await;
    let held = load_instance_a(&mut c, &mut a, &mut b, 3).await;
    assert_eq!(held.len(), 3);
    // `a` holds 3 unanswered requests, `b` none and answers at once: new work goes to `b`.
    for id in 1..=5 {
        c.send(&format!("work/JOB _id={id}")).await;
        let (i, m) = recv_either(&mut a, &mut b).await;
        assert_eq!(i, 1, "request {id} should go to the idle instance");
        b.send(&format!("DONE _reply_to={}", m.envelope.id)).await;
        let r = c.recv().await;
        assert_eq!((r.command.as_str(), r.envelope.reply_to), ("DONE", id));
    }
    quiet(&mut a, "the busy instance").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_of_a_departed_requester_stop_counting_once_answered() {
    let node = Node::start("").await;
    let mut watcher = service_with_commands(&node, "watcher", "STATUS").await;
    let mut a = service(&node, "work").await;
    let mut b = service(&node, "work").await;
    let mut r1 = service(&node, "r1").await;
    for _ in 0..3 {
        assert_eq!(watcher.expect("STATUS").await.get("status"), Some("up"));
    }
    let held = load_instance_a(&mut r1, &mut a, &mut b, 3).await;
    drop(r1);
    let m = watcher.recv().await;
    assert_eq!((m.get("service"), m.get("status")), (Some("r1"), Some("down")));
    // `a` finishes the departed requester's work; the replies have nowhere to go.
    for local in held {
        a.send(&format!("DONE _reply_to={local}")).await;
    }
    sync(&mut a).await;
    // Both instances are idle now: two unanswered requests go one to each.
    let mut r2 = TextConn::connect(&node).await;
    r2.send_raw(b"work/JOB _id=1\nwork/JOB _id=2\n").await;
    let (i, _) = recv_either(&mut a, &mut b).await;
    let (j, _) = recv_either(&mut a, &mut b).await;
    assert_ne!(i, j, "an instance that answered everything is not loaded");
    quiet(&mut r2, "the requester").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn responder_disconnect_fails_the_requests_in_flight() {
    let node = Node::start("").await;
    let mut svc = service(&node, "svc").await;
    let mut c = TextConn::connect(&node).await;
    c.send_raw(b"svc/ASK _id=11\nsvc/CHECK _id=12\n").await;
    assert_eq!(svc.recv().await.command, "ASK");
    assert_eq!(svc.recv().await.command, "CHECK");
    drop(svc);
    let mut failed = Vec::new();
    for _ in 0..2 {
        let m = c.recv().await;
        assert_eq!((m.command.as_str(), m.get("code")), ("ERROR", Some("disconnected")), "{m:?}");
        assert_eq!(m.from, Address::new("n1", "node"));
        failed.push((m.envelope.reply_to, m.get("command").unwrap().to_string()));
    }
    failed.sort();
    assert_eq!(failed, [(11, "ASK".to_string()), (12, "CHECK".to_string())]);
    quiet(&mut c, "the requester (one error per request)").await;
}

#[tokio::test(start_paused = true)]
async fn request_tracking_ends_with_an_expired_error_at_its_expiry() {
    let node = Node::start("").await;
    let mut svc = service(&node, "svc").await;
    let mut c = TextConn::connect(&node).await;
    // The request is tracked until its own expiry (much shorter than request_timeout_secs); the
    // node's clock is virtual, so the wait takes no wall time.
    c.send(&format!("svc/ASK _id=21;_expires_at={}", node.clock.now_ms() + 400)).await;
    let ask = svc.recv().await;
    let m = c.recv().await;
    // Its own `_expires_at` ended it (`request_timeout_secs` would be `timeout`).
    assert_eq!((m.command.as_str(), m.get("code"), m.get("command")), ("ERROR", Some("expired"), Some("ASK")));
    assert_eq!(m.envelope.reply_to, 21);
    // A late reply is dropped: the requester got its one answer already.
    svc.send(&format!("LATE _reply_to={}", ask.envelope.id)).await;
    sync(&mut svc).await;
    quiet(&mut c, "the requester after its timeout").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn status_notifications_follow_registration_and_disconnection() {
    let node = Node::start("").await;
    let mut watcher = service_with_commands(&node, "watcher", "STATUS").await;
    let mut plain = service(&node, "plain").await;
    let m = watcher.recv().await;
    assert_eq!((m.get("service"), m.get("status")), (Some("plain"), Some("up")));

    let x1 = service(&node, "x").await;
    let m = watcher.recv().await;
    assert_eq!(m.command, "STATUS");
    assert_eq!(m.from, Address::new("n1", "node"));
    assert_eq!(
        (m.get("service"), m.get("status"), m.get("instances"), m.get("server")),
        (Some("x"), Some("up"), Some("1"), Some("n1"))
    );
    let mut x2 = service(&node, "x").await;
    let m = watcher.recv().await;
    assert_eq!((m.get("status"), m.get("instances")), (Some("up"), Some("2")));

    let mut c = TextConn::connect(&node).await;
    c.send("SERVICE_STATUS service=x;_id=9").await;
    let m = c.recv().await;
    assert_eq!((m.command.as_str(), m.envelope.reply_to), ("STATUS", 9));
    assert_eq!((m.get("service"), m.get("status"), m.get("instances")), (Some("x"), Some("up"), Some("2")));

    drop(x1);
    let m = watcher.recv().await;
    assert_eq!((m.get("service"), m.get("status"), m.get("instances")), (Some("x"), Some("up"), Some("1")));
    x2.send("UNREGISTER").await;
    let m = watcher.recv().await;
    assert_eq!((m.get("service"), m.get("status"), m.get("instances")), (Some("x"), Some("down"), Some("0")));
    x2.register("x").await;
    assert_eq!(watcher.recv().await.get("status"), Some("up"));
    drop(x2);
    let m = watcher.recv().await;
    assert_eq!((m.get("service"), m.get("status")), (Some("x"), Some("down")));

    c.send("SERVICE_STATUS service=x").await;
    let m = c.recv().await;
    assert_eq!((m.get("status"), m.get("instances")), (Some("down"), Some("0")));
    c.send("SERVICE_STATUS").await;
    assert_eq!(c.recv().await.command, "INVALID");
    quiet(&mut plain, "a service that did not declare STATUS").await;
    quiet(&mut watcher, "the watcher").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn broadcast_reaches_every_other_service_exactly_once() {
    let node = Node::start("").await;
    let mut a = service(&node, "a").await;
    let mut b = service(&node, "b").await;
    let mut c = service(&node, "c").await;
    let mut deaf = service_with_commands(&node, "deaf", "OTHER").await;
    let mut anon = TextConn::connect(&node).await;
    for (n, dest) in [(1, "*"), (2, "."), (3, "n1:*"), (4, "*:*")] {
        a.send(&format!("{dest}/PING_ALL n={n}")).await;
        for (name, conn) in [("b", &mut b), ("c", &mut c)] {
            let m = conn.recv().await;
            assert_eq!((m.command.as_str(), m.get("n")), ("PING_ALL", Some(n.to_string().as_str())), "{name} {dest}");
            assert_eq!(m.from, Address::new("n1", "a"));
        }
        sync(&mut a).await; // the sender gets nothing but its own PONG
    }
    quiet(&mut b, "b (exactly once each)").await;
    quiet(&mut c, "c (exactly once each)").await;
    quiet(&mut deaf, "a service that does not understand PING_ALL").await;
    quiet(&mut anon, "an unregistered connection").await;
}

#[tokio::test]
async fn unknown_server_is_unavailable() {
    let node = Node::start("").await;
    let mut c = TextConn::connect(&node).await;
    c.send("other:svc/CMD _id=2").await;
    let m = c.recv().await;
    assert_eq!(m.command, "SERVICE_UNAVAILABLE");
    assert_eq!((m.get("reason"), m.get("command"), m.envelope.reply_to), (Some("unknown_server"), Some("CMD"), 2));
}

// ---------------------------------------------------------------------------------------------
// The node's own commands
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn unknown_node_command_is_answered_unknown() {
    let node = Node::start("").await;
    let mut c = TextConn::connect(&node).await;
    c.send("FOO").await;
    let m = c.recv().await;
    assert_eq!((m.command.as_str(), m.get("command")), ("UNKNOWN", Some("FOO")));
    c.send("node/FOO _id=4").await;
    let m = c.recv().await;
    assert_eq!((m.command.as_str(), m.get("command"), m.envelope.reply_to), ("UNKNOWN", Some("FOO"), 4));
}

#[tokio::test]
async fn ping_is_answered_pong_on_every_node_address() {
    let node = Node::start("").await;
    let mut c = TextConn::connect(&node).await;
    for (id, dest) in [(7, ""), (8, "node/"), (9, "communicatord/"), (10, "n1:node/"), (11, ".:node/")] {
        c.send(&format!("{dest}PING _id={id}")).await;
        let m = c.recv().await;
        assert_eq!((m.command.as_str(), m.envelope.reply_to), ("PONG", id), "{dest}PING");
        assert_eq!(m.from, Address::new("n1", "node"));
    }
}

#[tokio::test]
async fn info_reports_the_node_state() {
    let node = Node::start("").await;
    let mut c = TextConn::connect(&node).await;
    sync(&mut c).await;
    c.send("INFO _id=3").await;
    let m = c.recv().await;
    assert_eq!((m.command.as_str(), m.envelope.reply_to), ("INFO", 3));
    assert_eq!(m.get("server"), Some("n1"));
    // The node's built-in services (`control`, `flags`) registered at its start.
    assert_eq!(m.get("received"), Some("4"), "their REGISTERs, the PING and the INFO itself");
    assert_eq!((m.get("services"), m.get("instances"), m.get("pending")), (Some("2"), Some("2"), Some("0")));
    for key in ["version", "uptime_ms", "delivered", "invalid", "expired", "undeliverable", "cached"] {
        assert!(m.get(key).is_some(), "INFO has {key}: {m:?}");
    }
    let count = |m: &Message, key: &str| m.get(key).and_then(|v| v.parse::<u64>().ok()).expect(key);
    let connections = count(&m, "connections");
    assert!(connections >= 1, "{m:?}");

    let _svc = service(&node, "svc").await;
    c.send("INFO").await;
    let m = c.recv().await;
    assert_eq!(count(&m, "connections"), connections + 1, "one more connection");
    assert_eq!((m.get("services"), m.get("instances")), (Some("3"), Some("3")));
    assert_eq!(count(&m, "received"), 6, "the built-ins', PING, INFO, the service's REGISTER and this INFO");
}

#[tokio::test]
async fn info_counts_client_connections_only() {
    let node = Node::start("").await;
    let mut c = TextConn::connect(&node).await;
    c.send("INFO").await;
    assert_eq!(
        c.recv().await.get("connections"),
        Some("1"),
        "a single client is connected (UDP is disabled; the built-in services are not clients)"
    );
}

#[tokio::test]
async fn cluster_and_clock_status_of_a_single_node() {
    let node = Node::start("").await;
    let mut c = TextConn::connect(&node).await;
    c.send("CLUSTER_STATUS _id=5").await;
    let up = c.recv().await;
    assert_eq!((up.command.as_str(), up.envelope.reply_to), ("CLUSTER_UP", 5));
    let complete = c.recv().await;
    assert_eq!((complete.command.as_str(), complete.envelope.reply_to), ("CLUSTER_COMPLETE", 5));
    c.send("CLOCK_STATUS _id=6").await;
    let m = c.recv().await;
    assert_eq!((m.command.as_str(), m.envelope.reply_to), ("CLOCK_STABLE", 6));
}

/// The next messages on `c` carry `n=` each of `want`, in order.
async fn expect_numbered(c: &mut TextConn, want: &[&str]) {
    for n in want {
        let m = c.recv().await;
        assert_eq!(m.get("n"), Some(*n), "{m:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sniffers_receive_copies_matching_their_filter() {
    let node = Node::start("").await;
    let mut svc = service(&node, "svc").await;
    let mut other = service(&node, "other").await;
    let mut by_command = TextConn::connect(&node).await;
    let mut by_service = TextConn::connect(&node).await;
    let mut all = TextConn::connect(&node).await;
    for (c, line) in
        [(&mut by_command, "SNIFF command=HELLO"), (&mut by_service, "SNIFF service=svc"), (&mut all, "SNIFF")]
    {
        c.send(line).await;
        assert_eq!(c.recv().await.command, "SNIFFING");
    }
    let mut client = TextConn::connect(&node).await;
    client.send_raw(b"svc/HELLO n=1\nsvc/OTHER n=2\nother/HELLO n=3\n").await;
    assert_eq!(svc.recv().await.get("n"), Some("1"));
    assert_eq!(svc.recv().await.get("n"), Some("2"));
    assert_eq!(other.recv().await.get("n"), Some("3"));
    // A message from the service is seen by the service filter too.
    svc.send("other/HELLO n=4").await;
    assert_eq!(other.recv().await.get("n"), Some("4"));

    expect_numbered(&mut all, &["1", "2", "3", "4"]).await;
    expect_numbered(&mut by_service, &["1", "2", "4"]).await;
    expect_numbered(&mut by_command, &["1", "3", "4"]).await;
    client.send("svc/HELLO n=5").await;
    let m = all.recv().await;
    assert_eq!((m.command.as_str(), &m.from, &m.to), ("HELLO", &Address::new("n1", ""), &Address::new("", "svc")));
    assert_eq!(by_service.recv().await.get("n"), Some("5"));
    assert_eq!(by_command.recv().await.get("n"), Some("5"));
    assert_eq!(svc.recv().await.get("n"), Some("5"), "sniffing does not divert the message");
    quiet(&mut by_service, "the service-filtered sniffer").await;
    quiet(&mut by_command, "the command-filtered sniffer").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn text_and_binary_clients_interoperate_with_payloads() {
    let node = Node::start("").await;
    let mut tsvc = service(&node, "tsvc").await;
    let mut bsvc = BinConn::connect(&node).await;
    bsvc.register("bsvc").await;

    // Text → binary: the base64 `_payload` arrives as raw bytes.
    tsvc.send("bsvc/HELLO x=1;_payload=AAEC/w==;_id=4").await;
    let m = bsvc.recv().await;
    assert_eq!((m.command.as_str(), m.get("x"), &m.payload[..]), ("HELLO", Some("1"), &[0u8, 1, 2, 255][..]));
    assert_eq!(m.from, Address::new("n1", "tsvc"));
    // Binary → text: a reply with a payload, correlated to the text requester's id.
    bsvc.send(&m.reply("HELLO_BACK").with_payload(vec![9u8, 0, 10, 13])).await;
    let r = tsvc.recv().await;
    assert_eq!((r.command.as_str(), r.envelope.reply_to, &r.payload[..]), ("HELLO_BACK", 4, &[9u8, 0, 10, 13][..]));
    assert_eq!(r.from, Address::new("n1", "bsvc"));

    // Binary → text: every byte value survives the text form.
    let payload: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    bsvc.send(&Message::new("BLOB").to("tsvc").param("k", "a;b").with_payload(payload.clone())).await;
    let m = tsvc.recv().await;
    assert_eq!((m.command.as_str(), m.get("k")), ("BLOB", Some("a;b")));
    assert_eq!(m.payload, payload);
    // Binary requester, text responder.
    bsvc.send(&Message::new("ASK").to("tsvc").with_id(77)).await;
    let ask = tsvc.recv().await;
    tsvc.send(&format!("ANSWER _payload=b2s=;_reply_to={}", ask.envelope.id)).await;
    let r = bsvc.recv().await;
    assert_eq!((r.command.as_str(), r.envelope.reply_to, &r.payload[..]), ("ANSWER", 77, &b"ok"[..]));
}

// ---------------------------------------------------------------------------------------------
// Bad input and bounds
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn malformed_lines_are_invalid_and_the_connection_stays_usable() {
    let node = Node::start("").await;
    let mut c = TextConn::connect(&node).await;
    let bad = [
        "bad line",
        "CMD a=1;",
        "lower",
        "svc/",
        "/CMD",
        "CMD a",
        "CMD a=\"open",
        "CMD a=\"x\"y",
        "CMD 1a=2",
        "CMD _unknown=1",
        "CMD a=1;a=2",
        "<nocolon CMD",
        "bad name/CMD",
        "CMD _id=x",
        "CMD _payload=!!!",
    ];
    for line in bad {
        c.send(line).await;
        let m = c.recv().await;
        assert_eq!(m.command, "INVALID", "{line:?}");
        assert!(!m.get("message").unwrap_or("").is_empty(), "{line:?}: INVALID says why");
        assert_eq!(m.from, Address::new("n1", "node"));
    }
    sync(&mut c).await;
    c.send("INFO").await;
    assert_eq!(c.recv().await.get("invalid"), Some(bad.len().to_string().as_str()));
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_bytes_are_invalid_and_never_crash_the_node() {
    let node = Node::start("").await;
    let mut c = TextConn::connect(&node).await;
    c.send_raw(b"\xff\xfe\xfd not utf-8\n").await;
    let m = c.recv().await;
    assert_eq!(m.command, "INVALID");
    assert!(m.get("message").unwrap_or("").contains("UTF-8"), "{m:?}");
    c.send_raw(b"PI\0NG\n\x01\x02\x03\r\n").await;
    assert_eq!(c.recv().await.command, "INVALID");
    assert_eq!(c.recv().await.command, "INVALID");
    sync(&mut c).await;

    // Binary frames of the right length whose body is not a message: INVALID, stream in sync.
    let mut b = BinConn::connect(&node).await;
    b.send_raw(&[0, 0, 0, 3, 0xc1, 0xc1, 0xc1]).await;
    assert_eq!(b.recv().await.command, "INVALID");
    b.send_raw(&[0, 0, 0, 1, 0x2a]).await;
    assert_eq!(b.recv().await.command, "INVALID");
    b.send(&Message::new("PING").with_id(5)).await;
    let m = b.recv().await;
    assert_eq!((m.command.as_str(), m.envelope.reply_to), ("PONG", 5));

    // Deterministic junk: as text lines on one connection, as frames after a good preface on
    // another, and as a bad preface on a third.
    for seed in 1..=4u64 {
        let mut text_junk = junk(seed, 16 * 1024);
        text_junk[0] = b'#';
        let mut t = TextConn::connect(&node).await;
        t.send_raw(&text_junk).await;
        t.send_raw(b"\nPING _id=31337\n").await;
        let pong = t.expect("PONG").await;
        assert_eq!(pong.envelope.reply_to, 31337, "the junk connection is still in sync");

        let mut s = TcpStream::connect(node.tcp).await.expect("connect tcp");
        let mut framed = binary::PREFACE.to_vec();
        framed.extend_from_slice(&junk(seed + 100, 16 * 1024));
        let _ = s.write_all(&framed).await;
        let _ = s.shutdown().await;
        read_to_eof(&mut s).await;

        let mut s = TcpStream::connect(node.tcp).await.expect("connect tcp");
        let mut bad_preface = junk(seed + 200, 4096);
        bad_preface[0] = 0;
        let _ = s.write_all(&bad_preface).await;
        read_to_eof(&mut s).await;
    }
    // The node still serves old and new connections.
    sync(&mut c).await;
    let mut fresh = TextConn::connect(&node).await;
    sync(&mut fresh).await;
}

#[tokio::test]
async fn oversized_text_line_is_invalid_then_the_connection_is_closed() {
    let node = Node::start("[limits]\nmax_frame_bytes = 2048").await;
    let mut c = TextConn::connect(&node).await;
    // A line just under the bound is fine.
    c.send(&format!("PING pad={};_id=1", "x".repeat(1900))).await;
    assert_eq!(c.recv().await.command, "PONG");
    c.send(&format!("svc/HUGE pad={}", "y".repeat(5000))).await;
    let m = c.recv().await;
    assert_eq!(m.command, "INVALID");
    assert!(m.get("message").unwrap_or("").contains("exceeds"), "{m:?}");
    c.expect_eof().await;
    let mut fresh = TextConn::connect(&node).await;
    sync(&mut fresh).await;
}

#[tokio::test]
async fn oversized_binary_frame_closes_the_connection() {
    let node = Node::start("[limits]\nmax_frame_bytes = 2048").await;
    let mut b = BinConn::connect(&node).await;
    b.send(&Message::new("PING").with_id(1)).await;
    assert_eq!(b.recv().await.command, "PONG");
    // Only the header: the node must refuse on the announced length alone.
    b.send_raw(&5000u32.to_be_bytes()).await;
    let m = b.recv().await;
    assert_eq!(m.command, "INVALID");
    b.expect_eof().await;
    let mut fresh = BinConn::connect(&node).await;
    fresh.send(&Message::new("PING").with_id(2)).await;
    assert_eq!(fresh.recv().await.envelope.reply_to, 2);
}

#[tokio::test]
async fn bad_binary_preface_version_closes_the_connection() {
    let node = Node::start("").await;
    let mut s = TcpStream::connect(node.tcp).await.expect("connect tcp");
    let mut preface = binary::PREFACE;
    preface[6] = binary::VERSION + 8;
    s.write_all(&preface).await.expect("write");
    s.write_all(&[0, 0, 0, 1, 0xc0]).await.expect("write");
    let got = read_to_eof(&mut s).await;
    if !got.is_empty() {
        assert!(got.starts_with(&binary::PREFACE), "the node answers in its own version");
    }
    let mut fresh = BinConn::connect(&node).await;
    fresh.send(&Message::new("PING").with_id(3)).await;
    assert_eq!(fresh.recv().await.envelope.reply_to, 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_consumer_is_disconnected_and_the_node_keeps_serving() {
    let node =
        Node::start("[limits]\nmax_outbound_messages = 16\nmax_outbound_bytes = 262144\noutbound_stall_secs = 1").await;
    let mut watcher = service_with_commands(&node, "watcher", "STATUS").await;
    // Registers, then never reads again. The flood does not get it cut (what its queue cannot
    // take is refused); writing nothing for outbound_stall_secs with messages waiting does.
    let mut sink = service(&node, "sink").await;
    assert_eq!(watcher.recv().await.get("status"), Some("up"));

    let mut flooder = BinConn::connect(&node).await;
    let flood = Message::new("FLOOD").to("sink").param("cache", "no").with_payload(vec![0x5a; 1024]);
    let mut frames = BytesMut::new();
    for _ in 0..20_000 {
        binary::encode(&flood, &mut frames, 1 << 20).expect("encode");
    }
    flooder.send_raw(&frames).await;
    // One-way probes of 32 KiB fill what the sink's socket buffer still takes; once the sink is
    // gone they are answered SERVICE_UNAVAILABLE.
    let probe = |_| Message::new("FLOOD").to("sink").with_payload(vec![0x5a; 32 * 1024]);
    nodus_tests::probe_until_cut(&mut flooder, probe, |m| {
        assert!(
            matches!(m.get("code"), Some("overloaded" | "disconnected" | "too_many_requests"))
                || m.command == "SERVICE_UNAVAILABLE",
            "{m:?}"
        )
    })
    .await;

    let m = watcher.recv().await;
    assert_eq!((m.get("service"), m.get("status")), (Some("sink"), Some("down")), "the slow sink is cut off");
    sink.expect_eof().await;
    // The node keeps serving: the flooder, the watcher and new connections.
    flooder.send(&Message::new("PING").with_id(8)).await;
    assert_eq!(flooder.expect("PONG").await.envelope.reply_to, 8);
    sync(&mut watcher).await;
    let mut fresh = TextConn::connect(&node).await;
    fresh.send("SERVICE_STATUS service=sink").await;
    assert_eq!(fresh.recv().await.get("status"), Some("down"));
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_beyond_max_connections_are_closed() {
    // The limit is per listener: two on the Unix socket and two on TCP.
    let node = Node::start("[limits]\nmax_connections = 2").await;
    let mut u1 = TextConn::connect(&node).await;
    sync(&mut u1).await;
    let mut u2 = TextConn::connect(&node).await;
    sync(&mut u2).await;
    let mut t1 = BinConn::connect(&node).await;
    t1.send(&Message::new("PING").with_id(1)).await;
    assert_eq!(t1.recv().await.command, "PONG");
    let mut t2 = BinConn::connect(&node).await;
    t2.send(&Message::new("PING").with_id(1)).await;
    assert_eq!(t2.recv().await.command, "PONG");

    let mut u3 = TextConn::connect(&node).await;
    u3.expect_eof().await;
    let mut t3 = TcpStream::connect(node.tcp).await.expect("connect tcp");
    read_to_eof(&mut t3).await;
    // The admitted connections are unaffected.
    sync(&mut u1).await;
    t1.send(&Message::new("PING").with_id(2)).await;
    assert_eq!(t1.recv().await.envelope.reply_to, 2);

    // Once one closes, a new connection is admitted again. There is no event telling when the
    // node has released the slot, so probe (each refused probe ends at once with EOF).
    drop(u1);
    let admitted = async {
        while !served(&node).await {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(WAIT, admitted).await.expect("a slot frees up after a connection closes");
}

// ---------------------------------------------------------------------------------------------
// Absent services and the cache
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn messages_for_an_expected_service_are_cached_until_it_registers() {
    let node = Node::start("expected_services = [\"later\"]").await;
    let mut sender = service(&node, "sender").await;
    sender.send("later/HELLO n=1").await;
    sender.send("later/HELLO n=2;transmission_report=failure;_id=6").await;
    let r = sender.recv().await;
    assert_eq!((r.command.as_str(), r.get("status"), r.envelope.reply_to), ("TRANSMISSION_REPORT", Some("cached"), 6));
    assert_eq!((r.get("destination_service"), r.get("command")), (Some("later"), Some("HELLO")));
    sync(&mut sender).await; // no report for the first one

    let mut later = TextConn::connect(&node).await;
    later.send("REGISTER service=later;version=1").await;
    assert_eq!(later.recv().await.command, "HELP");
    assert_eq!(later.recv().await.command, "READY");
    for n in ["1", "2"] {
        let m = later.recv().await;
        assert_eq!((m.command.as_str(), m.get("n")), ("HELLO", Some(n)), "cached messages in order, after READY");
        assert_eq!(m.from, Address::new("n1", "sender"));
    }
    quiet(&mut later, "the service (each cached message once)").await;
    sender.send("later/HELLO n=3").await;
    assert_eq!(later.recv().await.get("n"), Some("3"));
}

#[tokio::test]
async fn cache_no_drops_or_reports_and_cache_no_reply_answers_unavailable() {
    let node = Node::start("expected_services = [\"later\"]").await;
    let mut c = TextConn::connect(&node).await;
    c.send("later/A cache=no").await;
    sync(&mut c).await; // dropped silently
    c.send("later/B cache=no;transmission_report=failure").await;
    let m = c.recv().await;
    assert_eq!(
        (m.command.as_str(), m.get("status"), m.get("command")),
        ("TRANSMISSION_REPORT", Some("failed"), Some("B"))
    );
    c.send("later/C cache=\"no;reply\";_id=3").await;
    let m = c.recv().await;
    assert_eq!(m.command, "SERVICE_UNAVAILABLE");
    assert_eq!((m.get("destination_service"), m.get("command"), m.envelope.reply_to), (Some("later"), Some("C"), 3));
    sync(&mut c).await;

    let mut later = service(&node, "later").await;
    quiet(&mut later, "the service (nothing was cached)").await;
}

#[tokio::test]
async fn message_for_an_absent_service_that_is_not_expected_is_unavailable() {
    let node = Node::start("expected_services = [\"later\"]").await;
    let mut c = TextConn::connect(&node).await;
    c.send("nobody/HELLO _id=8").await;
    let m = c.recv().await;
    assert_eq!(m.command, "SERVICE_UNAVAILABLE");
    assert_eq!(
        (m.get("destination_service"), m.get("reason"), m.envelope.reply_to),
        (Some("nobody"), Some("unavailable"), 8)
    );
    c.send("nobody/HELLO transmission_report=failure").await;
    let r = c.recv().await;
    assert_eq!((r.command.as_str(), r.get("status")), ("TRANSMISSION_REPORT", Some("failed")));
    assert_eq!(c.recv().await.command, "SERVICE_UNAVAILABLE");
    // Nothing was cached for it either.
    let mut nobody = service(&node, "nobody").await;
    quiet(&mut nobody, "a service registered after its messages were refused").await;
}

#[tokio::test(start_paused = true)]
async fn expired_cached_message_is_never_delivered() {
    let node = Node::start("expected_services = [\"later\"]").await;
    let mut c = TextConn::connect(&node).await;
    let expiry = node.clock.now_ms() + 300;
    c.send(&format!("later/OLD cache=\"ttl=10\";_expires_at={expiry}")).await;
    c.send(&format!("later/FRESH cache=\"ttl=10\";_expires_at={}", node.clock.now_ms() + 60_000)).await;
    sync(&mut c).await; // both cached, nothing reported
                        // Virtual time: the node's clock passes the first message's expiry at once.
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(node.clock.now_ms() > expiry);
    let mut later = service(&node, "later").await;
    let m = later.recv().await;
    assert_eq!(m.command, "FRESH", "the expired message is not delivered: {m:?}");
    quiet(&mut later, "the service (no expired message)").await;
}

#[tokio::test]
async fn a_cached_request_is_correlated_once_delivered() {
    let node = Node::start("expected_services = [\"later\"]").await;
    let mut a = TextConn::connect(&node).await;
    let mut b = TextConn::connect(&node).await;
    a.send("later/ASK who=a;_id=5").await;
    b.send("later/ASK who=b;_id=5").await;
    sync(&mut a).await;
    sync(&mut b).await;
    let mut later = service(&node, "later").await;
    let first = later.recv().await;
    let second = later.recv().await;
    // Replies with no destination, the later request first: correlation alone must route them.
    for ask in [&second, &first] {
        let who = ask.get("who").unwrap();
        later.send(&format!("REPLY echo={who};_reply_to={}", ask.envelope.id)).await;
    }
    let ra = a.try_recv(Duration::from_secs(1)).await.expect("the cached request's reply reaches its requester");
    let rb = b.try_recv(Duration::from_secs(1)).await.expect("the cached request's reply reaches its requester");
    assert_eq!((ra.get("echo"), ra.envelope.reply_to), (Some("a"), 5));
    assert_eq!((rb.get("echo"), rb.envelope.reply_to), (Some("b"), 5));
    assert_ne!(first.envelope.id, second.envelope.id, "equal caller ids do not collide at the service");
}

#[tokio::test]
async fn expired_message_is_refused_with_an_error() {
    let node = Node::start("expected_services = [\"later\"]").await;
    let mut svc = service(&node, "svc").await;
    let mut c = TextConn::connect(&node).await;
    for (id, dest, expires_at) in [(3, "svc", 1_000), (4, "svc", now_ms() - 1), (5, "later", now_ms() - 1)] {
        c.send(&format!("{dest}/OLD _id={id};_expires_at={expires_at}")).await;
        let m = c.recv().await;
        assert_eq!((m.command.as_str(), m.get("code"), m.get("command")), ("ERROR", Some("expired"), Some("OLD")));
        assert_eq!(m.envelope.reply_to, id);
    }
    quiet(&mut svc, "the target of an expired message").await;
    let mut later = service(&node, "later").await;
    quiet(&mut later, "an expected service (expired messages are not cached)").await;
}

// ---------------------------------------------------------------------------------------------
// Stopping
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn stop_command_stops_the_node_and_every_client_gets_quitting() {
    let mut node = Node::start("").await;
    let mut a = service(&node, "a").await;
    let mut b = BinConn::connect(&node).await;
    b.send(&Message::new("PING").with_id(1)).await;
    assert_eq!(b.recv().await.command, "PONG");
    let mut c = TextConn::connect(&node).await;
    c.send("STOP _id=9").await;
    let m = c.recv().await;
    assert_eq!((m.command.as_str(), m.envelope.reply_to), ("STOPPING", 9));
    node.wait_stopped().await;

    assert_eq!(a.recv().await.command, "QUITTING");
    a.expect_eof().await;
    assert_eq!(b.recv().await.command, "QUITTING");
    b.expect_eof().await;
    assert_eq!(c.recv().await.command, "QUITTING");
    c.expect_eof().await;
    assert!(!node.unix.exists(), "the Unix socket is removed");
}

#[tokio::test(flavor = "multi_thread")]
async fn graceful_shutdown_drains_requests_in_flight() {
    let mut node = Node::start("").await;
    let mut svc = service(&node, "svc").await;
    let mut a = TextConn::connect(&node).await;
    let mut b = TextConn::connect(&node).await;
    sync(&mut b).await;
    a.send("svc/ASK _id=1").await;
    let ask = svc.recv().await;

    node.begin_stop();
    wait_until_quitting(&mut b).await;
    b.send("svc/ASK _id=2").await;
    let m = b.recv().await;
    assert_eq!((m.command.as_str(), m.envelope.reply_to), ("QUITTING", 2));
    b.send("REGISTER service=late;version=1").await;
    assert_eq!(b.recv().await.command, "QUITTING", "no new registrations while stopping");
    quiet(&mut svc, "the service (no new request)").await;
    quiet(&mut a, "the requester (the node waits for the reply)").await;

    svc.send(&format!("ANSWER _reply_to={}", ask.envelope.id)).await;
    let r = a.recv().await;
    assert_eq!((r.command.as_str(), r.envelope.reply_to), ("ANSWER", 1));
    node.wait_stopped().await;
    for c in [&mut a, &mut b, &mut svc] {
        assert_eq!(c.recv().await.command, "QUITTING");
        c.expect_eof().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn graceful_shutdown_closes_connections_that_never_spoke() {
    let mut node = Node::start("").await;
    let mut silent = UnixStream::connect(&node.unix).await.expect("connect unix");
    // Accepted in order: once a later connection is served, the silent one was accepted too.
    let mut probe = TextConn::connect(&node).await;
    sync(&mut probe).await;
    node.begin_stop();
    tokio::time::timeout(Duration::from_millis(1500), node.wait_stopped())
        .await
        .expect("with nothing in flight the node stops promptly");
    read_to_eof(&mut silent).await;
    probe.expect("QUITTING").await;
    probe.expect_eof().await;
}
