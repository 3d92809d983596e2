//! The seed corpus: real messages, as the tests and the documentation write them, in each
//! target's input layout. `examples/seeds.rs` writes them under `corpus/<target>/`; the fuzzer
//! grows the corpus from there.

use std::collections::{BTreeMap, BTreeSet};

use bytes::{Bytes, BytesMut};
use nodus_control::flags::{file, Flag, FlagRequest, Raise};
use nodus_control::{Body, ComponentId, ControlMessage, Header, MonitoringResult, Spec};
use nodus_daemon::auth::Origin;
use nodus_daemon::router::{Action, Router, RouterLimits};
use nodus_daemon::topology::NodeRecord;
use nodus_daemon::Config;
use nodus_engine::protocol::Message as Cocaine;
use nodus_wire::{binary, text, Message};
use rmpv::Value;

/// The node every gossip seed is addressed to, with its incarnation (the gossip target runs it).
pub mod cluster {
    /// The node under test.
    pub const ME: &str = "a";
    /// Its neighbour.
    pub const PEER: &str = "b";
    /// `a`'s incarnation (its start time, as the daemon sets it).
    pub const INCARNATION: i64 = 1_700_000_000_000;
}

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

/// The gossip two real routers exchange when `a` links to `b`, and after `b` learns of `c`.
fn gossip() -> Vec<Vec<u8>> {
    let config = Config::default();
    let limits = RouterLimits::from_config(&config.limits);
    let new =
        |name: &str, inc: i64| Router::new(name, &[], limits, config.cluster.clone(), format!("{name}:4041"), inc);
    let mut a = new(cluster::ME, cluster::INCARNATION);
    let mut b = new(cluster::PEER, cluster::INCARNATION + 7);
    let (mut to_b, mut to_a) = (Vec::new(), Vec::new());
    a.dial(10, Origin::Dialed { addr: "b:4041".into(), tls: false }, &mut to_b);
    b.connect(20, Origin::Cluster { peer: "127.0.0.2:5000".parse().expect("an address"), tls: false });
    let mut payloads = Vec::new();
    for _ in 0..4 {
        for action in std::mem::take(&mut to_b) {
            if let Action::Deliver(10, m) = action {
                b.handle(20, m, cluster::INCARNATION, &mut to_a);
            }
        }
        for action in std::mem::take(&mut to_a) {
            if let Action::Deliver(20, m) = action {
                if m.command == "GOSSIP" {
                    payloads.push(m.payload.clone());
                }
                a.handle(10, m, cluster::INCARNATION, &mut to_b);
            }
        }
    }
    // A cluster a - b - c with app endpoints, and a record in the old format (no apps).
    let rec = |inc: i64, seq: u64, links: &[&str], services: &[&str]| NodeRecord {
        addr: "10.0.0.3:4041".into(),
        incarnation: inc,
        seq,
        links: links.iter().map(|s| s.to_string()).collect(),
        services: services.iter().map(|s| s.to_string()).collect(),
        apps: BTreeMap::from([("echo".to_string(), ("10.0.0.3".to_string(), 4000))]),
    };
    let records = BTreeMap::from([
        (cluster::PEER.to_string(), rec(cluster::INCARNATION + 7, 3, &["a", "c"], &["billing"])),
        ("c".to_string(), rec(5, 1, &["b"], &["echo", "jobs"])),
        (cluster::ME.to_string(), rec(cluster::INCARNATION, 1, &["b"], &[])),
    ]);
    payloads.push(rmp_serde::to_vec(&records).expect("records encode"));
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
    ]
}
