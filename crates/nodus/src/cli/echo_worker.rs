//! `nodus echo-worker`: a built-in example worker (events `echo`, `upper`, `fail`, `sleep`,
//! `count`, and `http` behind the HTTP gateway), so an app can be deployed with nothing but this
//! binary.

use nodus_engine::worker_sdk::{HandlerResult, Request, Response, Worker, WorkerArgs};
use nodus_http::cocaine::{RequestHead, ResponseHead};

/// `nodus echo-worker` arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// `--app NAME --locator HOST:PORT --endpoint SOCKET --uuid UUID`, as the engine passes them.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

async fn echo(mut req: Request, mut resp: Response) -> HandlerResult {
    count_call();
    while let Some(chunk) = req.recv().await? {
        resp.write(chunk).await?;
    }
    Ok(())
}

async fn upper(mut req: Request, mut resp: Response) -> HandlerResult {
    count_call();
    while let Some(chunk) = req.recv().await? {
        resp.write(chunk.to_ascii_uppercase()).await?;
    }
    Ok(())
}

async fn fail(_req: Request, _resp: Response) -> HandlerResult {
    count_call();
    Err("failed on purpose".into())
}

/// Cocaine's HTTP event, as the gateway invokes it: answers 200 with the request's body, written
/// back piece by piece as it arrives (a large upload streams back as it streams in), its
/// content type, and the method and URI in `x-echo-method` and `x-echo-uri`.
async fn http(mut req: Request, mut resp: Response) -> HandlerResult {
    count_call();
    let first = req.recv().await?.ok_or("no request chunk")?;
    let head = RequestHead::decode(&first)?;
    let ctype = head
        .headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-type"))
        .map_or_else(|| bytes::Bytes::from_static(b"application/octet-stream"), |(_, v)| v.clone());
    let headers = vec![
        ("Content-Type".to_string(), ctype),
        ("X-Echo-Method".to_string(), bytes::Bytes::from(head.method.into_bytes())),
        ("X-Echo-Uri".to_string(), bytes::Bytes::from(head.uri.into_bytes())),
    ];
    resp.write(ResponseHead { code: 200, headers }.encode()).await?;
    if !head.body.is_empty() {
        resp.write(head.body).await?;
    }
    while let Some(chunk) = req.recv().await? {
        resp.write(chunk).await?;
    }
    Ok(())
}

/// Invocations this worker process started (every event but `count` itself counts).
static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn count_call() {
    CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Waits the number of milliseconds its input says, then answers `slept`.
async fn sleep(mut req: Request, mut resp: Response) -> HandlerResult {
    count_call();
    let mut input = Vec::new();
    while let Some(chunk) = req.recv().await? {
        input.extend_from_slice(&chunk);
    }
    let ms: u64 = std::str::from_utf8(&input)?.trim().parse()?;
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    resp.write("slept").await?;
    Ok(())
}

/// How many invocations this worker ran before this one (tests use it to prove a request never
/// reached a worker).
async fn count(_req: Request, mut resp: Response) -> HandlerResult {
    resp.write(CALLS.load(std::sync::atomic::Ordering::Relaxed).to_string()).await?;
    Ok(())
}

/// Serves the engine until it says terminate.
///
/// Fails when the arguments are not the engine's or the engine connection fails.
pub async fn run(a: Args) -> anyhow::Result<u8> {
    let args = WorkerArgs::parse(a.args).map_err(|e| anyhow::anyhow!("{e}"))?;
    Worker::new(args)
        .on("echo", echo)
        .on("upper", upper)
        .on("fail", fail)
        .on("http", http)
        .on("sleep", sleep)
        .on("count", count)
        .run()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(0)
}
