//! Cluster figures: broadcast fan-out. Five linked daemons (a star around `n0`), a `bench_fan`
//! echo service on each, and a load client on `n0` that keeps K broadcasts `*:bench_fan/ECHO` in
//! flight; a broadcast counts once all five services have answered it.

use crate::child::{self, Child};
use crate::latency::{Load, Recorder, Summary, System};
use crate::nodus_system::{self, ECHO_COMMAND};
use crate::Transport;
use anyhow::{bail, Context};
use nodus_client::{Client, ClientConfig};
use nodus_wire::Message;
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;
use tokio::time::Instant;

/// The service registered on every node.
const FAN_SERVICE: &str = "bench_fan";
/// Slack past the end of the measured phase before a measurement is abandoned.
const RUN_GRACE: Duration = Duration::from_secs(15);

/// `nodes` daemons and a fan service on each.
pub struct FanCluster {
    // Drop order: services before daemons.
    services: Vec<Child>,
    daemons: Vec<Child>,
    endpoint: String,
    nodes: usize,
}

impl FanCluster {
    /// Starts the daemons and services and waits until `n0` reaches the service on every node.
    ///
    /// Fails when a child cannot be started or the cluster does not form in time.
    pub async fn start(nodus: &Path, transport: Transport, dir: &Path, nodes: usize) -> anyhow::Result<FanCluster> {
        let hub = child::free_port()?;
        let (mut daemons, mut services, mut endpoints) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..nodes {
            let own = if i == 0 { hub } else { child::free_port()? };
            let neighbors: &[u16] = if i == 0 { &[] } else { &[hub] };
            let (d, endpoint) =
                nodus_system::start_daemon(nodus, transport, dir, &format!("n{i}"), Some((own, neighbors))).await?;
            daemons.push(d);
            let command = child::self_command(&["echo-service", "--node", &endpoint, "--service", FAN_SERVICE])?;
            let mut s = Child::spawn(&format!("fan service n{i}"), command, dir.join(format!("fan-{i}.log")), true)?;
            s.ready().await?;
            services.push(s);
            endpoints.push(endpoint);
        }
        for i in 0..nodes {
            nodus_system::wait_reachable(&endpoints[0], &format!("n{i}:{FAN_SERVICE}")).await?;
        }
        Ok(FanCluster { services, daemons, endpoint: endpoints.swap_remove(0), nodes })
    }

    /// Keeps `load.inflight` broadcasts outstanding; the latency of one is until its last answer.
    ///
    /// Fails when the client cannot connect or answers stop coming.
    pub async fn measure(&mut self, load: &Load) -> anyhow::Result<Summary> {
        let (client, mut incoming) =
            Client::connect(ClientConfig::new(self.endpoint.as_str()).no_reconnect()).await.context("load client")?;
        let window = load.window();
        let mut recorder = Recorder::new(window);
        let mut outstanding: HashMap<u64, (Instant, usize)> = HashMap::new();
        let send = |id: u64| {
            let m = Message::new(ECHO_COMMAND)
                .to(&format!("*:{FAN_SERVICE}"))
                .with_id(id)
                .with_payload(vec![0u8; load.payload]);
            client.send(m)
        };
        for _ in 0..load.inflight {
            let id = client.next_id();
            outstanding.insert(id, (Instant::now(), 0));
            send(id).await?;
        }
        let hard_end = window.end + RUN_GRACE;
        while !outstanding.is_empty() {
            let reply = tokio::time::timeout_at(hard_end, incoming.recv())
                .await
                .context("broadcast answers stopped coming")?
                .context("the node closed the connection")?;
            let Some(entry) = outstanding.get_mut(&reply.envelope.reply_to) else { continue };
            if reply.command != ECHO_COMMAND {
                bail!("a fan service answered {}: {}", reply.command, reply.get("message").unwrap_or(""));
            }
            entry.1 += 1;
            if entry.1 == self.nodes {
                let (sent, _) = outstanding.remove(&reply.envelope.reply_to).unwrap_or((Instant::now(), 0));
                recorder.record(sent, Instant::now());
                if Instant::now() < window.end {
                    let id = client.next_id();
                    outstanding.insert(id, (Instant::now(), 0));
                    send(id).await?;
                }
            }
        }
        Ok(recorder.summary(System::Fanout, load))
    }

    /// Stops services, then daemons.
    pub async fn stop(self) {
        for s in self.services {
            s.stop().await;
        }
        for d in self.daemons {
            d.stop().await;
        }
    }
}
