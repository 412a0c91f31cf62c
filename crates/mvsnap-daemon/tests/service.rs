//! The daemon as a service (issue 10): systemd readiness and stop notices, commands that find
//! the daemon whatever runtime directory they run with, a locked store's error naming who holds
//! it, `--detach` with a pidfile and a log named after the daemon, events (`events --follow`,
//! `--on-event`) as the store fills.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn recv_notice(sock: &UnixDatagram, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = vec![0u8; 4096];
    let mut seen = String::new();
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            seen.push_str(&msg);
            seen.push('|');
            if msg.lines().any(|l| l == want) {
                return msg;
            }
        }
    }
    panic!("no {want} notice within 60 s (got {seen:?})");
}

#[test]
fn systemd_hears_ready_and_stopping() {
    let fx = Fixture::new("svc-notify", 8 * MIB, &[]);
    let path = fx.dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let d = fx.start_with(&[], &[("NOTIFY_SOCKET", path.as_path())]);
    let ready = recv_notice(&sock, "READY=1");
    assert!(
        ready.contains("STATUS=ready nbd=unix:"),
        "the status names the sockets: {ready:?}"
    );
    // Ready means serving: a command goes through at once.
    fx.snapshot("disk0", "up", false, "");
    let st = d.terminate();
    assert!(st.success(), "{st}");
    recv_notice(&sock, "STOPPING=1");
}

#[test]
fn commands_find_a_daemon_started_with_another_runtime_dir() {
    let fx = Fixture::new("svc-registry", 8 * MIB, &[]);
    let d = fx.start();
    let elsewhere = fx.dir.join("other-run");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let ms = |args: &[&str]| {
        run(
            fx.mvsnap().env("MVSNAP_RUNTIME_DIR", &elsewhere).args(args),
            TOOL_TIMEOUT,
        )
    };
    let out = ms(&["snapshot", "create", "disk0", "--tag", "found"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = ms(&["snapshot", "list", "--json"]);
    assert!(text(&out).contains("disk0@found"), "{}", text(&out));
    // And the daemon's own view agrees: it made the snapshot.
    assert!(fx.snapshot_names().contains(&"disk0@found".to_string()));
    assert!(d.terminate().success());
}

#[test]
fn a_locked_store_names_who_holds_it() {
    let fx = Fixture::new("svc-locked", 8 * MIB, &[]);
    // An offline `write` holds the store while it reads stdin.
    let mut writer = fx
        .mvsnap()
        .args(["write", "disk0", "--offset", "0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = writer.stdin.take().unwrap();
    stdin.write_all(&[7u8; 4096]).unwrap();
    // Wait until it holds the lock (watching /proc/locks: opening the store to find out
    // would race the writer's own open).
    let deadline = Instant::now() + Duration::from_secs(30);
    let pid = writer.id().to_string();
    while !std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .any(|l| l.contains("FLOCK") && l.split_whitespace().nth(4) == Some(pid.as_str()))
    {
        assert!(Instant::now() < deadline, "the writer never took the lock");
        assert!(
            writer.try_wait().unwrap().is_none(),
            "the writer exited early"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = fx.ms(&["info"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("in use by pid {}", writer.id())) && err.contains("write"),
        "the error names the holder: {err}"
    );
    drop(stdin);
    assert!(writer.wait().unwrap().success());
    let back = fx.ms_ok(&["cat", "disk0", "--length", "4096"]);
    assert!(back.as_bytes().iter().all(|&b| b == 7));
}

#[test]
fn detach_writes_a_pidfile_and_a_log_named_after_the_daemon() {
    let fx = Fixture::new("svc-detach", 8 * MIB, &[]);
    let d = serve_detached(&fx);
    let (pid, log, pidfile) = (d.pid, d.log, d.pidfile);
    assert!(
        log.ends_with(format!("mvsnap-serve-{pid}.log")),
        "{}",
        log.display()
    );
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap().trim(),
        pid.to_string()
    );
    // Info level by default: the log says it serves.
    let logged = log_when_ready(&log);
    assert!(logged.contains("ready nbd="), "log: {logged}");
    fx.snapshot("disk0", "bg", false, "");
    // SAFETY: kill(2) on the daemon's pid, which it wrote and which is alive.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!pidfile.exists(), "the pidfile goes with the daemon");
    assert!(fx.snapshot_names().contains(&"disk0@bg".to_string()));
}

/// An origin resized behind the store's back is not served; the daemon's log says which, why
/// and what to do, and `origin list` through the daemon says it is unavailable (a client only
/// sees "no such export").
#[test]
fn a_resized_origin_is_named_in_the_log_and_listed_unavailable() {
    let fx = Fixture::new("svc-resized", 8 * MIB, &[]);
    fx.snapshot("disk0", "s1", false, "");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&fx.origin)
        .unwrap();
    f.set_len(4 * MIB).unwrap();
    drop(f);
    let d = serve_detached(&fx);
    let logged = log_when_ready(&d.log);
    let want = format!(
        "WARN origin disk0: size changed from {} to {} bytes since it was bound: the origin \
         and its snapshots are not served; put its device back as it was bound ({}, {} bytes)",
        8 * MIB,
        4 * MIB,
        fx.origin.display(),
        8 * MIB
    );
    assert!(logged.contains(&want), "log: {logged}");
    let listed = fx.ms_ok(&["origin", "list", "-H", "-o", "id,state"]);
    assert_eq!(listed.trim_end(), "disk0\tunavailable");
    // SAFETY: kill(2) on the daemon's pid, which it printed and which is alive.
    assert_eq!(unsafe { libc::kill(d.pid as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::path::Path::new(&format!("/proc/{}", d.pid)).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What `serve --detach` printed: the daemon's pid, its log and its pidfile.
struct Detached {
    pid: u32,
    log: std::path::PathBuf,
    pidfile: std::path::PathBuf,
}

fn serve_detached(fx: &Fixture) -> Detached {
    let out = fx.ms_ok(&[
        "serve",
        "--detach",
        "--nbd-socket",
        fx.sock.to_str().unwrap(),
    ]);
    let field = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k:?} line in {out:?}"))
            .trim()
            .to_string()
    };
    Detached {
        pid: field("pid ").parse().unwrap(),
        log: field("log ").into(),
        pidfile: field("pidfile ").into(),
    }
}

/// The daemon's log once it says it is ready (it may write that a moment after `--detach`
/// returned: a fresh-clone CI saw an empty log once), or after 10 s.
fn log_when_ready(log: &std::path::Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut logged = std::fs::read_to_string(log).unwrap();
    while !logged.contains("ready nbd=") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        logged = std::fs::read_to_string(log).unwrap();
    }
    logged
}

#[test]
fn events_follow_and_the_hook_see_the_store_fill() {
    let dir = TestDir::new("svc-events");
    let store = dir.join("store.img");
    let origin = dir.join("disk0.img");
    let runtime = dir.join("run");
    std::fs::create_dir_all(&runtime).unwrap();
    std::fs::write(&origin, pattern_bytes(5, (48 * MIB) as usize)).unwrap();
    let ms = || {
        let mut c = Command::new(mvsnap_bin());
        c.env("MVSNAP_RUNTIME_DIR", &runtime)
            .env_remove("RUST_LOG")
            .env("MVSNAP_STORE", &store);
        c
    };
    run_ok(ms().args(["format", "--size", "24M"]));
    run_ok(ms().args(["origin", "add", origin.to_str().unwrap(), "--id", "disk0"]));
    let hook_log = dir.join("hook.log");
    let hook = format!(
        "printf '%s|%s\\n' \"$MVSNAP_EVENT_KIND\" \"$MVSNAP_EVENT_MESSAGE\" >> {}",
        hook_log.display()
    );
    let mut serve = ms();
    serve.args([
        "serve",
        "--nbd-socket",
        dir.join("nbd.sock").to_str().unwrap(),
        "--on-event",
        &hook,
    ]);
    let mut d = spawn_daemon(&mut serve, &dir.join("daemon.log"));
    // A follower from now on.
    let mut follower = ChildGuard::spawn(ms().args(["events", "--follow", "--json"]));
    let fout = follower.0.as_mut().unwrap().stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(fout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    run_ok(ms().args(["snapshot", "create", "disk0", "--tag", "old"]));
    // 40 MiB over a 24 MiB store: the snapshot cannot keep it all.
    let mut w = ms()
        .args(["write", "disk0", "--offset", "0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    w.stdin
        .take()
        .unwrap()
        .write_all(&pattern_bytes(6, (40 * MIB) as usize))
        .unwrap();
    let st = w.wait().unwrap();
    assert!(
        st.success(),
        "origin writes never fail for lack of COW space"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|l: &String| l.contains("snapshot-invalidated"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(_) => panic!("the follower saw no invalidation within 30 s: {seen:?}"),
        }
    }
    let ev: serde_json::Value = serde_json::from_str(
        seen.iter()
            .find(|l| l.contains("snapshot-invalidated"))
            .unwrap(),
    )
    .unwrap();
    assert!(
        ev["message"].as_str().unwrap().contains("disk0@old"),
        "{ev}"
    );
    assert!(ev["time"].as_u64().unwrap() > 1_700_000_000);
    // The same events listed afterwards, and given to the hook.
    let all = run_ok(ms().args(["events", "--json"]));
    assert!(
        all.contains("snapshot-invalidated") && all.contains("disk0@old"),
        "{all}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let h = std::fs::read_to_string(&hook_log).unwrap_or_default();
        if h.lines()
            .any(|l| l.starts_with("snapshot-invalidated|") && l.contains("disk0@old"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "the hook did not run: {h:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A clean stop; the follower ends with it.
    let mut c = d.0.take().unwrap();
    // SAFETY: kill(2) on our own unreaped child.
    assert_eq!(unsafe { libc::kill(c.id() as i32, libc::SIGTERM) }, 0);
    assert!(wait_timeout(&mut c, Duration::from_secs(60)).is_some_and(|st| st.success()));
    let mut f = follower.0.take().unwrap();
    assert!(
        wait_timeout(&mut f, Duration::from_secs(30)).is_some(),
        "the follower outlived the daemon"
    );
}

/// A daemon from a hand-made command line (the fixture's store is 512 MiB: too big to fill).
fn spawn_daemon(cmd: &mut Command, log: &std::path::Path) -> ChildGuard {
    let logf = std::fs::File::create(log).unwrap();
    let mut c = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(logf)
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(c.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.starts_with("ready "),
        "no readiness: {line:?} {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    ChildGuard(Some(c))
}

/// A supervisor may signal the daemon as soon as it can know its pid: from the pidfile on,
/// SIGTERM is a clean stop (exit 0), never a kill. The handler used to be installed after the
/// pidfile, the registry entry and the readiness line, so a prompt SIGTERM killed the daemon.
#[test]
fn sigterm_as_soon_as_the_pidfile_appears_is_a_clean_stop() {
    let fx = Fixture::new("svc-early-term", 8 * MIB, &[]);
    for round in 0..5 {
        let pidfile = fx.dir.join(&format!("early-{round}.pid"));
        let mut child = fx
            .mvsnap()
            .args(["serve", "--pidfile"])
            .arg(&pidfile)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let pid = loop {
            if let Some(pid) = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|t| t.trim().parse::<i32>().ok())
            {
                break pid;
            }
            assert!(Instant::now() < deadline, "no pidfile within 60 s");
            std::thread::sleep(Duration::from_micros(200));
        };
        assert_eq!(pid as u32, child.id(), "the pidfile names the daemon");
        // SAFETY: kill(2) on our own child, which has not been waited for.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let Some(st) = wait_timeout(&mut child, Duration::from_secs(60)) else {
            let _ = child.kill();
            panic!("round {round}: the daemon did not stop within 60 s of SIGTERM");
        };
        assert!(
            st.success(),
            "round {round}: SIGTERM right after the pidfile appeared: {st}"
        );
        assert!(
            !pidfile.exists(),
            "round {round}: the pidfile goes with the daemon"
        );
    }
    fx.assert_check_clean("after the early stops");
}
