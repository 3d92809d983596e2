//! Simulated cluster figures: the daemon's own routers on the deterministic simulated network
//! (`nodus_daemon::router::sim`), started together on a random graph, left idle, then the busiest
//! hub killed. Runs in this process on a virtual clock; the wall time is only how long it took.

use crate::report;
use nodus_daemon::router::sim::{figures, Cost, Figures, SimConfig};
use std::time::Duration;

/// How the simulated nodes and network behave.
#[derive(Debug, Clone)]
pub struct SimLoad {
    /// Cluster sizes, one row each.
    pub nodes: Vec<usize>,
    /// Seeds the run.
    pub seed: u64,
    /// Links' heartbeat period, ms.
    pub heartbeat_ms: u64,
    /// Each node dials this many others.
    pub dials: usize,
    /// Multiplies every CPU cost (N processes on 2 cores: about N/2).
    pub slowdown: f64,
    /// Probability that a segment is lost once and retransmitted 200 ms later.
    pub loss: f64,
    /// Heartbeats wait behind everything else (as without the driver's heartbeat lane).
    pub no_lane: bool,
    /// Virtual time each phase may take, seconds.
    pub limit_secs: u64,
}

/// Runs one simulated cluster per size and prints a row for each.
///
/// Fails never; a phase that does not finish in time prints `-`.
pub fn run(load: &SimLoad, json: bool) -> anyhow::Result<()> {
    if !json {
        report::sim_header(load.heartbeat_ms, load.dials, load.slowdown, load.loss, !load.no_lane);
    }
    for &n in &load.nodes {
        report::progress(&format!("simulating {n} nodes"));
        let mut config = SimConfig::new(n, load.seed);
        config.heartbeat = Duration::from_millis(load.heartbeat_ms);
        config.dials = load.dials;
        config.loss = load.loss;
        config.heartbeat_lane = !load.no_lane;
        config.cost = Cost { slowdown: load.slowdown, ..Cost::default() };
        let started = tokio::time::Instant::now();
        let f: Figures = figures(config, load.limit_secs as i64 * 1_000_000);
        let wall = started.elapsed();
        if json {
            report::sim_json(&f, wall);
        } else {
            report::sim_row(&f, wall);
        }
    }
    Ok(())
}
