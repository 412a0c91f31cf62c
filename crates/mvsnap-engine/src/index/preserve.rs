//! Per-origin index of preserved (copied-out) blocks.
//!
//! An entry `(chunk, lo..=hi, slot, bits)` says: for every snapshot of this origin whose
//! generation `g` is in `lo..=hi`, block `b` of `chunk` (with `bits & 1<<b`) is in `slot`.
//! For one block the entries' ranges never overlap. Chunks are grouped in leaves of 64, each also
//! holding the per-chunk "done through generation" numbers that make the origin's hot-path test
//! O(1) and allocation-free.

/// The slot of an entry whose blocks read as zeroes (a hole, or zero data, in the origin when
/// it was preserved): it owns no space; reads of it return zeroes. A TRIM of a never-written
/// range, or a write over a sparse origin, costs a snapshot nothing.
pub const ZERO_SLOT: u32 = u32::MAX - 1;

const LEAF_BITS: u32 = 6;
const LEAF_CHUNKS: usize = 1 << LEAF_BITS;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PEntry {
    pub lo: u32,
    pub hi: u32,
    pub slot: u32,
    pub bits: u64,
}

/// Flat (24 bytes): nesting a `PEntry` would pad it to 32.
#[derive(Debug, Clone, Copy)]
struct LeafEntry {
    bits: u64,
    lo: u32,
    hi: u32,
    slot: u32,
    chunk_low: u8,
}

impl LeafEntry {
    fn e(&self) -> PEntry {
        PEntry {
            lo: self.lo,
            hi: self.hi,
            slot: self.slot,
            bits: self.bits,
        }
    }
}

#[derive(Debug, Clone)]
struct Leaf {
    /// Every block of the chunk is preserved (or needs no preserve) for generations up to this.
    done_through: [u32; LEAF_CHUNKS],
    /// Sorted by (chunk_low, hi).
    entries: Vec<LeafEntry>,
}

#[derive(Debug, Clone, Default)]
pub struct PreserveIndex {
    leaves: Vec<Option<Box<Leaf>>>,
    count: u64,
}

impl PreserveIndex {
    pub fn new(chunks: u64) -> PreserveIndex {
        let n = chunks.div_ceil(LEAF_CHUNKS as u64) as usize;
        PreserveIndex {
            leaves: (0..n).map(|_| None).collect(),
            count: 0,
        }
    }

    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn split(chunk: u64) -> (usize, usize) {
        (
            (chunk >> LEAF_BITS) as usize,
            (chunk as usize) & (LEAF_CHUNKS - 1),
        )
    }

    fn leaf(&self, chunk: u64) -> Option<&Leaf> {
        self.leaves.get(Self::split(chunk).0)?.as_deref()
    }

    fn leaf_mut(&mut self, chunk: u64) -> &mut Leaf {
        let (l, _) = Self::split(chunk);
        self.leaves[l].get_or_insert_with(|| {
            Box::new(Leaf {
                done_through: [0; LEAF_CHUNKS],
                entries: Vec::new(),
            })
        })
    }

    /// The hot-path test: every block of `chunk` is safe to overwrite up to generation `g`.
    #[inline]
    pub fn done_through(&self, chunk: u64) -> u32 {
        match self.leaf(chunk) {
            Some(l) => l.done_through[Self::split(chunk).1],
            None => 0,
        }
    }

    pub fn set_done_through(&mut self, chunk: u64, gen: u32) {
        let low = Self::split(chunk).1;
        self.leaf_mut(chunk).done_through[low] = gen;
    }

    fn span(leaf: &Leaf, low: usize) -> std::ops::Range<usize> {
        let start = leaf
            .entries
            .partition_point(|x| (x.chunk_low as usize) < low);
        let end = leaf
            .entries
            .partition_point(|x| (x.chunk_low as usize) <= low);
        start..end
    }

    /// The entries of one chunk, ordered by `hi`.
    pub fn entries(&self, chunk: u64) -> impl Iterator<Item = PEntry> + '_ {
        let (leaf, range) = match self.leaf(chunk) {
            Some(l) => {
                let r = Self::span(l, Self::split(chunk).1);
                (Some(l), r)
            }
            None => (None, 0..0),
        };
        range.map(move |i| leaf.unwrap().entries[i].e())
    }

    /// The slot holding `block` of `chunk` for generation `gen`, if it was preserved.
    pub fn lookup(&self, chunk: u64, gen: u32, block: u32) -> Option<u32> {
        let bit = 1u64 << block;
        // Entries are ordered by hi; for one block their ranges are disjoint, so the first entry
        // with hi >= gen that holds the block is the only candidate.
        for e in self.entries(chunk) {
            if e.hi >= gen && e.bits & bit != 0 {
                return (e.lo <= gen).then_some(e.slot);
            }
        }
        None
    }

    /// Highest generation through which `block` of `chunk` is preserved (0: never).
    pub fn preserved_through(&self, chunk: u64, block: u32) -> u32 {
        let bit = 1u64 << block;
        self.entries(chunk)
            .filter(|e| e.bits & bit != 0)
            .map(|e| e.hi)
            .max()
            .unwrap_or(0)
    }

    /// The entry of `chunk` with exactly this range, if any.
    pub fn find(&self, chunk: u64, lo: u32, hi: u32) -> Option<PEntry> {
        self.entries(chunk).find(|e| e.lo == lo && e.hi == hi)
    }

    /// Add `bits` to the entry `(chunk, lo, hi)` (which must use `slot`, or be a zero entry that
    /// `slot` now replaces: its blocks were written there as zeroes), creating it if needed.
    pub fn add(&mut self, chunk: u64, lo: u32, hi: u32, slot: u32, bits: u64) {
        let low = Self::split(chunk).1;
        let leaf = self.leaf_mut(chunk);
        let span = Self::span(leaf, low);
        for i in span.clone() {
            let le = &mut leaf.entries[i];
            if le.lo == lo && le.hi == hi {
                debug_assert!(le.slot == slot || le.slot == ZERO_SLOT);
                le.slot = slot;
                le.bits |= bits;
                return;
            }
        }
        let pos = span.start + leaf.entries[span].partition_point(|x| x.hi <= hi);
        leaf.entries.insert(
            pos,
            LeafEntry {
                bits,
                lo,
                hi,
                slot,
                chunk_low: low as u8,
            },
        );
        self.count += 1;
    }

    /// Remove every entry for which `dead` says so, calling `on_free` with its chunk and slot.
    pub fn retain(
        &mut self,
        mut keep: impl FnMut(u64, &PEntry) -> bool,
        mut on_free: impl FnMut(u64, u32),
    ) {
        for (li, leaf) in self.leaves.iter_mut().enumerate() {
            let Some(leaf) = leaf else { continue };
            let before = leaf.entries.len();
            leaf.entries.retain(|le| {
                let chunk = ((li as u64) << LEAF_BITS) | le.chunk_low as u64;
                if keep(chunk, &le.e()) {
                    true
                } else {
                    on_free(chunk, le.slot);
                    false
                }
            });
            self.count -= (before - leaf.entries.len()) as u64;
        }
    }

    pub fn for_each(&self, mut f: impl FnMut(u64, &PEntry)) {
        for (li, leaf) in self.leaves.iter().enumerate() {
            let Some(leaf) = leaf else { continue };
            for le in &leaf.entries {
                f(((li as u64) << LEAF_BITS) | le.chunk_low as u64, &le.e());
            }
        }
    }

    /// Bytes of RAM this index holds, for the "bytes per mapping" measurement.
    pub fn heap_bytes(&self) -> usize {
        self.leaves.len() * 8
            + self
                .leaves
                .iter()
                .flatten()
                .map(|l| {
                    std::mem::size_of::<Leaf>()
                        + l.entries.capacity() * std::mem::size_of::<LeafEntry>()
                })
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_entry_is_compact() {
        assert_eq!(std::mem::size_of::<LeafEntry>(), 24);
    }

    #[test]
    fn lookup_by_generation_and_block() {
        let mut p = PreserveIndex::new(1000);
        // Block 0 preserved for gens 1..=1, block 1 for 1..=2, block 0 again for 2..=3.
        p.add(70, 1, 1, 10, 0b01);
        p.add(70, 1, 2, 11, 0b10);
        p.add(70, 2, 3, 12, 0b01);
        assert_eq!(p.lookup(70, 1, 0), Some(10));
        assert_eq!(p.lookup(70, 2, 0), Some(12));
        assert_eq!(p.lookup(70, 3, 0), Some(12));
        assert_eq!(p.lookup(70, 4, 0), None);
        assert_eq!(p.lookup(70, 2, 1), Some(11));
        assert_eq!(p.lookup(70, 3, 1), None);
        assert_eq!(p.lookup(71, 1, 0), None);
        assert_eq!(p.preserved_through(70, 0), 3);
        assert_eq!(p.preserved_through(70, 1), 2);
        assert_eq!(p.preserved_through(70, 2), 0);
        p.add(70, 1, 1, 10, 0b100);
        assert_eq!(p.lookup(70, 1, 2), Some(10));
        assert_eq!(p.len(), 3);
        let mut freed = vec![];
        p.retain(|_, e| e.hi >= 2, |c, s| freed.push((c, s)));
        assert_eq!(freed, vec![(70, 10)]);
        assert_eq!(p.len(), 2);
        assert_eq!(p.done_through(999), 0);
        p.set_done_through(999, 5);
        assert_eq!(p.done_through(999), 5);
    }
}
