//! Apps through the `nodus` binary the way a user runs it: a daemon started in a fresh working
//! directory with the default (relative) data directory, the example app deployed from a
//! relative path, and the app called by name.

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
            .args(["daemon", "--listen", "", "--cluster-listen", "", "--udp-listen", ""])
            .args(["--locator-listen", "127.0.0.1:0"])
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
}
