//! A bounded cache of clean, decoded nodes, with CLOCK eviction (a referenced bit per entry,
//! a hand that clears it and evicts the first unreferenced one): RAM stays within the budget
//! set at open, whatever the size of the index. Each node counts the RAM it takes
//! ([`Node::heap_bytes`]), not its 4 KiB block. Dirty nodes are not here; the transaction
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
    /// `node.heap_bytes()`, as counted in [`Inner::used`].
    bytes: usize,
    referenced: bool,
}

/// Buckets of [`Inner::removals`]: blocks share a counter, so a reuse of one may discard a
/// fetch of another (harmless: it is read again under the lock).
const STAMP_BUCKETS: usize = 1024;

struct Inner {
    entries: Vec<Entry>,
    index: HashMap<BlockNo, usize>,
    /// RAM of the cached nodes.
    used: usize,
    hand: usize,
    hits: u64,
    misses: u64,
    prefetched: u64,
    /// Removals so far, by block bucket: a block is removed before it is reused for another
    /// node, so a fetch that saw no removal of its bucket read the node its block still holds.
    removals: Vec<u32>,
}

fn bucket(block: BlockNo) -> usize {
    (block % STAMP_BUCKETS as u64) as usize
}

pub struct NodeCache {
    budget: usize,
    /// Nodes held outside the cache against its budget, a block each (see
    /// [`NodeCache::set_pinned`]).
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
    /// Lookups a cached node served, and nodes read from the store (since the cache was
    /// made): how well the budget fits the index's working set.
    pub hits: u64,
    pub misses: u64,
    /// Of the misses, nodes read by a fetch without the tree's lock (ahead of a lookup):
    /// the rest were read by a lookup, under whatever lock its caller held.
    pub prefetched: u64,
}

impl NodeCache {
    /// A cache of at most `budget_bytes` of nodes (at least one node).
    pub fn new(budget_bytes: u64) -> NodeCache {
        let budget = usize::try_from(budget_bytes).unwrap_or(usize::MAX);
        NodeCache {
            budget,
            pinned: AtomicUsize::new(0),
            inner: Mutex::new(Inner {
                entries: Vec::new(),
                index: HashMap::new(),
                used: 0,
                hand: 0,
                hits: 0,
                misses: 0,
                prefetched: 0,
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
        // The read was made, kept or not.
        g.misses += 1;
        g.prefetched += 1;
        if g.removals[bucket(block)] != stamp || g.index.contains_key(&block) {
            return false;
        }
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

    /// RAM the clean nodes may take now.
    fn room(&self) -> usize {
        let pinned = self
            .pinned
            .load(Ordering::Relaxed)
            .saturating_mul(NODE_SIZE);
        self.budget.saturating_sub(pinned).max(self.budget / 8)
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
        let bytes = node.heap_bytes();
        if let Some(&i) = inner.index.get(&block) {
            let e = &mut inner.entries[i];
            inner.used = inner.used - e.bytes + bytes;
            (e.node, e.bytes, e.referenced) = (node, bytes, true);
            Self::shrink_locked(room, inner);
            return;
        }
        // At least one node stays cached, whatever the budget.
        while !inner.entries.is_empty() && inner.used + bytes > room {
            Self::evict_one(inner);
        }
        inner.index.insert(block, inner.entries.len());
        inner.entries.push(Entry {
            block,
            node,
            bytes,
            referenced: false,
        });
        inner.used += bytes;
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

    /// Evict (CLOCK, as an insert does) until the nodes left take at most `room` bytes (or
    /// one is left).
    fn shrink_locked(room: usize, inner: &mut Inner) {
        while inner.used > room && inner.entries.len() > 1 {
            Self::evict_one(inner);
        }
    }

    /// Evict the CLOCK victim. The last entry moves into its slot, and the hand passes over
    /// it this round: it is often the newest, which would otherwise go next, before older
    /// ones the hand has not reached.
    fn evict_one(inner: &mut Inner) {
        let h = Self::clock_victim(inner);
        Self::remove_at(inner, h);
        if h < inner.entries.len() {
            inner.hand = (h + 1) % inner.entries.len();
        }
    }

    /// Whether `block` is cached, without marking it used.
    #[cfg(test)]
    fn holds(&self, block: BlockNo) -> bool {
        self.inner.lock().index.contains_key(&block)
    }

    fn remove_at(inner: &mut Inner, i: usize) {
        inner.index.remove(&inner.entries[i].block);
        inner.used -= inner.entries[i].bytes;
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
            capacity_bytes: self.budget as u64,
            used_bytes: g.used as u64,
            pinned_bytes: (self.pinned.load(Ordering::Relaxed) * NODE_SIZE) as u64,
            hits: g.hits,
            misses: g.misses,
            prefetched: g.prefetched,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdata::node::LEAF_CAP;

    /// A leaf of `n` entries of `i`.
    fn leaf_of(i: u8, n: usize) -> Arc<Node> {
        Arc::new(Node::Leaf {
            keys: vec![[i; 16]; n],
            vals: vec![[i; 16]; n],
        })
    }

    /// A leaf a little smaller than a block in RAM: as many fit as blocks in the budget.
    fn leaf(i: u8) -> Arc<Node> {
        let l = leaf_of(i, 120);
        assert!(l.heap_bytes() <= NODE_SIZE && l.heap_bytes() > NODE_SIZE * 15 / 16);
        l
    }

    #[test]
    fn nodes_never_used_leave_in_the_order_they_came() {
        let c = NodeCache::new(4 * NODE_SIZE as u64);
        for b in 0..40 {
            c.insert(b, leaf(b as u8));
            let kept: Vec<u64> = (0..=b).filter(|&x| c.holds(x)).collect();
            let newest: Vec<u64> = (b.saturating_sub(3)..=b).collect();
            assert_eq!(kept, newest, "after inserting {b}");
        }
    }

    #[test]
    fn nodes_count_the_ram_they_take_not_their_blocks() {
        let c = NodeCache::new(8 * NODE_SIZE as u64);
        // Half-full leaves: twice as many as the budget has blocks.
        let half = leaf_of(0, 60).heap_bytes();
        assert!(half <= NODE_SIZE / 2, "{half}");
        for b in 0..16 {
            c.insert(b, leaf_of(b as u8, 60));
        }
        assert!(
            (0..16).all(|b| c.probe(b).is_some()),
            "a half-full leaf was evicted"
        );
        assert_eq!(c.stats().used_bytes, 16 * half as u64);
        // A full leaf takes more than its block: it evicts two of them.
        let full = leaf_of(99, LEAF_CAP);
        assert!(full.heap_bytes() > NODE_SIZE);
        c.insert(99, full.clone());
        assert_eq!((0..16).filter(|&b| c.probe(b).is_some()).count(), 14);
        assert!(c.stats().used_bytes <= 8 * NODE_SIZE as u64);
        // Replaced by a smaller node: counted at its new size.
        c.insert(99, leaf_of(98, 1));
        assert_eq!(
            c.stats().used_bytes,
            14 * half as u64 + leaf_of(98, 1).heap_bytes() as u64
        );
        // A node bigger than the whole budget is still cached, alone, even when the room
        // shrinks.
        let tiny = NodeCache::new(1024);
        tiny.insert(1, leaf_of(1, 60));
        tiny.insert(2, full);
        assert!(!tiny.holds(1) && tiny.holds(2));
        tiny.set_pinned(1);
        assert!(tiny.holds(2));
        // Nodes that fill the room exactly all stay, on insert and when one is replaced by
        // a node of its size.
        let exact = NodeCache::new(7 * half as u64);
        for b in 0..7 {
            exact.insert(b, leaf_of(b as u8, 60));
        }
        assert_eq!((0..7).filter(|&b| exact.holds(b)).count(), 7);
        exact.insert(3, leaf_of(33, 60));
        assert_eq!((0..7).filter(|&b| exact.holds(b)).count(), 7);
        assert_eq!(exact.stats().used_bytes, 7 * half as u64);
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
        let one = leaf(0).heap_bytes() as u64;
        assert_eq!((s.used_bytes, s.pinned_bytes), (3 * one, 5 * 4096), "{s:?}");
        assert!(c.get(7).is_some(), "the clock evicted a node in use first");
        for b in 8..20 {
            c.insert(b, leaf(b as u8));
            assert!(c.stats().used_bytes <= 3 * 4096);
        }
        // Whatever is pinned, an eighth of the budget stays for lookups.
        c.set_pinned(100);
        assert_eq!(c.stats().used_bytes, one);
        c.insert(20, leaf(20));
        assert_eq!(c.get(20).unwrap().keys()[0], [20u8; 16]);
        let big = NodeCache::new(16 * NODE_SIZE as u64);
        big.set_pinned(100);
        for b in 0..5 {
            big.insert(b, leaf(b as u8));
        }
        assert_eq!(big.stats().used_bytes, 2 * one, "an eighth of 16 nodes");
        // Unpinned (the commit finished): the room comes back.
        c.set_pinned(0);
        for b in 21..40 {
            c.insert(b, leaf(b as u8));
        }
        assert_eq!(c.stats().used_bytes, 8 * one);
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
