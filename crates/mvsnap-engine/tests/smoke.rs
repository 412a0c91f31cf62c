//! End-to-end checks of the engine on real files: snapshots keep their content, share one copy,
//! survive reopen, and `check` stays clean.

use mvsnap_engine::{FormatOptions, OpenOptions, Store};
use std::path::Path;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn setup(dir: &Path, origin_size: u64) -> (std::path::PathBuf, std::path::PathBuf) {
    let origin = dir.join("disk0");
    std::fs::write(&origin, pattern(origin_size as usize, 1)).unwrap();
    let store = dir.join("store");
    Store::format(
        &store,
        &FormatOptions {
            size: Some(64 << 20),
            ..Default::default()
        },
    )
    .unwrap();
    (origin, store)
}

fn read_all(s: &Store, name: &str) -> Vec<u8> {
    let v = s.volume(name).unwrap();
    let mut buf = vec![0u8; v.size() as usize];
    v.read_at(0, &mut buf).unwrap();
    buf
}

#[test]
fn snapshots_keep_content_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (origin, store) = setup(dir.path(), 4 << 20);
    let s = Store::open(&store, &OpenOptions::default()).unwrap();
    s.add_origin(&origin, None).unwrap();
    let v0 = read_all(&s, "disk0");
    s.create_snapshot(&["disk0"], Some("a"), "first", false)
        .unwrap();
    let o = s.volume("disk0").unwrap();
    o.write_at(4096 * 3 + 100, &[0xaa; 10000], false).unwrap();
    let v1 = read_all(&s, "disk0");
    assert_ne!(v0, v1);
    assert_eq!(read_all(&s, "disk0@a"), v0);
    s.create_snapshot(&["disk0"], Some("b"), "", false).unwrap();
    o.write_at(0, &[0x55; 300000], false).unwrap();
    assert_eq!(read_all(&s, "disk0@a"), v0);
    assert_eq!(read_all(&s, "disk0@b"), v1);
    // Writable snapshot of a snapshot.
    s.create_snapshot(&["disk0@a"], Some("w"), "", true)
        .unwrap();
    let w = s.volume("disk0@w").unwrap();
    w.write_at(5000, &[0x77; 70000], false).unwrap();
    let mut vw = v0.clone();
    vw[5000..75000].fill(0x77);
    assert_eq!(read_all(&s, "disk0@w"), vw);
    assert_eq!(read_all(&s, "disk0@a"), v0);
    s.create_snapshot(&["disk0@w"], Some("w2"), "", false)
        .unwrap();
    w.write_at(6000, &[0x11; 10], false).unwrap();
    let v2 = read_all(&s, "disk0");
    let report = s.check();
    assert!(report.is_clean(), "{:?}", report.errors);
    drop((o, w));
    s.close().unwrap();

    let s = Store::open(&store, &OpenOptions::default()).unwrap();
    assert_eq!(read_all(&s, "disk0@a"), v0);
    assert_eq!(read_all(&s, "disk0@b"), v1);
    assert_eq!(read_all(&s, "disk0@w2"), vw);
    let mut vw2 = vw.clone();
    vw2[6000..6010].fill(0x11);
    assert_eq!(read_all(&s, "disk0@w"), vw2);
    assert_eq!(read_all(&s, "disk0"), v2);
    let report = s.check();
    assert!(report.is_clean(), "{:?}", report.errors);
    s.delete_snapshot("disk0@a").unwrap();
    assert_eq!(read_all(&s, "disk0@w2"), vw);
    let report = s.check();
    assert!(report.is_clean(), "{:?}", report.errors);
}

#[test]
fn one_copy_for_many_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let size = 8u64 << 20;
    let (origin, store) = setup(dir.path(), size);
    let s = Store::open(&store, &OpenOptions::default()).unwrap();
    s.add_origin(&origin, None).unwrap();
    let v0 = read_all(&s, "disk0");
    for i in 0..10 {
        s.create_snapshot(&["disk0"], Some(&format!("s{i}")), "", false)
            .unwrap();
    }
    let used0 = s.info().used_bytes;
    let o = s.volume("disk0").unwrap();
    let new = pattern(size as usize, 9);
    for off in (0..size).step_by(1 << 20) {
        o.write_at(off, &new[off as usize..(off + (1 << 20)) as usize], false)
            .unwrap();
    }
    let used = s.info().used_bytes - used0;
    assert!(
        used as f64 <= 1.05 * size as f64,
        "used {used} for a {size}-byte origin"
    );
    for i in 0..10 {
        assert_eq!(read_all(&s, &format!("disk0@s{i}")), v0);
    }
    assert_eq!(read_all(&s, "disk0"), new);
}

#[test]
fn small_write_copies_one_block() {
    let dir = tempfile::tempdir().unwrap();
    let (origin, store) = setup(dir.path(), 4 << 20);
    let s = Store::open(&store, &OpenOptions::default()).unwrap();
    s.add_origin(&origin, None).unwrap();
    s.create_snapshot(&["disk0"], None, "", false).unwrap();
    let o = s.volume("disk0").unwrap();
    for c in 0..10u64 {
        o.write_at(c * 65536 + 8192, &[1u8; 4096], false).unwrap();
    }
    let info = s.info();
    assert_eq!(info.snapshots[0].exclusive_bytes, 10 * 4096);
}
