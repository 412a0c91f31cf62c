//! One file per command. Each turns its parsed arguments into engine calls and prints the result.

pub mod cat;
pub mod check;
pub mod events;
pub mod format;
pub mod generate;
pub mod info;
pub mod origin;
pub mod serve;
pub mod snapshot;
pub mod write;

use std::path::{Path, PathBuf};

use anyhow::Result;
use mvsnap_daemon::Session;

/// Reads and writes go through the engine in pieces of this size.
pub const PIECE: usize = 1 << 20;

/// Options shared by every command.
#[derive(Clone)]
pub struct Global {
    pub store: Option<PathBuf>,
    /// Set by the commands that take `--ephemeral` (serve, snapshot create).
    pub ephemeral: bool,
}

/// A usage error found after parsing (arguments that contradict each other): `main` prints it
/// as clap prints its own, with the command's usage, and exits with status 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Return early from a command with a [`UsageError`] (exit status 2).
macro_rules! usage_bail {
    ($($arg:tt)*) => {
        return Err($crate::commands::UsageError(format!($($arg)*)).into())
    };
}
pub(crate) use usage_bail;

impl Global {
    /// The store path; `main` has already refused a command that needs one and has none.
    pub fn store_path(&self) -> Result<&Path> {
        self.store.as_deref().ok_or_else(|| {
            anyhow::anyhow!("no store given: pass --store STORE or set MVSNAP_STORE")
        })
    }

    /// The store for changes: its daemon if one serves it, else the store itself (recovery
    /// first, and an exclusive lock).
    pub fn open(&self) -> Result<Session> {
        self.open_with(false)
    }

    /// The store to look at: its daemon, else the store opened read-only (nothing written).
    pub fn open_read_only(&self) -> Result<Session> {
        self.open_with(true)
    }

    fn open_with(&self, read_only: bool) -> Result<Session> {
        let path = self.store_path()?;
        tracing::debug!(path = %path.display(), read_only, ephemeral = self.ephemeral, "opening store");
        Session::open(path, !read_only, self.ephemeral)
    }
}

pub use crate::output::print_json;
