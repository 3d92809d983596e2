//! `nodus`: the node daemon and the command-line tools in one binary.
//!
//! `main` only parses arguments and dispatches; each subcommand lives in [`cli`] and the daemon in
//! the `nodus-daemon` crate.

#![forbid(unsafe_code)]

mod cli;
mod output;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if matches!(args.command, cli::Command::Daemon(_)) {
            "info"
        } else {
            "warn"
        })
    });
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    // A worker process serves one connection: a single-threaded runtime starts faster and avoids
    // cross-thread wake-ups on every message.
    let builder = if matches!(args.command, cli::Command::EchoWorker { .. }) {
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
    match runtime.block_on(cli::run(args)) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            output::error(&format!("{e:#}"));
            std::process::ExitCode::from(2)
        }
    }
}
