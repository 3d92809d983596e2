//! `nodus send`: one message, and an exit status that says what the nodes did with it.
//!
//! The node reports what it could not do, never what it did: a refusal (`SERVICE_UNAVAILABLE`,
//! `UNKNOWN`, `QUITTING`, `ERROR`), a `TRANSMISSION_REPORT status=cached|failed` when the message
//! asks for one, and nothing for a delivery. So the message goes out with an `_id` (so that reports
//! from any node find their way back) and `transmission_report=failure` (unless it sets its own),
//! followed by a `PING` to every node it may reach. A node handles one connection's messages in
//! order, and a link carries them in order, so once a node's `PONG` is back every report that
//! node had about the message has arrived. Then:
//! - to one service (`service`, `server:service`): exit 0 when delivered or cached, 1 when a node
//!   refused or dropped it (`cache=no`);
//! - a broadcast (`*:service`, `?:service`): exit 0 when at least one node delivered it, 1 when
//!   every node refused it;
//! - over UDP (`--udp`): one datagram, no verdict (exit 0 once sent).

use super::{Ctx, Failure};
use crate::output;
use anyhow::{bail, Context};
use nodus_client::{Client, Incoming, Refusal, RefusalKind};
use nodus_wire::node::NodeRequest;
use nodus_wire::{text, Message};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

/// `nodus send` arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The message in communicatord's text form: `[server:]service/COMMAND name=value;...`.
    message: String,
    /// How long to wait for the nodes' verdict (e.g. 500ms, 5s, 1m).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Send one datagram to the node's UDP signal port instead (no verdict: exit 0 once sent).
    #[arg(long)]
    udp: bool,
    /// The UDP signal port [default: 127.0.0.1:4041, or 4041+10N with --instance N].
    #[arg(long)]
    udp_addr: Option<String>,
    /// `secret_code` for the UDP signal port.
    #[arg(long, env = "NODUS_UDP_SECRET", hide_env_values = true)]
    secret: Option<String>,
}

/// What one node did with the message.
#[derive(Debug, Default)]
struct NodeVerdict {
    /// The node's refusal, if any (the most telling one when there are several).
    refused: Option<Refusal>,
    /// It cached the message for an expected service.
    cached: bool,
    /// A service already answered (so it was delivered).
    answered: bool,
    /// The node did not answer the barrier in time: nothing is known.
    silent: bool,
}

/// Runs `nodus send`.
///
/// Fails when the message does not parse or the node cannot be reached; a refusal is a
/// [`Failure`] (exit 1).
pub async fn run(ctx: &Ctx, a: Args) -> anyhow::Result<u8> {
    let mut msg = text::from_line(&a.message).with_context(|| format!("cannot parse {:?}", a.message))?;
    if a.udp {
        let step = ctx.instance.unwrap_or(0).saturating_mul(super::INSTANCE_PORT_STEP);
        let addr = a.udp_addr.unwrap_or_else(|| format!("127.0.0.1:{}", 4041u16.saturating_add(step)));
        return send_udp(&addr, msg, a.secret).await;
    }
    let (client, mut incoming) = ctx.connect(ctx.config()).await?;
    let own = client.server();
    let dest = msg.to.server.clone();
    let broadcast = matches!(dest.as_str(), "*" | "?");
    let to_node = matches!(msg.to.service.as_str(), "" | "node" | "communicatord" | "*" | ".");
    // The nodes whose verdict counts.
    let targets: Vec<String> = match dest.as_str() {
        "" if to_node => vec![own.clone()],
        // The node delivers locally, else forwards to the nearest node that has the service.
        "" | "*" | "?" => {
            let info = client.admin().cluster_info().await?;
            let mut live: Vec<String> = info.nodes.into_iter().filter(|n| n.live).map(|n| n.server).collect();
            if !live.contains(&own) {
                live.push(own.clone());
            }
            if dest == "?" {
                live.retain(|n| *n != own);
            }
            live
        }
        "." => vec![own.clone()],
        other => vec![other.to_string()],
    };
    if targets.is_empty() {
        bail!(Failure(format!("no live node besides {own} to broadcast {} to", msg.command)));
    }
    if msg.get("transmission_report").is_none() {
        msg.params.insert("transmission_report".into(), "failure".into());
    }
    let id = client.next_id();
    msg.envelope.id = id;
    client.send(msg.clone()).await?;
    let verdicts = barrier(&client, &mut incoming, id, &own, &targets, a.timeout).await?;
    report(ctx, &msg, broadcast, &targets, &verdicts)
}

/// Pings every target after the message and collects what each node said about it.
async fn barrier(
    client: &Client,
    incoming: &mut Incoming,
    id: u64,
    own: &str,
    targets: &[String],
    timeout: Duration,
) -> anyhow::Result<BTreeMap<String, NodeVerdict>> {
    let mut pings = tokio::task::JoinSet::new();
    for node in targets {
        let ping = NodeRequest::Ping.to_message();
        let ping = if node == own { ping } else { ping.to(&format!("{node}:node")) };
        let (client, node) = (client.clone(), node.clone());
        pings.spawn(async move { (node, client.request_with_timeout(ping, timeout).await) });
    }
    let mut verdicts: BTreeMap<String, NodeVerdict> =
        targets.iter().map(|n| (n.clone(), NodeVerdict::default())).collect();
    while let Some(joined) = pings.join_next().await {
        let (node, answer) = joined.context("a barrier task failed")?;
        match answer {
            // A refusal of the PING itself (say, the node is unreachable) also comes after any
            // report about the message.
            Ok(_) | Err(nodus_client::ClientError::Refused(_)) => {}
            Err(nodus_client::ClientError::Timeout(_)) => verdicts.entry(node).or_default().silent = true,
            Err(e) => return Err(e.into()),
        }
    }
    while let Some(m) = incoming.try_recv() {
        if m.envelope.reply_to != id {
            continue;
        }
        // A refusal by the local node about a remote target names the local node: charge it to
        // the node the message was for when there is only one.
        let server = if targets.len() == 1 { targets[0].clone() } else { m.from.server.clone() };
        let v = verdicts.entry(server).or_default();
        match Refusal::from_reply(&m) {
            Some(r) => {
                // The report `failed` comes first; the refusal that follows says why.
                if v.refused.as_ref().is_none_or(|old| old.kind() == RefusalKind::Dropped) {
                    v.refused = Some(r);
                }
            }
            None if m.command == "TRANSMISSION_REPORT" && m.get("status") == Some("cached") => v.cached = true,
            None => v.answered = true,
        }
    }
    Ok(verdicts)
}

/// Prints the verdict; returns the exit status.
fn report(
    ctx: &Ctx,
    msg: &Message,
    broadcast: bool,
    targets: &[String],
    verdicts: &BTreeMap<String, NodeVerdict>,
) -> anyhow::Result<u8> {
    let cache_no = msg.get("cache").is_some_and(|c| c.split(';').any(|o| o.trim() == "no"));
    let why = |r: &Refusal| match r.kind() {
        RefusalKind::Dropped if cache_no => format!(
            "dropped: service {:?} is not registered on {} and the message said cache=no",
            msg.to.service,
            r.server()
        ),
        // A node reports `failed` first; across a link only that first answer comes back.
        RefusalKind::Dropped => format!(
            "SERVICE_UNAVAILABLE: service {:?} is not registered on {} (the node could not deliver nor cache it)",
            msg.to.service,
            r.server()
        ),
        RefusalKind::Unknown => format!(
            "service {:?} does not accept command {} (UNKNOWN command={})",
            msg.to.service,
            msg.command,
            r.command().unwrap_or(&msg.command)
        ),
        _ => r.to_string(),
    };
    let result = |v: &NodeVerdict| match (&v.refused, v.silent, v.cached) {
        (Some(_), _, _) => "failed",
        (None, true, _) => "unknown",
        (None, false, true) => "cached",
        (None, false, false) => "delivered",
    };
    let nodes: Vec<serde_json::Value> = verdicts
        .iter()
        .map(|(server, v)| {
            json!({
                "server": server,
                "result": result(v),
                "reason": v.refused.as_ref().map(why),
                "code": v.refused.as_ref().and_then(|r| r.code().map(String::from)),
            })
        })
        .collect();
    let failed: Vec<(&String, String)> = verdicts
        .iter()
        .filter_map(|(s, v)| match (&v.refused, v.silent) {
            (Some(r), _) => Some((s, why(r))),
            (None, true) => Some((s, "no answer from the node in time: delivery unknown".to_string())),
            (None, false) => None,
        })
        .collect();
    let reached: Vec<&String> = targets.iter().filter(|t| !failed.iter().any(|(s, _)| s == t)).collect();
    let ok = if broadcast { !reached.is_empty() } else { failed.is_empty() };
    let overall = if !ok {
        "failed"
    } else if !broadcast && verdicts.values().any(|v| v.cached) {
        "cached"
    } else {
        "delivered"
    };
    let text = if ok {
        String::new()
    } else if failed.len() == 1 {
        failed[0].1.clone()
    } else {
        failed.iter().map(|(s, w)| format!("{s}: {w}")).collect::<Vec<_>>().join("; ")
    };
    if ctx.json {
        let mut v = json!({"ok": ok, "result": overall, "nodes": nodes});
        if !ok {
            v["error"] = json!(text);
        }
        output::json(&v);
    } else if !ok {
        output::error(&text);
    } else if broadcast && !failed.is_empty() {
        let names: Vec<&str> = reached.iter().map(|s| s.as_str()).collect();
        output::note(&format!("delivered on {}", names.join(", ")));
        for (s, w) in &failed {
            output::note(&format!("not on {s}: {w}"));
        }
    }
    Ok(if ok { 0 } else { 1 })
}

async fn send_udp(addr: &str, mut msg: Message, secret: Option<String>) -> anyhow::Result<u8> {
    if let Some(s) = secret {
        msg.params.insert("secret_code".into(), s);
    }
    let datagram = text::to_line(&msg);
    if datagram.len() > 1024 {
        bail!("the message is {} bytes; a UDP signal holds at most 1024", datagram.len());
    }
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.context("cannot open a UDP socket")?;
    socket.send_to(datagram.as_bytes(), addr).await.with_context(|| format!("cannot send to {addr}"))?;
    Ok(0)
}
