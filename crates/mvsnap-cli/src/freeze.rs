//! `snapshot create --freeze MOUNTPOINT`: freeze filesystems (FIFREEZE) around a snapshot so
//! it holds a clean filesystem (journal flushed, no replay needed), and thaw them (FITHAW)
//! whatever happens: when the snapshot is taken, on an error (drop), on SIGINT/SIGTERM/SIGHUP,
//! and at a deadline, so a stuck snapshot never leaves a filesystem frozen.
//!
//! The signals are blocked in every thread while frozen and taken by a watcher thread with
//! sigtimedwait; the watcher also enforces the deadline. Whoever thaws first does it; the
//! other finds nothing left to thaw.

use std::collections::HashSet;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)` from linux/fs.h.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// The frozen filesystems: a descriptor of each mount point, taken out when thawed.
type Held = Arc<Mutex<Vec<(PathBuf, Option<File>)>>>;

/// Filesystems frozen until [`Frozen::thaw`] (or drop, a signal, the deadline).
pub struct Frozen {
    held: Held,
    done: Arc<AtomicBool>,
    /// Set by the watcher when it thawed at the deadline.
    timed_out: Arc<AtomicBool>,
    watcher: Option<JoinHandle<()>>,
    old_mask: libc::sigset_t,
    timeout: Duration,
}

fn ioctl(f: &File, req: libc::c_ulong) -> std::io::Result<()> {
    // SAFETY: FIFREEZE/FITHAW take an unused int argument; the fd is open for the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req as _, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Thaw whatever is still frozen; the errors, one line each.
fn thaw_all(held: &Held) -> Vec<String> {
    let mut errs = Vec::new();
    let mut h = held.lock().unwrap_or_else(|e| e.into_inner());
    for (path, f) in h.iter_mut().rev() {
        if let Some(f) = f.take() {
            match ioctl(&f, FITHAW) {
                Ok(()) => tracing::info!("thawed {}", path.display()),
                Err(e) => errs.push(format!("thaw {}: {e}", path.display())),
            }
        }
    }
    errs
}

fn is_mount_point(p: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = p.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| m.replace("\\040", " ") == want)
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a sigset_t we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

impl Frozen {
    /// Freeze each mount point (in order; the same filesystem twice only once). On an error
    /// the ones already frozen are thawed. Nothing to freeze: `None`.
    pub fn freeze(mounts: &[PathBuf], timeout: Duration) -> Result<Option<Frozen>> {
        if mounts.is_empty() {
            return Ok(None);
        }
        let mut files = Vec::new();
        let mut seen = HashSet::new();
        for m in mounts {
            let p = m
                .canonicalize()
                .with_context(|| format!("--freeze {}", m.display()))?;
            if !is_mount_point(&p) {
                bail!(
                    "--freeze {}: not a mount point (give the directory a filesystem is mounted on)",
                    m.display()
                );
            }
            let f = File::open(&p).with_context(|| format!("--freeze {}", m.display()))?;
            let dev = f.metadata()?.dev();
            if seen.insert(dev) {
                files.push((p, f));
            }
        }
        // Signals go to the watcher from now on: no thread of ours dies of one while frozen.
        let set = signal_set();
        // SAFETY: sigset_t out-parameter we own; pthread_sigmask only changes this thread's
        // mask (threads spawned later inherit it).
        let old_mask = unsafe {
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            old
        };
        let held: Held = Arc::new(Mutex::new(Vec::new()));
        let mut frozen = Frozen {
            held: held.clone(),
            done: Arc::new(AtomicBool::new(false)),
            timed_out: Arc::new(AtomicBool::new(false)),
            watcher: None,
            old_mask,
            timeout,
        };
        frozen.watcher = Some(frozen.spawn_watcher(set)?);
        for (p, f) in files {
            tracing::info!("freezing {}", p.display());
            if let Err(e) = ioctl(&f, FIFREEZE) {
                let why = match e.raw_os_error() {
                    Some(libc::EOPNOTSUPP) => "the filesystem cannot be frozen".to_string(),
                    Some(libc::EBUSY) => "already frozen (by someone else)".to_string(),
                    Some(libc::EPERM) => "needs root (CAP_SYS_ADMIN)".to_string(),
                    _ => e.to_string(),
                };
                drop(frozen);
                bail!("freeze {}: {why}", p.display());
            }
            held.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((p, Some(f)));
        }
        Ok(Some(frozen))
    }

    fn spawn_watcher(&self, set: libc::sigset_t) -> Result<JoinHandle<()>> {
        let (held, done, timed_out) =
            (self.held.clone(), self.done.clone(), self.timed_out.clone());
        let deadline = Instant::now() + self.timeout;
        let timeout = self.timeout;
        Ok(std::thread::Builder::new()
            .name("freeze-watch".into())
            .spawn(move || loop {
                if done.load(Ordering::Acquire) {
                    return;
                }
                if Instant::now() >= deadline {
                    timed_out.store(true, Ordering::Release);
                    let errs = thaw_all(&held);
                    eprintln!(
                        "mvsnap: the snapshot took longer than --freeze-timeout ({}s): \
                         thawed the filesystems{}",
                        timeout.as_secs(),
                        errs.iter().map(|e| format!("; {e}")).collect::<String>()
                    );
                    return;
                }
                let ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 50_000_000,
                };
                // SAFETY: `set` is an initialised sigset_t; a null siginfo is allowed.
                let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
                if sig > 0 {
                    let errs = thaw_all(&held);
                    eprintln!(
                        "mvsnap: interrupted (signal {sig}): thawed the filesystems{}",
                        errs.iter().map(|e| format!("; {e}")).collect::<String>()
                    );
                    std::process::exit(128 + sig);
                }
            })?)
    }

    /// Thaw now. Err if a thaw failed, or if the deadline came first (the filesystems were
    /// thawed then, perhaps before the snapshot: it may not be clean).
    pub fn thaw(mut self) -> Result<()> {
        let errs = self.finish();
        if self.timed_out.load(Ordering::Acquire) {
            bail!(
                "the filesystems were thawed at --freeze-timeout ({}s), perhaps before the \
                 snapshot was taken: it may hold an unclean filesystem",
                self.timeout.as_secs()
            );
        }
        if !errs.is_empty() {
            bail!("{}", errs.join("; "));
        }
        Ok(())
    }

    fn finish(&mut self) -> Vec<String> {
        self.done.store(true, Ordering::Release);
        let errs = thaw_all(&self.held);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        // SAFETY: restores the mask saved in `freeze` for this thread.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.old_mask, std::ptr::null_mut());
        }
        errs
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.done.load(Ordering::Acquire) {
            for e in self.finish() {
                eprintln!("mvsnap: {e}");
            }
        }
    }
}
