//! Fuzzes the client-facing Cocaine service protocol: frames decoded from the stream
//! (`Decoder::decode_frame`) go through one connection's channel table
//! (`nodus_engine::service::Dispatch`), interleaved with the driver's `finished` and `drain`.
//!
//! Input: byte 0 picks the API (bit 0: app, else locator) and the channel bound (bits 1-3,
//! 1..=8); byte 1 is the number N of driver operations that follow; the N bytes after it are
//! the operations, applied in turn after each frame (low two bits: 0 nothing, 1 the frame's
//! channel finished, 2 some open channel finished, 3 with every bit set: drain); the rest is
//! the stream.
//! Asserts, against a model of the channel table: no panic; open channels never exceed the
//! bound; a new channel only opens above every channel used before, and not while draining;
//! stream messages (write, close, error, population) come only on channels whose client side is
//! open, of the right kind; nothing on a new channel is ignored; every error answer is a
//! well-formed `[channel, 1, [[11, code], text]]` on the frame's channel; the encoders' frames
//! decode back to what they were given.
#![no_main]

use std::collections::BTreeMap;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nodus_engine::protocol::{Decoder, Frame, Role};
use nodus_engine::service::{
    encode_close, encode_error, encode_value, encode_write, errors, stream, Api, Dispatch, Input, Request,
};
use nodus_fuzz::{alloc::peak_during, allocation_bound};
use rmpv::Value;

/// Bound on one message of the connection under test.
const MAX_MESSAGE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `enqueue`: a stream both ways.
    Stream,
    /// `control`: population sizes from the client.
    Control,
    /// `resolve` or `info`: one answer, nothing more from the client.
    Once,
}

/// What the channel table should hold, kept by hand.
#[derive(Debug, Default)]
struct Model {
    last: u64,
    draining: bool,
    /// Open channels: their kind and whether the client may still send on them.
    open: BTreeMap<u64, (Kind, bool)>,
}

fn one_frame(bytes: &[u8]) -> Frame {
    let mut buf = BytesMut::from(bytes);
    let frame = Decoder::new(Role::Engine, usize::MAX).decode_frame(&mut buf);
    let frame = frame.unwrap_or_else(|e| panic!("an encoder's frame does not decode: {e}: {bytes:x?}"));
    assert!(buf.is_empty(), "an encoder's frame has trailing bytes");
    frame.expect("an encoder's frame is complete")
}

/// The encoders' frames decode back to what they were given.
fn check_encoders(frame: &Frame) {
    let ch = frame.channel;
    let value = one_frame(&encode_value(ch, &frame.args));
    assert_eq!((value.channel, value.kind), (ch, 0));
    // Compared as bytes: a NaN float is not equal to itself as a value.
    assert_eq!(encode_value(ch, &value.args), encode_value(ch, &frame.args), "value args changed");
    let chunk = format!("{:?}", frame.args).into_bytes();
    let write = one_frame(&encode_write(ch, &chunk));
    assert_eq!((write.channel, write.kind, write.args), (ch, stream::WRITE, vec![Value::Binary(chunk)]));
    let close = one_frame(&encode_close(ch));
    assert_eq!((close.channel, close.kind, close.args.len()), (ch, stream::CLOSE, 0));
    let (category, code) = (frame.kind as i64, frame.headers.len() as i64);
    let error = one_frame(&encode_error(ch, category, code, "text"));
    let expected = vec![Value::Array(vec![Value::from(category), Value::from(code)]), Value::from("text")];
    assert_eq!((error.channel, error.kind, error.args), (ch, stream::ERROR, expected));
}

/// Checks an error answer; returns its code.
fn error_code(bytes: &[u8], channel: u64) -> i64 {
    let f = one_frame(bytes);
    assert_eq!((f.channel, f.kind), (channel, stream::ERROR), "error answer on the wrong channel or type");
    assert_eq!(f.args.len(), 2, "an error answer is [[category, code], text]");
    let pair = f.args[0].as_array().expect("[category, code]");
    assert_eq!(pair[0].as_i64(), Some(errors::DISPATCH));
    assert!(f.args[1].is_str(), "the error text is a string");
    pair[1].as_i64().expect("an integer code")
}

fn check(model: &mut Model, frame: &Frame, input: &Input, max_channels: usize) {
    let ch = frame.channel;
    let new = ch > model.last;
    if new {
        model.last = ch;
    }
    match input {
        Input::Ignored => {
            assert!(!new, "a new channel {ch} was ignored");
            assert!(!model.open.get(&ch).is_some_and(|c| c.1), "a message on open channel {ch} was ignored");
        }
        Input::Reply(bytes) => {
            let code = error_code(bytes, ch);
            if new {
                let expected_full = model.open.len() >= max_channels;
                match code {
                    errors::SHUTTING_DOWN => assert!(model.draining),
                    errors::TOO_MANY_CHANNELS => assert!(!model.draining && expected_full),
                    errors::UNKNOWN_METHOD | errors::INVALID_ARGUMENT => assert!(!model.draining && !expected_full),
                    other => panic!("unexpected error code {other} on a new channel"),
                }
            } else {
                let state = model.open.get_mut(&ch).expect("an answer on a channel that is not open");
                assert!(state.1, "an answer to a message on a channel closed by the client");
                match (state.0, code) {
                    (_, errors::UNKNOWN_METHOD) => state.1 = false,
                    (Kind::Control, errors::INVALID_ARGUMENT) => {}
                    (kind, code) => panic!("unexpected error code {code} on an open {kind:?} channel"),
                }
            }
        }
        Input::Request(r) => {
            let opened = match r {
                Request::Resolve { channel, .. } | Request::Info { channel } => Some((*channel, Kind::Once)),
                Request::Enqueue { channel, .. } => Some((*channel, Kind::Stream)),
                Request::Control { channel } => Some((*channel, Kind::Control)),
                _ => None,
            };
            if let Some((channel, kind)) = opened {
                assert_eq!(channel, ch);
                assert!(new, "channel {ch} opened although it is not above every channel before");
                assert!(!model.draining, "channel {ch} opened while draining");
                assert!(model.open.len() < max_channels, "channel {ch} opened past the bound {max_channels}");
                model.open.insert(ch, (kind, kind != Kind::Once));
                return;
            }
            let (channel, kind, closes) = match r {
                Request::Write { channel, .. } => (*channel, Kind::Stream, false),
                Request::Close { channel } | Request::Error { channel, .. } => (*channel, Kind::Stream, true),
                Request::Population { channel, .. } => (*channel, Kind::Control, false),
                _ => unreachable!(),
            };
            assert_eq!(channel, ch);
            assert!(!new, "a stream message opened channel {ch}");
            let state = model.open.get_mut(&ch).expect("a stream message on a channel that is not open");
            assert_eq!(state.0, kind, "{r:?} on a {:?} channel", state.0);
            assert!(state.1, "{r:?} on a channel the client closed");
            if closes {
                state.1 = false;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let [config, n_ops, rest @ ..] = data else { return };
    let api = if config & 1 != 0 { Api::App } else { Api::Locator };
    let max_channels = usize::from((config >> 1) & 7) + 1;
    let (ops, stream) = rest.split_at(usize::from(*n_ops).min(rest.len()));
    let mut dispatch = Dispatch::new(api, max_channels);
    let mut model = Model::default();
    let mut decoder = Decoder::new(Role::Engine, MAX_MESSAGE);
    let mut buf = BytesMut::from(stream);
    for step in 0.. {
        let (frame, peak) = peak_during(|| decoder.decode_frame(&mut buf));
        assert!(peak <= allocation_bound(MAX_MESSAGE), "one decode held {peak} bytes (bound {MAX_MESSAGE})");
        let Ok(Some(frame)) = frame else { break };
        check_encoders(&frame);
        let input = dispatch.handle(frame.clone());
        check(&mut model, &frame, &input, max_channels);
        if let Some(&op) = ops.get(step % ops.len().max(1)) {
            match op & 3 {
                1 => {
                    dispatch.finished(frame.channel);
                    model.open.remove(&frame.channel);
                }
                2 if !model.open.is_empty() => {
                    let ch = *model.open.keys().nth(usize::from(op >> 2) % model.open.len()).expect("an open channel");
                    dispatch.finished(ch);
                    model.open.remove(&ch);
                }
                3 if op == 0xff => {
                    dispatch.drain();
                    model.draining = true;
                    model.open.retain(|_, c| c.0 != Kind::Control);
                }
                _ => {}
            }
        }
        assert_eq!(dispatch.open_channels(), model.open.len(), "open channels differ from the model");
        assert!(dispatch.open_channels() <= max_channels);
    }
});
