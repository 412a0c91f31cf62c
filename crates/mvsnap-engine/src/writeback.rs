//! Write-behind for origin writes that wait on a copy-out.
//!
//! Invariant 2 says an origin write that overwrites preserved data may be *issued* only once the
//! copy and its record are durable. It does not make the client wait: a write without FUA is
//! volatile until FLUSH (NBD, SCSI and NVMe alike). So such a write is queued here and answered
//! at once; a worker commits the journal group, then issues the queued writes in queue order.
//! Reads of the origin see queued data; FLUSH, FUA, snapshot creation, block status, origin
//! removal and close drain the queue first. A write that overlaps a queued one is queued behind
//! it, so a later write never lands under an earlier one.
//!
//! Without this, every first write after a snapshot waits for an fdatasync; with it, many
//! share one in the background (docs/BENCHMARKS.md measures the difference).
//!
//! A first write's entry is queued *pending* once its copies are made, before their records
//! are logged (`copyout`): whoever logs them next resolves it to the record it waits for, or
//! cancels it. A pending entry blocks the queue like one whose record is not durable yet.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::blockdev::BlockDev;
use crate::error::Error;
use crate::store::Inner;

/// Queued bytes above which writers wait for the worker: bounds the RAM and what a FLUSH
/// waits for. Under sustained first writes the issuer is the bottleneck and the queue stays
/// full, so a FLUSH waits for all of it: 605-618 ms on average at 64 MiB, 242-246 ms at 16 MiB
/// (docs/BENCHMARKS.md). 16 MiB still holds far more than one commit's worth of writes.
const MAX_QUEUED_BYTES: usize = 16 << 20;
/// Overlap is tracked per 4 KiB block, whatever the store's geometry.
const TRACK_SHIFT: u32 = 12;
/// Least time between two commits the committer starts.
const COMMIT_INTERVAL: Duration = Duration::from_millis(2);
/// How long an idle background thread sleeps before it checks whether the store is gone.
const IDLE_WAIT: Duration = Duration::from_millis(200);
/// Most queued writes issued between two updates of the queue. A commit can make thousands
/// ready at once; issued as one batch, they kept writers waiting for room for up to 574 ms
/// (at 1M mappings, where each 4 KiB origin write cost ~60 us of ext4's time).
const ISSUE_CHUNK: usize = 64;
/// `Deferred::after_seq` of an entry whose copy-out records are not logged yet.
pub(crate) const PENDING: u64 = u64::MAX;
/// `Deferred::after_seq` of an entry never to be issued: its copy-out's records could not be
/// logged.
const CANCELLED: u64 = u64::MAX - 1;

pub(crate) struct Writeback {
    queue: Mutex<Queue>,
    /// Signalled when the queue goes from empty to not empty (the worker waits on it).
    work: Condvar,
    /// Signalled when queued writes were issued (writers waiting for room, drains).
    progress: Condvar,
    /// Signalled when a pending entry is resolved or cancelled (the issuer waits on it).
    resolved: Condvar,
    /// Held by whoever issues queued writes, so they reach the devices in queue order.
    apply: Mutex<()>,
    /// Entries queued: a lock-free "nothing queued" test for the hot paths.
    queued: AtomicUsize,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

struct Queue {
    entries: VecDeque<Arc<Deferred>>,
    /// Id of `entries[0]`; ids are consecutive.
    head: u64,
    /// How many queued entries touch each (origin, 4 KiB block).
    blocks: HashMap<(u32, u64), u32>,
    bytes: usize,
    /// The first failure per origin since its last flush, which reports it.
    errors: HashMap<u32, String>,
    /// The highest record any queued write waits for (what the committer commits up to).
    max_after: u64,
    /// Entries pushed pending and not resolved or cancelled yet.
    pending: usize,
    /// The committer waits for work: a push that needs a commit must wake it.
    committer_idle: bool,
    closed: bool,
}

pub(crate) struct Deferred {
    origin: u32,
    dev: Arc<dyn BlockDev>,
    offset: u64,
    data: Vec<u8>,
    /// The journal record that must be durable before this write is issued ([`PENDING`]:
    /// not known yet; [`CANCELLED`]: never).
    after_seq: AtomicU64,
}

impl Deferred {
    fn after(&self) -> u64 {
        self.after_seq.load(Ordering::Acquire)
    }

    /// Whether the record this write waits for is durable.
    fn covered(&self, durable: u64) -> bool {
        let after = self.after();
        after != PENDING && after != CANCELLED && after <= durable
    }

    fn cancelled(&self) -> bool {
        self.after() == CANCELLED
    }
}

fn tracked_blocks(offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
    (offset >> TRACK_SHIFT)..=((offset + len - 1) >> TRACK_SHIFT)
}

impl Queue {
    fn tail(&self) -> u64 {
        self.head + self.entries.len() as u64
    }

    fn overlaps(&self, origin: u32, offset: u64, len: u64) -> bool {
        tracked_blocks(offset, len).any(|b| self.blocks.contains_key(&(origin, b)))
    }

    /// A pending entry learns what it waits for (a record, or [`CANCELLED`]); counted once.
    fn leave_pending(&mut self, entry: &Deferred, to: u64) {
        if entry
            .after_seq
            .compare_exchange(PENDING, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.pending -= 1;
        }
    }
}

/// What an origin's next flush reports for a write it answered and never issued.
fn dropped_write(reason: &str) -> String {
    format!("a write acknowledged since the last flush was dropped: {reason}")
}

impl Writeback {
    pub fn new() -> Arc<Writeback> {
        Arc::new(Writeback {
            queue: Mutex::new(Queue {
                entries: VecDeque::new(),
                head: 0,
                blocks: HashMap::new(),
                bytes: 0,
                errors: HashMap::new(),
                max_after: 0,
                pending: 0,
                committer_idle: false,
                closed: false,
            }),
            work: Condvar::new(),
            progress: Condvar::new(),
            resolved: Condvar::new(),
            apply: Mutex::new(()),
            queued: AtomicUsize::new(0),
            threads: Mutex::new(Vec::new()),
        })
    }

    /// The background threads, a pipeline: the committer commits the journal up to what the
    /// queue waits for, while the issuer writes out the queued writes already covered by an
    /// earlier commit. They hold the store weakly: a store dropped without `close` loses its
    /// queued writes, as a crash would (none was flushed).
    pub fn spawn_workers(self: &Arc<Self>, inner: Weak<Inner>) -> std::io::Result<()> {
        let (wb, weak) = (self.clone(), inner.clone());
        let issuer = std::thread::Builder::new()
            .name("mvsnap-issue".into())
            .spawn(move || wb.issuer(weak))?;
        self.threads.lock().push(issuer);
        let wb = self.clone();
        let committer = std::thread::Builder::new()
            .name("mvsnap-group".into())
            .spawn(move || wb.committer(inner))?;
        self.threads.lock().push(committer);
        Ok(())
    }

    fn issuer(&self, inner: Weak<Inner>) {
        loop {
            {
                let mut q = self.queue.lock();
                if q.closed {
                    return;
                }
                if q.entries.is_empty() {
                    self.work.wait_for(&mut q, IDLE_WAIT);
                    continue;
                }
            }
            let Some(inner) = inner.upgrade() else { return };
            match self.issue_ready(&inner, u64::MAX) {
                Some(PENDING) => {
                    // The committer or a writer logs it; wait until one has.
                    let mut q = self.queue.lock();
                    if q.entries.front().is_some_and(|e| e.after() == PENDING) {
                        self.resolved.wait_for(&mut q, COMMIT_INTERVAL);
                    }
                }
                // The committer is on it (or anyone else's commit will do).
                Some(seq) => {
                    inner.wait_committed(seq, Duration::from_millis(20));
                }
                None => {}
            }
        }
    }

    fn committer(&self, inner: Weak<Inner>) {
        let mut last_commit = std::time::Instant::now();
        loop {
            let need = {
                let Some(inner) = inner.upgrade() else { return };
                // Copy-outs finished since the last round and not logged by a writer yet: their
                // records, all under one hold of the state lock, go into this commit (on a
                // poisoned store, their writes are cancelled).
                drop(inner.log_finished_locking());
                let mut q = self.queue.lock();
                if q.closed {
                    return;
                }
                // Nobody waits for these commits (FLUSH leads its own), so they are spaced out:
                // fewer, larger groups cost less CPU per write than back-to-back syncs.
                let since = last_commit.elapsed();
                if since < COMMIT_INTERVAL && q.bytes < MAX_QUEUED_BYTES / 2 {
                    drop(inner);
                    self.work.wait_for(&mut q, COMMIT_INTERVAL - since);
                    continue;
                }
                // A poisoned store commits nothing more; the issuer drops what waits for it.
                let poisoned = inner.check_poison().is_err();
                if q.max_after <= inner.durable_seq() || poisoned {
                    if q.pending > 0 && !poisoned {
                        // Copies still being made: their jobs come soon.
                        drop(inner);
                        self.work.wait_for(&mut q, COMMIT_INTERVAL);
                        continue;
                    }
                    q.committer_idle = true;
                    drop(inner);
                    self.work.wait_for(&mut q, IDLE_WAIT);
                    continue;
                }
                q.max_after
            };
            let Some(inner) = inner.upgrade() else { return };
            last_commit = std::time::Instant::now();
            if let Err(e) = inner.wait_durable(need) {
                tracing::error!("write-behind commit failed: {e}");
            }
        }
    }

    /// Stop the threads and wait for them (after a final `drain`, for a clean close).
    pub fn stop(&self) {
        self.queue.lock().closed = true;
        self.work.notify_all();
        // Called by handle owners only: the threads hold no handle, so none joins itself.
        // Out of the list first: no lock is held over the joins.
        let threads = std::mem::take(&mut *self.threads.lock());
        for h in threads {
            let _ = h.join();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.queued.load(Ordering::Acquire) == 0
    }

    /// Bytes of origin writes held in RAM until their copy-outs are durable.
    pub fn queued_bytes(&self) -> u64 {
        self.queue.lock().bytes as u64
    }

    /// Whether a write to this range must be queued behind an earlier queued one.
    pub fn overlaps(&self, origin: u32, offset: u64, len: u64) -> bool {
        !self.is_empty() && self.queue.lock().overlaps(origin, offset, len)
    }

    /// Queue a write; it is issued after record `after_seq` is durable ([`PENDING`]: after
    /// [`Writeback::resolve`] names the record). Waits while too much is queued.
    pub fn push(
        &self,
        origin: u32,
        dev: &Arc<dyn BlockDev>,
        offset: u64,
        data: &[u8],
        after_seq: u64,
    ) -> Arc<Deferred> {
        let entry = Arc::new(Deferred {
            origin,
            dev: dev.clone(),
            offset,
            data: data.to_vec(),
            after_seq: AtomicU64::new(after_seq),
        });
        let mut q = self.queue.lock();
        while q.bytes >= MAX_QUEUED_BYTES && !q.closed {
            self.progress.wait(&mut q);
        }
        for b in tracked_blocks(offset, data.len() as u64) {
            *q.blocks.entry((origin, b)).or_insert(0) += 1;
        }
        q.bytes += data.len();
        if after_seq == PENDING {
            q.pending += 1;
        } else {
            q.max_after = q.max_after.max(after_seq);
        }
        let was_empty = q.entries.is_empty();
        q.entries.push_back(entry.clone());
        self.queued.store(q.entries.len(), Ordering::Release);
        if was_empty || (after_seq > 0 && q.committer_idle) {
            q.committer_idle = false;
            self.work.notify_all();
        }
        entry
    }

    /// A pending entry's copy-out is logged: it waits for record `seq` from now on.
    pub fn resolve(&self, entry: &Deferred, seq: u64) {
        debug_assert!(seq < CANCELLED);
        let mut q = self.queue.lock();
        q.leave_pending(entry, seq);
        q.max_after = q.max_after.max(seq);
        if q.committer_idle && seq > 0 {
            q.committer_idle = false;
            self.work.notify_all();
        }
        drop(q);
        self.resolved.notify_all();
    }

    /// A pending entry is never to be issued: its copy-out's records could not be logged. The
    /// write was answered, so its origin's next flush reports `error`.
    pub fn cancel(&self, entry: &Deferred, error: String) {
        let mut q = self.queue.lock();
        q.leave_pending(entry, CANCELLED);
        tracing::error!(
            origin = entry.origin,
            "an acknowledged origin write was dropped: {error}"
        );
        q.errors
            .entry(entry.origin)
            .or_insert_with(|| dropped_write(&error));
        drop(q);
        self.resolved.notify_all();
    }

    /// Take the queued writes overlapping a range, to lay over what the device returns. Call
    /// it *before* reading the device: a write issued meanwhile is then in one or the other.
    pub fn overlay(&self, origin: u32, offset: u64, len: u64) -> Vec<Arc<Deferred>> {
        if self.is_empty() {
            return Vec::new();
        }
        let q = self.queue.lock();
        if !q.overlaps(origin, offset, len) {
            return Vec::new();
        }
        q.entries
            .iter()
            .filter(|e| {
                e.origin == origin
                    && e.offset < offset + len
                    && offset < e.offset + e.data.len() as u64
            })
            .cloned()
            .collect()
    }

    /// Issue every write queued so far (and wait for those a worker is issuing).
    pub fn drain(&self, inner: &Inner) {
        if self.is_empty() {
            return;
        }
        let target = self.queue.lock().tail();
        while let Some(seq) = self.issue_ready(inner, target) {
            if seq == PENDING {
                // Its copies are made or being made: log them (or wait for them) here.
                inner.log_finished_or_wait();
                continue;
            }
            // Lead or join the commit the head waits for. A failure poisons the store, and
            // the next round drops what can no longer be issued.
            let _ = inner.wait_durable(seq);
        }
    }

    /// The error a deferred write of this origin met since its last flush, if any (reported
    /// once, like a kernel's writeback error).
    pub fn take_error(&self, origin: u32) -> Option<String> {
        self.queue.lock().errors.remove(&origin)
    }

    /// Issue, in queue order, the queued writes with ids below `target` whose records are
    /// durable. Returns the record the first one left waits for, or None once all are done.
    /// On a poisoned store, writes whose records never became durable are dropped instead
    /// (the origin's next flush reports it).
    fn issue_ready(&self, inner: &Inner, target: u64) -> Option<u64> {
        let _order = self.apply.lock();
        loop {
            let durable = inner.durable_seq();
            let poisoned = inner.check_poison().err().map(|e| e.to_string());
            let (batch, blocked) = {
                let q = self.queue.lock();
                let limit = target.saturating_sub(q.head).min(q.entries.len() as u64) as usize;
                // In chunks, each followed by its room made: writers waiting for room wait
                // for a chunk, not for everything one commit made ready.
                let limit = limit.min(ISSUE_CHUNK);
                let batch: Vec<Arc<Deferred>> = q
                    .entries
                    .iter()
                    .take(limit)
                    .take_while(|e| e.covered(durable) || poisoned.is_some() || e.cancelled())
                    .cloned()
                    .collect();
                let blocked = (batch.len() < limit).then(|| q.entries[batch.len()].after());
                (batch, blocked)
            };
            if batch.is_empty() {
                return blocked;
            }
            let mut failed: Vec<(u32, String)> = Vec::new();
            for e in &batch {
                if e.cancelled() {
                    continue;
                }
                // Invariant 2: only a write whose copy-out is durable reaches the origin.
                let r = if e.covered(durable) {
                    e.dev.write_at(&e.data, e.offset).map_err(|err| {
                        format!(
                            "write {} at offset {}: {err}",
                            e.dev.path().display(),
                            e.offset
                        )
                    })
                } else {
                    Err(dropped_write(
                        poisoned.as_deref().unwrap_or("store poisoned"),
                    ))
                };
                if let Err(msg) = r {
                    tracing::error!(origin = e.origin, "deferred origin write failed: {msg}");
                    failed.push((e.origin, msg));
                }
            }
            let mut q = self.queue.lock();
            for (origin, msg) in failed {
                q.errors.entry(origin).or_insert(msg);
            }
            for e in &batch {
                for b in tracked_blocks(e.offset, e.data.len() as u64) {
                    if let std::collections::hash_map::Entry::Occupied(mut o) =
                        q.blocks.entry((e.origin, b))
                    {
                        *o.get_mut() -= 1;
                        if *o.get() == 0 {
                            o.remove();
                        }
                    }
                }
                q.bytes -= e.data.len();
            }
            q.entries.drain(..batch.len());
            q.head += batch.len() as u64;
            self.queued.store(q.entries.len(), Ordering::Release);
            drop(q);
            self.progress.notify_all();
        }
    }
}

/// Lay queued writes (in queue order) over `buf`, which holds the device's bytes at `offset`.
pub(crate) fn lay_over(entries: &[Arc<Deferred>], offset: u64, buf: &mut [u8]) {
    let end = offset + buf.len() as u64;
    for e in entries {
        let lo = e.offset.max(offset);
        let hi = (e.offset + e.data.len() as u64).min(end);
        if lo < hi {
            buf[(lo - offset) as usize..(hi - offset) as usize]
                .copy_from_slice(&e.data[(lo - e.offset) as usize..(hi - e.offset) as usize]);
        }
    }
}

/// An origin's deferred-write failure, as the flush that reports it returns it.
pub(crate) fn flush_error(path: &std::path::Path, msg: String) -> Error {
    Error::io("deferred write", path, std::io::Error::other(msg))
}
