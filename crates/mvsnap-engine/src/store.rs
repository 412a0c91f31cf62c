//! The store: opening with recovery, group commit, checkpoints, and the administrative
//! operations (origins, snapshots). Volume I/O lives in `volume.rs`.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex, RwLock};

use crate::blockdev::{try_lock, BlockDev, DeviceOpener, FileDev, FileOpener};
use crate::error::{Error, Result};
use crate::format::{
    self, Geometry, Superblock, FORMAT_VERSION, JOURNAL_OFFSET, META_BLOCK, NO_SLOT, SB_OFFSETS,
};
use crate::journal::{self, JournalWriter, NewSnap, Record};
use crate::state::State;
use crate::types::*;
use crate::writeback::Writeback;

/// The most data slots a store can have: slot numbers are u32 and the top values are reserved.
pub(crate) const MAX_SLOTS: u64 = u32::MAX as u64 - 1;

const CK_MAGIC: u32 = 0x4c42_564d; // "MVBL": a block of the tables
/// Every unit of space (data and metadata) in format v2.
const BLOCK: u32 = 4096;
/// Dirty nodes that start a tree commit at most (16 MiB; reached with a 128 MiB cache).
/// Commits run beside the writers, so this no longer bounds a stall; bigger sets amortize a
/// leaf's write over more changes to it (docs/BENCHMARKS.md, "Commits beside the writers").
const MAX_DIRTY_NODES: u64 = 4096;
/// The node cache's budget when none is given (`--cache-size`).
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;
const CK_HEADER: usize = 32;

pub(crate) struct CommitState {
    pub durable_seq: u64,
    pub leader: bool,
}

pub(crate) struct Inner {
    pub path: PathBuf,
    pub dev: Arc<dyn BlockDev>,
    _lock: Option<File>,
    pub opener: Arc<dyn DeviceOpener>,
    pub geo: Geometry,
    pub ephemeral: bool,
    pub read_only: bool,
    pub state: RwLock<State>,
    pub sb: Mutex<Superblock>,
    pub journal: Mutex<JournalWriter>,
    pub commit: Mutex<CommitState>,
    pub commit_cv: Condvar,
    /// Records up to this sequence are settled: a later group is durable, so recovery will
    /// never verify their data again.
    pub settled_seq: AtomicU64,
    poisoned: AtomicBool,
    poison_msg: Mutex<String>,
    pub events: Mutex<Vec<Event>>,
    /// Events ever recorded (those the tables kept at open included): a follower's cursor.
    events_total: AtomicU64,
    events_cv: Condvar,
    low_space_raised: AtomicBool,
    pub closed: AtomicBool,
    /// This open already moved to a new journal epoch (done before its first record, so a
    /// command that fails before changing anything writes nothing).
    pub(crate) epoch_fresh: AtomicBool,
    /// Something changed since the last checkpoint: close must write one.
    pub(crate) dirty: AtomicBool,
    /// Commits records nobody waits for (unflushed writable-snapshot writes), so the window a
    /// crash can lose stays short and quarantined slots come back.
    flusher: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Copy-outs finished so far (see `State::copying`), with what their waiters sleep on.
    pub(crate) copies_done: AtomicU64,
    copy_mx: Mutex<()>,
    copy_cv: Condvar,
    /// The tree commit being written, if any (see `commit`).
    pub(crate) inflight: Mutex<Option<Arc<crate::commit::Inflight>>>,
    /// Wakes the committer thread when a commit is frozen.
    pub(crate) committer_cv: Condvar,
    pub(crate) committer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Origin writes waiting for their copy-out to be durable (see `writeback`).
    pub writeback: Arc<Writeback>,
    /// Drops what deleted and invalid snapshots left, in batches (see `reclaim`).
    pub(crate) reclaimer: crate::reclaim::Reclaimer,
    /// The node cache's budget in nodes (`--cache-size`).
    pub cache_nodes: u64,
    /// Per origin, the first write-back or sync failure. Sticky until the store is reopened:
    /// after a failed fsync Linux drops the dirty pages, so a later sync that succeeds proves
    /// nothing about the data that was lost.
    origin_errors: Mutex<HashMap<u32, String>>,
    /// Superblock copies found damaged at open, for `check` (a torn write or a bad sector: the
    /// other copy carries the store, but one more fault would lose it).
    pub superblock_damage: Mutex<Vec<String>>,
}

/// How often the background flusher commits pending records.
const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

fn spawn_flusher(inner: &Arc<Inner>) {
    let weak = Arc::downgrade(inner);
    let handle = std::thread::Builder::new()
        .name("mvsnap-flush".into())
        .spawn(move || loop {
            std::thread::park_timeout(FLUSH_INTERVAL);
            let Some(inner) = weak.upgrade() else { break };
            if inner.closed.load(Ordering::Acquire) {
                break;
            }
            let seq = inner.appended_seq();
            if seq > inner.commit.lock().durable_seq {
                if let Err(e) = inner.wait_durable(seq) {
                    tracing::error!("background commit failed: {e}");
                    break;
                }
            }
        });
    match handle {
        Ok(h) => *inner.flusher.lock() = Some(h),
        Err(e) => tracing::warn!("no background flusher: {e}"),
    }
}

/// An open COW store. Cheap to clone; every clone is the same store.
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
    pub(crate) handles: Arc<Handles>,
}

/// Shared by every `Store` and `Volume` handle. When the last one goes, the background threads
/// are stopped and joined: they hold the store only weakly, but for moments at a time, and a
/// store dropped without `close` must release its lock (and devices) when its handles go.
/// Writes still queued then are lost, as in a crash: none was flushed.
pub(crate) struct Handles {
    inner: Arc<Inner>,
}

impl Drop for Handles {
    fn drop(&mut self) {
        self.inner.stop_background();
    }
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Inner {
    /// Stop and join the flusher and the write-behind threads (idempotent).
    pub fn stop_background(&self) {
        self.closed.store(true, Ordering::Release);
        if let Some(h) = self.flusher.lock().take() {
            h.thread().unpark();
            let _ = h.join();
        }
        {
            let _slot = self.inflight.lock();
            self.committer_cv.notify_all();
        }
        if let Some(h) = self.committer.lock().take() {
            let _ = h.join();
        }
        self.stop_reclaimer();
        self.writeback.stop();
    }

    pub fn check_poison(&self) -> Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::Poisoned(self.poison_msg.lock().clone()));
        }
        Ok(())
    }

    /// After a failed write or sync of the store nothing more is written (fsync failure
    /// semantics: the page cache may have dropped the data, so a retry could lie).
    pub fn poison(&self, what: &str, e: &std::io::Error) -> Error {
        let msg = format!("{what} {}: {e}", self.path.display());
        tracing::error!("store poisoned: {msg}");
        *self.poison_msg.lock() = msg.clone();
        if !self.poisoned.swap(true, Ordering::AcqRel) {
            self.event(
                EventKind::Poisoned,
                format!("{msg}; nothing more is written until the store is reopened"),
            );
        }
        Error::Poisoned(msg)
    }

    /// An origin found shorter than recorded lost data behind mvsnap's back: its snapshots read
    /// the lost range from it, so they are invalidated, durably and with the reason (they are
    /// not served wrong data). The origin itself stays unavailable until it is put right.
    fn invalidate_shrunk_origins(&self) -> Result<()> {
        let mut st = self.state.write();
        let shrunk: Vec<(u32, String, u64, u64)> = st
            .origins
            .values()
            .filter_map(|o| {
                let found = o.found_size.filter(|&f| f < o.size)?;
                Some((o.no, o.id.clone(), o.size, found))
            })
            .collect();
        for (no, id, size, found) in shrunk {
            let ids: Vec<u64> = st
                .snaps
                .values()
                .filter(|s| s.origin == no && s.state == SnapshotState::Valid)
                .map(|s| s.id)
                .collect();
            if ids.is_empty() {
                continue;
            }
            let reason = format!(
                "origin {id} shrank behind mvsnap's back from {size} to {found} bytes: the data \
                 these snapshots shared with it is gone"
            );
            self.invalidate(&mut st, no, &ids, &reason, &[])?;
            self.event(EventKind::SnapshotInvalidated, reason);
        }
        let seq = self.appended_seq();
        drop(st);
        self.wait_durable(seq)
    }

    /// Say that a superblock copy is damaged (a warning, an event, `check`), and on a writable
    /// open rewrite it from the good one so the store has two copies again.
    fn report_superblock_damage(&self, damage: &[(u64, String)], repair: bool) -> Result<()> {
        for (off, what) in damage {
            let mut what = format!("{}: {what}", self.path.display());
            if repair {
                let good = self.sb.lock().encode();
                self.store_write(&good, *off)?;
                self.store_sync()?;
                what.push_str("; rewritten from the good copy");
            }
            self.event(EventKind::Corruption, what.clone());
            self.superblock_damage.lock().push(what);
        }
        Ok(())
    }

    /// Make an origin's acknowledged writes durable, or say they were lost: a failure (of a
    /// queued write or of the sync) is remembered and every later call fails too.
    pub fn sync_origin(&self, no: u32, dev: &dyn BlockDev) -> Result<()> {
        if let Some(msg) = self.writeback.take_error(no) {
            self.remember_origin_error(no, &msg);
        }
        if let Some(msg) = self.origin_errors.lock().get(&no) {
            return Err(crate::writeback::flush_error(dev.path(), msg.clone()));
        }
        dev.sync().map_err(|e| {
            self.remember_origin_error(no, &format!("sync failed: {e}"));
            Error::io("sync", dev.path(), e)
        })
    }

    fn remember_origin_error(&self, no: u32, msg: &str) {
        tracing::error!(
            origin = no,
            "origin write lost, flushes fail until reopened: {msg}"
        );
        self.origin_errors
            .lock()
            .entry(no)
            .or_insert_with(|| format!("{msg} (earlier; every flush fails until reopened)"));
    }

    /// Write data (a preserved copy, a snapshot's block) into a slot no record points at yet.
    /// A failure does not poison the store: nothing refers to those bytes, so the caller can
    /// give the slot back and fail just that operation (or invalidate what needed the copy).
    pub fn store_write_data(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.dev.write_at(buf, off)
    }

    pub fn store_write(&self, buf: &[u8], off: u64) -> Result<()> {
        self.check_poison()?;
        self.dev
            .write_at(buf, off)
            .map_err(|e| self.poison("write", &e))
    }

    pub fn store_read(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.dev
            .read_at(buf, off)
            .map_err(|e| Error::io("read", &self.path, e))
    }

    pub fn store_sync(&self) -> Result<()> {
        if self.ephemeral {
            return Ok(());
        }
        self.check_poison()?;
        self.dev.sync().map_err(|e| self.poison("sync", &e))
    }

    pub fn event(&self, kind: EventKind, message: String) {
        match kind {
            EventKind::LowSpace | EventKind::SnapshotInvalidated | EventKind::Corruption => {
                tracing::warn!(?kind, "{message}")
            }
            EventKind::Poisoned => tracing::error!(?kind, "{message}"),
            EventKind::Grown => tracing::info!(?kind, "{message}"),
        }
        let mut message = message;
        if message.len() > crate::state::MAX_EVENT_LEN {
            let mut cut = crate::state::MAX_EVENT_LEN - 3;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str("...");
        }
        let mut ev = self.events.lock();
        ev.push(Event {
            time: now(),
            kind,
            message,
        });
        let n = ev.len();
        if n > 1000 {
            ev.drain(..n - 1000);
        }
        self.events_total.fetch_add(1, Ordering::AcqRel);
        self.events_cv.notify_all();
    }

    /// Append a record and apply it to the state (the caller holds the state write lock).
    /// Returns the record's sequence number.
    pub fn log(&self, st: &mut State, rec: Record) -> Result<u64> {
        self.check_poison()?;
        if self.read_only {
            return Err(Error::ReadOnly("store opened read-only".into()));
        }
        if !self.ephemeral && !self.epoch_fresh.load(Ordering::Acquire) {
            // A new journal epoch, so no record a crashed writer left behind can ever
            // validate after ours: a tree commit (cheap: nothing changed yet).
            self.checkpoint_locked(st)?;
        }
        // A record the journal can never hold is refused before anything changes (it used to
        // overflow the journal and poison the store); callers bound their inputs far below.
        let need = rec.encoded_len();
        let max = (self.geo.journal_len / 4) as usize;
        if need > max {
            return Err(Error::InvalidArgument(format!(
                "a metadata record of {need} bytes is more than the journal takes ({max})"
            )));
        }
        self.dirty.store(true, Ordering::Release);
        if self.ephemeral {
            self.spill_if_due(st)?;
        } else {
            self.commit_if_due(st, need)?;
        }
        let seq = {
            let mut j = self.journal.lock();
            if self.ephemeral {
                let s = j.next_seq;
                j.next_seq += 1;
                s
            } else {
                j.append(&rec)
            }
        };
        st.apply(&rec, seq).map_err(|e| {
            // A live record that does not apply is a bug; stop writing before it spreads.
            let e = std::io::Error::other(e);
            self.poison("apply", &e)
        })?;
        Ok(seq)
    }

    /// Wait until a copy-out finishes after `seen` were (the caller read `copies_done` under
    /// the state lock and released it).
    pub(crate) fn wait_copies(&self, seen: u64) {
        let mut g = self.copy_mx.lock();
        while self.copies_done.load(Ordering::Acquire) == seen {
            // Bounded: a poisoned store or a closed one must not leave a writer asleep.
            if self
                .copy_cv
                .wait_for(&mut g, std::time::Duration::from_millis(100))
                .timed_out()
            {
                return;
            }
        }
    }

    /// A copy-out finished (its blocks left `State::copying`): wake its waiters.
    pub(crate) fn copies_finished(&self) {
        self.copies_done.fetch_add(1, Ordering::AcqRel);
        let _g = self.copy_mx.lock();
        self.copy_cv.notify_all();
    }

    /// Highest sequence number appended so far.
    pub fn appended_seq(&self) -> u64 {
        self.journal.lock().next_seq.saturating_sub(1)
    }

    /// The highest record known durable (everything, for an ephemeral store).
    pub fn durable_seq(&self) -> u64 {
        if self.ephemeral {
            return u64::MAX;
        }
        self.commit.lock().durable_seq
    }

    /// Wait up to `timeout` for someone else's group commit to make `seq` durable.
    pub fn wait_committed(&self, seq: u64, timeout: std::time::Duration) -> bool {
        let mut cs = self.commit.lock();
        if cs.durable_seq < seq {
            self.commit_cv.wait_for(&mut cs, timeout);
        }
        cs.durable_seq >= seq
    }

    /// Wait until record `seq` is durable, leading a group commit if nobody else is.
    pub fn wait_durable(&self, seq: u64) -> Result<()> {
        if self.ephemeral {
            return Ok(());
        }
        let mut cs = self.commit.lock();
        loop {
            if cs.durable_seq >= seq {
                return Ok(());
            }
            self.check_poison()?;
            if cs.leader {
                self.commit_cv.wait(&mut cs);
                continue;
            }
            cs.leader = true;
            let before = cs.durable_seq;
            drop(cs);
            let result = self.write_group();
            cs = self.commit.lock();
            cs.leader = false;
            match result {
                Ok(Some(last)) => {
                    cs.durable_seq = last;
                    // The previous group is now followed by a durable one: settled.
                    self.settled_seq.fetch_max(before, Ordering::AcqRel);
                }
                Ok(None) => {}
                Err(e) => {
                    self.commit_cv.notify_all();
                    return Err(e);
                }
            }
            self.commit_cv.notify_all();
        }
    }

    fn write_group(&self) -> Result<Option<u64>> {
        let groups = self.journal.lock().take_groups();
        let Some(last) = groups.last().map(|g| g.last_seq) else {
            // Nothing pending: everything appended was written, or a tree commit covers it.
            return Ok(Some(self.appended_seq()));
        };
        for g in &groups {
            if g.pos + g.bytes.len() as u64 > self.geo.journal_len {
                // Never write past the journal into the data area.
                let e = std::io::Error::other("journal region overflow");
                return Err(self.poison("journal append", &e));
            }
            self.store_write(&g.bytes, JOURNAL_OFFSET + g.pos)?;
        }
        self.store_sync()?;
        Ok(Some(last))
    }

    /// Grow a file-backed store towards its maximum size; returns whether it grew.
    pub fn try_grow(&self, st: &mut State) -> bool {
        let max = self.sb.lock().max_size;
        if self.read_only || !self.dev.can_grow() || max == 0 {
            return false;
        }
        let cur_len = self.geo.slot_offset(0) + st.meta.limit() * META_BLOCK;
        if cur_len >= max || st.meta.limit() >= st.meta.blocks() {
            return false;
        }
        // An eighth at a time, within bounds: a 1 TiB fallocate would stall every writer.
        let step = (cur_len / 8).clamp(64 << 20, 1 << 30);
        let new_len = (cur_len + step).min(max);
        let new_blocks = self.geo.slots_for_len(new_len).min(st.meta.blocks());
        if new_blocks <= st.meta.limit() {
            return false;
        }
        let target = self.geo.slot_offset(0) + new_blocks * META_BLOCK;
        if let Err(e) = self.dev.grow(target) {
            tracing::warn!("could not grow {} to {target}: {e}", self.path.display());
            return false;
        }
        // The new size must be durable before anything (a copy, a record, a header) points
        // past the old end: a power cut may keep those writes and lose the size change.
        if let Err(e) = self.store_sync() {
            tracing::error!(
                "could not make the growth of {} durable: {e}",
                self.path.display()
            );
            return false;
        }
        st.meta.set_limit(new_blocks);
        self.event(
            EventKind::Grown,
            format!("store grown to {target} bytes (max {max})"),
        );
        true
    }

    /// Give the host back the space of blocks the last tree commit freed: punch them out of
    /// a file store (under the state lock, so none is handed out again before). Best effort:
    /// a file system that cannot punch keeps the space.
    pub(crate) fn punch_blocks(&self, mut freed: Vec<u64>) {
        if !self.dev.can_punch() || self.ephemeral || freed.is_empty() {
            return;
        }
        freed.sort_unstable();
        freed.dedup();
        let mut i = 0;
        while i < freed.len() {
            let mut j = i + 1;
            while j < freed.len() && freed[j] == freed[j - 1] + 1 {
                j += 1;
            }
            let (off, len) = (
                self.geo.slot_offset(freed[i] as u32),
                (j - i) as u64 * META_BLOCK,
            );
            if let Err(e) = self.dev.punch(off, len) {
                tracing::warn!(
                    "{}: cannot give freed space back to the host ({e}); it stays allocated",
                    self.path.display()
                );
                return;
            }
            i = j;
        }
    }

    /// After a delete or reclaim: commit the tree, so what it freed can be used again and
    /// its space goes back to the host. `wait`: return once that is done (close,
    /// `wait_reclaimed`); else start the commit beside the writers (the reclaim thread), after
    /// the one running, if any, is over.
    pub(crate) fn release_freed_space(&self, wait: bool) -> Result<()> {
        if self.ephemeral || self.read_only {
            return Ok(());
        }
        loop {
            // Closing (or dropped, as in a crash): the committer is gone, and `close` finishes
            // what is left itself. Poisoned: nothing more is written.
            if !wait && self.closed.load(Ordering::Acquire) {
                return Ok(());
            }
            self.check_poison()?;
            let mut st = self.state.write();
            if st.deferred_frees.is_empty() {
                // A commit running may still hold some (the reclaim thread started it).
                return if wait {
                    self.wait_inflight(&mut st)
                } else {
                    Ok(())
                };
            }
            if wait {
                return self.checkpoint_locked(&mut st);
            }
            self.finish_inflight(&mut st)?;
            if !self.commit_running() {
                return self.start_commit(&mut st);
            }
            drop(st);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Before a record of `need` bytes: start a tree commit when the open transaction holds
    /// [`Inner::dirty_limit`] nodes or the journal is half full; wait for the one running when
    /// the writers outpace it (twice the limit) or the journal has no room for the record.
    fn commit_if_due(&self, st: &mut State, need: usize) -> Result<()> {
        let limit = self.dirty_limit(st);
        let nodes = st.meta.dirty_nodes() as u64;
        if self.commit_running() {
            // A finished one is finished here; one still writing is waited for only when
            // the writers are too far ahead of it.
            self.finish_inflight(st)?;
            if nodes >= 2 * limit || self.journal.lock().nearly_full(need) {
                self.wait_inflight(st)?;
            }
        }
        let (full, half) = {
            let j = self.journal.lock();
            (j.nearly_full(need), j.used() * 2 > j.region_len)
        };
        if full {
            // Only a commit finished to the end empties the journal.
            return self.checkpoint_locked(st);
        }
        if nodes >= limit || half {
            self.start_commit(st)?;
        }
        Ok(())
    }

    /// An ephemeral store never commits: at [`Inner::dirty_limit`] dirty nodes, write them out
    /// uncommitted instead of keeping every change of the session in RAM.
    fn spill_if_due(&self, st: &mut State) -> Result<()> {
        if (st.meta.dirty_nodes() as u64) < self.dirty_limit(st) {
            return Ok(());
        }
        match st.meta.spill() {
            Ok(n) => {
                tracing::debug!(
                    nodes = n,
                    "ephemeral: metadata nodes written out uncommitted"
                );
                Ok(())
            }
            Err(e) => Err(self.poison("writing metadata out", &std::io::Error::other(e))),
        }
    }

    /// Dirty tree nodes at which a tree commit starts: at most [`MAX_DIRTY_NODES`] (its
    /// writes are what a commit costs, and what writers wait for when they outpace it), at
    /// most an eighth of the cache (dirty and frozen nodes are pinned in RAM beside it: up to
    /// twice the limit each, so at most half the cache again), and a small share of a small
    /// store.
    pub fn dirty_limit(&self, st: &State) -> u64 {
        (self.cache_nodes / 8)
            .min(MAX_DIRTY_NODES)
            .min(st.meta.limit() / 64)
            .max(8)
    }

    /// Blocks kept back for the metadata: the nodes the open transaction may still dirty
    /// before its commit, the tables, and room for the commit's own space-map entries.
    pub fn reserve_blocks(&self, st: &State) -> u64 {
        self.reserve_for(st, st.tables_bound())
    }

    fn reserve_for(&self, st: &State, tables_bytes: u64) -> u64 {
        if self.ephemeral {
            return 16;
        }
        // An event is added after the check: room for one more of the longest.
        let events =
            State::events_bytes(&self.events.lock()) + 16 + crate::state::MAX_EVENT_LEN as u64;
        // Twice the limit: the open transaction may reach it while a commit is running.
        2 * self.dirty_limit(st)
            + (tables_bytes + events).div_ceil(META_BLOCK - CK_HEADER as u64)
            + 16
    }

    /// Refuse new metadata of about `extra` table bytes unless the space its commit needs is
    /// there (growing the store if it may): what is already there must always be able to
    /// commit, free and close, so only growth is refused.
    pub fn ensure_meta_room(&self, st: &mut State, extra: u64) -> Result<()> {
        loop {
            if st.meta.usable_free_blocks() >= self.reserve_for(st, st.tables_bound() + extra) {
                return Ok(());
            }
            if (!st.deferred_frees.is_empty() || self.commit_running()) && !self.ephemeral {
                // What records freed comes back with a commit.
                self.checkpoint_locked(st)?;
                if st.meta.usable_free_blocks() >= self.reserve_for(st, st.tables_bound() + extra) {
                    return Ok(());
                }
            }
            if !self.try_grow(st) {
                return Err(Error::NoSpace(format!(
                    "{}: the COW store has no room for more metadata; delete snapshots \
                     or give the store more space",
                    self.path.display()
                )));
            }
        }
    }

    /// Allocate a 4 KiB data block, growing the store if it can; None when the store is full.
    pub fn alloc_data_slot(&self, st: &mut State) -> Option<u32> {
        loop {
            if st.meta.usable_free_blocks() > self.reserve_blocks(st) {
                let s = match st.alloc_block() {
                    Ok(s) => s,
                    Err(e) => {
                        self.poison("allocate a block", &std::io::Error::other(e.to_string()));
                        None
                    }
                };
                self.check_low_space(st);
                return s;
            }
            // Freed blocks come back with a tree commit.
            if (!st.deferred_frees.is_empty() || self.commit_running())
                && !self.ephemeral
                && self.check_poison().is_ok()
            {
                let before = st.meta.usable_free_blocks();
                if let Err(e) = self.checkpoint_locked(st) {
                    tracing::warn!("could not commit to free space: {e}");
                }
                if st.meta.usable_free_blocks() > before {
                    continue;
                }
            }
            if !self.try_grow(st) {
                self.check_low_space(st);
                return None;
            }
        }
    }

    fn check_low_space(&self, st: &State) {
        let pct = self.sb.lock().low_space_percent as u64;
        let total = st.meta.blocks();
        // The metadata reserve is not free for data: it is what is left when a copy fails.
        let free = (st.meta.usable_free_blocks() + st.deferred_frees.len() as u64)
            .saturating_sub(self.reserve_blocks(st))
            + (total - st.meta.limit());
        let low = free * 100 < total * pct;
        if low && !self.low_space_raised.swap(true, Ordering::AcqRel) {
            self.event(
                EventKind::LowSpace,
                format!(
                    "COW store low on space: {} of {} bytes free (threshold {pct}%)",
                    free * META_BLOCK,
                    total * META_BLOCK
                ),
            );
        } else if !low {
            self.low_space_raised.store(false, Ordering::Release);
        }
    }

    pub fn is_low_space(&self) -> bool {
        self.low_space_raised.load(Ordering::Acquire)
    }
}

fn read_superblocks(dev: &dyn BlockDev, path: &Path) -> Result<Superblock> {
    read_superblocks_checked(dev, path).map(|(sb, _)| sb)
}

/// The newest valid superblock, and the copies that failed their checks (offset, why).
fn read_superblocks_checked(
    dev: &dyn BlockDev,
    path: &Path,
) -> Result<(Superblock, Vec<(u64, String)>)> {
    let len = dev.len().map_err(|e| Error::io("stat", path, e))?;
    if len < 2 * META_BLOCK {
        // Too short for both superblocks: truncated if what is left starts like a store.
        let mut head = vec![0u8; len.min(8) as usize];
        dev.read_at(&mut head, 0)
            .map_err(|e| Error::io("read", path, e))?;
        if head == format::SB_MAGIC {
            return Err(Error::corrupt(
                path,
                format!("store is truncated: {len} bytes, shorter than its superblocks"),
            ));
        }
        return Err(Error::NotAStore { path: path.into() });
    }
    let mut best: Option<Superblock> = None;
    let mut errors = Vec::new();
    let mut any_magic = false;
    for off in SB_OFFSETS {
        let mut buf = vec![0u8; META_BLOCK as usize];
        dev.read_at(&mut buf, off)
            .map_err(|e| Error::io("read", path, e))?;
        any_magic |= &buf[..8] == format::SB_MAGIC;
        match Superblock::decode(&buf) {
            Ok(Some(sb)) => {
                if best.as_ref().is_none_or(|b| sb.sb_seq > b.sb_seq) {
                    best = Some(sb);
                }
            }
            Ok(None) => {}
            Err(e) => errors.push((
                off,
                format!("superblock copy at byte {off} is damaged: {e}"),
            )),
        }
    }
    match best {
        Some(sb) => {
            if sb.version != FORMAT_VERSION {
                return Err(Error::Version {
                    path: path.into(),
                    found: sb.version,
                    supported: FORMAT_VERSION,
                });
            }
            Ok((sb, errors))
        }
        None if any_magic => Err(Error::corrupt(
            path,
            errors
                .into_iter()
                .map(|(_, e)| e)
                .collect::<Vec<_>>()
                .join("; "),
        )),
        None => Err(Error::NotAStore { path: path.into() }),
    }
}

impl Store {
    /// Create a new, empty store on a file (created or resized) or a block device.
    pub fn format(path: &Path, opts: &FormatOptions) -> Result<()> {
        if let Some(size) = opts
            .size
            .filter(|&s| opts.max_size != 0 && opts.max_size < s)
        {
            return Err(Error::InvalidArgument(format!(
                "--max-size {} is smaller than --size {size}",
                opts.max_size
            )));
        }
        let exists = path.exists();
        if let Some(size) = opts.size {
            // Refused before anything is created or changed.
            Self::format_geometry(size, size.max(opts.max_size))?;
        }
        if !exists {
            File::create(path).map_err(|e| Error::io("create", path, e))?;
        }
        let dev = FileDev::open(path, true).map_err(|e| Error::io("open", path, e))?;
        if !try_lock(dev.file(), true).map_err(|e| Error::io("lock", path, e))? {
            return Err(Error::Locked { path: path.into() });
        }
        if exists && !opts.force {
            match read_superblocks(&dev, path) {
                Err(Error::NotAStore { .. }) => {}
                _ => return Err(Error::StoreExists { path: path.into() }),
            }
            if let Some(what) =
                crate::signature::find_data(&dev).map_err(|e| Error::io("read", path, e))?
            {
                return Err(Error::HoldsData {
                    path: path.into(),
                    what,
                });
            }
        }
        let size = if dev.can_grow() {
            // A file keeps its size unless a bigger one is asked for: formatting never shrinks,
            // whatever the file held (the user may have meant another file).
            let cur = dev.len().map_err(|e| Error::io("stat", path, e))?;
            let want = match opts.size {
                None if cur > 0 => cur,
                None => FormatOptions::DEFAULT_SIZE,
                Some(asked) if asked < cur => {
                    return Err(Error::WouldShrink {
                        path: path.into(),
                        current: cur,
                        asked,
                    })
                }
                Some(asked) => asked,
            };
            dev.grow(want).map_err(|e| Error::io("allocate", path, e))?;
            want
        } else {
            dev.len().map_err(|e| Error::io("stat", path, e))?
        };
        let max_len = if dev.can_grow() {
            size.max(opts.max_size)
        } else {
            size
        };
        let (geo, max_blocks) = Self::format_geometry(size, max_len)?;
        // Wipe the first journal block so nothing of an old store can ever look valid.
        dev.write_at(&vec![0u8; META_BLOCK as usize], JOURNAL_OFFSET)
            .map_err(|e| Error::io("write", path, e))?;
        let mut sb = Superblock {
            version: FORMAT_VERSION,
            uuid: {
                // A version-4 UUID.
                let mut u: [u8; 16] = rand::random();
                u[6] = (u[6] & 0x0f) | 0x40;
                u[8] = (u[8] & 0x3f) | 0x80;
                u
            },
            geo,
            max_size: if dev.can_grow() { opts.max_size } else { 0 },
            low_space_percent: opts.low_space_percent,
            sb_seq: 0,
            epoch: rand::random::<u32>() as u64,
            journal_seq: 1,
            checkpoint: None,
            store_len: size,
        };
        // The metadata: an empty tree and space map, and empty tables.
        let epoch = sb.epoch;
        let shared: Arc<dyn BlockDev> = Arc::new(dev);
        let ioerr = |e: crate::pdata::PdataError| {
            Error::io(
                "write the metadata of",
                path,
                std::io::Error::other(e.to_string()),
            )
        };
        let mut meta = crate::pdata::meta::Meta::format_at(
            shared.clone(),
            geo.data_start,
            max_blocks,
            1 << 20,
            [epoch, 1, u64::MAX, 0, 0, 0, 0, 0],
        )
        .map_err(ioerr)?;
        meta.set_limit(geo.slots_for_len(size));
        let mut st = State::new(geo, meta);
        let stream = st.serialize_tables(&[]);
        let (blocks, writes) = table_blocks(&mut st, epoch, &stream)
            .map_err(ioerr)?
            .ok_or_else(|| Error::InvalidArgument("store too small".into()))?;
        for (offset, bytes) in &writes {
            shared
                .write_at(bytes, *offset)
                .map_err(|e| Error::io("write", path, e))?;
        }
        st.meta
            .commit([
                epoch,
                1,
                blocks[0],
                stream.len() as u64,
                format::crc(format::SALT_CHECKPOINT, &stream) as u64,
                0,
                0,
                0,
            ])
            .map_err(ioerr)?;
        // Both copies, so a stale copy of an older store can never win.
        for _ in 0..2 {
            sb.sb_seq += 1;
            shared
                .write_at(&sb.encode(), SB_OFFSETS[(sb.sb_seq % 2) as usize])
                .map_err(|e| Error::io("write", path, e))?;
        }
        shared.sync().map_err(|e| Error::io("sync", path, e))?;
        Ok(())
    }

    /// The geometry of a store of `size` bytes that may grow to `max_len`, and the blocks its
    /// space map covers; refused if it is too small or too big. Format v2 allocates 4 KiB
    /// blocks, data and metadata alike.
    fn format_geometry(size: u64, max_len: u64) -> Result<(Geometry, u64)> {
        let geo = Geometry::new(BLOCK, Geometry::default_journal_len(size))
            .map_err(Error::InvalidArgument)?;
        for (what, len) in [("size", size), ("--max-size", max_len)] {
            if geo.slots_for_len(len) > MAX_SLOTS {
                return Err(Error::InvalidArgument(format!(
                    "store {what} {len} is too big: at most {} bytes",
                    geo.data_start + MAX_SLOTS * BLOCK as u64
                )));
            }
        }
        let max_blocks = geo.slots_for_len(max_len);
        let fixed = crate::pdata::meta::Meta::fixed_blocks(max_blocks);
        if geo.slots_for_len(size) < fixed + 32 {
            return Err(Error::InvalidArgument(format!(
                "store size {size} is too small: it needs at least {} bytes",
                geo.data_start + (fixed + 32) * BLOCK as u64
            )));
        }
        Ok((geo, max_blocks))
    }

    /// Open a store file or device, recovering from the journal.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Store> {
        let dev = FileDev::open(path, !opts.read_only)
            .map_err(|e| Error::io("open", path, e))?
            .discarding(opts.discard);
        if !try_lock(dev.file(), !opts.read_only).map_err(|e| Error::io("lock", path, e))? {
            return Err(Error::Locked { path: path.into() });
        }
        let lock = dev
            .file()
            .try_clone()
            .map_err(|e| Error::io("open", path, e))?;
        Self::open_with(Arc::new(dev), Some(lock), Arc::new(FileOpener), opts)
    }

    /// Open through any block-I/O backend (tests use a crash simulator here).
    pub fn open_with(
        dev: Arc<dyn BlockDev>,
        lock: Option<File>,
        opener: Arc<dyn DeviceOpener>,
        opts: &OpenOptions,
    ) -> Result<Store> {
        let dev = crate::blockdev::FailStop::wrap(dev);
        let path = dev.path().to_path_buf();
        // Recovery must judge what is on the device, not what the page cache still shows: after
        // a failed sync (a poisoned store, then a restart in the same boot) the cache holds
        // writes the device never got, and replay would vouch for them.
        dev.drop_cache()
            .map_err(|e| Error::io("drop the cache of", &path, e))?;
        let (sb, sb_damage) = read_superblocks_checked(&*dev, &path)?;
        let geo = sb.geo;
        let len = dev.len().map_err(|e| Error::io("stat", &path, e))?;
        if len < geo.data_start + geo.chunk_size as u64 {
            return Err(Error::corrupt(
                &path,
                format!(
                    "store is truncated: {len} bytes, its data area starts at {}",
                    geo.data_start
                ),
            ));
        }
        // 1. The tree's newest durable version, and the tables it points at.
        let cache_bytes = opts.cache_bytes.unwrap_or(DEFAULT_CACHE_BYTES).max(1 << 20);
        let mut meta = crate::pdata::meta::Meta::open_at(dev.clone(), geo.data_start, cache_bytes)
            .map_err(|e| {
                if len < sb.store_len {
                    Error::corrupt(
                        &path,
                        format!(
                            "store is truncated: {len} bytes, it had {}: metadata: {e}",
                            sb.store_len
                        ),
                    )
                } else {
                    Error::corrupt(&path, format!("metadata: {e}"))
                }
            })?;
        if opts.ephemeral {
            meta.set_sync(false);
        }
        // Blocks past the end of a file not grown that far are never handed out.
        meta.set_limit(geo.slots_for_len(len));
        let user = meta.user();
        let (epoch, journal_seq, first_table, table_len, table_crc, journal_start) =
            (user[0], user[1], user[2], user[3], user[4] as u32, user[6]);
        // What refers past the end of a shorter file says first that the store is truncated.
        let store_len = sb.store_len.max(user[5]);
        let truncated = |e: Error| match e {
            Error::Corrupt { path, what } if len < store_len => Error::Corrupt {
                path,
                what: format!("store is truncated: {len} bytes, it had {store_len}: {what}"),
            },
            e => e,
        };
        let (stream, table_blocks) =
            read_tables(&*dev, &path, geo, &meta, first_table, table_len, table_crc)
                .map_err(truncated)?;
        let (mut st, events) = State::deserialize_tables(geo, meta, &stream)
            .map_err(|e| truncated(Error::corrupt(&path, format!("tables: {e}"))))?;
        st.table_blocks = table_blocks;
        st.ephemeral = opts.ephemeral;
        let mut sb = sb;
        sb.epoch = epoch;
        sb.journal_seq = journal_seq;

        // 2. The journal.
        let (groups, next_seq) = journal::scan(
            geo.journal_len,
            sb.epoch,
            sb.journal_seq,
            journal_start,
            &mut |off, buf| dev.read_at(buf, JOURNAL_OFFSET + off),
        )
        .map_err(|e| Error::io("read journal", &path, e))?;
        let ngroups = groups.len();
        let mut replayed = 0u64;
        let mut last_seq = sb.journal_seq - 1;
        // Every data block the records name is taken first: replay's own tree changes allocate
        // nodes, and must not land on a block a later record names. The blocks of records not
        // replayed (a torn tail) are given back after.
        let mut named: Vec<(u64, u32)> = Vec::new();
        for g in &groups {
            for (seq, rec) in &g.records {
                if let Record::Preserve { slot, .. } | Record::MapWrite { slot, .. } = rec {
                    if *slot != crate::state::ZERO_SLOT {
                        let ok = st
                            .meta
                            .claim_block(*slot as u64)
                            .map_err(|e| Error::corrupt(&path, format!("metadata: {e}")))?;
                        if !ok {
                            return Err(truncated(Error::corrupt(
                                &path,
                                format!(
                                    "journal record {seq}: block {slot} is used twice or lies \
                                     past the end of the store"
                                ),
                            )));
                        }
                        named.push((*seq, *slot));
                    }
                }
            }
        }
        'replay: for (gi, g) in groups.into_iter().enumerate() {
            // Only the last group may be one whose sync never completed: verify its data.
            let verify = gi + 1 == ngroups;
            for (seq, rec) in g.records {
                if verify && !data_intact(&*dev, geo, &rec)? {
                    tracing::info!(
                        seq,
                        "journal tail: data of a record never became durable; stopping replay"
                    );
                    break 'replay;
                }
                st.apply(&rec, seq).map_err(|e| {
                    truncated(Error::corrupt(&path, format!("journal record {seq}: {e}")))
                })?;
                replayed += 1;
                last_seq = seq;
            }
        }
        for (seq, slot) in named {
            if seq > last_seq {
                st.meta
                    .free_block(slot as u64)
                    .map_err(|e| Error::corrupt(&path, format!("metadata: {e}")))?;
            }
        }
        let _ = next_seq;
        st.unsettled_slots.clear();

        // 3. The origins.
        for o in st.origins.values_mut() {
            o.dev = open_origin(&*opener, &o.path, &o.id, o.size, !opts.read_only);
            if o.dev.is_err() {
                o.found_size = opener
                    .open(Path::new(&o.path), false)
                    .and_then(|d| d.len())
                    .ok()
                    .filter(|&found| found != o.size);
            }
        }
        if opts.ephemeral && st.snaps.values().any(|s| s.state != SnapshotState::Hidden) {
            return Err(Error::Busy(format!(
                "{}: --ephemeral needs a store without persistent snapshots; delete them first",
                path.display()
            )));
        }

        let journal = JournalWriter::new(sb.epoch, last_seq + 1, geo.journal_len, journal_start);
        let inner = Arc::new(Inner {
            path: path.clone(),
            dev,
            _lock: lock,
            opener,
            geo,
            ephemeral: opts.ephemeral,
            read_only: opts.read_only,
            state: RwLock::new(st),
            sb: Mutex::new(sb),
            journal: Mutex::new(journal),
            commit: Mutex::new(CommitState {
                durable_seq: last_seq,
                leader: false,
            }),
            commit_cv: Condvar::new(),
            settled_seq: AtomicU64::new(last_seq),
            poisoned: AtomicBool::new(false),
            poison_msg: Mutex::new(String::new()),
            events: Mutex::new(Vec::new()),
            events_total: AtomicU64::new(events.len() as u64),
            events_cv: Condvar::new(),
            low_space_raised: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            epoch_fresh: AtomicBool::new(false),
            origin_errors: Mutex::new(HashMap::new()),
            superblock_damage: Mutex::new(Vec::new()),
            dirty: AtomicBool::new(false),
            flusher: Mutex::new(None),
            inflight: Mutex::new(None),
            copies_done: AtomicU64::new(0),
            copy_mx: Mutex::new(()),
            copy_cv: Condvar::new(),
            committer_cv: Condvar::new(),
            committer: Mutex::new(None),
            writeback: Writeback::new(),
            reclaimer: Default::default(),
            cache_nodes: cache_bytes / META_BLOCK,
        });
        inner.events.lock().extend(events);
        inner.report_superblock_damage(&sb_damage, !opts.read_only && !opts.ephemeral)?;
        if !opts.read_only && !opts.ephemeral {
            inner.invalidate_shrunk_origins()?;
        }
        if !opts.read_only && !opts.ephemeral {
            let mut st = inner.state.write();
            if replayed > 0 {
                // Fold the replayed records into a checkpoint: a new epoch, an empty journal.
                inner.checkpoint_locked(&mut st)?;
            }
            // Otherwise the new epoch starts with the first record (`log`).
        }
        if !opts.read_only && !opts.ephemeral {
            spawn_flusher(&inner);
            crate::commit::spawn_committer(&inner)
                .map_err(|e| Error::io("start the committer thread for", &path, e))?;
            crate::reclaim::spawn_reclaimer(&inner)
                .map_err(|e| Error::io("start the reclaim thread for", &path, e))?;
            inner.queue_dead_ranges(&inner.state.read());
            inner
                .writeback
                .spawn_workers(Arc::downgrade(&inner))
                .map_err(|e| Error::io("start write-behind threads for", &path, e))?;
        }
        if len < store_len {
            tracing::warn!(
                "{}: the store is {len} bytes, it was grown to {store_len} (a power cut lost the \
                 size change); nothing refers past its end, so it opens at its size",
                path.display()
            );
        }
        tracing::debug!(replayed, "store opened");
        let handles = Arc::new(Handles {
            inner: inner.clone(),
        });
        Ok(Store { inner, handles })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The store's UUID, read without taking its lock (a running daemon holds it): the daemon's
    /// sockets are named after it, so every command finds them from the store path alone.
    pub fn probe_uuid(path: &Path) -> Result<String> {
        let dev = FileDev::open(path, false).map_err(|e| Error::io("open", path, e))?;
        let sb = read_superblocks(&dev, path)?;
        Ok(format::uuid_string(&sb.uuid))
    }

    pub fn uuid(&self) -> String {
        format::uuid_string(&self.inner.sb.lock().uuid)
    }

    /// Make everything durable and write a checkpoint, so the next open replays nothing.
    pub fn close(self) -> Result<()> {
        self.shutdown()
    }

    /// Whether `close`/`shutdown` ran (background helpers of a front end stop then).
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// Like `close`, for a store shared by several handles (the daemon).
    pub fn shutdown(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        if !self.inner.read_only && !self.inner.ephemeral {
            // Space of deleted snapshots goes back before the store closes (a CLI delete runs
            // in a process that ends right after). A failure shows below as the poison.
            if let Err(e) = self.inner.finish_reclaim() {
                tracing::warn!("reclaim at close: {e}");
            }
        }
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.inner.writeback.drain(&self.inner);
        self.inner.stop_background();
        if self.inner.read_only || self.inner.ephemeral {
            return Ok(());
        }
        self.inner.check_poison()?;
        let mut st = self.inner.state.write();
        for (&no, o) in st.origins.iter() {
            if let Ok(d) = &o.dev {
                self.inner.sync_origin(no, &**d)?;
            }
        }
        if !self.inner.dirty.load(Ordering::Acquire) {
            // No metadata changed, so the store's bytes stay as they were; but writes into
            // blocks a writable snapshot already owned may still be in the page cache.
            return self.inner.store_sync();
        }
        self.inner.checkpoint_locked(&mut st)
    }

    /// Write a checkpoint now (bounds recovery time).
    pub fn checkpoint(&self) -> Result<()> {
        let mut st = self.inner.state.write();
        self.inner.checkpoint_locked(&mut st)
    }

    /// Make every record appended so far durable, and issue every queued origin write (an
    /// origin's `flush` then makes those durable too).
    pub fn sync(&self) -> Result<()> {
        self.inner.writeback.drain(&self.inner);
        // A poisoned store must say so even when nothing is pending.
        self.inner.check_poison()?;
        let seq = self.inner.appended_seq();
        self.inner.wait_durable(seq)
    }

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

    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        let st = self.inner.state.read();
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
        let st = self.inner.state.read();
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
            dirty_bytes: st.meta.dirty_nodes() as u64 * cs,
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
    if let Some(o) = st.origins.values().find(|o| o.path == abs_s) {
        return Err(Error::AlreadyExists(format!(
            "origin {} (as {})",
            abs.display(),
            o.id
        )));
    }
    Ok(())
}

/// Whether two paths name the same file (device and inode); false if either cannot be read.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// The longest memo a snapshot takes, in bytes.
pub const MAX_MEMO: usize = 4096;
/// The longest origin path, in bytes (Linux's PATH_MAX).
const MAX_PATH: usize = 4096;

/// Whether `name` is a valid origin id or snapshot tag (`what` names it in the error); public
/// so that front ends refuse a bad name as a usage error before opening anything.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:+".contains(c))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{what} {name:?}: use 1-128 characters from A-Z a-z 0-9 - _ . : +"
        )))
    }
}

/// `ORIGIN` or `ORIGIN@TAG` to (origin number, snapshot id).
pub(crate) fn resolve_name(st: &State, name: &str) -> Result<(u32, Option<u64>)> {
    let (oid, tag) = match name.split_once('@') {
        Some((o, t)) => (o, Some(t)),
        None => (name, None),
    };
    let o = st
        .origin_by_id(oid)
        .ok_or_else(|| Error::NotFound(format!("origin {oid}")))?;
    match tag {
        None => Ok((o.no, None)),
        Some(t) => {
            let s = st
                .snap_by_tag(o.no, t)
                .ok_or_else(|| Error::NotFound(format!("snapshot {name}")))?;
            Ok((o.no, Some(s.id)))
        }
    }
}

fn open_origin(
    opener: &dyn DeviceOpener,
    path: &str,
    id: &str,
    size: u64,
    writable: bool,
) -> Result<Arc<dyn BlockDev>, String> {
    let dev = opener
        .open(Path::new(path), writable)
        .map_err(|e| format!("origin {id}: cannot open {path}: {e}"))?;
    // As for the store: reads (recovery's checks, copy-outs) must see the device.
    dev.drop_cache()
        .map_err(|e| format!("origin {id}: {path}: dropping its cache: {e}"))?;
    let found = dev.len().map_err(|e| format!("origin {id}: {path}: {e}"))?;
    if found != size {
        return Err(Error::OriginSizeChanged {
            id: id.to_string(),
            recorded: size,
            found,
        }
        .to_string());
    }
    Ok(crate::blockdev::FailStop::wrap(dev))
}

/// Writes of the tables' blocks: (byte offset in the store, block).
pub(crate) type TableWrites = Vec<(u64, Vec<u8>)>;

/// The tables' stream as a chain of fresh blocks, allocated in the open transaction: the
/// blocks, and their writes. None: no room (nothing allocated).
pub(crate) fn table_blocks(
    st: &mut State,
    stamp: u64,
    stream: &[u8],
) -> std::result::Result<Option<(Vec<u64>, TableWrites)>, crate::pdata::PdataError> {
    let payload = META_BLOCK as usize - CK_HEADER;
    let n = stream.len().div_ceil(payload).max(1);
    let mut blocks = Vec::with_capacity(n);
    for _ in 0..n {
        match st.meta.alloc_block()? {
            Some(b) => blocks.push(b),
            None => {
                for b in blocks {
                    st.meta.free_block(b)?;
                }
                return Ok(None);
            }
        }
    }
    let writes = stream
        .chunks(payload)
        .enumerate()
        .map(|(i, piece)| {
            let next = blocks.get(i + 1).map_or(NO_SLOT, |&b| b as u32);
            (
                st.geo.slot_offset(blocks[i] as u32),
                table_block(stamp, i, next, piece),
            )
        })
        .collect();
    Ok(Some((blocks, writes)))
}

/// One block of the tables' chain: a header (magic, checksum, the stamp of the commit that
/// wrote it, index, next block, payload length) and its piece of the stream.
fn table_block(stamp: u64, index: usize, next: u32, piece: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(CK_HEADER + piece.len());
    buf.extend_from_slice(&CK_MAGIC.to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&stamp.to_le_bytes());
    buf.extend_from_slice(&(index as u32).to_le_bytes());
    buf.extend_from_slice(&next.to_le_bytes());
    buf.extend_from_slice(&(piece.len() as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(piece);
    let c = format::crc(format::SALT_CHECKPOINT, &buf[8..]);
    buf[4..8].copy_from_slice(&c.to_le_bytes());
    buf
}

/// The tables of the durable version: a chain of blocks, each with its own checksum, and
/// one over the whole stream in the metadata header.
fn read_tables(
    dev: &dyn BlockDev,
    path: &Path,
    geo: Geometry,
    meta: &crate::pdata::meta::Meta,
    first: u64,
    len: u64,
    crc: u32,
) -> Result<(Vec<u8>, Vec<u64>)> {
    let mut stream = Vec::with_capacity(len as usize);
    let mut blocks = Vec::new();
    let mut block = first;
    let payload = META_BLOCK as usize - CK_HEADER;
    let mut buf = vec![0u8; META_BLOCK as usize];
    let mut tab_epoch = None;
    while (stream.len() as u64) < len || blocks.is_empty() {
        if block >= meta.limit() || blocks.len() as u64 > meta.limit() {
            return Err(Error::corrupt(
                path,
                format!("tables block {block} lies past the end of the store"),
            ));
        }
        let want = (len as usize - stream.len()).min(payload);
        let blk = &mut buf[..CK_HEADER + want];
        dev.read_at(blk, geo.slot_offset(block as u32))
            .map_err(|e| Error::io("read the tables of", path, e))?;
        let magic = u32::from_le_bytes(blk[0..4].try_into().unwrap());
        let c = u32::from_le_bytes(blk[4..8].try_into().unwrap());
        let e = u64::from_le_bytes(blk[8..16].try_into().unwrap());
        let idx = u32::from_le_bytes(blk[16..20].try_into().unwrap());
        let next = u32::from_le_bytes(blk[20..24].try_into().unwrap());
        let plen = u32::from_le_bytes(blk[24..28].try_into().unwrap()) as usize;
        if magic != CK_MAGIC
            || plen != want
            || idx as usize != blocks.len()
            || format::crc(format::SALT_CHECKPOINT, &blk[8..]) != c
        {
            return Err(Error::corrupt(
                path,
                format!("tables block {block} is damaged (checksum or header mismatch)"),
            ));
        }
        if *tab_epoch.get_or_insert(e) != e {
            return Err(Error::corrupt(path, "tables blocks of different commits"));
        }
        stream.extend_from_slice(&blk[CK_HEADER..]);
        blocks.push(block);
        block = next as u64;
    }
    if format::crc(format::SALT_CHECKPOINT, &stream) != crc {
        return Err(Error::corrupt(path, "tables checksum mismatch"));
    }
    Ok((stream, blocks))
}

/// For a record of the last journal group: is the data it vouches for really on disk?
fn data_intact(dev: &dyn BlockDev, geo: Geometry, rec: &Record) -> Result<bool> {
    let (slot, bits, crc) = match rec {
        Record::Preserve {
            slot, bits, crc, ..
        } => (*slot, *bits, *crc),
        Record::MapWrite {
            slot,
            data_bits,
            crc,
            ..
        } => (*slot, *data_bits, *crc),
        _ => return Ok(true),
    };
    if slot == crate::state::ZERO_SLOT {
        return Ok(true); // nothing was written: the blocks read as zeroes
    }
    if (slot as u64) >= geo.slots_for_len(dev.len().unwrap_or(0)) {
        return Ok(false);
    }
    Ok(crate::volume::blocks_crc(dev, geo, slot, bits)
        .map(|c| c == crc)
        .unwrap_or(false))
}
