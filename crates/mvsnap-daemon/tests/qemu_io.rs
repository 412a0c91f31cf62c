//! qemu-io against the daemon: byte patterns written across chunk and block boundaries and
//! unaligned, read back; snapshots taken between writes keep reading the old patterns while the
//! origin reads the new ones; a writable snapshot diverges by its own writes only.
//!
//! The expected content of every volume is a model (a byte vector per volume) to which the
//! test applies the same writes. All of it is checked: qemu-io `read -P` over every run of
//! equal bytes of the model (so the whole export, through NBD), and `mvsnap cat` (through the
//! control socket) compared by SHA-256.

mod common;

use common::*;

const SIZE: u64 = 8 * MIB;
const INITIAL: u8 = 0xee;

/// Maximal runs of equal bytes: (offset, length, byte).
fn runs(model: &[u8]) -> Vec<(u64, u64, u8)> {
    let mut out: Vec<(u64, u64, u8)> = Vec::new();
    for (i, &b) in model.iter().enumerate() {
        match out.last_mut() {
            Some(r) if r.2 == b => r.1 += 1,
            _ => out.push((i as u64, 1, b)),
        }
    }
    out
}

/// Read the whole export with qemu-io `read -P` run by run, and with `mvsnap cat`.
fn verify(fx: &Fixture, qemu_io: &std::path::Path, export: &str, read_only: bool, model: &[u8]) {
    let cmds: Vec<String> = runs(model)
        .into_iter()
        .map(|(off, len, b)| format!("read -P {b:#04x} {off} {len}"))
        .collect();
    assert!(cmds.len() < 200, "the model has too many runs for qemu-io");
    let out = fx.qemu_io(qemu_io, export, read_only, &cmds);
    assert_eq!(
        out.matches("read ").count(),
        cmds.len(),
        "every read of {export} ran: {out}"
    );
    let cat = fx.mvsnap().arg("cat").arg(export).output().unwrap();
    assert!(cat.status.success(), "mvsnap cat {export}: {}", text(&cat));
    assert_eq!(
        sha256(&cat.stdout),
        sha256(model),
        "mvsnap cat {export} vs the model: {:?}",
        first_diff(&cat.stdout, model)
    );
}

/// Apply `write -P` commands to a model and return them as qemu-io commands.
fn writes(model: &mut [u8], w: &[(u64, u64, u8)]) -> Vec<String> {
    w.iter()
        .map(|&(off, len, b)| {
            fill(model, off, len, b);
            format!("write -P {b:#04x} {off} {len}")
        })
        .collect()
}

#[test]
fn sha256_known_vectors() {
    assert_eq!(
        sha256(b""),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        sha256(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(
        sha256(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
    );
    // Streaming in odd pieces gives the same digest as one call.
    let data = pattern_bytes(7, 100_000);
    let mut h = Sha256::default();
    for c in data.chunks(999) {
        h.update(c);
    }
    assert_eq!(h.hex(), sha256(&data));
    // And the same as the system's sha256sum, when it exists.
    if let Some(tool) = find_tool("sha256sum") {
        let d = TestDir::new("sha");
        let p = d.join("x");
        std::fs::write(&p, &data).unwrap();
        let out = run_ok(std::process::Command::new(tool).arg(&p));
        assert!(out.starts_with(&sha256(&data)), "{out}");
    }
}

#[test]
fn patterns_across_chunks_and_snapshots() {
    let [qemu_io] = need!("qemu-io");
    let mut origin = vec![INITIAL; SIZE as usize];
    let fx = Fixture::new("qio", SIZE, &origin);
    let _d = fx.start();

    // Before any snapshot: aligned, unaligned, across 64 KiB chunks and 4 KiB blocks, and the
    // very end of the export.
    let a = writes(
        &mut origin,
        &[
            (0, 192 * KIB, 0x11),
            (65000, 3000, 0x5a),
            (128 * KIB - 100, 200, 0x33),
            (4095, 2, 0x44),
            (MIB + 12345, 200_000, 0x66),
            (SIZE - 1000, 1000, 0x77),
        ],
    );
    let mut cmds = a.clone();
    // Read each write back in the same session, right away (not the first: the next three
    // overwrite parts of it).
    cmds.extend(a[1..].iter().map(|w| w.replacen("write -P", "read -P", 1)));
    fx.qemu_io(&qemu_io, "disk0", false, &cmds);
    verify(&fx, &qemu_io, "disk0", false, &origin);

    // s1; then overwrite the same places (partial blocks: the engine must preserve the whole
    // old block, not only the bytes written), plus many concurrent writes into one chunk.
    fx.snapshot("disk0", "s1", false, "");
    let s1 = origin.clone();
    let mut cmds = writes(
        &mut origin,
        &[
            (65000, 3000, 0xa5),
            (60000, 10000, 0xb6),
            (128 * KIB - 100, 200, 0xc7),
            (3 * MIB, 64 * KIB, 0xd8),
            (SIZE - 1, 1, 0xe9),
        ],
    );
    for i in 0..16u64 {
        let off = 5 * MIB + i * 4 * KIB + 7;
        fill(&mut origin, off, 3000, 0x20 + i as u8);
        cmds.push(format!("aio_write -P {:#04x} {off} 3000", 0x20 + i));
    }
    cmds.push("aio_flush".into());
    // Write zeroes across a chunk boundary.
    fill(&mut origin, 6 * MIB - 5000, 10_000, 0);
    cmds.push(format!("write -z {} 10000", 6 * MIB - 5000));
    // A discard: whatever the origin reads there afterwards, the snapshot keeps its data; the
    // range is then rewritten so the origin's model stays exact.
    cmds.push(format!("discard {} {}", 7 * MIB, 128 * KIB));
    fx.qemu_io(&qemu_io, "disk0", false, &cmds);
    verify(&fx, &qemu_io, "disk0@s1", true, &s1);
    let c = writes(&mut origin, &[(7 * MIB, 128 * KIB, 0x99)]);
    fx.qemu_io(&qemu_io, "disk0", false, &c);
    verify(&fx, &qemu_io, "disk0", false, &origin);
    verify(&fx, &qemu_io, "disk0@s1", true, &s1);

    // s2 of the origin, and a writable child of s1; then the origin and the child diverge.
    fx.snapshot("disk0", "s2", false, "");
    let s2 = origin.clone();
    fx.snapshot("disk0@s1", "w1", true, "a writable child of s1");
    let mut w1 = s1.clone();
    let c = writes(
        &mut origin,
        &[
            (65000, 3000, 0x01),
            (0, 8 * KIB, 0x02),
            (4 * MIB - 10, 20, 0x03),
        ],
    );
    fx.qemu_io(&qemu_io, "disk0", false, &c);
    let c = writes(
        &mut w1,
        &[
            (65000, 3000, 0xf1),
            (100, 100, 0xf2),
            (2 * MIB - 1, 2, 0xf3),
        ],
    );
    fx.qemu_io(&qemu_io, "disk0@w1", false, &c);

    verify(&fx, &qemu_io, "disk0", false, &origin);
    verify(&fx, &qemu_io, "disk0@s1", true, &s1);
    verify(&fx, &qemu_io, "disk0@s2", true, &s2);
    verify(&fx, &qemu_io, "disk0@w1", false, &w1);
    fx.assert_check_clean("after the qemu-io writes");
}

#[test]
fn read_only_snapshot_refuses_qemu_io_writes() {
    let [qemu_io] = need!("qemu-io");
    let fx = Fixture::new("qro", SIZE, &vec![INITIAL; SIZE as usize]);
    let _d = fx.start();
    fx.snapshot("disk0", "ro", false, "");
    // qemu-io opens read-write by default: the read-only export is refused at open.
    let out = run(
        std::process::Command::new(&qemu_io)
            .args(["-f", "raw"])
            .arg(fx.uri("disk0@ro"))
            .args(["-c", "write -P 0x42 0 4096"]),
        TOOL_TIMEOUT,
    );
    assert!(!out.status.success(), "a write open of disk0@ro succeeded");
    let t = text(&out);
    assert!(
        t.contains("Permission denied") || t.contains("read-only") || t.contains("read only"),
        "{t}"
    );
    // Opened read-only, a write is refused by qemu itself; the data is unchanged.
    let out = run(
        std::process::Command::new(&qemu_io)
            .args(["-f", "raw", "-r"])
            .arg(fx.uri("disk0@ro"))
            .args(["-c", "write -P 0x42 0 4096"]),
        TOOL_TIMEOUT,
    );
    assert!(!out.status.success());
    fx.qemu_io(
        &qemu_io,
        "disk0@ro",
        true,
        &[format!("read -P {INITIAL:#04x} 0 {SIZE}")],
    );
}
