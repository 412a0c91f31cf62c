//! Metadata at scale (issue 8, "Measure"): how RAM, open time, commits and the longest origin
//! write behave as the index grows. Method and results: docs/BENCHMARKS.md.
//!
//! ```text
//! cargo run --release -p mvsnap-engine --example index_scale -- --dir DIR [--mappings 1M,2M,4M]
//!     [--writes N] [--cache-size 64M]
//! ```
//!
//! For each size N (mappings = 4 KiB blocks preserved):
//! 1. an origin of N x 4 KiB full of data, a store, a snapshot; the whole origin overwritten
//!    through the engine with 1 MiB writes (every block copied out once: N mappings);
//! 2. a second snapshot, then `--writes` random 4 KiB first writes (each a copy-out into a big
//!    tree), timed one by one: p50, p99.99 and max latency;
//! 3. a forced tree commit after them, timed;
//! 4. the store closed, then opened again in a child process (as root, after `sync` and
//!    dropping the page cache): open time, and the child's RSS after the open and after 10,000
//!    random 4 KiB snapshot reads.
//!
//! RSS is the process's VmRSS from /proc (the page cache is not in it). Files are removed at the
//! end of each size.

mod common;

use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::{parse_count, MIB};
use mvsnap_engine::{OpenOptions, Store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

type R<T> = Result<T, Box<dyn Error>>;

const BLOCK: u64 = 4096;

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn open_opts(cache: Option<u64>) -> OpenOptions {
    OpenOptions {
        cache_bytes: cache,
        ..Default::default()
    }
}

/// Child mode: open, report open time and RSS, read at random from the snapshot.
fn child(store: &Path, cache: Option<u64>) -> R<()> {
    let rss0 = rss_kib();
    let t = Instant::now();
    let s = Store::open(store, &open_opts(cache))?;
    let open_ms = t.elapsed().as_secs_f64() * 1e3;
    let rss_open = rss_kib();
    let v = s.volume("o0@a")?;
    let blocks = v.size() / BLOCK;
    let mut rng = StdRng::seed_from_u64(7);
    let mut buf = vec![0u8; BLOCK as usize];
    let t = Instant::now();
    for _ in 0..10_000 {
        v.read_at(rng.random_range(0..blocks) * BLOCK, &mut buf)?;
    }
    let read_us = t.elapsed().as_secs_f64() * 1e6 / 10_000.0;
    let rss_read = rss_kib();
    println!(
        "child open_ms={open_ms:.1} rss_before_kib={rss0} rss_open_kib={rss_open} \
         rss_after_reads_kib={rss_read} read_us={read_us:.1}"
    );
    drop(v);
    s.close()?;
    Ok(())
}

fn one_size(dir: &Path, n: u64, writes: usize, cache: Option<u64>) -> R<()> {
    let origin = dir.join("origin.img");
    let store = dir.join("store.img");
    let size = n * BLOCK;
    let store_size = size + size / 8 + 256 * MIB;
    common::write_full_origin(&origin, size)?;
    let s = common::store_with_origin(&store, store_size, &origin, &open_opts(cache))?;
    s.create_snapshot(&["o0"], Some("a"), "", false)?;
    let o = s.volume("o0")?;
    let rss0 = rss_kib();
    let t = Instant::now();
    let data = vec![0x5au8; MIB as usize];
    for off in (0..size).step_by(MIB as usize) {
        o.write_at(off, &data, false)?;
    }
    o.flush()?;
    let build_s = t.elapsed().as_secs_f64();
    let info = s.info();
    let rss_build = rss_kib();
    // Sustained first writes into the big index: each one a copy-out.
    s.create_snapshot(&["o0"], Some("b"), "", false)?;
    let mut rng = StdRng::seed_from_u64(1);
    let blk = vec![0xa5u8; BLOCK as usize];
    let mut lat: Vec<f64> = Vec::with_capacity(writes);
    let t_all = Instant::now();
    for _ in 0..writes {
        let off = rng.random_range(0..n) * BLOCK;
        let t = Instant::now();
        o.write_at(off, &blk, false)?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    o.flush()?;
    let writes_s = t_all.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let rss_writes = rss_kib();
    let t = Instant::now();
    s.checkpoint()?;
    let commit_ms = t.elapsed().as_secs_f64() * 1e3;
    let info2 = s.info();
    drop(o);
    s.close()?;
    println!(
        "n={n} mappings={} build_s={build_s:.1} rss_before_build_kib={rss0} \
         rss_after_build_kib={rss_build} rss_after_writes_kib={rss_writes} \
         writes={writes} writes_per_s={:.0} lat_p50_ms={:.3} lat_p9999_ms={:.3} lat_max_ms={:.3} \
         commit_after_ms={commit_ms:.1} used_mib={} mappings_after={}",
        info.mappings,
        writes as f64 / writes_s,
        pct(0.5),
        pct(0.9999),
        lat[lat.len() - 1],
        info2.used_bytes / MIB,
        info2.mappings,
    );
    // Open in a fresh process: its RSS is the open's alone. As root, with the page cache
    // emptied first: the open reads the index from the disk (and does not pay for dropping
    // gigabytes of the build's cached pages, which open does for the store and the origin).
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("--child").arg(&store);
    if let Some(c) = cache {
        cmd.arg("--cache-size").arg(c.to_string());
    }
    let out = cmd.output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        return Err(format!("child: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    delete_under_load(&store, n, cache)?;
    std::fs::remove_file(&origin)?;
    std::fs::remove_file(&store)?;
    Ok(())
}

/// Delete the snapshot holding the N mappings while a writer times its 4 KiB origin writes
/// (blocks already preserved for the newer snapshot: no copy-outs, only the lock): how long
/// the delete takes, how long until its space is reclaimed in the background, and how long
/// a writer waits meanwhile.
fn delete_under_load(store: &Path, n: u64, cache: Option<u64>) -> R<()> {
    let s = Store::open(store, &open_opts(cache))?;
    let d = common::delete_under_load(&s, "o0@a", n, "o0", n)?;
    s.close()?;
    println!(
        "delete n={n} delete_ms={:.1} reclaimed_after_ms={:.0} {}",
        d.delete_ms,
        d.reclaimed_after_ms,
        d.writer_summary()
    );
    Ok(())
}

fn main() -> R<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut dir = PathBuf::from("target");
    let mut sizes = vec![1 << 20];
    let mut writes = 20_000;
    let mut cache = None;
    let mut child_store = None;
    let mut i = 0;
    while i < args.len() {
        let val = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--dir" => dir = PathBuf::from(val),
            "--mappings" => sizes = val.split(',').map(parse_count).collect(),
            "--writes" => writes = val.parse()?,
            "--cache-size" => cache = Some(parse_count(&val)),
            "--child" => child_store = Some(PathBuf::from(val)),
            other => return Err(format!("unknown argument {other}").into()),
        }
        i += 2;
    }
    if let Some(store) = child_store {
        return child(&store, cache);
    }
    let work = tempfile::Builder::new()
        .prefix("mvsnap-index-scale")
        .tempdir_in(&dir)?;
    for n in sizes {
        one_size(work.path(), n, writes, cache)?;
    }
    Ok(())
}
