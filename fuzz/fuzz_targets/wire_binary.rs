//! Fuzzes the binary form: `binary::decode_body` on the raw input and `FrameDecoder` (with and
//! without the preface) on it as a stream, fed whole and in chunks.
//!
//! Input: byte 0 holds the chunk size (bits 0-5, 1..=64), whether the decoder expects the
//! preface (bit 6) and whether the harness writes a correct preface first (bit 7, so mutations
//! reach the frames); the rest is the stream.
//! Asserts: no panic; every message decoded is valid and round-trips through both forms; every
//! unit consumes exactly its announced frame (a bad body is `Invalid` and the stream stays in
//! sync); a decoder waiting for more never holds more than one maximal frame; an announced
//! length past the bound is fatal; chunking does not change what is decoded; one decode never
//! allocates beyond `allocation_bound(MAX_FRAME)`.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use nodus_fuzz::{alloc::peak_during, allocation_bound, wire::check_message};
use nodus_wire::binary::{decode_body, FrameDecoder, HEADER_LEN, PREFACE};
use nodus_wire::{Decoded, FrameError};

/// The frame bound of the decoder under test (small, so oversized frames are reached).
const MAX_FRAME: usize = 4096;

/// What a decode gave: a unit, or a fatal error (a bad preface compared by kind only: how much
/// of it had arrived changes the text).
type Unit = Result<Decoded, FrameError>;

fn run(data: &[u8], chunk: usize, preface: bool) -> Vec<Unit> {
    let mut decoder = if preface { FrameDecoder::new(MAX_FRAME) } else { FrameDecoder::without_preface(MAX_FRAME) };
    let mut preface_pending = preface;
    let mut buf = BytesMut::new();
    let mut units = Vec::new();
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.clone();
            let (result, peak) = peak_during(|| decoder.decode(&mut buf));
            assert!(peak <= allocation_bound(MAX_FRAME), "one decode held {peak} bytes (frame bound {MAX_FRAME})");
            let consumed = before.len() - buf.len();
            match result {
                Ok(None) => {
                    if preface_pending && consumed == PREFACE.len() {
                        preface_pending = false;
                    }
                    let bound = if preface_pending { PREFACE.len() } else { HEADER_LEN + MAX_FRAME };
                    assert!(buf.len() < bound, "waiting with {} bytes buffered (bound {bound})", buf.len());
                    assert!(consumed == 0 || consumed == PREFACE.len(), "waiting consumed {consumed} bytes");
                    break;
                }
                Ok(Some(unit)) => {
                    let start = if preface_pending { PREFACE.len() } else { 0 };
                    preface_pending = false;
                    let header: [u8; 4] = before[start..start + HEADER_LEN].try_into().expect("a header");
                    let len = u32::from_be_bytes(header) as usize;
                    assert!(len <= MAX_FRAME);
                    assert_eq!(consumed, start + HEADER_LEN + len, "a unit did not consume exactly its frame");
                    let body = &before[start + HEADER_LEN..consumed];
                    let direct = decode_body(&Bytes::copy_from_slice(body));
                    match &unit {
                        Decoded::Message(m) => {
                            check_message(m);
                            assert_eq!(direct.as_ref(), Ok(m), "the stream and the body decode differently");
                        }
                        Decoded::Invalid(e) => {
                            assert_eq!(direct.as_ref(), Err(e), "the stream and the body decode differently");
                        }
                    }
                    units.push(Ok(unit));
                }
                Err(FrameError::TooLarge { len, max }) => {
                    assert!(max == MAX_FRAME && len > MAX_FRAME, "TooLarge {len} > {max} with bound {MAX_FRAME}");
                    units.push(Err(FrameError::TooLarge { len, max }));
                    return units;
                }
                Err(FrameError::BadPreface(_)) => {
                    assert!(preface_pending, "a bad preface reported after the preface");
                    units.push(Err(FrameError::BadPreface(String::new())));
                    return units;
                }
            }
        }
    }
    units
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    if let Ok(m) = decode_body(&Bytes::copy_from_slice(rest)) {
        check_message(&m);
    }
    let mut stream = Vec::with_capacity(rest.len() + PREFACE.len());
    if first & 0x80 != 0 {
        stream.extend_from_slice(&PREFACE);
    }
    stream.extend_from_slice(rest);
    let preface = first & 0x40 != 0;
    let whole = run(&stream, stream.len().max(1), preface);
    let chunked = run(&stream, usize::from(first & 0x3f) + 1, preface);
    assert_eq!(whole, chunked, "the same bytes decoded differently when chunked");
});
