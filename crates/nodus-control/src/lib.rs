//! The nodus control plane: every component can be monitored and killed, messages expire, and
//! hosts raise flags.
//!
//! - [`id`]: [`ComponentId`], the identity of a component (node, service, app, worker process,
//!   task, or anything one of them started).
//! - [`expiry`]: the one rule every queue applies to `expires_at` ("expired → drop and tell the
//!   sender").
//! - [`control`]: the control messages of seed 000 (`monitoring`, `kill`, results and errors, the
//!   `config:<spec>:<id>:<pid>:<creator>` tags) mapped onto [`nodus_wire::Message`].
//! - [`tree`]: the tree of components by `pid` (who started whom), including children that live
//!   on other nodes.
//! - [`kill`]: the kill cascade of seed 000 as a state machine over the tree: kill every
//!   component it started, wait for them (bounded), stop, report an error to the parent.
//! - [`monitor`]: the tracker that tells which monitored components did not answer before the
//!   request's `expires_at`.
//! - [`listing`]: the tree as nodes list it (`TREE`, JSON rows) and as `nodus tree` draws it.
//! - [`flags`]: communicatord's flags, field for field: names, raise/lower semantics with
//!   `manual_down`, the limit and its "too many flags" flag, persistence in a directory, the
//!   `FLAG_*` messages and the `flags` tool's behaviour and exit codes.
//!
//! Invariant: everything here is pure (no I/O, no clock: `now` is an argument, Unix milliseconds)
//! except [`flags::store`], which reads and writes the flag directory. Every table has a named
//! bound; every decoder of untrusted input is total and returns an error that says what to fix.
#![forbid(unsafe_code)]

pub mod control;
pub mod expiry;
pub mod flags;
pub mod id;
pub mod kill;
pub mod listing;
pub mod monitor;
pub mod tree;

pub use control::{Body, ControlError, ControlMessage, Header, MessageType, MonitoringResult, Spec, Tag};
pub use id::ComponentId;
pub use kill::{KillAction, KillDone, KillError, KillLimits, KillOrder, KillReport, KillRequest};
pub use monitor::{MonitorError, MonitorTracker, Poll};
pub use tree::{Component, ComponentKind, Tree, TreeError};

/// What a principal must be allowed to do to send a control or flag command, in the words of
/// the node's access model (`status`, `send`, `admin`). Built-in services declare these per
/// command when they attach; the router checks them at its one choke point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// Read-only queries.
    Status,
    /// Sending to services (raising and lowering one's own flags).
    Send,
    /// Administration (kill, manual flag lowering).
    Admin,
}

impl Access {
    /// The permission's name in the access model.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Status => "status",
            Access::Send => "send",
            Access::Admin => "admin",
        }
    }
}
