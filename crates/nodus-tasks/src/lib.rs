//! nodus tasks: procedures run as tasks, stored durably, over the arpcp API (seed 004).
//!
//! - [`task`]: the model (ids, statuses, errors, the task record).
//! - [`store`]: the durable store trait, its SQLite backend (WAL, group commit, leases with
//!   fencing tokens) and the contract suite every backend passes.

pub mod store;
pub mod task;

pub use store::{SqliteConfig, SqliteStore, Store, StoreError, Synchronous};
pub use task::{Status, Task, TaskId, UnixMs};
