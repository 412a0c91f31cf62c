//! Exit statuses of the real binary, table-driven: every usage error of every command exits 2
//! with clap's message on stderr and nothing on stdout, and touches no file; runtime errors
//! (missing store, wrong volume, corrupt store file, a range past the end) exit 1 with one
//! `mvsnap: error:` line.

mod common;

use std::path::Path;

use common::Run;

fn run(args: &[&str], env_store: Option<&Path>) -> Run {
    let mut cmd = common::mvsnap();
    cmd.args(args);
    if let Some(p) = env_store {
        cmd.env("MVSNAP_STORE", p);
    }
    Run::of(&mut cmd)
}

/// A store with origin `d` (1 MiB) and snapshots `d@a` <- `d@b`; returns (store, origin, dir).
fn setup() -> (String, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.img").to_str().unwrap().to_string();
    let disk = dir.path().join("d.img");
    std::fs::write(&disk, vec![7u8; 1 << 20]).unwrap();
    let disk = disk.to_str().unwrap().to_string();
    for args in [
        &["format", &store, "--size", "16M"][..],
        &["--store", &store, "origin", "add", &disk, "--id", "d"],
        &["--store", &store, "snapshot", "create", "d", "--tag", "a"],
        &["--store", &store, "snapshot", "create", "d@a", "--tag", "b"],
    ] {
        let r = run(args, None);
        assert_eq!(r.code, 0, "{args:?}: {}", r.stderr);
    }
    (store, disk, dir)
}

fn sha(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn usage_errors_exit_2() {
    let (st, disk, dir) = setup();
    let new = dir.path().join("new.img");
    let new = new.to_str().unwrap();
    let before = sha(&st);
    let origin_before = sha(&disk);
    // Each: the arguments after `mvsnap --store STORE` (or alone when `bare`), and what stderr
    // must mention.
    let with_store: &[(&[&str], &str)] = &[
        (&[], "Usage"),
        (&["frobnicate"], "frobnicate"),
        (&["--no-such-flag", "info"], "--no-such-flag"),
        (&["info", "--no-such-flag"], "--no-such-flag"),
        (&["info", "extra"], "extra"),
        (&["info", "--json", "-p"], "cannot be used with"),
        (&["info", "-o", "name"], "-o"),
        (&["check", "extra"], "extra"),
        (&["check", "-p"], "-p"),
        (&["format", new, "--size", "10X"], "not a size"),
        (&["format", new, "--size", "-1M"], "-1"),
        (&["format", new, "--size", "99999999999T"], "too large"),
        (&["format", new, "--max-size", "lots"], "not a size"),
        (&["format", new, "--low-space-percent", "101"], "101"),
        (
            &["format", new, "--size", "64M", "--max-size", "32M"],
            "--max-size",
        ),
        (&["format", new, "--ephemeral"], "--ephemeral"),
        (&["origin"], "Usage"),
        (&["origin", "add"], "<PATH>"),
        (&["origin", "add", new, "--id"], "--id"),
        (&["origin", "remove"], "<ID>"),
        (&["origin", "rm"], "<ID>"),
        (
            &["origin", "list", "-o", "id,bogus"],
            "possible values: id, size",
        ),
        (&["origin", "ls", "-s", "bogus"], "possible values"),
        (&["origin", "list", "--json", "-H"], "cannot be used with"),
        (&["origin", "list", "extra"], "extra"),
        (&["snapshot"], "Usage"),
        (&["snapshot", "create"], "ORIGIN[@TAG]"),
        (&["snapshot", "create", "d", "--tag"], "--tag"),
        (
            &["snapshot", "create", "d", "--tag", "a@b"],
            "1-128 characters",
        ),
        (
            &["snapshot", "create", "d", "--tag", ""],
            "1-128 characters",
        ),
        (&["snapshot", "delete", "d@a b"], "1-128 characters"),
        (&["origin", "add", new, "--id", "x/y"], "1-128 characters"),
        (&["snapshot", "delete"], "ORIGIN@TAG"),
        (&["snapshot", "delete", "d"], "not a snapshot name"),
        (&["snapshot", "rm", "d@"], "not a snapshot name"),
        (
            &["snapshot", "delete", "d@b", "--no-such-flag"],
            "--no-such-flag",
        ),
        (
            &["snapshot", "list", "-o", "name,bogus"],
            "possible values: name, origin",
        ),
        (&["snapshot", "ls", "-s", "bogus"], "possible values"),
        (
            &["snapshot", "list", "-s", "name", "-S", "tag"],
            "cannot be used with",
        ),
        (
            &["snapshot", "list", "--json", "-o", "name"],
            "cannot be used with",
        ),
        (&["snapshot", "list", "--ephemeral"], "--ephemeral"),
        (&["cat"], "ORIGIN[@TAG]"),
        (&["cat", "d", "--offset", "x"], "not a size"),
        (&["cat", "d", "--length", "1Q"], "not a size"),
        (&["cat", "d", "--ephemeral"], "--ephemeral"),
        (&["write", "d"], "--offset"),
        (&["write", "d", "--offset", "1..2"], "not a size"),
        (&["write", "--offset", "0"], "ORIGIN[@TAG]"),
        (&["serve", "--cache-size", "big"], "not a size"),
        (&["serve", "--no-such-flag"], "--no-such-flag"),
        (&["generate", "completions", "tcsh"], "tcsh"),
    ];
    let bare: &[(&[&str], &str)] = &[
        (&["snapshot", "list"], "no store given"),
        (&["origin", "list"], "no store given"),
        (&["info"], "no store given"),
        (&["check"], "no store given"),
        (&["cat", "d"], "no store given"),
        (&["write", "d", "--offset", "0"], "no store given"),
        (&["serve"], "no store given"),
        (&["format"], "no store given"),
        (&["--store"], "--store"),
    ];
    let mut failures = Vec::new();
    let cases = with_store
        .iter()
        .map(|(a, w)| {
            let mut v = vec!["--store", st.as_str()];
            v.extend_from_slice(a);
            (v, *w)
        })
        .chain(bare.iter().map(|(a, w)| (a.to_vec(), *w)));
    let mut n = 0;
    for (args, what) in cases {
        n += 1;
        let r = run(&args, None);
        if r.code != 2 || !r.stderr.contains(what) || !r.stdout.is_empty() {
            failures.push(format!(
                "mvsnap {args:?}: exit {} (want 2), stderr {:?} (want {what:?}), stdout {:?}",
                r.code,
                r.stderr,
                r.stdout_str()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(n > 50, "{n} cases");
    assert!(!Path::new(new).exists(), "a usage error created a file");
    assert!(sha(&st) == before, "a usage error changed the store");
    assert!(
        sha(&disk) == origin_before,
        "a usage error changed the origin"
    );
}

#[test]
fn runtime_errors_exit_1() {
    let (st, _disk, dir) = setup();
    let missing = dir.path().join("missing.img");
    let missing = missing.to_str().unwrap().to_string();
    let junk = dir.path().join("junk.img");
    std::fs::write(&junk, vec![0x5au8; 1 << 20]).unwrap();
    let junk = junk.to_str().unwrap().to_string();
    // A real store, both superblocks overwritten past the magic.
    let corrupt = dir.path().join("corrupt.img");
    let mut bytes = std::fs::read(&st).unwrap();
    for at in [64, 4096 + 64] {
        bytes[at..at + 16].copy_from_slice(b"GARBAGE!GARBAGE!");
    }
    std::fs::write(&corrupt, &bytes).unwrap();
    let corrupt = corrupt.to_str().unwrap().to_string();

    let mut cases: Vec<(Vec<&str>, &str)> = Vec::new();
    for (store, what) in [
        (&missing, "missing.img"),
        (&junk, "not an mvsnap store"),
        (&corrupt, "superblock"),
    ] {
        for cmd in [
            &["info"][..],
            &["check"],
            &["snapshot", "list"],
            &["origin", "list"],
            &["cat", "d"],
            &["snapshot", "create", "d"],
            &["snapshot", "delete", "d@a"],
        ] {
            let mut v = vec!["--store", store.as_str()];
            v.extend_from_slice(cmd);
            cases.push((v, what));
        }
    }
    let s = st.as_str();
    for (args, what) in [
        (&["cat", "nope"][..], "nope"),
        (&["cat", "d@nope"], "nope"),
        (&["cat", "d", "--offset", "2M"], "beyond the end"),
        (&["cat", "d", "--length", "1025K"], "beyond the end"),
        (&["write", "nope", "--offset", "0"], "nope"),
        (&["write", "d@a", "--offset", "0"], "read-only"),
        (&["snapshot", "create", "nope"], "nope"),
        (&["snapshot", "create", "d", "--tag", "a"], "exists"),
        (&["snapshot", "delete", "d@nope"], "d@nope not found"),
        (&["snapshot", "delete", "d@a"], "taken from it"),
        (&["snapshot", "delete", "-r", "d@a"], "not a terminal"),
        (&["snapshot", "list", "nope"], "origin nope not found"),
        (&["snapshot", "list", "d@nope"], "snapshot d@nope not found"),
        (&["origin", "remove", "nope"], "nope"),
        (&["origin", "add", "/nonexistent/x.img"], "x.img"),
        (&["format", s], "already holds an mvsnap store"),
    ] {
        let mut v = vec!["--store", s];
        v.extend_from_slice(args);
        cases.push((v, what));
    }
    let mut failures = Vec::new();
    for (args, what) in &cases {
        let r = run(args, None);
        let lines: Vec<&str> = r.stderr.lines().collect();
        if r.code != 1
            || lines.len() != 1
            || !lines[0].starts_with("mvsnap: error: ")
            || !lines[0].to_lowercase().contains(&what.to_lowercase())
        {
            failures.push(format!(
                "mvsnap {args:?}: exit {} (want 1), stderr {:?} (want one line with {what:?})",
                r.code, r.stderr
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Nothing above deleted anything.
    let r = run(
        &["--store", s, "snapshot", "list", "-H", "-o", "name"],
        None,
    );
    assert_eq!(r.stdout_str(), "d@a\nd@b\n", "{}", r.stderr);
}

/// Help shows each command's own flags: `--ephemeral` only where it means something, and with
/// MVSNAP_STORE set no usage line shows `--store` as required.
#[test]
fn help_shows_each_commands_own_flags() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.img");
    for cmd in [
        &["format"][..],
        &["origin", "add"],
        &["origin", "list"],
        &["snapshot", "list"],
        &["snapshot", "delete"],
        &["cat"],
        &["write"],
        &["check"],
        &["info"],
    ] {
        let mut args = cmd.to_vec();
        args.push("--help");
        let r = run(&args, None);
        assert_eq!(r.code, 0);
        assert!(
            !r.stdout_str().contains("--ephemeral"),
            "{cmd:?}: {}",
            r.stdout_str()
        );
    }
    for cmd in [&["serve"][..], &["snapshot", "create"]] {
        let mut args = cmd.to_vec();
        args.push("--help");
        let r = run(&args, None);
        assert!(
            r.stdout_str().contains("--ephemeral"),
            "{cmd:?}: {}",
            r.stdout_str()
        );
    }
    let r = run(&["write", "d"], Some(&store));
    assert_eq!(r.code, 2);
    let usage = r.stderr.lines().find(|l| l.starts_with("Usage:")).unwrap();
    assert!(!usage.contains("--store"), "{usage}");
    assert!(usage.contains("--offset"), "{usage}");
    let r = run(&["write", "--help"], Some(&store));
    assert!(
        r.stdout_str().contains("MVSNAP_STORE"),
        "{}",
        r.stdout_str()
    );
}
