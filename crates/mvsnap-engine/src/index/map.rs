//! A persistent radix tree of 64-way nodes mapping chunk -> (slot, valid-block bitmap).
//! Cloning is O(1) (the root is shared); a write copies the path it changes.

use std::sync::Arc;

const FANOUT_BITS: u32 = 6;
const FANOUT: usize = 1 << FANOUT_BITS;
const MASK: u64 = FANOUT as u64 - 1;

/// Where a chunk's own data lives: a slot in the store, and which blocks of it are valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    pub slot: u32,
    pub bits: u64,
}

#[derive(Clone)]
enum Node {
    /// Dense by rank: entry `i` of `slots`/`bits` belongs to the i-th set bit of `present`.
    Leaf {
        present: u64,
        slots: Vec<u32>,
        bits: Vec<u64>,
    },
    Inner(Box<[Option<Arc<Node>>; FANOUT]>),
}

fn empty_inner() -> Node {
    Node::Inner(Box::new(std::array::from_fn(|_| None)))
}

fn empty_leaf() -> Node {
    Node::Leaf {
        present: 0,
        slots: Vec::new(),
        bits: Vec::new(),
    }
}

#[derive(Clone)]
pub struct VolumeMap {
    root: Option<Arc<Node>>,
    /// Inner levels above the leaves; fixed by the volume size.
    levels: u32,
    len: u64,
}

impl VolumeMap {
    pub fn new(chunks: u64) -> VolumeMap {
        let mut levels = 0;
        while (chunks.saturating_sub(1)) >> (FANOUT_BITS * (levels + 1)) > 0 {
            levels += 1;
        }
        VolumeMap {
            root: None,
            levels,
            len: 0,
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn index(&self, chunk: u64, level: u32) -> usize {
        ((chunk >> (FANOUT_BITS * level)) & MASK) as usize
    }

    pub fn get(&self, chunk: u64) -> Option<MapEntry> {
        let mut node = self.root.as_deref()?;
        let mut level = self.levels;
        loop {
            match node {
                Node::Inner(children) => {
                    node = children[self.index(chunk, level)].as_deref()?;
                    level -= 1;
                }
                Node::Leaf {
                    present,
                    slots,
                    bits,
                } => {
                    let i = self.index(chunk, 0);
                    if present & (1 << i) == 0 {
                        return None;
                    }
                    let rank = (present & ((1u64 << i) - 1)).count_ones() as usize;
                    return Some(MapEntry {
                        slot: slots[rank],
                        bits: bits[rank],
                    });
                }
            }
        }
    }

    /// Insert or replace. `on_leaf_copy` is called for every slot of a leaf that had to be
    /// copied because another map shares it: that slot now has one more referencing leaf.
    pub fn set(
        &mut self,
        chunk: u64,
        entry: MapEntry,
        on_leaf_copy: &mut dyn FnMut(u32),
    ) -> Option<MapEntry> {
        let levels = self.levels;
        let root = self.root.get_or_insert_with(|| {
            Arc::new(if levels == 0 {
                empty_leaf()
            } else {
                empty_inner()
            })
        });
        let old = set_in(root, chunk, levels, entry, on_leaf_copy);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub fn remove(&mut self, chunk: u64, on_leaf_copy: &mut dyn FnMut(u32)) -> Option<MapEntry> {
        let levels = self.levels;
        let root = self.root.as_mut()?;
        let old = remove_in(root, chunk, levels, on_leaf_copy);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// Every entry in chunk order.
    pub fn for_each(&self, f: &mut dyn FnMut(u64, MapEntry)) {
        if let Some(root) = &self.root {
            walk(root, 0, self.levels, f);
        }
    }

    /// Entries of chunks in `[first, last]`, in order.
    pub fn range(&self, first: u64, last: u64) -> Vec<(u64, MapEntry)> {
        let mut out = Vec::new();
        // Small ranges (one request) use point lookups; they cost one path each.
        if last - first < 64 {
            for c in first..=last {
                if let Some(e) = self.get(c) {
                    out.push((c, e));
                }
            }
        } else {
            self.for_each(&mut |c, e| {
                if (first..=last).contains(&c) {
                    out.push((c, e))
                }
            });
        }
        out
    }

    /// Give up this map's references. `on_release` is called for each slot whose referencing
    /// leaf this map owned alone; leaves still shared with another map stay with it.
    pub fn release(self, on_release: &mut dyn FnMut(u32)) {
        if let Some(root) = self.root {
            release_node(root, on_release);
        }
    }

    /// Whether the leaf holding `chunk` is shared with another map (then its slots are too).
    pub fn path_shared(&self, chunk: u64) -> bool {
        let Some(mut node) = self.root.as_ref() else {
            return false;
        };
        let mut level = self.levels;
        loop {
            if Arc::strong_count(node) > 1 {
                return true;
            }
            match &**node {
                Node::Inner(children) => match &children[self.index(chunk, level)] {
                    Some(c) => {
                        node = c;
                        level -= 1;
                    }
                    None => return false,
                },
                Node::Leaf { .. } => return false,
            }
        }
    }
}

/// Make `node` exclusively ours, reporting the slots of a copied leaf.
fn make_mut<'a>(node: &'a mut Arc<Node>, on_leaf_copy: &mut dyn FnMut(u32)) -> &'a mut Node {
    if Arc::strong_count(node) > 1 {
        if let Node::Leaf { slots, .. } = &**node {
            for &s in slots {
                on_leaf_copy(s);
            }
        }
    }
    Arc::make_mut(node)
}

fn set_in(
    node: &mut Arc<Node>,
    chunk: u64,
    level: u32,
    entry: MapEntry,
    cb: &mut dyn FnMut(u32),
) -> Option<MapEntry> {
    let idx = ((chunk >> (FANOUT_BITS * level)) & MASK) as usize;
    match make_mut(node, cb) {
        Node::Inner(children) => {
            let child = children[idx].get_or_insert_with(|| {
                Arc::new(if level == 1 {
                    empty_leaf()
                } else {
                    empty_inner()
                })
            });
            set_in(child, chunk, level - 1, entry, cb)
        }
        Node::Leaf {
            present,
            slots,
            bits,
        } => {
            let rank = (*present & ((1u64 << idx) - 1)).count_ones() as usize;
            if *present & (1 << idx) != 0 {
                let old = MapEntry {
                    slot: slots[rank],
                    bits: bits[rank],
                };
                slots[rank] = entry.slot;
                bits[rank] = entry.bits;
                Some(old)
            } else {
                *present |= 1 << idx;
                slots.insert(rank, entry.slot);
                bits.insert(rank, entry.bits);
                None
            }
        }
    }
}

fn remove_in(
    node: &mut Arc<Node>,
    chunk: u64,
    level: u32,
    cb: &mut dyn FnMut(u32),
) -> Option<MapEntry> {
    let idx = ((chunk >> (FANOUT_BITS * level)) & MASK) as usize;
    // Look before copying: removing an absent entry must not copy shared nodes.
    let present = match &**node {
        Node::Inner(children) => children[idx].is_some(),
        Node::Leaf { present, .. } => present & (1 << idx) != 0,
    };
    if !present {
        return None;
    }
    match make_mut(node, cb) {
        Node::Inner(children) => remove_in(children[idx].as_mut()?, chunk, level - 1, cb),
        Node::Leaf {
            present,
            slots,
            bits,
        } => {
            let rank = (*present & ((1u64 << idx) - 1)).count_ones() as usize;
            *present &= !(1 << idx);
            Some(MapEntry {
                slot: slots.remove(rank),
                bits: bits.remove(rank),
            })
        }
    }
}

fn walk(node: &Node, base: u64, level: u32, f: &mut dyn FnMut(u64, MapEntry)) {
    match node {
        Node::Inner(children) => {
            for (i, c) in children.iter().enumerate() {
                if let Some(c) = c {
                    walk(
                        c,
                        base | ((i as u64) << (FANOUT_BITS * level)),
                        level - 1,
                        f,
                    );
                }
            }
        }
        Node::Leaf {
            present,
            slots,
            bits,
        } => {
            let mut p = *present;
            let mut rank = 0;
            while p != 0 {
                let i = p.trailing_zeros() as u64;
                f(
                    base | i,
                    MapEntry {
                        slot: slots[rank],
                        bits: bits[rank],
                    },
                );
                rank += 1;
                p &= p - 1;
            }
        }
    }
}

fn release_node(node: Arc<Node>, on_release: &mut dyn FnMut(u32)) {
    // A node someone else still holds keeps its children alive; dropping our Arc is enough.
    let Some(node) = Arc::into_inner(node) else {
        return;
    };
    match node {
        Node::Inner(children) => {
            for c in children.into_iter().flatten() {
                release_node(c, on_release);
            }
        }
        Node::Leaf { slots, .. } => {
            for s in slots {
                on_release(s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn matches_btreemap_and_shares_on_clone() {
        let mut m = VolumeMap::new(1 << 20);
        let mut model = BTreeMap::new();
        let mut copies = 0;
        for i in 0..5000u64 {
            let c = (i * 7919) % (1 << 20);
            let e = MapEntry {
                slot: i as u32,
                bits: i,
            };
            m.set(c, e, &mut |_| copies += 1);
            model.insert(c, e);
        }
        assert_eq!(copies, 0, "an unshared map never copies");
        let snap = m.clone();
        let c0 = *model.keys().next().unwrap();
        m.set(
            c0,
            MapEntry {
                slot: 999_999,
                bits: 1,
            },
            &mut |_| copies += 1,
        );
        assert!(copies > 0, "writing a shared leaf copies it");
        assert_eq!(
            snap.get(c0),
            model.get(&c0).copied(),
            "the clone is unchanged"
        );
        assert_eq!(m.get(c0).unwrap().slot, 999_999);
        let mut seen = Vec::new();
        snap.for_each(&mut |c, e| seen.push((c, e)));
        assert_eq!(
            seen,
            model.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>()
        );
        assert_eq!(snap.len(), model.len() as u64);
        let removed = m.remove(c0, &mut |_| {});
        assert_eq!(removed.unwrap().slot, 999_999);
        assert_eq!(m.get(c0), None);
        assert_eq!(m.remove(c0, &mut |_| {}), None);
        let mut released = 0;
        snap.release(&mut |_| released += 1);
        // The clone releases only the leaf it alone kept (the copied one); shared leaves stay.
        assert_eq!(released, copies);
        let mut rest = 0;
        m.release(&mut |_| rest += 1);
        assert_eq!(rest, 4999);
    }

    #[test]
    fn single_level_map() {
        let mut m = VolumeMap::new(10);
        assert_eq!(m.levels, 0);
        m.set(3, MapEntry { slot: 1, bits: 2 }, &mut |_| {});
        assert_eq!(m.get(3), Some(MapEntry { slot: 1, bits: 2 }));
        assert_eq!(m.get(4), None);
        assert_eq!(m.range(0, 9), vec![(3, MapEntry { slot: 1, bits: 2 })]);
    }
}
