//! Phi-accrual failure detector (Hayashibara et al., as used by Akka and Cassandra): instead of a
//! fixed timeout, it turns the time since the last heartbeat into a suspicion level `phi` given
//! the observed distribution of heartbeat intervals. No I/O, no clock: arrival times are inputs.
//!
//! Two things keep load from passing for death. An acceptable pause (as Akka's
//! `acceptable-heartbeat-pause`) is added to the expected interval, so a peer must be silent for
//! well over one pause before suspicion rises. And suspicion is about the peer, not about this
//! node: anything the peer sent counts as a sign of life ([`PhiDetector::evidence`]), and time
//! this node itself was stalled ([`PhiDetector::pause`]) is not held against the peer.

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
    /// Added to the mean interval: silence this long past the expected heartbeat is normal.
    acceptable_pause_ms: f64,
    /// The latest sign of life that was not a heartbeat (any message from the peer).
    last_evidence: Option<i64>,
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
            acceptable_pause_ms: 0.0,
            last_evidence: None,
        }
    }

    /// The same detector tolerating `pause_ms` of silence beyond the expected interval.
    pub fn with_acceptable_pause(mut self, pause_ms: f64) -> Self {
        self.acceptable_pause_ms = pause_ms.max(0.0);
        self
    }

    /// Something other than a heartbeat arrived from the peer at `now`: it was alive when it
    /// sent it. Resets suspicion without counting as a heartbeat interval.
    pub fn evidence(&mut self, now: i64) {
        if self.last_evidence.is_none_or(|t| now > t) {
            self.last_evidence = Some(now);
        }
    }

    /// This node was stalled for `ms` (its own tick came that late): that silence is not the
    /// peer's, so it is taken off the time since the last sign of life.
    pub fn pause(&mut self, ms: i64) {
        if ms <= 0 {
            return;
        }
        if let Some(last) = self.last.as_mut() {
            *last += ms;
        }
        if let Some(e) = self.last_evidence.as_mut() {
            *e += ms;
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
        let Some(mut last) = self.last else { return 0.0 };
        if let Some(e) = self.last_evidence {
            last = last.max(e);
        }
        let n = self.intervals.len() as f64;
        let mean = self.intervals.iter().sum::<f64>() / n;
        let var = self.intervals.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
        let std = var.sqrt().max(self.min_std_ms);
        let mean = mean + self.acceptable_pause_ms;
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
    fn evidence_and_own_stalls_are_not_held_against_the_peer() {
        let mut d = PhiDetector::new(250.0, 50.0).with_acceptable_pause(750.0);
        for i in 0..20 {
            d.heartbeat(i * 250);
        }
        let last = 19 * 250;
        assert!(d.phi(last + 1000) < 1.0, "within the acceptable pause: {}", d.phi(last + 1000));
        assert!(d.phi(last + 2000) > 8.0, "well past it: {}", d.phi(last + 2000));
        // Gossip from the peer 1.5 s after its last heartbeat: it was alive then.
        let mut with_evidence = d.clone();
        with_evidence.evidence(last + 1500);
        assert!(with_evidence.phi(last + 2000) < 1.0, "{}", with_evidence.phi(last + 2000));
        // This node was stalled for a second: only the rest counts.
        d.pause(1000);
        assert!(d.phi(last + 2000) < 1.0, "{}", d.phi(last + 2000));
        assert!(d.phi(last + 3000) > 8.0, "{}", d.phi(last + 3000));
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
