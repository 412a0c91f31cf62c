//! Copy-outs: a snapshot's old data copied from the origin into the store before the origin
//! block changes (DESIGN invariant 2).
//!
//! A first write claims its blocks under the state lock (`State::copying`), reads the old data
//! and writes the copies without it, then hands the finished [`CopyJob`] over here and is
//! answered: its origin write waits in the write-behind queue, *pending*, until the job's
//! records are logged and durable. Whoever takes the state write lock next (a writer's claim,
//! the write-behind committer, a drain) logs every finished job under that one hold, so a
//! first write costs one acquisition of the state write lock instead of two (the second used
//! to be most of the writers' spinning on it; docs/BENCHMARKS.md).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::{RwLockReadGuard, RwLockWriteGuard};

use crate::error::{Error, Result};
use crate::journal::Record;
use crate::state::{State, ZERO_SLOT};
use crate::store::Inner;
use crate::types::SnapshotState;
use crate::writeback::Deferred;

/// A copy-out decided: origin block `block`, for generations `lo..=` the claim's generation,
/// into `slot` (or nowhere).
pub(crate) struct Copy {
    pub block: u64,
    pub lo: u32,
    /// None: the store is full.
    pub slot: Option<u32>,
    /// The old data reads as zeroes: recorded, not copied.
    pub zero: bool,
    /// The old data's checksum (recovery verifies the copy with it).
    pub crc: u32,
    /// Writing the copy failed.
    pub failed: Option<String>,
}

/// A claim whose copies were read and written, waiting for its records.
pub(crate) struct CopyJob {
    /// The volume's name, for errors.
    pub volume: String,
    pub origin: u32,
    /// The origin's generation when the blocks were claimed (their copies serve up to it).
    pub gen: u32,
    /// The blocks the origin write covers (copies of them logged earlier are waited for too).
    pub first: u64,
    pub last: u64,
    pub copies: Vec<Copy>,
    /// The range is about to read as zeroes: a block that reads as zeroes needs no entry.
    pub zeroing: bool,
}

/// A job handed over with the origin write queued behind it, pending until it is logged.
pub(crate) struct Finished {
    pub job: CopyJob,
    pub deferred: Arc<Deferred>,
}

impl Inner {
    /// Write the copies (`old` holds the origin's blocks from `first` on): zero blocks are
    /// noted, not written; a run of neighbouring blocks into neighbouring store blocks goes
    /// out as one write. A failed write is noted on its copies. No lock is held.
    pub(crate) fn write_copies(&self, old: &[u8], first: u64, copies: &mut [Copy]) {
        let bs = self.geo.chunk_size as usize;
        let at = |c: &Copy| (c.block - first) as usize * bs;
        for c in copies.iter_mut() {
            let data = &old[at(c)..at(c) + bs];
            c.zero = data.iter().all(|&b| b == 0);
            c.crc = if c.zero { 0 } else { crc32c::crc32c(data) };
        }
        let mut i = 0;
        while i < copies.len() {
            let Some(slot) = copies[i].slot.filter(|_| !copies[i].zero) else {
                i += 1;
                continue;
            };
            let mut j = i + 1;
            while j < copies.len()
                && !copies[j].zero
                && copies[j].slot == Some(copies[j - 1].slot.unwrap().wrapping_add(1))
                && copies[j].block == copies[j - 1].block + 1
            {
                j += 1;
            }
            let run = &old[at(&copies[i])..at(&copies[j - 1]) + bs];
            if let Err(e) = self.store_write_data(run, self.geo.slot_offset(slot)) {
                // ENOSPC of a sparse store on a full file system, EIO: the origin stays
                // writable, as with a full store (dm-snapshot does the same).
                for c in &mut copies[i..j] {
                    c.failed = Some(e.to_string());
                }
            }
            i = j;
        }
    }

    /// Hand a finished job over, to be logged by the next holder of the state write lock.
    pub(crate) fn push_finished(&self, job: CopyJob, deferred: Arc<Deferred>) {
        let mut q = self.finished.lock();
        q.push(Finished { job, deferred });
        self.finished_len.store(q.len(), Ordering::Release);
        drop(q);
        // A writer waiting for one of these blocks logs it itself.
        self.copies_finished();
    }

    /// Whether finished jobs wait for their records.
    pub(crate) fn has_finished(&self) -> bool {
        self.finished_len.load(Ordering::Acquire) > 0
    }

    /// Log every finished job (the caller holds the state write lock): each queued origin
    /// write learns the record it waits for, or is dropped if its records cannot be logged
    /// (its origin's next flush reports it: the write was answered, and is volatile until
    /// then).
    pub(crate) fn log_finished(&self, st: &mut State) {
        if !self.has_finished() {
            return;
        }
        let jobs = {
            let mut q = self.finished.lock();
            self.finished_len.store(0, Ordering::Release);
            std::mem::take(&mut *q)
        };
        for Finished { job, deferred } in jobs {
            match self.log_job(st, &job) {
                Ok(seq) => self.writeback.resolve(&deferred, seq),
                Err(e) => self.writeback.cancel(&deferred, e.to_string()),
            }
        }
        self.copies_finished();
    }

    /// Log finished jobs, if there are any, under the state write lock taken for it (the
    /// guard is handed back; None if nothing had finished).
    pub(crate) fn log_finished_locking(&self) -> Option<RwLockWriteGuard<'_, State>> {
        if !self.has_finished() {
            return None;
        }
        let mut st = self.state.write();
        self.log_finished(&mut st);
        Some(st)
    }

    /// The state for a report (`info`, `snapshot list`): copy-outs answered but not logged
    /// yet are logged first, so its counts include every write answered before the call.
    pub(crate) fn state_for_report(&self) -> RwLockReadGuard<'_, State> {
        match self.log_finished_locking() {
            Some(st) => RwLockWriteGuard::downgrade(st),
            None => self.state.read(),
        }
    }

    /// Log `log_finished`'s jobs, taking the state lock; or, if none is finished yet, wait a
    /// little for one (a drain waiting for copies still being made).
    pub(crate) fn log_finished_or_wait(&self) {
        let seen = self.copies_done.load(Ordering::Acquire);
        if self.log_finished_locking().is_none() {
            self.wait_copies(seen);
        }
    }

    /// A job's records; its blocks leave `State::copying` and unlogged slots go back if the
    /// records cannot be logged. Returns the record the origin write must wait for.
    pub(crate) fn log_job(&self, st: &mut State, job: &CopyJob) -> Result<u64> {
        let logged = self.log_copies(st, job);
        self.release_claims(st, job, logged.is_err());
        let seq = logged?;
        Ok(seq.max(write_wait(st, job.origin, job.first, job.last)))
    }

    /// A job's blocks leave `State::copying`; `failed`: its slots no record names go back.
    pub(crate) fn release_claims(&self, st: &mut State, job: &CopyJob, failed: bool) {
        if failed {
            for c in &job.copies {
                if let Some(slot) = c.slot {
                    if st.unlogged.contains(&slot) {
                        let _ = st.free_unlogged(slot);
                    }
                }
            }
        }
        for c in &job.copies {
            st.copying.remove(&(job.origin, c.block));
        }
    }

    /// Append each copy's `Preserve` record (a zero block's records zeroes and gives its
    /// block back); a copy that could not be made (a full store, a failed write) invalidates
    /// the snapshots that needed it. Returns the newest record's sequence.
    fn log_copies(&self, st: &mut State, job: &CopyJob) -> Result<u64> {
        let (no, gen) = (job.origin, job.gen);
        let meta_error = |e: crate::pdata::PdataError| {
            Error::io(
                "read the metadata of",
                &job.volume,
                std::io::Error::other(e.to_string()),
            )
        };
        let mut wait_seq = 0;
        for copy in &job.copies {
            if copy.zero || copy.failed.is_some() {
                if let Some(slot) = copy.slot {
                    st.free_unlogged(slot).map_err(meta_error)?;
                }
            }
            // A snapshot deleted meanwhile may have left nothing that needs it.
            if !st.origins[&no].any_live(copy.lo, gen) {
                if let Some(slot) = copy.slot.filter(|_| !copy.zero && copy.failed.is_none()) {
                    st.free_unlogged(slot).map_err(meta_error)?;
                }
                continue;
            }
            if copy.zero && job.zeroing {
                continue;
            }
            let slot = match (copy.zero, copy.slot, &copy.failed) {
                (true, _, _) => ZERO_SLOT,
                (false, Some(slot), None) => slot,
                (false, slot, failed) => {
                    let reason = match (slot, failed) {
                        (_, Some(e)) => format!(
                            "COW store write failed ({e}): could not preserve block {}",
                            copy.block
                        ),
                        _ => format!("COW store full: could not preserve block {}", copy.block),
                    };
                    let seq = self.invalidate_needing(st, no, copy.lo, gen, &reason)?;
                    wait_seq = wait_seq.max(seq);
                    continue;
                }
            };
            let seq = self.log(
                st,
                Record::Preserve {
                    origin: no,
                    chunk: copy.block,
                    lo: copy.lo,
                    hi: gen,
                    slot,
                    bits: 1,
                    crc: copy.crc,
                },
            )?;
            st.inflight_preserves.insert((no, copy.block), seq);
            wait_seq = wait_seq.max(seq);
        }
        Ok(wait_seq)
    }

    /// A copy-out cannot be made (the store is full, or writing it failed): the origin write
    /// must go on, so the snapshots that needed this copy lose it. They are marked invalid and
    /// their space is reclaimed. Returns the journal sequence that must be durable before any
    /// write of this origin reaches the disk.
    fn invalidate_needing(
        &self,
        st: &mut State,
        no: u32,
        lo: u32,
        hi: u32,
        why: &str,
    ) -> Result<u64> {
        let o = &st.origins[&no];
        let ids: Vec<u64> = st
            .snaps
            .values()
            .filter(|s| {
                s.origin == no && s.state == SnapshotState::Valid && (lo..=hi).contains(&s.gen)
            })
            .map(|s| s.id)
            .collect();
        let names: Vec<String> = ids
            .iter()
            .map(|id| format!("{}@{}", o.id, st.snaps[id].tag))
            .collect();
        let reason = format!("{why} of {}", o.id);
        let seq = self.invalidate(st, no, &ids, &reason, &names)?;
        st.release_seq.insert(no, seq);
        Ok(seq)
    }
}

/// The newest record a write of `first..=last` of origin `no` must wait for: copies of those
/// blocks logged but not durable yet, and the origin's release barrier.
pub(crate) fn write_wait(st: &State, no: u32, first: u64, last: u64) -> u64 {
    let inflight = if st.inflight_preserves.is_empty() {
        0
    } else {
        (first..=last)
            .filter_map(|c| st.inflight_preserves.get(&(no, c)))
            .max()
            .unwrap_or(0)
    };
    inflight.max(st.release_barrier(no))
}
