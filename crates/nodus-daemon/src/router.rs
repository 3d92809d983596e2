//! The local router: the protocol core of a node. It owns the table of connections and registered
//! services, the request/reply correlation table and the message cache, and turns each input
//! (`connect`, `handle`, `handle_invalid`, `disconnect`, `tick`, `begin_shutdown`) into
//! [`Action`]s. It does no I/O and reads no clock: `now` (Unix milliseconds) is an argument.
//!
//! Invariants:
//! - a message's `from` is always stamped here, never taken from the client;
//! - an expired message (`expires_at <= now`) is never delivered; its sender gets `ERROR code=expired`;
//! - every request the router tracks ends in exactly one of: the reply, `ERROR code=disconnected`
//!   (responder gone) or `ERROR code=timeout`;
//! - all tables are bounded by [`RouterLimits`].

mod links;

use crate::auth::Origin;
use crate::cache::{Cache, CacheLimits};
use crate::detector::PhiDetector;
use crate::topology::{Health, Topology};
use nodus_wire::{Message, MessageError};
use std::collections::{BTreeMap, HashMap, HashSet};

/// Hasher for the router's integer keys. Every key (connection ids, node-assigned request ids)
/// is chosen by the node itself, never by a peer, so a fast unkeyed hash cannot be attacked.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

/// A map keyed by node-chosen integers.
pub type IdMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<IdHasher>>;

/// Identifies one client connection of this node.
pub type ConnId = u64;

/// The name under which the node itself answers (also reached with an empty service).
pub const NODE_SERVICE: &str = "node";

/// What the driver must do after an input.
// Messages are the hot path: boxing them would cost an allocation per routed message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Queue the message on the connection.
    Deliver(ConnId, Message),
    /// Close the connection once what is queued has been written.
    Close(ConnId),
    /// A client asked the node to stop: begin a graceful shutdown.
    Shutdown,
    /// The set of known nodes changed: persist it (name, address, was a direct neighbour).
    SaveNodes(Vec<(String, String, bool)>),
}

/// Bounds and timeouts of the router.
#[derive(Debug, Clone, Copy)]
pub struct RouterLimits {
    /// Cache bounds.
    pub cache: CacheLimits,
    /// Default cache TTL, ms.
    pub cache_default_ttl_ms: i64,
    /// Accepted cache TTL range, ms (values outside are clamped).
    pub cache_ttl_range_ms: (i64, i64),
    /// Most requests tracked for correlation.
    pub max_pending: usize,
    /// How long a request is tracked, ms.
    pub request_timeout_ms: i64,
}

impl RouterLimits {
    /// Limits from the node configuration.
    pub fn from_config(l: &crate::config::Limits) -> Self {
        RouterLimits {
            cache: CacheLimits { max_messages: l.cache_max_messages, max_bytes: l.cache_max_bytes },
            cache_default_ttl_ms: l.cache_default_ttl_secs as i64 * 1000,
            cache_ttl_range_ms: (l.cache_min_ttl_secs as i64 * 1000, l.cache_max_ttl_secs as i64 * 1000),
            max_pending: l.max_pending_requests,
            request_timeout_ms: l.request_timeout_secs as i64 * 1000,
        }
    }
}

/// Live counters, reported by `INFO`.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Messages accepted from clients.
    pub received: u64,
    /// Messages queued to clients.
    pub delivered: u64,
    /// Units rejected as `INVALID`.
    pub invalid: u64,
    /// Messages dropped because they had expired.
    pub expired: u64,
    /// Messages stored in the cache.
    pub cached: u64,
    /// Messages that could not be delivered nor cached.
    pub undeliverable: u64,
}

#[derive(Debug)]
struct Conn {
    /// Where the connection came from (the driver's facts).
    origin: Origin,
    service: Option<String>,
    commands: Option<HashSet<String>>,
    sniff: Option<SniffFilter>,
    in_flight: u32,
    /// Came in on a cluster listener or was dialed by this node: may only become a link.
    cluster: bool,
    /// This node dialed it.
    dialed: bool,
    /// Established link: the peer node and what we measure about it.
    link: Option<Link>,
    /// The UDP signal port: one-way, not a client connection.
    datagram: bool,
}

#[derive(Debug)]
struct Link {
    peer: String,
    detector: PhiDetector,
    rtt_ms: Option<i64>,
    offset_ms: Option<i64>,
    /// The peer said DISCONNECT: report HANGUP rather than DISCONNECTED.
    hung_up: bool,
}

impl Default for Conn {
    fn default() -> Self {
        Conn {
            origin: Origin::Internal,
            service: None,
            commands: None,
            sniff: None,
            in_flight: 0,
            cluster: false,
            dialed: false,
            link: None,
            datagram: false,
        }
    }
}

impl Conn {
    fn understands(&self, command: &str) -> bool {
        self.commands.as_ref().is_none_or(|c| c.contains(command))
    }

    /// Declared this command explicitly (used for notifications nobody asked for otherwise).
    fn declared(&self, command: &str) -> bool {
        self.service.is_some() && self.commands.as_ref().is_some_and(|c| c.contains(command))
    }
}

#[derive(Debug, Clone, Default)]
struct SniffFilter {
    service: Option<String>,
    command: Option<String>,
}

impl SniffFilter {
    fn matches(&self, m: &Message) -> bool {
        self.service.as_ref().is_none_or(|s| &m.to.service == s || &m.from.service == s)
            && self.command.as_ref().is_none_or(|c| &m.command == c)
    }
}

#[derive(Debug)]
struct Pending {
    origin: ConnId,
    /// The id the requester chose; restored in the reply's `reply_to`.
    origin_id: u64,
    deadline: i64,
    command: String,
}

/// The routing core of one node.
#[derive(Debug)]
pub struct Router {
    server: String,
    limits: RouterLimits,
    started_at: i64,
    conns: IdMap<ConnId, Conn>,
    services: BTreeMap<String, Vec<ConnId>>,
    pending: IdMap<(ConnId, u64), Pending>,
    cache: Cache,
    expected: HashSet<String>,
    sniffers: Vec<ConnId>,
    quitting: bool,
    rr: usize,
    next_id: u64,
    stats: Stats,
    cluster: crate::config::ClusterConfig,
    /// Address other nodes dial to reach this one (advertised in CONNECT, ACCEPT and gossip).
    cluster_addr: String,
    topology: Topology,
    /// Peer node → link connection.
    links: BTreeMap<String, ConnId>,
    /// Nodes this node ever had a direct link with (dialed again after a restart).
    neighbors: std::collections::BTreeSet<String>,
    last_health: Health,
    last_clock_stable: bool,
    ntp: Option<bool>,
    ticks: u64,
}

enum CacheMode {
    Cache { ttl_ms: i64 },
    No { reply: bool },
}

impl Router {
    /// A router for node `server` that caches messages for `expected` services.
    pub fn new(
        server: &str,
        expected: &[String],
        limits: RouterLimits,
        cluster: crate::config::ClusterConfig,
        cluster_addr: String,
        now: i64,
    ) -> Self {
        let topology = Topology::new(server, &cluster_addr, now);
        let last_health = topology.health();
        Router {
            cluster,
            cluster_addr,
            topology,
            links: BTreeMap::new(),
            neighbors: Default::default(),
            last_health,
            last_clock_stable: true,
            ntp: None,
            ticks: 0,
            server: server.to_string(),
            limits,
            started_at: now,
            conns: IdMap::default(),
            services: BTreeMap::new(),
            pending: IdMap::default(),
            cache: Cache::new(limits.cache),
            expected: expected.iter().cloned().collect(),
            sniffers: Vec::new(),
            quitting: false,
            rr: 0,
            next_id: 1,
            stats: Stats::default(),
        }
    }

    /// This node's server name.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Requests currently awaiting a reply.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Messages currently cached.
    pub fn cached_len(&self) -> usize {
        self.cache.len()
    }

    /// Instances of `service` registered on this node (0 when none).
    pub fn instances(&self, service: &str) -> usize {
        self.services.get(service).map_or(0, Vec::len)
    }

    /// Where connection `conn` came from, while it is open.
    pub fn origin(&self, conn: ConnId) -> Option<&Origin> {
        self.conns.get(&conn).map(|c| &c.origin)
    }

    /// True once a shutdown began.
    pub fn is_quitting(&self) -> bool {
        self.quitting
    }

    /// A new connection, with what the driver knows of where it came from. Connections from a
    /// cluster listener may only become links; a dialed one must go through [`Router::dial`].
    pub fn connect(&mut self, conn: ConnId, origin: Origin) {
        let c = Conn {
            cluster: origin.is_cluster(),
            dialed: matches!(origin, Origin::Dialed { .. }),
            datagram: origin == Origin::Datagram,
            origin,
            ..Conn::default()
        };
        self.conns.insert(conn, c);
    }

    /// Starts a graceful shutdown: new registrations and requests are answered `QUITTING`;
    /// replies to requests in flight are still routed.
    pub fn begin_shutdown(&mut self) {
        self.quitting = true;
    }

    /// Tells every connection the node is going away.
    pub fn farewell(&mut self, out: &mut Vec<Action>) {
        for (id, c) in self.conns.iter().filter(|(_, c)| !c.datagram) {
            let command = if c.link.is_some() { "DISCONNECT" } else { "QUITTING" };
            let mut m = Message::new(command);
            m.from = self.node_address();
            out.push(Action::Deliver(*id, m));
        }
    }

    /// A unit from `conn` that could not be decoded into a message.
    pub fn handle_invalid(&mut self, conn: ConnId, error: &MessageError, out: &mut Vec<Action>) {
        self.stats.invalid += 1;
        let mut m = Message::new("INVALID").param("message", error.to_string());
        m.from = self.node_address();
        out.push(Action::Deliver(conn, m));
    }

    /// A message from `conn`.
    pub fn handle(&mut self, conn: ConnId, mut msg: Message, now: i64, out: &mut Vec<Action>) {
        let Some(c) = self.conns.get(&conn) else { return };
        self.stats.received += 1;
        let from_link = c.link.is_some();
        if c.cluster && !from_link {
            return self.link_handshake(conn, msg, now, out);
        }
        if from_link {
            if self.link_control(conn, &msg, now, out) {
                return;
            }
            if msg.envelope.hops > self.cluster.max_hops {
                self.stats.undeliverable += 1;
                return;
            }
        } else {
            msg.from.server.clone_from(&self.server);
            match &c.service {
                Some(s) => msg.from.service.clone_from(s),
                None => msg.from.service.clear(),
            }
        }
        if msg.envelope.expires_at != 0 && msg.envelope.expires_at <= now {
            self.stats.expired += 1;
            let e = self.error(&msg, "expired", "the message expired before it could be delivered");
            out.push(Action::Deliver(conn, e));
            return;
        }
        if !self.sniffers.is_empty() {
            self.sniff(conn, &msg, out);
        }
        let reply_to = msg.envelope.reply_to;
        if reply_to != 0 {
            if let Some(p) = self.pending.remove(&(conn, reply_to)) {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.in_flight = c.in_flight.saturating_sub(1);
                }
                msg.envelope.reply_to = p.origin_id;
                if self.conns.contains_key(&p.origin) {
                    self.stats.delivered += 1;
                    out.push(Action::Deliver(p.origin, msg));
                }
                return;
            }
        }
        if self.quitting && reply_to == 0 {
            out.push(Action::Deliver(conn, self.answer(&msg, "QUITTING")));
            return;
        }
        match msg.to.server.as_str() {
            "" | "." => self.local(conn, msg, now, !from_link, out),
            "*" | "?" => {
                let everywhere = msg.to.server == "*";
                for node in self.topology.live_remotes() {
                    let mut copy = msg.clone();
                    copy.to.server = node.clone();
                    self.forward(conn, copy, &node, now, out);
                }
                if everywhere {
                    self.local(conn, msg, now, false, out);
                }
            }
            s if s == self.server => self.local(conn, msg, now, false, out),
            _ => {
                let dest = msg.to.server.clone();
                self.forward(conn, msg, &dest, now, out);
            }
        }
    }

    /// Delivery on this node; `anywhere` lets a service that is not registered here be found on
    /// the nearest node that has it.
    fn local(&mut self, conn: ConnId, msg: Message, now: i64, anywhere: bool, out: &mut Vec<Action>) {
        match msg.to.service.as_str() {
            "" | NODE_SERVICE | "communicatord" => {
                if msg.envelope.reply_to == 0 {
                    self.command(conn, msg, now, out);
                }
            }
            "*" | "." => self.broadcast(conn, msg, out),
            _ => self.route(conn, msg, now, anywhere, out),
        }
    }

    fn route(&mut self, origin: ConnId, msg: Message, now: i64, anywhere: bool, out: &mut Vec<Action>) {
        let target = match self.services.get(&msg.to.service) {
            Some(instances) if !instances.is_empty() => {
                self.rr = self.rr.wrapping_add(1);
                pick(self.rr, instances, &self.conns)
            }
            _ => {
                if anywhere {
                    if let Some(node) = self.topology.nearest_with(&msg.to.service).map(String::from) {
                        return self.forward(origin, msg, &node, now, out);
                    }
                }
                return self.absent(origin, msg, now, out);
            }
        };
        let t = &self.conns[&target];
        if !t.understands(&msg.command) {
            let reply = self.answer(&msg, "UNKNOWN").param("command", &msg.command);
            out.push(Action::Deliver(origin, reply));
            return;
        }
        self.deliver_tracked(origin, target, msg, now, out);
    }

    /// Delivers to `target`; a request (id set, not a reply) is tracked so its reply finds the way
    /// back. The target sees a node-unique id, so requests from different callers that happen to
    /// use the same id never collide; the caller's own id is restored on the reply.
    fn deliver_tracked(&mut self, origin: ConnId, target: ConnId, mut msg: Message, now: i64, out: &mut Vec<Action>) {
        let id = msg.envelope.id;
        if id != 0 && msg.envelope.reply_to == 0 && self.pending.len() < self.limits.max_pending {
            let deadline = match msg.envelope.expires_at {
                0 => now + self.limits.request_timeout_ms,
                e => e.min(now + self.limits.request_timeout_ms),
            };
            let local_id = self.next_id;
            self.next_id += 1;
            msg.envelope.id = local_id;
            let pending = Pending { origin, origin_id: id, deadline, command: msg.command.clone() };
            self.pending.insert((target, local_id), pending);
            if let Some(c) = self.conns.get_mut(&target) {
                c.in_flight += 1;
            }
        }
        self.stats.delivered += 1;
        out.push(Action::Deliver(target, msg));
    }

    fn broadcast(&mut self, origin: ConnId, msg: Message, out: &mut Vec<Action>) {
        for (id, c) in &self.conns {
            if *id != origin && c.service.is_some() && c.link.is_none() && c.understands(&msg.command) {
                self.stats.delivered += 1;
                out.push(Action::Deliver(*id, msg.clone()));
            }
        }
    }

    /// The destination service is not registered: cache, report or drop as the message asks.
    fn absent(&mut self, origin: ConnId, msg: Message, now: i64, out: &mut Vec<Action>) {
        let mode = self.cache_mode(&msg);
        let expected = self.expected.contains(&msg.to.service);
        match mode {
            CacheMode::Cache { ttl_ms } if expected => {
                let mut expires_at = now + ttl_ms;
                if msg.envelope.expires_at != 0 {
                    expires_at = expires_at.min(msg.envelope.expires_at);
                }
                let report = self.report(&msg, "cached");
                let service = msg.to.service.clone();
                if self.cache.push(&service, origin, msg.clone(), expires_at, now) {
                    self.stats.cached += 1;
                    if let Some(r) = report {
                        out.push(Action::Deliver(origin, r));
                    }
                } else {
                    self.undeliverable(origin, &msg, "cache_full", "the message cache is full".into(), out);
                }
            }
            CacheMode::No { reply: false } => {
                self.stats.undeliverable += 1;
                if let Some(r) = self.report(&msg, "failed") {
                    out.push(Action::Deliver(origin, r));
                }
            }
            _ => {
                let text = format!("service {:?} is not registered on {}", msg.to.service, self.server);
                self.undeliverable(origin, &msg, "unavailable", text, out);
            }
        }
    }

    fn undeliverable(&mut self, origin: ConnId, msg: &Message, why: &str, text: String, out: &mut Vec<Action>) {
        self.stats.undeliverable += 1;
        if let Some(r) = self.report(msg, "failed") {
            out.push(Action::Deliver(origin, r));
        }
        let m = self
            .answer(msg, "SERVICE_UNAVAILABLE")
            .param("destination_service", &msg.to.service)
            .param("command", &msg.command)
            .param("reason", why)
            .param("message", text);
        out.push(Action::Deliver(origin, m));
    }

    fn report(&self, msg: &Message, status: &str) -> Option<Message> {
        (msg.get("transmission_report") == Some("failure")).then(|| {
            self.answer(msg, "TRANSMISSION_REPORT")
                .param("status", status)
                .param("command", &msg.command)
                .param("destination_service", &msg.to.service)
        })
    }

    fn cache_mode(&self, msg: &Message) -> CacheMode {
        let mut ttl_ms = self.limits.cache_default_ttl_ms;
        let (mut no, mut reply) = (false, false);
        for opt in msg.get("cache").unwrap_or("").split(';').map(str::trim) {
            match opt {
                "no" => no = true,
                "reply" => reply = true,
                _ => {
                    if let Some(secs) = opt.strip_prefix("ttl=").and_then(|v| v.parse::<i64>().ok()) {
                        let (lo, hi) = self.limits.cache_ttl_range_ms;
                        ttl_ms = secs.saturating_mul(1000).clamp(lo, hi);
                    }
                }
            }
        }
        if no {
            CacheMode::No { reply }
        } else {
            CacheMode::Cache { ttl_ms }
        }
    }

    /// A command addressed to the node itself.
    fn command(&mut self, conn: ConnId, msg: Message, now: i64, out: &mut Vec<Action>) {
        let from_link = self.conns.get(&conn).is_some_and(|c| c.link.is_some());
        let remote_safe = matches!(
            msg.command.as_str(),
            "SERVICE_STATUS" | "LIST_SERVICES" | "INFO" | "PING" | "CLUSTER_STATUS" | "CLOCK_STATUS"
        );
        if from_link && !remote_safe {
            let reply = self.answer(&msg, "UNKNOWN").param("command", &msg.command);
            out.push(Action::Deliver(conn, reply));
            return;
        }
        if self.cluster_command(conn, &msg, now, out) {
            return;
        }
        match msg.command.as_str() {
            "REGISTER" => self.register(conn, &msg, now, out),
            "UNREGISTER" => self.unregister(conn, &msg, out),
            "COMMANDS" => {
                let list = msg.get("list").unwrap_or("");
                let set = list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.commands = Some(set);
                }
            }
            "SERVICE_STATUS" => {
                let Some(name) = msg.get("service") else {
                    return self.invalid_request(conn, &msg, "SERVICE_STATUS needs service=NAME", out);
                };
                let reply = self.status_message(name).with_reply_to(&msg);
                out.push(Action::Deliver(conn, reply));
            }
            "LIST_SERVICES" => {
                let list = self.services.keys().cloned().collect::<Vec<_>>().join(",");
                let mut reply = self.answer(&msg, "SERVICES").param("list", list);
                if msg.get("scope") == Some("cluster") {
                    reply = reply.param("cluster", self.cluster_services().join(","));
                }
                out.push(Action::Deliver(conn, reply));
            }
            "INFO" => {
                let s = &self.stats;
                let instances: usize = self.services.values().map(Vec::len).sum();
                let reply = self
                    .answer(&msg, "INFO")
                    .param("server", &self.server)
                    .param("version", env!("CARGO_PKG_VERSION"))
                    .param("uptime_ms", now - self.started_at)
                    .param("connections", self.conns.values().filter(|c| !c.datagram && c.link.is_none()).count())
                    .param("services", self.services.len())
                    .param("instances", instances)
                    .param("pending", self.pending.len())
                    .param("cached", self.cache.len())
                    .param("received", s.received)
                    .param("delivered", s.delivered)
                    .param("invalid", s.invalid)
                    .param("expired", s.expired)
                    .param("undeliverable", s.undeliverable)
                    .param("quitting", self.quitting)
                    .param("links", self.links.len())
                    .param("known_nodes", self.topology.health().known)
                    .param("live_nodes", self.topology.health().live);
                out.push(Action::Deliver(conn, reply));
            }
            "SNIFF" => {
                let filter = SniffFilter {
                    service: msg.get("service").map(String::from),
                    command: msg.get("command").map(String::from),
                };
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.sniff = Some(filter);
                    if !self.sniffers.contains(&conn) {
                        self.sniffers.push(conn);
                    }
                }
                out.push(Action::Deliver(conn, self.answer(&msg, "SNIFFING")));
            }
            "PING" => out.push(Action::Deliver(conn, self.answer(&msg, "PONG"))),
            "STOP" => {
                out.push(Action::Deliver(conn, self.answer(&msg, "STOPPING")));
                out.push(Action::Shutdown);
            }
            _ => {
                let reply = self.answer(&msg, "UNKNOWN").param("command", &msg.command);
                out.push(Action::Deliver(conn, reply));
            }
        }
    }

    fn register(&mut self, conn: ConnId, msg: &Message, now: i64, out: &mut Vec<Action>) {
        let Some(name) = msg.get("service") else {
            return self.invalid_request(conn, msg, "REGISTER needs service=NAME;version=1", out);
        };
        if msg.get("version") != Some("1") {
            return self.invalid_request(conn, msg, "REGISTER needs version=1 (the only protocol version)", out);
        }
        if name.is_empty()
            || !nodus_wire::valid_name(name)
            || name.contains(['*', '?'])
            || matches!(name, "." | NODE_SERVICE | "communicatord")
        {
            return self.invalid_request(conn, msg, &format!("{name:?} cannot be registered as a service name"), out);
        }
        if let Some(current) = self.conns.get(&conn).and_then(|c| c.service.clone()) {
            let text = format!("this connection is already registered as {current:?}; send UNREGISTER first");
            return self.invalid_request(conn, msg, &text, out);
        }
        let name = name.to_string();
        if let Some(c) = self.conns.get_mut(&conn) {
            c.service = Some(name.clone());
        }
        self.services.entry(name.clone()).or_default().push(conn);
        out.push(Action::Deliver(conn, self.answer(msg, "HELP")));
        out.push(Action::Deliver(conn, self.answer(msg, "READY").param("server", &self.server)));
        for (origin, cached) in self.cache.take(&name, now) {
            // Tracked like any delivery, so the reply to a cached request finds its caller.
            self.deliver_tracked(origin, conn, cached, now, out);
        }
        self.notify_status(&name, out);
        self.services_changed(out);
    }

    fn unregister(&mut self, conn: ConnId, msg: &Message, out: &mut Vec<Action>) {
        let name = self.conns.get_mut(&conn).and_then(|c| c.service.take());
        match name {
            Some(name) => {
                self.remove_instance(conn, &name);
                self.notify_status(&name, out);
                self.services_changed(out);
            }
            None => self.invalid_request(conn, msg, "UNREGISTER from a connection that is not registered", out),
        }
    }

    fn remove_instance(&mut self, conn: ConnId, name: &str) {
        if let Some(list) = self.services.get_mut(name) {
            list.retain(|c| *c != conn);
            if list.is_empty() {
                self.services.remove(name);
            }
        }
    }

    fn status_message(&self, name: &str) -> Message {
        let n = self.services.get(name).map_or(0, Vec::len);
        let mut m = Message::new("STATUS")
            .param("service", name)
            .param("server", &self.server)
            .param("status", if n > 0 { "up" } else { "down" })
            .param("instances", n);
        m.from = self.node_address();
        m
    }

    /// `STATUS` to every service that declared it understands `STATUS`.
    fn notify_status(&mut self, name: &str, out: &mut Vec<Action>) {
        let status = self.status_message(name);
        for (id, c) in &self.conns {
            if c.service.as_deref() != Some(name) && c.declared("STATUS") {
                out.push(Action::Deliver(*id, status.clone()));
            }
        }
    }

    fn sniff(&self, origin: ConnId, msg: &Message, out: &mut Vec<Action>) {
        for s in &self.sniffers {
            if *s != origin && self.conns.get(s).and_then(|c| c.sniff.as_ref()).is_some_and(|f| f.matches(msg)) {
                out.push(Action::Deliver(*s, msg.clone()));
            }
        }
    }

    /// A connection closed.
    pub fn disconnect(&mut self, conn: ConnId, out: &mut Vec<Action>) {
        let Some(c) = self.conns.remove(&conn) else { return };
        self.sniffers.retain(|s| *s != conn);
        if let Some(name) = c.service {
            self.remove_instance(conn, &name);
            self.notify_status(&name, out);
            self.services_changed(out);
        }
        if let Some(link) = c.link {
            self.link_lost(conn, link, out);
        }
        let mut failed = Vec::new();
        // Requests this connection was handling fail now. Requests it made stay tracked until
        // answered or timed out, so the responder's load stays right; their replies are dropped.
        self.pending.retain(|(responder, _), p| {
            if *responder == conn {
                failed.push((p.origin, p.origin_id, std::mem::take(&mut p.command)));
                false
            } else {
                true
            }
        });
        for (origin, id, command) in failed {
            let text = "the service handling the request disconnected before replying";
            self.fail_request(origin, id, "disconnected", command, text, out);
        }
    }

    /// Time passes: expire cached messages and tracked requests.
    pub fn tick(&mut self, now: i64, out: &mut Vec<Action>) {
        self.cluster_tick(now, out);
        self.cache.sweep(now);
        let mut timed_out = Vec::new();
        self.pending.retain(|(responder, _), p| {
            let keep = p.deadline > now;
            if !keep {
                timed_out.push((*responder, p.origin, p.origin_id, std::mem::take(&mut p.command)));
            }
            keep
        });
        for (responder, origin, id, command) in timed_out {
            if let Some(c) = self.conns.get_mut(&responder) {
                c.in_flight = c.in_flight.saturating_sub(1);
            }
            self.fail_request(origin, id, "timeout", command, "no reply arrived before the request timed out", out);
        }
    }

    /// Tells the caller of a tracked request that no reply will come.
    fn fail_request(&self, origin: ConnId, id: u64, code: &str, command: String, text: &str, out: &mut Vec<Action>) {
        if self.conns.contains_key(&origin) {
            let mut m = Message::new("ERROR").param("code", code).param("command", command).param("message", text);
            m.from = self.node_address();
            m.envelope.reply_to = id;
            out.push(Action::Deliver(origin, m));
        }
    }

    fn node_address(&self) -> nodus_wire::Address {
        nodus_wire::Address::new(&self.server, NODE_SERVICE)
    }

    /// A message from the node answering `req`.
    fn answer(&self, req: &Message, command: &str) -> Message {
        let mut m = req.reply(command);
        m.from = self.node_address();
        m
    }

    fn error(&self, req: &Message, code: &str, text: &str) -> Message {
        self.answer(req, "ERROR").param("code", code).param("command", &req.command).param("message", text)
    }

    fn invalid_request(&mut self, conn: ConnId, req: &Message, text: &str, out: &mut Vec<Action>) {
        self.stats.invalid += 1;
        let m = self.answer(req, "INVALID").param("command", &req.command).param("message", text);
        out.push(Action::Deliver(conn, m));
    }
}

trait ReplyTo {
    fn with_reply_to(self, req: &Message) -> Self;
}

impl ReplyTo for Message {
    fn with_reply_to(mut self, req: &Message) -> Self {
        self.envelope.reply_to = req.envelope.id;
        if !req.from.service.is_empty() {
            self.to = req.from.clone();
        }
        self
    }
}

/// Picks the least loaded instance, rotating the starting point among equals.
fn pick(rr: usize, instances: &[ConnId], conns: &IdMap<ConnId, Conn>) -> ConnId {
    let n = instances.len();
    let mut best = instances[rr % n];
    let mut best_load = conns[&best].in_flight;
    for i in 1..n {
        let id = instances[(rr + i) % n];
        let load = conns[&id].in_flight;
        if load < best_load {
            best = id;
            best_load = load;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    //! Deterministic tests of the routing core: no sockets, a virtual clock.
    use super::*;
    use crate::config::Config;

    fn router(expected: &[&str]) -> Router {
        let expected: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
        let config = Config::default();
        let limits = RouterLimits::from_config(&config.limits);
        Router::new("n1", &expected, limits, config.cluster.clone(), String::new(), 1_000)
    }

    fn delivered(out: &mut Vec<Action>) -> Vec<(ConnId, Message)> {
        out.drain(..)
            .filter_map(|a| match a {
                Action::Deliver(c, m) => Some((c, m)),
                _ => None,
            })
            .collect()
    }

    fn register(r: &mut Router, conn: ConnId, name: &str) {
        r.connect(conn, Origin::Internal);
        let mut out = Vec::new();
        r.handle(conn, Message::new("REGISTER").param("service", name).param("version", 1), 1_000, &mut out);
        let got: Vec<String> = delivered(&mut out).into_iter().map(|(_, m)| m.command).collect();
        assert_eq!(got[..2], ["HELP".to_string(), "READY".to_string()]);
    }

    #[test]
    fn request_timeout_answers_the_caller_once() {
        let mut r = router(&[]);
        register(&mut r, 1, "svc");
        r.connect(2, Origin::Internal);
        let mut out = Vec::new();
        r.handle(2, Message::new("ASK").to("svc").with_id(9), 1_000, &mut out);
        let got = delivered(&mut out);
        assert_eq!(got[0].0, 1);
        let seen_id = got[0].1.envelope.id;
        r.tick(1_000 + 299_999, &mut out);
        assert!(out.is_empty(), "not yet timed out");
        r.tick(1_000 + 300_000, &mut out);
        let got = delivered(&mut out);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0, got[0].1.command.as_str(), got[0].1.get("code")), (2, "ERROR", Some("timeout")));
        assert_eq!(got[0].1.envelope.reply_to, 9);
        // A late reply is dropped, not delivered as a second answer.
        r.handle(1, Message::new("ANSWER").with_id(1).tap_reply_to(seen_id), 400_000, &mut out);
        assert!(delivered(&mut out).is_empty());
        assert_eq!(r.pending_len(), 0);
    }

    #[test]
    fn equal_ids_from_different_callers_do_not_collide() {
        let mut r = router(&[]);
        register(&mut r, 1, "svc");
        r.connect(2, Origin::Internal);
        r.connect(3, Origin::Internal);
        let mut out = Vec::new();
        r.handle(2, Message::new("ASK").to("svc").with_id(5), 1_000, &mut out);
        r.handle(3, Message::new("ASK").to("svc").with_id(5), 1_000, &mut out);
        let seen: Vec<u64> = delivered(&mut out).iter().map(|(_, m)| m.envelope.id).collect();
        assert_ne!(seen[0], seen[1]);
        r.handle(1, Message::new("TWO").tap_reply_to(seen[1]), 1_000, &mut out);
        r.handle(1, Message::new("ONE").tap_reply_to(seen[0]), 1_000, &mut out);
        let got: Vec<(ConnId, String, u64)> =
            delivered(&mut out).into_iter().map(|(c, m)| (c, m.command, m.envelope.reply_to)).collect();
        assert_eq!(got, [(3, "TWO".to_string(), 5), (2, "ONE".to_string(), 5)]);
    }

    #[test]
    fn cached_message_expires_by_ttl_on_the_virtual_clock() {
        let mut r = router(&["later"]);
        r.connect(2, Origin::Internal);
        let mut out = Vec::new();
        r.handle(2, Message::new("A").to("later").param("cache", "ttl=10"), 1_000, &mut out);
        r.handle(2, Message::new("B").to("later").param("cache", "ttl=30"), 1_000, &mut out);
        assert!(out.is_empty());
        assert_eq!(r.cached_len(), 2);
        r.tick(1_000 + 10_000, &mut out);
        assert_eq!(r.cached_len(), 1);
        r.connect(1, Origin::Internal);
        r.handle(1, Message::new("REGISTER").param("service", "later").param("version", 1), 12_000, &mut out);
        let cmds: Vec<String> = delivered(&mut out).into_iter().map(|(_, m)| m.command).collect();
        assert_eq!(cmds, ["HELP", "READY", "B"]);
    }

    #[test]
    fn ttl_is_clamped_to_the_configured_range() {
        let mut r = router(&["later"]);
        r.connect(2, Origin::Internal);
        let mut out = Vec::new();
        r.handle(2, Message::new("A").to("later").param("cache", "ttl=1"), 0, &mut out);
        r.tick(9_999, &mut out);
        assert_eq!(r.cached_len(), 1, "ttl=1 is raised to the 10 s minimum");
        r.tick(10_000, &mut out);
        assert_eq!(r.cached_len(), 0);
    }

    #[test]
    fn least_loaded_instance_wins() {
        let mut r = router(&[]);
        register(&mut r, 1, "work");
        register(&mut r, 2, "work");
        r.connect(3, Origin::Internal);
        let mut out = Vec::new();
        let mut counts = HashMap::new();
        let mut at_one = Vec::new();
        for id in 1..=10 {
            r.handle(3, Message::new("JOB").to("work").with_id(id), 1_000, &mut out);
            for (c, m) in delivered(&mut out) {
                *counts.entry(c).or_insert(0) += 1;
                if c == 1 {
                    at_one.push(m.envelope.id);
                }
            }
        }
        assert_eq!((counts[&1], counts[&2]), (5, 5), "unanswered requests spread evenly");
        // Instance 1 answers everything; new work goes to it while 2 is still busy.
        for id in at_one {
            r.handle(1, Message::new("DONE").tap_reply_to(id), 1_000, &mut out);
        }
        out.clear();
        r.handle(3, Message::new("JOB").to("work").with_id(11), 1_000, &mut out);
        assert_eq!(delivered(&mut out)[0].0, 1);
    }

    #[test]
    fn sender_is_stamped_and_expired_messages_are_refused() {
        let mut r = router(&[]);
        register(&mut r, 1, "svc");
        register(&mut r, 2, "me");
        let mut out = Vec::new();
        let mut m = Message::new("HI").to("svc");
        m.from = nodus_wire::Address::new("evil", "spoof");
        r.handle(2, m, 1_000, &mut out);
        let got = delivered(&mut out);
        assert_eq!(got[0].1.from, nodus_wire::Address::new("n1", "me"));
        let mut m = Message::new("OLD").to("svc").with_id(4);
        m.envelope.expires_at = 1_000;
        r.handle(2, m, 1_000, &mut out);
        let got = delivered(&mut out);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0, got[0].1.get("code")), (2, Some("expired")));
    }

    #[test]
    fn shutdown_refuses_new_requests_but_routes_replies() {
        let mut r = router(&[]);
        register(&mut r, 1, "svc");
        r.connect(2, Origin::Internal);
        let mut out = Vec::new();
        r.handle(2, Message::new("ASK").to("svc").with_id(1), 1_000, &mut out);
        let seen_id = delivered(&mut out)[0].1.envelope.id;
        r.begin_shutdown();
        r.handle(2, Message::new("ASK").to("svc").with_id(2), 1_000, &mut out);
        assert_eq!(delivered(&mut out)[0].1.command, "QUITTING");
        r.handle(1, Message::new("ANSWER").tap_reply_to(seen_id), 1_000, &mut out);
        let got = delivered(&mut out);
        assert_eq!((got[0].0, got[0].1.command.as_str(), got[0].1.envelope.reply_to), (2, "ANSWER", 1));
        assert_eq!(r.pending_len(), 0);
    }

    trait TapReply {
        fn tap_reply_to(self, id: u64) -> Self;
    }

    impl TapReply for Message {
        fn tap_reply_to(mut self, id: u64) -> Self {
            self.envelope.reply_to = id;
            self
        }
    }
}
