//! communicatord's text form: one message per line.
//!
//! ```text
//! [<from_server:from_service ][[server:]service/]COMMAND[ name=value;name=value...]
//! ```
//!
//! Parameters are written sorted by name. A value is quoted when it contains `;` or starts with
//! `"`; inside quotes `"` is written `\"`. Everywhere, backslash, newline and carriage return are
//! written `\\`, `\n` and `\r`, so a message always fits on one line and every value round-trips
//! (including a quoted value ending in a backslash, which the reference daemon got wrong).
//!
//! The envelope and payload travel as reserved parameters whose names start with `_`
//! (`_id`, `_pid`, `_reply_to`, `_creator`, `_created_at`, `_expires_at`, `_hops`, `_perms`, `_payload`
//! in canonical padded base64), written only when set. User parameter names never start with `_`.

use crate::{Decoded, FrameError, Message, MessageError};
use base64::Engine as _;
use bytes::BytesMut;

const P_ID: &str = "_id";
const P_PID: &str = "_pid";
const P_REPLY_TO: &str = "_reply_to";
const P_CREATOR: &str = "_creator";
const P_CREATED_AT: &str = "_created_at";
const P_EXPIRES_AT: &str = "_expires_at";
const P_PAYLOAD: &str = "_payload";
const P_HOPS: &str = "_hops";
const P_PERMS: &str = "_perms";

/// Writes `msg` as one text line, without the trailing newline.
pub fn to_line(msg: &Message) -> String {
    let mut out = String::with_capacity(64 + msg.params.len() * 24);
    if !msg.from.is_empty() {
        out.push('<');
        out.push_str(&msg.from.server);
        out.push(':');
        out.push_str(&msg.from.service);
        out.push(' ');
    }
    if !msg.to.service.is_empty() || !msg.to.server.is_empty() {
        if !msg.to.server.is_empty() {
            out.push_str(&msg.to.server);
            out.push(':');
        }
        out.push_str(&msg.to.service);
        out.push('/');
    }
    out.push_str(&msg.command);

    // Reserved parameters sort before user ones ('_' < letters is false in ASCII, so order them
    // explicitly: user parameters first, in name order, then the reserved ones in name order).
    let env = &msg.envelope;
    let mut reserved: Vec<(&str, String)> = Vec::new();
    if env.created_at != 0 {
        reserved.push((P_CREATED_AT, env.created_at.to_string()));
    }
    if !env.creator.is_empty() {
        reserved.push((P_CREATOR, env.creator.clone()));
    }
    if env.expires_at != 0 {
        reserved.push((P_EXPIRES_AT, env.expires_at.to_string()));
    }
    if env.hops != 0 {
        reserved.push((P_HOPS, env.hops.to_string()));
    }
    if env.id != 0 {
        reserved.push((P_ID, env.id.to_string()));
    }
    if !msg.payload.is_empty() {
        reserved.push((P_PAYLOAD, base64_encode(&msg.payload)));
    }
    if !env.perms.is_empty() {
        reserved.push((P_PERMS, env.perms.to_string()));
    }
    if env.pid != 0 {
        reserved.push((P_PID, env.pid.to_string()));
    }
    if env.reply_to != 0 {
        reserved.push((P_REPLY_TO, env.reply_to.to_string()));
    }
    let mut first = true;
    let user = msg.params.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    let reserved = reserved.iter().map(|(k, v)| (*k, v.as_str()));
    for (name, value) in user.chain(reserved) {
        out.push(if first { ' ' } else { ';' });
        first = false;
        out.push_str(name);
        out.push('=');
        write_value(&mut out, value);
    }
    out
}

fn write_value(out: &mut String, value: &str) {
    let quoted = value.contains(';') || value.starts_with('"');
    if quoted {
        out.push('"');
    }
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '"' if quoted => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    if quoted {
        out.push('"');
    }
}

/// Parses one line (without its newline) into a message.
///
/// Fails with [`MessageError`] when the line breaks the syntax or a naming rule.
pub fn from_line(line: &str) -> Result<Message, MessageError> {
    let malformed = |what: &str| MessageError::Malformed(what.to_string());
    let mut msg = Message::default();
    let mut rest = line;
    if let Some(after) = rest.strip_prefix('<') {
        let (from, tail) =
            after.split_once(' ').ok_or_else(|| malformed("sender `<server:service` must be followed by a space"))?;
        let (server, service) = from.split_once(':').ok_or_else(|| malformed("sender must be `<server:service`"))?;
        msg.from.server = server.to_string();
        msg.from.service = service.to_string();
        rest = tail;
    }
    let (head, params) = match rest.split_once(' ') {
        Some((h, p)) => (h, Some(p)),
        None => (rest, None),
    };
    let command = match head.rsplit_once('/') {
        Some((dest, command)) => {
            if dest.is_empty() {
                return Err(malformed("empty destination before `/`"));
            }
            match dest.split_once(':') {
                Some((server, service)) => {
                    msg.to.server = server.to_string();
                    msg.to.service = service.to_string();
                }
                None => msg.to.service = dest.to_string(),
            }
            command
        }
        None => head,
    };
    msg.command = command.to_string();
    if let Some(params) = params {
        parse_params(params, &mut msg)?;
    }
    msg.validate()?;
    Ok(msg)
}

fn parse_params(s: &str, msg: &mut Message) -> Result<(), MessageError> {
    let malformed = |what: String| MessageError::Malformed(what);
    let mut chars = s.chars().peekable();
    loop {
        let mut name = String::new();
        loop {
            match chars.next() {
                Some('=') => break,
                Some(c) => name.push(c),
                None => return Err(malformed(format!("parameter {name:?} has no `=value`"))),
            }
        }
        let mut value = String::new();
        let quoted = chars.peek() == Some(&'"');
        if quoted {
            chars.next();
        }
        let mut closed = !quoted;
        let mut more = false;
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('\\') => value.push('\\'),
                    Some('n') => value.push('\n'),
                    Some('r') => value.push('\r'),
                    Some('"') => value.push('"'),
                    Some(other) => {
                        value.push('\\');
                        value.push(other);
                    }
                    None => value.push('\\'),
                },
                '"' if quoted => {
                    closed = true;
                    break;
                }
                ';' if !quoted => {
                    more = true;
                    break;
                }
                c => value.push(c),
            }
        }
        if !closed {
            return Err(malformed(format!("unterminated quoted value for {name:?}")));
        }
        store_param(msg, name, value)?;
        if quoted {
            match chars.next() {
                None => {}
                Some(';') => more = true,
                Some(c) => return Err(malformed(format!("unexpected {c:?} after a quoted value"))),
            }
        }
        if !more {
            return Ok(());
        }
        if chars.peek().is_none() {
            return Err(malformed("trailing `;` after the last parameter".into()));
        }
    }
}

fn store_param(msg: &mut Message, name: String, value: String) -> Result<(), MessageError> {
    let number = |v: &str| {
        v.parse::<i64>().map_err(|_| MessageError::Malformed(format!("{name} must be an integer, got {v:?}")))
    };
    let id = |v: &str| {
        v.parse::<u64>().map_err(|_| MessageError::Malformed(format!("{name} must be an unsigned integer, got {v:?}")))
    };
    let env = &mut msg.envelope;
    match name.as_str() {
        P_ID => env.id = id(&value)?,
        P_HOPS => {
            env.hops = u32::try_from(id(&value)?).map_err(|_| MessageError::Malformed("_hops is too large".into()))?
        }
        P_PID => env.pid = id(&value)?,
        P_REPLY_TO => env.reply_to = id(&value)?,
        P_CREATOR => env.creator = value,
        P_CREATED_AT => env.created_at = number(&value)?,
        P_EXPIRES_AT => env.expires_at = number(&value)?,
        P_PAYLOAD => {
            msg.payload = base64_decode(&value)
                .ok_or_else(|| MessageError::Malformed("_payload is not canonical padded base64".into()))?
                .into()
        }
        P_PERMS => env.perms = value.parse().map_err(|e| MessageError::Malformed(format!("_perms: {e}")))?,
        _ if !crate::valid_param_name(&name) => return Err(MessageError::BadParam(name)),
        _ => {
            if msg.params.insert(name.clone(), value).is_some() {
                return Err(MessageError::Malformed(format!("parameter {name:?} given twice")));
            }
        }
    }
    Ok(())
}

/// Splits a byte stream into lines and parses each; bounded by `max_line`.
#[derive(Debug, Clone)]
pub struct LineDecoder {
    max_line: usize,
    /// How far the buffer has been searched for a newline already.
    scanned: usize,
}

impl LineDecoder {
    /// A decoder that rejects lines longer than `max_line` bytes.
    pub fn new(max_line: usize) -> Self {
        LineDecoder { max_line, scanned: 0 }
    }

    /// Takes the next complete line out of `buf` and parses it. Empty lines are skipped.
    ///
    /// Returns `Ok(None)` when no complete line is buffered yet. Fails with
    /// [`FrameError::TooLarge`] when a line exceeds the bound (the stream cannot be resynchronised
    /// safely, so the caller should close the connection).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, FrameError> {
        loop {
            let Some(pos) = buf[self.scanned..].iter().position(|b| *b == b'\n').map(|p| p + self.scanned) else {
                self.scanned = buf.len();
                if buf.len() > self.max_line {
                    return Err(FrameError::TooLarge { len: buf.len(), max: self.max_line });
                }
                return Ok(None);
            };
            self.scanned = 0;
            if pos > self.max_line {
                return Err(FrameError::TooLarge { len: pos, max: self.max_line });
            }
            let line = buf.split_to(pos + 1);
            let mut line = &line[..pos];
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let decoded = match std::str::from_utf8(line) {
                Ok(s) => match from_line(s) {
                    Ok(m) => Decoded::Message(m),
                    Err(e) => Decoded::Invalid(e),
                },
                Err(_) => Decoded::Invalid(MessageError::Malformed("line is not valid UTF-8".into())),
            };
            return Ok(Some(decoded));
        }
    }
}

/// Appends `msg` as a line with its newline to `dst`.
pub fn encode(msg: &Message, dst: &mut BytesMut) {
    dst.extend_from_slice(to_line(msg).as_bytes());
    dst.extend_from_slice(b"\n");
}

fn base64_encode(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Canonical padded base64 only: trailing bits must be zero and padding present, so every payload
/// has exactly one text form.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(line: &str) -> String {
        to_line(&from_line(line).unwrap())
    }

    #[test]
    fn reference_vectors_round_trip() {
        assert_eq!(
            round("images/REPROCESS url=http://domain.name/this/one;priority=normal"),
            "images/REPROCESS priority=normal;url=http://domain.name/this/one"
        );
        assert_eq!(
            round(r#"pagelist/RESET url="http://domain.name/this;one;path";priority=-58"#),
            r#"pagelist/RESET priority=-58;url="http://domain.name/this;one;path""#
        );
    }

    #[test]
    fn quoted_value_ending_in_backslash_round_trips() {
        let msg = Message::new("SET").to("svc").param("p", "a;b\\");
        let line = to_line(&msg);
        assert_eq!(line, r#"svc/SET p="a;b\\""#);
        assert_eq!(from_line(&line).unwrap(), msg);
    }

    #[test]
    fn full_addressing_and_envelope() {
        let line = "<alpha:images beta:pagelist/RESET a=1;_id=7;_reply_to=3";
        let m = from_line(line).unwrap();
        assert_eq!(m.from, crate::Address::new("alpha", "images"));
        assert_eq!(m.to, crate::Address::new("beta", "pagelist"));
        assert_eq!(m.envelope.id, 7);
        assert_eq!(m.envelope.reply_to, 3);
        assert_eq!(to_line(&m), line);
    }

    #[test]
    fn escapes() {
        let msg = Message::new("X").param("v", "line1\nline2\r\\\"q").param("w", "\"starts");
        let line = to_line(&msg);
        assert!(!line.contains('\n'));
        assert_eq!(from_line(&line).unwrap(), msg);
    }

    #[test]
    fn payload_round_trips_as_base64() {
        for len in 0..8 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37) as u8).collect();
            assert_eq!(base64_decode(&base64_encode(&data)).unwrap(), data);
        }
        let msg = Message::new("X").with_payload(vec![0, 255, 10, 13]);
        assert_eq!(from_line(&to_line(&msg)).unwrap(), msg);
    }

    #[test]
    fn non_canonical_base64_is_refused() {
        assert_eq!(from_line("X _payload=QQ==").unwrap().payload, &b"A"[..]);
        // `QR==` carries non-zero trailing bits: it would decode like `QQ==`.
        for bad in ["X _payload=QR==", "X _payload=QQ", "X _payload=QQ=", "X _payload=Q===", "X _payload=QQ==QQ=="] {
            assert!(from_line(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn malformed_lines_are_errors() {
        for bad in [
            "",
            "lower",
            "svc/",
            "/CMD",
            "CMD a",
            "CMD a=1;",
            "CMD a=\"open",
            "CMD a=\"x\"y",
            "CMD 1a=2",
            "CMD _unknown=1",
            "CMD a=1;a=2",
            "<nocolon CMD",
            "<a:b",
            "bad name/CMD",
            "CMD _id=x",
        ] {
            assert!(from_line(bad).is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn line_decoder_splits_and_bounds() {
        let mut d = LineDecoder::new(32);
        let mut buf = BytesMut::from(&b"\nA\r\nsvc/B x=1\nC"[..]);
        assert_eq!(d.decode(&mut buf).unwrap(), Some(Decoded::Message(Message::new("A"))));
        assert!(matches!(d.decode(&mut buf).unwrap(), Some(Decoded::Message(m)) if m.command == "B"));
        assert_eq!(d.decode(&mut buf).unwrap(), None);
        buf.extend_from_slice(&[b'x'; 40]);
        assert!(matches!(d.decode(&mut buf), Err(FrameError::TooLarge { .. })));
    }
}
