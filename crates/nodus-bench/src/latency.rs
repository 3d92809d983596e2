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
}

impl System {
    /// The name used in the output.
    pub fn as_str(self) -> &'static str {
        match self {
            System::Nodus => "nodus",
            System::Baseline => "baseline",
            System::CrossNode => "cross-node",
            System::Fanout => "fanout-5",
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
