//! Shared helpers for tests of the node's HTTP listener: a `nodus daemon` process with HTTP on
//! a free port, a plain HTTP/1.1 client, the echo app as an archive to upload.
#![allow(dead_code)]

use crate::common::{free_port, WAIT};
use serde_json::Value;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const NODUS: &str = env!("CARGO_BIN_EXE_nodus");

/// A `nodus daemon` with HTTP on a free port; its stderr goes to `log`.
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pub http: u16,
    pub cluster: u16,
    child: Option<Child>,
}

impl Node {
    pub fn start(root: &Path, name: &str, neighbors: &[u16], extra: &str, log_level: &str) -> Node {
        Node::start_on("127.0.0.1", root, name, neighbors, extra, log_level)
    }

    /// As [`Node::start`], with HTTP listening on `host` (a free port).
    pub fn start_on(host: &str, root: &Path, name: &str, neighbors: &[u16], extra: &str, log_level: &str) -> Node {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let (http, cluster) = (free_port(), free_port());
        let neighbors: Vec<String> = neighbors.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
        let config = format!(
            "server_name = \"{name}\"\ndata_dir = {data:?}\nunix_socket = {sock:?}\ntcp_listen = \"\"\n\
             [cluster]\nlisten = \"127.0.0.1:{cluster}\"\nneighbors = [{n}]\nsecret = \"http-test\"\n\
             heartbeat_ms = 100\nudp_listen = \"\"\n[apps]\nlocator_listen = \"127.0.0.1:0\"\nrun_as = \"root\"\n\
             [tasks]\narpcp_listen = \"\"\n[http]\nlisten = \"{host}:{http}\"\n{extra}\n",
            data = dir.join("data").display().to_string(),
            sock = dir.join("n.sock").display().to_string(),
            n = neighbors.join(","),
        );
        let file = dir.join("nodus.toml");
        std::fs::write(&file, config).unwrap();
        let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
        let child = Command::new(NODUS)
            .args(["daemon", "--log-level", log_level, "--config"])
            .arg(&file)
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let node = Node { name: name.into(), dir, http, cluster, child: Some(child) };
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", http)).is_err() {
            assert!(Instant::now() < deadline, "{name} did not start serving HTTP");
            std::thread::sleep(Duration::from_millis(10));
        }
        node
    }

    /// The node's token.
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.dir.join("data/auth.token")).unwrap().trim().to_string()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// One request: (status, headers in lower case, body).
    pub fn request(&self, method: &str, path: &str, token: Option<&str>, body: Option<(&str, &[u8])>) -> Response {
        http(self.http, method, path, token, &[], body)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// A plain HTTP/1.1 request on a new connection (`Connection: close`, the body read to the end).
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<(&str, &[u8])>,
) -> Response {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let (ctype, bytes) = body.unwrap_or(("text/plain", b""));
    head.push_str(&format!("Content-Type: {ctype}\r\nContent-Length: {}\r\n\r\n", bytes.len()));
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(bytes).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked { dechunk(body) } else { body.to_string() };
    Response { status, headers, body }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// `examples/echo-app` as a `.tar.gz` whose worker runs this build's `nodus echo-worker`.
pub fn echo_archive(dir: &Path) -> Vec<u8> {
    use std::os::unix::fs::PermissionsExt;
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/echo-app");
    let app = dir.join("echo-app");
    std::fs::create_dir_all(&app).unwrap();
    for file in ["manifest.json", "profile.toml"] {
        std::fs::copy(example.join(file), app.join(file)).unwrap();
    }
    let worker = app.join("nodus-echo-worker");
    std::fs::write(&worker, format!("#!/bin/sh\nexec {NODUS:?} echo-worker \"$@\"\n")).unwrap();
    std::fs::set_permissions(&worker, std::fs::Permissions::from_mode(0o755)).unwrap();
    let archive = dir.join("echo-app.tar.gz");
    let ok = Command::new("tar").arg("czf").arg(&archive).arg("-C").arg(dir).arg("echo-app").status().unwrap();
    assert!(ok.success());
    std::fs::read(archive).unwrap()
}

/// Polls `f` until it is true (each answer is a real request; no sleeping for the thing itself).
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `examples/procs-app` (the task procedures) as a `.tar.gz` whose worker runs the
/// `nodus-procs-worker` built next to `nodus` (`cargo build -p nodus-tasks --bins`; `cargo test
/// --workspace` builds it).
pub fn procs_archive(dir: &Path) -> Vec<u8> {
    use std::os::unix::fs::PermissionsExt;
    let built = Path::new(NODUS).with_file_name("nodus-procs-worker");
    assert!(built.exists(), "{} is missing: build it with `cargo build -p nodus-tasks --bins`", built.display());
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/procs-app");
    let app = dir.join("procs-app");
    std::fs::create_dir_all(&app).unwrap();
    for file in ["manifest.json", "profile.toml"] {
        std::fs::copy(example.join(file), app.join(file)).unwrap();
    }
    let worker = app.join("nodus-procs-worker");
    std::fs::write(&worker, format!("#!/bin/sh\nexec {built:?} \"$@\"\n")).unwrap();
    std::fs::set_permissions(&worker, std::fs::Permissions::from_mode(0o755)).unwrap();
    let archive = dir.join("procs-app.tar.gz");
    let ok = Command::new("tar").arg("czf").arg(&archive).arg("-C").arg(dir).arg("procs-app").status().unwrap();
    assert!(ok.success());
    std::fs::read(archive).unwrap()
}
