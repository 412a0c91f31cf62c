//! Slot allocator: a bitmap of used slots plus reference counts for the few slots that more than
//! one map leaf points at. It is never written to disk: open derives it from the index, so it
//! can never disagree with it (invariant 4).
//!
//! A freed slot is quarantined until the record that freed it is *settled* (a later journal group
//! is durable): until then a crash could bring the old mapping back, and its data must be intact.

use std::collections::HashMap;

#[derive(Debug, Default, Clone)]
pub struct Allocator {
    words: Vec<u64>,
    nslots: u64,
    used: u64,
    hint: u64,
    /// Extra references beyond the first, for shared slots only.
    extra: HashMap<u32, u32>,
    /// (journal sequence that must settle, slot)
    quarantine: Vec<(u64, u32)>,
    /// Slots freed since the last [`Allocator::take_freed`], when tracking is on: the store
    /// punches them out of its file, so the host gets the space back. A slot allocated again
    /// before that leaves the set (it holds new data now).
    freed: Option<std::collections::BTreeSet<u32>>,
}

impl Allocator {
    pub fn new(nslots: u64) -> Allocator {
        Allocator {
            words: vec![0; nslots.div_ceil(64) as usize],
            nslots,
            ..Default::default()
        }
    }

    pub fn nslots(&self) -> u64 {
        self.nslots
    }

    /// Slots in use, including quarantined ones.
    pub fn used(&self) -> u64 {
        self.used
    }

    pub fn free(&self) -> u64 {
        self.nslots - self.used
    }

    pub fn quarantined(&self) -> usize {
        self.quarantine.len()
    }

    pub fn grow(&mut self, nslots: u64) {
        if nslots > self.nslots {
            self.nslots = nslots;
            self.words.resize(nslots.div_ceil(64) as usize, 0);
        }
    }

    pub fn is_used(&self, slot: u32) -> bool {
        let s = slot as u64;
        s < self.nslots && self.words[(s / 64) as usize] & (1 << (s % 64)) != 0
    }

    pub fn refcount(&self, slot: u32) -> u32 {
        if !self.is_used(slot) {
            0
        } else {
            1 + self.extra.get(&slot).copied().unwrap_or(0)
        }
    }

    fn set(&mut self, slot: u32, used: bool) {
        let s = slot as u64;
        let w = &mut self.words[(s / 64) as usize];
        if used {
            *w |= 1 << (s % 64);
        } else {
            *w &= !(1 << (s % 64));
        }
    }

    /// Take a free slot, searching round-robin from the last allocation.
    pub fn alloc(&mut self) -> Option<u32> {
        if self.used >= self.nslots {
            return None;
        }
        let nwords = self.words.len() as u64;
        let start = self.hint / 64;
        for i in 0..=nwords {
            let wi = ((start + i) % nwords) as usize;
            let w = self.words[wi];
            if w != u64::MAX {
                let bit = (!w).trailing_zeros() as u64;
                let slot = wi as u64 * 64 + bit;
                if slot >= self.nslots {
                    continue;
                }
                self.set(slot as u32, true);
                self.used += 1;
                self.hint = slot + 1;
                if let Some(f) = &mut self.freed {
                    f.remove(&(slot as u32));
                }
                return Some(slot as u32);
            }
        }
        None
    }

    /// Mark a slot used while loading; returns false if it already was (a double use).
    pub fn claim(&mut self, slot: u32) -> bool {
        if (slot as u64) >= self.nslots || self.is_used(slot) {
            return false;
        }
        self.set(slot, true);
        self.used += 1;
        true
    }

    pub fn incref(&mut self, slot: u32) {
        debug_assert!(self.is_used(slot));
        *self.extra.entry(slot).or_insert(0) += 1;
    }

    /// Drop one reference; when it was the last, the slot is quarantined until `settle_seq`
    /// settles (or freed now when `settle_seq` is None: replay, ephemeral stores).
    pub fn decref(&mut self, slot: u32, settle_seq: Option<u64>) {
        if let Some(n) = self.extra.get_mut(&slot) {
            *n -= 1;
            if *n == 0 {
                self.extra.remove(&slot);
            }
            return;
        }
        match settle_seq {
            Some(seq) => self.quarantine.push((seq, slot)),
            None => self.release(slot),
        }
    }

    fn release(&mut self, slot: u32) {
        if self.is_used(slot) {
            self.set(slot, false);
            self.used -= 1;
            if let Some(f) = &mut self.freed {
                f.insert(slot);
            }
        }
    }

    /// Drop the last reference of a slot that must keep its bytes until it is reused: it is
    /// free, but not recorded for punching (the previous checkpoint's blocks, which the older
    /// superblock copy still points at: a damaged newer copy falls back to them).
    pub fn free_keeping_bytes(&mut self, slot: u32) {
        let tracked = self.freed.take();
        self.decref(slot, None);
        self.freed = tracked;
    }

    /// Start (or stop) recording freed slots for [`Allocator::take_freed`].
    pub fn track_freed(&mut self, on: bool) {
        self.freed = on.then(Default::default);
    }

    /// The slots freed since the last call and still free, in order. Whoever takes them must
    /// be done with them before the next allocation (the state lock is held throughout).
    pub fn take_freed(&mut self) -> Vec<u32> {
        match &mut self.freed {
            Some(f) => std::mem::take(f).into_iter().collect(),
            None => Vec::new(),
        }
    }

    /// Free every quarantined slot whose record has settled.
    pub fn settle(&mut self, settled_seq: u64) {
        let mut q = std::mem::take(&mut self.quarantine);
        q.retain(|&(seq, slot)| {
            if seq <= settled_seq {
                self.release(slot);
                false
            } else {
                true
            }
        });
        self.quarantine = q;
    }

    pub fn settle_all(&mut self) {
        self.settle(u64::MAX);
    }

    /// Quarantined slots (for check: they are neither free nor referenced, and that is fine).
    pub fn quarantined_slots(&self) -> impl Iterator<Item = u32> + '_ {
        self.quarantine.iter().map(|&(_, s)| s)
    }

    pub fn heap_bytes(&self) -> usize {
        self.words.len() * 8 + self.extra.capacity() * 16 + self.quarantine.capacity() * 16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A freed slot allocated again before the store took the freed list is not in it: its
    /// punch would destroy the new data.
    #[test]
    fn a_slot_reused_before_it_is_punched_leaves_the_freed_list() {
        let mut a = Allocator::new(8);
        a.track_freed(true);
        let s0 = a.alloc().unwrap();
        let s1 = a.alloc().unwrap();
        a.decref(s0, None);
        a.decref(s1, None);
        a.hint = 0;
        assert_eq!(a.alloc(), Some(s0));
        assert_eq!(a.take_freed(), vec![s1]);
        assert!(a.take_freed().is_empty());
        a.track_freed(false);
        a.decref(s0, None);
        assert!(a.take_freed().is_empty());
    }

    #[test]
    fn alloc_refcount_quarantine() {
        let mut a = Allocator::new(130);
        let mut got = vec![];
        while let Some(s) = a.alloc() {
            got.push(s);
        }
        assert_eq!(got.len(), 130);
        assert_eq!(a.free(), 0);
        a.incref(5);
        assert_eq!(a.refcount(5), 2);
        a.decref(5, Some(10));
        assert_eq!(a.refcount(5), 1);
        a.decref(5, Some(10));
        assert!(a.is_used(5), "quarantined, not yet free");
        a.settle(9);
        assert!(a.is_used(5));
        a.settle(10);
        assert!(!a.is_used(5));
        assert_eq!(a.alloc(), Some(5));
        assert!(!a.claim(5));
        a.grow(200);
        assert_eq!(a.free(), 70);
    }
}
