//! A real PostgreSQL server for the tests that need one: `$NODUS_TEST_PG` when set (CI starts a
//! throw-away cluster with `scripts/pg-test-cluster.sh` before the tests), else a throw-away
//! cluster of this test binary's own, started by the same script and removed when the binary
//! exits. Without any PostgreSQL installed the tests skip with a printed reason; under `CI=true`
//! they fail instead. Each store gets a fresh schema, so tests never see each other's tasks.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use nodus_tasks::store::{ClaimMode, PgConfig};

/// The script that makes clusters.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/pg-test-cluster.sh")
}

/// A throw-away cluster; stopped and removed when dropped (and by the script's watchdog when
/// this process dies first).
#[derive(Debug)]
pub struct Cluster {
    /// `postgres://nodus@127.0.0.1:PORT/postgres`.
    pub url: String,
    dir: PathBuf,
}

/// Why there is no server.
#[derive(Debug)]
pub struct NoServer(pub String);

impl Cluster {
    /// Starts a cluster. `Err`: no PostgreSQL is installed. Panics when one is installed but
    /// does not start.
    pub fn start() -> Result<Cluster, NoServer> {
        let out = Command::new("bash")
            .arg(script())
            .args(["start", "--owner-pid", &std::process::id().to_string()])
            .output()
            .expect("run scripts/pg-test-cluster.sh");
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.code() == Some(3) {
            return Err(NoServer(stderr.trim().to_string()));
        }
        assert!(out.status.success(), "scripts/pg-test-cluster.sh start failed: {stderr}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let var = |name: &str| {
            stdout
                .lines()
                .find_map(|l| {
                    l.strip_prefix("export ").and_then(|l| l.strip_prefix(name)).and_then(|l| l.strip_prefix('='))
                })
                .unwrap_or_else(|| panic!("the script printed no {name}: {stdout}"))
                .to_string()
        };
        Ok(Cluster { url: var("NODUS_TEST_PG"), dir: PathBuf::from(var("NODUS_TEST_PG_DIR")) })
    }

    /// `pg_ctl restart`: a fast shutdown (every connection is cut), then a start.
    pub fn restart(&self) {
        let out = Command::new("bash").arg(script()).arg("restart").arg(&self.dir).output().expect("run the script");
        assert!(out.status.success(), "restart failed: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(script()).arg("stop").arg(&self.dir).output();
    }
}

/// Whether a missing server fails the test rather than skipping it.
fn required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn skip_or_fail(why: &str) -> Option<String> {
    assert!(!required(), "CI=true and no PostgreSQL for the tests: {why}");
    eprintln!("SKIPPED: no PostgreSQL server for this test ({why}); install PostgreSQL or set NODUS_TEST_PG");
    None
}

/// The server's URL for this test: `$NODUS_TEST_PG`, else this binary's own cluster. `None`:
/// skip (a reason was printed).
pub fn server() -> Option<String> {
    if let Ok(url) = std::env::var("NODUS_TEST_PG") {
        if !url.is_empty() {
            return Some(url);
        }
    }
    static OWN: OnceLock<Result<Cluster, NoServer>> = OnceLock::new();
    match OWN.get_or_init(Cluster::start) {
        Ok(c) => Some(c.url.clone()),
        Err(NoServer(why)) => skip_or_fail(why),
    }
}

/// A cluster of this test's own (for tests that restart the server). `None`: skip.
pub fn own_cluster() -> Option<Cluster> {
    match Cluster::start() {
        Ok(c) => Some(c),
        Err(NoServer(why)) => skip_or_fail(&why).map(|_| unreachable!()),
    }
}

/// A fresh schema name.
pub fn fresh_schema() -> String {
    format!("t_{:016x}", rand::random::<u64>())
}

/// A store config on `url` in `schema`.
pub fn config(url: &str, schema: &str, claim: ClaimMode) -> PgConfig {
    let mut c = PgConfig::new(url).expect("a valid URL");
    c.schema = Some(schema.to_string());
    c.claim = claim;
    c
}
