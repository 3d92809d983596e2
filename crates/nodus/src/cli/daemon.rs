//! `nodus daemon`: run a node. Flags override the config file, which overrides the embedded
//! default; `--instance N` derives every listener, the data directory and the server name so that
//! several nodes run on one host without clashing.
//!
//! Signals: SIGTERM and SIGINT stop the node gracefully; SIGHUP is logged and ignored (nothing is
//! reloadable yet), never a silent exit.

use anyhow::{bail, Context};
use nodus_daemon::{Config, Daemon};
use std::path::PathBuf;

/// Default ports, in the order of the embedded default configuration.
const TCP_PORT: u16 = 4040;
const UDP_PORT: u16 = 4041;
const CLUSTER_PORT: u16 = 4042;
const TLS_PORT: u16 = 4043;
const LOCATOR_PORT: u16 = 10053;
const HTTP_PORT: u16 = 4080;
const ARPCP_PORT: u16 = 7018;

/// How the daemon logs (stderr).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct LogArgs {
    /// Log level or filter: error, warn, info, debug, trace, or a RUST_LOG-style filter such as
    /// `info,nodus_daemon=debug` [default: $RUST_LOG, else info]
    #[arg(long = "log-level", value_name = "FILTER")]
    pub level: Option<String>,
    /// Log format: text (colours only on a terminal) or json (one object per line).
    #[arg(long = "log-format", value_enum, default_value_t = LogFormat::Text)]
    pub format: LogFormat,
}

/// A log line format.
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `nodus daemon` options; each overrides the config file, which overrides the embedded default.
#[derive(clap::Args, Debug)]
pub struct DaemonArgs {
    /// TOML configuration file (`nodus config` prints every key with its default).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Run instance N (1, 2, ...) of several nodes on this host: data in ./nodus-data-N, server
    /// name HOSTNAME-N, every port the default + 10×N (TCP 4040+10N, UDP 4041+10N, cluster
    /// 4042+10N, TLS 4043+10N, locator 10053+10N, arpcp 7018+10N). Other flags still override.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=999))]
    instance: Option<u16>,
    /// This node's server name [default: the host name].
    #[arg(long)]
    server_name: Option<String>,
    /// Data directory (relative to the working directory) [default: nodus-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Unix socket path [default: <data-dir>/nodus.sock].
    #[arg(long)]
    unix_socket: Option<PathBuf>,
    /// TCP listen address, host:port; '' disables TCP [default: 127.0.0.1:4040].
    #[arg(long)]
    listen: Option<String>,
    /// A service whose messages are cached until it registers (repeatable).
    #[arg(long = "expect", value_name = "SERVICE")]
    expect: Vec<String>,
    /// Cluster listener address; '' disables cluster links [default: 127.0.0.1:4042].
    #[arg(long)]
    cluster_listen: Option<String>,
    /// A neighbour's cluster address to link with (repeatable).
    #[arg(long = "neighbor", value_name = "ADDR")]
    neighbors: Vec<String>,
    /// Shared cluster secret. Prefer `secret_file` in the config or the NODUS_SECRET environment
    /// variable: a command line is visible to every local user.
    #[arg(long)]
    secret: Option<String>,
    /// UDP signal port address; '' disables it [default: 127.0.0.1:4041].
    #[arg(long)]
    udp_listen: Option<String>,
    /// Cocaine-compatible locator address; '' disables it [default: 127.0.0.1:10053].
    #[arg(long)]
    locator_listen: Option<String>,
    /// HTTP listener (gateway, API, dashboard, metrics); '' disables it [default: 127.0.0.1:4080].
    #[arg(long)]
    http_listen: Option<String>,
    /// The task service's arpcp listener; '' disables it [default: 127.0.0.1:7018].
    #[arg(long)]
    arpcp_listen: Option<String>,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}

/// Typed flag values laid over the configuration: each sets one field of [`Config`].
#[derive(Debug, Default, PartialEq)]
struct Overrides {
    server_name: Option<String>,
    data_dir: Option<PathBuf>,
    unix_socket: Option<PathBuf>,
    tcp_listen: Option<String>,
    expected_services: Vec<String>,
    cluster_listen: Option<String>,
    neighbors: Vec<String>,
    secret: Option<String>,
    udp_listen: Option<String>,
    tls_listen: Option<String>,
    locator_listen: Option<String>,
    http_listen: Option<String>,
    arpcp_listen: Option<String>,
}

impl Overrides {
    /// The flags, with `--instance` filling what they leave unset.
    fn from_args(a: &DaemonArgs) -> Overrides {
        let mut o = Overrides {
            server_name: a.server_name.clone(),
            data_dir: a.data_dir.clone(),
            unix_socket: a.unix_socket.clone(),
            tcp_listen: a.listen.clone(),
            expected_services: a.expect.clone(),
            cluster_listen: a.cluster_listen.clone(),
            neighbors: a.neighbors.clone(),
            secret: a.secret.clone(),
            udp_listen: a.udp_listen.clone(),
            tls_listen: None,
            locator_listen: a.locator_listen.clone(),
            http_listen: a.http_listen.clone(),
            arpcp_listen: a.arpcp_listen.clone(),
        };
        if let Some(n) = a.instance {
            let port = |base: u16| format!("127.0.0.1:{}", base + super::INSTANCE_PORT_STEP * n);
            o.server_name.get_or_insert_with(|| format!("{}-{n}", nodus_daemon::config::host_name()));
            o.data_dir.get_or_insert_with(|| PathBuf::from(format!("{}-{n}", super::DEFAULT_DATA_DIR)));
            o.tcp_listen.get_or_insert_with(|| port(TCP_PORT));
            o.udp_listen.get_or_insert_with(|| port(UDP_PORT));
            o.cluster_listen.get_or_insert_with(|| port(CLUSTER_PORT));
            o.tls_listen = Some(port(TLS_PORT));
            o.locator_listen.get_or_insert_with(|| port(LOCATOR_PORT));
            o.http_listen.get_or_insert_with(|| port(HTTP_PORT));
            o.arpcp_listen.get_or_insert_with(|| port(ARPCP_PORT));
        }
        o
    }

    /// Sets the fields the flags name. A list given by flags replaces the file's list. When the
    /// socket path was derived from the data directory (`<data_dir>/nodus.sock`, nobody set it),
    /// it follows a new data directory.
    fn apply(self, c: &mut Config) {
        // Unset (resolved later from the data directory) or set to the derived path: follows.
        let derived_socket = c.unix_socket.as_os_str().is_empty() || c.unix_socket == c.data_dir.join("nodus.sock");
        if let Some(v) = self.server_name {
            c.server_name = v;
        }
        if let Some(v) = self.data_dir {
            if derived_socket {
                c.unix_socket = v.join("nodus.sock");
            }
            c.data_dir = v;
        }
        if let Some(v) = self.unix_socket {
            c.unix_socket = v;
        }
        if let Some(v) = self.tcp_listen {
            c.tcp_listen = v;
        }
        if !self.expected_services.is_empty() {
            c.expected_services = self.expected_services;
        }
        if let Some(v) = self.cluster_listen {
            c.cluster.listen = v;
        }
        if !self.neighbors.is_empty() {
            c.cluster.neighbors = self.neighbors;
        }
        if let Some(v) = self.secret {
            // The flag replaces whatever the file said, a secret_file included.
            c.cluster.secret = v;
            c.cluster.secret_file = PathBuf::new();
        }
        if let Some(v) = self.udp_listen {
            c.cluster.udp_listen = v;
        }
        if let Some(v) = self.tls_listen {
            c.cluster.tls_listen = v;
        }
        if let Some(v) = self.locator_listen {
            c.apps.locator_listen = v;
        }
        if let Some(v) = self.http_listen {
            c.http.listen = v;
        }
        if let Some(v) = self.arpcp_listen {
            c.tasks.arpcp_listen = v;
        }
    }
}

/// Builds the configuration: embedded default, then the file (`Config::load`, not yet
/// resolved), then the flags (typed fields), then one `resolve` of the whole: derived values
/// (server name, socket path from the data directory), secrets from their files or the
/// environment, validation.
fn config(a: &DaemonArgs) -> anyhow::Result<Config> {
    let mut config = match &a.config {
        Some(p) => Config::load(p).with_context(|| format!("in {}", p.display()))?,
        None => Config::parse("").context("in the embedded default configuration")?,
    };
    Overrides::from_args(a).apply(&mut config);
    config.resolve().context("after applying the command-line flags")?;
    Ok(config)
}

/// Runs a node until SIGTERM, SIGINT, `nodus stop` or `nodus cluster shutdown`.
///
/// Fails when the configuration is invalid or a listener cannot be bound.
pub async fn run(a: DaemonArgs) -> anyhow::Result<u8> {
    let config = config(&a)?;
    // Installed before any listener exists: a signal that arrives as soon as a client can connect
    // must already mean a graceful shutdown (SIGTERM, SIGINT) or nothing (SIGHUP), never the
    // default action (immediate death).
    let shutdown = signals()?;
    let daemon = Daemon::bind(config).await?;
    let Some(addr) = daemon.tcp_addr().map(|a| a.to_string()).or(daemon.unix_path().map(|p| p.display().to_string()))
    else {
        bail!("no listener configured: set tcp_listen or unix_socket");
    };
    tracing::info!(server = daemon.server_name(), %addr, "nodus node ready");
    daemon.run(shutdown).await?;
    Ok(0)
}

/// Registers SIGTERM, SIGINT and SIGHUP now; the returned future completes at the first SIGTERM
/// or SIGINT. Each SIGHUP is logged and otherwise ignored.
fn signals() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    Ok(async move {
        loop {
            tokio::select! {
                _ = term.recv() => return,
                _ = int.recv() => return,
                _ = hup.recv() => tracing::warn!(
                    "SIGHUP received: nothing to reload (restart the node to apply configuration changes); \
                     still running. Use SIGTERM or `nodus stop` to stop"
                ),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> DaemonArgs {
        #[derive(clap::Parser)]
        struct P {
            #[command(flatten)]
            d: DaemonArgs,
        }
        P::parse_from(std::iter::once("daemon").chain(args.iter().copied())).d
    }

    #[test]
    fn an_instance_derives_every_listener_the_data_dir_and_the_name() {
        let c = config(&parse(&["--instance", "2", "--udp-listen", ""])).unwrap();
        assert_eq!(c.tcp_listen, "127.0.0.1:4060");
        assert_eq!(c.cluster.listen, "127.0.0.1:4062");
        assert_eq!(c.cluster.tls_listen, "127.0.0.1:4063");
        assert_eq!(c.apps.locator_listen, "127.0.0.1:10073");
        assert_eq!(c.http.listen, "127.0.0.1:4100");
        assert_eq!(c.tasks.arpcp_listen, "127.0.0.1:7038");
        assert_eq!(c.cluster.udp_listen, "", "a flag still overrides the instance");
        assert_eq!(c.data_dir, PathBuf::from("nodus-data-2"));
        assert_eq!(c.unix_socket, PathBuf::from("nodus-data-2/nodus.sock"));
        assert!(c.server_name.ends_with("-2"), "{}", c.server_name);
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("n.toml");
        std::fs::write(&file, "server_name = \"file\"\n[cluster]\nsecret = \"s\"\nheartbeat_ms = 100\n").unwrap();
        let file = file.display().to_string();
        let c = config(&parse(&["--config", &file, "--server-name", "flag", "--neighbor", "10.0.0.1:4042"])).unwrap();
        assert_eq!(c.server_name, "flag");
        assert_eq!((c.cluster.secret.as_str(), c.cluster.heartbeat_ms), ("s", 100), "the file's keys stay");
        assert_eq!(c.cluster.neighbors, ["10.0.0.1:4042"]);
    }

    #[test]
    fn the_socket_follows_the_data_dir_unless_someone_set_it() {
        let c = config(&parse(&["--data-dir", "/srv/n"])).unwrap();
        assert_eq!(c.unix_socket, PathBuf::from("/srv/n/nodus.sock"));
        let c = config(&parse(&["--data-dir", "/srv/n", "--unix-socket", "/run/n.sock"])).unwrap();
        assert_eq!(c.unix_socket, PathBuf::from("/run/n.sock"));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("n.toml");
        std::fs::write(&file, "unix_socket = \"/run/file.sock\"\n").unwrap();
        let file = file.display().to_string();
        let c = config(&parse(&["--config", &file, "--data-dir", "/srv/n"])).unwrap();
        assert_eq!(c.unix_socket, PathBuf::from("/run/file.sock"), "the file's socket stays");
    }

    #[test]
    fn a_flag_with_a_bad_value_is_refused_with_its_reason() {
        let e = config(&parse(&["--server-name", "bad name"])).unwrap_err();
        assert!(format!("{e:#}").contains("server_name"), "{e:#}");
        let e = config(&parse(&["--expect", "no/slash"])).unwrap_err();
        assert!(format!("{e:#}").contains("expected_services"), "{e:#}");
    }
}
