//! The control plane with real clients: deleting a snapshot a client has open is refused
//! unless `--force`, which disconnects the client; snapshots created live are exports at once;
//! a second daemon on the same store (or the same NBD socket) is refused with a clear error;
//! `--detach` returns once serving; and the CLI prints the same thing with and without the
//! daemon.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use mvsnap_nbd::proto;

const SIZE: u64 = 16 * MIB;
const FILL: u8 = 0x3c;

fn list_exports(nbdinfo: &std::path::Path, fx: &Fixture) -> Vec<String> {
    let out = run_ok(
        Command::new(nbdinfo)
            .args(["--list", "--json"])
            .arg(fx.list_uri()),
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo --list --json");
    let mut names: Vec<String> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

/// Exit status 1 and one line `mvsnap: error: ...` on stderr; returns that line.
#[track_caller]
fn one_line_error(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "exit status; stderr: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line on stderr: {err}");
    assert!(lines[0].starts_with("mvsnap: error: "), "{err}");
    lines[0].to_string()
}

#[test]
fn delete_of_an_open_snapshot_needs_force_and_disconnects() {
    let [nbdinfo, qemu_io] = need!("nbdinfo", "qemu-io");
    let fx = Fixture::new("del", SIZE, &vec![FILL; SIZE as usize]);
    let mut d = fx.start();
    fx.snapshot("disk0", "s", false, "");
    fx.snapshot("disk0", "other", false, "");

    // A client on disk0@s, and one on the origin.
    let mut c = RawClient::connect(&fx.sock);
    c.handshake("disk0@s", false, false);
    assert_eq!(c.read_simple(1, 0, 4096).unwrap(), vec![FILL; 4096]);
    let mut o = RawClient::connect(&fx.sock);
    o.handshake("disk0", false, false);

    // Refused without --force; the message says how.
    let out = fx.ms(&["snapshot", "delete", "disk0@s"]);
    let line = one_line_error(&out);
    assert!(line.contains("--force"), "{line}");
    assert!(fx.snapshot_names().contains(&"disk0@s".to_string()));
    assert_eq!(
        c.read_simple(2, 4096, 4096).unwrap(),
        vec![FILL; 4096],
        "the client still works after the refused delete"
    );

    // A snapshot nobody has open goes without --force; the clients are not affected.
    fx.ms_ok(&["snapshot", "delete", "disk0@other"]);
    assert!(!list_exports(&nbdinfo, &fx).contains(&"disk0@other".to_string()));
    assert_eq!(c.read_simple(3, 0, 512).unwrap(), vec![FILL; 512]);

    // --force: deleted, and the client is disconnected (the server closes it).
    let start = Instant::now();
    fx.ms_ok(&["snapshot", "delete", "disk0@s", "--force"]);
    eprintln!("delete --force took {:?}", start.elapsed());
    assert!(
        c.closed_within(Duration::from_secs(10)),
        "the client of a force-deleted snapshot was not disconnected"
    );
    assert!(!fx.snapshot_names().contains(&"disk0@s".to_string()));
    assert_eq!(list_exports(&nbdinfo, &fx), vec!["disk0".to_string()]);
    // It cannot come back to it.
    let mut c2 = RawClient::connect(&fx.sock);
    c2.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES);
    let e = c2.go("disk0@s").expect_err("GO of a deleted snapshot");
    assert_eq!(e.0, proto::REP_ERR_UNKNOWN, "{e:?}");
    // The origin's client was not touched.
    o.write_req(5, 0, &[0x11; 4096]);
    assert_eq!(o.simple(), (5, 0));
    assert_eq!(o.read_simple(6, 0, 4096).unwrap(), vec![0x11; 4096]);
    o.disconnect();

    // The same with qemu-io: connected and idle (after a first read) when the snapshot is
    // force-deleted, its next read fails: it was disconnected.
    let Some(stdbuf) = tool("stdbuf") else {
        return;
    };
    fx.snapshot("disk0", "busy", false, "");
    let mut q = Command::new(stdbuf);
    q.arg("-oL")
        .arg(&qemu_io)
        .args(["-f", "raw", "-r"])
        .arg(fx.uri("disk0@busy"))
        .args(["-c", &format!("read -P {FILL:#04x} 8192 4096")])
        .args(["-c", "sleep 2000"])
        .args(["-c", &format!("read -P {FILL:#04x} 8192 4096")]);
    let mut reader = ChildGuard::spawn(&mut q);
    let stdout = reader.0.as_mut().unwrap().stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(l);
        }
    });
    let mut lines = Vec::new();
    loop {
        let l = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("qemu-io did not read: {lines:?}"));
        lines.push(l.clone());
        if l.starts_with("read 4096/4096") {
            break;
        }
    }
    let out = fx.ms(&["snapshot", "delete", "disk0@busy"]);
    assert!(one_line_error(&out).contains("--force"));
    fx.ms_ok(&["snapshot", "delete", "disk0@busy", "--force"]);
    let out = reader.output(Duration::from_secs(30));
    lines.extend(rx.try_iter());
    let all = format!("{}\n{}", lines.join("\n"), text(&out));
    assert!(
        !all.contains("Pattern verification failed") && all.matches("read 4096/4096").count() == 1,
        "qemu-io read from a force-deleted snapshot: {all}"
    );
    assert!(d.alive());
    fx.qemu_io(
        &qemu_io,
        "disk0",
        true,
        &["read -P 0x11 0 4096".to_string()],
    );
    fx.assert_check_clean("after forced deletes");
}

/// A delete raced a client's open: the daemon checked for clients, a client then opened the
/// snapshot, and the delete went on under it (its reads failed). Clients that open the snapshot
/// over and over while deletes are tried: every client that got in reads its data until it
/// leaves, and the delete succeeds only between clients.
#[test]
fn delete_never_races_a_clients_open() {
    let fx = Fixture::new("race", SIZE, &vec![FILL; SIZE as usize]);
    let mut d = fx.start();
    for round in 0..12 {
        let tag = format!("r{round}");
        fx.snapshot("disk0", &tag, false, "");
        let name = format!("disk0@{tag}");
        let sock = fx.sock.clone();
        let started = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let hammer = {
            let (name, started) = (name.clone(), started.clone());
            std::thread::spawn(move || {
                let mut sessions = 0;
                loop {
                    started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let mut c = RawClient::connect(&sock);
                    c.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES);
                    if c.go(&name).is_err() {
                        return sessions;
                    }
                    sessions += 1;
                    for h in 0..3 {
                        let got = c.read_simple(h, h * 4096, 4096);
                        assert_eq!(
                            got,
                            Ok(vec![FILL; 4096]),
                            "{name}: a client that opened it lost it under its feet (session \
                             {sessions}, read {h})"
                        );
                    }
                    c.disconnect();
                }
            })
        };
        // The clients are coming and going before the first delete.
        while started.load(std::sync::atomic::Ordering::Relaxed) < 3 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut refused = 0;
        loop {
            let out = fx.ms(&["snapshot", "delete", &name]);
            if out.status.success() {
                break;
            }
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("open by an NBD client"), "{err}");
            refused += 1;
            assert!(
                refused < 500,
                "the delete never found a moment between clients"
            );
        }
        let sessions = hammer.join().expect("a client lost its snapshot");
        eprintln!("round {round}: {sessions} client sessions, {refused} deletes refused");
    }
    assert!(d.alive());
    fx.assert_check_clean("after the races");
}

#[test]
fn live_snapshots_are_exports_at_once() {
    let [nbdinfo, qemu_io] = need!("nbdinfo", "qemu-io");
    let fx = Fixture::new("live", SIZE, &vec![FILL; SIZE as usize]);
    let _d = fx.start();
    // A client writing to the origin all along.
    let mut writer = RawClient::connect(&fx.sock);
    writer.handshake("disk0", false, false);
    for i in 0..5u8 {
        writer.write_req(i as u64, 0, &vec![i; 4096]);
        assert_eq!(writer.simple(), (i as u64, 0));
        let tag = format!("t{i}");
        fx.snapshot("disk0", &tag, false, &format!("memo {i}"));
        let name = format!("disk0@{tag}");
        // At once: listed, opened, holding what was written before it.
        assert!(
            list_exports(&nbdinfo, &fx).contains(&name),
            "{name} is not listed right after its creation"
        );
        let size = run_ok(Command::new(&nbdinfo).arg("--size").arg(fx.uri(&name)));
        assert_eq!(size.trim(), SIZE.to_string());
        fx.qemu_io(
            &qemu_io,
            &name,
            true,
            &[
                format!("read -P {i:#04x} 0 4096"),
                format!("read -P {FILL:#04x} 4096 {}", SIZE - 4096),
            ],
        );
    }
    writer.disconnect();
    let want: Vec<String> = std::iter::once("disk0".to_string())
        .chain((0..5).map(|i| format!("disk0@t{i}")))
        .collect();
    assert_eq!(list_exports(&nbdinfo, &fx), want);
}

#[test]
fn a_second_daemon_is_refused() {
    let [qemu_io] = need!("qemu-io");
    let fx = Fixture::new("two", SIZE, &vec![FILL; SIZE as usize]);
    let mut d = fx.start();

    // The same store, found through the control socket.
    let other_sock = fx.dir.join("other.sock");
    let out = run(
        fx.mvsnap()
            .arg("serve")
            .arg("--nbd-socket")
            .arg(&other_sock),
        Duration::from_secs(30),
    );
    let line = one_line_error(&out);
    assert!(line.contains("already serves"), "{line}");
    assert!(!other_sock.exists(), "the refused daemon left a socket");

    // The same store from another runtime directory (no control socket to find): the store
    // itself is locked.
    let other_rt = fx.dir.join("run2");
    std::fs::create_dir_all(&other_rt).unwrap();
    let out = run(
        fx.mvsnap()
            .env("MVSNAP_RUNTIME_DIR", &other_rt)
            .arg("serve")
            .arg("--nbd-socket")
            .arg(&other_sock),
        Duration::from_secs(30),
    );
    let line = one_line_error(&out);
    let l = line.to_lowercase();
    assert!(
        l.contains("lock") || l.contains("in use") || l.contains("busy") || l.contains("already"),
        "unclear error for a store served by another daemon: {line}"
    );
    assert!(!other_sock.exists());

    // Another store on the same NBD socket: refused, the first daemon keeps its socket.
    let fx2 = Fixture::new("two2", SIZE, &[]);
    let out = run(
        fx2.mvsnap().arg("serve").arg("--nbd-socket").arg(&fx.sock),
        Duration::from_secs(30),
    );
    let line = one_line_error(&out);
    assert!(line.contains("in use"), "{line}");

    // A command run with another runtime directory is neither refused nor blocked: the
    // daemons' registry sends it to the daemon that holds the store (issue 10).
    let out = run(
        fx.mvsnap()
            .env("MVSNAP_RUNTIME_DIR", &other_rt)
            .args(["check"]),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("clean"), "{}", text(&out));

    assert!(d.alive(), "the first daemon died");
    fx.qemu_io(
        &qemu_io,
        "disk0",
        true,
        &[format!("read -P {FILL:#04x} 0 {SIZE}")],
    );
    fx.snapshot("disk0", "still", false, "");
    assert!(d.terminate().success());
}

/// A daemon started with `--detach`: not our child, so killed by pid on drop.
struct Detached(u32);

impl Drop for Detached {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid the daemon printed; it is a process of this test.
        unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGKILL) };
    }
}

fn pid_alive(pid: u32) -> bool {
    // Not a zombie: reparented daemons are reaped by init.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// `mvsnap serve --detach` with stdout to a pipe and stderr to a file: returns once serving,
/// prints `pid N`; the pid is the daemon.
fn detach(fx: &Fixture, stderr: std::process::Stdio) -> (std::process::Child, Detached) {
    let mut child = fx
        .mvsnap()
        .args(["serve", "--detach", "--nbd-socket"])
        .arg(&fx.sock)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let st = wait_timeout(&mut child, Duration::from_secs(60))
        .expect("serve --detach did not return within 60 s");
    let mut t = String::new();
    use std::io::Read;
    child.stdout.take().unwrap().read_to_string(&mut t).unwrap();
    assert!(st.success(), "serve --detach: {st} {t}");
    let pid: u32 = t
        .lines()
        .find_map(|l| l.strip_prefix("pid "))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `pid N` line: {t}"));
    assert!(
        t.lines().next().unwrap().starts_with("ready nbd=unix:"),
        "{t}"
    );
    assert!(pid_alive(pid), "pid {pid} is not running");
    (child, Detached(pid))
}

#[test]
fn detach_returns_once_serving() {
    let [qemu_io] = need!("qemu-io");
    let fx = Fixture::new("det", SIZE, &vec![FILL; SIZE as usize]);
    let log = std::fs::File::create(fx.dir.join("detached.log")).unwrap();
    let (_, guard) = detach(&fx, log.into());
    let pid = guard.0;
    // Serving already, no wait needed.
    fx.qemu_io(
        &qemu_io,
        "disk0",
        true,
        &[format!("read -P {FILL:#04x} 0 4096")],
    );
    fx.snapshot("disk0", "d1", false, "");
    // SAFETY: kill(2) on the daemon's pid, alive as just checked.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) }, 0);
    let start = Instant::now();
    while pid_alive(pid) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the detached daemon did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::mem::forget(guard);
    assert!(!fx.sock.exists());
    assert_eq!(fx.snapshot_names(), vec!["disk0@d1".to_string()]);
}

/// Regression test: `out=$(mvsnap serve --detach 2>&1)` in a script used to never return,
/// because the detached daemon kept the caller's stderr (a pipe) open, so whoever read it
/// waited for EOF until the daemon exited. Run `serve --detach` with stdout and stderr both
/// pipes: once the command has returned, both must reach EOF while the daemon still runs.
#[test]
fn detach_releases_the_callers_stderr() {
    let fx = Fixture::new("det2", SIZE, &[]);
    let (mut child, guard) = detach(&fx, std::process::Stdio::piped());
    let mut err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        let _ = tx.send(v);
    });
    let eof = rx.recv_timeout(Duration::from_secs(5));
    assert!(pid_alive(guard.0), "the detached daemon is gone");
    drop(guard); // SIGKILL the daemon: now stderr ends in any case.
    assert!(
        eof.is_ok(),
        "stderr of `serve --detach` still open 5 s after it returned: held by the daemon"
    );
}

/// Same keys and JSON types, recursively (values may differ).
fn same_shape(a: &serde_json::Value, b: &serde_json::Value, path: &str) -> Result<(), String> {
    use serde_json::Value::*;
    match (a, b) {
        (Object(x), Object(y)) => {
            let kx: Vec<&str> = x.keys().map(|k| k.as_str()).collect();
            let ky: Vec<&str> = y.keys().map(|k| k.as_str()).collect();
            if kx != ky {
                return Err(format!("{path}: keys {kx:?} vs {ky:?}"));
            }
            for k in x.keys() {
                same_shape(&x[k], &y[k], &format!("{path}.{k}"))?;
            }
            Ok(())
        }
        (Array(x), Array(y)) => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                same_shape(p, q, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        (Number(_), Number(_)) | (String(_), String(_)) | (Bool(_), Bool(_)) | (Null, Null) => {
            Ok(())
        }
        // An optional field may be null on one side only.
        (Null, _) | (_, Null) => Ok(()),
        _ => Err(format!("{path}: {a} vs {b}")),
    }
}

#[test]
fn cli_output_is_the_same_with_and_without_the_daemon() {
    let fx = Fixture::new("same", SIZE, &vec![FILL; SIZE as usize]);
    // Offline: snapshots, a writable child, a write.
    fx.snapshot("disk0", "a", false, "the first one");
    fx.snapshot("disk0@a", "b", true, "");
    let offline = |fx: &Fixture| {
        (
            fx.json(&["snapshot", "list", "--json"]),
            fx.ms_ok(&["snapshot", "list"]),
            fx.json(&["info", "--json"]),
            fx.json(&["check", "--json"]),
            fx.mvsnap()
                .args(["cat", "disk0@a"])
                .output()
                .unwrap()
                .stdout,
        )
    };
    let (l1, t1, i1, c1, cat1) = offline(&fx);
    assert_eq!(l1.as_array().unwrap().len(), 2);

    let d = fx.start();
    let (l2, t2, i2, c2, cat2) = offline(&fx);
    assert_eq!(l1, l2, "snapshot list --json differs with the daemon");
    assert_eq!(t1, t2, "snapshot list (table) differs with the daemon");
    same_shape(&i1, &i2, "info").unwrap();
    assert_eq!(i1["snapshots"], i2["snapshots"], "info: snapshots");
    assert_eq!(i1["origins"], i2["origins"], "info: origins");
    same_shape(&c1, &c2, "check").unwrap();
    assert_eq!(c1["errors"], c2["errors"]);
    assert!(cat1 == cat2, "cat differs with the daemon");

    // A snapshot made through the daemon looks the same offline afterwards.
    fx.snapshot("disk0", "c", false, "through the daemon");
    let (l3, t3, _, _, _) = offline(&fx);
    assert!(d.terminate().success());
    let (l4, t4, _, _, _) = offline(&fx);
    assert_eq!(
        l3, l4,
        "snapshot list --json: daemon vs offline after it stopped"
    );
    assert_eq!(t3, t4);
    assert_eq!(l4.as_array().unwrap().len(), 3);
}

/// Regression test: `mvsnap origin remove disk0` while an NBD client had `disk0` open used to
/// succeed at once, without disconnecting the client, whose WRITEs then failed with EIO while
/// its READs went on from the removed origin's file. Like a snapshot delete (issue 3): either
/// refused while open (the client keeps working), or the client is disconnected.
#[test]
fn origin_remove_while_a_client_has_it_open() {
    let fx = Fixture::new("orm", SIZE, &vec![FILL; SIZE as usize]);
    let _d = fx.start();
    let mut c = RawClient::connect(&fx.sock);
    c.handshake("disk0", false, false);
    assert_eq!(c.read_simple(1, 0, 512).unwrap(), vec![FILL; 512]);
    let out = fx.ms(&["origin", "remove", "disk0"]);
    if out.status.success() {
        // Removed: the client must have been disconnected.
        assert!(
            c.closed_within(Duration::from_secs(5)),
            "origin removed, its client still connected; a read now returns {:?}",
            c.read_simple(2, 0, 512).map(|d| d[0])
        );
    } else {
        let line = one_line_error(&out);
        assert!(line.contains("--force") || line.contains("open"), "{line}");
        assert_eq!(c.read_simple(3, 0, 512).unwrap(), vec![FILL; 512]);
    }
}

/// Issue 7 item 9: a copy of a store (`cp store.img copy.img`) has the same UUID, and commands
/// on the copy went to the daemon serving the original: a snapshot "created on the copy"
/// appeared in the original. Commands are routed by the store's identity on disk.
#[test]
fn commands_on_a_copy_do_not_reach_the_daemon_of_the_original() {
    let fx = Fixture::new("copy", SIZE, &vec![FILL; SIZE as usize]);
    fx.snapshot("disk0", "before", false, "");
    let copy = fx.dir.join("copy.img");
    std::fs::copy(&fx.store, &copy).unwrap();
    let _d = fx.start();
    let on_copy = |args: &[&str]| {
        // The same runtime directory as the daemon's, another --store.
        let mut c = Command::new(mvsnap_bin());
        c.env("MVSNAP_RUNTIME_DIR", &fx.runtime)
            .env_remove("MVSNAP_STORE")
            .args(["--store", copy.to_str().unwrap()])
            .args(args);
        run(&mut c, Duration::from_secs(60))
    };
    // Handled by the copy, not the daemon: and the copy cannot write through the origin the
    // daemon holds (item 8's lock), so it refuses instead of snapshotting.
    let out = on_copy(&["snapshot", "create", "disk0", "--tag", "oncopy"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("in use"), "{}", text(&out));
    let tags = |json: serde_json::Value| -> Vec<String> {
        json.as_array()
            .unwrap()
            .iter()
            .map(|s| s["tag"].as_str().unwrap().to_string())
            .collect()
    };
    let original = tags(fx.json(&["snapshot", "list", "--json"]));
    assert_eq!(
        original,
        vec!["before"],
        "the copy's command reached the original"
    );
    // What only touches the copy works on the copy.
    let out = on_copy(&["snapshot", "delete", "disk0@before"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = on_copy(&["snapshot", "list", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(tags(serde_json::from_slice(&out.stdout).unwrap()).is_empty());
    let original = tags(fx.json(&["snapshot", "list", "--json"]));
    assert_eq!(
        original,
        vec!["before"],
        "the copy's delete reached the original"
    );
}
