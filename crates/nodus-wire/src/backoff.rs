//! Jittered exponential backoff, the one used everywhere in nodus (neighbour dialers, client
//! reconnects, worker restarts, app-client retries). Pure: delays come from a seeded generator and
//! no clock is read, so callers decide what time is and tests are deterministic.

use rand::{Rng, SeedableRng};
use std::time::Duration;

/// Delays from `min` doubling up to `max`, each a uniform pick between half of the step and all of
/// it (so peers that failed together do not retry together).
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
    rng: rand::rngs::StdRng,
}

impl Backoff {
    /// Delays from `min` doubling up to `max` (`max` below `min` means `min`), jittered by a
    /// generator seeded with `seed`.
    pub fn new(min: Duration, max: Duration, seed: u64) -> Self {
        Backoff { min, max: max.max(min), attempt: 0, rng: rand::rngs::StdRng::seed_from_u64(seed) }
    }

    /// The next delay: `min * 2^attempt` capped at `max`, jittered into its upper half.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.step(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        let half = base / 2;
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(self.rng.gen_range(0..=nanos))
    }

    /// Starts again from `min` (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Delays handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    fn step(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.min.saturating_mul(factor).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_within_jitter_and_cap_then_reset() {
        let (min, max) = (Duration::from_millis(100), Duration::from_millis(1000));
        let mut b = Backoff::new(min, max, 42);
        for step in [100u64, 200, 400, 800, 1000, 1000] {
            let d = b.next_delay();
            let step = Duration::from_millis(step);
            assert!(d >= step / 2 && d <= step, "{d:?} outside [{:?}, {step:?}]", step / 2);
        }
        assert_eq!(b.attempts(), 6);
        b.reset();
        assert!(b.next_delay() <= min);
    }

    #[test]
    fn same_seed_same_delays() {
        let (min, max) = (Duration::from_millis(10), Duration::from_secs(5));
        let (mut a, mut b) = (Backoff::new(min, max, 7), Backoff::new(min, max, 7));
        for _ in 0..20 {
            assert_eq!(a.next_delay(), b.next_delay());
        }
    }
}
