//! `nodus-bench`: request/reply through a real nodus daemon, measured against a raw two-hop
//! baseline (a byte-copying forwarder in front of an echo server) over the same kind of socket.
//!
//! `main` only parses arguments and dispatches. The orchestration (child processes, the matrix,
//! the ratio) lives in [`bench`]; the two systems under test in [`nodus_system`] and [`baseline`];
//! percentiles in [`latency`]; everything printed in [`report`].
//!
//! The hidden subcommands `echo-service`, `raw-echo` and `raw-forwarder` are the child processes a
//! run starts from this same executable; they print `ready <endpoint>` once serving and exit when
//! their standard input closes (i.e. when the parent goes away). `connect-once` is the cold-start
//! baseline of `apps` ([`apps`]): it connects, writes one byte and exits, without an async runtime.

#![forbid(unsafe_code)]

mod apps;
mod baseline;
mod bench;
mod child;
mod cluster;
mod latency;
mod nodus_system;
mod report;
mod scale;
mod sim;
mod tasks;
mod tasks_node;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

/// nodus-bench — request/reply throughput and latency of one nodus daemon, next to a raw baseline.
///
/// Without a subcommand it runs `all`: payload {64, 4096} × in flight {1, 64}.
#[derive(Parser, Debug)]
#[command(name = "nodus-bench", version, about)]
struct Args {
    #[command(flatten)]
    options: Options,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Options shared by `reqrep` and `all`.
#[derive(clap::Args, Debug, Clone)]
struct Options {
    /// Measured phase of each run, seconds.
    #[arg(long, global = true, default_value = "3", value_parser = parse_secs)]
    duration: Duration,
    /// Unmeasured warm-up before each measured phase, seconds.
    #[arg(long, global = true, default_value = "1", value_parser = parse_secs)]
    warmup: Duration,
    /// One JSON object per measurement on stdout instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// The `nodus` binary (default: next to this executable).
    #[arg(long, global = true)]
    nodus: Option<PathBuf>,
    /// Socket kind for both the daemon and the baseline.
    #[arg(long, global = true, value_enum, default_value_t = Transport::Unix)]
    transport: Transport,
}

/// Socket kind used by every hop of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Transport {
    /// Unix domain sockets in a scratch directory.
    Unix,
    /// TCP over 127.0.0.1.
    Tcp,
}

/// What to run.
#[derive(Subcommand, Debug)]
enum Command {
    /// One request/reply measurement: nodus, then the raw baseline, then their throughput ratio.
    /// With `--json`, stdout holds exactly one line: the nodus measurement.
    Reqrep {
        /// Payload bytes per request (the reply carries it back).
        #[arg(long, default_value_t = 64)]
        payload: usize,
        /// Requests outstanding at once, multiplexed over one client connection.
        #[arg(long, default_value_t = 1)]
        inflight: usize,
        /// Skip the raw baseline (and the ratio).
        #[arg(long)]
        no_baseline: bool,
    },
    /// The matrix payload {64, 4096} × in flight {1, 64}, nodus and baseline (the default).
    All,
    /// Cluster figures. Without `--nodes`: single node, cross-node and 5-node fan-out latency.
    /// With `--nodes N,M,...`: the cluster at scale with real daemons on loopback (a random
    /// graph, each node dialling `--dials` others, all started together): convergence, bytes,
    /// false deaths, idle traffic per link, kill -9 of the busiest hub; medians of `--runs`.
    Cluster {
        /// Cluster sizes, one row each (the scale measurement).
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<usize>,
        /// Runs per size (a new random graph each); the row shows their medians.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Each node dials this many others.
        #[arg(long, default_value_t = 2)]
        dials: usize,
        /// Links' heartbeat period, ms.
        #[arg(long, default_value_t = 250)]
        heartbeat_ms: u64,
        /// Seeds the graphs.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Length of the idle measurement, seconds.
        #[arg(long, default_value_t = 3)]
        idle_secs: u64,
        /// Another `nodus` binary (e.g. built from an older commit) measured first, row for row:
        /// before and after in the same run.
        #[arg(long)]
        before: Option<PathBuf>,
    },
    /// App engine figures: invoke throughput and latency through a node and through the engine
    /// in-process (64 B / 4 KiB × 1 / 64 in flight), then worker cold start next to a bare
    /// fork+exec+connect baseline.
    Apps {
        /// Cold starts of each kind (the baseline and every worker).
        #[arg(long, default_value_t = 20)]
        cold_starts: usize,
    },
    /// Task figures: submit-only throughput, end to end (submit → no-op procedure in a worker
    /// process → completion on disk) with 1 and 4 workers, synchronous=FULL and NORMAL, and
    /// latency at light load; on the task crate in this process with real workers and SQLite,
    /// and PostgreSQL with --postgres,
    /// then the same through a `nodus daemon` (its `tasks` service and its arpcp listener).
    Tasks {
        /// Tasks per throughput measurement.
        #[arg(long, default_value_t = 20_000)]
        tasks: usize,
        /// Concurrent submitters (each submits one task at a time).
        #[arg(long, default_value_t = 256)]
        submitters: usize,
        /// Tasks of the light-load latency measurement.
        #[arg(long, default_value_t = 1000)]
        light: usize,
        /// The procedures worker (default: nodus-procs-worker next to this executable).
        #[arg(long)]
        worker: Option<PathBuf>,
        /// Also measure on this PostgreSQL database (postgres://user@host:port/database; each
        /// measurement in a scratch schema, dropped afterwards), next to SQLite.
        #[arg(long, env = "NODUS_TEST_PG")]
        postgres: Option<String>,
    },
    /// Simulated cluster figures: the daemon's routers on a simulated network (virtual clock, in
    /// this process): convergence from a start all together, idle bytes per link, kill -9 of the
    /// busiest hub; messages and bytes per node, false deaths.
    Sim {
        /// Cluster sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "100,1000")]
        nodes: Vec<usize>,
        /// Seeds the run (graph, latencies, jitter).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Links' heartbeat period, ms.
        #[arg(long, default_value_t = 250)]
        heartbeat_ms: u64,
        /// Each node dials this many others.
        #[arg(long, default_value_t = 2)]
        dials: usize,
        /// Multiplies every CPU cost (N processes sharing 2 cores: about N/2).
        #[arg(long, default_value_t = 1.0)]
        slowdown: f64,
        /// Probability that a segment is lost once (retransmitted 200 ms later).
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
        /// Heartbeats wait behind other work (no heartbeat lane).
        #[arg(long)]
        no_lane: bool,
        /// Virtual time each phase may take, seconds.
        #[arg(long, default_value_t = 120)]
        limit_secs: u64,
    },
    /// Child process: connects to a Unix socket, writes one byte and exits (cold-start baseline).
    #[command(hide = true)]
    ConnectOnce {
        /// The socket to connect to.
        #[arg(long)]
        socket: PathBuf,
    },
    /// Child process: a nodus service `bench_echo` that answers every request with its payload.
    #[command(hide = true)]
    EchoService {
        /// The node: unix:/path or host:port.
        #[arg(long)]
        node: String,
        /// The service name to register.
        #[arg(long, default_value = "bench_echo")]
        service: String,
    },
    /// Child process: echoes length-prefixed frames back.
    #[command(hide = true)]
    RawEcho {
        /// Where to listen: unix:/path or host:port.
        #[arg(long)]
        listen: String,
    },
    /// Child process: for each connection, opens one to `upstream` and copies bytes both ways.
    #[command(hide = true)]
    RawForwarder {
        /// Where to listen: unix:/path or host:port.
        #[arg(long)]
        listen: String,
        /// The raw echo server.
        #[arg(long)]
        upstream: String,
    },
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.trim_end_matches('s').parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} must be a non-negative number of seconds"))
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(Command::ConnectOnce { socket }) = &args.command {
        // Before any runtime: the cold-start baseline is fork + exec + connect and little else.
        return match apps::connect_once(socket) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                report::error(&format!("{e:#}"));
                std::process::ExitCode::from(2)
            }
        };
    }
    // The load (client, echo service, raw echo) runs on one runtime thread, as one service
    // process typically does: on a small machine a second thread in each of them mostly adds
    // cross-thread wake-ups. The forwarder (the baseline's stand-in for the daemon) and `apps`
    // (which hosts an engine in-process) run like the daemon, on every core.
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if !matches!(
        args.command,
        Some(Command::RawForwarder { .. } | Command::Apps { .. } | Command::Tasks { .. } | Command::Sim { .. })
    ) && !matches!(&args.command, Some(Command::Cluster { nodes, .. }) if !nodes.is_empty())
    {
        builder.worker_threads(1);
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            report::error(&format!("cannot start the async runtime: {e}"));
            return std::process::ExitCode::from(2);
        }
    };
    // Run on a worker thread, not in `block_on` on the main thread: a future polled there needs a
    // cross-thread wake-up for every message the client's driver task hands it.
    let work = runtime.spawn(bench::run(args.options, args.command.unwrap_or(Command::All)));
    match runtime.block_on(work) {
        Ok(Ok(())) => std::process::ExitCode::SUCCESS,
        Ok(Err(e)) => {
            report::error(&format!("{e:#}"));
            std::process::ExitCode::from(2)
        }
        Err(e) => {
            report::error(&format!("the benchmark task failed: {e}"));
            std::process::ExitCode::from(2)
        }
    }
}
