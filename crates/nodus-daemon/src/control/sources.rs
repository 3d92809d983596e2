//! Where the node's components come from, read fresh each time (never from events that could be
//! missed): the node itself, the router's registered services (built-in ones, apps' bridges, and
//! programs, with the `_pid`/`parent_node` they registered with), the engine's apps and worker
//! processes, and the parts of the node that run components of their own ([`ComponentSource`]:
//! the hook the tasks mount uses for tasks). The control service reconciles its
//! [`Tree`](nodus_control::Tree) with this.

use crate::router::ConnId;
use crate::server::Shared;
use nodus_control::{Component, ComponentId, ComponentKind};
use nodus_engine::balance::{AppStatus, WorkerId};

/// A part of the node that runs components of its own (tasks and what they start): it lists
/// them for the tree and stops one when the control plane kills it. The node answers monitoring
/// for them from what [`ComponentSource::components`] says (`is_running`).
///
/// The tasks mount registers one with [`crate::Daemon::add_component_source`] (a task's `pid`
/// is the component that submitted it, its kind [`ComponentKind::Task`]; a subtask's `pid` is its
/// task).
pub trait ComponentSource: Send + Sync {
    /// The components it runs now, with this node as their `node`.
    fn components(&self) -> Vec<Component>;
    /// Stops component `id` (a kill reached it after what it started): abort the task and its
    /// execution. It then leaves [`ComponentSource::components`], which the tree notices.
    fn stop(&self, id: ComponentId);
}

/// A [`ComponentSource`], compared by identity.
#[derive(Clone)]
pub(crate) struct Source(pub(crate) std::sync::Arc<dyn ComponentSource>);

impl PartialEq for Source {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Source {}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ComponentSource")
    }
}

/// How the node reaches a component of its own, to monitor or stop it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Handle {
    /// The node itself.
    Node,
    /// A built-in service (`apps`, `flags`, `control`): it stops with the node.
    BuiltIn,
    /// A program's registered service instance.
    Service { conn: ConnId, in_flight: u32 },
    /// A deployed app (its bridge).
    App { name: String, status: String },
    /// One worker process of an app.
    Worker { app: String, worker: WorkerId, pid: u32, state: String, load: usize },
    /// A component of a [`ComponentSource`] (a task).
    External(Source),
}

/// One reading of the node's components.
pub(crate) struct Snapshot {
    /// Every component with its handle, parents before children where both are here.
    pub(crate) components: Vec<(Component, Handle)>,
    /// Apps in the failed state (crash loop), with why.
    pub(crate) failed_apps: Vec<(String, String)>,
}

/// The stable id of the node `server` (the same across restarts, so other nodes can name it).
pub(crate) fn node_id(server: &str) -> ComponentId {
    ComponentId::derive(&[server, "node"])
}

/// The id of app `name` on `server`.
pub(crate) fn app_id(server: &str, name: &str) -> ComponentId {
    ComponentId::derive(&[server, "app", name])
}

/// Reads the node's components now.
pub(crate) async fn snapshot(shared: &Shared, started_at: i64) -> Snapshot {
    let server = shared.config().server_name.clone();
    let node = node_id(&server);
    let mut root = Component::new(node, ComponentKind::Node, &server, &server);
    root.created_at = started_at;
    root.creator = server.clone();
    let mut components = vec![(root, Handle::Node)];
    let mut apps = Vec::new();
    for r in shared.registered() {
        let Some(id) = ComponentId::new(r.component) else { continue };
        if shared.is_app_bridge(r.conn) {
            apps.push(r.service);
            continue;
        }
        let mut c = Component::new(id, ComponentKind::Service, &r.service, &server);
        c.created_at = r.since;
        c.creator = format!("{server}:{}", r.service);
        c.is_running = r.in_flight > 0;
        let parent = ComponentId::new(r.pid).filter(|p| *p != id);
        c = match (parent, r.parent_node) {
            (Some(p), Some(n)) => c.started_by_remote(p, n),
            (Some(p), None) => c.started_by(p),
            (None, _) => c.started_by(node),
        };
        let handle =
            if r.internal { Handle::BuiltIn } else { Handle::Service { conn: r.conn, in_flight: r.in_flight } };
        components.push((c, handle));
    }
    let mut failed_apps = Vec::new();
    apps.sort();
    apps.dedup();
    for name in apps {
        let id = app_id(&server, &name);
        let mut app = Component::new(id, ComponentKind::App, &name, &server).started_by(node);
        app.creator = format!("{server}:apps");
        let info = match shared.engine() {
            Some(engine) => engine.info(&name).await.ok(),
            None => None,
        };
        let Some(info) = info else {
            app.is_running = false;
            components.push((app, Handle::App { name, status: "stopped".into() }));
            continue;
        };
        let status = match &info.status {
            AppStatus::Running => "running".to_string(),
            AppStatus::Failed { reason } => {
                failed_apps.push((name.clone(), reason.clone()));
                "failed".to_string()
            }
            _ => "stopped".to_string(),
        };
        app.is_running = info.status == AppStatus::Running;
        components.push((app, Handle::App { name: name.clone(), status }));
        for w in info.workers {
            let wid = ComponentId::derive(&[&server, "worker", &name, &w.uuid]);
            let mut c =
                Component::new(wid, ComponentKind::Worker, format!("{name}/{}", w.uuid), &server).started_by(id);
            c.creator = format!("{server}:{name}");
            c.is_running = w.load > 0;
            let handle = Handle::Worker {
                app: name.clone(),
                worker: w.id,
                pid: w.pid,
                state: w.state.name().into(),
                load: w.load,
            };
            components.push((c, handle));
        }
    }
    for source in shared.component_sources() {
        for c in source.components() {
            if c.node == server {
                components.push((c, Handle::External(Source(source.clone()))));
            }
        }
    }
    Snapshot { components, failed_apps }
}
