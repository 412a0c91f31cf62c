# What the NBD and FUSE benchmarks (bench/nbd.sh, bench/fuse.sh) share, sourced after
# `set -euo pipefail`, the `cd` to the checkout and `BENCH=NAME.sh` (the name in messages):
# usage and argument errors, messages, tool checks, the scratch directory, stopping servers by
# pid (never by name), the cleanup trap, and a private copy of the release binary.
# The script defines `stop_all` (what to stop at the end: its servers, mounts, devices) and may
# set `stopped` (what the failure message says was stopped).

# The script's header comment, as its --help prints it.
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
bad_argument() { echo "$BENCH: unknown argument: $1 (see --help)" >&2; exit 2; }

# Messages go to fd 9, a copy of the original stderr: a trap runs with the redirections of the
# command it interrupted (fio's log file), and its messages must not vanish there.
exec 9>&2
log() { echo "$BENCH: $*" >&9; }
die() { log "error: $*"; exit 1; }

# need_tools HINT TOOL...: die naming every tool not on PATH, with HINT (how to install them).
need_tools() {
    local hint=$1 t missing=()
    shift
    for t in "$@"; do
        command -v "$t" >/dev/null 2>&1 || missing+=("$t")
    done
    [ ${#missing[@]} -eq 0 ] || die "missing tools: ${missing[*]} ($hint)"
}

# make_work DIR: $work, a fresh scratch directory below DIR (NAME-bench.XXXXXX), removed by
# the cleanup trap whatever happens.
make_work() {
    mkdir -p "$1"
    work=$(mktemp -d "$(cd "$1" && pwd)/${BENCH%.sh}-bench.XXXXXX")
}

# cpu_stat: the machine's CPU time counters (the "cpu" line of /proc/stat), for cpu_steal.
cpu_stat() { head -1 /proc/stat; }

# cpu_steal BEFORE AFTER: the share of CPU time the hypervisor kept from this VM (steal)
# between two cpu_stat readings, in percent. A thread that holds a lock while its vCPU is
# taken stalls every thread behind it: a run's latency tail means little without this.
cpu_steal() {
    awk -v a="$1" -v b="$2" 'BEGIN {
        split(a, x); split(b, y); t = 0
        for (i = 2; i <= 9; i++) t += y[i] - x[i]
        printf "%.1f", (t > 0 ? 100 * (y[9] - x[9]) / t : 0)
    }'
}

# wait_socket PATH: wait up to 30 s for a server's Unix socket to appear.
wait_socket() {
    local i
    for ((i = 0; i < 600; i++)); do
        [ -S "$1" ] && return 0
        sleep 0.05
    done
    die "no socket at $1"
}

# fio_randwrite URI OUT: 4 KiB random writes over NBD, QD16, $runtime seconds, seed 7 (the same
# blocks in the same order every run), JSON to OUT. With $flush_every set, a FLUSH after every
# that many writes (fio_flushes reads their latency).
fio_randwrite() {
    fio --name=randwrite --ioengine=nbd "--uri=$1" --rw=randwrite --bs=4k --iodepth=16 \
        --time_based "--runtime=$runtime" --randseed=7 --lat_percentiles=1 \
        ${flush_every:+"--fsync=$flush_every"} \
        --percentile_list=50:99:99.9:99.99 --output-format=json "--output=$2" \
        >"$work/fio.log" 2>&1 || { cat "$work/fio.log" >&2; die "fio failed"; }
}

# fio_summary OUT: "IOPS p50_ms p9999_ms max_ms requests" from fio_randwrite's JSON.
fio_summary() {
    python3 - "$1" <<'EOF'
import json, sys
w = json.load(open(sys.argv[1]))["jobs"][0]["write"]
lat = w.get("clat_ns") or w["lat_ns"]
p = lat["percentile"]
def ms(ns): return ns / 1e6
print("%.0f %.3f %.2f %.2f %d" % (w["iops"], ms(p["50.000000"]), ms(p["99.990000"]), ms(lat["max"]),
                                  w["total_ios"]))
EOF
}

# fio_flushes OUT: "flushes mean_ms max_ms" of the FLUSH requests in fio_randwrite's JSON.
fio_flushes() {
    python3 - "$1" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))["jobs"][0].get("sync") or {}
lat = s.get("lat_ns") or {}
print("%d %.1f %.1f" % (s.get("total_ios", 0), lat.get("mean", 0) / 1e6, lat.get("max", 0) / 1e6))
EOF
}

# fill FILE BYTES: FILE full of data, written with 1 MiB writes and synced.
fill() {
    fio --name=fill "--filename=$1" "--size=$2" --rw=write --bs=1m --ioengine=psync \
        --end_fsync=1 --randseed=1 --output=/dev/null >/dev/null 2>&1 || die "filling $1 failed"
}

PIDS=()          # servers we started and have not stopped yet (by pid, never by name)
stopped="servers stopped"

pid_alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

# Stop one server: SIGTERM, wait up to 60 s (mvsnap checkpoints), then SIGKILL.
stop_pid() {
    local pid=$1 i
    pid_alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 600; i++)); do
        pid_alive "$pid" || return 0
        sleep 0.1
    done
    log "pid $pid did not exit after SIGTERM; killing it"
    kill -KILL "$pid" 2>/dev/null || true
}

# Stop every server in PIDS.
stop_pids() {
    local p
    for p in "${PIDS[@]}"; do stop_pid "$p"; done
    PIDS=()
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_all
    rm -rf "$work"
    [ $rc -ne 0 ] && log "failed (exit status $rc); $stopped, $work removed"
    exit $rc
}

# From here on, the end of the script (or an interrupt) stops everything and removes $work.
trap_cleanup() {
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# run_fio WHAT CMD: run the fio command line CMD (its own output to $work/fio.log); on failure
# show that log and $out, and die naming WHAT.
run_fio() {
    if ! eval "$2" >"$work/fio.log" 2>&1; then
        cat "$work/fio.log" "$out" >&2 2>/dev/null || true
        die "fio failed: $1"
    fi
}

# record REP WHO LINE UNIT: fio's result in $out (terse v3: fields 7/8 = read KiB/s, IOPS;
# 48/49 = write KiB/s, IOPS) as IOPS or MiB/s in V, appended to $results with the 1-minute load
# average after it.
record() {
    V=$(awk -F';' -v u="$4" 'NF > 49 {
            if (u == "IOPS") printf "%.0f", $8 + $49; else printf "%.1f", ($7 + $48) / 1024 }' "$out")
    [ -n "$V" ] || { cat "$out" >&2; die "could not parse fio output: $2 $3"; }
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$V" "$(cut -d' ' -f1 /proc/loadavg)" >>"$results"
}

# build_mvsnap: build the release binary; MVSNAP becomes a private copy of it in $work (others
# may rebuild target/ while we run).
# MVSNAP_BIN=path runs that binary instead of building this checkout (to compare two builds
# side by side on one machine, alternating runs).
build_mvsnap() {
    if [ -n "${MVSNAP_BIN:-}" ]; then
        [ -x "$MVSNAP_BIN" ] || die "MVSNAP_BIN=$MVSNAP_BIN is not an executable"
        log "using $MVSNAP_BIN"
        cp "$MVSNAP_BIN" "$work/mvsnap"
    else
        log "building mvsnap (release)"
        cargo build --release -q -p mvsnap-cli >&2 || die "cargo build --release -p mvsnap-cli failed"
        cp target/release/mvsnap "$work/mvsnap"
    fi
    MVSNAP=$work/mvsnap
}
