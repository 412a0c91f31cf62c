//! `mvsnap cat` to a regular file is sparse (holes skipped, as `cp --sparse`), reads the right
//! bytes, refuses a terminal, and shows a progress bar on a terminal only; and the other
//! commands' terminal behaviour (run on a pseudo-terminal with `script`): `write`'s progress
//! bar and refusal of a terminal stdin, `snapshot delete -r`'s confirmation.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{mvsnap_store as mvsnap, ok};

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(73).wrapping_add(seed) | 1)
        .collect()
}

/// `script` (util-linux) runs a command on a pseudo-terminal.
fn script() -> Option<&'static str> {
    if Path::new("/usr/bin/script").exists() {
        return Some("/usr/bin/script");
    }
    if std::env::var("MVSNAP_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!("script (util-linux) not found and MVSNAP_REQUIRE_TOOLS=1");
    }
    eprintln!("skipped: script not found");
    None
}

const SIZE: usize = 128 << 20;

/// A 128 MiB origin, a hole but for 3 MiB at 10 MiB; snapshot `t`; then 2 MiB overwritten at
/// 11 MiB and 1 MiB written at 100 MiB. Returns the snapshot's expected bytes.
fn setup(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let store = dir.join("s.img");
    let disk = dir.join("d.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(SIZE as u64)
        .unwrap();
    ok(mvsnap(&store)
        .args(["format"])
        .arg(&store)
        .args(["--size", "64M"]));
    ok(mvsnap(&store)
        .args(["origin", "add"])
        .arg(&disk)
        .args(["--id", "d"]));
    let write = |data: &[u8], off: &str| {
        let f = dir.join("patch");
        std::fs::write(&f, data).unwrap();
        ok(mvsnap(&store)
            .args(["write", "d", "--offset", off])
            .stdin(std::fs::File::open(&f).unwrap()));
    };
    let p1 = pattern(3 << 20, 1);
    write(&p1, "10M");
    ok(mvsnap(&store).args(["snapshot", "create", "d", "--tag", "t"]));
    write(&pattern(2 << 20, 2), "11M");
    write(&pattern(1 << 20, 3), "100M");
    let mut want = vec![0u8; SIZE];
    want[10 << 20..13 << 20].copy_from_slice(&p1);
    (store, want)
}

#[test]
fn cat_to_a_file_is_sparse_and_exact() {
    let dir = tempfile::tempdir().unwrap();
    let (store, want) = setup(dir.path());

    let out = dir.path().join("t.img");
    let out_file = std::fs::File::create(&out).unwrap();
    let run = ok(mvsnap(&store)
        .args(["cat", "d@t"])
        .stdout(out_file)
        .stderr(Stdio::piped()));
    assert!(run.stderr.is_empty(), "no progress off a terminal");
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len(), SIZE);
    assert!(got == want, "cat d@t > file: wrong bytes");
    let meta = std::fs::metadata(&out).unwrap();
    let allocated = meta.blocks() * 512;
    assert!(
        allocated <= 8 << 20,
        "{allocated} bytes allocated for 3 MiB of data in {SIZE}"
    );

    // --progress json: JSON lines on stderr, the last one complete.
    let json_file = dir.path().join("j.img");
    let run = ok(mvsnap(&store)
        .args(["cat", "d@t", "--progress", "json"])
        .stdout(std::fs::File::create(&json_file).unwrap())
        .stderr(Stdio::piped()));
    let lines: Vec<serde_json::Value> = String::from_utf8(run.stderr)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last = lines.last().expect("a progress line");
    assert_eq!(last["op"], "cat");
    assert_eq!(last["done"], SIZE as u64);
    assert_eq!(last["total"], SIZE as u64);
    assert!(std::fs::read(&json_file).unwrap() == want);
    let run = ok(mvsnap(&store)
        .args(["check", "--progress", "json"])
        .stderr(Stdio::piped()));
    let text = String::from_utf8(run.stderr).unwrap();
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(v, serde_json::json!({"op": "check", "done": true}));

    // A range ending in a hole: the file still gets its full length.
    let part = dir.path().join("part.img");
    ok(mvsnap(&store)
        .args(["cat", "d@t", "--offset", "12M", "--length", "5M"])
        .stdout(std::fs::File::create(&part).unwrap()));
    assert!(std::fs::read(&part).unwrap() == want[12 << 20..17 << 20]);

    // The same bytes through a pipe, and with --sparse never (every byte written).
    let piped = ok(mvsnap(&store).args(["cat", "d@t"]).stderr(Stdio::piped()));
    assert!(piped.stdout == want, "cat d@t | ...: wrong bytes");
    assert!(piped.stderr.is_empty());
    let full = dir.path().join("full.img");
    ok(mvsnap(&store)
        .args(["cat", "d@t", "--sparse", "never"])
        .stdout(std::fs::File::create(&full).unwrap()));
    assert!(std::fs::read(&full).unwrap() == want);
    let full_blocks = std::fs::metadata(&full).unwrap().blocks() * 512;
    assert!(
        full_blocks > allocated * 4,
        "--sparse never allocated {full_blocks}, sparse {allocated}"
    );

    // `>>` (O_APPEND) cannot seek: the appended copy must still be exact.
    let appended = dir.path().join("app.img");
    std::fs::write(&appended, b"head").unwrap();
    let f = std::fs::OpenOptions::new()
        .append(true)
        .open(&appended)
        .unwrap();
    ok(mvsnap(&store).args(["cat", "d@t"]).stdout(f));
    let got = std::fs::read(&appended).unwrap();
    assert!(&got[..4] == b"head" && got[4..] == want[..], "cat >> file");

    // The origin, written after the snapshot, reads its new bytes, sparsely too.
    let origin = dir.path().join("o.img");
    ok(mvsnap(&store)
        .args(["cat", "d"])
        .stdout(std::fs::File::create(&origin).unwrap()));
    let got = std::fs::read(&origin).unwrap();
    assert!(got[11 << 20..13 << 20] == pattern(2 << 20, 2)[..]);
    assert!(got[100 << 20..101 << 20] == pattern(1 << 20, 3)[..]);
    assert!(got[..10 << 20].iter().all(|&b| b == 0));
    assert!(std::fs::metadata(&origin).unwrap().blocks() * 512 <= 12 << 20);
}

#[test]
fn cat_refuses_a_terminal_and_shows_progress_on_one() {
    let Some(script) = script() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (store, want) = setup(dir.path());
    let bin = env!("CARGO_BIN_EXE_mvsnap");
    let st = store.to_str().unwrap();

    // stdout and stderr on a terminal: refused, exit 1.
    let out = Command::new(script)
        .args(["-qec", &format!("{bin} --store {st} cat d@t"), "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("refusing to write a volume to a terminal"),
        "{text}"
    );
    assert!(
        text.len() < 1000,
        "volume data on the terminal: {} bytes",
        text.len()
    );

    // stdout to a file, stderr on the terminal: a progress bar, and the right bytes.
    let file = dir.path().join("t.img");
    let out = Command::new(script)
        .args([
            "-qec",
            &format!("{bin} --store {st} cat d@t > {}", file.display()),
            "/dev/null",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("cat d@t"), "no progress bar: {text:?}");
    assert!(std::fs::read(&file).unwrap() == want);

    // write on a terminal shows one too.
    let patch = dir.path().join("patch");
    std::fs::write(&patch, pattern(4 << 20, 9)).unwrap();
    let out = Command::new(script)
        .args([
            "-qec",
            &format!(
                "{bin} --store {st} write d --offset 0 < {}",
                patch.display()
            ),
            "/dev/null",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("write d"), "no progress bar: {text:?}");
}

/// Through a running daemon (`serve`), cat to a file is sparse and exact too: the block status
/// comes over the control socket.
#[test]
fn cat_through_a_daemon_is_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let (store, want) = setup(dir.path());
    let run_dir = dir.path().join("run");
    let out = ok(mvsnap(&store)
        .env("MVSNAP_RUNTIME_DIR", &run_dir)
        .args(["serve", "--detach"]));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let pid: i32 = text
        .lines()
        .find_map(|l| l.strip_prefix("pid "))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid in {text:?}"));
    /// Stops the daemon however the test ends.
    struct Daemon(i32);
    impl Drop for Daemon {
        fn drop(&mut self) {
            // SAFETY: kill(2) on the pid of the daemon this test started.
            unsafe { libc::kill(self.0, libc::SIGTERM) };
            for _ in 0..100 {
                if !Path::new(&format!("/proc/{}", self.0)).exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
    let _daemon = Daemon(pid);

    let file = dir.path().join("t.img");
    let run = ok(mvsnap(&store)
        .env("MVSNAP_RUNTIME_DIR", &run_dir)
        .args(["-vv", "cat", "d@t"])
        .stdout(std::fs::File::create(&file).unwrap())
        .stderr(Stdio::piped()));
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(
        log.contains("using the daemon"),
        "not through the daemon: {log}"
    );
    assert!(!log.contains("no block status"), "holes were read: {log}");
    assert!(std::fs::read(&file).unwrap() == want, "wrong bytes");
    let allocated = std::fs::metadata(&file).unwrap().blocks() * 512;
    assert!(allocated <= 8 << 20, "{allocated} bytes allocated");
}

/// On a terminal, `snapshot delete -r` asks first and deletes only on `y`; `write` refuses to
/// read its data from the terminal.
#[test]
fn delete_r_asks_on_a_terminal() {
    let Some(script) = script() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = setup(dir.path());
    ok(mvsnap(&store).args(["snapshot", "create", "d@t", "--tag", "u"]));
    let bin = env!("CARGO_BIN_EXE_mvsnap");
    let st = store.to_str().unwrap();
    let on_tty = |cmd: &str, input: &str| {
        let mut child = Command::new(script)
            .args(["-qec", &format!("{bin} --store {st} {cmd}"), "/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        // The answer once the prompt is up; `script` passes it on to the pseudo-terminal.
        std::thread::sleep(std::time::Duration::from_millis(500));
        let _ = stdin.write_all(input.as_bytes());
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let names = || {
        let out = ok(mvsnap(&store).args(["snapshot", "list", "-H", "-o", "name"]));
        String::from_utf8(out.stdout).unwrap()
    };
    let (code, text) = on_tty("snapshot delete -r d@t", "n\n");
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("d@u") && text.contains("[y/N]"), "{text}");
    assert!(text.contains("not confirmed"), "{text}");
    assert_eq!(names(), "d@t\nd@u\n");
    let (code, text) = on_tty("snapshot delete -r d@t", "y\n");
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(names(), "");

    let (code, text) = on_tty("write d --offset 0", "");
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("refusing to read the data from a terminal"),
        "{text}"
    );
}
