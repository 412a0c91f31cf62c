//! Interoperability: the server driven by real NBD clients nobody here wrote (qemu-io,
//! qemu-img, nbdinfo, nbdcopy, fio). A missing tool skips its test with a "skipped: ... not
//! found" line, or fails it when `MVSNAP_REQUIRE_TOOLS=1`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use mvsnap_nbd::memory::MemExport;

fn server() -> TestServer {
    TestServer::start(vec![
        ("disk", "the main disk", MemExport::new(64 * MIB)),
        (
            "disk@snap1",
            "snapshot snap1 of disk",
            MemExport::new_read_only(8 * MIB),
        ),
    ])
}

/// Run qemu-io commands on an export; returns the output. Each `-c` is one command.
fn qemu_io(
    bin: &std::path::Path,
    uri: &str,
    extra: &[&str],
    cmds: &[&str],
) -> std::process::Output {
    let mut c = Command::new(bin);
    c.args(extra).args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    run(&mut c, Duration::from_secs(120))
}

fn ok_and_verified(out: &std::process::Output) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "qemu-io failed:\n{text}");
    assert!(!text.contains("verification failed"), "{text}");
    assert!(!text.to_lowercase().contains("error"), "{text}");
}

#[test]
fn qemu_io_patterns_aligned_and_unaligned() {
    let [qemu_io_bin] = need!("qemu-io");
    let t = server();
    let uri = t.uri("disk");
    let out = qemu_io(
        &qemu_io_bin,
        &uri,
        &[],
        &[
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            // Unaligned: partial sectors at both ends.
            "write -P 0xcd 1000 3000",
            "read -P 0xcd 1000 3000",
            "read -P 0xab 0 1000",
            "read -P 0xab 4000 61536",
            // Straddling a 4 KiB block boundary, odd length.
            "write -P 0x5e 1048570 13",
            "read -P 0x5e 1048570 13",
            "write -z 2M 1M",
            "read -P 0 2M 1M",
            "aio_write -P 0x71 8M 256k",
            "aio_write -P 0x72 9M 256k",
            "aio_flush",
            "read -P 0x71 8M 256k",
            "read -P 0x72 9M 256k",
            "discard 8M 128k",
            "flush",
        ],
    );
    ok_and_verified(&out);
    // A wrong pattern must be caught (the check above is not vacuous).
    let bad = qemu_io(&qemu_io_bin, &uri, &[], &["read -P 0xab 1000 10"]);
    assert!(!bad.status.success());

    let c = t.export("disk").contents();
    assert!(c[..1000].iter().all(|&b| b == 0xab));
    assert!(c[1000..4000].iter().all(|&b| b == 0xcd));
    assert!(c[4000..65536].iter().all(|&b| b == 0xab));
    assert!(c[1048570..1048583].iter().all(|&b| b == 0x5e));
    assert!(c[(9 * MIB) as usize..(9 * MIB + 256 * KIB) as usize]
        .iter()
        .all(|&b| b == 0x72));
    // A second connection sees the first one's data.
    ok_and_verified(&qemu_io(
        &qemu_io_bin,
        &uri,
        &["-r"],
        &["read -P 0xcd 1000 3000"],
    ));
}

#[test]
fn qemu_io_over_tcp() {
    let [qemu_io_bin] = need!("qemu-io");
    let t = server();
    let uri = t.tcp_uri("disk");
    ok_and_verified(&qemu_io(
        &qemu_io_bin,
        &uri,
        &[],
        &[
            "write -P 0x3a 1M 1M",
            "read -P 0x3a 1M 1M",
            "read -P 0 0 1M",
        ],
    ));
    assert!(t.export("disk").contents()[MIB as usize..2 * MIB as usize]
        .iter()
        .all(|&b| b == 0x3a));
}

#[test]
fn qemu_io_read_only_export_refuses_writes() {
    let [qemu_io_bin] = need!("qemu-io");
    let t = server();
    let e = t.export("disk@snap1");
    e.fill(0, &[0x42; 65536]);
    let uri = t.uri("disk@snap1");
    let out = qemu_io(&qemu_io_bin, &uri, &[], &["write -P 0x99 0 4k"]);
    assert!(
        !out.status.success(),
        "a write to a read-only export must fail"
    );
    let out = qemu_io(&qemu_io_bin, &uri, &["-r"], &["write -P 0x99 0 4k"]);
    assert!(!out.status.success() || String::from_utf8_lossy(&out.stderr).contains("ermission"));
    ok_and_verified(&qemu_io(
        &qemu_io_bin,
        &uri,
        &["-r"],
        &["read -P 0x42 0 64k"],
    ));
    assert!(
        e.contents()[..65536].iter().all(|&b| b == 0x42),
        "contents unchanged"
    );
}

#[test]
fn qemu_img_convert_and_compare() {
    let [qemu_img] = need!("qemu-img");
    let t = server();
    // A source with data, zeroes and an unaligned tail of data.
    let mut src = vec![0u8; 64 * MIB as usize];
    src[..(5 * MIB) as usize].copy_from_slice(&pattern_bytes(7, (5 * MIB) as usize));
    src[(40 * MIB) as usize + 123..(41 * MIB) as usize].fill(0x3c);
    let src_path = t.path("src.img");
    std::fs::write(&src_path, &src).unwrap();
    // The target export starts with junk, so zero regions must really be written.
    t.export("disk").fill(20 * MIB, &[0xff; 1 << 20]);
    let uri = t.uri("disk");
    run_ok(
        Command::new(&qemu_img)
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src_path)
            .arg(&uri),
    );
    assert_eq!(sha256(&t.export("disk").contents()), sha256(&src));
    let out = run_ok(
        Command::new(&qemu_img)
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src_path)
            .arg(&uri),
    );
    assert!(out.contains("Images are identical"), "{out}");
    // And back out to a file.
    let back = t.path("back.img");
    run_ok(
        Command::new(&qemu_img)
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&uri)
            .arg(&back),
    );
    assert_eq!(sha256(&std::fs::read(&back).unwrap()), sha256(&src));
    // A difference is noticed.
    t.export("disk").fill(MIB, &[0]);
    let out = run(
        Command::new(&qemu_img)
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src_path)
            .arg(&uri),
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn nbdinfo_list_shows_names_and_descriptions() {
    let [nbdinfo] = need!("nbdinfo");
    let t = server();
    let out = run_ok(
        Command::new(&nbdinfo)
            .arg("--list")
            .arg(format!("nbd+unix://?socket={}", t.sock.display())),
    );
    for s in [
        "export=\"disk\"",
        "the main disk",
        "export=\"disk@snap1\"",
        "snapshot snap1 of disk",
    ] {
        assert!(out.contains(s), "missing {s:?} in:\n{out}");
    }
    let out = run_ok(
        Command::new(&nbdinfo)
            .arg("--json")
            .arg(t.uri("disk@snap1")),
    );
    assert!(out.contains("\"is_read_only\": true"), "{out}");
    assert!(out.contains("\"export-size\": 8388608"), "{out}");
    // Flags tell the truth: --can/--is exit 0 for true, 2 for false.
    let check = |args: &[&str], uri: String, want: i32| {
        let o = run(
            Command::new(&nbdinfo).args(args).arg(uri),
            Duration::from_secs(30),
        );
        assert_eq!(o.status.code(), Some(want), "{args:?}");
    };
    check(&["--is", "read-only"], t.uri("disk@snap1"), 0);
    check(&["--is", "read-only"], t.uri("disk"), 2);
    check(&["--can", "trim"], t.uri("disk"), 0);
    check(&["--can", "trim"], t.uri("disk@snap1"), 2);
    check(&["--can", "zero"], t.uri("disk"), 0);
    check(&["--can", "flush"], t.uri("disk"), 0);
    check(&["--can", "fua"], t.uri("disk"), 0);
    check(&["--can", "multi-conn"], t.uri("disk"), 0);
    check(&["--can", "cache"], t.uri("disk"), 0);
}

/// Parse `nbdinfo --map` lines: (offset, length, type).
fn parse_map(out: &str) -> Vec<(u64, u64, u32)> {
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 3 {
                return None;
            }
            Some((f[0].parse().ok()?, f[1].parse().ok()?, f[2].parse().ok()?))
        })
        .collect()
}

#[test]
fn nbdinfo_map_reports_holes_and_data() {
    let [nbdinfo] = need!("nbdinfo");
    let t = server();
    let e = t.export("disk");
    e.fill(0, &[1; 8192]);
    e.fill(MIB + 100, &[2; 10]); // touches one block: [1M, 1M+4K)
    e.fill(63 * MIB, &[3; MIB as usize]);
    let out = run_ok(Command::new(&nbdinfo).arg("--map").arg(t.uri("disk")));
    assert_eq!(
        parse_map(&out),
        vec![
            (0, 8192, 0),
            (8192, MIB - 8192, 3),
            (MIB, 4096, 0),
            (MIB + 4096, 62 * MIB - 4096, 3),
            (63 * MIB, MIB, 0),
        ]
    );
    let out = run_ok(
        Command::new(&nbdinfo)
            .arg("--map")
            .arg("--totals")
            .arg(t.uri("disk")),
    );
    assert!(out.contains("data") && out.contains("hole,zero"), "{out}");
}

#[test]
fn nbdinfo_map_on_a_huge_sparse_export() {
    let [nbdinfo] = need!("nbdinfo");
    let t = TestServer::start(vec![("huge", "16 GiB sparse", MemExport::new(16 << 30))]);
    let e = t.export("huge");
    e.fill(0, &[1; 4096]);
    e.fill(10 << 30, &[1; 4096]);
    let out = run_ok(Command::new(&nbdinfo).arg("--map").arg(t.uri("huge")));
    assert_eq!(
        parse_map(&out),
        vec![
            (0, 4096, 0),
            (4096, (10 << 30) - 4096, 3),
            (10 << 30, 4096, 0),
            ((10 << 30) + 4096, (6 << 30) - 4096, 3),
        ]
    );
}

#[test]
fn nbdcopy_export_to_file_and_back() {
    let [nbdcopy] = need!("nbdcopy");
    let t = server();
    let e = t.export("disk");
    e.fill(123, &pattern_bytes(1, 3 * MIB as usize));
    e.fill(50 * MIB, &pattern_bytes(2, 777_777));
    let out_path = t.path("out.img");
    run_ok(Command::new(&nbdcopy).arg(t.uri("disk")).arg(&out_path));
    let copied = std::fs::read(&out_path).unwrap();
    assert_eq!(copied.len() as u64, 64 * MIB);
    assert_eq!(sha256(&copied), sha256(&e.contents()));

    // File to export, over several connections (the export allows multi-conn).
    let src = pattern_bytes(3, 64 * MIB as usize);
    let src_path = t.path("src.img");
    std::fs::write(&src_path, &src).unwrap();
    run_ok(
        Command::new(&nbdcopy)
            .args(["--connections=4", "--requests=16"])
            .arg(&src_path)
            .arg(t.uri("disk")),
    );
    assert_eq!(sha256(&e.contents()), sha256(&src));

    // Into a read-only export: refused, nothing changed.
    let ro = t.export("disk@snap1");
    let small = t.path("small.img");
    std::fs::write(&small, pattern_bytes(4, 8 * MIB as usize)).unwrap();
    let out = run(
        Command::new(&nbdcopy).arg(&small).arg(t.uri("disk@snap1")),
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    assert!(ro.allocated_blocks().is_empty());
}

#[test]
fn fio_random_writes_verified_with_several_jobs() {
    let [fio] = need!("fio");
    let t = server();
    let out = run_ok(
        Command::new(&fio)
            // fio leaves verify state files in its working directory.
            .current_dir(t.dir.path())
            .args([
                "--name=mvsnap-nbd",
                "--ioengine=nbd",
                "--rw=randwrite",
                "--bs=4k",
                "--size=12m",
                "--offset_increment=16m",
                "--numjobs=4",
                "--iodepth=16",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--group_reporting",
            ])
            .arg(format!("--uri={}", t.uri("disk"))),
    );
    assert!(out.contains("err= 0"), "{out}");
    assert!(!out.contains("verify:") || !out.contains("bad"), "{out}");
    // fio wrote each job's region: 4 × 12 MiB of 4 KiB blocks.
    let blocks = t.export("disk").allocated_blocks();
    assert_eq!(
        blocks.len(),
        4 * 3072,
        "every block of every job's region written once"
    );
}

#[test]
fn fio_mixed_random_io_with_unaligned_sizes() {
    let [fio] = need!("fio");
    let t = server();
    let out = run_ok(
        Command::new(&fio)
            // fio leaves verify state files in its working directory.
            .current_dir(t.dir.path())
            .args([
                "--name=mixed",
                "--ioengine=nbd",
                "--rw=randrw",
                "--bsrange=512-128k",
                "--size=32m",
                "--numjobs=2",
                "--offset_increment=32m",
                "--iodepth=32",
                "--io_size=64m",
                "--verify=md5",
                "--verify_fatal=1",
                "--group_reporting",
            ])
            .arg(format!("--uri={}", t.uri("disk"))),
    );
    assert!(out.contains("err= 0"), "{out}");
}

/// The `memserver` example, run as a separate process, answers nbdinfo. Cargo builds
/// examples for `cargo test`; if this run did not (a filtered `--test`), say so and return.
#[test]
fn memserver_example_serves_clients() {
    let [nbdinfo] = need!("nbdinfo");
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/memserver");
    if !bin.is_file() {
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "skipped: {} not built", bin.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("m.sock");
    let mut child = Command::new(&bin)
        .arg(&sock)
        .arg("16M")
        .args(["alpha", "beta:ro"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "memserver did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = run(
        Command::new(&nbdinfo)
            .arg("--list")
            .arg(format!("nbd+unix://?socket={}", sock.display())),
        Duration::from_secs(30),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // SIGTERM: a clean shutdown removes the socket.
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let status = child.wait().unwrap();
    assert!(out.status.success());
    assert!(
        text.contains("export=\"alpha\"") && text.contains("export=\"beta\""),
        "{text}"
    );
    assert!(text.contains("read-only"), "{text}");
    assert!(status.success(), "memserver exit: {status}");
    assert!(!sock.exists());
}
