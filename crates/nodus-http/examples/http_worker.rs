//! Example worker serving HTTP through the gateway, built on `nodus_engine::worker_sdk` and the
//! Cocaine HTTP chunks of `nodus_http::cocaine`.
//!
//! Events:
//! - `http`: answers 200 with a JSON description of the request (method, uri, version,
//!   headers, body length and FNV-1a hash of the whole body, how many chunks it came in).
//! - `noop`: answers 200 `ok` (the benchmark's app).
//! - `drain`: answers the head at once, then reads the body to its end and sends `drained N`.
//! - `stream`: answers the head and `chunk-0`, waits until `release?id=ID` is called for the
//!   same `id`, then sends `chunk-1` .. `chunk-4` and closes.
//! - `hold`: answers the head, waits for `release?id=ID`, then sends `released` and closes.
//! - `release`: wakes `stream`/`hold` waiting on `?id=ID`; answers 200 `released`.
//! - `badhead`: answers a first chunk that is not a head.
//! - `crash`: exits the process with code 3 before answering.
//! - `silent`: never answers.
//! - `fail`: the handler fails (an application error).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use nodus_engine::worker_sdk::{HandlerResult, Request, Response, Worker};
use nodus_http::cocaine::{RequestHead, ResponseHead};
use tokio::sync::Notify;

/// FNV-1a, 64 bits: the tests hash the body they send the same way.
fn fnv1a(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

async fn read_head(req: &mut Request) -> Result<RequestHead, Box<dyn std::error::Error + Send + Sync>> {
    let first = req.recv().await?.ok_or("no request chunk")?;
    Ok(RequestHead::decode(&first)?)
}

fn head(code: u16, headers: &[(&str, &str)]) -> Bytes {
    let headers = headers.iter().map(|(n, v)| (n.to_string(), Bytes::from(v.to_string()))).collect();
    ResponseHead { code, headers }.encode()
}

fn query_id(uri: &str) -> String {
    uri.split_once('?').and_then(|(_, q)| q.split('&').find_map(|kv| kv.strip_prefix("id="))).unwrap_or("").to_string()
}

/// Waiters by id: `stream`/`hold` wait, `release` wakes. A release that comes first is kept.
fn gate(id: &str) -> Arc<Notify> {
    static GATES: OnceLock<Mutex<HashMap<String, Arc<Notify>>>> = OnceLock::new();
    let mut gates = GATES.get_or_init(Default::default).lock().expect("gates lock");
    gates.entry(id.to_string()).or_default().clone()
}

async fn http(mut req: Request, mut resp: Response) -> HandlerResult {
    let h = read_head(&mut req).await?;
    let mut len = h.body.len() as u64;
    let mut hash = fnv1a(FNV_OFFSET, &h.body);
    let mut chunks = 1u64;
    let mut largest_chunk = 0;
    while let Some(chunk) = req.recv().await? {
        len += chunk.len() as u64;
        hash = fnv1a(hash, &chunk);
        chunks += 1;
        largest_chunk = largest_chunk.max(chunk.len());
    }
    let headers: Vec<[String; 2]> =
        h.headers.iter().map(|(n, v)| [n.clone(), String::from_utf8_lossy(v).into_owned()]).collect();
    let body = serde_json::json!({
        "method": h.method,
        "uri": h.uri,
        "version": h.version,
        "headers": headers,
        "body_len": len,
        "body_fnv": format!("{hash:016x}"),
        "chunks": chunks,
        "head_body_len": h.body.len(),
        "largest_later_chunk": largest_chunk,
    });
    resp.write(head(200, &[("Content-Type", "application/json"), ("X-Worker", "rust")])).await?;
    resp.write(serde_json::to_vec(&body)?).await?;
    Ok(())
}

async fn drain(mut req: Request, mut resp: Response) -> HandlerResult {
    read_head(&mut req).await?;
    resp.write(head(200, &[("Content-Type", "text/plain")])).await?;
    let mut len = 0;
    while let Some(chunk) = req.recv().await? {
        len += chunk.len();
    }
    resp.write(format!("drained {len}")).await?;
    Ok(())
}

async fn noop(mut req: Request, mut resp: Response) -> HandlerResult {
    while req.recv().await?.is_some() {}
    resp.write(head(200, &[("Content-Type", "text/plain")])).await?;
    resp.write(Bytes::from_static(b"ok")).await?;
    Ok(())
}

async fn stream(mut req: Request, mut resp: Response) -> HandlerResult {
    let h = read_head(&mut req).await?;
    let gate = gate(&query_id(&h.uri));
    resp.write(head(200, &[("Content-Type", "text/plain")])).await?;
    resp.write(Bytes::from_static(b"chunk-0\n")).await?;
    gate.notified().await;
    for i in 1..5 {
        resp.write(format!("chunk-{i}\n")).await?;
    }
    Ok(())
}

async fn hold(mut req: Request, mut resp: Response) -> HandlerResult {
    let h = read_head(&mut req).await?;
    let gate = gate(&query_id(&h.uri));
    resp.write(head(200, &[("Content-Type", "text/plain")])).await?;
    gate.notified().await;
    resp.write(Bytes::from_static(b"released")).await?;
    Ok(())
}

async fn release(mut req: Request, mut resp: Response) -> HandlerResult {
    let h = read_head(&mut req).await?;
    // notify_one keeps a permit when nobody waits yet, so the order does not matter.
    gate(&query_id(&h.uri)).notify_one();
    resp.write(head(200, &[])).await?;
    resp.write(Bytes::from_static(b"released")).await?;
    Ok(())
}

async fn badhead(mut req: Request, mut resp: Response) -> HandlerResult {
    read_head(&mut req).await?;
    resp.write(Bytes::from_static(b"this is not a head")).await?;
    Ok(())
}

async fn crash(mut req: Request, _resp: Response) -> HandlerResult {
    read_head(&mut req).await?;
    eprintln!("crashing on purpose");
    std::process::exit(3);
}

async fn silent(mut req: Request, _resp: Response) -> HandlerResult {
    read_head(&mut req).await?;
    std::future::pending::<()>().await;
    Ok(())
}

async fn fail(mut req: Request, _resp: Response) -> HandlerResult {
    read_head(&mut req).await?;
    Err("failing on purpose".into())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let beat = std::env::var("NODUS_HEARTBEAT_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(5000);
    Worker::from_env()?
        .heartbeat_interval(Duration::from_millis(beat))
        .on("http", http)
        .on("noop", noop)
        .on("drain", drain)
        .on("stream", stream)
        .on("hold", hold)
        .on("release", release)
        .on("badhead", badhead)
        .on("crash", crash)
        .on("silent", silent)
        .on("fail", fail)
        .run()
        .await?;
    Ok(())
}
