//! Man pages and shell completions generated from the command-line definition
//! (`mvsnap generate`, which scripts/install.sh runs) describe the real flags.

mod common;

use std::process::Command;

fn mvsnap(args: &[&str]) -> std::process::Output {
    common::ok(common::mvsnap().args(args))
}

/// roff escapes `-` as `\-`: the page's text with that undone.
fn page(dir: &std::path::Path, name: &str) -> String {
    let path = dir.join(format!("{name}.1"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .replace("\\-", "-")
}

#[test]
fn man_pages_describe_each_commands_flags() {
    let dir = tempfile::tempdir().unwrap();
    let man = dir.path().join("man1");
    mvsnap(&["generate", "man", man.to_str().unwrap()]);

    let list = page(&man, "mvsnap-snapshot-list");
    assert!(list.starts_with(".ie") || list.contains(".TH mvsnap-snapshot-list 1"));
    for flag in ["-H", "-p", "-o", "-s", "-S", "--json", "ORIGIN[@TAG]"] {
        assert!(
            list.contains(&format!("\\fB{flag}\\fR")) || list.contains(flag),
            "mvsnap-snapshot-list.1 does not mention {flag}"
        );
    }
    for col in ["exclusive", "shared", "created", "memo", "reason"] {
        assert!(list.contains(col), "mvsnap-snapshot-list.1: column {col}");
    }
    assert!(list.contains("Scripted mode"), "the -H description");
    let delete = page(&man, "mvsnap-snapshot-delete");
    for flag in ["--recursive", "--yes", "--dry-run", "--force"] {
        assert!(delete.contains(flag), "mvsnap-snapshot-delete.1: {flag}");
    }
    let cat = page(&man, "mvsnap-cat");
    assert!(cat.contains("--sparse") && !cat.contains("--ephemeral"));
    assert!(page(&man, "mvsnap-serve").contains("--ephemeral"));
    let top = page(&man, "mvsnap");
    for sub in [
        "format", "origin", "snapshot", "cat", "write", "check", "info", "serve",
    ] {
        assert!(top.contains(&format!("mvsnap-{sub}(1)")), "mvsnap.1: {sub}");
    }
    // The generator itself is hidden: no page, not in the list.
    assert!(!man.join("mvsnap-generate.1").exists());
    assert!(!top.contains("generate"));
}

#[test]
fn completions_know_the_commands() {
    for shell in ["bash", "zsh", "fish", "elvish"] {
        let out = mvsnap(&["generate", "completions", shell]);
        let text = String::from_utf8(out.stdout).unwrap();
        for word in ["snapshot", "delete", "recursive", "exclusive", "sparse"] {
            assert!(text.contains(word), "{shell} completions lack {word}");
        }
        // The generator is hidden from users: completions do not offer it either.
        assert!(
            !text.contains("generate") && !text.contains("Generate"),
            "{shell} completions offer the hidden generate command"
        );
    }
    // The bash script loads and registers the function.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("mvsnap.bash");
    std::fs::write(&f, mvsnap(&["generate", "completions", "bash"]).stdout).unwrap();
    let out = Command::new("bash")
        .args([
            "-c",
            &format!("source {} && complete -p mvsnap", f.display()),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("_mvsnap"), "{text}");
}
