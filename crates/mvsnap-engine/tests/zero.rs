//! Zeros cost snapshots nothing (issue 7 item 1): a TRIM or WRITE_ZEROES of a range that was
//! never written, or a write over a sparse origin, used to preserve all-zero chunks until the
//! store filled and the snapshot was invalidated. On real files, so holes and allocation are
//! the file system's.

mod common;

use std::os::unix::fs::MetadataExt;

use mvsnap_engine::{OpenOptions, SnapshotState, Store};

use common::{format_opts, pattern, read_all};

const MIB: u64 = 1 << 20;

/// A sparse origin of `size` bytes with 1 MiB of data at its start, a store of `store` bytes,
/// and a snapshot `a`.
fn sparse_setup(
    dir: &std::path::Path,
    size: u64,
    store: u64,
) -> (Store, std::path::PathBuf, Vec<u8>) {
    let origin = dir.join("o0");
    let data = pattern(51, MIB as usize);
    std::fs::write(&origin, &data).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&origin)
        .unwrap()
        .set_len(size)
        .unwrap();
    let path = dir.join("store");
    Store::format(&path, &format_opts(store, 65536)).unwrap();
    let s = Store::open(&path, &OpenOptions::default()).unwrap();
    s.add_origin(&origin, Some("o0")).unwrap();
    s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
    (s, origin, data)
}

fn allocated(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn snapshot_valid(s: &Store) -> bool {
    s.snapshots()
        .iter()
        .all(|i| i.state == SnapshotState::Valid)
}

/// The case: a 256 MiB sparse origin with 1 MiB of data, a 64 MiB store, a snapshot;
/// a TRIM of the 248 MiB never written wrote real zeros into the origin, preserved zero chunks
/// until the store was full and invalidated the snapshot.
#[test]
fn trim_of_never_written_range_keeps_snapshot_valid_and_store_empty() {
    let dir = tempfile::tempdir().unwrap();
    let (s, origin, data) = sparse_setup(dir.path(), 256 * MIB, 64 * MIB);
    let used0 = s.info().used_bytes;
    let o = s.volume("o0").unwrap();
    o.trim(8 * MIB, 248 * MIB).unwrap();
    o.zero_range(4 * MIB, 4 * MIB, true, true).unwrap();
    o.flush().unwrap();
    assert!(snapshot_valid(&s), "{:?}", s.snapshots());
    assert_eq!(
        s.info().used_bytes,
        used0,
        "zeros were preserved into the store"
    );
    assert!(
        allocated(&origin) < 4 * MIB,
        "the origin was filled with zeros: {} bytes allocated",
        allocated(&origin)
    );
    let mut want = vec![0u8; 256 * MIB as usize];
    want[..MIB as usize].copy_from_slice(&data);
    common::assert_image("o0@a", &read_all(&s, "o0@a"), &want);
    common::assert_image("o0", &read_all(&s, "o0"), &want);
    common::assert_clean(&s, "after the trim");
    s.close().unwrap();
}

/// A trim of data the snapshot needs preserves it first, then punches the origin.
#[test]
fn trim_of_data_preserves_it_then_punches_the_origin() {
    let dir = tempfile::tempdir().unwrap();
    let (s, origin, data) = sparse_setup(dir.path(), 16 * MIB, 16 * MIB);
    let before = allocated(&origin);
    let o = s.volume("o0").unwrap();
    o.trim(0, 16 * MIB).unwrap();
    o.flush().unwrap();
    assert!(allocated(&origin) < before, "the data was not punched out");
    let mut want = vec![0u8; 16 * MIB as usize];
    common::assert_image("o0", &read_all(&s, "o0"), &want);
    want[..MIB as usize].copy_from_slice(&data);
    common::assert_image("o0@a", &read_all(&s, "o0@a"), &want);
    common::assert_clean(&s, "after the trim");
    // And after a reopen.
    let path = dir.path().join("store");
    drop(o);
    s.close().unwrap();
    let s = Store::open(&path, &OpenOptions::default()).unwrap();
    common::assert_image("o0@a after reopen", &read_all(&s, "o0@a"), &want);
    common::assert_clean(&s, "reopened");
}

/// 3 GiB written over a sparse 4 GiB origin after a snapshot used 3 GiB of store for zeros.
/// Scaled: 96 MiB written over the holes of a 128 MiB origin with a 16 MiB store.
#[test]
fn write_over_sparse_origin_preserves_no_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _origin, data) = sparse_setup(dir.path(), 128 * MIB, 16 * MIB);
    let used0 = s.info().used_bytes;
    let o = s.volume("o0").unwrap();
    let new = pattern(52, MIB as usize);
    for m in 8..104u64 {
        o.write_at(m * MIB, &new, false).unwrap();
    }
    // Data the snapshot needs is still preserved, and zeros joining it in one chunk too.
    o.write_at(512 * 1024, &new, false).unwrap();
    o.flush().unwrap();
    assert!(snapshot_valid(&s), "{:?}", s.snapshots());
    // Data: the 512 KiB of it the write replaced. Metadata: a zero entry per block written
    // over a hole (format v2 records them per 4 KiB block), at most 64 bytes each.
    let used = s.info().used_bytes - used0;
    let written_blocks = (97 * MIB) / 4096;
    assert!(
        used <= MIB + written_blocks * 64,
        "{used} bytes of store for 512 KiB of data and {written_blocks} zero entries"
    );
    let mut want = vec![0u8; 128 * MIB as usize];
    want[..MIB as usize].copy_from_slice(&data);
    common::assert_image("o0@a", &read_all(&s, "o0@a"), &want);
    common::assert_clean(&s, "after the writes");
}
