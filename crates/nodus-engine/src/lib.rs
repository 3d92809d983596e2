//! The nodus app engine: runs an app's worker processes and talks to them in Cocaine's v0.12 protocol.
//!
//! Pure cores (no I/O, no clock): [`protocol`] (framing and messages), [`worker`] (one worker
//! process's lifecycle), [`balance`] (one app's queue and pool). Configuration: [`manifest`] and
//! [`profile`]. The tokio driver around them is [`Engine`]; [`worker_sdk`] is the other side, for
//! writing workers in Rust.

pub mod balance;
mod engine;
pub mod manifest;
mod process;
pub mod profile;
pub mod protocol;
mod session;
pub mod worker;
pub mod worker_sdk;

pub use engine::{
    category, socket_path, AppInfo, AppSpec, CrashRecord, Engine, EngineConfig, EngineError, EngineEvent, WorkerInfo,
};
pub use session::{Session, SessionError};
