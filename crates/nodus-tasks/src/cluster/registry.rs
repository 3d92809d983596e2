//! The agent registry (seed 004): every worker node a manager has known, with a unique id, its
//! address, resources, when it was first and last seen, and its state. The pure [`Registry`]
//! decides what changes (echolocation marks agents silent and gone; gone agents are removed
//! after a configured time; an operator bans one); [`AgentStore`] keeps it durably.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use super::msg::Specs;
use crate::store::StoreError;
use crate::task::{TaskId, UnixMs};

/// Where an agent stands, as its manager's echolocation sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AgentState {
    /// Paired and answering.
    Active,
    /// Paired, but it has not answered for a while.
    Silent,
    /// Not paired: it left, was cut off or died. Removed from the registry after a while.
    Gone,
}

impl AgentState {
    /// The word stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Active => "active",
            AgentState::Silent => "silent",
            AgentState::Gone => "gone",
        }
    }
}

impl fmt::Display for AgentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AgentState {
    type Err = String;

    fn from_str(s: &str) -> Result<AgentState, String> {
        match s {
            "active" => Ok(AgentState::Active),
            "silent" => Ok(AgentState::Silent),
            "gone" => Ok(AgentState::Gone),
            _ => Err(format!("unknown agent state {s:?}; use active, silent or gone")),
        }
    }
}

/// One agent (a worker node) in its manager's registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    /// Its unique id, given by the registry when it first registered (a UUIDv7).
    pub id: String,
    /// Its node's server name (unique in the registry).
    pub name: String,
    /// Its address, as it declared it.
    pub ip: String,
    /// Its MAC address, as it declared it.
    pub mac: String,
    /// Cores it declared.
    pub cores: u32,
    /// Memory it declared, in bytes.
    pub memory: u64,
    /// Tasks it runs at once, as declared.
    pub concurrency: u32,
    /// Tasks it accepts beyond those, as declared.
    pub queue: u32,
    /// When it first registered.
    pub first_seen: UnixMs,
    /// When it was last heard from.
    pub last_seen: UnixMs,
    /// Its state.
    pub state: AgentState,
    /// Since when it is in that state.
    pub state_since: UnixMs,
    /// Banned by an operator: its requests to be managed are refused.
    pub banned: bool,
}

/// A durable home for the registry. Implemented by the SQLite task store (table `agents`);
/// separate from [`crate::store::Store`] so a backend can offer tasks without agents.
pub trait AgentStore: Send + Sync + 'static {
    /// Stores `agent` (by name), replacing what was stored under its name.
    ///
    /// # Errors
    /// [`StoreError`]: nothing changed.
    fn save_agent(&self, agent: Agent) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Deletes the agent called `name`. Returns whether there was one.
    ///
    /// # Errors
    /// [`StoreError`].
    fn remove_agent(&self, name: String) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Every agent, by name.
    ///
    /// # Errors
    /// [`StoreError`].
    fn agents(&self) -> impl Future<Output = Result<Vec<Agent>, StoreError>> + Send;
}

/// What the registry asks the driver to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryChange {
    /// Store this agent.
    Save(Agent),
    /// Delete the agent of this name.
    Remove(String),
}

/// The registry's timing.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// An agent gone this long is removed (banned agents are kept, so the ban holds).
    pub remove_after: Duration,
    /// `last_seen` is stored at most this often per agent (state changes are stored at once).
    pub persist_every: Duration,
    /// Most agents kept (new ones beyond it are refused).
    pub max_agents: usize,
}

impl Default for RegistryConfig {
    fn default() -> RegistryConfig {
        RegistryConfig {
            remove_after: Duration::from_secs(86_400),
            persist_every: Duration::from_secs(30),
            max_agents: 10_000,
        }
    }
}

/// The agent registry of one manager. Pure.
#[derive(Debug)]
pub struct Registry {
    config: RegistryConfig,
    agents: BTreeMap<String, Agent>,
    /// When each agent's `last_seen` was last stored.
    persisted: BTreeMap<String, UnixMs>,
    rng: rand::rngs::StdRng,
}

impl Registry {
    /// A registry holding `agents` (as stored); `seed` makes new ids reproducible in tests.
    pub fn new(config: RegistryConfig, agents: Vec<Agent>, seed: u64) -> Registry {
        use rand::SeedableRng;
        let persisted = agents.iter().map(|a| (a.name.clone(), a.last_seen)).collect();
        let agents = agents.into_iter().map(|a| (a.name.clone(), a)).collect();
        Registry { config, agents, persisted, rng: rand::rngs::StdRng::seed_from_u64(seed) }
    }

    /// The agent called `name`.
    pub fn get(&self, name: &str) -> Option<&Agent> {
        self.agents.get(name)
    }

    /// Every agent, by name.
    pub fn agents(&self) -> impl Iterator<Item = &Agent> {
        self.agents.values()
    }

    /// Whether `name` is banned.
    pub fn is_banned(&self, name: &str) -> bool {
        self.agents.get(name).is_some_and(|a| a.banned)
    }

    /// Whether a new agent would fit.
    pub fn has_room_for(&self, name: &str) -> bool {
        self.agents.contains_key(name) || self.agents.len() < self.config.max_agents
    }

    fn new_id(&mut self, now: UnixMs) -> String {
        TaskId::generate(now, &mut self.rng).to_string()
    }

    fn blank(&mut self, name: &str, now: UnixMs) -> Agent {
        Agent {
            id: self.new_id(now),
            name: name.to_string(),
            ip: String::new(),
            mac: String::new(),
            cores: 0,
            memory: 0,
            concurrency: 0,
            queue: 0,
            first_seen: now,
            last_seen: now,
            state: AgentState::Gone,
            state_since: now,
            banned: false,
        }
    }

    fn save(&mut self, name: &str, now: UnixMs) -> Option<RegistryChange> {
        let a = self.agents.get(name)?;
        self.persisted.insert(name.to_string(), now);
        Some(RegistryChange::Save(a.clone()))
    }

    /// `name` paired with the manager, declaring `specs`: registered (with a new id) or
    /// refreshed, and active.
    pub fn register(&mut self, name: &str, specs: &Specs, now: UnixMs) -> Option<RegistryChange> {
        if !self.agents.contains_key(name) {
            if self.agents.len() >= self.config.max_agents {
                return None;
            }
            let a = self.blank(name, now);
            self.agents.insert(name.to_string(), a);
        }
        let a = self.agents.get_mut(name).expect("inserted above");
        a.ip = specs.ip.clone();
        a.mac = specs.mac.clone();
        a.cores = specs.cores;
        a.memory = specs.memory;
        a.concurrency = specs.concurrency;
        a.queue = specs.queue;
        a.last_seen = now;
        if a.state != AgentState::Active {
            a.state = AgentState::Active;
            a.state_since = now;
        }
        self.save(name, now)
    }

    /// `name` was heard from (any message). Stored when its state changes, or when its
    /// `last_seen` was last stored `persist_every` ago.
    pub fn heard(&mut self, name: &str, now: UnixMs) -> Option<RegistryChange> {
        let a = self.agents.get_mut(name)?;
        a.last_seen = a.last_seen.max(now);
        let changed = a.state == AgentState::Silent;
        if changed {
            a.state = AgentState::Active;
            a.state_since = now;
        }
        let due = self.persisted.get(name).is_none_or(|t| now.since(*t) >= self.config.persist_every);
        if changed || due {
            self.save(name, now)
        } else {
            None
        }
    }

    /// `name`'s state becomes `state` (stored when it changes).
    pub fn set_state(&mut self, name: &str, state: AgentState, now: UnixMs) -> Option<RegistryChange> {
        let a = self.agents.get_mut(name)?;
        if a.state == state {
            return None;
        }
        a.state = state;
        a.state_since = now;
        self.save(name, now)
    }

    /// An operator bans (or lets back) `name`; an agent not known yet is registered banned, so
    /// it is refused from its first request.
    pub fn ban(&mut self, name: &str, banned: bool, now: UnixMs) -> Option<RegistryChange> {
        if !self.agents.contains_key(name) {
            if !banned || self.agents.len() >= self.config.max_agents {
                return None;
            }
            let a = self.blank(name, now);
            self.agents.insert(name.to_string(), a);
        }
        let a = self.agents.get_mut(name).expect("present");
        if a.banned == banned {
            return None;
        }
        a.banned = banned;
        self.save(name, now)
    }

    /// Removes agents gone for `remove_after` (never banned ones).
    pub fn purge(&mut self, now: UnixMs) -> Vec<RegistryChange> {
        let old: Vec<String> = self
            .agents
            .values()
            .filter(|a| {
                a.state == AgentState::Gone && !a.banned && now.since(a.state_since) >= self.config.remove_after
            })
            .map(|a| a.name.clone())
            .collect();
        old.into_iter()
            .map(|name| {
                self.agents.remove(&name);
                self.persisted.remove(&name);
                RegistryChange::Remove(name)
            })
            .collect()
    }

    /// When the next gone agent is due for removal.
    pub fn next_purge(&self) -> Option<UnixMs> {
        self.agents
            .values()
            .filter(|a| a.state == AgentState::Gone && !a.banned)
            .map(|a| a.state_since.plus(self.config.remove_after))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs() -> Specs {
        Specs {
            cores: 4,
            memory: 8 << 30,
            concurrency: 8,
            queue: 8,
            ip: "10.0.0.7".into(),
            mac: "aa:bb:cc:dd:ee:ff".into(),
            ..Specs::default()
        }
    }

    fn saved(c: Option<RegistryChange>) -> Agent {
        match c {
            Some(RegistryChange::Save(a)) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn registration_gives_a_unique_id_kept_across_registrations() {
        let mut r = Registry::new(RegistryConfig::default(), vec![], 1);
        let a = saved(r.register("w1", &specs(), UnixMs(1000)));
        let b = saved(r.register("w2", &specs(), UnixMs(1000)));
        assert_ne!(a.id, b.id);
        assert_eq!((a.ip.as_str(), a.mac.as_str(), a.cores, a.memory), ("10.0.0.7", "aa:bb:cc:dd:ee:ff", 4, 8 << 30));
        assert_eq!((a.first_seen, a.state), (UnixMs(1000), AgentState::Active));
        r.set_state("w1", AgentState::Gone, UnixMs(2000));
        let again = saved(r.register("w1", &Specs { cores: 16, ..specs() }, UnixMs(3000)));
        assert_eq!(
            (again.id, again.first_seen, again.cores, again.state),
            (a.id, UnixMs(1000), 16, AgentState::Active)
        );
        let reloaded = Registry::new(RegistryConfig::default(), r.agents().cloned().collect(), 2);
        assert_eq!(reloaded.get("w2").unwrap().id, b.id);
    }

    #[test]
    fn last_seen_is_stored_at_most_every_persist_interval_and_state_changes_at_once() {
        let cfg = RegistryConfig { persist_every: Duration::from_secs(30), ..RegistryConfig::default() };
        let mut r = Registry::new(cfg, vec![], 1);
        r.register("w1", &specs(), UnixMs(0));
        assert_eq!(r.heard("w1", UnixMs(10_000)), None);
        assert_eq!(r.get("w1").unwrap().last_seen, UnixMs(10_000));
        assert_eq!(saved(r.heard("w1", UnixMs(30_000))).last_seen, UnixMs(30_000));
        assert_eq!(saved(r.set_state("w1", AgentState::Silent, UnixMs(31_000))).state, AgentState::Silent);
        assert_eq!(r.set_state("w1", AgentState::Silent, UnixMs(32_000)), None);
        assert_eq!(saved(r.heard("w1", UnixMs(33_000))).state, AgentState::Active, "silent agents come back at once");
        assert_eq!(r.heard("nobody", UnixMs(1)), None);
    }

    #[test]
    fn gone_agents_are_removed_after_the_configured_time_but_banned_ones_stay() {
        let cfg = RegistryConfig { remove_after: Duration::from_secs(60), ..RegistryConfig::default() };
        let mut r = Registry::new(cfg, vec![], 1);
        r.register("w1", &specs(), UnixMs(0));
        r.register("w2", &specs(), UnixMs(0));
        r.set_state("w1", AgentState::Gone, UnixMs(1_000));
        r.set_state("w2", AgentState::Gone, UnixMs(1_000));
        assert!(r.ban("w2", true, UnixMs(1_000)).is_some());
        assert_eq!(r.next_purge(), Some(UnixMs(61_000)));
        assert!(r.purge(UnixMs(60_999)).is_empty());
        assert_eq!(r.purge(UnixMs(61_000)), vec![RegistryChange::Remove("w1".into())]);
        assert!(r.get("w1").is_none() && r.get("w2").is_some());
        assert_eq!(r.next_purge(), None);
    }

    #[test]
    fn bans_hold_for_unknown_names_and_can_be_lifted() {
        let mut r = Registry::new(RegistryConfig::default(), vec![], 1);
        assert!(saved(r.ban("w9", true, UnixMs(5))).banned);
        assert!(r.is_banned("w9"));
        assert_eq!(r.ban("w9", true, UnixMs(6)), None);
        assert!(!saved(r.ban("w9", false, UnixMs(7))).banned);
        assert_eq!(r.ban("never", false, UnixMs(8)), None);
    }

    #[test]
    fn the_registry_is_bounded() {
        let cfg = RegistryConfig { max_agents: 2, ..RegistryConfig::default() };
        let mut r = Registry::new(cfg, vec![], 1);
        assert!(r.register("a", &specs(), UnixMs(0)).is_some());
        assert!(r.register("b", &specs(), UnixMs(0)).is_some());
        assert!(!r.has_room_for("c") && r.has_room_for("a"));
        assert_eq!(r.register("c", &specs(), UnixMs(0)), None);
    }
}
