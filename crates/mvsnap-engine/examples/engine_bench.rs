//! The engine benchmark of issue 2 ("Measure"). Method and recorded results: docs/BENCHMARKS.md.
//!
//! ```text
//! cargo run --release -p mvsnap-engine --example engine_bench -- [--quick] [--dir DIR]
//! ```
//!
//! One run, on files it creates in a fresh temporary directory (by default under the workspace's
//! `target/`, i.e. on the repository's filesystem; `--dir DIR` puts it under DIR) and deletes at
//! the end. Every measurement runs 3 times; the table gives the median and the range. Progress
//! goes to stderr, the Markdown table to stdout.
//!
//! 1. Origin writes through the engine (no snapshot; a snapshot whose chunks are all preserved)
//!    as a ratio to plain `pwrite` on the same file: 1 MiB sequential and 4 KiB random writes,
//!    each pass ending with one fdatasync that is timed on both sides.
//! 2. First writes after a snapshot: 4 KiB random writes, each into a different 64 KiB chunk,
//!    1 and 16 threads, against the same writes without a snapshot; bytes copied per write.
//! 3. Snapshot vs origin sequential read after a full overwrite of the origin; random 4 KiB
//!    reads of writable snapshots at depth 1, 10 and 100 of a chain.
//! 4. Index RAM per mapping and open (recovery) time of a store with 2^20 mappings, built in a
//!    child process that exits without `close` (a crash-like stop).
//!
//! The store of parts 1-3 is written over with zeros right after `format` (see `prewrite_store`)
//! so it behaves like a store in use; one row of part 2 measures a freshly formatted one.
//!
//! Page cache: when run as root, `sync; echo 3 > /proc/sys/vm/drop_caches` before every read pass
//! and every timed open; the output says whether that happened.

use std::collections::HashMap;
use std::error::Error;
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Barrier;
use std::time::Instant;

use mvsnap_engine::{FormatOptions, OpenOptions, Store, Volume};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

type R<T> = Result<T, Box<dyn Error>>;

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const BLOCK: u64 = 4 * KIB;
const CHUNK: u64 = 64 * KIB;
const REPS: usize = 3;
const DEPTHS: [usize; 3] = [1, 10, 100];

/// Sizes of one run (`--quick` shrinks them for a CI smoke run).
struct Cfg {
    quick: bool,
    /// Origin of parts 1-3 (1 MiB sequential passes cover all of it).
    origin_size: u64,
    /// 4 KiB random writes per pass in part 1.
    rand_writes: usize,
    /// First writes (each into a distinct chunk) per pass in part 2.
    first_writes: usize,
    threads: usize,
    /// Origin of the depth chain (part 3).
    deep_size: u64,
    /// 4 KiB writes each writable snapshot of the chain makes of its own.
    depth_writes: usize,
    /// 4 KiB random reads per pass in part 3.
    depth_reads: usize,
    /// 4 KiB chunks (= mappings) of the index store in part 4.
    map_chunks: u64,
}

impl Cfg {
    fn new(quick: bool) -> Cfg {
        if quick {
            Cfg {
                quick,
                origin_size: 64 * MIB,
                rand_writes: 2048,
                first_writes: 256,
                threads: 16,
                deep_size: 32 * MIB,
                depth_writes: 8,
                depth_reads: 512,
                map_chunks: 1 << 16,
            }
        } else {
            Cfg {
                quick,
                origin_size: GIB,
                rand_writes: 32768,
                first_writes: 2048,
                threads: 16,
                deep_size: 256 * MIB,
                depth_writes: 16,
                depth_reads: 4096,
                map_chunks: 1 << 20,
            }
        }
    }

    fn store1_size(&self) -> u64 {
        2 * self.origin_size + self.deep_size + 512 * MIB
    }

    fn store4k_size(&self) -> u64 {
        self.map_chunks * BLOCK + 256 * MIB
    }

    /// Disk the run needs at its peak (parts 1-3 and part 4 do not overlap), with a margin.
    fn disk_needed(&self) -> u64 {
        let p13 = self.store1_size() + self.origin_size + self.deep_size;
        let p4 = self.store4k_size() + 64 * MIB;
        p13.max(p4) + GIB
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers: statistics, /proc, page cache, disk space.

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s
}

fn median(v: &[f64]) -> f64 {
    let s = sorted(v);
    if s.is_empty() {
        return f64::NAN;
    }
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Percentile of already sorted values (nearest rank).
fn pct(s: &[f64], p: f64) -> f64 {
    if s.is_empty() {
        return f64::NAN;
    }
    s[((s.len() - 1) as f64 * p).round() as usize]
}

fn range(v: &[f64], digits: usize) -> String {
    let s = sorted(v);
    match (s.first(), s.last()) {
        (Some(a), Some(b)) => format!("{a:.digits$}–{b:.digits$}"),
        _ => "-".into(),
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as u64
    } else {
        4096
    }
}

/// Resident set size in bytes, from /proc/self/statm.
fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0);
    pages * page_size()
}

/// Give freed heap memory back to the kernel, so RSS counts live allocations (glibc keeps
/// freed memory of large temporaries, such as a checkpoint stream, otherwise).
fn trim_heap() {
    // SAFETY: malloc_trim only releases free memory of the allocator; no preconditions.
    unsafe { libc::malloc_trim(0) };
}

/// Peak resident set size (VmHWM) in bytes.
fn rss_peak() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib * KIB)
        .unwrap_or(0)
}

/// Byte and syscall counters of this process (all threads), from /proc/self/io.
fn proc_io() -> HashMap<String, u64> {
    let s = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    s.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

fn io_delta(a: &HashMap<String, u64>, b: &HashMap<String, u64>, key: &str) -> u64 {
    b.get(key)
        .copied()
        .unwrap_or(0)
        .saturating_sub(a.get(key).copied().unwrap_or(0))
}

/// `sync; echo 3 > /proc/sys/vm/drop_caches`; false when not permitted (not root).
fn drop_caches() -> bool {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

fn statvfs_avail(path: &Path) -> R<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid, writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// The filesystem type of `path`, by statfs magic (enough to tell tmpfs from a disk).
fn fs_type(path: &Path) -> String {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return "?".into();
    };
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid, writable statfs.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return "?".into();
    }
    match st.f_type as u64 {
        0xEF53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x0102_1994 => "tmpfs".into(),
        0x794C_7630 => "overlayfs".into(),
        0x2FC1_2FC1 => "zfs".into(),
        m => format!("magic {m:#x}"),
    }
}

fn punch_hole(f: &File, off: u64, len: u64) -> R<()> {
    // SAFETY: fallocate on a file descriptor we own; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn log(msg: &str) {
    eprintln!("[engine_bench] {msg}");
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

fn mib_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / MIB as f64 / secs
}

/// Parse `RESULT k=v k=v ...` from a child's stdout.
fn parse_result(out: &str) -> HashMap<String, f64> {
    out.lines()
        .filter_map(|l| l.strip_prefix("RESULT "))
        .flat_map(|l| l.split_whitespace())
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Write zeros over a freshly formatted store past its two superblocks (journal and data area
/// read as zeros either way): the store is then like one used for a while, every journal block
/// and slot written once, and no first touch pays for the filesystem's extent conversion.
fn prewrite_store(path: &Path) -> R<()> {
    let f = File::options().write(true).open(path)?;
    let len = f.metadata()?.len();
    let zeros = vec![0u8; MIB as usize];
    let mut off = 2 * BLOCK; // the superblocks stay
    while off < len {
        let n = (MIB - off % MIB).min(len - off);
        f.write_all_at(&zeros[..n as usize], off)?;
        off += n;
    }
    f.sync_all()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The table.

struct Row {
    id: String,
    what: String,
    result: String,
    range: String,
    note: String,
}

#[derive(Default)]
struct Table {
    rows: Vec<Row>,
}

impl Table {
    fn add(&mut self, id: &str, what: &str, result: String, range: String, note: String) {
        self.rows.push(Row {
            id: id.into(),
            what: what.into(),
            result,
            range,
            note,
        });
    }

    fn print(&self) {
        println!("| # | Measurement | Median of {REPS} | Range | Ratio / notes |");
        println!("|---|---|---:|---:|---|");
        let mut rows: Vec<&Row> = self.rows.iter().collect();
        rows.sort_by(|a, b| a.id.cmp(&b.id)); // stable: measurement order within a part
        for r in rows {
            println!(
                "| {} | {} | {} | {} | {} |",
                r.id, r.what, r.result, r.range, r.note
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Passes.

/// Plain pwrite of `buf` at each offset, then one fdatasync; seconds.
fn write_plain(f: &File, offs: &[u64], buf: &[u8]) -> R<f64> {
    let t = Instant::now();
    for &o in offs {
        f.write_all_at(buf, o)?;
    }
    f.sync_data()?;
    Ok(secs(t))
}

/// The same through the engine, then one flush (fdatasync of the origin); seconds.
fn write_engine(v: &Volume, offs: &[u64], buf: &[u8]) -> R<f64> {
    let t = Instant::now();
    for &o in offs {
        v.write_at(o, buf, false)?;
    }
    v.flush()?;
    Ok(secs(t))
}

fn read_engine(v: &Volume, offs: &[u64], buf: &mut [u8]) -> R<f64> {
    let t = Instant::now();
    for &o in offs {
        v.read_at(o, buf)?;
    }
    Ok(secs(t))
}

fn read_plain(f: &File, offs: &[u64], buf: &mut [u8]) -> R<f64> {
    let t = Instant::now();
    for &o in offs {
        f.read_exact_at(buf, o)?;
    }
    Ok(secs(t))
}

fn seq_offsets(size: u64, step: u64) -> Vec<u64> {
    (0..size / step).map(|i| i * step).collect()
}

fn rand_blocks(rng: &mut StdRng, size: u64, n: usize) -> Vec<u64> {
    (0..n)
        .map(|_| rng.random_range(0..size / BLOCK) * BLOCK)
        .collect()
}

/// `n` 4 KiB offsets, each in a different 64 KiB chunk, at a random block of it.
fn distinct_chunk_offsets(rng: &mut StdRng, size: u64, n: usize) -> Vec<u64> {
    let mut chunks: Vec<u64> = (0..size / CHUNK).collect();
    chunks.shuffle(rng);
    chunks.truncate(n);
    chunks
        .into_iter()
        .map(|c| c * CHUNK + rng.random_range(0..CHUNK / BLOCK) * BLOCK)
        .collect()
}

/// Timed 4 KiB writes through the engine from `threads` threads (offsets split between them),
/// then one flush; returns (seconds, sorted per-write latencies in µs).
fn timed_writes(v: &Volume, offs: &[u64], threads: usize, buf: &[u8]) -> R<(f64, Vec<f64>)> {
    let per = offs.len().div_ceil(threads);
    let barrier = Barrier::new(threads + 1);
    let (total, lats) = std::thread::scope(|s| -> R<(f64, Vec<f64>)> {
        let handles: Vec<_> = offs
            .chunks(per)
            .map(|part| {
                let v = v.clone();
                let barrier = &barrier;
                s.spawn(move || -> Result<Vec<f64>, String> {
                    barrier.wait();
                    let mut lat = Vec::with_capacity(part.len());
                    for &o in part {
                        let t = Instant::now();
                        v.write_at(o, buf, false).map_err(|e| e.to_string())?;
                        lat.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                    Ok(lat)
                })
            })
            .collect();
        // Threads that got no offsets (fewer offsets than threads) never reach the barrier.
        for _ in handles.len()..threads {
            barrier.wait();
        }
        let t = Instant::now();
        barrier.wait();
        let mut lats = Vec::new();
        for h in handles {
            lats.extend(h.join().map_err(|_| "writer thread panicked")??);
        }
        v.flush()?;
        Ok((secs(t), lats))
    })?;
    Ok((total, sorted(&lats)))
}

/// Durable-per-write baseline: pwrite 4 KiB + fdatasync each; sorted latencies in µs.
fn timed_sync_writes(f: &File, offs: &[u64], buf: &[u8]) -> R<(f64, Vec<f64>)> {
    let t0 = Instant::now();
    let mut lat = Vec::with_capacity(offs.len());
    for &o in offs {
        let t = Instant::now();
        f.write_all_at(buf, o)?;
        f.sync_data()?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok((secs(t0), sorted(&lat)))
}

fn exclusive_bytes(store: &Store, name: &str) -> u64 {
    store
        .snapshots()
        .iter()
        .find(|s| s.name == name)
        .map(|s| s.exclusive_bytes)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// The run.

struct Run {
    cfg: Cfg,
    dir: PathBuf,
    dropped: bool,
    table: Table,
    /// First writes on freshly formatted stores: (IOPS, p50 µs, p99 µs) per rep.
    fresh: Vec<(f64, f64, f64)>,
}

impl Run {
    /// Drop the page cache before a read pass or timed open (root only).
    fn cold(&mut self) {
        self.dropped = drop_caches();
    }

    /// Parts 1, 2, 3 on one 64 KiB-chunk store.
    fn parts_1_to_3(&mut self) -> R<()> {
        let cfg = &self.cfg;
        let size = cfg.origin_size;
        let o1 = self.dir.join("origin1.img");
        let st1 = self.dir.join("store1");
        let big = pattern(MIB as usize, 1);
        let small = &big[..BLOCK as usize];
        let seq = seq_offsets(size, MIB);
        let mut rng = StdRng::seed_from_u64(42);

        log(&format!(
            "part 1: origin {} MiB, store {} MiB",
            size / MIB,
            cfg.store1_size() / MIB
        ));
        let plain = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&o1)?;
        plain.set_len(size)?;
        // Allocate every block first, so every timed pass overwrites allocated blocks.
        write_plain(&plain, &seq, &big)?;
        self.part2_fresh(&o1, &mut rng)?;
        let cfg = &self.cfg;
        Store::format(
            &st1,
            &FormatOptions {
                size: Some(cfg.store1_size()),
                ..Default::default()
            },
        )?;
        prewrite_store(&st1)?;
        let store = Store::open(&st1, &OpenOptions::default())?;
        store.add_origin(&o1, Some("o1"))?;
        let vol = store.volume("o1")?;

        // Part 1, without a snapshot: (plain seq, engine seq, plain rand, engine rand) per rep.
        let mut a: [Vec<f64>; 4] = Default::default();
        for rep in 0..REPS {
            let rand = rand_blocks(&mut rng, size, cfg.rand_writes);
            let engine_first = rep % 2 == 1;
            for (k, offs, buf) in [(0, &seq, &big[..]), (2, &rand, small)] {
                if engine_first {
                    a[k + 1].push(write_engine(&vol, offs, buf)?);
                    a[k].push(write_plain(&plain, offs, buf)?);
                } else {
                    a[k].push(write_plain(&plain, offs, buf)?);
                    a[k + 1].push(write_engine(&vol, offs, buf)?);
                }
            }
            log(&format!("part 1 no-snapshot rep {rep}: {a:?}"));
        }

        // First overwrite after a snapshot (every chunk copied out), then keep the last
        // snapshot: every chunk is preserved for it.
        let mut first_pass = Vec::new();
        let mut copied = 0;
        for rep in 0..REPS {
            if rep > 0 {
                store.delete_snapshot(&format!("o1@p{}", rep - 1))?;
            }
            store.create_snapshot(&["o1"], Some(&format!("p{rep}")), "", false)?;
            first_pass.push(write_engine(&vol, &seq, &big)?);
            copied = exclusive_bytes(&store, &format!("o1@p{rep}"));
            log(&format!(
                "part 1 preserving overwrite rep {rep}: {:.2}s",
                first_pass[rep]
            ));
        }
        let snap = format!("o1@p{}", REPS - 1);

        let mut b: [Vec<f64>; 4] = Default::default();
        for rep in 0..REPS {
            let rand = rand_blocks(&mut rng, size, cfg.rand_writes);
            let engine_first = rep % 2 == 1;
            for (k, offs, buf) in [(0, &seq, &big[..]), (2, &rand, small)] {
                if engine_first {
                    b[k + 1].push(write_engine(&vol, offs, buf)?);
                    b[k].push(write_plain(&plain, offs, buf)?);
                } else {
                    b[k].push(write_plain(&plain, offs, buf)?);
                    b[k + 1].push(write_engine(&vol, offs, buf)?);
                }
            }
            log(&format!("part 1 snapshot rep {rep}: {b:?}"));
        }
        let extra = exclusive_bytes(&store, &snap) - copied;
        self.report_part1(&a, &b, &first_pass, copied, extra);

        // Part 3a: sequential reads after the full overwrite: the snapshot reads the COW store.
        let snapvol = store.volume(&snap)?;
        let mut rbuf = vec![0u8; MIB as usize];
        let mut r: [Vec<f64>; 3] = Default::default();
        for rep in 0..REPS {
            let mut order = [0usize, 1, 2];
            order.rotate_left(rep % 3);
            for k in order {
                self.cold();
                r[k].push(match k {
                    0 => read_plain(&plain, &seq, &mut rbuf)?,
                    1 => read_engine(&vol, &seq, &mut rbuf)?,
                    _ => read_engine(&snapvol, &seq, &mut rbuf)?,
                });
            }
            log(&format!("part 3 seq read rep {rep}: {r:?}"));
        }
        self.report_seq_read(&r);
        drop(snapvol);
        store.delete_snapshot(&snap)?;

        // Part 2: first writes after a snapshot.
        self.part2(&store, &vol, &plain, &mut rng)?;

        // Part 3b: random reads at depth 1, 10, 100 of a chain of writable snapshots.
        self.part3_depth(&store, &mut rng)?;

        drop(vol);
        store.close()?;
        drop(plain);
        for f in ["origin1.img", "origin2.img", "store1"] {
            let _ = std::fs::remove_file(self.dir.join(f));
        }
        Ok(())
    }

    fn report_part1(
        &mut self,
        a: &[Vec<f64>; 4],
        b: &[Vec<f64>; 4],
        first: &[f64],
        copied: u64,
        extra: u64,
    ) {
        let cfg = &self.cfg;
        let size = cfg.origin_size;
        let nrand = cfg.rand_writes as u64;
        let mbs = |v: &[f64]| v.iter().map(|&s| mib_s(size, s)).collect::<Vec<_>>();
        let iops = |v: &[f64]| v.iter().map(|&s| nrand as f64 / s).collect::<Vec<_>>();
        // Paired ratios: engine time vs plain time of the same rep (throughput ratio).
        let ratio = |plain: &[f64], eng: &[f64]| {
            let rs: Vec<f64> = plain.iter().zip(eng).map(|(p, e)| p / e).collect();
            format!(
                "**{:.2}×** pwrite (paired per rep; range {})",
                median(&rs),
                range(&rs, 2)
            )
        };
        let t = &mut self.table;
        let sq = format!("1 MiB seq writes over {} MiB + fdatasync", size / MIB);
        let rd = format!("4 KiB random writes ×{nrand} + fdatasync");
        for (phase, v) in [("no snapshot", a), ("snapshot, all preserved", b)] {
            let m = mbs(&v[0]);
            t.add(
                "1",
                &format!("{sq}: plain pwrite ({phase} phase)"),
                format!("{:.0} MiB/s", median(&m)),
                range(&m, 0),
                "baseline".into(),
            );
            let m = mbs(&v[1]);
            t.add(
                "1",
                &format!("{sq}: engine, {phase}"),
                format!("{:.0} MiB/s", median(&m)),
                range(&m, 0),
                ratio(&v[0], &v[1]),
            );
        }
        for (phase, v) in [("no snapshot", a), ("snapshot, all preserved", b)] {
            let m = iops(&v[2]);
            t.add(
                "1",
                &format!("{rd}: plain pwrite ({phase} phase)"),
                format!("{:.0} IOPS", median(&m)),
                range(&m, 0),
                "baseline".into(),
            );
            let m = iops(&v[3]);
            t.add(
                "1",
                &format!("{rd}: engine, {phase}"),
                format!("{:.0} IOPS", median(&m)),
                range(&m, 0),
                ratio(&v[2], &v[3]),
            );
        }
        let m = mbs(first);
        let base = median(&mbs(&a[0]));
        t.add(
            "1",
            &format!(
                "{sq}: engine, first overwrite after a fresh snapshot (every block copied out)"
            ),
            format!("{:.0} MiB/s", median(&m)),
            range(&m, 0),
            format!(
                "{:.2}× pwrite (vs no-snapshot phase median); copied {} MiB per pass; \
                 the later all-preserved passes copied {} B more (expected 0)",
                median(&m) / base,
                copied / MIB,
                extra
            ),
        );
    }

    fn report_seq_read(&mut self, r: &[Vec<f64>; 3]) {
        let size = self.cfg.origin_size;
        let mbs = |v: &[f64]| v.iter().map(|&s| mib_s(size, s)).collect::<Vec<_>>();
        let cache = if self.dropped {
            "page cache dropped before each pass"
        } else {
            "page cache NOT dropped (not root): cached reads"
        };
        let base = mbs(&r[1]);
        let names = [
            "plain pread of the origin file",
            "engine, origin",
            "engine, snapshot (all from the COW store)",
        ];
        for (k, name) in names.iter().enumerate() {
            let m = mbs(&r[k]);
            let note = match k {
                0 => cache.to_string(),
                1 => "baseline".to_string(),
                _ => {
                    let rs: Vec<f64> = r[1].iter().zip(&r[2]).map(|(o, s)| o / s).collect();
                    format!(
                        "**{:.2}×** origin (paired; range {}); origin median {:.0} MiB/s",
                        median(&rs),
                        range(&rs, 2),
                        median(&base)
                    )
                }
            };
            self.table.add(
                "3",
                &format!("1 MiB seq reads of {} MiB: {name}", size / MIB),
                format!("{:.0} MiB/s", median(&m)),
                range(&m, 0),
                note,
            );
        }
    }

    fn part2(&mut self, store: &Store, vol: &Volume, plain: &File, rng: &mut StdRng) -> R<()> {
        let n = self.cfg.first_writes;
        let threads = self.cfg.threads;
        let size = self.cfg.origin_size;
        let buf = pattern(BLOCK as usize, 7);
        log(&format!(
            "part 2: {n} first writes, 1 and {threads} threads"
        ));
        // Per rep: [nosnap 1t, first 1t, sync-per-write 1t, nosnap Nt, first Nt]
        let mut iops: [Vec<f64>; 5] = Default::default();
        let mut p50: [Vec<f64>; 5] = Default::default();
        let mut p99: [Vec<f64>; 5] = Default::default();
        let mut copied = Vec::new(); // exclusive bytes per first write
        let mut alloc = Vec::new(); // used-bytes growth per first write
        let mut store_w = [Vec::new(), Vec::new()]; // store bytes written per first write
        let mut per_commit = [Vec::new(), Vec::new()]; // ≈ first writes per group commit
        let mut read_b = Vec::new();
        for rep in 0..REPS {
            // One extra offset: an untimed warm-up first write per snapshot (below).
            let mut offs = distinct_chunk_offsets(rng, size, n + 1);
            let warmup = offs.pop().ok_or("no chunk for the warm-up write")?;
            let mut put = |k: usize, total: f64, lat: &[f64]| {
                iops[k].push(n as f64 / total);
                p50[k].push(pct(lat, 0.5));
                p99[k].push(pct(lat, 0.99));
            };
            let (t, l) = timed_writes(vol, &offs, 1, &buf)?;
            put(0, t, &l);
            let (t, l) = timed_writes(vol, &offs, threads, &buf)?;
            put(3, t, &l);
            let (t, l) = timed_sync_writes(plain, &offs, &buf)?;
            put(2, t, &l);
            for (k, th) in [(1usize, 1usize), (4, threads)] {
                let tag = format!("f{rep}t{th}");
                let name = format!("o1@{tag}");
                store.create_snapshot(&["o1"], Some(&tag), "", false)?;
                // The first allocation also frees the slots the previous (deleted) snapshot
                // left in quarantine; do it untimed so used_bytes then only grows.
                vol.write_at(warmup, &buf, false)?;
                let excl0 = exclusive_bytes(store, &name);
                let used0 = store.info().used_bytes;
                let io0 = proc_io();
                let (t, l) = timed_writes(vol, &offs, th, &buf)?;
                let io1 = proc_io();
                put(k, t, &l);
                let excl = exclusive_bytes(store, &name) - excl0;
                let used = store.info().used_bytes.saturating_sub(used0);
                let i = usize::from(th > 1);
                let wchar = io_delta(&io0, &io1, "wchar");
                // Minus the origin writes themselves: what the engine wrote to the store.
                let sw = wchar.saturating_sub(n as u64 * BLOCK) as f64 / n as f64;
                store_w[i].push(sw);
                // Journal bytes: groups are padded to 4 KiB, so one small group = 4 KiB.
                let journal = (sw - excl as f64 / n as f64).max(1.0);
                per_commit[i].push(BLOCK as f64 / journal);
                if th == 1 {
                    copied.push(excl as f64 / n as f64);
                    alloc.push(used as f64 / n as f64);
                    read_b.push(io_delta(&io0, &io1, "rchar") as f64 / n as f64);
                }
                store.delete_snapshot(&name)?;
            }
            log(&format!("part 2 rep {rep}: IOPS {iops:?}"));
        }
        let t = &mut self.table;
        let what = |k: usize| -> String {
            let w = [
                "engine, no snapshot, 1 thread",
                "engine, **first writes after a snapshot**, 1 thread",
                "plain pwrite + fdatasync per write (durable-write floor), 1 thread",
                &format!("engine, no snapshot, {threads} threads"),
                &format!("engine, **first writes after a snapshot**, {threads} threads"),
            ][k]
                .to_string();
            format!("4 KiB random writes ×{n}, each in a different 64 KiB chunk: {w}")
        };
        for k in [0, 1, 2, 3, 4] {
            let mut note = format!(
                "latency p50 {:.0} µs, p99 {:.0} µs",
                median(&p50[k]),
                median(&p99[k])
            );
            match k {
                1 => {
                    note += &format!(
                        "; **{:.3}×** the no-snapshot IOPS; {:.2}× the fdatasync-per-write floor",
                        median(&iops[1]) / median(&iops[0]),
                        median(&iops[1]) / median(&iops[2])
                    )
                }
                4 => {
                    note += &format!(
                        "; **{:.1}×** the 1-thread first-write IOPS (group commit); \
                     ≈{:.1} first writes per commit",
                        median(&iops[4]) / median(&iops[1]),
                        median(&per_commit[1])
                    )
                }
                _ => {}
            }
            t.add(
                "2",
                &what(k),
                format!("{:.0} IOPS", median(&iops[k])),
                range(&iops[k], 0),
                note,
            );
        }
        let fi: Vec<f64> = self.fresh.iter().map(|f| f.0).collect();
        t.add(
            "2",
            &format!(
                "4 KiB random writes ×{n}, each in a different 64 KiB chunk: engine, **first \
                 writes after a snapshot on a freshly formatted store**, 1 thread"
            ),
            format!("{:.0} IOPS", median(&fi)),
            range(&fi, 0),
            format!(
                "latency p50 {:.0} µs, p99 {:.0} µs; {:.2}× the IOPS on the pre-written store \
                 (here journal and slots are fallocated, never written)",
                median(&self.fresh.iter().map(|f| f.1).collect::<Vec<_>>()),
                median(&self.fresh.iter().map(|f| f.2).collect::<Vec<_>>()),
                median(&fi) / median(&iops[1])
            ),
        );
        t.add(
            "2",
            "Bytes copied per first 4 KiB write (snapshot exclusive_bytes growth / writes)",
            format!("{:.0} B", median(&copied)),
            range(&copied, 0),
            format!(
                "target 4096 (not the 64 KiB chunk); origin bytes read per write {:.0}",
                median(&read_b)
            ),
        );
        t.add(
            "2",
            "Store bytes written per first write (/proc/self/io wchar minus the origin write)",
            format!("{:.0} B", median(&store_w[0])),
            range(&store_w[0], 0),
            format!(
                "1 thread: 4096 data + one 4 KiB journal group each; {threads} threads: {:.0} B",
                median(&store_w[1])
            ),
        );
        t.add(
            "2",
            "COW space allocated per first write (info().used_bytes growth / writes)",
            format!("{:.0} B", median(&alloc)),
            range(&alloc, 0),
            "a whole 64 KiB slot is reserved per chunk; only the written block is copied".into(),
        );
        Ok(())
    }

    /// Part 2 on a freshly formatted store: its journal and data slots are fallocated but never
    /// written, so the first write into each costs the filesystem an extent conversion.
    fn part2_fresh(&mut self, origin: &Path, rng: &mut StdRng) -> R<()> {
        let n = self.cfg.first_writes;
        let path = self.dir.join("fresh");
        let buf = pattern(BLOCK as usize, 8);
        log(&format!(
            "part 2: {n} first writes on freshly formatted stores"
        ));
        for _ in 0..REPS {
            Store::format(
                &path,
                &FormatOptions {
                    size: Some(self.cfg.store1_size()),
                    force: true,
                    ..Default::default()
                },
            )?;
            let store = Store::open(&path, &OpenOptions::default())?;
            store.add_origin(origin, Some("o1"))?;
            store.create_snapshot(&["o1"], Some("fresh"), "", false)?;
            let vol = store.volume("o1")?;
            let offs = distinct_chunk_offsets(rng, self.cfg.origin_size, n);
            let (t, lat) = timed_writes(&vol, &offs, 1, &buf)?;
            self.fresh
                .push((n as f64 / t, pct(&lat, 0.5), pct(&lat, 0.99)));
            drop(vol);
            store.close()?;
            std::fs::remove_file(&path)?;
        }
        log(&format!("part 2 fresh: {:?}", self.fresh));
        Ok(())
    }

    fn part3_depth(&mut self, store: &Store, rng: &mut StdRng) -> R<()> {
        let cfg = &self.cfg;
        let size = cfg.deep_size;
        let o2 = self.dir.join("origin2.img");
        let max_depth = *DEPTHS.iter().max().unwrap_or(&1);
        log(&format!(
            "part 3: chain of {max_depth} writable snapshots on a {} MiB origin",
            size / MIB
        ));
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&o2)?;
        f.set_len(size)?;
        let big = pattern(MIB as usize, 3);
        write_plain(&f, &seq_offsets(size, MIB), &big)?;
        store.add_origin(&o2, Some("o2"))?;
        store.create_snapshot(&["o2"], Some("d1"), "", true)?;
        let mut first_level1 = 0;
        for d in 1..=max_depth {
            let v = store.volume(&format!("o2@d{d}"))?;
            let data = vec![d as u8; BLOCK as usize];
            for (i, o) in rand_blocks(rng, size, cfg.depth_writes)
                .into_iter()
                .enumerate()
            {
                if d == 1 && i == 0 {
                    first_level1 = o;
                }
                v.write_at(o, &data, false)?;
            }
            if d < max_depth {
                store.create_snapshot(
                    &[&format!("o2@d{d}")],
                    Some(&format!("d{}", d + 1)),
                    "",
                    true,
                )?;
            }
        }
        // Overwrite the origin: every read of the chain now comes from the COW store.
        let origin = store.volume("o2")?;
        let big2 = pattern(MIB as usize, 4);
        write_engine(&origin, &seq_offsets(size, MIB), &big2)?;
        store.sync()?;
        // Sanity: depth is real: the deepest snapshot reads what its ancestors wrote.
        let deep = store.volume(&format!("o2@d{max_depth}"))?;
        let mut chk = vec![0u8; BLOCK as usize];
        deep.read_at(first_level1, &mut chk)?;
        if !(1..=max_depth as u8).contains(&chk[0]) || chk.iter().any(|&b| b != chk[0]) {
            return Err("the deepest snapshot does not read its ancestors' writes".into());
        }

        // [origin, depth...] × [cold, warm]
        let mut cold: Vec<Vec<f64>> = vec![Vec::new(); DEPTHS.len() + 1];
        let mut warm: Vec<Vec<f64>> = vec![Vec::new(); DEPTHS.len() + 1];
        let mut buf = vec![0u8; BLOCK as usize];
        let vols: Vec<Volume> = std::iter::once(Ok(origin.clone()))
            .chain(DEPTHS.iter().map(|d| store.volume(&format!("o2@d{d}"))))
            .collect::<Result<_, _>>()?;
        let n = cfg.depth_reads;
        for rep in 0..REPS {
            let offs = rand_blocks(rng, size, n);
            let mut order: Vec<usize> = (0..vols.len()).collect();
            order.rotate_left(rep % vols.len());
            for k in order {
                self.cold();
                cold[k].push(read_engine(&vols[k], &offs, &mut buf)? / n as f64 * 1e6);
                warm[k].push(read_engine(&vols[k], &offs, &mut buf)? / n as f64 * 1e6);
            }
            log(&format!(
                "part 3 depth rep {rep}: cold {cold:?} warm {warm:?}"
            ));
        }
        let cache = if self.dropped {
            "page cache dropped before the pass"
        } else {
            "not root: page cache not dropped"
        };
        for (label, v, note) in [
            ("cold", &cold, cache),
            (
                "warm (same offsets again, page cache hot)",
                &warm,
                "engine CPU cost",
            ),
        ] {
            for k in 0..vols.len() {
                let who = if k == 0 {
                    "origin (depth 0, plain pread through the engine)".to_string()
                } else {
                    format!("writable snapshot at depth {}", DEPTHS[k - 1])
                };
                let n2 = if k == 0 {
                    note.to_string()
                } else {
                    format!("{:.2}× depth 1", median(&v[k]) / median(&v[1]))
                };
                self.table.add(
                    "3",
                    &format!("4 KiB random reads ×{n}, {label}: {who}"),
                    format!("{:.1} µs/read", median(&v[k])),
                    range(&v[k], 1),
                    n2,
                );
            }
        }
        Ok(())
    }

    /// Part 4: index RAM per mapping and open time of a store with `map_chunks` mappings.
    fn part4(&mut self) -> R<()> {
        let cfg = &self.cfg;
        let dir = self.dir.join("idx");
        std::fs::create_dir_all(&dir)?;
        let store = dir.join("store4k");
        let exe = std::env::current_exe()?;
        // With 256 preserves per 1 MiB write, a journal group is 256 × 68 B records, padded to
        // 20 KiB. Checkpoint explicitly so the crash leaves ~90% of the journal to replay: the
        // worst case recovery meets in steady state.
        let jlen = ((cfg.store4k_size() / 32).clamp(MIB, 64 * MIB) / BLOCK) * BLOCK;
        let group = 20 * KIB;
        let writes = cfg.map_chunks * BLOCK / MIB;
        let fit = ((jlen - 4 * BLOCK) / group) * 9 / 10;
        let ckpt_before = writes.saturating_sub(fit);
        log(&format!(
            "part 4: building {} mappings (4 KiB chunks) in a child process; journal {} MiB, \
             checkpoint before write {ckpt_before} of {writes}",
            cfg.map_chunks,
            jlen / MIB
        ));
        let out = Command::new(&exe)
            .arg("--child-build")
            .arg(&dir)
            .arg(cfg.map_chunks.to_string())
            .arg(ckpt_before.to_string())
            .output()?;
        if !out.status.success() {
            return Err(format!(
                "build child failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        let b = parse_result(&String::from_utf8_lossy(&out.stdout));
        let get = |m: &HashMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(f64::NAN);
        let mappings = get(&b, "mappings");
        let per_map_build = (get(&b, "rss_after") - get(&b, "rss_before")) / mappings;
        let replay = (writes - ckpt_before.min(writes)) * (MIB / BLOCK);

        let probe = |run: &mut Run, ro: bool| -> R<HashMap<String, f64>> {
            run.cold();
            let mut c = Command::new(&exe);
            c.arg("--child-open").arg(&store);
            if ro {
                c.arg("--read-only");
            }
            let out = c.output()?;
            if !out.status.success() {
                return Err(format!(
                    "open child failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
                .into());
            }
            Ok(parse_result(&String::from_utf8_lossy(&out.stdout)))
        };
        // After the crash: read-only opens replay into memory and change nothing (repeatable).
        let mut ro = Vec::new();
        for _ in 0..REPS {
            ro.push(probe(self, true)?);
        }
        // The real recovery (replay, then fold into a checkpoint): happens once.
        let rw = probe(self, false)?;
        let mut clean = Vec::new();
        for _ in 0..REPS {
            clean.push(probe(self, false)?);
        }
        let col =
            |v: &[HashMap<String, f64>], k: &str| v.iter().map(|m| get(m, k)).collect::<Vec<_>>();
        let per_map = |v: &[HashMap<String, f64>]| {
            v.iter()
                .map(|m| (get(m, "rss_after") - get(m, "rss_before")) / get(m, "mappings"))
                .collect::<Vec<_>>()
        };
        let cache = if self.dropped {
            "page cache dropped before each open"
        } else {
            "page cache not dropped (not root)"
        };
        let t = &mut self.table;
        t.add(
            "4",
            &format!(
                "Index RAM per mapping: RSS growth while building {mappings:.0} mappings (4 KiB chunks, 1 MiB origin writes after a snapshot)"
            ),
            format!("{per_map_build:.1} B"),
            "1 run".into(),
            format!(
                "target ≤ 32 B; after malloc_trim (untrimmed {:.1} B); build took {:.1} s",
                (get(&b, "rss_untrimmed") - get(&b, "rss_before")) / mappings,
                get(&b, "build_secs")
            ),
        );
        let pm = per_map(&clean);
        t.add(
            "4",
            "Index RAM per mapping: RSS growth of a fresh process by a clean Store::open",
            format!("{:.1} B", median(&pm)),
            range(&pm, 1),
            format!(
                "after malloc_trim (untrimmed {:.1} B); includes the slot bitmap and the \
                 process's fixed costs; peak RSS during open {:.0} MiB",
                median(
                    &clean
                        .iter()
                        .map(|m| (get(m, "rss_untrimmed") - get(m, "rss_before"))
                            / get(m, "mappings"))
                        .collect::<Vec<_>>()
                ),
                median(&col(&clean, "rss_peak")) / MIB as f64
            ),
        );
        let v = col(&clean, "open_secs");
        t.add(
            "4",
            &format!("Clean open (after close) of the {mappings:.0}-mapping store"),
            format!("{:.3} s", median(&v)),
            range(&v, 3),
            format!("target ≤ 1 s; {cache}"),
        );
        let v = col(&ro, "open_secs");
        t.add(
            "4",
            "Open after a crash-like stop (child exited without close), read-only: checkpoint + journal replay in memory",
            format!("{:.3} s", median(&v)),
            range(&v, 3),
            format!(
                "replays ≈{replay} journal records on top of a checkpoint of ≈{} mappings",
                (mappings as u64).saturating_sub(replay)
            ),
        );
        t.add(
            "4",
            "Open after the crash-like stop, read-write (replay, then a new checkpoint): the real recovery",
            format!("{:.3} s", get(&rw, "open_secs")),
            "1 run".into(),
            format!(
                "target ≤ 1 s; RSS growth {:.1} B/mapping; peak RSS {:.0} MiB",
                (get(&rw, "rss_after") - get(&rw, "rss_before")) / get(&rw, "mappings"),
                get(&rw, "rss_peak") / MIB as f64
            ),
        );
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Child processes of part 4.

/// `--child-build DIR CHUNKS CKPT_BEFORE`: build the store, report, exit without `close`.
fn child_build(args: &[String]) -> R<()> {
    let [dir, chunks, ckpt_before] = args else {
        return Err("usage: --child-build DIR CHUNKS CKPT_BEFORE".into());
    };
    let dir = PathBuf::from(dir);
    let chunks: u64 = chunks.parse()?;
    let ckpt_before: u64 = ckpt_before.parse()?;
    let size = chunks * BLOCK;
    let origin = dir.join("origin4k.img");
    let f = File::create(&origin)?;
    f.set_len(size)?; // sparse
    let store = dir.join("store4k");
    Store::format(
        &store,
        &FormatOptions {
            size: Some(size + 256 * MIB),
            ..Default::default()
        },
    )?;
    let s = Store::open(&store, &OpenOptions::default())?;
    s.add_origin(&origin, Some("big"))?;
    s.create_snapshot(&["big"], Some("s"), "", false)?;
    let v = s.volume("big")?;
    let buf = pattern(MIB as usize, 5);
    let rss_before = rss();
    let t = Instant::now();
    for (i, off) in seq_offsets(size, MIB).into_iter().enumerate() {
        if i as u64 == ckpt_before && i > 0 {
            s.checkpoint()?;
        }
        // Each 1 MiB write preserves 256 chunks (one group commit).
        v.write_at(off, &buf, false)?;
        // The origin's new data is not needed: keep the origin sparse on disk.
        punch_hole(&f, off, MIB)?;
    }
    let build_secs = secs(t);
    let rss_untrimmed = rss();
    trim_heap();
    let rss_after = rss();
    let mappings = s.info().mappings;
    println!(
        "RESULT build_secs={build_secs} rss_before={rss_before} rss_after={rss_after} \
         rss_untrimmed={rss_untrimmed} mappings={mappings}"
    );
    std::io::stdout().flush()?;
    // A crash-like stop: no close, no checkpoint, threads killed.
    std::process::exit(0);
}

/// `--child-open STORE [--read-only]`: time `Store::open` in a fresh process.
fn child_open(args: &[String]) -> R<()> {
    let path = PathBuf::from(args.first().ok_or("usage: --child-open STORE")?);
    let ro = args.iter().any(|a| a == "--read-only");
    let rss_before = rss();
    let t = Instant::now();
    let s = Store::open(
        &path,
        &OpenOptions {
            read_only: ro,
            ..Default::default()
        },
    )?;
    let open_secs = secs(t);
    let rss_untrimmed = rss();
    trim_heap();
    let rss_after = rss();
    let rss_peak = rss_peak();
    let mappings = s.info().mappings;
    let t = Instant::now();
    s.close()?;
    let close_secs = secs(t);
    println!(
        "RESULT open_secs={open_secs} rss_before={rss_before} rss_after={rss_after} \
         rss_untrimmed={rss_untrimmed} rss_peak={rss_peak} mappings={mappings} close_secs={close_secs}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------

fn usage() -> ! {
    eprintln!(
        "usage: engine_bench [--quick] [--dir DIR]\n\
         \n\
         Measures the mvsnap engine (issue 2) on files it creates in a temporary directory\n\
         (default: under the workspace target/ directory; DIR must not be tmpfs) and prints a\n\
         Markdown table. --quick: small sizes for a CI smoke run (under a minute)."
    );
    std::process::exit(2);
}

fn run(quick: bool, dir: Option<PathBuf>) -> R<()> {
    let cfg = Cfg::new(quick);
    let base = match dir {
        Some(d) => d,
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"),
    };
    std::fs::create_dir_all(&base)?;
    let tmp = tempfile::Builder::new()
        .prefix("engine-bench-")
        .tempdir_in(&base)?;
    let dir = std::fs::canonicalize(tmp.path())?;
    let fs = fs_type(&dir);
    if fs == "tmpfs" {
        log("WARNING: the bench directory is on tmpfs: fdatasync is free, numbers are meaningless");
    }
    let avail = statvfs_avail(&dir)?;
    let need = cfg.disk_needed();
    log(&format!(
        "dir {} ({fs}), {} GiB free, needs about {:.1} GiB",
        dir.display(),
        avail / GIB,
        need as f64 / GIB as f64
    ));
    if avail < need {
        return Err(format!(
            "not enough free disk in {}: {:.1} GiB free, {:.1} GiB needed (try --quick or --dir)",
            dir.display(),
            avail as f64 / GIB as f64,
            need as f64 / GIB as f64
        )
        .into());
    }
    let load0 = loadavg();
    let started = Instant::now();
    let mut run = Run {
        cfg,
        dir: dir.clone(),
        dropped: drop_caches(),
        fresh: Vec::new(),
        table: Table::default(),
    };
    run.parts_1_to_3()?;
    run.part4()?;
    let load1 = loadavg();
    println!(
        "Engine benchmark ({}), bench dir on {fs}; each measurement {REPS} runs, median shown; \
         page cache dropped before read passes and opens: {}; the 64 KiB-chunk store of parts \
         1-3 was written over with zeros after format (a store in use; one part-2 row uses fresh \
         stores); load average at start {load0}, \
         at end {load1}; total {:.0} s.\n",
        if run.cfg.quick { "--quick" } else { "full" },
        if run.dropped { "yes" } else { "no (not root)" },
        started.elapsed().as_secs_f64()
    );
    run.table.print();
    drop(tmp);
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("--child-build") => child_build(&args[1..]),
        Some("--child-open") => child_open(&args[1..]),
        _ => {
            let mut quick = false;
            let mut dir = None;
            let mut it = args.iter();
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--quick" => quick = true,
                    "--dir" => dir = Some(PathBuf::from(it.next().unwrap_or_else(|| usage()))),
                    _ => usage(),
                }
            }
            run(quick, dir)
        }
    };
    if let Err(e) = result {
        eprintln!("engine_bench: {e}");
        std::process::exit(1);
    }
}
