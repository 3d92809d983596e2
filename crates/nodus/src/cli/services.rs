//! `nodus services`: the services registered on the node, or (`--cluster`) on every live node.

use super::Ctx;
use crate::output;
use serde_json::json;

/// `nodus services` arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Every live node's services, as `server:service`.
    #[arg(long)]
    cluster: bool,
}

/// Runs `nodus services`.
///
/// Fails when the node cannot be reached or refuses.
pub async fn run(ctx: &Ctx, a: Args) -> anyhow::Result<u8> {
    let admin = ctx.client().await?.admin();
    if a.cluster {
        let rows = admin.cluster_services().await?;
        if ctx.json {
            let v: Vec<_> = rows.iter().map(|r| json!({"server": r.server, "service": r.service})).collect();
            output::json(&json!(v));
        } else if rows.is_empty() {
            output::line("no services registered in the cluster");
        } else {
            let rows: Vec<Vec<String>> = rows.into_iter().map(|r| vec![r.server, r.service]).collect();
            output::table(&["SERVER", "SERVICE"], &rows);
        }
        return Ok(0);
    }
    let rows = admin.services().await?;
    if ctx.json {
        let v: Vec<_> = rows.iter().map(|r| json!({"service": r.name, "instances": r.instances})).collect();
        output::json(&json!(v));
    } else if rows.is_empty() {
        output::line("no services registered");
    } else {
        let rows: Vec<Vec<String>> = rows.into_iter().map(|r| vec![r.name, r.instances.to_string()]).collect();
        output::table(&["SERVICE", "INSTANCES"], &rows);
    }
    Ok(0)
}
