//! The engine against a plain model: a state-machine property test (proptest-state-machine).
//!
//! The model is a map of volume name -> bytes. Random sequences of writes to the origins and to
//! writable snapshots at any depth (random offsets and lengths, unaligned too, across chunks),
//! snapshots of anything (read-only or writable, sometimes a set over two origins, sometimes
//! with an automatic tag or a tag that a deleted snapshot used), deletes anywhere (children
//! included), partial reads, zeroing, writes refused by read-only snapshots, bursts of hundreds
//! of small writes (the 1 MiB journal fills and checkpoints itself), flushes, checkpoints, and
//! reopen of the store (a clean close, or a sync and drop so the next open replays the
//! journal). After every step every live volume must read exactly what the model says, the
//! snapshot list (names, writable, parent, all valid) must match, and `check` must be clean.
//!
//! Volumes are small (256 KiB..1.5 MiB, some not a multiple of 4 KiB) and chunks are 4K/16K/64K,
//! so chunks are shared and re-preserved a lot. Most cases run on the crash simulator's disks
//! (memory, fast); a quarter on real files, so the file backend is exercised too; one in ten
//! is an ephemeral session (its snapshots vanish at reopen). The store starts small and grows.
//!
//! `concurrent_writers_and_snapshots` adds threads: writers, a snapshotter and a reader, against
//! a looser model (each snapshot holds a prefix of every writer's writes, and never changes).
//!
//! `PROPTEST_CASES` overrides the case count (default 512; up to 48 steps each).
//! Anything it ever finds becomes a named `regression_*` test at the end of this file.

mod common;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use mvsnap_engine::crashsim::SimMachine;
use mvsnap_engine::{Error, OpenOptions, SnapshotState, Store};
use proptest::prelude::*;
use proptest::strategy::Union;
use proptest::test_runner::Config;
use proptest_state_machine::{prop_state_machine, ReferenceStateMachine, StateMachineTest};

use common::{assert_clean, assert_image, format_opts, pattern};

/// Live snapshots at most (keeps the per-step full read-back fast).
const MAX_SNAPS: usize = 10;
/// Small enough that the journal is 1 MiB (bursts fill it: checkpoints mid-run); the store grows
/// on demand up to `STORE_MAX`, so it never fills and the model needs no invalidation.
const STORE_SIZE: u64 = 16 << 20;
const STORE_MAX: u64 = 256 << 20;
const ORIGIN_IDS: [&str; 2] = ["o0", "o1"];

#[derive(Clone)]
struct Vol {
    origin: usize,
    data: Arc<Vec<u8>>,
    writable: bool,
    /// `""` for an origin, else the name of the volume it was taken from.
    parent: String,
}

impl fmt::Debug for Vol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = crc32c::crc32c(&self.data);
        write!(
            f,
            "Vol{{len {}, crc {h:08x}, writable {}, parent {:?}}}",
            self.data.len(),
            self.writable,
            self.parent
        )
    }
}

#[derive(Clone, Debug)]
struct Model {
    chunk: u32,
    sim: bool,
    /// Opened `--ephemeral`: nothing synced, every snapshot gone at close.
    ephemeral: bool,
    /// Preserved entries held before the fold into the index (None: the default, more than
    /// these small origins ever preserve).
    overlay: Option<usize>,
    sizes: Vec<u64>,
    vols: BTreeMap<String, Vol>,
    next_tag: u32,
    /// (origin, tag) of deleted snapshots: their tags may be used again.
    deleted: Vec<(usize, String)>,
}

impl Model {
    fn origin_name(i: usize) -> String {
        ORIGIN_IDS[i].to_string()
    }

    fn snaps(&self) -> usize {
        self.vols.keys().filter(|n| n.contains('@')).count()
    }

    fn tag_live(&self, origin: usize, tag: &str) -> bool {
        self.vols
            .contains_key(&format!("{}@{tag}", ORIGIN_IDS[origin]))
    }

    /// What the engine's automatic tag picks: the lowest number free on every origin involved.
    fn auto_tag(&self, origins: &[usize]) -> String {
        (1u64..)
            .map(|n| n.to_string())
            .find(|t| origins.iter().all(|&o| !self.tag_live(o, t)))
            .unwrap()
    }
}

#[derive(Clone, Debug)]
enum Tag {
    Named(String),
    Auto,
}

#[derive(Clone, Debug)]
enum Op {
    /// Write pattern(seed) to a writable volume (an origin or a writable snapshot).
    Write {
        vol: String,
        off: u64,
        len: usize,
        seed: u64,
        fua: bool,
    },
    /// write_zeroes / trim.
    Zero {
        vol: String,
        off: u64,
        len: usize,
    },
    /// Many small writes spread over a volume, a flush every 16: hundreds of journal groups
    /// (one per preserve or flush), so the journal fills and checkpoints itself mid-run.
    Burst {
        vol: String,
        n: u32,
        seed: u64,
    },
    /// A write to a read-only snapshot: must fail with ReadOnly and change nothing.
    WriteReadOnly {
        vol: String,
        off: u64,
    },
    Read {
        vol: String,
        off: u64,
        len: usize,
    },
    Create {
        srcs: Vec<String>,
        tag: Tag,
        writable: bool,
    },
    Delete {
        vol: String,
    },
    Flush {
        vol: String,
    },
    Checkpoint,
    /// `clean`: close and open. Else: sync, drop without closing, open (journal replay).
    Reopen {
        clean: bool,
    },
}

/// An (offset, length) inside a volume of `size` bytes: small unaligned, whole blocks,
/// anything up to three chunks, or whole chunks.
fn range_strategy(size: u64, chunk: u64) -> impl Strategy<Value = (u64, usize)> {
    let max_len = size.min(3 * chunk + 5000).max(1);
    (0u8..4, 1..=max_len, any::<prop::sample::Index>()).prop_map(move |(kind, raw, idx)| {
        let (len, align) = match kind {
            0 => (raw % 600 + 1, 1),
            1 => ((raw % 8 + 1) * 4096, 4096),
            2 => (raw, 1),
            _ => ((raw % 3 + 1) * chunk, chunk),
        };
        let len = len.min(size);
        let off = idx.index((size - len + 1) as usize) as u64 / align * align;
        (off, len as usize)
    })
}

/// The writes of a burst: (offset, data), deterministic from the seed.
fn burst_writes(size: u64, n: u32, seed: u64) -> Vec<(u64, Vec<u8>)> {
    (0..n as u64)
        .map(|i| {
            let r = pattern(seed.wrapping_add(i), 16);
            let len = (u64::from_le_bytes(r[..8].try_into().unwrap()) % 4096 + 1).min(size);
            let off = u64::from_le_bytes(r[8..].try_into().unwrap()) % (size - len + 1);
            (off, pattern(seed ^ (i << 32), len as usize))
        })
        .collect()
}

struct EngineModel;

impl ReferenceStateMachine for EngineModel {
    type State = Model;
    type Transition = Op;

    fn init_state() -> BoxedStrategy<Model> {
        let sizes = prop::sample::select(vec![
            256u64 << 10,
            512 << 10,
            (768 << 10) + 3 * 4096,
            1 << 20,
            (1 << 20) + 1000,
            3 << 19,
        ]);
        (
            prop::sample::select(vec![4096u32, 16384, 65536]),
            prop::bool::weighted(0.75),
            prop::bool::weighted(0.1),
            any::<u64>(),
            prop::collection::vec(sizes, 1..=2),
            prop::option::weighted(0.5, 1usize..40),
        )
            .prop_map(|(chunk, sim, ephemeral, seed, sizes, overlay)| {
                let mut vols = BTreeMap::new();
                for (i, &sz) in sizes.iter().enumerate() {
                    vols.insert(
                        Model::origin_name(i),
                        Vol {
                            origin: i,
                            data: Arc::new(pattern(seed ^ i as u64, sz as usize)),
                            writable: true,
                            parent: String::new(),
                        },
                    );
                }
                Model {
                    chunk,
                    overlay,
                    sim,
                    ephemeral,
                    sizes,
                    vols,
                    next_tag: 1,
                    deleted: Vec::new(),
                }
            })
            .boxed()
    }

    fn transitions(state: &Model) -> BoxedStrategy<Op> {
        let chunk = state.chunk as u64;
        let all: Vec<(String, u64)> = state
            .vols
            .iter()
            .map(|(n, v)| (n.clone(), v.data.len() as u64))
            .collect();
        let origins: Vec<(String, u64)> = all
            .iter()
            .filter(|(n, _)| !n.contains('@'))
            .cloned()
            .collect();
        let wsnaps: Vec<(String, u64)> = all
            .iter()
            .filter(|(n, _)| n.contains('@') && state.vols[n].writable)
            .cloned()
            .collect();
        let rosnaps: Vec<String> = state
            .vols
            .iter()
            .filter(|(n, v)| n.contains('@') && !v.writable)
            .map(|(n, _)| n.clone())
            .collect();
        let snaps: Vec<String> = all
            .iter()
            .filter(|(n, _)| n.contains('@'))
            .map(|(n, _)| n.clone())
            .collect();

        let write = |vols: Vec<(String, u64)>| {
            prop::sample::select(vols)
                .prop_flat_map(move |(vol, size)| {
                    (
                        Just(vol),
                        range_strategy(size, chunk),
                        any::<u64>(),
                        prop::bool::weighted(0.1),
                    )
                })
                .prop_map(|(vol, (off, len), seed, fua)| Op::Write {
                    vol,
                    off,
                    len,
                    seed,
                    fua,
                })
                .boxed()
        };
        let mut arms: Vec<(u32, BoxedStrategy<Op>)> = vec![
            (30, write(origins.clone())),
            (
                5,
                prop::sample::select(all.clone())
                    .prop_flat_map(move |(vol, size)| (Just(vol), range_strategy(size, chunk)))
                    .prop_map(|(vol, (off, len))| Op::Read { vol, off, len })
                    .boxed(),
            ),
            (
                3,
                prop::sample::select(all.clone())
                    .prop_map(|(vol, _)| Op::Flush { vol })
                    .boxed(),
            ),
            (2, Just(Op::Checkpoint).boxed()),
            (
                5,
                any::<bool>().prop_map(|clean| Op::Reopen { clean }).boxed(),
            ),
        ];
        if !wsnaps.is_empty() {
            arms.push((25, write(wsnaps.clone())));
            let z: Vec<(String, u64)> = wsnaps.iter().chain(&origins).cloned().collect();
            arms.push((
                3,
                prop::sample::select(z)
                    .prop_flat_map(move |(vol, size)| (Just(vol), range_strategy(size, chunk)))
                    .prop_map(|(vol, (off, len))| Op::Zero { vol, off, len })
                    .boxed(),
            ));
        }
        let burst_vols: Vec<String> = origins
            .iter()
            .chain(&wsnaps)
            .map(|(n, _)| n.clone())
            .collect();
        arms.push((
            2,
            (prop::sample::select(burst_vols), 50u32..400, any::<u64>())
                .prop_map(|(vol, n, seed)| Op::Burst { vol, n, seed })
                .boxed(),
        ));
        if !rosnaps.is_empty() {
            arms.push((
                2,
                (prop::sample::select(rosnaps), 0u64..4096)
                    .prop_map(|(vol, off)| Op::WriteReadOnly { vol, off })
                    .boxed(),
            ));
        }
        if !snaps.is_empty() {
            arms.push((
                8,
                prop::sample::select(snaps)
                    .prop_map(|vol| Op::Delete { vol })
                    .boxed(),
            ));
        }
        if state.snaps() < MAX_SNAPS {
            let names: Vec<String> = all.iter().map(|(n, _)| n.clone()).collect();
            let by_origin: Vec<Vec<String>> = (0..state.sizes.len())
                .map(|o| {
                    names
                        .iter()
                        .filter(|n| state.vols[*n].origin == o)
                        .cloned()
                        .collect()
                })
                .collect();
            let fresh = format!("t{}", state.next_tag);
            let mut tags: Vec<(u32, BoxedStrategy<Tag>)> = vec![
                (6, Just(Tag::Named(fresh)).boxed()),
                (2, Just(Tag::Auto).boxed()),
            ];
            if !state.deleted.is_empty() {
                let reuse: Vec<String> = state.deleted.iter().map(|(_, t)| t.clone()).collect();
                tags.push((2, prop::sample::select(reuse).prop_map(Tag::Named).boxed()));
            }
            let tag = Union::new_weighted(tags);
            let srcs: BoxedStrategy<Vec<String>> = if by_origin.len() == 2 {
                let (a, b) = (by_origin[0].clone(), by_origin[1].clone());
                prop_oneof![
                    4 => prop::sample::select(names).prop_map(|n| vec![n]),
                    1 => (prop::sample::select(a), prop::sample::select(b))
                        .prop_map(|(a, b)| vec![a, b]),
                ]
                .boxed()
            } else {
                prop::sample::select(names).prop_map(|n| vec![n]).boxed()
            };
            arms.push((
                18,
                (srcs, tag, prop::bool::weighted(0.4))
                    .prop_map(|(srcs, tag, writable)| Op::Create {
                        srcs,
                        tag,
                        writable,
                    })
                    .boxed(),
            ));
        }
        Union::new_weighted(arms).boxed()
    }

    fn preconditions(state: &Model, op: &Op) -> bool {
        let fits = |vol: &str, off: u64, len: usize| {
            state
                .vols
                .get(vol)
                .is_some_and(|v| off + len as u64 <= v.data.len() as u64)
        };
        match op {
            Op::Write { vol, off, len, .. } | Op::Zero { vol, off, len } => {
                fits(vol, *off, *len) && state.vols[vol].writable
            }
            Op::Read { vol, off, len } => fits(vol, *off, *len),
            Op::Burst { vol, .. } => state.vols.get(vol).is_some_and(|v| v.writable),
            Op::WriteReadOnly { vol, .. } => state.vols.get(vol).is_some_and(|v| !v.writable),
            Op::Create { srcs, tag, .. } => {
                let Some(origins) = srcs
                    .iter()
                    .map(|s| state.vols.get(s).map(|v| v.origin))
                    .collect::<Option<Vec<usize>>>()
                else {
                    return false;
                };
                let distinct = origins.len() == 1 || origins[0] != origins[1];
                let tag_free = match tag {
                    Tag::Named(t) => origins.iter().all(|&o| !state.tag_live(o, t)),
                    Tag::Auto => true,
                };
                distinct && tag_free && state.snaps() + srcs.len() <= MAX_SNAPS + 1
            }
            Op::Delete { vol } => vol.contains('@') && state.vols.contains_key(vol),
            Op::Flush { vol } => state.vols.contains_key(vol),
            Op::Checkpoint | Op::Reopen { .. } => true,
        }
    }

    fn apply(mut state: Model, op: &Op) -> Model {
        match op {
            Op::Write {
                vol,
                off,
                len,
                seed,
                ..
            } => {
                let v = state.vols.get_mut(vol).unwrap();
                let d = Arc::make_mut(&mut v.data);
                d[*off as usize..*off as usize + len].copy_from_slice(&pattern(*seed, *len));
            }
            Op::Burst { vol, n, seed } => {
                let v = state.vols.get_mut(vol).unwrap();
                let d = Arc::make_mut(&mut v.data);
                for (off, data) in burst_writes(d.len() as u64, *n, *seed) {
                    d[off as usize..off as usize + data.len()].copy_from_slice(&data);
                }
            }
            Op::Zero { vol, off, len } => {
                let v = state.vols.get_mut(vol).unwrap();
                Arc::make_mut(&mut v.data)[*off as usize..*off as usize + len].fill(0);
            }
            Op::Create {
                srcs,
                tag,
                writable,
            } => {
                let origins: Vec<usize> = srcs.iter().map(|s| state.vols[s].origin).collect();
                let tag = match tag {
                    Tag::Named(t) => t.clone(),
                    Tag::Auto => state.auto_tag(&origins),
                };
                for (src, &o) in srcs.iter().zip(&origins) {
                    let data = state.vols[src].data.clone();
                    state.vols.insert(
                        format!("{}@{tag}", ORIGIN_IDS[o]),
                        Vol {
                            origin: o,
                            data,
                            writable: *writable,
                            parent: src.clone(),
                        },
                    );
                    state.deleted.retain(|(d, t)| !(*d == o && *t == tag));
                }
                state.next_tag += 1;
            }
            Op::Delete { vol } => {
                let v = state.vols.remove(vol).unwrap();
                // Its children are listed under its own parent from now on.
                for child in state.vols.values_mut().filter(|c| c.parent == *vol) {
                    child.parent = v.parent.clone();
                }
                let tag = vol.split_once('@').unwrap().1.to_string();
                state.deleted.push((v.origin, tag));
            }
            Op::Reopen { .. } if state.ephemeral => {
                // An ephemeral session's snapshots are gone when it ends.
                let gone: Vec<String> = state
                    .vols
                    .keys()
                    .filter(|n| n.contains('@'))
                    .cloned()
                    .collect();
                for name in gone {
                    let v = state.vols.remove(&name).unwrap();
                    let tag = name.split_once('@').unwrap().1.to_string();
                    state.deleted.push((v.origin, tag));
                }
            }
            Op::Read { .. }
            | Op::WriteReadOnly { .. }
            | Op::Flush { .. }
            | Op::Checkpoint
            | Op::Reopen { .. } => {}
        }
        state
    }
}

/// The system under test: a store on simulated disks or on real files in a temporary directory.
struct Sut {
    dir: tempfile::TempDir,
    ephemeral: bool,
    overlay: Option<usize>,
    sim: Option<SimMachine>,
    store: Option<Store>,
}

impl Sut {
    fn store(&self) -> &Store {
        self.store.as_ref().unwrap()
    }

    fn open(&self) -> Store {
        let opts = OpenOptions {
            ephemeral: self.ephemeral,
            overlay_entries: self.overlay,
            ..Default::default()
        };
        match &self.sim {
            Some(m) => m.open_store(&opts).unwrap(),
            None => Store::open(&self.dir.path().join("store"), &opts).unwrap(),
        }
    }
}

struct EngineTest;

impl StateMachineTest for EngineTest {
    type SystemUnderTest = Sut;
    type Reference = EngineModel;

    fn init_test(model: &Model) -> Sut {
        let dir = tempfile::tempdir().unwrap();
        let origins: Vec<(&str, Vec<u8>)> = (0..model.sizes.len())
            .map(|i| (ORIGIN_IDS[i], model.vols[ORIGIN_IDS[i]].data.to_vec()))
            .collect();
        let opts = mvsnap_engine::FormatOptions {
            max_size: STORE_MAX,
            ..format_opts(STORE_SIZE, model.chunk)
        };
        let open = OpenOptions {
            overlay_entries: model.overlay,
            ..Default::default()
        };
        let (sim, store) = if model.sim {
            let (m, s) = common::sim_setup_with(dir.path(), &opts, &open, &origins);
            (Some(m), s)
        } else {
            let (store, _) = common::real_setup(dir.path(), &opts, &origins);
            (None, Store::open(&store, &open).unwrap())
        };
        let mut sut = Sut {
            dir,
            ephemeral: model.ephemeral,
            overlay: model.overlay,
            sim,
            store: Some(store),
        };
        if model.ephemeral {
            // Origins are bound persistently; the session that follows is ephemeral.
            sut.store.take().unwrap().close().unwrap();
            sut.store = Some(sut.open());
        }
        sut
    }

    fn apply(mut sut: Sut, model: &Model, op: Op) -> Sut {
        let s = sut.store();
        match op {
            Op::Write {
                vol,
                off,
                len,
                seed,
                fua,
            } => {
                s.volume(&vol)
                    .unwrap()
                    .write_at(off, &pattern(seed, len), fua)
                    .unwrap_or_else(|e| panic!("write {vol} {off}+{len}: {e}"));
            }
            Op::Burst { vol, n, seed } => {
                let v = s.volume(&vol).unwrap();
                for (i, (off, data)) in burst_writes(v.size(), n, seed).into_iter().enumerate() {
                    v.write_at(off, &data, false)
                        .unwrap_or_else(|e| panic!("burst write {i} {vol} {off}: {e}"));
                    if i % 16 == 15 {
                        v.flush().unwrap();
                    }
                }
            }
            Op::Zero { vol, off, len } => {
                // Both ways a range becomes zeros: a trim (copy-outs, then a punched hole on an
                // origin) at even offsets, written zeros at odd ones.
                let v = s.volume(&vol).unwrap();
                let r = if off % 2 == 0 {
                    v.trim(off, len as u64)
                } else {
                    v.write_zeroes(off, len as u64, false)
                };
                r.unwrap_or_else(|e| panic!("zero {vol} {off}+{len}: {e}"));
            }
            Op::WriteReadOnly { vol, off } => {
                let v = s.volume(&vol).unwrap();
                assert!(v.read_only());
                match v.write_at(off, &[1, 2, 3], false) {
                    Err(Error::ReadOnly(_)) => {}
                    other => panic!("write to read-only {vol}: {other:?}"),
                }
            }
            Op::Read { vol, off, len } => {
                let mut buf = vec![0u8; len];
                s.volume(&vol)
                    .unwrap()
                    .read_at(off, &mut buf)
                    .unwrap_or_else(|e| panic!("read {vol} {off}+{len}: {e}"));
                let want = &model.vols[&vol].data[off as usize..off as usize + len];
                assert_image(&format!("{vol} read at {off}+{len}"), &buf, want);
            }
            Op::Create {
                srcs,
                tag,
                writable,
            } => {
                let srcs: Vec<&str> = srcs.iter().map(|s| s.as_str()).collect();
                let tag = match &tag {
                    Tag::Named(t) => Some(t.as_str()),
                    Tag::Auto => None,
                };
                let infos = s
                    .create_snapshot(&srcs, tag, "memo", writable)
                    .unwrap_or_else(|e| panic!("create {srcs:?} tag {tag:?}: {e}"));
                assert_eq!(infos.len(), srcs.len());
                for i in infos {
                    assert!(
                        model.vols.contains_key(&i.name),
                        "engine created {} which the model did not expect",
                        i.name
                    );
                }
            }
            Op::Delete { vol } => {
                s.delete_snapshot(&vol)
                    .unwrap_or_else(|e| panic!("delete {vol}: {e}"));
            }
            Op::Flush { vol } => s.volume(&vol).unwrap().flush().unwrap(),
            Op::Checkpoint => s.checkpoint().unwrap(),
            Op::Reopen { clean } => {
                let store = sut.store.take().unwrap();
                if clean {
                    store.close().unwrap();
                } else {
                    store.sync().unwrap();
                    drop(store);
                }
                let store = sut.open();
                assert_clean(&store, "reopen");
                sut.store = Some(store);
            }
        }
        sut
    }

    fn check_invariants(sut: &Sut, model: &Model) {
        let s = sut.store();
        let mut names = s.volume_names();
        names.sort();
        let want: Vec<String> = model.vols.keys().cloned().collect();
        assert_eq!(names, want, "volume list");
        for (name, v) in &model.vols {
            let got = common::read_all(s, name);
            assert_image(name, &got, &v.data);
        }
        for info in s.snapshots() {
            let v = &model.vols[&info.name];
            assert_eq!(
                info.state,
                SnapshotState::Valid,
                "{}: {:?}",
                info.name,
                info.reason
            );
            assert_eq!(info.writable, v.writable, "{} writable", info.name);
            assert_eq!(info.parent, v.parent, "{} parent", info.name);
        }
        assert_clean(s, "a step");
    }
}

fn config() -> Config {
    let cases = if std::env::var_os("PROPTEST_CASES").is_some() {
        Config::default().cases
    } else {
        512
    };
    Config {
        cases,
        // Regressions are kept as named tests below, not in a file next to this one.
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..Config::default()
    }
}

prop_state_machine! {
    #![proptest_config(config())]

    #[test]
    fn engine_matches_model(sequential 1..48 => EngineTest);
}

// ---- Named regressions: sequences the property test found (or that we want pinned). ----

/// Run a fixed sequence through the same machinery as the property test.
fn replay(model: Model, ops: Vec<Op>) {
    let mut m = model;
    let mut sut = EngineTest::init_test(&m);
    EngineTest::check_invariants(&sut, &m);
    for op in ops {
        assert!(EngineModel::preconditions(&m, &op), "bad step {op:?}");
        m = EngineModel::apply(m, &op);
        sut = EngineTest::apply(sut, &m, op);
        EngineTest::check_invariants(&sut, &m);
    }
}

fn initial(chunk: u32, sim: bool, sizes: &[u64]) -> Model {
    let mut vols = BTreeMap::new();
    for (i, &sz) in sizes.iter().enumerate() {
        vols.insert(
            Model::origin_name(i),
            Vol {
                origin: i,
                data: Arc::new(pattern(99 + i as u64, sz as usize)),
                writable: true,
                parent: String::new(),
            },
        );
    }
    Model {
        chunk,
        sim,
        ephemeral: false,
        overlay: None,
        sizes: sizes.to_vec(),
        vols,
        next_tag: 1,
        deleted: Vec::new(),
    }
}

fn w(vol: &str, off: u64, len: usize, seed: u64) -> Op {
    Op::Write {
        vol: vol.into(),
        off,
        len,
        seed,
        fua: false,
    }
}

fn create(srcs: &[&str], tag: &str, writable: bool) -> Op {
    Op::Create {
        srcs: srcs.iter().map(|s| s.to_string()).collect(),
        tag: if tag.is_empty() {
            Tag::Auto
        } else {
            Tag::Named(tag.into())
        },
        writable,
    }
}

/// A pinned walk over the main features: snapshot chains, writable snapshots at depth, deletes
/// of parents, tag reuse, reopen both ways; on both backends and an unaligned origin size.
#[test]
fn regression_pinned_tour() {
    for sim in [true, false] {
        for chunk in [4096, 65536] {
            replay(
                initial(chunk, sim, &[(1 << 20) + 1000, 256 << 10]),
                vec![
                    create(&["o0"], "a", false),
                    w("o0", 100, 70000, 1),
                    create(&["o0@a"], "w", true),
                    w("o0@w", 4095, 9000, 2),
                    create(&["o0@w"], "", false),
                    w("o0@w", 0, 1 << 20, 3),
                    create(&["o0@w", "o1"], "x", true),
                    w("o1@x", 1000, 5000, 4),
                    w("o1", 0, 256 << 10, 5),
                    Op::Delete { vol: "o0@a".into() },
                    Op::Reopen { clean: false },
                    Op::Delete { vol: "o0@w".into() },
                    create(&["o0@x"], "a", false),
                    w("o0", (1 << 20) - 10, 1010, 6),
                    Op::Reopen { clean: true },
                    w("o0@x", (1 << 20) + 900, 100, 7),
                    Op::Zero {
                        vol: "o0@x".into(),
                        off: 3,
                        len: 20000,
                    },
                    Op::Checkpoint,
                    Op::Reopen { clean: false },
                ],
            );
        }
    }
}

// ---- Concurrency: the model of a snapshot taken while writers run. ----

/// One writer's acknowledged writes, in order, and how many there are so far.
struct WriterLog {
    writes: parking_lot::Mutex<Vec<(u64, Vec<u8>)>>,
    acked: std::sync::atomic::AtomicUsize,
}

/// A snapshot taken under load: for each writer, how many of its writes were acknowledged when
/// the create call started and when it had returned; and what the snapshot read right away.
struct Taken {
    name: String,
    /// Writer whose volume this snapshot was taken of.
    writers: Vec<usize>,
    before: Vec<usize>,
    after: Vec<usize>,
    content: Vec<u8>,
    deleted: bool,
}

/// Writers hammer disjoint regions of the origin and a writable snapshot; another thread takes
/// snapshots (of the origin, of the writable snapshot, read-only and writable), reads each at
/// once, deletes some, and a reader re-reads older ones. Each snapshot must hold, per writer,
/// exactly the first k writes for some k between the acknowledged counts at the call's start
/// and end, plus the one write that may still be in flight (DESIGN: atomic w.r.t. writes,
/// in-flight writes wholly in or out), and must read the same forever after, under load and
/// after a reopen.
#[test]
fn concurrent_writers_and_snapshots() {
    use std::sync::atomic::{AtomicBool, Ordering};
    for chunk in [4096u32, 65536] {
        let dir = tempfile::tempdir().unwrap();
        let region = 1u64 << 20;
        let nwriters = 3usize;
        let v0 = pattern(11, (region * nwriters as u64) as usize);
        let (store, _) = common::real_setup(
            dir.path(),
            &format_opts(256 << 20, chunk),
            &[("o0", v0.clone())],
        );
        let s = Store::open(&store, &OpenOptions::default()).unwrap();
        s.create_snapshot(&["o0"], Some("w"), "", true).unwrap();
        let w0 = v0.clone();
        // Writers 0..nwriters own a region of o0 each; writer `nwriters` writes all of o0@w.
        let logs: Vec<Arc<WriterLog>> = (0..=nwriters)
            .map(|_| {
                Arc::new(WriterLog {
                    writes: parking_lot::Mutex::new(Vec::new()),
                    acked: Default::default(),
                })
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for (t, log) in logs.iter().enumerate() {
            let (s, log, stop) = (s.clone(), log.clone(), stop.clone());
            handles.push(std::thread::spawn(move || {
                let (vol, base, span) = if t < nwriters {
                    ("o0", t as u64 * region, region)
                } else {
                    ("o0@w", 0, region * nwriters as u64)
                };
                let v = s.volume(vol).unwrap();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) && i < 3000 {
                    let r = pattern(t as u64 * 1_000_003 + i, 16);
                    let pick = u64::from_le_bytes(r[..8].try_into().unwrap());
                    let len = match pick % 4 {
                        0 => pick % 700 + 1,
                        1 => 4096 * (pick % 4 + 1),
                        _ => pick % (3 * chunk as u64) + 1,
                    }
                    .min(span);
                    let off =
                        base + u64::from_le_bytes(r[8..].try_into().unwrap()) % (span - len + 1);
                    let data = pattern(t as u64 * 7919 + i * 31, len as usize);
                    v.write_at(off, &data, false).unwrap();
                    log.writes.lock().push((off, data));
                    log.acked.fetch_add(1, Ordering::SeqCst);
                    i += 1;
                }
            }));
        }
        let counts = |logs: &[Arc<WriterLog>]| -> Vec<usize> {
            logs.iter()
                .map(|l| l.acked.load(Ordering::SeqCst))
                .collect()
        };
        let mut taken: Vec<Taken> = Vec::new();
        for n in 0..40 {
            let of_w = n % 3 == 2;
            let src = if of_w { "o0@w" } else { "o0" };
            let name = format!("o0@c{n}");
            let before = counts(&logs);
            s.create_snapshot(&[src], Some(&format!("c{n}")), "", n % 4 == 1)
                .unwrap();
            let after = counts(&logs);
            let content = common::read_all(&s, &name);
            let writers = if of_w {
                vec![nwriters]
            } else {
                (0..nwriters).collect()
            };
            taken.push(Taken {
                name,
                writers,
                before,
                after,
                content,
                deleted: false,
            });
            // Re-read an older snapshot under load; delete one now and then.
            if n >= 3 {
                let old = &taken[(n * 7) % (n - 1)];
                if !old.deleted {
                    let got = common::read_all(&s, &old.name);
                    assert_image(
                        &format!("{} re-read under load", old.name),
                        &got,
                        &old.content,
                    );
                }
            }
            if n % 5 == 4 {
                let victim = (n * 7 + 3) % n;
                if !taken[victim].deleted {
                    s.delete_snapshot(&taken[victim].name).unwrap();
                    taken[victim].deleted = true;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            h.join().unwrap();
        }
        // Replay each writer's log; every snapshot must match one prefix within its window.
        for (t, log) in logs.iter().enumerate() {
            let writes = log.writes.lock();
            let (base, span, mut cur) = if t < nwriters {
                let b = t as u64 * region;
                (b, region, v0[b as usize..(b + region) as usize].to_vec())
            } else {
                (0, region * nwriters as u64, w0.clone())
            };
            let mut matched = vec![false; taken.len()];
            for k in 0..=writes.len() {
                if k > 0 {
                    let (off, d) = &writes[k - 1];
                    let o = (off - base) as usize;
                    cur[o..o + d.len()].copy_from_slice(d);
                }
                for (i, tk) in taken.iter().enumerate() {
                    // A write in flight when the call returned (done in the engine, not yet
                    // counted by its writer) may be in it: one past `after`.
                    if tk.writers.contains(&t) && tk.before[t] <= k && k <= tk.after[t] + 1 {
                        let b = if t < nwriters { base as usize } else { 0 };
                        if tk.content[b..b + span as usize] == cur[..] {
                            matched[i] = true;
                        }
                    }
                }
            }
            for (i, tk) in taken.iter().enumerate() {
                assert!(
                    !tk.writers.contains(&t) || matched[i],
                    "chunk {chunk}: {} does not hold, for writer {t}, the first k writes for any \
                     k in {}..={}",
                    tk.name,
                    tk.before[t],
                    tk.after[t] + 1
                );
            }
        }
        assert_clean(&s, "concurrent load");
        s.close().unwrap();
        let s = Store::open(&store, &OpenOptions::default()).unwrap();
        for tk in taken.iter().filter(|t| !t.deleted) {
            assert_image(
                &format!("{} after reopen", tk.name),
                &common::read_all(&s, &tk.name),
                &tk.content,
            );
        }
        assert_clean(&s, "reopen after concurrent load");
    }
}
