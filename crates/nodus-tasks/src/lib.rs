//! nodus tasks: procedures run as tasks, stored durably, over the arpcp API (seed 004).
//!
//! - [`task`]: the model (ids, statuses, errors, the task record).
//! - [`store`]: the durable store trait, its SQLite backend (WAL, group commit, leases with
//!   fencing tokens) and the contract suite every backend passes.
//! - [`procedures`]: the `APP.EVENT` procedures apps declare, and the argument checks.
//! - [`sched`]: the scheduler core (pure: claims, timeouts, retries, releases).
//! - [`executor`]: [`Tasks`], a node's task service, and the loop that drives the scheduler,
//!   the store and the engine.
//! - [`arpcp`]: the wire format (pure); [`api`]: the methods on [`Tasks`]; [`server`]: the TCP
//!   listener.
//! - [`notify`]: `TASK_STATUS` notifications to a configured app event or service.
//! - [`cluster`]: tasks across nodes: the manager/worker protocol (seed 002) and the agent
//!   registry (seed 004), as pure state machines.

pub mod api;
pub mod arpcp;
pub mod cluster;
pub mod executor;
pub mod notify;
pub mod procedures;
pub mod sched;
pub mod server;
pub mod store;
pub mod task;

pub use executor::{Submission, SubmitError, Tasks, TasksConfig, Waited};
pub use server::{ArpcpConfig, ArpcpServer, Network};
pub use store::{SqliteConfig, SqliteStore, Store, StoreError, Synchronous};
pub use task::{Status, Task, TaskId, UnixMs};
