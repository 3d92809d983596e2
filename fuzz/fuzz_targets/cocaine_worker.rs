//! Fuzzes the Cocaine worker protocol decoder (`nodus_engine::protocol::Decoder`), as the engine
//! reads a worker and as a worker reads the engine, fed whole and in chunks.
//!
//! Input: byte 0 holds the chunk size (bits 0-4, 1..=32), the message bound (bits 5-6: 16, 256,
//! 4096 or 65536 bytes) and the role (bit 7: worker); the rest is the stream.
//! Asserts: no panic (nor the scanner and `rmpv` disagreeing on a value's length); a decoder
//! waiting for more consumes nothing and never holds more than its bound (a longer message is
//! fatal); a message never consumes more than the bound; every message re-encodes to bytes that
//! decode to it, within a bound of exactly their size; chunking does not change what is decoded;
//! one decode never allocates beyond `allocation_bound(max)`; the scanning work stays linear: the
//! decoder never examines more than `SCAN_FACTOR` bytes of MessagePack headers per byte fed,
//! however small the reads (`Decoder::examined`).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nodus_engine::protocol::{Decoder, Message, ProtocolError, Role};
use nodus_fuzz::{alloc::peak_during, allocation_bound};

/// Most header bytes the decoder may examine per byte fed. A header is taken once its element
/// is complete; until then each read looks at the one incomplete element's header again (at most
/// 5 bytes: a marker and a 4-byte length), and every read brings at least one byte: at most
/// 1 + 5 per byte. A decoder that rescanned its buffer on every read would pass this bound as
/// soon as a message came in more than six pieces.
const SCAN_FACTOR: u64 = 6;

fn run(data: &[u8], chunk: usize, role: Role, max: usize) -> Vec<Result<Message, ProtocolError>> {
    let mut decoder = Decoder::new(role, max);
    let mut buf = BytesMut::new();
    let mut units = Vec::new();
    let mut fed = 0u64;
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        fed += piece.len() as u64;
        loop {
            let before = buf.len();
            let (result, peak) = peak_during(|| decoder.decode(&mut buf));
            assert!(peak <= allocation_bound(max), "one decode held {peak} bytes (message bound {max})");
            assert!(
                decoder.examined() <= SCAN_FACTOR * fed,
                "the decoder examined {} header bytes for {fed} bytes fed in pieces of {chunk}",
                decoder.examined()
            );
            match result {
                Ok(None) => {
                    assert_eq!(buf.len(), before, "waiting consumed bytes");
                    assert!(buf.len() <= max, "waiting with {} bytes buffered, bound {max}", buf.len());
                    break;
                }
                Ok(Some(m)) => {
                    assert!(
                        before - buf.len() <= max,
                        "a message of {} bytes passed the bound {max}",
                        before - buf.len()
                    );
                    round_trip(&m);
                    units.push(Ok(m));
                }
                Err(e) => {
                    units.push(Err(e));
                    return units;
                }
            }
        }
    }
    units
}

/// `decode(encode(m)) == m`, for the side that receives `m`: an invocation is read by a worker,
/// everything else as the engine reads it (a worker's decoder would take a chunk on a channel it
/// has not seen for an invocation).
fn round_trip(m: &Message) {
    let bytes = m.to_bytes();
    let role = if matches!(m, Message::Invoke { .. }) { Role::Worker } else { Role::Engine };
    let mut d = Decoder::new(role, bytes.len());
    let mut buf = BytesMut::from(&bytes[..]);
    assert_eq!(d.decode(&mut buf), Ok(Some(m.clone())), "round trip through {:x?}", &bytes[..]);
    assert!(buf.is_empty(), "the decoder left {} bytes of its own encoding", buf.len());
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, data)) = data.split_first() else { return };
    let role = if first & 0x80 != 0 { Role::Worker } else { Role::Engine };
    let max = 16usize << (4 * usize::from((first >> 5) & 3));
    let whole = run(data, data.len().max(1), role, max);
    let chunked = run(data, usize::from(first & 0x1f) + 1, role, max);
    assert_eq!(whole, chunked, "the same bytes decoded differently when chunked");
});
