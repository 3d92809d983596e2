//! The node's HTTP listener through real `nodus daemon` processes: the REST API acting for its
//! caller in the node's access model (anonymous without the token, the owner with it), deploys
//! uploaded as archives, the metrics moving between two scrapes, the token asked of every
//! request when configured so, and one request followed across two nodes by its id.

// These tests wait for real processes: the std clock is the right one here.
#![allow(clippy::disallowed_methods)]

mod common;
mod web;

use web::{echo_archive, eventually, http, Node};

/// `name{labels} value` samples of a Prometheus exposition (comments left out).
fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {l}"));
            (name.to_string(), value.parse().unwrap_or_else(|_| panic!("not a number: {l}")))
        })
        .collect()
}

fn sample(text: &str, name: &str) -> f64 {
    samples(text).into_iter().find(|(n, _)| n == name).map_or(0.0, |(_, v)| v)
}

#[test]
fn the_rest_api_acts_for_its_caller_through_the_router() {
    let root = tempfile::tempdir().unwrap();
    let node = Node::start(root.path(), "alpha", &[], "", "info");
    let token = node.token();
    let me = node.request("GET", "/api/node", None, None);
    assert_eq!(me.status, 200, "{me:?}");
    assert_eq!(me.json()["server"], "alpha");
    assert!(me.header("x-request-id").is_some_and(|id| id.len() == 16), "{me:?}");
    let cluster = node.request("GET", "/api/cluster", None, None).json();
    assert_eq!((cluster["live"].as_u64(), cluster["up"].as_bool()), (Some(1), Some(true)), "{cluster}");
    let services = node.request("GET", "/api/services", None, None).json();
    assert!(services.as_array().unwrap().iter().any(|s| s["name"] == "apps"), "{services}");
    let doc = node.request("GET", "/api/openapi.json", None, None).json();
    assert!(doc["paths"]["/api/apps/{name}"]["put"].is_object());

    // Without the token (loopback) the API is an anonymous client: it may read, not deploy, and
    // nothing of a refused upload reaches the disk.
    let archive = echo_archive(root.path());
    let refused = node.request("PUT", "/api/apps/echo", None, Some(("application/gzip", &archive)));
    assert_eq!((refused.status, refused.json()["error"].as_str()), (403, Some("forbidden")), "{refused:?}");
    assert!(refused.json()["message"].as_str().unwrap().contains("auth.token"), "{refused:?}");
    let uploads = node.dir.join("data/uploads");
    assert!(std::fs::read_dir(&uploads).map_or(true, |mut d| d.next().is_none()), "nothing stored");

    // With it, the owner deploys.
    let deployed = node.request("PUT", "/api/apps/echo", Some(&token), Some(("application/gzip", &archive)));
    assert_eq!(deployed.status, 201, "{deployed:?}");
    assert_eq!((deployed.json()["name"].as_str(), deployed.json()["version"].as_str()), (Some("echo"), Some("v1")));
    assert!(std::fs::read_dir(&uploads).unwrap().next().is_none(), "the upload is removed once deployed");
    let apps = node.request("GET", "/api/apps", None, None).json();
    assert_eq!(apps[0]["name"], "echo");
    assert_eq!(apps[0]["status"], "running");
    let garbage = node.request("PUT", "/api/apps/junk", Some(&token), Some(("application/gzip", b"\x1f\x8bnot gzip")));
    assert_eq!((garbage.status, garbage.json()["error"].as_str()), (422, Some("deploy_failed")), "{garbage:?}");

    // Any caller with `send` reaches the app's service through the router.
    let call = br#"{"service": "echo", "command": "ECHO", "payload": "hello over HTTP"}"#;
    let echoed = node.request("POST", "/api/call", None, Some(("application/json", call)));
    assert_eq!(echoed.status, 200, "{echoed:?}");
    assert_eq!(echoed.json()["payload"], "hello over HTTP");
    assert_eq!(echoed.json()["from"]["service"], "echo");

    // Scale, read the workers, stop, start, read the crashlog, remove.
    let scale = node.request("POST", "/api/apps/echo/scale", None, Some(("application/json", br#"{"workers": 2}"#)));
    assert_eq!(scale.status, 403, "{scale:?}");
    let scale =
        node.request("POST", "/api/apps/echo/scale", Some(&token), Some(("application/json", br#"{"workers": 2}"#)));
    assert_eq!((scale.status, scale.json()["workers"].as_u64()), (200, Some(2)), "{scale:?}");
    eventually("echo has two active workers", || {
        let app = node.request("GET", "/api/apps/echo", None, None).json();
        let active = app["workers"].as_array().unwrap().iter().filter(|w| w["state"] == "active").count();
        active == 2 && app["population"] == 2
    });
    let bad =
        node.request("POST", "/api/apps/echo/scale", Some(&token), Some(("application/json", br#"{"workers": -1}"#)));
    assert_eq!((bad.status, bad.json()["error"].as_str()), (400, Some("invalid")), "{bad:?}");
    let stop = node.request("POST", "/api/apps/echo/stop", Some(&token), None);
    assert_eq!(stop.status, 200, "{stop:?}");
    assert_eq!(node.request("GET", "/api/apps/echo", None, None).json()["status"], "stopped");
    let start = node.request("POST", "/api/apps/echo/start", Some(&token), None);
    assert_eq!((start.status, start.json()["version"].as_str()), (200, Some("v1")), "{start:?}");
    let log = node.request("GET", "/api/apps/echo/crashlog", None, None);
    assert_eq!(log.status, 200, "{log:?}");
    assert!(log.json().is_array());
    let unknown = node.request("POST", "/api/apps/nope/start", Some(&token), None);
    assert_eq!((unknown.status, unknown.json()["error"].as_str()), (404, Some("unknown_app")), "{unknown:?}");
    let bad_name = node.request("GET", "/api/apps/a%20b", None, None);
    assert_eq!((bad_name.status, bad_name.json()["error"].as_str()), (400, Some("invalid")), "{bad_name:?}");
    let removed = node.request("DELETE", "/api/apps/echo", Some(&token), None);
    assert_eq!(removed.status, 200, "{removed:?}");
    assert_eq!(node.request("GET", "/api/apps/echo", None, None).status, 404);

    // A node command the caller may not run is refused by the router, in the API's words.
    let stop_node = br#"{"service": "node", "command": "STOP"}"#;
    let refused = node.request("POST", "/api/call", None, Some(("application/json", stop_node)));
    assert_eq!((refused.status, refused.json()["error"].as_str()), (403, Some("forbidden")), "{refused:?}");

    // Built-in services the node does not run (yet) say so; when they run, they answer.
    for path in ["/api/tasks", "/api/flags", "/api/tree", "/api/components/7/monitoring"] {
        let r = node.request("GET", path, None, None);
        assert!(r.status == 200 || (r.status == 503 && r.json()["error"] == "not_available"), "{path}: {r:?}");
    }
    let route = node.request("GET", "/api/nothing/here", None, None);
    assert_eq!((route.status, route.json()["error"].as_str()), (404, Some("not_found")));
}

#[test]
fn metrics_scraped_twice_show_counters_moving() {
    let root = tempfile::tempdir().unwrap();
    let node = Node::start(root.path(), "alpha", &[], "", "info");
    let token = node.token();
    let archive = echo_archive(root.path());
    let deployed = node.request("PUT", "/api/apps/echo", Some(&token), Some(("application/gzip", &archive)));
    assert_eq!(deployed.status, 201, "{deployed:?}");
    let first = node.request("GET", "/metrics", None, None);
    assert_eq!(first.status, 200);
    assert!(first.header("content-type").unwrap().starts_with("application/openmetrics-text"), "{first:?}");
    assert!(first.body.ends_with("# EOF\n"), "{}", first.body);
    let before = first.body;
    for _ in 0..5 {
        let call = br#"{"service": "echo", "command": "ECHO", "payload": "x"}"#;
        assert_eq!(node.request("POST", "/api/call", None, Some(("application/json", call))).status, 200);
    }
    let after = node.request("GET", "/metrics", None, None).body;
    for (name, _) in samples(&after) {
        assert!(name.starts_with("nodus_"), "{name}");
    }
    let moved = |name: &str, by: f64| {
        let (b, a) = (sample(&before, name), sample(&after, name));
        assert!(a - b >= by, "{name}: {b} -> {a}\n{after}");
    };
    moved(r#"nodus_messages_total{outcome="received"}"#, 10.0);
    moved(r#"nodus_messages_total{outcome="delivered"}"#, 10.0);
    moved(r#"nodus_received_bytes_total{listener="http"}"#, 5.0);
    moved(r#"nodus_sent_bytes_total{listener="http"}"#, 5.0);
    moved(r#"nodus_app_invokes_total{app="echo",outcome="ok"}"#, 5.0);
    moved(r#"nodus_app_invoke_latency_seconds_count{app="echo"}"#, 5.0);
    moved(r#"nodus_http_requests_total{area="api",code="200"}"#, 5.0);
    moved(r#"nodus_http_requests_total{area="metrics",code="200"}"#, 1.0);
    // Gauges of the node's state.
    assert_eq!(sample(&after, r#"nodus_cluster_nodes{state="live"}"#), 1.0);
    assert_eq!(sample(&after, "nodus_cluster_quorum"), 1.0);
    assert!(sample(&after, r#"nodus_app_workers{app="echo",state="active"}"#) >= 1.0, "{after}");
    assert_eq!(sample(&after, "nodus_pending_requests"), 0.0);
}

#[test]
fn with_token_on_loopback_every_route_asks_for_the_token() {
    let root = tempfile::tempdir().unwrap();
    let token_file = root.path().join("http.token");
    std::fs::write(&token_file, "s3cret-http-token\n").unwrap();
    let extra = format!(
        "token_on_loopback = true\ntoken_file = {:?}\npublic = [\"echo/ping\"]",
        token_file.display().to_string()
    );
    let node = Node::start(root.path(), "alpha", &[], &extra, "info");
    for path in ["/", "/metrics", "/api/node", "/api/events", "/echo/other"] {
        let r = node.request("GET", path, None, None);
        assert_eq!(r.status, 401, "{path}: {r:?}");
        assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"nodus\""));
        assert_eq!(node.request("GET", path, Some("wrong"), None).status, 401, "{path}");
    }
    // The HTTP token is the owner's token for the API.
    let me = node.request("GET", "/api/node", Some("s3cret-http-token"), None);
    assert_eq!(me.status, 200, "{me:?}");
    let stop = node.request("POST", "/api/apps/nope/stop", Some("s3cret-http-token"), None);
    assert_eq!(stop.json()["error"], "unknown_app", "{stop:?}");
    // A public gateway route needs no token (there is no such app: the gateway says so).
    let public = node.request("GET", "/echo/ping", None, None);
    assert_eq!((public.status, public.json()["error"].as_str()), (404, Some("unknown_app")), "{public:?}");
}

#[test]
fn one_request_is_followed_across_nodes_by_its_id() {
    let root = tempfile::tempdir().unwrap();
    let level = "info,nodus_daemon::server::conn=debug,nodus_http=debug";
    let a = Node::start(root.path(), "a", &[], "", level);
    let b = Node::start(root.path(), "b", &[a.cluster], "", level);
    eventually("a sees b live", || a.request("GET", "/api/cluster", None, None).json()["live"] == 2);
    // A service on b that answers with the parameters it got.
    let rt = common::rt();
    let sock = b.dir.join("n.sock");
    let (client, mut incoming) = rt.block_on(async {
        let config = nodus_client::ClientConfig::new(format!("unix:{}", sock.display())).service("where");
        nodus_client::Client::connect(config).await.unwrap()
    });
    let server = rt.spawn(async move {
        while let Some(m) = incoming.recv().await {
            let reply = m.reply("HERE").param("trace", m.get("trace_id").unwrap_or("none"));
            let _ = client.send(reply).await;
        }
    });
    eventually("a knows b's service", || {
        let s = a.request("GET", "/api/cluster/services", None, None).json();
        s.as_array().unwrap().iter().any(|x| x["service"] == "where")
    });
    let call = br#"{"server": "b", "service": "where", "command": "WHERE"}"#;
    let r =
        http(a.http, "POST", "/api/call", None, &[("X-Request-Id", "req-7f3a9c")], Some(("application/json", call)));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-request-id"), Some("req-7f3a9c"));
    assert_eq!(r.json()["params"]["trace"], "req-7f3a9c", "the id reached b's service: {r:?}");
    assert_eq!(r.json()["from"]["server"], "b");
    // Each node logged the request under its id: a where it came in over HTTP and left for b,
    // b where it arrived over the link.
    eventually("both nodes logged the request id", || {
        let (la, lb) = (a.log(), b.log());
        la.contains("request_id=req-7f3a9c")
            && la.contains("trace_id=req-7f3a9c")
            && lb.contains("trace_id=req-7f3a9c")
            && lb.contains("command=WHERE")
    });
    server.abort();
}
