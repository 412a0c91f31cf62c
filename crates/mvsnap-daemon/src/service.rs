//! Running as a service: readiness for systemd, a pidfile, a registry entry in a well-known
//! place (so a command finds the daemon whatever runtime directory either was started with),
//! who holds a store's lock, and the `--on-event` hook.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What a running daemon says about itself, in `registry_dir()/<store key>.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DaemonRecord {
    pub pid: u32,
    pub store: PathBuf,
    pub control: PathBuf,
    pub nbd: PathBuf,
    pub tcp: Option<String>,
}

/// A place every process of this user looks, whatever `MVSNAP_RUNTIME_DIR` it has:
/// `/run/mvsnap/daemons` for root, `/tmp/mvsnap-UID/daemons` otherwise.
pub fn registry_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        PathBuf::from("/run/mvsnap/daemons")
    } else {
        std::env::temp_dir().join(format!("mvsnap-{uid}/daemons"))
    }
}

fn record_path(key: &str) -> PathBuf {
    registry_dir().join(format!("{key}.json"))
}

/// Say where this daemon is; removed again by [`Registration`]'s drop.
pub fn register(key: &str, rec: &DaemonRecord) -> std::io::Result<Registration> {
    let dir = registry_dir();
    std::fs::create_dir_all(&dir)?;
    let path = record_path(key);
    let tmp = path.with_extension(format!("json.{}", rec.pid));
    std::fs::write(&tmp, serde_json::to_vec(rec).unwrap_or_default())?;
    std::fs::rename(&tmp, &path)?;
    Ok(Registration { path })
}

pub struct Registration {
    path: PathBuf,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The daemon registered for `store`, if its process is alive.
pub fn registered(store: &Path) -> Option<DaemonRecord> {
    let key = crate::paths::store_key(store).ok()?;
    let rec: DaemonRecord = serde_json::from_slice(&std::fs::read(record_path(&key)).ok()?).ok()?;
    pid_alive(rec.pid).then_some(rec)
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Who holds the store's lock: the registered daemon, else the process /proc/locks names for
/// the file (any mvsnap command holding it), as one phrase for an error message.
pub fn lock_holder(store: &Path) -> Option<String> {
    if let Some(r) = registered(store) {
        return Some(format!(
            "mvsnap serve, pid {}, control socket {}, NBD socket {}",
            r.pid,
            r.control.display(),
            r.nbd.display()
        ));
    }
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(store).ok()?;
    let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
    let want = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    // "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"
    let pid = locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&want.as_str()))
            .then(|| f.get(4)?.parse::<u32>().ok())
            .flatten()
    })?;
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    Some(format!("pid {pid} ({cmd})"))
}

/// Tell systemd (`Type=notify`) that we serve, or that we stop; nothing without
/// `$NOTIFY_SOCKET`.
pub fn notify_ready(status: &str) {
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(status),
        ],
    );
}

pub fn notify_stopping() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
}

/// Write our pid to `path` (removed by the guard's drop); `%p` in the path is our pid.
pub fn write_pidfile(path: &Path) -> std::io::Result<PidFile> {
    let pid = std::process::id();
    let path = PathBuf::from(path.to_string_lossy().replace("%p", &pid.to_string()));
    std::fs::write(&path, format!("{pid}\n"))?;
    Ok(PidFile { path })
}

pub struct PidFile {
    path: PathBuf,
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Run `cmd` (with `sh -c`) for every event from now on, one at a time, with the event in
/// its environment (MVSNAP_EVENT_KIND, _MESSAGE, _TIME, _JSON, and MVSNAP_STORE), as blksnap's
/// users script their reactions. A hook that runs longer than a minute is killed.
pub fn spawn_event_hook(store: mvsnap_engine::Store, path: PathBuf, cmd: String) {
    let (mut next, _) = store.events_after(u64::MAX, Duration::ZERO);
    let spawned = std::thread::Builder::new()
        .name("mvsnap-hook".into())
        .spawn(move || loop {
            if store.is_closed() {
                return;
            }
            let (n, events) = store.events_after(next, Duration::from_millis(500));
            next = n;
            for e in events {
                run_hook(&cmd, &path, &e);
            }
        });
    if let Err(e) = spawned {
        tracing::error!("--on-event: cannot start its thread: {e}");
    }
}

fn run_hook(cmd: &str, store: &Path, e: &mvsnap_engine::Event) {
    let kind = serde_json::to_value(e.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("MVSNAP_EVENT_KIND", &kind)
        .env("MVSNAP_EVENT_MESSAGE", &e.message)
        .env("MVSNAP_EVENT_TIME", e.time.to_string())
        .env(
            "MVSNAP_EVENT_JSON",
            serde_json::to_string(e).unwrap_or_default(),
        )
        .env("MVSNAP_STORE", store)
        .stdin(std::process::Stdio::null())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(err) => {
            tracing::warn!("--on-event {cmd:?}: {err}");
            return;
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return,
            Ok(Some(st)) => {
                tracing::warn!("--on-event {cmd:?} for a {kind} event: {st}");
                return;
            }
            Ok(None) if std::time::Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                tracing::warn!("--on-event {cmd:?}: killed after 60 s");
                return;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(err) => {
                tracing::warn!("--on-event {cmd:?}: {err}");
                return;
            }
        }
    }
}
