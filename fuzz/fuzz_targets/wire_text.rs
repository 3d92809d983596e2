//! Fuzzes the text form: `text::from_line` on the raw input and `LineDecoder` on it as a stream,
//! fed whole and in chunks.
//!
//! Input: byte 0 picks the chunk size (1..=64), the rest is the stream.
//! Asserts: no panic; every message decoded is valid and round-trips through both forms; a
//! decoder waiting for more never holds more than `MAX_LINE` bytes and an over-long line is
//! fatal; every unit, valid or not, ends at a newline (the stream stays in sync); chunking does
//! not change what is decoded; one decode never allocates beyond `allocation_bound(MAX_LINE)`.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nodus_fuzz::{alloc::peak_during, allocation_bound, wire::check_message};
use nodus_wire::{text, text::LineDecoder, Decoded, FrameError};

/// The line bound of the decoder under test (small, so over-long lines are reached).
const MAX_LINE: usize = 1024;

/// What a decode gave: a unit, or the line bound's fatal error.
type Unit = Result<Decoded, FrameError>;

fn run(data: &[u8], chunk: usize) -> Vec<Unit> {
    let mut decoder = LineDecoder::new(MAX_LINE);
    let mut buf = BytesMut::new();
    let mut units = Vec::new();
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.clone();
            let (result, peak) = peak_during(|| decoder.decode(&mut buf));
            assert!(peak <= allocation_bound(MAX_LINE), "one decode held {peak} bytes (line bound {MAX_LINE})");
            let consumed = before.len() - buf.len();
            match result {
                Ok(None) => {
                    assert!(buf.len() <= MAX_LINE, "waiting with {} bytes buffered, bound {MAX_LINE}", buf.len());
                    assert!(!buf.contains(&b'\n'), "waiting although a whole line is buffered");
                    break;
                }
                Ok(Some(unit)) => {
                    assert!(consumed > 0 && before[consumed - 1] == b'\n', "a unit did not end at a newline");
                    if let Decoded::Message(m) = &unit {
                        check_message(m);
                    }
                    units.push(Ok(unit));
                }
                Err(FrameError::TooLarge { len, max }) => {
                    assert!(max == MAX_LINE && len > MAX_LINE, "TooLarge {len} > {max} with bound {MAX_LINE}");
                    // The length seen depends on how much had arrived: compare the kind only.
                    units.push(Err(FrameError::TooLarge { len: 0, max }));
                    return units;
                }
                Err(e) => panic!("the text form has no other fatal error, got {e}"),
            }
        }
    }
    units
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, data)) = data.split_first() else { return };
    if let Ok(line) = std::str::from_utf8(data) {
        if let Ok(m) = text::from_line(line) {
            check_message(&m);
        }
    }
    let whole = run(data, data.len().max(1));
    let chunked = run(data, usize::from(first % 64) + 1);
    assert_eq!(whole, chunked, "the same bytes decoded differently when chunked");
});
