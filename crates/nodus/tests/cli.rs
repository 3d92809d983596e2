//! The `nodus` binary end to end: a daemon subprocess on a temporary Unix socket, driven by the
//! CLI subcommands exactly as a shell script would.
// These tests drive real processes and wait on the wall clock with std::thread::sleep.
#![allow(clippy::disallowed_methods)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const NODUS: &str = env!("CARGO_BIN_EXE_nodus");
const WAIT: Duration = Duration::from_secs(10);

struct Daemon {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(extra: &[&str]) -> Daemon {
        Self::start_in(tempfile::tempdir().unwrap(), extra)
    }

    /// A daemon whose data lives in `dir` (reused across restarts).
    fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Daemon {
        let socket = dir.path().join("n.sock");
        let udp: &[&str] = if extra.contains(&"--udp-listen") { &[] } else { &["--udp-listen", ""] };
        // Apps run this build's binary: as root, that needs run_as = "root" (the default user,
        // nobody, cannot reach it). Tests with their own config file say it there.
        let apps = dir.path().join("apps.toml");
        std::fs::write(&apps, "[apps]\nrun_as = \"root\"\n").unwrap();
        let config: Vec<&std::ffi::OsStr> =
            if extra.contains(&"--config") { vec![] } else { vec!["--config".as_ref(), apps.as_os_str()] };
        let child = Command::new(NODUS)
            .args(["daemon", "--server-name", "cli1", "--listen", "", "--cluster-listen", "", "--http-listen", ""])
            .args(if extra.contains(&"--locator-listen") { &[][..] } else { &["--locator-listen", "127.0.0.1:0"][..] })
            .args(if extra.contains(&"--arpcp-listen") { &[][..] } else { &["--arpcp-listen", ""][..] })
            .args(udp)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--unix-socket")
            .arg(&socket)
            .args(config)
            .args(extra)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let d = Daemon { child, socket, _dir: dir };
        // Ready once the socket accepts a connection.
        let deadline = Instant::now() + WAIT;
        while std::os::unix::net::UnixStream::connect(&d.socket).is_err() {
            assert!(Instant::now() < deadline, "daemon did not start listening");
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    fn node(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(NODUS).arg("--node").arg(self.node()).args(args).output().unwrap()
    }

    /// Waits for the daemon process to exit; returns whether it exited successfully.
    fn wait_exit(&mut self) -> bool {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            assert!(Instant::now() < deadline, "daemon did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A text-form service on the node's socket that answers every request with `ANSWER`.
fn text_service(socket: &Path, name: &str) -> std::thread::JoinHandle<Vec<String>> {
    text_service_feeding(socket, name, None)
}

/// Like [`text_service`], also sending each command it receives to `feed` as it arrives.
fn text_service_feeding(
    socket: &Path,
    name: &str,
    feed: Option<std::sync::mpsc::Sender<String>>,
) -> std::thread::JoinHandle<Vec<String>> {
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    writeln!(s, "REGISTER service={name};version=1").unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    for expected in ["HELP", "READY"] {
        line.clear();
        reader.read_line(&mut line).unwrap();
        assert!(line.contains(expected), "{line}");
    }
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return seen;
            }
            let msg = nodus_wire::text::from_line(line.trim_end()).unwrap();
            if msg.command == "QUITTING" {
                return seen;
            }
            seen.push(msg.command.clone());
            if let Some(feed) = &feed {
                let _ = feed.send(msg.command.clone());
            }
            if msg.envelope.id != 0 {
                let reply = msg.reply("ANSWER").param("got", msg.get("x").unwrap_or("-"));
                writeln!(s, "{}", nodus_wire::text::to_line(&reply)).unwrap();
            }
        }
    })
}

#[test]
fn send_exit_codes_tell_delivered_cached_or_failed() {
    let d = Daemon::start(&["--expect", "later"]);
    let svc = text_service(&d.socket, "images");
    let ok = d.cli(&["send", "images/REPROCESS url=http://x/y;priority=normal"]);
    assert!(ok.status.success(), "{ok:?}");
    let cached = d.cli(&["--json", "send", "later/JOB transmission_report=failure"]);
    assert!(cached.status.success());
    assert!(stdout(&cached).contains("\"result\":\"cached\""), "{}", stdout(&cached));
    let missing = d.cli(&["send", "nobody/JOB"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("SERVICE_UNAVAILABLE"));
    let bad = d.cli(&["send", "not a message"]);
    assert_eq!(bad.status.code(), Some(2));
    drop(d);
    assert_eq!(svc.join().unwrap(), ["REPROCESS"]);
}

#[test]
fn call_prints_the_reply_and_services_status_list_the_node() {
    let d = Daemon::start(&[]);
    let _svc = text_service(&d.socket, "calc");
    let out = d.cli(&["call", "calc", "ADD", "x=41"]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("ANSWER got=41"), "{}", stdout(&out));
    let json = d.cli(&["--json", "call", "calc", "ADD", "x=1"]);
    assert!(stdout(&json).contains("\"command\":\"ANSWER\""));
    let unknown = d.cli(&["call", "node", "NOPE"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(stdout(&unknown).contains("UNKNOWN command=NOPE"));

    let services = d.cli(&["--json", "services"]);
    // `apps`, `control`, `flags`, `taskcluster` and `tasks` are the node's built-in services.
    assert_eq!(
        stdout(&services).trim(),
        r#"[{"instances":1,"service":"apps"},{"instances":1,"service":"calc"},{"instances":1,"service":"control"},{"instances":1,"service":"flags"},{"instances":1,"service":"taskcluster"},{"instances":1,"service":"tasks"}]"#
    );
    let human = d.cli(&["services"]);
    assert!(stdout(&human).contains("calc"));
    let status = d.cli(&["--json", "status"]);
    assert!(stdout(&status).contains("\"server\":\"cli1\""), "{}", stdout(&status));
}

#[test]
fn sniff_shows_traffic_live() {
    let d = Daemon::start(&[]);
    let _svc = text_service(&d.socket, "watched");
    let mut sniff = Command::new(NODUS)
        .args(["--node", &d.node(), "sniff", "--service", "watched", "--command", "POKE", "--count", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Keep poking until the sniffer (which subscribes asynchronously) has seen one.
    let deadline = Instant::now() + WAIT;
    while sniff.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "sniffer saw nothing");
        assert!(d.cli(&["send", "watched/POKE n=1"]).status.success());
        assert!(d.cli(&["send", "watched/OTHER"]).status.success());
    }
    let out = sniff.wait_with_output().unwrap();
    let text = stdout(&out);
    assert!(text.contains("watched/POKE n=1"), "{text}");
    assert!(!text.contains("OTHER"));
}

#[test]
fn stop_and_sigterm_shut_the_daemon_down_cleanly() {
    let mut d = Daemon::start(&[]);
    let out = d.cli(&["stop"]);
    assert!(stdout(&out).contains("STOPPING"));
    assert!(d.wait_exit(), "exit status 0 after STOP");
    assert!(!d.socket.exists(), "the socket file is removed");

    // SIGTERM as soon as the node accepts connections: the handler is installed before any
    // listener, so even the earliest signal is a clean shutdown (it once killed the process).
    for _ in 0..5 {
        let mut d = Daemon::start(&[]);
        let pid = d.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        assert!(d.wait_exit(), "exit status 0 after SIGTERM");
    }
}

#[test]
fn config_prints_the_embedded_defaults_and_bad_config_is_refused() {
    let out = Command::new(NODUS).arg("config").output().unwrap();
    assert!(stdout(&out).contains("tcp_listen = \"127.0.0.1:4040\""));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "no_such_key = 1\n").unwrap();
    let out = Command::new(NODUS).args(["daemon", "--config"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field"), "{:?}", out);
}

#[test]
fn udp_signals_reach_services_and_need_the_secret() {
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let config = tempfile::tempdir().unwrap();
    let file = config.path().join("n.toml");
    std::fs::write(&file, format!("[cluster]\nudp_listen = \"{addr}\"\nudp_secret = \"s3\"\n")).unwrap();
    let file = file.display().to_string();
    let d = Daemon::start(&["--config", &file, "--udp-listen", &addr]);
    let (feed, fed) = std::sync::mpsc::channel();
    let svc = text_service_feeding(&d.socket, "logrotate", Some(feed));
    let udp = |secret: &str, msg: &str| {
        Command::new(NODUS).args(["send", "--udp", "--udp-addr", &addr, "--secret", secret, msg]).output().unwrap()
    };
    assert!(udp("wrong", "logrotate/DROPPED").status.success(), "sending works; the node drops it");
    assert!(udp("s3", "logrotate/ROTATE").status.success());
    let long = format!("logrotate/BIG v={}", "x".repeat(1100));
    assert_eq!(udp("s3", &long).status.code(), Some(2), "over 1024 bytes is refused before sending");
    assert!(udp("s3", "logrotate/MARK").status.success());
    // The node handles datagrams in order: once MARK is in, everything sent before it was handled.
    let mut got = Vec::new();
    while got.last().map(String::as_str) != Some("MARK") {
        got.push(fed.recv_timeout(WAIT).expect("datagrams delivered"));
    }
    assert_eq!(got, ["ROTATE", "MARK"]);
    assert!(d.cli(&["stop"]).status.success());
    let seen = svc.join().unwrap();
    assert!(!seen.contains(&"DROPPED".to_string()) && !seen.contains(&"BIG".to_string()));
}

#[test]
fn apps_deploy_run_as_services_survive_restarts_and_stop() {
    let locator_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let locator = format!("127.0.0.1:{locator_port}");
    let d = Daemon::start(&["--locator-listen", &locator]);
    let src = tempfile::tempdir().unwrap();
    let manifest = format!("{{\"executable\": {NODUS:?}, \"args\": [\"echo-worker\"]}}");
    std::fs::write(src.path().join("manifest.json"), manifest).unwrap();
    std::fs::write(src.path().join("profile.toml"), "pool-limit = 2\nconcurrency = 4\n").unwrap();
    let src_path = src.path().display().to_string();
    let out = d.cli(&["app", "deploy", "hello", &src_path]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("v1"));

    // The app is a service: commands map to events, the payload is the one chunk sent.
    let out = d.cli(&["--json", "call", "hello", "UPPER", "--payload", "shout"]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("\"payload\":\"SHOUT\""), "{}", stdout(&out));
    let out = d.cli(&["--json", "call", "hello", "INVOKE", "event=echo", "--payload", "same"]);
    assert!(stdout(&out).contains("\"payload\":\"same\""), "{}", stdout(&out));
    // For a person: the reply's command and parameters, then the payload as text.
    let out = d.cli(&["call", "hello", "UPPER", "--payload", "plain"]);
    assert_eq!(stdout(&out).lines().nth(1), Some("PLAIN"), "{}", stdout(&out));
    assert!(stdout(&out).lines().next().unwrap().ends_with("RESULT chunks=1;event=upper"), "{}", stdout(&out));
    let out = d.cli(&["call", "hello", "FAIL"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("code=app_error"), "{}", stdout(&out));
    let list = stdout(&d.cli(&["--json", "app", "list"]));
    assert!(list.contains("\"name\":\"hello\"") && list.contains("\"status\":\"running\""), "{list}");
    let info = stdout(&d.cli(&["app", "info", "hello"]));
    assert!(info.contains("version    v1") && info.contains("status     running"), "{info}");
    // Scaled to 2, the app keeps two workers running with no requests (its pool-limit is 2).
    let out = d.cli(&["app", "scale", "hello", "2"]);
    assert!(out.status.success() && stdout(&out).contains("workers    2"), "{out:?}");
    let out = d.cli(&["app", "scale", "hello", "many"]);
    assert_eq!(out.status.code(), Some(2), "clap refuses a non-number: {out:?}");
    let workers = |d: &Daemon| {
        let info = stdout(&d.cli(&["--json", "app", "info", "hello"]));
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        // Typed: the population is a number, the workers are objects.
        let n = v["workers"].as_array().map_or(0, Vec::len);
        (v["population"].as_u64().unwrap_or(0), n)
    };
    let deadline = Instant::now() + WAIT;
    while workers(&d) != (2, 2) {
        assert!(Instant::now() < deadline, "two workers did not start: {:?}", workers(&d));
        std::thread::sleep(Duration::from_millis(20));
    }

    // The node's Cocaine locator resolves the app: [1, 0, ["hello"]] → [1, 0, [[[host, port]], ...]];
    // an unknown name is an error on the channel: [1, 1, [[10, 1], text]].
    let resolve = |name: &str| {
        let mut s = std::net::TcpStream::connect(&locator).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut frame = vec![0x93, 0x01, 0x00, 0x91, 0xa0 | name.len() as u8];
        frame.extend_from_slice(name.as_bytes());
        s.write_all(&frame).unwrap();
        let mut buf = [0u8; 512];
        let n = std::io::Read::read(&mut s, &mut buf).unwrap();
        buf[..n].to_vec()
    };
    let found = resolve("hello");
    assert_eq!(&found[..3], &[0x93, 0x01, 0x00], "a value on channel 1: {found:?}");
    assert!(found.windows(9).any(|w| w == b"127.0.0.1"), "the endpoint's host: {found:?}");
    let missing = resolve("nope");
    assert_eq!(&missing[..7], &[0x93, 0x01, 0x01, 0x92, 0x92, 0x0a, 0x01], "error [[10, 1], ..]: {missing:?}");

    // A restart of the node brings the app back by itself.
    assert!(d.cli(&["stop"]).status.success());
    let mut d = d;
    assert!(d.wait_exit());
    let dir = std::mem::replace(&mut d._dir, tempfile::tempdir().unwrap());
    drop(d);
    let d = Daemon::start_in(dir, &["--locator-listen", &locator]);
    let deadline = Instant::now() + WAIT;
    loop {
        let out = d.cli(&["--json", "call", "hello", "ECHO", "--payload", "back"]);
        if stdout(&out).contains("\"payload\":\"back\"") {
            break;
        }
        assert!(Instant::now() < deadline, "app did not come back: {}", stdout(&out));
        std::thread::sleep(Duration::from_millis(20));
    }
    // Its population came back with it.
    while workers(&d) != (2, 2) {
        assert!(Instant::now() < deadline, "the population was not restored: {:?}", workers(&d));
        std::thread::sleep(Duration::from_millis(20));
    }
    // For a person, the workers are a table.
    let info = stdout(&d.cli(&["app", "info", "hello"]));
    let header = info.lines().find(|l| l.starts_with("WORKER")).unwrap_or_else(|| panic!("{info}"));
    assert!(header.contains("PID") && header.contains("STATE") && header.contains("LOAD"), "{info}");

    // Stopped: it answers that it is stopped, and it stays stopped; its crashlog shows the exits.
    assert!(d.cli(&["app", "stop", "hello"]).status.success());
    let out = d.cli(&["call", "hello", "ECHO"]);
    assert!(stdout(&out).contains("code=stopped"), "{}", stdout(&out));
    assert!(stdout(&d.cli(&["--json", "app", "list"])).contains("\"status\":\"stopped\""));
    let crashlog = stdout(&d.cli(&["app", "crashlog", "hello"]));
    assert!(crashlog.contains("worker "), "{crashlog}");
    // Readable times, not Unix seconds; records in JSON.
    assert!(crashlog.contains(" exited ") && crashlog.contains("Z (") && crashlog.contains(" ago)"), "{crashlog}");
    let records: serde_json::Value =
        serde_json::from_slice(&d.cli(&["--json", "app", "crashlog", "hello"]).stdout).unwrap();
    let first = &records.as_array().expect("an array of records")[0];
    assert!(first["uuid"].is_string() && first["at"].is_u64() && first["stderr"].is_array(), "{first}");
    assert!(d.cli(&["app", "remove", "hello"]).status.success());
    assert_eq!(d.cli(&["app", "info", "hello"]).status.code(), Some(1));
    // Bad deployments get clear errors.
    let out = d.cli(&["app", "deploy", "bad name", &src_path]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid app name"));
}

#[test]
fn apps_keep_answering_past_the_outbound_byte_bound() {
    // In-process services (app bridges) once counted queued bytes up but never down: an app was
    // cut off after max_outbound_bytes of traffic over the node's life.
    let config = tempfile::tempdir().unwrap();
    let file = config.path().join("n.toml");
    std::fs::write(&file, "[limits]\nmax_outbound_bytes = 1048576\n[apps]\nrun_as = \"root\"\n").unwrap();
    let file = file.display().to_string();
    let d = Daemon::start(&["--config", &file]);
    let src = tempfile::tempdir().unwrap();
    let manifest = format!("{{\"executable\": {NODUS:?}, \"args\": [\"echo-worker\"]}}");
    std::fs::write(src.path().join("manifest.json"), manifest).unwrap();
    assert!(d.cli(&["app", "deploy", "big", &src.path().display().to_string()]).status.success());
    let payload = "x".repeat(100 * 1024);
    for i in 0..30 {
        let out = d.cli(&["call", "big", "ECHO", "--payload", &payload]);
        assert!(out.status.success(), "call {i} after {} KiB: {}", i * 100, stdout(&out));
    }
}

/// A stdout whose reader is already gone: every write fails with a broken pipe (what `| head -1`
/// does once it has its line, or `| true` at once).
fn closed_stdout() -> Stdio {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Stdio::from(writer)
}

/// Runs `nodus ARGS` with a closed stdout; asserts it exits 0 without a panic.
fn assert_quiet_on_broken_pipe(mut command: Command) {
    let out = command.stdout(closed_stdout()).stderr(Stdio::piped()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{command:?}: {stderr}");
    assert_eq!(out.status.code(), Some(0), "{command:?}: {stderr}");
}

#[test]
fn piping_output_into_a_reader_that_goes_away_never_panics() {
    // `nodus config | true`
    let mut config = Command::new(NODUS);
    config.arg("config");
    assert_quiet_on_broken_pipe(config);
    // `nodus cluster status | head -1`
    let d = Daemon::start(&[]);
    let mut status = Command::new(NODUS);
    status.args(["--node", &d.node(), "cluster", "status"]);
    assert_quiet_on_broken_pipe(status);
    // `nodus sniff | head -1`: the first message sniffed meets the closed pipe.
    let _svc = text_service(&d.socket, "watched");
    let mut sniff = Command::new(NODUS)
        .args(["--node", &d.node(), "sniff", "--service", "watched"])
        .stdout(closed_stdout())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while sniff.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "sniff kept running with nobody reading");
        assert!(d.cli(&["send", "watched/POKE"]).status.success());
    }
    let out = sniff.wait_with_output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"), "{out:?}");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

/// A text service that declared the commands it accepts; it answers nothing.
fn picky_service(socket: &Path, name: &str, commands: &str) -> std::os::unix::net::UnixStream {
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    writeln!(s, "REGISTER service={name};version=1").unwrap();
    writeln!(s, "COMMANDS list={commands}").unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    for expected in ["HELP", "READY"] {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.contains(expected), "{line}");
    }
    // COMMANDS has no answer: a PING after it proves the node applied it.
    writeln!(s, "PING _id=7").unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains("PONG"), "{line}");
    s
}

#[test]
fn send_fails_for_a_dropped_message_and_names_the_unknown_command() {
    let d = Daemon::start(&[]);
    // `cache=no` for a service nobody serves: the node drops it; that is not a delivery.
    let dropped = d.cli(&["send", "nobody/JOB cache=no"]);
    assert_eq!(dropped.status.code(), Some(1), "{dropped:?}");
    assert!(String::from_utf8_lossy(&dropped.stderr).contains("cache=no"), "{dropped:?}");
    let json = d.cli(&["--json", "send", "nobody/JOB cache=no"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!((v["ok"].as_bool(), v["result"].as_str()), (Some(false), Some("failed")), "{v}");
    // A service that does not accept the command: the error says which command and service.
    let _picky = picky_service(&d.socket, "picky", "ONLY");
    let unknown = d.cli(&["send", "picky/OTHER x=1"]);
    assert_eq!(unknown.status.code(), Some(1), "{unknown:?}");
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(stderr.contains("\"picky\" does not accept command OTHER"), "{stderr}");
    let accepted = d.cli(&["send", "picky/ONLY"]);
    assert!(accepted.status.success(), "{accepted:?}");
}

#[test]
fn forgetting_a_node_nobody_knows_is_an_error() {
    let d = Daemon::start(&[]);
    let out = d.cli(&["cluster", "forget", "nosuchnode"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(!stdout(&out).contains("FORGOTTEN"), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no node named \"nosuchnode\""), "{out:?}");
    let json = d.cli(&["--json", "cluster", "forget", "nosuchnode"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["ok"], false, "{v}");
}

#[test]
fn json_is_typed_everywhere_and_errors_are_json_too() {
    let d = Daemon::start(&[]);
    let parse = |o: &Output| -> serde_json::Value {
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
    };
    let status = parse(&d.cli(&["status", "--json"]));
    assert!(status["connections"].is_u64() && status["uptime_ms"].is_u64(), "{status}");
    assert!(status["quitting"].is_boolean(), "{status}");
    let cluster = parse(&d.cli(&["cluster", "status", "--json"]));
    assert!(cluster["up"].is_boolean() && cluster["live"].is_u64() && cluster["nodes"].is_array(), "{cluster}");
    assert!(cluster["ntp"].is_string(), "{cluster}");
    let config = parse(&Command::new(NODUS).args(["config", "--json"]).output().unwrap());
    assert_eq!(config["limits"]["max_frame_bytes"], 4194304, "{config}");
    assert_eq!(config["tcp_listen"], "127.0.0.1:4040");
    // Errors: the node's refusal, a service's error, no node at all.
    let refused = d.cli(&["--json", "call", "nobody", "ASK"]);
    assert_eq!(refused.status.code(), Some(1));
    let v = parse(&refused);
    assert_eq!((v["ok"].as_bool(), v["code"].as_str()), (Some(false), Some("unavailable")), "{v}");
    let failed = d.cli(&["--json", "app", "info", "nosuchapp"]);
    assert_eq!(failed.status.code(), Some(1));
    assert_eq!(parse(&failed)["ok"], false);
    let nowhere = Command::new(NODUS).args(["--json", "--node", "/nonexistent/n.sock", "status"]).output().unwrap();
    assert_eq!(nowhere.status.code(), Some(2));
    let v = parse(&nowhere);
    assert!(v["error"].as_str().unwrap().contains("cannot connect"), "{v}");
    // A command line that does not parse is an error object too (exit 2, as clap exits).
    let usage = Command::new(NODUS).args(["--json", "send"]).output().unwrap();
    assert_eq!(usage.status.code(), Some(2));
    let v = parse(&usage);
    assert_eq!((v["ok"].as_bool(), v["usage"].as_bool()), (Some(false), Some(true)), "{v}");
    assert!(v["error"].as_str().unwrap().contains("<MESSAGE>"), "{v}");
    let missing = Command::new(NODUS).args(["app", "--json"]).output().unwrap();
    assert_eq!((missing.status.code(), parse(&missing)["ok"].as_bool()), (Some(2), Some(false)));
    // Human output for the same: readable durations.
    let human = stdout(&d.cli(&["status"]));
    assert!(human.contains("node        cli1") && human.contains(", up "), "{human}");
    let cluster = stdout(&d.cli(&["cluster", "status"]));
    assert!(cluster.contains("NTP "), "the kernel's NTP state is shown: {cluster}");
}

#[test]
fn stop_says_it_waits_for_requests_in_flight_and_returns_when_stopped() {
    let config = tempfile::tempdir().unwrap();
    let file = config.path().join("n.toml");
    std::fs::write(&file, "[limits]\nshutdown_grace_secs = 1\n").unwrap();
    let file = file.display().to_string();
    let mut d = Daemon::start(&["--config", &file]);
    let (feed, fed) = std::sync::mpsc::channel();
    let _silent = silent_service(&d.socket, "silent", feed);
    let mut caller = Command::new(NODUS)
        .args(["--node", &d.node(), "call", "silent", "ASK", "--timeout", "30s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert_eq!(fed.recv_timeout(WAIT).unwrap(), "ASK", "the request is in flight");
    let out = d.cli(&["stop"]);
    let text = stdout(&out);
    assert!(text.contains("STOPPING") && text.contains("waiting for 1 request in flight"), "{text}");
    assert!(text.contains("node cli1 stopped"), "{text}");
    assert!(d.wait_exit());
    let _ = caller.kill();
    let _ = caller.wait();
}

/// A text service that never answers; reports each command it receives.
fn silent_service(socket: &Path, name: &str, feed: std::sync::mpsc::Sender<String>) -> std::thread::JoinHandle<()> {
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    writeln!(s, "REGISTER service={name};version=1").unwrap();
    let reader = BufReader::new(s);
    std::thread::spawn(move || {
        for line in reader.lines() {
            let Ok(line) = line else { return };
            if let Ok(m) = nodus_wire::text::from_line(&line) {
                if !matches!(m.command.as_str(), "HELP" | "READY") {
                    let _ = feed.send(m.command);
                }
            }
        }
    })
}

/// A child process killed (and reaped) when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `nodus ARGS` and waits for a line on its stderr containing `ready`.
fn spawn_until(args: &[&str], ready: &str) -> Running {
    let mut child =
        Running(Command::new(NODUS).args(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap());
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + WAIT;
    loop {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("ready line");
        if line.contains(ready) {
            return child;
        }
    }
}

#[test]
fn a_shell_command_can_be_a_service() {
    let d = Daemon::start(&[]);
    let node = d.node();
    let greeter = r#"printf 'hello, %s (%s)' "$(cat)" "$NODUS_PARAM_x""#;
    let _svc = spawn_until(&["--node", &node, "serve", "greeter", "--command", greeter], "serving greeter");
    let out = d.cli(&["call", "greeter", "GREET", "x=42", "--payload", "world"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out).lines().nth(1), Some("hello, world (42)"), "{}", stdout(&out));
    // A command that fails is an error reply carrying its exit status and last stderr line.
    let _failing = spawn_until(&["--node", &node, "serve", "failing", "-c", "echo oops >&2; exit 3"], "serving");
    let out = d.cli(&["call", "failing", "RUN"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = stdout(&out);
    assert!(text.contains("code=command_failed") && text.contains("exit status 3: oops"), "{text}");
    // One-way messages run the command too; `nodus send` reports the delivery.
    assert!(d.cli(&["send", "greeter/GREET x=1"]).status.success());
}

/// Starts a daemon (bare: no listeners but the Unix socket) with `extra` flags and stderr piped
/// into a channel of lines.
fn daemon_with_log(dir: &Path, extra: &[&str]) -> (Running, PathBuf, std::sync::mpsc::Receiver<String>) {
    let socket = dir.join("n.sock");
    let mut child = Command::new(NODUS)
        .args(["daemon", "--server-name", "logged", "--listen", "", "--cluster-listen", "", "--udp-listen", ""])
        .args(["--http-listen", ""])
        .args(["--locator-listen", ""])
        .args(["--locator-listen", "", "--arpcp-listen", ""])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--unix-socket")
        .arg(&socket)
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            let _ = tx.send(line);
        }
    });
    (Running(child), socket, rx)
}

/// The first line from `rx` containing `what`.
fn wait_line(rx: &std::sync::mpsc::Receiver<String>, what: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no log line with {what:?}"));
        if line.contains(what) {
            return line;
        }
    }
}

#[test]
fn the_daemon_logs_plain_or_json_without_colours_and_survives_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let (json, _, rx) = daemon_with_log(dir.path(), &["--log-format", "json"]);
    let ready = wait_line(&rx, "nodus node ready");
    let v: serde_json::Value = serde_json::from_str(&ready).unwrap_or_else(|e| panic!("{e}: {ready}"));
    assert_eq!(v["level"], "INFO", "{v}");
    drop(json);

    let dir = tempfile::tempdir().unwrap();
    let (mut text, socket, rx) = daemon_with_log(dir.path(), &[]);
    let text = &mut text.0;
    let ready = wait_line(&rx, "nodus node ready");
    assert!(!ready.contains('\u{1b}'), "no ANSI colour codes when stderr is not a terminal: {ready:?}");
    // SIGHUP: logged, and the node keeps running.
    assert!(Command::new("kill").args(["-HUP", &text.id().to_string()]).status().unwrap().success());
    wait_line(&rx, "SIGHUP received");
    let node = format!("unix:{}", socket.display());
    let out = Command::new(NODUS).args(["--node", &node, "status"]).output().unwrap();
    assert!(out.status.success() && stdout(&out).contains("logged"), "{out:?}");
    assert!(text.try_wait().unwrap().is_none(), "still running after SIGHUP");

    // A closed stderr (`nodus daemon 2>&1 | head -1`) does not kill the node.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("n.sock");
    let mut deaf = Running(
        Command::new(NODUS)
            .args(["daemon", "--listen", "", "--cluster-listen", "", "--udp-listen", "", "--locator-listen", ""])
            .args(["--http-listen", ""])
            .args(["--arpcp-listen", ""])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--unix-socket")
            .arg(&socket)
            .stderr(closed_stdout())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + WAIT;
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline && deaf.0.try_wait().unwrap().is_none(), "the node died logging");
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = Command::new(NODUS).args(["--node", &format!("unix:{}", socket.display()), "stop"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(deaf.0.wait().unwrap().success(), "exit status 0 with nobody reading its log");

    // --log-level: `warn` hides the INFO lines.
    let dir = tempfile::tempdir().unwrap();
    let (mut quiet, socket, rx) = daemon_with_log(dir.path(), &["--log-level", "warn"]);
    let quiet = &mut quiet.0;
    let deadline = Instant::now() + WAIT;
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = Command::new(NODUS).args(["--node", &format!("unix:{}", socket.display()), "stop"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(quiet.wait().unwrap().success());
    let lines: Vec<String> = rx.try_iter().collect();
    assert!(lines.iter().all(|l| !l.contains("INFO")), "{lines:?}");
    let bad = Command::new(NODUS).args(["daemon", "--log-level", "nonsense=[", "--listen", ""]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
}

#[test]
fn help_version_completions_and_man_page_come_from_the_command_line_definition() {
    let run = |args: &[&str]| {
        let out = Command::new(NODUS).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        stdout(&out)
    };
    let help = run(&["daemon", "--help"]);
    assert!(!help.contains("--node") && !help.contains("--json"), "{help}");
    assert!(help.contains("--instance") && help.contains("--log-format") && help.contains("--log-level"), "{help}");
    assert_eq!(run(&["version"]).trim(), format!("nodus {}", env!("CARGO_PKG_VERSION")));
    let v: serde_json::Value = serde_json::from_str(&run(&["version", "--json"])).unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(run(&["completions", "bash"]).contains("_nodus()"));
    assert!(run(&["completions", "zsh"]).starts_with("#compdef nodus"));
    let man = run(&["man"]);
    assert!(man.starts_with(".ie") || man.starts_with(".TH"), "{}", &man[..80.min(man.len())]);
    assert!(man.contains("daemon") && man.contains("serve"), "every subcommand is listed");
    let daemon_page = run(&["man", "daemon"]);
    assert!(daemon_page.contains("nodus\\-daemon") && daemon_page.contains("instance"), "{daemon_page}");
    let title = daemon_page.lines().find(|l| l.starts_with(".TH")).unwrap_or("");
    assert!(title.contains(env!("CARGO_PKG_VERSION")), "the page says which version: {title}");
}

#[test]
fn commands_find_the_node_started_in_the_working_directory() {
    // `nodus daemon` with the default, relative data directory; the CLI in the same directory
    // needs no --node: it finds ./nodus-data/nodus.sock (the path the daemon logs also works).
    let dir = tempfile::tempdir().unwrap();
    let _daemon = Running(
        Command::new(NODUS)
            .args(["daemon", "--server-name", "here", "--listen", "", "--cluster-listen", "", "--udp-listen", ""])
            .args(["--http-listen", ""])
            .args(["--locator-listen", ""])
            .args(["--locator-listen", "", "--arpcp-listen", ""])
            .current_dir(dir.path())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let socket = dir.path().join("nodus-data/nodus.sock");
    let deadline = Instant::now() + WAIT;
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "the daemon did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let run = |args: &[&str]| {
        Command::new(NODUS).args(args).current_dir(dir.path()).env_remove("NODUS_NODE").output().unwrap()
    };
    let out = run(&["status"]);
    assert!(out.status.success() && stdout(&out).contains("here"), "{out:?}");
    let out = run(&["--node", "nodus-data/nodus.sock", "status"]);
    assert!(out.status.success() && stdout(&out).contains("here"), "{out:?}");
    // A socket whose name looks like neither a path nor an address (`--unix-socket n`).
    std::os::unix::fs::symlink("nodus-data/nodus.sock", dir.path().join("n")).unwrap();
    let out = run(&["--node", "n", "status"]);
    assert!(out.status.success() && stdout(&out).contains("here"), "{out:?}");
}

/// A scripted node: answers the handshake (`AUTH` with `AUTHENTICATED` when the token is `good`,
/// else `ERROR code=unauthorized`; `PING` with `PONG`) and `INFO`, and reports, per connection,
/// the token each `AUTH` carried (`None`: the client sent no `AUTH` before its first request).
/// Credentials are the client's to find; this node only records what it was given.
fn scripted_node<S>(mut accept: impl FnMut() -> Option<S> + Send + 'static) -> std::sync::mpsc::Receiver<Option<String>>
where
    S: std::io::Read + std::io::Write + Send + 'static,
{
    use nodus_wire::{binary, Decoded, Message};
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        while let Some(mut s) = accept() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let node = |req: &Message, command: &str| {
                    let mut m = req.reply(command);
                    m.from = nodus_wire::Address::new("scripted", "node");
                    m
                };
                let _ = s.write_all(&binary::PREFACE);
                let mut decoder = binary::FrameDecoder::new(1 << 20);
                let mut buf = bytes::BytesMut::new();
                // The token of the AUTH before the first other message, once that arrives.
                let mut token: Option<String> = None;
                let mut reported = false;
                let mut chunk = [0u8; 4096];
                loop {
                    while let Ok(Some(Decoded::Message(m))) = decoder.decode(&mut buf) {
                        let reply = match m.command.as_str() {
                            "AUTH" => {
                                token = m.get("token").map(String::from);
                                if token.as_deref() == Some("good") {
                                    node(&m, "AUTHENTICATED").param("principal", "owner")
                                } else {
                                    node(&m, "ERROR").param("code", "unauthorized").param("message", "wrong token")
                                }
                            }
                            "PING" => node(&m, "PONG").param("server", "scripted"),
                            "INFO" => node(&m, "INFO").param("server", "scripted").param("version", "test"),
                            _ => node(&m, "UNKNOWN").param("command", &m.command),
                        };
                        if m.command != "AUTH" && !reported {
                            reported = true;
                            let _ = tx.send(token.take());
                        }
                        let mut out = bytes::BytesMut::new();
                        binary::encode(&reply, &mut out, 1 << 20).unwrap();
                        if s.write_all(&out).is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    rx
}

#[test]
fn credentials_are_found_the_way_the_readme_says() {
    let dir = tempfile::tempdir().unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = tcp.local_addr().unwrap().to_string();
    let tokens = scripted_node(move || tcp.accept().ok().map(|(s, _)| s));
    let socket = dir.path().join("scripted.sock");
    let unix = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let unix_tokens = scripted_node(move || unix.accept().ok().map(|(s, _)| s));
    let run = |node: &str, env: &[(&str, &str)], extra: &[&str]| {
        let mut c = Command::new(NODUS);
        c.args(["--node", node, "status"]).args(extra).current_dir(dir.path());
        for var in ["NODUS_TOKEN", "NODUS_TOKEN_FILE", "NODUS_NODE"] {
            c.env_remove(var);
        }
        c.envs(env.iter().copied()).output().unwrap()
    };
    let seen = |rx: &std::sync::mpsc::Receiver<Option<String>>| rx.recv_timeout(WAIT).expect("a connection");
    // No credentials anywhere: no AUTH.
    assert!(run(&addr, &[], &[]).status.success());
    assert_eq!(seen(&tokens), None);
    // The node's own token file in ./nodus-data, used over TCP.
    std::fs::create_dir(dir.path().join("nodus-data")).unwrap();
    std::fs::write(dir.path().join("nodus-data/auth.token"), "good\n").unwrap();
    let out = run(&addr, &[], &[]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(seen(&tokens).as_deref(), Some("good"));
    // On the Unix socket the node's own user needs none.
    assert!(run(&socket.display().to_string(), &[], &[]).status.success());
    assert_eq!(seen(&unix_tokens), None);
    // --token-file, and $NODUS_TOKEN_FILE, win over the data directory's file.
    let file = dir.path().join("other.token");
    let mut f = std::fs::File::create(&file).unwrap();
    writeln!(f, "from-file").unwrap();
    let file = file.display().to_string();
    let out = run(&addr, &[], &["--token-file", &file]);
    assert_eq!(out.status.code(), Some(1), "a refused token is a refusal: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused the token: wrong token"), "{out:?}");
    assert_eq!(seen(&tokens).as_deref(), Some("from-file"));
    assert_eq!(run(&addr, &[("NODUS_TOKEN_FILE", &file)], &[]).status.code(), Some(1));
    assert_eq!(seen(&tokens).as_deref(), Some("from-file"));
    // $NODUS_TOKEN wins over everything.
    let out = run(&addr, &[("NODUS_TOKEN", "good"), ("NODUS_TOKEN_FILE", &file)], &[]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(seen(&tokens).as_deref(), Some("good"));
    // A named token file that does not exist is an error, not a silent anonymous connection.
    let out = run(&addr, &[], &["--token-file", "/nonexistent/token"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the token file"), "{out:?}");
}
