//! Where a store's daemon sockets live: named after the store (its UUID, device and inode) in
//! the runtime directory, so any command finds them from `--store` alone.

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

/// What names a store's sockets: its UUID and where it lives on this host (device and inode of
/// a file, the device number of a block device). A copy of a store has the same UUID, so the
/// UUID alone sent the copy's commands to the daemon serving the original.
pub fn store_key(store: &Path) -> mvsnap_engine::Result<String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let uuid = mvsnap_engine::Store::probe_uuid(store)?;
    let meta = std::fs::metadata(store).map_err(|source| mvsnap_engine::Error::Io {
        op: "stat",
        path: store.to_path_buf(),
        source,
    })?;
    // Short: a Unix socket path holds at most 107 bytes.
    let short = uuid.get(..8).unwrap_or(&uuid);
    Ok(if meta.file_type().is_block_device() {
        format!("{short}-b{:x}", meta.rdev())
    } else {
        format!("{short}-{:x}-{:x}", meta.dev(), meta.ino())
    })
}

pub fn control_socket(key: &str) -> PathBuf {
    runtime_dir().join(format!("mvsnap-{key}.ctl"))
}

pub fn default_nbd_socket(key: &str) -> PathBuf {
    runtime_dir().join(format!("mvsnap-{key}.nbd"))
}

/// The control socket of the daemon serving `store`, if the store is readable.
pub fn control_socket_for_store(store: &Path) -> Option<PathBuf> {
    Some(control_socket(&store_key(store).ok()?))
}
