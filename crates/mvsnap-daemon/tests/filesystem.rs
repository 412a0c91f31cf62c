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
    blockdev: PathBuf,
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
    let [nbdfuse, fusermount, losetup, mkfs, e2fsck, _mount, _umount, blockdev] = need!(
        "nbdfuse",
        "fusermount3",
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "mount",
        "umount",
        "blockdev"
    );
    need_root!();
    let t = Tools {
        nbdfuse,
        fusermount,
        losetup,
        mkfs,
        e2fsck,
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
    let mut lo_o = Loop::attach(&t.losetup, &fuse_o.file(), false, false);
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
    let m = Mnt::new("ext4", lo_o.dev(), &fx.dir.join("mnt-origin"), None);
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
    let mut m = Mnt::new("ext4", lo_o.dev(), &fx.dir.join("mnt-origin"), None);
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
    let mut lo_s = Loop::attach(&t.losetup, &fuse_s.file(), true, false);
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
    let mut ms = Mnt::new(
        "ext4",
        lo_s.dev(),
        &fx.dir.join("mnt-snap"),
        Some("ro,noload"),
    );
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
    let mut mo = Mnt::new(
        "ext4",
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
