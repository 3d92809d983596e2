//! The binary form: an 8-byte versioned preface, then frames of a 4-byte big-endian length
//! followed by a MessagePack array holding one [`Message`].
//!
//! Both sides send the preface once on connect; a peer whose preface names another version is
//! refused with [`FrameError::BadPreface`]. A frame longer than the configured maximum is a
//! [`FrameError::TooLarge`] (the connection cannot continue); a frame of the right length whose body
//! is not a valid message decodes to [`Decoded::Invalid`] and the stream stays in sync.

use crate::{Address, Decoded, Envelope, FrameError, Message, MessageError};
use bytes::{Buf, BufMut, BytesMut};
use rmp::encode as enc;
use std::collections::BTreeMap;

/// Fields in a frame's MessagePack array.
const FIELDS: u32 = 14;

/// Protocol version carried in the preface.
pub const VERSION: u8 = 1;

/// The preface: NUL (never the first byte of a text line), `NODUS`, the version, a newline.
pub const PREFACE: [u8; 8] = [0, b'N', b'O', b'D', b'U', b'S', VERSION, b'\n'];

/// Length of the frame header.
pub const HEADER_LEN: usize = 4;

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
    let mut w = dst.writer();
    // Writing into memory cannot fail.
    write_body(msg, &mut w).expect("in-memory MessagePack encoding");
    let dst = w.into_inner();
    let len = dst.len() - start - HEADER_LEN;
    if len > max_frame {
        dst.truncate(start);
        return Err(EncodeError::TooLarge { len, max: max_frame });
    }
    dst[start..start + HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// The array `[command, from_server, from_service, to_server, to_service, {params}, payload,
/// id, pid, reply_to, creator, created_at, expires_at, hops]`, written field by field.
fn write_body<W: std::io::Write>(msg: &Message, w: &mut W) -> Result<(), enc::ValueWriteError> {
    enc::write_array_len(w, FIELDS)?;
    for s in [&msg.command, &msg.from.server, &msg.from.service, &msg.to.server, &msg.to.service] {
        enc::write_str(w, s)?;
    }
    enc::write_map_len(w, msg.params.len() as u32)?;
    for (k, v) in &msg.params {
        enc::write_str(w, k)?;
        enc::write_str(w, v)?;
    }
    enc::write_bin(w, &msg.payload)?;
    let env = &msg.envelope;
    for n in [env.id, env.pid, env.reply_to] {
        enc::write_uint(w, n)?;
    }
    enc::write_str(w, &env.creator)?;
    enc::write_sint(w, env.created_at)?;
    enc::write_sint(w, env.expires_at)?;
    enc::write_uint(w, u64::from(env.hops))?;
    Ok(())
}

/// A cursor over a frame body; every read checks the bytes are there.
struct Reader<'a> {
    rest: &'a [u8],
}

fn bad(what: &str) -> MessageError {
    MessageError::Malformed(format!("bad MessagePack frame: {what}"))
}

impl<'a> Reader<'a> {
    fn marker(&mut self) -> Result<rmp::Marker, MessageError> {
        rmp::decode::read_marker(&mut self.rest).map_err(|_| bad("truncated"))
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], MessageError> {
        if self.rest.len() < len {
            return Err(bad("truncated"));
        }
        let (head, tail) = self.rest.split_at(len);
        self.rest = tail;
        Ok(head)
    }

    fn len_of(
        &mut self,
        m: rmp::Marker,
        small: fn(rmp::Marker) -> Option<u32>,
        what: &str,
    ) -> Result<usize, MessageError> {
        use rmp::Marker::*;
        let n = match m {
            _ if small(m).is_some() => small(m).unwrap_or(0),
            Str8 | Bin8 => u32::from(self.take(1)?[0]),
            Str16 | Bin16 | Map16 | Array16 => {
                u32::from(u16::from_be_bytes(self.take(2)?.try_into().map_err(|_| bad(what))?))
            }
            Str32 | Bin32 | Map32 | Array32 => u32::from_be_bytes(self.take(4)?.try_into().map_err(|_| bad(what))?),
            _ => return Err(bad(&format!("expected {what}"))),
        };
        Ok(n as usize)
    }

    fn str(&mut self) -> Result<String, MessageError> {
        let m = self.marker()?;
        if !matches!(m, rmp::Marker::FixStr(_) | rmp::Marker::Str8 | rmp::Marker::Str16 | rmp::Marker::Str32) {
            return Err(bad("expected a string"));
        }
        let len =
            self.len_of(m, |m| if let rmp::Marker::FixStr(n) = m { Some(u32::from(n)) } else { None }, "a string")?;
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes).map(str::to_owned).map_err(|_| bad("a string is not UTF-8"))
    }

    fn bin(&mut self) -> Result<Vec<u8>, MessageError> {
        let m = self.marker()?;
        if !matches!(m, rmp::Marker::Bin8 | rmp::Marker::Bin16 | rmp::Marker::Bin32) {
            return Err(bad("expected binary payload"));
        }
        let len = self.len_of(m, |_| None, "binary payload")?;
        Ok(self.take(len)?.to_vec())
    }

    fn map_len(&mut self) -> Result<usize, MessageError> {
        let m = self.marker()?;
        if !matches!(m, rmp::Marker::FixMap(_) | rmp::Marker::Map16 | rmp::Marker::Map32) {
            return Err(bad("expected a map of parameters"));
        }
        self.len_of(m, |m| if let rmp::Marker::FixMap(n) = m { Some(u32::from(n)) } else { None }, "a map")
    }

    fn array_len(&mut self) -> Result<usize, MessageError> {
        let m = self.marker()?;
        if !matches!(m, rmp::Marker::FixArray(_) | rmp::Marker::Array16 | rmp::Marker::Array32) {
            return Err(bad("expected an array"));
        }
        self.len_of(m, |m| if let rmp::Marker::FixArray(n) = m { Some(u32::from(n)) } else { None }, "an array")
    }

    /// Any MessagePack integer, as i128 so both u64 and i64 fit.
    fn int(&mut self) -> Result<i128, MessageError> {
        use rmp::Marker::*;
        let m = self.marker()?;
        Ok(match m {
            FixPos(n) => i128::from(n),
            FixNeg(n) => i128::from(n),
            U8 => i128::from(self.take(1)?[0]),
            U16 => i128::from(u16::from_be_bytes(self.take(2)?.try_into().map_err(|_| bad("int"))?)),
            U32 => i128::from(u32::from_be_bytes(self.take(4)?.try_into().map_err(|_| bad("int"))?)),
            U64 => i128::from(u64::from_be_bytes(self.take(8)?.try_into().map_err(|_| bad("int"))?)),
            I8 => i128::from(self.take(1)?[0] as i8),
            I16 => i128::from(i16::from_be_bytes(self.take(2)?.try_into().map_err(|_| bad("int"))?)),
            I32 => i128::from(i32::from_be_bytes(self.take(4)?.try_into().map_err(|_| bad("int"))?)),
            I64 => i128::from(i64::from_be_bytes(self.take(8)?.try_into().map_err(|_| bad("int"))?)),
            _ => return Err(bad("expected an integer")),
        })
    }

    fn u64(&mut self) -> Result<u64, MessageError> {
        u64::try_from(self.int()?).map_err(|_| bad("integer out of range"))
    }

    fn i64(&mut self) -> Result<i64, MessageError> {
        i64::try_from(self.int()?).map_err(|_| bad("integer out of range"))
    }
}

/// Decodes one frame body (without its header) into a message.
///
/// Fails with [`MessageError`] when the body is not a MessagePack message or breaks a naming rule.
pub fn decode_body(body: &[u8]) -> Result<Message, MessageError> {
    let mut r = Reader { rest: body };
    if r.array_len()? != FIELDS as usize {
        return Err(bad(&format!("expected an array of {FIELDS} fields")));
    }
    let command = r.str()?;
    let from = Address { server: r.str()?, service: r.str()? };
    let to = Address { server: r.str()?, service: r.str()? };
    let mut params = BTreeMap::new();
    for _ in 0..r.map_len()? {
        let k = r.str()?;
        let v = r.str()?;
        if params.insert(k, v).is_some() {
            return Err(bad("a parameter is given twice"));
        }
    }
    let payload = r.bin()?;
    let envelope = Envelope {
        id: r.u64()?,
        pid: r.u64()?,
        reply_to: r.u64()?,
        creator: r.str()?,
        created_at: r.i64()?,
        expires_at: r.i64()?,
        hops: u32::try_from(r.u64()?).map_err(|_| bad("hops out of range"))?,
    };
    if !r.rest.is_empty() {
        return Err(bad("trailing bytes after the message"));
    }
    let msg = Message { command, from, to, params, payload, envelope };
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
