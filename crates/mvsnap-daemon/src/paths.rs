//! Where a store's daemon sockets live: named after the store's UUID in the runtime directory,
//! so any command finds them from `--store` alone.

use std::path::{Path, PathBuf};

/// `$MVSNAP_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR`, else `/run/mvsnap` for root, else /tmp.
pub fn runtime_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MVSNAP_RUNTIME_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(d);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/run/mvsnap");
    }
    std::env::temp_dir()
}

pub fn control_socket(uuid: &str) -> PathBuf {
    runtime_dir().join(format!("mvsnap-{uuid}.ctl"))
}

pub fn default_nbd_socket(uuid: &str) -> PathBuf {
    runtime_dir().join(format!("mvsnap-{uuid}.nbd"))
}

/// The control socket of the daemon serving `store`, if the store is readable.
pub fn control_socket_for_store(store: &Path) -> Option<PathBuf> {
    let uuid = mvsnap_engine::Store::probe_uuid(store).ok()?;
    Some(control_socket(&uuid))
}
