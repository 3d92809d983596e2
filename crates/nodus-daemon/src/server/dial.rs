//! Neighbour dialers: one task per configured or remembered neighbour keeps a link to it, dialing
//! while none exists, with the shared jittered exponential backoff ([`DIAL_BACKOFF_MIN`]..
//! [`DIAL_BACKOFF_MAX`]). Each dial is bounded ([`DIAL_TIMEOUT`] for TCP, then the handshake
//! deadline for TLS and for the peer's `ACCEPT`).

use super::accept::Split;
use super::budget::ListenerKind;
use super::{conn, Shared};
use crate::auth::Origin;
use nodus_wire::Backoff;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tracing::{debug, warn, Instrument};

/// How long dialing a neighbour may take before it is retried.
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// First delay between dials.
const DIAL_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest delay between dials; a link that lived longer than this starts the delays over.
const DIAL_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Keeps a link to the neighbour at `addr` until the node stops.
pub(super) async fn dialer(shared: Arc<Shared>, addr: String) {
    let mut backoff = Backoff::new(DIAL_BACKOFF_MIN, DIAL_BACKOFF_MAX, rand::random());
    while !shared.stop.is_cancelled() {
        if !shared.lock().router.linked_to_addr(&addr) {
            let started = tokio::time::Instant::now();
            let id = shared.next_conn_id();
            let span = tracing::debug_span!("conn", conn = id, peer = %addr, listener = ListenerKind::Dial.name());
            dial(&shared, &addr, id).instrument(span).await;
            if started.elapsed() > DIAL_BACKOFF_MAX {
                backoff.reset();
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = shared.stop.cancelled() => break,
        }
    }
}

/// One dial: connect, TLS when configured, then the connection until it ends.
async fn dial(shared: &Arc<Shared>, addr: &str, id: crate::router::ConnId) {
    // Bounded: during a partition a SYN can go unanswered for minutes.
    let s = match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return debug!(error = %e, "neighbour not reachable"),
        Err(_) => return debug!("neighbour did not answer the connection in time"),
    };
    let _ = s.set_nodelay(true);
    shared.counters.listener(ListenerKind::Dial).accepted.fetch_add(1, Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + shared.config.handshake_timeout();
    let Some(tls) = &shared.tls else {
        let (r, w) = s.split();
        let origin = Origin::Dialed { addr: addr.to_string(), tls: false };
        return conn::connection(shared.clone(), ListenerKind::Dial, id, r, w, origin, deadline, None).await;
    };
    let name = match crate::tls::server_name(addr) {
        Ok(name) => name,
        Err(e) => return warn!(%addr, error = %e, "cannot dial the neighbour over TLS"),
    };
    let connect = tokio::time::timeout_at(deadline, tls.connector.connect(name, s));
    tokio::pin!(connect);
    let handshake = tokio::select! {
        biased;
        _ = shared.stop.cancelled() => return,
        r = &mut connect => r,
    };
    match handshake {
        Ok(Ok(stream)) => {
            let (r, w) = stream.split();
            let origin = Origin::Dialed { addr: addr.to_string(), tls: true };
            conn::connection(shared.clone(), ListenerKind::Dial, id, r, w, origin, deadline, None).await;
        }
        Ok(Err(e)) => warn!(%addr, error = %e, "TLS handshake with neighbour failed"),
        Err(_) => {
            shared.counters.listener(ListenerKind::Dial).handshake_timeouts.fetch_add(1, Ordering::Relaxed);
            warn!(%addr, "TLS handshake with neighbour timed out");
        }
    }
}
