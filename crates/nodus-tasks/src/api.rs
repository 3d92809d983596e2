//! The arpcp methods on a node's [`Tasks`]: one decoded [`Request`] in, one [`Answer`] out,
//! whatever carries them (the arpcp TCP listener, the node's `tasks` service).
//!
//! | method | success | refusals |
//! |---|---|---|
//! | `task` | 100, `data` = the result | 200 (already expired), 203, 204, 205 (unknown or finished `pid`), 300, 400 (the procedure failed, timed out, was interrupted, or expired before it started) |
//! | `atask` | 100, `data` = the task id | 200 (already expired), 203, 204, 205, 300 |
//! | `get` | 100 `done` + result; 100 `pending`/`running` + null | 205, 300, 400 (failed or interrupted) |
//! | `signal` | 100, `data` `"OK"` | 205, 300 |
//! | `id` | 100, `data` = the node id | |
//! | `procedures` | 100, `data` = the procedure names | |

use crate::arpcp::{Answer, Code, Extension, Request};
use crate::executor::{Finished, Submission, Tasks, Waited};
use crate::store::Store;
use crate::task::{json_null, ErrorKind, Status, TaskId};

/// Answers one request.
pub async fn answer<S: Store>(tasks: &Tasks<S>, req: Request) -> Answer {
    match req {
        Request::Task { procedure, args, extra } => match tasks.run(submission(procedure, args, extra)).await {
            Ok((_, Waited::Finished(f))) => finished(f, "OK"),
            Ok((id, Waited::NotYet(s))) => Answer::error(
                Code::Internal,
                format!("task {id} is still {s} after its timeout; it stays stored: GET it later"),
            ),
            Ok((id, Waited::Unknown)) => Answer::error(Code::Internal, format!("task {id} was deleted while it ran")),
            Err(e) => Answer::error(e.code(), e.to_string()),
        },
        Request::Atask { procedure, args, extra } => match tasks.submit(submission(procedure, args, extra)).await {
            Ok(sub) => Answer::ok("OK", Answer::string_data(sub.id.as_str())),
            Err(e) => Answer::error(e.code(), e.to_string()),
        },
        Request::Get { id } => match tasks.get(&id).await {
            Ok(Some(t)) if t.status.is_final() => {
                finished(Finished { status: t.status, result: t.result, error: t.error }, "done")
            }
            Ok(Some(t)) => Answer::ok(t.status.as_str(), json_null()),
            Ok(None) => unknown(&id),
            Err(e) => Answer::error(Code::Internal, e.to_string()),
        },
        Request::Signal { id, status } => match tasks.signal(&id, status).await {
            Ok(Some(_)) => Answer::ok("OK", Answer::string_data("OK")),
            Ok(None) => unknown(&id),
            Err(e) => Answer::error(Code::Internal, e.to_string()),
        },
        Request::Id => Answer::ok("OK", Answer::string_data(tasks.node())),
        Request::Procedures => {
            let names: Vec<String> = tasks.procedures().iter().map(|p| p.name.clone()).collect();
            let data = serde_json::value::to_raw_value(&names).unwrap_or_else(|_| json_null());
            Answer::ok("OK", data)
        }
    }
}

/// A submission with nodus's optional arpcp fields (`expires_at`, `pid`).
fn submission(procedure: String, args: Vec<serde_json::Value>, extra: Extension) -> Submission {
    let mut s = Submission::new(procedure, args);
    s.deadline = extra.expires_at;
    s.parent = extra.pid;
    s
}

fn unknown(id: &TaskId) -> Answer {
    Answer::error(Code::UnknownTask, format!("no task {id} (unknown, deleted, or its result expired)"))
}

/// A finished task as an answer: done is 100 with the result (described `ok`); error and
/// interrupted are 400 with the procedure's own message, or the kind of failure and what
/// happened.
fn finished(f: Finished, ok: &str) -> Answer {
    match f.status {
        Status::Done => Answer::ok(ok, f.result.unwrap_or_else(json_null)),
        status => {
            let why = match f.error {
                Some(e) if e.kind == ErrorKind::RunningError => e.message,
                Some(e) => e.to_string(),
                None => status.to_string(),
            };
            let text = if status == Status::Interrupted { format!("interrupted: {why}") } else { why };
            Answer::error(Code::ProcedureFailed, text)
        }
    }
}
