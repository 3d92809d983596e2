//! The black-box adversarial suite of issue 8: a real `nodus daemon` process, attacked from
//! outside it the way a local user, a forged cluster peer and a misbehaving client would, over
//! its real sockets. At the end it prints a report (run with `-- --nocapture` to see it): the
//! inputs tried, crashes, the daemon's memory peak and the messages lost.
//!
//! - An unprivileged local user (`nobody`, through `setpriv --reuid --regid --clear-groups`)
//!   with the `nodus` CLI: the Unix socket's mode keeps it out; over TCP, from the daemon's own
//!   working directory (whose token file it cannot read), it may look but not stop the node,
//!   sniff, deploy, shut the cluster down or take a name the owner holds; with the socket opened
//!   to everyone, its uid gets the same anonymous rights and no more.
//! - UDP datagrams carrying node commands and a registration.
//! - A forged cluster peer on the unauthenticated loopback link (raw frames: `SHUTDOWN`,
//!   `FORGET`, a `STOP` stamped with every permission, a spoofed sender, 2 000 fake nodes, a
//!   takeover of the node's own record, a pong answering no ping), and a cluster listener beyond
//!   loopback without a secret, which must not start.
//! - Idle connections past the TCP listener's limit, and half-sent frames past the node's input
//!   budget (measured from outside: the daemon's RSS).
//! - A pending-request flood from one client; one client's burst of large requests at a service
//!   another client uses (the service is not cut: the burster's excess is refused `overloaded`,
//!   the other client served); a service that never reads (what it cannot take refused at once,
//!   cut after the stall time with every caller answered); sniffers that never read while 40 MiB
//!   flow past them, and a caller that never reads its replies next to one that does.
//! - A neighbour process of the same user impersonating an app's worker with the `--uuid` and
//!   `--endpoint` it read from `/proc`.
//!
//! The parts that switch users need root and `setpriv`; without them the test prints why it
//! skips those parts, and under `CI=true` it fails instead. The impersonator is this test binary
//! run again as `nobody` (hard-linked next to the daemon, where `nobody` can reach it) with
//! [`ROLE`] set: it then acts the impostor and exits.
// Waits on external processes read the wall clock.
#![allow(clippy::disallowed_methods)]

mod common;

use bytes::BytesMut;
use common::{free_port, NODUS, WAIT};
use nodus_daemon::topology::{NodeRecord, RecordKey};
use nodus_wire::node::Permissions;
use nodus_wire::{binary, Decoded, Message};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

/// Set when this binary runs as the impostor (the value is the role).
const ROLE: &str = "NODUS_ADVERSARY_ROLE";
/// The pid of the worker the impostor pretends to be.
const VICTIM: &str = "NODUS_ADVERSARY_VICTIM";
/// This test's name, to run it again as the impostor.
const TEST: &str = "a_real_daemon_withstands_local_users_peers_and_floods_and_loses_nothing";

const MIB: u64 = 1 << 20;
/// The node's budget for undecoded input, node-wide.
const INPUT_BUDGET: u64 = 16 * MIB;
/// The TCP listener's connection limit.
const TCP_LIMIT: usize = 64;
/// Requests one client may have in flight.
const PENDING_PER_CLIENT: u64 = 64;
/// The node's budget for queued output, node-wide.
const OUTPUT_BUDGET: u64 = 8 * MIB;
/// How long a service with others' messages queued may write nothing before it is cut.
const STALL_SECS: u64 = 4;

/// What the suite tried and what it saw.
#[derive(Default)]
struct Report {
    /// Inputs sent: messages, datagrams, connections, frames, gossip records, CLI commands.
    inputs: u64,
    /// Requests that should have been answered and were not.
    lost: u64,
    /// Lines of the scenarios, for the report.
    lines: Vec<String>,
    /// Why parts were skipped.
    skipped: Vec<String>,
}

impl Report {
    fn line(&mut self, s: String) {
        self.lines.push(s);
    }
}

/// Whether this runs in CI (`CI=true`), where a skipped part is a failure.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

// ---------------------------------------------------------------------------------------------
// Raw connections speaking the node's binary form.

struct Conn<S> {
    stream: S,
    buf: BytesMut,
    decoder: binary::FrameDecoder,
}

impl Conn<TcpStream> {
    async fn tcp(addr: &str) -> Conn<TcpStream> {
        let mut stream = TcpStream::connect(addr).await.expect("connect tcp");
        stream.write_all(&binary::PREFACE).await.expect("preface");
        Conn { stream, buf: BytesMut::new(), decoder: binary::FrameDecoder::new(1 << 24) }
    }
}

impl Conn<UnixStream> {
    async fn unix(path: &Path) -> Conn<UnixStream> {
        let mut stream = UnixStream::connect(path).await.expect("connect unix");
        stream.write_all(&binary::PREFACE).await.expect("preface");
        Conn { stream, buf: BytesMut::new(), decoder: binary::FrameDecoder::new(1 << 24) }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    async fn send(&mut self, m: &Message) {
        let mut out = BytesMut::new();
        binary::encode(m, &mut out, 1 << 24).expect("encode");
        self.stream.write_all(&out).await.expect("write");
    }

    /// The next message within `timeout`; `None` on timeout or end of stream.
    async fn try_recv(&mut self, timeout: Duration) -> Option<Message> {
        tokio::time::timeout(timeout, async {
            loop {
                match self.decoder.decode(&mut self.buf) {
                    Ok(Some(Decoded::Message(m))) => return Some(m),
                    Ok(Some(Decoded::Invalid(e))) => panic!("the node sent an invalid frame: {e}"),
                    Ok(None) => {}
                    Err(e) => panic!("the node sent a bad frame: {e}"),
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .ok()
        .flatten()
    }

    async fn recv(&mut self) -> Message {
        self.try_recv(WAIT).await.expect("a message in time")
    }

    /// The answer to request `id`, skipping anything else.
    async fn answer(&mut self, id: u64) -> Message {
        loop {
            let m = self.recv().await;
            if m.envelope.reply_to == id {
                return m;
            }
        }
    }

    async fn request(&mut self, m: Message) -> Message {
        let id = m.envelope.id;
        self.send(&m).await;
        self.answer(id).await
    }

    async fn register(&mut self, service: &str) {
        self.send(&Message::new("REGISTER").param("service", service).param("version", 1)).await;
        assert_eq!(self.recv().await.command, "HELP");
        assert_eq!(self.recv().await.command, "READY");
    }

    /// Whether the node closes the connection within `timeout` (reading and dropping the rest).
    async fn closed_within(&mut self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, async {
            let mut scratch = vec![0u8; 1 << 16];
            loop {
                match self.stream.read(&mut scratch).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon under attack, and the users attacking it.

struct Daemon {
    child: tokio::process::Child,
    pid: u32,
    /// The daemon's working directory (its data directory is the default, `./nodus-data`).
    dir: PathBuf,
    tcp: String,
    cluster: String,
    udp: String,
    log: PathBuf,
}

impl Daemon {
    fn socket(&self) -> PathBuf {
        self.dir.join("nodus-data/nodus.sock")
    }

    /// `(VmHWM, VmRSS)` of the daemon process, KiB.
    fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse().ok())
                .unwrap_or(0)
        };
        (field("VmHWM:"), field("VmRSS:"))
    }

    /// How many MiB the daemon's RSS stays above `rss_before` (KiB) once it had time to give
    /// memory back: waits until it is within 8 MiB of it, or for `WAIT`.
    async fn rss_over_after_release(&self, rss_before: u64) -> u64 {
        let deadline = tokio::time::Instant::now() + WAIT;
        let rss_after = loop {
            let (_, rss) = self.memory_kib();
            if rss <= rss_before + 8 * 1024 || tokio::time::Instant::now() > deadline {
                break rss;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        rss_after.saturating_sub(rss_before) / 1024
    }

    /// Fails the test when the daemon has exited.
    fn alive(&mut self, after: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            panic!("the daemon died after {after}: {status}\n{log}");
        }
    }
}

/// Who runs a CLI command.
#[derive(Clone, Copy, PartialEq)]
enum User {
    /// The daemon's own user (this process's).
    Owner,
    /// `nobody`, through setpriv.
    Nobody,
}

struct Users {
    /// `nobody`'s uid and gid, when this process may become it.
    nobody: Option<(u32, u32)>,
    /// Where the hard-linked binaries are (reachable by `nobody`).
    bin: PathBuf,
    home: PathBuf,
}

impl Users {
    /// A command run as `user` (for `nobody`, through setpriv) with a clean environment.
    fn command(&self, user: User, program: &Path) -> tokio::process::Command {
        let mut c = match (user, self.nobody) {
            (User::Nobody, Some((uid, gid))) => {
                let mut c = tokio::process::Command::new("setpriv");
                c.arg(format!("--reuid={uid}")).arg(format!("--regid={gid}")).arg("--clear-groups").arg("--");
                c.arg(program);
                c
            }
            (User::Nobody, None) => panic!("nobody is not available"),
            (User::Owner, _) => tokio::process::Command::new(program),
        };
        for var in ["NODUS_NODE", "NODUS_TOKEN", "NODUS_TOKEN_FILE", "RUST_LOG", ROLE, VICTIM] {
            c.env_remove(var);
        }
        c.env("HOME", &self.home).stdin(Stdio::null()).kill_on_drop(true);
        c
    }

    /// `nodus ARGS` as `user` in `cwd`, with `env`; its output.
    async fn nodus(&self, user: User, cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
        let nodus = self.bin.join("nodus");
        let mut c = self.command(user, &nodus);
        c.args(args).current_dir(cwd).envs(env.iter().copied());
        tokio::time::timeout(WAIT, c.output()).await.unwrap_or_else(|_| panic!("nodus {args:?} hung")).unwrap()
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `from` hard-linked (or copied) to `to`.
fn place(from: &Path, to: &Path) {
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).unwrap();
    }
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Whether this process may run commands as `nobody`, or why not.
fn nobody() -> Result<(u32, u32), String> {
    if !nodus_engine::identity::is_root() {
        return Err("switching to another user needs root".into());
    }
    let which = std::process::Command::new("setpriv").arg("--version").output();
    if !which.is_ok_and(|o| o.status.success()) {
        return Err("setpriv (util-linux) is not installed".into());
    }
    let user = nodus_engine::RunAs::lookup("nobody").map_err(|e| format!("no user nobody: {e}"))?;
    Ok((user.uid, user.gid))
}

async fn start_daemon(dir: &Path, bin: &Path) -> Daemon {
    let (tcp, cluster, udp, locator) = (free_port(), free_port(), free_port(), free_port());
    let config = format!(
        "server_name = \"adv\"\ntcp_listen = \"127.0.0.1:{tcp}\"\n\
         [limits]\nmax_frame_bytes = {frame}\nmax_connections = {TCP_LIMIT}\nhandshake_timeout_ms = 1000\n\
         max_buffered_input_bytes = {INPUT_BUDGET}\nmax_buffered_output_bytes = {OUTPUT_BUDGET}\nmax_outbound_bytes = 262144\nmax_pending_per_client = {PENDING_PER_CLIENT}\noutbound_stall_secs = {STALL_SECS}\n\
         [cluster]\nlisten = \"127.0.0.1:{cluster}\"\nudp_listen = \"127.0.0.1:{udp}\"\nmax_nodes = 16\n\
         failure_phi = 1e9\ntls_listen = \"\"\n\
         [apps]\nlocator_listen = \"127.0.0.1:{locator}\"\n[http]\nlisten = \"\"\n[tasks]\narpcp_listen = \"\"\n",
        frame = MIB,
    );
    std::fs::write(dir.join("adv.toml"), config).unwrap();
    let log = dir.join("daemon.log");
    let child = tokio::process::Command::new(bin.join("nodus"))
        .args(["daemon", "--config", "adv.toml"])
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let d = Daemon {
        child,
        pid,
        dir: dir.to_path_buf(),
        tcp: format!("127.0.0.1:{tcp}"),
        cluster: format!("127.0.0.1:{cluster}"),
        udp: format!("127.0.0.1:{udp}"),
        log,
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while UnixStream::connect(d.socket()).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "the daemon did not start: {}", read(&d.log));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    d
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// The suite.

#[test]
fn a_real_daemon_withstands_local_users_peers_and_floods_and_loses_nothing() {
    if let Ok(role) = std::env::var(ROLE) {
        // This process is the impostor, run by the suite as another user.
        let code = common::rt().block_on(impostor(&role));
        std::process::exit(code);
    }
    common::rt().block_on(suite());
}

async fn suite() {
    let mut report = Report::default();
    // Everything lives in a directory `nobody` can enter (as a deployment under /srv would be);
    // the data directory inside it is the daemon's to protect.
    let tmp = tempfile::Builder::new().prefix("nodus-adversary").tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.join("bin");
    let home = dir.join("home");
    for d in [&bin, &home] {
        std::fs::create_dir(d).unwrap();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    place(Path::new(NODUS), &bin.join("nodus"));
    place(&std::env::current_exe().unwrap(), &bin.join("adversary"));
    let nobody = match nobody() {
        Ok(ids) => Some(ids),
        Err(why) => {
            assert!(!in_ci(), "CI=true and the unprivileged-user attacks cannot run: {why}");
            report.skipped.push(format!("attacks as another local user: {why}"));
            None
        }
    };
    let users = Users { nobody, bin: bin.clone(), home };
    let mut node = start_daemon(&dir, &bin).await;
    let (hwm_start, _) = node.memory_kib();

    // The owner: the daemon's own user on the Unix socket. It holds `billing`.
    let mut billing = Conn::unix(&node.socket()).await;
    billing.register("billing").await;
    let mut owner = Conn::unix(&node.socket()).await;
    let mut ids = 1u64..;
    let mut next = || ids.next().unwrap();
    // A first message within the handshake timeout (1 s), or the node closes the connection.
    assert_eq!(owner.request(Message::new("PING").with_id(next())).await.command, "PONG");

    if users.nobody.is_some() {
        local_user(&users, &mut node, &mut billing, &mut report).await;
    }
    node.alive("the local user's attempts");
    udp(&node, &mut owner, &mut next, &mut report).await;
    node.alive("the UDP datagrams");
    forged_peer(&node, &mut owner, &mut next, &mut report).await;
    node.alive("the forged peer");
    open_listener_needs_a_secret(&users, &dir, &mut report).await;
    idle_flood(&node, &mut owner, &mut next, &mut report).await;
    node.alive("the idle connections");
    half_frames(&node, &mut owner, &mut next, &mut report).await;
    node.alive("the half-sent frames");
    pending_flood(&node, &mut report).await;
    node.alive("the pending flood");
    burst_at_a_service(&node, &mut report).await;
    node.alive("the burst at a shared service");
    slow_consumer(&node, &mut report).await;
    node.alive("the slow consumer");
    silent_sniffers(&node, &mut report).await;
    node.alive("the sniffers that never read");
    caller_never_reads(&node, &mut report).await;
    node.alive("the caller that never reads");
    impersonation(&users, &node, &mut report).await;
    node.alive("the impostor");

    // Still itself: the owner's name is the owner's, the node answers and is not quitting.
    let info = owner.request(Message::new("INFO").with_id(next())).await;
    assert_eq!(info.get("quitting"), Some("false"), "{info:?}");
    let mut caller = Conn::tcp(&node.tcp).await;
    caller.send(&Message::new("CHARGE").to("billing").with_id(7)).await;
    let charge = billing.recv().await;
    assert_eq!(charge.command, "CHARGE", "billing still reaches its owner");
    billing.send(&charge.reply("CHARGED")).await;
    assert_eq!(caller.answer(7).await.command, "CHARGED");
    let (hwm, rss) = node.memory_kib();

    // A graceful stop by the owner ends it cleanly; nothing panicked on the way.
    let stop = users.nodus(User::Owner, &dir, &["stop"], &[]).await;
    assert!(stop.status.success(), "{stop:?}");
    let status = tokio::time::timeout(WAIT, node.child.wait()).await.expect("the node stops").unwrap();
    let log = read(&node.log);
    let crashes = log.lines().filter(|l| l.contains("panicked")).count() + usize::from(!status.success());
    eprintln!("\n== adversarial suite: a real nodus daemon process (pid {}) ==", node.pid);
    for l in &report.lines {
        eprintln!("  {l}");
    }
    for s in &report.skipped {
        eprintln!("  SKIPPED {s}");
    }
    eprintln!("  inputs tried:  {}", report.inputs);
    let panics = crashes - usize::from(!status.success());
    eprintln!("  crashes:       {crashes} (the daemon ended with {status} after the owner's stop; {panics} panics in its log)");
    eprintln!(
        "  memory peak:   {} MiB RSS (at start {} MiB, at the end {} MiB; input budget {} MiB)",
        hwm / 1024,
        hwm_start / 1024,
        rss / 1024,
        INPUT_BUDGET / MIB
    );
    eprintln!("  lost messages: {}", report.lost);
    assert_eq!(crashes, 0, "{log}");
    assert_eq!(report.lost, 0, "every request is answered once");
}

/// `nobody` with the real CLI: kept out of the Unix socket by its mode; over TCP (from the
/// daemon's own directory, whose token it cannot read) and then over a socket opened to every
/// user, it may look and send, never stop, sniff, deploy, shut down or take `billing`.
async fn local_user(users: &Users, node: &mut Daemon, billing: &mut Conn<UnixStream>, report: &mut Report) {
    let dir = node.dir.clone();
    let socket = node.socket();
    let token = dir.join("nodus-data/auth.token");
    assert_eq!((mode(&socket), mode(&token)), (0o600, 0o600));
    // The token cannot be read, by the CLI or by anything else this user runs.
    let cat = users.command(User::Nobody, Path::new("cat")).arg(&token).output().await.unwrap();
    assert!(!cat.status.success(), "nobody read the token: {cat:?}");
    let unix = users.nodus(User::Nobody, &dir, &["--node", socket.to_str().unwrap(), "status"], &[]).await;
    assert_eq!(unix.status.code(), Some(2), "{unix:?}");
    assert!(stderr(&unix).contains("Permission denied"), "the socket's mode keeps nobody out: {unix:?}");
    report.inputs += 2;
    let evil = dir.join("evil.sh");
    std::fs::write(&evil, "#!/bin/sh\ntouch \"$(dirname \"$0\")/pwned\"\n").unwrap();
    std::fs::set_permissions(&evil, std::fs::Permissions::from_mode(0o755)).unwrap();
    let evil = evil.display().to_string();

    for (how, node_arg) in [("TCP", node.tcp.clone()), ("the Unix socket opened to all", socket.display().to_string())]
    {
        if how != "TCP" {
            // As an operator who loosens the socket might: other uids are anonymous there too.
            std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
        }
        let n = node_arg.as_str();
        let look = users.nodus(User::Nobody, &dir, &["--node", n, "status"], &[]).await;
        assert!(look.status.success(), "{how}: anonymous may look: {look:?}");
        for (args, permission) in [
            (vec!["stop"], "admin"),
            (vec!["sniff", "--count", "1"], "sniff"),
            (vec!["app", "deploy", "evil", &evil], "admin"),
            (vec!["cluster", "shutdown"], "admin"),
            (vec!["cluster", "forget", "adv"], "admin"),
        ] {
            let mut all = vec!["--node", n];
            all.extend(&args);
            let out = users.nodus(User::Nobody, &dir, &all, &[]).await;
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(1), "{how}: nodus {args:?}: {out:?}");
            assert!(
                err.contains("code=forbidden") && err.contains(&format!("the {permission} permission")),
                "{how}: nodus {args:?} is forbidden and says which permission: {err}"
            );
            report.inputs += 1;
        }
        // The owner's name stays the owner's.
        let take = users.nodus(User::Nobody, &dir, &["--node", n, "serve", "billing", "--command", "cat"], &[]).await;
        assert_eq!(take.status.code(), Some(1), "{how}: {take:?}");
        assert!(stderr(&take).contains("belongs to another principal"), "{how}: {take:?}");
        // A guessed token is refused, and changes nothing.
        let guess = users.nodus(User::Nobody, &dir, &["--node", n, "stop"], &[("NODUS_TOKEN", &"0".repeat(64))]).await;
        assert_eq!(guess.status.code(), Some(1), "{how}: {guess:?}");
        assert!(stderr(&guess).contains("refused the token"), "{how}: {guess:?}");
        report.inputs += 3;
        report.line(format!(
            "nobody over {how}: status allowed; stop, sniff, deploy, cluster shutdown/forget forbidden; billing kept; a guessed token refused"
        ));
    }
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(!dir.join("pwned").exists(), "the app nobody tried to deploy never ran");
    // The owner still gets billing's traffic.
    let mut caller = Conn::tcp(&node.tcp).await;
    caller.send(&Message::new("CHARGE").to("billing").with_id(1)).await;
    let charge = billing.recv().await;
    billing.send(&charge.reply("CHARGED")).await;
    assert_eq!(caller.answer(1).await.command, "CHARGED");
    report.line("nobody on the Unix socket (mode 0600): Permission denied; the token file (0600) unreadable".into());
}

async fn udp(node: &Daemon, owner: &mut Conn<UnixStream>, next: &mut impl FnMut() -> u64, report: &mut Report) {
    let mut svc = Conn::unix(&node.socket()).await;
    svc.register("svc").await;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let datagrams =
        ["STOP", "node/SHUTDOWN", "REGISTER service=hole;version=1", "SNIFF", "FORGET server=adv", "svc/POKE n=1"];
    for d in datagrams {
        sock.send_to(d.as_bytes(), &node.udp).await.unwrap();
    }
    report.inputs += datagrams.len() as u64;
    // Datagrams are handled in order: once POKE is in, the others were refused.
    match svc.try_recv(WAIT).await {
        Some(m) if m.command == "POKE" => {}
        other => {
            report.lost += 1;
            panic!("the signal to svc did not arrive: {other:?}");
        }
    }
    let list = owner.request(Message::new("LIST_SERVICES").with_id(next())).await;
    assert!(!list.get("list").unwrap_or("").contains("hole"), "no black-hole service: {list:?}");
    report.line(format!(
        "UDP: {} datagrams (STOP, SHUTDOWN, REGISTER, SNIFF, FORGET, a signal): only the signal acted",
        datagrams.len()
    ));
}

fn record(name: &str, incarnation: i64, key: &RecordKey) -> NodeRecord {
    let mut r = NodeRecord {
        addr: "10.9.9.9:4042".into(),
        incarnation,
        seq: 1,
        links: BTreeSet::new(),
        services: ["billing".to_string()].into(),
        apps: BTreeMap::new(),
        mac: Vec::new(),
    };
    key.sign(name, &mut r);
    r
}

async fn forged_peer(node: &Daemon, owner: &mut Conn<UnixStream>, next: &mut impl FnMut() -> u64, report: &mut Report) {
    let mut evil = Conn::tcp(&node.cluster).await;
    evil.send(&Message::new("CONNECT").param("server", "evil").param("version", 1).param("nonce", "x")).await;
    let accept = evil.recv().await;
    assert_eq!((accept.command.as_str(), accept.get("server")), ("ACCEPT", Some("adv")));
    evil.send(&Message::new("SHUTDOWN")).await;
    evil.send(&Message::new("FORGET").param("server", "adv")).await;
    let mut stop = Message::new("STOP").to("adv:").with_id(77);
    stop.from = nodus_wire::Address::new("evil", "");
    stop.envelope.perms = Permissions::ALL;
    let refused = evil.request(stop).await;
    assert_eq!((refused.command.as_str(), refused.get("code")), ("ERROR", Some("forbidden")), "{refused:?}");
    let mut spoof = Message::new("INFO").to("adv:").with_id(78);
    spoof.from = nodus_wire::Address::new("adv", "");
    evil.send(&spoof).await;
    let key = RecordKey::from_secret("");
    let now = nodus_daemon::now_ms();
    let fakes: BTreeMap<String, NodeRecord> =
        (0..2_000).map(|i| (format!("fake{i}"), record(&format!("fake{i}"), now, &key))).collect();
    evil.send(&Message::new("GOSSIP").with_payload(rmp_serde::to_vec(&fakes).unwrap())).await;
    let takeover: BTreeMap<String, NodeRecord> = [("adv".to_string(), record("adv", i64::MAX / 2, &key))].into();
    evil.send(&Message::new("GOSSIP").with_payload(rmp_serde::to_vec(&takeover).unwrap())).await;
    evil.send(&Message::new("LINK_PONG").param("t0", now).param("t1", now + 3_600_000)).await;
    report.inputs += 7 + 2_001;
    let info = owner.request(Message::new("INFO").with_id(next())).await;
    assert_eq!(info.get("quitting"), Some("false"), "SHUTDOWN was ignored: {info:?}");
    let known: usize = info.get("known_nodes").unwrap().parse().unwrap();
    assert!(known <= 16, "known nodes bounded: {known}");
    let clock = owner.request(Message::new("CLOCK_STATUS").with_id(next())).await;
    assert_eq!(clock.command, "CLOCK_STABLE");
    let cluster = owner.request(Message::new("CLUSTER_INFO").with_id(next())).await;
    assert!(cluster.get("nodes").unwrap().contains("adv@"), "the node still speaks for itself: {cluster:?}");
    report.line(format!(
        "forged cluster peer: SHUTDOWN, FORGET ignored; STOP stamped admin forbidden; spoofed sender dropped; 2000 fake nodes sent, {known} known (bound 16); takeover refuted; forged pong ignored"
    ));
}

/// A daemon asked to listen for cluster links beyond loopback without a secret refuses to start.
async fn open_listener_needs_a_secret(users: &Users, dir: &Path, report: &mut Report) {
    let other = dir.join("open");
    std::fs::create_dir(&other).unwrap();
    let port = free_port().to_string();
    let args = [
        "daemon",
        "--server-name",
        "open",
        "--listen",
        "",
        "--udp-listen",
        "",
        "--locator-listen",
        "",
        "--http-listen",
        "",
        "--arpcp-listen",
        "",
    ];
    let mut c = users.command(User::Owner, &users.bin.join("nodus"));
    c.args(args).args(["--cluster-listen", &format!("0.0.0.0:{port}")]).current_dir(&other);
    let out = tokio::time::timeout(WAIT, c.output()).await.expect("it exits at once").unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(stderr(&out).contains("secret"), "it says what is missing: {out:?}");
    report.inputs += 1;
    report.line("a cluster listener on 0.0.0.0 without a secret or TLS: the daemon refuses to start".into());
}

async fn idle_flood(node: &Daemon, owner: &mut Conn<UnixStream>, next: &mut impl FnMut() -> u64, report: &mut Report) {
    let extra = 16;
    let mut idle = Vec::new();
    for _ in 0..TCP_LIMIT + extra {
        idle.push(TcpStream::connect(&node.tcp).await.unwrap());
    }
    report.inputs += (TCP_LIMIT + extra) as u64;
    // Other listeners are not locked out.
    assert_eq!(owner.request(Message::new("PING").with_id(next())).await.command, "PONG");
    // Every idle connection is closed: past the limit at once, the others at the handshake
    // timeout (1 s); then TCP serves again.
    let closes = idle.into_iter().map(|mut s| {
        tokio::spawn(async move {
            let mut b = [0u8; 64];
            matches!(tokio::time::timeout(WAIT, s.read(&mut b)).await, Ok(Ok(0) | Err(_)))
        })
    });
    let mut closed = 0;
    for c in closes {
        closed += usize::from(c.await.unwrap());
    }
    assert_eq!(closed, TCP_LIMIT + extra, "every idle connection is closed");
    let mut fresh = Conn::tcp(&node.tcp).await;
    assert_eq!(fresh.request(Message::new("PING").with_id(1)).await.command, "PONG");
    report.line(format!(
        "idle flood: {} silent TCP connections (limit {TCP_LIMIT}): the Unix socket kept serving, all closed, TCP serves again",
        TCP_LIMIT + extra
    ));
}

async fn half_frames(node: &Daemon, owner: &mut Conn<UnixStream>, next: &mut impl FnMut() -> u64, report: &mut Report) {
    const SENDERS: usize = 60;
    const SENT: usize = 768 * 1024;
    let (_, rss_before) = node.memory_kib();
    let mut senders = Vec::new();
    for _ in 0..SENDERS {
        let mut c = Conn::tcp(&node.tcp).await;
        // A complete first message (past the handshake timeout), then most of a 1 MiB frame.
        assert_eq!(c.request(Message::new("PING").with_id(1)).await.command, "PONG");
        let mut head = ((MIB as u32) - 16).to_be_bytes().to_vec();
        head.extend(std::iter::repeat_n(0x5a, SENT));
        let _ = c.stream.write_all(&head).await;
        senders.push(c);
    }
    report.inputs += 2 * SENDERS as u64;
    // The budget cuts the biggest holders; the rest are held.
    let mut cut = 0;
    for c in senders.iter_mut() {
        cut += usize::from(c.closed_within(Duration::from_millis(200)).await);
    }
    let (_, rss_held) = node.memory_kib();
    let held_mib = rss_held.saturating_sub(rss_before) / 1024;
    let sent_mib = (SENDERS * SENT) as u64 / MIB;
    assert!(cut >= SENDERS / 2, "most half frames are cut: {cut} of {SENDERS}");
    assert!(held_mib < sent_mib / 2, "the node holds {held_mib} MiB of {sent_mib} MiB sent");
    assert_eq!(owner.request(Message::new("PING").with_id(next())).await.command, "PONG");
    // The senders go: the memory comes back (the node trims its heap after large releases).
    drop(senders);
    let back_mib = node.rss_over_after_release(rss_before).await;
    assert!(back_mib <= 8, "the memory of closed connections comes back: still {back_mib} MiB over");
    report.line(format!(
        "half frames: {SENDERS} × {} KiB of 1 MiB frames ({sent_mib} MiB): {cut} cut by the input budget, RSS grew {held_mib} MiB, {back_mib} MiB once they closed",
        SENT / 1024
    ));
}

async fn pending_flood(node: &Daemon, report: &mut Report) {
    let mut sink = Conn::unix(&node.socket()).await;
    sink.register("sink").await;
    let mut flood = Conn::tcp(&node.tcp).await;
    const SENT: u64 = 100;
    for id in 1..=SENT {
        flood.send(&Message::new("JOB").to("sink").with_id(id)).await;
    }
    report.inputs += SENT;
    let mut answered = BTreeSet::new();
    for _ in PENDING_PER_CLIENT..SENT {
        let m = flood.recv().await;
        assert_eq!(m.get("code"), Some("too_many_requests"), "{m:?}");
        answered.insert(m.envelope.reply_to);
    }
    // Another caller still gets through and its reply comes back.
    let mut other = Conn::tcp(&node.tcp).await;
    other.send(&Message::new("JOB").to("sink").param("who", "other").with_id(5)).await;
    let job = loop {
        let m = sink.recv().await;
        if m.get("who") == Some("other") {
            break m;
        }
    };
    sink.send(&job.reply("DONE")).await;
    assert_eq!(other.answer(5).await.command, "DONE");
    // The sink goes: every request in flight is answered.
    drop(sink);
    while answered.len() < SENT as usize {
        let Some(m) = flood.try_recv(WAIT).await else { break };
        assert!(answered.insert(m.envelope.reply_to), "a second answer to {}", m.envelope.reply_to);
    }
    let lost = SENT - answered.len() as u64;
    report.lost += lost;
    report.line(format!(
        "pending flood: {SENT} requests from one client: {} refused at once (share {PENDING_PER_CLIENT}), another caller served, {lost} unanswered",
        SENT - PENDING_PER_CLIENT
    ));
}

/// A service that never reads, and three callers sending it 60 requests of 32 KiB each: the
/// service is not cut for what they send; what its queue cannot take is refused at once
/// (`ERROR code=overloaded`, `delivered=no`). One caller goes on sending a request every 100 ms
/// (what the kernel's socket buffer absorbs is not the node's to judge: the service is judged once
/// its queue stops moving); once the service has written nothing for the stall time
/// (`outbound_stall_secs`) with requests queued, it is cut, and each accepted request is
/// answered `disconnected`.
async fn slow_consumer(node: &Daemon, report: &mut Report) {
    let mut slow = Conn::unix(&node.socket()).await;
    slow.register("slow").await;
    const CALLERS: usize = 3;
    const EACH: u64 = 60;
    let mut callers = Vec::new();
    for _ in 0..CALLERS {
        callers.push(Conn::tcp(&node.tcp).await);
    }
    let work = |id: u64| Message::new("WORK").to("slow").with_id(id).with_payload(vec![7u8; 32 * 1024]);
    for c in callers.iter_mut() {
        for id in 1..=EACH {
            c.send(&work(id)).await;
        }
    }
    let (mut overloaded, mut disconnected) = (0u64, 0u64);
    let mut answered = vec![BTreeSet::new(); CALLERS];
    let mut sent = [EACH; CALLERS];
    let mut count = |m: &Message, answered: &mut BTreeSet<u64>| {
        assert!(answered.insert(m.envelope.reply_to), "a second answer to {}", m.envelope.reply_to);
        match (m.command.as_str(), m.get("code")) {
            ("ERROR", Some("overloaded")) => {
                assert_eq!(m.get("delivered"), Some("no"), "says the request did not run: {m:?}");
                overloaded += 1;
            }
            ("ERROR", Some("disconnected")) => {
                assert_eq!(m.get("delivered"), Some("maybe"), "says the request may have run: {m:?}");
                disconnected += 1;
            }
            // Sent after the cut.
            ("SERVICE_UNAVAILABLE", _) => {}
            _ => panic!("unexpected answer {m:?}"),
        }
    };
    // The first caller keeps offering, each offer followed by a PING whose PONG comes after the
    // offer's refusal, if any: it stops once the service is gone.
    let deadline = tokio::time::Instant::now() + WAIT + Duration::from_secs(2 * STALL_SECS);
    let mut every = tokio::time::interval(Duration::from_millis(100));
    let mut ping = 1_000_000u64;
    let mut gone = false;
    while !gone {
        assert!(tokio::time::Instant::now() < deadline, "the service that never reads was not cut");
        every.tick().await;
        sent[0] += 1;
        ping += 1;
        callers[0].send(&work(sent[0])).await;
        callers[0].send(&Message::new("PING").with_id(ping)).await;
        loop {
            let m = callers[0].recv().await;
            if m.envelope.reply_to == ping {
                break;
            }
            gone |= m.get("code") == Some("disconnected") || m.command == "SERVICE_UNAVAILABLE";
            count(&m, &mut answered[0]);
        }
    }
    report.inputs += sent.iter().sum::<u64>();
    let mut lost = 0;
    for (i, c) in callers.iter_mut().enumerate() {
        while answered[i].len() < sent[i] as usize {
            let Some(m) = c.try_recv(WAIT).await else { break };
            count(&m, &mut answered[i]);
        }
        lost += sent[i] - answered[i].len() as u64;
    }
    assert!(overloaded > 0, "the service's queue refused what it could not take");
    assert!(disconnected > 0, "the service was cut with accepted requests in flight once it stalled");
    assert!(slow.closed_within(WAIT).await, "the service that never reads is cut");
    report.lost += lost;
    report.line(format!(
        "slow consumer: {CALLERS} callers × {EACH} requests of 32 KiB (then one every 100 ms) to a service that never reads: {overloaded} refused at once 'overloaded', cut after {STALL_SECS} s without a write, {disconnected} 'disconnected, may have run', {lost} unanswered"
    ));
}

/// One client bursts 64 requests of 128 KiB (half the service's 256 KiB queue each) at a
/// service, while a second client sends the same service small requests; the service reads
/// nothing until the burst is sent, then answers everything it gets. The service is not cut, the
/// burster gets `ERROR code=overloaded` at once for what the queue refused (one sender's share
/// is a quarter of the queue), every accepted request is answered, and every one of the second
/// client's requests is answered by the service.
async fn burst_at_a_service(node: &Daemon, report: &mut Report) {
    const BURST: u64 = PENDING_PER_CLIENT;
    const SIZE: usize = 128 * 1024;
    const SMALL: u64 = 48;
    let mut shared = Conn::unix(&node.socket()).await;
    shared.register("shared").await;
    let (go, gate) = tokio::sync::oneshot::channel::<()>();
    let serve = tokio::spawn(async move {
        let _ = gate.await;
        let mut served = 0u64;
        while let Some(m) = shared.try_recv(WAIT).await {
            match m.command.as_str() {
                "BIG" | "SMALL" => {
                    shared.send(&m.reply("DONE")).await;
                    served += 1;
                }
                "QUIT" => break,
                _ => {}
            }
        }
        served
    });
    let mut burster = Conn::tcp(&node.tcp).await;
    let mut other = Conn::tcp(&node.tcp).await;
    let payload = bytes::Bytes::from(vec![0x55u8; SIZE]);
    let mut small_sent = 0u64;
    for id in 1..=BURST {
        burster.send(&Message::new("BIG").to("shared").with_id(id).with_payload(payload.clone())).await;
        if small_sent < SMALL {
            small_sent += 1;
            other.send(&Message::new("SMALL").to("shared").with_id(1000 + small_sent)).await;
        }
    }
    go.send(()).unwrap();
    report.inputs += BURST + SMALL;
    // The other client: every small request answered by the service.
    for _ in 0..SMALL {
        let m = other.recv().await;
        assert_eq!(m.command, "DONE", "the other client's request was served, not refused: {m:?}");
    }
    let (mut done, mut overloaded) = (0u64, 0u64);
    let mut answered = BTreeSet::new();
    while answered.len() < BURST as usize {
        let Some(m) = burster.try_recv(WAIT).await else { break };
        assert!(answered.insert(m.envelope.reply_to), "a second answer to {}", m.envelope.reply_to);
        match (m.command.as_str(), m.get("code")) {
            ("DONE", _) => done += 1,
            ("ERROR", Some("overloaded")) => {
                assert_eq!(m.get("delivered"), Some("no"), "{m:?}");
                assert!(m.get("message").is_some_and(|t| t.contains("busy")), "{m:?}");
                overloaded += 1;
            }
            _ => panic!("the burster got {m:?}: only answers and overloaded errors"),
        }
    }
    let lost = BURST - answered.len() as u64;
    report.lost += lost;
    assert_eq!(lost, 0, "every burst request answered: {done} done, {overloaded} overloaded");
    assert!(overloaded > 0, "the burst exceeded the service's queue: some was refused");
    assert!(done > 0, "what the queue took was served");
    // The service is still there: a new client is served by the same connection.
    let mut late = Conn::tcp(&node.tcp).await;
    let answer = late.request(Message::new("SMALL").to("shared").with_id(1)).await;
    assert_eq!(answer.command, "DONE", "the service was not cut: {answer:?}");
    late.send(&Message::new("QUIT").to("shared")).await;
    let served = tokio::time::timeout(WAIT, serve).await.expect("the service stops").unwrap();
    assert_eq!(served, done + SMALL + 1, "one service connection served everything accepted");
    report.line(format!(
        "burst at a shared service: {BURST} × {} KiB from one client (queue 256 KiB, the service paused): {done} served, {overloaded} refused at once 'overloaded'; another client's {SMALL} small requests all served; the service not cut",
        SIZE / 1024
    ));
}

/// Ten sniffers ask for everything and never read while a caller sends 40 MiB of requests to a
/// service that answers them: every request is answered, the sniffers are cut, the node's memory
/// stays bounded (it does not queue the 400 MiB of copies) and comes back once they are gone.
async fn silent_sniffers(node: &Daemon, report: &mut Report) {
    const SNIFFERS: usize = 10;
    const REQUESTS: u64 = 1280;
    const SIZE: usize = 32 * 1024;
    let (_, rss_before) = node.memory_kib();
    let mut sniffers = Vec::new();
    for _ in 0..SNIFFERS {
        let mut s = Conn::unix(&node.socket()).await;
        s.send(&Message::new("SNIFF")).await;
        assert_eq!(s.recv().await.command, "SNIFFING");
        sniffers.push(s);
    }
    let mut store = Conn::unix(&node.socket()).await;
    store.register("store").await;
    let serve = tokio::spawn(async move {
        while let Some(m) = store.try_recv(WAIT).await {
            if m.command == "PUT" {
                store.send(&m.reply("STORED")).await;
            }
        }
    });
    // One request at a time: the store keeps up, so only the sniffers fall behind.
    let mut caller = Conn::unix(&node.socket()).await;
    let payload = bytes::Bytes::from(vec![0x33u8; SIZE]);
    let mut answered = 0;
    for id in 1..=REQUESTS {
        let put = Message::new("PUT").to("store").with_id(id).with_payload(payload.clone());
        let answer = caller.request(put).await;
        assert_eq!(answer.command, "STORED", "{answer:?}");
        answered += 1;
    }
    serve.abort();
    report.inputs += SNIFFERS as u64 + REQUESTS;
    report.lost += REQUESTS - answered;
    let (_, rss_held) = node.memory_kib();
    let held_mib = rss_held.saturating_sub(rss_before) / 1024;
    let offered_mib = SNIFFERS as u64 * REQUESTS * SIZE as u64 / MIB;
    // Each sniffer is cut once its queue passes its bound; it reads what its socket buffered,
    // then the end.
    let mut cut = 0;
    for s in sniffers.iter_mut() {
        cut += usize::from(s.closed_within(WAIT).await);
    }
    assert_eq!(cut, SNIFFERS, "every sniffer that never read is cut");
    assert!(held_mib <= 2 * (OUTPUT_BUDGET / MIB), "the node held {held_mib} MiB of {offered_mib} MiB of copies");
    drop(sniffers);
    let back_mib = node.rss_over_after_release(rss_before).await;
    assert!(back_mib <= 8, "the memory of cut sniffers comes back: still {back_mib} MiB over");
    report.line(format!(
        "silent sniffers: {SNIFFERS} that never read, {REQUESTS} requests of {} KiB past them ({offered_mib} MiB of copies): all answered, {cut} cut, RSS grew {held_mib} MiB, {back_mib} MiB after",
        SIZE / 1024
    ));
}

/// A caller asks a service for 64 replies of 128 KiB and never reads them: the node cuts the
/// caller, not the service, and another caller of the same service is served meanwhile and after.
async fn caller_never_reads(node: &Daemon, report: &mut Report) {
    const REQUESTS: u64 = PENDING_PER_CLIENT;
    const SIZE: usize = 128 * 1024;
    let mut mirror = Conn::unix(&node.socket()).await;
    mirror.register("mirror").await;
    let serve = tokio::spawn(async move {
        while let Some(m) = mirror.try_recv(WAIT).await {
            let payload = match m.command.as_str() {
                "BIG" => bytes::Bytes::from(vec![0x44u8; SIZE]),
                "ECHO" => m.payload.clone(),
                _ => continue,
            };
            mirror.send(&m.reply("ECHOED").with_payload(payload)).await;
        }
    });
    let mut lazy = Conn::tcp(&node.tcp).await;
    for id in 1..=REQUESTS {
        lazy.send(&Message::new("BIG").to("mirror").with_id(id)).await;
    }
    report.inputs += REQUESTS;
    // Another caller is served while the lazy one's replies pile up.
    let mut other = Conn::tcp(&node.tcp).await;
    for id in 1..=8u64 {
        let answer = other.request(Message::new("ECHO").to("mirror").with_id(id).with_payload(&b"hi"[..])).await;
        assert_eq!((answer.command.as_str(), &answer.payload[..]), ("ECHOED", &b"hi"[..]));
    }
    report.inputs += 8;
    // The lazy caller is cut once its queue passes its bound: it finds the end after what its
    // socket buffered. The service was not.
    assert!(lazy.closed_within(WAIT).await, "a caller that never reads its replies is cut");
    let answer = other.request(Message::new("ECHO").to("mirror").with_id(9).with_payload(&b"after"[..])).await;
    assert_eq!(answer.command, "ECHOED", "the service was not cut with its lazy caller");
    serve.abort();
    report.line(format!(
        "caller that never reads: {REQUESTS} replies of {} KiB left unread: the caller cut, the service and another caller served",
        SIZE / 1024
    ));
}

/// An app whose worker takes its time to connect; a neighbour of the same user reads the
/// worker's `--uuid` and `--endpoint` in `/proc` and connects first.
async fn impersonation(users: &Users, node: &Daemon, report: &mut Report) {
    let app = node.dir.join("victim");
    std::fs::create_dir(&app).unwrap();
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o755)).unwrap();
    let nodus = users.bin.join("nodus").display().to_string();
    let manifest = serde_json::json!({
        "executable": "/bin/sh",
        "args": ["-c", "sleep 120; exec \"$0\" \"$@\"", nodus, "echo-worker"],
    });
    std::fs::write(app.join("manifest.json"), manifest.to_string()).unwrap();
    std::fs::write(app.join("profile.toml"), "startup-timeout = 120\n").unwrap();
    let deploy = users.nodus(User::Owner, &node.dir, &["app", "deploy", "victim", "victim"], &[]).await;
    assert!(deploy.status.success(), "{deploy:?}");
    assert!(!String::from_utf8_lossy(&deploy.stdout).contains("warning"), "workers can reach the app: {deploy:?}");
    // A request waits for the worker.
    let mut caller = Conn::unix(&node.socket()).await;
    caller.send(&Message::new("ECHO").to("victim").with_id(9).with_payload(&b"secret"[..])).await;
    let pid = loop {
        let info = users.nodus(User::Owner, &node.dir, &["--json", "app", "info", "victim"], &[]).await;
        let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        if let Some(pid) = v["workers"][0]["pid"].as_u64() {
            break pid;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The impostor: this binary again, as the user the workers run as when the node is root.
    let user = if users.nobody.is_some() { User::Nobody } else { User::Owner };
    let mut c = users.command(user, &users.bin.join("adversary"));
    c.args(["--exact", TEST, "--nocapture"]).env(ROLE, "impersonate").env(VICTIM, pid.to_string());
    let out = tokio::time::timeout(WAIT, c.output()).await.expect("the impostor ends").unwrap();
    let said = stderr(&out);
    assert!(said.contains("REFUSED"), "the impostor got in: {out:?}");
    report.inputs += 2;
    // The request was not served by it; removing the app answers it.
    assert!(caller.try_recv(Duration::from_millis(100)).await.is_none(), "answered by someone");
    let remove = users.nodus(User::Owner, &node.dir, &["app", "remove", "victim"], &[]).await;
    assert!(remove.status.success(), "{remove:?}");
    match caller.try_recv(WAIT).await {
        Some(m) if m.envelope.reply_to == 9 => assert_ne!(m.command, "RESULT", "{m:?}"),
        other => {
            report.lost += 1;
            panic!("the request for the removed app was not answered: {other:?}");
        }
    }
    let who = if user == User::Nobody { "nobody, the workers' own user" } else { "the same user" };
    report.line(format!(
        "worker impersonation: a neighbour process ({who}) with the worker's --uuid and --endpoint: refused"
    ));
}

/// The impostor's side: connects as worker `NODUS_ADVERSARY_VICTIM` with what its command line
/// gives away and heartbeats. Prints `SERVED` (exit 1) when the engine hands it a request,
/// `REFUSED` (exit 0) when the engine closes the connection, `UNDECIDED` (exit 2) otherwise.
async fn impostor(role: &str) -> i32 {
    use nodus_engine::protocol::{Decoder, Message as Worker, Role, DEFAULT_MAX_MESSAGE_BYTES};
    assert_eq!(role, "impersonate");
    let victim = std::env::var(VICTIM).expect("the victim's pid");
    let cmdline = std::fs::read(format!("/proc/{victim}/cmdline")).expect("the victim's command line");
    let words: Vec<String> = cmdline.split(|&b| b == 0).map(|w| String::from_utf8_lossy(w).into_owned()).collect();
    let after = |flag: &str| words.iter().position(|w| w == flag).and_then(|i| words.get(i + 1)).cloned();
    let (endpoint, uuid) = (after("--endpoint").expect("--endpoint"), after("--uuid").expect("--uuid"));
    let stream = UnixStream::connect(&endpoint).await.expect("the worker endpoint");
    let (mut r, mut w) = stream.into_split();
    let mut decoder = Decoder::new(Role::Worker, DEFAULT_MAX_MESSAGE_BYTES);
    let mut buf = BytesMut::new();
    let code = tokio::time::timeout(Duration::from_secs(10), async {
        for msg in [Worker::Handshake { uuid }, Worker::Heartbeat] {
            if w.write_all(&msg.to_bytes()).await.is_err() {
                return 0;
            }
        }
        loop {
            if matches!(r.read_buf(&mut buf).await, Ok(0) | Err(_)) {
                return 0;
            }
            while let Ok(Some(msg)) = decoder.decode(&mut buf) {
                if matches!(msg, Worker::Invoke { .. }) {
                    return 1;
                }
            }
        }
    })
    .await
    .unwrap_or(2);
    eprintln!("{}", ["REFUSED", "SERVED", "UNDECIDED"][code as usize]);
    code
}
