//! The node's HTTP listener through real `nodus daemon` processes: the REST API acting for its
//! caller in the node's access model (anonymous without the token, the owner with it), deploys
//! uploaded as archives, the gateway to a deployed app (routes, streaming, large bodies, every
//! error it maps, its bounds), the metrics moving between two scrapes, the token asked of every
//! request when configured so, and one request followed across two nodes by its id.

// These tests wait for real processes: the std clock is the right one here.
#![allow(clippy::disallowed_methods)]

mod common;
mod web;

use std::io::{Read, Write};
use web::{echo_archive, eventually, http, procs_archive, Node};

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

    // Flags through the node's flags service: anonymous callers may raise and lower (`send`),
    // clearing a manual-down flag needs the owner (`admin`).
    assert_eq!(node.request("GET", "/api/flags", None, None).json(), serde_json::json!([]));
    let raise = br#"{"message": "the nightly backup failed", "priority": 60, "manual_down": true, "tags": ["disk"]}"#;
    let up = node.request("PUT", "/api/flags/backup/nightly/failed", None, Some(("application/json", raise)));
    assert_eq!(
        (up.status, up.json()["count"].as_u64(), up.json()["new"].as_bool()),
        (200, Some(1), Some(true)),
        "{up:?}"
    );
    let flags = node.request("GET", "/api/flags", None, None).json();
    assert_eq!((flags[0]["name"].as_str(), flags[0]["priority"].as_u64()), (Some("failed"), Some(60)), "{flags}");
    let snapshot = node.request("GET", "/api/snapshot", None, None).json();
    assert_eq!(snapshot["flags"][0]["source"], "backup/nightly", "{snapshot}");
    let down = node.request("DELETE", "/api/flags/backup/nightly/failed", None, None);
    assert_eq!((down.status, down.json()["error"].as_str()), (409, Some("manual_down")), "{down:?}");
    let clear = node.request("DELETE", "/api/flags/backup/nightly/failed?manual=true", None, None);
    assert_eq!((clear.status, clear.json()["error"].as_str()), (403, Some("forbidden")), "{clear:?}");
    let clear = node.request("DELETE", "/api/flags/backup/nightly/failed?manual=true", Some(&token), None);
    assert_eq!((clear.status, clear.json()["lowered"].as_bool()), (200, Some(true)), "{clear:?}");
    let bad = node.request("PUT", "/api/flags/Bad%20Unit/x/y", None, Some(("application/json", raise)));
    assert_eq!((bad.status, bad.json()["error"].as_str()), (400, Some("invalid")), "{bad:?}");
    // The flags service's own INVALID (a tag it refuses) is the caller's error too.
    let tag = br#"{"message": "m", "tags": ["not a tag!"]}"#;
    let bad = node.request("PUT", "/api/flags/backup/nightly/tag", None, Some(("application/json", tag)));
    assert_eq!((bad.status, bad.json()["error"].as_str()), (400, Some("invalid")), "{bad:?}");

    // The node runs tasks: the snapshot counts them (none yet).
    assert_eq!(snapshot["tasks"]["by_status"]["done"], 0, "{snapshot}");
    let route = node.request("GET", "/api/nothing/here", None, None);
    assert_eq!((route.status, route.json()["error"].as_str()), (404, Some("not_found")));
}

#[test]
fn tasks_through_the_rest_api_with_the_task_apis_codes() {
    let root = tempfile::tempdir().unwrap();
    let node = Node::start(root.path(), "alpha", &[], "", "info");
    let token = node.token();
    let archive = procs_archive(root.path());
    let deployed = node.request("PUT", "/api/apps/procs", Some(&token), Some(("application/gzip", &archive)));
    assert_eq!(deployed.status, 201, "{deployed:?}");
    let json = |b: serde_json::Value| b.to_string().into_bytes();
    let submit = |token: Option<&str>, body: serde_json::Value| {
        node.request("POST", "/api/tasks", token, Some(("application/json", &json(body))))
    };

    // An anonymous caller submits (`send`) and reads (`status`).
    let sent = submit(None, serde_json::json!({"procedure": "procs.add", "args": [1, 2], "key": "add-1-2"}));
    assert_eq!((sent.status, sent.json()["existing"].as_bool()), (201, Some(false)), "{sent:?}");
    let id = sent.json()["id"].as_str().unwrap().to_string();
    let again = submit(None, serde_json::json!({"procedure": "procs.add", "args": [1, 2], "key": "add-1-2"}));
    assert_eq!((again.status, again.json()["existing"].as_bool()), (200, Some(true)), "{again:?}");
    assert_eq!(again.json()["id"].as_str(), Some(id.as_str()));
    let done = node.request("GET", &format!("/api/tasks/{id}?wait_ms=20000"), None, None);
    assert_eq!(done.status, 200, "{done:?}");
    let done = done.json();
    assert_eq!((done["status"].as_str(), done["result"].as_f64()), (Some("done"), Some(3.0)), "{done}");
    assert_eq!((done["procedure"].as_str(), done["args"].clone()), (Some("procs.add"), serde_json::json!([1, 2])));

    // Refusals in the task API's words, with a message.
    let unknown = submit(None, serde_json::json!({"procedure": "procs.nope", "args": []}));
    assert_eq!((unknown.status, unknown.json()["error"].as_str()), (404, Some("unknown_procedure")), "{unknown:?}");
    assert!(!unknown.json()["message"].as_str().unwrap().is_empty(), "{unknown:?}");
    let bad = submit(None, serde_json::json!({"procedure": "procs.add", "args": ["1", 2]}));
    assert_eq!((bad.status, bad.json()["error"].as_str()), (422, Some("bad_arguments")), "{bad:?}");
    let bad = submit(None, serde_json::json!({"procedure": "procs.add", "extra": 1}));
    assert_eq!((bad.status, bad.json()["error"].as_str()), (400, Some("invalid")), "{bad:?}");
    let missing = node.request("GET", "/api/tasks/no-such-task", None, None);
    assert_eq!((missing.status, missing.json()["error"].as_str()), (404, Some("unknown_task")), "{missing:?}");
    let bad = node.request("GET", "/api/tasks?status=finished", None, None);
    assert_eq!((bad.status, bad.json()["error"].as_str()), (400, Some("invalid")), "{bad:?}");
    assert!(bad.json()["message"].as_str().unwrap().contains("pending"), "{bad:?}");

    // Abort needs `admin`: refused to an anonymous caller, done for the owner.
    let slow = submit(None, serde_json::json!({"procedure": "procs.sleep", "args": [60000]}));
    assert_eq!(slow.status, 201, "{slow:?}");
    let slow = slow.json()["id"].as_str().unwrap().to_string();
    let refused = node.request("POST", &format!("/api/tasks/{slow}/abort"), None, None);
    assert_eq!((refused.status, refused.json()["error"].as_str()), (403, Some("forbidden")), "{refused:?}");
    assert!(refused.json()["message"].as_str().unwrap().contains("admin"), "{refused:?}");
    let aborted = node.request("POST", &format!("/api/tasks/{slow}/abort"), Some(&token), None);
    assert_eq!(aborted.status, 200, "{aborted:?}");
    assert!(matches!(aborted.json()["before"].as_str(), Some("pending" | "running")), "{aborted:?}");
    let after = node.request("GET", &format!("/api/tasks/{slow}"), None, None).json();
    assert_eq!(after["status"], "interrupted", "{after}");

    // Lists with filters, counts and the service's counters.
    let list = node.request("GET", "/api/tasks?status=done&procedure=procs.add&limit=10", None, None);
    assert_eq!(list.status, 200, "{list:?}");
    let tasks = list.json()["tasks"].as_array().unwrap().clone();
    assert_eq!(tasks.iter().map(|t| t["id"].as_str().unwrap()).collect::<Vec<_>>(), vec![id.as_str()]);
    let all = node.request("GET", "/api/tasks?limit=1", None, None).json();
    assert_eq!(all["tasks"].as_array().unwrap().len(), 1, "{all}");
    let next = all["next"].as_str().expect("a second page").to_string();
    let page = node.request("GET", &format!("/api/tasks?limit=1&after={next}"), None, None).json();
    assert_eq!(page["tasks"].as_array().unwrap().len(), 1, "{page}");
    assert_ne!(page["tasks"][0]["id"], all["tasks"][0]["id"]);
    let counts = node.request("GET", "/api/tasks/counts", None, None).json();
    assert_eq!((counts["done"].as_u64(), counts["interrupted"].as_u64()), (Some(1), Some(1)), "{counts}");
    let stats = node.request("GET", "/api/tasks/stats", None, None).json();
    assert_eq!((stats["submitted"].as_u64(), stats["done"].as_u64()), (Some(2), Some(1)), "{stats}");

    // The same counters in /metrics and the snapshot, with the latest changes first.
    let metrics = node.request("GET", "/metrics", None, None).body;
    assert_eq!(sample(&metrics, "nodus_tasks_submitted_total"), 2.0, "{metrics}");
    assert_eq!(sample(&metrics, "nodus_tasks_done_total"), 1.0, "{metrics}");
    assert!(samples(&metrics).contains(&("nodus_tasks_failed_total".to_string(), 0.0)), "{metrics}");
    assert_eq!(sample(&metrics, r#"nodus_tasks{status="interrupted"}"#), 1.0, "{metrics}");
    // The one task done, in the latency histogram (the interrupted one was never recorded by a
    // worker); the node's STATS carries it too.
    assert_eq!(sample(&metrics, "nodus_task_latency_seconds_count"), 1.0, "{metrics}");
    assert_eq!(sample(&metrics, r#"nodus_task_latency_seconds_bucket{le="+Inf"}"#), 1.0, "{metrics}");
    assert_eq!(stats["latency"]["counts"].as_array().map(Vec::len), Some(17), "{stats}");
    eventually("the snapshot lists the aborted task first", || {
        let snap = node.request("GET", "/api/snapshot", None, None).json();
        snap["tasks"]["recent"][0]["id"] == slow.as_str() && snap["tasks"]["recent"][0]["status"] == "interrupted"
    });
    let snap = node.request("GET", "/api/snapshot", None, None).json();
    let recent = snap["tasks"]["recent"].as_array().unwrap();
    assert!(recent.iter().any(|t| t["id"] == id.as_str() && t["status"] == "done"), "{snap}");

    // Deadlines and subtasks: a deadline already past is the request's fault; a parent must be
    // a task still running or waiting; aborting a parent interrupts its subtask.
    let late = submit(None, serde_json::json!({"procedure": "procs.add", "args": [1, 2], "expires_at": 1}));
    assert_eq!((late.status, late.json()["error"].as_str()), (400, Some("expired")), "{late:?}");
    let orphan = submit(None, serde_json::json!({"procedure": "procs.add", "args": [1, 2], "pid": "no-such-task"}));
    assert_eq!((orphan.status, orphan.json()["error"].as_str()), (404, Some("unknown_task")), "{orphan:?}");
    let finished = submit(None, serde_json::json!({"procedure": "procs.add", "args": [1, 2], "pid": id}));
    assert_eq!((finished.status, finished.json()["error"].as_str()), (404, Some("unknown_task")), "{finished:?}");
    let parent = submit(None, serde_json::json!({"procedure": "procs.sleep", "args": [60000]}));
    assert_eq!(parent.status, 201, "{parent:?}");
    let parent = parent.json()["id"].as_str().unwrap().to_string();
    let child = submit(None, serde_json::json!({"procedure": "procs.sleep", "args": [60000], "pid": parent}));
    assert_eq!(child.status, 201, "{child:?}");
    let child = child.json()["id"].as_str().unwrap().to_string();
    let subtasks = node.request("GET", &format!("/api/tasks?parent={parent}"), None, None).json();
    let subtasks = subtasks["tasks"].as_array().unwrap().clone();
    assert_eq!(subtasks.iter().map(|t| t["id"].as_str().unwrap()).collect::<Vec<_>>(), vec![child.as_str()]);
    let aborted = node.request("POST", &format!("/api/tasks/{parent}/abort"), Some(&token), None);
    assert_eq!(aborted.status, 200, "{aborted:?}");
    let child = node.request("GET", &format!("/api/tasks/{child}"), None, None).json();
    assert_eq!(child["status"], "interrupted", "{child}");
}

#[test]
fn the_component_tree_monitoring_and_kill_through_the_rest_api() {
    let root = tempfile::tempdir().unwrap();
    let node = Node::start(root.path(), "alpha", &[], "", "info");
    let token = node.token();
    let archive = echo_archive(root.path());
    let deployed = node.request("PUT", "/api/apps/echo", Some(&token), Some(("application/gzip", &archive)));
    assert_eq!(deployed.status, 201, "{deployed:?}");
    let app_id = || {
        let tree = node.request("GET", "/api/control/tree", None, None);
        assert_eq!(tree.status, 200, "{tree:?}");
        let tree = tree.json();
        let rows = tree["components"].as_array().unwrap().clone();
        assert!(rows.iter().any(|r| r["kind"] == "node" && r["name"] == "alpha"), "{tree}");
        rows.iter().find(|r| r["kind"] == "app" && r["name"] == "echo").map(|r| r["id"].as_str().unwrap().to_string())
    };
    eventually("the echo app is in the tree", || app_id().is_some());
    let id = app_id().unwrap();
    let cluster = node.request("GET", "/api/control/tree?scope=cluster", None, None);
    assert_eq!(cluster.status, 200, "{cluster:?}");
    let bad = node.request("GET", "/api/control/tree?scope=planet", None, None);
    assert_eq!((bad.status, bad.json()["error"].as_str()), (400, Some("invalid")), "{bad:?}");

    // Anyone with `status` monitors; the component (its node, for an app) answers.
    let answer = node.request("GET", &format!("/api/control/alpha/{id}/monitor?wait_ms=5000"), None, None);
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(answer.json()["name"].as_str().is_some_and(|n| !n.is_empty()), "{answer:?}");
    let nobody = node.request("GET", "/api/control/alpha/12345/monitor", None, None);
    assert_eq!((nobody.status, nobody.json()["error"].as_str()), (404, Some("unknown_component")), "{nobody:?}");
    let elsewhere = node.request("POST", "/api/control/nowhere/12345/kill", Some(&token), None);
    assert_eq!((elsewhere.status, elsewhere.json()["error"].as_str()), (404, Some("unknown_node")), "{elsewhere:?}");
    let bad = node.request("GET", "/api/control/alpha/x7/monitor", None, None);
    assert_eq!((bad.status, bad.json()["error"].as_str()), (400, Some("invalid")), "{bad:?}");

    // Kill needs `admin`: the router refuses the anonymous connection.
    let refused = node.request("POST", &format!("/api/control/alpha/{id}/kill"), None, None);
    assert_eq!((refused.status, refused.json()["error"].as_str()), (403, Some("forbidden")), "{refused:?}");
    assert!(refused.json()["message"].as_str().unwrap().contains("admin"), "{refused:?}");
    assert_eq!(node.request("GET", "/api/apps/echo", None, None).json()["status"], "running");
    let unknown = node.request("POST", "/api/control/alpha/12345/kill", Some(&token), None);
    assert_eq!((unknown.status, unknown.json()["error"].as_str()), (404, Some("unknown_component")), "{unknown:?}");
    assert!(unknown.json()["message"].as_str().unwrap().contains("12345"), "{unknown:?}");
    let killed = node.request("POST", &format!("/api/control/alpha/{id}/kill?wait_ms=10000"), Some(&token), None);
    assert_eq!((killed.status, killed.json()["stopped"].as_bool()), (200, Some(true)), "{killed:?}");
    // Its workers were killed first, then the app stopped (it stays deployed).
    assert_eq!(node.request("GET", "/api/apps/echo", None, None).json()["status"], "stopped");
    let tree = node.request("GET", "/api/control/tree", None, None).json();
    let rows = tree["components"].as_array().unwrap();
    assert!(!rows.iter().any(|r| r["kind"] == "worker"), "{tree}");
    assert!(rows.iter().any(|r| r["kind"] == "app" && r["name"] == "echo" && r["is_running"] == false), "{tree}");
}

#[test]
fn without_the_token_the_api_gets_only_what_access_grants() {
    let root = tempfile::tempdir().unwrap();
    // Anonymous clients may only read: no `send`.
    let node = Node::start(root.path(), "alpha", &[], "[access]\nanonymous = [\"status\"]", "info");
    let token = node.token();
    let archive = echo_archive(root.path());
    let deployed = node.request("PUT", "/api/apps/echo", Some(&token), Some(("application/gzip", &archive)));
    assert_eq!(deployed.status, 201, "{deployed:?}");
    assert_eq!(node.request("GET", "/api/apps/echo", None, None).status, 200);
    let call = br#"{"service": "echo", "command": "ECHO", "payload": "hi"}"#;
    let refused = node.request("POST", "/api/call", None, Some(("application/json", call)));
    assert_eq!((refused.status, refused.json()["error"].as_str()), (403, Some("forbidden")), "{refused:?}");
    assert!(refused.json()["message"].as_str().unwrap().contains("send"), "{refused:?}");
    let owner = node.request("POST", "/api/call", Some(&token), Some(("application/json", call)));
    assert_eq!((owner.status, owner.json()["payload"].as_str()), (200, Some("hi")), "{owner:?}");
    // A wrong token is refused outright, never taken for anonymous.
    let wrong = node.request("GET", "/api/node", Some("not-the-token"), None);
    assert_eq!(wrong.status, 401, "{wrong:?}");
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

/// This host's address beyond loopback (the one a route to another network would use), if any.
fn outside_address() -> Option<std::net::IpAddr> {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    probe.connect("192.0.2.254:9").ok()?; // no packet is sent
    let ip = probe.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// `curl -sk` (a real TLS client): (status, body).
fn curl(url: &str, token: Option<&str>) -> (u16, String) {
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sk", "--max-time", "20", "-w", "\n%{http_code}", url]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = String::from_utf8_lossy(&cmd.output().expect("curl runs").stdout).into_owned();
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn beyond_loopback_https_needs_the_token_except_on_public_routes() {
    let Some(ip) = outside_address() else {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "this host has no address beyond loopback");
        eprintln!("SKIPPED: this host has no address beyond loopback");
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), ip.to_string()]).unwrap();
    let (cert, key) = (root.path().join("http.pem"), root.path().join("http.key"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let extra = format!(
        "tls = true\ntls_cert = {:?}\ntls_key = {:?}\npublic = [\"shop/http\"]",
        cert.display().to_string(),
        key.display().to_string()
    );
    let node = Node::start_on("0.0.0.0", root.path(), "alpha", &[], &extra, "info");
    let base = format!("https://{ip}:{}", node.http);
    for path in ["/", "/api/node", "/metrics", "/echo/http", "/shop/other"] {
        let (status, body) = curl(&format!("{base}{path}"), None);
        assert_eq!(status, 401, "{path}: {body}");
        assert_eq!(curl(&format!("{base}{path}"), Some("wrong")).0, 401, "{path}");
    }
    let (status, body) = curl(&format!("{base}/api/node"), Some(&node.token()));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"server\":\"alpha\""), "{body}");
    // The public route is open; there is no such app, which the gateway says.
    let (status, body) = curl(&format!("{base}/shop/http"), None);
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("unknown_app"), "{body}");
    // The same port over loopback is open without the token, and speaks only TLS.
    let (status, _) = curl(&format!("https://127.0.0.1:{}/api/node", node.http), None);
    assert_eq!(status, 200);
    let (status, _) = curl(&format!("http://127.0.0.1:{}/api/node", node.http), None);
    assert_ne!(status, 200, "plain HTTP on the HTTPS port");
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

/// Sends `head` (and `body`) on a new connection and reads the answer to its end.
fn raw_exchange(port: u16, head: &str, body: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(common::WAIT)).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    // Written while the answer is read (an echo streams back as it streams in); the node may
    // answer and close before it read everything: that is the point.
    let mut writer = s.try_clone().unwrap();
    let body = body.to_vec();
    let sent = std::thread::spawn(move || {
        let _ = writer.write_all(&body);
    });
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let _ = s.shutdown(std::net::Shutdown::Both);
    sent.join().unwrap();
    String::from_utf8_lossy(&raw).into_owned()
}

#[test]
fn the_gateway_invokes_a_deployed_app_on_a_real_node() {
    let root = tempfile::tempdir().unwrap();
    // A 4 MiB body limit and a one-second header deadline, to test both bounds.
    let extra = "max_body_bytes = 4194304\nheader_timeout_secs = 1";
    let node = Node::start(root.path(), "alpha", &[], extra, "info");
    let archive = echo_archive(root.path());
    let deployed = node.request("PUT", "/api/apps/echo", Some(&node.token()), Some(("application/gzip", &archive)));
    assert_eq!(deployed.status, 201, "{deployed:?}");

    // By path: /APP/EVENT/rest?query; the worker sees the rest as the URI.
    let r = node.request("POST", "/echo/http/some/path?x=1", None, Some(("text/plain", b"hello gateway")));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "hello gateway");
    assert_eq!(r.header("x-echo-method"), Some("POST"));
    assert_eq!(r.header("x-echo-uri"), Some("/some/path?x=1"));
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert!(r.header("x-request-id").is_some(), "{r:?}");
    // By Cocaine's headers: the whole path is the URI.
    let by_headers =
        http(node.http, "GET", "/any/path", None, &[("X-Cocaine-Service", "echo"), ("X-Cocaine-Event", "http")], None);
    assert_eq!((by_headers.status, by_headers.header("x-echo-uri")), (200, Some("/any/path")), "{by_headers:?}");

    // A body of several upload chunks goes to the worker in pieces and streams back chunked.
    let big: Vec<u8> = (0..3 * 1024 * 1024 + 17).map(|i| b'a' + (i % 26) as u8).collect();
    let r = node.request("PUT", "/echo/http/upload", None, Some(("application/octet-stream", &big)));
    assert_eq!(r.status, 200, "{}", r.body.len());
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.body.len(), big.len());
    assert!(r.body.as_bytes() == big.as_slice(), "the body came back intact");

    // Every failure is one JSON error with a stable code.
    let error = |path: &str, status: u16, code: &str| {
        let r = node.request("GET", path, None, None);
        assert_eq!((r.status, r.json()["error"].as_str()), (status, Some(code)), "{path}: {r:?}");
        assert_eq!(r.header("content-type"), Some("application/json"), "{path}");
    };
    error("/nosuch/http", 404, "unknown_app");
    error("/echo/nosuch", 404, "unknown_event");
    // `echo` sends the request chunk back as its first chunk: not a response head.
    error("/echo/echo", 502, "bad_head");
    error("/echo/fail", 500, "app_error");
    error("/echo", 404, "not_found");

    // Bounds: a declared body over [http] max_body_bytes is refused before anything is read.
    let answer = raw_exchange(
        node.http,
        "POST /echo/http HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\nConnection: close\r\n\r\n",
        b"",
    );
    assert!(answer.starts_with("HTTP/1.1 413") && answer.contains("body_too_large"), "{answer}");
    // A client that streams more than it may (no length given) is cut at the limit.
    let mut head = String::from("POST /echo/http HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n");
    head.push_str("Connection: close\r\n\r\n");
    let piece = vec![b'z'; 1 << 20];
    let mut body = Vec::new();
    for _ in 0..5 {
        body.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        body.extend_from_slice(&piece);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    let answer = raw_exchange(node.http, &head, &body);
    // Refused with 413 when the limit is passed before the worker's head; after it, the answer
    // (the echo, as far as the limit) is cut: never passed off as a whole answer.
    if answer.starts_with("HTTP/1.1 413") {
        assert!(answer.contains("body_too_large"), "{answer}");
    } else {
        assert!(answer.starts_with("HTTP/1.1 200"), "{}", &answer[..answer.len().min(300)]);
        assert!(!answer.ends_with("\r\n0\r\n\r\n"), "the cut answer does not look complete");
        assert!(answer.len() < (4 << 20) + (64 << 10), "{} bytes came back", answer.len());
    }
    // A client that never finishes its request head is closed after header_timeout_secs.
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", node.http)).unwrap();
    slow.write_all(b"GET /echo/http HTTP/1.1\r\nHost: x\r\n").unwrap();
    slow.set_read_timeout(Some(common::WAIT)).unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    let waited = started.elapsed();
    assert!(waited < std::time::Duration::from_secs(5), "the slow client was closed after {waited:?}");
    assert!(!String::from_utf8_lossy(&rest).contains("200 OK"), "{}", String::from_utf8_lossy(&rest));

    // The gateway's requests show in the metrics, by app and status.
    let metrics = node.request("GET", "/metrics", None, None).body;
    assert!(sample(&metrics, r#"nodus_gateway_requests_total{app="echo",code="200"}"#) >= 3.0, "{metrics}");
    assert!(sample(&metrics, r#"nodus_gateway_requests_total{app="echo",code="502"}"#) >= 1.0, "{metrics}");
}

/// The Cocaine virtualenv's python (`tests/cocaine-compat/setup.sh`), or why there is none.
fn cocaine_python() -> Option<std::path::PathBuf> {
    let venv = match std::env::var_os("NODUS_PYENV") {
        Some(v) => std::path::PathBuf::from(v),
        None => std::path::PathBuf::from(std::env::var_os("HOME")?).join(".cache/nodus-cocaine-venv"),
    };
    let python = venv.join("bin/python");
    let ready = std::process::Command::new(&python)
        .args(["-c", "import cocaine.decorators, cocaine.worker"])
        .output()
        .is_ok_and(|o| o.status.success());
    ready.then_some(python)
}

/// A web app written for Cocaine (the real Python framework's `http` and `wsgi` decorators)
/// deployed to a real node through its API and reached through its gateway, unchanged.
#[test]
fn a_python_cocaine_web_app_runs_behind_a_real_node() {
    let Some(python) = cocaine_python() else {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "no cocaine virtualenv: run tests/cocaine-compat/setup.sh"
        );
        eprintln!("SKIPPED: no cocaine virtualenv (tests/cocaine-compat/setup.sh)");
        return;
    };
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    let node = Node::start(root.path(), "alpha", &[], "", "info");
    let app = root.path().join("pyweb");
    std::fs::create_dir_all(&app).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../nodus-http/tests/python/web_app.py");
    std::fs::copy(script, app.join("web_app.py")).unwrap();
    let run = app.join("run");
    std::fs::write(
        &run,
        format!("#!/bin/sh\nexec {:?} \"$(dirname \"$0\")/web_app.py\" \"$@\"\n", python.display().to_string()),
    )
    .unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(app.join("manifest.json"), r#"{"executable": "run", "env": {"PYTHONDONTWRITEBYTECODE": "1"}}"#)
        .unwrap();
    std::fs::write(app.join("profile.toml"), "pool-limit = 1\nstartup-timeout = 20\n").unwrap();
    let archive = root.path().join("pyweb.tar.gz");
    let packed = std::process::Command::new("tar")
        .arg("czf")
        .arg(&archive)
        .arg("-C")
        .arg(root.path())
        .arg("pyweb")
        .status()
        .unwrap();
    assert!(packed.success());
    let archive = std::fs::read(archive).unwrap();
    let deployed = node.request("PUT", "/api/apps/pyweb", Some(&node.token()), Some(("application/gzip", &archive)));
    assert_eq!(deployed.status, 201, "{deployed:?}");

    // The `http` decorator: method, URI, query, body.
    let r = node.request("POST", "/pyweb/http/items/7?colour=red", None, Some(("text/plain", b"hi there")));
    assert_eq!(r.status, 200, "{r:?}\n{}", node.log());
    assert_eq!(r.header("x-worker"), Some("python-http"));
    let j = r.json();
    assert_eq!((j["method"].as_str(), j["uri"].as_str()), (Some("POST"), Some("/items/7?colour=red")), "{j}");
    assert_eq!((j["query"]["colour"].as_str(), j["body_len"].as_u64()), (Some("red"), Some(8)), "{j}");
    // A body of several upload chunks reaches the handler whole.
    let big: Vec<u8> = (0..3 * 512 * 1024 + 5).map(|i| b'a' + (i % 26) as u8).collect();
    let r = node.request("PUT", "/pyweb/http/upload", None, Some(("application/octet-stream", &big)));
    assert_eq!((r.status, r.json()["body_len"].as_u64()), (200, Some(big.len() as u64)), "{r:?}");
    assert!(r.json()["chunks"].as_u64().unwrap() >= 4, "{r:?}");
    // The `wsgi` decorator around a plain WSGI application.
    let r = node.request("POST", "/pyweb/wsgi/hello/world?a=b", None, Some(("application/json", br#"{"k":1}"#)));
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.header("x-worker"), Some("python-wsgi"));
    let j = r.json();
    assert_eq!(
        (j["path"].as_str(), j["query"].as_str(), j["body"].as_str()),
        (Some("/hello/world"), Some("a=b"), Some(r#"{"k":1}"#)),
        "{j}"
    );
    // The framework's own errors.
    let r = node.request("GET", "/pyweb/nosuch", None, None);
    assert_eq!((r.status, r.json()["error"].as_str()), (404, Some("unknown_event")), "{r:?}");
    let r = node.request("GET", "/pyweb/fail", None, None);
    assert_eq!((r.status, r.json()["error"].as_str()), (500, Some("app_error")), "{r:?}");
}
