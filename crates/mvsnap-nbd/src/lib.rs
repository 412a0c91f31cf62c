//! An async NBD (Network Block Device) server, written against the protocol spec
//! (NetworkBlockDevice/nbd `doc/proto.md`).
//!
//! The crate knows nothing about what it serves: a volume is anything implementing
//! [`Export`], and an [`ExportRegistry`] maps names to them. [`NbdServer`] speaks the fixed
//! newstyle handshake (EXPORT_NAME, GO, INFO, LIST, ABORT, STRUCTURED_REPLY, LIST/SET
//! META_CONTEXT with `base:allocation`) and the transmission phase (READ, WRITE+FUA, FLUSH,
//! TRIM, WRITE_ZEROES, CACHE, DISC, BLOCK_STATUS) with many requests in flight per connection
//! and replies out of order; simple replies for clients that do not negotiate structured
//! replies (the Linux kernel), structured ones for those that do. Over TCP, TLS can be
//! required ([`NbdServer::serve_tcp_tls`], `NBD_OPT_STARTTLS` with rustls), with client
//! certificates checked against a CA as access control.
//!
//! Export calls are blocking and run on tokio's blocking pool, so the engine behind them can
//! use plain `pread`/`pwrite`/`fdatasync`.

mod error;
mod handshake;
pub mod memory;
pub mod proto;
mod server;
mod tls;
mod transmission;

use std::sync::Arc;

pub use error::{nbd_errno, OpenError};
pub use proto::{STATE_HOLE, STATE_ZERO};
pub use server::{bind_unix, NbdServer};
pub use tls::{TlsConfig, TlsError, TlsFiles};
pub use transmission::normalize_extents;

/// A run of bytes with one allocation status, as reported by [`Export::block_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// `base:allocation` flags: [`STATE_HOLE`] (1) and/or [`STATE_ZERO`] (2); 0 = data.
    pub flags: u32,
}

/// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

impl Default for BlockSizes {
    /// The spec's defaults, with the maximum at 32 MiB: the largest request every client
    /// handles and the most one request may make us buffer.
    fn default() -> Self {
        BlockSizes {
            minimum: 1,
            preferred: 4096,
            maximum: proto::MAX_PAYLOAD,
        }
    }
}

/// One volume served over NBD. All calls are blocking; the server runs them on tokio's
/// blocking pool, several at once, so implementations must be safe to call concurrently.
/// Offsets and lengths are already checked against [`Export::size`] when these are called.
pub trait Export: Send + Sync + 'static {
    /// Size in bytes; fixed for the life of a connection.
    fn size(&self) -> u64;
    /// Advertised with `NBD_FLAG_READ_ONLY`; writes, trims and write-zeroes then get EPERM
    /// without reaching the export.
    fn read_only(&self) -> bool;
    /// Block size constraints; the default is 1 / 4096 / 32 MiB.
    fn block_sizes(&self) -> BlockSizes {
        BlockSizes::default()
    }
    /// True only if a flush on one connection covers writes made on all connections
    /// (`NBD_FLAG_CAN_MULTI_CONN`); clients then spread I/O over several connections.
    fn can_multi_conn(&self) -> bool;
    /// Fill `buf` with the bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// Write `data` at `offset`; with `fua`, return only once it is durable.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<()>;
    /// Make every write that has completed durable.
    fn flush(&self) -> std::io::Result<()>;
    /// The client no longer needs this range; its contents become unspecified.
    fn trim(&self, offset: u64, length: u64) -> std::io::Result<()>;
    /// Make the range read as zeroes; `may_trim` allows deallocating it (false when the
    /// client sent `NBD_CMD_FLAG_NO_HOLE`); with `fua`, return only once durable.
    fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        may_trim: bool,
        fua: bool,
    ) -> std::io::Result<()>;
    /// Whether `write_zeroes` with `may_trim` is fast (no data written: a punched hole, a
    /// recorded zero range): NBD's FAST_ZERO is done then, and refused with ENOTSUP otherwise.
    fn fast_zero(&self) -> bool {
        false
    }
    /// Allocation status of the range starting at `offset`, in order and contiguous. May
    /// cover fewer bytes than asked (the client asks again), but never return no extents.
    fn block_status(&self, offset: u64, length: u64) -> std::io::Result<Vec<Extent>>;
}

/// What `NBD_OPT_LIST` shows for one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
}

/// The set of exports a server offers. Calls may block; the server runs them on tokio's
/// blocking pool.
pub trait ExportRegistry: Send + Sync + 'static {
    /// Exports shown to `NBD_OPT_LIST`.
    fn list(&self) -> Vec<ExportInfo>;
    /// Open an export by name for one connection (or to answer `NBD_OPT_INFO`).
    fn open(&self, name: &str) -> Result<Arc<dyn Export>, OpenError>;
}
