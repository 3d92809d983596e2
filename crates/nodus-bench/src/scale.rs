//! Cluster at scale with real processes: N `nodus daemon` processes on loopback started all
//! together on a random graph (each dials `dials` others), until every node reports every node
//! live; then idle traffic per link; then kill -9 of the busiest hub until every other node
//! reports it gone.
//!
//! Figures come from outside the daemons: `INFO` on each node's Unix socket (live and known
//! nodes, links), the kernel's count of bytes each daemon wrote (`/proc/PID/io` `wchar`, minus
//! the answers to this program's own polls), and the failure detector's warning in each daemon's
//! log (a link declared dead while both processes ran is a false death).

use crate::child::{self, Child};
use crate::report;
use anyhow::{bail, Context};
use nodus_client::{Client, ClientConfig};
use nodus_wire::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// How often every node is asked for its view while waiting for one.
const POLL_EVERY: Duration = Duration::from_millis(50);
/// The line a daemon logs when its failure detector declares a link dead.
const DEATH_LINE: &str = "declaring it dead";
/// How long each phase may take before the run gives up on it.
const PHASE_LIMIT: Duration = Duration::from_secs(120);
/// Polls continue this long after the crash was seen everywhere (a late dip still counts).
const AFTER_CRASH: Duration = Duration::from_secs(2);
/// One `INFO` answer takes at most this long.
const INFO_TIMEOUT: Duration = Duration::from_secs(10);

/// What to start and how.
#[derive(Debug, Clone)]
pub struct ScaleLoad {
    /// Daemons.
    pub nodes: usize,
    /// Each dials this many distinct others.
    pub dials: usize,
    /// Links' heartbeat period, ms.
    pub heartbeat_ms: u64,
    /// Seeds the graph.
    pub seed: u64,
    /// Length of the idle measurement, seconds.
    pub idle_secs: u64,
}

/// What one run measured.
#[derive(Debug, Clone, Default)]
pub struct ScaleFigures {
    /// Daemons.
    pub nodes: usize,
    /// From the first spawn until every node reports every node live.
    pub converge: Option<Duration>,
    /// Bytes all daemons wrote until then (their answers to the polls taken out), per node.
    pub start_bytes_per_node: f64,
    /// Links declared dead by a failure detector before the hub was killed.
    pub false_deaths_start: usize,
    /// Idle bytes per link per second (both directions together).
    pub idle_bytes_per_link: f64,
    /// Links the killed hub had.
    pub hub_links: u64,
    /// From kill -9 of the hub until every other node reports it gone.
    pub crash_seen: Option<Duration>,
    /// Links declared dead by a failure detector after the kill (none had a reason to).
    pub false_deaths_crash: usize,
    /// The fewest live nodes any node reported after the kill (the truth: `nodes - 1`).
    pub min_live_after_crash: u64,
    /// The 1-minute load average when the run ended.
    pub load: String,
}

struct Node {
    name: String,
    daemon: Option<Child>,
    pid: Option<u32>,
    socket: PathBuf,
    log: PathBuf,
    client: Option<Client>,
}

/// Runs the measurement once in `dir`.
///
/// Fails when a daemon cannot be started or answered nothing, or a phase takes longer than
/// [`PHASE_LIMIT`].
pub async fn run(nodus: &Path, dir: &Path, load: &ScaleLoad) -> anyhow::Result<ScaleFigures> {
    let n = load.nodes;
    if n < 2 {
        bail!("--nodes must be at least 2");
    }
    let mut rng = StdRng::seed_from_u64(load.seed);
    let ports = listen_ports(n, &mut rng)?;
    let mut nodes = Vec::with_capacity(n);
    let mut spawns = Vec::with_capacity(n);
    for (i, port) in ports.iter().enumerate() {
        let mut targets = BTreeSet::new();
        while targets.len() < load.dials.min(n - 1) {
            let t = rng.gen_range(0..n);
            if t != i {
                targets.insert(t);
            }
        }
        let name = format!("n{i}");
        let data = dir.join(&name);
        std::fs::create_dir_all(&data).with_context(|| format!("cannot create {}", data.display()))?;
        let socket = data.join("n.sock");
        let neighbors: Vec<String> = targets.iter().map(|t| format!("\"127.0.0.1:{}\"", ports[*t])).collect();
        let config = format!(
            "server_name = \"{name}\"\ndata_dir = {data:?}\nunix_socket = {socket:?}\ntcp_listen = \"\"\n\
             [cluster]\nlisten = \"127.0.0.1:{port}\"\nneighbors = [{}]\nsecret = \"bench-scale\"\n\
             heartbeat_ms = {}\nudp_listen = \"\"\n[apps]\nenabled = false\n[http]\nlisten = \"\"\n",
            neighbors.join(","),
            load.heartbeat_ms,
        );
        let file = data.join("nodus.toml");
        std::fs::write(&file, config).with_context(|| format!("cannot write {}", file.display()))?;
        let log = dir.join(format!("{name}.log"));
        let mut command = tokio::process::Command::new(nodus);
        command.arg("daemon").arg("--config").arg(&file);
        spawns.push((name.clone(), command, log.clone()));
        nodes.push(Node { name, daemon: None, pid: None, socket, log, client: None });
    }
    // All together: nothing else happens between the spawns.
    let started = Instant::now();
    for (node, (name, command, log)) in nodes.iter_mut().zip(spawns) {
        let d = Child::spawn(&format!("nodus daemon {name}"), command, log, false)?;
        node.pid = d.id();
        node.daemon = Some(d);
    }
    let mut f = ScaleFigures { nodes: n, ..ScaleFigures::default() };
    connect_all(&mut nodes).await?;
    let io_start: u64 = nodes.iter().map(|n| wchar(n.pid)).sum();
    let mut polled_bytes = 0u64;
    let mut last = Vec::new();
    loop {
        let (views, bytes) = poll(&nodes).await?;
        polled_bytes += bytes;
        if views.iter().all(|v| v.map(|(live, known, _)| (live, known)) == Some((n as u64, n as u64))) {
            f.converge = Some(started.elapsed());
            last = views;
            break;
        }
        if started.elapsed() > PHASE_LIMIT {
            let behind = views.iter().filter(|v| v.map(|v| v.0) != Some(n as u64)).count();
            report::progress(&format!("{n} nodes: {behind} still did not see every node after {PHASE_LIMIT:?}"));
            break;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
    let io_now: u64 = nodes.iter().map(|n| wchar(n.pid)).sum();
    f.start_bytes_per_node = io_now.saturating_sub(io_start).saturating_sub(polled_bytes) as f64 / n as f64;
    f.false_deaths_start = deaths(&nodes);
    if f.converge.is_none() {
        f.load = load_average();
        stop(nodes).await;
        return Ok(f);
    }
    // Idle: nobody asks anything for a while.
    let links: u64 = last.iter().map(|v| v.map_or(0, |v| v.2)).sum::<u64>() / 2;
    let before: u64 = nodes.iter().map(|n| wchar(n.pid)).sum();
    tokio::time::sleep(Duration::from_secs(load.idle_secs)).await;
    let after: u64 = nodes.iter().map(|n| wchar(n.pid)).sum();
    f.idle_bytes_per_link = (after - before) as f64 / links.max(1) as f64 / load.idle_secs.max(1) as f64;
    // kill -9 of the busiest hub.
    let (views, _) = poll(&nodes).await?;
    let hub = (0..n).max_by_key(|&i| (views[i].map_or(0, |v| v.2), std::cmp::Reverse(i))).unwrap_or(0);
    f.hub_links = views[hub].map_or(0, |v| v.2);
    let deaths_before = deaths(&nodes);
    let killed = Instant::now();
    if let Some(d) = nodes[hub].daemon.take() {
        d.stop().await;
    }
    nodes[hub].client = None;
    let alive = n as u64 - 1;
    f.min_live_after_crash = alive;
    let mut seen_until = None;
    loop {
        let (views, _) = poll(&nodes).await?;
        for v in views.iter().flatten() {
            f.min_live_after_crash = f.min_live_after_crash.min(v.0);
        }
        let everyone =
            views.iter().enumerate().all(|(i, v)| i == hub || v.map(|v| (v.0, v.1)) == Some((alive, n as u64)));
        if everyone && f.crash_seen.is_none() {
            f.crash_seen = Some(killed.elapsed());
            seen_until = Some(Instant::now() + AFTER_CRASH);
        }
        if seen_until.is_some_and(|t| Instant::now() >= t) || killed.elapsed() > PHASE_LIMIT {
            break;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
    f.false_deaths_crash = deaths(&nodes) - deaths_before;
    f.load = load_average();
    stop(nodes).await;
    Ok(f)
}

/// `n` distinct free ports below the kernel's ephemeral range: a hundred daemons dialling each
/// other use many ephemeral ports, and one taken by an outgoing connection between the check and
/// the daemon's bind would fail the run.
fn listen_ports(n: usize, rng: &mut StdRng) -> anyhow::Result<Vec<u16>> {
    let mut ports = BTreeSet::new();
    let mut tries = 0;
    while ports.len() < n {
        tries += 1;
        if tries > 100 * n {
            bail!("cannot find {n} free ports in 20000..32000");
        }
        let port = rng.gen_range(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.insert(port);
        }
    }
    let mut ports: Vec<u16> = ports.into_iter().collect();
    // The graph is drawn from the same generator; the order of ports does not matter.
    ports.sort_unstable();
    Ok(ports)
}

/// Connects a client to every node, waiting for each to listen.
async fn connect_all(nodes: &mut [Node]) -> anyhow::Result<()> {
    let deadline = Instant::now() + PHASE_LIMIT;
    for node in nodes.iter_mut() {
        let endpoint = format!("unix:{}", node.socket.display());
        let daemon = node.daemon.as_mut().context("not started")?;
        let probe = || async {
            let config = ClientConfig::new(endpoint.as_str()).no_reconnect();
            Client::connect(config).await.with_context(|| format!("{endpoint} does not answer"))
        };
        let (client, mut incoming) = child::retry_until(deadline, || daemon.check_running(), probe).await?;
        // Nothing is expected besides answers; whatever else comes is dropped.
        tokio::spawn(async move { while incoming.recv().await.is_some() {} });
        node.client = Some(client);
    }
    Ok(())
}

/// Every running node's (live, known, links), and the bytes of their answers on the wire.
async fn poll(nodes: &[Node]) -> anyhow::Result<(Vec<Option<(u64, u64, u64)>>, u64)> {
    let mut set = JoinSet::new();
    for (i, node) in nodes.iter().enumerate() {
        let Some(client) = node.client.clone() else { continue };
        set.spawn(async move { (i, client.request_with_timeout(Message::new("INFO"), INFO_TIMEOUT).await) });
    }
    let mut views = vec![None; nodes.len()];
    let mut bytes = 0;
    while let Some(done) = set.join_next().await {
        let (i, reply) = done.context("a poll task failed")?;
        let m = reply.with_context(|| format!("{} did not answer INFO", nodes[i].name))?;
        bytes += nodus_wire::binary::encoded_len(&m) as u64;
        let num = |k: &str| m.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        views[i] = Some((num("live_nodes"), num("known_nodes"), num("links")));
    }
    Ok((views, bytes))
}

/// Links declared dead by the failure detectors, from the daemons' logs.
fn deaths(nodes: &[Node]) -> usize {
    nodes.iter().map(|n| std::fs::read_to_string(&n.log).unwrap_or_default().matches(DEATH_LINE).count()).sum()
}

/// Bytes process `pid` has written (all kinds of files and sockets).
fn wchar(pid: Option<u32>) -> u64 {
    let Some(pid) = pid else { return 0 };
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    io.lines().find_map(|l| l.strip_prefix("wchar:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().next().unwrap_or("?").to_string()
}

async fn stop(nodes: Vec<Node>) {
    let mut set = JoinSet::new();
    for node in nodes {
        if let Some(d) = node.daemon {
            set.spawn(d.stop());
        }
    }
    while set.join_next().await.is_some() {}
}

/// The median of each figure over several runs (a phase that did not finish counts as longest).
pub fn median(runs: &[ScaleFigures]) -> ScaleFigures {
    fn mid<T: Clone + PartialOrd>(mut v: Vec<T>) -> T {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        v[v.len() / 2].clone()
    }
    let dur = |d: Option<Duration>| d.unwrap_or(Duration::MAX);
    let opt = |d: Duration| (d != Duration::MAX).then_some(d);
    ScaleFigures {
        nodes: runs[0].nodes,
        converge: opt(mid(runs.iter().map(|r| dur(r.converge)).collect())),
        start_bytes_per_node: mid(runs.iter().map(|r| r.start_bytes_per_node).collect()),
        false_deaths_start: mid(runs.iter().map(|r| r.false_deaths_start).collect()),
        idle_bytes_per_link: mid(runs.iter().map(|r| r.idle_bytes_per_link).collect()),
        hub_links: mid(runs.iter().map(|r| r.hub_links).collect()),
        crash_seen: opt(mid(runs.iter().map(|r| dur(r.crash_seen)).collect())),
        false_deaths_crash: mid(runs.iter().map(|r| r.false_deaths_crash).collect()),
        min_live_after_crash: mid(runs.iter().map(|r| r.min_live_after_crash).collect()),
        load: runs.last().map(|r| r.load.clone()).unwrap_or_default(),
    }
}

/// Measures every size `runs` times (with `before` first when given) and prints a row of
/// medians for each.
///
/// Fails when a run fails (a daemon cannot start or stops answering).
pub async fn table(
    options: &crate::Options,
    sizes: &[usize],
    runs: usize,
    load: &ScaleLoad,
    before: Option<PathBuf>,
) -> anyhow::Result<()> {
    let after = crate::nodus_system::nodus_binary(options.nodus.clone())?;
    let mut binaries = Vec::new();
    let label = if before.is_some() { "after" } else { "nodus" };
    if let Some(b) = before {
        binaries.push(("before", b));
    }
    binaries.push((label, after));
    if !options.json {
        report::scale_header(load.dials, load.heartbeat_ms, runs);
    }
    for &n in sizes {
        for (label, nodus) in &binaries {
            let mut figures = Vec::with_capacity(runs);
            for run_no in 0..runs {
                report::progress(&format!("{label}: {n} nodes, run {}/{runs}", run_no + 1));
                let scratch = child::ScratchDir::create()?;
                let this = ScaleLoad { nodes: n, seed: load.seed + run_no as u64, ..load.clone() };
                figures.push(run(nodus, scratch.path(), &this).await?);
            }
            let m = median(&figures);
            if options.json {
                report::scale_json(label, &m);
            } else {
                report::scale_row(label, &m);
            }
        }
    }
    Ok(())
}
