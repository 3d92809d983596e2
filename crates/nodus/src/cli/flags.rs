//! `nodus flags list|up|down|count|raised`: communicatord's flags tool over the node's built-in
//! `flags` service. The arguments, output and exit codes are the reference's
//! ([`nodus_control::flags::tool`]): `count` and `raised` exit 1 when a flag is raised and 0
//! when none is, so a monitoring script can poll them; every failure exits 2 (never 1, which
//! would read as "raised").

use super::Ctx;
use crate::output;
use nodus_control::flags::tool::{self, ListFormat, UpArgs, EXIT_OK};
use nodus_control::flags::FlagReply;
#[cfg(test)]
use nodus_control::flags::FlagRequest;

/// `nodus flags ...`
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Raise a flag: `nodus flags up UNIT SECTION FLAG MESSAGE [--priority N] [--manual]
    /// [--tags a,b]`. Raising it again updates it and counts it.
    Up {
        /// `<unit> <section> <flag> <message>`.
        #[arg(num_args = 0.., value_name = "UNIT SECTION FLAG MESSAGE")]
        names: Vec<String>,
        /// 0 to 100 (default 5); high priorities alert people.
        #[arg(long, allow_negative_numbers = true)]
        priority: Option<i64>,
        /// Only an operator may take the flag down (`nodus flags down --manual`).
        #[arg(long)]
        manual: bool,
        /// The program takes the flag down when the condition clears (the default).
        #[arg(long)]
        automatic: bool,
        /// Tags, separated by commas or spaces (repeatable).
        #[arg(long)]
        tags: Vec<String>,
        /// Source file that raised the flag.
        #[arg(long)]
        source_file: Option<String>,
        /// Function that raised the flag.
        #[arg(long)]
        function: Option<String>,
        /// Line that raised the flag (1 or more).
        #[arg(long, allow_negative_numbers = true)]
        line: Option<i64>,
    },
    /// Lower a flag: `nodus flags down UNIT SECTION FLAG [MESSAGE]` (the message is ignored).
    Down {
        /// `<unit> <section> <flag> [<message>]`.
        #[arg(num_args = 0.., value_name = "UNIT SECTION FLAG")]
        names: Vec<String>,
        /// Lower it as an operator: manual-down flags too (needs admin).
        #[arg(long)]
        manual: bool,
    },
    /// List the raised flags (a table and "Found N raised flags", or JSON).
    List {
        /// Output: text or json (`--json` is the same as `--format json`).
        #[arg(long, default_value = "text")]
        format: ListFormat,
        /// Every live node's flags, not only this node's.
        #[arg(long)]
        cluster: bool,
    },
    /// Print how many flags are raised; exit 1 when any is, 0 when none is.
    Count {
        /// Count every live node's flags.
        #[arg(long)]
        cluster: bool,
    },
    /// Exit 1 when a flag is raised (that flag, or any), 0 when not; prints nothing.
    Raised {
        /// Optional `<unit> <section> <flag>`.
        #[arg(num_args = 0.., value_name = "UNIT SECTION FLAG")]
        names: Vec<String>,
    },
}

/// Runs one flags command; returns its exit code.
///
/// Fails (exit 2) on bad arguments, an unreachable node or a refusal.
pub async fn run(ctx: &Ctx, command: Command) -> anyhow::Result<u8> {
    let failed = |e: &dyn std::fmt::Display| anyhow::anyhow!("{e}");
    let client = ctx.client().await.map_err(|e| failed(&format!("{e:#}")))?;
    match command {
        Command::Up { names, priority, manual, automatic, tags, source_file, function, line } => {
            let args = UpArgs { names, priority, manual, automatic, tags, source_file, function, line };
            let request = tool::up(&args).map_err(|e| failed(&e))?;
            let reply = client.flag_request(&request).await.map_err(|e| failed(&e))?;
            if ctx.json {
                if let FlagReply::IsUp { key, count, new } = &reply {
                    output::json(&serde_json::json!({"ok": true, "flag": key.to_string(), "count": count, "new": new}));
                }
            }
            Ok(EXIT_OK)
        }
        Command::Down { names, manual } => {
            let request = tool::down(&names, manual).map_err(|e| failed(&e))?;
            let reply = client.flag_request(&request).await.map_err(|e| failed(&e))?;
            if ctx.json {
                if let FlagReply::IsDown { key, lowered } = &reply {
                    output::json(&serde_json::json!({"ok": true, "flag": key.to_string(), "lowered": lowered}));
                }
            }
            Ok(EXIT_OK)
        }
        Command::List { format, cluster } => {
            let flags = client.flags_list(cluster).await.map_err(|e| failed(&e))?;
            let format = if ctx.json { ListFormat::Json } else { format };
            match format {
                ListFormat::Json => output::line(&tool::render_json(&flags)),
                ListFormat::Text => output::raw(tool::render_text(&flags).as_bytes()),
            }
            Ok(EXIT_OK)
        }
        Command::Count { cluster } => {
            let (count, reply) = if cluster {
                let n = client.flags_list(true).await.map_err(|e| failed(&e))?.len();
                (n, FlagReply::Status { key: None, count: n, raised: n > 0 })
            } else {
                let reply = client.flag_request(&tool::count()).await.map_err(|e| failed(&e))?;
                let FlagReply::Status { count, .. } = reply else {
                    return Err(failed(&"the flags service did not answer FLAG_STATUS"));
                };
                (count, reply)
            };
            if ctx.json {
                output::json(&serde_json::json!({"ok": true, "count": count}));
            } else {
                output::line(&tool::render_count(count));
            }
            Ok(tool::exit_code(&reply))
        }
        Command::Raised { names } => {
            let request = tool::raised(&names).map_err(|e| failed(&e))?;
            let reply = client.flag_request(&request).await.map_err(|e| failed(&e))?;
            if ctx.json {
                if let FlagReply::Status { raised, count, .. } = &reply {
                    output::json(&serde_json::json!({"ok": true, "raised": raised, "count": count}));
                }
            }
            if !matches!(reply, FlagReply::Status { .. }) {
                return Err(failed(&"the flags service did not answer FLAG_STATUS"));
            }
            Ok(tool::exit_code(&reply))
        }
    }
}

/// The request a command sends (for tests of the argument handling).
#[cfg(test)]
fn request(command: &Command) -> Result<FlagRequest, nodus_control::flags::FlagError> {
    match command {
        Command::Up { names, priority, manual, automatic, tags, source_file, function, line } => tool::up(&UpArgs {
            names: names.clone(),
            priority: *priority,
            manual: *manual,
            automatic: *automatic,
            tags: tags.clone(),
            source_file: source_file.clone(),
            function: function.clone(),
            line: *line,
        }),
        Command::Down { names, manual } => tool::down(names, *manual),
        Command::Raised { names } => tool::raised(names),
        Command::Count { .. } => Ok(tool::count()),
        Command::List { .. } => Ok(FlagRequest::List),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct T {
        #[command(subcommand)]
        c: Command,
    }

    fn parse(args: &[&str]) -> Command {
        T::try_parse_from(std::iter::once("flags").chain(args.iter().copied())).unwrap().c
    }

    #[test]
    fn arguments_are_the_reference_tools() {
        let up = parse(&["up", "backup", "nightly", "failed", "disk full", "--priority", "60", "--tags", "a,b"]);
        let Ok(FlagRequest::Up(r)) = request(&up) else { panic!("{up:?}") };
        assert_eq!((r.key.to_string().as_str(), r.priority, r.tags.len()), ("backup/nightly/failed", 60, 2));
        let bad = parse(&["up", "backup", "nightly", "failed"]);
        assert!(request(&bad).unwrap_err().to_string().contains("up expects 4 parameters"));
        let bad = parse(&["up", "a", "b", "c", "m", "--priority", "-1"]);
        assert!(request(&bad).unwrap_err().to_string().contains("out of range"));
        let down = parse(&["down", "a", "b", "c", "ignored", "--manual"]);
        assert!(matches!(request(&down), Ok(FlagRequest::Clear(_))));
        assert!(matches!(request(&parse(&["raised"])), Ok(FlagRequest::Status(None))));
        assert!(request(&parse(&["raised", "a"])).is_err());
    }
}
