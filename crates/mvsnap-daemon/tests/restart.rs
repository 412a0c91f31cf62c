//! Restarts. A clean stop (SIGTERM, then SIGINT) exits 0, removes its sockets, and every export
//! reads the same bytes after a restart. A supervisor loop kills the daemon with SIGKILL at a
//! random moment under fio write load (on the origin and on a writable snapshot), restarts it,
//! and checks that `mvsnap check` is clean and that every snapshot taken before the kill reads
//! exactly as it did when it was taken (DESIGN invariant 1), and that a deleted one stays
//! deleted.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const SIZE: u64 = 32 * MIB;

fn send_signal(d: &Daemon, sig: libc::c_int) {
    // SAFETY: kill(2) on our own, not yet reaped, child.
    assert_eq!(unsafe { libc::kill(d.pid as libc::pid_t, sig) }, 0);
}

#[test]
fn clean_stop_and_restart_keep_every_export() {
    let [qemu_io, nbdcopy] = need!("qemu-io", "nbdcopy");
    let mut origin = pattern_bytes(0x5e5, SIZE as usize);
    let fx = Fixture::new("rst", SIZE, &origin);
    let d = fx.start();

    let w = |fx: &Fixture, export: &str, model: &mut Vec<u8>, writes: &[(u64, u64, u8)]| {
        let cmds: Vec<String> = writes
            .iter()
            .map(|&(off, len, b)| {
                fill(model, off, len, b);
                format!("write -P {b:#04x} {off} {len}")
            })
            .collect();
        fx.qemu_io(&qemu_io, export, false, &cmds);
    };
    w(
        &fx,
        "disk0",
        &mut origin,
        &[(MIB, 300 * KIB, 1), (9, 5000, 2)],
    );
    fx.snapshot("disk0", "s1", false, "");
    let s1 = origin.clone();
    w(
        &fx,
        "disk0",
        &mut origin,
        &[(MIB + 7, 100 * KIB, 3), (20 * MIB, 2 * MIB, 4)],
    );
    fx.snapshot("disk0", "s2", false, "");
    let s2 = origin.clone();
    fx.snapshot("disk0@s1", "w", true, "");
    let mut wv = s1.clone();
    w(
        &fx,
        "disk0@w",
        &mut wv,
        &[(0, 64 * KIB, 5), (SIZE - 5, 5, 6)],
    );
    w(&fx, "disk0", &mut origin, &[(0, 3 * MIB, 7)]);

    let exports: Vec<(&str, &Vec<u8>)> = vec![
        ("disk0", &origin),
        ("disk0@s1", &s1),
        ("disk0@s2", &s2),
        ("disk0@w", &wv),
    ];
    let before: Vec<String> = exports
        .iter()
        .map(|(name, model)| {
            let img = fx.nbdcopy_read(&nbdcopy, name);
            assert_image(name, &img, model);
            sha256(&img)
        })
        .collect();
    let list_before = fx.json(&["snapshot", "list", "--json"]);

    // SIGTERM: exit 0, sockets gone.
    let ctl = d.ctl.clone();
    assert!(
        ctl.exists(),
        "control socket {} while serving",
        ctl.display()
    );
    let st = d.terminate();
    assert_eq!(st.code(), Some(0), "exit status after SIGTERM");
    assert!(
        !ctl.exists(),
        "control socket left behind after a clean stop"
    );
    assert!(
        !fx.sock.exists(),
        "NBD socket left behind after a clean stop"
    );

    // Offline in between: clean, same content.
    fx.assert_check_clean("offline after SIGTERM");
    let cat = fx.mvsnap().args(["cat", "disk0@s2"]).output().unwrap();
    assert!(cat.status.success());
    assert_image("offline cat disk0@s2", &cat.stdout, &s2);

    // Restart: the same bytes everywhere, the same snapshot list.
    let d = fx.start();
    for ((name, _), sha) in exports.iter().zip(&before) {
        let img = fx.nbdcopy_read(&nbdcopy, name);
        assert_eq!(&sha256(&img), sha, "{name} changed across a clean restart");
    }
    assert_eq!(
        fx.json(&["snapshot", "list", "--json"]),
        list_before,
        "snapshot list across a restart"
    );
    // Still fully working: a write and a snapshot, then SIGINT also stops it cleanly.
    w(&fx, "disk0", &mut origin, &[(5 * MIB, 4096, 8)]);
    fx.snapshot("disk0", "s3", false, "");
    send_signal(&d, libc::SIGINT);
    let mut d = d;
    let start = Instant::now();
    while d.alive() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no exit within 60 s of SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(d);
    let d = fx.start();
    assert_image("disk0", &fx.nbdcopy_read(&nbdcopy, "disk0"), &origin);
    assert_image("disk0@s3", &fx.nbdcopy_read(&nbdcopy, "disk0@s3"), &origin);
    assert_image("disk0@s1", &fx.nbdcopy_read(&nbdcopy, "disk0@s1"), &s1);
    fx.assert_check_clean("after two restarts");
    assert!(d.terminate().success());
}

/// fio write load until killed: two jobs on the origin, one (rate-limited) on disk0@w.
/// SIGTERM with a client's writes in flight: every reply is 0 or ESHUTDOWN, each request gets
/// at most one, the daemon exits 0, and every write it answered with 0 is in the origin after
/// the stop (a clean stop makes what it acknowledged durable), with `check` clean.
#[test]
fn sigterm_with_writes_in_flight_answers_them_and_keeps_what_it_acknowledged() {
    use std::io::{Read, Write};
    const N: u64 = 400;
    const ESHUTDOWN: u32 = 108;
    let fx = Fixture::new("term", SIZE, &vec![0u8; SIZE as usize]);
    let d = fx.start();
    let mut c = RawClient::connect(&fx.sock);
    c.handshake("disk0", false, false);
    let data = |h: u64| pattern_bytes(0x7e000 + h, 4096);
    let mut sender = c.s.try_clone().unwrap();
    let sent = std::thread::spawn(move || {
        let mut sent = 0;
        for h in 1..=N {
            let mut b = mvsnap_nbd::proto::encode_request(&mvsnap_nbd::proto::Request {
                flags: 0,
                command: mvsnap_nbd::proto::CMD_WRITE,
                handle: h,
                offset: (h - 1) * 4096 * 7,
                length: 4096,
            })
            .to_vec();
            b.extend_from_slice(&data(h));
            if sender.write_all(&b).is_err() {
                break;
            }
            sent = h;
        }
        sent
    });
    let mut replies: Vec<(u64, u32)> = Vec::new();
    let mut buf = [0u8; 16];
    let mut signalled = false;
    c.s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    while c.s.read_exact(&mut buf).is_ok() {
        assert_eq!(&buf[..4], &0x6744_6698u32.to_be_bytes(), "a simple reply");
        let err = u32::from_be_bytes(buf[4..8].try_into().unwrap());
        let handle = u64::from_be_bytes(buf[8..16].try_into().unwrap());
        replies.push((handle, err));
        if !signalled && replies.len() >= 20 {
            send_signal(&d, libc::SIGTERM);
            signalled = true;
        }
    }
    // The server has closed; a sender blocked on a full socket fails now.
    let _ = c.s.shutdown(std::net::Shutdown::Both);
    let sent = sent.join().unwrap();
    assert!(
        signalled,
        "only {} replies before the connection ended",
        replies.len()
    );
    let st = d.terminate();
    assert_eq!(st.code(), Some(0), "exit status after SIGTERM");
    let mut seen = std::collections::HashSet::new();
    for &(h, err) in &replies {
        assert!(
            h >= 1 && h <= sent,
            "a reply for handle {h}, never sent ({sent} sent)"
        );
        assert!(seen.insert(h), "two replies for handle {h}");
        assert!(err == 0 || err == ESHUTDOWN, "handle {h}: error {err}");
    }
    let ok: Vec<u64> = replies.iter().filter(|r| r.1 == 0).map(|r| r.0).collect();
    let shut = replies.len() - ok.len();
    eprintln!(
        "{sent} sent, {} answered: {} done, {shut} ESHUTDOWN",
        replies.len(),
        ok.len()
    );
    let cat = fx.mvsnap().args(["cat", "disk0"]).output().unwrap();
    assert!(cat.status.success());
    for h in ok {
        let off = ((h - 1) * 4096 * 7) as usize;
        assert!(
            cat.stdout[off..off + 4096] == data(h)[..],
            "write {h}, answered 0 before the stop, is not in the origin after it"
        );
    }
    fx.assert_check_clean("after SIGTERM with writes in flight");
}

fn load(fio: &std::path::Path, fx: &Fixture) -> ChildGuard {
    let mut c = Command::new(fio);
    c.current_dir(&fx.dir.path)
        .args([
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--time_based",
            "--runtime=60",
            "--verify_state_save=0",
            // Jobs as threads: killing fio kills every job.
            "--thread",
        ])
        .arg(format!("--size={SIZE}"))
        .args(["--name=origin", "--numjobs=2"])
        .arg(format!("--uri={}", fx.uri("disk0")))
        .args(["--name=wsnap", "--rate_iops=,200"])
        .arg(format!("--uri={}", fx.uri("disk0@w")));
    ChildGuard::spawn(&mut c)
}

#[test]
fn sigkill_under_write_load_keeps_snapshots() {
    let [fio, nbdcopy] = need!("fio", "nbdcopy");
    let mut rng = Rng::from_env("sigkill supervisor");
    let model = pattern_bytes(0x9, SIZE as usize);
    let fx = Fixture::new("kill", SIZE, &model);
    let t0 = Instant::now();

    // (name, content when taken); "pre" holds the origin as it was before any load.
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    let mut deleted: Vec<String> = Vec::new();
    {
        let d = fx.start();
        fx.snapshot("disk0", "pre", false, "");
        fx.snapshot("disk0", "base", false, "");
        fx.snapshot("disk0@base", "w", true, "");
        snaps.push(("disk0@pre".into(), model.clone()));
        d.kill9();
    }

    const ROUNDS: usize = 5;
    // Snapshots that caught fio's writes (proof that the load was real).
    let mut under_load = 0;
    for round in 0..ROUNDS {
        // Offline first: what recovery finds must check clean.
        fx.assert_check_clean(&format!("offline after kill {round}"));
        let d = fx.start();
        verify_all(&fx, &nbdcopy, &snaps, &deleted, round);
        fx.assert_check_clean(&format!("daemon after kill {round}"));

        let mut job = load(&fio, &fx);
        std::thread::sleep(Duration::from_millis(200 + rng.below(800)));
        assert!(job.running(), "fio stopped early");
        let tag = format!("k{round}");
        fx.snapshot("disk0", &tag, false, "taken under load");
        let name = format!("disk0@{tag}");
        let img = fx.nbdcopy_read(&nbdcopy, &name);
        if img != model {
            under_load += 1;
        }
        snaps.push((name, img));
        if round == 2 {
            // A delete under load that returned must survive the crash too.
            fx.ms_ok(&["snapshot", "delete", "disk0@k0"]);
            snaps.retain(|(n, _)| n != "disk0@k0");
            deleted.push("disk0@k0".into());
        }
        std::thread::sleep(Duration::from_millis(rng.below(700)));
        let mut d = d;
        assert!(d.alive(), "the daemon died under load: {}", d.log_text());
        eprintln!("round {round}: SIGKILL at {:?}", t0.elapsed());
        d.kill9();
        // fio's nbd engine does not notice its server is gone: kill it too.
        drop(job);
        assert!(
            // About 10 s on an idle 2-core machine; generous for a loaded one.
            t0.elapsed() < Duration::from_secs(300),
            "the supervisor loop is too slow"
        );
    }

    assert!(
        under_load >= 2,
        "only {under_load} of {ROUNDS} snapshots differ from the origin before fio: no load?"
    );
    fx.assert_check_clean("offline after the last kill");
    let d = fx.start();
    verify_all(&fx, &nbdcopy, &snaps, &deleted, ROUNDS);
    fx.assert_check_clean("at the end");
    // The writable snapshot the load wrote to is readable end to end.
    let _ = fx.nbdcopy_read(&nbdcopy, "disk0@w");
    let st = d.terminate();
    assert_eq!(st.code(), Some(0), "clean exit after the crashes");
    eprintln!("supervisor loop: {:?}", t0.elapsed());
}

fn verify_all(
    fx: &Fixture,
    nbdcopy: &std::path::Path,
    snaps: &[(String, Vec<u8>)],
    deleted: &[String],
    round: usize,
) {
    let names = fx.snapshot_names();
    for (name, want) in snaps {
        assert!(
            names.contains(name),
            "after kill {round}: {name} is gone from the list {names:?}"
        );
        let got = fx.nbdcopy_read(nbdcopy, name);
        assert_image(&format!("{name} after kill {round}"), &got, want);
    }
    for name in deleted {
        assert!(
            !names.contains(name),
            "after kill {round}: deleted {name} is back: {names:?}"
        );
    }
}
