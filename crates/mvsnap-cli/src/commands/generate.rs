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
                clap_complete::generate(shell, &mut cmd.clone(), "mvsnap", &mut buf);
                crate::output::out!("{}", String::from_utf8_lossy(&buf));
            }
        }
        Ok(())
    }
}
