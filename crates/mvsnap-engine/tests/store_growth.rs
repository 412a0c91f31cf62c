//! A store that grows on demand, cut by a power loss at every device operation of its first
//! growth (issue 7 item 6). The simulator may keep writes into the new region and lose the
//! size change, or the reverse, as a file system may.

mod common;

use mvsnap_engine::crashsim::{CrashPolicy, SimMachine};
use mvsnap_engine::{FormatOptions, OpenOptions, Store};
use rand::rngs::StdRng;
use rand::SeedableRng;

use common::{format_opts, pattern, read_all};

const MIB: usize = 1 << 20;
const CHUNK: usize = 65536;

/// A store one chunk short of growing, closed and reopened: the next copy-out grows it, and
/// it is also the first record of this open, so the new-epoch superblock that records the
/// grown size goes out in the same group (the case the power-loss replay found).
fn grow_setup(dir: &std::path::Path, content: &[u8], new: &[u8], k: usize) -> (SimMachine, Store) {
    let opts = FormatOptions {
        max_size: 512 << 20,
        ..format_opts(3 << 20, CHUNK as u32)
    };
    let (m, s) = common::sim_setup(dir, &opts, &[("o0", content.to_vec())]);
    s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
    workload(&s, &new[..k * CHUNK]).unwrap();
    s.close().unwrap();
    let s = m.open_store(&OpenOptions::default()).unwrap();
    (m, s)
}

/// How many chunks can be overwritten before the store grows.
fn chunks_before_growth(content: &[u8], new: &[u8]) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let (m, s) = grow_setup(dir.path(), content, new, 0);
    let len0 = m.store_disk().unwrap().volatile_image().len();
    let o = s.volume("o0").unwrap();
    for c in 0..new.len() / CHUNK {
        o.write_at((c * CHUNK) as u64, &new[c * CHUNK..(c + 1) * CHUNK], false)
            .unwrap();
        if m.store_disk().unwrap().volatile_image().len() > len0 {
            return c;
        }
    }
    panic!("the workload does not grow the store");
}

/// Overwrite the origin chunk by chunk from `from`: the small store fills and grows.
fn workload_from(s: &Store, new: &[u8], from: usize) -> mvsnap_engine::Result<()> {
    let o = s.volume("o0")?;
    for c in from..new.len() / CHUNK {
        o.write_at((c * CHUNK) as u64, &new[c * CHUNK..(c + 1) * CHUNK], false)?;
    }
    o.flush()
}

fn workload(s: &Store, new: &[u8]) -> mvsnap_engine::Result<()> {
    workload_from(s, new, 0)
}

/// Was: "store is truncated: 1376256 bytes, it had 68485120" and every snapshot unreadable.
#[test]
fn power_cut_during_store_growth_keeps_the_store_openable() {
    let content = pattern(11, 4 * MIB);
    let new = pattern(12, 4 * MIB);
    let k = chunks_before_growth(&content, &new);
    assert!(k > 4, "the store holds a few chunks before it grows ({k})");
    // How many device operations the rest of the overwrite takes, growth included.
    let dir = tempfile::tempdir().unwrap();
    let (m, s) = grow_setup(dir.path(), &content, &new, k);
    let before = m.ops();
    workload_from(&s, &new, k).unwrap();
    let total = m.ops() - before;
    s.close().unwrap();

    let policies = [
        CrashPolicy::KeepAll,
        CrashPolicy::DropAll,
        CrashPolicy::PrefixTornLast,
        CrashPolicy::Random {
            drop: 0.5,
            tear: 0.0,
        },
        CrashPolicy::Random {
            drop: 0.3,
            tear: 0.3,
        },
    ];
    let mut points = 0;
    for n in 0..=total {
        let dir = tempfile::tempdir().unwrap();
        let (m, s) = grow_setup(dir.path(), &content, &new, k);
        m.power_off_after(n);
        let _ = workload_from(&s, &new, k);
        for (i, &policy) in policies.iter().enumerate() {
            let mut rng = StdRng::seed_from_u64(n * 16 + i as u64);
            let m2 = m.crash_all_with(&mut rng, policy);
            let s2 = m2
                .open_store(&OpenOptions::default())
                .unwrap_or_else(|e| panic!("power cut after {n} ops, {policy:?}: open: {e}"));
            common::assert_image(
                &format!("o0@a after a power cut after {n} ops, {policy:?}"),
                &read_all(&s2, "o0@a"),
                &content,
            );
            common::assert_clean(&s2, &format!("power cut after {n} ops, {policy:?}"));
            // And it goes on: the rest of the overwrite completes on the recovered store.
            workload(&s2, &new).unwrap();
            common::assert_image("o0@a after finishing", &read_all(&s2, "o0@a"), &content);
            s2.close().unwrap();
            points += 1;
        }
        drop(s);
    }
    eprintln!("{points} power cuts over {total} device operations");
}
