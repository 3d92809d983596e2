//! The tree of components by `pid` (who started whom), as one node sees it.
//!
//! A node keeps its own components (node, services, apps, worker processes, tasks, and anything
//! one of them started) and, for each, the children it started on other nodes as stubs (id, kind,
//! name and the node they live on), so a kill can be sent there. A component whose parent lives on
//! another node records that node in `parent_node`, so its error report can be sent there.
//!
//! Children are indexed by `pid` even before their parent is known here, so the order of
//! insertion does not matter; the tree refuses a component that would close a cycle. Siblings keep
//! their start order; kills go newest first (as an Erlang/OTP supervisor stops its children in
//! reverse start order).

use crate::control::MonitoringResult;
use crate::id::ComponentId;
use crate::kill::KillState;
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

/// Default bound on the number of components one node tracks.
pub const DEFAULT_MAX_COMPONENTS: usize = 65_536;

/// What a component is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ComponentKind {
    /// A nodus daemon.
    Node,
    /// A registered service (external program or built-in).
    Service,
    /// A deployed app.
    App,
    /// One worker process of an app.
    Worker,
    /// One task.
    Task,
    /// Anything else one of the above started and registered.
    Other,
}

impl ComponentKind {
    /// Lower-case name, as shown by `nodus tree`.
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentKind::Node => "node",
            ComponentKind::Service => "service",
            ComponentKind::App => "app",
            ComponentKind::Worker => "worker",
            ComponentKind::Task => "task",
            ComponentKind::Other => "other",
        }
    }
}

impl fmt::Display for ComponentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ComponentKind {
    type Err = String;

    /// Parses a kind name; the error lists the kinds.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "node" => ComponentKind::Node,
            "service" => ComponentKind::Service,
            "app" => ComponentKind::App,
            "worker" => ComponentKind::Worker,
            "task" => ComponentKind::Task,
            "other" => ComponentKind::Other,
            _ => return Err(format!("unknown component kind {s:?}: use node, service, app, worker, task or other")),
        })
    }
}

/// One component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Component {
    /// Its identity.
    pub id: ComponentId,
    /// What started it (`None` for a root such as a node).
    pub pid: Option<ComponentId>,
    /// What it is.
    pub kind: ComponentKind,
    /// Its name (service name, app name, worker uuid, task name, ...).
    pub name: String,
    /// The node (server name) it runs on.
    pub node: String,
    /// Where its parent runs, when that is another node and the parent is not in this tree.
    pub parent_node: Option<String>,
    /// Who created it (seed 000 `creator`).
    pub creator: String,
    /// When it was created, Unix ms.
    pub created_at: i64,
    /// When it expires, Unix ms (0 = never).
    pub expires_at: i64,
    /// True while it does work (the monitoring answer's `is_running`).
    pub is_running: bool,
}

impl Component {
    /// A running component on `node` with no parent; set the other fields with struct update
    /// syntax or the builders.
    pub fn new(id: ComponentId, kind: ComponentKind, name: impl Into<String>, node: impl Into<String>) -> Self {
        Component {
            id,
            pid: None,
            kind,
            name: name.into(),
            node: node.into(),
            parent_node: None,
            creator: String::new(),
            created_at: 0,
            expires_at: 0,
            is_running: true,
        }
    }

    /// Builder: started by `pid`.
    pub fn started_by(mut self, pid: ComponentId) -> Self {
        self.pid = Some(pid);
        self
    }

    /// Builder: started by `pid`, which runs on `node`.
    pub fn started_by_remote(mut self, pid: ComponentId, node: impl Into<String>) -> Self {
        self.pid = Some(pid);
        self.parent_node = Some(node.into());
        self
    }

    /// Its answer to monitoring, for the components the node answers for itself (the node, its
    /// built-in services, apps, tasks): name, host (its node), `is_running` and `message`, with
    /// the request's `sync_time` echoed.
    pub fn monitoring_result(&self, sync_time: i64, message: impl Into<String>) -> MonitoringResult {
        MonitoringResult {
            sync_time,
            name: self.name.clone(),
            host: self.node.clone(),
            is_running: self.is_running,
            message: message.into(),
        }
    }
}

/// Why the tree refused a change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    /// The tree holds its maximum number of components.
    #[error("the component tree is full ({max} components): raise control.max_components or stop some")]
    Full {
        /// The bound.
        max: usize,
    },
    /// A component with this id is already known.
    #[error("component {0} already exists")]
    Duplicate(ComponentId),
    /// The component would be its own ancestor.
    #[error("component {id} cannot be started by {pid}: {id} is already one of {pid}'s ancestors")]
    Cycle {
        /// The component inserted.
        id: ComponentId,
        /// Its claimed parent.
        pid: ComponentId,
    },
    /// A component on another node was inserted without a local parent; only children of local
    /// components are tracked across nodes.
    #[error("component {id} runs on node {node}: only the children of this node's components are tracked here")]
    RemoteWithoutLocalParent {
        /// The component inserted.
        id: ComponentId,
        /// Where it runs.
        node: String,
    },
    /// The component does not exist here.
    #[error("no component {0} on this node")]
    Unknown(ComponentId),
    /// The parent is being killed: what it starts now would outlive it.
    #[error("component {0} is being killed and cannot start new components")]
    ParentKilled(ComponentId),
}

pub(crate) struct Entry {
    pub(crate) component: Component,
    pub(crate) kill: Option<KillState>,
}

/// The components of one node, by id, with the start-order children of each.
pub struct Tree {
    local: String,
    max: usize,
    pub(crate) entries: HashMap<ComponentId, Entry>,
    /// Children by parent id (the parent may not be here), in start order.
    pub(crate) children: HashMap<ComponentId, Vec<ComponentId>>,
}

impl Tree {
    /// An empty tree for the node named `local`, holding at most `max_components`.
    pub fn new(local: impl Into<String>, max_components: usize) -> Self {
        Tree { local: local.into(), max: max_components, entries: HashMap::new(), children: HashMap::new() }
    }

    /// The node this tree belongs to.
    pub fn local_node(&self) -> &str {
        &self.local
    }

    /// True when `c` runs on this node.
    pub fn is_local(&self, c: &Component) -> bool {
        c.node == self.local
    }

    /// Number of components (local and remote stubs).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the tree holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds a component.
    ///
    /// Fails when the tree is full, the id exists, the parent chain would loop, or a component of
    /// another node has no local parent here.
    pub fn insert(&mut self, c: Component) -> Result<(), TreeError> {
        if self.entries.contains_key(&c.id) {
            return Err(TreeError::Duplicate(c.id));
        }
        if self.entries.len() >= self.max {
            return Err(TreeError::Full { max: self.max });
        }
        if !self.is_local(&c) {
            let local_parent = c.pid.and_then(|p| self.entries.get(&p)).is_some_and(|p| self.is_local(&p.component));
            if !local_parent {
                return Err(TreeError::RemoteWithoutLocalParent { id: c.id, node: c.node });
            }
        }
        if let Some(pid) = c.pid {
            if self.is_killing(pid) {
                return Err(TreeError::ParentKilled(pid));
            }
            let mut at = Some(pid);
            while let Some(a) = at {
                if a == c.id {
                    return Err(TreeError::Cycle { id: c.id, pid });
                }
                at = self.entries.get(&a).and_then(|e| e.component.pid);
            }
            self.children.entry(pid).or_default().push(c.id);
        }
        self.entries.insert(c.id, Entry { component: c, kill: None });
        Ok(())
    }

    /// The component `id`, if known.
    pub fn get(&self, id: ComponentId) -> Option<&Component> {
        self.entries.get(&id).map(|e| &e.component)
    }

    /// Records whether `id` is doing work; false when unknown.
    pub fn set_running(&mut self, id: ComponentId, running: bool) -> bool {
        match self.entries.get_mut(&id) {
            Some(e) => {
                e.component.is_running = running;
                true
            }
            None => false,
        }
    }

    /// The ids of the components `id` started, in start order.
    pub fn children(&self, id: ComponentId) -> &[ComponentId] {
        self.children.get(&id).map_or(&[], Vec::as_slice)
    }

    /// Everything `id` started, directly or not, depth first in start order (not `id` itself).
    pub fn descendants(&self, id: ComponentId) -> Vec<ComponentId> {
        self.walk(id).into_iter().skip(1).map(|(_, c)| c.id).collect()
    }

    /// `root` and everything below it, depth first in start order, with each one's depth (the
    /// root is at 0): what `nodus tree ID` draws. Empty when `root` is unknown.
    pub fn walk(&self, root: ComponentId) -> Vec<(usize, &Component)> {
        let mut out = Vec::new();
        let mut stack = vec![(0usize, root)];
        while let Some((depth, id)) = stack.pop() {
            let Some(e) = self.entries.get(&id) else { continue };
            out.push((depth, &e.component));
            for child in self.children(id).iter().rev() {
                stack.push((depth + 1, *child));
            }
        }
        out
    }

    /// The components whose parent is not in this tree (nodes, orphans, children of remote
    /// components), oldest id first so listings are stable.
    pub fn roots(&self) -> Vec<&Component> {
        let mut roots: Vec<&Component> = self
            .entries
            .values()
            .map(|e| &e.component)
            .filter(|c| c.pid.is_none_or(|p| !self.entries.contains_key(&p)))
            .collect();
        roots.sort_by_key(|c| c.id);
        roots
    }

    /// Every component, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Component> {
        self.entries.values().map(|e| &e.component)
    }

    /// The node the parent of `id` runs on (`None`: no parent, or unknown).
    pub fn parent_node(&self, id: ComponentId) -> Option<String> {
        let c = self.get(id)?;
        let pid = c.pid?;
        match self.get(pid) {
            Some(p) => Some(p.node.clone()),
            None => c.parent_node.clone().or_else(|| Some(self.local.clone())),
        }
    }

    /// True while a kill of `id` is in progress.
    pub fn is_killing(&self, id: ComponentId) -> bool {
        self.entries.get(&id).is_some_and(|e| e.kill.is_some())
    }

    /// Takes `id` out of the tree; its children stay (as orphans until it comes back).
    pub(crate) fn detach(&mut self, id: ComponentId) -> Option<Component> {
        let e = self.entries.remove(&id)?;
        if let Some(pid) = e.component.pid {
            if let Some(siblings) = self.children.get_mut(&pid) {
                siblings.retain(|s| *s != id);
                if siblings.is_empty() {
                    self.children.remove(&pid);
                }
            }
        }
        Some(e.component)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> ComponentId {
        ComponentId::new(n).unwrap()
    }

    fn comp(n: u64, pid: Option<u64>) -> Component {
        let mut c = Component::new(id(n), ComponentKind::Task, format!("c{n}"), "a");
        c.pid = pid.map(id);
        c
    }

    #[test]
    fn children_keep_start_order_and_walk_is_depth_first() {
        let mut t = Tree::new("a", 100);
        for (n, p) in [(1, None), (2, Some(1)), (3, Some(1)), (4, Some(2)), (5, Some(3))] {
            t.insert(comp(n, p)).unwrap();
        }
        assert_eq!(t.children(id(1)), &[id(2), id(3)]);
        assert_eq!(t.descendants(id(1)), vec![id(2), id(4), id(3), id(5)]);
        let walk: Vec<(usize, u64)> = t.walk(id(1)).into_iter().map(|(d, c)| (d, c.id.get())).collect();
        assert_eq!(walk, vec![(0, 1), (1, 2), (2, 4), (1, 3), (2, 5)]);
        assert_eq!(t.roots().iter().map(|c| c.id).collect::<Vec<_>>(), vec![id(1)]);
    }

    #[test]
    fn insertion_order_does_not_matter_but_cycles_are_refused() {
        let mut t = Tree::new("a", 100);
        t.insert(comp(2, Some(1))).unwrap();
        assert_eq!(t.roots().len(), 1, "2 is a root while 1 is unknown");
        t.insert(comp(1, None)).unwrap();
        assert_eq!(t.children(id(1)), &[id(2)]);
        t.insert(comp(3, Some(2))).unwrap();
        assert_eq!(t.insert(comp(4, Some(4))), Err(TreeError::Cycle { id: id(4), pid: id(4) }));
        // 5 → 6 → 5: the second insert would close the loop.
        t.insert(comp(5, Some(6))).unwrap();
        assert_eq!(t.insert(comp(6, Some(5))), Err(TreeError::Cycle { id: id(6), pid: id(5) }));
    }

    #[test]
    fn bounded_and_unique() {
        let mut t = Tree::new("a", 2);
        t.insert(comp(1, None)).unwrap();
        assert_eq!(t.insert(comp(1, None)), Err(TreeError::Duplicate(id(1))));
        t.insert(comp(2, None)).unwrap();
        assert_eq!(t.insert(comp(3, None)), Err(TreeError::Full { max: 2 }));
    }

    #[test]
    fn remote_children_are_tracked_under_local_parents_only() {
        let mut t = Tree::new("a", 100);
        t.insert(comp(1, None)).unwrap();
        let remote = Component::new(id(2), ComponentKind::Task, "r", "b").started_by(id(1));
        t.insert(remote).unwrap();
        assert_eq!(t.parent_node(id(2)).as_deref(), Some("a"));
        let stray = Component::new(id(3), ComponentKind::Task, "s", "b");
        assert!(matches!(t.insert(stray), Err(TreeError::RemoteWithoutLocalParent { .. })));
        // A local component started from another node knows where to report.
        let c = Component::new(id(4), ComponentKind::Task, "t", "a").started_by_remote(id(99), "c");
        t.insert(c).unwrap();
        assert_eq!(t.parent_node(id(4)).as_deref(), Some("c"));
        assert_eq!(t.parent_node(id(1)), None);
    }

    #[test]
    fn detached_components_leave_orphans() {
        let mut t = Tree::new("a", 100);
        t.insert(comp(1, None)).unwrap();
        t.insert(comp(2, Some(1))).unwrap();
        t.insert(comp(3, Some(2))).unwrap();
        assert!(t.detach(id(2)).is_some());
        assert!(t.children(id(1)).is_empty());
        let roots: Vec<_> = t.roots().iter().map(|c| c.id).collect();
        assert_eq!(roots, vec![id(1), id(3)]);
    }

    #[test]
    fn built_in_components_answer_monitoring_from_the_tree() {
        let mut t = Tree::new("a", 10);
        t.insert(comp(1, None)).unwrap();
        t.set_running(id(1), false);
        let r = t.get(id(1)).unwrap().monitoring_result(1234, "idle");
        assert_eq!((r.sync_time, r.name.as_str(), r.host.as_str(), r.is_running), (1234, "c1", "a", false));
        assert_eq!(r.message, "idle");
    }

    #[test]
    fn kind_names_round_trip() {
        for k in [
            ComponentKind::Node,
            ComponentKind::Service,
            ComponentKind::App,
            ComponentKind::Worker,
            ComponentKind::Task,
            ComponentKind::Other,
        ] {
            assert_eq!(k.as_str().parse::<ComponentKind>(), Ok(k));
        }
        assert!("daemon".parse::<ComponentKind>().is_err());
    }
}
