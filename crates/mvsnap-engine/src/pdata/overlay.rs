//! Entries the tree does not hold yet: new keys kept sorted in RAM, that every lookup sees
//! before the tree, and that are folded into the tree in key order, a leaf's worth at a time.
//!
//! Why: random first writes over a big index put one entry into a different leaf each. Applied
//! to the tree at once, each costs a leaf write at the next commit (a dirty set of D nodes
//! over L leaves writes about `D / (L * -ln(1 - D/L))` nodes per entry: 0.85 at 1M mappings
//! with a 64 MiB cache). Held here (~48 bytes an entry instead of a 4 KiB leaf) and folded
//! by a cursor that sweeps the key space, a leaf is written once per sweep with every entry
//! that reached it since the last one, and the leaves a commit writes are neighbours (so are
//! the internal nodes above them).
//!
//! Durability is the caller's: the overlay is part of the working version, and whoever makes
//! that version durable writes the overlay's entries with it (the store: in the tables). The
//! map is persistent ([`imbl::OrdMap`]): [`Overlay::frozen`] takes it as it is in O(1), for a
//! commit to write out without the caller's lock while inserts go on.

use imbl::OrdMap;

use super::node::{Key, Value};

/// RAM an entry costs, counted against the cache's budget: key and value, and the map's
/// share of node overhead.
pub const ENTRY_BYTES: usize = 48;

#[derive(Debug, Default)]
pub struct Overlay {
    entries: OrdMap<Key, Value>,
    /// Where the fold goes on: the first key at or after it (`None`: the smallest key).
    cursor: Option<Key>,
    /// Entries held before the fold starts (see [`Overlay::over_capacity`]).
    capacity: usize,
}

impl Overlay {
    pub fn new(capacity: usize) -> Overlay {
        Overlay {
            capacity,
            ..Default::default()
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
    }

    /// More entries than it should hold: fold some.
    pub fn over_capacity(&self) -> bool {
        self.entries.len() > self.capacity
    }

    /// One more new entry puts it over capacity: the next preserve folds.
    pub fn full(&self) -> bool {
        self.entries.len() >= self.capacity
    }

    /// Most entries it holds: past its capacity, a fold waits for its next leaf to be read
    /// into RAM without the caller's lock, up to this; here it reads what it must.
    pub fn limit(&self) -> usize {
        self.capacity + self.capacity / 4
    }

    /// At its limit: the fold goes on whatever it has to read.
    pub fn over_limit(&self) -> bool {
        self.entries.len() > self.limit()
    }

    /// RAM held, in bytes (for the cache's budget).
    pub fn bytes(&self) -> usize {
        self.entries.len() * ENTRY_BYTES
    }

    pub fn get(&self, key: &Key) -> Option<&Value> {
        self.entries.get(key)
    }

    /// The entries from `key` on, in key order.
    pub fn range_from(&self, key: &Key) -> impl Iterator<Item = (&Key, &Value)> {
        self.entries.range(*key..)
    }

    /// The first entry at or after `key`.
    pub fn first_from(&self, key: &Key) -> Option<(Key, Value)> {
        self.range_from(key).next().map(|(k, v)| (*k, *v))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Key, &Value)> {
        self.entries.iter()
    }

    /// The entries as they are now, unchanged by what happens to the overlay later.
    pub fn frozen(&self) -> FrozenOverlay {
        FrozenOverlay(self.entries.clone())
    }

    /// Insert or replace; returns the value it replaced here.
    pub fn insert(&mut self, key: Key, val: Value) -> Option<Value> {
        self.entries.insert(key, val)
    }

    pub fn remove(&mut self, key: &Key) -> Option<Value> {
        self.entries.remove(key)
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.cursor = None;
    }

    /// The key the fold takes next: the first at or after the cursor, else (the sweep is
    /// over) the smallest.
    pub fn next_to_fold(&self) -> Option<Key> {
        let from = self.cursor.unwrap_or([0; 16]);
        self.entries
            .range(from..)
            .next()
            .or_else(|| self.entries.iter().next())
            .map(|(k, _)| *k)
    }

    /// Take up to `max` entries from `first` on, below `bound` (`None`: no bound), out of the
    /// overlay, and move the cursor just past the last one taken (the next fold goes on in
    /// the same range if `max` left some there, else at the next entry past it).
    pub fn take_range(&mut self, first: Key, bound: Option<Key>, max: usize) -> Vec<(Key, Value)> {
        let taken: Vec<(Key, Value)> = self
            .entries
            .range(first..)
            .take_while(|(k, _)| bound.is_none_or(|b| **k < b))
            .take(max.max(1))
            .map(|(k, v)| (*k, *v))
            .collect();
        for (k, _) in &taken {
            self.entries.remove(k);
        }
        if let Some((last, _)) = taken.last() {
            self.cursor = successor(last);
        }
        taken
    }
}

/// An overlay's entries as they were at [`Overlay::frozen`].
#[derive(Debug, Clone, Default)]
pub struct FrozenOverlay(OrdMap<Key, Value>);

impl FrozenOverlay {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// In key order.
    pub fn iter(&self) -> impl Iterator<Item = (&Key, &Value)> {
        self.0.iter()
    }
}

/// The key right after `k` (`None`: `k` is the largest).
fn successor(k: &Key) -> Option<Key> {
    u128::from_be_bytes(*k)
        .checked_add(1)
        .map(|n| n.to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(n: u8) -> Key {
        let mut k = [0u8; 16];
        k[15] = n;
        k
    }

    #[test]
    fn the_cursor_sweeps_in_key_order_and_wraps() {
        let mut o = Overlay::new(2);
        o.insert(k(5), [5; 16]);
        assert!(!o.full(), "below capacity");
        o.insert(k(1), [1; 16]);
        assert!(o.full(), "at capacity: the next entry folds");
        assert!(!o.over_capacity(), "at capacity, not over");
        for n in [9, 3, 7] {
            o.insert(k(n), [n; 16]);
        }
        assert!(o.over_capacity());
        assert_eq!(o.next_to_fold(), Some(k(1)));
        // A leaf holding keys below 5: two of its three entries at most.
        let t = o.take_range(k(1), Some(k(5)), 1);
        assert_eq!(t, vec![(k(1), [1; 16])]);
        assert_eq!(
            o.next_to_fold(),
            Some(k(3)),
            "the rest of that leaf's range"
        );
        let t = o.take_range(k(3), Some(k(5)), 10);
        assert_eq!(t, vec![(k(3), [3; 16])]);
        assert_eq!(
            o.next_to_fold(),
            Some(k(5)),
            "past the range, once it is empty"
        );
        // A key behind the cursor waits for the next sweep.
        o.insert(k(2), [2; 16]);
        let t = o.take_range(k(5), None, 10);
        assert_eq!(t.len(), 3);
        assert_eq!(o.next_to_fold(), Some(k(2)), "wrapped");
        assert_eq!(o.len(), 1);
        assert!(!o.over_capacity());
        assert_eq!(o.bytes(), ENTRY_BYTES);
        assert_eq!(successor(&[0xff; 16]), None);
        assert_eq!(successor(&k(1)), Some(k(2)));
    }
}
