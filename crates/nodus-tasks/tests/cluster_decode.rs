//! Property tests for the manager/worker protocol: every valid message survives both wire forms;
//! garbage (random parameters, payloads, lines, mutations of valid messages) gives an error,
//! never a panic; and the state machines, fed random messages from random peers, never panic and
//! answer every request exactly once.

use std::collections::BTreeMap;
use std::time::Duration;

use nodus_tasks::cluster::msg::{Refusal, RefuseReason, TaskReport, COMMANDS};
use nodus_tasks::cluster::{
    AppPackage, Blob, Body, Manager, ManagerAction, ManagerConfig, NodeType, Packet, ResultBody, Specs, TaskSpec,
    TaskStatus, WorkerAction, WorkerConfig, WorkerNode,
};
use nodus_tasks::sched::AttemptEnd;
use nodus_tasks::task::{json, Claimed, ErrorKind, Lease, TaskId, UnixMs};
use nodus_wire::{text, Message};
use proptest::prelude::*;

const T0: UnixMs = UnixMs(1_700_000_000_000);

fn task_id() -> impl Strategy<Value = TaskId> {
    prop_oneof![(1u8..5).prop_map(|n| format!("t{n}")), "[!-~]{1,40}"].prop_map(|s| s.parse().unwrap())
}

fn lease() -> impl Strategy<Value = Lease> {
    prop_oneof![(1u64..5), (1u64..)].prop_map(Lease)
}

fn json_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("null".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        "[a-z ]{0,20}".prop_map(|s| format!("\"{s}\"")),
        (any::<i32>(), "[a-z]{0,8}").prop_map(|(n, s)| format!("{{\"n\": {n}, \"s\": [\"{s}\", true]}}")),
    ]
}

fn hash() -> impl Strategy<Value = String> {
    "[0-9a-f]{64}"
}

fn package() -> impl Strategy<Value = AppPackage> {
    ("[a-z]{1,10}", "[0-9.]{0,6}", hash(), any::<u64>()).prop_map(|(app, version, hash, size)| AppPackage {
        app,
        version,
        hash,
        size,
    })
}

fn spec() -> impl Strategy<Value = TaskSpec> {
    (
        task_id(),
        lease(),
        1u32..5,
        "[a-z]{1,8}",
        json_value(),
        0u64..100_000,
        proptest::option::of(package()),
        proptest::option::of(0u64..1 << 50),
    )
        .prop_map(|(id, lease, attempt, app, arg, timeout, package, deadline)| TaskSpec {
            id,
            lease,
            attempt,
            procedure: format!("{app}.run"),
            app,
            args: json(&format!("[{arg}]")).unwrap(),
            timeout: Duration::from_millis(timeout),
            package,
            deadline: deadline.map(UnixMs),
        })
}

fn kind() -> impl Strategy<Value = ErrorKind> {
    proptest::sample::select(ErrorKind::ALL.to_vec())
}

fn status() -> impl Strategy<Value = TaskStatus> {
    prop_oneof![
        Just(TaskStatus::Pending),
        any::<u64>().prop_map(|t| TaskStatus::Started(UnixMs(t))),
        kind().prop_map(TaskStatus::Error),
        proptest::option::of(json_value()).prop_map(|j| TaskStatus::Completed(j.map(|j| json(&j).unwrap()))),
        Just(TaskStatus::Unknown),
    ]
}

fn node_type() -> impl Strategy<Value = NodeType> {
    prop_oneof![Just(NodeType::Manager), Just(NodeType::Worker), Just(NodeType::Standalone)]
}

fn body() -> impl Strategy<Value = Body> {
    let specs = (
        any::<u32>(),
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        "[0-9a-f.:]{0,40}",
        "[0-9a-f:]{0,17}",
        proptest::collection::vec(package(), 0..3),
        proptest::collection::vec("[a-z]{1,5}\\.[a-z]{1,5}", 0..3),
    )
        .prop_map(|(cores, memory, concurrency, queue, ip, mac, apps, procedures)| Specs {
            cores,
            memory,
            concurrency,
            queue,
            ip,
            mac,
            apps,
            procedures,
        });
    let reason = prop_oneof![Just(RefuseReason::Busy), Just(RefuseReason::ShuttingDown), Just(RefuseReason::Invalid)];
    let blob = prop_oneof![
        ("[a-z]{1,8}", "[0-9]{0,3}", hash()).prop_map(|(app, version, hash)| Blob::Package { app, version, hash }),
        (task_id(), lease()).prop_map(|(task_id, lease)| Blob::Result { task_id, lease }),
    ];
    prop_oneof![
        node_type().prop_map(|node_type| Body::NodeTypeRequest { node_type }),
        node_type().prop_map(|node_type| Body::NodeTypeAnswer { node_type }),
        specs.prop_map(Body::ManagerRequest),
        any::<bool>().prop_map(|accepted| Body::ManagerAnswer { accepted }),
        Just(Body::ManagerBye),
        Just(Body::ManagerPing),
        Just(Body::ManagerPong),
        Just(Body::NotMine),
        Just(Body::Ack),
        proptest::collection::vec(spec(), 0..4).prop_map(|tasks| Body::TasksExecute { tasks }),
        proptest::collection::vec((task_id(), reason, "[ -~]{0,30}"), 0..4).prop_map(|v| Body::TasksRefused {
            tasks: v.into_iter().map(|(task_id, reason, message)| Refusal { task_id, reason, message }).collect()
        }),
        proptest::collection::vec(task_id(), 0..5).prop_map(|tasks| Body::TasksPing { tasks }),
        proptest::collection::vec((task_id(), any::<u64>(), status()), 0..5).prop_map(|v| Body::TasksPong {
            tasks_status: v
                .into_iter()
                .map(|(task_id, lease, status)| TaskReport { task_id, lease: Lease(lease), status })
                .collect()
        }),
        proptest::collection::vec(task_id(), 0..5).prop_map(|tasks| Body::TasksAbort { tasks }),
        (task_id(), lease(), any::<u64>()).prop_map(|(task_id, lease, t)| Body::TaskStarted {
            task_id,
            lease,
            datetime: UnixMs(t)
        }),
        (task_id(), lease(), kind(), any::<String>()).prop_map(|(task_id, lease, error, message)| Body::TaskError {
            task_id,
            lease,
            error,
            message
        }),
        (task_id(), lease(), json_value()).prop_map(|(task_id, lease, r)| Body::TaskCompleted {
            task_id,
            lease,
            result: ResultBody::Inline(json(&r).unwrap())
        }),
        (task_id(), lease(), 0u64..100_000, hash()).prop_map(|(task_id, lease, size, hash)| Body::TaskCompleted {
            task_id,
            lease,
            result: ResultBody::Held { size, hash }
        }),
        (blob, any::<u64>(), 1u32..(1 << 20)).prop_map(|(blob, offset, max_len)| Body::Fetch { blob, offset, max_len }),
        (proptest::collection::vec(any::<u8>(), 0..64), 0u64..1000).prop_map(|(data, offset)| Body::FetchChunk {
            total: offset + data.len() as u64,
            offset,
            data
        }),
        any::<String>().prop_map(|reason| Body::FetchMissing { reason }),
    ]
}

fn round_trip_text(m: &Message) -> Message {
    text::from_line(&text::to_line(m)).expect("the text form of a valid message parses")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn valid_messages_survive_both_wire_forms(id in 1u64.., body in body()) {
        let p = Packet::new(id, body);
        let m = p.to_message();
        prop_assert!(m.validate().is_ok());
        prop_assert_eq!(Packet::from_message(&m), Ok(p.clone()));
        prop_assert_eq!(Packet::from_message(&round_trip_text(&m)), Ok(p.clone()));
        let mut buf = bytes::BytesMut::new();
        nodus_wire::binary::encode(&m, &mut buf, nodus_wire::DEFAULT_MAX_FRAME).unwrap();
        prop_assert_eq!(Packet::from_message(&nodus_wire::binary::decode_body(&bytes::Bytes::copy_from_slice(&buf[4..])).unwrap()), Ok(p));
    }

    #[test]
    fn random_parameters_and_payloads_never_panic(
        command in proptest::sample::select(COMMANDS.to_vec()),
        params in proptest::collection::btree_map(
            proptest::sample::select(vec![
                "node_type", "cores", "memory", "concurrency", "queue", "ip", "mac", "accepted", "task_id",
                "lease", "datetime", "error", "message", "size", "hash", "blob", "app", "version", "offset",
                "max_len", "total", "reason",
            ]),
            prop_oneof![any::<String>(), "[0-9]{1,25}", Just("true".to_string()), "[a-f0-9]{64}", Just("package".to_string()), Just("result".to_string())],
            0..10,
        ),
        payload in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            json_value().prop_map(String::into_bytes),
            Just(b"[{\"id\":\"t\",\"lease\":1,\"attempt\":1,\"procedure\":\"a.b\",\"app\":\"a\",\"args\":[],\"timeout_ms\":5}]".to_vec()),
            Just(b"[{\"task_id\":\"t\",\"lease\":1,\"status\":\"started\"}]".to_vec()),
            Just(b"{\"apps\":[{\"app\":\"\",\"version\":\"1\",\"hash\":\"x\",\"size\":1}]}".to_vec()),
        ],
        id in 0u64..3,
        reply_to in 0u64..3,
    ) {
        let mut m = Message::new(command);
        for (k, v) in params {
            m = m.param(k, v);
        }
        m = m.with_payload(payload);
        m.envelope.id = id;
        m.envelope.reply_to = reply_to;
        if let Ok(p) = Packet::from_message(&m) {
            // What decodes, encodes back to the same packet.
            prop_assert_eq!(Packet::from_message(&p.to_message()), Ok(p));
        }
    }

    #[test]
    fn mutated_valid_messages_never_panic(id in 1u64.., body in body(), cut in any::<usize>(), byte in any::<u8>(), at in any::<usize>()) {
        let m = Packet::new(id, body).to_message();
        let mut payload = m.payload.to_vec();
        if !payload.is_empty() {
            let i = at % payload.len();
            payload[i] = byte;
            payload.truncate(cut % (payload.len() + 1));
        }
        let mut bad = m.clone().with_payload(payload);
        let _ = Packet::from_message(&bad);
        if let Some(k) = m.params.keys().nth(at % (m.params.len().max(1))).cloned() {
            bad.params.insert(k.clone(), String::from_utf8_lossy(&[byte]).into_owned());
            let _ = Packet::from_message(&bad);
            bad.params.remove(&k);
            let _ = Packet::from_message(&bad);
        }
    }

    #[test]
    fn random_lines_never_panic(line in "[A-Z_]{1,20}( [ -~]{0,200})?") {
        if let Ok(m) = text::from_line(&line) {
            let _ = Packet::from_message(&m);
        }
    }
}

// ---- the machines under random input ----

const PEERS: [&str; 5] = ["m1", "m2", "w1", "w2", "x"];

#[derive(Debug, Clone)]
enum Input {
    /// A request from a peer.
    Request(usize, Body),
    /// An answer from a peer to one of the machine's requests to it (the k-th), or to a random id.
    Answer(usize, Option<usize>, u64, Body),
    /// The executor ends an attempt the worker started (the k-th).
    End(usize, u8),
    /// Time passes.
    Wait(u64),
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        4 => (0..PEERS.len(), body().prop_filter("a request", |b| !b.is_answer())).prop_map(|(p, b)| Input::Request(p, b)),
        3 => (0..PEERS.len(), proptest::option::of(0usize..8), 1u64..1000, body().prop_filter("an answer", Body::is_answer))
            .prop_map(|(p, k, id, b)| Input::Answer(p, k, id, b)),
        2 => (0usize..8, 0u8..4).prop_map(|(k, e)| Input::End(k, e)),
        1 => (1u64..5_000).prop_map(Input::Wait),
    ]
}

/// Answers counted per (peer, request id).
type Answers = BTreeMap<(String, u64), u32>;

struct Harness {
    now: UnixMs,
    manager: Manager,
    worker: WorkerNode,
    /// Requests each machine sent, per peer: ids (for answers to pick from).
    m_sent: BTreeMap<String, Vec<u64>>,
    w_sent: BTreeMap<String, Vec<u64>>,
    m_answers: Answers,
    w_answers: Answers,
    runs: Vec<(TaskId, Lease)>,
    /// Tasks handed out by claims so far.
    claimed: u64,
    /// Messages between m1 and w1 in flight (they are joined by a link).
    link: Vec<(&'static str, Packet)>,
}

impl Harness {
    fn new() -> Harness {
        let mut manager = Manager::new(ManagerConfig::new("m1", ["w1".to_string(), "w2".to_string()]), vec![], 1, T0);
        manager.set_app("a", None, T0);
        let specs = Specs { concurrency: 2, queue: 2, ..Specs::default() };
        let worker = WorkerNode::new(WorkerConfig::new("w1", vec!["m1".into(), "m2".into()], specs), 2, T0);
        Harness {
            now: T0,
            manager,
            worker,
            m_sent: BTreeMap::new(),
            w_sent: BTreeMap::new(),
            m_answers: Answers::new(),
            w_answers: Answers::new(),
            runs: vec![],
            claimed: 0,
            link: vec![],
        }
    }

    /// Carries out both machines' actions as a driver would (records durable at once, claims
    /// answered with up to two new tasks, installs failing); m1 and w1 talk over a link.
    fn drain(&mut self) {
        for _ in 0..10_000 {
            let mut any = false;
            for (to, p) in std::mem::take(&mut self.link) {
                any = true;
                if to == "m1" {
                    self.manager.handle_packet("w1", p, self.now);
                } else {
                    self.worker.handle_packet("m1", p, self.now);
                }
            }
            while let Some(a) = self.manager.poll_action() {
                any = true;
                match a {
                    ManagerAction::Send { to, packet } => {
                        if packet.body.is_answer() {
                            *self.m_answers.entry((to.clone(), packet.id)).or_default() += 1;
                        } else {
                            self.m_sent.entry(to.clone()).or_default().push(packet.id);
                        }
                        if to == "w1" {
                            self.link.push(("w1", packet));
                        }
                    }
                    ManagerAction::Record(f) => self.manager.handle_recorded(&f.id, f.lease, self.now),
                    ManagerAction::Claim(c) => {
                        let tasks = (0..c.max.min(2))
                            .map(|_| {
                                self.claimed += 1;
                                Claimed {
                                    id: format!("c{}", self.claimed).parse().unwrap(),
                                    procedure: "a.run".into(),
                                    app: "a".into(),
                                    args: json("[]").unwrap(),
                                    attempt: 1,
                                    max_attempts: 2,
                                    timeout: Duration::from_secs(20),
                                    lease: Lease(100 + self.claimed),
                                    created_at: self.now,
                                    parent: None,
                                    deadline: None,
                                }
                            })
                            .collect();
                        self.manager.handle_claimed(&c.owner, &c.app, c.max, Ok(tasks), self.now)
                    }
                    ManagerAction::ServePackage { to, id, .. } => *self.m_answers.entry((to, id)).or_default() += 1,
                    ManagerAction::Agent(_) | ManagerAction::Reap(_) | ManagerAction::Purge(..) => {}
                }
            }
            while let Some(a) = self.worker.poll_action() {
                any = true;
                match a {
                    WorkerAction::Send { to, packet } => {
                        if packet.body.is_answer() {
                            *self.w_answers.entry((to.clone(), packet.id)).or_default() += 1;
                        } else {
                            self.w_sent.entry(to.clone()).or_default().push(packet.id);
                        }
                        if to == "m1" {
                            self.link.push(("m1", packet));
                        }
                    }
                    WorkerAction::Run(s) => self.runs.push((s.id, s.lease)),
                    WorkerAction::Install(p) => self.worker.handle_installed(&p, Err("no disk".into()), self.now),
                    WorkerAction::Kill { .. } | WorkerAction::PackageData { .. } | WorkerAction::DropPackage(_) => {}
                }
            }
            if !any {
                return;
            }
        }
        panic!("the machines keep each other busy at one instant (a livelock)");
    }

    fn tick(&mut self) {
        self.manager.tick(self.now);
        self.worker.tick(self.now);
        self.drain();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_machines_never_panic_and_answer_every_request_exactly_once(inputs in proptest::collection::vec(input(), 1..60)) {
        let mut h = Harness::new();
        h.tick();
        prop_assert_eq!(h.worker.manager(), Some("m1"), "w1 and m1 pair over their link first");
        let mut asked: Vec<(String, u64, &'static str)> = Vec::new();
        for (n, input) in inputs.into_iter().enumerate() {
            let id = 1_000_000 + n as u64;
            match input {
                Input::Request(p, body) => {
                    let peer = PEERS[p];
                    let command = body.command();
                    // Through the text form, as it would arrive.
                    let packet = Packet::from_message(&round_trip_text(&Packet::new(id, body.clone()).to_message())).unwrap();
                    h.manager.handle_packet(peer, packet.clone(), h.now);
                    h.worker.handle_packet(peer, packet, h.now);
                    asked.push((peer.to_string(), id, command));
                }
                Input::Answer(p, k, random, body) => {
                    let peer = PEERS[p];
                    let pick = |sent: &BTreeMap<String, Vec<u64>>| {
                        k.and_then(|k| sent.get(peer).and_then(|v| v.get(v.len().saturating_sub(1 + k)).copied())).unwrap_or(random)
                    };
                    let (mid, wid) = (pick(&h.m_sent), pick(&h.w_sent));
                    h.manager.handle_packet(peer, Packet::new(mid, body.clone()), h.now);
                    h.worker.handle_packet(peer, Packet::new(wid, body), h.now);
                }
                Input::End(k, e) => {
                    if let Some((id, lease)) = h.runs.get(h.runs.len().saturating_sub(1 + k)).cloned() {
                        let end = match e {
                            0 => AttemptEnd::Returned(json("1").unwrap()),
                            1 => AttemptEnd::Failed("x".into()),
                            2 => AttemptEnd::WorkerFailed("y".into()),
                            _ => AttemptEnd::NotRun("z".into()),
                        };
                        h.worker.handle_end(&id, lease, end, h.now);
                    }
                }
                Input::Wait(ms) => h.now = h.now.plus(Duration::from_millis(ms)),
            }
            h.drain();
            h.tick();
        }
        stats(&h);
        // Long enough for every deferred answer (held results fetched or given up).
        for _ in 0..20 {
            h.now = h.now.plus(Duration::from_secs(30));
            h.tick();
        }
        for (peer, id, command) in asked {
            let key = (peer.clone(), id);
            prop_assert_eq!(h.m_answers.get(&key).copied(), Some(1), "manager, {} from {}", command, peer);
            prop_assert_eq!(h.w_answers.get(&key).copied(), Some(1), "worker, {} from {}", command, peer);
        }
    }
}

/// How much of the machines the random inputs reached (printed with --nocapture).
fn stats(h: &Harness) {
    eprintln!(
        "paired: {}, workers: {}, attempts run: {}",
        h.worker.manager().is_some(),
        h.manager.workers().count(),
        h.runs.len()
    );
}
