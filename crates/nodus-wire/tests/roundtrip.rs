//! Property tests: every message survives both codecs, and no input makes a decoder panic.

use bytes::BytesMut;
use nodus_wire::node::Permissions;
use nodus_wire::{binary, text, Address, Decoded, Envelope, Message};
use proptest::prelude::*;
use std::collections::BTreeMap;

fn name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_.*?-]{1,12}"
}

fn address() -> impl Strategy<Value = Address> {
    (prop_oneof![Just(String::new()), name()], name()).prop_map(|(server, service)| Address { server, service })
}

fn message() -> impl Strategy<Value = Message> {
    (
        "[A-Z][A-Z0-9_]{0,15}",
        prop_oneof![Just(Address::default()), (name(), name()).prop_map(|(a, b)| Address::new(a, b))],
        prop_oneof![Just(Address::default()), address()],
        proptest::collection::btree_map("[A-Za-z][A-Za-z0-9_]{0,8}", any::<String>(), 0..6),
        proptest::collection::vec(any::<u8>(), 0..64),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<String>(), any::<i64>(), any::<i64>(), any::<u32>()),
        (0u8..32).prop_map(|b| Permissions::from_bits(b).unwrap_or_default()),
    )
        .prop_map(
            |(
                command,
                from,
                to,
                params,
                payload,
                (id, pid, reply_to, creator, created_at, expires_at, hops),
                perms,
            )| {
                Message {
                    command,
                    from,
                    to,
                    params: params.into_iter().collect::<BTreeMap<_, _>>(),
                    payload: payload.into(),
                    envelope: Envelope { id, pid, reply_to, creator, created_at, expires_at, hops, perms },
                }
            },
        )
}

proptest! {
    #[test]
    fn text_round_trip(msg in message()) {
        let line = text::to_line(&msg);
        prop_assert!(!line.contains('\n'));
        prop_assert_eq!(text::from_line(&line).unwrap(), msg.clone());
        let mut buf = BytesMut::new();
        text::encode(&msg, &mut buf);
        let got = text::LineDecoder::new(1 << 20).decode(&mut buf).unwrap();
        prop_assert_eq!(got, Some(Decoded::Message(msg)));
    }

    #[test]
    fn binary_round_trip(msg in message()) {
        let mut buf = BytesMut::from(&binary::PREFACE[..]);
        binary::encode(&msg, &mut buf, 1 << 20).unwrap();
        let got = binary::FrameDecoder::new(1 << 20).decode(&mut buf).unwrap();
        prop_assert_eq!(got, Some(Decoded::Message(msg)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn text_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = BytesMut::from(&bytes[..]);
        let mut d = text::LineDecoder::new(256);
        while let Ok(Some(_)) = d.decode(&mut buf) {}
    }

    #[test]
    fn text_lines_of_symbols_never_panic(line in "[<>:/ =;\"\\\\a-zA-Z0-9_]{0,80}") {
        let _ = text::from_line(&line);
    }

    #[test]
    fn binary_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = BytesMut::from(&bytes[..]);
        let mut d = binary::FrameDecoder::without_preface(256);
        while let Ok(Some(_)) = d.decode(&mut buf) {}
        let mut buf = BytesMut::from(&bytes[..]);
        let mut d = binary::FrameDecoder::new(256);
        while let Ok(Some(_)) = d.decode(&mut buf) {}
    }

    #[test]
    fn mutated_frames_never_panic(msg in message(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let mut buf = BytesMut::new();
        binary::encode(&msg, &mut buf, 1 << 20).unwrap();
        for (i, b) in flips {
            let n = buf.len();
            buf[4 + i % (n - 4)] ^= b;
        }
        let _ = binary::FrameDecoder::without_preface(1 << 20).decode(&mut buf);
    }
}
