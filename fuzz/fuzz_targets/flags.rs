//! Fuzzes the flag decoders (`nodus_control::flags`): `FLAG_*` requests and replies read from
//! messages, and flag files read back from disk.
//!
//! Input: byte 0 is the mode (low two bits): 0 the rest is a text line, 1 a binary frame body,
//! both decoded to a `Message` and read as a flag request and as a flag reply; 2 or 3 the rest is
//! the content of a flag file.
//! Asserts: no panic; a request read from the wire writes back to a message that reads the same
//! (directly and through the text form), within the flag bounds; so does a reply; a flag file
//! that loads writes back to a file that loads the same flag; errors about the input stay
//! short (values are clipped).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodus_control::flags::{file, FlagError, FlagReply, FlagRequest, MAX_MESSAGE_BYTES, MAX_PRIORITY, MAX_TAGS};
use nodus_fuzz::wire::message_from;
use nodus_wire::{text, Message};

/// Longest error text about bad input: values are clipped to 64 bytes, command names are at
/// most 255.
const MAX_ERROR_TEXT: usize = 1024;

/// The time a flag file is read at (stands for missing dates).
const NOW: i64 = 1_700_000_000_000;

fn short(what: &str, e: &str) {
    assert!(e.len() <= MAX_ERROR_TEXT, "{what} error of {} bytes: {e:?}", e.len());
}

fn check_request(m: &Message) {
    match FlagRequest::from_message(m) {
        Ok(r) => {
            if let FlagRequest::Up(raise) = &r {
                assert!(raise.priority <= MAX_PRIORITY && raise.tags.len() <= MAX_TAGS);
                assert!(raise.message.len() <= MAX_MESSAGE_BYTES);
            }
            let wire = r.to_message();
            assert_eq!(FlagRequest::from_message(&wire).as_ref(), Ok(&r), "request round trip of {m:?}");
            let line = text::to_line(&wire);
            let back = text::from_line(&line).expect("a flag request writes a valid line");
            assert_eq!(FlagRequest::from_message(&back).as_ref(), Ok(&r), "request round trip through {line:?}");
        }
        Err(e) => {
            short("request", &e.to_string());
            let reply = e.to_reply(m);
            assert!(reply.validate().is_ok(), "the error reply is not a valid message: {reply:?}");
        }
    }
}

fn check_reply(m: &Message) {
    match FlagReply::from_message(m) {
        Ok(r) => {
            let wire = r.reply_to(&Message::new("FLAG_STATUS"));
            assert_eq!(FlagReply::from_message(&wire).as_ref(), Ok(&r), "reply round trip of {m:?}");
        }
        // A refusal carries the server's own text, as long as the server made it.
        Err(FlagError::Refused { .. }) => {}
        Err(e) => short("reply", &e.to_string()),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode & 3 {
        0 | 1 => {
            if let Some(m) = message_from(mode, rest) {
                check_request(&m);
                check_reply(&m);
            }
        }
        _ => {
            let Ok(content) = std::str::from_utf8(rest) else { return };
            match file::decode(content, NOW) {
                Ok(flag) => {
                    let again = file::encode(&flag);
                    assert_eq!(file::decode(&again, NOW).as_ref(), Ok(&flag), "flag file round trip of {again:?}");
                }
                Err(e) => short("flag file", &e),
            }
        }
    }
});
