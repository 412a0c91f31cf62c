//! `check`: verify every invariant of DESIGN.md on an open store and report each fault.

use std::collections::{BTreeMap, HashMap};

use crate::pdata::{preserved, snapdata, written};
use crate::state::Origin;
use crate::store::Store;
use crate::types::{CheckReport, SnapshotState};

impl Store {
    /// Verify the metadata tree (every node reachable once, keys in order), space accounting
    /// (the space map marks exactly the blocks the tree, its entries and the tables use: none
    /// lost, none used twice), the version tree, the preserved ranges and the counters.
    pub fn check(&self) -> CheckReport {
        // The write lock: the space map's check reads bitmaps through its own cache.
        let mut guard = self.inner.state.write();
        let st = &mut *guard;
        // Copies answered but not logged yet hold blocks no record names: logged first.
        self.inner.log_finished(st);
        // The durable and working versions only: a commit being written is finished first.
        let finished = self.inner.wait_inflight(st);
        let geo = self.inner.geo;
        let limit = st.meta.limit();
        let mut r = CheckReport {
            slots_total: limit,
            slots_free: st.meta.usable_free_blocks(),
            slots_used: limit.saturating_sub(st.meta.usable_free_blocks()),
            mappings: st.mappings(),
            snapshots: st
                .snaps
                .values()
                .filter(|s| s.state != SnapshotState::Hidden)
                .count(),
            ..Default::default()
        };
        r.warnings
            .extend(self.inner.superblock_damage.lock().iter().cloned());
        if let Err(e) = finished {
            r.errors
                .push(format!("the tree commit being written failed: {e}"));
        }
        // Every block something points at: data of entries, the tables, freed-not-yet-committed,
        // copies in flight.
        let mut data: Vec<u64> = Vec::new();
        data.extend(&st.table_blocks);
        data.extend(&st.deferred_frees);
        // Copies being written outside the lock, their records not logged yet.
        data.extend(st.unlogged.iter().map(|&b| b as u64));
        let view = st.meta.view();
        for o in st.origins.values() {
            let chunks = geo.chunks_for(o.size);
            let mut ranges: BTreeMap<(u32, u32), u64> = BTreeMap::new();
            let mut zero_ranges: BTreeMap<(u32, u32), u64> = BTreeMap::new();
            let mut entries = 0u64;
            let mut last: Option<(u64, u32)> = None;
            let walk = preserved::for_each(&view, o.no, &mut |block, e| {
                entries += 1;
                if e.lo > e.hi || e.hi > o.gen || e.lo == 0 {
                    r.errors.push(format!(
                        "origin {}: block {block}: preserved range {}..={} is outside generations 1..={}",
                        o.id, e.lo, e.hi, o.gen
                    ));
                }
                if block >= chunks {
                    r.errors.push(format!(
                        "origin {}: block {block} lies past the origin's end",
                        o.id
                    ));
                }
                // Keys of one block come in `hi` order: ranges overlap if one starts at or
                // before the previous one's end.
                if let Some((b, prev_hi)) = last {
                    if b == block && e.lo <= prev_hi {
                        r.errors.push(format!(
                            "origin {}: block {block}: overlapping preserved ranges (..={prev_hi} and {}..={})",
                            o.id, e.lo, e.hi
                        ));
                    }
                    if b != block {
                        check_newest_marked(&view, o, b, prev_hi, &mut r.errors);
                    }
                }
                last = Some((block, e.hi));
                if e.loc != preserved::ZERO {
                    data.push(e.loc);
                    *ranges.entry((e.lo, e.hi)).or_default() += 1;
                } else {
                    *zero_ranges.entry((e.lo, e.hi)).or_default() += 1;
                }
            });
            if let Some((b, hi)) = last {
                check_newest_marked(&view, o, b, hi, &mut r.errors);
            }
            if let Err(e) = walk {
                r.errors
                    .push(format!("origin {}: preserved entries: {e}", o.id));
            }
            if entries != o.entries || ranges != o.ranges || zero_ranges != o.zero_ranges {
                r.errors.push(format!(
                    "origin {}: counters ({} entries, ranges {:?}, zero {:?}) disagree with the index ({entries}, {ranges:?}, zero {zero_ranges:?})",
                    o.id, o.entries, o.ranges, o.zero_ranges
                ));
            }
            let mut keys: HashMap<u32, u64> = HashMap::new();
            let walk = snapdata::for_each(&view, o.no, &mut |block, node, loc| {
                // A deleted writable snapshot's keys stay until background reclaim drops them.
                if !st.nodes.contains(node) && st.dead_nodes.get(&node) != Some(&o.no) {
                    r.errors.push(format!(
                        "origin {}: block {block} written by an unknown snapshot node {node}",
                        o.id
                    ));
                }
                if block >= chunks {
                    r.errors.push(format!(
                        "origin {}: a snapshot's block {block} lies past the end",
                        o.id
                    ));
                }
                *keys.entry(node).or_default() += 1;
                if loc != preserved::ZERO {
                    data.push(loc);
                }
            });
            if let Err(e) = walk {
                r.errors
                    .push(format!("origin {}: snapshot data: {e}", o.id));
            }
            for (&node, _) in st.dead_nodes.iter().filter(|(_, &origin)| origin == o.no) {
                if !keys.contains_key(&node) {
                    r.errors.push(format!(
                        "origin {}: deleted snapshot node {node} is listed for reclaim but holds no block",
                        o.id
                    ));
                }
            }
            for (node, n) in keys {
                let recorded = st.node_keys.get(&node).copied().unwrap_or(0);
                if recorded != n {
                    r.errors.push(format!(
                        "origin {}: snapshot node {node} holds {n} blocks, its counter says {recorded}",
                        o.id
                    ));
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
                r.errors.push(format!(
                    "origin {}: live generation counts {recorded:?} disagree with the snapshots {live:?}",
                    o.id
                ));
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
            if s.state == SnapshotState::Valid && !st.nodes.contains(s.node) {
                r.errors.push(format!(
                    "{}@{}: its snapshot node {} is missing",
                    o.id, s.tag, s.node
                ));
            }
        }
        if let Err(e) = st.meta.check_working(&data) {
            r.errors.push(format!("metadata: {e}"));
        }
        r
    }
}

/// A block preserved through generation `hi` must be marked written in some epoch from `hi`
/// on: a first write finds how far it is preserved there (`State::preserved_through`), and
/// without the mark would copy it again over its entry (`check --repair` marks it).
fn check_newest_marked(
    view: &dyn crate::pdata::btree::View,
    o: &Origin,
    block: u64,
    hi: u32,
    errors: &mut Vec<String>,
) {
    match written::marked_in(view, o.no, block, hi..=o.gen) {
        Ok(true) => {}
        Ok(false) => errors.push(format!(
            "origin {}: block {block} is preserved through generation {hi} but marked written in no epoch from {hi} on",
            o.id
        )),
        Err(e) => errors.push(format!("origin {}: written bitmaps: {e}", o.id)),
    }
}

#[cfg(test)]
mod tests {
    use crate::pdata::{preserved, written};
    use crate::types::{FormatOptions, OpenOptions};
    use crate::Store;

    /// Entries a first write's lookup would misjudge, made by hand in the tree: `check`
    /// names each, and `--repair` restores the written mark a first write relies on.
    #[test]
    fn check_finds_overlaps_and_unmarked_preserved_blocks_and_repair_marks_them() {
        let dir = tempfile::tempdir().unwrap();
        let (path, origin) = (dir.path().join("s.store"), dir.path().join("o.img"));
        std::fs::write(&origin, vec![7u8; 64 << 10]).unwrap();
        let fmt = FormatOptions {
            size: Some(64 << 20),
            ..Default::default()
        };
        Store::format(&path, &fmt).unwrap();
        let s = Store::open(&path, &OpenOptions::default()).unwrap();
        s.add_origin(&origin, Some("o0")).unwrap();
        s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
        s.create_snapshot(&["o0"], Some("b"), "", false).unwrap();
        let o = s.volume("o0").unwrap();
        o.write_at(0, &[1u8; 4096], false).unwrap(); // block 0: a copy for 1..=2, W(2)
        o.flush().unwrap();
        assert!(s.check().is_clean(), "{:?}", s.check().errors);
        {
            let mut st = s.inner.state.write();
            let no = st.origin_by_id("o0").unwrap().no;
            st.meta
                .change(|t| {
                    // Block 0 again, for 1..=1: inside the copy's range.
                    preserved::add(t, no, 0, 1, 1, preserved::ZERO)?;
                    // Block 5, preserved through 2 with no mark in W(2) (nor later).
                    preserved::add(t, no, 5, 1, 2, preserved::ZERO)
                })
                .unwrap();
            assert!(!written::marked_in(&st.meta.view(), no, 5, 1..=2).unwrap());
        }
        let errors = s.check().errors;
        let has = |what: &str| errors.iter().any(|e| e.contains(what));
        assert!(has("block 0: overlapping preserved ranges"), "{errors:#?}");
        assert!(
            has("block 5 is preserved through generation 2 but marked written in no epoch"),
            "{errors:#?}"
        );
        let report = s.repair().unwrap();
        assert!(report.counters_fixed, "{report:?}");
        let st = s.inner.state.read();
        let no = st.origin_by_id("o0").unwrap().no;
        assert!(written::is_marked(&st.meta.view(), no, 2, 5).unwrap());
        drop(st);
        let errors = s.check().errors;
        assert!(!errors.iter().any(|e| e.contains("block 5")), "{errors:#?}");
    }
}
