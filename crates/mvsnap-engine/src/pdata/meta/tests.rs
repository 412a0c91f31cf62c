//! Commits on the power-loss simulator: the power goes off at every point of a run of
//! commits (writes dropped, kept or torn, as crashsim models them), and the device reopens to
//! the last commit that returned or the one in flight, never anything else, with the space
//! map agreeing with the tree block for block.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::crashsim::{CrashPolicy, SimMachine};

/// Small, so the allocation cursor wraps around often and freed blocks are soon reused.
const BLOCKS: u64 = 256;
const PATH: &str = "/sim/meta";

fn ukey(n: u64) -> Key {
    let mut k = [0u8; 16];
    k[0] = b'U';
    k[8..].copy_from_slice(&n.to_be_bytes());
    k
}

fn uval(n: u64, salt: u64) -> Value {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&n.to_le_bytes());
    v[8..].copy_from_slice(&salt.to_le_bytes());
    v
}

fn user_entries(m: &Meta) -> BTreeMap<Key, Value> {
    let mut out = BTreeMap::new();
    m.for_each_from(&ukey(0), &mut |k, v| {
        if k[0] != b'U' {
            return false;
        }
        // A walk meets each key once, even one both in the overlay and in the tree.
        assert!(out.insert(*k, *v).is_none(), "key {k:?} met twice");
        true
    })
    .unwrap();
    out
}

fn disk(m: &SimMachine) -> Arc<dyn BlockDev> {
    m.disk(Path::new(PATH)).expect("the disk")
}

/// A transaction of random inserts and removes, applied to `model` too.
fn random_change(
    rng: &mut StdRng,
    model: &mut BTreeMap<Key, Value>,
    salt: u64,
) -> Vec<(u64, bool)> {
    let n = rng.random_range(1..400);
    (0..n)
        .map(|_| {
            let k = rng.random_range(0..2000);
            let insert = rng.random_bool(0.7);
            if insert {
                model.insert(ukey(k), uval(k, salt));
            } else {
                model.remove(&ukey(k));
            }
            (k, insert)
        })
        .collect()
}

/// The inserts and removes of `ops` (as `random_change` made them) in a transaction.
fn apply_ops(t: &mut Txn<TxnAlloc>, ops: &[(u64, bool)], salt: u64) -> PResult<()> {
    for &(k, insert) in ops {
        if insert {
            t.insert(ukey(k), uval(k, salt))?;
        } else {
            t.remove(&ukey(k))?;
        }
    }
    Ok(())
}

fn apply(m: &mut Meta, ops: &[(u64, bool)], salt: u64) -> PResult<CommitStats> {
    m.update(|t| apply_ops(t, ops, salt))
}

#[test]
fn a_power_cut_anywhere_in_commits_finds_the_last_or_the_next_version() {
    let cases: u64 = std::env::var("MVSNAP_CRASH_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    for seed in 0..cases {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut machine = SimMachine::new();
        machine.add_disk(Path::new(PATH), vec![0u8; (BLOCKS * 4096) as usize], false);
        // A cache of 8 nodes: the tree is read back from the device all the time.
        let cache = 8 * NODE_SIZE as u64;
        let mut m = Meta::format(disk(&machine), BLOCKS, cache).unwrap();
        let mut durable = BTreeMap::new();
        let mut salt = 1;
        for round in 0..4 {
            machine.power_off_after(rng.random_range(0..300));
            let mut inflight = None;
            for _ in 0..12 {
                let mut next = durable.clone();
                let ops = random_change(&mut rng, &mut next, salt);
                salt += 1;
                match apply(&mut m, &ops, salt - 1) {
                    Ok(_) => durable = next,
                    Err(_) => {
                        assert!(
                            machine.is_off(),
                            "seed {seed}: a commit failed with power on"
                        );
                        inflight = Some(next);
                        break;
                    }
                }
            }
            let policy = CrashPolicy::random(&mut rng);
            drop(m);
            machine = machine.crash_all_with(&mut rng, policy);
            m = Meta::open(disk(&machine), cache)
                .unwrap_or_else(|e| panic!("seed {seed} round {round}: reopen: {e}"));
            let got = user_entries(&m);
            if got != durable {
                assert!(
                    inflight.as_ref() == Some(&got),
                    "seed {seed} round {round} ({policy:?}): the tree holds neither the last \
                     committed version ({} entries) nor the one in flight ({:?}): {} entries",
                    durable.len(),
                    inflight.as_ref().map(|i| i.len()),
                    got.len()
                );
                durable = got;
            }
            m.check(&[])
                .unwrap_or_else(|e| panic!("seed {seed} round {round}: check: {e}"));
        }
    }
}

fn dkey(n: u64) -> Key {
    let mut k = [0u8; 16];
    k[0] = b'D';
    k[8..].copy_from_slice(&n.to_be_bytes());
    k
}

/// Data blocks the tree points at (key space `D`: id -> block, salt).
fn data_entries(m: &Meta) -> BTreeMap<u64, (BlockNo, u64)> {
    let mut out = BTreeMap::new();
    m.for_each_from(&dkey(0), &mut |k, v| {
        if k[0] != b'D' {
            return false;
        }
        let id = u64::from_be_bytes(k[8..].try_into().unwrap());
        let b = u64::from_le_bytes(v[..8].try_into().unwrap());
        let salt = u64::from_le_bytes(v[8..].try_into().unwrap());
        out.insert(id, (b, salt));
        true
    })
    .unwrap();
    out
}

fn pattern(id: u64, salt: u64) -> Vec<u8> {
    let mut p = vec![0u8; NODE_SIZE];
    for (i, c) in p.chunks_mut(16).enumerate() {
        c[..8].copy_from_slice(&id.to_le_bytes());
        c[8..].copy_from_slice(&(salt ^ i as u64).to_le_bytes());
    }
    p
}

/// Commits that run beside the next transaction, as the store runs them: each step changes
/// the working version on top of a frozen one (tree entries, and data blocks allocated and
/// written at once, as copy-outs are, or freed), then writes and finishes the frozen one,
/// then freezes the working one. Readers see every change at every moment; after a power cut
/// anywhere the device holds the last finished version or the one whose writes were running,
/// never the working changes; every data block it points at holds its data (no block the
/// durable version uses was handed out while a newer version was being written), and the
/// space map agrees with the tree block for block.
#[test]
fn a_power_cut_with_commits_in_flight_finds_a_frozen_version() {
    let cases: u64 = std::env::var("MVSNAP_CRASH_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    let mut in_flight_cuts = 0;
    type Version = (BTreeMap<Key, Value>, BTreeMap<u64, (BlockNo, u64)>);
    for seed in 0..cases {
        let mut rng = StdRng::seed_from_u64(1000 + seed);
        let mut machine = SimMachine::new();
        machine.add_disk(Path::new(PATH), vec![0u8; (BLOCKS * 4096) as usize], false);
        let cache = 8 * NODE_SIZE as u64;
        let mut m = Meta::format(disk(&machine), BLOCKS, cache).unwrap();
        let mut durable: Version = Default::default();
        let mut salt = 1;
        let mut next_id = 0u64;
        for round in 0..4 {
            machine.power_off_after(rng.random_range(0..300));
            let mut working = durable.clone();
            let mut frozen: Option<(CommitJob, Version)> = None;
            let mut inflight = None;
            'steps: for _ in 0..12 {
                let mut next = working.clone();
                let ops = random_change(&mut rng, &mut next.0, salt);
                // Data: a few new blocks written at once, a few dropped.
                let mut new_data = Vec::new();
                for _ in 0..rng.random_range(0..4) {
                    let b = match m.alloc_block() {
                        Ok(Some(b)) => b,
                        Ok(None) => break,
                        Err(_) => break 'steps,
                    };
                    let id = next_id;
                    next_id += 1;
                    if disk(&machine)
                        .write_at(&pattern(id, salt), b * NODE_SIZE as u64)
                        .is_err()
                    {
                        break 'steps;
                    }
                    new_data.push((id, b));
                    next.1.insert(id, (b, salt));
                }
                let mut dropped = Vec::new();
                while next.1.len() > 24 || (rng.random_bool(0.3) && !next.1.is_empty()) {
                    let i = rng.random_range(0..next.1.len());
                    let id = *next.1.keys().nth(i).unwrap();
                    let (b, _) = next.1.remove(&id).unwrap();
                    dropped.push((id, b));
                }
                let changed = m.change(|t| {
                    apply_ops(t, &ops, salt)?;
                    for &(id, b) in &new_data {
                        let mut v = [0u8; 16];
                        v[..8].copy_from_slice(&b.to_le_bytes());
                        v[8..].copy_from_slice(&salt.to_le_bytes());
                        t.insert(dkey(id), v)?;
                    }
                    for &(id, _) in &dropped {
                        t.remove(&dkey(id))?;
                    }
                    Ok(())
                });
                salt += 1;
                if changed.is_err() {
                    assert!(
                        machine.is_off(),
                        "seed {seed}: a change failed with power on"
                    );
                    break;
                }
                for &(_, b) in &dropped {
                    m.free_block(b).unwrap();
                }
                working = next;
                if !machine.is_off() {
                    assert!(
                        user_entries(&m) == working.0 && data_entries(&m) == working.1,
                        "seed {seed}: readers do not see the working version over a frozen one"
                    );
                }
                if let Some((job, content)) = frozen.take() {
                    let r = job.write();
                    match m.finish(r) {
                        Ok(_) => durable = content,
                        Err(_) => {
                            assert!(
                                machine.is_off(),
                                "seed {seed}: a commit failed with power on"
                            );
                            inflight = Some(content);
                            break;
                        }
                    }
                }
                match m.freeze([salt; USER_WORDS], &[]) {
                    Ok(job) => frozen = Some((job, working.clone())),
                    Err(_) => {
                        assert!(
                            machine.is_off(),
                            "seed {seed}: a freeze failed with power on"
                        );
                        break;
                    }
                }
            }
            let policy = CrashPolicy::random(&mut rng);
            drop(frozen);
            drop(m);
            machine = machine.crash_all_with(&mut rng, policy);
            m = Meta::open(disk(&machine), cache)
                .unwrap_or_else(|e| panic!("seed {seed} round {round}: reopen: {e}"));
            let got = (user_entries(&m), data_entries(&m));
            if got != durable {
                assert!(
                    inflight.as_ref() == Some(&got),
                    "seed {seed} round {round} ({policy:?}): the tree holds neither the last \
                     finished version ({} entries) nor the one being written ({:?}): {} entries",
                    durable.0.len(),
                    inflight.as_ref().map(|i| i.0.len()),
                    got.0.len()
                );
                in_flight_cuts += 1;
                durable = got;
            }
            let dev = disk(&machine);
            for (id, (b, salt)) in &durable.1 {
                let mut buf = vec![0u8; NODE_SIZE];
                dev.read_at(&mut buf, b * NODE_SIZE as u64).unwrap();
                assert!(
                    buf == pattern(*id, *salt),
                    "seed {seed} round {round} ({policy:?}): data block {b} of entry {id} was \
                     written over"
                );
            }
            let blocks: Vec<BlockNo> = durable.1.values().map(|&(b, _)| b).collect();
            m.check(&blocks)
                .unwrap_or_else(|e| panic!("seed {seed} round {round}: check: {e}"));
        }
    }
    assert!(
        cases < 50 || in_flight_cuts > 0,
        "no cut ever landed a version whose commit was running"
    );
}

/// A commit writes what changed: one insert into a big tree costs a path of nodes and a
/// bitmap or two, not the tree; and RAM stays within the cache, whatever the tree's size.
#[test]
fn a_commit_writes_what_changed_and_the_cache_bounds_ram() {
    let machine = SimMachine::new();
    let blocks = 1 << 16;
    machine.add_disk(Path::new(PATH), vec![0u8; blocks as usize * 4096], false);
    let cache = 16 * NODE_SIZE as u64;
    let mut m = Meta::format(disk(&machine), blocks, cache).unwrap();
    let mut model = BTreeMap::new();
    for batch in 0..10 {
        let ops: Vec<(u64, bool)> = (0..5000).map(|i| (batch * 5000 + i, true)).collect();
        for &(k, _) in &ops {
            model.insert(ukey(k), uval(k, 7));
        }
        apply(&mut m, &ops, 7).unwrap();
        assert!(m.cache_stats().used_bytes <= cache);
    }
    let report = m.check(&[]).unwrap();
    assert!(report.entries >= 50_000);
    assert!(report.blocks.len() > 400, "{} nodes", report.blocks.len());
    let writes_before = machine.disk(Path::new(PATH)).unwrap().stats().writes;
    let stats = apply(&mut m, &[(123_456_789, true)], 9).unwrap();
    let writes = machine.disk(Path::new(PATH)).unwrap().stats().writes - writes_before;
    assert!(
        stats.nodes <= 2 * report.depth as usize + 2 && stats.bitmaps <= 2,
        "one insert wrote {stats:?} (depth {})",
        report.depth
    );
    assert_eq!(
        writes as usize,
        stats.nodes + stats.bitmaps + 1,
        "nodes, bitmaps, header"
    );
    model.insert(ukey(123_456_789), uval(123_456_789, 9));
    // Reopened with a cold cache: the same entries, and the space map agrees.
    drop(m);
    let mut m = Meta::open(disk(&machine), cache).unwrap();
    assert!(user_entries(&m) == model);
    m.check(&[]).unwrap();
    assert!(m.cache_stats().used_bytes <= cache);
}

/// Nodes read without the tree's lock (probe, read, cache) while commits shadow, free and
/// reuse their blocks: a read that saw a block's old node must not reach the cache after the
/// block was reused, or lookups through the cache would see another node's entries.
#[test]
fn nodes_fetched_while_their_blocks_are_reused_never_reach_the_cache_stale() {
    let machine = SimMachine::new();
    // Hardly more blocks than two versions of the tree need: freed blocks are reused within a
    // commit or two. A cache of 4 nodes: most lookups miss.
    let blocks = 48;
    machine.add_disk(Path::new(PATH), vec![0u8; blocks * 4096], false);
    let cache = 4 * NODE_SIZE as u64;
    let mut m = Meta::format(disk(&machine), blocks as u64, cache).unwrap();
    let mut rng = StdRng::seed_from_u64(42);
    let mut model = BTreeMap::new();
    let ops: Vec<(u64, bool)> = (0..1500).map(|k| (k, true)).collect();
    for &(k, _) in &ops {
        model.insert(ukey(k), uval(k, 0));
    }
    apply(&mut m, &ops, 0).unwrap();
    let (mut fetched, mut refused) = (0, 0);
    for salt in 1..200 {
        // Under the "lock": which nodes random lookups would read from the device.
        let missed = {
            let v = m.probe_view();
            for _ in 0..16 {
                let _ = btree::get(&v, &ukey(rng.random_range(0..2000)));
            }
            v.into_missed()
        };
        // Without it: read them now, then commits reuse blocks before they are cached.
        let f = m.fetcher();
        let read: Vec<_> = missed
            .iter()
            .map(|&(b, stamp)| (b, stamp, btree::read_node(&f.io, b).unwrap()))
            .collect();
        // One commit releases what it shadows; a second one reuses it.
        for salt in (2 * salt..).take(1 + salt as usize % 2) {
            let change = random_change(&mut rng, &mut model, salt);
            apply(&mut m, &change, salt).unwrap();
        }
        for (b, stamp, node) in read {
            if f.cache.insert_fetched(b, Arc::new(node), stamp) {
                fetched += 1;
            } else {
                refused += 1;
            }
        }
        assert!(
            user_entries(&m) == model,
            "round {salt}: the tree read through the cache differs from the model"
        );
    }
    // Both cases happened: fetches cached, and fetches refused after a reuse.
    assert!(
        fetched > 30 && refused > 30,
        "{fetched} cached, {refused} refused"
    );
    m.check(&[]).unwrap();
}

/// A full device: the commit fails cleanly with NoSpace and the durable version is intact.
#[test]
fn a_full_device_refuses_the_commit_and_keeps_the_last_version() {
    let machine = SimMachine::new();
    machine.add_disk(Path::new(PATH), vec![0u8; 64 * 4096], false);
    let mut m = Meta::format(disk(&machine), 64, 1 << 20).unwrap();
    let mut model = BTreeMap::new();
    let mut k = 0;
    loop {
        let ops: Vec<(u64, bool)> = (k..k + 200).map(|i| (i, true)).collect();
        match apply(&mut m, &ops, 1) {
            Ok(_) => {
                for &(i, _) in &ops {
                    model.insert(ukey(i), uval(i, 1));
                }
                k += 200;
            }
            Err(PdataError::NoSpace) => break,
            Err(e) => panic!("{e}"),
        }
        assert!(k < 100_000, "never full");
    }
    drop(m);
    let mut m = Meta::open(disk(&machine), 1 << 20).unwrap();
    assert!(user_entries(&m) == model);
    m.check(&[]).unwrap();
}

/// Records which blocks are written; fails every write once `fail` is set.
struct Recording {
    inner: Arc<dyn BlockDev>,
    writes: parking_lot::Mutex<Vec<BlockNo>>,
    fail: Arc<std::sync::atomic::AtomicBool>,
}

impl BlockDev for Recording {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if self.fail.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(std::io::Error::other("injected write failure"));
        }
        self.writes.lock().push(offset / NODE_SIZE as u64);
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.inner.sync()
    }
    fn grow(&self, len: u64) -> std::io::Result<()> {
        self.inner.grow(len)
    }
    fn can_grow(&self) -> bool {
        false
    }
    fn path(&self) -> &Path {
        self.inner.path()
    }
}

/// The rule every crash case relies on, checked directly: a commit writes no block that the
/// durable version uses (but the header it replaces), even when the device is nearly full and
/// the allocator wraps around onto blocks the transaction itself just released.
#[test]
fn no_block_of_the_durable_version_is_written_before_the_flip() {
    let machine = SimMachine::new();
    // Nearly full: the tree needs most of the device and a big commit all the rest.
    let blocks = 48;
    machine.add_disk(Path::new(PATH), vec![0u8; blocks as usize * 4096], false);
    let dev = Arc::new(Recording {
        inner: disk(&machine),
        writes: Default::default(),
        fail: Default::default(),
    });
    let mut m = Meta::format(dev.clone(), blocks, 1 << 20).unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    let mut model = BTreeMap::new();
    let mut done = 0;
    let mut last_header = None;
    for salt in 0..300u64 {
        let durable = m.check(&[]).unwrap().blocks;
        let mut next = model.clone();
        let ops = random_change(&mut rng, &mut next, salt);
        dev.writes.lock().clear();
        match apply(&mut m, &ops, salt) {
            Ok(_) => {
                model = next;
                done += 1;
            }
            Err(PdataError::NoSpace) => {
                // Refused: reopen (the in-memory map held the failed allocations).
                drop(m);
                m = Meta::open(dev.clone(), 1 << 20).unwrap();
                assert!(user_entries(&m) == model);
                dev.writes.lock().clear();
                continue;
            }
            Err(e) => panic!("{e}"),
        }
        let written = std::mem::take(&mut *dev.writes.lock());
        for b in &written[..written.len() - 1] {
            assert!(
                durable.binary_search(b).is_err() && *b > 1,
                "commit {salt} wrote block {b}, which the durable version used"
            );
        }
        // The header goes last, and to the block that does not hold the durable header.
        let header = written[written.len() - 1];
        assert!(header <= 1, "the header comes last");
        assert_ne!(
            Some(header),
            last_header,
            "commit {salt} wrote over the durable header"
        );
        last_header = Some(header);
    }
    assert!(done > 100, "only {done} commits succeeded");
    assert!(user_entries(&m) == model);
}

/// A damaged header (a torn write, a bad sector) is never trusted: open takes the other copy,
/// the version before, and with both damaged it refuses with a clear error.
#[test]
fn a_damaged_header_falls_back_to_the_other_copy() {
    let machine = SimMachine::new();
    machine.add_disk(Path::new(PATH), vec![0u8; 256 * 4096], false);
    let mut m = Meta::format(disk(&machine), 256, 1 << 20).unwrap();
    apply(&mut m, &[(1, true), (2, true)], 1).unwrap();
    let first = user_entries(&m);
    apply(&mut m, &[(3, true)], 2).unwrap();
    let nodes = m.check(&[]).unwrap().blocks.len() as u64;
    assert_eq!(m.free_blocks(), 256 - Meta::fixed_blocks(256) - nodes);
    let seq = m.header.seq;
    drop(m);
    let d = machine.disk(Path::new(PATH)).unwrap();
    let newest = (seq % 2) * 4096;
    for (what, at) in [
        ("checksum", newest + 4),
        ("magic", newest),
        ("a field", newest + 20),
    ] {
        let good = d.volatile_image()[newest as usize..newest as usize + 4096].to_vec();
        let mut bad = good[at as usize - newest as usize];
        bad ^= 0x10;
        d.corrupt(at, &[bad]);
        let m = Meta::open(disk(&machine), 1 << 20).unwrap();
        assert!(
            user_entries(&m) == first,
            "a damaged {what}: not the version before"
        );
        d.corrupt(newest, &good);
        let m = Meta::open(disk(&machine), 1 << 20).unwrap();
        assert_eq!(user_entries(&m).len(), 3);
    }
    // Both copies damaged.
    d.corrupt(4, &[0xff]);
    d.corrupt(4096 + 4, &[0xff]);
    match Meta::open(disk(&machine), 1 << 20) {
        Err(e) => assert!(e.to_string().contains("no valid metadata header"), "{e}"),
        Ok(_) => panic!("opened with both headers damaged"),
    }
}

/// A commit's nodes reach the cache once its writes are durable, before `finish` (which runs
/// under the store's state lock) and without it; a commit whose writes failed leaves none
/// there, and the tree still reads every change from RAM.
#[test]
fn a_written_commit_caches_its_nodes_before_finish_and_a_failed_one_none() {
    let machine = SimMachine::new();
    let blocks = 1 << 12;
    machine.add_disk(Path::new(PATH), vec![0u8; blocks as usize * 4096], false);
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dev = Arc::new(Recording {
        inner: disk(&machine),
        writes: Default::default(),
        fail: fail.clone(),
    });
    let mut m = Meta::format(dev, blocks, 1024 * NODE_SIZE as u64).unwrap();
    let mut model = BTreeMap::new();
    let mut round = |m: &mut Meta, salt: u64| {
        let ops: Vec<(u64, bool)> = (0..1500).map(|k| (k * 7 % 1500, true)).collect();
        m.change(|t| apply_ops(t, &ops, salt)).unwrap();
        for &(k, _) in &ops {
            model.insert(ukey(k), uval(k, salt));
        }
        let job = m.freeze([salt; USER_WORDS], &[]).unwrap();
        let frozen: Vec<BlockNo> = m.frozen.as_ref().unwrap().0.keys().copied().collect();
        assert!(frozen.len() > 10, "{} nodes frozen", frozen.len());
        assert!(frozen.iter().all(|&b| m.cache.probe(b).is_none()));
        (job, frozen)
    };
    let (job, frozen) = round(&mut m, 1);
    let written = job.write();
    assert!(written.is_ok());
    assert!(frozen.iter().all(|&b| m.cache.probe(b).is_some()));
    m.finish(written).unwrap();

    let (job, frozen) = round(&mut m, 2);
    fail.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = job.write();
    assert!(written.is_err());
    assert!(frozen.iter().all(|&b| m.cache.probe(b).is_none()));
    assert!(m.finish(written).is_err());
    assert!(
        user_entries(&m) == model,
        "the failed version is still read from RAM"
    );
}

/// A node of the durable version written over by a later transaction (the ordering rule
/// broken) still has the right checksum and block number: `check` finds it by its stamp.
#[test]
fn check_finds_a_durable_node_written_over_by_a_later_transaction() {
    let machine = SimMachine::new();
    let blocks = 1 << 12;
    machine.add_disk(Path::new(PATH), vec![0u8; blocks as usize * 4096], false);
    let mut m = Meta::format(disk(&machine), blocks, 1 << 20).unwrap();
    let ops: Vec<(u64, bool)> = (0..1000).map(|k| (k, true)).collect();
    apply(&mut m, &ops, 1).unwrap();
    apply(&mut m, &ops[..10], 2).unwrap();
    let report = m.check(&[]).unwrap();
    // The same node at the same block, as the transaction open now would write it.
    let block = report.blocks[report.blocks.len() / 2];
    let node = btree::read_node(&m.io, block).unwrap();
    m.io.write_block(block, &node.encode(block, m.header.txn)[..])
        .unwrap();
    drop(m);
    let mut m = Meta::open(disk(&machine), 1 << 20).unwrap();
    let e = m.check(&[]).unwrap_err();
    assert!(e.to_string().contains("written by transaction"), "{e}");
}

/// Random new keys scattered over a tree of ~600 leaves, committed every 500 inserts: buffered
/// in the overlay and folded by its sweep they write a fraction of the nodes they write
/// inserted one by one (each into a leaf of its own, mostly), while every lookup, merged,
/// sees exactly the model; folded for good, they reopen from the tree alone.
#[test]
fn the_overlay_folds_scattered_inserts_into_few_leaf_writes_and_reads_stay_exact() {
    const KEYS: u64 = 40_000;
    const INSERTS: u64 = 8_000;
    let run = |buffered: bool| -> u64 {
        let dev = SimDevice::new(16_384);
        let mut m = dev.format(64 << 20);
        m.set_overlay_entries(2_000);
        let mut model = BTreeMap::new();
        m.update(|t| {
            for i in 0..KEYS {
                t.insert(ukey(2 * i), uval(i, 0))?;
                model.insert(ukey(2 * i), uval(i, 0));
            }
            Ok(())
        })
        .unwrap();
        let mut rng = StdRng::seed_from_u64(5);
        let mut nodes = 0;
        for n in 0..INSERTS {
            // Odd keys: new ones (or a second value for one inserted before).
            let k = ukey(2 * rng.random_range(0..KEYS) + 1);
            let v = uval(n, 1);
            m.change(|t| match buffered {
                true => t.insert_buffered(k, v),
                false => t.insert(k, v).map(|_| ()),
            })
            .unwrap();
            m.fold_if_full().unwrap();
            assert!(m.overlay_len() <= 2_000 || !buffered);
            model.insert(k, v);
            // The new entry, wherever it is now (the overlay, or the tree if just folded).
            assert_eq!(m.get(&k).unwrap(), Some(v));
            assert_eq!(m.seek_ge(&k).unwrap(), Some((k, v)));
            if n % 500 == 499 {
                nodes += m.commit(m.user()).unwrap().nodes as u64;
            }
            if n % 97 == 0 {
                let probe = ukey(rng.random_range(0..2 * KEYS));
                assert_eq!(m.get(&probe).unwrap(), model.get(&probe).copied());
                let want = model.range(probe..).next().map(|(k, v)| (*k, *v));
                assert_eq!(m.seek_ge(&probe).unwrap(), want, "insert {n}");
            }
        }
        assert_eq!(user_entries(&m), model);
        m.fold_all().unwrap();
        assert_eq!(m.overlay_len(), 0);
        m.commit(m.user()).unwrap();
        drop(m);
        let mut m = dev.open(64 << 20);
        assert_eq!(user_entries(&m), model);
        m.check_working(&[]).unwrap();
        nodes
    };
    let direct = run(false);
    let folded = run(true);
    assert!(
        folded * 3 < direct,
        "{folded} nodes written with the overlay, {direct} without"
    );
}

/// Scattered new keys into a tree bigger than the cache: with the fold's next leaf read ahead
/// (without the caller's lock, as a first write's probe does), the fold itself reads no node
/// and the overlay stays at its capacity; with nothing read ahead, the overlay grows to its
/// limit and no further (measured after each fold), and the fold reads what it must there.
#[test]
fn the_fold_reads_no_node_itself_when_its_leaf_is_read_ahead() {
    const KEYS: u64 = 80_000;
    const CAPACITY: usize = 400;
    const INSERTS: u64 = 3_000;
    let run = |read_ahead: bool| -> (u64, usize) {
        let dev = SimDevice::new(16_384);
        // 256 nodes of cache; the tree has some 700 leaves.
        let mut m = dev.format(1 << 20);
        m.set_overlay_entries(CAPACITY);
        m.update(|t| {
            for i in 0..KEYS {
                t.insert(ukey(2 * i), uval(i, 0))?;
            }
            Ok(())
        })
        .unwrap();
        let mut model = user_entries(&m);
        let mut rng = StdRng::seed_from_u64(9);
        let (mut fold_reads, mut most) = (0, 0);
        for n in 0..INSERTS {
            if read_ahead {
                loop {
                    let v = m.probe_view();
                    let _ = btree::probe_fold(&v);
                    let missed = v.into_missed();
                    if missed.is_empty() {
                        break;
                    }
                    assert!(m.fetcher().fetch_all(missed));
                }
            }
            // A new odd key each time (the tree holds the even ones).
            let k = loop {
                let k = ukey(2 * rng.random_range(0..KEYS) + 1);
                if !model.contains_key(&k) {
                    break k;
                }
            };
            m.change(|t| t.insert_buffered(k, uval(n, 1))).unwrap();
            model.insert(k, uval(n, 1));
            let before = m.cache_stats().misses;
            m.fold_if_full().unwrap();
            fold_reads += m.cache_stats().misses - before;
            most = most.max(m.overlay_len());
            if n % 50 == 49 {
                m.commit(m.user()).unwrap();
            }
        }
        assert_eq!(user_entries(&m), model);
        (fold_reads, most)
    };
    let (reads, most) = run(true);
    assert_eq!(
        reads, 0,
        "the fold read {reads} nodes though its leaves were read ahead"
    );
    // One over when a new key moved the cursor's next leaf after the read-ahead.
    assert!(
        most <= CAPACITY + 1,
        "read ahead, the overlay held up to {most}"
    );
    let (reads, most) = run(false);
    let limit = CAPACITY + CAPACITY / 4;
    assert_eq!(most, limit, "not read ahead, the overlay held up to {most}");
    assert!(reads > 0, "not read ahead, the fold read no node");
}
