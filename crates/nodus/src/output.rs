//! The CLI's output layer: the only place that prints to stdout. Human text by default, JSON with
//! `--json`.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use nodus_wire::{text, Message};
use serde_json::{json, Value};

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
        println!("{}", message_json(m));
    } else {
        println!("{}", text::to_line(m));
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
        println!("{} {}", m.from, m.command);
    } else {
        println!("{} {} {}", m.from, m.command, params.join(";"));
    }
    match std::str::from_utf8(&m.payload) {
        _ if m.payload.is_empty() => {}
        Ok(text) => println!("{}", text.strip_suffix('\n').unwrap_or(text)),
        Err(_) => println!("({} bytes of binary payload; --json shows it)", m.payload.len()),
    }
}

/// Prints a JSON value on one line.
pub fn json(v: &Value) {
    println!("{v}");
}

/// Prints a line of human output.
pub fn line(s: &str) {
    println!("{s}");
}

/// Prints an error for a human, on stderr.
pub fn error(s: &str) {
    eprintln!("nodus: {s}");
}
