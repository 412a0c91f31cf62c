//! Errors of the engine: a small, stable kind plus the context a user needs to act on it.

use std::path::PathBuf;

/// Result of every fallible engine call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an mvsnap store (no superblock magic)")]
    NotAStore { path: PathBuf },
    #[error("{path}: corrupt store: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error(
        "{path}: store format version {found} is not supported (this build reads {supported}){}",
        if *found < *supported {
            "; a version-1 store is read by the mvsnap release that made it: copy its volumes \
             out with that release's `mvsnap cat`, then format the store again"
        } else {
            "; it was made by a newer mvsnap"
        }
    )]
    Version {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{path}: store is in use by another process (lock held)")]
    Locked { path: PathBuf },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error(
        "{path} already holds an mvsnap store (or a damaged one); use --force to overwrite it"
    )]
    StoreExists { path: PathBuf },
    #[error(
        "{path} holds data ({what}); formatting would destroy it: use --force to overwrite it"
    )]
    HoldsData { path: PathBuf, what: String },
    #[error(
        "{path} is {current} bytes: formatting never shrinks it (asked for {asked} bytes); \
         give a --size of at least {current} or none"
    )]
    WouldShrink {
        path: PathBuf,
        current: u64,
        asked: u64,
    },
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("origin {id}: size changed from {recorded} to {found} bytes since it was bound")]
    OriginSizeChanged {
        id: String,
        recorded: u64,
        found: u64,
    },
    #[error("{0} is read-only")]
    ReadOnly(String),
    #[error("snapshot {name} is invalid: {reason}")]
    SnapshotInvalid { name: String, reason: String },
    #[error("COW store is full ({0})")]
    NoSpace(String),
    #[error("offset {offset} + length {length} is beyond the end of {name} ({size} bytes)")]
    OutOfRange {
        name: String,
        offset: u64,
        length: u64,
        size: u64,
    },
    #[error("store is poisoned after a failed write or sync and accepts no more changes: {0}")]
    Poisoned(String),
    #[error("{0}")]
    Busy(String),
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.into(),
            what: what.into(),
        }
    }

    /// The errno a block-device front end should report for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::ReadOnly(_) => libc::EPERM,
            Error::OutOfRange { .. } | Error::InvalidArgument(_) => libc::EINVAL,
            Error::NoSpace(_) => libc::ENOSPC,
            Error::NotFound(_) => libc::ENOENT,
            Error::Busy(_) => libc::EBUSY,
            _ => libc::EIO,
        }
    }
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        let errno = e.errno();
        std::io::Error::new(std::io::Error::from_raw_os_error(errno).kind(), e)
    }
}
