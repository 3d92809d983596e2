//! The UDP signal port: one text message per datagram (at most [`MAX_DATAGRAM`] bytes), one way.
//! It is bounded by itself (one datagram at a time, no connection state) and counts against no
//! listener's connection limit; a failing `recv` backs off like a failing `accept`.

use super::accept::{ACCEPT_BACKOFF_MAX, ACCEPT_BACKOFF_MIN};
use super::{Shared, UDP_CONN};
use nodus_wire::{text, Backoff};
use std::sync::Arc;
use tokio::net::UdpSocket;
use tracing::warn;

/// Largest datagram accepted on the UDP signal port.
const MAX_DATAGRAM: usize = 1024;

/// Receives datagrams until the node stops.
pub(super) async fn serve(shared: Arc<Shared>, socket: UdpSocket) {
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let secret = shared.config.cluster.udp_secret.clone();
    let mut backoff = Backoff::new(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX, rand::random());
    let mut out = Vec::new();
    loop {
        let received = tokio::select! {
            biased;
            _ = shared.stop.cancelled() => return,
            r = socket.recv_from(&mut buf) => r,
        };
        let (n, peer) = match received {
            Ok(r) => {
                backoff.reset();
                r
            }
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "UDP receive failed");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shared.stop.cancelled() => return,
                }
                continue;
            }
        };
        if n > MAX_DATAGRAM {
            warn!(%peer, "dropping a datagram over 1024 bytes");
            continue;
        }
        let Ok(line) = std::str::from_utf8(&buf[..n]) else {
            warn!(%peer, "dropping a datagram that is not UTF-8");
            continue;
        };
        let mut msg = match text::from_line(line.trim_end_matches(['\n', '\r'])) {
            Ok(m) => m,
            Err(e) => {
                warn!(%peer, error = %e, "dropping an invalid datagram");
                continue;
            }
        };
        if !secret.is_empty() && msg.params.remove("secret_code").as_deref() != Some(secret.as_str()) {
            warn!(%peer, "dropping a datagram without the right secret_code");
            continue;
        }
        let mut st = shared.lock();
        st.router.handle(UDP_CONN, msg, shared.clock.now_ms(), &mut out);
        shared.apply(&mut st, &mut out);
    }
}
