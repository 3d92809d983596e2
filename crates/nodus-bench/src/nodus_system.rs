//! The system under test: one real `nodus daemon` child process, one `echo-service` child process
//! registered on it as `bench_echo`, and the load generator — an anonymous
//! [`nodus_client::Client`] running K request loops over its one connection.

use crate::child::{self, Child};
use crate::latency::{Load, Recorder, Summary, System};
use crate::{report, Transport};
use anyhow::{bail, Context};
use nodus_client::{Client, ClientConfig};
use nodus_wire::Message;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// The service name the echo child registers.
pub const ECHO_SERVICE: &str = "bench_echo";
/// The command of requests and replies.
const ECHO_COMMAND: &str = "ECHO";
/// How long one request may wait for its reply.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the echo service waits for the node to acknowledge `STOP` when orphaned.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// Slack past the end of the measured phase before a measurement is abandoned.
const RUN_GRACE: Duration = Duration::from_secs(15);

/// A running daemon with the echo service registered on it.
#[derive(Debug)]
pub struct NodusSystem {
    // Field order is drop order: the echo service goes before the daemon.
    echo: Child,
    daemon: Child,
    endpoint: String,
}

impl NodusSystem {
    /// Starts the daemon (binary `nodus`, data in `dir`) and the echo service, each waited for.
    ///
    /// Fails when either cannot be started or is not ready within [`child::READY_TIMEOUT`].
    pub async fn start(nodus: &Path, transport: Transport, dir: &Path) -> anyhow::Result<NodusSystem> {
        let data_dir = dir.join("nodus-data");
        let port = child::free_port()?;
        let mut command = tokio::process::Command::new(nodus);
        command.arg("daemon").arg("--server-name").arg("bench").arg("--data-dir").arg(&data_dir);
        // Only the client listeners: the default cluster and UDP ports are fixed and may be taken.
        command.args(["--listen", &format!("127.0.0.1:{port}"), "--cluster-listen", "", "--udp-listen", ""]);
        let mut daemon = Child::spawn("the nodus daemon", command, dir.join("nodus.log"), false)?;
        let endpoint = match transport {
            Transport::Unix => format!("unix:{}", data_dir.join("nodus.sock").display()),
            Transport::Tcp => format!("127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + child::READY_TIMEOUT;
        let probe = || async {
            let config = ClientConfig::new(endpoint.as_str()).no_reconnect();
            Client::connect(config).await.map(drop).with_context(|| format!("the daemon does not answer on {endpoint}"))
        };
        child::retry_until(deadline, || daemon.check_running(), probe).await?;

        let command = child::self_command(&["echo-service", "--node", &endpoint])?;
        let mut echo = Child::spawn("the echo service", command, dir.join("echo-service.log"), true)?;
        echo.ready().await?;
        Ok(NodusSystem { echo, daemon, endpoint })
    }

    /// Runs `load` through the daemon and summarises it.
    ///
    /// Fails when the client cannot connect, a request fails or times out, or a reply is not the
    /// echo of its request.
    pub async fn measure(&mut self, load: &Load) -> anyhow::Result<Summary> {
        self.daemon.check_running()?;
        self.echo.check_running()?;
        let config = ClientConfig::new(self.endpoint.as_str()).no_reconnect();
        // Keep `_incoming` alive: nothing but replies is expected, but its sender must not close.
        let (client, _incoming) = Client::connect(config).await.context("the load client cannot connect")?;
        let window = load.window();
        let mut loops = JoinSet::new();
        for _ in 0..load.inflight {
            let client = client.clone();
            let payload = load.payload;
            loops.spawn(async move {
                let mut recorder = Recorder::new(window);
                while Instant::now() < window.end {
                    let request = Message::new(ECHO_COMMAND).to(ECHO_SERVICE).with_payload(vec![0u8; payload]);
                    let sent = Instant::now();
                    let reply = client.request(request, REQUEST_TIMEOUT).await.context("a request failed")?;
                    recorder.record(sent, Instant::now());
                    if reply.command != ECHO_COMMAND || reply.payload.len() != payload {
                        bail!(
                            "unexpected reply {} with {} payload bytes (expected {ECHO_COMMAND} with {payload}): {}",
                            reply.command,
                            reply.payload.len(),
                            reply.get("message").unwrap_or("")
                        );
                    }
                }
                Ok(recorder)
            });
        }
        let collect = async {
            let mut all = Recorder::new(window);
            while let Some(joined) = loops.join_next().await {
                all.merge(joined.context("a request loop panicked")??);
            }
            Ok::<_, anyhow::Error>(all)
        };
        let all = tokio::time::timeout_at(window.end + RUN_GRACE, collect)
            .await
            .context("the nodus measurement did not finish in time")??;
        let summary = all.summary(System::Nodus, load);
        if summary.requests == 0 {
            bail!("no request through nodus was answered during the measured phase");
        }
        Ok(summary)
    }

    /// Stops the echo service, then the daemon.
    pub async fn stop(self) {
        self.echo.stop().await;
        self.daemon.stop().await;
    }
}

/// The `nodus` binary to run: `explicit`, else `nodus` next to this executable.
///
/// Fails when the binary does not exist.
pub fn nodus_binary(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let path = match explicit {
        Some(p) => p,
        None => {
            let exe = std::env::current_exe().context("cannot find the path of nodus-bench itself")?;
            exe.parent().context("nodus-bench has no parent directory")?.join("nodus")
        }
    };
    if !path.is_file() {
        bail!("no nodus binary at {}: build it (cargo build --release -p nodus) or pass --nodus PATH", path.display());
    }
    Ok(path)
}

/// The `echo-service` child role: registers `bench_echo` on `node`, prints `ready`, then answers
/// every request (a message with an id) with `ECHO` carrying the same payload. One-way messages
/// (no id) cannot be correlated and are not answered.
///
/// If the parent goes away without killing it (it was killed itself), it asks the node to `STOP`
/// before exiting, so no daemon of the run is left behind either.
///
/// Fails when it cannot register or the node goes away.
pub async fn echo_service(node: &str) -> anyhow::Result<()> {
    let config = ClientConfig::new(node).service(ECHO_SERVICE).no_reconnect();
    let (client, mut incoming) =
        Client::connect(config).await.with_context(|| format!("cannot register {ECHO_SERVICE} on {node}"))?;
    report::ready(ECHO_SERVICE);
    let answer = async {
        while let Some(msg) = incoming.recv().await {
            if msg.envelope.id == 0 {
                continue;
            }
            let reply = msg.reply(ECHO_COMMAND).with_payload(msg.payload);
            client.send(reply).await.context("cannot send a reply to the node")?;
        }
        bail!("the node closed the connection")
    };
    tokio::select! {
        r = answer => r,
        _ = child::parent_gone() => {
            let _ = client.request(Message::new("STOP"), STOP_TIMEOUT).await;
            Ok(())
        }
    }
}
