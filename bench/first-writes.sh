#!/usr/bin/env bash
# First writes after a snapshot as the index grows (issue 8): the same random 4 KiB writes,
# round after round, each round over a new snapshot, so that every write is a copy-out in every
# round while the index it goes into grows by about one entry per write and round.
#   1. an origin of --size full of data (fio, 1 MiB writes), a store, `serve` (tree commits
#      logged at debug level);
#   2. each round: `snapshot create`, then fio 4 KiB random writes, QD16, --runtime seconds,
#      seed 7 (the same blocks in the same order every round). Per round: the index's mappings
#      before it, IOPS, completion latency p50/max, the daemon's CPU per request
#      (/proc/PID/stat), the tree commits and nodes they wrote (the daemon's log) and nodes per
#      first write, and the CPU the hypervisor took meanwhile (steal);
#   3. the peer, same origin and page cache: a fresh qcow2 `extended_l2` overlay served by
#      qemu-nbd, the same fio run.
# What it shows: a first write's cost beside the index's size (docs/BENCHMARKS.md, "First
# writes: which part grows with the index").
#
# Usage: bench/first-writes.sh [--quick] [--size SIZE] [--rounds N] [--runtime S]
#                              [--cache-size SIZE] [--dir DIR]
#   --quick        CI smoke run: 256 MiB origin, 2 rounds of 2 s
#   --size SIZE    origin size (default 2G)
#   --cache-size SIZE  `serve --cache-size` (default: serve's); a fifth of it, at most 64 MiB,
#                  is the dirty limit that sets the nodes per write
#   --rounds N     rounds (default 3)
#   --runtime S    fio runtime per round (default 10)
#   --dir DIR      where the scratch files go (default target/)
#
# Prints Markdown on stdout; progress on stderr. Installs nothing: run scripts/install-deps.sh
# (as root) for fio, qemu-nbd, qemu-img. Every server it starts is stopped by pid and the
# scratch directory removed, even on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=first-writes.sh
. bench/lib.sh

size=2G rounds=3 runtime=10 dir=target cache=
while [ $# -gt 0 ]; do
    case $1 in
    --quick) size=256M rounds=2 runtime=2 ;;
    --size) size=$2; shift ;;
    --rounds) rounds=$2; shift ;;
    --runtime) runtime=$2; shift ;;
    --cache-size) cache=$2; shift ;;
    --dir) dir=$2; shift ;;
    -h | --help) usage; exit 0 ;;
    *) bad_argument "$1" ;;
    esac
    shift
done

need_tools "run scripts/install-deps.sh as root" cargo fio qemu-nbd qemu-img python3 numfmt
make_work "$dir"
stop_all() { stop_pids; }
trap_cleanup
build_mvsnap

bytes=$(numfmt --from=iec "$size")
export MVSNAP_RUNTIME_DIR=$work/run
mkdir -p "$MVSNAP_RUNTIME_DIR"
mvs() { "$MVSNAP" --store "$work/s.store" "$@"; }

# commits LOG FROM_LINE: "COMMITS NODES" of the `tree commit` lines after line FROM_LINE.
commits() {
    tail -n "+$(($2 + 1))" "$1" | awk '/tree commit/ {
            n++; for (i = 1; i <= NF; i++) if ($i ~ /^nodes=/) { sub(/nodes=/, "", $i); s += $i } }
        END { printf "%d %d\n", n, s }'
}

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

log "origin of $size; load $(cut -d' ' -f1 /proc/loadavg)"
fill "$work/origin.raw" "$bytes"
"$MVSNAP" format "$work/s.store" --size "$(((bytes + (3 << 30)) >> 20))M" >&2
mvs origin add "$work/origin.raw" --id disk0 >&2
out=$(RUST_LOG=mvsnap_engine=debug mvs serve ${cache:+--cache-size "$cache"} --nbd-socket "$work/s.sock" --detach) ||
    die "mvsnap serve failed"
spid=$(echo "$out" | awk '$1 == "pid" { print $2 }')
slog=$(echo "$out" | awk '$1 == "log" { print $2 }')
[ -n "$spid" ] && [ -f "$slog" ] || die "no pid or log in mvsnap serve output: $out"
PIDS+=("$spid")
wait_socket "$work/s.sock"
hz=$(getconf CLK_TCK)

rows=()
for ((r = 1; r <= rounds; r++)); do
    mappings=$(mvs info --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["mappings"])')
    mvs snapshot create disk0 --tag "r$r" >/dev/null
    from=$(wc -l <"$slog")
    cpu0=$(cpu_stat)
    t0=$(cpu_ticks "$spid")
    fio_randwrite "nbd+unix:///disk0?socket=$work/s.sock" "$work/r$r.json"
    t1=$(cpu_ticks "$spid")
    steal=$(cpu_steal "$cpu0" "$(cpu_stat)")
    read -r iops p50 _ max reqs < <(fio_summary "$work/r$r.json")
    read -r ncommits nodes < <(commits "$slog" "$from")
    us=$(awk -v t=$((t1 - t0)) -v hz="$hz" -v n="$reqs" 'BEGIN { printf "%.0f", t * 1e6 / hz / n }')
    per=$(awk -v a="$nodes" -v n="$reqs" 'BEGIN { printf "%.2f", a / n }')
    log "  round $r: $mappings mappings before; $iops IOPS, p50 $p50 ms, max $max ms; $us us of daemon CPU per request; $ncommits commits, $nodes nodes ($per per write); steal $steal%"
    rows+=("| $r | $mappings | $iops | $p50 | $max | $us | $ncommits | $nodes | $per | $steal% |")
done
stop_pid "$spid"
PIDS=()

qemu-img create -q -f qcow2 -F raw -b "$work/origin.raw" -o extended_l2=on,cluster_size=64k \
    "$work/ov.qcow2"
qemu-nbd -f qcow2 --cache=writeback --aio=threads --persistent --shared=16 -x disk0 \
    -k "$work/q.sock" --fork "--pid-file=$work/q.pid" "$work/ov.qcow2" >&2
PIDS+=("$(cat "$work/q.pid")")
wait_socket "$work/q.sock"
cpu0=$(cpu_stat)
fio_randwrite "nbd+unix:///disk0?socket=$work/q.sock" "$work/q.json"
qsteal=$(cpu_steal "$cpu0" "$(cpu_stat)")
read -r qiops qp50 _ qmax _ < <(fio_summary "$work/q.json")
stop_pids
log "  qcow2 el2: $qiops IOPS, p50 $qp50 ms, max $qmax ms, steal $qsteal%"

echo "### First writes as the index grows (bench/first-writes.sh, $(date -u +%FT%TZ))"
echo
echo "Origin $size, fio 4 KiB random writes QD16 for $runtime s per round, seed 7 (the same"
echo "blocks every round), each round over a new snapshot; node cache ${cache:-64M (the default)};"
echo "git $(git rev-parse --short HEAD 2>/dev/null || echo '?')."
echo
echo "| round | mappings before | IOPS | p50 (ms) | max (ms) | daemon CPU per request (us) | tree commits | nodes written | nodes per write | steal |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${rows[@]}"
echo
echo "qemu-nbd, qcow2 \`extended_l2\` overlay over the same origin, the same fio run: $qiops IOPS, p50 $qp50 ms, max $qmax ms, steal $qsteal%."
