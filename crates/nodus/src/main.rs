//! `nodus`: the node daemon and the command-line tools in one binary.
//!
//! `main` only parses arguments, sets up logging and the runtime, and dispatches; each command
//! lives in a module of [`cli`], the daemon in the `nodus-daemon` crate, and all printing in
//! [`output`].

#![forbid(unsafe_code)]

mod cli;
mod output;

use clap::error::ErrorKind;
use clap::Parser;
use std::io::IsTerminal;

fn main() -> std::process::ExitCode {
    let args = match cli::Args::try_parse() {
        Ok(args) => args,
        Err(e) => return usage_error(e),
    };
    let log = match &args.command {
        cli::Command::Daemon(d) => d.log.clone(),
        _ => cli::LogArgs::default(),
    };
    let daemon = matches!(args.command, cli::Command::Daemon(_));
    if let Err(e) = init_logging(&log, daemon) {
        output::error(&format!("{e:#}"));
        return std::process::ExitCode::from(2);
    }
    // A worker process serves one connection: a single-threaded runtime starts faster and avoids
    // cross-thread wake-ups on every message.
    let builder = if matches!(args.command, cli::Command::EchoWorker(_)) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match { builder }.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            output::error(&format!("cannot start the async runtime: {e}"));
            return std::process::ExitCode::from(2);
        }
    };
    let json = args.conn().json;
    match runtime.block_on(cli::run(args)) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            let code = cli::exit_code(&e);
            if json {
                let refusal = e
                    .downcast_ref::<nodus_client::ClientError>()
                    .or_else(|| match e.downcast_ref::<nodus_client::AdminError>() {
                        Some(nodus_client::AdminError::Client(c)) => Some(c),
                        _ => None,
                    })
                    .and_then(|c| c.refusal());
                let extra = match refusal {
                    Some(r) => serde_json::json!({"code": r.code(), "reply": output::message_json(r.reply())}),
                    None => serde_json::json!({}),
                };
                output::json_error(&format!("{e:#}"), extra);
            } else {
                output::error(&format!("{e:#}"));
            }
            std::process::ExitCode::from(code)
        }
    }
}

/// A command line clap refused: its usual text on stderr, or with `--json` an error object on
/// stdout; exit status 2 either way. Help and version requests print as usual.
fn usage_error(e: clap::Error) -> std::process::ExitCode {
    let wants_json = std::env::args_os().skip(1).take_while(|a| a != "--").any(|a| a == "--json");
    if !wants_json || matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        e.exit();
    }
    let message = if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        "a subcommand is required".to_string()
    } else {
        // The message without clap's usage and tip paragraphs: lines up to the first blank one.
        let text = e.render().to_string();
        let lines: Vec<&str> = text.lines().take_while(|l| !l.trim().is_empty()).map(str::trim).collect();
        let joined = lines.join(" ");
        joined.strip_prefix("error: ").unwrap_or(&joined).to_string()
    };
    output::json_error(&format!("{message} (see --help)"), serde_json::json!({"usage": true}));
    std::process::ExitCode::from(2)
}

/// Logs go to stderr: plain text (colours only on a terminal) or JSON lines. The level comes from
/// `--log-level`, else `RUST_LOG`, else `info` for the daemon and `warn` for the other commands.
fn init_logging(log: &cli::LogArgs, daemon: bool) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match &log.level {
        Some(level) => EnvFilter::try_new(level).map_err(|e| anyhow::anyhow!("bad --log-level {level:?}: {e}"))?,
        None => {
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(if daemon { "info" } else { "warn" }))
        }
    };
    // A closed stderr (`nodus daemon 2>&1 | head`) must not kill the node: tracing-subscriber
    // reports a failed write with eprintln!, which panics when stderr itself is the problem.
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).log_internal_errors(false);
    match log.format {
        cli::LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        cli::LogFormat::Json => builder.json().with_ansi(false).init(),
    }
    Ok(())
}
