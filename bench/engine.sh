#!/usr/bin/env bash
# Engine benchmark of issue 2: build release, print the machine, run the full bench.
# Usage: bench/engine.sh [--quick] [--dir DIR]      (results: docs/BENCHMARKS.md)
# Run as root to have the page cache dropped before read passes and timed opens.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=target
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    if [[ ${args[i]} == --dir && $((i + 1)) -lt ${#args[@]} ]]; then
        dir=${args[i + 1]}
    fi
done
mkdir -p "$dir"

cargo build --release -p mvsnap-engine --example engine_bench

echo "## Machine"
echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "- nproc: $(nproc)"
echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo "- memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
echo "- kernel: $(uname -srm)"
echo "- bench dir filesystem: $(findmnt -n -o FSTYPE,SOURCE,OPTIONS -T "$dir" 2>/dev/null || df -T "$dir" | tail -1)"
echo "- free space there: $(df -h --output=avail "$dir" | tail -1 | tr -d ' ')"
echo "- user: $(id -un) (page cache dropping needs root)"
echo "- rustc: $(rustc --version)"
echo "- git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
echo "- load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "## Command"
echo '```'
echo "cargo run --release -p mvsnap-engine --example engine_bench --${*:+ $*}"
echo '```'
echo
exec cargo run --release -q -p mvsnap-engine --example engine_bench -- "$@"
