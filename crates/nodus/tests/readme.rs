//! The README runs as written: every `sh` block of its "Using it" section, and the steps of
//! `examples/echo-app/README.md`, run in order by `sh` with the built `nodus` on `PATH`, in a
//! temporary working directory with the default (relative) data directory, exactly as a new user
//! would paste them.
//!
//! Blocks whose first command runs until stopped (`nodus daemon`, `nodus serve`, `nodus sniff`:
//! "in another terminal") run in the background until they say they are ready; `cargo` lines
//! are skipped (the binaries are already built; `target/release` points at them). The README's
//! node uses the default ports, so everything runs in a private network namespace; where this
//! process may not make one, the test says so and does not run.
// These tests drive real processes and wait on the wall clock with std::thread::sleep.
#![allow(clippy::disallowed_methods)]

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long one foreground block may run.
const BLOCK_TIMEOUT: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The directory holding the built binaries (`nodus`, and `nodus-echo-worker` once built).
fn bin_dir() -> PathBuf {
    Path::new(NODUS).parent().unwrap().to_path_buf()
}

/// The ```sh blocks of the section under `heading`, up to the next heading of the same level.
fn sh_blocks(markdown: &str, heading: &str) -> Vec<String> {
    let level = heading.split(' ').next().unwrap();
    let mut lines = markdown.lines().skip_while(|l| *l != heading).skip(1);
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in lines.by_ref() {
        if current.is_none() && line.starts_with(&format!("{level} ")) {
            break;
        }
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), l) => {
                block.push_str(l);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(!blocks.is_empty(), "no sh blocks under {heading:?}");
    blocks
}

/// The first command of a block (comments and blank lines skipped).
fn first_command(block: &str) -> &str {
    block.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')).unwrap_or("")
}

/// Lines that build or install from source, which the test replaces by the built binaries.
fn is_build(line: &str) -> bool {
    line.trim_start().starts_with("cargo ")
}

/// A block as `sh -e` should run it.
fn script(block: &str) -> String {
    block.lines().filter(|l| !is_build(l)).collect::<Vec<_>>().join("\n")
}

/// Where and how the blocks run.
struct Shell {
    ns: NetNs,
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    home: PathBuf,
}

/// A background block: its process group, and its output lines as they come.
struct Background {
    child: std::process::Child,
    stdout: mpsc::Receiver<String>,
    /// Kept so that the block's stderr stays drained.
    _stderr: mpsc::Receiver<String>,
}

impl Drop for Background {
    fn drop(&mut self) {
        kill_group(self.child.id());
        let _ = self.child.wait();
    }
}

/// Kills a process group (the block's shell and everything it started).
fn kill_group(leader: u32) {
    let _ = Command::new("kill").args(["-KILL", "--", &format!("-{leader}")]).stderr(Stdio::null()).status();
}

/// Sends each line of `r` to a channel, from a thread.
fn lines_of(r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits for a line containing one of `marks`; returns it.
fn wait_for(rx: &mpsc::Receiver<String>, marks: &[&str], what: &str) -> String {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if marks.iter().any(|m| line.contains(m)) => return line,
            Ok(line) => seen.push(line),
            Err(_) => panic!("{what}: none of {marks:?} within {WAIT:?}; got {seen:#?}"),
        }
    }
}

impl Shell {
    fn new(ns: NetNs) -> Shell {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let home = dir.join("home");
        std::fs::create_dir_all(&home).unwrap();
        Shell { ns, _tmp: tmp, dir, home }
    }

    fn command(&self, script: &str) -> Command {
        let mut c = self.ns.command_in("sh", &self.dir);
        let path = format!("{}:{}", bin_dir().display(), std::env::var("PATH").unwrap_or_default());
        c.arg("-ec")
            .arg(script)
            .env("PATH", path)
            .env("HOME", &self.home)
            .env_remove("NODUS_NODE")
            .env_remove("NODUS_TOKEN")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        c
    }

    /// Runs a block to its end (at most [`BLOCK_TIMEOUT`]); returns how it ended (`None`: it
    /// did not), its stdout and its stderr. Whatever it left behind (a `&` daemon) goes with it.
    fn run_block(&self, block: &str) -> (Option<std::process::ExitStatus>, String, String) {
        let mut child = self.command(&script(block)).spawn().unwrap();
        let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let (out, err) = (lines_of(out), lines_of(err));
        let deadline = Instant::now() + BLOCK_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        kill_group(child.id());
        let _ = child.wait();
        let stdout: Vec<String> = out.try_iter().collect();
        let stderr: Vec<String> = err.try_iter().collect();
        (status, stdout.join("\n"), stderr.join("\n"))
    }

    /// Runs a block to its end; returns its stdout, failing the test on a non-zero exit.
    fn run(&self, block: &str) -> String {
        match self.run_block(block) {
            (Some(s), stdout, _) if s.success() => stdout,
            (other, stdout, stderr) => {
                panic!("block failed ({other:?}):\n{block}\n--- stdout:\n{stdout}\n--- stderr:\n{stderr}")
            }
        }
    }

    /// Runs a block that must fail (exit non-zero); returns its stdout and stderr.
    fn run_failing(&self, block: &str) -> String {
        let (status, stdout, stderr) = self.run_block(block);
        let text = format!("{stdout}\n{stderr}");
        assert!(status.is_some_and(|s| !s.success()), "the block should have failed ({status:?}):\n{block}\n{text}");
        text
    }

    /// Starts a long-running block; returns once it printed (on stdout or stderr) a ready line.
    fn start(&self, block: &str) -> Background {
        let mut child = self.command(&script(block)).spawn().unwrap();
        let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let err = lines_of(err);
        wait_for(&err, &["nodus node ready", "serving ", "sniffing "], first_command(block));
        Background { child, stdout: lines_of(out), _stderr: err }
    }
}

fn long_running(block: &str) -> bool {
    let c = first_command(block);
    ["nodus daemon", "nodus serve", "nodus sniff"].iter().any(|p| c.starts_with(p))
}

/// A network namespace, or `None` after saying why the test cannot run.
fn namespace(test: &str) -> Option<NetNs> {
    match NetNs::new() {
        Ok(ns) => Some(ns),
        Err(why) => {
            eprintln!("SKIPPED {test}: the README's node uses the default ports, so it runs in a private network namespace: {why}");
            None
        }
    }
}

#[test]
fn the_using_it_blocks_run_as_written() {
    let Some(ns) = namespace("the_using_it_blocks_run_as_written") else { return };
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let shell = Shell::new(ns);
    let mut background = Vec::new();
    let mut outputs = Vec::new();
    for block in sh_blocks(&readme, "## Using it") {
        if long_running(&block) {
            background.push((first_command(&block).to_string(), shell.start(&block)));
        } else {
            outputs.push(shell.run(&block));
        }
    }
    let all = outputs.join("\n");
    // What the comments promise.
    assert!(all.lines().any(|l| l == "hello, world"), "{all}");
    assert!(all.lines().any(|l| l == "hello, you!"), "{all}");
    assert!(all.contains("not delivered (exit 1)"), "{all}");
    assert!(all.contains("tcp_listen = \"127.0.0.1:4040\""), "{all}");
    assert!(shell.home.join(".local/share/man/man1/nodus.1").metadata().unwrap().len() > 0);
    assert!(shell.home.join(".local/share/bash-completion/completions/nodus").exists());
    // The sniffer saw the service's traffic.
    let (_, sniff) = background.iter().find(|(c, _)| c.starts_with("nodus sniff")).expect("a sniff block");
    wait_for(&sniff.stdout, &["greeter/GREET"], "nodus sniff");
    // `nodus stop` returned once the node had stopped: the daemon's block has ended.
    let (_, daemon) = background.iter_mut().find(|(c, _)| c.starts_with("nodus daemon")).expect("a daemon block");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        match daemon.child.try_wait().unwrap() {
            Some(status) => break status,
            None => assert!(Instant::now() < deadline, "the node did not exit after `nodus stop`"),
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "the node stopped cleanly: {status:?}");
}

/// The echo-app README's blocks: the steps, then the steps as root in a closed checkout.
fn echo_app_blocks() -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("examples/echo-app/README.md")).unwrap();
    let blocks = sh_blocks(&text, "# echo-app");
    assert_eq!(blocks.len(), 2, "the steps, and the steps as root in a checkout others cannot enter");
    blocks
}

/// What the steps need in the shell's directory, as in the repository's root: the example app,
/// and `target/release` holding the built binaries (`nodus-echo-worker` built if missing).
fn checkout(shell: &Shell) {
    let worker = bin_dir().join("nodus-echo-worker");
    if !worker.exists() {
        // Built by `cargo test --workspace` (nodus-engine's binaries); build it for a lone run.
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "nodus-engine", "--bin", "nodus-echo-worker"])
            .current_dir(repo())
            .status()
            .unwrap();
        assert!(status.success() && worker.exists(), "cannot build nodus-echo-worker");
    }
    let app = shell.dir.join("examples/echo-app");
    std::fs::create_dir_all(&app).unwrap();
    for f in ["manifest.json", "profile.toml"] {
        std::fs::copy(repo().join("examples/echo-app").join(f), app.join(f)).unwrap();
    }
    std::fs::create_dir_all(shell.dir.join("target")).unwrap();
    std::os::unix::fs::symlink(bin_dir(), shell.dir.join("target/release")).unwrap();
}

#[test]
fn the_echo_app_steps_run_as_written() {
    let Some(ns) = namespace("the_echo_app_steps_run_as_written") else { return };
    let blocks = echo_app_blocks();
    let shell = Shell::new(ns);
    checkout(&shell);
    let out = shell.run(&blocks[0]);
    assert!(out.lines().any(|l| l == "hi"), "{out}");
    assert!(out.lines().any(|l| l == "012"), "{out}");
    assert!(out.contains("status     running") && out.contains("workers    2"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("WORKER")), "{out}");
}

/// As root in a checkout `nobody` cannot enter (a clone under `/root`): the steps warn at the
/// deploy and fail at the first call, as the README says; then, in the same shell, its steps for
/// that case work as written (their `/var/lib` is a private tmpfs here).
#[test]
fn as_root_in_a_closed_checkout_the_deploy_warns_and_the_readmes_steps_for_it_work() {
    let test = "as_root_in_a_closed_checkout_the_deploy_warns_and_the_readmes_steps_for_it_work";
    if !nodus_engine::identity::is_root() {
        eprintln!("SKIPPED {test}: the node runs workers as another user only when it runs as root");
        return;
    }
    let blocks = echo_app_blocks();
    let ns = match NetNs::with_tmpfs(&["/var/lib"]) {
        Ok(ns) => ns,
        Err(why) => {
            eprintln!("SKIPPED {test}: its steps use the default ports and write /var/lib/nodus, here in private namespaces: {why}");
            return;
        }
    };
    let shell = Shell::new(ns);
    checkout(&shell);
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&shell.dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let out = shell.run_failing(&blocks[0]);
    let dir = shell.dir.display().to_string();
    assert!(
        out.contains("workers run as user nobody") && out.contains(&format!("cannot enter {dir} (mode 0700)")),
        "the deploy warns: {out}"
    );
    assert!(out.contains("ERROR code=rejected"), "the first call fails: {out}");
    // The node of the failed steps went with them; the steps for this case follow.
    let out = shell.run(&blocks[1]);
    assert!(!out.contains("warning"), "{out}");
    assert!(out.lines().any(|l| l == "hi"), "{out}");
}
