//! The binary form: an 8-byte versioned preface, then frames of a 4-byte big-endian length
//! followed by a MessagePack array holding one [`Message`].
//!
//! Both sides send the preface once on connect; a peer whose preface names another version is
//! refused with [`FrameError::BadPreface`]. A frame longer than the configured maximum is a
//! [`FrameError::TooLarge`] (the connection cannot continue); a frame of the right length whose body
//! is not a valid message decodes to [`Decoded::Invalid`] and the stream stays in sync.

use crate::node::Permissions;
use crate::{Address, Decoded, Envelope, FrameError, Message, MessageError};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use rmp::encode as enc;
use std::collections::BTreeMap;

/// Fields in a frame's MessagePack array.
const FIELDS: u32 = 14;
/// Fields when the optional trailing `perms` (stamped between nodes only) is present.
const FIELDS_WITH_PERMS: u32 = 15;

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
    let len = encoded_len(msg);
    if len > max_frame {
        return Err(EncodeError::TooLarge { len, max: max_frame });
    }
    dst.reserve(HEADER_LEN + len);
    dst.put_u32(len as u32);
    let mut w = dst.writer();
    // Writing into memory cannot fail.
    write_body(msg, &mut w).expect("in-memory MessagePack encoding");
    Ok(())
}

/// The exact length of `msg`'s frame body (without the 4-byte header), computed without encoding
/// it: what a node checks against `max_frame_bytes` before it forwards or delivers a message.
pub fn encoded_len(msg: &Message) -> usize {
    fn str_len(s: &str) -> usize {
        let n = s.len();
        n + match n {
            0..=31 => 1,
            32..=0xff => 2,
            0x100..=0xffff => 3,
            _ => 5,
        }
    }
    fn bin_len(n: usize) -> usize {
        n + match n {
            0..=0xff => 2,
            0x100..=0xffff => 3,
            _ => 5,
        }
    }
    fn map_len(n: usize) -> usize {
        match n {
            0..=15 => 1,
            16..=0xffff => 3,
            _ => 5,
        }
    }
    fn uint_len(n: u64) -> usize {
        match n {
            0..=127 => 1,
            128..=0xff => 2,
            0x100..=0xffff => 3,
            0x1_0000..=0xffff_ffff => 5,
            _ => 9,
        }
    }
    fn sint_len(n: i64) -> usize {
        if n >= 0 {
            return uint_len(n as u64);
        }
        match n {
            -32..=-1 => 1,
            -128..=-33 => 2,
            -32768..=-129 => 3,
            -2147483648..=-32769 => 5,
            _ => 9,
        }
    }
    let env = &msg.envelope;
    let mut n = 1; // fixarray of 14 or 15
    for s in [&msg.command, &msg.from.server, &msg.from.service, &msg.to.server, &msg.to.service] {
        n += str_len(s);
    }
    n += map_len(msg.params.len());
    n += msg.params.iter().map(|(k, v)| str_len(k) + str_len(v)).sum::<usize>();
    n += bin_len(msg.payload.len());
    n += uint_len(env.id) + uint_len(env.pid) + uint_len(env.reply_to);
    n += str_len(&env.creator) + sint_len(env.created_at) + sint_len(env.expires_at) + uint_len(u64::from(env.hops));
    if !env.perms.is_empty() {
        n += uint_len(u64::from(env.perms.bits()));
    }
    n
}

/// The array `[command, from_server, from_service, to_server, to_service, {params}, payload,
/// id, pid, reply_to, creator, created_at, expires_at, hops(, perms)]`, written field by field;
/// `perms` only when set (node to node).
fn write_body<W: std::io::Write>(msg: &Message, w: &mut W) -> Result<(), enc::ValueWriteError> {
    let env = &msg.envelope;
    enc::write_array_len(w, if env.perms.is_empty() { FIELDS } else { FIELDS_WITH_PERMS })?;
    for s in [&msg.command, &msg.from.server, &msg.from.service, &msg.to.server, &msg.to.service] {
        enc::write_str(w, s)?;
    }
    enc::write_map_len(w, msg.params.len() as u32)?;
    for (k, v) in &msg.params {
        enc::write_str(w, k)?;
        enc::write_str(w, v)?;
    }
    enc::write_bin(w, &msg.payload)?;
    for n in [env.id, env.pid, env.reply_to] {
        enc::write_uint(w, n)?;
    }
    enc::write_str(w, &env.creator)?;
    enc::write_sint(w, env.created_at)?;
    enc::write_sint(w, env.expires_at)?;
    enc::write_uint(w, u64::from(env.hops))?;
    if !env.perms.is_empty() {
        enc::write_uint(w, u64::from(env.perms.bits()))?;
    }
    Ok(())
}

fn bad(what: &str) -> MessageError {
    MessageError::Malformed(format!("bad MessagePack frame: {what}"))
}

/// A cursor over a frame body, reading MessagePack with `rmp`'s primitives; strings are
/// checked UTF-8 and the payload is a slice of the frame (no copy).
struct Reader<'a> {
    frame: &'a Bytes,
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], MessageError> {
        if self.rest.len() < len {
            return Err(bad("truncated"));
        }
        let (head, tail) = self.rest.split_at(len);
        self.rest = tail;
        Ok(head)
    }

    fn str(&mut self) -> Result<String, MessageError> {
        let len = rmp::decode::read_str_len(&mut self.rest).map_err(|_| bad("expected a string"))?;
        let bytes = self.take(len as usize)?;
        std::str::from_utf8(bytes).map(str::to_owned).map_err(|_| bad("a string is not UTF-8"))
    }

    fn bin(&mut self) -> Result<Bytes, MessageError> {
        let len = rmp::decode::read_bin_len(&mut self.rest).map_err(|_| bad("expected binary payload"))?;
        let bytes = self.take(len as usize)?;
        Ok(self.frame.slice_ref(bytes))
    }

    fn map_len(&mut self) -> Result<usize, MessageError> {
        rmp::decode::read_map_len(&mut self.rest).map(|n| n as usize).map_err(|_| bad("expected a map of parameters"))
    }

    fn array_len(&mut self) -> Result<u32, MessageError> {
        rmp::decode::read_array_len(&mut self.rest).map_err(|_| bad("expected an array"))
    }

    fn u64(&mut self) -> Result<u64, MessageError> {
        rmp::decode::read_int(&mut self.rest).map_err(|_| bad("expected an unsigned integer in range"))
    }

    fn i64(&mut self) -> Result<i64, MessageError> {
        rmp::decode::read_int(&mut self.rest).map_err(|_| bad("expected an integer in range"))
    }
}

/// Decodes one frame body (without its header) into a message; the payload shares `body`.
///
/// Fails with [`MessageError`] when the body is not a MessagePack message or breaks a naming rule.
pub fn decode_body(body: &Bytes) -> Result<Message, MessageError> {
    let mut r = Reader { frame: body, rest: &body[..] };
    let fields = r.array_len()?;
    if fields != FIELDS && fields != FIELDS_WITH_PERMS {
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
    let mut envelope = Envelope {
        id: r.u64()?,
        pid: r.u64()?,
        reply_to: r.u64()?,
        creator: r.str()?,
        created_at: r.i64()?,
        expires_at: r.i64()?,
        hops: u32::try_from(r.u64()?).map_err(|_| bad("hops out of range"))?,
        perms: Permissions::NONE,
    };
    if fields == FIELDS_WITH_PERMS {
        let bits = u8::try_from(r.u64()?).map_err(|_| bad("perms out of range"))?;
        envelope.perms = Permissions::from_bits(bits).ok_or_else(|| bad("unknown permission bits"))?;
    }
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
        let body = buf.split_to(len).freeze();
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
    fn encoded_len_is_exact_at_every_size_class() {
        let long = |n: usize| "x".repeat(n);
        for n in [0usize, 1, 31, 32, 255, 256, 65535, 65536] {
            let mut m = Message::new("CMD").to(&format!("s:{}", long(n.min(255)))).param("p", long(n));
            m.payload = vec![7u8; n].into();
            m.envelope.creator = long(n);
            for v in [0u64, 127, 128, 255, 256, 65535, 65536, u64::from(u32::MAX), u64::MAX] {
                m.envelope.id = v;
                m.envelope.expires_at = -(v as i64 / 3) - 1;
                m.envelope.created_at = (v / 2) as i64;
                m.envelope.hops = v as u32;
                m.envelope.perms = if v % 2 == 0 { Permissions::NONE } else { Permissions::ALL };
                let mut buf = BytesMut::new();
                encode(&m, &mut buf, usize::MAX).unwrap();
                assert_eq!(buf.len() - HEADER_LEN, encoded_len(&m), "size class {n}, value {v}");
            }
        }
    }

    #[test]
    fn payload_shares_the_frame() {
        let m = Message::new("X").with_payload(vec![1u8; 100]);
        let mut buf = BytesMut::new();
        encode(&m, &mut buf, 1024).unwrap();
        let body = buf.split_off(HEADER_LEN).freeze();
        let got = decode_body(&body).unwrap();
        assert_eq!(got, m);
        let inside = body.as_ptr_range();
        assert!(inside.contains(&got.payload.as_ptr()), "the payload is a slice of the frame");
    }

    #[test]
    fn perms_travel_only_when_set() {
        let mut m = Message::new("X");
        let mut buf = BytesMut::new();
        encode(&m, &mut buf, 1024).unwrap();
        assert_eq!(buf[HEADER_LEN], 0x90 | 14, "a plain message keeps the 14-field layout");
        m.envelope.perms = Permissions::of(&[crate::node::Permission::Send]);
        let mut buf = BytesMut::new();
        encode(&m, &mut buf, 1024).unwrap();
        assert_eq!(buf[HEADER_LEN], 0x90 | 15);
        assert_eq!(decode_body(&buf.split_off(HEADER_LEN).freeze()).unwrap(), m);
    }

    #[test]
    fn garbage_body_is_invalid_not_fatal() {
        let mut d = FrameDecoder::without_preface(64);
        let mut buf = BytesMut::from(&[0u8, 0, 0, 3, 0xc1, 0xc1, 0xc1][..]);
        assert!(matches!(d.decode(&mut buf).unwrap(), Some(Decoded::Invalid(_))));
        assert!(buf.is_empty());
    }
}
