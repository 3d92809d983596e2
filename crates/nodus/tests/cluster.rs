//! Several `nodus daemon` processes on loopback forming a cluster: discovery by gossip, routing
//! over two hops, broadcasts delivered once, failure detection (kill -9 and a frozen process),
//! rejoin after restart, and refusal of a node with the wrong secret.
//!
//! Every wait is on an event (a notification or a status answer) with a deadline.
// These tests drive real processes and wait on the wall clock with std::thread::sleep.
#![allow(clippy::disallowed_methods)]

mod common;

use common::*;
use nodus_client::{Client, ClientConfig, RefusalKind};
use nodus_wire::Message;
use std::time::{Duration, Instant};

#[test]
fn three_nodes_in_a_line_learn_each_other_and_route_two_hops() {
    rt().block_on(async {
        let root = tempfile::tempdir().unwrap();
        let a = Proc::new(&root, "a", &[], "");
        let b = Proc::new(&root, "b", &[a.port], "");
        let c = Proc::new(&root, "c", &[b.port], "");
        let mut wa = Watch::on(&a, "watch").await;
        let mut wc = Watch::on(&c, "watch").await;
        wa.wait_for(3, 3).await;
        wc.wait_for(3, 3).await;
        let (up, complete, _, _) = wa.status().await;
        assert!(up && complete);

        // a has no direct link to c: the request travels a → b → c and the reply comes back.
        let info = wa.client.request_with_timeout(Message::new("CLUSTER_INFO"), WAIT).await.unwrap();
        let links = info.get("links").unwrap();
        assert!(links.starts_with("b@") && !links.contains("c@"), "{links}");
        let (svc, mut inc) = Client::connect(ClientConfig::new(c.endpoint()).service("far")).await.unwrap();
        tokio::spawn(async move {
            while let Some(m) = inc.recv().await {
                let _ = svc.send(m.reply("FROM_C").with_payload(m.payload.clone())).await;
            }
        });
        // Wait until a has learned by gossip where `far` lives.
        let deadline = Instant::now() + WAIT;
        let reply = loop {
            let r = ask(&wa.client, Message::new("ASK").to("far").with_payload(b"hi".to_vec())).await;
            if r.command == "FROM_C" {
                break r;
            }
            assert!(Instant::now() < deadline, "service never became reachable: {r:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!((reply.from.server.as_str(), &reply.payload[..]), ("c", &b"hi"[..]));
        let explicit = wa.client.request_with_timeout(Message::new("ASK").to("c:far"), WAIT).await.unwrap();
        assert_eq!(explicit.command, "FROM_C");
        // The node's refusal is an error, not a reply.
        let missing = wa.client.request_with_timeout(Message::new("ASK").to("zz:far"), WAIT).await.unwrap_err();
        let refusal = missing.refusal().expect("a refusal");
        assert_eq!((refusal.kind(), refusal.code()), (RefusalKind::ServiceUnavailable, Some("unknown_server")));
        drop(b);
    });
}

#[test]
fn broadcasts_reach_every_service_exactly_once() {
    rt().block_on(async {
        let root = tempfile::tempdir().unwrap();
        let a = Proc::new(&root, "a", &[], "");
        let b = Proc::new(&root, "b", &[a.port], "");
        let c = Proc::new(&root, "c", &[a.port, b.port], "");
        let mut w = Watch::on(&a, "watch").await;
        let mut listeners = Vec::new();
        for p in [&a, &b, &c] {
            let config = ClientConfig::new(p.endpoint()).service("bcast").commands(["HELLO"]).no_reconnect();
            listeners.push(Client::connect(config).await.unwrap());
        }
        w.wait_for(3, 3).await;
        // Gossip about the services is what matters here; wait until c sees a's and b's.
        let wc = Watch::on(&c, "watch2").await;
        let deadline = Instant::now() + WAIT;
        while ask(&wc.client, Message::new("ASK").to("a:bcast")).await.command == "SERVICE_UNAVAILABLE" {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        w.client.send(Message::new("HELLO").to("*:bcast").param("n", 1)).await.unwrap();
        w.client.send(Message::new("HELLO").to("*:*").param("n", 2)).await.unwrap();
        for (_, inc) in listeners.iter_mut() {
            for n in ["1", "2"] {
                let m = tokio::time::timeout(WAIT, inc.recv()).await.unwrap().unwrap();
                assert_eq!((m.command.as_str(), m.get("n")), ("HELLO", Some(n)));
            }
        }
        // Nothing else arrives: each broadcast was delivered once per service.
        for (_, inc) in listeners.iter_mut() {
            assert!(tokio::time::timeout(Duration::from_millis(300), inc.recv()).await.is_err());
        }
    });
}

#[test]
fn failures_are_detected_and_restarted_nodes_rejoin() {
    rt().block_on(async {
        let root = tempfile::tempdir().unwrap();
        let a = Proc::new(&root, "a", &[], "");
        let b = Proc::new(&root, "b", &[a.port], "");
        let mut c = Proc::new(&root, "c", &[a.port, b.port], "");
        let mut w = Watch::on(&a, "watch").await;
        w.wait_for(3, 3).await;

        // kill -9: sockets close, detection is immediate; 2 of 3 keeps the quorum.
        c.kill9();
        let took = w.wait_for(2, 3).await;
        let (up, complete, _, _) = w.status().await;
        assert!(up && !complete, "2/3 is UP and INCOMPLETE");
        assert!(took < Duration::from_secs(3), "detected in {took:?}");

        // Restart: c dials its remembered neighbours and the cluster is complete again.
        c.start();
        w.wait_for(3, 3).await;

        // A frozen process keeps its sockets open: only the failure detector can tell.
        c.signal("-STOP");
        let took = w.wait_for(2, 3).await;
        assert!(took < Duration::from_secs(3), "phi-accrual detected a silent node in {took:?}");
        c.signal("-CONT");
        w.wait_for(3, 3).await;

        // Losing two of three: the survivor reports DOWN.
        drop(b);
        c.kill9();
        w.wait_for(1, 3).await;
        let (up, _, _, _) = w.status().await;
        assert!(!up, "1/3 is below the quorum");
    });
}

#[test]
fn a_node_with_the_wrong_secret_is_refused() {
    rt().block_on(async {
        let root = tempfile::tempdir().unwrap();
        let a = Proc::new(&root, "a", &[], "right");
        let b = Proc::new(&root, "b", &[a.port], "right");
        let intruder = Proc::new(&root, "x", &[a.port], "wrong");
        let mut w = Watch::on(&a, "watch").await;
        w.wait_for(2, 2).await;
        let wx = Watch::on(&intruder, "watch").await;
        // Give the intruder's dialer time for several attempts: each is refused.
        for _ in 0..5 {
            let (_, _, live, known) = wx.status().await;
            assert_eq!((live, known), (1, 1));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let info = w.client.request_with_timeout(Message::new("CLUSTER_INFO"), WAIT).await.unwrap();
        assert!(!info.get("nodes").unwrap().contains("x@"));
        drop(b);
    });
}

#[test]
fn tls_links_authenticate_both_ends_and_refuse_a_foreign_certificate() {
    rt().block_on(async {
        let root = tempfile::tempdir().unwrap();
        let ca = Ca::new(root.path(), "cluster-ca");
        let rogue_ca = Ca::new(root.path(), "rogue-ca");
        let a = Proc::with_tls(&root, "a", &[], "", Some(ca.node("a")));
        let b = Proc::with_tls(&root, "b", &[a.port], "", Some(ca.node("b")));
        let mut w = Watch::on(&a, "watch").await;
        w.wait_for(2, 2).await;

        // Routed traffic flows over the TLS link.
        let (svc, mut inc) = Client::connect(ClientConfig::new(b.endpoint()).service("secure")).await.unwrap();
        tokio::spawn(async move {
            while let Some(m) = inc.recv().await {
                let _ = svc.send(m.reply("OK")).await;
            }
        });
        let deadline = Instant::now() + WAIT;
        while ask(&w.client, Message::new("ASK").to("b:secure")).await.command != "OK" {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // A node whose certificate another CA signed never joins, in either direction.
        let x = Proc::with_tls(&root, "x", &[a.port], "", Some(rogue_ca.node("x")));
        let wx = Watch::on(&x, "watch").await;
        for _ in 0..5 {
            assert_eq!(wx.status().await.2, 1, "the rogue node stays alone");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(w.status().await.3, 2, "a never learned of the rogue node");
        drop(b);
    });
}

#[test]
fn five_nodes_follow_the_quorum_and_obey_forget_and_shutdown() {
    rt().block_on(async {
        let root = tempfile::tempdir().unwrap();
        // Cluster-wide FORGET and SHUTDOWN are obeyed only from authenticated nodes.
        let secret = "five-node-secret";
        let mut a = Proc::new(&root, "a", &[], secret);
        let mut b = Proc::new(&root, "b", &[a.port], secret);
        let mut c = Proc::new(&root, "c", &[a.port], secret);
        let mut d = Proc::new(&root, "d", &[b.port], secret);
        let mut e = Proc::new(&root, "e", &[c.port], secret);
        let mut w = Watch::on(&a, "watch").await;
        w.wait_for(5, 5).await;
        let status = String::from_utf8(cli(&a, &["cluster", "status"]).stdout).unwrap();
        assert!(status.starts_with("cluster UP COMPLETE: 5 of 5 nodes live (quorum 3)"), "{status}");

        d.kill9();
        e.kill9();
        w.wait_for(3, 5).await;
        let (up, complete, _, _) = w.status().await;
        assert!(up && !complete, "3 of 5 is UP and INCOMPLETE");
        c.kill9();
        w.wait_for(2, 5).await;
        let json = String::from_utf8(cli(&a, &["--json", "cluster", "status"]).stdout).unwrap();
        assert!(json.contains("\"up\":false") && json.contains("\"live\":2"), "{json}");

        c.start();
        w.wait_for(3, 5).await;
        assert!(w.status().await.0, "3 of 5 is UP again");

        // Forget the two dead nodes everywhere: 3 of 3, complete.
        for gone in ["d", "e"] {
            let out = cli(&a, &["cluster", "forget", gone]);
            assert!(out.status.success(), "{out:?}");
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).lines().next(),
                Some(format!("forgot node {gone}: every node of the cluster drops it from its memory").as_str())
            );
        }
        w.wait_for(3, 3).await;
        let wc = Watch::on(&c, "watch").await;
        let deadline = Instant::now() + WAIT;
        while wc.status().await.3 != 3 {
            assert!(Instant::now() < deadline, "FORGET reached c");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // SHUTDOWN stops every node.
        let out = cli(&b, &["cluster", "shutdown"]);
        assert!(out.status.success(), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("every node of the cluster is stopping"), "{out:?}");
        for p in [&mut a, &mut b, &mut c] {
            wait_exit(p);
        }
    });
}

#[test]
fn every_locator_resolves_apps_deployed_on_other_nodes() {
    rt().block_on(async {
        let root = tempfile::tempdir().unwrap();
        let a = Proc::new(&root, "a", &[], "");
        let b = Proc::new(&root, "b", &[a.port], "");
        let mut w = Watch::on(&a, "watch").await;
        w.wait_for(2, 2).await;
        let src = tempfile::tempdir().unwrap();
        let manifest = format!("{{\"executable\": {NODUS:?}, \"args\": [\"echo-worker\"]}}");
        std::fs::write(src.path().join("manifest.json"), manifest).unwrap();
        let out = cli(&b, &["app", "deploy", "far", &src.path().display().to_string()]);
        assert!(out.status.success(), "{out:?}");

        // a has no app "far"; its locator learns b's endpoint for it by gossip.
        let at_a = nodus_engine::AppClient::new(format!("127.0.0.1:{}", a.locator));
        let at_b = nodus_engine::AppClient::new(format!("127.0.0.1:{}", b.locator));
        let deadline = Instant::now() + WAIT;
        let found = loop {
            match at_a.resolve("far").await {
                Ok(e) => break e,
                Err(e) => assert!(Instant::now() < deadline, "a never resolved b's app: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let local = at_b.resolve("far").await.unwrap();
        assert_eq!(found.endpoints, local.endpoints, "a hands out b's own endpoint for the app");
        assert_eq!(found.graph, local.graph);
        // `nodus services --cluster` on a lists b's app service (the same gossip carries both).
        let out = cli(&a, &["--json", "services", "--cluster"]);
        let listed = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(listed.contains(r#"{"server":"b","service":"far"}"#), "{listed}");
        assert!(listed.contains(r#"{"server":"a","service":"apps"}"#), "{listed}");
        // A client of a's locator calls the app on b.
        let reply = at_a.service("far").call("upper", ["across"]).await.unwrap();
        assert_eq!(reply, ["ACROSS"]);

        // Stopped on b, the app is no longer offered by a's locator.
        assert!(cli(&b, &["app", "stop", "far"]).status.success());
        let deadline = Instant::now() + WAIT;
        while at_a.resolve("far").await.is_ok() {
            assert!(Instant::now() < deadline, "a still resolves a stopped app");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

#[test]
fn send_exit_codes_follow_what_every_node_did() {
    rt().block_on(async {
        let root = tempfile::tempdir().unwrap();
        let a = Proc::new(&root, "a", &[], "");
        let b = Proc::new(&root, "b", &[a.port], "");
        let mut w = Watch::on(&a, "watch").await;
        w.wait_for(2, 2).await;
        // `bcast` runs on b only; wait until a has heard of it by gossip.
        let config = ClientConfig::new(b.endpoint()).service("bcast").no_reconnect();
        let (_svc, mut inc) = Client::connect(config).await.unwrap();
        let deadline = Instant::now() + WAIT;
        let bcast_on_b = nodus_wire::rows::ServiceAt { server: "b".into(), service: "bcast".into() };
        while !w.client.admin().cluster_services().await.unwrap().contains(&bcast_on_b) {
            assert!(Instant::now() < deadline, "a never learned b's service");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let send = |args: &[&str]| {
            let mut all = vec!["send"];
            all.extend_from_slice(args);
            cli(&a, &all)
        };
        // A service missing on the other node: b refuses, the exit status says so.
        let out = send(&["b:nobody/JOB"]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(stderr.contains("SERVICE_UNAVAILABLE") && stderr.contains("on b"), "{stderr}");
        // A broadcast that reached its service on b (a has none): delivered.
        let out = send(&["*:bcast/HELLO n=1"]);
        assert!(out.status.success(), "{out:?}");
        let got = tokio::time::timeout(WAIT, inc.recv()).await.unwrap().unwrap();
        assert_eq!((got.command.as_str(), got.get("n")), ("HELLO", Some("1")));
        let out = cli(&a, &["--json", "send", "*:bcast/HELLO n=2"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let result = |server: &str| {
            v["nodes"].as_array().unwrap().iter().find(|n| n["server"] == server).unwrap()["result"].clone()
        };
        assert_eq!((result("a"), result("b")), (serde_json::json!("failed"), serde_json::json!("delivered")), "{v}");
        // A broadcast nobody takes: every node refused.
        let out = send(&["*:nobody/HELLO"]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        // No server: the nearest node with the service gets it.
        assert!(send(&["bcast/HELLO n=3"]).status.success());
        drop(b);
    });
}
