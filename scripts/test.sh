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

echo
echo "=== test.sh: all steps passed (fmt, clippy, build, cargo test, cli-test) ==="
