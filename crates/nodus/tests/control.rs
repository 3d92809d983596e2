//! The control plane with real `nodus` processes: monitoring answered by every kind of
//! component (node, built-in service, app, a Rust SDK worker, a Python `cocaine` worker, a Rust
//! SDK service, a text-form shell service) and one that never answers; a chain of five
//! components across two nodes killed in the middle; expired messages never executed wherever
//! they wait; flags (CLI exit codes, persistence across a restart, `manual_down`, the limit,
//! cluster-wide listing, and the node's own flags raised and lowered).

// These tests drive real processes on wall time.
#![allow(clippy::disallowed_methods)]

use nodus_client::control::{Killed, Monitored};
use nodus_client::{Client, ClientConfig, ClientError, Incoming, State};
use nodus_control::control::{Body, ControlMessage, Header};
use nodus_control::listing::ComponentRow;
use nodus_control::ComponentId;
use nodus_wire::Message;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const NODUS: &str = env!("CARGO_BIN_EXE_nodus");
const WAIT: Duration = Duration::from_secs(20);
const SECRET: &str = "control-test-secret";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `nodus daemon` process with its own directory: TCP and Unix sockets for clients, a cluster
/// listener with a secret, apps (run as root when the tests are), and `extra` configuration.
struct Node {
    name: String,
    dir: PathBuf,
    cluster: u16,
    tcp: u16,
    locator: u16,
    neighbors: Vec<u16>,
    extra: String,
    /// More keys of its `[cluster]` section.
    cluster_extra: String,
    child: Option<Child>,
}

impl Node {
    fn start(root: &Path, name: &str, neighbors: &[u16], extra: &str) -> Node {
        Node::start_with(root, name, neighbors, extra, "")
    }

    /// [`Node::start`] with more keys in the `[cluster]` section.
    fn start_with(root: &Path, name: &str, neighbors: &[u16], extra: &str, cluster_extra: &str) -> Node {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut n = Node {
            name: name.into(),
            dir,
            cluster: free_port(),
            tcp: free_port(),
            locator: free_port(),
            neighbors: neighbors.to_vec(),
            extra: extra.into(),
            cluster_extra: cluster_extra.into(),
            child: None,
        };
        // The ports were free a moment ago; another process may take one before the daemon
        // binds it. Then the daemon exits at once: start again on other ports.
        for _ in 0..3 {
            match n.try_run() {
                Ok(()) => return n,
                Err(log) if log.contains("Address already in use") => {
                    (n.cluster, n.tcp, n.locator) = (free_port(), free_port(), free_port());
                }
                Err(log) => panic!("{name} did not start: {log}"),
            }
        }
        panic!("{name} did not start: its ports were taken three times");
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("n.sock")
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn endpoint(&self) -> String {
        format!("unix:{}", self.socket().display())
    }

    fn run(&mut self) {
        if let Err(log) = self.try_run() {
            panic!("{} did not start: {log}", self.name);
        }
    }

    /// Starts the daemon and waits for its socket; `Err(log)` when it exited first or did not
    /// come up in time.
    fn try_run(&mut self) -> Result<(), String> {
        let neighbors: Vec<String> = self.neighbors.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
        let run_as = if nix_root() { "root" } else { "" };
        // Top-level keys of `extra` (before its first section) go first, its sections last.
        let at = if self.extra.starts_with('[') { Some(0) } else { self.extra.find("\n[").map(|i| i + 1) };
        let (top, sections) = match at {
            Some(i) => self.extra.split_at(i),
            None => (self.extra.as_str(), ""),
        };
        let config = format!(
            "{top}\nserver_name = \"{name}\"\ndata_dir = \"{data}\"\nunix_socket = \"{sock}\"\ntcp_listen = \"127.0.0.1:{tcp}\"\n\
             [cluster]\nlisten = \"127.0.0.1:{cluster}\"\nneighbors = [{neighbors}]\nsecret = \"{SECRET}\"\n\
             heartbeat_ms = 100\nudp_listen = \"\"\n{cluster_extra}\n[apps]\nlocator_listen = \"127.0.0.1:{locator}\"\nrun_as = \"{run_as}\"\n[http]\nlisten = \"\"\n[tasks]\narpcp_listen = \"\"\n{extra}\n",
            name = self.name,
            data = self.data().display(),
            sock = self.socket().display(),
            tcp = self.tcp,
            cluster = self.cluster,
            neighbors = neighbors.join(","),
            locator = self.locator,
            extra = sections,
            cluster_extra = self.cluster_extra,
        );
        let file = self.dir.join("nodus.toml");
        std::fs::write(&file, config).unwrap();
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::File::create(self.dir.join("daemon.log")).unwrap();
        let mut child = Command::new(NODUS).arg("daemon").arg("--config").arg(&file).stderr(log).spawn().unwrap();
        let deadline = Instant::now() + WAIT;
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            if matches!(child.try_wait(), Ok(Some(_))) || Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child = Some(child);
        Ok(())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Stops the node gracefully (SIGTERM) and waits for it.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let deadline = Instant::now() + WAIT;
            while c.try_wait().unwrap().is_none() {
                assert!(Instant::now() < deadline, "{} did not stop", self.name);
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits until the process exits on its own.
    fn wait_exit(&mut self) {
        let deadline = Instant::now() + WAIT;
        let c = self.child.as_mut().unwrap();
        while c.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "{} did not exit", self.name);
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child = None;
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(NODUS).arg("--node").arg(self.endpoint()).args(args).output().unwrap()
    }

    async fn client(&self) -> Client {
        Client::connect(ClientConfig::new(self.endpoint()).no_reconnect()).await.unwrap().0
    }

    async fn service(&self, name: &str, config: impl FnOnce(ClientConfig) -> ClientConfig) -> (Client, Incoming) {
        Client::connect(config(ClientConfig::new(self.endpoint()).service(name).no_reconnect())).await.unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn nix_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

fn now_ms() -> i64 {
    i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(o)))
}

/// Polls `check` until it holds (every 50 ms, at most [`WAIT`]).
async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn rows(client: &Client, cluster: bool) -> Vec<ComponentRow> {
    client.tree(cluster).await.unwrap().rows
}

fn find<'a>(rows: &'a [ComponentRow], kind: &str, name: &str) -> Option<&'a ComponentRow> {
    rows.iter().find(|r| r.kind == kind && r.name.starts_with(name))
}

fn id(r: &ComponentRow) -> ComponentId {
    r.id.parse().unwrap()
}

/// Deploys an app from a manifest (and profile) written into `dir/<name>`.
fn deploy(node: &Node, root: &Path, name: &str, manifest: serde_json::Value, profile: Option<&str>) {
    let dir = root.join(format!("app-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    let mut args = vec!["app".to_string(), "deploy".into(), name.into(), dir.display().to_string()];
    if let Some(p) = profile {
        let file = root.join(format!("{name}.toml"));
        std::fs::write(&file, p).unwrap();
        args.extend(["--profile".into(), file.display().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = node.cli(&args);
    assert!(o.status.success(), "deploy {name}: {}", text(&o));
}

fn venv_python() -> Option<PathBuf> {
    let venv = match std::env::var_os("NODUS_PYENV") {
        Some(v) => PathBuf::from(v),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/nodus-cocaine-venv"),
    };
    let python = venv.join("bin/python");
    python.exists().then_some(python)
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// A service written in sh: bash's /dev/tcp to the node's TCP port, the text form, answering
/// MONITORING itself (and writing each request it got to `log`).
fn shell_service(port: u16, log: &Path) -> Child {
    let script = r#"
exec 3<>"/dev/tcp/127.0.0.1/$PORT"
printf 'REGISTER service=shellsvc;version=1;_id=1\n' >&3
while IFS= read -r line <&3; do
  case "$line" in
    *MONITORING*)
      printf '%s\n' "$line" >> "$LOG"
      id=${line#*;_id=}; id=${id%%;*}
      st=${line#*sync_time=}; st=${st%%;*}
      printf 'RESULT spec=monitoring;message_type=result;name=shellsvc;host=sh;is_running=false;message=hello from sh;sync_time=%s;_reply_to=%s\n' "$st" "$id" >&3
      ;;
  esac
done
"#;
    Command::new("bash")
        .arg("-c")
        .arg(script)
        .env("PORT", port.to_string())
        .env("LOG", log)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_component_answers_monitoring_and_a_silent_one_is_reported() {
    let root = tempfile::Builder::new().prefix("nctl").tempdir().unwrap();
    let node = Node::start(root.path(), "m1", &[], "");
    let client = node.client().await;
    // A Rust worker (the SDK answers for it) and, when the virtualenv is there, a Python one.
    deploy(&node, root.path(), "rw", serde_json::json!({"executable": NODUS, "args": ["echo-worker"]}), None);
    assert!(node.cli(&["app", "scale", "rw", "1"]).status.success());
    let python = venv_python();
    match &python {
        Some(py) => {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/cocaine-compat/worker_app.py");
            let manifest = serde_json::json!({
                "executable": py, "args": [script.canonicalize().unwrap()],
                "env": {"PYTHONDONTWRITEBYTECODE": "1"},
            });
            deploy(&node, root.path(), "py", manifest, None);
            assert!(node.cli(&["app", "scale", "py", "1"]).status.success());
        }
        None => {
            assert!(!in_ci(), "CI=true and the Cocaine virtualenv is missing: run tests/cocaine-compat/setup.sh");
            eprintln!("SKIPPED the Python worker part: run tests/cocaine-compat/setup.sh");
        }
    }
    // A Rust SDK service that says what it does, one that never answers, and a shell service.
    let (svc, _svc_in) = node.service("rsvc", |c| c).await;
    svc.set_status(true, "resizing 3 images");
    let (_mute, _mute_in) = node.service("mute", |c| c.handle_control(false)).await;
    let log = root.path().join("shell.log");
    let _shell = Reap(shell_service(node.tcp, &log));

    let want_python = python.is_some();
    let active = |app: &'static str| {
        let client = client.clone();
        async move { client.admin().app_info(app).await.is_ok_and(|i| i.workers.iter().any(|w| w.state == "Active")) }
    };
    until("every component in the tree, workers active", || async {
        let r = rows(&client, false).await;
        find(&r, "service", "shellsvc").is_some()
            && find(&r, "service", "mute").is_some()
            && find(&r, "worker", "rw/").is_some()
            && active("rw").await
            && (!want_python || (find(&r, "worker", "py/").is_some() && active("py").await))
    })
    .await;
    let r = rows(&client, false).await;
    let wait = Duration::from_secs(3);
    let ask = |row: &ComponentRow| {
        let (client, node_name, cid) = (client.clone(), row.node.clone(), id(row));
        async move { client.monitor(&node_name, cid, wait).await.unwrap() }
    };
    let answered = |m: &Monitored| match m {
        Monitored::Answered { result, creator, tag, .. } => (result.clone(), creator.clone(), tag.clone()),
        other => panic!("not answered: {other:?}"),
    };
    // The node, a built-in service and an app answer for themselves (sync_time is checked by
    // Client::monitor against what it sent).
    for (kind, name) in [("node", "m1"), ("service", "flags"), ("app", "rw")] {
        let row = find(&r, kind, name).unwrap_or_else(|| panic!("no {kind} {name}: {r:?}"));
        let (result, _, tag) = answered(&ask(row).await);
        assert_eq!((result.name.as_str(), result.host.as_str()), (name, "m1"), "{kind}");
        assert!(tag.starts_with("result:monitoring:"), "{tag}");
    }
    // The seed's envelope, field for field, on a request written by hand: the answer keeps the
    // conversation id and expiry, is created now by the component (`pid`), names its creator,
    // and its tag is `result:monitoring:<id>:<pid>:<creator>`.
    let app = id(find(&r, "app", "rw").unwrap());
    let conversation = client.next_id();
    let created = now_ms();
    let expires = created + 3_000;
    let header = Header {
        id: conversation,
        pid: None,
        creator: "envelope-test".into(),
        created_at: created,
        expires_at: expires,
    };
    let request = ControlMessage { header, body: Body::Monitoring { target: Some(app), sync_time: 4242 } }
        .to_message()
        .to("m1:control");
    let line = nodus_wire::text::to_line(&request);
    assert!(line.contains(&format!("tag=config:monitoring:{conversation}:null:envelope-test")), "{line}");
    assert!(line.contains("message_type=config") && line.contains("spec=monitoring"), "{line}");
    let reply = client.request_with_timeout(request, WAIT).await.unwrap();
    let answered_line = nodus_wire::text::to_line(&reply);
    let env = &reply.envelope;
    assert_eq!(
        (reply.command.as_str(), reply.get("message_type"), reply.get("spec")),
        ("RESULT", Some("result"), Some("monitoring"))
    );
    assert_eq!(reply.get("sync_time"), Some("4242"), "{answered_line}");
    assert_eq!((env.pid, env.expires_at), (app.get(), expires), "{answered_line}");
    assert!(env.created_at >= created && env.created_at <= now_ms(), "{answered_line}");
    assert!(!env.creator.is_empty(), "{answered_line}");
    let tag = format!("result:monitoring:{conversation}:{app}:{}", env.creator);
    assert_eq!(reply.get("tag"), Some(tag.as_str()), "{answered_line}");
    for field in ["name=rw", "host=m1", "is_running=", "message="] {
        assert!(answered_line.contains(field), "{field}: {answered_line}");
    }
    // The Rust worker answers itself through the worker SDK (workers but busy one have is_running false).
    let worker = find(&r, "worker", "rw/").unwrap();
    let (result, creator, _) = answered(&ask(worker).await);
    assert_eq!((result.name.as_str(), creator.as_str()), ("rw", "rw"), "the SDK's default answer");
    assert!(!result.message.contains("answered by node"), "{}", result.message);
    // The Python cocaine worker has no handler for the event: its node answers for it, and says so.
    if want_python {
        let worker = find(&r, "worker", "py/").unwrap();
        let (result, _, _) = answered(&ask(worker).await);
        assert!(result.message.contains("answered by node m1 for the worker"), "{}", result.message);
        assert!(result.message.contains("no handler"), "{}", result.message);
    }
    // The Rust SDK service answers with what the program set.
    let (result, creator, _) = answered(&ask(find(&r, "service", "rsvc").unwrap()).await);
    assert_eq!((result.name.as_str(), result.is_running, result.message.as_str()), ("rsvc", true, "resizing 3 images"));
    assert_eq!(creator, "m1:rsvc");
    // The shell service answers in the text form, and saw the seed's tag in the request's text.
    let (result, _, _) = answered(&ask(find(&r, "service", "shellsvc").unwrap()).await);
    assert_eq!((result.name.as_str(), result.message.as_str()), ("shellsvc", "hello from sh"));
    let seen = std::fs::read_to_string(&log).unwrap();
    assert!(seen.contains("MONITORING") && seen.contains("tag=config:monitoring:"), "{seen}");
    assert!(seen.contains("message_type=config") && seen.contains("spec=monitoring"), "{seen}");
    // The silent one is reported as not answering when its time is up (a little before the
    // request's own expiry, so the report reaches the requester), not before.
    let start = Instant::now();
    match ask(find(&r, "service", "mute").unwrap()).await {
        Monitored::Failed { code, message } => {
            assert_eq!(code, "not_answering", "{message}");
            let took = start.elapsed();
            assert!(took >= wait / 2 && took < wait, "reported after {took:?}");
        }
        other => panic!("the silent service answered: {other:?}"),
    }
    // The CLI: one round as JSON; a silent component alone exits 1.
    let o = node.cli(&["monitor", "--all", "--json", "--timeout", "2s"]);
    assert!(o.status.success(), "{}", text(&o));
    let v = json(&o);
    let list = v["components"].as_array().unwrap();
    assert_eq!(list.len(), r.len(), "{v}");
    let mute = list.iter().find(|c| c["name"] == "mute").unwrap();
    assert_eq!((&mute["answered"], &mute["code"]), (&serde_json::json!(false), &serde_json::json!("not_answering")));
    assert!(list.iter().filter(|c| c["name"] != "mute").all(|c| c["answered"] == true), "{v}");
    let o =
        node.cli(&["monitor", &id(find(&r, "service", "mute").unwrap()).to_string(), "--json", "--timeout", "300ms"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let o = node.cli(&["monitor", "--all", "--count", "2", "--interval", "100ms", "--timeout", "300ms"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.matches("component(s) answered").count(), 2, "two rounds: {out}");
    assert!(out.contains("not_answering"), "{out}");
}

/// c0 → c1 → c2 on node a, c3 → c4 on node b: killing c2 kills c4, then c3, then c2; c1 gets the
/// error; c0 and c1 keep running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_five_across_two_nodes_killed_in_the_middle() {
    let root = tempfile::Builder::new().prefix("nctl").tempdir().unwrap();
    let a = Node::start(root.path(), "ka", &[], "");
    let b = Node::start(root.path(), "kb", &[a.cluster], "");
    let watch = a.client().await;
    until("the two nodes linked", || async { watch.admin().cluster_info().await.is_ok_and(|c| c.live == 2) }).await;

    let (c0, mut in0) = a.service("c0", |c| c).await;
    let (c1, mut in1) = a.service("c1", |c| c.parent(c0.component(), None)).await;
    let (c2, in2) = a.service("c2", |c| c.parent(c1.component(), None)).await;
    let (c3, in3) = b.service("c3", |c| c.parent(c2.component(), Some("ka".into()))).await;
    let (c4, in4) = b.service("c4", |c| c.parent(c3.component(), None)).await;
    let ids: Vec<u64> = [&c0, &c1, &c2, &c3, &c4].iter().map(|c| c.component()).collect();
    assert!(ids.iter().all(|i| *i != 0), "READY gives each service its component id: {ids:?}");
    until("the chain in the cluster tree", || async {
        let r = rows(&watch, true).await;
        (1..5).all(|i| r.iter().any(|row| row.id == ids[i].to_string() && row.pid == Some(ids[i - 1].to_string())))
    })
    .await;
    let drawn = text(&a.cli(&["tree"]));
    let depth =
        |name: &str| drawn.lines().find(|l| l.contains(&format!("service {name} @"))).map(|l| l.find("service"));
    assert!(depth("c4") > depth("c3") && depth("c3") > depth("c2") && depth("c2") > depth("c1"), "{drawn}");
    assert!(drawn.contains("service c3 @kb") && drawn.contains("service c2 @ka"), "{drawn}");
    // `tree ID`: that component and what it started, on both nodes, nothing else; as JSON too.
    let sub = text(&a.cli(&["tree", &ids[2].to_string()]));
    assert!(sub.lines().next().is_some_and(|l| l.contains("service c2 @ka")), "{sub}");
    assert!(sub.contains("service c3 @kb") && sub.contains("service c4 @kb"), "{sub}");
    assert!(!sub.contains("service c1 ") && !sub.contains("node ka"), "{sub}");
    let v = json(&a.cli(&["--json", "tree", &ids[2].to_string()]));
    let listed: Vec<(String, u64, String)> = v["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap().to_string(), c["depth"].as_u64().unwrap(), c["pid"].to_string()))
        .collect();
    let want: Vec<(String, u64, String)> = (2..5)
        .map(|i| (format!("c{i}"), (i - 2) as u64, serde_json::Value::String(ids[i - 1].to_string()).to_string()))
        .collect();
    assert_eq!(listed, want, "{v}");
    for c in v["components"].as_array().unwrap() {
        assert_eq!(c["kind"], "service", "{c}");
        assert!(c["created_at"].as_i64().is_some_and(|t| t > 0) && c["expires_at"].is_i64(), "the envelope: {c}");
        assert!(c["creator"].as_str().is_some_and(|s| !s.is_empty()), "the envelope: {c}");
    }
    assert_eq!(v["components"][1]["parent_node"], "ka", "c3 was started from another node: {v}");
    // `--local`: this node's components only.
    let local = text(&b.cli(&["tree", "--local"]));
    assert!(local.contains("service c3 @kb") && !local.contains("@ka"), "{local}");
    let o = a.cli(&["tree", "12345"]);
    assert_eq!(o.status.code(), Some(1), "an unknown id: {}", text(&o));
    // Monitoring reaches a component of the other node through its node; asking either node
    // gets the same answer.
    for via in [&watch, &c0] {
        match via.monitor("kb", ComponentId::new(ids[4]).unwrap(), Duration::from_secs(3)).await.unwrap() {
            Monitored::Answered { result, creator, .. } => {
                assert_eq!((result.name.as_str(), creator.as_str()), ("c4", "kb:c4"));
            }
            other => panic!("c4 did not answer across nodes: {other:?}"),
        }
    }
    // On a terminal, `nodus monitor` redraws its table in place (cursor home, clear screen) at
    // every round; `script` gives it one.
    let command = format!("{NODUS} --node {} monitor {} --count 2 --interval 100ms --timeout 2s", a.endpoint(), ids[3]);
    match Command::new("script").args(["-qec", &command, "/dev/null"]).output() {
        Ok(o) => {
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(o.status.success(), "{out}");
            assert_eq!(out.matches("\x1b[H\x1b[2J").count(), 2, "two rounds drawn in place: {out:?}");
            assert_eq!(out.matches("1 of 1 component(s) answered").count(), 2, "{out}");
        }
        Err(e) => {
            assert!(!in_ci(), "CI=true and util-linux's script cannot run: {e}");
            eprintln!("SKIPPED the terminal part: script cannot run ({e})");
        }
    }
    assert!(
        !a.cli(&["monitor", &ids[3].to_string(), "--count", "2", "--interval", "100ms"])
            .stdout
            .windows(2)
            .any(|w| w == b"\x1b["),
        "no escape codes when the output is not a terminal"
    );

    // Each of the lower three records when its KILL arrived, then sees its stream end.
    let killed = |name: &'static str, mut incoming: Incoming| {
        tokio::spawn(async move {
            let mut got = None;
            while let Some(m) =
                tokio::time::timeout(WAIT, incoming.recv()).await.unwrap_or_else(|_| panic!("{name} not killed"))
            {
                if m.command == "KILL" && got.is_none() {
                    assert_eq!(m.from.service, "control", "{name}: {m:?}");
                    got = Some(Instant::now());
                }
            }
            got.unwrap_or_else(|| panic!("{name}'s stream ended without a KILL"))
        })
    };
    let (k2, k3, k4) = (killed("c2", in2), killed("c3", in3), killed("c4", in4));
    let o = a.cli(&["kill", &ids[2].to_string()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("killed service c2"), "{}", text(&o));
    let (t2, t3, t4) = (k2.await.unwrap(), k3.await.unwrap(), k4.await.unwrap());
    assert!(t4 <= t3 && t3 <= t2, "the lower ones stop first: c4 {t4:?}, c3 {t3:?}, c2 {t2:?}");
    for (c, name) in [(&c2, "c2"), (&c3, "c3"), (&c4, "c4")] {
        assert!(c.wait_state(State::Closed, WAIT).await, "{name} closed for good");
    }
    // The parent gets the seed's error message, tagged, by pid.
    let report = loop {
        let m = tokio::time::timeout(WAIT, in1.recv()).await.expect("c1 gets the report").expect("c1 open");
        if m.command == "ERROR" {
            break m;
        }
    };
    assert_eq!(report.get("message_type"), Some("error"));
    assert_eq!((report.get("spec"), report.get("code")), (Some("kill"), Some("killed")));
    assert_eq!(report.get("component"), Some(ids[2].to_string().as_str()));
    assert_eq!(report.envelope.pid, ids[2]);
    assert!(report.get("tag").unwrap().starts_with("error:kill:"), "{report:?}");
    assert!(report.get("tag").unwrap().contains(&format!(":{}:ka:control", ids[2])), "{report:?}");
    // The upper ones keep running; the lower ones are gone from both nodes' trees.
    assert_eq!((c0.state(), c1.state()), (State::Connected, State::Connected));
    let ping = |c: &Client| {
        let c = c.clone();
        async move { c.request(Message::new("PING")).await.map(|m| m.command) }
    };
    assert_eq!(ping(&c0).await.unwrap(), "PONG");
    assert_eq!(ping(&c1).await.unwrap(), "PONG");
    until("c2..c4 gone from the tree", || async {
        let r = rows(&watch, true).await;
        (0..5).all(|i| r.iter().any(|row| row.id == ids[i].to_string()) == (i < 2))
    })
    .await;
    assert!(in0.try_recv().is_none_or(|m| m.command != "ERROR"), "c0 hears nothing of it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_needs_admin_and_kills_apps_workers_and_the_node() {
    let root = tempfile::Builder::new().prefix("nctl").tempdir().unwrap();
    let mut node = Node::start(root.path(), "kn", &[], "[control]\nstop_grace_ms = 800");
    let client = node.client().await;
    deploy(&node, root.path(), "ka", serde_json::json!({"executable": NODUS, "args": ["echo-worker"]}), None);
    assert!(node.cli(&["app", "scale", "ka", "2"]).status.success());
    until("two workers", || async { rows(&client, false).await.iter().filter(|r| r.kind == "worker").count() == 2 })
        .await;
    let r = rows(&client, false).await;
    let app = find(&r, "app", "ka").unwrap().clone();
    // Anonymous TCP clients may monitor, not kill.
    let anon = Client::connect(ClientConfig::new(format!("127.0.0.1:{}", node.tcp)).no_reconnect()).await.unwrap().0;
    assert!(matches!(anon.monitor("kn", id(&app), WAIT).await.unwrap(), Monitored::Answered { .. }));
    match anon.kill("kn", id(&app), WAIT).await.unwrap() {
        Killed::Refused { code, .. } => assert_eq!(code, "forbidden"),
        other => panic!("an anonymous client killed an app: {other:?}"),
    }
    // An id nobody has: the protocol's own refusal, saying where ids are listed.
    let o = node.cli(&["kill", "12345"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("no component 12345") && text(&o).contains("`nodus tree`"), "{}", text(&o));
    match client.kill("kn", ComponentId::new(12345).unwrap(), WAIT).await.unwrap() {
        Killed::Refused { code, message } => {
            assert_eq!(code, "unknown_component", "{message}");
            assert!(message.contains("`nodus tree`"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // A built-in service stops only with its node.
    let flags = find(&r, "service", "flags").unwrap();
    let o = node.cli(&["kill", &flags.id]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("not_killable"), "{}", text(&o));
    // Killing the app kills its workers first, then stops it.
    match client.kill("kn", id(&app), WAIT).await.unwrap() {
        Killed::Done { stopped, unanswered } => assert!(stopped && unanswered.is_empty()),
        other => panic!("{other:?}"),
    }
    let r = rows(&client, false).await;
    assert_eq!(r.iter().filter(|r| r.kind == "worker").count(), 0, "{r:?}");
    assert!(!find(&r, "app", "ka").unwrap().is_running);
    assert!(text(&node.cli(&["app", "list"])).contains("stopped"));
    // A service whose program handles control messages itself and ignores the KILL is
    // disconnected anyway once `stop_grace_ms` is over; one whose SDK handles it, at once.
    let (deaf, mut deaf_in) = node.service("deaf", |c| c.handle_control(false)).await;
    let (obedient, _obedient_in) = node.service("obedient", |c| c).await;
    let started = Instant::now();
    let o = node.cli(&["kill", &deaf.component().to_string()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(deaf.wait_state(State::Closed, WAIT).await, "deaf closed");
    assert!(started.elapsed() >= Duration::from_millis(700), "closed after its grace: {:?}", started.elapsed());
    let mut saw_kill = false;
    while let Some(m) = deaf_in.try_recv() {
        saw_kill |= m.command == "KILL";
    }
    assert!(saw_kill, "the program got the KILL");
    let started = Instant::now();
    assert!(node.cli(&["kill", &obedient.component().to_string()]).status.success());
    assert!(obedient.wait_state(State::Closed, WAIT).await, "obedient closed");
    assert!(started.elapsed() < Duration::from_millis(700), "its SDK answered: {:?}", started.elapsed());
    // Killing the node stops it.
    let me = find(&r, "node", "kn").unwrap().id.clone();
    let o = node.cli(&["kill", &me, "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(json(&o)["stopped"], true);
    node.wait_exit();
}

/// Who may kill, across two nodes: pa admits pb as an admin node (the default, `"*"` on a link
/// with the secret), pb admits nobody (`admin_nodes = []`). c2 runs on pa, c3 on pb was started
/// by c2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_is_for_local_owners_token_holders_and_admin_peers_only() {
    let root = tempfile::Builder::new().prefix("nctl").tempdir().unwrap();
    let a = Node::start(root.path(), "pa", &[], "");
    let b = Node::start_with(root.path(), "pb", &[a.cluster], "", "admin_nodes = []");
    let watch = a.client().await;
    until("the two nodes linked", || async { watch.admin().cluster_info().await.is_ok_and(|c| c.live == 2) }).await;
    let (c2, _in2) = a.service("c2", |c| c).await;
    let (c3, mut in3) = b.service("c3", |c| c.parent(c2.component(), Some("pa".into()))).await;
    let (id2, id3) = (ComponentId::new(c2.component()).unwrap(), ComponentId::new(c3.component()).unwrap());
    until("c3 under c2 in the cluster tree", || async {
        rows(&watch, true).await.iter().any(|r| r.id == id3.to_string() && r.pid == Some(id2.to_string()))
    })
    .await;
    let tcp = |node: &Node, token: Option<String>| {
        let mut config = ClientConfig::new(format!("127.0.0.1:{}", node.tcp)).no_reconnect();
        if let Some(t) = token {
            config = config.token(t);
        }
        async move { Client::connect(config).await.unwrap().0 }
    };
    let forbidden = |k: Killed| match k {
        Killed::Refused { code, message } => assert_eq!(code, "forbidden", "{message}"),
        other => panic!("killed without the right: {other:?}"),
    };
    // Anonymous TCP clients may not kill, on their node nor through an admin peer: the peer
    // carries what its client may do, not what the peer may.
    let anon_a = tcp(&a, None).await;
    forbidden(anon_a.kill("pa", id2, WAIT).await.unwrap());
    let anon_b = tcp(&b, None).await;
    forbidden(anon_b.kill("pa", id2, WAIT).await.unwrap());
    // A KILL written by another program straight to c3 is not obeyed by c3's SDK (only its own
    // node's control kills it): the program sees it, then the next message; c3 stays.
    let header = Header { id: 0, pid: None, creator: "c2".into(), created_at: now_ms(), expires_at: 0 };
    let forged = ControlMessage { header, body: Body::Kill { target: Some(id3) } }.to_message().to("pb:c3");
    c2.send(forged).await.unwrap();
    c2.send(Message::new("AFTER").to("pb:c3")).await.unwrap();
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("AFTER") {
        let m = tokio::time::timeout(WAIT, in3.recv()).await.expect("c3 hears").expect("c3's stream goes on");
        seen.push(m.command);
    }
    assert!(seen.contains(&"KILL".to_string()), "{seen:?}");
    assert_eq!(c3.state(), State::Connected);
    // The owner of pa on pa's socket may kill there, but pb does not take kills from pa: the
    // CLI's kill of c3 through pa is refused by pb.
    let o = a.cli(&["kill", &id3.to_string()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("forbidden"), "{}", text(&o));
    assert_eq!((c2.state(), c3.state()), (State::Connected, State::Connected));
    // A client of pb holding pb's token is pb's owner, and pa admits pb: it kills c2 on pa. The
    // cascade's KILL of c3, from pa to pb, is refused by pb, so c3 keeps running and is reported
    // as not having answered; c2 stops anyway once the wait for it is over.
    let token = std::fs::read_to_string(b.data().join("auth.token")).unwrap().trim().to_string();
    let owner_b = tcp(&b, Some(token)).await;
    match owner_b.kill("pa", id2, Duration::from_secs(4)).await.unwrap() {
        Killed::Done { stopped, unanswered } => assert_eq!((stopped, unanswered), (true, vec![id3])),
        other => panic!("{other:?}"),
    }
    assert!(c2.wait_state(State::Closed, WAIT).await, "c2 killed");
    assert_eq!(c3.state(), State::Connected, "pb refused pa's kill of c3");
    assert_eq!(c3.request(Message::new("PING")).await.unwrap().command, "PONG");
    // pb's own owner kills c3 on pb.
    let o = b.cli(&["kill", &id3.to_string()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(c3.wait_state(State::Closed, WAIT).await, "c3 killed by pb's owner");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_are_never_executed_where_they_wait() {
    let root = tempfile::Builder::new().prefix("nctl").tempdir().unwrap();
    let node = Node::start(root.path(), "ex", &[], "expected_services = [\"later\"]");
    let client = node.client().await;
    let now = || {
        i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()).unwrap()
    };
    let code = |e: ClientError| e.refusal().and_then(|r| r.code().map(String::from));

    // 1. The router: an expired message is refused at once and never delivered.
    let (svc, mut svc_in) = node.service("work", |c| c).await;
    let mut late = Message::new("DO").to("work").param("n", "1");
    late.envelope.expires_at = now() - 1;
    assert_eq!(code(client.request(late).await.unwrap_err()).as_deref(), Some("expired"));
    client.send(Message::new("DO").to("work").param("n", "2")).await.unwrap();
    let first = loop {
        let m = tokio::time::timeout(WAIT, svc_in.recv()).await.unwrap().unwrap();
        if m.command == "DO" {
            break m;
        }
    };
    assert_eq!(first.get("n"), Some("2"), "the expired message never reached the service");

    // 2. A tracked request expiring at a service that does not answer: code=expired, not timeout.
    let mut slow = Message::new("DO").to("work").param("n", "3");
    slow.envelope.expires_at = now() + 300;
    assert_eq!(code(client.request(slow).await.unwrap_err()).as_deref(), Some("expired"));
    drop(svc);

    // 3. The cache of an expected service: the sender is told when it expires there; the service
    //    registered afterwards never gets it.
    let mut cached = Message::new("LATER").to("later").param("n", "4");
    cached.envelope.expires_at = now() + 400;
    let started = Instant::now();
    let e = client.request_with_timeout(cached, WAIT).await.unwrap_err();
    assert_eq!(code(e).as_deref(), Some("expired"));
    assert!(started.elapsed() >= Duration::from_millis(300), "told at the expiry, not before");
    let (_later, mut later_in) = node.service("later", |c| c).await;
    client.send(Message::new("LATER").to("later").param("n", "5")).await.unwrap();
    let first = loop {
        let m = tokio::time::timeout(WAIT, later_in.recv()).await.unwrap().unwrap();
        if m.command == "LATER" {
            break m;
        }
    };
    assert_eq!(first.get("n"), Some("5"), "the expired cached message was never delivered");

    // 4. An app's queue: one worker busy for a while, a request that expires while it waits is
    //    answered expired and never runs (the worker's own count proves it).
    deploy(
        &node,
        root.path(),
        "q",
        serde_json::json!({"executable": NODUS, "args": ["echo-worker"]}),
        Some("pool-limit = 1\nconcurrency = 1\nqueue-limit = 10\n"),
    );
    let busy = {
        let client = client.clone();
        tokio::spawn(async move {
            client.request_with_timeout(Message::new("SLEEP").to("q").with_payload("1500"), WAIT).await
        })
    };
    until("the worker busy", || async {
        client.admin().app_info("q").await.is_ok_and(|i| i.workers.iter().any(|w| w.load > 0))
    })
    .await;
    let mut queued = Message::new("ECHO").to("q").with_payload("never");
    queued.envelope.expires_at = now() + 300;
    let answer = client.request_with_timeout(queued, WAIT).await;
    let queued_code = match answer {
        Ok(m) => m.get("code").map(String::from),
        Err(e) => code(e),
    };
    assert_eq!(queued_code.as_deref(), Some("expired"));
    assert_eq!(busy.await.unwrap().unwrap().payload.as_ref(), b"slept");
    let count = client.request_with_timeout(Message::new("COUNT").to("q"), WAIT).await.unwrap();
    assert_eq!(count.payload.as_ref(), b"1", "only the slow call ran on the worker");

    // 5. The queue of a built-in service: the apps service runs changes one at a time, and a
    //    change whose time runs out behind a slow one (stopping an app whose worker is busy)
    //    is never run.
    deploy(&node, root.path(), "keep", serde_json::json!({"executable": NODUS, "args": ["echo-worker"]}), None);
    let busy = {
        let client = client.clone();
        tokio::spawn(async move {
            client.request_with_timeout(Message::new("SLEEP").to("q").with_payload("1500"), WAIT).await
        })
    };
    until("the worker busy again", || async {
        client.admin().app_info("q").await.is_ok_and(|i| i.workers.iter().any(|w| w.load > 0))
    })
    .await;
    let stop_started = Instant::now();
    client.send(Message::new("STOP").to("apps").param("name", "q")).await.unwrap();
    let mut remove = Message::new("REMOVE").to("apps").param("name", "keep");
    remove.envelope.expires_at = now() + 300;
    assert_eq!(code(client.request_with_timeout(remove, WAIT).await.unwrap_err()).as_deref(), Some("expired"));
    let _ = busy.await.unwrap();
    until("q stopped", || async { client.admin().app_info("q").await.is_ok_and(|i| i.workers.is_empty()) }).await;
    assert!(stop_started.elapsed() >= Duration::from_millis(300), "the stop outlived the remove's time");
    // The apps service is free again: a later request is answered, and `keep` was never removed.
    let list = text(&node.cli(&["app", "list"]));
    assert!(list.contains("keep"), "the expired REMOVE never ran: {list}");
}

/// The same rule one hop away: a client of xa sends to node xb, where the message waits in the
/// cache of an expected service and in an app's queue; it expires there, is never executed, and
/// its sender is told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_waiting_on_another_node_are_never_executed_and_their_sender_is_told() {
    let root = tempfile::Builder::new().prefix("nctl").tempdir().unwrap();
    let a = Node::start(root.path(), "xa", &[], "");
    let b = Node::start(root.path(), "xb", &[a.cluster], "expected_services = [\"later\"]");
    let client = a.client().await;
    until("the two nodes linked", || async { client.admin().cluster_info().await.is_ok_and(|c| c.live == 2) }).await;
    let refused = |e: ClientError| e.refusal().map(|r| (r.code().map(String::from), r.to_string()));

    // The cache of node xb.
    let mut cached = Message::new("LATER").to("xb:later").param("n", "1");
    cached.envelope.expires_at = now_ms() + 400;
    let started = Instant::now();
    let (code, text) = refused(client.request_with_timeout(cached, WAIT).await.unwrap_err()).unwrap();
    assert_eq!(code.as_deref(), Some("expired"), "{text}");
    // Both xb's cache and xa (tracking the request) tell at the expiry: whichever comes first.
    assert!(text.contains("the cache of node xb") || text.contains("before it was answered"), "{text}");
    assert!(started.elapsed() >= Duration::from_millis(300), "told at the expiry, not before");
    let (_later, mut later_in) = b.service("later", |c| c).await;
    client.send(Message::new("LATER").to("xb:later").param("n", "2")).await.unwrap();
    let first = loop {
        let m = tokio::time::timeout(WAIT, later_in.recv()).await.unwrap().unwrap();
        if m.command == "LATER" {
            break m;
        }
    };
    assert_eq!(first.get("n"), Some("2"), "the expired cached message was never delivered");

    // The queue of an app on node xb, its one worker kept busy by a client of xb.
    deploy(
        &b,
        root.path(),
        "xq",
        serde_json::json!({"executable": NODUS, "args": ["echo-worker"]}),
        Some("pool-limit = 1\nconcurrency = 1\nqueue-limit = 10\n"),
    );
    let local = b.client().await;
    let busy = {
        let local = local.clone();
        tokio::spawn(async move {
            local.request_with_timeout(Message::new("SLEEP").to("xq").with_payload("1500"), WAIT).await
        })
    };
    until("the worker busy", || async {
        local.admin().app_info("xq").await.is_ok_and(|i| i.workers.iter().any(|w| w.load > 0))
    })
    .await;
    let mut queued = Message::new("ECHO").to("xb:xq").with_payload("never");
    queued.envelope.expires_at = now_ms() + 300;
    let code = match client.request_with_timeout(queued, WAIT).await {
        Ok(m) => m.get("code").map(String::from),
        Err(e) => refused(e).and_then(|(c, _)| c),
    };
    assert_eq!(code.as_deref(), Some("expired"));
    assert_eq!(busy.await.unwrap().unwrap().payload.as_ref(), b"slept");
    let count = local.request_with_timeout(Message::new("COUNT").to("xq"), WAIT).await.unwrap();
    assert_eq!(count.payload.as_ref(), b"1", "only the slow call ran on the worker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_cli_persistence_manual_down_and_the_limit() {
    let root = tempfile::Builder::new().prefix("nctl").tempdir().unwrap();
    let mut node = Node::start(root.path(), "fl", &[], "[control]\nflags_limit = 3\nwrite_check_secs = 3600");
    fn code_of(node: &Node, args: &[&str]) -> Option<i32> {
        node.cli(args).status.code()
    }
    // Nothing raised: count prints 0 and exits 0; raised exits 0.
    let o = node.cli(&["flags", "count"]);
    assert_eq!((o.status.code(), String::from_utf8_lossy(&o.stdout).trim()), (Some(0), "0"), "{}", text(&o));
    assert_eq!(code_of(&node, &["flags", "raised"]), Some(0));
    // Raise: exit 0; then count and raised exit 1.
    let up = [
        "flags",
        "up",
        "backup",
        "nightly",
        "failed",
        "disk full",
        "--priority",
        "60",
        "--tags",
        "disk,backup",
        "--source-file",
        "backup.sh",
        "--function",
        "nightly",
        "--line",
        "42",
    ];
    let before = now_ms();
    assert_eq!(code_of(&node, &up), Some(0));
    let first = json(&node.cli(&["flags", "list", "--json"]))["flags"][0].clone();
    assert_eq!(code_of(&node, &up), Some(0), "raising again updates it");
    let o = node.cli(&["flags", "count"]);
    assert_eq!((o.status.code(), String::from_utf8_lossy(&o.stdout).trim()), (Some(1), "1"));
    assert_eq!(code_of(&node, &["flags", "raised"]), Some(1));
    assert_eq!(code_of(&node, &["flags", "raised", "backup", "nightly", "failed"]), Some(1));
    assert_eq!(code_of(&node, &["flags", "raised", "backup", "nightly", "other"]), Some(0));
    // Errors exit 2, never 1.
    assert_eq!(code_of(&node, &["flags", "up", "Bad_Unit", "s", "n", "m"]), Some(2));
    assert_eq!(code_of(&node, &["flags", "up", "a", "b", "c"]), Some(2), "up needs a message");
    assert_eq!(code_of(&node, &["flags", "up", "a", "b", "c", "m", "--priority", "101"]), Some(2));
    // A manual-down flag is not lowered automatically, only manually.
    assert_eq!(code_of(&node, &["flags", "up", "cert", "tls", "expired", "renew it", "--manual"]), Some(0));
    let o = node.cli(&["flags", "down", "cert", "tls", "expired"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("manual_down"), "{}", text(&o));
    // The list, as JSON, with every field.
    let v = json(&node.cli(&["flags", "list", "--json"]));
    assert_eq!(v["count"], 2, "{v}");
    let f = v["flags"].as_array().unwrap().iter().find(|f| f["unit"] == "backup").unwrap().clone();
    assert_eq!((&f["priority"], &f["count"], &f["hostname"]), (&60.into(), &2.into(), &"fl".into()), "{f}");
    assert_eq!(f["tags"], serde_json::json!(["backup", "disk"]));
    assert_eq!((&f["source_file"], &f["function"], &f["line"]), (&"backup.sh".into(), &"nightly".into(), &42.into()));
    assert_eq!((&f["message"], &f["manual_down"]), (&"disk full".into(), &false.into()), "{f}");
    assert!(f["version"].as_str().is_some_and(|v| !v.is_empty()), "{f}");
    // The first date stays that of the first raise; the modified date moves with each raise.
    let (date, modified) = (f["date"].as_i64().unwrap(), f["modified"].as_i64().unwrap());
    assert_eq!(date, first["date"].as_i64().unwrap(), "{first} then {f}");
    assert!(date >= before / 1000 * 1000 - 1000 && modified >= date, "{f}");
    assert!(modified >= first["modified"].as_i64().unwrap(), "{f}");
    // They survive a restart, manual_down included.
    node.stop();
    node.run();
    let v = json(&node.cli(&["flags", "list", "--json"]));
    assert_eq!(v["count"], 2, "after the restart: {v}");
    let text_list = text(&node.cli(&["flags", "list"]));
    assert!(text_list.contains("Found 2 raised flags"), "{text_list}");
    assert_eq!(
        code_of(&node, &["flags", "down", "cert", "tls", "expired"]),
        Some(2),
        "still manual-down after the restart"
    );
    assert_eq!(code_of(&node, &["flags", "down", "--manual", "cert", "tls", "expired"]), Some(0));
    // The limit: 3 kept; the 4th is refused and nodus/flag/too-many-flags is raised in its place.
    for n in ["one", "two"] {
        assert_eq!(code_of(&node, &["flags", "up", "lots", "of", n, "m"]), Some(0));
    }
    let o = node.cli(&["flags", "up", "lots", "of", "three", "m"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("too_many_flags"), "{}", text(&o));
    let v = json(&node.cli(&["flags", "list", "--json"]));
    let names: Vec<&str> = v["flags"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["failed", "one", "two", "too-many-flags"], "{v}");
    // Room again: the too-many flag goes down by itself.
    assert_eq!(code_of(&node, &["flags", "down", "lots", "of", "one"]), Some(0));
    let o = node.cli(&["flags", "count"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "2");
    // A shell script raises one in the text form over TCP, any language can.
    let mut sh = std::process::Command::new("bash")
        .arg("-c")
        .arg("exec 3<>/dev/tcp/127.0.0.1/$PORT; printf 'flags/FLAG_UP unit=sh;section=script;name=warned;message=from sh;_id=9\\n' >&3; read -r line <&3; echo \"$line\"")
        .env("PORT", node.tcp.to_string())
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&std::mem::take(&mut sh.stdout)).to_string();
    assert!(answer.contains("FLAG_IS_UP") && answer.contains("new=yes"), "{answer}");
    assert_eq!(code_of(&node, &["flags", "raised", "sh", "script", "warned"]), Some(1));
    // And lowers it the same way.
    let down = std::process::Command::new("bash")
        .arg("-c")
        .arg("exec 3<>/dev/tcp/127.0.0.1/$PORT; printf 'flags/FLAG_DOWN unit=sh;section=script;name=warned;_id=10\\n' >&3; read -r line <&3; echo \"$line\"")
        .env("PORT", node.tcp.to_string())
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&down.stdout).to_string();
    assert!(answer.contains("_reply_to=10") && !answer.contains("ERROR"), "{answer}");
    assert_eq!(code_of(&node, &["flags", "raised", "sh", "script", "warned"]), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_raises_its_own_flags_and_lowers_them_and_flags_are_seen_cluster_wide() {
    let root = tempfile::Builder::new().prefix("nctl").tempdir().unwrap();
    let extra = "[control]\nunreachable_flag_secs = 1\nwrite_check_secs = 1";
    let a = Node::start(root.path(), "ha", &[], extra);
    let mut b = Node::start(root.path(), "hb", &[a.cluster], extra);
    let client = a.client().await;
    until("the two nodes linked", || async { client.admin().cluster_info().await.is_ok_and(|c| c.live == 2) }).await;
    let raised = |name: &'static str| {
        let client = client.clone();
        async move { client.flags_list(false).await.unwrap().iter().any(|f| f.unit == "nodus" && f.name == name) }
    };
    // Cluster-wide: a flag raised on b is listed from a, naming b.
    let bc = b.client().await;
    bc.flag("jobs", "queue", "stuck").message("queue stuck").up().await.unwrap();
    let all = client.flags_list(true).await.unwrap();
    assert!(all.iter().any(|f| f.name == "stuck" && f.hostname == "hb"), "{all:?}");
    assert!(client.flags_list(false).await.unwrap().iter().all(|f| f.name != "stuck"));
    let o = a.cli(&["flags", "count", "--cluster"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));

    // A data directory the node cannot write: a directory where its check file goes.
    let probe = a.data().join(".nodus-write-check");
    std::fs::create_dir(&probe).unwrap();
    until("data-dir-unwritable raised", || raised("data-dir-unwritable")).await;
    std::fs::remove_dir(&probe).unwrap();
    until("data-dir-unwritable lowered", || async { !raised("data-dir-unwritable").await }).await;

    // An app in crash loop: a worker that exits at once.
    deploy(&a, root.path(), "crashy", serde_json::json!({"executable": "/bin/false"}), Some("crash-limit = 2\n"));
    assert!(a.cli(&["app", "scale", "crashy", "1"]).status.success());
    until("crash-loop flag raised", || raised("crash-loop-crashy")).await;
    assert!(a.cli(&["app", "remove", "crashy"]).status.success());
    until("crash-loop flag lowered", || async { !raised("crash-loop-crashy").await }).await;

    // A neighbour unreachable for long, then back.
    b.kill9();
    until("node-unreachable raised", || raised("node-unreachable")).await;
    let f = client.flags_list(false).await.unwrap().into_iter().find(|f| f.name == "node-unreachable").unwrap();
    assert!(f.message.contains("hb"), "{}", f.message);
    b.run();
    until("node-unreachable lowered", || async { !raised("node-unreachable").await }).await;
}
