//! The gateway to apps: one HTTP request becomes one invocation of an app event, through the
//! node's locator (so apps on other nodes are reached too), in Cocaine's HTTP protocol
//! ([`crate::cocaine`]).
//!
//! A request's life: the body is read up to [`UPLOAD_CHUNK_BYTES`] (the whole body when it is
//! that small) → `enqueue(event)` on the app's service → the request chunk `[method, uri,
//! version, headers, body]` → the rest of a large body in chunks of at most
//! [`UPLOAD_CHUNK_BYTES`], then close → the worker's first chunk is the head `[code, headers]` →
//! every later chunk is streamed to the client as it arrives (chunked transfer unless the app
//! set `Content-Length`).
//!
//! The worker sees the request's end-to-end headers in canonical spelling (`Content-Type`), minus
//! the node's token (the `Authorization` header that carried it, the `nodus_token` cookie), plus
//! `X-Real-IP` with the peer's address when the client sent none (the Python framework reads the
//! remote address from it). Apps of this node are invoked on its engine directly; other names
//! go through the locator, which resolves them anywhere in the cluster.
//!
//! Failures before the head are answered with a short JSON body `{"error": code, "message":
//! text}`: 404 unknown app or event, 503 queue full or app unavailable (with `Retry-After`), 504
//! no head in time, 502 worker crashed, sent a malformed head, or the node could not be reached,
//! 500 the app's handler failed, 413 body too large. After the head has gone out, a failure can
//! only cut the response short: the connection is aborted so the client sees an incomplete body.
//!
//! Bounds: requests in flight ([`GatewayConfig::max_in_flight`], past it 503), request body
//! size ([`GatewayConfig::max_body_bytes`], 413), cached app connections
//! ([`GatewayConfig::max_apps`]), the wait for the head once the worker has the whole request
//! ([`GatewayConfig::head_timeout`], 504) and for every later piece of either body
//! ([`GatewayConfig::idle_timeout`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use axum::body::Body;
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Request, Response, StatusCode, Version};
use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http_body_util::BodyExt;
use nodus_engine::balance::Rejection;
use nodus_engine::client::{AppClient, ClientError, ClientOptions, ServiceHandle, StreamReceiver, StreamSender};
use nodus_engine::service::errors;
use nodus_engine::{AppCaller, Engine, Session, SessionError};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::access::{self, TOKEN_COOKIE};
use crate::cocaine::{RequestHead, ResponseHead, Target, UPLOAD_CHUNK_BYTES};
use crate::metrics::{Area, Metrics};

/// The Python framework's category for its own errors, and its "no handler" code.
const FRAMEWORK_CATEGORY: i64 = 42;
const FRAMEWORK_NO_HANDLER: i64 = 200;
/// The worker SDK's category for handler errors, and its "unknown event" code.
const SDK_CATEGORY: i64 = nodus_engine::category::APPLICATION;
const SDK_UNKNOWN_EVENT: i64 = 404;

/// Gateway settings and bounds.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Longest wait for the worker's response head once it has the whole request (the upload
    /// itself is bounded by `idle_timeout` per piece). Past it: 504.
    pub head_timeout: Duration,
    /// Longest wait for the next piece of the request body from the client, or of the response
    /// body from the worker.
    pub idle_timeout: Duration,
    /// Largest request body; larger ones get 413.
    pub max_body_bytes: u64,
    /// Gateway requests served at once; more get 503.
    pub max_in_flight: usize,
    /// Apps whose connections are kept; past it the oldest is dropped.
    pub max_apps: usize,
    /// TCP connections to each app's service, used in turn (more spread load over cores).
    pub connections_per_app: usize,
    /// Seconds in `Retry-After` on 503.
    pub retry_after_secs: u32,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            head_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_body_bytes: 64 << 20,
            max_in_flight: 4096,
            max_apps: 1024,
            connections_per_app: 2,
            retry_after_secs: 1,
        }
    }
}

/// Why a gateway request failed, in HTTP terms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// The request names no app event.
    #[error("{0}")]
    BadRoute(String),
    /// The locator knows no such app.
    #[error("no app named {app:?} in the cluster: {message}")]
    UnknownApp {
        /// The app asked for.
        app: String,
        /// The locator's text.
        message: String,
    },
    /// The app has no such event.
    #[error("app {app:?} has no event {event:?}: {message}")]
    UnknownEvent {
        /// The app.
        app: String,
        /// The event asked for.
        event: String,
        /// The worker's text.
        message: String,
    },
    /// The app's queue is full.
    #[error("app {app:?} is busy (its queue is full); retry later: {message}")]
    QueueFull {
        /// The app.
        app: String,
        /// The engine's text.
        message: String,
    },
    /// The app cannot take requests now (stopped, failed, node shutting down).
    #[error("app {app:?} cannot take requests now; retry later: {message}")]
    Unavailable {
        /// The app.
        app: String,
        /// The engine's text.
        message: String,
    },
    /// The gateway serves [`GatewayConfig::max_in_flight`] requests already.
    #[error("the gateway serves {0} requests already; retry later")]
    Busy(usize),
    /// No head within the timeout.
    #[error("the app did not answer within {0:?}")]
    Timeout(Duration),
    /// The worker died while serving the request.
    #[error("the worker failed while serving the request: {0}")]
    WorkerFailed(String),
    /// The worker's first chunk is not a response head.
    #[error("the app answered a malformed response head: {0}")]
    BadHead(String),
    /// The app's handler answered an error.
    #[error("the app answered error [{category}, {code}]: {message}")]
    AppError {
        /// Error category.
        category: i64,
        /// Error code.
        code: i64,
        /// The app's text.
        message: String,
    },
    /// The node's locator or the app's service could not be reached.
    #[error("cannot reach the app: {0}")]
    Unreachable(String),
    /// The request body is larger than allowed.
    #[error("the request body is larger than {0} bytes")]
    TooLarge(u64),
    /// The client stopped sending the body, or it could not be read.
    #[error("the request body could not be read: {0}")]
    BodyRead(String),
}

/// The JSON body of an error answer.
#[derive(Debug, Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: String,
}

impl GatewayError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::BadRoute(_) => StatusCode::BAD_REQUEST,
            GatewayError::UnknownApp { .. } | GatewayError::UnknownEvent { .. } => StatusCode::NOT_FOUND,
            GatewayError::QueueFull { .. } | GatewayError::Unavailable { .. } | GatewayError::Busy(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            GatewayError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::WorkerFailed(_) | GatewayError::BadHead(_) | GatewayError::Unreachable(_) => {
                StatusCode::BAD_GATEWAY
            }
            GatewayError::AppError { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            GatewayError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::BodyRead(_) => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// The stable code in the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::BadRoute(_) => "bad_route",
            GatewayError::UnknownApp { .. } => "unknown_app",
            GatewayError::UnknownEvent { .. } => "unknown_event",
            GatewayError::QueueFull { .. } => "queue_full",
            GatewayError::Unavailable { .. } => "app_unavailable",
            GatewayError::Busy(_) => "gateway_busy",
            GatewayError::Timeout(_) => "timeout",
            GatewayError::WorkerFailed(_) => "worker_failed",
            GatewayError::BadHead(_) => "bad_head",
            GatewayError::AppError { .. } => "app_error",
            GatewayError::Unreachable(_) => "unreachable",
            GatewayError::TooLarge(_) => "body_too_large",
            GatewayError::BodyRead(_) => "body_read",
        }
    }

    /// The answer: status, JSON body and, for 503, `Retry-After`.
    pub fn to_response(&self, retry_after_secs: u32) -> Response<Body> {
        let body = serde_json::to_vec(&ErrorBody { error: self.code(), message: self.to_string() }).unwrap_or_default();
        let mut resp = Response::new(Body::from(body));
        *resp.status_mut() = self.status();
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if self.status() == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        resp
    }

    /// Maps the client SDK's error for `target` to an HTTP failure.
    fn from_client(e: &ClientError, target: &Target, head_timeout: Duration) -> GatewayError {
        let app = target.app.clone();
        match e.root() {
            ClientError::NotFound { message, .. } => GatewayError::UnknownApp { app, message: message.clone() },
            ClientError::QueueFull { message } => GatewayError::QueueFull { app, message: message.clone() },
            ClientError::Unavailable { category: errors::APP, code: errors::UNKNOWN_APP, message } => {
                GatewayError::UnknownApp { app, message: message.clone() }
            }
            ClientError::Unavailable { message, .. } => GatewayError::Unavailable { app, message: message.clone() },
            ClientError::Service { category, code, message } => {
                GatewayError::from_service(*category, *code, message.clone(), target)
            }
            ClientError::Timeout { .. } => GatewayError::Timeout(head_timeout),
            ClientError::Disconnected { .. } => {
                GatewayError::WorkerFailed("the connection to the app's service was lost".into())
            }
            other => GatewayError::Unreachable(other.to_string()),
        }
    }

    /// Maps an error a worker or the app's service answered: `[category, code] message`.
    fn from_service(category: i64, code: i64, message: String, target: &Target) -> GatewayError {
        let app = target.app.clone();
        match (category, code) {
            (FRAMEWORK_CATEGORY, FRAMEWORK_NO_HANDLER) | (SDK_CATEGORY, SDK_UNKNOWN_EVENT) => {
                GatewayError::UnknownEvent { app, event: target.event.clone(), message }
            }
            (errors::APP, errors::WORKER_FAILED | errors::OVERFLOW) => GatewayError::WorkerFailed(message),
            (errors::APP, errors::QUEUE_FULL) => GatewayError::QueueFull { app, message },
            (errors::APP, errors::UNKNOWN_APP) => GatewayError::UnknownApp { app, message },
            (errors::APP, _) => GatewayError::Unavailable { app, message },
            (category, code) => GatewayError::AppError { category, code, message },
        }
    }

    /// Maps a refusal of the local engine's balancer.
    fn from_rejection(r: &Rejection, target: &Target) -> GatewayError {
        let (app, message) = (target.app.clone(), r.to_string());
        match r {
            Rejection::QueueFull { .. } | Rejection::Busy { .. } => GatewayError::QueueFull { app, message },
            Rejection::Failed { .. } | Rejection::Stopped | Rejection::Expired => {
                GatewayError::Unavailable { app, message }
            }
        }
    }

    /// Maps the end of a local engine session that is not a close.
    fn from_session(e: &SessionError, target: &Target) -> GatewayError {
        match e {
            SessionError::Worker { category, code, message } => {
                GatewayError::from_service(*category, *code, message.clone(), target)
            }
            SessionError::WorkerFailed(m) => GatewayError::WorkerFailed(m.clone()),
            SessionError::Overflow(_) => GatewayError::WorkerFailed(e.to_string()),
            SessionError::Rejected(r) => GatewayError::from_rejection(r, target),
            SessionError::EngineGone | SessionError::Closed => {
                GatewayError::Unavailable { app: target.app.clone(), message: e.to_string() }
            }
        }
    }
}

/// The connections to one app's service, used in turn.
struct AppHandles {
    handles: Vec<ServiceHandle>,
    next: AtomicUsize,
}

impl AppHandles {
    fn pick(&self) -> &ServiceHandle {
        &self.handles[self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len()]
    }
}

/// The gateway: app connections, bounds and metrics. Cheap to share (`Arc`).
pub struct Gateway {
    client: AppClient,
    local: Option<Engine>,
    apps: Mutex<HashMap<String, Arc<AppHandles>>>,
    in_flight: Arc<Semaphore>,
    config: GatewayConfig,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("client", &self.client).field("config", &self.config).finish()
    }
}

/// Ends a gateway request in the metrics when dropped (whenever the response body ends).
struct InFlight {
    metrics: Arc<Metrics>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics.gateway_finished();
    }
}

/// Aborts the upload task when the response is done with.
struct AbortOnDrop(Option<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

impl Gateway {
    /// A gateway reaching apps through the locator at `locator` (`host:port`), and the apps of
    /// `local` (the node's own engine, when given) directly, without the locator's TCP hop.
    pub fn new(
        locator: impl Into<String>,
        local: Option<Engine>,
        config: GatewayConfig,
        metrics: Arc<Metrics>,
    ) -> Gateway {
        let options = ClientOptions {
            // A refused connection is retried within the head timeout, never longer.
            retry_budget: config.head_timeout.min(ClientOptions::default().retry_budget),
            ..ClientOptions::default()
        };
        Gateway {
            client: AppClient::with_options(locator, options),
            local,
            apps: Mutex::new(HashMap::new()),
            in_flight: Arc::new(Semaphore::new(config.max_in_flight.max(1))),
            config,
            metrics,
        }
    }

    /// The settings in force.
    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    fn handles(&self, app: &str) -> Arc<AppHandles> {
        let mut apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = apps.get(app) {
            return h.clone();
        }
        if apps.len() >= self.config.max_apps.max(1) {
            if let Some(k) = apps.keys().next().cloned() {
                apps.remove(&k);
            }
        }
        let n = self.config.connections_per_app.max(1);
        let h = Arc::new(AppHandles {
            handles: (0..n).map(|_| self.client.service(app)).collect(),
            next: AtomicUsize::new(0),
        });
        apps.insert(app.to_string(), h.clone());
        h
    }

    fn forget(&self, app: &str) {
        self.apps.lock().unwrap_or_else(|e| e.into_inner()).remove(app);
    }

    /// Serves one request for `target` from `peer`. `token_used` says the request was allowed
    /// by the node's token, which is then not passed on to the app.
    pub async fn serve(
        self: Arc<Self>,
        target: Target,
        peer: SocketAddr,
        token_used: bool,
        req: Request<Body>,
    ) -> Response<Body> {
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            return self.fail(&target, &GatewayError::Busy(self.config.max_in_flight));
        };
        self.metrics.gateway_started();
        let guard = InFlight { metrics: self.metrics.clone(), _permit: permit };
        let started = Instant::now();
        match self.invoke(&target, peer, token_used, req, guard).await {
            Ok(resp) => {
                self.metrics.invoke_latency(&target.app, started.elapsed());
                self.metrics.gateway_answered(&target.app, resp.status().as_u16());
                self.metrics.request(Area::Gateway, resp.status().as_u16());
                resp
            }
            Err(e) => self.fail(&target, &e),
        }
    }

    fn fail(&self, target: &Target, e: &GatewayError) -> Response<Body> {
        let app = if matches!(e, GatewayError::UnknownApp { .. }) { "" } else { target.app.as_str() };
        if matches!(e, GatewayError::UnknownApp { .. }) {
            self.forget(&target.app);
        }
        let code = e.status().as_u16();
        tracing::debug!(app = %target.app, event = %target.event, code, error = %e, "gateway request failed");
        self.metrics.gateway_answered(app, code);
        self.metrics.request(Area::Gateway, code);
        e.to_response(self.config.retry_after_secs)
    }

    async fn invoke(
        &self,
        target: &Target,
        peer: SocketAddr,
        token_used: bool,
        req: Request<Body>,
        guard: InFlight,
    ) -> Result<Response<Body>, GatewayError> {
        let (parts, body) = req.into_parts();
        let max = self.config.max_body_bytes;
        if let Some(len) = content_length(&parts.headers) {
            if len > max {
                return Err(GatewayError::TooLarge(max));
            }
        }
        let mut body =
            BodyReader { body, pending: BytesMut::new(), ended: false, read: 0, max, idle: self.config.idle_timeout };
        // The first piece decides the layout: a body that fits one chunk goes in the head.
        let first = body.fill(UPLOAD_CHUNK_BYTES + 1).await?;
        let more = first.len() > UPLOAD_CHUNK_BYTES || !body.ended;
        let head = RequestHead {
            method: parts.method.as_str().to_string(),
            uri: target.uri.clone(),
            version: version(parts.version).to_string(),
            headers: forward_headers(&parts.headers, peer, token_used),
            body: if more { Bytes::new() } else { first.clone() },
        };

        let head_timeout = self.config.head_timeout;
        // One timer for the request: it bounds opening the invocation and waiting for the head,
        // and restarts once a large upload has reached the worker.
        let deadline = tokio::time::sleep(head_timeout);
        tokio::pin!(deadline);
        let head_chunk = head.encode();
        self.metrics.request_bytes(head.body.len());
        let call = match self.local_caller(target) {
            // The request chunk (and, for a small body, the end of the input) travel with the
            // invocation itself: one event to the app's task.
            Some(caller) => Call::Local(caller.open(target.event.as_str(), head_chunk.clone(), !more)),
            None => tokio::select! {
                stream = self.open_remote(target) => Call::Remote(stream?),
                _ = &mut deadline => return Err(GatewayError::Timeout(head_timeout)),
            },
        };
        let mut upload_done: Option<oneshot::Receiver<Result<(), GatewayError>>> = None;
        let mut abort = AbortOnDrop(None);
        let mut replies = match call {
            Call::Local(session) if !more => Replies::Local(session),
            Call::Local(session) => {
                let (done_tx, done_rx) = oneshot::channel();
                let (down_tx, down_rx) = mpsc::channel(RELAY_BUFFER);
                let task = tokio::spawn(relay(session, first, body, self.metrics.clone(), done_tx, down_tx));
                abort.0 = Some(task.abort_handle());
                upload_done = Some(done_rx);
                Replies::Relayed(down_rx)
            }
            Call::Remote(stream) => {
                let client_error = |e: ClientError| GatewayError::from_client(&e, target, head_timeout);
                let (mut tx, rx) = stream.split();
                tx.send(head_chunk).await.map_err(client_error)?;
                if more {
                    let (done_tx, done_rx) = oneshot::channel();
                    let metrics = self.metrics.clone();
                    let task = tokio::spawn(async move {
                        let r = upload(tx, first, body, &metrics).await;
                        let _ = done_tx.send(r);
                    });
                    abort.0 = Some(task.abort_handle());
                    upload_done = Some(done_rx);
                } else {
                    tx.close().await.map_err(client_error)?;
                }
                Replies::Remote(rx)
            }
        };

        // Wait for the head; during a large upload only the idle timeout applies, and the head
        // timeout starts again once the worker has the whole request.
        let uploading = upload_done.is_some();
        let first_reply = loop {
            tokio::select! {
                done = async { upload_done.as_mut().expect("guarded").await }, if upload_done.is_some() => {
                    upload_done = None;
                    match done {
                        Ok(Ok(())) => deadline.as_mut().reset(tokio::time::Instant::now() + head_timeout),
                        Ok(Err(e)) => return Err(e),
                        Err(_) => return Err(GatewayError::BodyRead("the upload stopped".into())),
                    }
                }
                reply = replies.recv(target, head_timeout) => break reply,
                _ = &mut deadline, if !uploading || upload_done.is_none() => {
                    return Err(GatewayError::Timeout(head_timeout));
                }
            }
        };
        let head_bytes = match first_reply? {
            Some(b) => b,
            None => return Err(GatewayError::BadHead("the app closed the response without a head".into())),
        };
        let head = ResponseHead::decode(&head_bytes).map_err(|e| GatewayError::BadHead(e.to_string()))?;
        let mut resp = Response::new(Body::empty());
        *resp.status_mut() = StatusCode::from_u16(head.code).map_err(|e| GatewayError::BadHead(e.to_string()))?;
        for (name, value) in head.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| GatewayError::BadHead(format!("invalid header name {name:?}")))?;
            if is_hop_by_hop(&name) {
                continue;
            }
            let value = HeaderValue::from_maybe_shared(value)
                .map_err(|_| GatewayError::BadHead(format!("invalid value of header {name}")))?;
            resp.headers_mut().append(name, value);
        }
        // Whatever already followed the head: a response that is complete by now goes out
        // whole (one write, a Content-Length), anything else streams as it comes.
        let mut ready = Vec::new();
        let mut ready_bytes = 0;
        while ready_bytes < WHOLE_RESPONSE_BYTES {
            match replies.recv(target, head_timeout).now_or_never() {
                Some(Ok(Some(chunk))) => {
                    ready_bytes += chunk.len();
                    if !chunk.is_empty() {
                        ready.push(chunk);
                    }
                }
                Some(Ok(None)) => {
                    let body = match ready.len() {
                        0 => Bytes::new(),
                        1 => ready.pop().unwrap_or_default(),
                        _ => ready.concat().into(),
                    };
                    self.metrics.response_bytes(body.len());
                    *resp.body_mut() = Body::from(body);
                    return Ok(resp);
                }
                // Nothing of the response has gone out yet, so the failure is still an answer.
                Some(Err(e)) => return Err(e),
                None => break,
            }
        }
        let ctx = (target.clone(), head_timeout);
        let parts = BodyParts { ready, replies, upload: upload_done, guard, abort };
        *resp.body_mut() = response_body(parts, ctx, self.config.idle_timeout, self.metrics.clone());
        Ok(resp)
    }

    /// The local engine's caller for the app, when this node runs it; other names go through
    /// the locator, which finds them in the cluster (or says they do not exist).
    fn local_caller(&self, target: &Target) -> Option<AppCaller> {
        self.local.as_ref()?.caller(&target.app).ok()
    }

    /// Opens the invocation through the locator.
    async fn open_remote(&self, target: &Target) -> Result<nodus_engine::client::Stream, GatewayError> {
        let handle = self.handles(&target.app).pick().clone();
        handle.enqueue(&target.event).await.map_err(|e| GatewayError::from_client(&e, target, self.config.head_timeout))
    }
}

/// Largest response sent whole when it is complete at its head; longer ones stream.
const WHOLE_RESPONSE_BYTES: usize = 64 * 1024;

/// Replies buffered per large local upload before its relay stops reading the engine.
const RELAY_BUFFER: usize = 64;

/// One open invocation.
enum Call {
    /// On this node's engine.
    Local(Session),
    /// Through the locator (another node's app, or no local engine).
    Remote(nodus_engine::client::Stream),
}

/// The reply side of one invocation.
enum Replies {
    /// A local session whose request side is closed.
    Local(Session),
    /// A local session owned by the relay task of a large upload.
    Relayed(mpsc::Receiver<Result<Bytes, SessionError>>),
    /// Through the locator.
    Remote(StreamReceiver),
}

impl Replies {
    /// The next chunk; `None` once the app closed the response.
    async fn recv(&mut self, target: &Target, head_timeout: Duration) -> Result<Option<Bytes>, GatewayError> {
        match self {
            Replies::Local(s) => s.recv().await.map_err(|e| GatewayError::from_session(&e, target)),
            Replies::Relayed(rx) => match rx.recv().await {
                Some(Ok(b)) => Ok(Some(b)),
                Some(Err(e)) => Err(GatewayError::from_session(&e, target)),
                None => Ok(None),
            },
            Replies::Remote(rx) => rx.recv().await.map_err(|e| GatewayError::from_client(&e, target, head_timeout)),
        }
    }
}

/// A large upload to a local session: sends the body in pieces while relaying the replies
/// (a session is one object, so one task serves both directions).
async fn relay(
    mut session: Session,
    mut first: Bytes,
    mut body: BodyReader,
    metrics: Arc<Metrics>,
    done: oneshot::Sender<Result<(), GatewayError>>,
    down: mpsc::Sender<Result<Bytes, SessionError>>,
) {
    let mut done = Some(done);
    let lost = |e: SessionError| GatewayError::WorkerFailed(format!("while sending the body: {e}"));
    loop {
        tokio::select! {
            piece = async {
                if first.is_empty() {
                    body.next_piece().await
                } else {
                    Ok(Some(first.split_to(first.len().min(UPLOAD_CHUNK_BYTES))))
                }
            }, if done.is_some() => {
                let sent = match piece {
                    Ok(Some(p)) => {
                        metrics.request_bytes(p.len());
                        match session.send(p).await.map_err(lost) {
                            Ok(()) => continue,
                            Err(e) => Err(e),
                        }
                    }
                    Ok(None) => session.close().await.map_err(lost),
                    Err(e) => Err(e),
                };
                if let Some(d) = done.take() {
                    let _ = d.send(sent);
                }
            }
            reply = session.recv() => {
                let (item, end) = match reply {
                    Ok(Some(b)) => (Ok(b), false),
                    Ok(None) => return,
                    Err(e) => (Err(e), true),
                };
                if down.send(item).await.is_err() || end {
                    return;
                }
            }
        }
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

fn version(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 | Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2.0",
        _ => "1.1",
    }
}

/// Hop-by-hop headers (RFC 9110 section 7.6.1) are the gateway's business, not the app's.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "te" | "trailer" | "upgrade"
    )
}

/// `content-type` → `Content-Type`: the spelling apps written for Cocaine look up.
fn canonical(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = true;
    for c in name.chars() {
        out.push(if upper { c.to_ascii_uppercase() } else { c });
        upper = c == '-';
    }
    out
}

/// The request's headers as the app gets them: end-to-end headers in canonical spelling, the
/// node's token removed, and `X-Real-IP` set to the peer when the client did not send one.
fn forward_headers(headers: &HeaderMap, peer: SocketAddr, token_used: bool) -> Vec<(String, Bytes)> {
    let mut out = Vec::with_capacity(headers.len() + 1);
    let mut real_ip = false;
    for (name, value) in headers {
        if is_hop_by_hop(name) {
            continue;
        }
        let bytes = Bytes::copy_from_slice(value.as_bytes());
        let bytes = if name == header::AUTHORIZATION && token_used {
            continue;
        } else if name == header::COOKIE {
            match access::without_cookie(value.as_bytes(), TOKEN_COOKIE) {
                Some(rest) => Bytes::from(rest),
                None => continue,
            }
        } else {
            bytes
        };
        real_ip |= name.as_str() == "x-real-ip";
        out.push((canonical(name.as_str()), bytes));
    }
    if !real_ip {
        out.push(("X-Real-IP".to_string(), Bytes::from(peer.ip().to_string())));
    }
    out
}

/// The request body, read in pieces of at most [`UPLOAD_CHUNK_BYTES`], bounded in total size
/// and in the wait for each frame.
struct BodyReader {
    body: Body,
    pending: BytesMut,
    ended: bool,
    read: u64,
    max: u64,
    idle: Duration,
}

impl BodyReader {
    /// Reads one frame into `pending`; false at the end of the body.
    async fn read_frame(&mut self) -> Result<bool, GatewayError> {
        if self.ended {
            return Ok(false);
        }
        loop {
            let frame = tokio::time::timeout(self.idle, self.body.frame())
                .await
                .map_err(|_| GatewayError::BodyRead(format!("no body data for {:?}", self.idle)))?;
            match frame {
                None => {
                    self.ended = true;
                    return Ok(false);
                }
                Some(Err(e)) => return Err(GatewayError::BodyRead(e.to_string())),
                Some(Ok(f)) => {
                    let Ok(data) = f.into_data() else { continue };
                    self.add(data)?;
                    return Ok(true);
                }
            }
        }
    }

    fn add(&mut self, data: Bytes) -> Result<(), GatewayError> {
        self.read += data.len() as u64;
        if self.read > self.max {
            return Err(GatewayError::TooLarge(self.max));
        }
        self.pending.extend_from_slice(&data);
        Ok(())
    }

    /// Waits until `want` bytes are pending or the body ended; takes everything pending.
    async fn fill(&mut self, want: usize) -> Result<Bytes, GatewayError> {
        while self.pending.len() < want && self.read_frame().await? {}
        Ok(self.pending.split().freeze())
    }

    /// The next piece: waits for at least one frame, then takes what is ready at once, up to
    /// [`UPLOAD_CHUNK_BYTES`]. `None` at the end.
    async fn next_piece(&mut self) -> Result<Option<Bytes>, GatewayError> {
        if self.pending.is_empty() && !self.read_frame().await? {
            return Ok(None);
        }
        while self.pending.len() < UPLOAD_CHUNK_BYTES && !self.ended {
            match self.body.frame().now_or_never() {
                Some(Some(Ok(f))) => {
                    if let Ok(data) = f.into_data() {
                        self.add(data)?;
                    }
                }
                Some(Some(Err(e))) => return Err(GatewayError::BodyRead(e.to_string())),
                Some(None) => self.ended = true,
                None => break,
            }
        }
        let n = self.pending.len().min(UPLOAD_CHUNK_BYTES);
        Ok(Some(self.pending.split_to(n).freeze()))
    }
}

/// Sends the rest of a large body: `first` (what was read before the head) and every later
/// piece, in chunks of at most [`UPLOAD_CHUNK_BYTES`], then closes.
async fn upload(
    mut tx: StreamSender,
    mut first: Bytes,
    mut body: BodyReader,
    metrics: &Metrics,
) -> Result<(), GatewayError> {
    let lost = |e: ClientError| GatewayError::WorkerFailed(format!("while sending the body: {e}"));
    while !first.is_empty() {
        let piece = first.split_to(first.len().min(UPLOAD_CHUNK_BYTES));
        metrics.request_bytes(piece.len());
        tx.send(piece).await.map_err(lost)?;
    }
    while let Some(piece) = body.next_piece().await? {
        metrics.request_bytes(piece.len());
        tx.send(piece).await.map_err(lost)?;
    }
    tx.close().await.map_err(lost)
}

/// What a streamed response is made of once its head went out.
struct BodyParts {
    /// Chunks that followed the head at once.
    ready: Vec<Bytes>,
    /// The later chunks.
    replies: Replies,
    /// The end of an upload still going on (the worker answered before the whole body).
    upload: Option<oneshot::Receiver<Result<(), GatewayError>>>,
    guard: InFlight,
    abort: AbortOnDrop,
}

/// The response body: every later chunk from the worker, until close. A failure, a stall, or
/// an upload that fails after the head (too large, the client stalled or left) aborts the
/// response (the client sees an incomplete body, never a truncated one passed off as whole).
fn response_body(parts: BodyParts, ctx: (Target, Duration), idle: Duration, metrics: Arc<Metrics>) -> Body {
    struct State {
        ready: std::vec::IntoIter<Bytes>,
        replies: Replies,
        upload: Option<oneshot::Receiver<Result<(), GatewayError>>>,
        ctx: (Target, Duration),
        idle: Duration,
        metrics: Arc<Metrics>,
        _guard: InFlight,
        _abort: AbortOnDrop,
        done: bool,
    }
    let BodyParts { ready, replies, upload, guard, abort } = parts;
    let ready = ready.into_iter();
    let state = State { ready, replies, upload, ctx, idle, metrics, _guard: guard, _abort: abort, done: false };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        if let Some(chunk) = s.ready.next() {
            s.metrics.response_bytes(chunk.len());
            return Some((Ok(chunk), s));
        }
        loop {
            // A chunk that is there already needs no timer.
            let next = match s.replies.recv(&s.ctx.0, s.ctx.1).now_or_never() {
                Some(r) => Ok(r),
                None => {
                    let recv = tokio::time::timeout(s.idle, s.replies.recv(&s.ctx.0, s.ctx.1));
                    let upload = async {
                        match s.upload.as_mut() {
                            Some(u) => u.await,
                            None => std::future::pending().await,
                        }
                    };
                    let woke = tokio::select! {
                        r = recv => Ok(r),
                        u = upload => Err(u),
                    };
                    match woke {
                        Ok(r) => r,
                        // The upload ended: fine when whole (or when its task ended because the
                        // worker closed first), fatal when it failed.
                        Err(u) => {
                            s.upload = None;
                            match u {
                                Ok(Err(e)) => Ok(Err(e)),
                                _ => continue,
                            }
                        }
                    }
                }
            };
            let item = match next {
                Ok(Ok(Some(chunk))) if chunk.is_empty() => continue,
                Ok(Ok(Some(chunk))) => {
                    s.metrics.response_bytes(chunk.len());
                    Ok(chunk)
                }
                Ok(Ok(None)) => return None,
                Ok(Err(e)) => {
                    tracing::debug!(app = %s.ctx.0.app, error = %e, "app response failed after the head; aborting it");
                    s.done = true;
                    Err(std::io::Error::other(e.to_string()))
                }
                Err(_) => {
                    tracing::debug!(app = %s.ctx.0.app, idle = ?s.idle, "app response stalled; aborting it");
                    s.done = true;
                    Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the app stopped sending its response"))
                }
            };
            return Some((item, s));
        }
    });
    Body::from_stream(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_statuses_and_codes() {
        let t = Target { app: "a".into(), event: "e".into(), uri: "/".into() };
        let map = |e: ClientError| GatewayError::from_client(&e, &t, Duration::from_secs(1));
        let s = |e: ClientError| map(e).status().as_u16();
        assert_eq!(s(ClientError::NotFound { name: "a".into(), message: String::new() }), 404);
        assert_eq!(s(ClientError::Service { category: 42, code: 200, message: String::new() }), 404);
        assert_eq!(s(ClientError::Service { category: 2, code: 404, message: String::new() }), 404);
        assert_eq!(s(ClientError::QueueFull { message: String::new() }), 503);
        assert_eq!(s(ClientError::from_service(12, errors::APP_STOPPED, String::new())), 503);
        assert_eq!(s(ClientError::from_service(12, errors::UNKNOWN_APP, String::new())), 404);
        assert_eq!(s(ClientError::Service { category: 12, code: errors::WORKER_FAILED, message: String::new() }), 502);
        assert_eq!(s(ClientError::Service { category: 42, code: 100, message: String::new() }), 500);
        assert_eq!(s(ClientError::Disconnected { request_sent: true }), 502);
        assert_eq!(s(ClientError::Timeout { what: "x", after: Duration::from_secs(1) }), 504);
        let exhausted = ClientError::RetriesExhausted {
            attempts: 3,
            elapsed: Duration::from_secs(1),
            last: Box::new(ClientError::QueueFull { message: String::new() }),
        };
        assert_eq!(map(exhausted).code(), "queue_full");
        let busy = GatewayError::QueueFull { app: "a".into(), message: "m".into() }.to_response(7);
        assert_eq!(busy.headers()[header::RETRY_AFTER], "7");
        assert_eq!(busy.headers()[header::CONTENT_TYPE], "application/json");
    }

    #[test]
    fn forwarded_headers_hide_the_token_and_name_the_peer() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer secret"));
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; nodus_token=secret"));
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let peer: SocketAddr = "10.0.0.9:4000".parse().unwrap();
        let out = forward_headers(&h, peer, true);
        let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["Cookie", "Content-Type", "X-Real-IP"]);
        assert_eq!(out[0].1, "a=1");
        assert_eq!(out[2].1, "10.0.0.9");
        // An app's own Authorization passes when the token did not open the request.
        let out = forward_headers(&h, peer, false);
        assert!(out.iter().any(|(n, v)| n == "Authorization" && v == "Bearer secret"));
    }
}
