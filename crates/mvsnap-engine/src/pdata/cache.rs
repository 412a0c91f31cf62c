//! A bounded cache of clean, decoded nodes, with CLOCK eviction (a referenced bit per entry,
//! a hand that clears it and evicts the first unreferenced one): RAM stays within the budget
//! set at open, whatever the size of the index. Dirty nodes are not here; the transaction
//! that changes them holds them until its commit.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use super::node::Node;
use super::{BlockNo, NODE_SIZE};

struct Entry {
    block: BlockNo,
    node: Arc<Node>,
    referenced: bool,
}

struct Inner {
    entries: Vec<Entry>,
    index: HashMap<BlockNo, usize>,
    hand: usize,
    hits: u64,
    misses: u64,
}

pub struct NodeCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheStats {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub hits: u64,
    pub misses: u64,
}

impl NodeCache {
    /// A cache of at most `budget_bytes` of nodes (at least one node).
    pub fn new(budget_bytes: u64) -> NodeCache {
        let capacity = (budget_bytes / NODE_SIZE as u64).max(1) as usize;
        NodeCache {
            capacity,
            inner: Mutex::new(Inner {
                entries: Vec::new(),
                index: HashMap::new(),
                hand: 0,
                hits: 0,
                misses: 0,
            }),
        }
    }

    pub fn get(&self, block: BlockNo) -> Option<Arc<Node>> {
        let mut g = self.inner.lock();
        let inner = &mut *g;
        match inner.index.get(&block) {
            Some(&i) => {
                inner.hits += 1;
                let e = &mut inner.entries[i];
                e.referenced = true;
                Some(e.node.clone())
            }
            None => {
                inner.misses += 1;
                None
            }
        }
    }

    pub fn insert(&self, block: BlockNo, node: Arc<Node>) {
        let mut g = self.inner.lock();
        let inner = &mut *g;
        if let Some(&i) = inner.index.get(&block) {
            inner.entries[i].node = node;
            inner.entries[i].referenced = true;
            return;
        }
        let entry = Entry {
            block,
            node,
            referenced: false,
        };
        if inner.entries.len() < self.capacity {
            inner.index.insert(block, inner.entries.len());
            inner.entries.push(entry);
            return;
        }
        // CLOCK: the first entry not referenced since the hand last passed goes.
        loop {
            let h = inner.hand;
            inner.hand = (h + 1) % inner.entries.len();
            if std::mem::take(&mut inner.entries[h].referenced) {
                continue;
            }
            inner.index.remove(&inner.entries[h].block);
            inner.index.insert(block, h);
            inner.entries[h] = entry;
            return;
        }
    }

    /// Forget a block (it was freed, or is about to be written with something else).
    pub fn remove(&self, block: BlockNo) {
        let mut g = self.inner.lock();
        let inner = &mut *g;
        let Some(i) = inner.index.remove(&block) else {
            return;
        };
        let last = inner.entries.len() - 1;
        inner.entries.swap_remove(i);
        if i != last {
            let moved = inner.entries[i].block;
            inner.index.insert(moved, i);
        }
        if inner.hand >= inner.entries.len() {
            inner.hand = 0;
        }
    }

    pub fn stats(&self) -> CacheStats {
        let g = self.inner.lock();
        CacheStats {
            capacity_bytes: (self.capacity * NODE_SIZE) as u64,
            used_bytes: (g.entries.len() * NODE_SIZE) as u64,
            hits: g.hits,
            misses: g.misses,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(i: u8) -> Arc<Node> {
        Arc::new(Node::Leaf {
            keys: vec![[i; 16]],
            vals: vec![[i; 16]],
        })
    }

    #[test]
    fn stays_within_budget_and_keeps_what_is_used() {
        let c = NodeCache::new(4 * NODE_SIZE as u64);
        for b in 0..4 {
            c.insert(b, leaf(b as u8));
        }
        // Block 0 is used again and again: the clock spares it.
        for b in 4..40 {
            assert!(
                c.get(0).is_some(),
                "a block used between inserts was evicted"
            );
            c.insert(b, leaf(b as u8));
            assert!(c.stats().used_bytes <= 4 * NODE_SIZE as u64);
        }
        assert_eq!(c.get(39).unwrap().keys()[0], [39u8; 16]);
        assert!(c.get(5).is_none());
        c.remove(0);
        assert!(c.get(0).is_none());
        c.remove(12345);
        let s = c.stats();
        assert_eq!(s.capacity_bytes, 4 * NODE_SIZE as u64);
        assert!(s.hits >= 37 && s.misses >= 2, "{s:?}");
    }
}
