//! A real network for partition tests: hosts in network namespaces joined by a bridge in one
//! more, each on its own port of the bridge; cutting a host's port partitions it. Needs root and
//! `ip netns`; `Net::new` says why it cannot build one so the test can skip with that reason.

use std::process::Command;

/// Namespaces, a bridge and veth pairs, removed on drop.
pub struct Net {
    /// The namespace holding the bridge.
    pub switch: String,
    /// The hosts' namespaces.
    pub hosts: Vec<String>,
    /// Names this network's devices and namespaces apart from another test's.
    prefix: String,
    /// The hosts are at 10.`subnet`.0.1, .2, ...
    subnet: u8,
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
    /// `n` hosts at 10.`subnet`.0.1.. on one bridge. `prefix` (two or three letters) keeps the
    /// names of tests that run at the same time apart; so does a `subnet` of their own.
    pub fn new(n: usize, prefix: &str, subnet: u8) -> Result<Net, String> {
        let prefix = format!("{prefix}{}", std::process::id() % 100_000);
        let mut net = Net { switch: format!("n{prefix}sw"), hosts: Vec::new(), prefix, subnet };
        ip(&["netns", "add", &net.switch])?;
        ip(&["-n", &net.switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &net.switch, "link", "set", "br0", "up"])?;
        for i in 0..n {
            let host = format!("n{}h{i}", net.prefix);
            ip(&["netns", "add", &host])?;
            net.hosts.push(host.clone());
            let (inside, outside) = (format!("{}i{i}", net.prefix), net.port(i));
            ip(&["link", "add", &inside, "type", "veth", "peer", "name", &outside])?;
            ip(&["link", "set", &inside, "netns", &host])?;
            ip(&["link", "set", &outside, "netns", &net.switch])?;
            ip(&["-n", &host, "addr", "add", &format!("{}/24", net.addr(i)), "dev", &inside])?;
            ip(&["-n", &host, "link", "set", &inside, "up"])?;
            ip(&["-n", &host, "link", "set", "lo", "up"])?;
            ip(&["-n", &net.switch, "link", "set", &outside, "master", "br0"])?;
            ip(&["-n", &net.switch, "link", "set", &outside, "up"])?;
        }
        Ok(net)
    }

    /// Host `i`'s address.
    pub fn addr(&self, i: usize) -> String {
        format!("10.{}.0.{}", self.subnet, i + 1)
    }

    fn port(&self, i: usize) -> String {
        format!("{}o{i}", self.prefix)
    }

    /// Cuts host `i` off (its port on the bridge goes down).
    pub fn cut(&self, i: usize) {
        ip(&["-n", &self.switch, "link", "set", &self.port(i), "down"]).unwrap();
    }

    /// Joins host `i` again.
    pub fn heal(&self, i: usize) {
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
