//! Administrative operations: origins, snapshots, reclaim, listing, events, info.

use super::*;

impl Store {
    pub fn add_origin(&self, path: &Path, id: Option<&str>) -> Result<OriginInfo> {
        let abs = std::fs::canonicalize(path).map_err(|e| Error::io("open origin", path, e))?;
        let id = match id {
            Some(i) => i.to_string(),
            None => abs
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "{}: cannot derive an origin id",
                        path.display()
                    ))
                })?,
        };
        validate_name("origin id", &id)?;
        // Writing through an origin that is this store, or another store, destroys it.
        if same_file(&abs, &self.inner.path) {
            return Err(Error::InvalidArgument(format!(
                "{} is this store itself; an origin must be another file or device",
                abs.display()
            )));
        }
        // Already bound here: say so before opening it (this store holds its lock).
        not_bound_yet(&self.inner.state.read(), &id, &abs)?;
        let uuid = self.uuid();
        if let Ok(Some(other)) = crate::sys::get_xattr(&abs, BOUND_XATTR) {
            let other = String::from_utf8_lossy(&other).into_owned();
            if other != uuid {
                return Err(Error::Busy(format!(
                    "{} is already an origin of the mvsnap store {other}: writing it through \
                     this store too would change that store's snapshots behind its back. \
                     Remove it there (origin remove), or, if that store is gone, clear the \
                     mark: setfattr -x {BOUND_XATTR} {}",
                    abs.display(),
                    abs.display()
                )));
            }
        }
        let dev = self
            .inner
            .opener
            .open(&abs, !self.inner.read_only)
            .map_err(|e| Error::io("open origin", &abs, e))?;
        if read_superblocks(&*dev, &abs).is_ok() {
            return Err(Error::InvalidArgument(format!(
                "{} is an mvsnap store; using it as an origin would destroy it",
                abs.display()
            )));
        }
        let size = dev.len().map_err(|e| Error::io("stat", &abs, e))?;
        if size == 0 {
            return Err(Error::InvalidArgument(format!(
                "origin {} is empty",
                abs.display()
            )));
        }
        let abs_s = abs.to_string_lossy().into_owned();
        if abs_s.len() > MAX_PATH {
            return Err(Error::InvalidArgument(format!(
                "origin path of {} bytes: at most {MAX_PATH}",
                abs_s.len()
            )));
        }
        let mut st = self.inner.state.write();
        not_bound_yet(&st, &id, &abs)?;
        let no = st.next_origin_no;
        self.inner
            .ensure_meta_room(&mut st, 64 + id.len() as u64 + abs_s.len() as u64)?;
        self.inner.log(
            &mut st,
            Record::OriginAdd {
                no,
                id: id.clone(),
                path: abs_s.clone(),
                size,
            },
        )?;
        st.origins.get_mut(&no).unwrap().dev = Ok(crate::blockdev::FailStop::wrap(dev));
        let seq = self.inner.appended_seq();
        drop(st);
        self.inner.wait_durable(seq)?;
        // Best effort: a file system without extended attributes keeps no mark (the lock
        // still guards an origin while a store has it open).
        if let Err(e) = crate::sys::set_xattr(&abs, BOUND_XATTR, uuid.as_bytes()) {
            tracing::warn!(
                "{}: cannot mark it as bound to this store: {e}",
                abs.display()
            );
        }
        Ok(OriginInfo {
            id,
            path: abs_s,
            size,
            snapshots: 0,
            state: OriginState::Online,
            reason: None,
        })
    }

    pub fn remove_origin(&self, id: &str) -> Result<()> {
        self.inner.writeback.drain(&self.inner);
        let mut st = self.inner.state.write();
        let o = st
            .origin_by_id(id)
            .ok_or_else(|| Error::NotFound(format!("origin {id}")))?;
        let no = o.no;
        let n = st.snaps.values().filter(|s| s.origin == no).count();
        if n > 0 {
            return Err(Error::Busy(format!(
                "origin {id} still has {n} snapshots; delete them first"
            )));
        }
        let path = PathBuf::from(&o.path);
        let seq = self.inner.log(&mut st, Record::OriginRemove { no })?;
        drop(st);
        self.inner.wait_durable(seq)?;
        if crate::sys::get_xattr(&path, BOUND_XATTR).ok().flatten()
            == Some(self.uuid().into_bytes())
        {
            if let Err(e) = crate::sys::remove_xattr(&path, BOUND_XATTR) {
                tracing::warn!("{}: cannot clear its binding mark: {e}", path.display());
            }
        }
        Ok(())
    }

    pub fn origins(&self) -> Vec<OriginInfo> {
        let st = self.inner.state.read();
        st.origins
            .values()
            .map(|o| OriginInfo {
                id: o.id.clone(),
                path: o.path.clone(),
                size: o.size,
                snapshots: st
                    .snaps
                    .values()
                    .filter(|s| s.origin == o.no && s.state != SnapshotState::Hidden)
                    .count(),
                state: o.availability(),
                reason: o.dev.as_ref().err().cloned(),
            })
            .collect()
    }

    /// Take snapshots of one or more volumes at one instant. Every write acknowledged before
    /// this returns is in them; a write in flight is wholly in or wholly out.
    pub fn create_snapshot(
        &self,
        sources: &[&str],
        tag: Option<&str>,
        memo: &str,
        writable: bool,
    ) -> Result<Vec<SnapshotInfo>> {
        if sources.is_empty() {
            return Err(Error::InvalidArgument("no volume to snapshot".into()));
        }
        if let Some(t) = tag {
            validate_name("tag", t)?;
        }
        if memo.len() > MAX_MEMO {
            return Err(Error::InvalidArgument(format!(
                "memo of {} bytes: at most {MAX_MEMO}",
                memo.len()
            )));
        }
        // A poisoned store says so first, before any origin's own trouble.
        self.inner.check_poison()?;
        // Resolve names and take each involved origin's gate, in origin order (no deadlock).
        let (targets, gates) = {
            let st = self.inner.state.read();
            let mut targets = Vec::new();
            for src in sources {
                let (origin, snap) = resolve_name(&st, src)?;
                if targets.iter().any(|&(o, _)| o == origin) {
                    return Err(Error::InvalidArgument(format!(
                        "{src}: two volumes of one origin in one snapshot set"
                    )));
                }
                targets.push((origin, snap));
            }
            let mut gates: Vec<(u32, Arc<RwLock<()>>)> = targets
                .iter()
                .map(|&(o, _)| (o, st.origins[&o].gate.clone()))
                .collect();
            gates.sort_by_key(|g| g.0);
            (targets, gates)
        };
        let _guards: Vec<_> = gates.iter().map(|(_, g)| g.write()).collect();
        // Acknowledged writes still queued behind their copy-outs belong in the snapshot.
        self.inner.writeback.drain(&self.inner);
        // In-flight origin writes have drained; make what they wrote durable before the
        // snapshot that shares it becomes durable (invariant 1 survives a crash). An origin
        // that lost writes (a failed sync or queued write) reads data its disk may not hold:
        // a snapshot of it would vouch for those bytes, so it is refused until a reopen.
        {
            let st = self.inner.state.read();
            for &(o, _) in &targets {
                if let Ok(d) = &st.origins[&o].dev {
                    if !self.inner.ephemeral {
                        self.inner.sync_origin(o, &**d)?;
                    }
                }
            }
        }
        let mut st = self.inner.state.write();
        let tag = match tag {
            Some(t) => t.to_string(),
            None => {
                // The lowest number free on every involved origin.
                let mut n = 1u64;
                while targets
                    .iter()
                    .any(|&(o, _)| st.snap_by_tag(o, &n.to_string()).is_some())
                {
                    n += 1;
                }
                n.to_string()
            }
        };
        let mut snaps = Vec::new();
        for (id, &(origin, parent)) in (st.next_snap_id..).zip(targets.iter()) {
            let o = &st.origins[&origin];
            if st.snap_by_tag(origin, &tag).is_some() {
                return Err(Error::AlreadyExists(format!("snapshot {}@{tag}", o.id)));
            }
            o.dev.as_ref().map_err(|e| Error::Busy(e.clone()))?;
            let gen = match parent {
                None => o.gen + 1,
                Some(p) => {
                    let ps = &st.snaps[&p];
                    if ps.state != SnapshotState::Valid {
                        return Err(Error::SnapshotInvalid {
                            name: format!("{}@{}", o.id, ps.tag),
                            reason: ps.reason.clone().unwrap_or_else(|| "deleted".into()),
                        });
                    }
                    ps.gen
                }
            };
            snaps.push(NewSnap {
                id,
                origin,
                parent: parent.unwrap_or(0),
                gen,
                tag: tag.clone(),
                memo: memo.to_string(),
                writable,
            });
        }
        let ids: Vec<u64> = snaps.iter().map(|s| s.id).collect();
        // A row in the tables (and two node rows); nothing is copied, at any depth.
        let extra: u64 = snaps
            .iter()
            .map(|n| 128 + n.tag.len() as u64 + n.memo.len() as u64)
            .sum();
        self.inner.ensure_meta_room(&mut st, extra)?;
        let seq = self
            .inner
            .log(&mut st, Record::SnapshotCreate { time: now(), snaps })?;
        drop(st);
        self.inner.wait_durable(seq)?;
        let st = self.inner.state.read();
        Ok(ids
            .iter()
            .map(|id| self.snapshot_info(&st, &st.snaps[id], None))
            .collect())
    }

    /// Delete a snapshot: instant; its space comes back by `reclaim`.
    pub fn delete_snapshot(&self, name: &str) -> Result<()> {
        let mut st = self.inner.state.write();
        let (origin, snap) = resolve_name(&st, name)?;
        let id = snap.ok_or_else(|| {
            Error::InvalidArgument(format!("{name} is an origin; use `origin remove`"))
        })?;
        let seq = self.inner.log(&mut st, Record::SnapshotDelete { id })?;
        // The entries only it needed go in the background (`reclaim`): instant at any size.
        self.inner.queue_reclaim(origin);
        // From now on the origin's writes skip copy-outs for this snapshot: none may reach the
        // disk before the delete is durable (it may never be, if the store is poisoned now).
        st.release_seq.insert(origin, seq);
        drop(st);
        self.inner.wait_durable(seq)
    }

    /// Give back the space no live snapshot needs (after deletes and invalidations), now:
    /// the background reclaim run to the end here, then a commit.
    pub fn reclaim(&self) -> Result<()> {
        {
            let st = self.inner.state.write();
            for &o in st.origins.keys() {
                self.inner.queue_reclaim(o);
            }
        }
        self.inner.finish_reclaim()
    }

    /// Wait for the background reclaim of deleted and invalid snapshots to finish, and their
    /// space to go back (what `delete_snapshot` queued).
    pub fn wait_reclaimed(&self) -> Result<()> {
        if self.inner.read_only {
            return Ok(());
        }
        self.inner.finish_reclaim()
    }

    /// Crash tests: hold the background reclaim (no batch runs until released), so a simulated
    /// power cut after a delete always finds its work not begun.
    #[cfg(any(test, feature = "crashsim"))]
    pub fn hold_background_reclaim(&self, held: bool) {
        self.inner.hold_reclaimer(held);
    }

    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        let st = self.inner.state_for_report();
        let usage = space_usage(&st, self.inner.geo);
        st.snaps
            .values()
            .filter(|s| s.state != SnapshotState::Hidden)
            .map(|s| self.snapshot_info(&st, s, usage.get(&s.id).copied()))
            .collect()
    }

    fn snapshot_info(
        &self,
        st: &State,
        s: &crate::state::Snap,
        usage: Option<(u64, u64)>,
    ) -> SnapshotInfo {
        let o = &st.origins[&s.origin];
        // A deleted parent stays hidden while it has children, and its tag may be reused by a
        // new, unrelated snapshot: name the nearest ancestor that is still listed instead.
        let mut parent_id = s.parent;
        let parent = loop {
            if parent_id == 0 {
                break o.id.clone();
            }
            match st.snaps.get(&parent_id) {
                Some(p) if p.state == SnapshotState::Hidden => parent_id = p.parent,
                Some(p) => break format!("{}@{}", o.id, p.tag),
                None => break format!("{}@?", o.id),
            }
        };
        let (exclusive_bytes, shared_bytes) = usage.unwrap_or((0, 0));
        SnapshotInfo {
            origin: o.id.clone(),
            tag: s.tag.clone(),
            name: format!("{}@{}", o.id, s.tag),
            parent,
            memo: s.memo.clone(),
            created: s.created,
            writable: s.writable,
            state: s.state,
            reason: s.reason.clone(),
            origin_state: o.availability(),
            exclusive_bytes,
            shared_bytes,
        }
    }

    pub fn events(&self) -> Vec<Event> {
        self.inner.events.lock().clone()
    }

    /// Events from number `after` on (0: every one kept), waiting up to `wait` for one if
    /// there is none yet; with the number to ask from next (`mvsnap events --follow`). Events
    /// dropped from the bounded list meanwhile are skipped.
    pub fn events_after(&self, after: u64, wait: std::time::Duration) -> (u64, Vec<Event>) {
        let mut ev = self.inner.events.lock();
        let total = |_: &Vec<Event>| self.inner.events_total.load(Ordering::Acquire);
        if total(&ev) <= after && !wait.is_zero() {
            let deadline = std::time::Instant::now() + wait;
            while total(&ev) <= after {
                if self
                    .inner
                    .events_cv
                    .wait_until(&mut ev, deadline)
                    .timed_out()
                {
                    break;
                }
            }
        }
        let total = total(&ev);
        let first = total - ev.len() as u64;
        let skip = after.saturating_sub(first).min(ev.len() as u64) as usize;
        (total, ev[skip..].to_vec())
    }

    pub fn info(&self) -> StoreInfo {
        let snapshots = self.snapshots();
        let origins = self.origins();
        let st = self.inner.state_for_report();
        let geo = self.inner.geo;
        let sb = self.inner.sb.lock().clone();
        let cs = META_BLOCK;
        // The tables, the tree's nodes, and the fixed area (headers, space map bitmaps).
        let meta = (st.table_blocks.len() as u64
            + st.meta.nodes()
            + crate::pdata::meta::Meta::fixed_blocks(st.meta.blocks()))
            * cs;
        let cache = st.meta.cache_stats();
        let usable = st.meta.usable_free_blocks();
        StoreInfo {
            path: self.inner.path.display().to_string(),
            uuid: format::uuid_string(&sb.uuid),
            chunk_size: geo.chunk_size,
            block_size: geo.sub_size,
            journal_bytes: geo.journal_len,
            data_bytes: st.meta.limit() * cs,
            max_bytes: if sb.max_size > 0 {
                sb.max_size
            } else {
                geo.data_start + st.meta.limit() * cs
            },
            used_bytes: (st.meta.limit() - usable) * cs,
            free_bytes: usable * cs,
            metadata_bytes: meta + geo.journal_len + JOURNAL_OFFSET,
            mappings: st.mappings(),
            cache_bytes: cache.capacity_bytes,
            cache_used_bytes: cache.used_bytes,
            cache_hits: cache.hits,
            cache_misses: cache.misses,
            cache_prefetched: cache.prefetched,
            dirty_bytes: st.meta.dirty_nodes() as u64 * META_BLOCK,
            committing_bytes: st.meta.frozen_nodes() as u64 * META_BLOCK,
            overlay_entries: st.meta.overlay_len() as u64,
            overlay_bytes: st.meta.overlay_bytes() as u64,
            queued_write_bytes: self.inner.writeback.queued_bytes(),
            ephemeral: self.inner.ephemeral,
            low_space: self.inner.is_low_space(),
            origins,
            snapshots,
            events: self.events(),
        }
    }
}

/// Exclusive and shared bytes per snapshot, from the counters (never a walk of the index):
/// preserved blocks of a generation range are exclusive to a snapshot when it is the only
/// valid one in that range, else shared by all of them (binary searches and a difference
/// array over the sorted generations: O(ranges x log snapshots + snapshots)).
fn space_usage(st: &State, geo: Geometry) -> std::collections::HashMap<u64, (u64, u64)> {
    use std::collections::HashMap;
    let mut out: HashMap<u64, (u64, u64)> = HashMap::new();
    let bs = geo.chunk_size as u64;
    for o in st.origins.values() {
        let gens: Vec<(u32, Vec<u64>)> = valid_snaps_by_gen(st, o.no).into_iter().collect();
        // Snapshots in gens[..i].
        let mut before = vec![0usize; gens.len() + 1];
        for (i, (_, ids)) in gens.iter().enumerate() {
            before[i + 1] = before[i] + ids.len();
        }
        let mut shared = vec![0i128; gens.len() + 1];
        for (&(lo, hi), &n) in &o.ranges {
            let a = gens.partition_point(|(g, _)| *g < lo);
            let b = gens.partition_point(|(g, _)| *g <= hi);
            let bytes = n * bs;
            match before[b] - before[a] {
                0 => {}
                1 => out.entry(gens[a].1[0]).or_default().0 += bytes,
                _ => {
                    shared[a] += bytes as i128;
                    shared[b] -= bytes as i128;
                }
            }
        }
        let mut run = 0i128;
        for (i, (_, ids)) in gens.iter().enumerate() {
            run += shared[i];
            if run > 0 {
                for id in ids {
                    out.entry(*id).or_default().1 += run as u64;
                }
            }
        }
    }
    // Writable snapshots' own blocks are exclusive; what their frozen ancestors hold is shared
    // with the other volumes under them.
    for s in st
        .snaps
        .values()
        .filter(|s| s.state == SnapshotState::Valid)
    {
        let ent = out.entry(s.id).or_default();
        ent.0 += st.node_keys.get(&s.node).copied().unwrap_or(0) * bs;
        let mut cur = st.nodes.parent_of(s.node);
        while let Some(x) = cur {
            ent.1 += st.node_keys.get(&x).copied().unwrap_or(0) * bs;
            cur = st.nodes.parent_of(x);
        }
    }
    out
}

/// The valid snapshots of origin `no`, by generation, in generation order.
fn valid_snaps_by_gen(st: &State, no: u32) -> std::collections::BTreeMap<u32, Vec<u64>> {
    let mut by_gen: std::collections::BTreeMap<u32, Vec<u64>> = Default::default();
    for s in st
        .snaps
        .values()
        .filter(|s| s.origin == no && s.state == SnapshotState::Valid)
    {
        by_gen.entry(s.gen).or_default().push(s.id);
    }
    by_gen
}

/// Marks an origin file with the UUID of the store it is bound to, so a second store refuses
/// it (where the file system keeps extended attributes).
const BOUND_XATTR: &str = "user.mvsnap.store";

/// Refuse an id or a path this store already has as an origin.
fn not_bound_yet(st: &State, id: &str, abs: &Path) -> Result<()> {
    if st.origin_by_id(id).is_some() {
        return Err(Error::AlreadyExists(format!("origin {id}")));
    }
    let abs_s = abs.to_string_lossy();
    // A second name for a bound file (a hard link, another node of the same device) too: it
    // would otherwise fail on the lock this store holds, as if someone else held it.
    if let Some(o) = st
        .origins
        .values()
        .find(|o| o.path == abs_s || same_file(abs, Path::new(&o.path)))
    {
        return Err(Error::AlreadyExists(format!(
            "origin {} (as {})",
            abs.display(),
            o.id
        )));
    }
    Ok(())
}

/// Whether two paths name the same file (device and inode) or the same block device (two
/// device nodes of one disk); false if either cannot be read.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) if a.file_type().is_block_device() && b.file_type().is_block_device() => {
            a.rdev() == b.rdev()
        }
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}
