//! The REST API: JSON over the node's own message protocol, described by the OpenAPI document
//! `openapi.json` (served at `/api/openapi.json`).
//!
//! Every endpoint becomes requests to the node (its `node` commands and the built-in `apps`
//! service, or any service through `POST /api/call`) sent through one of two connections the
//! node gives the API ([`Api`]): one that authenticated with the node's token (the owner) for
//! requests that presented the HTTP token, one that did not (anonymous: what `[access]
//! anonymous` grants) for the others. So the router's permission check applies to every call, as
//! it does to any client; the API decides no permission itself. A built-in service that is not
//! on the node answers `503 not_available`; one that does not know a command answers
//! `501 not_implemented`.
//!
//! Flags go to the node's `flags` service (list: `status`; raise and lower: `send`; clear a
//! `manual_down` flag: `admin`). Tasks go to the node's `tasks` service (submit: `send`; get,
//! list, counts, stats: `status`; abort: `admin`), with its codes (`unknown_task`,
//! `unknown_procedure`: 404; `bad_arguments`: 422). The component tree, monitoring and kill go
//! to the `control` service (tree and monitoring: `status`; kill: `admin`). `POST /api/call`
//! reaches any service that runs, with the caller's permissions.
//!
//! Errors are `{"error": CODE, "message": TEXT}` with a stable `CODE` (see [`ApiError`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::StreamExt;
use nodus_client::admin::{Admin, AdminError};
use nodus_client::{ClientError as NodeError, RefusalKind};
use nodus_wire::Message;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;

use crate::front::Shared;

/// The OpenAPI 3 document of this API.
pub const OPENAPI_JSON: &str = include_str!("../openapi.json");

/// Deploys uploaded at once; more wait.
const MAX_UPLOADS: usize = 2;
/// Longest `POST /api/call` timeout a caller may ask for.
const MAX_CALL_TIMEOUT: Duration = Duration::from_secs(300);
/// Default timeout of a request to the node.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The parameter carrying an HTTP request's id to the node (and on to other nodes).
pub const TRACE_PARAM: &str = "trace_id";

/// Who an API request acts for in the node's access model (decided by the front, from the
/// token the request presented).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// No token (a loopback peer): the node's anonymous permissions.
    Anonymous,
    /// The node's token: the owner.
    Owner,
}

/// The id of one HTTP request: the `X-Request-Id` it came with (when printable, at most 64
/// bytes) or a new one. Answered in `X-Request-Id`, logged in the request's span and carried to
/// the node as the `trace_id` parameter, so every node the request reaches logs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

/// The node, as the API reaches it: a connection per [`Caller`], and where uploads go.
#[derive(Clone)]
pub struct Api {
    anonymous: Admin,
    owner: Admin,
    uploads: PathBuf,
    max_upload_bytes: u64,
    upload_slots: Arc<Semaphore>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").field("uploads", &self.uploads).finish_non_exhaustive()
    }
}

impl Api {
    /// The API over `anonymous` (a connection without the token) and `owner` (one that
    /// authenticated with it). Deploys are uploaded into `uploads` (created when missing), at
    /// most `max_upload_bytes` each.
    pub fn new(anonymous: Admin, owner: Admin, uploads: PathBuf, max_upload_bytes: u64) -> Api {
        Api { anonymous, owner, uploads, max_upload_bytes, upload_slots: Arc::new(Semaphore::new(MAX_UPLOADS)) }
    }

    fn admin(&self, caller: Caller) -> &Admin {
        match caller {
            Caller::Anonymous => &self.anonymous,
            Caller::Owner => &self.owner,
        }
    }
}

/// A failed API request: the HTTP status, a stable code and a sentence.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The stable code: `invalid`, `forbidden`, `unauthorized`, `not_found`, `unknown_app`,
    /// `unknown_node`, `unknown_service`, `unknown_command`, `bad_arguments`, `name_in_use`,
    /// `deploy_failed`, `too_large`, `not_available`, `not_implemented`, `quitting`, `busy`,
    /// `timeout`, `unavailable`, `service_unavailable`, `bad_answer`, or a service's own code.
    pub code: String,
    /// What happened and what to do.
    pub message: String,
}

impl ApiError {
    /// An error with `status` and `code`.
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError { status, code: code.to_string(), message: message.into() }
    }

    fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid", message)
    }

    /// What a failed request to `service` means in HTTP.
    fn from_admin(e: AdminError, service: &str) -> ApiError {
        match e {
            AdminError::Client(c) => ApiError::from_client(&c, service),
            AdminError::Failed { code, message, .. } => ApiError::from_service(&code, message),
            AdminError::UnknownNode(_) => ApiError::new(StatusCode::NOT_FOUND, "unknown_node", e.to_string()),
            AdminError::Unexpected { .. } | AdminError::Malformed(_) => {
                ApiError::new(StatusCode::BAD_GATEWAY, "bad_answer", e.to_string())
            }
        }
    }

    /// A service's `ERROR code=...` in HTTP.
    fn from_service(code: &str, message: String) -> ApiError {
        let status = match code {
            "invalid" | "bad_request" => StatusCode::BAD_REQUEST,
            "bad_arguments" => StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_app" | "not_found" | "unknown_task" | "unknown_procedure" | "unknown_component" => {
                StatusCode::NOT_FOUND
            }
            "not_killable" => StatusCode::CONFLICT,
            "not_answering" | "expired" => StatusCode::GATEWAY_TIMEOUT,
            "name_in_use" | "manual_down" | "reserved" => StatusCode::CONFLICT,
            "forbidden" => StatusCode::FORBIDDEN,
            "too_many_flags" | "too_large" => StatusCode::UNPROCESSABLE_ENTITY,
            "unavailable" | "storage" => StatusCode::SERVICE_UNAVAILABLE,
            "timeout" => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, code, message)
    }

    fn from_client(e: &NodeError, service: &str) -> ApiError {
        let Some(r) = e.refusal() else {
            return match e {
                NodeError::Timeout(_) => ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout", e.to_string()),
                NodeError::TooLarge { .. } => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", e.to_string()),
                NodeError::QueueFull => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", e.to_string()),
                _ => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    format!("the node's API connection is not available: {e}"),
                ),
            };
        };
        let message = e.to_string();
        match r.kind() {
            RefusalKind::ServiceUnavailable | RefusalKind::Dropped if BUILTIN.contains(&service) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_available",
                format!("the {service} service is not available on this node ({message})"),
            ),
            // Nobody serves the destination: no such service (or node), unless it is only out of
            // reach for now.
            RefusalKind::ServiceUnavailable | RefusalKind::Dropped => match r.code() {
                Some("unreachable" | "cache_full") => {
                    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", message)
                }
                _ => ApiError::new(StatusCode::NOT_FOUND, "unknown_service", message),
            },
            RefusalKind::Unknown if !BUILTIN.contains(&service) => {
                ApiError::new(StatusCode::BAD_REQUEST, "unknown_command", message)
            }
            RefusalKind::Unknown => ApiError::new(
                StatusCode::NOT_IMPLEMENTED,
                "not_implemented",
                format!("the {service} service on this node does not know this request ({message})"),
            ),
            RefusalKind::Quitting => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "quitting", message),
            RefusalKind::Invalid => ApiError::invalid(message),
            RefusalKind::Error => {
                let status = match r.code() {
                    Some("forbidden") => StatusCode::FORBIDDEN,
                    Some("unauthorized") => StatusCode::UNAUTHORIZED,
                    Some("timeout" | "expired") => StatusCode::GATEWAY_TIMEOUT,
                    Some("too_many_requests") => StatusCode::TOO_MANY_REQUESTS,
                    Some("too_large") => StatusCode::PAYLOAD_TOO_LARGE,
                    Some("disconnected") => StatusCode::BAD_GATEWAY,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                ApiError::new(status, r.code().unwrap_or("error"), message)
            }
        }
    }
}

/// Built-in services the API calls (a missing one is `not_available`, not an unknown name).
const BUILTIN: [&str; 5] = ["node", "apps", "flags", "tasks", "control"];

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.code, "message": self.message });
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

/// What every handler gets: the API, who it acts for, and the request's id.
pub(crate) struct Ctx {
    api: Api,
    caller: Caller,
    trace: String,
}

type ApiResult = Result<Response, ApiError>;

fn ok(value: Value) -> ApiResult {
    Ok(Json(value).into_response())
}

impl Ctx {
    fn admin(&self) -> &Admin {
        self.api.admin(self.caller)
    }

    /// `msg` to `service` on this node (or `server`), with the request's trace id; the answer,
    /// or the node's refusal as an [`ApiError`].
    async fn request(&self, service: &str, msg: Message, timeout: Duration) -> Result<Message, ApiError> {
        let mut msg = msg.param(TRACE_PARAM, &self.trace);
        if msg.to.service.is_empty() {
            msg = msg.to(service);
        }
        // The node would answer INVALID without naming the request: say it here.
        msg.validate().map_err(|e| ApiError::invalid(e.to_string()))?;
        let reply = self
            .admin()
            .client()
            .request_with_timeout(msg, timeout)
            .await
            .map_err(|e| ApiError::from_client(&e, service))?;
        if reply.command == "ERROR" {
            return Err(ApiError::from_service(
                reply.get("code").unwrap_or("error"),
                reply.get("message").unwrap_or("failed").to_string(),
            ));
        }
        // A service's INVALID: the request was not valid for it (its words say why).
        if reply.command == "INVALID" {
            return Err(ApiError::invalid(reply.get("message").unwrap_or("the service found the request invalid")));
        }
        Ok(reply)
    }
}

/// Builds the handler context from the front's extensions; 503 without an API.
fn ctx(s: &Shared, caller: Option<Extension<Caller>>, trace: Option<Extension<RequestId>>) -> Result<Ctx, ApiError> {
    let api = s.api.clone().ok_or_else(|| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_api", "this listener has no connection to a node")
    })?;
    Ok(Ctx {
        api,
        caller: caller.map_or(Caller::Anonymous, |c| c.0),
        trace: trace.map_or_else(String::new, |t| t.0 .0),
    })
}

type S = State<Arc<Shared>>;
type C = Option<Extension<Caller>>;
type T = Option<Extension<RequestId>>;

pub(crate) async fn openapi() -> Response {
    crate::dashboard::asset("application/json", OPENAPI_JSON)
}

pub(crate) async fn node(State(s): S, c: C, t: T) -> ApiResult {
    let ctx = ctx(&s, c, t)?;
    let i = ctx.admin().info().await.map_err(|e| ApiError::from_admin(e, "node"))?;
    ok(json!({
        "server": i.server,
        "version": i.version,
        "uptime_ms": u64::try_from(i.uptime.as_millis()).unwrap_or(u64::MAX),
        "connections": i.connections,
        "services": i.services,
        "instances": i.instances,
        "pending": i.pending,
        "cached": i.cached,
        "received": i.received,
        "delivered": i.delivered,
        "invalid": i.invalid,
        "expired": i.expired,
        "undeliverable": i.undeliverable,
        "quitting": i.quitting,
        "links": i.links,
        "known_nodes": i.known_nodes,
        "live_nodes": i.live_nodes,
    }))
}

pub(crate) async fn cluster(State(s): S, c: C, t: T) -> ApiResult {
    let ctx = ctx(&s, c, t)?;
    let i = ctx.admin().cluster_info().await.map_err(|e| ApiError::from_admin(e, "node"))?;
    let nodes: Vec<Value> =
        i.nodes.iter().map(|n| json!({"name": n.server, "address": n.addr, "live": n.live})).collect();
    let links: Vec<Value> = i
        .links
        .iter()
        .map(|l| json!({"peer": l.peer, "rtt_ms": l.rtt_ms, "offset_ms": l.offset_ms, "phi": finite(l.phi)}))
        .collect();
    ok(json!({
        "server": i.server,
        "live": i.live,
        "known": i.known,
        "quorum": i.quorum,
        "up": i.up,
        "complete": i.complete,
        "clock_stable": i.clock_stable,
        "ntp": i.ntp,
        "nodes": nodes,
        "links": links,
    }))
}

/// JSON has no infinity: a detector's phi can be.
fn finite(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        Value::Null
    }
}

pub(crate) async fn services(State(s): S, c: C, t: T) -> ApiResult {
    let ctx = ctx(&s, c, t)?;
    let list = ctx.admin().services().await.map_err(|e| ApiError::from_admin(e, "node"))?;
    ok(Value::Array(list.into_iter().map(|v| json!({"name": v.name, "instances": v.instances})).collect()))
}

pub(crate) async fn cluster_services(State(s): S, c: C, t: T) -> ApiResult {
    let ctx = ctx(&s, c, t)?;
    let list = ctx.admin().cluster_services().await.map_err(|e| ApiError::from_admin(e, "node"))?;
    ok(Value::Array(list.into_iter().map(|v| json!({"server": v.server, "service": v.service})).collect()))
}

/// The body of `POST /api/call`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CallBody {
    service: String,
    command: String,
    #[serde(default)]
    server: Option<String>,
    #[serde(default)]
    params: Map<String, Value>,
    #[serde(default)]
    payload: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

pub(crate) async fn call(
    State(s): S,
    c: C,
    t: T,
    body: Result<Json<CallBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let ctx = ctx(&s, c, t)?;
    let Json(b) = body.map_err(|e| ApiError::invalid(e.body_text()))?;
    let valid = |n: &str| !n.is_empty() && nodus_wire::valid_name(n);
    if !valid(&b.service) || b.server.as_deref().is_some_and(|n| !valid(n)) {
        return Err(ApiError::invalid("service and server must be names ([A-Za-z0-9_.-]+)"));
    }
    if !nodus_wire::valid_command(&b.command) {
        return Err(ApiError::invalid(format!("command {:?} must match [A-Z][A-Z0-9_]*", b.command)));
    }
    let mut msg = Message::new(&b.command);
    msg.to = nodus_wire::Address::new(b.server.as_deref().unwrap_or(""), &b.service);
    for (k, v) in &b.params {
        let v = match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        msg = msg.param(k.as_str(), v);
    }
    if let Some(p) = b.payload {
        msg = msg.with_payload(p.into_bytes());
    }
    let timeout = match b.timeout_ms {
        None => REQUEST_TIMEOUT,
        Some(ms) if ms == 0 || ms > MAX_CALL_TIMEOUT.as_millis() as u64 => {
            return Err(ApiError::invalid(format!("timeout_ms must be 1 to {} (ms)", MAX_CALL_TIMEOUT.as_millis())))
        }
        Some(ms) => Duration::from_millis(ms),
    };
    // Errors in the words of a request to any service (an unknown command is the caller's).
    let reply = ctx.request("", msg, timeout).await?;
    ok(message_json(&reply))
}

/// A message as the API shows it.
fn message_json(m: &Message) -> Value {
    let params: Map<String, Value> =
        m.params.iter().filter(|(k, _)| k.as_str() != TRACE_PARAM).map(|(k, v)| (k.clone(), json!(v))).collect();
    json!({
        "command": m.command,
        "from": {"server": m.from.server, "service": m.from.service},
        "params": params,
        "payload": String::from_utf8_lossy(&m.payload),
    })
}

// ---- apps ----

fn app_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() || !nodus_wire::valid_name(name) {
        return Err(ApiError::invalid(format!("{name:?} is not an app name ([A-Za-z0-9_.-]+)")));
    }
    Ok(())
}

fn apps_err(e: AdminError) -> ApiError {
    ApiError::from_admin(e, "apps")
}

pub(crate) async fn apps(State(s): S, c: C, t: T) -> ApiResult {
    let ctx = ctx(&s, c, t)?;
    let list = ctx.admin().apps_list().await.map_err(apps_err)?;
    ok(Value::Array(
        list.into_iter()
            .map(|a| json!({"name": a.name, "version": a.version, "status": a.status.as_str(), "workers": a.workers}))
            .collect(),
    ))
}

pub(crate) async fn app(State(s): S, c: C, t: T, Path(name): Path<String>) -> ApiResult {
    let ctx = ctx(&s, c, t)?;
    app_name(&name)?;
    let a = ctx.admin().app_info(&name).await.map_err(apps_err)?;
    let workers: Vec<Value> = a
        .workers
        .iter()
        .map(|w| json!({"uuid": w.uuid, "pid": w.pid, "state": w.state.to_ascii_lowercase(), "load": w.load}))
        .collect();
    ok(json!({
        "name": a.name,
        "version": a.version,
        "executable": a.executable,
        "dir": a.dir,
        "status": a.status.as_str(),
        "reason": a.reason,
        "queued": a.queued,
        "population": a.population,
        "sessions": a.sessions,
        "workers": workers,
    }))
}

fn deployed(d: nodus_client::admin::Deployed) -> Value {
    json!({"name": d.name, "version": d.version, "warning": d.warning})
}

/// `PUT /api/apps/{name}`: the body is the app as a `.tar.gz` (or `.tar`) archive.
pub(crate) async fn deploy(State(s): S, c: C, t: T, Path(name): Path<String>, body: Body) -> ApiResult {
    let ctx = ctx(&s, c, t)?;
    app_name(&name)?;
    // Ask the router first: a DEPLOY without a path is refused by the router when the caller may
    // not deploy (forbidden), and otherwise by the apps service as incomplete. Nothing is written
    // to disk for a caller who may not deploy.
    match ctx.request("apps", Message::new("DEPLOY").param("name", &name), REQUEST_TIMEOUT).await {
        Err(e) if e.code == "invalid" => {}
        Err(e) => return Err(e),
        Ok(_) => {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "bad_answer",
                "the apps service took a DEPLOY without a path",
            ))
        }
    }
    let _slot = ctx.api.upload_slots.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            format!("{MAX_UPLOADS} deploys are being uploaded already; retry later"),
        )
    })?;
    let upload = Upload::receive(&ctx.api, &name, body).await?;
    let result = ctx.admin().deploy(&name, &upload.path, None).await;
    drop(upload);
    let d = result.map_err(|e| match apps_err(e) {
        // The apps service's own failures of a deploy are about what was uploaded (not an
        // archive, no manifest, an executable missing or too large).
        e if e.code == "apps" => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "deploy_failed", e.message),
        e => e,
    })?;
    Ok((StatusCode::CREATED, Json(deployed(d))).into_response())
}

/// An uploaded archive on disk, removed when dropped.
struct Upload {
    path: PathBuf,
}

impl Upload {
    async fn receive(api: &Api, name: &str, body: Body) -> Result<Upload, ApiError> {
        let io = |e: std::io::Error| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "upload", format!("cannot store the upload: {e}"))
        };
        tokio::fs::create_dir_all(&api.uploads).await.map_err(io)?;
        let mut stream = body.into_data_stream();
        let first = match stream.next().await {
            Some(Ok(b)) => b,
            Some(Err(e)) => return Err(ApiError::invalid(format!("the upload could not be read: {e}"))),
            None => bytes::Bytes::new(),
        };
        if first.is_empty() {
            return Err(ApiError::invalid("the body must be the app as a .tar.gz (or .tar) archive; it is empty"));
        }
        let gzip = first.starts_with(&[0x1f, 0x8b]);
        let suffix: u64 = rand_suffix();
        let file = format!("{name}-{suffix:016x}{}", if gzip { ".tar.gz" } else { ".tar" });
        let upload = Upload { path: api.uploads.join(file) };
        let mut out = tokio::fs::File::create(&upload.path).await.map_err(io)?;
        let mut total = first.len() as u64;
        out.write_all(&first).await.map_err(io)?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ApiError::invalid(format!("the upload could not be read: {e}")))?;
            total += chunk.len() as u64;
            if total > api.max_upload_bytes {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("the upload is larger than {} bytes ([apps] max_deploy_bytes)", api.max_upload_bytes),
                ));
            }
            out.write_all(&chunk).await.map_err(io)?;
        }
        out.sync_all().await.map_err(io)?;
        Ok(upload)
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

// ---- tasks ----

/// Longest wait a caller may ask of `GET /api/tasks/{id}?wait_ms=` (the node's own bound).
const MAX_TASK_WAIT: Duration = Duration::from_secs(120);
/// Default page of `GET /api/tasks`.
const DEFAULT_TASK_PAGE: usize = 100;
/// Largest page of `GET /api/tasks` (the node's own bound).
const MAX_TASK_PAGE: usize = 1000;

fn tasks_err(e: AdminError) -> ApiError {
    ApiError::from_admin(e, "tasks")
}

fn task_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > 128 || !nodus_wire::valid_name(id) {
        return Err(ApiError::invalid(format!("{id:?} is not a task id ([A-Za-z0-9_.-]+, at most 128)")));
    }
    Ok(())
}

fn task_json(t: &nodus_client::admin::TaskInfo) -> Value {
    serde_json::to_value(t).unwrap_or(Value::Null)
}

/// `POST /api/tasks`: the body is a task spec (`procedure`, `args`, `key`, `timeout_ms`,
/// `max_attempts`, `pid`, `expires_at`).
pub(crate) async fn submit_task(
    State(s): S,
    c: C,
    t: T,
    body: Result<Json<TaskBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let ctx = ctx(&s, c, t)?;
    let Json(b) = body.map_err(|e| ApiError::invalid(e.body_text()))?;
    if b.procedure.is_empty() || b.procedure.len() > 255 || !nodus_wire::valid_name(&b.procedure) {
        return Err(ApiError::invalid("procedure must be APP.EVENT ([A-Za-z0-9_.-]+)"));
    }
    if b.key.as_deref().is_some_and(|k| k.is_empty() || k.len() > 255 || !nodus_wire::valid_name(k)) {
        return Err(ApiError::invalid("key must be 1 to 255 of [A-Za-z0-9_.-]"));
    }
    if let Some(pid) = b.pid.as_deref() {
        task_id(pid)?;
    }
    let spec = nodus_client::admin::TaskSpec {
        procedure: b.procedure,
        args: b.args,
        key: b.key,
        timeout_ms: b.timeout_ms,
        max_attempts: b.max_attempts,
        pid: b.pid,
        expires_at: b.expires_at,
    };
    let done = ctx.admin().task_submit(&spec).await.map_err(|e| {
        let mut e = tasks_err(e);
        if e.code == "expired" {
            // The deadline is past (the node refuses it on arrival): the request's fault, not
            // a gateway timeout.
            e.status = StatusCode::BAD_REQUEST;
        }
        e
    })?;
    let status = if done.existing { StatusCode::OK } else { StatusCode::CREATED };
    Ok((status, Json(json!({"id": done.id, "existing": done.existing}))).into_response())
}

/// The body of `POST /api/tasks`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TaskBody {
    procedure: String,
    #[serde(default)]
    args: Vec<Value>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    max_attempts: Option<u32>,
    /// The parent task: killing it kills this one.
    #[serde(default)]
    pid: Option<String>,
    /// Deadline, Unix ms: not started by then, the task never runs.
    #[serde(default)]
    expires_at: Option<i64>,
}

/// The query of `GET /api/tasks`.
#[derive(Debug, Deserialize)]
pub(crate) struct TaskQuery {
    status: Option<String>,
    procedure: Option<String>,
    parent: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

pub(crate) async fn tasks(
    State(s): S,
    c: C,
    t: T,
    q: Result<Query<TaskQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let ctx = ctx(&s, c, t)?;
    let Query(q) = q.map_err(|e| ApiError::invalid(e.body_text()))?;
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(s.parse().map_err(ApiError::invalid)?),
    };
    if q.procedure.as_deref().is_some_and(|p| p.is_empty() || !nodus_wire::valid_name(p)) {
        return Err(ApiError::invalid("procedure must be APP.EVENT ([A-Za-z0-9_.-]+)"));
    }
    if let Some(a) = q.after.as_deref() {
        task_id(a)?;
    }
    if let Some(p) = q.parent.as_deref() {
        task_id(p)?;
    }
    let limit = q.limit.unwrap_or(DEFAULT_TASK_PAGE);
    if limit == 0 || limit > MAX_TASK_PAGE {
        return Err(ApiError::invalid(format!("limit must be 1 to {MAX_TASK_PAGE}")));
    }
    let page = ctx
        .admin()
        .task_list(status, q.procedure.as_deref(), q.parent.as_deref(), q.after.as_deref(), limit)
        .await
        .map_err(tasks_err)?;
    ok(json!({"tasks": page.tasks.iter().map(task_json).collect::<Vec<_>>(), "next": page.next}))
}

/// The query of `GET /api/tasks/{id}`.
#[derive(Debug, Deserialize)]
pub(crate) struct WaitQuery {
    wait_ms: Option<u64>,
}

/// `GET /api/tasks/{id}`; with `wait_ms`, waits that long at most for it to finish.
pub(crate) async fn task(
    State(s): S,
    c: C,
    t: T,
    Path(id): Path<String>,
    q: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let ctx = ctx(&s, c, t)?;
    let Query(q) = q.map_err(|e| ApiError::invalid(e.body_text()))?;
    task_id(&id)?;
    let info = match q.wait_ms {
        None | Some(0) => ctx.admin().task_get(&id).await,
        Some(ms) if ms > MAX_TASK_WAIT.as_millis() as u64 => {
            return Err(ApiError::invalid(format!("wait_ms must be at most {}", MAX_TASK_WAIT.as_millis())))
        }
        Some(ms) => ctx.admin().task_wait(&id, Duration::from_millis(ms)).await,
    };
    ok(task_json(&info.map_err(tasks_err)?))
}

/// `POST /api/tasks/{id}/abort` (needs `admin`): its status before.
pub(crate) async fn abort_task(State(s): S, c: C, t: T, Path(id): Path<String>) -> ApiResult {
    let ctx = ctx(&s, c, t)?;
    task_id(&id)?;
    let before = ctx.admin().task_abort(&id).await.map_err(tasks_err)?;
    ok(json!({"id": id, "before": before.as_str()}))
}

pub(crate) async fn task_counts(State(s): S, c: C, t: T) -> ApiResult {
    let ctx = ctx(&s, c, t)?;
    let n = ctx.admin().task_counts().await.map_err(tasks_err)?;
    ok(serde_json::to_value(n).unwrap_or(Value::Null))
}

pub(crate) async fn task_stats(State(s): S, c: C, t: T) -> ApiResult {
    let ctx = ctx(&s, c, t)?;
    let n = ctx.admin().task_stats().await.map_err(tasks_err)?;
    ok(serde_json::to_value(n).unwrap_or(Value::Null))
}

// ---- control ----

/// Default wait of a monitoring or a kill.
const CONTROL_WAIT: Duration = Duration::from_secs(5);
/// Longest wait a caller may ask of a monitoring or a kill.
const MAX_CONTROL_WAIT: Duration = Duration::from_secs(60);

fn control_err(e: nodus_client::control::ControlError) -> ApiError {
    match e {
        nodus_client::control::ControlError::Client(c) => ApiError::from_client(&c, "control"),
        nodus_client::control::ControlError::Malformed(m) => ApiError::new(StatusCode::BAD_GATEWAY, "bad_answer", m),
    }
}

/// The query of `GET /api/control/tree`.
#[derive(Debug, Deserialize)]
pub(crate) struct TreeQuery {
    scope: Option<String>,
}

pub(crate) async fn tree(
    State(s): S,
    c: C,
    t: T,
    q: Result<Query<TreeQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let ctx = ctx(&s, c, t)?;
    let Query(q) = q.map_err(|e| ApiError::invalid(e.body_text()))?;
    let cluster = match q.scope.as_deref() {
        None | Some("node") => false,
        Some("cluster") => true,
        Some(other) => return Err(ApiError::invalid(format!("scope {other:?}: use node or cluster"))),
    };
    let l = ctx.admin().client().tree(cluster).await.map_err(control_err)?;
    let rows: Vec<Value> = l.rows.iter().map(|r| serde_json::to_value(r).unwrap_or(Value::Null)).collect();
    ok(json!({"components": rows, "missing": l.missing}))
}

/// The path and query of a monitoring or a kill: the component's node and id, how long to wait.
fn component(node: &str, id: &str, wait_ms: Option<u64>) -> Result<(nodus_control::ComponentId, Duration), ApiError> {
    if node.is_empty() || !nodus_wire::valid_name(node) {
        return Err(ApiError::invalid(format!("{node:?} is not a node name ([A-Za-z0-9_.-]+)")));
    }
    let id = id.parse().map_err(|_| ApiError::invalid(format!("{id:?} is not a component id (a decimal number)")))?;
    let wait = match wait_ms {
        None => CONTROL_WAIT,
        Some(ms) if ms == 0 || ms > MAX_CONTROL_WAIT.as_millis() as u64 => {
            return Err(ApiError::invalid(format!("wait_ms must be 1 to {}", MAX_CONTROL_WAIT.as_millis())))
        }
        Some(ms) => Duration::from_millis(ms),
    };
    Ok((id, wait))
}

/// `GET /api/control/{node}/{id}/monitor`: the component's own answer.
pub(crate) async fn monitor(
    State(s): S,
    c: C,
    t: T,
    Path((node, id)): Path<(String, String)>,
    q: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let ctx = ctx(&s, c, t)?;
    let Query(q) = q.map_err(|e| ApiError::invalid(e.body_text()))?;
    let (id, wait) = component(&node, &id, q.wait_ms)?;
    match ctx.admin().client().monitor(&node, id, wait).await.map_err(control_err)? {
        nodus_client::control::Monitored::Answered { result, creator, latency, .. } => ok(json!({
            "name": result.name,
            "host": result.host,
            "is_running": result.is_running,
            "message": result.message,
            "creator": creator,
            "latency_ms": u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
        })),
        nodus_client::control::Monitored::Failed { code, message } => Err(control_refusal(&code, message)),
    }
}

/// `POST /api/control/{node}/{id}/kill` (needs `admin`).
pub(crate) async fn kill(
    State(s): S,
    c: C,
    t: T,
    Path((node, id)): Path<(String, String)>,
    q: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let ctx = ctx(&s, c, t)?;
    let Query(q) = q.map_err(|e| ApiError::invalid(e.body_text()))?;
    let (id, wait) = component(&node, &id, q.wait_ms)?;
    match ctx.admin().client().kill(&node, id, wait).await.map_err(control_err)? {
        nodus_client::control::Killed::Done { stopped, unanswered } => ok(json!({
            "stopped": stopped,
            "unanswered": unanswered.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        })),
        nodus_client::control::Killed::Refused { code, message } => Err(control_refusal(&code, message)),
    }
}

/// A control refusal (the router's or the control service's) in HTTP.
fn control_refusal(code: &str, message: String) -> ApiError {
    match code {
        "unknown_server" => ApiError::new(StatusCode::NOT_FOUND, "unknown_node", message),
        "SERVICE_UNAVAILABLE" | "DROPPED" | "unreachable" | "cache_full" => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("the node's control service cannot be reached ({message})"),
        ),
        "unauthorized" => ApiError::new(StatusCode::UNAUTHORIZED, code, message),
        _ => ApiError::from_service(code, message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every operation of the document is routed: the router answers neither "no such route"
    /// nor "method not allowed" for it.
    #[tokio::test]
    async fn every_documented_operation_is_routed() {
        use tower::ServiceExt;
        let doc: Value = serde_json::from_str(OPENAPI_JSON).expect("openapi.json is JSON");
        assert_eq!(doc["openapi"], "3.0.3");
        let router = crate::Http::new(crate::HttpConfig::default(), Default::default()).router();
        let paths = doc["paths"].as_object().expect("paths");
        assert!(paths.len() >= 13, "{}", paths.len());
        for (path, item) in paths {
            let concrete = path.replace("{id}", "1").replace(['{', '}'], "");
            for method in item.as_object().unwrap().keys().filter(|m| *m != "parameters") {
                let req = crate::front::request_from(
                    "127.0.0.1:9",
                    axum::http::Request::builder().method(method.to_uppercase().as_str()).uri(&concrete),
                    Body::empty(),
                );
                let resp = router.clone().oneshot(req).await.unwrap();
                assert_ne!(resp.status(), StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
                let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
                let text = String::from_utf8_lossy(&body);
                assert!(!text.contains("no such route"), "{method} {path}: {text}");
            }
            for op in item.as_object().unwrap().values().filter(|v| v.get("responses").is_some()) {
                assert!(op["responses"].get("default").is_some(), "{path}: every error is documented");
            }
        }
    }

    #[test]
    fn node_refusals_map_to_stable_codes() {
        let e = ApiError::from_service("unknown_app", "no".into());
        assert_eq!((e.status, e.code.as_str()), (StatusCode::NOT_FOUND, "unknown_app"));
        let e = ApiError::from_service("bad_arguments", "no".into());
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        let e = ApiError::from_client(&NodeError::Timeout(Duration::from_secs(1)), "apps");
        assert_eq!((e.status, e.code.as_str()), (StatusCode::GATEWAY_TIMEOUT, "timeout"));
        let refusal = |m: Message| {
            let mut m = m;
            m.from = nodus_wire::Address::new("a", "node");
            NodeError::Refused(nodus_client::Refusal::from_reply(&m).unwrap())
        };
        let forbidden = refusal(Message::new("ERROR").param("code", "forbidden").param("message", "needs admin"));
        let e = ApiError::from_client(&forbidden, "apps");
        assert_eq!((e.status, e.code.as_str()), (StatusCode::FORBIDDEN, "forbidden"));
        let missing = refusal(Message::new("SERVICE_UNAVAILABLE").param("reason", "unavailable"));
        let e = ApiError::from_client(&missing, "apps");
        assert_eq!((e.status, e.code.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "not_available"));
        let e = ApiError::from_client(&missing, "echo");
        assert_eq!((e.status, e.code.as_str()), (StatusCode::NOT_FOUND, "unknown_service"));
        let unknown = refusal(Message::new("UNKNOWN").param("command", "CRASHLOG"));
        let e = ApiError::from_client(&unknown, "apps");
        assert_eq!((e.status, e.code.as_str()), (StatusCode::NOT_IMPLEMENTED, "not_implemented"));
    }
}

/// A random-enough file name part (the clock and a counter; names only need to differ).
fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.finish()
}

pub(crate) async fn remove_app(State(s): S, c: C, t: T, Path(name): Path<String>) -> ApiResult {
    let ctx = ctx(&s, c, t)?;
    app_name(&name)?;
    ctx.admin().remove_app(&name).await.map_err(apps_err)?;
    ok(json!({"name": name}))
}

pub(crate) async fn start_app(State(s): S, c: C, t: T, Path(name): Path<String>) -> ApiResult {
    let ctx = ctx(&s, c, t)?;
    app_name(&name)?;
    ok(deployed(ctx.admin().start_app(&name).await.map_err(apps_err)?))
}

pub(crate) async fn restart_app(State(s): S, c: C, t: T, Path(name): Path<String>) -> ApiResult {
    let ctx = ctx(&s, c, t)?;
    app_name(&name)?;
    ok(deployed(ctx.admin().restart_app(&name).await.map_err(apps_err)?))
}

pub(crate) async fn stop_app(State(s): S, c: C, t: T, Path(name): Path<String>) -> ApiResult {
    let ctx = ctx(&s, c, t)?;
    app_name(&name)?;
    ctx.admin().stop_app(&name).await.map_err(apps_err)?;
    ok(json!({"name": name}))
}

/// The body of `POST /api/apps/{name}/scale`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ScaleBody {
    workers: u32,
}

pub(crate) async fn scale_app(
    State(s): S,
    c: C,
    t: T,
    Path(name): Path<String>,
    body: Result<Json<ScaleBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let ctx = ctx(&s, c, t)?;
    app_name(&name)?;
    let Json(b) = body.map_err(|e| ApiError::invalid(e.body_text()))?;
    let r = ctx.admin().scale_app(&name, b.workers as usize).await.map_err(apps_err)?;
    ok(json!({"name": r.name, "workers": r.workers, "requested": r.requested, "capped_by": r.capped_by}))
}

pub(crate) async fn crashlog(State(s): S, c: C, t: T, Path(name): Path<String>) -> ApiResult {
    let ctx = ctx(&s, c, t)?;
    app_name(&name)?;
    let records = ctx.admin().crashlog(&name).await.map_err(apps_err)?;
    ok(Value::Array(
        records
            .into_iter()
            .map(|r| json!({"uuid": r.uuid, "at": r.at, "status": r.status, "failure": r.failure, "stderr": r.stderr}))
            .collect(),
    ))
}

// ---- flags (the node's `flags` service, communicatord's flags) ----

use nodus_control::flags::{FlagKey, FlagReply, FlagRequest, Raise};

fn flag_reply(reply: &Message) -> Result<FlagReply, ApiError> {
    FlagReply::from_message(reply).map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "bad_answer", e.to_string()))
}

fn flag_key(unit: &str, section: &str, name: &str) -> Result<FlagKey, ApiError> {
    FlagKey::new(unit, section, name).map_err(|e| ApiError::invalid(e.to_string()))
}

pub(crate) async fn flags(State(s): S, c: C, t: T) -> ApiResult {
    let ctx = ctx(&s, c, t)?;
    let reply = ctx.request("flags", FlagRequest::List.to_message(), REQUEST_TIMEOUT).await?;
    match flag_reply(&reply)? {
        FlagReply::List(list) => ok(serde_json::to_value(list).unwrap_or(Value::Null)),
        _ => Err(ApiError::new(StatusCode::BAD_GATEWAY, "bad_answer", "FLAG_LIST was not answered FLAGS")),
    }
}

/// The body of `PUT /api/flags/{unit}/{section}/{name}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RaiseBody {
    message: String,
    #[serde(default)]
    priority: Option<u8>,
    #[serde(default)]
    manual_down: bool,
    #[serde(default)]
    tags: Vec<String>,
}

pub(crate) async fn raise_flag(
    State(s): S,
    c: C,
    t: T,
    Path((unit, section, name)): Path<(String, String, String)>,
    body: Result<Json<RaiseBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let ctx = ctx(&s, c, t)?;
    let key = flag_key(&unit, &section, &name)?;
    let Json(b) = body.map_err(|e| ApiError::invalid(e.body_text()))?;
    let mut raise = Raise::new(key, b.message);
    if let Some(p) = b.priority {
        if p > 100 {
            return Err(ApiError::invalid("priority is 0 to 100"));
        }
        raise.priority = p;
    }
    raise.manual_down = b.manual_down;
    raise.tags = b.tags.into_iter().collect();
    let reply = ctx.request("flags", FlagRequest::Up(raise).to_message(), REQUEST_TIMEOUT).await?;
    match flag_reply(&reply)? {
        FlagReply::IsUp { count, new, .. } => {
            ok(json!({"unit": unit, "section": section, "name": name, "count": count, "new": new}))
        }
        _ => Err(ApiError::new(StatusCode::BAD_GATEWAY, "bad_answer", "FLAG_UP was not answered FLAG_IS_UP")),
    }
}

/// The query of `DELETE /api/flags/{unit}/{section}/{name}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LowerQuery {
    #[serde(default)]
    manual: bool,
}

pub(crate) async fn lower_flag(
    State(s): S,
    c: C,
    t: T,
    Path((unit, section, name)): Path<(String, String, String)>,
    q: Result<Query<LowerQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let ctx = ctx(&s, c, t)?;
    let key = flag_key(&unit, &section, &name)?;
    let Query(q) = q.map_err(|e| ApiError::invalid(e.body_text()))?;
    let request = if q.manual { FlagRequest::Clear(key) } else { FlagRequest::Down(key) };
    let reply = ctx.request("flags", request.to_message(), REQUEST_TIMEOUT).await?;
    match flag_reply(&reply)? {
        FlagReply::IsDown { lowered, .. } => {
            ok(json!({"unit": unit, "section": section, "name": name, "lowered": lowered}))
        }
        _ => Err(ApiError::new(StatusCode::BAD_GATEWAY, "bad_answer", "FLAG_DOWN was not answered FLAG_IS_DOWN")),
    }
}
