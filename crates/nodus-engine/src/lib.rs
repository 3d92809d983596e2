//! The nodus app engine: runs an app's worker processes and talks to them in Cocaine's v0.12 protocol.
//!
//! Pure cores (no I/O, no clock): [`protocol`] (framing and messages), [`worker`] (one worker
//! process's lifecycle), [`balance`] (one app's queue and pool). Configuration: [`manifest`] and
//! [`profile`]. The tokio driver around them is [`Engine`]; [`worker_sdk`] is the other side, for
//! writing workers in Rust. [`service`] is Cocaine's client-facing service protocol (pure) and
//! [`locator`] serves it over TCP: the locator and every app as a Cocaine service.

//!
//! Process supervision (the [`Engine`], [`locator`], [`identity`]) is the default feature
//! `supervision`. Without it (`default-features = false`) the crate is the protocol, the app
//! client ([`client`]) and the worker SDK ([`worker_sdk`]) with their pure cores, for programs
//! that call apps or are workers without supervising processes.

pub mod balance;
pub mod client;
#[cfg(feature = "supervision")]
mod engine;
#[cfg(feature = "supervision")]
pub mod identity;
#[cfg(feature = "supervision")]
pub mod locator;
pub mod manifest;
#[cfg(feature = "supervision")]
mod process;
pub mod profile;
pub mod protocol;
pub mod service;
#[cfg(feature = "supervision")]
mod session;
pub mod worker;
pub mod worker_sdk;

/// Error categories in `[ch,1,[[category,code],message]]`, as the engine and the worker SDK use them.
pub mod category {
    /// Errors raised by the engine (session abandoned, worker failed).
    pub const ENGINE: i64 = 1;
    /// Errors raised by an app's handler (worker SDK).
    pub const APPLICATION: i64 = 2;
}

/// The event the control plane invokes on a worker to monitor it (seed 000 `monitoring`): its one
/// chunk is the request's content as JSON (`{"id", "pid", "creator", "created_at", "expires_at",
/// "spec": "monitoring", "config": {"sync_time"}}`), and the worker answers one JSON chunk with
/// the same envelope and `"result": {"sync_time", "name", "host", "is_running", "message"}`. The
/// worker SDK answers it by default; a worker that does not know the event (a plain Cocaine
/// worker answers "no handler") is answered for by its node.
pub const MONITORING_EVENT: &str = "nodus:monitoring";

pub use client::{AppClient, AppClientConfig, AppClientError, Endpoints, ServiceHandle, Stream};
#[cfg(feature = "supervision")]
pub use engine::{
    socket_path, AppCaller, AppInfo, AppSpec, CallDone, CallResult, CrashRecord, Engine, EngineConfig, EngineError,
    EngineEvent, WorkerInfo,
};
#[cfg(feature = "supervision")]
pub use identity::{RunAs, RunAsError};
#[cfg(feature = "supervision")]
pub use locator::{Directory, Locator, LocatorConfig, LocatorError, LocatorHandle};
#[cfg(feature = "supervision")]
pub use session::{Session, SessionError};
