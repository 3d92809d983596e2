//! Several nodes on one host with `nodus daemon --instance N`: every listener, the data directory
//! and the server name are derived from N, so three nodes form a cluster with one flag each (and
//! the CLI reaches instance N with `--instance N`). The nodes run in a private network namespace
//! where root can make one, so the fixed instance ports never clash with anything else.
// These tests drive real processes and wait on the wall clock with std::thread::sleep.
#![allow(clippy::disallowed_methods)]

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn three_nodes_on_one_host_with_one_flag_each() {
    let ns = match NetNs::new() {
        Ok(ns) => Some(ns),
        Err(why) => {
            eprintln!("running on the host's network ({why}): ports 4050-4083, 7028-7048 and 10063-10083 must be free");
            None
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let daemon = |args: &[&str]| {
        let mut c = match &ns {
            Some(ns) => ns.command(NODUS),
            None => Command::new(NODUS),
        };
        c.arg("daemon").args(args).current_dir(dir.path()).stderr(Stdio::null());
        Running(c.spawn().unwrap())
    };
    let _one = daemon(&["--instance", "1"]);
    let _two = daemon(&["--instance", "2", "--neighbor", "127.0.0.1:4052"]);
    let _three = daemon(&["--instance", "3", "--neighbor", "127.0.0.1:4052"]);
    for n in 1..=3 {
        wait_socket(&dir.path().join(format!("nodus-data-{n}/nodus.sock")));
    }
    // The CLI finds instance N's socket in this directory with --instance N.
    let status = |n: &str| {
        let out = Command::new(NODUS)
            .args(["--instance", n, "--json", "cluster", "status"])
            .current_dir(dir.path())
            .env_remove("NODUS_NODE")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let deadline = Instant::now() + WAIT;
    let v = loop {
        let v = status("1");
        if v["live"] == 3 {
            break v;
        }
        assert!(Instant::now() < deadline, "the three instances did not form a cluster: {v}");
        std::thread::sleep(Duration::from_millis(50));
    };
    // Server names are derived from the host name, as the daemon names a node by default.
    let host = nodus_daemon::config::host_name();
    let mut addrs: Vec<(String, String)> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["server"].as_str().unwrap().to_string(), n["addr"].as_str().unwrap().to_string()))
        .collect();
    addrs.sort();
    let want: Vec<(String, String)> =
        (1..=3).map(|n| (format!("{host}-{n}"), format!("127.0.0.1:{}", 4042 + 10 * n))).collect();
    assert_eq!(addrs, want);
    assert_eq!(status("3")["server"], format!("{host}-3"));
}
