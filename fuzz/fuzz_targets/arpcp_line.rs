//! Fuzzes the arpcp line codec (`nodus_tasks::arpcp`, seed 004): one JSON request line in, one
//! JSON answer line out.
//!
//! Input: the line (without its line ending), read both as a request and as an answer.
//! Asserts: `decode_request` is total and bounded (it allocates within `allocation_bound` of
//! the line's size) and refuses with a code of the seed's refusals and a description; a request
//! it decodes encodes (in every accepted version) to one line ending in `\r\n` that decodes to
//! the same request; an answer (the refusal, or what `Answer::decode` reads from the line)
//! encodes to one line ending in `\r\n` that `Answer::decode` reads back to the same code,
//! description and data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodus_fuzz::{alloc::peak_during, allocation_bound};
use nodus_tasks::arpcp::{decode_request, encode_request, Answer, Code, VERSIONS};
use serde_json::Value;

/// The codes `decode_request` may refuse with (the others belong to the service).
const REFUSALS: [Code; 6] =
    [Code::Malformed, Code::UnknownMethod, Code::MissingField, Code::BadArguments, Code::UnknownTask, Code::Version];

/// The line an encoder wrote, without its `\r\n`, which must be there and be its only break.
fn one_line(out: &[u8]) -> &[u8] {
    let line =
        out.strip_suffix(b"\r\n").unwrap_or_else(|| panic!("no CRLF at the end of {:?}", String::from_utf8_lossy(out)));
    assert!(!line.contains(&b'\n') && !line.contains(&b'\r'), "a line break inside {:?}", String::from_utf8_lossy(out));
    line
}

fn data(a: &Answer) -> Value {
    serde_json::from_str(a.data.get()).unwrap_or_else(|e| panic!("answer data {:?} is not JSON: {e}", a.data.get()))
}

/// `Answer::decode(encode(a))` reads `a`.
fn answer_round_trip(a: &Answer) {
    let mut out = Vec::new();
    a.encode(&mut out);
    let back = Answer::decode(one_line(&out)).unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&out)));
    assert_eq!((back.code, &back.description), (a.code, &a.description), "answer round trip");
    assert_eq!(data(&back), data(a), "answer data round trip");
}

fuzz_target!(|line: &[u8]| {
    let (decoded, peak) = peak_during(|| decode_request(line));
    assert!(peak <= allocation_bound(line.len()), "decoding a {}-byte line held {peak} bytes", line.len());
    match decoded {
        Ok(request) => {
            for version in VERSIONS {
                let mut out = Vec::new();
                encode_request(&request, version, &mut out);
                assert_eq!(decode_request(one_line(&out)).as_ref().ok(), Some(&request), "request round trip");
            }
        }
        Err(refusal) => {
            assert!(REFUSALS.contains(&refusal.code), "refused with {}", refusal.code);
            assert!(!refusal.description.is_empty(), "a refusal without a description");
            answer_round_trip(&refusal);
        }
    }
    if let Ok(answer) = Answer::decode(line) {
        answer_round_trip(&answer);
    }
});
