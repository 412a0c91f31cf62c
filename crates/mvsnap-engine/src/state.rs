//! The engine's metadata state and the one function, [`State::apply`], that changes it from a
//! journal record, so that live operations and recovery go through exactly the same code.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::alloc::Allocator;
use crate::blockdev::BlockDev;
use crate::codec::{Reader, Writer};
use crate::expiring::ExpiringMap;
use crate::format::Geometry;
use crate::index::ZERO_SLOT;
use crate::index::{MapEntry, PreserveIndex, VolumeMap};
use crate::journal::Record;
use crate::types::{Event, EventKind, SnapshotState};

/// Bytes of one preserved entry in a checkpoint: chunk u64, lo u32, hi u32, slot u32, bits u64.
const PRESERVED_ENTRY: u64 = 28;
/// Bytes of one snapshot mapping in a checkpoint: chunk u64, slot u32, bits u64.
const SNAP_ENTRY: u64 = 20;
/// How many of the newest events a checkpoint keeps.
const CHECKPOINT_EVENTS: usize = 100;
/// Events are cut to this many bytes, so their share of a checkpoint is bounded.
pub const MAX_EVENT_LEN: usize = 256;

pub struct Origin {
    pub no: u32,
    pub id: String,
    pub path: String,
    pub size: u64,
    /// Generation of the newest snapshot taken of the origin itself.
    pub gen: u32,
    /// Live (valid) snapshots per generation; a snapshot of a snapshot shares its generation.
    pub live_gens: BTreeMap<u32, u32>,
    pub pindex: PreserveIndex,
    /// Opened device, or why it could not be opened (a missing file, a changed size).
    pub dev: Result<Arc<dyn BlockDev>, String>,
    /// The size found at open when it is not the recorded one (changed behind mvsnap's back).
    pub found_size: Option<u64>,
    /// Origin writes hold it shared; snapshot creation takes it exclusively: a short barrier.
    pub gate: Arc<parking_lot::RwLock<()>>,
}

impl Origin {
    /// A live snapshot generation in `lo..=hi` exists.
    pub fn any_live(&self, lo: u32, hi: u32) -> bool {
        lo <= hi && self.live_gens.range(lo..=hi).next().is_some()
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
    pub map: VolumeMap,
}

pub struct State {
    pub geo: Geometry,
    pub origins: BTreeMap<u32, Origin>,
    pub snaps: BTreeMap<u64, Snap>,
    pub next_origin_no: u32,
    pub next_snap_id: u64,
    pub alloc: Allocator,
    /// Slots of the checkpoint the superblock points at.
    pub ckpt_slots: Vec<u32>,
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
}

/// Why a record could not be applied: the journal or checkpoint contradicts the state.
pub type ApplyError = String;

impl State {
    pub fn new(geo: Geometry, nslots: u64) -> State {
        State {
            geo,
            origins: BTreeMap::new(),
            snaps: BTreeMap::new(),
            next_origin_no: 1,
            next_snap_id: 1,
            alloc: Allocator::new(nslots),
            ckpt_slots: Vec::new(),
            unsettled_slots: ExpiringMap::default(),
            inflight_preserves: ExpiringMap::default(),
            release_seq: BTreeMap::new(),
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

    /// Claim a slot a record introduces (replay), or accept one the live path already took.
    fn take_slot(&mut self, slot: u32, live: bool) -> Result<(), ApplyError> {
        if live {
            return Ok(());
        }
        if self.alloc.claim(slot) {
            Ok(())
        } else {
            Err(format!(
                "slot {slot} is used twice or lies past the end of the store ({} slots)",
                self.alloc.nslots()
            ))
        }
    }

    /// Apply one record. `seq` is its journal sequence; `live` says the slots it names were
    /// already allocated by the live path; `quarantine` says freed slots wait for settlement.
    pub fn apply(
        &mut self,
        rec: &Record,
        seq: u64,
        live: bool,
        quarantine: bool,
    ) -> Result<(), ApplyError> {
        let settle = quarantine.then_some(seq);
        match rec {
            Record::OriginAdd { no, id, path, size } => {
                if self.origins.contains_key(no) || self.origin_by_id(id).is_some() {
                    return Err(format!("origin {id} added twice"));
                }
                let chunks = self.geo.chunks_for(*size);
                self.origins.insert(
                    *no,
                    Origin {
                        no: *no,
                        id: id.clone(),
                        path: path.clone(),
                        size: *size,
                        gen: 0,
                        live_gens: BTreeMap::new(),
                        pindex: PreserveIndex::new(chunks),
                        dev: Err("not opened".into()),
                        found_size: None,
                        gate: Arc::new(parking_lot::RwLock::new(())),
                    },
                );
                self.next_origin_no = self.next_origin_no.max(no + 1);
            }
            Record::OriginRemove { no } => {
                let o = self
                    .origins
                    .remove(no)
                    .ok_or("remove of an unknown origin")?;
                let mut freed = Vec::new();
                o.pindex.for_each(|_, e| {
                    if e.slot != ZERO_SLOT {
                        freed.push(e.slot)
                    }
                });
                for s in freed {
                    self.alloc.decref(s, settle);
                }
            }
            Record::SnapshotCreate { time, snaps } => {
                for ns in snaps {
                    let o = self
                        .origins
                        .get_mut(&ns.origin)
                        .ok_or("snapshot of an unknown origin")?;
                    let map = if ns.parent == 0 {
                        if ns.gen != o.gen + 1 {
                            return Err(format!("snapshot generation {} after {}", ns.gen, o.gen));
                        }
                        o.gen = ns.gen;
                        VolumeMap::new(self.geo.chunks_for(o.size))
                    } else {
                        let p = self
                            .snaps
                            .get_mut(&ns.parent)
                            .ok_or("snapshot of an unknown snapshot")?;
                        if p.gen != ns.gen || p.origin != ns.origin {
                            return Err("snapshot of a snapshot with a different generation".into());
                        }
                        p.children += 1;
                        p.map.clone()
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
                            map,
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
                let map = std::mem::replace(&mut s.map, VolumeMap::new(0));
                if was_valid {
                    self.unlive(origin, gen);
                }
                self.release_map(map, seq, live, settle);
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
                let existing = o.pindex.find(*chunk, *lo, *hi);
                match existing {
                    // A zero entry becomes a real one when a later block of it holds data.
                    Some(e) if e.slot == ZERO_SLOT && *slot != ZERO_SLOT => {
                        self.take_slot(*slot, live)?
                    }
                    Some(e) if e.slot != *slot => return Err("preserve into a second slot".into()),
                    Some(_) => {}
                    None if *slot == ZERO_SLOT => {}
                    None => self.take_slot(*slot, live)?,
                }
                let o = self.origins.get_mut(origin).unwrap();
                o.pindex.add(*chunk, *lo, *hi, *slot, *bits);
                if live && *slot != ZERO_SLOT {
                    self.unsettled_slots.insert(*slot, seq);
                }
            }
            Record::MapWrite {
                snap,
                chunk,
                slot,
                bits,
                ..
            } => {
                let s = self.snaps.get(snap).ok_or("write to an unknown snapshot")?;
                let old = s.map.get(*chunk);
                if old.map(|e| e.slot) != Some(*slot) {
                    self.take_slot(*slot, live)?;
                }
                let s = self.snaps.get_mut(snap).unwrap();
                let alloc = &mut self.alloc;
                let prev = s.map.set(
                    *chunk,
                    MapEntry {
                        slot: *slot,
                        bits: *bits,
                    },
                    &mut |sl| alloc.incref(sl),
                );
                if let Some(p) = prev {
                    if p.slot != *slot {
                        self.drop_ref(p.slot, seq, live, settle);
                    }
                }
                if live {
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
                    let map = std::mem::replace(&mut s.map, VolumeMap::new(0));
                    self.unlive(origin, gen);
                    self.release_map(map, seq, live, settle);
                }
            }
            Record::Reclaim { origin } => {
                let o = self
                    .origins
                    .get_mut(origin)
                    .ok_or("reclaim of an unknown origin")?;
                let live = &o.live_gens;
                let mut freed = Vec::new();
                o.pindex.retain(
                    |_, e| live.range(e.lo..=e.hi).next().is_some(),
                    |_, slot| {
                        if slot != ZERO_SLOT {
                            freed.push(slot)
                        }
                    },
                );
                for s in freed {
                    self.alloc.decref(s, settle);
                }
            }
        }
        Ok(())
    }

    /// Drop one reference to `slot`. A slot still referenced elsewhere may now look exclusive to
    /// its other owner; until this record settles, a crash could bring our reference back, so
    /// the slot counts as unsettled and is not overwritten in place.
    fn drop_ref(&mut self, slot: u32, seq: u64, live: bool, settle: Option<u64>) {
        if live && self.alloc.refcount(slot) > 1 {
            self.unsettled_slots.insert(slot, seq);
        }
        self.alloc.decref(slot, settle);
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

    fn release_map(&mut self, map: VolumeMap, seq: u64, live: bool, settle: Option<u64>) {
        let mut released = Vec::new();
        map.release(&mut |slot| released.push(slot));
        for slot in released {
            self.drop_ref(slot, seq, live, settle);
        }
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

    /// Total mappings (volume map entries plus preserved entries), for info and sizing.
    pub fn mappings(&self) -> u64 {
        self.origins.values().map(|o| o.pindex.len()).sum::<u64>()
            + self.snaps.values().map(|s| s.map.len()).sum::<u64>()
    }

    /// An upper bound of `serialize`'s length, byte for byte from its layout (an estimate
    /// that undercounts lets metadata fill the space its own checkpoint needs: the store then
    /// cannot commit anything, not even a delete).
    pub fn checkpoint_bound(&self) -> u64 {
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
                    + PRESERVED_ENTRY * o.pindex.len()
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
                    + 8
                    + SNAP_ENTRY * s.map.len()
            })
            .sum();
        let events = CHECKPOINT_EVENTS as u64 * (8 + 1 + STR + MAX_EVENT_LEN as u64);
        8 + 4 + 8 + 4 + origins + 4 + snaps + 4 + events
    }

    /// Serialize the whole index for a checkpoint.
    pub fn serialize(&self, events: &[Event]) -> Vec<u8> {
        let mut w = Writer::with_capacity(64 + self.mappings() as usize * 24);
        w.bytes(b"MVCKPT01");
        w.u32(self.next_origin_no);
        w.u64(self.next_snap_id);
        w.u32(self.origins.len() as u32);
        for o in self.origins.values() {
            w.u32(o.no);
            w.str(&o.id);
            w.str(&o.path);
            w.u64(o.size);
            w.u32(o.gen);
            w.u64(o.pindex.len());
            o.pindex.for_each(|chunk, e| {
                w.u64(chunk);
                w.u32(e.lo);
                w.u32(e.hi);
                w.u32(e.slot);
                w.u64(e.bits);
            });
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
            w.u64(s.map.len());
            s.map.for_each(&mut |chunk, e| {
                w.u64(chunk);
                w.u32(e.slot);
                w.u64(e.bits);
            });
        }
        // The newest events, so `info` shows them in later sessions too.
        let recent = &events[events.len().saturating_sub(CHECKPOINT_EVENTS)..];
        w.u32(recent.len() as u32);
        for e in recent {
            w.u64(e.time);
            w.u8(e.kind as u8);
            w.str(&e.message);
        }
        w.into_inner()
    }

    /// Rebuild the index from a checkpoint, claiming every slot it references.
    pub fn deserialize(
        geo: Geometry,
        nslots: u64,
        buf: &[u8],
    ) -> Result<(State, Vec<Event>), ApplyError> {
        let mut st = State::new(geo, nslots);
        let mut r = Reader::new(buf);
        let short = || "checkpoint truncated".to_string();
        if r.bytes(8).ok_or_else(short)? != b"MVCKPT01" {
            return Err("checkpoint magic mismatch".into());
        }
        st.next_origin_no = r.u32().ok_or_else(short)?;
        st.next_snap_id = r.u64().ok_or_else(short)?;
        let norigins = r.u32().ok_or_else(short)?;
        for _ in 0..norigins {
            let no = r.u32().ok_or_else(short)?;
            let id = r.str().ok_or_else(short)?;
            let path = r.str().ok_or_else(short)?;
            let size = r.u64().ok_or_else(short)?;
            st.apply(&Record::OriginAdd { no, id, path, size }, 0, false, false)?;
            let o = st.origins.get_mut(&no).unwrap();
            o.gen = r.u32().ok_or_else(short)?;
            let n = r.u64().ok_or_else(short)?;
            let chunks = geo.chunks_for(size);
            for _ in 0..n {
                let chunk = r.u64().ok_or_else(short)?;
                let (lo, hi, slot, bits) = (
                    r.u32().ok_or_else(short)?,
                    r.u32().ok_or_else(short)?,
                    r.u32().ok_or_else(short)?,
                    r.u64().ok_or_else(short)?,
                );
                if chunk >= chunks || lo > hi || bits & !geo.full_bits() != 0 {
                    return Err(format!("preserved entry for chunk {chunk} is out of range"));
                }
                if slot != ZERO_SLOT && !st.alloc.claim(slot) {
                    return Err(format!(
                        "slot {slot} is used twice or lies past the end of the store"
                    ));
                }
                st.origins
                    .get_mut(&no)
                    .unwrap()
                    .pindex
                    .add(chunk, lo, hi, slot, bits);
            }
        }
        let nsnaps = r.u32().ok_or_else(short)?;
        let mut slot_refs: HashMap<u32, (u64, u64)> = HashMap::new();
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
            let o = st
                .origins
                .get_mut(&origin)
                .ok_or("snapshot of an unknown origin")?;
            let chunks = geo.chunks_for(o.size);
            if state == SnapshotState::Valid {
                *o.live_gens.entry(gen).or_insert(0) += 1;
            }
            let mut map = VolumeMap::new(chunks);
            let n = r.u64().ok_or_else(short)?;
            for _ in 0..n {
                let chunk = r.u64().ok_or_else(short)?;
                let slot = r.u32().ok_or_else(short)?;
                let bits = r.u64().ok_or_else(short)?;
                if chunk >= chunks || bits & !geo.full_bits() != 0 {
                    return Err(format!(
                        "snapshot {tag}: mapping for chunk {chunk} is out of range"
                    ));
                }
                // A slot shared by several snapshots' maps is always the same chunk of one origin.
                match slot_refs.get(&slot) {
                    Some(&(o2, c2)) => {
                        if (o2, c2) != (origin as u64, chunk) {
                            return Err(format!("slot {slot} mapped by two different chunks"));
                        }
                        st.alloc.incref(slot);
                    }
                    None => {
                        if !st.alloc.claim(slot) {
                            return Err(format!(
                                "slot {slot} is used twice or lies past the end of the store"
                            ));
                        }
                        slot_refs.insert(slot, (origin as u64, chunk));
                    }
                }
                map.set(chunk, MapEntry { slot, bits }, &mut |_| {});
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
                    map,
                },
            );
        }
        let nevents = r.u32().ok_or_else(short)?;
        let mut events = Vec::new();
        for _ in 0..nevents {
            let time = r.u64().ok_or_else(short)?;
            let kind = match r.u8().ok_or_else(short)? {
                0 => EventKind::LowSpace,
                1 => EventKind::Grown,
                2 => EventKind::SnapshotInvalidated,
                _ => EventKind::Corruption,
            };
            events.push(Event {
                time,
                kind,
                message: r.str().ok_or_else(short)?,
            });
        }
        if r.remaining() != 0 {
            return Err("checkpoint has trailing bytes".into());
        }
        Ok((st, events))
    }
}
