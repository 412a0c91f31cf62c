//! Key space `W`: which origin blocks were written in each epoch, as 128-bit bitmaps in the
//! tree (one entry per 128 blocks, 512 KiB of origin, that saw a write).
//!
//! Epoch `g` runs from snapshot `g`'s creation to the next snapshot's. `W(g)` holds the
//! blocks written in it. That one set serves three things:
//! - the origin's hot path: a write to a block already in `W(newest)` needs no copy-out (it
//!   was copied, or needed none, at its first write of the epoch) — one bit in a cached leaf;
//! - changed-block tracking: the blocks that differ between snapshots `g1 < g2` are the union
//!   of `W(g1..g2)`, and between `g1` and the origin now the union of `W(g1..)`: the cost is
//!   what changed, never the origin's size;
//! - rollback to snapshot `g`: the blocks to rewrite are that same union from `g` on.
//!
//! When snapshot `g` goes, epochs `g - 1` and `g` become one: `W(g)` is merged into the
//! previous live epoch's set ([`merge_into`]), so every union above stays right.
//!
//! ```text
//! key   0 'W'  1 origin u24 (BE)  4 epoch u32 (BE)  8 region u64 (BE; block / 128)
//! value bits u128 (LE): bit i is block region * 128 + i
//! ```

use super::btree::{self, BlockAlloc, Txn, View};
use super::node::{Key, Value};
use super::PResult;

pub const SPACE: u8 = b'W';
/// Blocks per entry.
pub const REGION: u64 = 128;

fn key(origin: u32, epoch: u32, region: u64) -> Key {
    let mut k = [0u8; 16];
    k[0] = SPACE;
    k[1..4].copy_from_slice(&origin.to_be_bytes()[1..]);
    k[4..8].copy_from_slice(&epoch.to_be_bytes());
    k[8..16].copy_from_slice(&region.to_be_bytes());
    k
}

fn split_key(k: &Key) -> Option<(u32, u32, u64)> {
    (k[0] == SPACE).then(|| {
        (
            u32::from_be_bytes([0, k[1], k[2], k[3]]),
            u32::from_be_bytes(k[4..8].try_into().unwrap()),
            u64::from_be_bytes(k[8..16].try_into().unwrap()),
        )
    })
}

fn bits(v: &Value) -> u128 {
    u128::from_le_bytes(*v)
}

/// A run of blocks `first..first + len` (whole bitmaps split into runs).
pub type Run = (u64, u64);

/// The first and the past-the-end key of `origin`'s entries.
pub fn origin_keys(origin: u32) -> (Key, Key) {
    (key(origin, 0, 0), key(origin + 1, 0, 0))
}

/// Whether `block` was written in `epoch`.
pub fn is_marked(v: &dyn View, origin: u32, epoch: u32, block: u64) -> PResult<bool> {
    let got = btree::get(v, &key(origin, epoch, block / REGION))?;
    Ok(got.is_some_and(|val| bits(&val) & (1 << (block % REGION)) != 0))
}

/// The newest epoch before `before` in which `block` was written, looking at no more than
/// `max_epochs` epochs (newest first): `Some(0)` if none of epochs `1..before` wrote it,
/// `None` if the ones looked at did not and older ones were left.
pub fn last_marked_before(
    v: &dyn View,
    origin: u32,
    block: u64,
    before: u32,
    max_epochs: u32,
) -> PResult<Option<u32>> {
    let oldest = before.saturating_sub(max_epochs).max(1);
    match first_marked(v, origin, block, (oldest..before).rev())? {
        Some(epoch) => Ok(Some(epoch)),
        None => Ok((oldest == 1).then_some(0)),
    }
}

/// Whether `block` was written in some epoch of `epochs`.
pub fn marked_in(
    v: &dyn View,
    origin: u32,
    block: u64,
    epochs: std::ops::RangeInclusive<u32>,
) -> PResult<bool> {
    Ok(first_marked(v, origin, block, epochs)?.is_some())
}

/// The first of `epochs`, in their order, that wrote `block`.
fn first_marked(
    v: &dyn View,
    origin: u32,
    block: u64,
    epochs: impl Iterator<Item = u32>,
) -> PResult<Option<u32>> {
    for epoch in epochs {
        if is_marked(v, origin, epoch, block)? {
            return Ok(Some(epoch));
        }
    }
    Ok(None)
}

/// The bitmap of region `region` (blocks `region * 128 ..`) in `epoch`: one lookup for up to
/// 128 blocks of the hot path.
pub fn region_bits(v: &dyn View, origin: u32, epoch: u32, region: u64) -> PResult<u128> {
    Ok(btree::get(v, &key(origin, epoch, region))?.map_or(0, |val| bits(&val)))
}

/// Mark `first..first + len` written in `epoch`. Returns how many were not marked before.
pub fn mark<A: BlockAlloc>(
    t: &mut Txn<A>,
    origin: u32,
    epoch: u32,
    first: u64,
    len: u64,
) -> PResult<u64> {
    let mut added = 0;
    let end = first + len;
    let mut b = first;
    while b < end {
        let region = b / REGION;
        let hi = end.min((region + 1) * REGION);
        let lo_bit = b % REGION;
        let n = hi - b;
        let mask = if n == REGION {
            u128::MAX
        } else {
            ((1u128 << n) - 1) << lo_bit
        };
        let k = key(origin, epoch, region);
        let old = btree::get(&*t, &k)?.map_or(0, |v| bits(&v));
        if old & mask != mask {
            added += (mask & !old).count_ones() as u64;
            t.insert(k, (old | mask).to_le_bytes())?;
        }
        b = hi;
    }
    Ok(added)
}

/// Every epoch's set of an origin for `epochs`, as the union in block order, in runs.
pub fn changed(
    v: &dyn View,
    origin: u32,
    epochs: std::ops::RangeInclusive<u32>,
) -> PResult<Vec<Run>> {
    let mut union: std::collections::BTreeMap<u64, u128> = Default::default();
    for e in epochs {
        btree::for_each_from(v, &key(origin, e, 0), &mut |k, val| match split_key(k) {
            Some((o, ep, region)) if o == origin && ep == e => {
                *union.entry(region).or_default() |= bits(val);
                true
            }
            _ => false,
        })?;
    }
    let mut runs: Vec<Run> = Vec::new();
    for (region, mut w) in union {
        while w != 0 {
            let start = w.trailing_zeros() as u64;
            let len = (w >> start).trailing_ones() as u64;
            let first = region * REGION + start;
            match runs.last_mut() {
                Some((f, l)) if *f + *l == first => *l += len,
                _ => runs.push((first, len)),
            }
            w = if start + len >= 128 {
                0
            } else {
                w & !(((1u128 << len) - 1) << start)
            };
        }
    }
    Ok(runs)
}

/// Epoch `from` ends (its snapshot is gone): its set joins epoch `into` (the previous live
/// one), or is dropped when there is none (`into == None`: nothing older needs it).
///
/// Not used yet. Before it is, mind what first writes rely on (`State::preserved_through`):
/// every preserved entry of a block with upper generation `hi` has the block's bit in some
/// epoch at or after `hi`. Moving bits to an older epoch, or dropping them, while such
/// entries remain breaks that: merge only once reclaim has dropped or shrunk them.
pub fn merge_into<A: BlockAlloc>(
    t: &mut Txn<A>,
    origin: u32,
    from: u32,
    into: Option<u32>,
) -> PResult<()> {
    let mut entries = Vec::new();
    btree::for_each_from(
        &*t,
        &key(origin, from, 0),
        &mut |k, val| match split_key(k) {
            Some((o, e, region)) if o == origin && e == from => {
                entries.push((region, bits(val)));
                true
            }
            _ => false,
        },
    )?;
    for (region, w) in entries {
        t.remove(&key(origin, from, region))?;
        if let Some(into) = into {
            let k = key(origin, into, region);
            let old = btree::get(&*t, &k)?.map_or(0, |v| bits(&v));
            t.insert(k, (old | w).to_le_bytes())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::pdata::meta::SimDevice;

    /// Changed blocks between any two snapshots, and from any snapshot to now, equal what a
    /// model of the origin's writes says, across snapshot deletes (epochs merging) and a
    /// reopen; the hot-path bit answers like the model.
    #[test]
    fn changed_blocks_between_versions_match_the_model() {
        for seed in 0..5 {
            let mut rng = StdRng::seed_from_u64(seed);
            let dev = SimDevice::new(2048);
            let mut meta = dev.format(1 << 16);
            let blocks = 50_000u64;
            // The model: every write with the epoch it happened in.
            let mut writes: Vec<(u32, u64, u64)> = Vec::new();
            // Per block, the epoch of its newest write (0: none).
            let mut newest_write = vec![0u32; blocks as usize];
            let mut live: BTreeSet<u32> = BTreeSet::new();
            let mut epoch = 0u32;
            for round in 0..8 {
                meta.update(|t| {
                    for _ in 0..200 {
                        match rng.random_range(0..12) {
                            0 => {
                                epoch += 1;
                                live.insert(epoch);
                            }
                            1 if live.len() > 1 => {
                                let g = *live.iter().nth(rng.random_range(0..live.len())).unwrap();
                                live.remove(&g);
                                let prev = live.range(..g).next_back().copied();
                                merge_into(t, 3, g, prev)?;
                            }
                            _ if !live.is_empty() => {
                                // Writes belong to the newest live snapshot's epoch.
                                let cur = *live.last().unwrap();
                                let first = rng.random_range(0..blocks);
                                let len = rng.random_range(1..400).min(blocks - first);
                                let fresh = (first..first + len)
                                    .filter(|&b| newest_write[b as usize] < cur)
                                    .count() as u64;
                                assert_eq!(mark(t, 3, cur, first, len)?, fresh);
                                for b in first..first + len {
                                    newest_write[b as usize] = cur;
                                }
                                writes.push((cur, first, len));
                            }
                            _ => {}
                        }
                    }
                    Ok(())
                })
                .unwrap();
                if round == 5 {
                    drop(meta);
                    meta = dev.open(1 << 16);
                }
                // Between each pair of live snapshots, and from each to now.
                let lv: Vec<u32> = live.iter().copied().collect();
                for (i, &g1) in lv.iter().enumerate() {
                    let ends: Vec<Option<u32>> =
                        lv[i + 1..].iter().map(|&g| Some(g)).chain([None]).collect();
                    for g2 in ends {
                        let last = g2.map_or(u32::MAX, |g| g - 1);
                        let mut want = vec![false; blocks as usize];
                        for &(e, f, l) in &writes {
                            if e >= g1 && e <= last {
                                want[f as usize..(f + l) as usize].fill(true);
                            }
                        }
                        let got = meta
                            .with_view(|v| changed(v, 3, g1..=last.min(epoch)))
                            .unwrap();
                        let got_blocks: Vec<u64> =
                            got.iter().flat_map(|&(f, l)| f..f + l).collect();
                        let want_blocks: Vec<u64> =
                            (0..blocks).filter(|&b| want[b as usize]).collect();
                        assert!(
                            got_blocks == want_blocks,
                            "seed {seed} round {round}: changed {g1}..{g2:?}: {} blocks, model {}",
                            got_blocks.len(),
                            want_blocks.len()
                        );
                        // Runs are maximal: no two touch.
                        assert!(got.windows(2).all(|w| w[0].0 + w[0].1 < w[1].0));
                    }
                }
                if let Some(&newest) = live.last() {
                    for b in (0..blocks).step_by(97) {
                        let want = newest_write[b as usize] >= newest;
                        let got = meta.with_view(|v| is_marked(v, 3, newest, b)).unwrap();
                        assert_eq!(got, want, "hot-path bit of block {b}");
                    }
                }
            }
        }
    }
}
