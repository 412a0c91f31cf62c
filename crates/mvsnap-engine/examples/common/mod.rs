//! What the scale examples share: an origin full of data and their size arguments.

use std::os::unix::fs::FileExt;
use std::path::Path;

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
