//! Typed calls of a node's built-in `tasks` service: submit, run, wait for, read, list, abort
//! and watch tasks. Tasks travel as JSON (one object per task); these types are what the node
//! sends, decoded once.

use super::{expect, param, Admin, AdminError};
use nodus_wire::Message;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::Duration;

/// How long a `tasks` request other than a wait may take.
pub const TASKS_TIMEOUT: Duration = Duration::from_secs(30);
/// Margin given to a request that waits on the node for `d` (the node answers at the end of
/// its wait; the reply still has to travel).
const WAIT_MARGIN: Duration = Duration::from_secs(10);

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    /// Stored, waiting to run.
    Pending,
    /// An attempt runs it.
    Running,
    /// Finished with a result.
    Done,
    /// Finished with an error (the procedure failed, timed out, or its workers kept failing).
    Error,
    /// Stopped before it finished (aborted).
    Interrupted,
}

impl TaskStatus {
    /// The word on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::Running => "running",
            TaskStatus::Done => "done",
            TaskStatus::Error => "error",
            TaskStatus::Interrupted => "interrupted",
        }
    }

    /// Whether nothing will change it any more.
    pub fn is_final(self) -> bool {
        matches!(self, TaskStatus::Done | TaskStatus::Error | TaskStatus::Interrupted)
    }
}

impl std::fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TaskStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<TaskStatus, String> {
        [TaskStatus::Pending, TaskStatus::Running, TaskStatus::Done, TaskStatus::Error, TaskStatus::Interrupted]
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| format!("unknown status {s:?}; use pending, running, done, error or interrupted"))
    }
}

/// Why a task failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskFailure {
    /// `RunningError` (the procedure failed), `TimedOut`, `WorkerFailed`, `Aborted` (killed), or
    /// `Expired` (its deadline passed before it started: it never ran).
    pub kind: String,
    /// What happened (for `RunningError`, the worker's own message).
    pub message: String,
}

impl std::fmt::Display for TaskFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.kind == "RunningError" {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.kind, self.message)
        }
    }
}

/// A task as the node describes it. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskInfo {
    /// Its id.
    pub id: String,
    /// `APP.EVENT`.
    #[serde(default)]
    pub procedure: String,
    /// Where it is.
    pub status: TaskStatus,
    /// Attempts started so far.
    #[serde(default)]
    pub attempt: u32,
    /// Most attempts when its worker fails.
    #[serde(default)]
    pub max_attempts: u32,
    /// Longest an attempt may run, ms.
    #[serde(default)]
    pub timeout_ms: u64,
    /// The node whose attempt holds it, while it runs.
    #[serde(default)]
    pub owner: Option<String>,
    /// The task that submitted it.
    #[serde(default)]
    pub parent: Option<String>,
    /// Its idempotency key.
    #[serde(default)]
    pub key: Option<String>,
    /// Submitted at.
    #[serde(default)]
    pub created_at: u64,
    /// Its latest attempt started at.
    #[serde(default)]
    pub started_at: Option<u64>,
    /// Finished at.
    #[serde(default)]
    pub finished_at: Option<u64>,
    /// When the finished task is forgotten.
    #[serde(default)]
    pub expires_at: Option<u64>,
    /// Its arguments (in `GET`, `WAIT` and `TASK` answers, not in lists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    /// The result of a done task (`None` also for a `null` result).
    #[serde(default)]
    pub result: Option<Value>,
    /// Why it failed, or why its last attempt did.
    #[serde(default)]
    pub error: Option<TaskFailure>,
    /// The latest time (Unix ms) it may start, when it has a deadline.
    #[serde(default)]
    pub deadline: Option<u64>,
}

impl TaskInfo {
    fn from_reply(m: &Message) -> Result<TaskInfo, AdminError> {
        serde_json::from_slice(&m.payload).map_err(|e| AdminError::Malformed(format!("TASK payload: {e}")))
    }
}

/// A task to submit.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TaskSpec {
    /// `APP.EVENT`.
    pub procedure: String,
    /// Positional arguments.
    #[serde(default)]
    pub args: Vec<Value>,
    /// Idempotency key: the same key again returns the existing task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Longest an attempt may run, ms (default: the node's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Most attempts when its worker fails (default: the node's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// The parent task (this one is its subtask: killing the parent kills it). A procedure
    /// submitting subtasks passes its own task id here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<String>,
    /// The task's deadline, Unix ms: not started by then, it never runs (it ends `error`, kind
    /// `Expired`). Sent as the message's `_expires_at`; already past, the node refuses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
}

impl TaskSpec {
    /// `procedure` with `args` and the node's defaults.
    pub fn new(procedure: impl Into<String>, args: Vec<Value>) -> TaskSpec {
        TaskSpec { procedure: procedure.into(), args, ..TaskSpec::default() }
    }

    /// The same with a deadline `d` from now (this host's clock): not started by then, the task
    /// never runs.
    pub fn expires_in(mut self, d: Duration) -> TaskSpec {
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        self.expires_at = Some(crate::connection::now_ms().saturating_add(ms));
        self
    }

    fn message(&self, command: &str) -> Message {
        let args = serde_json::to_vec(&self.args).expect("JSON values serialize");
        let mut m = Message::new(command).to("tasks").param("procedure", &self.procedure).with_payload(args);
        if let Some(k) = &self.key {
            m = m.param("key", k);
        }
        if let Some(t) = self.timeout_ms {
            m = m.param("timeout_ms", t);
        }
        if let Some(n) = self.max_attempts {
            m = m.param("max_attempts", n);
        }
        if let Some(p) = &self.pid {
            m = m.param("pid", p);
        }
        if let Some(e) = self.expires_at {
            m.envelope.expires_at = e;
        }
        m
    }
}

/// A submission the node accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSubmitted {
    /// The task's id (the existing task's, for a key submitted before).
    pub id: String,
    /// The key matched an existing task: nothing new was stored.
    pub existing: bool,
}

/// A submission of a `SUBMIT_MANY` the node refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRefusal {
    /// What was wrong.
    pub error: String,
    /// `unknown_procedure`, `bad_arguments`, `invalid` or `unavailable`.
    pub code: String,
    /// The arpcp code (203, 204, 200, 300).
    pub arpcp: u16,
}

/// A procedure the node runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcedureInfo {
    /// `APP.EVENT`.
    pub name: String,
    /// The app.
    pub app: String,
    /// Its event.
    pub event: String,
    /// Its parameters, `name` or `name:type`.
    pub params: Vec<String>,
    /// `procs.add(a: number, b: number)`.
    pub signature: String,
}

/// How many tasks the node's store holds by status (finished ones until they expire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TaskCounts {
    /// Pending tasks.
    pub pending: u64,
    /// Running tasks.
    pub running: u64,
    /// Done tasks.
    pub done: u64,
    /// Failed tasks.
    pub error: u64,
    /// Interrupted tasks.
    pub interrupted: u64,
}

/// How long tasks took from submission to their final record, as a histogram.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TaskLatency {
    /// Upper bounds of the buckets, ms; one more bucket (no bound) holds the rest.
    pub le_ms: Vec<u64>,
    /// Tasks per bucket (not cumulative): `le_ms.len() + 1` counts, or none from an older node.
    pub counts: Vec<u64>,
    /// The sum of all latencies, ms.
    pub sum_ms: u64,
}

/// What the node's task service did since the node started (counters; no store access).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TaskStats {
    /// Tasks stored.
    pub submitted: u64,
    /// Attempts started.
    pub started: u64,
    /// Completions recorded done.
    pub done: u64,
    /// Tasks recorded failed.
    pub failed: u64,
    /// Attempts retried after their worker failed.
    pub retried: u64,
    /// Attempts that never ran (full queue, stopped app) and went back to the store.
    pub released: u64,
    /// Late completions discarded (their attempt was no longer the task's).
    pub stale: u64,
    /// Records written again after a store failure.
    pub record_retries: u64,
    /// Pending tasks finished as expired (their deadline passed before they started).
    #[serde(default)]
    pub expired: u64,
    /// Submission to final record of the tasks this node recorded done or failed.
    #[serde(default)]
    pub latency: TaskLatency,
}

/// A page of tasks.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TaskPage {
    /// The tasks, oldest first (without arguments and results).
    pub tasks: Vec<TaskInfo>,
    /// Pass as `after` for the next page; `None` on the last.
    pub next: Option<String>,
}

/// A status change (`TASK_STATUS`), as a watcher or a notified service receives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskChange {
    /// The task.
    pub id: String,
    /// Its procedure.
    pub procedure: String,
    /// Its new status, or `deleted`.
    pub status: String,
    /// Its attempt (0 before the first).
    pub attempt: u32,
}

impl TaskChange {
    /// The change a `TASK_STATUS` message carries; `None` for any other message.
    pub fn from_message(m: &Message) -> Option<TaskChange> {
        (m.command == "TASK_STATUS").then(|| TaskChange {
            id: m.get("id").unwrap_or("").to_string(),
            procedure: m.get("procedure").unwrap_or("").to_string(),
            status: m.get("status").unwrap_or("").to_string(),
            attempt: m.get("attempt").and_then(|a| a.parse().ok()).unwrap_or(0),
        })
    }
}

impl Admin {
    async fn tasks(&self, req: Message, want: &str, timeout: Duration) -> Result<Message, AdminError> {
        let asked = req.command.clone();
        let reply = self.client.request_with_timeout(req.to("tasks"), timeout).await?;
        expect(reply, &asked, &[want])
    }

    /// Runs a task and waits until it finished (its timeout plus the node's grace, or
    /// `wait`, whichever ends first on this side). A failed task is a [`TaskInfo`] with status
    /// `error` or `interrupted`, not an error.
    ///
    /// Fails as described in the module docs; `code=unknown_procedure`, `bad_arguments`,
    /// `invalid` or `unavailable` when the node refused it.
    pub async fn task_run(&self, spec: &TaskSpec, wait: Duration) -> Result<TaskInfo, AdminError> {
        TaskInfo::from_reply(&self.tasks(spec.message("TASK"), "TASK", wait).await?)
    }

    /// Stores a task; answers once it is durable.
    ///
    /// Fails as [`Admin::task_run`] does.
    pub async fn task_submit(&self, spec: &TaskSpec) -> Result<TaskSubmitted, AdminError> {
        let m = self.tasks(spec.message("ATASK"), "SUBMITTED", TASKS_TIMEOUT).await?;
        Ok(TaskSubmitted { id: super::text(&m, "id"), existing: param(&m, "existing")? })
    }

    /// Stores many tasks at once (at most 10 000): one outcome per spec, in order.
    ///
    /// Fails as described in the module docs (then nothing was stored).
    pub async fn task_submit_many(
        &self,
        specs: &[TaskSpec],
    ) -> Result<Vec<Result<TaskSubmitted, TaskRefusal>>, AdminError> {
        let mut body = Vec::new();
        for s in specs {
            serde_json::to_writer(&mut body, s).expect("JSON values serialize");
            body.push(b'\n');
        }
        let m = self.tasks(Message::new("SUBMIT_MANY").with_payload(body), "SUBMITTED_MANY", TASKS_TIMEOUT).await?;
        let text = std::str::from_utf8(&m.payload).map_err(|e| AdminError::Malformed(e.to_string()))?;
        let mut out = Vec::with_capacity(specs.len());
        for line in text.lines().filter(|l| !l.is_empty()) {
            let v: Value = serde_json::from_str(line).map_err(|e| AdminError::Malformed(e.to_string()))?;
            let outcome = if v.get("error").is_some() {
                Err(serde_json::from_value(v).map_err(|e| AdminError::Malformed(e.to_string()))?)
            } else {
                Ok(serde_json::from_value(v).map_err(|e| AdminError::Malformed(e.to_string()))?)
            };
            out.push(outcome);
        }
        if out.len() != specs.len() {
            return Err(AdminError::Malformed(format!("{} outcomes for {} tasks", out.len(), specs.len())));
        }
        Ok(out)
    }

    /// One task, with its arguments and result.
    ///
    /// Fails as described in the module docs; `code=unknown_task` for an unknown, deleted or
    /// expired id.
    pub async fn task_get(&self, id: &str) -> Result<TaskInfo, AdminError> {
        TaskInfo::from_reply(&self.tasks(Message::new("GET").param("id", id), "TASK", TASKS_TIMEOUT).await?)
    }

    /// Waits up to `timeout` (at most 2 minutes on the node) for a task to finish; returns it
    /// as it is then (check [`TaskStatus::is_final`]).
    ///
    /// Fails as [`Admin::task_get`] does.
    pub async fn task_wait(&self, id: &str, timeout: Duration) -> Result<TaskInfo, AdminError> {
        let req = Message::new("WAIT").param("id", id).param("timeout_ms", timeout.as_millis());
        TaskInfo::from_reply(&self.tasks(req, "TASK", timeout + WAIT_MARGIN).await?)
    }

    /// A page of tasks (oldest first), of one status, procedure or parent task (the subtasks
    /// of `parent`) when given; `after` is the previous page's `next`; `limit` 1 to 1000.
    ///
    /// Fails as described in the module docs.
    pub async fn task_list(
        &self,
        status: Option<TaskStatus>,
        procedure: Option<&str>,
        parent: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<TaskPage, AdminError> {
        let mut req = Message::new("LIST").param("limit", limit);
        if let Some(s) = status {
            req = req.param("status", s);
        }
        if let Some(p) = procedure {
            req = req.param("procedure", p);
        }
        if let Some(p) = parent {
            req = req.param("parent", p);
        }
        if let Some(a) = after {
            req = req.param("after", a);
        }
        let m = self.tasks(req, "TASKS", TASKS_TIMEOUT).await?;
        let text = std::str::from_utf8(&m.payload).map_err(|e| AdminError::Malformed(e.to_string()))?;
        let tasks = text
            .lines()
            .filter(|l| !l.is_empty())
            .map(serde_json::from_str)
            .collect::<Result<Vec<TaskInfo>, _>>()
            .map_err(|e| AdminError::Malformed(format!("TASKS payload: {e}")))?;
        Ok(TaskPage { tasks, next: m.get("next").map(String::from) })
    }

    /// Tasks in the store by status.
    ///
    /// Fails as described in the module docs.
    pub async fn task_counts(&self) -> Result<TaskCounts, AdminError> {
        let m = self.tasks(Message::new("COUNTS"), "COUNTS", TASKS_TIMEOUT).await?;
        Ok(TaskCounts {
            pending: param(&m, "pending")?,
            running: param(&m, "running")?,
            done: param(&m, "done")?,
            error: param(&m, "error")?,
            interrupted: param(&m, "interrupted")?,
        })
    }

    /// What the task service did since the node started (cheap: counters only).
    ///
    /// Fails as described in the module docs.
    pub async fn task_stats(&self) -> Result<TaskStats, AdminError> {
        let m = self.tasks(Message::new("STATS"), "STATS", TASKS_TIMEOUT).await?;
        Ok(TaskStats {
            submitted: param(&m, "submitted")?,
            started: param(&m, "started")?,
            done: param(&m, "done")?,
            failed: param(&m, "failed")?,
            retried: param(&m, "retried")?,
            released: param(&m, "released")?,
            stale: param(&m, "stale")?,
            record_retries: param(&m, "record_retries")?,
            expired: param(&m, "expired")?,
            latency: latency(&m)?,
        })
    }

    /// The procedures the node runs, by name.
    ///
    /// Fails as described in the module docs.
    pub async fn task_procedures(&self) -> Result<Vec<ProcedureInfo>, AdminError> {
        let m = self.tasks(Message::new("PROCEDURES"), "PROCEDURES", TASKS_TIMEOUT).await?;
        serde_json::from_slice(&m.payload).map_err(|e| AdminError::Malformed(format!("PROCEDURES payload: {e}")))
    }

    /// Applies an arpcp SIGNAL status (`accepted`, `interrupted`, `done`, `client_error`,
    /// `terminate`) to a task; returns its status before.
    ///
    /// Fails as [`Admin::task_get`] does; needs the `admin` permission.
    pub async fn task_signal(&self, id: &str, status: &str) -> Result<TaskStatus, AdminError> {
        let m = self
            .tasks(Message::new("SIGNAL").param("id", id).param("status", status), "SIGNALED", TASKS_TIMEOUT)
            .await?;
        super::text(&m, "before").parse().map_err(AdminError::Malformed)
    }

    /// Aborts a task: pending or running, it becomes interrupted (its worker session is
    /// cancelled). Returns its status before.
    ///
    /// Fails as [`Admin::task_get`] does; needs the `admin` permission.
    pub async fn task_abort(&self, id: &str) -> Result<TaskStatus, AdminError> {
        let m = self.tasks(Message::new("ABORT").param("id", id), "ABORTED", TASKS_TIMEOUT).await?;
        super::text(&m, "before").parse().map_err(AdminError::Malformed)
    }

    /// Subscribes this client's service (it must be registered) to `TASK_STATUS` messages for
    /// `ttl` (renew before it ends); read them with [`TaskChange::from_message`].
    ///
    /// Fails as described in the module docs.
    pub async fn task_watch(&self, ttl: Duration) -> Result<(), AdminError> {
        self.tasks(Message::new("WATCH").param("ttl_ms", ttl.as_millis()), "WATCHING", TASKS_TIMEOUT).await.map(drop)
    }

    /// Ends this client's subscription.
    ///
    /// Fails as described in the module docs.
    pub async fn task_unwatch(&self) -> Result<(), AdminError> {
        self.tasks(Message::new("UNWATCH"), "UNWATCHED", TASKS_TIMEOUT).await.map(drop)
    }
}

/// The histogram of a `STATS` answer (empty from a node that sends none).
fn latency(m: &Message) -> Result<TaskLatency, AdminError> {
    let list = |key: &str| -> Result<Vec<u64>, AdminError> {
        let text = m.get(key).unwrap_or("");
        if text.is_empty() {
            return Ok(Vec::new());
        }
        text.split(',')
            .map(|n| {
                n.parse().map_err(|_| AdminError::Malformed(format!("STATS {key}={text:?} is not a list of numbers")))
            })
            .collect()
    };
    let (le_ms, counts) = (list("latency_le_ms")?, list("latency_counts")?);
    if !counts.is_empty() && counts.len() != le_ms.len() + 1 {
        return Err(AdminError::Malformed(format!(
            "STATS has {} latency counts for {} bounds (one more count than bounds expected)",
            counts.len(),
            le_ms.len()
        )));
    }
    Ok(TaskLatency { le_ms, counts, sum_ms: param(m, "latency_sum_ms")? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_decode_from_what_the_node_sends() {
        let body = r#"{"id":"t-1","procedure":"procs.add","status":"error","attempt":2,"max_attempts":3,
            "timeout_ms":300000,"owner":null,"parent":null,"key":"k","created_at":5,"started_at":6,
            "finished_at":7,"expires_at":8,"args":[1,2],"result":null,
            "error":{"kind":"TimedOut","message":"ran longer than 300 s"}}"#;
        let m = Message::new("TASK").with_payload(body.as_bytes().to_vec());
        let t = TaskInfo::from_reply(&m).unwrap();
        assert_eq!((t.status, t.attempt, t.key.as_deref()), (TaskStatus::Error, 2, Some("k")));
        assert_eq!(t.error.unwrap().to_string(), "TimedOut: ran longer than 300 s");
        assert_eq!(t.args, Some(serde_json::json!([1, 2])));
        let partial = Message::new("TASK").with_payload(&br#"{"id":"t-2","status":"done","result":{"a":1}}"#[..]);
        assert_eq!(TaskInfo::from_reply(&partial).unwrap().result, Some(serde_json::json!({"a": 1})));
        assert!(TaskInfo::from_reply(&Message::new("TASK").with_payload(&b"{}"[..])).is_err());
        assert_eq!("interrupted".parse::<TaskStatus>().unwrap(), TaskStatus::Interrupted);
        assert!("finished".parse::<TaskStatus>().is_err());
    }

    #[test]
    fn specs_are_sent_as_the_node_reads_them() {
        let s = TaskSpec { key: Some("k".into()), timeout_ms: Some(500), ..TaskSpec::new("p.x", vec![1.into()]) };
        let m = s.message("ATASK");
        assert_eq!((m.get("procedure"), m.get("key"), m.get("timeout_ms")), (Some("p.x"), Some("k"), Some("500")));
        assert_eq!(&m.payload[..], b"[1]");
        assert_eq!(serde_json::to_string(&s).unwrap(), r#"{"procedure":"p.x","args":[1],"key":"k","timeout_ms":500}"#);
        let change = Message::new("TASK_STATUS").param("id", "a").param("procedure", "p.x").param("status", "done");
        let c = TaskChange::from_message(&change.param("attempt", "1")).unwrap();
        assert_eq!((c.status.as_str(), c.attempt), ("done", 1));
        assert!(TaskChange::from_message(&Message::new("PING")).is_none());
    }
}
