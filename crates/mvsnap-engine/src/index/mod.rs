//! The in-memory versioned chunk index, rebuilt at open from the checkpoint plus the journal.
//!
//! Two structures, both keyed by chunk number:
//! - [`VolumeMap`]: per snapshot, the chunks whose data lives in its own slots. A snapshot of a
//!   snapshot shares the whole map (copy-on-write radix nodes), so it is instant at any size.
//! - [`PreserveIndex`]: per origin, the copied-out old data, one entry per
//!   `(chunk, generation range)`: one copy serves every snapshot of that range.
//!
//! A snapshot at generation `g` reads a block from its own map, else from the origin's entry
//! covering `g`, else from the origin itself: at most two lookups, whatever the depth.

mod map;
mod preserve;

pub use map::{MapEntry, VolumeMap};
pub use preserve::{PEntry, PreserveIndex, ZERO_SLOT};
