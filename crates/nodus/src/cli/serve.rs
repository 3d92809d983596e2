//! `nodus serve NAME --command CMD`: a shell command as a service (like `nats reply --command`).
//!
//! Registers NAME and, for every message it gets, runs `sh -c CMD` with the payload on stdin and
//! the message in the environment:
//! `NODUS_COMMAND`, `NODUS_FROM` (`server:service` of the sender), `NODUS_ID`, `NODUS_SERVICE`,
//! `NODUS_SERVER`, `NODUS_MESSAGE` (the whole message in text form) and `NODUS_PARAM_<name>` for
//! each parameter (`x=41` → `$NODUS_PARAM_x`). A request (a message with an id) is answered
//! `RESULT exit=0` with the command's stdout as the payload, or `ERROR code=command_failed` (exit
//! status and last stderr line) or `ERROR code=timeout`. Up to `--concurrency` commands run at
//! once. The service reconnects and registers again when the node restarts.

use super::Ctx;
use crate::output;
use anyhow::Context;
use nodus_client::{Client, ClientError};
use nodus_wire::{text, Message};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// `nodus serve` arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The service name to register.
    name: String,
    /// Shell command run (`sh -c`) for every message: payload on stdin, message in NODUS_*
    /// variables (NODUS_COMMAND, NODUS_FROM, NODUS_ID, NODUS_PARAM_<name>, NODUS_MESSAGE); its
    /// stdout is the reply.
    #[arg(long, short = 'c', value_name = "CMD")]
    command: String,
    /// Accept only these commands (others get UNKNOWN), comma-separated.
    #[arg(long, value_delimiter = ',', value_name = "COMMANDS")]
    accept: Vec<String>,
    /// Most commands running at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    concurrency: u32,
    /// How long one run may take; then it is killed and the caller gets ERROR code=timeout.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Exit after handling this many messages.
    #[arg(long)]
    count: Option<u64>,
}

/// Runs the service until Ctrl-C (or `--count` messages).
///
/// Fails when the node cannot be reached or refuses the registration.
pub async fn run(ctx: &Ctx, a: Args) -> anyhow::Result<u8> {
    let mut config = ctx.reconnecting().service(&a.name);
    if !a.accept.is_empty() {
        config = config.commands(a.accept.iter().cloned());
    }
    let (client, mut incoming) = ctx.connect(config).await?;
    output::note(&format!(
        "serving {} on node {}: each message runs `{}` (Ctrl-C to stop)",
        a.name,
        client.server(),
        a.command
    ));
    let slots = Arc::new(tokio::sync::Semaphore::new(a.concurrency as usize));
    let command: Arc<str> = a.command.into();
    let mut tasks = tokio::task::JoinSet::new();
    let mut handled = 0u64;
    while let Some(m) = incoming.recv().await {
        if !is_work(&m) {
            continue;
        }
        let permit = slots.clone().acquire_owned().await.context("the concurrency limit closed")?;
        let (client, command, name) = (client.clone(), command.clone(), a.name.clone());
        let timeout = a.timeout;
        tasks.spawn(async move {
            let reply = handle(&command, &name, &client.server(), &m, timeout).await;
            drop(permit);
            if let Some(reply) = reply {
                answer(&client, &m, reply).await;
            }
        });
        handled += 1;
        if a.count.is_some_and(|c| handled >= c) {
            break;
        }
        // Reap finished runs so the set stays as small as the work in progress.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    Ok(0)
}

/// A message the command should run for: not a reply, not one of the node's notices.
fn is_work(m: &Message) -> bool {
    let notice = m.from.service == "node" && matches!(m.command.as_str(), "HELP" | "READY" | "STATUS" | "QUITTING");
    m.envelope.reply_to == 0 && !notice
}

/// Runs the command for `m`; returns the reply when `m` is a request.
async fn handle(command: &str, service: &str, server: &str, m: &Message, timeout: Duration) -> Option<Message> {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .env("NODUS_COMMAND", &m.command)
        .env("NODUS_FROM", m.from.to_string())
        .env("NODUS_ID", m.envelope.id.to_string())
        .env("NODUS_SERVICE", service)
        .env("NODUS_SERVER", server)
        .env("NODUS_MESSAGE", text::to_line(&Message { payload: Default::default(), ..m.clone() }))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in &m.params {
        cmd.env(format!("NODUS_PARAM_{k}"), v);
    }
    let wants_reply = m.envelope.id != 0;
    let run = async {
        let mut child = cmd.spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            // A command that does not read its input closes the pipe early: that is fine.
            let _ = stdin.write_all(&m.payload).await;
        }
        child.wait_with_output().await
    };
    let reply = match tokio::time::timeout(timeout, run).await {
        Err(_) => m
            .reply("ERROR")
            .param("code", "timeout")
            .param("command", &m.command)
            .param("message", format!("the command did not finish within {}", output::duration(timeout))),
        Ok(Err(e)) => m
            .reply("ERROR")
            .param("code", "command_failed")
            .param("command", &m.command)
            .param("message", format!("cannot run sh: {e}")),
        Ok(Ok(out)) if out.status.success() => m.reply("RESULT").param("exit", 0).with_payload(out.stdout),
        Ok(Ok(out)) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").to_string();
            let status =
                out.status.code().map_or_else(|| "killed by a signal".to_string(), |c| format!("exit status {c}"));
            let message = if last.is_empty() { status } else { format!("{status}: {last}") };
            m.reply("ERROR")
                .param("code", "command_failed")
                .param("command", &m.command)
                .param("exit", out.status.code().unwrap_or(-1))
                .param("message", message)
                .with_payload(out.stdout)
        }
    };
    wants_reply.then_some(reply)
}

/// Sends the reply; one too large for a frame becomes an error the caller can read.
async fn answer(client: &Client, m: &Message, reply: Message) {
    match client.send(reply).await {
        Err(ClientError::TooLarge { len, max }) => {
            let e = m
                .reply("ERROR")
                .param("code", "too_large")
                .param("command", &m.command)
                .param("message", format!("the command's output ({len} bytes) exceeds the frame bound ({max} bytes)"));
            let _ = client.send(e).await;
        }
        Err(e) => tracing::warn!(error = %e, "cannot send a reply"),
        Ok(()) => {}
    }
}
