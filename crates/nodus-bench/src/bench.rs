//! Orchestration: starts the systems under test as child processes in a scratch directory, runs
//! one measurement (`reqrep`) or the matrix (`all`), prints the figures, and stops the children —
//! also on error or interruption (SIGINT/SIGTERM), since every child is killed when dropped.

use crate::baseline::{self, Baseline};
use crate::child::{self, ScratchDir};
use crate::latency::{Load, Summary};
use crate::nodus_system::{self, NodusSystem};
use crate::{report, Command, Options};
use anyhow::{bail, Context};

/// Payload sizes of the `all` matrix, bytes.
const MATRIX_PAYLOADS: [usize; 2] = [64, 4096];
/// Requests in flight of the `all` matrix.
const MATRIX_INFLIGHT: [usize; 2] = [1, 64];
/// Largest payload accepted (the frame bound leaves room for the envelope).
const MAX_PAYLOAD: usize = 1024 * 1024;
/// Most requests in flight (the nodus client's outgoing queue holds 4096 messages).
const MAX_INFLIGHT: usize = 4096;

/// Runs `command`.
///
/// Fails when a child cannot be started, a measurement fails, or the run is interrupted.
pub async fn run(options: Options, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Reqrep { payload, inflight, no_baseline } => {
            interruptible(reqrep(&options, payload, inflight, no_baseline)).await
        }
        Command::All => interruptible(all(&options)).await,
        Command::Cluster => interruptible(cluster(&options)).await,
        Command::EchoService { node, service } => nodus_system::echo_service_named(&node, &service).await,
        Command::RawEcho { listen } => child_role(baseline::raw_echo(&listen)).await,
        Command::RawForwarder { listen, upstream } => child_role(baseline::raw_forwarder(&listen, &upstream)).await,
        Command::Apps { cold_starts } => interruptible(crate::apps::run(&options, cold_starts)).await,
        Command::Tasks { tasks, submitters, light, worker, postgres } => {
            let load = crate::tasks::TasksLoad { tasks, submitters, light, worker, postgres };
            interruptible(async {
                crate::tasks::run(options.json, load.clone()).await?;
                crate::tasks_node::run(options.json, options.nodus.clone(), &load).await
            })
            .await
        }
        // Normally handled in `main` before the runtime is built; harmless here too.
        Command::ConnectOnce { socket } => crate::apps::connect_once(&socket),
    }
}

/// Runs `work` unless SIGINT or SIGTERM comes first; dropping `work` kills its children.
async fn interruptible(work: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch for SIGTERM")?;
    tokio::select! {
        r = work => r,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; child processes stopped"),
        _ = term.recv() => bail!("terminated; child processes stopped"),
    }
}

/// Runs a child role until it ends or its parent goes away (stdin closes).
async fn child_role(role: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::select! {
        r = role => r,
        _ = child::parent_gone() => Ok(()),
    }
}

/// The load for one measurement of the matrix, checked against the bounds.
///
/// Fails when the payload, the in-flight count or the duration is out of range.
pub fn load(options: &Options, payload: usize, inflight: usize) -> anyhow::Result<Load> {
    if payload > MAX_PAYLOAD {
        bail!("--payload {payload} is too large: at most {MAX_PAYLOAD} bytes");
    }
    if inflight == 0 || inflight > MAX_INFLIGHT {
        bail!("--inflight {inflight} is out of range: use 1..={MAX_INFLIGHT}");
    }
    if options.duration.is_zero() {
        bail!("--duration must be positive");
    }
    Ok(Load { payload, inflight, warmup: options.warmup, duration: options.duration })
}

/// The two systems, started once per run and shared by its measurements.
struct Systems {
    nodus: NodusSystem,
    baseline: Option<Baseline>,
}

impl Systems {
    async fn start(options: &Options, dir: &ScratchDir, with_baseline: bool) -> anyhow::Result<Systems> {
        let binary = nodus_system::nodus_binary(options.nodus.clone())?;
        report::progress(&format!("starting {} daemon and echo service ({:?})", binary.display(), options.transport));
        let nodus = NodusSystem::start(&binary, options.transport, dir.path()).await?;
        let baseline = if with_baseline {
            report::progress("starting raw echo server and forwarder");
            Some(Baseline::start(options.transport, dir.path()).await?)
        } else {
            None
        };
        Ok(Systems { nodus, baseline })
    }

    async fn measure_nodus(&mut self, load: &Load) -> anyhow::Result<Summary> {
        report::progress(&format!("nodus    payload {} inflight {}", load.payload, load.inflight));
        self.nodus
            .measure(load)
            .await
            .with_context(|| format!("nodus measurement (payload {}, inflight {})", load.payload, load.inflight))
    }

    async fn measure_baseline(&mut self, load: &Load) -> anyhow::Result<Option<Summary>> {
        let Some(baseline) = self.baseline.as_mut() else { return Ok(None) };
        report::progress(&format!("baseline payload {} inflight {}", load.payload, load.inflight));
        let s = baseline
            .measure(load)
            .await
            .with_context(|| format!("baseline measurement (payload {}, inflight {})", load.payload, load.inflight))?;
        Ok(Some(s))
    }

    async fn stop(self) {
        self.nodus.stop().await;
        if let Some(b) = self.baseline {
            b.stop().await;
        }
    }
}

async fn reqrep(options: &Options, payload: usize, inflight: usize, no_baseline: bool) -> anyhow::Result<()> {
    let load = load(options, payload, inflight)?;
    let dir = ScratchDir::create()?;
    let mut systems = Systems::start(options, &dir, !no_baseline).await?;
    let nodus = systems.measure_nodus(&load).await?;
    let baseline = systems.measure_baseline(&load).await?;
    systems.stop().await;
    if options.json {
        // stdout holds exactly the nodus line; the rest is for a person, on stderr.
        report::json(&nodus);
        if let Some(b) = &baseline {
            report::human_to_stderr(b);
            report::ratio_line(&nodus, b, true);
        }
    } else {
        report::human(&nodus);
        if let Some(b) = &baseline {
            report::human(b);
            report::ratio_line(&nodus, b, false);
        }
    }
    Ok(())
}

async fn all(options: &Options) -> anyhow::Result<()> {
    let dir = ScratchDir::create()?;
    let mut systems = Systems::start(options, &dir, true).await?;
    if !options.json {
        report::table_header();
    }
    let mut worst = f64::INFINITY;
    for payload in MATRIX_PAYLOADS {
        for inflight in MATRIX_INFLIGHT {
            let load = load(options, payload, inflight)?;
            let nodus = systems.measure_nodus(&load).await?;
            let baseline = systems.measure_baseline(&load).await?.context("the baseline is not running")?;
            worst = worst.min(report::ratio(&nodus, &baseline));
            if options.json {
                report::json(&nodus);
                report::json(&baseline);
            } else {
                report::table_row(&nodus, &baseline);
            }
        }
    }
    systems.stop().await;
    if !options.json {
        report::table_footer(worst);
    }
    Ok(())
}

/// Single node, cross-node and 5-node fan-out, 64 B, 1 and 64 in flight, in one run.
async fn cluster(options: &Options) -> anyhow::Result<()> {
    let nodus = nodus_system::nodus_binary(options.nodus.clone())?;
    let scratch = ScratchDir::create()?;
    let mut rows = Vec::new();
    for inflight in MATRIX_INFLIGHT {
        let load = load(options, 64, inflight)?;
        report::progress(&format!("single node, inflight {inflight}"));
        let dir = subdir(&scratch, &format!("s{inflight}"))?;
        let mut single = NodusSystem::start(&nodus, options.transport, &dir).await?;
        rows.push(single.measure(&load).await?);
        single.stop().await;
        report::progress(&format!("cross-node, inflight {inflight}"));
        let dir = subdir(&scratch, &format!("x{inflight}"))?;
        let mut cross = NodusSystem::start_cross_node(&nodus, options.transport, &dir).await?;
        rows.push(cross.measure(&load).await?);
        cross.stop().await;
        report::progress(&format!("fan-out to 5 nodes, inflight {inflight}"));
        let dir = subdir(&scratch, &format!("f{inflight}"))?;
        let mut fan = crate::cluster::FanCluster::start(&nodus, options.transport, &dir, 5).await?;
        rows.push(fan.measure(&load).await?);
        fan.stop().await;
    }
    for r in &rows {
        if options.json {
            report::json(r);
        } else {
            report::human(r);
        }
    }
    Ok(())
}

fn subdir(scratch: &ScratchDir, name: &str) -> anyhow::Result<std::path::PathBuf> {
    let dir = scratch.path().join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}
