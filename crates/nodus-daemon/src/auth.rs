//! Who is on the other end of a connection: the facts the driver learns when it accepts or dials
//! one ([`Origin`]). The router derives a connection's principal and permissions from these at
//! one place; the driver never decides who may do what.

use std::net::SocketAddr;

/// Where a connection came from, as the driver saw it when it accepted or dialed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// An in-process built-in service (`apps`, later `tasks`, `flags`, ...).
    Internal,
    /// The local Unix socket, with the peer's credentials as the kernel reported them
    /// (`SO_PEERCRED`); `None` where the kernel did not tell.
    Unix {
        /// The peer's credentials.
        creds: Option<Creds>,
    },
    /// The client TCP listener.
    Tcp {
        /// The peer's address.
        peer: SocketAddr,
    },
    /// Accepted on a cluster listener (plain TCP, or TLS after a verified handshake).
    Cluster {
        /// The peer's address.
        peer: SocketAddr,
        /// True when the connection is TLS with a certificate verified against the cluster CA.
        tls: bool,
    },
    /// Dialed by this node to a neighbour's cluster listener.
    Dialed {
        /// The address dialed.
        addr: String,
        /// True when the connection is TLS with a certificate verified against the cluster CA.
        tls: bool,
    },
    /// The UDP signal port (one way, nothing is sent back).
    Datagram,
}

/// A local peer's credentials, from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Creds {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Process id, where the platform reports it.
    pub pid: Option<i32>,
}

impl Origin {
    /// True for connections that may only become cluster links.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Origin::Cluster { .. } | Origin::Dialed { .. })
    }
}
