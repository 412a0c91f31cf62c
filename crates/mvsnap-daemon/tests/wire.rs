//! Bad input on the wire against the real daemon (engine behind the NBD server), with a raw
//! Unix-socket client: wrong magic, unknown options and commands, oversize lengths, ranges past
//! the end, writes to a read-only snapshot, clients that vanish mid-request. Each case expects
//! the right NBD error (or a clean close where framing is lost), checks the data did not
//! change, and then proves the daemon still serves: a qemu-io read of a known pattern and a
//! raw read on a fresh connection. At the end the daemon still stops cleanly (exit 0).

mod common;

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use common::*;
use mvsnap_nbd::proto;

const SIZE: u64 = 64 * MIB;
/// The origin's first MiB holds this byte, the rest is zero.
const FILL: u8 = 0x5c;

fn setup(name: &str) -> (Fixture, Daemon) {
    let fx = Fixture::new(name, SIZE, &vec![FILL; MIB as usize]);
    let d = fx.start();
    fx.snapshot("disk0", "ro", false, "");
    (fx, d)
}

/// The daemon is alive and serves another client correctly.
#[track_caller]
fn assert_serves(fx: &Fixture, d: &mut Daemon, qemu_io: &Path, after: &str) {
    assert!(d.alive(), "the daemon died after {after}: {}", d.log_text());
    fx.qemu_io(
        qemu_io,
        "disk0",
        true,
        &[
            format!("read -P {FILL:#04x} 0 {MIB}"),
            format!("read -P 0 {MIB} 4096"),
        ],
    );
    let mut c = RawClient::connect(&fx.sock);
    let (size, _) = c.handshake("disk0@ro", false, false);
    assert_eq!(size, SIZE);
    assert_eq!(
        c.read_simple(1, 4096, 4096).expect("read"),
        vec![FILL; 4096],
        "after {after}"
    );
    c.disconnect();
}

/// Simple-reply client on `export`, after handshake.
fn client(fx: &Fixture, export: &str) -> (RawClient, u16) {
    let mut c = RawClient::connect(&fx.sock);
    let (size, flags) = c.handshake(export, false, false);
    assert_eq!(size, SIZE);
    (c, flags)
}

fn daemon_rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn handshake_garbage() {
    let [qemu_io] = need!("qemu-io");
    let (fx, mut d) = setup("wh");

    // Wrong option magic: framing is lost, the server closes.
    let mut c = RawClient::connect(&fx.sock);
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES);
    let _ = c.try_send(b"NOTNBDOPT\x00\x00\x00\x07\x00\x00\x00\x00");
    assert!(
        c.closed_within(Duration::from_secs(10)),
        "open after a bad option magic"
    );
    assert_serves(&fx, &mut d, &qemu_io, "a bad option magic");

    // Not NBD at all: an HTTP request instead of client flags.
    let mut c = RawClient::connect(&fx.sock);
    let _ = c.recv(proto::HANDSHAKE_LEN);
    let _ = c.try_send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(c.closed_within(Duration::from_secs(10)));
    assert_serves(&fx, &mut d, &qemu_io, "an HTTP request");

    // Unknown client flags: close.
    let mut c = RawClient::connect(&fx.sock);
    c.greet(0xffff_ffff);
    assert!(c.closed_within(Duration::from_secs(10)));

    // An unknown option: NBD_REP_ERR_UNSUP, and the connection goes on: LIST, then GO, READ.
    let mut c = RawClient::connect(&fx.sock);
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES);
    let r = c.option(0x4242, b"hello");
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, proto::REP_ERR_UNSUP, "unknown option: {r:?}");
    let r = c.option(proto::OPT_STARTTLS, &[]);
    assert!(
        r.last().unwrap().0 & (1 << 31) != 0,
        "STARTTLS must be refused (no TLS): {r:?}"
    );
    let r = c.option(proto::OPT_LIST, &[]);
    let names: Vec<String> = r
        .iter()
        .filter(|x| x.0 == proto::REP_SERVER)
        .map(|x| {
            let n = u32::from_be_bytes(x.1[0..4].try_into().unwrap()) as usize;
            String::from_utf8_lossy(&x.1[4..4 + n]).into_owned()
        })
        .collect();
    assert_eq!(r.last().unwrap().0, proto::REP_ACK);
    assert!(
        names.contains(&"disk0".to_string()) && names.contains(&"disk0@ro".to_string()),
        "{names:?}"
    );
    // A malformed known option: NBD_REP_ERR_INVALID, connection kept.
    let r = c.option(proto::OPT_GO, &[0, 0, 0, 200, b'x']);
    assert_eq!(r.last().unwrap().0, proto::REP_ERR_INVALID, "{r:?}");
    // GO of an export that does not exist: an error, connection kept.
    assert!(c.go("disk0@nope").is_err());
    let (size, _) = c.go("disk0").expect("GO after errors");
    assert_eq!(size, SIZE);
    assert_eq!(c.read_simple(7, 0, 512).unwrap(), vec![FILL; 512]);
    c.disconnect();

    // An option claiming 4 GiB of data that never comes: nothing that size is allocated,
    // and the connection is closed or answered, not held forever once we hang up.
    let before = daemon_rss_kib(d.pid);
    let mut c = RawClient::connect(&fx.sock);
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES);
    c.send(&proto::encode_option_header(proto::OPT_GO, 0xffff_fff0));
    // The server may refuse and close at once: then this fails, and that is fine.
    let _ = c.try_send(&[0u8; 1000]);
    std::thread::sleep(Duration::from_millis(300));
    let during = daemon_rss_kib(d.pid);
    assert!(
        during < before + 256 * 1024,
        "RSS grew from {before} to {during} KiB on a 4 GiB option length"
    );
    let _ = c.s.shutdown(std::net::Shutdown::Write);
    assert!(c.closed_within(Duration::from_secs(10)));
    assert_serves(&fx, &mut d, &qemu_io, "an oversize option length");

    // Vanishing mid-handshake: after the greeting, half an option header, then gone.
    for cut in [0usize, 5, 16 + 3] {
        let mut c = RawClient::connect(&fx.sock);
        c.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES);
        let mut b = proto::encode_option_header(proto::OPT_GO, 20).to_vec();
        b.extend_from_slice(&[0, 0, 0, 5]);
        c.send(&b[..cut.min(b.len())]);
        drop(c);
    }
    assert_serves(&fx, &mut d, &qemu_io, "clients vanishing mid-handshake");
    assert!(
        d.terminate().success(),
        "clean exit after handshake garbage"
    );
}

#[test]
fn transmission_errors() {
    let [qemu_io] = need!("qemu-io");
    let (fx, mut d) = setup("wt");
    let (mut c, flags) = client(&fx, "disk0");
    assert_eq!(flags & proto::FLAG_READ_ONLY, 0, "origin is read-write");

    // Offsets and lengths past the end: EINVAL, ENOSPC for writes (the spec's SHOULD), and the
    // connection goes on.
    for (off, len) in [
        (SIZE, 1u32),
        (SIZE - 512, 1024),
        (u64::MAX - 10, 100),
        (SIZE + MIB, 4096),
    ] {
        assert_eq!(
            c.read_simple(1, off, len),
            Err(proto::EINVAL),
            "READ {off}+{len}"
        );
        c.write_req(2, off, &vec![0xee; len as usize]);
        assert_eq!(c.simple(), (2, proto::ENOSPC), "WRITE {off}+{len}");
        c.request(proto::CMD_TRIM, 0, 3, off, len);
        assert_eq!(c.simple(), (3, proto::EINVAL), "TRIM {off}+{len}");
        c.request(proto::CMD_WRITE_ZEROES, 0, 4, off, len);
        assert_eq!(c.simple(), (4, proto::ENOSPC), "WRITE_ZEROES {off}+{len}");
    }
    // The last bytes are fine.
    assert_eq!(c.read_simple(5, SIZE - 1, 1).unwrap(), vec![0]);

    // Oversize: longer than the maximum block size (32 MiB). A READ gets EINVAL; a WRITE
    // gets EINVAL after its payload is read and dropped, so framing holds.
    assert_eq!(c.read_simple(6, 0, 40 << 20), Err(proto::EINVAL));
    c.write_req(7, 0, &vec![0xee; 40 << 20]);
    assert_eq!(c.simple(), (7, proto::EINVAL), "40 MiB WRITE");
    assert_eq!(
        c.read_simple(8, 0, 4096).unwrap(),
        vec![FILL; 4096],
        "unchanged"
    );

    // Unknown command and unknown flags: EINVAL.
    c.request(0x42, 0, 9, 0, 512);
    assert_eq!(c.simple(), (9, proto::EINVAL), "unknown command");
    c.request(proto::CMD_READ, 0x8000, 10, 0, 512);
    assert_eq!(c.simple().1, proto::EINVAL, "unknown flag");
    // BLOCK_STATUS without a negotiated context: EINVAL.
    c.request(proto::CMD_BLOCK_STATUS, 0, 11, 0, 4096);
    assert_eq!(c.simple(), (11, proto::EINVAL));

    // Many requests in flight, replies possibly out of order: every handle answered once,
    // reads see the writes ordered before them by a FLUSH.
    let mut expect = std::collections::HashSet::new();
    for i in 0..32u64 {
        let off = 2 * MIB + i * 64 * KIB + 100;
        c.write_req(100 + i, off, &vec![i as u8 + 1; 5000]);
        expect.insert(100 + i);
    }
    for _ in 0..32 {
        let (h, e) = c.simple();
        assert_eq!(e, 0, "write {h}");
        assert!(expect.remove(&h), "unexpected or repeated handle {h}");
    }
    c.request(proto::CMD_FLUSH, 0, 99, 0, 0);
    assert_eq!(c.simple(), (99, 0));
    for i in 0..32u64 {
        c.request(
            proto::CMD_READ,
            0,
            200 + i,
            2 * MIB + i * 64 * KIB + 100,
            5000,
        );
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..32 {
        let (h, e) = c.simple();
        assert_eq!(e, 0);
        let data = c.recv(5000);
        let i = h - 200;
        assert!(i < 32 && seen.insert(h), "bad or repeated handle {h}");
        assert_eq!(data, vec![i as u8 + 1; 5000], "read {h}");
    }
    c.disconnect();

    // A bad request magic: framing is lost, close.
    let (mut c, _) = client(&fx, "disk0");
    c.send(&[0xde; proto::REQUEST_LEN]);
    assert!(c.closed_within(Duration::from_secs(10)));
    assert_serves(&fx, &mut d, &qemu_io, "transmission errors");
    assert!(
        d.terminate().success(),
        "clean exit after transmission errors"
    );
}

#[test]
fn read_only_snapshot_refuses_writes_with_eperm() {
    let [qemu_io] = need!("qemu-io");
    let (fx, mut d) = setup("wro");
    let (mut c, flags) = client(&fx, "disk0@ro");
    assert_ne!(
        flags & proto::FLAG_READ_ONLY,
        0,
        "snapshot export flagged read-only"
    );
    assert_eq!(
        flags & proto::FLAG_SEND_TRIM,
        0,
        "no TRIM on a read-only export"
    );

    c.write_req(1, 0, &vec![0xee; 4096]);
    assert_eq!(c.simple(), (1, proto::EPERM), "WRITE");
    c.write_req(2, 100, &vec![0xee; 3 * MIB as usize]);
    assert_eq!(
        c.simple(),
        (2, proto::EPERM),
        "a 3 MiB WRITE (payload drained)"
    );
    c.request(proto::CMD_TRIM, 0, 3, 0, 4096);
    assert_eq!(c.simple(), (3, proto::EPERM), "TRIM");
    c.request(proto::CMD_WRITE_ZEROES, 0, 4, 0, 4096);
    assert_eq!(c.simple(), (4, proto::EPERM), "WRITE_ZEROES");
    c.request(proto::CMD_WRITE, proto::CMD_FLAG_FUA, 5, 0, 0);
    assert_eq!(c.simple(), (5, proto::EPERM), "empty FUA WRITE");
    // FLUSH is harmless on a read-only export.
    c.request(proto::CMD_FLUSH, 0, 6, 0, 0);
    assert_eq!(c.simple(), (6, 0));
    assert_eq!(
        c.read_simple(7, 0, MIB as u32).unwrap(),
        vec![FILL; MIB as usize],
        "the snapshot did not change"
    );
    c.disconnect();
    assert_serves(&fx, &mut d, &qemu_io, "writes to a read-only export");

    // Through the control socket too: the daemon refuses, the data stays.
    let mut child = fx
        .mvsnap()
        .args(["write", "disk0@ro", "--offset", "0"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let _ = child.stdin.take().unwrap().write_all(&[0xee; 4096]);
    let out = wait_output(&mut child, TOOL_TIMEOUT, "mvsnap write");
    assert!(
        !out.status.success(),
        "mvsnap write to a read-only snapshot succeeded: {}",
        text(&out)
    );
    let cat = fx
        .mvsnap()
        .args(["cat", "disk0@ro", "--length", "4096"])
        .output()
        .unwrap();
    assert_eq!(cat.stdout, vec![FILL; 4096]);
}

#[test]
fn clients_vanishing_mid_request() {
    let [qemu_io] = need!("qemu-io");
    let (fx, mut d) = setup("wv");

    // A WRITE whose payload stops after 300 KiB of 1 MiB: nothing of it may land.
    let (mut c, _) = client(&fx, "disk0");
    let mut b = proto::encode_request(&proto::Request {
        flags: 0,
        command: proto::CMD_WRITE,
        handle: 1,
        offset: 0,
        length: MIB as u32,
    })
    .to_vec();
    b.extend_from_slice(&vec![0xee; 300 * KIB as usize]);
    c.send(&b);
    drop(c);

    // A header announcing 4 GiB - 1 of payload, some bytes, gone.
    let (mut c, _) = client(&fx, "disk0");
    let mut b = proto::encode_request(&proto::Request {
        flags: 0,
        command: proto::CMD_WRITE,
        handle: 2,
        offset: 0,
        length: u32::MAX,
    })
    .to_vec();
    b.extend_from_slice(&[0xee; 1000]);
    let _ = c.try_send(&b);
    drop(c);

    // 32 reads of 1 MiB in flight, then gone without reading a reply.
    let (mut c, _) = client(&fx, "disk0");
    for i in 0..32 {
        c.request(proto::CMD_READ, 0, i, 0, MIB as u32);
    }
    drop(c);

    // Half a request header, then gone.
    let (mut c, _) = client(&fx, "disk0");
    c.send(
        &proto::encode_request(&proto::Request {
            flags: 0,
            command: proto::CMD_READ,
            handle: 3,
            offset: 0,
            length: 512,
        })[..13],
    );
    drop(c);

    // Connect and leave at once, many times.
    for _ in 0..50 {
        drop(std::os::unix::net::UnixStream::connect(&fx.sock).unwrap());
    }
    // A write of 16 MiB sent whole, then gone before the reply.
    let (mut c, _) = client(&fx, "disk0");
    c.write_req(4, 8 * MIB, &vec![0x77; 16 << 20]);
    let _ = c.s.flush();
    drop(c);

    std::thread::sleep(Duration::from_millis(200));
    assert_serves(&fx, &mut d, &qemu_io, "clients vanishing mid-request");
    // The partial writes did not land (the first MiB is still FILL). The last one may or
    // may not have: if it did, it did whole.
    let (mut c, _) = client(&fx, "disk0");
    assert_eq!(
        c.read_simple(1, 0, MIB as u32).unwrap(),
        vec![FILL; MIB as usize],
        "a write whose payload never fully arrived changed the origin"
    );
    // The 16 MiB write arrived whole: it lands whole (or not at all), soon.
    let mut h = 10;
    let start = std::time::Instant::now();
    loop {
        let tail = c.read_simple(h, 8 * MIB, 16 << 20).unwrap();
        h += 1;
        if tail.iter().all(|&x| x == 0) || tail.iter().all(|&x| x == 0x77) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "a 16 MiB write is still half there after 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    c.disconnect();
    fx.assert_check_clean("after vanishing clients");
    assert!(
        d.terminate().success(),
        "clean exit after vanishing clients"
    );
}

/// Issue 7 item 1: FAST_ZERO answered honestly. On an origin file it is done (the engine keeps
/// what the snapshot needs, then punches a hole): the range reads as zeros and the snapshot
/// keeps its bytes. On a writable snapshot it is done too (zero entries, no data). With
/// NO_HOLE (written zeros, not fast) ENOTSUP and nothing changes.
#[test]
fn fast_zero_is_done_where_it_is_fast_and_refused_where_it_is_not() {
    let (fx, _d) = setup("fastzero");
    fx.snapshot("disk0", "w", true, "");
    let (mut c, flags) = client(&fx, "disk0");
    assert_ne!(flags & proto::FLAG_SEND_FAST_ZERO, 0);
    c.request(
        proto::CMD_WRITE_ZEROES,
        proto::CMD_FLAG_FAST_ZERO,
        1,
        0,
        65536,
    );
    assert_eq!(c.simple(), (1, 0), "FAST_ZERO on the origin");
    assert_eq!(c.read_simple(2, 0, 65536).unwrap(), vec![0u8; 65536]);
    c.request(
        proto::CMD_WRITE_ZEROES,
        proto::CMD_FLAG_FAST_ZERO | proto::CMD_FLAG_NO_HOLE,
        3,
        65536,
        4096,
    );
    assert_eq!(c.simple(), (3, proto::ENOTSUP), "FAST_ZERO with NO_HOLE");
    assert_eq!(c.read_simple(4, 65536, 4096).unwrap(), vec![FILL; 4096]);
    let (mut ro, _) = client(&fx, "disk0@ro");
    assert_eq!(ro.read_simple(1, 0, 65536).unwrap(), vec![FILL; 65536]);
    let (mut w, _) = client(&fx, "disk0@w");
    w.request(
        proto::CMD_WRITE_ZEROES,
        proto::CMD_FLAG_FAST_ZERO,
        1,
        0,
        4096,
    );
    // A writable snapshot records zero blocks: fast too (format v2).
    assert_eq!(w.simple(), (1, 0), "FAST_ZERO on a writable snapshot");
    assert_eq!(w.read_simple(2, 0, 4096).unwrap(), vec![0u8; 4096]);
    assert_eq!(ro.read_simple(3, 0, 4096).unwrap(), vec![FILL; 4096]);
}
