//! The front of the listener: every request is classified once (gateway or built-in route),
//! checked against the access [`Policy`] at this one place, counted, and handed to the gateway
//! or to the built-in routes (dashboard, `/api/...`, `/metrics`).
//!
//! Classification: a request with `X-Cocaine-Service`/`X-Cocaine-Event` goes to the gateway
//! whatever its path; otherwise `/`, `/metrics`, `/api/...` and `/ui/...` are built in, and any
//! other path with two segments `/APP/EVENT/...` goes to the gateway (so apps named `api` or
//! `ui` are reached with the headers only).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::access::{self, Ask, Decision, Policy, TOKEN_COOKIE, TOKEN_QUERY};
use crate::api::{self, Api, Caller, RequestId};
use crate::cocaine::{self, Target};
use crate::dashboard::{self, Feed};
use crate::gateway::{Gateway, GatewayError};
use crate::metrics::{self, Area, Metrics};
use crate::view::NodeView;

/// Where a connection comes from; the server puts it in every request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// The peer's address.
    pub addr: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
}

/// Everything the routes share.
#[derive(Clone)]
pub(crate) struct Shared {
    pub gateway: Option<Arc<Gateway>>,
    pub view: Option<Arc<dyn NodeView>>,
    pub api: Option<Api>,
    pub policy: Arc<Policy>,
    pub metrics: Arc<Metrics>,
    pub feed: Feed,
    pub stop: CancellationToken,
}

/// What a request is for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Class {
    Gateway(Target),
    BadRoute(String),
    Builtin(Area),
}

fn classify(req: &Request) -> Class {
    let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let headers = req.headers();
    let service = headers.get(cocaine::SERVICE_HEADER).map(HeaderValue::as_bytes);
    let event = headers.get(cocaine::EVENT_HEADER).map(HeaderValue::as_bytes);
    match cocaine::route_by_headers(service, event, path_and_query) {
        Ok(Some(target)) => return Class::Gateway(target),
        Ok(None) => {}
        Err(e) => return Class::BadRoute(e.to_string()),
    }
    let path = req.uri().path();
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    match first {
        "api" => return Class::Builtin(Area::Api),
        "ui" => return Class::Builtin(Area::Dashboard),
        _ => {}
    }
    match cocaine::route_by_path(path_and_query) {
        Some(target) => Class::Gateway(target),
        None if path == "/metrics" => Class::Builtin(Area::Metrics),
        None => Class::Builtin(Area::Dashboard),
    }
}

/// The token a request presents, and whether it came in the query string.
fn presented(req: &Request, builtin: bool) -> (Option<Vec<u8>>, bool) {
    let headers = req.headers();
    if let Some(t) = headers.get(header::AUTHORIZATION).and_then(|v| access::bearer(v.as_bytes())) {
        return (Some(t.to_vec()), false);
    }
    if let Some(t) = headers.get(header::COOKIE).and_then(|v| access::cookie(v.as_bytes(), TOKEN_COOKIE)) {
        return (Some(t.to_vec()), false);
    }
    if builtin {
        if let Some(t) = req.uri().query().and_then(|q| access::query_param(q, TOKEN_QUERY)) {
            return (Some(t.as_bytes().to_vec()), true);
        }
    }
    (None, false)
}

fn unauthorized(message: &str) -> Response {
    let mut resp = dashboard::json_error(StatusCode::UNAUTHORIZED, "unauthorized", message);
    resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"nodus\""));
    resp
}

/// Header carrying a request's id, in and out.
pub const REQUEST_ID: &str = "x-request-id";

/// The id a request came with (printable ASCII, at most 64 bytes), or a new one.
fn request_id(req: &Request) -> String {
    if let Some(v) = req.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()) {
        if !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()) {
            return v.to_string();
        }
    }
    use std::hash::{BuildHasher, Hasher};
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    format!("{:016x}", h.finish())
}

async fn front(State(s): State<Arc<Shared>>, mut req: Request, next: Next) -> Response {
    let id = request_id(&req);
    let span = tracing::debug_span!("http", request_id = %id, method = %req.method(), path = %req.uri().path());
    req.extensions_mut().insert(RequestId(id.clone()));
    let mut resp = async {
        let resp = admit(s, req, next).await;
        tracing::debug!(status = resp.status().as_u16(), "HTTP request answered");
        resp
    }
    .instrument(span)
    .await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

async fn admit(s: Arc<Shared>, mut req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<Peer>()
        .copied()
        // A request that did not come through the server is treated as remote.
        .unwrap_or(Peer { addr: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)), tls: false });
    let class = classify(&req);
    let (token, from_query) = presented(&req, matches!(class, Class::Builtin(_)));
    let gateway_target = match &class {
        Class::Gateway(t) => Some((t.app.as_str(), t.event.as_str())),
        _ => None,
    };
    let decision = s.policy.decide(Ask { peer: peer.addr, gateway: gateway_target, token: token.as_deref() });
    let area = match &class {
        Class::Builtin(area) => *area,
        _ => Area::Gateway,
    };
    if let Decision::Refused(why) = decision {
        tracing::debug!(peer = %peer.addr, ?why, "HTTP request refused");
        s.metrics.request(area, StatusCode::UNAUTHORIZED.as_u16());
        return unauthorized(why.message());
    }
    match class {
        Class::Gateway(target) => match &s.gateway {
            Some(gw) => gw.clone().serve(target, peer.addr, decision == Decision::Token, req).await,
            None => {
                s.metrics.request(Area::Gateway, StatusCode::NOT_FOUND.as_u16());
                dashboard::json_error(StatusCode::NOT_FOUND, "no_gateway", "this listener has no gateway to apps")
            }
        },
        Class::BadRoute(message) => {
            s.metrics.request(Area::Gateway, StatusCode::BAD_REQUEST.as_u16());
            GatewayError::BadRoute(message).to_response(0)
        }
        Class::Builtin(area) => {
            req.extensions_mut().insert(if decision == Decision::Token { Caller::Owner } else { Caller::Anonymous });
            let set_cookie =
                from_query && decision == Decision::Token && req.method() == Method::GET && req.uri().path() == "/";
            let mut resp = next.run(req).await;
            if set_cookie {
                if let Some(t) = token.as_deref().and_then(|t| std::str::from_utf8(t).ok()) {
                    let secure = if peer.tls { "; Secure" } else { "" };
                    let cookie = format!("{TOKEN_COOKIE}={t}; Path=/; HttpOnly; SameSite=Strict{secure}");
                    if let Ok(v) = HeaderValue::from_str(&cookie) {
                        resp.headers_mut().insert(header::SET_COOKIE, v);
                    }
                }
            }
            s.metrics.request(area, resp.status().as_u16());
            resp
        }
    }
}

async fn index() -> Response {
    dashboard::asset("text/html; charset=utf-8", dashboard::INDEX_HTML)
}

async fn app_js() -> Response {
    dashboard::asset("text/javascript; charset=utf-8", dashboard::APP_JS)
}

async fn style_css() -> Response {
    dashboard::asset("text/css; charset=utf-8", dashboard::STYLE_CSS)
}

fn no_view() -> Response {
    dashboard::json_error(StatusCode::SERVICE_UNAVAILABLE, "no_state", "this listener has no node state to show")
}

async fn snapshot(State(s): State<Arc<Shared>>) -> Response {
    match &s.view {
        Some(view) => axum::Json(view.snapshot().await).into_response(),
        None => no_view(),
    }
}

async fn events(State(s): State<Arc<Shared>>) -> Response {
    match &s.view {
        Some(view) => dashboard::events(view.clone(), s.feed, s.stop.clone()).into_response(),
        None => no_view(),
    }
}

async fn metrics_text(State(s): State<Arc<Shared>>) -> Response {
    let snapshot = match &s.view {
        Some(view) => Some(view.snapshot().await),
        None => None,
    };
    let mut resp = s.metrics.render(snapshot.as_ref()).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(metrics::CONTENT_TYPE));
    resp
}

async fn not_found() -> Response {
    dashboard::json_error(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route: the dashboard is at /, metrics at /metrics, apps at /APP/EVENT/...",
    )
}

/// The whole listener as one axum router.
pub(crate) fn router(shared: Shared) -> Router {
    // One Arc per request instead of a clone of every field.
    let shared = Arc::new(shared);
    Router::new()
        .route("/", get(index))
        .route("/ui/app.js", get(app_js))
        .route("/ui/style.css", get(style_css))
        .route("/metrics", get(metrics_text))
        .route("/api/snapshot", get(snapshot))
        .route("/api/events", get(events))
        .route("/api/openapi.json", get(api::openapi))
        .route("/api/node", get(api::node))
        .route("/api/cluster", get(api::cluster))
        .route("/api/cluster/services", get(api::cluster_services))
        .route("/api/services", get(api::services))
        .route("/api/call", post(api::call))
        .route("/api/apps", get(api::apps))
        .route("/api/apps/{name}", get(api::app).put(api::deploy).delete(api::remove_app))
        .route("/api/apps/{name}/start", post(api::start_app))
        .route("/api/apps/{name}/stop", post(api::stop_app))
        .route("/api/apps/{name}/restart", post(api::restart_app))
        .route("/api/apps/{name}/scale", post(api::scale_app))
        .route("/api/apps/{name}/crashlog", get(api::crashlog))
        .route("/api/tasks", get(api::tasks).post(api::submit_task))
        .route("/api/tasks/counts", get(api::task_counts))
        .route("/api/tasks/stats", get(api::task_stats))
        .route("/api/tasks/{id}", get(api::task))
        .route("/api/tasks/{id}/abort", post(api::abort_task))
        .route("/api/control/tree", get(api::tree))
        .route("/api/control/{node}/{id}/monitor", get(api::monitor))
        .route("/api/control/{node}/{id}/kill", post(api::kill))
        .route("/api/flags", get(api::flags))
        .route("/api/flags/{unit}/{section}/{name}", put(api::raise_flag).delete(api::lower_flag))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(shared.clone(), front))
        .with_state(shared)
}

/// A request with its peer, for tests that call the router directly.
#[cfg(test)]
pub(crate) fn request_from(peer: &str, builder: axum::http::request::Builder, body: axum::body::Body) -> Request {
    let mut req = builder.body(body).expect("request");
    req.extensions_mut().insert(Peer { addr: peer.parse().expect("peer address"), tls: false });
    req
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::{AppRow, NodeRow, Notice, NoticeKind, Snapshot, WorkerRow};
    use http_body_util::BodyExt;
    use tokio::sync::broadcast;
    use tower::ServiceExt;

    /// A fixed node state for rendering tests; notices are sent by the test.
    struct FixedView {
        snapshot: std::sync::Mutex<Snapshot>,
        notices: broadcast::Sender<Notice>,
    }

    impl NodeView for FixedView {
        fn snapshot(&self) -> crate::view::BoxFuture<'_, Snapshot> {
            let s = self.snapshot.lock().unwrap().clone();
            Box::pin(async move { s })
        }

        fn subscribe(&self) -> broadcast::Receiver<Notice> {
            self.notices.subscribe()
        }
    }

    fn fixed() -> Arc<FixedView> {
        let mut s = Snapshot::default();
        s.node.name = "alpha".into();
        s.cluster.nodes = vec![
            NodeRow { name: "alpha".into(), address: "127.0.0.1:4041".into(), live: true, is_self: true },
            NodeRow { name: "beta".into(), address: "127.0.0.1:4141".into(), live: false, is_self: false },
        ];
        s.apps = vec![AppRow {
            name: "echo".into(),
            node: "alpha".into(),
            status: "running".into(),
            workers: vec![WorkerRow { uuid: "u1".into(), pid: 7, state: "active".into(), load: 1 }],
            ..Default::default()
        }];
        Arc::new(FixedView { snapshot: std::sync::Mutex::new(s), notices: broadcast::channel(16).0 })
    }

    fn shared(view: Option<Arc<dyn NodeView>>) -> Shared {
        Shared {
            gateway: None,
            view,
            api: None,
            policy: Arc::new(Policy::new(None, vec![])),
            metrics: Arc::new(Metrics::new()),
            feed: Feed {
                refresh: std::time::Duration::from_secs(3600),
                min_interval: std::time::Duration::from_millis(1),
            },
            stop: CancellationToken::new(),
        }
    }

    async fn call(router: &Router, uri: &str) -> Response {
        let req = request_from("127.0.0.1:9", axum::http::Request::get(uri), axum::body::Body::empty());
        router.clone().oneshot(req).await.unwrap()
    }

    async fn text(resp: Response) -> String {
        String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn renders_the_page_the_snapshot_and_the_metrics() {
        let view = fixed();
        let router = router(shared(Some(view.clone())));
        let page = call(&router, "/").await;
        assert_eq!(page.status(), 200);
        assert_eq!(page.headers()[header::CONTENT_TYPE], "text/html; charset=utf-8");
        assert!(text(page).await.contains("/ui/app.js"));
        assert_eq!(call(&router, "/ui/app.js").await.headers()[header::CONTENT_TYPE], "text/javascript; charset=utf-8");
        assert_eq!(call(&router, "/ui/style.css").await.status(), 200);
        let snap = call(&router, "/api/snapshot").await;
        assert_eq!(snap.headers()[header::CONTENT_TYPE], "application/json");
        let parsed: Snapshot = serde_json::from_str(&text(snap).await).unwrap();
        assert_eq!(parsed, *view.snapshot.lock().unwrap());
        let metrics = text(call(&router, "/metrics").await).await;
        assert!(metrics.contains("nodus_cluster_nodes{state=\"down\"} 1"), "{metrics}");
        assert!(metrics.contains("nodus_app_workers{app=\"echo\",state=\"active\"} 1"), "{metrics}");
        // The page and the snapshot were counted.
        assert!(metrics.contains("nodus_http_requests_total{area=\"dashboard\",code=\"200\"}"), "{metrics}");
        let missing = call(&router, "/api/nothing").await;
        assert_eq!(missing.status(), 404);
    }

    #[tokio::test]
    async fn without_node_state_the_api_says_so() {
        let router = router(shared(None));
        let r = call(&router, "/api/snapshot").await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(text(r).await.contains("no_state"));
        assert_eq!(call(&router, "/api/events").await.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(call(&router, "/metrics").await.status(), 200);
    }

    #[tokio::test]
    async fn remote_peers_need_the_token_even_for_the_page() {
        let router = router(shared(Some(fixed())));
        let req = request_from("10.0.0.1:9", axum::http::Request::get("/"), axum::body::Body::empty());
        let r = router.clone().oneshot(req).await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(text(r).await.contains("no HTTP token configured"));
    }

    /// Reads server-sent events until one named `name`; its data.
    async fn next_event(body: &mut axum::body::Body, buf: &mut String, name: &str) -> String {
        let wait = async {
            loop {
                while let Some(end) = buf.find("\n\n") {
                    let block: String = buf.drain(..end + 2).collect();
                    let event = block.lines().find_map(|l| l.strip_prefix("event: ").or(l.strip_prefix("event:")));
                    if event == Some(name) {
                        let data: Vec<&str> = block
                            .lines()
                            .filter_map(|l| l.strip_prefix("data: ").or(l.strip_prefix("data:")))
                            .collect();
                        return data.join("\n");
                    }
                }
                let frame = body.frame().await.expect("stream open").expect("frame");
                if let Ok(data) = frame.into_data() {
                    buf.push_str(std::str::from_utf8(&data).unwrap());
                }
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), wait).await.expect("an event in time")
    }

    #[tokio::test]
    async fn the_live_feed_pushes_a_snapshot_then_changes() {
        let view = fixed();
        let s = shared(Some(view.clone()));
        let stop = s.stop.clone();
        let router = router(s);
        let resp = call(&router, "/api/events").await;
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
        let mut body = resp.into_body();
        let mut buf = String::new();
        let first: Snapshot = serde_json::from_str(&next_event(&mut body, &mut buf, "snapshot").await).unwrap();
        assert_eq!(first.cluster.nodes.len(), 2);
        // A node goes down: the feed says so and sends the new state, without polling.
        view.snapshot.lock().unwrap().cluster.nodes[0].live = false;
        view.notices.send(Notice { kind: NoticeKind::Node, text: "alpha down".into() }).unwrap();
        let notice: Notice = serde_json::from_str(&next_event(&mut body, &mut buf, "notice").await).unwrap();
        assert_eq!(notice.text, "alpha down");
        let next: Snapshot = serde_json::from_str(&next_event(&mut body, &mut buf, "snapshot").await).unwrap();
        assert!(!next.cluster.nodes[0].live);
        // Shutdown ends the feed.
        stop.cancel();
        let end = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while let Some(f) = body.frame().await {
                f.unwrap();
            }
        });
        end.await.expect("the feed ended");
    }

    fn class(uri: &str, headers: &[(&str, &str)]) -> Class {
        let mut b = axum::http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        classify(&b.body(axum::body::Body::empty()).unwrap())
    }

    #[test]
    fn classifies_requests_once() {
        let t = |app: &str, event: &str, uri: &str| {
            Class::Gateway(Target { app: app.into(), event: event.into(), uri: uri.into() })
        };
        assert_eq!(class("/", &[]), Class::Builtin(Area::Dashboard));
        assert_eq!(class("/metrics", &[]), Class::Builtin(Area::Metrics));
        assert_eq!(class("/api/events", &[]), Class::Builtin(Area::Api));
        assert_eq!(class("/api/x/y", &[]), Class::Builtin(Area::Api));
        assert_eq!(class("/ui/app.js", &[]), Class::Builtin(Area::Dashboard));
        assert_eq!(class("/favicon.ico", &[]), Class::Builtin(Area::Dashboard));
        assert_eq!(class("/echo/http/a?b", &[]), t("echo", "http", "/a?b"));
        let h = [("X-Cocaine-Service", "api"), ("X-Cocaine-Event", "list")];
        assert_eq!(class("/api/x?y", &h), t("api", "list", "/api/x?y"));
        assert!(matches!(class("/x", &[("X-Cocaine-Service", "a")]), Class::BadRoute(_)));
    }
}
