//! The binary form: an 8-byte versioned preface, then frames of a 4-byte big-endian length
//! followed by a MessagePack array holding one [`Message`].
//!
//! Both sides send the preface once on connect; a peer whose preface names another version is
//! refused with [`FrameError::BadPreface`]. A frame longer than the configured maximum is a
//! [`FrameError::TooLarge`] (the connection cannot continue); a frame of the right length whose body
//! is not a valid message decodes to [`Decoded::Invalid`] and the stream stays in sync.

use crate::{Address, Decoded, Envelope, FrameError, Message, MessageError};
use bytes::{Buf, BufMut, BytesMut};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Protocol version carried in the preface.
pub const VERSION: u8 = 1;

/// The preface: NUL (never the first byte of a text line), `NODUS`, the version, a newline.
pub const PREFACE: [u8; 8] = [0, b'N', b'O', b'D', b'U', b'S', VERSION, b'\n'];

/// Length of the frame header.
pub const HEADER_LEN: usize = 4;

#[derive(Serialize)]
struct FrameRef<'a> {
    command: &'a str,
    from_server: &'a str,
    from_service: &'a str,
    to_server: &'a str,
    to_service: &'a str,
    params: &'a BTreeMap<String, String>,
    payload: &'a serde_bytes::Bytes,
    id: u64,
    pid: u64,
    reply_to: u64,
    creator: &'a str,
    created_at: i64,
    expires_at: i64,
    hops: u32,
}

#[derive(Deserialize)]
struct FrameOwned {
    command: String,
    from_server: String,
    from_service: String,
    to_server: String,
    to_service: String,
    params: BTreeMap<String, String>,
    payload: serde_bytes::ByteBuf,
    id: u64,
    pid: u64,
    reply_to: u64,
    creator: String,
    created_at: i64,
    expires_at: i64,
    hops: u32,
}

/// Encoding failure.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The encoded message would exceed the frame bound.
    #[error("message of {len} bytes exceeds the maximum frame of {max} bytes")]
    TooLarge {
        /// Encoded body length.
        len: usize,
        /// The bound.
        max: usize,
    },
}

/// Appends one frame holding `msg` to `dst`.
///
/// Fails with [`EncodeError::TooLarge`] (leaving `dst` unchanged) when the body exceeds `max_frame`.
pub fn encode(msg: &Message, dst: &mut BytesMut, max_frame: usize) -> Result<(), EncodeError> {
    let start = dst.len();
    dst.put_u32(0);
    let frame = FrameRef {
        command: &msg.command,
        from_server: &msg.from.server,
        from_service: &msg.from.service,
        to_server: &msg.to.server,
        to_service: &msg.to.service,
        params: &msg.params,
        payload: serde_bytes::Bytes::new(&msg.payload),
        id: msg.envelope.id,
        pid: msg.envelope.pid,
        reply_to: msg.envelope.reply_to,
        creator: &msg.envelope.creator,
        created_at: msg.envelope.created_at,
        expires_at: msg.envelope.expires_at,
        hops: msg.envelope.hops,
    };
    let mut w = dst.writer();
    // Writing into memory cannot fail, and every field type is serialisable.
    rmp_serde::encode::write(&mut w, &frame).expect("in-memory MessagePack encoding");
    let dst = w.into_inner();
    let len = dst.len() - start - HEADER_LEN;
    if len > max_frame {
        dst.truncate(start);
        return Err(EncodeError::TooLarge { len, max: max_frame });
    }
    dst[start..start + HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Decodes one frame body (without its header) into a message.
///
/// Fails with [`MessageError`] when the body is not a MessagePack message or breaks a naming rule.
pub fn decode_body(body: &[u8]) -> Result<Message, MessageError> {
    let f: FrameOwned =
        rmp_serde::from_slice(body).map_err(|e| MessageError::Malformed(format!("bad MessagePack frame: {e}")))?;
    let msg = Message {
        command: f.command,
        from: Address { server: f.from_server, service: f.from_service },
        to: Address { server: f.to_server, service: f.to_service },
        params: f.params,
        payload: f.payload.into_vec(),
        envelope: Envelope {
            id: f.id,
            pid: f.pid,
            reply_to: f.reply_to,
            creator: f.creator,
            created_at: f.created_at,
            expires_at: f.expires_at,
            hops: f.hops,
        },
    };
    msg.validate()?;
    Ok(msg)
}

/// Incremental frame decoder with a frame bound; optionally expects the preface first.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max_frame: usize,
    need_preface: bool,
}

impl FrameDecoder {
    /// A decoder that first consumes and checks [`PREFACE`].
    pub fn new(max_frame: usize) -> Self {
        FrameDecoder { max_frame, need_preface: true }
    }

    /// A decoder for a stream whose preface was already consumed.
    pub fn without_preface(max_frame: usize) -> Self {
        FrameDecoder { max_frame, need_preface: false }
    }

    /// Takes the next frame out of `buf`.
    ///
    /// Returns `Ok(None)` when more bytes are needed. Fails with [`FrameError`] on a bad preface or
    /// an oversized frame; the connection must then be closed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, FrameError> {
        if self.need_preface {
            if buf.len() < PREFACE.len() {
                if buf[..] != PREFACE[..buf.len()] {
                    return Err(bad_preface(buf));
                }
                return Ok(None);
            }
            if buf[..PREFACE.len()] != PREFACE {
                return Err(bad_preface(buf));
            }
            buf.advance(PREFACE.len());
            self.need_preface = false;
        }
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > self.max_frame {
            return Err(FrameError::TooLarge { len, max: self.max_frame });
        }
        if buf.len() < HEADER_LEN + len {
            buf.reserve(HEADER_LEN + len - buf.len());
            return Ok(None);
        }
        buf.advance(HEADER_LEN);
        let body = buf.split_to(len);
        Ok(Some(match decode_body(&body) {
            Ok(m) => Decoded::Message(m),
            Err(e) => Decoded::Invalid(e),
        }))
    }
}

fn bad_preface(buf: &[u8]) -> FrameError {
    if buf.len() >= 6 && buf[..6] == PREFACE[..6] {
        FrameError::BadPreface(format!("protocol version {} is not supported (this side speaks {VERSION})", buf[6]))
    } else {
        FrameError::BadPreface("expected the nodus binary preface".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_with_preface() {
        let m = Message::new("PING").to("srv:svc").param("a", "1").with_payload(vec![0u8, 1, 2, 255]).with_id(42);
        let mut buf = BytesMut::from(&PREFACE[..]);
        encode(&m, &mut buf, 1024).unwrap();
        encode(&m, &mut buf, 1024).unwrap();
        let mut d = FrameDecoder::new(1024);
        // Feed byte by byte: partial frames are not errors.
        let mut input = BytesMut::new();
        let mut got = Vec::new();
        for b in buf.iter() {
            input.put_u8(*b);
            while let Some(x) = d.decode(&mut input).unwrap() {
                got.push(x);
            }
        }
        assert_eq!(got, vec![Decoded::Message(m.clone()), Decoded::Message(m)]);
    }

    #[test]
    fn oversized_and_bad_preface_are_fatal() {
        let mut d = FrameDecoder::without_preface(16);
        let mut buf = BytesMut::from(&[0u8, 0, 1, 0][..]);
        assert!(matches!(d.decode(&mut buf), Err(FrameError::TooLarge { len: 256, max: 16 })));
        let mut d = FrameDecoder::new(16);
        let mut buf = BytesMut::from(&b"\0NODUS\x09\n"[..]);
        assert!(matches!(d.decode(&mut buf), Err(FrameError::BadPreface(e)) if e.contains("version 9")));
        let m = Message::new("X").with_payload(vec![0; 64]);
        assert!(encode(&m, &mut BytesMut::new(), 16).is_err());
    }

    #[test]
    fn garbage_body_is_invalid_not_fatal() {
        let mut d = FrameDecoder::without_preface(64);
        let mut buf = BytesMut::from(&[0u8, 0, 0, 3, 0xc1, 0xc1, 0xc1][..]);
        assert!(matches!(d.decode(&mut buf).unwrap(), Some(Decoded::Invalid(_))));
        assert!(buf.is_empty());
    }
}
