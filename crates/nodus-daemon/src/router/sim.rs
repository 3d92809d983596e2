//! A deterministic simulated network of routers: N [`Router`]s in one process, driven the way the
//! daemon's driver drives them (a tick per heartbeat, the router's flush timer, neighbour dialers
//! with the driver's backoff), over simulated TCP connections with latency, retransmissions,
//! partitions and crashes, on a virtual clock. Seeded: the same configuration and the same calls
//! give the same run, event for event.
//!
//! Each node also has a CPU: handling a message, a tick or a flush takes time (a cost per message
//! and per byte, in and out), and a node that is busy makes its inputs wait, as an overloaded
//! process does. With [`SimConfig::heartbeat_lane`] heartbeats wait in their own lane, ahead of
//! everything else, as they do in the driver. This is what lets the simulator show whether load
//! (a gossip storm) can delay heartbeats into false deaths.
//!
//! What it counts: link-level messages and bytes each node sends (handshake, heartbeats, gossip),
//! links the failure detector declared dead (and whether the peer really was: crashed, frozen or
//! cut off), and what every node reports (live and known nodes), checked every
//! [`CHECK_EVERY_US`] of virtual time.
//!
//! Scenarios ([`Sim::crash`], [`Sim::freeze`], [`Sim::partition`], [`Sim::cut`], [`Sim::heal`])
//! take effect at the current virtual time; [`Sim::run_until`] advances it.

use super::{Action, ConnId, LinkPolicy, Router, RouterConfig, RouterLimits};
use crate::auth::{AccessPolicy, Origin};
use crate::config::Config;
use crate::topology::KnownNode;
use nodus_wire::{binary, Backoff, Message};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::time::Duration;

/// The virtual clock starts at this Unix time (ms): incarnations must be plausible.
pub const EPOCH_MS: i64 = 1_700_000_000_000;
/// How often the simulator reads what every node reports, µs of virtual time.
pub const CHECK_EVERY_US: i64 = 10_000;
/// As the driver's dialer: the first delay between dials.
const DIAL_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// As the driver's dialer: the longest delay between dials.
const DIAL_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// As the driver's dialer: how long a TCP connect may take before it is given up.
const DIAL_TIMEOUT_US: i64 = 2_000_000;

/// What a node's CPU spends, per input.
#[derive(Debug, Clone, Copy)]
pub struct Cost {
    /// Fixed cost of handling one input or writing one output, µs.
    pub per_message_us: f64,
    /// Cost per byte decoded or encoded, ns.
    pub per_byte_ns: f64,
    /// Multiplies every cost: more than 1 stands for many processes sharing few cores.
    pub slowdown: f64,
}

impl Default for Cost {
    /// About what the release daemon spends on this machine, one core per node.
    fn default() -> Self {
        Cost { per_message_us: 4.0, per_byte_ns: 15.0, slowdown: 1.0 }
    }
}

/// A simulated cluster.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Nodes (`n0`, `n1`, ...).
    pub nodes: usize,
    /// Seeds every random choice (graph, latencies, losses, nonces, backoff jitter).
    pub seed: u64,
    /// Each node dials this many distinct random others (a random graph).
    pub dials: usize,
    /// One-way latency range, µs.
    pub latency_us: (i64, i64),
    /// Probability that a segment is lost once: it arrives after `rto_us` more, and everything
    /// behind it on that connection waits (TCP's head-of-line blocking).
    pub loss: f64,
    /// Retransmission delay of a lost segment, µs.
    pub rto_us: i64,
    /// The links' heartbeat period.
    pub heartbeat: Duration,
    /// The cluster secret (empty: none).
    pub secret: String,
    /// CPU cost model.
    pub cost: Cost,
    /// Heartbeats skip the queue of a busy node (the driver's heartbeat lane).
    pub heartbeat_lane: bool,
}

impl SimConfig {
    /// `nodes` nodes on a random graph where each dials two others, 0.1–0.5 ms latency, no
    /// loss, heartbeat 100 ms, a secret, the default cost, heartbeats in their own lane.
    pub fn new(nodes: usize, seed: u64) -> Self {
        SimConfig {
            nodes,
            seed,
            dials: 2,
            latency_us: (100, 500),
            loss: 0.0,
            rto_us: 200_000,
            heartbeat: Duration::from_millis(100),
            secret: "sim".into(),
            cost: Cost::default(),
            heartbeat_lane: true,
        }
    }
}

/// Messages and bytes sent over links, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// `CONNECT`, `ACCEPT`, `CONFIRM`, `REFUSE`, `DISCONNECT`.
    pub handshake: (u64, u64),
    /// `LINK_PING`, `LINK_PONG`.
    pub heartbeat: (u64, u64),
    /// `GOSSIP` and everything else the link protocol sends about the cluster's state.
    pub gossip: (u64, u64),
    /// Anything else (routed traffic).
    pub other: (u64, u64),
}

impl Traffic {
    fn add(&mut self, command: &str, bytes: usize) {
        let slot = match command {
            "CONNECT" | "ACCEPT" | "CONFIRM" | "REFUSE" | "DISCONNECT" => &mut self.handshake,
            "LINK_PING" | "LINK_PONG" => &mut self.heartbeat,
            "GOSSIP" | "SUMMARY" | "FORGET" => &mut self.gossip,
            _ => &mut self.other,
        };
        slot.0 += 1;
        slot.1 += bytes as u64;
    }

    /// Messages and bytes of every kind together.
    pub fn total(&self) -> (u64, u64) {
        let all = [self.handshake, self.heartbeat, self.gossip, self.other];
        (all.iter().map(|t| t.0).sum(), all.iter().map(|t| t.1).sum())
    }

    /// What was sent since `earlier`.
    pub fn since(&self, earlier: &Traffic) -> Traffic {
        let d = |a: (u64, u64), b: (u64, u64)| (a.0 - b.0, a.1 - b.1);
        Traffic {
            handshake: d(self.handshake, earlier.handshake),
            heartbeat: d(self.heartbeat, earlier.heartbeat),
            gossip: d(self.gossip, earlier.gossip),
            other: d(self.other, earlier.other),
        }
    }

    fn merge(&mut self, o: &Traffic) {
        for (a, b) in [
            (&mut self.handshake, o.handshake),
            (&mut self.heartbeat, o.heartbeat),
            (&mut self.gossip, o.gossip),
            (&mut self.other, o.other),
        ] {
            a.0 += b.0;
            a.1 += b.1;
        }
    }
}

/// A link the failure detector declared dead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Death {
    /// When, µs of virtual time.
    pub at_us: i64,
    /// The node that declared it.
    pub node: usize,
    /// The peer.
    pub peer: usize,
    /// False: the peer was running and reachable (a false death).
    pub deserved: bool,
}

enum Work {
    Msg(ConnId, Box<Message>),
    Tick,
    Flush,
    Accept(ConnId),
    Dialed(ConnId, usize),
    Closed(ConnId),
}

enum Packet {
    Msg(Box<Message>),
    Fin,
}

/// One direction of a simulated TCP connection.
struct Pipe {
    from: usize,
    to: usize,
    /// The connection id on the receiving node.
    to_conn: ConnId,
    /// Arrival time of the last packet sent (TCP delivers in order).
    last_at: i64,
    /// The sender may still write (no FIN yet).
    open: bool,
    /// Packets held by a partition, delivered when it heals.
    stalled: Vec<Packet>,
}

enum Ev {
    Arrive(usize, Packet),
    Process(usize),
    Tick(usize),
    /// The router's flush timer ([`Router::flush_at`]) fires.
    Flush(usize),
    Dial(usize, usize),
    /// A TCP connect completed (or failed: `None`) for a dialer.
    Connect(usize, usize, Option<(ConnId, usize)>),
    Check,
}

struct Scheduled {
    at: i64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> Ordering {
        // Earliest first out of a max-heap.
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DialState {
    Idle,
    Connecting,
    Open { conn: ConnId, since: i64 },
}

struct Dialer {
    target: usize,
    backoff: Backoff,
    state: DialState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    NotStarted,
    Running,
    Frozen,
    Crashed,
}

struct Node {
    name: String,
    addr: String,
    router: Option<Router>,
    status: Status,
    inbox: VecDeque<Work>,
    lane: VecDeque<Work>,
    busy_until: i64,
    /// A `Process` event is pending.
    scheduled: bool,
    tick_queued: bool,
    /// When the flush timer is set for, µs.
    flush_timer: Option<i64>,
    /// Connection → the pipe this node writes to.
    conns: BTreeMap<ConnId, usize>,
    next_conn: ConnId,
    dialers: Vec<Dialer>,
    sent: Traffic,
    /// What it reported at the last check: (live, known).
    health: (usize, usize),
    dirty: bool,
    saved: Vec<KnownNode>,
}

/// The simulated network.
pub struct Sim {
    config: SimConfig,
    now: i64,
    seq: u64,
    queue: BinaryHeap<Scheduled>,
    nodes: Vec<Node>,
    pipes: Vec<Pipe>,
    rng: StdRng,
    side: Vec<u32>,
    cuts: BTreeSet<(usize, usize)>,
    deaths: Vec<Death>,
    /// Events handled so far.
    pub events: u64,
    /// CPU time spent by all nodes, µs.
    pub cpu_us: f64,
}

impl Sim {
    /// A network of `config.nodes` nodes, none started yet; each node's dial targets are drawn.
    pub fn new(config: SimConfig) -> Sim {
        let mut rng = StdRng::seed_from_u64(config.seed);
        let n = config.nodes;
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let mut targets = BTreeSet::new();
            while n > 1 && targets.len() < config.dials.min(n - 1) {
                let t = rng.gen_range(0..n);
                if t != i {
                    targets.insert(t);
                }
            }
            let dialers = targets
                .into_iter()
                .map(|target| Dialer {
                    target,
                    backoff: Backoff::new(DIAL_BACKOFF_MIN, DIAL_BACKOFF_MAX, rng.gen()),
                    state: DialState::Idle,
                })
                .collect();
            nodes.push(Node {
                name: format!("n{i}"),
                addr: format!("10.{}.{}.{}:4042", i >> 16, (i >> 8) & 0xff, i & 0xff),
                router: None,
                status: Status::NotStarted,
                inbox: VecDeque::new(),
                lane: VecDeque::new(),
                busy_until: 0,
                scheduled: false,
                tick_queued: false,
                flush_timer: None,
                conns: BTreeMap::new(),
                next_conn: 1,
                dialers,
                sent: Traffic::default(),
                health: (0, 0),
                dirty: false,
                saved: Vec::new(),
            });
        }
        let mut sim = Sim {
            side: vec![0; n],
            config,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes,
            pipes: Vec::new(),
            rng,
            cuts: BTreeSet::new(),
            deaths: Vec::new(),
            events: 0,
            cpu_us: 0.0,
        };
        sim.schedule(CHECK_EVERY_US, Ev::Check);
        sim
    }

    /// Virtual time, µs since the start.
    pub fn now_us(&self) -> i64 {
        self.now
    }

    /// The nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True without nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`'s name.
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// Node `i`'s router, while it runs.
    pub fn router(&self, i: usize) -> Option<&Router> {
        self.nodes[i].router.as_ref()
    }

    /// What node `i` reported at the last check: (live, known).
    pub fn health(&self, i: usize) -> (usize, usize) {
        self.nodes[i].health
    }

    /// Nodes whose process runs (not crashed; frozen ones count).
    pub fn alive(&self) -> usize {
        self.nodes.iter().filter(|n| matches!(n.status, Status::Running | Status::Frozen)).count()
    }

    /// True when node `i` runs and is not frozen.
    pub fn running(&self, i: usize) -> bool {
        self.nodes[i].status == Status::Running
    }

    /// Links the failure detector declared dead so far.
    pub fn deaths(&self) -> &[Death] {
        &self.deaths
    }

    /// Deaths of links whose peer was running and reachable.
    pub fn false_deaths(&self) -> usize {
        self.deaths.iter().filter(|d| !d.deserved).count()
    }

    /// What node `i` sent so far.
    pub fn sent(&self, i: usize) -> Traffic {
        self.nodes[i].sent
    }

    /// What every node sent so far.
    pub fn traffic(&self) -> Traffic {
        let mut t = Traffic::default();
        for n in &self.nodes {
            t.merge(&n.sent);
        }
        t
    }

    /// Live links, counted once per pair.
    pub fn links(&self) -> usize {
        self.nodes.iter().filter_map(|n| n.router.as_ref()).map(|r| r.links.len()).sum::<usize>() / 2
    }

    /// The node with the most live links (the lowest index among equals).
    pub fn busiest(&self) -> usize {
        let degree = |i: usize| self.nodes[i].router.as_ref().map_or(0, |r| r.links.len());
        (0..self.len()).max_by_key(|&i| (degree(i), std::cmp::Reverse(i))).unwrap_or(0)
    }

    /// True when every dial target of every running node is linked to it.
    pub fn planned_links_up(&self) -> bool {
        self.nodes.iter().all(|n| {
            let Some(r) = &n.router else { return true };
            n.dialers.iter().all(|d| {
                let peer = &self.nodes[d.target];
                peer.router.is_none() || r.links.contains_key(&peer.name)
            })
        })
    }

    /// Starts node `i` now.
    pub fn start(&mut self, i: usize) {
        let c = &self.config;
        let base = Config::default();
        let mut links = LinkPolicy::from_config(&base);
        links.secret.clone_from(&c.secret);
        links.heartbeat = c.heartbeat;
        links.max_nodes = links.max_nodes.max(c.nodes + 1);
        let config = RouterConfig {
            server: self.nodes[i].name.clone(),
            expected: Vec::new(),
            limits: RouterLimits::from_config(&base.limits),
            links,
            access: AccessPolicy::open(base.access.anonymous_permissions()),
            cluster_addr: self.nodes[i].addr.clone(),
            durable_cache: false,
            seed: self.rng.gen(),
        };
        let mut router = Router::new(config, self.now_ms());
        router.remember(std::mem::take(&mut self.nodes[i].saved));
        let node = &mut self.nodes[i];
        node.router = Some(router);
        node.status = Status::Running;
        node.busy_until = self.now;
        node.dirty = true;
        let period = self.tick_period();
        let offset = self.rng.gen_range(0..period);
        self.schedule(self.now + offset, Ev::Tick(i));
        for d in 0..self.nodes[i].dialers.len() {
            self.nodes[i].dialers[d].state = DialState::Idle;
            self.schedule(self.now, Ev::Dial(i, d));
        }
    }

    /// Starts every node now.
    pub fn start_all(&mut self) {
        for i in 0..self.len() {
            self.start(i);
        }
    }

    /// Kills node `i` (kill -9): its connections close at once, the peers see them end after
    /// the latency; what it had queued is lost. It remembers what it last saved.
    pub fn crash(&mut self, i: usize) {
        // In connection order: the run must not depend on a hash seed.
        let conns: Vec<usize> = std::mem::take(&mut self.nodes[i].conns).into_values().collect();
        for p in conns {
            self.send(p, Packet::Fin, self.now);
            self.pipes[p].open = false;
        }
        let node = &mut self.nodes[i];
        node.router = None;
        node.status = Status::Crashed;
        node.inbox.clear();
        node.lane.clear();
        node.tick_queued = false;
        node.flush_timer = None;
        for d in &mut node.dialers {
            d.state = DialState::Idle;
        }
    }

    /// Freezes node `i` (SIGSTOP): it keeps its connections but handles nothing.
    pub fn freeze(&mut self, i: usize) {
        if self.nodes[i].status == Status::Running {
            self.nodes[i].status = Status::Frozen;
        }
    }

    /// Lets a frozen node run again (SIGCONT): it works through what queued up.
    pub fn thaw(&mut self, i: usize) {
        if self.nodes[i].status == Status::Frozen {
            self.nodes[i].status = Status::Running;
            self.nodes[i].busy_until = self.nodes[i].busy_until.max(self.now);
            self.wake(i);
        }
    }

    /// Cuts `group` off from the other nodes: packets between the two sides are held (TCP
    /// retransmits them when the partition heals), connects time out.
    pub fn partition(&mut self, group: &[usize]) {
        for &i in group {
            self.side[i] = 1;
        }
    }

    /// Cuts the path between `a` and `b` only.
    pub fn cut(&mut self, a: usize, b: usize) {
        self.cuts.insert((a.min(b), a.max(b)));
    }

    /// Restores the path between `a` and `b`.
    pub fn restore(&mut self, a: usize, b: usize) {
        self.cuts.remove(&(a.min(b), a.max(b)));
        self.release();
    }

    /// Resets every connection between `a` and `b` (both ends see it close, as after an RST);
    /// their dialers redial after their backoff, or at once with [`Sim::dial_now`].
    pub fn reset(&mut self, a: usize, b: usize) {
        for (x, y) in [(a, b), (b, a)] {
            let conns: Vec<(ConnId, usize)> = self.nodes[x]
                .conns
                .iter()
                .filter(|(_, &p)| self.pipes[p].to == y && self.pipes[p].open)
                .map(|(&c, &p)| (c, p))
                .collect();
            for (conn, p) in conns {
                self.send(p, Packet::Fin, self.now);
                self.pipes[p].open = false;
                self.enqueue(x, Work::Closed(conn));
            }
        }
    }

    /// Node `a` dials `b` now (it must have `b` among its dial targets and not be connected or
    /// connecting to it), whatever its backoff says.
    pub fn dial_now(&mut self, a: usize, b: usize) {
        let d = self.nodes[a].dialers.iter().position(|d| d.target == b).expect("a dials b");
        self.nodes[a].dialers[d].state = DialState::Idle;
        self.dial(a, d);
    }

    /// Node `i`'s dial targets.
    pub fn dials(&self, i: usize) -> Vec<usize> {
        self.nodes[i].dialers.iter().map(|d| d.target).collect()
    }

    /// Ends every partition and cut.
    pub fn heal(&mut self) {
        self.side.iter_mut().for_each(|s| *s = 0);
        self.cuts.clear();
        self.release();
    }

    /// Handles events until `done` holds at a check, or until `limit_us` of virtual time has
    /// passed. Returns the time it took, µs, or `None` at the limit.
    pub fn run_until(&mut self, limit_us: i64, mut done: impl FnMut(&Sim) -> bool) -> Option<i64> {
        let start = self.now;
        let end = self.now + limit_us;
        while let Some(s) = self.queue.pop() {
            if s.at > end {
                self.queue.push(s);
                break;
            }
            self.now = s.at;
            self.events += 1;
            if let Ev::Check = s.ev {
                self.check();
                self.schedule(self.now + CHECK_EVERY_US, Ev::Check);
                if done(self) {
                    return Some(self.now - start);
                }
                continue;
            }
            self.event(s.ev);
        }
        self.now = end;
        None
    }

    /// Runs for `us` of virtual time.
    pub fn run_for(&mut self, us: i64) {
        self.run_until(us, |_| false);
    }

    fn now_ms(&self) -> i64 {
        EPOCH_MS + self.now / 1000
    }

    fn tick_period(&self) -> i64 {
        i64::try_from(self.config.heartbeat.min(Duration::from_millis(500)).as_micros()).unwrap_or(i64::MAX).max(1)
    }

    fn schedule(&mut self, at: i64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Scheduled { at, seq: self.seq, ev });
    }

    fn blocked(&self, a: usize, b: usize) -> bool {
        self.side[a] != self.side[b] || self.cuts.contains(&(a.min(b), a.max(b)))
    }

    fn latency(&mut self) -> i64 {
        let (lo, hi) = self.config.latency_us;
        let mut l = if hi > lo { self.rng.gen_range(lo..=hi) } else { lo };
        if self.config.loss > 0.0 && self.rng.gen_bool(self.config.loss) {
            l += self.config.rto_us;
        }
        l
    }

    /// Puts a packet on pipe `p` at time `at` (in order behind what it already carries).
    fn send(&mut self, p: usize, packet: Packet, at: i64) {
        if !self.pipes[p].open {
            return;
        }
        let (from, to) = (self.pipes[p].from, self.pipes[p].to);
        if self.blocked(from, to) {
            self.pipes[p].stalled.push(packet);
            return;
        }
        let arrive = (at + self.latency()).max(self.pipes[p].last_at + 1);
        self.pipes[p].last_at = arrive;
        self.schedule(arrive, Ev::Arrive(p, packet));
    }

    /// Packets held by partitions that have healed go on their way.
    fn release(&mut self) {
        for p in 0..self.pipes.len() {
            if self.pipes[p].stalled.is_empty() || self.blocked(self.pipes[p].from, self.pipes[p].to) {
                continue;
            }
            for packet in std::mem::take(&mut self.pipes[p].stalled) {
                let arrive = (self.now + self.latency()).max(self.pipes[p].last_at + 1);
                self.pipes[p].last_at = arrive;
                self.schedule(arrive, Ev::Arrive(p, packet));
            }
        }
    }

    fn enqueue(&mut self, i: usize, work: Work) {
        let heartbeat = matches!(&work, Work::Msg(_, m) if matches!(m.command.as_str(), "LINK_PING" | "LINK_PONG"));
        let node = &mut self.nodes[i];
        if heartbeat && self.config.heartbeat_lane {
            node.lane.push_back(work);
        } else {
            node.inbox.push_back(work);
        }
        self.wake(i);
    }

    fn wake(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if node.scheduled || node.status != Status::Running || (node.inbox.is_empty() && node.lane.is_empty()) {
            return;
        }
        node.scheduled = true;
        let at = node.busy_until.max(self.now);
        self.schedule(at, Ev::Process(i));
    }

    fn event(&mut self, ev: Ev) {
        match ev {
            Ev::Arrive(p, packet) => {
                let (to, conn) = (self.pipes[p].to, self.pipes[p].to_conn);
                if !self.nodes[to].conns.contains_key(&conn) {
                    return;
                }
                let work = match packet {
                    Packet::Msg(m) => Work::Msg(conn, m),
                    Packet::Fin => Work::Closed(conn),
                };
                self.enqueue(to, work);
            }
            Ev::Process(i) => {
                self.nodes[i].scheduled = false;
                if self.nodes[i].status == Status::Running {
                    self.process(i);
                }
            }
            Ev::Tick(i) => {
                if matches!(self.nodes[i].status, Status::Crashed | Status::NotStarted) {
                    return;
                }
                if !self.nodes[i].tick_queued {
                    self.nodes[i].tick_queued = true;
                    self.enqueue(i, Work::Tick);
                }
                let period = self.tick_period();
                self.schedule(self.now + period, Ev::Tick(i));
            }
            Ev::Flush(i) => {
                if self.nodes[i].flush_timer == Some(self.now) && self.nodes[i].status != Status::Crashed {
                    self.nodes[i].flush_timer = None;
                    self.enqueue(i, Work::Flush);
                }
            }
            Ev::Dial(i, d) => self.dial(i, d),
            Ev::Connect(i, d, result) => {
                if self.nodes[i].status == Status::Crashed {
                    return;
                }
                match result {
                    Some((conn, _)) => self.enqueue(i, Work::Dialed(conn, d)),
                    None => {
                        self.nodes[i].dialers[d].state = DialState::Idle;
                        let delay = self.nodes[i].dialers[d].backoff.next_delay();
                        self.schedule(self.now + delay.as_micros() as i64, Ev::Dial(i, d));
                    }
                }
            }
            Ev::Check => {}
        }
    }

    fn dial(&mut self, i: usize, d: usize) {
        if self.nodes[i].status == Status::Crashed || self.nodes[i].dialers[d].state != DialState::Idle {
            return;
        }
        let target = self.nodes[i].dialers[d].target;
        let linked = match (&self.nodes[i].router, self.nodes[i].status) {
            (Some(r), Status::Running) => r.linked_to_addr(&self.nodes[target].addr),
            // A frozen dialer does nothing; it looks again once thawed.
            _ => true,
        };
        if linked {
            let delay = self.nodes[i].dialers[d].backoff.next_delay();
            self.schedule(self.now + delay.as_micros() as i64, Ev::Dial(i, d));
            return;
        }
        self.nodes[i].dialers[d].state = DialState::Connecting;
        let rtt = self.latency() + self.latency();
        match self.nodes[target].status {
            _ if self.blocked(i, target) => self.schedule(self.now + DIAL_TIMEOUT_US, Ev::Connect(i, d, None)),
            Status::Crashed | Status::NotStarted => self.schedule(self.now + rtt, Ev::Connect(i, d, None)),
            Status::Running | Status::Frozen => {
                // The listener's kernel accepts; its node registers the connection when it runs.
                let (ca, cb) = (self.nodes[i].next_conn, self.nodes[target].next_conn);
                self.nodes[i].next_conn += 1;
                self.nodes[target].next_conn += 1;
                let (ab, ba) = (self.pipes.len(), self.pipes.len() + 1);
                let pipe = |from, to, to_conn| Pipe { from, to, to_conn, last_at: 0, open: true, stalled: Vec::new() };
                self.pipes.push(pipe(i, target, cb));
                self.pipes.push(pipe(target, i, ca));
                self.nodes[i].conns.insert(ca, ab);
                self.nodes[target].conns.insert(cb, ba);
                self.enqueue(target, Work::Accept(cb));
                self.schedule(self.now + rtt, Ev::Connect(i, d, Some((ca, ab))));
            }
        }
    }

    /// The node handles one piece of work; its CPU is busy for what it cost, and what it sends
    /// leaves when it is done.
    fn process(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let Some(work) = node.lane.pop_front().or_else(|| node.inbox.pop_front()) else { return };
        let Some(router) = node.router.as_mut() else { return };
        let now_ms = EPOCH_MS + self.now / 1000;
        let mut out = Vec::new();
        let mut in_bytes = 0;
        let mut convicted = Vec::new();
        match work {
            Work::Msg(conn, m) => {
                in_bytes = binary::encoded_len(&m);
                router.handle(conn, *m, now_ms, &mut out);
            }
            Work::Tick => {
                node.tick_queued = false;
                let before: Vec<String> = router.links.keys().cloned().collect();
                router.tick(now_ms, &mut out);
                convicted = before.into_iter().filter(|p| !router.links.contains_key(p)).collect();
            }
            Work::Flush => router.flush(now_ms, &mut out),
            Work::Accept(conn) => {
                let peer = "10.255.255.255:50000".parse().expect("a socket address");
                router.connect(conn, Origin::Cluster { peer, tls: false });
            }
            Work::Dialed(conn, d) => {
                let target = node.dialers[d].target;
                let addr = self.nodes[target].addr.clone();
                let node = &mut self.nodes[i];
                node.dialers[d].state = DialState::Open { conn, since: self.now };
                let router = node.router.as_mut().expect("running");
                router.dial(conn, Origin::Dialed { addr, tls: false }, &mut out);
            }
            Work::Closed(conn) => {
                let node = &mut self.nodes[i];
                if let Some(p) = node.conns.remove(&conn) {
                    self.pipes[p].open = false;
                }
                let router = node.router.as_mut().expect("running");
                router.disconnect(conn, &mut out);
                let mut redial = None;
                for (d, dialer) in node.dialers.iter_mut().enumerate() {
                    if let DialState::Open { conn: c, since } = dialer.state {
                        if c == conn {
                            if self.now - since > DIAL_BACKOFF_MAX.as_micros() as i64 {
                                dialer.backoff.reset();
                            }
                            dialer.state = DialState::Idle;
                            redial = Some((d, dialer.backoff.next_delay()));
                        }
                    }
                }
                if let Some((d, delay)) = redial {
                    self.schedule(self.now + delay.as_micros() as i64, Ev::Dial(i, d));
                }
            }
        }
        for peer in convicted {
            let p = peer.strip_prefix('n').and_then(|s| s.parse::<usize>().ok()).unwrap_or(usize::MAX);
            let deserved = p >= self.len() || !self.running(p) || self.blocked(i, p);
            self.deaths.push(Death { at_us: self.now, node: i, peer: p, deserved });
        }
        let out_bytes: usize =
            out.iter().map(|a| if let Action::Deliver(_, m) = a { binary::encoded_len(m) } else { 0 }).sum();
        let c = self.config.cost;
        let cost = c.slowdown
            * (c.per_message_us * (1 + out.len()) as f64 + c.per_byte_ns * (in_bytes + out_bytes) as f64 / 1000.0);
        self.cpu_us += cost;
        let done = self.now + cost.ceil() as i64;
        self.nodes[i].busy_until = done;
        self.nodes[i].dirty = true;
        self.apply(i, out, done);
        self.set_flush_timer(i);
        self.wake(i);
    }

    /// Sets node `i`'s flush timer for when its router wants it, as the driver does.
    fn set_flush_timer(&mut self, i: usize) {
        let Some(at_ms) = self.nodes[i].router.as_ref().and_then(Router::flush_at) else { return };
        let at = ((at_ms - EPOCH_MS) * 1000).max(self.now);
        if self.nodes[i].flush_timer.is_none_or(|t| at < t) {
            self.nodes[i].flush_timer = Some(at);
            self.schedule(at, Ev::Flush(i));
        }
    }

    fn apply(&mut self, i: usize, out: Vec<Action>, at: i64) {
        for action in out {
            match action {
                // The simulated pipes have no queue limit: an offer is always taken.
                Action::Deliver(conn, m) | Action::Offer { to: conn, msg: m, .. } => {
                    let Some(&p) = self.nodes[i].conns.get(&conn) else { continue };
                    if !self.pipes[p].open {
                        continue;
                    }
                    self.nodes[i].sent.add(&m.command, binary::encoded_len(&m));
                    self.send(p, Packet::Msg(Box::new(m)), at);
                }
                Action::Close(conn) => {
                    let Some(&p) = self.nodes[i].conns.get(&conn) else { continue };
                    self.send(p, Packet::Fin, at);
                    self.pipes[p].open = false;
                    // The reader ends: the router hears of it like of any closed connection.
                    self.enqueue(i, Work::Closed(conn));
                }
                Action::SaveNodes(nodes) => self.nodes[i].saved = nodes,
                Action::Shutdown | Action::PersistCache => {}
            }
        }
    }

    /// Reads what every node that did something since the last check reports.
    fn check(&mut self) {
        for node in &mut self.nodes {
            if !std::mem::take(&mut node.dirty) {
                continue;
            }
            node.health = match &node.router {
                Some(r) => {
                    let h = r.topology.health();
                    (h.live, h.known)
                }
                None => (0, 0),
            };
        }
    }
}

/// What [`figures`] measured on one simulated cluster.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    /// Nodes.
    pub nodes: usize,
    /// Every node reports every node live, from a start all together, ms (`None`: not within
    /// the limit).
    pub converge_ms: Option<i64>,
    /// Every planned link (each node dials `dials` others) up, ms.
    pub links_ms: Option<i64>,
    /// Link messages per node until convergence (all kinds).
    pub start_messages: f64,
    /// Link bytes per node until convergence.
    pub start_bytes: f64,
    /// Links declared dead while both ends ran and could reach each other, all phases.
    pub false_deaths: usize,
    /// Idle bytes per link per second (both directions), after convergence.
    pub idle_bytes_per_link: f64,
    /// The busiest hub's links.
    pub hub_degree: usize,
    /// kill -9 of the busiest hub: every other node reports it gone, ms.
    pub crash_seen_ms: Option<i64>,
    /// Gossip messages per node sent because of the crash (until every node saw it, and 1 s).
    pub crash_messages: f64,
    /// Gossip bytes per node sent because of the crash.
    pub crash_bytes: f64,
    /// Checks at which some node reported fewer live nodes than were running, after the crash.
    pub under_reports: usize,
    /// Virtual seconds simulated.
    pub virtual_secs: f64,
    /// Events handled.
    pub events: u64,
}

/// Starts `config.nodes` nodes together, waits until every node sees every node (at most
/// `limit_us`), measures idle traffic for 5 s, then kills the busiest hub and waits until every
/// node sees it gone.
pub fn figures(config: SimConfig, limit_us: i64) -> Figures {
    let n = config.nodes;
    let mut sim = Sim::new(config);
    let mut f = Figures { nodes: n, ..Figures::default() };
    sim.start_all();
    let mut links_at = None;
    f.converge_ms = sim
        .run_until(limit_us, |s| {
            if links_at.is_none() && s.planned_links_up() {
                links_at = Some(s.now_us());
            }
            (0..s.len()).all(|i| s.health(i) == (n, n))
        })
        .map(|us| us / 1000);
    if f.converge_ms.is_some() && links_at.is_none() {
        let start = sim.now_us();
        links_at = sim.run_until(limit_us, |s| s.planned_links_up()).map(|took| start + took);
    }
    f.links_ms = links_at.map(|us| us / 1000);
    let t = sim.traffic().total();
    (f.start_messages, f.start_bytes) = (t.0 as f64 / n as f64, t.1 as f64 / n as f64);
    // Let stragglers finish, then measure a quiet cluster.
    sim.run_for(2_000_000);
    let before = sim.traffic();
    sim.run_for(5_000_000);
    let idle = sim.traffic().since(&before).total();
    f.idle_bytes_per_link = idle.1 as f64 / sim.links().max(1) as f64 / 5.0;
    let hub = sim.busiest();
    f.hub_degree = sim.router(hub).map_or(0, |r| r.links.len());
    let before = sim.traffic();
    sim.crash(hub);
    let running = sim.alive();
    let mut under = 0;
    f.crash_seen_ms = sim
        .run_until(limit_us, |s| {
            under += (0..s.len()).filter(|&i| s.running(i) && s.health(i).0 < running).count().min(1);
            (0..s.len()).filter(|&i| s.running(i)).all(|i| s.health(i) == (running, n))
        })
        .map(|us| us / 1000);
    let mut tail = 0;
    sim.run_until(1_000_000, |s| {
        tail += (0..s.len()).filter(|&i| s.running(i) && s.health(i).0 < running).count().min(1);
        false
    });
    f.under_reports = under + tail;
    let crash = sim.traffic().since(&before).gossip;
    (f.crash_messages, f.crash_bytes) = (crash.0 as f64 / running as f64, crash.1 as f64 / running as f64);
    f.false_deaths = sim.false_deaths();
    f.virtual_secs = sim.now_us() as f64 / 1e6;
    f.events = sim.events;
    f
}

#[cfg(test)]
mod tests;
