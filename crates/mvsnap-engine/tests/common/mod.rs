//! Helpers shared by the engine's integration tests (model, crash, bad input); those of every
//! suite (image comparison, patterns) come from mvsnap-testkit.
#![allow(dead_code)]

pub mod track;

use std::path::{Path, PathBuf};

use mvsnap_engine::crashsim::SimMachine;
use mvsnap_engine::{FormatOptions, OpenOptions, Store};
pub use mvsnap_testkit::*;

/// Deterministic pseudo-random bytes: the testkit's generator, its seed mixed once more so that
/// a seed gives the bytes it always gave here (crash cases are replayed by seed).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    pattern_bytes(
        seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xd1b5_4a32_d192_ed03,
        len,
    )
}

/// A 4 KiB block as version `v` wrote it: every 8 bytes say (block, version, word), so a
/// wrong read says which version it found ([`assert_versions`]).
pub fn versioned_block(b: u64, v: u64) -> Vec<u8> {
    (0..4096u64 / 8)
        .flat_map(|i| (b << 40 ^ v << 20 ^ i).to_le_bytes())
        .collect()
}

/// Blocks `0..blocks`, each as version `v` wrote it.
pub fn versioned_image(blocks: u64, v: u64) -> Vec<u8> {
    (0..blocks).flat_map(|b| versioned_block(b, v)).collect()
}

/// `got` is blocks `0..blocks`, block `b` as version `want(b)` wrote it; a failure names
/// the block and the version it holds.
pub fn assert_versions(what: &str, got: &[u8], blocks: u64, want: impl Fn(u64) -> u64) {
    const BS: usize = 4096;
    assert_eq!(got.len() as u64, blocks * BS as u64, "{what}: size");
    for b in 0..blocks {
        let at = b as usize * BS;
        if got[at..at + BS] != versioned_block(b, want(b))[..] {
            let v = u64::from_le_bytes(got[at..at + 8].try_into().unwrap()) >> 20 & 0xfffff;
            panic!("{what}: block {b} holds version {v}, not {}", want(b));
        }
    }
}

/// Volume `name` of `s` reads as [`assert_versions`] says (`when`: in the failure message).
pub fn assert_volume_versions(
    s: &Store,
    name: &str,
    when: &str,
    blocks: u64,
    want: impl Fn(u64) -> u64,
) {
    assert_versions(&format!("{name} {when}"), &read_all(s, name), blocks, want);
}

/// xorshift: random block numbers, the same for a seed every run.
pub fn xorshift(r: &mut u64) -> u64 {
    *r ^= *r << 13;
    *r ^= *r >> 7;
    *r ^= *r << 17;
    *r
}

/// The whole content of a volume.
pub fn read_all(s: &Store, name: &str) -> Vec<u8> {
    try_read_all(s, name).unwrap_or_else(|e| panic!("read {name}: {e}"))
}

pub fn try_read_all(s: &Store, name: &str) -> mvsnap_engine::Result<Vec<u8>> {
    let v = s.volume(name)?;
    let mut buf = vec![0u8; v.size() as usize];
    v.read_at(0, &mut buf)?;
    Ok(buf)
}

#[track_caller]
pub fn assert_clean(s: &Store, when: &str) {
    let r = s.check();
    assert!(
        r.is_clean(),
        "check after {when} is not clean: {:#?}",
        r.errors
    );
}

/// A store of `size` bytes. `_io_unit` is the tests' request granularity (format v1 made it
/// the chunk size; v2 allocates 4 KiB blocks whatever the requests).
pub fn format_opts(size: u64, _io_unit: u32) -> FormatOptions {
    FormatOptions {
        size: Some(size),
        ..Default::default()
    }
}

/// A store and origins on real files in `dir`. Returns the store path and origin paths.
pub fn real_setup(
    dir: &Path,
    store_opts: &FormatOptions,
    origins: &[(&str, Vec<u8>)],
) -> (PathBuf, Vec<PathBuf>) {
    let store = dir.join("store");
    Store::format(&store, store_opts).unwrap();
    let mut paths = Vec::new();
    let s = Store::open(&store, &OpenOptions::default()).unwrap();
    for (id, content) in origins {
        let p = dir.join(id);
        std::fs::write(&p, content).unwrap();
        s.add_origin(&p, Some(id)).unwrap();
        paths.push(p);
    }
    s.close().unwrap();
    (store, paths)
}

/// A store and origins on a simulated machine; the origins are bound under their names.
pub fn sim_setup(
    dir: &Path,
    store_opts: &FormatOptions,
    origins: &[(&str, Vec<u8>)],
) -> (SimMachine, Store) {
    sim_setup_with(dir, store_opts, &OpenOptions::default(), origins)
}

/// [`sim_setup`], opening the store with `open_opts`.
pub fn sim_setup_with(
    dir: &Path,
    store_opts: &FormatOptions,
    open_opts: &OpenOptions,
    origins: &[(&str, Vec<u8>)],
) -> (SimMachine, Store) {
    let m = SimMachine::new();
    m.add_store(&dir.join("store"), store_opts).unwrap();
    let s = m.open_store(open_opts).unwrap();
    for (id, content) in origins {
        let p = dir.join(id);
        m.add_origin_file(&p, content.clone()).unwrap();
        s.add_origin(&p, Some(id)).unwrap();
    }
    (m, s)
}

/// Open options for a crash case: in half of them a small overlay of preserved entries (the
/// default holds thousands, more than these small stores ever preserve), so the fold of
/// buffered entries into the index meets power cuts too.
pub fn crash_open_opts(rng: &mut impl rand::Rng) -> OpenOptions {
    OpenOptions {
        overlay_entries: rng.random_bool(0.5).then(|| rng.random_range(1..48)),
        ..OpenOptions::default()
    }
}

/// The seeds of a crash test's cases: `MVSNAP_CRASH_SEED=N` replays one case,
/// `MVSNAP_CRASH_CASES=N` runs N cases instead of the default `n` (for long soaks).
pub fn seeds(base: u64, n: u64) -> Vec<u64> {
    match std::env::var("MVSNAP_CRASH_SEED") {
        Ok(s) => vec![s.parse().expect("MVSNAP_CRASH_SEED is a number")],
        Err(_) => {
            let n = std::env::var("MVSNAP_CRASH_CASES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(n);
            (base..base + n).collect()
        }
    }
}

/// A crash case's random geometry: a chunk size and one or two origins `o0`, `o1` of varied
/// sizes with pattern content, drawn from `rng` in a fixed order (a seed always gives the same
/// case).
pub fn random_origins(rng: &mut impl rand::Rng, seed: u64) -> (u32, Vec<(String, Vec<u8>)>) {
    let chunk = [4096u32, 16384, 65536][rng.random_range(0..3)];
    let norigins = if rng.random_bool(0.3) { 2 } else { 1 };
    let sizes = [256usize << 10, 512 << 10, (640 << 10) + 4096, 1 << 20];
    let origins = (0..norigins)
        .map(|i| {
            let size = sizes[rng.random_range(0..sizes.len())];
            (format!("o{i}"), pattern(seed * 7 + i, size))
        })
        .collect();
    (chunk, origins)
}
