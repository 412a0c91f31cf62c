//! The volumes as files: `mvsnap serve --mount DIR` with real tools on top.
//!
//! - The files: names, sizes, modes; reads and writes through a file and through NBD (nbdcopy,
//!   qemu-io) on the same volume at once see the same bytes; fsync, punch-hole, zero-range and
//!   SEEK_DATA/SEEK_HOLE; a snapshot made over the control socket appears as a file within a
//!   second, is read-only, and cannot be deleted while its file is open (unless forced: the
//!   open file then fails its I/O).
//! - ext4 on `losetup` of the origin's file (buffered and --direct-io=on): a writer thread
//!   writes files with known SHA-256 and fsyncs them while snapshots are taken with
//!   `--freeze` and without; each frozen snapshot's loop device passes `e2fsck -fn` and mounts
//!   with `-o ro,noload` holding every file fsynced before it; an unfrozen one (crash
//!   consistent) does after its journal is replayed in a writable child. xfs too where
//!   mkfs.xfs exists: frozen snapshots mount `-o ro,norecovery` with every file, and
//!   `xfs_repair -n` is clean after a replay (a frozen xfs keeps lazy superblock counters).
//! - fio with verify through the loop device; then the same bytes through NBD.
//! - SIGKILL of the daemon under fio load: the next `serve --mount` on the same directory
//!   clears the stale mount, `check` is clean, the snapshot taken before is intact.
//!
//! Needs root, /dev/fuse and loop devices (skipped with the reason otherwise). Every loop
//! device and mount is released by guards, innermost first, also when a test fails.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// The FUSE mount directory: on drop, a mount still there (a killed daemon's) is detached.
struct MountDir(PathBuf);

impl MountDir {
    fn new(fx: &Fixture) -> MountDir {
        MountDir(fx.dir.join("vols"))
    }

    fn arg(&self) -> &str {
        self.0.to_str().unwrap()
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// File names in the directory, sorted.
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn mounted(&self) -> bool {
        mounts_below(&self.0).iter().any(|m| Path::new(m) == self.0)
    }
}

impl Drop for MountDir {
    fn drop(&mut self) {
        if self.mounted() {
            eprintln!("{} still mounted: umount -l", self.0.display());
            quiet(Command::new("umount").arg("-l").arg(&self.0));
        }
    }
}

/// Wait until `f` holds, at most `limit`; how long it took, or None.
fn within(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t = Instant::now();
    loop {
        if f() {
            return Some(t.elapsed());
        }
        if t.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn lseek(f: &std::fs::File, off: i64, whence: i32) -> Result<i64, i32> {
    // SAFETY: lseek on an open descriptor; no memory is passed.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    } else {
        Ok(r)
    }
}

fn fallocate(f: &std::fs::File, mode: i32, off: u64, len: u64) {
    // SAFETY: fallocate on an open descriptor; no memory is passed.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
    assert_eq!(
        r,
        0,
        "fallocate({mode:#x}, {off}, {len}): {}",
        std::io::Error::last_os_error()
    );
}

fn read_file(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

#[test]
fn files_list_sizes_modes_and_match_nbd() {
    let [qemu_io, nbdcopy] = need!("qemu-io", "nbdcopy");
    need_root!();
    const SIZE: u64 = 16 * MIB;
    let content = pattern_bytes(1, MIB as usize);
    let fx = Fixture::new("fuse-files", SIZE, &content);
    let vols = MountDir::new(&fx);
    let d = fx.start_with(&["--mount", vols.arg()], &[]);
    assert!(
        d.ready.contains(&format!("mount={}", vols.arg())),
        "readiness line: {}",
        d.ready
    );
    let mut model = content.clone();
    model.resize(SIZE as usize, 0);

    assert_eq!(vols.names(), vec!["disk0"]);
    let disk = vols.file("disk0");
    let md = std::fs::metadata(&disk).unwrap();
    assert!(md.is_file());
    assert_eq!(md.len(), SIZE);
    assert_eq!(md.permissions().mode() & 0o777, 0o644);
    assert_image("origin file at start", &read_file(&disk), &model);

    // SEEK_DATA/SEEK_HOLE: the origin's allocation, as the image file's own.
    let f = std::fs::File::open(&disk).unwrap();
    let img = std::fs::File::open(&fx.origin).unwrap();
    for off in [0, 4096, MIB as i64 - 1, MIB as i64, 5 * MIB as i64] {
        for whence in [libc::SEEK_DATA, libc::SEEK_HOLE] {
            assert_eq!(
                lseek(&f, off, whence),
                lseek(&img, off, whence),
                "lseek({off}, {whence}) of the file vs the image"
            );
        }
    }
    assert_eq!(lseek(&f, 0, libc::SEEK_DATA), Ok(0));
    assert_eq!(lseek(&f, SIZE as i64, libc::SEEK_DATA), Err(libc::ENXIO));
    drop(f);

    // Writes through the file (unaligned too), fsync; NBD sees them.
    let rw = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    let mut rng = Rng::from_env("fuse files");
    for (off, len) in [
        (3 * MIB + 123, MIB as usize),
        (8 * MIB, 4096),
        (SIZE - 4096, 4096),
    ] {
        let mut b = vec![0u8; len];
        rng.fill(&mut b);
        rw.write_all_at(&b, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&b);
    }
    rw.sync_all().unwrap();
    assert_image(
        "origin through NBD",
        &fx.nbdcopy_read(&nbdcopy, "disk0"),
        &model,
    );

    // Through NBD while the file is open: the file sees it (no stale page cache).
    fx.qemu_io(
        &qemu_io,
        "disk0",
        false,
        &["write -P 0x5a 5M 512K".into(), "flush".into()],
    );
    fill(&mut model, 5 * MIB, 512 * KIB, 0x5a);
    let mut got = vec![0u8; SIZE as usize];
    rw.read_exact_at(&mut got, 0).unwrap();
    assert_image("origin file after an NBD write", &got, &model);

    // Punch hole = trim, zero range = zero_range: zeros, also through NBD.
    fallocate(
        &rw,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        3 * MIB,
        256 * KIB,
    );
    fill(&mut model, 3 * MIB, 256 * KIB, 0);
    fallocate(&rw, libc::FALLOC_FL_ZERO_RANGE, 5 * MIB + 4096, 8192);
    fill(&mut model, 5 * MIB + 4096, 8192, 0);
    rw.sync_all().unwrap();
    assert_image(
        "after punch/zero, NBD",
        &fx.nbdcopy_read(&nbdcopy, "disk0"),
        &model,
    );
    assert_image("after punch/zero, file", &read_file(&disk), &model);
    // A disk does not grow or shrink: a write across the end is cut short, one past it fails.
    assert_eq!(rw.write_at(&[0xab; 4096], SIZE - 2048).unwrap(), 2048);
    fill(&mut model, SIZE - 2048, 2048, 0xab);
    let e = rw.write_at(&[1; 512], SIZE).unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc::ENOSPC),
        "write past the end: {e}"
    );
    let mut tail = [0u8; 4096];
    assert_eq!(rw.read_at(&mut tail, SIZE - 1024).unwrap(), 1024);
    assert_eq!(&tail[..1024], &[0xab; 1024][..]);
    assert_eq!(rw.read_at(&mut tail, SIZE).unwrap(), 0);
    let e = rw.set_len(SIZE + 4096).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "truncate: {e}");

    // A snapshot over the control socket is a file within a second.
    let before = Instant::now();
    fx.snapshot("disk0", "s1", false, "");
    let took = within(Duration::from_secs(1), || vols.file("disk0@s1").exists());
    assert!(
        took.is_some(),
        "disk0@s1 not there 1 s after snapshot create returned ({:?} in all)",
        before.elapsed()
    );
    assert_eq!(vols.names(), vec!["disk0", "disk0@s1"]);
    let snap = vols.file("disk0@s1");
    let md = std::fs::metadata(&snap).unwrap();
    assert_eq!(md.len(), SIZE);
    assert_eq!(md.permissions().mode() & 0o777, 0o444);
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(&snap)
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "open for write: {e}");
    let snap_model = model.clone();

    // The origin changes; the snapshot does not.
    rw.write_all_at(&[0xee; 65536], 0).unwrap();
    rw.sync_all().unwrap();
    fill(&mut model, 0, 65536, 0xee);
    assert_image("snapshot file", &read_file(&snap), &snap_model);
    assert_image(
        "snapshot through NBD",
        &fx.nbdcopy_read(&nbdcopy, "disk0@s1"),
        &snap_model,
    );
    assert_image("origin file", &read_file(&disk), &model);
    drop(rw);

    // Open file: delete refused; closed: deleted, and the file goes.
    let held = std::fs::File::open(&snap).unwrap();
    let out = fx.ms(&["snapshot", "delete", "disk0@s1"]);
    assert!(
        !out.status.success(),
        "delete of an open snapshot succeeded"
    );
    assert!(text(&out).contains("is open"), "{}", text(&out));
    drop(held);
    // The kernel sends RELEASE after close returns: allow it a moment.
    assert!(
        retry("delete after close", || fx
            .ms(&["snapshot", "delete", "disk0@s1"])
            .status
            .success()),
        "delete after the file was closed failed"
    );
    assert!(
        within(Duration::from_secs(1), || vols.names() == vec!["disk0"]).is_some(),
        "disk0@s1 still listed: {:?}",
        vols.names()
    );
    assert!(fx.snapshot_names().is_empty());

    // Forced: a file cannot be closed from the daemon's side, so it is cut off instead: the
    // delete goes through at once, the name goes, and the holder's next read fails (EIO),
    // like a pulled disk's. The origin is untouched.
    let out = fx.ms(&["snapshot", "create", "disk0", "--tag", "s2"]);
    assert!(out.status.success(), "{}", text(&out));
    let s2 = vols.file("disk0@s2");
    assert!(
        within(Duration::from_secs(1), || s2.exists()).is_some(),
        "disk0@s2 not listed: {:?}",
        vols.names()
    );
    let held = std::fs::File::open(&s2).unwrap();
    let mut got = vec![0u8; 65536];
    held.read_exact_at(&mut got, 0).unwrap();
    assert_image("disk0@s2 before the delete", &got, &model[..65536]);
    let out = fx.ms(&["snapshot", "delete", "--force", "disk0@s2"]);
    assert!(out.status.success(), "forced delete: {}", text(&out));
    let e = held.read_exact_at(&mut got, 0).unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc::EIO),
        "read after the forced delete: {e}"
    );
    assert!(
        within(Duration::from_secs(2), || vols.names() == vec!["disk0"]).is_some(),
        "disk0@s2 still listed: {:?}",
        vols.names()
    );
    drop(held);
    assert!(fx.snapshot_names().is_empty());
    assert_image("origin file", &read_file(&disk), &model);

    fx.assert_check_clean("after the file tests");
    let st = d.terminate();
    assert!(st.success(), "daemon exit status after SIGTERM: {st}");
    assert!(!vols.mounted(), "still mounted after SIGTERM");
}

/// Files the writer thread wrote and fsynced, in order: (name, SHA-256).
type Files = Vec<(String, String)>;
type Written = Arc<Mutex<Files>>;

const MAX_FILES: u64 = 120;

/// Write files of random sizes (4 KiB .. 516 KiB, odd sizes too) into `dir`, fsync each, record it;
/// until `stop`.
fn writer(
    dir: PathBuf,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> (Written, std::thread::JoinHandle<()>) {
    let written: Written = Arc::default();
    let w = written.clone();
    let t = std::thread::spawn(move || {
        let mut rng = Rng(seed);
        let mut i = 0u64;
        // Paced and bounded (at most ~60 MiB on a 128 MiB filesystem), so the snapshots fall
        // between files being written.
        while !stop.load(Ordering::Relaxed) {
            if i >= MAX_FILES {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            std::thread::sleep(Duration::from_millis(20));
            let len = 4096 + rng.below(MIB / 2) as usize;
            let data = pattern_bytes(seed ^ (i << 20), len);
            let name = format!("f{i:05}");
            let p = dir.join(&name);
            let f = std::fs::File::create(&p).unwrap();
            f.write_all_at(&data, 0).unwrap();
            f.sync_all().unwrap();
            w.lock().unwrap().push((name, sha256(&data)));
            i += 1;
        }
        // The directory entries too.
        std::fs::File::open(&dir).unwrap().sync_all().unwrap();
    });
    (written, t)
}

/// Every file in `files` is in `mnt` with that SHA-256.
#[track_caller]
fn assert_files(what: &str, mnt: &Mnt, files: &[(String, String)]) {
    for (name, sha) in files {
        let got = std::fs::read(mnt.path(name))
            .map(|d| sha256(&d))
            .unwrap_or_else(|e| format!("unreadable: {e}"));
        assert_eq!(&got, sha, "{what}: {name}");
    }
    eprintln!("{what}: {} files intact", files.len());
}

/// The filesystem on the loop device: how to make, check and mount it.
#[derive(Clone, Copy, PartialEq)]
enum Fs {
    Ext4,
    Xfs,
}

impl Fs {
    fn name(self) -> &'static str {
        match self {
            Fs::Ext4 => "ext4",
            Fs::Xfs => "xfs",
        }
    }

    /// mkfs, then the read-only checker.
    fn tools(self) -> [&'static str; 2] {
        match self {
            Fs::Ext4 => ["mkfs.ext4", "e2fsck"],
            Fs::Xfs => ["mkfs.xfs", "xfs_repair"],
        }
    }

    /// xfs needs 300 MiB at least.
    fn size(self) -> u64 {
        match self {
            Fs::Ext4 => 128 * MIB,
            Fs::Xfs => 320 * MIB,
        }
    }

    /// Mount options for a frozen snapshot: read-only, and no journal replay (there must be
    /// nothing to replay); xfs also refuses a second filesystem with the same UUID otherwise.
    fn clean_ro(self) -> &'static str {
        match self {
            Fs::Ext4 => "ro,noload",
            Fs::Xfs => "ro,norecovery,nouuid",
        }
    }

    fn nouuid(self) -> Option<&'static str> {
        (self == Fs::Xfs).then_some("nouuid")
    }
}

/// The read-only check of `dev` finds nothing (`e2fsck -fn`, `xfs_repair -n`): exit 0.
#[track_caller]
fn fsck_clean(fs: Fs, checker: &Path, dev: &str, what: &str) {
    let mut c = Command::new(checker);
    match fs {
        Fs::Ext4 => c.arg("-fn"),
        Fs::Xfs => c.arg("-n"),
    };
    let out = run(c.arg(dev), TOOL_TIMEOUT);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{checker:?} of {what} is not clean: {}",
        text(&out)
    );
}

fn fs_with_snapshots(fs: Fs, direct_io: bool) {
    let [losetup] = need!("losetup");
    let [mkfs, checker] = fs.tools();
    let [mkfs, checker] = need!(mkfs, checker);
    need_root!();
    let size = fs.size();
    let fx = Fixture::new(
        &format!("fuse-{}{}", fs.name(), if direct_io { "d" } else { "" }),
        size,
        &[],
    );
    let vols = MountDir::new(&fx);
    let d = fx.start_with(&["--mount", vols.arg()], &[]);
    let mut lo = Loop::attach(&losetup, &vols.file("disk0"), false, direct_io);
    // With discard: mkfs trims the device, which reaches the file as punch-hole.
    let mut c = Command::new(&mkfs);
    match fs {
        Fs::Ext4 => c.args(["-q", "-L", "mvsnap"]),
        Fs::Xfs => c.args(["-q", "-f", "-L", "mvsnap"]),
    };
    run_ok(c.arg(lo.dev()));
    let mut m = Mnt::new(fs.name(), lo.dev(), &fx.dir.join("mnt"), None);

    let stop = Arc::new(AtomicBool::new(false));
    let (written, w) = writer(m.dir().to_path_buf(), stop.clone(), 7);
    // Snapshots while it writes: frozen ones, and one without (crash consistent).
    let mut taken: Vec<(String, bool, Files)> = Vec::new();
    for (tag, freeze) in [("f1", true), ("c1", false), ("f2", true)] {
        std::thread::sleep(Duration::from_millis(700));
        let before = written.lock().unwrap().clone();
        let mut args = vec!["snapshot", "create", "disk0", "--tag", tag];
        let mnt = m.dir().to_str().unwrap().to_string();
        if freeze {
            args.extend(["--freeze", &mnt]);
        }
        assert_eq!(fx.ms_ok(&args).trim(), tag);
        eprintln!("{tag}: {} files fsynced before it", before.len());
        taken.push((tag.to_string(), freeze, before));
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    w.join().unwrap();
    let all = written.lock().unwrap().clone();
    assert!(
        taken[0].2.len() >= 2 && all.len() > taken[2].2.len(),
        "the writer wrote too little to test anything: {} files",
        all.len()
    );
    m.unmount();
    fsck_clean(fs, &checker, lo.dev(), "the origin");
    let mut mo = Mnt::new(fs.name(), lo.dev(), &fx.dir.join("mnt"), Some("ro"));
    assert_files("origin", &mo, &all);
    mo.unmount();

    for (tag, freeze, files) in &taken {
        let name = format!("disk0@{tag}");
        if *freeze {
            let mut ls = Loop::attach(&losetup, &vols.file(&name), true, direct_io);
            // A frozen xfs keeps lazy superblock counters that only a log replay (a mount)
            // brings up to date, so `xfs_repair -n` is run on a replayed child below.
            if fs == Fs::Ext4 {
                fsck_clean(fs, &checker, ls.dev(), &name);
            }
            let mut ms = Mnt::new(
                fs.name(),
                ls.dev(),
                &fx.dir.join("mnt-snap"),
                Some(fs.clean_ro()),
            );
            assert_files(&name, &ms, files);
            ms.unmount();
            ls.detach();
        }
        if !*freeze || fs == Fs::Xfs {
            // Crash consistent (or xfs): the journal is replayed in a writable child (e2fsck
            // for ext4, a mount for xfs), which then checks clean.
            fx.snapshot(&name, &format!("{tag}w"), true, "");
            let child = format!("{name}w");
            let mut lw = Loop::attach(&losetup, &vols.file(&child), false, direct_io);
            match fs {
                Fs::Ext4 => {
                    let out = run(
                        Command::new(&checker).arg("-fy").arg(lw.dev()),
                        TOOL_TIMEOUT,
                    );
                    assert!(
                        matches!(out.status.code(), Some(0 | 1)),
                        "e2fsck -fy of {child}: {}",
                        text(&out)
                    );
                }
                Fs::Xfs => {
                    Mnt::new(fs.name(), lw.dev(), &fx.dir.join("mnt-snap"), fs.nouuid()).unmount();
                }
            }
            fsck_clean(fs, &checker, lw.dev(), &child);
            let ro = if fs == Fs::Xfs { "ro,nouuid" } else { "ro" };
            let mut ms = Mnt::new(fs.name(), lw.dev(), &fx.dir.join("mnt-snap"), Some(ro));
            assert_files(&child, &ms, files);
            ms.unmount();
            lw.detach();
        }
    }
    lo.detach();
    fx.assert_check_clean(&format!("after {} on the loop device", fs.name()));
    let st = d.terminate();
    assert!(st.success(), "daemon exit status after SIGTERM: {st}");
    assert!(!vols.mounted(), "still mounted after SIGTERM");
}

#[test]
fn ext4_on_loop_over_the_file_with_snapshots() {
    fs_with_snapshots(Fs::Ext4, false);
}

#[test]
fn ext4_on_direct_io_loop_over_the_file_with_snapshots() {
    fs_with_snapshots(Fs::Ext4, true);
}

#[test]
fn xfs_on_direct_io_loop_over_the_file_with_snapshots() {
    fs_with_snapshots(Fs::Xfs, true);
}

#[test]
fn fio_verify_through_the_loop_device_then_sigkill_and_restart() {
    let [losetup, fio, nbdcopy] = need!("losetup", "fio", "nbdcopy");
    need_root!();
    const SIZE: u64 = 64 * MIB;
    let content = pattern_bytes(3, 4 * MIB as usize);
    let fx = Fixture::new("fuse-fio", SIZE, &content);
    let vols = MountDir::new(&fx);
    let d = fx.start_with(&["--mount", vols.arg()], &[]);

    // fio with verify on the loop device, direct I/O, QD16.
    let mut lo = Loop::attach(&losetup, &vols.file("disk0"), false, true);
    let out = run(
        Command::new(&fio)
            .args([
                "--name=verify",
                "--ioengine=libaio",
                "--direct=1",
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--size=64M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                // No state file left behind (in the working directory: the source tree).
                "--verify_state_save=0",
                "--randseed=42",
            ])
            .arg(format!("--filename={}", lo.dev()))
            .current_dir(&fx.dir.path),
        TOOL_TIMEOUT,
    );
    let t = text(&out);
    assert!(
        out.status.success() && !t.contains("verify: bad") && t.contains("err= 0"),
        "fio verify through the loop device failed: {t}"
    );
    lo.detach();
    // The same bytes through the file and through NBD.
    let through_file = read_file(&vols.file("disk0"));
    assert_image(
        "NBD vs the file after fio",
        &fx.nbdcopy_read(&nbdcopy, "disk0"),
        &through_file,
    );
    fx.snapshot("disk0", "before-kill", false, "");
    let snap_sha = sha256(&through_file);

    // SIGKILL under load.
    let mut lo = Loop::attach(&losetup, &vols.file("disk0"), false, true);
    let mut load = fio_load(&fio, lo.dev(), &["--rw=randrw", "--bs=4k", "--size=64M"]);
    std::thread::sleep(Duration::from_secs(2));
    assert!(load.running(), "fio ended early");
    d.kill9();
    let _ = load.output(Duration::from_secs(60));
    lo.detach();
    let e = std::fs::metadata(&vols.0).unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc::ENOTCONN),
        "the mount of a killed daemon: {e}"
    );

    // The next daemon clears the stale mount and serves again.
    let d = fx.start_with(&["--mount", vols.arg()], &[]);
    assert!(
        d.log_text().contains("stale FUSE mount"),
        "no word of the stale mount: {}",
        d.log_text()
    );
    assert_eq!(vols.names(), vec!["disk0", "disk0@before-kill"]);
    fx.assert_check_clean("after SIGKILL and restart");
    assert_eq!(
        sha256(&read_file(&vols.file("disk0@before-kill"))),
        snap_sha,
        "the snapshot taken before SIGKILL changed"
    );
    assert_eq!(
        sha256(&fx.nbdcopy_read(&nbdcopy, "disk0@before-kill")),
        snap_sha
    );
    let st = d.terminate();
    assert!(st.success(), "daemon exit status after SIGTERM: {st}");
    assert!(!vols.mounted(), "still mounted after SIGTERM");
}

#[test]
fn busy_mount_is_detached_lazily_on_sigterm() {
    let [losetup] = need!("losetup");
    need_root!();
    let fx = Fixture::new("fuse-busy", 16 * MIB, &pattern_bytes(4, 4096));
    let vols = MountDir::new(&fx);
    let d = fx.start_with(&["--mount", vols.arg()], &[]);
    let mut lo = Loop::attach(&losetup, &vols.file("disk0"), true, false);
    // Another daemon (another store) is not mounted over a live mount.
    let other = Fixture::new("fuse-busy2", 16 * MIB, &[]);
    match other.try_start_with(&["--mount", vols.arg()], &[]) {
        Ok(_) => panic!("a second daemon mounted over a live mount"),
        Err(e) => assert!(e.contains("already a mount point"), "{e}"),
    }
    let log = d.log.clone();
    let t = Instant::now();
    let st = d.terminate();
    assert!(st.success(), "daemon exit status after SIGTERM: {st}");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "SIGTERM took {:?}",
        t.elapsed()
    );
    let log = std::fs::read_to_string(log).unwrap();
    assert!(
        log.contains("is busy") && log.contains(lo.dev()),
        "no clear word of the busy mount: {log}"
    );
    assert!(!vols.mounted(), "still mounted after SIGTERM");
    lo.detach();
    fx.assert_check_clean("after a lazy unmount");
}

/// SIGTERM while fio writes through a loop device over the origin's file as fast as it can:
/// the daemon detaches the busy mount, closes the store while the FUSE threads may still be
/// answering, and exits promptly and cleanly; the writer then gets errors, not a hang. The
/// store is clean, the snapshot taken before the load reads exactly what the origin held, and
/// a restart serves the origin again.
#[test]
fn sigterm_under_heavy_io_through_a_loop_device() {
    let [losetup, fio, nbdcopy] = need!("losetup", "fio", "nbdcopy");
    need_root!();
    let content = pattern_bytes(6, 64 * MIB as usize);
    let fx = Fixture::new("fuse-term-load", content.len() as u64, &content);
    let vols = MountDir::new(&fx);
    let d = fx.start_with(&["--mount", vols.arg()], &[]);
    fx.snapshot("disk0", "before", false, "");
    let mut lo = Loop::attach(&losetup, &vols.file("disk0"), false, true);
    let mut load = fio_load(
        &fio,
        lo.dev(),
        &["--rw=randwrite", "--bs=64k", "--fsync=32"],
    );
    // Well into the load: copy-outs for the snapshot, writes in flight.
    std::thread::sleep(Duration::from_secs(2));
    assert!(load.running(), "fio stopped before the SIGTERM");
    let log = d.log.clone();
    let t = Instant::now();
    let st = d.terminate();
    let took = t.elapsed();
    assert!(
        st.success(),
        "daemon exit status after SIGTERM under load: {st}"
    );
    assert!(
        took < Duration::from_secs(30),
        "SIGTERM under load took {took:?}"
    );
    let log = std::fs::read_to_string(log).unwrap();
    assert!(
        log.contains("is busy") && log.contains(lo.dev()),
        "no clear word of the busy mount: {log}"
    );
    assert!(!log.contains("panicked"), "the daemon panicked: {log}");
    // The writer sees its device fail and stops by itself.
    let out = load.output(Duration::from_secs(60));
    assert!(
        !out.status.success(),
        "fio ran to its end through a stopped daemon: {}",
        text(&out)
    );
    lo.detach();
    assert!(!vols.mounted(), "still mounted after SIGTERM");
    fx.assert_check_clean("after SIGTERM under load");
    let d = fx.start();
    assert_image(
        "disk0@before after SIGTERM under load",
        &fx.nbdcopy_read(&nbdcopy, "disk0@before"),
        &content,
    );
    assert_eq!(
        fx.nbdcopy_read(&nbdcopy, "disk0").len(),
        content.len(),
        "the origin after the restart"
    );
    let st = d.terminate();
    assert!(st.success(), "{st}");
    fx.assert_check_clean("after the restart");
}

/// fio with libaio, O_DIRECT and 16 requests in flight on `dev` for up to two minutes (the
/// tests stop the daemon under it), with `args` for the pattern.
fn fio_load(fio: &Path, dev: &str, args: &[&str]) -> ChildGuard {
    ChildGuard::spawn(
        Command::new(fio)
            .args([
                "--name=load",
                "--ioengine=libaio",
                "--direct=1",
                "--iodepth=16",
                "--time_based",
                "--runtime=120",
            ])
            .args(args)
            .arg(format!("--filename={dev}")),
    )
}
