//! Shared helpers for tests that run `nodus daemon` processes: a node process with its own data
//! directory and config, a watcher service that reads cluster status, a test CA.
#![allow(dead_code)]

pub mod netns;

use nodus_client::{Client, ClientConfig, Incoming};
use nodus_wire::Message;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const NODUS: &str = env!("CARGO_BIN_EXE_nodus");
pub const WAIT: Duration = Duration::from_secs(15);

pub struct Proc {
    pub name: String,
    pub port: u16,
    pub dir: PathBuf,
    pub child: Option<Child>,
    pub neighbors: Vec<u16>,
    pub secret: String,
    /// Certificate, key and CA files: links use TLS only.
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
    /// Address the cluster listener binds (127.0.0.1 unless in a network namespace).
    pub ip: String,
    /// Network namespace the daemon runs in.
    pub netns: Option<String>,
    /// The locator's port (on 127.0.0.1).
    pub locator: u16,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Proc {
    pub fn new(root: &tempfile::TempDir, name: &str, neighbors: &[u16], secret: &str) -> Proc {
        Self::with_tls(root, name, neighbors, secret, None)
    }

    pub fn with_tls(
        root: &tempfile::TempDir,
        name: &str,
        neighbors: &[u16],
        secret: &str,
        tls: Option<(PathBuf, PathBuf, PathBuf)>,
    ) -> Proc {
        let dir = root.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let mut p = Proc {
            name: name.into(),
            port,
            dir,
            child: None,
            neighbors: neighbors.to_vec(),
            secret: secret.into(),
            tls,
            ip: "127.0.0.1".into(),
            netns: None,
            locator: free_port(),
        };
        p.start();
        p
    }

    /// A node inside network namespace `netns` at `ip`, linking to `neighbors` (`ip:port`).
    pub fn in_netns(root: &tempfile::TempDir, name: &str, netns: &str, ip: &str, neighbors: &[String]) -> Proc {
        let dir = root.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut p = Proc {
            name: name.into(),
            port: 4042,
            dir,
            child: None,
            neighbors: Vec::new(),
            // Bound beyond loopback: the node refuses to start without a secret.
            secret: "partition-test".into(),
            tls: None,
            ip: ip.into(),
            netns: Some(netns.into()),
            locator: free_port(),
        };
        p.start_with(neighbors);
        p
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("n.sock")
    }

    pub fn start(&mut self) {
        let neighbors: Vec<String> = self.neighbors.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        self.start_with(&neighbors);
    }

    /// The cluster address this node listens on.
    pub fn cluster_addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    fn start_with(&mut self, neighbors: &[String]) {
        let neighbors: Vec<String> = neighbors.iter().map(|n| format!("\"{n}\"")).collect();
        let config = format!(
            "server_name = \"{}\"\ndata_dir = \"{}\"\nunix_socket = \"{}\"\ntcp_listen = \"\"\n\
             [cluster]\nlisten = \"{}:{}\"\nneighbors = [{}]\nsecret = \"{}\"\nheartbeat_ms = 100\nudp_listen = \"\"\n[apps]\nlocator_listen = \"127.0.0.1:{}\"\nrun_as = \"root\"\n[http]\nlisten = \"\"\n\
             [tasks]\narpcp_listen = \"\"\n",
            self.name,
            self.dir.join("data").display(),
            self.socket().display(),
            self.ip,
            self.port,
            neighbors.join(","),
            self.secret,
            self.locator
        );
        let config = match &self.tls {
            None => config,
            Some((cert, key, ca)) => config.replace(
                &format!("listen = \"127.0.0.1:{}\"", self.port),
                &format!(
                    "listen = \"\"\ntls_listen = \"127.0.0.1:{}\"\ntls_cert = {:?}\ntls_key = {:?}\ntls_ca = {:?}",
                    self.port,
                    cert.display().to_string(),
                    key.display().to_string(),
                    ca.display().to_string()
                ),
            ),
        };
        let file = self.dir.join("nodus.toml");
        std::fs::write(&file, config).unwrap();
        let _ = std::fs::remove_file(self.socket());
        let mut command = match &self.netns {
            None => Command::new(NODUS),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, NODUS]);
                c
            }
        };
        let child = command.arg("daemon").arg("--config").arg(&file).stderr(Stdio::null()).spawn().unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            assert!(Instant::now() < deadline, "{} did not start", self.name);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        assert!(Command::new("kill").args([sig, &pid]).status().unwrap().success());
    }

    pub fn endpoint(&self) -> String {
        format!("unix:{}", self.socket().display())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal("-CONT");
        }
        self.kill9();
    }
}

/// A service on one node that listens for cluster notifications.
pub struct Watch {
    pub client: Client,
    pub incoming: Incoming,
}

const NOTIFICATIONS: [&str; 5] =
    ["CLUSTER_UP", "CLUSTER_DOWN", "CLUSTER_COMPLETE", "CLUSTER_INCOMPLETE", "UNREACHABLE"];

impl Watch {
    pub async fn on(p: &Proc, name: &str) -> Watch {
        let config = ClientConfig::new(p.endpoint()).service(name).commands(NOTIFICATIONS).no_reconnect();
        let (client, incoming) = Client::connect(config).await.unwrap();
        Watch { client, incoming }
    }

    pub async fn status(&self) -> (bool, bool, usize, usize) {
        let m = self.client.request_with_timeout(Message::new("CLUSTER_STATUS"), WAIT).await.unwrap();
        let num = |k: &str| m.get(k).unwrap().parse::<usize>().unwrap();
        let up = m.command == "CLUSTER_UP";
        // The second answer (COMPLETE/INCOMPLETE) arrives as an ordinary incoming message.
        (up, num("live") == num("known"), num("live"), num("known"))
    }

    /// Waits until the node reports `live` of `known` nodes; returns how long it took.
    pub async fn wait_for(&mut self, live: usize, known: usize) -> Duration {
        let start = Instant::now();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (_, _, l, k) = self.status().await;
            if (l, k) == (live, known) {
                return start.elapsed();
            }
            // Wait for the next change notification (or re-check after a short while: gossip
            // changes the counts without a notification when up/complete do not flip).
            let next = tokio::time::timeout(Duration::from_millis(200), self.incoming.recv());
            assert!(tokio::time::Instant::now() < deadline, "expected {live}/{known} live, have {l}/{k}");
            let _ = next.await;
        }
    }
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap()
}

/// A cluster CA; `node` issues certificates for 127.0.0.1 signed by it.
pub struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    dir: PathBuf,
}

impl Ca {
    pub fn new(dir: &std::path::Path, name: &str) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let issuer = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.pem"), issuer.pem()).unwrap();
        Ca { issuer, dir }
    }

    pub fn node(&self, name: &str) -> (PathBuf, PathBuf, PathBuf) {
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (self.dir.join(format!("{name}.pem")), self.dir.join(format!("{name}.key")));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k, self.dir.join("ca.pem"))
    }
}

pub fn cli(p: &Proc, args: &[&str]) -> std::process::Output {
    Command::new(NODUS).arg("--node").arg(p.endpoint()).args(args).output().unwrap()
}

pub fn wait_exit(p: &mut Proc) {
    let deadline = Instant::now() + WAIT;
    let child = p.child.as_mut().unwrap();
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "{} did not stop", p.name);
        std::thread::sleep(Duration::from_millis(10));
    }
    p.child = None;
}

/// Sends a request; returns the reply, or the node's refusal message (`SERVICE_UNAVAILABLE` while
/// gossip has not spread yet).
pub async fn ask(client: &Client, msg: Message) -> Message {
    match client.request_with_timeout(msg, WAIT).await {
        Ok(m) => m,
        Err(nodus_client::ClientError::Refused(r)) => r.reply().clone(),
        Err(e) => panic!("request failed: {e}"),
    }
}

/// A private network namespace with its loopback up, held open by a sleeping process; programs
/// run inside it through `nsenter`, so they may bind fixed ports (the defaults a README uses)
/// without clashing with anything else on the machine. Creating one needs root.
pub struct NetNs {
    holder: Child,
    /// The holder also has a private mount namespace (see [`NetNs::with_tmpfs`]).
    mounts: bool,
}

impl NetNs {
    /// A new namespace, or why one cannot be made here.
    pub fn new() -> Result<NetNs, String> {
        Self::spawn(&[])
    }

    /// A new network namespace with its own mount namespace, in which each of `dirs` (existing
    /// directories such as `/var/lib`) is an empty tmpfs: programs run inside may write paths a
    /// README names (`/var/lib/nodus`) without touching the machine. Or why it cannot be made.
    pub fn with_tmpfs(dirs: &[&str]) -> Result<NetNs, String> {
        Self::spawn(dirs)
    }

    fn spawn(dirs: &[&str]) -> Result<NetNs, String> {
        use std::io::BufRead;
        let mounts: String = dirs.iter().map(|d| format!(" && mount -t tmpfs tmpfs {d}")).collect();
        let mut unshare = Command::new("unshare");
        unshare.arg("--net");
        if !dirs.is_empty() {
            unshare.args(["--mount", "--propagation", "private"]);
        }
        let mut holder = unshare
            .args(["sh", "-c", &format!("ip link set lo up{mounts} && echo ready && exec sleep 100000")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run unshare: {e}"))?;
        let mut line = String::new();
        let out = holder.stdout.take().expect("piped stdout");
        // `ready` once loopback is up; end of file when unshare or ip failed.
        let _ = std::io::BufReader::new(out).read_line(&mut line);
        if line.trim() == "ready" {
            return Ok(NetNs { holder, mounts: !dirs.is_empty() });
        }
        let _ = holder.kill();
        let out = holder.wait_with_output().map_err(|e| e.to_string())?;
        Err(format!("cannot create a network namespace: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }

    /// `nsenter` into the namespace (network, and mounts when it has its own).
    fn enter(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/proc/{}/ns/net", self.holder.id()));
        if self.mounts {
            c.arg(format!("--mount=/proc/{}/ns/mnt", self.holder.id()));
        }
        c
    }

    /// `program` to be run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = self.enter();
        c.arg("--").arg(program);
        c
    }

    /// `program` to be run inside the namespace in `dir` (entering a mount namespace would
    /// otherwise start it in `/`).
    pub fn command_in(&self, program: impl AsRef<std::ffi::OsStr>, dir: &std::path::Path) -> Command {
        let mut c = self.enter();
        c.arg(format!("--wd={}", dir.display())).arg("--").arg(program).current_dir(dir);
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// A child process killed (and reaped) when dropped.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until a Unix socket at `path` accepts connections.
pub fn wait_socket(path: &std::path::Path) {
    let deadline = Instant::now() + WAIT;
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {}", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}
