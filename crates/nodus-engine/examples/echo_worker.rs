//! Example worker built on `nodus_engine::worker_sdk`: echo, multi-chunk replies, errors, a crash.
//!
//! Events: `echo` (every chunk back until the caller closes), `chunks` (reads a number N, answers
//! N chunks `0`..`N-1`), `fail` (an application error), `crash` (exits with code 3 after the
//! first chunk). Environment: `NODUS_HEARTBEAT_MS` (heartbeat interval), `ECHO_CRASH_ON_START`
//! (exit with code 3 before connecting, to exercise the crash-loop guard).

use std::time::Duration;

use nodus_engine::worker_sdk::{HandlerResult, Request, Response, Worker};

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

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("ECHO_CRASH_ON_START").is_some() {
        eprintln!("crashing on start, as asked");
        std::process::exit(3);
    }
    let beat = std::env::var("NODUS_HEARTBEAT_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(5000);
    Worker::from_env()?
        .heartbeat_interval(Duration::from_millis(beat))
        .on("echo", echo)
        .on("chunks", chunks)
        .on("fail", fail)
        .on("crash", crash)
        .run()
        .await?;
    Ok(())
}
