//! The nodus wire crate: one message model and the two codecs that carry it.
//!
//! - [`Message`] is the unit on the wire: a command, `from`/`to` addresses, named parameters, an
//!   opaque binary payload and the control [`Envelope`] (id, pid, creator, created_at, expires_at).
//! - [`text`] is communicatord's line form (`[<srv:svc ][[server:]service/]COMMAND name=value;...`),
//!   for shell scripts and humans.
//! - [`binary`] is a versioned preface followed by length-prefixed MessagePack frames, for speed.
//! - [`detect`] tells which of the two a peer speaks from its first bytes.
//! - [`node`] types the node's own protocol: requests to a node, the permissions they need, and
//!   the messages of cluster links.
//! - [`Backoff`] is the one jittered exponential backoff every part of nodus retries with.
//! - [`rows`] are the typed rows of the node's list replies (apps, workers, nodes, links).
//!
//! Invariant: this crate does no I/O, reads no clock and never depends on an async runtime; every
//! decoder is total (bad bytes give an error, never a panic) and bounded by a maximum frame size.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod binary;
mod message;
pub mod node;
pub mod rows;
pub mod text;

pub use backoff::Backoff;
pub use message::{valid_command, valid_name, valid_param_name, Address, Envelope, Message, MessageError};

/// Default maximum size of one frame (binary) or one line (text), in bytes.
pub const DEFAULT_MAX_FRAME: usize = 4 * 1024 * 1024;

/// The two wire forms a connection may speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// communicatord text lines.
    Text,
    /// Preface + length-prefixed MessagePack frames.
    Binary,
}

/// Outcome of decoding one unit from a buffer.
// The message variant is the common case: boxing it would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// A well-formed message.
    Message(Message),
    /// A complete unit that is not a valid message. The stream is still in sync: the peer should
    /// get an `INVALID` reply and the connection may continue.
    Invalid(MessageError),
}

/// A stream-level decoding failure after which the connection cannot continue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A frame or line exceeds the configured maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// Announced (binary) or accumulated (text) length.
        len: usize,
        /// The configured bound.
        max: usize,
    },
    /// The binary preface is wrong or announces an unsupported version.
    #[error("bad binary preface: {0}")]
    BadPreface(String),
}

/// Tells which form a peer speaks from the first bytes it sent.
///
/// Returns `None` while more bytes are needed to decide. A binary peer starts with
/// [`binary::PREFACE`]'s first byte (NUL), which no text line can start with.
pub fn detect(first: &[u8]) -> Option<Form> {
    match first.first() {
        None => None,
        Some(0) => Some(Form::Binary),
        Some(_) => Some(Form::Text),
    }
}
