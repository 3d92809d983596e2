//! Deployed apps on a node: the on-disk store ([`store`]: `<data_dir>/apps/<name>/v<N>/`,
//! surviving restarts), the built-in `apps` service that deploys, starts, stops and inspects
//! them, and the bridge ([`bridge`]) that makes every deployed app a service.
//!
//! The `apps` service acts only on requests: a reply or an error sent to it is never answered
//! (an answer to an answer once looped forever between it and the node). Commands that change
//! apps run one at a time, in the order they arrived, on one task; read-only ones (`LIST`,
//! `INFO`, `CRASHLOG`, `DEPLOY_STATUS`) are answered meanwhile, so a long deploy can be watched.
//! File-system work runs on tokio's blocking pool, never on a runtime thread.

mod bridge;
mod store;

pub(crate) use bridge::is_request;
pub use store::{AppStore, Installed, Progress, Stage, StoreError, Wanted};

use crate::config::Config;
use crate::router::ConnId;
use crate::server::{Outbound, Shared};
use anyhow::{bail, Context};
use bridge::Bridges;
use nodus_engine::{AppSpec, Engine, EngineConfig, EngineError, RunAs};
use nodus_wire::Message;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::{debug, info, warn};

/// The built-in service's name.
pub const APPS_SERVICE: &str = "apps";
/// Read-only commands answered at once; more wait for one to finish.
const MAX_QUERIES: usize = 64;
/// Commands that change apps waiting for the one running.
const MAX_QUEUED_CHANGES: usize = 64;

/// The engine's settings for this node: worker sockets in `<data_dir>/run`, the locator's
/// address as `--locator`, and the user workers run as (`[apps] run_as`, see
/// [`RunAs::for_daemon`]).
///
/// Fails when `run_as` names no user, or is empty while the node runs as root.
pub(crate) fn engine_config(config: &Config, locator: Option<SocketAddr>) -> anyhow::Result<EngineConfig> {
    let mut ec = EngineConfig::new(config.data_dir.join("run"));
    if let Some(addr) = locator {
        ec.locator = addr.to_string();
    }
    ec.run_as = RunAs::for_daemon(&config.apps.run_as)?;
    match &ec.run_as {
        Some(user) => info!(user = %user.name, uid = user.uid, "app workers run as this user"),
        None if nodus_engine::identity::is_root() => warn!("app workers run as root, as [apps] run_as asks"),
        None => {}
    }
    Ok(ec)
}

/// A change of a deployed app, told in order to a service that follows apps (the task service:
/// an app's procedures are tasks while it is deployed, and run while it runs).
#[derive(Debug, Clone)]
pub(crate) enum AppChange {
    /// The app runs this spec (started, restarted, or deployed anew).
    Running(AppSpec),
    /// The app is deployed but does not run (stopped, or it could not start).
    Stopped(AppSpec),
    /// The app was removed.
    Removed(String),
    /// Every app stored on the node was told (as [`AppChange::Stopped`]) after the node's start:
    /// the follower knows them all.
    Listed,
}

/// Where the `apps` service tells a follower of app changes: each with a switch the follower
/// flips once it applied the change (the `apps` service waits for that, so an app deployed is
/// known to the follower when its deploy is answered).
pub(crate) type Follower = mpsc::Sender<(AppChange, oneshot::Sender<()>)>;

/// Why the `apps` service refused a request (besides the store's [`StoreError`]).
#[derive(Debug, thiserror::Error)]
enum Refusal {
    /// A parameter is missing or malformed.
    #[error("{0}")]
    Invalid(String),
    /// Another program's service has the name, or the node keeps it for itself.
    #[error(
        "service {0:?} is already registered on this node (by another program, or by the node itself): deploy the app under another name, or stop that service first"
    )]
    NameInUse(String),
}

/// The stable `code=` of an error answer.
fn error_code(e: &anyhow::Error) -> &'static str {
    match (e.downcast_ref::<StoreError>(), e.downcast_ref::<Refusal>()) {
        (Some(StoreError::NotDeployed(_)), _) => "unknown_app",
        (Some(StoreError::InvalidName(_)), _) | (_, Some(Refusal::Invalid(_))) => "invalid",
        (_, Some(Refusal::NameInUse(_))) => "name_in_use",
        _ => "apps",
    }
}

/// A request to the `apps` service, parsed once.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Command {
    Deploy { name: String, path: PathBuf, profile: Option<PathBuf> },
    Start { name: String },
    Stop { name: String },
    Restart { name: String },
    Scale { name: String, workers: usize },
    Remove { name: String },
    List,
    Info { name: String },
    Crashlog { name: String },
    DeployStatus { name: String },
}

const COMMANDS: &str = "DEPLOY, START, STOP, RESTART, SCALE, REMOVE, LIST, INFO, CRASHLOG or DEPLOY_STATUS";

impl Command {
    fn parse(req: &Message) -> Result<Command, Refusal> {
        let name = || {
            req.get("name").map(String::from).ok_or_else(|| Refusal::Invalid(format!("{} needs name=APP", req.command)))
        };
        Ok(match req.command.as_str() {
            "DEPLOY" => {
                // The node may run elsewhere than its client: a relative path would name another place.
                let absolute = |key: &str| match req.get(key).map(PathBuf::from) {
                    Some(p) if !p.is_absolute() => Err(Refusal::Invalid(format!(
                        "DEPLOY needs an absolute {key}, not {}; the nodus CLI sends one",
                        p.display()
                    ))),
                    other => Ok(other),
                };
                Command::Deploy {
                    name: name()?,
                    path: absolute("path")?
                        .ok_or_else(|| Refusal::Invalid("DEPLOY needs path=FILE_OR_DIR (absolute)".into()))?,
                    profile: absolute("profile")?,
                }
            }
            "START" => Command::Start { name: name()? },
            "STOP" => Command::Stop { name: name()? },
            "RESTART" => Command::Restart { name: name()? },
            "SCALE" => Command::Scale {
                name: name()?,
                workers: req.get("workers").and_then(|w| w.parse().ok()).ok_or_else(|| {
                    Refusal::Invalid("SCALE takes workers=N, the number of workers to keep running (0 or more)".into())
                })?,
            },
            "REMOVE" => Command::Remove { name: name()? },
            "LIST" => Command::List,
            "INFO" => Command::Info { name: name()? },
            "CRASHLOG" => Command::Crashlog { name: name()? },
            "DEPLOY_STATUS" => Command::DeployStatus { name: name()? },
            other => return Err(Refusal::Invalid(format!("unknown apps command {other}: use {COMMANDS}"))),
        })
    }

    /// Whether the command changes apps (and so waits its turn) rather than only reading.
    fn changes(&self) -> bool {
        !matches!(self, Command::List | Command::Info { .. } | Command::Crashlog { .. } | Command::DeployStatus { .. })
    }
}

/// Runs blocking file-system work on tokio's blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await.context("a file-system task of the apps service failed")?
}

/// The running side: the built-in `apps` service and one bridge per deployed app.
pub(crate) struct Apps {
    shared: Arc<Shared>,
    engine: Engine,
    service: tokio::task::JoinHandle<()>,
    bridges: Bridges,
}

impl Apps {
    /// Registers the `apps` service, starts every stored app the operator left started and
    /// makes the stopped ones services that say so. `follower` hears of every app's changes, in
    /// order, and says when it applied each (the `apps` service waits for it).
    pub(crate) fn start(shared: Arc<Shared>, engine: Engine, follower: Option<Follower>) -> Apps {
        let limits = shared.config().apps.clone();
        let store = AppStore::new(&shared.config().data_dir, limits.max_deploy_bytes);
        let bridges = Bridges::default();
        let ctx = Arc::new(Ctx {
            shared: shared.clone(),
            engine: engine.clone(),
            store,
            bridges: bridges.clone(),
            max_apps: limits.max_apps,
            deploying: Mutex::default(),
            follower,
        });
        use nodus_wire::node::Permission::{Admin, Status};
        let (conn, rx) = shared.attach_with(
            APPS_SERVICE,
            Some(&[
                ("DEPLOY", Admin),
                ("START", Admin),
                ("STOP", Admin),
                ("RESTART", Admin),
                ("SCALE", Admin),
                ("REMOVE", Admin),
                ("LIST", Status),
                ("INFO", Status),
                ("CRASHLOG", Status),
                ("DEPLOY_STATUS", Status),
            ]),
        );
        let service = tokio::spawn(async move {
            ctx.restore().await;
            ctx.serve(conn, rx).await;
        });
        Apps { shared, engine, service, bridges }
    }

    /// Stops every app's workers and the service.
    pub(crate) async fn shutdown(self) {
        self.service.abort();
        self.bridges.detach_all(&self.shared);
        self.engine.shutdown().await;
    }
}

struct Ctx {
    shared: Arc<Shared>,
    engine: Engine,
    store: AppStore,
    bridges: Bridges,
    max_apps: usize,
    /// Deployments in progress, by app.
    deploying: Mutex<HashMap<String, Arc<Progress>>>,
    /// Told of every app's changes.
    follower: Option<Follower>,
}

impl Ctx {
    /// After a node start: apps left started start again, stopped ones keep their names.
    async fn restore(&self) {
        let store = self.store.clone();
        let apps = blocking(move || Ok(store.list().into_iter().map(|n| (store.wanted(&n), n)).collect::<Vec<_>>()))
            .await
            .unwrap_or_default();
        // The follower knows every stored app before any starts (its tasks wait in the store
        // until it runs).
        for (_, name) in &apps {
            self.stopped(name).await;
        }
        self.tell(AppChange::Listed).await;
        for (wanted, name) in apps {
            if wanted == store::Wanted::Stopped {
                self.bridges.attach(&self.shared, &self.engine, &name, false);
                continue;
            }
            match self.start(&name).await {
                Ok(version) => info!(app = %name, %version, "app started"),
                Err(e) => warn!(app = %name, error = %format!("{e:#}"), "cannot start app"),
            }
        }
    }

    /// Tells the follower, if any, of a change, and waits until it applied it.
    async fn tell(&self, change: AppChange) {
        if let Some(f) = &self.follower {
            let (done, applied) = oneshot::channel();
            if f.send((change, done)).await.is_ok() {
                let _ = applied.await;
            }
        }
    }

    /// Tells the follower that `name` is deployed but does not run.
    async fn stopped(&self, name: &str) {
        if self.follower.is_some() {
            if let Ok((spec, _)) = self.load(name).await {
                self.tell(AppChange::Stopped(spec)).await;
            }
        }
    }

    /// Takes requests off the service's queue: changes go to one task, in order; reads are
    /// answered at once (at most [`MAX_QUERIES`] at a time).
    async fn serve(self: Arc<Self>, conn: ConnId, mut rx: mpsc::Receiver<Outbound>) {
        let (changes, mut queued) = mpsc::channel::<(Message, Command)>(MAX_QUEUED_CHANGES);
        let ctx = self.clone();
        // Owned by this future: when the service is stopped (aborted), so is the change in progress.
        let mut changer = tokio::task::JoinSet::new();
        changer.spawn(async move {
            while let Some((req, command)) = queued.recv().await {
                // A change may wait behind a long deploy: one whose time ran out is not run.
                if ctx.expired(conn, &req) {
                    continue;
                }
                let answer = ctx.execute(&req, command).await;
                ctx.answer(conn, &req, answer);
            }
        });
        let queries = Arc::new(Semaphore::new(MAX_QUERIES));
        while let Some(out) = rx.recv().await {
            let Outbound::Msg(req, _) = out else { continue };
            // Replies and errors are never acted on, so this service never answers an answer.
            if !bridge::is_request(&req) || self.expired(conn, &req) {
                continue;
            }
            let command = match Command::parse(&req) {
                Ok(c) => c,
                Err(e) => {
                    self.answer(conn, &req, Err(e.into()));
                    continue;
                }
            };
            if command.changes() {
                if changes.send((req, command)).await.is_err() {
                    break;
                }
                continue;
            }
            let Ok(permit) = queries.clone().acquire_owned().await else { break };
            let ctx = self.clone();
            tokio::spawn(async move {
                let answer = ctx.execute(&req, command).await;
                ctx.answer(conn, &req, answer);
                drop(permit);
            });
        }
        changer.abort_all();
    }

    /// True when `req` expired while it waited (the one rule, [`nodus_control::expiry`]): it is
    /// dropped, and its sender told.
    fn expired(&self, conn: ConnId, req: &Message) -> bool {
        let now = self.shared.now_ms();
        match nodus_control::expiry::admit(req, now, "the queue of the apps service") {
            nodus_control::expiry::Admit::Live => false,
            nodus_control::expiry::Admit::Expired { reply } => {
                if let Some(r) = reply.filter(|_| req.envelope.id != 0) {
                    self.shared.inject(conn, *r);
                }
                true
            }
        }
    }

    /// Sends the answer to a request that has an id; a message without one is never answered.
    fn answer(&self, conn: ConnId, req: &Message, answer: anyhow::Result<Message>) {
        if req.envelope.id == 0 {
            if let Err(e) = answer {
                debug!(command = %req.command, error = %format!("{e:#}"), "apps command without _id failed");
            }
            return;
        }
        let reply = answer.unwrap_or_else(|e| {
            req.reply("ERROR")
                .param("code", error_code(&e))
                .param("command", &req.command)
                .param("message", format!("{e:#}"))
        });
        self.shared.inject(conn, reply);
    }

    async fn execute(&self, req: &Message, command: Command) -> anyhow::Result<Message> {
        Ok(match command {
            Command::Deploy { name, path, profile } => {
                let (version, spec) = self.deploy(&name, path, profile).await?;
                let mut reply = req.reply("DEPLOYED").param("name", &name).param("version", version);
                if let Some(warning) = self.unreachable(&spec) {
                    reply = reply.param("warning", warning);
                }
                reply
            }
            Command::Start { name } => {
                let version = self.start(&name).await?;
                req.reply("STARTED").param("name", name).param("version", version)
            }
            Command::Restart { name } => {
                self.load(&name).await?;
                let _ = self.engine.stop(&name).await;
                let version = self.start(&name).await?;
                req.reply("STARTED").param("name", name).param("version", version)
            }
            Command::Stop { name } => {
                let (spec, _) = self.load(&name).await?;
                self.tell(AppChange::Stopped(spec)).await;
                self.bridges.attach(&self.shared, &self.engine, &name, false);
                self.publish();
                match self.engine.stop(&name).await {
                    Ok(()) | Err(EngineError::UnknownApp(_)) => {}
                    Err(e) => return Err(e.into()),
                }
                let store = self.store.clone();
                let app = name.clone();
                blocking(move || store.set_wanted(&app, Wanted::Stopped)).await?;
                req.reply("STOPPED").param("name", name)
            }
            Command::Scale { name, workers } => {
                let (spec, _) = self.load(&name).await?;
                let pool_limit = spec.profile.pool_limit;
                let set = workers.min(pool_limit);
                let store = self.store.clone();
                let app = name.clone();
                blocking(move || store.set_population(&app, set)).await?;
                // A stopped app gets it when it starts.
                let _ = self.engine.set_population(&name, set).await;
                let mut reply = req.reply("SCALED").param("name", &name).param("workers", set);
                if set < workers {
                    reply = reply.param("requested", workers).param("capped_by", "pool-limit").param(
                        "message",
                        format!(
                            "{name} runs at most {pool_limit} workers (pool-limit in its profile): {set} set, not {workers}; raise pool-limit and deploy again for more"
                        ),
                    );
                }
                reply
            }
            Command::Remove { name } => {
                let store = self.store.clone();
                let app = name.clone();
                if !blocking(move || Ok(store.is_deployed(&app))).await? {
                    return Err(StoreError::NotDeployed(name).into());
                }
                self.detach(&name);
                self.tell(AppChange::Removed(name.clone())).await;
                let _ = self.engine.remove(&name).await;
                let store = self.store.clone();
                let app = name.clone();
                blocking(move || store.remove(&app)).await?;
                req.reply("REMOVED").param("name", name)
            }
            Command::List => {
                let store = self.store.clone();
                let apps = blocking(move || {
                    Ok(store
                        .list()
                        .into_iter()
                        .map(|n| {
                            let version = store.load(&n).map(|(_, v)| v).unwrap_or_default();
                            (n, version)
                        })
                        .collect::<Vec<_>>())
                })
                .await?;
                let mut rows = Vec::new();
                for (name, version) in apps {
                    let (status, workers) = match self.engine.info(&name).await {
                        Ok(i) => (status_word(&i.status), i.workers.len()),
                        Err(_) => ("stopped".to_string(), 0),
                    };
                    rows.push(format!("{name}@{version}@{status}@{workers}"));
                }
                req.reply("APPS").param("list", rows.join(","))
            }
            Command::Info { name } => {
                let (spec, version) = self.load(&name).await?;
                let mut reply = req
                    .reply("APP_INFO")
                    .param("name", &name)
                    .param("version", version)
                    .param("executable", &spec.manifest.executable)
                    .param("dir", spec.dir.display());
                match self.engine.info(&name).await {
                    Ok(i) => {
                        if let nodus_engine::balance::AppStatus::Failed { reason } = &i.status {
                            reply = reply.param("reason", reason);
                        }
                        let workers: Vec<String> = i
                            .workers
                            .iter()
                            .map(|w| format!("{}@{}@{}@{}", w.uuid, w.pid, w.state.name(), w.load))
                            .collect();
                        reply = reply
                            .param("status", status_word(&i.status))
                            .param("queued", i.queued)
                            .param("population", i.population)
                            .param("sessions", i.sessions)
                            .param("workers", workers.join(","));
                    }
                    Err(_) => reply = reply.param("status", "stopped"),
                }
                reply
            }
            Command::Crashlog { name } => {
                // An unknown app is refused as INFO refuses it.
                self.load(&name).await?;
                let records = self.engine.crashlog(&name).unwrap_or_default();
                let mut text = String::new();
                for r in &records {
                    let status = r.status.as_ref().map_or("never started".to_string(), |s| s.to_string());
                    let at = r.at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                    text.push_str(&format!("worker {} at {at}: {status}", r.uuid));
                    if let Some(f) = &r.failure {
                        text.push_str(&format!(" ({f})"));
                    }
                    text.push('\n');
                    for line in &r.stderr {
                        text.push_str(&format!("    {line}\n"));
                    }
                }
                req.reply("CRASHLOG")
                    .param("name", name)
                    .param("entries", records.len())
                    .with_payload(text.into_bytes())
            }
            Command::DeployStatus { name } => {
                let progress = self.deploying.lock().unwrap_or_else(|e| e.into_inner()).get(&name).cloned();
                let (stage, done, total) = match progress {
                    Some(p) => {
                        let (stage, done, total) = p.get();
                        (stage.word(), done, total)
                    }
                    None => ("idle", 0, 0),
                };
                req.reply("DEPLOY_STATUS")
                    .param("name", name)
                    .param("stage", stage)
                    .param("done", done)
                    .param("total", total)
            }
        })
    }

    /// The stored spec and version of `name` (read on the blocking pool).
    async fn load(&self, name: &str) -> anyhow::Result<(AppSpec, String)> {
        let store = self.store.clone();
        let name = name.to_string();
        blocking(move || store.load(&name)).await
    }

    async fn deploy(&self, name: &str, path: PathBuf, profile: Option<PathBuf>) -> anyhow::Result<(String, AppSpec)> {
        let reserved = matches!(name, "node" | "communicatord" | nodus_engine::locator::LOCATOR_NAME);
        if reserved || (!self.bridges.contains(name) && self.shared.instances(name) > 0) {
            return Err(Refusal::NameInUse(name.to_string()).into());
        }
        let (store, app, max_apps) = (self.store.clone(), name.to_string(), self.max_apps);
        blocking(move || {
            let apps = store.list();
            if !apps.contains(&app) && apps.len() >= max_apps {
                bail!("this node already has {} apps (apps.max_apps)", max_apps);
            }
            Ok(())
        })
        .await?;
        let progress = Arc::new(Progress::default());
        self.deploying.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), progress.clone());
        let result = self.install(name, path, profile, progress).await;
        self.deploying.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
        result
    }

    async fn install(
        &self,
        name: &str,
        path: PathBuf,
        profile: Option<PathBuf>,
        progress: Arc<Progress>,
    ) -> anyhow::Result<(String, AppSpec)> {
        let (store, app, watched) = (self.store.clone(), name.to_string(), progress.clone());
        let installed = blocking(move || store.deploy(&app, &path, profile.as_deref(), &watched)).await?;
        progress.begin(Stage::Starting, 0);
        if let Err(e) = self.run(name, installed.spec.clone()).await {
            let store = self.store.clone();
            let undo = installed.clone();
            let _ = blocking(move || {
                store.rollback(&undo);
                Ok(())
            })
            .await;
            return Err(e);
        }
        Ok((installed.version, installed.spec))
    }

    /// Why workers of `spec` will not start, when the user they run as cannot reach their
    /// executable or socket (a warning: ACLs and supplementary groups are not looked at).
    fn unreachable(&self, spec: &AppSpec) -> Option<String> {
        let user = self.engine.run_as()?;
        let exe = spec.manifest.executable_path(&spec.dir);
        let socket = self.engine.socket_path(&spec.name);
        let (dir, mode) = user.obstacle(&exe).or_else(|| user.obstacle(&socket))?;
        Some(format!(
            "workers run as user {} ([apps] run_as), who cannot enter {} (mode {mode:04o}): they will fail to start; make it searchable, use a data directory that user can reach (--data-dir), or set run_as",
            user.name,
            dir.display()
        ))
    }

    async fn start(&self, name: &str) -> anyhow::Result<String> {
        let (spec, version) = self.load(name).await?;
        self.run(name, spec).await?;
        let store = self.store.clone();
        let app = name.to_string();
        blocking(move || store.set_wanted(&app, Wanted::Started)).await?;
        Ok(version)
    }

    /// Starts (or redeploys) `spec` in the engine with its stored population, makes it a
    /// started service, and publishes its endpoint.
    async fn run(&self, name: &str, spec: AppSpec) -> anyhow::Result<()> {
        let (store, app) = (self.store.clone(), name.to_string());
        let stored = blocking(move || Ok(store.population(&app))).await?;
        let population = spec.profile.pool_limit.min(stored);
        self.engine.start(spec.clone()).await?;
        self.engine.set_population(name, population).await?;
        self.bridges.attach(&self.shared, &self.engine, name, true);
        self.publish();
        self.tell(AppChange::Running(spec)).await;
        Ok(())
    }

    /// Tells the cluster where the started apps' Cocaine endpoints are, so every node's locator
    /// resolves them.
    fn publish(&self) {
        let Some(locator) = self.shared.locator() else { return };
        let mut endpoints = BTreeMap::new();
        for name in self.bridges.running() {
            match locator.endpoint(&name) {
                Some(Ok(endpoint)) => {
                    endpoints.insert(name, endpoint);
                }
                Some(Err(e)) => warn!(app = %name, error = %e, "cannot open the app's Cocaine endpoint"),
                None => {}
            }
        }
        self.shared.set_app_endpoints(endpoints);
    }

    fn detach(&self, name: &str) {
        if self.bridges.detach(&self.shared, name) {
            self.publish();
        }
    }
}

fn status_word(s: &nodus_engine::balance::AppStatus) -> String {
    match s {
        nodus_engine::balance::AppStatus::Running => "running".into(),
        nodus_engine::balance::AppStatus::Failed { .. } => "failed".into(),
        _ => "stopped".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_once_with_errors_that_say_what_is_missing() {
        let req = |command: &str| Message::new(command).param("name", "x");
        assert_eq!(Command::parse(&req("STOP")).unwrap(), Command::Stop { name: "x".into() });
        assert_eq!(
            Command::parse(&req("SCALE").param("workers", "3")).unwrap(),
            Command::Scale { name: "x".into(), workers: 3 }
        );
        let e = Command::parse(&req("SCALE").param("workers", "-1")).unwrap_err().to_string();
        assert!(e.contains("workers=N"), "{e}");
        let e = Command::parse(&req("DEPLOY").param("path", "my-app")).unwrap_err().to_string();
        assert!(e.contains("absolute path"), "{e}");
        assert!(Command::parse(&req("DEPLOY").param("path", "/my-app").param("profile", "p.toml")).is_err());
        let e = Command::parse(&Message::new("INFO")).unwrap_err().to_string();
        assert_eq!(e, "INFO needs name=APP");
        let e = Command::parse(&Message::new("FOO")).unwrap_err();
        assert_eq!(error_code(&e.into()), "invalid");
        assert!(!Command::parse(&req("INFO")).unwrap().changes());
        assert!(Command::parse(&req("REMOVE")).unwrap().changes());
        let unknown: anyhow::Error = StoreError::NotDeployed("x".into()).into();
        assert_eq!(error_code(&unknown.context("loading")), "unknown_app");
    }
}
