//! A bounded cache of clean, decoded nodes, with CLOCK eviction (a referenced bit per entry,
//! a hand that clears it and evicts the first unreferenced one): RAM stays within the budget
//! set at open, whatever the size of the index. Dirty nodes are not here; the transaction
//! that changes them holds them until its commit.
//!
//! The budget covers the nodes the open transaction changed and those a commit in flight is
//! writing too ([`NodeCache::set_pinned`]): they are held outside the cache, and the clean
//! ones make room for them, so the tree's RAM stays within the budget whatever the writers do.
//!
//! Nodes may also be read without the lock that guards the tree ([`NodeCache::stamp`],
//! [`NodeCache::insert_fetched`]): a device read under that lock would stall every user of
//! the tree behind it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::node::Node;
use super::{BlockNo, NODE_SIZE};

struct Entry {
    block: BlockNo,
    node: Arc<Node>,
    referenced: bool,
}

/// Buckets of [`Inner::removals`]: blocks share a counter, so a reuse of one may discard a
/// fetch of another (harmless: it is read again under the lock).
const STAMP_BUCKETS: usize = 1024;

struct Inner {
    entries: Vec<Entry>,
    index: HashMap<BlockNo, usize>,
    hand: usize,
    hits: u64,
    misses: u64,
    /// Removals so far, by block bucket: a block is removed before it is reused for another
    /// node, so a fetch that saw no removal of its bucket read the node its block still holds.
    removals: Vec<u32>,
}

fn bucket(block: BlockNo) -> usize {
    (block % STAMP_BUCKETS as u64) as usize
}

pub struct NodeCache {
    capacity: usize,
    /// Nodes held outside the cache against its budget (see [`NodeCache::set_pinned`]).
    pinned: AtomicUsize,
    inner: Mutex<Inner>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheStats {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    /// Of the budget, what the open transaction and a commit in flight hold (not counted in
    /// `used_bytes`).
    pub pinned_bytes: u64,
    pub hits: u64,
    pub misses: u64,
}

impl NodeCache {
    /// A cache of at most `budget_bytes` of nodes (at least one node).
    pub fn new(budget_bytes: u64) -> NodeCache {
        let capacity = (budget_bytes / NODE_SIZE as u64).max(1) as usize;
        NodeCache {
            capacity,
            pinned: AtomicUsize::new(0),
            inner: Mutex::new(Inner {
                entries: Vec::new(),
                index: HashMap::new(),
                hand: 0,
                hits: 0,
                misses: 0,
                removals: vec![0; STAMP_BUCKETS],
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

    /// A cached node, if any, for a probe of what to fetch: a hit counts as one, a miss does
    /// not (the fetch that follows counts it).
    pub fn probe(&self, block: BlockNo) -> Option<Arc<Node>> {
        let mut g = self.inner.lock();
        let inner = &mut *g;
        let &i = inner.index.get(&block)?;
        inner.hits += 1;
        let e = &mut inner.entries[i];
        e.referenced = true;
        Some(e.node.clone())
    }

    /// Taken under the tree's lock while `block` is part of the tree: what
    /// [`NodeCache::insert_fetched`] checks after a read made without that lock.
    pub fn stamp(&self, block: BlockNo) -> u32 {
        self.inner.lock().removals[bucket(block)]
    }

    /// Cache a node read from `block` without the tree's lock, unless the block was removed
    /// (freed and reused) since `stamp` was taken: then the read may have seen another node's
    /// content. A block already cached keeps its entry. True if inserted.
    pub fn insert_fetched(&self, block: BlockNo, node: Arc<Node>, stamp: u32) -> bool {
        let mut g = self.inner.lock();
        if g.removals[bucket(block)] != stamp || g.index.contains_key(&block) {
            return false;
        }
        g.misses += 1;
        Self::insert_locked(self.room(), &mut g, block, node);
        true
    }

    pub fn insert(&self, block: BlockNo, node: Arc<Node>) {
        let mut g = self.inner.lock();
        Self::insert_locked(self.room(), &mut g, block, node);
    }

    /// `nodes` are held outside the cache (the open transaction's changed nodes, a commit's
    /// frozen ones): clean nodes are evicted to keep the total within the budget. An eighth
    /// of it stays for clean nodes whatever is pinned (the store's dirty limit keeps the
    /// pinned ones below the rest; a lookup that finds nothing cached reads the device).
    pub fn set_pinned(&self, nodes: usize) {
        let before = self.pinned.swap(nodes, Ordering::Relaxed);
        if nodes > before {
            let room = self.room();
            let mut g = self.inner.lock();
            Self::shrink_locked(room, &mut g);
        }
    }

    /// Clean nodes the cache may hold now.
    fn room(&self) -> usize {
        self.capacity
            .saturating_sub(self.pinned.load(Ordering::Relaxed))
            .max(self.capacity / 8)
            .max(1)
    }

    /// Insert many, taking the cache's lock a few dozen at a time: lookups (some under the
    /// state lock) wait for one batch at most.
    pub fn insert_all(&self, nodes: impl IntoIterator<Item = (BlockNo, Arc<Node>)>) {
        const BATCH: usize = 64;
        let mut nodes = nodes.into_iter().peekable();
        while nodes.peek().is_some() {
            let room = self.room();
            let mut g = self.inner.lock();
            for (block, node) in nodes.by_ref().take(BATCH) {
                Self::insert_locked(room, &mut g, block, node);
            }
        }
    }

    fn insert_locked(room: usize, inner: &mut Inner, block: BlockNo, node: Arc<Node>) {
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
        Self::shrink_locked(room, inner);
        if inner.entries.len() < room {
            inner.index.insert(block, inner.entries.len());
            inner.entries.push(entry);
            return;
        }
        let h = Self::clock_victim(inner);
        inner.hand = (h + 1) % inner.entries.len();
        inner.index.remove(&inner.entries[h].block);
        inner.index.insert(block, h);
        inner.entries[h] = entry;
    }

    /// CLOCK: the first entry not referenced since the hand last passed (the hand stops on
    /// it; those it passes lose their referenced bit). The cache must not be empty.
    fn clock_victim(inner: &mut Inner) -> usize {
        loop {
            let h = inner.hand;
            if !std::mem::take(&mut inner.entries[h].referenced) {
                return h;
            }
            inner.hand = (h + 1) % inner.entries.len();
        }
    }

    /// Evict (CLOCK, as an insert does) until at most `room` entries are left.
    fn shrink_locked(room: usize, inner: &mut Inner) {
        while inner.entries.len() > room {
            let h = Self::clock_victim(inner);
            Self::remove_at(inner, h);
        }
    }

    fn remove_at(inner: &mut Inner, i: usize) {
        inner.index.remove(&inner.entries[i].block);
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

    /// Forget a block (it was freed, or is about to be written with something else).
    pub fn remove(&self, block: BlockNo) {
        let mut g = self.inner.lock();
        let inner = &mut *g;
        // Counted even when not cached: a fetch of it may be in flight.
        let b = &mut inner.removals[bucket(block)];
        *b = b.wrapping_add(1);
        let Some(&i) = inner.index.get(&block) else {
            return;
        };
        Self::remove_at(inner, i);
    }

    pub fn stats(&self) -> CacheStats {
        let g = self.inner.lock();
        CacheStats {
            capacity_bytes: (self.capacity * NODE_SIZE) as u64,
            used_bytes: (g.entries.len() * NODE_SIZE) as u64,
            pinned_bytes: (self.pinned.load(Ordering::Relaxed) * NODE_SIZE) as u64,
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

    #[test]
    fn pinned_nodes_take_their_room_from_clean_ones() {
        let c = NodeCache::new(8 * NODE_SIZE as u64);
        for b in 0..8 {
            c.insert(b, leaf(b as u8));
        }
        assert!(c.get(7).is_some());
        // Five nodes held outside: three clean ones left, the one just used among them.
        c.set_pinned(5);
        let s = c.stats();
        assert_eq!(
            (s.used_bytes, s.pinned_bytes),
            (3 * 4096, 5 * 4096),
            "{s:?}"
        );
        assert!(c.get(7).is_some(), "the clock evicted a node in use first");
        for b in 8..20 {
            c.insert(b, leaf(b as u8));
            assert!(c.stats().used_bytes <= 3 * 4096);
        }
        // Whatever is pinned, an eighth of the budget stays for lookups.
        c.set_pinned(100);
        assert_eq!(c.stats().used_bytes, 4096);
        c.insert(20, leaf(20));
        assert_eq!(c.get(20).unwrap().keys()[0], [20u8; 16]);
        let big = NodeCache::new(16 * NODE_SIZE as u64);
        big.set_pinned(100);
        for b in 0..5 {
            big.insert(b, leaf(b as u8));
        }
        assert_eq!(big.stats().used_bytes, 2 * 4096, "an eighth of 16 nodes");
        // Unpinned (the commit finished): the room comes back.
        c.set_pinned(0);
        for b in 21..40 {
            c.insert(b, leaf(b as u8));
        }
        assert_eq!(c.stats().used_bytes, 8 * 4096);
    }

    #[test]
    fn a_fetch_is_cached_only_if_its_block_was_not_reused_meanwhile() {
        let c = NodeCache::new(8 * NODE_SIZE as u64);
        // Nothing happened to block 3 between the stamp and the read: cached, counted a miss.
        let st = c.stamp(3);
        assert!(c.insert_fetched(3, leaf(3), st));
        assert_eq!(c.stats().misses, 1);
        assert_eq!(c.probe(3).unwrap().keys()[0], [3u8; 16]);
        assert_eq!(c.stats().hits, 1);
        // A block already cached keeps what it has (it may be newer than what was read).
        assert!(!c.insert_fetched(3, leaf(9), c.stamp(3)));
        assert_eq!(c.probe(3).unwrap().keys()[0], [3u8; 16]);
        // Block 5 is reused (removed, even uncached) while a fetch of it is in flight: the
        // fetch read the old content and must not be cached.
        let st = c.stamp(5);
        c.remove(5);
        assert!(!c.insert_fetched(5, leaf(5), st));
        assert!(c.probe(5).is_none());
        // So is one of a block sharing its bucket, and a fetch stamped after the reuse is fine.
        let st = c.stamp(7);
        c.remove(7 + STAMP_BUCKETS as u64);
        assert!(!c.insert_fetched(7, leaf(7), st));
        let st = c.stamp(5);
        assert!(c.insert_fetched(5, leaf(6), st));
        assert_eq!(c.probe(5).unwrap().keys()[0], [6u8; 16]);
        // A probe counts its hits, not its misses (the fetch that follows counts those).
        let before = c.stats();
        let _ = (c.probe(5), c.probe(100));
        assert_eq!(
            (c.stats().hits, c.stats().misses),
            (before.hits + 1, before.misses)
        );
    }
}
