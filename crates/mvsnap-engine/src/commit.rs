//! Tree commits beside the writers.
//!
//! A tree commit makes the open transaction (every record applied since the last one) the
//! durable version. Under the state write lock it only *freezes*: the tables but the overlay
//! are serialized, the overlay is taken as it is (O(1): a persistent map), fresh blocks are
//! allocated for the whole stream, the space map's selectors go into the tree, the dirty nodes
//! and changed bitmaps become the frozen version, the journal is sealed at the point the new
//! header will start recovery from, and a new transaction opens on top of the frozen version.
//! The writes (tables, with the overlay serialized and their checksum put into the header;
//! nodes, bitmaps, sync, header, sync) then run on the committer thread while writers
//! go on logging records and changing the new transaction; readers see the frozen version as
//! committed. Whoever runs the writes gives the host back the space of the blocks the commit
//! freed (punch or discard) once the new header is durable: the space map still counts them
//! used in the old durable version, so none can be handed out yet. Whoever next holds the
//! state lock then *finishes* the commit: the frozen version is the durable one, the journal
//! before the seal may be written over, and those blocks may be handed out again.
//!
//! Ordering (DESIGN.md): nothing the durable version uses is written before the new header is
//! durable (the space map hands out only blocks free in the durable, frozen and working
//! versions); the records a frozen version covers stay in the journal until its header is
//! durable; a crash meanwhile recovers the old version and replays the journal from its start,
//! through the sealed records and on into those logged after the seal. The commit's own sync
//! vouches for its writes even if another thread's sync of the store failed meanwhile (and
//! Linux dropped them): the store device fail-stops (`blockdev::FailStop`).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::format::{self, META_BLOCK};
use crate::journal::Mark;
use crate::pdata::meta::{CommitJob, CommitStats};
use crate::pdata::overlay::FrozenOverlay;
use crate::pdata::PdataError;
use crate::state::State;
use crate::store::{alloc_table_blocks, table_writes, Inner, TableWrites};

/// The tree's writes and the tables' of one commit.
type Writes = (CommitJob, Tables);

/// The tables of a commit, put together by whoever writes it: the overlay of preserved
/// entries is most of them at scale (5.6 MB at 175k entries), and serializing it under the
/// state lock held every writer 7-14 ms a commit at 4M mappings.
struct Tables {
    /// Everything but the overlay ([`State::tables_head`]).
    head: Vec<u8>,
    /// The overlay as it was at the freeze.
    overlay: FrozenOverlay,
    /// Allocated at the freeze for the stream's length.
    blocks: Vec<u64>,
    stamp: u64,
}

/// The header's user word that holds the tables' checksum.
const TABLES_CRC_WORD: usize = 4;

impl Tables {
    /// The stream's checksum, and its writes into the blocks.
    fn writes(self, inner: &Inner) -> (u32, TableWrites) {
        let stream = State::tables_with_overlay(self.head, &self.overlay);
        let crc = format::crc(format::SALT_CHECKPOINT, &stream);
        (
            crc,
            table_writes(inner.geo, self.stamp, &self.blocks, &stream),
        )
    }
}

/// A commit frozen and being written.
pub(crate) struct Inflight {
    /// The writes, until someone takes them to run (the committer thread, or a thread that
    /// must wait for the commit and holds the state lock anyway).
    job: Mutex<Option<Writes>>,
    /// Their outcome, once run.
    result: Mutex<Option<std::result::Result<CommitStats, PdataError>>>,
    done: Condvar,
    /// Where recovery of the new version starts in the journal.
    mark: Mark,
    /// Data blocks the covered records freed: given back to the host once durable.
    freed: Vec<u64>,
    epoch: u64,
    tables_len: usize,
    /// How long the freeze held the state lock (every writer waited that long).
    frozen_in: std::time::Duration,
}

impl Inflight {
    /// Run the writes if nobody has taken them yet; true if this call ran them.
    fn run_if_waiting(&self, inner: &Inner) -> bool {
        let Some((mut job, tables)) = self.job.lock().take() else {
            return false;
        };
        let (crc, writes) = tables.writes(inner);
        job.set_user_word(TABLES_CRC_WORD, crc as u64);
        let r = write_tables(inner, &writes).and_then(|()| job.write());
        if r.is_ok() {
            // The new header is durable and frees these blocks, while the version the space
            // map still calls durable uses them: nobody can be handed one before the commit
            // finishes, so the host gets their space back here, outside the state lock (a
            // deleted snapshot's gigabytes took the writers' lock for seconds).
            inner.punch_blocks(self.freed.clone());
        }
        *self.result.lock() = Some(r);
        self.done.notify_all();
        true
    }

    fn wait_done(&self) {
        let mut r = self.result.lock();
        while r.is_none() {
            self.done.wait(&mut r);
        }
    }
}

fn write_tables(inner: &Inner, tables: &TableWrites) -> std::result::Result<(), PdataError> {
    for (offset, bytes) in tables {
        inner
            .dev
            .write_at(bytes, *offset)
            .map_err(|source| PdataError::Io {
                block: (*offset - inner.geo.data_start) / META_BLOCK,
                source,
            })?;
    }
    Ok(())
}

/// The committer thread: runs the writes of each commit frozen, then finishes it.
pub(crate) fn spawn_committer(inner: &Arc<Inner>) -> std::io::Result<()> {
    let weak = Arc::downgrade(inner);
    let h = std::thread::Builder::new()
        .name("mvsnap-commit".into())
        .spawn(move || loop {
            let Some(inner) = weak.upgrade() else { break };
            let job = {
                let mut slot = inner.inflight.lock();
                loop {
                    if inner.closed.load(Ordering::Acquire) {
                        return;
                    }
                    if let Some(j) = slot.as_ref().filter(|j| j.job.lock().is_some()) {
                        break j.clone();
                    }
                    // Bounded, so a store dropped without `close` is noticed.
                    inner
                        .committer_cv
                        .wait_for(&mut slot, std::time::Duration::from_millis(500));
                }
            };
            if job.run_if_waiting(&inner) {
                let mut st = inner.state.write();
                if let Err(e) = inner.finish_inflight(&mut st) {
                    tracing::error!("tree commit failed: {e}");
                }
            }
        })?;
    *inner.committer.lock() = Some(h);
    Ok(())
}

impl Inner {
    /// Freeze the open transaction into a commit (see the module comment). `new_epoch`: start
    /// a new journal epoch at the region's start (the first commit of an open: nothing a
    /// crashed writer left may ever validate after it); only with no group commit running and
    /// no record logged before the commit finishes (the caller holds leadership and the lock).
    fn freeze_commit(&self, st: &mut State, new_epoch: bool) -> Result<Arc<Inflight>> {
        let started = std::time::Instant::now();
        let meta_err =
            |what: &str, e: PdataError| self.poison(what, &std::io::Error::other(e.to_string()));
        let head = st.tables_head(&self.events.lock());
        let overlay = st.meta.frozen_overlay();
        let tables_len = State::tables_len(&head, &overlay);
        let stamp = st.meta.next_commit_seq();
        let blocks = alloc_table_blocks(st, tables_len)
            .map_err(|e| meta_err("allocate the tables", e))?
            .ok_or_else(|| Error::NoSpace("no room left for the metadata tables".into()))?;
        // What records freed, and the old tables: free in the new version, held until it is
        // durable.
        let freed = std::mem::take(&mut st.deferred_frees);
        for &b in freed.iter().chain(st.table_blocks.iter()) {
            st.meta
                .release_block(b)
                .map_err(|e| meta_err("free a block", e))?;
        }
        let (epoch, mark) = {
            let mut j = self.journal.lock();
            if new_epoch {
                let epoch = j.epoch + 1;
                j.reset(epoch);
                (epoch, j.seal())
            } else {
                (j.epoch, j.seal())
            }
        };
        let user = [
            epoch,
            mark.seq,
            blocks[0],
            tables_len as u64,
            // The tables' checksum: set by whoever writes them (`Tables::writes`).
            0,
            self.geo.slot_offset(0) + st.meta.limit() * META_BLOCK,
            mark.pos,
            if self.closing_clean.load(Ordering::Acquire) {
                format::ORIGINS_CLEAN
            } else {
                0
            },
        ];
        // Copies being written whose records come after the seal: free in the new version
        // (nothing there points at them), still taken in the next transaction.
        let aside: Vec<u64> = st.unlogged.iter().map(|&b| b as u64).collect();
        let job = st
            .meta
            .freeze(user, &aside)
            .map_err(|e| meta_err("commit the metadata tree", e))?;
        st.table_blocks = blocks.clone();
        self.dirty.store(false, Ordering::Release);
        let tables = Tables {
            head,
            overlay,
            blocks,
            stamp,
        };
        Ok(Arc::new(Inflight {
            job: Mutex::new(Some((job, tables))),
            result: Mutex::new(None),
            done: Condvar::new(),
            mark,
            freed,
            epoch,
            tables_len,
            frozen_in: started.elapsed(),
        }))
    }

    /// Start a tree commit whose writes run beside the writers; nothing if one is running.
    /// Without a committer thread (opening, closing) it runs here, to the end.
    pub(crate) fn start_commit(&self, st: &mut State) -> Result<()> {
        if self.ephemeral || self.read_only || self.inflight.lock().is_some() {
            return Ok(());
        }
        self.check_poison()?;
        if !self.epoch_fresh.load(Ordering::Acquire) {
            // The first commit of an open starts a new journal epoch, so nothing a crashed
            // writer left past the replayed records can ever validate after it: that one runs
            // to the end here. (A commit with nothing logged since the open, such as the
            // reclaim thread's after a recovery, gets here.)
            return self.checkpoint_locked(st);
        }
        let job = self.freeze_commit(st, false)?;
        *self.inflight.lock() = Some(job);
        if self.committer.lock().is_some() && !self.closed.load(Ordering::Acquire) {
            self.committer_cv.notify_all();
            Ok(())
        } else {
            self.wait_inflight(st)
        }
    }

    /// Freeze a commit and run it to the end here.
    fn commit_now(&self, st: &mut State, new_epoch: bool) -> Result<()> {
        let job = self.freeze_commit(st, new_epoch)?;
        *self.inflight.lock() = Some(job);
        self.wait_inflight(st)
    }

    /// Whether a tree commit is being written.
    pub(crate) fn commit_running(&self) -> bool {
        self.inflight.lock().is_some()
    }

    /// Wait for the commit being written (running its writes here if the committer has not
    /// taken them yet) and finish it.
    pub(crate) fn wait_inflight(&self, st: &mut State) -> Result<()> {
        let Some(job) = self.inflight.lock().clone() else {
            return Ok(());
        };
        if !job.run_if_waiting(self) {
            job.wait_done();
        }
        self.finish_inflight(st)
    }

    /// Finish the commit being written if its writes are done: the frozen version becomes
    /// the durable one. The caller holds the state write lock.
    pub(crate) fn finish_inflight(&self, st: &mut State) -> Result<()> {
        let job = {
            let mut slot = self.inflight.lock();
            match slot.as_ref() {
                Some(j) if j.result.lock().is_some() => slot.take().expect("checked"),
                _ => return Ok(()),
            }
        };
        let result = job.result.lock().take().expect("checked");
        let stats = st.meta.finish(result).map_err(|e| {
            self.poison(
                "commit the metadata tree",
                &std::io::Error::other(e.to_string()),
            )
        })?;
        let covered = job.mark.seq - 1;
        self.journal.lock().release_to(job.mark);
        {
            let mut sb = self.sb.lock();
            sb.epoch = job.epoch;
            sb.journal_seq = job.mark.seq;
        }
        {
            let mut cs = self.commit.lock();
            cs.durable_seq = cs.durable_seq.max(covered);
            self.settled_seq.fetch_max(covered, Ordering::AcqRel);
            self.commit_cv.notify_all();
        }
        tracing::debug!(
            nodes = stats.nodes,
            bitmaps = stats.bitmaps,
            tables = job.tables_len,
            frozen_us = job.frozen_in.as_micros() as u64,
            epoch = job.epoch,
            "tree commit"
        );
        Ok(())
    }

    /// A tree commit now, to the end: the durable version then holds every record logged so
    /// far. The first of an open also starts a new journal epoch. The caller holds the state
    /// write lock.
    pub fn checkpoint_locked(&self, st: &mut State) -> Result<()> {
        if self.ephemeral || self.read_only {
            return Ok(());
        }
        self.check_poison()?;
        self.wait_inflight(st)?;
        if self.epoch_fresh.load(Ordering::Acquire) {
            return self.commit_now(st, false);
        }
        // A new epoch resets the journal: no group commit may run meanwhile.
        let mut cs = self.commit.lock();
        while cs.leader {
            self.commit_cv.wait(&mut cs);
        }
        cs.leader = true;
        drop(cs);
        let result = self.commit_now(st, true);
        let mut cs = self.commit.lock();
        cs.leader = false;
        self.commit_cv.notify_all();
        drop(cs);
        result?;
        self.epoch_fresh.store(true, Ordering::Release);
        // Fresh tables: `clear` would keep the capacity of a big replay or burst.
        st.unsettled_slots = Default::default();
        st.inflight_preserves = Default::default();
        Ok(())
    }
}
