//! Command-line parsing, hand-rolled: a handful of flags does not justify a parser crate.

use std::time::Duration;

/// Server the benchmark talks to unless `--url` says otherwise.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// Usage text printed by `--help` and after a parse error.
pub const USAGE: &str = "\
usage: nats-bench [OPTIONS]            run the request/reply benchmark (spawns its own responder)
       nats-bench responder [--url URL] [--max-secs SECS]
                                       echo every request on `bench.echo` (started by the above)

options:
  --url URL           NATS server URL (default nats://127.0.0.1:4222)
  --payload BYTES     request payload size, 0..=1048576 (default 64)
  --inflight K        concurrent outstanding requests, 1..=4096 (default 64)
  --duration SECS     measured time, 0.1..=3600 (default 5)
  --warmup SECS       unmeasured warm-up before it, 0..=60 (default 1)
  --max-requests N    stop early after N requests in total, warm-up included (default 20000000)
  --json              print a JSON summary line on stdout (the human line goes to stderr)
  -h, --help          print this text";

/// What the process was asked to do.
#[derive(Debug, PartialEq)]
pub enum Command {
    /// Run the requester side of the benchmark.
    Bench(BenchArgs),
    /// Run the echo responder until stdin closes or `max_secs` pass.
    Responder(ResponderArgs),
    /// Print the usage text.
    Help,
}

/// Settings of a benchmark run.
#[derive(Debug, PartialEq)]
pub struct BenchArgs {
    /// NATS server URL.
    pub url: String,
    /// Payload size in bytes.
    pub payload: usize,
    /// Number of concurrent outstanding requests.
    pub inflight: usize,
    /// Length of the measured phase.
    pub duration: Duration,
    /// Length of the unmeasured warm-up phase before it.
    pub warmup: Duration,
    /// Upper bound on requests sent in total, warm-up included.
    pub max_requests: u64,
    /// Also print the JSON summary line.
    pub json: bool,
}

/// Settings of the echo responder.
#[derive(Debug, PartialEq)]
pub struct ResponderArgs {
    /// NATS server URL.
    pub url: String,
    /// The responder exits by itself after this long at the latest.
    pub max_lifetime: Duration,
}

impl Default for BenchArgs {
    fn default() -> Self {
        Self {
            url: DEFAULT_URL.to_owned(),
            payload: 64,
            inflight: 64,
            duration: Duration::from_secs(5),
            warmup: Duration::from_secs(1),
            max_requests: 20_000_000,
            json: false,
        }
    }
}

impl Default for ResponderArgs {
    fn default() -> Self {
        Self { url: DEFAULT_URL.to_owned(), max_lifetime: Duration::from_secs(3600) }
    }
}

/// Parses the arguments that follow the program name.
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Command, String> {
    let mut args = args.into_iter().peekable();
    if args.peek().map(String::as_str) == Some("responder") {
        args.next();
        let mut out = ResponderArgs::default();
        while let Some((flag, value)) = next_flag(&mut args)? {
            match flag.as_str() {
                "--url" => out.url = required(&flag, value)?,
                "--max-secs" => out.max_lifetime = seconds(&flag, value, 1.0, 86_400.0)?,
                "-h" | "--help" => return Ok(Command::Help),
                _ => return Err(format!("unknown responder option `{flag}`")),
            }
        }
        return Ok(Command::Responder(out));
    }

    let mut out = BenchArgs::default();
    while let Some((flag, value)) = next_flag(&mut args)? {
        match flag.as_str() {
            "--url" => out.url = required(&flag, value)?,
            "--payload" => out.payload = number(&flag, value, 0, 1 << 20)?,
            "--inflight" => out.inflight = number(&flag, value, 1, 4096)?,
            "--duration" => out.duration = seconds(&flag, value, 0.1, 3600.0)?,
            "--warmup" => out.warmup = seconds(&flag, value, 0.0, 60.0)?,
            "--max-requests" => out.max_requests = number(&flag, value, 1, u64::MAX)?,
            "--json" => out.json = true,
            "-h" | "--help" => return Ok(Command::Help),
            _ => return Err(format!("unknown option `{flag}`")),
        }
    }
    Ok(Command::Bench(out))
}

/// Splits the next argument into a flag and the value that goes with it, if any.
///
/// `--flag=value` carries its value; for `--flag value` the value is taken lazily by
/// [`required`] so that boolean flags do not swallow the next argument.
fn next_flag<I: Iterator<Item = String>>(
    args: &mut std::iter::Peekable<I>,
) -> Result<Option<(String, Option<String>)>, String> {
    let Some(arg) = args.next() else { return Ok(None) };
    if !arg.starts_with('-') {
        return Err(format!("unexpected argument `{arg}`"));
    }
    if let Some((flag, value)) = arg.split_once('=') {
        return Ok(Some((flag.to_owned(), Some(value.to_owned()))));
    }
    // Every flag but `--json` and `--help` takes a value; take it here when it is separate.
    let value = match arg.as_str() {
        "--json" | "-h" | "--help" => None,
        _ => args.next(),
    };
    Ok(Some((arg, value)))
}

fn required(flag: &str, value: Option<String>) -> Result<String, String> {
    value.ok_or_else(|| format!("`{flag}` needs a value"))
}

fn number<T>(flag: &str, value: Option<String>, min: T, max: T) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
{
    let text = required(flag, value)?;
    let n: T = text.parse().map_err(|_| format!("`{flag}`: `{text}` is not a whole number"))?;
    if n < min || n > max {
        return Err(format!("`{flag}` must be within {min}..={max}, got {n}"));
    }
    Ok(n)
}

fn seconds(flag: &str, value: Option<String>, min: f64, max: f64) -> Result<Duration, String> {
    let text = required(flag, value)?;
    let secs: f64 = text.parse().map_err(|_| format!("`{flag}`: `{text}` is not a number of seconds"))?;
    if !(min..=max).contains(&secs) {
        return Err(format!("`{flag}` must be within {min}..={max} seconds, got {text}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(line: &str) -> Result<Command, String> {
        parse(line.split_whitespace().map(str::to_owned))
    }

    #[test]
    fn defaults() {
        assert_eq!(parse_str(""), Ok(Command::Bench(BenchArgs::default())));
        assert_eq!(parse_str("responder"), Ok(Command::Responder(ResponderArgs::default())));
    }

    #[test]
    fn every_bench_flag() {
        let got = parse_str(
            "--url nats://127.0.0.1:14222 --payload=4096 --inflight 1 --json --duration 2.5 --warmup 0 \
             --max-requests 10",
        );
        let want = BenchArgs {
            url: "nats://127.0.0.1:14222".to_owned(),
            payload: 4096,
            inflight: 1,
            duration: Duration::from_millis(2500),
            warmup: Duration::ZERO,
            max_requests: 10,
            json: true,
        };
        assert_eq!(got, Ok(Command::Bench(want)));
    }

    #[test]
    fn responder_flags() {
        let got = parse_str("responder --url nats://h:1 --max-secs 30");
        let want = ResponderArgs { url: "nats://h:1".to_owned(), max_lifetime: Duration::from_secs(30) };
        assert_eq!(got, Ok(Command::Responder(want)));
    }

    #[test]
    fn rejects_bad_input() {
        assert!(parse_str("--inflight 0").is_err());
        assert!(parse_str("--payload -1").is_err());
        assert!(parse_str("--payload 2000000").is_err());
        assert!(parse_str("--duration").is_err());
        assert!(parse_str("--duration nan").is_err());
        assert!(parse_str("--bogus 1").is_err());
        assert!(parse_str("stray").is_err());
        assert!(parse_str("responder --payload 1").is_err());
    }
}
