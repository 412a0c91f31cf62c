//! Bad input: each case gets a clear error naming the problem, no panic, and (where it makes
//! sense) the store and origin files are byte-for-byte unchanged afterwards. Also the COW store
//! filling up (origin writes go on, snapshots that lose data become invalid) and a file-backed
//! store growing up to its maximum size.

mod common;

use std::path::{Path, PathBuf};

use mvsnap_engine::format::{Superblock, JOURNAL_OFFSET, META_BLOCK, SB_OFFSETS};
use mvsnap_engine::{
    Error, EventKind, FormatOptions, OpenOptions, OriginState, SnapshotState, Store,
};

use common::{assert_clean, assert_image, format_opts, pattern, read_all, real_setup};

fn open(p: &Path) -> mvsnap_engine::Result<Store> {
    Store::open(p, &OpenOptions::default())
}

fn open_ro(p: &Path) -> mvsnap_engine::Result<Store> {
    Store::open(
        p,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

#[track_caller]
fn assert_unchanged(p: &Path, before: &[u8], what: &str) {
    let after = bytes(p);
    if let Some(d) = common::first_diff(&after, before) {
        panic!("{what} changed {}: {d}", p.display());
    }
}

/// Opening `store` read-write and read-only both fail, `check` accepts the error, and the
/// store's bytes stay as they were.
fn refused_both_ways(store: &Path, what: &str, check: impl Fn(Error)) {
    let before = bytes(store);
    for ro in [false, true] {
        match if ro { open_ro(store) } else { open(store) } {
            Err(e) => check(e),
            Ok(_) => panic!("{what} opened (read-only: {ro})"),
        }
        assert_unchanged(store, &before, "store");
    }
}

/// Patch bytes of a file in place.
fn patch(p: &Path, off: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(data, off).unwrap();
}

fn flip(p: &Path, off: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).unwrap();
    b[0] ^= 0xa5;
    f.write_all_at(&b, off).unwrap();
}

/// The superblock copy with the highest sequence, and its offset.
fn current_superblock(p: &Path) -> (Superblock, u64) {
    let all = bytes(p);
    SB_OFFSETS
        .iter()
        .filter_map(|&off| {
            Superblock::decode(&all[off as usize..(off + META_BLOCK) as usize])
                .ok()
                .flatten()
                .map(|sb| (sb, off))
        })
        .max_by_key(|(sb, _)| sb.sb_seq)
        .expect("a valid superblock")
}

/// A store with one origin `o0` (1 MiB), snapshots `a` (taken first) and `b`, writes between,
/// closed cleanly. Returns the store path, origin path, and the contents of o0@a, o0@b, o0.
struct Fixture {
    _dir: tempfile::TempDir,
    store: PathBuf,
    origin: PathBuf,
    a: Vec<u8>,
    b: Vec<u8>,
    now: Vec<u8>,
}

fn fixture(chunk: u32) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let v0 = pattern(1, 1 << 20);
    let (store, origins) = real_setup(
        dir.path(),
        &format_opts(16 << 20, chunk),
        &[("o0", v0.clone())],
    );
    let s = open(&store).unwrap();
    s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
    let o = s.volume("o0").unwrap();
    o.write_at(5000, &pattern(2, 100_000), false).unwrap();
    let b = read_all(&s, "o0");
    s.create_snapshot(&["o0"], Some("b"), "", false).unwrap();
    o.write_at(300_000, &pattern(3, 200_000), false).unwrap();
    let now = read_all(&s, "o0");
    drop(o);
    s.close().unwrap();
    Fixture {
        _dir: dir,
        store,
        origin: origins[0].clone(),
        a: v0,
        b,
        now,
    }
}

fn assert_fixture_content(f: &Fixture, s: &Store) {
    assert_image("o0@a", &read_all(s, "o0@a"), &f.a);
    assert_image("o0@b", &read_all(s, "o0@b"), &f.b);
    assert_image("o0", &read_all(s, "o0"), &f.now);
}

#[test]
fn not_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", vec![0x5a; 1 << 20]),
        ("zeros", vec![0; 1 << 20]),
        ("empty", vec![]),
        ("tiny", b"hello, I am a text file\n".to_vec()),
        ("random", pattern(9, 3 << 20)),
    ];
    for (name, content) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, &content).unwrap();
        for ro in [false, true] {
            let r = if ro { open_ro(&p) } else { open(&p) };
            match r {
                Err(e @ Error::NotAStore { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains("not an mvsnap store"), "{name}: {msg}");
                    assert!(
                        msg.contains(name),
                        "{name}: the message names the file: {msg}"
                    );
                }
                Err(e) => panic!("{name}: {e:?}, expected NotAStore"),
                Ok(_) => panic!("{name} opened as a store"),
            }
            assert_unchanged(&p, &content, name);
        }
    }
    // A path that does not exist: an I/O error naming it, not a panic.
    let missing = dir.path().join("missing");
    match open(&missing) {
        Err(e @ Error::Io { .. }) => assert!(e.to_string().contains("missing"), "{e}"),
        other => panic!("missing file: {:?}", other.err()),
    }
    assert!(!missing.exists());
}

#[test]
fn corrupt_superblock_both_copies() {
    let f = fixture(65536);
    // Damage the body of both copies (the magic stays): a store, but a damaged one.
    flip(&f.store, 100);
    flip(&f.store, META_BLOCK + 100);
    let before = bytes(&f.store);
    refused_both_ways(
        &f.store,
        "a store with two damaged superblocks",
        |e| match e {
            e @ Error::Corrupt { .. } => {
                let msg = e.to_string();
                assert!(msg.contains("superblock"), "{msg}");
                assert!(msg.contains("checksum"), "{msg}");
            }
            e => panic!("{e:?}, expected Corrupt"),
        },
    );
    // Formatting over it without --force refuses (it is a damaged store, not free space).
    match Store::format(&f.store, &format_opts(16 << 20, 65536)) {
        Err(e @ Error::StoreExists { .. }) => assert!(e.to_string().contains("force"), "{e}"),
        other => panic!("format over a damaged store: {other:?}"),
    }
    assert_unchanged(&f.store, &before, "store");
}

#[test]
fn corrupt_superblock_one_copy_still_opens() {
    // The older copy damaged: the newer one is used, nothing is lost.
    let f = fixture(16384);
    let (_, cur) = current_superblock(&f.store);
    let other = SB_OFFSETS.iter().copied().find(|&o| o != cur).unwrap();
    patch(&f.store, other + 16, &[0xee; 512]);
    let s = open(&f.store).unwrap();
    assert_clean(&s, "open with one damaged superblock");
    assert_fixture_content(&f, &s);
    s.close().unwrap();
    // Both copies are valid again after a writable open.
    let s = open(&f.store).unwrap();
    assert_fixture_content(&f, &s);
    drop(s);

    // The newer copy damaged (bit rot after the fact): the older copy may be used; the store
    // must then open consistently with everything intact, or fail with Corrupt. Never garbage.
    let f = fixture(16384);
    let (_, cur) = current_superblock(&f.store);
    patch(&f.store, cur + 16, &[0xee; 512]);
    match open(&f.store) {
        Ok(s) => {
            assert_clean(&s, "open from the older superblock");
            assert_fixture_content(&f, &s);
        }
        Err(Error::Corrupt { .. }) => {}
        Err(e) => panic!("newer superblock damaged: {e:?}"),
    }
}

/// Offsets (from the store's start) of 4 KiB-aligned journal blocks that begin with a record.
fn journal_group_starts(p: &Path) -> Vec<u64> {
    let all = bytes(p);
    let (sb, _) = current_superblock(p);
    let end = JOURNAL_OFFSET + sb.geo.journal_len;
    (JOURNAL_OFFSET..end)
        .step_by(META_BLOCK as usize)
        .filter(|&off| &all[off as usize..off as usize + 4] == b"MVJR")
        .collect()
}

/// A store left unclean (synced, not closed: the next open replays the journal).
fn unclean_fixture() -> (tempfile::TempDir, PathBuf, Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let v0 = pattern(4, 1 << 20);
    let (store, _) = real_setup(
        dir.path(),
        &format_opts(16 << 20, 65536),
        &[("o0", v0.clone())],
    );
    let s = open(&store).unwrap();
    s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
    let o = s.volume("o0").unwrap();
    o.write_at(70_000, &pattern(5, 150_000), false).unwrap();
    let b = read_all(&s, "o0");
    s.create_snapshot(&["o0"], Some("b"), "", false).unwrap();
    s.create_snapshot(&["o0"], Some("c"), "", false).unwrap();
    s.sync().unwrap();
    drop(o);
    drop(s); // no close: no checkpoint, the journal holds everything since open
    (dir, store, v0, b)
}

#[test]
fn corrupt_journal_record_stops_replay() {
    // The last group (snapshot c) is damaged: replay stops before it; a and b are intact.
    let (_d, store, a, b) = unclean_fixture();
    let groups = journal_group_starts(&store);
    assert!(groups.len() >= 4, "journal groups: {groups:?}");
    let last = *groups.last().unwrap();
    flip(&store, last + 40);
    let s = open(&store).unwrap();
    assert_clean(&s, "replay of a journal with a damaged record");
    let tags: Vec<String> = s.snapshots().into_iter().map(|i| i.tag).collect();
    assert_eq!(tags, vec!["a", "b"], "replay stops at the damaged record");
    assert_image("o0@a", &read_all(&s, "o0@a"), &a);
    assert_image("o0@b", &read_all(&s, "o0@b"), &b);
    s.close().unwrap();
    let s = open(&store).unwrap();
    assert_clean(&s, "reopen");
    assert_image("o0@a", &read_all(&s, "o0@a"), &a);

    // A damaged record in the middle: everything after it is ignored too; still consistent.
    let (_d, store, a, _) = unclean_fixture();
    let groups = journal_group_starts(&store);
    flip(&store, groups[groups.len() / 2] + 33);
    let s = open(&store).unwrap();
    assert_clean(&s, "replay cut in the middle");
    if s.snapshots().iter().any(|i| i.tag == "a") {
        // a's creation and preserves came before the cut only if it is listed with its data.
        let got = read_all(&s, "o0@a");
        assert_eq!(got.len(), a.len());
    }
}

/// Byte offsets of the newest metadata header's tree root and first tables block
/// (docs/FORMAT.md: the header pair at the start of the data area).
fn meta_offsets(p: &Path) -> (u64, u64) {
    let all = bytes(p);
    let (sb, _) = current_superblock(p);
    let base = sb.geo.data_start;
    let word = |at: u64| u64::from_le_bytes(all[at as usize..at as usize + 8].try_into().unwrap());
    let hdr = (0..2)
        .map(|i| base + i * META_BLOCK)
        .filter(|&h| &all[h as usize..h as usize + 4] == b"MVMH")
        .max_by_key(|&h| word(h + 8))
        .expect("a metadata header");
    (
        base + word(hdr + 24) * META_BLOCK,
        base + word(hdr + 80) * META_BLOCK,
    )
}

#[test]
fn corrupt_metadata_block() {
    for what in ["tables", "metadata"] {
        let f = fixture(65536);
        let (root, tables) = meta_offsets(&f.store);
        flip(&f.store, if what == "tables" { tables } else { root } + 100);
        refused_both_ways(&f.store, what, |e| match e {
            e @ Error::Corrupt { .. } => {
                let msg = e.to_string();
                assert!(msg.contains(what), "{msg}");
            }
            e => panic!("{e:?}, expected Corrupt"),
        });
    }
    // Damage in the tables' header (its magic) is caught the same way.
    let f2 = fixture(4096);
    let (_, tables) = meta_offsets(&f2.store);
    flip(&f2.store, tables);
    assert!(matches!(open(&f2.store), Err(Error::Corrupt { .. })));
}

#[test]
fn truncated_store_file() {
    let f = fixture(65536);
    let full = bytes(&f.store);
    let (sb, _) = current_superblock(&f.store);
    let geo = sb.geo;
    // Inside the journal, and just past the first data slots (the checkpoint and the preserved
    // data live in slots further on).
    for len in [
        JOURNAL_OFFSET + 5000,
        geo.data_start - 1000,
        geo.data_start + geo.chunk_size as u64 / 2,
        geo.data_start + 2 * geo.chunk_size as u64,
    ] {
        std::fs::write(&f.store, &full[..len as usize]).unwrap();
        match open(&f.store) {
            Err(e @ Error::Corrupt { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("truncated") || msg.contains("past the end"),
                    "truncated to {len}: {msg}"
                );
            }
            Err(e) => panic!("truncated to {len}: {e:?}, expected Corrupt"),
            Ok(_) => panic!("a store truncated to {len} bytes opened"),
        }
        assert_unchanged(&f.store, &full[..len as usize], "truncated store");
    }
    std::fs::write(&f.store, &full).unwrap();
    let s = open(&f.store).unwrap();
    assert_fixture_content(&f, &s);
}

/// Cut inside the second superblock copy: the first copy is intact and names the store, yet the
/// engine answers "not an mvsnap store (no superblock magic)", which misleads the user.
#[test]
fn truncated_inside_the_superblocks_says_truncated() {
    let f = fixture(65536);
    let full = bytes(&f.store);
    std::fs::write(&f.store, &full[..6000]).unwrap();
    match open(&f.store) {
        Err(e @ Error::Corrupt { .. }) => assert!(e.to_string().contains("truncated"), "{e}"),
        Err(e) => panic!("store truncated to 6000 bytes: {e}"),
        Ok(_) => panic!("opened"),
    }
}

#[test]
fn origin_size_changed() {
    for grow in [true, false] {
        let f = fixture(65536);
        let mut content = bytes(&f.origin);
        if grow {
            content.extend_from_slice(&[0u8; 4096]);
        } else {
            content.truncate(content.len() - 4096);
        }
        std::fs::write(&f.origin, &content).unwrap();
        let s = open(&f.store).unwrap();
        for name in ["o0", "o0@a", "o0@b"] {
            match s.volume(name) {
                Err(e) => {
                    let msg = e.to_string();
                    assert!(msg.contains("size changed"), "{name}: {msg}");
                    assert!(msg.contains("o0"), "{name}: {msg}");
                }
                Ok(_) => panic!("{name} opened although its origin changed size"),
            }
        }
        match s.create_snapshot(&["o0"], Some("c"), "", false) {
            Err(e) => assert!(e.to_string().contains("size changed"), "{e}"),
            Ok(_) => panic!("snapshot of an origin whose size changed"),
        }
        assert_origin_state(&s, OriginState::Unavailable, "size changed from 1048576");
        // Issue 7 item 10: check reports it as an error, not a warning.
        let r = s.check();
        assert!(
            r.errors.iter().any(|w| w.contains("size changed")),
            "{:?}",
            r.errors
        );
        assert_eq!(s.snapshots().len(), 2);
        // A shrunk origin lost data its snapshots shared: they are invalid, with the reason,
        // durably (not served wrong data once the size is back). A grown one lost nothing.
        for i in s.snapshots() {
            if grow {
                assert_eq!(i.state, SnapshotState::Valid, "{i:?}");
            } else {
                assert_eq!(i.state, SnapshotState::Invalid, "{i:?}");
                assert!(
                    i.reason.as_deref().unwrap_or("").contains("shrank"),
                    "{i:?}"
                );
            }
        }
        drop(s);
        assert_unchanged(&f.origin, &content, "origin");
        // Put the size back: the origin is there again; the snapshots as above.
        let mut back = content.clone();
        back.resize(1 << 20, 0);
        back[..].copy_from_slice(&f.now);
        std::fs::write(&f.origin, &back).unwrap();
        let s = open(&f.store).unwrap();
        if grow {
            assert_fixture_content(&f, &s);
        } else {
            assert_image("o0", &read_all(&s, "o0"), &f.now);
            assert!(s
                .snapshots()
                .iter()
                .all(|i| i.state == SnapshotState::Invalid));
        }
        assert_origin_state(&s, OriginState::Online, "");
        assert_clean(&s, "origin size restored");
    }
}

/// `origins()` says whether o0 opened, and why not: what `origin list`, `info` and the
/// daemon's start-up warning show an administrator.
fn assert_origin_state(s: &Store, want: OriginState, reason: &str) {
    let origins = s.origins();
    let [o] = &origins[..] else {
        panic!("one origin expected: {origins:?}")
    };
    assert_eq!((o.id.as_str(), o.state), ("o0", want), "{o:?}");
    match want {
        OriginState::Online => assert_eq!(o.reason, None, "{o:?}"),
        OriginState::Unavailable => {
            let r = o.reason.as_deref().unwrap_or("");
            assert!(r.starts_with("origin o0: ") && r.contains(reason), "{o:?}");
        }
    }
}

#[test]
fn a_missing_origin_is_listed_unavailable_and_comes_back_intact() {
    let f = fixture(65536);
    let moved = f.origin.with_extension("moved");
    std::fs::rename(&f.origin, &moved).unwrap();
    let s = open(&f.store).unwrap();
    assert_origin_state(&s, OriginState::Unavailable, "cannot open");
    assert!(s.volume("o0@a").is_err());
    // Missing is not changed: a warning, and the snapshots keep their data.
    let r = s.check();
    assert!(
        r.warnings.iter().any(|w| w.contains("cannot open")),
        "{r:?}"
    );
    // They keep their own state: nothing of theirs is lost.
    for i in s.snapshots() {
        assert_eq!((i.state, &i.reason), (SnapshotState::Valid, &None), "{i:?}");
    }
    s.close().unwrap();
    std::fs::rename(&moved, &f.origin).unwrap();
    let s = open(&f.store).unwrap();
    assert_origin_state(&s, OriginState::Online, "");
    assert_fixture_content(&f, &s);
    assert_clean(&s, "origin back in place");
}

#[test]
fn invalid_format_options() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("store");
    // Too small, too big: refused before anything is created.
    for (size, max, what) in [
        (64 << 10, 0, "too small"),
        (1 << 20, 0, "too small"),
        (16 << 20, 1 << 62, "too big"),
    ] {
        let opts = FormatOptions {
            size: Some(size),
            max_size: max,
            ..Default::default()
        };
        match Store::format(&p, &opts) {
            Err(e @ Error::InvalidArgument(_)) => {
                let msg = e.to_string();
                assert!(msg.contains(what), "{size}/{max}: {msg}");
            }
            other => panic!("size {size}, max {max}: {other:?}"),
        }
        assert!(!p.exists(), "a refused format created {}", p.display());
    }
    // An existing file keeps its content when the options are refused.
    let content = pattern(3, 100_000);
    std::fs::write(&p, &content).unwrap();
    for opts in [
        format_opts(64 << 10, 4096),
        FormatOptions {
            size: Some(32 << 20),
            max_size: 16 << 20,
            ..Default::default()
        },
    ] {
        assert!(matches!(
            Store::format(&p, &opts),
            Err(Error::InvalidArgument(_))
        ));
        assert_unchanged(&p, &content, "file");
    }
    // Too small for 16 slots: refused with the size it needs.
    let small = dir.path().join("small");
    match Store::format(&small, &format_opts(1 << 20, 65536)) {
        Err(Error::InvalidArgument(msg)) => assert!(msg.contains("too small"), "{msg}"),
        other => panic!("tiny store: {other:?}"),
    }
    // A store is not formatted over without force.
    let f = fixture(65536);
    let before = bytes(&f.store);
    match Store::format(&f.store, &format_opts(16 << 20, 65536)) {
        Err(e @ Error::StoreExists { .. }) => assert!(e.to_string().contains("--force"), "{e}"),
        other => panic!("format over a store: {other:?}"),
    }
    assert_unchanged(&f.store, &before, "store");
}

#[test]
fn duplicate_names_and_bad_names() {
    let dir = tempfile::tempdir().unwrap();
    let (store, origins) = real_setup(
        dir.path(),
        &format_opts(16 << 20, 65536),
        &[("o0", pattern(1, 1 << 20)), ("o1", pattern(2, 512 << 10))],
    );
    let s = open(&store).unwrap();
    s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
    s.sync().unwrap();
    let before = bytes(&store);
    let o_before = bytes(&origins[0]);
    match s.create_snapshot(&["o0"], Some("a"), "", true) {
        Err(e @ Error::AlreadyExists(_)) => {
            assert!(e.to_string().contains("o0@a"), "{e}")
        }
        other => panic!("duplicate tag: {other:?}"),
    }
    // A set over two origins where one already has the tag: nothing is created on either.
    match s.create_snapshot(&["o1", "o0"], Some("a"), "", false) {
        Err(Error::AlreadyExists(msg)) => assert!(msg.contains("o0@a"), "{msg}"),
        other => panic!("duplicate tag in a set: {other:?}"),
    }
    assert!(s.volume("o1@a").is_err(), "half a snapshot set was created");
    // Two volumes of one origin in one set.
    assert!(matches!(
        s.create_snapshot(&["o0", "o0@a"], Some("x"), "", false),
        Err(Error::InvalidArgument(_))
    ));
    for bad in ["", "a b", ".hidden", "x/y", "t@g", &"z".repeat(129), "é"] {
        match s.create_snapshot(&["o0"], Some(bad), "", false) {
            Err(Error::InvalidArgument(msg)) => assert!(msg.contains("tag"), "{bad:?}: {msg}"),
            other => panic!("tag {bad:?}: {other:?}"),
        }
    }
    for missing in ["nope", "o0@nope", "nope@a"] {
        assert!(matches!(
            s.create_snapshot(&[missing], None, "", false),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(s.volume(missing), Err(Error::NotFound(_))));
        if missing.contains('@') {
            assert!(matches!(
                s.delete_snapshot(missing),
                Err(Error::NotFound(_))
            ));
        }
    }
    assert!(matches!(
        s.delete_snapshot("o0"),
        Err(Error::InvalidArgument(_))
    ));
    // Duplicate origins: same id, same file under another id.
    let other = dir.path().join("other");
    std::fs::write(&other, [1u8; 8192]).unwrap();
    assert!(matches!(
        s.add_origin(&other, Some("o0")),
        Err(Error::AlreadyExists(_))
    ));
    match s.add_origin(&origins[0], Some("again")) {
        Err(Error::AlreadyExists(msg)) => assert!(msg.contains("o0"), "{msg}"),
        other => panic!("same origin twice: {other:?}"),
    }
    let empty = dir.path().join("empty");
    std::fs::write(&empty, []).unwrap();
    assert!(matches!(
        s.add_origin(&empty, None),
        Err(Error::InvalidArgument(_))
    ));
    assert_unchanged(&store, &before, "store");
    assert_unchanged(&origins[0], &o_before, "origin");
    assert_eq!(s.snapshots().len(), 1);
    assert_clean(&s, "refused requests");
}

#[test]
fn out_of_range_and_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let size = (1u64 << 20) + 1000;
    let (store, origins) = real_setup(
        dir.path(),
        &format_opts(16 << 20, 16384),
        &[("o0", pattern(1, size as usize))],
    );
    let s = open(&store).unwrap();
    s.create_snapshot(&["o0"], Some("ro"), "", false).unwrap();
    s.create_snapshot(&["o0"], Some("rw"), "", true).unwrap();
    s.sync().unwrap();
    let before = bytes(&store);
    let o_before = bytes(&origins[0]);
    for name in ["o0", "o0@ro", "o0@rw"] {
        let v = s.volume(name).unwrap();
        assert_eq!(v.size(), size);
        let mut buf = [0u8; 2];
        for (off, len) in [
            (size - 1, 2u64),
            (size, 1),
            (u64::MAX, 1),
            (u64::MAX - 1, 4),
        ] {
            let r = v.read_at(off, &mut buf[..len.min(2) as usize]);
            match r {
                Err(e @ Error::OutOfRange { .. }) => {
                    assert_eq!(e.errno(), libc::EINVAL);
                    assert!(e.to_string().contains(name), "{e}");
                }
                other => panic!("{name} read {off}+{len}: {other:?}"),
            }
            if !v.read_only() {
                let r = v.write_at(off, &[1u8; 2][..len.min(2) as usize], false);
                assert!(matches!(r, Err(Error::OutOfRange { .. })), "{name}: {r:?}");
                let r = v.write_zeroes(off, len, false);
                assert!(matches!(r, Err(Error::OutOfRange { .. })), "{name}: {r:?}");
                let r = v.trim(off, len);
                assert!(matches!(r, Err(Error::OutOfRange { .. })), "{name}: {r:?}");
            }
            assert!(matches!(
                v.block_status(off, len),
                Err(Error::OutOfRange { .. })
            ));
        }
        // Empty requests at the very end are fine.
        v.read_at(size, &mut []).unwrap();
    }
    let ro = s.volume("o0@ro").unwrap();
    assert!(ro.read_only());
    for r in [
        ro.write_at(0, &[1, 2, 3], false),
        ro.write_at(size - 1, &[1], true),
        ro.write_zeroes(0, 4096, false),
        ro.trim(0, 65536),
    ] {
        match r {
            Err(e @ Error::ReadOnly(_)) => {
                assert_eq!(e.errno(), libc::EPERM);
                assert!(e.to_string().contains("o0@ro"), "{e}");
            }
            other => panic!("write to a read-only snapshot: {other:?}"),
        }
    }
    assert_unchanged(&store, &before, "store");
    assert_unchanged(&origins[0], &o_before, "origin");
    drop((ro, s));
    // A store opened read-only refuses writes to every volume.
    let s = open_ro(&store).unwrap();
    for name in ["o0", "o0@rw"] {
        let v = s.volume(name).unwrap();
        assert!(v.read_only());
        assert!(matches!(
            v.write_at(0, &[1], false),
            Err(Error::ReadOnly(_))
        ));
    }
    assert!(s.create_snapshot(&["o0"], Some("x"), "", false).is_err());
    drop(s);
    assert_unchanged(&store, &before, "store");
    assert_unchanged(&origins[0], &o_before, "origin");
}

/// A COW store that fills up: origin writes go on, the snapshot that loses data becomes
/// invalid (with a reason, an event), low space is announced first, and check stays clean.
#[test]
fn full_store_invalidates_snapshots_not_origin_writes() {
    let dir = tempfile::tempdir().unwrap();
    let chunk = 4096u32;
    let geo = mvsnap_engine::format::Geometry::new(
        chunk,
        mvsnap_engine::format::Geometry::default_journal_len(8 << 20),
    )
    .unwrap();
    let store_size = geo.data_start + 64 * chunk as u64;
    let v0 = pattern(1, 1 << 20);
    let store = dir.path().join("store");
    Store::format(&store, &format_opts(store_size, chunk)).unwrap();
    let origin = dir.path().join("o0");
    std::fs::write(&origin, &v0).unwrap();
    let s = open(&store).unwrap();
    s.add_origin(&origin, Some("o0")).unwrap();
    s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
    let o = s.volume("o0").unwrap();
    let v1 = pattern(2, 1 << 20);
    for off in (0..1u64 << 20).step_by(65536) {
        o.write_at(off, &v1[off as usize..off as usize + 65536], false)
            .unwrap_or_else(|e| panic!("origin write at {off} on a full store: {e}"));
    }
    assert_image("o0", &read_all(&s, "o0"), &v1);
    let check_invalid = |s: &Store| {
        match s.volume("o0@a").and_then(|v| {
            let mut b = [0u8; 10];
            v.read_at(0, &mut b)
        }) {
            Err(e @ Error::SnapshotInvalid { .. }) => {
                assert_eq!(e.errno(), libc::EIO);
                assert!(e.to_string().contains("full"), "{e}");
            }
            other => panic!("read of a snapshot that lost data: {other:?}"),
        }
        let info = s.snapshots();
        assert_eq!(info.len(), 1);
        assert_eq!(info[0].state, SnapshotState::Invalid);
        assert!(
            info[0].reason.as_deref().unwrap_or("").contains("full"),
            "{:?}",
            info[0].reason
        );
    };
    check_invalid(&s);
    let ev = s.events();
    let kinds: Vec<EventKind> = ev.iter().map(|e| e.kind).collect();
    assert!(kinds.contains(&EventKind::SnapshotInvalidated), "{ev:?}");
    assert!(kinds.contains(&EventKind::LowSpace), "{ev:?}");
    let low = kinds
        .iter()
        .position(|k| *k == EventKind::LowSpace)
        .unwrap();
    let inv = kinds
        .iter()
        .position(|k| *k == EventKind::SnapshotInvalidated)
        .unwrap();
    assert!(
        low < inv,
        "low space is announced before data is lost: {ev:?}"
    );
    assert!(ev[inv].message.contains("o0@a"), "{:?}", ev[inv]);
    assert_clean(&s, "a full store");
    // The invalid snapshot's space came back: a new snapshot works and keeps its content.
    s.create_snapshot(&["o0"], Some("b"), "", false).unwrap();
    o.write_at(4096 * 10, &[7u8; 4096 * 20], false).unwrap();
    assert_image("o0@b", &read_all(&s, "o0@b"), &v1);
    assert_clean(&s, "after a new snapshot");
    // A snapshot of an invalid snapshot is refused, clearly.
    match s.create_snapshot(&["o0@a"], Some("c"), "", false) {
        Err(Error::SnapshotInvalid { .. }) => {}
        other => panic!("snapshot of an invalid snapshot: {other:?}"),
    }
    drop(o);
    s.close().unwrap();
    let s = open(&store).unwrap();
    assert!(s
        .snapshots()
        .iter()
        .any(|i| i.tag == "a" && i.state == SnapshotState::Invalid && i.reason.is_some()));
    let _ = &check_invalid;
    assert_image("o0@b", &read_all(&s, "o0@b"), &v1);
    assert_clean(&s, "reopen of a store that filled up");
    // Deleting the invalid snapshot works.
    s.delete_snapshot("o0@a").unwrap();
    assert_clean(&s, "delete of an invalid snapshot");
}

/// A writable snapshot's write cannot invalidate anyone: on a full store it fails with NoSpace,
/// and what it wrote before stays.
#[test]
fn full_store_refuses_snapshot_writes() {
    let dir = tempfile::tempdir().unwrap();
    let chunk = 4096u32;
    let geo = mvsnap_engine::format::Geometry::new(
        chunk,
        mvsnap_engine::format::Geometry::default_journal_len(8 << 20),
    )
    .unwrap();
    let store = dir.path().join("store");
    Store::format(
        &store,
        &format_opts(geo.data_start + 48 * chunk as u64, chunk),
    )
    .unwrap();
    let origin = dir.path().join("o0");
    let v0 = pattern(1, 1 << 20);
    std::fs::write(&origin, &v0).unwrap();
    let s = open(&store).unwrap();
    s.add_origin(&origin, Some("o0")).unwrap();
    s.create_snapshot(&["o0"], Some("w"), "", true).unwrap();
    let w = s.volume("o0@w").unwrap();
    let mut model = v0.clone();
    let mut failed = false;
    for i in 0..256u64 {
        let data = [i as u8; 4096];
        match w.write_at(i * 4096, &data, false) {
            Ok(()) => model[(i * 4096) as usize..((i + 1) * 4096) as usize].copy_from_slice(&data),
            Err(e @ Error::NoSpace(_)) => {
                assert_eq!(e.errno(), libc::ENOSPC);
                assert!(e.to_string().contains("o0@w"), "{e}");
                failed = true;
                break;
            }
            Err(e) => panic!("write {i}: {e:?}"),
        }
    }
    assert!(
        failed,
        "a 48-slot store took a whole 1 MiB writable snapshot"
    );
    assert_image("o0@w", &read_all(&s, "o0@w"), &model);
    assert_eq!(s.snapshots()[0].state, SnapshotState::Valid);
    assert_clean(&s, "a full store refusing a snapshot write");
    drop(w);
    s.close().unwrap();
    let s = open(&store).unwrap();
    assert_image("o0@w", &read_all(&s, "o0@w"), &model);
}

/// A file-backed store with a maximum size grows (Grown event) instead of invalidating.
#[test]
fn file_store_grows_up_to_max_size() {
    let dir = tempfile::tempdir().unwrap();
    let chunk = 65536u32;
    let geo = mvsnap_engine::format::Geometry::new(
        chunk,
        mvsnap_engine::format::Geometry::default_journal_len(4 << 20),
    )
    .unwrap();
    let size = geo.data_start + 20 * chunk as u64;
    let store = dir.path().join("store");
    Store::format(
        &store,
        &FormatOptions {
            size: Some(size),
            max_size: 256 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(std::fs::metadata(&store).unwrap().len(), size);
    let origin = dir.path().join("o0");
    let v0 = pattern(1, 8 << 20);
    std::fs::write(&origin, &v0).unwrap();
    let s = open(&store).unwrap();
    s.add_origin(&origin, Some("o0")).unwrap();
    s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
    let data0 = s.info().data_bytes;
    let o = s.volume("o0").unwrap();
    let v1 = pattern(2, 8 << 20);
    for off in (0..8u64 << 20).step_by(1 << 20) {
        o.write_at(off, &v1[off as usize..(off + (1 << 20)) as usize], false)
            .unwrap();
    }
    let ev = s.events();
    assert!(
        ev.iter().any(|e| e.kind == EventKind::Grown),
        "no Grown event: {ev:?}"
    );
    assert!(
        !ev.iter().any(|e| e.kind == EventKind::SnapshotInvalidated),
        "{ev:?}"
    );
    assert!(s.info().data_bytes > data0);
    assert!(std::fs::metadata(&store).unwrap().len() > size);
    assert!(std::fs::metadata(&store).unwrap().len() <= 256 << 20);
    assert_eq!(s.snapshots()[0].state, SnapshotState::Valid);
    assert_image("o0@a", &read_all(&s, "o0@a"), &v0);
    assert_clean(&s, "a grown store");
    drop(o);
    s.close().unwrap();
    let s = open(&store).unwrap();
    assert_image("o0@a", &read_all(&s, "o0@a"), &v0);
    assert_image("o0", &read_all(&s, "o0"), &v1);
    assert_clean(&s, "reopen of a grown store");
}

/// Format v2 refuses a version-1 store, saying which version it found and what to do: never a
/// silent misreading.
#[test]
fn a_version_1_store_is_refused_clearly() {
    let f = fixture(65536);
    let (mut sb, _) = current_superblock(&f.store);
    sb.version = 1;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&f.store)
        .unwrap();
    use std::os::unix::fs::FileExt;
    for off in SB_OFFSETS {
        file.write_all_at(&sb.encode(), off).unwrap();
    }
    drop(file);
    refused_both_ways(&f.store, "a version-1 store", |e| match e {
        e @ Error::Version { found: 1, .. } => {
            let msg = e.to_string();
            assert!(
                msg.contains("version 1") && msg.contains("version-1 store"),
                "{msg}"
            );
        }
        e => panic!("{e:?}, expected Version"),
    });
}
