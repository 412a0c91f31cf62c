//! Black-box tests of the `mvsnap` binary: exit statuses, one-line errors, and a round trip
//! through format, origin add, write, snapshot, cat, list and check. The longer scenario lives in
//! scripts/cli-test.sh.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

struct Run {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
}

impl Run {
    fn from(out: Output) -> Run {
        Run {
            code: out.status.code().expect("exited normally"),
            stdout: out.stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    #[track_caller]
    fn ok(self) -> Run {
        assert_eq!(self.code, 0, "stderr: {}", self.stderr);
        self
    }

    /// Exit status 1 and exactly one line on stderr, `mvsnap: error: ...` containing `what`.
    #[track_caller]
    fn one_line_error(self, what: &str) {
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

fn mvsnap(args: &[&str]) -> Run {
    mvsnap_stdin(args, &[])
}

fn mvsnap_stdin(args: &[&str], stdin: &[u8]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mvsnap"))
        .args(args)
        .env_remove("MVSNAP_STORE")
        .env_remove("RUST_LOG")
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

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

#[test]
fn every_command_has_help_with_examples() {
    for cmd in [
        &[][..],
        &["format"],
        &["origin"],
        &["origin", "add"],
        &["origin", "remove"],
        &["origin", "list"],
        &["snapshot"],
        &["snapshot", "create"],
        &["snapshot", "delete"],
        &["snapshot", "list"],
        &["cat"],
        &["write"],
        &["check"],
        &["info"],
    ] {
        let mut args = cmd.to_vec();
        args.push("--help");
        let run = mvsnap(&args).ok();
        assert!(
            run.stdout_str().contains("\nExamples:\n"),
            "mvsnap {cmd:?} --help has no examples"
        );
    }
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(mvsnap(&["snapshot", "list"]).code, 2, "no store");
    assert_eq!(mvsnap(&["format", "x.img", "--size", "10X"]).code, 2);
    assert_eq!(mvsnap(&["format", "x.img", "--size", "1.5G"]).code, 2);
    assert_eq!(mvsnap(&["--store", "x.img", "write", "disk"]).code, 2);
    assert_eq!(mvsnap(&["no-such-command"]).code, 2);
}

#[test]
fn bad_stores_give_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.img");
    std::fs::write(&junk, pattern(1 << 20, 7)).unwrap();
    mvsnap(&["--store", s(&junk), "snapshot", "list"]).one_line_error("not an mvsnap store");
    assert_eq!(
        std::fs::read(&junk).unwrap(),
        pattern(1 << 20, 7),
        "junk changed"
    );
    let missing = dir.path().join("missing.img");
    mvsnap(&["--store", s(&missing), "info"]).one_line_error("missing.img");
    let new = dir.path().join("new.img");
    mvsnap(&["format", s(&new), "--chunk-size", "3K"]).one_line_error("chunk size");
    assert!(!new.exists(), "an invalid chunk size created the store");
}

#[test]
fn round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store.img");
    let disk = dir.path().join("disk.img");
    let st = s(&store);
    const SIZE: usize = 4 << 20;
    let v1 = pattern(SIZE, 1);
    std::fs::write(&disk, &v1).unwrap();

    mvsnap(&["format", st, "--size", "32M", "--chunk-size", "16K"]).ok();
    let run = mvsnap(&["--store", st, "origin", "add", s(&disk)]).ok();
    assert_eq!(run.stdout_str().trim(), "disk.img", "default id");
    let run = mvsnap(&[
        "--store", st, "snapshot", "create", "disk.img", "--tag", "a",
    ])
    .ok();
    assert_eq!(run.stdout_str(), "a\n");

    // Overwrite 1.5 MiB at an unaligned offset through the engine.
    let patch = pattern(3 << 19, 2);
    let off = 100_000;
    mvsnap_stdin(
        &["--store", st, "write", "disk.img", "--offset", "100000"],
        &patch,
    )
    .ok();
    let mut v2 = v1.clone();
    v2[off..off + patch.len()].copy_from_slice(&patch);

    let cat = |name: &str| mvsnap(&["--store", st, "cat", name]).ok().stdout;
    assert!(cat("disk.img@a") == v1, "the snapshot changed");
    assert!(
        cat("disk.img") == v2,
        "the origin does not read what was written"
    );
    assert!(std::fs::read(&disk).unwrap() == v2, "the origin file");
    let part = mvsnap(&[
        "--store",
        st,
        "cat",
        "disk.img@a",
        "--offset",
        "64K",
        "--length",
        "5000",
    ])
    .ok()
    .stdout;
    assert!(part == v1[65536..65536 + 5000]);

    mvsnap_stdin(
        &["--store", st, "write", "disk.img@a", "--offset", "0"],
        b"x",
    )
    .one_line_error("read-only");
    mvsnap(&[
        "--store", st, "snapshot", "create", "disk.img", "--tag", "a",
    ])
    .one_line_error("already exists");

    let list = mvsnap(&["--store", st, "snapshot", "list", "--json"]).ok();
    let json: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let snaps = json.as_array().unwrap();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0]["name"], "disk.img@a");
    assert_eq!(snaps[0]["parent"], "disk.img");
    assert_eq!(snaps[0]["state"], "valid");

    let table = mvsnap(&["--store", st, "snapshot", "list"])
        .ok()
        .stdout_str();
    assert!(table.starts_with("NAME "), "{table}");
    assert!(table.contains("disk.img@a"), "{table}");

    let check = mvsnap(&["--store", st, "check"]).ok().stdout_str();
    assert!(check.contains("clean"), "{check}");
    let info = mvsnap(&["--store", st, "info", "--json"]).ok();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["chunk_size"], 16384);

    mvsnap(&["--store", st, "snapshot", "delete", "disk.img@a"]).ok();
    let list = mvsnap(&["--store", st, "snapshot", "list", "--json"]).ok();
    let json: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 0);
    mvsnap(&["--store", st, "check"]).ok();
}
