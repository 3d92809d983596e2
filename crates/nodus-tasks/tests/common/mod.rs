//! Shared set-up for the task tests: a real engine running the example procedures app
//! (examples/procs-app, its worker binary and its manifest's procedure declarations), a real
//! SQLite store in a temporary directory, the task service, and optionally the arpcp listener.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use nodus_engine::manifest::{Format, Manifest};
use nodus_engine::profile::Profile;
use nodus_engine::{AppSpec, Engine, EngineConfig};
use nodus_tasks::{ArpcpConfig, ArpcpServer, SqliteConfig, SqliteStore, Tasks, TasksConfig};
use tokio::sync::oneshot;

/// Every wait in these tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(30);

/// The example app's manifest, with the worker binary this build made.
pub fn procs_manifest() -> Manifest {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/procs-app");
    let text = std::fs::read_to_string(dir.join("manifest.json")).expect("examples/procs-app/manifest.json");
    let mut m = Manifest::parse(&text, Format::Json).expect("the example manifest parses");
    m.executable = env!("CARGO_BIN_EXE_nodus-procs-worker").to_string();
    m.env.insert("NODUS_HEARTBEAT_MS".into(), "500".into());
    m
}

/// A node's task service over real parts.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub engine: Engine,
    pub store: SqliteStore,
    pub tasks: Tasks<SqliteStore>,
    pub arpcp: Option<SocketAddrAndStop>,
}

/// A running arpcp listener.
pub struct SocketAddrAndStop {
    pub addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<()>,
}

/// How to build a [`Node`].
pub struct Setup {
    pub profile: Profile,
    pub limit: usize,
    pub store: Box<dyn Fn(&Path) -> SqliteConfig>,
    pub tasks: TasksConfig,
    pub arpcp: Option<ArpcpConfig>,
    /// The app to run (name, directory, manifest): the Rust procedures app when `None`.
    pub app: Option<(String, PathBuf, Manifest)>,
}

impl Default for Setup {
    fn default() -> Self {
        let mut tasks = TasksConfig::new("node-test");
        tasks.sched.poll_interval = Duration::from_millis(200);
        Setup {
            profile: Profile {
                pool_limit: 2,
                concurrency: 16,
                queue_limit: 64,
                terminate_timeout: Duration::from_secs(2),
                ..Profile::default()
            },
            limit: 96,
            store: Box::new(|dir| SqliteConfig::new(dir.join("tasks.db"))),
            tasks,
            arpcp: None,
            app: None,
        }
    }
}

impl Node {
    pub async fn start(setup: Setup) -> Node {
        let dir = tempfile::Builder::new().prefix("ntk").tempdir().unwrap();
        let mut config = EngineConfig::new(dir.path().join("run"));
        config.kill_grace = Duration::from_secs(2);
        let engine = Engine::new(config);
        let (name, app_dir, manifest) =
            setup.app.unwrap_or_else(|| ("procs".into(), dir.path().to_path_buf(), procs_manifest()));
        let spec = AppSpec { name: name.clone(), dir: app_dir, manifest: manifest.clone(), profile: setup.profile };
        engine.start(spec).await.unwrap();
        let store = SqliteStore::open((setup.store)(dir.path())).unwrap();
        let tasks = Tasks::start(store.clone(), engine.clone(), setup.tasks).await.unwrap();
        tasks.set_app(&name, &manifest.procedures, Some(setup.limit)).await.unwrap();
        let arpcp = match setup.arpcp {
            Some(c) => {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let server = ArpcpServer::new(listener, tasks.clone(), c).unwrap();
                let addr = server.local_addr().unwrap();
                let (stop, stopped) = oneshot::channel::<()>();
                let served = tokio::spawn(server.run(async move {
                    let _ = stopped.await;
                }));
                Some(SocketAddrAndStop { addr, stop: Some(stop), served })
            }
            None => None,
        };
        Node { dir, engine, store, tasks, arpcp }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn arpcp_addr(&self) -> std::net::SocketAddr {
        self.arpcp.as_ref().expect("started with arpcp").addr
    }

    /// Stops the listener, the service, the engine and the store, in that order.
    pub async fn stop(mut self) {
        if let Some(mut a) = self.arpcp.take() {
            let _ = a.stop.take().map(|s| s.send(()));
            let _ = tokio::time::timeout(WAIT, a.served).await;
        }
        tokio::time::timeout(WAIT, self.tasks.shutdown(Duration::from_secs(2))).await.expect("tasks stop");
        tokio::time::timeout(WAIT, self.engine.shutdown()).await.expect("engine stops");
        self.store.close().await;
    }
}
