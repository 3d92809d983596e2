//! The node-wide memory budgets (issue 8 item 8): 200 clients each sending most of a 4 MiB frame
//! and then stalling, and ten sniffers that never read, stay within `max_buffered_input_bytes` and
//! `max_buffered_output_bytes`: the biggest holders are cut and their memory released. The peak
//! RSS of this test process (node and clients together) is printed.
//!
//! One test in its own binary, so the printed peak RSS is this scenario's alone.

use nodus_daemon::BUDGET_ALLOWANCE_BYTES;
use nodus_tests::{BinConn, Node, TextConn, WAIT};
use nodus_wire::{binary, Message};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;

const MIB: usize = 1 << 20;
/// The budgets under test (each well below what the attack would hold without them).
const INPUT_BUDGET: usize = 64 * MIB;
const OUTPUT_BUDGET: usize = 64 * MIB;
/// Half-sent frames.
const HALF_FRAMES: usize = 200;
/// Bytes of each 4 MiB frame actually sent.
const SENT_PER_FRAME: usize = 3 * MIB;
/// Sniffers that never read.
const SNIFFERS: usize = 10;

/// `VmHWM` (peak RSS) and `VmRSS` of this process, in MiB.
fn rss_mib() -> (usize, usize) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<usize>().ok())
            .map_or(0, |kb| kb / 1024)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

#[tokio::test(flavor = "multi_thread")]
async fn half_sent_frames_and_sniffers_that_never_read_stay_within_the_node_budgets() {
    let limits = format!(
        "[limits]\nmax_buffered_input_bytes = {INPUT_BUDGET}\nmax_buffered_output_bytes = {OUTPUT_BUDGET}\nmax_connections = 4096"
    );
    let node = Node::start(&limits).await;
    let (hwm_start, _) = rss_mib();

    // 200 clients announce a 4 MiB frame and send 3 MiB of it, then stall (the connection stays
    // open); each reports when the node closes its connection.
    let max = 4 * MIB as u32;
    let mut head = binary::PREFACE.to_vec();
    head.extend_from_slice(&(max - 16).to_be_bytes());
    let body = bytes::Bytes::from(vec![0x5a; SENT_PER_FRAME]);
    let (closed_tx, mut closed) = mpsc::unbounded_channel();
    let mut senders = Vec::new();
    for _ in 0..HALF_FRAMES {
        let (tcp, head, body, closed_tx) = (node.tcp, head.clone(), body.clone(), closed_tx.clone());
        senders.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(tcp).await.expect("connect");
            if s.write_all(&head).await.is_ok() && s.write_all(&body).await.is_ok() {
                let mut b = [0u8; 1];
                let _ = s.read(&mut b).await;
            }
            let _ = closed_tx.send(());
        }));
    }
    // The node has settled once every connection is either cut or held whole (there is no event
    // for that: poll the counters, bounded).
    // What a held connection counts: its partial frame (with the length prefix) beyond the
    // per-connection allowance.
    let frame_held = SENT_PER_FRAME + 4 - BUDGET_ALLOWANCE_BYTES;
    let settled = async {
        loop {
            let c = node.counters.snapshot();
            if c.input_cuts as usize + c.input_bytes / frame_held == HALF_FRAMES && c.input_bytes % frame_held == 0 {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let input = tokio::time::timeout(WAIT, settled).await.expect("the node reads or cuts every half frame");
    // Every cut connection is closed.
    for _ in 0..input.input_cuts {
        tokio::time::timeout(WAIT, closed.recv()).await.expect("a cut connection is closed").unwrap();
    }
    let held = input.input_bytes / frame_held;
    eprintln!(
        "half frames: {HALF_FRAMES} × {} MiB sent, {} cut, {held} held; input now {} MiB, peak {} MiB (budget {} MiB)",
        SENT_PER_FRAME / MIB,
        input.input_cuts,
        input.input_bytes / MIB,
        input.input_peak_bytes / MIB,
        INPUT_BUDGET / MIB
    );
    // The check runs after each read; one read per connection in flight may pass the bound.
    assert!(input.input_peak_bytes <= INPUT_BUDGET + 16 * MIB, "{input:?}");
    assert!(input.input_bytes <= INPUT_BUDGET, "{input:?}");
    assert_eq!(held, INPUT_BUDGET / frame_held, "as many as fit the budget are held: {input:?}");
    // The senders go away: what the node held for them is released.
    for s in senders {
        s.abort();
    }
    let released = async {
        while node.counters.snapshot().input_bytes != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(WAIT, released).await.expect("the node releases the input of closed connections");

    // Ten sniffers on the Unix socket ask for everything, then never read again.
    let mut sniffers = Vec::new();
    for _ in 0..SNIFFERS {
        let mut s = TextConn::connect(&node).await;
        s.send("SNIFF").await;
        assert_eq!(s.recv().await.command, "SNIFFING");
        sniffers.push(s);
    }
    // A sink that reads everything, and a producer of 40 MiB: under the per-connection bound of
    // each sniffer (64 MiB), ten times over the node's output budget.
    let mut sink = BinConn::connect(&node).await;
    sink.register("sink").await;
    let drain = tokio::spawn(async move {
        let mut n = 0;
        while n < 640 {
            if sink.recv().await.command == "DATA" {
                n += 1;
            }
        }
    });
    let mut producer = UnixStream::connect(&node.unix).await.unwrap();
    producer.write_all(&binary::PREFACE).await.unwrap();
    let data = Message::new("DATA").to("sink").with_payload(vec![0x33; 64 * 1024]);
    let mut frames = bytes::BytesMut::new();
    binary::encode(&data, &mut frames, 1 << 20).unwrap();
    for _ in 0..640 {
        producer.write_all(&frames).await.unwrap();
    }
    tokio::time::timeout(WAIT, drain).await.expect("the sink gets everything").unwrap();
    // Every copy for the sniffers was queued or refused when the sink got the last message: the
    // cuts are done. Each cut sniffer reaches EOF after what its socket buffered.
    let (closed_tx, mut closed) = mpsc::unbounded_channel();
    for mut s in sniffers {
        let closed_tx = closed_tx.clone();
        tokio::spawn(async move {
            let mut raw = vec![0u8; 1 << 16];
            while let Ok(n) = s.stream_mut().read(&mut raw).await {
                if n == 0 {
                    break;
                }
            }
            let _ = closed_tx.send(());
        });
    }
    let cut = node.counters.snapshot().output_cuts;
    for _ in 0..cut {
        tokio::time::timeout(WAIT, closed.recv()).await.expect("a cut sniffer is closed").unwrap();
    }
    let output = node.counters.snapshot();
    let (hwm, rss) = rss_mib();
    eprintln!(
        "sniffers: {SNIFFERS} that never read, {cut} cut; output now {} MiB, peak {} MiB (budget {} MiB)",
        output.output_bytes / MIB,
        output.output_peak_bytes / MIB,
        OUTPUT_BUDGET / MIB
    );
    eprintln!(
        "peak RSS of the test process (node and clients): {hwm} MiB (at start {hwm_start} MiB); RSS now {rss} MiB"
    );
    assert!(output.output_peak_bytes <= OUTPUT_BUDGET + MIB, "{output:?}");
    assert!(output.output_cuts >= 5, "{output:?}");
    assert!(output.output_bytes <= OUTPUT_BUDGET, "{output:?}");
}
