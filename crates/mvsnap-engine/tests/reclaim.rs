//! Background reclaim: a deleted snapshot's entries go in batches beside the writers, and what
//! a crash leaves of them is found and finished by the next open.

mod common;

use mvsnap_engine::crashsim::CrashPolicy;
use mvsnap_engine::{OpenOptions, Store};
use rand::rngs::StdRng;
use rand::SeedableRng;

use common::{format_opts, pattern, read_all};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;

/// Mappings the crash left, read by a read-only open: it starts no reclaim thread, while a
/// writable open's thread starts at once and may finish before anyone reads the count.
fn mappings_left_by_the_crash(open: impl Fn(&OpenOptions) -> mvsnap_engine::Result<Store>) -> u64 {
    let s = open(&OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    })
    .unwrap();
    let left = s.info().mappings;
    drop(s);
    left
}

/// The crash cut the reclaim short (mappings `left` at reopen) and the reopen finished it.
fn assert_crash_left_work(before: u64, left: u64, after: u64) {
    eprintln!("mappings: {before} before the delete, {left} at reopen, {after} reclaimed");
    assert!(
        left > after,
        "the crash should leave batches to do ({left} at reopen, {after} in the end)"
    );
}

/// 40,960 preserved blocks for `a` (ten batches), 1,024 more for `b`; `a` deleted, then the
/// store dropped at once without a close (a crash: the reclaim cut short) and reopened: the
/// open finds what is left and the reclaim ends beside a writer with only `b`'s entries left,
/// `b` exact, check clean at every step.
#[test]
fn a_deleted_snapshot_is_reclaimed_in_batches_and_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let size = 160 * MIB;
    let content = pattern(21, size as usize);
    let (store, _) = common::real_setup(
        dir.path(),
        &format_opts(512 * MIB, 65536),
        &[("o0", content.clone())],
    );
    let s = Store::open(&store, &OpenOptions::default()).unwrap();
    s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
    let o = s.volume("o0").unwrap();
    let mut now = content.clone();
    let data = pattern(22, MIB as usize);
    for off in (0..size).step_by(MIB as usize) {
        o.write_at(off, &data, false).unwrap();
        now[off as usize..(off + MIB) as usize].copy_from_slice(&data);
    }
    o.flush().unwrap();
    s.create_snapshot(&["o0"], Some("b"), "", false).unwrap();
    let at_b = now.clone();
    let blk = pattern(23, BLOCK as usize);
    for i in 0..1024u64 {
        let off = i * 37 % (size / BLOCK) * BLOCK;
        o.write_at(off, &blk, false).unwrap();
        now[off as usize..(off + BLOCK) as usize].copy_from_slice(&blk);
    }
    o.flush().unwrap();
    let before = s.info().mappings;
    assert!(before >= 40_960 + 1_000, "{before} mappings");
    // Held, so the drop below always cuts it short (else a fast reclaim may end first).
    s.hold_background_reclaim(true);
    s.delete_snapshot("o0@a").unwrap();
    // A crash right after the delete: no close, the reclaim cut short.
    drop(o);
    drop(s);
    let left = mappings_left_by_the_crash(|o| Store::open(&store, o));
    let s = Store::open(&store, &OpenOptions::default()).unwrap();
    let o = s.volume("o0").unwrap();
    // The writer goes on while the batches run again.
    for i in 0..256u64 {
        let off = (i * 101 + 7) % (size / BLOCK) * BLOCK;
        o.write_at(off, &blk, false).unwrap();
        now[off as usize..(off + BLOCK) as usize].copy_from_slice(&blk);
    }
    o.flush().unwrap();
    common::assert_clean(&s, "during the reclaim");
    drop(o);
    s.wait_reclaimed().unwrap();
    let after = s.info().mappings;
    assert_crash_left_work(before, left, after);
    // `b` keeps one entry per block it needs: 1,024 writes over 40,960 blocks (some hit the
    // same block) plus the 256 after.
    assert!(
        after <= 1024 + 256,
        "{after} mappings left after the reclaim"
    );
    common::assert_clean(&s, "after the reclaim");
    common::assert_image("o0@b", &read_all(&s, "o0@b"), &at_b);
    common::assert_image("o0", &read_all(&s, "o0"), &now);
    s.close().unwrap();
    let s = Store::open(&store, &OpenOptions::default()).unwrap();
    assert_eq!(s.info().mappings, after);
    common::assert_clean(&s, "reopen");
}

/// Nobody waits: a delete's space comes back by itself (the reclaim thread, then a commit
/// that punches the freed blocks out of the file), as a daemon's user expects after
/// `snapshot delete`.
#[test]
fn the_reclaim_runs_by_itself() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let size = 32 * MIB;
    let content = pattern(24, size as usize);
    let (store, _) = common::real_setup(
        dir.path(),
        &format_opts(256 * MIB, 65536),
        &[("o0", content)],
    );
    let s = Store::open(&store, &OpenOptions::default()).unwrap();
    s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
    let o = s.volume("o0").unwrap();
    o.write_at(0, &pattern(25, size as usize), false).unwrap();
    o.flush().unwrap();
    s.checkpoint().unwrap();
    let allocated = || std::fs::metadata(&store).unwrap().blocks() * 512;
    let (mappings, held) = (s.info().mappings, allocated());
    assert!(mappings >= size / BLOCK, "{mappings}");
    s.delete_snapshot("o0@a").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while s.info().mappings > 0 || allocated() + 30 * MIB > held {
        assert!(
            std::time::Instant::now() < deadline,
            "30 s after the delete: {} mappings, {} bytes allocated (was {held})",
            s.info().mappings,
            allocated()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    common::assert_clean(&s, "after the background reclaim");
}

/// Deleted writable snapshots: their own blocks (keys in `S`) used to be found by a walk of
/// every key of the origin's writable volumes inside the delete, under the state lock. Now
/// the delete names their nodes dead and the batches drop the keys. `w` writes 40,960 blocks
/// (ten batches); `f`, a writable snapshot of `w`, shares them; `w` then `f` deleted (the
/// second delete makes the shared node dead too); a crash right after; the reopen finishes
/// the work beside a writer on `v`, another writable snapshot, which stays exact.
#[test]
fn deleted_writable_snapshots_are_reclaimed_in_batches_and_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let size = 160 * MIB;
    let content = pattern(31, size as usize);
    let (m, s) = common::sim_setup(
        dir.path(),
        &format_opts(256 * MIB, 65536),
        &[("o0", content.clone())],
    );
    for tag in ["w", "v"] {
        s.create_snapshot(&["o0"], Some(tag), "", true).unwrap();
    }
    let w = s.volume("o0@w").unwrap();
    let data = pattern(32, MIB as usize);
    for off in (0..size).step_by(MIB as usize) {
        w.write_at(off, &data, false).unwrap();
    }
    w.flush().unwrap();
    drop(w);
    s.create_snapshot(&["o0@w"], Some("f"), "", true).unwrap();
    let w = s.volume("o0@w").unwrap();
    let blk = pattern(33, BLOCK as usize);
    for i in 0..512u64 {
        w.write_at(i * 7 * BLOCK, &blk, false).unwrap();
    }
    w.flush().unwrap();
    drop(w);
    let v = s.volume("o0@v").unwrap();
    let mut v_now = content.clone();
    for i in 0..1024u64 {
        let off = (i * 40 + 3) * BLOCK;
        v.write_at(off, &blk, false).unwrap();
        v_now[off as usize..(off + BLOCK) as usize].copy_from_slice(&blk);
    }
    v.flush().unwrap();
    drop(v);
    let before = s.info().mappings;
    assert!(before >= 40_960 + 512 + 1024, "{before} mappings");
    // Held, so the cut below always finds it not begun (else a fast reclaim may end first).
    s.hold_background_reclaim(true);
    s.delete_snapshot("o0@w").unwrap();
    s.delete_snapshot("o0@f").unwrap();
    // A power cut right after the deletes (durable: each waited for its record), with the
    // reclaim cut short: the simulated machine stops the disks at once, whatever the
    // reclaim thread does next.
    let m = m.crash_all_with(&mut StdRng::seed_from_u64(1), CrashPolicy::KeepAll);
    drop(s);
    let left = mappings_left_by_the_crash(|o| m.open_store(o));
    let s = m.open_store(&OpenOptions::default()).unwrap();
    common::assert_clean(&s, "reopened after the deletes");
    let v = s.volume("o0@v").unwrap();
    let blk2 = pattern(34, BLOCK as usize);
    for i in 0..256u64 {
        let off = (i * 101 + 5) * BLOCK;
        v.write_at(off, &blk2, false).unwrap();
        v_now[off as usize..(off + BLOCK) as usize].copy_from_slice(&blk2);
    }
    v.flush().unwrap();
    common::assert_clean(&s, "during the reclaim");
    drop(v);
    s.wait_reclaimed().unwrap();
    let after = s.info().mappings;
    assert_crash_left_work(before, left, after);
    // Only `v`'s own blocks are left: 1,024 + 256 writes, some to the same block.
    assert!(
        (1024..=1024 + 256).contains(&after),
        "{after} mappings left after the reclaim"
    );
    common::assert_clean(&s, "after the reclaim");
    common::assert_image("o0@v", &read_all(&s, "o0@v"), &v_now);
    common::assert_image("o0", &read_all(&s, "o0"), &content);
    s.close().unwrap();
    let s = m.open_store(&OpenOptions::default()).unwrap();
    assert_eq!(s.info().mappings, after);
    common::assert_clean(&s, "reopen");
    // The freed blocks are free: a new writable snapshot can write as much again (the
    // store could not hold both).
    s.create_snapshot(&["o0"], Some("x"), "", true).unwrap();
    let x = s.volume("o0@x").unwrap();
    for off in (0..size).step_by(MIB as usize) {
        x.write_at(off, &data, false).unwrap();
    }
    x.flush().unwrap();
    drop(x);
    common::assert_clean(&s, "rewriting the reclaimed space");
    s.close().unwrap();
}

/// A snapshot of an origin that reads as zeroes keeps only zero entries (they own no block).
/// What a crash leaves of their reclaim must be found by the next open as well: before, open
/// looked for dead ranges only among the counters of data entries, so these stayed in the
/// tree for good (until some later delete on the origin swept it).
#[test]
fn zero_entries_of_a_deleted_snapshot_are_reclaimed_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let size = 160 * MIB;
    let (m, s) = common::sim_setup(
        dir.path(),
        &format_opts(256 * MIB, 65536),
        &[("o0", vec![0u8; size as usize])],
    );
    s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
    let o = s.volume("o0").unwrap();
    let data = pattern(35, MIB as usize);
    let mut now = vec![0u8; size as usize];
    for off in (0..size).step_by(MIB as usize) {
        o.write_at(off, &data, false).unwrap();
        now[off as usize..(off + MIB) as usize].copy_from_slice(&data);
    }
    o.flush().unwrap();
    drop(o);
    let before = s.info().mappings;
    assert!(before >= 40_960, "{before} mappings");
    s.hold_background_reclaim(true);
    s.delete_snapshot("o0@a").unwrap();
    // Durable first, so the reopen cannot find the entries in the journal alone.
    s.checkpoint().unwrap();
    let m = m.crash_all_with(&mut StdRng::seed_from_u64(2), CrashPolicy::KeepAll);
    drop(s);
    let left = mappings_left_by_the_crash(|o| m.open_store(o));
    let s = m.open_store(&OpenOptions::default()).unwrap();
    common::assert_clean(&s, "reopened after the delete");
    s.wait_reclaimed().unwrap();
    let after = s.info().mappings;
    assert_crash_left_work(before, left, after);
    assert_eq!(after, 0, "zero entries no snapshot needs are left");
    common::assert_clean(&s, "after the reclaim");
    common::assert_image("o0", &read_all(&s, "o0"), &now);
    s.close().unwrap();
    let s = m.open_store(&OpenOptions::default()).unwrap();
    assert_eq!(s.info().mappings, 0);
    common::assert_clean(&s, "reopen");
}
