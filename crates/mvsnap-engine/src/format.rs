//! On-disk constants, geometry and the superblock (docs/FORMAT.md draws them).
//!
//! Every integer is little-endian; every metadata block carries a CRC32C salted with its kind so
//! a block of the wrong kind is never mistaken for another.

use crate::codec::{Reader, Writer};

/// 2: metadata in a copy-on-write B+tree, space in 4 KiB blocks (docs/FORMAT.md).
pub const FORMAT_VERSION: u32 = 2;
pub const SB_MAGIC: &[u8; 8] = b"MVSNAPSB";
/// Metadata block size: superblocks, journal alignment.
pub const META_BLOCK: u64 = 4096;
/// Two superblock copies, written alternately, so a torn superblock write loses nothing.
pub const SB_OFFSETS: [u64; 2] = [0, META_BLOCK];
pub const JOURNAL_OFFSET: u64 = 2 * META_BLOCK;
pub const MIN_CHUNK: u32 = 4096;
pub const MAX_CHUNK: u32 = 1 << 20;
/// Copy-out granularity is at least 4 KiB and at most 64 blocks per chunk (one u64 bitmap).
pub const MIN_SUB_BLOCK: u32 = 4096;
pub const MAX_SUBS_PER_CHUNK: u32 = 64;
/// Slot number meaning "none" on disk.
pub const NO_SLOT: u32 = u32::MAX;

/// Salts for CRC32C, one per block kind.
pub const SALT_SUPERBLOCK: u32 = 0x5342_0001;
pub const SALT_CHECKPOINT: u32 = 0x434b_0002;

/// Metadata header user word 7 when the session that wrote the header closed cleanly: every
/// origin write it made was synced without error, so the origins' page cache shows what their
/// devices hold and the next open may keep it (copy-outs then read the cache, not the disk).
/// Any other value: drop the origins' caches at open (a failed sync may have left pages there
/// that the device never got). The first origin write of an open writes a header without it.
pub const ORIGINS_CLEAN: u64 = u64::from_le_bytes(*b"CLEANORG");

pub fn crc(salt: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(salt, data)
}

/// The fixed shape of a store, decided at format time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub chunk_size: u32,
    pub sub_size: u32,
    pub journal_len: u64,
    pub data_start: u64,
}

impl Geometry {
    pub fn new(chunk_size: u32, journal_len: u64) -> Result<Geometry, String> {
        if !chunk_size.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) {
            return Err(format!(
                "chunk size {chunk_size} must be a power of two from 4 KiB to 1 MiB"
            ));
        }
        let sub_size = (chunk_size / MAX_SUBS_PER_CHUNK).max(MIN_SUB_BLOCK);
        let data_start =
            (JOURNAL_OFFSET + journal_len).div_ceil(chunk_size as u64) * chunk_size as u64;
        Ok(Geometry {
            chunk_size,
            sub_size,
            journal_len,
            data_start,
        })
    }

    /// Journal size for a store of `size` bytes: big enough to batch, small enough to replay fast.
    pub fn default_journal_len(size: u64) -> u64 {
        let want = (size / 32).clamp(1 << 20, 64 << 20);
        want / META_BLOCK * META_BLOCK
    }

    pub fn subs_per_chunk(&self) -> u32 {
        self.chunk_size / self.sub_size
    }

    pub fn full_bits(&self) -> u64 {
        let n = self.subs_per_chunk();
        if n == 64 {
            u64::MAX
        } else {
            (1u64 << n) - 1
        }
    }

    pub fn slot_offset(&self, slot: u32) -> u64 {
        self.data_start + slot as u64 * self.chunk_size as u64
    }

    /// How many whole slots fit in a store of `len` bytes.
    pub fn slots_for_len(&self, len: u64) -> u64 {
        len.saturating_sub(self.data_start) / self.chunk_size as u64
    }

    pub fn chunks_for(&self, size: u64) -> u64 {
        size.div_ceil(self.chunk_size as u64)
    }
}

/// Where the newest checkpoint lives and where its journal begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CheckpointRef {
    pub first_slot: u32,
    pub len: u64,
    pub crc: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub version: u32,
    pub uuid: [u8; 16],
    pub geo: Geometry,
    /// 0: the store never grows past its current size.
    pub max_size: u64,
    pub low_space_percent: u8,
    /// Bumped on every superblock write; the valid copy with the highest wins.
    pub sb_seq: u64,
    /// Journal records are salted with this; bumped by every checkpoint, so records of an older
    /// epoch left in the journal area can never be replayed.
    pub epoch: u64,
    /// First journal sequence number of this epoch.
    pub journal_seq: u64,
    pub checkpoint: Option<CheckpointRef>,
    /// Bytes the store had when this superblock was written: a shorter file was truncated.
    pub store_len: u64,
}

impl Superblock {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.bytes(SB_MAGIC);
        w.u32(self.version);
        w.u32(0); // flags, reserved
        w.bytes(&self.uuid);
        w.u32(self.geo.chunk_size);
        w.u32(self.geo.sub_size);
        w.u64(self.geo.journal_len);
        w.u64(self.geo.data_start);
        w.u64(self.max_size);
        w.u8(self.low_space_percent);
        w.u64(self.sb_seq);
        w.u64(self.epoch);
        w.u64(self.journal_seq);
        let ck = self.checkpoint.unwrap_or(CheckpointRef {
            first_slot: NO_SLOT,
            len: 0,
            crc: 0,
        });
        w.u32(ck.first_slot);
        w.u64(ck.len);
        w.u32(ck.crc);
        w.u64(self.store_len);
        let mut buf = w.into_inner();
        buf.resize(META_BLOCK as usize - 4, 0);
        let c = crc(SALT_SUPERBLOCK, &buf);
        buf.extend_from_slice(&c.to_le_bytes());
        buf
    }

    /// Decode one superblock copy. `Ok(None)`: no magic (not a store, or never written).
    pub fn decode(buf: &[u8]) -> Result<Option<Superblock>, String> {
        if buf.len() < META_BLOCK as usize || &buf[..8] != SB_MAGIC {
            return Ok(None);
        }
        let body = &buf[..META_BLOCK as usize - 4];
        let stored = u32::from_le_bytes(
            buf[META_BLOCK as usize - 4..META_BLOCK as usize]
                .try_into()
                .unwrap(),
        );
        if crc(SALT_SUPERBLOCK, body) != stored {
            return Err("superblock checksum mismatch".into());
        }
        let mut r = Reader::new(&body[8..]);
        let parse = |r: &mut Reader| -> Option<Superblock> {
            let version = r.u32()?;
            let _flags = r.u32()?;
            let uuid: [u8; 16] = r.bytes(16)?.try_into().ok()?;
            let chunk_size = r.u32()?;
            let sub_size = r.u32()?;
            let journal_len = r.u64()?;
            let data_start = r.u64()?;
            let max_size = r.u64()?;
            let low_space_percent = r.u8()?;
            let sb_seq = r.u64()?;
            let epoch = r.u64()?;
            let journal_seq = r.u64()?;
            let first_slot = r.u32()?;
            let len = r.u64()?;
            let ck_crc = r.u32()?;
            let store_len = r.u64()?;
            Some(Superblock {
                version,
                uuid,
                geo: Geometry {
                    chunk_size,
                    sub_size,
                    journal_len,
                    data_start,
                },
                max_size,
                low_space_percent,
                sb_seq,
                epoch,
                journal_seq,
                checkpoint: (first_slot != NO_SLOT).then_some(CheckpointRef {
                    first_slot,
                    len,
                    crc: ck_crc,
                }),
                store_len,
            })
        };
        let sb = parse(&mut r).ok_or("superblock truncated")?;
        if sb.version == FORMAT_VERSION {
            let expect = Geometry::new(sb.geo.chunk_size, sb.geo.journal_len)?;
            if expect != sb.geo {
                return Err("superblock geometry is inconsistent".into());
            }
        }
        Ok(Some(sb))
    }
}

pub fn uuid_string(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_roundtrip_and_corruption() {
        let sb = Superblock {
            version: FORMAT_VERSION,
            uuid: [7; 16],
            geo: Geometry::new(65536, 1 << 20).unwrap(),
            max_size: 1 << 30,
            low_space_percent: 10,
            sb_seq: 3,
            epoch: 9,
            journal_seq: 100,
            checkpoint: Some(CheckpointRef {
                first_slot: 5,
                len: 1234,
                crc: 99,
            }),
            store_len: 1 << 30,
        };
        let mut buf = sb.encode();
        assert_eq!(buf.len(), META_BLOCK as usize);
        assert_eq!(Superblock::decode(&buf).unwrap(), Some(sb));
        buf[100] ^= 1;
        assert!(Superblock::decode(&buf).is_err());
        assert_eq!(Superblock::decode(&[0u8; 4096]).unwrap(), None);
    }

    #[test]
    fn geometry_limits() {
        assert!(Geometry::new(3072, 1 << 20).is_err());
        assert!(Geometry::new(2 << 20, 1 << 20).is_err());
        let g = Geometry::new(1 << 20, 1 << 20).unwrap();
        assert_eq!(g.sub_size, 16384);
        assert_eq!(g.subs_per_chunk(), 64);
        let g = Geometry::new(65536, 1 << 20).unwrap();
        assert_eq!(g.sub_size, 4096);
        assert_eq!(g.full_bits(), 0xffff);
        assert_eq!(g.data_start % 65536, 0);
    }
}
