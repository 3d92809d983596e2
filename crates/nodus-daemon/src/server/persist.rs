//! Persistence off the router lock: the router hands out the known nodes
//! ([`crate::router::Action::SaveNodes`]) while the driver holds its lock; [`Persist::save`] only
//! replaces the latest value and wakes the writer task, which writes it on a blocking thread.
//! Saves that arrive while a write runs are coalesced: only the latest is written next. On close,
//! [`Persist::finish`] makes the task write what is left and end.

use crate::topology::KnownNode;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// File in the data directory that remembers the cluster's nodes.
const NODES_FILE: &str = "nodes";

/// A value written to disk by its own task, latest first.
pub(crate) struct Persist<T>(Arc<Inner<T>>);

type Writer<T> = Box<dyn Fn(&T) -> io::Result<()> + Send + Sync>;

struct Inner<T> {
    latest: Mutex<Option<T>>,
    wake: Notify,
    done: CancellationToken,
    write: Writer<T>,
}

impl<T: Send + 'static> Persist<T> {
    /// A persister that writes with `write` (run on a blocking thread).
    pub(crate) fn new(write: impl Fn(&T) -> io::Result<()> + Send + Sync + 'static) -> Persist<T> {
        Persist(Arc::new(Inner {
            latest: Mutex::new(None),
            wake: Notify::new(),
            done: CancellationToken::new(),
            write: Box::new(write),
        }))
    }

    /// Replaces the value to write; never blocks.
    pub(crate) fn save(&self, value: T) {
        *self.0.latest.lock().unwrap_or_else(|e| e.into_inner()) = Some(value);
        self.0.wake.notify_one();
    }

    /// Asks the writer task to write what is left and end.
    pub(crate) fn finish(&self) {
        self.0.done.cancel();
    }

    /// The writer task.
    pub(crate) fn run(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let inner = self.0.clone();
        async move {
            loop {
                let finishing = tokio::select! {
                    biased;
                    _ = inner.wake.notified() => false,
                    _ = inner.done.cancelled() => true,
                };
                let value = inner.latest.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(value) = value {
                    let writer = inner.clone();
                    match tokio::task::spawn_blocking(move || (writer.write)(&value)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => warn!(error = %e, "cannot persist the cluster's nodes"),
                        Err(e) => warn!(error = %e, "the cluster's nodes writer failed"),
                    }
                }
                if finishing {
                    break;
                }
            }
        }
    }
}

/// Reads the remembered nodes: lines of `name address neighbor|known`.
pub(crate) fn load_nodes(dir: &Path) -> Vec<KnownNode> {
    let Ok(text) = std::fs::read_to_string(dir.join(NODES_FILE)) else { return Vec::new() };
    text.lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let (name, addr, kind) = (parts.next()?, parts.next().unwrap_or(""), parts.next().unwrap_or("known"));
            let addr = if addr == "-" { "" } else { addr };
            nodus_wire::valid_name(name).then(|| KnownNode {
                name: name.to_string(),
                addr: addr.to_string(),
                neighbor: kind == "neighbor",
            })
        })
        .collect()
}

/// Writes the remembered nodes (to a temporary file renamed over the old one).
pub(crate) fn save_nodes(dir: &Path, nodes: &[KnownNode]) -> io::Result<()> {
    let mut text = String::new();
    for n in nodes {
        let addr = if n.addr.is_empty() { "-" } else { n.addr.as_str() };
        text.push_str(&format!("{} {addr} {}\n", n.name, if n.neighbor { "neighbor" } else { "known" }));
    }
    let tmp = dir.join(format!("{NODES_FILE}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, dir.join(NODES_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn known(name: &str, addr: &str, neighbor: bool) -> KnownNode {
        KnownNode { name: name.into(), addr: addr.into(), neighbor }
    }

    #[tokio::test]
    async fn saves_are_coalesced_and_the_latest_is_written_before_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let writes = Arc::new(AtomicUsize::new(0));
        let (path, count) = (dir.path().to_path_buf(), writes.clone());
        let persist = Persist::new(move |nodes: &Vec<KnownNode>| {
            count.fetch_add(1, Ordering::Relaxed);
            save_nodes(&path, nodes)
        });
        let task = tokio::spawn(persist.run());
        for i in 0..1000 {
            persist.save(vec![known(&format!("n{i}"), &format!("10.0.0.1:{i}"), i % 2 == 0)]);
        }
        persist.finish();
        task.await.unwrap();
        assert_eq!(load_nodes(dir.path()), vec![known("n999", "10.0.0.1:999", false)]);
        let writes = writes.load(Ordering::Relaxed);
        assert!((1..=3).contains(&writes), "1000 saves made {writes} writes");
    }

    #[test]
    fn nodes_round_trip_and_bad_names_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = vec![known("a", "", true), known("b", "h:1", false)];
        save_nodes(dir.path(), &nodes).unwrap();
        std::fs::write(dir.path().join("nodes.tmp"), "").unwrap();
        assert_eq!(load_nodes(dir.path()), nodes);
        std::fs::write(dir.path().join(NODES_FILE), "bad/name 1.2.3.4:5 neighbor\nok - known\n").unwrap();
        assert_eq!(load_nodes(dir.path()), vec![known("ok", "", false)]);
    }
}
