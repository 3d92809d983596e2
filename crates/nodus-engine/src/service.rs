//! Cocaine's v0.12 service protocol, the side that serves clients: dispatch graphs, the locator
//! and app APIs, and the per-connection channel table. No I/O and no clock.
//!
//! Framing is the worker protocol's (back-to-back MessagePack arrays `[channel, type, args]` with
//! an optional fourth element for headers, see [`crate::protocol`]), but here the CLIENT picks the
//! channels: each new invocation uses a channel above every channel it used before on that
//! connection, and `type` is the method's id in the service's dispatch graph.
//!
//! A dispatch graph maps method ids to `[name, tx_graph, rx_graph]`: `tx` is what the client may
//! send on the channel after the invocation, `rx` what the service answers. A graph maps message
//! ids to `[name, next]` where `next` is `nil` (the same graph again: a stream), `{}` (the channel
//! is done) or another graph. Keys are integers on the wire. Two protocols are used:
//!
//! - primitive: rx `{0: [value, {}], 1: [error, {}]}`, one answer then done;
//! - streaming: `{0: [write, nil], 1: [error, {}], 2: [close, {}]}` in both directions.
//!
//! The locator answers `resolve(name)` with `value([[host, port], ...], version, graph)`. An app
//! service has `enqueue(event)` (streaming both ways: chunks to and from one worker session) and
//! `info()` (primitive: a map describing the app) and `control()` (a stream of `chunk(n)` from
//! the client, each setting how many workers to keep running; nothing comes back). Errors are
//! `[[category, code], text]` (see [`errors`]).

use std::collections::HashMap;

use bytes::{BufMut, Bytes, BytesMut};
use rmpv::Value;

use crate::protocol::Frame;

/// Cocaine's default locator port.
pub const DEFAULT_LOCATOR_PORT: u16 = 10053;

/// The version the locator reports for every service in a `resolve` answer.
pub const SERVICE_VERSION: u64 = 1;

/// Method ids of the locator's API.
pub mod locator_method {
    /// `resolve(name) -> value(endpoints, version, graph) | error`.
    pub const RESOLVE: u64 = 0;
}

/// Method ids of an app's API.
pub mod app_method {
    /// `enqueue(event)`: a streaming session with one worker.
    pub const ENQUEUE: u64 = 0;
    /// `info() -> value(map) | error`.
    pub const INFO: u64 = 1;
    /// `control()`: then `chunk(n)` any number of times, each setting the app's population.
    pub const CONTROL: u64 = 2;
}

/// Message ids a client sends on a `control` channel.
pub mod control {
    /// `chunk(n)`: keep `n` workers running (0: start them on demand only).
    pub const CHUNK: u64 = 0;
}

/// Message ids of the streaming protocol (both directions of `enqueue`).
pub mod stream {
    /// `write(chunk)`: one chunk; more may follow.
    pub const WRITE: u64 = 0;
    /// `error([category, code], text)`: the stream failed; nothing follows.
    pub const ERROR: u64 = 1;
    /// `close()`: the sender's side is done.
    pub const CLOSE: u64 = 2;
}

/// Message ids of the primitive protocol (`resolve`, `info` answers).
pub mod primitive {
    /// `value(...)`: the answer.
    pub const VALUE: u64 = 0;
    /// `error([category, code], text)`: the call failed.
    pub const ERROR: u64 = 1;
}

/// Error categories and codes nodus sends on service connections, as `[[category, code], text]`.
///
/// Errors raised by a worker are passed through with the worker's own category and code (the
/// Cocaine Python framework uses category 42, code 100 for an uncaught exception).
pub mod errors {
    /// The locator's errors.
    pub const LOCATOR: i64 = 10;
    /// `resolve` of a name that is neither an app nor the locator.
    pub const SERVICE_NOT_AVAILABLE: i64 = 1;

    /// Errors in a client's use of the protocol.
    pub const DISPATCH: i64 = 11;
    /// A new channel opened with a method id the service does not have.
    pub const UNKNOWN_METHOD: i64 = 1;
    /// The invocation's arguments are not what the method takes.
    pub const INVALID_ARGUMENT: i64 = 2;
    /// The connection already has as many open channels as allowed.
    pub const TOO_MANY_CHANNELS: i64 = 3;
    /// The node is shutting down and opens no new channels.
    pub const SHUTTING_DOWN: i64 = 4;

    /// Errors of the app engine about a request.
    pub const APP: i64 = 12;
    /// The app's queue is full; the request was not taken. Retry later.
    pub const QUEUE_FULL: i64 = 1;
    /// The app is in the failed state (its workers kept crashing).
    pub const APP_FAILED: i64 = 2;
    /// The app is stopped.
    pub const APP_STOPPED: i64 = 3;
    /// The app no longer exists.
    pub const UNKNOWN_APP: i64 = 4;
    /// The worker serving the request failed (crash, hang, disconnect); the request may be retried.
    pub const WORKER_FAILED: i64 = 5;
    /// The session buffered more messages than allowed (a side did not read).
    pub const OVERFLOW: i64 = 6;
    /// The engine shut down or the app was removed.
    pub const ENGINE_GONE: i64 = 7;
    /// The request expired in the app's queue before a worker took it; it was not run.
    pub const EXPIRED: i64 = 8;
}

/// Which API a connection serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// The locator: `resolve`.
    Locator,
    /// An app: `enqueue`, `info`, `control`.
    App,
}

fn s(name: &str) -> Value {
    Value::from(name)
}

fn edge(id: u64, name: &str, next: Value) -> (Value, Value) {
    (Value::from(id), Value::Array(vec![s(name), next]))
}

fn done() -> Value {
    Value::Map(Vec::new())
}

/// The streaming protocol's graph: `{0: [write, nil], 1: [error, {}], 2: [close, {}]}`.
pub fn streaming_graph() -> Value {
    Value::Map(vec![
        edge(stream::WRITE, "write", Value::Nil),
        edge(stream::ERROR, "error", done()),
        edge(stream::CLOSE, "close", done()),
    ])
}

/// The primitive protocol's graph: `{0: [value, {}], 1: [error, {}]}`.
pub fn primitive_graph() -> Value {
    Value::Map(vec![edge(primitive::VALUE, "value", done()), edge(primitive::ERROR, "error", done())])
}

/// The control protocol's graph: `{0: [chunk, nil]}` (a stream of population sizes).
pub fn control_graph() -> Value {
    Value::Map(vec![edge(control::CHUNK, "chunk", Value::Nil)])
}

fn method(id: u64, name: &str, tx: Value, rx: Value) -> (Value, Value) {
    (Value::from(id), Value::Array(vec![s(name), tx, rx]))
}

impl Api {
    /// The dispatch graph this API advertises in `resolve` answers.
    pub fn graph(self) -> Value {
        match self {
            Api::Locator => Value::Map(vec![method(locator_method::RESOLVE, "resolve", done(), primitive_graph())]),
            Api::App => Value::Map(vec![
                method(app_method::ENQUEUE, "enqueue", streaming_graph(), streaming_graph()),
                method(app_method::INFO, "info", done(), primitive_graph()),
                method(app_method::CONTROL, "control", control_graph(), done()),
            ]),
        }
    }
}

/// The arguments of the `value` answer to `resolve`: `[[[host, port], ...], version, graph]`.
pub fn resolve_answer(endpoints: &[(String, u16)], graph: Value) -> Vec<Value> {
    let endpoints = endpoints
        .iter()
        .map(|(host, port)| Value::Array(vec![Value::from(host.as_str()), Value::from(*port)]))
        .collect();
    vec![Value::Array(endpoints), Value::from(SERVICE_VERSION), graph]
}

fn encode(channel: u64, kind: u64, args: &[Value]) -> Bytes {
    let mut out = BytesMut::new().writer();
    // Writing into a BytesMut cannot fail; the results are io::Result only by signature.
    let _ = rmp::encode::write_array_len(&mut out, 3);
    let _ = rmp::encode::write_uint(&mut out, channel);
    let _ = rmp::encode::write_uint(&mut out, kind);
    let _ = rmp::encode::write_array_len(&mut out, args.len() as u32);
    for a in args {
        let _ = rmpv::encode::write_value(&mut out, a);
    }
    out.into_inner().freeze()
}

/// `[channel, 0, args]`: a primitive `value` answer.
pub fn encode_value(channel: u64, args: &[Value]) -> Bytes {
    encode(channel, primitive::VALUE, args)
}

/// `[channel, 0, [chunk]]`: a streaming `write`, the chunk as MessagePack `bin`.
pub fn encode_write(channel: u64, chunk: &[u8]) -> Bytes {
    encode(channel, stream::WRITE, &[Value::Binary(chunk.to_vec())])
}

/// `[channel, 2, []]`: a streaming `close`.
pub fn encode_close(channel: u64) -> Bytes {
    encode(channel, stream::CLOSE, &[])
}

/// `[channel, 1, [[category, code], text]]`: an error (the same id in both protocols).
pub fn encode_error(channel: u64, category: i64, code: i64, text: &str) -> Bytes {
    let pair = Value::Array(vec![Value::from(category), Value::from(code)]);
    encode(channel, stream::ERROR, &[pair, Value::from(text)])
}

/// What a client asked for, after the channel table has checked it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Locator: `resolve(name)` on a new channel.
    Resolve {
        /// The channel to answer on.
        channel: u64,
        /// The service name.
        name: String,
    },
    /// App: `enqueue(event)` opened a new streaming channel.
    Enqueue {
        /// The new channel.
        channel: u64,
        /// The event (handler) name.
        event: String,
    },
    /// App: `info()` on a new channel.
    Info {
        /// The channel to answer on.
        channel: u64,
    },
    /// App: `control()` opened a channel for population sizes.
    Control {
        /// The new channel.
        channel: u64,
    },
    /// `chunk(n)` on an open `control` channel: keep `n` workers running.
    Population {
        /// The channel.
        channel: u64,
        /// Workers to keep.
        workers: usize,
    },
    /// A chunk from the client on an open `enqueue` channel.
    Write {
        /// The channel.
        channel: u64,
        /// The chunk (`bin`/`str` as is; any other value as its MessagePack encoding).
        data: Bytes,
    },
    /// The client closed its side of an `enqueue` channel.
    Close {
        /// The channel.
        channel: u64,
    },
    /// The client ended its side of an `enqueue` channel with an error.
    Error {
        /// The channel.
        channel: u64,
        /// Error category.
        category: i64,
        /// Error code.
        code: i64,
        /// Text.
        message: String,
    },
}

/// The outcome of one client frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Something to do.
    Request(Request),
    /// Nothing to do but send these bytes back (an error answer on the frame's channel).
    Reply(Bytes),
    /// Nothing to do: a message on a channel that is already finished (or its client side is).
    Ignored,
}

#[derive(Debug, Clone, Copy)]
struct Channel {
    /// The client may still send on it (an open `enqueue` stream or a `control` channel).
    client_open: bool,
    /// A `control` channel (the control protocol, not the streaming one).
    control: bool,
}

/// One connection's channel table: turns client frames into [`Request`]s, enforces increasing
/// channel ids and the bound on open channels, and answers misuse with errors.
///
/// A channel is open from its invocation until the driver reports the service's side finished
/// ([`Dispatch::finished`]); after that, anything the client still sends on it is ignored.
#[derive(Debug)]
pub struct Dispatch {
    api: Api,
    max_channels: usize,
    last_channel: u64,
    channels: HashMap<u64, Channel>,
    draining: bool,
}

impl Dispatch {
    /// A table for a connection serving `api`, with at most `max_channels` open at once.
    pub fn new(api: Api, max_channels: usize) -> Self {
        Dispatch { api, max_channels, last_channel: 0, channels: HashMap::new(), draining: false }
    }

    /// Open channels.
    pub fn open_channels(&self) -> usize {
        self.channels.len()
    }

    /// Refuses new channels from now on (shutdown); open sessions go on, `control` channels
    /// (which never finish on the service's side) end now.
    pub fn drain(&mut self) {
        self.draining = true;
        self.channels.retain(|_, c| !c.control);
    }

    /// The service's side of `channel` is done (a value, an error or a close was sent).
    pub fn finished(&mut self, channel: u64) {
        self.channels.remove(&channel);
    }

    /// Interprets one frame from the client.
    pub fn handle(&mut self, frame: Frame) -> Input {
        let Frame { channel, kind, args, .. } = frame;
        if channel > self.last_channel {
            self.last_channel = channel;
            return self.open(channel, kind, args);
        }
        let Some(state) = self.channels.get_mut(&channel) else { return Input::Ignored };
        if !state.client_open {
            return Input::Ignored;
        }
        if state.control {
            return match (kind, args.first().and_then(Value::as_u64)) {
                (control::CHUNK, Some(n)) => {
                    Input::Request(Request::Population { channel, workers: usize::try_from(n).unwrap_or(usize::MAX) })
                }
                (control::CHUNK, None) => Input::Reply(encode_error(
                    channel,
                    errors::DISPATCH,
                    errors::INVALID_ARGUMENT,
                    "chunk takes the number of workers to keep, an integer >= 0",
                )),
                (other, _) => {
                    state.client_open = false;
                    Input::Reply(encode_error(
                        channel,
                        errors::DISPATCH,
                        errors::UNKNOWN_METHOD,
                        &format!("message type {other} is not part of the control protocol (0 chunk)"),
                    ))
                }
            };
        }
        let mut args = args.into_iter();
        match kind {
            stream::WRITE => {
                let data = args.next().map(payload).unwrap_or_default();
                Input::Request(Request::Write { channel, data })
            }
            stream::ERROR => {
                state.client_open = false;
                let (category, code) = match args.next() {
                    Some(Value::Array(pair)) => (
                        pair.first().and_then(Value::as_i64).unwrap_or(0),
                        pair.get(1).and_then(Value::as_i64).unwrap_or(0),
                    ),
                    Some(v) => (0, v.as_i64().unwrap_or(0)),
                    None => (0, 0),
                };
                let message = args.next().and_then(|v| text(&v)).unwrap_or_default();
                Input::Request(Request::Error { channel, category, code, message })
            }
            stream::CLOSE => {
                state.client_open = false;
                Input::Request(Request::Close { channel })
            }
            other => {
                // Not in the streaming graph: the stream cannot go on.
                state.client_open = false;
                Input::Reply(encode_error(
                    channel,
                    errors::DISPATCH,
                    errors::UNKNOWN_METHOD,
                    &format!("message type {other} is not part of the stream protocol (0 write, 1 error, 2 close)"),
                ))
            }
        }
    }

    fn open(&mut self, channel: u64, kind: u64, args: Vec<Value>) -> Input {
        let refuse = |code: i64, text: String| Input::Reply(encode_error(channel, errors::DISPATCH, code, &text));
        if self.draining {
            return refuse(errors::SHUTTING_DOWN, "the node is shutting down; try another node or later".into());
        }
        if self.channels.len() >= self.max_channels {
            return refuse(
                errors::TOO_MANY_CHANNELS,
                format!("{} channels are open on this connection; finish some first", self.max_channels),
            );
        }
        let first = args.first().and_then(text);
        let request = match (self.api, kind) {
            (Api::Locator, locator_method::RESOLVE) => match first {
                Some(name) => (Request::Resolve { channel, name }, false),
                None => return refuse(errors::INVALID_ARGUMENT, "resolve takes the service name".into()),
            },
            (Api::App, app_method::ENQUEUE) => match first {
                Some(event) => (Request::Enqueue { channel, event }, true),
                None => return refuse(errors::INVALID_ARGUMENT, "enqueue takes the event name".into()),
            },
            (Api::App, app_method::INFO) => (Request::Info { channel }, false),
            (Api::App, app_method::CONTROL) => (Request::Control { channel }, true),
            (api, other) => {
                let known = match api {
                    Api::Locator => "0 resolve",
                    Api::App => "0 enqueue, 1 info, 2 control",
                };
                return refuse(errors::UNKNOWN_METHOD, format!("no method {other}; this service has {known}"));
            }
        };
        let (request, client_open) = request;
        let control = matches!(request, Request::Control { .. });
        self.channels.insert(channel, Channel { client_open, control });
        Input::Request(request)
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        Value::Binary(b) => Some(String::from_utf8_lossy(b).into_owned()),
        _ => None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Decoder, Role, DEFAULT_MAX_MESSAGE_BYTES};

    fn frame(channel: u64, kind: u64, args: Vec<Value>) -> Frame {
        Frame { channel, kind, args, headers: Vec::new() }
    }

    fn decode(bytes: &Bytes) -> Value {
        rmpv::decode::read_value(&mut &bytes[..]).unwrap()
    }

    fn error_of(input: &Input) -> (u64, i64, i64) {
        let Input::Reply(b) = input else { panic!("not a reply: {input:?}") };
        let v = decode(b);
        let a = v.as_array().unwrap();
        assert_eq!(a[1].as_u64(), Some(stream::ERROR));
        let pair = a[2][0].as_array().unwrap();
        (a[0].as_u64().unwrap(), pair[0].as_i64().unwrap(), pair[1].as_i64().unwrap())
    }

    #[test]
    fn app_graph_has_integer_keys_and_streaming_enqueue() {
        let g = Api::App.graph();
        let Value::Map(entries) = &g else { panic!() };
        assert!(entries.iter().all(|(k, _)| k.is_u64()));
        let enqueue = &entries[0].1;
        assert_eq!(enqueue[0].as_str(), Some("enqueue"));
        assert_eq!(enqueue[1], streaming_graph());
        assert_eq!(enqueue[2], streaming_graph());
        // write is recursive (nil), error and close end the stream ({}).
        assert_eq!(streaming_graph().to_string(), r#"{0: ["write", nil], 1: ["error", {}], 2: ["close", {}]}"#);
        assert_eq!(entries[1].1.to_string(), r#"["info", {}, {0: ["value", {}], 1: ["error", {}]}]"#);
        assert_eq!(entries[2].1.to_string(), r#"["control", {0: ["chunk", nil]}, {}]"#);
    }

    #[test]
    fn control_takes_population_sizes_until_the_connection_ends() {
        let mut d = Dispatch::new(Api::App, 8);
        assert_eq!(d.handle(frame(1, app_method::CONTROL, vec![])), Input::Request(Request::Control { channel: 1 }));
        assert_eq!(
            d.handle(frame(1, control::CHUNK, vec![Value::from(3)])),
            Input::Request(Request::Population { channel: 1, workers: 3 })
        );
        assert_eq!(
            d.handle(frame(1, control::CHUNK, vec![Value::from(0)])),
            Input::Request(Request::Population { channel: 1, workers: 0 })
        );
        // Not a count: refused, the channel stays usable.
        let bad = d.handle(frame(1, control::CHUNK, vec![Value::from(-2)]));
        assert_eq!(error_of(&bad), (1, errors::DISPATCH, errors::INVALID_ARGUMENT));
        assert_eq!(
            d.handle(frame(1, control::CHUNK, vec![Value::from(1)])),
            Input::Request(Request::Population { channel: 1, workers: 1 })
        );
        // Draining ends control channels at once: they never finish on the service's side.
        let mut draining = Dispatch::new(Api::App, 8);
        draining.handle(frame(1, app_method::CONTROL, vec![]));
        draining.handle(frame(2, app_method::ENQUEUE, vec![Value::from("echo")]));
        draining.drain();
        assert_eq!(draining.open_channels(), 1);
        // Another message type ends the client's side.
        assert_eq!(error_of(&d.handle(frame(1, 5, vec![]))), (1, errors::DISPATCH, errors::UNKNOWN_METHOD));
        assert_eq!(d.handle(frame(1, control::CHUNK, vec![Value::from(2)])), Input::Ignored);
    }

    #[test]
    fn encodings_match_the_protocol() {
        assert_eq!(&encode_close(3)[..], &[0x93, 0x03, 0x02, 0x90]);
        assert_eq!(&encode_write(1, b"hi")[..], &[0x93, 0x01, 0x00, 0x91, 0xc4, 2, b'h', b'i']);
        let e = decode(&encode_error(5, errors::LOCATOR, errors::SERVICE_NOT_AVAILABLE, "no"));
        assert_eq!(e.to_string(), r#"[5, 1, [[10, 1], "no"]]"#);
        let v = decode(&encode_value(1, &resolve_answer(&[("127.0.0.1".into(), 4000)], Value::Map(vec![]))));
        assert_eq!(v.to_string(), r#"[1, 0, [[["127.0.0.1", 4000]], 1, {}]]"#);
        // The codec of the worker protocol reads these frames.
        let mut buf = BytesMut::from(&encode_close(9)[..]);
        let f = Decoder::new(Role::Engine, DEFAULT_MAX_MESSAGE_BYTES).decode_frame(&mut buf).unwrap().unwrap();
        assert_eq!((f.channel, f.kind), (9, stream::CLOSE));
    }

    #[test]
    fn locator_resolves_and_refuses_misuse() {
        let mut d = Dispatch::new(Api::Locator, 8);
        assert_eq!(
            d.handle(frame(1, 0, vec![Value::from("echo")])),
            Input::Request(Request::Resolve { channel: 1, name: "echo".into() })
        );
        assert_eq!(d.open_channels(), 1);
        d.finished(1);
        assert_eq!(d.open_channels(), 0);
        assert_eq!(error_of(&d.handle(frame(2, 0, vec![]))), (2, errors::DISPATCH, errors::INVALID_ARGUMENT));
        assert_eq!(error_of(&d.handle(frame(3, 6, vec![]))), (3, errors::DISPATCH, errors::UNKNOWN_METHOD));
        // A name given as bin is accepted too (Python 3 bytes).
        assert_eq!(
            d.handle(frame(4, 0, vec![Value::Binary(b"x".to_vec())])),
            Input::Request(Request::Resolve { channel: 4, name: "x".into() })
        );
        // A resolve has no client stream: more messages on its channel are ignored.
        assert_eq!(d.handle(frame(4, 0, vec![Value::from("y")])), Input::Ignored);
    }

    #[test]
    fn enqueue_streams_until_the_client_closes() {
        let mut d = Dispatch::new(Api::App, 8);
        assert_eq!(
            d.handle(frame(1, 0, vec![Value::from("echo")])),
            Input::Request(Request::Enqueue { channel: 1, event: "echo".into() })
        );
        assert_eq!(
            d.handle(frame(1, 0, vec![Value::from("a")])),
            Input::Request(Request::Write { channel: 1, data: Bytes::from_static(b"a") })
        );
        assert_eq!(d.handle(frame(2, 1, vec![])), Input::Request(Request::Info { channel: 2 }));
        assert_eq!(
            d.handle(frame(1, 0, vec![Value::Binary(vec![0, 1])])),
            Input::Request(Request::Write { channel: 1, data: Bytes::from_static(&[0, 1]) })
        );
        assert_eq!(d.handle(frame(1, 2, vec![])), Input::Request(Request::Close { channel: 1 }));
        assert_eq!(d.handle(frame(1, 0, vec![Value::from("late")])), Input::Ignored);
        assert_eq!(d.open_channels(), 2);
        d.finished(1);
        d.finished(2);
        assert_eq!(d.open_channels(), 0);
        // Channel ids never go back: an old id is a finished channel.
        assert_eq!(d.handle(frame(1, 0, vec![Value::from("echo")])), Input::Ignored);
    }

    #[test]
    fn client_errors_are_forwarded_and_end_the_client_side() {
        let mut d = Dispatch::new(Api::App, 8);
        d.handle(frame(7, 0, vec![Value::from("e")]));
        let err = vec![Value::Array(vec![Value::from(3), Value::from(4)]), Value::from("stop")];
        assert_eq!(
            d.handle(frame(7, 1, err)),
            Input::Request(Request::Error { channel: 7, category: 3, code: 4, message: "stop".into() })
        );
        assert_eq!(d.handle(frame(7, 2, vec![])), Input::Ignored);
        d.handle(frame(8, 0, vec![Value::from("e")]));
        assert_eq!(error_of(&d.handle(frame(8, 9, vec![]))), (8, errors::DISPATCH, errors::UNKNOWN_METHOD));
        assert_eq!(d.handle(frame(8, 0, vec![Value::from("x")])), Input::Ignored);
    }

    #[test]
    fn open_channels_are_bounded_and_draining_refuses_new_ones() {
        let mut d = Dispatch::new(Api::App, 2);
        d.handle(frame(1, 0, vec![Value::from("e")]));
        d.handle(frame(2, 1, vec![]));
        assert_eq!(error_of(&d.handle(frame(3, 1, vec![]))), (3, errors::DISPATCH, errors::TOO_MANY_CHANNELS));
        d.finished(2);
        assert_eq!(d.handle(frame(4, 1, vec![])), Input::Request(Request::Info { channel: 4 }));
        d.drain();
        assert_eq!(error_of(&d.handle(frame(5, 1, vec![]))), (5, errors::DISPATCH, errors::SHUTTING_DOWN));
        // Open channels go on while draining.
        assert_eq!(d.handle(frame(1, 2, vec![])), Input::Request(Request::Close { channel: 1 }));
    }
}
