//! `tasks` through a real node, next to the in-process figures of [`crate::tasks`]: a `nodus
//! daemon` child with the example procedures app deployed by its `apps` service, tasks submitted
//! from this process over the node's `tasks` service (`ATASK` requests multiplexed over a few
//! client connections) or over its arpcp listener (one TCP connection per request, as the
//! protocol has it), run by the app's worker processes, recorded in the node's SQLite store.
//!
//! - end to end: K submitters each submit one no-op task at a time; timed from the first
//!   submission until the node has recorded every completion (its `STATS`); with the submit →
//!   acknowledged (durable) percentiles;
//! - light load: one `TASK` at a time through the `tasks` service (submit, run, record, answer),
//!   its round trip percentiles: submit → done as a client sees it.
// A benchmark measures wall time: it reads the std clock on purpose.
#![allow(clippy::disallowed_methods)]
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use nodus_client::admin::TaskSpec;
use nodus_client::{Admin, Client, ClientConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::child::{self, Child, ScratchDir};
use crate::latency::percentile;
use crate::report;
use crate::tasks::TasksLoad;

/// The procedure every task calls.
const NOOP: &str = "procs.noop";
/// Client connections the `tasks` service submitters share.
const CONNECTIONS: usize = 8;
/// How long one measurement may take before it is abandoned.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

/// How tasks reach the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// `ATASK` requests to the built-in `tasks` service.
    Service,
    /// arpcp `atask`, one TCP connection per request.
    Arpcp,
}

/// One line of figures.
struct Figures {
    what: String,
    sync: &'static str,
    workers: usize,
    tasks: usize,
    secs: f64,
    /// Submit → acknowledged (or, at light load, submit → result), p50 and p99, microseconds.
    latency_us: (f64, f64),
    /// CPU microseconds per task of the node process (router, task service, store, engine).
    node_cpu_us: f64,
}

/// A `nodus daemon` child with the procedures app deployed and its workers up.
struct BenchNode {
    daemon: Child,
    pid: u32,
    admin: Admin,
    clients: Vec<Client>,
    arpcp: std::net::SocketAddr,
}

/// CPU seconds used by process `pid` so far (`/proc/PID/stat`, 10 ms ticks).
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0.0)).collect();
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
}

/// A node's name and part: standalone with no cluster listener, or a member of a small
/// loopback cluster with a `[tasks] role`.
struct Setup {
    name: String,
    /// Keys of `[cluster]`.
    cluster: String,
    /// More keys of `[tasks]`.
    tasks: String,
}

impl Setup {
    fn standalone() -> Setup {
        Setup { name: "tasks-bench".into(), cluster: "listen = \"\"".into(), tasks: String::new() }
    }

    /// A member of the bench's cluster listening on `port`, linked to `neighbors`.
    fn member(name: &str, port: u16, neighbors: &[u16], tasks: &str) -> Setup {
        let n: Vec<String> = neighbors.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
        Setup {
            name: name.into(),
            cluster: format!("listen = \"127.0.0.1:{port}\"\nneighbors = [{}]\nsecret = \"tasks-bench\"", n.join(", ")),
            tasks: tasks.into(),
        }
    }
}

impl BenchNode {
    /// Starts a node in `dir` with `synchronous` and deploys the app with `workers` workers.
    async fn start(
        nodus: &Path,
        worker: &Path,
        dir: &Path,
        synchronous: &str,
        workers: usize,
        setup: &Setup,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let arpcp = std::net::SocketAddr::from(([127, 0, 0, 1], child::free_port()?));
        let socket = dir.join("n.sock");
        let config = dir.join("node.toml");
        // The worker is this build's binary: as root, run it as root (`nobody` may not reach it).
        std::fs::write(
            &config,
            format!(
                "server_name = \"{}\"\ndata_dir = {:?}\nunix_socket = {:?}\ntcp_listen = \"\"\n\
                 [cluster]\n{}\nudp_listen = \"\"\n[apps]\nlocator_listen = \"\"\nrun_as = \"root\"\n\
                 [tasks]\nsynchronous = \"{synchronous}\"\narpcp_listen = \"{arpcp}\"\n{}\n",
                setup.name,
                dir.join("data").display().to_string(),
                socket.display().to_string(),
                setup.cluster,
                setup.tasks,
            ),
        )?;
        let mut command = tokio::process::Command::new(nodus);
        command.arg("daemon").arg("--config").arg(&config);
        let mut daemon = Child::spawn("nodus daemon (tasks)", command, dir.join("daemon.log"), false)?;
        let endpoint = format!("unix:{}", socket.display());
        let deadline = Instant::now() + child::READY_TIMEOUT;
        let probe = || async {
            let config = ClientConfig::new(endpoint.as_str()).no_reconnect();
            Client::connect(config)
                .await
                .map(|(c, _)| c)
                .with_context(|| format!("the daemon does not answer on {endpoint}"))
        };
        let first = child::retry_until(deadline, || daemon.check_running(), probe).await?;
        let pid = daemon.id().context("the daemon has no process id")?;
        let mut clients = vec![first];
        for _ in 1..CONNECTIONS {
            clients.push(Client::connect(ClientConfig::new(endpoint.as_str()).no_reconnect()).await?.0);
        }
        let admin = clients[0].admin();

        let app = dir.join("procs-app");
        std::fs::create_dir_all(&app)?;
        std::fs::write(app.join("manifest.json"), include_str!("../../../examples/procs-app/manifest.json"))?;
        std::fs::write(
            app.join("profile.toml"),
            format!("pool-limit = {workers}\nconcurrency = 256\nqueue-limit = 1024\nidle-timeout = 3600\n"),
        )?;
        std::fs::copy(worker, app.join("nodus-procs-worker")).context("copy the worker into the app")?;
        admin.deploy("procs", &app, None).await.context("deploy the procedures app")?;
        admin.scale_app("procs", workers).await.context("scale the procedures app")?;
        let ready = async {
            loop {
                let info = admin.app_info("procs").await?;
                if info.workers.iter().filter(|w| w.state == "Active").count() >= workers {
                    return anyhow::Ok(());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), ready).await.context("the workers did not start")??;
        Ok(BenchNode { daemon, pid, admin, clients, arpcp })
    }

    async fn completed(&self) -> anyhow::Result<u64> {
        Ok(self.admin.task_stats().await?.done)
    }

    /// K submitters, one task each at a time, until `count` are acknowledged; then until the
    /// node recorded them all done.
    async fn throughput(&mut self, via: Via, count: usize, submitters: usize) -> anyhow::Result<(f64, Vec<u64>)> {
        let before = self.completed().await?;
        let next = Arc::new(AtomicUsize::new(0));
        let begin = Instant::now();
        let mut joins = Vec::with_capacity(submitters);
        for k in 0..submitters {
            let (next, admin, addr) = (next.clone(), self.clients[k % self.clients.len()].admin(), self.arpcp);
            joins.push(tokio::spawn(async move {
                let spec = TaskSpec::new(NOOP, Vec::new());
                let mut acked = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < count {
                    let t0 = Instant::now();
                    match via {
                        Via::Service => drop(admin.task_submit(&spec).await?),
                        Via::Arpcp => arpcp_atask(addr).await?,
                    }
                    acked.push(t0.elapsed().as_nanos() as u64);
                }
                anyhow::Ok(acked)
            }));
        }
        let submitted = async {
            let mut all = Vec::with_capacity(count);
            for j in joins {
                all.extend(j.await.context("a submitter panicked")??);
            }
            anyhow::Ok(all)
        };
        let mut acked = tokio::time::timeout(RUN_TIMEOUT, submitted).await.context("submissions did not finish")??;
        let want = before + count as u64;
        let done = async {
            loop {
                if self.completed().await? >= want {
                    return anyhow::Ok(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        let end = tokio::time::timeout(RUN_TIMEOUT, done).await.context("the tasks did not all finish")??;
        self.daemon.check_running()?;
        acked.sort_unstable();
        Ok((end.saturating_duration_since(begin).as_secs_f64(), acked))
    }

    /// One `TASK` at a time: submit, run, record, answer.
    async fn light(&mut self, count: usize) -> anyhow::Result<(f64, Vec<u64>)> {
        let spec = TaskSpec::new(NOOP, Vec::new());
        let mut rtt = Vec::with_capacity(count);
        let begin = Instant::now();
        for _ in 0..count {
            let t0 = Instant::now();
            let t = self.admin.task_run(&spec, Duration::from_secs(30)).await?;
            if !t.status.is_final() || t.error.is_some() {
                bail!("task {} did not finish well: {t:?}", t.id);
            }
            rtt.push(t0.elapsed().as_nanos() as u64);
        }
        let secs = begin.elapsed().as_secs_f64();
        rtt.sort_unstable();
        Ok((secs, rtt))
    }

    async fn stop(self) {
        drop(self.clients);
        self.daemon.stop().await;
    }
}

/// One arpcp `atask` of the no-op procedure over its own connection.
async fn arpcp_atask(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(b"{\"method\": \"atask\", \"version\": \"1.0\", \"remote_procedure\": \"procs.noop\", \"remote_procedure_args\": []}\r\n")
        .await?;
    let mut buf = Vec::with_capacity(128);
    s.read_to_end(&mut buf).await?;
    if !buf.starts_with(b"{\"code\":100,") {
        bail!("arpcp atask refused: {}", String::from_utf8_lossy(&buf));
    }
    Ok(())
}

/// Runs the through-the-node measurements and prints them.
///
/// Fails when the node or the worker cannot be found or started, or a measurement fails.
pub async fn run(json: bool, nodus: Option<PathBuf>, load: &TasksLoad) -> anyhow::Result<()> {
    let nodus = crate::nodus_system::nodus_binary(nodus)?;
    let worker = crate::tasks::worker_binary(load.worker.clone())?;
    let scratch = ScratchDir::create()?;
    let mut rows = Vec::new();
    for (sync, name) in [("full", "FULL"), ("normal", "NORMAL")] {
        let sizes: &[usize] = if name == "FULL" { &[1, 4] } else { &[1] };
        for &workers in sizes {
            let dir = scratch.path().join(format!("{sync}{workers}"));
            report::progress(&format!("tasks through a node: {workers} worker(s), synchronous={name}"));
            let mut node = BenchNode::start(&nodus, &worker, &dir, sync, workers, &Setup::standalone()).await?;
            let mut vias = vec![Via::Service];
            if workers == 1 {
                vias.push(Via::Arpcp);
            }
            for via in vias {
                let what = match via {
                    Via::Service => "node, tasks service",
                    Via::Arpcp => "node, arpcp",
                };
                report::progress(&format!("  end to end via {what}"));
                let cpu = cpu_secs(node.pid);
                let (secs, acked) = node.throughput(via, load.tasks, load.submitters).await?;
                let cpu = cpu_secs(node.pid) - cpu;
                rows.push(Figures {
                    what: what.to_string(),
                    sync: name,
                    workers,
                    tasks: load.tasks,
                    secs,
                    latency_us: pct(&acked),
                    node_cpu_us: cpu * 1e6 / load.tasks.max(1) as f64,
                });
            }
            if workers == 1 {
                report::progress("  light load, TASK one at a time");
                let cpu = cpu_secs(node.pid);
                let (secs, rtt) = node.light(load.light).await?;
                let cpu = cpu_secs(node.pid) - cpu;
                rows.push(Figures {
                    what: "node, light load (TASK)".into(),
                    sync: name,
                    workers,
                    tasks: load.light,
                    secs,
                    latency_us: pct(&rtt),
                    node_cpu_us: cpu * 1e6 / load.light.max(1) as f64,
                });
            }
            node.stop().await;
        }
    }
    rows.push(across_nodes(&nodus, &worker, scratch.path(), load).await?);
    print(&rows, json);
    Ok(())
}

/// End to end with one manager and two worker nodes on loopback (`synchronous=FULL`, one app
/// worker process on each worker node): submitted to the manager, run on the workers, recorded
/// in the manager's store.
async fn across_nodes(nodus: &Path, worker: &Path, dir: &Path, load: &TasksLoad) -> anyhow::Result<Figures> {
    report::progress("tasks across nodes: a manager and 2 worker nodes, synchronous=FULL");
    let ports = [child::free_port()?, child::free_port()?, child::free_port()?];
    let timing = "ping_interval_ms = 500\nsilent_after_ms = 2000\ngone_after_ms = 10000\n";
    let manager =
        Setup::member("m", ports[0], &[], &format!("role = \"manager\"\nworkers = [\"w1\", \"w2\"]\n{timing}"));
    let mut m = BenchNode::start(nodus, worker, &dir.join("m"), "full", 1, &manager).await?;
    let mut workers = Vec::new();
    for (i, name) in ["w1", "w2"].into_iter().enumerate() {
        let tasks =
            format!("role = \"worker\"\nmanagers = [\"m\"]\nworker_concurrency = 256\nworker_queue = 1024\n{timing}");
        let setup = Setup::member(name, ports[i + 1], &[ports[0]], &tasks);
        workers.push(BenchNode::start(nodus, worker, &dir.join(name), "full", 1, &setup).await?);
    }
    let paired = async {
        loop {
            let a = m.admin.agents().await?;
            if a.agents.iter().filter(|x| x.state == "active").count() == 2 {
                return anyhow::Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), paired).await.context("the worker nodes did not pair")??;
    let cpu = cpu_secs(m.pid);
    let (secs, acked) = m.throughput(Via::Service, load.tasks, load.submitters).await?;
    let cpu = cpu_secs(m.pid) - cpu;
    for w in workers {
        w.stop().await;
    }
    m.stop().await;
    Ok(Figures {
        what: "3 nodes: manager + 2 workers".into(),
        sync: "FULL",
        workers: 2,
        tasks: load.tasks,
        secs,
        latency_us: pct(&acked),
        node_cpu_us: cpu * 1e6 / load.tasks.max(1) as f64,
    })
}

fn pct(sorted: &[u64]) -> (f64, f64) {
    (percentile(sorted, 0.5) as f64 / 1000.0, percentile(sorted, 0.99) as f64 / 1000.0)
}

fn print(rows: &[Figures], json: bool) {
    let per_sec = |f: &Figures| if f.secs > 0.0 { f.tasks as f64 / f.secs } else { 0.0 };
    if json {
        for f in rows {
            println!(
                "{{\"system\":\"nodus-tasks-node\",\"what\":\"{}\",\"synchronous\":\"{}\",\"workers\":{},\"tasks\":{},\"secs\":{:.3},\
                 \"tasks_per_sec\":{:.1},\"latency_p50_us\":{:.1},\"latency_p99_us\":{:.1},\"node_cpu_us_per_task\":{:.1}}}",
                f.what,
                f.sync,
                f.workers,
                f.tasks,
                f.secs,
                per_sec(f),
                f.latency_us.0,
                f.latency_us.1,
                f.node_cpu_us
            );
        }
        return;
    }
    println!();
    println!(
        "{:<28} {:>6} {:>7} {:>8} {:>10} {:>12} {:>12} {:>12}",
        "through a node", "sync", "workers", "count", "tasks/s", "lat p50", "lat p99", "node cpu/task"
    );
    for f in rows {
        println!(
            "{:<28} {:>6} {:>7} {:>8} {:>10.0} {:>9.0} us {:>9.0} us {:>9.0} us",
            f.what,
            f.sync,
            f.workers,
            f.tasks,
            per_sec(f),
            f.latency_us.0,
            f.latency_us.1,
            f.node_cpu_us
        );
    }
    println!(
        "end to end = first submission until the node recorded every completion (submit -> no-op in a worker process -> \
         completion on disk); lat = submit -> acknowledged (durable), or for light load submit -> result (TASK round trip)"
    );
}
