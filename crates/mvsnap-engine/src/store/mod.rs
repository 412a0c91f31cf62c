//! The store: the shared state of an open store (`Inner`), poisoning, events, and closing.
//! One module per concern: `open` (format and recovery), `group` (group commit), `tables`,
//! `space`, `admin` (origins and snapshots); tree commits are in `crate::commit`, volume I/O in
//! `crate::volume`.

mod admin;
mod group;
mod open;
mod space;
mod tables;

use open::read_superblocks;
pub(crate) use tables::{alloc_table_blocks, table_blocks, table_writes, TableWrites};

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex, RwLock, RwLockWriteGuard};

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
/// Dirty nodes that start a tree commit at most (64 MiB; reached with a 320 MiB cache).
/// Commits run beside the writers, so this no longer bounds a stall; bigger sets amortize a
/// leaf's write over more changes to it (docs/BENCHMARKS.md, "Commits beside the writers",
/// "The dirty limit"). What it still bounds: a freeze's work under the state lock, and the
/// journal a crash replays.
const MAX_DIRTY_NODES: u64 = 16384;
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
    /// The durable header does not vouch for the origins' page cache (`ORIGINS_CLEAN` absent):
    /// origin writes may go ahead. False after a clean close until the first origin write.
    pub(crate) origins_marked_unclean: AtomicBool,
    /// The commit being frozen is a clean close's last: its header vouches for the origins.
    pub(crate) closing_clean: AtomicBool,
    /// Commits records nobody waits for (unflushed writable-snapshot writes), so the window a
    /// crash can lose stays short and quarantined slots come back.
    flusher: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Copy-outs finished so far (see `State::copying`), with what their waiters sleep on.
    pub(crate) copies_done: AtomicU64,
    copy_mx: Mutex<()>,
    copy_cv: Condvar,
    /// Copy-outs made and not logged yet, and how many (see `copyout`).
    pub(crate) finished: Mutex<Vec<crate::copyout::Finished>>,
    pub(crate) finished_len: std::sync::atomic::AtomicUsize,
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
    /// Bring into the node cache, without the state lock, the metadata nodes `probe` finds
    /// missing, then run `then` under the read lock of the probe that found none missing
    /// (one lock round for the lookups that follow, not two). A device read under the lock
    /// stalls every reader and writer behind it (the lock is fair: a queued writer holds back
    /// new readers), and with millions of mappings the tree outgrows the cache, so most first
    /// writes would miss a leaf. Each round reads one more level of the paths; after an error
    /// or at the tree's depth, `then` runs anyway (its own lookups read or report the rest).
    pub fn with_nodes_read<R>(
        &self,
        probe: impl Fn(&State) -> Vec<(u64, u32)>,
        then: impl FnOnce(&State) -> R,
    ) -> R {
        self.with_nodes(|| self.state.read(), probe, |st| then(&st))
    }

    /// [`Inner::with_nodes_read`] for lookups that will likely lead to a change of the state
    /// (a first write's, which then claims its copies): the probe and `then` run under the
    /// write lock, one round where a read round and then a write round would queue twice.
    /// Profiled with first writes at QD16: most of the writers' spinning was on the read
    /// side of that pair (the lock is fair, so each read round queues behind the claims).
    pub fn with_nodes_write<R>(
        &self,
        probe: impl Fn(&State) -> Vec<(u64, u32)>,
        then: impl FnOnce(RwLockWriteGuard<'_, State>) -> R,
    ) -> R {
        self.with_nodes(|| self.state.write(), probe, then)
    }

    /// The rounds of [`Inner::with_nodes_read`] under either side of the state lock.
    fn with_nodes<G: std::ops::Deref<Target = State>, R>(
        &self,
        lock: impl Fn() -> G,
        probe: impl Fn(&State) -> Vec<(u64, u32)>,
        then: impl FnOnce(G) -> R,
    ) -> R {
        for _ in 0..=crate::pdata::btree::MAX_DEPTH {
            let st = lock();
            let missed = probe(&st);
            if missed.is_empty() {
                return then(st);
            }
            let fetcher = st.meta.fetcher();
            drop(st);
            if !fetcher.fetch_all(missed) {
                break;
            }
        }
        then(lock())
    }

    /// Stop and join the flusher and the write-behind threads (idempotent).
    pub fn stop_background(&self) {
        self.closed.store(true, Ordering::Release);
        // Each handle is taken out of its slot before the join: a guard kept over the join
        // (an `if let` on `slot.lock().take()` keeps it) deadlocked a drop against the reclaim
        // thread, which asks whether a committer exists while holding the state lock, which
        // the committer was waiting for.
        let flusher = self.flusher.lock().take();
        if let Some(h) = flusher {
            h.thread().unpark();
            let _ = h.join();
        }
        {
            let _slot = self.inflight.lock();
            self.committer_cv.notify_all();
        }
        let committer = self.committer.lock().take();
        if let Some(h) = committer {
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

    /// Called before an origin write reaches its device. After a clean close the durable
    /// header vouches for the origins' page cache, and the next open kept it; before this open
    /// writes an origin, a header that no longer vouches must be durable, or a failed sync and
    /// a crash now would leave pages the device never got trusted at the next open.
    pub(crate) fn before_origin_write(&self) -> Result<()> {
        if self.origins_marked_unclean.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut st = self.state.write();
        if !self.origins_marked_unclean.load(Ordering::Acquire) {
            self.checkpoint_locked(&mut st)?;
            self.origins_marked_unclean.store(true, Ordering::Release);
        }
        Ok(())
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
}

impl Store {
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
        // Every origin write of this open is durable: the header may say so again.
        let header_vouches = !self.inner.origins_marked_unclean.load(Ordering::Acquire);
        if !self.inner.dirty.load(Ordering::Acquire) && header_vouches {
            // No metadata changed, so the store's bytes stay as they were; but writes into
            // blocks a writable snapshot already owned may still be in the page cache.
            return self.inner.store_sync();
        }
        self.inner.closing_clean.store(true, Ordering::Release);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A store dropped while its committer waits for the state lock, held by a thread that
    /// then asks for the committer's slot (as the reclaim thread's `start_commit` does): the
    /// drop must not hold that slot while it joins the committer (it did, and CI hung).
    #[test]
    fn a_drop_joining_the_committer_leaves_its_slot_free() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.store");
        let opts = FormatOptions {
            size: Some(64 << 20),
            ..Default::default()
        };
        Store::format(&path, &opts).unwrap();
        let store = Store::open(&path, &OpenOptions::default()).unwrap();
        store.checkpoint().unwrap(); // the open's first commit runs to the end; later ones beside
        let inner = store.inner.clone();
        let mut st = inner.state.write();
        inner.start_commit(&mut st).unwrap();
        assert!(inner.commit_running());
        // The committer writes the commit, then waits for the state lock to finish it.
        std::thread::sleep(Duration::from_millis(300));
        let stopper = {
            let inner = inner.clone();
            std::thread::spawn(move || inner.stop_background())
        };
        std::thread::sleep(Duration::from_millis(300));
        // Still joining the committer, which waits for `st`.
        assert!(!stopper.is_finished());
        let slot = inner.committer.try_lock_for(Duration::from_secs(2));
        assert!(
            slot.is_some(),
            "the drop holds the committer's slot over its join"
        );
        drop(slot);
        drop(st);
        stopper.join().unwrap();
        assert!(
            !inner.commit_running(),
            "the committer finished its commit first"
        );
        drop(store);
    }
}
