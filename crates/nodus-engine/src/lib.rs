//! The nodus app engine: runs an app's worker processes and talks to them in Cocaine's v0.12 protocol.
//!
//! Pure cores (no I/O, no clock): [`protocol`] (framing and messages), [`worker`] (one worker
//! process's lifecycle), [`balance`] (one app's queue and pool). Configuration: [`manifest`] and
//! [`profile`]. The tokio driver around them is [`Engine`]; [`worker_sdk`] is the other side, for
//! writing workers in Rust. [`service`] is Cocaine's client-facing service protocol (pure) and
//! [`locator`] serves it over TCP: the locator and every app as a Cocaine service.

pub mod balance;
pub mod client;
mod engine;
pub mod identity;
pub mod locator;
pub mod manifest;
mod process;
pub mod profile;
pub mod protocol;
pub mod service;
mod session;
pub mod worker;
pub mod worker_sdk;

pub use client::{AppClient, ClientError, ClientOptions, Endpoints, ServiceHandle, Stream};
pub use engine::{
    category, socket_path, AppCaller, AppInfo, AppSpec, CallDone, CallResult, CrashRecord, Engine, EngineConfig,
    EngineError, EngineEvent, WorkerInfo, MONITORING_EVENT,
};
pub use identity::{RunAs, RunAsError};
pub use locator::{Directory, Locator, LocatorConfig, LocatorError, LocatorHandle};
pub use session::{Session, SessionError};
