//! Space goes back to the host (issue 8): slots freed by deleting snapshots are punched out of
//! a file store, so its allocated size follows what it holds; the punched space is reused
//! correctly afterwards.

mod common;

use std::os::unix::fs::MetadataExt;

use mvsnap_engine::{OpenOptions, SnapshotState, Store};

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
    // The delete is instant; its entries go in the background.
    s.wait_reclaimed().unwrap();
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

/// A store of `store` bytes over one origin holding `content`, with snapshot `o0@TAG`.
fn with_snapshot(
    dir: &std::path::Path,
    store: u64,
    content: &[u8],
    tag: &str,
    writable: bool,
) -> (std::path::PathBuf, Store) {
    let (path, _) =
        common::real_setup(dir, &format_opts(store, 65536), &[("o0", content.to_vec())]);
    let s = Store::open(&path, &OpenOptions::default()).unwrap();
    s.create_snapshot(&["o0"], Some(tag), "", writable).unwrap();
    (path, s)
}

/// Store bytes in use (data and metadata), from `info`.
fn used(s: &Store) -> u64 {
    s.info().used_bytes
}

/// Format v2 (issue 8 item 3): a first 4 KiB write after a snapshot preserves 4 KiB, not a
/// 64 KiB chunk: 256 scattered 4 KiB writes, each in its own 64 KiB of the origin, cost about
/// 1 MiB of data (v1: 16 MiB) plus their share of metadata.
#[test]
fn a_first_4k_write_costs_4k_of_store() {
    let dir = tempfile::tempdir().unwrap();
    let content = pattern(4, (16 * MIB) as usize);
    let (_, s) = with_snapshot(dir.path(), 64 * MIB, &content, "a", false);
    s.checkpoint().unwrap();
    let before = used(&s);
    let o = s.volume("o0").unwrap();
    let mut now = content.clone();
    for i in 0..256u64 {
        let off = i * 65536 + 8192;
        o.write_at(off, &[0xee; 4096], false).unwrap();
        now[off as usize..off as usize + 4096].fill(0xee);
    }
    o.flush().unwrap();
    s.checkpoint().unwrap();
    let grew = used(&s) - before;
    assert!(
        (MIB..MIB + 256 * 1024).contains(&grew),
        "256 first 4 KiB writes used {grew} bytes of store (1 MiB of data + metadata expected)"
    );
    common::assert_image("o0@a", &read_all(&s, "o0@a"), &content);
    common::assert_image("o0", &read_all(&s, "o0"), &now);
    common::assert_clean(&s, "scattered first writes");
}

/// Issue 8 item 3: TRIM of a writable snapshot records zero entries, no data (v1: a 64 MiB trim
/// used 64 MiB), and what the snapshot held there comes back, to the store and to the host.
#[test]
fn trim_of_a_writable_snapshot_records_zeroes_and_frees_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let content = pattern(5, (64 * MIB) as usize);
    let (store, s) = with_snapshot(dir.path(), 160 * MIB, &content, "w", true);
    let w = s.volume("o0@w").unwrap();
    s.checkpoint().unwrap();
    let empty = used(&s);
    // A trim of what the snapshot never wrote: zero entries only.
    w.trim(0, 64 * MIB).unwrap();
    w.flush().unwrap();
    s.checkpoint().unwrap();
    let after_trim = used(&s) - empty;
    assert!(
        after_trim < 2 * MIB,
        "a 64 MiB trim used {after_trim} bytes of store"
    );
    common::assert_image(
        "o0@w",
        &read_all(&s, "o0@w"),
        &vec![0u8; (64 * MIB) as usize],
    );
    // Data written, then trimmed: its space comes back.
    let data = pattern(6, (32 * MIB) as usize);
    w.write_at(0, &data, false).unwrap();
    w.flush().unwrap();
    s.checkpoint().unwrap();
    let with_data = used(&s);
    let host_with_data = allocated(&store);
    assert!(with_data - empty >= 32 * MIB, "{with_data} - {empty}");
    w.zero_range(0, 32 * MIB, true, false).unwrap();
    w.flush().unwrap();
    s.checkpoint().unwrap();
    let back = with_data - used(&s);
    assert!(
        back >= 31 * MIB,
        "trimming 32 MiB the snapshot owned gave back {back} bytes"
    );
    assert!(
        host_with_data - allocated(&store) >= 31 * MIB,
        "the host got back {} bytes",
        host_with_data.saturating_sub(allocated(&store))
    );
    let mut want = vec![0u8; (64 * MIB) as usize];
    common::assert_image("o0@w", &read_all(&s, "o0@w"), &want);
    // Written again over the zeroes: exact.
    w.write_at(4096 * 3, &data[..8192], false).unwrap();
    want[4096 * 3..4096 * 3 + 8192].copy_from_slice(&data[..8192]);
    common::assert_image("o0@w", &read_all(&s, "o0@w"), &want);
    common::assert_image("o0", &read_all(&s, "o0"), &content);
    common::assert_clean(&s, "trims of a writable snapshot");
    drop(w);
    s.close().unwrap();
    let s = Store::open(&store, &OpenOptions::default()).unwrap();
    common::assert_image("o0@w after reopen", &read_all(&s, "o0@w"), &want);
    common::assert_clean(&s, "reopen");
}

/// Issue 8: 500 snapshots of a snapshot that holds 4,096 written blocks made a 39 MiB v1
/// checkpoint (each copied its parent's map). In v2 a snapshot of a snapshot shares
/// everything: they cost their table rows, and every one reads its parent's data.
#[test]
fn snapshots_of_a_snapshot_copy_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let content = pattern(7, (16 * MIB) as usize);
    let (_, s) = with_snapshot(dir.path(), 128 * MIB, &content, "w", true);
    let w = s.volume("o0@w").unwrap();
    let data = pattern(8, (16 * MIB) as usize);
    w.write_at(0, &data, false).unwrap();
    w.flush().unwrap();
    s.checkpoint().unwrap();
    let before = used(&s);
    for i in 0..500 {
        s.create_snapshot(&["o0@w"], Some(&format!("c{i}")), "", i % 2 == 0)
            .unwrap();
    }
    s.checkpoint().unwrap();
    let grew = used(&s) - before;
    assert!(
        grew < 2 * MIB,
        "500 snapshots of a snapshot holding 16 MiB used {grew} bytes of store"
    );
    for i in [0, 1, 250, 499] {
        common::assert_image(
            &format!("o0@c{i}"),
            &read_all(&s, &format!("o0@c{i}")),
            &data,
        );
    }
    // The parent goes on writing; its children keep what it held when they were taken.
    w.write_at(0, &[9u8; 4096], false).unwrap();
    common::assert_image("o0@c499", &read_all(&s, "o0@c499"), &data);
    let c0 = s.volume("o0@c0").unwrap();
    c0.write_at(8192, &[3u8; 4096], false).unwrap();
    let mut want = data.clone();
    want[8192..12288].fill(3);
    common::assert_image("o0@c0", &read_all(&s, "o0@c0"), &want);
    common::assert_image("o0@c2", &read_all(&s, "o0@c2"), &data);
    common::assert_clean(&s, "500 snapshots of a snapshot");
}

/// `info`'s metadata size is the tree's nodes (counted in the metadata header), the tables and
/// the fixed area: it grows with the mappings a snapshot gains, comes back when the snapshot
/// goes, and is the same after a reopen (the count is durable, not rebuilt).
#[test]
fn info_counts_metadata_by_the_nodes_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let content = pattern(6, (32 * MIB) as usize);
    let (store, _) = common::real_setup(
        dir.path(),
        &format_opts(96 * MIB, 65536),
        &[("o0", content.clone())],
    );
    let s = Store::open(&store, &OpenOptions::default()).unwrap();
    s.checkpoint().unwrap();
    let empty = s.info();
    assert!(
        empty.metadata_bytes > empty.journal_bytes,
        "metadata {} should hold the journal {} and more",
        empty.metadata_bytes,
        empty.journal_bytes
    );
    s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
    let o = s.volume("o0").unwrap();
    // Every other 4 KiB block of 32 MiB: 4,096 preserved blocks, one entry each.
    let block = pattern(7, 4096);
    for i in (0..32 * MIB / 4096).step_by(2) {
        o.write_at(i * 4096, &block, false).unwrap();
    }
    o.flush().unwrap();
    s.checkpoint().unwrap();
    let full = s.info();
    let grown = full.metadata_bytes - empty.metadata_bytes;
    let entries = 4096;
    // An entry takes at least 16 bytes of a leaf and at most a quarter of a node.
    assert!(
        grown >= entries * 16 && grown <= entries * 1024,
        "4,096 new entries grew the metadata by {grown} bytes"
    );
    // The store's used space grew by the 16 MiB preserved plus exactly the metadata's growth
    // (the journal is outside the data area; a table block or two may move).
    let used = full.used_bytes - empty.used_bytes;
    assert!(
        used >= 16 * MIB + grown - 2 * 4096 && used <= 16 * MIB + grown + 2 * 4096,
        "used grew by {used} bytes for 16 MiB of data and {grown} of metadata"
    );
    drop(o);
    s.close().unwrap();
    let s = Store::open(&store, &OpenOptions::default()).unwrap();
    assert_eq!(s.info().metadata_bytes, full.metadata_bytes, "after reopen");
    common::assert_clean(&s, "reopen");
    s.delete_snapshot("o0@a").unwrap();
    s.wait_reclaimed().unwrap();
    s.checkpoint().unwrap();
    let after = s.info().metadata_bytes;
    assert!(
        after <= empty.metadata_bytes + 8 * 4096,
        "after the delete the metadata is {after} bytes, was {} before the snapshot",
        empty.metadata_bytes
    );
    common::assert_clean(&s, "after delete");
}

/// A store on a block device (a loop device over a sparse file, as a thin LUN would be): with
/// `discard`, the blocks of a deleted snapshot go back to the device (BLKDISCARD; the loop
/// driver punches them out of its file), and everything reads back exact; without it the
/// device keeps them. Needs root and losetup (skipped otherwise unless MVSNAP_REQUIRE_TOOLS=1).
#[test]
fn a_device_store_discards_freed_blocks_when_asked() {
    let have = is_root() && which("losetup");
    if !have {
        assert!(
            std::env::var_os("MVSNAP_REQUIRE_TOOLS").is_none(),
            "needs root and losetup"
        );
        eprintln!("skipped: needs root and losetup");
        return;
    }
    for discard in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("lun.img");
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(128 * MIB)
            .unwrap();
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&backing)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = std::path::PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        struct Detach(std::path::PathBuf);
        impl Drop for Detach {
            fn drop(&mut self) {
                let _ = std::process::Command::new("losetup")
                    .arg("-d")
                    .arg(&self.0)
                    .status();
            }
        }
        let _detach = Detach(dev.clone());
        Store::format(&dev, &mvsnap_engine::FormatOptions::default()).unwrap();
        let origin = dir.path().join("o0.img");
        let content = pattern(41, (32 * MIB) as usize);
        std::fs::write(&origin, &content).unwrap();
        let opts = OpenOptions {
            discard,
            ..Default::default()
        };
        let s = Store::open(&dev, &opts).unwrap();
        s.add_origin(&origin, Some("o0")).unwrap();
        s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
        s.create_snapshot(&["o0"], Some("keep"), "", false).unwrap();
        let o = s.volume("o0").unwrap();
        o.write_at(0, &pattern(42, (24 * MIB) as usize), false)
            .unwrap();
        o.flush().unwrap();
        s.checkpoint().unwrap();
        // Now a newer snapshot and another 24 MiB: `a` and `keep` share the first copies,
        // `b` alone needs the second ones.
        s.create_snapshot(&["o0"], Some("b"), "", false).unwrap();
        o.write_at(0, &pattern(43, (24 * MIB) as usize), false)
            .unwrap();
        o.flush().unwrap();
        s.checkpoint().unwrap();
        let held = allocated(&backing);
        s.delete_snapshot("o0@b").unwrap();
        s.wait_reclaimed().unwrap();
        let after = allocated(&backing);
        if discard {
            assert!(
                held - after >= 20 * MIB,
                "discard gave back {} bytes of a 24 MiB snapshot ({held} -> {after})",
                held.saturating_sub(after)
            );
        } else {
            assert!(after >= held, "without discard the device keeps its blocks");
        }
        common::assert_image("o0@keep", &read_all(&s, "o0@keep"), &content);
        // The discarded blocks are used again, exactly.
        s.create_snapshot(&["o0"], Some("c"), "", false).unwrap();
        o.write_at(MIB, &pattern(44, (20 * MIB) as usize), false)
            .unwrap();
        o.flush().unwrap();
        let mut at_c = content.clone();
        at_c[..(24 * MIB) as usize].copy_from_slice(&pattern(43, (24 * MIB) as usize));
        common::assert_image("o0@c", &read_all(&s, "o0@c"), &at_c);
        common::assert_clean(&s, "discard");
        drop(o);
        s.close().unwrap();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

fn which(tool: &str) -> bool {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Found by bench/scale.sh: a full store invalidated ~300 snapshots of an origin with a big
/// index, the reclaim that followed dirtied node after node inside the metadata reserve while
/// a tree commit ran beside it, the reserve ran out ("apply: no free block for metadata"),
/// the store was poisoned and every later origin write failed with EIO. An origin write must
/// never fail for lack of COW space: the snapshots go, the writes go on.
#[test]
fn a_full_store_invalidating_hundreds_of_snapshots_keeps_the_origin_writable() {
    const BLOCKS: usize = 32_768; // a 128 MiB origin
    let dir = tempfile::tempdir().unwrap();
    let content = pattern(3, BLOCKS * 4096);
    let (store, _) = common::real_setup(
        dir.path(),
        &format_opts(192 << 20, 65536),
        &[("o0", content)],
    );
    // A small cache makes a small dirty limit, and so a small metadata reserve: the index
    // here is big against it, as 1M mappings are against the default 64 MiB cache.
    let opts = OpenOptions {
        cache_bytes: Some(1 << 20),
        ..Default::default()
    };
    let s = Store::open(&store, &opts).unwrap();
    let o = s.volume("o0").unwrap();
    s.create_snapshot(&["o0"], Some("s1"), "", false).unwrap();
    let mib = vec![0x5au8; 1 << 20];
    for at in (0..BLOCKS as u64 * 4096).step_by(1 << 20) {
        o.write_at(at, &mib, false).unwrap();
    }
    for i in 0..300 {
        s.create_snapshot(&["o0"], Some(&format!("t{i}")), "", false)
            .unwrap();
    }
    // First writes all over the origin until the store is full, and on.
    let mut rng = 0x2545f4914f6cdd1du64;
    for i in 0..3 * BLOCKS {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let at = (rng % BLOCKS as u64) * 4096;
        if let Err(e) = o.write_at(at, &[i as u8; 4096], false) {
            panic!("origin write {i} failed: {e}");
        }
    }
    o.flush().expect("the origin's flush");
    let states: Vec<_> = s.snapshots().into_iter().map(|i| i.state).collect();
    assert!(
        states.contains(&SnapshotState::Invalid),
        "the store never filled: nothing was invalidated"
    );
    s.wait_reclaimed().unwrap();
    s.create_snapshot(&["o0"], Some("after"), "", false)
        .expect("a snapshot once the space came back");
    common::assert_clean(&s, "the full store");
    drop(o);
    s.close().unwrap();
}

/// `check`'s counts (what `mvsnap check` prints) are the store's: its mappings are the blocks
/// preserved, its snapshots the ones listed, its slots those `info` counts; a delete's reclaim
/// takes them down by what the snapshot alone held.
#[test]
fn check_counts_the_preserved_blocks_snapshots_and_slots() {
    const BS: u64 = 4096;
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = common::real_setup(
        dir.path(),
        &format_opts(64 * MIB, 4096),
        &[("o0", pattern(1, (8 * MIB) as usize))],
    );
    let s = Store::open(&store, &OpenOptions::default()).unwrap();
    let counts = |when: &str| {
        let r = s.check();
        assert!(r.errors.is_empty(), "{when}: {:?}", r.errors);
        let info = s.info();
        assert_eq!(r.mappings, info.mappings, "{when}");
        assert_eq!(r.slots_total, r.slots_used + r.slots_free, "{when}");
        assert_eq!(r.slots_free * BS, info.free_bytes, "{when}");
        assert_eq!(r.slots_used * BS, info.used_bytes, "{when}");
        assert_eq!(r.slots_total * BS, info.data_bytes, "{when}");
        r
    };
    let empty = counts("fresh");
    assert_eq!((empty.mappings, empty.snapshots), (0, 0));
    s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
    let o = s.volume("o0").unwrap();
    // 256 + 16 blocks' first writes since a.
    o.write_at(0, &pattern(2, MIB as usize), false).unwrap();
    o.write_at(4 * MIB, &pattern(3, 65536), false).unwrap();
    s.create_snapshot(&["o0"], Some("b"), "", false).unwrap();
    // One more since b.
    o.write_at(0, &pattern(4, BS as usize), false).unwrap();
    o.flush().unwrap();
    let both = counts("two snapshots");
    assert_eq!((both.mappings, both.snapshots), (273, 2));
    assert!(
        both.slots_used >= empty.slots_used + 273,
        "273 blocks preserved: {} slots used, {} before",
        both.slots_used,
        empty.slots_used
    );
    // a's copies serve a alone: its delete gives them back.
    s.delete_snapshot("o0@a").unwrap();
    s.wait_reclaimed().unwrap();
    let one = counts("a deleted");
    assert_eq!((one.mappings, one.snapshots), (1, 1));
    assert!(
        one.slots_used + 272 <= both.slots_used,
        "a's 272 blocks reclaimed: {} slots used, {} before",
        one.slots_used,
        both.slots_used
    );
    drop(o);
    s.close().unwrap();
}
