//! One manager and two worker nodes on a simulated network (virtual time, messages lost,
//! duplicated and reordered), the manager's store a real SQLite file: a worker node is killed
//! mid-run and comes back empty, the manager is killed and restarted from its store, and the
//! other worker is cut off from the manager long enough to be judged gone, then healed (its
//! late completions of old attempts must be discarded). Every task must complete exactly once
//! in the store (lost 0, duplicate completions 0), though some run more than once.
//!
//! Deterministic: one seeded generator drives the network and the executors, and every store
//! operation is awaited in turn, so a seed always plays out the same way.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::time::Duration;

use nodus_tasks::cluster::fetch::{chunk_of, sha256_hex};
use nodus_tasks::cluster::{
    AgentStore, AppPackage, InDoubt, Manager, ManagerAction, ManagerConfig, Packet, RegistryChange, Specs,
    WorkerAction, WorkerConfig, WorkerNode,
};
use nodus_tasks::sched::AttemptEnd;
use nodus_tasks::store::{Fenced, ListFilter, Outcome, SqliteConfig, SqliteStore, Store, Synchronous};
use nodus_tasks::task::{json, Lease, NewTask, Status, TaskId, UnixMs};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const T0: UnixMs = UnixMs(1_700_000_000_000);
const WORKERS: [&str; 2] = ["w1", "w2"];

#[derive(Debug)]
enum Event {
    /// A message on the wire, as a text line.
    Deliver {
        from: String,
        to: String,
        line: String,
    },
    /// The transport tells `to` that its request `id` to `peer` could not be delivered.
    Undeliverable {
        to: String,
        peer: String,
        id: u64,
    },
    /// An attempt ends on a worker's executor (of that worker's incarnation).
    Ended {
        worker: String,
        life: u32,
        id: TaskId,
        lease: Lease,
        value: i64,
    },
    KillWorker(String),
    StartWorker(String),
    KillManager,
    StartManager,
    /// Messages between the two are lost until `Heal`.
    Cut(String, String),
    Heal(String, String),
}

struct Sim {
    rng: StdRng,
    now: UnixMs,
    seq: u64,
    events: BinaryHeap<Reverse<(UnixMs, u64)>>,
    bodies: BTreeMap<u64, Event>,
    store: SqliteStore,
    manager: Option<Manager>,
    manager_life: u64,
    workers: BTreeMap<String, (Option<WorkerNode>, u32)>,
    package: AppPackage,
    package_bytes: Vec<u8>,
    /// Per worker: the package bytes written so far.
    downloads: BTreeMap<String, Vec<u8>>,
    killed: BTreeSet<(String, TaskId, Lease)>,
    loss: f64,
    dup: f64,
    cut: BTreeSet<(String, String)>,
    // What happened.
    runs: BTreeMap<TaskId, u32>,
    applied_done: BTreeMap<TaskId, u32>,
    stale: u64,
    /// Late completions of abandoned attempts the manager discarded without a write.
    late_discarded: u64,
    /// Every record the store answered: (task, lease, applied).
    records: Vec<(TaskId, Lease, bool)>,
    messages: u64,
    dropped: u64,
    fetched_packages: u64,
}

fn manager_config() -> ManagerConfig {
    let mut c = ManagerConfig::new("m1", WORKERS.iter().map(|w| w.to_string()));
    c.ping_interval = Duration::from_millis(500);
    c.silent_after = Duration::from_millis(1_500);
    c.gone_after = Duration::from_secs(4);
    c.request_timeout = Duration::from_millis(300);
    c.retries = 4;
    c.worker_grace = Duration::from_secs(5);
    c.lease_grace = Duration::from_secs(20);
    c.claim_batch = 64;
    c.poll_interval = Duration::from_millis(500);
    c
}

fn specs() -> Specs {
    Specs {
        cores: 4,
        memory: 8 << 30,
        concurrency: 8,
        queue: 8,
        ip: "10.0.0.2".into(),
        mac: "52:54:00:00:00:02".into(),
        apps: vec![],
        procedures: vec!["procs.double".into()],
    }
}

impl Sim {
    fn at(&mut self, t: UnixMs, ev: Event) {
        self.seq += 1;
        self.events.push(Reverse((t, self.seq)));
        self.bodies.insert(self.seq, ev);
    }

    fn worker_config(&self, name: &str) -> WorkerConfig {
        let mut c = WorkerConfig::new(name, vec!["m1".into()], specs());
        c.ping_interval = Duration::from_millis(500);
        c.manager_timeout = Duration::from_secs(3);
        c.request_timeout = Duration::from_millis(300);
        c.pair_backoff_min = Duration::from_millis(100);
        c.pair_backoff_max = Duration::from_secs(1);
        c.fetch_chunk = 16 << 10;
        c
    }

    fn up(&self, node: &str) -> bool {
        if node == "m1" {
            self.manager.is_some()
        } else {
            self.workers.get(node).is_some_and(|(w, _)| w.is_some())
        }
    }

    /// Puts a packet on the wire: lost, duplicated or delayed at random.
    fn send(&mut self, from: &str, to: &str, p: &Packet) {
        self.messages += 1;
        let mut m = p.to_message();
        m.from = nodus_wire::Address::new(from, "tasks");
        m.to = nodus_wire::Address::new(to, "tasks");
        let line = nodus_wire::text::to_line(&m);
        if !self.up(to) {
            self.dropped += 1;
            // The router sometimes knows at once that the node is unreachable.
            if !p.body.is_answer() && self.rng.gen_bool(0.5) {
                let t = self.now.plus(Duration::from_millis(self.rng.gen_range(1..20)));
                self.at(t, Event::Undeliverable { to: from.into(), peer: to.into(), id: p.id });
            }
            return;
        }
        let pair = if from < to { (from.to_string(), to.to_string()) } else { (to.to_string(), from.to_string()) };
        if self.cut.contains(&pair) || self.rng.gen_bool(self.loss) {
            self.dropped += 1;
            return;
        }
        let copies = if self.rng.gen_bool(self.dup) { 2 } else { 1 };
        for _ in 0..copies {
            let t = self.now.plus(Duration::from_millis(self.rng.gen_range(1..30)));
            self.at(t, Event::Deliver { from: from.into(), to: to.into(), line: line.clone() });
        }
    }

    async fn start_manager(&mut self) {
        self.manager_life += 1;
        let agents = self.store.agents().await.unwrap();
        let mut m = Manager::new(manager_config(), agents, 1000 + self.manager_life, self.now);
        m.set_app("procs", Some(self.package.clone()), self.now);
        let running = self
            .store
            .list(ListFilter { status: Some(Status::Running), limit: 1_000_000, ..ListFilter::default() }, self.now)
            .await
            .unwrap();
        let in_doubt = running
            .into_iter()
            .filter_map(|t| {
                let worker = t.owner.clone()?;
                Some(InDoubt {
                    id: t.id,
                    lease: t.lease,
                    worker,
                    app: "procs".into(),
                    attempt: t.attempt,
                    max_attempts: t.max_attempts,
                    timeout: t.timeout,
                    started_at: t.started_at.unwrap_or(self.now),
                })
            })
            .collect();
        m.restore(in_doubt, self.now);
        self.manager = Some(m);
    }

    fn start_worker(&mut self, name: &str) {
        let life = self.workers.get(name).map_or(0, |(_, l)| *l) + 1;
        let w = WorkerNode::new(self.worker_config(name), self.rng.gen(), self.now);
        self.workers.insert(name.to_string(), (Some(w), life));
        self.downloads.remove(name);
    }

    /// Carries out every node's actions until none are left.
    async fn drain(&mut self) {
        loop {
            let mut any = false;
            while let Some(a) = self.manager.as_mut().and_then(Manager::poll_action) {
                any = true;
                self.manager_action(a).await;
            }
            for name in WORKERS {
                while let Some(a) =
                    self.workers.get_mut(name).and_then(|(w, _)| w.as_mut()).and_then(WorkerNode::poll_action)
                {
                    any = true;
                    self.worker_action(name, a);
                }
            }
            if !any {
                return;
            }
        }
    }

    async fn manager_action(&mut self, a: ManagerAction) {
        let now = self.now;
        match a {
            ManagerAction::Send { to, packet } => self.send("m1", &to, &packet),
            ManagerAction::Claim(c) => {
                let (owner, app, max) = (c.owner.clone(), c.app.clone(), c.max);
                let claimed = self.store.claim(c).await.unwrap();
                self.manager.as_mut().unwrap().handle_claimed(&owner, &app, max, Ok(claimed), now);
            }
            ManagerAction::Record(f) => {
                let (id, lease) = (f.id.clone(), f.lease);
                let done = matches!(f.outcome, Outcome::Done(_));
                let fenced = self.store.finish(vec![f]).await.unwrap();
                self.records.push((id.clone(), lease, fenced[0] == Fenced::Applied));
                match fenced[0] {
                    Fenced::Applied if done => *self.applied_done.entry(id.clone()).or_default() += 1,
                    Fenced::Applied => {}
                    Fenced::Stale => self.stale += 1,
                }
                self.manager.as_mut().unwrap().handle_recorded(&id, lease, now);
            }
            ManagerAction::Agent(RegistryChange::Save(a)) => self.store.save_agent(a).await.unwrap(),
            ManagerAction::Agent(RegistryChange::Remove(n)) => {
                self.store.remove_agent(n).await.unwrap();
            }
            ManagerAction::ServePackage { to, id, hash, offset, max_len, .. } => {
                assert_eq!(hash, self.package.hash);
                let body = chunk_of(&self.package_bytes, offset, max_len);
                self.send("m1", &to, &Packet::new(id, body));
            }
            ManagerAction::Reap(t) => {
                self.store.reap(t).await.unwrap();
            }
            ManagerAction::Purge(t, max) => {
                self.store.purge(t, max).await.unwrap();
            }
        }
    }

    fn worker_action(&mut self, name: &str, a: WorkerAction) {
        match a {
            WorkerAction::Send { to, packet } => self.send(name, &to, &packet),
            WorkerAction::Run(spec) => {
                *self.runs.entry(spec.id.clone()).or_default() += 1;
                let n: Vec<i64> = serde_json::from_str(spec.args.get()).unwrap();
                let life = self.workers[name].1;
                let t = self.now.plus(Duration::from_millis(self.rng.gen_range(5..100)));
                let ev = Event::Ended { worker: name.into(), life, id: spec.id, lease: spec.lease, value: n[0] * 2 };
                self.at(t, ev);
            }
            WorkerAction::Kill { id, lease } => {
                self.killed.insert((name.to_string(), id, lease));
            }
            WorkerAction::PackageData { offset, data, .. } => {
                let buf = self.downloads.entry(name.to_string()).or_default();
                assert_eq!(buf.len() as u64, offset, "chunks arrive in order");
                buf.extend_from_slice(&data);
            }
            WorkerAction::Install(p) => {
                let buf = self.downloads.remove(name).unwrap_or_default();
                assert_eq!(sha256_hex(&buf), p.hash, "what was written is what was verified");
                self.fetched_packages += 1;
                let now = self.now;
                if let Some((Some(w), _)) = self.workers.get_mut(name) {
                    w.handle_installed(&p, Ok(()), now);
                }
            }
            WorkerAction::DropPackage(_) => {
                self.downloads.remove(name);
            }
        }
    }

    async fn handle(&mut self, ev: Event) {
        let now = self.now;
        match ev {
            Event::Deliver { from, to, line } => {
                let m = nodus_wire::text::from_line(&line).unwrap();
                let p = Packet::from_message(&m).unwrap();
                if to == "m1" {
                    if let Some(m) = self.manager.as_mut() {
                        m.handle_packet(&from, p, now);
                    }
                } else if let Some((Some(w), _)) = self.workers.get_mut(&to) {
                    w.handle_packet(&from, p, now);
                }
            }
            Event::Undeliverable { to, peer, id } => {
                if to == "m1" {
                    if let Some(m) = self.manager.as_mut() {
                        m.handle_undeliverable(&peer, id, now);
                    }
                } else if let Some((Some(w), _)) = self.workers.get_mut(&to) {
                    w.handle_undeliverable(&peer, id, now);
                }
            }
            Event::Ended { worker, life, id, lease, value } => {
                if self.killed.remove(&(worker.clone(), id.clone(), lease)) {
                    return;
                }
                if let Some((Some(w), l)) = self.workers.get_mut(&worker) {
                    if *l == life {
                        w.handle_end(&id, lease, AttemptEnd::Returned(json(&value.to_string()).unwrap()), now);
                    }
                }
            }
            Event::KillWorker(name) => {
                self.workers.get_mut(&name).unwrap().0 = None;
            }
            Event::StartWorker(name) => self.start_worker(&name),
            Event::KillManager => {
                let m = self.manager.take().unwrap();
                self.late_discarded += m.stats().late_discarded;
            }
            Event::StartManager => self.start_manager().await,
            Event::Cut(a, b) => {
                self.cut.insert((a, b));
            }
            Event::Heal(a, b) => {
                self.cut.remove(&(a, b));
            }
        }
    }

    fn next_deadline(&self) -> Option<UnixMs> {
        let nodes = self
            .manager
            .iter()
            .filter_map(Manager::next_deadline)
            .chain(self.workers.values().filter_map(|(w, _)| w.as_ref().and_then(WorkerNode::next_deadline)));
        nodes.chain(self.events.peek().map(|Reverse((t, _))| *t)).min()
    }

    fn tick(&mut self) {
        let now = self.now;
        if let Some(m) = self.manager.as_mut().filter(|m| m.next_deadline().is_some_and(|d| d <= now)) {
            m.tick(now);
        }
        for (w, _) in self.workers.values_mut() {
            if let Some(w) = w.as_mut().filter(|w| w.next_deadline().is_some_and(|d| d <= now)) {
                w.tick(now);
            }
        }
    }
}

struct Report {
    submitted: usize,
    completed: usize,
    lost: usize,
    duplicates: usize,
    executions: u64,
    stale: u64,
    old_attempts_discarded: usize,
    messages: u64,
    dropped: u64,
    fetched: u64,
    virtual_secs: f64,
}

async fn run(seed: u64, tasks: usize, loss: f64) -> Report {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = SqliteConfig::new(dir.path().join("manager.db"));
    cfg.synchronous = Synchronous::Off;
    let store = SqliteStore::open(cfg).unwrap();
    let package_bytes: Vec<u8> = (0..100_000u32).map(|n| (n.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let package = AppPackage {
        app: "procs".into(),
        version: "1".into(),
        hash: sha256_hex(&package_bytes),
        size: package_bytes.len() as u64,
    };
    let mut sim = Sim {
        rng: StdRng::seed_from_u64(seed),
        now: T0,
        seq: 0,
        events: BinaryHeap::new(),
        bodies: BTreeMap::new(),
        store,
        manager: None,
        manager_life: 0,
        workers: BTreeMap::new(),
        package,
        package_bytes,
        downloads: BTreeMap::new(),
        killed: BTreeSet::new(),
        loss,
        dup: 0.01,
        cut: BTreeSet::new(),
        late_discarded: 0,
        records: Vec::new(),
        runs: BTreeMap::new(),
        applied_done: BTreeMap::new(),
        stale: 0,
        messages: 0,
        dropped: 0,
        fetched_packages: 0,
    };
    let mut ids = Vec::with_capacity(tasks);
    for chunk in (0..tasks).collect::<Vec<_>>().chunks(500) {
        let batch: Vec<NewTask> = chunk
            .iter()
            .map(|&n| {
                let id = TaskId::generate(T0, &mut sim.rng);
                ids.push((id.clone(), n as i64));
                NewTask {
                    id,
                    procedure: "procs.double".into(),
                    app: "procs".into(),
                    args: json(&format!("[{n}]")).unwrap(),
                    max_attempts: 5,
                    timeout: Duration::from_secs(30),
                    parent: None,
                    key: None,
                    created_at: T0,
                    deadline: None,
                }
            })
            .collect();
        sim.store.submit(batch).await.unwrap();
    }
    sim.start_manager().await;
    for w in WORKERS {
        sim.start_worker(w);
    }
    let at = |ms: u64| T0.plus(Duration::from_millis(ms));
    sim.at(at(3_000), Event::KillWorker("w1".into()));
    sim.at(at(8_000), Event::StartWorker("w1".into()));
    sim.at(at(5_000), Event::KillManager);
    sim.at(at(6_500), Event::StartManager);
    sim.at(at(9_000), Event::Cut("m1".into(), "w2".into()));
    sim.at(at(15_000), Event::Heal("m1".into(), "w2".into()));

    let limit = at(600_000);
    let mut checked = UnixMs(0);
    loop {
        sim.drain().await;
        if sim.now >= checked.plus(Duration::from_secs(1)) && sim.manager.is_some() {
            checked = sim.now;
            let c = sim.store.counts(sim.now).await.unwrap();
            if c.pending + c.running == 0 {
                break;
            }
        }
        let Some(next) = sim.next_deadline() else { break };
        assert!(next <= limit, "the tasks did not finish within 600 virtual seconds");
        sim.now = next.max(sim.now);
        while let Some(Reverse((t, seq))) = sim.events.peek().copied() {
            if t > sim.now {
                break;
            }
            sim.events.pop();
            let ev = sim.bodies.remove(&seq).unwrap();
            sim.handle(ev).await;
            sim.drain().await;
        }
        sim.tick();
    }

    // Every task is done with its own result, recorded once.
    let mut completed = 0;
    let mut final_lease = BTreeMap::new();
    for (id, n) in &ids {
        let t = sim.store.get(id.clone(), sim.now).await.unwrap().expect("stored");
        if t.status == Status::Done {
            assert_eq!(t.result.as_ref().unwrap().get(), (n * 2).to_string(), "{id}");
            completed += 1;
        }
        final_lease.insert(id.clone(), t.lease);
    }
    // Late completions of given-up attempts: answered by the manager without a write, or
    // written and refused by the store (an attempt older than the one that completed the task).
    let refused = sim.records.iter().filter(|(id, lease, applied)| !applied && *lease < final_lease[id]).count();
    let late_here = sim.manager.as_ref().map_or(0, |m| m.stats().late_discarded);
    let old_attempts_discarded = refused + (sim.late_discarded + late_here) as usize;
    assert!(
        sim.records.iter().all(|(id, lease, applied)| !applied || *lease <= final_lease[id]),
        "nothing from an old attempt was applied after a newer one started"
    );
    let duplicates = sim.applied_done.values().map(|&n| n as usize - 1).sum();
    let report = Report {
        submitted: tasks,
        completed,
        lost: tasks - completed,
        duplicates,
        executions: sim.runs.values().map(|&n| u64::from(n)).sum(),
        stale: sim.stale,
        old_attempts_discarded,
        messages: sim.messages,
        dropped: sim.dropped,
        fetched: sim.fetched_packages,
        virtual_secs: sim.now.since(T0).as_secs_f64(),
    };
    sim.store.close().await;
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_and_two_workers_lose_nothing_and_complete_nothing_twice_under_faults() {
    // Two seeds at 5 % loss, one at 20 % (where pairing and fetches are slow enough that the
    // faults may hit no running task).
    for (seed, loss) in [(1, 0.05), (2, 0.05), (3, 0.2)] {
        let r = run(seed, 3_000, loss).await;
        eprintln!(
            "seed {seed}: submitted {}, completed {}, lost {}, duplicate completions {}; executions {} ({} re-runs), \
             late reports of given-up attempts discarded {} (stale store writes {}), packages fetched {}, messages {} ({} lost or to dead nodes), \
             {:.1} virtual s",
            r.submitted,
            r.completed,
            r.lost,
            r.duplicates,
            r.executions,
            r.executions - r.submitted as u64,
            r.old_attempts_discarded,
            r.stale,
            r.fetched,
            r.messages,
            r.dropped,
            r.virtual_secs
        );
        assert_eq!((r.submitted, r.completed, r.lost, r.duplicates), (3_000, 3_000, 0, 0), "seed {seed}");
        if loss < 0.1 {
            assert!(r.executions > r.submitted as u64, "seed {seed}: the faults made some tasks run again");
            assert!(r.old_attempts_discarded > 0, "seed {seed}: the cut worker's late reports were discarded");
        }
        assert!(r.fetched >= 2, "seed {seed}: each worker fetched the package (w1 again after its restart)");
    }
}
