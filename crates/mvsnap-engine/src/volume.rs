//! Volumes: the origin and its snapshots, as front ends see them (read, write, flush, trim,
//! block status). The copy-out ordering rule (DESIGN invariant 2) is enforced here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::{RwLock, RwLockWriteGuard};

use crate::blockdev::BlockDev;
use crate::copyout::{self, Copy, CopyJob};
use crate::error::{Error, Result};
use crate::format::Geometry;
use crate::journal::Record;
use crate::pdata::{btree, PdataError};
use crate::state::ZERO_SLOT;
use crate::state::{Origin, Snap, State};
use crate::store::{resolve_name, Handles, Inner, Store};
use crate::types::{Extent, SnapshotState};
use crate::writeback::{self, PENDING};

#[derive(Clone)]
enum Kind {
    Origin {
        no: u32,
        dev: Arc<dyn BlockDev>,
        gate: Arc<RwLock<()>>,
    },
    Snapshot {
        id: u64,
        writable: bool,
    },
}

/// A handle on one volume; cheap to clone, safe to use from many threads.
#[derive(Clone)]
pub struct Volume {
    inner: Arc<Inner>,
    _handles: Arc<Handles>,
    name: String,
    size: u64,
    kind: Kind,
    /// Whether this handle's last origin write needed a copy-out: after a snapshot most
    /// first writes come in runs, so the next write takes the state's write lock at once.
    copy_outs_likely: Arc<AtomicBool>,
}

/// Where a piece of a read comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Src {
    Store,
    Origin,
    /// A preserved zero entry: nothing to read.
    Zero,
}

/// What a copy-out left its origin write to do.
enum Preserved {
    /// Go ahead once this record is durable (0: at once).
    Wait(u64),
    /// Nothing: the write is queued behind its copies (issued once their records are durable).
    Queued,
}

struct Piece {
    src: Src,
    dev_off: u64,
    buf_off: usize,
    len: usize,
}

impl Store {
    /// Open `ORIGIN` or `ORIGIN@TAG`.
    pub fn volume(&self, name: &str) -> Result<Volume> {
        let st = self.inner.state.read();
        let (no, snap) = resolve_name(&st, name)?;
        let o = &st.origins[&no];
        let dev = o.dev.clone().map_err(Error::Busy)?;
        let kind = match snap {
            None => Kind::Origin {
                no,
                dev,
                gate: o.gate.clone(),
            },
            Some(id) => {
                let s = &st.snaps[&id];
                if s.state == SnapshotState::Invalid {
                    return Err(Error::SnapshotInvalid {
                        name: name.into(),
                        reason: s.reason.clone().unwrap_or_default(),
                    });
                }
                Kind::Snapshot {
                    id,
                    writable: s.writable,
                }
            }
        };
        Ok(Volume {
            inner: self.inner.clone(),
            _handles: self.handles.clone(),
            name: name.to_string(),
            size: o.size,
            kind,
            copy_outs_likely: Arc::default(),
        })
    }

    /// Every volume's export name: each origin, then each visible snapshot.
    pub fn volume_names(&self) -> Vec<String> {
        let st = self.inner.state.read();
        let mut v: Vec<String> = st.origins.values().map(|o| o.id.clone()).collect();
        for s in st
            .snaps
            .values()
            .filter(|s| s.state != SnapshotState::Hidden)
        {
            v.push(format!("{}@{}", st.origins[&s.origin].id, s.tag));
        }
        v
    }
}

/// CRC32C of the blocks `bits` of `slot`, in block order (what Preserve/MapWrite records carry).
pub(crate) fn blocks_crc(
    dev: &dyn BlockDev,
    geo: Geometry,
    slot: u32,
    bits: u64,
) -> std::io::Result<u32> {
    let mut buf = vec![0u8; geo.sub_size as usize];
    let mut c = 0u32;
    let mut b = bits;
    while b != 0 {
        let i = b.trailing_zeros() as u64;
        dev.read_at(&mut buf, geo.slot_offset(slot) + i * geo.sub_size as u64)?;
        c = crc32c::crc32c_append(c, &buf);
        b &= b - 1;
    }
    Ok(c)
}

impl Volume {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read_only(&self) -> bool {
        self.inner.read_only
            || match self.kind {
                Kind::Origin { .. } => false,
                Kind::Snapshot { writable, .. } => !writable,
            }
    }

    pub fn is_origin(&self) -> bool {
        matches!(self.kind, Kind::Origin { .. })
    }

    /// The copy-out granularity: writes aligned to it never read before writing.
    pub fn block_size(&self) -> u32 {
        self.inner.geo.sub_size
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::OutOfRange {
                name: self.name.clone(),
                offset,
                length: len,
                size: self.size,
            }),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only() {
            return Err(Error::ReadOnly(self.name.clone()));
        }
        Ok(())
    }

    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        match &self.kind {
            Kind::Origin { no, dev, .. } => {
                // Taken before the device read: a queued write issued meanwhile is in one or
                // the other.
                let queued = self.inner.writeback.overlay(*no, offset, buf.len() as u64);
                dev.read_at(buf, offset)
                    .map_err(|e| Error::io("read", dev.path(), e))?;
                writeback::lay_over(&queued, offset, buf);
                Ok(())
            }
            Kind::Snapshot { id, .. } => self.read_snapshot(*id, offset, buf),
        }
    }

    /// A snapshot read: planned on the tree nodes in RAM under the state read lock; the nodes
    /// the plan lacks are read without it (see `Inner::with_nodes_read`), then it plans again.
    fn read_snapshot(&self, id: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        let cs = self.inner.geo.chunk_size as u64;
        let (first, last) = (offset / cs, (offset + buf.len() as u64 - 1) / cs);
        let mut rounds = 0;
        loop {
            // Held across the I/O: a preserve cannot complete (and the origin write it
            // guards cannot start) while a read that resolved to the origin is running.
            let st = self.inner.state.read();
            let (snap, origin) = self.snap(&st, id)?;
            let planned =
                match plan_read(&st, &st.meta.probe_view(), snap, origin, offset, buf.len()) {
                    Err(PdataError::NotCached(_)) if rounds <= btree::MAX_DEPTH => {
                        let missed = st.read_misses(snap, first, last);
                        let fetcher = st.meta.fetcher();
                        drop(st);
                        rounds += 1;
                        if !fetcher.fetch_all(missed) {
                            // Reported by a plan on the device's nodes.
                            rounds = btree::MAX_DEPTH + 1;
                        }
                        continue;
                    }
                    Err(PdataError::NotCached(_)) => {
                        plan_read(&st, &st.meta.view(), snap, origin, offset, buf.len())
                    }
                    planned => planned,
                };
            let pieces = planned.map_err(|e| self.meta_error(e))?;
            return self.run_pieces(origin, &pieces, buf);
        }
    }

    /// The index could not be read (an I/O error, a damaged node): this request fails.
    fn meta_error(&self, e: crate::pdata::PdataError) -> Error {
        Error::io(
            "read the metadata of",
            &self.name,
            std::io::Error::other(e.to_string()),
        )
    }

    fn snap<'a>(&self, st: &'a State, id: u64) -> Result<(&'a Snap, &'a Origin)> {
        let s = st
            .snaps
            .get(&id)
            .filter(|s| s.state != SnapshotState::Hidden)
            .ok_or_else(|| Error::NotFound(format!("snapshot {}", self.name)))?;
        if s.state == SnapshotState::Invalid {
            return Err(Error::SnapshotInvalid {
                name: self.name.clone(),
                reason: s.reason.clone().unwrap_or_default(),
            });
        }
        let o = &st.origins[&s.origin];
        Ok((s, o))
    }

    fn run_pieces(&self, origin: &Origin, pieces: &[Piece], buf: &mut [u8]) -> Result<()> {
        for p in pieces {
            let dst = &mut buf[p.buf_off..p.buf_off + p.len];
            match p.src {
                Src::Store => self.inner.store_read(dst, p.dev_off)?,
                Src::Zero => dst.fill(0),
                Src::Origin => {
                    let dev = origin.dev.as_ref().map_err(|e| Error::Busy(e.clone()))?;
                    dev.read_at(dst, p.dev_off)
                        .map_err(|e| Error::io("read", dev.path(), e))?
                }
            }
        }
        Ok(())
    }

    pub fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        match &self.kind {
            Kind::Origin { no, dev, gate } => self.write_origin(*no, dev, gate, offset, data, fua),
            Kind::Snapshot { id, .. } => self.write_snapshot(*id, offset, data, fua),
        }
    }

    /// Write zeros (also what trim does: a trimmed range reads as zeros).
    pub fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let zeros = vec![0u8; (len.min(1 << 20)) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(zeros.len() as u64) as usize;
            self.write_at(pos, &zeros[..n], false)?;
            pos += n as u64;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Whether `zero_range` with `may_trim` writes no data: an origin whose device punches
    /// holes, or a writable snapshot (its whole blocks become zero entries).
    pub fn can_zero_fast(&self) -> bool {
        match &self.kind {
            Kind::Origin { dev, .. } => !self.read_only() && dev.can_punch(),
            Kind::Snapshot { .. } => !self.read_only(),
        }
    }

    pub fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, true, false)
    }

    /// Make a range read as zeros (TRIM, WRITE_ZEROES). On an origin the snapshots keep what
    /// they need first (zero entries where it read as zeros already, so trimming what was never
    /// written costs them nothing), then, if `may_trim`, the range is punched out of the file
    /// instead of written: the origin stays sparse. Elsewhere zeros are written.
    pub fn zero_range(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let (no, dev, gate) = match &self.kind {
            Kind::Origin { no, dev, gate } => (no, dev, gate),
            Kind::Snapshot { id, .. } => return self.zero_snapshot(*id, offset, len, fua),
        };
        if !may_trim || len == 0 {
            return self.write_zeroes(offset, len, fua);
        }
        self.inner.before_origin_write()?;
        let cs = self.inner.geo.chunk_size as u64;
        // In pieces, so the state lock is not held across the copy-outs of a huge range.
        const PIECE: u64 = 8 << 20;
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(PIECE - pos % PIECE);
            let _gate = gate.read();
            let wait_seq = {
                let st = self.inner.state.write();
                let (first, last) = (pos / cs, (pos + n - 1) / cs);
                let o = st
                    .origins
                    .get(no)
                    .ok_or_else(|| Error::NotFound(format!("origin {}", self.name)))?;
                let slow = st
                    .needs_preserve(o, first, last)
                    .map_err(|e| self.meta_error(e))?;
                // Copies of these blocks not durable yet are waited for either way.
                if slow {
                    match self.preserve(st, *no, dev, pos, n, None)? {
                        Preserved::Wait(seq) => seq,
                        Preserved::Queued => unreachable!("only a write is queued behind copies"),
                    }
                } else {
                    self.inner.check_poison()?;
                    copyout::write_wait(&st, *no, first, last)
                }
            };
            // Invariant 2, as for a write; and writes acknowledged before this one go first.
            self.inner.writeback.drain(&self.inner);
            if wait_seq > self.inner.durable_seq() {
                self.inner.wait_durable(wait_seq)?;
            }
            match dev.punch(pos, n) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                    let zeros = vec![0u8; n.min(1 << 20) as usize];
                    let mut p = pos;
                    while p < pos + n {
                        let k = (pos + n - p).min(zeros.len() as u64) as usize;
                        dev.write_at(&zeros[..k], p)
                            .map_err(|e| Error::io("write", dev.path(), e))?;
                        p += k as u64;
                    }
                }
                Err(e) => return Err(Error::io("punch a hole in", dev.path(), e)),
            }
            pos += n;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    pub fn flush(&self) -> Result<()> {
        match &self.kind {
            Kind::Origin { no, dev, .. } => {
                self.inner.writeback.drain(&self.inner);
                if self.inner.ephemeral {
                    // Nothing is synced, but a lost write still fails the flush.
                    if let Some(msg) = self.inner.writeback.take_error(*no) {
                        return Err(writeback::flush_error(dev.path(), msg));
                    }
                    return self.inner.check_poison();
                }
                // First: a write this flush should cover and that was lost says so precisely.
                self.inner.sync_origin(*no, &**dev)?;
                self.inner.check_poison()
            }
            Kind::Snapshot { .. } => {
                self.inner.check_poison()?;
                let seq = self.inner.appended_seq();
                self.inner.wait_durable(seq)?;
                self.inner.store_sync()
            }
        }
    }

    /// Which ranges hold data. Ranges the volume shares with a hole of the origin file are
    /// reported as zero holes, so clients copy sparsely.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range(offset, len)?;
        if self.is_origin() {
            // The file's allocation must include what queued writes will put there.
            self.inner.writeback.drain(&self.inner);
        }
        let st = self.inner.state.read();
        let (origin_no, snap) = match &self.kind {
            Kind::Origin { no, .. } => (*no, None),
            Kind::Snapshot { id, .. } => {
                let (s, _) = self.snap(&st, *id)?;
                (s.origin, Some(s))
            }
        };
        let origin = &st.origins[&origin_no];
        let dev = origin.dev.as_ref().map_err(|e| Error::Busy(e.clone()))?;
        let origin_ext = dev
            .allocation(offset, len)
            .map_err(|e| Error::io("seek", dev.path(), e))?;
        let Some(s) = snap else {
            return Ok(origin_ext);
        };
        // A snapshot's own or preserved chunks are data; elsewhere it shares the origin's status.
        let cs = self.inner.geo.chunk_size as u64;
        let mut out: Vec<Extent> = Vec::new();
        let push = |out: &mut Vec<Extent>, length: u64, zero: bool| match out.last_mut() {
            Some(l) if l.zero == zero => l.length += length,
            _ => out.push(Extent { length, zero }),
        };
        let mut pos = offset;
        let mut oi = origin_ext.into_iter();
        let mut cur = oi.next();
        let mut cur_left = cur.map(|e| e.length).unwrap_or(0);
        while pos < offset + len {
            let c = pos / cs;
            let chunk_end = ((c + 1) * cs).min(offset + len);
            let own = match st.map_get(s, c).map_err(|e| self.meta_error(e))? {
                Some(hit) => hit.slot != ZERO_SLOT,
                None => st
                    .preserved_lookup(origin_no, c, s.gen)
                    .map_err(|e| self.meta_error(e))?
                    .is_some_and(|slot| slot != ZERO_SLOT),
            };
            let mut n = chunk_end - pos;
            // Walk the origin extents across this chunk.
            while n > 0 {
                let Some(e) = cur else { break };
                let take = n.min(cur_left);
                push(&mut out, take, e.zero && !own);
                pos += take;
                n -= take;
                cur_left -= take;
                if cur_left == 0 {
                    cur = oi.next();
                    cur_left = cur.map(|e| e.length).unwrap_or(0);
                }
            }
            if n > 0 {
                push(&mut out, n, false);
                pos += n;
            }
        }
        Ok(out)
    }

    fn write_origin(
        &self,
        no: u32,
        dev: &Arc<dyn BlockDev>,
        gate: &Arc<RwLock<()>>,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<()> {
        self.inner.before_origin_write()?;
        let _gate = gate.read();
        // No poison check here: on a poisoned store a write that needs no copy-out still goes
        // to the origin (it changes nothing the store vouches for); `preserve` refuses the rest.
        // (Unless it is the open's first after a clean close: the header it must write first
        // cannot be written on a poisoned store.)
        let cs = self.inner.geo.chunk_size as u64;
        let (first, last) = (offset / cs, (offset + data.len() as u64 - 1) / cs);
        // The tree nodes the lookups below and `preserve` need, read without the state lock
        // (profiled at 2M mappings: leaf reads under the lock were most of the writers' waits),
        // then the lookups under the lock of the last probe: the write lock when the last
        // write needed a copy-out (this one likely does too, and claims its copies in the same
        // round), else the read lock.
        let probe = |st: &State| {
            st.origins
                .get(&no)
                .map_or_else(Vec::new, |o| st.first_write_misses(o, first, last))
        };
        let lookup = |st: &State| -> Result<bool> {
            let o = st
                .origins
                .get(&no)
                .ok_or_else(|| Error::NotFound(format!("origin {}", self.name)))?;
            let slow = st
                .needs_preserve(o, first, last)
                .map_err(|e| self.meta_error(e))?;
            self.copy_outs_likely.store(slow, Ordering::Relaxed);
            Ok(slow)
        };
        let wait = if self.copy_outs_likely.load(Ordering::Relaxed) {
            self.inner
                .with_nodes_write(probe, |st| -> Result<Preserved> {
                    if lookup(&st)? {
                        self.preserve(st, no, dev, offset, data.len() as u64, Some(data))
                    } else {
                        Ok(Preserved::Wait(copyout::write_wait(&st, no, first, last)))
                    }
                })?
        } else {
            // None: a copy-out, which learns what the write waits for in `preserve`.
            let without_copy_out =
                self.inner
                    .with_nodes_read(probe, |st| -> Result<Option<u64>> {
                        Ok((!lookup(st)?).then(|| copyout::write_wait(st, no, first, last)))
                    })?;
            match without_copy_out {
                Some(seq) => Preserved::Wait(seq),
                None => {
                    let st = self.inner.state.write();
                    self.preserve(st, no, dev, offset, data.len() as u64, Some(data))?
                }
            }
        };
        let wait_seq = match wait {
            Preserved::Queued => return if fua { self.flush() } else { Ok(()) },
            Preserved::Wait(seq) => seq,
        };
        // Invariant 2: the old data and its mapping are durable before the origin changes. A
        // write that would wait for that is queued instead (answered now, issued after the
        // commit); so is one that overlaps a queued write, to stay behind it.
        let len = data.len() as u64;
        let wb = &self.inner.writeback;
        let must_wait = wait_seq > self.inner.durable_seq();
        if must_wait || wb.overlaps(no, offset, len) {
            // On a poisoned store what it waits for never becomes durable: say so now.
            if must_wait {
                self.inner.check_poison()?;
            }
            wb.push(no, dev, offset, data, wait_seq);
            return if fua { self.flush() } else { Ok(()) };
        }
        dev.write_at(data, offset)
            .map_err(|e| Error::io("write", dev.path(), e))?;
        if fua && !self.inner.ephemeral {
            // A failed sync drops the origin's dirty pages, other writes' too: remembered.
            self.inner.sync_origin(no, &**dev)?;
        }
        Ok(())
    }

    /// Copy out every block of `[offset, offset+len)` that some live snapshot still needs.
    /// `write`: the origin write the copies guard, queued behind them once they are made
    /// (answered then; its records are logged by the next holder of the state write lock,
    /// see `copyout`). None: the range is about to read as zeroes (TRIM, WRITE_ZEROES), so a
    /// block that reads as zeroes now does not change and needs nothing (not even a zero
    /// entry; a later write to it preserves it then), and the records are logged here.
    ///
    /// The copy's I/O runs without the state lock (it is what a first write costs): the
    /// blocks are claimed under the lock (`State::copying`: a writer of the same block waits
    /// for the copy, then finds it done), then read and written unlocked. The origin cannot
    /// change meanwhile: its writers of those blocks wait, and snapshot creation waits for
    /// the origin's gate, which the caller holds, then drains the queue (logging the jobs).
    fn preserve(
        &self,
        mut st: RwLockWriteGuard<'_, State>,
        no: u32,
        dev: &Arc<dyn BlockDev>,
        offset: u64,
        len: u64,
        write: Option<&[u8]>,
    ) -> Result<Preserved> {
        let bs = self.inner.geo.chunk_size as u64;
        let end = offset + len;
        let (first, last) = (offset / bs, (end - 1) / bs);
        let merr = |e: crate::pdata::PdataError| self.meta_error(e);
        // 1. Under the lock: which blocks need a copy, claimed, with a block each.
        let (copies, gen) = loop {
            // Neither a copy nor an invalidation can be made durable any more.
            self.inner.check_poison()?;
            // Others' copies made since: their records (and a block of ours they cover).
            self.inner.log_finished(&mut st);
            let settled = self.inner.settled_seq.load(Ordering::Acquire);
            let durable = self.inner.commit.lock().durable_seq;
            st.inflight_preserves.expire(durable);
            st.unsettled_slots.expire(settled);
            let mut wanted: Vec<(u64, u32)> = Vec::new();
            let mut busy = false;
            for c in first..=last {
                let o = &st.origins[&no];
                let gen = o.gen;
                if !st.needs_preserve(o, c, c).map_err(merr)? {
                    continue;
                }
                if st.copying.contains(&(no, c)) {
                    busy = true;
                    break;
                }
                let pt = st.preserved_through(o, c).map_err(merr)?;
                if pt >= gen || !o.any_live(pt + 1, gen) {
                    // Nothing live needs this block's old data: done for this epoch.
                    st.mark_done(no, gen, c).map_err(merr)?;
                } else {
                    wanted.push((c, pt + 1));
                }
            }
            if busy {
                // Another writer is copying one of these blocks: wait for it, then look again.
                let seen = self.inner.copies_done.load(Ordering::Acquire);
                RwLockWriteGuard::unlocked(&mut st, || self.inner.wait_copies(seen));
                continue;
            }
            let gen = st.origins[&no].gen;
            let mut copies = Vec::with_capacity(wanted.len());
            for (c, lo) in wanted {
                st.copying.insert((no, c));
                // A block for every copy, zeroes or not (known only once read): a zero one
                // gives its block back. None: the store is full.
                let slot = self.inner.alloc_data_slot(&mut st);
                copies.push(Copy {
                    block: c,
                    lo,
                    slot,
                    zero: false,
                    crc: 0,
                    failed: None,
                });
            }
            break (copies, gen);
        };
        if copies.is_empty() {
            return Ok(Preserved::Wait(copyout::write_wait(&st, no, first, last)));
        }
        drop(st);
        // 2. Unlocked: one read of the old data, runs of neighbouring blocks written at once.
        let (lo_block, hi_block) = (copies[0].block, copies[copies.len() - 1].block);
        let mut job = CopyJob {
            volume: self.name.clone(),
            origin: no,
            gen,
            first,
            last,
            copies,
            zeroing: write.is_none(),
        };
        let mut old = vec![0u8; ((hi_block - lo_block + 1) * bs) as usize];
        let src = lo_block * bs;
        let avail = self.size.saturating_sub(src).min(old.len() as u64) as usize;
        let read = dev
            .read_at(&mut old[..avail], src)
            .map_err(|e| Error::io("read", dev.path(), e));
        if read.is_ok() {
            self.inner.write_copies(&old, lo_block, &mut job.copies);
            if let Some(data) = write.filter(|_| !self.inner.ephemeral) {
                // 3a. The write waits in the queue for its copies' records; answered now.
                let entry = self.inner.writeback.push(no, dev, offset, data, PENDING);
                self.inner.push_finished(job, entry);
                return Ok(Preserved::Queued);
            }
        }
        // 3b. Under the lock again: a record for each copy made; the rest given back.
        let mut st = self.inner.state.write();
        let logged = match read {
            Ok(()) => self.inner.log_job(&mut st, &job),
            Err(e) => {
                self.inner.release_claims(&mut st, &job, true);
                Err(e)
            }
        };
        drop(st);
        self.inner.copies_finished();
        Ok(Preserved::Wait(logged?))
    }

    fn write_snapshot(&self, id: u64, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let geo = self.inner.geo;
        let bs = geo.chunk_size as usize;
        let mut st = self.inner.state.write();
        self.inner.check_poison()?;
        let settled = self.inner.settled_seq.load(Ordering::Acquire);
        st.unsettled_slots.expire(settled);
        let end = offset + data.len() as u64;
        let mut blockbuf = vec![0u8; bs];
        let mut pos = offset;
        while pos < end {
            let c = pos / bs as u64;
            let cend = ((c + 1) * bs as u64).min(end);
            let (in0, in1) = (
                (pos - c * bs as u64) as usize,
                (cend - c * bs as u64) as usize,
            );
            let (snap, _) = self.snap(&st, id)?;
            let entry = st.map_get(snap, c).map_err(|e| self.meta_error(e))?;
            // Its own block, whose record recovery will not verify again: written in place.
            let exclusive = entry.is_some_and(|e| {
                e.own && e.slot != ZERO_SLOT && !st.unsettled_slots.contains_key(&e.slot)
            });
            // An unaligned write keeps the rest of its block.
            if in0 > 0 || in1 < bs {
                self.read_block(&st, id, c, 0, &mut blockbuf)?;
            }
            blockbuf[in0..in1]
                .copy_from_slice(&data[(pos - offset) as usize..(cend - offset) as usize]);
            let slot = match entry {
                Some(e) if exclusive => e.slot,
                _ => self.inner.alloc_data_slot(&mut st).ok_or_else(|| {
                    Error::NoSpace(format!("no room for a write to {}", self.name))
                })?,
            };
            if let Err(e) = self
                .inner
                .store_write_data(&blockbuf, geo.slot_offset(slot))
            {
                // Only this write fails: a new block goes back, an owned one keeps its old
                // mapping (the range's content is undefined, as after any failed write).
                if !exclusive {
                    st.free_unlogged(slot).map_err(|e| self.meta_error(e))?;
                }
                return Err(Error::io("write to the COW store for", &self.name, e));
            }
            // An in-place overwrite changes no metadata: no record.
            if !exclusive {
                let crc = crc32c::crc32c(&blockbuf);
                self.inner.log(
                    &mut st,
                    Record::MapWrite {
                        snap: id,
                        chunk: c,
                        slot,
                        bits: 1,
                        data_bits: 1,
                        crc,
                    },
                )?;
            }
            pos = cend;
        }
        drop(st);
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// TRIM/WRITE_ZEROES on a writable snapshot: whole blocks become zero entries (no data,
    /// and what the snapshot owned there is freed); partial blocks at the edges get zeros.
    fn zero_snapshot(&self, id: u64, offset: u64, len: u64, fua: bool) -> Result<()> {
        let bs = self.inner.geo.chunk_size as u64;
        let end = offset + len;
        let (first_full, end_full) = (offset.div_ceil(bs), end / bs);
        if first_full >= end_full {
            return self.write_zeroes(offset, len, fua);
        }
        if offset < first_full * bs {
            self.write_zeroes(offset, first_full * bs - offset, false)?;
        }
        {
            let mut st = self.inner.state.write();
            self.inner.check_poison()?;
            for c in first_full..end_full {
                let (snap, _) = self.snap(&st, id)?;
                let hit = st.map_get(snap, c).map_err(|e| self.meta_error(e))?;
                if hit.is_some_and(|h| h.own && h.slot == ZERO_SLOT) {
                    continue;
                }
                self.inner.log(
                    &mut st,
                    Record::MapWrite {
                        snap: id,
                        chunk: c,
                        slot: ZERO_SLOT,
                        bits: 1,
                        data_bits: 0,
                        crc: 0,
                    },
                )?;
            }
        }
        if end > end_full * bs {
            self.write_zeroes(end_full * bs, end - end_full * bs, false)?;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// One block of a snapshot as it reads now.
    fn read_block(
        &self,
        st: &State,
        id: u64,
        chunk: u64,
        block: u32,
        out: &mut [u8],
    ) -> Result<()> {
        let (snap, origin) = self.snap(st, id)?;
        let geo = self.inner.geo;
        let off = chunk * geo.chunk_size as u64 + block as u64 * geo.sub_size as u64;
        let avail = self.size.saturating_sub(off).min(out.len() as u64) as usize;
        out[avail..].fill(0);
        let pieces = plan_read(st, &st.meta.view(), snap, origin, off, avail)
            .map_err(|e| self.meta_error(e))?;
        self.run_pieces(origin, &pieces, &mut out[..avail])
    }
}

/// Resolve every block of a snapshot read: its own data (or an ancestor volume's), else the
/// origin's preserved copy for the snapshot's generation, else the origin. Adjacent pieces on
/// one device are merged. Each block is one seek in each key space it may be in.
fn plan_read(
    st: &State,
    v: &dyn btree::View,
    snap: &Snap,
    origin: &Origin,
    offset: u64,
    len: usize,
) -> std::result::Result<Vec<Piece>, crate::pdata::PdataError> {
    let geo = st.geo;
    let bs = geo.chunk_size as u64;
    let mut pieces: Vec<Piece> = Vec::new();
    let end = offset + len as u64;
    let own_data = st.has_own_data(snap);
    let preserved = origin.entries > 0;
    let mut pos = offset;
    while pos < end {
        let c = pos / bs;
        let in_block = pos - c * bs;
        let piece_end = ((c + 1) * bs).min(end);
        let hit = if own_data {
            st.map_get_in(v, snap, c)?
        } else {
            None
        };
        let slot = match hit {
            Some(h) => Some(h.slot),
            None if preserved => State::preserved_lookup_in(v, origin.no, c, snap.gen)?,
            None => None,
        };
        let (src, dev_off) = match slot {
            Some(ZERO_SLOT) => (Src::Zero, pos),
            Some(slot) => (Src::Store, geo.slot_offset(slot) + in_block),
            None => (Src::Origin, pos),
        };
        let n = (piece_end - pos) as usize;
        let buf_off = (pos - offset) as usize;
        match pieces.last_mut() {
            Some(p)
                if p.src == src && (src == Src::Zero || p.dev_off + p.len as u64 == dev_off) =>
            {
                p.len += n
            }
            _ => pieces.push(Piece {
                src,
                dev_off,
                buf_off,
                len: n,
            }),
        }
        pos = piece_end;
    }
    Ok(pieces)
}
