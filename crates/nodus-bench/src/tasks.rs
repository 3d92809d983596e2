//! `tasks`: the task service's figures, measured on the crate in this process (store, executor,
//! engine) with real worker processes (`nodus-procs-worker`, the example procedures app) and a
//! real SQLite store on disk; with `--postgres URL` (or `$NODUS_TEST_PG`), the same rows on a
//! PostgreSQL store next to them, plus two managers sharing that database.
//!
//! For SQLite `synchronous=FULL` and `NORMAL`, and PostgreSQL:
//! - submit only: K submitters each submit one task at a time (each answered once durable);
//!   the app is declared but not running, so nothing else touches the store;
//! - end to end with 1 and 4 worker processes: the same submissions of the no-op procedure,
//!   timed from the first submission to the last completion recorded on disk, with submit →
//!   start and submit → done percentiles;
//! - light load: one task at a time (submit, wait until done), for the latency floor;
//! - PostgreSQL only: two managers (a task service and an engine with one worker each) on one
//!   database, the submitters split between them.
// A benchmark measures wall time: it reads the std clock on purpose.
#![allow(clippy::disallowed_methods)]
#![allow(clippy::print_stdout)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use nodus_engine::manifest::{Format, Manifest};
use nodus_engine::profile::Profile;
use nodus_engine::{AppSpec, Engine, EngineConfig};
use nodus_tasks::store::{AnyStore, PgConfig, PgStore, SqliteConfig, SqliteStore};
use nodus_tasks::{Status, Submission, Synchronous, TaskId, Tasks, TasksConfig, Waited};
use tokio::time::Instant;

use crate::child::ScratchDir;
use crate::latency::percentile;
use crate::report;

/// The example procedures worker, built by `cargo build --release -p nodus-tasks --bins`.
const WORKER: &str = "nodus-procs-worker";
/// The procedure every task calls.
const NOOP: &str = "procs.noop";
/// Most tasks one measurement may use.
pub const MAX_TASKS: usize = 10_000_000;
/// How long one measurement may take before it is abandoned.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

/// What to measure.
#[derive(Debug, Clone)]
pub struct TasksLoad {
    /// Tasks per throughput measurement.
    pub tasks: usize,
    /// Concurrent submitters.
    pub submitters: usize,
    /// Tasks of the light-load latency measurement (one at a time).
    pub light: usize,
    /// The worker binary (default: next to this executable).
    pub worker: Option<PathBuf>,
    /// A PostgreSQL database to measure too (each measurement in a schema of its own, dropped
    /// afterwards).
    pub postgres: Option<String>,
}

/// CPU seconds used so far by this process and by its children that exited (the workers),
/// from `/proc/self/stat` (clock ticks of 10 ms: meaningful over a whole measurement).
fn cpu_secs() -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return (0.0, 0.0) };
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0.0)).collect();
    let tick = 100.0;
    let at = |i: usize| f.get(i).copied().unwrap_or(0.0) / tick;
    // utime, stime, cutime, cstime are fields 14..17 of the file: 11..14 after the name.
    (at(11) + at(12), at(13) + at(14))
}

/// One line of figures.
struct Figures {
    what: String,
    /// The store: `sqlite` or `postgres`.
    store: &'static str,
    /// SQLite's `synchronous` (`FULL`, `NORMAL`); empty for PostgreSQL.
    sync: &'static str,
    workers: usize,
    tasks: usize,
    secs: f64,
    start_us: Option<(f64, f64)>,
    done_us: (f64, f64),
    /// CPU microseconds per task: this process (store, executor, engine), and the workers.
    cpu_us: (f64, f64),
}

impl Figures {
    fn per_sec(&self) -> f64 {
        if self.secs > 0.0 {
            self.tasks as f64 / self.secs
        } else {
            0.0
        }
    }
}

pub(crate) fn worker_binary(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(p) => p,
        None => std::env::current_exe().context("cannot find this executable")?.with_file_name(WORKER),
    };
    if !path.exists() {
        bail!(
            "{} not found; build it with `cargo build --release -p nodus-tasks --bins` or pass --worker",
            path.display()
        );
    }
    Ok(path)
}

fn procs_manifest(worker: &Path) -> anyhow::Result<Manifest> {
    let text = include_str!("../../../examples/procs-app/manifest.json");
    let mut m = Manifest::parse(text, Format::Json).context("the example manifest")?;
    m.executable = worker.display().to_string();
    Ok(m)
}

/// Runs every measurement and prints the figures.
///
/// Fails when the worker cannot be found or started, the store cannot be opened, a task fails,
/// or a measurement does not finish in time.
pub async fn run(json: bool, load: TasksLoad) -> anyhow::Result<()> {
    if load.tasks == 0 || load.tasks > MAX_TASKS || load.submitters == 0 || load.submitters > 100_000 {
        bail!("--tasks must be in 1..={MAX_TASKS} and --submitters in 1..=100000");
    }
    let worker = worker_binary(load.worker.clone())?;
    let manifest = procs_manifest(&worker)?;
    let scratch = ScratchDir::create()?;
    let fsync = fsync_probe(scratch.path())?;
    report::progress(&format!("tasks: fsync of this disk now: p50 {:.0} us, p99 {:.0} us", fsync.0, fsync.1));
    let mut all = Vec::new();
    for (sync, name) in [(Synchronous::Full, "FULL"), (Synchronous::Normal, "NORMAL")] {
        let dir = scratch.path().join(name.to_lowercase());
        let backend = Backend::Sqlite(sync, name);
        report::progress(&format!("tasks: submit only, synchronous={name}"));
        all.push(measure(&dir.join("submit"), &manifest, &backend, 0, &load, Mode::SubmitOnly).await?);
        for workers in [1, 4] {
            report::progress(&format!("tasks: end to end, {workers} worker(s), synchronous={name}"));
            all.push(
                measure(&dir.join(format!("e2e{workers}")), &manifest, &backend, workers, &load, Mode::EndToEnd)
                    .await?,
            );
        }
        report::progress(&format!("tasks: light load, synchronous={name}"));
        all.push(measure(&dir.join("light"), &manifest, &backend, 1, &load, Mode::Light).await?);
    }
    if let Some(url) = &load.postgres {
        let backend = Backend::Postgres(url.clone());
        let dir = scratch.path().join("pg");
        let fsync = fsync_probe(scratch.path())?;
        report::progress(&format!(
            "tasks: PostgreSQL at {}; fsync of this disk now: p50 {:.0} us, p99 {:.0} us",
            nodus_tasks::store::redact(url),
            fsync.0,
            fsync.1
        ));
        report::progress("tasks: submit only, PostgreSQL");
        all.push(measure(&dir.join("submit"), &manifest, &backend, 0, &load, Mode::SubmitOnly).await?);
        for workers in [1, 4] {
            report::progress(&format!("tasks: end to end, {workers} worker(s), PostgreSQL"));
            all.push(
                measure(&dir.join(format!("e2e{workers}")), &manifest, &backend, workers, &load, Mode::EndToEnd)
                    .await?,
            );
        }
        report::progress("tasks: end to end, two managers on one database, 1 worker each, PostgreSQL");
        all.push(measure(&dir.join("two"), &manifest, &backend, 1, &load, Mode::TwoManagers).await?);
        report::progress("tasks: light load, PostgreSQL");
        all.push(measure(&dir.join("light"), &manifest, &backend, 1, &load, Mode::Light).await?);
    }
    print(&all, json, fsync);
    Ok(())
}

/// The disk's fsync latency right now (p50, p99 in microseconds): 4 KiB overwritten and
/// `fdatasync`ed 50 times in the scratch directory. With `synchronous=FULL` every commit waits
/// for one, so it bounds the figures and says how loaded the machine's disk is.
fn fsync_probe(dir: &Path) -> anyhow::Result<(f64, f64)> {
    use std::io::{Seek, Write};
    let path = dir.join("fsync-probe");
    let mut f = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path)?;
    let block = [0x5au8; 4096];
    f.write_all(&block)?;
    f.sync_all()?;
    let mut ns = Vec::with_capacity(50);
    for _ in 0..50 {
        f.seek(std::io::SeekFrom::Start(0))?;
        f.write_all(&block)?;
        let t = std::time::Instant::now();
        f.sync_data()?;
        ns.push(t.elapsed().as_nanos() as u64);
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
    ns.sort_unstable();
    Ok((percentile(&ns, 0.5) as f64 / 1000.0, percentile(&ns, 0.99) as f64 / 1000.0))
}

fn load_tasks(mode: &Mode, load: &TasksLoad) -> usize {
    match mode {
        Mode::Light => load.light,
        _ => load.tasks,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    SubmitOnly,
    EndToEnd,
    /// End to end with two managers on one (PostgreSQL) store.
    TwoManagers,
    Light,
}

/// The store a measurement runs on.
enum Backend {
    /// SQLite with this `synchronous` (and its name).
    Sqlite(Synchronous, &'static str),
    /// PostgreSQL at this URL.
    Postgres(String),
}

/// A scratch schema name for one PostgreSQL measurement.
fn bench_schema() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    format!("nodus_bench_{:016x}", h.finish())
}

/// Drops a measurement's schema.
async fn drop_schema(url: &str, schema: &str) -> anyhow::Result<()> {
    let (client, conn) =
        tokio_postgres::connect(url, tokio_postgres::NoTls).await.context("connect to drop the schema")?;
    let driver = tokio::spawn(conn);
    client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).await.context("drop the bench schema")?;
    drop(client);
    let _ = driver.await;
    Ok(())
}

/// One manager of a measurement: its engine, store and task service.
struct Node {
    engine: Engine,
    store: AnyStore,
    tasks: Tasks<AnyStore>,
}

/// Starts one manager: its engine with `workers` worker processes (none for submit only), and
/// its task service on `store`.
async fn start_node(
    dir: &Path,
    manifest: &Manifest,
    store: AnyStore,
    node: &str,
    workers: usize,
    load: &TasksLoad,
    mode: Mode,
) -> anyhow::Result<Node> {
    std::fs::create_dir_all(dir)?;
    let mut econfig = EngineConfig::new(dir.join("run"));
    econfig.kill_grace = Duration::from_secs(2);
    let engine = Engine::new(econfig);
    let mut tconfig = TasksConfig::new(node);
    tconfig.watch_capacity = (load.tasks * 4).max(1024);
    let tasks = Tasks::start(store.clone(), engine.clone(), tconfig).await?;
    if mode == Mode::SubmitOnly {
        tasks.set_app("procs", &manifest.procedures, None).await?;
    } else {
        let profile = Profile {
            pool_limit: workers,
            concurrency: 256,
            queue_limit: 1024,
            idle_timeout: None,
            ..Profile::default()
        };
        let limit = workers * profile.concurrency + profile.queue_limit;
        let spec = AppSpec { name: "procs".into(), dir: dir.to_path_buf(), manifest: manifest.clone(), profile };
        engine.start(spec).await?;
        engine.set_population("procs", workers).await?;
        // Every worker up before the clock starts.
        let ready = async {
            loop {
                let info = engine.info("procs").await?;
                let up = info.workers.iter().filter(|w| w.state == nodus_engine::worker::State::Active).count();
                if up >= workers {
                    return anyhow::Ok(());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), ready).await.context("the workers did not start")??;
        tasks.set_app("procs", &manifest.procedures, Some(limit)).await?;
    }
    Ok(Node { engine, store, tasks })
}

async fn measure(
    dir: &Path,
    manifest: &Manifest,
    backend: &Backend,
    workers: usize,
    load: &TasksLoad,
    mode: Mode,
) -> anyhow::Result<Figures> {
    std::fs::create_dir_all(dir)?;
    let cpu_before = cpu_secs();
    let schema = bench_schema();
    let managers = if mode == Mode::TwoManagers { 2 } else { 1 };
    let mut nodes = Vec::with_capacity(managers);
    for i in 0..managers {
        let store = match backend {
            Backend::Sqlite(sync, _) => {
                let mut c = SqliteConfig::new(dir.join("tasks.db"));
                c.synchronous = *sync;
                AnyStore::Sqlite(SqliteStore::open(c).context("open the task store")?)
            }
            Backend::Postgres(url) => {
                let mut c = PgConfig::new(url)?;
                c.schema = Some(schema.clone());
                AnyStore::Postgres(PgStore::open(c).await.context("open the task store")?)
            }
        };
        let (node_dir, name) = (dir.join(format!("node{i}")), format!("bench-{i}"));
        nodes.push(start_node(&node_dir, manifest, store, &name, workers, load, mode).await?);
    }

    // The watchers and each submitter keep their own timings (no lock, no lookups while the
    // load runs); they are joined by task id afterwards.
    let capacity = 2 * load_tasks(&mode, load);
    let watchers: Vec<_> = nodes
        .iter()
        .map(|node| {
            let mut changes = node.tasks.watch();
            tokio::spawn(async move {
                let mut seen: Vec<(TaskId, Instant, bool)> = Vec::with_capacity(capacity);
                loop {
                    match changes.recv().await {
                        Ok(c) => match c.status {
                            Some(Status::Running) => seen.push((c.id, Instant::now(), false)),
                            Some(Status::Done) => seen.push((c.id, Instant::now(), true)),
                            _ => {}
                        },
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            report::progress(&format!("  the latency watcher missed {n} changes"));
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    }
                }
                seen
            })
        })
        .collect();

    let (count, submitters) = match mode {
        Mode::Light => (load.light, 1),
        _ => (load.tasks, load.submitters),
    };
    let begin = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut joins = Vec::with_capacity(submitters);
    for k in 0..submitters {
        // Submitters take turns between the managers.
        let (tasks, next) = (nodes[k % nodes.len()].tasks.clone(), next.clone());
        joins.push(tokio::spawn(async move {
            let mut mine: Vec<(TaskId, Instant, u64)> = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let t0 = Instant::now();
                let sub = tasks.submit(Submission::new(NOOP, Vec::new())).await?;
                mine.push((sub.id.clone(), t0, t0.elapsed().as_nanos() as u64));
                if mode == Mode::Light {
                    match tasks.wait(&sub.id, Duration::from_secs(30)).await? {
                        Waited::Finished(f) if f.status == Status::Done => {}
                        other => bail!("task {} did not finish: {other:?}", sub.id),
                    }
                }
            }
            anyhow::Ok(mine)
        }));
    }
    let submitted = async {
        let mut all = Vec::with_capacity(count);
        for j in joins {
            all.extend(j.await.context("a submitter panicked")??);
        }
        anyhow::Ok(all)
    };
    let submitted =
        tokio::time::timeout(RUN_TIMEOUT, submitted).await.context("submissions did not finish in time")??;
    let done_so_far = |nodes: &[Node]| nodes.iter().map(|n| n.tasks.stats().done).sum::<u64>();
    let end = match mode {
        Mode::SubmitOnly => Instant::now(),
        _ => {
            let all_done = async {
                while done_so_far(&nodes) < count as u64 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Instant::now()
            };
            tokio::time::timeout(RUN_TIMEOUT, all_done).await.context("the tasks did not all finish in time")?
        }
    };
    let done_count = done_so_far(&nodes);
    let stale: u64 = nodes.iter().map(|n| n.tasks.stats().stale).sum();
    let (mut commits, mut operations) = (0, 0);
    for node in &nodes {
        let w = node.store.writer_stats();
        commits += w.commits;
        operations += w.operations;
    }
    for node in nodes {
        node.tasks.shutdown(Duration::from_secs(5)).await;
        drop(node.tasks);
        node.engine.shutdown().await;
        node.store.close().await;
    }
    if let Backend::Postgres(url) = backend {
        drop_schema(url, &schema).await?;
    }
    let cpu_after = cpu_secs();
    if mode != Mode::SubmitOnly && done_count < count as u64 {
        bail!("only {done_count} of {count} tasks were recorded done");
    }
    report::progress(&format!(
        "  {commits} store commits for {operations} operations ({:.1} per commit); stale completions {stale}",
        operations as f64 / commits.max(1) as f64,
    ));

    let mut seen = Vec::new();
    for w in watchers {
        seen.extend(w.await.context("the latency watcher panicked")?);
    }
    let mut acked: Vec<u64> = submitted.iter().map(|(_, _, ns)| *ns).collect();
    acked.sort_unstable();
    let at: HashMap<TaskId, Instant> = submitted.into_iter().map(|(id, t0, _)| (id, t0)).collect();
    let (mut started, mut done) = (Vec::new(), Vec::new());
    for (id, when, is_done) in seen {
        if let Some(t0) = at.get(&id) {
            let ns = when.saturating_duration_since(*t0).as_nanos() as u64;
            if is_done {
                done.push(ns);
            } else {
                started.push(ns);
            }
        }
    }
    started.sort_unstable();
    done.sort_unstable();
    let pct = |v: &[u64]| (percentile(v, 0.5) as f64 / 1000.0, percentile(v, 0.99) as f64 / 1000.0);
    let (what, start_us, done_us) = match mode {
        // Submit latency: until the submission was acknowledged (durable).
        Mode::SubmitOnly => ("submit only (done = acked)".to_string(), None, pct(&acked)),
        Mode::EndToEnd => (
            format!("end to end, {workers} worker{}", if workers == 1 { "" } else { "s" }),
            Some(pct(&started)),
            pct(&done),
        ),
        Mode::TwoManagers => ("two managers, 1 worker each".to_string(), Some(pct(&started)), pct(&done)),
        Mode::Light => ("light load, 1 at a time".to_string(), Some(pct(&started)), pct(&done)),
    };
    let (store, sync) = match backend {
        Backend::Sqlite(_, name) => ("sqlite", *name),
        Backend::Postgres(_) => ("postgres", ""),
    };
    Ok(Figures {
        what,
        store,
        sync,
        workers: workers * managers,
        tasks: count,
        secs: end.saturating_duration_since(begin).as_secs_f64(),
        start_us,
        done_us,
        cpu_us: (
            (cpu_after.0 - cpu_before.0) * 1e6 / count.max(1) as f64,
            (cpu_after.1 - cpu_before.1) * 1e6 / count.max(1) as f64,
        ),
    })
}

fn print(all: &[Figures], json: bool, fsync: (f64, f64)) {
    if json {
        println!("{{\"system\":\"disk\",\"fsync_p50_us\":{:.1},\"fsync_p99_us\":{:.1}}}", fsync.0, fsync.1);
        for f in all {
            let (s50, s99) = f.start_us.unwrap_or((0.0, 0.0));
            println!(
                "{{\"system\":\"nodus-tasks\",\"what\":\"{}\",\"store\":\"{}\",\"synchronous\":\"{}\",\"workers\":{},\"tasks\":{},\"secs\":{:.3},\
                 \"tasks_per_sec\":{:.1},\"start_p50_us\":{s50:.1},\"start_p99_us\":{s99:.1},\"done_p50_us\":{:.1},\"done_p99_us\":{:.1},\
                 \"cpu_us_per_task\":{:.1},\"worker_cpu_us_per_task\":{:.1}}}",
                f.what, f.store, f.sync, f.workers, f.tasks, f.secs, f.per_sec(), f.done_us.0, f.done_us.1, f.cpu_us.0, f.cpu_us.1
            );
        }
        return;
    }
    println!(
        "{:<28} {:>13} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>14}",
        "tasks", "store", "count", "tasks/s", "start p50", "start p99", "done p50", "done p99", "cpu/task"
    );
    for f in all {
        let (s50, s99) = match f.start_us {
            Some((a, b)) => (format!("{a:.0} us"), format!("{b:.0} us")),
            None => ("-".into(), "-".into()),
        };
        let (d50, d99) = (format!("{:.0} us", f.done_us.0), format!("{:.0} us", f.done_us.1));
        let cpu = format!("{:.0}+{:.0} us", f.cpu_us.0, f.cpu_us.1);
        let store = if f.sync.is_empty() { f.store.to_string() } else { format!("{} {}", f.store, f.sync) };
        println!(
            "{:<28} {:>13} {:>8} {:>10.0} {:>10} {:>10} {:>10} {:>10} {:>14}",
            f.what,
            store,
            f.tasks,
            f.per_sec(),
            s50,
            s99,
            d50,
            d99,
            cpu
        );
    }
    println!(
        "targets: >= 20000 tasks/s end to end with synchronous=FULL (stretch 50000); done p50 <= 2000 us at light load; \
         >= 10000 tasks/s end to end on PostgreSQL"
    );
}
