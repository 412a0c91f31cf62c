//! The tree against a `BTreeMap` model: random inserts, removes, lookups, seeks and scans,
//! commits, crashes (a transaction abandoned, or a commit cut off after some writes) and
//! reopens through a cold, tiny cache. After every commit: `check` passes, the tree holds
//! exactly the model, the blocks it uses are exactly the blocks allocated (no leak, no double
//! use), and the previous version was never written over and still reads as it was.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use proptest::prelude::*;

use super::*;

fn key(space: u8, n: u64) -> Key {
    let mut k = [0u8; 16];
    k[0] = space;
    k[8..].copy_from_slice(&n.to_be_bytes());
    k
}

fn val(n: u64) -> Value {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&n.to_le_bytes());
    v[8..].copy_from_slice(&(!n).to_le_bytes());
    v
}

/// Blocks in memory. Writes to `protected` blocks (the last committed version) are refused
/// and counted; `fail_after` makes the n-th next write fail (a commit cut off).
#[derive(Default)]
struct MemIo {
    blocks: Mutex<HashMap<BlockNo, Vec<u8>>>,
    protected: Mutex<HashSet<BlockNo>>,
    overwrites: AtomicU64,
    writes: AtomicU64,
    fail_at: AtomicU64,
}

impl NodeIo for MemIo {
    fn read_block(&self, block: BlockNo, buf: &mut [u8]) -> io::Result<()> {
        match self.blocks.lock().get(&block) {
            Some(b) => {
                buf.copy_from_slice(b);
                Ok(())
            }
            None => Err(io::Error::other(format!("block {block} never written"))),
        }
    }
    fn write_block(&self, block: BlockNo, buf: &[u8]) -> io::Result<()> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.fail_at.load(Ordering::SeqCst) {
            return Err(io::Error::other("power cut"));
        }
        if self.protected.lock().contains(&block) {
            self.overwrites.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::other(format!(
                "block {block} of the committed version written over"
            )));
        }
        self.blocks.lock().insert(block, buf.to_vec());
        Ok(())
    }
}

/// Lowest free block first, so freed blocks are reused at once (the harshest case).
#[derive(Default)]
struct MemAlloc {
    in_use: BTreeSet<BlockNo>,
    limit: u64,
    /// Released by the transaction: freed once its commit is "durable".
    released: Vec<BlockNo>,
}

impl BlockAlloc for MemAlloc {
    fn alloc(&mut self) -> Option<BlockNo> {
        let b = (0..self.limit).find(|b| !self.in_use.contains(b))?;
        self.in_use.insert(b);
        Some(b)
    }
    fn free_now(&mut self, block: BlockNo) {
        assert!(self.in_use.remove(&block), "block {block} freed twice");
    }
    fn release(&mut self, block: BlockNo) {
        assert!(
            self.in_use.contains(&block),
            "block {block} released but not in use"
        );
        self.released.push(block);
    }
}

impl MemAlloc {
    /// The root flip is durable: released blocks are free.
    fn flip(&mut self) {
        for b in std::mem::take(&mut self.released) {
            self.free_now(b);
        }
    }
}

struct Db {
    io: MemIo,
    cache: NodeCache,
    alloc: MemAlloc,
    root: Option<BlockNo>,
    committed: BTreeMap<Key, Value>,
    txn: u64,
}

impl Db {
    fn new(cache_nodes: u64) -> Db {
        Db {
            io: MemIo::default(),
            cache: NodeCache::new(cache_nodes * NODE_SIZE as u64),
            alloc: MemAlloc {
                limit: 1 << 20,
                ..Default::default()
            },
            root: None,
            committed: BTreeMap::new(),
            txn: 1,
        }
    }

    fn view(&self) -> Committed<'_> {
        Committed {
            io: &self.io,
            cache: &self.cache,
            root: self.root,
        }
    }

    /// Everything the committed version holds, checked.
    fn assert_committed(&self, what: &str) {
        let v = self.view();
        let report = check(&v).unwrap_or_else(|e| panic!("{what}: check: {e}"));
        assert_eq!(report.entries, self.committed.len() as u64, "{what}");
        let mut all = Vec::new();
        for_each_from(&v, &[0; 16], &mut |k, x| {
            all.push((*k, *x));
            true
        })
        .unwrap();
        let want: Vec<(Key, Value)> = self.committed.iter().map(|(k, v)| (*k, *v)).collect();
        if let Some(i) = (0..all.len().min(want.len())).find(|&i| all[i] != want[i]) {
            panic!(
                "{what}: the tree's entries differ from the model at entry {i} of {}: {:?} != {:?}",
                all.len(),
                all[i],
                want[i]
            );
        }
        assert!(
            all == want,
            "{what}: the tree's entries differ from the model"
        );
        let used: BTreeSet<BlockNo> = report.blocks.into_iter().collect();
        assert_eq!(
            used, self.alloc.in_use,
            "{what}: blocks used != blocks allocated"
        );
    }

    /// After a crash: what is allocated is what the committed tree uses.
    fn recover(&mut self) {
        let report = check(&self.view()).unwrap();
        self.alloc.in_use = report.blocks.into_iter().collect();
        self.alloc.released.clear();
        self.io.fail_at.store(0, Ordering::SeqCst);
    }
}

#[derive(Clone, Debug)]
enum Op {
    Insert(u8, u64, u64),
    Remove(u8, u64),
    InsertRun(u64, u64),
    RemoveRun(u64, u64),
    Get(u8, u64),
    Seek(u8, u64),
    Scan(u8, u64, usize),
    Commit,
    /// The transaction is abandoned (a crash before its commit).
    Abandon,
    /// The commit is cut off after this many node writes.
    CrashInCommit(u64),
    /// A cold cache of two nodes: everything is read from the blocks again.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let k = 0u64..700;
    prop_oneof![
        30 => (0u8..3, k.clone(), any::<u64>()).prop_map(|(s, k, v)| Op::Insert(s, k, v)),
        15 => (0u8..3, k.clone()).prop_map(|(s, k)| Op::Remove(s, k)),
        3 => (k.clone(), 1u64..1500).prop_map(|(k, n)| Op::InsertRun(k, n)),
        3 => (k.clone(), 1u64..1500).prop_map(|(k, n)| Op::RemoveRun(k, n)),
        8 => (0u8..3, k.clone()).prop_map(|(s, k)| Op::Get(s, k)),
        8 => (0u8..4, k.clone()).prop_map(|(s, k)| Op::Seek(s, k)),
        4 => (0u8..3, k.clone(), 1usize..300).prop_map(|(s, k, n)| Op::Scan(s, k, n)),
        8 => Just(Op::Commit),
        2 => Just(Op::Abandon),
        2 => (1u64..40).prop_map(Op::CrashInCommit),
        2 => Just(Op::Reopen),
    ]
}

fn run(ops: &[Op]) {
    let mut db = Db::new(64);
    let mut model = BTreeMap::new();
    let mut pending: Vec<Op> = Vec::new();
    for (step, o) in ops.iter().enumerate() {
        let what = format!("step {step}: {o:?}");
        match o {
            Op::Commit | Op::Abandon | Op::CrashInCommit(_) | Op::Reopen => {
                // Replay the transaction's changes (the tree is changed only inside one).
                let mut alloc = std::mem::take(&mut db.alloc);
                let protected: HashSet<BlockNo> = alloc.in_use.iter().copied().collect();
                *db.io.protected.lock() = protected;
                let mut t = Txn::new(&db.io, &db.cache, &mut alloc, db.root, db.txn);
                for p in pending.drain(..) {
                    apply(&mut t, &mut model, &p);
                }
                let reads_ok = |t: &Txn<MemAlloc>, model: &BTreeMap<Key, Value>| {
                    for (k, v) in model.iter().step_by(7) {
                        assert_eq!(get(t, k).unwrap(), Some(*v), "{what}: in the transaction");
                    }
                };
                reads_ok(&t, &model);
                match o {
                    Op::Commit | Op::Reopen => {
                        let c = t.commit().unwrap_or_else(|e| panic!("{what}: commit: {e}"));
                        db.alloc = alloc;
                        // The old version is intact until the new root is durable.
                        let old = db.committed.clone();
                        db.assert_committed_against(&old, &what);
                        db.root = c.root;
                        db.txn += 1;
                        db.alloc.flip();
                        db.committed = model.clone();
                        db.assert_committed(&what);
                        if matches!(o, Op::Reopen) {
                            db.cache = NodeCache::new(2 * NODE_SIZE as u64);
                            db.assert_committed(&format!("{what}, cold cache"));
                        }
                    }
                    Op::Abandon => {
                        drop(t);
                        db.alloc = alloc;
                        db.recover();
                        model = db.committed.clone();
                        db.assert_committed(&what);
                    }
                    Op::CrashInCommit(n) => {
                        let now = db.io.writes.load(Ordering::SeqCst);
                        db.io.fail_at.store(now + n, Ordering::SeqCst);
                        let r = t.commit();
                        db.alloc = alloc;
                        if r.is_ok() {
                            // Fewer writes than the cut: it completed, but the root flip did
                            // not happen; the old version is what a restart finds.
                        }
                        db.recover();
                        model = db.committed.clone();
                        db.cache = NodeCache::new(8 * NODE_SIZE as u64);
                        db.assert_committed(&what);
                    }
                    _ => unreachable!(),
                }
                assert_eq!(
                    db.io.overwrites.load(Ordering::SeqCst),
                    0,
                    "{what}: a block of the committed version was written over"
                );
            }
            Op::Get(..) | Op::Seek(..) | Op::Scan(..) if pending.is_empty() => {
                check_read(&db.view(), &model, o, &what);
            }
            _ => pending.push(o.clone()),
        }
    }
}

impl Db {
    fn assert_committed_against(&self, want: &BTreeMap<Key, Value>, what: &str) {
        let v = self.view();
        let mut all = Vec::new();
        for_each_from(&v, &[0; 16], &mut |k, x| {
            all.push((*k, *x));
            true
        })
        .unwrap_or_else(|e| panic!("{what}: the previous version: {e}"));
        let want: Vec<(Key, Value)> = want.iter().map(|(k, v)| (*k, *v)).collect();
        assert!(
            all == want,
            "{what}: the previous version changed before its flip"
        );
    }
}

fn apply(t: &mut Txn<MemAlloc>, model: &mut BTreeMap<Key, Value>, o: &Op) {
    match *o {
        Op::Insert(s, k, v) => {
            let want = model.insert(key(s, k), val(v));
            assert_eq!(t.insert(key(s, k), val(v)).unwrap(), want, "{o:?}");
        }
        Op::Remove(s, k) => {
            let want = model.remove(&key(s, k));
            assert_eq!(t.remove(&key(s, k)).unwrap(), want, "{o:?}");
        }
        Op::InsertRun(k, n) => {
            for i in k..k + n {
                model.insert(key(1, i), val(i));
                t.insert(key(1, i), val(i)).unwrap();
            }
        }
        Op::RemoveRun(k, n) => {
            for i in k..k + n {
                let want = model.remove(&key(1, i));
                assert_eq!(t.remove(&key(1, i)).unwrap(), want);
            }
        }
        _ => check_read(t, model, o, "in a transaction"),
    }
}

fn check_read(v: &dyn View, model: &BTreeMap<Key, Value>, o: &Op, what: &str) {
    match *o {
        Op::Get(s, k) => assert_eq!(
            get(v, &key(s, k)).unwrap(),
            model.get(&key(s, k)).copied(),
            "{what}"
        ),
        Op::Seek(s, k) => assert_eq!(
            seek_ge(v, &key(s, k)).unwrap(),
            model.range(key(s, k)..).next().map(|(k, v)| (*k, *v)),
            "{what}"
        ),
        Op::Scan(s, k, n) => {
            let mut got = Vec::new();
            for_each_from(v, &key(s, k), &mut |k, x| {
                got.push((*k, *x));
                got.len() < n
            })
            .unwrap();
            let want: Vec<(Key, Value)> = model
                .range(key(s, k)..)
                .take(n)
                .map(|(k, v)| (*k, *v))
                .collect();
            assert!(got == want, "{what}: scan differs");
        }
        _ => unreachable!(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn tree_matches_the_model(ops in proptest::collection::vec(op(), 1..300)) {
        run(&ops);
    }
}

/// A tree of four levels (over 2.7 million entries would be needed for five): filled in
/// random order across several commits, then mostly emptied; at every commit it is exact and
/// the space it uses is what it holds (merges keep nodes from staying near-empty).
#[test]
fn a_deep_tree_fills_and_empties_with_space_to_match() {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut db = Db::new(256);
    let mut model = BTreeMap::new();
    let n = 60_000u64;
    let mut order: Vec<u64> = (0..n).collect();
    order.shuffle(&mut rng);
    let commit = |db: &mut Db, model: &BTreeMap<Key, Value>, ops: &[(u64, bool)]| {
        let mut alloc = std::mem::take(&mut db.alloc);
        *db.io.protected.lock() = alloc.in_use.iter().copied().collect();
        let mut t = Txn::new(&db.io, &db.cache, &mut alloc, db.root, db.txn);
        for &(k, ins) in ops {
            if ins {
                t.insert(key(2, k), val(k)).unwrap();
            } else {
                assert_eq!(t.remove(&key(2, k)).unwrap(), Some(val(k)));
            }
        }
        let c = t.commit().unwrap();
        db.alloc = alloc;
        db.root = c.root;
        db.txn += 1;
        db.alloc.flip();
        db.committed = model.clone();
        db.assert_committed("commit");
        assert_eq!(db.io.overwrites.load(Ordering::SeqCst), 0);
        c.written
    };
    for part in order.chunks(n as usize / 6) {
        let ops: Vec<(u64, bool)> = part.iter().map(|&k| (k, true)).collect();
        for &k in part {
            model.insert(key(2, k), val(k));
        }
        commit(&mut db, &model, &ops);
    }
    let report = check(&db.view()).unwrap();
    assert_eq!(report.entries, n);
    assert!(report.depth >= 3, "depth {}", report.depth);
    // Nodes are at least half full on average after random inserts.
    let leaves_min = n.div_ceil(LEAF_CAP as u64);
    assert!(
        (report.blocks.len() as u64) < leaves_min * 5 / 2,
        "{} blocks for {n} entries",
        report.blocks.len()
    );
    // A small change writes a few nodes, not the tree.
    model.insert(key(2, n + 1), val(n + 1));
    let written = commit(&mut db, &model, &[(n + 1, true)]);
    assert!(
        written <= report.depth as usize + 1,
        "{written} nodes written for one insert"
    );
    // Remove 95% in random order.
    order.shuffle(&mut rng);
    let gone = &order[..(n as usize * 95 / 100)];
    for part in gone.chunks(n as usize / 5) {
        let ops: Vec<(u64, bool)> = part.iter().map(|&k| (k, false)).collect();
        for &k in part {
            model.remove(&key(2, k));
        }
        commit(&mut db, &model, &ops);
    }
    let report = check(&db.view()).unwrap();
    let left = report.entries;
    assert!(
        (report.blocks.len() as u64) <= left.div_ceil(LEAF_CAP as u64 / 4) + 20,
        "{} blocks for {left} entries after removals",
        report.blocks.len()
    );
}

/// Damage is reported, not served: a node read back with a flipped bit fails the lookup.
#[test]
fn a_damaged_node_is_an_error() {
    let mut db = Db::new(4);
    let mut alloc = std::mem::take(&mut db.alloc);
    let mut t = Txn::new(&db.io, &db.cache, &mut alloc, None, 1);
    for i in 0..1000 {
        t.insert(key(0, i), val(i)).unwrap();
    }
    let c = t.commit().unwrap();
    db.alloc = alloc;
    db.root = c.root;
    let victim = *db.io.blocks.lock().keys().max().unwrap();
    db.io.blocks.lock().get_mut(&victim).unwrap()[100] ^= 4;
    db.cache = NodeCache::new(4 * NODE_SIZE as u64);
    let e = check(&db.view()).expect_err("check of a damaged tree");
    assert!(e.to_string().contains("damaged"), "{e}");
}

/// `check` finds each kind of damage a tree can have, in trees written node by node.
#[test]
fn check_finds_every_kind_of_bad_tree() {
    let leaf = |ks: &[u64]| Node::Leaf {
        keys: ks.iter().map(|&k| key(0, k)).collect(),
        vals: ks.iter().map(|&k| val(k)).collect(),
    };
    let internal = |ks: &[u64], cs: &[BlockNo]| Node::Internal {
        keys: ks.iter().map(|&k| key(0, k)).collect(),
        children: cs.to_vec(),
    };
    let cases: Vec<(&str, Vec<(BlockNo, Node)>)> = vec![
        (
            "empty node",
            vec![
                (1, internal(&[0, 10], &[2, 3])),
                (2, leaf(&[1])),
                (3, leaf(&[])),
            ],
        ),
        ("out of order", vec![(1, leaf(&[1, 3, 2]))]),
        ("out of order", vec![(1, leaf(&[1, 1]))]),
        (
            "below its parent",
            vec![
                (1, internal(&[5, 10], &[2, 3])),
                (2, leaf(&[4, 6])),
                (3, leaf(&[11])),
            ],
        ),
        (
            "at or above",
            vec![
                (1, internal(&[0, 10], &[2, 3])),
                (2, leaf(&[1, 10])),
                (3, leaf(&[11])),
            ],
        ),
        (
            "at or above",
            vec![
                (1, internal(&[0, 100], &[2, 3])),
                (2, internal(&[0, 10], &[4, 5])),
                (3, leaf(&[100])),
                (4, leaf(&[1])),
                (5, leaf(&[10, 100])),
            ],
        ),
        (
            "different depths",
            vec![
                (1, internal(&[0, 10], &[2, 3])),
                (2, internal(&[0], &[4])),
                (3, leaf(&[11])),
                (4, leaf(&[1])),
            ],
        ),
        (
            "reached twice",
            vec![(1, internal(&[0, 10], &[2, 2])), (2, leaf(&[1]))],
        ),
    ];
    for (want, nodes) in cases {
        let io = MemIo::default();
        for (b, n) in &nodes {
            io.write_block(*b, &n.encode(*b, 1)[..]).unwrap();
        }
        let cache = NodeCache::new(1 << 20);
        let v = Committed {
            io: &io,
            cache: &cache,
            root: Some(1),
        };
        match check(&v) {
            Err(e) => assert!(e.to_string().contains(want), "{want}: {e}"),
            Ok(r) => panic!("{want}: check passed a bad tree: {r:?}"),
        }
    }
    // A good two-level tree passes, with its blocks and depth.
    let io = MemIo::default();
    for (b, n) in [
        (1, internal(&[0, 10], &[2, 3])),
        (2, leaf(&[1, 5])),
        (3, leaf(&[10, 12])),
    ] {
        io.write_block(b, &n.encode(b, 1)[..]).unwrap();
    }
    let cache = NodeCache::new(1 << 20);
    let r = check(&Committed {
        io: &io,
        cache: &cache,
        root: Some(1),
    })
    .unwrap();
    assert_eq!((r.blocks, r.entries, r.depth), (vec![1, 2, 3], 4, 2));
    // An empty root leaf is a valid empty tree.
    io.write_block(9, &leaf(&[]).encode(9, 1)[..]).unwrap();
    let r = check(&Committed {
        io: &io,
        cache: &cache,
        root: Some(9),
    })
    .unwrap();
    assert_eq!(r.entries, 0);
}

/// A leaf splits only when it overflows, and a tree emptied by removals shrinks back to
/// nothing: no node, no block, root gone; depth falls as entries go.
#[test]
fn nodes_fill_before_splitting_and_an_emptied_tree_holds_nothing() {
    let mut db = Db::new(64);
    let mut alloc = std::mem::take(&mut db.alloc);
    let mut t = Txn::new(&db.io, &db.cache, &mut alloc, None, 1);
    for i in 0..LEAF_CAP as u64 {
        t.insert(key(0, i), val(i)).unwrap();
    }
    assert_eq!(
        check(&t).unwrap().blocks.len(),
        1,
        "a full leaf is one block"
    );
    t.insert(key(0, 999_999), val(1)).unwrap();
    let r = check(&t).unwrap();
    assert_eq!((r.blocks.len(), r.depth), (3, 2), "one more splits it");
    for i in 0..20_000 {
        t.insert(key(1, i), val(i)).unwrap();
    }
    let deep = check(&t).unwrap().depth;
    assert!(deep >= 3);
    for i in 0..20_000 {
        t.remove(&key(1, i)).unwrap();
    }
    assert!(
        check(&t).unwrap().depth < deep,
        "removals bring the depth down"
    );
    for i in 0..LEAF_CAP as u64 {
        t.remove(&key(0, i)).unwrap();
    }
    t.remove(&key(0, 999_999)).unwrap();
    assert_eq!(t.root(), None, "an empty tree has no root");
    let c = t.commit().unwrap();
    assert_eq!((c.root, c.written), (None, 0));
    assert!(alloc.in_use.is_empty(), "blocks left: {:?}", alloc.in_use);
}

/// Filled in key order (a sequential overwrite's copy-outs, the overlay's sweeps), leaves are
/// split nine tenths to one tenth, not in halves that would stay half full: the same entries
/// in fewer nodes, so more of the index fits the cache. Filled at random, halves as before.
#[test]
fn a_tree_filled_in_key_order_keeps_its_nodes_nine_tenths_full() {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    // Enough leaves for several internal nodes, whose splits follow the same rule.
    let n = 60_000u64;
    let fill = |order: &[u64], others: &[u64]| {
        let mut db = Db::new(64);
        let mut alloc = std::mem::take(&mut db.alloc);
        let mut t = Txn::new(&db.io, &db.cache, &mut alloc, None, 1);
        for &i in others {
            t.insert(key(1, i), val(i)).unwrap();
        }
        for &i in order {
            t.insert(key(0, i), val(i)).unwrap();
        }
        let r = check(&t).unwrap();
        assert_eq!(r.entries, n + others.len() as u64);
        for &i in order.iter().step_by(97) {
            assert_eq!(get(&t, &key(0, i)).unwrap(), Some(val(i)));
        }
        r.blocks.len() as u64
    };
    let in_order: Vec<u64> = (0..n).collect();
    let leaves = n.div_ceil((LEAF_CAP * 9 / 10) as u64);
    // Internal nodes nine tenths full too, and a root.
    let internal = leaves.div_ceil((INTERNAL_CAP * 9 / 10) as u64) + 1;
    let blocks = fill(&in_order, &[]);
    assert!(
        (leaves..=leaves + internal).contains(&blocks),
        "{blocks} blocks for {n} entries in key order ({leaves} leaves and {internal} internal \
         nodes nine tenths full)"
    );
    // The same with another key space's entries after them (as `W` follows `P`): the run
    // is filled in key order although each entry goes in before those.
    let others = 2 * LEAF_CAP as u64;
    let blocks = fill(&in_order, &(0..others).collect::<Vec<u64>>());
    assert!(
        blocks <= leaves + internal + 1 + others.div_ceil(LEAF_CAP as u64 / 2),
        "{blocks} blocks for {n} entries in key order before {others} others"
    );
    let mut shuffled = in_order;
    shuffled.shuffle(&mut rand::rngs::StdRng::seed_from_u64(5));
    let blocks = fill(&shuffled, &[]);
    assert!(
        blocks > n / (LEAF_CAP as u64 * 3 / 4),
        "{blocks} blocks for {n} entries at random: halves leave leaves under 3/4 full"
    );
}

/// A leaf that takes an entry gets room for a full node at once (growing by doubling would
/// take a full one to twice the 4 KiB the cache counts); one whose entry is only replaced
/// keeps the vectors it was read with.
#[test]
fn a_leaf_taking_an_entry_gets_room_for_a_full_one_and_a_replace_none() {
    let mut db = Db::new(64);
    let mut alloc = std::mem::take(&mut db.alloc);
    let mut t = Txn::new(&db.io, &db.cache, &mut alloc, None, 1);
    for i in 0..40u64 {
        t.insert(key(0, 2 * i), val(i)).unwrap();
    }
    let c = t.commit().unwrap();
    alloc.flip();
    let mut t = Txn::new(&db.io, &db.cache, &mut alloc, c.root, 2);
    let capacity = |t: &Txn<MemAlloc>| match &t.dirty[&t.root().unwrap()] {
        Node::Leaf { keys, vals } => (keys.capacity(), vals.capacity()),
        Node::Internal { .. } => panic!("40 entries are one leaf"),
    };
    assert_eq!(t.insert(key(0, 10), val(99)).unwrap(), Some(val(5)));
    let (k, v) = capacity(&t);
    assert!(
        k < LEAF_CAP && v < LEAF_CAP,
        "a replace grew the leaf to {k}, {v}"
    );
    assert_eq!(t.insert(key(0, 11), val(11)).unwrap(), None);
    let (k, v) = capacity(&t);
    assert!(
        k > LEAF_CAP && v > LEAF_CAP,
        "an insert left room for {k}, {v}"
    );
}

/// A key that goes in inside its run (not after it) splits a full leaf in halves, wherever
/// in the leaf it lands: only a run filled in key order keeps the left side full.
#[test]
fn a_key_inside_its_run_splits_a_leaf_in_halves() {
    for new in [1, 101, 2 * LEAF_CAP as u64 - 3] {
        let mut db = Db::new(64);
        let mut alloc = std::mem::take(&mut db.alloc);
        let mut t = Txn::new(&db.io, &db.cache, &mut alloc, None, 1);
        for i in 0..LEAF_CAP as u64 {
            t.insert(key(0, 2 * i), val(i)).unwrap();
        }
        t.insert(key(0, new), val(new)).unwrap();
        let Node::Internal { children, .. } = &*t.node(t.root().unwrap()).unwrap() else {
            panic!("one more entry splits the leaf under a new root");
        };
        let sizes: Vec<usize> = children.iter().map(|&c| t.node(c).unwrap().len()).collect();
        let half = LEAF_CAP.div_ceil(2);
        assert_eq!(
            sizes,
            [half, LEAF_CAP + 1 - half],
            "key {new} went in inside its run"
        );
    }
}

/// Damaged trees whose nodes all pass their checksums (the damage is in what they say):
/// children that loop back, point at each other or at blocks never written, keys in any
/// order, leaves and internal nodes mixed at one level. Every operation returns, with a
/// value or an error; none panics or hangs.
#[test]
fn a_damaged_tree_gives_errors_not_panics_or_hangs() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for case in 0..300 {
        let io = MemIo::default();
        let nblocks = rng.random_range(1..12u64);
        for b in 0..nblocks {
            let n = rng.random_range(1..6usize);
            let mut ks: Vec<u64> = (0..n).map(|_| rng.random_range(0..50)).collect();
            if rng.random_bool(0.7) {
                ks.sort_unstable();
                ks.dedup();
            }
            let node = if rng.random_bool(0.5) {
                Node::Leaf {
                    keys: ks.iter().map(|&k| key(0, k)).collect(),
                    vals: ks.iter().map(|&k| val(k)).collect(),
                }
            } else {
                Node::Internal {
                    keys: ks.iter().map(|&k| key(0, k)).collect(),
                    children: ks
                        .iter()
                        .map(|_| rng.random_range(0..nblocks + 2))
                        .collect(),
                }
            };
            io.write_block(b, &node.encode(b, 1)[..]).unwrap();
        }
        let cache = NodeCache::new(1 << 16);
        let v = Committed {
            io: &io,
            cache: &cache,
            root: Some(0),
        };
        for k in 0..50 {
            let _ = get(&v, &key(0, k));
            let _ = seek_ge(&v, &key(0, k));
        }
        let _ = for_each_from(&v, &[0; 16], &mut |_, _| true);
        let _ = check(&v);
        let mut alloc = MemAlloc {
            limit: 1 << 20,
            in_use: (0..nblocks + 2).collect(),
            ..Default::default()
        };
        let mut t = Txn::new(&io, &cache, &mut alloc, Some(0), 2);
        for k in 0..20 {
            if t.insert(key(0, k * 3), val(k)).is_err() || t.remove(&key(0, k)).is_err() {
                break;
            }
        }
        let _ = case;
    }
}
