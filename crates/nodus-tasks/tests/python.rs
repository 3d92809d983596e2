//! The Python procedures app (examples/procs-py, on the real PyPI `cocaine` framework) run as
//! tasks: sync and async, its result as JSON, its exception as the error, and the declared
//! arity checked before it runs.
//!
//! Needs the virtualenv made by `tests/cocaine-compat/setup.sh` (`$NODUS_PYENV`, default
//! `~/.cache/nodus-cocaine-venv`); without it the test prints why it is skipped and passes.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Node, Setup, WAIT};
use nodus_engine::manifest::{Format, Manifest};
use nodus_tasks::task::ErrorKind;
use nodus_tasks::{Status, Submission, SubmitError, Waited};
use serde_json::json;

fn venv() -> Option<PathBuf> {
    let venv = match std::env::var_os("NODUS_PYENV") {
        Some(v) => PathBuf::from(v),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/nodus-cocaine-venv"),
    };
    venv.join("bin/python").exists().then_some(venv)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_cocaine_app_runs_as_tasks() {
    let Some(venv) = venv() else {
        eprintln!("SKIPPED the Python procedures app: run tests/cocaine-compat/setup.sh");
        return;
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/procs-py").canonicalize().unwrap();
    let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    let mut manifest = Manifest::parse(&text, Format::Json).unwrap();
    manifest.env.insert("NODUS_PYENV".into(), venv.to_string_lossy().into_owned());
    let mut setup = Setup { app: Some(("pyprocs".into(), dir, manifest)), ..Setup::default() };
    setup.profile.startup_timeout = Duration::from_secs(20);
    let node = Node::start(setup).await;

    let run = |procedure: &str, args: serde_json::Value| {
        let serde_json::Value::Array(args) = args else { unreachable!() };
        let tasks = node.tasks.clone();
        let s = Submission::new(procedure, args);
        async move { tokio::time::timeout(WAIT, tasks.run(s)).await.expect("in time").expect("accepted") }
    };
    match run("pyprocs.add", json!([40, 2])).await.1 {
        Waited::Finished(f) => assert_eq!((f.status, f.result.unwrap().get()), (Status::Done, "42")),
        other => panic!("{other:?}"),
    }
    match run("pyprocs.echo", json!([{"k": ["v", 1.5, null]}])).await.1 {
        Waited::Finished(f) => assert_eq!(f.result.unwrap().get(), r#"{"k":["v",1.5,null]}"#),
        other => panic!("{other:?}"),
    }
    let s = node.tasks.submit(Submission::new("pyprocs.concat", vec![json!("py"), json!("thon")])).await.unwrap();
    match node.tasks.wait(&s.id, WAIT).await.unwrap() {
        Waited::Finished(f) => assert_eq!(f.result.unwrap().get(), r#""python""#),
        other => panic!("{other:?}"),
    }
    match run("pyprocs.fail", json!(["no coffee"])).await.1 {
        Waited::Finished(f) => {
            assert_eq!(f.status, Status::Error);
            let e = f.error.unwrap();
            assert_eq!(e.kind, ErrorKind::RunningError);
            assert!(e.message.contains("no coffee"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    let e = node.tasks.submit(Submission::new("pyprocs.add", vec![json!(1)])).await.unwrap_err();
    assert!(matches!(e, SubmitError::BadArguments(_)), "{e}");
    node.stop().await;
}
