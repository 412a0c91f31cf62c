//! A real filesystem on an mvsnap origin: nbdfuse exposes the export as a file, losetup turns
//! it into a block device, mkfs.ext4 and mount. Files are written (SHA-256 known), the
//! filesystem is unmounted and flushed, a snapshot is taken, then files are changed and
//! deleted. The snapshot is exposed the same way, read-only: `e2fsck -fn` finds it clean, and
//! mounted read-only it holds the old files intact; the origin holds the new ones.
//!
//! Needs root, /dev/fuse and loop devices. Without them the test says why and returns, even
//! under `MVSNAP_REQUIRE_TOOLS=1` (which only makes *missing tools* fail).
//!
//! Everything is torn down by guards, innermost first, also when the test fails: unmount,
//! `losetup -d`, `fusermount3 -u`, then the daemon.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const SIZE: u64 = 64 * MIB;

struct Tools {
    nbdfuse: PathBuf,
    fusermount: PathBuf,
    losetup: PathBuf,
    mkfs: PathBuf,
    e2fsck: PathBuf,
    mount: PathBuf,
    umount: PathBuf,
    blockdev: PathBuf,
}

/// Why this machine cannot run the test (not root, no FUSE, no loop devices), if it cannot.
fn missing_privileges() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (mount, losetup and FUSE need it)".into());
    }
    for dev in ["/dev/fuse", "/dev/loop-control"] {
        if !Path::new(dev).exists() {
            return Some(format!("{dev} does not exist"));
        }
    }
    None
}

/// Try a few times: a just-closed device or mount may still be busy for a moment.
fn retry(what: &str, mut f: impl FnMut() -> bool) -> bool {
    for i in 0..20 {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100 * (i + 1).min(5)));
    }
    eprintln!("giving up: {what}");
    false
}

fn quiet(cmd: &mut Command) -> bool {
    run(cmd, Duration::from_secs(60)).status.success()
}

/// `nbdfuse [-r] DIR URI`: the export as the file DIR/nbd. Unmounted on drop.
struct Fuse {
    dir: PathBuf,
    child: Option<Child>,
    fusermount: PathBuf,
}

impl Fuse {
    fn mount(t: &Tools, dir: &Path, uri: &str, read_only: bool, log: &Path) -> Fuse {
        std::fs::create_dir_all(dir).unwrap();
        let pidfile = dir.with_extension("pid");
        let mut c = Command::new(&t.nbdfuse);
        if read_only {
            c.arg("-r");
        }
        c.arg("-P").arg(&pidfile).arg(dir).arg(uri);
        eprintln!("$ {c:?}");
        let child = c
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .expect("spawn nbdfuse");
        let mut f = Fuse {
            dir: dir.to_path_buf(),
            child: Some(child),
            fusermount: t.fusermount.clone(),
        };
        let start = Instant::now();
        while !(pidfile.exists() && dir.join("nbd").exists()) {
            if let Some(st) = f.child.as_mut().unwrap().try_wait().unwrap() {
                f.child = None;
                panic!(
                    "nbdfuse exited ({st}): {}",
                    std::fs::read_to_string(log.with_extension("err")).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "nbdfuse not ready after 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        f
    }

    fn file(&self) -> PathBuf {
        self.dir.join("nbd")
    }

    fn unmount(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let fm = self.fusermount.clone();
        let dir = self.dir.clone();
        if !retry("fusermount3 -u", || {
            quiet(Command::new(&fm).arg("-u").arg(&dir))
        }) {
            quiet(Command::new(&fm).arg("-uz").arg(&dir));
        }
        if wait_timeout(&mut child, Duration::from_secs(20)).is_none() {
            eprintln!("nbdfuse did not exit after fusermount3 -u: killing it");
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Fuse {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// `losetup -f --show [-r] FILE`; detached on drop.
struct Loop {
    dev: Option<String>,
    losetup: PathBuf,
}

impl Loop {
    fn attach(t: &Tools, file: &Path, read_only: bool) -> Loop {
        let mut c = Command::new(&t.losetup);
        c.args(["-f", "--show"]);
        if read_only {
            c.arg("-r");
        }
        let out = run_ok(c.arg(file));
        let dev = out.trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        Loop {
            dev: Some(dev),
            losetup: t.losetup.clone(),
        }
    }

    fn dev(&self) -> &str {
        self.dev.as_deref().unwrap()
    }

    fn detach(&mut self) {
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

/// `mount [-o OPTS] DEV DIR`; unmounted on drop.
struct Mount {
    dir: Option<PathBuf>,
    umount: PathBuf,
}

impl Mount {
    fn new(t: &Tools, dev: &str, dir: &Path, opts: Option<&str>) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        let mut c = Command::new(&t.mount);
        if let Some(o) = opts {
            c.arg("-o").arg(o);
        }
        run_ok(c.args(["-t", "ext4"]).arg(dev).arg(dir));
        Mount {
            dir: Some(dir.to_path_buf()),
            umount: t.umount.clone(),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.as_ref().unwrap().join(p)
    }

    fn unmount(&mut self) {
        if let Some(dir) = self.dir.take() {
            let u = self.umount.clone();
            if !retry("umount", || quiet(Command::new(&u).arg(&dir))) {
                quiet(Command::new(&u).arg("-l").arg(&dir));
            }
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// Push everything the block device holds to the NBD server: fsync of the loop device
/// reaches the FUSE file, whose fsync nbdfuse turns into an NBD flush.
fn flush(t: &Tools, lo: &Loop) {
    run_ok(Command::new(&t.blockdev).arg("--flushbufs").arg(lo.dev()));
}

fn sha_of(p: &Path) -> Option<String> {
    std::fs::read(p).ok().map(|d| sha256(&d))
}

#[test]
fn ext4_on_nbdfuse_loop_snapshot_keeps_old_files() {
    let [nbdfuse, fusermount, losetup, mkfs, e2fsck, mount, umount, blockdev] = need!(
        "nbdfuse",
        "fusermount3",
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "mount",
        "umount",
        "blockdev"
    );
    if let Some(why) = missing_privileges() {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "skipped: {why}");
        return;
    }
    let t = Tools {
        nbdfuse,
        fusermount,
        losetup,
        mkfs,
        e2fsck,
        mount,
        umount,
        blockdev,
    };
    let fx = Fixture::new("fs", SIZE, &[]);
    // Declared in this order so they drop in reverse: mounts, loops, FUSE, then the daemon.
    let d = fx.start();

    let mut fuse_o = Fuse::mount(
        &t,
        &fx.dir.join("fuse-origin"),
        &fx.uri("disk0"),
        false,
        &fx.dir.join("nbdfuse-origin.log"),
    );
    let mut lo_o = Loop::attach(&t, &fuse_o.file(), false);
    run_ok(
        Command::new(&t.mkfs)
            .args(["-q", "-E", "nodiscard", "-L", "mvsnap"])
            .arg(lo_o.dev()),
    );

    // Files with known content.
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("small", pattern_bytes(1, 4096)),
        ("one-mib", pattern_bytes(2, MIB as usize)),
        ("odd", pattern_bytes(3, 3 * MIB as usize + 123)),
        ("dir/nested", pattern_bytes(4, 10_000)),
        ("text", b"hello from mvsnap\n".to_vec()),
    ];
    let m = Mount::new(&t, lo_o.dev(), &fx.dir.join("mnt-origin"), None);
    std::fs::create_dir_all(m.path("dir")).unwrap();
    for (name, data) in &files {
        std::fs::write(m.path(name), data).unwrap();
    }
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    let mut m = m;
    m.unmount();
    flush(&t, &lo_o);

    fx.snapshot("disk0", "fs1", false, "ext4 with five files");

    // Change the origin: overwrite, delete, append, create.
    let mut m = Mount::new(&t, lo_o.dev(), &fx.dir.join("mnt-origin"), None);
    let small2 = pattern_bytes(11, 8192);
    std::fs::write(m.path("small"), &small2).unwrap();
    std::fs::remove_file(m.path("one-mib")).unwrap();
    let mut odd2 = files[2].1.clone();
    odd2.extend_from_slice(&pattern_bytes(12, 500_000));
    std::fs::write(m.path("odd"), &odd2).unwrap();
    std::fs::remove_dir_all(m.path("dir")).unwrap();
    let newfile = pattern_bytes(13, 2 * MIB as usize);
    std::fs::write(m.path("new"), &newfile).unwrap();
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    m.unmount();
    flush(&t, &lo_o);

    // The snapshot, the same way, read-only.
    let mut fuse_s = Fuse::mount(
        &t,
        &fx.dir.join("fuse-snap"),
        &fx.uri("disk0@fs1"),
        true,
        &fx.dir.join("nbdfuse-snap.log"),
    );
    let mut lo_s = Loop::attach(&t, &fuse_s.file(), true);
    let out = run(
        Command::new(&t.e2fsck).args(["-fn"]).arg(lo_s.dev()),
        TOOL_TIMEOUT,
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "e2fsck -fn of the snapshot is not clean: {}",
        text(&out)
    );
    let mut ms = Mount::new(&t, lo_s.dev(), &fx.dir.join("mnt-snap"), Some("ro,noload"));
    for (name, data) in &files {
        assert_eq!(
            sha_of(&ms.path(name)),
            Some(sha256(data)),
            "{name} in the snapshot"
        );
    }
    assert!(
        !ms.path("new").exists(),
        "a file created later is in the snapshot"
    );

    // The origin has the changes, and is clean too.
    let out = run(
        Command::new(&t.e2fsck).args(["-fn"]).arg(lo_o.dev()),
        TOOL_TIMEOUT,
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "e2fsck -fn of the origin: {}",
        text(&out)
    );
    let mut mo = Mount::new(
        &t,
        lo_o.dev(),
        &fx.dir.join("mnt-origin"),
        Some("ro,noload"),
    );
    assert_eq!(sha_of(&mo.path("small")), Some(sha256(&small2)));
    assert_eq!(sha_of(&mo.path("one-mib")), None, "deleted");
    assert_eq!(sha_of(&mo.path("odd")), Some(sha256(&odd2)));
    assert!(!mo.path("dir").exists(), "deleted");
    assert_eq!(sha_of(&mo.path("new")), Some(sha256(&newfile)));
    assert_eq!(sha_of(&mo.path("text")), Some(sha256(&files[4].1)));

    // Orderly teardown (the guards would do the same on a failure).
    mo.unmount();
    ms.unmount();
    lo_s.detach();
    lo_o.detach();
    fuse_s.unmount();
    fuse_o.unmount();
    assert!(
        mounts_below(&fx.dir.path).is_empty(),
        "still mounted: {:?}",
        mounts_below(&fx.dir.path)
    );
    fx.assert_check_clean("after the filesystem test");
    let st = d.terminate();
    assert!(st.success(), "daemon exit status after SIGTERM: {st}");
}
