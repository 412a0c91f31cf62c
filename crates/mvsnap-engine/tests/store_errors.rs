//! Errors from the host (EIO, ENOSPC, failed syncs) and what they must never cost: data a
//! flush or a clean close vouched for, or a snapshot. Issue 7, items 2, 4, 5 and 6b. Each test
//! is named after the case that lost data before it was fixed.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use mvsnap_engine::crashsim::{CrashPolicy, SimDisk, SimMachine};
use mvsnap_engine::{BlockDev, Error, OpenOptions, Store, Volume};
use rand::rngs::StdRng;
use rand::SeedableRng;

use common::{format_opts, pattern, read_all};

const MIB: usize = 1 << 20;

fn setup(store_size: u64, content: &[u8]) -> (tempfile::TempDir, SimMachine, Store) {
    let dir = tempfile::tempdir().unwrap();
    let (m, s) = common::sim_setup(
        dir.path(),
        &format_opts(store_size, 65536),
        &[("o0", content.to_vec())],
    );
    (dir, m, s)
}

/// What survives a power cut that loses everything not synced.
fn power_cut(m: &SimMachine) -> Store {
    let m2 = m.crash_all_with(&mut StdRng::seed_from_u64(7), CrashPolicy::DropAll);
    m2.open_store(&OpenOptions::default()).unwrap()
}

/// 6b: after a reopen, a writable snapshot's overwrites of blocks it already owns change no
/// metadata; a clean close must still make them durable (it synced only the origins).
#[test]
fn writable_snapshot_overwrites_are_durable_after_close() {
    let content = pattern(1, MIB);
    let (dir, m, s) = setup(16 << 20, &content);
    s.create_snapshot(&["o0"], Some("w"), "", true).unwrap();
    let w = s.volume("o0@w").unwrap();
    w.write_at(65536, &pattern(2, 65536), false).unwrap();
    drop(w);
    s.close().unwrap();

    let s = m.open_store(&OpenOptions::default()).unwrap();
    let new = pattern(3, 65536);
    s.volume("o0@w")
        .unwrap()
        .write_at(65536, &new, false)
        .unwrap();
    s.close().unwrap();

    let s = power_cut(&m);
    let mut want = content.clone();
    want[65536..131072].copy_from_slice(&new);
    common::assert_image(
        "o0@w after close and a power cut",
        &read_all(&s, "o0@w"),
        &want,
    );
    common::assert_clean(&s, "after the power cut");
    drop(dir);
}

/// 4: a failed origin fdatasync was reported once, and a retried FLUSH then succeeded although
/// Linux had dropped the dirty pages. Every later flush must fail until the store is reopened.
#[test]
fn failed_origin_sync_fails_every_later_flush() {
    let content = pattern(4, MIB);
    let (dir, m, s) = setup(16 << 20, &content);
    let origin_disk = m.disk(&dir.path().join("o0")).unwrap();
    let o = s.volume("o0").unwrap();
    o.write_at(4096, &[0xaa; 8192], false).unwrap();
    origin_disk.fail_sync_after(1);
    let first = o.flush().expect_err("the sync fails");
    assert!(first.to_string().contains("os error 5"), "{first}");
    // The data is gone from the disk's future (failed-fsync semantics); nothing may vouch now.
    for attempt in 0..3 {
        let again = o.flush().expect_err("a later flush after a failed sync");
        assert!(
            again.to_string().contains("until reopened"),
            "{attempt}: {again}"
        );
    }
    o.write_at(MIB as u64 / 2, &[0xbb; 4096], false).unwrap();
    assert!(o.flush().is_err(), "a new write does not clear the failure");
    assert!(s.clone().close().is_err(), "close reports it too");
    drop(o);
    drop(s);

    // Reopened, the origin is served again and flushes work; what was lost is not claimed.
    let s = m.open_store(&OpenOptions::default()).unwrap();
    let o = s.volume("o0").unwrap();
    o.write_at(0, &[0xcc; 4096], false).unwrap();
    o.flush().unwrap();
    s.close().unwrap();
}

/// An open keeps the origins' page cache only after a clean close (copy-outs then read the
/// cache, as any other reader of the device would); after a session that wrote an origin and
/// did not close cleanly, it drops it.
#[test]
fn origin_cache_is_kept_only_after_a_clean_close() {
    let content = pattern(6, MIB);
    let (dir, m, s) = setup(16 << 20, &content);
    let disk = m.disk(&dir.path().join("o0")).unwrap();
    let drops = || disk.stats().cache_drops;
    s.volume("o0")
        .unwrap()
        .write_at(0, &[1; 4096], false)
        .unwrap();
    s.close().unwrap();
    let clean = drops();
    let s = m.open_store(&OpenOptions::default()).unwrap();
    assert_eq!(drops(), clean, "kept after a clean close");
    s.close().unwrap();
    let ro = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    drop(m.open_store(&ro).unwrap());
    assert_eq!(drops(), clean, "kept after a session that wrote nothing");
    let s = m.open_store(&OpenOptions::default()).unwrap();
    s.volume("o0")
        .unwrap()
        .write_at(4096, &[2; 4096], true)
        .unwrap();
    drop(s); // the daemon dies
    drop(m.open_store(&ro).unwrap());
    assert_eq!(
        drops(),
        clean + 1,
        "dropped after a session that did not close"
    );
    let s = m.open_store(&OpenOptions::default()).unwrap();
    assert_eq!(drops(), clean + 2, "still not vouched for");
    s.close().unwrap();
    drop(m.open_store(&OpenOptions::default()).unwrap());
    assert_eq!(drops(), clean + 2, "vouched for again after a clean close");
}

/// After a clean close the next open keeps the origin's page cache. When that session then
/// loses an origin write to a failed sync and ends without a clean close, the cache shows bytes
/// the device never got: the open after it must not serve them. (The session's first origin
/// write makes the header stop vouching for the cache before anything reaches the origin.)
#[test]
fn an_origin_write_lost_after_a_clean_close_is_not_served_from_the_cache() {
    for close_attempt in [false, true] {
        let content = pattern(7, MIB);
        let (dir, m, s) = setup(16 << 20, &content);
        s.close().unwrap();
        let s = m.open_store(&OpenOptions::default()).unwrap();
        let o = s.volume("o0").unwrap();
        o.write_at(8192, &[0xaa; 4096], false).unwrap();
        m.disk(&dir.path().join("o0")).unwrap().fail_sync_after(1);
        o.flush().expect_err("the sync fails");
        drop(o);
        if close_attempt {
            assert!(s.clone().close().is_err(), "close reports the lost write");
        }
        drop(s);
        // Same boot: the cache still shows 0xaa, the device the old bytes.
        let s = m.open_store(&OpenOptions::default()).unwrap();
        common::assert_image(
            &format!("o0 after a same-boot restart (close attempted: {close_attempt})"),
            &read_all(&s, "o0"),
            &content,
        );
        s.close().unwrap();
    }
}

/// The same for an ephemeral session, which writes no header of its own and syncs nothing:
/// the host's writeback of its origin write fails, the session dies, and the next open must
/// not serve the lost bytes from the cache.
#[test]
fn an_origin_write_lost_in_an_ephemeral_session_is_not_served_from_the_cache() {
    let content = pattern(8, MIB);
    let (dir, m, s) = setup(16 << 20, &content);
    s.close().unwrap();
    let eph = OpenOptions {
        ephemeral: true,
        ..Default::default()
    };
    let s = m.open_store(&eph).unwrap();
    s.volume("o0")
        .unwrap()
        .write_at(8192, &[0xaa; 4096], false)
        .unwrap();
    let disk = m.disk(&dir.path().join("o0")).unwrap();
    disk.fail_sync_after(1);
    BlockDev::sync(&*disk).expect_err("the host's writeback fails");
    drop(s);
    let s = m.open_store(&OpenOptions::default()).unwrap();
    common::assert_image(
        "o0 after an ephemeral session lost a write",
        &read_all(&s, "o0"),
        &content,
    );
    s.close().unwrap();
}

/// An origin with an acknowledged, unsynced write whose next sync will fail (EIO).
fn unsynced_write_then_failing_sync(seed: u64) -> (tempfile::TempDir, Store, Volume) {
    let (dir, m, s) = setup(16 << 20, &pattern(seed, MIB));
    let o = s.volume("o0").unwrap();
    o.write_at(8192, &[0xaa; 4096], false).unwrap();
    m.disk(&dir.path().join("o0")).unwrap().fail_sync_after(1);
    (dir, s, o)
}

/// 4, found by the crash workload's injected faults: the sync a snapshot creation does on its
/// origin failed, the creation failed, but the failure was not remembered. The next flush
/// returned success over the writes Linux had dropped, and a power cut took the origin back.
#[test]
fn failed_sync_in_snapshot_create_fails_every_later_flush() {
    let (_dir, s, o) = unsynced_write_then_failing_sync(6);
    s.create_snapshot(&["o0"], Some("a"), "", false)
        .expect_err("the origin's sync fails");
    let again = o.flush().expect_err("a flush after the failed sync");
    assert!(again.to_string().contains("until reopened"), "{again}");
}

/// 4, found by the crash workload: after an origin lost writes, a snapshot of it was created
/// and vouched for bytes that only the page cache held; after a power cut the "read-only"
/// snapshot read different data. It must be refused until the store is reopened.
#[test]
fn snapshot_of_an_origin_that_lost_writes_is_refused() {
    let (_dir, s, o) = unsynced_write_then_failing_sync(7);
    o.flush().expect_err("the sync fails");
    let e = s
        .create_snapshot(&["o0"], Some("a"), "", false)
        .expect_err("a snapshot of an origin that lost writes");
    assert!(e.to_string().contains("until reopened"), "{e}");
    assert!(s.volume("o0@a").is_err(), "the refused snapshot exists");
}

/// 4: a FUA write's own sync failed and was not remembered: the next flush succeeded over the
/// dirty pages the failed sync had dropped (other writes' too).
#[test]
fn failed_fua_sync_fails_every_later_flush() {
    let (_dir, _s, o) = unsynced_write_then_failing_sync(8);
    o.write_at(65536, &[0xbb; 4096], true)
        .expect_err("the FUA write's sync fails");
    let again = o.flush().expect_err("a flush after the failed FUA sync");
    assert!(again.to_string().contains("until reopened"), "{again}");
}

/// Found by the crash workload's injected faults: a delete whose commit failed (the store is
/// poisoned) was already gone from memory, so the origin's next writes skipped the copy-out it
/// needed and reached the disk. After a power cut the delete was not durable, and the snapshot
/// came back over the new data. No origin write may pass a delete before it is durable.
#[test]
fn origin_write_after_a_delete_that_failed_to_commit_keeps_the_snapshot() {
    let content = pattern(9, MIB);
    let (_dir, m, s) = setup(16 << 20, &content);
    s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
    m.store_disk().unwrap().fail_sync_after(1);
    s.delete_snapshot("o0@a")
        .expect_err("the delete's commit fails");
    let o = s.volume("o0").unwrap();
    let w = o.write_at(0, &[0xee; 65536], true);
    assert!(
        matches!(w, Err(Error::Poisoned(_))),
        "an origin write past a delete that is not durable: {w:?}"
    );
    drop(o);
    drop(s);
    let s = power_cut(&m);
    if s.volume("o0@a").is_ok() {
        common::assert_image("o0@a after the power cut", &read_all(&s, "o0@a"), &content);
    }
    common::assert_clean(&s, "the power cut");
}

/// 4: after the store is poisoned by a failed sync, a restart in the same boot recovered
/// through the page cache, which still showed the writes the device never got: replay trusted
/// a preserved copy that was not on the disk, the recovery checkpoint made the mapping durable,
/// and after a power cut the snapshot read garbage. Recovery must read from the device.
#[test]
fn restart_after_poison_does_not_vouch_for_page_cache_data() {
    let content = pattern(5, MIB);
    let (_dir, m, s) = setup(16 << 20, &content);
    s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
    let o = s.volume("o0").unwrap();
    // The preserve of chunk 2 is written, then its group commit's sync fails.
    m.store_disk().unwrap().fail_sync_after(1);
    o.write_at(2 * 65536, &[0xee; 65536], true)
        .expect_err("the preserve's sync fails");
    drop(o);
    assert!(s.clone().close().is_err());
    drop(s);

    // Same boot: the page cache is still there. Recover, work, close cleanly.
    let s = m.open_store(&OpenOptions::default()).unwrap();
    common::assert_image(
        "o0@a after a same-boot restart",
        &read_all(&s, "o0@a"),
        &content,
    );
    s.volume("o0")
        .unwrap()
        .write_at(2 * 65536, &[0xdd; 4096], true)
        .unwrap();
    s.close().unwrap();

    // Then a power cut: the snapshot must still read its content.
    let s = power_cut(&m);
    common::assert_image("o0@a after the power cut", &read_all(&s, "o0@a"), &content);
    common::assert_clean(&s, "after the power cut");
}

/// 2: a full store appended the `Invalidate` of the snapshots that needed a copy, but the
/// origin write was issued at once and an origin FLUSH synced only the origin. A power cut then
/// brought the snapshot back valid, reading the new data. The invalidation must be durable
/// before any write of that origin reaches the disk.
#[test]
fn full_store_invalidation_is_durable_before_the_origin_write() {
    let content = pattern(6, 8 * MIB);
    let (_dir, m, s) = setup(3 << 20, &content);
    s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
    let o = s.volume("o0").unwrap();
    let new = pattern(7, 8 * MIB);
    // Chunk by chunk, each flushed, until the store is full and the snapshot is invalidated:
    // then nothing else is pending that would commit the invalidation by chance.
    let state = |s: &Store| {
        s.snapshots()
            .into_iter()
            .find(|i| i.tag == "a")
            .unwrap()
            .state
    };
    let mut written = content.clone();
    for c in 0..128 {
        let r = c * 65536..(c + 1) * 65536;
        o.write_at(r.start as u64, &new[r.clone()], false).unwrap();
        o.flush().unwrap();
        written[r.clone()].copy_from_slice(&new[r]);
        if state(&s) == mvsnap_engine::SnapshotState::Invalid {
            break;
        }
    }
    assert_eq!(
        state(&s),
        mvsnap_engine::SnapshotState::Invalid,
        "the store filled"
    );
    drop(o);

    // Everything the flush vouched for is on disk, and nothing else.
    let s = power_cut(&m);
    common::assert_image("o0 after the power cut", &read_all(&s, "o0"), &written);
    match common::try_read_all(&s, "o0@a") {
        Err(Error::SnapshotInvalid { .. }) => {}
        Ok(got) => common::assert_image("o0@a (valid after the power cut)", &got, &content),
        Err(e) => panic!("reading o0@a after the power cut: {e}"),
    }
    common::assert_clean(&s, "after the power cut");
}

/// 5: any store error used to poison the store, and every origin write failed from then on.
/// A copy-out that cannot be written (EIO, or ENOSPC from a sparse store on a full host file
/// system) now invalidates the snapshots that needed it, durably, and the origin goes on.
fn copy_out_error_invalidates_and_the_origin_goes_on(errno: i32) {
    let content = pattern(8, MIB);
    let (_dir, m, s) = setup(16 << 20, &content);
    s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
    let o = s.volume("o0").unwrap();
    m.store_disk().unwrap().fail_write_after_with(1, errno);
    let new = pattern(9, 65536);
    o.write_at(3 * 65536, &new, false)
        .expect("the origin write goes on");
    o.flush().expect("and is flushed");
    let info = s.snapshots().into_iter().find(|i| i.tag == "a").unwrap();
    assert_eq!(info.state, mvsnap_engine::SnapshotState::Invalid);
    let reason = info.reason.unwrap_or_default();
    assert!(
        reason.contains(&format!("os error {errno}")),
        "the reason names the error: {reason}"
    );
    assert!(s
        .events()
        .iter()
        .any(|e| e.kind == mvsnap_engine::EventKind::SnapshotInvalidated));
    // Not poisoned: new snapshots work and keep their content.
    let mut now = content.clone();
    now[3 * 65536..4 * 65536].copy_from_slice(&new);
    s.create_snapshot(&["o0"], Some("b"), "", false).unwrap();
    o.write_at(5 * 65536, &pattern(10, 65536), false).unwrap();
    o.flush().unwrap();
    common::assert_image("o0@b", &read_all(&s, "o0@b"), &now);
    now[5 * 65536..6 * 65536].copy_from_slice(&pattern(10, 65536));
    drop(o);

    // The invalidation was durable before the origin changed.
    let s = power_cut(&m);
    common::assert_image("o0 after a power cut", &read_all(&s, "o0"), &now);
    match common::try_read_all(&s, "o0@a") {
        Err(Error::SnapshotInvalid { .. }) => {}
        other => panic!("o0@a after a power cut: {:?}", other.map(|_| "valid")),
    }
    common::assert_clean(&s, "after the power cut");
}

#[test]
fn store_eio_on_copy_out_invalidates_and_the_origin_goes_on() {
    copy_out_error_invalidates_and_the_origin_goes_on(libc::EIO);
}

#[test]
fn store_enospc_on_copy_out_invalidates_and_the_origin_goes_on() {
    copy_out_error_invalidates_and_the_origin_goes_on(libc::ENOSPC);
}

/// 5: the old block of a first write cannot be read (a bad sector of the origin): that write
/// fails and the origin keeps its old data, which the snapshot still reads; the block's claim
/// is given back (the same write goes through once the origin reads again) and the store is
/// not poisoned (other first writes go on meanwhile).
#[test]
fn origin_read_error_on_copy_out_fails_that_write_only() {
    let content = pattern(13, MIB);
    let (dir, m, s) = setup(16 << 20, &content);
    s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
    let o = s.volume("o0").unwrap();
    let origin = m.disk(&dir.path().join("o0")).unwrap();
    origin.fail_reads(libc::EIO);
    let new = pattern(14, 65536);
    match o.write_at(2 * 65536, &new, false) {
        Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc::EIO) => {}
        other => panic!("a first write whose old block cannot be read: {other:?}"),
    }
    origin.clear_faults();
    common::assert_image("o0 after the failed write", &read_all(&s, "o0"), &content);
    // Not poisoned: other first writes, and the same one again, go through.
    let mut now = content.clone();
    for (block, seed) in [(5, 15), (2, 16)] {
        let data = pattern(seed, 65536);
        o.write_at(block * 65536, &data, false).unwrap();
        now[block as usize * 65536..(block as usize + 1) * 65536].copy_from_slice(&data);
    }
    o.flush().unwrap();
    common::assert_image("o0", &read_all(&s, "o0"), &now);
    common::assert_image("o0@a", &read_all(&s, "o0@a"), &content);
    common::assert_clean(&s, "after the failed copy-out");
    drop(o);
    let s = power_cut(&m);
    common::assert_image("o0 after a power cut", &read_all(&s, "o0"), &now);
    common::assert_image("o0@a after a power cut", &read_all(&s, "o0@a"), &content);
    common::assert_clean(&s, "after the power cut");
}

/// 5: a writable snapshot's failed store write fails that write only.
#[test]
fn writable_snapshot_write_error_fails_only_that_write() {
    let content = pattern(12, MIB);
    let (_dir, m, s) = setup(16 << 20, &content);
    s.create_snapshot(&["o0"], Some("w"), "", true).unwrap();
    let w = s.volume("o0@w").unwrap();
    m.store_disk()
        .unwrap()
        .fail_write_after_with(1, libc::ENOSPC);
    let err = w.write_at(65536, &[0x11; 8192], false).unwrap_err();
    assert!(!matches!(err, Error::Poisoned(_)), "{err}");
    assert!(err.to_string().contains("os error 28"), "{err}");
    // The next write works, and so does everything else.
    w.write_at(65536, &[0x22; 8192], false).unwrap();
    w.flush().unwrap();
    s.volume("o0")
        .unwrap()
        .write_at(0, &[0x33; 4096], true)
        .unwrap();
    let mut want = content.clone();
    want[65536..65536 + 8192].fill(0x22);
    common::assert_image("o0@w", &read_all(&s, "o0@w"), &want);
    common::assert_clean(&s, "after a failed snapshot write");
    drop(w);
    s.close().unwrap();
    let s = power_cut(&m);
    common::assert_image("o0@w after a power cut", &read_all(&s, "o0@w"), &want);
}

/// The store disk, with a way to stop one background thread (the tree committer at the sync
/// of a commit's nodes, written but not yet durable; or the group committer) at its next sync
/// until the test says go.
struct HoldCommitter {
    disk: Arc<SimDisk>,
    thread: &'static str,
    armed: AtomicBool,
    reached: Mutex<mpsc::Sender<()>>,
    go: Mutex<mpsc::Receiver<()>>,
}

impl HoldCommitter {
    /// The device, a receiver told when the thread is held, and the sender that lets it go.
    fn new(
        disk: Arc<SimDisk>,
        thread: &'static str,
    ) -> (Arc<HoldCommitter>, mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (reached_tx, reached) = mpsc::channel();
        let (go, go_rx) = mpsc::channel();
        let hold = Arc::new(HoldCommitter {
            disk,
            thread,
            armed: AtomicBool::new(false),
            reached: Mutex::new(reached_tx),
            go: Mutex::new(go_rx),
        });
        (hold, reached, go)
    }
}

impl BlockDev for HoldCommitter {
    fn len(&self) -> std::io::Result<u64> {
        self.disk.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.disk.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.disk.write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        if std::thread::current().name() == Some(self.thread)
            && self.armed.swap(false, Ordering::AcqRel)
        {
            let _ = self.reached.lock().unwrap().send(());
            // Bounded: a test that fails while the thread is held must not hang its drop.
            let _ = self
                .go
                .lock()
                .unwrap()
                .recv_timeout(std::time::Duration::from_secs(20));
        }
        self.disk.sync()
    }
    fn grow(&self, len: u64) -> std::io::Result<()> {
        self.disk.grow(len)
    }
    fn can_grow(&self) -> bool {
        self.disk.can_grow()
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.disk.discard(offset, len)
    }
    fn punch(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.disk.punch(offset, len)
    }
    fn can_punch(&self) -> bool {
        self.disk.can_punch()
    }
    fn allocation(&self, offset: u64, len: u64) -> std::io::Result<Vec<mvsnap_engine::Extent>> {
        self.disk.allocation(offset, len)
    }
    fn drop_cache(&self) -> std::io::Result<()> {
        BlockDev::drop_cache(&*self.disk)
    }
    fn path(&self) -> &std::path::Path {
        self.disk.path()
    }
}

/// Found by the deep-snapshot crash test with host I/O errors: the committer wrote a commit's
/// first blocks, another thread's sync of the store failed (Linux drops the dirty pages it
/// covered and reports that once), then the committer's own sync succeeded (nothing left to
/// write) and it made its header durable over blocks that never reached the disk. After a
/// power cut the store's newest header pointed at tables and nodes that were not there.
#[test]
fn a_commit_is_not_made_durable_after_another_threads_sync_failed() {
    let content = pattern(11, 32 * MIB);
    let (dir, m, s) = setup(128 << 20, &content);
    s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
    s.create_snapshot(&["o0"], Some("w"), "", true).unwrap();
    s.close().unwrap();

    let disk = m.store_disk().unwrap();
    let (hold, reached, go) = HoldCommitter::new(disk.clone(), "mvsnap-commit");
    // A small cache: a commit every few dozen dirty nodes.
    let opts = OpenOptions {
        cache_bytes: Some(MIB as u64),
        ..Default::default()
    };
    let s = Store::open_with(hold.clone(), None, m.opener(), &opts).unwrap();
    let o = s.volume("o0").unwrap();
    let w = s.volume("o0@w").unwrap();
    hold.armed.store(true, Ordering::Release);
    // First writes all over the origin until the committer starts a commit (and stops).
    let blocks = content.len() / 4096;
    std::thread::scope(|sc| {
        sc.spawn(|| {
            for i in 0..blocks {
                if !hold.armed.load(Ordering::Acquire) {
                    return;
                }
                let at = (i * 7919) % blocks * 4096;
                o.write_at(at as u64, &[i as u8; 4096], false).unwrap();
            }
        });
    });
    reached
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the writes started a background commit");
    // `info` counts the nodes of the commit being written (held in RAM until it is durable).
    let committing = s.info().committing_bytes;
    assert!(
        committing >= 2 * 4096 && committing.is_multiple_of(4096),
        "committing bytes while a commit of a tree with several leaves is being written: \
         {committing}"
    );

    // Another thread's sync fails and drops what the committer has written so far. (If syncs
    // of the store run one at a time, it waits for the committer's: then give up waiting.)
    disk.fail_sync_after(1);
    let flushed = std::thread::scope(|sc| {
        let flush = sc.spawn(|| w.flush());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while !flush.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        go.send(()).unwrap();
        flush.join().unwrap()
    });
    flushed.expect_err("the store's sync failed");
    drop((o, w));
    let _ = s.close();

    let s = power_cut(&m);
    common::assert_image(
        "snapshot a after the power cut",
        &read_all(&s, "o0@a"),
        &content,
    );
    common::assert_clean(&s, "the power cut");
    drop(dir);
}

/// Snapshot `a` of o0, then the store opened again with the group committer to be held at
/// its next sync: the store, o0, a receiver told when it is held, the sender that lets it go.
fn with_group_committer_held_at_its_next_sync(
    m: &SimMachine,
    s: Store,
) -> (Store, Volume, mpsc::Receiver<()>, mpsc::Sender<()>) {
    s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
    s.close().unwrap();
    let (hold, reached, go) = HoldCommitter::new(m.store_disk().unwrap(), "mvsnap-group");
    let s = Store::open_with(hold.clone(), None, m.opener(), &OpenOptions::default()).unwrap();
    let o = s.volume("o0").unwrap();
    hold.armed.store(true, Ordering::Release);
    (s, o, reached, go)
}

/// `info` counts what the store holds in RAM beside its node cache: origin writes queued until
/// their copy-outs are durable, and (above) the nodes of a commit being written.
#[test]
fn info_counts_origin_writes_queued_behind_their_copy_outs() {
    let content = pattern(13, MIB);
    let (_dir, m, s) = setup(16 << 20, &content);
    let (s, o, reached, go) = with_group_committer_held_at_its_next_sync(&m, s);
    assert_eq!(s.info().queued_write_bytes, 0);
    // A first write: its copy-out is logged, the write itself queued and answered.
    o.write_at(65536, &[0x5a; 8192], false).unwrap();
    reached
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the group committer syncs the copy-out");
    assert_eq!(
        s.info().queued_write_bytes,
        8192,
        "while the copy-out is not durable"
    );
    go.send(()).unwrap();
    o.flush().unwrap();
    assert_eq!(s.info().queued_write_bytes, 0, "after a flush");
    let mut want = content.clone();
    want[65536..65536 + 8192].fill(0x5a);
    common::assert_image("o0", &read_all(&s, "o0"), &want);
    common::assert_image("o0@a", &read_all(&s, "o0@a"), &content);
    drop(o);
    s.close().unwrap();
}

/// A first write is answered once its copy is made, before its record is logged (whoever
/// takes the state lock next logs it). If the store is poisoned in between, the record can
/// never be logged: the origin write must be dropped, never issued (the snapshot's copy would
/// be named by no record), and the origin's next flush must say so.
#[test]
fn an_answered_write_whose_copy_cannot_be_logged_is_dropped_and_its_flush_fails() {
    let content = pattern(14, MIB);
    let (_dir, m, s) = setup(16 << 20, &content);
    let (s, o, reached, go) = with_group_committer_held_at_its_next_sync(&m, s);
    // The committer logs this first write's copy, then is held in the sync of its group.
    o.write_at(65536, &[0x5a; 4096], false).unwrap();
    reached
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the group committer syncs the first copy-out");
    // Nobody logs this one's copy while the committer is held: answered, record pending.
    o.write_at(3 * 65536, &[0xa5; 4096], false).unwrap();
    // The held sync fails: the store is poisoned.
    m.store_disk().unwrap().fail_sync_after(1);
    go.send(()).unwrap();
    let e = o.flush().expect_err("the flush reports the dropped writes");
    assert!(
        e.to_string().contains("dropped"),
        "the flush says writes were dropped: {e}"
    );
    // Neither write reached the origin: their copies never became durable.
    let now = read_all(&s, "o0");
    common::assert_image("o0 after the poison", &now, &content);
    drop(o);
    drop(s);
    let s = power_cut(&m);
    common::assert_image("o0@a after a power cut", &read_all(&s, "o0@a"), &content);
    common::assert_image("o0 after a power cut", &read_all(&s, "o0"), &content);
    common::assert_clean(&s, "after the power cut");
}
