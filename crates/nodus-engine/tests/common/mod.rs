//! Shared set-up of the engine's TCP tests: an engine whose apps run the example echo worker,
//! with the locator's listener bound first so workers get its address as `--locator`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use nodus_engine::manifest::Manifest;
use nodus_engine::profile::Profile;
use nodus_engine::{AppSpec, Engine, EngineConfig};
use tokio::net::TcpListener;

pub const ECHO: &str = env!("CARGO_BIN_EXE_nodus-echo-worker");

/// An app running the echo worker, heartbeating every 100 ms.
pub fn echo_spec(dir: &Path, name: &str, profile: Profile) -> AppSpec {
    let mut manifest = Manifest::new(ECHO);
    manifest.env.insert("NODUS_HEARTBEAT_MS".into(), "100".into());
    AppSpec { name: name.to_string(), dir: dir.to_path_buf(), manifest, profile }
}

/// A temporary directory, a bound locator listener, and an engine running `apps` in it.
pub async fn engine_with_apps(
    prefix: &str,
    apps: &[(&str, Profile)],
) -> (Engine, TcpListener, SocketAddr, tempfile::TempDir) {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut ec = EngineConfig::new(dir.path().join("run"));
    ec.locator = addr.to_string();
    ec.kill_grace = Duration::from_millis(300);
    let engine = Engine::new(ec);
    for (name, profile) in apps {
        engine.start(echo_spec(dir.path(), name, profile.clone())).await.unwrap();
    }
    (engine, listener, addr, dir)
}
