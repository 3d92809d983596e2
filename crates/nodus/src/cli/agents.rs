//! `nodus agents`: a manager node's agent registry (its worker nodes, their resources and
//! state), `nodus agents ban NAME` and `nodus agents unban NAME`.

use super::Ctx;
use crate::output;
use serde_json::json;

/// `nodus agents` arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: Option<Command>,
}

/// What to do with the registry (nothing: list it).
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Refuse this worker node: it is let go and may not pair again until unbanned.
    Ban {
        /// The agent's server name.
        name: String,
    },
    /// Let a banned worker node pair again.
    Unban {
        /// The agent's server name.
        name: String,
    },
}

/// Runs `nodus agents`.
///
/// Fails when the node cannot be reached or refuses.
pub async fn run(ctx: &Ctx, a: Args) -> anyhow::Result<u8> {
    let admin = ctx.client().await?.admin();
    match a.command {
        Some(Command::Ban { name }) => {
            admin.agent_ban(&name, true).await?;
            output::line(&format!("{name} is banned"));
            return Ok(0);
        }
        Some(Command::Unban { name }) => {
            admin.agent_ban(&name, false).await?;
            output::line(&format!("{name} may pair again"));
            return Ok(0);
        }
        None => {}
    }
    let r = admin.agents().await?;
    if ctx.json {
        output::json(&json!(r));
        return Ok(0);
    }
    match r.role.as_str() {
        "manager" if r.agents.is_empty() => output::line("no agents: no worker node has paired with this manager"),
        "manager" => {
            let rows: Vec<Vec<String>> = r
                .agents
                .iter()
                .map(|a| {
                    vec![
                        a.name.clone(),
                        if a.banned { format!("{} (banned)", a.state) } else { a.state.clone() },
                        a.ip.clone(),
                        a.mac.clone(),
                        a.cores.to_string(),
                        format!("{} MiB", a.memory >> 20),
                        format!("{}+{}", a.concurrency, a.queue),
                        output::time_ms(a.last_seen),
                        a.id.clone(),
                    ]
                })
                .collect();
            output::table(&["NAME", "STATE", "IP", "MAC", "CORES", "MEMORY", "SLOTS", "LAST SEEN", "ID"], &rows);
        }
        "worker" => match r.manager.as_deref() {
            Some(m) if !m.is_empty() => output::line(&format!("this node is a worker; its manager is {m}")),
            _ => output::line("this node is a worker and has no manager yet (see [tasks] managers)"),
        },
        role => output::line(&format!("this node is {role}: it keeps no agent registry ([tasks] role = \"manager\")")),
    }
    Ok(0)
}
