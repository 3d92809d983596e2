//! The cluster's link-state database and routing table. Every node floods a small record of
//! itself (its links to other nodes, its services, its address) stamped with
//! `(incarnation, seq)`; newer records replace older ones. From the records each node computes
//! which nodes are reachable (through links both ends still report) and the next hop on a
//! shortest path to each. No I/O and no clock.
//!
//! Invariants: a node is live iff it is reachable from this node over links that both endpoints
//! report; a route's next hop is always a direct neighbour; records never go back in time.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

/// Highest sequence this node follows when a peer holds a newer copy of its own record. No node
/// changes its record 2^48 times in one incarnation: a copy claiming more was not written by it,
/// and following it would take the sequence to overflow (and back to zero, where every peer
/// would ignore this node's records).
const MAX_SEQ: u64 = 1 << 48;

/// What one node says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Address other nodes dial to reach its cluster listener (may be empty).
    pub addr: String,
    /// Changes every time the node starts; orders records across restarts.
    pub incarnation: i64,
    /// Increases with every change within one incarnation.
    pub seq: u64,
    /// Nodes it has a live direct link with.
    pub links: BTreeSet<String>,
    /// Services registered on it.
    pub services: BTreeSet<String>,
    /// Its apps' Cocaine endpoints (`host`, `port`), for locators anywhere in the cluster.
    #[serde(default)]
    pub apps: BTreeMap<String, (String, u16)>,
}

impl NodeRecord {
    fn newer_than(&self, other: &NodeRecord) -> bool {
        (self.incarnation, self.seq) > (other.incarnation, other.seq)
    }
}

/// Cluster health as `CLUSTER_STATUS` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    /// Live nodes, this one included.
    pub live: usize,
    /// Known nodes, this one included.
    pub known: usize,
}

impl Health {
    /// Quorum: live ≥ ⌊known/2⌋ + 1.
    pub fn up(&self) -> bool {
        self.live > self.known / 2
    }

    /// Every known node is live.
    pub fn complete(&self) -> bool {
        self.live >= self.known
    }
}

/// Link-state database plus derived routes.
#[derive(Debug)]
pub struct Topology {
    me: String,
    records: BTreeMap<String, NodeRecord>,
    /// Every node ever learned (name → address), minus forgotten ones: the quorum's denominator.
    known: BTreeMap<String, String>,
    next_hop: HashMap<String, String>,
    distance: HashMap<String, usize>,
}

impl Topology {
    /// A topology for node `me` reachable at `addr`, started at `incarnation`.
    pub fn new(me: &str, addr: &str, incarnation: i64) -> Self {
        let mut records = BTreeMap::new();
        let record = NodeRecord {
            addr: addr.into(),
            incarnation,
            seq: 0,
            links: BTreeSet::new(),
            services: BTreeSet::new(),
            apps: BTreeMap::new(),
        };
        records.insert(me.to_string(), record);
        let mut t = Topology {
            me: me.to_string(),
            records,
            known: BTreeMap::from([(me.to_string(), addr.to_string())]),
            next_hop: HashMap::new(),
            distance: HashMap::new(),
        };
        t.recompute();
        t
    }

    /// This node's name.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// Adds nodes remembered from an earlier run (they count towards the quorum).
    pub fn remember(&mut self, nodes: impl IntoIterator<Item = (String, String)>) {
        for (name, addr) in nodes {
            if name != self.me {
                self.known.entry(name).or_insert(addr);
            }
        }
    }

    /// Known nodes (name → address), this one included.
    pub fn known(&self) -> &BTreeMap<String, String> {
        &self.known
    }

    /// This node's own record.
    pub fn local(&self) -> &NodeRecord {
        &self.records[&self.me]
    }

    /// Every record, for gossip.
    pub fn records(&self) -> &BTreeMap<String, NodeRecord> {
        &self.records
    }

    /// Replaces this node's links and services; returns whether anything changed.
    pub fn set_local(&mut self, links: BTreeSet<String>, services: BTreeSet<String>) -> bool {
        let me = self.me.clone();
        let rec = self.records.get_mut(&me).expect("own record always present");
        if rec.links == links && rec.services == services {
            return false;
        }
        rec.links = links;
        rec.services = services;
        rec.seq += 1;
        self.recompute();
        true
    }

    /// Sets this node's app endpoints; returns whether they changed (then the record is newer).
    pub fn set_local_apps(&mut self, apps: BTreeMap<String, (String, u16)>) -> bool {
        let me = self.me.clone();
        let rec = self.records.get_mut(&me).expect("own record always present");
        if rec.apps == apps {
            return false;
        }
        rec.apps = apps;
        rec.seq += 1;
        true
    }

    /// The endpoints of `app` on live remote nodes, nearest first.
    pub fn app_elsewhere(&self, app: &str) -> Vec<(String, u16)> {
        self.live_remotes().iter().filter_map(|n| self.records.get(n)?.apps.get(app).cloned()).collect()
    }

    /// Merges records heard from a peer; returns whether anything changed. Records about this node
    /// are ignored except to move its own sequence past a stale copy from a previous run (one
    /// below a plausible bound: a peer cannot push it to overflow).
    pub fn merge(&mut self, incoming: BTreeMap<String, NodeRecord>) -> bool {
        let mut changed = false;
        for (name, rec) in incoming {
            if !nodus_wire::valid_name(&name) || name.is_empty() {
                continue;
            }
            if name == self.me {
                let own = self.records.get_mut(&self.me).expect("own record");
                if rec.incarnation == own.incarnation && rec.seq > own.seq && rec.seq < MAX_SEQ {
                    own.seq = rec.seq + 1;
                    changed = true;
                }
                continue;
            }
            let newer = self.records.get(&name).is_none_or(|cur| rec.newer_than(cur));
            if newer {
                let mut rec = rec;
                // Endpoints are handed to clients as they are: keep only plausible ones.
                rec.apps.retain(|app, (host, port)| {
                    nodus_wire::valid_name(app)
                        && !app.is_empty()
                        && !host.is_empty()
                        && host.len() <= 253
                        && *port != 0
                });
                if !rec.addr.is_empty() || !self.known.contains_key(&name) {
                    self.known.insert(name.clone(), rec.addr.clone());
                }
                self.records.insert(name, rec);
                changed = true;
            }
        }
        if changed {
            self.recompute();
        }
        changed
    }

    /// Removes a node from the cluster's memory (`FORGET`). Returns whether it was known.
    pub fn forget(&mut self, name: &str) -> bool {
        if name == self.me {
            return false;
        }
        let known = self.known.remove(name).is_some();
        let rec = self.records.remove(name).is_some();
        self.recompute();
        known || rec
    }

    fn linked(&self, a: &str, b: &str) -> bool {
        let has = |x: &str, y: &str| self.records.get(x).is_some_and(|r| r.links.contains(y));
        has(a, b) && has(b, a)
    }

    fn recompute(&mut self) {
        self.next_hop.clear();
        self.distance.clear();
        self.distance.insert(self.me.clone(), 0);
        let mut queue = VecDeque::from([self.me.clone()]);
        while let Some(node) = queue.pop_front() {
            let d = self.distance[&node];
            let Some(rec) = self.records.get(&node) else { continue };
            for peer in &rec.links {
                if self.distance.contains_key(peer) || !self.linked(&node, peer) {
                    continue;
                }
                let hop = if node == self.me { peer.clone() } else { self.next_hop[&node].clone() };
                self.distance.insert(peer.clone(), d + 1);
                self.next_hop.insert(peer.clone(), hop);
                queue.push_back(peer.clone());
            }
        }
    }

    /// The direct neighbour to send to for `dest`, if reachable.
    pub fn next_hop(&self, dest: &str) -> Option<&str> {
        self.next_hop.get(dest).map(String::as_str)
    }

    /// True when `node` is this node or reachable from it.
    pub fn is_live(&self, node: &str) -> bool {
        self.distance.contains_key(node)
    }

    /// Live nodes other than this one, nearest first.
    pub fn live_remotes(&self) -> Vec<String> {
        let mut v: Vec<(&usize, &String)> =
            self.distance.iter().filter(|(n, _)| **n != self.me).map(|(n, d)| (d, n)).collect();
        v.sort();
        v.into_iter().map(|(_, n)| n.clone()).collect()
    }

    /// The nearest live remote node that has `service` registered.
    pub fn nearest_with(&self, service: &str) -> Option<&str> {
        self.distance
            .iter()
            .filter(|(n, _)| **n != self.me && self.records.get(*n).is_some_and(|r| r.services.contains(service)))
            .min_by(|a, b| a.1.cmp(b.1).then(a.0.cmp(b.0)))
            .map(|(n, _)| n.as_str())
    }

    /// Live and known counts.
    pub fn health(&self) -> Health {
        let live = self.known.keys().filter(|n| self.is_live(n)).count();
        Health { live, known: self.known.len() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(inc: i64, seq: u64, links: &[&str]) -> NodeRecord {
        NodeRecord {
            addr: String::new(),
            incarnation: inc,
            seq,
            links: links.iter().map(|s| s.to_string()).collect(),
            services: BTreeSet::new(),
            apps: BTreeMap::new(),
        }
    }

    fn set(links: &[&str]) -> BTreeSet<String> {
        links.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn app_endpoints_are_found_on_live_remotes_nearest_first() {
        // a - b - c, seen from a; b and c both run "echo", a runs it too (not listed: it is local).
        let mut t = Topology::new("a", "", 1);
        t.set_local(set(&["b"]), BTreeSet::new());
        assert!(t.set_local_apps(BTreeMap::from([("echo".to_string(), ("10.0.0.1".to_string(), 4001))])));
        assert!(!t.set_local_apps(BTreeMap::from([("echo".to_string(), ("10.0.0.1".to_string(), 4001))])));
        let with_echo = |inc, links: &[&str], host: &str| {
            let mut r = rec(inc, 1, links);
            r.apps.insert("echo".into(), (host.into(), 4000));
            r
        };
        t.merge(BTreeMap::from([
            ("c".to_string(), with_echo(1, &["b"], "10.0.0.3")),
            ("b".to_string(), with_echo(1, &["a", "c"], "10.0.0.2")),
        ]));
        assert_eq!(t.app_elsewhere("echo"), [("10.0.0.2".to_string(), 4000), ("10.0.0.3".to_string(), 4000)]);
        assert!(t.app_elsewhere("other").is_empty());
        // c unreachable (b no longer links to it): only b is offered.
        let mut b = with_echo(1, &["a"], "10.0.0.2");
        b.seq = 2;
        t.merge(BTreeMap::from([("b".to_string(), b)]));
        assert_eq!(t.app_elsewhere("echo"), [("10.0.0.2".to_string(), 4000)]);
        // Implausible endpoints from a peer are dropped.
        let mut d = with_echo(1, &["a"], "10.0.0.4");
        d.apps.insert("bad name".into(), ("h".into(), 1));
        d.apps.insert("zero".into(), ("h".into(), 0));
        d.apps.insert("nohost".into(), (String::new(), 1));
        t.merge(BTreeMap::from([("d".to_string(), d)]));
        assert_eq!(t.records()["d"].apps.keys().collect::<Vec<_>>(), ["echo"]);
        // Records from a node that knows nothing of app endpoints decode with none.
        let old = rmp_serde::to_vec(&("", 1i64, 1u64, BTreeSet::<String>::new(), BTreeSet::<String>::new())).unwrap();
        let r: NodeRecord = rmp_serde::from_slice(&old).unwrap();
        assert!(r.apps.is_empty());
    }

    #[test]
    fn routes_over_a_line_of_nodes() {
        // a - b - c - d, seen from a.
        let mut t = Topology::new("a", "", 1);
        t.set_local(set(&["b"]), BTreeSet::new());
        t.merge(BTreeMap::from([
            ("b".to_string(), rec(1, 1, &["a", "c"])),
            ("c".to_string(), rec(1, 1, &["b", "d"])),
            ("d".to_string(), rec(1, 1, &["c"])),
        ]));
        assert_eq!(t.next_hop("d"), Some("b"));
        assert_eq!(t.next_hop("b"), Some("b"));
        assert_eq!(t.live_remotes(), ["b", "c", "d"]);
        assert_eq!(t.health(), Health { live: 4, known: 4 });
        // c loses its link to d: d is unreachable, though d still claims the link.
        t.merge(BTreeMap::from([("c".to_string(), rec(1, 2, &["b"]))]));
        assert!(!t.is_live("d"));
        assert_eq!(t.health(), Health { live: 3, known: 4 });
        assert!(t.health().up() && !t.health().complete());
    }

    #[test]
    fn stale_records_are_ignored_and_restarts_win() {
        let mut t = Topology::new("a", "", 1);
        t.set_local(set(&["b"]), BTreeSet::new());
        assert!(t.merge(BTreeMap::from([("b".to_string(), rec(5, 3, &["a"]))])));
        assert!(!t.merge(BTreeMap::from([("b".to_string(), rec(5, 2, &[]))])), "older seq");
        assert!(t.is_live("b"));
        assert!(t.merge(BTreeMap::from([("b".to_string(), rec(6, 0, &[]))])), "new incarnation");
        assert!(!t.is_live("b"));
    }

    #[test]
    fn a_forged_own_record_cannot_push_the_sequence_to_overflow() {
        // Found by the gossip fuzz target: this node's name, its incarnation and seq u64::MAX.
        let mut t = Topology::new("a", "", 1);
        assert!(!t.merge(BTreeMap::from([("a".to_string(), rec(1, u64::MAX, &[]))])));
        assert!(t.set_local(set(&["b"]), BTreeSet::new()));
        assert_eq!(t.local().seq, 1);
        // A plausible copy from an earlier run with the same incarnation still moves it past.
        assert!(t.merge(BTreeMap::from([("a".to_string(), rec(1, 7, &[]))])));
        assert_eq!(t.local().seq, 8);
    }

    #[test]
    fn quorum_follows_the_majority_rule() {
        for (live, known, up) in [(1, 1, true), (1, 2, false), (2, 3, true), (1, 3, false), (3, 5, true), (2, 5, false)]
        {
            assert_eq!(Health { live, known }.up(), up, "{live}/{known}");
        }
    }

    #[test]
    fn nearest_service_and_forget() {
        let mut t = Topology::new("a", "", 1);
        t.set_local(set(&["b"]), BTreeSet::new());
        let mut b = rec(1, 1, &["a", "c"]);
        b.services.insert("x".into());
        let mut c = rec(1, 1, &["b"]);
        c.services.insert("x".into());
        t.merge(BTreeMap::from([("b".to_string(), b), ("c".to_string(), c)]));
        assert_eq!(t.nearest_with("x"), Some("b"));
        assert!(t.forget("c"));
        assert_eq!(t.health().known, 2);
    }
}
