//! The metadata journal: logical records with sequence numbers and salted checksums, written in
//! 4 KiB-aligned groups (one `fdatasync` each) into a circular region; a durable tree commit
//! frees the part before the point it sealed.
//!
//! A group is never written over a sector of an earlier durable group, so a torn write can only
//! damage the group being written. Each record's CRC is salted with the store's epoch (bumped by
//! every writable open), so records left from earlier epochs never validate; within an epoch
//! the sequence numbers must follow on exactly, so an earlier lap's records never do either.

use crate::codec::{Reader, Writer};
use crate::format::META_BLOCK;

pub const REC_MAGIC: u32 = 0x524a_564d; // "MVJR"
pub const HEADER: usize = 32;
const KIND_PAD: u16 = 0xffff;
/// Sends the scan to the region's start.
const KIND_WRAP: u16 = 0xfffe;
const SALT_JOURNAL: u32 = 0x4a52_0003;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSnap {
    pub id: u64,
    pub origin: u32,
    /// 0: taken from the origin (the origin's generation becomes `gen`); else a snapshot id.
    pub parent: u64,
    pub gen: u32,
    pub tag: String,
    pub memo: String,
    pub writable: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    OriginAdd {
        no: u32,
        id: String,
        path: String,
        size: u64,
    },
    OriginRemove {
        no: u32,
    },
    /// One atomic set: the snapshots of several origins at one instant.
    SnapshotCreate {
        time: u64,
        snaps: Vec<NewSnap>,
    },
    SnapshotDelete {
        id: u64,
    },
    /// Old origin data copied out: `bits` of `slot` now serve generations `lo..=hi` of `chunk`.
    /// `crc` covers the new blocks, in block order, so recovery can tell a torn copy.
    Preserve {
        origin: u32,
        chunk: u64,
        lo: u32,
        hi: u32,
        slot: u32,
        bits: u64,
        crc: u32,
    },
    /// A writable snapshot's chunk now lives in `slot` with valid `bits`; `crc` covers the
    /// blocks of `data_bits` (those this write put into the slot).
    MapWrite {
        snap: u64,
        chunk: u64,
        slot: u32,
        bits: u64,
        data_bits: u64,
        crc: u32,
    },
    /// The store filled up: these snapshots lost data.
    Invalidate {
        ids: Vec<u64>,
        reason: String,
    },
    /// Drop the origin's preserved entries of blocks `first..=last` that no live snapshot
    /// needs any more (the reclaimer's batches; a record of an older build, with the origin
    /// alone, covers every block).
    Reclaim {
        origin: u32,
        first: u64,
        last: u64,
    },
}

impl Record {
    fn kind(&self) -> u16 {
        match self {
            Record::OriginAdd { .. } => 1,
            Record::OriginRemove { .. } => 2,
            Record::SnapshotCreate { .. } => 3,
            Record::SnapshotDelete { .. } => 4,
            Record::Preserve { .. } => 5,
            Record::MapWrite { .. } => 6,
            Record::Invalidate { .. } => 7,
            Record::Reclaim { .. } => 8,
        }
    }

    /// Bytes this record takes in the journal, header included.
    pub fn encoded_len(&self) -> usize {
        let mut w = Writer::with_capacity(64);
        self.encode_payload(&mut w);
        HEADER + w.into_inner().len()
    }

    fn encode_payload(&self, w: &mut Writer) {
        match self {
            Record::OriginAdd { no, id, path, size } => {
                w.u32(*no);
                w.str(id);
                w.str(path);
                w.u64(*size);
            }
            Record::OriginRemove { no } => w.u32(*no),
            Record::SnapshotCreate { time, snaps } => {
                w.u64(*time);
                w.u32(snaps.len() as u32);
                for s in snaps {
                    w.u64(s.id);
                    w.u32(s.origin);
                    w.u64(s.parent);
                    w.u32(s.gen);
                    w.str(&s.tag);
                    w.str(&s.memo);
                    w.u8(s.writable as u8);
                }
            }
            Record::SnapshotDelete { id } => w.u64(*id),
            Record::Preserve {
                origin,
                chunk,
                lo,
                hi,
                slot,
                bits,
                crc,
            } => {
                w.u32(*origin);
                w.u64(*chunk);
                w.u32(*lo);
                w.u32(*hi);
                w.u32(*slot);
                w.u64(*bits);
                w.u32(*crc);
            }
            Record::MapWrite {
                snap,
                chunk,
                slot,
                bits,
                data_bits,
                crc,
            } => {
                w.u64(*snap);
                w.u64(*chunk);
                w.u32(*slot);
                w.u64(*bits);
                w.u64(*data_bits);
                w.u32(*crc);
            }
            Record::Invalidate { ids, reason } => {
                w.u32(ids.len() as u32);
                for id in ids {
                    w.u64(*id);
                }
                w.str(reason);
            }
            Record::Reclaim {
                origin,
                first,
                last,
            } => {
                w.u32(*origin);
                w.u64(*first);
                w.u64(*last);
            }
        }
    }

    fn decode_payload(kind: u16, p: &[u8]) -> Option<Record> {
        let mut r = Reader::new(p);
        let rec = match kind {
            1 => Record::OriginAdd {
                no: r.u32()?,
                id: r.str()?,
                path: r.str()?,
                size: r.u64()?,
            },
            2 => Record::OriginRemove { no: r.u32()? },
            3 => {
                let time = r.u64()?;
                let n = r.u32()? as usize;
                let mut snaps = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    snaps.push(NewSnap {
                        id: r.u64()?,
                        origin: r.u32()?,
                        parent: r.u64()?,
                        gen: r.u32()?,
                        tag: r.str()?,
                        memo: r.str()?,
                        writable: r.u8()? != 0,
                    });
                }
                Record::SnapshotCreate { time, snaps }
            }
            4 => Record::SnapshotDelete { id: r.u64()? },
            5 => Record::Preserve {
                origin: r.u32()?,
                chunk: r.u64()?,
                lo: r.u32()?,
                hi: r.u32()?,
                slot: r.u32()?,
                bits: r.u64()?,
                crc: r.u32()?,
            },
            6 => Record::MapWrite {
                snap: r.u64()?,
                chunk: r.u64()?,
                slot: r.u32()?,
                bits: r.u64()?,
                data_bits: r.u64()?,
                crc: r.u32()?,
            },
            7 => {
                let n = r.u32()? as usize;
                let mut ids = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    ids.push(r.u64()?);
                }
                Record::Invalidate {
                    ids,
                    reason: r.str()?,
                }
            }
            8 => {
                let origin = r.u32()?;
                if r.remaining() == 0 {
                    Record::Reclaim {
                        origin,
                        first: 0,
                        last: u64::MAX,
                    }
                } else {
                    Record::Reclaim {
                        origin,
                        first: r.u64()?,
                        last: r.u64()?,
                    }
                }
            }
            _ => return None,
        };
        (r.remaining() == 0).then_some(rec)
    }
}

fn salt(epoch: u64) -> u32 {
    SALT_JOURNAL ^ (epoch as u32) ^ ((epoch >> 32) as u32)
}

fn encode_one(out: &mut Vec<u8>, epoch: u64, seq: u64, kind: u16, payload: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&REC_MAGIC.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(payload);
    let c = crate::format::crc(salt(epoch), &out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&c.to_le_bytes());
}

/// Records appended since the last group was taken, and where the journal's live part lies.
///
/// The region is circular: positions are byte counts since the epoch began, taken modulo the
/// region's length. The live part runs from `tail` (where recovery of the durable version
/// starts) to `head` (where the next group goes); a tree commit that becomes durable moves
/// the tail up to the mark it sealed (see [`JournalWriter::seal`]). A group never straddles
/// the region's end: a wrap record at the end sends the scan back to the start.
#[derive(Debug)]
pub struct JournalWriter {
    pub epoch: u64,
    pub region_len: u64,
    head: u64,
    tail: u64,
    pub next_seq: u64,
    pending: Vec<u8>,
    /// Groups closed but not taken for writing yet, in order.
    ready: Vec<Group>,
}

/// A group ready to be written: bytes at region position `pos`, holding records up to
/// `last_seq`.
#[derive(Debug)]
pub struct Group {
    pub pos: u64,
    pub bytes: Vec<u8>,
    pub last_seq: u64,
}

/// Where the journal stood when a tree commit's records were sealed: recovery of that commit
/// starts here (region position `pos`, sequence `seq`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    abs: u64,
    pub pos: u64,
    pub seq: u64,
}

impl JournalWriter {
    /// A writer whose epoch starts at region position `start` with sequence `first_seq`.
    pub fn new(epoch: u64, first_seq: u64, region_len: u64, start: u64) -> JournalWriter {
        let start = start % region_len.max(1);
        JournalWriter {
            epoch,
            region_len,
            head: start,
            tail: start,
            next_seq: first_seq,
            pending: Vec::new(),
            ready: Vec::new(),
        }
    }

    /// Append a record; returns its sequence number.
    pub fn append(&mut self, rec: &Record) -> u64 {
        let mut w = Writer::with_capacity(64);
        rec.encode_payload(&mut w);
        let seq = self.next_seq;
        self.next_seq += 1;
        encode_one(
            &mut self.pending,
            self.epoch,
            seq,
            rec.kind(),
            &w.into_inner(),
        );
        seq
    }

    /// Append an empty group (padding only): committing it settles the group before it.
    pub fn append_empty_group(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let pad = vec![0u8; META_BLOCK as usize - HEADER];
        encode_one(&mut self.pending, self.epoch, seq, KIND_PAD, &pad);
        seq
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty() || !self.ready.is_empty()
    }

    /// Bytes the live part holds, including records not written yet.
    pub fn used(&self) -> u64 {
        self.head - self.tail + self.pending.len() as u64
    }

    /// Bytes the next group takes with `extra` more bytes of records: its padding, and the
    /// rest of the region when it must wrap.
    fn next_group_bytes(&self, extra: usize) -> u64 {
        let g =
            (self.pending.len() + extra + HEADER).div_ceil(META_BLOCK as usize) as u64 * META_BLOCK;
        let pos = self.head % self.region_len;
        if pos + g > self.region_len {
            self.region_len - pos + g
        } else {
            g
        }
    }

    /// Whether appending `extra` more bytes could overrun the live part (one block is kept
    /// spare): time for a tree commit, which moves the tail.
    pub fn nearly_full(&self, extra: usize) -> bool {
        self.head - self.tail + self.next_group_bytes(extra) + META_BLOCK > self.region_len
    }

    /// Close the pending records into a padded group (after a wrap record if it does not fit
    /// before the region's end) and advance the head.
    fn close_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut bytes = std::mem::take(&mut self.pending);
        let used = bytes.len() as u64 + HEADER as u64;
        let padded = used.div_ceil(META_BLOCK) * META_BLOCK;
        let pad = vec![0u8; (padded - used) as usize];
        let seq = self.next_seq;
        self.next_seq += 1;
        encode_one(&mut bytes, self.epoch, seq, KIND_PAD, &pad);
        debug_assert_eq!(bytes.len() as u64 % META_BLOCK, 0);
        let pos = self.head % self.region_len;
        if pos + bytes.len() as u64 > self.region_len {
            // The wrap record carries the sequence of the group's first record (it takes
            // none of its own): a stale one from an earlier lap never matches.
            let first = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
            let mut wrap = Vec::with_capacity(META_BLOCK as usize);
            encode_one(
                &mut wrap,
                self.epoch,
                first,
                KIND_WRAP,
                &[0u8; META_BLOCK as usize - HEADER],
            );
            self.ready.push(Group {
                pos,
                bytes: wrap,
                last_seq: first - 1,
            });
            self.head += self.region_len - pos;
        }
        let pos = self.head % self.region_len;
        self.head += bytes.len() as u64;
        self.ready.push(Group {
            pos,
            bytes,
            last_seq: seq,
        });
    }

    /// Everything appended, as groups to write in this order (one sync after the last).
    pub fn take_groups(&mut self) -> Vec<Group> {
        self.close_pending();
        std::mem::take(&mut self.ready)
    }

    /// Close the records appended so far into a group of their own and say where the next
    /// record will go: a tree commit covering those records starts recovery there.
    pub fn seal(&mut self) -> Mark {
        self.close_pending();
        Mark {
            abs: self.head,
            pos: self.head % self.region_len,
            seq: self.next_seq,
        }
    }

    /// The tree commit sealed at `mark` is durable: the journal before it may be written
    /// over, and groups before it not written yet never need to be.
    pub fn release_to(&mut self, mark: Mark) {
        self.tail = self.tail.max(mark.abs);
        self.ready.retain(|g| g.last_seq >= mark.seq);
    }

    /// Forget pending records (a tree commit captured their effects) and start a new epoch
    /// at the region's start.
    pub fn reset(&mut self, epoch: u64) {
        self.pending.clear();
        self.ready.clear();
        self.epoch = epoch;
        self.head = 0;
        self.tail = 0;
    }
}

/// A group found by the recovery scan. Only the last one can be incomplete or torn.
#[derive(Debug)]
pub struct ScannedGroup {
    pub records: Vec<(u64, Record)>,
    /// Ended with its padding record.
    pub complete: bool,
}

/// Parse the valid run of the journal region from position `start` with sequence
/// `first_seq`, wrapping at the region's end. `read` reads region bytes at a position.
pub fn scan(
    region_len: u64,
    epoch: u64,
    first_seq: u64,
    start: u64,
    read: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
) -> std::io::Result<(Vec<ScannedGroup>, u64)> {
    const WINDOW: u64 = 1 << 20;
    let mut buf: Vec<u8> = Vec::new();
    let mut buf_start = 0u64;
    let mut groups = Vec::new();
    let mut cur = ScannedGroup {
        records: Vec::new(),
        complete: false,
    };
    let mut pos = start % region_len.max(1);
    // Bytes passed so far: one lap at most (a stale lap never matches the sequence anyway).
    let mut passed = 0u64;
    let mut seq = first_seq;
    // Make [pos, pos+n) available in buf; false when it lies past the region.
    let mut ensure =
        |buf: &mut Vec<u8>, buf_start: &mut u64, pos: u64, n: u64| -> std::io::Result<bool> {
            if pos + n > region_len {
                return Ok(false);
            }
            if pos >= *buf_start && pos + n <= *buf_start + buf.len() as u64 {
                return Ok(true);
            }
            let len = (n.max(WINDOW)).min(region_len - pos);
            buf.resize(len as usize, 0);
            read(pos, buf)?;
            *buf_start = pos;
            Ok(true)
        };
    while passed < region_len {
        if pos == region_len {
            pos = 0;
        }
        if !ensure(&mut buf, &mut buf_start, pos, HEADER as u64)? {
            break;
        }
        let h = &buf[(pos - buf_start) as usize..][..HEADER];
        let magic = u32::from_le_bytes(h[0..4].try_into().unwrap());
        let crc = u32::from_le_bytes(h[4..8].try_into().unwrap());
        let rseq = u64::from_le_bytes(h[8..16].try_into().unwrap());
        let kind = u16::from_le_bytes(h[16..18].try_into().unwrap());
        let len = u32::from_le_bytes(h[20..24].try_into().unwrap()) as u64;
        if magic != REC_MAGIC || rseq != seq || len > region_len {
            break;
        }
        if !ensure(&mut buf, &mut buf_start, pos, HEADER as u64 + len)? {
            break;
        }
        let whole = &buf[(pos - buf_start) as usize..][..HEADER + len as usize];
        if crate::format::crc(salt(epoch), &whole[8..]) != crc {
            break;
        }
        if kind == KIND_WRAP {
            // Only between groups; the next record, at the start, has this sequence.
            if !cur.records.is_empty() {
                break;
            }
            passed += region_len - pos;
            pos = 0;
            continue;
        }
        if kind == KIND_PAD {
            cur.complete = true;
            groups.push(std::mem::replace(
                &mut cur,
                ScannedGroup {
                    records: Vec::new(),
                    complete: false,
                },
            ));
        } else {
            match Record::decode_payload(kind, &whole[HEADER..]) {
                Some(r) => cur.records.push((seq, r)),
                None => break,
            }
        }
        pos += HEADER as u64 + len;
        passed += HEADER as u64 + len;
        seq += 1;
    }
    if !cur.records.is_empty() {
        groups.push(cur);
    }
    Ok((groups, seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Record> {
        vec![
            Record::OriginAdd {
                no: 1,
                id: "disk0".into(),
                path: "/tmp/d".into(),
                size: 1 << 20,
            },
            Record::SnapshotCreate {
                time: 5,
                snaps: vec![NewSnap {
                    id: 1,
                    origin: 1,
                    parent: 0,
                    gen: 1,
                    tag: "a".into(),
                    memo: "m".into(),
                    writable: false,
                }],
            },
            Record::Preserve {
                origin: 1,
                chunk: 3,
                lo: 1,
                hi: 1,
                slot: 0,
                bits: 1,
                crc: 77,
            },
            Record::MapWrite {
                snap: 1,
                chunk: 3,
                slot: 1,
                bits: 3,
                data_bits: 2,
                crc: 5,
            },
            Record::Invalidate {
                ids: vec![1, 2],
                reason: "full".into(),
            },
            Record::Reclaim {
                origin: 1,
                first: 0,
                last: u64::MAX,
            },
            Record::SnapshotDelete { id: 1 },
            Record::OriginRemove { no: 1 },
        ]
    }

    fn take(j: &mut JournalWriter) -> Group {
        let mut g = j.take_groups();
        assert_eq!(g.len(), 1, "one group, no wrap");
        g.pop().unwrap()
    }

    fn region_of(groups: &[Group], len: u64) -> Vec<u8> {
        let mut region = vec![0u8; len as usize];
        for g in groups {
            region[g.pos as usize..][..g.bytes.len()].copy_from_slice(&g.bytes);
        }
        region
    }

    fn scan_region(region: &[u8], epoch: u64, first: u64) -> Vec<ScannedGroup> {
        scan(region.len() as u64, epoch, first, 0, &mut |off, b| {
            b.copy_from_slice(&region[off as usize..][..b.len()]);
            Ok(())
        })
        .unwrap()
        .0
    }

    #[test]
    fn roundtrip_groups() {
        let mut j = JournalWriter::new(7, 100, 1 << 20, 0);
        let recs = sample();
        let mut gs = vec![];
        for (i, r) in recs.iter().enumerate() {
            j.append(r);
            if i % 3 == 2 {
                gs.push(take(&mut j));
            }
        }
        gs.push(take(&mut j));
        let region = region_of(&gs, 1 << 20);
        let got = scan_region(&region, 7, 100);
        assert_eq!(got.len(), gs.len());
        let flat: Vec<Record> = got
            .iter()
            .flat_map(|g| g.records.iter().map(|(_, r)| r.clone()))
            .collect();
        assert_eq!(flat, recs);
        assert!(got.iter().all(|g| g.complete));
        // Another epoch's salt: nothing validates.
        assert!(scan_region(&region, 8, 100).is_empty());
        // Whatever bits the epochs differ in, low or high (a stale journal of any earlier
        // epoch must never be replayed).
        for (a, b) in [
            (1u64, 3u64),
            (0, 3),
            (1, 1 | 1 << 32),
            (1, 1 | 2 << 32),
            (5, 5 << 32 | 5),
        ] {
            let mut j = JournalWriter::new(a, 100, 1 << 20, 0);
            j.append(&recs[0]);
            let g = take(&mut j);
            let region = region_of(&[g], 1 << 20);
            assert_eq!(scan_region(&region, a, 100).len(), 1);
            assert!(
                scan_region(&region, b, 100).is_empty(),
                "epoch {a:#x}'s records validate as epoch {b:#x}'s"
            );
        }
        // Wrong starting sequence: nothing validates.
        assert!(scan_region(&region, 7, 99).is_empty());
    }

    #[test]
    fn torn_and_garbage_tails_are_cut() {
        let mut j = JournalWriter::new(1, 1, 1 << 20, 0);
        for r in sample() {
            j.append(&r);
        }
        let g1 = take(&mut j);
        j.append(&Record::Reclaim {
            origin: 9,
            first: 0,
            last: 7,
        });
        j.append(&Record::Reclaim {
            origin: 10,
            first: 8,
            last: u64::MAX,
        });
        let g2 = take(&mut j);
        let mut region = region_of(&[g1, g2], 1 << 20);
        // Tear the second group's second record.
        let second = 4096 + HEADER + 4 + HEADER + 2;
        region[second] ^= 0xff;
        let got = scan_region(&region, 1, 1);
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].records.len(), 1);
        assert!(!got[1].complete);
        // Garbage in place of the second group.
        for b in &mut region[4096..8192] {
            *b = 0x5a;
        }
        let got = scan_region(&region, 1, 1);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].records.len(), sample().len());
    }

    /// Records of many sizes: group boundaries fall anywhere relative to the scan's window.
    fn odd_record(i: usize) -> Record {
        Record::Invalidate {
            ids: (0..(i * 37) % 900).map(|x| x as u64).collect(),
            reason: "r".repeat(i % 300),
        }
    }

    /// A journal longer than the scan's 1 MiB read window: groups and records straddle the
    /// window's edges, and one record is larger than the window. Every record comes back, and
    /// the scan really read the region in several windows.
    #[test]
    fn scan_reads_a_journal_larger_than_its_window() {
        let region_len = 6u64 << 20;
        let mut j = JournalWriter::new(3, 1, region_len, 0);
        let mut want = Vec::new();
        let mut gs = Vec::new();
        let mut i = 0;
        while j.head < (5 << 19) {
            let r = odd_record(i);
            j.append(&r);
            want.push(r);
            if i % 5 == 4 {
                gs.push(take(&mut j));
            }
            i += 1;
        }
        // 1.5 MiB in one record.
        let big = Record::Invalidate {
            ids: (0..196_608).collect(),
            reason: "big".into(),
        };
        j.append(&big);
        want.push(big);
        gs.push(take(&mut j));
        j.append(&odd_record(7));
        want.push(odd_record(7));
        gs.push(take(&mut j));
        assert!(j.head > 4 << 20, "the journal spans several windows");
        // Groups follow each other with no gap.
        for w in gs.windows(2) {
            assert_eq!(w[0].pos + w[0].bytes.len() as u64, w[1].pos);
        }
        // The region ends where the journal does (not on a window boundary): the last read
        // must stop at the region's end.
        let region_len = j.head;
        let region = region_of(&gs, region_len);
        let mut reads = 0;
        let (got, next) = scan(region_len, 3, 1, 0, &mut |off, b| {
            reads += 1;
            b.copy_from_slice(&region[off as usize..][..b.len()]);
            Ok(())
        })
        .unwrap();
        // About one read per MiB: windows, not a read per record.
        assert!((4..=12).contains(&reads), "{reads} reads");
        assert_eq!(got.len(), gs.len());
        assert!(got.iter().all(|g| g.complete));
        let flat: Vec<Record> = got
            .iter()
            .flat_map(|g| g.records.iter().map(|(_, r)| r.clone()))
            .collect();
        assert_eq!(flat.len(), want.len());
        assert!(flat == want, "the records read back differ");
        assert_eq!(next, gs.last().unwrap().last_seq + 1);
    }

    /// The last group ends exactly at the region's end: it is read, whole.
    #[test]
    fn a_group_ending_exactly_at_the_region_end_is_read() {
        let mut j = JournalWriter::new(9, 1, 1 << 30, 0);
        let mut gs = Vec::new();
        for i in 0..40 {
            j.append(&odd_record(i));
            gs.push(take(&mut j));
        }
        let region_len = j.head;
        let region = region_of(&gs, region_len);
        let got = scan_region(&region, 9, 1);
        assert_eq!(got.len(), 40);
        assert!(got.iter().all(|g| g.complete && g.records.len() == 1));
        assert_eq!(got[39].records[0].1, odd_record(39));
        // One block shorter: the last group does not fit and is not read.
        let got = scan_region(&region[..region.len() - 4096], 9, 1);
        assert_eq!(got.len(), 39);
    }

    /// `nearly_full` is exact: a record it lets in always fits with its group's padding, up to
    /// the region's last byte, and it says "full" as soon as one more byte would not fit.
    #[test]
    fn a_record_nearly_full_lets_in_always_fits() {
        let region_len = 64 * META_BLOCK;
        // Records of up to 3 blocks: near the end, some do not fit and must be refused.
        let sized = |i: usize| Record::Invalidate {
            ids: (0..(i * 53) % 1500).map(|x| x as u64).collect(),
            reason: "r".repeat(i % 300),
        };
        for blocks_used in [0u64, 1, 30, 59, 60, 61, 62] {
            for i in 0..200 {
                let r = sized(i);
                let mut j = JournalWriter::new(1, 1, region_len, 0);
                j.head = blocks_used * META_BLOCK;
                if i % 3 == 0 {
                    j.append(&odd_record(i + 1));
                }
                let len = r.encoded_len();
                if j.nearly_full(len) {
                    continue;
                }
                j.append(&r);
                let g = take(&mut j);
                assert!(
                    g.pos + g.bytes.len() as u64 <= region_len,
                    "record {i} of {len} bytes at block {blocks_used} was let in but ends past \
                     the region"
                );
            }
        }
        // The boundary: an empty writer with three blocks left takes two blocks' worth with its
        // padding record, not one byte more (one block stays spare).
        let mut j = JournalWriter::new(1, 1, region_len, 0);
        j.head = region_len - 3 * META_BLOCK;
        assert!(!j.nearly_full(2 * META_BLOCK as usize - HEADER));
        assert!(j.nearly_full(2 * META_BLOCK as usize - HEADER + 1));
    }

    /// An empty group (what settles the group before it) is a complete group of no records
    /// with its own sequence number; `has_pending` says whether anything waits for a group.
    #[test]
    fn an_empty_group_takes_a_sequence_and_scans_as_complete() {
        let mut j = JournalWriter::new(4, 10, 1 << 20, 0);
        assert!(!j.has_pending());
        assert_eq!(j.append(&sample()[0]), 10);
        assert!(j.has_pending());
        let g1 = take(&mut j);
        assert!(!j.has_pending());
        assert_eq!(g1.last_seq, 11, "the record, then its group's padding");
        let seq = j.append_empty_group();
        assert_eq!(seq, 12);
        assert!(j.has_pending());
        let g2 = take(&mut j);
        assert_eq!(j.append(&sample()[1]), g2.last_seq + 1);
        let g3 = take(&mut j);
        let region = region_of(&[g1, g2, g3], 1 << 20);
        let (got, next) = scan(1 << 20, 4, 10, 0, &mut |off, b| {
            b.copy_from_slice(&region[off as usize..][..b.len()]);
            Ok(())
        })
        .unwrap();
        let records: Vec<(u64, Record)> = got.iter().flat_map(|g| g.records.clone()).collect();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].0, 10);
        assert!(records[1].0 > seq, "the record after the empty group");
        assert!(got.iter().all(|g| g.complete));
        assert!(
            got.iter().any(|g| g.records.is_empty()),
            "the empty group is there"
        );
        assert_eq!(next, j.next_seq);
    }

    /// After a checkpoint the journal starts over: a new epoch, from the region's start, with
    /// nothing pending; the old epoch's groups no longer validate.
    #[test]
    fn reset_starts_a_new_epoch_at_the_start() {
        let mut j = JournalWriter::new(1, 1, 1 << 20, 0);
        j.append(&sample()[0]);
        let old = take(&mut j);
        j.append(&sample()[1]);
        j.reset(2);
        assert!(!j.has_pending(), "pending records are dropped");
        assert_eq!(j.head, 0);
        let seq = j.next_seq;
        j.append(&sample()[2]);
        let g = take(&mut j);
        assert_eq!(g.pos, 0);
        let region = region_of(&[g], 1 << 20);
        let got = scan_region(&region, 2, seq);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].records[0].1, sample()[2]);
        let stale = region_of(&[old], 1 << 20);
        assert!(scan_region(&stale, 2, 1).is_empty());
    }

    fn write_groups(region: &mut [u8], gs: &[Group]) {
        for g in gs {
            assert!(
                g.pos as usize + g.bytes.len() <= region.len(),
                "a group straddles the region's end"
            );
            region[g.pos as usize..][..g.bytes.len()].copy_from_slice(&g.bytes);
        }
    }

    fn scan_from(region: &[u8], epoch: u64, mark: Mark) -> Vec<(u64, Record)> {
        let (got, _) = scan(
            region.len() as u64,
            epoch,
            mark.seq,
            mark.pos,
            &mut |off, b| {
                b.copy_from_slice(&region[off as usize..][..b.len()]);
                Ok(())
            },
        )
        .unwrap();
        got.into_iter().flat_map(|g| g.records).collect()
    }

    /// Many laps of a small circular journal, with tree commits sealed, written meanwhile and
    /// made durable later (as the store's commits run beside the writers): a scan from the
    /// durable mark always finds exactly the records written since it, across wraps at every
    /// position, and never an earlier lap's records (same epoch, stale sequence numbers).
    #[test]
    fn the_journal_wraps_and_a_scan_from_the_durable_mark_finds_what_follows() {
        let region_len = 24 * META_BLOCK;
        let mut region = vec![0u8; region_len as usize];
        let mut j = JournalWriter::new(5, 1, region_len, 7 * META_BLOCK);
        let mut durable = j.seal();
        let mut sealed: Option<Mark> = None;
        // Every record written, with its sequence number.
        let mut log: Vec<(u64, Record)> = Vec::new();
        let (mut wraps, mut commits, mut written_upto) = (0, 0, 0);
        for i in 0..3000usize {
            let r = odd_record(i % 97);
            if j.nearly_full(r.encoded_len()) {
                // Full: the commit in flight must finish first (or one runs now).
                let m = sealed.take().unwrap_or_else(|| j.seal());
                let gs = j.take_groups();
                written_upto = gs.last().map_or(written_upto, |g| g.last_seq);
                write_groups(&mut region, &gs);
                j.release_to(m);
                durable = m;
                commits += 1;
                assert!(
                    !j.nearly_full(r.encoded_len()),
                    "a commit frees the journal"
                );
            }
            let seq = j.append(&r);
            log.push((seq, r));
            if i % 3 == 0 {
                let gs = j.take_groups();
                wraps += gs
                    .iter()
                    .filter(|g| g.bytes.len() == META_BLOCK as usize && g.last_seq < seq)
                    .count();
                written_upto = gs.last().map_or(written_upto, |g| g.last_seq);
                write_groups(&mut region, &gs);
            }
            // A commit starts now and then; the previous one becomes durable later.
            if i % 11 == 0 {
                if let Some(m) = sealed.take() {
                    j.release_to(m);
                    durable = m;
                    commits += 1;
                }
                sealed = Some(j.seal());
            }
            if i % 7 == 0 {
                // A crash now: recovery starts at the durable mark and must find every record
                // written since, in order, and nothing else.
                let want: Vec<&(u64, Record)> =
                    log.iter().filter(|(s, _)| *s >= durable.seq).collect();
                let got = scan_from(&region, 5, durable);
                assert!(
                    got.len() <= want.len(),
                    "record {i}: more found than written"
                );
                assert!(
                    got.iter().zip(&want).all(|(a, b)| a == *b),
                    "record {i}: the scan from {durable:?} read the wrong records"
                );
                // Whatever was written is found (only what waits for a group is not).
                let written = want.iter().filter(|(s, _)| *s <= written_upto).count();
                assert!(got.len() >= written, "record {i}: written records lost");
            }
        }
        assert!(
            wraps >= 20 && commits >= 50,
            "{wraps} wraps, {commits} commits"
        );
        // Nothing written after the durable mark: a scan finds nothing, though the region is
        // full of this epoch's records.
        let m = j.seal();
        write_groups(&mut region, &j.take_groups());
        j.release_to(m);
        assert!(scan_from(&region, 5, m).is_empty());
    }

    /// The live part is never written over: however the tail lags, a record `nearly_full`
    /// lets in ends within one lap of the tail, wrap included.
    #[test]
    fn nearly_full_keeps_the_live_part_whole() {
        let region_len = 16 * META_BLOCK;
        for start in [0u64, 3, 9, 15] {
            let mut j = JournalWriter::new(1, 1, region_len, start * META_BLOCK);
            let mut i = 0;
            loop {
                let r = odd_record(i);
                i += 1;
                if j.nearly_full(r.encoded_len()) {
                    break;
                }
                j.append(&r);
                let gs = j.take_groups();
                assert!(j.head - j.tail <= region_len - META_BLOCK);
                assert!(gs
                    .iter()
                    .all(|g| g.pos + g.bytes.len() as u64 <= region_len));
            }
            assert!(i > 3, "start {start}: the journal took {i} records");
            assert!(j.used() > region_len / 3);
        }
    }

    /// The accounting at the region's end, exactly: a group that fits up to the last byte does
    /// not wrap; one that does not costs the rest of the region too; `used` is the live part
    /// plus what waits for a group; `nearly_full` follows from both, one block kept spare.
    #[test]
    fn the_wrap_costs_the_rest_of_the_region() {
        let b = META_BLOCK;
        let region_len = 16 * b;
        let mut j = JournalWriter::new(1, 1, region_len, 0);
        j.head = 14 * b;
        j.tail = 2 * b;
        assert_eq!(j.used(), 12 * b);
        let two = 2 * b as usize - HEADER;
        let three = 3 * b as usize - HEADER;
        assert_eq!(j.next_group_bytes(two), 2 * b, "fits exactly: no wrap");
        assert_eq!(
            j.next_group_bytes(two + 1),
            2 * b + 3 * b,
            "wraps: the rest, then 3"
        );
        assert_eq!(j.next_group_bytes(three), 2 * b + 3 * b);
        assert!(!j.nearly_full(two), "12 + 2 + 1 spare of 16");
        assert!(j.nearly_full(two + 1), "12 + 2 wasted + 3 + 1 spare > 16");
        // A later lap: positions are taken modulo the region.
        j.head += 3 * region_len;
        j.tail += 3 * region_len;
        assert_eq!(j.next_group_bytes(two + 1), 5 * b);
        assert_eq!(j.next_group_bytes(100), b);
        j.append(&sample()[0]);
        let pending = j.pending.len() as u64;
        assert_eq!(j.used(), 12 * b + pending);
        let gs = j.take_groups();
        assert_eq!(gs.len(), 1);
        assert_eq!(gs[0].pos, 14 * b);
        assert_eq!(j.used(), 13 * b);
        // A group that does not fit: wrap record at the end, group at the start.
        for _ in 0..3 {
            j.append(&odd_record(500));
        }
        let gs = j.take_groups();
        assert_eq!(gs.len(), 2, "a wrap record, then the group");
        assert_eq!((gs[0].pos, gs[0].bytes.len() as u64), (15 * b, b));
        assert_eq!(gs[1].pos, 0);
        assert_eq!(j.used(), 14 * b + gs[1].bytes.len() as u64);
    }

    /// A commit made durable drops the groups it covers that were never written, and only
    /// those: groups of records after its seal stay queued for writing.
    #[test]
    fn release_to_drops_only_what_the_commit_covers() {
        let mut j = JournalWriter::new(2, 1, 1 << 20, 0);
        j.append(&sample()[0]);
        let first = j.seal();
        j.append(&sample()[1]);
        let second = j.seal();
        j.append(&sample()[2]);
        j.release_to(first);
        assert_eq!(j.used(), j.head - j.tail + j.pending.len() as u64);
        assert_eq!(j.tail, first.abs);
        let gs = j.take_groups();
        let seqs: Vec<u64> = gs.iter().map(|g| g.last_seq).collect();
        assert_eq!(
            gs.len(),
            2,
            "the group after the first seal, and the pending one"
        );
        assert!(seqs.iter().all(|&s| s >= first.seq) && seqs[0] < second.seq);
        // Written from the first mark, the journal holds every record after it.
        let mut region = vec![0u8; 1 << 20];
        write_groups(&mut region, &gs);
        let got = scan_from(&region, 2, first);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].1, sample()[1]);
        assert_eq!(got[1].1, sample()[2]);
        // A mark never moves the tail back.
        j.release_to(second);
        j.release_to(first);
        assert_eq!(j.tail, second.abs);
    }

    /// A reclaim record of an earlier build names only the origin: it covers every block. A
    /// batch names its block range. Both round-trip; a truncated range is refused.
    #[test]
    fn reclaim_records_old_and_ranged() {
        let mut w = crate::codec::Writer::with_capacity(4);
        w.u32(7);
        assert_eq!(
            Record::decode_payload(8, &w.into_inner()),
            Some(Record::Reclaim {
                origin: 7,
                first: 0,
                last: u64::MAX
            })
        );
        let r = Record::Reclaim {
            origin: 3,
            first: 4096,
            last: 9000,
        };
        let mut w = crate::codec::Writer::with_capacity(20);
        r.encode_payload(&mut w);
        let bytes = w.into_inner();
        assert_eq!(Record::decode_payload(8, &bytes), Some(r));
        assert_eq!(Record::decode_payload(8, &bytes[..12]), None);
    }
}
