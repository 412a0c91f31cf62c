//! An ephemeral session (blksnap's backup model: nothing synced, every snapshot gone when it
//! ends) never commits its tree. Its changed metadata used to stay in RAM for the whole
//! session, growing with every first write; it is now written out, uncommitted, whenever the
//! dirty-node limit is reached. What must hold: RAM bounded, every read exact, and a power cut
//! at any point still leaves the store as the session found it.

mod common;

use mvsnap_engine::crashsim::CrashPolicy;
use mvsnap_engine::{OpenOptions, Store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::{assert_clean, assert_image, format_opts, pattern, read_all};

const BLOCK: usize = 4096;
const ORIGIN: usize = 32 << 20;
/// A small cache: its dirty limit is a fifth of it (51 nodes of 4 KiB).
const CACHE: u64 = 1 << 20;

fn ephemeral() -> OpenOptions {
    OpenOptions {
        ephemeral: true,
        cache_bytes: Some(CACHE),
        ..Default::default()
    }
}

/// Scattered first writes (each a copy-out and a new leaf entry) in an ephemeral session.
/// Returns the origin's expected content.
fn scattered_writes(s: &Store, before: &[u8], n: usize, seed: u64, max_dirty: &mut u64) -> Vec<u8> {
    let mut want = before.to_vec();
    let o = s.volume("o0").unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..n {
        let at = rng.random_range(0..ORIGIN / BLOCK) * BLOCK;
        let data = pattern(seed * 1_000_003 + i as u64, BLOCK);
        o.write_at(at as u64, &data, false).unwrap();
        want[at..at + BLOCK].copy_from_slice(&data);
        if i % 64 == 0 {
            *max_dirty = (*max_dirty).max(s.info().dirty_bytes);
        }
    }
    want
}

#[test]
fn an_ephemeral_session_keeps_its_metadata_ram_bounded_and_reads_exact() {
    let dir = tempfile::tempdir().unwrap();
    let content = pattern(1, ORIGIN);
    let (store, _) = common::real_setup(
        dir.path(),
        &format_opts(96 << 20, BLOCK as u32),
        &[("o0", content.clone())],
    );
    let s = Store::open(&store, &ephemeral()).unwrap();
    s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
    let mut max_dirty = 0;
    let after_a = scattered_writes(&s, &content, 6000, 2, &mut max_dirty);
    s.create_snapshot(&["o0"], Some("b"), "", false).unwrap();
    let now = scattered_writes(&s, &after_a, 3000, 3, &mut max_dirty);
    // Thousands of leaf entries changed; at most the limit of them (plus one record's worth)
    // is held in RAM at any time. Without the write-out this was every one of them.
    let mappings = s.info().mappings;
    assert!(
        mappings > 5000,
        "only {mappings} mappings: the test did not grow the tree"
    );
    assert!(
        max_dirty <= 64 * BLOCK as u64,
        "ephemeral session held {max_dirty} bytes of dirty metadata (limit 51 nodes)"
    );
    // Nodes written out are read back through the cache (1 MiB: most were evicted).
    assert_image("o0@a", &read_all(&s, "o0@a"), &content);
    assert_image("o0@b", &read_all(&s, "o0@b"), &after_a);
    assert_image("o0", &read_all(&s, "o0"), &now);
    assert_clean(&s, "an ephemeral session that wrote its metadata out");
    s.close().unwrap();

    // The session is over: its snapshots are gone, its blocks free, the origin as written.
    let s = Store::open(&store, &OpenOptions::default()).unwrap();
    assert!(s.snapshots().is_empty(), "{:?}", s.snapshots());
    assert_eq!(s.info().mappings, 0);
    assert_image("o0 after the session", &read_all(&s, "o0"), &now);
    assert_clean(&s, "reopening after an ephemeral session");
    s.close().unwrap();
}

/// The blocks written out uncommitted are free in the durable space map and named by no
/// header: a power cut mid-session (any write order the disk chose) must reopen as the
/// store was before the session, whatever those blocks hold.
#[test]
fn a_power_cut_in_an_ephemeral_session_leaves_the_store_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let content = pattern(4, ORIGIN);
    let (m, s) = common::sim_setup(
        dir.path(),
        &format_opts(96 << 20, BLOCK as u32),
        &[("o0", content.clone())],
    );
    s.close().unwrap();
    for (seed, policy) in [
        (5, CrashPolicy::DropAll),
        (6, CrashPolicy::KeepAll),
        (
            7,
            CrashPolicy::Random {
                drop: 0.5,
                tear: 0.3,
            },
        ),
    ] {
        let m = m.crash_all_with(&mut StdRng::seed_from_u64(seed), CrashPolicy::KeepAll);
        let s = m.open_store(&ephemeral()).unwrap();
        s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
        let mut max_dirty = 0;
        scattered_writes(&s, &content, 3000, seed, &mut max_dirty);
        assert_image("o0@a", &read_all(&s, "o0@a"), &content);
        let after = m.crash_all_with(&mut StdRng::seed_from_u64(seed), policy);
        drop(s);
        let s = after.open_store(&OpenOptions::default()).unwrap();
        assert!(s.snapshots().is_empty(), "{policy:?}: {:?}", s.snapshots());
        assert_eq!(s.info().mappings, 0, "{policy:?}");
        assert_clean(
            &s,
            &format!("a power cut in an ephemeral session ({policy:?})"),
        );
        // The origin's own writes were never synced either (an ephemeral session promises
        // nothing of them): it reads, whatever each block kept.
        assert_eq!(read_all(&s, "o0").len(), ORIGIN);
        s.close().unwrap();
    }
}
