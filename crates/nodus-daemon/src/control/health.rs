//! The node's own flags (unit `nodus`), raised while a condition holds and lowered when it clears:
//!
//! | flag | raised when | priority |
//! |---|---|---|
//! | `nodus/cluster/node-unreachable` | a known node has been unreachable for `[control] unreachable_flag_secs` | 50 |
//! | `nodus/storage/data-dir-unwritable` | a write, sync and delete in the data directory fails (checked every `write_check_secs`) | 90 |
//! | `nodus/apps/crash-loop-<app>` | an app is in the failed state (its workers kept crashing) | 70 |
//! | `nodus/tasks/store-failure` | the task store fails (raised by the tasks mount through [`NodeFlags::raise_own`](crate::flags::NodeFlags::raise_own)) | 80 |
//!
//! The data directory check cannot record its own flag when the flag directory is inside the
//! unwritable data directory: it is then logged (and the flag is raised as soon as flags can be
//! written again, which is when the directory is writable again, so it is lowered at once).

use crate::flags::NodeFlags;
use crate::server::Shared;
use nodus_control::flags::{check_name, MAX_NAME_BYTES};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tracing::warn;

/// Section and name of the unreachable-node flag.
pub(crate) const UNREACHABLE: (&str, &str) = ("cluster", "node-unreachable");
/// Section and name of the data directory flag.
pub(crate) const UNWRITABLE: (&str, &str) = ("storage", "data-dir-unwritable");
/// Section of the crash-loop flags; each is named `crash-loop-<app>`.
pub(crate) const APPS: &str = "apps";
/// Section and name of the task store flag (raised by the tasks mount).
pub const TASK_STORE: (&str, &str) = ("tasks", "store-failure");
/// The file the data directory check writes and deletes.
const PROBE_FILE: &str = ".nodus-write-check";

/// What the watchers remember between checks.
pub(crate) struct Health {
    flags: NodeFlags,
    data_dir: PathBuf,
    unreachable_after_ms: i64,
    write_every_ms: i64,
    /// Unreachable nodes, since when.
    down_since: BTreeMap<String, i64>,
    last_write_check: Option<i64>,
}

impl Health {
    pub(crate) fn new(shared: &Shared) -> Health {
        let c = &shared.config().control;
        Health {
            flags: shared.flags().clone(),
            data_dir: shared.config().data_dir.clone(),
            unreachable_after_ms: i64::try_from(c.unreachable_flag_secs.saturating_mul(1000)).unwrap_or(i64::MAX),
            write_every_ms: i64::try_from(c.write_check_secs.saturating_mul(1000)).unwrap_or(i64::MAX),
            down_since: BTreeMap::new(),
            last_write_check: None,
        }
    }

    /// One round of checks at `now`: unreachable nodes, the data directory (when due), apps in
    /// crash loop.
    pub(crate) async fn check(&mut self, shared: &Shared, failed_apps: &[(String, String)], now: i64) {
        self.unreachable(shared.unreachable_nodes(), now).await;
        if self.last_write_check.is_none_or(|t| now - t >= self.write_every_ms) {
            self.last_write_check = Some(now);
            let dir = self.data_dir.clone();
            let result = tokio::task::spawn_blocking(move || write_check(&dir)).await;
            let (section, name) = UNWRITABLE;
            match result {
                Ok(Ok(())) => self.flags.lower_own(section, name).await,
                Ok(Err(e)) => {
                    let message = format!(
                        "node cannot write its data directory {}: {e}; the cache journal, apps and flags cannot be saved: \
                         free space or fix permissions",
                        self.data_dir.display()
                    );
                    warn!(dir = %self.data_dir.display(), error = %e, "the data directory is not writable");
                    self.flags.raise_own(section, name, message, 90, &["storage"]).await;
                }
                Err(_) => {}
            }
        }
        let mut keep = Vec::new();
        for (app, reason) in failed_apps {
            let Some(name) = crash_flag_name(app) else { continue };
            let message = format!(
                "app {app} is in crash loop and failed: {reason}; see `nodus app crashlog {app}`, fix it and `nodus app start {app}`"
            );
            self.flags.raise_own(APPS, &name, message, 70, &["apps"]).await;
            keep.push(name);
        }
        self.flags.lower_own_except(APPS, "crash-loop-", &keep).await;
    }

    async fn unreachable(&mut self, down: Vec<String>, now: i64) {
        self.down_since.retain(|n, _| down.contains(n));
        for n in down {
            self.down_since.entry(n).or_insert(now);
        }
        let long: Vec<String> = self
            .down_since
            .iter()
            .filter(|(_, since)| now - **since >= self.unreachable_after_ms)
            .map(|(n, _)| n.clone())
            .collect();
        let (section, name) = UNREACHABLE;
        if long.is_empty() {
            self.flags.lower_own(section, name).await;
        } else {
            // The message names the nodes, not how long (it would change on every check).
            let message = format!(
                "unreachable for more than {} s: {}; check those nodes and the network, or `nodus cluster forget` them",
                self.unreachable_after_ms / 1000,
                long.join(", ")
            );
            self.flags.raise_own(section, name, message, 50, &["cluster"]).await;
        }
    }
}

/// Writes, syncs and deletes a small file in `dir`.
fn write_check(dir: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let path = dir.join(PROBE_FILE);
    let mut f = std::fs::File::create(&path)?;
    f.write_all(b"nodus write check\n")?;
    f.sync_all()?;
    drop(f);
    std::fs::remove_file(&path)
}

/// `crash-loop-<app>` as a valid flag name (app names allow `_` and `.`, flag names do not).
fn crash_flag_name(app: &str) -> Option<String> {
    let mut name = String::from("crash-loop-");
    for c in app.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_alphanumeric() { c } else { '-' };
        if !(c == '-' && name.ends_with('-')) {
            name.push(c);
        }
    }
    while name.ends_with('-') {
        name.pop();
    }
    name.truncate(MAX_NAME_BYTES);
    while name.ends_with('-') {
        name.pop();
    }
    check_name("name", &name).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_names_make_valid_flag_names() {
        assert_eq!(crash_flag_name("Echo_v2.1").as_deref(), Some("crash-loop-echo-v2-1"));
        assert_eq!(crash_flag_name("a__b").as_deref(), Some("crash-loop-a-b"));
        let long = crash_flag_name(&"x".repeat(64)).unwrap();
        assert_eq!(long.len(), MAX_NAME_BYTES);
    }
}
