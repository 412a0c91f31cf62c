//! A map from keys to the journal sequence that last touched them, whose entries expire once
//! a watermark (durable or settled sequence) passes them. Expiry costs O(1) per entry, not a
//! scan of the map per write: sequences are handed out in increasing order, so a queue in
//! insertion order is also a queue in expiry order.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

#[derive(Debug)]
pub(crate) struct ExpiringMap<K> {
    map: HashMap<K, u64>,
    order: VecDeque<(u64, K)>,
}

impl<K> Default for ExpiringMap<K> {
    fn default() -> Self {
        ExpiringMap {
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<K: Hash + Eq + Copy> ExpiringMap<K> {
    /// Record that `key` was touched by record `seq` (sequences never go down).
    pub fn insert(&mut self, key: K, seq: u64) {
        debug_assert!(self.order.back().is_none_or(|&(s, _)| s <= seq));
        self.map.insert(key, seq);
        self.order.push_back((seq, key));
    }

    pub fn get(&self, key: &K) -> Option<u64> {
        self.map.get(key).copied()
    }

    pub fn contains_key(&self, key: &K) -> bool {
        self.map.contains_key(key)
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
    }

    /// Drop every entry whose sequence is at or below `watermark`.
    pub fn expire(&mut self, watermark: u64) {
        while let Some(&(seq, key)) = self.order.front() {
            if seq > watermark {
                break;
            }
            self.order.pop_front();
            // A later touch of the same key keeps it.
            if self.map.get(&key) == Some(&seq) {
                self.map.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_in_order_and_keeps_later_touches() {
        let mut m = ExpiringMap::default();
        m.insert(1u32, 5);
        m.insert(2, 6);
        m.insert(1, 9);
        m.expire(6);
        assert_eq!(m.get(&1), Some(9));
        assert!(!m.contains_key(&2));
        m.expire(9);
        assert!(m.is_empty());
    }
}
