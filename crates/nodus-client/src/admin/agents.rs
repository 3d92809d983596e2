//! Typed calls of a node's built-in `taskcluster` service: the agent registry of a manager
//! node (the worker nodes it knows, their resources and state), and banning an agent.

use super::{expect, text, Admin, AdminError};
use nodus_wire::Message;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How long a `taskcluster` request may take.
const AGENTS_TIMEOUT: Duration = Duration::from_secs(30);

/// One worker node in its manager's registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// Its unique id (given by the registry when it first registered).
    pub id: String,
    /// Its node's server name.
    pub name: String,
    /// Its address, as it declared it.
    pub ip: String,
    /// Its MAC address, as it declared it.
    pub mac: String,
    /// Cores it declared.
    pub cores: u32,
    /// Memory it declared, bytes.
    pub memory: u64,
    /// Tasks it runs at once.
    pub concurrency: u32,
    /// Tasks it accepts waiting beyond those.
    pub queue: u32,
    /// When it first registered (Unix ms).
    pub first_seen: u64,
    /// When it was last heard from (Unix ms).
    pub last_seen: u64,
    /// `active`, `silent` or `gone`.
    pub state: String,
    /// Since when it is in that state (Unix ms).
    pub state_since: u64,
    /// Banned by an operator.
    pub banned: bool,
}

/// A node's answer about tasks across nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agents {
    /// The node's role: `standalone`, `manager` or `worker`.
    pub role: String,
    /// A worker's current manager (empty while it has none); `None` for other roles.
    pub manager: Option<String>,
    /// A manager's registry (empty for other roles).
    pub agents: Vec<AgentInfo>,
}

impl Admin {
    async fn taskcluster(&self, req: Message, want: &str) -> Result<Message, AdminError> {
        let asked = req.command.clone();
        let reply = self.client.request_with_timeout(req.to("taskcluster"), AGENTS_TIMEOUT).await?;
        expect(reply, &asked, &[want])
    }

    /// The node's role and, on a manager, its agent registry.
    ///
    /// Fails as described in the module docs of [`crate::admin`].
    pub async fn agents(&self) -> Result<Agents, AdminError> {
        let m = self.taskcluster(Message::new("AGENTS"), "AGENTS").await?;
        let agents: Vec<AgentInfo> =
            serde_json::from_slice(&m.payload).map_err(|e| AdminError::Malformed(format!("AGENTS payload: {e}")))?;
        let role = text(&m, "role");
        let manager = (role == "worker").then(|| text(&m, "manager"));
        Ok(Agents { role, manager, agents })
    }

    /// Bans (or, with `banned` false, unbans) the agent `name` on a manager: its requests to be
    /// managed are refused, and a paired one is let go.
    ///
    /// Fails as described in the module docs of [`crate::admin`]; `code=invalid` when the node
    /// is not a manager.
    pub async fn agent_ban(&self, name: &str, banned: bool) -> Result<(), AdminError> {
        let command = if banned { "BAN" } else { "UNBAN" };
        self.taskcluster(Message::new(command).param("name", name), command).await?;
        Ok(())
    }
}
