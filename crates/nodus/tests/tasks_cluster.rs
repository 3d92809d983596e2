//! Tasks across nodes through real node processes: a manager node and two worker nodes
//! (`nodus daemon` each, linked by the cluster with a secret), the procedures app deployed on
//! each. Tasks submitted to the manager run on the workers (the store says which one); a worker
//! killed with kill -9 mid-run loses nothing (its tasks run again on the other one); the
//! manager killed with kill -9 and restarted asks its workers what they finished and loses
//! nothing either. A node that is not among the manager's workers is not accepted. A worker
//! node without the app fetches its package from the manager (and again after a redeploy), and
//! one that cannot take it fails the task with `DownloadError`.
//!
//! Needs `nodus-procs-worker` next to `nodus` (`cargo test --workspace` builds it).
// These tests drive real processes on wall time.
#![allow(clippy::disallowed_methods)]

mod common;

use common::netns::Net;
use common::{free_port, NODUS};
use nodus_client::admin::{Agents, TaskChange, TaskSpec, TaskStatus};
use nodus_client::{Admin, Client, ClientConfig};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Every wait of these tests is bounded by this.
const WAIT: Duration = Duration::from_secs(120);
/// Tasks of the fault test.
const TASKS: usize = 10_000;

/// A `nodus daemon` of the test cluster.
struct Node {
    name: String,
    dir: PathBuf,
    config: PathBuf,
    child: Option<Child>,
    /// The network namespace it runs in.
    netns: Option<String>,
}

impl Node {
    /// A node called `name` with cluster port `port`, linked to `neighbors`, with `tasks` added
    /// to its `[tasks]` section.
    fn new(root: &Path, name: &str, port: u16, neighbors: &[u16], top: &str, tasks: &str) -> Node {
        let neighbors: Vec<String> = neighbors.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        Node::with(root, name, &format!("127.0.0.1:{port}"), &neighbors, None, top, tasks)
    }

    /// A node listening for cluster links on `listen`, in network namespace `netns` if given.
    fn with(
        root: &Path,
        name: &str,
        listen: &str,
        neighbors: &[String],
        netns: Option<&str>,
        top: &str,
        tasks: &str,
    ) -> Node {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("node.toml");
        let neighbors: Vec<String> = neighbors.iter().map(|a| format!("\"{a}\"")).collect();
        // Quick echolocation unless the test sets its own.
        let timing: String = ["ping_interval_ms = 200", "silent_after_ms = 800", "gone_after_ms = 2000"]
            .iter()
            .filter(|kv| !tasks.contains(kv.split(' ').next().unwrap()))
            .map(|kv| format!("{kv}\n"))
            .collect();
        let text = format!(
            "server_name = \"{name}\"\ndata_dir = {:?}\nunix_socket = {:?}\ntcp_listen = \"\"\n{top}\n\
             [cluster]\nlisten = \"{listen}\"\nneighbors = [{}]\nsecret = \"tasks-across-nodes\"\n\
             udp_listen = \"\"\nheartbeat_ms = 100\n\
             [apps]\nlocator_listen = \"\"\nrun_as = \"root\"\n[http]\nlisten = \"\"\n\
             [tasks]\narpcp_listen = \"\"\n{timing}{tasks}\n",
            dir.join("data").display().to_string(),
            dir.join("n.sock").display().to_string(),
            neighbors.join(", "),
        );
        std::fs::write(&config, text).unwrap();
        let mut n = Node { name: name.into(), dir, config, child: None, netns: netns.map(String::from) };
        n.run();
        n
    }

    fn run(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("daemon.log")).unwrap();
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns.as_str(), NODUS]);
                c
            }
            None => Command::new(NODUS),
        };
        let child = command.arg("daemon").arg("--config").arg(&self.config).stderr(log).spawn().unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("{} exited ({status}): {}", self.name, self.log());
            }
            assert!(Instant::now() < deadline, "{} did not start listening", self.name);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("n.sock")
    }

    fn endpoint(&self) -> String {
        format!("unix:{}", self.socket().display())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(NODUS)
            .arg("--node")
            .arg(self.endpoint())
            .args(args)
            .current_dir(&self.dir)
            .env_remove("NODUS_TOKEN")
            .output()
            .unwrap()
    }

    async fn admin(&self) -> Admin {
        Client::connect(ClientConfig::new(self.endpoint()).no_reconnect()).await.unwrap().0.admin()
    }

    /// Deploys the Rust procedures app as `procs`.
    fn deploy_procs(&self) {
        let app = self.dir.join("procs-app");
        std::fs::create_dir_all(&app).unwrap();
        let example = repo().join("examples/procs-app");
        std::fs::copy(example.join("manifest.json"), app.join("manifest.json")).unwrap();
        std::fs::copy(example.join("profile.toml"), app.join("profile.toml")).unwrap();
        std::fs::copy(worker(), app.join("nodus-procs-worker")).unwrap();
        let out = self.cli(&["app", "deploy", "procs", app.to_str().unwrap()]);
        assert!(out.status.success(), "deploy on {}: {}{}", self.name, text(&out), self.log());
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn worker() -> PathBuf {
    let w = Path::new(NODUS).with_file_name("nodus-procs-worker");
    assert!(w.exists(), "{} is missing: cargo build -p nodus-tasks --bins", w.display());
    w
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Waits until the manager's registry satisfies `ok`.
async fn agents_until(m: &Node, what: &str, ok: impl Fn(&Agents) -> bool) -> Agents {
    let admin = m.admin().await;
    let deadline = Instant::now() + WAIT;
    loop {
        let a = admin.agents().await.unwrap();
        if ok(&a) {
            return a;
        }
        assert!(Instant::now() < deadline, "{what}: {a:?}\n{}", m.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn active(a: &Agents, name: &str) -> bool {
    a.agents.iter().any(|x| x.name == name && x.state == "active")
}

/// Waits until the manager has no pending or running task.
async fn all_finished(m: &Node) {
    let admin = m.admin().await;
    let deadline = Instant::now() + WAIT;
    loop {
        let c = admin.task_counts().await.unwrap();
        if c.pending + c.running == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "the tasks did not all finish: {c:?}\n{}", m.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every task of the manager's store with `procedure`, page by page.
async fn stored(admin: &Admin, procedure: &str) -> Vec<nodus_client::admin::TaskInfo> {
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = admin.task_list(None, Some(procedure), None, after.as_deref(), 1000).await.unwrap();
        all.extend(page.tasks);
        match page.next {
            Some(n) => after = Some(n),
            None => return all,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_and_two_workers_lose_nothing_when_a_worker_and_the_manager_are_killed() {
    let root = tempfile::Builder::new().prefix("ntc").tempdir().unwrap();
    let (mp, w1p, w2p) = (free_port(), free_port(), free_port());
    let mut m = Node::new(
        root.path(),
        "m",
        mp,
        &[],
        "expected_services = [\"taskwatch\"]",
        "role = \"manager\"\nworkers = [\"w1\", \"w2\"]\nnotify = \"service:taskwatch\"",
    );
    let mut w1 =
        Node::new(root.path(), "w1", w1p, &[mp], "", "role = \"worker\"\nmanagers = [\"m\"]\nworker_concurrency = 8");
    let w2 =
        Node::new(root.path(), "w2", w2p, &[mp], "", "role = \"worker\"\nmanagers = [\"m\"]\nworker_concurrency = 8");
    for n in [&m, &w1, &w2] {
        n.deploy_procs();
    }
    let a = agents_until(&m, "both workers pair", |a| active(a, "w1") && active(a, "w2")).await;
    assert_eq!(a.role, "manager");
    let w = w1.admin().await.agents().await.unwrap();
    assert_eq!((w.role.as_str(), w.manager.as_deref()), ("worker", Some("m")));
    let out = m.cli(&["agents"]);
    assert!(out.status.success() && text(&out).contains("w1") && text(&out).contains("active"), "{}", text(&out));

    // Every status change goes to `taskwatch` on the manager (cached there while it is away).
    let config = ClientConfig::new(m.endpoint()).service("taskwatch").incoming_capacity(1 << 20);
    let (_watcher, mut incoming) = Client::connect(config).await.unwrap();
    let done: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(0usize);
    let counter = done.clone();
    tokio::spawn(async move {
        while let Some(msg) = incoming.recv().await {
            if let Some(c) = TaskChange::from_message(&msg) {
                if c.status == "done" {
                    let n = {
                        let mut d = counter.lock().unwrap();
                        *d.entry(c.id).or_default() += 1;
                        d.len()
                    };
                    let _ = done_tx.send(n);
                }
            }
        }
    });

    // 10 000 tasks, each appending its number to one file when it runs.
    let runs = root.path().join("runs.log");
    let admin = m.admin().await;
    let specs: Vec<TaskSpec> =
        (0..TASKS).map(|n| TaskSpec::new("procs.record", vec![json!(runs.to_str().unwrap()), json!(n)])).collect();
    let started = Instant::now();
    let mut ids = Vec::new();
    for chunk in specs.chunks(5000) {
        for r in admin.task_submit_many(chunk).await.unwrap() {
            ids.push(r.unwrap().id);
        }
    }

    // Which nodes run the tasks: the owners of running tasks, sampled until the manager dies.
    let owners: Arc<Mutex<HashSet<String>>> = Arc::default();
    let sampler = {
        let (owners, admin) = (owners.clone(), m.admin().await);
        tokio::spawn(async move {
            while let Ok(page) = admin.task_list(Some(TaskStatus::Running), None, None, None, 1000).await {
                owners.lock().unwrap().extend(page.tasks.into_iter().filter_map(|t| t.owner));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // kill -9 a worker mid-run: its tasks run again on the other one.
    tokio::time::timeout(WAIT, done_rx.wait_for(|n| *n >= TASKS / 5)).await.expect("a fifth done").unwrap();
    w1.kill9();
    let at_worker_kill = done.lock().unwrap().len();
    agents_until(&m, "w1 is judged gone", |a| a.agents.iter().any(|x| x.name == "w1" && x.state == "gone")).await;

    // kill -9 the manager mid-run, restart it: it asks w2 what it finished.
    tokio::time::timeout(WAIT, done_rx.wait_for(|n| *n >= TASKS / 2)).await.expect("half done").unwrap();
    let stats = m.admin().await.task_stats().await.unwrap();
    assert_eq!(stats.started, 0, "the manager runs no task itself: {stats:?}");
    m.kill9();
    let at_manager_kill = done.lock().unwrap().len();
    sampler.await.unwrap();
    m.run();
    all_finished(&m).await;
    let elapsed = started.elapsed();

    let admin = m.admin().await;
    let tasks = stored(&admin, "procs.record").await;
    let by_id: HashMap<&str, &nodus_client::admin::TaskInfo> = tasks.iter().map(|t| (t.id.as_str(), t)).collect();
    let lost = ids.iter().filter(|id| by_id.get(id.as_str()).is_none_or(|t| t.status != TaskStatus::Done)).count();
    let owners = owners.lock().unwrap().clone();
    let executions = std::fs::read_to_string(&runs).unwrap().lines().count();
    // A last task: its completion comes after every earlier one to the watcher.
    let marker = admin.task_submit(&TaskSpec::new("procs.noop", vec![])).await.unwrap().id;
    let seen = done.clone();
    tokio::time::timeout(WAIT, done_rx.wait_for(|_| seen.lock().unwrap().contains_key(&marker)))
        .await
        .expect("the marker's completion reached the watcher")
        .unwrap();
    let duplicates: u32 = done.lock().unwrap().values().map(|n| n - 1).sum();
    eprintln!(
        "tasks across nodes: submitted {TASKS}, completed {}, lost {lost}, duplicate completions {duplicates}; \
         executions {executions} (run again after the kills: {}); done at the worker's kill {at_worker_kill}, \
         at the manager's kill {at_manager_kill}; run by {owners:?}; {:.1} s",
        tasks.iter().filter(|t| t.status == TaskStatus::Done).count(),
        executions.saturating_sub(TASKS),
        elapsed.as_secs_f64(),
    );
    assert_eq!(lost, 0, "every task completed");
    assert_eq!(duplicates, 0, "no task completed twice");
    assert!(executions >= TASKS, "every task ran");
    assert!(owners.contains("w1") && owners.contains("w2") && !owners.contains("m"), "{owners:?}");
    assert!(at_worker_kill < TASKS && at_manager_kill < TASKS, "the kills came mid-run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairing_follows_the_configured_names_and_an_operators_ban() {
    let root = tempfile::Builder::new().prefix("ntc").tempdir().unwrap();
    let (mp, wp, w1p) = (free_port(), free_port(), free_port());
    let m = Node::new(root.path(), "m", mp, &[], "", "role = \"manager\"\nworkers = [\"w1\"]");
    let intruder = Node::new(root.path(), "w9", wp, &[mp], "", "role = \"worker\"\nmanagers = [\"m\"]");
    // w1 lists a manager that does not exist first: it moves on to the next one.
    let w1 = Node::new(root.path(), "w1", w1p, &[mp], "", "role = \"worker\"\nmanagers = [\"nowhere\", \"m\"]");
    agents_until(&m, "w1 pairs with its second manager", |a| active(a, "w1")).await;
    let out = m.cli(&["agents", "ban", "w1"]);
    assert!(out.status.success(), "{}", text(&out));
    let a = agents_until(&m, "w1 is let go", |a| {
        a.agents.iter().any(|x| x.name == "w1" && x.banned && x.state != "active")
    })
    .await;
    assert_eq!(a.agents.len(), 1, "{a:?}");
    let w1_admin = w1.admin().await;
    let deadline = Instant::now() + WAIT;
    while w1_admin.agents().await.unwrap().manager.as_deref() != Some("") {
        assert!(Instant::now() < deadline, "w1 still thinks it is paired: {}", w1.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(m.cli(&["agents", "unban", "w1"]).status.success());
    agents_until(&m, "w1 pairs again once unbanned", |a| active(a, "w1")).await;
    // The intruder asks, the manager refuses it (and says so), and it stays without a manager.
    let deadline = Instant::now() + WAIT;
    while !m.log().contains("refusing a ManagerRequest") {
        assert!(Instant::now() < deadline, "w9 was never refused: {}\n{}", intruder.log(), m.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a = m.admin().await.agents().await.unwrap();
    assert!(a.agents.iter().all(|x| x.name != "w9"), "{a:?}");
    let w = intruder.admin().await.agents().await.unwrap();
    assert_eq!((w.role.as_str(), w.manager.as_deref()), ("worker", Some("")));
    let out = intruder.cli(&["agents", "ban", "m"]);
    assert_eq!(out.status.code(), Some(1), "only a manager bans: {}", text(&out));
    assert!(text(&out).contains("not a manager"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_times_tasks_out_and_an_abort_reaches_the_worker() {
    let root = tempfile::Builder::new().prefix("ntc").tempdir().unwrap();
    let (mp, wp) = (free_port(), free_port());
    let m = Node::new(root.path(), "m", mp, &[], "", "role = \"manager\"\nworkers = [\"w1\"]");
    let w1 = Node::new(root.path(), "w1", wp, &[mp], "", "role = \"worker\"\nmanagers = [\"m\"]");
    for n in [&m, &w1] {
        n.deploy_procs();
    }
    agents_until(&m, "w1 pairs", |a| active(a, "w1")).await;
    let admin = m.admin().await;

    // A task past its timeout on the worker: the worker kills it and reports TimedOut.
    let spec = TaskSpec { timeout_ms: Some(300), ..TaskSpec::new("procs.sleep", vec![json!(20_000)]) };
    let id = admin.task_submit(&spec).await.unwrap().id;
    let t = admin.task_wait(&id, WAIT).await.unwrap();
    assert_eq!(t.status, TaskStatus::Error, "{t:?}");
    assert_eq!(t.error.as_ref().map(|e| e.kind.as_str()), Some("TimedOut"), "{t:?}");

    // An abort on the manager: the task is interrupted at once and its worker is told to stop it.
    let id = admin.task_submit(&TaskSpec::new("procs.sleep", vec![json!(3_000)])).await.unwrap().id;
    let deadline = Instant::now() + WAIT;
    loop {
        let t = admin.task_get(&id).await.unwrap();
        if t.status == TaskStatus::Running && t.owner.as_deref() == Some("w1") {
            break;
        }
        assert!(Instant::now() < deadline, "the task never ran on w1: {t:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = m.cli(&["task", "abort", &id]);
    assert!(out.status.success(), "{}", text(&out));
    let deadline = Instant::now() + WAIT;
    while !m.log().contains("telling its worker to stop it") {
        assert!(Instant::now() < deadline, "the worker was not told: {}", m.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Later tasks still run on w1, and the aborted one stays interrupted.
    let t = admin.task_run(&TaskSpec::new("procs.add", vec![json!(40), json!(2)]), WAIT).await.unwrap();
    assert_eq!((t.status, t.result), (TaskStatus::Done, Some(json!(42))));
    assert_eq!(admin.task_get(&id).await.unwrap().status, TaskStatus::Interrupted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_by_a_partition_loses_nothing_and_pairs_again_when_healed() {
    let net = match Net::new(3, "tk", 78) {
        Ok(net) => net,
        Err(why) => {
            eprintln!("SKIPPED the tasks partition test: network namespaces unavailable ({why})");
            return;
        }
    };
    const N: usize = 3000;
    let root = tempfile::Builder::new().prefix("ntc").tempdir().unwrap();
    let listen = |i: usize| format!("{}:14042", net.addr(i));
    // Nodes in their own namespaces; the listener on 10.78.0.x needs the secret (set).
    let m = Node::with(
        root.path(),
        "m",
        &listen(0),
        &[],
        Some(&net.hosts[0]),
        "",
        "role = \"manager\"\nworkers = [\"w1\", \"w2\"]",
    );
    let w = "role = \"worker\"\nmanagers = [\"m\"]\nworker_concurrency = 8";
    let w1 = Node::with(root.path(), "w1", &listen(1), &[listen(0)], Some(&net.hosts[1]), "", w);
    let w2 = Node::with(root.path(), "w2", &listen(2), &[listen(0)], Some(&net.hosts[2]), "", w);
    for n in [&m, &w1, &w2] {
        n.deploy_procs();
    }
    agents_until(&m, "both workers pair", |a| active(a, "w1") && active(a, "w2")).await;

    let runs = root.path().join("runs.log");
    let admin = m.admin().await;
    let specs: Vec<TaskSpec> =
        (0..N).map(|n| TaskSpec::new("procs.record", vec![json!(runs.to_str().unwrap()), json!(n)])).collect();
    let ids: Vec<String> = admin.task_submit_many(&specs).await.unwrap().into_iter().map(|r| r.unwrap().id).collect();
    let deadline = Instant::now() + WAIT;
    while admin.task_stats().await.unwrap().done < (N / 5) as u64 {
        assert!(Instant::now() < deadline, "a fifth never finished");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    net.cut(1);
    agents_until(&m, "w1 is judged gone", |a| a.agents.iter().any(|x| x.name == "w1" && x.state == "gone")).await;
    all_finished(&m).await;
    net.heal(1);
    agents_until(&m, "w1 pairs again after the heal", |a| active(a, "w1")).await;

    let tasks = stored(&admin, "procs.record").await;
    let done: HashSet<&str> = tasks.iter().filter(|t| t.status == TaskStatus::Done).map(|t| t.id.as_str()).collect();
    let lost = ids.iter().filter(|id| !done.contains(id.as_str())).count();
    let stats = admin.task_stats().await.unwrap();
    let executions = std::fs::read_to_string(&runs).unwrap().lines().count();
    eprintln!(
        "tasks across a partition: submitted {N}, completed {}, lost {lost}, recorded done {} (duplicate completions {}), \
         executions {executions}, late completions discarded {}",
        done.len(),
        stats.done,
        stats.done.saturating_sub(N as u64),
        stats.stale,
    );
    assert_eq!(lost, 0);
    assert_eq!(stats.done, N as u64, "every task recorded done exactly once: {stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_times_out_the_task_of_a_worker_that_went_quiet() {
    let root = tempfile::Builder::new().prefix("ntc").tempdir().unwrap();
    let (mp, wp) = (free_port(), free_port());
    // The manager gives up on a report long before it gives up on the worker.
    let m = Node::new(
        root.path(),
        "m",
        mp,
        &[],
        "",
        "role = \"manager\"\nworkers = [\"w1\"]\nworker_grace_ms = 300\ngone_after_ms = 30000",
    );
    let w1 =
        Node::new(root.path(), "w1", wp, &[mp], "", "role = \"worker\"\nmanagers = [\"m\"]\ngone_after_ms = 30000");
    for n in [&m, &w1] {
        n.deploy_procs();
    }
    agents_until(&m, "w1 pairs", |a| active(a, "w1")).await;
    let admin = m.admin().await;
    let spec = TaskSpec { timeout_ms: Some(1000), ..TaskSpec::new("procs.sleep", vec![json!(20_000)]) };
    let id = admin.task_submit(&spec).await.unwrap().id;
    let deadline = Instant::now() + WAIT;
    while admin.task_get(&id).await.unwrap().status != TaskStatus::Running {
        assert!(Instant::now() < deadline, "the task never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The worker node freezes (SIGSTOP): it can neither time the task out nor report.
    let pid = w1.child.as_ref().unwrap().id().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let t = admin.task_wait(&id, WAIT).await.unwrap();
    assert!(Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    assert_eq!(t.status, TaskStatus::Error, "{t:?}");
    let e = t.error.unwrap();
    assert_eq!(e.kind, "TimedOut");
    assert!(e.message.contains("no report from worker node w1"), "timed out by the manager: {}", e.message);
    // Once it thaws, the worker is told to stop the task and goes on working.
    let t = admin.task_run(&TaskSpec::new("procs.add", vec![json!(1), json!(2)]), WAIT).await.unwrap();
    assert_eq!(t.result, Some(json!(3)));
    assert_eq!(admin.task_get(&id).await.unwrap().status, TaskStatus::Error, "the late end is discarded");
}

/// The log lines of `node` that contain `what`, without terminal colours.
fn log_lines(node: &Node, what: &str) -> Vec<String> {
    let mut plain = String::new();
    let log = node.log();
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain.lines().filter(|l| l.contains(what)).map(String::from).collect()
}

/// The value of `key=` in a log line.
fn field(line: &str, key: &str) -> Option<String> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    Some(line[at..].split_whitespace().next()?.trim_matches('"').to_string())
}

/// Waits for a log line of `node` with `what` that satisfies `ok`; returns it.
async fn log_until(node: &Node, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(l) = log_lines(node, what).into_iter().rev().find(|l| ok(l)) {
            return l;
        }
        assert!(Instant::now() < deadline, "{} never logged {what:?}: {}", node.name, node.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every file under `dir` with its bytes and whether it is executable, in order.
fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>, bool)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                let rel = e.path().strip_prefix(dir).unwrap().to_path_buf();
                out.push((rel, std::fs::read(e.path()).unwrap(), meta.permissions().mode() & 0o111 != 0));
            }
        }
    }
    out.sort();
    out
}

/// The directory of the current version of `app` on `node`.
fn current(node: &Node, app: &str) -> PathBuf {
    let apps = node.dir.join("data/apps").join(app);
    let version = std::fs::read_to_string(apps.join("current")).unwrap();
    apps.join(version.trim())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_the_app_fetches_it_from_its_manager_and_follows_its_redeploys() {
    let root = tempfile::Builder::new().prefix("ntc").tempdir().unwrap();
    let (mp, wp) = (free_port(), free_port());
    let m = Node::new(root.path(), "m", mp, &[], "", "role = \"manager\"\nworkers = [\"w1\"]");
    let w1 = Node::new(root.path(), "w1", wp, &[mp], "", "role = \"worker\"\nmanagers = [\"m\"]");
    m.deploy_procs();
    agents_until(&m, "w1 pairs", |a| active(a, "w1")).await;
    let out = w1.cli(&["app", "list"]);
    assert!(out.status.success() && !text(&out).contains("procs"), "w1 starts without the app: {}", text(&out));
    let packed = log_until(&m, "app packed for worker nodes", |l| field(l, "version").as_deref() == Some("v1")).await;
    let hash = field(&packed, "hash").unwrap();

    // The first task of the app: w1 fetches the package, deploys it, runs the task.
    let admin = m.admin().await;
    let started = Instant::now();
    let t = admin.task_run(&TaskSpec::new("procs.add", vec![json!(40), json!(2)]), WAIT).await.unwrap();
    let first = started.elapsed();
    assert_eq!((t.status, t.result.clone()), (TaskStatus::Done, Some(json!(42))), "{t:?}\n{}", w1.log());
    assert_eq!(admin.task_stats().await.unwrap().started, 0, "the manager ran nothing itself");
    let out = w1.cli(&["app", "list"]);
    assert!(text(&out).contains("procs") && text(&out).contains("running"), "{}", text(&out));
    // Deployed with the same content: the same files, and the same hash when w1 packs its copy.
    assert_eq!(tree(&current(&w1, "procs")), tree(&current(&m, "procs")));
    let declared = log_until(&w1, "declaring a deployed app", |l| field(l, "app").as_deref() == Some("procs")).await;
    assert_eq!(field(&declared, "hash").as_deref(), Some(hash.as_str()), "{declared}");
    let fetched = log_lines(&w1, "fetched from the manager and deployed");
    assert_eq!(fetched.len(), 1, "{fetched:?}");
    let (bytes, ms) = (field(&fetched[0], "bytes").unwrap(), field(&fetched[0], "ms").unwrap());
    assert_eq!(field(&packed, "size").as_deref(), Some(bytes.as_str()));

    // Later tasks of the same version need no fetch.
    let started = Instant::now();
    for n in 0..20 {
        let t = admin.task_run(&TaskSpec::new("procs.add", vec![json!(n), json!(1)]), WAIT).await.unwrap();
        assert_eq!(t.result, Some(json!(n + 1)));
    }
    let warm = started.elapsed() / 20;
    assert_eq!(log_lines(&w1, "fetched from the manager and deployed").len(), 1, "fetched once");

    // A redeploy on the manager: the next task brings the new version to w1.
    std::fs::write(m.dir.join("procs-app/VERSION"), "2\n").unwrap();
    let out = m.cli(&["app", "deploy", "procs", m.dir.join("procs-app").to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let repacked = log_until(&m, "app packed for worker nodes", |l| field(l, "version").as_deref() == Some("v2")).await;
    assert_ne!(field(&repacked, "hash"), Some(hash), "another version, another hash");
    let t = admin.task_run(&TaskSpec::new("procs.add", vec![json!(2), json!(2)]), WAIT).await.unwrap();
    assert_eq!(t.result, Some(json!(4)), "{}", w1.log());
    assert_eq!(log_lines(&w1, "fetched from the manager and deployed").len(), 2);
    assert_eq!(std::fs::read_to_string(current(&w1, "procs").join("VERSION")).unwrap(), "2\n");
    assert_eq!(tree(&current(&w1, "procs")), tree(&current(&m, "procs")));
    assert!(
        std::fs::read_dir(w1.dir.join("data/packages/incoming")).map_or(true, |d| d.count() == 0),
        "fetched files are removed once deployed"
    );
    eprintln!(
        "apps follow their tasks: a package of {bytes} bytes fetched from the manager, checked and deployed in \
         {ms} ms; the first task end to end {:.0} ms, later ones {:.1} ms each",
        first.as_secs_f64() * 1000.0,
        warm.as_secs_f64() * 1000.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_package_a_worker_cannot_take_fails_its_task_with_download_error() {
    let root = tempfile::Builder::new().prefix("ntc").tempdir().unwrap();
    let (mp, w1p, w2p) = (free_port(), free_port(), free_port());
    let m = Node::new(root.path(), "m", mp, &[], "", "role = \"manager\"\nworkers = [\"w1\", \"w2\"]");
    m.deploy_procs();
    // w1 fetches no package over 4 KiB.
    let w1 =
        Node::new(root.path(), "w1", w1p, &[mp], "", "role = \"worker\"\nmanagers = [\"m\"]\nmax_package_bytes = 4096");
    agents_until(&m, "w1 pairs", |a| active(a, "w1")).await;
    let admin = m.admin().await;
    let once = |args: Vec<serde_json::Value>| TaskSpec { max_attempts: Some(1), ..TaskSpec::new("procs.add", args) };
    let id = admin.task_submit(&once(vec![json!(1), json!(2)])).await.unwrap().id;
    let t = admin.task_wait(&id, WAIT).await.unwrap();
    assert_eq!(t.status, TaskStatus::Error, "{t:?}");
    let e = t.error.unwrap();
    assert_eq!(e.kind, "DownloadError", "{e:?}");
    assert!(e.message.contains("procs") && e.message.contains("at most 4096"), "{}", e.message);
    let out = m.cli(&["task", "get", &id]);
    assert!(text(&out).contains("DownloadError") && text(&out).contains("at most 4096"), "{}", text(&out));
    assert!(!text(&w1.cli(&["app", "list"])).contains("procs"));

    // w2 fetches it, but a program holds the service name `procs` there: the deploy is refused.
    assert!(m.cli(&["agents", "ban", "w1"]).status.success());
    agents_until(&m, "w1 is let go", |a| a.agents.iter().any(|x| x.name == "w1" && x.banned && x.state != "active"))
        .await;
    let w2 = Node::new(root.path(), "w2", w2p, &[mp], "", "role = \"worker\"\nmanagers = [\"m\"]");
    let (_holder, _) = Client::connect(ClientConfig::new(w2.endpoint()).service("procs")).await.unwrap();
    agents_until(&m, "w2 pairs", |a| active(a, "w2")).await;
    let id = admin.task_submit(&once(vec![json!(3), json!(4)])).await.unwrap().id;
    let t = admin.task_wait(&id, WAIT).await.unwrap();
    assert_eq!(t.status, TaskStatus::Error, "{t:?}");
    let e = t.error.unwrap();
    assert_eq!(e.kind, "DownloadError", "{e:?}");
    assert!(e.message.contains("deploying it failed") && e.message.contains("already registered"), "{}", e.message);
    assert!(
        std::fs::read_dir(w2.dir.join("data/packages/incoming")).map_or(true, |d| d.count() == 0),
        "the fetched file is removed"
    );
}
