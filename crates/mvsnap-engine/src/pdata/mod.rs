//! Persistent data structures of metadata v2 (docs/V2-DESIGN.md): 4 KiB nodes in store blocks,
//! changed copy-on-write (shadowed) within a transaction, reached from one root that a
//! superblock flips, read through a bounded cache. thin-provisioning-tools' `pdata` is the
//! model (btrees over fixed-size keys and values, shadowing, a checker that rebuilds what is
//! in use).

pub mod btree;
pub mod cache;
pub mod meta;
pub mod node;
pub mod overlay;
pub mod preserved;
pub mod snapdata;
pub mod spacemap;
pub mod written;

use std::io;

/// A 4 KiB block of the store, by number.
pub type BlockNo = u64;

/// The size of every metadata node.
pub const NODE_SIZE: usize = 4096;

/// The block of the `n`th key from block `from` on, in `origin`'s part of a key space laid out
/// `space u8, origin u24 (BE), block u64 (BE), ...` (`P` and `S`); `None`: fewer remain. One
/// batch of background reclaim covers `from..=` that block, so it costs about `n` keys of each
/// space it walks, whatever the origin's size.
pub fn nth_block(
    v: &dyn btree::View,
    space: u8,
    origin: u32,
    from: u64,
    n: usize,
) -> PResult<Option<u64>> {
    let mut start = [0u8; 16];
    start[0] = space;
    start[1..4].copy_from_slice(&origin.to_be_bytes()[1..]);
    start[4..12].copy_from_slice(&from.to_be_bytes());
    let mut seen = 0;
    let mut out = None;
    btree::for_each_from(v, &start, &mut |k, _| {
        if k[..4] != start[..4] {
            return false;
        }
        seen += 1;
        if seen >= n {
            out = Some(u64::from_be_bytes(k[4..12].try_into().unwrap()));
            return false;
        }
        true
    })?;
    Ok(out)
}

/// Where nodes live: whole 4 KiB blocks, read and written by number.
pub trait NodeIo: Send + Sync {
    fn read_block(&self, block: BlockNo, buf: &mut [u8]) -> io::Result<()>;
    fn write_block(&self, block: BlockNo, buf: &[u8]) -> io::Result<()>;
}

#[derive(Debug, thiserror::Error)]
pub enum PdataError {
    #[error("metadata block {block}: {source}")]
    Io {
        block: BlockNo,
        #[source]
        source: io::Error,
    },
    #[error("metadata block {block} is damaged: {what}")]
    Corrupt { block: BlockNo, what: String },
    #[error("no free block for metadata")]
    NoSpace,
    /// Only from a [`btree::ProbeView`], whose caller fetches the block and tries again.
    #[error("metadata block {0} is not in the cache")]
    NotCached(BlockNo),
}

pub type PResult<T> = std::result::Result<T, PdataError>;
