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

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::blockdev::BlockDev;
use crate::error::Error;
use crate::store::Inner;

/// Queued bytes above which writers wait for the worker (bounds memory and drain time).
const MAX_QUEUED_BYTES: usize = 64 << 20;
/// Overlap is tracked per 4 KiB block, whatever the store's geometry.
const TRACK_SHIFT: u32 = 12;

pub(crate) struct Writeback {
    queue: Mutex<Queue>,
    /// Signalled when the queue goes from empty to not empty (the worker waits on it).
    work: Condvar,
    /// Signalled when queued writes were issued (writers waiting for room, drains).
    progress: Condvar,
    /// Held by whoever issues queued writes, so they reach the devices in queue order.
    apply: Mutex<()>,
    /// Entries queued: a lock-free "nothing queued" test for the hot paths.
    queued: AtomicUsize,
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
    closed: bool,
}

pub(crate) struct Deferred {
    origin: u32,
    dev: Arc<dyn BlockDev>,
    offset: u64,
    data: Vec<u8>,
    /// The journal record that must be durable before this write is issued.
    after_seq: u64,
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
                closed: false,
            }),
            work: Condvar::new(),
            progress: Condvar::new(),
            apply: Mutex::new(()),
            queued: AtomicUsize::new(0),
        })
    }

    /// The background worker. It holds the store weakly: a store dropped without `close`
    /// loses its queued writes, as a crash would (none was flushed).
    pub fn spawn_worker(self: &Arc<Self>, inner: Weak<Inner>) -> std::io::Result<()> {
        let wb = self.clone();
        std::thread::Builder::new()
            .name("mvsnap-writeback".into())
            .spawn(move || loop {
                {
                    let mut q = wb.queue.lock();
                    if q.closed {
                        break;
                    }
                    if q.entries.is_empty() {
                        wb.work.wait_for(&mut q, Duration::from_millis(200));
                        continue;
                    }
                }
                let Some(inner) = inner.upgrade() else { break };
                wb.apply_through(&inner, u64::MAX);
            })
            .map(|_| ())
    }

    /// Stop the worker (after a final `drain`).
    pub fn close(&self) {
        self.queue.lock().closed = true;
        self.work.notify_all();
    }

    pub fn is_empty(&self) -> bool {
        self.queued.load(Ordering::Acquire) == 0
    }

    /// Whether a write to this range must be queued behind an earlier queued one.
    pub fn overlaps(&self, origin: u32, offset: u64, len: u64) -> bool {
        !self.is_empty() && self.queue.lock().overlaps(origin, offset, len)
    }

    /// Queue a write; it is issued after record `after_seq` is durable. Waits while too much
    /// is queued.
    pub fn push(
        &self,
        origin: u32,
        dev: &Arc<dyn BlockDev>,
        offset: u64,
        data: &[u8],
        after_seq: u64,
    ) {
        let entry = Arc::new(Deferred {
            origin,
            dev: dev.clone(),
            offset,
            data: data.to_vec(),
            after_seq,
        });
        let mut q = self.queue.lock();
        while q.bytes >= MAX_QUEUED_BYTES && !q.closed {
            self.progress.wait(&mut q);
        }
        for b in tracked_blocks(offset, data.len() as u64) {
            *q.blocks.entry((origin, b)).or_insert(0) += 1;
        }
        q.bytes += data.len();
        let was_empty = q.entries.is_empty();
        q.entries.push_back(entry);
        self.queued.store(q.entries.len(), Ordering::Release);
        if was_empty {
            self.work.notify_one();
        }
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
        self.apply_through(inner, target);
    }

    /// The error a deferred write of this origin met since its last flush, if any (reported
    /// once, like a kernel's writeback error).
    pub fn take_error(&self, origin: u32) -> Option<String> {
        self.queue.lock().errors.remove(&origin)
    }

    /// Issue queued writes, in order, until every entry with an id below `target` is done.
    fn apply_through(&self, inner: &Inner, target: u64) {
        let _order = self.apply.lock();
        loop {
            let batch: Vec<Arc<Deferred>> = {
                let q = self.queue.lock();
                if q.head >= target || q.entries.is_empty() {
                    return;
                }
                let n = (target - q.head).min(q.entries.len() as u64) as usize;
                q.entries.iter().take(n).cloned().collect()
            };
            let need = batch.iter().map(|e| e.after_seq).max().unwrap_or(0);
            // Invariant 2: nothing below is issued before the records it depends on are durable.
            let durable = if need > 0 {
                inner.wait_durable(need).map_err(|e| e.to_string())
            } else {
                Ok(())
            };
            let mut failed: Vec<(u32, String)> = Vec::new();
            for e in &batch {
                let r = match &durable {
                    Ok(()) => e.dev.write_at(&e.data, e.offset).map_err(|err| {
                        format!(
                            "write {} at offset {}: {err}",
                            e.dev.path().display(),
                            e.offset
                        )
                    }),
                    Err(msg) => Err(format!(
                        "a write acknowledged before the last flush was dropped: {msg}"
                    )),
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
