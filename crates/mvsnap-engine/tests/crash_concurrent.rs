//! Crash recovery with concurrent writers, on the power-loss simulator.
//!
//! Each round runs three worker threads and one control thread on one store at once, then the
//! power goes off at a random device operation (or after the last call), every disk crashes
//! with a random policy, and the store is recovered and verified.
//! - Workers write, TRIM (with FUA now and then) and flush the origins and the writable
//!   snapshots, and read the read-only snapshots. Of each four 4 KiB blocks of a volume, the
//!   first three belong to workers 0, 1 and 2 (each byte has one writer whose order is known),
//!   the fourth is shared: any worker writes it. So several threads write into one chunk, and
//!   into one block, at once: first-write copy-outs race with each other and with snapshot
//!   creation. (Without the engine's wait for in-flight copy-outs of a chunk, seed 5000 fails
//!   at once.)
//! - The control thread creates read-only and writable snapshots of those volumes while they are
//!   written, deletes others, checkpoints, reclaims and syncs.
//! - Every call is stamped with a shared clock before and after. A snapshot must hold, for each
//!   owned block, its owner's writes that returned before the creation began, and may hold any
//!   of its owner's writes that overlapped the creation, nothing else; a shared block may hold
//!   its value at the round's start or any write that began before the creation ended.
//!
//! Checked after every recovery: `check` is clean; a snapshot whose creation returned exists
//! and reads exactly what it read right after the round (and that content was explained as
//! above); a read-only snapshot reads exactly its content at creation, also during the round
//! while the origin is overwritten; each byte of an origin or writable snapshot holds its value
//! at its owner's last returned flush (or FUA write), or a value its owner wrote since (a shared
//! block: its value at the round's start, or any value written to it); a delete that returned
//! is gone.
//!
//! What it does not model: a flush by one thread vouching for another thread's writes (each
//! worker counts only its own flushes, which is weaker, never wrong); which of two racing
//! writes to a shared block is durable (only that the bytes are one of theirs); host errors
//! other than a failed sync, and a full store (tests/crash.rs); crashes during recovery
//! (tests/crash.rs). A quarter of the rounds plant one failed sync on the store or an origin:
//! from then on calls may fail, and a failed flush vouches for nothing.
//!
//! `MVSNAP_CRASH_SEED=N` runs one case with that seed; `MVSNAP_CRASH_CASES=N` runs N cases.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use mvsnap_engine::crashsim::{CrashPolicy, SimMachine};
use mvsnap_engine::{OpenOptions, SnapshotState, Store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::seeds;
use common::track::Track;
use common::{first_diff, format_opts, pattern, read_all};

const WORKERS: usize = 3;
const GROUP: usize = 4;
const BLOCK: usize = 4096;
const STORE_SIZE: u64 = 32 << 20;

/// The worker that writes this byte of every volume: of each four blocks, the first three
/// belong to workers 0, 1 and 2, the fourth is shared (None): any worker writes it, so two
/// threads write one block at once (copy-outs of the same block race).
fn owner(byte: usize) -> Option<usize> {
    match (byte / BLOCK) % 4 {
        3 => None,
        u => Some(u),
    }
}

fn origin_of(volume: &str) -> &str {
    volume.split_once('@').map_or(volume, |(o, _)| o)
}

/// One write or TRIM by a worker, stamped with the shared clock before and after.
struct WriteRec {
    vol: String,
    off: u64,
    data: Vec<u8>,
    start: u64,
    end: u64,
    ok: bool,
}

/// A snapshot creation by the control thread.
struct Created {
    name: String,
    source: String,
    writable: bool,
    start: u64,
    end: u64,
    ok: bool,
}

/// What one round may do, fixed before its threads start.
struct Plan {
    /// Origins and writable snapshots the workers write, with their content at the start.
    written: BTreeMap<String, Vec<u8>>,
    /// Read-only snapshots the workers read, with their exact content.
    read: BTreeMap<String, Vec<u8>>,
    /// Snapshots the control thread deletes (neither read nor written meanwhile).
    doomed: Vec<String>,
}

/// Shared by the threads of one round.
struct Round<'a> {
    store: &'a Store,
    m: &'a SimMachine,
    plan: &'a Plan,
    clock: AtomicU64,
    log: Mutex<Vec<String>>,
    failure: Mutex<Option<String>>,
}

impl Round<'_> {
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    fn note(&self, line: String) {
        self.log.lock().unwrap().push(line);
    }

    fn failed(&self, msg: String) {
        let mut f = self.failure.lock().unwrap();
        if f.is_none() {
            *f = Some(msg);
        }
    }

    fn stop(&self) -> bool {
        self.failure.lock().unwrap().is_some()
    }

    /// A planted sync failure has happened on some disk.
    fn faulted(&self) -> bool {
        self.m.disks().iter().any(|d| d.stats().failed_syncs > 0)
    }

    /// An error is expected only once the power is off or a planted sync failed; say whether
    /// the thread goes on.
    fn error(&self, who: &str, what: &str, e: &mvsnap_engine::Error) -> bool {
        if !self.m.is_off() && !self.faulted() {
            self.failed(format!(
                "{who}: {what}: unexpected error with power on: {e}"
            ));
        }
        false
    }
}

/// A worker: writes and TRIMs its own blocks, flushes, reads read-only snapshots.
fn worker(r: &Round, u: usize, seed: u64, ops: usize) -> (BTreeMap<String, Track>, Vec<WriteRec>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let who = format!("[w{u}]");
    let written: Vec<&String> = r.plan.written.keys().collect();
    let read: Vec<&String> = r.plan.read.keys().collect();
    let mut tracks: BTreeMap<String, Track> = r
        .plan
        .written
        .iter()
        .map(|(n, c)| (n.clone(), Track::new(c.clone())))
        .collect();
    let mut writes = Vec::new();
    for _ in 0..ops {
        if r.stop() {
            break;
        }
        let k = rng.random_range(0..100);
        if k < 60 {
            let vol = written[rng.random_range(0..written.len())].clone();
            let groups = r.plan.written[&vol].len() / BLOCK / GROUP;
            let shared = rng.random_bool(0.3);
            let b = GROUP * rng.random_range(0..groups) + if shared { GROUP - 1 } else { u };
            let (off, len) = if rng.random_bool(0.5) {
                (b * BLOCK, BLOCK)
            } else {
                let o = rng.random_range(0..BLOCK);
                (b * BLOCK + o, rng.random_range(1..=BLOCK - o))
            };
            let trim = rng.random_bool(0.1);
            let fua = rng.random_bool(0.1);
            let data = if trim {
                vec![0u8; len]
            } else {
                pattern(rng.random(), len)
            };
            let start = r.tick();
            let res = r.store.volume(&vol).and_then(|v| {
                if trim {
                    v.zero_range(off as u64, len as u64, true, fua)
                } else {
                    v.write_at(off as u64, &data, fua)
                }
            });
            let end = r.tick();
            let what = format!(
                "{} {vol} {off}+{len} fua {fua}",
                if trim { "trim" } else { "write" }
            );
            r.note(format!(
                "{who} {what} @{start}-{end}: {:?}",
                res.as_ref().err()
            ));
            let t = tracks.get_mut(&vol).unwrap();
            t.write(off as u64, &data, res.is_ok());
            if res.is_ok() && fua {
                t.flushed_range(off as u64, &data);
            }
            writes.push(WriteRec {
                vol,
                off: off as u64,
                data,
                start,
                end,
                ok: res.is_ok(),
            });
            if let Err(e) = res {
                if !r.error(&who, &what, &e) {
                    break;
                }
            }
        } else if k < 75 {
            let vol = written[rng.random_range(0..written.len())].clone();
            let res = r.store.volume(&vol).and_then(|v| v.flush());
            r.note(format!("{who} flush {vol}: {:?}", res.as_ref().err()));
            match res {
                Ok(()) => tracks.get_mut(&vol).unwrap().flushed(),
                Err(e) => {
                    if !r.error(&who, &format!("flush {vol}"), &e) {
                        break;
                    }
                }
            }
        } else if !read.is_empty() {
            let name = read[rng.random_range(0..read.len())];
            let want = &r.plan.read[name];
            let blocks = want.len() / BLOCK;
            let first = rng.random_range(0..blocks);
            let n = rng.random_range(1..=16.min(blocks - first));
            let (off, len) = (first * BLOCK, n * BLOCK);
            let mut buf = vec![0u8; len];
            match r
                .store
                .volume(name)
                .and_then(|v| v.read_at(off as u64, &mut buf))
            {
                // Wrong bytes are wrong whether the power is on or not.
                Ok(()) => {
                    if let Some(d) = first_diff(&buf, &want[off..off + len]) {
                        r.failed(format!(
                            "{who} read of read-only {name} at {off}+{len} during the round: {d}"
                        ));
                    }
                }
                Err(e) => {
                    if !r.error(&who, &format!("read {name}"), &e) {
                        break;
                    }
                }
            }
        }
    }
    (tracks, writes)
}

/// The control thread: snapshots of the volumes being written, deletes, checkpoints.
fn control(
    r: &Round,
    seed: u64,
    ops: usize,
    first_tag: u64,
) -> (Vec<Created>, Vec<(String, bool)>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sources: Vec<&String> = r.plan.written.keys().collect();
    sources.extend(r.plan.read.keys());
    let mut doomed = r.plan.doomed.clone();
    let mut created = Vec::new();
    let mut deleted = Vec::new();
    for i in 0..ops as u64 {
        if r.stop() {
            break;
        }
        let k = rng.random_range(0..100);
        let (what, res) = if k < 50 {
            let source = sources[rng.random_range(0..sources.len())].clone();
            let writable = rng.random_bool(0.4);
            let tag = format!("t{}", first_tag + i);
            let name = format!("{}@{tag}", origin_of(&source));
            let start = r.tick();
            let res = r
                .store
                .create_snapshot(&[&source], Some(&tag), "", writable)
                .map(|_| ());
            let end = r.tick();
            created.push(Created {
                name: name.clone(),
                source: source.clone(),
                writable,
                start,
                end,
                ok: res.is_ok(),
            });
            (
                format!("create {name} of {source} writable {writable} @{start}-{end}"),
                res,
            )
        } else if k < 70 && !doomed.is_empty() {
            let name = doomed.remove(rng.random_range(0..doomed.len()));
            let res = r.store.delete_snapshot(&name);
            deleted.push((name.clone(), res.is_ok()));
            (format!("delete {name}"), res)
        } else if k < 80 {
            ("checkpoint".to_string(), r.store.checkpoint())
        } else if k < 90 {
            ("reclaim".to_string(), r.store.reclaim())
        } else {
            ("sync".to_string(), r.store.sync())
        };
        r.note(format!("[ctl] {what}: {:?}", res.as_ref().err()));
        if let Err(e) = res {
            if !r.error("[ctl]", &what, &e) {
                break;
            }
        }
    }
    (created, deleted)
}

struct Case {
    seed: u64,
    rng: StdRng,
    _dir: tempfile::TempDir,
    m: SimMachine,
    s: Option<Store>,
    /// Origins and writable snapshots: their exact content now (after a recovery).
    rw: BTreeMap<String, Vec<u8>>,
    /// Read-only snapshots: their exact content.
    ro: BTreeMap<String, Vec<u8>>,
    next_tag: u64,
    log: Vec<String>,
    /// How every open of this case's store is made (see `common::crash_open_opts`).
    opts: OpenOptions,
}

impl Case {
    fn new(seed: u64) -> Case {
        let mut rng = StdRng::seed_from_u64(seed);
        let dir = tempfile::tempdir().unwrap();
        let (chunk, origins) = common::random_origins(&mut rng, seed);
        let norigins = origins.len();
        let named: Vec<(&str, Vec<u8>)> = origins
            .iter()
            .map(|(n, c)| (n.as_str(), c.clone()))
            .collect();
        let opts = common::crash_open_opts(&mut rng);
        let (m, s) =
            common::sim_setup_with(dir.path(), &format_opts(STORE_SIZE, chunk), &opts, &named);
        Case {
            seed,
            rng,
            _dir: dir,
            m,
            s: Some(s),
            rw: origins.into_iter().collect(),
            ro: BTreeMap::new(),
            next_tag: 1,
            log: vec![format!(
                "chunk {chunk}, {norigins} origins, overlay {:?}",
                opts.overlay_entries
            )],
            opts,
        }
    }

    #[track_caller]
    fn fail(&self, msg: String) -> ! {
        let keep = std::env::var("MVSNAP_CRASH_LOG")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(80);
        let start = self.log.len().saturating_sub(keep);
        panic!(
            "seed {}: {msg}\n--- last steps ---\n{}",
            self.seed,
            self.log[start..].join("\n")
        );
    }

    fn round(&mut self, n: usize) {
        // The plan: up to two snapshots to delete, the rest read or written.
        let mut snaps: Vec<String> = self.ro.keys().cloned().collect();
        snaps.extend(self.rw.keys().filter(|k| k.contains('@')).cloned());
        let mut doomed = Vec::new();
        while doomed.len() < 2 && !snaps.is_empty() && self.rng.random_bool(0.5) {
            doomed.push(snaps.remove(self.rng.random_range(0..snaps.len())));
        }
        let plan = Plan {
            written: self
                .rw
                .iter()
                .filter(|(k, _)| !doomed.contains(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            read: self
                .ro
                .iter()
                .filter(|(k, _)| !doomed.contains(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            doomed,
        };
        let cut = if self.rng.random_bool(0.15) {
            None
        } else {
            Some(self.rng.random_range(0..300))
        };
        if let Some(c) = cut {
            self.m.power_off_after(c);
        }
        // A quarter of the rounds: one sync of the store or of an origin fails, as the host
        // reports EIO (Linux drops the dirty pages it covered). Threads then sync beside each
        // other after the failure, which is how a commit once went durable over lost nodes.
        if self.rng.random_bool(0.25) {
            let disks = self.m.disks();
            let d = &disks[self.rng.random_range(0..disks.len())];
            let n = self.rng.random_range(1..30);
            d.fail_sync_after(n);
            self.log.push(format!(
                "--- fault: sync {n} ahead on {} fails",
                mvsnap_engine::BlockDev::path(&**d).display()
            ));
        }
        let seeds: Vec<u64> = (0..=WORKERS).map(|_| self.rng.random()).collect();
        let ops: Vec<usize> = (0..WORKERS)
            .map(|_| self.rng.random_range(20..80))
            .collect();
        let ctl_ops = self.rng.random_range(3..12);
        let first_tag = self.next_tag;
        self.next_tag += ctl_ops as u64;
        self.log.push(format!(
            "--- round {n}: power off after {cut:?} device ops; written {:?}, read {:?}, \
             doomed {:?}",
            plan.written.keys().collect::<Vec<_>>(),
            plan.read.keys().collect::<Vec<_>>(),
            plan.doomed
        ));

        let store = self.store().clone();
        let r = Round {
            store: &store,
            m: &self.m,
            plan: &plan,
            clock: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
            failure: Mutex::new(None),
        };
        let (outs, (created, deleted)) = std::thread::scope(|sc| {
            let workers: Vec<_> = (0..WORKERS)
                .map(|u| {
                    let r = &r;
                    let (seed, ops) = (seeds[u], ops[u]);
                    sc.spawn(move || worker(r, u, seed, ops))
                })
                .collect();
            let ctl = control(&r, seeds[WORKERS], ctl_ops, first_tag);
            let outs: Vec<_> = workers.into_iter().map(|h| h.join().unwrap()).collect();
            (outs, ctl)
        });
        self.log.append(&mut r.log.lock().unwrap());
        if let Some(msg) = r.failure.lock().unwrap().take() {
            self.fail(msg);
        }
        let (tracks, writes): (Vec<_>, Vec<_>) = outs.into_iter().unzip();
        let writes: Vec<WriteRec> = writes.into_iter().flatten().collect();

        // What each created snapshot may hold, and what it holds now (read back at once).
        let mut models: BTreeMap<String, (Track, Option<Vec<u8>>, &Created)> = BTreeMap::new();
        for c in &created {
            let model = self.creation_model(c, &plan, &writes);
            let now = if c.ok {
                match common::try_read_all(&store, &c.name) {
                    Ok(got) => {
                        if let Err((i, e)) = model.explain(&got) {
                            self.fail(format!(
                                "{} right after the round holds what its source never did at \
                                 its creation (owner {:?}): {e}",
                                c.name,
                                owner(i)
                            ));
                        }
                        Some(got)
                    }
                    Err(e) if self.m.is_off() || r.faulted() => {
                        self.log.push(format!("(read of {} failed: {e})", c.name));
                        None
                    }
                    Err(e) => self.fail(format!("read {} after the round: {e}", c.name)),
                }
            } else {
                None
            };
            models.insert(c.name.clone(), (model, now, c));
        }

        // The crash.
        let policy = CrashPolicy::random(&mut self.rng);
        self.log.push(format!("--- crash: {policy:?}"));
        drop(store);
        self.s = None;
        self.m = self.m.crash_all_with(&mut self.rng, policy);
        let s = match self.m.open_store(&self.opts) {
            Ok(s) => s,
            Err(e) => self.fail(format!("recovery failed: {e}")),
        };
        self.s = Some(s.clone());
        self.verify(&s, &plan, &tracks, &writes, &models, &deleted);
    }

    /// A snapshot of a read-only snapshot is exact. Of a written volume: its content at the
    /// round's start, with every write that returned before the creation began, and perhaps
    /// any write that overlapped the creation.
    fn creation_model(&self, c: &Created, plan: &Plan, writes: &[WriteRec]) -> Track {
        if let Some(content) = plan.read.get(&c.source) {
            return Track::new(content.clone());
        }
        let mut t = Track::new(plan.written[&c.source].clone());
        let mut mine: Vec<&WriteRec> = writes.iter().filter(|w| w.vol == c.source).collect();
        mine.sort_by_key(|w| w.end);
        for w in mine {
            let (lo, hi) = (w.off as usize, w.off as usize + w.data.len());
            if owner(lo).is_none() {
                // A shared block: which of two racing writes came last is not known.
                if w.start < c.end {
                    t.since.push((w.off, w.data.clone()));
                }
            } else if w.ok && w.end < c.start {
                t.flushed[lo..hi].copy_from_slice(&w.data);
                t.cur[lo..hi].copy_from_slice(&w.data);
            } else if w.start < c.end {
                t.since.push((w.off, w.data.clone()));
            }
        }
        t
    }

    fn verify(
        &mut self,
        s: &Store,
        plan: &Plan,
        tracks: &[BTreeMap<String, Track>],
        writes: &[WriteRec],
        models: &BTreeMap<String, (Track, Option<Vec<u8>>, &Created)>,
        deleted: &[(String, bool)],
    ) {
        let r = s.check();
        if !r.is_clean() {
            self.fail(format!("check after recovery: {:#?}", r.errors));
        }
        let gone: BTreeSet<&String> = deleted.iter().filter(|d| d.1).map(|d| &d.0).collect();
        let listed: BTreeMap<String, _> = s
            .snapshots()
            .into_iter()
            .map(|i| (i.name.clone(), i))
            .collect();
        for (name, info) in &listed {
            let known = self.ro.contains_key(name)
                || self.rw.contains_key(name)
                || models.contains_key(name);
            if !known || gone.contains(name) {
                self.fail(format!(
                    "{name} exists after recovery but was never created, or its delete returned"
                ));
            }
            if info.state != SnapshotState::Valid {
                self.fail(format!("{name} is {:?}: {:?}", info.state, info.reason));
            }
        }
        let maybe_deleted: BTreeSet<&String> =
            deleted.iter().filter(|d| !d.1).map(|d| &d.0).collect();
        let must_exist = self
            .ro
            .keys()
            .chain(self.rw.keys().filter(|k| k.contains('@')))
            .filter(|n| !gone.contains(n) && !maybe_deleted.contains(n))
            .chain(models.iter().filter(|(_, m)| m.2.ok).map(|(n, _)| n));
        for name in must_exist {
            if !listed.contains_key(name) {
                self.fail(format!(
                    "{name}: it was not deleted (or its creation returned), but it is gone"
                ));
            }
        }

        let mut rw = BTreeMap::new();
        let mut ro = BTreeMap::new();
        // Read-only snapshots of before the round: exact.
        for (name, want) in &self.ro {
            if !listed.contains_key(name) {
                continue;
            }
            let got = read_all(s, name);
            if let Some(d) = first_diff(&got, want) {
                self.fail(format!("read-only {name} changed: {d}"));
            }
            ro.insert(name.clone(), got);
        }
        // Written volumes: each byte as its owner left it.
        for (name, before) in &self.rw {
            if name.contains('@') && !listed.contains_key(name) {
                continue;
            }
            let got = read_all(s, name);
            if plan.written.contains_key(name) {
                let mine: Vec<&WriteRec> = writes.iter().filter(|w| &w.vol == name).collect();
                for (i, &b) in got.iter().enumerate() {
                    let Some(u) = owner(i) else {
                        // A shared block: its value at the start or any value written since.
                        if b == before[i] {
                            continue;
                        }
                        let written = mine.iter().any(|w| {
                            let off = w.off as usize;
                            i >= off && i < off + w.data.len() && w.data[i - off] == b
                        });
                        if !written {
                            self.fail(format!(
                                "{name} after recovery: byte {i} (shared block {}) is {b:#04x}: \
                                 neither its value at the start of the round nor one written since",
                                i / BLOCK
                            ));
                        }
                        continue;
                    };
                    let t = &tracks[u][name];
                    if !t.explains_byte(i, b) {
                        self.fail(format!(
                            "{name} after recovery: byte {i} (block {}, owner w{u}) is {b:#04x}: \
                             neither its value at w{u}'s last flush ({:#04x}) nor any of w{u}'s \
                             {} writes since",
                            i / BLOCK,
                            t.flushed[i],
                            t.since.len()
                        ));
                    }
                }
            } else if let Some(d) = first_diff(&got, before) {
                self.fail(format!("{name} (not written this round) changed: {d}"));
            }
            rw.insert(name.clone(), got);
        }
        // Snapshots created during the round.
        for (name, (model, now, c)) in models {
            if !listed.contains_key(name) {
                continue;
            }
            let got = read_all(s, name);
            let verdict = match now {
                Some(want) => first_diff(&got, want),
                None => model.explain(&got).err().map(|(_, e)| e),
            };
            if let Some(v) = verdict {
                self.fail(format!(
                    "{name} (created {}) after recovery: {v}",
                    if c.ok {
                        "and returned"
                    } else {
                        "by a call cut off"
                    }
                ));
            }
            if c.writable {
                rw.insert(name.clone(), got);
            } else {
                ro.insert(name.clone(), got);
            }
        }
        self.rw = rw;
        self.ro = ro;
        self.log.push("--- recovered and verified".into());
    }

    fn store(&self) -> &Store {
        self.s.as_ref().unwrap()
    }
}

/// 100 cases x 4 rounds: three writers, snapshots and deletes at once, then a power cut.
#[test]
fn crash_with_concurrent_writers() {
    for seed in seeds(5_000, 100) {
        let mut c = Case::new(seed);
        for n in 0..4 {
            c.round(n);
        }
    }
}
