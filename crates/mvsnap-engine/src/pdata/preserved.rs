//! Key space `P`: preserved copies of origin blocks, one entry per (block, generation range).
//!
//! An entry says "for the snapshots of generations `lo..=hi` of this origin, 4 KiB block
//! `block` is in store block `loc`" (or reads as zeroes: [`ZERO`]). One copy serves every
//! snapshot of its range. For one block the ranges never overlap, and the key ends with `hi`,
//! so a snapshot of generation `g` finds its copy with one seek: the first key at or after
//! `(origin, block, g)`; it is the copy if it is for this block and `lo <= g`, else the block
//! still lives in the origin. Snapshots of snapshots have their parent's generation: depth
//! costs nothing.
//!
//! ```text
//! key   0 'P'  1 origin u24 (big-endian)  4 block u64 (BE)  12 hi u32 (BE)
//! value 0 lo u32 (LE)  4 reserved u32  8 loc u64 (LE; u64::MAX: zeroes, no space)
//! ```

use super::btree::{self, BlockAlloc, Txn, View};
use super::node::{Key, Value};
use super::{PResult, PdataError};

pub const SPACE: u8 = b'P';
/// The location of an entry whose blocks read as zeroes (a hole, or zero data): no space.
pub const ZERO: u64 = u64::MAX;
/// Origins are numbered below this (24 bits in the key).
pub const MAX_ORIGINS: u32 = 1 << 24;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preserved {
    pub lo: u32,
    pub hi: u32,
    pub loc: u64,
}

fn key(origin: u32, block: u64, hi: u32) -> Key {
    debug_assert!(origin < MAX_ORIGINS);
    let mut k = [0u8; 16];
    k[0] = SPACE;
    k[1..4].copy_from_slice(&origin.to_be_bytes()[1..]);
    k[4..12].copy_from_slice(&block.to_be_bytes());
    k[12..16].copy_from_slice(&hi.to_be_bytes());
    k
}

fn split_key(k: &Key) -> Option<(u32, u64, u32)> {
    if k[0] != SPACE {
        return None;
    }
    let origin = u32::from_be_bytes([0, k[1], k[2], k[3]]);
    let block = u64::from_be_bytes(k[4..12].try_into().unwrap());
    let hi = u32::from_be_bytes(k[12..16].try_into().unwrap());
    Some((origin, block, hi))
}

fn value(lo: u32, loc: u64) -> Value {
    let mut v = [0u8; 16];
    v[0..4].copy_from_slice(&lo.to_le_bytes());
    v[8..16].copy_from_slice(&loc.to_le_bytes());
    v
}

fn split_value(v: &Value) -> (u32, u64) {
    (
        u32::from_le_bytes(v[0..4].try_into().unwrap()),
        u64::from_le_bytes(v[8..16].try_into().unwrap()),
    )
}

/// The store block an entry of this key space points at (`None`: another key space, or
/// zeroes): a repair rebuilds the space map from these.
pub fn data_block(k: &Key, v: &Value) -> Option<u64> {
    split_key(k)?;
    Some(split_value(v).1).filter(|&loc| loc != ZERO)
}

/// The origin of a key of this space (`None`: another key space).
pub fn key_origin(k: &Key) -> Option<u32> {
    split_key(k).map(|(origin, _, _)| origin)
}

/// The first and the past-the-end key of `origin`'s entries.
pub fn origin_keys(origin: u32) -> (Key, Key) {
    (key(origin, 0, 0), key(origin + 1, 0, 0))
}

/// The copy a snapshot of generation `gen` reads for `block`: `None` if it reads the origin.
pub fn lookup(v: &dyn View, origin: u32, block: u64, gen: u32) -> PResult<Option<u64>> {
    let Some((k, val)) = btree::seek_ge(v, &key(origin, block, gen))? else {
        return Ok(None);
    };
    match split_key(&k) {
        Some((o, b, _)) if o == origin && b == block => {
            let (lo, loc) = split_value(&val);
            Ok((lo <= gen).then_some(loc))
        }
        _ => Ok(None),
    }
}

/// Every entry of one block, oldest generations first.
pub fn entries(v: &dyn View, origin: u32, block: u64) -> PResult<Vec<Preserved>> {
    let mut out = Vec::new();
    btree::for_each_from(
        v,
        &key(origin, block, 0),
        &mut |k, val| match split_key(k) {
            Some((o, b, hi)) if o == origin && b == block => {
                let (lo, loc) = split_value(val);
                out.push(Preserved { lo, hi, loc });
                true
            }
            _ => false,
        },
    )?;
    Ok(out)
}

/// The newest generation through which `block` is preserved (0: never): a write to it after
/// a snapshot of a newer generation needs a copy for `preserved_through + 1 ..= newest`.
pub fn preserved_through(v: &dyn View, origin: u32, block: u64) -> PResult<u32> {
    Ok(entries(v, origin, block)?.last().map_or(0, |e| e.hi))
}

/// Every entry of `origin`: (block, entry), in key order (for `check` and removal).
pub fn for_each(v: &dyn View, origin: u32, f: &mut dyn FnMut(u64, Preserved)) -> PResult<()> {
    btree::for_each_from(v, &key(origin, 0, 0), &mut |k, val| match split_key(k) {
        Some((o, b, hi)) if o == origin => {
            let (lo, loc) = split_value(val);
            f(b, Preserved { lo, hi, loc });
            true
        }
        _ => false,
    })
}

/// Record a copy of `block` for generations `lo..=hi`. Its range must not overlap another
/// entry of the block: the caller's `lo` comes after what is preserved already
/// (`State::preserved_through`). Not looked up here: that read of the block's leaf was most
/// of what a first write read from the store on a big index; `check` finds overlaps.
pub fn add<A: BlockAlloc>(
    t: &mut Txn<A>,
    origin: u32,
    block: u64,
    lo: u32,
    hi: u32,
    loc: u64,
) -> PResult<()> {
    if lo > hi || origin >= MAX_ORIGINS {
        return Err(PdataError::Corrupt {
            block: 0,
            what: format!("preserve of origin {origin} block {block} for generations {lo}..={hi}"),
        });
    }
    // A new key, scattered among the others by random writes: buffered, so that a leaf is
    // written once per fold's sweep rather than once per entry (see `overlay.rs`).
    t.insert_buffered(key(origin, block, hi), value(lo, loc))
}

/// Walk the entries of `origin` for blocks `first..=last`; `keep` gets an entry's range and
/// location and returns the range it still serves (`None`: no live snapshot needs it). Entries are shrunk or dropped; returns the
/// store blocks of dropped entries (to free once the commit is durable) and the count kept.
pub fn retain<A: BlockAlloc>(
    t: &mut Txn<A>,
    origin: u32,
    first: u64,
    last: u64,
    keep: &mut dyn FnMut(u32, u32, u64) -> Option<(u32, u32)>,
) -> PResult<(Vec<u64>, u64)> {
    let mut changes = Vec::new();
    let mut kept = 0;
    btree::for_each_from(
        &*t,
        &key(origin, first, 0),
        &mut |k, val| match split_key(k) {
            Some((o, b, hi)) if o == origin && b <= last => {
                let (lo, loc) = split_value(val);
                let now = keep(lo, hi, loc);
                if now != Some((lo, hi)) {
                    changes.push((b, lo, hi, loc, now));
                }
                kept += now.is_some() as u64;
                true
            }
            _ => false,
        },
    )?;
    let mut freed = Vec::new();
    for (b, _lo, hi, loc, now) in changes {
        t.remove(&key(origin, b, hi))?;
        match now {
            Some((nlo, nhi)) => {
                t.insert(key(origin, b, nhi), value(nlo, loc))?;
            }
            None if loc != ZERO => freed.push(loc),
            None => {}
        }
    }
    Ok((freed, kept))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::pdata::meta::SimDevice;
    use crate::pdata::NODE_SIZE;

    /// The engine's use of it, against a model: an origin of 2,000 blocks, snapshots taken
    /// (the generation grows), writes that preserve what the live snapshots need, deletes of
    /// snapshots that shrink or drop entries; every snapshot reads each block from the
    /// generation-range entry the model says, or from the origin. Committed in batches and
    /// reopened with a cold 8-node cache.
    #[test]
    fn generation_ranges_serve_every_snapshot_like_the_model() {
        for seed in 0..6 {
            let mut rng = StdRng::seed_from_u64(seed);
            let dev = SimDevice::new(4096);
            let cache = 8 * NODE_SIZE as u64;
            let mut meta = dev.format(cache);
            let blocks = 2000u64;
            // Model: per block, its entries; the live generations; the next store location.
            let mut model: BTreeMap<u64, Vec<Preserved>> = BTreeMap::new();
            let mut live: Vec<u32> = Vec::new();
            let mut gen = 0u32;
            let mut loc = 1000u64;
            let mut freed_total = Vec::new();
            for round in 0..12 {
                meta.update(|t| {
                    for _ in 0..300 {
                        match rng.random_range(0..10) {
                            0 => {
                                gen += 1;
                                live.push(gen);
                            }
                            1 if !live.is_empty() => {
                                let g = live.remove(rng.random_range(0..live.len()));
                                let _ = g;
                                // Shrink every entry to the live generations it covers.
                                let lv = live.clone();
                                let mut keep = |lo: u32, hi: u32, _loc: u64| {
                                    let inside: Vec<u32> = lv
                                        .iter()
                                        .copied()
                                        .filter(|&g| lo <= g && g <= hi)
                                        .collect();
                                    Some((*inside.first()?, *inside.last()?))
                                };
                                let (freed, _) = retain(t, 7, 0, blocks, &mut keep)?;
                                freed_total.extend(freed);
                                for es in model.values_mut() {
                                    es.retain_mut(|e| match keep(e.lo, e.hi, e.loc) {
                                        Some((lo, hi)) => {
                                            e.lo = lo;
                                            e.hi = hi;
                                            true
                                        }
                                        None => false,
                                    });
                                }
                            }
                            _ => {
                                // A write to a block: preserve it for the live generations
                                // after its last copy, if any.
                                let b = rng.random_range(0..blocks);
                                let es = model.entry(b).or_default();
                                let pt = es.last().map_or(0, |e| e.hi);
                                assert_eq!(preserved_through(&*t, 7, b)?, pt);
                                let need: Vec<u32> =
                                    live.iter().copied().filter(|&g| g > pt).collect();
                                if let (Some(&lo), Some(&hi)) = (need.first(), need.last()) {
                                    let l = if rng.random_bool(0.2) { ZERO } else { loc };
                                    loc += 1;
                                    add(t, 7, b, lo, hi, l)?;
                                    es.push(Preserved { lo, hi, loc: l });
                                }
                            }
                        }
                    }
                    Ok(())
                })
                .unwrap();
                if round % 4 == 3 {
                    drop(meta);
                    meta = dev.open(cache);
                }
                // Every live snapshot reads every block as the model says.
                let view = &meta;
                for &g in &live {
                    for b in (0..blocks).step_by(7) {
                        let want = model
                            .get(&b)
                            .and_then(|es| es.iter().find(|e| e.lo <= g && g <= e.hi))
                            .map(|e| e.loc);
                        let got = view.with_view(|v| lookup(v, 7, b, g)).unwrap();
                        assert_eq!(got, want, "seed {seed} round {round}: gen {g} block {b}");
                    }
                }
            }
            // Nothing another origin's key could be confused with.
            assert_eq!(meta.with_view(|v| lookup(v, 8, 0, 1)).unwrap(), None);
            assert!(freed_total.iter().all(|&l| l != ZERO));
        }
    }

    #[test]
    fn inverted_ranges_are_refused() {
        let mut meta = SimDevice::new(64).format(1 << 20);
        let r = meta.update(|t| add(t, 1, 5, 4, 3, 100));
        assert!(r.unwrap_err().to_string().contains("4..=3"));
    }
}
