//! Client SDK tests against a real daemon: request/reply, the node's refusals as errors, oversize
//! messages, slow consumers, cancelled requests, reconnect across a daemon restart, holding
//! messages while disconnected; and the token handshake against a scripted node.

use bytes::BytesMut;
use nodus_client::{Client, ClientConfig, ClientError, Incoming, RefusalKind, State};
use nodus_tests::{Node, WAIT};
use nodus_wire::{binary, Decoded, Message};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn unix(node: &Node) -> String {
    format!("unix:{}", node.unix.display())
}

/// Runs an echo service on `client`: every request is answered with its payload.
fn serve_echo(client: Client, mut incoming: Incoming) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(m) = incoming.recv().await {
            if m.envelope.id != 0 && m.envelope.reply_to == 0 {
                let reply = m.reply("ECHOED").with_payload(m.payload.clone());
                if client.send(reply).await.is_err() {
                    // Disconnected mid-reply: the requester gets an error from the node.
                }
            }
        }
    })
}

/// The refusal a request ended in.
fn refusal(r: Result<Message, ClientError>) -> nodus_client::Refusal {
    match r {
        Err(ClientError::Refused(r)) => r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn request_reply_over_unix_and_tcp() {
    let node = Node::start("").await;
    let (svc, inc) = Client::connect(ClientConfig::new(unix(&node)).service("echo")).await.unwrap();
    assert_eq!(svc.server(), "n1");
    serve_echo(svc, inc);
    for endpoint in [unix(&node), node.tcp.to_string()] {
        let (c, _) = Client::connect(ClientConfig::new(endpoint)).await.unwrap();
        let reply = c.request(Message::new("ECHO").to("echo").with_payload(vec![7u8; 4096])).await.unwrap();
        assert_eq!(reply.command, "ECHOED");
        assert_eq!(&reply.payload[..], &[7u8; 4096][..]);
        assert_eq!(reply.from.service, "echo");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn many_requests_in_flight_are_matched_to_their_replies() {
    let node = Node::start("").await;
    let (svc, inc) = Client::connect(ClientConfig::new(unix(&node)).service("echo")).await.unwrap();
    serve_echo(svc, inc);
    let (c, _) = Client::connect(ClientConfig::new(unix(&node))).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let reply = c.request(Message::new("ECHO").to("echo").with_payload(i.to_be_bytes().to_vec())).await;
            assert_eq!(&reply.unwrap().payload[..], &i.to_be_bytes()[..]);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(c.pending_requests().await.unwrap(), 0);
}

#[tokio::test]
async fn errors_are_clear_and_keep_their_source() {
    let node = Node::start("").await;
    let missing = format!("unix:{}", node.dir.path().join("absent.sock").display());
    match Client::connect(ClientConfig::new(missing)).await {
        Err(ClientError::Connect { source, .. }) => assert_eq!(source.kind(), std::io::ErrorKind::NotFound),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("connecting to a missing socket must fail"),
    }
    let e = Client::connect(ClientConfig::new(unix(&node).replace(".sock", ".nope"))).await.err().unwrap();
    assert!(std::error::Error::source(&e).is_some(), "the io::Error is the source of {e}");
    assert!(matches!(Client::connect(ClientConfig::new("nonsense")).await, Err(ClientError::BadEndpoint(_))));
    match Client::connect(ClientConfig::new(unix(&node)).service("node")).await {
        Err(ClientError::Register(why)) => assert!(why.contains("cannot be registered"), "{why}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("`node` is reserved"),
    }
    // A registered service that never answers: the request times out on the client side, with
    // the explicit timeout or the configured default.
    let (_silent, _inc) = Client::connect(ClientConfig::new(unix(&node)).service("silent")).await.unwrap();
    let config = ClientConfig::new(unix(&node)).request_timeout(Duration::from_millis(200));
    let (c, _) = Client::connect(config).await.unwrap();
    let r = c.request_with_timeout(Message::new("ASK").to("silent"), Duration::from_millis(100)).await;
    assert!(matches!(r, Err(ClientError::Timeout(d)) if d == Duration::from_millis(100)), "{r:?}");
    let r = c.request(Message::new("ASK").to("silent")).await;
    assert!(matches!(r, Err(ClientError::Timeout(d)) if d == Duration::from_millis(200)), "{r:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_nodes_refusals_are_errors_not_replies() {
    let node = Node::start("").await;
    let (c, _) = Client::connect(ClientConfig::new(unix(&node))).await.unwrap();
    // Nobody serves it.
    let r = refusal(c.request(Message::new("ASK").to("nobody")).await);
    assert_eq!((r.kind(), r.code(), r.server()), (RefusalKind::ServiceUnavailable, Some("unavailable"), "n1"));
    assert!(r.to_string().contains("not registered"), "{r}");
    // The node does not know the command.
    let r = refusal(c.request(Message::new("NOPE")).await);
    assert_eq!((r.kind(), r.command()), (RefusalKind::Unknown, Some("NOPE")));
    assert!(r.to_string().contains("command NOPE"), "{r}");
    // A service that declared its commands does not accept this one.
    let picky = ClientConfig::new(unix(&node)).service("picky").commands(["ONLY"]);
    let (_picky, _inc) = Client::connect(picky).await.unwrap();
    let r = refusal(c.request(Message::new("OTHER").to("picky")).await);
    assert_eq!((r.kind(), r.command()), (RefusalKind::Unknown, Some("OTHER")));
    // A malformed node command.
    let r = refusal(c.request(Message::new("SERVICE_STATUS")).await);
    assert_eq!(r.kind(), RefusalKind::Invalid);
    // Expired before delivery.
    let mut old = Message::new("ASK").to("picky");
    old.envelope.expires_at = 1;
    let r = refusal(c.request(old).await);
    assert_eq!((r.kind(), r.code()), (RefusalKind::Error, Some("expired")));
    // The responder went away before answering.
    let (gone, mut gone_in) = Client::connect(ClientConfig::new(unix(&node)).service("flaky")).await.unwrap();
    let asked = tokio::spawn({
        let c = c.clone();
        async move { c.request(Message::new("ASK").to("flaky")).await }
    });
    let got = tokio::time::timeout(WAIT, gone_in.recv()).await.unwrap().unwrap();
    assert_eq!(got.command, "ASK");
    drop((gone, gone_in));
    let r = refusal(asked.await.unwrap());
    assert_eq!((r.kind(), r.code()), (RefusalKind::Error, Some("disconnected")));
    // `cache=no` for a service nobody serves: dropped, and the report says so.
    let r = refusal(
        c.request(Message::new("ASK").to("nobody").param("cache", "no").param("transmission_report", "failure")).await,
    );
    assert_eq!(r.kind(), RefusalKind::Dropped);
    // A service's own answer is a reply, whatever its command.
    let (svc, mut inc) = Client::connect(ClientConfig::new(unix(&node)).service("grumpy")).await.unwrap();
    tokio::spawn(async move {
        while let Some(m) = inc.recv().await {
            let _ = svc.send(m.reply("ERROR").param("code", "mine")).await;
        }
    });
    let reply = c.request(Message::new("ASK").to("grumpy")).await.unwrap();
    assert_eq!((reply.command.as_str(), reply.get("code")), ("ERROR", Some("mine")));
    // While the node shuts down, new requests are refused with QUITTING. A request the `slow`
    // service holds keeps the node in its grace period, long enough to ask.
    let (_slow, mut slow_in) = Client::connect(ClientConfig::new(unix(&node)).service("slow")).await.unwrap();
    let in_flight = tokio::spawn({
        let c = c.clone();
        async move { c.request_with_timeout(Message::new("ASK").to("slow"), WAIT).await }
    });
    tokio::time::timeout(WAIT, slow_in.recv()).await.unwrap().unwrap();
    let mut node = node;
    node.begin_stop();
    let deadline = tokio::time::Instant::now() + WAIT;
    let r = loop {
        match c.request(Message::new("ASK").to("grumpy")).await {
            Err(ClientError::Refused(r)) => break r,
            Ok(_) => assert!(tokio::time::Instant::now() < deadline, "never QUITTING"),
            Err(e) => panic!("{e}"),
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(r.kind(), RefusalKind::Quitting);
    drop(in_flight);
}

#[tokio::test]
async fn an_oversize_message_fails_in_send_not_as_a_timeout() {
    let node = Node::start("").await;
    let (c, _) = Client::connect(ClientConfig::new(unix(&node)).max_frame(2048)).await.unwrap();
    let big = Message::new("BIG").to("anyone").with_payload(vec![0u8; 4096]);
    match c.send(big.clone()).await {
        Err(ClientError::TooLarge { len, max }) => assert!(len > 4096 && max == 2048, "{len} {max}"),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let started = tokio::time::Instant::now();
    assert!(matches!(c.request(big).await, Err(ClientError::TooLarge { .. })));
    assert!(started.elapsed() < Duration::from_secs(1), "refused at once");
    // The connection is fine afterwards.
    assert_eq!(c.request(Message::new("PING")).await.unwrap().command, "PONG");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_reader_of_incoming_never_stalls_replies() {
    let node = Node::start("").await;
    // A service that reads nothing, with room for 4 incoming messages.
    let config = ClientConfig::new(unix(&node)).service("sluggish").incoming_capacity(4);
    let (svc, mut inc) = Client::connect(config).await.unwrap();
    let (c, _) = Client::connect(ClientConfig::new(unix(&node))).await.unwrap();
    for i in 0..100u32 {
        c.send(Message::new("NOTE").to("sluggish").param("i", i)).await.unwrap();
    }
    // The node handles a connection's messages in order: once PONG is back, all 100 are queued
    // for the service ahead of any reply to its next request.
    c.request(Message::new("PING")).await.unwrap();
    // Before: the driver waited for room in `incoming`, so this reply never came.
    let info = svc.request_with_timeout(Message::new("INFO"), WAIT).await.unwrap();
    assert_eq!(info.command, "INFO");
    assert_eq!(inc.dropped(), 96, "4 kept, the rest dropped and counted");
    for i in 0..4u32 {
        let m = inc.try_recv().expect("the first messages are kept");
        assert_eq!(m.get("i"), Some(i.to_string().as_str()));
    }
    // Once read, new messages flow again.
    c.send(Message::new("NOTE").to("sluggish").param("i", "again")).await.unwrap();
    let m = tokio::time::timeout(WAIT, inc.recv()).await.unwrap().unwrap();
    assert_eq!(m.get("i"), Some("again"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_request_leaves_nothing_behind() {
    let node = Node::start("").await;
    let (_silent, _inc) = Client::connect(ClientConfig::new(unix(&node)).service("silent")).await.unwrap();
    let (c, _) = Client::connect(ClientConfig::new(unix(&node))).await.unwrap();
    // Futures dropped while waiting (an outer timeout, a select! that took another branch).
    for _ in 0..50 {
        let dropped = tokio::time::timeout(Duration::from_millis(1), c.request(Message::new("ASK").to("silent")));
        assert!(dropped.await.is_err());
    }
    let mut aborted = Vec::new();
    for _ in 0..50 {
        let c = c.clone();
        aborted.push(tokio::spawn(async move { c.request(Message::new("ASK").to("silent")).await }));
    }
    for t in &aborted {
        t.abort();
    }
    for t in aborted {
        assert!(t.await.unwrap_err().is_cancelled());
    }
    // Before: each dropped request stayed in the pending map for good.
    assert_eq!(c.pending_requests().await.unwrap(), 0);
    // The client works on.
    assert_eq!(c.request(Message::new("PING")).await.unwrap().command, "PONG");
}

#[tokio::test(flavor = "multi_thread")]
async fn incoming_is_a_stream() {
    let node = Node::start("").await;
    let (_svc, mut inc) = Client::connect(ClientConfig::new(unix(&node)).service("streamed")).await.unwrap();
    let (c, _) = Client::connect(ClientConfig::new(unix(&node))).await.unwrap();
    c.send(Message::new("HELLO").to("streamed")).await.unwrap();
    fn next<S: futures_core::Stream + Unpin>(s: &mut S) -> impl std::future::Future<Output = Option<S::Item>> + '_ {
        std::future::poll_fn(move |cx| std::pin::Pin::new(&mut *s).poll_next(cx))
    }
    let m = tokio::time::timeout(WAIT, next(&mut inc)).await.unwrap().unwrap();
    assert_eq!(m.command, "HELLO");
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_reconnect_and_reregister_after_a_daemon_restart() {
    let node = Node::start("").await;
    let endpoint = unix(&node);
    let (svc, inc) = Client::connect(ClientConfig::new(&endpoint).service("echo")).await.unwrap();
    serve_echo(svc.clone(), inc);
    let (c, _) = Client::connect(ClientConfig::new(&endpoint)).await.unwrap();
    assert_eq!(c.request(Message::new("ECHO").to("echo")).await.unwrap().command, "ECHOED");

    let dir = node.stop().await;
    assert!(c.wait_state(State::Reconnecting, WAIT).await, "the client notices the node went away");
    assert!(matches!(c.request(Message::new("ECHO").to("echo")).await, Err(ClientError::NotConnected)));

    let node = Node::start_in(dir, "").await;
    assert_eq!(unix(&node), endpoint, "same socket path after restart");
    assert!(c.wait_state(State::Connected, WAIT).await, "the client reconnects");
    assert!(svc.wait_state(State::Connected, WAIT).await, "the service reconnects");
    // The service registers again as part of reconnecting, before its state says Connected.
    let reply = c.request(Message::new("ECHO").to("echo").with_payload(b"again".to_vec())).await.unwrap();
    assert_eq!((reply.command.as_str(), &reply.payload[..]), ("ECHOED", &b"again"[..]));
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_sent_while_disconnected_are_held_and_delivered() {
    let node = Node::start("").await;
    let endpoint = unix(&node);
    let (sender, _) = Client::connect(ClientConfig::new(&endpoint).hold(8)).await.unwrap();
    let dir = node.stop().await;
    assert!(sender.wait_state(State::Reconnecting, WAIT).await);
    for i in 0..8u8 {
        sender.send(Message::new("NOTE").to("sink").with_payload(vec![i])).await.unwrap();
    }
    assert!(matches!(sender.send(Message::new("NOTE").to("sink")).await, Err(ClientError::QueueFull)));

    let node = Node::start_in(dir, "expected_services = [\"sink\"]").await;
    let (_sink, mut inc) = Client::connect(ClientConfig::new(unix(&node)).service("sink")).await.unwrap();
    assert!(sender.wait_state(State::Connected, WAIT).await);
    // Held messages reach the node after reconnecting: either delivered directly or cached for
    // `sink` (expected) until it registered; either way, in order and exactly once.
    for i in 0..8u8 {
        let m = tokio::time::timeout(WAIT, inc.recv()).await.unwrap().unwrap();
        assert_eq!((m.command.as_str(), &m.payload[..]), ("NOTE", &[i][..]));
    }
}

/// A scripted node on a Unix socket: reads the client's preface and first frames, answers each
/// with `answer(msg)`, and reports what it received.
async fn scripted_node(
    answer: fn(&Message) -> Vec<Message>,
) -> (tempfile::TempDir, String, tokio::task::JoinHandle<Vec<Message>>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scripted.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(&binary::PREFACE).await.unwrap();
        let mut decoder = binary::FrameDecoder::new(1 << 20);
        let mut buf = BytesMut::new();
        let mut seen = Vec::new();
        loop {
            while let Ok(Some(Decoded::Message(m))) = decoder.decode(&mut buf) {
                let mut out = BytesMut::new();
                for reply in answer(&m) {
                    binary::encode(&reply, &mut out, 1 << 20).unwrap();
                }
                s.write_all(&out).await.unwrap();
                seen.push(m);
            }
            if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                return seen;
            }
        }
    });
    (dir, format!("unix:{}", path.display()), task)
}

fn node_says(req: &Message, command: &str) -> Message {
    let mut m = req.reply(command);
    m.from = nodus_wire::Address::new("scripted", "node");
    m
}

#[tokio::test]
async fn a_token_is_sent_first_and_a_refused_token_is_an_error() {
    let token = "ab".repeat(32);
    let (_dir, endpoint, node) = scripted_node(|m| match m.command.as_str() {
        "AUTH" if m.get("token") == Some(&"ab".repeat(32)) => {
            vec![node_says(m, "AUTHENTICATED").param("principal", "owner").param("permissions", "admin")]
        }
        "REGISTER" => vec![node_says(m, "HELP"), node_says(m, "READY").param("server", "scripted")],
        _ => vec![],
    })
    .await;
    let (c, _) = Client::connect(ClientConfig::new(&endpoint).token(&token).service("svc")).await.unwrap();
    assert_eq!(c.server(), "scripted");
    drop(c);
    let seen = tokio::time::timeout(WAIT, node).await.unwrap().unwrap();
    let commands: Vec<&str> = seen.iter().map(|m| m.command.as_str()).collect();
    assert_eq!(commands[..2], ["AUTH", "REGISTER"], "AUTH right after the preface, before REGISTER");
    assert!(!format!("{:?}", ClientConfig::new("x").token(&token)).contains(&token), "Debug hides the token");

    let (_dir, endpoint, _node) = scripted_node(|m| match m.command.as_str() {
        "AUTH" => vec![node_says(m, "ERROR").param("code", "unauthorized").param("message", "wrong token")],
        "PING" => vec![node_says(m, "PONG").param("server", "scripted")],
        _ => vec![],
    })
    .await;
    match Client::connect(ClientConfig::new(&endpoint).token("00")).await {
        Err(ClientError::Unauthorized(why)) => assert_eq!(why, "wrong token"),
        other => panic!("expected Unauthorized, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn a_node_without_access_control_ignores_the_token() {
    // A node from before `AUTH` answers it UNKNOWN: the client carries on without it. A node
    // with access control checks it; its own token (when it wrote one) is accepted.
    let node = Node::start("").await;
    let token = std::fs::read_to_string(node.dir.path().join("data/auth.token")).unwrap_or_else(|_| "00".repeat(32));
    let (c, _) = Client::connect(ClientConfig::new(node.tcp.to_string()).token(token.trim())).await.unwrap();
    assert_eq!(c.request(Message::new("PING")).await.unwrap().command, "PONG");
}
