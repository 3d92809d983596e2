//! `nodus task run|submit|get|wait|list|abort|watch|procedures`, over the node's built-in
//! `tasks` service.
//!
//! Arguments of a procedure are JSON values when they parse (`40`, `true`, `[1,2]`, `'"40"'`),
//! else strings (`ada`). Exit status: 0 when what was asked succeeded (for `run` and `wait`: every
//! task done), 1 when a task failed or the node refused, 2 otherwise.

use super::{Ctx, Failure};
use crate::output;
use anyhow::Context;
use nodus_client::admin::{TaskInfo, TaskSpec, TaskStatus, TaskSubmitted};
use nodus_client::Admin;
use serde_json::{json, Value};
use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

/// Tasks in one `SUBMIT_MANY` of `submit --from`.
const SUBMIT_BATCH: usize = 1000;
/// `SUBMIT_MANY` requests of `submit --from` in flight at once.
const SUBMIT_INFLIGHT: usize = 4;
/// `WAIT` requests of `wait` in flight at once.
const WAIT_INFLIGHT: usize = 64;
/// How long one `WAIT` request waits on the node before it is asked again.
const WAIT_STEP: Duration = Duration::from_secs(30);
/// How long a `WATCH` subscription lasts; it is renewed at a third of it.
const WATCH_TTL: Duration = Duration::from_secs(30);

/// `nodus task ...`
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Run a procedure and print its result (waits until the task finished).
    Run {
        /// The procedure, APP.EVENT.
        procedure: String,
        /// Its arguments: JSON values when they parse, else strings.
        args: Vec<String>,
        #[command(flatten)]
        options: Options,
    },
    /// Submit a task and print its id at once (`--from FILE`: many, one JSON object per line).
    Submit {
        /// The procedure, APP.EVENT.
        #[arg(required_unless_present = "from")]
        procedure: Option<String>,
        /// Its arguments: JSON values when they parse, else strings.
        args: Vec<String>,
        #[command(flatten)]
        options: Options,
        /// Submit every line of FILE ('-': standard input), each
        /// {"procedure": "APP.EVENT", "args": [...], "key": "...", "timeout_ms": N, "pid": "...",
        /// "expires_at": UNIX_MS}; prints one id per line, in order (a refused line: its reason on
        /// stderr).
        #[arg(long, value_name = "FILE", conflicts_with_all = ["procedure", "key", "timeout", "pid", "expires_in"])]
        from: Option<PathBuf>,
    },
    /// Show one task: status, attempts, times, result or error.
    Get {
        /// The task's id.
        id: String,
    },
    /// Wait until tasks finish and print each one's outcome; exit 0 only when all are done.
    Wait {
        /// The tasks' ids.
        #[arg(required = true)]
        ids: Vec<String>,
        /// Give up after this long (e.g. 30s, 10m) [default: wait as long as it takes].
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
    },
    /// List tasks, oldest first.
    List {
        /// Only tasks with this status (pending, running, done, error, interrupted).
        #[arg(long)]
        status: Option<TaskStatus>,
        /// Only tasks of this procedure.
        #[arg(long)]
        procedure: Option<String>,
        /// Only the subtasks of this task.
        #[arg(long, value_name = "ID")]
        parent: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Abort a task: pending or running, it becomes interrupted (its worker session is
    /// cancelled).
    Abort {
        /// The task's id.
        id: String,
    },
    /// Print every task status change as it happens (Ctrl-C to stop).
    Watch,
    /// The procedures the node runs, with their parameters.
    Procedures,
}

/// An argument as a JSON value: the value when it parses, else the string itself.
pub fn arg_value(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.to_string()))
}

/// What `run` and `submit` take besides the procedure and its arguments.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// Idempotency key: the same key again returns the existing task.
    #[arg(long)]
    key: Option<String>,
    /// The task's timeout (e.g. 30s, 5m) [default: the node's, 300 s].
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// Make it a subtask of this task: killing that one kills it.
    #[arg(long, value_name = "TASK_ID")]
    pid: Option<String>,
    /// Its deadline, from now (e.g. 10s): not started by then, it never runs.
    #[arg(long, value_parser = humantime::parse_duration)]
    expires_in: Option<Duration>,
}

fn spec(procedure: String, args: &[String], o: Options) -> TaskSpec {
    let spec = TaskSpec {
        key: o.key,
        timeout_ms: o.timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        pid: o.pid,
        ..TaskSpec::new(procedure, args.iter().map(|a| arg_value(a)).collect())
    };
    match o.expires_in {
        Some(d) => spec.expires_in(d),
        None => spec,
    }
}

/// Runs `nodus task ...`.
///
/// Fails when the node cannot be reached, or (exit 1) when the `tasks` service refuses or a
/// task failed.
pub async fn run(ctx: &Ctx, c: Command) -> anyhow::Result<u8> {
    let client = match &c {
        // The watcher is a service: the node sends it TASK_STATUS messages.
        Command::Watch => return watch(ctx).await,
        _ => ctx.client().await?,
    };
    let admin = client.admin();
    match c {
        Command::Run { procedure, args, options } => {
            // The node answers at the task's timeout plus its grace at the latest.
            let wait = options.timeout.unwrap_or(Duration::from_secs(300)) + Duration::from_secs(60);
            let spec = spec(procedure, &args, options);
            let t = admin.task_run(&spec, wait).await?;
            if ctx.json {
                output::json(&serde_json::to_value(&t)?);
            } else if t.status == TaskStatus::Done {
                output::line(&result_text(t.result.as_ref()));
            }
            if t.status != TaskStatus::Done {
                return Err(Failure(failure_text(&t)).into());
            }
        }
        Command::Submit { from: Some(file), .. } => return submit_file(ctx, &admin, &file).await,
        Command::Submit { procedure, args, options, from: None } => {
            let procedure = procedure.context("a procedure to submit, or --from FILE")?;
            let s = admin.task_submit(&spec(procedure, &args, options)).await?;
            if ctx.json {
                output::json(&serde_json::to_value(&s)?);
            } else {
                output::line(&s.id);
                if s.existing {
                    output::note("(an existing task: the key was submitted before)");
                }
            }
        }
        Command::Get { id } => {
            let t = admin.task_get(&id).await?;
            if ctx.json {
                output::json(&serde_json::to_value(&t)?);
            } else {
                describe(&t);
            }
        }
        Command::Wait { ids, timeout } => return wait(ctx, &admin, ids, timeout).await,
        Command::List { status, procedure, parent, limit } => {
            if !(1..=1000).contains(&limit) {
                anyhow::bail!("--limit is 1 to 1000");
            }
            let page = admin.task_list(status, procedure.as_deref(), parent.as_deref(), None, limit).await?;
            if ctx.json {
                let v: Vec<Value> = page.tasks.iter().map(serde_json::to_value).collect::<Result<_, _>>()?;
                output::json(&json!(v));
            } else if page.tasks.is_empty() {
                output::line("no tasks");
            } else {
                let rows: Vec<Vec<String>> = page
                    .tasks
                    .iter()
                    .map(|t| {
                        vec![
                            t.id.clone(),
                            t.procedure.clone(),
                            t.status.to_string(),
                            t.attempt.to_string(),
                            output::time_ms(t.created_at),
                        ]
                    })
                    .collect();
                output::table(&["ID", "PROCEDURE", "STATUS", "ATTEMPT", "CREATED"], &rows);
                if page.next.is_some() {
                    output::note(&format!("(the first {limit}; --limit for more)"));
                }
            }
        }
        Command::Abort { id } => {
            let before = admin.task_abort(&id).await?;
            let now = if before.is_final() { before } else { TaskStatus::Interrupted };
            if ctx.json {
                output::json(&json!({"ok": true, "id": id, "before": before, "status": now}));
            } else if before.is_final() {
                output::line(&format!("{id} had already finished: {before}"));
            } else {
                output::line(&format!("{id} interrupted (was {before})"));
            }
        }
        Command::Procedures => {
            let list = admin.task_procedures().await?;
            if ctx.json {
                output::json(&serde_json::to_value(&list)?);
            } else if list.is_empty() {
                output::line("no procedures: deploy an app whose manifest declares some");
            } else {
                for p in list {
                    output::line(&p.signature);
                }
            }
        }
        Command::Watch => unreachable!("handled above"),
    }
    Ok(0)
}

/// A result for people: a string as itself, anything else as compact JSON.
fn result_text(v: Option<&Value>) -> String {
    match v {
        None => "null".into(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    }
}

fn failure_text(t: &TaskInfo) -> String {
    match &t.error {
        Some(e) => format!("task {} {}: {e}", t.id, t.status),
        None => format!("task {} {}", t.id, t.status),
    }
}

fn describe(t: &TaskInfo) {
    let when = |ms: Option<u64>| ms.map_or_else(|| "-".to_string(), output::time_ms);
    let mut rows = vec![
        ("id", t.id.clone()),
        ("procedure", t.procedure.clone()),
        ("status", t.status.to_string()),
        ("attempt", format!("{} of {}", t.attempt, t.max_attempts)),
        ("created", when(Some(t.created_at))),
        ("started", when(t.started_at)),
        ("finished", when(t.finished_at)),
    ];
    if let Some(k) = &t.key {
        rows.push(("key", k.clone()));
    }
    if let Some(a) = &t.args {
        rows.push(("args", a.to_string()));
    }
    match (t.status, &t.error) {
        (TaskStatus::Done, _) => rows.push(("result", result_text(t.result.as_ref()))),
        (_, Some(e)) => rows.push(("error", e.to_string())),
        _ => {}
    }
    for (k, v) in rows {
        output::line(&format!("{k:<10} {v}"));
    }
}

/// `[#########...........]  45%  4500/10000 what`
fn bar(done: usize, total: usize, what: &str) -> String {
    const WIDTH: usize = 30;
    let filled = (done.min(total) * WIDTH).checked_div(total).unwrap_or(WIDTH);
    let pct = (done.min(total) * 100).checked_div(total).unwrap_or(100);
    format!("[{}{}] {pct:>3}% {done}/{total} {what}", "#".repeat(filled), ".".repeat(WIDTH - filled))
}

/// `submit --from FILE`: batches of [`SUBMIT_BATCH`] lines, [`SUBMIT_INFLIGHT`] at a time, with
/// a progress bar; ids printed in order.
async fn submit_file(ctx: &Ctx, admin: &Admin, file: &std::path::Path) -> anyhow::Result<u8> {
    let reader: Box<dyn BufRead> = if file.as_os_str() == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        let f = std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
        Box::new(std::io::BufReader::new(f))
    };
    // Every line is checked here first: a file with a broken line submits nothing.
    let mut specs = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("cannot read {}", file.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let spec: TaskSpec = serde_json::from_str(&line).with_context(|| {
            format!(
                "{} line {}: not a task; write {{\"procedure\": \"APP.EVENT\", \"args\": [...]}}",
                file.display(),
                n + 1
            )
        })?;
        specs.push((n + 1, spec));
    }
    let total = specs.len();
    let mut progress = output::Progress::new();
    let (mut accepted, mut refused, mut sent) = (0usize, 0usize, 0usize);
    let mut ids: Vec<Value> = Vec::with_capacity(if ctx.json { total } else { 0 });
    let mut chunks = specs.chunks(SUBMIT_BATCH);
    let mut inflight = std::collections::VecDeque::new();
    loop {
        while inflight.len() < SUBMIT_INFLIGHT {
            let Some(chunk) = chunks.next() else { break };
            let lines: Vec<usize> = chunk.iter().map(|(n, _)| *n).collect();
            let batch: Vec<TaskSpec> = chunk.iter().map(|(_, s)| s.clone()).collect();
            let admin = admin.clone();
            inflight.push_back(tokio::spawn(async move { (lines, admin.task_submit_many(&batch).await) }));
        }
        // Answers are taken in submission order, so ids print in the file's order.
        let Some(next) = inflight.pop_front() else { break };
        let (lines, outcome) = next.await.context("a submission failed")?;
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                progress.finish();
                return Err(anyhow::Error::from(e)
                    .context(format!("{sent} of {total} tasks submitted before the node refused a batch")));
            }
        };
        for (line, o) in lines.into_iter().zip(outcome) {
            match o {
                Ok(TaskSubmitted { id, existing }) => {
                    accepted += 1;
                    if ctx.json {
                        ids.push(json!({"line": line, "id": id, "existing": existing}));
                    } else {
                        progress.finish();
                        output::line(&id);
                    }
                }
                Err(r) => {
                    refused += 1;
                    if ctx.json {
                        ids.push(json!({"line": line, "error": r.error, "code": r.code, "arpcp": r.arpcp}));
                    } else {
                        progress.finish();
                        output::error(&format!("{} line {line}: {}", file.display(), r.error));
                    }
                }
            }
            sent += 1;
        }
        progress.show(&bar(sent, total, "submitted"), "submitting");
    }
    progress.finish();
    if ctx.json {
        output::json(&json!({"submitted": accepted, "refused": refused, "tasks": ids}));
    } else {
        output::note(&format!("{accepted} submitted, {refused} refused"));
    }
    Ok(if refused > 0 { 1 } else { 0 })
}

/// `wait ID...`: each task waited for ([`WAIT_INFLIGHT`] at once), a progress bar for many, one
/// line per task as it finishes.
async fn wait(ctx: &Ctx, admin: &Admin, ids: Vec<String>, timeout: Option<Duration>) -> anyhow::Result<u8> {
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let total = ids.len();
    let mut progress = output::Progress::new();
    let show_bar = total > 1;
    let mut pending = ids.into_iter();
    let mut running = tokio::task::JoinSet::new();
    let (mut finished, mut all_done) = (0usize, true);
    let mut results: Vec<Value> = Vec::new();
    let spawn = |running: &mut tokio::task::JoinSet<_>, id: String| {
        let admin = admin.clone();
        running.spawn(async move {
            loop {
                let step = match deadline {
                    Some(d) => d.saturating_duration_since(tokio::time::Instant::now()).min(WAIT_STEP),
                    None => WAIT_STEP,
                };
                match admin.task_wait(&id, step).await {
                    Ok(t) if t.status.is_final() || step < WAIT_STEP => return (id, Ok(t)),
                    Ok(_) => {}
                    Err(e) => return (id, Err(e)),
                }
            }
        });
    };
    for id in pending.by_ref().take(WAIT_INFLIGHT) {
        spawn(&mut running, id);
    }
    while let Some(joined) = running.join_next().await {
        let (id, outcome) = joined.context("a wait failed")?;
        if let Some(next) = pending.next() {
            spawn(&mut running, next);
        }
        finished += 1;
        progress.finish();
        match outcome {
            Ok(t) => {
                if t.status != TaskStatus::Done {
                    all_done = false;
                }
                if ctx.json {
                    results.push(serde_json::to_value(&t)?);
                } else {
                    let what = match t.status {
                        TaskStatus::Done => result_text(t.result.as_ref()),
                        s if !s.is_final() => "still running when the wait ended".to_string(),
                        _ => t.error.as_ref().map_or_else(String::new, ToString::to_string),
                    };
                    output::line(&format!("{} {} {what}", t.id, t.status));
                }
            }
            Err(e) => {
                all_done = false;
                if ctx.json {
                    results.push(json!({"id": id, "error": e.to_string()}));
                } else {
                    output::line(&format!("{id} unknown {e}"));
                }
            }
        }
        if show_bar {
            progress.show(&bar(finished, total, "finished"), "waiting");
        }
    }
    progress.finish();
    if ctx.json {
        output::json(&json!({"all_done": all_done, "tasks": results}));
    }
    Ok(if all_done { 0 } else { 1 })
}

/// `watch`: registers a service of its own, subscribes it, prints every change until the node
/// goes or Ctrl-C.
async fn watch(ctx: &Ctx) -> anyhow::Result<u8> {
    let name = format!("nodus-task-watch-{}-{:08x}", std::process::id(), rand_u32());
    let config = ctx.config().service(&name).commands(["TASK_STATUS"]).incoming_capacity(65536);
    let (client, mut incoming) = ctx.connect(config).await?;
    let admin = client.admin();
    admin.task_watch(WATCH_TTL).await?;
    output::note(&format!("watching the tasks of node {} (Ctrl-C to stop)", client.server()));
    let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + WATCH_TTL / 3, WATCH_TTL / 3);
    loop {
        tokio::select! {
            m = incoming.recv() => {
                let Some(m) = m else { break };
                if m.command == "QUITTING" && m.envelope.reply_to == 0 {
                    output::note(&format!("node {} is shutting down", m.from.server));
                    break;
                }
                let Some(c) = nodus_client::admin::TaskChange::from_message(&m) else { continue };
                if ctx.json {
                    output::json(&serde_json::to_value(&c)?);
                } else {
                    output::line(&format!("{} {} {} attempt {}", c.id, c.procedure, c.status, c.attempt));
                }
            }
            _ = renew.tick() => admin.task_watch(WATCH_TTL).await?,
        }
    }
    if incoming.dropped() > 0 {
        output::note(&format!("{} changes were not shown: the output could not keep up", incoming.dropped()));
    }
    Ok(0)
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_json_when_they_parse_else_strings() {
        assert_eq!(arg_value("40"), json!(40));
        assert_eq!(arg_value("2.5"), json!(2.5));
        assert_eq!(arg_value("true"), json!(true));
        assert_eq!(arg_value("[1, \"a\"]"), json!([1, "a"]));
        assert_eq!(arg_value("\"40\""), json!("40"));
        assert_eq!(arg_value("ada"), json!("ada"));
        assert_eq!(arg_value("{oops"), json!("{oops"));
    }

    #[test]
    fn the_progress_bar_says_how_far() {
        assert_eq!(bar(0, 10, "done"), format!("[{}]   0% 0/10 done", ".".repeat(30)));
        assert_eq!(bar(5, 10, "done"), format!("[{}{}]  50% 5/10 done", "#".repeat(15), ".".repeat(15)));
        assert_eq!(bar(12, 10, "x"), format!("[{}] 100% 12/10 x", "#".repeat(30)));
    }
}
