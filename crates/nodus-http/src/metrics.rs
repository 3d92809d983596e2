//! Prometheus metrics: the HTTP side's own counters and histograms, gauges taken from the
//! node's [`Snapshot`] at scrape time, and a registry other parts of the node register into.
//!
//! Exposed at `/metrics` in the OpenMetrics text format (which Prometheus scrapes natively).
//! Every name starts with `nodus_`:
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `nodus_http_connections_total` | counter | | connections accepted |
//! | `nodus_http_connections_refused_total` | counter | `reason` (`limit`, `tls`) | connections closed at once |
//! | `nodus_http_open_connections` | gauge | | connections open now |
//! | `nodus_http_requests_total` | counter | `area` (`gateway`, `api`, `dashboard`, `metrics`), `code` | requests answered |
//! | `nodus_gateway_in_flight` | gauge | | gateway requests being served |
//! | `nodus_gateway_requests_total` | counter | `app` (empty when unknown), `code` | gateway requests by app and status |
//! | `nodus_gateway_invoke_latency_seconds` | histogram | `app` | from request to the worker's response head |
//! | `nodus_gateway_request_bytes_total` | counter | | request body bytes sent to workers |
//! | `nodus_gateway_response_bytes_total` | counter | | response body bytes sent to clients |
//! | `nodus_cluster_nodes` | gauge | `state` (`live`, `down`) | known nodes |
//! | `nodus_cluster_links_up` | gauge | | links up |
//! | `nodus_cluster_quorum` | gauge | | 1 when the cluster has quorum |
//! | `nodus_cluster_clock_stable` | gauge | | 1 when the clock is stable |
//! | `nodus_services` | gauge | | registered services |
//! | `nodus_app_workers` | gauge | `app`, `state` | worker processes by state |
//! | `nodus_app_queued` | gauge | `app` | requests waiting for a worker |
//! | `nodus_app_sessions` | gauge | `app` | open sessions |
//! | `nodus_tasks` | gauge | `status` | tasks by status (on a node that runs tasks) |
//! | `nodus_tasks_completed_total` | counter | | tasks finished (done or failed) since the node started (idem) |
//! | `nodus_tasks_submitted_total`, `nodus_tasks_done_total`, `nodus_tasks_failed_total` | counter | | the task service's `STATS` (idem) |
//! | `nodus_task_latency_seconds` | histogram | | from submission to the final record (done or failed), tasks this node recorded (idem) |
//! | `nodus_flags_raised` | gauge | | flags raised (on a node that runs the flags service) |

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::view::Snapshot;

/// The content type of `/metrics`.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Which part of the listener answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Area {
    /// The gateway to apps.
    Gateway,
    /// `/api/...`.
    Api,
    /// `/` and `/ui/...`.
    Dashboard,
    /// `/metrics`.
    Metrics,
}

impl Area {
    fn as_str(self) -> &'static str {
        match self {
            Area::Gateway => "gateway",
            Area::Api => "api",
            Area::Dashboard => "dashboard",
            Area::Metrics => "metrics",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AreaCode {
    area: &'static str,
    code: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppCode {
    app: String,
    code: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppLabel {
    app: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppState {
    app: String,
    state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs .. ~105 s, doubling.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 22))
}

/// The node's metrics registry and the HTTP side's own metrics. Other parts of the node add
/// theirs with [`Metrics::register`].
pub struct Metrics {
    registry: Mutex<Registry>,
    connections: Counter,
    refused: Family<Reason, Counter>,
    open: Gauge,
    requests: Family<AreaCode, Counter>,
    in_flight: Gauge,
    gateway_requests: Family<AppCode, Counter>,
    invoke_latency: HistogramFamily<AppLabel>,
    request_bytes: Counter,
    response_bytes: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A registry holding the HTTP side's metrics.
    pub fn new() -> Metrics {
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            connections: Counter::default(),
            refused: Family::default(),
            open: Gauge::default(),
            requests: Family::default(),
            in_flight: Gauge::default(),
            gateway_requests: Family::default(),
            invoke_latency: HistogramFamily::new_with_constructor(latency_histogram),
            request_bytes: Counter::default(),
            response_bytes: Counter::default(),
        };
        m.register(|r| {
            r.register("nodus_http_connections", "HTTP connections accepted", m.connections.clone());
            r.register("nodus_http_connections_refused", "HTTP connections closed at once", m.refused.clone());
            r.register("nodus_http_open_connections", "HTTP connections open now", m.open.clone());
            r.register("nodus_http_requests", "HTTP requests answered, by area and status", m.requests.clone());
            r.register("nodus_gateway_in_flight", "Gateway requests being served", m.in_flight.clone());
            r.register("nodus_gateway_requests", "Gateway requests by app and status", m.gateway_requests.clone());
            r.register_with_unit(
                "nodus_gateway_invoke_latency",
                "Time from a gateway request to the worker's response head",
                Unit::Seconds,
                m.invoke_latency.clone(),
            );
            r.register_with_unit(
                "nodus_gateway_request",
                "Request body bytes sent to workers",
                Unit::Bytes,
                m.request_bytes.clone(),
            );
            r.register_with_unit(
                "nodus_gateway_response",
                "Response body bytes sent to clients",
                Unit::Bytes,
                m.response_bytes.clone(),
            );
        });
        m
    }

    /// Registers metrics of another part of the node (names must start with `nodus_`).
    pub fn register(&self, f: impl FnOnce(&mut Registry)) {
        f(&mut self.registry.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// The exposition: every registered metric, then the gauges of `snapshot` when given.
    pub fn render(&self, snapshot: Option<&Snapshot>) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail; the results are fmt::Result only by signature.
        let _ = encode_registry(&mut out, &self.registry.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(s) = snapshot {
            let _ = encode_registry(&mut out, &snapshot_registry(s));
        }
        let _ = encode_eof(&mut out);
        out
    }

    pub(crate) fn connection_opened(&self) {
        self.connections.inc();
        self.open.inc();
    }

    pub(crate) fn connection_closed(&self) {
        self.open.dec();
    }

    pub(crate) fn connection_refused(&self, reason: &'static str) {
        self.refused.get_or_create(&Reason { reason }).inc();
    }

    pub(crate) fn request(&self, area: Area, code: u16) {
        self.requests.get_or_create(&AreaCode { area: area.as_str(), code }).inc();
    }

    pub(crate) fn gateway_started(&self) {
        self.in_flight.inc();
    }

    pub(crate) fn gateway_finished(&self) {
        self.in_flight.dec();
    }

    pub(crate) fn gateway_answered(&self, app: &str, code: u16) {
        self.gateway_requests.get_or_create(&AppCode { app: app.to_string(), code }).inc();
    }

    pub(crate) fn invoke_latency(&self, app: &str, took: Duration) {
        self.invoke_latency.get_or_create(&AppLabel { app: app.to_string() }).observe(took.as_secs_f64());
    }

    pub(crate) fn request_bytes(&self, n: usize) {
        self.request_bytes.inc_by(n as u64);
    }

    pub(crate) fn response_bytes(&self, n: usize) {
        self.response_bytes.inc_by(n as u64);
    }
}

/// The gauges of one snapshot, in a registry of their own (built per scrape).
fn snapshot_registry(s: &Snapshot) -> Registry {
    let mut r = Registry::default();
    let gauge = |v: i64| {
        let g: Gauge = Gauge::default();
        g.set(v);
        g
    };
    let nodes: Family<StateLabel, Gauge> = Family::default();
    let live = s.cluster.nodes.iter().filter(|n| n.live).count() as i64;
    nodes.get_or_create(&StateLabel { state: "live" }).set(live);
    nodes.get_or_create(&StateLabel { state: "down" }).set(s.cluster.nodes.len() as i64 - live);
    r.register("nodus_cluster_nodes", "Known cluster nodes by state", nodes);
    let links = s.cluster.links.iter().filter(|l| l.up).count() as i64;
    r.register("nodus_cluster_links_up", "Cluster links up", gauge(links));
    r.register("nodus_cluster_quorum", "1 when the cluster has quorum", gauge(i64::from(s.cluster.quorum.up)));
    r.register(
        "nodus_cluster_clock_stable",
        "1 when the cluster clock is stable",
        gauge(i64::from(s.cluster.clock.stable)),
    );
    r.register("nodus_services", "Registered services", gauge(s.services.len() as i64));
    let workers: Family<AppState, Gauge> = Family::default();
    let queued: Family<AppLabel, Gauge> = Family::default();
    let sessions: Family<AppLabel, Gauge> = Family::default();
    for app in &s.apps {
        let label = AppLabel { app: app.name.clone() };
        queued.get_or_create(&label).set(i64::from(app.queued));
        sessions.get_or_create(&label).set(i64::from(app.sessions));
        for w in &app.workers {
            workers.get_or_create(&AppState { app: app.name.clone(), state: w.state.clone() }).inc();
        }
    }
    r.register("nodus_app_workers", "Worker processes by app and state", workers);
    r.register("nodus_app_queued", "Requests waiting for a worker, by app", queued);
    r.register("nodus_app_sessions", "Open sessions, by app", sessions);
    // Tasks and flags only on a node that runs them.
    if let Some(t) = &s.tasks {
        let tasks: Family<StatusLabel, Gauge> = Family::default();
        for (status, n) in &t.by_status {
            tasks.get_or_create(&StatusLabel { status: status.clone() }).set(*n as i64);
        }
        r.register("nodus_tasks", "Tasks by status", tasks);
        for (name, help, n) in [
            ("nodus_tasks_completed", "Tasks finished (done or failed) since the node started", t.completed_total),
            ("nodus_tasks_submitted", "Tasks submitted since the node started", t.submitted_total),
            ("nodus_tasks_done", "Tasks done since the node started", t.done_total),
            ("nodus_tasks_failed", "Tasks failed since the node started", t.failed_total),
        ] {
            let c: Counter = Counter::default();
            c.inc_by(n);
            r.register(name, help, c);
        }
        if let Some(h) = LatencyHistogram::of(&t.latency) {
            r.register_with_unit(
                "nodus_task_latency",
                "Tasks from submission to their final record (done or failed)",
                Unit::Seconds,
                h,
            );
        }
    }
    if let Some(flags) = &s.flags {
        r.register("nodus_flags_raised", "Flags raised", gauge(flags.len() as i64));
    }
    r
}

/// A histogram already counted elsewhere (the task service's), encoded as one.
#[derive(Debug)]
struct LatencyHistogram {
    /// `(upper bound in seconds, count in the bucket)`, the last bound infinite (`+Inf`).
    buckets: Vec<(f64, u64)>,
    sum: f64,
    count: u64,
}

impl LatencyHistogram {
    /// The histogram of `l`, if it has one (a node of an older version sends none).
    fn of(l: &crate::view::TaskLatency) -> Option<LatencyHistogram> {
        if l.counts.len() != l.le_ms.len() + 1 {
            return None;
        }
        let bounds = l.le_ms.iter().map(|ms| *ms as f64 / 1000.0).chain(std::iter::once(f64::INFINITY));
        let buckets: Vec<(f64, u64)> = bounds.zip(l.counts.iter().copied()).collect();
        let count = l.counts.iter().sum();
        Some(LatencyHistogram { buckets, sum: l.sum_ms as f64 / 1000.0, count })
    }
}

impl prometheus_client::encoding::EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: prometheus_client::encoding::MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::{AppRow, NodeRow, WorkerRow};

    /// `name{labels} value` lines of an exposition, without comments.
    fn samples(text: &str) -> Vec<(String, f64)> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (name, value) = l.rsplit_once(' ').expect("sample line");
                (name.to_string(), value.parse().expect("number"))
            })
            .collect()
    }

    fn value(text: &str, name: &str) -> Option<f64> {
        samples(text).into_iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    #[test]
    fn renders_counters_that_move() {
        let m = Metrics::new();
        m.request(Area::Gateway, 200);
        m.gateway_answered("echo", 200);
        m.invoke_latency("echo", Duration::from_millis(3));
        let before = m.render(None);
        assert!(before.ends_with("# EOF\n"), "{before}");
        assert_eq!(value(&before, r#"nodus_http_requests_total{area="gateway",code="200"}"#), Some(1.0));
        assert_eq!(value(&before, r#"nodus_gateway_requests_total{app="echo",code="200"}"#), Some(1.0));
        assert_eq!(value(&before, r#"nodus_gateway_invoke_latency_seconds_count{app="echo"}"#), Some(1.0));
        m.request(Area::Gateway, 200);
        let after = m.render(None);
        assert_eq!(value(&after, r#"nodus_http_requests_total{area="gateway",code="200"}"#), Some(2.0));
        for (name, _) in samples(&after) {
            assert!(name.starts_with("nodus_"), "{name}");
        }
    }

    #[test]
    fn renders_gauges_of_a_snapshot() {
        let mut s = Snapshot::default();
        s.cluster.nodes = vec![
            NodeRow { name: "a".into(), live: true, ..Default::default() },
            NodeRow { name: "b".into(), live: false, ..Default::default() },
        ];
        s.cluster.quorum.up = true;
        let worker = |state: &str| WorkerRow { state: state.into(), ..Default::default() };
        s.apps = vec![AppRow {
            name: "echo".into(),
            queued: 3,
            workers: vec![worker("active"), worker("active"), worker("spawning")],
            ..Default::default()
        }];
        let text = Metrics::new().render(Some(&s));
        assert_eq!(value(&text, "nodus_tasks_completed_total"), None, "no tasks on this node: no task metrics");
        let mut counts = crate::view::TaskCounts::default();
        counts.by_status.insert("done".into(), 7);
        counts.completed_total = 9;
        counts.submitted_total = 12;
        counts.failed_total = 2;
        counts.latency = crate::view::TaskLatency { le_ms: vec![1, 10, 100], counts: vec![2, 5, 0, 2], sum_ms: 1_234 };
        s.tasks = Some(counts);
        let text = Metrics::new().render(Some(&s));
        assert_eq!(value(&text, r#"nodus_cluster_nodes{state="live"}"#), Some(1.0));
        assert_eq!(value(&text, r#"nodus_cluster_nodes{state="down"}"#), Some(1.0));
        assert_eq!(value(&text, "nodus_cluster_quorum"), Some(1.0));
        assert_eq!(value(&text, r#"nodus_app_workers{app="echo",state="active"}"#), Some(2.0));
        assert_eq!(value(&text, r#"nodus_app_queued{app="echo"}"#), Some(3.0));
        assert_eq!(value(&text, r#"nodus_tasks{status="done"}"#), Some(7.0));
        assert_eq!(value(&text, "nodus_tasks_completed_total"), Some(9.0));
        assert_eq!(value(&text, "nodus_tasks_submitted_total"), Some(12.0));
        assert_eq!(value(&text, "nodus_tasks_failed_total"), Some(2.0));
        // The task service's histogram, cumulative as Prometheus has it.
        assert!(text.contains("# TYPE nodus_task_latency_seconds histogram"), "{text}");
        assert_eq!(value(&text, r#"nodus_task_latency_seconds_bucket{le="0.001"}"#), Some(2.0), "{text}");
        assert_eq!(value(&text, r#"nodus_task_latency_seconds_bucket{le="0.01"}"#), Some(7.0), "{text}");
        assert_eq!(value(&text, r#"nodus_task_latency_seconds_bucket{le="0.1"}"#), Some(7.0), "{text}");
        assert_eq!(value(&text, r#"nodus_task_latency_seconds_bucket{le="+Inf"}"#), Some(9.0), "{text}");
        assert_eq!(value(&text, "nodus_task_latency_seconds_count"), Some(9.0), "{text}");
        assert_eq!(value(&text, "nodus_task_latency_seconds_sum"), Some(1.234), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1);
    }
}
