//! mvsnap's engine: a crash-consistent, multi-version copy-on-write snapshot store.
//!
//! Layers (docs/ARCHITECTURE.md): `blockdev` (the I/O seam) < `format`, `journal`, `pdata`
//! (the copy-on-write B+tree, its space map and key spaces: the store's pieces) < `state`
//! (metadata, changed only by journal records) < `store` (recovery, group commit, tree
//! commits, snapshots) and `volume` (I/O of origin and snapshots). Front ends (NBD, FUSE) see
//! only [`Store`] and [`Volume`].

pub mod blockdev;
mod check;
mod codec;
mod commit;
mod copyout;
#[cfg(any(test, feature = "crashsim"))]
pub mod crashsim;
pub mod error;
mod expiring;
pub mod format;
pub mod journal;
pub mod pdata;
mod reclaim;
mod repair;
mod signature;
mod state;
mod store;
mod sys;
pub mod types;
mod volume;
mod writeback;

pub use blockdev::{BlockDev, DeviceOpener, FileDev, FileOpener};
pub use error::{Error, Result};
pub use store::{validate_name, Store};
pub use types::*;
pub use volume::Volume;
