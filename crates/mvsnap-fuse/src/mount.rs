//! Mounting and unmounting: a stale mount left by a killed daemon is cleared first; unmount
//! never hangs (a busy mount is said so, then detached lazily).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, Session, SessionUnmounter};
use mvsnap_engine::Store;

use crate::{Gate, VolumeFs};

/// How the file system is served.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Event-loop threads, each with its own /dev/fuse descriptor (`FUSE_DEV_IOC_CLONE`):
    /// requests are answered in the thread that reads them, so this is how many run at once.
    pub threads: usize,
}

impl Default for MountOptions {
    fn default() -> Self {
        // QD16 from a loop device or fio: every request has a thread; the threads block in the
        // engine (pread/pwrite, journal waits), they do not spin.
        let threads = std::env::var("MVSNAP_FUSE_THREADS")
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(16);
        MountOptions { threads }
    }
}

/// A mounted file system; dropping it unmounts (lazily if busy).
pub struct Mount {
    dir: PathBuf,
    unmounter: Option<SessionUnmounter>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

fn is_mount_point(dir: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = dir.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| unescape_mountinfo(m) == want)
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// umount2(MNT_DETACH): as root directly, else through `fusermount3 -uz`.
fn detach(dir: &Path) -> io::Result<()> {
    let c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in the mount path"))?;
    // SAFETY: umount2 with a valid NUL-terminated path; it only reads it.
    let r = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if r == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EPERM) {
        return Err(err);
    }
    let st = std::process::Command::new("fusermount3")
        .arg("-uz")
        .arg(dir)
        .status()?;
    if st.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("fusermount3 -uz: {st}")))
    }
}

/// If `dir` is a dead FUSE mount (its daemon was killed: stat fails with ENOTCONN), detach it.
/// True if one was cleared.
pub fn clear_stale(dir: &Path) -> io::Result<bool> {
    match std::fs::metadata(dir) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            detach(dir).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "{} is a stale FUSE mount and detaching it failed: {e}",
                        dir.display()
                    ),
                )
            })?;
            tracing::warn!(
                "{}: cleared a stale FUSE mount (left by a daemon that did not unmount)",
                dir.display()
            );
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Loop devices whose backing file is below `dir` ("/dev/loop3 (disk@t1)"), for messages.
pub fn loop_devices_on(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return out;
    };
    let d = dir.to_string_lossy().to_string();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        let b = b.trim();
        if let Some(rest) = b.strip_prefix(&format!("{d}/")) {
            out.push(format!("/dev/{name} ({rest})"));
        }
    }
    out.sort();
    out
}

impl Mount {
    /// Mount the volumes of `store` on `dir` (created if missing; a stale mount there is
    /// cleared) and serve them in background threads.
    pub fn start(
        store: Store,
        gate: Arc<dyn Gate>,
        dir: &Path,
        opts: &MountOptions,
    ) -> io::Result<Mount> {
        clear_stale(dir)?;
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        if is_mount_point(&dir) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} is already a mount point (another daemon's?): unmount it first",
                    dir.display()
                ),
            ));
        }
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("mvsnap".into()),
            MountOption::Subtype("mvsnap".into()),
            MountOption::DefaultPermissions,
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
            MountOption::NoAtime,
        ];
        config.n_threads = Some(opts.threads.max(1));
        config.clone_fd = true;
        let fs = VolumeFs::new(store, gate);
        let mut session = Session::new(fs, &dir, &config)
            .map_err(|e| io::Error::new(e.kind(), format!("mount {}: {e}", dir.display())))?;
        let unmounter = session.unmount_callable();
        let thread = std::thread::Builder::new()
            .name("fuse-session".into())
            .spawn(move || session.run())?;
        tracing::info!(
            "FUSE: serving the volumes as files in {} ({} threads)",
            dir.display(),
            opts.threads
        );
        Ok(Mount {
            dir,
            unmounter: Some(unmounter),
            thread: Some(thread),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Unmount. Busy (a loop device or an open file): say who holds it, then detach lazily
    /// (the mount leaves the namespace now; its users get errors once this process exits).
    /// Never waits for the users. Ok(true) if it was clean, Ok(false) if lazy.
    pub fn unmount(mut self) -> io::Result<bool> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> io::Result<bool> {
        let Some(mut u) = self.unmounter.take() else {
            return Ok(true);
        };
        let clean = match u.unmount() {
            Ok(()) => true,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                let loops = loop_devices_on(&self.dir);
                let who = if loops.is_empty() {
                    "a process has a file open in it".to_string()
                } else {
                    format!("used by {}", loops.join(", "))
                };
                tracing::warn!(
                    "{} is busy ({who}): detaching it lazily; its users get I/O errors from now \
                     on (next time: umount the filesystems and `losetup -d` the loop devices \
                     before stopping the daemon)",
                    self.dir.display()
                );
                detach(&self.dir)?;
                false
            }
            Err(e) => {
                tracing::warn!("unmount {}: {e}; detaching it lazily", self.dir.display());
                detach(&self.dir)?;
                false
            }
        };
        if let Some(t) = self.thread.take() {
            if clean {
                // The kernel ends the session on unmount: the threads see ENODEV and stop.
                let deadline = Instant::now() + Duration::from_secs(10);
                while !t.is_finished() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if t.is_finished() {
                    if let Ok(Err(e)) = t.join() {
                        tracing::warn!("FUSE session ended with: {e}");
                    }
                }
            }
            // Lazy: the threads serve the remaining users until this process exits.
        }
        Ok(clean)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            tracing::warn!("unmount {}: {e}", self.dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo("/tmp/a\\040b"), "/tmp/a b");
        assert_eq!(unescape_mountinfo("/x\\011y\\012z\\134w"), "/x\ty\nz\\w");
        assert_eq!(unescape_mountinfo("/plain/path"), "/plain/path");
        // Not an escape: left as it is.
        assert_eq!(unescape_mountinfo("/a\\9"), "/a\\9");
    }

    #[test]
    fn a_directory_that_is_no_mount_is_not_stale() {
        let d = std::env::temp_dir();
        assert!(!clear_stale(&d).unwrap());
        assert!(is_mount_point(Path::new("/")));
        assert!(!is_mount_point(&d.join("surely-not-a-mount-point-mvsnap")));
    }
}
