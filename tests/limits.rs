//! Black-box tests of the driver's connection bounds (issue 8 items 2 and 5, issue 16 item 4):
//! connection limits per listener, the handshake timeout on every kind of connection, the TLS
//! listener's over-limit handling, the cluster listener's refusal to start open to the network,
//! and a slow consumer's callers being answered when it is cut.
//!
//! Real daemons in-process on `127.0.0.1:0` and temporary Unix sockets. Nothing sleeps to wait
//! for an event: every wait is on the event itself (a reply, an EOF) with a timeout.

use nodus_daemon::{Config, Daemon};
use nodus_tests::{BinConn, Node, TextConn, WAIT};
use nodus_wire::Message;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A node config with every listener on an ephemeral port (cluster too), no apps.
fn config(dir: &tempfile::TempDir, name: &str, limits: &str, cluster: &str) -> Config {
    let data = dir.path().join(name);
    let toml = format!(
        "server_name = \"{name}\"\ndata_dir = {data:?}\ntcp_listen = \"127.0.0.1:0\"\n\
         [limits]\n{limits}\n[cluster]\nudp_listen = \"\"\nheartbeat_ms = 100\n{cluster}\n[apps]\nenabled = false\n[http]\nlisten = \"\"\n"
    );
    Config::from_toml(&toml).expect("test config")
}

/// Round trip through the node: the PONG must be the next message.
async fn sync(c: &mut TextConn) {
    c.send("PING _id=424242").await;
    let m = c.recv().await;
    assert_eq!((m.command.as_str(), m.envelope.reply_to), ("PONG", 424242), "expected only the PONG, got {m:?}");
}

/// A service on `node` that is told about new cluster links.
async fn link_watcher(node: &Node) -> TextConn {
    let mut w = TextConn::connect(node).await;
    w.register("watcher").await;
    w.send("COMMANDS list=NEW_REMOTE_CONNECTION,DISCONNECTED").await;
    sync(&mut w).await;
    w
}

/// Waits until the peer closes `s` (EOF or reset); panics after [`WAIT`].
async fn closed_by_peer(s: &mut TcpStream, what: &str) {
    let mut scratch = [0u8; 4096];
    let eof = async {
        loop {
            match s.read(&mut scratch).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(WAIT, eof).await.unwrap_or_else(|_| panic!("{what} is closed by the node"));
}

/// True when a fresh binary client on `addr` is served (PONG), false when it is closed at once.
async fn served_on(addr: SocketAddr) -> bool {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut frame = bytes::BytesMut::new();
    frame.extend_from_slice(&nodus_wire::binary::PREFACE);
    nodus_wire::binary::encode(&Message::new("PING").with_id(7), &mut frame, 1 << 20).unwrap();
    let _ = s.write_all(&frame).await;
    let mut got = Vec::new();
    let answered = async {
        let mut chunk = [0u8; 512];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => {
                    got.extend_from_slice(&chunk[..n]);
                    if got.len() > nodus_wire::binary::PREFACE.len() + 4 {
                        return true;
                    }
                }
            }
        }
    };
    tokio::time::timeout(WAIT, answered).await.expect("the node answers or closes in time")
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_connections_on_one_listener_lock_out_no_other_and_are_closed_after_the_handshake_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let a = config(&dir, "a", "handshake_timeout_ms = 3000", "listen = \"127.0.0.1:0\"");
    let a = Node::start_config(tempfile::tempdir().unwrap(), a).await;
    let mut watcher = link_watcher(&a).await;

    // 1 100 connections that never send a byte: the TCP listener admits 1 024 and refuses the rest.
    let mut silent = Vec::new();
    for _ in 0..1100 {
        silent.push(TcpStream::connect(a.tcp).await.expect("connect"));
    }
    // Accepted in order: once a later client is refused, all of these were seen.
    assert!(!served_on(a.tcp).await, "the TCP listener is full");
    let tcp = a.counters.snapshot().tcp;
    assert_eq!((tcp.accepted, tcp.refused), (1024, 77), "{tcp:?}");
    let mut cluster_silent = Vec::new();
    for _ in 0..5 {
        cluster_silent.push(TcpStream::connect(a.cluster.unwrap()).await.expect("connect cluster"));
    }

    // The other listeners are not affected: a local client and a cluster link work.
    let mut local = TextConn::connect(&a).await;
    sync(&mut local).await;
    let b = config(&dir, "b", "", &format!("listen = \"\"\nneighbors = [\"{}\"]", a.cluster.unwrap()));
    let _b = Node::start_config(tempfile::tempdir().unwrap(), b).await;
    let up = watcher.expect("NEW_REMOTE_CONNECTION").await;
    assert_eq!(up.get("server"), Some("b"));

    // Every silent connection is closed once its handshake time is up, on both listeners.
    for (i, s) in silent.iter_mut().enumerate() {
        closed_by_peer(s, &format!("silent connection {i}")).await;
    }
    for s in &mut cluster_silent {
        closed_by_peer(s, "a silent cluster connection").await;
    }
    let counters = a.counters.snapshot();
    assert_eq!(counters.tcp.handshake_timeouts, 1024, "{counters:?}");
    assert_eq!(counters.cluster.handshake_timeouts, 5, "{counters:?}");
    // Those that spoke in time stay, however idle: the client, the link, and TCP serves again.
    sync(&mut local).await;
    assert!(watcher.try_recv(std::time::Duration::from_millis(300)).await.is_none(), "the link stays up");
    assert!(served_on(a.tcp).await, "the TCP listener admits clients again");
}

/// A throwaway cluster CA issuing node certificates for 127.0.0.1.
struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    dir: PathBuf,
}

impl Ca {
    fn new(dir: &Path) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "limits-ca");
        let issuer = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("ca.pem"), issuer.pem()).unwrap();
        Ca { issuer, dir: dir.to_path_buf() }
    }

    /// The `[cluster]` TLS keys for node `name`.
    fn tls(&self, name: &str) -> String {
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (self.dir.join(format!("{name}.pem")), self.dir.join(format!("{name}.key")));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        format!("tls_cert = {c:?}\ntls_key = {k:?}\ntls_ca = {:?}", self.dir.join("ca.pem"))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_listener_refuses_over_its_limit_visibly_and_times_out_silent_handshakes() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    // The plain listener is configured too: with TLS it must stay off.
    let cluster = format!("listen = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:0\"\n{}", ca.tls("a"));
    let a = config(&dir, "a", "max_connections = 2\nhandshake_timeout_ms = 2000", &cluster);
    let a = Node::start_config(tempfile::tempdir().unwrap(), a).await;
    assert_eq!(a.cluster, None, "with TLS configured the plain cluster listener is off");
    let tls = a.tls.expect("TLS listener");
    let mut watcher = link_watcher(&a).await;

    // Two connections that never start the TLS handshake fill the listener.
    let mut silent = [TcpStream::connect(tls).await.unwrap(), TcpStream::connect(tls).await.unwrap()];
    let mut third = TcpStream::connect(tls).await.unwrap();
    closed_by_peer(&mut third, "the connection over the limit").await;
    let counters = a.counters.snapshot().tls;
    assert_eq!((counters.accepted, counters.refused), (2, 1), "refused and counted, not dropped silently");

    // The silent handshakes are cut at the handshake timeout, then a real peer links.
    for s in &mut silent {
        closed_by_peer(s, "a silent TLS connection").await;
    }
    assert_eq!(a.counters.snapshot().tls.handshake_timeouts, 2);
    let b =
        config(&dir, "b", "", &format!("listen = \"\"\ntls_listen = \"\"\nneighbors = [\"{tls}\"]\n{}", ca.tls("b")));
    let _b = Node::start_config(tempfile::tempdir().unwrap(), b).await;
    assert_eq!(watcher.expect("NEW_REMOTE_CONNECTION").await.get("server"), Some("b"));
}

/// A raw TLS peer of `node` at `tls`: trusts the cluster CA in `dir`, presents `cert` (the
/// `name.pem`/`name.key` a [`Ca`] wrote) or none, and says `CONNECT`. The node's first answer, or
/// `None` when the handshake fails or the node ends the connection first.
async fn raw_tls_peer(tls: SocketAddr, dir: &Path, cert: Option<&str>) -> Option<Message> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions().unwrap();
    let builder = builder.with_root_certificates(roots);
    let client = match cert {
        Some(name) => {
            let chain = vec![CertificateDer::from_pem_file(dir.join(format!("{name}.pem"))).unwrap()];
            let key = PrivateKeyDer::from_pem_file(dir.join(format!("{name}.key"))).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
    let tcp = TcpStream::connect(tls).await.unwrap();
    // With TLS 1.3 the client finishes its handshake first: a refusal of its certificate comes
    // as an alert at its first read.
    let mut s = connector.connect(ServerName::try_from("127.0.0.1").unwrap(), tcp).await.ok()?;
    let mut hello = bytes::BytesMut::from(&nodus_wire::binary::PREFACE[..]);
    let connect = Message::new("CONNECT").param("server", "raw").param("version", 1).param("nonce", "n");
    nodus_wire::binary::encode(&connect, &mut hello, 1 << 20).unwrap();
    s.write_all(&hello).await.ok()?;
    let mut decoder = nodus_wire::binary::FrameDecoder::new(1 << 20);
    let mut buf = bytes::BytesMut::new();
    tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(Some(nodus_wire::Decoded::Message(m))) = decoder.decode(&mut buf) {
                return Some(m);
            }
            match s.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the node answers or ends the connection")
}

/// Issue 8.2: the TLS listener takes only peers with a certificate from the cluster CA; one that
/// presents none never gets an answer to its `CONNECT`, while the same peer with a certificate
/// does.
#[tokio::test(flavor = "multi_thread")]
async fn a_tls_peer_without_a_client_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    let cluster = format!("listen = \"\"\ntls_listen = \"127.0.0.1:0\"\n{}", ca.tls("a"));
    let a = Node::start_config(tempfile::tempdir().unwrap(), config(&dir, "a", "", &cluster)).await;
    let tls = a.tls.expect("TLS listener");
    assert_eq!(raw_tls_peer(tls, dir.path(), None).await, None, "a peer without a certificate was answered");
    ca.tls("raw");
    let answer = raw_tls_peer(tls, dir.path(), Some("raw")).await.expect("a peer with a certificate is answered");
    assert_eq!((answer.command.as_str(), answer.get("server")), ("ACCEPT", Some("a")), "{answer:?}");
}

#[tokio::test]
async fn a_cluster_listener_beyond_loopback_needs_a_secret_or_tls() {
    let dir = tempfile::tempdir().unwrap();
    let open = config(&dir, "a", "", "listen = \"0.0.0.0:0\"");
    let err = Daemon::bind(open).await.err().expect("an open cluster listener without a secret is refused");
    let text = format!("{err:#}");
    assert!(text.contains("secret_file") && text.contains("NODUS_SECRET") && text.contains("tls"), "{text}");

    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, "s3cret\n").unwrap();
    let with_secret = config(&dir, "b", "", &format!("listen = \"0.0.0.0:0\"\nsecret_file = {secret_file:?}"));
    assert_eq!(with_secret.cluster.secret, "s3cret");
    let daemon = Daemon::bind(with_secret).await.expect("with a secret it starts");
    assert!(daemon.cluster_addr().unwrap().ip().is_unspecified());
    drop(daemon);

    let ca = Ca::new(dir.path());
    let tls = format!("listen = \"0.0.0.0:0\"\ntls_listen = \"127.0.0.1:0\"\n{}", ca.tls("c"));
    let daemon = Daemon::bind(config(&dir, "c", "", &tls)).await.expect("with TLS it starts");
    assert_eq!(daemon.cluster_addr(), None, "with TLS the plain listener is not bound");
    assert!(daemon.tls_addr().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_neighbour_that_never_answers_connect_is_dropped_after_the_handshake_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mute = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cluster = format!("listen = \"\"\nneighbors = [\"{}\"]", mute.local_addr().unwrap());
    let node =
        Node::start_config(tempfile::tempdir().unwrap(), config(&dir, "a", "handshake_timeout_ms = 500", &cluster))
            .await;
    let (mut dialed, _) = tokio::time::timeout(WAIT, mute.accept()).await.expect("the node dials").unwrap();
    // It says CONNECT; the neighbour never answers.
    let mut first = [0u8; 8];
    dialed.read_exact(&mut first).await.unwrap();
    assert_eq!(first, nodus_wire::binary::PREFACE);
    closed_by_peer(&mut dialed, "a link that never got ACCEPT").await;
    // The router's handshake deadline and the reader's fall together; either may close the link
    // first, and the reader counts its timeout as it gives up (the neighbour's end stays open).
    let counted = async {
        while node.counters.snapshot().dial.handshake_timeouts == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(WAIT, counted).await.expect("the handshake timeout is counted");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cut_slow_consumer_leaves_every_request_of_its_callers_answered() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_config(
        tempfile::tempdir().unwrap(),
        config(&dir, "a", "max_outbound_bytes = 1048576\noutbound_stall_secs = 1", "listen = \"\""),
    )
    .await;
    // Registers, then never reads: its socket buffer fills, its writer is stuck; what its queue
    // cannot take is refused at once (ERROR code=overloaded), and once it has written nothing for
    // outbound_stall_secs it is cut. (The caller's answers, about 600 bytes each, stay far below
    // the caller's own bound.)
    let mut slow = TextConn::connect(&node).await;
    slow.register("slow").await;
    let mut caller = BinConn::connect(&node).await;
    const BURST: u64 = 400;
    let work = |id: u64| Message::new("WORK").to("slow").with_id(id).with_payload(vec![7; 32 * 1024]);
    for id in 1..=BURST {
        caller.send(&work(id)).await;
    }
    let mut answers: HashMap<u64, String> = HashMap::new();
    let kind = |m: &Message| match m.get("code") {
        Some(code) => format!("{} code={code}", m.command),
        None => m.command.clone(),
    };
    let probes = nodus_tests::probe_until_cut(
        &mut caller,
        |n| work(BURST + n),
        |m| {
            assert!(answers.insert(m.envelope.reply_to, kind(&m)).is_none(), "one answer per request: {m:?}");
        },
    )
    .await;
    let requests = BURST + probes;
    while answers.len() < requests as usize {
        let Some(m) = caller.try_recv(WAIT).await else {
            let missing: Vec<u64> = (1..=requests).filter(|id| !answers.contains_key(id)).collect();
            panic!("no answer for {missing:?}; answers {answers:?}");
        };
        assert!(answers.insert(m.envelope.reply_to, kind(&m)).is_none(), "one answer per request: {m:?}");
    }
    assert!((1..=requests).all(|id| answers.contains_key(&id)));
    let disconnected = answers.values().filter(|k| *k == "ERROR code=disconnected").count();
    assert!(disconnected > 0, "requests queued to the cut consumer fail at once: {answers:?}");
    let overloaded = answers.values().filter(|k| *k == "ERROR code=overloaded").count();
    assert!(overloaded > 0, "what the consumer's queue could not take was refused at once");
    assert_eq!(node.counters.snapshot().slow_consumer_cuts, 1);
    drop(slow);
}
