//! `nodus tree`, `nodus monitor` and `nodus kill`: the control plane (seed 000) over the nodes'
//! built-in `control` service.
//!
//! - `tree [ID]` draws the components of the cluster (node, services, apps, workers, and what
//!   they started) by who started whom; `--local` lists this node's only.
//! - `monitor [ID | --all]` asks each component `monitoring` and shows a table that refreshes in
//!   place (`--json`: once, as JSON); a component that does not answer in time shows as such.
//! - `kill ID` kills a component and what it started (needs `admin`).

use super::{Ctx, Failure};
use crate::output;
use anyhow::Context as _;
use nodus_client::control::{Killed, Monitored};
use nodus_client::Client;
use nodus_control::listing::{self, ComponentRow};
use nodus_control::ComponentId;
use serde_json::json;
use std::time::Duration;

/// `nodus tree` arguments.
#[derive(clap::Args, Debug)]
pub struct TreeArgs {
    /// Only this component and what it started.
    id: Option<String>,
    /// Only the components of the node talked to (default: every live node).
    #[arg(long)]
    local: bool,
}

/// `nodus monitor` arguments.
#[derive(clap::Args, Debug)]
pub struct MonitorArgs {
    /// The component to monitor (default with --all: every component of the cluster).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    id: Option<String>,
    /// Monitor every component of the cluster.
    #[arg(long)]
    all: bool,
    /// How long each component has to answer.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Time between two rounds.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Stop after this many rounds (default: until Ctrl-C; with --json: 1).
    #[arg(long)]
    count: Option<u64>,
}

/// `nodus kill` arguments.
#[derive(clap::Args, Debug)]
pub struct KillArgs {
    /// The component to kill (`nodus tree` shows ids).
    id: String,
    /// How long the kill may take (what the component started is killed first).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

fn parse_id(id: &str) -> anyhow::Result<ComponentId> {
    id.parse::<ComponentId>().map_err(|e| anyhow::anyhow!("{e} (`nodus tree` shows the ids)"))
}

/// The cluster's components (or only this node's).
async fn rows(client: &Client, cluster: bool) -> anyhow::Result<Vec<ComponentRow>> {
    let listing = client.tree(cluster).await.context("cannot list the components")?;
    if !listing.missing.is_empty() {
        output::note(&format!("no answer from node(s) {}: their components are not shown", listing.missing.join(", ")));
    }
    Ok(listing.rows)
}

/// `nodus tree`.
///
/// Fails when the node cannot be reached, or the component is unknown.
pub async fn tree(ctx: &Ctx, a: TreeArgs) -> anyhow::Result<u8> {
    let client = ctx.client().await?;
    let all = rows(&client, !a.local).await?;
    if let Some(id) = &a.id {
        parse_id(id)?;
        if !all.iter().any(|r| &r.id == id) {
            anyhow::bail!(Failure(format!("no component {id} in the cluster")));
        }
    }
    let listed = listing::forest(&all, a.id.as_deref());
    if ctx.json {
        let rows: Vec<serde_json::Value> = listed
            .iter()
            .map(|(depth, r)| {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                v["depth"] = json!(depth);
                v
            })
            .collect();
        output::json(&json!({"ok": true, "count": rows.len(), "components": rows}));
    } else {
        output::raw(listing::draw(&all, a.id.as_deref()).as_bytes());
    }
    Ok(0)
}

/// One component's monitoring outcome, for the table and JSON.
struct Outcome {
    row: ComponentRow,
    answer: Result<Monitored, String>,
}

impl Outcome {
    fn answered(&self) -> bool {
        matches!(self.answer, Ok(Monitored::Answered { .. }))
    }

    fn json(&self) -> serde_json::Value {
        let r = &self.row;
        let mut v = json!({"id": r.id, "kind": r.kind, "name": r.name, "node": r.node});
        match &self.answer {
            Ok(Monitored::Answered { result, creator, tag, latency }) => {
                v["answered"] = json!(true);
                v["result"] = json!({
                    "sync_time": result.sync_time,
                    "name": result.name,
                    "host": result.host,
                    "is_running": result.is_running,
                    "message": result.message,
                });
                v["creator"] = json!(creator);
                v["tag"] = json!(tag);
                v["latency_ms"] = json!(latency.as_millis() as u64);
            }
            Ok(Monitored::Failed { code, message }) => {
                v["answered"] = json!(false);
                v["code"] = json!(code);
                v["message"] = json!(message);
            }
            Err(e) => {
                v["answered"] = json!(false);
                v["code"] = json!("error");
                v["message"] = json!(e);
            }
        }
        v
    }

    fn cells(&self) -> Vec<String> {
        let r = &self.row;
        let mut cells = vec![r.id.clone(), r.kind.clone(), r.name.clone(), r.node.clone()];
        match &self.answer {
            Ok(Monitored::Answered { result, latency, .. }) => cells.extend([
                result.host.clone(),
                if result.is_running { "yes" } else { "no" }.to_string(),
                format!("{} ms", latency.as_millis()),
                result.message.clone(),
            ]),
            Ok(Monitored::Failed { code, message }) => {
                cells.extend(["-".into(), "-".into(), "-".into(), format!("{code}: {message}")])
            }
            Err(e) => cells.extend(["-".into(), "-".into(), "-".into(), format!("error: {e}")]),
        }
        cells
    }
}

/// Monitors every row at once.
async fn round(client: &Client, rows: Vec<ComponentRow>, timeout: Duration) -> Vec<Outcome> {
    let mut asks = tokio::task::JoinSet::new();
    for (i, row) in rows.into_iter().enumerate() {
        let client = client.clone();
        asks.spawn(async move {
            let answer = match row.id.parse::<ComponentId>() {
                Ok(id) => client.monitor(&row.node, id, timeout).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            (i, Outcome { row, answer })
        });
    }
    let mut out: Vec<(usize, Outcome)> = Vec::new();
    while let Some(Ok(o)) = asks.join_next().await {
        out.push(o);
    }
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, o)| o).collect()
}

/// `nodus monitor`.
///
/// Fails when the node cannot be reached or the component is unknown; with one component, exit
/// status 1 when it did not answer.
pub async fn monitor(ctx: &Ctx, a: MonitorArgs) -> anyhow::Result<u8> {
    use std::io::IsTerminal;
    let client = ctx.client().await?;
    let count = a.count.unwrap_or(if ctx.json { 1 } else { u64::MAX });
    let terminal = std::io::stdout().is_terminal();
    let mut n = 0u64;
    let mut last_ok = true;
    while n < count {
        if n > 0 {
            tokio::time::sleep(a.interval).await;
        }
        n += 1;
        let all = rows(&client, true).await?;
        let targets: Vec<ComponentRow> = match &a.id {
            Some(id) => {
                let wanted = parse_id(id)?.to_string();
                let found: Vec<ComponentRow> = all.into_iter().filter(|r| r.id == wanted).collect();
                if found.is_empty() {
                    anyhow::bail!(Failure(format!("no component {wanted} in the cluster (`nodus tree` lists them)")));
                }
                found
            }
            None => listing::forest(&all, None).into_iter().map(|(_, r)| r).collect(),
        };
        let outcomes = round(&client, targets, a.timeout).await;
        last_ok = outcomes.iter().all(Outcome::answered);
        if ctx.json {
            let list: Vec<serde_json::Value> = outcomes.iter().map(Outcome::json).collect();
            output::json(&json!({"ok": true, "count": list.len(), "components": list}));
            continue;
        }
        if terminal {
            // Back to the top and clear: the table refreshes in place.
            output::raw(b"\x1b[H\x1b[2J");
        } else if n > 1 {
            output::line("");
        }
        let answered = outcomes.iter().filter(|o| o.answered()).count();
        output::line(&format!(
            "{answered} of {} component(s) answered (timeout {}), every {}",
            outcomes.len(),
            output::duration(a.timeout),
            output::duration(a.interval)
        ));
        let cells: Vec<Vec<String>> = outcomes.iter().map(Outcome::cells).collect();
        output::table(&["ID", "KIND", "NAME", "NODE", "HOST", "RUNNING", "LATENCY", "MESSAGE"], &cells);
    }
    Ok(if a.id.is_some() && !last_ok { 1 } else { 0 })
}

/// `nodus kill`.
///
/// Fails when the node cannot be reached or refuses (unknown component, not allowed).
pub async fn kill(ctx: &Ctx, a: KillArgs) -> anyhow::Result<u8> {
    let client = ctx.client().await?;
    let id = parse_id(&a.id)?;
    let all = rows(&client, true).await?;
    let Some(row) = all.iter().find(|r| r.id == id.to_string()) else {
        anyhow::bail!(Failure(format!("no component {id} in the cluster (`nodus tree` lists them)")));
    };
    match client.kill(&row.node, id, a.timeout).await? {
        Killed::Done { stopped, unanswered } => {
            let unanswered: Vec<String> = unanswered.iter().map(ToString::to_string).collect();
            if ctx.json {
                output::json(&json!({
                    "ok": true, "id": row.id, "kind": row.kind, "name": row.name, "node": row.node,
                    "stopped": stopped, "unanswered": unanswered,
                }));
            } else {
                let how = if stopped { "stopped" } else { "did not confirm its stop in time" };
                output::line(&format!("killed {} {} [{}] on {}: {how}", row.kind, row.name, row.id, row.node));
                if !unanswered.is_empty() {
                    output::note(&format!("components it started that did not report back: {}", unanswered.join(", ")));
                }
            }
            Ok(0)
        }
        Killed::Refused { code, message } => Err(Failure(format!("{code}: {message}")).into()),
    }
}
