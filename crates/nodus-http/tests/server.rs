//! The listener itself over real sockets: TLS (rustls with ring) and the connection limit.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use nodus_http::{tls_acceptor, Http, HttpConfig, Metrics, ServeOptions, TlsError};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A listener with no gateway and no node state: `/metrics` still answers.
async fn listener(
    config: HttpConfig,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> (std::net::SocketAddr, Arc<Metrics>, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let http = Http::new(config, Default::default());
    let metrics = http.metrics().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(http.serve(l, tls, async move {
        let _ = stopped.await;
    }));
    (addr, metrics, stop, task)
}

fn counter(metrics: &Metrics, name: &str) -> f64 {
    let text = metrics.render(None);
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.rsplit_once(' ').filter(|(n, _)| *n == name).map(|(_, v)| v.parse().unwrap()))
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_over_tls_and_refuses_plain_text_on_a_tls_port() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("http.pem"), dir.path().join("http.key"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let acceptor = tls_acceptor(&cert, &key).unwrap();
    let (addr, metrics, stop, task) = listener(HttpConfig::default(), Some(acceptor)).await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls =
        within("TLS handshake", connector.connect(ServerName::try_from("localhost").unwrap(), tcp)).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get("/metrics").header("host", "localhost").body(full(Bytes::new())).unwrap();
    let resp = within("response", sender.send_request(req)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = within("body", resp.into_body().collect()).await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("nodus_http_connections_total"));

    // Plain HTTP on the TLS port gets no answer, and is counted.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let _ = within("the server closes", plain.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
    within("refusal counted", async {
        while counter(&metrics, r#"nodus_http_connections_refused_total{reason="tls"}"#) < 1.0 {
            tokio::task::yield_now().await;
        }
    })
    .await;

    stop.send(()).unwrap();
    within("shutdown", task).await.unwrap();

    // Bad set-ups fail with what to fix.
    let missing = tls_acceptor(&dir.path().join("nope.pem"), &key).err().expect("a missing file fails");
    assert!(matches!(missing, TlsError::Pem { .. }), "{missing}");
    let other = rcgen::generate_simple_self_signed(vec!["x".to_string()]).unwrap();
    let other_key = dir.path().join("other.key");
    std::fs::write(&other_key, other.signing_key.serialize_pem()).unwrap();
    let mismatch = tls_acceptor(&cert, &other_key).err().expect("a key of another certificate fails");
    assert!(matches!(mismatch, TlsError::Config(_)), "{mismatch}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_closed_at_once() {
    let config = HttpConfig {
        serve: ServeOptions { max_connections: 1, shutdown_grace: Duration::from_secs(1), ..ServeOptions::default() },
        ..HttpConfig::default()
    };
    let (addr, metrics, stop, task) = listener(config, None).await;
    // The first connection holds the only slot (keep-alive).
    let mut first = Conn::open(addr).await;
    let req = hyper::Request::get("/metrics").header("host", "x").body(full(Bytes::new())).unwrap();
    assert_eq!(collect(first.send(req).await).await.status, 200);
    // The second is accepted by the kernel, then closed without an answer.
    let mut second = TcpStream::connect(addr).await.unwrap();
    let _ = second.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut buf = Vec::new();
    let _ = within("the server closes", second.read_to_end(&mut buf)).await;
    assert!(buf.is_empty(), "{}", String::from_utf8_lossy(&buf));
    assert_eq!(counter(&metrics, r#"nodus_http_connections_refused_total{reason="limit"}"#), 1.0);
    // The first one still works, and says one connection is open.
    let req = hyper::Request::get("/metrics").header("host", "x").body(full(Bytes::new())).unwrap();
    let text = collect(first.send(req).await).await.text();
    assert!(text.contains("nodus_http_open_connections 1\n"), "{text}");
    stop.send(()).unwrap();
    // Shutdown closes the idle keep-alive connection and ends.
    within("shutdown", task).await.unwrap();
}
