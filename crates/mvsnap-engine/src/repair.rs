//! `check --repair`: rebuild what can be rebuilt from what can still be read, as thin_repair
//! does for dm-thin: the tree from its readable nodes, the space map from what the tree and
//! the tables point at, the counters from the tree. Snapshots that lost data to a damaged
//! node are invalidated (reading them would return wrong bytes); the origins never lose a
//! byte (their data lives in their own devices).

use std::collections::{BTreeMap, HashMap};

use crate::error::{Error, Result};
use crate::pdata::btree::LostRange;
use crate::pdata::node::Key;
use crate::pdata::{preserved, snapdata, written, PdataError};
use crate::state::State;
use crate::store::Store;
use crate::types::{RepairReport, SnapshotState};

impl Store {
    /// Repair the store in place (opened writable, by one process), then check it. Every
    /// change is one tree commit: a crash during the repair leaves the store as it was.
    pub fn repair(&self) -> Result<RepairReport> {
        let mut guard = self.inner.state.write();
        let st = &mut *guard;
        let path = self.inner.path.clone();
        let meta_err = |what: &str, e: PdataError| Error::Corrupt {
            path: path.clone(),
            what: format!("repair: {what}: {e}"),
        };
        // Nothing in flight; no commit yet: a damaged space map cannot give blocks for one.
        self.inner.wait_inflight(st)?;
        let salvaged = st.meta.salvage();
        let mut report = RepairReport {
            nodes_read: salvaged.blocks.len() as u64,
            entries_kept: salvaged.entries.len() as u64,
            lost: salvaged.lost.iter().map(describe_lost).collect(),
            ..Default::default()
        };
        // Every block anything points at, before a single new node is placed.
        let mut in_use: Vec<u64> = salvaged.blocks.clone();
        in_use.extend(&st.table_blocks);
        in_use.extend(&st.deferred_frees);
        for (k, v) in &salvaged.entries {
            if let Some(b) = preserved::data_block(k, v).or_else(|| snapdata::data_block(k, v)) {
                in_use.push(b);
            }
        }
        in_use.sort_unstable();
        in_use.dedup();
        let fixed = st
            .meta
            .repair_space(&in_use)
            .map_err(|e| meta_err("space map", e))?;
        report.blocks_leaked = fixed.leaked;
        report.blocks_lost = fixed.lost;
        report.bitmaps_rewritten = fixed.rewritten;
        if !salvaged.lost.is_empty() {
            st.meta
                .rebuild_tree(&salvaged)
                .map_err(|e| meta_err("rebuild the tree", e))?;
            report.tree_rebuilt = true;
        }
        report.counters_fixed = recount(st).map_err(|e| meta_err("recount", e))?;
        // The snapshots of an origin whose keys were lost may read wrong data: invalid.
        let hit: Vec<u32> = st
            .origins
            .keys()
            .copied()
            .filter(|&no| salvaged.lost.iter().any(|l| touches_origin(l, no)))
            .collect();
        for no in hit {
            let o = &st.origins[&no];
            let victims: Vec<(u64, String)> = st
                .snaps
                .values()
                .filter(|s| s.origin == no && s.state == SnapshotState::Valid)
                .map(|s| (s.id, format!("{}@{}", o.id, s.tag)))
                .collect();
            let reason = format!("metadata of {} damaged: repaired without it", o.id);
            let (ids, names): (Vec<u64>, Vec<String>) = victims.into_iter().unzip();
            self.inner.invalidate(st, no, &ids, &reason, &names)?;
            report.invalidated.extend(names);
        }
        // Run the reclaim it queued now, under this lock: the repair is one commit.
        while self.inner.reclaim_locked(st)? {}
        self.inner.checkpoint_locked(st)?;
        drop(guard);
        report.check = self.check();
        Ok(report)
    }
}

fn describe_lost(l: &LostRange) -> String {
    let key = |k: &Option<Key>| match k {
        Some(k) => format!("{}:{}", k[0] as char, hex(&k[1..])),
        None => "end".into(),
    };
    format!(
        "node {} ({}): keys {} .. {} lost",
        l.block,
        l.why,
        match &l.lo {
            None => "start".into(),
            lo => key(lo),
        },
        key(&l.hi)
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Whether keys `l.lo..l.hi` meet any of origin `no`'s key spaces.
fn touches_origin(l: &LostRange, no: u32) -> bool {
    [
        preserved::origin_keys(no),
        snapdata::origin_keys(no),
        written::origin_keys(no),
    ]
    .iter()
    .any(|(first, end)| l.hi.is_none_or(|hi| *first < hi) && l.lo.is_none_or(|lo| lo < *end))
}

/// Set every counter kept beside the tree (entries and generation ranges per origin, keys per
/// snapshot node, live generations) from the tree itself, and the written mark of each
/// block's newest preserved entry. True if any was wrong.
fn recount(st: &mut State) -> std::result::Result<bool, PdataError> {
    let mut changed = false;
    let mut node_keys: HashMap<u32, u64> = HashMap::new();
    // Nodes holding keys that no live snapshot uses: background reclaim drops their keys.
    let mut dead: BTreeMap<u32, u32> = BTreeMap::new();
    let nos: Vec<u32> = st.origins.keys().copied().collect();
    for no in nos {
        let mut ranges: BTreeMap<(u32, u32), u64> = BTreeMap::new();
        let mut zero_ranges: BTreeMap<(u32, u32), u64> = BTreeMap::new();
        let mut entries = 0u64;
        // Blocks preserved through a generation but marked written in no epoch from it on
        // (`check` says why that matters): marked in that generation's epoch.
        let mut unmarked: Vec<(u64, u32)> = Vec::new();
        {
            let view = st.meta.view();
            let gen = st.origins[&no].gen;
            let mut newest: Option<(u64, u32)> = None;
            let mut walk_err = None;
            let mut note_newest = |newest: Option<(u64, u32)>| {
                if let Some((b, hi)) = newest {
                    match written::marked_in(&view, no, b, hi..=gen) {
                        Ok(true) => {}
                        Ok(false) => unmarked.push((b, hi)),
                        Err(e) => walk_err = Some(e),
                    }
                }
            };
            preserved::for_each(&view, no, &mut |block, e| {
                entries += 1;
                if e.loc != preserved::ZERO {
                    *ranges.entry((e.lo, e.hi)).or_default() += 1;
                } else {
                    *zero_ranges.entry((e.lo, e.hi)).or_default() += 1;
                }
                if newest.is_some_and(|(b, _)| b != block) {
                    note_newest(newest);
                }
                newest = Some((block, e.hi));
            })?;
            note_newest(newest);
            if let Some(e) = walk_err {
                return Err(e);
            }
            snapdata::for_each(&view, no, &mut |_, node, _| {
                *node_keys.entry(node).or_default() += 1;
                if !st.nodes.contains(node) {
                    dead.insert(node, no);
                }
            })?;
        }
        let mut live: BTreeMap<u32, u32> = BTreeMap::new();
        for s in st
            .snaps
            .values()
            .filter(|s| s.origin == no && s.state == SnapshotState::Valid)
        {
            *live.entry(s.gen).or_default() += 1;
        }
        if !unmarked.is_empty() {
            changed = true;
            for (block, hi) in unmarked {
                st.meta
                    .change(|t| written::mark(t, no, hi, block, 1).map(|_| ()))?;
            }
        }
        let o = st.origins.get_mut(&no).expect("listed");
        if o.entries != entries
            || o.ranges != ranges
            || o.zero_ranges != zero_ranges
            || o.live_gens != live
        {
            changed = true;
            o.entries = entries;
            o.ranges = ranges;
            o.zero_ranges = zero_ranges;
            o.live_gens = live;
        }
    }
    let recorded: HashMap<u32, u64> = st
        .node_keys
        .iter()
        .filter(|(_, &n)| n > 0)
        .map(|(k, v)| (*k, *v))
        .collect();
    if recorded != node_keys {
        changed = true;
        st.node_keys = node_keys;
    }
    if st.dead_nodes != dead {
        changed = true;
        st.dead_nodes = dead;
    }
    Ok(changed)
}
