//! Background reclaim. A snapshot that goes (deleted, or invalidated) leaves preserved entries
//! no live snapshot needs; dropping them walks the origin's `P` keys. Done inside the delete,
//! that walk held the state lock for the whole index (6.6 s for a snapshot of 512K blocks,
//! with every writer waiting). Here a thread drops them in batches of [`BATCH`] entries, each
//! one `Reclaim` record for a block range under the lock, so a writer waits for one batch at
//! most. The delete itself is instant, as dm-snap-mv promises.
//!
//! Nothing of the queue is durable: a crash mid-way leaves entries of dead generation ranges,
//! which the counters show (a range with no live generation), so open queues those origins
//! again. A batch is idempotent (it keeps what a live snapshot needs), so redoing one is safe.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::journal::Record;
use crate::pdata::{self, preserved, snapdata};
use crate::state::State;
use crate::store::Inner;
use crate::types::EventKind;

/// Entries one batch covers (about one record's apply of a few ms).
const BATCH: usize = 4096;

#[derive(Default)]
pub(crate) struct Reclaimer {
    queue: Mutex<Queue>,
    cv: Condvar,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Default)]
struct Queue {
    /// Origin -> (next block to look at, ticket). Queuing an origin again restarts it at block
    /// 0 with a new ticket: a batch running meanwhile must not move that cursor on.
    origins: BTreeMap<u32, (u64, u64)>,
    next_ticket: u64,
    /// Batches running now.
    busy: usize,
    /// Crash tests hold the thread (it takes no batch) so that a power cut right after a
    /// delete finds the reclaim not begun, whatever the scheduler does.
    held: bool,
}

pub(crate) fn spawn_reclaimer(inner: &Arc<Inner>) -> std::io::Result<()> {
    let weak = Arc::downgrade(inner);
    let h = std::thread::Builder::new()
        .name("mvsnap-reclaim".into())
        .spawn(move || loop {
            let Some(inner) = weak.upgrade() else { break };
            {
                let mut q = inner.reclaimer.queue.lock();
                while q.origins.is_empty() || q.held {
                    if inner.closed.load(Ordering::Acquire) {
                        return;
                    }
                    // Bounded, so a store dropped without `close` is noticed.
                    inner
                        .reclaimer
                        .cv
                        .wait_for(&mut q, std::time::Duration::from_millis(500));
                }
            }
            if inner.closed.load(Ordering::Acquire) {
                return;
            }
            match inner.reclaim_batch() {
                Ok(_) if inner.reclaimer.queue.lock().origins.is_empty() => {
                    // All done: commit, so the freed blocks go back to the host.
                    if let Err(e) = inner.release_freed_space(false) {
                        tracing::warn!("reclaim: giving space back: {e}");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("reclaim stopped: {e}"),
            }
        })?;
    *inner.reclaimer.thread.lock() = Some(h);
    Ok(())
}

impl Inner {
    /// Drop `origin`'s entries no live snapshot needs, in the background from block 0 (a new
    /// dead range may lie behind a running cursor). The caller holds the state lock.
    pub(crate) fn queue_reclaim(&self, origin: u32) {
        let mut q = self.reclaimer.queue.lock();
        q.next_ticket += 1;
        let ticket = q.next_ticket;
        q.origins.insert(origin, (0, ticket));
        self.reclaimer.cv.notify_all();
    }

    /// Queue every origin whose counters (of data or zero entries) show a generation range no
    /// live snapshot is in, or
    /// that has keys of deleted writable snapshots (what a crash left of a reclaim).
    pub(crate) fn queue_dead_ranges(&self, st: &State) {
        for o in st.origins.values() {
            if o.has_dead_range() || st.has_dead_nodes(o.no) {
                self.queue_reclaim(o.no);
            }
        }
    }

    /// Mark snapshots `ids` of origin `no` invalid for `why`, durably in order with what
    /// follows, and queue their space for reclaim. Returns the last record's sequence (the
    /// one the origin's next writes must wait for). The caller holds the state lock.
    pub(crate) fn invalidate(
        &self,
        st: &mut State,
        no: u32,
        ids: &[u64],
        reason: &str,
        names: &[String],
    ) -> Result<u64> {
        let mut seq = self.appended_seq();
        // In pieces, so a record stays small whatever the number of snapshots.
        for chunk in ids.chunks(256) {
            seq = self.log(
                st,
                Record::Invalidate {
                    ids: chunk.to_vec(),
                    reason: reason.to_string(),
                },
            )?;
        }
        self.queue_reclaim(no);
        if !names.is_empty() {
            self.event(
                EventKind::SnapshotInvalidated,
                format!("{reason}; invalidated {}", names.join(", ")),
            );
        }
        Ok(seq)
    }

    /// One batch of the first queued origin; false when nothing is queued.
    pub(crate) fn reclaim_batch(&self) -> Result<bool> {
        self.reclaim_one(None)
    }

    /// [`Inner::reclaim_batch`] for a caller that holds the state lock.
    pub(crate) fn reclaim_locked(&self, st: &mut State) -> Result<bool> {
        self.reclaim_one(Some(st))
    }

    fn reclaim_one(&self, st: Option<&mut State>) -> Result<bool> {
        let (no, from, ticket) = {
            let mut q = self.reclaimer.queue.lock();
            let Some((&no, &(from, ticket))) = q.origins.iter().next() else {
                return Ok(false);
            };
            q.busy += 1;
            (no, from, ticket)
        };
        let done = match st {
            Some(st) => self.reclaim_step(st, no, from),
            None => {
                let mut st = self.state.write();
                let r = self.reclaim_step(&mut st, no, from);
                // Straight to a waiting writer: batches back to back must not starve it.
                parking_lot::RwLockWriteGuard::unlock_fair(st);
                r
            }
        };
        let mut q = self.reclaimer.queue.lock();
        q.busy -= 1;
        let same = q.origins.get(&no).is_some_and(|&(_, t)| t == ticket);
        match &done {
            Ok(Some(Some(end))) if same => {
                q.origins.insert(no, (end + 1, ticket));
            }
            Ok(_) if same => {
                q.origins.remove(&no);
            }
            Ok(_) => {}
            // Poisoned or damaged: nothing more can be done in this open.
            Err(_) => q.origins.clear(),
        }
        self.reclaimer.cv.notify_all();
        done.map(|_| true)
    }

    /// Log the batch of `no` from block `from`: `None` if the origin is gone, else the last
    /// block it covered (`None`: to the end).
    fn reclaim_step(&self, st: &mut State, no: u32, from: u64) -> Result<Option<Option<u64>>> {
        self.check_poison()?;
        if !st.origins.contains_key(&no) {
            return Ok(None);
        }
        let corrupt = |e: pdata::PdataError| Error::Corrupt {
            path: self.path.clone(),
            what: format!("reclaim: {e}"),
        };
        let end = {
            let view = st.meta.view();
            let entries = pdata::nth_block(&view, preserved::SPACE, no, from, BATCH);
            let entries = entries.map_err(corrupt)?;
            if st.has_dead_nodes(no) {
                // The batch drops keys of deleted writable snapshots too: bound those as well.
                let keys = pdata::nth_block(&view, snapdata::SPACE, no, from, BATCH);
                match (entries, keys.map_err(corrupt)?) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            } else {
                entries
            }
        };
        self.log(
            st,
            Record::Reclaim {
                origin: no,
                first: from,
                last: end.unwrap_or(u64::MAX),
            },
        )?;
        Ok(Some(end))
    }

    /// Run the queued reclaim to the end here (beside the thread), wait for batches others
    /// run, then commit so the space goes back to the host.
    pub(crate) fn finish_reclaim(&self) -> Result<()> {
        while self.reclaim_batch()? {}
        let mut q = self.reclaimer.queue.lock();
        while q.busy > 0 || !q.origins.is_empty() {
            drop(q);
            while self.reclaim_batch()? {}
            q = self.reclaimer.queue.lock();
            if q.busy > 0 {
                self.reclaimer
                    .cv
                    .wait_for(&mut q, std::time::Duration::from_millis(50));
            }
        }
        drop(q);
        self.release_freed_space(true)
    }

    /// See [`Queue::held`]; `wait_reclaimed` still runs the batches itself.
    #[cfg(any(test, feature = "crashsim"))]
    pub(crate) fn hold_reclaimer(&self, held: bool) {
        self.reclaimer.queue.lock().held = held;
        self.reclaimer.cv.notify_all();
    }

    pub(crate) fn stop_reclaimer(&self) {
        {
            let _q = self.reclaimer.queue.lock();
            self.reclaimer.cv.notify_all();
        }
        // Out of the slot first: no lock is held over the join (see `stop_background`).
        let thread = self.reclaimer.thread.lock().take();
        if let Some(h) = thread {
            let _ = h.join();
        }
    }
}
