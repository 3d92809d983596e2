//! What a worker node declares about itself in `ManagerRequest`, read from the system: cores
//! (the parallelism the process may use, which honours CPU affinity and cgroup quotas, else
//! the processors in `/proc/cpuinfo`), memory (`MemTotal` in `/proc/meminfo`), and the MAC
//! address of the interface carrying the node's address (`/sys/class/net/<if>/address`). The
//! parsers are pure; [`Resources::read`] does the reading.

use std::net::IpAddr;
use std::path::Path;

/// A node's resources and identity on its network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resources {
    /// Cores it may use.
    pub cores: u32,
    /// Memory, in bytes.
    pub memory: u64,
    /// Its address (the one asked about, or the first address of the first non-loopback
    /// interface when that was unspecified).
    pub ip: IpAddr,
    /// The name of the interface carrying it.
    pub interface: String,
    /// That interface's MAC address (`00:00:00:00:00:00` for loopback).
    pub mac: String,
}

/// Why the resources could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    /// A system file could not be read or parsed.
    #[error("cannot read {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// No interface carries the address.
    #[error("no network interface carries {0}; set the node's cluster address to one of this host's addresses")]
    NoInterface(IpAddr),
}

/// The processors listed in `/proc/cpuinfo` text.
pub fn parse_cpuinfo(text: &str) -> u32 {
    let n = text.lines().filter(|l| l.split(':').next().is_some_and(|k| k.trim() == "processor")).count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// `MemTotal` from `/proc/meminfo` text, in bytes.
pub fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | Some("KB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

/// A MAC address as `/sys/class/net/<if>/address` writes it, checked and lower-cased.
pub fn parse_mac(text: &str) -> Option<String> {
    let t = text.trim().to_ascii_lowercase();
    let parts: Vec<&str> = t.split(':').collect();
    let ok = parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    ok.then_some(t)
}

fn read(path: &Path) -> Result<String, ResourceError> {
    std::fs::read_to_string(path)
        .map_err(|e| ResourceError::File { path: path.display().to_string(), reason: e.to_string() })
}

/// The cores this process may use.
pub fn cores() -> u32 {
    match std::thread::available_parallelism() {
        Ok(n) => u32::try_from(n.get()).unwrap_or(u32::MAX),
        Err(_) => read(Path::new("/proc/cpuinfo")).map(|t| parse_cpuinfo(&t)).unwrap_or(1).max(1),
    }
}

/// The host's memory in bytes.
///
/// # Errors
/// `/proc/meminfo` cannot be read or has no `MemTotal`.
pub fn memory() -> Result<u64, ResourceError> {
    let path = Path::new("/proc/meminfo");
    parse_meminfo(&read(path)?)
        .ok_or_else(|| ResourceError::File { path: path.display().to_string(), reason: "no MemTotal line".into() })
}

/// The interface carrying `ip` (for an unspecified address, the first non-loopback interface
/// that has an address of that family, by name) and the address itself.
///
/// # Errors
/// No interface carries it.
pub fn interface_of(ip: IpAddr) -> Result<(String, IpAddr), ResourceError> {
    let addrs = nix::ifaddrs::getifaddrs()
        .map_err(|e| ResourceError::File { path: "getifaddrs".into(), reason: e.to_string() })?;
    let mut found: Vec<(String, IpAddr)> = addrs
        .filter_map(|a| {
            let s = a.address?;
            let addr = match (s.as_sockaddr_in(), s.as_sockaddr_in6()) {
                (Some(v4), _) => IpAddr::V4(v4.ip()),
                (_, Some(v6)) => IpAddr::V6(v6.ip()),
                _ => return None,
            };
            Some((a.interface_name, addr))
        })
        .collect();
    found.sort();
    let hit = if ip.is_unspecified() {
        found.into_iter().find(|(_, a)| !a.is_loopback() && a.is_ipv4() == ip.is_ipv4())
    } else {
        found.into_iter().find(|(_, a)| *a == ip)
    };
    hit.ok_or(ResourceError::NoInterface(ip))
}

/// The MAC address of `interface`.
///
/// # Errors
/// Its `address` file cannot be read or does not hold a MAC address.
pub fn mac_of(interface: &str) -> Result<String, ResourceError> {
    let path = Path::new("/sys/class/net").join(interface).join("address");
    let text = read(&path)?;
    parse_mac(&text).ok_or_else(|| ResourceError::File {
        path: path.display().to_string(),
        reason: format!("{:?} is not a MAC address", text.trim()),
    })
}

impl Resources {
    /// Reads this host's resources for a node whose address is `ip`.
    ///
    /// # Errors
    /// `/proc/meminfo` is unreadable, no interface carries `ip`, or its MAC cannot be read.
    pub fn read(ip: IpAddr) -> Result<Resources, ResourceError> {
        let (interface, ip) = interface_of(ip)?;
        let mac = mac_of(&interface)?;
        Ok(Resources { cores: cores(), memory: memory()?, ip, interface, mac })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers_read_the_kernel_formats() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: X\n\nprocessor\t: 1\nvendor_id\t: GenuineIntel\n\nprocessor\t: 2\n";
        assert_eq!(parse_cpuinfo(cpuinfo), 3);
        assert_eq!(parse_cpuinfo(""), 0);
        let meminfo = "MemTotal:       16318480 kB\nMemFree:         1228172 kB\n";
        assert_eq!(parse_meminfo(meminfo), Some(16_318_480 * 1024));
        assert_eq!(parse_meminfo("MemFree: 1 kB\n"), None);
        assert_eq!(parse_meminfo("MemTotal: lots kB\n"), None);
        assert_eq!(parse_mac("52:54:00:AB:cd:0f\n"), Some("52:54:00:ab:cd:0f".into()));
        assert_eq!(parse_mac("52:54:00:ab:cd"), None);
        assert_eq!(parse_mac("zz:54:00:ab:cd:0f"), None);
    }

    #[test]
    fn this_host_is_read_as_the_kernel_reports_it() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let listed = parse_cpuinfo(&cpuinfo);
        let c = cores();
        assert!(c >= 1 && (listed == 0 || c <= listed), "cores {c}, /proc/cpuinfo lists {listed}");
        let m = memory().unwrap();
        assert!(m >= 64 << 20, "{m}");

        let lo = Resources::read("127.0.0.1".parse().unwrap()).unwrap();
        assert_eq!((lo.interface.as_str(), lo.mac.as_str()), ("lo", "00:00:00:00:00:00"));

        // Every interface with an address: the interface found for that address is one that
        // carries it, and its MAC is what sysfs says.
        let mut checked = 0;
        for a in nix::ifaddrs::getifaddrs().unwrap() {
            let Some(v4) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()).map(|s| IpAddr::V4(s.ip())) else {
                continue;
            };
            let r = Resources::read(v4).unwrap();
            assert_eq!(r.ip, v4);
            let sys = std::fs::read_to_string(format!("/sys/class/net/{}/address", r.interface)).unwrap();
            assert_eq!(r.mac, sys.trim().to_ascii_lowercase());
            checked += 1;
        }
        assert!(checked >= 1);
        assert!(matches!(interface_of("192.0.2.77".parse().unwrap()), Err(ResourceError::NoInterface(_))));
    }
}
