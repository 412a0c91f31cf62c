//! Deleting a writable snapshot that wrote N blocks (issue 8: no writer waits for work
//! proportional to the index), while a writer times its 4 KiB writes into another writable
//! snapshot of the same origin. Results: docs/BENCHMARKS.md.
//!
//! ```text
//! cargo run --release -p mvsnap-engine --example writable_delete -- --dir DIR [--blocks 512K]
//! ```
//!
//! An origin of N x 4 KiB (sparse: its content does not matter here), writable snapshots `w`
//! and `v`; `w` written whole with 1 MiB writes (N keys of its own); a commit; then `w`
//! deleted while a thread writes 4 KiB blocks into `v` at random: the delete's time, the time
//! until its space is reclaimed, and the writer's p99.99 and longest write meanwhile.

mod common;

use std::error::Error;
use std::path::PathBuf;

use common::{parse_count, MIB};
use mvsnap_engine::OpenOptions;

type R<T> = Result<T, Box<dyn Error>>;

const BLOCK: u64 = 4096;

fn main() -> R<()> {
    let mut dir: Option<PathBuf> = None;
    let mut n = 512 * 1024;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dir" => dir = args.next().map(PathBuf::from),
            "--blocks" => n = parse_count(&args.next().expect("a count")),
            _ => return Err(format!("unknown argument {a}").into()),
        }
    }
    let work = dir.ok_or("--dir DIR is required")?.join("writable_delete");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let (origin, store) = (work.join("origin.img"), work.join("store.img"));
    let size = n * BLOCK;
    std::fs::File::create(&origin)?.set_len(size)?;
    let s = common::store_with_origin(
        &store,
        size + size / 4 + 512 * MIB,
        &origin,
        &OpenOptions::default(),
    )?;
    for tag in ["w", "v"] {
        s.create_snapshot(&["o0"], Some(tag), "", true)?;
    }
    let w = s.volume("o0@w")?;
    let data = vec![0x5au8; MIB as usize];
    for off in (0..size).step_by(MIB as usize) {
        w.write_at(off, &data, false)?;
    }
    w.flush()?;
    drop(w);
    s.checkpoint()?;
    let mappings = s.info().mappings;
    let d = common::delete_under_load(&s, "o0@w", n, "o0@v", n)?;
    println!(
        "writable delete: {mappings} mappings; delete_ms={:.1} reclaimed_after_ms={:.0} {}",
        d.delete_ms,
        d.reclaimed_after_ms,
        d.writer_summary()
    );
    s.close()?;
    std::fs::remove_dir_all(&work)?;
    Ok(())
}
