//! Example procedures app written with `nodus_engine::worker_sdk`: each procedure is an app event
//! that reads one chunk (the JSON array of its arguments) and writes its result as JSON.
//!
//! Procedures (declared with their parameters in `manifest.json`):
//! - `add(a, b)`: the sum of two numbers.
//! - `concat(a, b)`: two strings joined.
//! - `echo(value)`: its argument back.
//! - `noop()`: `null` at once (the benchmark's procedure).
//! - `greet(name)`: a greeting as plain text, not JSON (the result becomes a JSON string).
//! - `fail(message)`: fails with `message` (the task ends in error, arpcp 400).
//! - `sleep(ms)`: waits `ms` milliseconds, returns `ms` (timeouts and aborts).
//! - `record(path, token)`: appends `token` as a line to the file `path`, returns `token` (counts
//!   how many times a task really ran).
//! - `crash_once(path)`: the first call (no file at `path` yet) creates the file and kills its
//!   worker process; later calls return `"survived"` (a worker killed mid-task).
//! - `crash()`: kills its worker process every time (retries run out).
//!
//! And one event that is not a procedure: `task_status` takes `TASK_STATUS` notifications (one
//! JSON object per call) and appends each as a line to the file `$PROCS_STATUS_LOG`.

use std::io::Write;
use std::time::Duration;

use nodus_engine::worker_sdk::{HandlerResult, Request, Response, Worker};
use serde_json::Value;

/// Reads the one chunk of arguments: a JSON array.
async fn args(req: &mut Request) -> Result<Vec<Value>, Box<dyn std::error::Error + Send + Sync>> {
    let mut body = Vec::new();
    while let Some(chunk) = req.recv().await? {
        body.extend_from_slice(&chunk);
    }
    match serde_json::from_slice(&body)? {
        Value::Array(items) => Ok(items),
        other => Err(format!("arguments must be a JSON array, got {other}").into()),
    }
}

async fn reply(mut resp: Response, value: Value) -> HandlerResult {
    resp.write(serde_json::to_vec(&value)?).await?;
    Ok(())
}

fn number(v: &Value) -> Result<f64, String> {
    v.as_f64().ok_or_else(|| format!("{v} is not a number"))
}

async fn add(mut req: Request, resp: Response) -> HandlerResult {
    let a = args(&mut req).await?;
    let (a, b) = (a.first().unwrap_or(&Value::Null), a.get(1).unwrap_or(&Value::Null));
    let (x, y) = (number(a)?, number(b)?);
    let sum = match (a.as_i64(), b.as_i64()) {
        (Some(i), Some(j)) => i.checked_add(j).map(Value::from).unwrap_or(Value::from(x + y)),
        _ => Value::from(x + y),
    };
    reply(resp, sum).await
}

async fn concat(mut req: Request, resp: Response) -> HandlerResult {
    let a = args(&mut req).await?;
    let s: String = a.iter().map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())).collect();
    reply(resp, Value::from(s)).await
}

async fn echo(mut req: Request, resp: Response) -> HandlerResult {
    let mut a = args(&mut req).await?;
    reply(resp, a.pop().unwrap_or(Value::Null)).await
}

async fn noop(mut req: Request, resp: Response) -> HandlerResult {
    while req.recv().await?.is_some() {}
    reply(resp, Value::Null).await
}

async fn greet(mut req: Request, mut resp: Response) -> HandlerResult {
    let a = args(&mut req).await?;
    let name = a.first().and_then(Value::as_str).unwrap_or("stranger");
    resp.write(format!("hello, {name}")).await?;
    Ok(())
}

async fn fail(mut req: Request, _resp: Response) -> HandlerResult {
    let a = args(&mut req).await?;
    let message = a.first().and_then(Value::as_str).unwrap_or("failed on purpose");
    Err(message.to_string().into())
}

async fn sleep(mut req: Request, resp: Response) -> HandlerResult {
    let a = args(&mut req).await?;
    let ms = a.first().and_then(Value::as_u64).ok_or("sleep takes a number of milliseconds")?;
    tokio::time::sleep(Duration::from_millis(ms)).await;
    reply(resp, Value::from(ms)).await
}

async fn record(mut req: Request, resp: Response) -> HandlerResult {
    let a = args(&mut req).await?;
    let path = a.first().and_then(Value::as_str).ok_or("record takes a file path")?;
    let token = a.get(1).cloned().unwrap_or(Value::Null);
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    writeln!(f, "{token}")?;
    reply(resp, token).await
}

async fn crash_once(mut req: Request, resp: Response) -> HandlerResult {
    let a = args(&mut req).await?;
    let path = a.first().and_then(Value::as_str).ok_or("crash_once takes a file path")?;
    if std::fs::OpenOptions::new().write(true).create_new(true).open(path).is_ok() {
        eprintln!("crash_once: crashing on purpose");
        std::process::exit(3);
    }
    reply(resp, Value::from("survived")).await
}

async fn task_status(mut req: Request, _resp: Response) -> HandlerResult {
    let mut body = Vec::new();
    while let Some(chunk) = req.recv().await? {
        body.extend_from_slice(&chunk);
    }
    let path = std::env::var("PROCS_STATUS_LOG").map_err(|_| "set PROCS_STATUS_LOG to log notifications")?;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    body.push(b'\n');
    f.write_all(&body)?;
    Ok(())
}

async fn crash(_req: Request, _resp: Response) -> HandlerResult {
    eprintln!("crash: crashing on purpose");
    std::process::exit(3);
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let beat = std::env::var("NODUS_HEARTBEAT_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(5000);
    Worker::from_env()?
        .heartbeat_interval(Duration::from_millis(beat))
        .on("add", add)
        .on("concat", concat)
        .on("echo", echo)
        .on("noop", noop)
        .on("greet", greet)
        .on("fail", fail)
        .on("sleep", sleep)
        .on("record", record)
        .on("crash_once", crash_once)
        .on("crash", crash)
        .on("task_status", task_status)
        .run()
        .await?;
    Ok(())
}
