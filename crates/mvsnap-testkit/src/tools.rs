//! External tools: found on PATH (or skipped), run with a deadline, their output shown.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Deadline of one external command (a hung client fails the test instead of hanging it).
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(180);

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

/// The tool's path if it is installed, without the skip-or-fail policy of [`tool`].
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).collect();
    for d in ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        dirs.push(PathBuf::from(d));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
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
/// The pipes are drained on threads, so a chatty child cannot block on a full pipe.
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

/// Run (with [`TOOL_TIMEOUT`]) and require exit status 0; returns stdout+stderr as text.
#[track_caller]
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd, TOOL_TIMEOUT);
    let t = text(&out);
    assert!(out.status.success(), "command failed: {cmd:?}\n{t}");
    t
}
