//! Who a worker is: the unprivileged user worker processes run as ([`RunAs`]), and the process a
//! connection on a worker socket comes from ([`Peer`]), so that a handshake is accepted only from
//! the process the engine spawned for that uuid (or one of its children).
//!
//! A worker's `--uuid` and `--endpoint` are on its command line, which every local user can read
//! in `/proc`: knowing them must not be enough to serve an app's requests. The kernel tells who
//! connected (`SO_PEERCRED`, read when the connection is accepted); the engine walks that
//! process's ancestry in `/proc` and accepts the handshake only when the spawned process is in
//! it (a shell-script worker may fork the real worker).

use std::path::{Path, PathBuf};

/// The user worker processes run as, when it is not the daemon's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// User name (for messages and `$USER`).
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id (supplementary groups are dropped).
    pub gid: u32,
    /// Home directory (`$HOME` of the workers).
    pub home: PathBuf,
}

/// Why the user to run apps as cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunAsError {
    /// The daemon runs as root and no user was named.
    #[error(
        "the node runs as root and [apps] run_as is empty, so apps would run as root: set run_as to an unprivileged user (the default is \"nobody\"), or to \"root\" to allow it"
    )]
    Root,
    /// No such user.
    #[error("[apps] run_as names user {0:?}, which does not exist on this host; create it or name another")]
    UnknownUser(String),
    /// The user database could not be read.
    #[error("cannot look up user {name:?}: {error}")]
    Lookup {
        /// The name asked for.
        name: String,
        /// The system's error.
        error: String,
    },
}

impl RunAs {
    /// Looks up `name` (a user name, or a numeric uid).
    ///
    /// # Errors
    /// [`RunAsError::UnknownUser`] when there is no such user; [`RunAsError::Lookup`] when the
    /// user database cannot be read.
    pub fn lookup(name: &str) -> Result<RunAs, RunAsError> {
        use nix::unistd::{Uid, User};
        let found = match name.parse::<u32>() {
            Ok(uid) => User::from_uid(Uid::from_raw(uid)),
            Err(_) => User::from_name(name),
        };
        let user = found
            .map_err(|e| RunAsError::Lookup { name: name.to_string(), error: e.to_string() })?
            .ok_or_else(|| RunAsError::UnknownUser(name.to_string()))?;
        Ok(RunAs { name: user.name, uid: user.uid.as_raw(), gid: user.gid.as_raw(), home: user.dir })
    }

    /// The user a daemon's workers run as, by the node's policy: a daemon that is not root runs
    /// workers as itself (it cannot switch users; `run_as` is ignored); a root daemon runs them
    /// as `run_as`, and as root only when `run_as` names root explicitly. `None` means the
    /// daemon's own user.
    ///
    /// # Errors
    /// [`RunAsError::Root`] for a root daemon with an empty `run_as`, or the lookup's errors.
    pub fn for_daemon(run_as: &str) -> Result<Option<RunAs>, RunAsError> {
        if !is_root() {
            return Ok(None);
        }
        if run_as.trim().is_empty() {
            return Err(RunAsError::Root);
        }
        let user = RunAs::lookup(run_as.trim())?;
        Ok((user.uid != 0).then_some(user))
    }

    /// Where `path` cannot be reached by this user: the first directory on the way that it may
    /// not search, with that directory's mode (owner, group and other bits only; ACLs and
    /// supplementary groups are not considered, so this is a diagnosis, never a refusal).
    pub fn obstacle(&self, path: &Path) -> Option<(PathBuf, u32)> {
        use std::os::unix::fs::MetadataExt;
        let mut dirs: Vec<&Path> = path.ancestors().skip(1).collect();
        dirs.reverse();
        for dir in dirs {
            let Ok(meta) = std::fs::metadata(dir) else { continue };
            let mode = meta.mode() & 0o7777;
            let search = if meta.uid() == self.uid {
                mode & 0o100
            } else if meta.gid() == self.gid {
                mode & 0o010
            } else {
                mode & 0o001
            };
            if search == 0 {
                return Some((dir.to_path_buf(), mode));
            }
        }
        None
    }
}

/// Whether this process runs as root (effective uid 0), and so may start workers as another
/// user.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Most ancestors looked at above a connecting process (deeper trees are not workers' own).
const MAX_ANCESTRY: usize = 32;

/// The process on the other end of a worker connection, as the kernel reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Peer {
    /// The connecting process and its ancestors, nearest first (empty when the kernel did not
    /// say who connected).
    pub lineage: Vec<u32>,
}

impl Peer {
    /// The peer of a connected worker socket.
    pub fn of(stream: &tokio::net::UnixStream) -> Peer {
        let pid = stream.peer_cred().ok().and_then(|c| c.pid()).and_then(|p| u32::try_from(p).ok());
        Peer { lineage: pid.map(lineage).unwrap_or_default() }
    }

    /// Whether the connection comes from `pid` or one of its descendants.
    pub fn descends_from(&self, pid: u32) -> bool {
        pid != 0 && self.lineage.contains(&pid)
    }

    /// The connecting process, if known.
    pub fn pid(&self) -> Option<u32> {
        self.lineage.first().copied()
    }
}

/// `pid` and its ancestors up to (not including) init, nearest first, from `/proc`.
fn lineage(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut current = pid;
    while out.len() < MAX_ANCESTRY {
        match parent(current) {
            Some(p) if p > 1 && !out.contains(&p) => {
                out.push(p);
                current = p;
            }
            _ => break,
        }
    }
    out
}

/// The parent of `pid`, from `/proc/<pid>/stat` (its fourth field, after the command name in
/// parentheses, which may itself hold spaces and parentheses).
fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_parent(&stat)
}

fn parse_parent(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_is_read_after_the_command_name() {
        assert_eq!(parse_parent("42 (a) b) c) S 7 42 42 0 -1"), Some(7));
        assert_eq!(parse_parent("1 (init) S 0 1 1"), Some(0));
        assert_eq!(parse_parent("garbage"), None);
    }

    #[test]
    fn this_process_descends_from_its_parent() {
        let me = std::process::id();
        let peer = Peer { lineage: lineage(me) };
        assert_eq!(peer.pid(), Some(me));
        let parent = parent(me).unwrap();
        assert!(parent <= 1 || peer.descends_from(parent), "{peer:?}");
        assert!(!peer.descends_from(0));
        assert!(!Peer::default().descends_from(me));
    }

    #[test]
    fn obstacle_names_the_first_closed_directory() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let closed = dir.path().join("closed");
        std::fs::create_dir_all(closed.join("inner")).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        let nobody = RunAs { name: "x".into(), uid: 65_534, gid: 65_534, home: "/".into() };
        let found = nobody.obstacle(&closed.join("inner/app"));
        // Where the temporary directory's own parents are closed, that is what it finds.
        let (at, mode) = found.expect("an obstacle");
        assert!(closed.starts_with(&at), "{at:?}");
        if at == closed {
            assert_eq!(mode, 0o700);
        }
        assert_eq!(nobody.obstacle(Path::new("/")), None);
    }
}
