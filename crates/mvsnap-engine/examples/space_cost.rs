//! Space at 4 KiB and metadata that grows with what changed (issue 8, "Measure", Space and
//! `snapshot list`). Results: docs/BENCHMARKS.md. No timing matters except the list's, so this
//! runs on a busy machine too.
//!
//! ```text
//! cargo run --release -p mvsnap-engine --example space_cost -- --dir DIR [--origin-size 4G]
//! ```
//!
//! 1. An origin of `--origin-size` full of data (every 4 KiB differs, none is zero), a store
//!    (preallocated, as `format` makes it), a snapshot; then one 4 KiB write into each 64 KiB
//!    of the origin. The store's used space and metadata (`info`) before and after, against
//!    the 4 KiB per write that was copied.
//! 2. A snapshot `s` holding 4,096 preserved blocks (16 MiB of the origin overwritten after
//!    it), then 500 snapshots of `s`: what metadata and used space grow by.
//! 3. 1,000 snapshots, then the whole origin overwritten with 1 MiB writes (every block
//!    preserved once, shared by the 1,000): the mappings, and `Store::snapshots()` (what
//!    `snapshot list` and NBD LIST call) timed 5 times.
//!
//! Files are removed at the end.

mod common;

use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::Instant;

use common::{parse_count, MIB};
use mvsnap_engine::OpenOptions;

type R<T> = Result<T, Box<dyn Error>>;

const KIB: u64 = 1 << 10;
const BLOCK: u64 = 4 * KIB;

fn mib(b: u64) -> String {
    format!("{:.2} MiB", b as f64 / MIB as f64)
}

fn main() -> R<()> {
    let mut dir: Option<PathBuf> = None;
    let mut origin_size = 4u64 << 30;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dir" => dir = args.next().map(PathBuf::from),
            "--origin-size" => origin_size = parse_count(&args.next().expect("a size")),
            _ => return Err(format!("unknown argument {a}").into()),
        }
    }
    let dir = dir.ok_or("--dir DIR is required")?;
    let work = dir.join("space_cost");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let r = run(&work, origin_size);
    let _ = std::fs::remove_dir_all(&work);
    r
}

fn run(work: &Path, size: u64) -> R<()> {
    let origin = work.join("origin.img");
    let store = work.join("store.img");
    // Room for part 3 (the whole origin preserved once) and parts 1-2.
    let store_size = size + size / 4 + 512 * MIB;
    common::write_full_origin(&origin, size)?;
    let s = common::store_with_origin(&store, store_size, &origin, &OpenOptions::default())?;
    let o = s.volume("o0")?;
    println!(
        "machine: {} cores; origin {} full of data; store {} file",
        std::thread::available_parallelism()?,
        mib(size),
        mib(store_size)
    );

    // 1. One 4 KiB first write into every 64 KiB of the origin.
    s.create_snapshot(&["o0"], Some("a"), "", false)?;
    s.sync()?;
    let i0 = s.info();
    let writes = size / (64 * KIB);
    let blk = vec![0xa5u8; BLOCK as usize];
    for i in 0..writes {
        o.write_at(i * 64 * KIB + 8 * KIB, &blk, false)?;
    }
    o.flush()?;
    s.checkpoint()?;
    s.sync()?;
    let i1 = s.info();
    let copied = writes * BLOCK;
    let used = i1.used_bytes - i0.used_bytes;
    println!(
        "part 1: {writes} first 4 KiB writes, one per 64 KiB (copied: {})",
        mib(copied)
    );
    println!(
        "  used_bytes +{} ({:.3}x of the copied data), of which metadata +{}; mappings +{}",
        mib(used),
        used as f64 / copied as f64,
        mib(i1.metadata_bytes - i0.metadata_bytes),
        i1.mappings - i0.mappings
    );

    // 2. 500 snapshots of a snapshot holding 4,096 preserved blocks.
    s.create_snapshot(&["o0"], Some("s"), "", false)?;
    let data = vec![0x3cu8; MIB as usize];
    for off in (0..16 * MIB).step_by(MIB as usize) {
        o.write_at(off, &data, false)?;
    }
    o.flush()?;
    s.checkpoint()?;
    s.sync()?;
    let i2 = s.info();
    for i in 0..500 {
        s.create_snapshot(&["o0@s"], Some(&format!("c{i}")), "", false)?;
    }
    s.checkpoint()?;
    s.sync()?;
    let i3 = s.info();
    println!("part 2: 500 snapshots of o0@s, which holds 4,096 preserved blocks");
    println!(
        "  metadata +{} ({} bytes per snapshot), used_bytes +{}, mappings +{}",
        mib(i3.metadata_bytes - i2.metadata_bytes),
        (i3.metadata_bytes - i2.metadata_bytes) / 500,
        mib(i3.used_bytes - i2.used_bytes),
        i3.mappings - i2.mappings,
    );
    for i in 0..500 {
        s.delete_snapshot(&format!("o0@c{i}"))?;
    }
    for name in ["o0@a", "o0@s"] {
        s.delete_snapshot(name)?;
    }
    s.wait_reclaimed()?;

    // 3. `snapshot list` with 1,000 snapshots over a whole preserved origin.
    for i in 0..1000 {
        s.create_snapshot(&["o0"], Some(&format!("t{i}")), "", false)?;
    }
    let data = vec![0x77u8; MIB as usize];
    for off in (0..size).step_by(MIB as usize) {
        o.write_at(off, &data, false)?;
    }
    o.flush()?;
    s.checkpoint()?;
    let mappings = s.info().mappings;
    let mut times = Vec::new();
    let mut listed = 0;
    for _ in 0..5 {
        let t = Instant::now();
        listed = s.snapshots().len();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    println!("part 3: {listed} snapshots, {mappings} mappings");
    println!(
        "  Store::snapshots(): median {:.2} ms (min {:.2}, max {:.2}) of 5",
        times[2], times[0], times[4]
    );
    drop(o);
    s.close()?;
    Ok(())
}
