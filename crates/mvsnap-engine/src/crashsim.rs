//! Power-loss simulation for tests (redb's and sled's crash tests are the models).
//!
//! A [`SimDisk`] is an in-memory [`BlockDev`] with two images: the *volatile* one that reads see,
//! and the *durable* one that survives a crash, plus the list of writes made since the last
//! `sync`. [`SimDisk::crash`] builds the device a reboot would find: the durable image plus a
//! random subset of the unsynced writes, each kept whole, dropped, or torn at 512-byte sectors,
//! applied in their original order.
//!
//! A [`SimMachine`] owns every disk of one simulated host (the COW store and the origins), so a
//! crash hits them all at the same instant ([`SimMachine::crash_all`]). Its [`SimOpener`] hands
//! the engine those disks by path. Faults: the N-th write or sync of one disk (or every write from
//! the N-th on) can fail with an errno of the test's choice, a disk can have a space limit (a full
//! host file system under a sparse file: writes that need new pages fail with ENOSPC), and the
//! whole machine can lose power after N more device operations
//! ([`SimMachine::power_off_after`]), which lets a test crash in the middle of any engine call,
//! recovery included: from then on every write, sync and grow fails and changes nothing.
//!
//! What the model keeps from real systems, and what it leaves out:
//! - A failed sync behaves as on Linux: the writes it covered are dropped from the dirty set. They
//!   stay visible to reads (the page cache keeps them, marked clean) but never become durable, not
//!   even after a later successful sync; [`SimDisk::drop_cache`] makes reads see the device again.
//!   A reopen on the same [`SimMachine`] without a crash is a restart in the same boot: it reads
//!   the page cache.
//! - A size change (a `grow`, or a write past the end) is an operation of its own: a crash can
//!   lose it while keeping later writes, and the image is then cut back to the size that
//!   survived, as a file system that persists data and the inode size in either order can do.
//! - A punched hole ([`BlockDev::discard`]) frees whole pages and zeroes partial ones; like a
//!   write, it is lost in a crash unless synced.
//! - Not modelled: reordering across a completed sync (a sync is a barrier), bit rot, misdirected
//!   writes, a grow (fallocate) failing for lack of space.
//!
//! ```no_run
//! # use mvsnap_engine::crashsim::SimMachine;
//! # use mvsnap_engine::{FormatOptions, OpenOptions};
//! # use rand::SeedableRng;
//! # fn main() -> mvsnap_engine::Result<()> {
//! let dir = std::path::Path::new("/tmp/somewhere");
//! let m = SimMachine::new();
//! m.add_store(&dir.join("store"), &FormatOptions::default()).unwrap();
//! m.add_origin_file(&dir.join("disk0"), vec![0u8; 1 << 20]).unwrap();
//! let store = m.open_store(&OpenOptions::default())?;
//! store.add_origin(&dir.join("disk0"), None)?;
//! // ... a workload ...
//! drop(store);
//! let mut rng = rand::rngs::StdRng::seed_from_u64(1);
//! let after = m.crash_all(&mut rng);
//! let store = after.open_store(&OpenOptions::default())?; // recovery
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use rand::Rng;

use crate::blockdev::{BlockDev, DeviceOpener};
use crate::error::Result;
use crate::store::Store;
use crate::types::{FormatOptions, OpenOptions};

/// Tearing granularity: a disk writes whole 512-byte sectors or nothing of them.
pub const SECTOR: u64 = 512;

/// How a crash treats the operations not yet synced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CrashPolicy {
    /// Every unsynced write is lost.
    DropAll,
    /// Every unsynced write made it (a crash right after the last write completed).
    KeepAll,
    /// A prefix of the unsynced writes made it, in order, and the last of them is torn
    /// (what a disk with an ordered write-back cache does).
    PrefixTornLast,
    /// Each unsynced operation independently: dropped with probability `drop`, else torn
    /// with probability `tear` (each of its sectors kept with probability 1/2), else kept.
    Random { drop: f64, tear: f64 },
}

impl CrashPolicy {
    /// A policy drawn at random, covering all the shapes above.
    pub fn random<R: Rng + ?Sized>(rng: &mut R) -> CrashPolicy {
        match rng.random_range(0..6) {
            0 => CrashPolicy::DropAll,
            1 => CrashPolicy::KeepAll,
            2 => CrashPolicy::PrefixTornLast,
            _ => CrashPolicy::Random {
                drop: rng.random_range(0.0..1.0),
                tear: rng.random_range(0.0..0.5),
            },
        }
    }
}

/// State shared by every disk of one machine: the power switch.
#[derive(Debug)]
struct Power {
    /// Mutating operations (write, sync, grow, discard) issued on any disk of the machine.
    ops: AtomicU64,
    /// The operation with this number (1-based) and every later one fail: power is gone.
    off_at: AtomicU64,
    off: AtomicBool,
}

impl Power {
    fn new() -> Power {
        Power {
            ops: AtomicU64::new(0),
            off_at: AtomicU64::new(u64::MAX),
            off: AtomicBool::new(false),
        }
    }

    /// Count one mutating operation; Err when the power is (now) off.
    fn tick(&self, what: &str, path: &Path) -> io::Result<()> {
        if self.off.load(Ordering::Acquire) {
            return Err(power_error(what, path));
        }
        let n = self.ops.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= self.off_at.load(Ordering::Acquire) {
            self.off.store(true, Ordering::Release);
            return Err(power_error(what, path));
        }
        Ok(())
    }
}

fn power_error(what: &str, path: &Path) -> io::Error {
    io::Error::other(format!(
        "simulated power loss: {what} of {} refused",
        path.display()
    ))
}

/// An injected failure carrying a real errno, so `raw_os_error()` sees it as the kernel's would.
fn injected(errno: i32, what: &str, path: &Path) -> io::Error {
    let os = io::Error::from_raw_os_error(errno);
    tracing::debug!("simulated {what} failure of {}: {os}", path.display());
    os
}

/// A planned failure of one kind of operation.
#[derive(Debug, Clone, Copy)]
struct Fault {
    /// The operation with this number (1-based, over the disk's life) fails...
    at: u64,
    /// ...and with `sticky`, every later one too.
    sticky: bool,
    errno: i32,
}

impl Fault {
    fn hits(f: Option<Fault>, n: u64) -> Option<i32> {
        let f = f?;
        (n == f.at || (f.sticky && n > f.at)).then_some(f.errno)
    }
}

#[derive(Debug, Clone)]
enum Pending {
    Write {
        off: u64,
        data: Vec<u8>,
    },
    /// The file grew to this length (fallocate, or a write past the end).
    Grow(u64),
    /// A hole punched: whole pages freed, partial ones zeroed.
    Punch {
        off: u64,
        len: u64,
    },
}

/// Page of a simulated image; absent pages read as zeros.
const PAGE: usize = 4096;

/// A sparse disk image of copy-on-write pages: cloning one (a crash, a second image) copies
/// pointers, and a write copies only the pages it touches.
#[derive(Debug, Clone, Default)]
struct Image {
    len: u64,
    pages: Vec<Option<Arc<[u8; PAGE]>>>,
    /// Pages present (allocated), for space limits.
    allocated: u64,
}

impl Image {
    fn from_bytes(bytes: &[u8]) -> Image {
        let mut img = Image::default();
        img.resize(bytes.len() as u64);
        for (i, p) in bytes.chunks(PAGE).enumerate() {
            if p.iter().any(|&b| b != 0) {
                let mut page = [0u8; PAGE];
                page[..p.len()].copy_from_slice(p);
                img.pages[i] = Some(Arc::new(page));
                img.allocated += 1;
            }
        }
        img
    }

    /// Cut to `len` bytes (a size change lost in a crash).
    fn truncate(&mut self, len: u64) {
        if len >= self.len {
            return;
        }
        let keep = len.div_ceil(PAGE as u64) as usize;
        self.allocated -= self.pages[keep..].iter().filter(|p| p.is_some()).count() as u64;
        self.pages.truncate(keep);
        let tail = (len % PAGE as u64) as usize;
        if tail != 0 {
            if let Some(p) = self.pages[keep - 1].as_mut() {
                Arc::make_mut(p)[tail..].fill(0);
            }
        }
        self.len = len;
    }

    /// Pages a write of `[off, off+len)` would have to allocate.
    fn missing_pages(&self, off: u64, len: u64) -> u64 {
        if len == 0 {
            return 0;
        }
        let (first, last) = (off / PAGE as u64, (off + len - 1) / PAGE as u64);
        (first..=last)
            .filter(|&i| !matches!(self.pages.get(i as usize), Some(Some(_))))
            .count() as u64
    }

    fn punch(&mut self, off: u64, len: u64) {
        let end = off.saturating_add(len).min(self.len);
        let mut pos = off;
        while pos < end {
            let (pi, po) = ((pos / PAGE as u64) as usize, (pos % PAGE as u64) as usize);
            let n = (PAGE - po).min((end - pos) as usize);
            if n == PAGE {
                if self.pages[pi].take().is_some() {
                    self.allocated -= 1;
                }
            } else if let Some(p) = self.pages[pi].as_mut() {
                Arc::make_mut(p)[po..po + n].fill(0);
            }
            pos += n as u64;
        }
    }

    /// Grow (never shrink) to `len` bytes; new bytes read as zeros.
    fn resize(&mut self, len: u64) {
        if len > self.len {
            self.len = len;
            self.pages.resize(len.div_ceil(PAGE as u64) as usize, None);
        }
    }

    fn read(&self, mut off: u64, buf: &mut [u8]) {
        let mut done = 0;
        while done < buf.len() {
            let (pi, po) = ((off / PAGE as u64) as usize, (off % PAGE as u64) as usize);
            let n = (PAGE - po).min(buf.len() - done);
            match &self.pages[pi] {
                Some(p) => buf[done..done + n].copy_from_slice(&p[po..po + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
            off += n as u64;
        }
    }

    fn write(&mut self, mut off: u64, data: &[u8]) {
        self.resize(off + data.len() as u64);
        let mut done = 0;
        while done < data.len() {
            let (pi, po) = ((off / PAGE as u64) as usize, (off % PAGE as u64) as usize);
            let n = (PAGE - po).min(data.len() - done);
            if self.pages[pi].is_none() {
                self.allocated += 1;
            }
            let page = self.pages[pi].get_or_insert_with(|| Arc::new([0u8; PAGE]));
            Arc::make_mut(page)[po..po + n].copy_from_slice(&data[done..done + n]);
            done += n;
            off += n as u64;
        }
    }

    fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len as usize];
        self.read(0, &mut v);
        v
    }
}

/// Apply one operation to an image; `keep_sector` decides, per 512-byte piece of a write,
/// whether it reaches the image (a torn write keeps some).
fn apply(img: &mut Image, op: &Pending, keep_sector: &mut dyn FnMut(u64) -> bool) {
    match op {
        Pending::Grow(len) => img.resize(*len),
        Pending::Punch { off, len } => img.punch(*off, *len),
        Pending::Write { off, data } => {
            let end = off + data.len() as u64;
            let mut pos = *off;
            let mut run_start = None;
            // Kept sectors are written in runs, so a whole write costs one pass.
            while pos < end {
                let sector_end = ((pos / SECTOR + 1) * SECTOR).min(end);
                if keep_sector(pos / SECTOR) {
                    run_start.get_or_insert(pos);
                } else if let Some(rs) = run_start.take() {
                    img.write(rs, &data[(rs - off) as usize..(pos - off) as usize]);
                }
                pos = sector_end;
            }
            if let Some(rs) = run_start {
                img.write(rs, &data[(rs - off) as usize..]);
            }
        }
    }
}

#[derive(Debug)]
struct DiskState {
    volatile: Image,
    durable: Image,
    pending: Vec<Pending>,
    writes: u64,
    syncs: u64,
    write_fault: Option<Fault>,
    sync_fault: Option<Fault>,
    /// Every read fails with this errno (until [`SimDisk::clear_faults`]).
    read_fault: Option<i32>,
    failed_writes: u64,
    failed_syncs: u64,
    /// Bytes of pages the host can allocate for this disk in all (None: unlimited).
    space_limit: Option<u64>,
    /// Writes whose sync failed: visible, never durable (Linux drops their dirty state).
    lost_writes: u64,
    cache_drops: u64,
}

/// Counters of one disk, for tests that check what was (not) written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiskStats {
    /// Writes that completed (failed ones are not counted).
    pub writes: u64,
    /// Syncs that completed.
    pub syncs: u64,
    pub failed_writes: u64,
    pub failed_syncs: u64,
    /// Operations not yet made durable by a sync.
    pub pending: usize,
    /// Operations a failed sync dropped: they will never be durable.
    pub lost: u64,
    /// Times the page cache was dropped.
    pub cache_drops: u64,
}

/// An in-memory device with a volatile and a durable image; see the module documentation.
#[derive(Debug)]
pub struct SimDisk {
    path: PathBuf,
    growable: bool,
    power: Arc<Power>,
    st: Mutex<DiskState>,
}

impl SimDisk {
    fn with_power(path: PathBuf, image: Image, growable: bool, power: Arc<Power>) -> SimDisk {
        SimDisk {
            path,
            growable,
            power,
            st: Mutex::new(DiskState {
                durable: image.clone(),
                volatile: image,
                pending: Vec::new(),
                writes: 0,
                syncs: 0,
                write_fault: None,
                sync_fault: None,
                read_fault: None,
                failed_writes: 0,
                failed_syncs: 0,
                space_limit: None,
                lost_writes: 0,
                cache_drops: 0,
            }),
        }
    }

    /// A stand-alone disk (its own machine) whose whole content is already durable.
    pub fn new(path: impl Into<PathBuf>, image: Vec<u8>, growable: bool) -> SimDisk {
        SimDisk::with_power(
            path.into(),
            Image::from_bytes(&image),
            growable,
            Arc::new(Power::new()),
        )
    }

    /// Make the `n`-th write from now (1: the next one) fail with EIO. It changes nothing.
    pub fn fail_write_after(&self, n: u64) {
        self.fail_write_after_with(n, libc::EIO);
    }

    /// Make the `n`-th write from now (1: the next one) fail with `errno`. It changes nothing.
    pub fn fail_write_after_with(&self, n: u64, errno: i32) {
        let mut st = self.st.lock();
        let at = st.writes + st.failed_writes + n.max(1);
        st.write_fault = Some(Fault {
            at,
            sticky: false,
            errno,
        });
    }

    /// Make the `n`-th write from now and every later one fail with `errno`, until
    /// [`SimDisk::clear_faults`].
    pub fn fail_writes_from(&self, n: u64, errno: i32) {
        let mut st = self.st.lock();
        let at = st.writes + st.failed_writes + n.max(1);
        st.write_fault = Some(Fault {
            at,
            sticky: true,
            errno,
        });
    }

    /// Make the `n`-th sync from now (1: the next one) fail with EIO (see `fail_sync_after_with`).
    pub fn fail_sync_after(&self, n: u64) {
        self.fail_sync_after_with(n, libc::EIO);
    }

    /// Make the `n`-th sync from now (1: the next one) fail with `errno`. As on Linux, the writes
    /// it covered lose their dirty state: still visible, never durable.
    pub fn fail_sync_after_with(&self, n: u64, errno: i32) {
        let mut st = self.st.lock();
        let at = st.syncs + st.failed_syncs + n.max(1);
        st.sync_fault = Some(Fault {
            at,
            sticky: false,
            errno,
        });
    }

    /// Make every read from now on fail with `errno`, until [`SimDisk::clear_faults`] (a bad
    /// sector, a disk gone away).
    pub fn fail_reads(&self, errno: i32) {
        self.st.lock().read_fault = Some(errno);
    }

    /// Forget every planned read, write and sync failure.
    pub fn clear_faults(&self) {
        let mut st = self.st.lock();
        st.write_fault = None;
        st.sync_fault = None;
        st.read_fault = None;
    }

    /// Let the host allocate at most `bytes` of pages for this disk (None: no limit): a write
    /// that needs more fails with ENOSPC and changes nothing, as on a full file system under a
    /// sparse file, or on btrfs/ZFS where an overwrite needs new space.
    pub fn set_space_limit(&self, bytes: Option<u64>) {
        self.st.lock().space_limit = bytes;
    }

    /// Bytes of pages allocated now (what `du` would say of a sparse file).
    pub fn allocated_bytes(&self) -> u64 {
        self.st.lock().volatile.allocated * PAGE as u64
    }

    /// Drop the page cache: reads see the device again (the durable image plus the writes still
    /// dirty), so data that only a failed sync's clean-marked pages held is gone.
    pub fn drop_cache(&self) {
        let mut guard = self.st.lock();
        let st = &mut *guard;
        let mut img = st.durable.clone();
        for op in &st.pending {
            apply(&mut img, op, &mut |_| true);
        }
        img.resize(st.volatile.len);
        st.volatile = img;
        st.cache_drops += 1;
    }

    pub fn stats(&self) -> DiskStats {
        let st = self.st.lock();
        DiskStats {
            writes: st.writes,
            syncs: st.syncs,
            failed_writes: st.failed_writes,
            failed_syncs: st.failed_syncs,
            pending: st.pending.len(),
            lost: st.lost_writes,
            cache_drops: st.cache_drops,
        }
    }

    /// What reads see now.
    pub fn volatile_image(&self) -> Vec<u8> {
        self.st.lock().volatile.to_vec()
    }

    /// What survives a crash that drops every unsynced write.
    pub fn durable_image(&self) -> Vec<u8> {
        self.st.lock().durable.to_vec()
    }

    /// Change bytes in both images, as damage on the medium would (no write is counted).
    pub fn corrupt(&self, offset: u64, bytes: &[u8]) {
        let mut guard = self.st.lock();
        let st = &mut *guard;
        st.volatile.write(offset, bytes);
        st.durable.write(offset, bytes);
    }

    /// The device a reboot would find, on a machine of its own.
    pub fn crash<R: Rng + ?Sized>(&self, rng: &mut R, policy: CrashPolicy) -> SimDisk {
        let image = self.crash_image(rng, policy);
        SimDisk::with_power(
            self.path.clone(),
            image,
            self.growable,
            Arc::new(Power::new()),
        )
    }

    fn crash_image<R: Rng + ?Sized>(&self, rng: &mut R, policy: CrashPolicy) -> Image {
        let st = self.st.lock();
        let mut img = st.durable.clone();
        let n = st.pending.len();
        let prefix = match policy {
            CrashPolicy::PrefixTornLast if n > 0 => rng.random_range(0..=n),
            _ => n,
        };
        // The size that survives: the durable one, raised by each size change kept.
        let mut len = st.durable.len;
        for (i, op) in st.pending.iter().enumerate() {
            // None: drop; Some(false): keep whole; Some(true): tear.
            let fate = match policy {
                CrashPolicy::DropAll => None,
                CrashPolicy::KeepAll => Some(false),
                CrashPolicy::PrefixTornLast => {
                    if i + 1 < prefix {
                        Some(false)
                    } else if i + 1 == prefix {
                        Some(true)
                    } else {
                        None
                    }
                }
                CrashPolicy::Random { drop, tear } => {
                    if rng.random_bool(drop.clamp(0.0, 1.0)) {
                        None
                    } else {
                        Some(rng.random_bool(tear.clamp(0.0, 1.0)))
                    }
                }
            };
            let Some(torn) = fate else { continue };
            match op {
                Pending::Grow(l) => len = len.max(*l),
                // A hole is punched whole or not at all.
                Pending::Punch { .. } => {
                    apply(&mut img, op, &mut |_| true);
                    continue;
                }
                Pending::Write { .. } => {}
            }
            apply(&mut img, op, &mut |_| !torn || rng.random_bool(0.5));
        }
        // Writes past a lost size change are gone with it.
        img.truncate(len);
        img.resize(len);
        img
    }
}

impl BlockDev for SimDisk {
    fn len(&self) -> io::Result<u64> {
        Ok(self.st.lock().volatile.len)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let st = self.st.lock();
        if let Some(errno) = st.read_fault {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= st.volatile.len)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "read of {} bytes at {offset} past the end of {} ({} bytes)",
                        buf.len(),
                        self.path.display(),
                        st.volatile.len
                    ),
                )
            })?;
        let _ = end;
        st.volatile.read(offset, buf);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut st = self.st.lock();
        self.power.tick("write", &self.path)?;
        if let Some(errno) = Fault::hits(st.write_fault, st.writes + st.failed_writes + 1) {
            st.failed_writes += 1;
            return Err(injected(errno, "write", &self.path));
        }
        if let Some(limit) = st.space_limit {
            let need = st.volatile.missing_pages(offset, buf.len() as u64);
            if need > 0 && (st.volatile.allocated + need) * PAGE as u64 > limit {
                st.failed_writes += 1;
                return Err(injected(libc::ENOSPC, "write", &self.path));
            }
        }
        // A regular file grows on a write past its end; so does the image. The size change is
        // an operation of its own: a crash can lose it and keep the data.
        let end = offset + buf.len() as u64;
        if end > st.volatile.len {
            st.pending.push(Pending::Grow(end));
        }
        st.volatile.write(offset, buf);
        st.pending.push(Pending::Write {
            off: offset,
            data: buf.to_vec(),
        });
        st.writes += 1;
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut st = self.st.lock();
        self.power.tick("sync", &self.path)?;
        if let Some(errno) = Fault::hits(st.sync_fault, st.syncs + st.failed_syncs + 1) {
            // Like Linux after a failed fsync: the error is reported once and the dirty state of
            // what it covered is gone. Reads still see it (clean pages); the device never will.
            st.failed_syncs += 1;
            let lost = std::mem::take(&mut st.pending);
            st.lost_writes += lost.len() as u64;
            return Err(injected(errno, "sync", &self.path));
        }
        // Replay the pending operations onto the durable image: O(bytes written), not O(disk).
        let pending = std::mem::take(&mut st.pending);
        for op in &pending {
            apply(&mut st.durable, op, &mut |_| true);
        }
        // (After a failed sync the durable image may be shorter than what reads see.)
        let len = st.volatile.len;
        st.durable.resize(len);
        st.syncs += 1;
        Ok(())
    }

    fn grow(&self, len: u64) -> io::Result<()> {
        if !self.growable {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this simulated device cannot grow",
            ));
        }
        let mut st = self.st.lock();
        self.power.tick("grow", &self.path)?;
        if st.volatile.len < len {
            st.volatile.resize(len);
            st.pending.push(Pending::Grow(len));
        }
        Ok(())
    }

    fn can_grow(&self) -> bool {
        self.growable
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        self.discard(offset, len)
    }

    fn can_punch(&self) -> bool {
        true
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        // A punched hole reads as zeros; like a write, it is lost if not synced.
        let mut st = self.st.lock();
        self.power.tick("punch", &self.path)?;
        let end = offset.saturating_add(len).min(st.volatile.len);
        if end > offset {
            let op = Pending::Punch {
                off: offset,
                len: end - offset,
            };
            apply(&mut st.volatile, &op, &mut |_| true);
            st.pending.push(op);
        }
        Ok(())
    }

    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<crate::types::Extent>> {
        // Page granularity, like SEEK_DATA/SEEK_HOLE on a 4 KiB-block file system.
        let st = self.st.lock();
        let end = offset.saturating_add(len).min(st.volatile.len);
        let mut out: Vec<crate::types::Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let pi = (pos / PAGE as u64) as usize;
            let n = (((pi as u64) + 1) * PAGE as u64).min(end) - pos;
            let zero = st.volatile.pages[pi].is_none();
            match out.last_mut() {
                Some(l) if l.zero == zero => l.length += n,
                _ => out.push(crate::types::Extent { length: n, zero }),
            }
            pos += n;
        }
        Ok(out)
    }

    fn drop_cache(&self) -> io::Result<()> {
        SimDisk::drop_cache(self);
        Ok(())
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

struct MachineInner {
    power: Arc<Power>,
    disks: Mutex<BTreeMap<PathBuf, Arc<SimDisk>>>,
    store: Mutex<Option<PathBuf>>,
}

/// Every disk of one simulated host. Cheap to clone; clones are the same machine.
#[derive(Clone)]
pub struct SimMachine {
    inner: Arc<MachineInner>,
}

impl Default for SimMachine {
    fn default() -> Self {
        SimMachine::new()
    }
}

/// Canonical form of a path the engine will use: origins are bound by their canonical path.
fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

impl SimMachine {
    pub fn new() -> SimMachine {
        SimMachine {
            inner: Arc::new(MachineInner {
                power: Arc::new(Power::new()),
                disks: Mutex::new(BTreeMap::new()),
                store: Mutex::new(None),
            }),
        }
    }

    /// Add a disk whose content is already durable. Its path is used as given.
    pub fn add_disk(&self, path: &Path, image: Vec<u8>, growable: bool) -> Arc<SimDisk> {
        self.add_image(path, Image::from_bytes(&image), growable)
    }

    fn add_image(&self, path: &Path, image: Image, growable: bool) -> Arc<SimDisk> {
        let d = Arc::new(SimDisk::with_power(
            path.to_path_buf(),
            image,
            growable,
            self.inner.power.clone(),
        ));
        self.inner
            .disks
            .lock()
            .insert(path.to_path_buf(), d.clone());
        d
    }

    /// Add an origin disk holding `image`. A real (sparse) file is created at `path` too,
    /// because binding an origin resolves its path on the real file system; the engine's I/O
    /// goes to the simulated disk, registered under the canonical path.
    pub fn add_origin_file(&self, path: &Path, image: Vec<u8>) -> io::Result<Arc<SimDisk>> {
        let f = std::fs::File::create(path)?;
        f.set_len(image.len() as u64)?;
        Ok(self.add_disk(&canonical(path), image, false))
    }

    /// Format a real file at `path` as a store, then move its bytes into a simulated disk
    /// (`Store::format` works on real files only). The disk can grow when `opts.max_size` is set.
    pub fn add_store(&self, path: &Path, opts: &FormatOptions) -> Result<Arc<SimDisk>> {
        use std::io::Read;
        Store::format(path, opts)?;
        let io_err = |e| crate::error::Error::io("read", path.to_path_buf(), e);
        let mut f = std::fs::File::open(path).map_err(io_err)?;
        let mut image = Image::default();
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(io_err)?;
            if n == 0 {
                break;
            }
            image.resize(pos + n as u64);
            for (i, p) in buf[..n].chunks(PAGE).enumerate() {
                if p.iter().any(|&b| b != 0) {
                    image.write(pos + (i * PAGE) as u64, p);
                }
            }
            pos += n as u64;
        }
        let p = canonical(path);
        let d = self.add_image(&p, image, opts.max_size > 0);
        *self.inner.store.lock() = Some(p);
        Ok(d)
    }

    /// Mark an already added disk as the store (for [`SimMachine::open_store`]).
    pub fn set_store(&self, path: &Path) {
        *self.inner.store.lock() = Some(path.to_path_buf());
    }

    pub fn store_disk(&self) -> Option<Arc<SimDisk>> {
        let p = self.inner.store.lock().clone()?;
        self.disk(&p)
    }

    /// The disk at `path` (as given, or canonicalized).
    pub fn disk(&self, path: &Path) -> Option<Arc<SimDisk>> {
        let disks = self.inner.disks.lock();
        disks
            .get(path)
            .or_else(|| disks.get(&canonical(path)))
            .cloned()
    }

    pub fn disks(&self) -> Vec<Arc<SimDisk>> {
        self.inner.disks.lock().values().cloned().collect()
    }

    pub fn opener(&self) -> Arc<SimOpener> {
        Arc::new(SimOpener {
            machine: self.clone(),
        })
    }

    /// Open the store disk with recovery, origins through this machine.
    pub fn open_store(&self, opts: &OpenOptions) -> Result<Store> {
        let disk = self.store_disk().ok_or_else(|| {
            crate::error::Error::InvalidArgument("the simulated machine has no store disk".into())
        })?;
        Store::open_with(disk, None, self.opener(), opts)
    }

    /// Mutating operations issued so far on all disks of this machine.
    pub fn ops(&self) -> u64 {
        self.inner.power.ops.load(Ordering::Acquire)
    }

    /// Let `n` more mutating operations through; every one after that fails (power loss).
    pub fn power_off_after(&self, n: u64) {
        let now = self.ops();
        self.inner
            .power
            .off_at
            .store(now + n + 1, Ordering::Release);
    }

    /// Cut the power now: nothing more is written to any disk of this machine.
    pub fn power_off(&self) {
        self.inner.power.off.store(true, Ordering::Release);
    }

    pub fn is_off(&self) -> bool {
        self.inner.power.off.load(Ordering::Acquire)
    }

    /// Crash every disk at one instant, with a policy drawn at random.
    pub fn crash_all<R: Rng + ?Sized>(&self, rng: &mut R) -> SimMachine {
        let policy = CrashPolicy::random(rng);
        self.crash_all_with(rng, policy)
    }

    /// Crash every disk at one instant: this machine loses power (its disks refuse all further
    /// writes, so handles still open on it change nothing) and the returned machine holds what
    /// a reboot finds.
    pub fn crash_all_with<R: Rng + ?Sized>(&self, rng: &mut R, policy: CrashPolicy) -> SimMachine {
        let disks = self.inner.disks.lock();
        self.power_off();
        let next = SimMachine::new();
        for (path, d) in disks.iter() {
            let image = d.crash_image(rng, policy);
            next.add_image(path, image, d.growable);
        }
        *next.inner.store.lock() = self.inner.store.lock().clone();
        next
    }
}

/// Hands the engine the disks of one [`SimMachine`] by path.
pub struct SimOpener {
    machine: SimMachine,
}

impl DeviceOpener for SimOpener {
    fn open(&self, path: &Path, _writable: bool) -> io::Result<Arc<dyn BlockDev>> {
        match self.machine.disk(path) {
            Some(d) => Ok(d),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no simulated disk at {}", path.display()),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn sync_makes_durable_and_crash_drops_the_rest() {
        let d = SimDisk::new("/sim/a", vec![0u8; 4096], false);
        d.write_at(&[1u8; 1024], 0).unwrap();
        d.sync().unwrap();
        d.write_at(&[2u8; 1024], 1024).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let c = d.crash(&mut rng, CrashPolicy::DropAll);
        let img = c.volatile_image();
        assert!(img[..1024].iter().all(|&b| b == 1));
        assert!(img[1024..].iter().all(|&b| b == 0));
        let c = d.crash(&mut rng, CrashPolicy::KeepAll);
        assert!(c.volatile_image()[1024..2048].iter().all(|&b| b == 2));
        assert_eq!(c.stats().pending, 0);
    }

    #[test]
    fn torn_writes_keep_whole_sectors_in_order() {
        let d = SimDisk::new("/sim/b", vec![0u8; 8192], false);
        d.write_at(&[3u8; 8192], 0).unwrap();
        d.write_at(&[4u8; 4096], 100).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut saw_mixed = false;
        for _ in 0..200 {
            let img = d
                .crash(
                    &mut rng,
                    CrashPolicy::Random {
                        drop: 0.3,
                        tear: 0.5,
                    },
                )
                .volatile_image();
            // Between the writes' boundaries (100, 4196) each sector is uniform.
            for s in 0..16 {
                let mut cuts = vec![s * 512, (s + 1) * 512];
                cuts.extend(
                    [100, 4196]
                        .into_iter()
                        .filter(|&c| c > s * 512 && c < (s + 1) * 512),
                );
                cuts.sort();
                for w in cuts.windows(2) {
                    let part = &img[w[0]..w[1]];
                    assert!(part.iter().all(|&b| b == part[0]), "sector {s} split");
                    assert!([0, 3, 4].contains(&part[0]));
                }
            }
            saw_mixed |= img.contains(&0) && img.contains(&3);
        }
        assert!(saw_mixed);
    }

    #[test]
    fn injected_faults_and_power_loss() {
        let m = SimMachine::new();
        let a = m.add_disk(Path::new("/sim/x"), vec![0u8; 4096], false);
        let b = m.add_disk(Path::new("/sim/y"), vec![0u8; 4096], false);
        a.fail_write_after(2);
        a.write_at(&[1], 0).unwrap();
        assert!(a.write_at(&[1], 1).is_err());
        a.write_at(&[1], 2).unwrap();
        a.fail_sync_after(1);
        let e = a.sync().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        // Linux semantics: the failed sync's writes are no longer dirty, never durable...
        assert_eq!(a.stats().pending, 0);
        assert_eq!(a.stats().lost, 2);
        a.sync().unwrap();
        // ...but the page cache still shows them.
        assert_eq!(&a.volatile_image()[..3], &[1, 0, 1]);
        assert_eq!(&a.durable_image()[..3], &[0, 0, 0]);
        m.power_off_after(1);
        b.write_at(&[9], 0).unwrap();
        assert!(a.write_at(&[9], 0).is_err());
        assert!(b.sync().is_err());
        assert!(m.is_off());
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let m2 = m.crash_all_with(&mut rng, CrashPolicy::KeepAll);
        let b2 = m2.disk(Path::new("/sim/y")).unwrap();
        assert_eq!(b2.volatile_image()[0], 9);
        let a2 = m2.disk(Path::new("/sim/x")).unwrap();
        assert_eq!(&a2.volatile_image()[..3], &[0, 0, 0]);
        a2.write_at(&[5], 0).unwrap();
    }

    #[test]
    fn errno_faults_sticky_and_cleared() {
        let d = SimDisk::new("/sim/e", vec![0u8; 4096], false);
        d.fail_write_after_with(1, libc::ENOSPC);
        assert_eq!(
            d.write_at(&[1], 0).unwrap_err().raw_os_error(),
            Some(libc::ENOSPC)
        );
        d.write_at(&[1], 0).unwrap();
        d.fail_writes_from(2, libc::EIO);
        d.write_at(&[2], 1).unwrap();
        for _ in 0..3 {
            assert_eq!(
                d.write_at(&[3], 2).unwrap_err().raw_os_error(),
                Some(libc::EIO)
            );
        }
        d.clear_faults();
        d.write_at(&[4], 3).unwrap();
        assert_eq!(&d.volatile_image()[..4], &[1, 2, 0, 4]);
        d.fail_sync_after_with(1, libc::ENOSPC);
        assert_eq!(d.sync().unwrap_err().raw_os_error(), Some(libc::ENOSPC));
    }

    #[test]
    fn space_limit_fails_writes_needing_new_pages() {
        let d = SimDisk::new("/sim/s", vec![0u8; 8 * 4096], false);
        d.set_space_limit(Some(2 * 4096));
        d.write_at(&[1u8; 4096], 0).unwrap();
        d.write_at(&[2u8; 10], 4096).unwrap();
        // A third page does not fit; rewriting allocated pages does.
        let e = d.write_at(&[3u8; 4096], 2 * 4096).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        assert!(d.volatile_image()[2 * 4096..3 * 4096]
            .iter()
            .all(|&b| b == 0));
        d.write_at(&[4u8; 8192], 0).unwrap();
        assert_eq!(d.allocated_bytes(), 8192);
        // Punching frees pages, which makes room again.
        d.discard(0, 4096).unwrap();
        assert_eq!(d.allocated_bytes(), 4096);
        d.write_at(&[5u8; 4096], 3 * 4096).unwrap();
        d.set_space_limit(None);
        d.write_at(&[6u8; 4096 * 4], 4 * 4096).unwrap();
        let ext = d.allocation(0, 8 * 4096).unwrap();
        let zero: Vec<bool> = ext.iter().map(|e| e.zero).collect();
        assert_eq!(zero, vec![true, false, true, false]);
        assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), 8 * 4096);
    }

    #[test]
    fn drop_cache_forgets_what_a_failed_sync_lost() {
        let d = SimDisk::new("/sim/c", vec![0u8; 4096], false);
        d.write_at(&[1u8; 512], 0).unwrap();
        d.sync().unwrap();
        d.write_at(&[2u8; 512], 0).unwrap();
        d.fail_sync_after(1);
        assert!(d.sync().is_err());
        d.write_at(&[3u8; 512], 512).unwrap();
        assert_eq!(d.volatile_image()[0], 2);
        d.drop_cache();
        // The lost write is gone; the still-dirty one stays visible.
        assert_eq!(d.volatile_image()[0], 1);
        assert_eq!(d.volatile_image()[512], 3);
    }

    #[test]
    fn a_lost_size_change_cuts_the_writes_past_it() {
        let d = SimDisk::new("/sim/g", vec![7u8; 4096], true);
        d.grow(3 * 4096).unwrap();
        d.write_at(&[8u8; 4096], 4096).unwrap();
        d.write_at(&[9u8; 100], 3 * 4096).unwrap(); // past the end: a size change too
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (mut cut, mut kept) = (false, false);
        for _ in 0..300 {
            let img = d
                .crash(
                    &mut rng,
                    CrashPolicy::Random {
                        drop: 0.5,
                        tear: 0.0,
                    },
                )
                .volatile_image();
            assert!(img[..4096].iter().all(|&b| b == 7));
            assert!([4096, 3 * 4096, 3 * 4096 + 100].contains(&img.len()));
            cut |= img.len() == 4096;
            kept |= img.len() == 3 * 4096 + 100 && img[3 * 4096] == 9;
        }
        assert!(cut && kept);
        // A synced size change stays.
        d.sync().unwrap();
        let img = d.crash(&mut rng, CrashPolicy::DropAll).volatile_image();
        assert_eq!(img.len(), 3 * 4096 + 100);
    }
}
