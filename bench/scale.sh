#!/usr/bin/env bash
# Index size sweep over NBD (issue 8, "Measure"): how the daemon behaves as its index grows.
# For each size N (mappings = 4 KiB blocks preserved), against mvsnap and, as the peer, a
# qcow2 `extended_l2` overlay chain served by qemu-nbd:
#   1. an origin of N x 4 KiB full of data (fio, 1 MiB writes), a store, `serve`, snapshot s1;
#      the origin overwritten over NBD with 1 MiB writes: N copy-outs, N mappings;
#      snapshot s2 (so the next writes are first writes again);
#   2. the daemon stopped, the page cache dropped, `serve` again: open time (start to socket),
#      RSS right after;
#   3. fio 4 KiB random writes, QD16, for --runtime seconds (first writes: each a copy-out
#      into the big index): IOPS, completion latency p50/p99.99/max, the daemon's RSS after,
#      and the CPU time the hypervisor took from the VM meanwhile (steal: a lock holder whose
#      vCPU is taken stalls every writer behind it, so the tail is read beside it);
#   4. snapshots up to --snapshots in all, then `mvsnap snapshot list --json` timed (the whole
#      CLI call: process start, control socket, the list; median of 5);
#   5. the peer: overlay ov1 over the same origin filled with 1 MiB writes (N x 4 KiB of
#      allocated subclusters), a fresh overlay ov2 on top (the "snapshot"), served by qemu-nbd,
#      the same fio run as 3.
#
# Usage: bench/scale.sh [--quick] [--mappings LIST] [--runtime S] [--snapshots N] [--dir DIR]
#   --quick        CI smoke run: 64K mappings, 3 s of fio, 20 snapshots
#   --mappings L   comma-separated sizes, K/M suffixes (default 1M,2M,4M)
#   --runtime S    fio runtime of step 3 and 5 (default 30)
#   --snapshots N  snapshots in the store for the list timing (default 1000)
#   --dir DIR      where the scratch files go (default target/; 4M needs ~40 GB free)
#   --cache-size S `serve --cache-size` (default: serve's own)
#   --warm-origin  read the origin into the page cache before step 3, so a copy-out's old
#                  block is a memory copy, not a device read (what remains is the engine).
#                  With `cat`, so the cache holds it in large folios (2 MiB), as a sequential
#                  reader (a backup) leaves it; ext4 pays ~40 us for a 4 KiB write into one
#   --warm-pages   the same, but with random 4 KiB reads (fio, FADV_RANDOM), so the cache
#                  holds 4 KiB pages, as an origin written or read at random leaves it
#   --flush-every N  a FLUSH after every N writes in step 3 and 5, and its latency reported
#                  (how long a client's flush waits while first writes keep the write-behind
#                  queue full)
#   --pretouch G   touch (and free) G GiB of anonymous memory right before each server's fio
#                  phase, at most the free memory less 1 GiB (so a warmed origin stays
#                  cached); default 6 where 16 GiB or more are available, else 0; 0 turns
#                  it off; --quick: 0. On a VM whose host takes free guest memory back (free page
#                  reporting), the first touch of such a page costs a fault in the host (~15 us
#                  a page on the machine of docs/BENCHMARKS.md, against 1.6 us): a server whose
#                  page cache grows into it pays that per write. Without this, mvsnap's phase
#                  follows the origin's warming (which takes the memory the cache drop freed)
#                  and qemu-nbd's does not
#   --cost         also count, with `perf stat` over step 3 and 5, each server's CPU time,
#                  context switches and futex / sched_yield calls per request (needs perf
#                  and root; threads waiting for each other show there, not in IOPS)
#
# Prints Markdown on stdout; progress on stderr. Installs nothing: run scripts/install-deps.sh
# (as root) for fio, qemu-nbd, qemu-img. Dropping the page cache needs root (skipped without).
# Every server it starts is stopped by pid and the scratch directory removed, even on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=scale.sh
. bench/lib.sh

mappings=1M,2M,4M runtime=30 nsnaps=1000 dir=target quick=0 cache="" warm=0 cost=0 flush_every="" pretouch=""
while [ $# -gt 0 ]; do
    case $1 in
    --quick) quick=1 mappings=64K runtime=3 nsnaps=20 ;;
    --mappings) mappings=$2; shift ;;
    --runtime) runtime=$2; shift ;;
    --snapshots) nsnaps=$2; shift ;;
    --dir) dir=$2; shift ;;
    --cache-size) cache=$2; shift ;;
    --warm-origin) warm=1 ;;
    --warm-pages) warm=pages ;;
    --cost) cost=1 ;;
    --flush-every) flush_every=$2; shift ;;
    --pretouch) pretouch=$2; shift ;;
    -h | --help) usage; exit 0 ;;
    *) bad_argument "$1" ;;
    esac
    shift
done

need_tools "run scripts/install-deps.sh as root" cargo fio qemu-nbd qemu-img python3 numfmt
[[ -z "$pretouch" || "$pretouch" =~ ^[0-9]+(\.[0-9]+)?$ ]] ||
    die "--pretouch takes a size in GiB (a number), not '$pretouch'"
if [ -z "$pretouch" ]; then
    # Both servers on memory the guest touched last, unless the machine is small or quick.
    avail_gib=$(awk '/^MemAvailable:/ { print int($2 / 1048576) }' /proc/meminfo)
    if [ "$quick" = 0 ] && [ "${avail_gib:-0}" -ge 16 ]; then pretouch=6; else pretouch=0; fi
fi
if [ "$cost" = 1 ]; then
    need_tools "install perf (Debian: linux-perf)" perf
    [ "$runtime" -ge 3 ] || die "--cost needs --runtime 3 or more"
fi
make_work "$dir"
stop_all() { stop_pids; }
trap_cleanup
build_mvsnap

drop_caches() {
    sync
    if [ -w /proc/sys/vm/drop_caches ]; then echo 3 >/proc/sys/vm/drop_caches; fi
}

pretouch_memory() { # see --pretouch
    [ "$pretouch" != 0 ] || return 0
    local touched
    touched=$(
        python3 - "$pretouch" <<'PY'
import mmap, sys
# Free memory only, less 1 GiB: taking the page cache's (a warmed origin) would evict it.
free = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemFree:"))
n = max(0, min(int(float(sys.argv[1]) * (1 << 30)), free * 1024 - (1 << 30))) // 4096 * 4096
print(f"{n / (1 << 30):.1f}")
if n == 0:
    sys.exit(0)
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for off in range(0, n, 4096):
    m[off] = 1
m.close()
PY
    ) || die "touching $pretouch GiB of memory failed"
    log "  touched $touched GiB of free memory (--pretouch $pretouch)"
}

rss_mib() { awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }
now_ms() { date +%s%3N; }

mvs() { MVSNAP_RUNTIME_DIR=$work/run "$MVSNAP" --store "$work/s.store" "$@"; }

start_serve() { # start_serve: serve the store on $work/s.sock; PID in $spid
    local out
    rm -f "$work/s.sock"
    out=$(mvs serve ${cache:+--cache-size "$cache"} --nbd-socket "$work/s.sock" --detach) ||
        die "mvsnap serve failed"
    spid=$(echo "$out" | awk '$1 == "pid" { print $2 }')
    [ -n "$spid" ] || die "no pid in mvsnap serve output: $out"
    PIDS+=("$spid")
    wait_socket "$work/s.sock"
}

stop_serve() {
    stop_pid "$spid"
    PIDS=()
}

overwrite_nbd() { # overwrite_nbd URI BYTES: 1 MiB writes over NBD, a different pattern
    fio --name=over --ioengine=nbd "--uri=$1" --rw=write --bs=1m --iodepth=8 "--size=$2" \
        --randseed=2 --output=/dev/null >"$work/fio.log" 2>&1 ||
        { cat "$work/fio.log" >&2; die "overwrite failed"; }
}

# cost_start PID: count PID's CPU time, switches and lock system calls (every thread, those it
# starts too) over the fio run but its last 2 s, in the background; cost_end IOPS prints "CPU
# us, switches, futex, sched_yield" per request.
cost_start() {
    cost_secs=$((runtime - 2))
    perf stat -e task-clock,context-switches,syscalls:sys_enter_futex,syscalls:sys_enter_sched_yield \
        -x, -o "$work/cost.csv" -p "$1" -- sleep "$cost_secs" >/dev/null 2>&1 &
    cost_pid=$!
}
# node_reads: "N L": the nodes the daemon read from the store since it opened (`info`'s cache
# misses), and how many of them it read under the state lock (not fetched ahead of a lookup).
node_reads() {
    mvs info --json | python3 -c 'import json, sys; i = json.load(sys.stdin); print(i["cache_misses"], i["cache_misses"] - i["cache_prefetched"])' ||
        die "mvsnap info failed"
}
cost_end() {
    wait "$cost_pid" || die "perf stat failed: $(cat "$work/cost.csv")"
    awk -F, -v n="$(($1 * cost_secs))" '
        $3 == "task-clock" { cpu = $1 } $3 == "context-switches" { cs = $1 }
        $3 ~ /futex/ { fx = $1 } $3 ~ /sched_yield/ { y = $1 }
        END { printf "%.0f %.2f %.2f %.2f\n", cpu * 1000 / n, cs / n, fx / n, y / n }' "$work/cost.csv"
}

results=() costs=() flushes=()
for m in ${mappings//,/ }; do
    n=$(numfmt --from=iec "$m")
    bytes=$((n * 4096))
    log "== $m mappings ($((bytes >> 20)) MiB origin); load $(cut -d' ' -f1 /proc/loadavg)"
    origin=$work/origin.raw
    fill "$origin" "$bytes"
    # Room for the N copies and the first writes of step 3 (~2 GiB at 15k/s for 30 s), so the
    # store never fills here (a full store invalidates, reclaims and commits synchronously:
    # another benchmark).
    room=$(( bytes / 4 > (3 << 30) ? bytes / 4 : (3 << 30) ))
    store_size=$(( (bytes + room) >> 20 ))M
    "$MVSNAP" format "$work/s.store" --size "$store_size" >&2
    mvs origin add "$origin" --id disk0 >&2
    mkdir -p "$work/run"
    start_serve
    mvs snapshot create disk0 --tag s1 >/dev/null
    t0=$(now_ms)
    overwrite_nbd "nbd+unix:///disk0?socket=$work/s.sock" "$bytes"
    build_s=$(( ($(now_ms) - t0) / 1000 ))
    mvs snapshot create disk0 --tag s2 >/dev/null
    stop_serve
    drop_caches
    t0=$(now_ms)
    start_serve
    open_ms=$(( $(now_ms) - t0 ))
    rss_open=$(rss_mib "$spid")
    if [ "$warm" = 1 ]; then
        cat "$origin" >/dev/null
    elif [ "$warm" = pages ]; then
        fio --name=warm "--filename=$origin" --rw=randread --bs=4k "--size=$((bytes / 4))" \
            --numjobs=4 "--offset_increment=$((bytes / 4))" --ioengine=psync \
            --fadvise_hint=random --invalidate=0 --output=/dev/null >/dev/null 2>&1 ||
            die "reading the origin in 4 KiB pages failed"
    fi
    pretouch_memory
    load0=$(cut -d' ' -f1 /proc/loadavg)
    cpu0=$(cpu_stat)
    read -r reads0 locked0 < <(node_reads)
    [ "$cost" = 1 ] && cost_start "$spid"
    fio_randwrite "nbd+unix:///disk0?socket=$work/s.sock" "$work/m.json"
    steal=$(cpu_steal "$cpu0" "$(cpu_stat)")
    read -r iops p50 p9999 max reqs < <(fio_summary "$work/m.json")
    # Index nodes the first writes read from the store (not in the node cache): each a read
    # on some write's path, from the page cache or the device.
    read -r reads locked < <(node_reads)
    reads=$((reads - reads0)) locked=$((locked - locked0))
    per_write=$(awk -v r="$reads" -v n="$reqs" 'BEGIN { printf "%.2f", n ? r / n : 0 }')
    mflushes=$(fio_flushes "$work/m.json")
    [ "$cost" = 1 ] && mcost=$(cost_end "$iops")
    rss_after=$(rss_mib "$spid")
    load1=$(cut -d' ' -f1 /proc/loadavg)
    log "  mvsnap: open ${open_ms} ms, RSS ${rss_open} -> ${rss_after} MiB; $iops IOPS, p50 $p50 ms, p99.99 $p9999 ms, max $max ms (load $load0 -> $load1, steal $steal%); $reads index nodes read, $per_write per write, $locked under the state lock"
    for ((i = 3; i <= nsnaps; i++)); do
        mvs snapshot create disk0 --tag "l$i" >/dev/null
    done
    list=()
    for i in 1 2 3 4 5; do
        t0=$(now_ms)
        mvs snapshot list --json >/dev/null
        list+=($(( $(now_ms) - t0 )))
    done
    list_ms=$(printf '%s\n' "${list[@]}" | sort -n | sed -n 3p)
    count=$(mvs snapshot list -H -o name | wc -l)
    [ "$count" = "$nsnaps" ] || die "the store lists $count snapshots, not $nsnaps"
    log "  mvsnap: snapshot list of $count snapshots: ${list[*]} ms (median $list_ms)"
    stop_serve
    rm -f "$work/s.store"

    # The peer: base (raw) <- ov1 (N x 4 KiB written) <- ov2 (fresh, the "snapshot").
    qemu-img create -q -f qcow2 -F raw -b "$origin" -o extended_l2=on,cluster_size=64k \
        "$work/ov1.qcow2"
    qemu-nbd -f qcow2 --cache=writeback --aio=threads --persistent --shared=16 -x disk0 \
        -k "$work/q.sock" --fork "--pid-file=$work/q.pid" "$work/ov1.qcow2" >&2
    PIDS+=("$(cat "$work/q.pid")")
    wait_socket "$work/q.sock"
    overwrite_nbd "nbd+unix:///disk0?socket=$work/q.sock" "$bytes"
    stop_pids
    rm -f "$work/q.sock"
    qemu-img create -q -f qcow2 -F qcow2 -b "$work/ov1.qcow2" -o extended_l2=on,cluster_size=64k \
        "$work/ov2.qcow2"
    drop_caches
    qemu-nbd -f qcow2 --cache=writeback --aio=threads --persistent --shared=16 -x disk0 \
        -k "$work/q.sock" --fork "--pid-file=$work/q.pid" "$work/ov2.qcow2" >&2
    qpid=$(cat "$work/q.pid")
    PIDS+=("$qpid")
    wait_socket "$work/q.sock"
    pretouch_memory
    qload0=$(cut -d' ' -f1 /proc/loadavg)
    cpu0=$(cpu_stat)
    [ "$cost" = 1 ] && cost_start "$qpid"
    fio_randwrite "nbd+unix:///disk0?socket=$work/q.sock" "$work/q.json"
    qsteal=$(cpu_steal "$cpu0" "$(cpu_stat)")
    read -r qiops qp50 qp9999 qmax _ < <(fio_summary "$work/q.json")
    if [ -n "$flush_every" ]; then
        qflushes=$(fio_flushes "$work/q.json")
        flushes+=("$m|$mflushes|$qflushes")
        log "  FLUSH (count, mean ms, max ms): mvsnap $mflushes; qemu-nbd $qflushes"
    fi
    if [ "$cost" = 1 ]; then
        qcost=$(cost_end "$qiops")
        costs+=("$m|$iops|$mcost $per_write|$qiops|$qcost")
        log "  per request (CPU us, switches, futex, sched_yield): mvsnap $mcost; qemu-nbd $qcost"
    fi
    qrss=$(rss_mib "$qpid")
    stop_pids
    rm -f "$work"/*.qcow2 "$work/q.sock" "$origin"
    log "  qcow2 el2: $qiops IOPS, p50 $qp50 ms, p99.99 $qp9999 ms, max $qmax ms, RSS $qrss MiB (load $qload0, steal $qsteal%)"
    results+=("$m|$build_s|$open_ms|$rss_open|$rss_after|$iops|$p50|$p9999|$max|$load0-$load1|$steal|$list_ms|$qiops|$qp50|$qp9999|$qmax|$qrss|$qload0|$qsteal")
done

echo "### Index size sweep over NBD ($(date -u +%FT%TZ))"
echo
echo "- machine: $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), kernel $(uname -r); scratch on $(df -T "$work" | awk 'NR == 2 { print $2 }')"
echo "- $(fio --version); $(qemu-nbd --version | head -1)"
echo "- command: bash bench/scale.sh --mappings $mappings --runtime $runtime --snapshots $nsnaps${cache:+ --cache-size $cache}$([ "$warm" = 1 ] && echo " --warm-origin")$([ "$warm" = pages ] && echo " --warm-pages")$([ "$cost" = 1 ] && echo " --cost")${flush_every:+ --flush-every $flush_every}${pretouch:+ --pretouch $pretouch}"
echo "- fio: --ioengine=nbd --rw=randwrite --bs=4k --iodepth=16 --time_based --runtime=$runtime --randseed=7 --lat_percentiles=1${flush_every:+ --fsync=$flush_every}"
echo "- qemu-nbd -f qcow2 --cache=writeback --aio=threads --persistent --shared=16 (overlays with extended_l2=on,cluster_size=64k)"
echo
echo "| mappings | build (s) | open (ms) | RSS open / after (MiB) | mvsnap IOPS | p50 (ms) | p99.99 (ms) | max (ms) | load | steal % | list of $nsnaps (ms) | qcow2 el2 IOPS | p50 | p99.99 | max | qemu-nbd RSS | load | steal % | IOPS ratio |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"
for r in "${results[@]}"; do
    IFS='|' read -r m b o r0 r1 i p5 p9 mx l sl lm qi qp5 qp9 qmx qr ql qsl <<<"$r"
    ratio=$(awk -v a="$i" -v b="$qi" 'BEGIN { printf "%.2f", a / b }')
    echo "| $m | $b | $o | $r0 / $r1 | $i | $p5 | $p9 | $mx | $l | $sl | $lm | $qi | $qp5 | $qp9 | $qmx | $qr | $ql | $qsl | ${ratio}x |"
done
if [ "$cost" = 1 ]; then
    echo
    echo "Per request over the run but its last 2 s (\`perf stat -p\` on each server: its CPU time, context switches, futex and sched_yield calls / requests; index nodes read: \`info\`'s cache misses over the whole run / requests):"
    echo
    echo "| mappings | mvsnap IOPS | CPU (us) | switches | futex | sched_yield | index nodes read | qcow2 el2 IOPS | CPU (us) | switches | futex | sched_yield |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for c in "${costs[@]}"; do
        IFS='|' read -r m i mc qi qc <<<"$c"
        echo "| $m | $i | ${mc// / | } | $qi | ${qc// / | } |"
    done
fi
if [ -n "$flush_every" ]; then
    echo
    echo "FLUSH requests during the random writes (one after every $flush_every writes; fio's \`sync\` latency):"
    echo
    echo "| mappings | mvsnap flushes | mean (ms) | max (ms) | qcow2 el2 flushes | mean (ms) | max (ms) |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    for f in "${flushes[@]}"; do
        IFS='|' read -r m mf qf <<<"$f"
        echo "| $m | ${mf// / | } | ${qf// / | } |"
    done
fi
