//! Node configuration: an embedded default, overridden by a TOML file and by flags.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The embedded default configuration (also the documentation of every key).
pub const DEFAULT_TOML: &str = include_str!("default.toml");

/// Node configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's server name; empty means the host name.
    pub server_name: String,
    /// Directory holding the node's state.
    pub data_dir: PathBuf,
    /// Unix socket path; empty means `<data_dir>/nodus.sock`.
    pub unix_socket: PathBuf,
    /// TCP listen address; empty disables the TCP listener.
    pub tcp_listen: String,
    /// Services whose messages are cached until they register.
    pub expected_services: Vec<String>,
    /// Resource bounds.
    pub limits: Limits,
    /// Cluster links, failure detection, UDP and TLS.
    pub cluster: ClusterConfig,
    /// Deployed apps.
    pub apps: AppsConfig,
    /// Who may do what.
    pub access: AccessConfig,
    /// The HTTP listener.
    pub http: HttpConfig,
    /// The control plane: component tree, kill, flags.
    pub control: ControlConfig,
    /// Tasks: the durable store, the executor, the arpcp listener.
    pub tasks: TasksConfig,
}

/// The `[http]` section: the gateway, the REST API, the dashboard and the metrics on one
/// listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address; empty disables HTTP.
    pub listen: String,
    /// File whose first line is the bearer token beyond loopback; empty: the node's token file.
    pub token_file: PathBuf,
    /// Ask loopback peers for the token too.
    pub token_on_loopback: bool,
    /// Gateway routes open without the token: `APP` or `APP/EVENT`.
    pub public: Vec<String>,
    /// Serve HTTPS.
    pub tls: bool,
    /// Certificate chain (PEM); empty: the cluster's.
    pub tls_cert: PathBuf,
    /// Private key (PEM); empty: the cluster's.
    pub tls_key: PathBuf,
    /// Connections open at once.
    pub max_connections: usize,
    /// Gateway requests served at once.
    pub max_in_flight: usize,
    /// Largest gateway request body, bytes.
    pub max_body_bytes: u64,
    /// Longest wait for a worker's response head, seconds.
    pub head_timeout_secs: u64,
    /// Longest wait for a request's headers on a connection, seconds (slow clients are closed).
    pub header_timeout_secs: u64,
    /// Longest wait for the next piece of a request or response body, seconds.
    pub idle_timeout_secs: u64,
}

impl HttpConfig {
    /// The certificate and key HTTPS serves with: the section's own, else the cluster's; `None`
    /// without TLS.
    pub fn tls_files<'a>(&'a self, cluster: &'a ClusterConfig) -> Option<(&'a Path, &'a Path)> {
        if !self.tls {
            return None;
        }
        if self.tls_cert.as_os_str().is_empty() {
            Some((&cluster.tls_cert, &cluster.tls_key))
        } else {
            Some((&self.tls_cert, &self.tls_key))
        }
    }
}

/// The `[control]` section: the component tree, the kill cascade and flags.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Most components the node tracks.
    pub max_components: usize,
    /// Longest wait for the components a killed one started, ms.
    pub child_wait_ms: i64,
    /// Longest wait for a killed component to confirm it stopped, ms.
    pub stop_grace_ms: i64,
    /// How long a monitoring request waits for its answer when it names no `_expires_at`, ms.
    pub monitoring_timeout_ms: i64,
    /// Directory of the node's flags; empty means `<data_dir>/flags`.
    pub flags_dir: PathBuf,
    /// Most flags kept (past it the "too many flags" flag is raised).
    pub flags_limit: usize,
    /// A node unreachable this long raises the node's `nodus/cluster/node-unreachable` flag, s.
    pub unreachable_flag_secs: u64,
    /// How often the node checks that it can write its data directory, s.
    pub write_check_secs: u64,
}

impl ControlConfig {
    /// Where the flags of a node whose data directory is `data_dir` are kept.
    pub fn flags_path(&self, data_dir: &Path) -> PathBuf {
        if self.flags_dir.as_os_str().is_empty() {
            data_dir.join("flags")
        } else {
            self.flags_dir.clone()
        }
    }
}

/// The `[tasks]` section: the task service (`tasks`), its store and the arpcp listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TasksConfig {
    /// Run the task service (it needs `[apps] enabled`: procedures are app events).
    pub enabled: bool,
    /// The store: `sqlite`, the file `<data_dir>/tasks.db`, or a `postgres://` URL (a database
    /// several manager nodes share).
    pub store: String,
    /// SQLite `synchronous`: `off`, `normal`, `full` or `extra`.
    pub synchronous: String,
    /// How long a finished task and its result are kept, seconds.
    pub result_ttl_secs: u64,
    /// Largest store file, bytes; beyond it submissions are refused (arpcp 300).
    pub max_store_bytes: u64,
    /// Attempts of a task whose worker process keeps failing, unless it sets its own.
    pub max_attempts: u32,
    /// Delay before retrying a task whose worker failed: from this, doubling, ms.
    pub retry_min_ms: u64,
    /// Longest delay between retries, ms.
    pub retry_max_ms: u64,
    /// Timeout of a task that does not set one, seconds.
    pub default_timeout_secs: u64,
    /// Longest timeout a task may set, seconds.
    pub max_timeout_secs: u64,
    /// Largest arguments, bytes of JSON.
    pub max_args_bytes: usize,
    /// Largest result, bytes the worker writes.
    pub max_result_bytes: usize,
    /// Most tasks one app runs or has queued at once (also bounded by its profile).
    pub max_inflight_per_app: usize,
    /// Where `TASK_STATUS` notifications go: `service:NAME`, `app:APP.EVENT`, or empty (none).
    pub notify: String,
    /// Requests of the `tasks` service waiting for tasks to finish (`TASK`, `WAIT`) at once.
    pub max_waiting: usize,
    /// Subscribers of the `tasks` service's `WATCH` at once.
    pub max_watchers: usize,
    /// The arpcp listener (seed 004); empty disables it.
    pub arpcp_listen: String,
    /// Client networks served besides loopback (`10.0.0.0/8`); needed to listen beyond loopback.
    pub arpcp_allow: Vec<String>,
    /// arpcp connections served at once.
    pub arpcp_max_connections: usize,
    /// Longest arpcp request line, bytes.
    pub arpcp_max_line_bytes: usize,
    /// How long an arpcp client may take to send its request line, ms.
    pub arpcp_read_timeout_ms: u64,
    /// This node's part in tasks across nodes: `standalone` (runs its own tasks), `manager`
    /// (dispatches its tasks to worker nodes) or `worker` (runs its manager's tasks).
    pub role: String,
    /// A manager: the worker nodes it accepts (server names).
    pub workers: Vec<String>,
    /// A worker: the managers it may pair with (server names), in order of preference.
    pub managers: Vec<String>,
    /// A manager pings its workers, and a worker its manager, this often, ms.
    pub ping_interval_ms: u64,
    /// A worker not heard from for this long is silent, ms.
    pub silent_after_ms: u64,
    /// A worker not heard from for this long is gone (its tasks run elsewhere); a worker whose
    /// manager is silent this long pairs again, ms.
    pub gone_after_ms: u64,
    /// A manager waits this long past a task's timeout for its worker's report, then records
    /// `TimedOut` itself and aborts the task on the worker, ms.
    pub worker_grace_ms: u64,
    /// A gone agent is removed from the registry after this long, seconds.
    pub agent_remove_after_secs: u64,
    /// Tasks a worker node runs at once for its manager (0: the host's cores), and how many
    /// more it accepts waiting.
    pub worker_concurrency: u32,
    /// See `worker_concurrency`.
    pub worker_queue: u32,
    /// Largest app package, bytes: a manager packs no larger app for its workers, a worker
    /// fetches none larger (its tasks fail with `DownloadError`).
    pub max_package_bytes: u64,
}

impl TasksConfig {
    /// The SQLite file of a node whose data directory is `data_dir`.
    pub fn sqlite_path(data_dir: &Path) -> PathBuf {
        data_dir.join("tasks.db")
    }

    fn validate(&self) -> Result<(), String> {
        self.store.parse::<nodus_tasks::store::StoreSpec>()?;
        self.synchronous.parse::<nodus_tasks::Synchronous>().map_err(|e| format!("tasks.synchronous: {e}"))?;
        if !self.notify.is_empty() {
            self.notify.parse::<nodus_tasks::notify::Target>().map_err(|e| format!("tasks.notify: {e}"))?;
        }
        for n in &self.arpcp_allow {
            n.parse::<nodus_tasks::Network>().map_err(|e| format!("tasks.arpcp_allow: {e}"))?;
        }
        if !(1..=100).contains(&self.max_attempts) {
            return Err("tasks.max_attempts must be 1 to 100".into());
        }
        if self.retry_min_ms == 0 || self.retry_min_ms > self.retry_max_ms {
            return Err("tasks.retry_min_ms must be positive and at most retry_max_ms".into());
        }
        if self.default_timeout_secs == 0 || self.default_timeout_secs > self.max_timeout_secs {
            return Err("tasks.default_timeout_secs must be positive and at most max_timeout_secs".into());
        }
        if self.result_ttl_secs == 0 {
            return Err("tasks.result_ttl_secs must be positive".into());
        }
        let positive = [
            ("max_args_bytes", self.max_args_bytes),
            ("max_result_bytes", self.max_result_bytes),
            ("max_inflight_per_app", self.max_inflight_per_app),
            ("max_waiting", self.max_waiting),
            ("max_watchers", self.max_watchers),
            ("arpcp_max_connections", self.arpcp_max_connections),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("tasks.{key} must be positive"));
        }
        if self.arpcp_max_line_bytes < 1024 || self.arpcp_read_timeout_ms == 0 {
            return Err("tasks.arpcp_max_line_bytes must be at least 1024 and arpcp_read_timeout_ms positive".into());
        }
        match self.role.as_str() {
            "standalone" => {}
            "manager" if self.workers.is_empty() => {
                return Err("tasks.role is \"manager\" but tasks.workers lists no worker node".into())
            }
            "worker" if self.managers.is_empty() => {
                return Err("tasks.role is \"worker\" but tasks.managers lists no manager node".into())
            }
            "manager" | "worker" => {}
            r => return Err(format!("tasks.role is {r:?}; use \"standalone\", \"manager\" or \"worker\"")),
        }
        if self.ping_interval_ms == 0
            || self.ping_interval_ms >= self.silent_after_ms
            || self.silent_after_ms >= self.gone_after_ms
        {
            return Err("tasks: ping_interval_ms < silent_after_ms < gone_after_ms, all positive".into());
        }
        if self.worker_grace_ms == 0 {
            return Err("tasks.worker_grace_ms must be positive".into());
        }
        if self.max_package_bytes == 0 {
            return Err("tasks.max_package_bytes must be positive".into());
        }
        if let Ok(addr) = self.arpcp_listen.parse::<std::net::SocketAddr>() {
            if !addr.ip().is_loopback() && self.arpcp_allow.is_empty() {
                return Err(format!(
                    "tasks.arpcp_listen {addr} is beyond loopback: arpcp has no authentication, so set tasks.arpcp_allow to the client networks served (e.g. [\"10.0.0.0/8\"])"
                ));
            }
        }
        Ok(())
    }
}

/// The `[access]` section: principals and their permissions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    /// The node's token file; empty means `<data_dir>/auth.token`.
    pub token_file: PathBuf,
    /// User ids that are the node's owner on the Unix socket, besides the daemon's own and root.
    pub admin_uids: Vec<u32>,
    /// Permissions of clients that are not the owner (TCP without the token, other local users).
    pub anonymous: Vec<String>,
}

impl AccessConfig {
    /// Where the token is kept for a node whose data directory is `data_dir`.
    pub fn token_path(&self, data_dir: &Path) -> PathBuf {
        if self.token_file.as_os_str().is_empty() {
            data_dir.join("auth.token")
        } else {
            self.token_file.clone()
        }
    }

    /// `anonymous` as a set (names are checked by [`Config::validate`]).
    pub fn anonymous_permissions(&self) -> nodus_wire::node::Permissions {
        self.anonymous.join(",").parse().unwrap_or_default()
    }
}

/// The `[apps]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppsConfig {
    /// Run apps on this node.
    pub enabled: bool,
    /// Locator listener (and the address given to workers); empty disables it.
    pub locator_listen: String,
    /// Host the locator gives clients (here and on other nodes) for this node's apps; empty: the
    /// locator's bound IP (127.0.0.1 when bound to 0.0.0.0).
    pub locator_advertise: String,
    /// Largest deployment, bytes.
    pub max_deploy_bytes: u64,
    /// Most apps.
    pub max_apps: usize,
    /// The user app workers run as when the node runs as root; "root" allows root explicitly.
    pub run_as: String,
}

/// The `[cluster]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Plain TCP cluster listener; empty disables it.
    pub listen: String,
    /// Address advertised to other nodes; empty means `listen`.
    pub advertise: String,
    /// Neighbours to dial.
    pub neighbors: Vec<String>,
    /// Shared secret required in `CONNECT`. Prefer `secret_file` or `NODUS_SECRET`: a secret on the
    /// command line is visible to every local user.
    pub secret: String,
    /// File holding the shared secret (its first line); see [`Config::resolve`].
    pub secret_file: PathBuf,
    /// Heartbeat period, ms.
    pub heartbeat_ms: u64,
    /// Phi threshold of the failure detector.
    pub failure_phi: f64,
    /// Clock offset threshold, ms.
    pub clock_threshold_ms: i64,
    /// An unsynchronised system clock (per the kernel's NTP state) makes the clock unstable.
    pub clock_require_ntp: bool,
    /// Hop limit.
    pub max_hops: u32,
    /// Most cluster links.
    pub max_links: usize,
    /// UDP signal listener; empty disables it.
    pub udp_listen: String,
    /// Required `secret_code` on datagrams.
    pub udp_secret: String,
    /// File holding `udp_secret` (its first line); see [`Config::resolve`].
    pub udp_secret_file: PathBuf,
    /// TLS cluster listener; empty disables it.
    pub tls_listen: String,
    /// Nodes whose `SHUTDOWN` and `FORGET` this node obeys and whose clients' requests may carry
    /// `admin`; `"*"`: every node on an authenticated link (secret or TLS). Links without either
    /// never count.
    pub admin_nodes: Vec<String>,
    /// Most nodes this node knows (learned by gossip or remembered); more are ignored.
    pub max_nodes: usize,
    /// Certificate chain (PEM).
    pub tls_cert: PathBuf,
    /// Private key (PEM).
    pub tls_key: PathBuf,
    /// Cluster CA (PEM).
    pub tls_ca: PathBuf,
}

impl ClusterConfig {
    /// The address other nodes should dial.
    pub fn advertised(&self) -> &str {
        if self.advertise.is_empty() {
            if self.tls_listen.is_empty() || !self.tls() {
                &self.listen
            } else {
                &self.tls_listen
            }
        } else {
            &self.advertise
        }
    }

    /// True when links use TLS.
    pub fn tls(&self) -> bool {
        !self.tls_cert.as_os_str().is_empty()
    }
}

/// Every bound the node enforces.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest frame or line, bytes.
    pub max_frame_bytes: usize,
    /// Most simultaneous connections on each listener (client TCP, Unix socket, cluster, TLS
    /// cluster: each counts its own).
    pub max_connections: usize,
    /// How long a new connection may take to send its first complete message (form detection, the
    /// TLS handshake and, on cluster connections, the link handshake), ms. After that first
    /// message a client may stay idle for as long as it likes.
    pub handshake_timeout_ms: u64,
    /// Node-wide bound on bytes received and not yet decoded (partial frames), over all
    /// connections, each counted beyond its first 64 KiB.
    pub max_buffered_input_bytes: usize,
    /// Node-wide bound on bytes queued for sending and not yet written, over all connections,
    /// each counted beyond its first 64 KiB.
    pub max_buffered_output_bytes: usize,
    /// Per-connection outbound queue bound, messages.
    pub max_outbound_messages: usize,
    /// Per-connection outbound queue bound, bytes.
    pub max_outbound_bytes: usize,
    /// A registered service whose queue holds others' messages and has not been written to for
    /// this long, seconds, has stopped reading and is cut (below `max_outbound_bytes`, a busy
    /// service's queue refuses new messages instead: `ERROR code=overloaded`).
    pub outbound_stall_secs: u64,
    /// Cache bound, messages.
    pub cache_max_messages: usize,
    /// Cache bound, bytes.
    pub cache_max_bytes: usize,
    /// Default cache TTL, seconds.
    pub cache_default_ttl_secs: u64,
    /// Smallest accepted cache TTL, seconds.
    pub cache_min_ttl_secs: u64,
    /// Largest accepted cache TTL, seconds.
    pub cache_max_ttl_secs: u64,
    /// Most requests tracked for reply correlation, all connections together.
    pub max_pending_requests: usize,
    /// Most requests one client connection may have awaiting a reply.
    pub max_pending_per_client: usize,
    /// How long a request is tracked, seconds.
    pub request_timeout_secs: u64,
    /// Graceful shutdown grace period, seconds.
    pub shutdown_grace_secs: u64,
}

/// Configuration loading failure.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is invalid or has an unknown key.
    #[error("invalid configuration: {0}")]
    Parse(String),
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Default for Config {
    fn default() -> Self {
        // The embedded default is part of the binary and covered by a test.
        Config::from_toml("").expect("embedded default config is valid")
    }
}

impl Config {
    /// The default configuration with `overrides` (TOML text) merged on top, resolved and
    /// validated: [`Config::parse`] then [`Config::resolve`].
    ///
    /// Fails when the TOML is invalid, names an unknown key, a secret file cannot be read or a
    /// value is out of range.
    pub fn from_toml(overrides: &str) -> Result<Config, ConfigError> {
        let mut config = Config::parse(overrides)?;
        config.resolve()?;
        Ok(config)
    }

    /// The default configuration with `overrides` (TOML text) merged on top, not yet resolved:
    /// set fields (e.g. from command-line flags), then call [`Config::resolve`].
    ///
    /// Fails when the TOML is invalid or names an unknown key.
    pub fn parse(overrides: &str) -> Result<Config, ConfigError> {
        let mut base: toml::Table =
            DEFAULT_TOML.parse().map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        let top: toml::Table = overrides.parse().map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        merge(&mut base, top);
        toml::Value::Table(base).try_into().map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))
    }

    /// Reads `path` and merges it over the defaults, not yet resolved (see [`Config::parse`]).
    ///
    /// Fails when the file cannot be read or [`Config::parse`] fails.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Config::parse(&text)
    }

    /// Fills derived values (server name, socket path), reads the secrets, then validates.
    ///
    /// Secrets: `cluster.secret` is the value itself; `cluster.secret_file` names a file whose
    /// first line is the secret (setting both is an error); with neither, the environment
    /// variable `NODUS_SECRET` is used when set. Likewise `udp_secret`, `udp_secret_file` and
    /// `NODUS_UDP_SECRET`. Secrets never need to appear on a command line.
    ///
    /// Fails when a secret file cannot be read or is empty, a secret is given twice, or
    /// [`Config::validate`] fails.
    pub fn resolve(&mut self) -> Result<(), ConfigError> {
        self.resolve_with_env(|name| std::env::var(name).ok())
    }

    /// [`Config::resolve`] with the environment given by `env`.
    ///
    /// Fails as [`Config::resolve`] does.
    pub fn resolve_with_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if self.server_name.is_empty() {
            self.server_name = host_name();
        }
        if self.unix_socket.as_os_str().is_empty() {
            self.unix_socket = self.data_dir.join("nodus.sock");
        }
        let c = &mut self.cluster;
        c.secret = secret("cluster.secret", &c.secret, &c.secret_file, env("NODUS_SECRET"))?;
        c.udp_secret = secret("cluster.udp_secret", &c.udp_secret, &c.udp_secret_file, env("NODUS_UDP_SECRET"))?;
        self.validate()
    }

    /// Checks ranges and names.
    ///
    /// Fails with a message naming the offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !nodus_wire::valid_name(&self.server_name) || self.server_name.is_empty() {
            return bad(format!("server_name {:?} must match [A-Za-z0-9_.-]+", self.server_name));
        }
        for s in &self.expected_services {
            if s.is_empty() || !nodus_wire::valid_name(s) {
                return bad(format!("expected_services entry {s:?} is not a valid service name"));
            }
        }
        let l = &self.limits;
        if l.max_frame_bytes < 1024 {
            return bad("limits.max_frame_bytes must be at least 1024".into());
        }
        if l.max_connections == 0 || l.max_outbound_messages == 0 {
            return bad("limits.max_connections and limits.max_outbound_messages must be positive".into());
        }
        if l.handshake_timeout_ms == 0 {
            return bad("limits.handshake_timeout_ms must be positive".into());
        }
        if l.max_buffered_input_bytes < l.max_frame_bytes {
            return bad("limits.max_buffered_input_bytes must be at least max_frame_bytes".into());
        }
        if l.max_buffered_output_bytes < l.max_frame_bytes {
            return bad("limits.max_buffered_output_bytes must be at least max_frame_bytes".into());
        }
        let c = &self.control;
        if c.max_components == 0 || c.flags_limit == 0 {
            return bad("control.max_components and control.flags_limit must be positive".into());
        }
        if c.child_wait_ms <= 0 || c.stop_grace_ms <= 0 || c.monitoring_timeout_ms <= 0 {
            return bad("control.child_wait_ms, stop_grace_ms and monitoring_timeout_ms must be positive".into());
        }
        if c.write_check_secs == 0 {
            return bad("control.write_check_secs must be positive".into());
        }
        if l.cache_min_ttl_secs > l.cache_max_ttl_secs
            || !(l.cache_min_ttl_secs..=l.cache_max_ttl_secs).contains(&l.cache_default_ttl_secs)
        {
            return bad("limits.cache_default_ttl_secs must lie within cache_min_ttl_secs..=cache_max_ttl_secs".into());
        }
        let c = &self.cluster;
        if c.heartbeat_ms < 10 || c.failure_phi <= 0.0 || c.max_hops == 0 {
            return bad("cluster.heartbeat_ms must be >= 10, failure_phi > 0 and max_hops > 0".into());
        }
        if c.max_nodes == 0 {
            return bad("cluster.max_nodes must be positive".into());
        }
        if let Some(bad_name) =
            c.admin_nodes.iter().find(|n| n.as_str() != "*" && (n.is_empty() || !nodus_wire::valid_name(n)))
        {
            return bad(format!("cluster.admin_nodes entry {bad_name:?} is not a node name or \"*\""));
        }
        if l.max_pending_per_client == 0 {
            return bad("limits.max_pending_per_client must be positive".into());
        }
        if let Err(e) = self.access.anonymous.join(",").parse::<nodus_wire::node::Permissions>() {
            return bad(format!("access.anonymous: {e}"));
        }
        let h = &self.http;
        for route in &h.public {
            if let Err(e) = route.parse::<nodus_http::PublicRoute>() {
                return bad(format!("http.public: {e}"));
            }
        }
        let timeouts = [h.head_timeout_secs, h.header_timeout_secs, h.idle_timeout_secs];
        if h.max_connections == 0 || h.max_in_flight == 0 || timeouts.contains(&0) {
            return bad("http.max_connections, max_in_flight, head_timeout_secs, header_timeout_secs and \
                 idle_timeout_secs must be positive"
                .into());
        }
        if h.tls_cert.as_os_str().is_empty() != h.tls_key.as_os_str().is_empty() {
            return bad("http.tls_cert and tls_key must be set together".into());
        }
        if h.tls && h.tls_cert.as_os_str().is_empty() && c.tls_cert.as_os_str().is_empty() {
            return bad(
                "http.tls needs a certificate: set http.tls_cert and tls_key, or the cluster's TLS files".into()
            );
        }
        if let Err(e) = self.tasks.validate() {
            return bad(e);
        }
        let tls_files = [&c.tls_cert, &c.tls_key, &c.tls_ca].iter().filter(|p| !p.as_os_str().is_empty()).count();
        if tls_files != 0 && tls_files != 3 {
            return bad("cluster.tls_cert, tls_key and tls_ca must be set together".into());
        }
        Ok(())
    }

    /// How long a new connection may take to send its first complete message.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.handshake_timeout_ms)
    }
}

/// A secret from its value, its file or the environment, in that order; both value and file set
/// is ambiguous.
fn secret(key: &str, value: &str, file: &Path, env: Option<String>) -> Result<String, ConfigError> {
    if file.as_os_str().is_empty() {
        return Ok(if value.is_empty() { env.unwrap_or_default() } else { value.to_string() });
    }
    if !value.is_empty() {
        return Err(ConfigError::Invalid(format!("set {key} or {key}_file, not both")));
    }
    let text = std::fs::read_to_string(file)
        .map_err(|e| ConfigError::Invalid(format!("cannot read {key}_file {}: {e}", file.display())))?;
    let line = text.lines().next().unwrap_or("").trim();
    if line.is_empty() {
        return Err(ConfigError::Invalid(format!("{key}_file {} is empty", file.display())));
    }
    use std::os::unix::fs::PermissionsExt;
    if std::fs::metadata(file).is_ok_and(|m| m.permissions().mode() & 0o077 != 0) {
        tracing::warn!(file = %file.display(), "{key}_file is readable by other users: chmod 600 it");
    }
    Ok(line.to_string())
}

fn merge(base: &mut toml::Table, top: toml::Table) {
    for (k, v) in top {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(t)) => merge(b, t),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// The host name, made into a valid server name.
pub fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let name: String =
        raw.trim().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::default();
        assert_eq!(c.tcp_listen, "127.0.0.1:4040");
        assert!(c.unix_socket.ends_with("nodus.sock"));
    }

    #[test]
    fn overrides_merge_and_unknown_keys_fail() {
        let c = Config::from_toml("server_name = \"a1\"\n[limits]\nmax_connections = 3\n").unwrap();
        assert_eq!(c.server_name, "a1");
        assert_eq!(c.limits.max_connections, 3);
        assert_eq!(c.limits.max_frame_bytes, 4194304);
        assert!(Config::from_toml("nope = 1").is_err());
        assert!(Config::from_toml("server_name = \"bad name\"").is_err());
    }

    #[test]
    fn http_defaults_and_checks() {
        let c = Config::default();
        assert_eq!(c.http.listen, "127.0.0.1:4080");
        assert!(c.http.tls_files(&c.cluster).is_none());
        let c = Config::from_toml("[http]\npublic = [\"echo\", \"web/http\"]\nlisten = \"\"").unwrap();
        assert_eq!(c.http.public.len(), 2);
        let e = Config::from_toml("[http]\npublic = [\"a/b/c\"]").unwrap_err().to_string();
        assert!(e.contains("http.public"), "{e}");
        let e = Config::from_toml("[http]\ntls = true").unwrap_err().to_string();
        assert!(e.contains("http.tls needs a certificate"), "{e}");
        let c = Config::from_toml("[http]\ntls = true\ntls_cert = \"/c\"\ntls_key = \"/k\"").unwrap();
        assert_eq!(c.http.tls_files(&c.cluster), Some((Path::new("/c"), Path::new("/k"))));
    }

    #[test]
    fn access_defaults_and_checks() {
        let c = Config::default();
        assert_eq!(c.access.anonymous, ["status", "send", "register"]);
        assert_eq!(c.access.token_path(Path::new("/d")), Path::new("/d/auth.token"));
        assert_eq!(c.cluster.admin_nodes, ["*"]);
        assert!(Config::from_toml("[access]\nanonymous = [\"root\"]").is_err());
        assert!(Config::from_toml("[cluster]\nadmin_nodes = [\"a b\"]").is_err());
        let c = Config::from_toml("[access]\nanonymous = []\ntoken_file = \"/t\"").unwrap();
        assert!(c.access.anonymous_permissions().is_empty());
        assert_eq!(c.access.token_path(Path::new("/d")), Path::new("/t"));
    }

    #[test]
    fn secrets_come_from_the_value_a_file_or_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "from-file\n").unwrap();
        let env = |name: &str| match name {
            "NODUS_SECRET" => Some("from-env".to_string()),
            "NODUS_UDP_SECRET" => Some("udp-from-env".to_string()),
            _ => None,
        };
        let resolved = |toml: &str| {
            let mut c = Config::parse(toml).unwrap();
            c.resolve_with_env(env).map(|()| (c.cluster.secret, c.cluster.udp_secret))
        };
        assert_eq!(resolved("").unwrap(), ("from-env".into(), "udp-from-env".into()));
        assert_eq!(resolved("[cluster]\nsecret = \"inline\"").unwrap().0, "inline");
        let from_file = format!("[cluster]\nsecret_file = {:?}\nudp_secret_file = {:?}", file, file);
        assert_eq!(resolved(&from_file).unwrap(), ("from-file".into(), "from-file".into()));
        let both = format!("[cluster]\nsecret = \"x\"\nsecret_file = {file:?}");
        assert!(resolved(&both).unwrap_err().to_string().contains("not both"));
        let missing = format!("[cluster]\nsecret_file = {:?}", dir.path().join("nope"));
        assert!(resolved(&missing).unwrap_err().to_string().contains("cannot read cluster.secret_file"));
        std::fs::write(&file, "\n").unwrap();
        assert!(resolved(&from_file).unwrap_err().to_string().contains("is empty"));
    }

    #[test]
    fn fields_set_between_parse_and_resolve_are_resolved() {
        let mut c = Config::parse("[limits]\nmax_connections = 7").unwrap();
        c.data_dir = "/tmp/elsewhere".into();
        c.server_name = "typed".into();
        c.resolve_with_env(|_| None).unwrap();
        assert_eq!(c.unix_socket, std::path::Path::new("/tmp/elsewhere/nodus.sock"));
        assert_eq!((c.server_name.as_str(), c.limits.max_connections), ("typed", 7));
        c.limits.max_buffered_input_bytes = 10;
        assert!(c.validate().is_err(), "a budget below one frame is refused");
    }
}
