//! `snapshot create --freeze` never leaves a filesystem frozen. The store lives on the very
//! ext4 being frozen (on a loop device over a plain file), so the snapshot's own journal write
//! blocks until the thaw: the command is stuck while frozen, exactly the case the thaw on
//! SIGINT and at `--freeze-timeout` exists for. Both are checked: the exit status, the message,
//! the filesystem writable again, and the store clean.
//!
//! Needs root and loop devices (skipped with the reason otherwise).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// A loop device with an ext4 mounted on it; on drop: thawed (in case), unmounted, detached.
struct FrozenFs {
    dev: String,
    dir: PathBuf,
    /// Writers stuck on the frozen filesystem: killed and reaped only after the thaw (a
    /// process blocked by a freeze cannot die before it).
    stuck: std::cell::RefCell<Vec<ChildGuard>>,
}

impl FrozenFs {
    fn new(image: &Path, dir: &Path) -> FrozenFs {
        std::fs::File::create(image)
            .unwrap()
            .set_len(256 * MIB)
            .unwrap();
        let dev = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(image))
            .trim()
            .to_string();
        let f = FrozenFs {
            dev,
            dir: dir.to_path_buf(),
            stuck: Default::default(),
        };
        run_ok(Command::new("mkfs.ext4").arg("-q").arg(&f.dev));
        std::fs::create_dir_all(dir).unwrap();
        run_ok(Command::new("mount").arg(&f.dev).arg(dir));
        f
    }

    /// A file written and fsynced in a child process within `limit` (a frozen filesystem
    /// would block it).
    fn writable_within(&self, limit: Duration) -> bool {
        let mut c = ChildGuard::spawn(
            Command::new("dd")
                .arg("if=/dev/zero")
                .arg(format!("of={}", self.dir.join("probe").display()))
                .args(["bs=4k", "count=1", "conv=fsync"]),
        );
        let t = Instant::now();
        while t.elapsed() < limit {
            if !c.running() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stuck.borrow_mut().push(c);
        false
    }
}

impl Drop for FrozenFs {
    fn drop(&mut self) {
        // Thawing what is not frozen fails harmlessly.
        let _ = run(
            Command::new("fsfreeze").arg("-u").arg(&self.dir),
            Duration::from_secs(10),
        );
        let _ = run(
            Command::new("umount").arg(&self.dir),
            Duration::from_secs(30),
        );
        let _ = run(
            Command::new("losetup").arg("-d").arg(&self.dev),
            Duration::from_secs(30),
        );
    }
}

#[test]
fn a_stuck_snapshot_is_thawed_on_sigint_and_at_the_timeout() {
    let [_losetup, _mkfs, _fsfreeze, _dd] = need!("losetup", "mkfs.ext4", "fsfreeze", "dd");
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/loop-control").exists() {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "skipped: needs root and loop devices");
        return;
    }
    let _ = mvsnap_bin();
    // Dropped in reverse: the daemon, the fixture's directory, the filesystem, its directory.
    let fs_dir = TestDir::new("freezefs");
    let fs = FrozenFs::new(&fs_dir.join("fs.img"), &fs_dir.join("fs"));
    // The store and the origin on the filesystem being frozen.
    let fx = Fixture::at(
        TestDir::new("freeze"),
        fs.dir.join("store.img"),
        fs.dir.join("disk0.img"),
        16 * MIB,
        "64M",
    );
    let d = fx.start();
    let mnt = fs.dir.to_str().unwrap().to_string();

    // SIGINT while the snapshot is stuck behind the freeze.
    let mut c = fx.mvsnap();
    c.args([
        "snapshot", "create", "disk0", "--tag", "int", "--freeze", &mnt,
    ]);
    let mut snap = ChildGuard::spawn(&mut c);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        snap.running(),
        "the snapshot was not held up by the freeze: {}",
        text(&snap.output(Duration::from_secs(10)))
    );
    assert!(
        !fs.writable_within(Duration::from_millis(300)),
        "the filesystem is not frozen"
    );
    let pid = snap.0.as_ref().unwrap().id();
    // SAFETY: kill(2) on our own child, not reaped yet.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGINT) }, 0);
    let out = snap.output(Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(130), "exit status after SIGINT");
    assert!(
        text(&out).contains("interrupted") && text(&out).contains("thawed"),
        "{}",
        text(&out)
    );
    assert!(
        fs.writable_within(Duration::from_secs(10)),
        "still frozen after SIGINT"
    );

    // The deadline thaws too, and the command says the snapshot may not be clean.
    let t = Instant::now();
    let out = fx.ms(&[
        "snapshot",
        "create",
        "disk0",
        "--tag",
        "late",
        "--freeze",
        &mnt,
        "--freeze-timeout",
        "2",
    ]);
    let took = t.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("--freeze-timeout"),
        "no word of the timeout: {}",
        text(&out)
    );
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(30),
        "thawed after {took:?}"
    );
    assert!(
        fs.writable_within(Duration::from_secs(10)),
        "still frozen after the timeout"
    );

    fx.assert_check_clean("after the thaws");
    let st = d.terminate();
    assert!(st.success(), "daemon exit status after SIGTERM: {st}");
}
