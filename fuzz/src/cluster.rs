//! Two real routers, `a` and `b`, linked over a handshake with a cluster secret, the way the
//! daemon builds them (defaults of the node configuration): the gossip target feeds `a` records
//! as `b` would send them, and the gossip seeds are what the two exchange.

use std::sync::OnceLock;

use nodus_daemon::auth::{AccessPolicy, Origin};
use nodus_daemon::router::{Action, ConnId, LinkPolicy, Router, RouterConfig, RouterLimits};
use nodus_daemon::topology::RecordKey;
use nodus_daemon::Config;
use nodus_wire::Message;

/// The node under test.
pub const ME: &str = "a";
/// Its neighbour.
pub const PEER: &str = "b";
/// `a`'s incarnation (its start time, as the daemon sets it).
pub const INCARNATION: i64 = 1_700_000_000_000;
/// `b`'s incarnation.
pub const PEER_INCARNATION: i64 = INCARNATION + 7;
/// The cluster secret both nodes hold.
pub const SECRET: &str = "fuzz-cluster-secret";
/// `a`'s end of the link (it dials `b`).
pub const LINK: ConnId = 10;
/// `b`'s end of the link.
pub const PEER_LINK: ConnId = 20;

/// The key records of this cluster are signed with (what `a` and `b` derive from [`SECRET`]).
pub fn record_key() -> RecordKey {
    RecordKey::from_secret(SECRET)
}

/// A router configuration for node `name` of the cluster: the node's defaults, with
/// [`SECRET`], advertised at `name:4041`.
pub fn config(name: &str) -> RouterConfig {
    // The defaults are parsed once (from the embedded default.toml), not once per input.
    static DEFAULTS: OnceLock<RouterConfig> = OnceLock::new();
    let defaults = DEFAULTS.get_or_init(|| {
        let c = Config::default();
        let mut links = LinkPolicy::from_config(&c);
        links.secret = SECRET.into();
        RouterConfig {
            server: String::new(),
            expected: Vec::new(),
            limits: RouterLimits::from_config(&c.limits),
            links,
            access: AccessPolicy::open(c.access.anonymous_permissions()),
            cluster_addr: String::new(),
            durable_cache: false,
            seed: 1,
        }
    });
    RouterConfig { server: name.into(), cluster_addr: format!("{name}:4041"), ..defaults.clone() }
}

/// `a` and `b` (started at their incarnations), `a` having dialed `b`, after they passed each
/// other every message of the handshake and the gossip that follows, at `now`; with every
/// message that crossed, in order.
///
/// # Panics
/// When the link does not come up (the handshake is broken, not the input).
pub fn linked(now: i64) -> (Router, Router, Vec<Message>) {
    let mut a = Router::new(config(ME), INCARNATION);
    let mut b = Router::new(config(PEER), PEER_INCARNATION);
    let (mut to_b, mut to_a) = (Vec::new(), Vec::new());
    let mut crossed = Vec::new();
    a.dial(LINK, Origin::Dialed { addr: format!("{PEER}:4041"), tls: false }, &mut to_b);
    b.connect(PEER_LINK, Origin::Cluster { peer: "127.0.0.2:5000".parse().expect("an address"), tls: false });
    for _ in 0..4 {
        for action in std::mem::take(&mut to_b) {
            if let Action::Deliver(LINK, m) = action {
                crossed.push(m.clone());
                b.handle(PEER_LINK, m, now, &mut to_a);
            }
        }
        for action in std::mem::take(&mut to_a) {
            if let Action::Deliver(PEER_LINK, m) = action {
                crossed.push(m.clone());
                a.handle(LINK, m, now, &mut to_b);
            }
        }
    }
    assert!(
        crossed.iter().any(|m| m.command == "CONFIRM") && crossed.iter().any(|m| m.command == "GOSSIP"),
        "a and b did not link: {crossed:?}"
    );
    (a, b, crossed)
}
