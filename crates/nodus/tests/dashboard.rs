//! The dashboard in a real browser: headless Chromium (Debian `chromium`) driven by
//! playwright-core (npm) through `dashboard/check.js`, against two `nodus daemon` processes. The
//! page loads and shows both nodes and a deployed app; an app call, a task submitted from the
//! page (listed as done, counted) and then a node killed with SIGKILL show up without a reload. Screenshots are written under the target directory and
//! their paths printed.
//!
//! Needs `node`, `/usr/bin/chromium` (or `NODUS_CHROMIUM`) and playwright-core in
//! `NODUS_PLAYWRIGHT` (a `node_modules` directory; `.ci/run` installs it into
//! `~/.cache/nodus-playwright`). Without them the test says so and passes, except under
//! `CI=true`, where it fails.
// These tests wait for real processes: the std clock is the right one here.
#![allow(clippy::disallowed_methods)]

mod common;
mod web;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use web::{echo_archive, eventually, procs_archive, Node};

/// Where playwright-core is, or why the test cannot run.
fn browser_setup() -> Result<(PathBuf, PathBuf), String> {
    let modules = std::env::var_os("NODUS_PLAYWRIGHT").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(&std::env::var_os("HOME").unwrap_or_default()).join(".cache/nodus-playwright/node_modules")
    });
    if !modules.join("playwright-core").is_dir() {
        return Err(format!("playwright-core is not installed in {} (see .ci/run)", modules.display()));
    }
    let chromium = std::env::var_os("NODUS_CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    if !chromium.exists() {
        return Err(format!("{} is missing: apt-get install chromium", chromium.display()));
    }
    if Command::new("node").arg("--version").output().is_err() {
        return Err("node is not installed".into());
    }
    Ok((modules, chromium))
}

#[test]
fn the_dashboard_shows_the_cluster_and_follows_it_live() {
    let (modules, chromium) = match browser_setup() {
        Ok(s) => s,
        Err(why) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("skipped: {why}");
            return;
        }
        Err(why) => panic!("{why}"),
    };
    let root = tempfile::tempdir().unwrap();
    let a = Node::start(root.path(), "a", &[], "", "info");
    let mut b = Node::start(root.path(), "b", &[a.cluster], "", "info");
    eventually("a sees b live", || a.request("GET", "/api/cluster", None, None).json()["live"] == 2);
    let archive = echo_archive(root.path());
    let deployed = a.request("PUT", "/api/apps/echo", Some(&a.token()), Some(("application/gzip", &archive)));
    assert_eq!(deployed.status, 201, "{deployed:?}");
    let procs = procs_archive(root.path());
    let deployed = a.request("PUT", "/api/apps/procs", Some(&a.token()), Some(("application/gzip", &procs)));
    assert_eq!(deployed.status, 201, "{deployed:?}");

    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&shots).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dashboard/check.js");
    let mut browser = Command::new("node")
        .arg(&script)
        .env("NODE_PATH", &modules)
        .env("URL", format!("http://127.0.0.1:{}/", a.http))
        .env("SHOTS", &shots)
        .env("CHROMIUM", &chromium)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = browser.stdin.take().unwrap();
    let mut said = Vec::new();
    for line in BufReader::new(browser.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        eprintln!("browser: {line}");
        if line == "KILL" {
            b.kill9();
            writeln!(stdin, "killed").unwrap();
        }
        said.push(line);
    }
    let status = browser.wait().unwrap();
    let shots_taken: Vec<&String> = said.iter().filter(|l| l.starts_with("SCREENSHOT ")).collect();
    assert!(status.success() && said.last().map(String::as_str) == Some("OK"), "{said:#?}\n{}", a.log());
    assert_eq!(shots_taken.len(), 4, "{said:#?}");
    eprintln!("screenshots in {}", shots.display());
}
