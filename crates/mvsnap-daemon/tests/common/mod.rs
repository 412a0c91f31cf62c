//! Shared harness of the daemon's tests with real clients: a store and an origin in a temporary
//! directory, the `mvsnap` binary (built if missing or stale), a daemon guard that always kills
//! its process, and an in-memory model of the expected images. What every suite shares
//! (external tools with a deadline, SHA-256, a seeded RNG, image comparison, a raw NBD client)
//! comes from mvsnap-testkit, re-exported here.
//!
//! Every daemon runs with its own `MVSNAP_RUNTIME_DIR` (inside the test's directory), so the
//! control sockets of tests running in parallel never collide.
#![allow(dead_code)]

pub use mvsnap_testkit::*;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Temporary directories
// ---------------------------------------------------------------------------------------------

/// A fresh directory under the system temp dir, removed on drop (kept when
/// `MVSNAP_KEEP_TEST_DIRS=1`, or when something is still mounted below it).
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        static N: AtomicU32 = AtomicU32::new(0);
        // Short: Unix socket paths must stay under 108 bytes.
        let path = std::env::temp_dir().join(format!(
            "mvd-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TestDir { path }
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }
}

/// Mount points at or below `dir`, from /proc/self/mountinfo.
pub fn mounts_below(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let d = dir.to_string_lossy().to_string();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| *m == d || m.starts_with(&format!("{d}/")))
        .map(String::from)
        .collect()
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var("MVSNAP_KEEP_TEST_DIRS").as_deref() == Ok("1") {
            eprintln!("kept {}", self.path.display());
            return;
        }
        let m = mounts_below(&self.path);
        if !m.is_empty() {
            // Never walk into a mounted filesystem.
            eprintln!(
                "NOT removing {}: still mounted below it: {m:?}",
                self.path.display()
            );
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------------------------
// The mvsnap binary
// ---------------------------------------------------------------------------------------------

/// `target/<profile>` of this test executable (`target/<profile>/deps/<test>-<hash>`).
fn profile_dir() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        if let Some(deps) = exe.parent() {
            if deps.file_name().is_some_and(|n| n == "deps") {
                if let Some(p) = deps.parent() {
                    return p.to_path_buf();
                }
            }
        }
    }
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target")
        .join(profile)
}

fn mtime(p: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// The `mvsnap` binary of the same profile as this test (`$MVSNAP_BIN` overrides). Built with
/// `cargo build -p mvsnap-cli` when missing, or older than this test executable (so
/// `cargo test -p mvsnap-daemon` never runs a stale daemon).
pub fn mvsnap_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(b) = std::env::var_os("MVSNAP_BIN") {
            let b = PathBuf::from(b);
            assert!(b.is_file(), "MVSNAP_BIN={} does not exist", b.display());
            return b;
        }
        let dir = profile_dir();
        let bin = dir.join("mvsnap");
        let stale = match (
            mtime(&bin),
            std::env::current_exe().ok().and_then(|e| mtime(&e)),
        ) {
            (None, _) => true,
            (Some(b), Some(t)) => b < t,
            (Some(_), None) => false,
        };
        if stale {
            let profile = dir.file_name().unwrap().to_string_lossy().to_string();
            let mut cmd = Command::new(env!("CARGO"));
            cmd.arg("build").arg("-p").arg("mvsnap-cli");
            match profile.as_str() {
                "debug" => {}
                "release" => {
                    cmd.arg("--release");
                }
                p => {
                    cmd.arg("--profile").arg(p);
                }
            }
            if let Some(target) = dir.parent() {
                cmd.env("CARGO_TARGET_DIR", target);
            }
            cmd.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
            eprintln!("building the daemon: {cmd:?}");
            let st = cmd.status().expect("run cargo build");
            assert!(st.success(), "cargo build -p mvsnap-cli failed");
        }
        assert!(bin.is_file(), "{} missing after the build", bin.display());
        bin
    })
}

// ---------------------------------------------------------------------------------------------
// A store, an origin and a daemon
// ---------------------------------------------------------------------------------------------

/// A COW store (512 MiB, default chunk size) and one origin `disk0` in a temporary directory.
pub struct Fixture {
    pub dir: TestDir,
    pub store: PathBuf,
    pub runtime: PathBuf,
    pub sock: PathBuf,
    pub origin: PathBuf,
    pub size: u64,
}

impl Fixture {
    /// `content` is the origin's initial data; the file is `size` bytes (zeros after it,
    /// sparse).
    pub fn new(name: &str, size: u64, content: &[u8]) -> Fixture {
        let _ = mvsnap_bin();
        let dir = TestDir::new(name);
        let store = dir.join("store.img");
        let origin = dir.join("disk0.img");
        std::fs::write(&origin, content).unwrap();
        Fixture::at(dir, store, origin, size, "512M")
    }

    /// A fixture whose store and origin are at the given paths (anywhere: freeze.rs puts them
    /// on the filesystem it freezes): the origin file is made `size` bytes (created if
    /// missing, sparse), the store formatted with `--size STORE_SIZE` and the origin bound as
    /// `disk0`. The runtime directory and the NBD socket are in `dir`.
    pub fn at(
        dir: TestDir,
        store: PathBuf,
        origin: PathBuf,
        size: u64,
        store_size: &str,
    ) -> Fixture {
        let runtime = dir.join("run");
        std::fs::create_dir_all(&runtime).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&origin)
            .unwrap()
            .set_len(size)
            .unwrap();
        let fx = Fixture {
            sock: dir.join("nbd.sock"),
            dir,
            store,
            runtime,
            origin,
            size,
        };
        run_ok(
            Command::new(mvsnap_bin())
                .env_remove("MVSNAP_STORE")
                .arg("format")
                .arg(&fx.store)
                .args(["--size", store_size]),
        );
        fx.ms_ok(&[
            "origin",
            "add",
            fx.origin.to_str().unwrap(),
            "--id",
            "disk0",
        ]);
        fx
    }

    /// `mvsnap --store STORE` with this fixture's runtime directory.
    pub fn mvsnap(&self) -> Command {
        let mut c = Command::new(mvsnap_bin());
        c.env("MVSNAP_RUNTIME_DIR", &self.runtime)
            .env_remove("MVSNAP_STORE")
            .env_remove("RUST_LOG")
            .arg("--store")
            .arg(&self.store);
        c
    }

    pub fn ms(&self, args: &[&str]) -> Output {
        run(self.mvsnap().args(args), TOOL_TIMEOUT)
    }

    /// Run an mvsnap command that must succeed; its stdout.
    #[track_caller]
    pub fn ms_ok(&self, args: &[&str]) -> String {
        let out = self.ms(args);
        assert!(
            out.status.success(),
            "mvsnap {args:?} failed: {}",
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[track_caller]
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.ms_ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("mvsnap {args:?}: bad JSON: {e}"))
    }

    /// `snapshot create disk0 --tag TAG [--writable] [--memo MEMO]`.
    #[track_caller]
    pub fn snapshot(&self, source: &str, tag: &str, writable: bool, memo: &str) {
        let mut args = vec!["snapshot", "create", source, "--tag", tag];
        if writable {
            args.push("--writable");
        }
        if !memo.is_empty() {
            args.extend(["--memo", memo]);
        }
        let out = self.ms_ok(&args);
        assert_eq!(out.trim(), tag, "snapshot create prints the tag");
    }

    /// Names in `snapshot list --json`.
    pub fn snapshot_names(&self) -> Vec<String> {
        let v = self.json(&["snapshot", "list", "--json"]);
        v.as_array()
            .expect("snapshot list --json is an array")
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// `mvsnap check --json` (through the daemon if one serves): exit 0 and no errors.
    #[track_caller]
    pub fn assert_check_clean(&self, when: &str) {
        let out = self.ms(&["check", "--json"]);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("check --json {when}: bad JSON ({e}): {}", text(&out)));
        let errors = report["errors"].as_array().cloned().unwrap_or_default();
        assert!(
            out.status.success() && errors.is_empty(),
            "mvsnap check {when} is not clean: {}",
            text(&out)
        );
    }

    /// `nbd+unix:///EXPORT?socket=SOCK`
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    /// `nbd+unix://?socket=SOCK` (for `nbdinfo --list`).
    pub fn list_uri(&self) -> String {
        format!("nbd+unix://?socket={}", self.sock.display())
    }

    /// Start `mvsnap serve --nbd-socket SOCK` and wait for its readiness line.
    #[track_caller]
    pub fn start(&self) -> Daemon {
        self.start_with(&[], &[])
    }

    /// Start a daemon; `Err(its stderr)` if it exits without serving.
    pub fn try_start(&self) -> Result<Daemon, String> {
        self.try_start_with(&[], &[])
    }

    /// Start `mvsnap serve --nbd-socket SOCK ARGS...` (`--mount DIR`, `--listen`, TLS...) with
    /// more environment variables (`NOTIFY_SOCKET`...).
    #[track_caller]
    pub fn start_with(&self, args: &[&str], env: &[(&str, &Path)]) -> Daemon {
        self.try_start_with(args, env)
            .unwrap_or_else(|e| panic!("the daemon did not start: {e}"))
    }

    /// `start_with`, or `Err(its stderr)` if it exits without serving.
    pub fn try_start_with(&self, args: &[&str], env: &[(&str, &Path)]) -> Result<Daemon, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let log = self
            .dir
            .join(&format!("daemon-{}.log", N.fetch_add(1, Ordering::Relaxed)));
        let mut cmd = self.mvsnap();
        cmd.arg("serve")
            .arg("--nbd-socket")
            .arg(&self.sock)
            .args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Daemon::spawn(&mut cmd, &log)
    }

    /// Read a whole export with nbdcopy (to stdout).
    #[track_caller]
    pub fn nbdcopy_read(&self, nbdcopy: &Path, export: &str) -> Vec<u8> {
        let out = run(
            Command::new(nbdcopy).arg(self.uri(export)).arg("-"),
            TOOL_TIMEOUT,
        );
        assert!(
            out.status.success(),
            "nbdcopy of {export} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout.len() as u64, self.size, "nbdcopy of {export}");
        out.stdout
    }

    /// `qemu-io -f raw [-r] URI -c CMD...`; requires exit 0 and no failed command (qemu-io
    /// prints "Pattern verification failed" or "... failed: ..." for those).
    #[track_caller]
    pub fn qemu_io(
        &self,
        qemu_io: &Path,
        export: &str,
        read_only: bool,
        cmds: &[String],
    ) -> String {
        let mut c = Command::new(qemu_io);
        c.args(["-f", "raw"]);
        if read_only {
            c.arg("-r");
        }
        c.arg(self.uri(export));
        for x in cmds {
            c.arg("-c").arg(x);
        }
        let out = run(&mut c, TOOL_TIMEOUT);
        let t = text(&out);
        assert!(
            out.status.success() && !t.contains("failed") && !t.contains("rror"),
            "qemu-io on {export} {cmds:?}: {}\n{t}",
            out.status
        );
        t
    }
}

/// A running `mvsnap serve`. Dropping it kills the process (SIGKILL) if it still runs; on a
/// failing test its log is printed.
pub struct Daemon {
    child: Option<Child>,
    pub pid: u32,
    pub ready: String,
    pub ctl: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    fn spawn(cmd: &mut Command, log: &Path) -> Result<Daemon, String> {
        let logf = std::fs::File::create(log).unwrap();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(logf)
            .spawn()
            .expect("spawn mvsnap serve");
        let pid = child.id();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // Read the readiness line, then keep draining stdout until the daemon exits.
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            let mut sink = Vec::new();
            let _ = r.read_to_end(&mut sink);
        });
        let mut d = Daemon {
            child: Some(child),
            pid,
            ready: String::new(),
            ctl: PathBuf::new(),
            log: log.to_path_buf(),
        };
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.starts_with("ready ") => {
                d.ready = line.trim().to_string();
                d.ctl = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("control="))
                    .map(PathBuf::from)
                    .unwrap_or_default();
                eprintln!("daemon {pid}: {}", d.ready);
                Ok(d)
            }
            Ok(line) => {
                let st = d.wait(Duration::from_secs(30));
                Err(format!(
                    "no readiness line (got {line:?}), status {st:?}: {}",
                    d.log_text()
                ))
            }
            Err(_) => Err(format!("no readiness line within 60 s: {}", d.log_text())),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let c = self.child.as_mut()?;
        let st = wait_timeout(c, timeout);
        if st.is_some() {
            self.child = None;
        }
        st
    }

    /// SIGTERM, then wait (at most 60 s) for the exit status.
    #[track_caller]
    pub fn terminate(mut self) -> ExitStatus {
        // SAFETY: kill(2) with our own child's pid, which we have not reaped yet (so the pid
        // cannot have been reused).
        let r = unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        assert_eq!(r, 0, "kill -TERM {}", self.pid);
        match self.wait(Duration::from_secs(60)) {
            Some(st) => {
                eprintln!("daemon {} exited after SIGTERM: {st}", self.pid);
                st
            }
            None => panic!(
                "daemon {} did not exit within 60 s of SIGTERM: {}",
                self.pid,
                self.log_text()
            ),
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- log of daemon {} ({}) ---\n{}",
                self.pid,
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// A spawned helper process (fio, qemu-io...) killed on drop.
pub struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    pub fn spawn(cmd: &mut Command) -> ChildGuard {
        ChildGuard(Some(
            cmd.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")),
        ))
    }

    pub fn output(mut self, timeout: Duration) -> Output {
        let mut c = self.0.take().unwrap();
        let out = wait_output(&mut c, timeout, "helper");
        eprintln!("helper -> {}\n{}", out.status, text(&out));
        out
    }

    pub fn running(&mut self) -> bool {
        self.0
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Loop devices and mounts (filesystem.rs, fuse.rs)
// ---------------------------------------------------------------------------------------------

/// Why this machine cannot run a test with mounts and loop devices (not root, no FUSE, no
/// loop devices), if it cannot.
pub fn missing_privileges() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (FUSE mounts, losetup and mount need it)".into());
    }
    for dev in ["/dev/fuse", "/dev/loop-control"] {
        if !Path::new(dev).exists() {
            return Some(format!("{dev} does not exist"));
        }
    }
    None
}

/// Return from the test, saying why, when [`missing_privileges`] finds a reason (even under
/// `MVSNAP_REQUIRE_TOOLS=1`, which only makes *missing tools* fail).
#[macro_export]
macro_rules! need_root {
    () => {
        if let Some(why) = common::missing_privileges() {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "skipped: {why}");
            return;
        }
    };
}

/// Try a few times: a just-closed device or mount may still be busy for a moment.
pub fn retry(what: &str, mut f: impl FnMut() -> bool) -> bool {
    for i in 0..20 {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100 * (i + 1).min(5)));
    }
    eprintln!("giving up: {what}");
    false
}

/// Run; true on exit status 0.
pub fn quiet(cmd: &mut Command) -> bool {
    run(cmd, Duration::from_secs(60)).status.success()
}

/// `losetup -f --show [-r] [--direct-io=on] FILE`; detached on drop.
pub struct Loop {
    dev: Option<String>,
    losetup: PathBuf,
}

impl Loop {
    pub fn attach(losetup: &Path, file: &Path, read_only: bool, direct_io: bool) -> Loop {
        let mut c = Command::new(losetup);
        c.args(["-f", "--show"]);
        if read_only {
            c.arg("-r");
        }
        if direct_io {
            c.arg("--direct-io=on");
        }
        let out = run_ok(c.arg(file));
        let dev = out.trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        let l = Loop {
            dev: Some(dev),
            losetup: losetup.to_path_buf(),
        };
        if direct_io {
            let info = run_ok(
                Command::new(losetup)
                    .args(["-n", "-O", "DIO", "-l"])
                    .arg(l.dev()),
            );
            assert_eq!(info.trim(), "1", "{} is not in direct I/O mode", l.dev());
        }
        l
    }

    pub fn dev(&self) -> &str {
        self.dev.as_deref().unwrap()
    }

    pub fn detach(&mut self) {
        if let Some(dev) = self.dev.take() {
            let l = self.losetup.clone();
            retry("losetup -d", || quiet(Command::new(&l).arg("-d").arg(&dev)));
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        self.detach();
    }
}

/// `mount [-o OPTS] -t FSTYPE DEV DIR`; unmounted on drop (lazily if it stays busy).
pub struct Mnt {
    dir: Option<PathBuf>,
}

impl Mnt {
    pub fn new(fstype: &str, dev: &str, dir: &Path, opts: Option<&str>) -> Mnt {
        std::fs::create_dir_all(dir).unwrap();
        let mut c = Command::new(sbin("mount"));
        if let Some(o) = opts {
            c.arg("-o").arg(o);
        }
        run_ok(c.args(["-t", fstype]).arg(dev).arg(dir));
        Mnt {
            dir: Some(dir.to_path_buf()),
        }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.as_ref().unwrap().join(p)
    }

    pub fn dir(&self) -> &Path {
        self.dir.as_deref().unwrap()
    }

    pub fn unmount(&mut self) {
        if let Some(dir) = self.dir.take() {
            let umount = sbin("umount");
            if !retry("umount", || quiet(Command::new(&umount).arg(&dir))) {
                quiet(Command::new(&umount).arg("-l").arg(&dir));
            }
        }
    }
}

impl Drop for Mnt {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// A system tool by path where it is found (PATH or the sbin directories), else by name.
fn sbin(name: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| PathBuf::from(name))
}

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

/// `write -P BYTE OFF LEN` on the model.
pub fn fill(model: &mut [u8], off: u64, len: u64, byte: u8) {
    model[off as usize..(off + len) as usize].fill(byte);
}
