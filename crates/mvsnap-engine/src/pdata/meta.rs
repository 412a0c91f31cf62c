//! Durable metadata: the tree and the space map on one device, switched together by a root
//! flip in a pair of header blocks. A commit costs what the transaction changed:
//!
//! 1. the transaction's changes are made in the tree (shadowed nodes, in RAM);
//! 2. the space map's changed selectors are written into the tree (key space `M`), repeated
//!    until no new node or bitmap is touched (each round touches fewer: it converges at once);
//! 3. the dirty nodes and the changed bitmaps are written to blocks no durable version uses;
//! 4. sync; 5. the header with the new root goes to the older of the two header blocks;
//! 6. sync; 7. the blocks the old version alone used become free.
//!
//! A crash before 6 completes finds the old header (or, if the new one landed, the new
//! version whole: everything it points at was synced in 4). Nothing of the version a header
//! points at is ever written over while it may still be the newest durable one.
//!
//! ```text
//! block 0, 1: header  0 magic u32 "MVMH"  4 crc32c u32 of 8..4096 (salted)  8 seq u64
//!                     16 txn u64  24 root u64 (u64::MAX: empty)  32 blocks u64  40 map u64
//! blocks map..map+2n: the space map's two slots per bitmap (spacemap.rs)
//! then: tree nodes (and, in the store, data) as the space map hands them out
//! ```

use std::sync::Arc;

use super::btree::{self, FrozenNodes, Pending, PendingView, Txn};
use super::cache::{CacheStats, NodeCache};
use super::node::{Key, Node, Value, LEAF_CAP};
use super::overlay::{FrozenOverlay, Overlay, ENTRY_BYTES};
use super::spacemap::{Reconciled, Selector, SpaceMap, TxnAlloc};
use super::{BlockNo, NodeIo, PResult, PdataError, NODE_SIZE};
use crate::blockdev::BlockDev;

const MAGIC: u32 = 0x484d_564d; // "MVMH"
const SALT_HEADER: u32 = 0x4d48_0006;
const NO_ROOT: u64 = u64::MAX;
/// Key space of the space map's selectors.
pub const SPACE_MAP: u8 = b'M';
/// The first block after the headers.
const MAP_START: BlockNo = 2;
/// Words a header carries for its user (the store: journal position, table location).
pub const USER_WORDS: usize = 8;
const USER_AT: usize = 64;

/// Whole blocks of a device, by number, from byte `base` on.
#[derive(Clone)]
pub struct DevIo(pub Arc<dyn BlockDev>, pub u64);

/// Reads the nodes a [`Meta::probe_view`] missed into the cache, without the lock that guards
/// the `Meta` (a device read under it would stall every reader and writer of the tree).
pub struct NodeFetcher {
    io: DevIo,
    cache: Arc<NodeCache>,
}

impl NodeFetcher {
    /// Read `block` into the cache, unless it was reused since `stamp` (then the read may
    /// have seen another node: see [`NodeCache::insert_fetched`]; a block reused for data
    /// fails its checksum).
    pub fn fetch(&self, block: BlockNo, stamp: u32) -> PResult<()> {
        let n = btree::read_node(&self.io, block)?;
        self.cache.insert_fetched(block, Arc::new(n), stamp);
        Ok(())
    }

    /// [`NodeFetcher::fetch`] each of a probe's misses; false at the first error (the
    /// caller's lookups on the device's nodes report it).
    pub fn fetch_all(&self, missed: Vec<(BlockNo, u32)>) -> bool {
        missed
            .into_iter()
            .all(|(b, stamp)| self.fetch(b, stamp).is_ok())
    }
}

impl NodeIo for DevIo {
    fn read_block(&self, block: BlockNo, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read_at(buf, self.1 + block * NODE_SIZE as u64)
    }
    fn write_block(&self, block: BlockNo, buf: &[u8]) -> std::io::Result<()> {
        self.0.write_at(buf, self.1 + block * NODE_SIZE as u64)
    }
}

fn selector_key(index: u32) -> Key {
    let mut k = [0u8; 16];
    k[0] = SPACE_MAP;
    k[12..].copy_from_slice(&index.to_be_bytes());
    k
}

#[derive(Clone, Copy, Debug)]
struct Header {
    seq: u64,
    txn: u64,
    root: Option<BlockNo>,
    blocks: u64,
    /// Nodes in the tree this header points at (what `info` reports as metadata; `check`
    /// verifies it).
    nodes: u64,
    user: [u64; USER_WORDS],
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; NODE_SIZE];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.txn.to_le_bytes());
        b[24..32].copy_from_slice(&self.root.unwrap_or(NO_ROOT).to_le_bytes());
        b[32..40].copy_from_slice(&self.blocks.to_le_bytes());
        b[40..48].copy_from_slice(&MAP_START.to_le_bytes());
        b[48..56].copy_from_slice(&self.nodes.to_le_bytes());
        for (i, w) in self.user.iter().enumerate() {
            b[USER_AT + 8 * i..USER_AT + 8 * i + 8].copy_from_slice(&w.to_le_bytes());
        }
        let c = crate::format::crc(SALT_HEADER, &b[8..]);
        b[4..8].copy_from_slice(&c.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Header> {
        let word = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        if u32::from_le_bytes(b[0..4].try_into().unwrap()) != MAGIC
            || crate::format::crc(SALT_HEADER, &b[8..])
                != u32::from_le_bytes(b[4..8].try_into().unwrap())
            || word(40) != MAP_START
        {
            return None;
        }
        Some(Header {
            seq: word(8),
            txn: word(16),
            root: Some(word(24)).filter(|&r| r != NO_ROOT),
            blocks: word(32),
            nodes: word(48),
            user: std::array::from_fn(|i| word(USER_AT + 8 * i)),
        })
    }
}

/// The writes of one commit, detached from the [`Meta`] that froze it so that they can run
/// while the next transaction goes on.
pub struct CommitJob {
    dev: Arc<dyn BlockDev>,
    io: DevIo,
    cache: Arc<NodeCache>,
    nodes: Arc<FrozenNodes>,
    bitmaps: Vec<(BlockNo, Vec<u8>)>,
    header: Header,
    sync: bool,
}

impl CommitJob {
    /// Nodes and bitmaps to their blocks, sync, the header to the older header block, sync;
    /// then the nodes go into the cache as clean ones, here, beside the writers: under the
    /// state lock ([`Meta::finish`]) 2,000 cache inserts held every writer up to 38 ms at 4M
    /// mappings. Early is safe: the blocks are new in this version (nothing cached can be an
    /// older node at them), and none can be reused before the commit finishes.
    pub fn write(&self) -> PResult<CommitStats> {
        let nodes = btree::write_frozen(&self.io, &self.nodes, self.header.txn - 1)?;
        for (block, bytes) in &self.bitmaps {
            self.io
                .write_block(*block, bytes)
                .map_err(|source| PdataError::Io {
                    block: *block,
                    source,
                })?;
        }
        self.sync()?;
        let at = self.header.seq % 2;
        self.io
            .write_block(at, &self.header.encode())
            .map_err(|source| PdataError::Io { block: at, source })?;
        self.sync()?;
        // Copies, not the frozen nodes themselves (shared with readers): a clone holds exactly
        // its entries (see `Node::shrink_to_fit`). At 1M mappings the daemon's RSS went from
        // 81-83 to 72 MiB with a 64 MiB cache.
        self.cache.insert_all(
            self.nodes
                .iter()
                .map(|(&b, n)| (b, Arc::new(Node::clone(n)))),
        );
        Ok(CommitStats {
            nodes,
            bitmaps: self.bitmaps.len(),
            user: self.header.user,
        })
    }

    /// Set a user word of the header before it is written: one known only once the caller's
    /// own writes for the commit are ready (a checksum of what it writes beside the lock).
    pub fn set_user_word(&mut self, index: usize, value: u64) {
        self.header.user[index] = value;
    }

    fn sync(&self) -> PResult<()> {
        if !self.sync {
            return Ok(());
        }
        self.dev
            .sync()
            .map_err(|source| PdataError::Io { block: 0, source })
    }
}

/// What one commit wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitStats {
    pub nodes: usize,
    pub bitmaps: usize,
    /// The user words of the header written (see [`CommitJob::set_user_word`]).
    pub user: [u64; USER_WORDS],
}

/// The tree and its space map, with one transaction always open: changes accumulate in it
/// (in RAM, nodes shadowed) until [`Meta::commit`] makes them durable with one root flip.
pub struct Meta {
    dev: Arc<dyn BlockDev>,
    io: DevIo,
    cache: Arc<NodeCache>,
    map: SpaceMap,
    header: Header,
    /// The version a commit is writing, with the header that will point at it.
    frozen: Option<(Arc<FrozenNodes>, Header)>,
    pending: Pending,
    /// The first failure inside the open transaction: it can no longer commit.
    broken: Option<String>,
    /// Commits sync the device (off for an ephemeral store, which nothing must survive).
    sync: bool,
    /// Nodes in the working version's tree.
    nodes: u64,
    /// Entries of the working version not folded into its tree yet (see [`Overlay`]): not
    /// durable with a commit unless the caller writes them ([`Meta::overlay_entries`]).
    overlay: Overlay,
    /// The caller's capacity for it, if set ([`Meta::set_overlay_entries`]).
    fixed_overlay_capacity: Option<usize>,
}

/// The overlay's share of the cache's budget: an eighth. At 64 MiB that is ~175k entries, so
/// the fold's sweep carries about 2.8 entries per leaf written at 4M mappings (~47k leaves),
/// where a dirty set of a fifth of the cache wrote 0.97 leaves per entry.
/// On a small store, at most an entry per 16 of its blocks: the overlay is written with each
/// commit (32 bytes an entry), and room for that is kept back from data.
fn overlay_capacity(cache_bytes: u64, blocks: u64) -> usize {
    (cache_bytes / 8 / ENTRY_BYTES as u64)
        .min(blocks / 16)
        .max(64) as usize
}

/// Most leaves one [`Meta::fold_if_full`] folds: a bound on what one call adds to a
/// writer's time under the caller's lock.
const FOLD_STEPS: usize = 16;

impl Meta {
    /// Blocks before the first one the space map can hand out: headers and the map's region.
    pub fn fixed_blocks(blocks: u64) -> u64 {
        MAP_START + SpaceMap::region_len(blocks)
    }

    /// Start a device of `blocks` blocks with an empty tree.
    pub fn format(dev: Arc<dyn BlockDev>, blocks: u64, cache_bytes: u64) -> PResult<Meta> {
        Self::format_at(dev, 0, blocks, cache_bytes, [0; USER_WORDS])
    }

    /// [`Meta::format`] for the blocks from byte `base` of `dev` on, with the first header's
    /// user words.
    pub fn format_at(
        dev: Arc<dyn BlockDev>,
        base: u64,
        blocks: u64,
        cache_bytes: u64,
        user: [u64; USER_WORDS],
    ) -> PResult<Meta> {
        let fixed = Self::fixed_blocks(blocks);
        if blocks <= fixed {
            return Err(PdataError::NoSpace);
        }
        let map = SpaceMap::format(MAP_START, blocks, fixed);
        let mut m = Meta {
            io: DevIo(dev.clone(), base),
            dev,
            cache: Arc::new(NodeCache::new(cache_bytes)),
            map,
            header: Header {
                seq: 0,
                txn: 1,
                root: None,
                blocks,
                nodes: 0,
                user,
            },
            frozen: None,
            pending: Pending::new(None, 1),
            broken: None,
            sync: true,
            nodes: 0,
            overlay: Overlay::new(overlay_capacity(cache_bytes, blocks)),
            fixed_overlay_capacity: None,
        };
        m.commit(user)?;
        // Both header blocks valid, so a stale one from an earlier format can never win.
        m.commit(user)?;
        Ok(m)
    }

    /// The newest durable version on the device.
    pub fn open(dev: Arc<dyn BlockDev>, cache_bytes: u64) -> PResult<Meta> {
        Self::open_at(dev, 0, cache_bytes)
    }

    /// [`Meta::open`] for the blocks from byte `base` of `dev` on.
    pub fn open_at(dev: Arc<dyn BlockDev>, base: u64, cache_bytes: u64) -> PResult<Meta> {
        let io = DevIo(dev.clone(), base);
        let mut best: Option<Header> = None;
        for b in 0..2 {
            let mut buf = vec![0u8; NODE_SIZE];
            io.read_block(b, &mut buf)
                .map_err(|source| PdataError::Io { block: b, source })?;
            if let Some(h) = Header::decode(&buf) {
                if best.is_none_or(|x| h.seq > x.seq) {
                    best = Some(h);
                }
            }
        }
        let header = best.ok_or(PdataError::Corrupt {
            block: 0,
            what: "no valid metadata header".into(),
        })?;
        let cache = Arc::new(NodeCache::new(cache_bytes));
        let n = SpaceMap::bitmaps_for(header.blocks) as u32;
        let mut selectors = Vec::with_capacity(n as usize);
        {
            let v = btree::Committed {
                io: &io,
                cache: &cache,
                root: header.root,
            };
            btree::for_each_from(&v, &selector_key(0), &mut |k, val| {
                if k[0] != SPACE_MAP || selectors.len() as u32 >= n {
                    return false;
                }
                selectors.push((u32::from_be_bytes(k[12..].try_into().unwrap()), *val));
                true
            })?;
        }
        let selectors: Vec<Selector> = selectors
            .iter()
            .enumerate()
            .map(|(i, (idx, v))| {
                if *idx as usize != i {
                    return Err(PdataError::Corrupt {
                        block: header.root.unwrap_or(0),
                        what: format!("space map selector {i} missing"),
                    });
                }
                let v: &[u8; 16] = v;
                Ok(Selector::decode(v))
            })
            .collect::<PResult<_>>()?;
        let map = SpaceMap::open(MAP_START, header.blocks, selectors)?;
        Ok(Meta {
            dev,
            io,
            cache,
            map,
            frozen: None,
            pending: Pending::new(header.root, header.txn),
            nodes: header.nodes,
            header,
            broken: None,
            sync: true,
            overlay: Overlay::new(overlay_capacity(cache_bytes, header.blocks)),
            fixed_overlay_capacity: None,
        })
    }

    /// Commit without syncing (an ephemeral store: nothing of it must survive a crash).
    pub fn set_sync(&mut self, sync: bool) {
        self.sync = sync;
    }

    /// The user words of the durable header.
    pub fn user(&self) -> [u64; USER_WORDS] {
        self.header.user
    }

    /// Blocks the map covers.
    pub fn blocks(&self) -> u64 {
        self.header.blocks
    }

    pub fn get(&self, key: &Key) -> PResult<Option<Value>> {
        btree::get(&self.view(), key)
    }

    pub fn seek_ge(&self, key: &Key) -> PResult<Option<(Key, Value)>> {
        btree::seek_ge(&self.view(), key)
    }

    pub fn for_each_from(
        &self,
        from: &Key,
        f: &mut dyn FnMut(&Key, &Value) -> bool,
    ) -> PResult<()> {
        btree::for_each_from(&self.view(), from, f)
    }

    /// Read the working version (the durable one plus the open transaction's changes) with
    /// the key spaces' own lookups.
    pub fn with_view<R>(&self, f: impl FnOnce(&dyn btree::View) -> R) -> R {
        f(&self.view())
    }

    /// The working version, for readers.
    pub fn view(&self) -> PendingView<'_> {
        PendingView {
            io: &self.io,
            cache: &self.cache,
            frozen: self.frozen.as_ref().map(|(f, _)| &**f),
            pending: &self.pending,
            overlay: Some(&self.overlay),
        }
    }

    /// The working version as far as RAM holds it: what lookups would read from the device is
    /// noted, for a [`NodeFetcher`] to read without the caller's lock.
    pub fn probe_view(&self) -> btree::ProbeView<'_> {
        btree::ProbeView::new(self.view())
    }

    /// Reads nodes into the cache; usable without the lock that guards this `Meta`.
    pub fn fetcher(&self) -> NodeFetcher {
        NodeFetcher {
            io: self.io.clone(),
            cache: self.cache.clone(),
        }
    }

    fn committed(&self) -> btree::Committed<'_> {
        btree::Committed {
            io: &self.io,
            cache: &self.cache,
            root: self.header.root,
        }
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Nodes in the tree (the working version): the metadata's size beside the fixed area.
    pub fn nodes(&self) -> u64 {
        self.nodes
    }

    /// Nodes the open transaction changed (held in RAM until the commit).
    pub fn dirty_nodes(&self) -> usize {
        self.pending.dirty_nodes()
    }

    /// Nodes of the commit being written (held in RAM until it finishes).
    pub fn frozen_nodes(&self) -> usize {
        self.frozen.as_ref().map_or(0, |(nodes, _)| nodes.len())
    }

    pub fn free_blocks(&self) -> u64 {
        self.map.free_blocks()
    }

    /// Blocks the open transaction may hand out now (free here and in the durable version).
    pub fn usable_free_blocks(&self) -> u64 {
        self.map.usable_free_blocks()
    }

    /// Hand out no block at or past `limit` (a store file not grown that far yet).
    pub fn set_limit(&mut self, limit: u64) {
        self.map.set_limit(limit);
        let capacity = self
            .fixed_overlay_capacity
            .unwrap_or_else(|| overlay_capacity(self.cache.stats().capacity_bytes, limit));
        self.overlay.set_capacity(capacity);
    }

    /// Hold this many overlay entries before folding, whatever the cache and the store's size
    /// (tests make it small, so that their small stores fold too).
    pub fn set_overlay_entries(&mut self, entries: usize) {
        self.fixed_overlay_capacity = Some(entries);
        self.overlay.set_capacity(entries);
    }

    /// Most entries the overlay holds (a few more between folds).
    pub fn overlay_limit(&self) -> usize {
        self.overlay.limit()
    }

    pub fn limit(&self) -> u64 {
        self.map.limit()
    }

    fn check_open(&self) -> PResult<()> {
        match &self.broken {
            Some(why) => Err(PdataError::Corrupt {
                block: 0,
                what: format!("an earlier change failed ({why}); the store must be reopened"),
            }),
            None => Ok(()),
        }
    }

    /// Change the open transaction. On an error the transaction is broken: nothing more
    /// commits until a reopen (the durable version stays as it was).
    pub fn change<R>(&mut self, f: impl FnOnce(&mut Txn<TxnAlloc>) -> PResult<R>) -> PResult<R> {
        self.check_open()?;
        let mut alloc = TxnAlloc {
            map: &mut self.map,
            io: &self.io,
            error: None,
            nodes: 0,
        };
        let pending = std::mem::take(&mut self.pending);
        let frozen = self.frozen.as_ref().map(|(f, _)| &**f);
        let mut t = Txn::resume(
            &self.io,
            &self.cache,
            frozen,
            &mut alloc,
            pending,
            Some(&mut self.overlay),
        );
        let out = f(&mut t);
        self.pending = t.suspend();
        self.nodes = self.nodes.saturating_add_signed(alloc.nodes);
        let out = match (out, alloc.error.take()) {
            (_, Some(e)) | (Err(e), None) => Err(e),
            (Ok(r), None) => Ok(r),
        };
        if let Err(e) = &out {
            self.broken = Some(e.to_string());
        }
        self.repin();
        out
    }

    /// Tell the cache what the open transaction and the commit in flight hold: it counts
    /// them against its budget.
    fn repin(&self) {
        let overlay = self.overlay.bytes().div_ceil(NODE_SIZE);
        self.cache
            .set_pinned(self.pending.dirty_nodes() + self.frozen_nodes() + overlay);
    }

    /// Entries held in the overlay (not in the tree yet).
    pub fn overlay_len(&self) -> usize {
        self.overlay.len()
    }

    /// The overlay's RAM, counted in the cache's budget.
    pub fn overlay_bytes(&self) -> usize {
        self.overlay.bytes()
    }

    /// The overlay's entries, in key order: the caller makes them durable with a commit
    /// (the store writes them in its tables).
    pub fn overlay_entries(&self) -> impl Iterator<Item = (&Key, &Value)> {
        self.overlay.iter()
    }

    /// The overlay's entries as they are now, in O(1): a commit writes them out without the
    /// caller's lock.
    pub fn frozen_overlay(&self) -> FrozenOverlay {
        self.overlay.frozen()
    }

    /// Put back the overlay a durable version was committed with (its keys are not in
    /// the tree).
    pub fn load_overlay(&mut self, entries: impl IntoIterator<Item = (Key, Value)>) {
        for (k, v) in entries {
            self.overlay.insert(k, v);
        }
        self.repin();
    }

    /// Fold while the overlay holds more than its share (a few leaves at most per call: the
    /// sweep keeps pace with the inserts). A leaf not in RAM is not read here, under the
    /// caller's lock (a store's writers all wait for it): the fold stops, and the next first
    /// write's probe reads it without the lock ([`btree::probe_fold`]). Only an overlay at its
    /// limit folds whatever it must read (nothing probed: a replay, or writes that do not
    /// probe).
    pub fn fold_if_full(&mut self) -> PResult<usize> {
        let mut moved = 0;
        for _ in 0..FOLD_STEPS {
            if !self.overlay.over_capacity()
                || (!self.overlay.over_limit() && !self.next_fold_in_ram())
            {
                break;
            }
            match self.change(|t| t.fold(LEAF_CAP))? {
                0 => break,
                n => moved += n,
            }
        }
        Ok(moved)
    }

    /// Whether the fold's next leaf, and the path to it, are in RAM.
    fn next_fold_in_ram(&self) -> bool {
        let v = self.probe_view();
        // Another error shows again in the fold itself.
        let _ = btree::probe_fold(&v);
        v.into_missed().is_empty()
    }

    /// Fold every entry of the overlay into the tree.
    pub fn fold_all(&mut self) -> PResult<usize> {
        let mut moved = 0;
        while !self.overlay.is_empty() {
            match self.change(|t| t.fold(LEAF_CAP))? {
                0 => {
                    return Err(PdataError::Corrupt {
                        block: 0,
                        what: format!(
                            "the overlay's fold stopped with {} entries left (a bug)",
                            self.overlay.len()
                        ),
                    })
                }
                n => moved += n,
            }
        }
        Ok(moved)
    }

    /// For a store that never commits (ephemeral): write the open transaction's nodes where
    /// they are, without a sync and without a header, and let the cache hold them as clean
    /// ones. They sit in blocks the durable version does not use and no header names, so a
    /// crash still leaves the store as it was opened; meanwhile RAM holds the cache only.
    pub fn spill(&mut self) -> PResult<usize> {
        self.check_open()?;
        if self.sync || self.frozen.is_some() {
            return Err(PdataError::Corrupt {
                block: 0,
                what: "nodes spilled outside an ephemeral store (a bug)".into(),
            });
        }
        let out = self.pending.spill(&self.io, &self.cache);
        if let Err(e) = &out {
            self.broken = Some(e.to_string());
        }
        self.repin();
        out
    }

    /// A block for data, in the open transaction (near the last one handed out).
    pub fn alloc_block(&mut self) -> PResult<Option<BlockNo>> {
        self.check_open()?;
        let b = self.map.alloc(&self.io)?;
        // A node's old block becomes data: a fetch of it in flight must not cache it.
        if let Some(b) = b {
            self.cache.remove(b);
        }
        Ok(b)
    }

    /// Free a block in the open transaction: at once if the durable version does not use it,
    /// else when the commit is durable.
    pub fn free_block(&mut self, block: BlockNo) -> PResult<()> {
        self.map.free(&self.io, block)
    }

    /// Free a block in the open transaction, never to be handed out before the commit is
    /// durable (a journal record may still name it).
    pub fn release_block(&mut self, block: BlockNo) -> PResult<()> {
        self.map.release(&self.io, block)
    }

    /// Take a given block (replaying a record that the live path allocated): false if it is
    /// not free, or lies outside the map.
    pub fn claim_block(&mut self, block: BlockNo) -> PResult<bool> {
        let claimed = self.map.claim(&self.io, block)?;
        if claimed {
            // Data now, as with `alloc_block`.
            self.cache.remove(block);
        }
        Ok(claimed)
    }

    pub fn is_used(&mut self, block: BlockNo) -> PResult<bool> {
        self.map.is_used(&self.io, block)
    }

    /// Run `change`, fold the overlay, and commit it all durably in the tree (see the module
    /// comment).
    pub fn update(
        &mut self,
        change: impl FnOnce(&mut Txn<TxnAlloc>) -> PResult<()>,
    ) -> PResult<CommitStats> {
        self.change(change)?;
        self.fold_all()?;
        let user = self.header.user;
        self.commit(user)
    }

    /// [`Meta::update`], returning what `change` returned.
    pub fn update_with<R>(
        &mut self,
        change: impl FnOnce(&mut Txn<TxnAlloc>) -> PResult<R>,
    ) -> PResult<R> {
        let r = self.change(change)?;
        self.fold_all()?;
        let user = self.header.user;
        self.commit(user)?;
        Ok(r)
    }

    /// Make the open transaction durable with these user words, then open the next one.
    /// On an error nothing durable changed, and the store must reopen.
    pub fn commit(&mut self, user: [u64; USER_WORDS]) -> PResult<CommitStats> {
        let job = self.freeze(user, &[])?;
        let r = job.write();
        self.finish(r)
    }

    /// The sequence number the next commit's header will carry (unique per commit: a stamp
    /// for what the caller writes with it).
    pub fn next_commit_seq(&self) -> u64 {
        self.header.seq + 1 + self.frozen.is_some() as u64
    }

    /// One commit in flight at a time: it is finished by whoever ran its job
    /// ([`Meta::finish`]); freezing again before that is a caller's error.
    fn refuse_if_frozen(&self) -> PResult<()> {
        if self.frozen.is_some() {
            return Err(PdataError::Corrupt {
                block: 0,
                what: "a commit was started before the previous one finished".into(),
            });
        }
        Ok(())
    }

    /// Close the open transaction as the version the next header (with these user words)
    /// will point at, and open the next transaction on top of it. Returns the job that
    /// writes it (nodes, bitmaps, sync, header, sync), to run without holding the caller's
    /// locks; readers and writers meanwhile see the frozen version as committed. `aside`:
    /// blocks used now that the frozen version must count free (see [`SpaceMap::freeze`]).
    pub fn freeze(&mut self, user: [u64; USER_WORDS], aside: &[BlockNo]) -> PResult<CommitJob> {
        self.check_open()?;
        self.refuse_if_frozen()?;
        let r = self.freeze_inner(user, aside);
        if let Err(e) = &r {
            self.broken = Some(e.to_string());
        }
        r
    }

    fn freeze_inner(&mut self, user: [u64; USER_WORDS], aside: &[BlockNo]) -> PResult<CommitJob> {
        let txn = self.pending.txn;
        // The space map's selectors into the tree, until nothing more changes.
        self.change(|t| loop {
            let changed = t.allocator().map.changed_selectors(aside);
            let mut again = false;
            for (i, sel) in changed {
                let k = selector_key(i);
                let v = sel.encode();
                if btree::get(&*t, &k)? != Some(v) {
                    t.insert(k, v)?;
                    again = true;
                }
            }
            if !again {
                return Ok(());
            }
        })?;
        let pending = std::mem::take(&mut self.pending);
        let root = pending.root;
        let nodes = Arc::new(pending.freeze());
        let bitmaps = self.map.freeze(aside, txn);
        let header = Header {
            seq: self.header.seq + 1,
            txn: txn + 1,
            root,
            blocks: self.header.blocks,
            nodes: self.nodes,
            user,
        };
        self.frozen = Some((nodes.clone(), header));
        self.pending = Pending::new(root, txn + 1);
        Ok(CommitJob {
            dev: self.dev.clone(),
            io: self.io.clone(),
            cache: self.cache.clone(),
            nodes,
            bitmaps,
            header,
            sync: self.sync,
        })
    }

    /// The frozen version's job ran: on success its header is durable and it becomes the
    /// durable version (its nodes clean in the cache, what its transaction freed free). On
    /// an error nothing more commits until a reopen (readers still see every change).
    pub fn finish(&mut self, written: PResult<CommitStats>) -> PResult<CommitStats> {
        if self.frozen.is_none() {
            return Err(PdataError::Corrupt {
                block: 0,
                what: "no commit in flight to finish".into(),
            });
        }
        let stats = match written {
            Ok(s) => s,
            Err(e) => {
                // The frozen nodes stay in RAM: readers go on seeing every change.
                self.broken = Some(e.to_string());
                return Err(e);
            }
        };
        // Its nodes are in the cache already (`CommitJob::write`).
        let (_, mut header) = self.frozen.take().expect("checked");
        header.user = stats.user;
        self.header = header;
        self.map.frozen_durable();
        self.repin();
        Ok(stats)
    }

    /// What can still be read of the working version's tree (see [`btree::salvage`]). Only
    /// with no commit in flight.
    pub fn salvage(&self) -> btree::Salvage {
        let mut s = btree::salvage(&self.view());
        // After the tree's: a rebuild inserts them last, so they win a tie as they do now.
        s.entries.extend(self.overlay.iter().map(|(k, v)| (*k, *v)));
        s
    }

    /// Rebuild the working space map so that it marks exactly the fixed area and `in_use`
    /// (tree nodes, data, tables) as used. When the open transaction changed nothing, `in_use`
    /// is also what the durable version uses, so bitmaps that cannot be read are rebuilt
    /// from it for both versions (else they hand out nothing before the repair commits).
    pub fn repair_space(&mut self, in_use: &[BlockNo]) -> PResult<Reconciled> {
        self.refuse_if_frozen()?;
        let unchanged = self.pending.dirty_nodes() == 0 && self.map.unchanged();
        let fixed = Self::fixed_blocks(self.header.blocks);
        let mut want: Vec<BlockNo> = (0..fixed).collect();
        want.extend(in_use.iter().filter(|&&b| b >= fixed));
        want.sort_unstable();
        want.dedup();
        self.map.reconcile(&self.io, &want, unchanged)
    }

    /// Replace the tree by a new one holding `salvaged`'s entries (the working version's space
    /// map must already mark every block the old tree and the data use: [`Meta::repair_space`]
    /// first, so no new node lands on one). The old tree's blocks are freed, to be handed out
    /// once the new version is durable. The broken mark of a failed transaction is cleared:
    /// this transaction starts from the durable version.
    pub fn rebuild_tree(&mut self, salvaged: &btree::Salvage) -> PResult<()> {
        self.refuse_if_frozen()?;
        self.broken = None;
        self.pending = Pending::new(None, self.header.txn);
        self.nodes = 0;
        // `salvaged` holds the overlay's entries too (see [`Meta::salvage`]).
        self.overlay.clear();
        let selectors: Vec<(Key, Value)> = (0..SpaceMap::bitmaps_for(self.header.blocks) as u32)
            .map(|i| (selector_key(i), self.map.selector(i).encode()))
            .collect();
        self.change(|t| {
            for (k, v) in salvaged.entries.iter().chain(&selectors) {
                t.insert(*k, *v)?;
            }
            Ok(())
        })?;
        // Held until the new version is durable even where the durable space map (wrongly)
        // says free: a crash before then goes back to the old tree.
        for &b in &salvaged.blocks {
            if self.map.is_used(&self.io, b)? {
                self.map.release(&self.io, b)?;
            }
        }
        Ok(())
    }

    /// Every block is used by exactly one thing: the fixed area, a node of the tree; and the
    /// space map says so, no more (a leak) and no less (a block used twice waiting to happen).
    /// `data` are the blocks the caller's entries point at (none for a bare tree). Runs on
    /// the durable version.
    pub fn check(&mut self, data: &[BlockNo]) -> PResult<btree::TreeReport> {
        let report = btree::check(&self.committed())?;
        self.check_stamps(&report.blocks)?;
        let used = self.map.used_blocks(&self.io)?;
        self.compare(report, used, data, self.header.nodes)
    }

    /// Every node of the durable version was written by a transaction before the one its
    /// header opened. A node stamped later sits in a block the durable version uses, written
    /// over before a header that frees it was durable (the ordering rule broken): its
    /// checksum and block number are right, so only its stamp tells.
    fn check_stamps(&self, blocks: &[BlockNo]) -> PResult<()> {
        let mut buf = vec![0u8; NODE_SIZE];
        for &block in blocks {
            self.io
                .read_block(block, &mut buf)
                .map_err(|source| PdataError::Io { block, source })?;
            let txn = Node::stamped_txn(&buf);
            if txn >= self.header.txn {
                return Err(PdataError::Corrupt {
                    block,
                    what: format!(
                        "a node written by transaction {txn}, not before the durable \
                         version's header ({})",
                        self.header.txn
                    ),
                });
            }
        }
        Ok(())
    }

    /// [`Meta::check`] of the working version: the durable one plus the open transaction.
    pub fn check_working(&mut self, data: &[BlockNo]) -> PResult<btree::TreeReport> {
        let report = btree::check(&self.view())?;
        let used = self.map.working_used_blocks(&self.io)?;
        self.compare(report, used, data, self.nodes)
    }

    fn compare(
        &self,
        report: btree::TreeReport,
        used: Vec<BlockNo>,
        data: &[BlockNo],
        nodes: u64,
    ) -> PResult<btree::TreeReport> {
        if report.blocks.len() as u64 != nodes {
            return Err(PdataError::Corrupt {
                block: 0,
                what: format!(
                    "the header counts {nodes} tree nodes, the tree has {}",
                    report.blocks.len()
                ),
            });
        }
        let mut want: Vec<BlockNo> = (0..Self::fixed_blocks(self.header.blocks)).collect();
        want.extend(&report.blocks);
        want.extend(data);
        want.sort_unstable();
        if let Some(w) = want.windows(2).find(|w| w[0] == w[1]) {
            return Err(PdataError::Corrupt {
                block: w[0],
                what: "used twice".into(),
            });
        }
        if used != want {
            let leaked = used.iter().find(|b| want.binary_search(b).is_err());
            let lost = want.iter().find(|b| used.binary_search(b).is_err());
            return Err(PdataError::Corrupt {
                block: leaked.or(lost).copied().unwrap_or(0),
                what: format!(
                    "space map disagrees with the tree: {} blocks marked used, {} in use \
                     (first leaked {leaked:?}, first in use but free {lost:?})",
                    used.len(),
                    want.len()
                ),
            });
        }
        Ok(report)
    }
}

/// A zeroed device on a simulated machine, for the key spaces' tests: format and reopen.
#[cfg(test)]
pub(crate) struct SimDevice {
    machine: crate::crashsim::SimMachine,
    blocks: u64,
}

#[cfg(test)]
impl SimDevice {
    const PATH: &'static str = "/sim/meta";

    pub fn new(blocks: u64) -> SimDevice {
        let machine = crate::crashsim::SimMachine::new();
        machine.add_disk(
            std::path::Path::new(Self::PATH),
            vec![0u8; (blocks * NODE_SIZE as u64) as usize],
            false,
        );
        SimDevice { machine, blocks }
    }

    fn dev(&self) -> Arc<dyn BlockDev> {
        self.machine
            .disk(std::path::Path::new(Self::PATH))
            .expect("the disk")
    }

    pub fn format(&self, cache_bytes: u64) -> Meta {
        Meta::format(self.dev(), self.blocks, cache_bytes).unwrap()
    }

    pub fn open(&self, cache_bytes: u64) -> Meta {
        Meta::open(self.dev(), cache_bytes).unwrap()
    }
}

#[cfg(test)]
mod tests;
