//! Typed rows of the node's list replies, with `Display`/`FromStr` for exactly the text the node
//! puts in a parameter today, so the node, the client SDK and the CLI share one definition:
//!
//! | row | where | text |
//! |---|---|---|
//! | [`AppRow`] | `apps` `LIST` → `APPS list=` | `name@version@status@workers` |
//! | [`WorkerRow`] | `apps` `INFO` → `APP_INFO workers=` | `uuid@pid@state@load` |
//! | [`NodeRow`] | `CLUSTER_INFO nodes=` | `server@addr@up` or `server@addr@down` |
//! | [`LinkRow`] | `CLUSTER_INFO links=` | `peer@rtt_ms@offset_ms@phi` (`-` for not measured yet) |
//! | [`ServiceAt`] | `LIST_SERVICES scope=cluster` → `SERVICES cluster=` | `server:service` |
//! | [`CrashRecord`] | `apps` `CRASHLOG` payload | `worker UUID at SECS: STATUS[ (FAILURE)]` + `    stderr` lines |
//!
//! Lists of rows are joined with `,` ([`parse_list`], [`join_list`]). Like the rest of the crate:
//! no I/O, and parsing is total (bad text is a [`RowError`], never a panic).

use std::fmt;
use std::str::FromStr;

/// A row's text does not have the expected shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {row} {text:?}: {why}")]
pub struct RowError {
    /// Which kind of row.
    pub row: &'static str,
    /// The text that did not parse.
    pub text: String,
    /// What is wrong with it.
    pub why: String,
}

impl RowError {
    fn new(row: &'static str, text: &str, why: impl Into<String>) -> Self {
        RowError { row, text: text.to_string(), why: why.into() }
    }
}

/// Splits `text` (a `,`-joined list, possibly empty) into rows.
///
/// Fails with the first row that does not parse.
pub fn parse_list<T: FromStr<Err = RowError>>(text: &str) -> Result<Vec<T>, RowError> {
    text.split(',').filter(|s| !s.is_empty()).map(str::parse).collect()
}

/// Joins rows with `,`, the inverse of [`parse_list`].
pub fn join_list<T: fmt::Display>(rows: &[T]) -> String {
    rows.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

/// Splits `text` at `@` into exactly `N` fields.
fn fields<'a, const N: usize>(row: &'static str, text: &'a str) -> Result<[&'a str; N], RowError> {
    let parts: Vec<&str> = text.split('@').collect();
    parts.try_into().map_err(|p: Vec<&str>| RowError::new(row, text, format!("{} fields, expected {N}", p.len())))
}

fn number<T: FromStr>(row: &'static str, text: &str, field: &str, value: &str) -> Result<T, RowError> {
    value.parse().map_err(|_| RowError::new(row, text, format!("{field} {value:?} is not a number")))
}

/// What state a deployed app is in, as the `apps` service words it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppStatus {
    /// Its workers run (or start on demand).
    Running,
    /// It failed `crash-limit` times in a row and is not restarted.
    Failed,
    /// Stopped by an operator, or not started.
    Stopped,
    /// A word this version does not know (a newer node).
    Other(String),
}

impl AppStatus {
    /// The wire word.
    pub fn as_str(&self) -> &str {
        match self {
            AppStatus::Running => "running",
            AppStatus::Failed => "failed",
            AppStatus::Stopped => "stopped",
            AppStatus::Other(s) => s,
        }
    }
}

impl fmt::Display for AppStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for AppStatus {
    fn from(s: &str) -> Self {
        match s {
            "running" => AppStatus::Running,
            "failed" => AppStatus::Failed,
            "stopped" => AppStatus::Stopped,
            other => AppStatus::Other(other.to_string()),
        }
    }
}

/// One app in `APPS list=`: `name@version@status@workers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppRow {
    /// App (and service) name.
    pub name: String,
    /// Deployed version, `v1`, `v2`, ... (empty when the node could not read it).
    pub version: String,
    /// Running, failed or stopped.
    pub status: AppStatus,
    /// Worker processes alive now.
    pub workers: usize,
}

impl fmt::Display for AppRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}@{}@{}", self.name, self.version, self.status, self.workers)
    }
}

impl FromStr for AppRow {
    type Err = RowError;

    fn from_str(s: &str) -> Result<Self, RowError> {
        let [name, version, status, workers] = fields::<4>("app row", s)?;
        Ok(AppRow {
            name: name.to_string(),
            version: version.to_string(),
            status: status.into(),
            workers: number("app row", s, "workers", workers)?,
        })
    }
}

/// One worker process in `APP_INFO workers=`: `uuid@pid@state@load`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRow {
    /// The uuid the engine gave it on its command line.
    pub uuid: String,
    /// Its process id.
    pub pid: u32,
    /// Lifecycle state as the engine names it (`Spawning`, `Handshaken`, `Active`,
    /// `Terminating`, ...).
    pub state: String,
    /// Sessions open on it.
    pub load: usize,
}

impl fmt::Display for WorkerRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}@{}@{}", self.uuid, self.pid, self.state, self.load)
    }
}

impl FromStr for WorkerRow {
    type Err = RowError;

    fn from_str(s: &str) -> Result<Self, RowError> {
        let [uuid, pid, state, load] = fields::<4>("worker row", s)?;
        Ok(WorkerRow {
            uuid: uuid.to_string(),
            pid: number("worker row", s, "pid", pid)?,
            state: state.to_string(),
            load: number("worker row", s, "load", load)?,
        })
    }
}

/// One known node in `CLUSTER_INFO nodes=`: `server@addr@up|down`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    /// The node's server name.
    pub server: String,
    /// The cluster address it advertises.
    pub addr: String,
    /// Reachable over live links right now.
    pub live: bool,
}

impl fmt::Display for NodeRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}@{}", self.server, self.addr, if self.live { "up" } else { "down" })
    }
}

impl FromStr for NodeRow {
    type Err = RowError;

    fn from_str(s: &str) -> Result<Self, RowError> {
        let [server, addr, state] = fields::<3>("node row", s)?;
        let live = match state {
            "up" => true,
            "down" => false,
            other => return Err(RowError::new("node row", s, format!("state {other:?} is neither up nor down"))),
        };
        Ok(NodeRow { server: server.to_string(), addr: addr.to_string(), live })
    }
}

/// One direct link in `CLUSTER_INFO links=`: `peer@rtt_ms@offset_ms@phi`.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkRow {
    /// The node at the other end.
    pub peer: String,
    /// Last measured round trip, ms (`None` before the first heartbeat answer).
    pub rtt_ms: Option<i64>,
    /// The peer's clock minus ours, ms (`None` before the first heartbeat answer).
    pub offset_ms: Option<i64>,
    /// The failure detector's suspicion right now.
    pub phi: f64,
}

impl fmt::Display for LinkRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = |v: Option<i64>| v.map_or("-".to_string(), |v| v.to_string());
        write!(f, "{}@{}@{}@{:.2}", self.peer, opt(self.rtt_ms), opt(self.offset_ms), self.phi)
    }
}

impl FromStr for LinkRow {
    type Err = RowError;

    fn from_str(s: &str) -> Result<Self, RowError> {
        let [peer, rtt, offset, phi] = fields::<4>("link row", s)?;
        let opt = |field: &str, v: &str| match v {
            "-" => Ok(None),
            v => number("link row", s, field, v).map(Some),
        };
        Ok(LinkRow {
            peer: peer.to_string(),
            rtt_ms: opt("rtt_ms", rtt)?,
            offset_ms: opt("offset_ms", offset)?,
            phi: number("link row", s, "phi", phi)?,
        })
    }
}

/// A service on a node, in `SERVICES cluster=`: `server:service`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceAt {
    /// The node.
    pub server: String,
    /// The service registered there.
    pub service: String,
}

impl fmt::Display for ServiceAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.server, self.service)
    }
}

impl FromStr for ServiceAt {
    type Err = RowError;

    fn from_str(s: &str) -> Result<Self, RowError> {
        let (server, service) =
            s.split_once(':').ok_or_else(|| RowError::new("service address", s, "expected server:service"))?;
        Ok(ServiceAt { server: server.to_string(), service: service.to_string() })
    }
}

/// One exited worker in an app's crashlog (the `CRASHLOG` payload):
///
/// ```text
/// worker UUID at UNIX_SECS: STATUS[ (FAILURE)]
///     stderr line
///     ...
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashRecord {
    /// The worker's uuid.
    pub uuid: String,
    /// When it exited, Unix seconds.
    pub at: u64,
    /// How it exited: `exit code N`, `killed by signal N`, `never started`, ...
    pub status: String,
    /// Why the engine counts it as failed, if it does.
    pub failure: Option<String>,
    /// Its last stderr lines.
    pub stderr: Vec<String>,
}

/// The lines of a crashlog text. Carriage returns at a line's end are part of its line ending,
/// as the engine treats its workers' stderr (it trims them), so no parsed field ends with one and
/// every record prints back (with `\n`) to text that parses to it.
fn crashlog_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().map(|l| l.trim_end_matches('\r'))
}

impl CrashRecord {
    /// Every record of a `CRASHLOG` payload.
    ///
    /// Fails on a line that is neither a record's first line nor an indented stderr line.
    pub fn parse_all(text: &str) -> Result<Vec<CrashRecord>, RowError> {
        let mut records: Vec<CrashRecord> = Vec::new();
        for line in crashlog_lines(text) {
            if let Some(stderr) = line.strip_prefix("    ") {
                match records.last_mut() {
                    Some(r) => r.stderr.push(stderr.to_string()),
                    None => return Err(RowError::new("crash record", line, "stderr line before any record")),
                }
            } else if !line.is_empty() {
                records.push(line.parse()?);
            }
        }
        Ok(records)
    }
}

impl fmt::Display for CrashRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "worker {} at {}: {}", self.uuid, self.at, self.status)?;
        if let Some(why) = &self.failure {
            write!(f, " ({why})")?;
        }
        writeln!(f)?;
        for line in &self.stderr {
            writeln!(f, "    {line}")?;
        }
        Ok(())
    }
}

impl FromStr for CrashRecord {
    type Err = RowError;

    /// Parses a record's first line (or a whole record with its stderr lines).
    fn from_str(s: &str) -> Result<Self, RowError> {
        let mut lines = crashlog_lines(s);
        let head = lines.next().unwrap_or("");
        let bad = |why: &str| RowError::new("crash record", head, why);
        let rest = head.strip_prefix("worker ").ok_or_else(|| bad("does not start with \"worker \""))?;
        let (uuid, rest) = rest.split_once(" at ").ok_or_else(|| bad("no \" at \""))?;
        let (at, rest) = rest.split_once(": ").ok_or_else(|| bad("no \": \" after the time"))?;
        let at = number("crash record", head, "time", at)?;
        // Exit statuses never contain " (": the first one starts the failure reason.
        let (status, failure) = match rest.split_once(" (") {
            Some((status, why)) => {
                let why = why.strip_suffix(')').ok_or_else(|| bad("unclosed failure reason"))?;
                (status, Some(why.to_string()))
            }
            None => (rest, None),
        };
        let mut stderr = Vec::new();
        for line in lines {
            stderr.push(
                line.strip_prefix("    ").ok_or_else(|| bad("stderr lines are indented by 4 spaces"))?.to_string(),
            );
        }
        Ok(CrashRecord { uuid: uuid.to_string(), at, status: status.to_string(), failure, stderr })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_rows_round_trip_the_apps_service_format() {
        // As apps.rs writes it: format!("{name}@{version}@{status}@{workers}").
        let text = "echo@v2@running@3,hello@v1@stopped@0,bad@@failed@0";
        let rows: Vec<AppRow> = parse_list(text).unwrap();
        assert_eq!(
            rows[0],
            AppRow { name: "echo".into(), version: "v2".into(), status: AppStatus::Running, workers: 3 }
        );
        assert_eq!(rows[2].status, AppStatus::Failed);
        assert_eq!(rows[2].version, "");
        assert_eq!(join_list(&rows), text);
        assert_eq!(parse_list::<AppRow>("").unwrap(), vec![]);
        assert!("echo@v1@running".parse::<AppRow>().is_err());
        assert!("echo@v1@running@many".parse::<AppRow>().unwrap_err().to_string().contains("workers"));
        assert_eq!("x@v1@starting@0".parse::<AppRow>().unwrap().status, AppStatus::Other("starting".into()));
    }

    #[test]
    fn worker_rows_round_trip_the_app_info_format() {
        // format!("{}@{}@{:?}@{}", w.uuid, w.pid, w.state, w.load)
        let text = "3f2a-11@4242@Active@2,3f2a-12@4243@Terminating@0";
        let rows: Vec<WorkerRow> = parse_list(text).unwrap();
        assert_eq!(rows[0], WorkerRow { uuid: "3f2a-11".into(), pid: 4242, state: "Active".into(), load: 2 });
        assert_eq!(join_list(&rows), text);
        assert!("u@-1@Active@0".parse::<WorkerRow>().is_err());
    }

    #[test]
    fn node_and_link_rows_round_trip_cluster_info() {
        // format!("{n}@{a}@{up|down}") and format!("{peer}@{rtt}@{off}@{:.2}", phi), `-` unmeasured.
        let nodes: Vec<NodeRow> = parse_list("a@127.0.0.1:4042@up,b@10.0.0.2:4042@down").unwrap();
        assert_eq!(nodes[1], NodeRow { server: "b".into(), addr: "10.0.0.2:4042".into(), live: false });
        assert_eq!(join_list(&nodes), "a@127.0.0.1:4042@up,b@10.0.0.2:4042@down");
        assert!("a@x@sideways".parse::<NodeRow>().is_err());
        let links: Vec<LinkRow> = parse_list("b@1@-3@0.42,c@-@-@0.00").unwrap();
        assert_eq!(links[0], LinkRow { peer: "b".into(), rtt_ms: Some(1), offset_ms: Some(-3), phi: 0.42 });
        assert_eq!((links[1].rtt_ms, links[1].offset_ms), (None, None));
        assert_eq!(join_list(&links), "b@1@-3@0.42,c@-@-@0.00");
        let inf: LinkRow = "d@5@0@inf".parse().unwrap();
        assert!(inf.phi.is_infinite());
    }

    #[test]
    fn service_addresses_round_trip() {
        let rows: Vec<ServiceAt> = parse_list("a:apps,b:images").unwrap();
        assert_eq!(rows[1], ServiceAt { server: "b".into(), service: "images".into() });
        assert_eq!(join_list(&rows), "a:apps,b:images");
        assert!("nocolon".parse::<ServiceAt>().is_err());
    }

    #[test]
    fn crash_records_round_trip_the_crashlog_payload() {
        let text = "worker u1 at 1700000000: exit code 3 (crashed: exit code 3)\n    boom\n    line two\n\
                    worker u2 at 1700000009: never started\n";
        let records = CrashRecord::parse_all(text).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].status, "exit code 3");
        assert_eq!(records[0].failure.as_deref(), Some("crashed: exit code 3"));
        assert_eq!(records[0].stderr, ["boom", "line two"]);
        assert_eq!((records[1].at, records[1].failure.as_ref()), (1_700_000_009, None));
        let again: String = records.iter().map(ToString::to_string).collect();
        assert_eq!(again, text);
        assert!(CrashRecord::parse_all("    orphan\n").is_err());
        // A carriage return ending a line is part of the line ending, even the last line's
        // (found by the rows fuzz target: a status ending in `\r` printed back without it).
        let crlf = CrashRecord::parse_all("worker u3 at 5: exit code 1\r\n    boom\r\r\n    last\r").unwrap();
        assert_eq!(crlf[0].status, "exit code 1");
        assert_eq!(crlf[0].stderr, ["boom", "last"]);
        let again: String = crlf.iter().map(ToString::to_string).collect();
        assert_eq!(CrashRecord::parse_all(&again).unwrap(), crlf);
        assert_eq!("worker u at 1: s\r".parse::<CrashRecord>().unwrap().status, "s");
        assert!(CrashRecord::parse_all("nonsense\n").is_err());
        assert_eq!(CrashRecord::parse_all("").unwrap(), vec![]);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A field as the node writes one: no `@`, `,` or line break.
        fn field() -> impl Strategy<Value = String> {
            "[A-Za-z0-9_.:-]{0,16}"
        }

        fn status() -> impl Strategy<Value = AppStatus> {
            prop_oneof![
                Just(AppStatus::Running),
                Just(AppStatus::Failed),
                Just(AppStatus::Stopped),
                "[a-z]{1,8}".prop_map(|s| AppStatus::from(s.as_str())),
            ]
        }

        fn same_text<T: fmt::Display + FromStr<Err = RowError>>(row: &T) -> Result<(), TestCaseError> {
            let text = row.to_string();
            let back: T = text.parse().map_err(|e: RowError| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(back.to_string(), text);
            Ok(())
        }

        proptest! {
            #[test]
            fn no_text_makes_a_row_parser_panic(text in any::<String>()) {
                let _ = parse_list::<AppRow>(&text);
                let _ = parse_list::<WorkerRow>(&text);
                let _ = parse_list::<NodeRow>(&text);
                let _ = parse_list::<LinkRow>(&text);
                let _ = parse_list::<ServiceAt>(&text);
                let _ = CrashRecord::parse_all(&text);
                let _ = text.parse::<CrashRecord>();
            }

            #[test]
            fn rows_survive_display_then_parse(
                name in field(), version in field(), status in status(), n in any::<usize>(),
                pid in any::<u32>(), live in any::<bool>(),
                rtt in proptest::option::of(any::<i64>()), offset in proptest::option::of(any::<i64>()),
                phi in 0.0f64..1e6,
            ) {
                let app = AppRow { name: name.clone(), version: version.clone(), status, workers: n };
                prop_assert_eq!(app.to_string().parse::<AppRow>().unwrap(), app);
                let worker = WorkerRow { uuid: name.clone(), pid, state: version.clone(), load: n };
                prop_assert_eq!(worker.to_string().parse::<WorkerRow>().unwrap(), worker);
                let node = NodeRow { server: name.clone(), addr: version.clone(), live };
                prop_assert_eq!(node.to_string().parse::<NodeRow>().unwrap(), node);
                // phi is printed with two decimals, as the node does: the text is what round-trips.
                same_text(&LinkRow { peer: name.clone(), rtt_ms: rtt, offset_ms: offset, phi })?;
                let rows = vec![AppRow { name: name.clone(), version: version.clone(), status: AppStatus::Running, workers: 1 }; 3];
                prop_assert_eq!(parse_list::<AppRow>(&join_list(&rows)).unwrap(), rows);
            }

            #[test]
            fn crash_records_survive_display_then_parse(
                uuid in "[a-f0-9-]{1,36}", at in any::<u64>(), status in "[a-z0-9 ]{1,20}",
                failure in proptest::option::of("[a-z0-9 :]{1,20}"),
                stderr in proptest::collection::vec("[ -~]{0,40}", 0..4),
            ) {
                // A status never contains " (" (the failure reason starts there).
                prop_assume!(!status.contains(" ("));
                let record = CrashRecord { uuid, at, status, failure, stderr };
                let text = record.to_string();
                prop_assert_eq!(CrashRecord::parse_all(&text).unwrap(), vec![record]);
            }
        }
    }
}
