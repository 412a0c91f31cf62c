//! The few syscalls std does not wrap. Every `unsafe` block of the engine lives here.

use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};

/// Allocate `len` bytes at `offset`, growing the file.
pub fn fallocate(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a valid open fd; no memory is passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, offset as i64, len as i64) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
        // Filesystems without fallocate (tmpfs on old kernels): extend sparsely instead.
        return file.set_len(offset + len);
    }
    Err(err)
}

/// Free the space behind a range of a file; a no-op where the filesystem cannot.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    match punch_hole_strict(file, offset, len) {
        Err(e) if e.kind() == io::ErrorKind::Unsupported => Ok(()),
        r => r,
    }
}

/// Tell a block device that a range is unused (BLKDISCARD): a thin LUN or an SSD takes the
/// space back. What the range reads afterwards is up to the device.
pub fn blk_discard(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // _IO(0x12, 119) in <linux/fs.h>.
    const BLKDISCARD: libc::c_ulong = 0x1277;
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKDISCARD reads two u64 (start, length) from the pointer, which points at a
    // live array of exactly that for the duration of the call; the fd is valid and open.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKDISCARD, range.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Free the space behind a range of a file, so it reads as zeros; `Unsupported` where the file
/// system cannot.
pub fn punch_hole_strict(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a valid open fd; no memory is passed.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as i64,
            len as i64,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Err(io::ErrorKind::Unsupported.into()),
        _ => Err(err),
    }
}

/// Drop a file's clean cached pages, so later reads come from the device. After a failed
/// writeback Linux marks the lost pages clean: they still read as the new data until dropped.
pub fn drop_page_cache(file: &File) -> io::Result<()> {
    // Dirty pages are not dropped by DONTNEED: write them first.
    file.sync_data()?;
    // SAFETY: plain syscall on a valid open fd; no memory is passed.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    match rc {
        0 => Ok(()),
        // Not every file supports advice (pipes, some FUSE files): nothing cached to drop.
        libc::ESPIPE | libc::EINVAL => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// flock(LOCK_EX|LOCK_NB) or LOCK_SH; Ok(false) when someone else holds it.
pub fn flock(fd: RawFd, exclusive: bool) -> io::Result<bool> {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    } | libc::LOCK_NB;
    // SAFETY: plain syscall on a valid open fd; no memory is passed.
    let rc = unsafe { libc::flock(fd, op) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(false);
    }
    Err(err)
}

/// Data and hole extents of `[offset, offset+len)` of a file, by SEEK_DATA/SEEK_HOLE.
pub fn allocation(file: &File, offset: u64, len: u64) -> io::Result<Vec<crate::types::Extent>> {
    let fd = file.as_raw_fd();
    let end = offset + len;
    let mut out: Vec<crate::types::Extent> = Vec::new();
    let mut push = |length: u64, zero: bool| match out.last_mut() {
        Some(l) if l.zero == zero => l.length += length,
        _ => out.push(crate::types::Extent { length, zero }),
    };
    let mut pos = offset;
    while pos < end {
        // SAFETY: plain syscall on a valid open fd; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos as i64, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                // No data after pos: the rest is a hole.
                Some(libc::ENXIO) => {
                    push(end - pos, true);
                    break;
                }
                // The filesystem cannot tell: say data.
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                    push(end - pos, false);
                    break;
                }
                _ => return Err(err),
            }
        }
        let data = (data as u64).min(end);
        if data > pos {
            push(data - pos, true);
            pos = data;
            continue;
        }
        // SAFETY: plain syscall on a valid open fd; no memory is passed.
        let hole = unsafe { libc::lseek(fd, pos as i64, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let hole = (hole as u64).min(end).max(pos + 1);
        push(hole - pos, false);
        pos = hole;
    }
    Ok(out)
}

fn c_path(path: &std::path::Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// An extended attribute's value; `None` when the file has none of that name, or the file
/// system keeps none (then nothing can be recorded there either).
pub fn get_xattr(path: &std::path::Path, name: &str) -> io::Result<Option<Vec<u8>>> {
    let (p, n) = (c_path(path)?, std::ffi::CString::new(name)?);
    let mut buf = vec![0u8; 256];
    // SAFETY: p and n are NUL-terminated; buf is valid for buf.len() bytes.
    let rc = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if rc >= 0 {
        buf.truncate(rc as usize);
        return Ok(Some(buf));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENODATA) | Some(libc::ENOTSUP) => Ok(None),
        _ => Err(err),
    }
}

/// Set an extended attribute; Ok(false) where the file system keeps none.
pub fn set_xattr(path: &std::path::Path, name: &str, value: &[u8]) -> io::Result<bool> {
    let (p, n) = (c_path(path)?, std::ffi::CString::new(name)?);
    // SAFETY: p and n are NUL-terminated; value is valid for value.len() bytes.
    let rc = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENOTSUP) | Some(libc::EPERM) => Ok(false),
        _ => Err(err),
    }
}

/// Remove an extended attribute if it is there.
pub fn remove_xattr(path: &std::path::Path, name: &str) -> io::Result<()> {
    let (p, n) = (c_path(path)?, std::ffi::CString::new(name)?);
    // SAFETY: p and n are NUL-terminated.
    let rc = unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENODATA) | Some(libc::ENOTSUP) | Some(libc::ENOENT) => Ok(()),
        _ => Err(err),
    }
}
