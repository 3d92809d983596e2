//! Tasks through a real node: a `nodus daemon` process with the example procedures apps deployed
//! by `nodus app deploy`, reached over its arpcp listener (one JSON line per TCP connection, as
//! the reference's clients do it), its built-in `tasks` service (from the CLI, from a client of
//! another node) and `nodus task`. Every arpcp code, the store's failures, the permissions, the
//! procedures following the apps, the Rust and the Python (`cocaine`) procedures apps, and kill
//! -9 of the node with 10 000 tasks in flight.
//!
//! The Rust worker is `nodus-procs-worker`, built next to `nodus` (`cargo test --workspace`
//! builds it; alone: `cargo build -p nodus-tasks --bins`). The Python app needs the virtualenv
//! made by `tests/cocaine-compat/setup.sh` (`$NODUS_PYENV`); without it the test says so and
//! passes, except under `CI=true`, where it fails.
// These tests drive real processes on wall time.
#![allow(clippy::disallowed_methods)]

mod common;
#[path = "../../nodus-tasks/tests/pgtest/mod.rs"]
mod pgtest;

use common::{free_port, NODUS};
use nodus_client::admin::{TaskChange, TaskSpec, TaskStatus};
use nodus_client::{Admin, Client, ClientConfig};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every wait of these tests is bounded by this.
const WAIT: Duration = Duration::from_secs(60);

/// A `nodus daemon` with its own directory: no TCP, cluster, UDP or locator listener unless
/// asked, the arpcp listener on a port of its own, apps run as root (the worker binary lives in
/// the build directory, which `nobody` may not reach).
struct Node {
    dir: tempfile::TempDir,
    config: PathBuf,
    child: Option<Child>,
    arpcp: SocketAddr,
}

/// What a test adds to a node's configuration.
#[derive(Default)]
struct Extra<'a> {
    /// The node's name (default `tn`).
    name: Option<&'a str>,
    /// A TCP listener on this port.
    tcp: Option<u16>,
    /// Top-level keys.
    top: &'a str,
    /// Keys of `[tasks]`.
    tasks: &'a str,
    /// Keys of `[limits]`.
    limits: &'a str,
}

impl Node {
    fn start(extra: Extra) -> Node {
        let dir = tempfile::Builder::new().prefix("ntn").tempdir().unwrap();
        let arpcp = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = dir.path().join("node.toml");
        let text = format!(
            "server_name = \"{}\"\ndata_dir = {:?}\nunix_socket = {:?}\ntcp_listen = \"{}\"\n{}\n\
             [limits]\n{}\n[cluster]\nlisten = \"\"\nudp_listen = \"\"\n\
             [apps]\nlocator_listen = \"\"\nrun_as = \"root\"\n[http]\nlisten = \"\"\n\
             [tasks]\narpcp_listen = \"{arpcp}\"\n{}\n",
            extra.name.unwrap_or("tn"),
            dir.path().join("data").display().to_string(),
            dir.path().join("n.sock").display().to_string(),
            extra.tcp.map(|p| format!("127.0.0.1:{p}")).unwrap_or_default(),
            extra.top,
            extra.limits,
            extra.tasks,
        );
        std::fs::write(&config, text).unwrap();
        let mut node = Node { dir, config, child: None, arpcp };
        node.run();
        node
    }

    /// Starts the daemon (again) and waits until its socket accepts.
    fn run(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.path("daemon.log")).unwrap();
        let child = Command::new(NODUS).arg("daemon").arg("--config").arg(&self.config).stderr(log).spawn().unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the daemon exited ({status}): {}", self.log());
            }
            assert!(Instant::now() < deadline, "the daemon did not start listening");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn socket(&self) -> PathBuf {
        self.path("n.sock")
    }

    fn endpoint(&self) -> String {
        format!("unix:{}", self.socket().display())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }

    /// The CLI, as the node's own user on its socket, run in the node's directory.
    fn cli(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(NODUS);
        c.arg("--node").arg(self.endpoint()).args(args).current_dir(self.dir.path()).env_remove("NODUS_TOKEN");
        c
    }

    async fn admin(&self) -> Admin {
        Client::connect(ClientConfig::new(self.endpoint()).no_reconnect()).await.unwrap().0.admin()
    }

    /// Deploys the Rust procedures app as `procs` (with `profile` instead of its own when given).
    fn deploy_procs(&self, profile: Option<&str>) {
        let app = self.path("procs-app");
        std::fs::create_dir_all(&app).unwrap();
        let example = repo().join("examples/procs-app");
        std::fs::copy(example.join("manifest.json"), app.join("manifest.json")).unwrap();
        match profile {
            Some(p) => std::fs::write(app.join("profile.toml"), p).unwrap(),
            None => drop(std::fs::copy(example.join("profile.toml"), app.join("profile.toml")).unwrap()),
        }
        std::fs::copy(worker(), app.join("nodus-procs-worker")).unwrap();
        let out = self.cli(&["app", "deploy", "procs", app.to_str().unwrap()]);
        assert!(out.status.success(), "deploy: {}{}", text(&out), self.log());
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The example procedures worker, built next to `nodus`.
fn worker() -> PathBuf {
    let p = Path::new(NODUS).with_file_name("nodus-procs-worker");
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build -p nodus-tasks --bins` (cargo test --workspace builds it)",
        p.display()
    );
    p
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim_end().to_string()
}

/// Sends one request line over a new connection and reads the one answer line (the server
/// closes after it).
async fn arpcp_raw(addr: SocketAddr, line: &[u8]) -> Value {
    let mut s = TcpStream::connect(addr).await.expect("connect to arpcp");
    s.write_all(line).await.unwrap();
    s.write_all(b"\r\n").await.unwrap();
    read_answer(&mut s).await
}

async fn read_answer(s: &mut TcpStream) -> Value {
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await.expect("answered in time").expect("read");
    let line = String::from_utf8(buf).expect("a UTF-8 answer");
    assert!(line.ends_with("\r\n") && line.matches('\n').count() == 1, "one line ending in CRLF: {line:?}");
    let v: Value = serde_json::from_str(line.trim_end()).expect("a JSON answer");
    assert!(v["code"].is_u64() && v["description"].is_string(), "{v}");
    v
}

async fn arpcp(addr: SocketAddr, v: Value) -> Value {
    arpcp_raw(addr, v.to_string().as_bytes()).await
}

fn code(v: &Value) -> u64 {
    v["code"].as_u64().unwrap()
}

/// Asserts the answer's code, and that it says something.
fn expect(v: &Value, want: u64, what: &str) {
    assert_eq!(code(v), want, "{what}: {v}");
    assert!(!v["description"].as_str().unwrap().is_empty(), "{what}: {v}");
}

fn atask(procedure: &str, args: Value) -> Value {
    json!({"method": "atask", "version": "0.3", "remote_procedure": procedure, "remote_procedure_args": args})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_arpcp_code_through_the_nodes_listener() {
    let node =
        Node::start(Extra { tasks: "arpcp_read_timeout_ms = 500\narpcp_max_line_bytes = 65536", ..Extra::default() });
    node.deploy_procs(None);
    let (addr, admin) = (node.arpcp, node.admin().await);

    // 100: every method, in any case, with every accepted version.
    let a = arpcp(addr, atask("procs.add", json!([1, 2]))).await;
    expect(&a, 100, "atask");
    let id = a["data"].as_str().expect("the id is a bare string").to_string();
    assert!(admin.task_wait(&id, WAIT).await.unwrap().status.is_final());
    let g = arpcp(addr, json!({"method": "get", "version": "1.0", "atask_id": id})).await;
    assert_eq!((code(&g), g["description"].as_str(), &g["data"]), (100, Some("done"), &json!(3)), "{g}");
    let t = json!({"method": "TASK", "version": "1.0", "remote_procedure": "procs.concat", "remote_procedure_args": ["a", "b"]});
    let t = arpcp(addr, t).await;
    assert_eq!((code(&t), &t["data"]), (100, &json!("ab")), "{t}");
    let s =
        arpcp(addr, json!({"method": "Signal", "version": "ARPCP/1.0", "atask_id": id, "atask_status": "accepted"}))
            .await;
    assert_eq!((code(&s), &s["data"]), (100, &json!("OK")), "{s}");
    let i = arpcp(addr, json!({"method": "ID", "version": "1.0"})).await;
    assert_eq!((code(&i), &i["data"]), (100, &json!("tn")), "{i}");
    let p = arpcp(addr, json!({"method": "procedures", "version": "1.0"})).await;
    assert!(code(&p) == 100 && p["data"].as_array().unwrap().contains(&json!("procs.add")), "{p}");
    // Not finished yet: 100 with its status, data null.
    let slow = arpcp(addr, atask("procs.sleep", json!([60000]))).await["data"].as_str().unwrap().to_string();
    let g = arpcp(addr, json!({"method": "get", "version": "1.0", "atask_id": slow})).await;
    assert!(
        code(&g) == 100 && ["pending", "running"].contains(&g["description"].as_str().unwrap()) && g["data"].is_null(),
        "{g}"
    );
    let t =
        arpcp(addr, json!({"method": "signal", "version": "1.0", "atask_id": slow, "atask_status": "terminate"})).await;
    expect(&t, 100, "terminate");

    // 200: not JSON, not an object, bad UTF-8, a bad field, a line too long, no line in time.
    expect(&arpcp_raw(addr, b"hello").await, 200, "not JSON");
    expect(&arpcp_raw(addr, b"[\"atask\", 1]").await, 200, "an array");
    expect(&arpcp_raw(addr, b"{\"method\": \"id\xff\", \"version\": \"1.0\"}").await, 200, "bad UTF-8");
    let a = arpcp(addr, json!({"method": "signal", "version": "1.0", "atask_id": id, "atask_status": "explode"})).await;
    expect(&a, 200, "an unknown signal status");
    let long = format!("{{\"method\": \"atask\", \"pad\": \"{}\"}}", "x".repeat(70 * 1024));
    let a = arpcp_raw(addr, long.as_bytes()).await;
    assert!(code(&a) == 200 && a["description"].as_str().unwrap().contains("longer than"), "{a}");
    let started = Instant::now();
    let mut half = TcpStream::connect(addr).await.unwrap();
    half.write_all(b"{\"method\": \"id\"").await.unwrap();
    let mut mute = TcpStream::connect(addr).await.unwrap();
    // Others are served meanwhile.
    expect(&arpcp(addr, json!({"method": "id", "version": "1.0"})).await, 100, "served beside a slow client");
    let a = read_answer(&mut half).await;
    assert!(code(&a) == 200 && a["description"].as_str().unwrap().contains("within"), "{a}");
    expect(&read_answer(&mut mute).await, 200, "a client that never sends");
    assert!(started.elapsed() >= Duration::from_millis(500), "answered at the read timeout");

    // 201, 202, 206.
    expect(&arpcp(addr, json!({"method": "fly", "version": "1.0"})).await, 201, "unknown method");
    let a = arpcp(addr, json!({"method": "atask", "version": "1.0", "remote_procedure": "procs.add"})).await;
    assert!(code(&a) == 202 && a["description"].as_str().unwrap().contains("remote_procedure_args"), "{a}");
    let a = arpcp(addr, json!({"method": "get", "version": "1.0"})).await;
    assert!(code(&a) == 202 && a["description"].as_str().unwrap().contains("atask_id"), "{a}");
    expect(&arpcp(addr, json!({"method": "id"})).await, 202, "no version");
    let a =
        json!({"method": "atask", "version": "2.0", "remote_procedure": "procs.add", "remote_procedure_args": [1, 2]});
    expect(&arpcp(addr, a).await, 206, "another version");

    // 203, 204: refused before anything runs.
    expect(&arpcp(addr, atask("procs.nope", json!([]))).await, 203, "an undeclared event");
    expect(&arpcp(addr, atask("ghost.add", json!([1, 2]))).await, 203, "an unknown app");
    let a = arpcp(addr, atask("procs.add", json!([1]))).await;
    assert!(code(&a) == 204 && a["description"].as_str().unwrap().contains("takes 2 arguments"), "{a}");
    let a = arpcp(addr, atask("procs.add", json!(["1", 2]))).await;
    assert!(code(&a) == 204 && a["description"].as_str().unwrap().contains("must be number"), "{a}");
    expect(&arpcp(addr, atask("procs.add", json!({"a": 1}))).await, 204, "arguments that are not an array");

    // 205.
    expect(
        &arpcp(addr, json!({"method": "get", "version": "1.0", "atask_id": "no-such-task"})).await,
        205,
        "unknown id",
    );
    let a = arpcp(addr, json!({"method": "signal", "version": "1.0", "atask_id": slow, "atask_status": "done"})).await;
    expect(&a, 205, "a terminated task is gone");
    expect(
        &arpcp(addr, json!({"method": "get", "version": "1.0", "atask_id": 42})).await,
        205,
        "an id that is not a string",
    );

    // 400: the procedure ran and failed, sync and async.
    let a = json!({"method": "task", "version": "1.0", "remote_procedure": "procs.fail", "remote_procedure_args": ["disk on fire"]});
    let a = arpcp(addr, a).await;
    assert!(code(&a) == 400 && a["description"].as_str().unwrap().contains("disk on fire"), "{a}");
    let failing = arpcp(addr, atask("procs.fail", json!(["again"]))).await["data"].as_str().unwrap().to_string();
    assert!(admin.task_wait(&failing, WAIT).await.unwrap().status.is_final());
    let g = arpcp(addr, json!({"method": "get", "version": "1.0", "atask_id": failing})).await;
    assert!(code(&g) == 400 && g["description"].as_str().unwrap().contains("again"), "{g}");

    // nodus's optional fields: a deadline already past is 200 (nothing stored); a parent that
    // is unknown is 205; a known one is recorded, and a deadline ahead is kept.
    let mut past = atask("procs.add", json!([1, 2]));
    past["expires_at"] = json!(nodus_tasks::UnixMs::now().as_i64() - 1_000);
    let a = arpcp(addr, past).await;
    assert!(code(&a) == 200 && a["description"].as_str().unwrap().contains("expired"), "{a}");
    let mut orphan = atask("procs.add", json!([1, 2]));
    orphan["pid"] = json!("no-such-task");
    expect(&arpcp(addr, orphan).await, 205, "an unknown parent");
    let parent = arpcp(addr, atask("procs.sleep", json!([60000]))).await["data"].as_str().unwrap().to_string();
    let mut child = atask("procs.add", json!([1, 2]));
    child["pid"] = json!(parent);
    let ahead = nodus_tasks::UnixMs::now().as_i64() + 600_000;
    child["expires_at"] = json!(ahead);
    let child = arpcp(addr, child).await["data"].as_str().unwrap().to_string();
    let t = admin.task_get(&child).await.unwrap();
    assert_eq!((t.parent.as_deref(), t.deadline), (Some(parent.as_str()), u64::try_from(ahead).ok()), "{t:?}");
    // SIGNAL interrupted of the parent interrupts its subtask too (unless it already finished).
    let s = json!({"method": "signal", "version": "1.0", "atask_id": parent, "atask_status": "interrupted"});
    expect(&arpcp(addr, s).await, 100, "interrupted");
    assert_eq!(admin.task_wait(&parent, WAIT).await.unwrap().status, TaskStatus::Interrupted);
    let t = admin.task_wait(&child, WAIT).await.unwrap();
    assert!(matches!(t.status, TaskStatus::Interrupted | TaskStatus::Done), "{t:?}");
    // (300 has tests of its own below: a store that is full, one that cannot be opened.)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_be_written_answers_300_and_the_node_keeps_running() {
    let node = Node::start(Extra { tasks: "max_store_bytes = 262144", ..Extra::default() });
    node.deploy_procs(None);
    let big = "y".repeat(16 * 1024);
    let mut accepted = Vec::new();
    let full = loop {
        let a = arpcp(node.arpcp, atask("procs.echo", json!([big]))).await;
        if code(&a) != 100 {
            break a;
        }
        accepted.push(a["data"].as_str().unwrap().to_string());
        assert!(accepted.len() < 200, "the store never filled up");
    };
    assert!(code(&full) == 300 && full["description"].as_str().unwrap().contains("full"), "{full}");
    // The service says the same, with its error code. The node keeps running the accepted
    // tasks meanwhile, and the store writes their claims and results in the same transactions
    // as submissions: the batch that did not fit may have held a result that is then refused,
    // leaving room for one more submission. So submit until one is refused.
    let out = loop {
        let out = node.cli(&["call", "tasks", "ATASK", "procedure=procs.echo", &format!("args=[\"{big}\"]")]);
        if !out.status.success() {
            break out;
        }
        let id = text(&out).split("id=").nth(1).and_then(|s| s.split([';', '\n']).next()).map(|s| s.trim().to_string());
        accepted.push(id.unwrap_or_else(|| panic!("an id: {}", text(&out))));
        assert!(accepted.len() < 200, "the store never filled up again");
    };
    assert!(text(&out).contains("code=unavailable") && text(&out).contains("arpcp=300"), "{}", text(&out));
    // Nothing accepted was lost, and the node and the rest of the service keep answering.
    for id in &accepted {
        let g = arpcp(node.arpcp, json!({"method": "get", "version": "1.0", "atask_id": id})).await;
        assert_eq!(code(&g), 100, "{id}: {g}");
    }
    assert_eq!(code(&arpcp(node.arpcp, json!({"method": "id", "version": "1.0"})).await), 100);
    assert!(node.cli(&["status"]).status.success());
    assert!(node.cli(&["task", "get", &accepted[0]]).status.success());
}

/// Kills the node and puts a directory where its task database goes, so that SQLite cannot open
/// it when the node runs again. Returns that directory: removing it lets the store open.
fn block_task_store(node: &mut Node) -> PathBuf {
    node.kill9();
    let db = node.path("data/tasks.db");
    for f in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{f}", db.display()));
    }
    std::fs::create_dir_all(db.join("in-the-way")).unwrap();
    db
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_be_opened_answers_300_until_it_can() {
    let mut node = Node::start(Extra::default());
    let db = block_task_store(&mut node);
    node.run();
    let a = arpcp(node.arpcp, json!({"method": "id", "version": "1.0"})).await;
    assert!(code(&a) == 300 && a["description"].as_str().unwrap().contains("cannot be opened"), "{a}");
    let out = node.cli(&["task", "procedures"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("cannot be opened"), "{}", text(&out));
    assert!(node.cli(&["status"]).status.success(), "the node keeps running");
    // Once the file can be made, the service opens it (it retries with backoff).
    std::fs::remove_dir_all(&db).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let a = arpcp(node.arpcp, json!({"method": "id", "version": "1.0"})).await;
        if code(&a) == 100 {
            break;
        }
        assert!(Instant::now() < deadline, "the store was never opened: {a}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(node.cli(&["task", "list"]).status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_arpcp_clients_of_the_node_are_all_answered() {
    let node = Node::start(Extra::default());
    node.deploy_procs(None);
    let addr = node.arpcp;
    // All 1 000 connect first, then all send: 1 000 connections open at once.
    let mut streams = Vec::with_capacity(1000);
    for _ in 0..1000 {
        streams.push(TcpStream::connect(addr).await.expect("connect"));
    }
    let mut joins = Vec::with_capacity(1000);
    for (i, mut s) in streams.into_iter().enumerate() {
        joins.push(tokio::spawn(async move {
            s.write_all(format!("{}\r\n", atask("procs.add", json!([i, 1]))).as_bytes()).await.unwrap();
            let a = read_answer(&mut s).await;
            assert_eq!(code(&a), 100, "client {i}: {a}");
            (i, a["data"].as_str().unwrap().to_string())
        }));
    }
    let admin = node.admin().await;
    let mut ids = HashSet::new();
    for j in joins {
        let (i, id) = j.await.unwrap();
        assert!(ids.insert(id.clone()), "ids are unique");
        let t = admin.task_wait(&id, WAIT).await.unwrap();
        assert_eq!((t.status, t.result), (TaskStatus::Done, Some(json!(i + 1))));
    }
    assert_eq!(ids.len(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_runs_submits_waits_lists_aborts_and_watches() {
    let node = Node::start(Extra::default());
    node.deploy_procs(None);
    let cli = |args: &[&str]| node.cli(args);
    // The node's own notices to its built-in services (HELP, READY) are not warned about.
    assert!(!node.log().contains("malformed"), "{}", node.log());

    // run: the result, as text or typed JSON.
    let out = cli(&["task", "run", "procs.add", "40", "2"]);
    assert_eq!((out.status.code(), stdout(&out).as_str()), (Some(0), "42"), "{}", text(&out));
    assert_eq!(stdout(&cli(&["task", "run", "procs.greet", "ada"])), "hello, ada");
    let out = cli(&["--json", "task", "run", "procs.echo", "{\"a\": [1, \"two\"]}"]);
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        (v["status"].as_str(), &v["result"], &v["args"]),
        (Some("done"), &json!({"a": [1, "two"]}), &json!([{"a": [1, "two"]}]))
    );
    // A failure, a timeout, a refusal: exit 1 with the reason.
    let out = cli(&["task", "run", "procs.fail", "boom"]);
    assert!(out.status.code() == Some(1) && text(&out).contains("boom"), "{}", text(&out));
    let out = cli(&["task", "run", "procs.sleep", "20000", "--timeout", "300ms"]);
    assert!(out.status.code() == Some(1) && text(&out).contains("TimedOut"), "{}", text(&out));
    let out = cli(&["task", "run", "procs.add", "1"]);
    assert!(out.status.code() == Some(1) && text(&out).contains("takes 2 arguments"), "{}", text(&out));
    let out = cli(&["task", "run", "procs.nope"]);
    assert!(out.status.code() == Some(1) && text(&out).contains("unknown procedure"), "{}", text(&out));

    // submit, get, wait; an idempotency key.
    let id = stdout(&cli(&["task", "submit", "procs.concat", "ab", "cd"]));
    let out = cli(&["task", "wait", &id]);
    assert_eq!((out.status.code(), stdout(&out)), (Some(0), format!("{id} done abcd")));
    let out = cli(&["--json", "task", "get", &id]);
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!((v["status"].as_str(), v["attempt"].as_u64(), &v["result"]), (Some("done"), Some(1), &json!("abcd")));
    let out = cli(&["task", "get", &id]);
    assert!(stdout(&out).contains("status     done") && stdout(&out).contains("result     abcd"), "{}", text(&out));
    let keyed = |key: &str| {
        let out = cli(&["--json", "task", "submit", "procs.noop", "--key", key]);
        serde_json::from_str::<Value>(&stdout(&out)).unwrap()
    };
    let (first, again) = (keyed("order-1"), keyed("order-1"));
    assert_eq!(
        (&first["id"], first["existing"].as_bool(), again["existing"].as_bool()),
        (&again["id"], Some(false), Some(true))
    );
    let out = cli(&["task", "get", "no-such-task"]);
    assert!(out.status.code() == Some(1) && text(&out).contains("no task"), "{}", text(&out));

    // abort a running task; wait says it did not succeed.
    let sleeper = stdout(&cli(&["task", "submit", "procs.sleep", "60000"]));
    let admin = node.admin().await;
    let deadline = Instant::now() + WAIT;
    while admin.task_get(&sleeper).await.unwrap().status != TaskStatus::Running {
        assert!(Instant::now() < deadline, "the sleeper never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = cli(&["task", "abort", &sleeper]);
    assert_eq!((out.status.code(), stdout(&out)), (Some(0), format!("{sleeper} interrupted (was running)")));
    let out = cli(&["task", "wait", &sleeper, &id]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stdout(&out).contains(&format!("{sleeper} interrupted")) && stdout(&out).contains(&format!("{id} done")),
        "{}",
        text(&out)
    );

    // list, by status and procedure.
    let out = cli(&["--json", "task", "list", "--status", "interrupted"]);
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        v.as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap()).collect::<Vec<_>>(),
        vec![sleeper.as_str()]
    );
    let out = cli(&["task", "list", "--procedure", "procs.concat"]);
    assert!(
        stdout(&out).starts_with("ID") && stdout(&out).contains(&id) && !stdout(&out).contains(&sleeper),
        "{}",
        text(&out)
    );
    let out = cli(&["task", "procedures"]);
    assert!(stdout(&out).contains("procs.add(a: number, b: number)"), "{}", text(&out));

    // watch: every change, as it happens.
    let mut watch =
        node.command(&["--json", "task", "watch"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let lines = lines_of(watch.stdout.take().unwrap());
    let notes = lines_of(watch.stderr.take().unwrap());
    let note = notes.recv_timeout(WAIT).expect("watch says it is watching");
    assert!(note.contains("watching"), "{note}");
    let watched = stdout(&cli(&["task", "submit", "procs.add", "2", "3"]));
    let mut statuses = Vec::new();
    while statuses.last().map(String::as_str) != Some("done") {
        let line = lines.recv_timeout(WAIT).expect("a change");
        let c: TaskChange = serde_json::from_str(&line).unwrap();
        if c.id == watched {
            statuses.push(c.status);
        }
    }
    assert_eq!(statuses, ["pending", "running", "done"]);
    let _ = watch.kill();
    let _ = watch.wait();

    // submit --from: many tasks in batches, ids in order; refused lines said on stderr; then wait
    // for them all, with a progress bar.
    let file = node.path("tasks.jsonl");
    let mut body = String::new();
    for i in 0..2500 {
        body.push_str(&format!("{{\"procedure\": \"procs.add\", \"args\": [{i}, 1]}}\n"));
    }
    body.push_str("{\"procedure\": \"procs.nope\"}\n");
    std::fs::write(&file, body).unwrap();
    let out = cli(&["task", "submit", "--from", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "one line was refused: {}", String::from_utf8_lossy(&out.stderr));
    let ids: Vec<String> = stdout(&out).lines().map(String::from).collect();
    assert_eq!(ids.len(), 2500);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 2501") && err.contains("2500 submitted, 1 refused") && err.contains("submitted"),
        "{err}"
    );
    let mut args = vec!["task", "wait"];
    args.extend(ids.iter().map(String::as_str));
    let out = cli(&args);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let waited = stdout(&out);
    let results: HashMap<&str, &str> = waited.lines().map(|l| l.split_once(" done ").expect("done")).collect();
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(results.get(id.as_str()).copied(), Some((i + 1).to_string().as_str()), "{id}");
    }
    assert!(String::from_utf8_lossy(&out.stderr).contains("finished"), "a progress bar");
    let bad = node.path("bad.jsonl");
    std::fs::write(&bad, "{\"procedure\": \"procs.noop\"}\nnot json\n").unwrap();
    let out = cli(&["task", "submit", "--from", bad.to_str().unwrap()]);
    assert!(out.status.code() == Some(2) && text(&out).contains("line 2"), "{}", text(&out));
}

/// Lines of a child's pipe, as they come.
fn lines_of(r: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn procedures_follow_the_apps_and_permissions_hold() {
    let port = free_port();
    let node = Node::start(Extra { tcp: Some(port), ..Extra::default() });
    assert_eq!(stdout(&node.cli(&["task", "procedures"])), "no procedures: deploy an app whose manifest declares some");
    node.deploy_procs(None);
    assert!(stdout(&node.cli(&["task", "procedures"])).contains("procs.noop()"));

    // A stopped app's procedures are still tasks: they wait in the store until it runs again.
    assert!(node.cli(&["app", "stop", "procs"]).status.success());
    let id = stdout(&node.cli(&["task", "submit", "procs.add", "5", "5"]));
    let admin = node.admin().await;
    let t = admin.task_wait(&id, Duration::from_millis(500)).await.unwrap();
    assert_eq!(t.status, TaskStatus::Pending, "nothing runs it while the app is stopped");
    assert!(node.cli(&["app", "start", "procs"]).status.success());
    let t = admin.task_wait(&id, WAIT).await.unwrap();
    assert_eq!((t.status, t.result), (TaskStatus::Done, Some(json!(10))));
    // A removed app's procedures are unknown.
    assert!(node.cli(&["app", "remove", "procs"]).status.success());
    let out = node.cli(&["task", "submit", "procs.add", "1", "1"]);
    assert!(out.status.code() == Some(1) && text(&out).contains("unknown procedure"), "{}", text(&out));
    node.deploy_procs(None);

    // Over TCP without the token: submitting and reading are allowed, aborting is not.
    let tcp = format!("127.0.0.1:{port}");
    let anon = |args: &[&str]| {
        Command::new(NODUS)
            .arg("--node")
            .arg(&tcp)
            .args(args)
            .current_dir(node.dir.path())
            .env_remove("NODUS_TOKEN")
            .output()
            .unwrap()
    };
    let out = anon(&["task", "submit", "procs.sleep", "60000"]);
    assert!(out.status.success(), "{}", text(&out));
    let sleeper = stdout(&out);
    assert!(anon(&["task", "get", &sleeper]).status.success());
    let out = anon(&["task", "abort", &sleeper]);
    assert!(out.status.code() == Some(1) && text(&out).contains("admin"), "{}", text(&out));
    let out = anon(&["call", "tasks", "SIGNAL", &format!("id={sleeper}"), "status=terminate"]);
    assert!(out.status.code() == Some(1) && text(&out).contains("forbidden"), "{}", text(&out));
    // With the node's token it may.
    let token = std::fs::read_to_string(node.path("data/auth.token")).unwrap();
    let out = Command::new(NODUS)
        .arg("--node")
        .arg(&tcp)
        .args(["task", "abort", &sleeper])
        .env("NODUS_TOKEN", token.trim())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn the_tasks_service_answers_a_client_of_another_node() {
    let root = tempfile::tempdir().unwrap();
    let a = common::Proc::new(&root, "ta", &[], "s3cret");
    let b = common::Proc::new(&root, "tb", &[a.port], "s3cret");
    let app = root.path().join("procs-app");
    std::fs::create_dir_all(&app).unwrap();
    for f in ["manifest.json", "profile.toml"] {
        std::fs::copy(repo().join("examples/procs-app").join(f), app.join(f)).unwrap();
    }
    std::fs::copy(worker(), app.join("nodus-procs-worker")).unwrap();
    let out = common::cli(&a, &["app", "deploy", "procs", app.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    common::rt().block_on(async {
        let (client, _) = Client::connect(ClientConfig::new(b.endpoint()).no_reconnect()).await.unwrap();
        // Until the link is up, ta:tasks is unknown on tb.
        let deadline = Instant::now() + WAIT;
        let reply = loop {
            let req = nodus_wire::Message::new("TASK")
                .to("ta:tasks")
                .param("procedure", "procs.add")
                .param("args", "[40, 2]");
            match client.request_with_timeout(req, WAIT).await {
                Ok(r) => break r,
                Err(e) => {
                    assert!(Instant::now() < deadline, "ta:tasks never answered: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        assert_eq!(
            (reply.command.as_str(), reply.get("arpcp"), reply.from.server.as_str()),
            ("TASK", Some("100"), "ta")
        );
        let t: Value = serde_json::from_slice(&reply.payload).unwrap();
        assert_eq!(t["result"], json!(42));
        // tb has a task service of its own, without the app.
        let out = common::cli(&b, &["task", "procedures"]);
        assert!(stdout(&out).contains("no procedures"), "{}", text(&out));
    });
}

/// The Python virtualenv with the `cocaine` framework, if it is there.
fn venv() -> Option<PathBuf> {
    let venv = match std::env::var_os("NODUS_PYENV") {
        Some(v) => PathBuf::from(v),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/nodus-cocaine-venv"),
    };
    venv.join("bin/python").exists().then_some(venv)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_cocaine_app_runs_as_tasks_through_the_node() {
    let Some(venv) = venv() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the cocaine virtualenv is missing: run tests/cocaine-compat/setup.sh"
        );
        eprintln!("SKIPPED the Python procedures app: run tests/cocaine-compat/setup.sh");
        return;
    };
    let node = Node::start(Extra::default());
    let app = node.path("procs-py");
    std::fs::create_dir_all(&app).unwrap();
    let example = repo().join("examples/procs-py");
    for f in ["profile.toml", "run.sh", "worker.py"] {
        std::fs::copy(example.join(f), app.join(f)).unwrap();
    }
    let mut manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(example.join("manifest.json")).unwrap()).unwrap();
    manifest["env"]["NODUS_PYENV"] = json!(venv.to_str().unwrap());
    std::fs::write(app.join("manifest.json"), manifest.to_string()).unwrap();
    let out = node.cli(&["app", "deploy", "pyprocs", app.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));

    let out = node.cli(&["task", "run", "pyprocs.add", "40", "2"]);
    assert_eq!((out.status.code(), stdout(&out).as_str()), (Some(0), "42"), "{}{}", text(&out), node.log());
    let out = node.cli(&["--json", "task", "run", "pyprocs.echo", "{\"k\": [\"v\", 1.5, null]}"]);
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["result"], json!({"k": ["v", 1.5, null]}));
    let a = arpcp(node.arpcp, atask("pyprocs.concat", json!(["py", "thon"]))).await;
    let id = a["data"].as_str().unwrap().to_string();
    assert!(node.admin().await.task_wait(&id, WAIT).await.unwrap().status.is_final());
    let g = arpcp(node.arpcp, json!({"method": "get", "version": "0.3", "atask_id": id})).await;
    assert_eq!((code(&g), &g["data"]), (100, &json!("python")), "{g}");
    let t = json!({"method": "task", "version": "0.3", "remote_procedure": "pyprocs.fail", "remote_procedure_args": ["no coffee"]});
    let t = arpcp(node.arpcp, t).await;
    assert!(code(&t) == 400 && t["description"].as_str().unwrap().contains("no coffee"), "{t}");
    expect(&arpcp(node.arpcp, atask("pyprocs.add", json!([1]))).await, 204, "arity, before it runs");
}

/// How many acknowledged tasks the kill -9 test waits for before it kills the node (more are
/// being submitted then: [`KILL_SUBMISSIONS`] in all).
const KILL_TASKS: usize = 10_000;
/// How many tasks the kill -9 test tries to submit.
const KILL_SUBMISSIONS: usize = 12_000;
/// arpcp clients submitting at once in the kill -9 test.
const KILL_SUBMITTERS: usize = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_10000_tasks_in_flight_loses_nothing_and_completes_nothing_twice() {
    // Every status change goes to the service `taskwatch`, cached by the node (durably, within
    // its bounds) while the watcher is away, so the completions of both runs are all seen.
    let mut node = Node::start(Extra {
        top: "expected_services = [\"taskwatch\"]",
        tasks: "notify = \"service:taskwatch\"",
        limits: "cache_max_messages = 200000",
        ..Extra::default()
    });
    // One worker, one call at a time: execution is slower than submission, so the kill finds
    // thousands of acknowledged tasks not done yet.
    node.deploy_procs(Some("pool-limit = 1\nconcurrency = 1\nqueue-limit = 64\n"));
    let config = ClientConfig::new(node.endpoint()).service("taskwatch").incoming_capacity(1 << 20);
    let (_watcher, mut incoming) = Client::connect(config).await.unwrap();
    let done: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(0usize);
    let counter = done.clone();
    tokio::spawn(async move {
        while let Some(m) = incoming.recv().await {
            if let Some(c) = TaskChange::from_message(&m) {
                if c.status == "done" {
                    let seen = {
                        let mut d = counter.lock().unwrap();
                        *d.entry(c.id).or_default() += 1;
                        d.len()
                    };
                    let _ = done_tx.send(seen);
                }
            }
        }
    });

    // Submitters over arpcp, each one request at a time, until the node dies.
    let log = node.path("runs.log");
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let (acked_tx, mut acked_rx) = tokio::sync::watch::channel(0usize);
    let acked_tx = Arc::new(acked_tx);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut submitters = Vec::new();
    for _ in 0..KILL_SUBMITTERS {
        let (acked, next, log, addr, acked_tx) =
            (acked.clone(), next.clone(), log.clone(), node.arpcp, acked_tx.clone());
        submitters.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= KILL_SUBMISSIONS {
                    return;
                }
                let req = atask("procs.record", json!([log.to_str().unwrap(), n])).to_string();
                let Ok(mut s) = TcpStream::connect(addr).await else { return };
                if s.write_all(format!("{req}\r\n").as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = Vec::new();
                if s.read_to_end(&mut buf).await.is_err() {
                    return;
                }
                match serde_json::from_slice::<Value>(&buf) {
                    Ok(v) if v["code"] == 100 => {
                        let n = {
                            let mut a = acked.lock().unwrap();
                            a.push(v["data"].as_str().unwrap().to_string());
                            a.len()
                        };
                        acked_tx.send_replace(n);
                    }
                    Ok(v) => panic!("submission refused: {v}"),
                    // The node died while answering: not acknowledged.
                    Err(_) => return,
                }
            }
        }));
    }
    // Kill once 10 000 are acknowledged (more are being submitted) and some are done.
    tokio::time::timeout(WAIT, acked_rx.wait_for(|n| *n >= KILL_TASKS)).await.expect("10 000 acknowledged").unwrap();
    tokio::time::timeout(WAIT, done_rx.wait_for(|n| *n >= 100)).await.expect("some done").unwrap();
    node.kill9();
    let (acked_at_kill, done_at_kill) = (acked.lock().unwrap().len(), done.lock().unwrap().len());
    for s in submitters {
        s.await.unwrap();
    }
    let acked: Vec<String> = acked.lock().unwrap().clone();
    assert!(
        acked_at_kill >= done_at_kill + KILL_TASKS / 4,
        "work in flight at the kill: {acked_at_kill} acknowledged, {done_at_kill} done"
    );
    assert!(acked_at_kill < KILL_SUBMISSIONS, "submissions were in flight at the kill");

    // Restart: the app starts again, the tasks that were running run again, everything ends.
    node.run();
    let admin = node.admin().await;
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let c = admin.task_counts().await.unwrap();
        if c.pending + c.running == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the tasks did not all finish: {c:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A last task: its completion comes after every earlier one to the watcher.
    let marker = admin.task_submit(&nodus_client::admin::TaskSpec::new("procs.noop", vec![])).await.unwrap().id;
    let seen = done.clone();
    tokio::time::timeout(WAIT, done_rx.wait_for(|_| seen.lock().unwrap().contains_key(&marker)))
        .await
        .expect("the marker's completion reached the watcher")
        .unwrap();

    // What the store says, read page by page.
    let mut stored_done = HashSet::new();
    let mut after: Option<String> = None;
    loop {
        let page =
            admin.task_list(Some(TaskStatus::Done), Some("procs.record"), None, after.as_deref(), 1000).await.unwrap();
        stored_done.extend(page.tasks.iter().map(|t| t.id.clone()));
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let lost = acked.iter().filter(|id| !stored_done.contains(*id)).count();
    let completed = acked.len() - lost;
    let done = done.lock().unwrap();
    let duplicates = done.values().filter(|&&n| n > 1).count();
    let runs = std::fs::read_to_string(&log).unwrap();
    let executions = runs.lines().count();
    let distinct = runs.lines().collect::<HashSet<_>>().len();
    eprintln!(
        "kill -9 with tasks in flight: submitted (acknowledged) {}, acknowledged at the kill {acked_at_kill}, done at the kill \
         {done_at_kill}, completed {completed}, lost {lost}, duplicate completions {duplicates}; stored though their \
         acknowledgement died with the node {}, executions {executions} (run again after the kill: {})",
        acked.len(),
        stored_done.len() - completed,
        executions - distinct,
    );
    assert_eq!(lost, 0, "acknowledged tasks lost");
    assert_eq!(duplicates, 0, "tasks completed twice");
    assert!(executions >= completed, "every completion is an execution");
}

/// `[tasks] store = "postgres://..."`: two nodes on one PostgreSQL database (a throw-away server:
/// `$NODUS_TEST_PG`, else one of this binary's own). `nodus task` and arpcp work as with SQLite;
/// a task submitted on one node is read, waited for and run by the other; a node killed with
/// SIGKILL and started again finds every task it stored. Without PostgreSQL installed the test
/// says so and passes, except under `CI=true`.
#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_share_one_postgresql_store_through_nodus_task_and_arpcp() {
    let Some(url) = pgtest::server() else { return };
    let sep = if url.contains('?') { '&' } else { '?' };
    let store = format!("store = \"{url}{sep}schema={}\"", pgtest::fresh_schema());
    let mut a = Node::start(Extra { name: Some("pga"), tasks: &store, ..Extra::default() });
    let b = Node::start(Extra { name: Some("pgb"), tasks: &store, ..Extra::default() });
    a.deploy_procs(None);
    b.deploy_procs(None);

    let out = a.cli(&["task", "run", "procs.add", "40", "2"]);
    assert_eq!((out.status.code(), stdout(&out).as_str()), (Some(0), "42"), "{}", text(&out));
    // Submitted on a, waited for and read on b.
    let id = stdout(&a.cli(&["task", "submit", "procs.concat", "ab", "cd"]));
    let out = b.cli(&["task", "wait", &id]);
    assert_eq!((out.status.code(), stdout(&out)), (Some(0), format!("{id} done abcd")), "{}", text(&out));
    let v: Value = serde_json::from_str(&stdout(&b.cli(&["--json", "task", "get", &id]))).unwrap();
    assert_eq!((v["status"].as_str(), &v["result"]), (Some("done"), &json!("abcd")));
    // arpcp on b answers for a task a stored.
    let got = arpcp(b.arpcp, json!({"method": "get", "version": "1.0", "atask_id": id})).await;
    assert_eq!((code(&got), got["description"].as_str(), &got["data"]), (100, Some("done"), &json!("abcd")), "{got}");

    // Many tasks from both nodes: every one ends done, run by either node.
    let ids: Vec<String> = (0..40)
        .map(|i| {
            let n = if i % 2 == 0 { &a } else { &b };
            stdout(&n.cli(&["task", "submit", "procs.add", &i.to_string(), "1"]))
        })
        .collect();
    let mut args = vec!["task", "wait"];
    args.extend(ids.iter().map(String::as_str));
    let out = a.cli(&args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // SIGKILL a, start it again: what it stored is still there.
    a.kill9();
    a.run();
    let v: Value = serde_json::from_str(&stdout(&a.cli(&["--json", "task", "get", &ids[0]]))).unwrap();
    assert_eq!((v["status"].as_str(), &v["result"]), (Some("done"), &json!(1)));
    let out = a.cli(&["task", "run", "procs.add", "1", "1"]);
    assert_eq!((out.status.code(), stdout(&out).as_str()), (Some(0), "2"), "{}", text(&out));
}

/// The control plane sees tasks: a running task is a component of the node's tree (kind `task`,
/// started by the node) while it runs, and `nodus kill` of it aborts it (`interrupted`); a store
/// that cannot be opened raises the node's `tasks/store-failure` flag until it opens.
#[tokio::test(flavor = "multi_thread")]
async fn a_running_task_is_in_the_tree_a_kill_aborts_it_and_a_store_failure_raises_a_flag() {
    let mut node = Node::start(Extra::default());
    node.deploy_procs(None);
    let id = stdout(&node.cli(&["task", "submit", "procs.sleep", "60000"]));
    let deadline = Instant::now() + WAIT;
    let component = loop {
        let out = node.cli(&["--json", "tree"]);
        let v: Value = serde_json::from_str(&stdout(&out)).unwrap_or_default();
        let found = v["components"].as_array().and_then(|cs| {
            cs.iter().find(|c| c["kind"] == "task" && c["name"].as_str().is_some_and(|n| n.contains(&id))).cloned()
        });
        if let Some(c) = found {
            break c;
        }
        assert!(Instant::now() < deadline, "the running task never joined the tree: {}", text(&out));
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(component["depth"], json!(1), "started by the node: {component}");
    let cid = component["id"].as_str().map_or_else(|| component["id"].to_string(), str::to_string);
    let out = node.cli(&["kill", &cid]);
    assert!(out.status.success(), "{}", text(&out));
    let out = node.cli(&["task", "wait", &id]);
    assert!(stdout(&out).contains("interrupted"), "a killed task is interrupted: {}", text(&out));
    let deadline = Instant::now() + WAIT;
    while stdout(&node.cli(&["--json", "tree"])).contains(&id) {
        assert!(Instant::now() < deadline, "an ended task leaves the tree");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The store cannot be opened: the flag is up; once it opens, down.
    let db = block_task_store(&mut node);
    node.run();
    let raised = |node: &Node| stdout(&node.cli(&["flags", "list"])).contains("store-failure");
    let deadline = Instant::now() + WAIT;
    while !raised(&node) {
        assert!(Instant::now() < deadline, "no store-failure flag: {}", text(&node.cli(&["flags", "list"])));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::remove_dir_all(&db).unwrap();
    let deadline = Instant::now() + WAIT;
    while raised(&node) {
        assert!(Instant::now() < deadline, "the store-failure flag stays up after the store opened");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The code of an error the node or the `tasks` service answered (`ERROR code=...`).
fn error_code(e: &nodus_client::AdminError) -> String {
    match e {
        nodus_client::AdminError::Failed { code, .. } => code.clone(),
        nodus_client::AdminError::Client(nodus_client::ClientError::Refused(r)) => {
            r.code().unwrap_or_default().to_string()
        }
        other => format!("not a refusal: {other}"),
    }
}

/// Polls `nodus task get ID` until the task has `status` (the node gives no event for a task
/// that starts other than WATCH, which needs a service of its own).
async fn until_status(admin: &Admin, id: &str, status: TaskStatus) {
    let deadline = Instant::now() + WAIT;
    loop {
        let t = admin.task_get(id).await.unwrap();
        if t.status == status {
            return;
        }
        assert!(Instant::now() < deadline, "task {id} never became {status:?}: {t:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One worker running one task at a time and one call waiting for it: the node claims two tasks
/// of `procs` at a time, the others wait in the store.
const ONE_AT_A_TIME: &str = "pool-limit = 1\nconcurrency = 1\nqueue-limit = 1\n";

/// Runs `procs.noop` once, so the app's worker is up and idle (calls made while a worker starts
/// wait in the app's queue, which these tests keep small).
async fn warm_up(admin: &Admin) {
    let t = admin.task_run(&TaskSpec::new("procs.noop", vec![]), WAIT).await.unwrap();
    assert_eq!(t.status, TaskStatus::Done, "{t:?}");
}

/// Issue 13 item 4 in the task store: a task whose deadline (`_expires_at` of its submission)
/// passes while it waits behind a busy worker is never executed (its procedure would append to a
/// file), it ends `error` with kind `Expired`, a sync caller waiting for it gets `ERROR
/// code=expired`; a submission already expired is refused at once; once the worker is free, a
/// task without a deadline runs and the expired ones still do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_deadline_passes_in_the_store_never_runs_and_its_sender_gets_the_error() {
    let node = Node::start(Extra::default());
    node.deploy_procs(Some(ONE_AT_A_TIME));
    let admin = node.admin().await;
    let file = node.path("ran.txt");
    let path = file.to_str().unwrap();
    warm_up(&admin).await;
    // Busy for longer than the deadlines below: one task runs, one waits in the app's queue.
    let busy = admin.task_submit(&TaskSpec::new("procs.sleep", vec![json!(3_000)])).await.unwrap();
    until_status(&admin, &busy.id, TaskStatus::Running).await;
    let queued = admin.task_submit(&TaskSpec::new("procs.sleep", vec![json!(10)])).await.unwrap();
    until_status(&admin, &queued.id, TaskStatus::Running).await;

    // Queued behind the busy worker with a short deadline.
    let late = TaskSpec::new("procs.record", vec![json!(path), json!("async")]).expires_in(Duration::from_millis(600));
    let late = admin.task_submit(&late).await.unwrap();
    let info = admin.task_get(&late.id).await.unwrap();
    assert_eq!(info.status, TaskStatus::Pending);
    assert!(info.deadline.is_some(), "the deadline is stored: {info:?}");
    // A sync caller: answered the expiry, not a result.
    let sync = TaskSpec::new("procs.record", vec![json!(path), json!("sync")]).expires_in(Duration::from_millis(600));
    let e = admin.task_run(&sync, WAIT).await.expect_err("an expired task has no result");
    assert_eq!(error_code(&e), "expired", "{e}");
    // The async one ends as expired (WAIT is answered when the store finishes it).
    let t = admin.task_wait(&late.id, WAIT).await.unwrap();
    assert_eq!(t.status, TaskStatus::Error, "{t:?}");
    let error = t.error.clone().expect("an error");
    assert_eq!(error.kind, "Expired", "{error}");
    assert!(error.message.contains("never ran"), "{error}");
    assert_eq!((t.attempt, t.started_at), (0, None), "never started: {t:?}");
    // Already expired on arrival: refused at once, nothing stored.
    let mut gone = TaskSpec::new("procs.record", vec![json!(path), json!("gone")]);
    gone.expires_at = Some(nodus_tasks::UnixMs::now().as_i64() - 1_000);
    let e = admin.task_submit(&gone).await.expect_err("an expired submission is refused");
    assert_eq!(error_code(&e), "expired", "{e}");
    let stats = admin.task_stats().await.unwrap();
    assert!(stats.submitted >= 3, "{stats:?}");

    // The worker frees up: a task without a deadline runs; the expired ones never do.
    assert_eq!(admin.task_wait(&busy.id, WAIT).await.unwrap().status, TaskStatus::Done);
    assert_eq!(admin.task_wait(&queued.id, WAIT).await.unwrap().status, TaskStatus::Done);
    let marker = TaskSpec::new("procs.record", vec![json!(path), json!("marker")]);
    let t = admin.task_run(&marker, WAIT).await.unwrap();
    assert_eq!(t.status, TaskStatus::Done, "{t:?}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "\"marker\"\n", "only the task without a deadline ran");
    let expired = admin.task_list(Some(TaskStatus::Error), Some("procs.record"), None, None, 10).await.unwrap().tasks;
    assert_eq!(expired.len(), 2, "both expired tasks are kept as errors: {expired:?}");
    assert!(expired.iter().all(|t| t.error.as_ref().is_some_and(|e| e.kind == "Expired")));
}

/// Issue 13 item 3 for tasks: a parent task with subtasks (one running, one claimed and waiting
/// in the app's queue, one waiting in the store), the running one drawn under its parent in the
/// tree; killing the parent interrupts all of them (the waiting ones never run: their procedure
/// would append to a file), the parent reports to the node that started it, and a new subtask
/// of the killed parent is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_task_kills_its_subtasks_running_or_waiting() {
    let node = Node::start(Extra::default());
    // Three at a time: the parent and its first subtask run, the second waits in the app's
    // queue, the third in the store.
    node.deploy_procs(Some("pool-limit = 1\nconcurrency = 2\nqueue-limit = 1\n"));
    let admin = node.admin().await;
    warm_up(&admin).await;
    let file = node.path("ran.txt");
    // Long enough to be killed while they run; a killed attempt's worker may finish its call
    // (only the session is cancelled), so the test waits that long for the worker at the end.
    const RUN_MS: u64 = 8_000;
    let parent = admin.task_submit(&TaskSpec::new("procs.sleep", vec![json!(RUN_MS)])).await.unwrap().id;
    until_status(&admin, &parent, TaskStatus::Running).await;
    let sub = |spec: TaskSpec| TaskSpec { pid: Some(parent.clone()), ..spec };
    let running = admin.task_submit(&sub(TaskSpec::new("procs.sleep", vec![json!(RUN_MS)]))).await.unwrap().id;
    until_status(&admin, &running, TaskStatus::Running).await;
    let record = |token: &str| sub(TaskSpec::new("procs.record", vec![json!(file.to_str().unwrap()), json!(token)]));
    let queued = admin.task_submit(&record("queued")).await.unwrap().id;
    until_status(&admin, &queued, TaskStatus::Running).await;
    let waiting = admin.task_submit(&record("stored")).await.unwrap().id;
    let w = admin.task_get(&waiting).await.unwrap();
    assert_eq!(w.parent.as_deref(), Some(parent.as_str()));
    let listed = admin.task_list(None, None, None, None, 10).await.unwrap().tasks;
    assert_eq!(listed.iter().filter(|t| t.parent.as_deref() == Some(parent.as_str())).count(), 3);
    // The CLI lists a task's subtasks, and only them.
    let out = node.cli(&["--json", "task", "list", "--parent", &parent]);
    assert!(out.status.success(), "{}", text(&out));
    let subtasks: Vec<Value> = serde_json::from_str(&stdout(&out)).unwrap();
    let mut ids: Vec<&str> = subtasks.iter().filter_map(|t| t["id"].as_str()).collect();
    ids.sort_unstable();
    let mut want = vec![running.as_str(), queued.as_str(), waiting.as_str()];
    want.sort_unstable();
    assert_eq!(ids, want, "{subtasks:?}");
    // An unknown parent is refused.
    let orphan = TaskSpec { pid: Some("no-such-task".into()), ..TaskSpec::new("procs.noop", vec![]) };
    assert_eq!(error_code(&admin.task_submit(&orphan).await.unwrap_err()), "unknown_task");

    // The tree: the running subtask under its parent, the parent under the node.
    let tree = |node: &Node| -> Vec<Value> {
        let out = node.cli(&["--json", "tree"]);
        let v: Value = serde_json::from_str(&stdout(&out)).unwrap_or_default();
        v["components"].as_array().cloned().unwrap_or_default()
    };
    let find = |cs: &[Value], id: &str| cs.iter().find(|c| c["name"].as_str().is_some_and(|n| n.contains(id))).cloned();
    let deadline = Instant::now() + WAIT;
    let (p, c) = loop {
        let cs = tree(&node);
        if let (Some(p), Some(c)) = (find(&cs, &parent), find(&cs, &running)) {
            break (p, c);
        }
        assert!(Instant::now() < deadline, "the running tasks never joined the tree: {cs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((p["depth"].clone(), c["depth"].clone()), (json!(1), json!(2)), "{p} {c}");
    assert_eq!(c["pid"], p["id"], "the subtask was started by its parent: {c}");

    let pid = p["id"].as_str().map_or_else(|| p["id"].to_string(), str::to_string);
    let out = node.cli(&["kill", &pid]);
    assert!(out.status.success(), "{}", text(&out));
    for id in [&parent, &running, &queued, &waiting] {
        let t = admin.task_wait(id, WAIT).await.unwrap();
        assert_eq!(t.status, TaskStatus::Interrupted, "{id}: {t:?}");
    }
    let deadline = Instant::now() + WAIT;
    while tree(&node).iter().any(|c| c["kind"] == "task") {
        assert!(Instant::now() < deadline, "killed tasks leave the tree");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The parent's own parent, the node, got its error report.
    let deadline = Instant::now() + WAIT;
    while !node.log().contains("a component this one started was killed") {
        assert!(Instant::now() < deadline, "the node never got the report: {}", node.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A killed task starts no subtasks.
    let late = TaskSpec { pid: Some(parent.clone()), ..TaskSpec::new("procs.noop", vec![]) };
    let e = admin.task_submit(&late).await.unwrap_err();
    assert_eq!(error_code(&e), "unknown_task", "{e}");
    // Nothing of the killed tree ran, even with the worker free again.
    let t = admin.task_run(&TaskSpec::new("procs.noop", vec![]), WAIT).await.unwrap();
    assert_eq!(t.status, TaskStatus::Done);
    assert!(!file.exists(), "the waiting subtasks never ran");
}
