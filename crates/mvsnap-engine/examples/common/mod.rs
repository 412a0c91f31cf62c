//! What the scale examples share: an origin full of data, a new store with an origin bound,
//! and their size arguments.
// Each example uses a part of it.
#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::Path;

use mvsnap_engine::{FormatOptions, OpenOptions, Store};

pub const MIB: u64 = 1 << 20;

/// A file of `size` bytes full of data: every 8 bytes hold their own offset + 1, so every
/// block differs and none is zero (nothing can be recorded as a hole or shared by content).
pub fn write_full_origin(path: &Path, size: u64) -> std::io::Result<()> {
    let f = std::fs::File::create(path)?;
    let mut buf = vec![0u8; MIB as usize];
    for off in (0..size).step_by(MIB as usize) {
        for (i, w) in buf.chunks_mut(8).enumerate() {
            w.copy_from_slice(&(off + i as u64 * 8 + 1).to_le_bytes());
        }
        f.write_all_at(&buf, off)?;
    }
    f.sync_all()
}

/// A new store `store` of `store_size` bytes, opened with `opts`, with the file `origin` bound
/// as `o0`.
pub fn store_with_origin(
    store: &Path,
    store_size: u64,
    origin: &Path,
    opts: &OpenOptions,
) -> Result<Store, Box<dyn std::error::Error>> {
    Store::format(
        store,
        &FormatOptions {
            size: Some(store_size),
            ..Default::default()
        },
    )?;
    let s = Store::open(store, opts)?;
    s.add_origin(origin, Some("o0"))?;
    Ok(s)
}

/// A count or a size: digits with an optional K, M or G (binary multiples).
pub fn parse_count(s: &str) -> u64 {
    let (num, mul) = match s.chars().last() {
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('K') => (&s[..s.len() - 1], 1 << 10),
        _ => (s, 1),
    };
    num.parse::<u64>().expect("a count") * mul
}

/// What a delete under load cost: its own time, the time until its space was reclaimed, and
/// the latencies (ms, sorted) of the writes a writer made meanwhile.
pub struct DeleteUnderLoad {
    pub delete_ms: f64,
    pub reclaimed_after_ms: f64,
    pub writer_ms: Vec<f64>,
}

impl DeleteUnderLoad {
    /// `writer_writes=.. writer_p9999_ms=.. writer_max_ms=..`
    pub fn writer_summary(&self) -> String {
        let lat = &self.writer_ms;
        let max = lat.last().copied().unwrap_or(0.0);
        let p9999 = lat
            .get(((lat.len() as f64 * 0.9999) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0);
        format!(
            "writer_writes={} writer_p9999_ms={p9999:.1} writer_max_ms={max:.1}",
            lat.len()
        )
    }
}

/// Delete `victim`, which holds `victim_mappings` mappings, while a thread times 4 KiB writes
/// at random into the first `blocks` blocks of `volume`, until the background reclaim has
/// dropped them (seen in `info`, as a daemon's user would: nobody forces it). The forced
/// commit that `wait_reclaimed` then makes is not timed.
pub fn delete_under_load(
    s: &mvsnap_engine::Store,
    victim: &str,
    victim_mappings: u64,
    volume: &str,
    blocks: u64,
) -> mvsnap_engine::Result<DeleteUnderLoad> {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Instant;
    const BLOCK: u64 = 4096;
    let stop = AtomicBool::new(false);
    let writes = AtomicU64::new(0);
    std::thread::scope(|sc| {
        let writer = sc.spawn(|| -> Vec<f64> {
            let v = s.volume(volume).expect("the writer's volume");
            let blk = vec![0x3cu8; BLOCK as usize];
            let mut rng = StdRng::seed_from_u64(3);
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let off = rng.random_range(0..blocks) * BLOCK;
                let t = Instant::now();
                v.write_at(off, &blk, false).expect("write");
                lat.push(t.elapsed().as_secs_f64() * 1e3);
                writes.fetch_add(1, Ordering::Relaxed);
            }
            lat
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        let before = s.info().mappings + writes.load(Ordering::Relaxed);
        let t = Instant::now();
        let deleted = s.delete_snapshot(victim);
        let delete_ms = t.elapsed().as_secs_f64() * 1e3;
        // The writer goes on until the background reclaim is over (a write adds at most one
        // mapping).
        let deadline = t + std::time::Duration::from_secs(600);
        while deleted.is_ok()
            && s.info().mappings + victim_mappings > before + writes.load(Ordering::Relaxed)
            && Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let reclaimed_after_ms = t.elapsed().as_secs_f64() * 1e3;
        stop.store(true, Ordering::Relaxed);
        let mut writer_ms = writer.join().expect("writer");
        deleted?;
        s.wait_reclaimed()?;
        writer_ms.sort_by(f64::total_cmp);
        Ok(DeleteUnderLoad {
            delete_ms,
            reclaimed_after_ms,
            writer_ms,
        })
    })
}
