//! Tasks across nodes: the manager/worker protocol of seed 002 and the agent registry of
//! seed 004, as pure state machines.
//!
//! - [`msg`]: the messages, typed, with total encoders and decoders to [`nodus_wire::Message`].
//! - [`calls`]: requests in flight, resent until answered.
//! - [`worker`]: [`WorkerNode`], a worker node's side (pairing, running tasks through an
//!   executor interface, reports kept while its manager is away).
//! - [`manager`]: [`Manager`], a manager's side (accepting workers, dispatch by capacity and
//!   load, timeouts, re-runs of lost tasks, recovery after its own restart).
//! - [`registry`]: the agent registry ([`Registry`], pure) and its durable [`AgentStore`].
//! - [`fetch`]: blobs fetched in chunks and checked against their SHA-256 (app packages a worker
//!   lacks, results too large to travel inline).
//! - [`resources`]: what a node declares about itself, read from the system.
//! - [`Standalone`]: the answers of a node that takes no part (the default role).
//!
//! Nothing here does I/O or reads a clock (except [`resources`], which reads `/proc` and `/sys`):
//! the daemon's driver carries [`Packet`]s over the cluster links as node messages, runs the
//! actions, and passes `now`. Every request is answered: `Ack`, `NotMine`, or its own answer.

pub mod calls;
pub mod fetch;
pub mod manager;
pub mod msg;
pub mod registry;
pub mod resources;
pub mod worker;

pub use manager::{InDoubt, Manager, ManagerAction, ManagerConfig, ManagerStats};
pub use msg::{AppPackage, Blob, Body, DecodeError, NodeType, Packet, ResultBody, Specs, TaskSpec, TaskStatus};
pub use registry::{Agent, AgentState, AgentStore, Registry, RegistryChange, RegistryConfig};
pub use worker::{WorkerAction, WorkerConfig, WorkerNode};

/// A node in neither role (the default): it runs its own tasks and answers every manager/worker
/// request so that its peers know where they stand.
#[derive(Debug, Default)]
pub struct Standalone {
    next_id: u64,
}

impl Standalone {
    /// A standalone node; its own requests (only `ManagerBye`) get ids after `first_id`.
    pub fn new(first_id: u64) -> Standalone {
        Standalone { next_id: first_id }
    }

    /// What to send for `packet` from `from`: the answer to a request (`NodeTypeAnswer
    /// { Standalone }`, `ManagerAnswer { accepted: false }`, `Ack` to a bye, `NotMine` to every
    /// relationship message), and `ManagerBye` to a node that accepted it as a worker.
    pub fn handle(&mut self, packet: &Packet) -> Option<Packet> {
        let body = match &packet.body {
            Body::ManagerAnswer { accepted: true } => {
                self.next_id = self.next_id.wrapping_add(1).max(1);
                return Some(Packet::new(self.next_id, Body::ManagerBye));
            }
            b if b.is_answer() => return None,
            Body::NodeTypeRequest { .. } => Body::NodeTypeAnswer { node_type: NodeType::Standalone },
            Body::ManagerRequest(_) => Body::ManagerAnswer { accepted: false },
            Body::ManagerBye => Body::Ack,
            _ => Body::NotMine,
        };
        Some(Packet::new(packet.id, body))
    }
}
