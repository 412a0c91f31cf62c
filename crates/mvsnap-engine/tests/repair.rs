//! `check --repair` on stores damaged the way disks damage them: a tree leaf and a space map
//! bitmap that no longer read back (bit rot, a torn sector). The repair keeps every byte it can
//! still find, invalidates exactly the snapshots that lost data, and leaves a store that checks
//! clean and reopens.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use mvsnap_engine::{OpenOptions, SnapshotState, Store};

use common::{format_opts, pattern, read_all};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;

/// Every 4 KiB block of the file that starts with `magic` (a metadata node or bitmap, live or
/// stale), with its bytes.
fn blocks_with_magic(path: &Path, magic: &[u8; 4]) -> Vec<(u64, Vec<u8>)> {
    let data = std::fs::read(path).unwrap();
    data.chunks(BLOCK as usize)
        .enumerate()
        .filter(|(_, b)| b.len() == BLOCK as usize && &b[..4] == magic)
        .map(|(i, b)| (i as u64 * BLOCK, b.to_vec()))
        .collect()
}

/// Flip a byte in the middle of the block at `at` (its checksum no longer matches).
fn rot(path: &Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at + 2000).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, at + 2000).unwrap();
    f.sync_all().unwrap();
}

fn restore(path: &Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
    f.sync_all().unwrap();
}

struct Setup {
    _dir: tempfile::TempDir,
    store: std::path::PathBuf,
    o0: Vec<u8>,
    o0_now: Vec<u8>,
    o1: Vec<u8>,
    o1_now: Vec<u8>,
}

/// Two origins with a snapshot each; o0's snapshot holds 4,096 scattered preserved blocks
/// (dozens of leaves), o1's a few.
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let o0 = pattern(11, (32 * MIB) as usize);
    let o1 = pattern(12, (8 * MIB) as usize);
    let (store, _) = common::real_setup(
        dir.path(),
        &format_opts(128 * MIB, 65536),
        &[("o0", o0.clone()), ("o1", o1.clone())],
    );
    let s = Store::open(&store, &OpenOptions::default()).unwrap();
    s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
    s.create_snapshot(&["o1"], Some("b"), "", false).unwrap();
    let mut o0_now = o0.clone();
    let v = s.volume("o0").unwrap();
    let new = pattern(13, BLOCK as usize);
    for i in (0..32 * MIB / BLOCK).step_by(2) {
        v.write_at(i * BLOCK, &new, false).unwrap();
        o0_now[(i * BLOCK) as usize..((i + 1) * BLOCK) as usize].copy_from_slice(&new);
    }
    let mut o1_now = o1.clone();
    let v1 = s.volume("o1").unwrap();
    let new1 = pattern(14, (MIB) as usize);
    v1.write_at(3 * MIB, &new1, false).unwrap();
    o1_now[(3 * MIB) as usize..(4 * MIB) as usize].copy_from_slice(&new1);
    drop((v, v1));
    s.close().unwrap();
    Setup {
        _dir: dir,
        store,
        o0,
        o0_now,
        o1,
        o1_now,
    }
}

fn open(path: &Path) -> Store {
    Store::open(path, &OpenOptions::default()).unwrap()
}

#[test]
fn a_rotten_leaf_loses_only_the_snapshots_that_needed_it() {
    let t = setup();
    // A live leaf in the middle of o0's preserved entries: rot it, keep it if check sees it.
    let mut damaged = None;
    for (at, bytes) in blocks_with_magic(&t.store, b"MVBT") {
        // A leaf (kind 1) whose first and last keys are preserved entries ('P').
        let count = u16::from_le_bytes([bytes[10], bytes[11]]) as usize;
        if bytes[8] != 1 || count < 8 || bytes[32] != b'P' || bytes[32 + 16 * (count - 1)] != b'P' {
            continue;
        }
        rot(&t.store, at);
        let s = open(&t.store);
        let r = s.check();
        let hits_o0 = r.errors.iter().any(|e| e.contains("o0"));
        drop(s);
        if !r.is_clean() && hits_o0 && !r.errors.iter().any(|e| e.contains("o1")) {
            damaged = Some(at);
            break;
        }
        restore(&t.store, at, &bytes);
    }
    let at = damaged.expect("a live leaf of o0's preserved entries");
    let s = open(&t.store);
    let rep = s.repair().unwrap();
    assert!(rep.tree_rebuilt, "{rep:?}");
    assert_eq!(rep.lost.len(), 1, "{rep:?}");
    assert_eq!(rep.invalidated, vec!["o0@a".to_string()], "{rep:?}");
    assert!(rep.check.is_clean(), "check after repair: {:?}", rep.check);
    // What the invalidated snapshot held is reclaimed inside the repair (one commit), not
    // left to the background: only o1@b's 256 blocks (its 1 MiB) stay mapped.
    assert_eq!(s.info().mappings, 256, "mappings right after the repair");
    // The origins never lose a byte; o1's snapshot is untouched.
    common::assert_image("o0", &read_all(&s, "o0"), &t.o0_now);
    common::assert_image("o1", &read_all(&s, "o1"), &t.o1_now);
    common::assert_image("o1@b", &read_all(&s, "o1@b"), &t.o1);
    let a = s
        .snapshots()
        .into_iter()
        .find(|x| x.name == "o0@a")
        .unwrap();
    assert_eq!(a.state, SnapshotState::Invalid, "{a:?}");
    assert!(
        read_all_result(&s, "o0@a").is_err(),
        "an invalidated snapshot must not read"
    );
    // Writes go on and preserve for a new snapshot; everything survives a reopen.
    s.create_snapshot(&["o0"], Some("c"), "", false).unwrap();
    let v = s.volume("o0").unwrap();
    v.write_at(0, &pattern(15, MIB as usize), false).unwrap();
    drop(v);
    s.close().unwrap();
    let s = open(&t.store);
    common::assert_clean(&s, "reopen after repair");
    common::assert_image("o0@c", &read_all(&s, "o0@c"), &t.o0_now);
    common::assert_image("o1@b after reopen", &read_all(&s, "o1@b"), &t.o1);
    let _ = (at, &t.o0);
}

fn read_all_result(s: &Store, name: &str) -> mvsnap_engine::Result<Vec<u8>> {
    let v = s.volume(name)?;
    let mut buf = vec![0u8; v.size() as usize];
    v.read_at(0, &mut buf)?;
    Ok(buf)
}

#[test]
fn a_rotten_space_map_bitmap_is_rebuilt_from_the_tree() {
    let t = setup();
    // Both slots of every bitmap: the durable one among them cannot be read.
    let bitmaps = blocks_with_magic(&t.store, b"MVSM");
    assert!(!bitmaps.is_empty());
    for (at, _) in &bitmaps {
        rot(&t.store, *at);
    }
    let s = open(&t.store);
    assert!(!s.check().is_clean(), "check must see the rotten bitmaps");
    let rep = s.repair().unwrap();
    assert!(rep.bitmaps_rewritten >= 1, "{rep:?}");
    assert!(!rep.tree_rebuilt, "{rep:?}");
    assert!(rep.invalidated.is_empty(), "{rep:?}");
    assert!(rep.check.is_clean(), "check after repair: {:?}", rep.check);
    common::assert_image("o0@a", &read_all(&s, "o0@a"), &t.o0);
    common::assert_image("o1@b", &read_all(&s, "o1@b"), &t.o1);
    // New space comes from the rebuilt map without overwriting anything.
    let v = s.volume("o1").unwrap();
    v.write_at(0, &pattern(16, (2 * MIB) as usize), false)
        .unwrap();
    drop(v);
    common::assert_image("o1@b after more writes", &read_all(&s, "o1@b"), &t.o1);
    common::assert_image("o0@a after more writes", &read_all(&s, "o0@a"), &t.o0);
    s.close().unwrap();
    let s = open(&t.store);
    common::assert_clean(&s, "reopen after repair");
    common::assert_image("o0@a after reopen", &read_all(&s, "o0@a"), &t.o0);
    let _ = &t.o0_now;
}

/// A repair of a healthy store changes nothing that matters: same bytes, nothing lost or
/// invalidated, still clean.
#[test]
fn repair_of_a_clean_store_changes_nothing() {
    let t = setup();
    let s = open(&t.store);
    let rep = s.repair().unwrap();
    assert_eq!(
        (rep.blocks_leaked, rep.blocks_lost, rep.bitmaps_rewritten),
        (0, 0, 0),
        "{rep:?}"
    );
    assert!(
        !rep.tree_rebuilt && !rep.counters_fixed && rep.lost.is_empty(),
        "{rep:?}"
    );
    assert!(rep.check.is_clean(), "{:?}", rep.check);
    common::assert_image("o0@a", &read_all(&s, "o0@a"), &t.o0);
    common::assert_image("o1@b", &read_all(&s, "o1@b"), &t.o1);
}
