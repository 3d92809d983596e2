//! The cluster half of the router: links between nodes (`CONNECT`/`ACCEPT`/`CONFIRM`/`REFUSE`, one
//! link per pair), gossip of the link-state records, forwarding over the next hop, heartbeats with
//! the phi-accrual detector, clock offsets, and the `CLUSTER_*`/`CLOCK_*` reports to local
//! services. Same rules as the rest of the router: no I/O, `now` is an argument.
//!
//! Handshake: the dialer sends `CONNECT` with a fresh nonce. Without a cluster secret the
//! listener answers `ACCEPT` and both ends have a link (trusted like an anonymous client unless
//! it is verified TLS). With a secret, neither end ever sends it: the listener's `ACCEPT` carries
//! an HMAC over both names and both nonces, the dialer checks it and answers `CONFIRM` with its
//! own HMAC, and only then does the listener count the link as up. Proofs are compared in
//! constant time and a wrong one is refused with `reason=secret`.

use super::{Action, ConnId, Handshake, Link, Role, Router, NODE_SERVICE};
use crate::auth::Origin;
use crate::detector::PhiDetector;
use crate::topology::{KnownNode, NodeRecord};
use nodus_wire::node::{ForgetTarget, LinkMsg, LinkMsgError, Permission, Permissions};
use nodus_wire::rows::{self, LinkRow, NodeRow};
use nodus_wire::Message;
use ring::hmac;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// A `SUMMARY` (digest of the records held) to every link every this many ticks (anti-entropy);
/// records themselves travel only when they change, or to a peer whose digest differs.
const SUMMARY_EVERY_TICKS: u64 = 20;
/// Shortest time between two versions of this node's own record, ms (link-state protocols'
/// minimum origination interval): the first change after a quiet spell is published at once,
/// further changes within the interval (a flapping link, a burst of registrations) become one
/// version at its end.
pub const MIN_RECORD_INTERVAL_MS: i64 = 100;
/// Pacing of floods, ms: records to pass on go out at once when no flood left in the last this
/// many ms, else together, one message per link, when it has passed.
pub const FLOOD_PACE_MS: i64 = 10;
/// Smallest standard deviation the failure detector assumes, ms.
const MIN_STD_MS: f64 = 100.0;
/// Silence tolerated beyond the expected heartbeat, in heartbeat periods (the detector's
/// acceptable pause): a peer must miss about this many heartbeats before suspicion rises.
const ACCEPTABLE_PAUSE_HEARTBEATS: f64 = 3.0;
/// Pings remembered while waiting for their pong.
const MAX_PINGS: usize = 16;
/// Clock samples kept per link; the offset reported is their median.
const CLOCK_SAMPLES: usize = 5;
/// Samples needed before a link's clock is judged (one forged pong cannot decide).
const MIN_CLOCK_SAMPLES: usize = 3;
/// A pong whose round trip took longer than this says nothing about clocks, ms.
const MAX_RTT_MS: i64 = 10_000;
/// An offset larger than this is not a clock but garbage, ms (one year).
const MAX_OFFSET_MS: i64 = 365 * 24 * 3600 * 1000;

/// The key of the handshake proofs: HMAC-SHA256 keyed from the cluster secret (derived apart
/// from the record key, so a proof is never a valid record MAC or the other way round).
#[derive(Clone)]
pub(super) struct LinkKey(hmac::Key);

impl std::fmt::Debug for LinkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkKey(..)")
    }
}

impl LinkKey {
    pub(super) fn from_secret(secret: &str) -> Self {
        let derive = hmac::Key::new(hmac::HMAC_SHA256, b"nodus link handshake v1");
        LinkKey(hmac::Key::new(hmac::HMAC_SHA256, hmac::sign(&derive, secret.as_bytes()).as_ref()))
    }

    fn input(step: &str, listener: &str, dialer: &str, dialer_nonce: &str, listener_nonce: &str) -> Vec<u8> {
        [step, listener, dialer, dialer_nonce, listener_nonce].join("\0").into_bytes()
    }

    /// The proof for one step (`accept` by the listener, `confirm` by the dialer), in hex.
    fn prove(&self, step: &str, listener: &str, dialer: &str, nd: &str, nl: &str) -> String {
        let tag = hmac::sign(&self.0, &Self::input(step, listener, dialer, nd, nl));
        tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// True when `proof` is right (compared in constant time).
    fn check(&self, proof: &str, step: &str, listener: &str, dialer: &str, nd: &str, nl: &str) -> bool {
        let Some(bytes) = unhex(proof) else { return false };
        hmac::verify(&self.0, &Self::input(step, listener, dialer, nd, nl), &bytes).is_ok()
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 128 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

impl Router {
    /// A connection this node dialed to another node's cluster listener (`origin` is
    /// [`Origin::Dialed`]): sends `CONNECT`.
    pub fn dial(&mut self, conn: ConnId, origin: Origin, out: &mut Vec<Action>) {
        debug_assert!(matches!(origin, Origin::Dialed { .. }));
        self.connect(conn, origin);
        let Some(Role::Pending(h)) = self.conns.get(&conn).map(|c| &c.role) else { return };
        let connect = LinkMsg::Connect {
            server: self.server.clone(),
            version: 1,
            addr: self.cluster_addr.clone(),
            nonce: h.nonce.clone(),
        };
        self.send_link(conn, &connect, out);
    }

    /// Nodes remembered from an earlier run (at most `max_nodes`).
    pub fn remember(&mut self, nodes: Vec<KnownNode>) {
        let room = self.policy.max_nodes.saturating_sub(1);
        let nodes: Vec<KnownNode> = nodes.into_iter().take(room).collect();
        self.neighbors.extend(nodes.iter().filter(|n| n.neighbor).map(|n| n.name.clone()));
        self.topology.remember(nodes.into_iter().map(|n| (n.name, n.addr)));
        self.neighbors.retain(|n| self.topology.known().contains_key(n));
        self.last_health = self.topology.health();
    }

    /// True when a live link to the node advertising `addr` exists.
    pub fn linked_to_addr(&self, addr: &str) -> bool {
        self.links.keys().any(|peer| self.topology.records().get(peer).is_some_and(|r| r.addr == addr))
    }

    fn send_link(&self, conn: ConnId, l: &LinkMsg, out: &mut Vec<Action>) {
        let mut m = l.to_message();
        m.from = self.node_address();
        out.push(Action::Deliver(conn, m));
    }

    fn refuse_link(&self, conn: ConnId, reason: &str, peer: &str, out: &mut Vec<Action>) {
        tracing::warn!(peer = %peer, reason = %reason, "refusing cluster link");
        self.send_link(conn, &LinkMsg::Refuse { server: self.server.clone(), reason: reason.into() }, out);
        out.push(Action::Close(conn));
    }

    /// Why a link with `peer` cannot be made now, if it cannot.
    fn link_refusal(&self, peer: &str, dialed_by_me: bool) -> Option<&'static str> {
        if peer.is_empty() || !nodus_wire::valid_name(peer) || peer.contains(['*', '?']) || peer == "." {
            Some("bad server name")
        } else if peer == self.server {
            Some("self")
        } else if self.links.len() >= self.policy.max_links && !self.links.contains_key(peer) {
            Some("too many links")
        } else if self.links.contains_key(peer) && !self.new_link_wins(peer, dialed_by_me) {
            Some("duplicate")
        } else {
            None
        }
    }

    /// The first messages on a cluster connection: `CONNECT` then (with a secret) `CONFIRM`
    /// inbound; `ACCEPT` or `REFUSE` on a connection this node dialed.
    pub(super) fn link_handshake(&mut self, conn: ConnId, msg: Message, now: i64, out: &mut Vec<Action>) {
        let Some(Role::Pending(h)) = self.conns.get_mut(&conn).map(|c| &mut c.role) else { return };
        let (dialed, mine) = (h.dialed, h.nonce.clone());
        let awaiting = h.awaiting.take();
        let secret = !self.policy.secret.is_empty();
        match (LinkMsg::try_from(&msg), dialed, awaiting) {
            (Ok(LinkMsg::Connect { server, version, addr, nonce }), false, None) => {
                if version != 1 {
                    return self.refuse_link(conn, "version", &server, out);
                }
                if let Some(reason) = self.link_refusal(&server, false) {
                    return self.refuse_link(conn, reason, &server, out);
                }
                let proof = secret.then(|| self.link_key.prove("accept", &self.server, &server, &nonce, &mine));
                let accept = LinkMsg::Accept {
                    server: self.server.clone(),
                    addr: self.cluster_addr.clone(),
                    nonce: mine,
                    proof,
                };
                self.send_link(conn, &accept, out);
                if secret {
                    if let Some(Role::Pending(h)) = self.conns.get_mut(&conn).map(|c| &mut c.role) {
                        h.awaiting = Some(super::Awaiting { peer: server, addr, their_nonce: nonce });
                    }
                } else {
                    self.establish(conn, server, &addr, now, out);
                }
            }
            (Ok(LinkMsg::Confirm { proof }), false, Some(aw)) => {
                if !self.link_key.check(&proof, "confirm", &self.server, &aw.peer, &aw.their_nonce, &mine) {
                    return self.refuse_link(conn, "secret", &aw.peer, out);
                }
                if let Some(reason) = self.link_refusal(&aw.peer, false) {
                    return self.refuse_link(conn, reason, &aw.peer, out);
                }
                self.establish(conn, aw.peer, &aw.addr, now, out);
            }
            (Ok(LinkMsg::Accept { server, addr, nonce, proof }), true, None) => {
                let proven = match (&proof, secret) {
                    (Some(p), true) => self.link_key.check(p, "accept", &server, &self.server, &mine, &nonce),
                    (None, false) => true,
                    // One end has a secret and the other not.
                    _ => false,
                };
                let refusal = if proven { self.link_refusal(&server, true) } else { Some("secret") };
                if let Some(reason) = refusal {
                    tracing::warn!(peer = %server, reason, "cluster link not made");
                    self.send_link(conn, &LinkMsg::Disconnect { reason: Some(reason.into()) }, out);
                    out.push(Action::Close(conn));
                    return;
                }
                if secret {
                    let proof = self.link_key.prove("confirm", &server, &self.server, &mine, &nonce);
                    self.send_link(conn, &LinkMsg::Confirm { proof }, out);
                }
                self.establish(conn, server, &addr, now, out);
            }
            (Ok(LinkMsg::Refuse { server, reason }), true, _) => {
                tracing::warn!(reason = %reason, peer = %server, "cluster link refused");
                out.push(Action::Close(conn));
            }
            (_, _, Some(aw)) => self.refuse_link(conn, "secret", &aw.peer, out),
            _ => self.refuse_link(conn, "a cluster connection must start with CONNECT", "", out),
        }
    }

    /// One link per pair: when two exist, both ends keep the one dialed by the smaller name.
    fn new_link_wins(&self, peer: &str, new_dialed_by_me: bool) -> bool {
        let Some(Role::Link(existing)) = self.links.get(peer).and_then(|id| self.conns.get(id)).map(|c| &c.role) else {
            return true;
        };
        let dialer = |by_me: bool| if by_me { self.server.as_str() } else { peer };
        let keep = std::cmp::min(self.server.as_str(), peer);
        dialer(new_dialed_by_me) == keep && dialer(existing.dialed) != keep
    }

    fn establish(&mut self, conn: ConnId, peer: String, addr: &str, now: i64, out: &mut Vec<Action>) {
        let Some(c) = self.conns.get(&conn) else { return };
        let tls = matches!(c.origin, Origin::Cluster { tls: true, .. } | Origin::Dialed { tls: true, .. });
        let dialed = matches!(c.origin, Origin::Dialed { .. });
        if let Some(old) = self.links.insert(peer.clone(), conn) {
            if old != conn {
                // The tie-break chose this link: retire the other without reporting a loss
                // (`link_lost` ignores a link that is no longer the pair's).
                self.send_link(old, &LinkMsg::Disconnect { reason: Some("duplicate".into()) }, out);
                out.push(Action::Close(old));
            }
        }
        let heartbeat = self.policy.heartbeat.as_millis() as f64;
        let mut detector =
            PhiDetector::new(heartbeat, MIN_STD_MS).with_acceptable_pause(heartbeat * ACCEPTABLE_PAUSE_HEARTBEATS);
        detector.heartbeat(now);
        let link = Link {
            peer: peer.clone(),
            dialed,
            authenticated: !self.policy.secret.is_empty() || tls,
            detector,
            pings: VecDeque::new(),
            samples: VecDeque::new(),
            hung_up: false,
            synced_tick: self.ticks,
        };
        if let Some(c) = self.conns.get_mut(&conn) {
            c.role = Role::Link(link);
        }
        tracing::info!(peer = %peer, "cluster link up");
        self.neighbors.insert(peer.clone());
        if !addr.is_empty() && addr.len() <= crate::topology::MAX_ADDR_LEN {
            self.topology.remember([(peer.clone(), addr.to_string())]);
        }
        // The new peer gets every record (it may know none of them); the others get this
        // node's new record only.
        self.send_gossip(conn, out);
        self.local_changed(out);
        self.notify("NEW_REMOTE_CONNECTION", &[("server", &peer)], out);
        self.nodes_dirty = true;
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

    /// A message on an established link: link control is handled here (`None`); traffic gets
    /// the permissions it may use on this node, or `None` when its sender cannot be true.
    pub(super) fn link_traffic(
        &mut self,
        conn: ConnId,
        msg: &Message,
        now: i64,
        out: &mut Vec<Action>,
    ) -> Option<Permissions> {
        // Whatever the peer sent, it was alive to send it.
        if let Some(Role::Link(link)) = self.conns.get_mut(&conn).map(|c| &mut c.role) {
            link.detector.evidence(now);
        }
        match LinkMsg::try_from(msg) {
            Ok(l) => {
                self.link_control(conn, l, now, out);
                return None;
            }
            Err(LinkMsgError::Malformed { command, text }) => {
                tracing::warn!(conn, %command, %text, "ignoring a malformed link message");
                return None;
            }
            Err(LinkMsgError::NotLink) => {}
        }
        let Some(Role::Link(link)) = self.conns.get(&conn).map(|c| &c.role) else { return None };
        let (peer, authenticated) = (link.peer.as_str(), link.authenticated);
        let from = msg.from.server.as_str();
        // A node speaks only for itself: nobody else sends as this node, a neighbour linked
        // directly sends on its own link, and a sender this node cannot route back to is unknown.
        let spoofed =
            from == self.server || (from != peer && (self.links.contains_key(from) || !self.topology.is_live(from)));
        if spoofed {
            self.stats.refused += 1;
            tracing::warn!(peer, from, command = %msg.command, "dropping a message whose sender cannot come over this link");
            return None;
        }
        let mut perms = msg.envelope.perms;
        if !authenticated {
            perms = perms.intersect(self.access.anonymous);
        }
        if !(authenticated && self.policy.admin_node(from)) {
            perms = perms.without(Permission::Admin);
        }
        Some(perms)
    }

    /// True when the peer of link `conn` may run cluster-wide commands here.
    fn admin_peer(&self, conn: ConnId) -> Option<bool> {
        match self.conns.get(&conn).map(|c| &c.role) {
            Some(Role::Link(l)) => Some(l.authenticated && self.policy.admin_node(&l.peer)),
            _ => None,
        }
    }

    /// Link-level messages (addressed to the node at the other end).
    fn link_control(&mut self, conn: ConnId, l: LinkMsg, now: i64, out: &mut Vec<Action>) {
        match l {
            LinkMsg::Ping { t } => {
                if let Some(Role::Link(link)) = self.conns.get_mut(&conn).map(|c| &mut c.role) {
                    link.detector.heartbeat(now);
                }
                self.send_link(conn, &LinkMsg::Pong { t0: t, t1: now }, out);
            }
            LinkMsg::Pong { t0, t1 } => {
                if self.clock_sample(conn, t0, t1, now) {
                    self.clock_changed(out);
                }
            }
            LinkMsg::Gossip { records } => {
                let records: Option<BTreeMap<String, NodeRecord>> = rmp_serde::from_slice(&records).ok();
                match records {
                    Some(records) if records.len() <= self.policy.max_nodes => {
                        let merged = self.topology.merge(records, now);
                        if merged.rejected > 0 {
                            tracing::warn!(
                                conn,
                                rejected = merged.rejected,
                                "refused gossiped records (bad MAC, implausible, or too many nodes)"
                            );
                        }
                        if merged.changed {
                            // Pass on what was new here, and only that: each version of a record
                            // crosses each link at most once in each direction (a version
                            // superseded before its flood left is not passed on at all).
                            for name in merged.updated {
                                self.to_flood.insert(name, vec![conn]);
                            }
                            self.pace_flood(now, out);
                            self.nodes_dirty |= merged.known_changed;
                            self.health_changed(out);
                        }
                        // A version waiting to be passed on that this peer sent too: it has it.
                        for name in &merged.held {
                            if let Some(have) = self.to_flood.get_mut(name) {
                                if !have.contains(&conn) {
                                    have.push(conn);
                                }
                            }
                        }
                    }
                    _ => tracing::warn!(conn, "ignoring malformed GOSSIP"),
                }
            }
            LinkMsg::Summary { digest, records } => {
                let mine = format!("{:016x}", self.topology.digest());
                let ticks = self.ticks;
                let Some(Role::Link(link)) = self.conns.get_mut(&conn).map(|c| &mut c.role) else { return };
                // A peer that holds other versions gets every record here, at most once per
                // summary period (it sends what it has that is newer the same way).
                if digest != mine && ticks.saturating_sub(link.synced_tick) >= SUMMARY_EVERY_TICKS / 2 {
                    link.synced_tick = ticks;
                    tracing::debug!(conn, records, "a peer's records differ: sending ours");
                    self.send_gossip(conn, out);
                }
            }
            LinkMsg::Disconnect { .. } => {
                if let Some(Role::Link(link)) = self.conns.get_mut(&conn).map(|c| &mut c.role) {
                    link.hung_up = true;
                }
                out.push(Action::Close(conn));
            }
            LinkMsg::Shutdown => match self.admin_peer(conn) {
                Some(true) => self.shutdown_cluster(Some(conn), out),
                _ => tracing::warn!(conn, "ignoring SHUTDOWN from a node not in admin_nodes (or not authenticated)"),
            },
            LinkMsg::Forget { server } => match self.admin_peer(conn) {
                Some(true) => {
                    self.forget(&server, Some(conn), out);
                }
                _ => {
                    tracing::warn!(conn, %server, "ignoring FORGET from a node not in admin_nodes (or not authenticated)")
                }
            },
            LinkMsg::Connect { .. } | LinkMsg::Accept { .. } | LinkMsg::Confirm { .. } | LinkMsg::Refuse { .. } => {
                tracing::warn!(conn, "ignoring a handshake message on an established link");
            }
        }
    }

    /// A pong: a clock sample if it answers a ping this node sent and its round trip and offset
    /// are possible. Returns whether a sample was taken.
    fn clock_sample(&mut self, conn: ConnId, t0: i64, t1: i64, now: i64) -> bool {
        let Some(Role::Link(link)) = self.conns.get_mut(&conn).map(|c| &mut c.role) else { return false };
        let Some(pos) = link.pings.iter().position(|t| *t == t0) else { return false };
        // This pong and the older unanswered pings are done with.
        link.pings.drain(..=pos);
        let rtt = now - t0;
        // The peer stamped t1 about half-way through the round trip.
        let offset = i128::from(t1) - (i128::from(t0) + i128::from(now)) / 2;
        if !(0..=MAX_RTT_MS).contains(&rtt) || offset.unsigned_abs() > MAX_OFFSET_MS as u128 {
            return false;
        }
        if link.samples.len() == CLOCK_SAMPLES {
            link.samples.pop_front();
        }
        link.samples.push_back((rtt, offset as i64));
        true
    }

    /// A link's clock offset: the median of its recent samples, once there are enough.
    pub(super) fn link_offset(link: &Link) -> Option<i64> {
        if link.samples.len() < MIN_CLOCK_SAMPLES {
            return None;
        }
        let mut offsets: Vec<i64> = link.samples.iter().map(|s| s.1).collect();
        offsets.sort_unstable();
        Some(offsets[offsets.len() / 2])
    }

    pub(super) fn cluster_status(&self, conn: ConnId, msg: &Message, out: &mut Vec<Action>) {
        let h = self.topology.health();
        let count = self.links.len();
        for status in [
            if h.up() { "CLUSTER_UP" } else { "CLUSTER_DOWN" },
            if h.complete() { "CLUSTER_COMPLETE" } else { "CLUSTER_INCOMPLETE" },
        ] {
            let m =
                self.answer(msg, status).param("neighbors_count", count).param("live", h.live).param("known", h.known);
            out.push(Action::Deliver(conn, m));
        }
    }

    pub(super) fn clock_status(&self, conn: ConnId, msg: &Message, out: &mut Vec<Action>) {
        let command = if self.clock_stable() { "CLOCK_STABLE" } else { "CLOCK_UNSTABLE" };
        let m = self.answer(msg, command).param("max_offset_ms", self.max_offset_ms()).param("ntp", self.ntp_word());
        out.push(Action::Deliver(conn, m));
    }

    /// `FORGET` from a client: the named node is removed here and everywhere; a node this one
    /// does not know (or this node itself) is refused, so an operator's typo is never reported
    /// as done.
    pub(super) fn forget_request(&mut self, conn: ConnId, msg: &Message, target: ForgetTarget, out: &mut Vec<Action>) {
        let name = match target {
            ForgetTarget::Server(name) => name,
            ForgetTarget::Ip(ip) => {
                let known =
                    self.topology.known().iter().find(|(_, a)| a.as_str() == ip || a.starts_with(&format!("{ip}:")));
                match known {
                    Some((name, _)) => name.clone(),
                    None => {
                        let text = format!("no node known to this node was at {ip}; `nodus cluster status` lists them");
                        let e = self.error(msg, "unknown_node", &text).param("ip", ip);
                        return self.refuse(conn, msg, e, out);
                    }
                }
            }
        };
        if name == self.server {
            return self.invalid_request(conn, msg, "a node cannot forget itself: FORGET it from another node", out);
        }
        if self.forget(&name, None, out) {
            out.push(Action::Deliver(conn, self.answer(msg, "FORGOTTEN").param("server", name)));
        } else {
            let text = format!("no node named {name} is known to this node; `nodus cluster status` lists them");
            let e = self.error(msg, "unknown_node", &text).param("server", name);
            self.refuse(conn, msg, e, out);
        }
    }

    pub(super) fn cluster_info(&self, req: &Message, now: i64) -> Message {
        let h = self.topology.health();
        let nodes: Vec<NodeRow> = self
            .topology
            .known()
            .iter()
            .map(|(n, a)| NodeRow { server: n.clone(), addr: a.clone(), live: self.topology.is_live(n) })
            .collect();
        let links: Vec<LinkRow> = self
            .links
            .iter()
            .filter_map(|(peer, id)| {
                let Role::Link(l) = &self.conns.get(id)?.role else { return None };
                Some(LinkRow {
                    peer: peer.clone(),
                    rtt_ms: l.samples.back().map(|s| s.0),
                    offset_ms: Self::link_offset(l),
                    phi: l.detector.phi(now),
                })
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
            .param("nodes", rows::join_list(&nodes))
            .param("links", rows::join_list(&links))
    }

    /// Sends `msg` towards node `dest` over the next hop, stamped with what its sender may do.
    pub(super) fn forward(
        &mut self,
        origin: ConnId,
        mut msg: Message,
        perms: Permissions,
        dest: &str,
        now: i64,
        out: &mut Vec<Action>,
    ) {
        let link = self.topology.next_hop(dest).and_then(|hop| self.links.get(hop)).copied();
        match link {
            Some(link) if link != origin || msg.envelope.reply_to != 0 => {
                msg.to.server = dest.to_string();
                msg.envelope.hops += 1;
                msg.envelope.perms = perms;
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
        if self.topology.stage_local_apps(apps) {
            self.originate(out);
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

    /// Recomputes this node's links and services (routes follow at once); its record follows
    /// as [`Router::originate`] allows.
    fn local_changed(&mut self, out: &mut Vec<Action>) {
        let links: BTreeSet<String> = self.links.keys().cloned().collect();
        let services: BTreeSet<String> = self.services.keys().cloned().collect();
        if self.topology.stage_local(links, services) {
            self.originate(out);
        }
    }

    /// This node's record is behind what is true: a new version now, unless one was published
    /// less than [`MIN_RECORD_INTERVAL_MS`] ago; then one at the end of that interval, whatever
    /// changes until then.
    fn originate(&mut self, out: &mut Vec<Action>) {
        let now = self.clock;
        match self.published_at {
            // A clock that went back does not hold the record up.
            Some(at) if (0..MIN_RECORD_INTERVAL_MS).contains(&(now - at)) => {
                self.publish_due.get_or_insert(at + MIN_RECORD_INTERVAL_MS);
            }
            _ => self.publish(now, out),
        }
    }

    fn publish(&mut self, now: i64, out: &mut Vec<Action>) {
        self.publish_due = None;
        if self.topology.publish_local() {
            self.published_at = Some(now);
            self.to_flood.insert(self.server.clone(), Vec::new());
            self.pace_flood(now, out);
        }
    }

    /// Floods what waits now, unless a flood left less than [`FLOOD_PACE_MS`] ago; then when
    /// that has passed.
    fn pace_flood(&mut self, now: i64, out: &mut Vec<Action>) {
        if self.to_flood.is_empty() {
            return;
        }
        match self.flooded_at {
            Some(at) if (0..FLOOD_PACE_MS).contains(&(now - at)) => {
                self.flood_due.get_or_insert(at + FLOOD_PACE_MS);
            }
            _ => self.flood(now, out),
        }
    }

    /// The newest version of every record waiting to be passed on, one message per link, none
    /// to a link that sent it.
    fn flood(&mut self, now: i64, out: &mut Vec<Action>) {
        self.flood_due = None;
        let waiting = std::mem::take(&mut self.to_flood);
        if waiting.is_empty() {
            return;
        }
        self.flooded_at = Some(now);
        let mut all: Option<Message> = None;
        for id in self.links.values() {
            if waiting.values().any(|have| have.contains(id)) {
                let names = waiting.iter().filter(|(_, have)| !have.contains(id)).map(|(n, _)| n);
                let records = self.topology.records_of(names);
                if !records.is_empty() {
                    out.push(Action::Deliver(*id, self.gossip_message(&records)));
                }
            } else {
                let m = all.get_or_insert_with(|| self.gossip_message(&self.topology.records_of(waiting.keys())));
                out.push(Action::Deliver(*id, m.clone()));
            }
        }
    }

    /// What is due now: this node's coalesced record, the paced flood. The driver calls it at
    /// [`Router::flush_at`] (the tick calls it too). Something due further ahead than its
    /// interval is due now: the clock went back.
    pub fn flush(&mut self, now: i64, out: &mut Vec<Action>) {
        self.clock = now;
        if self.publish_due.is_some_and(|at| at <= now || at > now.saturating_add(MIN_RECORD_INTERVAL_MS)) {
            self.publish(now, out);
        }
        if self.flood_due.is_some_and(|at| at <= now || at > now.saturating_add(FLOOD_PACE_MS)) {
            self.flood(now, out);
        }
    }

    /// When [`Router::flush`] has something to do, if ever.
    pub fn flush_at(&self) -> Option<i64> {
        match (self.publish_due, self.flood_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn gossip_message(&self, records: &impl serde::Serialize) -> Message {
        let payload = rmp_serde::to_vec(records).unwrap_or_default();
        let mut m = LinkMsg::Gossip { records: payload.into() }.to_message();
        m.from = self.node_address();
        m
    }

    /// Every record this node holds, to one link (a new link, or a peer whose digest differs).
    fn send_gossip(&self, conn: ConnId, out: &mut Vec<Action>) {
        out.push(Action::Deliver(conn, self.gossip_message(self.topology.records())));
    }

    pub(super) fn save_nodes(&self, out: &mut Vec<Action>) {
        let nodes = self
            .topology
            .known()
            .iter()
            .filter(|(n, _)| **n != self.server)
            .map(|(n, a)| KnownNode { name: n.clone(), addr: a.clone(), neighbor: self.neighbors.contains(n) })
            .collect();
        out.push(Action::SaveNodes(nodes));
    }

    /// Forgets `name` here and tells every link but `except`; returns whether it was known.
    fn forget(&mut self, name: &str, except: Option<ConnId>, out: &mut Vec<Action>) -> bool {
        if !self.topology.forget(name) {
            return false;
        }
        self.neighbors.remove(name);
        let mut m = LinkMsg::Forget { server: name.to_string() }.to_message();
        m.from = self.node_address();
        for id in self.links.values() {
            if Some(*id) != except {
                out.push(Action::Deliver(*id, m.clone()));
            }
        }
        if let Some(id) = self.links.get(name).copied() {
            out.push(Action::Close(id));
        }
        self.to_flood.remove(name);
        self.save_nodes(out);
        self.health_changed(out);
        true
    }

    pub(super) fn shutdown_cluster(&mut self, except: Option<ConnId>, out: &mut Vec<Action>) {
        if self.quitting {
            return;
        }
        for id in self.links.values() {
            if Some(*id) != except {
                self.send_link(*id, &LinkMsg::Shutdown, out);
            }
        }
        out.push(Action::Shutdown);
    }

    /// Heartbeats, failure detection, periodic gossip, and handshakes past their deadline.
    pub(super) fn cluster_tick(&mut self, now: i64, out: &mut Vec<Action>) {
        self.ticks += 1;
        self.flush(now, out);
        // The known nodes are saved at most once a tick, off the path of every merge.
        if std::mem::take(&mut self.nodes_dirty) {
            self.save_nodes(out);
        }
        // A tick much later than its period means this node was stalled (overloaded, stopped):
        // the peers' silence over that time is this node's, not theirs.
        let period = super::ms(self.policy.heartbeat.min(std::time::Duration::from_millis(500)));
        let stalled = self.last_tick.map_or(0, |t| now - t - 2 * period);
        self.last_tick = Some(now);
        if stalled > 0 {
            tracing::debug!(stalled_ms = stalled, "this node was stalled: not counting it against its links");
            for id in self.links.values() {
                if let Some(Role::Link(l)) = self.conns.get_mut(id).map(|c| &mut c.role) {
                    l.detector.pause(stalled + period);
                }
            }
        }
        let deadline = super::ms(self.policy.handshake_timeout);
        let mut late = Vec::new();
        for (id, c) in self.conns.iter_mut() {
            if let Role::Pending(Handshake { since, .. }) = &mut c.role {
                let started = *since.get_or_insert(now);
                if now - started >= deadline {
                    late.push(*id);
                }
            }
        }
        for id in late {
            tracing::warn!(conn = id, "cluster connection did not complete its handshake in time: closing it");
            out.push(Action::Close(id));
            self.disconnect(id, out);
        }
        let mut dead = Vec::new();
        let ping = LinkMsg::Ping { t: now };
        let links: Vec<(String, ConnId)> = self.links.iter().map(|(p, id)| (p.clone(), *id)).collect();
        for (peer, id) in links {
            let Some(Role::Link(l)) = self.conns.get_mut(&id).map(|c| &mut c.role) else { continue };
            let phi = l.detector.phi(now);
            if phi > self.policy.failure_phi {
                tracing::warn!(peer = %peer, phi, "cluster link silent: declaring it dead");
                dead.push(id);
                continue;
            }
            if l.pings.len() == MAX_PINGS {
                l.pings.pop_front();
            }
            l.pings.push_back(now);
            self.send_link(id, &ping, out);
        }
        for id in dead {
            out.push(Action::Close(id));
            // Do not wait for the socket to notice: the link is gone for routing now, and the
            // requests it carried fail at once.
            self.disconnect(id, out);
        }
        if self.ticks.is_multiple_of(SUMMARY_EVERY_TICKS) && !self.links.is_empty() {
            let summary = LinkMsg::Summary {
                digest: format!("{:016x}", self.topology.digest()),
                records: self.topology.records().len() as u64,
            };
            for id in self.links.values() {
                self.send_link(*id, &summary, out);
            }
        }
    }

    pub(super) fn max_offset_ms(&self) -> i64 {
        self.links
            .values()
            .filter_map(|id| match &self.conns.get(id)?.role {
                Role::Link(l) => Self::link_offset(l),
                _ => None,
            })
            .map(i64::abs)
            .max()
            .unwrap_or(0)
    }

    pub(super) fn clock_stable(&self) -> bool {
        let ntp_ok = !(self.policy.clock_require_ntp && self.ntp == Some(false));
        ntp_ok && self.max_offset_ms() <= super::ms(self.policy.clock_threshold)
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
            if let Role::Client(cl) = &c.role {
                if cl.declared(command) {
                    out.push(Action::Deliver(*id, m.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
