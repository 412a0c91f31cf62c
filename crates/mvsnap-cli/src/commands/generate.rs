//! `mvsnap generate man DIR | completions SHELL` (hidden): man pages and shell completions made
//! from the command-line definition itself, so they never drift from `--help`.
//! scripts/install.sh installs them.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use clap_complete::Shell;

use crate::output::outln;

/// Generate man pages or shell completions from the command-line definition.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, Subcommand)]
enum What {
    /// Write a man page per command (mvsnap.1, mvsnap-snapshot-list.1, ...) into DIR.
    Man {
        /// The directory (created if missing).
        dir: PathBuf,
    },
    /// Print the completion script for SHELL on stdout.
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
}

impl GenerateArgs {
    pub fn run(self) -> Result<()> {
        let cmd = crate::cli_command();
        match self.what {
            What::Man { dir } => {
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                clap_mangen::generate_to(cmd, &dir)
                    .with_context(|| format!("writing man pages into {}", dir.display()))?;
                outln!("man pages written to {}", dir.display());
            }
            What::Completions { shell } => {
                let mut buf = Vec::new();
                clap_complete::generate(shell, &mut without_hidden(&cmd), "mvsnap", &mut buf);
                crate::output::out!("{}", String::from_utf8_lossy(&buf));
            }
        }
        Ok(())
    }
}

/// The top-level command without its hidden subcommands: clap_complete offers every
/// subcommand, hidden or not, while `--help` and the man pages leave hidden ones out. clap
/// cannot remove a subcommand, so this copies what completions use (name, version, about,
/// arguments, the visible subcommands).
fn without_hidden(cmd: &clap::Command) -> clap::Command {
    let mut out = clap::Command::new("mvsnap")
        .version(env!("CARGO_PKG_VERSION"))
        .args(cmd.get_arguments().cloned())
        .subcommands(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    if let Some(about) = cmd.get_about() {
        out = out.about(about.clone());
    }
    out
}
