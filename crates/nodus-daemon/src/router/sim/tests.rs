//! Scenarios on the simulated network: start storm, hub crash, partition and heal, a flapping
//! link, a frozen node. Up to a thousand nodes, seconds of CI.
use super::*;

/// Every running node reports `live` live nodes out of `known`.
fn all_see(s: &Sim, live: usize, known: usize) -> bool {
    (0..s.len()).filter(|&i| s.running(i)).all(|i| s.health(i) == (live, known))
}

#[test]
fn a_small_cluster_converges_and_sees_its_hub_die() {
    let f = figures(SimConfig::new(20, 1), 30_000_000);
    assert!(f.converge_ms.is_some() && f.crash_seen_ms.is_some(), "{f:?}");
    assert_eq!(f.false_deaths, 0, "{f:?}");
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let a = figures(SimConfig::new(30, 7), 30_000_000);
    let b = figures(SimConfig::new(30, 7), 30_000_000);
    assert_eq!((a.converge_ms, a.crash_seen_ms, a.events), (b.converge_ms, b.crash_seen_ms, b.events));
    assert_eq!(a.start_bytes, b.start_bytes);
}

#[test]
fn three_hundred_nodes_started_together_converge_without_false_deaths() {
    start_storm(300);
}

#[test]
#[cfg_attr(debug_assertions, ignore = "a thousand nodes take a few minutes in a debug build: cargo test --release")]
fn a_thousand_nodes_started_together_converge_without_false_deaths() {
    start_storm(1000);
}

fn start_storm(n: usize) {
    // The start storm: every node at once, heartbeats at the daemon's default period.
    let mut config = SimConfig::new(n, 3);
    config.heartbeat = Duration::from_millis(250);
    let mut sim = Sim::new(config);
    sim.start_all();
    let took = sim.run_until(20_000_000, |s| all_see(s, n, n));
    let took = took.expect("converged");
    assert!(took < 5_000_000, "converged in {} ms", took / 1000);
    assert_eq!(sim.false_deaths(), 0, "{:?}", &sim.deaths()[..sim.deaths().len().min(5)]);
    // Flooding: each version of a record crosses each link at most once each way, so what a
    // node sends per membership change is O(its degree), never O(N) (the old gossip re-sent
    // every record to every link on every change).
    let versions: u64 = (0..n).filter_map(|i| sim.router(i)).map(|r| r.topology.local().seq).sum();
    let degree = 2.0 * sim.links() as f64 / n as f64;
    let per_change = sim.traffic().gossip.0 as f64 / n as f64 / versions as f64;
    assert!(per_change < 2.0 * degree, "{per_change} gossip messages per node per change (degree {degree})");
    // Idle: heartbeats and a summary, whatever N.
    sim.run_for(2_000_000);
    let before = sim.traffic();
    sim.run_for(5_000_000);
    let idle = sim.traffic().since(&before).total();
    let per_link = idle.1 as f64 / sim.links() as f64 / 5.0;
    assert!(per_link < 1000.0, "{per_link} idle bytes per link per second");
    assert_eq!(sim.false_deaths(), 0);
}

#[test]
fn idle_bytes_per_link_do_not_grow_with_the_cluster() {
    let idle = |n: usize| {
        let mut sim = Sim::new(SimConfig::new(n, 5));
        sim.start_all();
        sim.run_until(20_000_000, |s| all_see(s, n, n)).expect("converged");
        sim.run_for(2_000_000);
        let before = sim.traffic();
        sim.run_for(10_000_000);
        sim.traffic().since(&before).total().1 as f64 / sim.links() as f64 / 10.0
    };
    let (small, large) = (idle(20), idle(150));
    assert!(large < small * 1.2, "20 nodes: {small} B/link/s, 150 nodes: {large}");
}

#[test]
fn a_crashed_hub_is_seen_everywhere_within_the_diameter_not_n_squared() {
    let n = 200;
    let mut sim = Sim::new(SimConfig::new(n, 11));
    sim.start_all();
    sim.run_until(20_000_000, |s| all_see(s, n, n)).expect("converged");
    sim.run_for(1_000_000);
    let hub = sim.busiest();
    let before = sim.traffic();
    sim.crash(hub);
    let mut under = false;
    let took = sim
        .run_until(10_000_000, |s| {
            under |= (0..s.len()).any(|i| s.running(i) && s.health(i).0 < n - 1);
            all_see(s, n - 1, n)
        })
        .expect("the crash was seen");
    assert!(took < 1_000_000, "seen everywhere in {} ms", took / 1000);
    assert!(!under, "no node ever reported fewer live nodes than were running");
    assert_eq!(sim.false_deaths(), 0);
    let per_node = sim.traffic().since(&before).gossip.0 as f64 / (n - 1) as f64;
    assert!(per_node < 30.0, "{per_node} gossip messages per node for one crash");
}

#[test]
fn a_partition_heals_and_the_cluster_is_whole_again() {
    let n = 100;
    let mut sim = Sim::new(SimConfig::new(n, 21));
    sim.start_all();
    sim.run_until(20_000_000, |s| all_see(s, n, n)).expect("converged");
    let group: Vec<usize> = (0..n / 4).collect();
    sim.partition(&group);
    // Both sides notice (heartbeats stop), each sees only itself as live.
    sim.run_until(20_000_000, |s| {
        (0..s.len()).all(|i| {
            let (live, _) = s.health(i);
            live <= if i < n / 4 { n / 4 } else { n - n / 4 }
        })
    })
    .expect("the partition was noticed");
    assert!(sim.deaths().iter().all(|d| d.deserved), "only links across the partition died");
    sim.heal();
    let took = sim.run_until(30_000_000, |s| all_see(s, n, n)).expect("healed");
    assert!(took < 10_000_000, "whole again in {} ms", took / 1000);
    assert_eq!(sim.false_deaths(), 0);
}

#[test]
fn a_flapping_link_costs_its_ends_not_the_cluster_a_storm() {
    let n = 100;
    let mut sim = Sim::new(SimConfig::new(n, 31));
    sim.start_all();
    sim.run_until(20_000_000, |s| all_see(s, n, n)).expect("converged");
    sim.run_for(1_000_000);
    let hub = sim.busiest();
    let peer = sim
        .router(hub)
        .and_then(|r| r.links.keys().next().cloned())
        .and_then(|p| p.strip_prefix('n').and_then(|s| s.parse::<usize>().ok()))
        .expect("the hub has a peer");
    let before = sim.traffic();
    for _ in 0..5 {
        sim.cut(hub, peer);
        sim.run_for(3_000_000);
        sim.restore(hub, peer);
        sim.run_for(3_000_000);
    }
    // Everyone still sees everyone (the graph stays connected around the link).
    sim.run_until(20_000_000, |s| all_see(s, n, n)).expect("whole again");
    assert_eq!(sim.false_deaths(), 0);
    let per_node = sim.traffic().since(&before).gossip.0 as f64 / n as f64;
    assert!(per_node < 100.0, "{per_node} gossip messages per node for 5 flaps");
}

#[test]
fn a_frozen_node_is_declared_dead_and_comes_back_when_thawed() {
    let n = 50;
    let mut sim = Sim::new(SimConfig::new(n, 41));
    sim.start_all();
    sim.run_until(20_000_000, |s| all_see(s, n, n)).expect("converged");
    sim.freeze(7);
    sim.run_until(10_000_000, |s| (0..s.len()).filter(|&i| i != 7).all(|i| s.health(i).0 == n - 1))
        .expect("the frozen node was declared dead");
    sim.thaw(7);
    sim.run_until(20_000_000, |s| all_see(s, n, n)).expect("back");
    assert_eq!(sim.false_deaths(), 0, "{:?}", sim.deaths());
}

#[test]
fn a_link_flapping_fifty_times_a_second_makes_a_few_record_versions_and_settles_to_the_truth() {
    use crate::router::links::MIN_RECORD_INTERVAL_MS;
    let n = 60;
    let mut sim = Sim::new(SimConfig::new(n, 51));
    sim.start_all();
    sim.run_until(20_000_000, |s| all_see(s, n, n)).expect("converged");
    sim.run_for(1_000_000);
    let a = 0;
    let b = sim.dials(a)[0];
    let seq = |s: &Sim, i: usize| s.router(i).map_or(0, |r| r.topology.local().seq);
    let (seq_a, seq_b) = (seq(&sim, a), seq(&sim, b));
    let before = sim.traffic();
    // Down and up again every 20 ms for a second: 100 changes of each end's links.
    let mut flaps = 0;
    for _ in 0..50 {
        sim.reset(a, b);
        sim.run_for(5_000);
        sim.dial_now(a, b);
        sim.run_for(15_000);
        flaps += usize::from(sim.router(a).is_some_and(|r| r.links.contains_key(sim.name(b))));
    }
    assert!(flaps >= 45, "the link came back up after {flaps} of 50 resets");
    // One version per interval at most (and one more at its end), not one per change.
    let most = (1_000 / MIN_RECORD_INTERVAL_MS) as u64 + 2;
    let mut versions = 0;
    for (i, before) in [(a, seq_a), (b, seq_b)] {
        let made = seq(&sim, i) - before;
        assert!(made <= most, "n{i} made {made} versions of its record in a second of flapping");
        versions += made;
    }
    // What the cluster carried follows the versions (each floods once over every link), not the
    // 200 changes: besides, each new link costs its two ends one exchange of records.
    let degree = 2.0 * sim.links() as f64 / n as f64;
    let per_node = sim.traffic().since(&before).gossip.0 as f64 / n as f64;
    let bound = (versions as f64 + 2.0) * degree + 2.0 * 2.0 * 50.0 / n as f64 + 5.0;
    assert!(per_node < bound, "{per_node} gossip messages per node for {versions} versions (bound {bound})");
    // Settled: every node holds each end's last version, which says what is true.
    sim.run_for(1_000_000);
    sim.run_until(5_000_000, |s| all_see(s, n, n)).expect("whole again");
    for i in [a, b] {
        let truth = sim.router(i).expect("running");
        let links: BTreeSet<String> = truth.links.keys().cloned().collect();
        assert_eq!(truth.topology.local().links, links, "n{i}'s record says what is true");
        for j in 0..n {
            let held = &sim.router(j).expect("running").topology.records()[sim.name(i)];
            assert_eq!(held, truth.topology.local(), "n{j} holds n{i}'s last version");
        }
    }
    assert!(sim.router(a).unwrap().links.contains_key(sim.name(b)), "the link is up at the end");
    assert_eq!(sim.false_deaths(), 0);
}
