//! `nodus call SERVICE COMMAND [name=value ...]`: one request, its reply printed. Exit 1 when the
//! node refuses the request (printed like a reply, with the reason on stderr) or the service
//! answers `ERROR`.

use super::Ctx;
use crate::output;
use anyhow::Context;
use nodus_client::ClientError;
use nodus_wire::Message;
use serde_json::json;
use std::time::Duration;

/// `nodus call` arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Destination `[server:]service`.
    service: String,
    /// Command name.
    command: String,
    /// Parameters as name=value.
    params: Vec<String>,
    /// Payload (UTF-8 text).
    #[arg(long)]
    payload: Option<String>,
    /// How long to wait for the reply (e.g. 500ms, 10s, 1m).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// Runs `nodus call`.
///
/// Fails when the arguments do not make a valid message, the node cannot be reached or no reply
/// comes in time.
pub async fn run(ctx: &Ctx, a: Args) -> anyhow::Result<u8> {
    let mut msg = Message::new(a.command).to(&a.service);
    for p in a.params {
        let (k, v) = p.split_once('=').with_context(|| format!("parameter {p:?} is not name=value"))?;
        msg.params.insert(k.to_string(), v.to_string());
    }
    if let Some(p) = a.payload {
        msg = msg.with_payload(p.into_bytes());
    }
    msg.validate().context("invalid message")?;
    let client = ctx.client().await?;
    match client.request_with_timeout(msg, a.timeout).await {
        Ok(reply) => {
            output::reply(&reply, ctx.json);
            // A service's own ERROR answer is a failed call too.
            Ok(if reply.command == "ERROR" { 1 } else { 0 })
        }
        Err(ClientError::Refused(r)) => {
            if ctx.json {
                output::json_error(&r.to_string(), json!({"code": r.code(), "reply": output::message_json(r.reply())}));
            } else {
                output::reply(r.reply(), false);
                output::error(&r.to_string());
            }
            Ok(1)
        }
        Err(e) => Err(e.into()),
    }
}
