//! `nodus status` (the node's state and counters) and `nodus stop` (a graceful stop, waited for).

use super::{ConnArgs, Ctx};
use crate::output;
use nodus_client::State;
use serde_json::json;
use std::time::Duration;

/// `nodus status` arguments.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Keep trying this long for the node to answer (a script that just started `nodus daemon &`).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    wait: Option<Duration>,
}

/// How often `status --wait` tries again.
const RETRY_EVERY: Duration = Duration::from_millis(50);

/// `nodus stop` arguments.
#[derive(clap::Args, Debug)]
pub struct StopArgs {
    /// Return once the node said STOPPING instead of waiting until it has stopped.
    #[arg(long)]
    no_wait: bool,
    /// How long to wait for the node to finish (it waits for requests in flight up to its
    /// `shutdown_grace_secs`).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// Runs `nodus status`.
///
/// Fails when the node cannot be reached or refuses.
pub async fn status(conn: &ConnArgs, a: StatusArgs) -> anyhow::Result<u8> {
    let deadline = tokio::time::Instant::now() + a.wait.unwrap_or_default();
    let (ctx, client) = loop {
        // While the node starts, its socket is missing or refuses connections: look again (the
        // socket in the working directory may appear meanwhile) and retry.
        let ctx = Ctx::new(conn)?;
        match ctx.client().await {
            Ok(c) => break (ctx, c),
            Err(e) if tokio::time::Instant::now() < deadline => tracing::debug!(error = %e, "no node yet"),
            Err(e) => return Err(e),
        }
        tokio::time::sleep(RETRY_EVERY).await;
    };
    let i = client.admin().info().await?;
    if ctx.json {
        output::json(&json!({
            "server": i.server, "version": i.version, "uptime_ms": i.uptime.as_millis() as u64,
            "connections": i.connections, "services": i.services, "instances": i.instances,
            "pending": i.pending, "cached": i.cached, "received": i.received, "delivered": i.delivered,
            "invalid": i.invalid, "expired": i.expired, "undeliverable": i.undeliverable,
            "quitting": i.quitting, "links": i.links, "known_nodes": i.known_nodes, "live_nodes": i.live_nodes,
        }));
        return Ok(0);
    }
    let state = if i.quitting { "shutting down" } else { "running" };
    output::line(&format!(
        "node        {} (nodus {}), {state}, up {}",
        i.server,
        i.version,
        output::duration(i.uptime)
    ));
    output::line(&format!(
        "clients     {} connections, {} services ({} instances)",
        i.connections, i.services, i.instances
    ));
    output::line(&format!("cluster     {} of {} nodes live, {} links", i.live_nodes, i.known_nodes, i.links));
    output::line(&format!(
        "messages    {} received, {} delivered, {} cached now, {} requests awaiting replies",
        i.received, i.delivered, i.cached, i.pending
    ));
    output::line(&format!(
        "problems    {} invalid, {} expired, {} undeliverable",
        i.invalid, i.expired, i.undeliverable
    ));
    Ok(0)
}

/// Runs `nodus stop`: asks the node to stop, says whether it waits for requests in flight, and
/// waits until its connection closes.
///
/// Fails when the node cannot be reached or refuses.
pub async fn stop(ctx: &Ctx, a: StopArgs) -> anyhow::Result<u8> {
    let client = ctx.client().await?;
    let s = client.admin().stop().await?;
    if !ctx.json {
        output::line(&format!("node {} is STOPPING: it finishes what is in flight, then exits", s.server));
        if s.in_flight > 0 {
            output::line(&format!(
                "waiting for {} request{} in flight (at most the node's shutdown_grace_secs)...",
                s.in_flight,
                if s.in_flight == 1 { "" } else { "s" }
            ));
        }
    }
    let stopped = !a.no_wait && client.wait_state(State::Closed, a.timeout).await;
    if ctx.json {
        output::json(&json!({"ok": true, "server": s.server, "in_flight": s.in_flight, "stopped": stopped}));
    } else if stopped {
        output::line(&format!("node {} stopped", s.server));
    } else if !a.no_wait {
        output::line(&format!("node {} is still stopping after {}", s.server, output::duration(a.timeout)));
    }
    Ok(0)
}
