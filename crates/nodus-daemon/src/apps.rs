//! Deployed apps on a node: the on-disk store (`<data_dir>/apps/<name>/v<N>/`, surviving
//! restarts), the built-in `apps` service that deploys, starts, stops and inspects them, and the
//! bridge that makes every started app a service: a message to service `NAME` becomes an
//! invocation of the app's event (the `event` parameter, or the command in lower case), its
//! payload the one chunk sent, and the reply carries the worker's chunks.

use crate::router::ConnId;
use crate::server::{Outbound, Shared};
use anyhow::{bail, Context};
use bytes::Bytes;
use nodus_engine::balance::Rejection;
use nodus_engine::manifest::{Format, Manifest};
use nodus_engine::profile::Profile;
use nodus_engine::{AppSpec, CallDone, Engine, SessionError};
use nodus_wire::Message;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// Versions kept per app (the current one and the one before it).
const KEEP_VERSIONS: usize = 2;
/// Most files in one deployment.
const MAX_DEPLOY_FILES: usize = 10_000;

/// The apps deployed on this node, as directories under `<data_dir>/apps`.
#[derive(Debug, Clone)]
pub struct AppStore {
    root: PathBuf,
    max_bytes: u64,
}

/// Whether an app should run after a node restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    /// Started by the operator.
    Started,
    /// Stopped by the operator.
    Stopped,
}

impl AppStore {
    /// The store under `data_dir`.
    pub fn new(data_dir: &Path, max_bytes: u64) -> AppStore {
        AppStore { root: data_dir.join("apps"), max_bytes }
    }

    fn app_dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
            && !name.starts_with('.');
        if !ok {
            bail!("invalid app name {name:?}: use 1 to 64 characters from A-Z a-z 0-9 _ . - (not starting with .)");
        }
        Ok(self.root.join(name))
    }

    /// Names of the deployed apps, sorted.
    pub fn list(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.root) else { return Vec::new() };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("current").exists())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        names
    }

    /// Stores a new version of `name` from `source` and returns it, ready to start.
    ///
    /// `source` is an executable file (it becomes the app, run with no arguments), a directory
    /// holding `manifest.json` or `manifest.toml` and the app's files, or such a directory packed
    /// as a `.tar`, `.tar.gz` or `.tgz` archive. The profile comes
    /// from `profile`, else the directory's `profile.toml`/`profile.json`, else the defaults.
    ///
    /// Fails when the name, manifest or profile is invalid, the source is too large, or the files
    /// cannot be copied.
    pub fn deploy(&self, name: &str, source: &Path, profile: Option<&Path>) -> anyhow::Result<(AppSpec, String)> {
        let dir = self.app_dir(name)?;
        let meta = std::fs::metadata(source).with_context(|| format!("cannot read {}", source.display()))?;
        let version = self.next_version(&dir)?;
        let target = dir.join(&version);
        let staging = dir.join(format!(".{version}.staging"));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
        let result = (|| {
            let manifest = if meta.is_dir() {
                let mut budget = (self.max_bytes, MAX_DEPLOY_FILES);
                copy_tree(source, &staging, &mut budget)?;
                read_manifest(&staging)?
            } else if let Some(gzip) = archive_kind(source) {
                unpack(source, gzip, &staging, (self.max_bytes, MAX_DEPLOY_FILES))?;
                read_manifest(&staging)?
            } else {
                if meta.len() > self.max_bytes {
                    bail!(
                        "{} is {} bytes; the limit is {} (apps.max_deploy_bytes)",
                        source.display(),
                        meta.len(),
                        self.max_bytes
                    );
                }
                let file = source.file_name().context("the executable has no file name")?;
                std::fs::copy(source, staging.join(file))
                    .with_context(|| format!("cannot copy {}", source.display()))?;
                let m = Manifest::new(format!("./{}", file.to_string_lossy()));
                std::fs::write(staging.join("manifest.json"), manifest_json(&m))?;
                m
            };
            let profile = match profile {
                Some(p) => {
                    let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
                    let parsed = Profile::parse(&text, Format::from_path(p))?;
                    let ext = if Format::from_path(p) == Format::Json { "json" } else { "toml" };
                    let _ = std::fs::remove_file(staging.join("profile.json"));
                    let _ = std::fs::remove_file(staging.join("profile.toml"));
                    std::fs::write(staging.join(format!("profile.{ext}")), text)?;
                    parsed
                }
                None => read_profile(&staging)?,
            };
            Ok((manifest, profile))
        })();
        let (manifest, profile) = match result {
            Ok(v) => v,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(e);
            }
        };
        std::fs::rename(&staging, &target).with_context(|| format!("cannot install {}", target.display()))?;
        std::fs::write(dir.join("current"), &version)?;
        self.set_wanted(name, Wanted::Started)?;
        self.prune(&dir);
        Ok((AppSpec { name: name.to_string(), dir: target, manifest, profile }, version))
    }

    /// The current version of `name`.
    ///
    /// Fails when the app is not deployed or its files are damaged.
    pub fn load(&self, name: &str) -> anyhow::Result<(AppSpec, String)> {
        let dir = self.app_dir(name)?;
        let version = std::fs::read_to_string(dir.join("current"))
            .with_context(|| format!("app {name:?} is not deployed; use `nodus app deploy`"))?
            .trim()
            .to_string();
        let target = dir.join(&version);
        let manifest = read_manifest(&target)?;
        let profile = read_profile(&target)?;
        Ok((AppSpec { name: name.to_string(), dir: target, manifest, profile }, version))
    }

    /// Whether the operator last started or stopped `name`.
    pub fn wanted(&self, name: &str) -> Wanted {
        match self.app_dir(name).ok().and_then(|d| std::fs::read_to_string(d.join("state")).ok()).as_deref() {
            Some("stopped") => Wanted::Stopped,
            _ => Wanted::Started,
        }
    }

    /// Records whether `name` should run after a restart.
    ///
    /// Fails when the state file cannot be written.
    pub fn set_wanted(&self, name: &str, wanted: Wanted) -> anyhow::Result<()> {
        let word = if wanted == Wanted::Started { "started" } else { "stopped" };
        std::fs::write(self.app_dir(name)?.join("state"), word).context("cannot record the app's state")
    }

    /// The workers `name` keeps running when idle, as last set by `nodus app scale` (0 if never).
    pub fn population(&self, name: &str) -> usize {
        let file = self.app_dir(name).ok().and_then(|d| std::fs::read_to_string(d.join("population")).ok());
        file.and_then(|s| s.trim().parse().ok()).unwrap_or(0)
    }

    /// Records the population to apply whenever `name` starts.
    ///
    /// Fails when the file cannot be written.
    pub fn set_population(&self, name: &str, workers: usize) -> anyhow::Result<()> {
        std::fs::write(self.app_dir(name)?.join("population"), workers.to_string())
            .context("cannot record the app's population")
    }

    /// Deletes every version of `name`.
    ///
    /// Fails when the app is not deployed.
    pub fn remove(&self, name: &str) -> anyhow::Result<()> {
        let dir = self.app_dir(name)?;
        if !dir.join("current").exists() {
            bail!("app {name:?} is not deployed");
        }
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))
    }

    fn versions(dir: &Path) -> Vec<u64> {
        let mut v: Vec<u64> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok()?.strip_prefix('v')?.parse().ok())
            .collect();
        v.sort_unstable();
        v
    }

    fn next_version(&self, dir: &Path) -> anyhow::Result<String> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(format!("v{}", Self::versions(dir).last().map_or(1, |v| v + 1)))
    }

    fn prune(&self, dir: &Path) {
        let versions = Self::versions(dir);
        for v in &versions[..versions.len().saturating_sub(KEEP_VERSIONS)] {
            let _ = std::fs::remove_dir_all(dir.join(format!("v{v}")));
        }
    }
}

fn manifest_json(m: &Manifest) -> String {
    let args: Vec<String> = m.args.iter().map(|a| format!("{a:?}")).collect();
    format!("{{\n  \"executable\": {:?},\n  \"args\": [{}]\n}}\n", m.executable, args.join(", "))
}

fn read_manifest(dir: &Path) -> anyhow::Result<Manifest> {
    for (file, format) in [("manifest.json", Format::Json), ("manifest.toml", Format::Toml)] {
        let path = dir.join(file);
        if let Ok(text) = std::fs::read_to_string(&path) {
            return Manifest::parse(&text, format).with_context(|| format!("invalid {}", path.display()));
        }
    }
    bail!("{} has no manifest.json or manifest.toml", dir.display())
}

fn read_profile(dir: &Path) -> anyhow::Result<Profile> {
    for (file, format) in [("profile.toml", Format::Toml), ("profile.json", Format::Json)] {
        let path = dir.join(file);
        if let Ok(text) = std::fs::read_to_string(&path) {
            return Profile::parse(&text, format).with_context(|| format!("invalid {}", path.display()));
        }
    }
    Ok(Profile::default())
}

/// Copies a directory tree (files and directories; links are refused), within a byte and file
/// budget.
fn copy_tree(from: &Path, to: &Path, budget: &mut (u64, usize)) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let dest = to.join(entry.file_name());
        if kind.is_dir() {
            std::fs::create_dir_all(&dest)?;
            copy_tree(&entry.path(), &dest, budget)?;
        } else if kind.is_file() {
            let len = entry.metadata()?.len();
            if budget.1 == 0 || len > budget.0 {
                bail!("the deployment is larger than apps.max_deploy_bytes or has more than {MAX_DEPLOY_FILES} files");
            }
            budget.0 -= len;
            budget.1 -= 1;
            std::fs::copy(entry.path(), &dest).with_context(|| format!("cannot copy {}", entry.path().display()))?;
        } else {
            bail!("{} is neither a file nor a directory; deployments cannot contain links", entry.path().display());
        }
    }
    Ok(())
}

/// `Some(gzipped)` when `path` names a tar archive.
fn archive_kind(path: &Path) -> Option<bool> {
    let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
    if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        Some(true)
    } else if name.ends_with(".tar") {
        Some(false)
    } else {
        None
    }
}

/// Unpacks a tar archive into `to`: regular files and directories only, every path inside `to`,
/// within the byte and file budget.
fn unpack(archive: &Path, gzip: bool, to: &Path, mut budget: (u64, usize)) -> anyhow::Result<()> {
    let file = std::fs::File::open(archive).with_context(|| format!("cannot open {}", archive.display()))?;
    let reader: Box<dyn std::io::Read> =
        if gzip { Box::new(flate2::read::GzDecoder::new(file)) } else { Box::new(file) };
    let mut tar = tar::Archive::new(reader);
    let entries = tar.entries().with_context(|| format!("{} is not a tar archive", archive.display()))?;
    for entry in entries {
        let mut entry = entry.with_context(|| format!("{} is damaged", archive.display()))?;
        let kind = entry.header().entry_type();
        let path = entry.path().context("an archive entry has an invalid path")?.into_owned();
        if !(kind.is_file() || kind.is_dir()) {
            bail!(
                "{} holds {:?}, which is neither a file nor a directory; deployments cannot contain links",
                archive.display(),
                path
            );
        }
        let size = entry.header().size().unwrap_or(u64::MAX);
        if budget.1 == 0 || size > budget.0 {
            bail!("the deployment is larger than apps.max_deploy_bytes or has more than {MAX_DEPLOY_FILES} files");
        }
        budget.0 -= size;
        budget.1 -= 1;
        // unpack_in refuses paths that would land outside `to` (absolute or with `..`).
        if !entry.unpack_in(to).with_context(|| format!("cannot unpack {path:?}"))? {
            bail!("{} holds {path:?}, which points outside the app directory", archive.display());
        }
    }
    Ok(())
}

/// The engine event a request calls: its `event` parameter, else its command in lower case.
fn event_of(req: &Message) -> String {
    req.get("event").map(String::from).unwrap_or_else(|| req.command.to_ascii_lowercase())
}

/// The reply to a request that called `event`: RESULT with the worker's chunks joined, or
/// ERROR with a stable code (the caller may retry on `queue_full` and `worker_failed`).
fn call_reply(req: &Message, event: &str, result: Result<Vec<Bytes>, SessionError>) -> Message {
    match result {
        Ok(chunks) => {
            let payload = match chunks.as_slice() {
                [one] => one.to_vec(),
                _ => chunks.concat(),
            };
            req.reply("RESULT").param("chunks", chunks.len()).param("event", event).with_payload(payload)
        }
        Err(e) => {
            let code = match &e {
                SessionError::Rejected(Rejection::QueueFull { .. } | Rejection::Busy { .. }) => "queue_full",
                SessionError::Rejected(_) => "rejected",
                SessionError::Worker { .. } => "app_error",
                SessionError::WorkerFailed(_) => "worker_failed",
                SessionError::EngineGone => "unavailable",
                SessionError::Overflow(_) | SessionError::Closed => "session",
            };
            req.reply("ERROR").param("code", code).param("command", &req.command).param("message", e.to_string())
        }
    }
}

/// The running side: the built-in `apps` service and one bridge per started app.
pub(crate) struct Apps {
    shared: Arc<Shared>,
    engine: Engine,
    service: tokio::task::JoinHandle<()>,
    bridges: Arc<Mutex<HashMap<String, ConnId>>>,
}

/// Requests an app's bridge takes off its queue at a time.
const BRIDGE_BATCH: usize = 128;

/// The built-in service's name.
pub const APPS_SERVICE: &str = "apps";

impl Apps {
    /// Registers the `apps` service and starts every stored app the operator left started.
    pub(crate) fn start(shared: Arc<Shared>, engine: Engine) -> Apps {
        let limits = shared.config().apps.clone();
        let store = AppStore::new(&shared.config().data_dir, limits.max_deploy_bytes);
        let bridges: Arc<Mutex<HashMap<String, ConnId>>> = Arc::default();
        let ctx = Ctx {
            shared: shared.clone(),
            engine: engine.clone(),
            store,
            bridges: bridges.clone(),
            max_apps: limits.max_apps,
        };
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
            ]),
        );
        let service = tokio::spawn(async move {
            for name in ctx.store.list() {
                if ctx.store.wanted(&name) == Wanted::Started {
                    match ctx.start(&name).await {
                        Ok(version) => info!(app = %name, %version, "app started"),
                        Err(e) => warn!(app = %name, error = %e, "cannot start app"),
                    }
                }
            }
            ctx.serve(conn, rx).await;
        });
        Apps { shared, engine, service, bridges }
    }

    /// Stops every app's workers and the service.
    pub(crate) async fn shutdown(self) {
        self.service.abort();
        let conns: Vec<ConnId> =
            self.bridges.lock().unwrap_or_else(|e| e.into_inner()).drain().map(|(_, c)| c).collect();
        for conn in conns {
            self.shared.detach(conn);
        }
        self.engine.shutdown().await;
    }
}

struct Ctx {
    shared: Arc<Shared>,
    engine: Engine,
    store: AppStore,
    bridges: Arc<Mutex<HashMap<String, ConnId>>>,
    max_apps: usize,
}

impl Ctx {
    async fn serve(&self, conn: ConnId, mut rx: mpsc::Receiver<Outbound>) {
        while let Some(out) = rx.recv().await {
            let Outbound::Msg(req, _) = out else { continue };
            if !is_request(&req) {
                continue;
            }
            let reply = match self.command(&req).await {
                Ok(reply) => reply,
                Err(e) => req
                    .reply("ERROR")
                    .param("code", "apps")
                    .param("command", &req.command)
                    .param("message", format!("{e:#}")),
            };
            self.shared.inject(conn, reply);
        }
    }

    fn name(req: &Message) -> anyhow::Result<&str> {
        req.get("name").with_context(|| format!("{} needs name=APP", req.command))
    }

    async fn command(&self, req: &Message) -> anyhow::Result<Message> {
        Ok(match req.command.as_str() {
            "DEPLOY" => {
                let name = Self::name(req)?;
                let path = req.get("path").context("DEPLOY needs path=FILE_OR_DIR (absolute)")?;
                let exists = self.store.list().iter().any(|n| n == name);
                if !exists && self.store.list().len() >= self.max_apps {
                    bail!("this node already has {} apps (apps.max_apps)", self.max_apps);
                }
                let profile = req.get("profile").map(Path::new);
                let (spec, version) = self.store.deploy(name, Path::new(path), profile)?;
                self.run(name, spec).await?;
                req.reply("DEPLOYED").param("name", name).param("version", version)
            }
            "START" => {
                let name = Self::name(req)?;
                let version = self.start(name).await?;
                self.store.set_wanted(name, Wanted::Started)?;
                req.reply("STARTED").param("name", name).param("version", version)
            }
            "RESTART" => {
                let name = Self::name(req)?;
                let _ = self.engine.stop(name).await;
                let version = self.start(name).await?;
                req.reply("STARTED").param("name", name).param("version", version)
            }
            "STOP" => {
                let name = Self::name(req)?;
                self.store.load(name)?;
                self.detach(name);
                self.engine.stop(name).await?;
                self.store.set_wanted(name, Wanted::Stopped)?;
                req.reply("STOPPED").param("name", name)
            }
            "SCALE" => {
                let name = Self::name(req)?;
                let workers: usize = req
                    .get("workers")
                    .and_then(|w| w.parse().ok())
                    .context("SCALE takes workers=N, the number of workers to keep running (0 or more)")?;
                self.store.load(name)?;
                self.store.set_population(name, workers)?;
                // A stopped app gets it when it starts.
                let _ = self.engine.set_population(name, workers).await;
                req.reply("SCALED").param("name", name).param("workers", workers)
            }
            "REMOVE" => {
                let name = Self::name(req)?;
                self.detach(name);
                let _ = self.engine.remove(name).await;
                self.store.remove(name)?;
                req.reply("REMOVED").param("name", name)
            }
            "LIST" => {
                let mut rows = Vec::new();
                for name in self.store.list() {
                    let (status, workers) = match self.engine.info(&name).await {
                        Ok(i) => (status_word(&i.status), i.workers.len()),
                        Err(_) => ("stopped".to_string(), 0),
                    };
                    let version = self.store.load(&name).map(|(_, v)| v).unwrap_or_default();
                    rows.push(format!("{name}@{version}@{status}@{workers}"));
                }
                req.reply("APPS").param("list", rows.join(","))
            }
            "INFO" => {
                let name = Self::name(req)?;
                let (spec, version) = self.store.load(name)?;
                let mut reply = req
                    .reply("APP_INFO")
                    .param("name", name)
                    .param("version", version)
                    .param("executable", &spec.manifest.executable)
                    .param("dir", spec.dir.display());
                match self.engine.info(name).await {
                    Ok(i) => {
                        if let nodus_engine::balance::AppStatus::Failed { reason } = &i.status {
                            reply = reply.param("reason", reason);
                        }
                        let workers: Vec<String> = i
                            .workers
                            .iter()
                            .map(|w| format!("{}@{}@{:?}@{}", w.uuid, w.pid, w.state, w.load))
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
            "CRASHLOG" => {
                let name = Self::name(req)?;
                let records = self.engine.crashlog(name).unwrap_or_default();
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
            other => {
                bail!("unknown apps command {other}: use DEPLOY, START, STOP, RESTART, SCALE, REMOVE, LIST, INFO or CRASHLOG")
            }
        })
    }

    async fn start(&self, name: &str) -> anyhow::Result<String> {
        let (spec, version) = self.store.load(name)?;
        self.run(name, spec).await?;
        Ok(version)
    }

    /// Starts (or redeploys) `spec` in the engine with its stored population, makes it a
    /// service, and publishes its endpoint.
    async fn run(&self, name: &str, spec: AppSpec) -> anyhow::Result<()> {
        self.engine.start(spec).await?;
        self.engine.set_population(name, self.store.population(name)).await?;
        self.attach(name);
        self.publish();
        Ok(())
    }

    /// Tells the cluster where the started apps' Cocaine endpoints are, so every node's locator
    /// resolves them.
    fn publish(&self) {
        let Some(locator) = self.shared.locator() else { return };
        let names: Vec<String> = self.bridges.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        let mut endpoints = BTreeMap::new();
        for name in names {
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

    /// Makes the app reachable as service `name` (once).
    fn attach(&self, name: &str) {
        let mut bridges = self.bridges.lock().unwrap_or_else(|e| e.into_inner());
        if bridges.contains_key(name) {
            return;
        }
        let (conn, mut rx) = self.shared.attach(name);
        bridges.insert(name.to_string(), conn);
        let (shared, engine, app) = (self.shared.clone(), self.engine.clone(), name.to_string());
        tokio::spawn(async move {
            let mut caller = engine.caller(&app).ok();
            let mut batch = Vec::with_capacity(BRIDGE_BATCH);
            while rx.recv_many(&mut batch, BRIDGE_BATCH).await > 0 {
                for out in batch.drain(..) {
                    let Outbound::Msg(mut req, _) = out else { continue };
                    if !is_request(&req) {
                        continue;
                    }
                    let event = event_of(&req);
                    if caller.is_none() {
                        caller = engine.caller(&app).ok();
                    }
                    let Some(c) = caller.as_ref() else {
                        if req.envelope.id != 0 {
                            let reply = call_reply(&req, &event, Err(SessionError::EngineGone));
                            shared.inject(conn, reply);
                        }
                        continue;
                    };
                    let body = std::mem::take(&mut req.payload);
                    let shared = shared.clone();
                    let reply_event = event.clone();
                    // Each request is its own session; the engine's queue-limit bounds how many
                    // wait, and the reply is routed from the app's task when the worker is done.
                    let done = CallDone::new(move |result| {
                        if req.envelope.id != 0 {
                            shared.inject(conn, call_reply(&req, &reply_event, result));
                        }
                    });
                    if !c.call(event, body, done) {
                        // The app was removed (and perhaps started again): look it up anew.
                        caller = None;
                    }
                }
            }
        });
    }

    fn detach(&self, name: &str) {
        let conn = self.bridges.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
        if let Some(conn) = conn {
            self.shared.detach(conn);
            self.publish();
        }
    }
}

/// What an in-process service should act on: not replies, and not the node's own notices to a
/// registered service (HELP, READY, STATUS, QUITTING).
fn is_request(m: &Message) -> bool {
    m.envelope.reply_to == 0 && !matches!(m.command.as_str(), "HELP" | "READY" | "STATUS" | "QUITTING")
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
    fn deploy_versions_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let store = AppStore::new(dir.path(), 1 << 20);
        let exe = dir.path().join("worker.sh");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        let (spec, v1) = store.deploy("echo", &exe, None).unwrap();
        assert_eq!((v1.as_str(), spec.manifest.executable.as_str()), ("v1", "./worker.sh"));
        assert!(spec.dir.join("worker.sh").exists());
        for _ in 0..3 {
            store.deploy("echo", &exe, None).unwrap();
        }
        let (_, current) = store.load("echo").unwrap();
        assert_eq!(current, "v4");
        assert!(!dir.path().join("apps/echo/v2").exists(), "only two versions are kept");
        assert_eq!(store.list(), ["echo"]);
        store.set_wanted("echo", Wanted::Stopped).unwrap();
        assert_eq!(store.wanted("echo"), Wanted::Stopped);
        store.remove("echo").unwrap();
        assert!(store.list().is_empty());
    }

    #[test]
    fn archives_deploy_and_unsafe_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = AppStore::new(dir.path(), 1 << 20);
        let pack = |name: &str, gzip: bool, files: &[(&str, &[u8])]| {
            let path = dir.path().join(name);
            let file = std::fs::File::create(&path).unwrap();
            let writer: Box<dyn std::io::Write> = if gzip {
                Box::new(flate2::write::GzEncoder::new(file, flate2::Compression::fast()))
            } else {
                Box::new(file)
            };
            let mut b = tar::Builder::new(writer);
            for (n, data) in files {
                let mut h = tar::Header::new_gnu();
                h.set_size(data.len() as u64);
                h.set_mode(0o755);
                // Written raw so that unsafe names reach the archive as they are.
                h.as_old_mut().name[..n.len()].copy_from_slice(n.as_bytes());
                h.set_cksum();
                b.append(&h, *data).unwrap();
            }
            b.into_inner().unwrap().flush().unwrap();
            path
        };
        let manifest: &[u8] = b"{\"executable\": \"./bin/run\"}";
        let good = pack("app.tar.gz", true, &[("manifest.json", manifest), ("bin/run", b"#!/bin/sh\n")]);
        let (spec, _) = store.deploy("packed", &good, None).unwrap();
        assert!(spec.dir.join("bin/run").exists());
        let plain = pack("app.tar", false, &[("manifest.json", manifest)]);
        assert!(store.deploy("plain", &plain, None).is_ok());
        let evil = pack("evil.tar", false, &[("manifest.json", manifest), ("../escape", b"x")]);
        assert!(store.deploy("evil", &evil, None).is_err());
        assert!(!dir.path().join("apps/evil/escape").exists() && !dir.path().join("apps/escape").exists());
        let garbage = dir.path().join("junk.tgz");
        std::fs::write(&garbage, b"not gzip at all").unwrap();
        assert!(store.deploy("junk", &garbage, None).is_err());
    }

    #[test]
    fn bad_deployments_are_refused_and_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = AppStore::new(dir.path(), 16);
        let app = dir.path().join("src");
        std::fs::create_dir_all(&app).unwrap();
        assert!(store.deploy("x", &app, None).unwrap_err().to_string().contains("no manifest"));
        std::fs::write(app.join("manifest.json"), "{\"executable\": \"./run\", \"bogus\": 1}").unwrap();
        assert!(store.deploy("x", &app, None).is_err(), "unknown manifest key");
        std::fs::write(app.join("manifest.json"), "{\"executable\": \"./run\"}").unwrap();
        std::fs::write(app.join("big"), vec![0u8; 64]).unwrap();
        assert!(store.deploy("x", &app, None).unwrap_err().to_string().contains("max_deploy_bytes"));
        assert!(store.deploy("../evil", &app, None).is_err());
        assert!(store.list().is_empty());
    }
}
