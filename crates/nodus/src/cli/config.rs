//! `nodus config` (the embedded default configuration) and `nodus version`.

use crate::output;
use anyhow::Context;
use serde_json::json;

/// `nodus config` arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print the configuration as a JSON object instead of commented TOML.
    #[arg(long)]
    pub json: bool,
}

/// `nodus version` arguments.
#[derive(clap::Args, Debug)]
pub struct VersionArgs {
    /// Print `{"version": ...}`.
    #[arg(long)]
    pub json: bool,
}

/// Prints the embedded default configuration: TOML with a comment on every key, or JSON.
///
/// Fails only if the embedded default does not convert to JSON (a bug).
pub fn run(json: bool, _a: Args) -> anyhow::Result<u8> {
    let text = nodus_daemon::config::DEFAULT_TOML;
    if json {
        let table: toml::Table = text.parse().context("the embedded default configuration")?;
        output::json(&serde_json::to_value(table).context("the embedded default configuration as JSON")?);
    } else {
        output::line(text.trim_end());
    }
    Ok(0)
}

/// Prints this binary's version.
///
/// Never fails.
pub fn version(json: bool, _a: VersionArgs) -> anyhow::Result<u8> {
    let version = env!("CARGO_PKG_VERSION");
    if json {
        output::json(&json!({"name": "nodus", "version": version}));
    } else {
        output::line(&format!("nodus {version}"));
    }
    Ok(0)
}
