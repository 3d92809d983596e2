//! `nodus sniff`: a live copy of the messages the node routes, filtered by service and command.

use super::Ctx;
use crate::output;
use nodus_wire::node::NodeRequest;
use std::time::Duration;

/// How many sniffed messages may wait for the terminal before further ones are dropped (and
/// counted).
const SNIFF_BUFFER: usize = 65536;

/// `nodus sniff` arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Only messages to or from this service.
    #[arg(long)]
    service: Option<String>,
    /// Only messages with this command.
    #[arg(long)]
    command: Option<String>,
    /// Stop after this many messages.
    #[arg(long)]
    count: Option<u64>,
}

/// Runs `nodus sniff` until `--count` messages were shown or the node goes away.
///
/// Fails when the node cannot be reached or refuses to sniff.
pub async fn run(ctx: &Ctx, a: Args) -> anyhow::Result<u8> {
    let (client, mut incoming) = ctx.connect(ctx.config().incoming_capacity(SNIFF_BUFFER)).await?;
    let mut what = Vec::new();
    if let Some(s) = &a.service {
        what.push(format!("service {s}"));
    }
    if let Some(c) = &a.command {
        what.push(format!("command {c}"));
    }
    let req = NodeRequest::Sniff { service: a.service, command: a.command };
    client.request_with_timeout(req.to_message(), Duration::from_secs(5)).await?;
    let what = if what.is_empty() { "every message".to_string() } else { what.join(", ") };
    output::note(&format!("sniffing {what} on node {} (Ctrl-C to stop)", client.server()));
    let mut seen = 0;
    while let Some(m) = incoming.recv().await {
        if m.command == "QUITTING" && m.from.service == "node" && m.envelope.reply_to == 0 {
            output::note(&format!("node {} is shutting down", m.from.server));
            break;
        }
        output::message(&m, ctx.json);
        seen += 1;
        if a.count.is_some_and(|c| seen >= c) {
            break;
        }
    }
    if incoming.dropped() > 0 {
        output::note(&format!("{} messages were not shown: the output could not keep up", incoming.dropped()));
    }
    Ok(0)
}
