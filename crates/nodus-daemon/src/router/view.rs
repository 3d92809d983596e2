//! A read-only picture of the router (nodes, links, quorum, clock, services, counters) for the
//! node's dashboard and metrics: built under the router lock from what the router already
//! holds, no I/O, no clock (`now` is an argument).

use super::{Role, Router, Stats};
use crate::auth::Principal;

/// The router at one moment; see [`Router::view`].
#[derive(Debug, Clone, Default)]
pub struct RouterView {
    /// This node's server name.
    pub server: String,
    /// Milliseconds since the router started.
    pub uptime_ms: i64,
    /// A shutdown began.
    pub quitting: bool,
    /// Message counters.
    pub stats: Stats,
    /// Requests awaiting a reply.
    pub pending: usize,
    /// Messages in the cache.
    pub cached: usize,
    /// Client connections (built-in services included).
    pub clients: usize,
    /// Live nodes, this one included.
    pub live: usize,
    /// Known nodes, this one included.
    pub known: usize,
    /// `CLOCK_STABLE`.
    pub clock_stable: bool,
    /// Largest clock offset to a linked node, ms (0 before any is measured).
    pub max_offset_ms: i64,
    /// Every known node, by name.
    pub nodes: Vec<NodeState>,
    /// Links between nodes as their link-state records report them, each pair once.
    pub links: Vec<LinkState>,
    /// This node's own links with their measurements.
    pub own_links: Vec<OwnLink>,
    /// Services registered on this node, then those of the other live nodes.
    pub services: Vec<ServiceState>,
}

/// One known node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    /// Server name.
    pub name: String,
    /// Cluster address, when known.
    pub addr: String,
    /// Reachable over links both ends report.
    pub live: bool,
    /// This node.
    pub is_self: bool,
}

/// A link between two nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    /// One end (the smaller name).
    pub a: String,
    /// The other end.
    pub b: String,
    /// Both ends report it and both are live.
    pub up: bool,
}

/// One of this node's links.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnLink {
    /// The node at the other end.
    pub peer: String,
    /// Latest round trip, ms.
    pub rtt_ms: Option<i64>,
    /// Clock offset (median of recent samples), ms.
    pub offset_ms: Option<i64>,
    /// Suspicion of the failure detector.
    pub phi: f64,
}

/// One registered service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceState {
    /// Service name.
    pub name: String,
    /// The node it is registered on.
    pub node: String,
    /// Instances (connections) on this node; 1 for another node's (records say only "there").
    pub instances: usize,
    /// Registered by the node itself (a built-in service or an app's bridge).
    pub internal: bool,
}

impl Router {
    /// The router as the dashboard and the metrics show it.
    pub fn view(&self, now: i64) -> RouterView {
        let health = self.topology.health();
        let nodes: Vec<NodeState> = self
            .topology
            .known()
            .iter()
            .map(|(name, addr)| NodeState {
                name: name.clone(),
                addr: addr.clone(),
                live: self.topology.is_live(name),
                is_self: *name == self.server,
            })
            .collect();
        let records = self.topology.records();
        let mut links = Vec::new();
        for (name, record) in records {
            for peer in &record.links {
                let reported_back = records.get(peer).is_some_and(|r| r.links.contains(name));
                // Each pair once: from the smaller name, or from the only end that reports it.
                if reported_back && name > peer {
                    continue;
                }
                let (a, b) = if name < peer { (name, peer) } else { (peer, name) };
                let up = reported_back && self.topology.is_live(name) && self.topology.is_live(peer);
                links.push(LinkState { a: a.clone(), b: b.clone(), up });
            }
        }
        let own_links = self
            .links
            .iter()
            .filter_map(|(peer, id)| {
                let Role::Link(l) = &self.conns.get(id)?.role else { return None };
                Some(OwnLink {
                    peer: peer.clone(),
                    rtt_ms: l.samples.back().map(|s| s.0),
                    offset_ms: Self::link_offset(l),
                    phi: l.detector.phi(now),
                })
            })
            .collect();
        let mut services: Vec<ServiceState> = self
            .services
            .iter()
            .map(|(name, conns)| ServiceState {
                name: name.clone(),
                node: self.server.clone(),
                instances: conns.len(),
                internal: self.owners.get(name) == Some(&Principal::Internal),
            })
            .collect();
        for (node, record) in records {
            if *node == self.server || !self.topology.is_live(node) {
                continue;
            }
            services.extend(record.services.iter().map(|name| ServiceState {
                name: name.clone(),
                node: node.clone(),
                instances: 1,
                internal: false,
            }));
        }
        RouterView {
            server: self.server.clone(),
            uptime_ms: now - self.started_at,
            quitting: self.quitting,
            stats: self.stats.clone(),
            pending: self.pending.len(),
            cached: self.cache.len(),
            clients: self.conns.values().filter(|c| matches!(c.role, Role::Client(_))).count(),
            live: health.live,
            known: health.known,
            clock_stable: self.clock_stable(),
            max_offset_ms: self.max_offset_ms(),
            nodes,
            links,
            own_links,
            services,
        }
    }
}
