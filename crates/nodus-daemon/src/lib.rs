//! The nodus node daemon: configuration, the routing core ([`router`]), the message cache
//! ([`cache`]) and the I/O driver ([`server`]) that runs them on Unix and TCP listeners.
//!
//! Entry point: [`Daemon::bind`] then [`Daemon::run`] with a shutdown future.
// Unsafe code is denied everywhere except `ntp.rs` (one read-only system call) and `alloc.rs`
// (glibc's malloc_trim).
#![deny(unsafe_code)]

pub mod alloc;
pub mod apps;
pub mod auth;
pub mod cache;
pub mod cache_store;
pub mod clock;
pub mod config;
pub mod control;
pub mod detector;
pub mod flags;
pub mod http;
mod inproc;
pub mod ntp;
pub mod router;
pub mod server;
pub mod taskcluster;
pub mod tasks;
pub mod tls;
pub mod topology;

pub use clock::{now_ms, Clock};
pub use config::Config;
pub use server::{Counters, Daemon, ListenerKind, ListenerSnapshot, Snapshot, BUDGET_ALLOWANCE_BYTES};
