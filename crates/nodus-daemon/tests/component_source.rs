//! The hook through which a part of the node that runs components of its own (the tasks mount,
//! not yet on this branch) joins the control plane: its components are listed in the tree,
//! answered for when monitored, and stopped by a kill after what they started.
//!
//! A real node in this process, spoken to in the text form over its Unix socket; the source is a
//! small list standing for tasks and their subtasks.

use nodus_control::{Component, ComponentId, ComponentKind};
use nodus_daemon::control::ComponentSource;
use nodus_daemon::{Config, Daemon};
use nodus_wire::{text, Message};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

const WAIT: Duration = Duration::from_secs(10);

/// Tasks as the tasks mount would list them; stopping one removes it (its execution ends).
#[derive(Default)]
struct Tasks {
    running: Mutex<Vec<Component>>,
    stopped: Mutex<Vec<ComponentId>>,
}

impl ComponentSource for Tasks {
    fn components(&self) -> Vec<Component> {
        self.running.lock().unwrap().clone()
    }

    fn stop(&self, id: ComponentId) {
        self.running.lock().unwrap().retain(|c| c.id != id);
        self.stopped.lock().unwrap().push(id);
    }
}

struct Conn {
    rd: BufReader<tokio::net::unix::OwnedReadHalf>,
    wr: tokio::net::unix::OwnedWriteHalf,
}

impl Conn {
    async fn ask(&mut self, line: &str) -> Message {
        self.wr.write_all(format!("{line}\n").as_bytes()).await.unwrap();
        let id: u64 = line.rsplit("_id=").next().unwrap().parse().unwrap();
        loop {
            let mut got = String::new();
            tokio::time::timeout(WAIT, self.rd.read_line(&mut got)).await.expect("an answer").unwrap();
            let m = text::from_line(got.trim_end()).unwrap();
            if m.envelope.reply_to == id {
                return m;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_join_the_tree_answer_monitoring_and_are_killed_subtasks_first() {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "server_name = \"t1\"\ndata_dir = {:?}\ntcp_listen = \"\"\n[cluster]\nlisten = \"\"\nudp_listen = \"\"\n[apps]\nenabled = false\n",
        dir.path().join("data").display().to_string()
    );
    let daemon = Daemon::bind(Config::from_toml(&toml).unwrap()).await.unwrap();
    let socket = daemon.unix_path().unwrap().to_path_buf();
    let node = ComponentId::derive(&["t1", "node"]);
    let (task, sub) = (ComponentId::new(101).unwrap(), ComponentId::new(102).unwrap());
    let tasks = Arc::new(Tasks::default());
    tasks.running.lock().unwrap().extend([
        Component::new(task, ComponentKind::Task, "resize", "t1").started_by(node),
        Component::new(sub, ComponentKind::Task, "resize.part1", "t1").started_by(task),
    ]);
    daemon.add_component_source(tasks.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(daemon.run(async move {
        let _ = stopped.await;
    }));
    let (rd, wr) = UnixStream::connect(&socket).await.unwrap().into_split();
    let mut c = Conn { rd: BufReader::new(rd), wr };

    // Listed under the node, the subtask under its task.
    let deadline = tokio::time::Instant::now() + WAIT;
    let rows = loop {
        let tree = c.ask("control/TREE _id=1").await;
        let rows = nodus_control::listing::decode(&tree.payload).unwrap();
        if rows.iter().any(|r| r.id == "102") {
            break rows;
        }
        assert!(tokio::time::Instant::now() < deadline, "the tasks never joined the tree: {rows:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let row = |id: &str| rows.iter().find(|r| r.id == id).unwrap();
    assert_eq!((row("101").kind.as_str(), row("101").pid.as_deref()), ("task", Some(node.to_string().as_str())));
    assert_eq!(row("102").pid.as_deref(), Some("101"));

    // Monitored: the node answers for them, sync_time echoed, the seed's tag in the text form.
    let r = c.ask("control/MONITORING component=102;sync_time=4242;_id=2").await;
    assert_eq!((r.command.as_str(), r.get("sync_time"), r.get("name")), ("RESULT", Some("4242"), Some("resize.part1")));
    assert!(r.get("tag").unwrap().starts_with("result:monitoring:2:102:"), "{}", text::to_line(&r));

    // Killed: the subtask is stopped before its task, then the kill is answered.
    let r = c.ask("control/KILL component=101;_id=3").await;
    assert_eq!((r.command.as_str(), r.get("stopped"), r.get("spec")), ("RESULT", Some("true"), Some("kill")));
    assert_eq!(*tasks.stopped.lock().unwrap(), [sub, task]);
    let r = c.ask("control/MONITORING component=101;sync_time=1;_id=4").await;
    assert_eq!((r.command.as_str(), r.get("code")), ("ERROR", Some("unknown_component")));

    let _ = stop.send(());
    tokio::time::timeout(WAIT, running).await.unwrap().unwrap().unwrap();
}
