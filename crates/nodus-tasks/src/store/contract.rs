//! The contract every [`Store`] backend must meet, as one suite run against each backend
//! (SQLite in this crate's tests; PostgreSQL in its own): `contract::run(|| async { fresh store })`.
//!
//! The factory must return an empty store whose results expire after [`RESULT_TTL`]. Every check
//! uses virtual time (`now` is an argument of every store call), so the suite is deterministic.
//! A broken contract panics with what was expected.

use std::future::Future;
use std::time::Duration;

use super::{Claim, Command, Fenced, Finish, ListFilter, Outcome, Store};
use crate::task::{json, ErrorKind, Lease, NewTask, Status, TaskError, TaskId, UnixMs};

/// The `result_ttl` the factory's stores must have.
pub const RESULT_TTL: Duration = Duration::from_secs(60);

const T0: UnixMs = UnixMs(1_700_000_000_000);
const OWNER: &str = "node-a";

fn at(ms: u64) -> UnixMs {
    UnixMs(T0.0 + ms)
}

fn id(n: u32) -> TaskId {
    // Ids sort by creation like generated ones do.
    TaskId(format!("00000000-0000-7000-8000-{n:012}").into())
}

fn task(n: u32, app: &str) -> NewTask {
    NewTask {
        id: id(n),
        procedure: format!("{app}.work"),
        app: app.to_string(),
        args: json(&format!("[{n}, \"x\"]")).expect("json"),
        max_attempts: 3,
        timeout: Duration::from_secs(10),
        parent: None,
        key: None,
        created_at: at(u64::from(n)),
        deadline: None,
    }
}

fn claim(app: &str, max: usize, now: UnixMs) -> Claim {
    Claim { app: app.to_string(), owner: OWNER.to_string(), max, now, lease_grace: Duration::from_secs(5) }
}

fn done(id: TaskId, lease: Lease, now: UnixMs, result: &str) -> Finish {
    Finish { id, lease, outcome: Outcome::Done(json(result).expect("json")), now }
}

/// Runs every check, each against a fresh store from `make`.
pub async fn run<S, F, Fut>(mut make: F)
where
    S: Store,
    F: FnMut() -> Fut,
    Fut: Future<Output = S>,
{
    submitted_tasks_read_back(make().await).await;
    claims_take_due_tasks_of_one_app_oldest_first(make().await).await;
    leases_are_fencing_tokens(make().await).await;
    one_completion_per_task(make().await).await;
    retry_counts_the_attempt_release_does_not(make().await).await;
    failures_are_recorded(make().await).await;
    commands_interrupt_mark_done_and_delete(make().await).await;
    idempotency_keys_return_the_existing_task(make().await).await;
    finished_tasks_expire_and_are_purged(make().await).await;
    recover_and_reap_return_running_tasks(make().await).await;
    listing_counts_and_pending_apps(make().await).await;
    concurrent_submissions_are_all_stored(make().await).await;
    deadlines_are_honoured_at_claim_and_expired_tasks_never_run(make().await).await;
    subtasks_are_found_by_their_parent(make().await).await;
}

async fn deadlines_are_honoured_at_claim_and_expired_tasks_never_run<S: Store>(s: S) {
    // 1: deadline at 50; 2: deadline at 500; 3: none; 4: deadline at 50 but another app.
    let mut t1 = task(1, "a");
    t1.deadline = Some(at(50));
    let mut t2 = task(2, "a");
    t2.deadline = Some(at(500));
    let mut t4 = task(4, "b");
    t4.deadline = Some(at(50));
    s.submit(vec![t1, t2, task(3, "a"), t4]).await.expect("submit");
    let got = s.get(id(1), at(10)).await.expect("get").expect("stored");
    assert_eq!(got.deadline, Some(at(50)), "the deadline is stored");
    assert_eq!(s.get(id(3), at(10)).await.expect("get").expect("stored").deadline, None);
    // Nothing expired yet at 49.
    assert!(s.expire(at(49), 100).await.expect("expire").is_empty());
    // At 50 (the boundary: expired from the millisecond of the deadline) the claim skips task 1
    // even though it is the oldest and due, in the same statement that claims.
    let c = s.claim(claim("a", 10, at(50))).await.expect("claim");
    assert_eq!(c.iter().map(|c| c.id.clone()).collect::<Vec<_>>(), vec![id(2), id(3)]);
    assert_eq!((c[0].deadline, c[1].deadline), (Some(at(500)), None), "a claim carries the deadline on");
    assert_eq!(s.get(id(1), at(50)).await.expect("get").expect("stored").status, Status::Pending);
    // A claim of the other app never hands task 4 out either.
    assert!(s.claim(claim("b", 10, at(60))).await.expect("claim").is_empty());
    // The sweep finishes both expired pending tasks with the Expired error, oldest deadline
    // first, bounded by `max`.
    let x = s.expire(at(60), 1).await.expect("expire");
    assert_eq!(x.len(), 1);
    let rest = s.expire(at(60), 100).await.expect("expire");
    let mut ids: Vec<TaskId> = x.iter().chain(&rest).map(|e| e.id.clone()).collect();
    ids.sort();
    assert_eq!(ids, vec![id(1), id(4)]);
    assert!(x.iter().chain(&rest).all(|e| e.deadline == at(50) && e.attempt == 0));
    let t = s.get(id(1), at(60)).await.expect("get").expect("an expired task is still readable");
    assert_eq!(t.status, Status::Error);
    let e = t.error.expect("error");
    assert_eq!(e.kind, ErrorKind::Expired);
    assert_eq!(e, super::Expired::error(at(50)), "the store's message is the crate's");
    assert_eq!((t.finished_at, t.started_at, t.attempt), (Some(at(60)), None, 0), "it never ran");
    assert_eq!(t.expires_at, Some(at(60).plus(RESULT_TTL)), "its result is kept as any other");
    // Running task 2 (deadline 500) is not touched: the deadline is about starting.
    assert!(s.expire(at(600), 100).await.expect("expire").is_empty());
    assert_eq!(s.get(id(2), at(600)).await.expect("get").expect("stored").status, Status::Running);
    // Never claimed afterwards, never expired twice.
    assert!(s.claim(claim("a", 10, at(70))).await.expect("claim").is_empty());
    assert!(s.claim(claim("b", 10, at(70))).await.expect("claim").is_empty());
    // A retried task whose deadline passes while it waits is not claimed again either.
    let mut t5 = task(5, "c");
    t5.deadline = Some(at(1_000));
    s.submit(vec![t5]).await.expect("submit");
    let c = s.claim(claim("c", 1, at(100))).await.expect("claim").remove(0);
    let retry = Outcome::Retry { run_after: at(900), error: TaskError::new(ErrorKind::WorkerFailed, "crash") };
    s.finish(vec![Finish { id: id(5), lease: c.lease, outcome: retry, now: at(200) }]).await.expect("finish");
    assert!(s.claim(claim("c", 1, at(1_000))).await.expect("claim").is_empty());
    let x = s.expire(at(1_000), 100).await.expect("expire");
    assert_eq!((x.len(), x[0].attempt), (1, 1));
    let c = s.counts(at(1_000)).await.expect("counts");
    assert_eq!((c.error, c.running, c.pending), (3, 2, 0));
}

async fn subtasks_are_found_by_their_parent<S: Store>(s: S) {
    let child = |n: u32, parent: u32| {
        let mut t = task(n, "a");
        t.parent = Some(id(parent));
        t
    };
    s.submit(vec![task(1, "a"), child(2, 1), child(3, 1), child(4, 2), task(5, "a")]).await.expect("submit");
    let c = s.claim(claim("a", 1, at(10))).await.expect("claim");
    assert_eq!((c[0].id.clone(), c[0].parent.clone()), (id(1), None));
    let c = s.claim(claim("a", 1, at(10))).await.expect("claim");
    assert_eq!(c[0].parent, Some(id(1)), "a claim says whose subtask it hands out");
    let of = |p: u32| ListFilter { parent: Some(id(p)), limit: 10, ..ListFilter::default() };
    let ids = |l: Vec<crate::task::Task>| l.into_iter().map(|t| t.id).collect::<Vec<_>>();
    assert_eq!(ids(s.list(of(1), at(10)).await.expect("list")), vec![id(2), id(3)]);
    assert_eq!(ids(s.list(of(2), at(10)).await.expect("list")), vec![id(4)]);
    assert!(s.list(of(5), at(10)).await.expect("list").is_empty());
    let page = ListFilter { parent: Some(id(1)), after: Some(id(2)), limit: 10, ..ListFilter::default() };
    assert_eq!(ids(s.list(page, at(10)).await.expect("list")), vec![id(3)], "pages within a parent");
}

async fn submitted_tasks_read_back<S: Store>(s: S) {
    let mut t = task(1, "procs");
    t.parent = Some(id(99));
    t.key = Some("k1".into());
    let out = s.submit(vec![t.clone(), task(2, "procs")]).await.expect("submit");
    assert_eq!(out.len(), 2);
    assert!(out.iter().all(|o| !o.existing));
    assert_eq!(out[0].id, id(1));
    let got = s.get(id(1), at(10)).await.expect("get").expect("task 1 stored");
    assert_eq!(got.procedure, "procs.work");
    assert_eq!(got.args.get(), "[1, \"x\"]", "arguments are kept as written");
    assert_eq!(got.status, Status::Pending);
    assert_eq!((got.attempt, got.max_attempts), (0, 3));
    assert_eq!(got.timeout, Duration::from_secs(10));
    assert_eq!(got.lease, Lease(0));
    assert_eq!(got.parent, Some(id(99)));
    assert_eq!(got.key.as_deref(), Some("k1"));
    assert_eq!(got.created_at, at(1));
    assert!(got.started_at.is_none() && got.finished_at.is_none() && got.expires_at.is_none());
    assert!(got.result.is_none() && got.error.is_none() && got.owner.is_none());
    assert!(s.get(id(3), at(10)).await.expect("get").is_none(), "unknown id");
}

async fn claims_take_due_tasks_of_one_app_oldest_first<S: Store>(s: S) {
    s.submit((1..=5).map(|n| task(n, "a")).collect()).await.expect("submit");
    s.submit(vec![task(6, "b")]).await.expect("submit");
    let c = s.claim(claim("a", 2, at(100))).await.expect("claim");
    assert_eq!(c.iter().map(|c| c.id.clone()).collect::<Vec<_>>(), vec![id(1), id(2)]);
    assert!(c.iter().all(|c| c.attempt == 1 && c.app == "a" && c.procedure == "a.work"));
    assert_eq!(c[0].args.get(), "[1, \"x\"]");
    assert_eq!(c[0].created_at, at(1));
    let t = s.get(id(1), at(100)).await.expect("get").expect("stored");
    assert_eq!(t.status, Status::Running);
    assert_eq!(t.attempt, 1);
    assert_eq!(t.started_at, Some(at(100)));
    assert_eq!(t.owner.as_deref(), Some(OWNER));
    assert_eq!(t.lease, c[0].lease);
    let rest = s.claim(claim("a", 10, at(100))).await.expect("claim");
    assert_eq!(rest.len(), 3, "only the app's pending tasks, never a running one twice");
    assert!(s.claim(claim("a", 10, at(100))).await.expect("claim").is_empty());
    assert_eq!(s.claim(claim("b", 10, at(100))).await.expect("claim").len(), 1);
    assert!(s.claim(claim("nope", 10, at(100))).await.expect("claim").is_empty());
}

async fn leases_are_fencing_tokens<S: Store>(s: S) {
    s.submit(vec![task(1, "a"), task(2, "a")]).await.expect("submit");
    let first = s.claim(claim("a", 1, at(10))).await.expect("claim").remove(0);
    let second = s.claim(claim("a", 1, at(10))).await.expect("claim").remove(0);
    assert!(second.lease > first.lease, "tokens increase across tasks");
    // The first attempt gives its task back; the next attempt gets a larger token.
    let back = Finish {
        id: first.id.clone(),
        lease: first.lease,
        outcome: Outcome::Release { run_after: at(10) },
        now: at(10),
    };
    assert_eq!(s.finish(vec![back]).await.expect("finish"), vec![Fenced::Applied]);
    let again = s.claim(claim("a", 1, at(11))).await.expect("claim").remove(0);
    assert_eq!(again.id, first.id);
    assert!(again.lease > second.lease, "a new attempt's token is larger than every earlier one");
    // The old attempt's late answer is fenced off; the new one's is recorded.
    let late = done(first.id.clone(), first.lease, at(12), "\"old\"");
    assert_eq!(s.finish(vec![late]).await.expect("finish"), vec![Fenced::Stale]);
    assert_eq!(s.get(first.id.clone(), at(12)).await.expect("get").expect("stored").status, Status::Running);
    let ok = done(again.id.clone(), again.lease, at(13), "\"new\"");
    assert_eq!(s.finish(vec![ok]).await.expect("finish"), vec![Fenced::Applied]);
    let t = s.get(first.id, at(13)).await.expect("get").expect("stored");
    assert_eq!(t.result.expect("result").get(), "\"new\"");
}

async fn one_completion_per_task<S: Store>(s: S) {
    s.submit(vec![task(1, "a")]).await.expect("submit");
    let c = s.claim(claim("a", 1, at(10))).await.expect("claim").remove(0);
    let answers = s
        .finish(vec![
            done(c.id.clone(), c.lease, at(20), "{\"sum\": 3}"),
            done(c.id.clone(), c.lease, at(21), "4"),
            Finish {
                id: c.id.clone(),
                lease: c.lease,
                outcome: Outcome::Failed(TaskError::new(ErrorKind::TimedOut, "late")),
                now: at(22),
            },
        ])
        .await
        .expect("finish");
    assert_eq!(answers, vec![Fenced::Applied, Fenced::Stale, Fenced::Stale], "exactly one recorded completion");
    let t = s.get(c.id.clone(), at(30)).await.expect("get").expect("stored");
    assert_eq!(t.status, Status::Done);
    assert_eq!(t.result.expect("result").get(), "{\"sum\": 3}");
    assert_eq!(t.finished_at, Some(at(20)));
    assert_eq!(t.expires_at, Some(at(20).plus(RESULT_TTL)));
    assert!(t.error.is_none());
    let unknown = done(id(7), Lease(1), at(30), "1");
    assert_eq!(s.finish(vec![unknown]).await.expect("finish"), vec![Fenced::Stale], "unknown task");
}

async fn retry_counts_the_attempt_release_does_not<S: Store>(s: S) {
    s.submit(vec![task(1, "a")]).await.expect("submit");
    let c = s.claim(claim("a", 1, at(10))).await.expect("claim").remove(0);
    let err = TaskError::new(ErrorKind::WorkerFailed, "worker exited");
    let retry = Finish {
        id: c.id.clone(),
        lease: c.lease,
        outcome: Outcome::Retry { run_after: at(500), error: err.clone() },
        now: at(20),
    };
    assert_eq!(s.finish(vec![retry.clone()]).await.expect("finish"), vec![Fenced::Applied]);
    assert_eq!(s.finish(vec![retry]).await.expect("finish"), vec![Fenced::Stale], "the same lease twice");
    let t = s.get(c.id.clone(), at(20)).await.expect("get").expect("stored");
    assert_eq!((t.status, t.attempt), (Status::Pending, 1));
    assert_eq!(t.error, Some(err), "the last attempt's error is kept while it waits");
    assert!(s.claim(claim("a", 1, at(499))).await.expect("claim").is_empty(), "not due before run_after");
    let c2 = s.claim(claim("a", 1, at(500))).await.expect("claim").remove(0);
    assert_eq!(c2.attempt, 2);
    let release =
        Finish { id: c2.id.clone(), lease: c2.lease, outcome: Outcome::Release { run_after: at(600) }, now: at(501) };
    assert_eq!(s.finish(vec![release]).await.expect("finish"), vec![Fenced::Applied]);
    assert!(s.claim(claim("a", 1, at(599))).await.expect("claim").is_empty());
    let c3 = s.claim(claim("a", 1, at(600))).await.expect("claim").remove(0);
    assert_eq!(c3.attempt, 2, "a released attempt never ran, so it does not count");
}

async fn failures_are_recorded<S: Store>(s: S) {
    s.submit(vec![task(1, "a")]).await.expect("submit");
    let c = s.claim(claim("a", 1, at(10))).await.expect("claim").remove(0);
    let e = TaskError::new(ErrorKind::RunningError, "division by zero");
    let f = Finish { id: c.id.clone(), lease: c.lease, outcome: Outcome::Failed(e.clone()), now: at(30) };
    assert_eq!(s.finish(vec![f]).await.expect("finish"), vec![Fenced::Applied]);
    let t = s.get(c.id, at(30)).await.expect("get").expect("stored");
    assert_eq!(t.status, Status::Error);
    assert_eq!(t.error, Some(e));
    assert!(t.result.is_none());
    assert_eq!(t.finished_at, Some(at(30)));
    assert_eq!(t.expires_at, Some(at(30).plus(RESULT_TTL)));
}

async fn commands_interrupt_mark_done_and_delete<S: Store>(s: S) {
    s.submit((1..=4).map(|n| task(n, "a")).collect()).await.expect("submit");
    let running = s.claim(claim("a", 1, at(10))).await.expect("claim").remove(0);
    assert_eq!(running.id, id(1));
    // Interrupting a running task revokes its lease.
    let found = s.command(id(1), Command::Interrupt, at(20)).await.expect("cmd").expect("known");
    assert_eq!(
        (found.before, found.procedure.as_str(), found.attempt),
        (Status::Running, "a.work", 1),
        "a command says what the task was"
    );
    let late = done(id(1), running.lease, at(21), "1");
    assert_eq!(s.finish(vec![late]).await.expect("finish"), vec![Fenced::Stale]);
    let t = s.get(id(1), at(21)).await.expect("get").expect("stored");
    assert_eq!(t.status, Status::Interrupted);
    assert_eq!(t.error.map(|e| e.kind), Some(ErrorKind::Aborted));
    assert_eq!(t.finished_at, Some(at(20)));
    // A pending one is interrupted without running; a finished one does not change.
    assert_eq!(
        s.command(id(2), Command::Interrupt, at(20)).await.expect("cmd").map(|c| c.before),
        Some(Status::Pending)
    );
    assert_eq!(s.get(id(2), at(20)).await.expect("get").expect("stored").status, Status::Interrupted);
    assert_eq!(
        s.command(id(2), Command::MarkDone, at(21)).await.expect("cmd").map(|c| c.before),
        Some(Status::Interrupted)
    );
    assert_eq!(s.get(id(2), at(21)).await.expect("get").expect("stored").status, Status::Interrupted);
    // Marked done: result null.
    assert_eq!(
        s.command(id(3), Command::MarkDone, at(22)).await.expect("cmd").map(|c| c.before),
        Some(Status::Pending)
    );
    let t = s.get(id(3), at(22)).await.expect("get").expect("stored");
    assert_eq!(t.status, Status::Done);
    assert_eq!(t.result.expect("result").get(), "null");
    // Deleted: gone everywhere.
    assert_eq!(s.command(id(4), Command::Delete, at(23)).await.expect("cmd").map(|c| c.before), Some(Status::Pending));
    assert!(s.get(id(4), at(23)).await.expect("get").is_none());
    assert!(s.claim(claim("a", 10, at(30))).await.expect("claim").is_empty(), "nothing left to run");
    assert_eq!(s.command(id(4), Command::Delete, at(24)).await.expect("cmd"), None, "unknown id");
    assert_eq!(s.command(id(50), Command::Interrupt, at(24)).await.expect("cmd"), None);
}

async fn idempotency_keys_return_the_existing_task<S: Store>(s: S) {
    let keyed = |n: u32, key: &str| NewTask { key: Some(key.to_string()), ..task(n, "a") };
    let out = s.submit(vec![keyed(1, "order-7"), keyed(2, "order-7"), keyed(3, "order-8")]).await.expect("submit");
    assert_eq!(out[0].id, id(1));
    assert!(!out[0].existing);
    assert_eq!((out[1].id.clone(), out[1].existing), (id(1), true), "the first of a key in a batch wins");
    assert!(!out[2].existing);
    let again = s.submit(vec![keyed(4, "order-7")]).await.expect("submit");
    assert_eq!((again[0].id.clone(), again[0].existing), (id(1), true));
    assert!(s.get(id(4), at(10)).await.expect("get").is_none(), "nothing new stored");
    assert_eq!(s.counts(at(10)).await.expect("counts").pending, 2);
    // Once the keyed task finished and expired, the key is free again.
    let c = s.claim(claim("a", 1, at(10))).await.expect("claim").remove(0);
    s.finish(vec![done(c.id, c.lease, at(20), "1")]).await.expect("finish");
    let later = NewTask { created_at: at(20).plus(RESULT_TTL), ..keyed(5, "order-7") };
    let out = s.submit(vec![later]).await.expect("submit");
    assert_eq!((out[0].id.clone(), out[0].existing), (id(5), false));
}

async fn finished_tasks_expire_and_are_purged<S: Store>(s: S) {
    s.submit(vec![task(1, "a"), task(2, "a")]).await.expect("submit");
    let c = s.claim(claim("a", 1, at(10))).await.expect("claim").remove(0);
    s.finish(vec![done(c.id.clone(), c.lease, at(100), "1")]).await.expect("finish");
    let expiry = at(100).plus(RESULT_TTL);
    assert!(s.get(id(1), UnixMs(expiry.0 - 1)).await.expect("get").is_some());
    assert!(s.get(id(1), expiry).await.expect("get").is_none(), "expired at result_ttl");
    assert_eq!(s.command(id(1), Command::Interrupt, expiry).await.expect("cmd"), None);
    let all = ListFilter { limit: 10, ..ListFilter::default() };
    assert_eq!(s.list(all.clone(), expiry).await.expect("list").len(), 1, "expired tasks are not listed");
    assert_eq!(s.counts(expiry).await.expect("counts").done, 0);
    assert_eq!(s.purge(UnixMs(expiry.0 - 1), 100).await.expect("purge"), 0);
    assert_eq!(s.purge(expiry, 100).await.expect("purge"), 1);
    assert_eq!(s.purge(expiry, 100).await.expect("purge"), 0);
    assert!(s.get(id(1), at(0)).await.expect("get").is_none(), "purged for good");
    // Pending tasks never expire.
    assert!(s.get(id(2), at(10_000_000_000)).await.expect("get").is_some());
}

async fn recover_and_reap_return_running_tasks<S: Store>(s: S) {
    s.submit((1..=3).map(|n| task(n, "a")).collect()).await.expect("submit");
    let mine = s.claim(claim("a", 2, at(10))).await.expect("claim");
    let theirs = s.claim(Claim { owner: "node-b".into(), ..claim("a", 1, at(10)) }).await.expect("claim").remove(0);
    assert_eq!(s.recover(OWNER.into(), at(20)).await.expect("recover"), 2);
    for c in &mine {
        let t = s.get(c.id.clone(), at(20)).await.expect("get").expect("stored");
        assert_eq!((t.status, t.attempt), (Status::Pending, 1));
    }
    assert_eq!(s.get(theirs.id.clone(), at(20)).await.expect("get").expect("stored").status, Status::Running);
    // A recovered attempt's answer is stale; the next claim gets a new lease.
    let late = done(mine[0].id.clone(), mine[0].lease, at(21), "1");
    assert_eq!(s.finish(vec![late]).await.expect("finish"), vec![Fenced::Stale]);
    let re = s.claim(claim("a", 10, at(21))).await.expect("claim");
    assert_eq!(re.len(), 2);
    assert!(re.iter().all(|c| c.attempt == 2 && c.lease > theirs.lease));
    // node-b's lease (timeout 10 s + grace 5 s from t=10) runs out at t=15010.
    assert_eq!(s.reap(at(15_009)).await.expect("reap"), 0);
    assert_eq!(s.reap(at(15_010)).await.expect("reap"), 1);
    let t = s.get(theirs.id.clone(), at(15_010)).await.expect("get").expect("stored");
    assert_eq!(t.status, Status::Pending);
    let late = done(theirs.id.clone(), theirs.lease, at(15_011), "1");
    assert_eq!(s.finish(vec![late]).await.expect("finish"), vec![Fenced::Stale]);
}

async fn listing_counts_and_pending_apps<S: Store>(s: S) {
    s.submit((1..=5).map(|n| task(n, if n <= 3 { "a" } else { "b" })).collect()).await.expect("submit");
    s.submit(vec![task(6, "c")]).await.expect("submit");
    assert_eq!(s.pending_apps().await.expect("apps"), vec!["a", "b", "c"]);
    let c = s.claim(claim("c", 1, at(10))).await.expect("claim").remove(0);
    assert_eq!(s.pending_apps().await.expect("apps"), vec!["a", "b"]);
    s.finish(vec![done(c.id, c.lease, at(11), "1")]).await.expect("finish");
    s.claim(claim("a", 1, at(12))).await.expect("claim");
    let counts = s.counts(at(20)).await.expect("counts");
    assert_eq!((counts.pending, counts.running, counts.done, counts.error, counts.interrupted), (4, 1, 1, 0, 0));
    assert_eq!(counts.total(), 6);
    let page = |after: Option<TaskId>| ListFilter { after, limit: 2, ..ListFilter::default() };
    let p1 = s.list(page(None), at(20)).await.expect("list");
    assert_eq!(p1.iter().map(|t| t.id.clone()).collect::<Vec<_>>(), vec![id(1), id(2)]);
    let p2 = s.list(page(Some(id(2))), at(20)).await.expect("list");
    assert_eq!(p2.iter().map(|t| t.id.clone()).collect::<Vec<_>>(), vec![id(3), id(4)]);
    let pending_b = ListFilter { status: Some(Status::Pending), procedure: Some("b.work".into()), ..page(None) };
    let b = s.list(pending_b, at(20)).await.expect("list");
    assert_eq!(b.iter().map(|t| t.id.clone()).collect::<Vec<_>>(), vec![id(4), id(5)]);
    let running = ListFilter { status: Some(Status::Running), limit: 10, ..ListFilter::default() };
    assert_eq!(s.list(running, at(20)).await.expect("list").len(), 1);
}

async fn concurrent_submissions_are_all_stored<S: Store>(s: S) {
    let s = std::sync::Arc::new(s);
    let mut joins = Vec::new();
    for n in 0..200u32 {
        let s = s.clone();
        joins.push(tokio::spawn(async move { s.submit(vec![task(n * 2, "a"), task(n * 2 + 1, "a")]).await }));
    }
    for j in joins {
        assert_eq!(j.await.expect("join").expect("submit").len(), 2);
    }
    assert_eq!(s.counts(at(0)).await.expect("counts").pending, 400);
    let mut claimed = std::collections::HashSet::new();
    loop {
        let c = s.claim(claim("a", 64, at(1000))).await.expect("claim");
        if c.is_empty() {
            break;
        }
        for t in c {
            assert!(claimed.insert(t.id), "a task claimed twice");
        }
    }
    assert_eq!(claimed.len(), 400);
}
