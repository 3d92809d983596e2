//! Apps through the `nodus` binary the way a user runs it: a daemon started in a fresh working
//! directory with the default (relative) data directory, the example app deployed from a
//! relative path, and the app called by name.

// These tests drive real processes on wall time.
#![allow(clippy::disallowed_methods)]
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const NODUS: &str = env!("CARGO_BIN_EXE_nodus");
const WAIT: Duration = Duration::from_secs(15);

/// A `nodus daemon` running in `cwd` with the embedded defaults, except for listeners that would
/// clash with other nodes on this host (no TCP, cluster or UDP port; the locator on any port).
struct Node {
    child: Child,
    cwd: PathBuf,
}

impl Node {
    fn start(cwd: &Path, extra: &[&str]) -> Node {
        let child = Command::new(NODUS)
            .args(["daemon", "--listen", "", "--cluster-listen", "", "--udp-listen", "", "--http-listen", ""])
            .args(["--locator-listen", "127.0.0.1:0", "--arpcp-listen", ""])
            .args(extra)
            .current_dir(cwd)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let node = Node { child, cwd: cwd.to_path_buf() };
        let deadline = Instant::now() + WAIT;
        while std::os::unix::net::UnixStream::connect(node.socket()).is_err() {
            assert!(Instant::now() < deadline, "the daemon did not start listening");
            std::thread::sleep(Duration::from_millis(10));
        }
        node
    }

    /// The default socket, `./nodus-data/nodus.sock`.
    fn socket(&self) -> PathBuf {
        self.cwd.join("nodus-data/nodus.sock")
    }

    /// Runs the CLI in the node's working directory.
    fn cli(&self, args: &[&str]) -> Output {
        let node = format!("unix:{}", self.socket().display());
        Command::new(NODUS).arg("--node").arg(node).args(args).current_dir(&self.cwd).output().unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A working directory any user may enter (apps may run as an unprivileged user).
fn workdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new().prefix("nodus-apps").tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// `examples/echo-app` copied to `<dir>/echo-app`, with its worker: a script that runs this
/// build's `nodus echo-worker` (the binary linked next to it, where any user can run it).
fn echo_app(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/echo-app");
    let app = dir.join("echo-app");
    std::fs::create_dir_all(&app).unwrap();
    for file in ["manifest.json", "profile.toml"] {
        std::fs::copy(example.join(file), app.join(file)).unwrap();
    }
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    if std::fs::hard_link(NODUS, bin.join("nodus")).is_err() {
        std::fs::copy(NODUS, bin.join("nodus")).unwrap();
    }
    let worker = app.join("nodus-echo-worker");
    std::fs::write(&worker, format!("#!/bin/sh\nexec {:?} echo-worker \"$@\"\n", bin.join("nodus"))).unwrap();
    std::fs::set_permissions(&worker, std::fs::Permissions::from_mode(0o755)).unwrap();
    app
}

/// The uid a process runs as.
fn uid_of(pid: &str) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

#[test]
fn apps_run_with_the_default_relative_data_directory() {
    let dir = workdir();
    echo_app(dir.path());
    let node = Node::start(dir.path(), &[]);
    let out = node.cli(&["app", "deploy", "echo", "echo-app"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = node.cli(&["call", "echo", "ECHO", "--payload", "hi"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().nth(1), Some("hi"), "{}", text(&out));
    let crashlog = node.cli(&["app", "crashlog", "echo"]);
    assert!(!text(&crashlog).contains("cannot start"), "{}", text(&crashlog));
    // As root, with the embedded defaults, the worker runs as `nobody`.
    let info = node.cli(&["--json", "app", "info", "echo"]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let worker = v["workers"][0].to_string();
    let pid = &v["workers"][0]["pid"].as_u64().unwrap().to_string();
    if is_root() {
        let nobody = Command::new("id").args(["-u", "nobody"]).output().unwrap();
        let nobody: u32 = String::from_utf8_lossy(&nobody.stdout).trim().parse().unwrap();
        assert_eq!(uid_of(pid), nobody, "worker {worker}");
    } else {
        eprintln!("not root: workers run as this user; run_as is not exercised here");
    }
}

#[test]
fn a_root_node_runs_apps_as_an_unprivileged_user_and_says_when_it_cannot() {
    if !is_root() {
        eprintln!("SKIPPED: only a node running as root switches users");
        return;
    }
    let dir = workdir();
    for (run_as, expected) in [("", "run_as is empty"), ("no-such-user-here", "does not exist")] {
        let config = dir.path().join("n.toml");
        std::fs::write(&config, format!("[apps]\nrun_as = {run_as:?}\n")).unwrap();
        let out = Command::new(NODUS)
            .args(["daemon", "--listen", "", "--cluster-listen", "", "--udp-listen", "", "--locator-listen", ""])
            .args(["--http-listen", ""])
            .args(["--arpcp-listen", ""])
            .arg("--config")
            .arg(&config)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "started with run_as = {run_as:?}");
        assert!(text(&out).contains(expected), "{}", text(&out));
    }
    // Where `nobody` cannot reach the app, the deploy says so at once.
    let closed = tempfile::Builder::new().prefix("nodus-closed").tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(closed.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    echo_app(closed.path());
    let node = Node::start(closed.path(), &[]);
    let out = node.cli(&["app", "deploy", "echo", "echo-app"]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("warning") && said.contains("user nobody") && said.contains("cannot enter"), "{said}");
}

/// A text-form connection to the node's socket.
struct Text {
    reader: BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl Text {
    fn connect(node: &Node) -> Text {
        let writer = std::os::unix::net::UnixStream::connect(node.socket()).unwrap();
        writer.set_read_timeout(Some(WAIT)).unwrap();
        Text { reader: BufReader::new(writer.try_clone().unwrap()), writer }
    }

    fn send(&mut self, line: &str) {
        writeln!(self.writer, "{line}").unwrap();
    }

    /// Reads lines until one answers request `id`.
    fn answer(&mut self, id: u64) -> String {
        loop {
            let mut line = String::new();
            assert!(self.reader.read_line(&mut line).unwrap() > 0, "the node closed the connection");
            if line.contains(&format!("_reply_to={id}")) {
                return line;
            }
        }
    }

    fn received(&mut self, id: u64) -> u64 {
        self.send(&format!("INFO _id={id}"));
        let line = self.answer(id);
        let at = line.find("received=").unwrap() + "received=".len();
        line[at..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
    }
}

#[test]
fn the_apps_service_never_answers_an_answer_nor_a_message_without_id() {
    // `apps/FOO` without _id once started an endless ERROR <-> UNKNOWN loop inside the node.
    let dir = workdir();
    let node = Node::start(dir.path(), &[]);
    let mut conn = Text::connect(&node);
    // Every message the node handled between two node requests, over 20 round trips: only
    // those requests when nothing goes round inside the node.
    let settled = |conn: &mut Text, base: u64| {
        let first = conn.received(base);
        let last = (1..=20).map(|i| conn.received(base + i)).last().unwrap();
        assert_eq!(last - first, 20, "messages keep going round inside the node");
    };
    conn.send("apps/FOO");
    // Changes are handled in order: once this one is answered, every message above was handled.
    conn.send("apps/STOP name=x;_id=7");
    let stop = conn.answer(7);
    settled(&mut conn, 100);
    for line in [
        "apps/ERROR code=apps;message=x",
        "apps/UNKNOWN command=FOO",
        "apps/INVALID message=x",
        "apps/RESULT _reply_to=99",
        "apps/ERROR code=apps;_id=5;_reply_to=98",
        "apps/DEPLOY name=x",
        "apps/START name=x",
        "apps/STOP name=x",
        "apps/RESTART name=x",
        "apps/SCALE name=x;workers=1",
        "apps/REMOVE name=x",
        "apps/LIST",
        "apps/INFO name=x",
        "apps/CRASHLOG name=x",
        "apps/DEPLOY_STATUS name=x",
    ] {
        conn.send(line);
    }
    conn.send("apps/STOP name=x;_id=8");
    conn.answer(8);
    settled(&mut conn, 200);
    assert!(stop.contains("code=unknown_app"), "{stop}");
    // With an _id, each command is answered once, errors included.
    conn.send("apps/FOO _id=10");
    let foo = conn.answer(10);
    // The service declared its commands: the node itself answers that it does not take FOO.
    assert!(foo.contains("UNKNOWN") && foo.contains("command=FOO"), "{foo}");
}

fn call_apps(node: &Node, command: &str, params: &[&str]) -> String {
    let mut args = vec!["call", "apps", command];
    args.extend_from_slice(params);
    text(&node.cli(&args))
}

#[test]
fn deploys_are_checked_cleaned_up_and_watched() {
    use std::os::unix::fs::PermissionsExt;
    let dir = workdir();
    let app = echo_app(dir.path());
    let node = Node::start(dir.path(), &[]);

    // A .tar.gz of the app's folder, as `tar czf` makes it, deploys as the folder does.
    let tar = Command::new("tar").args(["czf", "echo.tar.gz", "echo-app"]).current_dir(dir.path()).status();
    if tar.is_ok_and(|s| s.success()) {
        let out = node.cli(&["app", "deploy", "packed", "echo.tar.gz"]);
        assert!(out.status.success(), "{}", text(&out));
        let out = node.cli(&["call", "packed", "ECHO", "--payload", "from the archive"]);
        assert!(text(&out).contains("from the archive"), "{}", text(&out));
    } else {
        eprintln!("no tar command here: the archive case is covered by the store's unit tests only");
    }

    // Errors name the user's path, never the staging directory, and leave nothing behind.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = node.cli(&["app", "deploy", "empty", "empty"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains(&format!("{} has no manifest", empty.display())), "{}", text(&out));
    assert!(!text(&out).contains("staging"), "{}", text(&out));
    let worker = app.join("nodus-echo-worker");
    std::fs::set_permissions(&worker, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = node.cli(&["app", "deploy", "noexec", "echo-app"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("is not executable"), "{}", text(&out));
    std::fs::set_permissions(&worker, std::fs::Permissions::from_mode(0o755)).unwrap();
    let apps_dir = dir.path().join("nodus-data/apps");
    for name in ["empty", "noexec"] {
        assert!(!apps_dir.join(name).exists(), "a failed deployment left {name} behind");
    }
    assert!(!text(&node.cli(&["app", "list"])).contains("noexec"));

    // A name a registered service holds is refused.
    let mut svc = Text::connect(&node);
    svc.send("REGISTER service=taken;version=1");
    svc.send("LIST_SERVICES _id=1");
    svc.answer(1);
    let out = node.cli(&["app", "deploy", "taken", "echo-app"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("already registered"), "{}", text(&out));
    assert!(!apps_dir.join("taken").exists());
    for reserved in ["node", "apps", "locator"] {
        let out = node.cli(&["app", "deploy", reserved, "echo-app"]);
        assert!(text(&out).contains("already registered"), "{reserved}: {}", text(&out));
    }

    // Unknown apps: INFO and CRASHLOG answer alike.
    let info = node.cli(&["app", "info", "ghost"]);
    let crashlog = node.cli(&["app", "crashlog", "ghost"]);
    assert_eq!((info.status.code(), crashlog.status.code()), (Some(1), Some(1)));
    assert_eq!(text(&info), text(&crashlog));
    assert!(text(&info).contains("not deployed"), "{}", text(&info));

    // Scaling past pool-limit (4 in the example's profile) sets 4 and says so.
    assert!(node.cli(&["app", "deploy", "echo", "echo-app"]).status.success());
    let out = text(&node.cli(&["app", "scale", "echo", "10"]));
    assert!(out.contains("workers    4") && out.contains("capped_by  pool-limit"), "{out}");
    let out = text(&node.cli(&["app", "scale", "echo", "2"]));
    assert!(out.contains("workers    2") && !out.contains("capped_by"), "{out}");

    // A stopped app keeps its name and says it is stopped.
    assert!(node.cli(&["app", "stop", "echo"]).status.success());
    let out = node.cli(&["call", "echo", "ECHO", "--payload", "x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("code=stopped") && text(&out).contains("nodus app start echo"), "{}", text(&out));

    // A deploy that takes long (its archive is a pipe nobody writes yet) can be watched, and
    // the service keeps answering meanwhile.
    let pipe = dir.path().join("slow.tar");
    assert!(Command::new("mkfifo").arg(&pipe).status().unwrap().success());
    let deploying = Command::new(NODUS)
        .args(["--node", &format!("unix:{}", node.socket().display()), "app", "deploy", "slow", "slow.tar"])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let status = call_apps(&node, "DEPLOY_STATUS", &["name=slow"]);
        if status.contains("stage=unpacking") {
            break;
        }
        assert!(status.contains("stage=idle") || status.contains("stage=preparing"), "{status}");
        assert!(Instant::now() < deadline, "the deploy never started unpacking: {status}");
    }
    assert!(text(&node.cli(&["app", "list"])).contains("echo"), "LIST waits behind a deploy");
    let archive =
        Command::new("tar").args(["cf", "-", "-C", "echo-app", "."]).current_dir(dir.path()).output().unwrap();
    std::fs::OpenOptions::new().write(true).open(&pipe).unwrap().write_all(&archive.stdout).unwrap();
    let done = deploying.wait_with_output().unwrap();
    assert!(done.status.success(), "{}", text(&done));
    let status = call_apps(&node, "DEPLOY_STATUS", &["name=slow"]);
    assert!(status.contains("stage=idle"), "{status}");
}
