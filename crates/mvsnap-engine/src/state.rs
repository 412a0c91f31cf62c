//! The engine's metadata state and the one function, [`State::apply`], that changes it from a
//! journal record, so that live operations and recovery go through exactly the same code.
//!
//! Format v2: the index lives in the store's copy-on-write B+tree (`pdata`), read through a
//! bounded cache; records change the tree's open transaction, and a tree commit (commit.rs)
//! makes it durable with one root flip. What stays in RAM is one row per origin, snapshot and
//! snapshot-tree node (the *tables*, written whole at each tree commit) plus the counters that
//! `list` reads.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::blockdev::BlockDev;
use crate::codec::{Reader, Writer};
use crate::expiring::ExpiringMap;
use crate::format::Geometry;
use crate::journal::Record;
use crate::pdata::btree::{self, BlockAlloc, Txn};
use crate::pdata::meta::Meta;
use crate::pdata::node::{Key, Value};
use crate::pdata::overlay::FrozenOverlay;
use crate::pdata::snapdata::{self, Nodes};
use crate::pdata::{preserved, written, PdataError};
use crate::types::{Event, EventKind, SnapshotState};

/// How many of the newest events the tables keep.
const TABLE_EVENTS: usize = 100;
/// Events are cut to this many bytes, so their share of the tables is bounded.
pub const MAX_EVENT_LEN: usize = 256;
/// The slot of an entry whose block reads as zeroes (a hole, or zero data, in the origin when
/// it was preserved; or a zeroed block of a writable snapshot): it owns no space.
pub const ZERO_SLOT: u32 = u32::MAX - 1;
/// "No parent" in the stored node table (ids are handed out downwards from u32::MAX).
const NO_NODE: u32 = 0;
/// An overlay entry in the tables: its key, then its value.
const TABLE_OVERLAY_ENTRY: usize = KEY_LEN + VALUE_LEN;
const KEY_LEN: usize = std::mem::size_of::<Key>();
const VALUE_LEN: usize = std::mem::size_of::<Value>();

pub struct Origin {
    pub no: u32,
    pub id: String,
    pub path: String,
    pub size: u64,
    /// Generation of the newest snapshot taken of the origin itself.
    pub gen: u32,
    /// Live (valid) snapshots per generation; a snapshot of a snapshot shares its generation.
    pub live_gens: BTreeMap<u32, u32>,
    /// Preserved blocks holding data, per generation range: the counters `list` reads.
    pub ranges: BTreeMap<(u32, u32), u64>,
    /// Preserved zero entries per generation range. They own no space, so `list` leaves them
    /// out, but a crash mid-reclaim leaves them too and open must find them (`has_dead_range`).
    pub zero_ranges: BTreeMap<(u32, u32), u64>,
    /// Preserved entries (data and zero).
    pub entries: u64,
    /// Opened device, or why it could not be opened (a missing file, a changed size).
    pub dev: Result<Arc<dyn BlockDev>, String>,
    /// The size found at open when it is not the recorded one (changed behind mvsnap's back).
    pub found_size: Option<u64>,
    /// Origin writes hold it shared; snapshot creation takes it exclusively: a short barrier.
    pub gate: Arc<parking_lot::RwLock<()>>,
}

impl Origin {
    /// Whether its device is there as it was bound (`dev` says why not).
    pub fn availability(&self) -> crate::types::OriginState {
        match self.dev {
            Ok(_) => crate::types::OriginState::Online,
            Err(_) => crate::types::OriginState::Unavailable,
        }
    }

    /// A live snapshot generation in `lo..=hi` exists.
    pub fn any_live(&self, lo: u32, hi: u32) -> bool {
        lo <= hi && self.live_gens.range(lo..=hi).next().is_some()
    }

    /// Some preserved entry (data or zero) lies in a generation range no live snapshot is in:
    /// reclaim has work here.
    pub fn has_dead_range(&self) -> bool {
        self.ranges
            .keys()
            .chain(self.zero_ranges.keys())
            .any(|&(lo, hi)| self.live_gens.range(lo..=hi).next().is_none())
    }
}

/// Epochs a first write looks back through in the written bitmaps before it reads the
/// block's preserved entries instead.
const LOOKBACK_EPOCHS: u32 = 8;

/// The generation through which `chunk` of `o` needs no new copy, for a first write of it in
/// epoch `o.gen`: the newest epoch before `o.gen` that wrote it, from the written bitmaps
/// (small, and cached), not the newest preserved entry's `hi` (a leaf of the big index,
/// often not cached: at 4M mappings the lookup that read the store on most first writes).
///
/// It may be newer than that `hi`, never older, and no live generation lies between the
/// two, so the copy the write makes for the generations after it neither overlaps an entry
/// nor misses a live snapshot:
/// - a `Preserve` marks its block in `W(hi)` with the entry; reclaim only lowers `hi`, past
///   dead generations; `W` never loses a bit (see [`written::merge_into`]);
/// - a write that marked the block in epoch `e` either preserved it through `e`, or found
///   no live generation since the previous copy (`mark_done`); and no generation older than
///   the newest becomes live later (a snapshot of a snapshot takes a live one's).
///
/// Further back than [`LOOKBACK_EPOCHS`], the entries themselves.
pub(crate) fn preserved_through(
    v: &dyn btree::View,
    o: &Origin,
    chunk: u64,
) -> Result<u32, PdataError> {
    match written::last_marked_before(v, o.no, chunk, o.gen, LOOKBACK_EPOCHS)? {
        Some(epoch) => Ok(epoch),
        None => preserved::preserved_through(v, o.no, chunk),
    }
}

pub struct Snap {
    pub id: u64,
    pub origin: u32,
    /// 0: taken from the origin.
    pub parent: u64,
    pub gen: u32,
    pub tag: String,
    pub memo: String,
    pub created: u64,
    pub writable: bool,
    pub state: SnapshotState,
    pub reason: Option<String>,
    pub children: u32,
    /// Its leaf in the snapshot-tree nodes (key space `S`); [`NO_NODE`] once released.
    pub node: u32,
}

/// Where a snapshot finds a block of its own (written to it or to an ancestor volume).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapHit {
    pub slot: u32,
    /// The key is the snapshot's own: it may be overwritten in place once settled.
    pub own: bool,
}

pub struct State {
    pub geo: Geometry,
    pub origins: BTreeMap<u32, Origin>,
    pub snaps: BTreeMap<u64, Snap>,
    pub next_origin_no: u32,
    pub next_snap_id: u64,
    /// The tree, its space map and the open transaction.
    pub meta: Meta,
    /// The snapshot tree's nodes (writable snapshots and their descendants).
    pub nodes: Nodes,
    /// Keys per node, for `mappings` and space usage.
    pub node_keys: HashMap<u32, u64>,
    /// Nodes of deleted writable snapshots whose keys are still in the tree (node -> origin):
    /// dropping them walks that origin's `S` keys, so background reclaim does it in batches
    /// (`Record::Reclaim`) rather than the delete. Node ids are never reused, so a dead
    /// node's keys are never read again; its `node_keys` count says how many remain.
    pub dead_nodes: BTreeMap<u32, u32>,
    /// Blocks of the tables the durable version points at (freed by the next tree commit).
    pub table_blocks: Vec<u64>,
    /// Data blocks records released since the last tree commit: freed in the space map at
    /// that commit, never before (a crash goes back to a version that may still use them).
    pub deferred_frees: Vec<u64>,
    /// Slots that records not yet settled point at, with the newest such record: their data
    /// must not change in place (recovery may verify it).
    pub unsettled_slots: ExpiringMap<u32>,
    /// Preserves whose record is not yet durable: an origin write to that chunk must wait.
    pub inflight_preserves: ExpiringMap<(u32, u64)>,
    /// Per origin, the journal sequence of its latest record that released snapshots from
    /// needing its data: an `Invalidate` (a full store) or a `SnapshotDelete`. Until it is
    /// durable no write of that origin may reach the disk: the write that needed the copy and
    /// every later one that skips a copy-out because the snapshot is invalid or gone now (a
    /// crash would bring the snapshot back, valid, over new data).
    pub release_seq: BTreeMap<u32, u64>,
    /// Nothing is journaled or committed (an ephemeral store): frees are reusable at once.
    pub ephemeral: bool,
    /// Data blocks handed out whose record is not logged yet (a copy being written): a tree
    /// commit meanwhile must not make them used in the durable version (nothing there points
    /// at them), nor hand them to anyone else.
    pub unlogged: Vec<u32>,
    /// Origin blocks (origin, block) whose copy-out is being made outside the state lock: a
    /// writer of one waits for it (`Inner::wait_copies`).
    pub copying: std::collections::HashSet<(u32, u64)>,
}

/// Why a record could not be applied: the journal or tables contradict the state.
pub type ApplyError = String;

fn perr(e: PdataError) -> ApplyError {
    e.to_string()
}

fn loc_of(slot: u32) -> u64 {
    if slot == ZERO_SLOT {
        preserved::ZERO
    } else {
        slot as u64
    }
}

fn slot_of(loc: u64) -> u32 {
    if loc == preserved::ZERO {
        ZERO_SLOT
    } else {
        loc as u32
    }
}

/// The twin of [`read_range_counts`].
fn write_range_counts(w: &mut Writer, counts: &BTreeMap<(u32, u32), u64>) {
    w.u32(counts.len() as u32);
    for (&(lo, hi), &n) in counts {
        w.u32(lo);
        w.u32(hi);
        w.u64(n);
    }
}

/// Per-generation-range counts as the tables store them: n u32, n x (lo u32, hi u32, count u64).
fn read_range_counts(r: &mut Reader) -> Option<BTreeMap<(u32, u32), u64>> {
    let n = r.u32()?;
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let key = (r.u32()?, r.u32()?);
        counts.insert(key, r.u64()?);
    }
    Some(counts)
}

/// Remove every key of `origin` in key space `space`; returns the data locations they held.
fn drop_origin_space<A: BlockAlloc>(
    t: &mut Txn<A>,
    space: u8,
    origin: u32,
    loc: impl Fn(&[u8; 16]) -> Option<u64>,
) -> Result<Vec<u64>, PdataError> {
    let mut from: Key = [0; 16];
    from[0] = space;
    from[1..4].copy_from_slice(&origin.to_be_bytes()[1..]);
    let mut keys = Vec::new();
    let mut locs = Vec::new();
    btree::for_each_from(&*t, &from, &mut |k, v| {
        if k[..4] != from[..4] {
            return false;
        }
        keys.push(*k);
        locs.extend(loc(v));
        true
    })?;
    for k in keys {
        t.remove(&k)?;
    }
    Ok(locs)
}

impl State {
    pub fn new(geo: Geometry, meta: Meta) -> State {
        State {
            geo,
            origins: BTreeMap::new(),
            snaps: BTreeMap::new(),
            next_origin_no: 1,
            next_snap_id: 1,
            meta,
            nodes: Nodes::new(),
            node_keys: HashMap::new(),
            dead_nodes: BTreeMap::new(),
            table_blocks: Vec::new(),
            deferred_frees: Vec::new(),
            unsettled_slots: ExpiringMap::default(),
            inflight_preserves: ExpiringMap::default(),
            release_seq: BTreeMap::new(),
            ephemeral: false,
            unlogged: Vec::new(),
            copying: Default::default(),
        }
    }

    /// The journal sequence no write of origin `no` may pass before it is durable (see
    /// `release_seq`); 0 when there is none.
    pub fn release_barrier(&self, no: u32) -> u64 {
        self.release_seq.get(&no).copied().unwrap_or(0)
    }

    pub fn origin_by_id(&self, id: &str) -> Option<&Origin> {
        self.origins.values().find(|o| o.id == id)
    }

    pub fn snap_by_tag(&self, origin: u32, tag: &str) -> Option<&Snap> {
        self.snaps
            .values()
            .find(|s| s.origin == origin && s.tag == tag && s.state != SnapshotState::Hidden)
    }

    // ----- reads of the index (the open transaction's view) -----

    /// Whether an origin write to chunks `first..=last` may need a copy-out: one lookup per
    /// 128 chunks of the newest epoch's written bitmap, usually in a cached leaf.
    pub fn needs_preserve(&self, o: &Origin, first: u64, last: u64) -> Result<bool, PdataError> {
        if !o.any_live(1, o.gen) {
            return Ok(false);
        }
        let v = self.meta.view();
        let mut c = first;
        while c <= last {
            let region = c / written::REGION;
            let end = last.min((region + 1) * written::REGION - 1);
            let bits = written::region_bits(&v, o.no, o.gen, region)?;
            let (lo, n) = (c % written::REGION, end - c + 1);
            let mask = if n == written::REGION {
                u128::MAX
            } else {
                ((1u128 << n) - 1) << lo
            };
            if bits & mask != mask {
                return Ok(true);
            }
            c = end + 1;
        }
        Ok(false)
    }

    /// The metadata nodes a first write of chunks `first..=last` of `o` would read from the
    /// store (the epoch's written bits, then the preserved entries of the chunks not written
    /// yet), as far as the nodes in RAM lead: to be read without the state lock
    /// ([`crate::pdata::meta::NodeFetcher`]) before the write takes it. Empty: nothing to read.
    pub fn first_write_misses(&self, o: &Origin, first: u64, last: u64) -> Vec<(u64, u32)> {
        if !o.any_live(1, o.gen) {
            return Vec::new();
        }
        let v = self.meta.probe_view();
        for region in first / written::REGION..=last / written::REGION {
            // Errors other than a miss show up again on the write's own lookups.
            let Ok(bits) = written::region_bits(&v, o.no, o.gen, region) else {
                continue;
            };
            let lo = first.max(region * written::REGION);
            let hi = last.min((region + 1) * written::REGION - 1);
            for c in lo..=hi {
                if bits & (1u128 << (c % written::REGION)) == 0 {
                    let _ = preserved_through(&v, o, c);
                }
            }
        }
        // The leaf the write's preserve makes the fold take next.
        let _ = btree::probe_fold(&v);
        v.into_missed()
    }

    /// The metadata nodes a read of chunks `first..=last` of snapshot `s` would read from the
    /// store (what [`State::map_get`] and [`State::preserved_lookup`] look up), as far as the
    /// nodes in RAM lead: see [`State::first_write_misses`]. Unlike a plan on a probe view,
    /// which stops at its first miss, every chunk's.
    pub fn read_misses(&self, s: &Snap, first: u64, last: u64) -> Vec<(u64, u32)> {
        let v = self.meta.probe_view();
        let own_data = self.has_own_data(s);
        let preserved = self.origins.get(&s.origin).is_some_and(|o| o.entries > 0);
        for c in first..=last {
            if own_data
                && !matches!(
                    snapdata::lookup_owner(&v, &self.nodes, s.origin, c, s.node),
                    Ok(None)
                )
            {
                // Found (no more to look up), or missed (looked up again next round).
                continue;
            }
            if preserved {
                let _ = preserved::lookup(&v, s.origin, c, s.gen);
            }
        }
        v.into_missed()
    }

    /// Chunks `first..=last` need nothing more in the newest epoch (not journaled: after a
    /// crash the first write finds it out again).
    pub fn mark_done(&mut self, no: u32, gen: u32, chunk: u64) -> Result<(), PdataError> {
        self.meta
            .change(|t| written::mark(t, no, gen, chunk, 1).map(|_| ()))
    }

    /// The generation through which `chunk` of `o` needs no new copy: a first write of it in
    /// epoch `o.gen` copies it for the live generations after this one. See
    /// [`preserved_through`].
    pub fn preserved_through(&self, o: &Origin, chunk: u64) -> Result<u32, PdataError> {
        preserved_through(&self.meta.view(), o, chunk)
    }

    /// The slot (or [`ZERO_SLOT`]) a snapshot of generation `gen` reads `chunk` from, if it
    /// was preserved.
    pub fn preserved_lookup(
        &self,
        no: u32,
        chunk: u64,
        gen: u32,
    ) -> Result<Option<u32>, PdataError> {
        Self::preserved_lookup_in(&self.meta.view(), no, chunk, gen)
    }

    /// [`State::preserved_lookup`] on view `v` (a probe's, say).
    pub fn preserved_lookup_in(
        v: &dyn btree::View,
        no: u32,
        chunk: u64,
        gen: u32,
    ) -> Result<Option<u32>, PdataError> {
        Ok(preserved::lookup(v, no, chunk, gen)?.map(slot_of))
    }

    /// A snapshot's own data for `chunk` (written to it or to the volume it was taken of).
    pub fn map_get(&self, s: &Snap, chunk: u64) -> Result<Option<MapHit>, PdataError> {
        self.map_get_in(&self.meta.view(), s, chunk)
    }

    /// [`State::map_get`] on view `v`.
    pub fn map_get_in(
        &self,
        v: &dyn btree::View,
        s: &Snap,
        chunk: u64,
    ) -> Result<Option<MapHit>, PdataError> {
        if s.node == NO_NODE {
            return Ok(None);
        }
        Ok(
            snapdata::lookup_owner(v, &self.nodes, s.origin, chunk, s.node)?.map(|(node, loc)| {
                MapHit {
                    slot: slot_of(loc),
                    own: node == s.node,
                }
            }),
        )
    }

    /// Whether any node on the snapshot's path holds keys: if not, its reads skip key space
    /// `S` (a read-only snapshot of the origin never has any).
    pub fn has_own_data(&self, s: &Snap) -> bool {
        let mut cur = Some(s.node).filter(|&n| n != NO_NODE);
        while let Some(x) = cur {
            if self.node_keys.get(&x).is_some_and(|&n| n > 0) {
                return true;
            }
            cur = self.nodes.parent_of(x);
        }
        false
    }

    // ----- space -----

    /// A free data block (4 KiB), or None when none may be handed out now.
    pub fn alloc_block(&mut self) -> Result<Option<u32>, PdataError> {
        let b = self.meta.alloc_block()?.map(|b| b as u32);
        self.unlogged.extend(b);
        Ok(b)
    }

    /// Give back a block that no record names (a copy-out that failed): free at once.
    pub fn free_unlogged(&mut self, slot: u32) -> Result<(), PdataError> {
        self.logged(slot);
        self.meta.free_block(slot as u64)
    }

    /// The block a record names is referenced now: no longer set aside by a commit.
    fn logged(&mut self, slot: u32) {
        if let Some(i) = self.unlogged.iter().position(|&s| s == slot) {
            self.unlogged.swap_remove(i);
        }
    }

    fn defer_free(&mut self, loc: u64) {
        if loc == preserved::ZERO {
            return;
        }
        if self.ephemeral {
            // No record names it on disk: it may be used again at once.
            if let Err(e) = self.meta.free_block(loc) {
                tracing::warn!("block {loc} not freed: {e}");
            }
        } else {
            self.deferred_frees.push(loc);
        }
    }

    /// Apply one record; `seq` is its journal sequence. The blocks it names are taken already:
    /// by the live path, or, in recovery, by the replay's claim of every block the journal
    /// names. What it releases waits for the next tree commit.
    pub fn apply(&mut self, rec: &Record, seq: u64) -> Result<(), ApplyError> {
        match rec {
            Record::OriginAdd { no, id, path, size } => {
                if self.origins.contains_key(no) || self.origin_by_id(id).is_some() {
                    return Err(format!("origin {id} added twice"));
                }
                if *no >= preserved::MAX_ORIGINS {
                    return Err(format!("origin number {no} is out of range"));
                }
                self.origins.insert(
                    *no,
                    Origin {
                        no: *no,
                        id: id.clone(),
                        path: path.clone(),
                        size: *size,
                        gen: 0,
                        live_gens: BTreeMap::new(),
                        ranges: BTreeMap::new(),
                        zero_ranges: BTreeMap::new(),
                        entries: 0,
                        dev: Err("not opened".into()),
                        found_size: None,
                        gate: Arc::new(parking_lot::RwLock::new(())),
                    },
                );
                self.next_origin_no = self.next_origin_no.max(no + 1);
            }
            Record::OriginRemove { no } => {
                self.origins
                    .remove(no)
                    .ok_or("remove of an unknown origin")?;
                let no = *no;
                let freed = self
                    .meta
                    .change(|t| {
                        let mut freed = drop_origin_space(t, preserved::SPACE, no, |v| {
                            Some(u64::from_le_bytes(v[8..16].try_into().unwrap()))
                        })?;
                        freed.extend(drop_origin_space(t, snapdata::SPACE, no, |v| {
                            Some(u64::from_le_bytes(v[..8].try_into().unwrap()))
                        })?);
                        drop_origin_space(t, written::SPACE, no, |_| None)?;
                        Ok(freed)
                    })
                    .map_err(perr)?;
                for l in freed {
                    self.defer_free(l);
                }
                // Their keys went with the origin's.
                self.dead_nodes.retain(|&node, &mut o| {
                    if o == no {
                        self.node_keys.remove(&node);
                    }
                    o != no
                });
            }
            Record::SnapshotCreate { time, snaps } => {
                for ns in snaps {
                    let o = self
                        .origins
                        .get_mut(&ns.origin)
                        .ok_or("snapshot of an unknown origin")?;
                    let node = if ns.parent == 0 {
                        if ns.gen != o.gen + 1 {
                            return Err(format!("snapshot generation {} after {}", ns.gen, o.gen));
                        }
                        o.gen = ns.gen;
                        self.nodes.root()
                    } else {
                        let p = self
                            .snaps
                            .get_mut(&ns.parent)
                            .ok_or("snapshot of an unknown snapshot")?;
                        if p.gen != ns.gen || p.origin != ns.origin {
                            return Err("snapshot of a snapshot with a different generation".into());
                        }
                        if p.node == NO_NODE {
                            return Err("snapshot of a released snapshot".into());
                        }
                        // The parent's leaf freezes; both go on from new leaves under it.
                        let (keep, child) = self.nodes.fork(p.node);
                        p.node = keep;
                        p.children += 1;
                        child
                    };
                    *o.live_gens.entry(ns.gen).or_insert(0) += 1;
                    self.snaps.insert(
                        ns.id,
                        Snap {
                            id: ns.id,
                            origin: ns.origin,
                            parent: ns.parent,
                            gen: ns.gen,
                            tag: ns.tag.clone(),
                            memo: ns.memo.clone(),
                            created: *time,
                            writable: ns.writable,
                            state: SnapshotState::Valid,
                            reason: None,
                            children: 0,
                            node,
                        },
                    );
                    self.next_snap_id = self.next_snap_id.max(ns.id + 1);
                }
            }
            Record::SnapshotDelete { id } => {
                let s = self
                    .snaps
                    .get_mut(id)
                    .ok_or("delete of an unknown snapshot")?;
                if s.state == SnapshotState::Hidden {
                    return Err("delete of a deleted snapshot".into());
                }
                let was_valid = s.state == SnapshotState::Valid;
                s.state = SnapshotState::Hidden;
                let (origin, gen) = (s.origin, s.gen);
                if was_valid {
                    self.unlive(origin, gen);
                }
                self.release_node(*id)?;
                self.drop_hidden(*id);
            }
            Record::Preserve {
                origin,
                chunk,
                lo,
                hi,
                slot,
                bits,
                ..
            } => {
                let o = self
                    .origins
                    .get(origin)
                    .ok_or("preserve for an unknown origin")?;
                if *bits != self.geo.full_bits() || *chunk >= self.geo.chunks_for(o.size) {
                    return Err(format!(
                        "preserve of chunk {chunk} bits {bits:#x} is out of range"
                    ));
                }
                self.logged(*slot);
                let (no, c, lo, hi, loc) = (*origin, *chunk, *lo, *hi, loc_of(*slot));
                self.meta
                    .change(|t| {
                        preserved::add(t, no, c, lo, hi, loc)?;
                        written::mark(t, no, hi, c, 1).map(|_| ())
                    })
                    .map_err(perr)?;
                self.meta.fold_if_full().map_err(perr)?;
                let o = self.origins.get_mut(origin).unwrap();
                o.entries += 1;
                if *slot != ZERO_SLOT {
                    *o.ranges.entry((lo, hi)).or_default() += 1;
                    self.unsettled_slots.insert(*slot, seq);
                } else {
                    *o.zero_ranges.entry((lo, hi)).or_default() += 1;
                }
            }
            Record::MapWrite {
                snap, chunk, slot, ..
            } => {
                let s = self.snaps.get(snap).ok_or("write to an unknown snapshot")?;
                if s.node == NO_NODE {
                    return Err("write to a released snapshot".into());
                }
                let size = self.origins.get(&s.origin).map_or(0, |o| o.size);
                if *chunk >= self.geo.chunks_for(size) {
                    return Err(format!("write to chunk {chunk} past the volume's end"));
                }
                let (origin, node, c, loc) = (s.origin, s.node, *chunk, loc_of(*slot));
                self.logged(*slot);
                let replaced = self
                    .meta
                    .change(|t| snapdata::write(t, origin, c, node, loc))
                    .map_err(perr)?;
                match replaced {
                    Some(prev) if prev != loc => self.defer_free(prev),
                    Some(_) => {}
                    None => *self.node_keys.entry(node).or_default() += 1,
                }
                if *slot != ZERO_SLOT {
                    self.unsettled_slots.insert(*slot, seq);
                }
            }
            Record::Invalidate { ids, reason } => {
                for id in ids {
                    let s = self
                        .snaps
                        .get_mut(id)
                        .ok_or("invalidate of an unknown snapshot")?;
                    if s.state != SnapshotState::Valid {
                        continue;
                    }
                    s.state = SnapshotState::Invalid;
                    s.reason = Some(reason.clone());
                    let (origin, gen) = (s.origin, s.gen);
                    self.unlive(origin, gen);
                    self.release_node(*id)?;
                }
            }
            Record::Reclaim {
                origin,
                first,
                last,
            } => {
                let o = self
                    .origins
                    .get_mut(origin)
                    .ok_or("reclaim of an unknown origin")?;
                let no = *origin;
                let live = o.live_gens.clone();
                let mut dropped: Vec<(u32, u32, u64)> = Vec::new();
                let (freed, _) = self
                    .meta
                    .change(|t| {
                        preserved::retain(t, no, *first, *last, &mut |lo, hi, loc| {
                            if live.range(lo..=hi).next().is_some() {
                                Some((lo, hi))
                            } else {
                                dropped.push((lo, hi, loc));
                                None
                            }
                        })
                    })
                    .map_err(perr)?;
                let o = self.origins.get_mut(origin).unwrap();
                for (lo, hi, loc) in dropped {
                    o.entries -= 1;
                    let counters = if loc != preserved::ZERO {
                        &mut o.ranges
                    } else {
                        &mut o.zero_ranges
                    };
                    if let Some(n) = counters.get_mut(&(lo, hi)) {
                        *n -= 1;
                        if *n == 0 {
                            counters.remove(&(lo, hi));
                        }
                    }
                }
                for l in freed {
                    self.defer_free(l);
                }
                if self.has_dead_nodes(no) {
                    let dead = &self.dead_nodes;
                    let is_dead = |n: u32| dead.get(&n) == Some(&no);
                    let dropped = self
                        .meta
                        .change(|t| snapdata::drop_dead(t, no, *first, *last, &is_dead))
                        .map_err(perr)?;
                    for (node, loc) in dropped {
                        if let Some(n) = self.node_keys.get_mut(&node) {
                            *n -= 1;
                            if *n == 0 {
                                self.node_keys.remove(&node);
                                self.dead_nodes.remove(&node);
                            }
                        }
                        self.defer_free(loc);
                    }
                }
            }
        }
        Ok(())
    }

    fn unlive(&mut self, origin: u32, gen: u32) {
        if let Some(o) = self.origins.get_mut(&origin) {
            if let Some(n) = o.live_gens.get_mut(&gen) {
                *n -= 1;
                if *n == 0 {
                    o.live_gens.remove(&gen);
                }
            }
        }
    }

    /// A snapshot goes (deleted or invalid): drop its leaf's keys, then every frozen node
    /// above it that no leaf sees any more.
    fn release_node(&mut self, id: u64) -> Result<(), ApplyError> {
        let s = self.snaps.get_mut(&id).expect("caller checked");
        let (origin, leaf) = (s.origin, std::mem::replace(&mut s.node, NO_NODE));
        let mut cur = Some(leaf).filter(|&n| n != NO_NODE && self.nodes.contains(n));
        while let Some(x) = cur {
            let parent = self.nodes.parent_of(x);
            // Its keys go in the background (the caller queues the origin): finding them
            // walks every key of the origin's writable volumes.
            if self.node_keys.get(&x).is_some_and(|&n| n > 0) {
                self.dead_nodes.insert(x, origin);
            } else {
                self.node_keys.remove(&x);
            }
            self.nodes.remove(x);
            cur = parent.filter(|&p| !self.nodes.has_children(p));
        }
        Ok(())
    }

    /// Whether `origin` has keys of deleted writable snapshots left to drop.
    pub fn has_dead_nodes(&self, origin: u32) -> bool {
        self.dead_nodes.values().any(|&o| o == origin)
    }

    /// Forget hidden snapshots without children, walking up their ancestry.
    fn drop_hidden(&mut self, mut id: u64) {
        while let Some(s) = self.snaps.get(&id) {
            if s.state != SnapshotState::Hidden || s.children > 0 {
                return;
            }
            let parent = s.parent;
            self.snaps.remove(&id);
            match self.snaps.get_mut(&parent) {
                Some(p) => {
                    p.children -= 1;
                    id = parent;
                }
                None => return,
            }
        }
    }

    /// Total mappings (preserved entries plus snapshot keys), for info and sizing.
    pub fn mappings(&self) -> u64 {
        self.origins.values().map(|o| o.entries).sum::<u64>() + self.node_keys.values().sum::<u64>()
    }

    /// An upper bound of the tables' length without the events, byte for byte from their
    /// layout (see [`State::events_bytes`]).
    pub fn tables_bound(&self) -> u64 {
        const STR: u64 = 4;
        let origins: u64 = self
            .origins
            .values()
            .map(|o| {
                4 + STR
                    + o.id.len() as u64
                    + STR
                    + o.path.len() as u64
                    + 8
                    + 4
                    + 8
                    + 4
                    + 16 * o.ranges.len() as u64
                    + 8
                    + 16 * o.zero_ranges.len() as u64
            })
            .sum();
        let snaps: u64 = self
            .snaps
            .values()
            .map(|s| {
                8 + 4
                    + 8
                    + 4
                    + STR
                    + s.tag.len() as u64
                    + STR
                    + s.memo.len() as u64
                    + 8
                    + 1
                    + 1
                    + STR
                    + s.reason.as_ref().map_or(0, |r| r.len() as u64)
                    + 4
                    + 4
            })
            .sum();
        let nodes = 8 + 16 * self.nodes.len() as u64;
        let dead = 4 + 16 * self.dead_nodes.len() as u64;
        // The overlay grows with preserves up to its limit (and a few past it between
        // folds): reserve room for all of it.
        let overlay = 8
            + (TABLE_OVERLAY_ENTRY * (self.meta.overlay_len().max(self.meta.overlay_limit()) + 64))
                as u64;
        8 + 4 + 8 + 4 + origins + 4 + snaps + nodes + 4 + dead + 4 + overlay
    }

    /// The tables' bytes for `events` (the newest [`TABLE_EVENTS`] of them are kept).
    pub fn events_bytes(events: &[Event]) -> u64 {
        events[events.len().saturating_sub(TABLE_EVENTS)..]
            .iter()
            .map(|e| 8 + 1 + 4 + e.message.len() as u64)
            .sum()
    }

    /// The tables (everything but the index) for a tree commit.
    pub fn serialize_tables(&self, events: &[Event]) -> Vec<u8> {
        Self::tables_with_overlay(self.tables_head(events), &self.meta.frozen_overlay())
    }

    /// The tables' length with `overlay` after `head` ([`State::tables_with_overlay`]).
    pub fn tables_len(head: &[u8], overlay: &FrozenOverlay) -> usize {
        head.len() + 8 + TABLE_OVERLAY_ENTRY * overlay.len()
    }

    /// The tables: `head` ([`State::tables_head`]), then the overlay's entries (a commit
    /// writes them beside the writers: the overlay is most of the tables at scale).
    pub fn tables_with_overlay(head: Vec<u8>, overlay: &FrozenOverlay) -> Vec<u8> {
        let mut w = Writer::with_capacity(Self::tables_len(&head, overlay));
        w.bytes(&head);
        // The tree's overlay: preserved entries not folded into the tree yet, durable with
        // the version these tables go with. Last again: older tables read as "none".
        w.u64(overlay.len() as u64);
        for (k, v) in overlay.iter() {
            w.bytes(k);
            w.bytes(v);
        }
        w.into_inner()
    }

    /// The tables but the overlay: small (rows of origins, snapshots, nodes, events).
    pub fn tables_head(&self, events: &[Event]) -> Vec<u8> {
        let mut w = Writer::with_capacity(4096);
        w.bytes(b"MVTBL002");
        w.u32(self.next_origin_no);
        w.u64(self.next_snap_id);
        w.u32(self.origins.len() as u32);
        for o in self.origins.values() {
            w.u32(o.no);
            w.str(&o.id);
            w.str(&o.path);
            w.u64(o.size);
            w.u32(o.gen);
            w.u64(o.entries);
            write_range_counts(&mut w, &o.ranges);
        }
        w.u32(self.snaps.len() as u32);
        for s in self.snaps.values() {
            w.u64(s.id);
            w.u32(s.origin);
            w.u64(s.parent);
            w.u32(s.gen);
            w.str(&s.tag);
            w.str(&s.memo);
            w.u64(s.created);
            w.u8(s.writable as u8);
            w.u8(match s.state {
                SnapshotState::Valid => 0,
                SnapshotState::Invalid => 1,
                SnapshotState::Hidden => 2,
            });
            w.str(s.reason.as_deref().unwrap_or(""));
            w.u32(s.children);
            w.u32(s.node);
        }
        let rows = self.nodes.rows();
        w.u32(self.nodes.next_id());
        w.u32(rows.len() as u32);
        for (id, parent) in rows {
            w.u32(id);
            w.u32(parent.unwrap_or(NO_NODE));
            w.u64(self.node_keys.get(&id).copied().unwrap_or(0));
        }
        // The newest events, so `info` shows them in later sessions too.
        let recent = &events[events.len().saturating_sub(TABLE_EVENTS)..];
        w.u32(recent.len() as u32);
        for e in recent {
            w.u64(e.time);
            w.u8(e.kind as u8);
            w.str(&e.message);
        }
        // Last, so tables written before it existed read as "none".
        w.u32(self.dead_nodes.len() as u32);
        for (&node, &origin) in &self.dead_nodes {
            w.u32(node);
            w.u32(origin);
            w.u64(self.node_keys.get(&node).copied().unwrap_or(0));
        }
        // After the dead nodes, for the same reason: tables without it read as "no zero
        // entries counted" (their reclaim after a crash is then left to a later delete).
        w.u32(self.origins.len() as u32);
        for o in self.origins.values() {
            w.u32(o.no);
            write_range_counts(&mut w, &o.zero_ranges);
        }
        w.into_inner()
    }

    /// The state a durable version's tables describe, over its tree.
    pub fn deserialize_tables(
        geo: Geometry,
        meta: Meta,
        buf: &[u8],
    ) -> Result<(State, Vec<Event>), ApplyError> {
        let mut st = State::new(geo, meta);
        let mut r = Reader::new(buf);
        let short = || "tables truncated".to_string();
        if r.bytes(8).ok_or_else(short)? != b"MVTBL002" {
            return Err("tables magic mismatch".into());
        }
        st.next_origin_no = r.u32().ok_or_else(short)?;
        st.next_snap_id = r.u64().ok_or_else(short)?;
        let norigins = r.u32().ok_or_else(short)?;
        for _ in 0..norigins {
            let no = r.u32().ok_or_else(short)?;
            let id = r.str().ok_or_else(short)?;
            let path = r.str().ok_or_else(short)?;
            let size = r.u64().ok_or_else(short)?;
            st.apply(&Record::OriginAdd { no, id, path, size }, 0)?;
            let o = st.origins.get_mut(&no).unwrap();
            o.gen = r.u32().ok_or_else(short)?;
            o.entries = r.u64().ok_or_else(short)?;
            o.ranges = read_range_counts(&mut r).ok_or_else(short)?;
        }
        let nsnaps = r.u32().ok_or_else(short)?;
        for _ in 0..nsnaps {
            let id = r.u64().ok_or_else(short)?;
            let origin = r.u32().ok_or_else(short)?;
            let parent = r.u64().ok_or_else(short)?;
            let gen = r.u32().ok_or_else(short)?;
            let tag = r.str().ok_or_else(short)?;
            let memo = r.str().ok_or_else(short)?;
            let created = r.u64().ok_or_else(short)?;
            let writable = r.u8().ok_or_else(short)? != 0;
            let state = match r.u8().ok_or_else(short)? {
                0 => SnapshotState::Valid,
                1 => SnapshotState::Invalid,
                2 => SnapshotState::Hidden,
                x => return Err(format!("snapshot state {x} unknown")),
            };
            let reason = r.str().ok_or_else(short)?;
            let children = r.u32().ok_or_else(short)?;
            let node = r.u32().ok_or_else(short)?;
            let o = st
                .origins
                .get_mut(&origin)
                .ok_or("snapshot of an unknown origin")?;
            if gen == 0 || gen > o.gen {
                return Err(format!("snapshot {tag}: generation {gen} out of range"));
            }
            if state == SnapshotState::Valid {
                *o.live_gens.entry(gen).or_insert(0) += 1;
            }
            st.snaps.insert(
                id,
                Snap {
                    id,
                    origin,
                    parent,
                    gen,
                    tag,
                    memo,
                    created,
                    writable,
                    state,
                    reason: (!reason.is_empty()).then_some(reason),
                    children,
                    node,
                },
            );
        }
        let next = r.u32().ok_or_else(short)?;
        let nnodes = r.u32().ok_or_else(short)?;
        let mut rows = Vec::with_capacity(nnodes as usize);
        for _ in 0..nnodes {
            let id = r.u32().ok_or_else(short)?;
            let parent = r.u32().ok_or_else(short)?;
            let keys = r.u64().ok_or_else(short)?;
            if id == NO_NODE || id <= next {
                return Err(format!("snapshot node {id} out of range"));
            }
            rows.push((id, (parent != NO_NODE).then_some(parent)));
            if keys > 0 {
                st.node_keys.insert(id, keys);
            }
        }
        st.nodes = Nodes::from_parts(next, rows);
        for s in st.snaps.values() {
            if s.node != NO_NODE && !st.nodes.contains(s.node) {
                return Err(format!(
                    "snapshot {} names an unknown node {}",
                    s.tag, s.node
                ));
            }
        }
        let nevents = r.u32().ok_or_else(short)?;
        let mut events = Vec::new();
        for _ in 0..nevents {
            let time = r.u64().ok_or_else(short)?;
            let kind = match r.u8().ok_or_else(short)? {
                0 => EventKind::LowSpace,
                1 => EventKind::Grown,
                2 => EventKind::SnapshotInvalidated,
                4 => EventKind::Poisoned,
                _ => EventKind::Corruption,
            };
            events.push(Event {
                time,
                kind,
                message: r.str().ok_or_else(short)?,
            });
        }
        if r.remaining() != 0 {
            let ndead = r.u32().ok_or_else(short)?;
            for _ in 0..ndead {
                let node = r.u32().ok_or_else(short)?;
                let origin = r.u32().ok_or_else(short)?;
                let keys = r.u64().ok_or_else(short)?;
                if node == NO_NODE || node <= st.nodes.next_id() || st.nodes.contains(node) {
                    return Err(format!("deleted snapshot node {node} out of range"));
                }
                if !st.origins.contains_key(&origin) || keys == 0 {
                    return Err(format!(
                        "deleted snapshot node {node}: origin {origin}, {keys} keys"
                    ));
                }
                st.dead_nodes.insert(node, origin);
                st.node_keys.insert(node, keys);
            }
        }
        if r.remaining() != 0 {
            let norigins = r.u32().ok_or_else(short)?;
            for _ in 0..norigins {
                let no = r.u32().ok_or_else(short)?;
                let o = st
                    .origins
                    .get_mut(&no)
                    .ok_or_else(|| format!("zero entry counters of an unknown origin {no}"))?;
                o.zero_ranges = read_range_counts(&mut r).ok_or_else(short)?;
            }
        }
        if r.remaining() != 0 {
            let n = r.u64().ok_or_else(short)?;
            if n > (r.remaining() / TABLE_OVERLAY_ENTRY) as u64 {
                return Err(format!("{n} overlay entries in a shorter stream"));
            }
            let mut entries = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let k: Key = r.bytes(KEY_LEN).ok_or_else(short)?.try_into().unwrap();
                let v: Value = r.bytes(VALUE_LEN).ok_or_else(short)?.try_into().unwrap();
                match preserved::key_origin(&k) {
                    Some(no) if st.origins.contains_key(&no) => entries.push((k, v)),
                    _ => return Err("an overlay entry outside the preserved entries".into()),
                }
            }
            st.meta.load_overlay(entries);
        }
        if r.remaining() != 0 {
            return Err("tables have trailing bytes".into());
        }
        Ok((st, events))
    }
}
