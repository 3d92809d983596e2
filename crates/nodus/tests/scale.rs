//! The cluster at scale with real processes: 30 daemons started all together on a random graph
//! (each dials two others) converge with no false deaths; kill -9 of the busiest hub is seen by
//! every other node, and no node ever reports fewer live nodes than are running.
// These tests drive real processes and wait on the wall clock with std::thread::sleep.
#![allow(clippy::disallowed_methods)]

mod common;

use common::*;
use nodus_client::{Client, ClientConfig};
use nodus_wire::Message;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Nodes started together.
const NODES: usize = 30;
/// How long convergence and the crash's detection may take here (CI machines are slow and
/// shared; the benchmark measures the real figures).
const BOUND: Duration = Duration::from_secs(20);
/// The failure detector's warning when it declares a link dead.
const DEATH_LINE: &str = "declaring it dead";

struct Node {
    name: String,
    socket: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A small deterministic generator for the graph (xorshift).
fn graph(n: usize, dials: usize, mut seed: u64) -> Vec<Vec<usize>> {
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    (0..n)
        .map(|i| {
            let mut targets = Vec::new();
            while targets.len() < dials {
                let t = (next() % n as u64) as usize;
                if t != i && !targets.contains(&t) {
                    targets.push(t);
                }
            }
            targets
        })
        .collect()
}

fn deaths(nodes: &[Node]) -> usize {
    nodes.iter().map(|n| std::fs::read_to_string(&n.log).unwrap_or_default().matches(DEATH_LINE).count()).sum()
}

/// Every node's (live, known, links); `None` for a stopped node.
async fn views(clients: &[Option<Client>]) -> Vec<Option<(usize, usize, usize)>> {
    let mut out = Vec::new();
    for c in clients {
        let Some(c) = c else {
            out.push(None);
            continue;
        };
        let m = c.request_with_timeout(Message::new("INFO"), WAIT).await.expect("INFO answered");
        let num = |k: &str| m.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
        out.push(Some((num("live_nodes"), num("known_nodes"), num("links"))));
    }
    out
}

#[test]
fn thirty_nodes_started_together_converge_without_false_deaths_and_see_a_hub_die() {
    let root = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..NODES).map(|_| free_port()).collect();
    let plan = graph(NODES, 2, 0x5eed);
    let mut nodes = Vec::new();
    for (i, targets) in plan.iter().enumerate() {
        let name = format!("n{i}");
        let dir = root.path().join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("n.sock");
        let neighbors: Vec<String> = targets.iter().map(|t| format!("\"127.0.0.1:{}\"", ports[*t])).collect();
        let config = format!(
            "server_name = \"{name}\"\ndata_dir = {:?}\nunix_socket = {socket:?}\ntcp_listen = \"\"\n\
             [cluster]\nlisten = \"127.0.0.1:{}\"\nneighbors = [{}]\nsecret = \"scale-test\"\n\
             heartbeat_ms = 100\nudp_listen = \"\"\n[apps]\nenabled = false\n[http]\nlisten = \"\"\n",
            dir.join("data"),
            ports[i],
            neighbors.join(","),
        );
        let file = dir.join("nodus.toml");
        std::fs::write(&file, config).unwrap();
        let log = dir.join("log");
        nodes.push(Node { name, socket, log, child: None });
        let _ = file;
    }
    // All together: spawn every process before waiting for any.
    let started = Instant::now();
    for node in nodes.iter_mut() {
        let file = node.socket.with_file_name("nodus.toml");
        let log = std::fs::File::create(&node.log).unwrap();
        let child = Command::new(NODUS)
            .arg("daemon")
            .arg("--config")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        node.child = Some(child);
    }
    rt().block_on(async {
        let mut clients = Vec::new();
        for node in &nodes {
            // Thirty debug daemons start at once on two cores: give each twice a node's wait.
            let deadline = Instant::now() + 2 * WAIT;
            let client = loop {
                let config = ClientConfig::new(format!("unix:{}", node.socket.display())).no_reconnect();
                match Client::connect(config).await {
                    Ok((c, mut incoming)) => {
                        tokio::spawn(async move { while incoming.recv().await.is_some() {} });
                        break c;
                    }
                    Err(e) => assert!(Instant::now() < deadline, "{} did not start: {e}", node.name),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            clients.push(Some(client));
        }
        // Convergence: every node sees every node.
        let last = loop {
            let v = views(&clients).await;
            if v.iter().all(|v| v.map(|v| (v.0, v.1)) == Some((NODES, NODES))) {
                break v;
            }
            assert!(started.elapsed() < BOUND, "not converged after {BOUND:?}: {v:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let converged = started.elapsed();
        assert_eq!(deaths(&nodes), 0, "false deaths while starting");
        // kill -9 of the busiest hub.
        let hub = (0..NODES).max_by_key(|&i| (last[i].map_or(0, |v| v.2), std::cmp::Reverse(i))).unwrap();
        let mut c = nodes[hub].child.take().unwrap();
        let killed = Instant::now();
        c.kill().unwrap();
        c.wait().unwrap();
        clients[hub] = None;
        let mut fewest = NODES - 1;
        loop {
            let v = views(&clients).await;
            fewest = fewest.min(v.iter().flatten().map(|v| v.0).min().unwrap_or(NODES));
            if v.iter().flatten().all(|v| (v.0, v.1) == (NODES - 1, NODES)) {
                break;
            }
            assert!(killed.elapsed() < BOUND, "the crash not seen everywhere after {BOUND:?}: {v:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seen = killed.elapsed();
        // A little longer: a late dip would still count.
        tokio::time::sleep(Duration::from_millis(500)).await;
        for v in views(&clients).await.iter().flatten() {
            fewest = fewest.min(v.0);
        }
        assert_eq!(fewest, NODES - 1, "a node reported fewer live nodes than are running");
        assert_eq!(deaths(&nodes), 0, "false deaths after the crash (the hub's links closed, none went silent)");
        eprintln!("{NODES} nodes: converged in {converged:?}, hub ({hub}) crash seen everywhere in {seen:?}");
    });
}
