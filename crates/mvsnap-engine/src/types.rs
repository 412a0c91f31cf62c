//! Plain data the engine hands to front ends and the CLI: nothing here knows the on-disk format.

use serde::{Deserialize, Serialize};

/// Options for [`crate::Store::format`].
#[derive(Debug, Clone)]
pub struct FormatOptions {
    /// Size of a file-backed store: a new file is made this big, an existing smaller one grows
    /// to it, a bigger one is refused (never shrunk). `None`: an existing file keeps its size,
    /// a new one gets [`FormatOptions::DEFAULT_SIZE`]. Ignored for block devices.
    pub size: Option<u64>,
    /// A file-backed store grows on demand up to this size (0: never grows past `size`).
    pub max_size: u64,
    /// Overwrite an existing mvsnap store, or a file or device that holds data.
    pub force: bool,
    /// Free-space fraction (percent) under which a low-space event is raised.
    pub low_space_percent: u8,
}

impl FormatOptions {
    /// The size of a new file-backed store when none is given.
    pub const DEFAULT_SIZE: u64 = 1 << 30;
}

impl Default for FormatOptions {
    fn default() -> Self {
        FormatOptions {
            size: None,
            max_size: 0,
            force: false,
            low_space_percent: 10,
        }
    }
}

/// Options for [`crate::Store::open`].
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// blksnap's model for backups: nothing is synced and every snapshot made in this session is
    /// gone when the store closes. Refused while the store holds persistent snapshots.
    pub ephemeral: bool,
    /// Open without taking the write lock and without replaying into the store (check, info).
    pub read_only: bool,
    /// Bytes of RAM for metadata nodes (`--cache-size`; None: 64 MiB).
    pub cache_bytes: Option<u64>,
    /// On a block-device store, give freed blocks back to the device (BLKDISCARD: a thin LUN
    /// or an SSD gets them back). Off by default: some devices discard slowly, and what a
    /// discarded block reads is up to the device. A file store always punches them out.
    pub discard: bool,
    /// Preserved entries held in RAM before they are folded into the index (None: an eighth
    /// of the cache's budget, at most one per 16 blocks of the store). Tests set it small.
    pub overlay_entries: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OriginInfo {
    pub id: String,
    pub path: String,
    pub size: u64,
    /// Number of live (not deleted) snapshots of this origin.
    pub snapshots: usize,
    /// Whether the open could use its device: a missing or resized one leaves the origin and
    /// its snapshots unreadable, and an administrator must see that in a listing, not only
    /// when a client finds its export gone.
    #[serde(default)]
    pub state: OriginState,
    /// Why it is unavailable (the open's error), for `state: unavailable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OriginState {
    /// Its device opened with the size it was bound with.
    #[default]
    Online,
    /// Its device is missing, cannot be opened, or changed size behind the store's back.
    Unavailable,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotState {
    Valid,
    /// The store ran out of space and this snapshot lost data; reads fail.
    Invalid,
    /// Deleted, kept only because snapshots taken from it still exist.
    Hidden,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub origin: String,
    pub tag: String,
    /// `ORIGIN@TAG`, the export name.
    pub name: String,
    /// `ORIGIN` or `ORIGIN@TAG` of the volume it was taken from.
    pub parent: String,
    pub memo: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub writable: bool,
    pub state: SnapshotState,
    /// Why the snapshot is invalid, if it is.
    pub reason: Option<String>,
    /// Its origin's: an unavailable origin's snapshots cannot be read (nor served) until the
    /// origin is back, though nothing of theirs is lost.
    #[serde(default)]
    pub origin_state: OriginState,
    /// Bytes of COW space only this snapshot uses.
    pub exclusive_bytes: u64,
    /// Bytes of COW space this snapshot shares with others.
    pub shared_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Event {
    /// Seconds since the Unix epoch.
    pub time: u64,
    pub kind: EventKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    LowSpace,
    Grown,
    SnapshotInvalidated,
    Corruption,
    /// A write or sync of the store failed: nothing more is written until a reopen.
    Poisoned,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoreInfo {
    pub path: String,
    pub uuid: String,
    pub chunk_size: u32,
    /// Granularity of copy-out inside a chunk.
    pub block_size: u32,
    pub journal_bytes: u64,
    /// Bytes of the data area now (a file-backed store may grow to `max_bytes`).
    pub data_bytes: u64,
    pub max_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    pub metadata_bytes: u64,
    pub mappings: u64,
    /// The metadata node cache: its budget and what it holds now.
    #[serde(default)]
    pub cache_bytes: u64,
    #[serde(default)]
    pub cache_used_bytes: u64,
    /// Since open: lookups of a node the cache held, and nodes read from the store. Misses
    /// that keep growing in steady service say the index's working set outgrew the cache
    /// (`--cache-size`); each is a read of the store on some request's path.
    #[serde(default)]
    pub cache_hits: u64,
    #[serde(default)]
    pub cache_misses: u64,
    /// Of the misses, nodes read ahead of a request's lookups, without the state lock; the
    /// others were read under it, each a wait for every writer.
    #[serde(default)]
    pub cache_prefetched: u64,
    /// Tree nodes changed since the last commit: held in RAM, within the cache's budget, until
    /// the next commit (or, for an ephemeral store, until they are written out uncommitted).
    #[serde(default)]
    pub dirty_bytes: u64,
    /// Tree nodes of the commit being written: held in RAM (within the cache's budget) until
    /// it is durable.
    #[serde(default)]
    pub committing_bytes: u64,
    /// Preserved entries held in RAM, sorted, before they are folded into the index (within
    /// the cache's budget; durable with each commit): how many, and their RAM.
    #[serde(default)]
    pub overlay_entries: u64,
    #[serde(default)]
    pub overlay_bytes: u64,
    /// Origin writes answered and held in RAM until their copy-outs are durable (at most
    /// 16 MiB). With the cache and the two above, what the daemon's memory holds for the store.
    #[serde(default)]
    pub queued_write_bytes: u64,
    pub ephemeral: bool,
    pub low_space: bool,
    pub origins: Vec<OriginInfo>,
    pub snapshots: Vec<SnapshotInfo>,
    pub events: Vec<Event>,
}

/// One extent of a volume's block status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// The range reads as zeros and holds no data of its own (a hole).
    pub zero: bool,
}

/// The result of `check`: every invariant of DESIGN.md verified.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub slots_total: u64,
    pub slots_used: u64,
    pub slots_free: u64,
    pub mappings: u64,
    pub snapshots: usize,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

/// What `check --repair` found and changed, and the check that followed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RepairReport {
    /// Tree nodes the salvage walk reached (read or not).
    pub nodes_read: u64,
    /// Entries kept from the readable nodes.
    pub entries_kept: u64,
    /// Key ranges under damaged nodes, dropped (one line each).
    pub lost: Vec<String>,
    /// Whether the tree was written anew from the readable entries.
    pub tree_rebuilt: bool,
    /// Blocks marked used that nothing used, given back.
    pub blocks_leaked: u64,
    /// Blocks in use that the space map marked free, marked used.
    pub blocks_lost: u64,
    /// Space map bitmaps that could not be read, written anew.
    pub bitmaps_rewritten: u64,
    /// Whether counters kept beside the tree disagreed with it (set from the tree).
    pub counters_fixed: bool,
    /// Snapshots invalidated because data they needed was under a damaged node.
    pub invalidated: Vec<String>,
    /// `check` after the repair.
    pub check: CheckReport,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }
}
