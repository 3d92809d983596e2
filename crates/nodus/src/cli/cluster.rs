//! `nodus cluster status|forget|shutdown`.

use super::Ctx;
use crate::output;
use serde_json::json;

/// `nodus cluster ...`
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Nodes, links (RTT, clock offset, phi), quorum, clock and NTP state as this node sees them.
    Status,
    /// Remove a node from the cluster's memory, on every node.
    Forget {
        /// The node's server name.
        server: String,
    },
    /// Stop every node of the cluster.
    Shutdown,
}

/// Runs `nodus cluster ...`.
///
/// Fails when the node cannot be reached or refuses; `forget` of a node this one does not know
/// is a failure (exit 1).
pub async fn run(ctx: &Ctx, c: Command) -> anyhow::Result<u8> {
    let admin = ctx.client().await?.admin();
    match c {
        Command::Status => {
            let i = admin.cluster_info().await?;
            if ctx.json {
                let nodes: Vec<_> =
                    i.nodes.iter().map(|n| json!({"server": n.server, "addr": n.addr, "live": n.live})).collect();
                let links: Vec<_> = i
                    .links
                    .iter()
                    .map(|l| json!({"peer": l.peer, "rtt_ms": l.rtt_ms, "offset_ms": l.offset_ms, "phi": l.phi}))
                    .collect();
                output::json(&json!({
                    "server": i.server, "up": i.up, "complete": i.complete, "live": i.live, "known": i.known,
                    "quorum": i.quorum, "clock_stable": i.clock_stable, "ntp": i.ntp, "nodes": nodes, "links": links,
                }));
                return Ok(0);
            }
            let up = if i.up { "UP" } else { "DOWN" };
            let complete = if i.complete { "COMPLETE" } else { "INCOMPLETE" };
            let clock = if i.clock_stable { "stable" } else { "UNSTABLE" };
            output::line(&format!(
                "cluster {up} {complete}: {} of {} nodes live (quorum {}), clock {clock} (NTP {}), seen from {}",
                i.live, i.known, i.quorum, i.ntp, i.server
            ));
            output::line("");
            let nodes: Vec<Vec<String>> = i
                .nodes
                .iter()
                .map(|n| vec![n.server.clone(), n.addr.clone(), if n.live { "up" } else { "down" }.to_string()])
                .collect();
            output::table(&["NODE", "ADDRESS", "STATE"], &nodes);
            output::line("");
            if i.links.is_empty() {
                output::line("no links");
            } else {
                let opt = |v: Option<i64>| v.map_or("-".to_string(), |v| v.to_string());
                let links: Vec<Vec<String>> = i
                    .links
                    .iter()
                    .map(|l| vec![l.peer.clone(), opt(l.rtt_ms), opt(l.offset_ms), format!("{:.2}", l.phi)])
                    .collect();
                output::table(&["LINK", "RTT ms", "OFFSET ms", "PHI"], &links);
            }
            Ok(0)
        }
        Command::Forget { server } => {
            let gone = admin.forget(&server).await?;
            if ctx.json {
                output::json(&json!({"ok": true, "forgotten": gone}));
            } else {
                output::line(&format!("forgot node {gone}: every node of the cluster drops it from its memory"));
            }
            Ok(0)
        }
        Command::Shutdown => {
            let via = admin.shutdown_cluster().await?;
            if ctx.json {
                output::json(&json!({"ok": true, "stopping": "cluster", "via": via}));
            } else {
                output::line(&format!("every node of the cluster is stopping (told through node {via})"));
            }
            Ok(0)
        }
    }
}
