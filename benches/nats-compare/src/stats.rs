//! Throughput and latency percentiles from per-request round-trip times, and their output forms.

use std::time::Duration;

/// The result of one benchmark run.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Payload size in bytes.
    pub payload: usize,
    /// Concurrent outstanding requests.
    pub inflight: usize,
    /// Requests completed in the measured phase.
    pub requests: u64,
    /// Length of the measured phase, from its start until the last request was answered.
    pub secs: f64,
    /// Median round-trip time, microseconds.
    pub p50_us: f64,
    /// 99th-percentile round-trip time, microseconds.
    pub p99_us: f64,
    /// 99.9th-percentile round-trip time, microseconds.
    pub p999_us: f64,
}

impl Summary {
    /// Builds the summary from round-trip times in nanoseconds (sorted here) and the measured time.
    pub fn new(payload: usize, inflight: usize, mut rtts_ns: Vec<u64>, elapsed: Duration) -> Self {
        rtts_ns.sort_unstable();
        let us = |q| percentile(&rtts_ns, q) as f64 / 1_000.0;
        Self {
            payload,
            inflight,
            requests: rtts_ns.len() as u64,
            secs: elapsed.as_secs_f64(),
            p50_us: us(0.50),
            p99_us: us(0.99),
            p999_us: us(0.999),
        }
    }

    /// Completed requests per second over the measured phase.
    pub fn req_per_sec(&self) -> f64 {
        if self.secs > 0.0 {
            self.requests as f64 / self.secs
        } else {
            0.0
        }
    }

    /// One line for a person to read.
    pub fn human(&self) -> String {
        format!(
            "nats   payload {:>5} B  inflight {:>3}: {:>9} req in {:.2} s = {:>9.0} req/s  \
             p50 {:>8.1} us  p99 {:>8.1} us  p99.9 {:>8.1} us",
            self.payload,
            self.inflight,
            self.requests,
            self.secs,
            self.req_per_sec(),
            self.p50_us,
            self.p99_us,
            self.p999_us,
        )
    }

    /// One JSON object on one line, the same shape `nodus-bench reqrep --json` prints.
    pub fn json(&self) -> String {
        format!(
            "{{\"system\":\"nats\",\"payload\":{},\"inflight\":{},\"requests\":{},\"secs\":{:.3},\
             \"req_per_sec\":{:.1},\"p50_us\":{:.1},\"p99_us\":{:.1},\"p999_us\":{:.1}}}",
            self.payload,
            self.inflight,
            self.requests,
            self.secs,
            self.req_per_sec(),
            self.p50_us,
            self.p99_us,
            self.p999_us,
        )
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
        assert_eq!(percentile(&v, 1.0), 1000);
        assert_eq!(percentile(&[7], 0.001), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }

    #[test]
    fn summary_and_json() {
        let rtts = vec![3_000, 1_000, 2_000, 4_000];
        let s = Summary::new(64, 8, rtts, Duration::from_secs(2));
        assert_eq!(s.requests, 4);
        assert_eq!(s.req_per_sec(), 2.0);
        assert_eq!((s.p50_us, s.p99_us, s.p999_us), (2.0, 4.0, 4.0));
        assert_eq!(
            s.json(),
            "{\"system\":\"nats\",\"payload\":64,\"inflight\":8,\"requests\":4,\"secs\":2.000,\
             \"req_per_sec\":2.0,\"p50_us\":2.0,\"p99_us\":4.0,\"p999_us\":4.0}"
        );
    }
}
