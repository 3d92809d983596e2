//! One connection: a reader task and a writer task.
//!
//! The reader detects the form from the first byte (links always speak binary), registers the
//! connection with the router, then decodes up to [`BATCH`] units and hands them to the router
//! under one lock acquisition. The connection must send its first complete message before its
//! handshake deadline (`handshake_timeout_ms` from accept or dial) or it is closed; after that it
//! may stay idle. What it holds undecoded (a partial frame) is metered against the node's input
//! budget, and a buffer that grew for a large frame is given back once empty.
//!
//! The writer takes messages off the connection's bounded queue and writes them in batches of up
//! to [`WRITE_CHUNK`] bytes, each encoded in the peer's form. Bytes count against the node's
//! output budget until written. When the connection is cut (its `kill` token), the writer stops
//! at once, even in the middle of a write to a peer that does not read, and drops its queue.

use super::budget::{ListenerKind, Meter};
use super::{Handle, Outbound, Shared};
use crate::auth::Origin;
use crate::router::{Action, ConnId};
use crate::server::budget::Counters;
use bytes::BytesMut;
use nodus_wire::{binary, detect, text, Decoded, Form, FrameError, Message};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn, Instrument};

/// Most decoded messages handled under one lock acquisition.
const BATCH: usize = 256;
/// The writer writes once this many bytes are encoded.
const WRITE_CHUNK: usize = 256 * 1024;
/// What a connection's buffers start with, and the reader's growth step.
const READ_CHUNK: usize = 64 * 1024;
/// Until it has spoken, a connection gets only this much buffer.
const FIRST_READ: usize = 4 * 1024;
/// An emptied buffer larger than this is given back and replaced by a small one.
const SHRINK_ABOVE: usize = 1024 * 1024;
/// How long the writer tries to close its side cleanly after the last write.
const SHUTDOWN_WRITE: Duration = Duration::from_secs(1);

enum Decoder {
    Text(text::LineDecoder),
    Binary(binary::FrameDecoder),
}

impl Decoder {
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, FrameError> {
        match self {
            Decoder::Text(d) => d.decode(buf),
            Decoder::Binary(d) => d.decode(buf),
        }
    }
}

/// Runs a connection until it closes. `deadline` is when its first complete message must have
/// arrived; `permit` is its place in its listener's limit.
#[allow(clippy::too_many_arguments)]
pub(super) async fn connection<R, W>(
    shared: Arc<Shared>,
    kind: ListenerKind,
    id: ConnId,
    mut rd: R,
    wr: W,
    origin: Origin,
    deadline: Instant,
    _permit: Option<OwnedSemaphorePermit>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let counters = shared.counters.clone();
    let timed_out = || {
        counters.listener(kind).handshake_timeouts.fetch_add(1, Ordering::Relaxed);
        debug!("closing: no complete message within the handshake timeout");
    };
    let max_frame = shared.config.limits.max_frame_bytes;
    let dialed = matches!(origin, Origin::Dialed { .. });
    let handshake = tokio::time::sleep_until(deadline);
    tokio::pin!(handshake);
    let mut buf = BytesMut::with_capacity(FIRST_READ);
    // The first byte tells which form the peer speaks; links always speak binary.
    let form = loop {
        if dialed {
            break Form::Binary;
        }
        if let Some(form) = detect(&buf) {
            break form;
        }
        tokio::select! {
            biased;
            _ = shared.stop.cancelled() => return,
            _ = &mut handshake => return timed_out(),
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    counters.listener(kind).bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                }
            },
        }
    };
    let (tx, rx) = mpsc::channel(shared.config.limits.max_outbound_messages);
    let (lane_tx, lane) = mpsc::channel(super::HEARTBEAT_LANE);
    let meter = Arc::new(Meter::default());
    meter.progressed(shared.clock.now_ms());
    let kill = CancellationToken::new();
    {
        let mut st = shared.lock();
        if st.router.is_quitting() {
            return;
        }
        let handle = Handle { tx, lane: Some(lane_tx), kill: kill.clone(), meter: Some(meter.clone()), warned: false };
        st.handles.insert(id, handle);
        if dialed {
            let mut out = Vec::new();
            st.router.dial(id, origin, &mut out);
            shared.apply(&mut st, &mut out);
        } else {
            st.router.connect(id, origin);
        }
    }
    debug!(?form, "connection open");
    let clock = shared.clock.clone();
    let writer =
        write_loop(id, kind, wr, (rx, lane), form, max_frame, meter.clone(), counters.clone(), kill.clone(), clock);
    let writer = tokio::spawn(writer.in_current_span());
    let mut decoder = match form {
        Form::Text => Decoder::Text(text::LineDecoder::new(max_frame)),
        Form::Binary => Decoder::Binary(binary::FrameDecoder::new(max_frame)),
    };
    let mut greeted = false;
    let mut batch = Vec::with_capacity(BATCH);
    let mut out = Vec::new();
    loop {
        let mut fatal = None;
        let mut full = false;
        while batch.len() < BATCH {
            match decoder.decode(&mut buf) {
                Ok(Some(d)) => {
                    batch.push(d);
                    full = batch.len() == BATCH;
                }
                Ok(None) => break,
                Err(e) => {
                    fatal = Some(e);
                    break;
                }
            }
        }
        if !batch.is_empty() || fatal.is_some() {
            let now = shared.clock.now_ms();
            let mut st = shared.lock();
            for d in batch.drain(..) {
                match d {
                    Decoded::Message(m) => {
                        greeted = true;
                        if tracing::enabled!(tracing::Level::DEBUG) {
                            trace_message(&m);
                        }
                        st.router.handle(id, m, now, &mut out);
                    }
                    Decoded::Invalid(e) => st.router.handle_invalid(id, &e, &mut out),
                }
            }
            if let Some(e) = &fatal {
                warn!(conn = id, error = %e, "closing connection");
                st.router.handle_invalid(id, &nodus_wire::MessageError::Malformed(e.to_string()), &mut out);
                out.push(Action::Close(id));
            }
            shared.apply(&mut st, &mut out);
        }
        if fatal.is_some() {
            break;
        }
        if full {
            // More complete units may already be buffered: handle them before reading again.
            continue;
        }
        if buf.is_empty() && buf.capacity() > SHRINK_ABOVE {
            buf = BytesMut::new();
        }
        if let Some(total) = meter.hold_input(buf.len(), &counters) {
            if total > counters.input.limit() {
                shared.trim_input();
            }
        }
        if buf.capacity() - buf.len() < 8192 {
            buf.reserve(READ_CHUNK);
        }
        tokio::select! {
            biased;
            _ = &mut handshake, if !greeted => {
                timed_out();
                break;
            }
            _ = kill.cancelled() => {
                // The router closes a link whose handshake ran past the same deadline; whichever
                // of the two notices first, it counts as a handshake timeout.
                if !greeted && Instant::now() >= deadline {
                    timed_out();
                }
                break;
            }
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) => break,
                Ok(n) => {
                    counters.listener(kind).bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    debug!(error = %e, "read failed");
                    break;
                }
            },
        }
    }
    // Give the memory back before waiting for anything.
    drop(buf);
    {
        let mut st = shared.lock();
        st.router.disconnect(id, &mut out);
        shared.apply(&mut st, &mut out);
        // Dropping the handle closes the queue: the writer drains it and stops.
        st.handles.remove(&id);
    }
    let _ = writer.await;
    meter.release_all(&counters);
    debug!("connection closed");
}

/// Logs a message that carries an HTTP request's id (`trace_id`, set by the HTTP API and kept
/// across nodes), so one request can be followed through every node it reaches.
fn trace_message(m: &Message) {
    if let Some(trace_id) = m.get(nodus_http::api::TRACE_PARAM) {
        debug!(
            %trace_id,
            command = %m.command,
            from = %format_args!("{}:{}", m.from.server, m.from.service),
            to = %format_args!("{}:{}", m.to.server, m.to.service),
            hops = m.envelope.hops,
            "traced message"
        );
    }
}

/// Writes what the router queues for one connection; see the module documentation.
#[allow(clippy::too_many_arguments)]
async fn write_loop<W: AsyncWrite + Unpin>(
    id: ConnId,
    kind: ListenerKind,
    mut wr: W,
    (mut rx, mut lane): (mpsc::Receiver<Outbound>, mpsc::Receiver<Message>),
    form: Form,
    max_frame: usize,
    meter: Arc<Meter>,
    counters: Arc<Counters>,
    kill: CancellationToken,
    clock: crate::clock::Clock,
) {
    let mut out = BytesMut::with_capacity(READ_CHUNK);
    let mut shares: Vec<(ConnId, usize)> = Vec::new();
    if form == Form::Binary {
        out.extend_from_slice(&binary::PREFACE);
    }
    let encode = |m: Message, out: &mut BytesMut| match form {
        Form::Text => text::encode(&m, out),
        Form::Binary => {
            if let Err(e) = binary::encode(&m, out, max_frame) {
                warn!(conn = id, error = %e, command = %m.command, "dropping message too large to send");
            }
        }
    };
    loop {
        // Heartbeats first: they wait in their own lane, never behind gossip or traffic.
        let first = tokio::select! {
            biased;
            _ = kill.cancelled() => break,
            Some(m) = lane.recv() => Some(Outbound::Msg(m, 0)),
            m = rx.recv() => m,
        };
        let mut close = false;
        // Queued bytes taken off the queue in this batch, released once written, and the
        // senders' shares among them.
        let mut taken = 0;
        shares.clear();
        let mut next = first;
        loop {
            while let Ok(m) = lane.try_recv() {
                encode(m, &mut out);
            }
            match next {
                None | Some(Outbound::Close) => close = true,
                Some(Outbound::Msg(m, size)) => {
                    taken += size;
                    encode(m, &mut out);
                }
                Some(Outbound::Offered(m, size, sender)) => {
                    taken += size;
                    shares.push((sender, size));
                    encode(m, &mut out);
                }
            }
            if close || out.len() >= WRITE_CHUNK {
                break;
            }
            match rx.try_recv() {
                Ok(o) => next = Some(o),
                Err(_) => break,
            }
        }
        if !out.is_empty() {
            let written = tokio::select! {
                biased;
                _ = kill.cancelled() => false,
                r = wr.write_all(&out) => r.is_ok(),
            };
            if !written {
                break;
            }
            counters.listener(kind).bytes_out.fetch_add(out.len() as u64, Ordering::Relaxed);
            out.clear();
            if out.capacity() > SHRINK_ABOVE {
                out = BytesMut::with_capacity(READ_CHUNK);
            }
        }
        meter.drop_shares(&shares);
        meter.written(taken, &counters);
        meter.progressed(clock.now_ms());
        if close {
            break;
        }
    }
    // A cut connection's queue and buffer go now, not when the socket finally closes.
    drop(rx);
    drop(out);
    if !kill.is_cancelled() {
        let _ = tokio::time::timeout(SHUTDOWN_WRITE, wr.shutdown()).await;
    }
    // Wake the reader in case the peer keeps the connection half open.
    kill.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::HEARTBEAT_LANE;

    /// A heartbeat queued after a megabyte of gossip is written first: it never waits behind it.
    #[tokio::test]
    async fn heartbeats_are_written_ahead_of_gossip_queued_before_them() {
        let (tx, rx) = mpsc::channel(64);
        let (lane_tx, lane) = mpsc::channel(HEARTBEAT_LANE);
        for _ in 0..10 {
            let gossip = Message::new("GOSSIP").with_payload(vec![7u8; 100_000]);
            tx.try_send(Outbound::Msg(gossip, 100_000)).expect("room in the queue");
        }
        lane_tx.try_send(Message::new("LINK_PING").param("t", 5)).expect("room in the lane");
        drop((tx, lane_tx));
        let (wr, mut rd) = tokio::io::duplex(64 * 1024);
        let counters = Arc::new(Counters::new(&crate::config::Config::default().limits));
        let max_frame = nodus_wire::DEFAULT_MAX_FRAME;
        let meter = Arc::new(Meter::default());
        let kill = CancellationToken::new();
        let clock = crate::clock::Clock::system();
        let writer = tokio::spawn(write_loop(
            1,
            ListenerKind::Cluster,
            wr,
            (rx, lane),
            Form::Binary,
            max_frame,
            meter,
            counters,
            kill,
            clock,
        ));
        let mut decoder = binary::FrameDecoder::new(max_frame);
        let mut buf = BytesMut::new();
        let mut commands = Vec::new();
        while rd.read_buf(&mut buf).await.expect("read") > 0 {
            while let Some(Decoded::Message(m)) = decoder.decode(&mut buf).expect("valid frames") {
                commands.push(m.command);
            }
        }
        writer.await.expect("the writer ends");
        assert_eq!(commands.len(), 11, "{commands:?}");
        assert_eq!(commands[0], "LINK_PING", "{commands:?}");
    }
}
