//! Fuzzes the control plane's decoders (`nodus_control`): control messages
//! (`ControlMessage::from_message`), their tags (`Tag::from_str`) and component ids.
//!
//! Input: byte 0 is the mode (low two bits): 0 the rest is a text line, 1 a binary frame body,
//! both decoded to a `Message` and read as a control message; 2 the rest is a tag; 3 a component
//! id.
//! Asserts: no panic; a control message read from the wire writes back to a message that reads
//! the same (directly and through the text form), and its tag parses back to itself; an error
//! stays short whatever the input's size (values are clipped); a tag or id that parses prints
//! back to text that parses to it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodus_control::{ComponentId, ControlMessage, Tag};
use nodus_fuzz::wire::message_from;
use nodus_wire::text;

/// Longest error text a control decoder may produce: its parts are clipped to 64 bytes, command
/// names are at most 255.
const MAX_ERROR_TEXT: usize = 1024;

fn check_control(m: &nodus_wire::Message) {
    match ControlMessage::from_message(m) {
        Ok(c) => {
            let wire = c.to_message();
            assert_eq!(ControlMessage::from_message(&wire).as_ref(), Ok(&c), "control round trip of {m:?}");
            let line = text::to_line(&wire);
            let back = text::from_line(&line).expect("a control message writes a valid line");
            assert_eq!(ControlMessage::from_message(&back).as_ref(), Ok(&c), "control round trip through {line:?}");
            let tag = c.tag();
            assert_eq!(tag.to_string().parse::<Tag>().as_ref(), Ok(&tag), "tag round trip");
        }
        Err(e) => {
            let text = e.to_string();
            assert!(text.len() <= MAX_ERROR_TEXT, "an error of {} bytes: {text:?}", text.len());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode & 3 {
        0 | 1 => {
            if let Some(m) = message_from(mode, rest) {
                check_control(&m);
            }
        }
        2 => {
            let Ok(s) = std::str::from_utf8(rest) else { return };
            match s.parse::<Tag>() {
                Ok(tag) => assert_eq!(tag.to_string().parse::<Tag>().as_ref(), Ok(&tag), "tag round trip of {s:?}"),
                Err(e) => assert!(e.to_string().len() <= MAX_ERROR_TEXT, "an error of {} bytes", e.to_string().len()),
            }
        }
        _ => {
            let Ok(s) = std::str::from_utf8(rest) else { return };
            if let Ok(id) = s.parse::<ComponentId>() {
                assert_ne!(id.get(), 0, "zero is never a component");
                assert_eq!(id.to_string().parse::<ComponentId>(), Ok(id), "id round trip of {s:?}");
            }
        }
    }
});
