//! Volumes: the origin and its snapshots, as front ends see them (read, write, flush, trim,
//! block status). The copy-out ordering rule (DESIGN invariant 2) is enforced here.

use std::sync::Arc;

use parking_lot::RwLock;

use crate::blockdev::BlockDev;
use crate::error::{Error, Result};
use crate::format::Geometry;
use crate::index::ZERO_SLOT;
use crate::journal::Record;
use crate::state::{Origin, Snap, State};
use crate::store::{resolve_name, Handles, Inner, Store};
use crate::types::{EventKind, Extent, SnapshotState};
use crate::writeback;

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
}

/// Where a piece of a read comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Src {
    Store,
    Origin,
    /// A preserved zero entry: nothing to read.
    Zero,
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

fn crc_of(chunkbuf: &[u8], sub: usize, bits: u64) -> u32 {
    let mut c = 0u32;
    let mut b = bits;
    while b != 0 {
        let i = b.trailing_zeros() as usize;
        c = crc32c::crc32c_append(c, &chunkbuf[i * sub..(i + 1) * sub]);
        b &= b - 1;
    }
    c
}

/// Runs of consecutive set bits: (first block, count).
fn runs(bits: u64) -> impl Iterator<Item = (u32, u32)> {
    let mut b = bits;
    std::iter::from_fn(move || {
        if b == 0 {
            return None;
        }
        let start = b.trailing_zeros();
        let len = (!(b >> start)).trailing_zeros();
        b &= !(if len == 64 {
            u64::MAX
        } else {
            ((1u64 << len) - 1) << start
        });
        Some((start, len))
    })
}

fn mask(first: u32, last: u32) -> u64 {
    let n = last - first + 1;
    (if n == 64 { u64::MAX } else { (1u64 << n) - 1 }) << first
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
            Kind::Snapshot { id, .. } => {
                // Held across the I/O: a preserve cannot complete (and the origin write it
                // guards cannot start) while a read that resolved to the origin is running.
                let st = self.inner.state.read();
                let (snap, origin) = self.snap(&st, *id)?;
                let pieces = plan_read(self.inner.geo, snap, origin, offset, buf.len());
                self.run_pieces(origin, &pieces, buf)
            }
        }
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
    /// holes (a snapshot's zeros are written to the store).
    pub fn can_zero_fast(&self) -> bool {
        match &self.kind {
            Kind::Origin { dev, .. } => !self.read_only() && dev.can_punch(),
            Kind::Snapshot { .. } => false,
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
        let Kind::Origin { no, dev, gate } = &self.kind else {
            return self.write_zeroes(offset, len, fua);
        };
        if !may_trim || len == 0 {
            return self.write_zeroes(offset, len, fua);
        }
        let cs = self.inner.geo.chunk_size as u64;
        // In pieces, so the state lock is not held across the copy-outs of a huge range.
        const PIECE: u64 = 8 << 20;
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(PIECE - pos % PIECE);
            let _gate = gate.read();
            let wait_seq = {
                let mut st = self.inner.state.write();
                let (first, last) = (pos / cs, (pos + n - 1) / cs);
                let o = st
                    .origins
                    .get(no)
                    .ok_or_else(|| Error::NotFound(format!("origin {}", self.name)))?;
                let mut wait = if (first..=last).any(|c| needs_preserve(o, c)) {
                    self.preserve(&mut st, *no, dev, pos, n)?
                } else {
                    self.inner.check_poison()?;
                    0
                };
                for c in first..=last {
                    if let Some(s) = st.inflight_preserves.get(&(*no, c)) {
                        wait = wait.max(s);
                    }
                }
                wait.max(st.release_barrier(*no))
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
            let own = s.map.get(c).is_some() || origin.pindex.entries(c).next().is_some();
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
        let _gate = gate.read();
        // No poison check here: on a poisoned store a write that needs no copy-out still goes
        // to the origin (it changes nothing the store vouches for); `preserve` refuses the rest.
        let cs = self.inner.geo.chunk_size as u64;
        let (first, last) = (offset / cs, (offset + data.len() as u64 - 1) / cs);
        let mut wait_seq;
        let slow = {
            let st = self.inner.state.read();
            let o = st
                .origins
                .get(&no)
                .ok_or_else(|| Error::NotFound(format!("origin {}", self.name)))?;
            let slow = (first..=last).any(|c| needs_preserve(o, c));
            wait_seq = st.release_barrier(no);
            if !slow && !st.inflight_preserves.is_empty() {
                for c in first..=last {
                    if let Some(s) = st.inflight_preserves.get(&(no, c)) {
                        wait_seq = wait_seq.max(s);
                    }
                }
            }
            slow
        };
        if slow {
            let mut st = self.inner.state.write();
            wait_seq = self.preserve(&mut st, no, dev, offset, data.len() as u64)?;
            wait_seq = wait_seq.max(st.release_barrier(no));
        }
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
    /// Returns the journal sequence the origin write must wait for.
    fn preserve(
        &self,
        st: &mut State,
        no: u32,
        dev: &Arc<dyn BlockDev>,
        offset: u64,
        len: u64,
    ) -> Result<u64> {
        // Neither a copy nor an invalidation can be made durable any more.
        self.inner.check_poison()?;
        let geo = self.inner.geo;
        let (cs, sub) = (geo.chunk_size as u64, geo.sub_size as u64);
        let settled = self
            .inner
            .settled_seq
            .load(std::sync::atomic::Ordering::Acquire);
        let durable = self.inner.commit.lock().durable_seq;
        st.inflight_preserves.expire(durable);
        st.unsettled_slots.expire(settled);
        let end = offset + len;
        let mut wait_seq = 0;
        let mut chunkbuf: Vec<u8> = Vec::new();
        for c in offset / cs..=(end - 1) / cs {
            let o = &st.origins[&no];
            let gen = o.gen;
            let osize = o.size;
            if needs_preserve(o, c) {
                let lo_b = (offset.max(c * cs) - c * cs) / sub;
                let hi_b = (end.min((c + 1) * cs) - 1 - c * cs) / sub;
                // Blocks to copy, grouped by the first generation that still needs them.
                let mut groups: Vec<(u32, u64)> = Vec::new();
                for b in lo_b as u32..=hi_b as u32 {
                    let pt = o.pindex.preserved_through(c, b);
                    if pt >= gen || !o.any_live(pt + 1, gen) {
                        continue;
                    }
                    match groups.iter_mut().find(|g| g.0 == pt + 1) {
                        Some(g) => g.1 |= 1 << b,
                        None => groups.push((pt + 1, 1 << b)),
                    }
                }
                for (lo, bits) in groups {
                    // Read the blocks first: whether they read as zeroes decides where they go.
                    chunkbuf.clear();
                    chunkbuf.resize(cs as usize, 0);
                    for (b0, n) in runs(bits) {
                        let (boff, blen) = (b0 as u64 * sub, n as u64 * sub);
                        let src = c * cs + boff;
                        let avail = osize.saturating_sub(src).min(blen) as usize;
                        let at = boff as usize;
                        dev.read_at(&mut chunkbuf[at..at + avail], src)
                            .map_err(|e| Error::io("read", dev.path(), e))?;
                    }
                    let zero = chunkbuf.iter().all(|&b| b == 0);
                    let existing = st.origins[&no].pindex.find(c, lo, gen);
                    let (slot, all_bits) = match existing {
                        // Zeroes (a hole, or zero data) need no copy: a zero entry records them.
                        None if zero => (ZERO_SLOT, bits),
                        Some(e) if e.slot == ZERO_SLOT && zero => (ZERO_SLOT, bits),
                        Some(e) if e.slot != ZERO_SLOT => (e.slot, bits),
                        // New data, or data joining a zero entry (its blocks are written as the
                        // zeroes they are): a fresh slot.
                        _ => match self.inner.alloc_data_slot(st) {
                            Some(s) => (s, bits | existing.map_or(0, |e| e.bits)),
                            None => {
                                let reason =
                                    format!("COW store full: could not preserve chunk {c}");
                                let seq = self.invalidate_needing(st, no, lo, gen, &reason)?;
                                wait_seq = wait_seq.max(seq);
                                continue;
                            }
                        },
                    };
                    let fresh = slot != ZERO_SLOT && existing.is_none_or(|e| e.slot == ZERO_SLOT);
                    // The CRC runs over the blocks in order, as `crc_of` would compute it.
                    let mut crc = 0u32;
                    let mut failed = None;
                    if slot != ZERO_SLOT {
                        for (b0, n) in runs(all_bits) {
                            let (at, len) = ((b0 as u64 * sub) as usize, (n as u64 * sub) as usize);
                            let piece = &chunkbuf[at..at + len];
                            if let Err(e) = self
                                .inner
                                .store_write_data(piece, geo.slot_offset(slot) + at as u64)
                            {
                                failed = Some(e);
                                break;
                            }
                            crc = crc32c::crc32c_append(crc, piece);
                        }
                    }
                    if let Some(e) = failed {
                        // ENOSPC of a sparse store on a full file system, EIO: the origin stays
                        // writable, as with a full store (dm-snapshot does the same).
                        if fresh {
                            st.alloc.decref(slot, None);
                        }
                        let reason =
                            format!("COW store write failed ({e}): could not preserve chunk {c}");
                        let seq = self.invalidate_needing(st, no, lo, gen, &reason)?;
                        wait_seq = wait_seq.max(seq);
                        continue;
                    }
                    let seq = self.inner.log(
                        st,
                        Record::Preserve {
                            origin: no,
                            chunk: c,
                            lo,
                            hi: gen,
                            slot,
                            bits: all_bits,
                            crc,
                        },
                    )?;
                    st.inflight_preserves.insert((no, c), seq);
                }
                // Cache "nothing left to do for this chunk" for the O(1) hot-path test.
                let o = &st.origins[&no];
                let done = (0..geo.subs_per_chunk()).all(|b| {
                    let pt = o.pindex.preserved_through(c, b);
                    pt >= gen || !o.any_live(pt + 1, gen)
                });
                if done {
                    st.origins
                        .get_mut(&no)
                        .unwrap()
                        .pindex
                        .set_done_through(c, gen);
                }
            }
            if let Some(s) = st.inflight_preserves.get(&(no, c)) {
                wait_seq = wait_seq.max(s);
            }
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
        // In pieces, so a record stays small whatever the number of snapshots.
        for ids in ids.chunks(256) {
            self.inner.log(
                st,
                Record::Invalidate {
                    ids: ids.to_vec(),
                    reason: reason.clone(),
                },
            )?;
        }
        let seq = self.inner.log(st, Record::Reclaim { origin: no })?;
        st.release_seq.insert(no, seq);
        self.inner.event(
            EventKind::SnapshotInvalidated,
            format!("{reason}; invalidated {}", names.join(", ")),
        );
        Ok(seq)
    }

    fn write_snapshot(&self, id: u64, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let geo = self.inner.geo;
        let (cs, sub) = (geo.chunk_size as u64, geo.sub_size as usize);
        let mut st = self.inner.state.write();
        self.inner.check_poison()?;
        let settled = self
            .inner
            .settled_seq
            .load(std::sync::atomic::Ordering::Acquire);
        st.unsettled_slots.expire(settled);
        let end = offset + data.len() as u64;
        let mut chunkbuf = vec![0u8; cs as usize];
        let mut pos = offset;
        while pos < end {
            let c = pos / cs;
            let cend = ((c + 1) * cs).min(end);
            let (in0, in1) = ((pos - c * cs) as usize, (cend - c * cs) as usize);
            let (b0, b1) = ((in0 / sub) as u32, ((in1 - 1) / sub) as u32);
            let touched = mask(b0, b1);
            let (snap, _) = self.snap(&st, id)?;
            let entry = snap.map.get(c);
            let exclusive = entry.is_some_and(|e| {
                st.alloc.refcount(e.slot) == 1
                    && !snap.map.path_shared(c)
                    && !st.unsettled_slots.contains_key(&e.slot)
            });
            // The edges of an unaligned write keep the rest of their block.
            for b in [b0, b1] {
                let (bs, be) = (b as usize * sub, (b as usize + 1) * sub);
                if in0 > bs || in1 < be {
                    let mut tmp = vec![0u8; sub];
                    self.read_block(&st, id, c, b, &mut tmp)?;
                    chunkbuf[bs..be].copy_from_slice(&tmp);
                }
            }
            chunkbuf[in0..in1]
                .copy_from_slice(&data[(pos - offset) as usize..(cend - offset) as usize]);
            let (slot, copy_bits) = match entry {
                Some(e) if exclusive => (e.slot, 0),
                _ => {
                    let slot = self.inner.alloc_data_slot(&mut st).ok_or_else(|| {
                        Error::NoSpace(format!("no room for a write to {}", self.name))
                    })?;
                    // A shared or unsettled slot is left to whoever needs it; ours is new.
                    (slot, entry.map(|e| e.bits & !touched).unwrap_or(0))
                }
            };
            if let (Some(e), true) = (entry, copy_bits != 0) {
                for (r0, n) in runs(copy_bits) {
                    let (o0, l) = (r0 as usize * sub, n as usize * sub);
                    self.inner.store_read(
                        &mut chunkbuf[o0..o0 + l],
                        geo.slot_offset(e.slot) + o0 as u64,
                    )?;
                }
            }
            let data_bits = touched | copy_bits;
            for (r0, n) in runs(data_bits) {
                let (o0, l) = (r0 as usize * sub, n as usize * sub);
                if let Err(e) = self
                    .inner
                    .store_write_data(&chunkbuf[o0..o0 + l], geo.slot_offset(slot) + o0 as u64)
                {
                    // Only this write fails: a new slot goes back, an owned one keeps its old
                    // mapping (the range's content is undefined, as after any failed write).
                    if !exclusive {
                        st.alloc.decref(slot, None);
                    }
                    return Err(Error::io("write to the COW store for", &self.name, e));
                }
            }
            let old_bits = entry.map(|e| e.bits).unwrap_or(0);
            // An in-place overwrite of valid blocks changes no metadata: no record.
            if !exclusive || touched & !old_bits != 0 {
                let crc = crc_of(&chunkbuf, sub, data_bits);
                self.inner.log(
                    &mut st,
                    Record::MapWrite {
                        snap: id,
                        chunk: c,
                        slot,
                        bits: old_bits | touched,
                        data_bits,
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
        let pieces = plan_read(geo, snap, origin, off, avail);
        self.run_pieces(origin, &pieces, &mut out[..avail])
    }
}

/// Whether an origin write to `chunk` may need a copy-out: the O(1), allocation-free test.
#[inline]
fn needs_preserve(o: &Origin, chunk: u64) -> bool {
    let done = o.pindex.done_through(chunk);
    done < o.gen && o.any_live(done + 1, o.gen)
}

/// Resolve every block of a snapshot read: own map, else the origin's preserved entry for the
/// snapshot's generation, else the origin. Adjacent pieces on one device are merged.
fn plan_read(geo: Geometry, snap: &Snap, origin: &Origin, offset: u64, len: usize) -> Vec<Piece> {
    let (cs, sub) = (geo.chunk_size as u64, geo.sub_size as u64);
    let mut pieces: Vec<Piece> = Vec::new();
    let end = offset + len as u64;
    let mut pos = offset;
    let mut cur_chunk = u64::MAX;
    let mut entry = None;
    let mut has_preserved = false;
    while pos < end {
        let c = pos / cs;
        if c != cur_chunk {
            cur_chunk = c;
            entry = snap.map.get(c);
            has_preserved = origin.pindex.entries(c).next().is_some();
        }
        let in_chunk = pos - c * cs;
        let b = (in_chunk / sub) as u32;
        let piece_end = ((pos / sub + 1) * sub).min(end);
        let (src, dev_off) = match entry {
            Some(e) if e.bits & (1 << b) != 0 => (Src::Store, geo.slot_offset(e.slot) + in_chunk),
            _ => match has_preserved
                .then(|| origin.pindex.lookup(c, snap.gen, b))
                .flatten()
            {
                Some(ZERO_SLOT) => (Src::Zero, pos),
                Some(slot) => (Src::Store, geo.slot_offset(slot) + in_chunk),
                None => (Src::Origin, pos),
            },
        };
        let n = (piece_end - pos) as usize;
        let buf_off = (pos - offset) as usize;
        match pieces.last_mut() {
            Some(p) if p.src == src && p.dev_off + p.len as u64 == dev_off => p.len += n,
            _ => pieces.push(Piece {
                src,
                dev_off,
                buf_off,
                len: n,
            }),
        }
        pos = piece_end;
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_masks() {
        assert_eq!(runs(0b1110_0110).collect::<Vec<_>>(), vec![(1, 2), (5, 3)]);
        assert_eq!(runs(u64::MAX).collect::<Vec<_>>(), vec![(0, 64)]);
        assert_eq!(mask(0, 63), u64::MAX);
        assert_eq!(mask(2, 3), 0b1100);
    }
}
