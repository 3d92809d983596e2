//! Phi-accrual failure detector (Hayashibara et al., as used by Akka and Cassandra): instead of a
//! fixed timeout, it turns the time since the last heartbeat into a suspicion level `phi` given
//! the observed distribution of heartbeat intervals. No I/O, no clock: arrival times are inputs.

use std::collections::VecDeque;

/// Heartbeat intervals remembered.
const WINDOW: usize = 100;

/// Suspicion tracker for one peer.
#[derive(Debug, Clone)]
pub struct PhiDetector {
    intervals: VecDeque<f64>,
    last: Option<i64>,
    min_std_ms: f64,
    first_interval_ms: f64,
}

impl PhiDetector {
    /// A detector expecting heartbeats about every `expected_ms`, whose intervals are assumed to
    /// vary by at least `min_std_ms` (guards against over-confidence on a very regular link).
    pub fn new(expected_ms: f64, min_std_ms: f64) -> Self {
        PhiDetector {
            intervals: VecDeque::with_capacity(WINDOW),
            last: None,
            min_std_ms,
            first_interval_ms: expected_ms,
        }
    }

    /// A heartbeat arrived at `now` (ms).
    pub fn heartbeat(&mut self, now: i64) {
        if let Some(last) = self.last {
            if self.intervals.len() == WINDOW {
                self.intervals.pop_front();
            }
            self.intervals.push_back((now - last).max(0) as f64);
        } else {
            // Seed with the expected interval so the first minutes are not over-sensitive.
            self.intervals.push_back(self.first_interval_ms);
        }
        self.last = Some(now);
    }

    /// Suspicion level at `now`: about -log10(probability that a heartbeat is still to come).
    /// 1 ≈ 10 % chance of a wrong suspicion, 8 ≈ 1e-8.
    pub fn phi(&self, now: i64) -> f64 {
        let Some(last) = self.last else { return 0.0 };
        let n = self.intervals.len() as f64;
        let mean = self.intervals.iter().sum::<f64>() / n;
        let var = self.intervals.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
        let std = var.sqrt().max(self.min_std_ms);
        let elapsed = (now - last).max(0) as f64;
        // Logistic approximation of the normal CDF tail (as in Akka's implementation).
        let y = (elapsed - mean) / std;
        let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
        let p_later = if elapsed > mean { e / (1.0 + e) } else { 1.0 - 1.0 / (1.0 + e) };
        -p_later.max(1e-300).log10()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_heartbeats_are_trusted_and_silence_is_suspected() {
        let mut d = PhiDetector::new(250.0, 50.0);
        for i in 0..20 {
            d.heartbeat(i * 250);
        }
        let last = 19 * 250;
        assert!(d.phi(last + 250) < 1.0, "on time: {}", d.phi(last + 250));
        assert!(d.phi(last + 400) < 8.0, "a little late is tolerated");
        assert!(d.phi(last + 1000) > 8.0, "four heartbeats missed: {}", d.phi(last + 1000));
        assert!(d.phi(last + 3000) > d.phi(last + 1000), "suspicion only grows");
    }

    #[test]
    fn jittery_links_get_more_slack() {
        let mut steady = PhiDetector::new(250.0, 10.0);
        let mut jittery = PhiDetector::new(250.0, 10.0);
        let mut t = 0;
        for i in 0..40 {
            steady.heartbeat(i * 250);
            t += if i % 2 == 0 { 100 } else { 400 };
            jittery.heartbeat(t);
        }
        assert!(jittery.phi(t + 600) < steady.phi(39 * 250 + 600));
    }
}
