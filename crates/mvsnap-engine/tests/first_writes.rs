//! What a first write after a snapshot looks up, and that the shortcut it takes keeps every
//! snapshot right over a long history.
//!
//! A first write must know through which generation its block is already preserved, so its
//! copy serves the generations after that one only. The written bitmaps of the last epochs
//! say it (small and cached); the preserved entries say it too, but they are the big part of
//! the index, one leaf per few hundred blocks, mostly not cached on a big origin. The first
//! test counts the nodes first writes read from the store; the second runs 40 generations
//! (some deleted) where blocks were last written 1 to 40 epochs before, so both the bitmaps'
//! answer and the entries' (past the bitmaps' look-back) are taken, and reads every snapshot.

mod common;

use std::collections::BTreeMap;

use mvsnap_engine::{OpenOptions, Store};

use common::{assert_volume_versions, format_opts, versioned_block, versioned_image, xorshift};

const BS: usize = 4096;

#[test]
fn first_writes_after_a_snapshot_read_no_preserved_entries() {
    // 32,768 blocks preserved once: some 300 leaves of entries, more than the 1 MiB cache's
    // 256 nodes; the written bitmaps of an epoch are 256 entries, a few leaves.
    const BLOCKS: u64 = 32_768;
    const WRITES: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = common::real_setup(
        dir.path(),
        &format_opts(512 << 20, 4096),
        &[("o0", versioned_image(BLOCKS, 0))],
    );
    let opts = OpenOptions {
        cache_bytes: Some(1 << 20),
        ..Default::default()
    };
    let s = Store::open(&store, &opts).unwrap();
    s.create_snapshot(&["o0"], Some("s1"), "", false).unwrap();
    let o = s.volume("o0").unwrap();
    let v1 = versioned_image(BLOCKS, 1);
    for at in (0..v1.len()).step_by(1 << 20) {
        o.write_at(at as u64, &v1[at..at + (1 << 20)], false)
            .unwrap();
    }
    drop(o);
    s.create_snapshot(&["o0"], Some("s2"), "", false).unwrap();
    drop(s);

    // Cold: a new cache. Every write below is a block's first since s2.
    let s = Store::open(&store, &opts).unwrap();
    let o = s.volume("o0").unwrap();
    let mut r = 0x9e37_79b9_7f4a_7c15u64;
    let mut written = BTreeMap::new();
    while written.len() < WRITES {
        written.insert(xorshift(&mut r) % BLOCKS, 2 + written.len() as u64);
    }
    let before = s.info();
    for (&b, &v) in &written {
        o.write_at(b * BS as u64, &versioned_block(b, v), false)
            .unwrap();
    }
    let after = s.info();
    let nodes_read = after.cache_misses - before.cache_misses;
    assert_eq!(after.mappings - before.mappings, WRITES as u64);
    // The preserved entries' leaves would be most of a thousand reads (every write another
    // leaf); the bitmaps and the path to them, a few dozen at most.
    assert!(
        nodes_read < 50,
        "{WRITES} first writes read {nodes_read} index nodes from the store"
    );
    drop(o);
    let check = |s: &Store, when: &str| {
        assert_volume_versions(s, "o0@s1", when, BLOCKS, |_| 0);
        assert_volume_versions(s, "o0@s2", when, BLOCKS, |_| 1);
        assert_volume_versions(s, "o0", when, BLOCKS, |b| {
            written.get(&b).copied().unwrap_or(1)
        });
    };
    check(&s, "live");
    common::assert_clean(&s, "after the first writes");
    // Closed, not dropped: a drop is a crash, and the last writes were never flushed.
    s.close().unwrap();
    let s = Store::open(&store, &opts).unwrap();
    check(&s, "after a reopen");
    common::assert_clean(&s, "after a reopen");
}

#[test]
fn blocks_last_written_up_to_forty_epochs_back_are_preserved_right() {
    const BLOCKS: u64 = 48;
    const GENS: u64 = 40;
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = common::real_setup(
        dir.path(),
        &format_opts(64 << 20, 4096),
        &[("o0", versioned_image(BLOCKS, 0))],
    );
    let s = Store::open(&store, &OpenOptions::default()).unwrap();
    let o = s.volume("o0").unwrap();
    // The version each block holds now, and each live snapshot's expected image.
    let mut now: Vec<u64> = vec![0; BLOCKS as usize];
    let mut snaps: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for g in 1..=GENS {
        s.create_snapshot(&["o0"], Some(&format!("g{g}")), "", false)
            .unwrap();
        snaps.insert(g, now.clone());
        // Block b is written every (b + 1)th epoch: block 0 in every one, block 39 once, in
        // epoch 40 (never before: nothing preserved), blocks 40.. never.
        for b in 0..BLOCKS {
            if g % (b + 1) == 0 {
                let v = g * 100 + b;
                o.write_at(b * BS as u64, &versioned_block(b, v), false)
                    .unwrap();
                now[b as usize] = v;
            }
        }
        // Every third snapshot goes an epoch later: its entries shrink or go, and blocks
        // written around it are preserved for ranges with dead generations in them.
        if g % 3 == 2 && g > 2 {
            s.delete_snapshot(&format!("o0@g{}", g - 1)).unwrap();
            snaps.remove(&(g - 1));
        }
    }
    drop(o);
    let check = |s: &Store, when: &str| {
        for (g, want) in &snaps {
            let name = format!("o0@g{g}");
            assert_volume_versions(s, &name, when, BLOCKS, |b| want[b as usize]);
        }
        assert_volume_versions(s, "o0", when, BLOCKS, |b| now[b as usize]);
    };
    check(&s, "live");
    common::assert_clean(&s, "after 40 generations");
    // Closed, not dropped: a drop is a crash, and the last writes were never flushed.
    s.close().unwrap();
    let s = Store::open(&store, &OpenOptions::default()).unwrap();
    check(&s, "after a reopen");
    common::assert_clean(&s, "after a reopen");
}
