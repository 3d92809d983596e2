//! Fuzzes the manager/worker messages of seed 002 (`nodus_tasks::cluster::Packet`), read from a
//! `nodus_wire::Message` as a node reads them off a cluster link.
//!
//! Input: byte 0 is the mode: bit 0 the form of the rest (0 a text line, 1 a binary frame
//! body), decoded to a `Message`; bits 1-5, when below 20, replace its command with that
//! protocol command (so every decoder is reached from any parameters and payload).
//! Asserts: `Packet::from_message` is total and bounded (allocates within `allocation_bound` of
//! the input); a packet it reads writes back to a valid message (through both wire forms) that
//! reads as the same packet; an error stays short whatever the input's size.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodus_fuzz::wire::{check_message, message_from};
use nodus_fuzz::{alloc::peak_during, allocation_bound};
use nodus_tasks::cluster::msg::COMMANDS;
use nodus_tasks::cluster::Packet;

/// Longest error text: names and values in errors are clipped (commands to 64 bytes).
const MAX_ERROR_TEXT: usize = 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let Some(mut m) = message_from(mode, rest) else { return };
    if let Some(command) = COMMANDS.get(usize::from((mode >> 1) & 0x1f)) {
        m.command = (*command).to_string();
    }
    let (decoded, peak) = peak_during(|| Packet::from_message(&m));
    assert!(peak <= allocation_bound(rest.len()), "decoding {} bytes held {peak} bytes", rest.len());
    match decoded {
        Ok(p) => {
            // The message it writes survives both wire forms unchanged (`check_message`).
            let wire = p.to_message();
            check_message(&wire);
            assert_eq!(Packet::from_message(&wire).as_ref(), Ok(&p), "packet round trip through {wire:?}");
        }
        Err(e) => {
            let text = e.to_string();
            assert!(text.len() <= MAX_ERROR_TEXT, "an error of {} bytes: {text:?}", text.len());
        }
    }
});
