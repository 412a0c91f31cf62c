//! Space goes back to the host (issue 8): slots freed by deleting snapshots are punched out of
//! a file store, so its allocated size follows what it holds; the punched space is reused
//! correctly afterwards.

mod common;

use std::os::unix::fs::MetadataExt;

use mvsnap_engine::{OpenOptions, Store};

use common::{format_opts, pattern, read_all};

const MIB: u64 = 1 << 20;

fn allocated(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn deleting_snapshots_gives_their_space_back_to_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let content = pattern(1, (32 * MIB) as usize);
    let (store, _) = common::real_setup(
        dir.path(),
        &format_opts(96 * MIB, 65536),
        &[("o0", content.clone())],
    );
    let s = Store::open(&store, &OpenOptions::default()).unwrap();
    s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
    let o = s.volume("o0").unwrap();
    // 24 MiB overwritten: 24 MiB preserved for the snapshot.
    let new = pattern(2, (24 * MIB) as usize);
    o.write_at(0, &new, false).unwrap();
    o.flush().unwrap();
    common::assert_image("o0@a", &read_all(&s, "o0@a"), &content);
    let with_snapshot = allocated(&store);
    s.delete_snapshot("o0@a").unwrap();
    let after_delete = allocated(&store);
    assert!(
        with_snapshot - after_delete >= 23 * MIB,
        "deleting a snapshot that held 24 MiB gave back {} bytes (allocated {with_snapshot} -> \
         {after_delete})",
        with_snapshot.saturating_sub(after_delete)
    );
    // The punched slots are reused: a new snapshot preserves into them, exactly.
    s.create_snapshot(&["o0"], Some("b"), "", false).unwrap();
    let mut now = content.clone();
    now[..new.len()].copy_from_slice(&new);
    o.write_at(0, &pattern(3, (20 * MIB) as usize), false)
        .unwrap();
    o.flush().unwrap();
    common::assert_image("o0@b", &read_all(&s, "o0@b"), &now);
    common::assert_clean(&s, "reuse of punched slots");
    drop(o);
    s.close().unwrap();
    let s = Store::open(&store, &OpenOptions::default()).unwrap();
    common::assert_image("o0@b after reopen", &read_all(&s, "o0@b"), &now);
    common::assert_clean(&s, "reopen");
}

/// Punching freed space must not take away what the older superblock copy points at: with
/// either copy damaged (bit rot in the newer one falls back to the older), the store opens and
/// lists its snapshots, after deletes punched space and checkpoints moved on.
#[test]
fn either_superblock_copy_alone_opens_after_space_was_given_back() {
    let dir = tempfile::tempdir().unwrap();
    let content = pattern(4, (8 * MIB) as usize);
    let (store, _) = common::real_setup(
        dir.path(),
        &format_opts(64 * MIB, 65536),
        &[("o0", content.clone())],
    );
    let s = Store::open(&store, &OpenOptions::default()).unwrap();
    s.create_snapshot(&["o0"], Some("keep"), "", false).unwrap();
    s.create_snapshot(&["o0"], Some("gone"), "", false).unwrap();
    let o = s.volume("o0").unwrap();
    o.write_at(0, &pattern(5, (4 * MIB) as usize), false)
        .unwrap();
    o.flush().unwrap();
    s.checkpoint().unwrap();
    s.delete_snapshot("o0@gone").unwrap();
    s.checkpoint().unwrap();
    drop(o);
    s.close().unwrap();
    for copy in [0u64, 4096] {
        let damaged = dir.path().join(format!("damaged-{copy}"));
        std::fs::copy(&store, &damaged).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&damaged)
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a; 512], copy).unwrap();
        drop(f);
        let s = Store::open(
            &damaged,
            &OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("superblock copy at {copy} damaged: {e}"));
        let names: Vec<String> = s.snapshots().into_iter().map(|i| i.name).collect();
        assert!(names.contains(&"o0@keep".to_string()), "{copy}: {names:?}");
        common::assert_image("o0@keep", &read_all(&s, "o0@keep"), &content);
    }
}
