//! A misbehaving worker for lifecycle tests, speaking the raw protocol (`ROGUE_MODE`):
//! `slow-handshake` (never connects), `no-heartbeat` (one heartbeat, then silence),
//! `ignore-terminate` (heartbeats, ignores terminate and SIGTERM), `linger` (sends terminate,
//! then stays alive until a signal ends it), `garbage` (sends bytes that are not MessagePack after
//! its first heartbeat).

use std::time::Duration;

use bytes::BytesMut;
use nodus_engine::protocol::{terminate_code, Decoder, Message, Role, DEFAULT_MAX_MESSAGE_BYTES};
use nodus_engine::worker_sdk::WorkerArgs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mode = std::env::var("ROGUE_MODE").unwrap_or_default();
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
