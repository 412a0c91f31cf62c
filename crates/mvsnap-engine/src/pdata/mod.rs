//! Persistent data structures of metadata v2 (docs/V2-DESIGN.md): 4 KiB nodes in store blocks,
//! changed copy-on-write (shadowed) within a transaction, reached from one root that a
//! superblock flips, read through a bounded cache. thin-provisioning-tools' `pdata` is the
//! model (btrees over fixed-size keys and values, shadowing, a checker that rebuilds what is
//! in use).
//!
//! Not wired into the store yet: v1 still serves. The tree is built and proven here first.

pub mod btree;
pub mod cache;
pub mod meta;
pub mod node;
pub mod preserved;
pub mod snapdata;
pub mod spacemap;
pub mod written;

use std::io;

/// A 4 KiB block of the store, by number.
pub type BlockNo = u64;

/// The size of every metadata node.
pub const NODE_SIZE: usize = 4096;

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
}

pub type PResult<T> = std::result::Result<T, PdataError>;
