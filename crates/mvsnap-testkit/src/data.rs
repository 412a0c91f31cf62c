//! Test data: seeded pseudo-random bytes, SHA-256, and readable image comparisons.

use std::io::Read;
use std::path::Path;

use sha2::Digest;

/// splitmix64: small, seedable, good enough for test data and random moments.
pub struct Rng(pub u64);

impl Rng {
    /// Seeded from `MVSNAP_TEST_SEED` if set, else from the clock; the seed is printed so a
    /// failure can be replayed.
    pub fn from_env(what: &str) -> Rng {
        let seed = std::env::var("MVSNAP_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("{what}: seed {seed} (MVSNAP_TEST_SEED={seed} replays it)");
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Cheap enough to fill megabytes per test step.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Deterministic pseudo-random bytes: the same seed always gives the same bytes.
pub fn pattern_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng(seed).fill(&mut v);
    v
}

/// SHA-256, streaming: `update` in pieces, then `hex`.
#[derive(Default)]
pub struct Sha256(sha2::Sha256);

impl Sha256 {
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The digest in lower-case hex, as `sha256sum` prints it.
    pub fn hex(self) -> String {
        self.0
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

pub fn sha256(data: &[u8]) -> String {
    let mut h = Sha256::default();
    h.update(data);
    h.hex()
}

pub fn sha256_file(p: &Path) -> String {
    let mut f = std::fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let mut h = Sha256::default();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return h.hex();
        }
        h.update(&buf[..n]);
    }
}

/// Where two images first differ, for readable failures: `None` when equal.
pub fn first_diff(got: &[u8], want: &[u8]) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("length {} != expected {}", got.len(), want.len()));
    }
    let i = got.iter().zip(want).position(|(a, b)| a != b)?;
    let end = (i..got.len())
        .find(|&j| got[j] == want[j])
        .unwrap_or(got.len());
    let ndiff = got.iter().zip(want).filter(|(a, b)| a != b).count();
    Some(format!(
        "first difference at byte {i} (block {} of 4 KiB, 64 KiB chunk {}): got {:02x?}, \
         expected {:02x?}; a run of {} bytes; {ndiff} bytes differ in all",
        i / 4096,
        i / 65536,
        &got[i..(i + 8).min(end)],
        &want[i..(i + 8).min(end)],
        end - i
    ))
}

/// Panics, saying where, when `got` is not `want`.
#[track_caller]
pub fn assert_image(what: &str, got: &[u8], want: &[u8]) {
    if let Some(d) = first_diff(got, want) {
        panic!("{what}: content differs from the model: {d}");
    }
}
