//! libnbd's tools and qemu-img against the daemon: `nbdinfo --list` shows every export with
//! its description and flags, `nbdinfo --map` tells the truth (a range reported as zero reads
//! as zeros, and the holes of a sparse origin are reported), nbdcopy of every export equals
//! the model by SHA-256, and `qemu-img compare` finds equal exports equal and different ones
//! different at the right offset.

mod common;

use std::os::unix::fs::FileExt;
use std::process::Command;

use common::*;

const SIZE: u64 = 32 * MIB;

fn pattern_write(model: &mut [u8], cmds: &mut Vec<String>, off: u64, len: u64, b: u8) {
    fill(model, off, len, b);
    cmds.push(format!("write -P {b:#04x} {off} {len}"));
}

/// `nbdinfo --map --json`: (offset, length, type) extents.
fn map(nbdinfo: &std::path::Path, uri: &str) -> Vec<(u64, u64, u64)> {
    let out = run_ok(Command::new(nbdinfo).args(["--map", "--json"]).arg(uri));
    let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo --map --json");
    v.as_array()
        .expect("an array of extents")
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The map covers the export exactly, and every extent with the zero bit (2) reads as zeros.
/// Returns how many bytes are reported as zero.
fn assert_map_truthful(what: &str, ext: &[(u64, u64, u64)], model: &[u8]) -> u64 {
    let mut pos = 0;
    let mut zero = 0;
    for &(off, len, ty) in ext {
        assert_eq!(off, pos, "{what}: extents are not contiguous: {ext:?}");
        assert!(len > 0, "{what}: empty extent");
        if ty & 2 != 0 {
            let r = &model[off as usize..(off + len) as usize];
            if let Some(i) = r.iter().position(|&b| b != 0) {
                panic!(
                    "{what}: [{off}, +{len}) is reported as zero (type {ty}) but byte {} is {:#04x}",
                    off + i as u64,
                    r[i]
                );
            }
            zero += len;
        }
        pos += len;
    }
    assert_eq!(
        pos,
        model.len() as u64,
        "{what}: the map does not cover the export"
    );
    zero
}

#[test]
fn list_map_copy_compare() {
    let [qemu_io, nbdinfo, nbdcopy, qemu_img] = need!("qemu-io", "nbdinfo", "nbdcopy", "qemu-img");
    // A sparse origin: random data in [0, 4M) and [20M, 21M), holes elsewhere.
    let mut model0 = vec![0u8; SIZE as usize];
    let head = pattern_bytes(1, 4 * MIB as usize);
    let mid = pattern_bytes(2, MIB as usize);
    model0[..head.len()].copy_from_slice(&head);
    model0[20 * MIB as usize..21 * MIB as usize].copy_from_slice(&mid);
    let fx = Fixture::new("tools", SIZE, &head);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&fx.origin)
        .unwrap()
        .write_all_at(&mid, 20 * MIB)
        .unwrap();
    let orig_copy = fx.dir.join("orig-copy.img");
    std::fs::write(&orig_copy, &model0).unwrap();
    let _d = fx.start();

    fx.snapshot("disk0", "a", false, "first");
    let a = model0.clone();
    let mut origin = model0.clone();
    let mut cmds = Vec::new();
    pattern_write(&mut origin, &mut cmds, MIB + 3, 100 * KIB, 0x31);
    pattern_write(&mut origin, &mut cmds, 10 * MIB, 64 * KIB, 0x32);
    pattern_write(&mut origin, &mut cmds, SIZE - MIB + 5, 1000, 0x33);
    fx.qemu_io(&qemu_io, "disk0", false, &cmds);

    fx.snapshot("disk0", "b", false, "after the first writes");
    let b = origin.clone();
    fx.snapshot("disk0@b", "c", true, "scratch");
    let mut c = b.clone();
    let mut cmds = Vec::new();
    pattern_write(&mut origin, &mut cmds, 0, 2 * MIB, 0x41);
    pattern_write(&mut origin, &mut cmds, 10 * MIB + 4 * KIB, 4 * KIB, 0x42);
    pattern_write(&mut origin, &mut cmds, 25 * MIB, MIB, 0x43);
    fx.qemu_io(&qemu_io, "disk0", false, &cmds);
    let mut cmds = Vec::new();
    pattern_write(&mut c, &mut cmds, 500 * KIB, 10 * KIB, 0x51);
    pattern_write(&mut c, &mut cmds, 10 * MIB, 4 * KIB, 0x52);
    fx.qemu_io(&qemu_io, "disk0@c", false, &cmds);
    // Two snapshots with nothing written between them.
    fx.snapshot("disk0", "d", false, "");
    fx.snapshot("disk0", "e", false, "");

    let expected: Vec<(&str, &[u8])> = vec![
        ("disk0", &origin),
        ("disk0@a", &a),
        ("disk0@b", &b),
        ("disk0@c", &c),
        ("disk0@d", &origin),
        ("disk0@e", &origin),
    ];

    // nbdinfo --list: every export, its description and its flags.
    let out = run_ok(
        Command::new(&nbdinfo)
            .args(["--list", "--json"])
            .arg(fx.list_uri()),
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo --list --json");
    let exports = v["exports"].as_array().expect("exports");
    let mut names: Vec<&str> = exports
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["disk0", "disk0@a", "disk0@b", "disk0@c", "disk0@d", "disk0@e"]
    );
    let get = |n: &str| exports.iter().find(|e| e["export-name"] == n).unwrap();
    let desc = |n: &str| get(n)["description"].as_str().unwrap_or("").to_string();
    assert!(
        desc("disk0").contains(fx.origin.to_str().unwrap())
            && desc("disk0").contains(&SIZE.to_string()),
        "origin description: {:?}",
        desc("disk0")
    );
    assert!(
        desc("disk0@a").contains("snapshot of disk0") && desc("disk0@a").contains("first"),
        "{:?}",
        desc("disk0@a")
    );
    assert!(desc("disk0@b").contains("after the first writes"));
    assert!(
        desc("disk0@c").contains("disk0@b")
            && desc("disk0@c").contains("scratch")
            && desc("disk0@c").contains("writable"),
        "{:?}",
        desc("disk0@c")
    );
    // The creation time is in the description, in UTC as people read it (what `date -u`
    // prints for the time `snapshot list --json` gives).
    let created = fx.json(&["snapshot", "list", "--json"])[0]["created"]
        .as_u64()
        .unwrap();
    let date = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{created}"), "+%Y-%m-%d %H:%M:%S UTC"])
        .output()
        .expect("date");
    let when = String::from_utf8(date.stdout).unwrap().trim().to_string();
    assert!(
        desc("disk0@a").contains(&format!("taken {when}")),
        "no creation time {when:?} in {:?}",
        desc("disk0@a")
    );
    for (name, ro) in [
        ("disk0", false),
        ("disk0@a", true),
        ("disk0@b", true),
        ("disk0@c", false),
        ("disk0@d", true),
    ] {
        let e = get(name);
        assert_eq!(e["is_read_only"], ro, "{name} is_read_only");
        assert_eq!(e["export-size"], SIZE, "{name} size");
        assert_eq!(e["can_trim"], !ro, "{name} can_trim");
        assert_eq!(e["can_zero"], !ro, "{name} can_zero");
        assert!(
            e["contexts"]
                .as_array()
                .is_some_and(|c| c.iter().any(|x| x == "base:allocation")),
            "{name}: no base:allocation"
        );
    }

    // nbdinfo --map: truthful everywhere; the sparse origin's holes show through.
    for (name, model) in &expected {
        let ext = map(&nbdinfo, &fx.uri(name));
        let zero = assert_map_truthful(name, &ext, model);
        eprintln!("{name}: {} extents, {zero} bytes zero", ext.len());
        if *name == "disk0@a" {
            assert!(
                zero >= 8 * MIB,
                "disk0@a shares ~26 MiB of holes with the origin file but only {zero} bytes \
                 are reported as zero: {ext:?}"
            );
        }
    }

    // nbdcopy of every export to a file, compared by SHA-256 with the model.
    for (name, model) in &expected {
        let file = fx.dir.join(&format!("copy-{}.img", name.replace('@', "_")));
        run_ok(Command::new(&nbdcopy).arg(fx.uri(name)).arg(&file));
        let got = sha256_file(&file);
        if got != sha256(model) {
            let data = std::fs::read(&file).unwrap();
            panic!(
                "nbdcopy of {name} differs from the model: {:?}",
                first_diff(&data, model)
            );
        }
        std::fs::remove_file(&file).unwrap();
    }

    // qemu-img compare: exit 0 for equal, 1 for different (with the first differing
    // 512-byte sector).
    let compare = |x: &str, y: &str| {
        run(
            Command::new(&qemu_img)
                .args(["compare", "-f", "raw", "-F", "raw"])
                .arg(x)
                .arg(y),
            TOOL_TIMEOUT,
        )
    };
    for (x, y) in [
        (fx.uri("disk0@d"), fx.uri("disk0@e")),
        (fx.uri("disk0"), fx.uri("disk0@e")),
        (fx.uri("disk0@a"), orig_copy.to_string_lossy().to_string()),
    ] {
        let out = compare(&x, &y);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{x} vs {y} should be identical: {}",
            text(&out)
        );
        assert!(text(&out).contains("identical"), "{}", text(&out));
    }
    for (x, y, mx, my) in [
        ("disk0@a", "disk0@b", &a, &b),
        ("disk0@b", "disk0@c", &b, &c),
        ("disk0@a", "disk0", &a, &origin),
    ] {
        let out = compare(&fx.uri(x), &fx.uri(y));
        assert_eq!(
            out.status.code(),
            Some(1),
            "{x} vs {y} should differ: {}",
            text(&out)
        );
        let first = mx.iter().zip(my.iter()).position(|(p, q)| p != q).unwrap() as u64;
        let want = format!("Content mismatch at offset {}!", first / 512 * 512);
        assert!(
            text(&out).contains(&want),
            "{x} vs {y}: expected {want:?}, got {}",
            text(&out)
        );
    }
    fx.assert_check_clean("after the nbd tools");
}
