//! Every message and every rule of seed 002's table, on the pure manager and worker node state
//! machines with a virtual clock. Messages between them travel as real `nodus_wire` text
//! lines (encoded, decoded, then typed), so the codec is part of every exchange.

use std::collections::BTreeMap;
use std::time::Duration;

use nodus_tasks::cluster::fetch::{chunk_of, sha256_hex};
use nodus_tasks::cluster::msg::{Refusal, RefuseReason, TaskReport};
use nodus_tasks::cluster::{
    AgentState, AppPackage, Blob, Body, InDoubt, Manager, ManagerAction, ManagerConfig, NodeType, Packet, ResultBody,
    Specs, Standalone, TaskSpec, TaskStatus, WorkerAction, WorkerConfig, WorkerNode,
};
use nodus_tasks::sched::AttemptEnd;
use nodus_tasks::store::{Claim, Finish, Outcome};
use nodus_tasks::task::{json, Claimed, ErrorKind, Lease, TaskId, UnixMs};
use nodus_wire::Message;

const T0: UnixMs = UnixMs(1_700_000_000_000);

fn id(n: u64) -> TaskId {
    format!("t{n}").parse().unwrap()
}

fn specs(concurrency: u32, queue: u32) -> Specs {
    Specs {
        cores: 4,
        memory: 8 << 30,
        concurrency,
        queue,
        ip: "10.0.0.2".into(),
        mac: "52:54:00:00:00:02".into(),
        apps: vec![],
        procedures: vec!["procs.add".into()],
    }
}

fn claimed(n: u64, lease: u64, attempt: u32, timeout_ms: u64) -> Claimed {
    Claimed {
        id: id(n),
        procedure: "procs.add".into(),
        app: "procs".into(),
        args: json(&format!("[{n}]")).unwrap(),
        attempt,
        max_attempts: 3,
        timeout: Duration::from_millis(timeout_ms),
        lease: Lease(lease),
        created_at: T0,
        parent: None,
        deadline: None,
    }
}

/// Through the text form and back, as a node message from `from` to `to`.
fn carry(from: &str, to: &str, p: &Packet) -> Packet {
    let mut m = p.to_message();
    m.from = nodus_wire::Address::new(from, "tasks");
    m.to = nodus_wire::Address::new(to, "tasks");
    let line = nodus_wire::text::to_line(&m);
    let back: Message = nodus_wire::text::from_line(&line).expect("a valid line");
    Packet::from_message(&back).expect("a valid packet")
}

/// One manager and some worker nodes joined by a lossless, instant network.
struct Net {
    now: UnixMs,
    manager: Manager,
    workers: BTreeMap<String, WorkerNode>,
    /// Every message delivered: (from, to, packet).
    log: Vec<(String, String, Packet)>,
    /// Manager actions other than sends.
    m_out: Vec<ManagerAction>,
    /// Worker actions other than sends.
    w_out: Vec<(String, WorkerAction)>,
    /// Messages to these nodes are lost.
    cut: Vec<String>,
    /// Messages of this command are held (not delivered) until `release`.
    hold: Option<&'static str>,
    held: Vec<(String, String, Packet)>,
}

impl Net {
    fn new(workers: &[(&str, Vec<String>, Specs)]) -> Net {
        Net::with(ManagerConfig::new("m1", ["w1".to_string(), "w2".to_string()]), workers)
    }

    fn with(mconfig: ManagerConfig, workers: &[(&str, Vec<String>, Specs)]) -> Net {
        let mut manager = Manager::new(mconfig, vec![], 1, T0);
        manager.set_app("procs", None, T0);
        let workers = workers
            .iter()
            .enumerate()
            .map(|(n, (name, managers, s))| {
                let c = WorkerConfig::new(*name, managers.clone(), s.clone());
                (name.to_string(), WorkerNode::new(c, 10 + n as u64, T0))
            })
            .collect();
        Net {
            now: T0,
            manager,
            workers,
            log: vec![],
            m_out: vec![],
            w_out: vec![],
            cut: vec![],
            hold: None,
            held: vec![],
        }
    }

    /// Delivers everything sent until nothing more is.
    fn pump(&mut self) {
        loop {
            let mut sends: Vec<(String, String, Packet)> = Vec::new();
            while let Some(a) = self.manager.poll_action() {
                match a {
                    ManagerAction::Send { to, packet } => sends.push(("m1".into(), to, packet)),
                    other => self.m_out.push(other),
                }
            }
            for (name, w) in self.workers.iter_mut() {
                while let Some(a) = w.poll_action() {
                    match a {
                        WorkerAction::Send { to, packet } => sends.push((name.clone(), to, packet)),
                        other => self.w_out.push((name.clone(), other)),
                    }
                }
            }
            if sends.is_empty() {
                return;
            }
            for (from, to, packet) in sends {
                if self.cut.contains(&to) || self.cut.contains(&from) {
                    continue;
                }
                if self.hold == Some(packet.body.command()) {
                    self.held.push((from, to, packet));
                    continue;
                }
                let p = carry(&from, &to, &packet);
                self.log.push((from.clone(), to.clone(), p.clone()));
                if to == "m1" {
                    self.manager.handle_packet(&from, p, self.now);
                } else if let Some(w) = self.workers.get_mut(&to) {
                    w.handle_packet(&from, p, self.now);
                }
            }
        }
    }

    /// Delivers the held messages.
    fn release(&mut self) {
        for (from, to, p) in std::mem::take(&mut self.held) {
            self.log.push((from.clone(), to.clone(), p.clone()));
            self.deliver_from(&from, &to, p);
        }
        self.pump();
    }

    fn tick(&mut self) {
        self.manager.tick(self.now);
        for w in self.workers.values_mut() {
            w.tick(self.now);
        }
        self.pump();
    }

    /// Advances the clock by `d`, ticking every node at each of its deadlines on the way.
    fn advance(&mut self, d: Duration) {
        let end = self.now.plus(d);
        loop {
            let next = std::iter::once(self.manager.next_deadline())
                .chain(self.workers.values().map(|w| w.next_deadline()))
                .flatten()
                .filter(|t| *t <= end)
                .min();
            match next {
                Some(t) => {
                    self.now = t.max(self.now);
                    self.tick();
                }
                None => break,
            }
        }
        self.now = end;
        self.tick();
    }

    fn w(&mut self, name: &str) -> &mut WorkerNode {
        self.workers.get_mut(name).unwrap()
    }

    /// Sends `body` from `from` to `to` as request `id` and returns what `to` answered.
    fn ask(&mut self, from: &str, to: &str, id: u64, body: Body) -> Body {
        let p = carry(from, to, &Packet::new(id, body));
        if to == "m1" {
            self.manager.handle_packet(from, p, self.now);
        } else {
            let now = self.now;
            self.w(to).handle_packet(from, p, now);
        }
        // The answer is among what `to` sends now; the rest goes out as usual.
        let answer = self.take_send(to, from, id);
        self.pump();
        answer.expect("every request is answered")
    }

    /// Takes the answer to `id` from `node`'s pending sends (other sends stay queued).
    fn take_send(&mut self, node: &str, to: &str, id: u64) -> Option<Body> {
        let mut found = None;
        let mut keep = Vec::new();
        if node == "m1" {
            while let Some(a) = self.manager.poll_action() {
                match a {
                    ManagerAction::Send { to: t, packet }
                        if t == to && packet.id == id && packet.body.is_answer() && found.is_none() =>
                    {
                        found = Some(carry(node, to, &packet).body)
                    }
                    ManagerAction::Send { to: t, packet } => keep.push((t, packet)),
                    other => self.m_out.push(other),
                }
            }
            for (t, p) in keep {
                self.log.push(("m1".into(), t.clone(), p.clone()));
                self.deliver_from("m1", &t, p);
            }
        } else {
            let w = self.workers.get_mut(node).unwrap();
            while let Some(a) = w.poll_action() {
                match a {
                    WorkerAction::Send { to: t, packet }
                        if t == to && packet.id == id && packet.body.is_answer() && found.is_none() =>
                    {
                        found = Some(carry(node, to, &packet).body)
                    }
                    WorkerAction::Send { to: t, packet } => keep.push((t, packet)),
                    other => self.w_out.push((node.to_string(), other)),
                }
            }
            for (t, p) in keep {
                self.log.push((node.to_string(), t.clone(), p.clone()));
                self.deliver_from(node, &t, p);
            }
        }
        found
    }

    fn deliver_from(&mut self, from: &str, to: &str, p: Packet) {
        if self.cut.iter().any(|c| c == from || c == to) {
            return;
        }
        let p = carry(from, to, &p);
        if to == "m1" {
            self.manager.handle_packet(from, p, self.now);
        } else if let Some(w) = self.workers.get_mut(to) {
            w.handle_packet(from, p, self.now);
        }
    }

    /// Commands `from` sent to `to` so far (in order), then forgets the log.
    fn sent(&mut self, from: &str, to: &str) -> Vec<&'static str> {
        let out = self.log.iter().filter(|(f, t, _)| f == from && t == to).map(|(_, _, p)| p.body.command()).collect();
        self.log.clear();
        out
    }

    fn bodies(&self, from: &str, to: &str, command: &str) -> Vec<Body> {
        self.log
            .iter()
            .filter(|(f, t, p)| f == from && t == to && p.body.command() == command)
            .map(|(_, _, p)| p.body.clone())
            .collect()
    }

    fn claims(&mut self) -> Vec<Claim> {
        let mut out = vec![];
        self.m_out.retain(|a| match a {
            ManagerAction::Claim(c) => {
                out.push(c.clone());
                false
            }
            _ => true,
        });
        out
    }

    /// Answers the outstanding claim for `worker` with `tasks` (claims for others stay).
    fn give(&mut self, worker: &str, tasks: Vec<Claimed>) {
        self.pump();
        let pos = self.m_out.iter().position(|a| matches!(a, ManagerAction::Claim(c) if c.owner == worker));
        let Some(ManagerAction::Claim(c)) = pos.map(|p| self.m_out.remove(p)) else {
            panic!("no claim for {worker}: {:?}\n{:#?}", self.m_out, self.manager)
        };
        self.manager.handle_claimed(&c.owner, &c.app, c.max, Ok(tasks), self.now);
        self.pump();
    }

    /// Takes the records and tells the manager they are durable.
    fn records(&mut self) -> Vec<Finish> {
        let mut out = vec![];
        self.m_out.retain(|a| match a {
            ManagerAction::Record(f) => {
                out.push(f.clone());
                false
            }
            _ => true,
        });
        for f in &out {
            self.manager.handle_recorded(&f.id, f.lease, self.now);
        }
        self.pump();
        out
    }

    fn runs(&mut self, worker: &str) -> Vec<TaskSpec> {
        let mut out = vec![];
        self.w_out.retain(|(w, a)| match a {
            WorkerAction::Run(s) if w == worker => {
                out.push(s.clone());
                false
            }
            _ => true,
        });
        out
    }

    fn kills(&mut self, worker: &str) -> Vec<(TaskId, Lease)> {
        let mut out = vec![];
        self.w_out.retain(|(w, a)| match a {
            WorkerAction::Kill { id, lease } if w == worker => {
                out.push((id.clone(), *lease));
                false
            }
            _ => true,
        });
        out
    }

    fn end(&mut self, worker: &str, n: u64, lease: u64, end: AttemptEnd) {
        let now = self.now;
        self.w(worker).handle_end(&id(n), Lease(lease), end, now);
        self.pump();
    }

    /// Worker `w` pairs with m1 (the network starts it).
    fn paired(&mut self) {
        self.tick();
        for (name, w) in &self.workers {
            assert_eq!(w.manager(), Some("m1"), "{name} pairs");
        }
    }
}

fn m1() -> Vec<String> {
    vec!["m1".to_string()]
}

fn outcome(f: &Finish) -> String {
    match &f.outcome {
        Outcome::Done(r) => format!("done {}", r.get()),
        Outcome::Failed(e) => format!("failed {}", e.kind),
        Outcome::Retry { error, .. } => format!("retry {}", error.kind),
        Outcome::Release { .. } => "release".into(),
    }
}

// ---- NodeTypeRequest / NodeTypeAnswer ----

#[test]
fn node_type_requests_are_answered_with_the_answerers_type() {
    let mut net = Net::new(&[("w1", m1(), specs(2, 2))]);
    let ask = Body::NodeTypeRequest { node_type: NodeType::Worker };
    assert_eq!(net.ask("w2", "m1", 7, ask.clone()), Body::NodeTypeAnswer { node_type: NodeType::Manager });
    assert_eq!(net.ask("m1", "w1", 8, ask.clone()), Body::NodeTypeAnswer { node_type: NodeType::Worker });
    let mut s = Standalone::new(100);
    let a = s.handle(&Packet::new(9, ask)).unwrap();
    assert_eq!(a, Packet::new(9, Body::NodeTypeAnswer { node_type: NodeType::Standalone }));
}

#[test]
fn pairing_is_node_type_then_manager_request_then_accepted() {
    let mut net = Net::new(&[("w1", m1(), specs(2, 2))]);
    net.paired();
    assert_eq!(net.sent("w1", "m1"), vec!["NODE_TYPE_REQUEST", "MANAGER_REQUEST"]);
    let a = net.manager.registry().get("w1").expect("registered");
    assert_eq!(
        (a.state, a.cores, a.ip.as_str(), a.mac.as_str()),
        (AgentState::Active, 4, "10.0.0.2", "52:54:00:00:00:02")
    );
    assert!(!a.id.is_empty());
    // While paired, it never asks anyone again (the log has messages to any node, existing
    // or not).
    net.advance(Duration::from_secs(60));
    assert!(!net.log.iter().any(|(f, _, p)| f == "w1" && p.body.command() == "MANAGER_REQUEST"));
    assert!(net.log.iter().all(|(f, t, _)| f != "w1" || t == "m1"), "it only talks to its configured manager");
    assert_eq!(net.w("w1").manager(), Some("m1"));
}

#[test]
fn a_type_change_under_a_relationship_ends_it_with_a_bye() {
    // The worker's manager now says it is a worker.
    let mut net = Net::new(&[("w1", m1(), specs(2, 2))]);
    net.paired();
    net.give("w1", vec![claimed(1, 11, 1, 60_000)]);
    assert_eq!(net.runs("w1").len(), 1);
    net.log.clear();
    let a = net.ask("m1", "w1", 500, Body::NodeTypeRequest { node_type: NodeType::Worker });
    assert_eq!(a, Body::NodeTypeAnswer { node_type: NodeType::Worker });
    assert_eq!(net.w("w1").manager(), None);
    assert_eq!(net.kills("w1"), vec![(id(1), Lease(11))], "its tasks stop");
    assert!(net.sent("w1", "m1").contains(&"MANAGER_BYE"));

    // The manager's worker now says it is a manager.
    let mut net = Net::new(&[("w1", m1(), specs(2, 2))]);
    net.paired();
    net.give("w1", vec![claimed(1, 11, 1, 60_000)]);
    net.log.clear();
    net.ask("w1", "m1", 501, Body::NodeTypeRequest { node_type: NodeType::Manager });
    assert_eq!(net.manager.workers().count(), 0);
    assert!(net.sent("m1", "w1").contains(&"MANAGER_BYE"));
    let r = net.records();
    assert_eq!(r.iter().map(outcome).collect::<Vec<_>>(), vec!["retry WorkerLost"], "its task runs again");
}

// ---- ManagerRequest / ManagerAnswer ----

#[test]
fn manager_requests_are_refused_unless_configured_unbanned_and_known_as_a_worker() {
    let mut net = Net::new(&[]);
    let req = Body::ManagerRequest(specs(1, 1));
    // Unknown type (no NodeTypeRequest first).
    assert_eq!(net.ask("w1", "m1", 1, req.clone()), Body::ManagerAnswer { accepted: false });
    // Not configured.
    net.ask("w9", "m1", 2, Body::NodeTypeRequest { node_type: NodeType::Worker });
    assert_eq!(net.ask("w9", "m1", 3, req.clone()), Body::ManagerAnswer { accepted: false });
    // Known as a manager.
    net.ask("w2", "m1", 4, Body::NodeTypeRequest { node_type: NodeType::Manager });
    assert_eq!(net.ask("w2", "m1", 5, req.clone()), Body::ManagerAnswer { accepted: false });
    // Banned.
    let now = net.now;
    net.manager.ban("w1", true, now);
    net.ask("w1", "m1", 6, Body::NodeTypeRequest { node_type: NodeType::Worker });
    assert_eq!(net.ask("w1", "m1", 7, req.clone()), Body::ManagerAnswer { accepted: false });
    net.manager.ban("w1", false, now);
    assert_eq!(net.ask("w1", "m1", 8, req.clone()), Body::ManagerAnswer { accepted: true });
    // A worker node and a standalone node answer false.
    let mut net = Net::new(&[("w1", m1(), specs(1, 1))]);
    assert_eq!(net.ask("w2", "w1", 9, req.clone()), Body::ManagerAnswer { accepted: false });
    let mut s = Standalone::new(0);
    assert_eq!(s.handle(&Packet::new(10, req)).unwrap().body, Body::ManagerAnswer { accepted: false });
}

#[test]
fn a_worker_that_is_not_allowed_to_pair_keeps_trying_with_backoff_and_never_pairs() {
    let mut cfg = ManagerConfig::new("m1", ["w2".to_string()]);
    cfg.registry.max_agents = 10;
    let mut net = Net::with(cfg, &[("w1", m1(), specs(2, 2))]);
    net.advance(Duration::from_secs(30));
    assert_eq!(net.w("w1").manager(), None);
    let asked = net.sent("w1", "m1").iter().filter(|c| **c == "MANAGER_REQUEST").count();
    // Backoff from 0.5 s doubling to 30 s: a handful of rounds in 30 s, not hundreds.
    assert!((3..=8).contains(&asked), "{asked} requests");
    assert!(net.manager.registry().get("w1").is_none());
    assert!(net.claims().is_empty());
}

#[test]
fn a_refusal_moves_on_to_the_next_manager() {
    // m0 does not exist (its messages are lost), m1 accepts.
    let mut net = Net::new(&[("w1", vec!["m0".into(), "m1".into()], specs(2, 2))]);
    net.tick();
    assert_eq!(net.w("w1").manager(), None, "waiting for m0");
    net.advance(Duration::from_secs(2));
    assert_eq!(net.w("w1").manager(), Some("m1"), "m0 was silent: next");
}

#[test]
fn an_acceptance_the_worker_cannot_take_is_answered_with_a_bye() {
    let mut net = Net::new(&[("w1", vec!["m1".into(), "m2".into()], specs(2, 2))]);
    net.paired();
    net.log.clear();
    // From its own manager: not considered; the relationship is checked with a ping.
    let now = net.now;
    net.w("w1").handle_packet("m1", Packet::new(77, Body::ManagerAnswer { accepted: true }), now);
    net.w("w1").tick(now);
    net.pump();
    assert_eq!(net.sent("w1", "m1"), vec!["MANAGER_PING"]);
    assert_eq!(net.w("w1").manager(), Some("m1"));
    // From another manager while it has one.
    net.w("w1").handle_packet("m2", Packet::new(78, Body::ManagerAnswer { accepted: true }), now);
    assert!(sends(net.w("w1")).iter().any(|(to, b)| to == "m2" && *b == Body::ManagerBye));
    // From a node it may not be managed by, and from one not known as a manager.
    let mut net = Net::new(&[("w1", vec!["m2".into(), "m3".into()], specs(2, 2))]);
    net.w("w1").handle_packet("m9", Packet::new(1, Body::ManagerAnswer { accepted: true }), T0);
    assert!(sends(net.w("w1")).iter().any(|(to, b)| to == "m9" && *b == Body::ManagerBye));
    net.w("w1").handle_packet("m3", Packet::new(2, Body::ManagerAnswer { accepted: true }), T0);
    assert!(sends(net.w("w1")).iter().any(|(to, b)| to == "m3" && *b == Body::ManagerBye), "type unknown");
    net.w("w1").handle_packet("m3", Packet::new(3, Body::NodeTypeRequest { node_type: NodeType::Worker }), T0);
    net.w("w1").handle_packet("m3", Packet::new(4, Body::ManagerAnswer { accepted: true }), T0);
    assert!(sends(net.w("w1")).iter().any(|(to, b)| to == "m3" && *b == Body::ManagerBye), "known as a worker");
    assert_eq!(net.w("w1").manager(), None);
    // A manager that gets an acceptance (it is a manager), and a standalone node.
    let mut net = Net::new(&[]);
    net.manager.handle_packet("w1", Packet::new(5, Body::ManagerAnswer { accepted: true }), T0);
    assert!(manager_sends(&mut net.manager).iter().any(|(to, b)| to == "w1" && *b == Body::ManagerBye));
    let mut s = Standalone::new(0);
    assert_eq!(s.handle(&Packet::new(6, Body::ManagerAnswer { accepted: true })).unwrap().body, Body::ManagerBye);
    // accepted: false is never answered.
    assert!(s.handle(&Packet::new(7, Body::ManagerAnswer { accepted: false })).is_none());
}

#[test]
fn a_late_acceptance_from_an_allowed_manager_is_taken_when_free() {
    let mut net = Net::new(&[("w1", vec!["m1".into()], specs(2, 2))]);
    // The acceptance is held on the way; the worker's request times out and it backs off.
    net.hold = Some("MANAGER_ANSWER");
    net.tick();
    assert_eq!(net.held.len(), 1);
    net.advance(Duration::from_millis(2_100));
    assert_eq!(net.w("w1").manager(), None);
    // When it arrives, nothing stops the worker from taking it.
    net.hold = None;
    net.release();
    assert_eq!(net.w("w1").manager(), Some("m1"));
    assert!(net.bodies("w1", "m1", "MANAGER_BYE").is_empty());
}

fn sends(w: &mut WorkerNode) -> Vec<(String, Body)> {
    std::iter::from_fn(|| w.poll_action())
        .filter_map(|a| match a {
            WorkerAction::Send { to, packet } => Some((to, packet.body)),
            _ => None,
        })
        .collect()
}

fn manager_sends(m: &mut Manager) -> Vec<(String, Body)> {
    std::iter::from_fn(|| m.poll_action())
        .filter_map(|a| match a {
            ManagerAction::Send { to, packet } => Some((to, packet.body)),
            _ => None,
        })
        .collect()
}

// ---- ManagerBye ----

#[test]
fn manager_bye_is_always_acknowledged_and_ends_a_relationship() {
    let mut net = Net::new(&[("w1", m1(), specs(2, 2)), ("w2", m1(), specs(2, 2))]);
    net.paired();
    net.give("w1", vec![claimed(1, 11, 1, 60_000)]);
    net.give("w2", vec![claimed(2, 12, 1, 60_000)]);
    assert_eq!(net.runs("w1").len(), 1);
    // From a stranger: Ack, nothing changes.
    assert_eq!(net.ask("w9", "w1", 1, Body::ManagerBye), Body::Ack);
    assert_eq!(net.ask("w9", "m1", 2, Body::ManagerBye), Body::Ack);
    assert_eq!(net.w("w1").manager(), Some("m1"));
    // The worker leaves: the manager acknowledges, its task runs again, the agent is gone.
    assert_eq!(net.ask("w2", "m1", 3, Body::ManagerBye), Body::Ack);
    assert_eq!(net.manager.workers().collect::<Vec<_>>(), vec!["w1"]);
    assert_eq!(net.records().iter().map(outcome).collect::<Vec<_>>(), vec!["retry WorkerLost"]);
    assert_eq!(net.manager.registry().get("w2").unwrap().state, AgentState::Gone);
    // The manager leaves: the worker acknowledges and stops its tasks.
    assert_eq!(net.ask("m1", "w1", 4, Body::ManagerBye), Body::Ack);
    assert_eq!(net.kills("w1"), vec![(id(1), Lease(11))]);
    assert_eq!(net.w("w1").tasks(), 0);
}

#[test]
fn a_worker_that_leaves_says_bye_and_its_tasks_run_again() {
    let mut net = Net::new(&[("w1", m1(), specs(2, 2))]);
    net.paired();
    net.give("w1", vec![claimed(1, 11, 1, 60_000)]);
    net.log.clear();
    let now = net.now;
    net.w("w1").leave(now);
    net.pump();
    assert_eq!(net.sent("w1", "m1"), vec!["MANAGER_BYE"]);
    assert_eq!(net.sent("m1", "w1"), Vec::<&str>::new(), "the Ack was logged under the first sent() call");
    assert_eq!(net.records().iter().map(outcome).collect::<Vec<_>>(), vec!["retry WorkerLost"]);
    net.advance(Duration::from_secs(60));
    assert_eq!(net.w("w1").manager(), None, "it does not pair again");
}

// ---- ManagerPing / ManagerPong / NotMine ----

#[test]
fn pings_are_answered_pong_inside_a_relationship_and_not_mine_outside() {
    let mut net = Net::new(&[("w1", m1(), specs(2, 2))]);
    net.paired();
    assert_eq!(net.ask("m1", "w1", 1, Body::ManagerPing), Body::ManagerPong);
    assert_eq!(net.ask("w1", "m1", 2, Body::ManagerPing), Body::ManagerPong);
    assert_eq!(net.ask("m2", "w1", 3, Body::ManagerPing), Body::NotMine);
    assert_eq!(net.ask("w2", "m1", 4, Body::ManagerPing), Body::NotMine);
    let mut s = Standalone::new(0);
    assert_eq!(s.handle(&Packet::new(5, Body::ManagerPing)).unwrap().body, Body::NotMine);
    // Both sides ping every ping interval.
    net.log.clear();
    net.advance(Duration::from_secs(10));
    let from_m = net.bodies("m1", "w1", "MANAGER_PING").len();
    let from_w = net.bodies("w1", "m1", "MANAGER_PING").len();
    assert!((4..=6).contains(&from_m) && (4..=6).contains(&from_w), "{from_m} {from_w}");
}

#[test]
fn relationship_messages_from_strangers_are_answered_not_mine() {
    let mut net = Net::new(&[("w1", m1(), specs(2, 2))]);
    net.paired();
    let spec = TaskSpec {
        id: id(1),
        lease: Lease(1),
        attempt: 1,
        procedure: "procs.add".into(),
        app: "procs".into(),
        args: json("[]").unwrap(),
        timeout: Duration::from_secs(1),
        package: None,
        deadline: None,
    };
    let to_worker = [
        Body::TasksExecute { tasks: vec![spec] },
        Body::TasksPing { tasks: vec![id(1)] },
        Body::TasksAbort { tasks: vec![id(1)] },
        Body::Fetch { blob: Blob::Result { task_id: id(1), lease: Lease(1) }, offset: 0, max_len: 10 },
        // A worker node manages nobody.
        Body::TaskStarted { task_id: id(1), lease: Lease(1), datetime: T0 },
        Body::TaskError { task_id: id(1), lease: Lease(1), error: ErrorKind::RunningError, message: "x".into() },
        Body::TaskCompleted { task_id: id(1), lease: Lease(1), result: ResultBody::Inline(json("1").unwrap()) },
    ];
    for (n, b) in to_worker.iter().enumerate() {
        assert_eq!(net.ask("m2", "w1", 100 + n as u64, b.clone()), Body::NotMine, "{}", b.command());
    }
    assert_eq!(net.w("w1").tasks(), 0);
    let to_manager = [
        Body::TaskStarted { task_id: id(1), lease: Lease(1), datetime: T0 },
        Body::TaskError { task_id: id(1), lease: Lease(1), error: ErrorKind::RunningError, message: "x".into() },
        Body::TaskCompleted { task_id: id(1), lease: Lease(1), result: ResultBody::Inline(json("1").unwrap()) },
        Body::Fetch {
            blob: Blob::Package { app: "procs".into(), version: "1".into(), hash: "a".repeat(64) },
            offset: 0,
            max_len: 10,
        },
        // A manager is nobody's worker, not even its own workers'.
        Body::TasksExecute { tasks: vec![] },
        Body::TasksPing { tasks: vec![id(1)] },
        Body::TasksAbort { tasks: vec![id(1)] },
    ];
    for (n, b) in to_manager.iter().enumerate() {
        assert_eq!(net.ask("w2", "m1", 200 + n as u64, b.clone()), Body::NotMine, "{}", b.command());
    }
    for b in &to_manager[4..] {
        assert_eq!(net.ask("w1", "m1", 300, b.clone()), Body::NotMine, "{} from its own worker", b.command());
    }
    assert!(net.records().is_empty(), "nothing recorded from strangers");
    let mut s = Standalone::new(0);
    for b in to_worker.iter().chain(&to_manager) {
        assert_eq!(s.handle(&Packet::new(1, b.clone())).unwrap().body, Body::NotMine);
    }
}

#[test]
fn not_mine_ends_the_relationship_on_the_side_that_gets_it() {
    // The worker gets NotMine from its manager (which restarted and forgot it): it keeps its
    // tasks and pairs again with the same manager first.
    let mut net = Net::new(&[("w1", vec!["m1".into(), "m2".into()], specs(2, 2))]);
    net.paired();
    net.give("w1", vec![claimed(1, 11, 1, 60_000)]);
    assert_eq!(net.runs("w1").len(), 1);
    let fresh = Manager::new(ManagerConfig::new("m1", ["w1".to_string()]), vec![], 2, net.now);
    net.manager = fresh;
    net.manager.set_app("procs", None, net.now);
    net.log.clear();
    net.advance(Duration::from_secs(2));
    let cmds = net.sent("w1", "m1");
    assert_eq!(&cmds[..3], ["MANAGER_PING", "NODE_TYPE_REQUEST", "MANAGER_REQUEST"], "{cmds:?}");
    assert_eq!(net.w("w1").manager(), Some("m1"));
    assert_eq!(net.w("w1").tasks(), 1, "the task was kept");
    assert!(net.kills("w1").is_empty());

    // The manager gets NotMine from its worker: the relationship ends, its tasks run again.
    let mut net = Net::new(&[("w1", m1(), specs(2, 2))]);
    net.paired();
    net.give("w1", vec![claimed(1, 11, 1, 60_000)]);
    let w = WorkerNode::new(WorkerConfig::new("w1", vec!["m2".into()], specs(2, 2)), 99, net.now);
    net.workers.insert("w1".into(), w);
    net.cut = vec!["m2".into()];
    net.advance(Duration::from_secs(2));
    assert_eq!(net.manager.workers().count(), 0);
    assert_eq!(net.records().iter().map(outcome).collect::<Vec<_>>(), vec!["retry WorkerLost"]);
}

// ---- TasksExecute and its refusal ----

#[test]
fn tasks_execute_is_acked_or_refused_task_by_task() {
    let mut net = Net::new(&[("w1", m1(), specs(1, 1))]);
    net.paired();
    let claims: Vec<usize> =
        net.m_out.iter().filter_map(|a| if let ManagerAction::Claim(c) = a { Some(c.max) } else { None }).collect();
    assert_eq!(claims, vec![2], "capacity = concurrency + queue");
    net.give("w1", vec![claimed(1, 11, 1, 60_000), claimed(2, 12, 1, 60_000)]);
    assert_eq!(net.bodies("m1", "w1", "TASKS_EXECUTE").len(), 1, "one batch");
    assert_eq!(net.bodies("w1", "m1", "ACK").len(), 1);
    assert_eq!(net.runs("w1").iter().map(|s| s.id.clone()).collect::<Vec<_>>(), vec![id(1)], "one runs, one waits");
    let specs_of = |n: u64, lease: u64, timeout: u64| TaskSpec {
        id: id(n),
        lease: Lease(lease),
        attempt: 1,
        procedure: "procs.add".into(),
        app: "procs".into(),
        args: json("[]").unwrap(),
        timeout: Duration::from_millis(timeout),
        package: None,
        deadline: None,
    };
    // Full: refused Busy. A zero timeout: refused Invalid.
    let a = net.ask("m1", "w1", 900, Body::TasksExecute { tasks: vec![specs_of(3, 13, 1000), specs_of(4, 14, 0)] });
    let Body::TasksRefused { tasks } = a else { panic!("{a:?}") };
    assert_eq!(
        tasks.iter().map(|r| (r.task_id.clone(), r.reason)).collect::<Vec<_>>(),
        vec![(id(3), RefuseReason::Busy), (id(4), RefuseReason::Busy)]
    );
    // A copy of an attempt it has is not taken twice; a newer attempt replaces the older.
    assert_eq!(net.ask("m1", "w1", 901, Body::TasksExecute { tasks: vec![specs_of(1, 11, 60_000)] }), Body::Ack);
    assert!(net.runs("w1").is_empty());
    assert_eq!(net.ask("m1", "w1", 902, Body::TasksExecute { tasks: vec![specs_of(1, 21, 60_000)] }), Body::Ack);
    assert_eq!(net.kills("w1"), vec![(id(1), Lease(11))]);
    // Shutting down: refused.
    net.w("w1").begin_shutdown();
    let a = net.ask("m1", "w1", 903, Body::TasksExecute { tasks: vec![specs_of(5, 15, 1000)] });
    assert!(matches!(a, Body::TasksRefused { tasks } if tasks[0].reason == RefuseReason::ShuttingDown));
    let mut idle = Net::new(&[("w1", m1(), specs(4, 0))]);
    idle.paired();
    let a = idle.ask("m1", "w1", 904, Body::TasksExecute { tasks: vec![specs_of(6, 16, 0)] });
    assert!(matches!(a, Body::TasksRefused { tasks } if tasks[0].reason == RefuseReason::Invalid));
}

/// A task whose deadline passes while it waits in a worker node's queue is not started there:
/// it goes back to the manager uncounted (whose store never claims it again, and expires it).
#[test]
fn a_task_past_its_deadline_in_a_workers_queue_is_not_started() {
    let mut net = Net::new(&[("w1", m1(), specs(1, 1))]);
    net.paired();
    let mut late = claimed(2, 12, 1, 60_000);
    late.deadline = Some(net.now.plus(Duration::from_millis(100)));
    net.give("w1", vec![claimed(1, 11, 1, 60_000), late]);
    assert_eq!(net.runs("w1").iter().map(|s| s.id.clone()).collect::<Vec<_>>(), vec![id(1)], "one runs, one waits");
    net.advance(Duration::from_millis(200));
    net.end("w1", 1, 11, AttemptEnd::Returned(json("1").unwrap()));
    assert!(net.runs("w1").is_empty(), "the expired task is not started");
    assert_eq!(net.records().iter().map(outcome).collect::<Vec<_>>(), vec!["done 1", "release"]);
    // One still within its deadline runs.
    let mut soon = claimed(3, 13, 1, 60_000);
    soon.deadline = Some(net.now.plus(Duration::from_secs(60)));
    net.give("w1", vec![soon]);
    assert_eq!(net.runs("w1").iter().map(|s| s.id.clone()).collect::<Vec<_>>(), vec![id(3)]);
}

#[test]
fn refused_tasks_run_again_uncounted() {
    let mut net = Net::new(&[("w1", m1(), specs(1, 0))]);
    net.paired();
    assert_eq!(net.claims().iter().map(|c| c.max).collect::<Vec<_>>(), vec![1]);
    // The store hands the manager more than the worker holds: the worker refuses the rest.
    let now = net.now;
    net.manager.handle_claimed("w1", "procs", 1, Ok(vec![claimed(1, 11, 1, 60_000), claimed(2, 12, 1, 60_000)]), now);
    net.pump();
    let refused = net.bodies("w1", "m1", "TASKS_REFUSED");
    let want =
        Refusal { task_id: id(2), reason: RefuseReason::Busy, message: "1 tasks held; the node declared 1".into() };
    assert!(matches!(&refused[..], [Body::TasksRefused { tasks }] if tasks == &vec![want]), "{refused:?}");
    assert_eq!(net.records().iter().map(outcome).collect::<Vec<_>>(), vec!["release"]);
    assert_eq!(net.manager.assigned_to(&id(1)), Some("w1"));
    assert_eq!(net.manager.assigned_to(&id(2)), None);
    assert_eq!(net.manager.stats().released, 1);
    // A worker that refused is left alone for a moment, even with room and work.
    net.end("w1", 1, 11, AttemptEnd::Returned(json("1").unwrap()));
    net.records();
    let now = net.now;
    net.manager.handle_submitted("procs", now);
    net.pump();
    assert!(net.claims().is_empty(), "paused after a refusal");
    net.advance(Duration::from_millis(5));
    assert_eq!(net.claims().into_iter().map(|c| c.owner).collect::<Vec<_>>(), vec!["w1".to_string()]);
}

#[test]
fn tasks_execute_to_a_node_that_is_not_the_workers_manager_any_more_releases_the_batch() {
    let mut net = Net::new(&[("w1", m1(), specs(2, 2))]);
    net.paired();
    // The worker restarts (forgetting its manager) just before the batch arrives.
    let w = WorkerNode::new(WorkerConfig::new("w1", vec!["m2".into()], specs(2, 2)), 99, net.now);
    net.workers.insert("w1".into(), w);
    net.cut = vec!["m2".into()];
    net.give("w1", vec![claimed(1, 11, 1, 60_000)]);
    assert_eq!(net.bodies("w1", "m1", "NOT_MINE").len(), 1);
    assert_eq!(
        net.records().iter().map(outcome).collect::<Vec<_>>(),
        vec!["release"],
        "never taken: the attempt does not count"
    );
    assert_eq!(net.manager.workers().count(), 0);
}

// ---- TasksPing / TasksPong ----

#[test]
fn tasks_pong_has_one_status_per_task_asked() {
    let mut net = Net::new(&[("w1", m1(), specs(2, 2))]);
    net.paired();
    net.give(
        "w1",
        vec![
            claimed(1, 11, 1, 60_000),
            claimed(2, 12, 1, 60_000),
            claimed(3, 13, 1, 60_000),
            claimed(4, 14, 1, 60_000),
        ],
    );
    assert_eq!(net.runs("w1").len(), 2);
    // t1 completes, t2 fails; their reports are not acknowledged yet (records not durable).
    net.end("w1", 1, 11, AttemptEnd::Returned(json("{\"sum\":1}").unwrap()));
    net.end("w1", 2, 12, AttemptEnd::Failed("boom".into()));
    let started = net.now;
    let a = net.ask("m1", "w1", 600, Body::TasksPing { tasks: vec![id(1), id(2), id(3), id(4), id(5)] });
    let Body::TasksPong { tasks_status } = a else { panic!("{a:?}") };
    let got: BTreeMap<TaskId, (Lease, TaskStatus)> =
        tasks_status.into_iter().map(|r| (r.task_id, (r.lease, r.status))).collect();
    assert_eq!(got.len(), 5);
    assert_eq!(got[&id(1)], (Lease(11), TaskStatus::Completed(Some(json("{\"sum\":1}").unwrap()))));
    assert_eq!(got[&id(2)], (Lease(12), TaskStatus::Error(ErrorKind::RunningError)));
    assert_eq!(got[&id(3)], (Lease(13), TaskStatus::Started(started)), "it started when a slot freed");
    assert_eq!(got[&id(4)], (Lease(14), TaskStatus::Started(started)));
    assert_eq!(got[&id(5)], (Lease(0), TaskStatus::Unknown));
    // Acknowledged reports are forgotten: then the task is unknown.
    let r = net.records();
    assert_eq!(r.iter().map(outcome).collect::<Vec<_>>(), vec!["done {\"sum\":1}", "failed RunningError"]);
    let a = net.ask("m1", "w1", 601, Body::TasksPing { tasks: vec![id(1)] });
    assert!(
        matches!(a, Body::TasksPong { tasks_status } if tasks_status == vec![TaskReport { task_id: id(1), lease: Lease(0), status: TaskStatus::Unknown }])
    );
}

#[test]
fn a_restarted_manager_asks_its_workers_and_records_what_completed_while_it_was_down() {
    let mut net = Net::new(&[("w1", m1(), specs(4, 0))]);
    net.paired();
    net.give("w1", vec![claimed(1, 11, 1, 60_000), claimed(2, 12, 1, 60_000), claimed(3, 13, 1, 60_000)]);
    assert_eq!(net.runs("w1").len(), 3);
    // The manager dies. While it is down t1 completes and t2 fails; t3 runs on.
    net.cut = vec!["m1".into()];
    net.end("w1", 1, 11, AttemptEnd::Returned(json("2").unwrap()));
    net.end("w1", 2, 12, AttemptEnd::Failed("bad".into()));
    net.advance(Duration::from_secs(3));
    let agents: Vec<_> = net.manager.registry().agents().cloned().collect();
    net.manager = Manager::new(ManagerConfig::new("m1", ["w1".to_string(), "w2".to_string()]), agents, 3, net.now);
    net.manager.set_app("procs", None, net.now);
    net.m_out.clear();
    net.cut.clear();
    let in_doubt = |n: u64, lease: u64, worker: &str| InDoubt {
        id: id(n),
        lease: Lease(lease),
        worker: worker.into(),
        app: "procs".into(),
        attempt: 1,
        max_attempts: 3,
        timeout: Duration::from_secs(60),
        started_at: T0,
    };
    // The store says t1..t3 run on w1, t4 too (its TasksExecute was lost with the manager),
    // and t5 on a worker no longer configured.
    let now = net.now;
    net.manager.restore(
        vec![
            in_doubt(1, 11, "w1"),
            in_doubt(2, 12, "w1"),
            in_doubt(3, 13, "w1"),
            in_doubt(4, 14, "w1"),
            in_doubt(5, 15, "w7"),
        ],
        now,
    );
    net.pump();
    assert_eq!(net.bodies("m1", "w1", "TASKS_PING").len(), 1);
    let r = net.records();
    let mut got: Vec<String> = r.iter().map(|f| format!("{} {}", f.id, outcome(f))).collect();
    got.sort();
    assert_eq!(got, vec!["t1 done 2", "t2 failed RunningError", "t4 retry WorkerLost", "t5 retry WorkerLost"]);
    // The worker's own reports arrive too: stale for the store, but acknowledged so it forgets.
    net.advance(Duration::from_secs(3));
    net.records();
    net.advance(Duration::from_secs(3));
    assert_eq!(net.w("w1").tasks(), 1, "only t3 is left");
    assert_eq!(net.manager.assigned_to(&id(3)), Some("w1"));
    // A confirmed worker gets new work again.
    assert!(net.claims().iter().any(|c| c.owner == "w1"));
}

#[test]
fn a_restored_worker_that_does_not_answer_loses_its_tasks() {
    let mut net = Net::new(&[]);
    let now = net.now;
    let t = InDoubt {
        id: id(1),
        lease: Lease(11),
        worker: "w1".into(),
        app: "procs".into(),
        attempt: 1,
        max_attempts: 3,
        timeout: Duration::from_secs(60),
        started_at: T0,
    };
    net.manager.restore(vec![t], now);
    net.pump();
    assert!(net.claims().is_empty(), "nothing more for an unconfirmed worker");
    // Its TasksPing is sent again every 2 s, 3 times, then the worker is given up.
    net.advance(Duration::from_millis(7_999));
    assert!(net.records().is_empty());
    net.advance(Duration::from_millis(1));
    assert_eq!(net.records().iter().map(outcome).collect::<Vec<_>>(), vec!["retry WorkerLost"]);
    assert_eq!(net.manager.workers().count(), 0);
}

// ---- TasksAbort ----

#[test]
fn tasks_abort_kills_running_tasks_drops_waiting_ones_and_silences_both_sides() {
    let mut net = Net::new(&[("w1", m1(), specs(1, 2))]);
    net.paired();
    net.give("w1", vec![claimed(1, 11, 1, 60_000), claimed(2, 12, 1, 60_000), claimed(3, 13, 1, 60_000)]);
    assert_eq!(net.runs("w1").len(), 1);
    // t2 waits, t1 runs.
    let now = net.now;
    assert!(net.manager.abort(&id(2), now));
    net.pump();
    assert!(net.manager.abort(&id(1), now));
    net.pump();
    assert_eq!(net.bodies("m1", "w1", "TASKS_ABORT").len(), 2);
    assert_eq!(net.kills("w1"), vec![(id(1), Lease(11))]);
    assert_eq!(net.runs("w1").iter().map(|s| s.id.clone()).collect::<Vec<_>>(), vec![id(3)], "t2 was dropped");
    // A late end of the killed attempt reports nothing.
    net.log.clear();
    net.end("w1", 1, 11, AttemptEnd::Returned(json("1").unwrap()));
    assert!(net.bodies("w1", "m1", "TASK_COMPLETED").is_empty());
    assert!(!net.manager.abort(&id(1), now), "no longer assigned");
    assert!(net.records().is_empty(), "an abort records nothing (the store command did)");
    assert_eq!(net.ask("m1", "w1", 700, Body::TasksAbort { tasks: vec![id(9)] }), Body::Ack, "unknown ids too");
}

// ---- TaskStarted / TaskError / TaskCompleted ----

#[test]
fn reports_are_acknowledged_after_the_record_is_durable_and_resent_until_then() {
    let mut net = Net::new(&[("w1", m1(), specs(2, 2))]);
    net.paired();
    net.give("w1", vec![claimed(1, 11, 1, 60_000)]);
    net.runs("w1");
    let started: Vec<Body> = net.bodies("w1", "m1", "TASK_STARTED");
    assert!(
        matches!(&started[..], [Body::TaskStarted { task_id, lease: Lease(11), datetime }] if *task_id == id(1) && *datetime == T0)
    );
    assert!(!net.bodies("m1", "w1", "ACK").is_empty());
    net.log.clear();
    net.end("w1", 1, 11, AttemptEnd::Returned(json("[1,2]").unwrap()));
    assert_eq!(net.bodies("w1", "m1", "TASK_COMPLETED").len(), 1);
    assert!(net.bodies("m1", "w1", "ACK").is_empty(), "not before the record is durable");
    // Resent while unanswered; recorded once.
    net.advance(Duration::from_millis(2_100));
    assert_eq!(net.bodies("w1", "m1", "TASK_COMPLETED").len(), 2);
    let r = net.records();
    assert_eq!(r.iter().map(outcome).collect::<Vec<_>>(), vec!["done [1,2]"]);
    assert_eq!(net.bodies("m1", "w1", "ACK").len(), 2, "both copies answered");
    assert_eq!(net.w("w1").tasks(), 0, "forgotten once acknowledged");
    net.log.clear();
    net.advance(Duration::from_secs(5));
    assert!(net.bodies("w1", "m1", "TASK_COMPLETED").is_empty());
}

#[test]
fn error_kinds_decide_what_happens_next() {
    let mut net = Net::new(&[("w1", m1(), specs(4, 0))]);
    net.paired();
    net.give(
        "w1",
        vec![
            claimed(1, 11, 1, 60_000),
            claimed(2, 12, 1, 60_000),
            claimed(3, 13, 3, 60_000),
            claimed(4, 14, 1, 60_000),
        ],
    );
    net.runs("w1");
    net.end("w1", 1, 11, AttemptEnd::Failed("division by zero".into()));
    net.end("w1", 2, 12, AttemptEnd::WorkerFailed("exit 3".into()));
    net.end("w1", 3, 13, AttemptEnd::WorkerFailed("exit 3".into()));
    net.end("w1", 4, 14, AttemptEnd::NotRun("queue full".into()));
    let r = net.records();
    let got: Vec<String> = r.iter().map(|f| format!("{} {}", f.id, outcome(f))).collect();
    assert_eq!(got, vec!["t1 failed RunningError", "t2 retry WorkerFailed", "t3 failed WorkerFailed", "t4 release"]);
    let errors = net.bodies("w1", "m1", "TASK_ERROR");
    assert!(errors.iter().any(|b| matches!(b, Body::TaskError { error: ErrorKind::RunningError, message, .. } if message == "division by zero")));
}

#[test]
fn timeouts_are_seen_by_both_sides() {
    // The worker times out its own task and reports TimedOut.
    let mut net = Net::new(&[("w1", m1(), specs(2, 2))]);
    net.paired();
    net.give("w1", vec![claimed(1, 11, 1, 1_000)]);
    net.runs("w1");
    net.advance(Duration::from_millis(999));
    assert!(net.kills("w1").is_empty());
    net.advance(Duration::from_millis(1));
    assert_eq!(net.kills("w1"), vec![(id(1), Lease(11))]);
    assert_eq!(net.records().iter().map(outcome).collect::<Vec<_>>(), vec!["failed TimedOut"]);
    assert!(net
        .bodies("w1", "m1", "TASK_ERROR")
        .iter()
        .any(|b| matches!(b, Body::TaskError { error: ErrorKind::TimedOut, .. })));

    // The worker is silent (cut off): the manager times the task out itself, past the grace,
    // and tells the worker to abort it.
    let mut cfg = ManagerConfig::new("m1", ["w1".to_string()]);
    cfg.worker_grace = Duration::from_secs(1);
    cfg.gone_after = Duration::from_secs(600);
    cfg.silent_after = Duration::from_secs(300);
    let mut net = Net::with(cfg, &[("w1", m1(), specs(2, 2))]);
    net.paired();
    net.give("w1", vec![claimed(1, 11, 1, 5_000)]);
    net.runs("w1");
    net.cut = vec!["w1".into()];
    net.advance(Duration::from_millis(5_999));
    assert!(net.records().is_empty());
    net.advance(Duration::from_millis(1));
    let r = net.records();
    assert_eq!(r.iter().map(outcome).collect::<Vec<_>>(), vec!["failed TimedOut"]);
    assert!(matches!(&r[0].outcome, Outcome::Failed(e) if e.message.contains("no report from worker node w1")));
    assert_eq!(net.manager.stats().timed_out, 1);
    // The abort is lost on the cut link, and resent until it gets through.
    net.cut.clear();
    net.log.clear();
    net.advance(Duration::from_secs(3));
    assert_eq!(net.bodies("m1", "w1", "TASKS_ABORT"), vec![Body::TasksAbort { tasks: vec![id(1)] }]);
    assert_eq!(net.w("w1").tasks(), 0, "the worker forgot the task and its own TimedOut report");
}

#[test]
fn a_batch_its_worker_never_answers_is_timed_out_not_handed_back_to_it_again_and_again() {
    // The worker freezes before it answers the TasksExecute (the daemon test's SIGSTOP): the
    // request expires long before the worker is gone. The task must not bounce between claims
    // and releases to the same silent worker (attempt 0 for ever); it times out like one the
    // worker acknowledged.
    let mut cfg = ManagerConfig::new("m1", ["w1".to_string()]);
    cfg.ping_interval = Duration::from_millis(200);
    cfg.request_timeout = Duration::from_millis(200);
    cfg.silent_after = Duration::from_millis(800);
    cfg.gone_after = Duration::from_secs(30);
    cfg.worker_grace = Duration::from_millis(300);
    let mut net = Net::with(cfg, &[("w1", m1(), specs(2, 2))]);
    net.paired();
    net.cut = vec!["w1".into()];
    net.give("w1", vec![claimed(1, 11, 1, 1_000)]);
    // Sent and resent (200 ms, 3 retries): unanswered after 800 ms, the task stays assigned.
    net.advance(Duration::from_millis(1_299));
    assert!(net.records().is_empty(), "nothing released or recorded before the deadline");
    assert_eq!(net.manager.assigned_to(&id(1)), Some("w1"));
    assert_eq!(net.manager.stats().released, 0);
    net.advance(Duration::from_millis(1));
    let r = net.records();
    assert_eq!(r.iter().map(outcome).collect::<Vec<_>>(), vec!["failed TimedOut"]);
    assert_eq!(r[0].lease, Lease(11));
    assert!(matches!(&r[0].outcome, Outcome::Failed(e) if e.message.contains("no report from worker node w1")));
    assert_eq!((net.manager.stats().timed_out, net.manager.stats().released), (1, 0));
    // The worker is still paired (silent, not gone); it thaws and is told to drop the task.
    assert_eq!(net.manager.workers().collect::<Vec<_>>(), vec!["w1"]);
    net.cut.clear();
    net.log.clear();
    net.advance(Duration::from_secs(1));
    assert_eq!(net.bodies("m1", "w1", "TASKS_ABORT"), vec![Body::TasksAbort { tasks: vec![id(1)] }]);
    assert_eq!(net.w("w1").tasks(), 0);
}

#[test]
fn a_worker_keeps_completions_while_its_manager_is_away_and_sends_them_when_it_is_back() {
    let mut cfg = ManagerConfig::new("m1", ["w1".to_string()]);
    cfg.gone_after = Duration::from_secs(600);
    cfg.silent_after = Duration::from_secs(300);
    let mut net = Net::with(cfg, &[("w1", m1(), specs(4, 0))]);
    net.paired();
    net.give("w1", vec![claimed(1, 11, 1, 600_000), claimed(2, 12, 1, 600_000)]);
    net.runs("w1");
    net.cut = vec!["m1".into()];
    net.end("w1", 1, 11, AttemptEnd::Returned(json("1").unwrap()));
    net.end("w1", 2, 12, AttemptEnd::Returned(json("2").unwrap()));
    // Gone for the worker after manager_timeout; it keeps trying.
    net.advance(Duration::from_secs(30));
    assert_eq!(net.w("w1").manager(), None);
    assert_eq!(net.w("w1").tasks(), 2);
    net.cut.clear();
    net.advance(Duration::from_secs(31));
    assert_eq!(net.w("w1").manager(), Some("m1"));
    let r = net.records();
    assert_eq!(r.iter().map(outcome).collect::<Vec<_>>(), vec!["done 1", "done 2"]);
    net.advance(Duration::from_secs(1));
    assert_eq!(net.w("w1").tasks(), 0);
}

#[test]
fn large_results_are_held_and_fetched_by_hash() {
    let mut mcfg = ManagerConfig::new("m1", ["w1".to_string()]);
    mcfg.fetch_chunk = 300;
    let mut net = Net::with(mcfg, &[]);
    // Shrink the inline bound on this worker: results over 100 bytes are held.
    let mut cfg = WorkerConfig::new("w1", m1(), specs(2, 2));
    cfg.inline_result_max = 100;
    cfg.fetch_chunk = 64;
    net.workers.insert("w1".into(), WorkerNode::new(cfg, 5, T0));
    net.paired();
    net.give("w1", vec![claimed(1, 11, 1, 60_000)]);
    net.runs("w1");
    let big = format!("\"{}\"", "x".repeat(1000));
    net.end("w1", 1, 11, AttemptEnd::Returned(json(&big).unwrap()));
    let done = net.bodies("w1", "m1", "TASK_COMPLETED");
    assert!(
        matches!(&done[..], [Body::TaskCompleted { result: ResultBody::Held { size: 1002, hash }, .. }] if *hash == sha256_hex(big.as_bytes()))
    );
    assert_eq!(net.bodies("m1", "w1", "FETCH").len(), 4, "fetched in chunks of 300 bytes");
    let r = net.records();
    assert_eq!(r.len(), 1);
    assert!(matches!(&r[0].outcome, Outcome::Done(j) if j.get() == big));
    assert_eq!(net.w("w1").tasks(), 0, "acknowledged after the record");
}

// ---- Apps follow their tasks ----

fn package(bytes: &[u8]) -> AppPackage {
    AppPackage { app: "procs".into(), version: "2".into(), hash: sha256_hex(bytes), size: bytes.len() as u64 }
}

/// Serves the manager's package requests from `bytes` until none are left.
fn serve(net: &mut Net, bytes: &[u8]) -> usize {
    let mut served = 0;
    loop {
        let mut reqs = vec![];
        net.m_out.retain(|a| match a {
            ManagerAction::ServePackage { .. } => {
                reqs.push(a.clone());
                false
            }
            _ => true,
        });
        if reqs.is_empty() {
            return served;
        }
        for r in reqs {
            let ManagerAction::ServePackage { to, id, offset, max_len, .. } = r else { unreachable!() };
            served += 1;
            let answer = Packet::new(id, chunk_of(bytes, offset, max_len));
            net.deliver_from("m1", &to, answer);
            net.pump();
        }
    }
}

fn installs(net: &mut Net) -> (Vec<AppPackage>, usize, Vec<AppPackage>) {
    let (mut installs, mut data, mut dropped) = (vec![], 0, vec![]);
    net.w_out.retain(|(_, a)| match a {
        WorkerAction::Install(p) => {
            installs.push(p.clone());
            false
        }
        WorkerAction::PackageData { data: d, .. } => {
            data += d.len();
            false
        }
        WorkerAction::DropPackage(p) => {
            dropped.push(p.clone());
            false
        }
        _ => true,
    });
    (installs, data, dropped)
}

#[test]
fn a_worker_lacking_the_app_fetches_it_verifies_it_and_then_runs_the_task() {
    let bytes: Vec<u8> = (0..3000u32).map(|n| (n * 7 % 256) as u8).collect();
    let mut net = Net::new(&[("w1", m1(), specs(2, 2))]);
    let mut cfg = WorkerConfig::new("w1", m1(), specs(2, 2));
    cfg.fetch_chunk = 1000;
    net.workers.insert("w1".into(), WorkerNode::new(cfg, 5, T0));
    let now = net.now;
    net.manager.set_app("procs", Some(package(&bytes)), now);
    net.paired();
    net.give("w1", vec![claimed(1, 11, 1, 60_000), claimed(2, 12, 1, 60_000)]);
    assert!(net.runs("w1").is_empty(), "not before the package is there");
    assert_eq!(serve(&mut net, &bytes), 3, "one download for both tasks, in 3 chunks");
    let (inst, data, dropped) = installs(&mut net);
    assert_eq!((inst, data, dropped), (vec![package(&bytes)], 3000, vec![]));
    let now = net.now;
    net.w("w1").handle_installed(&package(&bytes), Ok(()), now);
    net.pump();
    assert_eq!(net.runs("w1").len(), 2);
    assert_eq!(net.w("w1").apps().cloned().collect::<Vec<_>>(), vec![package(&bytes)]);
    // A later task of the same version needs no fetch.
    net.end("w1", 1, 11, AttemptEnd::Returned(json("1").unwrap()));
    net.end("w1", 2, 12, AttemptEnd::Returned(json("2").unwrap()));
    net.records();
    let now = net.now;
    net.manager.handle_submitted("procs", now);
    net.give("w1", vec![claimed(3, 13, 1, 60_000)]);
    assert_eq!(net.runs("w1").len(), 1);
    assert_eq!(serve(&mut net, &bytes), 0);
}

#[test]
fn a_package_that_does_not_match_its_hash_or_is_missing_is_a_download_error() {
    let bytes = b"the real package".to_vec();
    for case in ["corrupt", "missing", "install"] {
        let mut net = Net::new(&[("w1", m1(), specs(2, 2))]);
        let now = net.now;
        net.manager.set_app("procs", Some(package(&bytes)), now);
        net.paired();
        net.give("w1", vec![claimed(1, 11, 1, 60_000)]);
        match case {
            "corrupt" => {
                serve(&mut net, b"the fake package");
            }
            "missing" => {
                let reqs: Vec<_> = net.m_out.drain(..).collect();
                for r in reqs {
                    if let ManagerAction::ServePackage { to, id, .. } = r {
                        net.deliver_from(
                            "m1",
                            &to,
                            Packet::new(id, Body::FetchMissing { reason: "no such version".into() }),
                        );
                    }
                }
                net.pump();
            }
            _ => {
                serve(&mut net, &bytes);
                let now = net.now;
                net.w("w1").handle_installed(&package(&bytes), Err("disk full".into()), now);
                net.pump();
            }
        }
        let (_, _, dropped) = installs(&mut net);
        assert_eq!(dropped.len(), usize::from(case != "install"), "{case}");
        assert!(net.runs("w1").is_empty(), "{case}");
        let errors = net.bodies("w1", "m1", "TASK_ERROR");
        assert!(
            matches!(&errors[..], [Body::TaskError { error: ErrorKind::DownloadError, message, .. }] if message.contains("procs")),
            "{case}: {errors:?}"
        );
        assert_eq!(net.records().iter().map(outcome).collect::<Vec<_>>(), vec!["retry DownloadError"], "{case}");
    }
}

#[test]
fn only_the_paired_managers_packages_are_fetched_and_installed() {
    let bytes: Vec<u8> = (0..2000u32).map(|n| (n % 253) as u8).collect();
    let forged = b"a forged package".to_vec();
    let mut net = Net::new(&[("w1", m1(), specs(2, 2))]);
    let now = net.now;
    net.manager.set_app("procs", Some(package(&bytes)), now);
    net.paired();
    // A node that is not its manager sends a task with its own package: refused, nothing fetched.
    let stranger = TaskSpec {
        id: id(9),
        lease: Lease(99),
        attempt: 1,
        procedure: "procs.add".into(),
        app: "procs".into(),
        args: json("[1]").unwrap(),
        timeout: Duration::from_secs(60),
        package: Some(package(&forged)),
        deadline: None,
    };
    let answer = net.ask("m9", "w1", 7, Body::TasksExecute { tasks: vec![stranger] });
    assert_eq!(answer, Body::NotMine);
    assert!(net.bodies("w1", "m9", "FETCH").is_empty());
    // Its manager's task: the fetch goes to the manager, and a chunk from anyone else
    // answering that fetch's id is not taken.
    net.give("w1", vec![claimed(1, 11, 1, 60_000)]);
    let fetch = net.log.iter().rev().find(|(f, t, p)| f == "w1" && t == "m1" && p.body.command() == "FETCH");
    let fetch_id = fetch.expect("the worker fetches from its manager").2.id;
    net.deliver_from("m9", "w1", Packet::new(fetch_id, chunk_of(&forged, 0, 1 << 20)));
    net.pump();
    assert_eq!(installs(&mut net), (vec![], 0, vec![]), "nothing of the stranger's chunk is written");
    // The manager's own chunks complete the package, which is installed.
    serve(&mut net, &bytes);
    let (inst, data, dropped) = installs(&mut net);
    assert_eq!((inst, data, dropped), (vec![package(&bytes)], bytes.len(), vec![]));
    let now = net.now;
    net.w("w1").handle_installed(&package(&bytes), Ok(()), now);
    net.pump();
    assert_eq!(net.runs("w1").len(), 1);
    // An app the operator removed from the worker node is fetched again for its next task.
    net.w("w1").remove_app("procs");
    net.end("w1", 1, 11, AttemptEnd::Returned(json("1").unwrap()));
    net.records();
    let now = net.now;
    net.manager.handle_submitted("procs", now);
    net.give("w1", vec![claimed(2, 12, 1, 60_000)]);
    assert!(net.runs("w1").is_empty(), "not before the package is there again");
    assert_eq!(serve(&mut net, &bytes), 1);
}

// ---- Echolocation and the registry ----

#[test]
fn silent_workers_are_marked_then_gone_and_their_tasks_run_again_and_they_are_removed_later() {
    let mut cfg = ManagerConfig::new("m1", ["w1".to_string()]);
    cfg.registry.remove_after = Duration::from_secs(3600);
    let mut net = Net::with(cfg, &[("w1", m1(), specs(2, 2))]);
    net.paired();
    net.give("w1", vec![claimed(1, 11, 1, 600_000)]);
    net.cut = vec!["w1".into()];
    let cut_at = net.now;
    net.advance(Duration::from_secs(5));
    assert_eq!(net.manager.registry().get("w1").unwrap().state, AgentState::Active);
    net.advance(Duration::from_secs(1));
    assert_eq!(net.manager.registry().get("w1").unwrap().state, AgentState::Silent);
    net.advance(Duration::from_secs(14));
    let a = net.manager.registry().get("w1").unwrap().clone();
    assert_eq!((a.state, a.last_seen <= cut_at), (AgentState::Gone, true));
    assert_eq!(net.records().iter().map(outcome).collect::<Vec<_>>(), vec!["retry WorkerLost"]);
    // The store is told each change.
    let saved: Vec<AgentState> = net
        .m_out
        .iter()
        .filter_map(|a| match a {
            ManagerAction::Agent(nodus_tasks::cluster::RegistryChange::Save(a)) => Some(a.state),
            _ => None,
        })
        .collect();
    assert!(saved.ends_with(&[AgentState::Silent, AgentState::Gone]), "{saved:?}");
    // Still cut: removed an hour after it was gone.
    net.workers.clear();
    net.advance(Duration::from_secs(3600));
    assert!(net.manager.registry().get("w1").is_none());
    assert!(net
        .m_out
        .iter()
        .any(|a| matches!(a, ManagerAction::Agent(nodus_tasks::cluster::RegistryChange::Remove(n)) if n == "w1")));
}

#[test]
fn a_banned_worker_is_told_bye_and_cannot_pair_again() {
    let mut net = Net::new(&[("w1", m1(), specs(2, 2))]);
    net.paired();
    net.give("w1", vec![claimed(1, 11, 1, 600_000)]);
    net.log.clear();
    let now = net.now;
    net.manager.ban("w1", true, now);
    net.pump();
    assert!(net.bodies("m1", "w1", "MANAGER_BYE").len() == 1);
    assert_eq!(net.kills("w1"), vec![(id(1), Lease(11))]);
    assert_eq!(net.records().iter().map(outcome).collect::<Vec<_>>(), vec!["retry WorkerLost"]);
    net.advance(Duration::from_secs(60));
    assert_eq!(net.w("w1").manager(), None);
    assert!(net.manager.registry().is_banned("w1"));
    let now = net.now;
    net.manager.ban("w1", false, now);
    net.advance(Duration::from_secs(60));
    assert_eq!(net.w("w1").manager(), Some("m1"));
}

#[test]
fn dispatch_follows_declared_capacity_and_current_load() {
    // Declared specs are trusted for placement only, and capped.
    let mut cfg = ManagerConfig::new("m1", ["w1".to_string()]);
    cfg.max_per_worker = 100;
    let mut net = Net::with(cfg, &[("w1", m1(), specs(1_000_000, 1_000_000))]);
    net.paired();
    assert_eq!(net.claims().into_iter().map(|c| c.max).collect::<Vec<_>>(), vec![100]);

    let mut net = Net::new(&[("w1", m1(), specs(8, 8)), ("w2", m1(), specs(2, 0))]);
    net.paired();
    let mut c: Vec<(String, usize)> = net.claims().into_iter().map(|c| (c.owner, c.max)).collect();
    c.sort();
    assert_eq!(c, vec![("w1".into(), 16), ("w2".into(), 2)]);
    // Answered with what the store has; w2 is then full and gets no claim until a task ends.
    net.manager.handle_claimed("w1", "procs", 16, Ok((1..=16).map(|n| claimed(n, n, 1, 60_000)).collect()), net.now);
    net.manager.handle_claimed(
        "w2",
        "procs",
        2,
        Ok(vec![claimed(17, 17, 1, 60_000), claimed(18, 18, 1, 60_000)]),
        net.now,
    );
    net.pump();
    assert!(net.claims().is_empty());
    net.end("w2", 17, 17, AttemptEnd::Returned(json("1").unwrap()));
    net.records();
    assert_eq!(net.claims().into_iter().map(|c| (c.owner, c.max)).collect::<Vec<_>>(), vec![("w2".to_string(), 1)]);
}

#[test]
fn after_a_restart_agents_are_silent_until_they_pair_again_and_gone_if_they_do_not() {
    let mut net = Net::new(&[("w1", m1(), specs(2, 2))]);
    net.paired();
    let mut agents: Vec<_> = net.manager.registry().agents().cloned().collect();
    let mut w2 = agents[0].clone();
    w2.name = "w2".into();
    w2.id = "another-id".into();
    agents.push(w2);
    let now = net.now;
    net.manager = Manager::new(ManagerConfig::new("m1", ["w1".to_string(), "w2".to_string()]), agents, 5, now);
    net.manager.set_app("procs", None, now);
    net.m_out.clear();
    net.pump();
    let saved = |net: &mut Net| -> Vec<(String, AgentState)> {
        let mut out = vec![];
        net.m_out.retain(|a| match a {
            ManagerAction::Agent(nodus_tasks::cluster::RegistryChange::Save(a)) => {
                out.push((a.name.clone(), a.state));
                false
            }
            _ => true,
        });
        out
    };
    assert_eq!(saved(&mut net), vec![("w1".into(), AgentState::Silent), ("w2".into(), AgentState::Silent)]);
    // w1 pings its manager, gets NotMine, pairs again: active. w2 never comes back: gone.
    net.advance(Duration::from_secs(20));
    assert_eq!(net.w("w1").manager(), Some("m1"));
    let got = saved(&mut net);
    assert!(got.contains(&("w1".into(), AgentState::Active)), "{got:?}");
    assert!(got.contains(&("w2".into(), AgentState::Gone)), "{got:?}");
    assert_eq!(net.manager.registry().get("w1").unwrap().state, AgentState::Active);
    assert_eq!(net.manager.registry().get("w2").unwrap().state, AgentState::Gone);
}
