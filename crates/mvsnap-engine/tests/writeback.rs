//! Write-behind: origin writes that wait on a copy-out are acknowledged at once and issued
//! after the commit. Clients must not be able to tell, except by speed: reads see them, later
//! writes win over them, FLUSH and FUA make them durable, block status counts them, and a
//! snapshot taken after them holds them.

mod common;

use common::{format_opts, pattern, read_all, real_setup, sim_setup};
use mvsnap_engine::crashsim::CrashPolicy;
use mvsnap_engine::{OpenOptions, Store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const MIB: usize = 1 << 20;

/// Random first writes after snapshots, each followed at once by an overlapping second write
/// (which needs no copy-out and would go straight to the file if nothing held it back).
/// Whatever the worker's timing, reads show the second over the first, snapshots keep their
/// content, and after flush and reopen the file itself holds the model's bytes.
#[test]
fn later_writes_win_over_queued_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (store, paths) = real_setup(
        dir.path(),
        &format_opts(128 << 20, 65536),
        &[("o0", pattern(1, 4 * MIB))],
    );
    let s = Store::open(&store, &OpenOptions::default()).unwrap();
    let o = s.volume("o0").unwrap();
    let mut model = pattern(1, 4 * MIB);
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    let mut rng = StdRng::seed_from_u64(7);
    for round in 0..12 {
        let tag = format!("s{round}");
        s.create_snapshot(&["o0"], Some(&tag), "", false).unwrap();
        snaps.push((format!("o0@{tag}"), model.clone()));
        for _ in 0..200 {
            let off = rng.random_range(0..4 * MIB - 16384);
            let a = pattern(rng.random(), rng.random_range(1..8192));
            o.write_at(off as u64, &a, false).unwrap();
            model[off..off + a.len()].copy_from_slice(&a);
            let off2 = off + rng.random_range(0..a.len());
            let b = pattern(rng.random(), rng.random_range(1..=4096));
            o.write_at(off2 as u64, &b, false).unwrap();
            model[off2..off2 + b.len()].copy_from_slice(&b);
            let mut got = vec![0u8; 12288];
            o.read_at(off as u64, &mut got).unwrap();
            assert!(
                got[..] == model[off..off + 12288],
                "round {round}: origin read at {off} does not show the last writes"
            );
        }
        for (name, want) in &snaps {
            common::assert_image(name, &read_all(&s, name), want);
        }
    }
    o.flush().unwrap();
    common::assert_image("o0 after flush", &read_all(&s, "o0"), &model);
    s.close().unwrap();
    common::assert_image(
        "the origin file after close",
        &std::fs::read(&paths[0]).unwrap(),
        &model,
    );
}

/// Several writers at once, each on its own region: every read of one's own region shows its
/// own last write, while the worker issues everyone's queued writes in between.
#[test]
fn concurrent_writers_read_their_own_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = real_setup(
        dir.path(),
        &format_opts(128 << 20, 65536),
        &[("o0", pattern(2, 8 * MIB))],
    );
    let s = Store::open(&store, &OpenOptions::default()).unwrap();
    s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
    let finals: Vec<Vec<u8>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let o = s.volume("o0").unwrap();
                scope.spawn(move || {
                    let base = t as usize * 2 * MIB;
                    let mut region = pattern(2, 8 * MIB)[base..base + 2 * MIB].to_vec();
                    let mut rng = StdRng::seed_from_u64(t);
                    for _ in 0..400 {
                        let off = rng.random_range(0..2 * MIB - 4096);
                        let d = pattern(rng.random(), rng.random_range(1..=4096));
                        o.write_at((base + off) as u64, &d, false).unwrap();
                        region[off..off + d.len()].copy_from_slice(&d);
                        let mut got = vec![0u8; 4096];
                        o.read_at((base + off) as u64, &mut got).unwrap();
                        assert!(got[..] == region[off..off + 4096], "thread {t} at {off}");
                    }
                    region
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let want: Vec<u8> = finals.concat();
    s.volume("o0").unwrap().flush().unwrap();
    common::assert_image("o0", &read_all(&s, "o0"), &want);
    common::assert_image("o0@a", &read_all(&s, "o0@a"), &pattern(2, 8 * MIB));
    s.close().unwrap();
}

/// Copy-outs run outside the state lock: four writers hammer the same 256 blocks right after a
/// snapshot while a reader checks the snapshot and `check` runs between them. Each block is
/// copied once (the snapshot holds exactly 1 MiB, however many writers hit a block first), the
/// snapshot always reads the old data, and `check` never sees a copy in flight as a leak.
#[test]
fn writers_of_the_same_blocks_copy_each_once() {
    let dir = tempfile::tempdir().unwrap();
    let old = pattern(3, MIB);
    let (store, _) = real_setup(
        dir.path(),
        &format_opts(64 << 20, 65536),
        &[("o0", old.clone())],
    );
    let s = Store::open(&store, &OpenOptions::default()).unwrap();
    s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (checks, reads) = std::thread::scope(|scope| {
        let writers: Vec<_> = (0..4u64)
            .map(|t| {
                let o = s.volume("o0").unwrap();
                scope.spawn(move || {
                    let mut rng = StdRng::seed_from_u64(100 + t);
                    for _ in 0..600 {
                        let block = rng.random_range(0..256u64);
                        let len = 4096 * rng.random_range(1..=3u64).min(256 - block);
                        let d = pattern(rng.random(), len as usize);
                        o.write_at(block * 4096, &d, false).unwrap();
                    }
                })
            })
            .collect();
        let reader = scope.spawn(|| {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                common::assert_image("o0@a during the writes", &read_all(&s, "o0@a"), &old);
                n += 1;
            }
            n
        });
        let checker = scope.spawn(|| {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                common::assert_clean(&s, "a check during the writes");
                n += 1;
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            n
        });
        for w in writers {
            w.join().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Release);
        (checker.join().unwrap(), reader.join().unwrap())
    });
    assert!(checks > 0 && reads > 0);
    common::assert_image("o0@a", &read_all(&s, "o0@a"), &old);
    let snap = s.snapshots().into_iter().find(|x| x.tag == "a").unwrap();
    assert_eq!(
        snap.exclusive_bytes + snap.shared_bytes,
        MIB as u64,
        "each of the 256 blocks preserved once"
    );
    common::assert_clean(&s, "the writes");
    s.close().unwrap();
}

/// A write into a hole of a sparse origin, still queued, is data for block status: a sparse
/// copy (nbdcopy, qemu-img convert) must not skip it.
#[test]
fn block_status_counts_queued_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = real_setup(dir.path(), &format_opts(64 << 20, 65536), &[]);
    let origin = dir.path().join("sparse");
    std::fs::File::create(&origin)
        .unwrap()
        .set_len(4 * MIB as u64)
        .unwrap();
    let s = Store::open(&store, &OpenOptions::default()).unwrap();
    s.add_origin(&origin, Some("sp")).unwrap();
    s.create_snapshot(&["sp"], Some("a"), "", false).unwrap();
    let o = s.volume("sp").unwrap();
    o.write_at(MIB as u64, &[0x5a; 4096], false).unwrap();
    let ext = o.block_status(MIB as u64, 4096).unwrap();
    assert!(
        ext.iter().all(|e| !e.zero),
        "a written range reported as a hole: {ext:?}"
    );
    let mut buf = vec![0u8; 4096];
    o.read_at(MIB as u64, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    s.close().unwrap();
}

/// FLUSH and FUA make queued writes durable: after a power cut that keeps nothing unsynced,
/// the origin has them and the snapshot its old content.
#[test]
fn flush_and_fua_make_queued_writes_durable() {
    for fua in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let content = pattern(3, 2 * MIB);
        let (m, s) = sim_setup(
            dir.path(),
            &format_opts(32 << 20, 65536),
            &[("o0", content.clone())],
        );
        s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
        let o = s.volume("o0").unwrap();
        let mut want = content.clone();
        for i in 0..32u64 {
            let off = i * 65536 + 1000;
            let d = pattern(100 + i, 5000);
            let last = i == 31;
            o.write_at(off, &d, fua && last).unwrap();
            want[off as usize..off as usize + d.len()].copy_from_slice(&d);
        }
        if !fua {
            o.flush().unwrap();
        }
        let mut rng = StdRng::seed_from_u64(1);
        let m2 = m.crash_all_with(&mut rng, CrashPolicy::DropAll);
        drop(s);
        let s2 = m2.open_store(&OpenOptions::default()).unwrap();
        common::assert_clean(&s2, "after the power cut");
        common::assert_image("o0@a", &read_all(&s2, "o0@a"), &content);
        let got = read_all(&s2, "o0");
        if fua {
            // FUA promises its own write only.
            let off = 31 * 65536 + 1000;
            assert!(
                got[off..off + 5000] == want[off..off + 5000],
                "the FUA write is not durable"
            );
        } else {
            common::assert_image("o0 (flushed)", &got, &want);
        }
    }
}

/// A snapshot taken right after acknowledged writes holds them, even those still queued.
#[test]
fn snapshot_holds_acknowledged_queued_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = real_setup(
        dir.path(),
        &format_opts(64 << 20, 65536),
        &[("o0", pattern(4, 2 * MIB))],
    );
    let s = Store::open(&store, &OpenOptions::default()).unwrap();
    let o = s.volume("o0").unwrap();
    let mut model = pattern(4, 2 * MIB);
    for round in 0..20 {
        s.create_snapshot(&["o0"], Some(&format!("r{round}")), "", false)
            .unwrap();
        for i in 0..16usize {
            let off = (i * 131072 + round * 4096) % (2 * MIB - 4096);
            let d = pattern((round * 16 + i) as u64, 4096);
            o.write_at(off as u64, &d, false).unwrap();
            model[off..off + 4096].copy_from_slice(&d);
        }
        s.create_snapshot(&["o0"], Some(&format!("after{round}")), "", false)
            .unwrap();
        common::assert_image(
            "snapshot right after writes",
            &read_all(&s, &format!("o0@after{round}")),
            &model,
        );
    }
    s.close().unwrap();
}
