//! The gateway in front of a web app written for Cocaine with the real Python framework (PyPI
//! `cocaine==0.12.14.5`) and its `http` and `wsgi` decorators (`tests/python/web_app.py`).
//!
//! Needs the virtualenv made by `tests/cocaine-compat/setup.sh` (at `$NODUS_PYENV`, default
//! `~/.cache/nodus-cocaine-venv`); without it the test prints why it is skipped and passes,
//! except under `CI=true` (`.ci/run`), where it fails. It never installs anything itself.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use hyper::Request;
use nodus_engine::manifest::Manifest;
use nodus_engine::profile::Profile;
use nodus_engine::AppSpec;
use nodus_http::{GatewayConfig, HttpConfig};

fn venv_python() -> Option<PathBuf> {
    let venv = match std::env::var_os("NODUS_PYENV") {
        Some(v) => PathBuf::from(v),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/nodus-cocaine-venv"),
    };
    let python = venv.join("bin/python");
    let ready = std::process::Command::new(&python)
        .args(["-c", "import cocaine.decorators, cocaine.worker"])
        .output()
        .is_ok_and(|o| o.status.success());
    ready.then_some(python)
}

fn python_app(dir: &Path, python: &Path) -> AppSpec {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/web_app.py");
    let mut manifest = Manifest::new(python.to_string_lossy());
    manifest.args.push(script.to_string_lossy().into_owned());
    manifest.env.insert("PYTHONDONTWRITEBYTECODE".into(), "1".into());
    // One worker process, so `stream` and `release` meet in it.
    let profile = Profile {
        pool_limit: 1,
        startup_timeout: Duration::from_secs(20),
        terminate_timeout: Duration::from_secs(5),
        ..Profile::default()
    };
    AppSpec { name: "pyweb".into(), dir: dir.to_path_buf(), manifest, profile }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_cocaine_web_apps_behind_the_gateway() {
    let Some(python) = venv_python() else {
        // CI sets the virtualenv up (.ci/run): there, a missing one is a failure, not a skip.
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "no cocaine virtualenv: run tests/cocaine-compat/setup.sh"
        );
        eprintln!("SKIPPED python gateway test: run tests/cocaine-compat/setup.sh");
        return;
    };
    let config = HttpConfig {
        gateway: GatewayConfig { max_body_bytes: 16 << 20, ..GatewayConfig::default() },
        ..HttpConfig::default()
    };
    let node = Node::start(config, Via::Engine, |dir| vec![python_app(dir, &python)]).await;
    let crashlog = |node: &Node| format!("{:#?}", node.engine.crashlog("pyweb"));

    // The `http` decorator: method, URI, headers, query arguments, body.
    let r = request(
        node.http,
        "POST",
        "/pyweb/http/items/7?colour=red&size=2",
        &[("content-type", "text/plain")],
        "hi there",
    )
    .await;
    assert_eq!(r.status, 200, "{}\n{}", r.text(), crashlog(&node));
    assert_eq!(r.headers["x-worker"], "python-http");
    let j = r.json();
    assert_eq!(j["method"], "POST");
    assert_eq!(j["uri"], "/items/7?colour=red&size=2");
    assert_eq!(j["version"], "1.1");
    assert_eq!(j["query"]["colour"], "red");
    assert_eq!(j["body_len"], 8);
    assert_eq!(j["body_fnv"], fnv1a(b"hi there"));
    assert!(j["headers"].as_array().unwrap().iter().any(|h| h[0] == "Content-Type" && h[1] == "text/plain"), "{j}");

    // The same app chosen by the Cocaine headers.
    let h = [("X-Cocaine-Service", "pyweb"), ("X-Cocaine-Event", "http")];
    let r = request(node.http, "GET", "/by/headers?x=1", &h, Bytes::new()).await;
    assert_eq!(r.json()["uri"], "/by/headers?x=1");

    // A streamed response: the head and the first part arrive while the handler still waits.
    let mut conn = Conn::open(node.http).await;
    let resp =
        conn.send(Request::get("/pyweb/stream?id=p1").header("host", "x").body(full(Bytes::new())).unwrap()).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["transfer-encoding"], "chunked");
    let mut body = resp.into_body();
    let first = within("first part", body.frame()).await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "part-0\n");
    assert_eq!(get(node.http, "/pyweb/release?id=p1").await.text(), "released");
    let rest = within("rest of the body", body.collect()).await.unwrap().to_bytes();
    assert_eq!(rest, "part-1\npart-2\npart-3\npart-4\n");

    // A large upload: 2.5 MiB reaches the handler whole, in chunks the framework accepts.
    let data: Vec<u8> = (0..5 * 512 * 1024 + 77).map(|i: u32| (i.wrapping_mul(40503) >> 7) as u8).collect();
    let r = request(node.http, "PUT", "/pyweb/http/upload", &[], data.clone()).await;
    assert_eq!(r.status, 200, "{}\n{}", r.text(), crashlog(&node));
    let j = r.json();
    assert_eq!(j["body_len"], data.len());
    assert_eq!(j["body_fnv"], fnv1a(&data));
    assert!(j["chunks"].as_u64().unwrap() >= 6, "{j}");

    // The `wsgi` decorator around a plain WSGI application.
    let r = request(
        node.http,
        "POST",
        "/pyweb/wsgi/hello/world?a=b",
        &[("content-type", "application/json")],
        r#"{"k":1}"#,
    )
    .await;
    assert_eq!(r.status, 201, "{}\n{}", r.text(), crashlog(&node));
    assert_eq!(r.headers["x-worker"], "python-wsgi");
    let j = r.json();
    assert_eq!(j["method"], "POST");
    assert_eq!(j["path"], "/hello/world");
    assert_eq!(j["query"], "a=b");
    assert_eq!(j["protocol"], "HTTP/1.1");
    assert_eq!(j["content_type"], "application/json");
    assert_eq!(j["body"], r#"{"k":1}"#);

    // The framework's own errors: no handler is 404, an exception in the handler is 500.
    let r = get(node.http, "/pyweb/nosuch").await;
    assert_eq!((r.status.as_u16(), r.json()["error"].as_str()), (404, Some("unknown_event")), "{}", r.text());
    let r = get(node.http, "/pyweb/fail").await;
    assert_eq!((r.status.as_u16(), r.json()["error"].as_str()), (500, Some("app_error")), "{}", r.text());
    assert!(r.json()["message"].as_str().unwrap().contains("failing on purpose"), "{}", r.text());

    // Every Python worker stayed up: nothing in the crashlog.
    assert!(node.engine.crashlog("pyweb").unwrap().is_empty(), "{}", crashlog(&node));
    node.shutdown().await;
}
