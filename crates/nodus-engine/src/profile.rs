//! An app's profile: pool and queue limits and the worker timeouts, parsed from JSON or TOML.
//!
//! Keys are Cocaine's (`pool-limit`, `queue-limit`, `concurrency`, `startup-timeout`,
//! `heartbeat-timeout`, `terminate-timeout`, `idle-timeout`) plus `crash-limit`; durations are
//! seconds (fractions allowed). Every key is optional; unknown keys are an error.

use std::time::Duration;

use serde::Deserialize;

use crate::manifest::{parse_text, ConfigError, Format};
use crate::worker::Timeouts;

/// Longest accepted timeout: one day.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);

/// How an app's workers are run and balanced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// Most worker processes at once (default 10).
    pub pool_limit: usize,
    /// Most requests waiting for a worker; more are refused with "queue full" (default 100).
    pub queue_limit: usize,
    /// Most sessions open on one worker at once (default 10).
    pub concurrency: usize,
    /// From spawn to handshake (default 5 s).
    pub startup_timeout: Duration,
    /// Longest silence between heartbeats (default 30 s).
    pub heartbeat_timeout: Duration,
    /// From terminate to exit, before SIGTERM (default 10 s).
    pub terminate_timeout: Duration,
    /// A worker with no session for this long is stopped; `None` (written `0`) keeps workers
    /// forever (default 600 s).
    pub idle_timeout: Option<Duration>,
    /// Consecutive worker failures (within a minute of each other) that put the app in the
    /// failed state instead of restarting again (default 5).
    pub crash_limit: u32,
}

impl Default for Profile {
    fn default() -> Self {
        Profile {
            pool_limit: 10,
            queue_limit: 100,
            concurrency: 10,
            startup_timeout: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(30),
            terminate_timeout: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(600)),
            crash_limit: 5,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawProfile {
    pool_limit: Option<i64>,
    queue_limit: Option<i64>,
    concurrency: Option<i64>,
    startup_timeout: Option<f64>,
    heartbeat_timeout: Option<f64>,
    terminate_timeout: Option<f64>,
    idle_timeout: Option<f64>,
    crash_limit: Option<i64>,
}

fn invalid(field: &'static str, reason: String) -> ConfigError {
    ConfigError::Invalid { what: "profile", field, reason }
}

fn count(field: &'static str, v: Option<i64>, default: usize, min: i64, max: i64) -> Result<usize, ConfigError> {
    match v {
        None => Ok(default),
        Some(n) if (min..=max).contains(&n) => Ok(n as usize),
        Some(n) => Err(invalid(field, format!("is {n}; it must be between {min} and {max}"))),
    }
}

fn seconds(field: &'static str, v: Option<f64>, default: Duration) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) if s.is_finite() && s > 0.0 && s <= MAX_TIMEOUT.as_secs_f64() => Ok(Duration::from_secs_f64(s)),
        Some(s) => Err(invalid(field, format!("is {s}; it must be more than 0 and at most 86400 seconds"))),
    }
}

impl Profile {
    /// Parses and validates a profile; absent keys take their defaults.
    ///
    /// # Errors
    /// [`ConfigError::Parse`] for bad syntax, unknown keys or wrong types;
    /// [`ConfigError::Invalid`] for a value out of range (the message gives the range).
    pub fn parse(text: &str, format: Format) -> Result<Profile, ConfigError> {
        let raw: RawProfile = parse_text("profile", text, format)?;
        let d = Profile::default();
        let idle_timeout = match raw.idle_timeout {
            Some(0.0) => None,
            v => Some(seconds("idle-timeout", v, d.idle_timeout.unwrap_or(MAX_TIMEOUT))?),
        };
        Ok(Profile {
            pool_limit: count("pool-limit", raw.pool_limit, d.pool_limit, 1, 4096)?,
            queue_limit: count("queue-limit", raw.queue_limit, d.queue_limit, 0, 1 << 20)?,
            concurrency: count("concurrency", raw.concurrency, d.concurrency, 1, 1 << 16)?,
            startup_timeout: seconds("startup-timeout", raw.startup_timeout, d.startup_timeout)?,
            heartbeat_timeout: seconds("heartbeat-timeout", raw.heartbeat_timeout, d.heartbeat_timeout)?,
            terminate_timeout: seconds("terminate-timeout", raw.terminate_timeout, d.terminate_timeout)?,
            idle_timeout,
            crash_limit: count("crash-limit", raw.crash_limit, d.crash_limit as usize, 1, 1000)? as u32,
        })
    }

    /// The worker timeouts this profile sets (SIGKILL follows SIGTERM after 5 s, as in Cocaine).
    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            startup: self.startup_timeout,
            heartbeat: self.heartbeat_timeout,
            terminate: self.terminate_timeout,
            kill_grace: Timeouts::default().kill_grace,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_profile_is_cocaine_defaults() {
        let p = Profile::parse("{}", Format::Json).unwrap();
        assert_eq!(p, Profile::default());
        assert_eq!(p.timeouts(), Timeouts::default());
    }

    #[test]
    fn parses_both_formats() {
        let p =
            Profile::parse(r#"{"pool-limit": 2, "startup-timeout": 0.5, "idle-timeout": 0}"#, Format::Json).unwrap();
        assert_eq!(p.pool_limit, 2);
        assert_eq!(p.startup_timeout, Duration::from_millis(500));
        assert_eq!(p.idle_timeout, None);
        let p = Profile::parse("queue-limit = 3\nconcurrency = 1\nheartbeat-timeout = 2\n", Format::Toml).unwrap();
        assert_eq!((p.queue_limit, p.concurrency, p.heartbeat_timeout), (3, 1, Duration::from_secs(2)));
    }

    #[test]
    fn errors_name_the_key_and_range() {
        let e = Profile::parse(r#"{"pool-limit": 0}"#, Format::Json).unwrap_err();
        assert_eq!(e.to_string(), "profile: `pool-limit` is 0; it must be between 1 and 4096");
        let e = Profile::parse(r#"{"startup-timeout": -1}"#, Format::Json).unwrap_err();
        assert!(e.to_string().contains("startup-timeout"), "{e}");
        let e = Profile::parse("pool_limit = 3", Format::Toml).unwrap_err();
        assert!(e.to_string().contains("pool_limit"), "{e}");
        let e = Profile::parse(r#"{"concurrency": "ten"}"#, Format::Json).unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
    }
}
