//! Shared harness of the daemon's tests with real clients: a store and an origin in a temporary
//! directory, the `mvsnap` binary (built if missing or stale), a daemon guard that always kills
//! its process, external tools with a deadline, SHA-256, a seeded RNG, an in-memory model of the
//! expected images, and a small blocking raw NBD client for hand-made protocol tests.
//!
//! Every daemon runs with its own `MVSNAP_RUNTIME_DIR` (inside the test's directory), so the
//! control sockets of tests running in parallel never collide.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mvsnap_nbd::proto;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// Deadline of one external command (a hung client fails the test instead of hanging it).
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

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
// External tools
// ---------------------------------------------------------------------------------------------

/// Find an external tool on PATH (and in the sbin directories, where mkfs/losetup live).
/// Missing: fail if `MVSNAP_REQUIRE_TOOLS=1`, else print `skipped: NAME not found` and `None`.
pub fn tool(name: &str) -> Option<PathBuf> {
    if let Some(p) = find_tool(name) {
        return Some(p);
    }
    if std::env::var("MVSNAP_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!("{name} not found and MVSNAP_REQUIRE_TOOLS=1 (scripts/install-deps.sh installs it)");
    }
    // To the real stderr, past the harness's capture, so it is always seen.
    let _ = writeln!(std::io::stderr(), "skipped: {name} not found");
    None
}

pub fn find_tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).collect();
    for d in ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        dirs.push(PathBuf::from(d));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// `let Some(qemu_io) = need!("qemu-io") else { return };` shorthand; several at once:
/// `let [a, b] = need!("a", "b");`.
#[macro_export]
macro_rules! need {
    ($($name:expr),+ $(,)?) => {
        [$(match common::tool($name) {
            Some(p) => p,
            None => return,
        }),+]
    };
}

/// Time since the first use, for the logs.
pub fn since_start() -> Duration {
    static T0: OnceLock<Instant> = OnceLock::new();
    T0.get_or_init(Instant::now).elapsed()
}

/// Run a command with a deadline; prints the command and its output (shown on failure).
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = format!("[{:.2?}] {cmd:?}", since_start());
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
    let start = Instant::now();
    let out = wait_output(&mut child, timeout, &desc);
    let took = start.elapsed();
    // Only the beginning: outputs may be whole images.
    let show = |b: &[u8]| {
        let s = String::from_utf8_lossy(&b[..b.len().min(4000)]);
        if s.contains('\u{fffd}') {
            format!("[{} bytes of binary output]\n", b.len())
        } else if b.len() > 4000 {
            format!("{s}...[{} bytes]\n", b.len())
        } else {
            s.into_owned()
        }
    };
    eprintln!(
        "$ {desc}\n-> {} in {took:.2?}\n{}{}",
        out.status,
        show(&out.stdout),
        show(&out.stderr)
    );
    out
}

/// Collect a spawned child's stdout/stderr (if piped) and status, killing it after `timeout`.
pub fn wait_output(child: &mut Child, timeout: Duration, desc: &str) -> Output {
    let so = child.stdout.take();
    let se = child.stderr.take();
    let drain = |p: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut p) = p {
                let _ = p.read_to_end(&mut v);
            }
            v
        })
    };
    let t_out = drain(so.map(|p| Box::new(p) as Box<dyn Read + Send>));
    let t_err = drain(se.map(|p| Box::new(p) as Box<dyn Read + Send>));
    let status = wait_timeout(child, timeout).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("timed out after {timeout:?}: {desc}");
    });
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// Wait for a child at most `timeout`; `None` if it is still running.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// stdout + stderr as text.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Run and require exit status 0; returns stdout+stderr as text.
#[track_caller]
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd, TOOL_TIMEOUT);
    let t = text(&out);
    assert!(out.status.success(), "command failed: {cmd:?}\n{t}");
    t
}

// ---------------------------------------------------------------------------------------------
// Checksums and random data
// ---------------------------------------------------------------------------------------------

/// SHA-256 (FIPS 180-4), streaming. The workspace's test dependencies are not ours to change,
/// so it is here; `sha256_known_vectors` in qemu_io.rs checks it against known digests.
pub struct Sha256 {
    h: [u32; 8],
    buf: [u8; 64],
    buf_len: usize,
    total: u64,
}

const SHA256_K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

impl Default for Sha256 {
    fn default() -> Self {
        Sha256 {
            h: [
                0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
                0x5be0cd19,
            ],
            buf: [0; 64],
            buf_len: 0,
            total: 0,
        }
    }
}

impl Sha256 {
    fn block(&mut self, b: &[u8]) {
        let b: &[u8; 64] = b.try_into().unwrap();
        let mut w = [0u32; 64];
        for (i, c) in b.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = self.h;
        for (k, wi) in SHA256_K.iter().zip(w.iter()) {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = h
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(*k)
                .wrapping_add(*wi);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            h = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (s, v) in self.h.iter_mut().zip([a, b, c, d, e, f, g, h]) {
            *s = s.wrapping_add(v);
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if self.buf_len > 0 {
            let n = (64 - self.buf_len).min(data.len());
            self.buf[self.buf_len..self.buf_len + n].copy_from_slice(&data[..n]);
            self.buf_len += n;
            data = &data[n..];
            if self.buf_len == 64 {
                let b = self.buf;
                self.block(&b);
                self.buf_len = 0;
            }
        }
        while data.len() >= 64 {
            self.block(&data[..64]);
            data = &data[64..];
        }
        self.buf[..data.len()].copy_from_slice(data);
        self.buf_len = data.len();
    }

    pub fn hex(mut self) -> String {
        let bits = self.total.wrapping_mul(8);
        let mut pad = vec![0x80u8];
        let rem = (self.total as usize + 1) % 64;
        let zeros = if rem <= 56 { 56 - rem } else { 120 - rem };
        pad.resize(1 + zeros, 0);
        pad.extend_from_slice(&bits.to_be_bytes());
        let total = self.total;
        self.update(&pad);
        self.total = total;
        debug_assert_eq!(self.buf_len, 0);
        self.h.iter().map(|w| format!("{w:08x}")).collect()
    }
}

pub fn sha256(data: &[u8]) -> String {
    let mut h = Sha256::default();
    h.update(data);
    h.hex()
}

pub fn sha256_file(p: &Path) -> String {
    let mut f = std::fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let mut h = Sha256::default();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return h.hex();
        }
        h.update(&buf[..n]);
    }
}

/// splitmix64: small, seedable, good enough for test data and random moments.
pub struct Rng(pub u64);

impl Rng {
    /// Seeded from `MVSNAP_TEST_SEED` if set, else from the clock; the seed is printed so a
    /// failure can be replayed.
    pub fn from_env(what: &str) -> Rng {
        let seed = std::env::var("MVSNAP_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("{what}: seed {seed} (MVSNAP_TEST_SEED={seed} replays it)");
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng(seed).fill(&mut v);
    v
}

/// Where two images first differ, for messages.
pub fn first_diff(got: &[u8], want: &[u8]) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("length {} != expected {}", got.len(), want.len()));
    }
    let i = got.iter().zip(want).position(|(a, b)| a != b)?;
    let end = (i..got.len())
        .find(|&j| got[j] == want[j])
        .unwrap_or(got.len());
    Some(format!(
        "first difference at byte {i} (block {} of 4 KiB), {} bytes differ from there: \
         got {:02x?}, expected {:02x?}",
        i / 4096,
        end - i,
        &got[i..(i + 8).min(end)],
        &want[i..(i + 8).min(end)]
    ))
}

#[track_caller]
pub fn assert_image(what: &str, got: &[u8], want: &[u8]) {
    if let Some(d) = first_diff(got, want) {
        panic!("{what}: content differs from the model: {d}");
    }
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
        let runtime = dir.join("run");
        std::fs::create_dir_all(&runtime).unwrap();
        let origin = dir.join("disk0.img");
        std::fs::write(&origin, content).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
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
                .args(["--size", "512M"]),
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
        self.try_start()
            .unwrap_or_else(|e| panic!("the daemon did not start: {e}"))
    }

    /// Start `mvsnap serve --nbd-socket SOCK ARGS...` with more environment variables.
    #[track_caller]
    pub fn start_with_env(&self, args: &[&str], env: &[(&str, &Path)]) -> Daemon {
        let mut cmd = self.mvsnap();
        cmd.arg("serve")
            .arg("--nbd-socket")
            .arg(&self.sock)
            .args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let log = self.dir.join("daemon-with.log");
        Daemon::spawn(&mut cmd, &log).unwrap_or_else(|e| panic!("the daemon did not start: {e}"))
    }

    /// Start a daemon; `Err(its stderr)` if it exits without serving.
    pub fn try_start(&self) -> Result<Daemon, String> {
        self.try_start_with(&[])
    }

    /// Start `mvsnap serve --nbd-socket SOCK EXTRA...` (e.g. `--mount DIR`).
    #[track_caller]
    pub fn start_with(&self, extra: &[&str]) -> Daemon {
        self.try_start_with(extra)
            .unwrap_or_else(|e| panic!("the daemon did not start: {e}"))
    }

    /// `try_start` with more `serve` arguments (`--listen`, TLS...).
    pub fn try_start_with(&self, extra: &[&str]) -> Result<Daemon, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let log = self
            .dir
            .join(&format!("daemon-{}.log", N.fetch_add(1, Ordering::Relaxed)));
        Daemon::spawn(
            self.mvsnap()
                .arg("serve")
                .arg("--nbd-socket")
                .arg(&self.sock)
                .args(extra),
            &log,
        )
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
// The model
// ---------------------------------------------------------------------------------------------

/// `write -P BYTE OFF LEN` on the model.
pub fn fill(model: &mut [u8], off: u64, len: u64, byte: u8) {
    model[off as usize..(off + len) as usize].fill(byte);
}

// ---------------------------------------------------------------------------------------------
// A raw blocking NBD client
// ---------------------------------------------------------------------------------------------

/// One reply to an option: type and data.
pub type OptReply = (u32, Vec<u8>);

#[derive(Debug)]
pub enum Reply {
    Simple {
        handle: u64,
        error: u32,
    },
    Chunk {
        flags: u16,
        reply_type: u16,
        handle: u64,
        payload: Vec<u8>,
    },
}

pub struct RawClient {
    pub s: UnixStream,
}

impl RawClient {
    pub fn connect(sock: &Path) -> RawClient {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        RawClient { s }
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    /// Send; false if the server has closed the connection.
    pub fn try_send(&mut self, b: &[u8]) -> bool {
        self.s.write_all(b).is_ok()
    }

    pub fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).unwrap();
        v
    }

    /// True once the server has closed its side (EOF or reset) within the read timeout;
    /// bytes still arriving are skipped.
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        self.s.set_read_timeout(Some(timeout)).unwrap();
        let mut b = [0u8; 4096];
        let start = Instant::now();
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) if start.elapsed() < timeout => continue,
                Ok(_) => return false,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }

    /// Read the greeting and send client flags.
    pub fn greet(&mut self, client_flags: u32) {
        let g = self.recv(proto::HANDSHAKE_LEN);
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        self.send(&client_flags.to_be_bytes());
    }

    pub fn send_option(&mut self, opt: u32, data: &[u8]) {
        let mut b = proto::encode_option_header(opt, data.len() as u32).to_vec();
        b.extend_from_slice(data);
        self.send(&b);
    }

    pub fn read_option_reply(&mut self, opt: u32) -> OptReply {
        let h = self.recv(proto::OPTION_REPLY_HEADER_LEN);
        let h = proto::decode_option_reply_header(h.as_slice().try_into().unwrap()).unwrap();
        assert_eq!(h.option, opt);
        let data = self.recv(h.length as usize);
        (h.reply_type, data)
    }

    /// Send an option and collect replies up to the final one (ACK or an error).
    pub fn option(&mut self, opt: u32, data: &[u8]) -> Vec<OptReply> {
        self.send_option(opt, data);
        let mut v = Vec::new();
        loop {
            let r = self.read_option_reply(opt);
            let last = r.0 == proto::REP_ACK || r.0 & (1 << 31) != 0;
            v.push(r);
            if last {
                return v;
            }
        }
    }

    /// Greet (fixed newstyle, no zeroes), optionally negotiate structured replies, then GO.
    pub fn handshake(&mut self, name: &str, structured: bool) -> (u64, u16) {
        self.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES);
        if structured {
            let r = self.option(proto::OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(r, vec![(proto::REP_ACK, vec![])]);
        }
        self.go(name)
            .unwrap_or_else(|e| panic!("GO {name} failed: {e:?}"))
    }

    /// NBD_OPT_GO; Ok((size, flags)) or Err(final error reply).
    pub fn go(&mut self, name: &str) -> Result<(u64, u16), OptReply> {
        let body = proto::encode_info_request(&proto::InfoRequest {
            name: name.into(),
            requests: vec![proto::INFO_BLOCK_SIZE],
        });
        let replies = self.option(proto::OPT_GO, &body);
        let last = replies.last().unwrap().clone();
        if last.0 != proto::REP_ACK {
            return Err(last);
        }
        let info = replies
            .iter()
            .find(|r| r.0 == proto::REP_INFO && r.1[0..2] == [0, 0])
            .expect("no NBD_INFO_EXPORT");
        let size = u64::from_be_bytes(info.1[2..10].try_into().unwrap());
        let flags = u16::from_be_bytes(info.1[10..12].try_into().unwrap());
        Ok((size, flags))
    }

    pub fn request(&mut self, command: u16, flags: u16, handle: u64, offset: u64, length: u32) {
        self.send(&proto::encode_request(&proto::Request {
            flags,
            command,
            handle,
            offset,
            length,
        }));
    }

    pub fn write_req(&mut self, handle: u64, offset: u64, data: &[u8]) {
        let mut b = proto::encode_request(&proto::Request {
            flags: 0,
            command: proto::CMD_WRITE,
            handle,
            offset,
            length: data.len() as u32,
        })
        .to_vec();
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// One reply header (either kind); for a structured one, its payload too.
    pub fn reply(&mut self) -> Reply {
        let magic = self.recv(4);
        let len = proto::reply_header_len(magic.as_slice().try_into().unwrap())
            .unwrap_or_else(|e| panic!("bad reply magic {magic:02x?}: {e}"));
        let mut h = magic;
        h.extend(self.recv(len - 4));
        match proto::decode_reply_header(&h).unwrap() {
            proto::ReplyHeader::Simple(s) => Reply::Simple {
                handle: s.handle,
                error: s.error,
            },
            proto::ReplyHeader::Structured(c) => {
                let payload = self.recv(c.length as usize);
                Reply::Chunk {
                    flags: c.flags,
                    reply_type: c.reply_type,
                    handle: c.handle,
                    payload,
                }
            }
        }
    }

    /// A simple reply's (handle, error).
    pub fn simple(&mut self) -> (u64, u32) {
        match self.reply() {
            Reply::Simple { handle, error } => (handle, error),
            other => panic!("expected a simple reply, got {other:?}"),
        }
    }

    /// READ on a connection without structured replies: Ok(data) or Err(errno).
    pub fn read_simple(&mut self, handle: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(proto::CMD_READ, 0, handle, offset, len);
        let (h, err) = self.simple();
        assert_eq!(h, handle);
        if err != 0 {
            return Err(err);
        }
        Ok(self.recv(len as usize))
    }

    /// NBD_CMD_DISC, then the server must close.
    pub fn disconnect(mut self) {
        self.request(proto::CMD_DISC, 0, 0, 0, 0);
        assert!(
            self.closed_within(Duration::from_secs(10)),
            "server did not close after NBD_CMD_DISC"
        );
    }
}
