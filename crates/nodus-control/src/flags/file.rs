//! The flag file format: the reference's `name=value` lines with its field names, one file per
//! flag. Values escape backslash, newline and carriage return (`\\`, `\n`, `\r`) so a multi-line
//! message stays on one line. Pure: text in, text out.
//!
//! ```text
//! # nodus flag nodus/links/neighbour-unreachable: written by nodus, do not edit
//! unit=nodus
//! section=links
//! name=neighbour-unreachable
//! message=node b has been unreachable for 5 minutes
//! priority=50
//! manual_down=no
//! tags=cluster,links
//! ...
//! ```

use super::{check_name, clip, Flag, FlagError, MAX_MESSAGE_BYTES, MAX_PRIORITY, MAX_SOURCE_BYTES, MAX_TAGS};
use std::collections::BTreeSet;

/// Largest flag file read back, in bytes; anything bigger is reported as a bad file.
pub const MAX_FILE_BYTES: usize = 64 * 1024;

/// Writes `flag` as file content.
pub fn encode(flag: &Flag) -> String {
    let mut out = format!("# nodus flag {}: written by nodus, do not edit\n", flag.key());
    let tags: Vec<&str> = flag.tags.iter().map(String::as_str).collect();
    let fields: [(&str, String); 15] = [
        ("unit", flag.unit.clone()),
        ("section", flag.section.clone()),
        ("name", flag.name.clone()),
        ("message", flag.message.clone()),
        ("priority", flag.priority.to_string()),
        ("manual_down", if flag.manual_down { "yes" } else { "no" }.to_string()),
        ("tags", tags.join(",")),
        ("source_file", flag.source_file.clone()),
        ("function", flag.function.clone()),
        ("line", flag.line.to_string()),
        ("date", flag.date.to_string()),
        ("modified", flag.modified.to_string()),
        ("hostname", flag.hostname.clone()),
        ("version", flag.version.clone()),
        ("count", flag.count.to_string()),
    ];
    for (k, v) in fields {
        out.push_str(k);
        out.push('=');
        for c in v.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                c => out.push(c),
            }
        }
        out.push('\n');
    }
    out
}

/// Reads file content back into a flag; `now` stands for a missing `date` or `modified` (as the
/// reference does). Unknown fields are ignored, so a newer nodus's files still load.
///
/// Fails with a reason naming the line or field: a line without `=`, a field given twice, a
/// missing `unit`/`section`/`name`/`message`, a bad name or tag, a number out of range, a text
/// too long, or content over [`MAX_FILE_BYTES`].
pub fn decode(text: &str, now: i64) -> Result<Flag, String> {
    if text.len() > MAX_FILE_BYTES {
        return Err(format!("the file is larger than {MAX_FILE_BYTES} bytes"));
    }
    let mut fields: std::collections::HashMap<&str, String> = std::collections::HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line.split_once('=').ok_or_else(|| format!("line {} has no `=`: {:?}", n + 1, clip(line)))?;
        if fields.insert(k.trim(), unescape(v)).is_some() {
            return Err(format!("field {:?} is given twice", clip(k)));
        }
    }
    let required = |k: &str| fields.get(k).cloned().ok_or_else(|| format!("field {k} is missing"));
    let name_field = |what: &'static str| -> Result<String, String> {
        check_name(what, &required(what)?).map_err(|e: FlagError| e.to_string())
    };
    let number = |k: &str| -> Result<Option<i64>, String> {
        match fields.get(k) {
            None => Ok(None),
            Some(v) => {
                v.trim().parse::<i64>().map(Some).map_err(|_| format!("field {k}={:?} is not a number", clip(v)))
            }
        }
    };
    let text_field = |k: &str, max: usize| -> Result<String, String> {
        let v = fields.get(k).cloned().unwrap_or_default();
        if v.len() > max {
            return Err(format!("field {k} is longer than {max} bytes"));
        }
        Ok(v)
    };
    let priority = number("priority")?.unwrap_or(i64::from(super::DEFAULT_PRIORITY));
    if !(0..=i64::from(MAX_PRIORITY)).contains(&priority) {
        return Err(format!("priority {priority} is outside 0..100"));
    }
    let manual_down = match fields.get("manual_down").map(String::as_str) {
        None | Some("no") | Some("false") => false,
        Some("yes") | Some("true") => true,
        Some(v) => return Err(format!("manual_down={:?} is not yes or no", clip(v))),
    };
    let mut tags = BTreeSet::new();
    for t in fields.get("tags").map(String::as_str).unwrap_or("").split([',', ' ']).filter(|t| !t.is_empty()) {
        tags.insert(check_name("tag", t).map_err(|e| e.to_string())?);
    }
    if tags.len() > MAX_TAGS {
        return Err(format!("more than {MAX_TAGS} tags"));
    }
    let line = number("line")?.unwrap_or(0);
    let count = match fields.get("count") {
        None => 1,
        Some(v) => v.trim().parse::<u64>().map_err(|_| format!("field count={:?} is not a count", clip(v)))?,
    };
    Ok(Flag {
        unit: name_field("unit")?,
        section: name_field("section")?,
        name: name_field("name")?,
        message: {
            required("message")?;
            text_field("message", MAX_MESSAGE_BYTES)?
        },
        priority: priority as u8,
        manual_down,
        tags,
        source_file: text_field("source_file", MAX_SOURCE_BYTES)?,
        function: text_field("function", MAX_SOURCE_BYTES)?,
        line: u32::try_from(line).map_err(|_| format!("line {line} is outside 0..2^32"))?,
        date: number("date")?.unwrap_or(now),
        modified: number("modified")?.unwrap_or(now),
        hostname: text_field("hostname", super::MAX_NAME_BYTES * 4)?,
        version: text_field("version", super::MAX_NAME_BYTES)?,
        count,
    })
}

fn unescape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('\\') => out.push('\\'),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag() -> Flag {
        Flag {
            unit: "nodus".into(),
            section: "links".into(),
            name: "neighbour-unreachable".into(),
            message: "node b unreachable\nsince 5 min; check C:\\path".into(),
            priority: 50,
            manual_down: true,
            tags: ["cluster".to_string(), "links".to_string()].into(),
            source_file: "src/links.rs".into(),
            function: "tick".into(),
            line: 42,
            date: 1_700_000_000_000,
            modified: 1_700_000_300_000,
            hostname: "host-a".into(),
            version: "0.1.0".into(),
            count: 3,
        }
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let text = encode(&flag());
        assert!(text.contains("\nmanual_down=yes\n") && text.contains("\ntags=cluster,links\n"), "{text}");
        assert_eq!(text.lines().filter(|l| l.starts_with("message=")).count(), 1, "one line per field");
        assert_eq!(decode(&text, 0), Ok(flag()));
    }

    #[test]
    fn reference_minimum_loads_with_defaults() {
        let f = decode("unit=Web\nsection=core\nname=x\nmessage=hi\n", 77).unwrap();
        assert_eq!(
            (f.unit.as_str(), f.priority, f.manual_down, f.date, f.modified, f.count),
            ("web", 5, false, 77, 77, 1)
        );
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let cases = [
            ("unit=a\nsection=b\nname=c\n", "field message is missing"),
            ("unit=a\nsection=b\nmessage=m\n", "field name is missing"),
            ("unit=a_b\nsection=b\nname=c\nmessage=m\n", "invalid flag unit"),
            ("garbage\n", "line 1 has no `=`"),
            ("unit=a\nunit=b\n", "given twice"),
            ("unit=a\nsection=b\nname=c\nmessage=m\npriority=101\n", "outside 0..100"),
            ("unit=a\nsection=b\nname=c\nmessage=m\npriority=x\n", "not a number"),
            ("unit=a\nsection=b\nname=c\nmessage=m\nmanual_down=maybe\n", "not yes or no"),
            ("unit=a\nsection=b\nname=c\nmessage=m\nline=-1\n", "outside 0..2^32"),
            ("unit=a\nsection=b\nname=c\nmessage=m\ntags=x_y\n", "invalid flag tag"),
        ];
        for (text, want) in cases {
            let e = decode(text, 0).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        assert!(decode(&"#".repeat(MAX_FILE_BYTES + 1), 0).unwrap_err().contains("larger than"));
    }
}
