//! The seed corpus: real messages, as the tests and the documentation write them, in each
//! target's input layout. `examples/seeds.rs` writes them under `corpus/<target>/`; the fuzzer
//! grows the corpus from there.

use std::collections::{BTreeMap, BTreeSet};

use bytes::{Bytes, BytesMut};
use nodus_control::flags::{file, Flag, FlagRequest, Raise};
use nodus_control::{Body, ComponentId, ControlMessage, Header, MonitoringResult, Spec};
use nodus_daemon::topology::NodeRecord;
use nodus_engine::protocol::Message as Cocaine;
use nodus_wire::{binary, text, Message};
use rmpv::Value;

use crate::cluster;

/// Lines as the tests and the README write them.
const LINES: &[&str] = &[
    "images/REPROCESS url=http://domain.name/this/one;priority=normal",
    r#"pagelist/RESET url="http://domain.name/this;one;path";priority=-58"#,
    r#"svc/SET p="a;b\\""#,
    "<alpha:images beta:pagelist/RESET a=1;_id=7;_reply_to=3",
    r#"X v=line1\nline2\r\\"q;w="\"starts""#,
    "bsvc/HELLO x=1;_payload=AAEC/w==;_id=4",
    "svc/ASK _id=21;_expires_at=1700000005000;_created_at=1700000000000;_creator=cli;_pid=9;_hops=2",
    "later/B cache=no;transmission_report=failure",
    "other:svc/CMD _id=2",
    "n1:/REPLY answer=43;_reply_to=17",
    "*:apps/LIST _id=1",
    "REGISTER service=svc;version=1",
    "COMMANDS list=HELLO,ASK,STOP",
    "AUTH token=00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff;_id=1",
    "apps/DEPLOY name=echo;_payload=H4sIAAAAAAAA/w==",
    "CLUSTER_STATUS _id=3",
    "CMD a=\"x\"y",
    "CMD a=1;",
    "<a:b",
];

/// Control lines as the control plane's tests write them.
const CONTROL_LINES: &[&str] = &[
    "node/MONITORING component=42;message_type=config;spec=monitoring;sync_time=1700000000000;\
     tag=config:monitoring:7:null:cli;_creator=cli;_expires_at=1700000005000;_id=7",
    "<a:billing a:cli/RESULT component=42;host=a;is_running=true;message=;message_type=result;name=billing;\
     spec=monitoring;sync_time=1700000000000;tag=result:monitoring:7:42:a:billing;_creator=a:billing;\
     _expires_at=1700000005000;_pid=42;_reply_to=7",
    "<a:control a:jobs/ERROR code=killed;command=KILL;component=42;message=service billing (42) was killed by cli;\
     message_type=error;spec=kill;tag=error:kill:9:42:a:control;_creator=a:control;_pid=42",
    "node/MONITORING sync_time=5;_id=3",
    "node/KILL component=12",
    "RESULT spec=kill;stopped=false;unanswered=1,2,3;tag=result:kill:9:42:a:control",
    "KILL tag=config:kill:1:5:cli;_pid=6",
];

/// Flag lines as the flags tests and documentation write them.
const FLAG_LINES: &[&str] = &[
    "flags/FLAG_UP unit=backup;section=nightly;name=failed;message=disk full;priority=60;tags=disk,backup",
    "<a:flags backup/FLAG_IS_UP count=1;name=failed;new=yes;section=nightly;unit=backup",
    "flags/FLAG_UP unit=Backup;section=nightly;name=failed;message=disk full;priority=60;\
     tags=disk backup,Nightly;manual_down=yes;line=12",
    "flags/FLAG_DOWN unit=backup;section=nightly;name=failed;_id=3",
    "flags/FLAG_CLEAR unit=backup;section=nightly;name=failed;_id=4",
    "flags/FLAG_LIST _id=7",
    "flags/FLAG_STATUS _id=2",
    "flags/FLAG_STATUS unit=backup;section=nightly;name=failed",
    "FLAG_IS_DOWN lowered=yes;name=failed;section=nightly;unit=backup",
    "FLAG_STATUS count=2;raised=yes",
    "ERROR code=manual_down;command=FLAG_DOWN;message=flag backup/nightly/failed is manual-down",
];

/// arpcp request lines as `tests/arpcp.rs` (nodus-tasks) and the reference client send them,
/// and answer lines as the node writes them.
const ARPCP_LINES: &[&str] = &[
    r#"{"method": "atask", "version": "0.3", "remote_procedure": "procs.add", "remote_procedure_args": [1, 2]}"#,
    r#"{"method": "TASK", "version": "1.0", "remote_procedure": "procs.concat", "remote_procedure_args": ["a", "b"]}"#,
    r#"{"method": "Signal", "version": "ARPCP/1.0", "atask_id": "0f8a-1", "atask_status": "accepted"}"#,
    r#"{"method": "ID", "version": "1.0"}"#,
    r#"{"method": "procedures", "version": "1.0"}"#,
    r#"{"method": "get", "version": "1.0", "atask_id": "0f8a-1"}"#,
    r#"{"method":"SIGNAL","version":1.0,"atask_id":"a","atask_status":"Terminate"}"#,
    r#"{"method": "atask", "version": "1.0", "remote_procedure": "procs.sleep", "remote_procedure_args": [60000]}"#,
    r#"{"method": "task", "version": "0.3", "remote_procedure": "procs.concat", "remote_procedure_args": ["h\u00e9llo ", "w\u00f6rld"]}"#,
    r#"{"method": "task", "version": "1.0", "remote_procedure": "procs.fail", "remote_procedure_args": ["disk on fire"]}"#,
    r#"{"method": "atask", "version": "1.0", "remote_procedure": "procs.add", "remote_procedure_args": {"a": 1}}"#,
    r#"{"method": "signal", "version": "1.0", "atask_id": "x", "atask_status": "explode"}"#,
    r#"{"method": "get", "version": "1.0", "atask_id": 42}"#,
    r#"{"method": "fly", "version": "1.0"}"#,
    r#"{"method": "id"}"#,
    r#"{"method": "atask", "version": "2.0", "remote_procedure": "procs.add", "remote_procedure_args": [1, 2]}"#,
    r#"["atask", 1]"#,
    "hello",
    r#"{"code":100,"description":"done","data":{"a":[1,2.5,null,true],"b":"\n"}}"#,
    r#"{"code":205,"description":"unknown task no-such-task","data":null}"#,
    r#"{"code":400,"description":"boom\nbang","data":null}"#,
];

/// Reply rows as the node writes them (`rows.rs` tests), by row kind of the rows target.
const ROWS: &[(u8, &str)] = &[
    (0, "echo@v2@running@3,hello@v1@stopped@0,bad@@failed@0,x@v1@starting@0"),
    (1, "3f2a-11@4242@Active@2,3f2a-12@4243@Terminating@0"),
    (2, "a@127.0.0.1:4042@up,b@10.0.0.2:4042@down"),
    (3, "b@1@-3@0.42,c@-@-@0.00,d@5@0@inf"),
    (4, "a:apps,b:images,c:"),
    (
        5,
        "worker u1 at 1700000000: exit code 3 (crashed: exit code 3)\n    boom\n    line two\n\
         worker u2 at 1700000009: never started\n",
    ),
    (6, "worker 6f1c-3f0e at 1700000000: killed by signal 9 (crashed: killed by signal 9)\n    Traceback:\n"),
];

fn with(first: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![first];
    v.extend_from_slice(body);
    v
}

fn frame(m: &Message) -> BytesMut {
    let mut b = BytesMut::new();
    binary::encode(m, &mut b, nodus_wire::DEFAULT_MAX_FRAME).expect("a seed fits a frame");
    b
}

fn body(m: &Message) -> Vec<u8> {
    frame(m)[binary::HEADER_LEN..].to_vec()
}

fn parsed(lines: &[&str]) -> Vec<Message> {
    lines.iter().filter_map(|l| text::from_line(l).ok()).collect()
}

fn wire_text() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = LINES.iter().map(|l| with(0, format!("{l}\n").as_bytes())).collect();
    seeds.push(with(0, b"\nA\r\nsvc/B x=1\nC"));
    seeds.push(with(3, b"svc/HELLO n=1\nsvc/OTHER n=2\nother/HELLO n=3\n"));
    seeds.push(with(7, b"svc/ASK _id=11\r\n\r\nsvc/CHECK _id=12\n"));
    seeds
}

fn wire_binary() -> Vec<Vec<u8>> {
    let messages = parsed(LINES);
    let mut seeds = Vec::new();
    for m in &messages {
        // Bare frame, decoder without preface; preface written by the harness.
        seeds.push(with(0x3f, &frame(m)));
        seeds.push(with(0xc0 | 5, &frame(m)));
    }
    // Several frames after a real preface, the way a client opens a connection.
    let mut stream = BytesMut::from(&binary::PREFACE[..]);
    for m in messages.iter().take(4) {
        stream.extend_from_slice(&frame(m));
    }
    seeds.push(with(0x40 | 2, &stream));
    // A garbage body of the right length, then a good frame: the stream stays in sync.
    let mut sync = BytesMut::from(&[0u8, 0, 0, 3, 0xc1, 0xc1, 0xc1][..]);
    sync.extend_from_slice(&frame(&messages[0]));
    seeds.push(with(0x3f, &sync));
    seeds.push(with(0x40, b"\0NODUS\x09\n"));
    seeds
}

fn value_bytes(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v).expect("in memory");
    out
}

fn cocaine_worker() -> Vec<Vec<u8>> {
    let from_worker = [
        Cocaine::Handshake { uuid: "6f1c3f0e-9d1f-4c1e-8b33-0d5f2b8c1a77".into() },
        Cocaine::Heartbeat,
        Cocaine::Chunk { channel: 2, data: Bytes::from_static(b"pong") },
        Cocaine::Choke { channel: 2 },
        Cocaine::Error { channel: 3, category: 42, code: 100, message: "uncaught exception".into() },
        Cocaine::Terminate { code: 1, reason: "bye".into() },
    ];
    let from_engine = [
        Cocaine::Heartbeat,
        Cocaine::Invoke { channel: 2, event: "ping".into() },
        Cocaine::Chunk { channel: 2, data: Bytes::from_static(b"hello") },
        Cocaine::Choke { channel: 2 },
        Cocaine::Invoke { channel: 3, event: "echo".into() },
        Cocaine::Terminate { code: 2, reason: "engine stopping".into() },
    ];
    let stream = |msgs: &[Cocaine]| {
        let mut b = BytesMut::new();
        for m in msgs {
            m.encode(&mut b);
        }
        b.to_vec()
    };
    // With headers, as a Cocaine framework sends them.
    let headers = Value::Array(vec![
        Value::from(2),
        Value::from(0),
        Value::Array(vec![Value::from("data")]),
        Value::Array(vec![
            Value::Array(vec![Value::from(true), Value::from("trace_id"), Value::Binary(vec![1, 2, 3])]),
            Value::from(80),
        ]),
    ]);
    vec![
        // Engine role, bound 4096, chunks of 3 and 32.
        with(0x40 | 2, &stream(&from_worker)),
        with(0x40 | 31, &stream(&from_worker)),
        // Worker role.
        with(0x80 | 0x40 | 4, &stream(&from_engine)),
        with(0x80 | 0x60 | 31, &stream(&from_engine)),
        with(0x40 | 1, &value_bytes(&headers)),
        // Bound 16 bytes: the handshake is too large.
        with(7, &stream(&from_worker[..1])),
    ]
}

fn cocaine_service() -> Vec<Vec<u8>> {
    let f = |ch: u64, kind: u64, args: Vec<Value>| {
        value_bytes(&Value::Array(vec![Value::from(ch), Value::from(kind), Value::Array(args)]))
    };
    let app = [
        f(1, 0, vec![Value::from("echo")]),
        f(1, 0, vec![Value::Binary(b"ping".to_vec())]),
        f(2, 1, vec![]),
        f(3, 2, vec![]),
        f(3, 0, vec![Value::from(4)]),
        f(3, 0, vec![Value::from(-1)]),
        f(1, 2, vec![]),
        f(4, 0, vec![Value::from("slow")]),
        f(4, 1, vec![Value::Array(vec![Value::from(3), Value::from(4)]), Value::from("stop")]),
        f(5, 9, vec![]),
    ]
    .concat();
    let locator =
        [f(1, 0, vec![Value::from("echo")]), f(2, 0, vec![Value::Binary(b"x".to_vec())]), f(3, 6, vec![])].concat();
    let mut seeds = Vec::new();
    // App, 8 channels, operations: nothing, finish this one, finish another, drain.
    let mut s = vec![1 | (7 << 1), 4, 0, 1, 2, 0];
    s.extend_from_slice(&app);
    seeds.push(s);
    // App, 2 channels, nothing finishes: the bound is reached.
    let mut s = vec![1 | (1 << 1), 0];
    s.extend_from_slice(&app);
    seeds.push(s);
    let mut s = vec![1 | (3 << 1), 3, 0, 0xff, 1];
    s.extend_from_slice(&app);
    seeds.push(s);
    let mut s = vec![3 << 1, 1, 1];
    s.extend_from_slice(&locator);
    seeds.push(s);
    seeds
}

/// The gossip `b` sends `a` when they link (signed by their routers), then records as a peer may
/// send them: a cluster a - b - c with app endpoints, a newer record claiming to be `a`, a record
/// in the old format (no apps), without MACs (the target signs records that have none) and one
/// with a MAC that is wrong.
fn gossip() -> Vec<Vec<u8>> {
    let (_, _, crossed) = cluster::linked(cluster::INCARNATION);
    let mut payloads: Vec<Vec<u8>> = crossed
        .iter()
        .filter(|m| m.command == "GOSSIP" && m.from.server == cluster::PEER)
        .map(|m| m.payload.to_vec())
        .collect();
    let rec = |inc: i64, seq: u64, links: &[&str], services: &[&str]| NodeRecord {
        addr: "10.0.0.3:4041".into(),
        incarnation: inc,
        seq,
        links: links.iter().map(|s| s.to_string()).collect(),
        services: services.iter().map(|s| s.to_string()).collect(),
        apps: BTreeMap::from([("echo".to_string(), ("10.0.0.3".to_string(), 4000))]),
        mac: Vec::new(),
    };
    let records = BTreeMap::from([
        (cluster::PEER.to_string(), rec(cluster::PEER_INCARNATION, 3, &["a", "c"], &["billing"])),
        ("c".to_string(), rec(5, 1, &["b"], &["echo", "jobs"])),
        (cluster::ME.to_string(), rec(cluster::INCARNATION, 1, &["b"], &[])),
    ]);
    payloads.push(rmp_serde::to_vec(&records).expect("records encode"));
    let claim = BTreeMap::from([(cluster::ME.to_string(), rec(cluster::INCARNATION + 5, 9, &["x"], &["stolen"]))]);
    payloads.push(rmp_serde::to_vec(&claim).expect("records encode"));
    let mut forged = rec(cluster::PEER_INCARNATION, 4, &["a"], &[]);
    forged.mac = vec![0x5a; 32];
    payloads.push(rmp_serde::to_vec(&BTreeMap::from([(cluster::PEER, forged)])).expect("records encode"));
    let old = ("10.0.0.4:4041", 3i64, 1u64, BTreeSet::from(["a".to_string()]), BTreeSet::<String>::new());
    payloads.push(rmp_serde::to_vec(&BTreeMap::from([("d", old)])).expect("records encode"));
    payloads
}

fn control() -> Vec<Vec<u8>> {
    let id = |n| ComponentId::new(n);
    let header = Header { id: 3, pid: id(5), creator: "b:svc".into(), created_at: 10, expires_at: 20 };
    let bodies = [
        Body::Monitoring { target: id(42), sync_time: 1_000 },
        Body::MonitoringResult {
            component: id(42),
            result: MonitoringResult {
                sync_time: 1_000,
                name: "billing".into(),
                host: "a".into(),
                is_running: true,
                message: "ok; 3 jobs".into(),
            },
        },
        Body::Kill { target: id(9) },
        Body::KillResult { component: id(9), stopped: false, unanswered: vec![id(1).unwrap(), id(2).unwrap()] },
        Body::Error { spec: Spec::Kill, component: id(5), code: "killed".into(), message: "x".into() },
    ];
    let mut seeds: Vec<Vec<u8>> = CONTROL_LINES.iter().map(|l| with(0, l.as_bytes())).collect();
    for b in bodies {
        let m = ControlMessage { header: header.clone(), body: b }.to_message();
        seeds.push(with(1, &body(&m)));
    }
    seeds.push(with(2, b"result:kill:5:null:node-a:billing"));
    seeds.push(with(2, b"config:monitoring:7:42:cli"));
    seeds.push(with(3, b"18446744073709551615"));
    seeds
}

fn flags() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = FLAG_LINES.iter().map(|l| with(0, l.as_bytes())).collect();
    for m in parsed(FLAG_LINES).iter().take(4) {
        seeds.push(with(1, &body(m)));
    }
    let key = nodus_control::flags::FlagKey::new("nodus", "links", "neighbour-unreachable").expect("a key");
    let raise = Raise::new(key, "node b unreachable").priority(50).tag("cluster").source("links.rs", "tick", 7);
    seeds.push(with(1, &body(&FlagRequest::Up(raise).to_message())));
    let flag = Flag {
        unit: "nodus".into(),
        section: "links".into(),
        name: "neighbour-unreachable".into(),
        message: "node b unreachable\nsince 5 min; check C:\\path".into(),
        priority: 50,
        manual_down: true,
        tags: ["cluster".to_string(), "links".to_string()].into(),
        source_file: "src/links.rs".into(),
        function: "tick".into(),
        line: 42,
        date: 1_700_000_000_000,
        modified: 1_700_000_300_000,
        hostname: "host-a".into(),
        version: "0.1.0".into(),
        count: 3,
    };
    seeds.push(with(2, file::encode(&flag).as_bytes()));
    seeds.push(with(2, b"unit=Web\nsection=core\nname=x\nmessage=hi\n"));
    seeds.push(with(2, b"unit=a\nsection=b\nname=c\nmessage=m\ntags=x_y\n"));
    let list = nodus_control::flags::FlagReply::List(vec![flag]);
    seeds.push(with(1, &body(&list.reply_to(&Message::new("FLAG_LIST")))));
    seeds
}

/// The arpcp lines, bare (the target reads the input as the line).
fn arpcp_line() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = ARPCP_LINES.iter().map(|l| l.as_bytes().to_vec()).collect();
    seeds.push(b"{\"method\": \"atask\xff\xfe\", \"version\": \"1.0\"}".to_vec());
    seeds
}

/// One packet of every manager/worker message, as a text line and as a binary body.
fn tasks_cluster() -> Vec<Vec<u8>> {
    use nodus_tasks::cluster::msg::{Refusal, RefuseReason, TaskReport};
    use nodus_tasks::cluster::{AppPackage, Blob, Body, NodeType, Packet, ResultBody, Specs, TaskSpec, TaskStatus};
    use nodus_tasks::task::{json, ErrorKind, Lease, UnixMs};
    let id = |s: &str| s.parse().expect("a task id");
    let package = AppPackage { app: "procs".into(), version: "v2".into(), hash: "ab".repeat(32), size: 4096 };
    let bodies = vec![
        Body::NodeTypeRequest { node_type: NodeType::Worker },
        Body::NodeTypeAnswer { node_type: NodeType::Manager },
        Body::ManagerRequest(Specs {
            cores: 4,
            memory: 8 << 30,
            concurrency: 2,
            queue: 2,
            ip: "10.0.0.2".into(),
            mac: "00:00:00:00:00:00".into(),
            apps: vec![package.clone()],
            procedures: vec!["procs.add".into(), "procs.concat".into()],
        }),
        Body::ManagerAnswer { accepted: true },
        Body::ManagerBye,
        Body::ManagerPing,
        Body::ManagerPong,
        Body::NotMine,
        Body::Ack,
        Body::TasksExecute {
            tasks: vec![TaskSpec {
                id: id("t-1"),
                lease: Lease(7),
                attempt: 1,
                procedure: "procs.add".into(),
                app: "procs".into(),
                args: json("[1, 2]").expect("JSON"),
                timeout: std::time::Duration::from_secs(30),
                package: Some(package.clone()),
                deadline: Some(UnixMs(1_800_000_000_000)),
            }],
        },
        Body::TasksRefused {
            tasks: vec![Refusal { task_id: id("t-2"), reason: RefuseReason::Busy, message: "queue full".into() }],
        },
        Body::TasksPing { tasks: vec![id("t-1"), id("t-2")] },
        Body::TasksPong {
            tasks_status: vec![
                TaskReport {
                    task_id: id("t-1"),
                    lease: Lease(7),
                    status: TaskStatus::Started(UnixMs(1_700_000_000_000)),
                },
                TaskReport {
                    task_id: id("t-2"),
                    lease: Lease(8),
                    status: TaskStatus::Completed(Some(json("3").expect("JSON"))),
                },
                TaskReport { task_id: id("t-3"), lease: Lease(9), status: TaskStatus::Error(ErrorKind::TimedOut) },
                TaskReport { task_id: id("t-4"), lease: Lease(0), status: TaskStatus::Unknown },
            ],
        },
        Body::TasksAbort { tasks: vec![id("t-1")] },
        Body::TaskStarted { task_id: id("t-1"), lease: Lease(7), datetime: UnixMs(1_700_000_000_000) },
        Body::TaskError { task_id: id("t-1"), lease: Lease(7), error: ErrorKind::RunningError, message: "boom".into() },
        Body::TaskCompleted {
            task_id: id("t-1"),
            lease: Lease(7),
            result: ResultBody::Inline(json("{\"n\": 3}").expect("JSON")),
        },
        Body::TaskCompleted {
            task_id: id("t-2"),
            lease: Lease(8),
            result: ResultBody::Held { size: 2_000_000, hash: "cd".repeat(32) },
        },
        Body::Fetch {
            blob: Blob::Package { app: "procs".into(), version: "v2".into(), hash: "ab".repeat(32) },
            offset: 0,
            max_len: 65536,
        },
        Body::Fetch { blob: Blob::Result { task_id: id("t-2"), lease: Lease(8) }, offset: 65536, max_len: 65536 },
        Body::FetchChunk { total: 10, offset: 4, data: b"chunk!".to_vec() },
        Body::FetchMissing { reason: "no such package".into() },
    ];
    let mut seeds = Vec::new();
    for (n, b) in bodies.into_iter().enumerate() {
        let m = Packet::new(n as u64 + 1, b).to_message();
        // Mode 0x3e keeps the command (62 >> 1 = 31 is not a command index).
        seeds.push(with(0x3e, text::to_line(&m).as_bytes()));
        seeds.push(with(0x3f, &body(&m)));
    }
    seeds
}

fn rows() -> Vec<Vec<u8>> {
    ROWS.iter().map(|(kind, text)| with(*kind, text.as_bytes())).collect()
}

/// Every target's seeds, by target name.
pub fn corpus() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    vec![
        ("wire_text", wire_text()),
        ("wire_binary", wire_binary()),
        ("cocaine_worker", cocaine_worker()),
        ("cocaine_service", cocaine_service()),
        ("gossip", gossip()),
        ("control", control()),
        ("flags", flags()),
        ("arpcp_line", arpcp_line()),
        ("tasks_cluster", tasks_cluster()),
        ("rows", rows()),
    ]
}
