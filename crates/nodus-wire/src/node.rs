//! The node's own protocol, typed: requests a client sends to its node ([`NodeRequest`]), what
//! each needs ([`Permission`]), and the messages nodes exchange on a cluster link ([`LinkMsg`]).
//!
//! Each is parsed once from a [`Message`] with `TryFrom` (a failure says why, in the words the
//! node sends back in `UNKNOWN` or `INVALID`) and written back with `to_message`, so node, client
//! and CLI share one definition of every command. [`NodeRequest::permission`] is an exhaustive
//! match: a new command cannot be added without deciding who may run it.

use crate::{valid_name, Message};
use bytes::Bytes;
use std::fmt;

/// Service name under which the node itself answers (also reached with an empty service).
pub const NODE_SERVICE: &str = "node";

/// Commands that are answers or reports. Nobody answers them, whatever they carry: an error is
/// never answered with an error (two components doing so would loop forever).
pub const ANSWER_COMMANDS: [&str; 6] =
    ["ERROR", "UNKNOWN", "INVALID", "SERVICE_UNAVAILABLE", "QUITTING", "TRANSMISSION_REPORT"];

/// True when a component may answer `msg` with an error or a report: it is not a reply (no
/// `reply_to`) and not itself an error or a report ([`ANSWER_COMMANDS`]).
pub fn answerable(msg: &Message) -> bool {
    msg.envelope.reply_to == 0 && !ANSWER_COMMANDS.contains(&msg.command.as_str())
}

/// One thing a principal may be allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Permission {
    /// Read-only node queries: status, info, services, cluster and clock state, ping; app lists.
    Status,
    /// Send messages and requests to services.
    Send,
    /// Register a service name.
    Register,
    /// See copies of other connections' traffic.
    Sniff,
    /// Deploy, start, stop and remove apps, stop the node, forget nodes and shut the cluster
    /// down. Implies every other permission.
    Admin,
}

impl Permission {
    /// Every permission, strongest first.
    pub const ALL: [Permission; 5] =
        [Permission::Admin, Permission::Sniff, Permission::Register, Permission::Send, Permission::Status];

    /// The word used in configuration files and on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Permission::Status => "status",
            Permission::Send => "send",
            Permission::Register => "register",
            Permission::Sniff => "sniff",
            Permission::Admin => "admin",
        }
    }

    fn bit(self) -> u8 {
        match self {
            Permission::Status => 1,
            Permission::Send => 2,
            Permission::Register => 4,
            Permission::Sniff => 8,
            Permission::Admin => 16,
        }
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Permission {
    type Err = PermissionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Permission::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| PermissionError(s.to_string()))
    }
}

/// A permission name that does not exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown permission {0:?}: use status, send, register, sniff or admin")]
pub struct PermissionError(pub String);

/// A set of [`Permission`]s. `admin` implies all the others (a set with `admin` holds them all).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Permissions(u8);

/// `admin` brings every other bit with it, so equal sets have equal bits.
const fn normal(bits: u8) -> u8 {
    if bits & 16 != 0 {
        31
    } else {
        bits
    }
}

impl Permissions {
    /// Nothing allowed.
    pub const NONE: Permissions = Permissions(0);
    /// Everything allowed.
    pub const ALL: Permissions = Permissions(31);

    /// The set of `perms`.
    pub fn of(perms: &[Permission]) -> Permissions {
        Permissions(normal(perms.iter().fold(0, |acc, p| acc | p.bit())))
    }

    /// The set from its wire bits; `None` when a bit names no permission.
    pub fn from_bits(bits: u8) -> Option<Permissions> {
        (bits & !Permissions::ALL.0 == 0).then_some(Permissions(normal(bits)))
    }

    /// The wire bits.
    pub fn bits(self) -> u8 {
        self.0
    }

    /// True when nothing is allowed.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// True when `p` is allowed (directly, or through `admin`).
    pub fn allows(self, p: Permission) -> bool {
        self.0 & p.bit() != 0
    }

    /// What both sets allow (`admin ∩ {send}` is `{send}`).
    pub fn intersect(self, other: Permissions) -> Permissions {
        Permissions(self.0 & other.0)
    }

    /// The set without `p` (without `admin`, everything else stays).
    pub fn without(self, p: Permission) -> Permissions {
        Permissions(self.0 & !p.bit())
    }
}

impl fmt::Display for Permissions {
    /// Comma-separated names, strongest first (`admin,sniff,register,send,status`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for p in Permission::ALL {
            if self.0 & p.bit() != 0 {
                if !first {
                    f.write_str(",")?;
                }
                first = false;
                f.write_str(p.name())?;
            }
        }
        Ok(())
    }
}

impl std::str::FromStr for Permissions {
    type Err = PermissionError;

    /// A comma-separated list of names; empty means none.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut bits = 0;
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            bits |= name.parse::<Permission>()?.bit();
        }
        Ok(Permissions(normal(bits)))
    }
}

/// What `FORGET` names: a node by name, or by the address it was known at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForgetTarget {
    /// `server=NAME`.
    Server(String),
    /// `ip=ADDR` (an IP, or `ip:port`).
    Ip(String),
}

/// A request to the node itself (a message whose service is empty, `node` or `communicatord`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeRequest {
    /// `REGISTER service=NAME;version=1`: this connection becomes an instance of `service`.
    Register {
        /// The service name (checked: not empty, no wildcards, not reserved).
        service: String,
    },
    /// `UNREGISTER`: this connection stops being an instance.
    Unregister,
    /// `COMMANDS list=A,B`: the commands this connection understands.
    Commands {
        /// The commands, as listed.
        list: Vec<String>,
    },
    /// `AUTH token=HEX`: authenticate this connection with the node's token.
    Auth {
        /// The token presented.
        token: String,
    },
    /// `SERVICE_STATUS service=NAME`.
    ServiceStatus {
        /// The service asked about.
        service: String,
    },
    /// `LIST_SERVICES [scope=cluster]`.
    ListServices {
        /// Also list every live node's services.
        cluster: bool,
    },
    /// `INFO`: the node's state and counters.
    Info,
    /// `SNIFF [service=S;command=C]`: copies of matching traffic to this connection.
    Sniff {
        /// Only messages to or from this service.
        service: Option<String>,
        /// Only messages with this command.
        command: Option<String>,
    },
    /// `PING`, answered `PONG`.
    Ping,
    /// `STOP`: a graceful shutdown of this node.
    Stop,
    /// `CLUSTER_STATUS`.
    ClusterStatus,
    /// `CLOCK_STATUS`.
    ClockStatus,
    /// `CLUSTER_INFO`: nodes, links and quorum.
    ClusterInfo,
    /// `FORGET server=NAME` or `FORGET ip=ADDR`: remove a node everywhere.
    Forget(ForgetTarget),
    /// `SHUTDOWN`: stop every node of the cluster.
    Shutdown,
}

/// Why a message to the node is not a request it runs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No such command (the node answers `UNKNOWN command=X`).
    #[error("unknown command {0}")]
    Unknown(String),
    /// A known command with missing or bad parameters (the node answers `INVALID` with this text).
    #[error("{0}")]
    Invalid(String),
}

/// True when `name` can be registered as a service: a valid, non-empty name without wildcards
/// that is not one of the node's own names.
pub fn registrable(name: &str) -> bool {
    !name.is_empty()
        && valid_name(name)
        && !name.contains(['*', '?'])
        && !matches!(name, "." | NODE_SERVICE | "communicatord")
}

impl TryFrom<&Message> for NodeRequest {
    type Error = RequestError;

    fn try_from(m: &Message) -> Result<Self, Self::Error> {
        let invalid = |text: &str| Err(RequestError::Invalid(text.to_string()));
        Ok(match m.command.as_str() {
            "REGISTER" => {
                let Some(service) = m.get("service") else { return invalid("REGISTER needs service=NAME;version=1") };
                if m.get("version") != Some("1") {
                    return invalid("REGISTER needs version=1 (the only protocol version)");
                }
                if !registrable(service) {
                    return invalid(&format!("{service:?} cannot be registered as a service name"));
                }
                NodeRequest::Register { service: service.to_string() }
            }
            "UNREGISTER" => NodeRequest::Unregister,
            "COMMANDS" => NodeRequest::Commands {
                list: m
                    .get("list")
                    .unwrap_or("")
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect(),
            },
            "AUTH" => match m.get("token") {
                Some(token) => NodeRequest::Auth { token: token.to_string() },
                None => return invalid("AUTH needs token=HEX (the node's token, in <data_dir>/auth.token)"),
            },
            "SERVICE_STATUS" => match m.get("service") {
                Some(service) => NodeRequest::ServiceStatus { service: service.to_string() },
                None => return invalid("SERVICE_STATUS needs service=NAME"),
            },
            "LIST_SERVICES" => NodeRequest::ListServices { cluster: m.get("scope") == Some("cluster") },
            "INFO" => NodeRequest::Info,
            "SNIFF" => NodeRequest::Sniff {
                service: m.get("service").map(String::from),
                command: m.get("command").map(String::from),
            },
            "PING" => NodeRequest::Ping,
            "STOP" => NodeRequest::Stop,
            "CLUSTER_STATUS" => NodeRequest::ClusterStatus,
            "CLOCK_STATUS" => NodeRequest::ClockStatus,
            "CLUSTER_INFO" => NodeRequest::ClusterInfo,
            "FORGET" => match (m.get("server"), m.get("ip")) {
                (Some(s), _) if !s.is_empty() => NodeRequest::Forget(ForgetTarget::Server(s.to_string())),
                (_, Some(ip)) if !ip.is_empty() => NodeRequest::Forget(ForgetTarget::Ip(ip.to_string())),
                _ => return invalid("FORGET needs server=NAME or ip=ADDR of a known node"),
            },
            "SHUTDOWN" => NodeRequest::Shutdown,
            other => return Err(RequestError::Unknown(other.to_string())),
        })
    }
}

impl NodeRequest {
    /// What the requesting principal must be allowed; `None` for `AUTH`, which anyone may try.
    pub fn permission(&self) -> Option<Permission> {
        match self {
            NodeRequest::Auth { .. } => None,
            NodeRequest::Register { .. } | NodeRequest::Unregister | NodeRequest::Commands { .. } => {
                Some(Permission::Register)
            }
            NodeRequest::ServiceStatus { .. }
            | NodeRequest::ListServices { .. }
            | NodeRequest::Info
            | NodeRequest::Ping
            | NodeRequest::ClusterStatus
            | NodeRequest::ClockStatus
            | NodeRequest::ClusterInfo => Some(Permission::Status),
            NodeRequest::Sniff { .. } => Some(Permission::Sniff),
            NodeRequest::Stop | NodeRequest::Forget(_) | NodeRequest::Shutdown => Some(Permission::Admin),
        }
    }

    /// True for requests that act on the connection that sends them; they make no sense coming
    /// from another node, which can only forward its clients' requests.
    pub fn connection_scoped(&self) -> bool {
        match self {
            NodeRequest::Register { .. }
            | NodeRequest::Unregister
            | NodeRequest::Commands { .. }
            | NodeRequest::Auth { .. }
            | NodeRequest::Sniff { .. } => true,
            NodeRequest::ServiceStatus { .. }
            | NodeRequest::ListServices { .. }
            | NodeRequest::Info
            | NodeRequest::Ping
            | NodeRequest::Stop
            | NodeRequest::ClusterStatus
            | NodeRequest::ClockStatus
            | NodeRequest::ClusterInfo
            | NodeRequest::Forget(_)
            | NodeRequest::Shutdown => false,
        }
    }

    /// The request as a message to the node (no address, no envelope).
    pub fn to_message(&self) -> Message {
        match self {
            NodeRequest::Register { service } => Message::new("REGISTER").param("service", service).param("version", 1),
            NodeRequest::Unregister => Message::new("UNREGISTER"),
            NodeRequest::Commands { list } => Message::new("COMMANDS").param("list", list.join(",")),
            NodeRequest::Auth { token } => Message::new("AUTH").param("token", token),
            NodeRequest::ServiceStatus { service } => Message::new("SERVICE_STATUS").param("service", service),
            NodeRequest::ListServices { cluster: false } => Message::new("LIST_SERVICES"),
            NodeRequest::ListServices { cluster: true } => Message::new("LIST_SERVICES").param("scope", "cluster"),
            NodeRequest::Info => Message::new("INFO"),
            NodeRequest::Sniff { service, command } => {
                let mut m = Message::new("SNIFF");
                if let Some(s) = service {
                    m = m.param("service", s);
                }
                if let Some(c) = command {
                    m = m.param("command", c);
                }
                m
            }
            NodeRequest::Ping => Message::new("PING"),
            NodeRequest::Stop => Message::new("STOP"),
            NodeRequest::ClusterStatus => Message::new("CLUSTER_STATUS"),
            NodeRequest::ClockStatus => Message::new("CLOCK_STATUS"),
            NodeRequest::ClusterInfo => Message::new("CLUSTER_INFO"),
            NodeRequest::Forget(ForgetTarget::Server(s)) => Message::new("FORGET").param("server", s),
            NodeRequest::Forget(ForgetTarget::Ip(ip)) => Message::new("FORGET").param("ip", ip),
            NodeRequest::Shutdown => Message::new("SHUTDOWN"),
        }
    }
}

/// A message between two nodes about their link (addressed to no service, never a reply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkMsg {
    /// The dialer's opening: `CONNECT server=;version=1;addr=;nonce=`.
    Connect {
        /// The dialing node's name.
        server: String,
        /// Link protocol version (1).
        version: u32,
        /// Where the dialer's cluster listener is (may be empty).
        addr: String,
        /// A fresh random value the listener's proof must cover.
        nonce: String,
    },
    /// The listener's yes: `ACCEPT server=;addr=;nonce=[;proof=]`. With a cluster secret, `proof`
    /// shows the listener holds it (an HMAC over both names and both nonces) and the link is up
    /// only once the dialer answers with [`LinkMsg::Confirm`].
    Accept {
        /// The accepting node's name.
        server: String,
        /// Where its cluster listener is.
        addr: String,
        /// A fresh random value the dialer's proof must cover.
        nonce: String,
        /// The listener's proof, when a secret is configured.
        proof: Option<String>,
    },
    /// The dialer's proof that it holds the cluster secret: `CONFIRM proof=`.
    Confirm {
        /// HMAC over both names and both nonces.
        proof: String,
    },
    /// The listener's no: `REFUSE server=;reason=`.
    Refuse {
        /// The refusing node's name (may be empty).
        server: String,
        /// Why (`secret`, `self`, `duplicate`, `version`, ...).
        reason: String,
    },
    /// `DISCONNECT [reason=]`: the sender closes the link.
    Disconnect {
        /// Why, when given (`duplicate`).
        reason: Option<String>,
    },
    /// `LINK_PING t=`: heartbeat, stamped with the sender's clock (Unix ms).
    Ping {
        /// The sender's clock when sent.
        t: i64,
    },
    /// `LINK_PONG t0=;t1=`: the answer, echoing `t0` and stamped with the answering node's clock.
    Pong {
        /// The ping's `t`.
        t0: i64,
        /// The answering node's clock.
        t1: i64,
    },
    /// `GOSSIP` with the link-state records as the payload (MessagePack).
    Gossip {
        /// The encoded records.
        records: Bytes,
    },
    /// `SUMMARY digest=;records=`: anti-entropy. A digest of the versions of every link-state
    /// record the sender holds (16 hex digits) and how many; a peer whose own differs sends its
    /// records.
    Summary {
        /// Digest of every (node, incarnation, sequence) held, in hex.
        digest: String,
        /// Records held.
        records: u64,
    },
    /// `FORGET server=`: remove a node from the cluster's memory, passed on to every node.
    Forget {
        /// The node to forget.
        server: String,
    },
    /// `SHUTDOWN`: stop, and pass it on.
    Shutdown,
}

/// Why a message on an established link is not a [`LinkMsg`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkMsgError {
    /// Not a link command (or addressed, or a reply): it is traffic to route.
    #[error("not a link message")]
    NotLink,
    /// A link command with missing or bad parameters.
    #[error("malformed {command}: {text}")]
    Malformed {
        /// The command.
        command: String,
        /// What is wrong.
        text: String,
    },
}

impl TryFrom<&Message> for LinkMsg {
    type Error = LinkMsgError;

    fn try_from(m: &Message) -> Result<Self, Self::Error> {
        if !m.to.is_empty() || m.envelope.reply_to != 0 {
            return Err(LinkMsgError::NotLink);
        }
        let bad = |text: &str| LinkMsgError::Malformed { command: m.command.clone(), text: text.to_string() };
        let int = |name: &str| -> Result<i64, LinkMsgError> {
            m.get(name).and_then(|v| v.parse().ok()).ok_or_else(|| bad(&format!("{name} must be an integer")))
        };
        let text = |name: &str| m.get(name).unwrap_or("").to_string();
        Ok(match m.command.as_str() {
            "CONNECT" => LinkMsg::Connect {
                server: text("server"),
                version: m.get("version").and_then(|v| v.parse().ok()).unwrap_or(0),
                addr: text("addr"),
                nonce: text("nonce"),
            },
            "ACCEPT" => LinkMsg::Accept {
                server: text("server"),
                addr: text("addr"),
                nonce: text("nonce"),
                proof: m.get("proof").map(String::from),
            },
            "CONFIRM" => LinkMsg::Confirm { proof: text("proof") },
            "REFUSE" => LinkMsg::Refuse { server: text("server"), reason: text("reason") },
            "DISCONNECT" => LinkMsg::Disconnect { reason: m.get("reason").map(String::from) },
            "LINK_PING" => LinkMsg::Ping { t: int("t")? },
            "LINK_PONG" => LinkMsg::Pong { t0: int("t0")?, t1: int("t1")? },
            "GOSSIP" => LinkMsg::Gossip { records: m.payload.clone() },
            "SUMMARY" => LinkMsg::Summary {
                digest: text("digest"),
                records: u64::try_from(int("records")?).map_err(|_| bad("records= is negative"))?,
            },
            "FORGET" => match m.get("server") {
                Some(s) if !s.is_empty() => LinkMsg::Forget { server: s.to_string() },
                _ => return Err(bad("server=NAME is missing")),
            },
            "SHUTDOWN" => LinkMsg::Shutdown,
            _ => return Err(LinkMsgError::NotLink),
        })
    }
}

impl LinkMsg {
    /// The message on the wire (the sending node stamps `from`).
    pub fn to_message(&self) -> Message {
        match self {
            LinkMsg::Connect { server, version, addr, nonce } => Message::new("CONNECT")
                .param("server", server)
                .param("version", version)
                .param("addr", addr)
                .param("nonce", nonce),
            LinkMsg::Accept { server, addr, nonce, proof } => {
                let m = Message::new("ACCEPT").param("server", server).param("addr", addr).param("nonce", nonce);
                match proof {
                    Some(p) => m.param("proof", p),
                    None => m,
                }
            }
            LinkMsg::Confirm { proof } => Message::new("CONFIRM").param("proof", proof),
            LinkMsg::Refuse { server, reason } => {
                Message::new("REFUSE").param("reason", reason).param("server", server)
            }
            LinkMsg::Disconnect { reason } => match reason {
                Some(r) => Message::new("DISCONNECT").param("reason", r),
                None => Message::new("DISCONNECT"),
            },
            LinkMsg::Ping { t } => Message::new("LINK_PING").param("t", t),
            LinkMsg::Pong { t0, t1 } => Message::new("LINK_PONG").param("t0", t0).param("t1", t1),
            LinkMsg::Gossip { records } => Message::new("GOSSIP").with_payload(records.clone()),
            LinkMsg::Summary { digest, records } => {
                Message::new("SUMMARY").param("digest", digest).param("records", records)
            }
            LinkMsg::Forget { server } => Message::new("FORGET").param("server", server),
            LinkMsg::Shutdown => Message::new("SHUTDOWN"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_implies_everything_and_sets_print_and_parse() {
        let admin = Permissions::of(&[Permission::Admin]);
        for p in Permission::ALL {
            assert!(admin.allows(p));
        }
        let basic: Permissions = "status, send,register".parse().unwrap();
        assert!(basic.allows(Permission::Send) && !basic.allows(Permission::Sniff));
        assert_eq!(basic.to_string(), "register,send,status");
        assert_eq!(Permissions::ALL.to_string(), "admin,sniff,register,send,status");
        assert_eq!("".parse::<Permissions>().unwrap(), Permissions::NONE);
        assert!("root".parse::<Permissions>().is_err());
        assert_eq!(admin.intersect(basic), basic);
        assert!(!admin.without(Permission::Admin).allows(Permission::Admin));
        assert!(admin.without(Permission::Admin).allows(Permission::Sniff));
        assert_eq!(Permissions::from_bits(32), None);
        assert_eq!(admin, Permissions::ALL);
        assert_eq!(Permissions::from_bits(16), Some(Permissions::ALL));
    }

    #[test]
    fn every_request_round_trips_through_its_message() {
        let all = [
            NodeRequest::Register { service: "svc".into() },
            NodeRequest::Unregister,
            NodeRequest::Commands { list: vec!["A".into(), "B".into()] },
            NodeRequest::Auth { token: "ab".into() },
            NodeRequest::ServiceStatus { service: "svc".into() },
            NodeRequest::ListServices { cluster: false },
            NodeRequest::ListServices { cluster: true },
            NodeRequest::Info,
            NodeRequest::Sniff { service: Some("s".into()), command: None },
            NodeRequest::Ping,
            NodeRequest::Stop,
            NodeRequest::ClusterStatus,
            NodeRequest::ClockStatus,
            NodeRequest::ClusterInfo,
            NodeRequest::Forget(ForgetTarget::Server("b".into())),
            NodeRequest::Forget(ForgetTarget::Ip("10.0.0.2".into())),
            NodeRequest::Shutdown,
        ];
        for r in all {
            assert_eq!(NodeRequest::try_from(&r.to_message()), Ok(r));
        }
    }

    #[test]
    fn bad_requests_say_why() {
        let parse = |m: Message| NodeRequest::try_from(&m);
        assert_eq!(parse(Message::new("NOPE")), Err(RequestError::Unknown("NOPE".into())));
        for bad in [
            Message::new("REGISTER").param("service", "x"),
            Message::new("REGISTER").param("service", "node").param("version", 1),
            Message::new("REGISTER").param("service", "a*").param("version", 1),
            Message::new("SERVICE_STATUS"),
            Message::new("FORGET"),
            Message::new("AUTH"),
        ] {
            assert!(matches!(parse(bad), Err(RequestError::Invalid(_))));
        }
    }

    #[test]
    fn only_read_only_requests_need_status_and_privileged_ones_need_admin() {
        assert_eq!(NodeRequest::Info.permission(), Some(Permission::Status));
        assert_eq!(NodeRequest::Sniff { service: None, command: None }.permission(), Some(Permission::Sniff));
        for r in [NodeRequest::Stop, NodeRequest::Shutdown, NodeRequest::Forget(ForgetTarget::Server("x".into()))] {
            assert_eq!(r.permission(), Some(Permission::Admin));
        }
        assert_eq!(NodeRequest::Auth { token: String::new() }.permission(), None);
    }

    #[test]
    fn link_messages_round_trip_and_traffic_is_not_one() {
        let all = [
            LinkMsg::Connect { server: "a".into(), version: 1, addr: "h:1".into(), nonce: "n1".into() },
            LinkMsg::Connect { server: "a".into(), version: 1, addr: String::new(), nonce: String::new() },
            LinkMsg::Accept { server: "b".into(), addr: "h:2".into(), nonce: "n2".into(), proof: Some("p".into()) },
            LinkMsg::Accept { server: "b".into(), addr: "h:2".into(), nonce: "n2".into(), proof: None },
            LinkMsg::Confirm { proof: "p".into() },
            LinkMsg::Refuse { server: "b".into(), reason: "secret".into() },
            LinkMsg::Disconnect { reason: Some("duplicate".into()) },
            LinkMsg::Disconnect { reason: None },
            LinkMsg::Ping { t: 5 },
            LinkMsg::Pong { t0: 5, t1: -7 },
            LinkMsg::Gossip { records: Bytes::from_static(b"\x80") },
            LinkMsg::Summary { digest: "00ff00ff00ff00ff".into(), records: 3 },
            LinkMsg::Forget { server: "c".into() },
            LinkMsg::Shutdown,
        ];
        for l in all {
            assert_eq!(LinkMsg::try_from(&l.to_message()), Ok(l));
        }
        assert_eq!(LinkMsg::try_from(&Message::new("SHUTDOWN").to("b:")), Err(LinkMsgError::NotLink));
        assert_eq!(LinkMsg::try_from(&Message::new("PONG")), Err(LinkMsgError::NotLink));
        let mut reply = Message::new("GOSSIP");
        reply.envelope.reply_to = 3;
        assert_eq!(LinkMsg::try_from(&reply), Err(LinkMsgError::NotLink));
        assert!(matches!(
            LinkMsg::try_from(&Message::new("LINK_PONG").param("t0", "x")),
            Err(LinkMsgError::Malformed { .. })
        ));
    }

    #[test]
    fn errors_and_replies_are_never_answerable() {
        assert!(answerable(&Message::new("FOO")));
        for c in ANSWER_COMMANDS {
            assert!(!answerable(&Message::new(c)));
        }
        let mut reply = Message::new("FOO");
        reply.envelope.reply_to = 1;
        assert!(!answerable(&reply));
    }
}
