//! The engine's volumes as regular files over FUSE: `DIR/ORIGIN` and `DIR/ORIGIN@TAG`, so
//! `losetup` turns any of them into a block device on kernels without nbd or ublk.
//!
//! A front end like the NBD exports: it uses only the public [`Store`]/[`Volume`] API (read,
//! write, flush, trim, zero_range, block_status) and knows nothing of the on-disk format. Who
//! has a volume open is the caller's business ([`Gate`]): the daemon counts each open file as a
//! user, so a snapshot with an open file is not deleted.
//!
//! - The directory is asked of the store on every lookup and readdir, so snapshots appear and
//!   disappear as they are created and deleted (attributes are cached by the kernel for
//!   [`TTL`]).
//! - Files are opened with `FOPEN_DIRECT_IO`: no page cache in this layer (the loop device or
//!   the application above caches), so reads through NBD and through the file always agree,
//!   and requests reach us as big as the kernel allows ([`MAX_IO`], with `FUSE_MAX_PAGES`).
//! - `fsync`/`fdatasync` is a flush; `fallocate(PUNCH_HOLE)` a trim, `ZERO_RANGE` zero_range;
//!   `lseek(SEEK_DATA/SEEK_HOLE)` answers from the engine's block status.

mod alloc;
mod mount;

pub use alloc::HugeBufAlloc;
pub use mount::{clear_stale, loop_devices_on, Mount, MountOptions};

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};
use mvsnap_engine::{Store, Volume};
use parking_lot::{Mutex, RwLock};

/// How long the kernel may cache a name or attributes: a deleted snapshot's file can linger
/// that long in a cached lookup (opening it then fails), a new one shows up at once.
pub const TTL: Duration = Duration::from_secs(1);

/// The largest read or write we ask the kernel for (`max_write`, `max_readahead`, and through
/// `FUSE_MAX_PAGES` the largest direct read): 1 MiB, the kernel's default page limit
/// (`fs.fuse.max_pages_limit` = 256 pages).
pub const MAX_IO: u32 = 1 << 20;

/// Counts the users of a volume. `enter` is called on open, before the volume is resolved;
/// the guard it returns is dropped when the file is released. An error refuses the open (the
/// volume is being deleted).
pub trait Gate: Send + Sync + 'static {
    fn enter(&self, volume: &str) -> Result<Box<dyn UseGuard>, String>;
}

/// What [`Gate::enter`] returns, held while the file is open.
pub trait UseGuard: Send + Sync {
    /// A forced delete took the volume away: every later I/O on the file fails (EIO), as on
    /// a disk that was pulled. A file cannot be closed from this side.
    fn revoked(&self) -> bool {
        false
    }
}

impl UseGuard for () {}

/// No counting (tests, tools).
pub struct NoGate;

impl Gate for NoGate {
    fn enter(&self, _volume: &str) -> Result<Box<dyn UseGuard>, String> {
        Ok(Box::new(()))
    }
}

/// Inode numbers of the names seen so far; a name that disappears loses its number, so a
/// snapshot deleted and made again under the same name is a new file.
#[derive(Default)]
struct Inodes {
    by_name: HashMap<String, u64>,
    by_ino: HashMap<u64, String>,
    next: u64,
}

struct OpenFile {
    vol: Volume,
    /// Opened with O_SYNC/O_DSYNC: every write is durable before it is answered.
    sync: bool,
    user: Box<dyn UseGuard>,
}

/// The FUSE file system: a root directory holding one file per volume.
pub struct VolumeFs {
    store: Store,
    gate: Arc<dyn Gate>,
    inodes: Mutex<Inodes>,
    files: RwLock<HashMap<u64, Arc<OpenFile>>>,
    next_fh: AtomicU64,
    /// Every time stamp: the volumes have no times of their own here.
    t0: SystemTime,
    uid: u32,
    gid: u32,
}

const ROOT: u64 = 1;
const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;
const SEEK_DATA: i32 = 3;
const SEEK_HOLE: i32 = 4;
/// How much block status one lseek asks for at a time.
const SEEK_STEP: u64 = 1 << 30;

/// A volume name that cannot be a file name is not shown.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

/// The errno for an engine error; unexpected ones are logged (the caller only sees EIO).
fn errno(what: &str, name: &str, e: &mvsnap_engine::Error) -> Errno {
    use mvsnap_engine::Error as E;
    match e {
        E::ReadOnly(_) => Errno::EROFS,
        E::NotFound(_) => Errno::ENOENT,
        E::OutOfRange { .. } | E::InvalidArgument(_) => Errno::EINVAL,
        E::NoSpace(_) => Errno::ENOSPC,
        _ => {
            tracing::warn!("{what} {name}: {e}");
            Errno::EIO
        }
    }
}

thread_local! {
    /// One read buffer per FUSE thread, reused: no allocation (nor page faults) per read.
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl VolumeFs {
    pub fn new(store: Store, gate: Arc<dyn Gate>) -> VolumeFs {
        // SAFETY: getuid/getgid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        VolumeFs {
            store,
            gate,
            inodes: Mutex::new(Inodes {
                next: ROOT + 1,
                ..Default::default()
            }),
            files: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            t0: SystemTime::now(),
            uid,
            gid,
        }
    }

    fn ino_of(&self, name: &str) -> u64 {
        let mut i = self.inodes.lock();
        if let Some(&n) = i.by_name.get(name) {
            return n;
        }
        let n = i.next;
        i.next += 1;
        i.by_name.insert(name.to_string(), n);
        i.by_ino.insert(n, name.to_string());
        n
    }

    fn name_of(&self, ino: u64) -> Option<String> {
        self.inodes.lock().by_ino.get(&ino).cloned()
    }

    /// The volume is gone: its name gets a new number if it comes back.
    fn forget_name(&self, name: &str) {
        let mut i = self.inodes.lock();
        if let Some(n) = i.by_name.remove(name) {
            i.by_ino.remove(&n);
        }
    }

    /// The volumes that are files now, sorted by name.
    fn list(&self) -> Vec<(String, Volume)> {
        let mut names = self.store.volume_names();
        names.sort();
        names
            .into_iter()
            .filter(|n| valid_name(n))
            .filter_map(|n| self.store.volume(&n).ok().map(|v| (n, v)))
            .collect()
    }

    /// The volume behind a file's name, if it is still there.
    fn volume(&self, name: &str) -> Option<Volume> {
        match self.store.volume(name) {
            Ok(v) => Some(v),
            Err(_) => {
                self.forget_name(name);
                None
            }
        }
    }

    fn file_attr(&self, ino: u64, vol: &Volume) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size: vol.size(),
            blocks: vol.size().div_ceil(512),
            atime: self.t0,
            mtime: self.t0,
            ctime: self.t0,
            crtime: self.t0,
            kind: FileType::RegularFile,
            perm: if vol.read_only() { 0o444 } else { 0o644 },
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: vol.block_size().max(4096),
            flags: 0,
        }
    }

    fn root_attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo(ROOT),
            size: 0,
            blocks: 0,
            atime: self.t0,
            mtime: self.t0,
            ctime: self.t0,
            crtime: self.t0,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn file(&self, fh: FileHandle) -> Result<Arc<OpenFile>, Errno> {
        let f = self.files.read().get(&fh.0).cloned().ok_or(Errno::EBADF)?;
        if f.user.revoked() {
            // Deleted with --force: let go of the volume now, fail this and every later I/O.
            self.files.write().remove(&fh.0);
            return Err(Errno::EIO);
        }
        Ok(f)
    }

    /// `[offset, offset+len)` clipped to the volume; None if it starts at or past the end.
    fn clip(vol: &Volume, offset: u64, len: u64) -> Option<u64> {
        let size = vol.size();
        (offset < size).then(|| len.min(size - offset))
    }

    fn seek(&self, vol: &Volume, offset: i64, whence: i32) -> Result<i64, Errno> {
        let size = vol.size();
        let Ok(mut pos) = u64::try_from(offset) else {
            return Err(Errno::ENXIO);
        };
        if pos >= size {
            return Err(Errno::ENXIO);
        }
        let want_zero = whence == SEEK_HOLE;
        while pos < size {
            let len = SEEK_STEP.min(size - pos);
            let ext = vol
                .block_status(pos, len)
                .map_err(|e| errno("block status of", vol.name(), &e))?;
            if ext.is_empty() {
                break;
            }
            for e in ext {
                if e.zero == want_zero {
                    return Ok(pos as i64);
                }
                pos += e.length;
            }
        }
        // No data after offset: ENXIO; no hole: the end of the file is one.
        if want_zero {
            Ok(size as i64)
        } else {
            Err(Errno::ENXIO)
        }
    }
}

impl Filesystem for VolumeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let write = config.set_max_write(MAX_IO).err().map_or(MAX_IO, |max| {
            let _ = config.set_max_write(max);
            max
        });
        let readahead = config
            .set_max_readahead(MAX_IO)
            .err()
            .map_or(MAX_IO, |max| {
                let _ = config.set_max_readahead(max);
                max
            });
        // Async direct I/O lets the kernel keep several requests of one AIO submitter (the
        // loop device with --direct-io=on, fio's libaio) in flight; more background requests
        // than fuser's 16 so QD32 is not throttled.
        let async_dio = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO).is_ok();
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        tracing::info!(
            "FUSE: kernel ABI {:?}, max_write {write}, max_readahead {readahead}, async DIO {async_dio}",
            config.kernel_abi()
        );
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 != ROOT {
            return reply.error(Errno::ENOENT);
        }
        let Some(name) = name.to_str().filter(|n| valid_name(n)) else {
            return reply.error(Errno::ENOENT);
        };
        match self.volume(name) {
            Some(v) => {
                let ino = self.ino_of(name);
                reply.entry(&TTL, &self.file_attr(ino, &v), Generation(0))
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino.0 == ROOT {
            return reply.attr(&TTL, &self.root_attr());
        }
        if let Some(f) = fh.and_then(|fh| self.file(fh).ok()) {
            return reply.attr(&TTL, &self.file_attr(ino.0, &f.vol));
        }
        match self.name_of(ino.0).and_then(|n| self.volume(&n)) {
            Some(v) => reply.attr(&TTL, &self.file_attr(ino.0, &v)),
            None => reply.error(Errno::ENOENT),
        }
    }

    /// Sizes are the volumes' and fixed; only a "change" to the same size (and times, which
    /// are ignored) is accepted, so `truncate` or `chmod` fail with EPERM.
    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino.0 == ROOT {
            return reply.error(Errno::EPERM);
        }
        let Some(v) = self.name_of(ino.0).and_then(|n| self.volume(&n)) else {
            return reply.error(Errno::ENOENT);
        };
        if mode.is_some() || uid.is_some() || gid.is_some() {
            return reply.error(Errno::EPERM);
        }
        if let Some(s) = size {
            if s != v.size() {
                return reply.error(if v.read_only() {
                    Errno::EROFS
                } else {
                    Errno::EPERM
                });
            }
        }
        reply.attr(&TTL, &self.file_attr(ino.0, &v))
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some(name) = self.name_of(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        // Counted first, so a delete either sees this user or has already reserved the name.
        let user = match self.gate.enter(&name) {
            Ok(u) => u,
            Err(why) => {
                tracing::info!("open {name} refused: {why}");
                return reply.error(Errno::ENOENT);
            }
        };
        let vol = match self.store.volume(&name) {
            Ok(v) => v,
            Err(e) => {
                self.forget_name(&name);
                return reply.error(errno("open", &name, &e));
            }
        };
        if flags.acc_mode() != OpenAccMode::O_RDONLY && vol.read_only() {
            return reply.error(Errno::EROFS);
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let sync = flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0;
        self.files
            .write()
            .insert(fh, Arc::new(OpenFile { vol, sync, user }));
        reply.opened(
            FileHandle(fh),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let f = match self.file(fh) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        tracing::trace!(offset, size, "read");
        let Some(n) = Self::clip(&f.vol, offset, size as u64) else {
            return reply.data(&[]);
        };
        READ_BUF.with(|b| {
            let mut buf = b.borrow_mut();
            if buf.len() < n as usize {
                buf.resize(n as usize, 0);
            }
            let buf = &mut buf[..n as usize];
            match f.vol.read_at(offset, buf) {
                Ok(()) => reply.data(buf),
                Err(e) => reply.error(errno("read", f.vol.name(), &e)),
            }
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let f = match self.file(fh) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        if f.vol.read_only() {
            return reply.error(Errno::EROFS);
        }
        if data.is_empty() {
            return reply.written(0);
        }
        // A disk does not grow: what fits is written (a short write), nothing fits is ENOSPC.
        let Some(n) = Self::clip(&f.vol, offset, data.len() as u64) else {
            return reply.error(Errno::ENOSPC);
        };
        tracing::trace!(offset, len = data.len(), "write");
        match f.vol.write_at(offset, &data[..n as usize], f.sync) {
            Ok(()) => reply.written(n as u32),
            Err(e) => reply.error(errno("write", f.vol.name(), &e)),
        }
    }

    /// close(2): nothing to do (durability is fsync's).
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.files.write().remove(&fh.0);
        reply.ok()
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let f = match self.file(fh) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        match f.vol.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("flush", f.vol.name(), &e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let mut entries: Vec<(u64, FileType, String)> = vec![
            (ROOT, FileType::Directory, ".".into()),
            (ROOT, FileType::Directory, "..".into()),
        ];
        for (name, _) in self.list() {
            entries.push((self.ino_of(&name), FileType::RegularFile, name));
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let vols = self.list();
        let bytes: u64 = vols.iter().map(|(_, v)| v.size()).sum();
        reply.statfs(
            bytes.div_ceil(4096),
            0,
            0,
            vols.len() as u64,
            0,
            4096,
            255,
            4096,
        )
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let f = match self.file(fh) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        let vol = &f.vol;
        if vol.read_only() {
            return reply.error(Errno::EROFS);
        }
        let end = offset.saturating_add(length);
        let keep = mode & FALLOC_FL_KEEP_SIZE != 0;
        let op = mode & !FALLOC_FL_KEEP_SIZE;
        if end > vol.size() && !keep {
            // It would grow the file.
            return reply.error(Errno::EOPNOTSUPP);
        }
        let len = Self::clip(vol, offset, length).unwrap_or(0);
        let r = match op {
            // Allocate: the range exists already; the engine reserves nothing ahead.
            0 => Ok(()),
            FALLOC_FL_PUNCH_HOLE if len > 0 => vol.trim(offset, len),
            FALLOC_FL_ZERO_RANGE if len > 0 => vol.zero_range(offset, len, false, f.sync),
            FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE => Ok(()),
            _ => return reply.error(Errno::EOPNOTSUPP),
        };
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("fallocate", vol.name(), &e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let f = match self.file(fh) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        match whence {
            SEEK_DATA | SEEK_HOLE => match self.seek(&f.vol, offset, whence) {
                Ok(o) => reply.offset(o),
                Err(e) => reply.error(e),
            },
            // The kernel does SEEK_SET/CUR/END itself.
            _ => reply.error(Errno::EINVAL),
        }
    }

    /// No extended attributes: ENODATA rather than ENOSYS, so a file's (absent) security
    /// label is answered quietly.
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        reply.error(Errno::ENODATA)
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        if size == 0 {
            reply.size(0)
        } else {
            reply.data(&[])
        }
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        // Volumes are made with `mvsnap origin add` and `mvsnap snapshot create`.
        reply.error(Errno::EPERM)
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        // Snapshots are deleted with `mvsnap snapshot delete`.
        reply.error(Errno::EPERM)
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM)
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EPERM)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_that_can_be_file_names_are_files() {
        for ok in ["disk", "disk@monday", "a.b@c-d_e", "..x"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a@b/c", "a\0b"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
