//! Key space `S`: blocks written to writable snapshots, keyed by *node* as bcachefs keys its
//! snapshots, so a snapshot of a snapshot shares everything with its parent and copies
//! nothing.
//!
//! The writable volumes of an origin form a tree of nodes; only leaves are written. A snapshot
//! of a writable volume freezes its node and gives the volume and the new snapshot a new leaf
//! each under it: O(1), whatever the volume holds. Node ids are handed out downwards, so a
//! node's ancestors have larger ids than it. A volume at node `x` reads block `b` from the
//! first key at or after `(origin, b, x)` whose node is `x` or an ancestor of `x` (a test on
//! the node table, which is small: one row per snapshot); keys of other branches in between
//! are stepped over. No key: the block comes from the volume's base (the origin's preserved
//! copies or the origin itself).
//!
//! ```text
//! key   0 'S'  1 origin u24 (BE)  4 block u64 (BE)  12 node u32 (BE)
//! value 0 loc u64 (LE; u64::MAX: zeroes, no space)  8 reserved
//! ```

use std::collections::HashMap;

use super::btree::{self, BlockAlloc, Txn, View};
use super::node::{Key, Value};
use super::PResult;

pub const SPACE: u8 = b'S';

fn key(origin: u32, block: u64, node: u32) -> Key {
    let mut k = [0u8; 16];
    k[0] = SPACE;
    k[1..4].copy_from_slice(&origin.to_be_bytes()[1..]);
    k[4..12].copy_from_slice(&block.to_be_bytes());
    k[12..16].copy_from_slice(&node.to_be_bytes());
    k
}

fn split_key(k: &Key) -> Option<(u32, u64, u32)> {
    (k[0] == SPACE).then(|| {
        (
            u32::from_be_bytes([0, k[1], k[2], k[3]]),
            u64::from_be_bytes(k[4..12].try_into().unwrap()),
            u32::from_be_bytes(k[12..16].try_into().unwrap()),
        )
    })
}

fn value(loc: u64) -> Value {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&loc.to_le_bytes());
    v
}

fn loc_of(v: &Value) -> u64 {
    u64::from_le_bytes(v[..8].try_into().unwrap())
}

/// The store block an entry of this key space points at (`None`: another key space, or
/// zeroes).
pub fn data_block(k: &Key, v: &Value) -> Option<u64> {
    split_key(k)?;
    Some(loc_of(v)).filter(|&loc| loc != super::preserved::ZERO)
}

/// The first and the past-the-end key of `origin`'s entries.
pub fn origin_keys(origin: u32) -> (Key, Key) {
    (key(origin, 0, 0), key(origin + 1, 0, 0))
}

/// The tree of nodes: each node's parent (the root's is none). Kept in RAM and in the store's
/// snapshot table; one row per snapshot.
#[derive(Clone, Debug, Default)]
pub struct Nodes {
    parent: HashMap<u32, Option<u32>>,
    next: u32,
}

impl Nodes {
    pub fn new() -> Nodes {
        Nodes {
            parent: HashMap::new(),
            next: u32::MAX,
        }
    }

    /// A root node (a writable snapshot of the origin).
    pub fn root(&mut self) -> u32 {
        self.make(None)
    }

    fn make(&mut self, parent: Option<u32>) -> u32 {
        let id = self.next;
        self.next -= 1;
        self.parent.insert(id, parent);
        id
    }

    /// A snapshot of the volume at leaf `x`: `x` is frozen; returns (the volume's new leaf, the
    /// snapshot's leaf).
    pub fn fork(&mut self, x: u32) -> (u32, u32) {
        (self.make(Some(x)), self.make(Some(x)))
    }

    /// A node table as stored: the next id to hand out and each node's parent.
    pub fn from_parts(next: u32, parents: impl IntoIterator<Item = (u32, Option<u32>)>) -> Nodes {
        Nodes {
            parent: parents.into_iter().collect(),
            next,
        }
    }

    /// The next id to hand out (ids go down).
    pub fn next_id(&self) -> u32 {
        self.next
    }

    /// Every node and its parent, in id order.
    pub fn rows(&self) -> Vec<(u32, Option<u32>)> {
        let mut v: Vec<_> = self.parent.iter().map(|(&k, &p)| (k, p)).collect();
        v.sort_unstable();
        v
    }

    pub fn contains(&self, x: u32) -> bool {
        self.parent.contains_key(&x)
    }

    pub fn parent_of(&self, x: u32) -> Option<u32> {
        self.parent.get(&x).copied().flatten()
    }

    pub fn has_children(&self, x: u32) -> bool {
        self.parent.values().any(|&p| p == Some(x))
    }

    /// Forget node `x` (its keys are gone).
    pub fn remove(&mut self, x: u32) {
        self.parent.remove(&x);
    }

    pub fn len(&self) -> usize {
        self.parent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.parent.is_empty()
    }

    /// `a` is `x` or one of its ancestors: `x` sees what `a` wrote.
    pub fn sees(&self, x: u32, a: u32) -> bool {
        let mut cur = Some(x);
        while let Some(c) = cur {
            if c == a {
                return true;
            }
            if c > a {
                // Ancestors have larger ids: past `a`, it cannot come.
                return false;
            }
            cur = self.parent.get(&c).copied().flatten();
        }
        false
    }
}

/// Where the volume at node `x` finds `block`: `None` if it was never written on its path.
pub fn lookup(
    v: &dyn View,
    nodes: &Nodes,
    origin: u32,
    block: u64,
    x: u32,
) -> PResult<Option<u64>> {
    Ok(lookup_owner(v, nodes, origin, block, x)?.map(|(_, loc)| loc))
}

/// [`lookup`], with the node that holds the key (`x` itself: the volume owns the block).
pub fn lookup_owner(
    v: &dyn View,
    nodes: &Nodes,
    origin: u32,
    block: u64,
    x: u32,
) -> PResult<Option<(u32, u64)>> {
    let mut found = None;
    btree::for_each_from(
        v,
        &key(origin, block, x),
        &mut |k, val| match split_key(k) {
            Some((o, b, node)) if o == origin && b == block => {
                if nodes.sees(x, node) {
                    found = Some((node, loc_of(val)));
                    false
                } else {
                    true
                }
            }
            _ => false,
        },
    )?;
    Ok(found)
}

/// Record that the volume at leaf `x` now has `block` at `loc`. Returns the location it
/// replaced in `x` itself (its space is free once the commit is durable); a location of an
/// ancestor stays, the ancestor still holds it.
pub fn write<A: BlockAlloc>(
    t: &mut Txn<A>,
    origin: u32,
    block: u64,
    x: u32,
    loc: u64,
) -> PResult<Option<u64>> {
    Ok(t.insert(key(origin, block, x), value(loc))?
        .map(|v| loc_of(&v)))
}

/// Every key of `origin`: (block, node, location), in key order (for `check`).
pub fn for_each(v: &dyn View, origin: u32, f: &mut dyn FnMut(u64, u32, u64)) -> PResult<()> {
    btree::for_each_from(v, &key(origin, 0, 0), &mut |k, val| match split_key(k) {
        Some((o, b, node)) if o == origin => {
            f(b, node, loc_of(val));
            true
        }
        _ => false,
    })
}

/// Drop the keys of `origin`'s blocks `first..=last` whose node `dead` names (nodes of
/// deleted writable snapshots): returns (node, location) of each, to count and free.
pub fn drop_dead<A: BlockAlloc>(
    t: &mut Txn<A>,
    origin: u32,
    first: u64,
    last: u64,
    dead: &dyn Fn(u32) -> bool,
) -> PResult<Vec<(u32, u64)>> {
    let mut keys = Vec::new();
    btree::for_each_from(
        &*t,
        &key(origin, first, 0),
        &mut |k, val| match split_key(k) {
            Some((o, b, node)) if o == origin && b <= last => {
                if dead(node) {
                    keys.push((b, node, loc_of(val)));
                }
                true
            }
            _ => false,
        },
    )?;
    let mut dropped = Vec::with_capacity(keys.len());
    for (b, node, loc) in keys {
        t.remove(&key(origin, b, node))?;
        dropped.push((node, loc));
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::pdata::meta::SimDevice;

    /// Writable volumes, snapshots of them and of their snapshots (forks), writes and reads,
    /// against a model in which every volume has its own full map (what v1 copied). Reopened
    /// along the way; a fork costs no tree entry at all.
    #[test]
    fn forked_volumes_read_like_independent_copies() {
        for seed in 0..5 {
            let mut rng = StdRng::seed_from_u64(seed);
            let dev = SimDevice::new(4096);
            let mut meta = dev.format(1 << 16);
            let mut nodes = Nodes::new();
            // Volume -> (its leaf node, its model map).
            let mut vols: Vec<(u32, HashMap<u64, u64>)> = vec![(nodes.root(), HashMap::new())];
            let mut loc = 10u64;
            let blocks = 3000u64;
            let mut pairs = std::collections::HashSet::new();
            for round in 0..10 {
                meta.update(|t| {
                    for _ in 0..300 {
                        let i = rng.random_range(0..vols.len());
                        if rng.random_range(0..20) == 0 && vols.len() < 40 {
                            let (keep, snap) = nodes.fork(vols[i].0);
                            vols[i].0 = keep;
                            let copy = vols[i].1.clone();
                            vols.push((snap, copy));
                        } else {
                            let b = rng.random_range(0..blocks);
                            let own = vols[i].1.get(&b).copied();
                            let replaced = write(t, 9, b, vols[i].0, loc)?;
                            // It replaced a location only if this very node had written it.
                            if let Some(r) = replaced {
                                assert_eq!(Some(r), own);
                            }
                            vols[i].1.insert(b, loc);
                            pairs.insert((vols[i].0, b));
                            loc += 1;
                        }
                    }
                    Ok(())
                })
                .unwrap();
                if round % 3 == 2 {
                    drop(meta);
                    meta = dev.open(1 << 16);
                }
                for (node, map) in &vols {
                    for b in (0..blocks).step_by(11) {
                        let got = meta.with_view(|v| lookup(v, &nodes, 9, b, *node)).unwrap();
                        assert_eq!(got, map.get(&b).copied(), "seed {seed} round {round}");
                    }
                }
            }
            // A fork adds no entry: one per (node, block) written, no more.
            let mut entries = 0;
            meta.with_view(|v| {
                btree::for_each_from(v, &key(9, 0, 0), &mut |k, _| {
                    entries += (k[0] == SPACE) as usize;
                    k[0] == SPACE
                })
            })
            .unwrap();
            assert_eq!(entries, pairs.len(), "seed {seed}: {} volumes", vols.len());
            // Dropping a dead leaf's keys, in two block ranges as background reclaim does,
            // frees exactly what it wrote and leaves the others intact.
            let (victim, _) = vols.pop().unwrap();
            let wrote = pairs.iter().filter(|(n, _)| *n == victim).count();
            let dead = |n: u32| n == victim;
            let mut freed = meta
                .update_with(|t| drop_dead(t, 9, 0, blocks / 2, &dead))
                .unwrap();
            freed.extend(
                meta.update_with(|t| drop_dead(t, 9, blocks / 2 + 1, u64::MAX, &dead))
                    .unwrap(),
            );
            assert_eq!(freed.len(), wrote, "seed {seed}");
            assert!(freed
                .iter()
                .all(|&(n, l)| n == victim && l >= 10 && l < loc));
            for (node, map) in &vols {
                for b in (0..blocks).step_by(13) {
                    let got = meta.with_view(|v| lookup(v, &nodes, 9, b, *node)).unwrap();
                    assert_eq!(got, map.get(&b).copied());
                }
            }
        }
    }

    #[test]
    fn a_node_sees_itself_and_its_ancestors_only() {
        let mut n = Nodes::new();
        let r = n.root();
        let (a, b) = n.fork(r);
        let (a1, a2) = n.fork(a);
        assert!(n.sees(a1, a1) && n.sees(a1, a) && n.sees(a1, r));
        assert!(!n.sees(a1, a2) && !n.sees(a1, b) && !n.sees(r, a));
        assert!(n.sees(b, r) && !n.sees(b, a));
        assert!(r > a && a > a1, "ancestors have larger ids");
    }
}
