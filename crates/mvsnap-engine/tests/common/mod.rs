//! Helpers shared by the engine's integration tests (model, crash, bad input).
#![allow(dead_code)]

pub mod track;

use std::path::{Path, PathBuf};

use mvsnap_engine::crashsim::SimMachine;
use mvsnap_engine::{FormatOptions, OpenOptions, Store};

/// Deterministic pseudo-random bytes (splitmix64): cheap enough to fill megabytes per step.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xd1b5_4a32_d192_ed03;
    while out.len() < len {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(len);
    out
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

/// Where two images first differ, for readable failures: `None` when equal.
pub fn first_diff(got: &[u8], want: &[u8]) -> Option<String> {
    if got == want {
        return None;
    }
    if got.len() != want.len() {
        return Some(format!("length {} != expected {}", got.len(), want.len()));
    }
    let i = got.iter().zip(want).position(|(a, b)| a != b)?;
    let end = (i..got.len())
        .find(|&j| got[j] == want[j])
        .unwrap_or(got.len());
    let ndiff = got.iter().zip(want).filter(|(a, b)| a != b).count();
    Some(format!(
        "first difference at byte {i} (block {}, 64K-chunk {}): got {:#04x}, expected {:#04x}; \
         run of {} bytes; {ndiff} bytes differ in all",
        i / 4096,
        i / 65536,
        got[i],
        want[i],
        end - i
    ))
}

#[track_caller]
pub fn assert_image(what: &str, got: &[u8], want: &[u8]) {
    if let Some(d) = first_diff(got, want) {
        panic!("{what}: content differs from the model: {d}");
    }
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
    let m = SimMachine::new();
    m.add_store(&dir.join("store"), store_opts).unwrap();
    let s = m.open_store(&OpenOptions::default()).unwrap();
    for (id, content) in origins {
        let p = dir.join(id);
        m.add_origin_file(&p, content.clone()).unwrap();
        s.add_origin(&p, Some(id)).unwrap();
    }
    (m, s)
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
