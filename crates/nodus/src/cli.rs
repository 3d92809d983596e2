//! Subcommands of the `nodus` binary.

use crate::output;
use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use nodus_client::{Client, ClientConfig};
use nodus_daemon::{Config, Daemon};
use nodus_wire::{text, Message};
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;

/// nodus — a self-hosted cluster runtime: one daemon per host routes messages between services.
#[derive(Parser, Debug)]
#[command(name = "nodus", version, about)]
pub struct Args {
    /// The node to talk to: host:port, unix:/path or /path.
    #[arg(long, global = true, env = "NODUS_NODE", default_value = "127.0.0.1:4040")]
    pub node: String,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a node (embedded defaults; data in ./nodus-data).
    Daemon(DaemonArgs),
    /// Send one message, e.g. `nodus send 'images/REPROCESS url=x;priority=1'`. Exit 0 when the node
    /// accepted it (delivered or cached), 1 when it could not be delivered.
    Send {
        /// The message in communicatord's text form.
        message: String,
        /// How long to wait for the node's verdict.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        timeout: Duration,
        /// Send one datagram to the node's UDP signal port instead (no verdict: exit 0 once sent).
        #[arg(long)]
        udp: bool,
        /// The UDP signal port.
        #[arg(long, default_value = "127.0.0.1:4041")]
        udp_addr: String,
        /// `secret_code` for the UDP signal port.
        #[arg(long, env = "NODUS_UDP_SECRET", hide_env_values = true)]
        secret: Option<String>,
    },
    /// Cluster state and operations.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Deploy and run apps (worker processes supervised by the node).
    #[command(subcommand)]
    App(AppCommand),
    /// A built-in example worker (echo, upper, fail): deploy it with a manifest whose executable
    /// is this binary and whose args are ["echo-worker"].
    #[command(hide = true)]
    EchoWorker {
        /// `--app NAME --locator HOST:PORT --endpoint SOCKET --uuid UUID`, as the engine passes them.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Send a request and print the reply: `nodus call SERVICE COMMAND [name=value ...]`.
    Call {
        /// Destination `[server:]service`.
        service: String,
        /// Command name.
        command: String,
        /// Parameters as name=value.
        params: Vec<String>,
        /// Payload (UTF-8 text).
        #[arg(long)]
        payload: Option<String>,
        /// How long to wait for the reply.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Show the messages passing through the node, live.
    Sniff {
        /// Only messages to or from this service.
        #[arg(long)]
        service: Option<String>,
        /// Only messages with this command.
        #[arg(long)]
        command: Option<String>,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<u64>,
    },
    /// List the services registered on the node (with --cluster: on every live node).
    Services {
        /// Every live node's services, as `server:service`.
        #[arg(long)]
        cluster: bool,
    },
    /// Show the node's state and counters.
    Status,
    /// Ask the node to stop gracefully.
    Stop,
    /// Print the embedded default configuration.
    Config,
}

/// `nodus cluster ...`
#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Nodes, links, quorum and clock offsets as this node sees them.
    Status,
    /// Remove a node from the cluster's memory, on every node.
    Forget {
        /// The node's server name.
        server: String,
    },
    /// Stop every node of the cluster.
    Shutdown,
}

/// `nodus app ...`
#[derive(Subcommand, Debug)]
pub enum AppCommand {
    /// Store an app (an executable, or a directory with manifest.json/toml) and start it.
    Deploy {
        /// App name; also its service name.
        name: String,
        /// Executable file or app directory.
        path: PathBuf,
        /// Profile file (TOML or JSON): pool-limit, queue-limit, concurrency, timeouts.
        #[arg(long)]
        profile: Option<PathBuf>,
    },
    /// Start a stopped (or failed) app.
    Start {
        /// App name.
        name: String,
    },
    /// Stop an app's workers; it stays deployed.
    Stop {
        /// App name.
        name: String,
    },
    /// Stop and start an app.
    Restart {
        /// App name.
        name: String,
    },
    /// Keep N of the app's workers running even when idle (at most its pool-limit); 0 starts
    /// them on demand only. Cocaine's app `control`.
    Scale {
        /// App name.
        name: String,
        /// Workers to keep running.
        workers: usize,
    },
    /// Stop an app and delete it.
    Remove {
        /// App name.
        name: String,
    },
    /// The apps on the node.
    List,
    /// One app: version, status, workers, queue.
    Info {
        /// App name.
        name: String,
    },
    /// Exit status and last stderr lines of the app's workers.
    Crashlog {
        /// App name.
        name: String,
    },
}

/// `nodus daemon` options; each overrides the config file, which overrides the embedded default.
#[derive(clap::Args, Debug)]
pub struct DaemonArgs {
    /// TOML configuration file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// This node's server name.
    #[arg(long)]
    server_name: Option<String>,
    /// Data directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Unix socket path.
    #[arg(long)]
    unix_socket: Option<PathBuf>,
    /// TCP listen address (host:port; empty disables TCP).
    #[arg(long)]
    listen: Option<String>,
    /// A service whose messages are cached until it registers (repeatable).
    #[arg(long = "expect")]
    expect: Vec<String>,
    /// Cluster listener address (empty disables cluster links).
    #[arg(long)]
    cluster_listen: Option<String>,
    /// A neighbour's cluster address to link with (repeatable).
    #[arg(long = "neighbor")]
    neighbors: Vec<String>,
    /// Shared cluster secret.
    #[arg(long, env = "NODUS_CLUSTER_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// UDP signal port address (empty disables it).
    #[arg(long)]
    udp_listen: Option<String>,
    /// Cocaine-compatible locator address (empty disables it).
    #[arg(long)]
    locator_listen: Option<String>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit() && c != '.').map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}: use e.g. 500ms, 5s, 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        _ => return Err(format!("bad duration unit in {s:?}: use ms, s or m")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// Runs the subcommand; returns the process exit code.
///
/// Fails when the node cannot be reached or the arguments are invalid.
pub async fn run(args: Args) -> anyhow::Result<u8> {
    match args.command {
        Command::Daemon(d) => daemon(d).await,
        Command::Config => {
            output::line(nodus_daemon::config::DEFAULT_TOML);
            Ok(0)
        }
        Command::Send { message, udp: true, udp_addr, secret, .. } => send_udp(&udp_addr, &message, secret).await,
        Command::Send { message, timeout, .. } => send(&args.node, &message, timeout, args.json).await,
        Command::Cluster(c) => cluster(&args.node, c, args.json).await,
        Command::App(c) => app(&args.node, c, args.json).await,
        Command::EchoWorker { args } => echo_worker(args).await,
        Command::Call { service, command, params, payload, timeout } => {
            let mut msg = Message::new(command).to(&service);
            for p in params {
                let (k, v) = p.split_once('=').with_context(|| format!("parameter {p:?} is not name=value"))?;
                msg.params.insert(k.to_string(), v.to_string());
            }
            if let Some(p) = payload {
                msg.payload = p.into_bytes().into();
            }
            msg.validate().context("invalid message")?;
            let client = anonymous(&args.node).await?;
            let reply = client.request(msg, timeout).await?;
            output::reply(&reply, args.json);
            Ok(if is_failure(&reply) { 1 } else { 0 })
        }
        Command::Sniff { service, command, count } => {
            let (client, mut incoming) = Client::connect(ClientConfig::new(&args.node).no_reconnect()).await?;
            let mut req = Message::new("SNIFF");
            if let Some(s) = service {
                req.params.insert("service".into(), s);
            }
            if let Some(c) = command {
                req.params.insert("command".into(), c);
            }
            client.request(req, Duration::from_secs(5)).await?;
            let mut seen = 0;
            while let Some(m) = incoming.recv().await {
                output::message(&m, args.json);
                seen += 1;
                if count.is_some_and(|c| seen >= c) {
                    break;
                }
            }
            Ok(0)
        }
        Command::Services { cluster: true } => {
            let client = anonymous(&args.node).await?;
            let reply =
                client.request(Message::new("LIST_SERVICES").param("scope", "cluster"), Duration::from_secs(5)).await?;
            let rows: Vec<(&str, &str)> =
                reply.get("cluster").unwrap_or("").split(',').filter_map(|a| a.split_once(':')).collect();
            if args.json {
                let v: Vec<_> =
                    rows.iter().map(|(server, service)| json!({"server": server, "service": service})).collect();
                output::json(&json!(v));
            } else if rows.is_empty() {
                output::line("no services registered in the cluster");
            } else {
                output::line(&format!("{:<24} SERVICE", "SERVER"));
                for (server, service) in rows {
                    output::line(&format!("{server:<24} {service}"));
                }
            }
            Ok(0)
        }
        Command::Services { cluster: false } => {
            let client = anonymous(&args.node).await?;
            let reply = client.request(Message::new("LIST_SERVICES"), Duration::from_secs(5)).await?;
            let list: Vec<&str> = reply.get("list").unwrap_or("").split(',').filter(|s| !s.is_empty()).collect();
            let mut rows = Vec::new();
            for name in &list {
                let st = Message::new("SERVICE_STATUS").param("service", name);
                let st = client.request(st, Duration::from_secs(5)).await?;
                rows.push((name.to_string(), st.get("instances").unwrap_or("0").to_string()));
            }
            if args.json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(n, i)| json!({"service": n, "instances": i.parse::<u64>().unwrap_or(0)}))
                    .collect();
                output::json(&json!(v));
            } else if rows.is_empty() {
                output::line("no services registered");
            } else {
                output::line(&format!("{:<32} INSTANCES", "SERVICE"));
                for (n, i) in rows {
                    output::line(&format!("{n:<32} {i}"));
                }
            }
            Ok(0)
        }
        Command::Status => {
            let client = anonymous(&args.node).await?;
            let reply = client.request(Message::new("INFO"), Duration::from_secs(5)).await?;
            if args.json {
                output::json(&json!(reply.params));
            } else {
                for (k, v) in &reply.params {
                    output::line(&format!("{k:<14} {v}"));
                }
            }
            Ok(0)
        }
        Command::Stop => {
            let client = anonymous(&args.node).await?;
            let reply = client.request(Message::new("STOP"), Duration::from_secs(5)).await?;
            if args.json || reply.command != "STOPPING" {
                output::message(&reply, args.json);
            } else {
                output::line(&format!(
                    "node {} is STOPPING: it finishes what is in flight, then exits",
                    reply.from.server
                ));
            }
            Ok(0)
        }
    }
}

async fn anonymous(node: &str) -> anyhow::Result<Client> {
    let (client, _incoming) = Client::connect(ClientConfig::new(node).no_reconnect()).await?;
    Ok(client)
}

/// Replies that mean the request failed.
fn is_failure(m: &Message) -> bool {
    matches!(m.command.as_str(), "ERROR" | "SERVICE_UNAVAILABLE" | "UNKNOWN" | "INVALID" | "QUITTING")
        || (m.command == "TRANSMISSION_REPORT" && m.get("status") == Some("failed"))
}

async fn send(node: &str, line: &str, timeout: Duration, as_json: bool) -> anyhow::Result<u8> {
    let mut msg = text::from_line(line).with_context(|| format!("cannot parse {line:?}"))?;
    let (client, mut incoming) = Client::connect(ClientConfig::new(node).no_reconnect()).await?;
    let id = client.next_id();
    msg.envelope.id = id;
    client.send(msg).await?;
    // The node handles one connection's messages in order: once the barrier is answered, every
    // verdict about the message (unavailable, unknown, cached...) has already arrived.
    client.request(Message::new("PING"), timeout).await?;
    let mut code = 0;
    let mut verdict = "sent".to_string();
    while let Some(m) = incoming.try_recv() {
        if m.envelope.reply_to != id {
            continue;
        }
        if is_failure(&m) {
            code = 1;
            let why = m.get("message").or(m.get("status")).unwrap_or("");
            verdict = format!("{} {why}", m.command).trim().to_string();
        } else if m.command == "TRANSMISSION_REPORT" {
            verdict = m.get("status").unwrap_or("sent").to_string();
        }
    }
    if as_json {
        output::json(&json!({"ok": code == 0, "result": verdict}));
    } else if code != 0 {
        output::error(&verdict);
    }
    Ok(code)
}

async fn send_udp(addr: &str, line: &str, secret: Option<String>) -> anyhow::Result<u8> {
    let mut msg = text::from_line(line).with_context(|| format!("cannot parse {line:?}"))?;
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

async fn cluster(node: &str, c: ClusterCommand, as_json: bool) -> anyhow::Result<u8> {
    let client = anonymous(node).await?;
    let wait = Duration::from_secs(5);
    match c {
        ClusterCommand::Status => {
            let info = client.request(Message::new("CLUSTER_INFO"), wait).await?;
            let list = |k: &str| -> Vec<Vec<String>> {
                info.get(k)
                    .unwrap_or("")
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| s.split('@').map(String::from).collect())
                    .collect()
            };
            let (nodes, links) = (list("nodes"), list("links"));
            let get = |k: &str| info.get(k).unwrap_or("?").to_string();
            if as_json {
                let nodes: Vec<_> =
                    nodes.iter().map(|n| json!({"server": n[0], "addr": n.get(1), "state": n.get(2)})).collect();
                let links: Vec<_> = links
                    .iter()
                    .map(|l| json!({"peer": l[0], "rtt_ms": l.get(1), "offset_ms": l.get(2), "phi": l.get(3)}))
                    .collect();
                output::json(&json!({
                    "server": get("server"), "up": get("up") == "true", "complete": get("complete") == "true",
                    "live": get("live"), "known": get("known"), "quorum": get("quorum"),
                    "clock_stable": get("clock_stable") == "true", "nodes": nodes, "links": links,
                }));
            } else {
                let up = if get("up") == "true" { "UP" } else { "DOWN" };
                let complete = if get("complete") == "true" { "COMPLETE" } else { "INCOMPLETE" };
                let clock = if get("clock_stable") == "true" { "stable" } else { "UNSTABLE" };
                output::line(&format!(
                    "cluster {up} {complete}: {} of {} nodes live (quorum {}), clock {clock}, seen from {}",
                    get("live"),
                    get("known"),
                    get("quorum"),
                    get("server")
                ));
                output::line(&format!("\n{:<20} {:<24} STATE", "NODE", "ADDRESS"));
                for n in &nodes {
                    let at = |i: usize| n.get(i).map_or("", String::as_str);
                    output::line(&format!("{:<20} {:<24} {}", at(0), at(1), at(2)));
                }
                output::line(&format!("\n{:<20} {:>8} {:>10} {:>6}", "LINK", "RTT ms", "OFFSET ms", "PHI"));
                for l in &links {
                    let at = |i: usize| l.get(i).map_or("", String::as_str);
                    output::line(&format!("{:<20} {:>8} {:>10} {:>6}", at(0), at(1), at(2), at(3)));
                }
            }
            Ok(0)
        }
        ClusterCommand::Forget { server } => {
            let reply = client.request(Message::new("FORGET").param("server", server), wait).await?;
            output::message(&reply, as_json);
            Ok(if is_failure(&reply) { 1 } else { 0 })
        }
        ClusterCommand::Shutdown => {
            let reply = client.request(Message::new("SHUTDOWN"), wait).await?;
            output::message(&reply, as_json);
            Ok(0)
        }
    }
}

async fn app(node: &str, c: AppCommand, as_json: bool) -> anyhow::Result<u8> {
    let client = anonymous(node).await?;
    let absolute = |p: &PathBuf| -> anyhow::Result<String> {
        let p = std::fs::canonicalize(p).with_context(|| format!("cannot find {}", p.display()))?;
        Ok(p.display().to_string())
    };
    let req = match &c {
        AppCommand::Deploy { name, path, profile } => {
            let mut m = Message::new("DEPLOY").param("name", name).param("path", absolute(path)?);
            if let Some(p) = profile {
                m.params.insert("profile".into(), absolute(p)?);
            }
            m
        }
        AppCommand::Start { name } => Message::new("START").param("name", name),
        AppCommand::Stop { name } => Message::new("STOP").param("name", name),
        AppCommand::Restart { name } => Message::new("RESTART").param("name", name),
        AppCommand::Scale { name, workers } => Message::new("SCALE").param("name", name).param("workers", workers),
        AppCommand::Remove { name } => Message::new("REMOVE").param("name", name),
        AppCommand::List => Message::new("LIST"),
        AppCommand::Info { name } => Message::new("INFO").param("name", name),
        AppCommand::Crashlog { name } => Message::new("CRASHLOG").param("name", name),
    };
    let reply = client.request(req.to("apps"), Duration::from_secs(60)).await?;
    if is_failure(&reply) {
        let why = reply.get("message").unwrap_or(&reply.command).to_string();
        if as_json {
            output::json(&json!({"ok": false, "error": why}));
        } else {
            output::error(&why);
        }
        return Ok(1);
    }
    match c {
        AppCommand::List => {
            let rows: Vec<Vec<&str>> = reply
                .get("list")
                .unwrap_or("")
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|r| r.split('@').collect())
                .collect();
            if as_json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|r| json!({"name": r.first(), "version": r.get(1), "status": r.get(2), "workers": r.get(3)}))
                    .collect();
                output::json(&json!(v));
            } else if rows.is_empty() {
                output::line("no apps deployed");
            } else {
                output::line(&format!("{:<24} {:<8} {:<10} WORKERS", "APP", "VERSION", "STATUS"));
                for r in rows {
                    let at = |i: usize| r.get(i).copied().unwrap_or("");
                    output::line(&format!("{:<24} {:<8} {:<10} {}", at(0), at(1), at(2), at(3)));
                }
            }
        }
        AppCommand::Crashlog { .. } if !as_json => {
            let text = String::from_utf8_lossy(&reply.payload);
            output::line(if text.is_empty() { "no worker has exited" } else { text.trim_end() });
        }
        _ if as_json => {
            let mut v = json!(reply.params);
            if !reply.payload.is_empty() {
                v["text"] = json!(String::from_utf8_lossy(&reply.payload));
            }
            output::json(&v);
        }
        _ => {
            for (k, v) in &reply.params {
                output::line(&format!("{k:<10} {v}"));
            }
        }
    }
    Ok(0)
}

async fn echo_worker(args: Vec<String>) -> anyhow::Result<u8> {
    use nodus_engine::worker_sdk::{HandlerResult, Request, Response, Worker, WorkerArgs};
    async fn echo(mut req: Request, mut resp: Response) -> HandlerResult {
        while let Some(chunk) = req.recv().await? {
            resp.write(chunk).await?;
        }
        Ok(())
    }
    async fn upper(mut req: Request, mut resp: Response) -> HandlerResult {
        while let Some(chunk) = req.recv().await? {
            resp.write(chunk.to_ascii_uppercase()).await?;
        }
        Ok(())
    }
    async fn fail(_req: Request, _resp: Response) -> HandlerResult {
        Err("failed on purpose".into())
    }
    let args = WorkerArgs::parse(args).map_err(|e| anyhow::anyhow!("{e}"))?;
    Worker::new(args)
        .on("echo", echo)
        .on("upper", upper)
        .on("fail", fail)
        .run()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(0)
}

async fn daemon(a: DaemonArgs) -> anyhow::Result<u8> {
    let mut table: toml::Table = match &a.config {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("cannot read {}", p.display()))?
            .parse()
            .with_context(|| format!("invalid TOML in {}", p.display()))?,
        None => toml::Table::new(),
    };
    let mut set = |k: &str, v: toml::Value| {
        table.insert(k.to_string(), v);
    };
    if let Some(v) = a.server_name {
        set("server_name", v.into());
    }
    if let Some(v) = a.data_dir {
        set("data_dir", v.display().to_string().into());
    }
    if let Some(v) = a.unix_socket {
        set("unix_socket", v.display().to_string().into());
    }
    if let Some(v) = a.listen {
        set("tcp_listen", v.into());
    }
    if !a.expect.is_empty() {
        set("expected_services", toml::Value::Array(a.expect.into_iter().map(Into::into).collect()));
    }
    let mut cluster = match table.remove("cluster") {
        Some(toml::Value::Table(t)) => t,
        _ => toml::Table::new(),
    };
    if let Some(v) = a.cluster_listen {
        cluster.insert("listen".into(), v.into());
    }
    if !a.neighbors.is_empty() {
        cluster.insert("neighbors".into(), toml::Value::Array(a.neighbors.into_iter().map(Into::into).collect()));
    }
    if let Some(v) = a.secret {
        cluster.insert("secret".into(), v.into());
    }
    if let Some(v) = a.udp_listen {
        cluster.insert("udp_listen".into(), v.into());
    }
    table.insert("cluster".into(), toml::Value::Table(cluster));
    if let Some(v) = a.locator_listen {
        let mut apps = match table.remove("apps") {
            Some(toml::Value::Table(t)) => t,
            _ => toml::Table::new(),
        };
        apps.insert("locator_listen".into(), v.into());
        table.insert("apps".into(), toml::Value::Table(apps));
    }
    let config = Config::from_toml(&table.to_string())?;
    // Installed before any listener exists: a SIGTERM or Ctrl-C that arrives as soon as a client
    // can connect must already mean a graceful shutdown, not the default (immediate) death.
    let shutdown = shutdown_signal()?;
    let daemon = Daemon::bind(config).await?;
    let Some(addr) = daemon.tcp_addr().map(|a| a.to_string()).or(daemon.unix_path().map(|p| p.display().to_string()))
    else {
        bail!("no listener configured: set tcp_listen or unix_socket");
    };
    tracing::info!(server = daemon.server_name(), %addr, "nodus node ready");
    daemon.run(shutdown).await?;
    Ok(0)
}

/// Registers SIGTERM and SIGINT now; the returned future completes at the first of them.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
