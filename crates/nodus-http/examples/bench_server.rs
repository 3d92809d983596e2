//! The two servers of `scripts/bench-http.sh`, on `127.0.0.1:0`, writing the bound address to
//! `--addr-file` once ready and serving until SIGTERM or Ctrl-C:
//!
//! - `hello`: a plain axum hello-world server (`GET /` answers `ok`), the baseline;
//! - `gateway --worker PATH`: an engine with one app `noop` (the example HTTP worker), its
//!   locator, and the nodus HTTP listener whose gateway reaches the app through the locator
//!   (`GET /noop/noop` answers `ok`).
//!
//! `--pool N` and `--concurrency N` set the app's pool limit and sessions per worker;
//! `--via-locator yes` makes the gateway reach the app through the locator's TCP service (as it
//! reaches apps on other nodes) instead of the local engine.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nodus_engine::manifest::Manifest;
use nodus_engine::profile::Profile;
use nodus_engine::{AppSpec, Engine, EngineConfig, Locator, LocatorConfig};
use nodus_http::{Http, HttpConfig};
use tokio::net::TcpListener;

type Error = Box<dyn std::error::Error>;

struct Args {
    mode: String,
    addr_file: PathBuf,
    worker: Option<String>,
    pool: usize,
    concurrency: usize,
    via_locator: bool,
}

fn args() -> Result<Args, Error> {
    let mut it = std::env::args().skip(1);
    let mode = it.next().ok_or("usage: nodus-http-bench-server hello|gateway --addr-file FILE [--worker PATH]")?;
    let mut a = Args { mode, addr_file: PathBuf::new(), worker: None, pool: 2, concurrency: 64, via_locator: false };
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--addr-file" => a.addr_file = value.into(),
            "--worker" => a.worker = Some(value),
            "--pool" => a.pool = value.parse()?,
            "--concurrency" => a.concurrency = value.parse()?,
            "--via-locator" => a.via_locator = value == "yes",
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    if a.addr_file.as_os_str().is_empty() {
        return Err("--addr-file is required".into());
    }
    Ok(a)
}

async fn stopped() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

async fn hello(listener: TcpListener) -> Result<(), Error> {
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
    axum::serve(listener, app).with_graceful_shutdown(stopped()).await?;
    Ok(())
}

async fn gateway(listener: TcpListener, a: &Args) -> Result<(), Error> {
    let worker = a.worker.clone().ok_or("gateway needs --worker PATH")?;
    let dir = std::env::temp_dir().join(format!("nodus-http-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let loc_listener = TcpListener::bind("127.0.0.1:0").await?;
    let locator = loc_listener.local_addr()?;
    let mut config = EngineConfig::new(dir.join("run"));
    config.locator = locator.to_string();
    let engine = Engine::new(config);
    let profile = Profile { pool_limit: a.pool, concurrency: a.concurrency, queue_limit: 10_000, ..Profile::default() };
    let spec = AppSpec { name: "noop".into(), dir: dir.clone(), manifest: Manifest::new(worker), profile };
    engine.start(spec).await?;
    let loc = Locator::from_listener(engine.clone(), LocatorConfig::default(), loc_listener)?;
    let (stop_loc, loc_stopped) = tokio::sync::oneshot::channel::<()>();
    let loc_task = tokio::spawn(loc.run(async move {
        let _ = loc_stopped.await;
    }));
    let local = (!a.via_locator).then(|| engine.clone());
    let http = Http::new(HttpConfig::default(), Arc::default()).with_gateway(locator.to_string(), local);
    http.serve(listener, None, stopped()).await;
    let _ = stop_loc.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), loc_task).await;
    engine.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let a = args()?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let tmp = a.addr_file.with_extension("tmp");
    std::fs::write(&tmp, addr.to_string())?;
    match a.mode.as_str() {
        "hello" => {
            std::fs::rename(&tmp, &a.addr_file)?;
            hello(listener).await
        }
        "gateway" => {
            // Ready once the address is written: the app's first worker starts on demand.
            std::fs::rename(&tmp, &a.addr_file)?;
            gateway(listener, &a).await
        }
        other => Err(format!("unknown mode {other}; use hello or gateway").into()),
    }
}
