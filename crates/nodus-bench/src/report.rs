//! The output layer: the only place that prints. Figures go to stdout (a table, or one JSON
//! object per line with `--json`); progress and errors go to stderr.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use crate::latency::{ColdStart, Summary};

/// The throughput ratio nodus/baseline the project aims for.
pub const TARGET_RATIO: f64 = 0.5;
/// Invocations per second through a node the project aims for at 64 B with 64 in flight.
pub const TARGET_INVOKES: f64 = 100_000.0;
/// Largest worker cold start (median) over the fork+exec+connect baseline the project aims for.
pub const TARGET_COLD_RATIO: f64 = 2.0;

/// A child process tells its parent it is serving (read by [`crate::child::Child::ready`]).
pub fn ready(endpoint: &str) {
    println!("ready {endpoint}");
}

/// An error, on stderr.
pub fn error(message: &str) {
    eprintln!("nodus-bench: error: {message}");
}

/// Progress, on stderr (stdout stays clean for the figures).
pub fn progress(message: &str) {
    eprintln!("nodus-bench: {message}");
}

/// One measurement as one JSON object on one line (the shape scripts/bench-nats.sh consumes).
pub fn json(s: &Summary) {
    println!(
        "{{\"system\":\"{}\",\"payload\":{},\"inflight\":{},\"requests\":{},\"secs\":{:.3},\
         \"req_per_sec\":{:.1},\"p50_us\":{:.1},\"p99_us\":{:.1},\"p999_us\":{:.1}}}",
        s.system.as_str(),
        s.payload,
        s.inflight,
        s.requests,
        s.secs,
        s.req_per_sec(),
        s.p50_us,
        s.p99_us,
        s.p999_us,
    );
}

/// One measurement as one line for a person, on stdout.
pub fn human(s: &Summary) {
    println!("{}", human_line(s));
}

/// One measurement as one line for a person, on stderr (used when stdout carries JSON).
pub fn human_to_stderr(s: &Summary) {
    eprintln!("{}", human_line(s));
}

fn human_line(s: &Summary) -> String {
    format!(
        "{:<8} payload {:>5} B  inflight {:>3}: {:>9} req in {:.2} s = {:>9.0} req/s  \
         p50 {:>8.1} us  p99 {:>8.1} us  p99.9 {:>8.1} us",
        s.system.as_str(),
        s.payload,
        s.inflight,
        s.requests,
        s.secs,
        s.req_per_sec(),
        s.p50_us,
        s.p99_us,
        s.p999_us,
    )
}

/// The throughput ratio nodus/baseline (0 when the baseline did nothing).
pub fn ratio(nodus: &Summary, baseline: &Summary) -> f64 {
    if baseline.req_per_sec() > 0.0 {
        nodus.req_per_sec() / baseline.req_per_sec()
    } else {
        0.0
    }
}

/// The ratio line printed after a `reqrep` run, on stdout or stderr.
pub fn ratio_line(nodus: &Summary, baseline: &Summary, to_stderr: bool) {
    let r = ratio(nodus, baseline);
    let verdict = if r >= TARGET_RATIO { "meets" } else { "BELOW" };
    let line = format!("throughput ratio nodus/baseline: {r:.2} ({verdict} the target of {TARGET_RATIO})");
    if to_stderr {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}

/// The header of the `all` table.
pub fn table_header() {
    println!(
        "{:>7} {:>8} | {:>11} {:>8} {:>8} {:>8} | {:>11} {:>8} {:>8} {:>8} | {:>5}",
        "payload",
        "inflight",
        "nodus req/s",
        "p50 us",
        "p99 us",
        "p999 us",
        "base req/s",
        "p50 us",
        "p99 us",
        "p999 us",
        "ratio"
    );
    println!("{}", "-".repeat(114));
}

/// One row of the `all` table.
pub fn table_row(nodus: &Summary, baseline: &Summary) {
    println!(
        "{:>7} {:>8} | {:>11.0} {:>8.1} {:>8.1} {:>8.1} | {:>11.0} {:>8.1} {:>8.1} {:>8.1} | {:>5.2}",
        nodus.payload,
        nodus.inflight,
        nodus.req_per_sec(),
        nodus.p50_us,
        nodus.p99_us,
        nodus.p999_us,
        baseline.req_per_sec(),
        baseline.p50_us,
        baseline.p99_us,
        baseline.p999_us,
        ratio(nodus, baseline),
    );
}

/// The line after the `all` table.
pub fn table_footer(worst: f64) {
    let verdict = if worst >= TARGET_RATIO { "meets" } else { "BELOW" };
    println!("lowest throughput ratio nodus/baseline: {worst:.2} ({verdict} the target of {TARGET_RATIO})");
}

/// The header of the `apps` invoke table.
pub fn apps_header() {
    println!("app invoke: node = client -> daemon -> bridge -> engine -> worker; engine = in-process engine -> worker");
    println!(
        "{:>7} {:>8} | {:>10} {:>8} {:>8} {:>8} | {:>10} {:>8} {:>8} {:>8} | {:>11}",
        "payload",
        "inflight",
        "node inv/s",
        "p50 us",
        "p99 us",
        "p999 us",
        "eng inv/s",
        "p50 us",
        "p99 us",
        "p999 us",
        "node/engine"
    );
    println!("{}", "-".repeat(114));
}

/// One row of the `apps` invoke table: the same load through the node and through the engine.
pub fn apps_row(node: &Summary, engine: &Summary) {
    let ratio = if engine.req_per_sec() > 0.0 { node.req_per_sec() / engine.req_per_sec() } else { 0.0 };
    println!(
        "{:>7} {:>8} | {:>10.0} {:>8.1} {:>8.1} {:>8.1} | {:>10.0} {:>8.1} {:>8.1} {:>8.1} | {:>11.2}",
        node.payload,
        node.inflight,
        node.req_per_sec(),
        node.p50_us,
        node.p99_us,
        node.p999_us,
        engine.req_per_sec(),
        engine.p50_us,
        engine.p99_us,
        engine.p999_us,
        ratio,
    );
}

/// The verdict after the invoke table: the node's figure at 64 B × 64 against the target.
pub fn apps_footer(node: &[Summary]) {
    if let Some(s) = node.iter().find(|s| s.payload == 64 && s.inflight == 64) {
        let rate = s.req_per_sec();
        let verdict = if rate >= TARGET_INVOKES { "meets" } else { "BELOW" };
        println!("invokes/s through the node at 64 B x 64 in flight: {rate:.0} ({verdict} the target of {TARGET_INVOKES:.0})");
    }
}

/// The header of the cold-start table.
pub fn cold_header(samples: usize) {
    println!();
    println!("cold start, {samples} runs each: spawn -> handshake -> heartbeat -> first reply (baseline: fork+exec+connect+1 byte)");
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:>13} {:>11}",
        "what", "p50 us", "p99 us", "max us", "ready p50 us", "x baseline"
    );
    println!("{}", "-".repeat(83));
}

/// One row of the cold-start table, with its median over the baseline's.
pub fn cold_row(c: &ColdStart, baseline: &ColdStart) {
    let ready = c.ready_p50_us.map_or_else(|| "-".to_string(), |r| format!("{r:.1}"));
    println!(
        "{:<24} {:>10.1} {:>10.1} {:>10.1} {:>13} {:>11.2}",
        c.system.as_str(),
        c.p50_us,
        c.p99_us,
        c.max_us,
        ready,
        c.ratio_to(baseline)
    );
}

/// The verdict after the cold-start table, one line per worker.
pub fn cold_footer(workers: &[ColdStart], baseline: &ColdStart) {
    for c in workers {
        let r = c.ratio_to(baseline);
        let verdict = if r <= TARGET_COLD_RATIO { "meets" } else { "ABOVE" };
        println!(
            "{}: median cold start {r:.2}x the baseline ({verdict} the target of at most {TARGET_COLD_RATIO}x)",
            c.system.as_str()
        );
    }
}

/// One cold-start measurement as one JSON object on one line.
pub fn cold_json(c: &ColdStart) {
    let ready = c.ready_p50_us.map_or_else(|| "null".to_string(), |r| format!("{r:.1}"));
    println!(
        "{{\"system\":\"{}\",\"samples\":{},\"p50_us\":{:.1},\"p99_us\":{:.1},\"max_us\":{:.1},\"ready_p50_us\":{}}}",
        c.system.as_str(),
        c.samples,
        c.p50_us,
        c.p99_us,
        c.max_us,
        ready,
    );
}

fn ms(v: Option<i64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v}"))
}

/// The header of the `sim` table.
pub fn sim_header(heartbeat_ms: u64, dials: usize, slowdown: f64, loss: f64, lane: bool) {
    println!(
        "simulated cluster: random graph, each node dials {dials}; heartbeat {heartbeat_ms} ms; \
         CPU cost x{slowdown}; loss {loss}; heartbeat lane {}",
        if lane { "on" } else { "off" }
    );
    println!(
        "{:>6} | {:>9} {:>9} {:>9} {:>10} | {:>6} | {:>9} | {:>4} {:>8} {:>9} {:>10} {:>6} | {:>8}",
        "nodes",
        "conv ms",
        "links ms",
        "msg/node",
        "KB/node",
        "false",
        "idle B/l/s",
        "hub",
        "seen ms",
        "msg/node",
        "KB/node",
        "under",
        "wall s"
    );
    println!("{}", "-".repeat(126));
}

/// One row of the `sim` table.
pub fn sim_row(f: &nodus_daemon::router::sim::Figures, wall: std::time::Duration) {
    println!(
        "{:>6} | {:>9} {:>9} {:>9.0} {:>10.1} | {:>6} | {:>10.0} | {:>4} {:>8} {:>9.1} {:>10.1} {:>6} | {:>8.1}",
        f.nodes,
        ms(f.converge_ms),
        ms(f.links_ms),
        f.start_messages,
        f.start_bytes / 1024.0,
        f.false_deaths,
        f.idle_bytes_per_link,
        f.hub_degree,
        ms(f.crash_seen_ms),
        f.crash_messages,
        f.crash_bytes / 1024.0,
        f.under_reports,
        wall.as_secs_f64()
    );
}

/// One `sim` row as JSON.
pub fn sim_json(f: &nodus_daemon::router::sim::Figures, wall: std::time::Duration) {
    let opt = |v: Option<i64>| v.map_or_else(|| "null".to_string(), |v| v.to_string());
    println!(
        "{{\"nodes\":{},\"converge_ms\":{},\"links_ms\":{},\"start_messages_per_node\":{:.1},\
         \"start_bytes_per_node\":{:.0},\"false_deaths\":{},\"idle_bytes_per_link_per_sec\":{:.1},\
         \"hub_links\":{},\"crash_seen_ms\":{},\"crash_messages_per_node\":{:.2},\
         \"crash_bytes_per_node\":{:.0},\"under_reports\":{},\"virtual_secs\":{:.2},\"wall_secs\":{:.2}}}",
        f.nodes,
        opt(f.converge_ms),
        opt(f.links_ms),
        f.start_messages,
        f.start_bytes,
        f.false_deaths,
        f.idle_bytes_per_link,
        f.hub_degree,
        opt(f.crash_seen_ms),
        f.crash_messages,
        f.crash_bytes,
        f.under_reports,
        f.virtual_secs,
        wall.as_secs_f64()
    );
}

/// The header of the cluster-at-scale table.
pub fn scale_header(dials: usize, heartbeat_ms: u64, runs: usize) {
    println!(
        "cluster at scale: real daemons on loopback, random graph, each node dials {dials}; \
         heartbeat {heartbeat_ms} ms; medians of {runs} run(s)"
    );
    println!(
        "{:>6} {:>6} | {:>9} {:>10} {:>6} | {:>10} | {:>4} {:>9} {:>6} {:>8} | {:>5}",
        "binary", "nodes", "converge", "KB/node", "false", "idle B/l/s", "hub", "seen", "false", "min live", "load"
    );
    println!("{}", "-".repeat(104));
}

fn secs(d: Option<std::time::Duration>) -> String {
    d.map_or_else(|| "-".to_string(), |d| format!("{:.2} s", d.as_secs_f64()))
}

/// One row of the cluster-at-scale table.
pub fn scale_row(label: &str, f: &crate::scale::ScaleFigures) {
    println!(
        "{:>6} {:>6} | {:>9} {:>10.1} {:>6} | {:>10.0} | {:>4} {:>9} {:>6} {:>8} | {:>5}",
        label,
        f.nodes,
        secs(f.converge),
        f.start_bytes_per_node / 1024.0,
        f.false_deaths_start,
        f.idle_bytes_per_link,
        f.hub_links,
        secs(f.crash_seen),
        f.false_deaths_crash,
        f.min_live_after_crash,
        f.load
    );
}

/// One cluster-at-scale row as JSON.
pub fn scale_json(label: &str, f: &crate::scale::ScaleFigures) {
    let opt = |d: Option<std::time::Duration>| d.map_or_else(|| "null".to_string(), |d| d.as_millis().to_string());
    println!(
        "{{\"binary\":\"{label}\",\"nodes\":{},\"converge_ms\":{},\"start_bytes_per_node\":{:.0},\
         \"false_deaths_start\":{},\"idle_bytes_per_link_per_sec\":{:.1},\"hub_links\":{},\
         \"crash_seen_ms\":{},\"false_deaths_crash\":{},\"min_live_after_crash\":{},\"load\":\"{}\"}}",
        f.nodes,
        opt(f.converge),
        f.start_bytes_per_node,
        f.false_deaths_start,
        f.idle_bytes_per_link,
        f.hub_links,
        opt(f.crash_seen),
        f.false_deaths_crash,
        f.min_live_after_crash,
        f.load
    );
}
