//! Crash recovery on the power-loss simulator (`mvsnap_engine::crashsim`).
//!
//! Random workloads (origin writes, snapshots of the origin and of snapshots, sets over two
//! origins, writable snapshot writes, bursts of small writes that fill the journal so it
//! checkpoints itself, deletes, flushes, checkpoints, reclaims) run on simulated disks. At a
//! random point the whole machine crashes (store and origins at the same instant): either
//! between two engine calls or in the middle of one (the power goes off after N device
//! operations, so every later write fails and changes nothing). Unsynced writes are dropped,
//! kept or torn at 512-byte sectors. Some recoveries crash again after a few device operations.
//! After recovery:
//! (a) every snapshot whose creation returned reads exactly its content at creation (read-only)
//!     and exists; one whose creation was cut off is all-or-nothing over its set and, if there,
//!     correct; a deleted one (the call returned) is gone;
//! (b) `check` is clean;
//! (c) each origin byte holds its value at the last returned flush or a value written since;
//! (d) the same for writable snapshots, from their creation or last returned flush.
//! Each case runs several crash/recover rounds on the recovered store. A failure prints the
//! seed, the last steps, and which write or volume the unexpected bytes came from.
//!
//! `MVSNAP_CRASH_SEED=N` runs one case of every test with that seed (for a failure's replay);
//! `MVSNAP_CRASH_CASES=N` runs N cases per test instead of the default (for long soaks).
//!
//! What the simulator (`mvsnap_engine::crashsim`) models, and where each mode is tried:
//! - power loss: unsynced writes, punched holes (TRIM) and size changes (growth, writes past
//!   the end) dropped, kept, or torn at 512-byte sectors, per disk, independently or as an
//!   ordered prefix (here; tests/store_growth.rs cuts at every device operation of a growth);
//! - Linux's failed-fsync semantics: a failed sync drops the dirty data (still read until the
//!   cache is dropped, never durable); EIO and ENOSPC on writes and syncs; a space limit;
//!   a restart in the same boot (cache kept) and after a power loss (the poisoning tests here,
//!   tests/store_errors.rs);
//! - a full store: a quarter of the random cases here run on a store of 24-64 chunks, which
//!   fills: snapshots are invalidated (then never readable), snapshot writes and new snapshots
//!   may be refused for space, and every valid snapshot must stay exact across the crashes;
//!   the ordering of an invalidation before the origin write (tests/store_errors.rs);
//! - TRIM of origins in the random workload here (copy-outs, zero entries, punched holes);
//! - host I/O errors in the random workload: a quarter of the other cases plant, now and then,
//!   an EIO or ENOSPC a few operations ahead on a write or a sync of the store or an origin, or
//!   stop the host from allocating more pages for a disk. Calls may fail from then on, the store
//!   may be poisoned, snapshots may be invalidated; after the crash every valid snapshot must
//!   still be exact and every volume explainable (a failed sync vouches for nothing);
//! - concurrent writers: tests/crash_concurrent.rs (three writer threads and snapshots, deletes
//!   and checkpoints at once, then a power cut).
//!
//! What it does not model: reordering across a completed sync (a sync that returned is a
//! barrier), torn writes below 512 bytes, lying disks (a sync that returns before the data is
//! durable), corruption of data at rest (checksums catch it; tests/bad_input.rs), the host
//! file system's own metadata beyond the file size, read errors, and host errors together with
//! a full store in one case.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use mvsnap_engine::crashsim::{CrashPolicy, SimMachine};
use mvsnap_engine::{BlockDev, Error, OpenOptions, SnapshotState, Store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::seeds;
use common::track::Track;
use common::{first_diff, format_opts, pattern, read_all};

const STORE_SIZE: u64 = 32 << 20;
const MAX_SNAPS: usize = 8;
/// Live snapshots of a deep case: room for a chain of more than 20.
const DEEP_SNAPS: usize = 48;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Life {
    Live,
    /// The create call did not return: it may or may not exist after a crash.
    MaybeCreated,
    /// The delete call did not return.
    MaybeDeleted,
}

struct SnapM {
    origin: usize,
    writable: bool,
    /// Exact content at creation.
    created: Arc<Vec<u8>>,
    /// Writable snapshots: what writes did since.
    track: Option<Track>,
    life: Life,
    /// Snapshots created by one call share a set number: all or none survive.
    set: u64,
}

impl SnapM {
    fn content(&self) -> &[u8] {
        match &self.track {
            Some(t) => &t.cur,
            None => &self.created,
        }
    }
}

#[derive(Clone, Copy)]
enum Mode {
    /// Crash between two engine calls.
    Between,
    /// Power off after a random number of device operations: inside a call, usually.
    Inside,
}

struct Case {
    seed: u64,
    rng: StdRng,
    _dir: tempfile::TempDir,
    m: SimMachine,
    s: Option<Store>,
    chunk: u64,
    origins: Vec<Track>,
    snaps: BTreeMap<String, SnapM>,
    next_tag: u64,
    next_set: u64,
    log: Vec<String>,
    /// Every write ever issued (volume, offset, data), to name the source of bad bytes.
    history: Vec<(String, u64, Vec<u8>)>,
    /// A store of a few dozen chunks: it fills, snapshots are invalidated, writes to writable
    /// snapshots and new snapshots may be refused for space. An invalid snapshot must fail its
    /// reads; a valid one must still be exact.
    full: bool,
    /// Snapshots found invalid (a full store): they may stay listed, never readable.
    invalid: std::collections::BTreeSet<String>,
    /// Host I/O errors injected now and then (see [`Case::inject_fault`]): any call may fail
    /// from then on until the crash, snapshots may be invalidated, the store may be poisoned.
    faults: bool,
    /// A fault was injected since the last recovery: errors are expected.
    faulted: bool,
    /// Deep snapshot trees: a new snapshot is taken of the newest live one of its origin
    /// (chains of snapshots of snapshots; a delete in the middle leaves a hidden link), and
    /// up to [`DEEP_SNAPS`] live at once.
    deep: bool,
    /// How every open of this case's store is made (see `common::crash_open_opts`).
    opts: OpenOptions,
}

fn oname(i: usize) -> String {
    format!("o{i}")
}

impl Case {
    fn new(seed: u64) -> Case {
        Case::with(seed, false)
    }

    /// `deep`: see [`Case::deep`]; such a case never runs on a full store (its chain must
    /// grow).
    fn with(seed: u64, deep: bool) -> Case {
        let mut rng = StdRng::seed_from_u64(seed);
        let dir = tempfile::tempdir().unwrap();
        let (chunk, named) = common::random_origins(&mut rng, seed);
        let norigins = named.len();
        let origins: Vec<(&str, Vec<u8>)> =
            named.iter().map(|(n, c)| (n.as_str(), c.clone())).collect();
        let full = !deep && rng.random_bool(0.25);
        let faults = !full && rng.random_bool(0.25);
        let store_size = if full {
            let journal = mvsnap_engine::format::Geometry::default_journal_len(STORE_SIZE);
            // Format v2 allocates 4 KiB blocks: a few dozen past the metadata's own.
            let geo = mvsnap_engine::format::Geometry::new(4096, journal).unwrap();
            geo.data_start + (40 + rng.random_range(24..64)) * 4096
        } else {
            STORE_SIZE
        };
        let opts = common::crash_open_opts(&mut rng);
        let (m, s) =
            common::sim_setup_with(dir.path(), &format_opts(store_size, chunk), &opts, &origins);
        Case {
            seed,
            rng,
            _dir: dir,
            m,
            s: Some(s),
            chunk: chunk as u64,
            origins: named.into_iter().map(|(_, c)| Track::new(c)).collect(),
            snaps: BTreeMap::new(),
            next_tag: 1,
            next_set: 1,
            log: vec![format!(
                "chunk {chunk}, {norigins} origins, store {store_size}, faults {faults}, \
                 overlay {:?}",
                opts.overlay_entries
            )],
            history: Vec::new(),
            full,
            invalid: Default::default(),
            faults,
            faulted: false,
            deep,
            opts,
        }
    }

    fn max_snaps(&self) -> usize {
        if self.deep {
            DEEP_SNAPS
        } else {
            MAX_SNAPS
        }
    }

    /// The longest chain of parents among the live snapshots, as the store lists them.
    fn depth(&self) -> usize {
        let list = self.store().snapshots();
        let parent: BTreeMap<&str, &str> = list
            .iter()
            .map(|i| (i.name.as_str(), i.parent.as_str()))
            .collect();
        let mut deepest = 0;
        for start in parent.keys() {
            let (mut n, mut cur) = (0, *start);
            while let Some(p) = parent.get(cur) {
                n += 1;
                cur = p;
            }
            deepest = deepest.max(n);
        }
        deepest
    }

    #[track_caller]
    fn fail(&self, msg: String) -> ! {
        let start = self.log.len().saturating_sub(
            std::env::var("MVSNAP_CRASH_LOG")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(60),
        );
        panic!(
            "seed {}: {msg}\n--- last steps ---\n{}",
            self.seed,
            self.log[start..].join("\n")
        );
    }

    /// Which known content holds the 16 bytes found at `i` at that same offset: a write to some
    /// volume, or a volume's content now or at creation.
    fn suspects(&self, got: &[u8], i: usize) -> String {
        let win = &got[i..(i + 16).min(got.len())];
        let at = |d: &[u8], off: usize| {
            i >= off && d.len() >= i - off + win.len() && &d[i - off..i - off + win.len()] == win
        };
        let mut hits = Vec::new();
        for (n, (vol, off, d)) in self.history.iter().enumerate() {
            if at(d, *off as usize) {
                hits.push(format!("write #{n} to {vol} at {off}+{}", d.len()));
            }
        }
        for (o, t) in self.origins.iter().enumerate() {
            if at(&t.cur, 0) {
                hits.push(format!("{} now", oname(o)));
            }
        }
        for (name, sm) in &self.snaps {
            if at(&sm.created, 0) {
                hits.push(format!("{name} at creation"));
            }
            if sm.track.as_ref().is_some_and(|t| at(&t.cur, 0)) {
                hits.push(format!("{name} now"));
            }
        }
        if win.iter().all(|&b| b == 0) {
            hits.push("zeros".into());
        }
        format!("\n  the bytes found there match: {hits:?}")
    }

    fn store(&self) -> &Store {
        self.s.as_ref().unwrap()
    }

    /// An (offset, length) in a volume of `size` bytes: unaligned, blocks, or across chunks.
    fn range(&mut self, size: u64) -> (u64, usize) {
        let chunk = self.chunk;
        let (len, align) = match self.rng.random_range(0..4) {
            0 => (self.rng.random_range(1..=600), 1),
            1 => (self.rng.random_range(1..=8) * 4096, 4096),
            2 => (self.rng.random_range(1..=3 * chunk + 5000), 1),
            _ => (self.rng.random_range(1..=3) * chunk, chunk),
        };
        let len = len.min(size);
        let off = self.rng.random_range(0..=size - len) / align * align;
        (off, len as usize)
    }

    fn live_snaps(&self) -> Vec<String> {
        self.snaps.keys().cloned().collect()
    }

    /// Plan one host I/O error on the store or an origin, a few device operations ahead: EIO
    /// or ENOSPC on a write or a sync (a failed sync drops the dirty data, as on Linux), or a
    /// host file system that has no room left for the store to allocate in.
    fn inject_fault(&mut self) {
        let disks = self.m.disks();
        let d = &disks[self.rng.random_range(0..disks.len())];
        let n = self.rng.random_range(1..6);
        let errno = if self.rng.random_bool(0.5) {
            libc::EIO
        } else {
            libc::ENOSPC
        };
        let what = match self.rng.random_range(0..5) {
            0 | 1 => {
                d.fail_write_after_with(n, errno);
                "write"
            }
            2 | 3 => {
                d.fail_sync_after_with(n, errno);
                "sync"
            }
            _ => {
                d.set_space_limit(Some(d.allocated_bytes()));
                "space limit"
            }
        };
        self.log.push(format!(
            "--- fault: {what} {n} ops ahead on {} (errno {errno})",
            d.path().display()
        ));
        self.faulted = true;
    }

    /// After an error in a fault case, what the volumes read is the truth for later snapshots
    /// (a write may have done part of its range, a queued write may have been dropped).
    fn reread_after_error(&mut self) {
        let s = self.store().clone();
        for o in 0..self.origins.len() {
            if let Ok(got) = common::try_read_all(&s, &oname(o)) {
                self.origins[o].cur = got;
            }
        }
        let names: Vec<String> = self.snaps.keys().cloned().collect();
        for name in names {
            if self.snaps[&name].track.is_none() {
                continue;
            }
            match common::try_read_all(&s, &name) {
                Ok(got) => {
                    self.snaps
                        .get_mut(&name)
                        .unwrap()
                        .track
                        .as_mut()
                        .unwrap()
                        .cur = got
                }
                Err(Error::SnapshotInvalid { .. }) => {
                    self.log.push(format!("  ({name} is invalid now)"));
                    self.invalid.insert(name.clone());
                    self.snaps.remove(&name);
                }
                Err(Error::NotFound(_)) if self.snaps[&name].life != Life::Live => {}
                Err(e) => self.fail(format!("read {name} after an injected fault: {e}")),
            }
        }
    }

    /// One random engine call. Ok(false) when it failed because the power is off.
    fn step(&mut self) -> bool {
        if self.faults && self.rng.random_bool(0.04) {
            self.inject_fault();
        }
        let wsnaps: Vec<String> = self
            .snaps
            .iter()
            .filter(|(_, s)| s.writable)
            .map(|(n, _)| n.clone())
            .collect();
        // Draw until the kind of call is possible now.
        let kind = loop {
            let k = self.rng.random_range(0..100);
            let ok = match k {
                43..=57 => self.snaps.len() < self.max_snaps(),
                58..=84 => !wsnaps.is_empty(),
                85..=91 => !self.snaps.is_empty(),
                _ => true,
            };
            if ok {
                break k;
            }
        };
        let r: Result<(), Error> = match kind {
            32..=34 => self.burst(&wsnaps),
            0..=31 => {
                let o = self.rng.random_range(0..self.origins.len());
                let (off, len) = self.range(self.origins[o].cur.len() as u64);
                let fua = self.rng.random_bool(0.1);
                // Some are TRIMs: copy-outs (zero entries where it read as zeros already), then
                // a hole punched in the origin, lost or kept by a crash like a write.
                let trim = self.rng.random_bool(0.15);
                let data = if trim {
                    vec![0u8; len]
                } else {
                    pattern(self.rng.random(), len)
                };
                let what = if trim { "trim" } else { "write" };
                self.log
                    .push(format!("{what} {} {off}+{len} fua {fua}", oname(o)));
                let r = self.store().volume(&oname(o)).and_then(|v| {
                    if trim {
                        v.zero_range(off, len as u64, true, fua)
                    } else {
                        v.write_at(off, &data, fua)
                    }
                });
                self.history.push((oname(o), off, data.clone()));
                self.origins[o].write(off, &data, r.is_ok());
                if r.is_ok() && fua {
                    // FUA makes this write durable, not the origin's other queued writes.
                    self.origins[o].flushed_range(off, &data);
                }
                r
            }
            35..=42 => {
                let o = self.rng.random_range(0..self.origins.len());
                self.log.push(format!("flush {}", oname(o)));
                let r = self.store().volume(&oname(o)).and_then(|v| v.flush());
                if r.is_ok() {
                    self.origins[o].flushed();
                }
                r
            }
            43..=57 => self.create(),
            58..=77 => {
                let name = wsnaps[self.rng.random_range(0..wsnaps.len())].clone();
                let size = self.snaps[&name].content().len() as u64;
                let (off, len) = self.range(size);
                let data = pattern(self.rng.random(), len);
                let fua = self.rng.random_bool(0.1);
                self.log.push(format!("write {name} {off}+{len} fua {fua}"));
                let r = self
                    .store()
                    .volume(&name)
                    .and_then(|v| v.write_at(off, &data, fua));
                self.history.push((name.clone(), off, data.clone()));
                // A write refused for space partway (a full store) did its first chunks: what
                // the volume holds now is the truth for that range.
                let now = match &r {
                    Err(Error::NoSpace(_)) if self.full => {
                        let mut buf = vec![0u8; len];
                        self.store()
                            .volume(&name)
                            .and_then(|v| v.read_at(off, &mut buf))
                            .ok()
                            .map(|()| buf)
                    }
                    _ => None,
                };
                let t = self.snaps.get_mut(&name).unwrap().track.as_mut().unwrap();
                t.write(off, &data, r.is_ok());
                if let Some(buf) = now {
                    t.cur[off as usize..off as usize + len].copy_from_slice(&buf);
                }
                if r.is_ok() && fua {
                    t.flushed();
                }
                r
            }
            78..=84 => {
                let name = wsnaps[self.rng.random_range(0..wsnaps.len())].clone();
                self.log.push(format!("flush {name}"));
                let r = self.store().volume(&name).and_then(|v| v.flush());
                if r.is_ok() {
                    let t = self.snaps.get_mut(&name).unwrap().track.as_mut().unwrap();
                    t.flushed();
                }
                r
            }
            85..=91 => {
                let names = self.live_snaps();
                let name = names[self.rng.random_range(0..names.len())].clone();
                self.log.push(format!("delete {name}"));
                let r = self.store().delete_snapshot(&name);
                if r.is_ok() {
                    self.snaps.remove(&name);
                } else {
                    self.snaps.get_mut(&name).unwrap().life = Life::MaybeDeleted;
                }
                r
            }
            92..=94 => {
                self.log.push("checkpoint".into());
                self.store().checkpoint()
            }
            95..=97 => {
                self.log.push("sync".into());
                self.store().sync()
            }
            _ => {
                self.log.push("reclaim".into());
                self.store().reclaim()
            }
        };
        match r {
            Ok(()) => true,
            Err(e) if self.m.is_off() => {
                self.log
                    .push(format!("  -> cut off by the power loss: {e}"));
                false
            }
            Err(e @ (Error::NoSpace(_) | Error::SnapshotInvalid { .. } | Error::NotFound(_)))
                if self.full =>
            {
                self.log
                    .push(format!("  -> refused, the store is full: {e}"));
                true
            }
            Err(e) if self.faulted => {
                self.log.push(format!("  -> failed after a fault: {e}"));
                self.reread_after_error();
                true
            }
            Err(e) => self.fail(format!("unexpected error with power on: {e}")),
        }
    }

    /// Many small writes to one volume, a flush every 16: hundreds of journal groups, so the
    /// journal fills and checkpoints itself (and a power loss can land in that checkpoint).
    fn burst(&mut self, wsnaps: &[String]) -> Result<(), Error> {
        let mut vols: Vec<String> = (0..self.origins.len()).map(oname).collect();
        vols.extend(wsnaps.iter().cloned());
        let name = vols[self.rng.random_range(0..vols.len())].clone();
        let n = self.rng.random_range(50..300);
        self.log.push(format!("burst of {n} writes to {name}"));
        let v = self.store().volume(&name)?;
        let size = v.size();
        for i in 0..n {
            let len = self.rng.random_range(1..=4096u64).min(size);
            let off = self.rng.random_range(0..=size - len);
            let data = pattern(self.rng.random(), len as usize);
            let r = v.write_at(off, &data, false);
            let flush = r.is_ok() && i % 16 == 15;
            let f = if flush { v.flush() } else { Ok(()) };
            self.history.push((name.clone(), off, data.clone()));
            // Refused for space partway (a full store): the volume holds the truth.
            let now = match &r {
                Err(Error::NoSpace(_)) if self.full => {
                    let mut buf = vec![0u8; len as usize];
                    v.read_at(off, &mut buf).ok().map(|()| buf)
                }
                _ => None,
            };
            let t = match name.split_once('@') {
                None => &mut self.origins[name[1..].parse::<usize>().unwrap()],
                Some(_) => self.snaps.get_mut(&name).unwrap().track.as_mut().unwrap(),
            };
            t.write(off, &data, r.is_ok());
            if let Some(buf) = now {
                t.cur[off as usize..(off + len) as usize].copy_from_slice(&buf);
            }
            if flush && f.is_ok() {
                t.flushed();
            }
            if let Err(e) = r.and(f) {
                self.log.push(format!("  (at write {i}: {off}+{len})"));
                return Err(e);
            }
        }
        Ok(())
    }

    fn create(&mut self) -> Result<(), Error> {
        // Sources: the origin or any snapshot; sometimes a set over both origins.
        let mut srcs: Vec<(String, usize)> = Vec::new();
        let pick = |c: &mut Case, o: usize| -> String {
            if c.deep {
                // The newest live snapshot of the origin: the chain grows.
                if let Some((n, _)) = c
                    .snaps
                    .iter()
                    .filter(|(_, s)| s.origin == o && s.life == Life::Live)
                    .max_by_key(|(_, s)| s.set)
                {
                    return n.clone();
                }
            }
            let mut cands = vec![oname(o)];
            cands.extend(
                c.snaps
                    .iter()
                    .filter(|(_, s)| s.origin == o)
                    .map(|(n, _)| n.clone()),
            );
            cands[c.rng.random_range(0..cands.len())].clone()
        };
        // A deep case takes sets over both origins more often: both chains grow.
        let both = if self.deep { 0.5 } else { 0.25 };
        if self.origins.len() == 2 && self.rng.random_bool(both) {
            for o in 0..2 {
                let n = pick(self, o);
                srcs.push((n, o));
            }
        } else {
            let o = self.rng.random_range(0..self.origins.len());
            let n = pick(self, o);
            srcs.push((n, o));
        }
        let writable = self.rng.random_bool(0.4);
        let tag = format!("t{}", self.next_tag);
        self.next_tag += 1;
        let set = self.next_set;
        self.next_set += 1;
        let names: Vec<&str> = srcs.iter().map(|(n, _)| n.as_str()).collect();
        self.log
            .push(format!("create {names:?} tag {tag} writable {writable}"));
        let r = self
            .store()
            .create_snapshot(&names, Some(&tag), "", writable)
            .map(|_| ());
        for (src, o) in &srcs {
            let content = if src.contains('@') {
                self.snaps[src].content().to_vec()
            } else {
                self.origins[*o].cur.clone()
            };
            self.snaps.insert(
                format!("{}@{tag}", oname(*o)),
                SnapM {
                    origin: *o,
                    writable,
                    track: writable.then(|| Track::new(content.clone())),
                    created: Arc::new(content),
                    life: if r.is_ok() {
                        Life::Live
                    } else {
                        Life::MaybeCreated
                    },
                    set,
                },
            );
        }
        r
    }

    /// Run a workload, crash, recover (perhaps crashing during recovery too), verify.
    fn round(&mut self, mode: Mode, recovery_crashes: u32) {
        let ops = self.rng.random_range(1..40);
        match mode {
            Mode::Between => {
                for _ in 0..ops {
                    assert!(self.step());
                }
                self.log.push("--- crash between calls".into());
            }
            Mode::Inside => {
                let n = self.rng.random_range(0..ops * 4);
                self.m.power_off_after(n);
                self.log
                    .push(format!("--- power off after {n} more device ops"));
                for _ in 0..ops {
                    if !self.step() {
                        break;
                    }
                }
            }
        }
        let policy = CrashPolicy::random(&mut self.rng);
        self.log.push(format!("--- crash: {policy:?}"));
        self.s = None;
        let mut m = self.m.crash_all_with(&mut self.rng, policy);
        for _ in 0..recovery_crashes {
            let n = self.rng.random_range(0..10);
            m.power_off_after(n);
            let r = m.open_store(&self.opts);
            let policy = CrashPolicy::random(&mut self.rng);
            self.log.push(format!(
                "--- recovery cut after {n} device ops ({}), crash: {policy:?}",
                match &r {
                    Ok(_) => "it completed".to_string(),
                    Err(e) => format!("{e}"),
                }
            ));
            drop(r);
            m = m.crash_all_with(&mut self.rng, policy);
        }
        self.m = m;
        let s = match self.m.open_store(&self.opts) {
            Ok(s) => s,
            Err(e) => self.fail(format!("recovery failed: {e}")),
        };
        self.s = Some(s);
        self.verify();
    }

    /// Check (a)-(d) after a recovery, then take what survived as the new baseline.
    fn verify(&mut self) {
        let s = self.store().clone();
        let r = s.check();
        if !r.is_clean() {
            self.fail(format!("check after recovery: {:#?}", r.errors));
        }
        let listed: BTreeMap<String, _> = s
            .snapshots()
            .into_iter()
            .map(|i| (i.name.clone(), i))
            .collect();
        for (name, info) in &listed {
            if (self.full || self.faults)
                && info.state == SnapshotState::Invalid
                && !self.invalid.contains(name)
            {
                // Invalidated for space: never readable again, whatever it held.
                if self.snaps.contains_key(name) {
                    self.invalid.insert(name.clone());
                    if common::try_read_all(&s, name).is_ok() {
                        self.fail(format!("{name} is invalid but reads"));
                    }
                    continue;
                }
            }
            if self.invalid.contains(name) {
                continue;
            }
            let Some(sm) = self.snaps.get(name) else {
                self.fail(format!(
                    "{name} exists after recovery but was never created, or its delete returned"
                ));
            };
            if info.state != SnapshotState::Valid {
                self.fail(format!("{name} is {:?}: {:?}", info.state, info.reason));
            }
            if info.writable != sm.writable {
                self.fail(format!("{name}: writable flag changed"));
            }
        }
        // A set whose creation was cut off is all-or-nothing.
        let mut sets: BTreeMap<u64, (usize, usize)> = BTreeMap::new();
        for (name, sm) in &self.snaps {
            if sm.life == Life::MaybeCreated {
                let e = sets.entry(sm.set).or_default();
                e.0 += 1;
                if listed.contains_key(name) {
                    e.1 += 1;
                }
            }
            if sm.life == Life::Live && !listed.contains_key(name) {
                self.fail(format!("{name}: its creation returned, but it is gone"));
            }
        }
        for (set, (n, there)) in sets {
            if there != 0 && there != n {
                let members: Vec<&String> = self
                    .snaps
                    .iter()
                    .filter(|(_, s)| s.set == set)
                    .map(|(n, _)| n)
                    .collect();
                self.fail(format!(
                    "snapshot set {members:?}: {there} of {n} survived (not atomic)"
                ));
            }
        }
        // Contents.
        let names: Vec<String> = self.snaps.keys().cloned().collect();
        for name in names {
            if self.invalid.contains(&name) {
                self.snaps.remove(&name);
                continue;
            }
            if !listed.contains_key(&name) {
                self.snaps.remove(&name);
                continue;
            }
            let got = match common::try_read_all(&s, &name) {
                Ok(g) => g,
                Err(e) => self.fail(format!("read {name} after recovery: {e}")),
            };
            let sm = &self.snaps[&name];
            let verdict = match &sm.track {
                None => first_diff(&got, &sm.created).map(|d| {
                    let i = got.iter().zip(sm.created.iter()).position(|(a, b)| a != b);
                    let hint = i.map(|i| self.suspects(&got, i)).unwrap_or_default();
                    format!("read-only snapshot changed: {d}{hint}")
                }),
                Some(t) => t
                    .explain(&got)
                    .err()
                    .map(|(i, m)| format!("{m}{}", self.suspects(&got, i))),
            };
            if let Some(v) = verdict {
                self.fail(format!("{name} ({:?}) after recovery: {v}", sm.life));
            }
            let sm = self.snaps.get_mut(&name).unwrap();
            sm.life = Life::Live;
            if let Some(t) = &mut sm.track {
                *t = Track::new(got);
            }
        }
        for i in 0..self.origins.len() {
            let got = read_all(&s, &oname(i));
            if let Err((at, e)) = self.origins[i].explain(&got) {
                let hint = self.suspects(&got, at);
                self.fail(format!("origin {} after recovery: {e}{hint}", oname(i)));
            }
            self.origins[i] = Track::new(got);
        }
        self.faulted = false;
        self.log.push("--- recovered and verified".into());
    }
}

/// 120 cases x 3 rounds: crashes between engine calls.
#[test]
fn crash_between_calls() {
    for seed in seeds(1_000, 120) {
        let mut c = Case::new(seed);
        for _ in 0..3 {
            c.round(Mode::Between, 0);
        }
    }
}

/// 150 cases x 3 rounds: the power goes off in the middle of an engine call.
#[test]
fn crash_inside_calls() {
    for seed in seeds(2_000, 150) {
        let mut c = Case::new(seed);
        for _ in 0..3 {
            c.round(Mode::Inside, 0);
        }
    }
}

/// 80 cases x 2 rounds: crash inside a call, then crash again while recovering (1-2 times).
#[test]
fn crash_during_recovery() {
    for seed in seeds(3_000, 80) {
        let mut c = Case::new(seed);
        for r in 0..2 {
            let mode = if seed % 2 == 0 {
                Mode::Inside
            } else {
                Mode::Between
            };
            c.round(mode, 1 + r);
        }
    }
}

/// Snapshot trees of depth 20 and more (issue 8): 40 snapshots, each of the newest of its origin,
/// about half writable, with bursts of writes into the origins and writable snapshots at every
/// depth; then power cuts inside calls and between them (the same workload, its snapshots
/// still mostly chained), every volume verified after each recovery.
#[test]
fn crash_in_deep_snapshot_trees() {
    for seed in seeds(6_000, 40) {
        let mut c = Case::with(seed, true);
        for i in 0..40 {
            if let Err(e) = c.create() {
                c.fail(format!("create {i} of the chain: {e}"));
            }
            let wsnaps: Vec<String> = c
                .snaps
                .iter()
                .filter(|(_, s)| s.writable)
                .map(|(n, _)| n.clone())
                .collect();
            if let Err(e) = c.burst(&wsnaps) {
                c.fail(format!("burst after create {i}: {e}"));
            }
        }
        let depth = c.depth();
        c.log.push(format!("--- chain built: depth {depth}"));
        if depth < 20 {
            c.fail(format!("the snapshot tree is only {depth} deep"));
        }
        c.round(Mode::Inside, 0);
        c.round(Mode::Between, 0);
        c.round(Mode::Inside, 1);
    }
}

/// Long runs (bursts fill the 1 MiB journal several times, so it checkpoints itself) with the
/// power cut anywhere in them.
#[test]
fn crash_in_long_runs() {
    for seed in seeds(4_000, 40) {
        let mut c = Case::new(seed);
        for round in 0..3 {
            let ops = 300;
            let cut = c.rng.random_range(0..ops * 15);
            c.m.power_off_after(cut);
            c.log.push(format!(
                "--- round {round}: power off after {cut} device ops"
            ));
            for _ in 0..ops {
                if !c.step() {
                    break;
                }
            }
            let policy = CrashPolicy::random(&mut c.rng);
            c.log.push(format!("--- crash: {policy:?}"));
            c.s = None;
            c.m = c.m.crash_all_with(&mut c.rng, policy);
            c.s = Some(match c.m.open_store(&c.opts) {
                Ok(s) => s,
                Err(e) => c.fail(format!("recovery failed: {e}")),
            });
            c.verify();
        }
    }
}

/// Every possible power-loss point of one fixed workload, each with every crash policy shape.
#[test]
fn crash_at_every_device_op() {
    // Count the device operations of the whole workload on an undisturbed run.
    let run = |cut: Option<u64>, policy_seed: u64| {
        let mut c = Case::new(77);
        if let Some(n) = cut {
            c.m.power_off_after(n);
        }
        let ops_before = c.m.ops();
        for _ in 0..30 {
            if !c.step() {
                break;
            }
        }
        let used = c.m.ops() - ops_before;
        let mut prng = StdRng::seed_from_u64(policy_seed);
        let policy = match policy_seed % 4 {
            0 => CrashPolicy::DropAll,
            1 => CrashPolicy::KeepAll,
            2 => CrashPolicy::PrefixTornLast,
            _ => CrashPolicy::Random {
                drop: 0.5,
                tear: 0.3,
            },
        };
        c.log.push(format!("--- crash at {cut:?}: {policy:?}"));
        c.s = None;
        c.m = c.m.crash_all_with(&mut prng, policy);
        c.s = Some(match c.m.open_store(&c.opts) {
            Ok(s) => s,
            Err(e) => c.fail(format!("recovery failed: {e}")),
        });
        c.verify();
        used
    };
    let total = run(None, 0);
    assert!(total > 20, "the workload should do some I/O ({total} ops)");
    for cut in 0..total {
        for p in 0..4 {
            run(Some(cut), cut * 4 + p);
        }
    }
}

// ---- Poisoning: after a failed sync or write nothing more is written. ----

fn poison_setup() -> (tempfile::TempDir, SimMachine, Store, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let content = pattern(5, 1 << 20);
    let (m, s) = common::sim_setup(
        dir.path(),
        &format_opts(16 << 20, 65536),
        &[("o0", content.clone())],
    );
    s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
    s.create_snapshot(&["o0"], Some("w"), "", true).unwrap();
    (dir, m, s, content)
}

/// Everything that would write to the store after the poisoning fails with Poisoned and
/// writes nothing there. An origin write that needs no copy-out may still go to the origin
/// (it changes nothing the store vouches for); one that needs a copy-out fails.
fn assert_poisoned_and_inert(m: &SimMachine, s: &Store) {
    let store_disk = m.store_disk().unwrap();
    let before = store_disk.stats();
    let image = store_disk.volatile_image();
    let o = s.volume("o0").unwrap();
    let w = s.volume("o0@w").unwrap();
    let is_poisoned = |what: &str, r: Result<(), Error>| match r {
        Err(Error::Poisoned(msg)) => assert!(msg.contains("os error 5"), "{what}: {msg}"),
        other => panic!("{what} after poisoning: {other:?}, expected Poisoned"),
    };
    // Chunk 10 was never written: the snapshots still need its copy.
    is_poisoned("origin write", o.write_at(10 << 16, &[9u8; 4096], false));
    is_poisoned("snapshot write", w.write_at(70000, &[8u8; 5000], false));
    is_poisoned("snapshot flush", w.flush());
    is_poisoned(
        "create",
        s.create_snapshot(&["o0"], Some("b"), "", false).map(|_| ()),
    );
    is_poisoned("delete", s.delete_snapshot("o0@a"));
    is_poisoned("checkpoint", s.checkpoint());
    let after = store_disk.stats();
    assert_eq!(before.writes, after.writes, "a poisoned store wrote");
    assert_eq!(
        before.failed_writes, after.failed_writes,
        "a poisoned store tried to write"
    );
    assert!(
        image == store_disk.volatile_image(),
        "the store changed after the poisoning"
    );
    // Reads of what is there still work.
    let mut buf = vec![0u8; 4096];
    s.volume("o0@a").unwrap().read_at(0, &mut buf).unwrap();
    // Close reports the poisoning.
    assert!(matches!(s.clone().close(), Err(Error::Poisoned(_))));
}

/// Recovery after poisoning: what was acknowledged is there, the snapshot is intact.
fn assert_recovers(m: &SimMachine, content: &[u8]) {
    let mut rng = StdRng::seed_from_u64(1);
    let m2 = m.crash_all_with(&mut rng, CrashPolicy::DropAll);
    let s = m2.open_store(&OpenOptions::default()).unwrap();
    common::assert_clean(&s, "recovery after poisoning");
    common::assert_image("o0@a after poisoning", &read_all(&s, "o0@a"), content);
}

#[test]
fn failed_sync_poisons_the_store() {
    let (_d, m, s, content) = poison_setup();
    let o = s.volume("o0").unwrap();
    // The first origin write to a chunk needs a preserve, whose group commit syncs: fail it.
    m.store_disk().unwrap().fail_sync_after(1);
    let origin_before = m
        .disks()
        .iter()
        .find(|d| d.path().ends_with("o0"))
        .unwrap()
        .volatile_image();
    // The write waits for its preserve's commit behind the client's back (write-behind):
    // it is acknowledged, and the flush that should make it durable reports the failure.
    o.write_at(5000, &[7u8; 3000], false)
        .expect("a write without FUA is queued and acknowledged");
    match o.flush() {
        Err(Error::Io { op, source, .. }) => {
            assert_eq!(op, "deferred write");
            let msg = source.to_string();
            assert!(msg.contains("sync") && msg.contains("poisoned"), "{msg}");
        }
        other => panic!("flush after a failing preserve sync: {other:?}"),
    }
    // The lost write is not served either: the origin reads as it is.
    let mut buf = vec![0u8; 3000];
    o.read_at(5000, &mut buf).unwrap();
    assert!(
        buf[..] == content[5000..8000],
        "a dropped write is still read back"
    );
    // Invariant 2: the origin was not written, since the preserve never became durable.
    let origin_disk = m
        .disks()
        .into_iter()
        .find(|d| d.path().ends_with("o0"))
        .unwrap();
    assert!(
        origin_disk.volatile_image() == origin_before,
        "the origin changed although its preserve's sync failed"
    );
    assert_eq!(origin_disk.stats().writes, 0);
    assert_poisoned_and_inert(&m, &s);
    assert_recovers(&m, &content);
}

/// A failed journal write poisons the store (a data write that fails only fails its own
/// operation: tests/store_errors.rs). The snapshot write's data goes out first, then its
/// record's group; the second write fails, whether a flush or the background flusher issues it.
#[test]
fn failed_journal_write_poisons_the_store() {
    let (_d, m, s, content) = poison_setup();
    let w = s.volume("o0@w").unwrap();
    m.store_disk().unwrap().fail_write_after(2);
    w.write_at(12345, &[7u8; 3000], false)
        .expect("the data write succeeds");
    match w.flush() {
        Err(Error::Poisoned(msg)) => assert!(msg.contains("write"), "{msg}"),
        other => panic!("flush with a failing journal write: {other:?}"),
    }
    assert_poisoned_and_inert(&m, &s);
    assert_recovers(&m, &content);
}

#[test]
fn failed_checkpoint_sync_poisons_the_store() {
    let (_d, m, s, content) = poison_setup();
    s.volume("o0")
        .unwrap()
        .write_at(0, &[1u8; 200000], false)
        .unwrap();
    // Its copy-outs are durable (so later writes there need nothing from the store).
    s.volume("o0").unwrap().flush().unwrap();
    // A checkpoint writes its blocks, syncs, then the superblock: fail the first sync.
    m.store_disk().unwrap().fail_sync_after(1);
    assert!(matches!(s.checkpoint(), Err(Error::Poisoned(_))));
    // The origin stays writable where no copy-out is needed (chunk 0 was preserved before).
    let o = s.volume("o0").unwrap();
    o.write_at(0, &[2u8; 4096], false)
        .expect("an origin write without a copy-out on a poisoned store");
    let mut buf = [0u8; 4096];
    o.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, [2u8; 4096]);
    assert_poisoned_and_inert(&m, &s);
    assert_recovers(&m, &content);
}

/// Minor: `Store::sync()` on a poisoned store returns Ok when no record was appended since the
/// failure, although nothing can be made durable any more (DESIGN: "it stops writing and says
/// so"). Volume::flush reports Poisoned correctly; Store::sync should too.
#[test]
fn poisoned_store_sync_reports_the_poisoning() {
    let (_d, m, s, _) = poison_setup();
    m.store_disk().unwrap().fail_write_after(2);
    let w = s.volume("o0@w").unwrap();
    w.write_at(0, &[7u8; 4096], false).unwrap();
    assert!(matches!(w.flush(), Err(Error::Poisoned(_))));
    match s.sync() {
        Err(Error::Poisoned(_)) => {}
        other => panic!("Store::sync() on a poisoned store: {other:?}, expected Poisoned"),
    }
}

/// Found by `crash_during_recovery` (seed 4630 with MVSNAP_CRASH_CASES=4000).
///
/// Replay frees at once (no quarantine) a slot that an earlier record of the last, unsettled
/// journal group points at and a later record of that group replaces. Recovery's checkpoint may
/// then be written into that slot. If recovery crashes after the checkpoint's sync but before
/// the superblock points at it, the next recovery replays the same journal, finds that record's
/// data "torn" (the checkpoint overwrote it), stops replay there, and silently loses every later
/// record of the group, although they were durable: here a snapshot whose creation returned.
#[test]
fn crash_during_recovery_checkpoint_keeps_durable_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let (m, s) = common::sim_setup(
        dir.path(),
        &format_opts(16 << 20, 65536),
        &[("o0", pattern(1, 1 << 20))],
    );
    s.create_snapshot(&["o0"], Some("w"), "", true).unwrap();
    let w = s.volume("o0@w").unwrap();
    // Two writes to one chunk in one group: the second moves the chunk to a new slot, since the
    // first slot's record is not settled yet. Replay frees the first slot.
    w.write_at(4 << 16, &[1u8; 4096], false).unwrap();
    w.write_at(4 << 16, &[2u8; 4096], false).unwrap();
    let w_content = read_all(&s, "o0@w");
    s.create_snapshot(&["o0@w"], Some("t"), "", false).unwrap(); // returned: durable
    drop((w, s));
    let mut rng = StdRng::seed_from_u64(1);
    let m2 = m.crash_all_with(&mut rng, CrashPolicy::DropAll);
    // Recovery writes its checkpoint block and syncs; the power goes before the superblock.
    m2.power_off_after(2);
    assert!(m2.open_store(&OpenOptions::default()).is_err());
    let m3 = m2.crash_all_with(&mut rng, CrashPolicy::DropAll);
    let s = m3.open_store(&OpenOptions::default()).unwrap();
    let names = s.volume_names();
    assert!(
        names.contains(&"o0@t".to_string()),
        "snapshot o0@t (its creation returned) is gone after a crash during recovery: {names:?}"
    );
    common::assert_image("o0@t", &read_all(&s, "o0@t"), &w_content);
    common::assert_image("o0@w", &read_all(&s, "o0@w"), &w_content);
}

/// Found by `crash_between_calls` (seed 2930 with MVSNAP_CRASH_CASES=2500).
///
/// A writable snapshot `w` and its writable child `c` share chunk 0's slot X. `w` overwrites a
/// block: it moves to a new slot, and its MapWrite record (not yet durable) drops X's reference
/// count to 1. `c` then writes the same block: X now looks exclusive to `c`, so the data goes
/// into X in place, with no record. A crash loses `w`'s record (allowed: `w` was not flushed)
/// but keeps the in-place data write, and `w` maps X again: it reads `c`'s data, which it never
/// held. The reference drop must count as unsettled until its record is durable and settled.
#[test]
fn crash_keeps_parent_of_writable_child_intact() {
    let dir = tempfile::tempdir().unwrap();
    let v0 = pattern(1, 1 << 20);
    let (m, s) = common::sim_setup(
        dir.path(),
        &format_opts(16 << 20, 65536),
        &[("o0", v0.clone())],
    );
    s.create_snapshot(&["o0"], Some("w"), "", true).unwrap();
    let w = s.volume("o0@w").unwrap();
    w.write_at(0, &[1u8; 4096], false).unwrap();
    w.flush().unwrap();
    s.create_snapshot(&["o0@w"], Some("c"), "", true).unwrap(); // X's record is now settled
    let w_flushed = read_all(&s, "o0@w");
    w.write_at(0, &[2u8; 4096], false).unwrap(); // w: new slot, record pending
    let c = s.volume("o0@c").unwrap();
    c.write_at(0, &[3u8; 4096], false).unwrap(); // c: in place into X
    drop((w, c, s));
    let mut rng = StdRng::seed_from_u64(1);
    let m2 = m.crash_all_with(&mut rng, CrashPolicy::KeepAll);
    let s = m2.open_store(&OpenOptions::default()).unwrap();
    let got = read_all(&s, "o0@w");
    let mut w_new = w_flushed.clone();
    w_new[..4096].fill(2);
    assert!(
        got == w_flushed || got == w_new,
        "o0@w after a crash holds neither its flushed content nor its last write: block 0 \
         starts with {:#04x} (3 is what its child o0@c wrote)",
        got[0]
    );
}
