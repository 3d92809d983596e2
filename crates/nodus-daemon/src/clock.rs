//! The node's one clock. The driver reads the time here and passes `now` (Unix milliseconds) to
//! the pure cores; nothing else in the daemon reads the system clock (a clippy
//! `disallowed-methods` rule enforces it). In production the clock is the system's wall clock; in
//! tests it is tokio's clock plus an offset, so a daemon test run under `tokio::time::pause` (or
//! `#[tokio::test(start_paused = true)]`) sees expiries, timeouts and heartbeats in virtual time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where the node's wall-clock time comes from.
#[derive(Debug, Clone)]
pub struct Clock {
    source: Source,
}

#[derive(Debug, Clone)]
enum Source {
    /// The system's wall clock.
    System,
    /// tokio's clock (pausable) since `origin`, plus `epoch_ms` at `origin`.
    Tokio { origin: tokio::time::Instant, epoch_ms: i64 },
}

impl Clock {
    /// The system's wall clock (production).
    pub fn system() -> Clock {
        Clock { source: Source::System }
    }

    /// tokio's clock, starting at the current wall-clock time: under `tokio::time::pause` it moves
    /// only when tokio's time does (auto-advance or `tokio::time::advance`).
    ///
    /// Must be called inside a tokio runtime.
    pub fn tokio() -> Clock {
        Clock::tokio_at(system_ms())
    }

    /// tokio's clock, reading `epoch_ms` (Unix milliseconds) now.
    ///
    /// Must be called inside a tokio runtime.
    pub fn tokio_at(epoch_ms: i64) -> Clock {
        Clock { source: Source::Tokio { origin: tokio::time::Instant::now(), epoch_ms } }
    }

    /// The current time in Unix milliseconds.
    pub fn now_ms(&self) -> i64 {
        match &self.source {
            Source::System => system_ms(),
            Source::Tokio { origin, epoch_ms } => {
                let elapsed = i64::try_from(origin.elapsed().as_millis()).unwrap_or(i64::MAX);
                epoch_ms.saturating_add(elapsed)
            }
        }
    }

    /// The current time as a [`SystemTime`] (for file timestamps and reports).
    pub fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(u64::try_from(self.now_ms()).unwrap_or(0))
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

/// The system's wall clock in Unix milliseconds: the one place the daemon reads it.
#[allow(clippy::disallowed_methods)] // This module is the clock.
fn system_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Wall-clock time in Unix milliseconds, read from the system clock. For tools and tests that
/// talk to a node on the system clock; the daemon itself reads its injected [`Clock`].
pub fn now_ms() -> i64 {
    system_ms()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_tokio_clock_moves_with_paused_time_only() {
        let clock = Clock::tokio_at(1_000_000);
        assert_eq!(clock.now_ms(), 1_000_000);
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(clock.now_ms(), 1_001_500);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(clock.now_ms(), 1_061_500);
        assert_eq!(clock.now(), UNIX_EPOCH + Duration::from_millis(1_061_500));
    }

    #[test]
    fn the_system_clock_is_the_wall_clock() {
        let clock = Clock::system();
        let a = now_ms();
        let b = clock.now_ms();
        assert!(b >= a && b - a < 60_000, "{a} vs {b}");
    }
}
