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
pub const ECHO_COMMAND: &str = "ECHO";
/// How long one request may wait for its reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the echo service waits for the node to acknowledge `STOP` when orphaned.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// Slack past the end of the measured phase before a measurement is abandoned.
const RUN_GRACE: Duration = Duration::from_secs(15);

/// A running daemon with the echo service registered on it.
#[derive(Debug)]
pub struct NodusSystem {
    // Field order is drop order: the echo service goes before the daemons.
    echo: Child,
    daemons: Vec<Child>,
    endpoint: String,
    target: String,
}

/// Starts one daemon named `name` with data in `dir/<name>`; `cluster` is its cluster port and
/// its neighbours' ports. Returns it and its client endpoint once it answers.
///
/// Fails when it cannot be started or does not answer within [`child::READY_TIMEOUT`].
pub async fn start_daemon(
    nodus: &Path,
    transport: Transport,
    dir: &Path,
    name: &str,
    cluster: Option<(u16, &[u16])>,
) -> anyhow::Result<(Child, String)> {
    start_daemon_with(nodus, transport, dir, name, cluster, &[]).await
}

/// As [`start_daemon`], with `extra` arguments for `nodus daemon` (e.g. `--config FILE`).
///
/// Fails as [`start_daemon`].
pub async fn start_daemon_with(
    nodus: &Path,
    transport: Transport,
    dir: &Path,
    name: &str,
    cluster: Option<(u16, &[u16])>,
    extra: &[&str],
) -> anyhow::Result<(Child, String)> {
    let data_dir = dir.join(name);
    let port = child::free_port()?;
    let mut command = tokio::process::Command::new(nodus);
    command.arg("daemon").arg("--server-name").arg(name).arg("--data-dir").arg(&data_dir).args(extra);
    // Only the listeners asked for: the default cluster and UDP ports are fixed and may be taken.
    command.args([
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--udp-listen",
        "",
        "--locator-listen",
        "",
        "--arpcp-listen",
        "",
        "--http-listen",
        "",
    ]);
    match cluster {
        None => {
            command.args(["--cluster-listen", ""]);
        }
        Some((own, neighbors)) => {
            command.args(["--cluster-listen", &format!("127.0.0.1:{own}")]);
            for n in neighbors {
                command.args(["--neighbor", &format!("127.0.0.1:{n}")]);
            }
        }
    }
    let mut daemon = Child::spawn(&format!("nodus daemon {name}"), command, dir.join(format!("{name}.log")), false)?;
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
    Ok((daemon, endpoint))
}

/// Waits until a request from `endpoint` to `target` is answered with an echo (the cluster has
/// formed and gossiped where the service is).
///
/// Fails past [`child::READY_TIMEOUT`].
pub async fn wait_reachable(endpoint: &str, target: &str) -> anyhow::Result<()> {
    let (client, _incoming) = Client::connect(ClientConfig::new(endpoint).no_reconnect()).await?;
    let deadline = Instant::now() + child::READY_TIMEOUT;
    loop {
        // Until the cluster knows where the service is, the node refuses with SERVICE_UNAVAILABLE.
        let why = match client.request_with_timeout(Message::new(ECHO_COMMAND).to(target), REQUEST_TIMEOUT).await {
            Ok(reply) if reply.command == ECHO_COMMAND => return Ok(()),
            Ok(reply) => reply.command,
            Err(nodus_client::ClientError::Refused(r)) => r.to_string(),
            Err(e) => return Err(e.into()),
        };
        if Instant::now() > deadline {
            bail!("{target} is not reachable from {endpoint}: {why}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl NodusSystem {
    /// Starts the daemon (binary `nodus`, data in `dir`) and the echo service, each waited for.
    ///
    /// Fails when either cannot be started or is not ready within [`child::READY_TIMEOUT`].
    pub async fn start(nodus: &Path, transport: Transport, dir: &Path) -> anyhow::Result<NodusSystem> {
        let (daemon, endpoint) = start_daemon(nodus, transport, dir, "bench", None).await?;
        let command = child::self_command(&["echo-service", "--node", &endpoint])?;
        let mut echo = Child::spawn("the echo service", command, dir.join("echo-service.log"), true)?;
        echo.ready().await?;
        Ok(NodusSystem { echo, daemons: vec![daemon], endpoint, target: ECHO_SERVICE.to_string() })
    }

    /// Two linked daemons `a` and `b`: the echo service on `b`, the load client on `a`.
    ///
    /// Fails when a daemon or the service cannot be started, or the link does not form.
    pub async fn start_cross_node(nodus: &Path, transport: Transport, dir: &Path) -> anyhow::Result<NodusSystem> {
        let (pa, pb) = (child::free_port()?, child::free_port()?);
        let (a, endpoint) = start_daemon(nodus, transport, dir, "a", Some((pa, &[]))).await?;
        let (b, b_endpoint) = start_daemon(nodus, transport, dir, "b", Some((pb, &[pa]))).await?;
        let command = child::self_command(&["echo-service", "--node", &b_endpoint])?;
        let mut echo = Child::spawn("the echo service", command, dir.join("echo-service-b.log"), true)?;
        echo.ready().await?;
        let target = format!("b:{ECHO_SERVICE}");
        wait_reachable(&endpoint, &target).await?;
        Ok(NodusSystem { echo, daemons: vec![a, b], endpoint, target })
    }

    /// Runs `load` through the daemon and summarises it.
    ///
    /// Fails when the client cannot connect, a request fails or times out, or a reply is not the
    /// echo of its request.
    pub async fn measure(&mut self, load: &Load) -> anyhow::Result<Summary> {
        for d in &mut self.daemons {
            d.check_running()?;
        }
        self.echo.check_running()?;
        let config = ClientConfig::new(self.endpoint.as_str()).no_reconnect();
        // Keep `_incoming` alive: nothing but replies is expected, but its sender must not close.
        let (client, _incoming) = Client::connect(config).await.context("the load client cannot connect")?;
        let window = load.window();
        let mut loops = JoinSet::new();
        for _ in 0..load.inflight {
            let client = client.clone();
            let payload = load.payload;
            let target = self.target.clone();
            loops.spawn(async move {
                let mut recorder = Recorder::new(window);
                while Instant::now() < window.end {
                    let request = Message::new(ECHO_COMMAND).to(&target).with_payload(vec![0u8; payload]);
                    let sent = Instant::now();
                    let reply =
                        client.request_with_timeout(request, REQUEST_TIMEOUT).await.context("a request failed")?;
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
        let system = if self.daemons.len() > 1 { System::CrossNode } else { System::Nodus };
        let summary = all.summary(system, load);
        if summary.requests == 0 {
            bail!("no request through nodus was answered during the measured phase");
        }
        Ok(summary)
    }

    /// Stops the echo service, then the daemons.
    pub async fn stop(self) {
        self.echo.stop().await;
        for d in self.daemons {
            d.stop().await;
        }
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

/// The `echo-service` child role: registers `service` (default `bench_echo`) on `node`, prints `ready`, then answers
/// every request (a message with an id) with `ECHO` carrying the same payload. One-way messages
/// (no id) cannot be correlated and are not answered.
///
/// If the parent goes away without killing it (it was killed itself), it asks the node to `STOP`
/// before exiting, so no daemon of the run is left behind either.
///
/// Fails when it cannot register or the node goes away.
pub async fn echo_service_named(node: &str, service: &str) -> anyhow::Result<()> {
    let config = ClientConfig::new(node).service(service).no_reconnect();
    let (client, mut incoming) =
        Client::connect(config).await.with_context(|| format!("cannot register {service} on {node}"))?;
    report::ready(service);
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
            let _ = client.request_with_timeout(Message::new("STOP"), STOP_TIMEOUT).await;
            Ok(())
        }
    }
}
