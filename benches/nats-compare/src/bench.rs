//! The requester: starts the responder process, then keeps `inflight` requests outstanding.

use std::process::Stdio;
use std::time::Duration;

use async_nats::Client;
use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::{timeout, Instant};

use crate::args::BenchArgs;
use crate::responder::READY;
use crate::stats::Summary;
use crate::{connect, Error, SUBJECT};

/// How long the responder may take to connect and subscribe.
const RESPONDER_START_TIMEOUT: Duration = Duration::from_secs(10);
/// Extra lifetime the responder gets beyond the planned run, as a backstop if we vanish.
const RESPONDER_SLACK: Duration = Duration::from_secs(60);

/// Runs one benchmark: responder up, warm-up, measured phase, responder down.
pub async fn run(args: &BenchArgs) -> Result<Summary, Error> {
    let responder = Responder::start(&args.url, args.warmup + args.duration + RESPONDER_SLACK).await?;
    let result = measure(args).await;
    responder.stop().await;
    result
}

async fn measure(args: &BenchArgs) -> Result<Summary, Error> {
    let client = connect(&args.url, "nats-bench requester").await?;
    let payload = Bytes::from(vec![0x5a; args.payload]);
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let max_per_worker = (args.max_requests / args.inflight as u64).max(1);

    let workers: Vec<_> = (0..args.inflight)
        .map(|_| tokio::spawn(worker(client.clone(), payload.clone(), measure_from, end, max_per_worker)))
        .collect();
    let mut rtts = Vec::new();
    for handle in workers {
        rtts.extend(handle.await??);
    }
    // From the start of the measured phase until the last measured request was answered.
    let elapsed = Instant::now().saturating_duration_since(measure_from);
    let _ = timeout(Duration::from_secs(2), client.drain()).await;
    Ok(Summary::new(args.payload, args.inflight, rtts, elapsed))
}

/// Sends one request at a time until `end` or `max_requests`; returns the round-trip times in
/// nanoseconds of the requests sent from `measure_from` on.
async fn worker(
    client: Client,
    payload: Bytes,
    measure_from: Instant,
    end: Instant,
    max_requests: u64,
) -> Result<Vec<u64>, Error> {
    let mut rtts = Vec::with_capacity(4096);
    for _ in 0..max_requests {
        let sent = Instant::now();
        if sent >= end {
            break;
        }
        let reply = client.request(SUBJECT, payload.clone()).await?;
        let rtt = sent.elapsed();
        if reply.payload != payload {
            return Err(format!("echo mismatch: sent {} bytes, got {} back", payload.len(), reply.payload.len()).into());
        }
        if sent >= measure_from {
            rtts.push(u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX));
        }
    }
    Ok(rtts)
}

/// The echo responder, running as a child process (this same binary, `responder` subcommand).
struct Responder {
    child: Child,
}

impl Responder {
    /// Starts the responder and waits until its subscription is live.
    async fn start(url: &str, lifetime: Duration) -> Result<Self, Error> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["responder", "--url", url, "--max-secs", &lifetime.as_secs().to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().ok_or("responder has no stdout")?;
        let mut line = String::new();
        let read = timeout(RESPONDER_START_TIMEOUT, BufReader::new(stdout).read_line(&mut line)).await;
        match read {
            Ok(Ok(_)) if line.trim_end() == READY => Ok(Self { child }),
            Ok(Ok(_)) => Err(format!("responder did not start (said {:?})", line.trim_end()).into()),
            Ok(Err(e)) => Err(format!("reading from the responder: {e}").into()),
            Err(_) => Err(format!("responder not ready within {RESPONDER_START_TIMEOUT:?}").into()),
        }
    }

    /// Closes the responder's stdin, which makes it exit; kills it if it does not within 5 s.
    async fn stop(mut self) {
        drop(self.child.stdin.take());
        if timeout(Duration::from_secs(5), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}
