//! `apps`: the app engine's figures — invoke throughput and latency through a node (client →
//! daemon → app bridge → engine → worker process) next to the engine's own ceiling in-process,
//! and worker cold start (spawn → handshake → first reply) next to a bare fork+exec+connect
//! baseline measured in the same run.
//!
//! Invoke: one `nodus daemon` child with `bench_app` deployed through its built-in `apps` service
//! (the worker is `nodus echo-worker`), then K request loops over one client connection; then the
//! same worker under an [`Engine`] in this process, K `invoke("echo")` loops. Cold start: for each
//! repetition a fresh app with `pool-limit = 1` is started and invoked once; the baseline is this
//! executable's hidden `connect-once` role, which connects to a Unix socket and writes one byte.

use crate::bench;
use crate::child::{self, ScratchDir};
use crate::latency::{ColdStart, Load, Recorder, Summary, System};
use crate::nodus_system;
use crate::{report, Options};
use anyhow::{bail, Context};
use bytes::Bytes;
use nodus_client::{Client, ClientConfig};
use nodus_engine::manifest::Manifest;
use nodus_engine::profile::Profile;
use nodus_engine::{AppSpec, Engine, EngineConfig, EngineEvent};
use nodus_wire::Message;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// The app deployed for the invoke figures (also its service name on the node).
const APP: &str = "bench_app";
/// The app started for each cold-start repetition.
const COLD_APP: &str = "bench_cold";
/// The event every invocation calls; the worker echoes each chunk.
const EVENT: &str = "echo";
/// The command of requests through the node (the bridge lowercases it into the event).
const COMMAND: &str = "ECHO";
/// The bridge's answer to a successful invocation.
const RESULT: &str = "RESULT";
/// Payload sizes of the invoke matrix, bytes.
const PAYLOADS: [usize; 2] = [64, 4096];
/// Requests in flight of the invoke matrix.
const INFLIGHT: [usize; 2] = [1, 64];
/// Profile of the invoke app: enough concurrency that 64 in flight never queue behind a worker.
const INVOKE_PROFILE: &str = "pool-limit = 2\nconcurrency = 256\nqueue-limit = 10000\n";
/// How long one invocation may take.
const INVOKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the first invocation may take (it starts the worker).
const FIRST_INVOKE_TIMEOUT: Duration = Duration::from_secs(15);
/// Slack past the end of the measured phase before a measurement is abandoned.
const RUN_GRACE: Duration = Duration::from_secs(15);
/// How long one cold start may take before the run fails.
const COLD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long stopping an app (its workers exiting) or reaping a baseline child may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Most cold-start repetitions accepted.
pub const MAX_COLD_STARTS: usize = 1000;
/// The engine's example worker, built by `cargo build --release -p nodus-engine --bins`.
const TINY_WORKER: &str = "nodus-echo-worker";

/// Runs the invoke matrix (node, then engine in-process) and `cold_starts` cold starts of each
/// worker next to the baseline, then prints everything.
///
/// Fails when a child cannot be started, the app cannot be deployed, an invocation fails or
/// returns something other than its payload, or a measurement does not finish in time.
pub async fn run(options: &Options, cold_starts: usize) -> anyhow::Result<()> {
    if cold_starts == 0 || cold_starts > MAX_COLD_STARTS {
        bail!("--cold-starts {cold_starts} is out of range: use 1..={MAX_COLD_STARTS}");
    }
    let nodus = nodus_system::nodus_binary(options.nodus.clone())?;
    let scratch = ScratchDir::create()?;
    let nodus_worker = Manifest { args: vec!["echo-worker".into()], ..Manifest::new(nodus.display().to_string()) };
    let app_dir = write_app(&scratch.path().join("app"), &nodus_worker, INVOKE_PROFILE)?;

    let node = invoke_through_node(options, &nodus, scratch.path(), &app_dir).await?;
    let engine = invoke_in_process(options, scratch.path(), &app_dir, &nodus_worker).await?;

    report::progress(&format!("cold start: bare fork+exec+connect, {cold_starts} times"));
    let baseline = cold_baseline(scratch.path(), cold_starts).await?;
    report::progress(&format!("cold start: nodus echo-worker, {cold_starts} times"));
    let mut cold = vec![cold_worker(scratch.path(), &nodus_worker, System::ColdNodusWorker, cold_starts).await?];
    match tiny_worker()? {
        Some(tiny) => {
            report::progress(&format!("cold start: {TINY_WORKER}, {cold_starts} times"));
            cold.push(cold_worker(scratch.path(), &Manifest::new(tiny), System::ColdTinyWorker, cold_starts).await?);
        }
        None => report::progress(&format!(
            "no {TINY_WORKER} next to nodus-bench (cargo build --release -p nodus-engine --bins); its cold start is skipped"
        )),
    }

    if options.json {
        for s in node.iter().chain(&engine) {
            report::json(s);
        }
        report::cold_json(&baseline);
        for c in &cold {
            report::cold_json(c);
        }
    } else {
        report::apps_header();
        for (n, e) in node.iter().zip(&engine) {
            report::apps_row(n, e);
        }
        report::apps_footer(&node);
        report::cold_header(cold_starts);
        report::cold_row(&baseline, &baseline);
        for c in &cold {
            report::cold_row(c, &baseline);
        }
        report::cold_footer(&cold, &baseline);
    }
    Ok(())
}

/// The hidden `connect-once` role: connects to `socket`, writes one byte and exits. Runs before
/// any async runtime is built, so the baseline is fork + exec + connect and little else.
///
/// Fails when the socket cannot be reached or written.
pub fn connect_once(socket: &Path) -> anyhow::Result<()> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    stream.write_all(&[1]).with_context(|| format!("cannot write to {}", socket.display()))?;
    Ok(())
}

/// Writes an app directory: `manifest.json` for `manifest` and `profile.toml` holding `profile`.
fn write_app(dir: &Path, manifest: &Manifest, profile: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let args: Vec<String> = manifest.args.iter().map(|a| json_string(a)).collect();
    let json = format!("{{\"executable\": {}, \"args\": [{}]}}\n", json_string(&manifest.executable), args.join(", "));
    let write = |file: &str, text: &str| {
        let path = dir.join(file);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
    };
    write("manifest.json", &json)?;
    write("profile.toml", profile)?;
    Ok(dir.to_path_buf())
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The invoke matrix through a `nodus daemon` child with the app deployed on it.
async fn invoke_through_node(
    options: &Options,
    nodus: &Path,
    dir: &Path,
    app_dir: &Path,
) -> anyhow::Result<Vec<Summary>> {
    report::progress(&format!("starting {} daemon ({:?}) and deploying {APP}", nodus.display(), options.transport));
    // The worker is this build's binary, wherever it is: as root, run it as root (the default,
    // `nobody`, may not reach it).
    let config = dir.join("apps.toml");
    std::fs::write(&config, "[apps]\nrun_as = \"root\"\n")
        .with_context(|| format!("cannot write {}", config.display()))?;
    let config = config.to_str().context("the scratch directory's path is not UTF-8")?;
    let (mut daemon, endpoint) =
        nodus_system::start_daemon_with(nodus, options.transport, dir, "apps", None, &["--config", config]).await?;
    let config = ClientConfig::new(endpoint.as_str()).no_reconnect();
    // Keep `_incoming` alive: nothing but replies is expected, but its sender must not close.
    let (client, _incoming) = Client::connect(config).await.context("the load client cannot connect")?;
    let app_path = app_dir.to_str().context("the scratch directory's path is not UTF-8")?;
    let deploy = Message::new("DEPLOY").to("apps").param("name", APP).param("path", app_path);
    let reply =
        client.request_with_timeout(deploy, INVOKE_TIMEOUT).await.context("DEPLOY to the apps service failed")?;
    if reply.command != "DEPLOYED" {
        bail!("the apps service answered DEPLOY with {}: {}", reply.command, reply.get("message").unwrap_or(""));
    }
    // The first invocation starts the worker; it must succeed before anything is measured.
    node_invoke(&client, 1, FIRST_INVOKE_TIMEOUT).await.context("the first invocation through the node")?;
    let mut rows = Vec::new();
    for payload in PAYLOADS {
        for inflight in INFLIGHT {
            let load = bench::load(options, payload, inflight)?;
            daemon.check_running()?;
            report::progress(&format!("app-node   payload {payload} inflight {inflight}"));
            let client = client.clone();
            let call = move || {
                let client = client.clone();
                async move { node_invoke(&client, payload, INVOKE_TIMEOUT).await }
            };
            let summary = drive(&load, System::AppNode, call)
                .await
                .with_context(|| format!("invoke through the node (payload {payload}, inflight {inflight})"))?;
            rows.push(summary);
        }
    }
    daemon.check_running()?;
    drop(client);
    daemon.stop().await;
    Ok(rows)
}

/// One request through the node to the app; fails unless the reply is `RESULT` with the payload.
async fn node_invoke(client: &Client, payload: usize, timeout: Duration) -> anyhow::Result<()> {
    let request = Message::new(COMMAND).to(APP).with_payload(vec![0u8; payload]);
    let reply = client.request_with_timeout(request, timeout).await.context("a request to the app failed")?;
    if reply.command != RESULT || reply.payload.len() != payload || reply.payload.iter().any(|&b| b != 0) {
        bail!(
            "unexpected reply {} with {} payload bytes (expected {RESULT} echoing {payload} zero bytes): {} {}",
            reply.command,
            reply.payload.len(),
            reply.get("code").unwrap_or(""),
            reply.get("message").unwrap_or("")
        );
    }
    Ok(())
}

/// The invoke matrix through an engine in this process, running the same worker.
async fn invoke_in_process(
    options: &Options,
    dir: &Path,
    app_dir: &Path,
    manifest: &Manifest,
) -> anyhow::Result<Vec<Summary>> {
    report::progress(&format!("starting {APP} under an engine in this process"));
    let profile = Profile::parse(INVOKE_PROFILE, nodus_engine::manifest::Format::Toml)
        .context("the invoke profile is invalid")?;
    let engine = Engine::new(EngineConfig::new(dir.join("rt-invoke")));
    let spec = AppSpec { name: APP.into(), dir: app_dir.to_path_buf(), manifest: manifest.clone(), profile };
    let measured = async {
        engine.start(spec).await.context("the engine cannot start the app")?;
        engine_invoke(&engine, 1, FIRST_INVOKE_TIMEOUT).await.context("the first invocation in-process")?;
        let mut rows = Vec::new();
        for payload in PAYLOADS {
            for inflight in INFLIGHT {
                let load = bench::load(options, payload, inflight)?;
                report::progress(&format!("app-engine payload {payload} inflight {inflight}"));
                let engine = engine.clone();
                let call = move || {
                    let engine = engine.clone();
                    async move { engine_invoke(&engine, payload, INVOKE_TIMEOUT).await }
                };
                let summary = drive(&load, System::AppEngine, call)
                    .await
                    .with_context(|| format!("invoke in-process (payload {payload}, inflight {inflight})"))?;
                rows.push(summary);
            }
        }
        Ok::<_, anyhow::Error>(rows)
    }
    .await;
    // Also on error: the workers are asked to leave (and are killed with the runtime otherwise).
    let _ = tokio::time::timeout(STOP_TIMEOUT, engine.shutdown()).await;
    measured
}

/// One invocation through the engine: one chunk up, close, collect; fails unless it echoes.
async fn engine_invoke(engine: &Engine, payload: usize, timeout: Duration) -> anyhow::Result<()> {
    let call = async {
        let mut session = engine.invoke(APP, EVENT).await.context("the engine refused the invocation")?;
        session.send(vec![0u8; payload]).await.context("cannot send the chunk")?;
        session.collect().await.context("the invocation failed")
    };
    let chunks =
        tokio::time::timeout(timeout, call).await.with_context(|| format!("no answer within {timeout:?}"))??;
    let len: usize = chunks.iter().map(Bytes::len).sum();
    if len != payload || chunks.iter().any(|c| c.iter().any(|&b| b != 0)) {
        bail!("the worker answered {len} bytes in {} chunks, expected the {payload} zero bytes sent", chunks.len());
    }
    Ok(())
}

/// Runs `load.inflight` loops of `call` until the end of the measured window and summarises them.
async fn drive<F, Fut>(load: &Load, system: System, call: F) -> anyhow::Result<Summary>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let window = load.window();
    let mut loops = JoinSet::new();
    for _ in 0..load.inflight {
        let call = call.clone();
        loops.spawn(async move {
            let mut recorder = Recorder::new(window);
            while Instant::now() < window.end {
                let sent = Instant::now();
                call().await?;
                recorder.record(sent, Instant::now());
            }
            Ok::<_, anyhow::Error>(recorder)
        });
    }
    let collect = async {
        let mut all = Recorder::new(window);
        while let Some(joined) = loops.join_next().await {
            all.merge(joined.context("an invoke loop panicked")??);
        }
        Ok::<_, anyhow::Error>(all)
    };
    // On timeout or error the JoinSet is dropped, which aborts the remaining loops.
    let all = tokio::time::timeout_at(window.end + RUN_GRACE, collect)
        .await
        .context("the measurement did not finish in time")??;
    let summary = all.summary(system, load);
    if summary.requests == 0 {
        bail!("no invocation was answered during the measured phase");
    }
    Ok(summary)
}

/// Bare fork+exec+connect: this executable's `connect-once` role, from spawn to its byte arriving.
async fn cold_baseline(dir: &Path, repeats: usize) -> anyhow::Result<ColdStart> {
    let socket = dir.join("cold.sock");
    let listener = UnixListener::bind(&socket).with_context(|| format!("cannot listen on {}", socket.display()))?;
    let socket_arg = socket.to_str().context("the scratch directory's path is not UTF-8")?;
    let log_path = dir.join("connect-once.log");
    let log = std::fs::File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
    let mut totals = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let mut command = child::self_command(&["connect-once", "--socket", socket_arg])?;
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log.try_clone()?).kill_on_drop(true);
        let start = Instant::now();
        let mut process = command.spawn().context("cannot start the connect-once child")?;
        let first_byte = async {
            let (mut stream, _) = listener.accept().await?;
            stream.read_u8().await
        };
        match tokio::time::timeout(COLD_TIMEOUT, first_byte).await {
            Ok(Ok(_)) => totals.push(elapsed_ns(start)),
            Ok(Err(e)) => bail!("the connect-once child did not deliver its byte: {e} (see {})", log_path.display()),
            Err(_) => {
                bail!("the connect-once child did not connect within {COLD_TIMEOUT:?} (see {})", log_path.display())
            }
        }
        let _ = tokio::time::timeout(STOP_TIMEOUT, process.wait()).await;
    }
    Ok(ColdStart::new(System::ColdBaseline, totals, Vec::new()))
}

/// Starts a fresh app running `manifest` (pool-limit 1) and invokes it once, `repeats` times: from
/// `Engine::start` until the echoed chunk arrives; also when the worker reported ready.
async fn cold_worker(dir: &Path, manifest: &Manifest, system: System, repeats: usize) -> anyhow::Result<ColdStart> {
    let app_dir = dir.join(format!("cold-{}", system.as_str()));
    std::fs::create_dir_all(&app_dir).with_context(|| format!("cannot create {}", app_dir.display()))?;
    let profile = Profile { pool_limit: 1, ..Profile::default() };
    let spec = AppSpec { name: COLD_APP.into(), dir: app_dir, manifest: manifest.clone(), profile };
    let engine = Engine::new(EngineConfig::new(dir.join("rt-cold")));
    let measured = async {
        let (mut totals, mut readies) = (Vec::with_capacity(repeats), Vec::with_capacity(repeats));
        for _ in 0..repeats {
            let (total, ready) = tokio::time::timeout(COLD_TIMEOUT, cold_once(&engine, &spec))
                .await
                .with_context(|| format!("a cold start of {} took longer than {COLD_TIMEOUT:?}", system.as_str()))??;
            totals.push(total);
            readies.extend(ready);
            tokio::time::timeout(STOP_TIMEOUT, engine.remove(COLD_APP))
                .await
                .context("the cold app's worker did not exit in time")?
                .context("cannot remove the cold app")?;
        }
        Ok::<_, anyhow::Error>(ColdStart::new(system, totals, readies))
    }
    .await;
    let _ = tokio::time::timeout(STOP_TIMEOUT, engine.shutdown()).await;
    measured
}

/// One cold start: nanoseconds to the first reply chunk, and to the worker's `Ready` if seen.
async fn cold_once(engine: &Engine, spec: &AppSpec) -> anyhow::Result<(u64, Option<u64>)> {
    let mut events = engine.events();
    let start = Instant::now();
    // Watches for the worker's first heartbeat (the engine's Ready) while the invocation runs.
    let mut ready = tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(EngineEvent::Ready { app, .. }) if app == COLD_APP => return Some(elapsed_ns(start)),
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    let result = async {
        engine.start(spec.clone()).await.context("the engine cannot start the cold app")?;
        let mut session = engine.invoke(COLD_APP, EVENT).await.context("the engine refused the invocation")?;
        session.send(Bytes::from_static(b"x")).await.context("cannot send the chunk")?;
        let first = session.recv().await.context("the cold invocation failed")?;
        let total = elapsed_ns(start);
        if first.as_deref() != Some(b"x".as_slice()) {
            bail!("the worker answered {first:?}, expected the chunk \"x\"");
        }
        session.collect().await.context("the cold invocation did not end cleanly")?;
        Ok(total)
    }
    .await;
    // The Ready event precedes the reply; give its watcher a moment to see it, then stop it.
    let seen = tokio::time::timeout(Duration::from_millis(100), &mut ready).await;
    ready.abort();
    let ready_ns = match seen {
        Ok(Ok(r)) => r,
        _ => None,
    };
    Ok((result?, ready_ns))
}

/// The engine's example worker next to this executable, if it was built.
fn tiny_worker() -> anyhow::Result<Option<String>> {
    let exe = std::env::current_exe().context("cannot find the path of nodus-bench itself")?;
    let path = exe.parent().context("nodus-bench has no parent directory")?.join(TINY_WORKER);
    Ok(path.is_file().then(|| path.display().to_string()))
}

fn elapsed_ns(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX)
}
