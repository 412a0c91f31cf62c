//! What the CLI's black-box tests share: the `mvsnap` binary under test, run with no store or
//! log filter inherited from the environment, and what a run of it gave.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// `mvsnap` (this build's binary), without `MVSNAP_STORE` or `RUST_LOG` from the caller's
/// environment and with stdin from /dev/null; add arguments and environment to taste.
pub fn mvsnap() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mvsnap"));
    c.env_remove("MVSNAP_STORE")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    c
}

/// `mvsnap --store STORE`.
pub fn mvsnap_store(store: &Path) -> Command {
    let mut c = mvsnap();
    c.arg("--store").arg(store);
    c
}

/// Run, require exit status 0 (else fail with its stderr) and return the output.
#[track_caller]
pub fn ok(c: &mut Command) -> Output {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A finished run: exit code, stdout as bytes (it may be an image), stderr as text.
pub struct Run {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Run {
    /// Run `cmd` to the end.
    pub fn of(cmd: &mut Command) -> Run {
        Run::from(cmd.output().expect("run mvsnap"))
    }

    /// Run `cmd` with `stdin` piped in (written from a thread: the child may not read it all).
    pub fn with_stdin(cmd: &mut Command, stdin: &[u8]) -> Run {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run mvsnap");
        let mut pipe = child.stdin.take().unwrap();
        let data = stdin.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
        let out = child.wait_with_output().expect("wait for mvsnap");
        writer.join().unwrap();
        Run::from(out)
    }

    pub fn from(out: Output) -> Run {
        Run {
            code: out.status.code().expect("exited normally"),
            stdout: out.stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    #[track_caller]
    pub fn ok(self) -> Run {
        assert_eq!(self.code, 0, "stderr: {}", self.stderr);
        self
    }

    /// Exit status 1 and exactly one line on stderr, `mvsnap: error: ...` containing `what`.
    #[track_caller]
    pub fn one_line_error(self, what: &str) {
        assert_eq!(self.code, 1, "stderr: {}", self.stderr);
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "stderr: {}", self.stderr);
        assert!(lines[0].starts_with("mvsnap: error: "), "{}", lines[0]);
        assert!(
            lines[0].to_lowercase().contains(&what.to_lowercase()),
            "{:?} does not mention {what:?}",
            lines[0]
        );
    }
}
