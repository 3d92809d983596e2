//! Worker processes: spawn with the Cocaine command line, capture output, deliver signals, report
//! the exit with the last stderr lines.

use std::collections::VecDeque;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use nix::sys::signal::{kill, Signal as NixSignal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::identity::RunAs;
use crate::worker::{ExitReport, Signal};

/// Everything needed to start one worker process.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    pub app: String,
    pub executable: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub locator: String,
    pub endpoint: PathBuf,
    pub uuid: String,
    pub stderr_lines: usize,
    /// Run the process as this user (set before exec: groups dropped, gid, then uid).
    pub run_as: Option<RunAs>,
}

/// A running process: its pid and where to send signals.
#[derive(Debug)]
pub(crate) struct Running {
    pub pid: u32,
    pub signals: mpsc::Sender<Signal>,
}

/// How the process ended, with its last stderr lines.
#[derive(Debug)]
pub(crate) struct Exit {
    pub status: ExitReport,
    pub stderr: Vec<String>,
}

/// How long the exit report waits for the stderr pipe to drain after the process is gone (a
/// grandchild may hold the pipe open).
const STDERR_DRAIN: Duration = Duration::from_millis(200);

/// Starts the process; `on_exit` is called once with its exit report.
pub(crate) fn spawn<F>(launch: Launch, on_exit: F) -> std::io::Result<Running>
where
    F: FnOnce(Exit) + Send + 'static,
{
    let mut cmd = Command::new(&launch.executable);
    if let Some(user) = &launch.run_as {
        // std drops the supplementary groups, then calls setgid and setuid in the child before
        // exec. The user's own variables come first so the manifest may override them.
        cmd.uid(user.uid).gid(user.gid).env("USER", &user.name).env("LOGNAME", &user.name).env("HOME", &user.home);
    }
    cmd.args(&launch.args)
        .arg("--app")
        .arg(&launch.app)
        .arg("--locator")
        .arg(&launch.locator)
        .arg("--endpoint")
        .arg(&launch.endpoint)
        .arg("--uuid")
        .arg(&launch.uuid)
        .arg("--protocol")
        .arg("1")
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&launch.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let pid = child.id().unwrap_or(0);
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(launch.stderr_lines)));
    if let Some(out) = child.stdout.take() {
        tokio::spawn(pump_lines(out, launch.app.clone(), launch.uuid.clone(), None, 0));
    }
    let stderr_task = child.stderr.take().map(|err| {
        tokio::spawn(pump_lines(err, launch.app.clone(), launch.uuid.clone(), Some(tail.clone()), launch.stderr_lines))
    });
    let (signals, mut signal_rx) = mpsc::channel::<Signal>(8);
    tokio::spawn(async move {
        let status = loop {
            tokio::select! {
                status = child.wait() => break status,
                Some(sig) = signal_rx.recv() => {
                    // The child is not reaped yet (this task reaps it), so the pid is still ours.
                    let result = match sig {
                        // Never pid 0: kill(0, ..) would signal our own process group.
                        Signal::Term if pid > 0 => {
                            kill(Pid::from_raw(pid as i32), NixSignal::SIGTERM).map_err(std::io::Error::from)
                        }
                        Signal::Term => Ok(()),
                        Signal::Kill => child.start_kill(),
                    };
                    if let Err(e) = result {
                        tracing::debug!(pid, error = %e, "signal not delivered");
                    }
                }
            }
        };
        let status = match status {
            Ok(s) => ExitReport { code: s.code(), signal: s.signal() },
            Err(e) => {
                tracing::warn!(pid, error = %e, "waiting for worker process failed");
                ExitReport { code: None, signal: None }
            }
        };
        if let Some(t) = stderr_task {
            let _ = tokio::time::timeout(STDERR_DRAIN, t).await;
        }
        let stderr = tail.lock().map(|t| t.iter().cloned().collect()).unwrap_or_default();
        on_exit(Exit { status, stderr });
    });
    Ok(Running { pid, signals })
}

/// Longest stderr/stdout line kept or logged; longer lines are cut.
const MAX_LINE: usize = 4096;

async fn pump_lines<R: AsyncRead + Unpin>(
    mut r: R,
    app: String,
    uuid: String,
    tail: Option<Arc<Mutex<VecDeque<String>>>>,
    keep: usize,
) {
    let emit = |raw: &[u8]| {
        let line = String::from_utf8_lossy(&raw[..raw.len().min(MAX_LINE)]).trim_end_matches('\r').to_string();
        match &tail {
            None => tracing::info!(app = %app, worker = %uuid, "{line}"),
            Some(tail) => {
                tracing::warn!(app = %app, worker = %uuid, stderr = true, "{line}");
                if let Ok(mut t) = tail.lock() {
                    if t.len() >= keep {
                        t.pop_front();
                    }
                    if keep > 0 {
                        t.push_back(line);
                    }
                }
            }
        }
    };
    let mut buf = BytesMut::with_capacity(MAX_LINE);
    loop {
        let n = r.read_buf(&mut buf).await.unwrap_or(0);
        while let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line = buf.split_to(i + 1);
            emit(&line[..i]);
        }
        if n == 0 {
            if !buf.is_empty() {
                emit(&buf);
            }
            return;
        }
        if buf.len() > MAX_LINE {
            emit(&buf);
            buf.clear();
        }
    }
}
