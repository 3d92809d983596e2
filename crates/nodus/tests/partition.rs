//! A real network partition: three nodes in their own network namespaces, joined by a bridge in a
//! fourth. Cutting one node's port leaves it alone (CLUSTER_DOWN) while the other two keep the
//! quorum (CLUSTER_UP, INCOMPLETE); healing it brings everyone back to COMPLETE.
//!
//! Needs root and `ip netns`; otherwise the test prints why and passes without running.
// These tests drive real processes and wait on the wall clock with std::thread::sleep.
#![allow(clippy::disallowed_methods)]

mod common;

use common::*;
use std::process::Command;

/// Namespaces, a bridge and veth pairs, removed on drop.
struct Net {
    switch: String,
    hosts: Vec<String>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Net {
    /// `n` hosts at 10.77.0.1.. on one bridge.
    fn new(n: usize) -> Result<Net, String> {
        let tag = std::process::id() % 100_000;
        let mut net = Net { switch: format!("nodus{tag}sw"), hosts: Vec::new() };
        ip(&["netns", "add", &net.switch])?;
        ip(&["-n", &net.switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &net.switch, "link", "set", "br0", "up"])?;
        for i in 0..n {
            let host = format!("nodus{tag}h{i}");
            ip(&["netns", "add", &host])?;
            net.hosts.push(host.clone());
            let (inside, outside) = (format!("nh{tag}i{i}"), format!("nh{tag}o{i}"));
            ip(&["link", "add", &inside, "type", "veth", "peer", "name", &outside])?;
            ip(&["link", "set", &inside, "netns", &host])?;
            ip(&["link", "set", &outside, "netns", &net.switch])?;
            ip(&["-n", &host, "addr", "add", &format!("{}/24", Self::addr(i)), "dev", &inside])?;
            ip(&["-n", &host, "link", "set", &inside, "up"])?;
            ip(&["-n", &host, "link", "set", "lo", "up"])?;
            ip(&["-n", &net.switch, "link", "set", &outside, "master", "br0"])?;
            ip(&["-n", &net.switch, "link", "set", &outside, "up"])?;
        }
        Ok(net)
    }

    fn addr(i: usize) -> String {
        format!("10.77.0.{}", i + 1)
    }

    fn port(&self, i: usize) -> String {
        format!("nh{}o{i}", std::process::id() % 100_000)
    }

    fn cut(&self, i: usize) {
        ip(&["-n", &self.switch, "link", "set", &self.port(i), "down"]).unwrap();
    }

    fn heal(&self, i: usize) {
        ip(&["-n", &self.switch, "link", "set", &self.port(i), "up"]).unwrap();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.hosts.iter().chain(std::iter::once(&self.switch)) {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

#[test]
fn minority_goes_down_majority_stays_up_and_the_cluster_heals() {
    let net = match Net::new(3) {
        Ok(net) => net,
        Err(why) => {
            eprintln!("SKIPPED partition test: network namespaces unavailable ({why})");
            return;
        }
    };
    rt().block_on(async {
        let root = tempfile::tempdir().unwrap();
        let addr = |i: usize| format!("{}:4042", Net::addr(i));
        let a = Proc::in_netns(&root, "a", &net.hosts[0], &Net::addr(0), &[]);
        let b = Proc::in_netns(&root, "b", &net.hosts[1], &Net::addr(1), &[addr(0)]);
        let c = Proc::in_netns(&root, "c", &net.hosts[2], &Net::addr(2), &[addr(0), addr(1)]);
        let mut wa = Watch::on(&a, "watch").await;
        let mut wc = Watch::on(&c, "watch").await;
        wa.wait_for(3, 3).await;
        wc.wait_for(3, 3).await;

        net.cut(2);
        wc.wait_for(1, 3).await;
        wa.wait_for(2, 3).await;
        let (c_up, _, _, _) = wc.status().await;
        let (a_up, a_complete, _, _) = wa.status().await;
        assert!(!c_up, "the minority side reports CLUSTER_DOWN");
        assert!(a_up && !a_complete, "the majority stays UP, INCOMPLETE");

        net.heal(2);
        wc.wait_for(3, 3).await;
        wa.wait_for(3, 3).await;
        // Links cut by the partition may still be found dead just after the heal (their last
        // heartbeats are long gone) and dialled again: converged means it settles UP, COMPLETE.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let (up, complete, live, known) = wc.status().await;
            if up && complete {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "converged after healing: {live}/{known} live");
            wc.wait_for(3, 3).await;
        }
        drop((a, b, c));
    });
}
