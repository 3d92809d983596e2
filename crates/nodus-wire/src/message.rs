//! The message model shared by both codecs, and the validation rules every decoder applies.

use crate::node::Permissions;
use bytes::Bytes;
use std::collections::BTreeMap;

/// Longest server or service name accepted.
pub const MAX_NAME_LEN: usize = 255;

/// A `server:service` pair. An empty string means "not given".
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address {
    /// Server (node) name; empty means "this node" / unspecified.
    pub server: String,
    /// Service name; empty means the node itself.
    pub service: String,
}

impl Address {
    /// An address from its two parts.
    pub fn new(server: impl Into<String>, service: impl Into<String>) -> Self {
        Address { server: server.into(), service: service.into() }
    }

    /// True when neither part is set.
    pub fn is_empty(&self) -> bool {
        self.server.is_empty() && self.service.is_empty()
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.server.is_empty() {
            f.write_str(&self.service)
        } else {
            write!(f, "{}:{}", self.server, self.service)
        }
    }
}

/// The control envelope of every message (seed 000): identity, parentage, origin and lifetime.
/// Zero / empty means "not set".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Envelope {
    /// Message id chosen by the creator; replies refer to it through `reply_to`.
    pub id: u64,
    /// Id of the component (or message) that caused this one: the parent in the start tree.
    pub pid: u64,
    /// For a reply: the `id` of the request it answers.
    pub reply_to: u64,
    /// Who created the message (free text, e.g. `host:service`).
    pub creator: String,
    /// Creation time, Unix milliseconds.
    pub created_at: i64,
    /// Expiry time, Unix milliseconds; an expired message is never delivered.
    pub expires_at: i64,
    /// Node-to-node hops taken so far; nodes drop a message past their hop limit. The first node
    /// sets it (a client's value is overwritten).
    pub hops: u32,
    /// What the sender's principal may do, stamped by the sender's node when it forwards the
    /// message to another node; empty everywhere else (nodes clear it on messages from clients
    /// and on delivery to them).
    pub perms: Permissions,
}

/// One message: command, addressing, parameters, payload and envelope.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// Command name, `[A-Z][A-Z0-9_]*`.
    pub command: String,
    /// Sender; stamped by the daemon, never trusted from a client.
    pub from: Address,
    /// Destination. An empty service addresses the node itself.
    pub to: Address,
    /// Named parameters, kept sorted by name.
    pub params: BTreeMap<String, String>,
    /// Opaque binary payload, shared (not copied) by broadcasts, sniffers and fan-out.
    pub payload: Bytes,
    /// Control envelope.
    pub envelope: Envelope,
}

/// Why a message is not valid. Carried back to the sender in an `INVALID` reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// The unit does not follow the syntax of its form.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The command name is empty or has characters outside `[A-Z0-9_]`.
    #[error("invalid command name {0:?}: use [A-Z][A-Z0-9_]*")]
    BadCommand(String),
    /// A server or service name has forbidden characters or is too long.
    #[error("invalid name {0:?}: use [A-Za-z0-9_.*?-], at most 255 characters")]
    BadName(String),
    /// A parameter name has forbidden characters.
    #[error("invalid parameter name {0:?}: use [A-Za-z][A-Za-z0-9_]*")]
    BadParam(String),
}

/// True when `s` is a valid command name: `[A-Z][A-Z0-9_]*`.
pub fn valid_command(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAME_LEN
        && b[0].is_ascii_uppercase()
        && b.iter().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_')
}

/// True when `s` is a valid server or service name (may be empty: "not given").
pub fn valid_name(s: &str) -> bool {
    s.len() <= MAX_NAME_LEN
        && s.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'*' | b'?' | b'-'))
}

/// True when `s` is a valid user parameter name: `[A-Za-z][A-Za-z0-9_]*`.
pub fn valid_param_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAME_LEN
        && b[0].is_ascii_alphabetic()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

impl Message {
    /// A message with `command` and nothing else set.
    pub fn new(command: impl Into<String>) -> Self {
        Message { command: command.into(), ..Default::default() }
    }

    /// Builder: set the destination service (and server, if `to` is `server:service`).
    pub fn to(mut self, to: &str) -> Self {
        self.to = match to.split_once(':') {
            Some((server, service)) => Address::new(server, service),
            None => Address::new("", to),
        };
        self
    }

    /// Builder: add a parameter.
    pub fn param(mut self, name: impl Into<String>, value: impl ToString) -> Self {
        self.params.insert(name.into(), value.to_string());
        self
    }

    /// Builder: set the payload.
    pub fn with_payload(mut self, payload: impl Into<Bytes>) -> Self {
        self.payload = payload.into();
        self
    }

    /// Builder: set the envelope id.
    pub fn with_id(mut self, id: u64) -> Self {
        self.envelope.id = id;
        self
    }

    /// A parameter's value, if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    /// A reply to this message: addressed to its sender (when the sender is a named service) and
    /// correlated by `reply_to`.
    pub fn reply(&self, command: impl Into<String>) -> Message {
        let mut m = Message::new(command);
        if !self.from.service.is_empty() {
            m.to = self.from.clone();
        }
        m.envelope.reply_to = self.envelope.id;
        m
    }

    /// Checks names against the rules both codecs enforce.
    ///
    /// Fails with the first rule broken.
    pub fn validate(&self) -> Result<(), MessageError> {
        if !valid_command(&self.command) {
            return Err(MessageError::BadCommand(self.command.clone()));
        }
        for name in [&self.from.server, &self.from.service, &self.to.server, &self.to.service] {
            if !valid_name(name) {
                return Err(MessageError::BadName(name.clone()));
            }
        }
        if let Some(bad) = self.params.keys().find(|k| !valid_param_name(k)) {
            return Err(MessageError::BadParam(bad.clone()));
        }
        Ok(())
    }

    /// Approximate in-memory size, used for queue byte bounds.
    pub fn approx_size(&self) -> usize {
        64 + self.command.len()
            + self.payload.len()
            + self.envelope.creator.len()
            + self.params.iter().map(|(k, v)| k.len() + v.len() + 16).sum::<usize>()
    }
}
