#!/usr/bin/env bash
# THE test command: installs what the tests need, then lint, build and every test.
# Any failure stops the run with a non-zero exit status.
set -euo pipefail

cd "$(dirname "$0")/.."

step_name=""
step() {
    step_name="$1"
    echo
    echo "=== test.sh: $step_name ==="
}
on_exit() {
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo
        echo "=== test.sh: FAILED in step '$step_name' (exit status $rc) ==="
    fi
}
trap on_exit EXIT

step "install system dependencies"
bash scripts/install-deps.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo build --release"
cargo build --release --workspace

step "cargo test (release)"
# Release, so that the property and crash tests run many cases quickly. MVSNAP_REQUIRE_TOOLS
# makes tests that need external tools (qemu-io, nbdinfo, fio...) fail instead of skipping.
MVSNAP_REQUIRE_TOOLS=1 cargo test --workspace --release

step "CLI black-box tests (scripts/cli-test.sh)"
MVSNAP_BIN="$PWD/target/release/mvsnap" bash scripts/cli-test.sh

step "a sysadmin's first hour (scripts/sysadmin-test.sh)"
bash scripts/sysadmin-test.sh

step "NBD benchmark smoke run (bench/nbd.sh --quick)"
# Keeps the benchmark runnable; its numbers are not asserted (speed is measured, not tested).
bash bench/nbd.sh --quick >target/nbd-bench-quick.md
grep -A 10 '^#### No snapshot' target/nbd-bench-quick.md

step "index size sweep smoke run (bench/scale.sh --quick)"
bash bench/scale.sh --quick >target/scale-bench-quick.md
grep -A 3 '^| mappings' target/scale-bench-quick.md

step "first writes as the index grows, smoke run (bench/first-writes.sh --quick)"
bash bench/first-writes.sh --quick >target/first-writes-bench-quick.md
grep -A 4 '^| round' target/first-writes-bench-quick.md

step "FUSE benchmark smoke run (bench/fuse.sh --quick)"
# Loop devices over the mvsnap file, qemu-storage-daemon's FUSE export and the plain file.
if [ "$(id -u)" = 0 ] && [ -e /dev/fuse ] && [ -e /dev/loop-control ]; then
    bash bench/fuse.sh --quick >target/fuse-bench-quick.md
    grep -A 6 '^| line' target/fuse-bench-quick.md
else
    echo "skipped: bench/fuse.sh needs root, /dev/fuse and loop devices"
fi

step "bounded fuzz run of the NBD option/request parser (fuzz/)"
# The same harness also runs in `cargo test` (crates/mvsnap-nbd/tests/fuzz_conn.rs); this is the
# coverage-guided run. cargo-fuzz comes from crates.io; nightly if the machine has it.
FUZZ_SECONDS="${MVSNAP_FUZZ_SECONDS:-60}"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
fi
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    (cd fuzz && cargo +nightly fuzz run nbd_proto -- -max_total_time="$FUZZ_SECONDS")
else
    (cd fuzz && cargo fuzz run --sanitizer=none nbd_proto -- -max_total_time="$FUZZ_SECONDS")
fi

echo
echo "=== test.sh: all steps passed (fmt, clippy, build, cargo test, cli-test, bench smoke, fuzz) ==="
