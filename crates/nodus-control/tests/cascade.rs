//! The kill cascade of seed 000 on a virtual clock: one node, two nodes joined by a simulated
//! network that carries the real control messages (encoded to the text form and decoded back),
//! timeouts, and the order of every action.

use nodus_control::kill::{KillAction, KillLimits, KillOrder, KillRequest};
use nodus_control::{Body, Component, ComponentId, ComponentKind, ControlMessage, KillError, Spec, Tree};
use nodus_wire::{text, Message};
use std::collections::VecDeque;

const LIMITS: KillLimits = KillLimits { child_wait_ms: 10_000, stop_grace_ms: 2_000 };

fn id(n: u64) -> ComponentId {
    ComponentId::new(n).unwrap()
}

fn request(token: u64, expires_at: i64) -> KillRequest {
    KillRequest { order: KillOrder { id: 500 + token, creator: "cli".into(), expires_at }, token }
}

/// c0 → c1 → ... → c4, c_i on `nodes[i]`; each node's tree holds its own components and the
/// stubs of its children elsewhere.
fn chain(nodes: [&str; 5]) -> Vec<Tree> {
    let mut names: Vec<&str> = nodes.to_vec();
    names.dedup();
    let mut trees: Vec<Tree> = names.iter().map(|n| Tree::new(*n, 100)).collect();
    for i in 0..5u64 {
        let node = nodes[i as usize];
        let mut c = Component::new(id(i + 1), ComponentKind::Task, format!("c{i}"), node);
        if i > 0 {
            let parent_node = nodes[i as usize - 1];
            c = if parent_node == node { c.started_by(id(i)) } else { c.started_by_remote(id(i), parent_node) };
        }
        let t = trees.iter_mut().find(|t| t.local_node() == node).unwrap();
        t.insert(c.clone()).unwrap();
        if i > 0 && nodes[i as usize - 1] != node {
            // The parent's node keeps a stub of its child elsewhere.
            let stub = Component::new(id(i + 1), ComponentKind::Task, format!("c{i}"), node).started_by(id(i));
            trees.iter_mut().find(|t| t.local_node() == nodes[i as usize - 1]).unwrap().insert(stub).unwrap();
        }
    }
    trees
}

fn names(actions: &[KillAction]) -> Vec<String> {
    actions
        .iter()
        .map(|a| match a {
            KillAction::SendKill { target, node, parent, .. } => format!("send-kill {target}@{node} by {parent}"),
            KillAction::Stop { id, forced, .. } => format!("stop {id}{}", if *forced { " forced" } else { "" }),
            KillAction::ReportToParent(r) => format!(
                "report {} -> {}{}",
                r.component,
                r.parent.map_or("none".to_string(), |p| p.to_string()),
                if r.unanswered.is_empty() { String::new() } else { format!(" unanswered {:?}", r.unanswered) }
            ),
            KillAction::Done(d) => format!("done {} for {}", d.component, d.request.token),
        })
        .collect()
}

#[test]
fn chain_of_five_killed_in_the_middle_on_one_node() {
    let mut t = chain(["a"; 5]).remove(0);
    let mut out = Vec::new();
    t.kill(id(3), request(1, 0), LIMITS, 0, &mut out).unwrap();
    // c2 (id 3) waits for c3 which waits for c4; c4 has nothing to wait for and stops first.
    assert_eq!(names(&out), ["stop 5"]);
    out.clear();
    assert!(t.finished(id(5), 10, LIMITS, &mut out));
    assert_eq!(names(&out), ["report 5 -> 4", "stop 4"]);
    out.clear();
    t.finished(id(4), 20, LIMITS, &mut out);
    assert_eq!(names(&out), ["report 4 -> 3", "stop 3"]);
    out.clear();
    t.finished(id(3), 30, LIMITS, &mut out);
    assert_eq!(names(&out), ["report 3 -> 2", "done 3 for 1"]);
    // The upper ones keep running; the lower ones are gone.
    for up in [1, 2] {
        assert!(t.get(id(up)).unwrap().is_running, "c{} keeps running", up - 1);
    }
    for down in [3, 4, 5] {
        assert!(t.get(id(down)).is_none());
    }
    assert_eq!(t.killing(), 0);
    assert_eq!(t.next_deadline(), None);
    // The report c1 gets is the seed's error message.
    let KillAction::ReportToParent(report) = &out[0] else { unreachable!() };
    let msg = report.to_control("a:c2", 30).to_message();
    assert_eq!(msg.command, "ERROR");
    assert_eq!(
        (msg.get("message_type"), msg.get("spec"), msg.get("code")),
        (Some("error"), Some("kill"), Some("killed"))
    );
    assert_eq!(msg.get("tag"), Some("error:kill:501:3:a:c2"));
    assert_eq!(msg.envelope.pid, 3);
    assert_eq!(msg.envelope.expires_at, 0, "a report never expires");
}

/// One node's driver in the simulation: applies actions, turning them into wire messages.
struct Net {
    trees: Vec<Tree>,
    /// (destination node, text line) in flight.
    wire: VecDeque<(String, String)>,
    /// Error reports delivered to a component that is not being killed: (parent, line).
    reports_to_survivors: Vec<(ComponentId, String)>,
    /// Stops performed: (node, component).
    stopped: Vec<(String, ComponentId)>,
    /// Kill results for the operator.
    done: Vec<ControlMessage>,
    /// Nodes whose incoming messages are lost.
    deaf: Vec<String>,
    /// Components whose stop is never confirmed.
    stuck: Vec<ComponentId>,
}

impl Net {
    fn new(trees: Vec<Tree>) -> Self {
        Net {
            trees,
            wire: VecDeque::new(),
            reports_to_survivors: Vec::new(),
            stopped: Vec::new(),
            done: Vec::new(),
            deaf: Vec::new(),
            stuck: Vec::new(),
        }
    }

    fn tree(&mut self, node: &str) -> &mut Tree {
        self.trees.iter_mut().find(|t| t.local_node() == node).unwrap()
    }

    fn send(&mut self, node: &str, msg: &Message) {
        // Every message crosses the network in the text form, as a shell service would see it.
        self.wire.push_back((node.to_string(), text::to_line(msg)));
    }

    fn apply(&mut self, node: &str, actions: Vec<KillAction>, now: i64) {
        let mut queue: VecDeque<KillAction> = actions.into();
        while let Some(a) = queue.pop_front() {
            match a {
                KillAction::SendKill { target, node: there, parent, order } => {
                    let m = ControlMessage {
                        header: nodus_control::Header {
                            id: order.id,
                            pid: Some(parent),
                            creator: order.creator,
                            created_at: now,
                            expires_at: order.expires_at,
                        },
                        body: Body::Kill { target: Some(target) },
                    };
                    self.send(&there, &m.to_message().to(&format!("{there}:control")));
                }
                KillAction::Stop { id, .. } => {
                    self.stopped.push((node.to_string(), id));
                    if !self.stuck.contains(&id) {
                        let mut more = Vec::new();
                        self.tree(node).finished(id, now, LIMITS, &mut more);
                        queue.extend(more);
                    }
                }
                KillAction::ReportToParent(r) => {
                    let line_msg = r.to_control(&format!("{node}:c"), now).to_message();
                    let Some(parent) = r.parent else { continue };
                    let parent_node = r.parent_node.clone().unwrap();
                    if parent_node == node {
                        // Local parent: the tree already counted it; a survivor receives it.
                        if !self.tree(node).is_killing(parent) && self.tree(node).get(parent).is_some() {
                            self.reports_to_survivors.push((parent, text::to_line(&line_msg)));
                        }
                    } else {
                        self.send(&parent_node, &line_msg.to(&format!("{parent_node}:control")));
                    }
                }
                // Token 0 answers another node's SendKill: that node already counted the child's
                // error report, the RESULT would only confirm it.
                KillAction::Done(d) if d.request.token == 0 => {}
                KillAction::Done(d) => self.done.push(d.to_control(None, &format!("{node}:control"), now)),
            }
        }
    }

    /// Delivers everything in flight (and what that causes) at `now`.
    fn run(&mut self, now: i64) {
        while let Some((node, line)) = self.wire.pop_front() {
            if self.deaf.contains(&node) {
                continue;
            }
            let msg = text::from_line(&line).unwrap();
            let control = ControlMessage::from_message(&msg).unwrap();
            let mut out = Vec::new();
            match control.body {
                Body::Kill { target: Some(target) } => {
                    let order = KillOrder {
                        id: control.header.id,
                        creator: control.header.creator.clone(),
                        expires_at: control.header.expires_at,
                    };
                    self.tree(&node).kill(target, KillRequest { order, token: 0 }, LIMITS, now, &mut out).unwrap();
                }
                Body::Error { spec: Spec::Kill, component: Some(child), .. } => {
                    let t = self.tree(&node);
                    let parent = t.get(child).and_then(|c| c.pid);
                    let waited = parent.is_some_and(|p| t.is_killing(p));
                    t.finished(child, now, LIMITS, &mut out);
                    if !waited {
                        self.reports_to_survivors.push((parent.unwrap(), line.clone()));
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
            self.apply(&node, out, now);
        }
    }

    fn tick(&mut self, now: i64) {
        for i in 0..self.trees.len() {
            let mut out = Vec::new();
            self.trees[i].tick(now, LIMITS, &mut out);
            let node = self.trees[i].local_node().to_string();
            self.apply(&node, out, now);
        }
    }
}

#[test]
fn chain_of_five_across_two_nodes_killed_in_the_middle() {
    // c0, c1, c2 on a; c3, c4 on b; kill c2 (id 3) at a.
    let mut net = Net::new(chain(["a", "a", "a", "b", "b"]));
    let mut out = Vec::new();
    net.tree("a").kill(id(3), request(1, 60_000), LIMITS, 1_000, &mut out).unwrap();
    assert_eq!(names(&out), ["send-kill 4@b by 3"], "step 1: kill what it started, on the node it runs on");
    net.apply("a", out, 1_000);
    net.run(1_000);
    // Lower ones stop bottom-up on b, then c2 on a, which reports to c1.
    let stopped: Vec<(String, u64)> = net.stopped.iter().map(|(n, c)| (n.clone(), c.get())).collect();
    assert_eq!(stopped, [("b".to_string(), 5), ("b".to_string(), 4), ("a".to_string(), 3)]);
    assert_eq!(net.reports_to_survivors.len(), 1, "{:?}", net.reports_to_survivors);
    let (parent, line) = &net.reports_to_survivors[0];
    assert_eq!(*parent, id(2), "the parent c1 gets the error");
    assert!(line.starts_with("ERROR "), "delivered on node a to c1: {line}");
    assert!(line.contains("message_type=error") && line.contains("tag=error:kill:501:3:a:c"), "{line}");
    // The upper ones keep running, nothing is left half-dead on either node.
    assert!(net.tree("a").get(id(1)).unwrap().is_running && net.tree("a").get(id(2)).unwrap().is_running);
    assert_eq!(net.tree("a").len(), 2);
    assert!(net.tree("b").is_empty());
    // The operator got the result.
    assert_eq!(net.done.len(), 1);
    assert_eq!(net.done[0].body, Body::KillResult { component: Some(id(3)), stopped: true, unanswered: vec![] });
    assert_eq!(net.done[0].header.id, 501);
}

#[test]
fn a_silent_remote_child_is_given_up_on_at_the_deadline() {
    let mut net = Net::new(chain(["a", "a", "a", "b", "b"]));
    net.deaf.push("b".into());
    let mut out = Vec::new();
    // Expires in 8 s: the children get half of it (4 s), under the 10 s child wait.
    net.tree("a").kill(id(3), request(1, 8_000), LIMITS, 0, &mut out).unwrap();
    net.apply("a", out, 0);
    net.run(0);
    assert_eq!(net.tree("a").next_deadline(), Some(4_000));
    net.tick(3_999);
    assert!(net.stopped.is_empty(), "nothing happens before the deadline");
    net.tick(4_000);
    assert_eq!(net.stopped, [("a".to_string(), id(3))]);
    let done = &net.done[0];
    assert_eq!(done.body, Body::KillResult { component: Some(id(3)), stopped: true, unanswered: vec![id(4)] });
    assert!(net.reports_to_survivors[0].1.contains("1 component(s) it started did not report back"));
    assert_eq!(net.tree("a").len(), 2, "the stub of the silent child is forgotten with its parent");
}

#[test]
fn a_stop_never_confirmed_is_reported_after_the_grace() {
    let mut t = chain(["a"; 5]).remove(0);
    let mut out = Vec::new();
    t.kill(id(5), request(1, 0), LIMITS, 0, &mut out).unwrap();
    assert_eq!(names(&out), ["stop 5"]);
    out.clear();
    assert_eq!(t.next_deadline(), Some(2_000));
    t.tick(2_000, LIMITS, &mut out);
    assert_eq!(names(&out), ["report 5 -> 4", "done 5 for 1"]);
    let KillAction::Done(d) = &out[1] else { unreachable!() };
    assert!(!d.stopped);
    let KillAction::ReportToParent(r) = &out[0] else { unreachable!() };
    assert!(r.to_control("a", 2_000).to_message().get("message").unwrap().contains("did not confirm its stop"));
}

#[test]
fn children_are_killed_newest_first() {
    let mut t = Tree::new("a", 100);
    t.insert(Component::new(id(1), ComponentKind::App, "app", "a")).unwrap();
    for w in 2..=4 {
        t.insert(Component::new(id(w), ComponentKind::Worker, format!("w{w}"), "a").started_by(id(1))).unwrap();
    }
    t.insert(Component::new(id(9), ComponentKind::Task, "remote", "b").started_by(id(1))).unwrap();
    let mut out = Vec::new();
    t.kill(id(1), request(1, 0), LIMITS, 0, &mut out).unwrap();
    assert_eq!(names(&out), ["send-kill 9@b by 1", "stop 4", "stop 3", "stop 2"]);
}

#[test]
fn refused_kills_say_why() {
    let mut t = chain(["a", "a", "a", "b", "b"]).remove(0);
    let mut out = Vec::new();
    let e = t.kill(id(3), request(1, 100), LIMITS, 100, &mut out).unwrap_err();
    assert_eq!(e, KillError::Expired { expires_at: 100, now: 100 });
    assert_eq!(e.code(), "expired");
    assert_eq!(t.kill(id(77), request(1, 0), LIMITS, 0, &mut out), Err(KillError::Unknown(id(77))));
    let e = t.kill(id(4), request(1, 0), LIMITS, 0, &mut out).unwrap_err();
    assert_eq!(e, KillError::Remote { id: id(4), node: "b".into() });
    assert!(out.is_empty(), "a refused kill does nothing");
    assert_eq!(t.killing(), 0);
}

#[test]
fn a_second_kill_joins_the_first_and_both_are_answered() {
    let mut t = chain(["a"; 5]).remove(0);
    let mut out = Vec::new();
    t.kill(id(4), request(1, 0), LIMITS, 0, &mut out).unwrap();
    t.kill(id(4), request(2, 0), LIMITS, 1, &mut out).unwrap();
    assert_eq!(names(&out), ["stop 5"], "no second cascade");
    out.clear();
    t.finished(id(5), 2, LIMITS, &mut out);
    t.finished(id(4), 3, LIMITS, &mut out);
    assert_eq!(names(&out), ["report 5 -> 4", "stop 4", "report 4 -> 3", "done 4 for 1", "done 4 for 2"]);
}

#[test]
fn a_component_that_exits_while_its_children_die_is_not_stopped_again() {
    let mut t = chain(["a"; 5]).remove(0);
    let mut out = Vec::new();
    t.kill(id(4), request(1, 0), LIMITS, 0, &mut out).unwrap();
    out.clear();
    // c3 (id 4) crashes on its own while waiting for c4.
    t.finished(id(4), 1, LIMITS, &mut out);
    assert!(out.is_empty(), "it still waits for its children");
    t.finished(id(5), 2, LIMITS, &mut out);
    assert_eq!(names(&out), ["report 5 -> 4", "report 4 -> 3", "done 4 for 1"]);
}

#[test]
fn a_child_that_ends_on_its_own_releases_its_waiting_parent() {
    let mut t = Tree::new("a", 100);
    t.insert(Component::new(id(1), ComponentKind::Service, "svc", "a")).unwrap();
    t.insert(Component::new(id(2), ComponentKind::Task, "remote", "b").started_by(id(1))).unwrap();
    let mut out = Vec::new();
    t.kill(id(1), request(1, 0), LIMITS, 0, &mut out).unwrap();
    out.clear();
    // Node b says the child is unknown there (it already ended): the driver marks it finished.
    assert!(t.finished(id(2), 5, LIMITS, &mut out));
    assert_eq!(names(&out), ["stop 1"]);
    assert!(!t.finished(id(2), 6, LIMITS, &mut out), "a duplicate report is ignored");
}

#[test]
fn nested_timeouts_stop_children_before_parents() {
    let mut t = chain(["a"; 5]).remove(0);
    let mut out = Vec::new();
    t.kill(id(2), request(1, 0), LIMITS, 0, &mut out).unwrap();
    assert_eq!(names(&out), ["stop 5"]);
    out.clear();
    // c4 never confirms; after its grace it is reported, and the cascade goes on up.
    t.tick(2_000, LIMITS, &mut out);
    assert_eq!(names(&out), ["report 5 -> 4", "stop 4"]);
    out.clear();
    // Everyone else confirms at once.
    t.finished(id(4), 2_001, LIMITS, &mut out);
    t.finished(id(3), 2_002, LIMITS, &mut out);
    t.finished(id(2), 2_003, LIMITS, &mut out);
    assert_eq!(names(&out), ["report 4 -> 3", "stop 3", "report 3 -> 2", "stop 2", "report 2 -> 1", "done 2 for 1"]);
    assert_eq!(t.len(), 1);
}

#[test]
fn a_dying_component_cannot_start_new_ones() {
    let mut t = chain(["a"; 5]).remove(0);
    let mut out = Vec::new();
    t.kill(id(4), request(1, 0), LIMITS, 0, &mut out).unwrap();
    let late = Component::new(id(50), ComponentKind::Task, "late", "a").started_by(id(4));
    assert_eq!(t.insert(late), Err(nodus_control::TreeError::ParentKilled(id(4))));
    // Its untouched ancestors still may.
    t.insert(Component::new(id(51), ComponentKind::Task, "ok", "a").started_by(id(3))).unwrap();
}
