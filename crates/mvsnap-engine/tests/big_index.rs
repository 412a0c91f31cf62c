//! An index bigger than the node cache, used by several threads at once: first writes and
//! snapshot reads read tree nodes from the store without the state lock (a probe under the
//! lock, the reads without it) while commits shadow, free and reuse node blocks. Every byte of
//! every snapshot and of the origin is checked, live and after a reopen. And the cache's
//! budget holds: clean nodes, the open transaction's and a commit's together stay within it.

mod common;

use std::sync::Arc;

use mvsnap_engine::{OpenOptions, Store};

use common::{assert_volume_versions, format_opts, versioned_block, xorshift};

/// A 128 MiB origin of 4 KiB chunks: 32,768 mappings per overwrite, some 260 tree leaves or
/// more for one snapshot's copies, against a 1 MiB (256-node) cache.
const BLOCKS: u64 = 32_768;
const BS: usize = 4096;
const WRITERS: u64 = 3;
const WRITES_PER_WRITER: u64 = 1500;

/// The tree's RAM now: cached nodes, those the open transaction and a commit in flight hold,
/// and the overlay's entries.
fn held(s: &Store) -> u64 {
    let i = s.info();
    i.cache_used_bytes + i.dirty_bytes + i.committing_bytes + i.overlay_bytes
}

#[test]
fn first_writes_and_snapshot_reads_into_an_index_bigger_than_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = common::real_setup(
        dir.path(),
        &format_opts(512 << 20, 4096),
        &[("o0", common::versioned_image(BLOCKS, 0))],
    );
    let opts = OpenOptions {
        cache_bytes: Some(1 << 20),
        ..Default::default()
    };
    let s = Store::open(&store, &opts).unwrap();
    let o = s.volume("o0").unwrap();
    // s1 keeps version 0; the origin becomes version 1 (one copy-out per block).
    s.create_snapshot(&["o0"], Some("s1"), "", false).unwrap();
    let v1 = common::versioned_image(BLOCKS, 1);
    for at in (0..v1.len()).step_by(1 << 20) {
        o.write_at(at as u64, &v1[at..at + (1 << 20)], false)
            .unwrap();
    }
    drop(o);
    assert!(
        held(&s) <= 1 << 20,
        "{} bytes held after the overwrite",
        held(&s)
    );
    // The newest entries wait in the overlay, an eighth of the budget (a quarter more while
    // the fold waits for its next leaf to be read), for the fold.
    let info = s.info();
    assert!(
        info.overlay_entries > 0 && info.overlay_bytes <= (1 << 20) / 8 * 5 / 4,
        "overlay of {} entries, {} bytes",
        info.overlay_entries,
        info.overlay_bytes
    );
    s.create_snapshot(&["o0"], Some("s2"), "", false).unwrap();
    let info = s.info();
    assert!(
        info.metadata_bytes > 2 * info.cache_bytes,
        "the index ({} bytes) must outgrow the cache ({} bytes)",
        info.metadata_bytes,
        info.cache_bytes
    );

    // Writers of their own blocks (b % WRITERS), at random: first writes after s2, each
    // writing a version that names the writer and the write; a reader checks s1 and s2 at
    // random blocks meanwhile.
    let s = Arc::new(s);
    let writers: Vec<_> = (0..WRITERS)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                let o = s.volume("o0").unwrap();
                let mut last = std::collections::HashMap::new();
                let mut r = 0x9e37_79b9_7f4a_7c15 ^ (t + 1);
                for i in 0..WRITES_PER_WRITER {
                    let b = xorshift(&mut r) % (BLOCKS / WRITERS) * WRITERS + t;
                    let v = 2 + t * WRITES_PER_WRITER + i;
                    o.write_at(b * BS as u64, &versioned_block(b, v), false)
                        .unwrap();
                    last.insert(b, v);
                }
                last
            })
        })
        .collect();
    let reader = {
        let s = s.clone();
        std::thread::spawn(move || {
            let (s1, s2) = (s.volume("o0@s1").unwrap(), s.volume("o0@s2").unwrap());
            let mut r = 0x2545_f491_4f6c_dd1d;
            let mut buf = vec![0u8; BS];
            let mut most_held = 0;
            for i in 0..3000 {
                if i % 16 == 0 {
                    most_held = most_held.max(held(&s));
                }
                let b = xorshift(&mut r) % BLOCKS;
                for (vol, v) in [(&s1, 0), (&s2, 1)] {
                    vol.read_at(b * BS as u64, &mut buf).unwrap();
                    assert!(
                        buf == versioned_block(b, v),
                        "block {b} of version {v} read under load"
                    );
                }
            }
            most_held
        })
    };
    let mut written = std::collections::HashMap::new();
    for w in writers {
        written.extend(w.join().unwrap());
    }
    let most_held = reader.join().unwrap();
    // Before, the open transaction's nodes and a commit's came on top of a full cache.
    assert!(
        most_held <= info.cache_bytes,
        "the tree held {most_held} bytes of RAM, over its {} byte budget",
        info.cache_bytes
    );
    let origin = |b: u64| written.get(&b).copied().unwrap_or(1);
    let s = Arc::into_inner(s).unwrap();
    s.create_snapshot(&["o0"], Some("s3"), "", false).unwrap();
    let check = |s: &Store, when: &str| {
        assert_volume_versions(s, "o0@s1", when, BLOCKS, |_| 0);
        assert_volume_versions(s, "o0@s2", when, BLOCKS, |_| 1);
        assert_volume_versions(s, "o0@s3", when, BLOCKS, origin);
        assert_volume_versions(s, "o0", when, BLOCKS, origin);
    };
    check(&s, "live");
    common::assert_clean(&s, "after the writes");
    drop(s);
    let s = Store::open(&store, &opts).unwrap();
    let opened = s.info();
    check(&s, "after a reopen");
    // The reads went through a cold cache smaller than the index: `info` counts the nodes
    // they read (more than the cache holds) and the lookups the cache served (most: a leaf
    // serves every block of it in a row).
    let read = s.info();
    let nodes_read = read.cache_misses - opened.cache_misses;
    let hits = read.cache_hits - opened.cache_hits;
    assert!(
        nodes_read * 4096 > read.cache_bytes && hits > nodes_read,
        "{nodes_read} nodes read and {hits} hits over a whole read of a {} byte index, {} byte cache",
        read.metadata_bytes,
        read.cache_bytes
    );
    common::assert_clean(&s, "after a reopen");
}
