//! The built-in `flags` service: communicatord's flags, kept in `<data_dir>/flags` (one file per
//! flag, see [`nodus_control::flags`]) and visible cluster-wide.
//!
//! Requests (any program, any form; the permission each needs is the crate's):
//! `FLAG_UP` and `FLAG_DOWN` (`send`), `FLAG_CLEAR` (`admin`: lowers manual-down flags too),
//! `FLAG_LIST` and `FLAG_STATUS` (`status`). `FLAG_LIST scope=cluster` gathers the flags of every
//! live node: this node asks each one's `flags` service and merges the answers (each flag names
//! the node that raised it in `hostname`); a node that does not answer within
//! [`GATHER_TIMEOUT`] is named in `missing=`. Cluster-wide visibility is gathered on demand
//! rather than carried in gossip: gossip records are signed, bounded and flooded on every change,
//! and up to 100 flags of 4 KiB each per node do not belong there.
//!
//! The node raises its own flags through [`NodeFlags`] (unit `nodus`): the control plane's
//! watchers (`crate::control::health`) use it, and so can any other part of the node.
//!
//! File-system work (every raise and lower writes or deletes a file and syncs) runs on tokio's
//! blocking pool, one change at a time.

use crate::inproc::InProc;
use crate::server::{Outbound, Shared};
use nodus_control::flags::wire::{self, FLAGS};
use nodus_control::flags::{Flag, FlagError, FlagKey, FlagReply, FlagRequest, Flags, FlagsConfig, Raise, NODE_UNIT};
use nodus_control::Access;
use nodus_wire::node::Permission;
use nodus_wire::Message;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// The built-in service's name.
pub const FLAGS_SERVICE: &str = "flags";
/// How long `FLAG_LIST scope=cluster` waits for each node.
pub const GATHER_TIMEOUT: Duration = Duration::from_secs(3);

/// The permission of the access model a crate [`Access`] stands for.
pub(crate) fn permission(a: Access) -> Permission {
    match a {
        Access::Status => Permission::Status,
        Access::Send => Permission::Send,
        Access::Admin => Permission::Admin,
    }
}

/// The node's flags: the store behind a lock, shared by the `flags` service and the parts of the
/// node that raise their own flags. Cheap to clone.
#[derive(Clone)]
pub struct NodeFlags {
    inner: Arc<Mutex<Flags>>,
    clock: crate::Clock,
}

impl NodeFlags {
    /// Opens `dir` (creating it), loading every flag in it; files that cannot be loaded are
    /// logged and left in place.
    ///
    /// Fails when the directory cannot be created or listed.
    pub fn open(dir: PathBuf, hostname: &str, limit: usize, clock: crate::Clock) -> Result<NodeFlags, FlagError> {
        let mut config = FlagsConfig::new(hostname);
        config.limit = limit;
        let (flags, problems) = Flags::open(&dir, config, clock.now_ms())?;
        for p in problems {
            warn!(path = %p.path.display(), reason = %p.reason, "flag file not loaded");
        }
        let n = flags.set().count();
        if n > 0 {
            info!(flags = n, dir = %dir.display(), "raised flags loaded");
        }
        Ok(NodeFlags { inner: Arc::new(Mutex::new(flags)), clock })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Flags> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answers one request (on the blocking pool: it may write a file).
    ///
    /// Fails as the store does.
    pub async fn handle(&self, request: FlagRequest) -> Result<FlagReply, FlagError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let now = this.clock.now_ms();
            this.lock().handle(request, now)
        })
        .await
        .unwrap_or_else(|e| Err(FlagError::Storage { path: "flags".into(), error: e.to_string() }))
    }

    /// Every raised flag, the "too many flags" flag last.
    pub fn list(&self) -> Vec<Flag> {
        self.lock().set().list().into_iter().cloned().collect()
    }

    /// True when `key` is raised.
    pub fn is_raised(&self, key: &FlagKey) -> bool {
        self.lock().set().get(key).is_some()
    }

    /// Raises one of the node's own flags (unit `nodus`), unless it is already up with the same
    /// message (a watcher calls this on every check). Failures are logged.
    pub async fn raise_own(&self, section: &str, name: &str, message: String, priority: u8, tags: &[&str]) {
        let Ok(key) = FlagKey::new(NODE_UNIT, section, name) else {
            warn!(section, name, "not a valid flag name");
            return;
        };
        if self.lock().set().get(&key).is_some_and(|f| f.message == message && f.priority == priority) {
            return;
        }
        let mut raise = Raise::new(key.clone(), message).priority(priority).source(file!(), "node watcher", line!());
        for t in tags {
            raise = raise.tag(*t);
        }
        match self.handle(FlagRequest::Up(raise)).await {
            Ok(_) => info!(flag = %key, "node raised its flag"),
            Err(e) => warn!(flag = %key, error = %e, "cannot raise the node's flag"),
        }
    }

    /// Lowers one of the node's own flags if it is up. Failures are logged.
    pub async fn lower_own(&self, section: &str, name: &str) {
        let Ok(key) = FlagKey::new(NODE_UNIT, section, name) else { return };
        if !self.is_raised(&key) {
            return;
        }
        match self.handle(FlagRequest::Down(key.clone())).await {
            Ok(_) => info!(flag = %key, "node lowered its flag: the condition cleared"),
            Err(e) => warn!(flag = %key, error = %e, "cannot lower the node's flag"),
        }
    }

    /// Lowers every flag of the node's own (unit `nodus`, section `section`) whose name is not in
    /// `keep`. Used by watchers that raise one flag per subject (an app in crash loop).
    pub async fn lower_own_except(&self, section: &str, prefix: &str, keep: &[String]) {
        let stale: Vec<String> = self
            .list()
            .into_iter()
            .filter(|f| f.unit == NODE_UNIT && f.section == section && f.name.starts_with(prefix))
            .filter(|f| !keep.contains(&f.name))
            .map(|f| f.name)
            .collect();
        for name in stale {
            self.lower_own(section, &name).await;
        }
    }
}

/// Registers the `flags` service and serves it until the node stops.
pub(crate) fn start(shared: Arc<Shared>, flags: NodeFlags) -> tokio::task::JoinHandle<()> {
    let commands: Vec<(&str, Permission)> = wire::COMMANDS.iter().map(|(c, a)| (*c, permission(*a))).collect();
    let (conn, rx) = shared.attach_with(FLAGS_SERVICE, Some(&commands));
    let inproc = InProc::new(shared, conn);
    tokio::spawn(serve(inproc, flags, rx))
}

async fn serve(inproc: Arc<InProc>, flags: NodeFlags, mut rx: mpsc::Receiver<Outbound>) {
    while let Some(out) = rx.recv().await {
        let Outbound::Msg(msg, _) = out else { continue };
        let Some(msg) = inproc.settle(msg) else { continue };
        if !crate::apps::is_request(&msg) {
            continue;
        }
        let now = inproc.shared().now_ms();
        if let nodus_control::expiry::Admit::Expired { reply } =
            nodus_control::expiry::admit(&msg, now, "the queue of the flags service")
        {
            if let Some(r) = reply.filter(|_| msg.envelope.id != 0) {
                inproc.send(*r);
            }
            continue;
        }
        let (inproc, flags) = (inproc.clone(), flags.clone());
        // Changes are serialised by the store's lock; a cluster listing waits on other nodes, so
        // each request runs on its own task.
        tokio::spawn(async move {
            if let Some(reply) = answer(&inproc, &flags, &msg).await {
                if msg.envelope.id != 0 {
                    inproc.send(reply);
                }
            }
        });
    }
}

/// The answer to one request (`None`: nothing to answer).
async fn answer(inproc: &Arc<InProc>, flags: &NodeFlags, msg: &Message) -> Option<Message> {
    let request = match FlagRequest::from_message(msg) {
        Ok(r) => r,
        Err(e) => return Some(e.to_reply(msg)),
    };
    if matches!(request, FlagRequest::List) && msg.get("scope") == Some("cluster") {
        return Some(gather(inproc, flags, msg).await);
    }
    let result = flags.handle(request).await;
    Some(match result {
        Ok(reply) => reply.reply_to(msg),
        Err(e) => {
            debug!(command = %msg.command, error = %e, "flag request refused");
            e.to_reply(msg)
        }
    })
}

/// `FLAG_LIST scope=cluster`: this node's flags and every live node's.
async fn gather(inproc: &Arc<InProc>, flags: &NodeFlags, msg: &Message) -> Message {
    let nodes = inproc.shared().live_nodes();
    let mut asks = tokio::task::JoinSet::new();
    for node in nodes {
        let request = Message::new(wire::FLAG_LIST).to(&format!("{node}:{FLAGS_SERVICE}"));
        // Through this service's own connection: the answers come back on its queue.
        let inproc = inproc.clone();
        asks.spawn(async move { (node, inproc.ask(request, GATHER_TIMEOUT).await) });
    }
    let mut all = flags.list();
    let mut missing = Vec::new();
    while let Some(joined) = asks.join_next().await {
        let Ok((node, answer)) = joined else { continue };
        match answer.map(|m| FlagReply::from_message(&m)) {
            Ok(Ok(FlagReply::List(theirs))) => all.extend(theirs),
            other => {
                debug!(%node, answer = ?other.map(|r| r.map(|_| ())), "no flags from node");
                missing.push(node);
            }
        }
    }
    all.sort_by(|a, b| (&a.hostname, a.key()).cmp(&(&b.hostname, b.key())));
    missing.sort();
    let mut reply = FlagReply::List(all).reply_to(msg).param("scope", "cluster");
    if !missing.is_empty() {
        reply = reply.param("missing", missing.join(","));
    }
    debug_assert_eq!(reply.command, FLAGS);
    reply
}
