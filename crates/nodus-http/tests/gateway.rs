//! The gateway over real sockets: an HTTP client → the listener → the node's locator → the
//! engine → a real worker process (the Rust example worker), and back.
//!
//! Tests wait on answers (with a timeout), never on sleeps.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use hyper::Request;
use nodus_engine::client::AppClient;
use nodus_engine::profile::Profile;
use nodus_engine::{Directory, Engine, EngineConfig, Locator, LocatorConfig};
use nodus_http::cocaine::{RequestHead, UPLOAD_CHUNK_BYTES};
use nodus_http::{GatewayConfig, HttpConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config() -> HttpConfig {
    HttpConfig {
        gateway: GatewayConfig { max_body_bytes: 16 << 20, ..GatewayConfig::default() },
        ..HttpConfig::default()
    }
}

/// Runs a test body once with the gateway reaching apps on the local engine and once through
/// the locator's TCP service.
macro_rules! both_paths {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn via_engine() {
                super::$name(Via::Engine).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn via_locator() {
                super::$name(Via::Locator).await
            }
        }
    )*};
}

both_paths!(
    round_trip_with_a_rust_worker,
    streams_the_response_as_the_worker_writes_it,
    large_uploads_reach_the_worker_in_bounded_chunks,
    failures_map_to_http_errors,
    no_head_in_time_is_a_gateway_timeout,
    a_full_queue_is_service_unavailable_with_retry_after,
    an_upload_over_the_limit_after_the_head_cuts_the_response,
);

async fn web_node(config: HttpConfig, via: Via) -> Node {
    let roomy =
        Profile { pool_limit: 1, concurrency: 16, terminate_timeout: Duration::from_secs(1), ..Profile::default() };
    Node::start(config, via, |dir| vec![rust_app(dir, "web", roomy)]).await
}

async fn round_trip_with_a_rust_worker(via: Via) {
    let node = web_node(config(), via).await;
    let r = request(node.http, "POST", "/web/http/some/path?x=1", &[("content-type", "text/plain")], "hello").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.headers["x-worker"], "rust");
    assert_eq!(r.headers["content-type"], "application/json");
    let j = r.json();
    assert_eq!(j["method"], "POST");
    assert_eq!(j["uri"], "/some/path?x=1");
    assert_eq!(j["version"], "1.1");
    assert_eq!(j["body_len"], 5);
    assert_eq!(j["body_fnv"], fnv1a(b"hello"));
    assert_eq!(j["chunks"], 1, "a small body travels in the request chunk");
    let headers: Vec<(String, String)> = j["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_str().unwrap().to_string()))
        .collect();
    assert!(headers.contains(&("Content-Type".into(), "text/plain".into())), "{headers:?}");
    assert!(headers.contains(&("X-Real-IP".into(), "127.0.0.1".into())), "{headers:?}");

    // The headers choose the app and event; the worker gets the original URI.
    let h = [("X-Cocaine-Service", "web"), ("X-Cocaine-Event", "http")];
    let r = request(node.http, "GET", "/any/where?q=2", &h, Bytes::new()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["uri"], "/any/where?q=2");
    assert_eq!(r.json()["method"], "GET");

    // Keep-alive: several requests on one connection.
    let mut conn = Conn::open(node.http).await;
    for i in 0..5 {
        let req = Request::get(format!("/web/http/{i}")).header("host", "x").body(full(Bytes::new())).unwrap();
        let r = collect(conn.send(req).await).await;
        assert_eq!(r.json()["uri"], format!("/{i}"));
    }
    node.shutdown().await;
}

async fn streams_the_response_as_the_worker_writes_it(via: Via) {
    let node = web_node(config(), via).await;
    let mut conn = Conn::open(node.http).await;
    let resp = conn.send(Request::get("/web/stream?id=s1").header("host", "x").body(full(Bytes::new())).unwrap()).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["transfer-encoding"], "chunked");
    let mut body = resp.into_body();
    let first = within("first chunk", body.frame()).await.unwrap().unwrap().into_data().unwrap();
    // The worker is still waiting: the first chunk came through before the rest existed.
    assert_eq!(first, "chunk-0\n");
    let released = get(node.http, "/web/release?id=s1").await;
    assert_eq!(released.status, 200);
    let rest = within("rest of the body", body.collect()).await.unwrap().to_bytes();
    assert_eq!(rest, "chunk-1\nchunk-2\nchunk-3\nchunk-4\n");
    node.shutdown().await;
}

async fn large_uploads_reach_the_worker_in_bounded_chunks(via: Via) {
    let node = web_node(config(), via).await;
    // 3 MiB and a bit, sent chunked in uneven pieces as the client produces them.
    let data: Vec<u8> = (0..3 * 1024 * 1024 + 4321).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let pieces: Vec<Bytes> = data.chunks(70_001).map(Bytes::copy_from_slice).collect();
    tokio::spawn(async move {
        for p in pieces {
            if tx.send(p).await.is_err() {
                return;
            }
        }
    });
    let mut conn = Conn::open(node.http).await;
    let req = Request::post("/web/http/upload").header("host", "x").body(streamed(rx)).unwrap();
    let r = collect(conn.send(req).await).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["body_len"], data.len());
    assert_eq!(j["body_fnv"], fnv1a(&data));
    assert_eq!(j["head_body_len"], 0, "a large body follows the request chunk");
    let largest = j["largest_later_chunk"].as_u64().unwrap() as usize;
    assert!(largest <= UPLOAD_CHUNK_BYTES && largest > 0, "largest chunk {largest}");
    assert!(j["chunks"].as_u64().unwrap() > (data.len() / UPLOAD_CHUNK_BYTES) as u64, "{j}");

    // With a Content-Length, in one go.
    let r = request(node.http, "PUT", "/web/http", &[], data.clone()).await;
    assert_eq!(r.json()["body_fnv"], fnv1a(&data));
    // Exactly one chunk's worth travels in the request chunk.
    let one = vec![7u8; UPLOAD_CHUNK_BYTES];
    let r = request(node.http, "POST", "/web/http", &[], one.clone()).await;
    assert_eq!((r.json()["chunks"].as_u64(), r.json()["head_body_len"].as_u64()), (Some(1), Some(one.len() as u64)));
    node.shutdown().await;
}

fn assert_error(r: &Reply, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.json()["error"], code, "{}", r.text());
    assert!(!r.json()["message"].as_str().unwrap().is_empty());
}

async fn failures_map_to_http_errors(via: Via) {
    let node = web_node(config(), via).await;
    assert_error(&get(node.http, "/nosuch/http").await, 404, "unknown_app");
    assert_error(&get(node.http, "/web/nosuch").await, 404, "unknown_event");
    assert_error(&get(node.http, "/web/fail").await, 500, "app_error");
    assert_error(&get(node.http, "/web/badhead").await, 502, "bad_head");
    assert_error(&get(node.http, "/web/crash").await, 502, "worker_failed");
    // The app recovers: a new worker serves the next request.
    assert_eq!(get(node.http, "/web/http").await.status, 200);
    assert_error(
        &request(node.http, "GET", "/", &[("X-Cocaine-Service", "web")], Bytes::new()).await,
        400,
        "bad_route",
    );
    assert_error(&get(node.http, "/nothing").await, 404, "not_found");

    // A declared body over the limit is refused before anything is read or invoked.
    let mut raw = tokio::net::TcpStream::connect(node.http).await.unwrap();
    raw.write_all(b"POST /web/http HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n").await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = within("413", raw.read(&mut answer)).await.unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("body_too_large"), "{answer}");
    node.shutdown().await;
}

async fn an_upload_over_the_limit_after_the_head_cuts_the_response(via: Via) {
    let mut c = config();
    c.gateway.max_body_bytes = 1 << 20;
    c.gateway.idle_timeout = Duration::from_secs(60);
    let node = web_node(c, via).await;
    // `drain` answers its head at once, then reads the body to its end. The client sends more
    // than the limit (no length declared) and stays connected.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    // More than one upload chunk, so the worker is invoked before the body ends.
    tx.send(Bytes::from(vec![7u8; UPLOAD_CHUNK_BYTES + 1000])).await.unwrap();
    let mut conn = Conn::open(node.http).await;
    let resp = conn.send(Request::post("/web/drain").header("host", "x").body(streamed(rx)).unwrap()).await;
    assert_eq!(resp.status(), 200, "the head goes out before the body is whole");
    for _ in 0..2 {
        // Once past the limit the gateway cuts the request, and the client stops sending.
        let _ = tx.send(Bytes::from(vec![7u8; UPLOAD_CHUNK_BYTES])).await;
    }
    // The answer is cut at once (not after the idle timeout), never completed as if whole.
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("the response was cut when the upload passed the limit, not left to stall");
    assert!(body.is_err(), "an answer to a cut upload must not look complete: {:?}", body.map(|b| b.to_bytes()));
    drop(tx);
    node.shutdown().await;
}

async fn no_head_in_time_is_a_gateway_timeout(via: Via) {
    let mut c = config();
    c.gateway.head_timeout = Duration::from_millis(700);
    let node = web_node(c, via).await;
    // A warm worker first, so the timeout measures the app, not a cold start.
    assert_eq!(get(node.http, "/web/http").await.status, 200);
    let r = get(node.http, "/web/silent").await;
    assert_error(&r, 504, "timeout");
    node.shutdown().await;
}

async fn a_full_queue_is_service_unavailable_with_retry_after(via: Via) {
    // One worker, one request at a time, one waiting.
    let tight = Profile { pool_limit: 1, concurrency: 1, queue_limit: 1, ..Profile::default() };
    let node = Node::start(config(), via, |dir| vec![rust_app(dir, "tight", tight)]).await;
    // A keeps the only worker busy for as long as its upload lasts.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(Bytes::from(vec![1u8; UPLOAD_CHUNK_BYTES + 1000])).await.unwrap();
    let mut a_conn = Conn::open(node.http).await;
    let a = a_conn.send(Request::post("/tight/drain").header("host", "x").body(streamed(rx)).unwrap()).await;
    assert_eq!(a.status(), 200, "the worker has A");
    // B waits in the queue, C finds it full (or the other way round): the first answer is
    // the refusal, while A still holds the worker.
    let addr = node.http;
    let mut b = tokio::spawn(async move { get(addr, "/tight/http").await });
    let mut c = tokio::spawn(async move { get(addr, "/tight/http").await });
    let (refused, ok) = within("one refusal", async {
        tokio::select! {
            r = &mut b => (r.unwrap(), c),
            r = &mut c => (r.unwrap(), b),
        }
    })
    .await;
    assert_error(&refused, 503, "queue_full");
    assert_eq!(refused.headers["retry-after"], "1");
    drop(tx);
    let a = collect(a).await;
    assert_eq!(a.text(), format!("drained {}", UPLOAD_CHUNK_BYTES + 1000));
    let ok = within("the queued request", ok).await.unwrap();
    assert_eq!(ok.status, 200, "{}", ok.text());
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_gateway_requests() {
    let node = web_node(config(), Via::Engine).await;
    let value = |text: &str, name: &str| -> f64 {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.rsplit_once(' ').filter(|(n, _)| *n == name).map(|(_, v)| v.parse().unwrap()))
            .unwrap_or(0.0)
    };
    let ok = r#"nodus_gateway_requests_total{app="web",code="200"}"#;
    let missing = r#"nodus_gateway_requests_total{app="",code="404"}"#;
    let before = get(node.http, "/metrics").await;
    assert_eq!(before.status, 200);
    assert!(before.headers["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    let before = before.text();
    for _ in 0..3 {
        assert_eq!(get(node.http, "/web/http").await.status, 200);
    }
    assert_eq!(get(node.http, "/ghost/x").await.status, 404);
    let after = get(node.http, "/metrics").await.text();
    assert_eq!(value(&after, ok) - value(&before, ok), 3.0, "{after}");
    assert_eq!(value(&after, missing) - value(&before, missing), 1.0);
    assert!(value(&after, r#"nodus_gateway_invoke_latency_seconds_count{app="web"}"#) >= 3.0);
    assert!(value(&after, "nodus_gateway_response_bytes_total") > value(&before, "nodus_gateway_response_bytes_total"));
    assert!(value(&after, "nodus_http_connections_total") >= 6.0);
    assert!(after.ends_with("# EOF\n"));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_required_unless_the_route_is_public() {
    let token = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let config = HttpConfig {
        token: Some(token.into()),
        public: vec!["web/noop".parse().unwrap()],
        // Every test peer is on loopback: make loopback need the token as a remote peer does.
        token_on_loopback: true,
        ..config()
    };
    let node = web_node(config, Via::Engine).await;
    let bearer = format!("Bearer {token}");
    let r = get(node.http, "/web/http").await;
    assert_error(&r, 401, "unauthorized");
    assert_eq!(r.headers["www-authenticate"], "Bearer realm=\"nodus\"");
    assert_error(
        &request(node.http, "GET", "/web/http", &[("authorization", "Bearer nope")], Bytes::new()).await,
        401,
        "unauthorized",
    );
    assert_error(&get(node.http, "/metrics").await, 401, "unauthorized");
    assert_error(&get(node.http, "/").await, 401, "unauthorized");
    // Public: no token needed.
    let r = get(node.http, "/web/noop").await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "ok"));
    // With the token, and the app never sees it.
    let r =
        request(node.http, "GET", "/web/http", &[("authorization", &bearer), ("cookie", "a=1")], Bytes::new()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.json()["headers"].to_string();
    assert!(!seen.contains(token) && !seen.contains("Authorization"), "{seen}");
    assert_eq!(request(node.http, "GET", "/metrics", &[("authorization", &bearer)], Bytes::new()).await.status, 200);
    // A browser: the query token opens the page and sets the cookie, the cookie opens the rest.
    let page = get(node.http, &format!("/?access_token={token}")).await;
    assert_eq!(page.status, 200);
    let cookie = page.headers["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    let pair = cookie.split(';').next().unwrap();
    assert_eq!(request(node.http, "GET", "/metrics", &[("cookie", pair)], Bytes::new()).await.status, 200);
    // The query token is not accepted on gateway routes.
    assert_eq!(get(node.http, &format!("/web/http?access_token={token}")).await.status, 401);
    node.shutdown().await;
}

/// The cluster's directory of apps on other nodes, as a fixed map.
struct Elsewhere(Vec<(String, (String, u16))>);

impl Directory for Elsewhere {
    fn lookup(&self, app: &str) -> Vec<(String, u16)> {
        self.0.iter().filter(|(a, _)| a == app).map(|(_, e)| e.clone()).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_on_other_nodes_are_reached_through_the_locator() {
    // Node B runs the app; node A runs none and only knows B's endpoint from its directory.
    let b = web_node(config(), Via::Engine).await;
    let (host, port) = {
        let probe = AppClient::new(b.locator.to_string());
        let e = within("resolve on B", probe.resolve("web")).await.unwrap();
        e.endpoints[0].clone()
    };
    let dir = tempfile::tempdir().unwrap();
    let a_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a_locator = a_listener.local_addr().unwrap();
    let mut ec = EngineConfig::new(dir.path().join("run"));
    ec.locator = a_locator.to_string();
    let a_engine = Engine::new(ec);
    let loc = Locator::from_listener(a_engine.clone(), LocatorConfig::default(), a_listener).unwrap();
    loc.handle().set_directory(Arc::new(Elsewhere(vec![("web".into(), (host, port))])));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(loc.run(async move {
        let _ = stopped.await;
    }));
    let http_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = http_listener.local_addr().unwrap();
    // A's own engine does not have the app: the gateway falls back to A's locator.
    let gw =
        nodus_http::Http::new(config(), Default::default()).with_gateway(a_locator.to_string(), Some(a_engine.clone()));
    let (stop_http, stopped_http) = tokio::sync::oneshot::channel::<()>();
    let http_server = tokio::spawn(gw.serve(http_listener, None, async move {
        let _ = stopped_http.await;
    }));

    let r = request(http, "POST", "/web/http/far", &[], "over there").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["body_fnv"], fnv1a(b"over there"));
    assert_error(&get(http, "/nowhere/http").await, 404, "unknown_app");

    stop_http.send(()).unwrap();
    within("A's http", http_server).await.unwrap();
    stop.send(()).unwrap();
    within("A's locator", server).await.unwrap();
    a_engine.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_requests_in_flight_finish() {
    let mut node = web_node(config(), Via::Engine).await;
    let mut conn = Conn::open(node.http).await;
    let resp = conn.send(Request::get("/web/stream?id=g1").header("host", "x").body(full(Bytes::new())).unwrap()).await;
    let mut body = resp.into_body();
    let first = within("first chunk", body.frame()).await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "chunk-0\n");
    // Stop the HTTP listener only; the stream is still open.
    let stop = node.take_http_stop();
    stop.0.send(()).unwrap();
    // Release the stream straight through the locator; the open response completes.
    let release = RequestHead {
        method: "GET".into(),
        uri: "/?id=g1".into(),
        version: "1.1".into(),
        headers: vec![],
        body: Bytes::new(),
    };
    let client = AppClient::new(node.locator.to_string());
    within("release", client.service("web").call("release", [release.encode()])).await.unwrap();
    let rest = within("rest of the body", body.collect()).await.unwrap().to_bytes();
    assert_eq!(rest, "chunk-1\nchunk-2\nchunk-3\nchunk-4\n");
    within("http server ended", stop.1).await.unwrap();
    node.shutdown().await;
}
