//! Cocaine's HTTP-over-app protocol, pure: which app and event a request goes to, the request
//! chunk a worker receives and the response head it answers. No I/O, no clock.
//!
//! The protocol is the one cocaine-http-proxy and cocaine-native-proxy speak and the Python
//! `cocaine` framework's `http` and `wsgi` decorators expect:
//!
//! - **Routing.** The headers `X-Cocaine-Service` and `X-Cocaine-Event` name the app and the
//!   event (both or neither; the worker gets the whole original URI). Without them the path does:
//!   `/APP/EVENT/rest?query` goes to event `EVENT` of app `APP`, and the worker gets `/rest?query`
//!   (`/` when nothing follows the event).
//! - **Request.** The first chunk is the MessagePack array `[method, uri, version, [[name,
//!   value], ...], body]` with `version` `"1.1"` or `"1.0"` and the body as binary. The body is
//!   the whole request body when it is at most [`UPLOAD_CHUNK_BYTES`]; a larger body follows in
//!   raw chunks of at most that size and the first chunk's body is empty. So the request's body
//!   is always the first chunk's body followed by every later chunk.
//! - **Response.** The worker's first chunk is `[code, [[name, value], ...]]`; every later chunk
//!   is raw body bytes; close ends the response.
//!
//! Every decoder here is total: bytes from a worker that do not make a head give a
//! [`HeadError`], never a panic; nesting and header counts are bounded.

use bytes::{BufMut, Bytes, BytesMut};
use rmpv::Value;

/// Largest body piece sent to a worker in one chunk (512 KiB): the Python framework's msgpack
/// 0.6 refuses a single binary over 1 MiB (and the worker dies), so bodies are split well below.
pub const UPLOAD_CHUNK_BYTES: usize = 512 * 1024;

/// Most headers accepted in a worker's response head.
pub const MAX_RESPONSE_HEADERS: usize = 256;

/// Deepest nesting accepted in a head, in rmpv's count (each level costs two or three: a head
/// `[code, [[name, value]]]` needs about ten).
const MAX_HEAD_DEPTH: usize = 16;

/// The header naming the app.
pub const SERVICE_HEADER: &str = "x-cocaine-service";
/// The header naming the event.
pub const EVENT_HEADER: &str = "x-cocaine-event";

/// Where a request goes: an event of an app, and the URI the worker sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The app (a service name at the locator).
    pub app: String,
    /// The event (the app's handler).
    pub event: String,
    /// The URI given to the worker: the original one when the headers chose the target, else
    /// what follows `/APP/EVENT`.
    pub uri: String,
}

/// Why a request names no app event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// Only one of the two headers was given.
    #[error("send both X-Cocaine-Service and X-Cocaine-Event, or neither and use the path /APP/EVENT/...")]
    IncompleteHeaders,
    /// A header value is empty or not visible ASCII.
    #[error("X-Cocaine-Service and X-Cocaine-Event must be non-empty visible ASCII")]
    BadHeader,
}

/// The app event chosen by the Cocaine headers, if the request has them.
///
/// `service` and `event` are the raw values of `X-Cocaine-Service` and `X-Cocaine-Event`;
/// `path_and_query` is the request's original URI (path and query).
///
/// # Errors
/// [`RouteError::IncompleteHeaders`] when only one header is present, [`RouteError::BadHeader`]
/// when a value is empty or not visible ASCII.
pub fn route_by_headers(
    service: Option<&[u8]>,
    event: Option<&[u8]>,
    path_and_query: &str,
) -> Result<Option<Target>, RouteError> {
    let (service, event) = match (service, event) {
        (None, None) => return Ok(None),
        (Some(s), Some(e)) => (s, e),
        _ => return Err(RouteError::IncompleteHeaders),
    };
    let text = |v: &[u8]| -> Result<String, RouteError> {
        let v = std::str::from_utf8(v).map_err(|_| RouteError::BadHeader)?.trim();
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(RouteError::BadHeader);
        }
        Ok(v.to_string())
    };
    let uri = if path_and_query.is_empty() { "/".to_string() } else { path_and_query.to_string() };
    Ok(Some(Target { app: text(service)?, event: text(event)?, uri }))
}

/// The app event named by the path `/APP/EVENT[/rest][?query]`, or `None` when the path has
/// fewer than two non-empty segments. The worker's URI is `/rest?query` (`/` and `/?query` when
/// nothing follows the event).
pub fn route_by_path(path_and_query: &str) -> Option<Target> {
    let (path, query) = match path_and_query.find('?') {
        Some(i) => path_and_query.split_at(i),
        None => (path_and_query, ""),
    };
    let rest = path.strip_prefix('/')?;
    let (app, rest) = rest.split_once('/')?;
    let (event, tail) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if app.is_empty() || event.is_empty() {
        return None;
    }
    let tail = if tail.is_empty() { "/" } else { tail };
    Some(Target { app: app.to_string(), event: event.to_string(), uri: format!("{tail}{query}") })
}

/// The request chunk a worker receives first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// `GET`, `POST`, ...
    pub method: String,
    /// See [`Target::uri`].
    pub uri: String,
    /// `"1.1"` or `"1.0"` (as cocaine-http-proxy sends it).
    pub version: String,
    /// Request headers in order, names as received.
    pub headers: Vec<(String, Bytes)>,
    /// The whole body when it fits one chunk, else empty (the body follows in later chunks).
    pub body: Bytes,
}

impl RequestHead {
    /// The MessagePack chunk `[method, uri, version, [[name, value], ...], body]`. Names and
    /// values are strings (a value that is not UTF-8 is sent as binary); the body is binary.
    pub fn encode(&self) -> Bytes {
        let size = 64
            + self.uri.len()
            + self.body.len()
            + self.headers.iter().map(|(n, v)| n.len() + v.len() + 8).sum::<usize>();
        let mut w = BytesMut::with_capacity(size).writer();
        // Writing into a BytesMut cannot fail; the results are io::Result only by signature.
        let _ = rmp::encode::write_array_len(&mut w, 5);
        let _ = rmp::encode::write_str(&mut w, &self.method);
        let _ = rmp::encode::write_str(&mut w, &self.uri);
        let _ = rmp::encode::write_str(&mut w, &self.version);
        let _ = rmp::encode::write_array_len(&mut w, self.headers.len() as u32);
        for (name, value) in &self.headers {
            let _ = rmp::encode::write_array_len(&mut w, 2);
            let _ = rmp::encode::write_str(&mut w, name);
            match std::str::from_utf8(value) {
                Ok(v) => {
                    let _ = rmp::encode::write_str(&mut w, v);
                }
                Err(_) => {
                    let _ = rmp::encode::write_bin(&mut w, value);
                }
            }
        }
        let _ = rmp::encode::write_bin(&mut w, &self.body);
        w.into_inner().freeze()
    }

    /// Parses a request chunk (the worker's side: for Rust workers serving HTTP).
    ///
    /// # Errors
    /// [`HeadError`] when the bytes are not a 5-element request array.
    pub fn decode(bytes: &[u8]) -> Result<RequestHead, HeadError> {
        let items = match read_value(bytes)? {
            Value::Array(items) if items.len() == 5 => items,
            _ => return Err(HeadError::Shape("a request is [method, uri, version, headers, body]")),
        };
        let mut it = items.into_iter();
        let mut next = || it.next().unwrap_or(Value::Nil);
        let method = text(next(), "method")?;
        let uri = text(next(), "uri")?;
        let version = text(next(), "version")?;
        let headers = header_list(next())?;
        let body = bytes_of(next()).ok_or(HeadError::Shape("the body is binary or a string"))?;
        Ok(RequestHead { method, uri, version, headers, body })
    }
}

/// The response head a worker answers first: `[code, [[name, value], ...]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// The HTTP status code.
    pub code: u16,
    /// Response headers in order.
    pub headers: Vec<(String, Bytes)>,
}

/// Why a worker's first chunk is not a response head.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// Not MessagePack, or trailing bytes after the value.
    #[error("not a MessagePack value: {0}")]
    NotMessagePack(String),
    /// MessagePack, but not the expected array.
    #[error("malformed head: {0}")]
    Shape(&'static str),
    /// The status code is not between 100 and 999.
    #[error("status code {0} is not between 100 and 999")]
    Code(i64),
    /// More than [`MAX_RESPONSE_HEADERS`] headers.
    #[error("more than {MAX_RESPONSE_HEADERS} headers")]
    TooManyHeaders,
}

impl ResponseHead {
    /// Parses a worker's first chunk. The headers may also be a map (some frameworks send a
    /// dict); names and values may be strings or binary.
    ///
    /// # Errors
    /// [`HeadError`] when the bytes are not a head.
    pub fn decode(bytes: &[u8]) -> Result<ResponseHead, HeadError> {
        let items = match read_value(bytes)? {
            Value::Array(items) if items.len() == 2 => items,
            _ => return Err(HeadError::Shape("a head is [code, [[name, value], ...]]")),
        };
        let mut it = items.into_iter();
        let code = match it.next() {
            Some(Value::Integer(n)) => n.as_i64().unwrap_or(i64::MAX),
            _ => return Err(HeadError::Shape("the status code is an integer")),
        };
        if !(100..=999).contains(&code) {
            return Err(HeadError::Code(code));
        }
        let headers = header_list(it.next().unwrap_or(Value::Nil))?;
        Ok(ResponseHead { code: code as u16, headers })
    }

    /// The MessagePack chunk `[code, [[name, value], ...]]` (the worker's side).
    pub fn encode(&self) -> Bytes {
        let mut w =
            BytesMut::with_capacity(32 + self.headers.iter().map(|(n, v)| n.len() + v.len() + 8).sum::<usize>())
                .writer();
        // Writing into a BytesMut cannot fail.
        let _ = rmp::encode::write_array_len(&mut w, 2);
        let _ = rmp::encode::write_uint(&mut w, u64::from(self.code));
        let _ = rmp::encode::write_array_len(&mut w, self.headers.len() as u32);
        for (name, value) in &self.headers {
            let _ = rmp::encode::write_array_len(&mut w, 2);
            let _ = rmp::encode::write_str(&mut w, name);
            let _ = rmp::encode::write_bin(&mut w, value);
        }
        w.into_inner().freeze()
    }
}

fn read_value(bytes: &[u8]) -> Result<Value, HeadError> {
    let mut rd = bytes;
    let value = rmpv::decode::read_value_with_max_depth(&mut rd, MAX_HEAD_DEPTH)
        .map_err(|e| HeadError::NotMessagePack(e.to_string()))?;
    if !rd.is_empty() {
        return Err(HeadError::NotMessagePack(format!("{} bytes after the value", rd.len())));
    }
    Ok(value)
}

fn bytes_of(v: Value) -> Option<Bytes> {
    match v {
        Value::Binary(b) => Some(Bytes::from(b)),
        Value::String(s) => Some(Bytes::from(s.into_bytes())),
        _ => None,
    }
}

fn text(v: Value, what: &'static str) -> Result<String, HeadError> {
    let b = bytes_of(v).ok_or(HeadError::Shape(what))?;
    String::from_utf8(b.to_vec()).map_err(|_| HeadError::Shape(what))
}

fn header_list(v: Value) -> Result<Vec<(String, Bytes)>, HeadError> {
    let pairs: Vec<(Value, Value)> = match v {
        Value::Array(items) => {
            if items.len() > MAX_RESPONSE_HEADERS {
                return Err(HeadError::TooManyHeaders);
            }
            items
                .into_iter()
                .map(|item| match item {
                    Value::Array(pair) if pair.len() == 2 => {
                        let mut p = pair.into_iter();
                        Ok((p.next().unwrap_or(Value::Nil), p.next().unwrap_or(Value::Nil)))
                    }
                    _ => Err(HeadError::Shape("a header is [name, value]")),
                })
                .collect::<Result<_, _>>()?
        }
        Value::Map(pairs) => {
            if pairs.len() > MAX_RESPONSE_HEADERS {
                return Err(HeadError::TooManyHeaders);
            }
            pairs
        }
        _ => return Err(HeadError::Shape("the headers are a list of [name, value]")),
    };
    pairs
        .into_iter()
        .map(|(n, v)| {
            let name = text(n, "a header name is a string")?;
            let value = bytes_of(v).ok_or(HeadError::Shape("a header value is a string"))?;
            Ok((name, value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn routes_by_path_like_the_native_proxy() {
        let t = route_by_path("/echo/http/some/where?x=1").unwrap();
        assert_eq!((t.app.as_str(), t.event.as_str(), t.uri.as_str()), ("echo", "http", "/some/where?x=1"));
        let t = route_by_path("/echo/http").unwrap();
        assert_eq!(t.uri, "/");
        let t = route_by_path("/echo/http?x=1").unwrap();
        assert_eq!(t.uri, "/?x=1");
        let t = route_by_path("/echo/http/").unwrap();
        assert_eq!(t.uri, "/");
        for none in ["/", "", "/echo", "/echo/", "//http", "/echo?x=/a/b", "echo/http"] {
            assert_eq!(route_by_path(none), None, "{none}");
        }
    }

    #[test]
    fn routes_by_headers_with_the_original_uri() {
        let t = route_by_headers(Some(b"echo"), Some(b"http"), "/a/b?c").unwrap().unwrap();
        assert_eq!((t.app.as_str(), t.event.as_str(), t.uri.as_str()), ("echo", "http", "/a/b?c"));
        assert_eq!(route_by_headers(None, None, "/a/b"), Ok(None));
        assert_eq!(route_by_headers(Some(b"echo"), None, "/"), Err(RouteError::IncompleteHeaders));
        assert_eq!(route_by_headers(None, Some(b"http"), "/"), Err(RouteError::IncompleteHeaders));
        assert_eq!(route_by_headers(Some(b""), Some(b"http"), "/"), Err(RouteError::BadHeader));
        assert_eq!(route_by_headers(Some(b"a b"), Some(b"http"), "/"), Err(RouteError::BadHeader));
    }

    #[test]
    fn request_head_round_trips_and_matches_the_framework_layout() {
        let head = RequestHead {
            method: "POST".into(),
            uri: "/x?y=1".into(),
            version: "1.1".into(),
            headers: vec![("Host".into(), Bytes::from_static(b"h")), ("X-Bin".into(), Bytes::from_static(b"\xff"))],
            body: Bytes::from_static(b"body"),
        };
        let bytes = head.encode();
        assert_eq!(RequestHead::decode(&bytes).unwrap(), head);
        // What the framework unpacks: method, uri, version as str; [[name, value]]; body as bin.
        let v = rmpv::decode::read_value(&mut &bytes[..]).unwrap();
        let a = v.as_array().unwrap();
        assert_eq!(a[0].as_str(), Some("POST"));
        assert_eq!(a[2].as_str(), Some("1.1"));
        assert_eq!(a[3].as_array().unwrap()[0].as_array().unwrap()[1].as_str(), Some("h"));
        assert!(matches!(a[3].as_array().unwrap()[1].as_array().unwrap()[1], Value::Binary(_)));
        assert_eq!(a[4], Value::Binary(b"body".to_vec()));
    }

    #[test]
    fn response_head_accepts_what_workers_send() {
        let head = ResponseHead { code: 201, headers: vec![("X-A".into(), Bytes::from_static(b"1"))] };
        assert_eq!(ResponseHead::decode(&head.encode()).unwrap(), head);
        // The Python framework packs a tuple of str: (200, [("Content-Type", "text/plain")]).
        let py = Value::Array(vec![
            200.into(),
            Value::Array(vec![Value::Array(vec!["Content-Type".into(), "text/plain".into()])]),
        ]);
        let mut b = Vec::new();
        rmpv::encode::write_value(&mut b, &py).unwrap();
        let h = ResponseHead::decode(&b).unwrap();
        assert_eq!(h.code, 200);
        assert_eq!(h.headers, vec![("Content-Type".to_string(), Bytes::from_static(b"text/plain"))]);
        // A map of headers is accepted too.
        let map = Value::Array(vec![404.into(), Value::Map(vec![("A".into(), "b".into())])]);
        let mut b = Vec::new();
        rmpv::encode::write_value(&mut b, &map).unwrap();
        assert_eq!(ResponseHead::decode(&b).unwrap().headers.len(), 1);
    }

    #[test]
    fn response_head_rejects_garbage_with_a_reason() {
        let enc = |v: Value| {
            let mut b = Vec::new();
            rmpv::encode::write_value(&mut b, &v).unwrap();
            b
        };
        assert!(matches!(ResponseHead::decode(b"hello"), Err(HeadError::NotMessagePack(_))));
        assert!(matches!(ResponseHead::decode(&[]), Err(HeadError::NotMessagePack(_))));
        assert!(matches!(ResponseHead::decode(&enc(Value::from(200))), Err(HeadError::Shape(_))));
        let bad_code = enc(Value::Array(vec![42.into(), Value::Array(vec![])]));
        assert_eq!(ResponseHead::decode(&bad_code), Err(HeadError::Code(42)));
        let bad_header = enc(Value::Array(vec![200.into(), Value::Array(vec![Value::from(1)])]));
        assert!(matches!(ResponseHead::decode(&bad_header), Err(HeadError::Shape(_))));
        let many = enc(Value::Array(vec![
            200.into(),
            Value::Array(vec![Value::Array(vec!["a".into(), "b".into()]); MAX_RESPONSE_HEADERS + 1]),
        ]));
        assert_eq!(ResponseHead::decode(&many), Err(HeadError::TooManyHeaders));
        let mut trailing = enc(Value::Array(vec![200.into(), Value::Array(vec![])]));
        trailing.push(0);
        assert!(matches!(ResponseHead::decode(&trailing), Err(HeadError::NotMessagePack(_))));
    }

    proptest! {
        #[test]
        fn decoders_are_total_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = ResponseHead::decode(&bytes);
            let _ = RequestHead::decode(&bytes);
        }

        #[test]
        fn decoders_are_total_on_mutated_heads(flip in 0usize..64, byte in any::<u8>()) {
            let head = ResponseHead { code: 200, headers: vec![("Content-Type".into(), Bytes::from_static(b"text/plain"))] };
            let mut b = head.encode().to_vec();
            let i = flip % b.len();
            b[i] = byte;
            let _ = ResponseHead::decode(&b);
        }

        #[test]
        fn path_routing_never_panics(path in "[/a-z?=.%]{0,40}") {
            if let Some(t) = route_by_path(&path) {
                prop_assert!(!t.app.is_empty() && !t.event.is_empty() && t.uri.starts_with('/'));
            }
        }
    }
}
