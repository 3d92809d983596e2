//! `nodus completions SHELL` and `nodus man`, generated from the command-line definition itself
//! (`clap_complete`, `clap_mangen`), so they never drift from the real flags.

use super::Args;
use crate::output;
use clap::CommandFactory;

/// `nodus completions` arguments.
#[derive(clap::Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

/// `nodus man` arguments.
#[derive(clap::Args, Debug)]
pub struct ManArgs {
    /// A subcommand's page (`nodus man daemon`); none: the main page, which lists them all.
    subcommand: Option<String>,
}

/// Prints the completion script for a shell.
///
/// Never fails.
pub fn completions(a: CompletionsArgs) -> anyhow::Result<u8> {
    let mut buf = Vec::new();
    clap_complete::generate(a.shell, &mut Args::command(), "nodus", &mut buf);
    output::raw(&buf);
    Ok(0)
}

/// Prints a man page (roff).
///
/// Fails when the subcommand does not exist.
pub fn man(a: ManArgs) -> anyhow::Result<u8> {
    let mut cmd = Args::command();
    cmd.build();
    let page = match &a.subcommand {
        None => cmd,
        Some(name) => {
            let sub = cmd
                .find_subcommand(name)
                .filter(|s| !s.is_hide_set())
                .ok_or_else(|| anyhow::anyhow!("no subcommand {name:?}; `nodus --help` lists them"))?;
            let full = format!("nodus-{}", sub.get_name());
            sub.clone().name(full.clone()).bin_name(full).version(env!("CARGO_PKG_VERSION"))
        }
    };
    let mut buf = Vec::new();
    clap_mangen::Man::new(page).render(&mut buf)?;
    output::raw(&buf);
    Ok(0)
}
