//! Round-trip times recorded inside a measurement window, and the summary computed from them:
//! requests per second and nearest-rank percentiles over the sorted samples.

use std::time::Duration;
use tokio::time::Instant;

/// Which system a measurement is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    /// Through the nodus daemon.
    Nodus,
    /// Through the raw byte-copying forwarder.
    Baseline,
    /// Client on one node, service on another, over a cluster link.
    CrossNode,
    /// One broadcast to a service on each of five nodes, until all have answered.
    Fanout,
    /// An app invocation through a node: client → daemon → app bridge → engine → worker.
    AppNode,
    /// An app invocation through an engine in the benchmark's own process → worker.
    AppEngine,
    /// Cold start baseline: fork + exec of a trivial child until its byte arrives on a socket.
    ColdBaseline,
    /// Cold start of `nodus echo-worker` under the engine: spawn → handshake → first reply.
    ColdNodusWorker,
    /// Cold start of the engine's small example worker `nodus-echo-worker`.
    ColdTinyWorker,
}

impl System {
    /// The name used in the output.
    pub fn as_str(self) -> &'static str {
        match self {
            System::Nodus => "nodus",
            System::Baseline => "baseline",
            System::CrossNode => "cross-node",
            System::Fanout => "fanout-5",
            System::AppNode => "app-node",
            System::AppEngine => "app-engine",
            System::ColdBaseline => "cold-baseline",
            System::ColdNodusWorker => "cold-nodus-echo-worker",
            System::ColdTinyWorker => "cold-tiny-worker",
        }
    }
}

/// What one measurement runs.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Payload bytes per request.
    pub payload: usize,
    /// Requests outstanding at once.
    pub inflight: usize,
    /// Unmeasured warm-up.
    pub warmup: Duration,
    /// Measured phase.
    pub duration: Duration,
}

impl Load {
    /// The measurement window of a run starting now: requests answered inside it are counted.
    pub fn window(&self) -> Window {
        let start = Instant::now() + self.warmup;
        Window { start, end: start + self.duration }
    }
}

/// The measured phase: `[start, end)`.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// First instant counted (after the warm-up).
    pub start: Instant,
    /// End of the measured phase; no request is started after it.
    pub end: Instant,
}

/// Round-trip times of the requests answered inside a window.
#[derive(Debug)]
pub struct Recorder {
    window: Window,
    rtts_ns: Vec<u64>,
}

impl Recorder {
    /// An empty recorder for `window`.
    pub fn new(window: Window) -> Self {
        Recorder { window, rtts_ns: Vec::new() }
    }

    /// Records a request sent at `sent` and answered at `done`, if `done` lies inside the window.
    pub fn record(&mut self, sent: Instant, done: Instant) {
        if done >= self.window.start && done < self.window.end {
            self.rtts_ns.push(u64::try_from((done - sent).as_nanos()).unwrap_or(u64::MAX));
        }
    }

    /// Adds the samples of `other` (same window).
    pub fn merge(&mut self, mut other: Recorder) {
        self.rtts_ns.append(&mut other.rtts_ns);
    }

    /// The summary of what was recorded.
    pub fn summary(self, system: System, load: &Load) -> Summary {
        let secs = (self.window.end - self.window.start).as_secs_f64();
        Summary::new(system, load.payload, load.inflight, self.rtts_ns, secs)
    }
}

/// The result of one measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Which system.
    pub system: System,
    /// Payload bytes per request.
    pub payload: usize,
    /// Requests outstanding at once.
    pub inflight: usize,
    /// Requests answered inside the measured phase.
    pub requests: u64,
    /// Length of the measured phase, seconds.
    pub secs: f64,
    /// Median round-trip time, microseconds.
    pub p50_us: f64,
    /// 99th-percentile round-trip time, microseconds.
    pub p99_us: f64,
    /// 99.9th-percentile round-trip time, microseconds.
    pub p999_us: f64,
}

impl Summary {
    /// Builds the summary from round-trip times in nanoseconds (sorted here).
    pub fn new(system: System, payload: usize, inflight: usize, mut rtts_ns: Vec<u64>, secs: f64) -> Self {
        rtts_ns.sort_unstable();
        let us = |q| percentile(&rtts_ns, q) as f64 / 1_000.0;
        Summary {
            system,
            payload,
            inflight,
            requests: rtts_ns.len() as u64,
            secs,
            p50_us: us(0.50),
            p99_us: us(0.99),
            p999_us: us(0.999),
        }
    }

    /// Requests answered per second of the measured phase.
    pub fn req_per_sec(&self) -> f64 {
        if self.secs > 0.0 {
            self.requests as f64 / self.secs
        } else {
            0.0
        }
    }
}

/// Repeated one-off timings (cold starts): nearest-rank percentiles over the samples.
#[derive(Debug, Clone, PartialEq)]
pub struct ColdStart {
    /// What was started.
    pub system: System,
    /// How many times.
    pub samples: usize,
    /// Median time to the first answer, microseconds.
    pub p50_us: f64,
    /// 99th percentile (with few samples, the largest), microseconds.
    pub p99_us: f64,
    /// Largest, microseconds.
    pub max_us: f64,
    /// Median time until the worker could take requests, when observed, microseconds.
    pub ready_p50_us: Option<f64>,
}

impl ColdStart {
    /// Builds the summary from times to the first answer and to readiness, in nanoseconds.
    pub fn new(system: System, mut totals_ns: Vec<u64>, mut ready_ns: Vec<u64>) -> Self {
        totals_ns.sort_unstable();
        ready_ns.sort_unstable();
        let us = |v: &[u64], q| percentile(v, q) as f64 / 1_000.0;
        ColdStart {
            system,
            samples: totals_ns.len(),
            p50_us: us(&totals_ns, 0.50),
            p99_us: us(&totals_ns, 0.99),
            max_us: us(&totals_ns, 1.0),
            ready_p50_us: (!ready_ns.is_empty()).then(|| us(&ready_ns, 0.50)),
        }
    }

    /// This median over `baseline`'s (0 when the baseline has none).
    pub fn ratio_to(&self, baseline: &ColdStart) -> f64 {
        if baseline.p50_us > 0.0 {
            self.p50_us / baseline.p50_us
        } else {
            0.0
        }
    }
}

/// Nearest-rank percentile `q` (0 < q <= 1) of an ascending slice; 0 for an empty one.
pub fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 0.50), 500);
        assert_eq!(percentile(&v, 0.99), 990);
        assert_eq!(percentile(&v, 0.999), 999);
        assert_eq!(percentile(&[7], 0.999), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }

    #[test]
    fn cold_start_percentiles_and_ratio() {
        let c = ColdStart::new(System::ColdNodusWorker, vec![3_000, 1_000, 2_000], vec![500]);
        assert_eq!((c.samples, c.p50_us, c.p99_us, c.max_us, c.ready_p50_us), (3, 2.0, 3.0, 3.0, Some(0.5)));
        let b = ColdStart::new(System::ColdBaseline, vec![1_000], Vec::new());
        assert_eq!(b.ready_p50_us, None);
        assert_eq!(c.ratio_to(&b), 2.0);
    }

    #[test]
    fn only_answers_inside_the_window_count() {
        let t = Instant::now();
        let window = Window { start: t + Duration::from_secs(1), end: t + Duration::from_secs(3) };
        let mut r = Recorder::new(window);
        r.record(t, t + Duration::from_millis(500)); // warm-up
        r.record(t + Duration::from_millis(900), t + Duration::from_millis(1100)); // straddles: counted
        r.record(t + Duration::from_secs(2), t + Duration::from_secs(3)); // at the end: not counted
        let load = Load { payload: 1, inflight: 1, warmup: Duration::from_secs(1), duration: Duration::from_secs(2) };
        let s = r.summary(System::Nodus, &load);
        assert_eq!(s.requests, 1);
        assert_eq!(s.p50_us, 200_000.0);
        assert_eq!(s.req_per_sec(), 0.5);
    }
}
