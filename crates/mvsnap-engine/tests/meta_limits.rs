//! Metadata must always be able to commit and to free (issue 7 item 3): a store filled to its
//! last data slot still checkpoints, deletes, closes and reopens; inputs that would make a
//! record bigger than the journal are refused with a clear error instead of poisoning it.

mod common;

use mvsnap_engine::crashsim::SimMachine;
use mvsnap_engine::{Error, OpenOptions, SnapshotState, Store};

use common::{format_opts, pattern, read_all};

const CHUNK: usize = 4096;
const PIECE: usize = 64 * 1024;

fn full_setup(dir: &std::path::Path, content: &[u8]) -> (SimMachine, Store) {
    let (m, s) = common::sim_setup(
        dir,
        &format_opts(48 << 20, CHUNK as u32),
        &[("o0", content.to_vec())],
    );
    s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
    (m, s)
}

fn state(s: &Store, tag: &str) -> SnapshotState {
    s.snapshots()
        .into_iter()
        .find(|i| i.tag == tag)
        .unwrap()
        .state
}

/// Was: the checkpoint reserve counted 24 B per mapping, an entry serializes to 28 B; with
/// ~23,662 mappings and a nearly full store every metadata operation (a first write, a delete,
/// close, a read-write reopen) failed with ENOSPC, for good.
#[test]
fn near_full_store_with_many_mappings_can_still_delete_and_close() {
    let content = pattern(21, 64 << 20);
    let new = pattern(22, 64 << 20);
    // How many pieces the store takes before it is full (the snapshot is invalidated then).
    let dir = tempfile::tempdir().unwrap();
    let (_m, s) = full_setup(dir.path(), &content);
    let o = s.volume("o0").unwrap();
    let mut fit = 0;
    while state(&s, "a") == SnapshotState::Valid {
        let r = fit * PIECE..(fit + 1) * PIECE;
        o.write_at(r.start as u64, &new[r], false).unwrap();
        fit += 1;
    }
    drop(o);
    drop(s);
    assert!(fit > 200, "the store held {fit} pieces");

    // Again, a few pieces short of full: ~10,000 mappings of 4 KiB, nothing invalidated. (A
    // few, not one: commits run beside the writers, so how many metadata blocks are in flight
    // when the store fills, and so where it fills, varies by a piece or two between runs.)
    let dir = tempfile::tempdir().unwrap();
    let (m, s) = full_setup(dir.path(), &content);
    let o = s.volume("o0").unwrap();
    for p in 0..fit - 4 {
        let r = p * PIECE..(p + 1) * PIECE;
        o.write_at(r.start as u64, &new[r], false).unwrap();
    }
    o.flush().unwrap();
    drop(o);
    assert_eq!(state(&s, "a"), SnapshotState::Valid);
    let mappings = s.info().mappings;
    assert!(mappings > 10_000, "{mappings} mappings");
    s.checkpoint().expect("a checkpoint of a full store");
    s.close().expect("close of a full store");

    let s = m
        .open_store(&OpenOptions::default())
        .expect("read-write reopen");
    common::assert_image("o0@a", &read_all(&s, "o0@a"), &content);
    // New metadata may be refused, cleanly; what is there still commits and frees.
    match s.create_snapshot(&["o0"], Some("b"), &"m".repeat(4000), false) {
        Ok(_) => s.delete_snapshot("o0@b").unwrap(),
        Err(Error::NoSpace(msg)) => assert!(msg.contains("metadata"), "{msg}"),
        Err(e) => panic!("snapshot create on a full store: {e}"),
    }
    s.delete_snapshot("o0@a").expect("delete on a full store");
    s.checkpoint().unwrap();
    common::assert_clean(&s, "after the delete");
    s.close().unwrap();
    let s = m.open_store(&OpenOptions::default()).unwrap();
    common::assert_clean(&s, "reopened");
    s.close().unwrap();
}

/// Was: a 3 MiB `--memo` made a record bigger than the journal's slack and poisoned the store.
#[test]
fn huge_memo_is_refused_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (_m, s) = common::sim_setup(
        dir.path(),
        &format_opts(64 << 20, 65536),
        &[("o0", pattern(1, 1 << 20))],
    );
    for len in [4097, 3 << 20] {
        match s.create_snapshot(&["o0"], Some("big"), &"x".repeat(len), false) {
            Err(Error::InvalidArgument(msg)) => assert!(msg.contains("memo"), "{msg}"),
            other => panic!("a memo of {len} bytes: {other:?}"),
        }
    }
    // The store is fine: the longest memo allowed works, and everything commits.
    s.create_snapshot(&["o0"], Some("ok"), &"y".repeat(4096), false)
        .unwrap();
    s.volume("o0")
        .unwrap()
        .write_at(0, &[1; 4096], true)
        .unwrap();
    s.close().unwrap();
}

/// Was: an `Invalidate` of ~1,000 snapshots (one record) near a full journal poisoned the
/// store. Many snapshots of one generation range are invalidated by a full store in records
/// the journal takes, and the store goes on.
#[test]
fn invalidate_of_many_snapshots_near_a_full_journal_commits() {
    let dir = tempfile::tempdir().unwrap();
    let content = pattern(31, 8 << 20);
    let (m, s) = common::sim_setup(
        dir.path(),
        &format_opts(4 << 20, 65536),
        &[("o0", content.clone())],
    );
    for i in 0..1000 {
        s.create_snapshot(&["o0"], Some(&format!("s{i}")), "", false)
            .unwrap();
    }
    let o = s.volume("o0").unwrap();
    let new = pattern(32, 8 << 20);
    o.write_at(0, &new, false).unwrap();
    o.flush().unwrap();
    drop(o);
    assert!(
        s.snapshots()
            .iter()
            .all(|i| i.state == SnapshotState::Invalid),
        "the store filled"
    );
    s.close().unwrap();
    let s = m.open_store(&OpenOptions::default()).unwrap();
    common::assert_image("o0", &read_all(&s, "o0"), &new);
    common::assert_clean(&s, "after invalidating 1,000 snapshots");
    s.close().unwrap();
}

/// Issue 7 item 12: a damaged superblock copy was skipped in silence. It is reported on open
/// (an event) and by `check`, and a writable open rewrites it from the good copy.
#[test]
fn damaged_superblock_copy_is_reported_and_repaired() {
    use mvsnap_engine::format::SB_OFFSETS;
    let dir = tempfile::tempdir().unwrap();
    let content = pattern(41, 1 << 20);
    let (m, s) = common::sim_setup(
        dir.path(),
        &format_opts(16 << 20, 65536),
        &[("o0", content.clone())],
    );
    s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
    s.close().unwrap();
    let disk = m.store_disk().unwrap();
    // Damage both copies in turn: whichever is damaged, the other carries the store.
    for off in SB_OFFSETS {
        disk.corrupt(off + 100, &[0xa5; 16]);
        let ro = OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        };
        let s = m.open_store(&ro).expect("the other copy opens the store");
        let report = s.check();
        assert!(report.is_clean(), "{report:?}");
        assert!(
            report
                .warnings
                .iter()
                .any(|w| w.contains("superblock") && w.contains("damaged")),
            "check does not report the damaged copy: {report:?}"
        );
        assert!(
            s.events()
                .iter()
                .any(|e| e.kind == mvsnap_engine::EventKind::Corruption),
            "no event"
        );
        drop(s);
        // A writable open repairs it; after that nothing is reported.
        let s = m.open_store(&OpenOptions::default()).unwrap();
        s.close().unwrap();
        let s = m.open_store(&ro).unwrap();
        let report = s.check();
        assert!(
            report.warnings.iter().all(|w| !w.contains("superblock")),
            "still damaged after a writable open: {report:?}"
        );
        common::assert_image("o0@a", &read_all(&s, "o0@a"), &content);
        drop(s);
    }
}
