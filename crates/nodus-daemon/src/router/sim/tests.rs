//! Scenarios on the simulated network: start storm, hub crash, partition and heal, a flapping
//! link, a frozen node. A few hundred nodes, seconds of CI.
use super::*;

#[test]
fn a_small_cluster_converges_and_sees_its_hub_die() {
    let f = figures(SimConfig::new(20, 1), 30_000_000);
    assert!(f.converge_ms.is_some() && f.crash_seen_ms.is_some(), "{f:?}");
    assert_eq!(f.false_deaths, 0, "{f:?}");
}
