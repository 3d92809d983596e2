//! `nodus app deploy|start|stop|restart|scale|remove|list|info|crashlog`, over the node's
//! built-in `apps` service.

use super::Ctx;
use crate::output;
use anyhow::Context;
use nodus_client::admin::{AppInfo, DeployProgress, Deployed};
use nodus_client::{Admin, AdminError};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `nodus app ...`
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Store an app (an executable, a directory with manifest.json/toml, or a .tar/.tar.gz of one)
    /// and start it.
    Deploy {
        /// App name; also its service name.
        name: String,
        /// Executable file, app directory or archive.
        path: PathBuf,
        /// Profile file (TOML or JSON): pool-limit, queue-limit, concurrency, timeouts.
        #[arg(long)]
        profile: Option<PathBuf>,
    },
    /// Start a stopped (or failed) app.
    Start {
        /// App name.
        name: String,
    },
    /// Stop an app's workers; it stays deployed.
    Stop {
        /// App name.
        name: String,
    },
    /// Stop and start an app.
    Restart {
        /// App name.
        name: String,
    },
    /// Keep N of the app's workers running even when idle (at most its pool-limit); 0 starts
    /// them on demand only. Cocaine's app `control`.
    Scale {
        /// App name.
        name: String,
        /// Workers to keep running.
        workers: usize,
    },
    /// Stop an app and delete it.
    Remove {
        /// App name.
        name: String,
    },
    /// The apps on the node.
    List,
    /// One app: version, status, queue, and a table of its workers.
    Info {
        /// App name.
        name: String,
    },
    /// When and how the app's workers exited, with their last stderr lines.
    Crashlog {
        /// App name.
        name: String,
    },
}

/// The node resolves paths itself, from its own working directory: send absolute ones.
fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    std::fs::canonicalize(p).with_context(|| format!("cannot find {}", p.display()))
}

/// Prints `name value` lines, or the same as one JSON object.
fn fields(ctx: &Ctx, rows: &[(&str, serde_json::Value)]) {
    if ctx.json {
        let mut v = json!({"ok": true});
        for (k, val) in rows {
            v[*k] = val.clone();
        }
        output::json(&v);
    } else {
        for (k, v) in rows {
            let v = v.as_str().map_or_else(|| v.to_string(), String::from);
            output::line(&format!("{k:<10} {v}"));
        }
    }
}

/// Runs `nodus app ...`.
///
/// Fails when the node cannot be reached, or (exit 1) when the `apps` service refuses.
pub async fn run(ctx: &Ctx, c: Command) -> anyhow::Result<u8> {
    let admin = ctx.client().await?.admin();
    match c {
        Command::Deploy { name, path, profile } => {
            let profile = profile.as_deref().map(absolute).transpose()?;
            let path = absolute(&path)?;
            let deploy = admin.deploy(&name, &path, profile.as_deref());
            let d = if ctx.json { deploy.await? } else { with_progress(&admin, &name, deploy).await? };
            deployed(ctx, d, "deployed");
        }
        Command::Start { name } => deployed(ctx, admin.start_app(&name).await?, "started"),
        Command::Restart { name } => deployed(ctx, admin.restart_app(&name).await?, "restarted"),
        Command::Stop { name } => {
            admin.stop_app(&name).await?;
            fields(ctx, &[("name", json!(name)), ("status", json!("stopped"))]);
        }
        Command::Scale { name, workers } => {
            let s = admin.scale_app(&name, workers).await?;
            let mut rows = vec![("name", json!(s.name)), ("workers", json!(s.workers))];
            if let Some(by) = s.capped_by {
                rows.extend([("requested", json!(s.requested.unwrap_or(workers as u64))), ("capped_by", json!(by))]);
            }
            fields(ctx, &rows);
        }
        Command::Remove { name } => {
            admin.remove_app(&name).await?;
            fields(ctx, &[("name", json!(name)), ("status", json!("removed"))]);
        }
        Command::List => {
            let apps = admin.apps_list().await?;
            if ctx.json {
                let v: Vec<_> = apps
                    .iter()
                    .map(|a| json!({"name": a.name, "version": a.version, "status": a.status.as_str(), "workers": a.workers}))
                    .collect();
                output::json(&json!(v));
            } else if apps.is_empty() {
                output::line("no apps deployed");
            } else {
                let rows: Vec<Vec<String>> = apps
                    .into_iter()
                    .map(|a| vec![a.name, a.version, a.status.to_string(), a.workers.to_string()])
                    .collect();
                output::table(&["APP", "VERSION", "STATUS", "WORKERS"], &rows);
            }
        }
        Command::Info { name } => info(ctx, admin.app_info(&name).await?),
        Command::Crashlog { name } => {
            let records = admin.crashlog(&name).await?;
            if ctx.json {
                let v: Vec<_> = records
                    .iter()
                    .map(|r| {
                        let at = humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + std::time::Duration::from_secs(r.at),
                        );
                        json!({"uuid": r.uuid, "at": r.at, "time": at.to_string(), "status": r.status,
                               "failure": r.failure, "stderr": r.stderr})
                    })
                    .collect();
                output::json(&json!(v));
            } else if records.is_empty() {
                output::line("no worker has exited");
            } else {
                for r in records {
                    let why = r.failure.map(|f| format!(" ({f})")).unwrap_or_default();
                    output::line(&format!("worker {} exited {}: {}{why}", r.uuid, output::time(r.at), r.status));
                    for l in r.stderr {
                        output::line(&format!("    {l}"));
                    }
                }
            }
        }
    }
    Ok(0)
}

/// How often a deploy's progress is asked for; a deploy done sooner shows none.
const PROGRESS_EVERY: Duration = Duration::from_millis(300);

/// Runs `deploy`, showing on stderr where it stands (`DEPLOY_STATUS`) while it takes long.
async fn with_progress<T>(
    admin: &Admin,
    name: &str,
    deploy: impl std::future::Future<Output = Result<T, AdminError>>,
) -> Result<T, AdminError> {
    tokio::pin!(deploy);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    let mut progress = output::Progress::new();
    let mut asking = true;
    loop {
        tokio::select! {
            r = &mut deploy => {
                progress.finish();
                return r;
            }
            _ = tick.tick(), if asking => match admin.deploy_status(name).await {
                Ok(p) if p.stage == "idle" => {}
                Ok(p) => progress.show(&describe(name, &p), &p.stage),
                // A node that cannot say: the deploy goes on without progress.
                Err(_) => asking = false,
            },
        }
    }
}

/// `deploying NAME: copying 12.0 MiB of 40.0 MiB (30%)`.
fn describe(name: &str, p: &DeployProgress) -> String {
    match p.total {
        0 => format!("deploying {name}: {}", p.stage),
        total => format!(
            "deploying {name}: {} {} of {} ({}%)",
            p.stage,
            output::bytes(p.done),
            output::bytes(total),
            p.done.min(total) * 100 / total
        ),
    }
}

/// An app deployed, started or restarted, with the node's warning when it gave one.
fn deployed(ctx: &Ctx, d: Deployed, status: &str) {
    let mut rows = vec![("name", json!(d.name)), ("version", json!(d.version)), ("status", json!(status))];
    if let Some(w) = d.warning {
        rows.push(("warning", json!(w)));
    }
    fields(ctx, &rows);
}

fn info(ctx: &Ctx, i: AppInfo) {
    if ctx.json {
        let workers: Vec<_> =
            i.workers.iter().map(|w| json!({"uuid": w.uuid, "pid": w.pid, "state": w.state, "load": w.load})).collect();
        output::json(&json!({
            "name": i.name, "version": i.version, "executable": i.executable, "dir": i.dir,
            "status": i.status.as_str(), "reason": i.reason, "queued": i.queued, "population": i.population,
            "sessions": i.sessions, "workers": workers,
        }));
        return;
    }
    let mut rows = vec![("name", json!(i.name)), ("version", json!(i.version)), ("status", json!(i.status.as_str()))];
    if let Some(r) = &i.reason {
        rows.push(("reason", json!(r)));
    }
    rows.extend([
        ("executable", json!(i.executable)),
        ("dir", json!(i.dir)),
        ("queued", json!(i.queued)),
        ("sessions", json!(i.sessions)),
        ("population", json!(i.population)),
        ("workers", json!(i.workers.len())),
    ]);
    fields(ctx, &rows);
    if !i.workers.is_empty() {
        output::line("");
        let rows: Vec<Vec<String>> =
            i.workers.into_iter().map(|w| vec![w.uuid, w.pid.to_string(), w.state, w.load.to_string()]).collect();
        output::table(&["WORKER", "PID", "STATE", "LOAD"], &rows);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deploy_progress_reads_as_a_sentence() {
        let p = |stage: &str, done, total| DeployProgress { stage: stage.into(), done, total };
        assert_eq!(describe("big", &p("preparing", 0, 0)), "deploying big: preparing");
        assert_eq!(
            describe("big", &p("copying", 3 << 20, 12 << 20)),
            "deploying big: copying 3.0 MiB of 12.0 MiB (25%)"
        );
        assert!(describe("big", &p("unpacking", 9, 4)).ends_with("(100%)"), "never past 100%");
    }
}
