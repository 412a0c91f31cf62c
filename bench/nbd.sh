#!/usr/bin/env bash
# NBD benchmark of issue 3: fio (--ioengine=nbd, one connection per job) against mvsnap and, in
# the same run, qemu-nbd and nbdkit serving the same raw file, plus qemu-nbd serving fresh qcow2
# overlays (the peers of "right after a snapshot").
#
# Usage: bench/nbd.sh [--quick] [--reps N] [--runtime S] [--ramp S] [--snap-window S]
#                     [--size SIZE] [--dir DIR] [--raw FILE]
#   --quick        CI smoke run: 256 MiB image, 1 s + 1 s ramp per line, 2 s window, 1 rep
#   --reps N       repeat every measurement N times, report the median (default 3)
#   --runtime S    fio --runtime of each line (default 10); --ramp S: fio --ramp_time (default 2)
#   --snap-window S  length of the "first writes after a snapshot" window (default 10, no ramp)
#   --size SIZE    raw image size (default 2G); --dir DIR: where the scratch files go
#                  (default target/, i.e. the checkout's filesystem)
#   --raw FILE     also write every single measurement there (TSV: rep, contender, line,
#                  IOPS or MiB/s, 1-minute load average right after the measurement)
#   --only PART    run one part: "main" (no snapshot, 10 snapshots) or "fresh" (right after a
#                  snapshot); the other part's table cells print as "-"
#
# Prints Markdown on stdout (machine, tools, commands, tables, targets met or not); progress
# on stderr. Installs nothing: run scripts/install-deps.sh (as root) for the tools it needs.
# Every server it starts is stopped by pid and the scratch directory removed, even on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BENCH=nbd.sh
source bench/lib.sh

reps=3 runtime=10 ramp=2 window=10 size=2G dir=target raw_out="" quick=0 only=""
while [ $# -gt 0 ]; do
    case $1 in
    --quick) quick=1 reps=1 runtime=1 ramp=1 window=2 size=256M ;;
    --reps) reps=$2; shift ;;
    --runtime) runtime=$2; shift ;;
    --ramp) ramp=$2; shift ;;
    --snap-window) window=$2; shift ;;
    --size) size=$2; shift ;;
    --dir) dir=$2; shift ;;
    --raw) raw_out=$2; shift ;;
    --only) only=$2; shift
        [ "$only" = main ] || [ "$only" = fresh ] || { echo "nbd.sh: --only main|fresh" >&2; exit 2; } ;;
    -h | --help) usage; exit 0 ;;
    *) bad_argument "$1" ;;
    esac
    shift
done

# ---------------------------------------------------------------- tools (installs nothing)
need_tools "install them with: sudo bash scripts/install-deps.sh; cargo from rustup" \
    cargo fio qemu-nbd qemu-img nbdkit awk sort findmnt
fio --enghelp 2>/dev/null | grep -qx '[[:space:]]*nbd' ||
    die "this fio has no nbd ioengine (built without libnbd); install Debian's fio (scripts/install-deps.sh)"
nbdkit file --version >/dev/null 2>&1 ||
    die "nbdkit has no file plugin; install nbdkit (scripts/install-deps.sh)"

# ---------------------------------------------------------------- scratch dir and cleanup
make_work "$dir"
stop_all() { stop_pids; }
trap_cleanup

# ---------------------------------------------------------------- build
build_mvsnap

img=$work/disk0.raw         # served by qemu-nbd, nbdkit and mvsnap (no snapshot) at once
img10=$work/disk0-10.raw    # the origin of the 10-snapshot store
results=$work/results.tsv   # rep, contender, line, value (IOPS or MiB/s), 1-min load average after
: >"$results"

# ---------------------------------------------------------------- the lines
# name | fio rw | bs | iodepth | unit
LINES=(
    "4k-randread-qd1|randread|4k|1|IOPS"
    "4k-randread-qd32|randread|4k|32|IOPS"
    "4k-randwrite-qd1|randwrite|4k|1|IOPS"
    "4k-randwrite-qd16|randwrite|4k|16|IOPS"
    "4k-randwrite-qd32|randwrite|4k|32|IOPS"
    "1m-read-qd8|read|1m|8|MiB/s"
    "1m-write-qd8|write|1m|8|MiB/s"
)

line_field() { # line_field NAME FIELD(1-5)
    local l
    for l in "${LINES[@]}"; do
        [ "${l%%|*}" = "$1" ] && { echo "$l" | cut -d'|' -f"$2"; return; }
    done
    die "unknown line $1"
}

sock() { echo "$work/$1.sock"; }                               # sock SERVER
uri() { echo "nbd+unix:///$2?socket=$(sock "$1")"; }           # uri SERVER EXPORT

# fio_cmd URI RW BS QD RUNTIME RAMP OUT: the exact fio command (one job = one NBD connection).
fio_cmd() {
    local c=(fio --name=bench --ioengine=nbd "--uri=$1" "--rw=$2" "--bs=$3" "--iodepth=$4"
        --time_based "--runtime=$5")
    [ "$6" != 0 ] && c+=("--ramp_time=$6")
    c+=(--output-format=terse --terse-version=3 "--output=$7")
    printf '%q ' "${c[@]}"
}

# measure REP CONTENDER LINE SERVER EXPORT [RUNTIME RAMP]: one fio run, its result appended.
measure() {
    local rep=$1 who=$2 name=$3 server=$4 export=$5 rt=${6:-$runtime} rp=${7:-$ramp}
    local rw bs qd unit out
    rw=$(line_field "$name" 2) bs=$(line_field "$name" 3) qd=$(line_field "$name" 4)
    unit=$(line_field "$name" 5)
    out=$work/fio.out
    rm -f "$out"
    run_fio "$who $name" "$(fio_cmd "$(uri "$server" "$export")" "$rw" "$bs" "$qd" "$rt" "$rp" "$out")"
    record "$rep" "$who" "$name" "$unit"
    log "  rep $rep  $who  $name ($export): $V $unit"
}

# ---------------------------------------------------------------- starting states
# A raw image: fully written (so it is allocated), synced, left in the page cache. Before each
# repetition and each fresh-snapshot contender it is rewritten in place with the same bytes
# (fio's default buffer, fixed seed): same layout, same content, no dirty pages.
fill_image() { # fill_image FILE
    # A new file: an mvsnap store marks its origins (user.mvsnap.store) and refuses one that
    # another store holds; each store here gets a freshly written image of its own.
    rm -f "$1"
    fill "$1" "$size"
}
FILL_CMD="fio --name=fill --filename=IMG --size=$size --rw=write --bs=1m --ioengine=psync --end_fsync=1 --randseed=1"

# Stop every server this script started, then drop their scratch files and sync, so the
# next contender starts with no dirty pages of the previous one.
stop_servers() {
    stop_pids
    rm -rf "$work"/*.sock "$work"/*.qcow2 "$work"/*.store "$work"/*.pid "$work"/run
    sync
}

pidfile_pid() {
    local i
    for ((i = 0; i < 100; i++)); do
        [ -s "$1" ] && { cat "$1"; return; }
        sleep 0.1
    done
    die "no pid file $1"
}

QEMU_NBD_OPTS=(--cache=writeback --aio=threads --persistent --shared=16)
start_qemu_nbd() { # start_qemu_nbd SERVER FORMAT FILE
    local s
    s=$(sock "$1")
    qemu-nbd -f "$2" "${QEMU_NBD_OPTS[@]}" -x disk0 -k "$s" --fork \
        "--pid-file=$work/$1.pid" "$3" >&2 || die "qemu-nbd failed to start"
    PIDS+=("$(pidfile_pid "$work/$1.pid")")
    wait_socket "$s"
}

start_nbdkit() { # start_nbdkit SERVER FILE
    local s
    s=$(sock "$1")
    nbdkit -U "$s" -P "$work/$1.pid" file "$2" >&2 || die "nbdkit failed to start"
    PIDS+=("$(pidfile_pid "$work/$1.pid")")
    wait_socket "$s"
}

STORE_SIZE=8G FRESH_STORE_SIZE=4G
[ $quick = 1 ] && STORE_SIZE=2G FRESH_STORE_SIZE=1G
# start_mvsnap SERVER IMAGE STORE_SIZE [prezero]: a fresh store ($work/SERVER.store) with the
# image as origin disk0, served. "prezero" writes the store file with zeros before formatting
# it (diagnostic only: format fallocates, and first writes into unwritten extents make every
# fdatasync commit file system metadata).
start_mvsnap() {
    local out pid store=$work/$1.store s
    s=$(sock "$1")
    mkdir -p "$work/run"
    if [ "${4:-}" = prezero ]; then
        dd if=/dev/zero "of=$store" bs=1M count=$(( $(numfmt --from=iec "$3") >> 20 )) \
            conv=fsync status=none || die "pre-zeroing the store failed"
    fi
    "$MVSNAP" format "$store" --size "$3" >&2
    "$MVSNAP" --store "$store" origin add "$2" --id disk0 >&2
    out=$(MVSNAP_RUNTIME_DIR=$work/run "$MVSNAP" --store "$store" serve \
        --nbd-socket "$s" --detach) || die "mvsnap serve failed"
    echo "$out" >&2
    pid=$(echo "$out" | awk '$1 == "pid" { print $2 }')
    [ -n "$pid" ] || die "no pid in mvsnap serve output"
    PIDS+=("$pid")
    wait_socket "$s"
}

snapshot() { # snapshot SERVER TAG
    MVSNAP_RUNTIME_DIR=$work/run "$MVSNAP" --store "$work/$1.store" snapshot create disk0 \
        --tag "$2" >/dev/null || die "snapshot create $2 failed"
}

# 10 write passes with a snapshot after each: each pass writes a tenth of the image in random
# 64 KiB blocks (a different seed each time), so the snapshots hold different data.
ten_snapshots() { # ten_snapshots SERVER
    local i
    for i in $(seq 1 10); do
        fio --name=pass --ioengine=nbd "--uri=$(uri "$1" disk0)" --rw=randwrite --bs=64k \
            --iodepth=8 --io_size=$(( $(numfmt --from=iec "$size") / 10 )) \
            --randseed=$((100 + i)) --output=/dev/null >/dev/null 2>&1 ||
            die "write pass $i failed"
        snapshot "$1" "$(printf 's%02d' "$i")"
    done
}

# Contenders of the main table: name | server | export. The servers run side by side (the
# first three on the same image; idle servers only wait in epoll), so each line is measured
# for every contender back to back, in an order rotated each repetition: load that other jobs
# put on the machine then falls on all contenders alike instead of on whoever runs last.
CONTENDERS=(
    "qemu-nbd|q|disk0"
    "nbdkit|k|disk0"
    "mvsnap|m|disk0"
    "mvsnap-10snap|m10|disk0"
    "mvsnap-10snap-s05|m10|disk0@s05"
)
# Right after a fresh snapshot: one server at a time, each from a freshly written image.
FRESH=(mvsnap-fresh mvsnap-fresh-prezero mvsnap-fresh-cached qcow2-el2 qcow2-64k)

# The diagnostic "cached" row: mvsnap keeps the origin's page cache at open only when the
# last session closed cleanly (after a failed writeback the cache may hold data the device
# never got; FORMAT.md), as it did here (`origin add` closed cleanly), so right after `serve`
# copy-outs read their old blocks from the cache the fill left (large folios). Until
# 750456e it always dropped it, and every copy-out read the device. This row reads the image
# back into the page cache after the daemon started, in 4 KiB pages (readahead off): a plain
# sequential read fills the cache with large folios, and on them each 4 KiB write of ext4
# (Linux 6.18) costs tens of microseconds (docs/BENCHMARKS.md).
CACHE_CMD="fio --name=cache --filename=IMG --size=$size --rw=read --bs=1m --ioengine=psync --invalidate=0 --fadvise_hint=random"
cache_image() { # cache_image FILE
    fio --name=cache "--filename=$1" "--size=$size" --rw=read --bs=1m --ioengine=psync \
        --invalidate=0 --fadvise_hint=random --output=/dev/null >/dev/null 2>&1 ||
        die "reading $1 into the page cache failed"
}

fresh_one() { # fresh_one REP CONTENDER
    fill_image "$img"
    case $2 in
    mvsnap-fresh) start_mvsnap f "$img" "$FRESH_STORE_SIZE"; snapshot f fresh ;;
    mvsnap-fresh-prezero) start_mvsnap f "$img" "$FRESH_STORE_SIZE" prezero; snapshot f fresh ;;
    mvsnap-fresh-cached) start_mvsnap f "$img" "$FRESH_STORE_SIZE"; cache_image "$img"; snapshot f fresh ;;
    qcow2-el2)
        qemu-img create -q -f qcow2 -F raw -b "$img" -o extended_l2=on,cluster_size=64k \
            "$work/f.qcow2" || die "qemu-img create failed"
        start_qemu_nbd f qcow2 "$work/f.qcow2" ;;
    qcow2-64k)
        qemu-img create -q -f qcow2 -F raw -b "$img" -o cluster_size=64k "$work/f.qcow2" ||
            die "qemu-img create failed"
        start_qemu_nbd f qcow2 "$work/f.qcow2" ;;
    esac
    sync
    measure "$1" "$2" 4k-randwrite-qd16 f disk0 "$window" 0
    stop_servers
}

rotate() { # rotate N ITEM...: the items, starting at index N mod count
    local n=$1; shift
    local a=("$@") i
    for ((i = 0; i < ${#a[@]}; i++)); do echo "${a[(i + n) % ${#a[@]}]}"; done
}

# ---------------------------------------------------------------- header
iec() { numfmt --to=iec-i --suffix=B "$1"; }
echo "### Run of $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo
echo "Machine and tools:"
echo "- nproc: $(nproc); CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo "- memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo); kernel: $(uname -srm)"
echo "- bench dir filesystem: $(findmnt -n -o FSTYPE,SOURCE,OPTIONS -T "$work" | tr -s ' ')"
echo "- load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "- $(fio --version); $(qemu-nbd --version | head -1); $(nbdkit --version | head -1); $(rustc --version)"
echo "- mvsnap: git $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- crates 2>/dev/null || echo ' + uncommitted changes in crates/')"
echo
echo "Settings: image $size raw (fully written, in the page cache), store $STORE_SIZE ($FRESH_STORE_SIZE for the fresh-snapshot case; 4 KiB blocks),"
echo "runtime ${runtime} s after ${ramp} s ramp per line, snapshot window ${window} s (no ramp),"
echo "$reps repetition(s), median reported. One fio job = one NBD connection; fio defaults otherwise"
echo "(random map, randrepeat: every contender sees the same offsets). qemu-nbd, nbdkit and mvsnap"
echo "(no snapshot) serve the same image side by side, mvsnap with 10 snapshots its own copy; each line"
echo "runs for every contender back to back, in an order rotated each repetition."
echo
echo "Commands (IMG, SOCK, STORE, OVERLAY stand for scratch paths):"
echo '```'
echo "$FILL_CMD    # before each repetition and each fresh-snapshot contender"
echo "qemu-nbd -f raw ${QEMU_NBD_OPTS[*]} -x disk0 -k SOCK --fork --pid-file=PIDFILE IMG"
echo "nbdkit -U SOCK -P PIDFILE file IMG"
echo "mvsnap format STORE --size $STORE_SIZE && mvsnap --store STORE origin add IMG --id disk0"
echo "MVSNAP_RUNTIME_DIR=RUN mvsnap --store STORE serve --nbd-socket SOCK --detach"
echo "mvsnap --store STORE snapshot create disk0 --tag fresh     # fresh-snapshot case (store $FRESH_STORE_SIZE)"
echo "dd if=/dev/zero of=STORE bs=1M count=... conv=fsync     # diagnostic row only, before format"
echo "$CACHE_CMD    # \"cached\" diagnostic row only, after serve"
echo "qemu-img create -f qcow2 -F raw -b IMG -o extended_l2=on,cluster_size=64k OVERLAY"
echo "qemu-img create -f qcow2 -F raw -b IMG -o cluster_size=64k OVERLAY"
echo "qemu-nbd -f qcow2 ${QEMU_NBD_OPTS[*]} -x disk0 -k SOCK --fork --pid-file=PIDFILE OVERLAY"
echo "# 10 snapshots: 10 x (fio randwrite bs=64k iodepth=8 io_size=SIZE/10 randseed=100+i on disk0;"
echo "#                     mvsnap snapshot create disk0 --tag sNN)"
echo "# each line (rw/bs/iodepth from the table):"
fio_cmd "nbd+unix:///EXPORT?socket=SOCK" RW BS QD "$runtime" "$ramp" OUT | sed 's/ $//'
echo
echo "# right after a snapshot:"
fio_cmd "nbd+unix:///disk0?socket=SOCK" randwrite 4k 16 "$window" 0 OUT | sed 's/ $//'
echo
echo '```'
echo

# ---------------------------------------------------------------- the run
log "work dir $work; image $size"
for ((rep = 1; rep <= reps; rep++)); do
    if [ "$only" != fresh ]; then
    log "repetition $rep of $reps: starting qemu-nbd, nbdkit, mvsnap (no snapshot), mvsnap (10 snapshots)"
    fill_image "$img"
    fill_image "$img10"
    start_qemu_nbd q raw "$img"
    start_nbdkit k "$img"
    start_mvsnap m "$img" "$STORE_SIZE"
    start_mvsnap m10 "$img10" "$STORE_SIZE"
    log "  10 write passes on the 10-snapshot store, a snapshot after each"
    ten_snapshots m10
    sync
    for l in "${LINES[@]}"; do
        name=${l%%|*}
        while IFS='|' read -r -u 3 who server export; do
            # Snapshot exports are read-only: read lines only.
            [[ $export == *@* && $name == *write* ]] && continue
            measure "$rep" "$who" "$name" "$server" "$export"
        done 3< <(rotate "$rep" "${CONTENDERS[@]}")
    done
    stop_servers
    fi
    if [ "$only" != main ]; then
        while read -r -u 3 who; do fresh_one "$rep" "$who"; done 3< <(rotate "$rep" "${FRESH[@]}")
    fi
done
[ -n "$raw_out" ] && cp "$results" "$raw_out"

# ---------------------------------------------------------------- tables
med() { # med CONTENDER LINE -> median (empty if none)
    awk -F'\t' -v w="$1" -v l="$2" '$2 == w && $3 == l { print $4 }' "$results" | sort -g |
        awk '{ v[NR] = $1 } END { if (NR == 0) exit;
            if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
spread() { # spread CONTENDER LINE -> (max-min)/median in %
    awk -F'\t' -v w="$1" -v l="$2" '$2 == w && $3 == l { print $4 }' "$results" | sort -g |
        awk '{ v[NR] = $1 } END { if (NR < 2) { print "-"; exit }
            m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2;
            printf "%.0f%%", (m > 0 ? 100 * (v[NR] - v[1]) / m : 0) }'
}
fmt() { [ -z "$1" ] && { echo "-"; return; }; awk -v v="$1" 'BEGIN { printf (v >= 1000 ? "%.0f" : "%.1f"), v }'; }
ratio() { [ -z "$1" ] || [ -z "$2" ] && { echo "-"; return; }; awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }

echo "#### No snapshot, and with 10 snapshots (median of $reps; IOPS or MiB/s)"
echo
echo "| line | unit | qemu-nbd | nbdkit | mvsnap origin | **mvsnap / qemu-nbd** | mvsnap, 10 snapshots | 10 snapshots / qemu-nbd | read from disk0@s05 | s05 / qemu-nbd |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
origin_fail=()
for l in "${LINES[@]}"; do
    n=${l%%|*}
    q=$(med qemu-nbd "$n") k=$(med nbdkit "$n") m=$(med mvsnap "$n") t=$(med mvsnap-10snap "$n")
    s=$(med mvsnap-10snap-s05 "$n")
    r=$(ratio "$m" "$q")
    # Compared unrounded: 0.998 is not "at least as fast" even if it prints as 1.00.
    awk -v a="$m" -v b="$q" 'BEGIN { exit !(a != "" && b != "" && a + 0 < b + 0) }' && origin_fail+=("$n ($r)")
    echo "| $n | $(line_field "$n" 5) | $(fmt "$q") | $(fmt "$k") | $(fmt "$m") | **$r** | $(fmt "$t") | $(ratio "$t" "$q") | $(fmt "$s") | $(ratio "$s" "$q") |"
done
echo
echo "#### Right after a fresh snapshot: 4 KiB random writes, QD16, first ${window} s (median of $reps; IOPS)"
echo
ref_q=$(med qemu-nbd 4k-randwrite-qd16) ref_m=$(med mvsnap 4k-randwrite-qd16)
f=$(med mvsnap-fresh 4k-randwrite-qd16) z=$(med mvsnap-fresh-prezero 4k-randwrite-qd16) c=$(med mvsnap-fresh-cached 4k-randwrite-qd16) e=$(med qcow2-el2 4k-randwrite-qd16) p=$(med qcow2-64k 4k-randwrite-qd16)
echo "| contender | IOPS | mvsnap / this | same contender before the snapshot |"
echo "|---|---:|---:|---:|"
echo "| mvsnap, fresh snapshot | $(fmt "$f") | 1.00 | $(fmt "$ref_m") (mvsnap origin, no snapshot) |"
echo "| (diagnostic) mvsnap, fresh snapshot, store file written with zeros before format | $(fmt "$z") | $(ratio "$f" "$z") | |"
echo "| (diagnostic) mvsnap, fresh snapshot, origin read back into the page cache after serve | $(fmt "$c") | $(ratio "$f" "$c") | (this / el2: $(ratio "$c" "$e")) |"
echo "| qemu-nbd, qcow2 overlay extended_l2=on, 64 KiB clusters | $(fmt "$e") | $(ratio "$f" "$e") | $(fmt "$ref_q") (qemu-nbd raw) |"
echo "| qemu-nbd, qcow2 overlay, plain 64 KiB clusters | $(fmt "$p") | $(ratio "$f" "$p") | $(fmt "$ref_q") (qemu-nbd raw) |"
echo
echo "#### Targets"
echo
if [ ${#origin_fail[@]} -eq 0 ]; then
    echo "- mvsnap origin (no snapshot) at least as fast as qemu-nbd on every line: **met**."
else
    echo "- mvsnap origin (no snapshot) at least as fast as qemu-nbd on every line: **not met** on: ${origin_fail[*]}."
fi
fr=$(ratio "$f" "$e")
if awk -v a="$f" -v b="$e" 'BEGIN { exit !(a != "" && b != "" && a + 0 >= b + 0) }'; then
    echo "- right after a snapshot, 4 KiB random writes QD16 at least as fast as qemu into a qcow2 extended_l2 overlay: **met** ($(fmt "$f") vs $(fmt "$e") IOPS, ratio $fr)."
else
    echo "- right after a snapshot, 4 KiB random writes QD16 at least as fast as qemu into a qcow2 extended_l2 overlay: **not met** ($(fmt "$f") vs $(fmt "$e") IOPS, ratio $fr)."
fi
echo
echo "#### Spread of the repetitions ((max - min) / median)"
echo
echo "| line | qemu-nbd | nbdkit | mvsnap | mvsnap 10 snapshots | disk0@s05 |"
echo "|---|---:|---:|---:|---:|---:|"
for l in "${LINES[@]}"; do
    n=${l%%|*}
    echo "| $n | $(spread qemu-nbd "$n") | $(spread nbdkit "$n") | $(spread mvsnap "$n") | $(spread mvsnap-10snap "$n") | $(spread mvsnap-10snap-s05 "$n") |"
done
echo "| after snapshot (mvsnap / prezeroed / cached / el2 / 64k) | $(spread mvsnap-fresh 4k-randwrite-qd16) / $(spread mvsnap-fresh-prezero 4k-randwrite-qd16) / $(spread mvsnap-fresh-cached 4k-randwrite-qd16) / $(spread qcow2-el2 4k-randwrite-qd16) / $(spread qcow2-64k 4k-randwrite-qd16) | | | | |"
echo
echo "Load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
