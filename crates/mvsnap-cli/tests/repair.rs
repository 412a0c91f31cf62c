//! `check --repair` through the binary: a store whose space map no longer reads back fails
//! `check` (exit 1), is repaired (exit 0, the report says what was rewritten), and then checks
//! clean with every snapshot byte for byte as before.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Stdio;

fn mvsnap(store: &Path, args: &[&str]) -> (i32, String, Vec<u8>) {
    mvsnap_in(store, args, Stdio::null())
}

fn mvsnap_in(store: &Path, args: &[&str], stdin: Stdio) -> (i32, String, Vec<u8>) {
    let out = common::mvsnap()
        .args(args)
        .env("MVSNAP_STORE", store)
        .env("MVSNAP_RUNTIME_DIR", store.parent().unwrap())
        .stdin(stdin)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        out.stdout,
    )
}

fn ok(store: &Path, args: &[&str]) -> Vec<u8> {
    let (code, text, stdout) = mvsnap(store, args);
    assert_eq!(code, 0, "mvsnap {args:?}: {text}");
    stdout
}

#[test]
fn check_repair_rebuilds_a_rotten_space_map() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store.img");
    let disk = dir.path().join("disk.img");
    let before: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&disk, &before).unwrap();
    ok(&store, &["format", "--size", "64MiB"]);
    ok(
        &store,
        &["origin", "add", disk.to_str().unwrap(), "--id", "disk"],
    );
    ok(&store, &["snapshot", "create", "disk", "--tag", "mon"]);
    let after = vec![0xa5u8; 2 << 20];
    std::fs::write(dir.path().join("new"), &after).unwrap();
    let input = std::fs::File::open(dir.path().join("new")).unwrap();
    let (code, text, _) = mvsnap_in(&store, &["write", "disk", "--offset", "1MiB"], input.into());
    assert_eq!(code, 0, "write: {text}");
    // Rot every space map bitmap (4 KiB blocks starting "MVSM").
    let bytes = std::fs::read(&store).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&store)
        .unwrap();
    let mut rotted = 0;
    for (i, b) in bytes.chunks(4096).enumerate() {
        if b.len() == 4096 && &b[..4] == b"MVSM" {
            f.write_all_at(&[b[3000] ^ 0xff], i as u64 * 4096 + 3000)
                .unwrap();
            rotted += 1;
        }
    }
    drop(f);
    assert!(rotted > 0);
    let (code, text, _) = mvsnap(&store, &["check"]);
    assert_eq!(code, 1, "check of a rotten store: {text}");
    let (code, text, _) = mvsnap(&store, &["check", "--repair"]);
    assert_eq!(code, 0, "repair: {text}");
    assert!(
        text.contains("bitmaps rewritten") && text.contains("clean"),
        "{text}"
    );
    ok(&store, &["check"]);
    let snap = ok(&store, &["cat", "disk@mon"]);
    assert!(snap == before, "the snapshot differs after the repair");
    let now = ok(&store, &["cat", "disk"]);
    assert!(
        now[1 << 20..3 << 20] == after[..],
        "the origin differs after the repair"
    );
}
