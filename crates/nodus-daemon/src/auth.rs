//! Who is on the other end of a connection: the facts the driver learns when it accepts or dials
//! one ([`Origin`]), the [`Principal`] the router derives from them, and the [`AccessPolicy`]
//! that says what each principal may do. The router applies it at one place; the driver never
//! decides who may do what.
//!
//! Principals: `internal` (built-in services in the daemon) and `owner` (a Unix socket peer
//! running as the daemon's user, root or an `[access] admin_uids` user, or any client that
//! presented the node's token with `AUTH`) may do everything; other local users and TCP clients
//! without the token get `[access] anonymous`. The token is 32 random bytes, 64 hex characters,
//! in `<data_dir>/auth.token` (mode 0600), created at the node's first start.

use nodus_wire::node::{Permission, Permissions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

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

/// Who a client connection acts for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    /// A built-in service inside the daemon.
    Internal,
    /// The node's operator: its own user (or root, or an `admin_uids` user) on the Unix socket,
    /// or a client that presented the token.
    Owner,
    /// Another local user, on the Unix socket.
    LocalUser {
        /// The peer's user id.
        uid: u32,
    },
    /// A TCP client that has not presented the token (or a local peer whose credentials the
    /// kernel did not report).
    Anonymous,
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Internal => f.write_str("internal"),
            Principal::Owner => f.write_str("owner"),
            Principal::LocalUser { uid } => write!(f, "uid:{uid}"),
            Principal::Anonymous => f.write_str("anonymous"),
        }
    }
}

/// What each principal may do, and the node's token.
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    /// The node's token (64 hex characters); `None`: no client can authenticate with `AUTH`.
    pub token: Option<String>,
    /// Where the token is kept (named in `forbidden` answers so people know where to find it).
    pub token_file: PathBuf,
    /// The daemon's own user id: Unix peers running as it are the owner.
    pub own_uid: u32,
    /// Further user ids treated as the owner on the Unix socket.
    pub admin_uids: Vec<u32>,
    /// What anonymous principals may do (TCP without the token, other local users).
    pub anonymous: Permissions,
}

impl AccessPolicy {
    /// A policy for a node running as `own_uid`, from the `[access]` configuration; `token` is
    /// what [`load_or_create_token`] returned.
    pub fn new(access: &crate::config::AccessConfig, token: Option<String>, token_file: PathBuf, own_uid: u32) -> Self {
        AccessPolicy {
            token,
            token_file,
            own_uid,
            admin_uids: access.admin_uids.clone(),
            anonymous: access.anonymous_permissions(),
        }
    }

    /// A policy with no token where everyone who is not internal is anonymous with `anonymous`
    /// permissions (for cores tested without a daemon).
    pub fn open(anonymous: Permissions) -> Self {
        AccessPolicy { token: None, token_file: PathBuf::new(), own_uid: u32::MAX, admin_uids: Vec::new(), anonymous }
    }

    /// The principal of a client connection from `origin` (cluster connections have none).
    pub fn principal(&self, origin: &Origin) -> Principal {
        match origin {
            Origin::Internal => Principal::Internal,
            Origin::Unix { creds: Some(c) }
                if c.uid == self.own_uid || c.uid == 0 || self.admin_uids.contains(&c.uid) =>
            {
                Principal::Owner
            }
            Origin::Unix { creds: Some(c) } => Principal::LocalUser { uid: c.uid },
            _ => Principal::Anonymous,
        }
    }

    /// What `principal` may do.
    pub fn permissions(&self, principal: &Principal) -> Permissions {
        match principal {
            Principal::Internal | Principal::Owner => Permissions::ALL,
            Principal::LocalUser { .. } | Principal::Anonymous => self.anonymous,
        }
    }

    /// True when `presented` is the node's token (compared in constant time).
    pub fn token_matches(&self, presented: &str) -> bool {
        self.token.as_deref().is_some_and(|t| constant_time_eq(t.as_bytes(), presented.as_bytes()))
    }

    /// What a principal lacking `need` is told: which permission and how to get it.
    pub fn forbidden_text(&self, need: Permission) -> String {
        format!(
            "this needs the {need} permission: run as the node's user or authenticate with the token in {}",
            self.token_file.display()
        )
    }
}

/// The user id this process runs as (the owner of `/proc/self`); `u32::MAX` (nobody) where it
/// cannot be read.
pub fn own_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid())
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Length of the token in hex characters (32 random bytes).
pub const TOKEN_HEX_LEN: usize = 64;

/// Errors reading or creating the token file.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file could not be read, created or written.
    #[error("cannot use the token file {path}: {source}")]
    Io {
        /// The token file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file exists but does not hold a token.
    #[error(
        "the token file {path} does not hold 64 hex characters: remove it and a new token is created at the next start"
    )]
    Malformed {
        /// The token file.
        path: PathBuf,
    },
    /// Other users could read the token.
    #[error("the token file {path} is readable by other users (mode {mode:o}): run `chmod 600 {path}`")]
    Exposed {
        /// The token file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// Reads the node's token from `path`, creating it (32 random bytes as 64 hex characters, mode
/// 0600) when the file does not exist.
///
/// Fails when the file cannot be read or created, does not hold a token, or can be read by users
/// other than its owner.
pub fn load_or_create_token(path: &Path) -> Result<String, TokenError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let io = |source| TokenError::Io { path: path.to_path_buf(), source };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let mode = std::fs::metadata(path).map_err(io)?.mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(TokenError::Exposed { path: path.to_path_buf(), mode });
            }
            let token = text.trim();
            if token.len() != TOKEN_HEX_LEN || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(TokenError::Malformed { path: path.to_path_buf() });
            }
            Ok(token.to_ascii_lowercase())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; TOKEN_HEX_LEN / 2];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
            let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
            f.write_all(format!("{token}\n").as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
            Ok(token)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_created_once_private_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("auth.token");
        let t = load_or_create_token(&path).unwrap();
        assert_eq!(t.len(), TOKEN_HEX_LEN);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(load_or_create_token(&path).unwrap(), t, "the same token after a restart");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(load_or_create_token(&path), Err(TokenError::Exposed { .. })));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "short\n").unwrap();
        assert!(matches!(load_or_create_token(&path), Err(TokenError::Malformed { .. })));
    }

    #[test]
    fn principals_follow_the_peer_credentials() {
        let access = crate::config::Config::default().access;
        let policy = AccessPolicy::new(&access, Some("ab".repeat(32)), PathBuf::from("t"), 1000);
        let unix = |uid| Origin::Unix { creds: Some(Creds { uid, gid: uid, pid: None }) };
        assert_eq!(policy.principal(&unix(1000)), Principal::Owner);
        assert_eq!(policy.principal(&unix(0)), Principal::Owner);
        assert_eq!(policy.principal(&unix(1001)), Principal::LocalUser { uid: 1001 });
        assert_eq!(policy.principal(&Origin::Unix { creds: None }), Principal::Anonymous);
        let tcp = Origin::Tcp { peer: "127.0.0.1:9".parse().unwrap() };
        assert_eq!(policy.principal(&tcp), Principal::Anonymous);
        let anon = policy.permissions(&Principal::Anonymous);
        assert!(anon.allows(Permission::Send) && anon.allows(Permission::Register) && anon.allows(Permission::Status));
        assert!(!anon.allows(Permission::Sniff) && !anon.allows(Permission::Admin));
        assert!(policy.token_matches(&"ab".repeat(32)));
        assert!(!policy.token_matches(&"ab".repeat(31)) && !policy.token_matches(&"ba".repeat(32)));
        assert!(!AccessPolicy::open(anon).token_matches(""));
    }
}
