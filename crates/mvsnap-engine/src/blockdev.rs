//! The block-I/O seam: the only way the engine touches a device. Tests swap in a backend that
//! simulates power loss (see `crashsim`).

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A device or file the engine reads and writes by offset. Implementations must be safe to call
/// from many threads at once (pread/pwrite semantics).
// `len` is a device size that can fail; an `is_empty` would mean nothing for a device.
#[allow(clippy::len_without_is_empty)]
pub trait BlockDev: Send + Sync {
    fn len(&self) -> io::Result<u64>;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make every completed write durable (fdatasync).
    fn sync(&self) -> io::Result<()>;
    /// Grow a file to `len` bytes with allocated space (fallocate); block devices refuse.
    fn grow(&self, len: u64) -> io::Result<()>;
    /// Whether `grow` can work (a regular file).
    fn can_grow(&self) -> bool;
    /// Tell the device a range holds nothing (punch a hole); best effort.
    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// Make a range read as zeros by freeing its space (punch a hole, keeping the size). Unlike
    /// `discard` it must not pretend: devices that cannot say `Unsupported`, and the caller
    /// writes zeros instead.
    fn punch(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Whether `punch` is expected to work (it may still say `Unsupported`: a file system
    /// without hole punching; then zeros are written).
    fn can_punch(&self) -> bool {
        false
    }
    /// Which parts of a range hold data and which are holes reading as zeros. The default,
    /// for devices that cannot tell, is all data.
    fn allocation(&self, _offset: u64, len: u64) -> io::Result<Vec<crate::types::Extent>> {
        Ok(vec![crate::types::Extent {
            length: len,
            zero: false,
        }])
    }
    /// Forget cached pages so later reads come from the device (after a failed fsync the page
    /// cache may hold data the device never got). The default, for devices without a cache of
    /// their own, does nothing.
    fn drop_cache(&self) -> io::Result<()> {
        Ok(())
    }
    /// Where this device lives, for error messages.
    fn path(&self) -> &Path;
}

/// Opens origins (and the store) by path; tests substitute one that hands out simulated devices.
pub trait DeviceOpener: Send + Sync {
    fn open(&self, path: &Path, writable: bool) -> io::Result<Arc<dyn BlockDev>>;
}

/// A regular file or a block device, used through pread/pwrite.
pub struct FileDev {
    file: File,
    path: PathBuf,
    is_block: bool,
    /// Freed blocks of a block device go back to it with BLKDISCARD (see `OpenOptions`).
    discard: bool,
}

impl FileDev {
    pub fn open(path: &Path, writable: bool) -> io::Result<FileDev> {
        let file = FsOpenOptions::new().read(true).write(writable).open(path)?;
        let is_block = file.metadata()?.file_type().is_block_device();
        Ok(FileDev {
            file,
            path: path.to_path_buf(),
            is_block,
            discard: false,
        })
    }

    /// Give freed blocks of a block device back with BLKDISCARD (a file always punches).
    pub fn discarding(mut self, on: bool) -> FileDev {
        self.discard = on;
        self
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

impl BlockDev for FileDev {
    fn len(&self) -> io::Result<u64> {
        if self.is_block {
            use std::io::{Seek, SeekFrom};
            // The size of a block device is where SEEK_END lands; metadata says 0.
            (&self.file).seek(SeekFrom::End(0))
        } else {
            Ok(self.file.metadata()?.len())
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn grow(&self, len: u64) -> io::Result<()> {
        if self.is_block {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a block device cannot grow",
            ));
        }
        let cur = self.file.metadata()?.len();
        if len <= cur {
            return Ok(());
        }
        crate::sys::fallocate(&self.file, cur, len - cur)
    }

    fn can_grow(&self) -> bool {
        !self.is_block
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.is_block {
            return Ok(());
        }
        crate::sys::punch_hole(&self.file, offset, len)
    }

    fn drop_cache(&self) -> io::Result<()> {
        crate::sys::drop_page_cache(&self.file)
    }

    fn can_punch(&self) -> bool {
        !self.is_block || self.discard
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        match (self.is_block, self.discard) {
            (false, _) => crate::sys::punch_hole_strict(&self.file, offset, len),
            (true, true) => crate::sys::blk_discard(&self.file, offset, len),
            (true, false) => Err(io::ErrorKind::Unsupported.into()),
        }
    }

    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<crate::types::Extent>> {
        if self.is_block {
            return Ok(vec![crate::types::Extent {
                length: len,
                zero: false,
            }]);
        }
        crate::sys::allocation(&self.file, offset, len)
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// A device whose syncs, once one failed, all fail: the first failure stops it.
///
/// Linux reports a failed fsync once per open file and drops the dirty pages it covered, so
/// the next fsync on the same file succeeds although those writes never reached the disk. With
/// several threads syncing one device (the group commit, the tree committer, copy-outs), a
/// thread whose writes were dropped by *another* thread's failed sync would see its own sync
/// succeed and vouch for them: a commit header made durable over nodes that are not, a flush
/// acknowledged over a lost journal record. So syncs run one at a time, and after a failure
/// every later one reports it too, until the device is opened again.
pub struct FailStop {
    dev: Arc<dyn BlockDev>,
    /// The first failed sync's error, set before the lock is released.
    failed: parking_lot::Mutex<Option<String>>,
}

impl FailStop {
    pub fn wrap(dev: Arc<dyn BlockDev>) -> Arc<dyn BlockDev> {
        Arc::new(FailStop {
            dev,
            failed: parking_lot::Mutex::new(None),
        })
    }
}

impl BlockDev for FailStop {
    fn len(&self) -> io::Result<u64> {
        self.dev.len()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.dev.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.dev.write_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        // Held across the sync: a sync that starts after a failed one must see the failure,
        // and one running beside it could return first.
        let mut failed = self.failed.lock();
        if let Some(first) = failed.as_ref() {
            return Err(io::Error::other(format!(
                "an earlier sync of this device failed ({first}); what was written since \
                 may be lost"
            )));
        }
        self.dev
            .sync()
            .inspect_err(|e| *failed = Some(e.to_string()))
    }

    fn grow(&self, len: u64) -> io::Result<()> {
        self.dev.grow(len)
    }

    fn can_grow(&self) -> bool {
        self.dev.can_grow()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.dev.discard(offset, len)
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        self.dev.punch(offset, len)
    }

    fn can_punch(&self) -> bool {
        self.dev.can_punch()
    }

    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<crate::types::Extent>> {
        self.dev.allocation(offset, len)
    }

    fn drop_cache(&self) -> io::Result<()> {
        self.dev.drop_cache()
    }

    fn path(&self) -> &Path {
        self.dev.path()
    }
}

/// Opens real files and block devices.
pub struct FileOpener;

impl DeviceOpener for FileOpener {
    /// An origin is locked while a store has it open (exclusively to write it), so no other
    /// store or mvsnap process writes it behind this one's snapshots; the store itself is
    /// locked the same way, so it can never be opened as an origin of itself.
    fn open(&self, path: &Path, writable: bool) -> io::Result<Arc<dyn BlockDev>> {
        let dev = FileDev::open(path, writable)?;
        if !try_lock(dev.file(), writable)? {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                "in use by another mvsnap store or process (it holds a lock on it)",
            ));
        }
        Ok(Arc::new(dev))
    }
}

/// Exclusive advisory lock on the store file so two processes never write one store.
pub(crate) fn try_lock(file: &File, exclusive: bool) -> io::Result<bool> {
    crate::sys::flock(file.as_raw_fd(), exclusive)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crashsim::SimDisk;

    /// A device with only what every device must have (no grow, punch or allocation map).
    struct Plain(parking_lot::Mutex<Vec<u8>>, PathBuf);

    impl BlockDev for Plain {
        fn len(&self) -> io::Result<u64> {
            Ok(self.0.lock().len() as u64)
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            let o = offset as usize;
            buf.copy_from_slice(&self.0.lock()[o..o + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            let o = offset as usize;
            self.0.lock()[o..o + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn sync(&self) -> io::Result<()> {
            Ok(())
        }
        fn grow(&self, _len: u64) -> io::Result<()> {
            Err(io::ErrorKind::Unsupported.into())
        }
        fn can_grow(&self) -> bool {
            false
        }
        fn path(&self) -> &Path {
            &self.1
        }
    }

    /// Everything but `sync` is the device's own answer, whatever the device.
    #[test]
    fn fail_stop_passes_everything_else_through() {
        let sim = Arc::new(SimDisk::new("/sim/pass", vec![7u8; 8192], true));
        let dev = FailStop::wrap(sim.clone());
        assert_eq!(dev.path(), Path::new("/sim/pass"));
        assert!(dev.can_grow() && dev.can_punch());
        dev.grow(16384).unwrap();
        assert_eq!(dev.len().unwrap(), 16384);
        dev.write_at(&[9u8; 4096], 4096).unwrap();
        let mut buf = [0u8; 4096];
        dev.read_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, [9u8; 4096]);
        dev.discard(4096, 4096).unwrap();
        sim.read_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, [0u8; 4096], "discard reached the device");
        dev.write_at(&[5u8; 4096], 0).unwrap();
        dev.punch(0, 4096).unwrap();
        sim.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [0u8; 4096], "punch reached the device");
        assert_eq!(
            dev.allocation(0, 16384).unwrap(),
            sim.allocation(0, 16384).unwrap()
        );
        dev.drop_cache().unwrap();

        let plain = FailStop::wrap(Arc::new(Plain(
            parking_lot::Mutex::new(vec![1u8; 4096]),
            PathBuf::from("/plain"),
        )));
        assert!(!plain.can_grow() && !plain.can_punch());
        assert!(plain.grow(8192).is_err());
        assert_eq!(
            plain.punch(0, 4096).unwrap_err().kind(),
            io::ErrorKind::Unsupported
        );
        let all_data = plain.allocation(0, 4096).unwrap();
        assert_eq!(all_data.len(), 1);
        assert!(!all_data[0].zero && all_data[0].length == 4096);
    }

    #[test]
    fn after_a_failed_sync_every_sync_fails() {
        let disk = Arc::new(SimDisk::new("/sim/failstop", vec![0u8; 8192], false));
        let dev = FailStop::wrap(disk.clone());
        dev.write_at(&[1u8; 4096], 0).unwrap();
        dev.sync().unwrap();
        dev.write_at(&[2u8; 4096], 4096).unwrap();
        disk.fail_sync_after(1);
        dev.sync().expect_err("the planted failure");
        // The disk itself would now report success: the dropped write is gone silently.
        dev.write_at(&[3u8; 4096], 0).unwrap();
        let again = dev.sync().expect_err("a later sync").to_string();
        assert!(
            again.contains("an earlier sync of this device failed"),
            "{again}"
        );
        disk.sync().expect("the disk alone says all is well");
        assert_eq!(
            disk.durable_image()[4096],
            0,
            "the dropped write never became durable"
        );
    }
}
