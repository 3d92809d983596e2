//! `nats-bench`: request/reply throughput and latency through a NATS server, for comparison with
//! `nodus-bench reqrep`. Requester and echo responder are two client processes.

mod args;
mod bench;
mod responder;
mod stats;

use std::process::ExitCode;
use std::time::Duration;

use args::Command;

/// Subject the responder serves and the requester sends to.
const SUBJECT: &str = "bench.echo";
/// A request not answered within this long fails the run.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Error type of the whole program; every error ends up as one line on stderr.
type Error = Box<dyn std::error::Error + Send + Sync>;

/// Connects to the server once (no retry: a server that is not there is an error).
async fn connect(url: &str, name: &str) -> Result<async_nats::Client, Error> {
    let client = async_nats::ConnectOptions::new()
        .name(name)
        .request_timeout(Some(REQUEST_TIMEOUT))
        .connect(url)
        .await
        .map_err(|e| format!("connecting to {url}: {e}"))?;
    Ok(client)
}

#[tokio::main]
async fn main() -> ExitCode {
    let command = match args::parse(std::env::args().skip(1)) {
        Ok(command) => command,
        Err(e) => {
            eprintln!("nats-bench: {e}\n\n{}", args::USAGE);
            return ExitCode::from(2);
        }
    };
    let outcome = match command {
        Command::Help => {
            println!("{}", args::USAGE);
            Ok(())
        }
        Command::Responder(args) => responder::run(&args).await,
        Command::Bench(args) => bench::run(&args).await.map(|summary| {
            if args.json {
                // stdout carries exactly one JSON line; the human line goes beside it on stderr.
                eprintln!("{}", summary.human());
                println!("{}", summary.json());
            } else {
                println!("{}", summary.human());
            }
        }),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nats-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
