//! The local router: the protocol core of a node. It owns the table of connections and registered
//! services, the request/reply correlation table and the message cache, and turns each input
//! into [`Action`]s. It does no I/O and reads no clock: `now` (Unix milliseconds) is an argument.
//!
//! # Driving the router
//!
//! The driver owns the sockets and one `Router` behind a lock; it calls, for each event:
//! - a connection opened: [`Router::connect`] (or [`Router::dial`] for a link this node dialed);
//! - a unit decoded: [`Router::handle`] for a message, [`Router::handle_invalid`] for garbage;
//! - a connection closed (EOF, error, slow consumer cut, `Close` done): [`Router::disconnect`];
//! - every tick (at most `heartbeat_ms`, ≤ 500 ms): [`Router::tick`] with the current time;
//! - at [`Router::flush_at`], when it says: [`Router::flush`] (this node's rate-limited record
//!   versions and paced floods; `tick` flushes too, so a late flush only delays them);
//! - a built-in service attached: `connect` with [`Origin::Internal`], `REGISTER`, then
//!   [`Router::declare_commands`];
//! - the cache journal (when `durable_cache`): on [`Action::PersistCache`], take the ops with
//!   [`Router::take_cache_journal`], make them durable off the lock, then report with
//!   [`Router::cache_durable`];
//! - shutdown: [`Router::begin_shutdown`], wait for [`Router::pending_len`] to reach 0 (or a
//!   grace period), then [`Router::farewell`].
//!
//! After every call the driver applies the returned actions in order, before the next call:
//! `Deliver` into the target's bounded queue (a full queue cuts that connection, which the
//! driver reports with `disconnect`), `Offer` likewise unless [`Pressure::offer`] says the
//! service's queue is past its soft mark or the sender's share (the driver then reports it with
//! [`Router::overloaded`], and cuts a service that stopped reading), `Close` after what is
//! queued is written, `Shutdown`,
//! `SaveNodes` and `PersistCache` to their tasks. The router never waits for an action.
//!
//! # Who may do what
//!
//! Every message gets its effective [`Permissions`] once, in [`Router::handle`]: a client's
//! from its principal ([`AccessPolicy`]); a datagram's is `send` only; a message forwarded by
//! another node carries what its origin node stamped, trusted only from an authenticated link
//! (capped at `[access] anonymous` otherwise, and without `admin` unless the origin node is in
//! `[cluster] admin_nodes`). They meet the command at one place, [`Router::admit`], whatever the
//! target: a node request, a built-in service's command, a service or a broadcast.
//!
//! Invariants:
//! - a message's `from` is always stamped here, never taken from a client; `hops` starts at 0
//!   on the first node; a link may not speak for this node nor for a neighbour linked directly;
//! - an expired message (`expires_at <= now`) is never delivered; its sender gets `ERROR code=expired`;
//! - every request the router tracks ends in exactly one of: the reply, `ERROR code=disconnected`
//!   (responder gone), `ERROR code=timeout` or `ERROR code=too_large`; a request it cannot
//!   track (table full for the node or the client) is refused, never delivered untracked;
//! - every accepted message is delivered, cached, or its sender gets an error; a message a busy
//!   service refuses ([`Router::overloaded`]) gets `ERROR code=overloaded` (requests; one-way
//!   messages get their `failed` transmission report when they asked for one) and is counted;
//! - errors, reports and replies are never answered with an error ([`answerable`]);
//! - all tables are bounded by [`RouterLimits`], [`LinkPolicy`] and [`MAX_OWNED_NAMES`].

mod links;
mod pressure;
pub mod sim;
mod view;

use crate::auth::{AccessPolicy, Origin, Principal};
use crate::cache::{Cache, CacheLimits, Stored};
use crate::detector::PhiDetector;
use crate::topology::{Health, KnownNode, RecordKey, Topology};
use nodus_control::expiry::{self, is_expired};
use nodus_wire::node::{answerable, NodeRequest, Permission, Permissions, RequestError};
use nodus_wire::{binary, Message, MessageError};
use rand::SeedableRng;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Duration;

pub use links::{FLOOD_PACE_MS, MIN_RECORD_INTERVAL_MS};
pub use nodus_wire::node::NODE_SERVICE;
pub use pressure::{Pressure, Queue, Verdict};
pub use view::{LinkState, NodeState, OwnLink, RouterView, ServiceState};

/// A map keyed by node-chosen integers (connection ids, node-assigned request ids): every key is
/// chosen by the node itself, never by a peer, so a fast unkeyed hash cannot be attacked.
pub type IdMap<K, V> = HashMap<K, V, rustc_hash::FxBuildHasher>;

/// Identifies one client connection of this node.
pub type ConnId = u64;

/// Stands for the sender of a cached message restored after a restart: no such connection exists.
const GONE: ConnId = ConnId::MAX;

/// Most service names whose owner the router remembers (a name keeps its owner after its last
/// instance leaves, so nobody else can take it over while its service restarts).
pub const MAX_OWNED_NAMES: usize = 65_536;

/// Most answers held behind `cached` reports that wait for the disk (past it, answers go out at
/// once, out of order with a report still waiting).
const MAX_HELD: usize = 65_536;

/// Failed `AUTH` attempts after which the node closes the connection.
const MAX_AUTH_FAILURES: u8 = 3;

/// What the driver must do after an input.
// Messages are the hot path: boxing them would cost an allocation per routed message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Queue the message on the connection.
    Deliver(ConnId, Message),
    /// Queue a message from connection `from` on the registered service `to`, unless the
    /// service is too far behind ([`Pressure::offer`]); a refused offer is reported with
    /// [`Router::overloaded`].
    Offer {
        /// The service's connection.
        to: ConnId,
        /// The connection the message came from (a client, a link or a built-in service).
        from: ConnId,
        /// The message, as the service will see it.
        msg: Message,
    },
    /// Close the connection once what is queued has been written.
    Close(ConnId),
    /// A client asked the node to stop: begin a graceful shutdown.
    Shutdown,
    /// The set of known nodes changed: persist it.
    SaveNodes(Vec<KnownNode>),
    /// The cache journal has ops to make durable ([`Router::take_cache_journal`]).
    PersistCache,
}

/// One change to the cache, to be made durable in order.
#[derive(Debug, Clone, PartialEq)]
pub enum CacheOp {
    /// An entry was cached.
    Put(Box<Stored>),
    /// The entry with this number left the cache (delivered or expired).
    Remove(u64),
}

/// Bounds and timeouts of the router.
#[derive(Debug, Clone, Copy)]
pub struct RouterLimits {
    /// Cache bounds.
    pub cache: CacheLimits,
    /// Default cache TTL.
    pub cache_default_ttl: Duration,
    /// Accepted cache TTL range (values outside are clamped).
    pub cache_ttl_range: (Duration, Duration),
    /// Most requests tracked for correlation, all connections together.
    pub max_pending: usize,
    /// Most requests one client connection may have tracked.
    pub max_pending_per_client: usize,
    /// How long a request is tracked.
    pub request_timeout: Duration,
    /// Largest frame a message may take on the wire (checked before delivery and forwarding).
    pub max_frame: usize,
}

impl RouterLimits {
    /// Limits from the node configuration.
    pub fn from_config(l: &crate::config::Limits) -> Self {
        let secs = Duration::from_secs;
        RouterLimits {
            cache: CacheLimits { max_messages: l.cache_max_messages, max_bytes: l.cache_max_bytes },
            cache_default_ttl: secs(l.cache_default_ttl_secs),
            cache_ttl_range: (secs(l.cache_min_ttl_secs), secs(l.cache_max_ttl_secs)),
            max_pending: l.max_pending_requests,
            // When a responder goes, each of its callers gets one error per request at once: they
            // must fit the caller's own queue, with room to spare.
            max_pending_per_client: l.max_pending_per_client.min(l.max_outbound_messages / 2).max(1),
            request_timeout: secs(l.request_timeout_secs),
            max_frame: l.max_frame_bytes,
        }
    }
}

/// How this node treats cluster links: what the core needs of the `[cluster]` configuration.
#[derive(Debug, Clone)]
pub struct LinkPolicy {
    /// The cluster secret (empty: none; links are then authenticated only by TLS, if at all).
    pub secret: String,
    /// Heartbeat period.
    pub heartbeat: Duration,
    /// Phi threshold of the failure detector.
    pub failure_phi: f64,
    /// Clock offset past which the clock is unstable.
    pub clock_threshold: Duration,
    /// An unsynchronised system clock makes the clock unstable.
    pub clock_require_ntp: bool,
    /// Hop limit.
    pub max_hops: u32,
    /// Most links.
    pub max_links: usize,
    /// Most nodes known.
    pub max_nodes: usize,
    /// How long `CONNECT`/`ACCEPT`(/`CONFIRM`) may take.
    pub handshake_timeout: Duration,
    /// Nodes whose cluster-wide commands are obeyed; `"*"`: any node on an authenticated link.
    pub admin_nodes: Vec<String>,
}

impl LinkPolicy {
    /// The policy of the node's configuration (`[cluster]`, and `[limits] handshake_timeout_ms`).
    pub fn from_config(config: &crate::config::Config) -> Self {
        let c = &config.cluster;
        LinkPolicy {
            secret: c.secret.clone(),
            heartbeat: Duration::from_millis(c.heartbeat_ms),
            failure_phi: c.failure_phi,
            clock_threshold: Duration::from_millis(c.clock_threshold_ms.max(0) as u64),
            clock_require_ntp: c.clock_require_ntp,
            max_hops: c.max_hops,
            max_links: c.max_links,
            max_nodes: c.max_nodes,
            handshake_timeout: config.handshake_timeout(),
            admin_nodes: c.admin_nodes.clone(),
        }
    }

    /// True when `node` may shut the cluster down, forget nodes and use `admin` here (asked
    /// only for nodes on authenticated links).
    pub fn admin_node(&self, node: &str) -> bool {
        self.admin_nodes.iter().any(|n| n == "*" || n == node)
    }
}

/// Everything a router is built from.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// This node's server name.
    pub server: String,
    /// Services whose messages are cached until they register.
    pub expected: Vec<String>,
    /// Bounds and timeouts.
    pub limits: RouterLimits,
    /// Cluster links.
    pub links: LinkPolicy,
    /// Principals and permissions.
    pub access: AccessPolicy,
    /// Address other nodes dial to reach this one (advertised in the handshake and gossip).
    pub cluster_addr: String,
    /// Cached messages are journaled ([`Action::PersistCache`]) and `cached` is reported only
    /// once the driver says the entry is durable. Without, `cached` is reported at once.
    pub durable_cache: bool,
    /// Seeds the generator of handshake nonces (from the OS in the driver, fixed in tests).
    pub seed: u64,
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
    /// Requests refused for lack of a permission.
    pub forbidden: u64,
    /// Messages from links dropped because their sender could not have sent them that way, and
    /// messages over UDP that were not signals to services.
    pub refused: u64,
    /// Messages a busy service's queue refused (`ERROR code=overloaded`).
    pub overloaded: u64,
}

#[derive(Debug)]
struct Conn {
    /// Where the connection came from (the driver's facts).
    origin: Origin,
    role: Role,
    /// Requests this connection is handling (as a responder).
    in_flight: u32,
    /// Requests this connection made that are tracked (as a caller).
    outstanding: u32,
}

/// What a connection is; each variant holds only what means something for it.
#[derive(Debug)]
enum Role {
    /// A local program (or a built-in service): may register, send, request, sniff.
    Client(Client),
    /// The UDP signal port: one way, signals to services only.
    Datagram,
    /// A cluster connection before its handshake completed; closed past the deadline.
    Pending(Handshake),
    /// An established link to another node.
    Link(Link),
}

#[derive(Debug)]
struct Client {
    principal: Principal,
    perms: Permissions,
    service: Option<String>,
    /// Commands it understands (`None`: everything).
    commands: Option<HashSet<String>>,
    /// For built-in services: the permission each command needs (others need `send`).
    needs: HashMap<String, Permission>,
    sniff: Option<SniffFilter>,
    auth_failures: u8,
    /// Where it stands in the component tree, once registered.
    component: Option<Registration>,
}

/// A registered service instance as a component (seed 000): its id, what started it, since when.
#[derive(Debug, Clone)]
struct Registration {
    id: u64,
    pid: u64,
    parent_node: Option<String>,
    since: i64,
}

/// A registered service instance, as the control plane sees it ([`Router::registered`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// Its connection.
    pub conn: ConnId,
    /// The service name.
    pub service: String,
    /// A built-in service of the node (or an app's bridge).
    pub internal: bool,
    /// Its component id (announced in `READY component=`).
    pub component: u64,
    /// The component that started it (`_pid` of its `REGISTER`; 0: none, the node).
    pub pid: u64,
    /// The node its parent runs on, when it said (`parent_node=` of its `REGISTER`).
    pub parent_node: Option<String>,
    /// When it registered, Unix ms.
    pub since: i64,
    /// Requests it is handling.
    pub in_flight: u32,
}

/// Why [`Router::deliver_to`] did not deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliverError {
    /// The connection is gone, or is not a registered service.
    Gone,
    /// The service declared its commands, and this is not one of them.
    NotUnderstood,
    /// Too large, or too many requests tracked.
    Refused,
}

impl Client {
    fn understands(&self, command: &str) -> bool {
        self.commands.as_ref().is_none_or(|c| c.contains(command))
    }

    /// Declared this command explicitly (used for notifications nobody asked for otherwise).
    fn declared(&self, command: &str) -> bool {
        self.service.is_some() && self.commands.as_ref().is_some_and(|c| c.contains(command))
    }

    fn need(&self, command: &str) -> Permission {
        self.needs.get(command).copied().unwrap_or(Permission::Send)
    }
}

#[derive(Debug)]
struct Handshake {
    /// This node dialed it.
    dialed: bool,
    /// First seen by a tick (the deadline counts from there).
    since: Option<i64>,
    /// The nonce this node sent (CONNECT or ACCEPT).
    nonce: String,
    /// Listener side with a secret: ACCEPT sent, waiting for the dialer's CONFIRM.
    awaiting: Option<Awaiting>,
}

#[derive(Debug)]
struct Awaiting {
    peer: String,
    addr: String,
    their_nonce: String,
}

#[derive(Debug)]
struct Link {
    peer: String,
    dialed: bool,
    /// The peer proved it holds the cluster secret, or the connection is verified TLS.
    authenticated: bool,
    detector: PhiDetector,
    /// Times of pings sent and not yet answered (bounded).
    pings: VecDeque<i64>,
    /// Recent (round trip, offset) samples, ms (bounded).
    samples: VecDeque<(i64, i64)>,
    /// The peer said DISCONNECT: report HANGUP rather than DISCONNECTED.
    hung_up: bool,
    /// The tick at which this node last sent the peer every record it holds.
    synced_tick: u64,
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
    /// The deadline is the request's own `_expires_at` (earlier than the request timeout).
    expires: bool,
    command: String,
}

/// The routing core of one node.
#[derive(Debug)]
pub struct Router {
    server: String,
    limits: RouterLimits,
    policy: LinkPolicy,
    access: AccessPolicy,
    started_at: i64,
    conns: IdMap<ConnId, Conn>,
    services: BTreeMap<String, Vec<ConnId>>,
    /// Service name → the principal that registered it first.
    owners: HashMap<String, Principal>,
    pending: IdMap<(ConnId, u64), Pending>,
    cache: Cache,
    expected: HashSet<String>,
    sniffers: Vec<ConnId>,
    quitting: bool,
    rr: usize,
    next_id: u64,
    stats: Stats,
    /// Address other nodes dial to reach this one (advertised in CONNECT, ACCEPT and gossip).
    cluster_addr: String,
    link_key: links::LinkKey,
    topology: Topology,
    /// Peer node → link connection.
    links: BTreeMap<String, ConnId>,
    /// Nodes this node ever had a direct link with (dialed again after a restart).
    neighbors: BTreeSet<String>,
    last_health: Health,
    last_clock_stable: bool,
    ntp: Option<bool>,
    ticks: u64,
    /// When the last tick ran (how late this one is says how stalled this node was).
    last_tick: Option<i64>,
    /// The time this router was last told (calls without a `now` use it).
    clock: i64,
    /// When this node last published a version of its own record.
    published_at: Option<i64>,
    /// When the coalesced next version of this node's record is due.
    publish_due: Option<i64>,
    /// Records to pass on at the next flood: name → the links that already hold its newest
    /// version (it came from them: not sent back). Bounded by the nodes known (`max_nodes`)
    /// and the links (`max_links`).
    to_flood: BTreeMap<String, Vec<ConnId>>,
    /// When the last flood went out.
    flooded_at: Option<i64>,
    /// When the paced next flood is due.
    flood_due: Option<i64>,
    /// The known nodes changed since they were last handed out to be saved.
    nodes_dirty: bool,
    rng: rand::rngs::StdRng,
    durable_cache: bool,
    /// Cache ops not yet taken by the persistence task (bounded by the cache bounds).
    journal: Vec<CacheOp>,
    /// `cached` reports held until their entry is durable: (entry, sender, report).
    awaiting_durable: Vec<(u64, ConnId, Message)>,
}

enum CacheMode {
    Cache { ttl_ms: i64 },
    No { reply: bool },
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Router {
    /// A router for node `config.server`, started at `now`.
    pub fn new(config: RouterConfig, now: i64) -> Self {
        let key = RecordKey::from_secret(&config.links.secret);
        let topology = Topology::new(&config.server, &config.cluster_addr, now, key, config.links.max_nodes);
        let last_health = topology.health();
        let link_key = links::LinkKey::from_secret(&config.links.secret);
        Router {
            server: config.server,
            limits: config.limits,
            policy: config.links,
            access: config.access,
            started_at: now,
            conns: IdMap::default(),
            services: BTreeMap::new(),
            owners: HashMap::new(),
            pending: IdMap::default(),
            cache: Cache::new(config.limits.cache),
            expected: config.expected.into_iter().collect(),
            sniffers: Vec::new(),
            quitting: false,
            rr: 0,
            next_id: 1,
            stats: Stats::default(),
            cluster_addr: config.cluster_addr,
            link_key,
            topology,
            links: BTreeMap::new(),
            neighbors: BTreeSet::new(),
            last_health,
            last_clock_stable: true,
            ntp: None,
            ticks: 0,
            last_tick: None,
            clock: now,
            published_at: None,
            publish_due: None,
            to_flood: BTreeMap::new(),
            flooded_at: None,
            flood_due: None,
            nodes_dirty: false,
            rng: rand::rngs::StdRng::seed_from_u64(config.seed),
            durable_cache: config.durable_cache,
            journal: Vec::new(),
            awaiting_durable: Vec::new(),
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

    /// Every registered service instance on this node, by connection.
    pub fn registered(&self) -> Vec<Registered> {
        let mut all: Vec<Registered> = self
            .conns
            .iter()
            .filter_map(|(conn, c)| {
                let Role::Client(cl) = &c.role else { return None };
                let (service, reg) = (cl.service.as_ref()?, cl.component.as_ref()?);
                Some(Registered {
                    conn: *conn,
                    service: service.clone(),
                    internal: cl.principal == Principal::Internal,
                    component: reg.id,
                    pid: reg.pid,
                    parent_node: reg.parent_node.clone(),
                    since: reg.since,
                    in_flight: c.in_flight,
                })
            })
            .collect();
        all.sort_by_key(|r| r.conn);
        all
    }

    /// Delivers `msg` from connection `origin` (an in-process service of the node: the control
    /// plane) to the service instance on connection `target`, not to whichever instance of its
    /// service the balancer would pick. A request is tracked like any other, so its reply (or the
    /// node's `ERROR code=timeout|expired|disconnected`) comes back to `origin`.
    ///
    /// Fails when `target` is not a registered service, does not take the command (its
    /// `COMMANDS`), or the message cannot be tracked or is too large.
    pub fn deliver_to(
        &mut self,
        origin: ConnId,
        target: ConnId,
        mut msg: Message,
        now: i64,
        out: &mut Vec<Action>,
    ) -> Result<(), DeliverError> {
        let service = match self.conns.get(&origin).map(|c| &c.role) {
            Some(Role::Client(c)) => c.service.clone(),
            _ => return Err(DeliverError::Gone),
        };
        let Some(Role::Client(t)) = self.conns.get(&target).map(|c| &c.role) else { return Err(DeliverError::Gone) };
        let Some(name) = t.service.clone() else { return Err(DeliverError::Gone) };
        if !t.understands(&msg.command) {
            return Err(DeliverError::NotUnderstood);
        }
        self.stamp_sender(&mut msg, service);
        msg.to = nodus_wire::Address::new(&self.server, &name);
        if self.deliver_tracked(origin, target, msg, now, out) {
            Ok(())
        } else {
            Err(DeliverError::Refused)
        }
    }

    /// The other nodes reachable now.
    pub fn live_nodes(&self) -> Vec<String> {
        self.topology.live_remotes()
    }

    /// The other nodes known but not reachable now.
    pub fn unreachable_nodes(&self) -> Vec<String> {
        self.topology
            .known()
            .keys()
            .filter(|n| n.as_str() != self.server && !self.topology.is_live(n))
            .cloned()
            .collect()
    }

    /// Where connection `conn` came from, while it is open.
    pub fn origin(&self, conn: ConnId) -> Option<&Origin> {
        self.conns.get(&conn).map(|c| &c.origin)
    }

    /// True once a shutdown began.
    pub fn is_quitting(&self) -> bool {
        self.quitting
    }

    /// A new connection, with what the driver knows of where it came from. A client gets its
    /// principal from `origin`; connections from a cluster listener may only become links; a
    /// dialed one must go through [`Router::dial`].
    pub fn connect(&mut self, conn: ConnId, origin: Origin) {
        let role = match &origin {
            Origin::Datagram => Role::Datagram,
            Origin::Cluster { .. } | Origin::Dialed { .. } => Role::Pending(Handshake {
                dialed: matches!(origin, Origin::Dialed { .. }),
                since: None,
                nonce: self.nonce(),
                awaiting: None,
            }),
            Origin::Internal | Origin::Unix { .. } | Origin::Tcp { .. } => {
                let principal = self.access.principal(&origin);
                let perms = self.access.permissions(&principal);
                Role::Client(Client {
                    principal,
                    perms,
                    service: None,
                    commands: None,
                    needs: HashMap::new(),
                    sniff: None,
                    auth_failures: 0,
                    component: None,
                })
            }
        };
        self.conns.insert(conn, Conn { origin, role, in_flight: 0, outstanding: 0 });
    }

    /// A built-in service declares its commands and the permission each needs; others are
    /// answered `UNKNOWN`. Every message delivered to it is checked against these.
    pub fn declare_commands(&mut self, conn: ConnId, commands: &[(&str, Permission)]) {
        if let Some(Role::Client(c)) = self.conns.get_mut(&conn).map(|c| &mut c.role) {
            c.commands = Some(commands.iter().map(|(n, _)| n.to_string()).collect());
            c.needs = commands.iter().map(|(n, p)| (n.to_string(), *p)).collect();
        }
    }

    /// Starts a graceful shutdown: new registrations and requests are answered `QUITTING`;
    /// replies to requests in flight are still routed.
    pub fn begin_shutdown(&mut self) {
        self.quitting = true;
    }

    /// Tells every connection the node is going away.
    pub fn farewell(&mut self, out: &mut Vec<Action>) {
        if std::mem::take(&mut self.nodes_dirty) {
            self.save_nodes(out);
        }
        for (id, c) in &self.conns {
            let command = match c.role {
                Role::Datagram => continue,
                Role::Link(_) => "DISCONNECT",
                Role::Client(_) | Role::Pending(_) => "QUITTING",
            };
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
    pub fn handle(&mut self, conn: ConnId, msg: Message, now: i64, out: &mut Vec<Action>) {
        self.clock = now;
        let start = out.len();
        self.handle_message(conn, msg, now, out);
        if !self.awaiting_durable.is_empty() {
            self.hold_behind_reports(conn, start, out);
        }
    }

    /// A connection that waits for a `cached` report gets what the node answers it afterwards
    /// after that report, as it would have without the wait: answers to one connection keep the
    /// order of its messages (a client may send `PING` and take the `PONG` as a barrier).
    fn hold_behind_reports(&mut self, conn: ConnId, start: usize, out: &mut Vec<Action>) {
        let Some(seq) = self.awaiting_durable.iter().filter(|(_, c, _)| *c == conn).map(|(s, _, _)| *s).max() else {
            return;
        };
        let mut i = start;
        while i < out.len() && self.awaiting_durable.len() < MAX_HELD {
            match out.remove(i) {
                Action::Deliver(c, m) if c == conn => self.awaiting_durable.push((seq, conn, m)),
                other => {
                    out.insert(i, other);
                    i += 1;
                }
            }
        }
    }

    fn handle_message(&mut self, conn: ConnId, mut msg: Message, now: i64, out: &mut Vec<Action>) {
        let Some(c) = self.conns.get(&conn) else { return };
        self.stats.received += 1;
        let perms = match &c.role {
            Role::Pending(_) => return self.link_handshake(conn, msg, now, out),
            Role::Link(_) => {
                let Some(perms) = self.link_traffic(conn, &msg, now, out) else { return };
                if msg.envelope.hops > self.policy.max_hops {
                    let text = format!("the message passed {} nodes (max_hops)", self.policy.max_hops);
                    return self.undeliverable(conn, &msg, "hop_limit", text, out);
                }
                perms
            }
            Role::Datagram => {
                // Signals to services only: no node commands, no registration, nothing to answer.
                if matches!(msg.to.service.as_str(), "" | NODE_SERVICE | "communicatord") {
                    self.stats.refused += 1;
                    return;
                }
                msg.envelope.id = 0;
                msg.envelope.reply_to = 0;
                self.stamp_sender(&mut msg, None);
                Permissions::of(&[Permission::Send])
            }
            Role::Client(cl) => {
                let (service, perms) = (cl.service.clone(), cl.perms);
                self.stamp_sender(&mut msg, service);
                perms
            }
        };
        msg.envelope.perms = Permissions::NONE;
        if is_expired(msg.envelope.expires_at, now) {
            self.stats.expired += 1;
            let place = format!("the router of node {}", self.server);
            if let Some(mut e) = expiry::expired_reply(&msg, now, &place) {
                e.from = self.node_address();
                self.refuse(conn, &msg, e, out);
            }
            return;
        }
        if !self.sniffers.is_empty() {
            self.sniff(conn, &msg, out);
        }
        let reply_to = msg.envelope.reply_to;
        if reply_to != 0 {
            if let Some(p) = self.pending.remove(&(conn, reply_to)) {
                return self.reply(conn, p, msg, out);
            }
        }
        if self.quitting && reply_to == 0 {
            let q = self.answer(&msg, "QUITTING");
            return self.refuse(conn, &msg, q, out);
        }
        let from_link = matches!(self.conns.get(&conn).map(|c| &c.role), Some(Role::Link(_)));
        match msg.to.server.as_str() {
            "" | "." => self.local(conn, msg, perms, now, !from_link, out),
            "*" | "?" => {
                let everywhere = msg.to.server == "*";
                for node in self.topology.live_remotes() {
                    let mut copy = msg.clone();
                    copy.to.server = node.clone();
                    self.forward(conn, copy, perms, &node, now, out);
                }
                if everywhere {
                    self.local(conn, msg, perms, now, false, out);
                }
            }
            s if s == self.server => self.local(conn, msg, perms, now, false, out),
            _ => {
                let dest = msg.to.server.clone();
                self.forward(conn, msg, perms, &dest, now, out);
            }
        }
    }

    /// The sender of a message from a local connection is this node and the connection's
    /// service, whatever the message said; the first node counts hops from zero.
    fn stamp_sender(&self, msg: &mut Message, service: Option<String>) {
        msg.from.server.clone_from(&self.server);
        msg.from.service = service.unwrap_or_default();
        msg.envelope.hops = 0;
    }

    /// A reply to a tracked request: back to the caller under the caller's own id.
    fn reply(&mut self, responder: ConnId, p: Pending, mut msg: Message, out: &mut Vec<Action>) {
        if let Some(c) = self.conns.get_mut(&responder) {
            c.in_flight = c.in_flight.saturating_sub(1);
        }
        if let Some(c) = self.conns.get_mut(&p.origin) {
            c.outstanding = c.outstanding.saturating_sub(1);
        }
        msg.envelope.reply_to = p.origin_id;
        if !self.conns.contains_key(&p.origin) {
            return;
        }
        if !self.is_link(p.origin) {
            msg.envelope.perms = Permissions::NONE;
        }
        if binary::encoded_len(&msg) > self.limits.max_frame {
            let text = "the reply would exceed max_frame_bytes on the way back";
            return self.fail_request(p.origin, p.origin_id, "too_large", p.command, text, out);
        }
        self.stats.delivered += 1;
        out.push(Action::Deliver(p.origin, msg));
    }

    /// The one place where what a message may do meets what its target needs: true when
    /// `perms` allows `need`; otherwise the sender gets `ERROR code=forbidden` (saying what is
    /// needed and how to get it) and the message goes no further.
    fn admit(
        &mut self,
        conn: ConnId,
        msg: &Message,
        perms: Permissions,
        need: Permission,
        out: &mut Vec<Action>,
    ) -> bool {
        if perms.allows(need) {
            return true;
        }
        self.stats.forbidden += 1;
        let text = self.access.forbidden_text(need);
        let e = self.error(msg, "forbidden", &text).param("permission", need);
        self.refuse(conn, msg, e, out);
        false
    }

    /// Answers `req` with the error or report `reply` unless `req` is itself an answer: an
    /// error is never answered with an error.
    fn refuse(&mut self, conn: ConnId, req: &Message, reply: Message, out: &mut Vec<Action>) {
        if answerable(req) {
            out.push(Action::Deliver(conn, reply));
        }
    }

    /// Delivery on this node; `anywhere` lets a service that is not registered here be found on
    /// the nearest node that has it.
    fn local(
        &mut self,
        conn: ConnId,
        msg: Message,
        perms: Permissions,
        now: i64,
        anywhere: bool,
        out: &mut Vec<Action>,
    ) {
        match msg.to.service.as_str() {
            "" | NODE_SERVICE | "communicatord" => self.node_request(conn, msg, perms, now, out),
            "*" | "." => self.broadcast(conn, msg, perms, out),
            _ => self.route(conn, msg, perms, now, anywhere, out),
        }
    }

    fn route(
        &mut self,
        origin: ConnId,
        msg: Message,
        perms: Permissions,
        now: i64,
        anywhere: bool,
        out: &mut Vec<Action>,
    ) {
        let target = match self.services.get(&msg.to.service) {
            Some(instances) if !instances.is_empty() => {
                self.rr = self.rr.wrapping_add(1);
                pick(self.rr, instances, &self.conns)
            }
            _ => {
                if !self.admit(origin, &msg, perms, Permission::Send, out) {
                    return;
                }
                if anywhere {
                    if let Some(node) = self.topology.nearest_with(&msg.to.service).map(String::from) {
                        return self.forward(origin, msg, perms, &node, now, out);
                    }
                }
                return self.absent(origin, msg, perms, now, out);
            }
        };
        let Some(Role::Client(t)) = self.conns.get(&target).map(|c| &c.role) else { return };
        let (need, understood) = (t.need(&msg.command), t.understands(&msg.command));
        if !self.admit(origin, &msg, perms, need, out) {
            return;
        }
        if !understood {
            let reply = self.answer(&msg, "UNKNOWN").param("command", &msg.command);
            return self.refuse(origin, &msg, reply, out);
        }
        self.deliver_tracked(origin, target, msg, now, out);
    }

    /// Delivers to `target`; a request (id set, not a reply, not an answer) is tracked so its
    /// reply finds the way back. The target sees a node-unique id, so requests from different
    /// callers that happen to use the same id never collide; the caller's own id is restored on
    /// the reply. Returns false, with an error to the sender, when the message would exceed the
    /// frame bound or the request cannot be tracked (table full for the node or the client).
    fn deliver_tracked(
        &mut self,
        origin: ConnId,
        target: ConnId,
        mut msg: Message,
        now: i64,
        out: &mut Vec<Action>,
    ) -> bool {
        if !self.is_link(target) {
            msg.envelope.perms = Permissions::NONE;
        }
        let id = msg.envelope.id;
        let tracked = id != 0 && answerable(&msg);
        if binary::encoded_len(&msg) > self.limits.max_frame {
            self.stats.undeliverable += 1;
            let text = format!("the message would exceed max_frame_bytes ({}) on its way", self.limits.max_frame);
            let e = self.error(&msg, "too_large", &text);
            self.refuse(origin, &msg, e, out);
            return false;
        }
        if tracked {
            let client_outstanding = match self.conns.get(&origin) {
                Some(c) if matches!(c.role, Role::Client(_)) => Some(c.outstanding as usize),
                _ => None,
            };
            let over_client = client_outstanding.is_some_and(|n| n >= self.limits.max_pending_per_client);
            if over_client || self.pending.len() >= self.limits.max_pending {
                self.stats.undeliverable += 1;
                let text = if over_client {
                    format!(
                        "this connection already has {} requests awaiting a reply (max_pending_per_client)",
                        self.limits.max_pending_per_client
                    )
                } else {
                    format!("the node already tracks {} requests (max_pending_requests)", self.limits.max_pending)
                };
                let e = self.error(&msg, "too_many_requests", &text);
                self.refuse(origin, &msg, e, out);
                return false;
            }
            let timeout = ms(self.limits.request_timeout);
            let by_timeout = now.saturating_add(timeout);
            let (deadline, expires) = match msg.envelope.expires_at {
                e if e != 0 && e < by_timeout => (e, true),
                _ => (by_timeout, false),
            };
            let local_id = self.next_id;
            self.next_id += 1;
            msg.envelope.id = local_id;
            let pending = Pending { origin, origin_id: id, deadline, expires, command: msg.command.clone() };
            self.pending.insert((target, local_id), pending);
            if let Some(c) = self.conns.get_mut(&target) {
                c.in_flight += 1;
            }
            if let Some(c) = self.conns.get_mut(&origin) {
                c.outstanding += 1;
            }
        }
        self.stats.delivered += 1;
        let service =
            matches!(self.conns.get(&target).map(|c| &c.role), Some(Role::Client(Client { service: Some(_), .. })));
        if service && origin != GONE && origin != target {
            out.push(Action::Offer { to: target, from: origin, msg });
        } else {
            out.push(Action::Deliver(target, msg));
        }
        true
    }

    /// The driver refused an [`Action::Offer`] of `msg` from `from` to the service `to`: its
    /// queue is past its soft mark or `from` holds its share of it (`share`). A tracked request
    /// stops being tracked and its caller gets `ERROR code=overloaded` under its own id; a
    /// one-way message is counted, and its sender gets its `failed` transmission report when it
    /// asked for one. Either way the message was not delivered (`delivered=no`).
    pub fn overloaded(&mut self, to: ConnId, from: ConnId, msg: &Message, share: bool, out: &mut Vec<Action>) {
        self.stats.overloaded += 1;
        self.stats.delivered = self.stats.delivered.saturating_sub(1);
        let service = match self.conns.get(&to).map(|c| &c.role) {
            Some(Role::Client(Client { service: Some(s), .. })) => s.clone(),
            _ => msg.to.service.clone(),
        };
        let text = if share {
            format!(
                "service {service:?} on {} is busy: this sender already has its share of the service's queue waiting; retry later",
                self.server
            )
        } else {
            format!("service {service:?} on {} is busy: its queue is past its soft mark; retry later", self.server)
        };
        let id = msg.envelope.id;
        let tracked = if id != 0 { self.pending.remove(&(to, id)) } else { None };
        let Some(p) = tracked else {
            if let Some(r) = self.report(msg, "failed") {
                out.push(Action::Deliver(from, r));
            }
            return;
        };
        if let Some(c) = self.conns.get_mut(&to) {
            c.in_flight = c.in_flight.saturating_sub(1);
        }
        if let Some(c) = self.conns.get_mut(&p.origin) {
            c.outstanding = c.outstanding.saturating_sub(1);
        }
        if self.conns.contains_key(&p.origin) {
            let mut e = Message::new("ERROR")
                .param("code", "overloaded")
                .param("command", p.command)
                .param("destination_service", &service)
                .param("delivered", "no")
                .param("message", text);
            e.from = self.node_address();
            e.envelope.reply_to = p.origin_id;
            out.push(Action::Deliver(p.origin, e));
        }
    }

    fn is_link(&self, conn: ConnId) -> bool {
        matches!(self.conns.get(&conn).map(|c| &c.role), Some(Role::Link(_)))
    }

    fn broadcast(&mut self, origin: ConnId, mut msg: Message, perms: Permissions, out: &mut Vec<Action>) {
        if !self.admit(origin, &msg, perms, Permission::Send, out) {
            return;
        }
        msg.envelope.perms = Permissions::NONE;
        if binary::encoded_len(&msg) > self.limits.max_frame {
            let e = self.error(&msg, "too_large", "the message would exceed max_frame_bytes on its way");
            return self.refuse(origin, &msg, e, out);
        }
        for (id, c) in &self.conns {
            let Role::Client(cl) = &c.role else { continue };
            // A built-in service's privileged commands reach it only from those allowed to run them.
            if *id != origin
                && cl.service.is_some()
                && cl.understands(&msg.command)
                && perms.allows(cl.need(&msg.command))
            {
                self.stats.delivered += 1;
                out.push(Action::Deliver(*id, msg.clone()));
            }
        }
    }

    /// The destination service is not registered: cache, report or drop as the message asks.
    fn absent(&mut self, origin: ConnId, msg: Message, perms: Permissions, now: i64, out: &mut Vec<Action>) {
        let mode = self.cache_mode(&msg);
        let expected = self.expected.contains(&msg.to.service);
        match mode {
            CacheMode::Cache { ttl_ms } if expected => {
                let mut expires_at = now.saturating_add(ttl_ms);
                if msg.envelope.expires_at != 0 {
                    expires_at = expires_at.min(msg.envelope.expires_at);
                }
                let report = self.report(&msg, "cached");
                let service = msg.to.service.clone();
                let mut dropped = Vec::new();
                match self.cache.push(&service, origin, perms, msg.clone(), expires_at, now, &mut dropped) {
                    Some(seq) => {
                        self.stats.cached += 1;
                        for t in dropped {
                            self.expired_in_cache(t, now, out);
                        }
                        if self.durable_cache {
                            self.journal(CacheOp::Put(Box::new(Stored { seq, service, expires_at, perms, msg })), out);
                            if let Some(r) = report {
                                self.awaiting_durable.push((seq, origin, r));
                            }
                        } else if let Some(r) = report {
                            out.push(Action::Deliver(origin, r));
                        }
                    }
                    None => self.undeliverable(origin, &msg, "cache_full", "the message cache is full".into(), out),
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
        self.refuse(origin, msg, m, out);
    }

    fn report(&self, msg: &Message, status: &str) -> Option<Message> {
        (msg.get("transmission_report") == Some("failure") && answerable(msg)).then(|| {
            self.answer(msg, "TRANSMISSION_REPORT")
                .param("status", status)
                .param("command", &msg.command)
                .param("destination_service", &msg.to.service)
        })
    }

    fn cache_mode(&self, msg: &Message) -> CacheMode {
        let mut ttl_ms = ms(self.limits.cache_default_ttl);
        let (mut no, mut reply) = (false, false);
        for opt in msg.get("cache").unwrap_or("").split(';').map(str::trim) {
            match opt {
                "no" => no = true,
                "reply" => reply = true,
                _ => {
                    if let Some(secs) = opt.strip_prefix("ttl=").and_then(|v| v.parse::<i64>().ok()) {
                        let (lo, hi) = self.limits.cache_ttl_range;
                        ttl_ms = secs.saturating_mul(1000).clamp(ms(lo), ms(hi));
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

    fn journal(&mut self, op: CacheOp, out: &mut Vec<Action>) {
        if !self.durable_cache {
            return;
        }
        if self.journal.is_empty() {
            out.push(Action::PersistCache);
        }
        self.journal.push(op);
    }

    /// A cached message expired before its service registered: it leaves the journal, and its
    /// sender (when still connected, and the message may be answered) gets `ERROR code=expired`.
    fn expired_in_cache(&mut self, t: crate::cache::Taken, now: i64, out: &mut Vec<Action>) {
        self.journal(CacheOp::Remove(t.seq), out);
        self.stats.expired += 1;
        if !self.conns.contains_key(&t.origin) || !answerable(&t.msg) {
            return;
        }
        let place =
            format!("the cache of node {} (service {:?} did not register in time)", self.server, t.msg.to.service);
        if let Some(mut e) = expiry::expired_reply(&t.msg, now, &place) {
            e.from = self.node_address();
            out.push(Action::Deliver(t.origin, e));
        }
    }

    /// The cache ops since the last call, in order, for the persistence task to make durable.
    pub fn take_cache_journal(&mut self) -> Vec<CacheOp> {
        std::mem::take(&mut self.journal)
    }

    /// Every op taken so far up to entry `upto` is durable: the `cached` reports waiting for
    /// those entries go out.
    pub fn cache_durable(&mut self, upto: u64, out: &mut Vec<Action>) {
        let conns = &self.conns;
        self.awaiting_durable.retain(|(seq, origin, report)| {
            if *seq > upto {
                return true;
            }
            if conns.contains_key(origin) {
                out.push(Action::Deliver(*origin, report.clone()));
            }
            false
        });
    }

    /// Every cached entry, as it should be on disk (for compacting the journal).
    pub fn cache_snapshot(&self) -> Vec<Stored> {
        self.cache.snapshot()
    }

    /// Puts back cached messages kept on disk by an earlier run; expired ones are dropped (and
    /// journaled as removed).
    pub fn restore_cache(&mut self, entries: Vec<Stored>, now: i64, out: &mut Vec<Action>) {
        for seq in self.cache.restore(entries, GONE, now) {
            self.journal(CacheOp::Remove(seq), out);
        }
    }

    /// A request to the node itself.
    fn node_request(&mut self, conn: ConnId, msg: Message, perms: Permissions, now: i64, out: &mut Vec<Action>) {
        if !answerable(&msg) {
            // Replies, errors and reports addressed to the node end here.
            return;
        }
        let req = match NodeRequest::try_from(&msg) {
            Ok(req) => req,
            Err(RequestError::Unknown(_)) => {
                let reply = self.answer(&msg, "UNKNOWN").param("command", &msg.command);
                return out.push(Action::Deliver(conn, reply));
            }
            Err(RequestError::Invalid(text)) => return self.invalid_request(conn, &msg, &text, out),
        };
        if req.connection_scoped() && !matches!(self.conns.get(&conn).map(|c| &c.role), Some(Role::Client(_))) {
            let text = format!("{} acts on the connection that sends it: send it to your own node", msg.command);
            return self.invalid_request(conn, &msg, &text, out);
        }
        if let Some(need) = req.permission() {
            if !self.admit(conn, &msg, perms, need, out) {
                return;
            }
        }
        match req {
            NodeRequest::Register { service } => self.register(conn, &msg, service, now, out),
            NodeRequest::Unregister => self.unregister(conn, &msg, out),
            NodeRequest::Commands { list } => {
                if let Some(Role::Client(c)) = self.conns.get_mut(&conn).map(|c| &mut c.role) {
                    c.commands = Some(list.into_iter().collect());
                }
            }
            NodeRequest::Auth { token } => self.auth(conn, &msg, &token, out),
            NodeRequest::ServiceStatus { service } => {
                let mut reply = self.status_message(&service);
                reply.envelope.reply_to = msg.envelope.id;
                if !msg.from.service.is_empty() {
                    reply.to = msg.from.clone();
                }
                out.push(Action::Deliver(conn, reply));
            }
            NodeRequest::ListServices { cluster } => {
                let list = self.services.keys().cloned().collect::<Vec<_>>().join(",");
                let mut reply = self.answer(&msg, "SERVICES").param("list", list);
                if cluster {
                    reply = reply.param("cluster", self.cluster_services().join(","));
                }
                out.push(Action::Deliver(conn, reply));
            }
            NodeRequest::Info => {
                let reply = self.info(&msg, now);
                out.push(Action::Deliver(conn, reply));
            }
            NodeRequest::Sniff { service, command } => {
                if let Some(Role::Client(c)) = self.conns.get_mut(&conn).map(|c| &mut c.role) {
                    c.sniff = Some(SniffFilter { service, command });
                    if !self.sniffers.contains(&conn) {
                        self.sniffers.push(conn);
                    }
                }
                out.push(Action::Deliver(conn, self.answer(&msg, "SNIFFING")));
            }
            NodeRequest::Ping => out.push(Action::Deliver(conn, self.answer(&msg, "PONG"))),
            NodeRequest::Stop => {
                out.push(Action::Deliver(conn, self.answer(&msg, "STOPPING")));
                out.push(Action::Shutdown);
            }
            NodeRequest::ClusterStatus => self.cluster_status(conn, &msg, out),
            NodeRequest::ClockStatus => self.clock_status(conn, &msg, out),
            NodeRequest::ClusterInfo => {
                let m = self.cluster_info(&msg, now);
                out.push(Action::Deliver(conn, m));
            }
            NodeRequest::Forget(target) => self.forget_request(conn, &msg, target, out),
            NodeRequest::Shutdown => {
                out.push(Action::Deliver(conn, self.answer(&msg, "STOPPING")));
                self.shutdown_cluster(None, out);
            }
        }
    }

    fn info(&self, msg: &Message, now: i64) -> Message {
        let s = &self.stats;
        let instances: usize = self.services.values().map(Vec::len).sum();
        // Connections of programs: not links, datagrams, nor the node's own in-process services.
        let clients = self
            .conns
            .values()
            .filter(|c| match &c.role {
                Role::Client(cl) => cl.principal != Principal::Internal,
                Role::Pending(_) => true,
                _ => false,
            })
            .count();
        self.answer(msg, "INFO")
            .param("server", &self.server)
            .param("version", env!("CARGO_PKG_VERSION"))
            .param("uptime_ms", now - self.started_at)
            .param("connections", clients)
            .param("services", self.services.len())
            .param("instances", instances)
            .param("pending", self.pending.len())
            .param("cached", self.cache.len())
            .param("received", s.received)
            .param("delivered", s.delivered)
            .param("invalid", s.invalid)
            .param("expired", s.expired)
            .param("undeliverable", s.undeliverable)
            .param("forbidden", s.forbidden)
            .param("overloaded", s.overloaded)
            .param("refused", s.refused)
            .param("quitting", self.quitting)
            .param("links", self.links.len())
            .param("known_nodes", self.topology.health().known)
            .param("live_nodes", self.topology.health().live)
    }

    fn auth(&mut self, conn: ConnId, msg: &Message, token: &str, out: &mut Vec<Action>) {
        let ok = self.access.token_matches(token);
        let Some(Role::Client(c)) = self.conns.get_mut(&conn).map(|c| &mut c.role) else { return };
        if ok {
            c.principal = Principal::Owner;
            c.perms = self.access.permissions(&Principal::Owner);
            let (principal, perms) = (c.principal.to_string(), c.perms);
            let reply = self.answer(msg, "AUTHENTICATED").param("principal", principal).param("permissions", perms);
            out.push(Action::Deliver(conn, reply));
        } else {
            c.auth_failures += 1;
            let failures = c.auth_failures;
            let text = format!(
                "wrong token: use the one in {} (this connection keeps what it had)",
                self.access.token_file.display()
            );
            out.push(Action::Deliver(conn, self.error(msg, "unauthorized", &text)));
            if failures >= MAX_AUTH_FAILURES {
                out.push(Action::Close(conn));
            }
        }
    }

    fn register(&mut self, conn: ConnId, msg: &Message, name: String, now: i64, out: &mut Vec<Action>) {
        let Some(Role::Client(c)) = self.conns.get(&conn).map(|c| &c.role) else { return };
        if let Some(current) = &c.service {
            let text = format!("this connection is already registered as {current:?}; send UNREGISTER first");
            return self.invalid_request(conn, msg, &text, out);
        }
        let (principal, privileged) = (c.principal.clone(), c.perms == Permissions::ALL);
        if let Err(text) = self.claim(&name, &principal, privileged) {
            return self.invalid_request(conn, msg, &text, out);
        }
        // Its component id is the node's (name and start) and the connection's: unique for the
        // node's life, and never reused by a later run.
        let started = self.started_at.to_string();
        let id = nodus_control::ComponentId::derive(&[&self.server, &started, "service", &conn.to_string()]).get();
        let parent_node = msg.get("parent_node").filter(|n| !n.is_empty() && *n != self.server).map(String::from);
        let registration = Registration { id, pid: msg.envelope.pid, parent_node, since: now };
        if let Some(Role::Client(c)) = self.conns.get_mut(&conn).map(|c| &mut c.role) {
            c.service = Some(name.clone());
            c.component = Some(registration);
        }
        self.services.entry(name.clone()).or_default().push(conn);
        out.push(Action::Deliver(conn, self.answer(msg, "HELP")));
        let ready = self.answer(msg, "READY").param("server", &self.server).param("component", id);
        out.push(Action::Deliver(conn, ready));
        let (taken, expired) = self.cache.take(&name, now);
        for t in &taken {
            self.journal(CacheOp::Remove(t.seq), out);
        }
        for t in expired {
            self.expired_in_cache(t, now, out);
        }
        for t in taken {
            let need = match self.conns.get(&conn).map(|c| &c.role) {
                Some(Role::Client(c)) => c.need(&t.msg.command),
                _ => Permission::Send,
            };
            if !t.perms.allows(need) {
                self.stats.forbidden += 1;
                continue;
            }
            // Tracked like any delivery, so the reply to a cached request finds its caller.
            self.deliver_tracked(t.origin, conn, t.msg, now, out);
        }
        self.notify_status(&name, out);
        self.services_changed(out);
    }

    /// A service name belongs to the principal that registered it first (internal services may
    /// join any). Fails with the text of the `INVALID` answer.
    fn claim(&mut self, name: &str, principal: &Principal, privileged: bool) -> Result<(), String> {
        match self.owners.get(name) {
            Some(owner) if owner == principal || *principal == Principal::Internal => return Ok(()),
            Some(_) => return Err(format!("service {name} belongs to another principal")),
            None => {}
        }
        if self.owners.len() >= MAX_OWNED_NAMES {
            // Make room with a name nobody serves now: one of this principal's own, or, for the
            // owner, any unprivileged principal's.
            let services = &self.services;
            let spare = self
                .owners
                .iter()
                .find(|(n, o)| {
                    !services.contains_key(*n)
                        && (*o == principal
                            || (privileged && matches!(o, Principal::Anonymous | Principal::LocalUser { .. })))
                })
                .map(|(n, _)| n.clone());
            match spare {
                Some(n) => {
                    self.owners.remove(&n);
                }
                None => return Err(format!("the node already knows {MAX_OWNED_NAMES} service names")),
            }
        }
        self.owners.insert(name.to_string(), principal.clone());
        Ok(())
    }

    fn unregister(&mut self, conn: ConnId, msg: &Message, out: &mut Vec<Action>) {
        let name = match self.conns.get_mut(&conn).map(|c| &mut c.role) {
            Some(Role::Client(c)) => c.service.take(),
            _ => None,
        };
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
            if let Role::Client(cl) = &c.role {
                if cl.service.as_deref() != Some(name) && cl.declared("STATUS") {
                    out.push(Action::Deliver(*id, status.clone()));
                }
            }
        }
    }

    fn sniff(&self, origin: ConnId, msg: &Message, out: &mut Vec<Action>) {
        for s in &self.sniffers {
            let Some(Role::Client(c)) = self.conns.get(s).map(|c| &c.role) else { continue };
            if *s != origin && c.sniff.as_ref().is_some_and(|f| f.matches(msg)) {
                out.push(Action::Deliver(*s, msg.clone()));
            }
        }
    }

    /// A connection closed.
    pub fn disconnect(&mut self, conn: ConnId, out: &mut Vec<Action>) {
        let Some(c) = self.conns.remove(&conn) else { return };
        self.sniffers.retain(|s| *s != conn);
        match c.role {
            Role::Client(Client { service: Some(name), .. }) => {
                self.remove_instance(conn, &name);
                self.notify_status(&name, out);
                self.services_changed(out);
            }
            Role::Link(link) => self.link_lost(conn, link, out),
            Role::Client(_) | Role::Datagram | Role::Pending(_) => {}
        }
        let mut failed = Vec::new();
        // Requests this connection was handling fail now: each caller gets one answer. Requests
        // it made stay tracked until answered or timed out, so the responder's load stays right;
        // their replies are dropped.
        self.pending.retain(|(responder, _), p| {
            if *responder == conn {
                failed.push((p.origin, p.origin_id, std::mem::take(&mut p.command)));
                false
            } else {
                true
            }
        });
        for (origin, id, command) in failed {
            if let Some(c) = self.conns.get_mut(&origin) {
                c.outstanding = c.outstanding.saturating_sub(1);
            }
            let text = "the service handling the request disconnected before replying: the request may have run";
            self.fail_request(origin, id, "disconnected", command, text, out);
        }
    }

    /// Time passes: expire cached messages and tracked requests, heartbeat links, close cluster
    /// connections whose handshake is late.
    pub fn tick(&mut self, now: i64, out: &mut Vec<Action>) {
        self.clock = now;
        self.cluster_tick(now, out);
        for t in self.cache.sweep(now) {
            self.expired_in_cache(t, now, out);
        }
        let mut timed_out = Vec::new();
        self.pending.retain(|(responder, _), p| {
            let keep = p.deadline > now;
            if !keep {
                timed_out.push((*responder, p.origin, p.origin_id, std::mem::take(&mut p.command), p.expires));
            }
            keep
        });
        for (responder, origin, id, command, expires) in timed_out {
            if let Some(c) = self.conns.get_mut(&responder) {
                c.in_flight = c.in_flight.saturating_sub(1);
            }
            if let Some(c) = self.conns.get_mut(&origin) {
                c.outstanding = c.outstanding.saturating_sub(1);
            }
            if expires {
                let text = "the request expired (_expires_at) before it was answered: if it had not started \
                            by then it never will, but it may have run";
                self.fail_request(origin, id, expiry::EXPIRED_CODE, command, text, out);
            } else {
                let text = "no reply arrived before the request timed out: the request may have run";
                self.fail_request(origin, id, "timeout", command, text, out);
            }
        }
    }

    /// Tells the caller of a tracked request that no reply will come (the request was
    /// delivered, so it may have run: `delivered=maybe`).
    fn fail_request(&self, origin: ConnId, id: u64, code: &str, command: String, text: &str, out: &mut Vec<Action>) {
        if self.conns.contains_key(&origin) {
            let mut m = Message::new("ERROR")
                .param("code", code)
                .param("command", command)
                .param("delivered", "maybe")
                .param("message", text);
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
        self.refuse(conn, req, m, out);
    }

    fn nonce(&mut self) -> String {
        let n: u128 = rand::Rng::gen(&mut self.rng);
        format!("{n:032x}")
    }
}

/// Picks the least loaded instance, rotating the starting point among equals.
fn pick(rr: usize, instances: &[ConnId], conns: &IdMap<ConnId, Conn>) -> ConnId {
    let n = instances.len();
    let load = |id: &ConnId| conns.get(id).map_or(u32::MAX, |c| c.in_flight);
    let mut best = instances[rr % n];
    let mut best_load = load(&best);
    for i in 1..n {
        let id = instances[(rr + i) % n];
        let l = load(&id);
        if l < best_load {
            best = id;
            best_load = l;
        }
    }
    best
}

#[cfg(test)]
mod tests;
