//! The cluster half of the router: links between nodes (`CONNECT`/`ACCEPT`/`REFUSE`, one link per
//! pair), gossip of the link-state records, forwarding over the next hop, heartbeats with the
//! phi-accrual detector, clock offsets, and the `CLUSTER_*`/`CLOCK_*` reports to local services.
//! Same rules as the rest of the router: no I/O, `now` is an argument.

use super::{Action, ConnId, Link, Router, NODE_SERVICE};
use crate::auth::Origin;
use crate::detector::PhiDetector;
use crate::topology::NodeRecord;
use nodus_wire::Message;
use std::collections::{BTreeMap, BTreeSet};

/// Most node records accepted in one `GOSSIP`.
const MAX_GOSSIP_RECORDS: usize = 4096;
/// Full gossip to every link every this many ticks (anti-entropy), besides gossip on change.
const GOSSIP_EVERY_TICKS: u64 = 20;
/// Smallest standard deviation the failure detector assumes, ms.
const MIN_STD_MS: f64 = 50.0;

impl Router {
    /// A connection this node dialed to another node's cluster listener (`origin` is
    /// [`Origin::Dialed`]): sends `CONNECT`.
    pub fn dial(&mut self, conn: ConnId, origin: Origin, out: &mut Vec<Action>) {
        debug_assert!(matches!(origin, Origin::Dialed { .. }));
        self.connect(conn, origin);
        let mut m =
            Message::new("CONNECT").param("server", &self.server).param("version", 1).param("addr", &self.cluster_addr);
        if !self.cluster.secret.is_empty() {
            m.params.insert("secret".into(), self.cluster.secret.clone());
        }
        m.from = self.node_address();
        out.push(Action::Deliver(conn, m));
    }

    /// Nodes remembered from an earlier run.
    pub fn remember(&mut self, nodes: impl IntoIterator<Item = (String, String, bool)>) {
        let nodes: Vec<_> = nodes.into_iter().collect();
        self.neighbors.extend(nodes.iter().filter(|n| n.2).map(|n| n.0.clone()));
        self.topology.remember(nodes.into_iter().map(|(n, a, _)| (n, a)));
        self.last_health = self.topology.health();
    }

    /// True when a live link to the node advertising `addr` exists.
    pub fn linked_to_addr(&self, addr: &str) -> bool {
        self.links.keys().any(|peer| self.topology.records().get(peer).is_some_and(|r| r.addr == addr))
    }

    /// The first messages on a cluster connection: `CONNECT` (inbound), `ACCEPT`/`REFUSE` (dialed).
    pub(super) fn link_handshake(&mut self, conn: ConnId, msg: Message, now: i64, out: &mut Vec<Action>) {
        let dialed = self.conns.get(&conn).is_some_and(|c| c.dialed);
        match (msg.command.as_str(), dialed) {
            ("CONNECT", false) => {
                let peer = msg.get("server").unwrap_or("").to_string();
                let refusal = if msg.get("version") != Some("1") {
                    Some("version".to_string())
                } else if !self.cluster.secret.is_empty() && msg.get("secret") != Some(self.cluster.secret.as_str()) {
                    Some("secret".to_string())
                } else if peer.is_empty() || !nodus_wire::valid_name(&peer) || peer.contains(['*', '?']) || peer == "."
                {
                    Some("bad server name".to_string())
                } else if peer == self.server {
                    Some("self".to_string())
                } else if self.links.len() >= self.cluster.max_links && !self.links.contains_key(&peer) {
                    Some("too many links".to_string())
                } else if self.links.contains_key(&peer) && !self.new_link_wins(&peer, false) {
                    Some("duplicate".to_string())
                } else {
                    None
                };
                if let Some(reason) = refusal {
                    tracing::warn!(peer = %peer, reason = %reason, "refusing cluster link");
                    let mut m = Message::new("REFUSE").param("reason", reason).param("server", &self.server);
                    m.from = self.node_address();
                    out.push(Action::Deliver(conn, m));
                    out.push(Action::Close(conn));
                    return;
                }
                let mut m = Message::new("ACCEPT").param("server", &self.server).param("addr", &self.cluster_addr);
                m.from = self.node_address();
                out.push(Action::Deliver(conn, m));
                self.establish(conn, peer, msg.get("addr").unwrap_or(""), now, out);
            }
            ("ACCEPT", true) => {
                let peer = msg.get("server").unwrap_or("").to_string();
                if peer.is_empty() || !nodus_wire::valid_name(&peer) || peer == self.server {
                    out.push(Action::Close(conn));
                    return;
                }
                if self.links.contains_key(&peer) && !self.new_link_wins(&peer, true) {
                    let mut m = Message::new("DISCONNECT").param("reason", "duplicate");
                    m.from = self.node_address();
                    out.push(Action::Deliver(conn, m));
                    out.push(Action::Close(conn));
                    return;
                }
                self.establish(conn, peer, msg.get("addr").unwrap_or(""), now, out);
            }
            ("REFUSE", true) => {
                tracing::warn!(
                    reason = msg.get("reason").unwrap_or(""),
                    peer = msg.get("server").unwrap_or(""),
                    "cluster link refused"
                );
                out.push(Action::Close(conn));
            }
            _ => {
                let mut m = Message::new("REFUSE").param("reason", "a cluster connection must start with CONNECT");
                m.from = self.node_address();
                out.push(Action::Deliver(conn, m));
                out.push(Action::Close(conn));
            }
        }
    }

    /// One link per pair: when two exist, both ends keep the one dialed by the smaller name.
    fn new_link_wins(&self, peer: &str, new_dialed_by_me: bool) -> bool {
        let Some(existing) = self.links.get(peer).and_then(|id| self.conns.get(id)) else { return true };
        let dialer = |by_me: bool| if by_me { self.server.as_str() } else { peer };
        let keep = std::cmp::min(self.server.as_str(), peer);
        dialer(new_dialed_by_me) == keep && dialer(existing.dialed) != keep
    }

    fn establish(&mut self, conn: ConnId, peer: String, addr: &str, now: i64, out: &mut Vec<Action>) {
        if let Some(old) = self.links.insert(peer.clone(), conn) {
            if old != conn {
                // The tie-break chose this link: retire the other without reporting a loss.
                if let Some(c) = self.conns.get_mut(&old) {
                    c.link = None;
                }
                let mut m = Message::new("DISCONNECT").param("reason", "duplicate");
                m.from = self.node_address();
                out.push(Action::Deliver(old, m));
                out.push(Action::Close(old));
            }
        }
        let mut detector = PhiDetector::new(self.cluster.heartbeat_ms as f64, MIN_STD_MS);
        detector.heartbeat(now);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.link = Some(Link { peer: peer.clone(), detector, rtt_ms: None, offset_ms: None, hung_up: false });
        }
        tracing::info!(peer = %peer, "cluster link up");
        self.neighbors.insert(peer.clone());
        if !addr.is_empty() {
            self.topology.remember([(peer.clone(), addr.to_string())]);
        }
        self.local_changed(out);
        self.send_gossip(conn, out);
        self.notify("NEW_REMOTE_CONNECTION", &[("server", &peer)], out);
        self.save_nodes(out);
        self.health_changed(out);
    }

    /// A link connection closed.
    pub(super) fn link_lost(&mut self, conn: ConnId, link: Link, out: &mut Vec<Action>) {
        if self.links.get(&link.peer) != Some(&conn) {
            return;
        }
        self.links.remove(&link.peer);
        tracing::info!(peer = %link.peer, "cluster link down");
        let what = if link.hung_up { "HANGUP" } else { "DISCONNECTED" };
        self.notify(what, &[("server", &link.peer)], out);
        self.local_changed(out);
        self.health_changed(out);
    }

    /// Link-level commands (addressed to the node at the other end). Returns whether consumed.
    pub(super) fn link_control(&mut self, conn: ConnId, msg: &Message, now: i64, out: &mut Vec<Action>) -> bool {
        if !msg.to.server.is_empty() || !msg.to.service.is_empty() {
            return false;
        }
        match msg.command.as_str() {
            "LINK_PING" => {
                if let Some(l) = self.conns.get_mut(&conn).and_then(|c| c.link.as_mut()) {
                    l.detector.heartbeat(now);
                }
                let t0 = msg.get("t").unwrap_or("0");
                let mut m = Message::new("LINK_PONG").param("t0", t0).param("t1", now);
                m.from = self.node_address();
                out.push(Action::Deliver(conn, m));
            }
            "LINK_PONG" => {
                let t0 = msg.get("t0").and_then(|v| v.parse::<i64>().ok());
                let t1 = msg.get("t1").and_then(|v| v.parse::<i64>().ok());
                if let (Some(t0), Some(t1)) = (t0, t1) {
                    if let Some(l) = self.conns.get_mut(&conn).and_then(|c| c.link.as_mut()) {
                        // The peer stamped t1 about half-way through the round trip.
                        l.rtt_ms = Some((now - t0).max(0));
                        l.offset_ms = Some(t1 - (t0 + now) / 2);
                    }
                    self.clock_changed(out);
                }
            }
            "GOSSIP" => {
                let records: Option<BTreeMap<String, NodeRecord>> = rmp_serde::from_slice(&msg.payload).ok();
                match records {
                    Some(records) if records.len() <= MAX_GOSSIP_RECORDS => {
                        if self.topology.merge(records) {
                            self.flood_gossip(Some(conn), out);
                            self.save_nodes(out);
                            self.health_changed(out);
                        }
                    }
                    _ => tracing::warn!(conn, "ignoring malformed GOSSIP"),
                }
            }
            "DISCONNECT" => {
                if let Some(l) = self.conns.get_mut(&conn).and_then(|c| c.link.as_mut()) {
                    l.hung_up = true;
                }
                out.push(Action::Close(conn));
            }
            "SHUTDOWN" => self.shutdown_cluster(Some(conn), out),
            "FORGET" => {
                if let Some(name) = msg.get("server").map(String::from) {
                    self.forget(&name, Some(conn), out);
                }
            }
            _ => return false,
        }
        true
    }

    /// Cluster commands from clients (and the safe ones from links). Returns whether consumed.
    pub(super) fn cluster_command(&mut self, conn: ConnId, msg: &Message, now: i64, out: &mut Vec<Action>) -> bool {
        match msg.command.as_str() {
            "CLUSTER_STATUS" => {
                let h = self.topology.health();
                let count = self.links.len();
                for status in [
                    if h.up() { "CLUSTER_UP" } else { "CLUSTER_DOWN" },
                    if h.complete() { "CLUSTER_COMPLETE" } else { "CLUSTER_INCOMPLETE" },
                ] {
                    let m = self
                        .answer(msg, status)
                        .param("neighbors_count", count)
                        .param("live", h.live)
                        .param("known", h.known);
                    out.push(Action::Deliver(conn, m));
                }
            }
            "CLOCK_STATUS" => {
                let command = if self.clock_stable() { "CLOCK_STABLE" } else { "CLOCK_UNSTABLE" };
                let m = self
                    .answer(msg, command)
                    .param("max_offset_ms", self.max_offset_ms())
                    .param("ntp", self.ntp_word());
                out.push(Action::Deliver(conn, m));
            }
            "CLUSTER_INFO" => {
                let m = self.cluster_info(msg, now);
                out.push(Action::Deliver(conn, m));
            }
            "SHUTDOWN" => {
                out.push(Action::Deliver(conn, self.answer(msg, "STOPPING")));
                self.shutdown_cluster(None, out);
            }
            "FORGET" => {
                let name = msg.get("server").map(String::from).or_else(|| {
                    let ip = msg.get("ip")?;
                    self.topology
                        .known()
                        .iter()
                        .find(|(_, a)| a.as_str() == ip || a.starts_with(&format!("{ip}:")))
                        .map(|(n, _)| n.clone())
                });
                match name {
                    Some(name) if name != self.server => {
                        self.forget(&name, None, out);
                        out.push(Action::Deliver(conn, self.answer(msg, "FORGOTTEN").param("server", name)));
                    }
                    _ => self.invalid_request(conn, msg, "FORGET needs server=NAME or ip=ADDR of a known node", out),
                }
            }
            _ => return false,
        }
        true
    }

    fn cluster_info(&self, req: &Message, now: i64) -> Message {
        let h = self.topology.health();
        let nodes: Vec<String> = self
            .topology
            .known()
            .iter()
            .map(|(n, a)| format!("{n}@{a}@{}", if self.topology.is_live(n) { "up" } else { "down" }))
            .collect();
        let links: Vec<String> = self
            .links
            .iter()
            .filter_map(|(peer, id)| {
                let l = self.conns.get(id)?.link.as_ref()?;
                let rtt = l.rtt_ms.map_or("-".into(), |v| v.to_string());
                let off = l.offset_ms.map_or("-".into(), |v| v.to_string());
                Some(format!("{peer}@{rtt}@{off}@{:.2}", l.detector.phi(now)))
            })
            .collect();
        self.answer(req, "CLUSTER_INFO")
            .param("server", &self.server)
            .param("live", h.live)
            .param("known", h.known)
            .param("quorum", h.known / 2 + 1)
            .param("up", h.up())
            .param("complete", h.complete())
            .param("clock_stable", self.clock_stable())
            .param("ntp", self.ntp_word())
            .param("nodes", nodes.join(","))
            .param("links", links.join(","))
    }

    /// Sends `msg` towards node `dest` over the next hop.
    pub(super) fn forward(&mut self, origin: ConnId, mut msg: Message, dest: &str, now: i64, out: &mut Vec<Action>) {
        let link = self.topology.next_hop(dest).and_then(|hop| self.links.get(hop)).copied();
        match link {
            Some(link) if link != origin || msg.envelope.reply_to != 0 => {
                msg.to.server = dest.to_string();
                msg.envelope.hops += 1;
                self.deliver_tracked(origin, link, msg, now, out);
            }
            _ => {
                let (why, text) = if self.topology.known().contains_key(dest) {
                    ("unreachable", format!("server {dest:?} is not reachable from {}", self.server))
                } else {
                    ("unknown_server", format!("no route to server {dest:?}"))
                };
                self.undeliverable(origin, &msg, why, text, out);
            }
        }
    }

    pub(super) fn services_changed(&mut self, out: &mut Vec<Action>) {
        self.local_changed(out);
    }

    /// This node's apps and the endpoints its locator gives for them; gossiped to every node so
    /// any locator in the cluster resolves them.
    pub fn set_app_endpoints(&mut self, apps: BTreeMap<String, (String, u16)>, out: &mut Vec<Action>) {
        if self.topology.set_local_apps(apps) {
            self.flood_gossip(None, out);
        }
    }

    /// `server:service` for every service of every live node, this one included, sorted.
    pub(super) fn cluster_services(&self) -> Vec<String> {
        let mut all: Vec<String> = self.services.keys().map(|s| format!("{}:{s}", self.server)).collect();
        for node in self.topology.live_remotes() {
            if let Some(rec) = self.topology.records().get(&node) {
                all.extend(rec.services.iter().map(|s| format!("{node}:{s}")));
            }
        }
        all.sort();
        all
    }

    /// The endpoints of `app` on other live nodes, nearest first.
    pub fn app_elsewhere(&self, app: &str) -> Vec<(String, u16)> {
        self.topology.app_elsewhere(app)
    }

    /// Recomputes this node's own record; floods it when it changed.
    fn local_changed(&mut self, out: &mut Vec<Action>) {
        let links: BTreeSet<String> = self.links.keys().cloned().collect();
        let services: BTreeSet<String> = self.services.keys().cloned().collect();
        if self.topology.set_local(links, services) {
            self.flood_gossip(None, out);
        }
    }

    fn gossip_message(&self) -> Message {
        let payload = rmp_serde::to_vec(self.topology.records()).unwrap_or_default();
        let mut m = Message::new("GOSSIP").with_payload(payload);
        m.from = self.node_address();
        m
    }

    fn send_gossip(&self, conn: ConnId, out: &mut Vec<Action>) {
        out.push(Action::Deliver(conn, self.gossip_message()));
    }

    fn flood_gossip(&self, except: Option<ConnId>, out: &mut Vec<Action>) {
        if self.links.is_empty() {
            return;
        }
        let m = self.gossip_message();
        for id in self.links.values() {
            if Some(*id) != except {
                out.push(Action::Deliver(*id, m.clone()));
            }
        }
    }

    fn save_nodes(&self, out: &mut Vec<Action>) {
        let nodes = self
            .topology
            .known()
            .iter()
            .filter(|(n, _)| **n != self.server)
            .map(|(n, a)| (n.clone(), a.clone(), self.neighbors.contains(n)))
            .collect();
        out.push(Action::SaveNodes(nodes));
    }

    fn forget(&mut self, name: &str, except: Option<ConnId>, out: &mut Vec<Action>) {
        if !self.topology.forget(name) {
            return;
        }
        self.neighbors.remove(name);
        let mut m = Message::new("FORGET").param("server", name);
        m.from = self.node_address();
        for id in self.links.values() {
            if Some(*id) != except {
                out.push(Action::Deliver(*id, m.clone()));
            }
        }
        if let Some(id) = self.links.get(name).copied() {
            out.push(Action::Close(id));
        }
        self.save_nodes(out);
        self.health_changed(out);
    }

    fn shutdown_cluster(&mut self, except: Option<ConnId>, out: &mut Vec<Action>) {
        if self.quitting {
            return;
        }
        let mut m = Message::new("SHUTDOWN");
        m.from = self.node_address();
        for id in self.links.values() {
            if Some(*id) != except {
                out.push(Action::Deliver(*id, m.clone()));
            }
        }
        out.push(Action::Shutdown);
    }

    /// Heartbeats, failure detection and periodic gossip.
    pub(super) fn cluster_tick(&mut self, now: i64, out: &mut Vec<Action>) {
        self.ticks += 1;
        let mut dead = Vec::new();
        for (peer, id) in &self.links {
            let Some(l) = self.conns.get(id).and_then(|c| c.link.as_ref()) else { continue };
            let phi = l.detector.phi(now);
            if phi > self.cluster.failure_phi {
                tracing::warn!(peer = %peer, phi, "cluster link silent: declaring it dead");
                dead.push(*id);
                continue;
            }
            let mut ping = Message::new("LINK_PING").param("t", now);
            ping.from = self.node_address();
            out.push(Action::Deliver(*id, ping));
        }
        for id in dead {
            out.push(Action::Close(id));
            // Do not wait for the socket to notice: the link is gone for routing now.
            if let Some(link) = self.conns.get_mut(&id).and_then(|c| c.link.take()) {
                self.link_lost(id, link, out);
            }
        }
        if self.ticks.is_multiple_of(GOSSIP_EVERY_TICKS) {
            self.flood_gossip(None, out);
        }
    }

    fn max_offset_ms(&self) -> i64 {
        self.links
            .values()
            .filter_map(|id| self.conns.get(id)?.link.as_ref()?.offset_ms)
            .map(i64::abs)
            .max()
            .unwrap_or(0)
    }

    fn clock_stable(&self) -> bool {
        let ntp_ok = !(self.cluster.clock_require_ntp && self.ntp == Some(false));
        ntp_ok && self.max_offset_ms() <= self.cluster.clock_threshold_ms
    }

    fn ntp_word(&self) -> &'static str {
        match self.ntp {
            Some(true) => "synchronized",
            Some(false) => "unsynchronized",
            None => "unknown",
        }
    }

    /// The system clock's NTP state changed (the driver reads it from the kernel).
    pub fn set_ntp(&mut self, synchronized: Option<bool>, out: &mut Vec<Action>) {
        if self.ntp != synchronized {
            self.ntp = synchronized;
            self.clock_changed(out);
        }
    }

    fn clock_changed(&mut self, out: &mut Vec<Action>) {
        let stable = self.clock_stable();
        if stable != self.last_clock_stable {
            self.last_clock_stable = stable;
            let command = if stable { "CLOCK_STABLE" } else { "CLOCK_UNSTABLE" };
            let offset = self.max_offset_ms().to_string();
            self.notify(command, &[("max_offset_ms", &offset), ("ntp", self.ntp_word())], out);
        }
    }

    /// Sends `CLUSTER_UP`/`DOWN` and `CLUSTER_COMPLETE`/`INCOMPLETE` when they change, and
    /// `UNREACHABLE` for nodes that stopped being reachable.
    fn health_changed(&mut self, out: &mut Vec<Action>) {
        let h = self.topology.health();
        let old = std::mem::replace(&mut self.last_health, h);
        let count = self.links.len().to_string();
        let (live, known) = (h.live.to_string(), h.known.to_string());
        let params = [("neighbors_count", count.as_str()), ("live", live.as_str()), ("known", known.as_str())];
        if old.up() != h.up() {
            self.notify(if h.up() { "CLUSTER_UP" } else { "CLUSTER_DOWN" }, &params, out);
        }
        if old.complete() != h.complete() {
            self.notify(if h.complete() { "CLUSTER_COMPLETE" } else { "CLUSTER_INCOMPLETE" }, &params, out);
        }
        if h.live < old.live {
            let gone: Vec<String> =
                self.topology.known().keys().filter(|n| !self.topology.is_live(n)).cloned().collect();
            for n in gone {
                self.notify("UNREACHABLE", &[("server", &n)], out);
            }
        }
    }

    /// Sends a notification to every local service that declared `command` in `COMMANDS`.
    fn notify(&self, command: &str, params: &[(&str, &str)], out: &mut Vec<Action>) {
        let mut m = Message::new(command);
        m.from = nodus_wire::Address::new(&self.server, NODE_SERVICE);
        for (k, v) in params {
            m.params.insert(k.to_string(), v.to_string());
        }
        for (id, c) in &self.conns {
            if c.declared(command) {
                out.push(Action::Deliver(*id, m.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The link protocol on a virtual clock, two routers wired by hand.
    use super::*;
    use crate::config::Config;
    use crate::router::RouterLimits;

    fn dialed() -> Origin {
        Origin::Dialed { addr: "127.0.0.1:1".into(), tls: false }
    }

    fn inbound() -> Origin {
        Origin::Cluster { peer: "127.0.0.1:2".parse().unwrap(), tls: false }
    }

    fn router(name: &str, secret: &str) -> Router {
        let mut config = Config::default();
        config.cluster.secret = secret.into();
        config.cluster.heartbeat_ms = 100;
        Router::new(name, &[], RouterLimits::from_config(&config.limits), config.cluster.clone(), String::new(), 0)
    }

    fn sent(out: &mut Vec<Action>, conn: ConnId) -> Vec<Message> {
        let mut got = Vec::new();
        out.retain(|a| match a {
            Action::Deliver(c, m) if *c == conn => {
                got.push(m.clone());
                false
            }
            _ => true,
        });
        got
    }

    /// Links `a` (dialing on its conn 10) with `b` (accepting on its conn 20).
    fn link(a: &mut Router, b: &mut Router, now: i64) {
        let (mut oa, mut ob) = (Vec::new(), Vec::new());
        a.dial(10, dialed(), &mut oa);
        b.connect(20, inbound());
        for m in sent(&mut oa, 10) {
            b.handle(20, m, now, &mut ob);
        }
        for m in sent(&mut ob, 20) {
            a.handle(10, m, now, &mut oa);
        }
    }

    #[test]
    fn wrong_secret_is_refused_and_right_one_links() {
        let (mut a, mut b) = (router("a", "s1"), router("b", "s2"));
        link(&mut a, &mut b, 0);
        assert!(a.links.is_empty() && b.links.is_empty());
        let (mut a, mut b) = (router("a", "s"), router("b", "s"));
        link(&mut a, &mut b, 0);
        assert_eq!((a.links.get("b"), b.links.get("a")), (Some(&10), Some(&20)));
    }

    #[test]
    fn one_link_per_pair_both_ends_keep_the_one_dialed_by_the_smaller_name() {
        let mut b = router("b", "");
        let mut out = Vec::new();
        // b already has a link from its own dial (conn 1); a's dial (conn 2) arrives: a < b wins.
        b.dial(1, dialed(), &mut out);
        b.handle(1, Message::new("ACCEPT").param("server", "a"), 0, &mut out);
        assert_eq!(b.links.get("a"), Some(&1));
        b.connect(2, inbound());
        let connect = Message::new("CONNECT").param("server", "a").param("version", 1);
        b.handle(2, connect, 0, &mut out);
        assert_eq!(b.links.get("a"), Some(&2));
        assert!(out.contains(&Action::Close(1)), "the losing link is closed");
        // Seen from a, the same pair: its own dial wins over b's.
        let mut a = router("a", "");
        a.connect(5, inbound());
        a.handle(5, Message::new("CONNECT").param("server", "b").param("version", 1), 0, &mut out);
        a.dial(6, dialed(), &mut out);
        a.handle(6, Message::new("ACCEPT").param("server", "b"), 0, &mut out);
        assert_eq!(a.links.get("b"), Some(&6));
    }

    #[test]
    fn clock_offset_past_the_threshold_is_reported_unstable() {
        let (mut a, mut b) = (router("a", ""), router("b", ""));
        link(&mut a, &mut b, 0);
        a.connect(1, Origin::Internal);
        let mut out = Vec::new();
        a.handle(1, Message::new("REGISTER").param("service", "w").param("version", 1), 0, &mut out);
        a.handle(1, Message::new("COMMANDS").param("list", "CLOCK_STABLE,CLOCK_UNSTABLE"), 0, &mut out);
        out.clear();
        // Round trip 0 → 40 ms; the peer's clock read 520 at mid-point 20: offset 500 ms.
        a.handle(10, Message::new("LINK_PONG").param("t0", 0).param("t1", 520), 40, &mut out);
        let got = sent(&mut out, 1);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].command.as_str(), got[0].get("max_offset_ms")), ("CLOCK_UNSTABLE", Some("500")));
        a.handle(10, Message::new("LINK_PONG").param("t0", 100).param("t1", 130), 140, &mut out);
        assert_eq!(sent(&mut out, 1)[0].command, "CLOCK_STABLE");
        // An unsynchronised system clock only counts when the configuration requires NTP.
        a.set_ntp(Some(false), &mut out);
        assert!(sent(&mut out, 1).is_empty());
        a.cluster.clock_require_ntp = true;
        a.set_ntp(None, &mut out);
        a.set_ntp(Some(false), &mut out);
        let got = sent(&mut out, 1);
        assert_eq!((got[0].command.as_str(), got[0].get("ntp")), ("CLOCK_UNSTABLE", Some("unsynchronized")));
    }

    #[test]
    fn silent_links_are_declared_dead_by_the_detector() {
        let (mut a, mut b) = (router("a", ""), router("b", ""));
        link(&mut a, &mut b, 0);
        let mut out = Vec::new();
        for t in (100..=1000).step_by(100) {
            a.handle(10, Message::new("LINK_PING").param("t", t), t, &mut out);
            a.tick(t, &mut out);
        }
        assert!(a.links.contains_key("b"));
        out.clear();
        let mut t = 1000;
        while a.links.contains_key("b") {
            t += 100;
            a.tick(t, &mut out);
            assert!(t < 3000, "detected within the 3 s budget");
        }
        assert!(out.contains(&Action::Close(10)));
        assert!(t - 1000 <= 1000, "silence detected after {} ms", t - 1000);
    }

    #[test]
    fn messages_past_the_hop_limit_are_dropped() {
        let (mut a, mut b) = (router("a", ""), router("b", ""));
        link(&mut a, &mut b, 0);
        b.connect(3, Origin::Internal);
        let mut out = Vec::new();
        b.handle(3, Message::new("REGISTER").param("service", "svc").param("version", 1), 0, &mut out);
        out.clear();
        let mut m = Message::new("LOOPY").to("b:svc");
        m.envelope.hops = 17;
        b.handle(20, m.clone(), 0, &mut out);
        assert!(sent(&mut out, 3).is_empty());
        m.envelope.hops = 3;
        b.handle(20, m, 0, &mut out);
        assert_eq!(sent(&mut out, 3).len(), 1);
    }
}
