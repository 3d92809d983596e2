//! Fuzzes the typed reply rows (`nodus_wire::rows`) the client SDK and the CLI read from the
//! node's list replies and the crashlog.
//!
//! Input: byte 0 is the row kind (mod 7): `AppRow`, `WorkerRow`, `NodeRow`, `LinkRow`,
//! `ServiceAt` lists (`parse_list`), `CrashRecord::parse_all` (a crashlog payload), one
//! `CrashRecord`; the rest is the text (UTF-8, invalid sequences replaced).
//! Asserts: every parser is total; a row parsed from the text displays as text that parses back
//! to it (`parse(display(r)) == r`; for `LinkRow`, whose `phi` is printed with two decimals,
//! the text it displays is a fixed point instead); a parsed list joins to text that parses back
//! to the same rows, and a parsed crashlog prints back to the same records.
#![no_main]

use std::fmt::{Debug, Display};
use std::str::FromStr;

use libfuzzer_sys::fuzz_target;
use nodus_wire::rows::{join_list, parse_list, AppRow, CrashRecord, LinkRow, NodeRow, RowError, ServiceAt, WorkerRow};

/// `parse(display(r)) == r` for every row of the list, and for the joined list.
fn exact<T: FromStr<Err = RowError> + Display + PartialEq + Debug>(text: &str) {
    let Ok(rows) = parse_list::<T>(text) else { return };
    for r in &rows {
        let shown = r.to_string();
        assert_eq!(shown.parse::<T>().as_ref(), Ok(r), "row round trip through {shown:?}");
    }
    let joined = join_list(&rows);
    assert_eq!(parse_list::<T>(&joined).as_ref(), Ok(&rows), "list round trip through {joined:?}");
}

/// For rows that display rounded: the displayed text parses to a row that displays the same.
fn fixed_point<T: FromStr<Err = RowError> + Display + Debug>(text: &str) {
    let Ok(rows) = parse_list::<T>(text) else { return };
    for r in &rows {
        let shown = r.to_string();
        let back: T =
            shown.parse().unwrap_or_else(|e| panic!("{r:?} displays as {shown:?}, which does not parse: {e}"));
        assert_eq!(back.to_string(), shown, "row text is not a fixed point");
    }
    let joined = join_list(&rows);
    let back = parse_list::<T>(&joined).unwrap_or_else(|e| panic!("joined rows {joined:?} do not parse: {e}"));
    assert_eq!(join_list(&back), joined, "list text is not a fixed point");
}

fn link_rows(text: &str) {
    fixed_point::<LinkRow>(text);
    // Everything but phi is exact.
    if let Ok(rows) = parse_list::<LinkRow>(text) {
        for r in &rows {
            let back: LinkRow = r.to_string().parse().expect("checked above");
            assert_eq!((&back.peer, back.rtt_ms, back.offset_ms), (&r.peer, r.rtt_ms, r.offset_ms), "link row");
        }
    }
}

fn crashlog(text: &str) {
    let Ok(records) = CrashRecord::parse_all(text) else { return };
    let shown: String = records.iter().map(ToString::to_string).collect();
    assert_eq!(CrashRecord::parse_all(&shown).as_ref(), Ok(&records), "crashlog round trip through {shown:?}");
    for r in &records {
        let one = r.to_string();
        assert_eq!(one.parse::<CrashRecord>().as_ref(), Ok(r), "crash record round trip through {one:?}");
    }
}

fn crash_record(text: &str) {
    let Ok(r) = text.parse::<CrashRecord>() else { return };
    let shown = r.to_string();
    assert_eq!(shown.parse::<CrashRecord>().as_ref(), Ok(&r), "crash record round trip through {shown:?}");
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(rest);
    match kind % 7 {
        0 => exact::<AppRow>(&text),
        1 => exact::<WorkerRow>(&text),
        2 => exact::<NodeRow>(&text),
        3 => link_rows(&text),
        4 => exact::<ServiceAt>(&text),
        5 => crashlog(&text),
        _ => crash_record(&text),
    }
});
