//! Invariants of [`nodus_wire::Message`] that every decoder's output must keep, whichever form
//! it came in.

use bytes::{Bytes, BytesMut};
use nodus_wire::{binary, text, Decoded, Message, DEFAULT_MAX_FRAME};

/// Asserts that a decoded message is valid and survives both forms: the text line it encodes
/// to is one line and decodes back to it, and so does its binary frame.
///
/// # Panics
/// When any of these fails: that is the finding.
pub fn check_message(m: &Message) {
    if let Err(e) = m.validate() {
        panic!("a decoder handed out an invalid message ({e}): {m:?}");
    }
    let line = text::to_line(m);
    assert!(!line.contains(['\n', '\r']), "to_line wrote a line break: {line:?}");
    assert_eq!(text::from_line(&line).as_ref(), Ok(m), "text round trip through {line:?}");
    let mut frame = BytesMut::new();
    if let Err(e) = binary::encode(m, &mut frame, DEFAULT_MAX_FRAME) {
        panic!("a decoded message does not encode: {e}");
    }
    let body_len = frame.len() - binary::HEADER_LEN;
    // The frame fits a decoder bounded by exactly its own size.
    let mut d = binary::FrameDecoder::without_preface(body_len);
    assert_eq!(d.decode(&mut frame), Ok(Some(Decoded::Message(m.clone()))), "binary round trip");
    assert!(frame.is_empty(), "the binary decoder left {} bytes of its own frame", frame.len());
}

/// A message from fuzz bytes: mode 0 reads them as a text line, mode 1 as a binary frame body.
/// `None` when the bytes are not a valid message in that form (the decoder's own target covers
/// that case); a message returned has passed [`check_message`].
pub fn message_from(mode: u8, bytes: &[u8]) -> Option<Message> {
    let m = match mode & 1 {
        0 => text::from_line(std::str::from_utf8(bytes).ok()?).ok()?,
        _ => binary::decode_body(&Bytes::copy_from_slice(bytes)).ok()?,
    };
    check_message(&m);
    Some(m)
}
