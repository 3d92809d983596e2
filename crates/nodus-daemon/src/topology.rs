//! The cluster's link-state database and routing table. Every node floods a small record of
//! itself (its links to other nodes, its services, its address) stamped with
//! `(incarnation, seq)`; newer records replace older ones. From the records each node computes
//! which nodes are reachable (through links both ends still report) and the next hop on a
//! shortest path to each. No I/O and no clock.
//!
//! Invariants: a node is live iff it is reachable from this node over links that both endpoints
//! report; a route's next hop is always a direct neighbour; records never go back in time; every
//! record merged carries a valid HMAC from its origin (keyed from the cluster secret), is
//! plausible in size and time, and the number of nodes known is bounded.

use ring::hmac;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

/// Longest advertised address accepted in a record.
pub const MAX_ADDR_LEN: usize = 300;
/// Most services one record may list.
pub const MAX_RECORD_SERVICES: usize = 4096;
/// Most app endpoints one record may list.
pub const MAX_RECORD_APPS: usize = 1024;
/// How far ahead of this node's clock an incarnation (a node's start time, Unix ms) may be.
pub const MAX_FUTURE_MS: i64 = 10 * 60 * 1000;
/// Largest sequence number accepted (a node changes its record far fewer times than this).
pub const MAX_SEQ: u64 = 1 << 48;

/// Longest MAC a record may carry (HMAC-SHA256 is 32 bytes).
pub const MAX_MAC_LEN: usize = 64;

/// Reads a record's MAC (an array of bytes, or a binary) without trusting the length the
/// sender declares: a 90-byte record that claims a four-billion-byte MAC is refused at the
/// 65th element, not preallocated.
fn bounded_mac<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    struct Mac;
    impl<'de> serde::de::Visitor<'de> for Mac {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "at most {MAX_MAC_LEN} bytes")
        }
        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            if v.len() > MAX_MAC_LEN {
                return Err(E::invalid_length(v.len(), &self));
            }
            Ok(v.to_vec())
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut mac = Vec::with_capacity(32);
            while let Some(b) = seq.next_element::<u8>()? {
                if mac.len() == MAX_MAC_LEN {
                    return Err(serde::de::Error::invalid_length(MAX_MAC_LEN + 1, &self));
                }
                mac.push(b);
            }
            Ok(mac)
        }
    }
    d.deserialize_any(Mac)
}

/// A node remembered across restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownNode {
    /// Its server name.
    pub name: String,
    /// The address it is dialed at (may be empty).
    pub addr: String,
    /// This node had a direct link with it: dial it again after a restart.
    pub neighbor: bool,
}

/// The key that authenticates link-state records: HMAC-SHA256 keyed from the cluster secret.
/// Only nodes that hold the secret can produce a record other nodes accept.
#[derive(Clone)]
pub struct RecordKey(hmac::Key);

impl std::fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordKey(..)")
    }
}

impl RecordKey {
    /// The key for a cluster whose secret is `secret` (derived, so the secret itself is never
    /// the MAC key of anything else).
    pub fn from_secret(secret: &str) -> Self {
        let derive = hmac::Key::new(hmac::HMAC_SHA256, b"nodus link-state records v1");
        let tag = hmac::sign(&derive, secret.as_bytes());
        RecordKey(hmac::Key::new(hmac::HMAC_SHA256, tag.as_ref()))
    }

    fn input(name: &str, r: &NodeRecord) -> Vec<u8> {
        rmp_serde::to_vec(&(name, &r.addr, r.incarnation, r.seq, &r.links, &r.services, &r.apps)).unwrap_or_default()
    }

    /// Stamps `record` as `name`'s.
    pub fn sign(&self, name: &str, record: &mut NodeRecord) {
        record.mac = hmac::sign(&self.0, &Self::input(name, record)).as_ref().to_vec();
    }

    /// True when `record`'s MAC is right for `name` (checked in constant time).
    pub fn verify(&self, name: &str, record: &NodeRecord) -> bool {
        hmac::verify(&self.0, &Self::input(name, record), &record.mac).is_ok()
    }
}

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
    /// HMAC-SHA256 over the node's name and every field above ([`RecordKey`]).
    #[serde(default, deserialize_with = "bounded_mac")]
    pub mac: Vec<u8>,
}

impl NodeRecord {
    fn newer_than(&self, other: &NodeRecord) -> bool {
        (self.incarnation, self.seq) > (other.incarnation, other.seq)
    }

    /// Why a record heard from a peer cannot be true, if it cannot.
    fn implausible(&self, now: i64, max_nodes: usize) -> Option<&'static str> {
        let names_ok = |set: &BTreeSet<String>| set.iter().all(|n| !n.is_empty() && nodus_wire::valid_name(n));
        if self.addr.len() > MAX_ADDR_LEN {
            Some("address too long")
        } else if self.incarnation <= 0 || self.incarnation > now.saturating_add(MAX_FUTURE_MS) {
            Some("incarnation in the future")
        } else if self.seq > MAX_SEQ {
            Some("sequence number too large")
        } else if self.links.len() > max_nodes || !names_ok(&self.links) {
            Some("bad links")
        } else if self.services.len() > MAX_RECORD_SERVICES || !names_ok(&self.services) {
            Some("bad services")
        } else if self.apps.len() > MAX_RECORD_APPS {
            Some("too many apps")
        } else {
            None
        }
    }
}

/// What merging a batch of records did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Merged {
    /// Something changed: routes were recomputed.
    pub changed: bool,
    /// Records refused: bad MAC, implausible, or past the bound on known nodes.
    pub rejected: usize,
    /// The nodes whose record was replaced by a newer one (this node's own when it refuted a
    /// claim): what to pass on to the other links, and nothing else.
    pub updated: Vec<String>,
    /// The set of known nodes or an address changed (what the known-nodes file holds).
    pub known_changed: bool,
    /// The nodes whose record came in at the version already held: the sender has it, so it
    /// need not be passed back to it.
    pub held: Vec<String>,
}

/// What merged records did to the links both ends report.
#[derive(Debug, Default)]
struct RouteChange {
    /// A link went away: routes are searched again from scratch.
    removed: bool,
    /// New links (both ends report them), as node ids.
    added: Vec<(u32, u32)>,
}

/// Distance and next hop of a node no route reaches.
const UNREACHABLE: u32 = u32::MAX;

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

/// This node's links, services and apps as they are now. Its record (what the other nodes hold)
/// catches up at [`Topology::publish_local`], which the router rate-limits; routes use these
/// links at once.
#[derive(Debug, Default)]
struct Own {
    links: BTreeSet<String>,
    services: BTreeSet<String>,
    apps: BTreeMap<String, (String, u16)>,
}

/// Link-state database plus derived routes.
#[derive(Debug)]
pub struct Topology {
    me: String,
    records: BTreeMap<String, NodeRecord>,
    own: Own,
    /// Every node ever learned (name → address), minus forgotten ones: the quorum's denominator.
    known: BTreeMap<String, String>,
    /// Dense ids of this node (0) and of every node with a record: route searches compare
    /// integers, not names.
    ids: HashMap<String, u32>,
    /// Node id → name.
    names: Vec<String>,
    /// Node id → the ids of the nodes its links name that have a record (this node's: its links
    /// as they are now).
    adj: Vec<Vec<u32>>,
    /// Node id → hops from this node ([`UNREACHABLE`] when no route reaches it).
    distance: Vec<u32>,
    /// Node id → the id of the direct neighbour on a shortest path to it.
    next_hop: Vec<u32>,
    /// Nodes a route reaches, this one included.
    live: usize,
    key: RecordKey,
    max_nodes: usize,
}

impl Topology {
    /// A topology for node `me` reachable at `addr`, started at `incarnation`, whose records are
    /// authenticated with `key`, knowing at most `max_nodes` nodes (itself included).
    pub fn new(me: &str, addr: &str, incarnation: i64, key: RecordKey, max_nodes: usize) -> Self {
        let mut records = BTreeMap::new();
        let mut record = NodeRecord {
            addr: addr.into(),
            incarnation,
            seq: 0,
            links: BTreeSet::new(),
            services: BTreeSet::new(),
            apps: BTreeMap::new(),
            mac: Vec::new(),
        };
        key.sign(me, &mut record);
        records.insert(me.to_string(), record);
        let mut t = Topology {
            me: me.to_string(),
            records,
            known: BTreeMap::from([(me.to_string(), addr.to_string())]),
            own: Own::default(),
            ids: HashMap::from([(me.to_string(), 0)]),
            names: vec![me.to_string()],
            adj: vec![Vec::new()],
            distance: vec![0],
            next_hop: vec![UNREACHABLE],
            live: 1,
            key,
            max_nodes: max_nodes.max(1),
        };
        t.recompute();
        t
    }

    /// This node's name.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// Adds nodes remembered from an earlier run (they count towards the quorum), up to the
    /// bound on known nodes.
    pub fn remember(&mut self, nodes: impl IntoIterator<Item = (String, String)>) {
        for (name, addr) in nodes {
            if name == self.me || name.is_empty() || !nodus_wire::valid_name(&name) || addr.len() > MAX_ADDR_LEN {
                continue;
            }
            if self.known.contains_key(&name) || self.known.len() < self.max_nodes {
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

    /// Replaces this node's links and services and publishes them at once (a new version of
    /// its record); returns whether anything changed.
    pub fn set_local(&mut self, links: BTreeSet<String>, services: BTreeSet<String>) -> bool {
        self.stage_local(links, services);
        self.publish_local()
    }

    /// Sets this node's app endpoints and publishes them; returns whether they changed (then
    /// the record is newer).
    pub fn set_local_apps(&mut self, apps: BTreeMap<String, (String, u16)>) -> bool {
        self.stage_local_apps(apps);
        self.publish_local()
    }

    /// Replaces this node's links and services as they are now: routes follow at once, its
    /// record only at the next [`Topology::publish_local`]. Returns whether the record is now
    /// behind (something to publish).
    pub fn stage_local(&mut self, links: BTreeSet<String>, services: BTreeSet<String>) -> bool {
        self.own.services = services;
        if self.own.links != links {
            let old = std::mem::replace(&mut self.own.links, links);
            self.refresh_adj(0);
            let mut change = RouteChange::default();
            self.links_changed(0, &old, &mut change);
            self.apply(change);
        }
        self.unpublished()
    }

    /// Sets this node's app endpoints as they are now (published with the rest). Returns
    /// whether the record is now behind.
    pub fn stage_local_apps(&mut self, apps: BTreeMap<String, (String, u16)>) -> bool {
        self.own.apps = apps;
        self.unpublished()
    }

    /// True when this node's record says something other than what is true now.
    pub fn unpublished(&self) -> bool {
        let rec = self.local();
        rec.links != self.own.links || rec.services != self.own.services || rec.apps != self.own.apps
    }

    /// Makes this node's record say what is true now, as a new version (signed); returns
    /// whether there was anything new to say.
    pub fn publish_local(&mut self) -> bool {
        if !self.unpublished() {
            return false;
        }
        let rec = self.records.get_mut(&self.me).expect("own record always present");
        rec.links.clone_from(&self.own.links);
        rec.services.clone_from(&self.own.services);
        rec.apps.clone_from(&self.own.apps);
        rec.seq += 1;
        self.key.sign(&self.me, rec);
        true
    }

    /// The endpoints of `app` on live remote nodes, nearest first.
    pub fn app_elsewhere(&self, app: &str) -> Vec<(String, u16)> {
        self.live_remotes().iter().filter_map(|n| self.records.get(n)?.apps.get(app).cloned()).collect()
    }

    /// Merges records heard from a peer at `now`. Records whose MAC is wrong, that are
    /// implausible, or that would take the number of known nodes past the bound are refused.
    /// A valid record about this node that is newer than its own (a copy from a previous run, or
    /// a node claiming to be this one) is refuted: this node's record moves past it.
    pub fn merge(&mut self, incoming: BTreeMap<String, NodeRecord>, now: i64) -> Merged {
        let mut change = RouteChange::default();
        let mut m = Merged::default();
        for (name, mut rec) in incoming {
            if name.is_empty() || !nodus_wire::valid_name(&name) || name.contains(['*', '?']) {
                m.rejected += 1;
                continue;
            }
            // A version already held (the common case: flooding brings each record over every
            // link) is dropped before any cryptography.
            if let Some(cur) = self.records.get(&name) {
                if !rec.newer_than(cur) {
                    if (rec.incarnation, rec.seq) == (cur.incarnation, cur.seq) {
                        m.held.push(name);
                    }
                    continue;
                }
            }
            if rec.implausible(now, self.max_nodes).is_some() || !self.key.verify(&name, &rec) {
                m.rejected += 1;
                continue;
            }
            if name == self.me {
                let own = self.records.get_mut(&self.me).expect("own record");
                own.incarnation = rec.incarnation;
                own.seq = rec.seq + 1;
                // The refutation says what is true now.
                own.links.clone_from(&self.own.links);
                own.services.clone_from(&self.own.services);
                own.apps.clone_from(&self.own.apps);
                self.key.sign(&self.me, own);
                m.changed = true;
                m.updated.push(name);
                continue;
            }
            let current = self.records.get(&name);
            if current.is_none() && !self.known.contains_key(&name) && self.known.len() >= self.max_nodes {
                m.rejected += 1;
                continue;
            }
            // Endpoints are handed to clients as they are: keep only plausible ones.
            rec.apps.retain(|app, (host, port)| {
                nodus_wire::valid_name(app) && !app.is_empty() && !host.is_empty() && host.len() <= 253 && *port != 0
            });
            if (!rec.addr.is_empty() || !self.known.contains_key(&name)) && self.known.get(&name) != Some(&rec.addr) {
                self.known.insert(name.clone(), rec.addr.clone());
                m.known_changed = true;
            }
            let id = self.intern(&name);
            let old = self.records.insert(name.clone(), rec).map(|r| r.links).unwrap_or_default();
            self.refresh_adj(id);
            self.links_changed(id, &old, &mut change);
            m.changed = true;
            m.updated.push(name);
        }
        self.apply(change);
        m
    }

    /// The id of `name`, which has (or is getting) a record; a new one for a new node.
    fn intern(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = self.names.len() as u32;
        self.ids.insert(name.to_string(), id);
        self.names.push(name.to_string());
        self.adj.push(Vec::new());
        self.distance.push(UNREACHABLE);
        self.next_hop.push(UNREACHABLE);
        id
    }

    /// Rebuilds `u`'s adjacency from its links; a node it names that names it back and does
    /// not have it yet learns of it too (that node's record may have come when `u` had no id).
    fn refresh_adj(&mut self, u: u32) {
        let name = &self.names[u as usize];
        let adj: Vec<u32> =
            self.links_of(name).into_iter().flatten().filter_map(|p| self.ids.get(p).copied()).collect();
        for &v in &adj {
            if !self.adj[v as usize].contains(&u)
                && self.links_of(&self.names[v as usize]).is_some_and(|l| l.contains(name))
            {
                self.adj[v as usize].push(u);
            }
        }
        self.adj[u as usize] = adj;
    }

    /// Notes which links (reported by both ends) node `u`'s new links added or removed,
    /// compared with its `old` links.
    fn links_changed(&self, u: u32, old: &BTreeSet<String>, change: &mut RouteChange) {
        let name = self.names[u as usize].as_str();
        let Some(new) = self.links_of(name) else { return };
        let reports = |peer: &str| self.links_of(peer).is_some_and(|l| l.contains(name));
        if old.difference(new).any(|p| reports(p)) {
            change.removed = true;
        }
        for p in new.difference(old) {
            if reports(p) {
                if let Some(&v) = self.ids.get(p) {
                    change.added.push((u, v));
                }
            }
        }
    }

    /// Brings the routes up to date: a full search after a link went away, otherwise only the
    /// nodes that new links bring nearer (links only added never make a route longer).
    fn apply(&mut self, change: RouteChange) {
        if change.removed {
            return self.recompute();
        }
        let mut queue = VecDeque::new();
        for (a, b) in change.added {
            self.relax(a, b, &mut queue);
            self.relax(b, a, &mut queue);
        }
        while let Some(u) = queue.pop_front() {
            for i in 0..self.adj[u as usize].len() {
                let v = self.adj[u as usize][i];
                if self.adj[v as usize].contains(&u) {
                    self.relax(u, v, &mut queue);
                }
            }
        }
    }

    /// `v` through `u` when that is shorter than what `v` has; `v` is queued to pass it on.
    fn relax(&mut self, u: u32, v: u32, queue: &mut VecDeque<u32>) {
        let du = self.distance[u as usize];
        if du == UNREACHABLE || self.distance[v as usize] <= du + 1 {
            return;
        }
        if self.distance[v as usize] == UNREACHABLE {
            self.live += 1;
        }
        self.distance[v as usize] = du + 1;
        self.next_hop[v as usize] = if u == 0 { v } else { self.next_hop[u as usize] };
        queue.push_back(v);
    }

    /// The records of `names` that this node holds, for passing on what changed (borrowed:
    /// they encode as the owned map does).
    pub fn records_of<'a>(&'a self, names: impl IntoIterator<Item = &'a String>) -> BTreeMap<&'a str, &'a NodeRecord> {
        names.into_iter().filter_map(|n| Some((n.as_str(), self.records.get(n)?))).collect()
    }

    /// A digest of the version of every record held (FNV-1a over name, incarnation and
    /// sequence, in name order): two nodes with equal digests hold the same records. Stable
    /// across builds, unlike `std`'s hasher.
    pub fn digest(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for b in bytes {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        for (name, r) in &self.records {
            eat(name.as_bytes());
            eat(&[0]);
            eat(&r.incarnation.to_be_bytes());
            eat(&r.seq.to_be_bytes());
        }
        h
    }

    /// Removes a node from the cluster's memory (`FORGET`). Returns whether it was known.
    pub fn forget(&mut self, name: &str) -> bool {
        if name == self.me {
            return false;
        }
        let known = self.known.remove(name).is_some();
        let rec = self.records.remove(name).is_some();
        self.reindex();
        known || rec
    }

    /// Numbers the nodes with a record again from scratch (after one was forgotten).
    fn reindex(&mut self) {
        self.ids = HashMap::from([(self.me.clone(), 0)]);
        self.names = vec![self.me.clone()];
        let others: Vec<String> = self.records.keys().filter(|n| **n != self.me).cloned().collect();
        for (i, n) in others.into_iter().enumerate() {
            self.ids.insert(n.clone(), i as u32 + 1);
            self.names.push(n);
        }
        let n = self.names.len();
        self.adj = (0..n)
            .map(|u| {
                let links = self.links_of(&self.names[u]);
                links.into_iter().flatten().filter_map(|p| self.ids.get(p).copied()).collect()
            })
            .collect();
        self.recompute();
    }

    /// The links `node` has: this node's as they are now, the others' as their records say.
    fn links_of(&self, node: &str) -> Option<&BTreeSet<String>> {
        if node == self.me {
            Some(&self.own.links)
        } else {
            self.records.get(node).map(|r| &r.links)
        }
    }

    fn recompute(&mut self) {
        let n = self.names.len();
        self.distance = vec![UNREACHABLE; n];
        self.next_hop = vec![UNREACHABLE; n];
        self.distance[0] = 0;
        self.live = 1;
        let mut queue = VecDeque::from([0u32]);
        while let Some(u) = queue.pop_front() {
            let du = self.distance[u as usize];
            for &v in &self.adj[u as usize] {
                if self.distance[v as usize] != UNREACHABLE || !self.adj[v as usize].contains(&u) {
                    continue;
                }
                self.distance[v as usize] = du + 1;
                self.next_hop[v as usize] = if u == 0 { v } else { self.next_hop[u as usize] };
                self.live += 1;
                queue.push_back(v);
            }
        }
    }

    /// The id of a node a route reaches (this one included).
    fn reached(&self, node: &str) -> Option<u32> {
        self.ids.get(node).copied().filter(|&i| self.distance[i as usize] != UNREACHABLE)
    }

    /// The direct neighbour to send to for `dest`, if reachable.
    pub fn next_hop(&self, dest: &str) -> Option<&str> {
        let hop = self.next_hop[self.reached(dest)? as usize];
        (hop != UNREACHABLE).then(|| self.names[hop as usize].as_str())
    }

    /// True when `node` is this node or reachable from it.
    pub fn is_live(&self, node: &str) -> bool {
        self.reached(node).is_some()
    }

    /// Live nodes other than this one, nearest first.
    pub fn live_remotes(&self) -> Vec<String> {
        let mut v: Vec<(u32, &String)> = (1..self.names.len())
            .filter(|&i| self.distance[i] != UNREACHABLE)
            .map(|i| (self.distance[i], &self.names[i]))
            .collect();
        v.sort();
        v.into_iter().map(|(_, n)| n.clone()).collect()
    }

    /// The nearest live remote node that has `service` registered.
    pub fn nearest_with(&self, service: &str) -> Option<&str> {
        (1..self.names.len())
            .filter(|&i| self.distance[i] != UNREACHABLE)
            .filter(|&i| self.records.get(&self.names[i]).is_some_and(|r| r.services.contains(service)))
            .min_by(|&a, &b| self.distance[a].cmp(&self.distance[b]).then(self.names[a].cmp(&self.names[b])))
            .map(|i| self.names[i].as_str())
    }

    /// Live and known counts.
    pub fn health(&self) -> Health {
        // Every node with a record is known (merging a record learns its node), so the
        // reachable ones are the live known ones.
        Health { live: self.live, known: self.known.len() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> RecordKey {
        RecordKey::from_secret("s")
    }

    fn topo(me: &str) -> Topology {
        Topology::new(me, "", 1, key(), 1024)
    }

    fn rec(inc: i64, seq: u64, links: &[&str]) -> NodeRecord {
        NodeRecord {
            addr: String::new(),
            incarnation: inc,
            seq,
            links: links.iter().map(|s| s.to_string()).collect(),
            services: BTreeSet::new(),
            apps: BTreeMap::new(),
            mac: Vec::new(),
        }
    }

    /// A record declaring a MAC of four billion bytes is refused, not preallocated; a signed
    /// record still round-trips (found by the gossip fuzz target: 94 bytes held 1 MiB).
    #[test]
    fn a_record_cannot_declare_a_huge_mac() {
        let mut huge = vec![0x81, 0xa1, b'a', 0x81, 0xa3, b'm', b'a', b'c', 0xdd, 0xff, 0xff, 0xff, 0xff];
        huge.extend([0u8; 80]);
        assert!(rmp_serde::from_slice::<BTreeMap<String, NodeRecord>>(&huge).is_err());
        let mut long = rec(5, 1, &[]);
        long.mac = vec![1; MAX_MAC_LEN];
        assert_eq!(rmp_serde::from_slice::<NodeRecord>(&rmp_serde::to_vec(&long).unwrap()).unwrap(), long);
        long.mac.push(1);
        assert!(rmp_serde::from_slice::<NodeRecord>(&rmp_serde::to_vec(&long).unwrap()).is_err());
        let records = signed([("b", rec(5, 1, &["a"]))]);
        let again: BTreeMap<String, NodeRecord> = rmp_serde::from_slice(&rmp_serde::to_vec(&records).unwrap()).unwrap();
        assert_eq!(again, records);
        assert!(key().verify("b", &again["b"]));
    }

    /// Signs every record as its node would.
    fn signed(records: impl IntoIterator<Item = (&'static str, NodeRecord)>) -> BTreeMap<String, NodeRecord> {
        records
            .into_iter()
            .map(|(n, mut r)| {
                key().sign(n, &mut r);
                (n.to_string(), r)
            })
            .collect()
    }

    const NOW: i64 = 1_000;

    fn set(links: &[&str]) -> BTreeSet<String> {
        links.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn app_endpoints_are_found_on_live_remotes_nearest_first() {
        // a - b - c, seen from a; b and c both run "echo", a runs it too (not listed: it is local).
        let mut t = topo("a");
        t.set_local(set(&["b"]), BTreeSet::new());
        assert!(t.set_local_apps(BTreeMap::from([("echo".to_string(), ("10.0.0.1".to_string(), 4001))])));
        assert!(!t.set_local_apps(BTreeMap::from([("echo".to_string(), ("10.0.0.1".to_string(), 4001))])));
        let with_echo = |inc, links: &[&str], host: &str| {
            let mut r = rec(inc, 1, links);
            r.apps.insert("echo".into(), (host.into(), 4000));
            r
        };
        t.merge(signed([("c", with_echo(1, &["b"], "10.0.0.3")), ("b", with_echo(1, &["a", "c"], "10.0.0.2"))]), NOW);
        assert_eq!(t.app_elsewhere("echo"), [("10.0.0.2".to_string(), 4000), ("10.0.0.3".to_string(), 4000)]);
        assert!(t.app_elsewhere("other").is_empty());
        // c unreachable (b no longer links to it): only b is offered.
        let mut b = with_echo(1, &["a"], "10.0.0.2");
        b.seq = 2;
        t.merge(signed([("b", b)]), NOW);
        assert_eq!(t.app_elsewhere("echo"), [("10.0.0.2".to_string(), 4000)]);
        // Implausible endpoints from a peer are dropped.
        let mut d = with_echo(1, &["a"], "10.0.0.4");
        d.apps.insert("bad name".into(), ("h".into(), 1));
        d.apps.insert("zero".into(), ("h".into(), 0));
        d.apps.insert("nohost".into(), (String::new(), 1));
        t.merge(signed([("d", d)]), NOW);
        assert_eq!(t.records()["d"].apps.keys().collect::<Vec<_>>(), ["echo"]);
        // Records from a node that knows nothing of app endpoints decode with none.
        let old = rmp_serde::to_vec(&("", 1i64, 1u64, BTreeSet::<String>::new(), BTreeSet::<String>::new())).unwrap();
        let r: NodeRecord = rmp_serde::from_slice(&old).unwrap();
        assert!(r.apps.is_empty());
    }

    #[test]
    fn routes_over_a_line_of_nodes() {
        // a - b - c - d, seen from a.
        let mut t = topo("a");
        t.set_local(set(&["b"]), BTreeSet::new());
        t.merge(signed([("b", rec(1, 1, &["a", "c"])), ("c", rec(1, 1, &["b", "d"])), ("d", rec(1, 1, &["c"]))]), NOW);
        assert_eq!(t.next_hop("d"), Some("b"));
        assert_eq!(t.next_hop("b"), Some("b"));
        assert_eq!(t.live_remotes(), ["b", "c", "d"]);
        assert_eq!(t.health(), Health { live: 4, known: 4 });
        // c loses its link to d: d is unreachable, though d still claims the link.
        t.merge(signed([("c", rec(1, 2, &["b"]))]), NOW);
        assert!(!t.is_live("d"));
        assert_eq!(t.health(), Health { live: 3, known: 4 });
        assert!(t.health().up() && !t.health().complete());
    }

    #[test]
    fn stale_records_are_ignored_and_restarts_win() {
        let mut t = topo("a");
        t.set_local(set(&["b"]), BTreeSet::new());
        assert!(t.merge(signed([("b", rec(5, 3, &["a"]))]), NOW).changed);
        assert!(!t.merge(signed([("b", rec(5, 2, &[]))]), NOW).changed, "older seq");
        assert!(t.is_live("b"));
        assert!(t.merge(signed([("b", rec(6, 0, &[]))]), NOW).changed, "new incarnation");
        assert!(!t.is_live("b"));
    }

    #[test]
    fn records_without_the_right_mac_are_refused() {
        let mut t = topo("a");
        t.set_local(set(&["b"]), BTreeSet::new());
        let forged = |mac: Vec<u8>| {
            let mut r = rec(5, 1, &["a"]);
            r.mac = mac;
            BTreeMap::from([("b".to_string(), r)])
        };
        assert_eq!(t.merge(forged(Vec::new()), NOW), Merged { changed: false, rejected: 1, ..Merged::default() });
        assert_eq!(t.merge(forged(vec![0; 32]), NOW).rejected, 1);
        let mut other_cluster = rec(5, 1, &["a"]);
        RecordKey::from_secret("other").sign("b", &mut other_cluster);
        assert_eq!(t.merge(BTreeMap::from([("b".to_string(), other_cluster)]), NOW).rejected, 1);
        // A record signed for one name cannot be replayed as another node's.
        let mut c = rec(5, 1, &["a"]);
        key().sign("c", &mut c);
        assert_eq!(t.merge(BTreeMap::from([("b".to_string(), c)]), NOW).rejected, 1);
        assert!(!t.is_live("b") && t.health().known == 1);
        // Tampering with a signed record breaks it.
        let mut good = signed([("b", rec(5, 1, &["a"]))]);
        good.get_mut("b").unwrap().services.insert("stolen".into());
        assert_eq!(t.merge(good, NOW).rejected, 1);
    }

    #[test]
    fn implausible_records_are_refused_and_known_nodes_are_bounded() {
        let mut t = Topology::new("a", "", 1, key(), 3);
        t.set_local(set(&["b"]), BTreeSet::new());
        let mut future = rec(NOW + MAX_FUTURE_MS + 1, 1, &["a"]);
        let mut huge_seq = rec(1, MAX_SEQ + 1, &["a"]);
        let mut long_addr = rec(1, 1, &["a"]);
        long_addr.addr = "x".repeat(MAX_ADDR_LEN + 1);
        for r in [&mut future, &mut huge_seq, &mut long_addr] {
            key().sign("b", r);
            assert_eq!(t.merge(BTreeMap::from([("b".to_string(), r.clone())]), NOW).rejected, 1);
        }
        assert!(t.merge(signed([("b", rec(NOW + MAX_FUTURE_MS, 1, &["a"]))]), NOW).changed, "within the skew");
        // Three nodes known (a, b, c): d is one too many, and so is a remembered e.
        assert!(t.merge(signed([("c", rec(1, 1, &[]))]), NOW).changed);
        assert_eq!(t.merge(signed([("d", rec(1, 1, &[]))]), NOW).rejected, 1);
        t.remember([("e".to_string(), "h:1".to_string())]);
        assert_eq!(t.known().keys().collect::<Vec<_>>(), ["a", "b", "c"]);
    }

    #[test]
    fn a_newer_record_claiming_this_node_is_refuted() {
        let mut t = topo("a");
        let mine = t.local().clone();
        let mut claim = rec(500, 7, &["x"]);
        key().sign("a", &mut claim);
        assert!(t.merge(BTreeMap::from([("a".to_string(), claim.clone())]), NOW).changed);
        let own = t.local();
        assert!((own.incarnation, own.seq) > (claim.incarnation, claim.seq), "this node's record moved past it");
        assert_eq!((own.links.clone(), own.addr.clone()), (mine.links, mine.addr), "and still says what is true");
        assert!(key().verify("a", own));
    }

    #[test]
    fn routes_kept_up_to_date_match_a_full_search() {
        // Records of a random graph arrive one at a time, in a random order, with links
        // added and some removed; after each merge the distances equal a search from scratch
        // and every next hop is a direct neighbour on a shortest path.
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let names: Vec<String> = (0..40).map(|i| format!("n{i}")).collect();
        let mut t = Topology::new("n0", "", 1, key(), 1024);
        let mut seq = vec![0u64; names.len()];
        for step in 0..400 {
            let i = rng.gen_range(0..names.len());
            let links: BTreeSet<String> = (0..rng.gen_range(0..5))
                .map(|_| names[rng.gen_range(0..names.len())].clone())
                .filter(|p| *p != names[i])
                .collect();
            if i == 0 {
                t.set_local(links, BTreeSet::new());
            } else {
                seq[i] += 1;
                let mut r = rec(1, seq[i], &[]);
                r.links = links;
                key().sign(&names[i], &mut r);
                t.merge(BTreeMap::from([(names[i].clone(), r)]), NOW);
            }
            let (distance, next_hop, live) = (t.distance.clone(), t.next_hop.clone(), t.live);
            t.recompute();
            assert_eq!((distance, live), (t.distance.clone(), t.live), "step {step}");
            for (dest, &hop) in next_hop.iter().enumerate().skip(1) {
                if hop == UNREACHABLE {
                    continue;
                }
                assert_eq!(t.distance[hop as usize], 1, "step {step}: {dest} via {hop}");
                let hop_name = &t.names[hop as usize];
                assert!(t.own.links.contains(hop_name) && t.records[hop_name].links.contains("n0"));
            }
            assert_eq!(t.health().live, t.known().keys().filter(|n| t.is_live(n)).count());
            // The same records numbered from scratch route the same way.
            let names: Vec<String> = t.known().keys().cloned().collect();
            let hops: Vec<Option<String>> = names.iter().map(|n| t.next_hop(n).map(str::to_string)).collect();
            let live = t.live_remotes();
            t.reindex();
            assert_eq!(hops, names.iter().map(|n| t.next_hop(n).map(str::to_string)).collect::<Vec<_>>());
            assert_eq!(live, t.live_remotes(), "step {step}");
        }
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
        let mut t = topo("a");
        t.set_local(set(&["b"]), BTreeSet::new());
        let mut b = rec(1, 1, &["a", "c"]);
        b.services.insert("x".into());
        let mut c = rec(1, 1, &["b"]);
        c.services.insert("x".into());
        t.merge(signed([("b", b), ("c", c)]), NOW);
        assert_eq!(t.nearest_with("x"), Some("b"));
        assert!(t.forget("c"));
        assert_eq!(t.health().known, 2);
    }
}
