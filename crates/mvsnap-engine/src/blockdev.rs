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
