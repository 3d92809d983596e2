//! Child processes of a run and the scratch directory they share.
//!
//! Every child is killed when its [`Child`] is dropped (also on error paths and on interruption),
//! writes its stderr to a log file in the scratch directory (quoted when it fails), and — for
//! this executable's own roles — gets a piped stdin, so it exits by itself when the parent dies
//! (see [`parent_gone`]; the orphaned echo service also stops the daemon). The scratch directory
//! is removed when its [`ScratchDir`] is dropped (not when the parent is killed with SIGKILL).

use anyhow::{bail, Context};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{ChildStdout, Command};
use tokio::time::Instant;

/// How long a child may take to say it is ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a killed child may take to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(2);
/// Lines of a child's log quoted in an error.
const LOG_TAIL_LINES: usize = 20;

/// A temporary directory, removed with everything in it on drop.
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Creates a fresh directory under the system temporary directory.
    ///
    /// Fails when it cannot be created.
    #[allow(clippy::disallowed_methods)] // The wall clock only makes the name unique.
    pub fn create() -> anyhow::Result<ScratchDir> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!("nodus-bench-{}-{nanos:09}", std::process::id()));
        std::fs::create_dir(&path).with_context(|| format!("cannot create scratch directory {}", path.display()))?;
        Ok(ScratchDir(path))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running child process, killed on drop.
#[derive(Debug)]
pub struct Child {
    name: String,
    process: tokio::process::Child,
    stdout: Option<Lines<BufReader<ChildStdout>>>,
    log: PathBuf,
}

impl Child {
    /// Starts `command` as `name`, its stderr going to `log`. With `watch_stdio`, stdin and stdout
    /// are piped: stdout for [`Child::ready`], stdin so the child sees the parent go away.
    ///
    /// Fails when the log cannot be created or the program cannot be started.
    pub fn spawn(name: &str, mut command: Command, log: PathBuf, watch_stdio: bool) -> anyhow::Result<Child> {
        let stderr = std::fs::File::create(&log).with_context(|| format!("cannot create log {}", log.display()))?;
        let piped = || if watch_stdio { Stdio::piped() } else { Stdio::null() };
        command.stdin(piped()).stdout(piped()).stderr(stderr).kill_on_drop(true);
        let mut process = command.spawn().with_context(|| format!("cannot start {name} ({command:?})"))?;
        let stdout = process.stdout.take().map(|s| BufReader::new(s).lines());
        Ok(Child { name: name.to_string(), process, stdout, log })
    }

    /// Waits (within [`READY_TIMEOUT`]) for the child's `ready <endpoint>` line; returns the endpoint.
    ///
    /// Fails when the child exits, closes stdout or stays silent past the deadline.
    pub async fn ready(&mut self) -> anyhow::Result<String> {
        let Some(lines) = self.stdout.as_mut() else { bail!("{} has no stdout to read", self.name) };
        let wait = async {
            while let Some(line) = lines.next_line().await? {
                if let Some(endpoint) = line.strip_prefix("ready") {
                    return Ok(Some(endpoint.trim().to_string()));
                }
            }
            Ok::<_, std::io::Error>(None)
        };
        match tokio::time::timeout(READY_TIMEOUT, wait).await {
            Ok(Ok(Some(endpoint))) => Ok(endpoint),
            Ok(Ok(None)) => bail!("{} exited before it was ready{}", self.name, self.log_tail()),
            Ok(Err(e)) => Err(e).with_context(|| format!("cannot read the output of {}", self.name)),
            Err(_) => bail!("{} was not ready within {READY_TIMEOUT:?}{}", self.name, self.log_tail()),
        }
    }

    /// The child's process id, while it runs.
    pub fn id(&self) -> Option<u32> {
        self.process.id()
    }

    /// Fails when the child has already exited (quoting its log).
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        match self.process.try_wait().with_context(|| format!("cannot check on {}", self.name))? {
            None => Ok(()),
            Some(status) => bail!("{} exited with {status}{}", self.name, self.log_tail()),
        }
    }

    /// Kills the child and reaps it (bounded by a short timeout).
    pub async fn stop(mut self) {
        let _ = self.process.start_kill();
        let _ = tokio::time::timeout(REAP_TIMEOUT, self.process.wait()).await;
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        if lines.is_empty() {
            return format!(" (its log {} is empty)", self.log.display());
        }
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
        format!("; last lines of {}:\n{}", self.log.display(), tail.join("\n"))
    }
}

/// A command running this same executable with `args`.
///
/// Fails when the path of the current executable cannot be found.
pub fn self_command(args: &[&str]) -> anyhow::Result<Command> {
    let exe = std::env::current_exe().context("cannot find the path of nodus-bench itself")?;
    let mut command = Command::new(exe);
    command.args(args);
    Ok(command)
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, read, released).
///
/// Fails when no socket can be bound on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind 127.0.0.1:0 to find a free port")?;
    Ok(l.local_addr().context("cannot read the address of a bound socket")?.port())
}

/// Completes when stdin reaches end of file: a child role's parent has exited or killed it.
///
/// A plain thread blocks on stdin (tokio's stdin needs a feature the workspace does not enable).
pub async fn parent_gone() {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let watcher = std::thread::Builder::new().name("stdin-watch".into()).spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 64];
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        drop(tx);
    });
    if watcher.is_ok() {
        let _ = rx.await;
    } else {
        // Without a watcher the child lives until it is killed, which the parent always does.
        std::future::pending::<()>().await;
    }
}

/// Retries `attempt` every few milliseconds until it succeeds or `deadline` passes; `alive` is
/// checked between attempts so a child that died fails fast.
///
/// Fails with the last attempt's error when the deadline passes, or with `alive`'s error.
pub async fn retry_until<T, F, Fut>(
    deadline: Instant,
    mut alive: impl FnMut() -> anyhow::Result<()>,
    mut attempt: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut delay = Duration::from_millis(5);
    loop {
        let err = match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        alive()?;
        if Instant::now() + delay >= deadline {
            return Err(err.context("gave up waiting"));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}
