//! Black-box tests of the `mvsnap` binary: exit statuses, one-line errors, and a round trip
//! through format, origin add, write, snapshot, cat, list and check. The longer scenario lives in
//! scripts/cli-test.sh.

mod common;

use std::path::Path;

use common::Run;

/// Stdin is an empty pipe, as for a command in a pipeline.
fn mvsnap(args: &[&str]) -> Run {
    mvsnap_stdin(args, &[])
}

fn mvsnap_stdin(args: &[&str], stdin: &[u8]) -> Run {
    Run::with_stdin(common::mvsnap().args(args), stdin)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

#[test]
fn every_command_has_help_with_examples() {
    for cmd in [
        &[][..],
        &["format"],
        &["origin"],
        &["origin", "add"],
        &["origin", "remove"],
        &["origin", "list"],
        &["snapshot"],
        &["snapshot", "create"],
        &["snapshot", "delete"],
        &["snapshot", "list"],
        &["cat"],
        &["write"],
        &["check"],
        &["info"],
    ] {
        let mut args = cmd.to_vec();
        args.push("--help");
        let run = mvsnap(&args).ok();
        assert!(
            run.stdout_str().contains("\nExamples:\n"),
            "mvsnap {cmd:?} --help has no examples"
        );
    }
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(mvsnap(&["snapshot", "list"]).code, 2, "no store");
    assert_eq!(mvsnap(&["format", "x.img", "--size", "10X"]).code, 2);
    assert_eq!(mvsnap(&["format", "x.img", "--size", "1.5X"]).code, 2);
    assert_eq!(mvsnap(&["--store", "x.img", "write", "disk"]).code, 2);
    assert_eq!(mvsnap(&["no-such-command"]).code, 2);
}

#[test]
fn bad_stores_give_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.img");
    std::fs::write(&junk, pattern(1 << 20, 7)).unwrap();
    mvsnap(&["--store", s(&junk), "snapshot", "list"]).one_line_error("not an mvsnap store");
    assert_eq!(
        std::fs::read(&junk).unwrap(),
        pattern(1 << 20, 7),
        "junk changed"
    );
    let missing = dir.path().join("missing.img");
    mvsnap(&["--store", s(&missing), "info"]).one_line_error("missing.img");
    let new = dir.path().join("new.img");
    let run = mvsnap(&["format", s(&new), "--size", "64M", "--max-size", "32M"]);
    assert_eq!(
        run.code, 2,
        "contradictory sizes are a usage error: {}",
        run.stderr
    );
    assert!(run.stderr.contains("--max-size"), "{}", run.stderr);
    assert!(!new.exists(), "an invalid size created the store");
}

#[test]
fn round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store.img");
    let disk = dir.path().join("disk.img");
    let st = s(&store);
    const SIZE: usize = 4 << 20;
    let v1 = pattern(SIZE, 1);
    std::fs::write(&disk, &v1).unwrap();

    mvsnap(&["format", st, "--size", "32M"]).ok();
    let run = mvsnap(&["--store", st, "origin", "add", s(&disk)]).ok();
    assert_eq!(run.stdout_str().trim(), "disk.img", "default id");
    let run = mvsnap(&[
        "--store", st, "snapshot", "create", "disk.img", "--tag", "a",
    ])
    .ok();
    assert_eq!(run.stdout_str(), "a\n");

    // Overwrite 1.5 MiB at an unaligned offset through the engine.
    let patch = pattern(3 << 19, 2);
    let off = 100_000;
    mvsnap_stdin(
        &["--store", st, "write", "disk.img", "--offset", "100000"],
        &patch,
    )
    .ok();
    let mut v2 = v1.clone();
    v2[off..off + patch.len()].copy_from_slice(&patch);

    let cat = |name: &str| mvsnap(&["--store", st, "cat", name]).ok().stdout;
    assert!(cat("disk.img@a") == v1, "the snapshot changed");
    assert!(
        cat("disk.img") == v2,
        "the origin does not read what was written"
    );
    assert!(std::fs::read(&disk).unwrap() == v2, "the origin file");
    let part = mvsnap(&[
        "--store",
        st,
        "cat",
        "disk.img@a",
        "--offset",
        "64K",
        "--length",
        "5000",
    ])
    .ok()
    .stdout;
    assert!(part == v1[65536..65536 + 5000]);

    mvsnap_stdin(
        &["--store", st, "write", "disk.img@a", "--offset", "0"],
        b"x",
    )
    .one_line_error("read-only");
    mvsnap(&[
        "--store", st, "snapshot", "create", "disk.img", "--tag", "a",
    ])
    .one_line_error("already exists");

    let list = mvsnap(&["--store", st, "snapshot", "list", "--json"]).ok();
    let json: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let snaps = json.as_array().unwrap();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0]["name"], "disk.img@a");
    assert_eq!(snaps[0]["parent"], "disk.img");
    assert_eq!(snaps[0]["state"], "valid");

    let table = mvsnap(&["--store", st, "snapshot", "list"])
        .ok()
        .stdout_str();
    assert!(table.starts_with("NAME "), "{table}");
    assert!(table.contains("disk.img@a"), "{table}");

    let check = mvsnap(&["--store", st, "check"]).ok().stdout_str();
    assert!(check.contains("clean"), "{check}");
    let info = mvsnap(&["--store", st, "info", "--json"]).ok();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    // Format v2: space in 4 KiB blocks.
    assert_eq!(info["chunk_size"], 4096);
    // The node cache's counts since this open: it read the tree's root at least.
    assert!(
        info["cache_hits"].is_u64() && info["cache_misses"].as_u64() >= Some(1),
        "{info}"
    );

    mvsnap(&["--store", st, "snapshot", "delete", "disk.img@a"]).ok();
    let list = mvsnap(&["--store", st, "snapshot", "list", "--json"]).ok();
    let json: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 0);
    mvsnap(&["--store", st, "check"]).ok();
}

/// Issue 7 item 7: `format` of a file that holds data (not a store) is refused without
/// `--force`, names what it found, and leaves the file byte for byte as it was.
#[test]
fn format_refuses_a_file_with_data() {
    let dir = tempfile::tempdir().unwrap();
    let precious = dir.path().join("precious.img");
    let data = pattern(8 << 20, 3);
    std::fs::write(&precious, &data).unwrap();
    mvsnap(&["format", s(&precious)]).one_line_error("holds data");
    mvsnap(&["format", s(&precious), "--size", "16M"]).one_line_error("--force");
    assert!(
        std::fs::read(&precious).unwrap() == data,
        "the file changed"
    );

    // A filesystem signature alone (the rest zeros) is data too.
    let fs = dir.path().join("ext4.img");
    let mut image = vec![0u8; 8 << 20];
    image[1080..1082].copy_from_slice(&[0x53, 0xef]);
    std::fs::write(&fs, &image).unwrap();
    mvsnap(&["format", s(&fs)]).one_line_error("ext2/3/4");
    assert!(
        std::fs::read(&fs).unwrap() == image,
        "the filesystem changed"
    );

    // An all-zero file is fine; with --force so is the data.
    let zeros = dir.path().join("zeros.img");
    std::fs::write(&zeros, vec![0u8; 8 << 20]).unwrap();
    mvsnap(&["format", s(&zeros)]).ok();
    mvsnap(&["format", s(&precious), "--force"]).ok();
    mvsnap(&["--store", s(&precious), "check"]).ok();
}

/// Issue 7 item 7: `format` never shrinks a file (`--size 16M` cut a 64 MiB file), keeps an
/// existing file's size without `--size`, and grows it to a bigger `--size` (`1G` on an 8 MiB
/// file was ignored).
#[test]
fn format_never_shrinks_and_grows_to_size() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.img");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    mvsnap(&["format", s(&big), "--size", "16M"]).one_line_error("never shrinks");
    assert_eq!(std::fs::metadata(&big).unwrap().len(), 64 << 20);
    mvsnap(&["format", s(&big), "--size", "16M", "--force"]).one_line_error("never shrinks");
    assert_eq!(std::fs::metadata(&big).unwrap().len(), 64 << 20);
    mvsnap(&["format", s(&big)]).ok();
    assert_eq!(std::fs::metadata(&big).unwrap().len(), 64 << 20, "kept");

    let small = dir.path().join("small.img");
    std::fs::File::create(&small)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    mvsnap(&["format", s(&small), "--size", "1G"]).ok();
    assert_eq!(std::fs::metadata(&small).unwrap().len(), 1 << 30, "grown");
    let info = mvsnap(&["--store", s(&small), "info"]).ok().stdout_str();
    assert!(info.contains("1.0 GiB") || info.contains("1 GiB"), "{info}");
}

/// Issue 7 item 11: a `write` whose range reaches past the end writes nothing, whether stdin
/// is a file (its length is known) or a pipe (spooled first).
#[test]
fn write_past_the_end_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store.img");
    let disk = dir.path().join("disk.img");
    let st = s(&store);
    let v1 = pattern(4 << 20, 5);
    std::fs::write(&disk, &v1).unwrap();
    mvsnap(&["format", st, "--size", "32M"]).ok();
    mvsnap(&["--store", st, "origin", "add", s(&disk)]).ok();
    mvsnap(&[
        "--store", st, "snapshot", "create", "disk.img", "--tag", "a",
    ])
    .ok();

    // 2 MiB at 3 MiB of a 4 MiB origin, through a pipe.
    let patch = pattern(2 << 20, 9);
    mvsnap_stdin(
        &["--store", st, "write", "disk.img", "--offset", "3M"],
        &patch,
    )
    .one_line_error("nothing was written");
    // The same from a regular file.
    let file = dir.path().join("patch.bin");
    std::fs::write(&file, &patch).unwrap();
    let run = Run::of(
        common::mvsnap()
            .args(["--store", st, "write", "disk.img", "--offset", "3M"])
            .stdin(std::fs::File::open(&file).unwrap()),
    );
    run.one_line_error("nothing was written");
    assert!(std::fs::read(&disk).unwrap() == v1, "the origin changed");
    let cat = mvsnap(&["--store", st, "cat", "disk.img"]).ok().stdout;
    assert!(cat == v1, "the origin reads other bytes");
    mvsnap(&["--store", st, "check"]).ok();

    // Exactly up to the end works, from a pipe.
    mvsnap_stdin(
        &["--store", st, "write", "disk.img", "--offset", "3M"],
        &patch[..1 << 20],
    )
    .ok();
    let mut v2 = v1.clone();
    v2[3 << 20..].copy_from_slice(&patch[..1 << 20]);
    assert!(std::fs::read(&disk).unwrap() == v2);
    let snap = mvsnap(&["--store", st, "cat", "disk.img@a"]).ok().stdout;
    assert!(snap == v1, "the snapshot changed");
}

/// Issue 7 item 8: `origin add` accepted the store itself (writing through it destroys the
/// store), any other mvsnap store, and an origin already bound to another store (writing
/// through the second silently changed a snapshot of the first).
#[test]
fn origin_add_refuses_stores_and_origins_bound_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let (s1, s2) = (dir.path().join("s1.img"), dir.path().join("s2.img"));
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, pattern(1 << 20, 4)).unwrap();
    mvsnap(&["format", s(&s1), "--size", "32M"]).ok();
    mvsnap(&["format", s(&s2), "--size", "32M"]).ok();
    let before = std::fs::read(&s1).unwrap();
    mvsnap(&["--store", s(&s1), "origin", "add", s(&s1)]).one_line_error("this store itself");
    mvsnap(&["--store", s(&s1), "origin", "add", s(&s2)]).one_line_error("is an mvsnap store");
    assert!(std::fs::read(&s1).unwrap() == before, "the store changed");

    mvsnap(&["--store", s(&s1), "origin", "add", s(&disk)]).ok();
    mvsnap(&[
        "--store",
        s(&s1),
        "snapshot",
        "create",
        "disk.img",
        "--tag",
        "a",
    ])
    .ok();
    // The binding is marked on the file (an extended attribute: tmpfs, ext4, xfs, btrfs keep
    // them), and a second store refuses it.
    mvsnap(&["--store", s(&s2), "origin", "add", s(&disk)]).one_line_error("already an origin");
    // Once the first store lets it go, the second may take it.
    mvsnap(&["--store", s(&s1), "snapshot", "delete", "disk.img@a"]).ok();
    mvsnap(&["--store", s(&s1), "origin", "remove", "disk.img"]).ok();
    mvsnap(&["--store", s(&s2), "origin", "add", s(&disk)]).ok();
}
