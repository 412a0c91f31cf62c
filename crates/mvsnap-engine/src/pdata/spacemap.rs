//! The space map: one bit per 4 KiB block of the store (set: in use), in bitmap blocks of
//! 32,512 bits (127 MiB of store each).
//!
//! Every block has one owner in v2 (generation ranges and snapshot keys share data without
//! reference counts), so a bit is enough. A bitmap block is never written in place: each has
//! two fixed slots, and a commit writes a changed bitmap to the slot the committed version does
//! not use. Which slot is current, and its free count, are the bitmap's selector, kept by the
//! caller in the tree (key space `M`) so that the root flip switches tree and space map at
//! once. A fixed region with two slots per bitmap avoids the circularity of a space map that
//! allocates its own blocks from itself.
//!
//! A block freed in a transaction is not handed out again before that transaction's commit is
//! durable ([`SpaceMap::frozen_durable`]): until then a crash returns to a version that uses it.
//! In RAM: the selectors (8 bytes per bitmap, 64 KiB for a 1 TiB store), the bitmaps this
//! transaction changed (with their committed version) and a bounded cache of clean ones.
//!
//! ```text
//! bitmap block:  0 magic u32 "MVSM"  4 crc32c u32 of 8..4096, salted with the block number
//!                8 index u32  12 free u32  16 txn u64  24 block u64  32 bits (4064 bytes)
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::btree::BlockAlloc;
use super::{BlockNo, NodeIo, PResult, PdataError, NODE_SIZE};

const MAGIC: u32 = 0x4d53_564d; // "MVSM"
const SALT_BITMAP: u32 = 0x534d_0005;
const HEADER: usize = 32;
/// Blocks one bitmap block covers.
pub const BITS_PER_BITMAP: u64 = ((NODE_SIZE - HEADER) * 8) as u64;
/// Clean bitmaps kept in RAM.
const CLEAN_CACHE: usize = 64;

type Bits = Vec<u8>;

fn salt(block: BlockNo) -> u32 {
    SALT_BITMAP ^ block as u32 ^ (block >> 32) as u32
}

fn get_bit(bits: &[u8], i: usize) -> bool {
    bits[i / 8] & (1 << (i % 8)) != 0
}

fn set_bit(bits: &mut [u8], i: usize, on: bool) {
    if on {
        bits[i / 8] |= 1 << (i % 8);
    } else {
        bits[i / 8] &= !(1 << (i % 8));
    }
}

/// Which slot holds bitmap `index` now, and how many blocks it has free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selector {
    pub slot: u8,
    pub free: u32,
}

impl Selector {
    pub fn encode(&self) -> [u8; 16] {
        let mut v = [0u8; 16];
        v[0] = self.slot;
        v[4..8].copy_from_slice(&self.free.to_le_bytes());
        v
    }

    pub fn decode(v: &[u8; 16]) -> Selector {
        Selector {
            slot: v[0] & 1,
            free: u32::from_le_bytes(v[4..8].try_into().unwrap()),
        }
    }
}

/// What [`SpaceMap::reconcile`] changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Blocks marked used that nothing uses (given back).
    pub leaked: u64,
    /// Blocks in use but marked free (a block used twice waiting to happen).
    pub lost: u64,
    /// Bitmaps that could not be read, written anew.
    pub rewritten: u64,
}

/// A bitmap the open transaction changed.
struct Dirty {
    /// The version the transaction started from: the durable one, or the one being written.
    base: Arc<Bits>,
    working: Bits,
    free: u32,
    /// Freed, but not to be handed out before the commit is durable (see [`SpaceMap::release`]).
    held: Option<Bits>,
}

/// A bitmap of the version being written (frozen, not durable yet).
struct Frozen {
    bits: Arc<Bits>,
    free: u32,
    /// Blocks not to hand out until that version is durable: those the durable version uses
    /// (a crash goes back to it) and those its transaction held.
    busy: Bits,
}

/// One bit per block in three versions: the durable one (`selectors`, bitmaps on disk), the
/// one a commit is writing (`frozen`), and the open transaction's (`dirty`). A block is handed
/// out only when it is free in all three.
pub struct SpaceMap {
    /// First block of the two-slot region (bitmap i: slots region + 2i and region + 2i + 1).
    region: BlockNo,
    /// Blocks the map covers (the whole store).
    blocks: u64,
    /// The durable version's selectors.
    selectors: Vec<Selector>,
    frozen: BTreeMap<u32, Frozen>,
    /// Blocks free in the frozen version but busy until it is durable.
    frozen_busy: u64,
    dirty: BTreeMap<u32, Dirty>,
    clean: HashMap<u32, Arc<Bits>>,
    /// Where the next search for a free block starts: allocations stay near each other.
    cursor: BlockNo,
    /// No block at or past this is handed out (a store file not grown that far yet).
    limit: u64,
    /// Blocks freed in this transaction that may not be handed out before it is durable.
    released: u64,
    /// Free blocks in the working version: the sum of every bitmap's free count, kept as they
    /// change (an allocation must not walk one selector per 127 MiB of store).
    total_free: u64,
    /// One bit per bitmap: a whole search of it found nothing to hand out, and nothing that
    /// could change that has happened since. Its free count alone cannot tell: blocks freed
    /// but busy until a commit is durable count as free. Without this, every allocation
    /// searched each such bitmap again (measured: 37 ms per allocation over 128 of them, under
    /// the state lock).
    exhausted: Vec<u64>,
}

impl SpaceMap {
    /// Bitmap blocks needed for a store of `blocks` blocks, and the region's size (2 slots each).
    pub fn bitmaps_for(blocks: u64) -> u64 {
        blocks.div_ceil(BITS_PER_BITMAP)
    }

    pub fn region_len(blocks: u64) -> u64 {
        2 * Self::bitmaps_for(blocks)
    }

    fn empty(region: BlockNo, blocks: u64, selectors: Vec<Selector>) -> SpaceMap {
        SpaceMap {
            region,
            blocks,
            total_free: selectors.iter().map(|s| s.free as u64).sum(),
            selectors,
            frozen: BTreeMap::new(),
            frozen_busy: 0,
            dirty: BTreeMap::new(),
            clean: HashMap::new(),
            cursor: 0,
            limit: blocks,
            released: 0,
            exhausted: vec![0; (Self::bitmaps_for(blocks) as usize).div_ceil(64)],
        }
    }

    /// A new map in which the blocks below `reserved` (headers, the map's own region, the
    /// journal) are in use and all others free. Nothing is written until the first commit;
    /// every bitmap is dirty, so the first commit writes them all.
    pub fn format(region: BlockNo, blocks: u64, reserved: BlockNo) -> SpaceMap {
        let n = Self::bitmaps_for(blocks) as usize;
        let mut sm = Self::empty(region, blocks, vec![Selector { slot: 1, free: 0 }; n]);
        for i in 0..n {
            let mut bits = vec![0u8; NODE_SIZE - HEADER];
            // Bits past the end of the store are "used": never handed out.
            let first = i as u64 * BITS_PER_BITMAP;
            for b in blocks.max(first)..first + BITS_PER_BITMAP {
                set_bit(&mut bits, (b - first) as usize, true);
            }
            for b in first..reserved.min(first + BITS_PER_BITMAP) {
                set_bit(&mut bits, (b - first) as usize, true);
            }
            let free = count_free(&bits);
            sm.total_free += free as u64;
            // No version is durable yet: what is free now may be used at once.
            sm.dirty.insert(
                i as u32,
                Dirty {
                    base: Arc::new(bits.clone()),
                    working: bits,
                    free,
                    held: None,
                },
            );
        }
        sm
    }

    /// The map as a committed version's selectors describe it.
    pub fn open(region: BlockNo, blocks: u64, selectors: Vec<Selector>) -> PResult<SpaceMap> {
        if selectors.len() as u64 != Self::bitmaps_for(blocks) {
            return Err(PdataError::Corrupt {
                block: region,
                what: format!(
                    "{} space map selectors for {} bitmaps",
                    selectors.len(),
                    Self::bitmaps_for(blocks)
                ),
            });
        }
        Ok(Self::empty(region, blocks, selectors))
    }

    pub fn set_limit(&mut self, limit: u64) {
        self.limit = limit.min(self.blocks);
        self.forget_exhausted();
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Blocks that may be handed out now: free in every version and below the limit.
    pub fn usable_free_blocks(&self) -> u64 {
        self.free_blocks()
            .saturating_sub(self.blocks - self.limit)
            .saturating_sub(self.released)
            .saturating_sub(self.frozen_busy)
    }

    /// The first bit of `from..to` in bitmap `i` that may be handed out: free in the base, the
    /// working version and the frozen one's busy set, and not held. A word at a time: a bit at
    /// a time, a bitmap whose free blocks are all busy cost 2 map lookups per bit.
    fn first_takeable(&self, base: &Bits, i: u32, from: usize, to: usize) -> Option<usize> {
        let d = self.dirty.get(&i);
        let working = d.map(|d| &d.working[..]);
        let held = d.and_then(|d| d.held.as_deref());
        let busy = self.frozen.get(&i).map(|f| &f.busy[..]);
        let word = |bits: &[u8], w: usize| {
            u64::from_le_bytes(bits[8 * w..8 * w + 8].try_into().expect("8 bytes"))
        };
        let mut w = from / 64;
        while w * 64 < to {
            let mut taken = word(base, w);
            for bits in [working, held, busy].into_iter().flatten() {
                taken |= word(bits, w);
            }
            let mut free = !taken;
            if w == from / 64 {
                free &= !0u64 << (from % 64);
            }
            if free != 0 {
                let bit = w * 64 + free.trailing_zeros() as usize;
                return (bit < to).then_some(bit);
            }
            w += 1;
        }
        None
    }

    fn is_exhausted(&self, i: u32) -> bool {
        self.exhausted[i as usize / 64] & (1 << (i % 64)) != 0
    }

    fn set_exhausted(&mut self, i: u32, on: bool) {
        let (w, m) = (i as usize / 64, 1u64 << (i % 64));
        if on {
            self.exhausted[w] |= m;
        } else {
            self.exhausted[w] &= !m;
        }
    }

    /// Something may have made blocks of any bitmap takeable: search them all again.
    fn forget_exhausted(&mut self) {
        self.exhausted.fill(0);
    }

    /// Take `block`, which must be free in every version and below the limit (replay takes
    /// the blocks the live path had allocated).
    pub fn claim(&mut self, io: &dyn NodeIo, block: BlockNo) -> PResult<bool> {
        if block >= self.limit {
            return Ok(false);
        }
        let (i, bit) = split(block);
        let base = self.base_bits(io, i)?;
        if self.first_takeable(&base, i, bit, bit + 1).is_none() {
            return Ok(false);
        }
        let d = self.make_dirty(io, i)?;
        set_bit(&mut d.working, bit, true);
        d.free -= 1;
        self.total_free -= 1;
        Ok(true)
    }

    /// Free blocks in the working version (blocks freed in this transaction count as free).
    pub fn free_blocks(&self) -> u64 {
        debug_assert_eq!(
            self.total_free,
            (0..self.selectors.len() as u32)
                .map(|i| self.free_of(i) as u64)
                .sum::<u64>()
        );
        self.total_free
    }

    fn free_of(&self, i: u32) -> u32 {
        match (self.dirty.get(&i), self.frozen.get(&i)) {
            (Some(d), _) => d.free,
            (None, Some(f)) => f.free,
            (None, None) => self.selectors[i as usize].free,
        }
    }

    fn slot_block(&self, i: u32, slot: u8) -> BlockNo {
        self.region + 2 * i as u64 + slot as u64
    }

    /// Bitmap `i` as the open transaction started from it: the frozen version's, or the
    /// durable one through the clean cache.
    fn base_bits(&mut self, io: &dyn NodeIo, i: u32) -> PResult<Arc<Bits>> {
        if let Some(d) = self.dirty.get(&i) {
            return Ok(d.base.clone());
        }
        if let Some(f) = self.frozen.get(&i) {
            return Ok(f.bits.clone());
        }
        self.durable_bits(io, i)
    }

    /// Bitmap `i` of the durable version.
    fn durable_bits(&mut self, io: &dyn NodeIo, i: u32) -> PResult<Arc<Bits>> {
        if let Some(b) = self.clean.get(&i) {
            return Ok(b.clone());
        }
        let block = self.slot_block(i, self.selectors[i as usize].slot);
        let mut buf = vec![0u8; NODE_SIZE];
        io.read_block(block, &mut buf)
            .map_err(|source| PdataError::Io { block, source })?;
        let bits = Arc::new(decode_bitmap(
            block,
            i,
            &buf,
            self.selectors[i as usize].free,
        )?);
        if self.clean.len() >= CLEAN_CACHE {
            let victim = *self.clean.keys().next().expect("not empty");
            self.clean.remove(&victim);
        }
        self.clean.insert(i, bits.clone());
        Ok(bits)
    }

    fn make_dirty(&mut self, io: &dyn NodeIo, i: u32) -> PResult<&mut Dirty> {
        if !self.dirty.contains_key(&i) {
            let base = self.base_bits(io, i)?;
            let free = self.free_of(i);
            self.dirty.insert(
                i,
                Dirty {
                    working: (*base).clone(),
                    base,
                    free,
                    held: None,
                },
            );
        }
        Ok(self.dirty.get_mut(&i).expect("inserted"))
    }

    /// Whether `block` is in use in the working version.
    pub fn is_used(&mut self, io: &dyn NodeIo, block: BlockNo) -> PResult<bool> {
        let (i, bit) = split(block);
        Ok(match self.dirty.get(&i) {
            Some(d) => get_bit(&d.working, bit),
            None => get_bit(&self.base_bits(io, i)?, bit),
        })
    }

    /// A block free in every version, near the cursor.
    pub fn alloc(&mut self, io: &dyn NodeIo) -> PResult<Option<BlockNo>> {
        let n = self.selectors.len() as u32;
        let start = split(self.cursor).0;
        for step in 0..=n {
            let i = (start + step) % n.max(1);
            if self.free_of(i) == 0 || self.is_exhausted(i) {
                continue;
            }
            let from = if step == 0 { split(self.cursor).1 } else { 0 };
            let first = i as u64 * BITS_PER_BITMAP;
            if first >= self.limit {
                continue;
            }
            let to = (self.limit - first).min(BITS_PER_BITMAP) as usize;
            let base = self.base_bits(io, i)?;
            let Some(bit) = self.first_takeable(&base, i, from, to) else {
                if from == 0 {
                    self.set_exhausted(i, true);
                }
                continue;
            };
            let d = self.make_dirty(io, i)?;
            set_bit(&mut d.working, bit, true);
            d.free -= 1;
            self.total_free -= 1;
            let block = i as u64 * BITS_PER_BITMAP + bit as u64;
            self.cursor = block + 1;
            return Ok(Some(block));
        }
        Ok(None)
    }

    /// Free a block in the working version. One the base version uses stays taken until
    /// the commit is durable; one allocated in this transaction is free again at once.
    pub fn free(&mut self, io: &dyn NodeIo, block: BlockNo) -> PResult<()> {
        let (i, bit) = split(block);
        if block >= self.blocks {
            return Err(PdataError::Corrupt {
                block,
                what: format!("freed, but the store has {} blocks", self.blocks),
            });
        }
        let d = self.make_dirty(io, i)?;
        if !get_bit(&d.working, bit) {
            return Err(PdataError::Corrupt {
                block,
                what: "freed twice".into(),
            });
        }
        set_bit(&mut d.working, bit, false);
        d.free += 1;
        let in_base = get_bit(&d.base, bit);
        self.total_free += 1;
        self.set_exhausted(i, false);
        if in_base {
            self.released += 1;
        }
        Ok(())
    }

    /// Free a block in the working version and hold it until the commit is durable, even if
    /// the base version does not use it: a journal record may still name it, and a crash
    /// before the commit replays that record.
    pub fn release(&mut self, io: &dyn NodeIo, block: BlockNo) -> PResult<()> {
        self.free(io, block)?;
        let (i, bit) = split(block);
        let d = self.dirty.get_mut(&i).expect("made dirty by free");
        if !get_bit(&d.base, bit) {
            let held = d.held.get_or_insert_with(|| vec![0u8; NODE_SIZE - HEADER]);
            set_bit(held, bit, true);
            self.released += 1;
        }
        Ok(())
    }

    /// The selectors this transaction's commit will write: (bitmap index, its new selector),
    /// with the blocks `aside` counted free (see [`SpaceMap::freeze`]). The caller records
    /// them in the tree before the tree's commit. Only with no commit in flight.
    pub fn changed_selectors(&self, aside: &[BlockNo]) -> Vec<(u32, Selector)> {
        debug_assert!(self.frozen.is_empty());
        self.dirty
            .iter()
            .map(|(&i, d)| {
                let set_aside = aside.iter().filter(|&&b| split(b).0 == i).count() as u32;
                (
                    i,
                    Selector {
                        slot: 1 - self.selectors[i as usize].slot,
                        free: d.free + set_aside,
                    },
                )
            })
            .collect()
    }

    /// Close the transaction: its bitmaps become the frozen version a commit writes (they are
    /// returned encoded for their other slots), and a new transaction starts from them. The
    /// blocks `aside` (used in the working version, but by nothing the frozen version points
    /// at: copies whose records come later) are free in the frozen version and stay used in
    /// the new one. Only with no commit in flight.
    pub fn freeze(&mut self, aside: &[BlockNo], txn: u64) -> Vec<(BlockNo, Vec<u8>)> {
        debug_assert!(self.frozen.is_empty());
        let mut out = Vec::with_capacity(self.dirty.len());
        for (i, d) in std::mem::take(&mut self.dirty) {
            let mut bits = d.working;
            let mut free = d.free;
            let mine: Vec<usize> = aside
                .iter()
                .filter(|&&b| split(b).0 == i)
                .map(|&b| split(b).1)
                .collect();
            for &bit in &mine {
                debug_assert!(get_bit(&bits, bit) && !get_bit(&d.base, bit));
                set_bit(&mut bits, bit, false);
                free += 1;
            }
            let block = self.slot_block(i, 1 - self.selectors[i as usize].slot);
            out.push((block, encode_bitmap(block, i, &bits, free, txn)));
            let mut busy = (*d.base).clone();
            if let Some(h) = &d.held {
                for (b, h) in busy.iter_mut().zip(h) {
                    *b |= h;
                }
            }
            let bits = Arc::new(bits);
            if !mine.is_empty() {
                // The new transaction still uses them.
                let mut working = (*bits).clone();
                for &bit in &mine {
                    set_bit(&mut working, bit, true);
                }
                self.dirty.insert(
                    i,
                    Dirty {
                        base: bits.clone(),
                        working,
                        free: free - mine.len() as u32,
                        held: None,
                    },
                );
            }
            self.frozen.insert(i, Frozen { bits, free, busy });
        }
        self.frozen_busy = std::mem::take(&mut self.released);
        out
    }

    /// The frozen version's root flip is durable: it is the durable version now, and what its
    /// transaction freed may be handed out.
    pub fn frozen_durable(&mut self) {
        for (i, f) in std::mem::take(&mut self.frozen) {
            let s = &mut self.selectors[i as usize];
            s.slot = 1 - s.slot;
            s.free = f.free;
            if self.clean.len() < CLEAN_CACHE || self.clean.contains_key(&i) {
                self.clean.insert(i, f.bits);
            }
        }
        self.frozen_busy = 0;
        // What the frozen version freed may be handed out now.
        self.forget_exhausted();
    }

    /// The durable selector of bitmap `i` (a repair writes every selector into a rebuilt tree).
    pub fn selector(&self, i: u32) -> Selector {
        self.selectors[i as usize]
    }

    /// Make the working version mark exactly the blocks of `want` (sorted) as used, and every
    /// other block of the store free: `check --repair`'s rebuild from what the tree points at.
    /// A bitmap whose durable version cannot be read is rewritten whole. Until the repaired
    /// version is durable it counts as using `want` when `want` is also exactly what the
    /// durable version uses (`durable_is_want`: nothing changed since the last commit), else
    /// every block (nothing is handed out on a guess). Only with no commit in flight.
    pub fn reconcile(
        &mut self,
        io: &dyn NodeIo,
        want: &[BlockNo],
        durable_is_want: bool,
    ) -> PResult<Reconciled> {
        debug_assert!(self.frozen.is_empty());
        self.forget_exhausted();
        let mut r = Reconciled::default();
        for i in 0..self.selectors.len() as u32 {
            let first = i as u64 * BITS_PER_BITMAP;
            let mut wanted = vec![0u8; NODE_SIZE - HEADER];
            for b in self.blocks.max(first)..first + BITS_PER_BITMAP {
                set_bit(&mut wanted, (b - first) as usize, true);
            }
            let from = want.partition_point(|&b| b < first);
            let to = want.partition_point(|&b| b < first + BITS_PER_BITMAP);
            for &b in &want[from..to] {
                set_bit(&mut wanted, (b - first) as usize, true);
            }
            let was_dirty = self.dirty.contains_key(&i);
            let (base, current, held) = match self.dirty.remove(&i) {
                Some(d) => (d.base, Some(d.working), d.held),
                None => match self.base_bits(io, i) {
                    Ok(b) => (b.clone(), Some((*b).clone()), None),
                    Err(_) => {
                        r.rewritten += 1;
                        let base = if durable_is_want {
                            wanted.clone()
                        } else {
                            vec![0xff; NODE_SIZE - HEADER]
                        };
                        (Arc::new(base), None, None)
                    }
                },
            };
            if let Some(cur) = &current {
                for (c, w) in cur.iter().zip(&wanted) {
                    r.leaked += (c & !w).count_ones() as u64;
                    r.lost += (w & !c).count_ones() as u64;
                }
                if *cur == wanted && !was_dirty {
                    continue;
                }
            }
            let free = count_free(&wanted);
            self.dirty.insert(
                i,
                Dirty {
                    base,
                    working: wanted,
                    free,
                    held,
                },
            );
        }
        self.total_free = (0..self.selectors.len() as u32)
            .map(|i| self.free_of(i) as u64)
            .sum();
        self.released = self
            .dirty
            .values()
            .map(|d| {
                let mut n = 0u64;
                for (k, w) in d.working.iter().enumerate() {
                    let busy = d.base[k] | d.held.as_ref().map_or(0, |h| h[k]);
                    n += (busy & !w).count_ones() as u64;
                }
                n
            })
            .sum();
        Ok(r)
    }

    /// Whether the open transaction changed no bitmap.
    pub fn unchanged(&self) -> bool {
        self.dirty.is_empty()
    }

    /// A commit in flight (frozen, not durable yet).
    pub fn has_frozen(&self) -> bool {
        !self.frozen.is_empty()
    }

    /// Every block in use in the working version (the open transaction's), in order.
    pub fn working_used_blocks(&mut self, io: &dyn NodeIo) -> PResult<Vec<BlockNo>> {
        let mut out = Vec::new();
        for i in 0..self.selectors.len() as u32 {
            let bits = match self.dirty.get(&i) {
                Some(d) => Arc::new(d.working.clone()),
                None => self.base_bits(io, i)?,
            };
            let first = i as u64 * BITS_PER_BITMAP;
            for b in 0..BITS_PER_BITMAP.min(self.blocks - first) {
                if get_bit(&bits, b as usize) {
                    out.push(first + b);
                }
            }
        }
        Ok(out)
    }

    /// Every block in use in the durable version, in order (for `check`).
    pub fn used_blocks(&mut self, io: &dyn NodeIo) -> PResult<Vec<BlockNo>> {
        let mut out = Vec::new();
        for i in 0..self.selectors.len() as u32 {
            let bits = self.durable_bits(io, i)?;
            let first = i as u64 * BITS_PER_BITMAP;
            for b in 0..BITS_PER_BITMAP.min(self.blocks - first) {
                if get_bit(&bits, b as usize) {
                    out.push(first + b);
                }
            }
        }
        Ok(out)
    }
}

fn split(block: BlockNo) -> (u32, usize) {
    (
        (block / BITS_PER_BITMAP) as u32,
        (block % BITS_PER_BITMAP) as usize,
    )
}

fn count_free(bits: &[u8]) -> u32 {
    bits.iter().map(|b| b.count_zeros()).sum()
}

fn encode_bitmap(block: BlockNo, index: u32, bits: &[u8], free: u32, txn: u64) -> Vec<u8> {
    let mut b = vec![0u8; NODE_SIZE];
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[8..12].copy_from_slice(&index.to_le_bytes());
    b[12..16].copy_from_slice(&free.to_le_bytes());
    b[16..24].copy_from_slice(&txn.to_le_bytes());
    b[24..32].copy_from_slice(&block.to_le_bytes());
    b[HEADER..].copy_from_slice(bits);
    let c = crate::format::crc(salt(block), &b[8..]);
    b[4..8].copy_from_slice(&c.to_le_bytes());
    b
}

fn decode_bitmap(block: BlockNo, index: u32, b: &[u8], free: u32) -> PResult<Bits> {
    let bad = |what: String| PdataError::Corrupt { block, what };
    let word = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    if word(0) != MAGIC {
        return Err(bad("not a space map block (no magic)".into()));
    }
    if crate::format::crc(salt(block), &b[8..]) != word(4) {
        return Err(bad("checksum mismatch".into()));
    }
    if word(8) != index || u64::from_le_bytes(b[24..32].try_into().unwrap()) != block {
        return Err(bad(format!("holds bitmap {}, expected {index}", word(8))));
    }
    let bits = b[HEADER..].to_vec();
    if word(12) != free || count_free(&bits) != free {
        return Err(bad(format!(
            "free count {} (bits say {}), its selector says {free}",
            word(12),
            count_free(&bits)
        )));
    }
    Ok(bits)
}

/// The space map as a tree transaction's allocator: node blocks come from it, and nodes
/// dropped in the same transaction go straight back.
pub struct TxnAlloc<'a> {
    pub map: &'a mut SpaceMap,
    pub io: &'a dyn NodeIo,
    /// The first error (an I/O error reading a bitmap): the transaction fails with it.
    pub error: Option<PdataError>,
    /// Nodes allocated minus nodes dropped: the tree's size changes by this much.
    pub nodes: i64,
}

impl BlockAlloc for TxnAlloc<'_> {
    fn alloc(&mut self) -> Option<BlockNo> {
        match self.map.alloc(self.io) {
            Ok(b) => {
                self.nodes += b.is_some() as i64;
                b
            }
            Err(e) => {
                self.error.get_or_insert(e);
                None
            }
        }
    }
    fn free_now(&mut self, block: BlockNo) {
        self.nodes -= 1;
        if let Err(e) = self.map.free(self.io, block) {
            self.error.get_or_insert(e);
        }
    }
    /// Free in the working version; the base one keeps it until the commit is durable.
    fn release(&mut self, block: BlockNo) {
        self.free_now(block);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    #[derive(Default)]
    struct Mem(Mutex<HashMap<BlockNo, Vec<u8>>>);
    impl NodeIo for Mem {
        fn read_block(&self, block: BlockNo, buf: &mut [u8]) -> std::io::Result<()> {
            buf.copy_from_slice(
                self.0
                    .lock()
                    .get(&block)
                    .ok_or_else(|| std::io::Error::other("unwritten"))?,
            );
            Ok(())
        }
        fn write_block(&self, block: BlockNo, buf: &[u8]) -> std::io::Result<()> {
            self.0.lock().insert(block, buf.to_vec());
            Ok(())
        }
    }

    fn commit(sm: &mut SpaceMap, io: &Mem, txn: u64) -> Vec<(u32, Selector)> {
        let ch = sm.changed_selectors(&[]);
        for (b, bytes) in sm.freeze(&[], txn) {
            io.write_block(b, &bytes).unwrap();
        }
        sm.frozen_durable();
        ch
    }

    /// What the store uses: a limit below the map's size (a file not grown yet), blocks
    /// released and held until the commit even when this transaction allocated them (a
    /// journal record names them), claims of given blocks for replay, the usable count.
    #[test]
    fn limit_release_and_claim() {
        let io = Mem::default();
        let blocks = BITS_PER_BITMAP + 500;
        let mut sm = SpaceMap::format(2, blocks, 8);
        commit(&mut sm, &io, 1);
        sm.set_limit(40);
        assert_eq!(sm.limit(), 40);
        assert_eq!(sm.usable_free_blocks(), 32, "blocks 8..40");
        let got: Vec<BlockNo> = std::iter::from_fn(|| sm.alloc(&io).unwrap()).collect();
        assert_eq!(
            got,
            (8..40).collect::<Vec<_>>(),
            "nothing at or past the limit"
        );
        assert_eq!(sm.usable_free_blocks(), 0);
        assert!(!sm.claim(&io, 40).unwrap(), "past the limit");
        assert!(!sm.claim(&io, 9).unwrap(), "in use");
        // Released in the transaction that allocated it: held, not handed out, not claimed.
        sm.release(&io, 9).unwrap();
        assert!(!sm.is_used(&io, 9).unwrap());
        assert_eq!(sm.usable_free_blocks(), 0);
        sm.cursor = 0;
        assert_eq!(
            sm.alloc(&io).unwrap(),
            None,
            "a held block is not handed out"
        );
        assert!(!sm.claim(&io, 9).unwrap(), "a held block is not claimed");
        commit(&mut sm, &io, 2);
        assert_eq!(
            sm.usable_free_blocks(),
            1,
            "free once the commit is durable"
        );
        sm.cursor = 0;
        assert_eq!(sm.alloc(&io).unwrap(), Some(9));
        commit(&mut sm, &io, 3);
        assert_eq!(sm.usable_free_blocks(), 0);
        // A committed block released: free in the next version only.
        sm.release(&io, 20).unwrap();
        assert_eq!(sm.usable_free_blocks(), 0);
        sm.cursor = 0;
        assert_eq!(sm.alloc(&io).unwrap(), None);
        assert!(!sm.claim(&io, 20).unwrap());
        commit(&mut sm, &io, 4);
        assert_eq!(sm.usable_free_blocks(), 1);
        // A claim takes exactly the given free block, once.
        assert!(sm.claim(&io, 20).unwrap());
        assert!(!sm.claim(&io, 20).unwrap());
        assert!(sm.is_used(&io, 20).unwrap());
        assert_eq!(sm.usable_free_blocks(), 0);
        assert_eq!(sm.free_blocks(), blocks - 40);
        // The limit grows: the new blocks are usable, in order, and counted.
        sm.set_limit(48);
        assert_eq!(sm.usable_free_blocks(), 8);
        sm.set_limit(blocks + 100);
        assert_eq!(sm.limit(), blocks, "never past the map");
        let used = sm.working_used_blocks(&io).unwrap();
        assert_eq!(used, (0..40).collect::<Vec<_>>());
        sm.cursor = 40;
        assert_eq!(sm.alloc(&io).unwrap(), Some(40));
        let used = sm.working_used_blocks(&io).unwrap();
        assert_eq!(used.len(), 41);
        // Committed: 20 was free in the last commit, 40 was not taken yet.
        assert_eq!(sm.used_blocks(&io).unwrap().len(), 39);
    }

    /// Three versions at once, as while a commit is being written: the durable one, the
    /// frozen one, the working one. A block is handed out (or claimed) only when free in all
    /// three: one the durable version uses that the frozen transaction freed, or one it held,
    /// waits for the frozen version to be durable; blocks set aside are free in the frozen
    /// version and used in the working one; the counts say so throughout.
    #[test]
    fn a_block_is_handed_out_only_when_free_in_all_three_versions() {
        let io = Mem::default();
        let blocks = BITS_PER_BITMAP + 100;
        let mut sm = SpaceMap::format(2, blocks, 8);
        commit(&mut sm, &io, 1);
        sm.set_limit(24);
        // Durable: 8..16 used.
        for want in 8..16 {
            assert_eq!(sm.alloc(&io).unwrap(), Some(want));
        }
        commit(&mut sm, &io, 2);
        assert_eq!(sm.usable_free_blocks(), 8);
        // Transaction A: frees 10 (durable uses it), takes 16 and 17, holds 17 (a record named
        // it), sets 16 aside (its record comes after the commit).
        sm.free(&io, 10).unwrap();
        assert_eq!(sm.alloc(&io).unwrap(), Some(16));
        assert_eq!(sm.alloc(&io).unwrap(), Some(17));
        sm.release(&io, 17).unwrap();
        assert_eq!(sm.usable_free_blocks(), 6, "18..24: 16 taken; 10, 17 busy");
        let ch = sm.changed_selectors(&[16]);
        let written = sm.freeze(&[16], 3);
        assert_eq!(written.len(), ch.len());
        assert!(sm.has_frozen());
        // The frozen version: 10 and 17 free, 16 free (set aside); the working version: 16 used.
        let (i, sel) = ch[0];
        assert_eq!(i, 0);
        assert_eq!(
            sel.free as u64,
            BITS_PER_BITMAP - 8 - 7,
            "8..16 but 10, nothing else"
        );
        assert!(sm.is_used(&io, 16).unwrap() && !sm.is_used(&io, 10).unwrap());
        assert_eq!(sm.usable_free_blocks(), 6);
        // Transaction B, on top of the frozen version: 10 and 17 are not handed out yet, not
        // even from the cursor right at them, nor claimed.
        for at in [10, 17] {
            sm.cursor = at;
            let got = sm.alloc(&io).unwrap().unwrap();
            assert!(got != 10 && got != 17, "busy block {got} handed out");
            sm.free(&io, got).unwrap();
            assert!(!sm.claim(&io, at).unwrap(), "busy block {at} claimed");
        }
        // B frees 12 (used in both earlier versions) and 16 (its record came and went).
        sm.free(&io, 12).unwrap();
        sm.free(&io, 16).unwrap();
        assert!(!sm.is_used(&io, 16).unwrap());
        assert_eq!(sm.usable_free_blocks(), 7, "16 is free at once, 12 waits");
        // The frozen version is durable: 10 and 17 may go, 12 still waits for B.
        for (b, bytes) in written {
            io.write_block(b, &bytes).unwrap();
        }
        sm.frozen_durable();
        assert!(!sm.has_frozen());
        assert_eq!(sm.usable_free_blocks(), 9, "10, 16, 17, 18..24");
        sm.cursor = 10;
        assert_eq!(sm.alloc(&io).unwrap(), Some(10));
        sm.cursor = 12;
        assert_eq!(
            sm.alloc(&io).unwrap(),
            Some(16),
            "12 waits for its own commit"
        );
        sm.cursor = 17;
        assert_eq!(sm.alloc(&io).unwrap(), Some(17));
        let sel = commit(&mut sm, &io, 4)[0].1;
        assert_eq!(
            sel.free as u64,
            BITS_PER_BITMAP - 8 - 8 - 2 + 1,
            "8..18 but 12"
        );
        let mut re = SpaceMap::open(2, blocks, sm.selectors.clone()).unwrap();
        let used = re.used_blocks(&io).unwrap();
        let want: Vec<BlockNo> = (0..18).filter(|&b| b != 12).collect();
        assert_eq!(used, want);
        assert_eq!(sm.working_used_blocks(&io).unwrap(), want);
    }

    #[test]
    fn freed_blocks_wait_for_the_commit_and_reopen_finds_the_same_map() {
        let io = Mem::default();
        let blocks = BITS_PER_BITMAP * 2 + 100;
        assert_eq!(SpaceMap::region_len(blocks), 6);
        let mut sm = SpaceMap::format(10, blocks, 16);
        assert_eq!(sm.free_blocks(), blocks - 16);
        commit(&mut sm, &io, 1);
        let a: Vec<BlockNo> = (0..50).map(|_| sm.alloc(&io).unwrap().unwrap()).collect();
        assert_eq!(a[0], 16, "the first free block");
        commit(&mut sm, &io, 2);
        // Freed in this transaction: not handed out again before the commit...
        sm.free(&io, a[3]).unwrap();
        assert!(sm.free(&io, a[3]).is_err(), "a double free is an error");
        let b = sm.alloc(&io).unwrap().unwrap();
        assert_ne!(b, a[3]);
        // ...but a block allocated and freed in the same transaction is free at once.
        sm.free(&io, b).unwrap();
        sm.cursor = 0;
        assert_eq!(sm.alloc(&io).unwrap().unwrap(), b);
        let selectors: Vec<Selector> = {
            let ch = commit(&mut sm, &io, 3);
            assert!(ch.iter().all(|(i, _)| *i == 0));
            sm.selectors.clone()
        };
        sm.cursor = 0;
        assert_eq!(
            sm.alloc(&io).unwrap().unwrap(),
            a[3],
            "free after the commit"
        );
        // A reopen from the selectors finds the committed map.
        let mut re = SpaceMap::open(10, blocks, selectors).unwrap();
        assert_eq!(re.free_blocks(), blocks - 16 - 50);
        assert!(!re.is_used(&io, a[3]).unwrap());
        assert!(re.is_used(&io, a[4]).unwrap());
        assert!(re.is_used(&io, b).unwrap());
        // The tail past the store's end is never handed out; the store fills exactly.
        let mut n = 0;
        while let Some(x) = re.alloc(&io).unwrap() {
            assert!(x < blocks);
            n += 1;
        }
        assert_eq!(n, blocks - 16 - 50);
        assert_eq!(re.free_blocks(), 0);
        let used = re.used_blocks(&io).unwrap();
        // Committed: the 16 fixed blocks, the 50 allocated but a[3], and b.
        assert_eq!(used.len(), 66);
        assert!(!used.contains(&a[3]) && used.contains(&b) && used.contains(&15));
    }

    /// Several bitmaps, each changed in several commits (so each flips slots), reopened from
    /// encoded selectors: every block is where it was put, none handed out twice, and a
    /// bitmap whose free count disagrees with its selector is refused.
    #[test]
    fn every_bitmap_round_trips_through_commits_and_selectors() {
        let io = Mem::default();
        let blocks = BITS_PER_BITMAP * 3 - 7;
        let mut sm = SpaceMap::format(2, blocks, 8);
        commit(&mut sm, &io, 1);
        let mut mine = std::collections::BTreeSet::new();
        for round in 0..3u64 {
            for i in 0..3u64 {
                sm.cursor = i * BITS_PER_BITMAP + 100 * round + 17;
                for _ in 0..50 {
                    let b = sm.alloc(&io).unwrap().unwrap();
                    assert!(b < blocks && b >= 8);
                    assert!(mine.insert(b), "block {b} handed out twice");
                }
            }
            // Free a few of the previous round's.
            let old: Vec<BlockNo> = mine.iter().copied().step_by(9).collect();
            for b in old {
                sm.free(&io, b).unwrap();
                mine.remove(&b);
            }
            commit(&mut sm, &io, 2 + round);
        }
        let encoded: Vec<[u8; 16]> = sm.selectors.iter().map(|s| s.encode()).collect();
        let selectors: Vec<Selector> = encoded.iter().map(Selector::decode).collect();
        let mut re = SpaceMap::open(2, blocks, selectors.clone()).unwrap();
        let want: Vec<BlockNo> = (0..8).chain(mine.iter().copied()).collect();
        assert_eq!(re.used_blocks(&io).unwrap(), want);
        assert_eq!(re.free_blocks(), blocks - want.len() as u64);
        let last = *mine.iter().next_back().unwrap();
        assert!(last >= 2 * BITS_PER_BITMAP, "the third bitmap was used");
        assert!(re.is_used(&io, last).unwrap() && !re.is_used(&io, last + 1).unwrap());
        // A selector whose free count is off: the bitmap is refused.
        let mut bad = selectors;
        bad[2].free += 1;
        let mut re = SpaceMap::open(2, blocks, bad).unwrap();
        assert!(re.used_blocks(&io).is_err());
    }

    #[test]
    fn a_damaged_bitmap_is_an_error() {
        let io = Mem::default();
        let mut sm = SpaceMap::format(4, 1000, 6);
        commit(&mut sm, &io, 1);
        let sel = sm.selectors.clone();
        let slot = 4 + sel[0].slot as u64;
        io.0.lock().get_mut(&slot).unwrap()[500] ^= 1;
        let mut re = SpaceMap::open(4, 1000, sel).unwrap();
        assert!(re.alloc(&io).is_err());
    }

    /// A repair's rebuild: leaks given back and lost marks set, counted; a block the durable
    /// version uses is not handed out before the repaired version is durable; an unreadable
    /// bitmap is rewritten from `want`, and hands out nothing it might still hold unless the
    /// durable version is known to be `want`.
    #[test]
    fn reconcile_marks_exactly_what_is_in_use() {
        let io = Mem::default();
        let blocks = BITS_PER_BITMAP + 100;
        let mut sm = SpaceMap::format(2, blocks, 8);
        commit(&mut sm, &io, 1);
        sm.set_limit(40);
        // Durable: 8..20 used.
        for want in 8..20 {
            assert_eq!(sm.alloc(&io).unwrap(), Some(want));
        }
        commit(&mut sm, &io, 2);
        // In use really: 0..8 (fixed), 8..12 and 30..33; 12..20 leaked, 30..33 lost.
        let want: Vec<BlockNo> = (0..12).chain(30..33).collect();
        let r = sm.reconcile(&io, &want, false).unwrap();
        assert_eq!(
            r,
            Reconciled {
                leaked: 8,
                lost: 3,
                rewritten: 0
            }
        );
        assert_eq!(sm.working_used_blocks(&io).unwrap()[..15], want[..]);
        // 12..20 stay held until durable: only 20..30 and 33..40 are handed out.
        assert_eq!(sm.usable_free_blocks(), 17);
        let got: Vec<BlockNo> = std::iter::from_fn(|| sm.alloc(&io).unwrap()).collect();
        assert_eq!(got, (20..30).chain(33..40).collect::<Vec<_>>());
        commit(&mut sm, &io, 3);
        let got: Vec<BlockNo> = std::iter::from_fn(|| sm.alloc(&io).unwrap()).collect();
        assert_eq!(got, (12..20).collect::<Vec<_>>(), "free once durable");

        // An unreadable bitmap: rewritten; without knowing the durable version it hands out
        // nothing, knowing it, what `want` leaves free.
        for durable_is_want in [false, true] {
            let io = Mem::default();
            let mut sm = SpaceMap::format(2, blocks, 8);
            let selectors: Vec<Selector> = commit(&mut sm, &io, 1)
                .into_iter()
                .map(|(_, s)| s)
                .collect();
            // Reopened: nothing cached.
            let mut sm = SpaceMap::open(2, blocks, selectors).unwrap();
            sm.set_limit(40);
            for slot in [2, 3] {
                io.write_block(slot, &vec![0u8; NODE_SIZE]).unwrap();
            }
            let want: Vec<BlockNo> = (0..10).collect();
            let r = sm.reconcile(&io, &want, durable_is_want).unwrap();
            assert_eq!(r.rewritten, 1);
            let got: Vec<BlockNo> = std::iter::from_fn(|| sm.alloc(&io).unwrap()).collect();
            if durable_is_want {
                assert_eq!(got, (10..40).collect::<Vec<_>>());
            } else {
                assert!(got.is_empty(), "{got:?}");
            }
            commit(&mut sm, &io, 2);
            let more: Vec<BlockNo> = std::iter::from_fn(|| sm.alloc(&io).unwrap()).collect();
            if durable_is_want {
                assert!(more.is_empty(), "{more:?}");
            } else {
                assert_eq!(more, (10..40).collect::<Vec<_>>(), "free once durable");
            }
        }
    }

    /// The rule `first_takeable` applies a word at a time, one bit at a time.
    fn bit_rule(sm: &SpaceMap, base: &Bits, i: u32, bit: usize) -> bool {
        let d = sm.dirty.get(&i);
        !get_bit(base, bit)
            && d.is_none_or(|d| !get_bit(&d.working, bit))
            && d.and_then(|d| d.held.as_ref())
                .is_none_or(|h| !get_bit(h, bit))
            && sm.frozen.get(&i).is_none_or(|f| !get_bit(&f.busy, bit))
    }

    /// The word-at-a-time search hands out exactly what the bit rule allows: the first block of
    /// the range free in the base, the working version, not held and not busy in the frozen
    /// version, at any range edge within or across words.
    #[test]
    fn the_word_search_finds_the_first_block_the_bit_rule_allows() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let len = NODE_SIZE - HEADER;
        for round in 0..200 {
            let mut sm = SpaceMap::format(2, BITS_PER_BITMAP, 0);
            // Dense maps, so free blocks are rare and ranges often hold none.
            let mut bits = |density: u32| -> Bits {
                (0..len)
                    .map(|_| {
                        (0..8).fold(0u8, |b, k| {
                            b | ((rng.random_range(0..100) < density) as u8) << k
                        })
                    })
                    .collect()
            };
            let base = Arc::new(bits(90));
            let working = bits(90);
            let held = (round % 2 == 0).then(|| bits(50));
            let busy = bits(50);
            sm.dirty.insert(
                0,
                Dirty {
                    base: base.clone(),
                    working,
                    free: 1,
                    held,
                },
            );
            if round % 3 != 0 {
                sm.frozen.insert(
                    0,
                    Frozen {
                        bits: base.clone(),
                        free: 1,
                        busy,
                    },
                );
            }
            for _ in 0..50 {
                let from = rng.random_range(0..BITS_PER_BITMAP as usize);
                let to = rng.random_range(from..=BITS_PER_BITMAP as usize);
                let want = (from..to).find(|&b| bit_rule(&sm, &base, 0, b));
                assert_eq!(sm.first_takeable(&base, 0, from, to), want, "{from}..{to}");
            }
        }
    }

    /// A bitmap found with nothing to hand out is skipped until something can change that: a
    /// block of it freed, a commit made durable, a larger limit. Skipping it one step too long
    /// would make the store look full.
    #[test]
    fn a_bitmap_found_exhausted_is_searched_again_once_it_may_have_blocks() {
        let io = Mem::default();
        let blocks = 3 * BITS_PER_BITMAP;
        let mut sm = SpaceMap::format(6, blocks, 12);
        let last = 2 * BITS_PER_BITMAP - 1;
        sm.set_limit(last);
        while sm.alloc(&io).unwrap().is_some() {}
        commit(&mut sm, &io, 1);
        let b0 = 100;
        let b1 = BITS_PER_BITMAP + 7;
        // Freed blocks the durable version uses: free, but busy until the commit is durable.
        sm.free(&io, b0).unwrap();
        sm.free(&io, b1).unwrap();
        assert_eq!(sm.alloc(&io).unwrap(), None);
        assert!(sm.is_exhausted(0) && sm.is_exhausted(1));
        sm.set_limit(last + 1);
        assert_eq!(sm.alloc(&io).unwrap(), Some(last), "the limit grew");
        assert_eq!(sm.alloc(&io).unwrap(), None);
        assert!(sm.is_exhausted(0) && sm.is_exhausted(1));
        // Taken in this transaction and freed again, in a bitmap found exhausted (bitmap 0
        // still is): takeable at once.
        sm.free(&io, last).unwrap();
        assert!(sm.is_exhausted(0) && !sm.is_exhausted(1));
        assert_eq!(sm.alloc(&io).unwrap(), Some(last));
        sm.cursor = 0;
        commit(&mut sm, &io, 2);
        assert_eq!(sm.alloc(&io).unwrap(), Some(b0), "free once durable");
        assert_eq!(sm.alloc(&io).unwrap(), Some(b1));
        assert_eq!(sm.alloc(&io).unwrap(), None);
        // Taken in this transaction and freed again: takeable at once.
        sm.free(&io, b1).unwrap();
        assert_eq!(
            sm.alloc(&io).unwrap(),
            Some(b1),
            "freed in the same transaction"
        );
        assert_eq!(sm.alloc(&io).unwrap(), None);
        // Frozen and written, not yet durable: still nothing.
        commit(&mut sm, &io, 3);
        sm.free(&io, b0).unwrap();
        let ch = sm.freeze(&[], 4);
        assert!(!ch.is_empty());
        sm.cursor = 0;
        assert_eq!(sm.alloc(&io).unwrap(), None, "busy in the frozen version");
        sm.frozen_durable();
        sm.cursor = 0;
        assert_eq!(sm.alloc(&io).unwrap(), Some(b0));
        assert_eq!(sm.alloc(&io).unwrap(), None);
        // A larger limit opens the third bitmap.
        sm.set_limit(blocks);
        assert_eq!(sm.alloc(&io).unwrap(), Some(2 * BITS_PER_BITMAP));
    }
}
