//! Example worker built on `nodus_engine::worker_sdk`: echo, multi-chunk replies, errors, a crash.
//!
//! Events: `echo` (every chunk back until the caller closes), `chunks` (reads a number N, answers
//! N chunks `0`..`N-1`), `fail` (an application error), `crash` (exits with code 3 after the
//! first chunk). Environment: `NODUS_HEARTBEAT_MS` (heartbeat interval), `ECHO_CRASH_ON_START`
//! (exit with code 3 before connecting, to exercise the crash-loop guard), `ECHO_MONITORING`
//! (answer the control plane's monitoring with this message through a handler of its own,
//! instead of the SDK's default answer).

use std::time::Duration;

use nodus_engine::worker_sdk::{HandlerResult, Request, Response, Worker};
use nodus_engine::MONITORING_EVENT;

async fn echo(mut req: Request, mut resp: Response) -> HandlerResult {
    while let Some(chunk) = req.recv().await? {
        resp.write(chunk).await?;
    }
    Ok(())
}

async fn chunks(mut req: Request, mut resp: Response) -> HandlerResult {
    let n: u32 = match req.recv().await? {
        Some(b) => std::str::from_utf8(&b)?.trim().parse()?,
        None => return Err("send the number of chunks first".into()),
    };
    for i in 0..n {
        resp.write(i.to_string()).await?;
    }
    Ok(())
}

async fn fail(_req: Request, _resp: Response) -> HandlerResult {
    Err("requested failure".into())
}

async fn crash(mut req: Request, _resp: Response) -> HandlerResult {
    req.recv().await?;
    eprintln!("crashing on purpose");
    std::process::exit(3);
}

/// A monitoring handler of the program's own: the request's envelope back, with its own result.
async fn monitoring(mut req: Request, mut resp: Response) -> HandlerResult {
    let mut input = Vec::new();
    while let Some(chunk) = req.recv().await? {
        input.extend_from_slice(&chunk);
    }
    let r: serde_json::Value = serde_json::from_slice(&input)?;
    let message = std::env::var("ECHO_MONITORING").unwrap_or_default();
    let answer = serde_json::json!({
        "id": r["id"], "pid": r["pid"], "creator": "echo-worker", "created_at": r["created_at"],
        "expires_at": r["expires_at"], "spec": "monitoring",
        "result": {"sync_time": r["config"]["sync_time"], "name": "echo", "host": "here",
                   "is_running": true, "message": message},
    });
    resp.write(answer.to_string()).await?;
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("ECHO_CRASH_ON_START").is_some() {
        eprintln!("crashing on start, as asked");
        std::process::exit(3);
    }
    let beat = std::env::var("NODUS_HEARTBEAT_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(5000);
    let mut worker = Worker::from_env()?
        .heartbeat_interval(Duration::from_millis(beat))
        .on("echo", echo)
        .on("chunks", chunks)
        .on("fail", fail)
        .on("crash", crash);
    if std::env::var_os("ECHO_MONITORING").is_some() {
        worker = worker.on(MONITORING_EVENT, monitoring);
    }
    worker.run().await?;
    Ok(())
}
