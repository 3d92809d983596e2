//! The `nodus` command line: one module per command group, each an `Args` struct and
//! `async fn run(ctx, args) -> Result<ExitCode>`, over the typed calls of
//! [`nodus_client::admin`] and the one output layer ([`crate::output`]).
//!
//! Exit codes: 0 success; 1 the node or a service refused or failed what was asked (a refusal,
//! an `ERROR` reply, a message that was not delivered); 2 anything else (bad arguments, no node to
//! talk to, a broken connection).

mod agents;
mod app;
mod call;
mod cluster;
mod config;
mod control;
mod daemon;
mod echo_worker;
mod flags;
mod send;
mod serve;
mod services;
mod shell;
mod sniff;
mod status;
mod task;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use nodus_client::{AdminError, Client, ClientConfig, ClientError, Endpoint, Incoming};
use std::path::{Path, PathBuf};

pub use daemon::{DaemonArgs, LogArgs, LogFormat};

/// The data directory a node uses when none is configured (relative to its working directory).
pub const DEFAULT_DATA_DIR: &str = "nodus-data";
/// Every port of instance N is the default port plus `N * INSTANCE_PORT_STEP`.
pub const INSTANCE_PORT_STEP: u16 = 10;

/// nodus: a self-hosted cluster runtime. One daemon per host routes messages between services
/// across the cluster and runs apps; the other commands talk to a node.
#[derive(Parser, Debug)]
#[command(name = "nodus", version, about, long_about = None, after_help = AFTER_HELP)]
pub struct Args {
    /// Which node to talk to (also accepted after the subcommand).
    #[command(flatten)]
    pub conn: TopConnArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

const AFTER_HELP: &str = "Without --node, commands talk to ./nodus-data/nodus.sock when it exists (the node \
started in this directory), else to 127.0.0.1:4040. Logs: RUST_LOG=debug (or --log-level for the daemon).";

/// How a command reaches its node. Accepted before or after the subcommand.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ConnArgs {
    /// The node to talk to: host:port, unix:/path or a socket path such as nodus-data/nodus.sock
    /// [default: ./nodus-data/nodus.sock when it exists, else 127.0.0.1:4040]
    #[arg(long, global = true, env = "NODUS_NODE", value_name = "ADDR")]
    pub node: Option<String>,
    /// Talk to the node started with `nodus daemon --instance N` in this directory.
    #[arg(long, global = true, value_name = "N", conflicts_with = "node")]
    pub instance: Option<u16>,
    /// A file holding the node's token (for TCP; the node's own user needs none on the Unix
    /// socket). Default: $NODUS_TOKEN, else ./nodus-data/auth.token when talking TCP.
    #[arg(long, global = true, env = "NODUS_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Machine-readable JSON output (errors too).
    #[arg(long, global = true)]
    pub json: bool,
}

/// [`ConnArgs`] given before the subcommand: the same flags, not propagated to subcommands (so
/// that `nodus daemon --help` lists only what the daemon uses).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TopConnArgs {
    /// The node to talk to: host:port, unix:/path or a socket path such as nodus-data/nodus.sock
    /// [default: ./nodus-data/nodus.sock when it exists, else 127.0.0.1:4040]
    #[arg(long, env = "NODUS_NODE", value_name = "ADDR")]
    pub node: Option<String>,
    /// Talk to the node started with `nodus daemon --instance N` in this directory.
    #[arg(long, value_name = "N", conflicts_with = "node")]
    pub instance: Option<u16>,
    /// A file holding the node's token (see `--token-file` of each command).
    #[arg(long, env = "NODUS_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Machine-readable JSON output (errors too).
    #[arg(long)]
    pub json: bool,
}

impl From<&TopConnArgs> for ConnArgs {
    fn from(t: &TopConnArgs) -> ConnArgs {
        ConnArgs { node: t.node.clone(), instance: t.instance, token_file: t.token_file.clone(), json: t.json }
    }
}

impl ConnArgs {
    /// `self` with anything unset taken from `outer` (the flags given before the subcommand).
    fn or(&self, outer: &ConnArgs) -> ConnArgs {
        ConnArgs {
            node: self.node.clone().or_else(|| outer.node.clone()),
            instance: self.instance.or(outer.instance),
            token_file: self.token_file.clone().or_else(|| outer.token_file.clone()),
            json: self.json || outer.json,
        }
    }
}

/// A client command's arguments with its connection flags.
#[derive(clap::Args, Debug)]
pub struct With<T: clap::Args> {
    #[command(flatten)]
    conn: ConnArgs,
    #[command(flatten)]
    args: T,
}

/// A client command group's subcommand with its connection flags.
#[derive(clap::Args, Debug)]
pub struct Group<T: clap::Subcommand> {
    #[command(flatten)]
    conn: ConnArgs,
    #[command(subcommand)]
    command: T,
}

/// What to do.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a node (embedded defaults; state in ./nodus-data).
    Daemon(DaemonArgs),
    /// Send one message, e.g. `nodus send 'images/REPROCESS url=x;priority=1'`. Exit 0 when it was
    /// delivered or cached, 1 when a node refused or dropped it.
    Send(With<send::Args>),
    /// Send a request and print the reply: `nodus call SERVICE COMMAND [name=value ...]`.
    Call(With<call::Args>),
    /// Be a service from the shell: register NAME and run a command for every message.
    Serve(With<serve::Args>),
    /// Show the messages passing through the node, live.
    Sniff(With<sniff::Args>),
    /// List the services registered on the node (with --cluster: on every live node).
    Services(With<services::Args>),
    /// Show the node's state and counters.
    Status(With<status::StatusArgs>),
    /// Ask the node to stop gracefully and wait until it has.
    Stop(With<status::StopArgs>),
    /// Print the embedded default configuration (TOML, or JSON with --json).
    Config(config::Args),
    /// Cluster state and operations.
    Cluster(Group<cluster::Command>),
    /// Deploy and run apps (worker processes supervised by the node).
    App(Group<app::Command>),
    /// Raise, lower and list flags (communicatord's): `count`/`raised` exit 1 when a flag is up.
    Flags(Group<flags::Command>),
    /// Draw the components of the cluster (nodes, services, apps, workers) by who started whom.
    Tree(With<control::TreeArgs>),
    /// Monitor components: a live table of their answers (`--json`: once).
    Monitor(With<control::MonitorArgs>),
    /// Kill a component and everything it started (needs admin).
    Kill(With<control::KillArgs>),
    /// Run procedures of apps as durable tasks: run, submit, get, wait, list, abort, watch.
    Task(Group<task::Command>),
    /// A manager node's agent registry (its worker nodes); ban or unban one.
    Agents(With<agents::Args>),
    /// Print the version of this nodus binary.
    Version(config::VersionArgs),
    /// Print a shell completion script: `nodus completions bash > /etc/bash_completion.d/nodus`.
    Completions(shell::CompletionsArgs),
    /// Print the man page (roff): `nodus man > nodus.1 && man ./nodus.1`.
    Man(shell::ManArgs),
    /// A built-in example worker (echo, upper, fail): deploy it with a manifest whose executable
    /// is this binary and whose args are ["echo-worker"].
    #[command(hide = true)]
    EchoWorker(echo_worker::Args),
}

impl Args {
    /// The connection flags in effect (after the subcommand overriding before it), for client
    /// commands.
    pub fn conn(&self) -> ConnArgs {
        let outer = ConnArgs::from(&self.conn);
        let inner = match &self.command {
            Command::Send(w) => &w.conn,
            Command::Call(w) => &w.conn,
            Command::Serve(w) => &w.conn,
            Command::Sniff(w) => &w.conn,
            Command::Services(w) => &w.conn,
            Command::Status(w) => &w.conn,
            Command::Stop(w) => &w.conn,
            Command::Cluster(g) => &g.conn,
            Command::App(g) => &g.conn,
            Command::Flags(g) => &g.conn,
            Command::Tree(w) => &w.conn,
            Command::Monitor(w) => &w.conn,
            Command::Kill(w) => &w.conn,
            Command::Task(g) => &g.conn,
            Command::Agents(w) => &w.conn,
            Command::Config(c) => return ConnArgs { json: c.json || outer.json, ..outer },
            Command::Version(c) => return ConnArgs { json: c.json || outer.json, ..outer },
            Command::Daemon(_) | Command::Completions(_) | Command::Man(_) | Command::EchoWorker(_) => return outer,
        };
        inner.or(&outer)
    }
}

/// What every client command needs: where the node is, how to authenticate, how to print.
pub struct Ctx {
    /// The node, resolved.
    pub node: String,
    /// The token to present, when one was found.
    token: Option<String>,
    /// `--json`.
    pub json: bool,
    /// `--instance`, when given.
    pub instance: Option<u16>,
}

impl Ctx {
    /// Resolves the node and the credentials (see [`ConnArgs`]) from the environment and the
    /// working directory.
    ///
    /// Fails when a token file was named but cannot be read.
    pub fn new(conn: &ConnArgs) -> anyhow::Result<Ctx> {
        Ctx::resolve(conn, std::env::var("NODUS_TOKEN").ok(), Path::new("."))
    }

    /// [`Ctx::new`] with the `NODUS_TOKEN` value and the directory to look in given.
    ///
    /// The node: `--node` (an existing socket file is a Unix socket whatever its name); else the
    /// socket of the node started in `dir` (`nodus-data/nodus.sock`,
    /// or `nodus-data-N/nodus.sock` with `--instance N`) when it exists; else its TCP address.
    /// The token: `NODUS_TOKEN`; else `--token-file`; else, for TCP only, the node's own
    /// `auth.token` in that data directory when it is readable. On the Unix socket the node's own
    /// user needs no token (the node checks its peer's credentials).
    fn resolve(conn: &ConnArgs, env_token: Option<String>, dir: &Path) -> anyhow::Result<Ctx> {
        let data_dir = match conn.instance {
            Some(n) if n > 0 => dir.join(format!("{DEFAULT_DATA_DIR}-{n}")),
            _ => dir.join(DEFAULT_DATA_DIR),
        };
        let node = match &conn.node {
            // A socket path as the daemon logs it, whatever it looks like (`--unix-socket n`).
            Some(node) if !matches!(node.parse::<Endpoint>(), Ok(Endpoint::Unix(_))) && is_socket(Path::new(node)) => {
                format!("unix:{node}")
            }
            Some(node) => node.clone(),
            None => {
                let socket = data_dir.join("nodus.sock");
                if is_socket(&socket) {
                    // Shown as the daemon logs it: relative to the working directory.
                    socket.strip_prefix(".").unwrap_or(&socket).display().to_string()
                } else {
                    let step = conn.instance.unwrap_or(0).saturating_mul(INSTANCE_PORT_STEP);
                    format!("127.0.0.1:{}", 4040u16.saturating_add(step))
                }
            }
        };
        let tcp = matches!(node.parse::<Endpoint>(), Ok(Endpoint::Tcp(_)));
        let token = if let Some(t) = env_token.filter(|t| !t.trim().is_empty()) {
            Some(t.trim().to_string())
        } else if let Some(file) = &conn.token_file {
            Some(read_token(file)?)
        } else if tcp {
            // The daemon's own token, when this user can read it (the zero-configuration case).
            read_token(&data_dir.join("auth.token")).ok()
        } else {
            None
        };
        Ok(Ctx { node, token, json: conn.json, instance: conn.instance })
    }

    /// Client settings for a one-off command: no reconnecting, the token when there is one.
    pub fn config(&self) -> ClientConfig {
        self.reconnecting().no_reconnect()
    }

    /// Client settings for a long-running service: reconnects when the node restarts.
    pub fn reconnecting(&self) -> ClientConfig {
        let config = ClientConfig::new(&self.node);
        match &self.token {
            Some(t) => config.token(t),
            None => config,
        }
    }

    /// An anonymous connection (messages not answering its requests are dropped).
    ///
    /// Fails when the node cannot be reached.
    pub async fn client(&self) -> anyhow::Result<Client> {
        Ok(self.connect(self.config()).await?.0)
    }

    /// A connection with `config` and its incoming stream.
    ///
    /// Fails when the node cannot be reached or refuses the registration.
    pub async fn connect(&self, config: ClientConfig) -> anyhow::Result<(Client, Incoming)> {
        Client::connect(config).await.map_err(anyhow::Error::from)
    }
}

fn is_socket(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the token file {}", path.display()))?;
    Ok(text.trim().to_string())
}

/// The node or a service refused or failed what was asked: exit status 1.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Failure(pub String);

/// The exit status for an error: 1 for refusals and failures reported by a node or a service, 2
/// for everything else.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    let refused = |c: &ClientError| {
        matches!(c, ClientError::Refused(_) | ClientError::Register(_) | ClientError::Unauthorized(_))
    };
    let failed = e.downcast_ref::<Failure>().is_some()
        || e.downcast_ref::<ClientError>().is_some_and(refused)
        || e.downcast_ref::<AdminError>().is_some_and(|a| match a {
            AdminError::Client(c) => refused(c),
            AdminError::Failed { .. } | AdminError::UnknownNode(_) => true,
            AdminError::Unexpected { .. } | AdminError::Malformed(_) => false,
        });
    if failed {
        1
    } else {
        2
    }
}

/// Runs the command; returns the process exit status.
///
/// Fails when the node cannot be reached, refuses, or the arguments are invalid.
pub async fn run(args: Args) -> anyhow::Result<u8> {
    let conn = args.conn();
    match args.command {
        Command::Daemon(a) => daemon::run(a).await,
        Command::Config(a) => config::run(conn.json, a),
        Command::Version(a) => config::version(conn.json, a),
        Command::Completions(a) => shell::completions(a),
        Command::Man(a) => shell::man(a),
        Command::EchoWorker(a) => echo_worker::run(a).await,
        Command::Send(w) => send::run(&Ctx::new(&conn)?, w.args).await,
        Command::Call(w) => call::run(&Ctx::new(&conn)?, w.args).await,
        Command::Serve(w) => serve::run(&Ctx::new(&conn)?, w.args).await,
        Command::Sniff(w) => sniff::run(&Ctx::new(&conn)?, w.args).await,
        Command::Services(w) => services::run(&Ctx::new(&conn)?, w.args).await,
        Command::Status(w) => status::status(&conn, w.args).await,
        Command::Stop(w) => status::stop(&Ctx::new(&conn)?, w.args).await,
        Command::Cluster(g) => cluster::run(&Ctx::new(&conn)?, g.command).await,
        Command::App(g) => app::run(&Ctx::new(&conn)?, g.command).await,
        Command::Flags(g) => flags::run(&Ctx::new(&conn)?, g.command).await,
        Command::Tree(w) => control::tree(&Ctx::new(&conn)?, w.args).await,
        Command::Monitor(w) => control::monitor(&Ctx::new(&conn)?, w.args).await,
        Command::Kill(w) => control::kill(&Ctx::new(&conn)?, w.args).await,
        Command::Task(g) => task::run(&Ctx::new(&conn)?, g.command).await,
        Command::Agents(w) => agents::run(&Ctx::new(&conn)?, w.args).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn connection_flags_work_before_and_after_the_subcommand() {
        let a = Args::try_parse_from(["nodus", "--json", "--node", "x:1", "status"]).unwrap();
        assert_eq!((a.conn().node.as_deref(), a.conn().json), (Some("x:1"), true));
        let a = Args::try_parse_from(["nodus", "--node", "x:1", "cluster", "status", "--node", "y:2"]).unwrap();
        assert_eq!(a.conn().node.as_deref(), Some("y:2"));
        let a = Args::try_parse_from(["nodus", "app", "list", "--json"]).unwrap();
        assert!(a.conn().json);
    }

    #[test]
    fn the_node_and_its_token_are_found_without_flags() {
        let dir = tempfile::tempdir().unwrap();
        let conn = ConnArgs::default();
        // Nothing here: the default TCP address, no token.
        let ctx = Ctx::resolve(&conn, None, dir.path()).unwrap();
        assert_eq!((ctx.node.as_str(), ctx.token.as_deref()), ("127.0.0.1:4040", None));
        // The node's token file is used for TCP.
        let data = dir.path().join("nodus-data");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("auth.token"), "ab12\n").unwrap();
        assert_eq!(Ctx::resolve(&conn, None, dir.path()).unwrap().token.as_deref(), Some("ab12"));
        // NODUS_TOKEN wins over files; --token-file over the data directory's.
        assert_eq!(Ctx::resolve(&conn, Some("env".into()), dir.path()).unwrap().token.as_deref(), Some("env"));
        let file = dir.path().join("t");
        std::fs::write(&file, "fromfile").unwrap();
        let with_file = ConnArgs { token_file: Some(file), ..ConnArgs::default() };
        assert_eq!(Ctx::resolve(&with_file, None, dir.path()).unwrap().token.as_deref(), Some("fromfile"));
        let missing = ConnArgs { token_file: Some(dir.path().join("absent")), ..ConnArgs::default() };
        assert!(Ctx::resolve(&missing, None, dir.path()).is_err(), "a named token file must exist");
        // The node's socket in the data directory is preferred, and needs no token.
        let _listener = std::os::unix::net::UnixListener::bind(data.join("nodus.sock")).unwrap();
        let ctx = Ctx::resolve(&conn, None, dir.path()).unwrap();
        assert_eq!(ctx.node, data.join("nodus.sock").display().to_string());
        assert_eq!(ctx.token, None);
        // An instance's address.
        let two = ConnArgs { instance: Some(2), ..ConnArgs::default() };
        assert_eq!(Ctx::resolve(&two, None, dir.path()).unwrap().node, "127.0.0.1:4060");
        // --node is taken as given.
        let given = ConnArgs { node: Some("10.0.0.1:4040".into()), ..ConnArgs::default() };
        assert_eq!(Ctx::resolve(&given, None, dir.path()).unwrap().node, "10.0.0.1:4040");
    }

    #[test]
    fn daemon_help_lists_only_what_the_daemon_uses() {
        let mut cmd = Args::command();
        let daemon = cmd.find_subcommand_mut("daemon").unwrap();
        let help = daemon.render_long_help().to_string();
        for client_only in ["--node", "--json", "--token-file"] {
            assert!(!help.contains(client_only), "{client_only} in daemon --help:\n{help}");
        }
        assert!(help.contains("--log-format") && help.contains("--instance"), "{help}");
    }
}
