//! The Cocaine v0.12 worker protocol: framing, message model and codec, with no I/O and no clock.
//!
//! On the wire every message is a MessagePack array `[channel, type, args]` or
//! `[channel, type, args, headers]`; messages are written back to back with no length prefix, so
//! the decoder scans the buffer for one complete MessagePack value before it decodes it.
//!
//! Channel 1 is the control channel: handshake `[1,0,[uuid]]` (worker → engine), heartbeat
//! `[1,0,[]]` (both ways), terminate `[1,1,[code,reason]]` (both ways). Every invocation opens a
//! new channel (2, 3, ... strictly increasing) with `[ch,0,[event]]` (engine → worker); then both
//! sides send chunks `[ch,0,[data]]`, an error `[ch,1,[[category,code],message]]` or close
//! ("choke") `[ch,2,[]]`.
//!
//! Headers (the optional fourth element) are HPACK-like entries, either `[indexed, name, value]`
//! or an integer index into the sender's table. They are parsed (so a peer that sends them is
//! understood) and handed up as [`Header`] values; nodus never sends headers.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rmpv::Value;

/// The control channel.
pub const CONTROL_CHANNEL: u64 = 1;
/// The first channel an invocation may open.
pub const FIRST_SESSION_CHANNEL: u64 = 2;
/// Default bound on the encoded size of one message (16 MiB).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 << 20;
/// Bound on the nesting depth of one message; Cocaine messages nest at most four levels deep,
/// user data in a chunk is carried as bytes.
pub const MAX_DEPTH: usize = 64;

/// Message type numbers on the control channel.
pub mod control {
    /// Handshake (worker → engine, with a uuid) and heartbeat (both ways, no arguments).
    pub const HANDSHAKE_OR_HEARTBEAT: u64 = 0;
    /// Terminate `[code, reason]`.
    pub const TERMINATE: u64 = 1;
}

/// Message type numbers on a session channel.
pub mod session {
    /// Invoke (first message engine → worker on a new channel) or chunk.
    pub const INVOKE_OR_CHUNK: u64 = 0;
    /// Error `[[category, code], message]`.
    pub const ERROR: u64 = 1;
    /// Close, also called choke: the sender will send nothing more on this channel.
    pub const CHOKE: u64 = 2;
}

/// Terminate codes (Cocaine's `rpc::terminate::code`).
pub mod terminate_code {
    /// Normal termination.
    pub const NORMAL: i64 = 1;
    /// Abnormal termination.
    pub const ABNORMAL: i64 = 2;
}

/// Why bytes from a peer could not be decoded. Each of these closes the connection (the stream
/// has no length prefix, so it cannot be resynchronised).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// One message is larger than the configured bound.
    #[error("message larger than {limit} bytes; raise the engine's max message size or send smaller chunks")]
    TooLarge {
        /// The bound in force.
        limit: usize,
    },
    /// The message nests deeper than [`MAX_DEPTH`].
    #[error("message nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// The bytes are not MessagePack or not a Cocaine message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A well-formed message that this side never expects from its peer.
    #[error("unexpected message type {kind} on channel {channel}")]
    Unexpected {
        /// The channel.
        channel: u64,
        /// The message type.
        kind: u64,
    },
}

/// One header entry, parsed but not interpreted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Header {
    /// A reference to an entry of the sender's header table.
    Indexed(u64),
    /// A literal entry; `store` says whether the receiver should add it to its table.
    Literal {
        /// Whether the entry is added to the table.
        store: bool,
        /// Header name.
        name: Bytes,
        /// Header value.
        value: Bytes,
    },
}

/// A decoded protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `[1,0,[uuid]]`: a worker introduces itself.
    Handshake {
        /// The uuid the engine gave the worker on its command line.
        uuid: String,
    },
    /// `[1,0,[]]`: liveness, both ways.
    Heartbeat,
    /// `[1,1,[code,reason]]`: the sender wants the worker gone (engine) or is leaving (worker).
    Terminate {
        /// [`terminate_code`].
        code: i64,
        /// Free text.
        reason: String,
    },
    /// `[ch,0,[event]]`, the first message engine → worker on a new channel.
    Invoke {
        /// The new channel.
        channel: u64,
        /// The event (handler) name.
        event: String,
    },
    /// `[ch,0,[data]]`: one chunk of a session's stream.
    Chunk {
        /// The session channel.
        channel: u64,
        /// The payload (a MessagePack `bin` or `str`; any other value is carried as its encoding).
        data: Bytes,
    },
    /// `[ch,1,[[category,code],message]]`: the session failed; nothing follows.
    Error {
        /// The session channel.
        channel: u64,
        /// Error category.
        category: i64,
        /// Error code within the category.
        code: i64,
        /// Human readable text.
        message: String,
    },
    /// `[ch,2,[]]`: the sender's side of the session is done.
    Choke {
        /// The session channel.
        channel: u64,
    },
}

impl Message {
    /// The channel this message travels on.
    pub fn channel(&self) -> u64 {
        match self {
            Message::Handshake { .. } | Message::Heartbeat | Message::Terminate { .. } => CONTROL_CHANNEL,
            Message::Invoke { channel, .. }
            | Message::Chunk { channel, .. }
            | Message::Error { channel, .. }
            | Message::Choke { channel } => *channel,
        }
    }

    /// Appends the wire encoding of this message to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        let mut w = dst.writer();
        // Writing into a BytesMut cannot fail; the results are io::Result only by signature.
        let _ = encode_into(self, &mut w);
    }

    /// The wire encoding of this message as a new buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::new();
        self.encode(&mut b);
        b.freeze()
    }
}

fn encode_into<W: std::io::Write>(m: &Message, w: &mut W) -> Result<(), rmp::encode::ValueWriteError> {
    use rmp::encode::*;
    write_array_len(w, 3)?;
    write_uint(w, m.channel())?;
    match m {
        Message::Handshake { uuid } => {
            write_uint(w, control::HANDSHAKE_OR_HEARTBEAT)?;
            write_array_len(w, 1)?;
            write_str(w, uuid)?;
        }
        Message::Heartbeat => {
            write_uint(w, control::HANDSHAKE_OR_HEARTBEAT)?;
            write_array_len(w, 0)?;
        }
        Message::Terminate { code, reason } => {
            write_uint(w, control::TERMINATE)?;
            write_array_len(w, 2)?;
            write_sint(w, *code)?;
            write_str(w, reason)?;
        }
        Message::Invoke { event, .. } => {
            write_uint(w, session::INVOKE_OR_CHUNK)?;
            write_array_len(w, 1)?;
            write_bin(w, event.as_bytes())?;
        }
        Message::Chunk { data, .. } => {
            write_uint(w, session::INVOKE_OR_CHUNK)?;
            write_array_len(w, 1)?;
            write_bin(w, data)?;
        }
        Message::Error { category, code, message, .. } => {
            write_uint(w, session::ERROR)?;
            write_array_len(w, 2)?;
            write_array_len(w, 2)?;
            write_sint(w, *category)?;
            write_sint(w, *code)?;
            write_str(w, message)?;
        }
        Message::Choke { .. } => {
            write_uint(w, session::CHOKE)?;
            write_array_len(w, 0)?;
        }
    }
    Ok(())
}

/// Which side of the protocol a [`Decoder`] serves; it decides how `[ch,0,..]` is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The engine, decoding what a worker sends: handshakes, heartbeats, terminate, chunks,
    /// errors, chokes.
    Engine,
    /// A worker, decoding what the engine sends: the first `[ch,0,..]` on a channel above every
    /// channel seen so far is an invocation, later ones are chunks.
    Worker,
}

/// A raw frame: the array before it is given a meaning.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// Channel number.
    pub channel: u64,
    /// Message type within the channel's protocol.
    pub kind: u64,
    /// Arguments.
    pub args: Vec<Value>,
    /// Headers, parsed.
    pub headers: Vec<Header>,
}

/// Incremental decoder of one direction of one connection.
///
/// The decoder remembers how far it has scanned the message at the front of the buffer, so a
/// message that arrives in many reads is scanned once, not once per read: give it the same
/// buffer on every call, only appended to between calls (a buffer that shrank starts a new scan).
#[derive(Debug, Clone)]
pub struct Decoder {
    role: Role,
    max_message_bytes: usize,
    last_opened: u64,
    scan: Scan,
    examined: u64,
}

/// Where the scan of the message at the front of the buffer stands: the offset of the next
/// element and the elements still expected in each open container (empty: not started).
#[derive(Debug, Clone, Default)]
struct Scan {
    pos: usize,
    open: Vec<u64>,
}

impl Scan {
    /// Forgets the scan (keeping the stack's allocation for the next message).
    fn restart(&mut self) {
        self.pos = 0;
        self.open.clear();
    }
}

impl Decoder {
    /// A decoder for `role` with a bound on one message's size.
    pub fn new(role: Role, max_message_bytes: usize) -> Self {
        Decoder { role, max_message_bytes, last_opened: CONTROL_CHANNEL, scan: Scan::default(), examined: 0 }
    }

    /// Bytes of MessagePack headers looked at so far: the scanning work done, which grows with
    /// the bytes received, not with the number of reads they came in.
    pub fn examined(&self) -> u64 {
        self.examined
    }

    /// Takes one complete message off the front of `src`. `Ok(None)` means more bytes are
    /// needed (a partial message is not an error).
    ///
    /// # Errors
    /// Fails when the buffered bytes cannot start a valid message of at most the size bound;
    /// the connection must then be closed.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, ProtocolError> {
        match self.decode_frame(src)? {
            None => Ok(None),
            Some(frame) => self.interpret(frame).map(Some),
        }
    }

    /// Takes one complete raw frame off the front of `src`, without interpreting it.
    ///
    /// # Errors
    /// As [`Decoder::decode`], and when the value is not `[uint, uint, array(, array)]`.
    pub fn decode_frame(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
        if src.len() < self.scan.pos {
            self.scan.restart();
        }
        let scanned = scan(src, self.max_message_bytes, &mut self.scan, &mut self.examined);
        let len = match scanned {
            Ok(None) => return Ok(None),
            Ok(Some(len)) => len,
            Err(e) => {
                self.scan.restart();
                return Err(e);
            }
        };
        let bytes = src.split_to(len);
        let mut rd = &bytes[..];
        let value = rmpv::decode::read_value_with_max_depth(&mut rd, MAX_DEPTH + 2)
            .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
        debug_assert!(!rd.has_remaining());
        frame_from_value(value).map(Some)
    }

    fn interpret(&mut self, f: Frame) -> Result<Message, ProtocolError> {
        let Frame { channel, kind, mut args, .. } = f;
        let unexpected = || ProtocolError::Unexpected { channel, kind };
        if channel == 0 {
            return Err(unexpected());
        }
        if channel == CONTROL_CHANNEL {
            return match kind {
                control::HANDSHAKE_OR_HEARTBEAT if self.role == Role::Engine && !args.is_empty() => {
                    Ok(Message::Handshake { uuid: text(args.swap_remove(0), "handshake uuid")? })
                }
                control::HANDSHAKE_OR_HEARTBEAT => Ok(Message::Heartbeat),
                control::TERMINATE => {
                    let mut it = args.into_iter();
                    let code = match it.next() {
                        None => terminate_code::NORMAL,
                        Some(v) => int(&v).ok_or_else(|| malformed("terminate code is not an integer"))?,
                    };
                    let reason = match it.next() {
                        None => String::new(),
                        Some(v) => text(v, "terminate reason")?,
                    };
                    Ok(Message::Terminate { code, reason })
                }
                _ => Err(unexpected()),
            };
        }
        match kind {
            session::INVOKE_OR_CHUNK => {
                let arg = args.into_iter().next().ok_or_else(|| malformed("empty chunk"))?;
                if self.role == Role::Worker && channel > self.last_opened {
                    self.last_opened = channel;
                    Ok(Message::Invoke { channel, event: text(arg, "event name")? })
                } else {
                    Ok(Message::Chunk { channel, data: payload(arg) })
                }
            }
            session::ERROR => {
                let mut it = args.into_iter();
                let (category, code) = match it.next() {
                    Some(Value::Array(pair)) => {
                        let category = pair.first().and_then(int).unwrap_or(0);
                        let code = pair.get(1).and_then(int).unwrap_or(0);
                        (category, code)
                    }
                    Some(v) => (0, int(&v).ok_or_else(|| malformed("error code is not an integer"))?),
                    None => (0, 0),
                };
                let message = match it.next() {
                    None => String::new(),
                    Some(v) => text(v, "error message")?,
                };
                Ok(Message::Error { channel, category, code, message })
            }
            session::CHOKE => Ok(Message::Choke { channel }),
            _ => Err(unexpected()),
        }
    }
}

fn malformed(what: &str) -> ProtocolError {
    ProtocolError::Malformed(what.to_string())
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Integer(i) => i.as_i64(),
        _ => None,
    }
}

fn text(v: Value, what: &str) -> Result<String, ProtocolError> {
    match v {
        Value::String(s) => Ok(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        Value::Binary(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
        _ => Err(ProtocolError::Malformed(format!("{what} is not a string"))),
    }
}

fn payload(v: Value) -> Bytes {
    match v {
        Value::Binary(b) => Bytes::from(b),
        Value::String(s) => Bytes::from(s.into_bytes()),
        other => {
            let mut out = Vec::new();
            // Writing into a Vec cannot fail.
            let _ = rmpv::encode::write_value(&mut out, &other);
            Bytes::from(out)
        }
    }
}

fn frame_from_value(v: Value) -> Result<Frame, ProtocolError> {
    let Value::Array(items) = v else {
        return Err(malformed("a message must be an array"));
    };
    if items.len() != 3 && items.len() != 4 {
        return Err(ProtocolError::Malformed(format!("a message has 3 or 4 elements, not {}", items.len())));
    }
    let mut it = items.into_iter();
    let channel = it.next().and_then(|v| v.as_u64()).ok_or_else(|| malformed("channel is not an unsigned integer"))?;
    let kind = it.next().and_then(|v| v.as_u64()).ok_or_else(|| malformed("type is not an unsigned integer"))?;
    let args = match it.next() {
        Some(Value::Array(a)) => a,
        _ => return Err(malformed("arguments are not an array")),
    };
    let headers = match it.next() {
        None | Some(Value::Nil) => Vec::new(),
        Some(Value::Array(h)) => h.into_iter().map(header).collect::<Result<_, _>>()?,
        Some(_) => return Err(malformed("headers are not an array")),
    };
    Ok(Frame { channel, kind, args, headers })
}

fn header(v: Value) -> Result<Header, ProtocolError> {
    match v {
        Value::Integer(i) => i.as_u64().map(Header::Indexed).ok_or_else(|| malformed("negative header index")),
        Value::Array(entry) if entry.len() == 3 => {
            let mut it = entry.into_iter();
            let store = match it.next() {
                Some(Value::Boolean(b)) => b,
                Some(Value::Integer(i)) => i.as_u64() != Some(0),
                _ => return Err(malformed("header flag is not a boolean")),
            };
            let name = header_bytes(it.next())?;
            let value = header_bytes(it.next())?;
            Ok(Header::Literal { store, name, value })
        }
        _ => Err(malformed("a header is an index or [flag, name, value]")),
    }
}

fn header_bytes(v: Option<Value>) -> Result<Bytes, ProtocolError> {
    match v {
        Some(Value::Binary(b)) => Ok(Bytes::from(b)),
        Some(Value::String(s)) => Ok(Bytes::from(s.into_bytes())),
        Some(other @ (Value::Integer(_) | Value::F32(_) | Value::F64(_) | Value::Boolean(_))) => {
            Ok(Bytes::from(other.to_string()))
        }
        _ => Err(malformed("header name or value is not a string")),
    }
}

/// Finds the length of the first complete MessagePack value in `buf`, resuming `state` (the
/// scan so far of this value): `Ok(None)` when it is incomplete, an error when it is invalid,
/// deeper than [`MAX_DEPTH`] or would exceed `max` bytes. The walk is iterative and bounded by
/// the buffer, so no input can make it recurse or allocate; it also guarantees every declared
/// element is present before `rmpv` allocates. An element is taken only once it is all there
/// (a string or binary with its payload), so a resumed scan starts at the first element not yet
/// complete and each byte's header is examined a bounded number of times.
fn scan(buf: &[u8], max: usize, state: &mut Scan, examined: &mut u64) -> Result<Option<usize>, ProtocolError> {
    if state.open.is_empty() {
        // The one top value.
        state.restart();
        state.open.push(1);
    }
    let too_large = |end: usize| if end > max { Err(ProtocolError::TooLarge { limit: max }) } else { Ok(()) };
    while let Some(&top) = state.open.last() {
        if top == 0 {
            state.open.pop();
            continue;
        }
        let pos = state.pos;
        too_large(pos + 1)?;
        let Some(&m) = buf.get(pos) else { return Ok(None) };
        // Bytes of length field after the marker, and how to read the element:
        // `skip` payload bytes after the header, or a container of `count` elements.
        let length = |n: usize| -> Result<Option<usize>, ProtocolError> {
            match read_len(buf, pos + 1, n) {
                Some(len) => Ok(Some(len)),
                None => too_large(pos + 1 + n).map(|()| None),
            }
        };
        let (header, skip, container): (usize, usize, Option<u64>) = match m {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (1, 0, None),
            0x80..=0x8f => (1, 0, Some(u64::from(m & 0x0f) * 2)),
            0x90..=0x9f => (1, 0, Some(u64::from(m & 0x0f))),
            0xa0..=0xbf => (1, usize::from(m & 0x1f), None),
            0xc1 => return Err(malformed("reserved MessagePack marker 0xc1")),
            0xc4 | 0xc5 | 0xc6 | 0xd9 | 0xda | 0xdb => {
                let n = match m {
                    0xc4 | 0xd9 => 1,
                    0xc5 | 0xda => 2,
                    _ => 4,
                };
                let Some(len) = length(n)? else { return Ok(None) };
                (1 + n, len, None)
            }
            0xc7..=0xc9 => {
                let n = match m {
                    0xc7 => 1,
                    0xc8 => 2,
                    _ => 4,
                };
                let Some(len) = length(n)? else { return Ok(None) };
                (1 + n, len + 1, None)
            }
            0xca => (1, 4, None),
            0xcb => (1, 8, None),
            0xcc | 0xd0 => (1, 1, None),
            0xcd | 0xd1 => (1, 2, None),
            0xce | 0xd2 => (1, 4, None),
            0xcf | 0xd3 => (1, 8, None),
            0xd4 => (1, 2, None),
            0xd5 => (1, 3, None),
            0xd6 => (1, 5, None),
            0xd7 => (1, 9, None),
            0xd8 => (1, 17, None),
            0xdc..=0xdf => {
                let n = if m == 0xdc || m == 0xde { 2 } else { 4 };
                let Some(len) = length(n)? else { return Ok(None) };
                let count = len as u64 * if m >= 0xde { 2 } else { 1 };
                (1 + n, 0, Some(count))
            }
        };
        *examined += header as u64;
        let body = pos + header;
        let end = body.checked_add(skip).ok_or(ProtocolError::TooLarge { limit: max })?;
        too_large(end)?;
        if let Some(count) = container {
            // Each element needs at least one byte: a container can never be larger than the bound.
            too_large(body.saturating_add(usize::try_from(count).unwrap_or(usize::MAX)))?;
            if count > 0 && state.open.len() > MAX_DEPTH {
                return Err(ProtocolError::TooDeep);
            }
        }
        if end > buf.len() {
            // Not all here yet: the next call looks at this element again.
            return Ok(None);
        }
        if let Some(top) = state.open.last_mut() {
            *top -= 1;
        }
        if let Some(count) = container.filter(|&c| c > 0) {
            state.open.push(count);
        }
        state.pos = end;
    }
    // The stack is empty again: the next call starts a new message.
    let len = state.pos;
    state.pos = 0;
    Ok(Some(len))
}

fn read_len(buf: &[u8], pos: usize, n: usize) -> Option<usize> {
    let b = buf.get(pos..pos + n)?;
    Some(b.iter().fold(0usize, |acc, &x| (acc << 8) | usize::from(x)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(role: Role, bytes: &[u8]) -> Result<Vec<Message>, ProtocolError> {
        let mut d = Decoder::new(role, DEFAULT_MAX_MESSAGE_BYTES);
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(m) = d.decode(&mut buf)? {
            out.push(m);
        }
        assert!(buf.is_empty(), "left over: {buf:?}");
        Ok(out)
    }

    fn value_bytes(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).unwrap();
        out
    }

    #[test]
    fn control_messages_match_cocaine_bytes() {
        assert_eq!(&Message::Heartbeat.to_bytes()[..], &[0x93, 0x01, 0x00, 0x90]);
        let hs = Message::Handshake { uuid: "u".into() }.to_bytes();
        assert_eq!(&hs[..], &[0x93, 0x01, 0x00, 0x91, 0xa1, b'u']);
        let inv = Message::Invoke { channel: 2, event: "ping".into() }.to_bytes();
        assert_eq!(&inv[..], &[0x93, 0x02, 0x00, 0x91, 0xc4, 4, b'p', b'i', b'n', b'g']);
        let choke = Message::Choke { channel: 7 }.to_bytes();
        assert_eq!(&choke[..], &[0x93, 0x07, 0x02, 0x90]);
    }

    #[test]
    fn worker_role_reads_first_message_on_a_new_channel_as_invoke() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&Message::Invoke { channel: 2, event: "e".into() }.to_bytes());
        bytes.extend_from_slice(&Message::Chunk { channel: 2, data: Bytes::from_static(b"x") }.to_bytes());
        bytes.extend_from_slice(&Message::Invoke { channel: 3, event: "f".into() }.to_bytes());
        bytes.extend_from_slice(&Message::Chunk { channel: 2, data: Bytes::from_static(b"y") }.to_bytes());
        let got = decode_all(Role::Worker, &bytes).unwrap();
        assert_eq!(
            got,
            vec![
                Message::Invoke { channel: 2, event: "e".into() },
                Message::Chunk { channel: 2, data: Bytes::from_static(b"x") },
                Message::Invoke { channel: 3, event: "f".into() },
                Message::Chunk { channel: 2, data: Bytes::from_static(b"y") },
            ]
        );
    }

    #[test]
    fn headers_are_parsed_and_ignored() {
        let v = Value::Array(vec![
            Value::from(2),
            Value::from(0),
            Value::Array(vec![Value::from("data")]),
            Value::Array(vec![
                Value::Array(vec![Value::from(true), Value::from("trace_id"), Value::Binary(vec![1, 2, 3])]),
                Value::from(80),
                Value::Array(vec![Value::from(false), Value::Binary(b"span_id".to_vec()), Value::from("x")]),
            ]),
        ]);
        let mut d = Decoder::new(Role::Engine, DEFAULT_MAX_MESSAGE_BYTES);
        let mut buf = BytesMut::from(&value_bytes(&v)[..]);
        let frame = d.clone().decode_frame(&mut buf.clone()).unwrap().unwrap();
        assert_eq!(frame.headers.len(), 3);
        assert_eq!(frame.headers[1], Header::Indexed(80));
        let m = d.decode(&mut buf).unwrap().unwrap();
        assert_eq!(m, Message::Chunk { channel: 2, data: Bytes::from_static(b"data") });
    }

    #[test]
    fn error_and_terminate_decode_tolerantly() {
        let err = Value::Array(vec![
            Value::from(4),
            Value::from(1),
            Value::Array(vec![Value::Array(vec![Value::from(1), Value::from(42)]), Value::from("boom")]),
        ]);
        let got = decode_all(Role::Engine, &value_bytes(&err)).unwrap();
        assert_eq!(got, vec![Message::Error { channel: 4, category: 1, code: 42, message: "boom".into() }]);
        let term = Value::Array(vec![Value::from(1), Value::from(1), Value::Array(vec![])]);
        let got = decode_all(Role::Worker, &value_bytes(&term)).unwrap();
        assert_eq!(got, vec![Message::Terminate { code: terminate_code::NORMAL, reason: String::new() }]);
    }

    #[test]
    fn partial_input_waits_and_oversize_fails() {
        let bytes = Message::Chunk { channel: 2, data: Bytes::from(vec![7u8; 1000]) }.to_bytes();
        let mut d = Decoder::new(Role::Engine, 100);
        let mut buf = BytesMut::from(&bytes[..10]);
        assert_eq!(d.decode(&mut buf), Err(ProtocolError::TooLarge { limit: 100 }));
        let mut d = Decoder::new(Role::Engine, 2000);
        let mut buf = BytesMut::from(&bytes[..500]);
        assert_eq!(d.decode(&mut buf), Ok(None));
        buf.extend_from_slice(&bytes[500..]);
        assert!(matches!(d.decode(&mut buf), Ok(Some(Message::Chunk { .. }))));
        // A huge declared array is refused before anything is allocated.
        let mut buf = BytesMut::from(&[0xdd, 0xff, 0xff, 0xff, 0xff][..]);
        assert_eq!(d.decode(&mut buf), Err(ProtocolError::TooLarge { limit: 2000 }));
    }

    /// Feeds `bytes` to a decoder `step` bytes per read; returns the frames, the reads and the
    /// bytes of headers examined.
    fn trickle(bytes: &[u8], step: usize) -> (usize, u64, u64) {
        let mut d = Decoder::new(Role::Engine, DEFAULT_MAX_MESSAGE_BYTES);
        let mut buf = BytesMut::new();
        let (mut frames, mut reads) = (0, 0u64);
        for chunk in bytes.chunks(step) {
            buf.extend_from_slice(chunk);
            reads += 1;
            while d.decode_frame(&mut buf).unwrap().is_some() {
                frames += 1;
            }
        }
        assert!(buf.is_empty());
        (frames, reads, d.examined())
    }

    #[test]
    fn a_message_trickling_in_is_scanned_once_not_once_per_read() {
        // 200 000 one-byte elements arriving 16 bytes per read: a decoder that rescanned its
        // buffer on every read examined about 1.25 billion bytes here.
        let v = Value::Array(vec![Value::from(5), Value::from(0), Value::Array(vec![Value::from(1); 200_000])]);
        let bytes = value_bytes(&v);
        let (frames, reads, examined) = trickle(&bytes, 16);
        assert_eq!(frames, 1);
        // Each header once, plus the element that was not complete yet, again, on each read.
        assert!(
            examined <= bytes.len() as u64 + 5 * reads,
            "{examined} bytes examined for {} in {reads} reads",
            bytes.len()
        );
        // A 16 MiB chunk in 4 KiB reads: a few header bytes per read.
        let big =
            Message::Chunk { channel: 2, data: Bytes::from(vec![0u8; DEFAULT_MAX_MESSAGE_BYTES - 64]) }.to_bytes();
        let (frames, reads, examined) = trickle(&big, 4096);
        assert_eq!(frames, 1);
        assert!(examined <= 16 * reads, "{examined} bytes examined in {reads} reads");
        // Messages back to back, split anywhere, are all found.
        let mut many = BytesMut::new();
        for i in 0..1000u64 {
            Message::Chunk { channel: 2 + i, data: Bytes::from(vec![1u8; (i % 40) as usize]) }.encode(&mut many);
        }
        assert_eq!(trickle(&many, 7).0, 1000);
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut bytes = vec![0x91u8; 10_000];
        bytes.push(0xc0);
        let mut d = Decoder::new(Role::Engine, DEFAULT_MAX_MESSAGE_BYTES);
        assert_eq!(d.decode(&mut BytesMut::from(&bytes[..])), Err(ProtocolError::TooDeep));
    }

    #[test]
    fn non_message_values_are_malformed() {
        for v in [
            Value::from(1),
            Value::Array(vec![Value::from(1), Value::from(0)]),
            Value::Array(vec![Value::from(-1), Value::from(0), Value::Array(vec![])]),
            Value::Array(vec![Value::from(2), Value::from(9), Value::Array(vec![])]),
            Value::Array(vec![Value::from(0), Value::from(0), Value::Array(vec![])]),
        ] {
            assert!(decode_all(Role::Engine, &value_bytes(&v)).is_err(), "{v}");
        }
    }

    fn arb_text() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9 _.-]{0,24}"
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            arb_text().prop_map(|uuid| Message::Handshake { uuid }),
            Just(Message::Heartbeat),
            (any::<i64>(), arb_text()).prop_map(|(code, reason)| Message::Terminate { code, reason }),
            (2u64..u64::MAX, proptest::collection::vec(any::<u8>(), 0..300))
                .prop_map(|(channel, d)| Message::Chunk { channel, data: Bytes::from(d) }),
            (2u64..u64::MAX, any::<i64>(), any::<i64>(), arb_text())
                .prop_map(|(channel, category, code, message)| Message::Error { channel, category, code, message }),
            (2u64..u64::MAX).prop_map(|channel| Message::Choke { channel }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip_with_any_split(msgs in proptest::collection::vec(arb_message(), 1..20), split in any::<prop::sample::Index>()) {
            let mut bytes = BytesMut::new();
            for m in &msgs {
                m.encode(&mut bytes);
            }
            let at = split.index(bytes.len() + 1);
            let mut d = Decoder::new(Role::Engine, DEFAULT_MAX_MESSAGE_BYTES);
            let mut buf = BytesMut::from(&bytes[..at]);
            let mut got = Vec::new();
            while let Some(m) = d.decode(&mut buf).unwrap() {
                got.push(m);
            }
            buf.extend_from_slice(&bytes[at..]);
            while let Some(m) = d.decode(&mut buf).unwrap() {
                got.push(m);
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(got, msgs);
        }

        #[test]
        fn invoke_round_trips_for_workers(event in arb_text(), channels in proptest::collection::btree_set(2u64..1_000_000, 1..10)) {
            let mut bytes = BytesMut::new();
            let expected: Vec<Message> = channels.iter().map(|&channel| Message::Invoke { channel, event: event.clone() }).collect();
            for m in &expected {
                m.encode(&mut bytes);
            }
            prop_assert_eq!(decode_all(Role::Worker, &bytes).unwrap(), expected);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), role in prop_oneof![Just(Role::Engine), Just(Role::Worker)]) {
            let mut d = Decoder::new(role, 4096);
            let mut buf = BytesMut::from(&bytes[..]);
            // Every call either consumes a message, waits, or fails; it never loops without progress.
            for _ in 0..bytes.len() + 1 {
                match d.decode(&mut buf) {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }

        #[test]
        fn mutated_messages_never_panic(msgs in proptest::collection::vec(arb_message(), 1..5), flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
            let mut bytes = BytesMut::new();
            for m in &msgs {
                m.encode(&mut bytes);
            }
            for (i, b) in flips {
                let at = i.index(bytes.len());
                bytes[at] = b;
            }
            let mut d = Decoder::new(Role::Worker, 1 << 20);
            let mut buf = bytes;
            while let Ok(Some(_)) = d.decode(&mut buf) {}
        }
    }
}
