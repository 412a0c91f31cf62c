//! `check`: verify every invariant of DESIGN.md on an open store and report each fault.

use std::collections::HashMap;

use crate::store::Store;
use crate::types::{CheckReport, SnapshotState};

impl Store {
    /// Verify space accounting (no slot both free and used, none lost, none used twice),
    /// the version tree, the preserved ranges, and the checkpoint's checksums.
    pub fn check(&self) -> CheckReport {
        let st = self.inner.state.read();
        let geo = self.inner.geo;
        let mut r = CheckReport {
            slots_total: st.alloc.nslots(),
            slots_used: st.alloc.used(),
            slots_free: st.alloc.free(),
            mappings: st.mappings(),
            snapshots: st
                .snaps
                .values()
                .filter(|s| s.state != SnapshotState::Hidden)
                .count(),
            ..Default::default()
        };
        // Owner of each referenced slot: what references it, and how often.
        #[derive(PartialEq, Clone, Copy, Debug)]
        enum Owner {
            Checkpoint,
            Preserved { origin: u32, chunk: u64 },
            Map { origin: u32, chunk: u64 },
        }
        let mut owners: HashMap<u32, (Owner, u32)> = HashMap::new();
        let mut claim = |r: &mut CheckReport, slot: u32, who: Owner| {
            if slot as u64 >= st.alloc.nslots() {
                r.errors.push(format!(
                    "slot {slot} ({who:?}) lies past the end of the store ({} slots)",
                    st.alloc.nslots()
                ));
                return;
            }
            match owners.get_mut(&slot) {
                None => {
                    owners.insert(slot, (who, 1));
                }
                Some((prev, n)) => {
                    // Snapshot maps may share a slot, but only for the same chunk of one origin.
                    if matches!(who, Owner::Map { .. }) && *prev == who {
                        *n += 1;
                    } else {
                        r.errors.push(format!(
                            "slot {slot} is used twice: by {prev:?} and by {who:?}"
                        ));
                    }
                }
            }
        };
        r.warnings
            .extend(self.inner.superblock_damage.lock().iter().cloned());
        for &s in &st.ckpt_slots {
            claim(&mut r, s, Owner::Checkpoint);
        }
        for o in st.origins.values() {
            let mut ranges: HashMap<(u64, u32), Vec<(u32, u32)>> = HashMap::new();
            o.pindex.for_each(|chunk, e| {
                if e.slot != crate::index::ZERO_SLOT {
                    claim(&mut r, e.slot, Owner::Preserved { origin: o.no, chunk });
                }
                if e.lo > e.hi || e.hi > o.gen || e.lo == 0 {
                    r.errors.push(format!("origin {}: chunk {chunk}: preserved range {}..={} is outside generations 1..={}", o.id, e.lo, e.hi, o.gen));
                }
                if e.bits == 0 || e.bits & !geo.full_bits() != 0 {
                    r.errors.push(format!("origin {}: chunk {chunk}: block bitmap {:#x} is invalid", o.id, e.bits));
                }
                if chunk >= geo.chunks_for(o.size) {
                    r.errors.push(format!("origin {}: chunk {chunk} lies past the origin's end", o.id));
                }
                let mut b = e.bits;
                while b != 0 {
                    let i = b.trailing_zeros();
                    ranges.entry((chunk, i)).or_default().push((e.lo, e.hi));
                    b &= b - 1;
                }
            });
            for ((chunk, block), mut rs) in ranges {
                rs.sort();
                if rs.windows(2).any(|w| w[1].0 <= w[0].1) {
                    r.errors.push(format!("origin {}: chunk {chunk} block {block}: overlapping preserved ranges {rs:?}", o.id));
                }
            }
            let mut live: HashMap<u32, u32> = HashMap::new();
            for s in st
                .snaps
                .values()
                .filter(|s| s.origin == o.no && s.state == SnapshotState::Valid)
            {
                *live.entry(s.gen).or_default() += 1;
            }
            let recorded: HashMap<u32, u32> = o.live_gens.iter().map(|(k, v)| (*k, *v)).collect();
            if live != recorded {
                r.errors.push(format!("origin {}: live generation counts {recorded:?} disagree with the snapshots {live:?}", o.id));
            }
            match (&o.dev, o.found_size) {
                // Changed behind mvsnap's back: data the snapshots shared may be gone.
                (Err(e), Some(_)) => r.errors.push(e.clone()),
                (Err(e), None) => r.warnings.push(e.clone()),
                (Ok(_), _) => {}
            }
        }
        for s in st.snaps.values() {
            let Some(o) = st.origins.get(&s.origin) else {
                r.errors
                    .push(format!("snapshot {} belongs to a missing origin", s.tag));
                continue;
            };
            if s.gen == 0 || s.gen > o.gen {
                r.errors.push(format!(
                    "{}@{}: generation {} is outside 1..={}",
                    o.id, s.tag, s.gen, o.gen
                ));
            }
            if s.parent != 0 && !st.snaps.contains_key(&s.parent) {
                r.errors.push(format!(
                    "{}@{}: parent snapshot {} is missing",
                    o.id, s.tag, s.parent
                ));
            }
            let kids = st
                .snaps
                .values()
                .filter(|c| c.parent == s.id && s.id != 0)
                .count() as u32;
            if kids != s.children {
                r.errors.push(format!(
                    "{}@{}: has {kids} children, records {}",
                    o.id, s.tag, s.children
                ));
            }
            if s.state == SnapshotState::Hidden && s.children == 0 {
                r.errors.push(format!(
                    "{}@{}: deleted, childless, but still kept",
                    o.id, s.tag
                ));
            }
            let mut seen = std::collections::HashSet::new();
            s.map.for_each(&mut |chunk, e| {
                if chunk >= geo.chunks_for(o.size) || e.bits == 0 || e.bits & !geo.full_bits() != 0
                {
                    r.errors.push(format!(
                        "{}@{}: mapping of chunk {chunk} is invalid",
                        o.id, s.tag
                    ));
                }
                if seen.insert(e.slot) {
                    claim(
                        &mut r,
                        e.slot,
                        Owner::Map {
                            origin: s.origin,
                            chunk,
                        },
                    );
                } else {
                    r.errors
                        .push(format!("{}@{}: slot {} mapped twice", o.id, s.tag, e.slot));
                }
            });
        }
        // Every referenced slot is marked used; every used slot is referenced or quarantined.
        let quarantined: std::collections::HashSet<u32> = st.alloc.quarantined_slots().collect();
        for &slot in owners.keys() {
            if !st.alloc.is_used(slot) {
                r.errors
                    .push(format!("slot {slot} is in use but marked free"));
            }
        }
        let mut lost = 0u64;
        for slot in 0..st.alloc.nslots() as u32 {
            if st.alloc.is_used(slot) && !owners.contains_key(&slot) && !quarantined.contains(&slot)
            {
                lost += 1;
                if lost <= 10 {
                    r.errors.push(format!(
                        "slot {slot} is marked used but nothing references it (lost)"
                    ));
                }
            }
        }
        if lost > 10 {
            r.errors.push(format!("... {} more lost slots", lost - 10));
        }
        r
    }
}
