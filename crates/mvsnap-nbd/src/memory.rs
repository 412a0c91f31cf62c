//! An in-memory [`Export`] and [`ExportRegistry`], for tests, fuzzing and the `memserver`
//! example. Storage is a map of allocated 4 KiB blocks (missing blocks read as zeroes and
//! are reported as holes), so huge sparse exports cost only what is written.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::{Export, ExportInfo, ExportRegistry, Extent, OpenError, STATE_HOLE, STATE_ZERO};

/// Allocation granularity of [`MemExport`].
pub const MEM_BLOCK: u64 = 4096;

/// A sparse in-memory volume.
pub struct MemExport {
    size: u64,
    read_only: bool,
    blocks: RwLock<BTreeMap<u64, Box<[u8]>>>,
    flushes: AtomicU64,
}

impl MemExport {
    /// An empty (all-hole) writable export of `size` bytes.
    pub fn new(size: u64) -> Self {
        MemExport {
            size,
            read_only: false,
            blocks: RwLock::new(BTreeMap::new()),
            flushes: AtomicU64::new(0),
        }
    }

    /// The same, read-only.
    pub fn new_read_only(size: u64) -> Self {
        MemExport {
            read_only: true,
            ..Self::new(size)
        }
    }

    /// Write bytes directly (bypassing `read_only`), to set up contents in tests.
    pub fn fill(&self, offset: u64, data: &[u8]) {
        self.store(offset, data);
    }

    /// The whole image as one buffer (for checksums in tests; mind the size).
    pub fn contents(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.size as usize];
        self.load(0, &mut v);
        v
    }

    /// Indexes of allocated 4 KiB blocks, ascending.
    pub fn allocated_blocks(&self) -> Vec<u64> {
        self.blocks.read().keys().copied().collect()
    }

    /// How many times `flush` was called (so tests can see FUA/FLUSH reach the export).
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// Split `[offset, offset+len)` into per-block pieces: (block index, offset within the
    /// block, piece length, offset within the range).
    fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, usize, usize, usize)> {
        let end = offset + len;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let block = pos / MEM_BLOCK;
            let within = (pos % MEM_BLOCK) as usize;
            let n = (MEM_BLOCK - within as u64).min(end - pos) as usize;
            let item = (block, within, n, (pos - offset) as usize);
            pos += n as u64;
            Some(item)
        })
    }

    fn load(&self, offset: u64, buf: &mut [u8]) {
        let blocks = self.blocks.read();
        for (b, within, n, at) in Self::pieces(offset, buf.len() as u64) {
            let dst = &mut buf[at..at + n];
            match blocks.get(&b) {
                Some(data) => dst.copy_from_slice(&data[within..within + n]),
                None => dst.fill(0),
            }
        }
    }

    fn store(&self, offset: u64, data: &[u8]) {
        let mut blocks = self.blocks.write();
        for (b, within, n, at) in Self::pieces(offset, data.len() as u64) {
            let block = blocks
                .entry(b)
                .or_insert_with(|| vec![0u8; MEM_BLOCK as usize].into_boxed_slice());
            block[within..within + n].copy_from_slice(&data[at..at + n]);
        }
    }

    /// Zero a range: whole blocks are dropped when `dealloc`, else allocated and zeroed;
    /// partial blocks are zeroed in place.
    fn zero(&self, offset: u64, len: u64, dealloc: bool) {
        let mut blocks = self.blocks.write();
        for (b, within, n, _) in Self::pieces(offset, len) {
            if n as u64 == MEM_BLOCK && dealloc {
                blocks.remove(&b);
            } else if let Some(block) = blocks.get_mut(&b) {
                block[within..within + n].fill(0);
            } else if !dealloc {
                blocks.insert(b, vec![0u8; MEM_BLOCK as usize].into_boxed_slice());
            }
        }
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    fn check_writable(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        self.check(offset, len)
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn can_multi_conn(&self) -> bool {
        // One shared map and nothing volatile: every connection sees every write at once.
        true
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.load(offset, buf);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.check_writable(offset, data.len() as u64)?;
        self.store(offset, data);
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn trim(&self, offset: u64, length: u64) -> io::Result<()> {
        self.check_writable(offset, length)?;
        self.zero(offset, length, true);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, length: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        self.check_writable(offset, length)?;
        self.zero(offset, length, may_trim);
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        self.check(offset, length)?;
        let end = offset + length;
        let blocks = self.blocks.read();
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < 1024 {
            let b = pos / MEM_BLOCK;
            let (flags, run_end) = if blocks.contains_key(&b) {
                // Data: extend over consecutive allocated blocks.
                let mut nb = b + 1;
                while blocks.contains_key(&nb) && nb * MEM_BLOCK < end {
                    nb += 1;
                }
                (0, nb * MEM_BLOCK)
            } else {
                // Hole: up to the next allocated block.
                let next = blocks.range(b + 1..).next().map(|(k, _)| *k * MEM_BLOCK);
                (STATE_HOLE | STATE_ZERO, next.unwrap_or(u64::MAX))
            };
            let run_end = run_end.min(end);
            out.push(Extent {
                length: run_end - pos,
                flags,
            });
            pos = run_end;
        }
        Ok(out)
    }
}

/// A fixed set of named [`MemExport`]s.
#[derive(Default)]
pub struct MemRegistry {
    exports: Vec<(ExportInfo, Arc<MemExport>)>,
}

impl MemRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add an export; returns it so the caller can inspect its contents.
    pub fn add(&mut self, name: &str, description: &str, export: MemExport) -> Arc<MemExport> {
        let export = Arc::new(export);
        self.exports.push((
            ExportInfo {
                name: name.to_owned(),
                description: description.to_owned(),
            },
            export.clone(),
        ));
        export
    }
}

impl ExportRegistry for MemRegistry {
    fn list(&self) -> Vec<ExportInfo> {
        self.exports.iter().map(|(i, _)| i.clone()).collect()
    }

    fn open(&self, name: &str) -> Result<Arc<dyn Export>, OpenError> {
        self.exports
            .iter()
            .find(|(i, _)| i.name == name)
            .map(|(_, e)| e.clone() as Arc<dyn Export>)
            .ok_or(OpenError::NotFound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_zero_and_holes() {
        let e = MemExport::new(64 * 1024);
        e.write(1000, &[0xab; 5000], false).unwrap();
        let mut buf = vec![0xffu8; 8192];
        e.read(0, &mut buf).unwrap();
        assert!(buf[..1000].iter().all(|&b| b == 0));
        assert!(buf[1000..6000].iter().all(|&b| b == 0xab));
        assert!(buf[6000..].iter().all(|&b| b == 0));
        assert_eq!(e.allocated_blocks(), vec![0, 1]);

        let ext = e.block_status(0, 64 * 1024).unwrap();
        assert_eq!(
            ext,
            vec![
                Extent {
                    length: 8192,
                    flags: 0
                },
                Extent {
                    length: 56 * 1024,
                    flags: STATE_HOLE | STATE_ZERO
                },
            ]
        );

        // Trim drops whole blocks and zeroes partial ones.
        e.trim(2048, 8192 - 2048).unwrap();
        assert_eq!(e.allocated_blocks(), vec![0]);
        e.read(0, &mut buf).unwrap();
        assert!(buf[1000..2048].iter().all(|&b| b == 0xab));
        assert!(buf[2048..].iter().all(|&b| b == 0));

        // NO_HOLE zeroing allocates.
        e.write_zeroes(16384, 8192, false, true).unwrap();
        assert_eq!(e.allocated_blocks(), vec![0, 4, 5]);
        assert_eq!(e.flush_count(), 1);
    }

    #[test]
    fn block_status_from_middle_of_hole_and_limits() {
        let e = MemExport::new(1 << 40);
        e.fill(1 << 30, &[1; 4096]);
        let ext = e.block_status(4096, u64::from(u32::MAX)).unwrap();
        assert_eq!(
            ext[0],
            Extent {
                length: (1 << 30) - 4096,
                flags: 3
            }
        );
        assert_eq!(
            ext[1],
            Extent {
                length: 4096,
                flags: 0
            }
        );
        assert_eq!(
            ext.iter().map(|e| e.length).sum::<u64>(),
            u64::from(u32::MAX)
        );
        assert!(e.block_status(1 << 40, 1).is_err());
        let ro = MemExport::new_read_only(4096);
        assert_eq!(
            ro.write(0, &[1], false).unwrap_err().raw_os_error(),
            Some(libc::EPERM)
        );
    }
}
