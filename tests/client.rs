//! Client SDK tests against a real daemon: request/reply, errors, reconnect across a daemon
//! restart, and holding messages while disconnected.

use nodus_client::{Client, ClientConfig, ClientError, State};
use nodus_tests::{Node, WAIT};
use nodus_wire::Message;
use std::time::Duration;

fn unix(node: &Node) -> String {
    format!("unix:{}", node.unix.display())
}

/// Runs an echo service on `client`: every request is answered with its payload.
fn serve_echo(client: Client, mut incoming: nodus_client::Incoming) -> tokio::task::JoinHandle<()> {
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

#[tokio::test(flavor = "multi_thread")]
async fn request_reply_over_unix_and_tcp() {
    let node = Node::start("").await;
    let (svc, inc) = Client::connect(ClientConfig::new(unix(&node)).service("echo")).await.unwrap();
    assert_eq!(svc.server(), "n1");
    serve_echo(svc, inc);
    for endpoint in [unix(&node), node.tcp.to_string()] {
        let (c, _) = Client::connect(ClientConfig::new(endpoint)).await.unwrap();
        let reply = c.request(Message::new("ECHO").to("echo").with_payload(vec![7u8; 4096]), WAIT).await.unwrap();
        assert_eq!(reply.command, "ECHOED");
        assert_eq!(reply.payload, vec![7u8; 4096]);
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
            let reply = c.request(Message::new("ECHO").to("echo").with_payload(i.to_be_bytes().to_vec()), WAIT).await;
            assert_eq!(reply.unwrap().payload, i.to_be_bytes().to_vec());
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn errors_are_clear() {
    let node = Node::start("").await;
    let missing = format!("unix:{}", node.dir.path().join("absent.sock").display());
    match Client::connect(ClientConfig::new(missing)).await {
        Err(ClientError::Connect { reason, .. }) => assert!(!reason.is_empty()),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("connecting to a missing socket must fail"),
    }
    assert!(matches!(Client::connect(ClientConfig::new("nonsense")).await, Err(ClientError::BadEndpoint(_))));
    match Client::connect(ClientConfig::new(unix(&node)).service("node")).await {
        Err(ClientError::Register(why)) => assert!(why.contains("cannot be registered"), "{why}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("`node` is reserved"),
    }
    // A registered service that never answers: the request times out on the client side.
    let (_silent, _inc) = Client::connect(ClientConfig::new(unix(&node)).service("silent")).await.unwrap();
    let (c, _) = Client::connect(ClientConfig::new(unix(&node))).await.unwrap();
    let r = c.request(Message::new("ASK").to("silent"), Duration::from_millis(200)).await;
    assert!(matches!(r, Err(ClientError::Timeout(_))), "{r:?}");
    // An absent service: the node answers at once.
    let r = c.request(Message::new("ASK").to("nobody"), WAIT).await.unwrap();
    assert_eq!(r.command, "SERVICE_UNAVAILABLE");
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_reconnect_and_reregister_after_a_daemon_restart() {
    let node = Node::start("").await;
    let endpoint = unix(&node);
    let (svc, inc) = Client::connect(ClientConfig::new(&endpoint).service("echo")).await.unwrap();
    serve_echo(svc.clone(), inc);
    let (c, _) = Client::connect(ClientConfig::new(&endpoint)).await.unwrap();
    assert_eq!(c.request(Message::new("ECHO").to("echo"), WAIT).await.unwrap().command, "ECHOED");

    let dir = node.stop().await;
    assert!(c.wait_state(State::Reconnecting, WAIT).await, "the client notices the node went away");
    assert!(matches!(c.request(Message::new("ECHO").to("echo"), WAIT).await, Err(ClientError::NotConnected)));

    let node = Node::start_in(dir, "").await;
    assert_eq!(unix(&node), endpoint, "same socket path after restart");
    assert!(c.wait_state(State::Connected, WAIT).await, "the client reconnects");
    assert!(svc.wait_state(State::Connected, WAIT).await, "the service reconnects");
    // The service registers again as part of reconnecting, before its state says Connected.
    let reply = c.request(Message::new("ECHO").to("echo").with_payload(b"again".to_vec()), WAIT).await.unwrap();
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
