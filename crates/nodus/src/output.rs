//! The CLI's output layer: the only place that prints. Results go to stdout (human text, or JSON
//! with `--json`); notes for the person at the terminal and errors go to stderr.
//!
//! A closed stdout (the reader went away: `nodus sniff | head -1`) is not an error: the process
//! exits at once with status 0 instead of panicking on the broken pipe. Failing to write to stderr
//! is ignored.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use nodus_wire::{text, Message};
use serde_json::{json, Value};
use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Writes `bytes` to stdout; exits quietly when the reader has gone.
pub fn raw(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(bytes).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            // Nobody reads any more (`| head -1`): stop here, successfully and silently.
            std::process::exit(0);
        }
        let _ = writeln!(std::io::stderr(), "nodus: cannot write to stdout: {e}");
        std::process::exit(2);
    }
}

/// Prints a line of human output.
pub fn line(s: &str) {
    let mut text = String::with_capacity(s.len() + 1);
    text.push_str(s);
    text.push('\n');
    raw(text.as_bytes());
}

/// Prints a JSON value on one line.
pub fn json(v: &Value) {
    line(&v.to_string());
}

/// Prints a note for the person at the terminal (progress, what a long-running command is doing)
/// on stderr, so that stdout stays the command's result.
pub fn note(s: &str) {
    let _ = writeln!(std::io::stderr(), "{s}");
}

/// Prints an error for a human, on stderr.
pub fn error(s: &str) {
    let _ = writeln!(std::io::stderr(), "nodus: {s}");
}

/// Prints an error as a JSON object on stdout (`--json`): `{"ok": false, "error": ..., ...}`
/// with `extra`'s fields added.
pub fn json_error(message: &str, extra: Value) {
    let mut v = json!({"ok": false, "error": message});
    if let (Some(obj), Value::Object(more)) = (v.as_object_mut(), extra) {
        obj.extend(more);
    }
    json(&v);
}

/// A message as JSON.
pub fn message_json(m: &Message) -> Value {
    json!({
        "command": m.command,
        "from": m.from.to_string(),
        "to": m.to.to_string(),
        "params": m.params,
        "payload": String::from_utf8_lossy(&m.payload),
        "payload_len": m.payload.len(),
        "id": m.envelope.id,
        "pid": m.envelope.pid,
        "reply_to": m.envelope.reply_to,
        "creator": m.envelope.creator,
        "created_at": m.envelope.created_at,
        "expires_at": m.envelope.expires_at,
    })
}

/// Prints a message as a text line or a JSON object.
pub fn message(m: &Message, as_json: bool) {
    if as_json {
        json(&message_json(m));
    } else {
        line(&text::to_line(m));
    }
}

/// Prints a reply for a person: `from COMMAND name=value;...` (no envelope), then the payload
/// as text when it is UTF-8, else its size; or the JSON object.
pub fn reply(m: &Message, as_json: bool) {
    if as_json {
        return message(m, true);
    }
    let params: Vec<String> = m.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if params.is_empty() {
        line(&format!("{} {}", m.from, m.command));
    } else {
        line(&format!("{} {} {}", m.from, m.command, params.join(";")));
    }
    match std::str::from_utf8(&m.payload) {
        _ if m.payload.is_empty() => {}
        Ok(text) => line(text.strip_suffix('\n').unwrap_or(text)),
        Err(_) => line(&format!("({} bytes of binary payload; --json shows it)", m.payload.len())),
    }
}

/// Prints rows as a table: a header line, then one line per row, columns padded to the widest
/// cell (the last column is not padded).
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let render = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.trim_end().to_string()
    };
    line(&render(header.to_vec()));
    for row in rows {
        line(&render(row.iter().map(String::as_str).collect()));
    }
}

/// A progress line on stderr for a long operation: on a terminal one line rewritten in place,
/// elsewhere (a log) one line per stage.
pub struct Progress {
    terminal: bool,
    stage: Option<String>,
    shown: bool,
}

impl Progress {
    /// Nothing shown yet.
    pub fn new() -> Progress {
        use std::io::IsTerminal;
        Progress { terminal: std::io::stderr().is_terminal(), stage: None, shown: false }
    }

    /// Shows `text` (the state of `stage`).
    pub fn show(&mut self, text: &str, stage: &str) {
        let mut err = std::io::stderr();
        if self.terminal {
            // Back to the line's start, the text, then clear what a longer line left.
            let _ = write!(err, "\r{text}\x1b[K");
            let _ = err.flush();
            self.shown = true;
        } else if self.stage.as_deref() != Some(stage) {
            let _ = writeln!(err, "{text}");
        }
        self.stage = Some(stage.to_string());
    }

    /// Clears the terminal's progress line.
    pub fn finish(&mut self) {
        if self.shown {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
            self.shown = false;
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

/// A size for people: `512 B`, `12.0 KiB`, `3.4 MiB`, `1.2 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A duration for people: `3m 12s`, `2h 5m`, `450ms` (whole seconds above one second).
pub fn duration(d: Duration) -> String {
    let d = if d >= Duration::from_secs(1) { Duration::from_secs(d.as_secs()) } else { d };
    humantime::format_duration(d).to_string()
}

/// A Unix time in seconds for people: `2026-11-30T12:00:05Z (3m 12s ago)`.
// "ago" needs the wall clock: this is a report for a person, not a decision.
#[allow(clippy::disallowed_methods)]
pub fn time(unix_secs: u64) -> String {
    let at = UNIX_EPOCH + Duration::from_secs(unix_secs);
    let stamp = humantime::format_rfc3339_seconds(at);
    match SystemTime::now().duration_since(at) {
        Ok(ago) => format!("{stamp} ({} ago)", duration(ago)),
        Err(_) => stamp.to_string(),
    }
}

/// A Unix time in milliseconds for people: `2026-11-30T12:00:05.123Z (3m 12s ago)`.
// "ago" needs the wall clock: this is a report for a person, not a decision.
#[allow(clippy::disallowed_methods)]
pub fn time_ms(unix_ms: u64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(unix_ms);
    let stamp = humantime::format_rfc3339_millis(at);
    match SystemTime::now().duration_since(at) {
        Ok(ago) => {
            let ago = Duration::from_millis(u64::try_from(ago.as_millis()).unwrap_or(u64::MAX));
            format!("{stamp} ({} ago)", duration(ago))
        }
        Err(_) => stamp.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_times_read_like_words() {
        assert_eq!(duration(Duration::from_millis(192_345)), "3m 12s");
        assert_eq!(duration(Duration::from_millis(450)), "450ms");
        assert!(time(0).starts_with("1970-01-01T00:00:00Z ("), "{}", time(0));
        assert!(time_ms(1500).starts_with("1970-01-01T00:00:01.500Z ("), "{}", time_ms(1500));
        assert_eq!(
            (bytes(512), bytes(12 * 1024), bytes(3_565_158)),
            ("512 B".into(), "12.0 KiB".into(), "3.4 MiB".into())
        );
    }
}
