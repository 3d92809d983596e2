//! A misbehaving worker for lifecycle tests, speaking the raw protocol (`ROGUE_MODE`):
//! `slow-handshake` (never connects), `no-heartbeat` (one heartbeat, then silence),
//! `ignore-terminate` (heartbeats, ignores terminate and SIGTERM), `linger` (sends terminate,
//! then stays alive until a signal ends it), `garbage` (sends bytes that are not MessagePack after
//! its first heartbeat).
//!
//! `impersonate` is not a worker the engine starts but a neighbour process: it reads the
//! `--endpoint` and `--uuid` of the worker whose pid is `ROGUE_VICTIM_PID` from `/proc`, connects
//! as that worker and heartbeats. It prints (on stderr) `SERVED` and exits 1 if the engine hands it a
//! request, prints `REFUSED` and exits 0 if the engine closes the connection, exits 2 when
//! neither happens within 10 s.

use std::time::Duration;

use bytes::BytesMut;
use nodus_engine::protocol::{terminate_code, Decoder, Message, Role, DEFAULT_MAX_MESSAGE_BYTES};
use nodus_engine::worker_sdk::WorkerArgs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mode = std::env::var("ROGUE_MODE").unwrap_or_default();
    if mode == "impersonate" {
        let victim = std::env::var("ROGUE_VICTIM_PID")?;
        std::process::exit(impersonate(&victim).await?);
    }
    let args = WorkerArgs::from_env()?;
    if mode == "slow-handshake" {
        tokio::time::sleep(Duration::from_secs(600)).await;
        return Ok(());
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let ignore_sigterm = mode == "ignore-terminate";
    let stream = UnixStream::connect(&args.endpoint).await?;
    let (mut r, mut w) = stream.into_split();
    w.write_all(&Message::Handshake { uuid: args.uuid.clone() }.to_bytes()).await?;
    w.write_all(&Message::Heartbeat.to_bytes()).await?;
    if mode == "garbage" {
        w.write_all(&[0xc1, 0xc1, 0xc1, 0xc1]).await?;
    }
    if mode == "linger" {
        let bye = Message::Terminate { code: terminate_code::NORMAL, reason: "leaving".into() };
        w.write_all(&bye.to_bytes()).await?;
    }
    let heartbeats = mode != "no-heartbeat";
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut decoder = Decoder::new(Role::Worker, DEFAULT_MAX_MESSAGE_BYTES);
    let mut buf = BytesMut::new();
    let mut connected = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if heartbeats && connected {
                    let _ = w.write_all(&Message::Heartbeat.to_bytes()).await;
                }
            }
            _ = term.recv() => {
                eprintln!("got SIGTERM");
                if !ignore_sigterm {
                    std::process::exit(143);
                }
            }
            n = r.read_buf(&mut buf), if connected => {
                if matches!(n, Ok(0) | Err(_)) {
                    connected = false;
                }
                while let Ok(Some(msg)) = decoder.decode(&mut buf) {
                    eprintln!("ignoring {msg:?}");
                }
            }
        }
    }
}

/// Connects as the worker process `victim`, with what its command line gives away.
async fn impersonate(victim: &str) -> Result<i32, Box<dyn std::error::Error>> {
    let cmdline = std::fs::read(format!("/proc/{victim}/cmdline"))?;
    let words: Vec<String> = cmdline.split(|&b| b == 0).map(|w| String::from_utf8_lossy(w).into_owned()).collect();
    let after = |flag: &str| words.iter().position(|w| w == flag).and_then(|i| words.get(i + 1)).cloned();
    let (endpoint, uuid) = (after("--endpoint").ok_or("no --endpoint")?, after("--uuid").ok_or("no --uuid")?);
    let stream = UnixStream::connect(&endpoint).await?;
    let (mut r, mut w) = stream.into_split();
    let mut decoder = Decoder::new(Role::Worker, DEFAULT_MAX_MESSAGE_BYTES);
    let mut buf = BytesMut::new();
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        // A write that fails means the engine has already closed the connection.
        for msg in [Message::Handshake { uuid }, Message::Heartbeat] {
            if w.write_all(&msg.to_bytes()).await.is_err() {
                return 0;
            }
        }
        loop {
            if matches!(r.read_buf(&mut buf).await, Ok(0) | Err(_)) {
                return 0;
            }
            while let Ok(Some(msg)) = decoder.decode(&mut buf) {
                if matches!(msg, Message::Invoke { .. }) {
                    return 1;
                }
            }
        }
    })
    .await;
    let code = outcome.unwrap_or(2);
    eprintln!("{}", ["REFUSED", "SERVED", "UNDECIDED"][code as usize]);
    Ok(code)
}
